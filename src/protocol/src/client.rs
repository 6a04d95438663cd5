//! The host side of the agent protocol: connects to husk-agent through the
//! VMM's vsock unix socket (`CONNECT <port>\n`, answered `OK <port>\n`) or,
//! for tests, the agent's own unix socket; opens control and stdio channels;
//! sends requests and matches replies by id.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::frame::{read_frame, write_frame, FrameError};
use crate::{
    Accepted, AgentError, Channel, Hello, ReplyFrame, Request, RequestFrame, Response, StdioStream,
    PROTOCOL_VERSION,
};

/// Why talking to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket failed.
    #[error("agent connection: {0}")]
    Io(#[from] std::io::Error),
    /// The vsock handshake or the agent's Hello answer went wrong.
    #[error("agent handshake: {0}")]
    Handshake(String),
    /// A frame could not be read or written.
    #[error("agent protocol: {0}")]
    Frame(#[from] FrameError),
    /// The agent refused the request.
    #[error("the agent refused: {0}")]
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

/// How long the VMM's vsock socket may take to answer `CONNECT`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the agent may take to accept a channel.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(30);

/// A failed read or write as the time-out it is, when it is one (the
/// sockets' timeouts surface as EAGAIN).
fn timed_out(e: ClientError, after: Duration) -> ClientError {
    let is_timeout = |e: &std::io::Error| {
        matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        )
    };
    match &e {
        ClientError::Io(io) | ClientError::Frame(FrameError::Io(io)) if is_timeout(io) => {
            ClientError::Timeout(after)
        }
        _ => e,
    }
}

impl Endpoint {
    /// Opens a connection for `channel`.
    pub fn open(&self, channel: Channel) -> Result<UnixStream, ClientError> {
        self.open_within(channel, None)
    }

    /// Opens a connection for `channel`, each step of the handshake taking
    /// at most `limit` (when shorter than its own default).
    pub fn open_within(
        &self,
        channel: Channel,
        limit: Option<Duration>,
    ) -> Result<UnixStream, ClientError> {
        let bound = |d: Duration| limit.map_or(d, |l| d.min(l));
        let (connect_timeout, accept_timeout) = (bound(CONNECT_TIMEOUT), bound(ACCEPT_TIMEOUT));
        let mut s = match self {
            Endpoint::Unix(path) => UnixStream::connect(path)?,
            Endpoint::Vsock { uds, port } => {
                let mut s = UnixStream::connect(uds)?;
                s.set_read_timeout(Some(connect_timeout))?;
                s.write_all(format!("CONNECT {port}\n").as_bytes())?;
                let line = read_line(&mut s).map_err(|e| timed_out(e, connect_timeout))?;
                if !line.starts_with("OK ") {
                    return Err(ClientError::Handshake(format!("vsock answered {line:?}")));
                }
                s
            }
        };
        s.set_read_timeout(Some(accept_timeout))?;
        write_frame(
            &mut s,
            &Hello {
                version: PROTOCOL_VERSION,
                channel,
            },
        )?;
        let accepted: Accepted =
            read_frame(&mut s).map_err(|e| timed_out(e.into(), accept_timeout))?;
        if let Some(e) = accepted.error {
            return Err(ClientError::Agent(e));
        }
        s.set_read_timeout(None)?;
        Ok(s)
    }
}

/// Reads one `\n`-terminated line (at most 64 bytes) byte by byte, so
/// nothing after it is consumed.
fn read_line(s: &mut UnixStream) -> Result<String, ClientError> {
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
    timeout: Option<Duration>,
}

impl AgentClient {
    /// Connects, retrying until the agent answers a Ping or `timeout`
    /// passes (the guest may still be booting).
    pub fn connect(endpoint: Endpoint, timeout: Duration) -> Result<Self, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            let attempt = endpoint.open(Channel::Control).and_then(|conn| {
                let mut c = AgentClient {
                    endpoint: endpoint.clone(),
                    conn: Some(conn),
                    next_id: 1,
                    timeout: None,
                };
                c.call(Request::Ping)?;
                Ok(c)
            });
            match attempt {
                Ok(c) => return Ok(c),
                Err(ClientError::Agent(e)) => return Err(ClientError::Agent(e)),
                Err(_) if Instant::now() >= deadline => return Err(ClientError::Timeout(timeout)),
                // Not listening yet (the guest is booting): try again.
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Bounds how long [`AgentClient::call`] waits for a reply (`None`:
    /// forever). A call that times out fails with
    /// [`ClientError::Timeout`]; the next call opens a new connection.
    pub fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<(), ClientError> {
        if let Some(conn) = &self.conn {
            conn.set_read_timeout(timeout)?;
            conn.set_write_timeout(timeout)?;
        }
        self.timeout = timeout;
        Ok(())
    }

    /// Whether the last call left the connection unusable (the next call
    /// reconnects first).
    pub fn is_broken(&self) -> bool {
        self.conn.is_none()
    }

    /// Sends one request and waits for its reply.
    pub fn call(&mut self, request: Request) -> Result<Response, ClientError> {
        let mut conn = match self.conn.take() {
            Some(c) => c,
            None => {
                let c = self.endpoint.open_within(Channel::Control, self.timeout)?;
                c.set_read_timeout(self.timeout)?;
                c.set_write_timeout(self.timeout)?;
                c
            }
        };
        let id = self.next_id;
        self.next_id += 1;
        let after = self.timeout.unwrap_or_default();
        write_frame(&mut conn, &RequestFrame { id, request })
            .map_err(|e| timed_out(e.into(), after))?;
        let reply: ReplyFrame = read_frame(&mut conn).map_err(|e| timed_out(e.into(), after))?;
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
}
