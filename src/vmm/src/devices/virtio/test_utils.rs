//! Helpers shared by the virtio device tests: a real guest memory and
//! descriptors to write into it.

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// VRING_DESC_F_NEXT.
pub const NEXT: u16 = 1;
/// VRING_DESC_F_WRITE: the device writes the buffer.
pub const WRITE: u16 = 2;
/// VRING_DESC_F_INDIRECT: the buffer is a table of descriptors.
pub const INDIRECT: u16 = 4;
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

/// A ready queue of `size` with its descriptor table at 0 and its rings
/// where the test puts them (below 4 GiB). (virtio-queue's MockSplitQueue
/// lays its used ring over the end of its avail ring, where `used_event`
/// lives, which EVENT_IDX tests cannot have.)
pub fn hand_laid_queue(size: u16, avail: u64, used: u64, event_idx: bool) -> virtio_queue::Queue {
    use virtio_queue::QueueT;
    let mut q = virtio_queue::Queue::new(size).expect("queue");
    q.set_size(size);
    q.set_desc_table_address(Some(0), Some(0));
    q.set_avail_ring_address(Some(avail as u32), Some(0));
    q.set_used_ring_address(Some(used as u32), Some(0));
    q.set_ready(true);
    q.set_event_idx(event_idx);
    q
}

/// Writes `descs` as a descriptor table at `addr`; returns its length in
/// bytes (what an indirect descriptor pointing at it carries).
pub fn write_table(m: &GuestMemoryMmap, addr: u64, descs: &[RawDescriptor]) -> u32 {
    use vm_memory::Bytes;
    for (i, desc) in descs.iter().enumerate() {
        m.write_obj(*desc, GuestAddress(addr + 16 * i as u64))
            .expect("descriptor table inside guest memory");
    }
    (descs.len() * 16) as u32
}
