//! The vsock device in a snapshot: the guest's CID, the host socket path
//! (replaceable when the snapshot is loaded) and the queues' positions.
//!
//! Streams do not survive a snapshot: their host ends belong to the
//! process that took it. A restored device starts with no streams and
//! tells the guest so with VIRTIO_VSOCK_EVENT_TRANSPORT_RESET on the event
//! queue, as Firecracker does: the guest's driver resets every socket it
//! had (their programs see ECONNRESET) and rereads its CID, and host
//! programs connect again, to the restored guest, through the new socket.
//!
//! Until the guest has taken that reset, nothing goes to it on the rx
//! queue: the driver resets every socket it has when its event work runs,
//! which under nested emulation can be a hundred milliseconds after the
//! vCPUs resumed, so a host connection answered before then would be
//! accepted by the guest and reset right after. The driver handles the
//! event before it posts the buffer back, so the event queue's available
//! index moving on says the reset is done; a guest that never posts one
//! gets its host traffic after [`RESET_GRACE`] all the same.

use serde::{Deserialize, Serialize};
use std::num::Wrapping;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use virtio_queue::QueueT;
use vm_memory::Bytes;

use super::device::Vsock;
use crate::config::VsockConfig;
use crate::devices::virtio::persist::{running_queue, QueueSnapshot};
use crate::devices::virtio::INTERRUPT_USED_RING;

/// struct virtio_vsock_event's only id (virtio 1.2, 5.10.6.8).
pub const VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: u32 = 0;

/// How long host traffic waits for the guest to take a transport reset.
pub const RESET_GRACE: Duration = Duration::from_secs(1);

/// A transport reset sent and not yet taken by the guest.
#[derive(Debug, Clone, Copy)]
pub(super) struct ResetWait {
    /// The event queue's available index once the reset's buffer was taken.
    avail: Wrapping<u16>,
    /// When host traffic goes to the guest regardless.
    until: Instant,
}

/// The device's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    /// The guest's context id.
    pub guest_cid: u32,
    /// The host socket at the snapshot.
    pub uds_path: PathBuf,
    /// The rx, tx and event queues, once the driver started the device.
    pub queues: Vec<QueueSnapshot>,
}

impl Vsock {
    /// The queues' positions, for a snapshot (empty before DRIVER_OK).
    pub fn running_queues(&self) -> Vec<QueueSnapshot> {
        match &self.active {
            Some(a) => vec![
                running_queue(&a.rx),
                running_queue(&a.tx),
                running_queue(&a.event),
            ],
            None => Vec::new(),
        }
    }

    /// Posts VIRTIO_VSOCK_EVENT_TRANSPORT_RESET to the guest and interrupts
    /// it; host traffic then waits until the guest has taken it (see the
    /// module's documentation). Returns false when the driver is not
    /// running or left no event buffer (its sockets then wait for their own
    /// timeouts, and host traffic does not wait).
    pub fn send_transport_reset(&mut self) -> bool {
        let Some(a) = &mut self.active else {
            return false;
        };
        let Some(chain) = a.event.pop_descriptor_chain(&a.mem) else {
            tracing::warn!("vsock: no event buffer for the transport reset");
            return false;
        };
        let head = chain.head_index();
        let event = VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.to_le_bytes();
        let mut written = 0;
        for d in chain {
            if d.is_write_only() && d.len() as usize >= event.len() {
                if a.mem.write_slice(&event, d.addr()).is_ok() {
                    written = event.len() as u32;
                }
                break;
            }
        }
        if let Err(e) = a.event.add_used(&a.mem, head, written) {
            tracing::warn!(error = %e, "vsock: cannot return the event buffer");
            return false;
        }
        match a.event.needs_notification(&a.mem) {
            Ok(false) => {}
            Ok(true) | Err(_) => self.interrupt.trigger(INTERRUPT_USED_RING),
        }
        tracing::debug!(written, "vsock: transport reset sent to the guest");
        if written != 0 {
            if let Ok(avail) = a.event.avail_idx(&a.mem, Ordering::Acquire) {
                self.reset_wait = Some(ResetWait {
                    avail,
                    until: Instant::now() + RESET_GRACE,
                });
            }
        }
        written != 0
    }

    /// Whether rx traffic may go to the guest: no transport reset is
    /// waiting to be taken. Ends the wait once the guest posted an event
    /// buffer again, or [`RESET_GRACE`] passed.
    pub(super) fn reset_taken(&mut self) -> bool {
        let Some(wait) = self.reset_wait else {
            return true;
        };
        // No driver (it reset the device) or an unreadable ring: nothing
        // left to wait for.
        let refilled = self.active.as_ref().is_none_or(|a| {
            !a.event
                .avail_idx(&a.mem, Ordering::Acquire)
                .is_ok_and(|i| i == wait.avail)
        });
        if refilled {
            tracing::debug!("vsock: the guest took the transport reset");
        } else if Instant::now() >= wait.until {
            tracing::debug!(
                grace_ms = RESET_GRACE.as_millis() as u64,
                "vsock: the guest has not taken the transport reset; serving host traffic anyway"
            );
        } else {
            return false;
        }
        self.reset_wait = None;
        true
    }
}

impl VsockState {
    /// The device's state, from its configuration and device.
    pub fn new(config: &VsockConfig, vsock: &Vsock) -> Self {
        VsockState {
            guest_cid: config.guest_cid,
            uds_path: config.uds_path.clone(),
            queues: vsock.running_queues(),
        }
    }

    /// The configuration to build the device with again.
    pub fn config(&self) -> VsockConfig {
        VsockConfig {
            guest_cid: self.guest_cid,
            uds_path: self.uds_path.clone(),
        }
    }
}
