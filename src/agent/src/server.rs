//! Serving the host: one thread per connection. The first frame of a
//! connection ([`Hello`]) names its channel; a control channel then carries
//! requests and replies until it closes, a stdio channel one stream of one
//! process, an event channel is handed to the event publisher
//! ([`crate::events`]). Nothing a host sends can end the agent: a malformed
//! frame gets an error reply (or, when the stream cannot be
//! resynchronised, the connection is closed), never a panic.
//!
//! The server knows the rest of the agent only through [`Agent`], one
//! method per request, and the host only through
//! [`crate::transport::Stream`]; its unit tests put fakes behind both.

use std::io::Read;
use std::sync::Arc;

use husk_protocol::frame::{self, FrameError};
use husk_protocol::{
    Accepted, AgentError, Channel, CreateContainer, ErrorCode, ExitStatus, Hello, ProcessRef,
    ProcessState, ReplyFrame, Request, RequestFrame, Response, Sandbox, Stats, StdioStream,
    PROTOCOL_VERSION,
};
use oci_spec::runtime::{LinuxResources, Process};

use crate::config::Listen;
use crate::container::stdio::Attachment;
use crate::events::Events;
use crate::transport::{Listener, Stream};
use crate::{error, log};

/// What the server asks of the agent: one method per request. The real
/// one is [`crate::runtime::Runtime`].
pub trait Agent: Send + Sync {
    /// CreateSandbox.
    fn create_sandbox(&self, sandbox: &Sandbox) -> Result<(), AgentError>;
    /// CreateContainer: the init's pid.
    fn create_container(&self, request: CreateContainer) -> Result<u32, AgentError>;
    /// StartContainer.
    fn start_container(&self, id: &str) -> Result<(), AgentError>;
    /// ExecProcess: the new process's pid.
    fn exec_process(&self, id: &str, exec_id: &str, process: &Process) -> Result<u32, AgentError>;
    /// WaitProcess (blocks until the process has exited).
    fn wait_process(&self, process: &ProcessRef) -> Result<ExitStatus, AgentError>;
    /// SignalProcess.
    fn signal_process(
        &self,
        process: &ProcessRef,
        signal: i32,
        all: bool,
    ) -> Result<(), AgentError>;
    /// ResizeTty.
    fn resize_tty(&self, process: &ProcessRef, rows: u16, cols: u16) -> Result<(), AgentError>;
    /// CloseStdin.
    fn close_stdin(&self, process: &ProcessRef) -> Result<(), AgentError>;
    /// StatsContainer.
    fn stats(&self, id: &str) -> Result<Stats, AgentError>;
    /// ListProcesses: the container's pids.
    fn list_processes(&self, id: &str) -> Result<Vec<u32>, AgentError>;
    /// UpdateContainer.
    fn update_container(&self, id: &str, resources: &LinuxResources) -> Result<(), AgentError>;
    /// RemoveContainer.
    fn remove_container(&self, id: &str) -> Result<(), AgentError>;
    /// ListProcessStates.
    fn process_states(&self) -> Vec<ProcessState>;
    /// A stdio channel's stream of one process.
    fn attach(&self, process: &ProcessRef, stream: StdioStream) -> Result<Attachment, AgentError>;
    /// Shutdown, after its reply went out: stop the containers and end the
    /// guest (the real agent does not return).
    fn shutdown(&self);
}

