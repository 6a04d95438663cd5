//! A guest that controls everything a virtio-net device's two queues are
//! made of: the bytes of guest memory (descriptor tables, rings, frames) and
//! each queue's size and ring addresses, with frames waiting on the backend
//! side too. The device must send, receive or refuse whatever it finds
//! without panicking, hanging or touching memory outside the guest's.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtio_queue::Queue;
use vmm::devices::virtio::net::test_utils::SocketBackend;
use vmm::devices::virtio::net::Net;
use vmm::devices::virtio::VirtioDevice;

// Only the guest memory helper is used here, not the block device.
#[allow(dead_code)]
#[path = "common.rs"]
mod common;

fn queue(data: &[u8], at: usize, mem: &vm_memory::GuestMemoryMmap) -> Option<Queue> {
    common::queue_from(data, at, [at + 4, at + 8, at + 12], mem)
}

fuzz_target!(|data: &[u8]| {
    // Header: two queues (16 bytes each), the acked features, then the
    // number and sizes of frames waiting on the backend (bit 3 of the count
    // byte doubles the sizes, past the device's largest frame, which a tap
    // reports whole when it cut one); the rest is memory.
    if data.len() < 40 {
        return;
    }
    let mem = common::guest_memory(&data[40..]);
    let (Some(rx), Some(tx)) = (queue(data, 0, &mem), queue(data, 16, &mem)) else {
        return;
    };
    let features = u64::from(common::u32_at(data, 32));
    let Ok((backend, peer)) = SocketBackend::pair() else {
        return;
    };
    let Ok(mut net) = Net::with_backend("fuzz".into(), None, Box::new(backend)) else {
        return;
    };
    let frames = data[36] & 7;
    let scale = 1 + usize::from((data[36] >> 3) & 1);
    for i in 0..frames {
        let len = (usize::from(u16::from_le_bytes([data[37], data[38]])) * scale) >> i;
        let _ = peer.send(&vec![data[39]; len]);
    }
    if net.activate(mem.clone(), vec![rx, tx], features).is_ok() {
        net.process_tx();
        net.process_rx();
        // Serve again, as further notifications would.
        net.process_tx();
        net.process_rx();
        net.reset();
    }
});
