//! virtio 1.x devices on the virtio-mmio transport.
//!
//! A device ([`VirtioDevice`]) owns its queue eventfds and its [`Interrupt`];
//! both are wired to KVM when the VM is built (ioeventfd on the transport's
//! QueueNotify register, irqfd on the device's GSI), so neither a queue
//! notification nor an interrupt passes through a vCPU thread in userspace.
//! The [`mmio::MmioTransport`] sits on the MMIO bus and runs the virtio
//! status/feature/queue handshake; once the driver sets DRIVER_OK it hands
//! the validated queues to the device, whose event handler (an event-manager
//! subscriber on the VMM's event loop) processes them from then on.

pub mod block;
pub mod chain;
pub mod fs;
pub mod mem;
pub mod mmio;
pub mod net;
pub mod persist;
#[cfg(test)]
pub(crate) mod test_utils;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};

use crate::error::Chain;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Device status bits (virtio 1.1, 2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready to drive it.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 128;
}

/// VIRTIO_F_VERSION_1: husk offers only modern (1.x) devices.
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// VIRTIO_RING_F_EVENT_IDX: driver and device say, in the rings' spare
/// words, which index they next want to hear about, so a busy queue is
/// notified once per batch instead of once per buffer. A device that offers
/// it must re-arm notifications (`enable_notification`) before it waits, or
/// the driver stops kicking; the transport turns it on in the queues it
/// hands over when the driver accepted it.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;

/// What a device does when its queue ran dry: turn the driver's
/// notifications back on, then look once more, since the driver may have
/// published buffers just before it saw them on (the honest race).
///
/// A driver whose avail index runs more than a queue ahead makes
/// `enable_notification` report buffers that virtio-queue refuses to pop;
/// looking again and again would spin the event loop for good. So after
/// two looks in a row found nothing, the device waits for the next
/// notification instead (`Ok(false)`), whatever the ring claims.
#[derive(Debug, Default)]
pub struct Rearm {
    empty_looks: u8,
}

impl Rearm {
    /// The last look found something: the next empty one is a fresh race.
    pub fn served(&mut self) {
        self.empty_looks = 0;
    }

    /// The last look found nothing: re-arms notifications; `Ok(true)` to
    /// look once more, `Ok(false)` to wait for the driver's next
    /// notification.
    pub fn rearm(
        &mut self,
        queue: &mut virtio_queue::Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, virtio_queue::Error> {
        use virtio_queue::QueueT;
        self.empty_looks = self.empty_looks.saturating_add(1);
        let more = queue.enable_notification(mem)?;
        if more && self.empty_looks >= 2 {
            tracing::debug!("the avail ring announces buffers that cannot be popped");
            return Ok(false);
        }
        Ok(more)
    }
}

/// Tells a queue notification that was lost from one that is merely
/// still to come. A driver notifies within moments of making buffers
/// available (unless the device asked it not to, which husk's devices do
/// only while they are draining the queue), so buffers that were waiting
/// at one tick of a device's once-a-second timer, with none taken since,
/// waited a whole period for a notification that never came: that is a
/// lost notification, and only then does the timer serve the queue.
/// Buffers found at a single tick prove nothing (under load the driver is
/// often between adding them and its one notification), and serving them
/// there would hide whether notifications are lost at all.
#[derive(Debug, Default)]
pub struct StaleQueue {
    /// Chains the device has taken from the queue.
    taken: u64,
    /// How many chains had been taken when the timer last saw buffers
    /// waiting.
    waiting_at: Option<u64>,
}

impl StaleQueue {
    /// The device took a chain from the queue.
    pub fn took(&mut self) {
        self.taken += 1;
    }

