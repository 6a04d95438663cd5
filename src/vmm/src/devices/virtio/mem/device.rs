//! The virtio-mem device: the plugged state of every block of its region,
//! the configuration space the driver reads, and the answers to the
//! driver's requests.
//!
//! The region is cut in blocks (what the guest plugs, 2 MiB by default)
//! and slots (what KVM maps, 128 MiB by default). A slot is mapped into
//! the guest when a block of it is first plugged, so memory the host never
//! gave cannot be touched by the guest at all; an unplugged block's pages
//! go back to the host at once (`MADV_DONTNEED`), so the VMM's resident
//! memory follows what is plugged. A slot stays mapped when its last
//! block is unplugged, until the driver unplugs everything (UNPLUG_ALL,
//! which a starting driver sends when anything is plugged): deleting a
//! KVM memory slot under a running guest is what set off the node's SVM
//! failure (a triple fault within a second, docs/devices.md) on the
//! machines the tests run on,
//! and a guest that touches memory it unplugged breaks the driver's rules
//! (VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE) only to get zeroed pages that
//! count against the VMM's memory, in the pod's cgroup under the shim.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::metrics::MemMetrics;
use super::request::{
    self, Request, Response, RESPONSE_LEN, RESP_ACK, RESP_BUSY, RESP_ERROR, RESP_NACK, STATE_MIXED,
    STATE_PLUGGED, STATE_UNPLUGGED,
};
use super::{
    GUEST_MEMORY_BLOCK, MIN_BLOCK_SIZE, QUEUE_SIZE, TYPE_MEM, VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE,
};
use crate::devices::virtio::persist::{running_queue, QueueSnapshot};
use crate::devices::virtio::{
    read_config_bytes, ActivateError, Interrupt, Rearm, VirtioDevice, INTERRUPT_USED_RING,
    VIRTIO_F_VERSION_1,
};
use crate::error::Chain;
use crate::log_limit::LogLimiter;
use crate::vstate::memory;

/// Where the hot-pluggable memory is and how it is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemRegion {
    /// Guest-physical start (aligned to the guest's memory block).
    pub addr: u64,
    /// Size in bytes (a multiple of `slot_size`).
    pub size: u64,
    /// What the guest plugs and unplugs (a power of two, at least 2 MiB).
    pub block_size: u64,
    /// What the host maps into the guest (a multiple of `block_size` and of
    /// the guest's memory block).
    pub slot_size: u64,
}

impl MemRegion {
    /// Checks the shape: sizes, alignment, and room in the address space.
    pub fn check(&self) -> Result<(), MemError> {
        let bad = |reason| Err(MemError::Region { reason });
        if !self.block_size.is_power_of_two() || self.block_size < MIN_BLOCK_SIZE {
            return bad("the block size is not a power of two of at least 2 MiB");
        }
        if self.slot_size == 0
            || self.slot_size % self.block_size != 0
            || self.slot_size % GUEST_MEMORY_BLOCK != 0
        {
            return bad("the slot size is not a multiple of the block size and of 128 MiB");
        }
        if self.size == 0 || self.size % self.slot_size != 0 {
            return bad("the region is not a whole number of slots");
        }
        if self.addr % GUEST_MEMORY_BLOCK != 0 || self.addr.checked_add(self.size).is_none() {
            return bad("the region's start is not aligned to 128 MiB or its end overflows");
        }
        if self.size / self.slot_size > u64::from(u32::MAX) {
            return bad("the region has more slots than KVM can number");
        }
        Ok(())
    }

    fn blocks(&self) -> u64 {
        self.size / self.block_size
    }

    fn slots(&self) -> u64 {
        self.size / self.slot_size
    }

    fn blocks_per_slot(&self) -> u64 {
        self.slot_size / self.block_size
    }
}

/// The numbers `GET /hotplug/memory` reports, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemStatus {
    /// The region's size.
    pub region_size: u64,
    /// The guest's unit.
    pub block_size: u64,
    /// The host's unit.
    pub slot_size: u64,
    /// What the guest has plugged.
    pub plugged_size: u64,
    /// What the host asked for.
    pub requested_size: u64,
}

/// How the device lets the guest use a slot of its region, or stops it:
/// KVM memory slots in a VM (`vstate::slots::KvmSlots`); in unit tests a
/// recorder of calls that stands in for KVM.
pub trait SlotMapper: Send {
    /// Makes slot `index` (`size` bytes of guest memory from `addr`) RAM to
    /// the guest.
    fn map(&mut self, index: u32, addr: GuestAddress, size: u64) -> std::io::Result<()>;
    /// Takes slot `index` away from the guest again.
    fn unmap(&mut self, index: u32, addr: GuestAddress, size: u64) -> std::io::Result<()>;
}

