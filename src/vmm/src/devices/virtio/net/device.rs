//! The virtio-net device: one rx and one tx queue, the MAC in the config
//! space, checksum and TSO offloads when the backend takes them.
//!
//! Frames are copied through two bounded buffers ([`MAX_FRAME_LEN`]) with
//! vm-memory reads and writes only. Every chain is checked before it is
//! used: direction, non-zero length, inside guest memory, no overlaps, and
//! for tx a total between the header size and the frame limit. A chain that
//! fails is returned to the guest unused; the VMM carries on.

use std::io::ErrorKind;

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::tap::{Tap, TapError};
use super::{Backend, MacAddr, MAX_FRAME_LEN, QUEUE_SIZE, TX_QUEUE, TYPE_NET, VNET_HDR_LEN};
use crate::config::NetConfig;
use crate::devices::virtio::chain::{self, Chain};
use crate::devices::virtio::{
    has_waiting, read_config_bytes, ActivateError, Interrupt, Rearm, StaleQueue, VirtioDevice,
    INTERRUPT_USED_RING, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use crate::log_limit::LogLimiter;

/// Frames moved per event before the event loop gets a turn again.
const BUDGET: usize = QUEUE_SIZE as usize;

/// Errors while setting up a network interface.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The tap cannot be used.
    #[error("cannot set up network interface {id}")]
    Tap {
        /// Interface id.
        id: String,
        /// What went wrong.
        source: TapError,
    },
    /// An eventfd could not be created.
    #[error("cannot create network interface {id} eventfds")]
    EventFd {
        /// Interface id.
        id: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Why a descriptor chain was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    /// A descriptor goes the wrong way (device-writable on tx, readable on rx).
    #[error("descriptor has the wrong direction")]
    WrongDirection,
    /// A descriptor has length zero.
    #[error("zero-length descriptor")]
    Empty,
    /// A buffer lies (partly) outside guest memory.
    #[error("buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutOfRange {
        /// Buffer start.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
    /// Two buffers of the chain overlap.
    #[error("buffers overlap")]
    Overlap,
    /// The chain is shorter than a virtio-net header.
    #[error("chain of {0} bytes is shorter than the virtio-net header")]
    TooShort(u64),
    /// A tx chain holds more than the largest frame.
    #[error("chain of {0} bytes is longer than the largest frame")]
    TooLong(u64),
    /// Guest memory could not be read or written.
    #[error("guest memory access failed")]
    Memory,
    /// The chain could not be walked (an indirect descriptor).
    #[error("unusable descriptor chain")]
    Walk(#[source] chain::ChainError),
}

/// The checked buffers of one chain, in order.
struct Buffers {
    list: Vec<(GuestAddress, usize)>,
    total: u64,
}

/// Checks the descriptors of `chain` until they hold `enough` bytes (the
/// rest are not used): all device-writable (`write`) or all device-readable,
/// non-empty, inside guest memory, not overlapping, and no indirect
/// descriptor among them. Stopping there bounds the work a long chain can
/// cause.
fn check_chain(
    chain: Chain<'_>,
    mem: &GuestMemoryMmap,
    write: bool,
    enough: u64,
) -> Result<Buffers, ChainError> {
    let mut list = Vec::new();
    let mut total = 0u64;
    for d in chain {
        let d = d.map_err(ChainError::Walk)?;
        if d.is_write_only() != write {
            return Err(ChainError::WrongDirection);
        }
        if d.len() == 0 {
            return Err(ChainError::Empty);
        }
        let len = usize::try_from(d.len()).map_err(|_| ChainError::Memory)?;
        if !mem.check_range(d.addr(), len) {
            return Err(ChainError::OutOfRange {
                addr: d.addr().0,
                len: d.len(),
            });
        }
        total = total
            .checked_add(u64::from(d.len()))
            .ok_or(ChainError::Memory)?;
        list.push((d.addr(), len));
        if total >= enough {
            break;
        }
    }
    let mut sorted: Vec<(u64, u64)> = list.iter().map(|(a, l)| (a.0, *l as u64)).collect();
    sorted.sort_unstable();
    // check_range above: start + len cannot overflow.
    if sorted
        .windows(2)
        .any(|w| w[0].0.saturating_add(w[0].1) > w[1].0)
    {
        return Err(ChainError::Overlap);
    }
    Ok(Buffers { list, total })
}

/// TUN_F_* offloads for the guest features the driver acknowledged (TSO
/// needs checksum offload, in virtio and in the tap alike).
fn tun_offloads(acked: u64) -> u32 {
    let has = |bit: u32| acked & (1u64 << bit) != 0;
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    if has(VIRTIO_NET_F_GUEST_TSO4) {
        flags |= libc::TUN_F_TSO4;
    }
    if has(VIRTIO_NET_F_GUEST_TSO6) {
        flags |= libc::TUN_F_TSO6;
    }
    flags
}

/// Errors of a tap write that mean the tap is gone, not that a frame was bad.
fn is_fatal_write_error(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADFD | libc::EBADF | libc::ENODEV | libc::ENXIO | libc::EPIPE)
    )
}

pub(super) enum State {
    Inactive,
    Active {
        mem: GuestMemoryMmap,
        rx: Queue,
        tx: Queue,
    },
}

/// What a pass over the rx path ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxOutcome {
    /// The backend has nothing more to read (or the budget ran out).
    Drained,
    /// A frame waits for guest buffers: stop polling the backend until the
    /// guest adds some.
    NoBuffers,
    /// The backend failed for good.
    BackendGone,
}

/// A virtio-net device.
pub struct Net {
    id: String,
    mac: Option<MacAddr>,
    backend: Box<dyn Backend>,
    backend_gone: bool,
    pub(super) backend_polled: bool,
    avail_features: u64,
    queue_sizes: [u16; 2],
    queue_events: [EventFd; 2],
    interrupt: Interrupt,
    pub(super) state: State,
    rx_frame: Vec<u8>,
    /// Length of the frame waiting in `rx_frame`, 0 when none.
    rx_pending: usize,
    tx_frame: Vec<u8>,
    metrics: std::sync::Arc<crate::metrics::NetMetrics>,
    /// Once a second the event loop serves a queue whose notification was
    /// lost, and raises the interrupt again (see `event_handler`).
    pub(super) timer: vmm_sys_util::timerfd::TimerFd,
    /// The timer's watch on each queue.
    rx_stale: StaleQueue,
    tx_stale: StaleQueue,
    /// Warnings the guest can cause at will.
    guest_log: LogLimiter,
}

