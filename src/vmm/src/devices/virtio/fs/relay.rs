//! The relay: virtio-fs without giving the backend the guest's memory.
//!
//! In the direct mode the backend (virtiofsd) maps all of guest memory and
//! reads the guest's rings itself. In the relay mode husk serves the
//! guest's queues like any of its own devices and hands each request to
//! the backend through a small area of its own, the *shadow*: one memfd
//! shared with the backend and described to it as the only "guest memory"
//! there is, holding, per queue, a split ring of [`SHADOW_RING`]
//! descriptors and a pool of bounce buffers.
//!
//! A guest request (a chain: readable descriptors, then writable ones)
//! becomes a shadow chain of at most two descriptors: its readable bytes,
//! copied into the pool, and room for its reply. When the backend has
//! used the shadow chain, husk copies the reply (as many bytes as the
//! backend says it wrote, never more than the guest's writable buffers
//! hold) into the guest's buffers and returns the guest's chain.
//!
//! What it buys: the backend never sees a byte of guest memory outside the
//! requests in flight, so guest memory need not be a memfd (a restored
//! guest maps its template's memory file private and shares its pages
//! with every clone, docs/snapshots.md); what it costs: one copy of every
//! request and reply, and up to [`REQUEST_POOL`] of bounce buffers per
//! request queue (docs/devices.md).
//!
//! The guest is not trusted (bad chains are returned unused and counted),
//! nor is the backend: a used-ring entry that names no chain in flight, or
//! a used index that runs more than a ring ahead, is a [`RelayError`] and
//! the device stops (DEVICE_NEEDS_RESET), as when the backend goes away.

use std::sync::atomic::Ordering;

use vhost::{VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

use crate::devices::virtio::chain::{self, Chain};
use crate::devices::virtio::Rearm;

/// Descriptors per shadow ring: two per request in flight.
pub const SHADOW_RING: u16 = 128;
/// Requests in flight per queue.
const SLOTS: u16 = SHADOW_RING / 2;
/// Bytes of bounce buffers for each request queue: a FUSE request carries
/// at most 1 MiB of data (virtiofsd's `max_pages`), so several of the
/// largest fit at once.
pub const REQUEST_POOL: u64 = 4 << 20;
/// Bytes of bounce buffers for the high-priority queue (FORGET and
/// INTERRUPT requests, a few dozen bytes each).
pub const HIPRIO_POOL: u64 = 64 << 10;
/// Each queue's rings take one page of the shadow.
const RING_BLOCK: u64 = 4096;
/// The pool's unit.
const PAGE: u64 = 4096;
/// `struct fuse_in_header`: every request starts with one.
const FUSE_IN_HEADER: u64 = 40;
/// `struct fuse_out_header`: every reply starts with one.
const FUSE_OUT_HEADER: u32 = 16;
/// Where a request's reply room starts after its readable bytes.
const REPLY_ALIGN: u64 = 64;

const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;

/// Where one queue's parts lie in the shadow.
#[derive(Debug, Clone, Copy)]
struct Layout {
    desc: u64,
    avail: u64,
    used: u64,
    pool: u64,
    pool_len: u64,
}

impl Layout {
    fn new(ring_at: u64, pool: u64, pool_len: u64) -> Self {
        let n = u64::from(SHADOW_RING);
        // virtio 1.2, 2.7: 16-byte descriptors, then the driver ring
        // (flags, idx, ring[n], used_event), then the device ring, 4-aligned.
        let avail = ring_at + 16 * n;
        let used = (avail + 6 + 2 * n).next_multiple_of(4);
        debug_assert!(used + 6 + 8 * n <= ring_at + RING_BLOCK);
        Layout {
            desc: ring_at,
            avail,
            used,
            pool,
            pool_len,
        }
    }
}

/// The memory shared with the backend: every queue's shadow ring and
/// bounce buffers.
pub struct Shadow {
    mem: GuestMemoryMmap,
    layouts: Vec<Layout>,
}

impl std::fmt::Debug for Shadow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shadow")
            .field("queues", &self.layouts.len())
            .finish_non_exhaustive()
    }
}

