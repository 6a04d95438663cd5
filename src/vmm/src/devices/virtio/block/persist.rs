//! A drive in a snapshot: its id, backing file and read-only flag (the
//! disk's contents are the file's business: a snapshot does not copy
//! them), whether it is the root device, the capacity the guest last saw,
//! and its queue's positions.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

use super::device::{Block, State};
use super::BlockConfig;
use crate::devices::virtio::persist::{running_queue, QueueSnapshot};

/// One drive's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// The drive id.
    pub id: String,
    /// The backing file (re-opened on restore).
    pub path: PathBuf,
    /// Whether writes are refused.
    pub read_only: bool,
    /// Whether it is the root device (/dev/vda).
    pub is_root: bool,
    /// The capacity in bytes the guest knows.
    pub capacity: u64,
    /// The running queue, once the driver started the device.
    pub queues: Vec<QueueSnapshot>,
}

impl Block {
    /// The drive's state, for a snapshot.
    pub fn save_state(&self, is_root: bool) -> BlockState {
        let config = self.config();
        BlockState {
            id: config.id.clone(),
            path: config.path.clone(),
            read_only: config.read_only,
            is_root,
            capacity: self.capacity(),
            queues: match &self.state {
                State::Active { queue, .. } => vec![running_queue(queue)],
                State::Inactive => Vec::new(),
            },
        }
    }
}

impl BlockState {
    /// The configuration to open the drive with again.
    pub fn config(&self) -> BlockConfig {
        BlockConfig {
            id: self.id.clone(),
            path: self.path.clone(),
            read_only: self.read_only,
        }
    }
}