/// Why the agent cannot serve the host.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The listening socket could not be made.
    #[error("cannot listen on {at}")]
    Listen {
        /// Where.
        at: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Listens where `listen` says and serves every connection on a thread of
/// its own; returns only if it cannot listen.
pub fn serve(listen: &Listen, agent: Arc<dyn Agent>, events: Events) -> Result<(), ServeError> {
    let (listener, at) = match listen {
        Listen::Unix(path) => (Listener::unix(path), path.display().to_string()),
        Listen::Vsock(port) => (Listener::vsock(*port), format!("vsock port {port}")),
    };
    let listener = listener.map_err(|source| ServeError::Listen {
        at: at.clone(),
        source,
    })?;
    log::info(&format!("listening on {at}"));
    loop {
        let conn = match listener.accept() {
            Ok(c) => c,
            Err(e) => {
                // Out of fds or memory: keep serving the connections we have.
                log::warn(&format!("accept: {e}"));
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        };
        let (agent, events) = (agent.clone(), events.clone());
        let spawned = std::thread::Builder::new()
            .name("husk-agent-conn".into())
            .spawn(move || connection(conn, &*agent, &events));
        if let Err(e) = spawned {
            log::warn(&format!("cannot start a connection thread: {e}"));
        }
    }
}

fn accept_reply(mut conn: &mut dyn Stream, error: Option<AgentError>) -> Result<(), FrameError> {
    frame::write_frame(
        &mut conn,
        &Accepted {
            version: PROTOCOL_VERSION,
            error,
        },
    )
}

/// Serves one connection until it closes.
pub fn connection(mut conn: Box<dyn Stream>, agent: &dyn Agent, events: &Events) {
    let hello: Hello = match frame::read_frame(&mut conn) {
        Ok(h) => h,
        Err(FrameError::Closed) => return,
        Err(e) => {
            let error = error::reply_from(ErrorCode::InvalidMessage, &e);
            log::debug(&format!("bad hello: {}", error.message));
            let _ = accept_reply(&mut *conn, Some(error));
            return;
        }
    };
    if hello.version != PROTOCOL_VERSION {
        let _ = accept_reply(
            &mut *conn,
            Some(AgentError::new(
                ErrorCode::UnsupportedVersion,
                format!(
                    "this agent speaks protocol version {PROTOCOL_VERSION}, not {}",
                    hello.version
                ),
            )),
        );
        return;
    }
    match hello.channel {
        Channel::Control => {
            if accept_reply(&mut *conn, None).is_ok() {
                control(conn, agent);
            }
        }
        Channel::Events => subscribe(conn, events),
        Channel::Stdio {
            container_id,
            exec_id,
            stream,
        } => {
            let process = ProcessRef {
                container_id,
                exec_id,
            };
            match agent.attach(&process, stream) {
                Ok(attachment) => {
                    if accept_reply(&mut *conn, None).is_ok() {
                        attachment.run(conn);
                    }
                }
                Err(e) => {
                    let _ = accept_reply(&mut *conn, Some(e));
                }
            }
        }
    }
}

/// An event channel: the publisher answers the Hello and owns the
/// connection's writing; this thread only notices the host hanging up (or
/// the publisher shutting the connection down) and then unsubscribes.
fn subscribe(conn: Box<dyn Stream>, events: &Events) {
    let mut reader = match conn.try_clone_stream() {
        Ok(r) => r,
        Err(e) => {
            let mut conn = conn;
            let _ = accept_reply(
                &mut *conn,
                Some(error::reply(
                    ErrorCode::System,
                    "cannot keep the event connection",
                    &e,
                )),
            );
            return;
        }
    };
    let id = events.subscribe(conn);
    // The host sends nothing on this channel; end of file means it went
    // away, or the publisher closed the connection.
    let mut buf = [0u8; 64];
    while matches!(reader.read(&mut buf), Ok(n) if n > 0) {}
    events.unsubscribe(id);
}

fn control(mut conn: Box<dyn Stream>, agent: &dyn Agent) {
    loop {
        let raw = match frame::read_raw(&mut conn) {
            Ok(Some(raw)) => raw,
            Ok(None) => return,
            Err(e) => {
                // An oversized or truncated frame: the stream cannot be
                // resynchronised. Say why, then close.
                let _ = frame::write_frame(
                    &mut conn,
                    &ReplyFrame {
                        id: 0,
                        reply: Err(error::reply_from(ErrorCode::InvalidMessage, &e)),
                    },
                );
                return;
            }
        };
        let (id, reply, shutdown) = match serde_json::from_slice::<RequestFrame>(&raw) {
            Ok(RequestFrame { id, request }) => {
                let shutdown = matches!(request, Request::Shutdown);
                (id, handle(agent, request), shutdown)
            }
            Err(e) => {
                // Keep the id if the frame has one, so the host can match it.
                let id = serde_json::from_slice::<serde_json::Value>(&raw)
                    .ok()
                    .and_then(|v| v.get("id").and_then(serde_json::Value::as_u64))
                    .unwrap_or(0);
                (
                    id,
                    Err(error::reply_from(ErrorCode::InvalidMessage, &e)),
                    false,
                )
            }
        };
        let ok = reply.is_ok();
        if frame::write_frame(&mut conn, &ReplyFrame { id, reply }).is_err() {
            return;
        }
        if shutdown && ok {
            agent.shutdown();
            return;
        }
    }
}

/// Routes one request to the agent and shapes its reply.
pub fn handle(agent: &dyn Agent, request: Request) -> Result<Response, AgentError> {
    log::debug(&format!("request {request:?}"));
    match request {
        Request::Ping => Ok(Response::Pong {
            version: PROTOCOL_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
        }),
        Request::CreateSandbox(s) => agent.create_sandbox(&s).map(|()| Response::Ok),
        Request::Shutdown => Ok(Response::Ok),
        Request::CreateContainer(c) => agent
            .create_container(c)
            .map(|pid| Response::Started { pid }),
        Request::StartContainer { container_id } => {
            agent.start_container(&container_id).map(|()| Response::Ok)
        }
        Request::ExecProcess {
            container_id,
            exec_id,
            process,
        } => agent
            .exec_process(&container_id, &exec_id, &process)
            .map(|pid| Response::Started { pid }),
        Request::WaitProcess(p) => agent.wait_process(&p).map(Response::Exited),
        Request::SignalProcess {
            process,
            signal,
            all,
        } => agent
            .signal_process(&process, signal, all)
            .map(|()| Response::Ok),
        Request::ResizeTty {
            process,
            rows,
            cols,
        } => agent
            .resize_tty(&process, rows, cols)
            .map(|()| Response::Ok),
        Request::CloseStdin(p) => agent.close_stdin(&p).map(|()| Response::Ok),
        Request::StatsContainer { container_id } => agent.stats(&container_id).map(Response::Stats),
        Request::ListProcesses { container_id } => agent
            .list_processes(&container_id)
            .map(|pids| Response::Processes { pids }),
        Request::UpdateContainer {
            container_id,
            resources,
        } => agent
            .update_container(&container_id, &resources)
            .map(|()| Response::Ok),
        Request::RemoveContainer { container_id } => {
            agent.remove_container(&container_id).map(|()| Response::Ok)
        }
        Request::ListProcessStates => Ok(Response::ProcessStates {
            processes: agent.process_states(),
        }),
    }
}
