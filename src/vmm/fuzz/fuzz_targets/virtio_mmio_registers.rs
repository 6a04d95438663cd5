//! A guest driver that writes and reads the virtio-mmio registers of a
//! block device in any order, with any widths and values, over a guest
//! memory it also controls. The transport must keep its rules (and the
//! device its queue) without panicking.
#![no_main]

use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use vmm::devices::bus::BusDevice;
use vmm::devices::virtio::mmio::MmioTransport;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let (ops, image) = data.split_at(data.len().min(512));
    let mem = common::guest_memory(image);
    let block = Arc::new(Mutex::new(common::block(false)));
    let mut t = MmioTransport::new(mem, block.clone());
    // Each op: kind (read/write, width), offset, value.
    for op in ops.chunks_exact(8) {
        let width = [1usize, 2, 4, 8][usize::from(op[0] & 3)];
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]])) & 0x1ff;
        let value = [op[3], op[4], op[5], op[6], op[7], 0, 0, 0];
        if op[0] & 4 == 0 {
            t.write(offset, &value[..width]);
        } else {
            let mut buf = [0u8; 8];
            t.read(offset, &mut buf[..width]);
        }
        if op[0] & 8 != 0 {
            // A queue notification served by the event loop.
            block.lock().unwrap().process_queue();
        }
    }
});