/// What the device refuses.
#[derive(Debug, thiserror::Error)]
pub enum MemError {
    /// A region that cannot be offered to a guest.
    #[error("invalid hot-pluggable memory region: {reason}")]
    Region {
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The region is not (entirely) in guest memory.
    #[error("the hot-pluggable region at {addr:#x} is not in guest memory")]
    NotInGuestMemory {
        /// Its start.
        addr: u64,
    },
    /// A requested size beyond the region.
    #[error("{requested} bytes of hot-pluggable memory requested, but the region holds {region}")]
    RequestTooLarge {
        /// What was asked for.
        requested: u64,
        /// The region's size.
        region: u64,
    },
    /// A requested size that is not a whole number of blocks.
    #[error("{requested} bytes of hot-pluggable memory requested: not a multiple of the {block}-byte block")]
    RequestUnaligned {
        /// What was asked for.
        requested: u64,
        /// The block size.
        block: u64,
    },
    /// An eventfd could not be created.
    #[error("cannot create the virtio-mem device's eventfds")]
    EventFd(#[source] std::io::Error),
}

enum State {
    Inactive,
    Active { mem: GuestMemoryMmap, queue: Queue },
}

/// The plugged state of the region, and what changes it.
struct Blocks {
    region: MemRegion,
    /// One bit per block, set while it is plugged.
    plugged: Vec<u64>,
    plugged_blocks: u64,
    /// Whether each slot is mapped into the guest.
    slot_mapped: Vec<bool>,
    requested_size: u64,
    mapper: Box<dyn SlotMapper>,
    /// Guest memory with the region in it, to give unplugged blocks back.
    guest: GuestMemoryMmap,
    metrics: Arc<MemMetrics>,
    /// Lines a guest can set off by repeating a request or breaking its
    /// queue are rate-limited.
    guest_log: LogLimiter,
}

/// A virtio-mem device.
pub struct Mem {
    blocks: Blocks,
    queue_sizes: [u16; 1],
    queue_events: [EventFd; 1],
    interrupt: Interrupt,
    state: State,
}

impl Mem {
    /// A device for `region`, which must lie in `guest`; every block
    /// starts unplugged and no slot mapped.
    pub fn new(
        region: MemRegion,
        guest: GuestMemoryMmap,
        mapper: Box<dyn SlotMapper>,
    ) -> Result<Self, MemError> {
        region.check()?;
        let len = usize::try_from(region.size).map_err(|_| MemError::Region {
            reason: "the region does not fit this host's address space",
        })?;
        if !guest.check_range(GuestAddress(region.addr), len) {
            return Err(MemError::NotInGuestMemory { addr: region.addr });
        }
        let words =
            usize::try_from(region.blocks().div_ceil(64)).map_err(|_| MemError::Region {
                reason: "the region has too many blocks",
            })?;
        let slots = usize::try_from(region.slots()).map_err(|_| MemError::Region {
            reason: "the region has too many slots",
        })?;
        Ok(Mem {
            blocks: Blocks {
                region,
                plugged: vec![0; words],
                plugged_blocks: 0,
                slot_mapped: vec![false; slots],
                requested_size: 0,
                mapper,
                guest,
                metrics: Arc::new(MemMetrics::default()),
                guest_log: LogLimiter::default(),
            },
            queue_sizes: [QUEUE_SIZE],
            queue_events: [EventFd::new(EFD_NONBLOCK).map_err(MemError::EventFd)?],
            interrupt: Interrupt::new().map_err(MemError::EventFd)?,
            state: State::Inactive,
        })
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<MemMetrics> {
        self.blocks.metrics.clone()
    }

    /// The region.
    pub fn region(&self) -> MemRegion {
        self.blocks.region
    }

    /// Sizes, in bytes.
    pub fn status(&self) -> MemStatus {
        self.blocks.status()
    }

    /// Asks the guest to have `bytes` of the region plugged. Returns whether
    /// the request changed (the caller then raises the configuration-change
    /// interrupt, which makes the driver reread it).
    pub fn set_requested_size(&mut self, bytes: u64) -> Result<bool, MemError> {
        self.blocks.set_requested_size(bytes)
    }

    /// The queue's position, for a snapshot (empty before DRIVER_OK).
    pub fn running_queues(&self) -> Vec<QueueSnapshot> {
        match &self.state {
            State::Active { queue, .. } => vec![running_queue(queue)],
            State::Inactive => Vec::new(),
        }
    }

    /// Gives a restored device the requested size it had at the snapshot
    /// (checked as [`Mem::set_requested_size`] checks it, but not counted
    /// as a resize).
    pub fn restore_requested_size(&mut self, bytes: u64) -> Result<(), MemError> {
        self.blocks.check_requested_size(bytes)?;
        self.blocks.requested_size = bytes;
        Ok(())
    }

    /// Answers one request (what serving the queue does with each).
    pub fn execute(&mut self, request: Request) -> Response {
        self.blocks.execute(request)
    }

    /// Answers every request the driver has queued. Called from the event
    /// loop when the queue is notified.
    pub fn process_queue(&mut self) {
        let State::Active { mem, queue } = &mut self.state else {
            // Notified before DRIVER_OK: nothing to serve yet.
            return;
        };
        let blocks = &mut self.blocks;
        let mut completed = false;
        let mut budget = usize::from(QUEUE_SIZE);
        let mut rearm = Rearm::default();
        'serve: loop {
            if let Err(e) = queue.disable_notification(&*mem) {
                crate::limited!(blocks.guest_log, warn, error = %Chain(&e), "cannot suppress virtio-mem notifications");
            }
            let before = budget;
            while budget > 0 {
                let Some(chain) = crate::devices::virtio::chain::pop(queue, mem) else {
                    break;
                };
                budget -= 1;
                let head = chain.head_index();
                let used = match request::parse(chain, mem) {
                    Ok(parsed) => {
                        let response = match parsed.request {
                            Ok(r) => blocks.execute(r),
                            Err(e) => {
                                blocks.metrics.errors.inc();
                                tracing::debug!(error = %e, "malformed virtio-mem request");
                                Response::of(RESP_ERROR)
                            }
                        };
                        match mem.write_slice(&response.encode(), parsed.response) {
                            Ok(()) => RESPONSE_LEN as u32,
                            Err(_) => 0,
                        }
                    }
                    Err(e) => {
                        blocks.metrics.invalid_chains.inc();
                        tracing::debug!(error = %e, "virtio-mem chain returned unanswered");
                        0
                    }
                };
                if let Err(e) = queue.add_used(&*mem, head, used) {
                    crate::limited!(blocks.guest_log, warn, error = %Chain(&e), "cannot return a virtio-mem request");
                    break 'serve;
                }
                completed = true;
            }
            if budget == 0 {
                // Notifications stay off; this wakes the loop again.
                let _ = self.queue_events[0].write(1);
                break;
            }
            if budget != before {
                rearm.served();
            }
            match rearm.rearm(queue, mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    crate::limited!(blocks.guest_log, warn, error = %Chain(&e), "cannot re-arm virtio-mem notifications");
                    break;
                }
            }
        }
        if completed {
            match queue.needs_notification(&*mem) {
                Ok(false) => {}
                Ok(true) | Err(_) => self.interrupt.trigger(INTERRUPT_USED_RING),
            }
        }
    }
}

impl Blocks {
    fn status(&self) -> MemStatus {
        MemStatus {
            region_size: self.region.size,
            block_size: self.region.block_size,
            slot_size: self.region.slot_size,
            plugged_size: self.plugged_blocks * self.region.block_size,
            requested_size: self.requested_size,
        }
    }

