//! A guest that controls everything a virtio-blk queue is made of: the
//! bytes of guest memory (descriptor table, rings, request headers and
//! buffers) and the queue's size and ring addresses. The device must serve
//! or reject whatever it finds without panicking, hanging or touching memory
//! outside the guest's.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::devices::virtio::VirtioDevice;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    if data.len() < 16 {
        return;
    }
    // Header: queue size, three ring addresses; the input's parity is the
    // read-only flag.
    let read_only = data.len() % 2 == 1;
    let mem = common::guest_memory(&data[16..]);
    let Some(q) = common::queue_from(data, 0, [4, 8, 12], &mem) else {
        return;
    };
    let mut blk = common::block(read_only);
    if blk.activate(mem.clone(), vec![q], 0).is_ok() {
        // Serve as the event loop does after activation, then again, as a
        // second notification would.
        blk.process_queue();
        blk.process_queue();
        blk.reset();
    }
});
