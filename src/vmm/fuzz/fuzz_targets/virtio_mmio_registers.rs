//! A guest driver that writes and reads the virtio-mmio registers of a
//! block device in any order, with any widths and values, over a guest
//! memory it also controls. The transport must keep its rules (and the
//! device its queue) without panicking.
#![no_main]

use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use vmm::devices::virtio::mmio::MmioTransport;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let (ops, image) = data.split_at(data.len().min(512));
    let mem = common::guest_memory(image);
    let block = Arc::new(Mutex::new(common::block(false)));
    let mut t = MmioTransport::new(mem, block.clone());
    // A queue notification served by the event loop after some ops.
    common::play_registers(&mut t, ops, || block.lock().unwrap().process_queue());
});
