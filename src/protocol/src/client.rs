//! The host side of the agent protocol: connects to husk-agent through the
//! VMM's vsock unix socket (`CONNECT <port>\n`, answered `OK <port>\n`) or,
//! for tests, the agent's own unix socket; opens control and stdio channels;
//! sends requests and matches replies by id.
//!
//! The guest is not trusted to answer at any pace: opening a channel and
//! each request on a control channel have one deadline each, which every
//! read and write is held to (a reply sent a byte at a time fails at the
//! deadline, as a silent one does), and a reply is at most
//! [`MAX_FRAME`](crate::MAX_FRAME) bytes.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::frame::{read_frame, write_frame, FrameError};
use crate::{
    Accepted, AgentError, Channel, Hello, ReplyFrame, Request, RequestFrame, Response, StdioStream,
    PROTOCOL_VERSION,
};

/// How long PrepareTemplate may take: the guest zeroes its free memory
/// (a second or two for 128 MiB under nested emulation).
pub const PREPARE_TEMPLATE_TIMEOUT: Duration = Duration::from_secs(60);

/// Why talking to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket failed.
    #[error("the connection to the agent failed")]
    Io(#[from] std::io::Error),
    /// The vsock handshake or the agent's Hello answer went wrong.
    #[error("agent handshake: {0}")]
    Handshake(String),
    /// A frame could not be read or written.
    #[error("the agent's connection broke the protocol")]
    Frame(#[from] FrameError),
    /// The agent refused the request.
    #[error("the agent refused")]
    Agent(#[from] AgentError),
    /// A reply to another request arrived.
    #[error("reply {got} arrived for request {want}")]
    WrongReply {
        /// The id sent.
        want: u64,
        /// The id received.
        got: u64,
    },
    /// The agent did not answer in time.
    #[error("the agent did not answer within {0:?}")]
    Timeout(Duration),
    /// The agent answered with a reply of another request's kind.
    #[error("the agent answered {0} with another kind of reply")]
    UnexpectedReply(&'static str),
}

impl ClientError {
    /// Whether the agent closed the connection between frames: after a
    /// `Shutdown` that is the shutdown happening (the guest resets as soon
    /// as the reply is written, and the reply can be lost with the VM),
    /// not a failure.
    pub fn is_closed(&self) -> bool {
        matches!(self, ClientError::Frame(FrameError::Closed))
    }
}

/// Where the agent is.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// The VMM's vsock socket and the agent's port.
    Vsock {
        /// The host-side unix socket of the VM's vsock device.
        uds: PathBuf,
        /// The agent's vsock port.
        port: u32,
    },
    /// The agent's own unix socket (`husk-agent --unix`).
    Unix(PathBuf),
}

/// How long opening a channel may take unless the caller says otherwise:
/// the VMM's `CONNECT` handshake, the agent's `Hello` and its answer.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);

/// A socket whose reads and writes all end by one instant: before each
/// one, the socket's timeout is set to what is left, so a peer that
/// trickles bytes cannot stretch an exchange past the deadline.
struct Bounded<'a> {
    stream: &'a UnixStream,
    deadline: Option<Instant>,
}

impl Bounded<'_> {
    /// What is left until the deadline (`None`: no deadline); an error
    /// once it has passed.
    fn left(&self) -> std::io::Result<Option<Duration>> {
        let Some(deadline) = self.deadline else {
            return Ok(None);
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        Ok(Some(left))
    }
}

impl Read for Bounded<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.stream.set_read_timeout(self.left()?)?;
        (&mut &*self.stream).read(buf)
    }
}

impl Write for Bounded<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.stream.set_write_timeout(self.left()?)?;
        (&mut &*self.stream).write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A failed exchange as the time-out it is, when it is one (the sockets'
/// timeouts surface as EAGAIN, a passed deadline as TimedOut).
fn timed_out(e: ClientError, limit: Duration) -> ClientError {
    let is_timeout = |e: &std::io::Error| {
        matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        )
    };
    match &e {
        ClientError::Io(io) | ClientError::Frame(FrameError::Io(io)) if is_timeout(io) => {
            ClientError::Timeout(limit)
        }
        _ => e,
    }
}

impl Endpoint {
    /// Opens a connection for `channel`, the whole handshake within 30 s.
    pub fn open(&self, channel: Channel) -> Result<UnixStream, ClientError> {
        self.open_within(channel, OPEN_TIMEOUT)
    }

