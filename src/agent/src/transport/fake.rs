//! A host connection for unit tests: [`pair`] gives the agent's end (a
//! [`Stream`]) and the test's end ([`Host`]). It stands in for a vsock
//! socket so the server can be driven without a guest: the test writes what
//! the host sends, reads what the agent wrote, and can make the host stop
//! reading. Like a socket with SO_SNDTIMEO, a write to a host that stopped
//! reading fails with `WouldBlock` once a write timeout is set (the timeout
//! passes at once); without one it would block for ever, which the fake
//! records and reports as an error instead of hanging the test. A shutdown
//! affects every handle, as shutdown(2) does: reads return end of file,
//! writes fail.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::Stream;

#[derive(Default)]
struct State {
    to_agent: VecDeque<u8>,
    /// The host shut its write side: end of file once `to_agent` is read.
    host_done: bool,
    from_agent: Vec<u8>,
    /// The host stopped reading: the socket's buffer is full.
    stalled: bool,
    write_timeout: Option<Duration>,
    shut_down: bool,
    /// A write would have blocked for ever (stalled host, no timeout).
    blocked_for_ever: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The agent's end of a fake connection.
pub struct FakeStream(Arc<Shared>);

/// The test's end: plays the host.
pub struct Host(Arc<Shared>);

/// A new connection.
pub fn pair() -> (FakeStream, Host) {
    let shared = Arc::new(Shared::default());
    (FakeStream(shared.clone()), Host(shared))
}

impl Read for FakeStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut s = self.0.lock();
        loop {
            if !s.to_agent.is_empty() && !s.shut_down {
                let n = buf.len().min(s.to_agent.len());
                for (b, x) in buf.iter_mut().zip(s.to_agent.drain(..n)) {
                    *b = x;
                }
                return Ok(n);
            }
            if s.host_done || s.shut_down {
                return Ok(0);
            }
            s = self.0.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl Write for FakeStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut s = self.0.lock();
        if s.shut_down {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
        if s.stalled {
            if s.write_timeout.is_none() {
                s.blocked_for_ever = true;
                return Err(std::io::Error::other(
                    "fake transport: this write would block for ever",
                ));
            }
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        s.from_agent.extend_from_slice(buf);
        self.0.changed.notify_all();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Stream for FakeStream {
    fn try_clone_stream(&self) -> std::io::Result<Box<dyn Stream>> {
        Ok(Box::new(FakeStream(self.0.clone())))
    }

    fn set_write_timeout(&self, timeout: Duration) -> std::io::Result<()> {
        self.0.lock().write_timeout = Some(timeout);
        Ok(())
    }

    fn shutdown(&self) -> std::io::Result<()> {
        self.0.lock().shut_down = true;
        self.0.changed.notify_all();
        Ok(())
    }
}

/// How long a test waits for the agent before it fails (a bound on a
/// hang, not a timing assertion).
const PATIENCE: Duration = Duration::from_secs(10);

impl Host {
    /// Sends bytes to the agent.
    pub fn send(&self, bytes: &[u8]) {
        self.0.lock().to_agent.extend(bytes);
        self.0.changed.notify_all();
    }

    /// Sends one frame.
    pub fn send_frame<T: serde::Serialize>(&self, msg: &T) {
        self.send(&husk_protocol::frame::encode(msg).expect("encodable"));
    }

    /// Closes the host's write side (the agent reads end of file).
    pub fn hang_up(&self) {
        self.0.lock().host_done = true;
        self.0.changed.notify_all();
    }

    /// Stops reading: the agent's writes no longer go through.
    pub fn stop_reading(&self) {
        self.0.lock().stalled = true;
    }

    /// Whether the agent shut the connection down.
    pub fn is_shut_down(&self) -> bool {
        self.0.lock().shut_down
    }

    /// The write timeout the agent set, if any.
    pub fn write_timeout(&self) -> Option<Duration> {
        self.0.lock().write_timeout
    }

    /// Whether a write would have blocked for ever.
    pub fn blocked_for_ever(&self) -> bool {
        self.0.lock().blocked_for_ever
    }

    /// Every byte the agent wrote so far.
    pub fn written(&self) -> Vec<u8> {
        self.0.lock().from_agent.clone()
    }

    /// The complete frames the agent wrote so far, decoded.
    pub fn frames(&self) -> Vec<serde_json::Value> {
        let s = self.0.lock();
        let mut out = Vec::new();
        let mut rest = &s.from_agent[..];
        while rest.len() >= 4 {
            let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            if rest.len() < 4 + len {
                break;
            }
            out.push(serde_json::from_slice(&rest[4..4 + len]).expect("a JSON frame"));
            rest = &rest[4 + len..];
        }
        out
    }

    /// Waits until the agent has written at least `n` frames; returns them.
    pub fn wait_for_frames(&self, n: usize) -> Vec<serde_json::Value> {
        self.wait_until(|| self.frames().len() >= n, "frames");
        self.frames()
    }

    /// Waits until the agent has shut the connection down.
    pub fn wait_for_shutdown(&self) {
        self.wait_until(|| self.is_shut_down(), "a shutdown");
    }

    fn wait_until(&self, done: impl Fn() -> bool, what: &str) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if done() {
                return;
            }
            let s = self.0.lock();
            let now = Instant::now();
            assert!(now < deadline, "the agent did not produce {what}");
            let _ = self
                .0
                .changed
                .wait_timeout(s, (deadline - now).min(Duration::from_millis(50)));
        }
    }
}