    fn set_requested_size(&mut self, bytes: u64) -> Result<bool, MemError> {
        self.check_requested_size(bytes)?;
        let changed = bytes != self.requested_size;
        self.requested_size = bytes;
        if changed {
            self.metrics.resizes.inc();
            tracing::info!(
                requested = bytes,
                plugged = self.status().plugged_size,
                "hot-pluggable memory resized"
            );
        }
        Ok(changed)
    }

    fn check_requested_size(&self, bytes: u64) -> Result<(), MemError> {
        if bytes > self.region.size {
            return Err(MemError::RequestTooLarge {
                requested: bytes,
                region: self.region.size,
            });
        }
        if bytes % self.region.block_size != 0 {
            return Err(MemError::RequestUnaligned {
                requested: bytes,
                block: self.region.block_size,
            });
        }
        Ok(())
    }

    fn is_plugged(&self, block: u64) -> bool {
        self.plugged[(block / 64) as usize] & (1 << (block % 64)) != 0
    }

    fn set_plugged(&mut self, block: u64, on: bool) {
        let word = &mut self.plugged[(block / 64) as usize];
        if on {
            *word |= 1 << (block % 64);
        } else {
            *word &= !(1 << (block % 64));
        }
    }

    fn slot_of(&self, block: u64) -> u64 {
        block / self.region.blocks_per_slot()
    }

    fn slot_addr(&self, slot: u64) -> GuestAddress {
        GuestAddress(self.region.addr + slot * self.region.slot_size)
    }

    /// The blocks `[first, first + count)` a request names, if the range is
    /// block aligned, not empty and inside the region.
    fn blocks_of(&self, addr: u64, nb_blocks: u16) -> Option<(u64, u64)> {
        let offset = addr.checked_sub(self.region.addr)?;
        if nb_blocks == 0 || offset % self.region.block_size != 0 {
            return None;
        }
        let first = offset / self.region.block_size;
        let count = u64::from(nb_blocks);
        let end = first.checked_add(count)?;
        (end <= self.region.blocks()).then_some((first, count))
    }

    fn plugged_in(&self, first: u64, count: u64) -> u64 {
        (first..first + count)
            .filter(|b| self.is_plugged(*b))
            .count() as u64
    }

    fn plug(&mut self, addr: u64, nb_blocks: u16) -> Response {
        let Some((first, count)) = self.blocks_of(addr, nb_blocks) else {
            return self.error(
                "plug: range outside the region or unaligned",
                addr,
                nb_blocks,
            );
        };
        if self.plugged_in(first, count) != 0 {
            return self.error("plug: a block is already plugged", addr, nb_blocks);
        }
        let size = count * self.region.block_size;
        if self.status().plugged_size + size > self.requested_size {
            self.metrics.nacks.inc();
            tracing::debug!(addr, nb_blocks, "plug past the requested size refused");
            return Response::of(RESP_NACK);
        }
        let mut mapped_now = Vec::new();
        for slot in self.slot_of(first)..=self.slot_of(first + count - 1) {
            if self.slot_mapped[slot as usize] {
                continue;
            }
            let addr = self.slot_addr(slot);
            match self.mapper.map(slot as u32, addr, self.region.slot_size) {
                Ok(()) => {
                    self.slot_mapped[slot as usize] = true;
                    mapped_now.push(slot);
                }
                Err(e) => {
                    crate::limited!(self.guest_log, error, slot, error = %Chain(&e), "cannot map a slot of hot-pluggable memory");
                    self.metrics.host_failures.inc();
                    for slot in mapped_now {
                        self.unmap_slot(slot);
                    }
                    return Response::of(RESP_BUSY);
                }
            }
        }
        for block in first..first + count {
            self.set_plugged(block, true);
        }
        self.plugged_blocks += count;
        self.metrics.plug_count.inc();
        self.metrics.plugged_bytes.add(size);
        tracing::trace!(addr, nb_blocks, "blocks plugged");
        Response::of(RESP_ACK)
    }

    fn unmap_slot(&mut self, slot: u64) {
        let addr = self.slot_addr(slot);
        match self.mapper.unmap(slot as u32, addr, self.region.slot_size) {
            Ok(()) => self.slot_mapped[slot as usize] = false,
            Err(e) => {
                // Left mapped: the guest keeps access to a slot it should
                // not use; its pages still go back to the host.
                crate::limited!(self.guest_log, error, slot, error = %Chain(&e), "cannot unmap a slot of hot-pluggable memory");
                self.metrics.host_failures.inc();
            }
        }
    }

