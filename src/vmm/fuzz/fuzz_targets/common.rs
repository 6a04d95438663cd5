// Shared by the fuzz targets: a small guest and a block device on a scratch file.
#![allow(dead_code)] // each target uses part of it

use std::path::PathBuf;

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm::devices::virtio::block::{Block, BlockConfig};

/// Guest RAM for the targets: small, so random addresses often hit it.
pub const MEM_SIZE: usize = 0x10_0000;

/// The little-endian u32 at `i` of the fuzz input (0 past its end).
pub fn u32_at(d: &[u8], i: usize) -> u32 {
    d.get(i..i + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .unwrap_or(0)
}

/// A ready queue read from the fuzz input: its size at `size_at`, its
/// descriptor table, avail and used ring addresses at `rings` (kept inside
/// or just past the small guest, so they are often valid). `None` when the
/// transport would refuse it at DRIVER_OK.
pub fn queue_from(
    data: &[u8],
    size_at: usize,
    rings: [usize; 3],
    mem: &GuestMemoryMmap,
) -> Option<Queue> {
    let size = (u32_at(data, size_at) as u16) & 0x1ff;
    let addr = |i| u32_at(data, i) % (MEM_SIZE as u32 + 0x1000);
    let mut q = Queue::new(256).ok()?;
    q.set_size(size);
    q.set_desc_table_address(Some(addr(rings[0])), Some(0));
    q.set_avail_ring_address(Some(addr(rings[1])), Some(0));
    q.set_used_ring_address(Some(addr(rings[2])), Some(0));
    q.set_ready(true);
    q.is_valid(mem).then_some(q)
}

pub fn guest_memory(image: &[u8]) -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory");
    let n = image.len().min(MEM_SIZE);
    vm_memory::Bytes::write_slice(&mem, &image[..n], GuestAddress(0)).expect("guest image");
    mem
}

/// A 64 KiB scratch disk, one per fuzzing process.
pub fn block(read_only: bool) -> Block {
    let path: PathBuf = std::env::temp_dir().join(format!("husk-fuzz-disk-{}", std::process::id()));
    if !path.exists() {
        std::fs::write(&path, vec![0u8; 64 * 1024]).expect("scratch disk");
    }
    Block::new(BlockConfig {
        id: "fuzz".into(),
        path,
        read_only,
    })
    .expect("block device")
}

/// A vsock device (cid 3) whose socket lives in a per-process scratch
/// directory, with a host listener on port 1024 (`<uds>_1024`) so guest
/// REQUESTs reach a real socket. Returns the device and that listener.
pub fn vsock() -> (
    vmm::devices::virtio::vsock::Vsock,
    std::os::unix::net::UnixListener,
) {
    let dir = std::env::temp_dir().join(format!("husk-fuzz-vsock-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let uds = dir.join("v.sock");
    let port = dir.join("v.sock_1024");
    let _ = std::fs::remove_file(&port);
    let listener = std::os::unix::net::UnixListener::bind(&port).expect("host listener");
    listener.set_nonblocking(true).expect("nonblocking");
    let dev = vmm::devices::virtio::vsock::Vsock::new(&vmm::devices::virtio::vsock::VsockConfig {
        guest_cid: 3,
        uds_path: uds,
    })
    .expect("vsock device");
    (dev, listener)
}

/// Plays register accesses from the fuzz input on `t`: each 8-byte op is a
/// kind (bit 2: read, else write; bits 0-1: width 1, 2, 4 or 8), an
/// offset in the window (registers and configuration space) and a value;
/// `after` runs after each op whose bit 3 is set (the event loop's turn).
pub fn play_registers(
    t: &mut vmm::devices::virtio::mmio::MmioTransport,
    ops: &[u8],
    mut after: impl FnMut(),
) {
    use vmm::devices::bus::BusDevice;
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
            after();
        }
    }
}
