// Shared by the fuzz targets: a small guest and a block device on a scratch file.

use std::path::PathBuf;

use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm::devices::virtio::block::{Block, BlockConfig};

/// Guest RAM for the targets: small, so random addresses often hit it.
pub const MEM_SIZE: usize = 0x10_0000;

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