    /// Opens a connection for `channel`, the whole handshake (the VMM's
    /// `CONNECT`, the agent's `Hello` and its answer) within `limit`. The
    /// stream returned has no timeouts set.
    pub fn open_within(
        &self,
        channel: Channel,
        limit: Duration,
    ) -> Result<UnixStream, ClientError> {
        let deadline = Instant::now() + limit;
        self.open_by(channel, deadline)
            .map_err(|e| timed_out(e, limit))
    }

    fn open_by(&self, channel: Channel, deadline: Instant) -> Result<UnixStream, ClientError> {
        let s = match self {
            Endpoint::Unix(path) => UnixStream::connect(path)?,
            Endpoint::Vsock { uds, port } => {
                let s = UnixStream::connect(uds)?;
                let mut b = Bounded {
                    stream: &s,
                    deadline: Some(deadline),
                };
                b.write_all(format!("CONNECT {port}\n").as_bytes())?;
                let line = read_line(&mut b)?;
                if !line.starts_with("OK ") {
                    return Err(ClientError::Handshake(format!("vsock answered {line:?}")));
                }
                s
            }
        };
        let mut b = Bounded {
            stream: &s,
            deadline: Some(deadline),
        };
        write_frame(
            &mut b,
            &Hello {
                version: PROTOCOL_VERSION,
                channel,
            },
        )?;
        let accepted: Accepted = read_frame(&mut b)?;
        if let Some(e) = accepted.error {
            return Err(ClientError::Agent(e));
        }
        s.set_read_timeout(None)?;
        s.set_write_timeout(None)?;
        Ok(s)
    }
}

/// Reads one `\n`-terminated line (at most 64 bytes) byte by byte, so
/// nothing after it is consumed.
fn read_line(s: &mut impl Read) -> Result<String, ClientError> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 64 {
        if s.read(&mut byte)? == 0 {
            return Err(ClientError::Handshake(
                "the VMM closed the connection (nobody listens on that port yet?)".into(),
            ));
        }
        if byte[0] == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        line.push(byte[0]);
    }
    Err(ClientError::Handshake("handshake line too long".into()))
}

/// A control channel to the agent.
pub struct AgentClient {
    endpoint: Endpoint,
    /// `None` after a call failed on the connection (timed out, broke, or
    /// got someone else's reply): a late reply would answer the next
    /// request, so the next call opens a new one.
    conn: Option<UnixStream>,
    next_id: u64,
    /// Each call's deadline, from its start (`None`: none).
    timeout: Option<Duration>,
}

impl AgentClient {
    /// A client that connects at its first call, each call (its
    /// connection included) bounded by `timeout`.
    pub fn new(endpoint: Endpoint, timeout: Option<Duration>) -> Self {
        AgentClient {
            endpoint,
            conn: None,
            next_id: 1,
            timeout,
        }
    }

