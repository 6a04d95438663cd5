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

/// Where a driver laid out one split queue: what [`WriteAudit`] needs to
/// know which guest memory the device was allowed to write.
#[derive(Clone, Copy, Debug)]
pub struct QueueLayout {
    /// The descriptor table.
    pub desc_table: u64,
    /// The used ring (flags, idx, ring, avail_event).
    pub used_ring: u64,
    /// Entries in the queue.
    pub size: u16,
}

impl QueueLayout {
    /// The layout of one of virtio-queue's mock queues of `size` entries.
    pub fn of(q: &virtio_queue::mock::MockSplitQueue<'_, GuestMemoryMmap>, size: u16) -> Self {
        QueueLayout {
            desc_table: q.desc_table_addr().0,
            used_ring: q.used_addr().0,
            size,
        }
    }

    fn used_idx(&self, m: &GuestMemoryMmap) -> u16 {
        use vm_memory::Bytes;
        m.read_obj(GuestAddress(self.used_ring + 2)).unwrap_or(0)
    }

    /// The bytes of the used ring, including `avail_event`.
    fn used_ring_range(&self) -> (u64, u64) {
        (self.used_ring, 6 + 8 * u64::from(self.size))
    }

    /// The device-writable buffers of the chain headed by `head`, in order
    /// (indirect tables followed; a looping or broken chain ends where it
    /// breaks).
    fn writable(&self, m: &GuestMemoryMmap, head: u16) -> Vec<(u64, u64)> {
        use vm_memory::Bytes;
        let read = |table: u64, i: u64| -> Option<SplitDescriptor> {
            m.read_obj::<RawDescriptor>(GuestAddress(table.checked_add(16 * i)?))
                .ok()
                .map(SplitDescriptor::from)
        };
        let mut out = Vec::new();
        let (mut table, mut entries, mut i) =
            (self.desc_table, u64::from(self.size), u64::from(head));
        for _ in 0..4 * u64::from(self.size) {
            if i >= entries {
                break;
            }
            let Some(desc) = read(table, i) else { break };
            if desc.flags() & INDIRECT != 0 {
                table = desc.addr().0;
                entries = u64::from(desc.len()) / 16;
                i = 0;
                continue;
            }
            if desc.flags() & WRITE != 0 {
                out.push((desc.addr().0, u64::from(desc.len())));
            }
            if desc.flags() & NEXT == 0 {
                break;
            }
            i = u64::from(desc.next());
        }
        out
    }
}

/// A copy of guest memory taken before a device runs, to check after it
/// that the device wrote only where the driver let it: the used rings of
/// its queues, and the first `len` bytes of the writable buffers of each
/// chain it returned with length `len` in between. A write anywhere else
/// is what corrupts a guest (the kernel text, another buffer's slab
/// neighbour) and is found here before a guest ever runs.
pub struct WriteAudit {
    before: Vec<(u64, Vec<u8>)>,
    queues: Vec<(QueueLayout, u16)>,
}

impl WriteAudit {
    /// Takes the copy, and each queue's used index.
    pub fn new(m: &GuestMemoryMmap, queues: &[QueueLayout]) -> Self {
        Self::except_regions(m, queues, &[])
    }

    /// As [`WriteAudit::new`], leaving out the memory regions that start at
    /// `skip` (a virtio-mem region, whose unplugged blocks the device
    /// discards and which is too large to copy).
    pub fn except_regions(m: &GuestMemoryMmap, queues: &[QueueLayout], skip: &[u64]) -> Self {
        use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};
        let before = m
            .iter()
            .filter(|r| !skip.contains(&r.start_addr().0))
            .map(|r| {
                let mut copy = vec![0u8; r.len() as usize];
                m.read_slice(&mut copy, r.start_addr())
                    .expect("a region reads whole");
                (r.start_addr().0, copy)
            })
            .collect();
        let queues = queues.iter().map(|q| (*q, q.used_idx(m))).collect();
        WriteAudit { before, queues }
    }

    /// Panics, naming the address, if the device wrote a byte outside the
    /// used length of the chains it returned (counted from their first
    /// writable byte, as the spec says and as the net and vsock drivers
    /// read it), or returned a chain with more bytes than it can hold.
    pub fn check(&self, m: &GuestMemoryMmap) {
        use vm_memory::Bytes;
        let mut allowed = Vec::new();
        for (q, from) in &self.queues {
            allowed.push(q.used_ring_range());
            let mut i = *from;
            while i != q.used_idx(m) {
                let at = q.used_ring + 4 + 8 * u64::from(i % q.size);
                let id: u32 = m.read_obj(GuestAddress(at)).expect("used ring");
                let len: u32 = m.read_obj(GuestAddress(at + 4)).expect("used ring");
                let bufs = q.writable(m, (id % u32::from(q.size)) as u16);
                let room: u64 = bufs.iter().map(|b| b.1).sum();
                assert!(
                    u64::from(len) <= room,
                    "used element {i} returns chain {id} with length {len}, but it has {room} writable bytes"
                );
                let mut left = u64::from(len);
                for (addr, blen) in bufs {
                    let n = left.min(blen);
                    allowed.push((addr, n));
                    left -= n;
                }
                i = i.wrapping_add(1);
            }
        }
        let inside = |a: u64| allowed.iter().any(|&(s, l)| a >= s && a - s < l);
        for (start, old) in &self.before {
            let mut now = vec![0u8; old.len()];
            m.read_slice(&mut now, GuestAddress(*start))
                .expect("a region reads whole");
            for (page, (o, n)) in old.chunks(4096).zip(now.chunks(4096)).enumerate() {
                if o == n {
                    continue;
                }
                for (k, (a, b)) in o.iter().zip(n).enumerate() {
                    let addr = start + (page * 4096 + k) as u64;
                    assert!(
                        a == b || inside(addr),
                        "the device wrote {b:#04x} (was {a:#04x}) at {addr:#x}, outside every buffer it returned and its used rings: {allowed:x?}"
                    );
                }
            }
        }
    }
}
