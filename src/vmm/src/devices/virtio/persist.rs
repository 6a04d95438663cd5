//! The virtio-mmio transport's state in a snapshot: the registers the
//! driver wrote (status, feature selection and acknowledgement, selected
//! queue, configuration generation, interrupt status) and each queue's
//! configuration; and each running queue's positions, which live in the
//! device (see each device's `persist` module).
//!
//! A restored transport has its registers back; if the driver had started
//! the device, the device is started again through
//! [`super::VirtioDevice::activate`] with queues rebuilt from the snapshot, the
//! same path a driver's DRIVER_OK takes, so each device rewires itself
//! (offloads, event-loop wake-ups) as it does at boot.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

use super::mmio::MmioTransport;
use super::status;

/// One queue in a snapshot: its configuration and, for a running queue,
/// where the device stood in its rings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// The device's maximum size.
    pub max_size: u16,
    /// The size the driver chose.
    pub size: u16,
    /// Whether the driver marked it ready.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
    /// The next available-ring entry the device will read.
    pub next_avail: u16,
    /// The next used-ring entry the device will write.
    pub next_used: u16,
    /// Whether VIRTIO_RING_F_EVENT_IDX is in use.
    pub event_idx: bool,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        QueueSnapshot {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx: q.event_idx_enabled,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(q: QueueSnapshot) -> Self {
        QueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// The snapshot of a queue the device runs.
pub fn running_queue(q: &Queue) -> QueueSnapshot {
    QueueSnapshot::from(q.state())
}

/// The transport's registers in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    /// The device status register.
    pub device_status: u32,
    /// DeviceFeaturesSel.
    pub features_select: u32,
    /// DriverFeaturesSel.
    pub acked_features_select: u32,
    /// The features the driver accepted.
    pub acked_features: u64,
    /// QueueSel.
    pub queue_select: u32,
    /// Each queue's configuration as the driver wrote it.
    pub queues: Vec<QueueSnapshot>,
    /// Queues given a size the device cannot use.
    pub bad_size: Vec<bool>,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// Whether the device was started.
    pub activated: bool,
    /// InterruptStatus.
    pub interrupt_status: u32,
}

/// Why a transport cannot be restored.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TransportRestoreError {
    /// The snapshot has another number of queues than the device.
    #[error("the snapshot has {found} queues for a device with {expected}")]
    QueueCount {
        /// The device's queues.
        expected: usize,
        /// The snapshot's.
        found: usize,
    },
    /// The driver acknowledged features the device does not offer.
    #[error("the snapshot acknowledges features {0:#x} the device does not offer")]
    Features(u64),
    /// A running queue does not fit guest memory or the device.
    #[error("queue {0} of the snapshot is not a valid queue in this guest's memory")]
    Queue(usize),
    /// The device refused to start with the snapshot's queues.
    #[error("the device cannot be started with the snapshot's queues")]
    Activate(#[source] super::ActivateError),
}

/// A queue's register view, as the driver's writes would have left it.
fn register_view(q: &QueueSnapshot, max_size: u16) -> Option<Queue> {
    let mut queue = Queue::new(max_size).ok()?;
    queue.set_size(q.size);
    queue.set_ready(q.ready);
    queue.set_desc_table_address(Some(q.desc_table as u32), Some((q.desc_table >> 32) as u32));
    queue.set_avail_ring_address(Some(q.avail_ring as u32), Some((q.avail_ring >> 32) as u32));
    queue.set_used_ring_address(Some(q.used_ring as u32), Some((q.used_ring >> 32) as u32));
    Some(queue)
}

impl MmioTransport {
    /// The transport's registers, for a snapshot.
    pub fn save_state(&self) -> TransportState {
        TransportState {
            device_status: self.device_status,
            features_select: self.features_select,
            acked_features_select: self.acked_features_select,
            acked_features: self.acked_features,
            queue_select: self.queue_select,
            queues: self
                .queues
                .iter()
                .map(|q| QueueSnapshot::from(q.state()))
                .collect(),
            bad_size: self.bad_size.clone(),
            config_generation: self.config_generation,
            activated: self.activated,
            interrupt_status: self.device().interrupt().status(),
        }
    }

    /// Puts the registers back and, if the driver had started the device,
    /// starts it with `running` (the device's queues at the snapshot, in
    /// order). Call it before any vCPU runs, after the device's interrupt
    /// and queue notifications are wired to KVM.
    pub fn restore_state(
        &mut self,
        state: &TransportState,
        running: &[QueueSnapshot],
    ) -> Result<(), TransportRestoreError> {
        let max_sizes = self.device().queue_max_sizes().to_vec();
        if state.queues.len() != max_sizes.len() || state.bad_size.len() != max_sizes.len() {
            return Err(TransportRestoreError::QueueCount {
                expected: max_sizes.len(),
                found: state.queues.len(),
            });
        }
        let extra = state.acked_features & !self.device().avail_features();
        if extra != 0 {
            return Err(TransportRestoreError::Features(extra));
        }
        self.queues = state
            .queues
            .iter()
            .zip(&max_sizes)
            .enumerate()
            .map(|(i, (q, max))| register_view(q, *max).ok_or(TransportRestoreError::Queue(i)))
            .collect::<Result<_, _>>()?;
        self.bad_size = state.bad_size.clone();
        self.device_status = state.device_status;
        self.features_select = state.features_select;
        self.acked_features_select = state.acked_features_select;
        self.acked_features = state.acked_features;
        self.queue_select = state.queue_select;
        self.config_generation = state.config_generation;
        self.activated = false;
        if state.activated && state.device_status & status::DRIVER_OK != 0 {
            if running.len() != max_sizes.len() {
                return Err(TransportRestoreError::QueueCount {
                    expected: max_sizes.len(),
                    found: running.len(),
                });
            }
            let mut queues = Vec::with_capacity(running.len());
            for (i, (q, max)) in running.iter().zip(&max_sizes).enumerate() {
                let mut s = QueueState::from(*q);
                s.max_size = *max;
                let queue = Queue::try_from(s).map_err(|_| TransportRestoreError::Queue(i))?;
                if !queue.is_valid(&self.mem) {
                    return Err(TransportRestoreError::Queue(i));
                }
                queues.push(queue);
            }
            let mem = self.mem.clone();
            let features = self.acked_features;
            self.device()
                .activate(mem, queues, features)
                .map_err(TransportRestoreError::Activate)?;
            self.activated = true;
        }
        Ok(())
    }

    /// Raises the device's interrupt with `bits` in its status. After a
    /// restore, the interrupt the driver had not acknowledged is raised
    /// once more this way (a spurious one costs the driver a look at its
    /// rings), but only once the vCPUs' local APICs are restored: an
    /// interrupt delivered before that would be overwritten.
    pub fn raise_interrupt(&self, bits: u32) {
        if bits != 0 {
            self.device().interrupt().trigger(bits);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::mmio::tests::{handshake, mem, Dummy};
    use crate::devices::virtio::VirtioDevice;
    use std::sync::{Arc, Mutex};

    #[test]
    fn a_started_transport_round_trips_and_restarts_its_device() {
        let d = Arc::new(Mutex::new(Dummy::new(2)));
        let mut t = MmioTransport::new(mem(), d.clone());
        handshake(&mut t, 2);
        t.notify_config_change();
        let state = t.save_state();
        assert!(state.activated);
        assert_eq!(state.config_generation, 1);
        let running: Vec<QueueSnapshot> = state
            .queues
            .iter()
            .map(|q| QueueSnapshot {
                next_avail: 3,
                next_used: 3,
                ..*q
            })
            .collect();
        let json = serde_json::to_string(&state).unwrap();
        let state: TransportState = serde_json::from_str(&json).unwrap();

        let d2 = Arc::new(Mutex::new(Dummy::new(2)));
        let mut t2 = MmioTransport::new(mem(), d2.clone());
        t2.restore_state(&state, &running).unwrap();
        assert!(t2.is_activated());
        t2.raise_interrupt(state.interrupt_status);
        assert_eq!(t2.save_state(), state);
        assert_eq!(
            d2.lock().unwrap().activated_with,
            Some((2, state.acked_features))
        );
        // The unacknowledged config interrupt is raised again.
        assert_ne!(d2.lock().unwrap().interrupt().irqfd().read().unwrap(), 0);
    }

    #[test]
    fn snapshots_that_do_not_fit_the_device_are_refused() {
        let d = Arc::new(Mutex::new(Dummy::new(2)));
        let mut t = MmioTransport::new(mem(), d);
        handshake(&mut t, 2);
        let state = t.save_state();
        let running = state.queues.clone();
        let fresh = || MmioTransport::new(mem(), Arc::new(Mutex::new(Dummy::new(2))));

        let mut one_queue = state.clone();
        one_queue.queues.pop();
        assert!(matches!(
            fresh().restore_state(&one_queue, &running),
            Err(TransportRestoreError::QueueCount { .. })
        ));
        let mut greedy = state.clone();
        greedy.acked_features |= 1 << 40;
        assert_eq!(
            fresh().restore_state(&greedy, &running),
            Err(TransportRestoreError::Features(1 << 40))
        );
        let mut outside = running.clone();
        outside[1].desc_table = 0xffff_ffff_0000;
        assert_eq!(
            fresh().restore_state(&state, &outside),
            Err(TransportRestoreError::Queue(1))
        );
        let mut odd = running;
        odd[0].size = 3;
        assert_eq!(
            fresh().restore_state(&state, &odd),
            Err(TransportRestoreError::Queue(0))
        );
    }
}
