//! A virtio-fs device in a snapshot: its configuration (id, tag, backend
//! socket, queue count and size) and the queues the driver started it
//! with.
//!
//! The file system itself is not the VMM's: the guest's FUSE session
//! (begun by FUSE_INIT when the guest mounts the tag) and every open file
//! live in the backend process, which a snapshot cannot save. So a device
//! is saved only while the guest has never sent it a request: every ring
//! index still 0 and no reply ever signalled. That is what a template
//! taken before the guest mounts anything looks like. A restored device
//! connects to a backend (the snapshot's socket, or an override),
//! negotiates afresh and, if the driver had started it, hands the backend
//! guest memory and the rings exactly as a DRIVER_OK does.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::device::Fs;
use crate::config::FsConfig;
use crate::devices::virtio::persist::QueueSnapshot;

/// One virtio-fs device's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsState {
    /// The device id.
    pub id: String,
    /// The tag the guest mounts.
    pub tag: String,
    /// The backend's socket at the snapshot (replaceable on load).
    pub socket: PathBuf,
    /// Request queues (besides the high-priority one).
    pub num_queues: u16,
    /// Entries per queue.
    pub queue_size: u16,
    /// The queues as the driver started the device (empty before
    /// DRIVER_OK).
    pub queues: Vec<QueueSnapshot>,
}

/// Why a virtio-fs device cannot be saved.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FsSnapshotError {
    /// The guest sent the device requests (it mounted the tag).
    #[error("the guest has used virtio-fs device {0}: its FUSE session lives in the backend and is not saved")]
    Used(String),
    /// The backend failed or went away.
    #[error("virtio-fs device {0} lost its backend and needs a reset")]
    Broken(String),
}

/// Offset of `idx` in both the available and the used ring (after `flags`).
const RING_IDX_OFFSET: u64 = 2;

impl Fs {
    /// Whether the guest ever gave the backend a request: a started
    /// queue's available or used index moved, or the backend signalled a
    /// used buffer. A ring index that cannot be read counts as used.
    pub fn guest_used(&self, mem: &GuestMemoryMmap) -> bool {
        if self.metrics().interrupts.get() > 0 {
            return true;
        }
        let Some(queues) = &self.started else {
            return false;
        };
        let idx = |ring: u64| {
            ring.checked_add(RING_IDX_OFFSET)
                .and_then(|a| mem.read_obj::<u16>(GuestAddress(a)).ok())
        };
        queues
            .iter()
            .any(|q| idx(q.avail_ring) != Some(0) || idx(q.used_ring) != Some(0))
    }

    /// The device's state, if it can be saved (see the module's doc).
    pub fn save_state(&self, mem: &GuestMemoryMmap) -> Result<FsState, FsSnapshotError> {
        let id = self.config().id.clone();
        if self.broken() {
            return Err(FsSnapshotError::Broken(id));
        }
        if self.guest_used(mem) {
            return Err(FsSnapshotError::Used(id));
        }
        let c = self.config();
        Ok(FsState {
            id,
            tag: c.tag.clone(),
            socket: c.socket.clone(),
            num_queues: c.num_queues,
            queue_size: c.queue_size,
            queues: self.started.clone().unwrap_or_default(),
        })
    }
}

impl FsState {
    /// The configuration to build the device with again.
    pub fn config(&self) -> FsConfig {
        FsConfig {
            id: self.id.clone(),
            tag: self.tag.clone(),
            socket: self.socket.clone(),
            num_queues: self.num_queues,
            queue_size: self.queue_size,
        }
    }
}
