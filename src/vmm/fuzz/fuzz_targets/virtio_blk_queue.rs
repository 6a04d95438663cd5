//! A guest that controls everything a virtio-blk queue is made of: the
//! bytes of guest memory (descriptor table, rings, request headers and
//! buffers) and the queue's size and ring addresses. The device must serve
//! or reject whatever it finds without panicking, hanging or touching memory
//! outside the guest's.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vmm::devices::virtio::VirtioDevice;

#[path = "common.rs"]
mod common;

fn u32_at(d: &[u8], i: usize) -> u32 {
    d.get(i..i + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .unwrap_or(0)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 16 {
        return;
    }
    // Header: queue size, three ring addresses (kept inside or just past the
    // small guest so they are often valid), read-only flag.
    let size = (u32_at(data, 0) as u16) & 0x1ff;
    let addr = |i| u64::from(u32_at(data, i) % (common::MEM_SIZE as u32 + 0x1000));
    let (desc, avail, used) = (addr(4), addr(8), addr(12));
    let read_only = data.len() % 2 == 1;
    let mem = common::guest_memory(&data[16..]);

    let Ok(mut q) = Queue::new(256) else { return };
    q.set_size(size);
    q.set_desc_table_address(Some(desc as u32), Some(0));
    q.set_avail_ring_address(Some(avail as u32), Some(0));
    q.set_used_ring_address(Some(used as u32), Some(0));
    q.set_ready(true);
    if !q.is_valid(&mem) {
        // The transport refuses such a queue at DRIVER_OK.
        return;
    }
    let mut blk = common::block(read_only);
    if blk.activate(mem.clone(), vec![q], 0).is_ok() {
        // Serve again, as a second notification would.
        blk.process_queue();
        blk.reset();
    }
});
