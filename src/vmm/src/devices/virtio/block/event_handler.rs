//! Wires a block device's queue eventfd into the VMM's event loop.

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::device::Block;
use crate::devices::virtio::VirtioDevice;

impl MutEventSubscriber for Block {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // Drain the notification counter first: notifications that arrive
        // while the queue is processed are then not lost.
        let _ = self.queue_events()[0].read();
        self.process_queue();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.queue_events()[0], EventSet::IN)) {
            tracing::error!(drive = %self.config().id, error = ?e, "cannot watch the virtio-blk queue");
        }
    }
}
