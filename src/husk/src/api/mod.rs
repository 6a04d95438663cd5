//! The REST API: HTTP/1.1 on a unix socket, Firecracker's paths and bodies.
//!
//! The server runs on its own thread with its own epoll loop, so no client
//! (slow, half-open, or sending garbage) can hold up a vCPU or the VMM's
//! event loop: it buffers each connection's bytes, and only a whole, parsed
//! request becomes a [`Call`] to the VMM thread, which answers it between
//! two rounds of device events. The VMM thread is woken through an eventfd.

pub mod http;
pub mod routes;

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm::controller::{ActionError, Request, Response as VmmResponse};
use vmm::error::{chain, Chain};
use vmm::metrics::Metrics;
use vmm::seccomp::{SeccompError, SeccompFilters, ThreadKind};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::logger::LoggerError;
use http::{Parsed, Response};

/// Connections served at once; a new one beyond this closes the one idle
/// the longest.
pub const MAX_CONNECTIONS: usize = 64;
/// A connection holding a partial request or unsent response this long
/// without progress is closed.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(10);

const LISTENER: u64 = u64::MAX;

/// The VMM thread's answer: a response, or why the request was refused.
pub type Reply = Result<VmmResponse, Refusal>;

/// Why the VMM thread refused a request. It stays typed until
/// [`refusal_response`] picks the status and writes the whole chain as the
/// fault message.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The controller refused it (a bad body, the wrong state, a VM that
    /// could not start or do what was asked).
    #[error(transparent)]
    Action(#[from] ActionError),
    /// `PUT /logger` could not be applied (the binary owns logging).
    #[error(transparent)]
    Logger(#[from] LoggerError),
}

/// The HTTP answer to a refusal: its status, and `{"fault_message": ...}`
/// with the error and its causes joined on one line. The match names every
/// kind of refusal, so a new one gets its status decided here.
fn refusal_response(refusal: &Refusal) -> Response {
    let status = match refusal {
        // The request was wrong: its body, or the VM's state.
        Refusal::Logger(_)
        | Refusal::Action(
            ActionError::Resource(_)
            | ActionError::AfterStart(_)
            | ActionError::BeforeStart(_)
            | ActionError::NoBootSource
            | ActionError::AlreadyStarted
            | ActionError::AlreadyInState(_)
            | ActionError::LoadNotAllowed
            | ActionError::LoadAfterStart,
        ) => 400,
        // The host could not do it (a kernel that does not load, a file
        // that cannot be opened) and the VMM is as it was, to be asked
        // again: Firecracker answers these 400 too.
        Refusal::Action(
            ActionError::Start(_)
            | ActionError::Vmm(_)
            | ActionError::Metrics(_)
            | ActionError::CreateSnapshot(_)
            | ActionError::LoadSnapshot(_),
        ) => 400,
    };
    Response::fault(status, chain(refusal))
}

/// A request handed to the VMM thread.
pub struct Call {
    /// What is asked.
    pub request: Request,
    /// Where the answer goes.
    pub reply: Sender<Reply>,
}

/// How the API thread reaches the VMM thread.
pub struct VmmLink {
    /// Requests.
    pub calls: Sender<Call>,
    /// Written after each call, to wake the VMM thread.
    pub wake: EventFd,
}

impl VmmLink {
    fn call(&self, request: Request) -> Response {
        let (tx, rx) = mpsc::channel();
        if self.calls.send(Call { request, reply: tx }).is_err() {
            return Response::fault(503, "the microVM has ended");
        }
        if let Err(e) = self.wake.write(1) {
            tracing::error!(error = %Chain(&e), "cannot wake the VMM thread");
        }
        match rx.recv() {
            Ok(Ok(VmmResponse::Empty)) => Response::no_content(),
            Ok(Ok(VmmResponse::Json(v))) => Response::json(&v),
            Ok(Err(refusal)) => refusal_response(&refusal),
            Err(_) => Response::fault(503, "the microVM has ended"),
        }
    }
}

struct Connection {
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    /// Close once `output` is sent.
    closing: bool,
    continue_sent: bool,
    peer_closed: bool,
    last_progress: Instant,
    writable_interest: bool,
}

/// The server's state, owned by its thread.
struct Server {
    epoll: Epoll,
    listener: UnixListener,
    conns: HashMap<RawFd, Connection>,
    link: VmmLink,
    metrics: Arc<Metrics>,
}

/// Why the API server did not start.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// Setting up the listener, its epoll or the thread failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The API thread could not confine itself; it serves nothing.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
}

