//! The virtio-vsock device (type 19): three queues (rx, tx, event), a
//! configuration space holding the guest's CID, and the glue between the
//! queues and the [`Muxer`].
//!
//! Tx chains are checked and decoded by `packet`, handed to the muxer and
//! returned at once (used length 0); a chain that fails the checks is
//! returned unread. Rx chains are only taken from the ring when the muxer
//! has a packet for them, so a guest without rx buffers simply stops host
//! reads until it posts some (its notification wakes the device). Each
//! pass takes at most [`BUDGET`] chains from a queue, so a guest that keeps
//! its ring topped up cannot hold the event loop (and with it the API and
//! the other devices) for more than a queue's worth at a time.

use std::path::PathBuf;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::muxer::{Muxer, MuxerError};
use super::packet::{op, Buffers, HDR_SIZE, MAX_PAYLOAD, MAX_TX_CHAIN};
use super::{EVENT_QUEUE, QUEUE_SIZE, RX_QUEUE, TX_QUEUE, TYPE_VSOCK};
use crate::devices::virtio::chain;
use crate::devices::virtio::{
    has_waiting, read_config_bytes, ActivateError, Interrupt, Rearm, StaleQueue, VirtioDevice,
    INTERRUPT_USED_RING, VIRTIO_F_VERSION_1,
};
use crate::log_limit::LogLimiter;

/// Chains taken from a queue per call: a queue's worth per turn of the
/// event loop, as for virtio-blk and virtio-net.
pub const BUDGET: usize = QUEUE_SIZE as usize;

pub use crate::config::VsockConfig;
use crate::error::Chain;

/// Errors setting up the device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The host socket cannot be set up.
    #[error(transparent)]
    Muxer(#[from] MuxerError),
    /// Somebody listens on `uds_path` (another VMM, most likely).
    #[error("vsock socket {0} is in use: something listens on it")]
    PathInUse(PathBuf),
    /// `uds_path` exists and is not a socket.
    #[error("vsock socket path {0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// An eventfd or the timer could not be created.
    #[error("cannot create vsock eventfds")]
    EventFd(#[source] std::io::Error),
}

pub(super) struct Active {
    pub(super) mem: GuestMemoryMmap,
    pub(super) rx: Queue,
    pub(super) tx: Queue,
    // The driver's event buffers: husk posts one event, the transport
    // reset after a restore (see persist.rs).
    pub(super) event: Queue,
}

/// A virtio-vsock device.
pub struct Vsock {
    cid: u64,
    queue_sizes: [u16; 3],
    queue_events: [EventFd; 3],
    pub(super) interrupt: Interrupt,
    wake: EventFd,
    /// Ticks once a second, to expire unanswered REQUESTs (and to find a
    /// tx queue whose notification was lost).
    timer: vmm_sys_util::timerfd::TimerFd,
    /// The timer's watch on the tx queue.
    tx_stale: StaleQueue,
    pub(super) muxer: Muxer,
    pub(super) active: Option<Active>,
    tx_payload: Vec<u8>,
    metrics: std::sync::Arc<crate::metrics::VsockMetrics>,
    /// Warnings the guest can cause at will (a bad used-ring entry).
    guest_log: LogLimiter,
    /// After a restore: the transport reset the guest has not taken yet,
    /// which holds rx traffic back (see persist.rs).
    pub(super) reset_wait: Option<super::persist::ResetWait>,
}

/// Removes a socket file left behind by a VMM that is gone; refuses any
/// other existing file, and a socket somebody still listens on.
fn clear_stale_socket(path: &std::path::Path) -> Result<(), VsockError> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    let in_use = || VsockError::PathInUse(path.to_path_buf());
    if !meta.file_type().is_socket() {
        return Err(VsockError::NotASocket(path.to_path_buf()));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(in_use()),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            tracing::info!(path = %path.display(), "removing a stale vsock socket");
            std::fs::remove_file(path).map_err(|_| in_use())
        }
        Err(_) => Err(in_use()),
    }
}

