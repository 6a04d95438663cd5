//! A guest driver that writes and reads the virtio-mmio registers of a
//! virtio-fs device in any order, with any widths and values: its
//! configuration space at any offset, queues of any size at any address
//! (in or past a small shared guest memory), DRIVER_OK and resets at any
//! time, with the event loop's work (the vhost-user set-up) run in
//! between. The backend is the scripted stub of the device's unit tests
//! (a fuzzer cannot run virtiofsd); neither the transport nor the device
//! may panic, and a set-up the backend takes must name only rings inside
//! guest memory. Every input ends with the backend's thread joined, so
//! the leak check sees nothing of it.
#![no_main]

use std::sync::{Arc, Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use vmm::config::FsConfig;
use vmm::devices::virtio::fs::test_backend::{Script, StubBackend};
use vmm::devices::virtio::fs::Fs;
use vmm::devices::virtio::mmio::MmioTransport;
use vmm::vstate::memory::{create_with, Backing};

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();
    let dir = DIR
        .get_or_init(|| std::env::temp_dir().join(format!("husk-fuzz-fs-{}", std::process::id())));
    let Ok(backend) = StubBackend::spawn(
        dir,
        "fs",
        Script {
            queues: 3,
            ..Default::default()
        },
    ) else {
        return;
    };
    let config = FsConfig {
        id: "fs0".into(),
        tag: "fuzz".into(),
        socket: backend.socket().to_path_buf(),
        num_queues: 2,
        queue_size: 256,
        relay: false,
    };
    let Ok(fs) = Fs::new(&config) else {
        return;
    };
    let Ok(mem) = create_with(common::MEM_SIZE as u64, Backing::Shared) else {
        return;
    };
    let fs = Arc::new(Mutex::new(fs));
    let mut t = MmioTransport::new(mem, fs.clone());
    let ops = &data[..data.len().min(256 * 8)];
    common::play_registers(&mut t, ops, || fs.lock().unwrap().run_pending());
    fs.lock().unwrap().run_pending();
    // The device closes its connection when dropped; then the backend's
    // thread ends, before libFuzzer looks for leaks.
    drop(t);
    drop(fs);
    backend.finish();
});
