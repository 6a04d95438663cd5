//! A network interface in a snapshot: its id, the tap it was attached to
//! and its MAC (either can be replaced when the snapshot is loaded: a
//! clone needs a tap of its own), and its queues' positions. Frames in
//! flight are not saved; the restored device opens its tap afresh and
//! sets the offloads the driver negotiated on it.

use serde::{Deserialize, Serialize};

use super::device::{Net, State};
use super::MacAddr;
use crate::config::NetConfig;
use crate::devices::virtio::persist::{running_queue, QueueSnapshot};

/// One interface's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// The interface id.
    pub id: String,
    /// The host tap it was attached to.
    pub host_dev_name: String,
    /// The MAC in its configuration space, if it offered one.
    pub guest_mac: Option<[u8; 6]>,
    /// The rx and tx queues, once the driver started the device.
    pub queues: Vec<QueueSnapshot>,
}

impl Net {
    /// The queues' positions, for a snapshot (empty before DRIVER_OK).
    pub fn running_queues(&self) -> Vec<QueueSnapshot> {
        match &self.state {
            State::Active { rx, tx, .. } => vec![running_queue(rx), running_queue(tx)],
            State::Inactive => Vec::new(),
        }
    }
}

impl NetState {
    /// The interface's state, from its configuration and device.
    pub fn new(config: &NetConfig, net: &Net) -> Self {
        NetState {
            id: config.id.clone(),
            host_dev_name: config.host_dev_name.clone(),
            guest_mac: config.guest_mac.map(|m| m.0),
            queues: net.running_queues(),
        }
    }

    /// The configuration to attach the interface with again.
    pub fn config(&self) -> NetConfig {
        NetConfig {
            id: self.id.clone(),
            host_dev_name: self.host_dev_name.clone(),
            guest_mac: self.guest_mac.map(MacAddr),
        }
    }
}
