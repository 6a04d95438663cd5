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
        tracing::trace!(drive = %self.config().id, "virtio-blk queue notified");
        self.process_queue();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.queue_events()[0], EventSet::IN)) {
            tracing::error!(drive = %self.config().id, error = ?e, "cannot watch the virtio-blk queue");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::BlockConfig;
    use event_manager::{EventManager, SubscriberOps};
    use std::sync::{Arc, Mutex};

    #[test]
    fn a_queue_notification_reaches_the_device() {
        let path = std::env::temp_dir().join(format!("husk-evh-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let block = Arc::new(Mutex::new(
            Block::new(BlockConfig {
                id: "d".into(),
                path: path.clone(),
                read_only: false,
            })
            .unwrap(),
        ));
        let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
        em.add_subscriber(block.clone());
        block.lock().unwrap().queue_events()[0].write(1).unwrap();
        assert_eq!(em.run_with_timeout(1000).unwrap(), 1);
        std::fs::remove_file(path).unwrap();
    }
}