/// Why the relay stopped.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The shadow could not be made.
    #[error("cannot make the relay's shared buffers")]
    Create(#[source] crate::vstate::memory::MemoryError),
    /// The backend returned a chain husk did not give it.
    #[error("the backend used shadow descriptor {id} of queue {queue}, which is not a request in flight")]
    UnknownChain {
        /// The queue.
        queue: usize,
        /// The descriptor index it named.
        id: u32,
    },
    /// The backend's used index ran ahead of what was ever in flight.
    #[error("the backend's used index of queue {queue} moved by {by}, more than the {SLOTS} requests in flight")]
    UsedIndex {
        /// The queue.
        queue: usize,
        /// How far it moved.
        by: u16,
    },
    /// The shadow could not be read or written (husk's own memory).
    #[error("cannot access the relay's shared buffers")]
    Access(#[source] vm_memory::GuestMemoryError),
}

impl Shadow {
    /// A shadow for `queues` queues, the first of them the high-priority one.
    pub fn new(queues: usize) -> Result<Self, RelayError> {
        let rings = RING_BLOCK * queues as u64;
        let mut pool = rings;
        let layouts: Vec<Layout> = (0..queues)
            .map(|q| {
                let len = if q == 0 { HIPRIO_POOL } else { REQUEST_POOL };
                let layout = Layout::new(RING_BLOCK * q as u64, pool, len);
                pool += len;
                layout
            })
            .collect();
        let mem = crate::vstate::memory::shared_buffer(pool).map_err(RelayError::Create)?;
        Ok(Shadow { mem, layouts })
    }

    /// The memory table the backend gets: the shadow, at address 0 of an
    /// address space of its own.
    pub fn regions(&self) -> Result<Vec<VhostUserMemoryRegionInfo>, String> {
        self.mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())
    }

    /// Queue `q`'s shadow rings, as the backend is told of them (husk's
    /// addresses, which the memory table translates).
    pub fn vring_config(&self, q: usize) -> Option<VringConfigData> {
        let l = self.layouts.get(q)?;
        let host = |a: u64| {
            self.mem
                .get_host_address(GuestAddress(a))
                .ok()
                .map(|p| p as u64)
        };
        Some(VringConfigData {
            queue_max_size: SHADOW_RING,
            queue_size: SHADOW_RING,
            flags: 0,
            desc_table_addr: host(l.desc)?,
            avail_ring_addr: host(l.avail)?,
            used_ring_addr: host(l.used)?,
            log_addr: None,
        })
    }

    /// Empties every ring (indices back to 0), before the backend is
    /// given them again.
    fn clear_rings(&self) -> Result<(), RelayError> {
        let zero = [0u8; RING_BLOCK as usize];
        for l in &self.layouts {
            self.mem
                .write_slice(&zero, GuestAddress(l.desc))
                .map_err(RelayError::Access)?;
        }
        Ok(())
    }

    /// The shadow's memory (tests read what the backend would).
    #[cfg(any(test, feature = "test-utils"))]
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Plays the backend (tests, fuzzing): the heads queue `q`'s shadow
    /// avail ring holds from index `from` on.
    #[cfg(any(test, feature = "test-utils"))]
    pub fn backend_takes(&self, q: usize, from: u16) -> Vec<u16> {
        let Some(l) = self.layouts.get(q) else {
            return Vec::new();
        };
        let idx: u16 = self.mem.read_obj(GuestAddress(l.avail + 2)).unwrap_or(from);
        let mut heads = Vec::new();
        let mut i = from;
        while i != idx && heads.len() < usize::from(SHADOW_RING) {
            let e = l.avail + 4 + 2 * u64::from(i % SHADOW_RING);
            heads.push(self.mem.read_obj(GuestAddress(e)).unwrap_or(u16::MAX));
            i = i.wrapping_add(1);
        }
        heads
    }

    /// Plays the backend (tests, fuzzing): puts `(id, len)` entries in
    /// queue `q`'s shadow used ring from index `at` on and publishes the
    /// index after them; returns it.
    #[cfg(any(test, feature = "test-utils"))]
    pub fn backend_uses(&self, q: usize, at: u16, entries: &[(u32, u32)]) -> u16 {
        let Some(l) = self.layouts.get(q) else {
            return at;
        };
        let mut i = at;
        for (id, len) in entries {
            let e = l.used + 4 + 8 * u64::from(i % SHADOW_RING);
            let _ = self.mem.write_obj(*id, GuestAddress(e));
            let _ = self.mem.write_obj(*len, GuestAddress(e + 4));
            i = i.wrapping_add(1);
        }
        let _ = self
            .mem
            .store(i, GuestAddress(l.used + 2), Ordering::Release);
        i
    }
}

/// A first-fit allocator of a pool's pages.
#[derive(Debug)]
struct Pages {
    used: Vec<bool>,
}

impl Pages {
    fn new(len: u64) -> Self {
        Pages {
            used: vec![false; (len / PAGE) as usize],
        }
    }

    /// `n` free pages in a row, taken; their first index.
    fn take(&mut self, n: usize) -> Option<usize> {
        let mut run = 0;
        for i in 0..self.used.len() {
            run = if self.used[i] { 0 } else { run + 1 };
            if run == n {
                let first = i + 1 - n;
                self.used[first..=i].fill(true);
                return Some(first);
            }
        }
        None
    }

    fn give(&mut self, first: usize, n: usize) {
        self.used[first..first + n].fill(false);
    }

    #[cfg(test)]
    fn all_free(&self) -> bool {
        !self.used.contains(&true)
    }
}

/// A guest request the backend holds.
#[derive(Debug)]
struct InFlight {
    /// The guest chain's head (what goes in the guest's used ring).
    head: u16,
    /// The guest's writable buffers, in order.
    reply_to: Vec<(GuestAddress, u32)>,
    /// Where the reply room starts in the shadow, and its length.
    reply_at: u64,
    reply_len: u32,
    /// The pool pages it holds.
    first_page: usize,
    pages: usize,
}

/// What serving a queue did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Served {
    /// Requests handed to the backend (kick it).
    pub forwarded: u32,
    /// Guest chains returned to the guest (interrupt it if it wants).
    pub returned: u32,
    /// Guest chains that were malformed (returned unused, or with an
    /// error reply).
    pub invalid: u32,
    /// Bytes copied from guest memory to the shadow and back.
    pub bytes_in: u64,
    /// Bytes copied from the shadow to guest memory.
    pub bytes_out: u64,
}

impl std::ops::AddAssign for Served {
    fn add_assign(&mut self, more: Served) {
        self.forwarded += more.forwarded;
        self.returned += more.returned;
        self.invalid += more.invalid;
        self.bytes_in += more.bytes_in;
        self.bytes_out += more.bytes_out;
    }
}

/// One queue as the relay serves it.
#[derive(Debug)]
struct RelayQueue {
    index: usize,
    guest: Queue,
    layout: Layout,
    /// The next shadow avail index to publish.
    avail_idx: u16,
    /// The shadow used index seen last.
    used_seen: u16,
    slots: Vec<Option<InFlight>>,
    free: Vec<u16>,
    pages: Pages,
    /// A request waits for room in the pool or a free slot: served again
    /// when a reply frees some.
    blocked: bool,
}