    fn release(&mut self, addr: u64, len: u64) {
        if let Err(e) = memory::discard(&self.guest, GuestAddress(addr), len) {
            crate::limited!(self.guest_log, error, addr, len, error = %Chain(&e), "cannot give unplugged memory back to the host");
            self.metrics.host_failures.inc();
        }
    }

    fn unplug(&mut self, addr: u64, nb_blocks: u16) -> Response {
        let Some((first, count)) = self.blocks_of(addr, nb_blocks) else {
            return self.error(
                "unplug: range outside the region or unaligned",
                addr,
                nb_blocks,
            );
        };
        if self.plugged_in(first, count) != count {
            return self.error("unplug: a block is not plugged", addr, nb_blocks);
        }
        for block in first..first + count {
            self.set_plugged(block, false);
        }
        self.plugged_blocks -= count;
        let size = count * self.region.block_size;
        self.release(addr, size);
        self.metrics.unplug_count.inc();
        self.metrics.unplugged_bytes.add(size);
        tracing::trace!(addr, nb_blocks, "blocks unplugged");
        Response::of(RESP_ACK)
    }

    fn unplug_all(&mut self) -> Response {
        let size = self.status().plugged_size;
        for slot in 0..self.region.slots() {
            if self.slot_mapped[slot as usize] {
                self.unmap_slot(slot);
            }
        }
        self.plugged.fill(0);
        self.plugged_blocks = 0;
        self.release(self.region.addr, self.region.size);
        self.metrics.unplug_count.inc();
        self.metrics.unplugged_bytes.add(size);
        tracing::debug!(size, "every block unplugged");
        Response::of(RESP_ACK)
    }

    fn state(&mut self, addr: u64, nb_blocks: u16) -> Response {
        let Some((first, count)) = self.blocks_of(addr, nb_blocks) else {
            return self.error(
                "state: range outside the region or unaligned",
                addr,
                nb_blocks,
            );
        };
        self.metrics.state_count.inc();
        let state = match self.plugged_in(first, count) {
            0 => STATE_UNPLUGGED,
            n if n == count => STATE_PLUGGED,
            _ => STATE_MIXED,
        };
        Response {
            kind: RESP_ACK,
            state,
        }
    }

    fn error(&self, why: &'static str, addr: u64, nb_blocks: u16) -> Response {
        self.metrics.errors.inc();
        tracing::debug!(why, addr, nb_blocks, "invalid virtio-mem request");
        Response::of(RESP_ERROR)
    }

