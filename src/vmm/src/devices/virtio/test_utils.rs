//! Helpers shared by the virtio device tests: a real guest memory and
//! descriptors to write into it.

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// VRING_DESC_F_NEXT.
pub const NEXT: u16 = 1;
/// VRING_DESC_F_WRITE: the device writes the buffer.
pub const WRITE: u16 = 2;
/// Size of [`mem`].
pub const MEM_SIZE: usize = 0x40_0000;

/// Guest memory of `size` bytes from address 0.
pub fn guest_mem(size: usize) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).expect("guest memory")
}

/// 4 MiB of guest memory from address 0.
pub fn mem() -> GuestMemoryMmap {
    guest_mem(MEM_SIZE)
}

/// A split-queue descriptor.
pub fn d(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}