/// Why one guest chain cannot be forwarded.
enum Forward {
    /// Handed to the backend.
    Sent { bytes: u64 },
    /// Returned at once with this used length (malformed, or too large
    /// for the pool and answered with EIO).
    Refused { used: u32, why: &'static str },
    /// No room now; it stays in the guest's ring.
    NoRoom,
}

impl RelayQueue {
    fn new(index: usize, guest: Queue, layout: Layout) -> Self {
        RelayQueue {
            index,
            guest,
            layout,
            avail_idx: 0,
            used_seen: 0,
            slots: (0..SLOTS).map(|_| None).collect(),
            free: (0..SLOTS).rev().collect(),
            pages: Pages::new(layout.pool_len),
            blocked: false,
        }
    }

    /// Requests in flight in the backend.
    #[cfg(test)]
    fn in_flight(&self) -> usize {
        usize::from(SLOTS) - self.free.len()
    }

    /// Takes the guest's new requests and hands them to the backend, as
    /// long as there is room; returns what it did. The caller kicks the
    /// backend if anything was forwarded, and interrupts the guest if a
    /// chain was returned.
    fn requests(&mut self, shadow: &Shadow, mem: &GuestMemoryMmap) -> Result<Served, RelayError> {
        let mut served = Served::default();
        let mut rearm = Rearm::default();
        self.blocked = false;
        loop {
            if let Err(e) = self.guest.disable_notification(mem) {
                tracing::debug!(queue = self.index, error = %crate::error::Chain(&e), "cannot suppress virtio-fs notifications");
            }
            let before = served;
            while !self.free.is_empty() {
                let Some(chain) = chain::pop(&mut self.guest, mem) else {
                    break;
                };
                let head = chain.head_index();
                match self.forward(shadow, mem, chain)? {
                    Forward::Sent { bytes } => {
                        served.forwarded += 1;
                        served.bytes_in += bytes;
                    }
                    Forward::Refused { used, why } => {
                        tracing::debug!(queue = self.index, head, why, "bad virtio-fs request");
                        served.invalid += 1;
                        if self.guest.add_used(mem, head, used).is_ok() {
                            served.returned += 1;
                        }
                    }
                    Forward::NoRoom => {
                        self.guest.go_to_previous_position();
                        self.blocked = true;
                        break;
                    }
                }
            }
            if self.free.is_empty() {
                self.blocked = true;
            }
            if self.blocked {
                // A reply makes room and serves the queue again.
                break;
            }
            if served != before {
                rearm.served();
            }
            match rearm.rearm(&mut self.guest, mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    tracing::debug!(queue = self.index, error = %crate::error::Chain(&e), "cannot re-arm virtio-fs notifications");
                    break;
                }
            }
        }
        if served.forwarded > 0 {
            shadow
                .mem
                .store(
                    self.avail_idx,
                    GuestAddress(self.layout.avail + 2),
                    Ordering::Release,
                )
                .map_err(RelayError::Access)?;
        }
        Ok(served)
    }

    /// One guest chain: checked, copied into the pool and published in the
    /// shadow ring (its index is published by the caller, once per batch).
    fn forward(
        &mut self,
        shadow: &Shadow,
        mem: &GuestMemoryMmap,
        chain: Chain<'_>,
    ) -> Result<Forward, RelayError> {
        let head = chain.head_index();
        let mut readable: Vec<(GuestAddress, u32)> = Vec::new();
        let mut writable: Vec<(GuestAddress, u32)> = Vec::new();
        let (mut r, mut w) = (0u64, 0u64);
        for desc in chain {
            let Ok(desc): Result<Descriptor, _> = desc else {
                return Ok(Forward::Refused {
                    used: 0,
                    why: "indirect descriptor",
                });
            };
            let seg = (desc.addr(), desc.len());
            if !mem.check_range(desc.addr(), desc.len() as usize) {
                return Ok(Forward::Refused {
                    used: 0,
                    why: "a buffer outside guest memory",
                });
            }
            if desc.is_write_only() {
                w += u64::from(desc.len());
                writable.push(seg);
            } else if !writable.is_empty() {
                return Ok(Forward::Refused {
                    used: 0,
                    why: "a readable buffer after a writable one",
                });
            } else {
                r += u64::from(desc.len());
                readable.push(seg);
            }
        }
        if r < FUSE_IN_HEADER {
            return Ok(Forward::Refused {
                used: 0,
                why: "shorter than a FUSE request header",
            });
        }
        let reply_off = r.next_multiple_of(REPLY_ALIGN);
        let need = (reply_off + w).max(1);
        if need > self.layout.pool_len {
            let used = error_reply(mem, &readable, &writable, libc::EIO);
            return Ok(Forward::Refused {
                used,
                why: "larger than the relay's buffers",
            });
        }
        let pages = need.div_ceil(PAGE) as usize;
        let Some(first_page) = self.pages.take(pages) else {
            return Ok(Forward::NoRoom);
        };
        let Some(slot) = self.free.pop() else {
            self.pages.give(first_page, pages);
            return Ok(Forward::NoRoom);
        };
        let at = self.layout.pool + first_page as u64 * PAGE;
        let s = &shadow.mem;
        let mut to = at;
        for (addr, len) in &readable {
            for src in mem.get_slices(*addr, *len as usize) {
                let src = src.map_err(RelayError::Access)?;
                let dst = s
                    .get_slice(GuestAddress(to), src.len())
                    .map_err(RelayError::Access)?;
                copy_piece(&src, &dst);
                to += src.len() as u64;
            }
        }
        let d0 = 2 * slot;
        let (flags0, next0) = if w > 0 {
            (VRING_DESC_F_NEXT, d0 + 1)
        } else {
            (0, 0)
        };
        let descs = [
            Descriptor::new(at, r as u32, flags0, next0),
            Descriptor::new(at + reply_off, w as u32, VRING_DESC_F_WRITE, 0),
        ];
        let count = if w > 0 { 2 } else { 1 };
        for (i, d) in descs.iter().take(count).enumerate() {
            let addr = self.layout.desc + 16 * (u64::from(d0) + i as u64);
            s.write_obj(*d, GuestAddress(addr))
                .map_err(RelayError::Access)?;
        }
        let entry = self.layout.avail + 4 + 2 * u64::from(self.avail_idx % SHADOW_RING);
        s.write_obj(d0, GuestAddress(entry))
            .map_err(RelayError::Access)?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.slots[usize::from(slot)] = Some(InFlight {
            head,
            reply_to: writable,
            reply_at: at + reply_off,
            reply_len: w as u32,
            first_page,
            pages,
        });
        Ok(Forward::Sent { bytes: r })
    }

