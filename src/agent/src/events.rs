//! The event stream: the reaper (exits) and the container code (OOM kills)
//! send [`Event`]s into one channel; one publisher thread owns the
//! subscribers (the host's event connections) and writes each event to
//! every one of them. Sending never blocks, so reaping is never held up by
//! a host.
//!
//! A subscriber is known by an id, never by its file descriptor: ids are
//! not reused, so removing a subscriber that has gone cannot remove a newer
//! one. A subscriber whose write fails or does not finish within the write
//! timeout is shut down both ways: the host reads end of file (rather than
//! silence) and reconnects, and the agent's thread reading that connection
//! ends. The publisher writes `Accepted` itself, so every event published
//! after the host has read it reaches the host (or the host sees the
//! stream close).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::Duration;

use husk_protocol::frame;
use husk_protocol::{Accepted, Event, PROTOCOL_VERSION};

use crate::log;
use crate::transport::Stream;

/// How long one write to a subscriber may take before it is dropped.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// Names one subscriber for as long as the agent runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscriberId(u64);

/// What the publisher is told.
pub enum Message {
    /// Send this to every subscriber.
    Event(Event),
    /// A new subscriber: write `Accepted` to it, then every event.
    Subscribe(SubscriberId, Box<dyn Stream>),
    /// The host hung up this subscriber (nothing happens if it is gone).
    Unsubscribe(SubscriberId),
}

/// The sending side, cloned by everything that publishes or subscribes.
#[derive(Clone)]
pub struct Events {
    tx: Sender<Message>,
    next_id: Arc<AtomicU64>,
}

impl Events {
    /// A channel and its receiving end, for a [`Publisher`] (or a test).
    pub fn channel() -> (Events, Receiver<Message>) {
        let (tx, rx) = mpsc::channel();
        (
            Events {
                tx,
                next_id: Arc::new(AtomicU64::new(1)),
            },
            rx,
        )
    }

    /// A channel with a publisher thread behind it, which gives each write
    /// to a subscriber `write_timeout` ([`WRITE_TIMEOUT`] in the agent).
    pub fn start(write_timeout: Duration) -> std::io::Result<Events> {
        let (events, rx) = Events::channel();
        std::thread::Builder::new()
            .name("husk-agent-events".into())
            .spawn(move || Publisher::new(write_timeout).run(rx))?;
        Ok(events)
    }

    /// Queues `event` for every subscriber; never blocks.
    pub fn publish(&self, event: Event) {
        // Fails only if the publisher is gone, and then no one listens.
        let _ = self.tx.send(Message::Event(event));
    }

    /// Hands `conn` to the publisher, which bounds its writes, answers the
    /// host's Hello with `Accepted` and then sends events.
    pub fn subscribe(&self, conn: Box<dyn Stream>) -> SubscriberId {
        let id = SubscriberId(self.next_id.fetch_add(1, Ordering::Relaxed));
        if let Err(mpsc::SendError(Message::Subscribe(_, conn))) =
            self.tx.send(Message::Subscribe(id, conn))
        {
            // No publisher: the host must not wait for an Accepted.
            let _ = conn.shutdown();
        }
        id
    }

    /// Forgets subscriber `id` (the host hung up).
    pub fn unsubscribe(&self, id: SubscriberId) {
        let _ = self.tx.send(Message::Unsubscribe(id));
    }
}

/// The publisher's state: the subscribers, in the order they came.
pub struct Publisher {
    subscribers: Vec<(SubscriberId, Box<dyn Stream>)>,
    write_timeout: Duration,
}

impl Publisher {
    /// No subscribers yet; each write to one may take `write_timeout`.
    pub fn new(write_timeout: Duration) -> Self {
        Publisher {
            subscribers: Vec::new(),
            write_timeout,
        }
    }

    /// Serves the channel until every sender is gone.
    pub fn run(mut self, rx: Receiver<Message>) {
        for message in rx {
            self.handle(message);
        }
    }

