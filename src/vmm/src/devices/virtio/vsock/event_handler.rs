//! Wires the vsock device into the VMM's event loop: its three queue
//! eventfds, its wake eventfd, a one-second timer (it expires unanswered
//! REQUESTs and counts a tx queue whose notification was lost; after a
//! restore it also ends the wait for a transport reset the guest never
//! takes), the
//! listening socket, and (through the muxer) every host stream socket,
//! each with its own token. The event queue's notification (the guest
//! posted an event buffer back) ends that wait at once.

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::device::Vsock;
use super::muxer::FIRST_SOCKET_TOKEN;
use super::{EVENT_QUEUE, RX_QUEUE, TX_QUEUE};
use crate::devices::virtio::VirtioDevice;

const TOKEN_RX: u32 = RX_QUEUE as u32;
const TOKEN_TX: u32 = TX_QUEUE as u32;
const TOKEN_EVENT: u32 = EVENT_QUEUE as u32;
const TOKEN_LISTENER: u32 = 3;
const TOKEN_WAKE: u32 = 4;
const TOKEN_TIMER: u32 = 5;

impl Vsock {
    /// Serves one event-loop event.
    pub fn handle_event(&mut self, token: u32, events: EventSet) {
        match token {
            TOKEN_RX | TOKEN_TX | TOKEN_EVENT => {
                // Drain first: notifications arriving while serving are kept.
                if let Some(e) = self.queue_events().get(token as usize) {
                    let _ = e.read();
                }
                if token == TOKEN_TX {
                    self.process_tx();
                }
            }
            TOKEN_LISTENER => self.muxer.accept_host(),
            TOKEN_WAKE => {
                let _ = self.wake_event().read();
            }
            TOKEN_TIMER => {
                let _ = self.timer().wait();
                self.muxer.expire_requests(std::time::Instant::now());
                self.watch_tx();
            }
            t if t >= FIRST_SOCKET_TOKEN => self.muxer.host_event(t, events),
            _ => {}
        }
        self.process_rx();
    }
}

impl MutEventSubscriber for Vsock {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        self.handle_event(events.data(), events.event_set());
        self.muxer.sync_epoll(ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        let mut fds: Vec<(i32, u32)> = self
            .queue_events()
            .iter()
            .enumerate()
            .map(|(i, e)| (std::os::fd::AsRawFd::as_raw_fd(e), i as u32))
            .collect();
        fds.push((
            std::os::fd::AsRawFd::as_raw_fd(self.wake_event()),
            TOKEN_WAKE,
        ));
        fds.push((
            std::os::fd::AsRawFd::as_raw_fd(self.muxer.listener()),
            TOKEN_LISTENER,
        ));
        fds.push((std::os::fd::AsRawFd::as_raw_fd(self.timer()), TOKEN_TIMER));
        for (fd, token) in fds {
            if let Err(e) = ops.add(Events::with_data_raw(fd, token, EventSet::IN)) {
                tracing::error!(token, error = ?e, "cannot watch a vsock event source");
            }
        }
    }
}