    /// Returns every request the backend finished to the guest, its reply
    /// copied into the guest's buffers; serves the queue again if it was
    /// waiting for room.
    fn replies(&mut self, shadow: &Shadow, mem: &GuestMemoryMmap) -> Result<Served, RelayError> {
        let s = &shadow.mem;
        let used_idx: u16 = s
            .load(GuestAddress(self.layout.used + 2), Ordering::Acquire)
            .map_err(RelayError::Access)?;
        let by = used_idx.wrapping_sub(self.used_seen);
        if by > SLOTS {
            return Err(RelayError::UsedIndex {
                queue: self.index,
                by,
            });
        }
        let mut served = Served::default();
        while self.used_seen != used_idx {
            let entry = self.layout.used + 4 + 8 * u64::from(self.used_seen % SHADOW_RING);
            let id: u32 = s
                .read_obj(GuestAddress(entry))
                .map_err(RelayError::Access)?;
            let len: u32 = s
                .read_obj(GuestAddress(entry + 4))
                .map_err(RelayError::Access)?;
            self.used_seen = self.used_seen.wrapping_add(1);
            let unknown = RelayError::UnknownChain {
                queue: self.index,
                id,
            };
            if id % 2 != 0 || id >= u32::from(SHADOW_RING) {
                return Err(unknown);
            }
            let slot = (id / 2) as u16;
            let Some(req) = self.slots[usize::from(slot)].take() else {
                return Err(unknown);
            };
            self.free.push(slot);
            let written = len.min(req.reply_len);
            let copied = copy_out(s, req.reply_at, written, mem, &req.reply_to);
            if copied < written {
                tracing::debug!(
                    queue = self.index,
                    head = req.head,
                    "a virtio-fs reply's guest buffers became unwritable"
                );
            }
            self.pages.give(req.first_page, req.pages);
            served.bytes_out += u64::from(copied);
            match self.guest.add_used(mem, req.head, copied) {
                Ok(()) => served.returned += 1,
                Err(e) => {
                    tracing::debug!(queue = self.index, error = %crate::error::Chain(&e), "cannot return a virtio-fs request")
                }
            }
        }
        if self.blocked && by > 0 {
            served += self.requests(shadow, mem)?;
        }
        Ok(served)
    }

    /// Whether the guest wants an interrupt for what was just returned.
    fn needs_interrupt(&mut self, mem: &GuestMemoryMmap) -> bool {
        self.guest.needs_notification(mem).unwrap_or(true)
    }

    /// Nothing held: every slot and page free.
    #[cfg(test)]
    fn idle(&self) -> bool {
        self.in_flight() == 0 && self.pages.all_free()
    }
}

/// Copies `len` bytes of the shadow at `at` into the guest's buffers
/// `to`, in order; returns how many were copied (fewer if a buffer is no
/// longer in guest memory).
fn copy_out(
    shadow: &GuestMemoryMmap,
    at: u64,
    len: u32,
    mem: &GuestMemoryMmap,
    to: &[(GuestAddress, u32)],
) -> u32 {
    let mut left = len;
    let mut from = at;
    for (addr, cap) in to {
        if left == 0 {
            break;
        }
        let n = left.min(*cap);
        for dst in mem.get_slices(*addr, n as usize) {
            let Ok(dst) = dst else {
                return len - left;
            };
            let Ok(src) = shadow.get_slice(GuestAddress(from), dst.len()) else {
                return len - left;
            };
            copy_piece(&src, &dst);
            from += dst.len() as u64;
            left -= dst.len() as u32;
        }
    }
    len - left
}

/// Copies `src` into `dst` (as many bytes as the shorter holds) with
/// unaligned 16-byte SSE2 moves, the relay's one copy routine; returns
/// the count.
///
/// vm-memory's copy is `memmove`, which glibc does with `rep movsb` from
/// 4 KiB up to its non-temporal threshold: the size of nearly every piece
/// the relay copies (a guest page per descriptor). What that instruction
/// costs depends on the CPU more than any loop does, and under emulation
/// most of all: QEMU's TCG runs it a byte at a time, about 425 MiB/s in
/// the node VM against 2.9 GiB/s for glibc's vector loop, which made it
/// most of the relay's cost there (docs/benchmarks.md, "Where the relay's
/// time goes"). A plain vector loop costs about the same everywhere.
fn copy_piece<B: BitmapSlice, C: BitmapSlice>(
    src: &VolatileSlice<B>,
    dst: &VolatileSlice<C>,
) -> usize {
    let n = src.len().min(dst.len());
    let (from, to) = (src.ptr_guard(), dst.ptr_guard_mut());
    // SAFETY: `from` and `to` are valid for `n` bytes of reads and writes:
    // a VolatileSlice is range-checked against its mapping when made, and
    // the mappings (guest memory, the shadow) outlive the borrowed slices
    // and their guards. They never overlap: the shadow is a mapping of its
    // own, never part of guest memory. Every move is unaligned (movups),
    // so no alignment is assumed, and SSE2 is part of x86_64 itself.
    unsafe { copy_vectors(to.as_ptr(), from.as_ptr(), n) };
    dst.bitmap().mark_dirty(0, n);
    n
}

