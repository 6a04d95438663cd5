//! A guest driver that writes and reads the virtio-mmio registers of a
//! virtio-fs device in any order, with any widths and values: its
//! configuration space at any offset, queues of any size at any address
//! (in or past a small shared guest memory), DRIVER_OK and resets at any
//! time, with the event loop's work (the vhost-user set-up) run in
//! between. The backend is the scripted stub of the device's unit tests
//! (a fuzzer cannot run virtiofsd); neither the transport nor the device
//! may panic, and a set-up the backend takes must name only rings inside
//! guest memory.
#![no_main]

use std::sync::{Arc, Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use vmm::config::FsConfig;
use vmm::devices::bus::BusDevice;
use vmm::devices::virtio::fs::test_backend::{Script, StubBackend};
use vmm::devices::virtio::fs::Fs;
use vmm::devices::virtio::mmio::MmioTransport;
use vmm::vstate::memory::{create_with, Backing};

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| std::env::temp_dir().join(format!("husk-fuzz-fs-{}", std::process::id())));
    let Ok(backend) = StubBackend::spawn(dir, "fs", Script { queues: 3, ..Default::default() }) else {
        return;
    };
    let config = FsConfig {
        id: "fs0".into(),
        tag: "fuzz".into(),
        socket: backend.socket().to_path_buf(),
        num_queues: 2,
        queue_size: 256,
    };
    let Ok(fs) = Fs::new(&config) else {
        return;
    };
    let Ok(mem) = create_with(common::MEM_SIZE as u64, Backing::Shared) else {
        return;
    };
    let fs = Arc::new(Mutex::new(fs));
    let mut t = MmioTransport::new(mem, fs.clone());
    // Each op: kind (read/write, width, run the event loop's work), offset
    // (registers and configuration space), value.
    for op in data.chunks_exact(8).take(256) {
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
            fs.lock().unwrap().run_pending();
        }
    }
    fs.lock().unwrap().run_pending();
});