    /// Connects, retrying until the agent answers a Ping or `timeout`
    /// passes (the guest may still be booting). Every attempt ends by then
    /// too.
    pub fn connect(endpoint: Endpoint, timeout: Duration) -> Result<Self, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut c = AgentClient::new(endpoint.clone(), None);
            let attempt = if left.is_zero() {
                Err(ClientError::Timeout(timeout))
            } else {
                c.call_within(Request::Ping, left)
            };
            match attempt {
                Ok(_) => return Ok(c),
                Err(ClientError::Agent(e)) => return Err(ClientError::Agent(e)),
                Err(_) if Instant::now() >= deadline => return Err(ClientError::Timeout(timeout)),
                // Not listening yet (the guest is booting): try again.
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Bounds each [`AgentClient::call`], from its start to its reply
    /// (`None`: no bound). A call that does not end in time fails with
    /// [`ClientError::Timeout`]; the next call opens a new connection.
    pub fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<(), ClientError> {
        self.timeout = timeout;
        Ok(())
    }

    /// Whether the last call left the connection unusable (the next call
    /// reconnects first).
    pub fn is_broken(&self) -> bool {
        self.conn.is_none()
    }

    /// Sends one request and waits for its reply, within the client's
    /// timeout.
    pub fn call(&mut self, request: Request) -> Result<Response, ClientError> {
        match self.timeout {
            Some(limit) => self.call_within(request, limit),
            None => self.exchange(request, None),
        }
    }

    /// Sends one request and waits for its reply: connecting (if the last
    /// call broke the connection), writing and reading all end within
    /// `limit`.
    pub fn call_within(
        &mut self,
        request: Request,
        limit: Duration,
    ) -> Result<Response, ClientError> {
        let deadline = Instant::now() + limit;
        self.exchange(request, Some(deadline))
            .map_err(|e| timed_out(e, limit))
    }

    /// PrepareTemplate, within [`PREPARE_TEMPLATE_TIMEOUT`]: the bytes of
    /// free memory the guest zeroed.
    pub fn prepare_template(&mut self) -> Result<u64, ClientError> {
        match self.call_within(Request::PrepareTemplate, PREPARE_TEMPLATE_TIMEOUT)? {
            Response::TemplatePrepared { zeroed_bytes } => Ok(zeroed_bytes),
            _ => Err(ClientError::UnexpectedReply("prepare_template")),
        }
    }

    fn exchange(
        &mut self,
        request: Request,
        deadline: Option<Instant>,
    ) -> Result<Response, ClientError> {
        let conn = match self.conn.take() {
            Some(c) => c,
            None => {
                let deadline = deadline.unwrap_or_else(|| Instant::now() + OPEN_TIMEOUT);
                self.endpoint.open_by(Channel::Control, deadline)?
            }
        };
        let id = self.next_id;
        self.next_id += 1;
        let mut b = Bounded {
            stream: &conn,
            deadline,
        };
        write_frame(&mut b, &RequestFrame { id, request })?;
        let reply: ReplyFrame = read_frame(&mut b)?;
        if reply.id != id {
            return Err(ClientError::WrongReply {
                want: id,
                got: reply.id,
            });
        }
        self.conn = Some(conn);
        Ok(reply.reply?)
    }

    /// Opens a stdio stream of a process.
    pub fn open_stdio(
        &self,
        container_id: &str,
        exec_id: Option<&str>,
        stream: StdioStream,
    ) -> Result<UnixStream, ClientError> {
        self.endpoint.open(Channel::Stdio {
            container_id: container_id.to_string(),
            exec_id: exec_id.map(str::to_string),
            stream,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A peer speaking the agent's side of the handshake, then answering
    /// the requests of its `n`th connection as `answer(n, request)` says
    /// (`None`: never). A stand-in for a guest that stops answering, which
    /// the real agent cannot be made to do.
    fn peer(
        dir: &std::path::Path,
        answer: impl Fn(usize, &RequestFrame) -> Option<Result<Response, AgentError>> + Send + 'static,
    ) -> Endpoint {
        let path = dir.join("agent.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            for (n, conn) in listener.incoming().enumerate() {
                let Ok(mut conn) = conn else { return };
                let _: Hello = read_frame(&mut conn).unwrap();
                let accepted = Accepted {
                    version: PROTOCOL_VERSION,
                    error: None,
                };
                write_frame(&mut conn, &accepted).unwrap();
                while let Ok(req) = read_frame::<_, RequestFrame>(&mut conn) {
                    if let Some(reply) = answer(n, &req) {
                        write_frame(&mut conn, &ReplyFrame { id: req.id, reply }).unwrap();
                    }
                }
            }
        });
        Endpoint::Unix(path)
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("husk-client-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_silent_agent_times_out_and_the_next_call_reconnects() {
        let dir = temp_dir("silent");
        // The first connection answers the Ping, then nothing; the second
        // answers everything.
        let endpoint = peer(&dir, |conn, req| {
            (conn > 0 || req.request == Request::Ping).then_some(Ok(Response::Ok))
        });
        let mut client = AgentClient::connect(endpoint, Duration::from_secs(5)).unwrap();
        client
            .set_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let e = client.call(Request::Shutdown).unwrap_err();
        assert!(
            matches!(e, ClientError::Timeout(d) if d == Duration::from_millis(200)),
            "{e:?}"
        );
        assert!(e.to_string().contains("did not answer"), "{e}");
        assert!(client.is_broken());
        // A new connection: the late reply cannot stand in front of this one.
        assert_eq!(client.call(Request::Shutdown).unwrap(), Response::Ok);
        assert!(!client.is_broken());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_agent_error_keeps_the_connection() {
        let dir = temp_dir("refused");
        // Refusals on the first connection; a second one, which a
        // reconnect would open, never answers.
        let endpoint = peer(&dir, |conn, req| match (conn, &req.request) {
            (0, Request::Ping) => Some(Ok(Response::Ok)),
            (0, _) => Some(Err(AgentError::new(
                crate::ErrorCode::NotFound,
                "no such thing",
            ))),
            _ => None,
        });
        let mut client = AgentClient::connect(endpoint, Duration::from_secs(5)).unwrap();
        client.set_timeout(Some(Duration::from_secs(5))).unwrap();
        for _ in 0..2 {
            let e = client.call(Request::Shutdown).unwrap_err();
            assert!(matches!(e, ClientError::Agent(_)), "{e:?}");
            assert!(!client.is_broken());
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A peer that takes the handshake, then answers each request by
    /// writing whatever `reply` writes: a stand-in for a hostile guest.
    fn raw_peer(
        dir: &std::path::Path,
        reply: impl Fn(&RequestFrame, &mut UnixStream) + Send + 'static,
    ) -> Endpoint {
        let path = dir.join("agent.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let _: Hello = read_frame(&mut conn).unwrap();
                let accepted = Accepted {
                    version: PROTOCOL_VERSION,
                    error: None,
                };
                write_frame(&mut conn, &accepted).unwrap();
                while let Ok(req) = read_frame::<_, RequestFrame>(&mut conn) {
                    reply(&req, &mut conn);
                }
            }
        });
        Endpoint::Unix(path)
    }

    /// Writes `bytes` one at a time, 20 ms apart, until the reader goes.
    fn trickle(conn: &mut UnixStream, bytes: &[u8]) {
        for b in bytes {
            if conn.write_all(std::slice::from_ref(b)).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_reply_sent_a_byte_at_a_time_fails_at_the_deadline() {
        let dir = temp_dir("trickle");
        // Every byte comes well within 300 ms of the one before; the whole
        // reply would take more than a second.
        let endpoint = raw_peer(&dir, |req, conn| {
            let reply = ReplyFrame {
                id: req.id,
                reply: Ok(Response::Pong {
                    version: PROTOCOL_VERSION,
                    agent_version: "x".repeat(40),
                }),
            };
            trickle(conn, &crate::frame::encode(&reply).unwrap());
        });
        let mut client = AgentClient::new(endpoint, Some(Duration::from_millis(300)));
        let e = client.call(Request::Ping).unwrap_err();
        assert!(
            matches!(e, ClientError::Timeout(d) if d == Duration::from_millis(300)),
            "{e:?}"
        );
        assert!(client.is_broken());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_oversized_reply_is_refused_before_it_is_read() {
        let dir = temp_dir("oversized");
        let endpoint = raw_peer(&dir, |_, conn| {
            let _ = conn.write_all(&(crate::MAX_FRAME as u32 + 1).to_be_bytes());
        });
        let mut client = AgentClient::new(endpoint, Some(Duration::from_secs(5)));
        let e = client.call(Request::Ping).unwrap_err();
        assert!(
            matches!(e, ClientError::Frame(FrameError::TooLarge(_))),
            "{e:?}"
        );
        assert!(client.is_broken());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_channel_accepted_a_byte_at_a_time_fails_at_the_deadline() {
        let dir = temp_dir("slow-accept");
        let path = dir.join("agent.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let Ok((mut conn, _)) = listener.accept() else {
                return;
            };
            let _: Hello = read_frame(&mut conn).unwrap();
            let accepted = Accepted {
                version: PROTOCOL_VERSION,
                error: None,
            };
            trickle(&mut conn, &crate::frame::encode(&accepted).unwrap());
        });
        let e = Endpoint::Unix(path)
            .open_within(Channel::Events, Duration::from_millis(200))
            .unwrap_err();
        assert!(matches!(e, ClientError::Timeout(_)), "{e:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn messages_leave_the_cause_to_the_source() {
        use std::error::Error;
        let errors = [
            ClientError::from(std::io::Error::from(std::io::ErrorKind::BrokenPipe)),
            ClientError::from(FrameError::Closed),
            ClientError::from(AgentError::new(crate::ErrorCode::NotFound, "no such thing")),
        ];
        for e in errors {
            let cause = e.source().expect("a source").to_string();
            assert!(!e.to_string().contains(&cause), "{e} repeats {cause}");
        }
    }
}