    /// Acts on one message.
    pub fn handle(&mut self, message: Message) {
        match message {
            Message::Event(event) => {
                let bytes = match frame::encode(&event) {
                    Ok(b) => b,
                    Err(e) => {
                        log::warn(&format!(
                            "cannot encode event {event:?}: {}",
                            crate::error::chain(&e)
                        ));
                        return;
                    }
                };
                self.subscribers
                    .retain_mut(|(id, conn)| deliver(*id, &mut **conn, &bytes));
            }
            Message::Subscribe(id, mut conn) => {
                if let Err(e) = conn.set_write_timeout(self.write_timeout) {
                    // Unbounded, it could stall every exit behind it.
                    log::warn(&format!(
                        "cannot bound the writes to event subscriber {} ({e}): closing it",
                        id.0
                    ));
                    let _ = conn.shutdown();
                    return;
                }
                let accepted = Accepted {
                    version: PROTOCOL_VERSION,
                    error: None,
                };
                let delivered = match frame::encode(&accepted) {
                    Ok(bytes) => deliver(id, &mut *conn, &bytes),
                    Err(_) => false,
                };
                if delivered {
                    self.subscribers.push((id, conn));
                }
            }
            Message::Unsubscribe(id) => self.subscribers.retain(|(s, _)| *s != id),
        }
    }

    /// How many subscribers are left.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.subscribers.len()
    }
}

/// Writes one frame; on failure shuts the connection down (both ways, for
/// every handle on it) and says so with `false`.
fn deliver(id: SubscriberId, conn: &mut dyn Stream, bytes: &[u8]) -> bool {
    match conn.write_all(bytes) {
        Ok(()) => true,
        Err(e) => {
            log::warn(&format!(
                "event subscriber {} does not take events ({e}): closing it",
                id.0
            ));
            let _ = conn.shutdown();
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::fake::{self, Host};
    use husk_protocol::{ExitStatus, ProcessRef};

    fn exit(code: i32) -> Event {
        Event::ProcessExited {
            process: ProcessRef {
                container_id: "c1".into(),
                exec_id: None,
            },
            status: ExitStatus::Code(code),
        }
    }

    fn subscriber(p: &mut Publisher, id: u64) -> Host {
        let (conn, host) = fake::pair();
        p.handle(Message::Subscribe(SubscriberId(id), Box::new(conn)));
        host
    }

    fn exits(host: &Host) -> Vec<Event> {
        host.frames()
            .into_iter()
            .skip(1) // Accepted
            .map(|v| serde_json::from_value(v).unwrap())
            .collect()
    }

    #[test]
    fn a_subscriber_is_accepted_then_gets_every_event() {
        let mut p = Publisher::new(WRITE_TIMEOUT);
        let host = subscriber(&mut p, 1);
        assert_eq!(host.write_timeout(), Some(WRITE_TIMEOUT));
        let accepted: Accepted = serde_json::from_value(host.frames()[0].clone()).unwrap();
        assert_eq!(accepted.version, PROTOCOL_VERSION);
        assert!(accepted.error.is_none());
        p.handle(Message::Event(exit(1)));
        p.handle(Message::Event(exit(2)));
        assert_eq!(exits(&host), [exit(1), exit(2)]);
    }

    #[test]
    fn a_subscriber_that_stops_reading_is_shut_down_and_the_others_keep_theirs() {
        let mut p = Publisher::new(WRITE_TIMEOUT);
        let slow = subscriber(&mut p, 1);
        let fine = subscriber(&mut p, 2);
        slow.stop_reading();
        p.handle(Message::Event(exit(3)));
        assert!(slow.is_shut_down());
        assert!(!slow.blocked_for_ever());
        assert_eq!(p.len(), 1);
        p.handle(Message::Event(exit(4)));
        assert_eq!(exits(&fine), [exit(3), exit(4)]);
        assert!(exits(&slow).is_empty());
    }

    #[test]
    fn a_late_removal_of_a_dropped_subscriber_leaves_the_newer_one() {
        // The old subscriber is dropped for not reading, a new one comes,
        // and only then does the old connection's thread report its end.
        let mut p = Publisher::new(WRITE_TIMEOUT);
        let old = subscriber(&mut p, 1);
        old.stop_reading();
        p.handle(Message::Event(exit(1)));
        let new = subscriber(&mut p, 2);
        p.handle(Message::Unsubscribe(SubscriberId(1)));
        p.handle(Message::Event(exit(2)));
        assert_eq!(exits(&new), [exit(2)]);
        // Removing the new one removes just it.
        p.handle(Message::Unsubscribe(SubscriberId(2)));
        assert_eq!(p.len(), 0);
    }

    #[test]
    fn without_a_publisher_publishing_returns_and_a_subscriber_is_closed() {
        let (events, rx) = Events::channel();
        drop(rx);
        events.publish(exit(0));
        let (conn, host) = fake::pair();
        events.subscribe(Box::new(conn));
        assert!(host.is_shut_down());
    }
}
