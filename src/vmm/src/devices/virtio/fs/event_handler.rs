//! Wires the virtio-fs device into the VMM's event loop: one call eventfd
//! per queue (the backend used buffers), the work eventfd (the driver
//! started or reset the device), and the backend's socket, watched for a
//! hang-up. The queues' kick eventfds are here only when the device
//! relays (`relay`); otherwise the backend reads them.

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::device::{Fs, FsError};

/// Tokens below this are queue indices (call eventfds).
pub(super) const TOKEN_WORK: u32 = 1 << 16;
pub(super) const TOKEN_BACKEND: u32 = TOKEN_WORK + 1;
pub(super) const TOKEN_MEMORY: u32 = TOKEN_WORK + 2;
/// Relay mode: tokens from this one up are the guest's queue
/// notifications.
pub(super) const TOKEN_KICK: u32 = 1 << 17;

impl Fs {
    /// Serves one event-loop event; returns the token of a source to stop
    /// watching (the backend's socket once it hung up, the memory-complete
    /// eventfd once it fired).
    pub fn handle_event(&mut self, token: u32, events: EventSet) -> Option<u32> {
        match token {
            TOKEN_MEMORY => {
                self.memory_complete();
                return Some(TOKEN_MEMORY);
            }
            TOKEN_WORK => {
                let _ = self.work_event().read();
                self.run_pending();
            }
            TOKEN_BACKEND => {
                // Nothing is ever expected on the socket outside a request
                // (no backend-initiated channel): readable or closed means
                // gone.
                if events.intersects(
                    EventSet::HANG_UP | EventSet::READ_HANG_UP | EventSet::ERROR | EventSet::IN,
                ) {
                    let path = self.config().socket.clone();
                    self.fail(&FsError::Disconnected(path));
                    return Some(TOKEN_BACKEND);
                }
            }
            kick if kick >= TOKEN_KICK => {
                let index = (kick - TOKEN_KICK) as usize;
                if let Some(e) = self.queue_events.get(index) {
                    let _ = e.read();
                }
                self.guest_requests(index);
            }
            index => self.signal_used(index as usize),
        }
        None
    }
}

impl MutEventSubscriber for Fs {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        use std::os::fd::AsRawFd;
        let fd = match self.handle_event(events.data(), events.event_set()) {
            Some(TOKEN_BACKEND) => self.backend_socket().as_raw_fd(),
            Some(TOKEN_MEMORY) => match self.memory_ready_event() {
                Some(e) => e.as_raw_fd(),
                None => return,
            },
            _ => return,
        };
        if let Err(e) = ops.remove(Events::with_data_raw(fd, events.data(), EventSet::empty())) {
            tracing::debug!(error = ?e, "cannot stop watching a virtio-fs event source");
        }
        if events.data() == TOKEN_MEMORY {
            // Closed only once the event loop no longer knows its number.
            self.forget_memory_ready();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        use std::os::fd::AsRawFd;
        let mut fds: Vec<(i32, u32, EventSet)> = self
            .call_events()
            .iter()
            .enumerate()
            .map(|(i, e)| (e.as_raw_fd(), i as u32, EventSet::IN))
            .collect();
        if self.relays() {
            fds.extend(
                self.queue_events
                    .iter()
                    .enumerate()
                    .map(|(i, e)| (e.as_raw_fd(), TOKEN_KICK + i as u32, EventSet::IN)),
            );
        }
        fds.push((self.work_event().as_raw_fd(), TOKEN_WORK, EventSet::IN));
        fds.push((
            self.backend_socket().as_raw_fd(),
            TOKEN_BACKEND,
            EventSet::READ_HANG_UP,
        ));
        if let Some(ready) = self.memory_ready_event() {
            fds.push((ready.as_raw_fd(), TOKEN_MEMORY, EventSet::IN));
        }
        for (fd, token, set) in fds {
            if let Err(e) = ops.add(Events::with_data_raw(fd, token, set)) {
                tracing::error!(token, error = ?e, "cannot watch a virtio-fs event source");
            }
        }
    }
}