    /// One tick: `waiting` says whether the queue holds buffers the device
    /// has not taken. True when the queue should be served now (and
    /// counted as a lost notification).
    pub fn tick(&mut self, waiting: bool) -> bool {
        if !waiting {
            self.waiting_at = None;
            return false;
        }
        if self.waiting_at == Some(self.taken) {
            self.waiting_at = None;
            return true;
        }
        self.waiting_at = Some(self.taken);
        false
    }
}

/// Whether the driver has made buffers available that the device has not
/// taken (false when the ring cannot be read).
pub fn has_waiting(queue: &virtio_queue::Queue, mem: &GuestMemoryMmap) -> bool {
    use virtio_queue::QueueT;
    queue
        .avail_idx(mem, Ordering::Acquire)
        .is_ok_and(|idx| idx.0 != queue.next_avail())
}

/// Interrupt status bit: a used ring was updated.
pub const INTERRUPT_USED_RING: u32 = 1;
/// Interrupt status bit: the configuration space changed.
pub const INTERRUPT_CONFIG: u32 = 2;

/// A device's interrupt line: the status the driver reads from the
/// transport, and the irqfd that raises the device's GSI.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    /// A new line; register [`Interrupt::irqfd`] with KVM.
    pub fn new() -> std::io::Result<Self> {
        Ok(Interrupt {
            status: AtomicU32::new(0),
            irqfd: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Sets `kind` in the interrupt status and raises the interrupt.
    pub fn trigger(&self, kind: u32) {
        self.status.fetch_or(kind, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            tracing::error!(error = %Chain(&e), "cannot raise a virtio interrupt");
        }
    }

    /// The interrupt status register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The driver acknowledges the bits in `mask`.
    pub fn ack(&self, mask: u32) {
        self.status.fetch_and(!mask, Ordering::SeqCst);
    }

    /// The eventfd KVM turns into the device's interrupt.
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }
}

/// Why a device could not be activated.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ActivateError {
    /// The driver set up a different number of queues than the device has.
    #[error("expected {expected} queues, the driver set up {got}")]
    QueueCount {
        /// Queues the device has.
        expected: usize,
        /// Queues the driver made ready.
        got: usize,
    },
}

/// A virtio device, seen from its transport.
pub trait VirtioDevice: Send {
    /// The virtio device id (2: block, 1: net, 19: vsock, 24: memory, 26: fs).
    fn device_type(&self) -> u32;
    /// The maximum size of each queue.
    fn queue_max_sizes(&self) -> &[u16];
    /// The feature bits the device offers.
    fn avail_features(&self) -> u64;
    /// The eventfd for each queue, signalled by KVM on QueueNotify.
    fn queue_events(&self) -> &[EventFd];
    /// The device's interrupt.
    fn interrupt(&self) -> &Interrupt;
    /// Reads the device configuration space at `offset`; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration space (most devices ignore this).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the queues the driver set up.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<virtio_queue::Queue>,
        acked_features: u64,
    ) -> Result<(), ActivateError>;
    /// Returns the device to its initial state (the driver wrote 0 to status).
    fn reset(&mut self);
    /// Whether the device failed on its own (a backend went away) and the
    /// driver must reset it: the transport shows DEVICE_NEEDS_RESET.
    fn needs_reset(&self) -> bool {
        false
    }
}

/// Copies `config[offset..]` into `data`, zero-filling what lies past the end.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rearm_looks_once_more_then_waits_on_a_broken_ring() {
        use test_utils::{hand_laid_queue, mem};
        use vm_memory::{Bytes, GuestAddress};
        for event_idx in [false, true] {
            let m = mem();
            let mut q = hand_laid_queue(16, 0x1000, 0x2000, event_idx);
            let mut rearm = Rearm::default();
            // An empty, well-formed ring: nothing to look for.
            assert!(!rearm.rearm(&mut q, &m).unwrap());
            // The honest race: the driver published a request meanwhile.
            rearm.served();
            m.write_obj(1u16, GuestAddress(0x1000 + 2)).unwrap();
            assert!(rearm.rearm(&mut q, &m).unwrap(), "event_idx {event_idx}");
            // An index 40 ahead in a queue of 16: nothing can be popped, so
            // a second empty look in a row waits, whatever the ring says.
            m.write_obj(40u16, GuestAddress(0x1000 + 2)).unwrap();
            assert!(!rearm.rearm(&mut q, &m).unwrap(), "event_idx {event_idx}");
            // Something served in between: the next empty look is a race
            // again.
            rearm.served();
            assert!(rearm.rearm(&mut q, &m).unwrap(), "event_idx {event_idx}");
        }
    }

    #[test]
    fn only_buffers_left_waiting_a_whole_tick_are_a_lost_notification() {
        let mut s = StaleQueue::default();
        // Nothing waiting: never stale.
        assert!(!s.tick(false));
        assert!(!s.tick(false));
        // Seen waiting once: perhaps the notification is on its way.
        assert!(!s.tick(true));
        // Taken meanwhile (a notification came), and more waiting: a new
        // wait, not a stale one.
        (0..5).for_each(|_| s.took());
        assert!(!s.tick(true));
        // Still waiting with nothing taken for a whole tick: lost.
        assert!(s.tick(true));
        // Served: the next look starts afresh.
        assert!(!s.tick(true));
        assert!(s.tick(true));
        // Emptied in between forgets the wait.
        (0..4).for_each(|_| s.took());
        assert!(!s.tick(true));
        assert!(!s.tick(false));
        assert!(!s.tick(true));
    }

    #[test]
    fn waiting_buffers_are_the_avail_index_ahead_of_the_device() {
        use test_utils::{hand_laid_queue, mem};
        use vm_memory::{Bytes, GuestAddress};
        let m = mem();
        let q = hand_laid_queue(16, 0x1000, 0x2000, true);
        assert!(!has_waiting(&q, &m));
        m.write_obj(1u16, GuestAddress(0x1000 + 2)).unwrap();
        assert!(has_waiting(&q, &m));
    }

    #[test]
    fn interrupt_status_and_ack() {
        let i = Interrupt::new().unwrap();
        i.trigger(INTERRUPT_USED_RING);
        i.trigger(INTERRUPT_CONFIG);
        assert_eq!(i.status(), 3);
        assert_eq!(i.irqfd().read().unwrap(), 2);
        i.ack(INTERRUPT_USED_RING);
        assert_eq!(i.status(), INTERRUPT_CONFIG);
    }

    #[test]
    fn config_reads_are_bounded() {
        let cfg = [1u8, 2, 3, 4];
        let mut d = [9u8; 4];
        read_config_bytes(&cfg, 2, &mut d);
        assert_eq!(d, [3, 4, 0, 0]);
        read_config_bytes(&cfg, 100, &mut d);
        assert_eq!(d, [0; 4]);
        read_config_bytes(&cfg, u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
    }
}
