//! The virtio-mem device in a snapshot: its region (where, how large, how
//! it is cut), the size the host requested, and its queue's position.
//!
//! Only a device with nothing plugged is saved, which is what a template
//! VM has: its region then holds nothing the guest may read, no KVM slot
//! maps any of it, and the memory file leaves it out. A restored device
//! gets its region back where a boot puts it (the caller checks that) with
//! every block unplugged, and the guest's driver carries on from there:
//! the host asks for memory with `PATCH /hotplug/memory` as after a boot.

use serde::{Deserialize, Serialize};

use super::device::{Mem, MemRegion};
use crate::devices::virtio::persist::QueueSnapshot;

/// The device's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemState {
    /// The region's guest-physical start.
    pub addr: u64,
    /// The region's size in bytes.
    pub size: u64,
    /// The guest's unit.
    pub block_size: u64,
    /// The host's unit (one KVM slot).
    pub slot_size: u64,
    /// What the host had asked the guest to plug.
    pub requested_size: u64,
    /// The request queue, once the driver started the device.
    pub queues: Vec<QueueSnapshot>,
}

/// Why a virtio-mem device cannot be saved.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MemSnapshotError {
    /// Blocks are plugged: their contents and KVM slots are not saved.
    #[error("the microVM has {} MiB of hot-plugged memory: unplug its hot-plugged memory first (PATCH /hotplug/memory with requested_size_mib 0, until GET /hotplug/memory reports plugged_size_mib 0)", .0 >> 20)]
    Plugged(u64),
}

impl Mem {
    /// The device's state, if nothing is plugged.
    pub fn save_state(&self) -> Result<MemState, MemSnapshotError> {
        let status = self.status();
        if status.plugged_size != 0 {
            return Err(MemSnapshotError::Plugged(status.plugged_size));
        }
        let r = self.region();
        Ok(MemState {
            addr: r.addr,
            size: r.size,
            block_size: r.block_size,
            slot_size: r.slot_size,
            requested_size: status.requested_size,
            queues: self.running_queues(),
        })
    }
}

impl MemState {
    /// The region to build the device with again.
    pub fn region(&self) -> MemRegion {
        MemRegion {
            addr: self.addr,
            size: self.size,
            block_size: self.block_size,
            slot_size: self.slot_size,
        }
    }
}