    fn execute(&mut self, request: Request) -> Response {
        match request {
            Request::Plug { addr, nb_blocks } => self.plug(addr, nb_blocks),
            Request::Unplug { addr, nb_blocks } => self.unplug(addr, nb_blocks),
            Request::UnplugAll => self.unplug_all(),
            Request::State { addr, nb_blocks } => self.state(addr, nb_blocks),
            Request::Unknown(kind) => {
                self.metrics.errors.inc();
                tracing::debug!(kind, "unknown virtio-mem request type");
                Response::of(RESP_ERROR)
            }
        }
    }
}

impl VirtioDevice for Mem {
    fn device_type(&self) -> u32 {
        TYPE_MEM
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        (1u64 << VIRTIO_F_VERSION_1) | (1u64 << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE)
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn interrupt(&self) -> &Interrupt {
        &self.interrupt
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_mem_config: block_size, node_id (no NUMA: 0) and
        // padding, addr, region_size, usable_region_size (the whole
        // region), plugged_size, requested_size.
        let s = self.status();
        let region = self.blocks.region;
        let mut config = [0u8; 56];
        config[0..8].copy_from_slice(&region.block_size.to_le_bytes());
        config[16..24].copy_from_slice(&region.addr.to_le_bytes());
        config[24..32].copy_from_slice(&region.size.to_le_bytes());
        config[32..40].copy_from_slice(&region.size.to_le_bytes());
        config[40..48].copy_from_slice(&s.plugged_size.to_le_bytes());
        config[48..56].copy_from_slice(&s.requested_size.to_le_bytes());
        read_config_bytes(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!(offset, "virtio-mem config write ignored (read-only)");
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        mut queues: Vec<Queue>,
        _acked_features: u64,
    ) -> Result<(), ActivateError> {
        let got = queues.len();
        let (Some(queue), 1) = (queues.pop(), got) else {
            return Err(ActivateError::QueueCount { expected: 1, got });
        };
        self.state = State::Active { mem, queue };
        // Requests queued before activation are served by the event loop.
        let _ = self.queue_events[0].write(1);
        Ok(())
    }

    fn reset(&mut self) {
        // What is plugged stays plugged: a driver that starts again sees
        // plugged_size and unplugs everything first.
        self.state = State::Inactive;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::mem::persist::MemSnapshotError;
    use crate::devices::virtio::test_utils::{
        d, hand_laid_queue, QueueLayout, WriteAudit, NEXT, WRITE,
    };
    use std::sync::Mutex;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;

    const MIB: u64 = 1 << 20;
    const BASE: u64 = 4 << 30;
    const BLOCK: u64 = 2 * MIB;
    const SLOT: u64 = 128 * MIB;
    const REQ: u64 = 0x10_0000;
    const RESP: u64 = 0x10_1000;

    /// Stands in for KVM's memory slots: records every call, and refuses
    /// to map the slot named in `fail`.
    #[derive(Clone, Default)]
    struct Recorder {
        calls: Arc<Mutex<Vec<String>>>,
        fail: Arc<Mutex<Option<u32>>>,
    }

    impl Recorder {
        fn calls(&self) -> Vec<String> {
            std::mem::take(&mut *self.calls.lock().unwrap())
        }
    }

    impl SlotMapper for Recorder {
        fn map(&mut self, index: u32, addr: GuestAddress, size: u64) -> std::io::Result<()> {
            if *self.fail.lock().unwrap() == Some(index) {
                return Err(std::io::Error::from_raw_os_error(libc::EEXIST));
            }
            self.calls
                .lock()
                .unwrap()
                .push(format!("map {index} {:#x}+{:#x}", addr.0, size));
            Ok(())
        }
        fn unmap(&mut self, index: u32, addr: GuestAddress, _size: u64) -> std::io::Result<()> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("unmap {index} {:#x}", addr.0));
            Ok(())
        }
    }

    fn region() -> MemRegion {
        MemRegion {
            addr: BASE,
            size: 2 * SLOT,
            block_size: BLOCK,
            slot_size: SLOT,
        }
    }

    /// 4 MiB of RAM for the queue, and the 256 MiB region at 4 GiB
    /// (MAP_NORESERVE: nothing is allocated until touched).
    fn guest() -> GuestMemoryMmap {
        let boot = crate::devices::virtio::test_utils::mem();
        memory::add_region(
            &boot,
            GuestAddress(BASE),
            2 * SLOT,
            memory::Backing::Private,
        )
        .unwrap()
    }

    fn device() -> (Mem, GuestMemoryMmap, Recorder) {
        let m = guest();
        let rec = Recorder::default();
        let dev = Mem::new(region(), m.clone(), Box::new(rec.clone())).unwrap();
        (dev, m, rec)
    }

    /// Queues one chain, serves it as the event loop would, and returns
    /// (used length, the response's bytes).
    fn serve_chain(dev: &mut Mem, m: &GuestMemoryMmap, descs: &[RawDescriptor]) -> (u32, [u8; 10]) {
        m.write_slice(&[0xee; 10], GuestAddress(RESP)).unwrap();
        let vq = MockSplitQueue::new(m, 16);
        vq.add_desc_chains(descs, 0).unwrap();
        dev.activate(m.clone(), vec![vq.create_queue().unwrap()], 0)
            .unwrap();
        assert_eq!(
            dev.queue_events[0].read().unwrap(),
            1,
            "activation wakes the loop"
        );
        // The plugged region's pages are the device's to discard.
        let audit = WriteAudit::except_regions(m, &[QueueLayout::of(&vq, 16)], &[BASE]);
        dev.process_queue();
        audit.check(m);
        let used = vq.used();
        assert_eq!(used.idx().load(), 1, "the chain went back to the guest");
        let mut resp = [0u8; 10];
        m.read_slice(&mut resp, GuestAddress(RESP)).unwrap();
        (used.ring().ref_at(0).unwrap().load().len(), resp)
    }

    /// Sends `req` the way the Linux driver does; returns the response.
    fn serve(dev: &mut Mem, m: &GuestMemoryMmap, req: Request) -> Response {
        m.write_slice(&req.encode(), GuestAddress(REQ)).unwrap();
        let (used, b) = serve_chain(dev, m, &[d(REQ, 24, NEXT, 1), d(RESP, 10, WRITE, 0)]);
        assert_eq!(used, 10);
        Response {
            kind: u16::from_le_bytes([b[0], b[1]]),
            state: u16::from_le_bytes([b[8], b[9]]),
        }
    }

    fn plug(addr: u64, nb_blocks: u16) -> Request {
        Request::Plug { addr, nb_blocks }
    }

    fn unplug(addr: u64, nb_blocks: u16) -> Request {
        Request::Unplug { addr, nb_blocks }
    }

    fn config(dev: &Mem) -> [u64; 7] {
        let mut out = [0u64; 7];
        for (i, v) in out.iter_mut().enumerate() {
            let mut b = [0u8; 8];
            dev.read_config(8 * i as u64, &mut b);
            *v = u64::from_le_bytes(b);
        }
        out
    }

    #[test]
    fn a_device_with_nothing_plugged_is_saved_and_comes_back_as_it_was() {
        let (mut dev, m, _) = device();
        dev.set_requested_size(64 * MIB).unwrap();
        let s = dev.save_state().unwrap();
        assert_eq!(s.region(), region());
        assert_eq!(s.requested_size, 64 * MIB);
        assert!(s.queues.is_empty(), "not started yet");
        // Started by the driver, still nothing plugged: its queue is saved.
        serve(
            &mut dev,
            &m,
            Request::State {
                addr: BASE,
                nb_blocks: 1,
            },
        );
        let s = dev.save_state().unwrap();
        assert_eq!(s.queues.len(), 1);

        let rec = Recorder::default();
        let mut back = Mem::new(s.region(), m.clone(), Box::new(rec.clone())).unwrap();
        back.restore_requested_size(s.requested_size).unwrap();
        assert_eq!(back.status(), dev.status());
        assert_eq!(back.metrics().resizes.get(), 0, "a restore is not a resize");
        assert!(rec.calls().is_empty(), "no slot mapped");
        assert!(back.restore_requested_size(3 * MIB).is_err());
    }

    #[test]
    fn a_device_with_memory_plugged_is_refused() {
        let (mut dev, m, _) = device();
        dev.set_requested_size(4 * BLOCK).unwrap();
        assert_eq!(serve(&mut dev, &m, plug(BASE, 2)).kind, RESP_ACK);
        let err = dev.save_state().unwrap_err();
        assert_eq!(err, MemSnapshotError::Plugged(2 * BLOCK));
        assert!(
            err.to_string().starts_with(
                "the microVM has 4 MiB of hot-plugged memory: unplug its hot-plugged memory first"
            ),
            "{err}"
        );
        // Unplugged again, it can be saved.
        assert_eq!(serve(&mut dev, &m, unplug(BASE, 2)).kind, RESP_ACK);
        assert!(dev.save_state().is_ok());
    }

    #[test]
    fn the_configuration_space_describes_the_region_and_follows_requests() {
        let (mut dev, m, _) = device();
        assert_eq!(dev.device_type(), 24);
        assert_ne!(
            dev.avail_features() & (1 << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE),
            0
        );
        // block_size, node_id, addr, region_size, usable, plugged, requested.
        assert_eq!(config(&dev), [BLOCK, 0, BASE, 2 * SLOT, 2 * SLOT, 0, 0]);
        assert!(dev.set_requested_size(64 * MIB).unwrap());
        assert!(
            !dev.set_requested_size(64 * MIB).unwrap(),
            "no change, no interrupt"
        );
        serve(&mut dev, &m, plug(BASE, 4));
        assert_eq!(config(&dev)[5..], [8 * MIB, 64 * MIB]);
        // Bytes past the end read as zero; writes are ignored.
        let mut past = [0xffu8; 8];
        dev.read_config(56, &mut past);
        assert_eq!(past, [0; 8]);
        dev.write_config(48, &[0; 8]);
        assert_eq!(config(&dev)[6], 64 * MIB);
    }

    #[test]
    fn requested_sizes_beyond_the_region_or_between_blocks_are_refused() {
        let (mut dev, _, _) = device();
        let err = dev.set_requested_size(2 * SLOT + BLOCK).unwrap_err();
        assert!(matches!(err, MemError::RequestTooLarge { region, .. } if region == 2 * SLOT));
        assert!(matches!(
            dev.set_requested_size(MIB),
            Err(MemError::RequestUnaligned { block: BLOCK, .. })
        ));
        assert_eq!(dev.status().requested_size, 0);
        dev.set_requested_size(2 * SLOT).unwrap();
    }

    #[test]
    fn plugging_maps_the_slot_and_stays_within_the_requested_size() {
        let (mut dev, m, rec) = device();
        dev.set_requested_size(8 * MIB).unwrap();
        assert_eq!(serve(&mut dev, &m, plug(BASE, 2)), Response::of(RESP_ACK));
        assert_eq!(rec.calls(), [format!("map 0 {BASE:#x}+{SLOT:#x}")]);
        // The same slot needs no second mapping.
        assert_eq!(
            serve(&mut dev, &m, plug(BASE + 2 * BLOCK, 2)),
            Response::of(RESP_ACK)
        );
        assert!(rec.calls().is_empty());
        assert_eq!(dev.status().plugged_size, 8 * MIB);
        // One block more than requested: NACK, nothing changes.
        assert_eq!(
            serve(&mut dev, &m, plug(BASE + SLOT, 1)),
            Response::of(RESP_NACK)
        );
        assert!(rec.calls().is_empty());
        assert_eq!(dev.status().plugged_size, 8 * MIB);
        // Plugged memory is the guest's to use.
        m.write_obj(0x1234_5678u32, GuestAddress(BASE + 5 * MIB))
            .unwrap();
    }

    #[test]
    fn invalid_plug_requests_get_an_error_and_change_nothing() {
        let (mut dev, m, rec) = device();
        dev.set_requested_size(2 * SLOT).unwrap();
        serve(&mut dev, &m, plug(BASE, 1));
        rec.calls();
        for bad in [
            plug(BASE, 1),                    // already plugged
            plug(BASE, 3),                    // partly plugged
            plug(BASE + MIB, 1),              // not block aligned
            plug(BASE + BLOCK, 0),            // no blocks
            plug(BASE - BLOCK, 1),            // below the region
            plug(BASE + 2 * SLOT, 1),         // just past its end
            plug(BASE + 2 * SLOT - BLOCK, 2), // across its end
            plug(0, 1),                       // boot RAM
            plug(u64::MAX - BLOCK + 1, 1),    // wraps the address space
            plug(BASE + 2 * SLOT - BLOCK, u16::MAX),
        ] {
            assert_eq!(
                serve(&mut dev, &m, bad),
                Response::of(RESP_ERROR),
                "{bad:?}"
            );
        }
        assert!(rec.calls().is_empty());
        assert_eq!(dev.status().plugged_size, BLOCK);
        assert_eq!(dev.metrics().errors.get(), 10);
    }

    #[test]
    fn unplugging_releases_the_pages_and_keeps_the_slot_mapped() {
        let (mut dev, m, rec) = device();
        dev.set_requested_size(SLOT + 2 * BLOCK).unwrap();
        // One block in slot 0, the last block of slot 0 and the first of
        // slot 1 in one request across the boundary.
        serve(&mut dev, &m, plug(BASE, 1));
        serve(&mut dev, &m, plug(BASE + SLOT - BLOCK, 2));
        assert_eq!(
            rec.calls(),
            [
                format!("map 0 {BASE:#x}+{SLOT:#x}"),
                format!("map 1 {:#x}+{SLOT:#x}", BASE + SLOT)
            ]
        );
        m.write_slice(&[0x5a; 64], GuestAddress(BASE)).unwrap();
        m.write_slice(&[0x5a; 64], GuestAddress(BASE + SLOT))
            .unwrap();
        // Slot 1 loses its only block: its pages go back (they read zero)
        // but the slot stays mapped while the guest runs.
        dev.set_requested_size(SLOT).unwrap();
        assert_eq!(
            serve(&mut dev, &m, unplug(BASE + SLOT, 1)),
            Response::of(RESP_ACK)
        );
        assert!(rec.calls().is_empty());
        let mut b = [1u8; 64];
        m.read_slice(&mut b, GuestAddress(BASE + SLOT)).unwrap();
        assert_eq!(b, [0; 64]);
        // Slot 0 keeps a block: stays mapped, the other block's data stays.
        assert_eq!(
            serve(&mut dev, &m, unplug(BASE + SLOT - BLOCK, 1)),
            Response::of(RESP_ACK)
        );
        assert!(rec.calls().is_empty());
        m.read_slice(&mut b, GuestAddress(BASE)).unwrap();
        assert_eq!(b, [0x5a; 64]);
        assert_eq!(dev.status().plugged_size, BLOCK);
        // Unplugging below the requested size is the driver's call.
        assert_eq!(serve(&mut dev, &m, unplug(BASE, 1)), Response::of(RESP_ACK));
        assert!(rec.calls().is_empty());
        assert_eq!(dev.status().plugged_size, 0);
        // Plugging into a slot still mapped maps nothing again.
        dev.set_requested_size(2 * SLOT).unwrap();
        assert_eq!(
            serve(&mut dev, &m, plug(BASE + SLOT, 1)),
            Response::of(RESP_ACK)
        );
        assert!(rec.calls().is_empty());
    }

    #[test]
    fn invalid_unplug_requests_get_an_error_and_change_nothing() {
        let (mut dev, m, rec) = device();
        dev.set_requested_size(4 * BLOCK).unwrap();
        serve(&mut dev, &m, plug(BASE, 2));
        rec.calls();
        for bad in [
            unplug(BASE + 2 * BLOCK, 1), // never plugged
            unplug(BASE + BLOCK, 2),     // half plugged
            unplug(BASE + 1, 1),         // unaligned
            unplug(BASE, 0),             // no blocks
            unplug(BASE + 2 * SLOT, 1),  // past the region
            unplug(BASE - 2 * SLOT, 1),  // below it
            unplug(!(BLOCK - 1), u16::MAX),
        ] {
            assert_eq!(
                serve(&mut dev, &m, bad),
                Response::of(RESP_ERROR),
                "{bad:?}"
            );
        }
        assert!(rec.calls().is_empty());
        assert_eq!(dev.status().plugged_size, 2 * BLOCK);
    }

    #[test]
    fn state_requests_report_plugged_unplugged_and_mixed() {
        let (mut dev, m, _) = device();
        dev.set_requested_size(2 * BLOCK).unwrap();
        serve(&mut dev, &m, plug(BASE + BLOCK, 2));
        let state = |dev: &mut Mem, addr, nb| {
            serve(
                dev,
                &m,
                Request::State {
                    addr,
                    nb_blocks: nb,
                },
            )
        };
        assert_eq!(state(&mut dev, BASE + BLOCK, 2).state, STATE_PLUGGED);
        assert_eq!(state(&mut dev, BASE + 3 * BLOCK, 5).state, STATE_UNPLUGGED);
        let mixed = state(&mut dev, BASE, 2);
        assert_eq!((mixed.kind, mixed.state), (RESP_ACK, STATE_MIXED));
        assert_eq!(
            state(&mut dev, BASE + 2 * SLOT, 1),
            Response::of(RESP_ERROR)
        );
        assert_eq!(state(&mut dev, BASE, 0), Response::of(RESP_ERROR));
    }

    #[test]
    fn unplug_all_empties_every_slot() {
        let (mut dev, m, rec) = device();
        dev.set_requested_size(2 * SLOT).unwrap();
        serve(&mut dev, &m, plug(BASE, 64));
        serve(&mut dev, &m, plug(BASE + SLOT + 10 * BLOCK, 3));
        m.write_obj(7u64, GuestAddress(BASE + SLOT + 10 * BLOCK))
            .unwrap();
        rec.calls();
        assert_eq!(
            serve(&mut dev, &m, Request::UnplugAll),
            Response::of(RESP_ACK)
        );
        assert_eq!(
            rec.calls(),
            [
                format!("unmap 0 {BASE:#x}"),
                format!("unmap 1 {:#x}", BASE + SLOT)
            ]
        );
        assert_eq!(dev.status().plugged_size, 0);
        let v: u64 = m.read_obj(GuestAddress(BASE + SLOT + 10 * BLOCK)).unwrap();
        assert_eq!(v, 0);
        // Everything can be plugged again.
        assert_eq!(serve(&mut dev, &m, plug(BASE, 64)), Response::of(RESP_ACK));
    }

    #[test]
    fn unknown_and_malformed_requests_get_an_error() {
        let (mut dev, m, _) = device();
        assert_eq!(
            serve(&mut dev, &m, Request::Unknown(7)),
            Response::of(RESP_ERROR)
        );
        // A request of 16 bytes: answered with an error, nothing plugged.
        dev.set_requested_size(BLOCK).unwrap();
        m.write_slice(&plug(BASE, 1).encode(), GuestAddress(REQ))
            .unwrap();
        let (used, b) = serve_chain(&mut dev, &m, &[d(REQ, 16, NEXT, 1), d(RESP, 10, WRITE, 0)]);
        assert_eq!((used, u16::from_le_bytes([b[0], b[1]])), (10, RESP_ERROR));
        assert_eq!(dev.status().plugged_size, 0);
    }

    #[test]
    fn a_chain_without_a_response_buffer_goes_back_unanswered_and_undone() {
        let (mut dev, m, rec) = device();
        dev.set_requested_size(BLOCK).unwrap();
        m.write_slice(&plug(BASE, 1).encode(), GuestAddress(REQ))
            .unwrap();
        for chain in [
            vec![d(REQ, 24, 0, 0)],
            vec![d(REQ, 24, NEXT, 1), d(RESP, 4, WRITE, 0)],
            vec![d(REQ, 24, NEXT, 1), d(BASE + 4 * SLOT, 10, WRITE, 0)],
        ] {
            let (used, resp) = serve_chain(&mut dev, &m, &chain);
            assert_eq!((used, resp), (0, [0xee; 10]), "{chain:?}");
        }
        assert!(rec.calls().is_empty());
        assert_eq!(dev.status().plugged_size, 0);
        assert_eq!(dev.metrics().invalid_chains.get(), 3);
    }

    #[test]
    fn a_slot_the_host_cannot_map_makes_the_guest_retry_and_changes_nothing() {
        let (mut dev, m, rec) = device();
        dev.set_requested_size(2 * SLOT).unwrap();
        *rec.fail.lock().unwrap() = Some(1);
        // Across both slots: slot 0 is mapped, slot 1 fails, slot 0 goes again.
        assert_eq!(
            serve(&mut dev, &m, plug(BASE + SLOT - BLOCK, 2)),
            Response::of(RESP_BUSY)
        );
        assert_eq!(
            rec.calls(),
            [
                format!("map 0 {BASE:#x}+{SLOT:#x}"),
                format!("unmap 0 {BASE:#x}")
            ]
        );
        assert_eq!(dev.status().plugged_size, 0);
        *rec.fail.lock().unwrap() = None;
        assert_eq!(
            serve(&mut dev, &m, plug(BASE + SLOT - BLOCK, 2)),
            Response::of(RESP_ACK)
        );
    }

    #[test]
    fn regions_that_cannot_be_offered_are_refused() {
        let m = guest();
        let new = |r: MemRegion| Mem::new(r, m.clone(), Box::new(Recorder::default()));
        for bad in [
            MemRegion {
                block_size: 3 * MIB,
                ..region()
            },
            MemRegion {
                block_size: MIB,
                ..region()
            },
            MemRegion {
                block_size: 256 * MIB,
                ..region()
            },
            MemRegion {
                slot_size: 64 * MIB,
                ..region()
            },
            MemRegion {
                slot_size: 0,
                ..region()
            },
            MemRegion {
                size: SLOT + BLOCK,
                ..region()
            },
            MemRegion {
                size: 0,
                ..region()
            },
            MemRegion {
                addr: BASE + MIB,
                ..region()
            },
            MemRegion {
                addr: u64::MAX - SLOT + 1,
                size: SLOT,
                ..region()
            },
        ] {
            assert!(matches!(new(bad), Err(MemError::Region { .. })), "{bad:?}");
        }
        // A region not (all) in guest memory.
        assert!(matches!(
            new(MemRegion {
                size: 4 * SLOT,
                ..region()
            }),
            Err(MemError::NotInGuestMemory { .. })
        ));
        assert!(matches!(
            new(MemRegion {
                addr: 8 << 30,
                ..region()
            }),
            Err(MemError::NotInGuestMemory { .. })
        ));
        assert!(new(region()).is_ok());
    }

    #[test]
    fn notifications_before_activation_and_after_reset_do_nothing() {
        let (mut dev, m, _) = device();
        dev.process_queue();
        dev.set_requested_size(BLOCK).unwrap();
        serve(&mut dev, &m, plug(BASE, 1));
        dev.reset();
        dev.process_queue();
        // What was plugged stays plugged for the next driver to see.
        assert_eq!(config(&dev)[5], BLOCK);
    }

    #[test]
    fn a_looping_chain_or_a_runaway_avail_index_does_not_hang_the_device() {
        let (mut dev, m, _) = device();
        // 0 -> 1 -> 1 -> ...: bounded by the queue size.
        let vq = MockSplitQueue::new(&m, 16);
        vq.add_desc_chains(&[d(REQ, 24, NEXT, 1), d(RESP, 10, WRITE | NEXT, 1)], 0)
            .unwrap();
        dev.activate(m.clone(), vec![vq.create_queue().unwrap()], 0)
            .unwrap();
        dev.process_queue();
        assert_eq!(vq.used().idx().load(), 1);
        // The driver claims 40 requests in a queue of 16.
        let (mut dev, m, _) = device();
        m.write_obj(40u16, GuestAddress(0x1000 + 2)).unwrap();
        let q = hand_laid_queue(16, 0x1000, 0x2000, false);
        dev.activate(m, vec![q], 0).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            dev.process_queue();
            let _ = tx.send(());
        });
        assert!(
            rx.recv_timeout(std::time::Duration::from_secs(10)).is_ok(),
            "process_queue spins"
        );
    }

    #[test]
    fn many_requests_in_one_turn_are_all_answered_with_one_interrupt() {
        let (mut dev, m, _) = device();
        dev.set_requested_size(8 * BLOCK).unwrap();
        let vq = MockSplitQueue::new(&m, 16);
        let mut descs = Vec::new();
        for i in 0..4u16 {
            let req = REQ + 0x100 * u64::from(i);
            let resp = RESP + 0x100 * u64::from(i);
            m.write_slice(
                &plug(BASE + 2 * BLOCK * u64::from(i), 2).encode(),
                GuestAddress(req),
            )
            .unwrap();
            descs.push(d(req, 24, NEXT, 2 * i + 1));
            descs.push(d(resp, 10, WRITE, 0));
        }
        vq.build_multiple_desc_chains(&descs).unwrap();
        dev.activate(m.clone(), vec![vq.create_queue().unwrap()], 0)
            .unwrap();
        dev.process_queue();
        assert_eq!(vq.used().idx().load(), 4);
        assert_eq!(dev.status().plugged_size, 8 * BLOCK);
        assert_eq!(dev.interrupt().status(), INTERRUPT_USED_RING);
        assert_eq!(dev.interrupt().irqfd().read().unwrap(), 1);
    }
}