impl Vsock {
    /// Listens on `config.uds_path` and builds the device.
    pub fn new(config: &VsockConfig) -> Result<Self, VsockError> {
        clear_stale_socket(&config.uds_path)?;
        let evt = || EventFd::new(EFD_NONBLOCK).map_err(VsockError::EventFd);
        let metrics = std::sync::Arc::new(crate::metrics::VsockMetrics::default());
        Ok(Vsock {
            cid: u64::from(config.guest_cid),
            queue_sizes: [QUEUE_SIZE; 3],
            queue_events: [evt()?, evt()?, evt()?],
            interrupt: Interrupt::new().map_err(VsockError::EventFd)?,
            wake: evt()?,
            timer: {
                let os = |e: vmm_sys_util::errno::Error| {
                    VsockError::EventFd(std::io::Error::from_raw_os_error(e.errno()))
                };
                let mut t = vmm_sys_util::timerfd::TimerFd::new().map_err(os)?;
                let second = std::time::Duration::from_secs(1);
                t.reset(second, Some(second)).map_err(os)?;
                t
            },
            muxer: Muxer::new(
                u64::from(config.guest_cid),
                config.uds_path.clone(),
                metrics.clone(),
            )?,
            active: None,
            tx_stale: StaleQueue::default(),
            tx_payload: vec![0u8; MAX_PAYLOAD],
            metrics,
            guest_log: LogLimiter::default(),
            reset_wait: None,
        })
    }

    /// The device's counters.
    pub fn metrics(&self) -> std::sync::Arc<crate::metrics::VsockMetrics> {
        self.metrics.clone()
    }

    /// The guest's context id.
    pub fn cid(&self) -> u64 {
        self.cid
    }

    /// Signalled when the device needs the event loop outside a queue or
    /// socket event (activation, reset).
    pub fn wake_event(&self) -> &EventFd {
        &self.wake
    }

    /// The periodic timer (always armed, so reading it after the event
    /// loop reported it readable never blocks).
    pub fn timer(&mut self) -> &mut vmm_sys_util::timerfd::TimerFd {
        &mut self.timer
    }

    /// The host-side multiplexer.
    pub fn muxer(&self) -> &Muxer {
        &self.muxer
    }

    fn notify(queue: &mut Queue, mem: &GuestMemoryMmap, interrupt: &Interrupt) {
        match queue.needs_notification(mem) {
            Ok(false) => {}
            Ok(true) | Err(_) => interrupt.trigger(INTERRUPT_USED_RING),
        }
    }

    /// Once a tick of the timer: counts in `tx_found_by_timer`, and logs,
    /// tx packets that waited a whole tick without a notification (see
    /// [`StaleQueue`]): a lost notification, which stalls the streams
    /// until the next one. Until December 2026 the timer also served them
    /// and raised the used-ring interrupt every second while streams were
    /// open; it found nothing to serve in over a thousand soak creations
    /// and every test run since it counted, and did not cure the rare
    /// guest-side stall, so it no longer hides a loss (issue 22).
    pub fn watch_tx(&mut self) {
        let waiting = self
            .active
            .as_ref()
            .is_some_and(|a| has_waiting(&a.tx, &a.mem));
        if self.tx_stale.tick(waiting) {
            self.metrics.tx_found_by_timer.inc();
            crate::limited!(
                self.guest_log,
                warn,
                "vsock: tx packets waited a whole second without a notification: a lost queue notification"
            );
        }
    }

