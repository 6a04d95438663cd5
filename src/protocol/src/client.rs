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

impl Endpoint {
    /// Opens a connection for `channel`.
    pub fn open(&self, channel: Channel) -> Result<UnixStream, ClientError> {
        let mut s = match self {
            Endpoint::Unix(path) => UnixStream::connect(path)?,
            Endpoint::Vsock { uds, port } => {
                let mut s = UnixStream::connect(uds)?;
                s.set_read_timeout(Some(Duration::from_secs(10)))?;
                s.write_all(format!("CONNECT {port}\n").as_bytes())?;
                let line = read_line(&mut s)?;
                if !line.starts_with("OK ") {
                    return Err(ClientError::Handshake(format!("vsock answered {line:?}")));
                }
                s
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        write_frame(
            &mut s,
            &Hello {
                version: PROTOCOL_VERSION,
                channel,
            },
        )?;
        let accepted: Accepted = read_frame(&mut s)?;
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
    conn: UnixStream,
    next_id: u64,
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
                    conn,
                    next_id: 1,
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
    /// forever). A call that times out fails with an I/O error, and the
    /// connection should not be used again (a late reply would answer the
    /// next request).
    pub fn set_timeout(&self, timeout: Option<Duration>) -> Result<(), ClientError> {
        self.conn.set_read_timeout(timeout)?;
        self.conn.set_write_timeout(timeout)?;
        Ok(())
    }

    /// Sends one request and waits for its reply.
    pub fn call(&mut self, request: Request) -> Result<Response, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        write_frame(&mut self.conn, &RequestFrame { id, request })?;
        let reply: ReplyFrame = read_frame(&mut self.conn)?;
        if reply.id != id {
            return Err(ClientError::WrongReply {
                want: id,
                got: reply.id,
            });
        }
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
