//! Serving the host: one thread per connection. The first frame of a
//! connection ([`Hello`]) names its channel; a control channel then carries
//! requests and replies until it closes. Nothing a host sends can end the
//! agent: a malformed frame gets an error reply (or, when the stream cannot
//! be resynchronised, the connection is closed), never a panic.

use std::io::Write;
use std::sync::Mutex;

use husk_protocol::frame::{self, FrameError};
use husk_protocol::{
    Accepted, AgentError, Channel, ErrorCode, Hello, ReplyFrame, Request, RequestFrame, Response,
    PROTOCOL_VERSION,
};

use crate::container;
use crate::transport::{Listener, Stream};
use crate::{log, Options};

/// Event-stream subscribers.
static EVENT_SINKS: Mutex<Vec<Box<dyn Stream>>> = Mutex::new(Vec::new());

/// Accepts connections until the listener fails.
pub fn serve(opts: &Options) -> std::io::Result<()> {
    let listener = match &opts.unix {
        Some(path) => Listener::unix(path)?,
        None => Listener::vsock(opts.port)?,
    };
    match &opts.unix {
        Some(p) => log::info(&format!("listening on {}", p.display())),
        None => log::info(&format!("listening on vsock port {}", opts.port)),
    }
    let pid1 = opts.pid1;
    container::init(pid1);
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
        let spawned = std::thread::Builder::new()
            .name("husk-agent-conn".into())
            .spawn(move || connection(conn, pid1));
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

fn connection(mut conn: Box<dyn Stream>, pid1: bool) {
    let hello: Hello = match frame::read_frame(&mut conn) {
        Ok(h) => h,
        Err(FrameError::Closed) => return,
        Err(e) => {
            log::debug(&format!("bad hello: {e}"));
            let _ = accept_reply(
                &mut *conn,
                Some(AgentError::new(ErrorCode::InvalidMessage, e.to_string())),
            );
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
                control(conn, pid1);
            }
        }
        Channel::Events => {
            if accept_reply(&mut *conn, None).is_ok() {
                events(conn);
            }
        }
        Channel::Stdio {
            container_id,
            exec_id,
            stream,
        } => match crate::container::attach(&container_id, exec_id.as_deref(), stream) {
            Ok(attachment) => {
                if accept_reply(&mut *conn, None).is_ok() {
                    attachment.run(conn);
                }
            }
            Err(e) => {
                let _ = accept_reply(&mut *conn, Some(e));
            }
        },
    }
}

/// Sends `event` to every subscriber; one that cannot take it is dropped.
pub fn publish(event: &husk_protocol::Event) {
    let Ok(bytes) = frame::encode(event) else {
        return;
    };
    EVENT_SINKS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain_mut(|s| s.write_all(&bytes).is_ok());
}

/// Keeps an event subscriber until it hangs up.
fn events(conn: Box<dyn Stream>) {
    let mut reader = match conn.try_clone_stream() {
        Ok(r) => r,
        Err(e) => {
            log::warn(&format!("event stream: {e}"));
            return;
        }
    };
    let fd = std::os::fd::AsRawFd::as_raw_fd(&*conn);
    // Events are written from the reaper's thread: a host that stops
    // reading must not hold up reaping for long (it is dropped instead).
    let timeout = libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    };
    // SAFETY: SO_SNDTIMEO with a timeval of the size passed.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    EVENT_SINKS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(conn);
    // The host sends nothing on this channel; EOF means it went away.
    let mut buf = [0u8; 64];
    while matches!(reader.read(&mut buf), Ok(n) if n > 0) {}
    EVENT_SINKS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|s| std::os::fd::AsRawFd::as_raw_fd(&**s) != fd);
}

fn control(mut conn: Box<dyn Stream>, pid1: bool) {
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
                        reply: Err(AgentError::new(ErrorCode::InvalidMessage, e.to_string())),
                    },
                );
                return;
            }
        };
        let (id, reply, shutdown) = match serde_json::from_slice::<RequestFrame>(&raw) {
            Ok(RequestFrame { id, request }) => {
                let shutdown = matches!(request, Request::Shutdown);
                (id, handle(request, pid1), shutdown)
            }
            Err(e) => {
                // Keep the id if the frame has one, so the host can match it.
                let id = serde_json::from_slice::<serde_json::Value>(&raw)
                    .ok()
                    .and_then(|v| v.get("id").and_then(serde_json::Value::as_u64))
                    .unwrap_or(0);
                (
                    id,
                    Err(AgentError::new(ErrorCode::InvalidMessage, e.to_string())),
                    false,
                )
            }
        };
        let ok = reply.is_ok();
        if frame::write_frame(&mut conn, &ReplyFrame { id, reply }).is_err() {
            return;
        }
        if shutdown && ok {
            crate::container::kill_all();
            crate::init::shutdown(pid1);
        }
    }
}

fn handle(request: Request, pid1: bool) -> Result<Response, AgentError> {
    log::debug(&format!("request {request:?}"));
    match request {
        Request::Ping => Ok(Response::Pong {
            version: PROTOCOL_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
        }),
        Request::CreateSandbox(s) => {
            let root = if pid1 {
                std::path::PathBuf::from("/")
            } else {
                // Host-side: files go under a scratch root, the system is
                // left alone.
                std::env::var_os("HUSK_AGENT_ROOT")
                    .map(Into::into)
                    .unwrap_or_else(|| std::env::temp_dir().join("husk-agent-root"))
            };
            crate::sandbox::apply(&s, &root, pid1).map(|()| Response::Ok)
        }
        Request::Shutdown => Ok(Response::Ok),
        Request::CreateContainer(c) => container::create(c),
        Request::StartContainer { container_id } => container::start(&container_id),
        Request::ExecProcess {
            container_id,
            exec_id,
            process,
        } => container::exec(&container_id, &exec_id, &process),
        Request::WaitProcess(p) => container::wait(&p),
        Request::SignalProcess {
            process,
            signal,
            all,
        } => container::signal(&process, signal, all),
        Request::ResizeTty {
            process,
            rows,
            cols,
        } => container::resize(&process, rows, cols),
        Request::CloseStdin(p) => container::close_stdin(&p),
        Request::StatsContainer { container_id } => container::stats(&container_id),
        Request::ListProcesses { container_id } => container::list(&container_id),
        Request::UpdateContainer {
            container_id,
            resources,
        } => container::update(&container_id, &resources),
        Request::RemoveContainer { container_id } => container::remove(&container_id),
        Request::ListProcessStates => Ok(container::process_states()),
    }
}