    /// Serves the packets the guest has queued for sending, at most
    /// [`BUDGET`] chains: a guest that keeps its ring topped up gets a
    /// queue's worth per turn of the event loop, then the device notifies
    /// itself and the API and the other devices have their turn first.
    /// While it drains the queue the driver is asked not to notify;
    /// notifications are re-armed before it waits again, and what slipped
    /// in meanwhile is served first. Returns how many chains it took.
    pub fn process_tx(&mut self) -> usize {
        let Some(a) = &mut self.active else { return 0 };
        let mut taken = 0;
        let mut returned = false;
        let mut rearm = Rearm::default();
        if let Err(e) = a.tx.disable_notification(&a.mem) {
            tracing::debug!(error = %e, "cannot suppress vsock tx notifications");
        }
        loop {
            if taken == BUDGET {
                // Notifications stay off; this brings the loop back.
                let _ = self.queue_events[TX_QUEUE].write(1);
                self.metrics.tx_budget_spent.inc();
                break;
            }
            let Some(chain) = chain::pop(&mut a.tx, &a.mem) else {
                match rearm.rearm(&mut a.tx, &a.mem) {
                    Ok(true) => {
                        if let Err(e) = a.tx.disable_notification(&a.mem) {
                            tracing::debug!(error = %e, "cannot suppress vsock tx notifications");
                        }
                        continue;
                    }
                    Ok(false) => break,
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot re-arm vsock tx notifications");
                        break;
                    }
                }
            };
            rearm.served();
            taken += 1;
            self.tx_stale.took();
            let head = chain.head_index();
            let packet = Buffers::from_chain(chain, &a.mem, false, MAX_TX_CHAIN).and_then(|b| {
                let hdr = b.tx_header(&a.mem)?;
                let len = if hdr.op == op::RW {
                    hdr.len as usize
                } else {
                    0
                };
                let payload = self
                    .tx_payload
                    .get_mut(..len)
                    .ok_or(super::packet::PacketError::PayloadTooLarge(hdr.len))?;
                b.read_at(&a.mem, HDR_SIZE, payload)?;
                Ok((hdr, len))
            });
            match packet {
                Ok((hdr, len)) => {
                    tracing::trace!(?hdr, "vsock tx");
                    self.metrics.tx_packets.inc();
                    self.metrics.tx_bytes.add(len as u64);
                    self.muxer
                        .guest_packet(&hdr, self.tx_payload.get(..len).unwrap_or(&[]));
                }
                Err(e) => {
                    self.metrics.invalid_chains.inc();
                    tracing::debug!(error = %Chain(&e), "bad vsock tx chain");
                }
            }
            match a.tx.add_used(&a.mem, head, 0) {
                Ok(()) => returned = true,
                // A head index outside the queue: the guest's doing.
                Err(e) => {
                    crate::limited!(self.guest_log, warn, error = %Chain(&e), "cannot return a vsock tx buffer")
                }
            }
        }
        if returned {
            Self::notify(&mut a.tx, &a.mem, &self.interrupt);
        }
        taken
    }

    /// Fills the guest's rx buffers with what the muxer has for it, at most
    /// [`BUDGET`] of them per call (the rest on the loop's next turn, which
    /// the wake eventfd brings). Nothing goes while a transport reset
    /// waits to be taken: the guest's event-queue notification or the
    /// timer brings this back.
    pub fn process_rx(&mut self) {
        if !self.reset_taken() {
            return;
        }
        let Some(a) = &mut self.active else { return };
        let mut used = false;
        let mut taken = 0;
        while self.muxer.has_rx_work() {
            if taken == BUDGET {
                let _ = self.wake.write(1);
                break;
            }
            let Some(chain) = chain::pop(&mut a.rx, &a.mem) else {
                break;
            };
            taken += 1;
            let head = chain.head_index();
            let written = match Buffers::from_chain(chain, &a.mem, true, u32::MAX) {
                Ok(b) if b.len() as usize >= HDR_SIZE => {
                    let room = b.len() as usize - HDR_SIZE;
                    let Some(hdr) = self.muxer.next_rx(room) else {
                        // Nothing after all: leave the buffer to the guest.
                        a.rx.go_to_previous_position();
                        break;
                    };
                    tracing::trace!(?hdr, "vsock rx");
                    let n = b
                        .write_packet(&a.mem, &hdr, self.muxer.payload(hdr.len))
                        .unwrap_or_else(|e| {
                            tracing::debug!(error = %Chain(&e), "vsock rx write failed");
                            0
                        });
                    self.metrics.rx_packets.inc();
                    self.metrics.rx_bytes.add(u64::from(n));
                    n
                }
                Ok(_) => {
                    self.metrics.invalid_chains.inc();
                    tracing::debug!("vsock rx chain shorter than a header");
                    0
                }
                Err(e) => {
                    self.metrics.invalid_chains.inc();
                    tracing::debug!(error = %Chain(&e), "bad vsock rx chain");
                    0
                }
            };
            if let Err(e) = a.rx.add_used(&a.mem, head, written) {
                crate::limited!(self.guest_log, warn, error = %Chain(&e), "cannot return a vsock rx buffer");
                break;
            }
            used = true;
        }
        if used {
            Self::notify(&mut a.rx, &a.mem, &self.interrupt);
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        1u64 << VIRTIO_F_VERSION_1
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn interrupt(&self) -> &Interrupt {
        &self.interrupt
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!(offset, "virtio-vsock config write ignored");
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        _acked_features: u64,
    ) -> Result<(), ActivateError> {
        let got = queues.len();
        let mut it = queues.into_iter();
        let (Some(rx), Some(tx), Some(event), 3) = (it.next(), it.next(), it.next(), got) else {
            return Err(ActivateError::QueueCount { expected: 3, got });
        };
        let _ = (RX_QUEUE, TX_QUEUE, EVENT_QUEUE);
        self.active = Some(Active { mem, rx, tx, event });
        // Host connections that waited for the driver, and whatever the
        // driver queued for sending before (a restored guest's), are
        // served from the event loop, not from this vCPU thread.
        let _ = self.wake.write(1);
        let _ = self.queue_events[TX_QUEUE].write(1);
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.reset_wait = None;
        self.muxer.reset();
        let _ = self.wake.write(1);
    }
}
