//! The vsock device in a snapshot: the guest's CID, the host socket path
//! (replaceable when the snapshot is loaded) and the queues' positions.
//!
//! Streams do not survive a snapshot: their host ends belong to the
//! process that took it. A restored device starts with no streams and
//! tells the guest so with VIRTIO_VSOCK_EVENT_TRANSPORT_RESET on the event
//! queue, as Firecracker does: the guest's driver resets every socket it
//! had (their programs see ECONNRESET) and rereads its CID, and host
//! programs connect again, to the restored guest, through the new socket.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use virtio_queue::QueueT;
use vm_memory::Bytes;

use super::device::Vsock;
use crate::config::VsockConfig;
use crate::devices::virtio::persist::{running_queue, QueueSnapshot};
use crate::devices::virtio::INTERRUPT_USED_RING;

/// struct virtio_vsock_event's only id (virtio 1.2, 5.10.6.8).
pub const VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: u32 = 0;

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
    /// it. Returns false when the driver is not running or left no event
    /// buffer (its sockets then wait for their own timeouts).
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
        written != 0
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