/// Starts the API server on `listener` (already bound) in a thread, which
/// installs the API seccomp filter before it accepts a connection; returns
/// once the filter is in place.
pub fn spawn(
    listener: UnixListener,
    link: VmmLink,
    metrics: Arc<Metrics>,
    seccomp: &SeccompFilters,
) -> Result<JoinHandle<()>, SpawnError> {
    listener.set_nonblocking(true)?;
    let epoll = Epoll::new()?;
    epoll.ctl(
        ControlOperation::Add,
        listener.as_raw_fd(),
        EpollEvent::new(EventSet::IN, LISTENER),
    )?;
    let mut server = Server {
        epoll,
        listener,
        conns: HashMap::new(),
        link,
        metrics,
    };
    let (ready_tx, ready) = mpsc::channel();
    let seccomp = seccomp.clone();
    let handle = std::thread::Builder::new()
        .name("husk-api".into())
        .spawn(move || {
            let confined = seccomp.install(ThreadKind::Api);
            let ok = confined.is_ok();
            let _ = ready_tx.send(confined);
            if ok {
                server.run();
            }
        })?;
    match ready.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(std::io::Error::other("the API thread ended during setup").into()),
    }
}

impl Server {
    fn run(&mut self) {
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(1000, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %Chain(&e), "API epoll failed; the API stops");
                    return;
                }
            };
            for ev in &events[..n] {
                if ev.data() == LISTENER {
                    self.accept();
                } else {
                    self.serve(ev.data() as RawFd, ev.event_set());
                }
            }
            self.close_stalled();
        }
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.conns.len() >= MAX_CONNECTIONS {
                        self.close_oldest();
                    }
                    if let Err(e) = self.add(stream) {
                        tracing::warn!(error = %Chain(&e), "cannot serve an API connection");
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: back off until the next round.
                    tracing::warn!(error = %Chain(&e), "cannot accept an API connection");
                    return;
                }
            }
        }
    }

    fn add(&mut self, stream: UnixStream) -> std::io::Result<()> {
        stream.set_nonblocking(true)?;
        let fd = stream.as_raw_fd();
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN | EventSet::READ_HANG_UP, fd as u64),
        )?;
        self.conns.insert(
            fd,
            Connection {
                stream,
                input: Vec::new(),
                output: Vec::new(),
                closing: false,
                continue_sent: false,
                peer_closed: false,
                last_progress: Instant::now(),
                writable_interest: false,
            },
        );
        Ok(())
    }

    fn close(&mut self, fd: RawFd) {
        if let Some(c) = self.conns.remove(&fd) {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            drop(c);
        }
    }

    fn close_oldest(&mut self) {
        if let Some(fd) = self
            .conns
            .iter()
            .min_by_key(|(_, c)| c.last_progress)
            .map(|(fd, _)| *fd)
        {
            tracing::debug!("too many API connections: closing the least recently used");
            self.close(fd);
        }
    }

    fn close_stalled(&mut self) {
        let stalled: Vec<RawFd> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                (!c.input.is_empty() || !c.output.is_empty())
                    && c.last_progress.elapsed() > STALL_TIMEOUT
            })
            .map(|(fd, _)| *fd)
            .collect();
        for fd in stalled {
            tracing::debug!("closing a stalled API connection");
            self.close(fd);
        }
    }

    fn serve(&mut self, fd: RawFd, events: EventSet) {
        let Some(conn) = self.conns.get_mut(&fd) else {
            return;
        };
        if events.contains(EventSet::IN) || events.contains(EventSet::READ_HANG_UP) {
            read_available(conn);
        }
        // One request at a time: the next is parsed once this one's
        // response is out (a client that never reads stalls only itself).
        let done = loop {
            if conn.output.is_empty() && !conn.closing {
                match http::parse(&conn.input) {
                    Parsed::Incomplete { expects_continue } => {
                        if expects_continue && !conn.continue_sent {
                            conn.output
                                .extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
                            conn.continue_sent = true;
                        }
                    }
                    Parsed::Invalid(response) => {
                        count(&self.metrics, &response);
                        conn.output = response.to_bytes(false);
                        conn.closing = true;
                        conn.input.clear();
                    }
                    Parsed::Done(request, used) => {
                        conn.input.drain(..used);
                        conn.continue_sent = false;
                        let response = dispatch(&self.link, &request);
                        count(&self.metrics, &response);
                        conn.output = response.to_bytes(request.keep_alive);
                        conn.closing = !request.keep_alive;
                    }
                }
            }
            let had_output = !conn.output.is_empty();
            let written = write_pending(conn);
            // Go on while responses leave completely and requests remain
            // (pipelining); stop when the socket is full or nothing is left.
            if written.is_err() || !had_output || !conn.output.is_empty() || conn.closing {
                break written;
            }
        };
        let want_out = !conn.output.is_empty();
        if want_out != conn.writable_interest {
            conn.writable_interest = want_out;
            let mut set = EventSet::IN | EventSet::READ_HANG_UP;
            if want_out {
                set |= EventSet::OUT;
            }
            let _ = self.epoll.ctl(
                ControlOperation::Modify,
                fd,
                EpollEvent::new(set, fd as u64),
            );
        }
        let finished = conn.output.is_empty() && (conn.closing || conn.peer_closed);
        if done.is_err() || finished {
            self.close(fd);
        }
    }
}