/// [`copy_piece`]'s loop: 64 bytes a turn, then 16, then single bytes.
/// The moves are SIMD intrinsics so the compiler cannot turn the loop
/// back into a call to `memcpy` (it would a loop of plain loads).
///
/// # Safety
///
/// `src` must be valid for reads and `dst` for writes of `len` bytes, and
/// the two ranges must not overlap.
unsafe fn copy_vectors(dst: *mut u8, src: *const u8, len: usize) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_storeu_si128};
    let mut i = 0;
    while i + 64 <= len {
        // SAFETY: bytes i..i+64 are within both ranges (the caller's
        // promise and the loop's condition); the moves are unaligned.
        unsafe {
            let s = src.add(i).cast::<__m128i>();
            let d = dst.add(i).cast::<__m128i>();
            let (a, b) = (_mm_loadu_si128(s), _mm_loadu_si128(s.add(1)));
            let (c, e) = (_mm_loadu_si128(s.add(2)), _mm_loadu_si128(s.add(3)));
            _mm_storeu_si128(d, a);
            _mm_storeu_si128(d.add(1), b);
            _mm_storeu_si128(d.add(2), c);
            _mm_storeu_si128(d.add(3), e);
        }
        i += 64;
    }
    while i + 16 <= len {
        // SAFETY: as above, for bytes i..i+16.
        unsafe {
            let v = _mm_loadu_si128(src.add(i).cast::<__m128i>());
            _mm_storeu_si128(dst.add(i).cast::<__m128i>(), v);
        }
        i += 16;
    }
    while i < len {
        // SAFETY: as above, for byte i.
        unsafe { dst.add(i).write(src.add(i).read()) };
        i += 1;
    }
}

/// Answers a request husk cannot forward with a FUSE error (`-errno`),
/// if the guest left room for a reply header; returns the used length.
fn error_reply(
    mem: &GuestMemoryMmap,
    readable: &[(GuestAddress, u32)],
    writable: &[(GuestAddress, u32)],
    errno: i32,
) -> u32 {
    // The request's `unique` (bytes 8..16 of its header) names the reply.
    let mut header = [0u8; FUSE_IN_HEADER as usize];
    let mut got = 0;
    for (addr, len) in readable {
        let n = (*len as usize).min(header.len() - got);
        if mem.read_slice(&mut header[got..got + n], *addr).is_err() {
            return 0;
        }
        got += n;
        if got == header.len() {
            break;
        }
    }
    let Some(&(reply, room)) = writable.first() else {
        return 0;
    };
    if room < FUSE_OUT_HEADER {
        return 0;
    }
    let mut out = [0u8; FUSE_OUT_HEADER as usize];
    out[..4].copy_from_slice(&FUSE_OUT_HEADER.to_le_bytes());
    out[4..8].copy_from_slice(&(-errno).to_le_bytes());
    out[8..16].copy_from_slice(&header[8..16]);
    match mem.write_slice(&out, reply) {
        Ok(()) => FUSE_OUT_HEADER,
        Err(_) => 0,
    }
}

/// The relay of a started device: the guest's queues and the shadow's.
#[derive(Debug)]
pub struct Relay {
    mem: GuestMemoryMmap,
    queues: Vec<RelayQueue>,
}

impl Relay {
    /// Takes over the guest's started queues; empties the shadow rings.
    pub fn new(
        shadow: &Shadow,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
    ) -> Result<Self, RelayError> {
        shadow.clear_rings()?;
        let queues = queues
            .into_iter()
            .zip(&shadow.layouts)
            .enumerate()
            .map(|(i, (q, l))| RelayQueue::new(i, q, *l))
            .collect();
        Ok(Relay { mem, queues })
    }

    /// The guest notified queue `q`.
    pub fn requests(&mut self, shadow: &Shadow, q: usize) -> Result<Served, RelayError> {
        match self.queues.get_mut(q) {
            Some(queue) => queue.requests(shadow, &self.mem),
            None => Ok(Served::default()),
        }
    }

    /// The backend signalled queue `q`.
    pub fn replies(&mut self, shadow: &Shadow, q: usize) -> Result<Served, RelayError> {
        match self.queues.get_mut(q) {
            Some(queue) => queue.replies(shadow, &self.mem),
            None => Ok(Served::default()),
        }
    }

    /// Whether the guest wants an interrupt for queue `q`'s returns.
    pub fn needs_interrupt(&mut self, q: usize) -> bool {
        let mem = &self.mem;
        self.queues
            .get_mut(q)
            .is_some_and(|queue| queue.needs_interrupt(mem))
    }

