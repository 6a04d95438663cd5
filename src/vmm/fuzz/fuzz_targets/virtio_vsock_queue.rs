//! A guest that controls everything the vsock rx and tx queues are made
//! of: guest memory (descriptor tables, rings, packet headers, payloads)
//! and both queues' sizes and ring addresses. Guest REQUESTs to port 1024
//! reach a real host socket. The device must serve or reject whatever it
//! finds without panicking, hanging or touching memory outside the guest's.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vmm::devices::virtio::VirtioDevice;

#[path = "common.rs"]
mod common;

fn queue(data: &[u8], at: usize, mem: &vm_memory::GuestMemoryMmap) -> Option<Queue> {
    common::queue_from(data, at, [at + 2, at + 6, at + 10], mem)
}

fuzz_target!(|data: &[u8]| {
    // Header: rx queue (size, desc, avail, used) at 0, tx queue at 14.
    if data.len() < 32 {
        return;
    }
    let mem = common::guest_memory(&data[32..]);
    let (Some(rx), Some(tx)) = (queue(data, 0, &mem), queue(data, 14, &mem)) else {
        return;
    };
    let Ok(event) = Queue::new(256) else { return };
    let (mut dev, listener) = common::vsock();
    if dev.activate(mem.clone(), vec![rx, tx, event], 0).is_err() {
        return;
    }
    // As the event loop would: tx, then rx, twice (a second notification).
    // However the guest laid out its ring, one pass takes at most a
    // queue's worth of chains.
    for _ in 0..2 {
        assert!(dev.process_tx() <= vmm::devices::virtio::vsock::device::BUDGET);
        dev.process_rx();
        // The host accepts what reached it, so the backlog never fills.
        while let Ok((s, _)) = listener.accept() {
            drop(s);
        }
    }
    dev.reset();
    dev.process_rx();
});