/// Reads what the socket has, up to the header and body limits (beyond
/// them the parser rejects the request anyway).
fn read_available(conn: &mut Connection) {
    let cap = http::MAX_HEADER_BYTES + http::MAX_BODY_BYTES + 1;
    let mut buf = [0u8; 4096];
    while conn.input.len() < cap {
        match conn.stream.read(&mut buf) {
            Ok(0) => {
                conn.peer_closed = true;
                return;
            }
            Ok(n) => {
                conn.input.extend_from_slice(&buf[..n]);
                conn.last_progress = Instant::now();
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(_) => {
                conn.peer_closed = true;
                return;
            }
        }
    }
}

fn write_pending(conn: &mut Connection) -> std::io::Result<()> {
    while !conn.output.is_empty() {
        match conn.stream.write(&conn.output) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => {
                conn.output.drain(..n);
                conn.last_progress = Instant::now();
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn count(metrics: &Metrics, response: &Response) {
    metrics.api.requests.inc();
    if response.status >= 400 {
        metrics.api.failures.inc();
    }
}

fn dispatch(link: &VmmLink, request: &http::Request) -> Response {
    let routed = match routes::route(&request.method, &request.path, &request.body) {
        Ok(r) => r,
        Err(response) => {
            tracing::debug!(method = %request.method, path = %request.path, status = response.status, "API request refused");
            return response;
        }
    };
    // PUT /logger is applied by the VMM thread before InstanceStart (it
    // opens a file, which this thread's seccomp filter does not allow).
    let response = link.call(routed);
    tracing::debug!(method = %request.method, path = %request.path, status = response.status, "API request");
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use vmm::boot::BootError;
    use vmm::controller::ResourceError;
    use vmm::VmmError;

    fn fault(r: &Response) -> (u16, String) {
        let body: serde_json::Value =
            serde_json::from_slice(r.body.as_deref().unwrap_or_default()).unwrap();
        (
            r.status,
            body["fault_message"].as_str().unwrap().to_string(),
        )
    }

    #[test]
    fn a_refused_body_is_a_400_whose_message_ends_with_its_cause() {
        let refusal = Refusal::Action(ActionError::Resource(ResourceError::File {
            what: "kernel image",
            path: "/k".into(),
            source: io::Error::new(io::ErrorKind::NotFound, "No such file or directory"),
        }));
        assert_eq!(
            fault(&refusal_response(&refusal)),
            (
                400,
                "cannot read kernel image /k: No such file or directory".to_string()
            )
        );
    }

    #[test]
    fn a_failed_start_is_a_400_with_every_cause_once() {
        let refusal = Refusal::Action(ActionError::Start(VmmError::Boot(BootError::Io {
            what: "kernel",
            path: "/k".into(),
            source: io::Error::new(io::ErrorKind::PermissionDenied, "Permission denied"),
        })));
        assert_eq!(
            fault(&refusal_response(&refusal)),
            (
                400,
                "cannot start the microVM: cannot read kernel /k: Permission denied".to_string()
            )
        );
    }

    #[test]
    fn a_refused_logger_is_a_400() {
        let refusal = Refusal::Logger(LoggerError::Level("Loud".into()));
        let (status, message) = fault(&refusal_response(&refusal));
        assert_eq!(status, 400);
        assert!(
            message.starts_with("unknown log level \"Loud\""),
            "{message}"
        );
    }
}