    /// Requests in flight in the backend, all queues.
    #[cfg(test)]
    fn in_flight(&self) -> usize {
        self.queues.iter().map(RelayQueue::in_flight).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every length and offset the loop's three parts meet (none, some,
    /// all of each), against a byte-by-byte reference; the bytes around
    /// the copy stay as they were.
    #[test]
    fn copy_piece_copies_every_length_and_offset_exactly() {
        let mut src = vec![0u8; 4096 + 256];
        for (i, b) in src.iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        for len in [
            0,
            1,
            15,
            16,
            17,
            63,
            64,
            65,
            79,
            80,
            127,
            128,
            4096,
            4096 + 81,
        ] {
            for (so, dof) in [(0, 0), (1, 0), (0, 3), (5, 11), (15, 1)] {
                let mut dst = vec![0xeeu8; len + 64];
                let from = VolatileSlice::from(&mut src[so..so + len]);
                let to = VolatileSlice::from(&mut dst[dof..dof + len]);
                assert_eq!(copy_piece(&from, &to), len);
                assert!(dst[..dof].iter().all(|&b| b == 0xee), "{len} {so} {dof}");
                assert_eq!(&dst[dof..dof + len], &src[so..so + len], "{len} {so} {dof}");
                assert!(
                    dst[dof + len..].iter().all(|&b| b == 0xee),
                    "{len} {so} {dof}"
                );
            }
        }
    }

    #[test]
    fn copy_piece_stops_at_the_shorter_slice() {
        let mut src = [7u8; 100];
        let mut dst = [0u8; 200];
        let n = copy_piece(
            &VolatileSlice::from(&mut src[..]),
            &VolatileSlice::from(&mut dst[..]),
        );
        assert_eq!(n, 100);
        assert!(dst[..100].iter().all(|&b| b == 7) && dst[100..].iter().all(|&b| b == 0));
        let mut small = [0u8; 33];
        let n = copy_piece(
            &VolatileSlice::from(&mut dst[..]),
            &VolatileSlice::from(&mut small[..]),
        );
        assert_eq!(n, 33);
        assert!(small.iter().all(|&b| b == 7));
    }
    use crate::devices::virtio::test_utils::{
        d, hand_laid_queue, mem, write_table, QueueLayout, WriteAudit, NEXT, WRITE,
    };

    const SIZE: u16 = 256;
    /// A shadow descriptor as the backend reads it: address, length, flags.
    type ShadowDesc = (u64, u32, u16);
    const AVAIL: u64 = 0x4_0000;
    const USED: u64 = 0x5_0000;

    /// A guest driver's side of one queue, and the backend's side of the
    /// shadow ring: what virtiofsd would read and write.
    struct Rig {
        mem: GuestMemoryMmap,
        shadow: Shadow,
        relay: Relay,
        guest_avail: u16,
        /// The shadow avail index the backend has seen, and its used index.
        backend_avail: u16,
        backend_used: u16,
    }

    impl Rig {
        fn new() -> Self {
            let mem = mem();
            let shadow = Shadow::new(2).unwrap();
            let queues = vec![
                hand_laid_queue(SIZE, AVAIL + 0x8000, USED + 0x8000, false),
                hand_laid_queue(SIZE, AVAIL, USED, false),
            ];
            let relay = Relay::new(&shadow, mem.clone(), queues).unwrap();
            Rig {
                mem,
                shadow,
                relay,
                guest_avail: 0,
                backend_avail: 0,
                backend_used: 0,
            }
        }

        /// The guest makes the chain at `head` available on queue 1.
        fn offer(&mut self, head: u16) {
            let slot = AVAIL + 4 + 2 * u64::from(self.guest_avail % SIZE);
            self.mem.write_obj(head, GuestAddress(slot)).unwrap();
            self.guest_avail += 1;
            self.mem
                .write_obj(self.guest_avail, GuestAddress(AVAIL + 2))
                .unwrap();
        }

        /// The guest's used ring: (head, len) of every entry so far.
        fn guest_used(&self) -> Vec<(u32, u32)> {
            let idx: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
            (0..idx)
                .map(|i| {
                    let e = USED + 4 + 8 * u64::from(i);
                    (
                        self.mem.read_obj(GuestAddress(e)).unwrap(),
                        self.mem.read_obj(GuestAddress(e + 4)).unwrap(),
                    )
                })
                .collect()
        }

        fn layout(&self) -> Layout {
            self.shadow.layouts[1]
        }

        /// The relay forwards queue 1's new requests; it writes nothing
        /// into guest memory but the used ring (audited).
        fn requests(&mut self) -> Result<Served, RelayError> {
            let audit = WriteAudit::new(&self.mem, &[self.guest_queue()]);
            let served = self.relay.requests(&self.shadow, 1);
            audit.check(&self.mem);
            served
        }

        /// The relay returns queue 1's replies; it writes nothing into
        /// guest memory but the used ring and, of each chain it returns,
        /// as much as the used length says (audited).
        fn replies(&mut self) -> Result<Served, RelayError> {
            let audit = WriteAudit::new(&self.mem, &[self.guest_queue()]);
            let served = self.relay.replies(&self.shadow, 1);
            audit.check(&self.mem);
            served
        }

        fn guest_queue(&self) -> QueueLayout {
            QueueLayout {
                desc_table: 0,
                used_ring: USED,
                size: SIZE,
            }
        }

        /// The backend takes the next shadow chain: its head and its
        /// descriptors (addr, len, flags).
        fn backend_take(&mut self) -> Option<(u16, Vec<ShadowDesc>)> {
            let s = self.shadow.memory();
            let l = self.layout();
            let head = *self.shadow.backend_takes(1, self.backend_avail).first()?;
            self.backend_avail += 1;
            let mut descs = Vec::new();
            let mut i = head;
            loop {
                let desc: Descriptor = s
                    .read_obj(GuestAddress(l.desc + 16 * u64::from(i)))
                    .unwrap();
                descs.push((desc.addr().0, desc.len(), desc.flags()));
                if !desc.has_next() {
                    break;
                }
                i = desc.next();
            }
            Some((head, descs))
        }

        /// The backend reads `len` bytes at shadow address `at`.
        fn backend_read(&self, at: u64, len: u32) -> Vec<u8> {
            let mut buf = vec![0u8; len as usize];
            self.shadow
                .memory()
                .read_slice(&mut buf, GuestAddress(at))
                .unwrap();
            buf
        }

        /// The backend writes `reply` at `at` and uses chain `id` with
        /// `len`.
        fn backend_use(&mut self, id: u32, at: u64, reply: &[u8], len: u32) {
            self.shadow
                .memory()
                .write_slice(reply, GuestAddress(at))
                .unwrap();
            self.backend_used = self.shadow.backend_uses(1, self.backend_used, &[(id, len)]);
        }
    }

    fn header(unique: u64) -> Vec<u8> {
        let mut h = vec![0u8; FUSE_IN_HEADER as usize];
        h[..4].copy_from_slice(&(FUSE_IN_HEADER as u32).to_le_bytes());
        h[4..8].copy_from_slice(&3u32.to_le_bytes()); // FUSE_GETATTR
        h[8..16].copy_from_slice(&unique.to_le_bytes());
        h
    }

    #[test]
    fn a_request_and_its_reply_cross_the_shadow_and_nothing_else() {
        let mut rig = Rig::new();
        // Header and a body in two readable buffers; the reply room in two
        // writable ones, the first shorter than the reply.
        rig.mem
            .write_slice(&header(7), GuestAddress(0x1_0000))
            .unwrap();
        rig.mem
            .write_slice(b"body", GuestAddress(0x2_0000))
            .unwrap();
        write_table(
            &rig.mem,
            0,
            &[
                d(0x1_0000, 40, NEXT, 1),
                d(0x2_0000, 4, NEXT, 2),
                d(0x3_0000, 16, NEXT | WRITE, 3),
                d(0x3_8000, 100, WRITE, 0),
            ],
        );
        rig.offer(0);
        let served = rig.requests().unwrap();
        assert_eq!(served.forwarded, 1);
        assert_eq!(served.bytes_in, 44);
        let (head, descs) = rig.backend_take().unwrap();
        assert_eq!(descs.len(), 2);
        let (at, len, flags) = descs[0];
        assert_eq!((len, flags), (44, VRING_DESC_F_NEXT));
        let mut want = header(7);
        want.extend_from_slice(b"body");
        assert_eq!(rig.backend_read(at, len), want);
        let (reply_at, room, flags) = descs[1];
        assert_eq!((room, flags), (116, VRING_DESC_F_WRITE));
        // Inside the shadow's pool, never guest memory.
        let l = rig.layout();
        assert!(at >= l.pool && reply_at + u64::from(room) <= l.pool + l.pool_len);
        assert!(rig.backend_take().is_none());
        assert_eq!(rig.relay.in_flight(), 1);

        let reply: Vec<u8> = (0..30u8).collect();
        rig.backend_use(u32::from(head), reply_at, &reply, 30);
        let served = rig.replies().unwrap();
        assert_eq!((served.returned, served.bytes_out), (1, 30));
        assert_eq!(rig.guest_used(), vec![(0, 30)]);
        let mut first = [0u8; 16];
        rig.mem
            .read_slice(&mut first, GuestAddress(0x3_0000))
            .unwrap();
        assert_eq!(&first[..], &reply[..16]);
        let mut rest = [0u8; 14];
        rig.mem
            .read_slice(&mut rest, GuestAddress(0x3_8000))
            .unwrap();
        assert_eq!(&rest[..], &reply[16..]);
        assert!(rig.relay.queues[1].idle());
    }

    #[test]
    fn a_request_without_reply_room_is_one_descriptor() {
        let mut rig = Rig::new();
        // FUSE_FORGET: a header and its argument, no reply.
        rig.mem
            .write_slice(&header(9), GuestAddress(0x1_0000))
            .unwrap();
        write_table(&rig.mem, 0, &[d(0x1_0000, 48, 0, 0)]);
        rig.offer(0);
        rig.requests().unwrap();
        let (head, descs) = rig.backend_take().unwrap();
        assert_eq!(descs.len(), 1);
        assert_eq!((descs[0].1, descs[0].2), (48, 0));
        rig.backend_use(u32::from(head), descs[0].0, &[], 0);
        rig.replies().unwrap();
        assert_eq!(rig.guest_used(), vec![(0, 0)]);
        assert!(rig.relay.queues[1].idle());
    }

    #[test]
    fn bad_chains_are_returned_unforwarded() {
        let mut rig = Rig::new();
        rig.mem
            .write_slice(&header(1), GuestAddress(0x1_0000))
            .unwrap();
        write_table(
            &rig.mem,
            0,
            &[
                // 0: readable after writable.
                d(0x3_0000, 16, NEXT | WRITE, 1),
                d(0x1_0000, 40, 0, 0),
                // 2: shorter than a FUSE header.
                d(0x1_0000, 39, NEXT, 3),
                d(0x3_0000, 16, WRITE, 0),
                // 4: a reply buffer outside guest memory.
                d(0x1_0000, 40, NEXT, 5),
                d(0x3f_ff00, 0x1000, WRITE, 0),
                // 6: an indirect table.
                d(0x1_0000, 40, NEXT, 7),
                d(0x2_0000, 32, 4, 0),
            ],
        );
        for head in [0, 2, 4, 6] {
            rig.offer(head);
        }
        let served = rig.requests().unwrap();
        assert_eq!(
            (served.forwarded, served.invalid, served.returned),
            (0, 4, 4)
        );
        assert_eq!(rig.guest_used(), vec![(0, 0), (2, 0), (4, 0), (6, 0)]);
        assert!(rig.backend_take().is_none());
        assert!(rig.relay.queues[1].idle());
    }

    #[test]
    fn a_request_larger_than_the_pool_gets_an_eio_reply() {
        let mut rig = Rig::new();
        rig.mem
            .write_slice(&header(0xabcd), GuestAddress(0x1_0000))
            .unwrap();
        // 2 + 2.5 MiB of reply room: more than the 4 MiB pool.
        write_table(
            &rig.mem,
            0,
            &[
                d(0x1_0000, 40, NEXT, 1),
                d(0x10_0000, 0x20_0000, NEXT | WRITE, 2),
                d(0x10_0000, 0x28_0000, WRITE, 0),
            ],
        );
        rig.offer(0);
        let served = rig.requests().unwrap();
        assert_eq!((served.forwarded, served.invalid), (0, 1));
        assert_eq!(rig.guest_used(), vec![(0, FUSE_OUT_HEADER)]);
        let mut out = [0u8; 16];
        rig.mem
            .read_slice(&mut out, GuestAddress(0x10_0000))
            .unwrap();
        assert_eq!(u32::from_le_bytes(out[..4].try_into().unwrap()), 16);
        assert_eq!(
            i32::from_le_bytes(out[4..8].try_into().unwrap()),
            -libc::EIO
        );
        assert_eq!(u64::from_le_bytes(out[8..].try_into().unwrap()), 0xabcd);
    }

    #[test]
    fn requests_wait_for_room_and_go_when_replies_free_it() {
        let mut rig = Rig::new();
        rig.mem
            .write_slice(&header(1), GuestAddress(0x1_0000))
            .unwrap();
        // 100 chains, each a header and 64 KiB of reply room: 17 pages
        // of the pool with the header, so the pool holds 60 of them (the
        // ring would hold 64).
        let chains = 100u16;
        let table: Vec<_> = (0..chains)
            .flat_map(|i| {
                [
                    d(0x1_0000, 40, NEXT, 2 * i + 1),
                    d(0x10_0000, 0x1_0000, WRITE, 0),
                ]
            })
            .collect();
        write_table(&rig.mem, 0, &table);
        for i in 0..chains {
            rig.offer(2 * i);
        }
        let served = rig.requests().unwrap();
        assert_eq!(served.forwarded, 60);
        let mut taken = Vec::new();
        while let Some(t) = rig.backend_take() {
            taken.push(t);
        }
        assert_eq!(taken.len(), 60);
        // Replies to the first ten make room for ten more.
        for (head, descs) in taken.drain(..10) {
            rig.backend_use(u32::from(head), descs[1].0, b"ok", 2);
        }
        let served = rig.replies().unwrap();
        assert_eq!((served.returned, served.forwarded), (10, 10));
        while let Some(t) = rig.backend_take() {
            taken.push(t);
        }
        // And so on until every chain is back, each exactly once.
        while !taken.is_empty() {
            for (head, descs) in std::mem::take(&mut taken) {
                rig.backend_use(u32::from(head), descs[1].0, b"ok", 2);
            }
            rig.replies().unwrap();
            while let Some(t) = rig.backend_take() {
                taken.push(t);
            }
        }
        let mut heads: Vec<u32> = rig
            .guest_used()
            .iter()
            .map(|(h, l)| {
                assert_eq!(*l, 2);
                *h
            })
            .collect();
        heads.sort_unstable();
        assert_eq!(
            heads,
            (0..chains).map(|i| 2 * u32::from(i)).collect::<Vec<_>>()
        );
        assert!(rig.relay.queues[1].idle());
    }

    #[test]
    fn a_lying_backend_stops_the_relay_and_never_writes_past_the_guest_buffers() {
        let mut rig = Rig::new();
        rig.mem
            .write_slice(&header(1), GuestAddress(0x1_0000))
            .unwrap();
        rig.mem
            .write_slice(&[0xee; 32], GuestAddress(0x3_0000))
            .unwrap();
        write_table(
            &rig.mem,
            0,
            &[d(0x1_0000, 40, NEXT, 1), d(0x3_0000, 16, WRITE, 0)],
        );
        rig.offer(0);
        rig.requests().unwrap();
        let (head, descs) = rig.backend_take().unwrap();
        // It claims to have written more than the room it was given.
        rig.backend_use(u32::from(head), descs[1].0, &[0x11; 16], 4096);
        rig.replies().unwrap();
        assert_eq!(rig.guest_used(), vec![(0, 16)]);
        let mut after = [0u8; 16];
        rig.mem
            .read_slice(&mut after, GuestAddress(0x3_0010))
            .unwrap();
        assert_eq!(after, [0xee; 16]);
        // A chain it was never given (twice the same, odd, out of range).
        for id in [u32::from(head), 1, 4096] {
            rig.backend_use(id, descs[1].0, &[], 0);
            assert!(matches!(
                rig.replies(),
                Err(RelayError::UnknownChain { .. })
            ));
        }
        // A used index far ahead of anything in flight.
        let s = rig.shadow.memory();
        s.write_obj(
            rig.backend_used.wrapping_add(1000),
            GuestAddress(rig.layout().used + 2),
        )
        .unwrap();
        assert!(matches!(rig.replies(), Err(RelayError::UsedIndex { .. })));
    }

    #[test]
    fn pages_are_taken_first_fit_and_given_back() {
        let mut p = Pages::new(8 * PAGE);
        assert_eq!(p.take(3), Some(0));
        assert_eq!(p.take(3), Some(3));
        assert_eq!(p.take(3), None);
        p.give(0, 3);
        assert_eq!(p.take(2), Some(0));
        assert_eq!(p.take(2), Some(6));
        p.give(0, 2);
        p.give(3, 3);
        p.give(6, 2);
        assert!(p.all_free());
    }
}