impl Net {
    /// The interface's counters.
    pub fn metrics(&self) -> std::sync::Arc<crate::metrics::NetMetrics> {
        self.metrics.clone()
    }

    /// Attaches to the configured tap and builds the device.
    pub fn new(config: &NetConfig) -> Result<Self, NetError> {
        let tap = Tap::open(&config.host_dev_name).map_err(|source| NetError::Tap {
            id: config.id.clone(),
            source,
        })?;
        Self::with_backend(config.id.clone(), config.guest_mac, Box::new(tap))
    }

    /// Builds the device on any backend. Offloads are offered only if the
    /// backend accepts them.
    pub fn with_backend(
        id: String,
        mac: Option<MacAddr>,
        mut backend: Box<dyn Backend>,
    ) -> Result<Self, NetError> {
        let evt_err = |source| NetError::EventFd {
            id: id.clone(),
            source,
        };
        let mut avail_features = (1u64 << VIRTIO_F_VERSION_1) | (1u64 << VIRTIO_RING_F_EVENT_IDX);
        if mac.is_some() {
            avail_features |= 1u64 << VIRTIO_NET_F_MAC;
        }
        let all = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
        if backend.set_offload(all).is_ok() && backend.set_offload(0).is_ok() {
            for bit in [
                VIRTIO_NET_F_CSUM,
                VIRTIO_NET_F_GUEST_CSUM,
                VIRTIO_NET_F_GUEST_TSO4,
                VIRTIO_NET_F_GUEST_TSO6,
                VIRTIO_NET_F_HOST_TSO4,
                VIRTIO_NET_F_HOST_TSO6,
            ] {
                avail_features |= 1u64 << bit;
            }
        } else {
            tracing::info!(net = %id, "the tap takes no offloads: none offered");
        }
        let timer = {
            let os = |e: vmm_sys_util::errno::Error| NetError::EventFd {
                id: id.clone(),
                source: std::io::Error::from_raw_os_error(e.errno()),
            };
            let mut t = vmm_sys_util::timerfd::TimerFd::new().map_err(os)?;
            let second = std::time::Duration::from_secs(1);
            t.reset(second, Some(second)).map_err(os)?;
            t
        };
        Ok(Net {
            timer,
            rx_stale: StaleQueue::default(),
            tx_stale: StaleQueue::default(),
            queue_events: [
                EventFd::new(EFD_NONBLOCK).map_err(evt_err)?,
                EventFd::new(EFD_NONBLOCK).map_err(evt_err)?,
            ],
            interrupt: Interrupt::new().map_err(evt_err)?,
            id,
            mac,
            backend,
            backend_gone: false,
            backend_polled: true,
            avail_features,
            queue_sizes: [QUEUE_SIZE; 2],
            state: State::Inactive,
            rx_frame: vec![0; MAX_FRAME_LEN],
            rx_pending: 0,
            tx_frame: vec![0; MAX_FRAME_LEN],
            metrics: Default::default(),
            guest_log: LogLimiter::default(),
        })
    }

    /// The interface id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The backend's fd, polled by the event loop.
    pub(super) fn backend_fd(&self) -> std::os::fd::RawFd {
        self.backend.as_raw_fd()
    }

    /// Whether the backend failed for good.
    pub fn backend_gone(&self) -> bool {
        self.backend_gone
    }

    fn lose_backend(&mut self, e: &std::io::Error) {
        if !self.backend_gone {
            tracing::error!(net = %self.id, error = %crate::error::Chain(&e), "the tap failed; the interface stops passing traffic");
        }
        self.backend_gone = true;
        self.rx_pending = 0;
    }

    /// Once a tick of the timer: which queues' notifications were lost
    /// (see [`StaleQueue`]), as (rx, tx), each counted and logged. Tx is
    /// stale when frames waited a whole tick untaken; rx when a frame
    /// waited a whole tick for rx buffers the guest had already given.
    pub(super) fn lost_notifications(&mut self) -> (bool, bool) {
        let (rx_waiting, tx_waiting) = match &self.state {
            State::Active { mem, rx, tx, .. } => (
                self.rx_pending != 0 && has_waiting(rx, mem),
                has_waiting(tx, mem),
            ),
            _ => (false, false),
        };
        let rx = self.rx_stale.tick(rx_waiting);
        let tx = self.tx_stale.tick(tx_waiting);
        for (lost, queue, counter) in [
            (rx, "rx", &self.metrics.rx_found_by_timer),
            (tx, "tx", &self.metrics.tx_found_by_timer),
        ] {
            if lost {
                counter.inc();
                crate::limited!(self.guest_log, warn, net = %self.id, queue, "buffers waited a whole second without a notification: a lost queue notification");
            }
        }
        (rx, tx)
    }

