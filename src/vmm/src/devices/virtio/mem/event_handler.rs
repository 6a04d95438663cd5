//! Wires the virtio-mem device's queue eventfd into the VMM's event loop.

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::device::Mem;
use crate::devices::virtio::VirtioDevice;

impl MutEventSubscriber for Mem {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // Drain first, so a notification that arrives while the queue is
        // served is not lost.
        let _ = self.queue_events()[0].read();
        self.process_queue();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.queue_events()[0], EventSet::IN)) {
            tracing::error!(error = ?e, "cannot watch the virtio-mem queue");
        }
    }
}