    fn notify_guest(interrupt: &Interrupt, queue: &mut Queue, mem: &GuestMemoryMmap, id: &str) {
        match queue.needs_notification(mem) {
            Ok(true) => interrupt.trigger(INTERRUPT_USED_RING),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(net = %id, error = %crate::error::Chain(&e), "used ring unreadable");
                interrupt.trigger(INTERRUPT_USED_RING);
            }
        }
    }

    /// Moves frames from the backend into the guest's rx buffers until the
    /// backend has none, the guest has no buffers, or the budget is spent.
    pub fn process_rx(&mut self) -> RxOutcome {
        if self.backend_gone {
            return RxOutcome::BackendGone;
        }
        let mut delivered = false;
        let mut outcome = RxOutcome::Drained;
        // The guest's rx kicks matter only once its buffers ran out;
        // deliver_pending asks for them again then.
        if let State::Active { mem, rx, .. } = &mut self.state {
            if let Err(e) = rx.disable_notification(&*mem) {
                tracing::debug!(net = %self.id, error = %crate::error::Chain(&e), "cannot suppress rx notifications");
            }
        }
        for _ in 0..BUDGET {
            if self.rx_pending == 0 {
                match self.backend.read_frame(&mut self.rx_frame) {
                    Ok(n) if n < VNET_HDR_LEN => {
                        tracing::debug!(net = %self.id, len = n, "runt frame from the tap dropped");
                        self.metrics.rx_dropped.inc();
                        continue;
                    }
                    Ok(n) if n > self.rx_frame.len() => {
                        // A tap reports the whole length of a frame it cut
                        // to the buffer: what arrived is not the frame.
                        tracing::debug!(net = %self.id, len = n, "frame larger than the device's buffer dropped");
                        self.metrics.rx_dropped.inc();
                        continue;
                    }
                    Ok(n) => self.rx_pending = n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => {
                        self.lose_backend(&e);
                        outcome = RxOutcome::BackendGone;
                        break;
                    }
                }
            }
            match self.deliver_pending() {
                Some(true) => delivered = true,
                Some(false) => {}
                None => {
                    outcome = RxOutcome::NoBuffers;
                    break;
                }
            }
        }
        if let (true, State::Active { mem, rx, .. }) = (delivered, &mut self.state) {
            Self::notify_guest(&self.interrupt, rx, mem, &self.id);
        }
        outcome
    }

    /// Puts the pending frame into the next usable rx chain: Some(true) when
    /// it went to the guest, Some(false) when it was dropped (no chain is
    /// large enough), None when the guest has no buffers (it stays pending).
    fn deliver_pending(&mut self) -> Option<bool> {
        let State::Active { mem, rx, .. } = &mut self.state else {
            return None;
        };
        let len = self.rx_pending;
        let frame = self.rx_frame.get_mut(..len)?;
        // Without VIRTIO_NET_F_MRG_RXBUF a frame takes one chain: num_buffers = 1.
        if let Some(n) = frame.get_mut(10..VNET_HDR_LEN) {
            n.copy_from_slice(&1u16.to_le_bytes());
        }
        let mut rearm = Rearm::default();
        loop {
            let Some(chain) = chain::pop(rx, mem) else {
                // Out of buffers: ask to be notified when more come, and
                // look once more in case they came meanwhile.
                match rearm.rearm(rx, mem) {
                    Ok(true) => continue,
                    Ok(false) => return None,
                    Err(e) => {
                        tracing::debug!(net = %self.id, error = %crate::error::Chain(&e), "cannot re-arm rx notifications");
                        return None;
                    }
                }
            };
            rearm.served();
            self.rx_stale.took();
            let head = chain.head_index();
            let result = check_chain(chain, mem, true, len as u64).and_then(|bufs| {
                if bufs.total < len as u64 {
                    return Err(ChainError::TooShort(bufs.total));
                }
                let mut off = 0;
                for (addr, blen) in bufs.list {
                    let n = blen.min(len - off);
                    let part = frame.get(off..off + n).ok_or(ChainError::Memory)?;
                    mem.write_slice(part, addr)
                        .map_err(|_| ChainError::Memory)?;
                    off += n;
                    if off == len {
                        break;
                    }
                }
                Ok(())
            });
            match result {
                Ok(()) => {
                    self.rx_pending = 0;
                    self.metrics.rx_frames.inc();
                    self.metrics.rx_bytes.add(len as u64);
                    // len <= MAX_FRAME_LEN fits in u32.
                    if let Err(e) = rx.add_used(&*mem, head, len as u32) {
                        crate::limited!(self.guest_log, warn, net = %self.id, error = %crate::error::Chain(&e), "cannot return an rx buffer");
                    }
                    return Some(true);
                }
                Err(ChainError::TooShort(room)) => {
                    // A well-formed chain too small for this frame: keep the
                    // chain for the next frame, drop this one.
                    tracing::debug!(net = %self.id, len, room, "frame larger than the guest's rx buffer dropped");
                    self.metrics.rx_dropped.inc();
                    rx.go_to_previous_position();
                    self.rx_pending = 0;
                    return Some(false);
                }
                Err(e) => {
                    tracing::debug!(net = %self.id, error = %crate::error::Chain(&e), "bad rx chain refused");
                    self.metrics.invalid_chains.inc();
                    if let Err(e) = rx.add_used(&*mem, head, 0) {
                        crate::limited!(self.guest_log, warn, net = %self.id, error = %crate::error::Chain(&e), "cannot return an rx buffer");
                        return None;
                    }
                }
            }
        }
    }

    /// Sends every frame the guest queued on tx (up to the budget; more
    /// are served on the next turn of the event loop). Returns false if the
    /// backend failed for good.
    pub fn process_tx(&mut self) -> bool {
        let State::Active { mem, tx, .. } = &mut self.state else {
            return !self.backend_gone;
        };
        let mut completed = 0;
        let mut broken = false;
        // No kicks while the queue is drained; re-armed before waiting
        // again, and whatever slipped in meanwhile is served first.
        if let Err(e) = tx.disable_notification(&*mem) {
            tracing::debug!(net = %self.id, error = %crate::error::Chain(&e), "cannot suppress tx notifications");
        }
        let mut rearm = Rearm::default();
        while completed < BUDGET && !broken {
            let Some(chain) = chain::pop(tx, mem) else {
                match rearm.rearm(tx, mem) {
                    Ok(true) => {
                        if let Err(e) = tx.disable_notification(&*mem) {
                            tracing::debug!(net = %self.id, error = %crate::error::Chain(&e), "cannot suppress tx notifications");
                        }
                        continue;
                    }
                    Ok(false) => break,
                    Err(e) => {
                        tracing::debug!(net = %self.id, error = %crate::error::Chain(&e), "cannot re-arm tx notifications");
                        break;
                    }
                }
            };
            rearm.served();
            self.tx_stale.took();
            let head = chain.head_index();
            let frame = check_chain(chain, mem, false, MAX_FRAME_LEN as u64 + 1).and_then(|bufs| {
                if bufs.total < VNET_HDR_LEN as u64 {
                    return Err(ChainError::TooShort(bufs.total));
                }
                if bufs.total > MAX_FRAME_LEN as u64 {
                    return Err(ChainError::TooLong(bufs.total));
                }
                let mut off = 0;
                for (addr, len) in bufs.list {
                    let dst = self
                        .tx_frame
                        .get_mut(off..off + len)
                        .ok_or(ChainError::Memory)?;
                    mem.read_slice(dst, addr).map_err(|_| ChainError::Memory)?;
                    off += len;
                }
                Ok(off)
            });
            match frame {
                Ok(len) if !self.backend_gone => {
                    let frame = self.tx_frame.get(..len).unwrap_or_default();
                    match self.backend.write_frame(frame) {
                        Ok(_) => {
                            self.metrics.tx_frames.inc();
                            self.metrics.tx_bytes.add(len as u64);
                        }
                        Err(e) if is_fatal_write_error(&e) => {
                            if !self.backend_gone {
                                tracing::error!(net = %self.id, error = %crate::error::Chain(&e), "the tap failed; the interface stops passing traffic");
                            }
                            self.backend_gone = true;
                            self.rx_pending = 0;
                        }
                        Err(e) => {
                            self.metrics.tx_errors.inc();
                            tracing::debug!(net = %self.id, error = %crate::error::Chain(&e), "tx frame dropped");
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    self.metrics.invalid_chains.inc();
                    tracing::debug!(net = %self.id, error = %crate::error::Chain(&e), "bad tx chain refused");
                }
            }
            if let Err(e) = tx.add_used(&*mem, head, 0) {
                crate::limited!(self.guest_log, warn, net = %self.id, error = %crate::error::Chain(&e), "cannot return a tx buffer");
                broken = true;
                continue;
            }
            completed += 1;
        }
        if completed > 0 {
            Self::notify_guest(&self.interrupt, tx, mem, &self.id);
        }
        if completed == BUDGET {
            // More may be queued (and notifications are still off): come
            // back after the other events.
            let _ = self.queue_events[TX_QUEUE].write(1);
        }
        !self.backend_gone
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn interrupt(&self) -> &Interrupt {
        &self.interrupt
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_net_config: mac first; the other fields belong to
        // features husk does not offer.
        let mac = self.mac.map(|m| m.0).unwrap_or_default();
        read_config_bytes(&mac, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!(offset, "virtio-net config write ignored");
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        acked_features: u64,
    ) -> Result<(), ActivateError> {
        let got = queues.len();
        let Ok([rx, tx]) = <[Queue; 2]>::try_from(queues) else {
            return Err(ActivateError::QueueCount { expected: 2, got });
        };
        let offloads = tun_offloads(acked_features);
        if let Err(e) = self.backend.set_offload(offloads) {
            // The tap then checksums and segments itself: slower, still right.
            // (Once per activation, which the driver can repeat at will.)
            crate::limited!(self.guest_log, warn, net = %self.id, error = %crate::error::Chain(&e), offloads, "the tap refused the negotiated offloads");
        }
        self.state = State::Active { mem, rx, tx };
        // Let the event loop look at both queues (and resume polling the
        // tap) now that there are queues to serve.
        for evt in &self.queue_events {
            let _ = evt.write(1);
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.state = State::Inactive;
        self.rx_pending = 0;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::devices::virtio::net::test_utils::SocketBackend;
    use crate::devices::virtio::test_utils::{
        d, mem, QueueLayout, WriteAudit, MEM_SIZE, NEXT, WRITE,
    };
    use std::os::unix::net::UnixDatagram;
    use std::sync::atomic::Ordering;
    use virtio_queue::mock::MockSplitQueue;

    pub(crate) const RXQ: u64 = 0;
    pub(crate) const TXQ: u64 = 0x8000;
    const BUF: u64 = 0x10_0000;
    const BUF2: u64 = 0x11_0000;
    const BUF3: u64 = 0x20_0000;

    pub(crate) struct Rig {
        pub net: Net,
        pub peer: UnixDatagram,
        pub backend: (Arc<AtomicU32>, Arc<AtomicBool>),
    }

    use std::sync::atomic::{AtomicBool, AtomicU32};
    use std::sync::Arc;

    pub(crate) fn rig(mac: Option<MacAddr>, refuse_offloads: bool) -> Rig {
        let (mut b, peer) = SocketBackend::pair().unwrap();
        b.refuse_offloads = refuse_offloads;
        let backend = (b.offloads.clone(), b.broken.clone());
        let mut net = Net::with_backend("eth0".into(), mac, Box::new(b)).unwrap();
        // Event counts in the tests are exact: the once-a-second pass is
        // off unless a test turns it on.
        net.timer.clear().unwrap();
        Rig { net, peer, backend }
    }

    /// A frame as the guest (or the tap) sees it: a zeroed header and `len`
    /// bytes of payload.
    pub(crate) fn frame(len: usize, seed: u8) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend((0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)));
        f
    }

    pub(crate) fn activate(
        net: &mut Net,
        m: &GuestMemoryMmap,
        rxq: &MockSplitQueue<GuestMemoryMmap>,
        txq: &MockSplitQueue<GuestMemoryMmap>,
        features: u64,
    ) {
        // As the transport does: EVENT_IDX in the queues when acknowledged.
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut rx: Queue = rxq.create_queue().unwrap();
        let mut tx: Queue = txq.create_queue().unwrap();
        rx.set_event_idx(event_idx);
        tx.set_event_idx(event_idx);
        net.activate(m.clone(), vec![rx, tx], features).unwrap();
        for e in net.queue_events() {
            let _ = e.read();
        }
    }

    fn recv_all(peer: &UnixDatagram) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; MAX_FRAME_LEN + 100];
        while let Ok(n) = peer.recv(&mut buf) {
            out.push(buf[..n].to_vec());
        }
        out
    }

    fn used(q: &MockSplitQueue<GuestMemoryMmap>) -> Vec<(u32, u32)> {
        let u = q.used();
        (0..u.idx().load())
            .map(|i| {
                let e = u.ring().ref_at(i as usize).unwrap().load();
                (e.id(), e.len())
            })
            .collect()
    }

    #[test]
    fn tx_frames_reach_the_backend_whole() {
        let m = mem();
        let mut r = rig(None, false);
        let rxq = MockSplitQueue::create(&m, GuestAddress(RXQ), 16);
        let txq = MockSplitQueue::create(&m, GuestAddress(TXQ), 16);
        let f = frame(1500, 7);
        m.write_slice(&f[..VNET_HDR_LEN], GuestAddress(BUF))
            .unwrap();
        m.write_slice(&f[VNET_HDR_LEN..], GuestAddress(BUF2))
            .unwrap();
        txq.add_desc_chains(
            &[d(BUF, VNET_HDR_LEN as u32, NEXT, 1), d(BUF2, 1500, 0, 0)],
            0,
        )
        .unwrap();
        activate(&mut r.net, &m, &rxq, &txq, 0);
        assert!(r.net.process_tx());
        assert_eq!(recv_all(&r.peer), vec![f.clone()]);
        assert_eq!(used(&txq), vec![(0, 0)]);
        assert_eq!(r.net.interrupt().status(), INTERRUPT_USED_RING);
        let m = r.net.metrics();
        assert_eq!((m.tx_frames.get(), m.tx_bytes.get()), (1, f.len() as u64));
    }

    #[test]
    fn rx_frames_fill_guest_buffers_with_num_buffers_set() {
        let m = mem();
        let mut r = rig(None, false);
        let rxq = MockSplitQueue::create(&m, GuestAddress(RXQ), 16);
        let txq = MockSplitQueue::create(&m, GuestAddress(TXQ), 16);
        rxq.add_desc_chains(&[d(BUF, 100, WRITE | NEXT, 1), d(BUF2, 4000, WRITE, 0)], 0)
            .unwrap();
        activate(&mut r.net, &m, &rxq, &txq, 0);
        let f = frame(1000, 3);
        r.peer.send(&f).unwrap();
        assert_eq!(r.net.process_rx(), RxOutcome::Drained);
        assert_eq!(used(&rxq), vec![(0, f.len() as u32)]);
        let mut got = vec![0u8; f.len()];
        m.read_slice(&mut got[..100], GuestAddress(BUF)).unwrap();
        m.read_slice(&mut got[100..], GuestAddress(BUF2)).unwrap();
        let mut want = f.clone();
        want[10] = 1;
        assert_eq!(got, want);
        assert_eq!(r.net.interrupt().status(), INTERRUPT_USED_RING);
        let m = r.net.metrics();
        assert_eq!((m.rx_frames.get(), m.rx_bytes.get()), (1, f.len() as u64));
    }

    #[test]
    fn rx_waits_for_buffers_and_keeps_the_frame() {
        let m = mem();
        let mut r = rig(None, false);
        let rxq = MockSplitQueue::create(&m, GuestAddress(RXQ), 16);
        let txq = MockSplitQueue::create(&m, GuestAddress(TXQ), 16);
        // Before activation the frame cannot go anywhere: it waits.
        r.peer.send(&frame(60, 1)).unwrap();
        r.peer.send(&frame(60, 2)).unwrap();
        assert_eq!(r.net.process_rx(), RxOutcome::NoBuffers);
        activate(&mut r.net, &m, &rxq, &txq, 0);
        assert_eq!(r.net.process_rx(), RxOutcome::NoBuffers);
        rxq.add_desc_chains(&[d(BUF, 2048, WRITE, 0)], 0).unwrap();
        assert_eq!(r.net.process_rx(), RxOutcome::NoBuffers);
        let mut first = [0u8; 13];
        m.read_slice(&mut first, GuestAddress(BUF)).unwrap();
        assert_eq!(first[12], frame(60, 1)[12], "the first frame went first");
        rxq.add_desc_chains(&[d(BUF2, 2048, WRITE, 0)], 1).unwrap();
        assert_eq!(r.net.process_rx(), RxOutcome::Drained);
        assert_eq!(used(&rxq).len(), 2);
    }

    /// The avail_event a device wrote: after the used ring's 16 entries.
    fn avail_event(m: &GuestMemoryMmap, q: &MockSplitQueue<GuestMemoryMmap>) -> u16 {
        m.read_obj(GuestAddress(q.used_addr().0 + 4 + 8 * 16))
            .unwrap()
    }

    #[test]
    fn with_event_idx_rx_asks_for_kicks_only_when_out_of_buffers() {
        let m = mem();
        let mut r = rig(None, false);
        let rxq = MockSplitQueue::create(&m, GuestAddress(RXQ), 16);
        let txq = MockSplitQueue::create(&m, GuestAddress(TXQ), 16);
        rxq.add_desc_chains(&[d(BUF, 2048, WRITE, 0), d(BUF2, 2048, WRITE, 0)], 0)
            .unwrap();
        activate(&mut r.net, &m, &rxq, &txq, 1 << VIRTIO_RING_F_EVENT_IDX);
        // Buffers to spare: the guest need not kick when it adds more.
        r.peer.send(&frame(60, 1)).unwrap();
        assert_eq!(r.net.process_rx(), RxOutcome::Drained);
        assert_eq!(avail_event(&m, &rxq), 0);
        // Out of buffers with a frame waiting: kick me at the next one.
        r.peer.send(&frame(60, 2)).unwrap();
        r.peer.send(&frame(60, 3)).unwrap();
        assert_eq!(r.net.process_rx(), RxOutcome::NoBuffers);
        assert_eq!(avail_event(&m, &rxq), 2);
        assert_eq!(used(&rxq).len(), 2);
        // A buffer that came while the device looked is found at once.
        rxq.add_desc_chains(&[d(BUF3, 2048, WRITE, 0)], 2).unwrap();
        assert_eq!(r.net.process_rx(), RxOutcome::Drained);
        assert_eq!(used(&rxq).len(), 3);
    }

    #[test]
    fn tx_kicks_are_suppressed_only_while_the_queue_is_drained() {
        let m = mem();
        let f = frame(100, 4);
        m.write_slice(&f, GuestAddress(BUF)).unwrap();
        let chains = [d(BUF, f.len() as u32, 0, 0), d(BUF, f.len() as u32, 0, 0)];

        // Without EVENT_IDX: VRING_USED_F_NO_NOTIFY while draining, cleared
        // before the device waits again.
        let mut r = rig(None, false);
        let rxq = MockSplitQueue::create(&m, GuestAddress(RXQ), 16);
        let txq = MockSplitQueue::create(&m, GuestAddress(TXQ), 16);
        txq.add_desc_chains(&chains, 0).unwrap();
        activate(&mut r.net, &m, &rxq, &txq, 0);
        assert!(r.net.process_tx());
        assert_eq!(recv_all(&r.peer).len(), 2);
        let flags: u16 = m.read_obj(txq.used_addr()).unwrap();
        assert_eq!(flags, 0, "tx notifications re-enabled");

        // With it: re-armed at the next chain the device will look at.
        let mut r = rig(None, false);
        let rxq = MockSplitQueue::create(&m, GuestAddress(RXQ), 16);
        let txq = MockSplitQueue::create(&m, GuestAddress(TXQ), 16);
        txq.add_desc_chains(&chains, 0).unwrap();
        activate(&mut r.net, &m, &rxq, &txq, 1 << VIRTIO_RING_F_EVENT_IDX);
        assert!(r.net.process_tx());
        assert_eq!(recv_all(&r.peer).len(), 2);
        assert_eq!(avail_event(&m, &txq), 2);
    }

    #[test]
    fn an_avail_index_more_than_a_queue_ahead_does_not_spin_the_loop() {
        // Both rings claim 40 new chains in queues of 16: virtio-queue pops
        // nothing while re-arming keeps saying there is more. The device
        // must give up, not spin the event loop.
        for event_idx in [false, true] {
            let m = mem();
            let mut r = rig(None, false);
            let rxq = MockSplitQueue::create(&m, GuestAddress(RXQ), 16);
            let txq = MockSplitQueue::create(&m, GuestAddress(TXQ), 16);
            let features = u64::from(event_idx) << VIRTIO_RING_F_EVENT_IDX;
            activate(&mut r.net, &m, &rxq, &txq, features);
            for q in [&rxq, &txq] {
                m.write_obj(40u16, GuestAddress(q.avail_addr().0 + 2))
                    .unwrap();
            }
            r.peer.send(&frame(60, 1)).unwrap();
            let mut net = r.net;
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                net.process_tx();
                let outcome = net.process_rx();
                let _ = tx.send(outcome);
            });
            let outcome = rx.recv_timeout(std::time::Duration::from_secs(10));
            assert_eq!(
                outcome.ok(),
                Some(RxOutcome::NoBuffers),
                "the queues spin (event_idx {event_idx})"
            );
        }
    }

    #[test]
    fn hostile_tx_chains_are_refused() {
        let cases: Vec<(&str, Vec<virtio_queue::desc::RawDescriptor>)> = vec![
            ("device-writable", vec![d(BUF, 100, WRITE, 0)]),
            (
                "mixed directions",
                vec![d(BUF, 12, NEXT, 1), d(BUF2, 100, WRITE, 0)],
            ),
            ("shorter than the header", vec![d(BUF, 11, 0, 0)]),
            ("zero length", vec![d(BUF, 12, NEXT, 1), d(BUF2, 0, 0, 0)]),
            ("outside memory", vec![d(MEM_SIZE as u64 - 10, 100, 0, 0)]),
            ("far outside memory", vec![d(u64::MAX - 10, 100, 0, 0)]),
            ("huge", vec![d(BUF, 12, NEXT, 1), d(BUF2, 0x20_0000, 0, 0)]),
            (
                "just over the frame limit",
                vec![d(BUF, MAX_FRAME_LEN as u32 + 1, 0, 0)],
            ),
            (
                "overlapping",
                vec![d(BUF, 100, NEXT, 1), d(BUF + 50, 100, 0, 0)],
            ),
            (
                "looping",
                vec![
                    d(BUF, 12, NEXT, 1),
                    d(BUF2, 100, NEXT, 2),
                    d(BUF3, 100, NEXT, 1),
                ],
            ),
        ];
        for (what, chain) in cases {
            let m = mem();
            let mut r = rig(None, false);
            let rxq = MockSplitQueue::create(&m, GuestAddress(RXQ), 16);
            let txq = MockSplitQueue::create(&m, GuestAddress(TXQ), 16);
            txq.add_desc_chains(&chain, 0).unwrap();
            activate(&mut r.net, &m, &rxq, &txq, 0);
            assert!(r.net.process_tx(), "{what}");
            assert!(recv_all(&r.peer).is_empty(), "{what}: nothing is sent");
            assert_eq!(used(&txq), vec![(0, 0)], "{what}: completed unused");
        }
        // The largest frame still goes.
        let m = mem();
        let mut r = rig(None, false);
        let rxq = MockSplitQueue::create(&m, GuestAddress(RXQ), 16);
        let txq = MockSplitQueue::create(&m, GuestAddress(TXQ), 16);
        txq.add_desc_chains(&[d(BUF, MAX_FRAME_LEN as u32, 0, 0)], 0)
            .unwrap();
        activate(&mut r.net, &m, &rxq, &txq, 0);
        r.net.process_tx();
        let sent = recv_all(&r.peer);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].len(), MAX_FRAME_LEN);
    }

    #[test]
    fn hostile_rx_chains_are_returned_unused() {
        let cases: Vec<(&str, Vec<virtio_queue::desc::RawDescriptor>)> = vec![
            ("device-readable", vec![d(BUF, 2048, 0, 0)]),
            (
                "mixed directions",
                vec![d(BUF, 12, WRITE | NEXT, 1), d(BUF2, 2048, 0, 0)],
            ),
            ("zero length", vec![d(BUF, 0, WRITE, 0)]),
            (
                "outside memory",
                vec![d(MEM_SIZE as u64 - 100, 2048, WRITE, 0)],
            ),
            (
                "overlapping",
                vec![d(BUF, 300, WRITE | NEXT, 1), d(BUF + 200, 300, WRITE, 0)],
            ),
            (
                "looping",
                vec![d(BUF, 100, WRITE | NEXT, 1), d(BUF2, 100, WRITE | NEXT, 0)],
            ),
        ];
        for (what, chain) in cases {
            let m = mem();
            let mut r = rig(None, false);
            let rxq = MockSplitQueue::create(&m, GuestAddress(RXQ), 16);
            let txq = MockSplitQueue::create(&m, GuestAddress(TXQ), 16);
            let n = chain.len() as u16;
            rxq.add_desc_chains(&chain, 0).unwrap();
            // A good chain after the bad one gets the frame.
            rxq.add_desc_chains(&[d(BUF3, 2048, WRITE, 0)], n).unwrap();
            activate(&mut r.net, &m, &rxq, &txq, 0);
            let f = frame(500, 9);
            r.peer.send(&f).unwrap();
            assert_eq!(r.net.process_rx(), RxOutcome::Drained, "{what}");
            assert_eq!(
                used(&rxq),
                vec![(0, 0), (u32::from(n), f.len() as u32)],
                "{what}"
            );
            let mut got = vec![0u8; f.len()];
            m.read_slice(&mut got, GuestAddress(BUF3)).unwrap();
            assert_eq!(got[12..], f[12..], "{what}");
        }
    }

    #[test]
    fn indirect_descriptors_are_refused_and_their_tables_never_read() {
        // Not offered, so never negotiated: an indirect chain is malformed.
        use crate::devices::virtio::test_utils::{write_table, INDIRECT};
        use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
        const TABLE: u64 = 0x30_0000;
        let m = mem();
        let mut r = rig(None, false);
        assert_eq!(
            r.net.avail_features() & (1 << VIRTIO_RING_F_INDIRECT_DESC),
            0
        );
        let rxq = MockSplitQueue::create(&m, GuestAddress(RXQ), 16);
        let txq = MockSplitQueue::create(&m, GuestAddress(TXQ), 16);
        // tx: a whole frame in the table is not sent.
        let f = frame(100, 5);
        m.write_slice(&f, GuestAddress(BUF)).unwrap();
        let len = write_table(&m, TABLE, &[d(BUF, f.len() as u32, 0, 0)]);
        txq.add_desc_chains(&[d(TABLE, len, INDIRECT, 0)], 0)
            .unwrap();
        // rx: a buffer in a table is returned unused, the frame goes to
        // the next chain.
        let len = write_table(&m, TABLE + 0x100, &[d(BUF2, 2048, WRITE, 0)]);
        rxq.add_desc_chains(&[d(TABLE + 0x100, len, INDIRECT, 0)], 0)
            .unwrap();
        rxq.add_desc_chains(&[d(BUF3, 2048, WRITE, 0)], 1).unwrap();
        activate(&mut r.net, &m, &rxq, &txq, 0);
        assert!(r.net.process_tx());
        assert!(
            recv_all(&r.peer).is_empty(),
            "the frame in the table was sent"
        );
        assert_eq!(used(&txq), vec![(0, 0)]);
        let g = frame(300, 6);
        r.peer.send(&g).unwrap();
        assert_eq!(r.net.process_rx(), RxOutcome::Drained);
        assert_eq!(used(&rxq), vec![(0, 0), (1, g.len() as u32)]);
        let untouched: u8 = m.read_obj(GuestAddress(BUF2 + 12)).unwrap();
        assert_eq!(untouched, 0, "the frame went into the table's buffer");
        assert_eq!(r.net.metrics().invalid_chains.get(), 2);
        assert_eq!(r.net.metrics().tx_frames.get(), 0);
    }

    #[test]
    fn rx_chains_are_read_only_as_far_as_the_frame_needs() {
        let m = mem();
        let mut r = rig(None, false);
        let rxq = MockSplitQueue::create(&m, GuestAddress(RXQ), 16);
        let txq = MockSplitQueue::create(&m, GuestAddress(TXQ), 16);
        // The trailing descriptor is bad but never needed.
        rxq.add_desc_chains(&[d(BUF, 2048, WRITE | NEXT, 1), d(u64::MAX, 1, 0, 0)], 0)
            .unwrap();
        activate(&mut r.net, &m, &rxq, &txq, 0);
        r.peer.send(&frame(100, 1)).unwrap();
        assert_eq!(r.net.process_rx(), RxOutcome::Drained);
        assert_eq!(used(&rxq), vec![(0, 112)]);
    }

    #[test]
    fn frames_larger_than_the_rx_buffer_are_dropped_and_the_buffer_kept() {
        let m = mem();
        let mut r = rig(None, false);
        let rxq = MockSplitQueue::create(&m, GuestAddress(RXQ), 16);
        let txq = MockSplitQueue::create(&m, GuestAddress(TXQ), 16);
        rxq.add_desc_chains(&[d(BUF, 200, WRITE, 0)], 0).unwrap();
        activate(&mut r.net, &m, &rxq, &txq, 0);
        r.peer.send(&frame(1000, 1)).unwrap();
        r.peer.send(&frame(100, 2)).unwrap();
        assert_eq!(r.net.process_rx(), RxOutcome::Drained);
        assert_eq!(used(&rxq), vec![(0, 112)]);
    }

    #[test]
    fn a_frame_longer_than_the_device_buffer_is_dropped_and_receive_goes_on() {
        // A tap that cut a frame to the buffer reports its whole length
        // (the socket-pair backend does the same): that frame is dropped
        // and counted, the next ones arrive.
        let m = mem();
        let mut r = rig(None, false);
        let rxq = MockSplitQueue::create(&m, GuestAddress(RXQ), 16);
        let txq = MockSplitQueue::create(&m, GuestAddress(TXQ), 16);
        rxq.add_desc_chains(&[d(BUF, 2048, WRITE, 0), d(BUF2, 2048, WRITE, 0)], 0)
            .unwrap();
        activate(&mut r.net, &m, &rxq, &txq, 0);
        r.peer
            .send(&frame(MAX_FRAME_LEN - VNET_HDR_LEN + 100, 1))
            .unwrap();
        r.peer.send(&frame(100, 2)).unwrap();
        assert_eq!(r.net.process_rx(), RxOutcome::Drained);
        assert_eq!(used(&rxq), vec![(0, 112)]);
        assert_eq!(r.net.metrics().rx_dropped.get(), 1);
        // Receive is not wedged: a later frame gets the next buffer.
        r.peer.send(&frame(60, 3)).unwrap();
        assert_eq!(r.net.process_rx(), RxOutcome::Drained);
        assert_eq!(used(&rxq), vec![(0, 112), (1, 72)]);
    }

    /// A deterministic xorshift, so a failing round can be replayed.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn pick<T: Copy>(&mut self, from: &[T]) -> T {
            from[(self.next() % from.len() as u64) as usize]
        }
    }

    #[test]
    fn rx_and_tx_write_only_the_buffers_they_return() {
        // Hundreds of random rounds of chain shapes (split headers, many
        // small descriptors, chains too short, hostile ones) and frame
        // sizes, with and without EVENT_IDX: after every pass the whole
        // guest memory is compared with a copy taken before it, and every
        // changed byte must lie in a used ring or within the used length
        // of a chain the device returned. The gaps between buffers hold a
        // canary the device never has a reason to write.
        const CANARY: u8 = 0xa5;
        let m = mem();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let lens = [1u32, 7, 12, 13, 64, 500, 1514, 4096, 9000, 65562];
        let frames = [
            0usize,
            1,
            48,
            1000,
            1502,
            4084,
            8988,
            MAX_FRAME_LEN - VNET_HDR_LEN,
        ];
        for round in 0..300 {
            let mut r = rig(None, false);
            let rxq = MockSplitQueue::create(&m, GuestAddress(RXQ), 16);
            let txq = MockSplitQueue::create(&m, GuestAddress(TXQ), 16);
            m.write_slice(&vec![CANARY; MEM_SIZE - BUF as usize], GuestAddress(BUF))
                .unwrap();
            let mut next_buf = BUF;
            let mut buffer = |rng: &mut Rng, len: u32| {
                let a = next_buf;
                next_buf += u64::from(len) + 64 + rng.next() % 64;
                a
            };
            for (q, write) in [(&rxq, WRITE), (&txq, 0)] {
                let mut descs = Vec::new();
                while descs.len() < 12 {
                    let n = 1 + (rng.next() % 4) as usize;
                    let head = descs.len();
                    for k in 0..n {
                        let len = rng.pick(&lens);
                        let mut desc = (buffer(&mut rng, len), len, write);
                        match rng.next() % 24 {
                            0 => desc.2 ^= WRITE,
                            1 => desc.1 = 0,
                            2 => desc.0 = MEM_SIZE as u64 - 4,
                            3 if k > 0 => desc.0 = BUF,
                            _ => {}
                        }
                        let last = k + 1 == n;
                        let (flags, next) = if last {
                            (desc.2, 0)
                        } else {
                            (desc.2 | NEXT, (head + k + 1) as u16)
                        };
                        descs.push(d(desc.0, desc.1, flags, next));
                    }
                }
                if write == 0 {
                    // A frame's worth of bytes for tx chains to carry.
                    for desc in &descs {
                        let desc = virtio_queue::desc::split::Descriptor::from(*desc);
                        let len = desc.len().min(65562) as usize;
                        let _ = m.write_slice(&frame(len, 9)[..len], desc.addr());
                    }
                }
                q.add_desc_chains(&descs, 0).unwrap();
            }
            let features = (rng.next() % 2) << VIRTIO_RING_F_EVENT_IDX;
            activate(&mut r.net, &m, &rxq, &txq, features);
            for _ in 0..1 + rng.next() % 8 {
                let _ = r.peer.send(&frame(rng.pick(&frames), round as u8));
            }
            let layouts = [QueueLayout::of(&rxq, 16), QueueLayout::of(&txq, 16)];
            for _ in 0..3 {
                let audit = WriteAudit::new(&m, &layouts);
                r.net.process_rx();
                r.net.process_tx();
                audit.check(&m);
            }
            assert!(
                used(&rxq).len() + used(&txq).len() > 0,
                "round {round} used nothing"
            );
        }
    }

    #[test]
    fn features_config_space_and_offloads() {
        let mac = MacAddr([2, 0, 0, 0, 0, 9]);
        let r = rig(Some(mac), false);
        let f = r.net.avail_features();
        for bit in [
            VIRTIO_F_VERSION_1,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
        ] {
            assert_ne!(f & (1 << bit), 0, "feature {bit}");
        }
        let mut cfg = [0u8; 8];
        r.net.read_config(0, &mut cfg);
        assert_eq!(cfg, [2, 0, 0, 0, 0, 9, 0, 0]);
        assert_eq!(r.net.device_type(), TYPE_NET);
        assert_eq!(r.net.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);

        // No MAC, no offloads from a backend that refuses them.
        let r = rig(None, true);
        assert_eq!(
            r.net.avail_features(),
            (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX)
        );

        // What the driver acknowledged reaches the tap.
        let m = mem();
        let mut r = rig(None, false);
        let rxq = MockSplitQueue::create(&m, GuestAddress(RXQ), 16);
        let txq = MockSplitQueue::create(&m, GuestAddress(TXQ), 16);
        let acked = (1 << VIRTIO_NET_F_GUEST_CSUM) | (1 << VIRTIO_NET_F_GUEST_TSO4);
        activate(&mut r.net, &m, &rxq, &txq, acked);
        assert_eq!(
            r.backend.0.load(Ordering::SeqCst),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4
        );
        assert_eq!(
            tun_offloads(1 << VIRTIO_NET_F_GUEST_TSO4),
            0,
            "TSO needs CSUM"
        );
    }

    #[test]
    fn wrong_queue_count_is_refused() {
        let m = mem();
        let mut r = rig(None, false);
        let q: Queue = MockSplitQueue::create(&m, GuestAddress(RXQ), 16)
            .create_queue()
            .unwrap();
        assert_eq!(
            r.net.activate(m.clone(), vec![q], 0),
            Err(ActivateError::QueueCount {
                expected: 2,
                got: 1
            })
        );
    }

    #[test]
    fn a_failed_backend_stops_the_interface_without_stalling_the_guest() {
        let m = mem();
        let mut r = rig(None, false);
        let rxq = MockSplitQueue::create(&m, GuestAddress(RXQ), 16);
        let txq = MockSplitQueue::create(&m, GuestAddress(TXQ), 16);
        txq.add_desc_chains(&[d(BUF, 100, 0, 0), d(BUF2, 100, 0, 0)], 0)
            .unwrap();
        activate(&mut r.net, &m, &rxq, &txq, 0);
        r.backend.1.store(true, Ordering::SeqCst);
        assert!(!r.net.process_tx());
        assert!(r.net.backend_gone());
        assert_eq!(used(&txq).len(), 2, "tx chains still complete");
        assert_eq!(r.net.process_rx(), RxOutcome::BackendGone);
    }

    #[test]
    fn reset_drops_the_queues_and_the_waiting_frame() {
        let m = mem();
        let mut r = rig(None, false);
        let rxq = MockSplitQueue::create(&m, GuestAddress(RXQ), 16);
        let txq = MockSplitQueue::create(&m, GuestAddress(TXQ), 16);
        activate(&mut r.net, &m, &rxq, &txq, 0);
        r.peer.send(&frame(60, 1)).unwrap();
        assert_eq!(r.net.process_rx(), RxOutcome::NoBuffers);
        r.net.reset();
        assert!(r.net.process_tx());
        assert_eq!(r.net.process_rx(), RxOutcome::Drained);
    }
}
