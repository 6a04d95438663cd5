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
    /// SetOnlineCpus: the vCPUs online afterwards, and those present.
    fn set_online_cpus(&self, online: u32) -> Result<(u32, u32), AgentError>;
    /// PrepareTemplate: the bytes of free memory zeroed.
    fn prepare_template(&self) -> Result<u64, AgentError>;
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
        Channel::PortForward { port } => match crate::forward::connect(port) {
            Ok(pod) => {
                if accept_reply(&mut *conn, None).is_ok() {
                    crate::forward::run(conn, pod);
                }
            }
            Err(e) => {
                let _ = accept_reply(&mut *conn, Some(e));
            }
        },
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
        Request::SetOnlineCpus { online } => agent
            .set_online_cpus(online)
            .map(|(online, present)| Response::Cpus { online, present }),
        Request::PrepareTemplate => agent
            .prepare_template()
            .map(|zeroed_bytes| Response::TemplatePrepared { zeroed_bytes }),
        Request::ListProcessStates => Ok(Response::ProcessStates {
            processes: agent.process_states(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::os::unix::net::UnixStream;
    use std::sync::Mutex;
    use std::time::Duration;

    use husk_protocol::Event;
    use serde_json::{json, Value};

    use super::*;
    use crate::events::WRITE_TIMEOUT;
    use crate::reaper::{Reaper, FORK_TESTS};
    use crate::transport::fake::{self, Host};

    /// Stands in for the runtime: records each call as a line and answers
    /// with fixed values, so a reply shows which method it came from.
    #[derive(Default)]
    struct FakeAgent {
        calls: Mutex<Vec<String>>,
    }

    impl FakeAgent {
        fn called(&self, call: String) {
            self.calls.lock().unwrap().push(call);
        }

        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
    }

    fn name(p: &ProcessRef) -> String {
        format!("{}/{}", p.container_id, p.exec_id.as_deref().unwrap_or("-"))
    }

    impl Agent for FakeAgent {
        fn create_sandbox(&self, s: &Sandbox) -> Result<(), AgentError> {
            self.called(format!("create_sandbox {:?}", s.hostname));
            Ok(())
        }
        fn create_container(&self, r: CreateContainer) -> Result<u32, AgentError> {
            self.called(format!(
                "create_container {} {}",
                r.container_id, r.rootfs.drive_id
            ));
            Ok(41)
        }
        fn start_container(&self, id: &str) -> Result<(), AgentError> {
            self.called(format!("start_container {id}"));
            Ok(())
        }
        fn exec_process(&self, id: &str, exec_id: &str, p: &Process) -> Result<u32, AgentError> {
            self.called(format!("exec_process {id}/{exec_id} {:?}", p.args()));
            Ok(42)
        }
        fn wait_process(&self, p: &ProcessRef) -> Result<ExitStatus, AgentError> {
            self.called(format!("wait_process {}", name(p)));
            Ok(ExitStatus::Signal(9))
        }
        fn signal_process(&self, p: &ProcessRef, sig: i32, all: bool) -> Result<(), AgentError> {
            self.called(format!("signal_process {} {sig} {all}", name(p)));
            Ok(())
        }
        fn resize_tty(&self, p: &ProcessRef, rows: u16, cols: u16) -> Result<(), AgentError> {
            self.called(format!("resize_tty {} {rows}x{cols}", name(p)));
            Ok(())
        }
        fn close_stdin(&self, p: &ProcessRef) -> Result<(), AgentError> {
            self.called(format!("close_stdin {}", name(p)));
            Ok(())
        }
        fn stats(&self, id: &str) -> Result<Stats, AgentError> {
            self.called(format!("stats {id}"));
            Ok(Stats {
                pids: 3,
                ..Stats::default()
            })
        }
        fn list_processes(&self, id: &str) -> Result<Vec<u32>, AgentError> {
            self.called(format!("list_processes {id}"));
            Ok(vec![7, 8])
        }
        fn update_container(&self, id: &str, r: &LinuxResources) -> Result<(), AgentError> {
            let limit = r.pids().as_ref().map(|p| p.limit());
            self.called(format!("update_container {id} {limit:?}"));
            Ok(())
        }
        fn remove_container(&self, id: &str) -> Result<(), AgentError> {
            self.called(format!("remove_container {id}"));
            Err(AgentError::new(ErrorCode::FailedPrecondition, "it runs"))
        }
        fn set_online_cpus(&self, online: u32) -> Result<(u32, u32), AgentError> {
            self.called(format!("set_online_cpus {online}"));
            Ok((online, 4))
        }
        fn prepare_template(&self) -> Result<u64, AgentError> {
            self.called("prepare_template".to_string());
            Ok(1 << 20)
        }
        fn process_states(&self) -> Vec<ProcessState> {
            self.called("process_states".into());
            vec![ProcessState {
                process: ProcessRef {
                    container_id: "c1".into(),
                    exec_id: None,
                },
                pid: 41,
                exit: Some(ExitStatus::Code(0)),
            }]
        }
        fn attach(&self, p: &ProcessRef, stream: StdioStream) -> Result<Attachment, AgentError> {
            self.called(format!("attach {} {stream:?}", name(p)));
            if p.container_id != "c1" {
                return Err(AgentError::new(ErrorCode::NotFound, "no such container"));
            }
            // The process's output, already written and complete.
            let path =
                std::env::temp_dir().join(format!("husk-agent-server-test-{}", std::process::id()));
            std::fs::write(&path, b"hello\n").unwrap();
            let out = File::open(&path).unwrap();
            std::fs::remove_file(&path).unwrap();
            Ok(Attachment::Out(out))
        }
        fn shutdown(&self) {
            self.called("shutdown".into());
        }
    }

    fn hello(channel: Value) -> Value {
        json!({"version": PROTOCOL_VERSION, "channel": channel})
    }

    fn request(id: u64, request: Value) -> Value {
        json!({"id": id, "request": request})
    }

    /// Serves one fake connection on which the host has already sent
    /// `frames` (and then hung up, if `hang_up`) to its end; returns what
    /// the agent wrote.
    fn serve_frames(agent: &FakeAgent, frames: &[Value], hang_up: bool) -> Vec<Value> {
        let (conn, host) = fake::pair();
        for f in frames {
            host.send_frame(f);
        }
        if hang_up {
            host.hang_up();
        }
        let (events, _published) = Events::channel();
        connection(Box::new(conn), agent, &events);
        host.frames()
    }

    fn accepted(frame: &Value) -> Accepted {
        serde_json::from_value(frame.clone()).unwrap()
    }

    fn reply(frame: &Value) -> ReplyFrame {
        serde_json::from_value(frame.clone()).unwrap()
    }

    #[test]
    fn every_request_reaches_its_handler_and_is_answered_in_order_with_its_id() {
        let process = ProcessRef {
            container_id: "c1".into(),
            exec_id: Some("e1".into()),
        };
        let cases: Vec<(Value, Option<&str>, Result<Response, ErrorCode>)> = vec![
            (
                json!({"type": "ping"}),
                None,
                Ok(Response::Pong {
                    version: PROTOCOL_VERSION,
                    agent_version: env!("CARGO_PKG_VERSION").into(),
                }),
            ),
            (
                json!({"type": "create_sandbox", "hostname": "pod"}),
                Some("create_sandbox Some(\"pod\")"),
                Ok(Response::Ok),
            ),
            (
                json!({"type": "create_container", "container_id": "c1",
                       "spec": {"ociVersion": "1.0.2"},
                       "rootfs": {"drive_id": "r1", "fstype": "ext4"}}),
                Some("create_container c1 r1"),
                Ok(Response::Started { pid: 41 }),
            ),
            (
                json!({"type": "start_container", "container_id": "c1"}),
                Some("start_container c1"),
                Ok(Response::Ok),
            ),
            (
                json!({"type": "exec_process", "container_id": "c1", "exec_id": "e1",
                       "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}}}),
                Some("exec_process c1/e1 Some([\"sh\"])"),
                Ok(Response::Started { pid: 42 }),
            ),
            (
                json!({"type": "wait_process", "container_id": "c1", "exec_id": "e1"}),
                Some("wait_process c1/e1"),
                Ok(Response::Exited(ExitStatus::Signal(9))),
            ),
            (
                json!({"type": "signal_process", "container_id": "c1", "signal": 15, "all": true}),
                Some("signal_process c1/- 15 true"),
                Ok(Response::Ok),
            ),
            (
                json!({"type": "resize_tty", "container_id": "c1", "exec_id": "e1",
                       "rows": 24, "cols": 80}),
                Some("resize_tty c1/e1 24x80"),
                Ok(Response::Ok),
            ),
            (
                serde_json::to_value(Request::CloseStdin(process.clone())).unwrap(),
                Some("close_stdin c1/e1"),
                Ok(Response::Ok),
            ),
            (
                json!({"type": "stats_container", "container_id": "c1"}),
                Some("stats c1"),
                Ok(Response::Stats(Stats {
                    pids: 3,
                    ..Stats::default()
                })),
            ),
            (
                json!({"type": "list_processes", "container_id": "c1"}),
                Some("list_processes c1"),
                Ok(Response::Processes { pids: vec![7, 8] }),
            ),
            (
                json!({"type": "update_container", "container_id": "c1",
                       "resources": {"pids": {"limit": 5}}}),
                Some("update_container c1 Some(5)"),
                Ok(Response::Ok),
            ),
            (
                json!({"type": "remove_container", "container_id": "c1"}),
                Some("remove_container c1"),
                Err(ErrorCode::FailedPrecondition),
            ),
            (
                json!({"type": "set_online_cpus", "online": 3}),
                Some("set_online_cpus 3"),
                Ok(Response::Cpus {
                    online: 3,
                    present: 4,
                }),
            ),
            (
                json!({"type": "prepare_template"}),
                Some("prepare_template"),
                Ok(Response::TemplatePrepared {
                    zeroed_bytes: 1 << 20,
                }),
            ),
            (
                json!({"type": "list_process_states"}),
                Some("process_states"),
                Ok(Response::ProcessStates {
                    processes: vec![ProcessState {
                        process: ProcessRef {
                            container_id: "c1".into(),
                            exec_id: None,
                        },
                        pid: 41,
                        exit: Some(ExitStatus::Code(0)),
                    }],
                }),
            ),
            (json!({"type": "shutdown"}), None, Ok(Response::Ok)),
        ];
        let mut frames = vec![hello(json!({"kind": "control"}))];
        for (i, (req, _, _)) in cases.iter().enumerate() {
            frames.push(request(100 + i as u64, req.clone()));
        }
        // After Shutdown nothing more is served.
        frames.push(request(999, json!({"type": "ping"})));
        let agent = FakeAgent::default();
        // The host does not hang up: the connection ends after Shutdown.
        let out = serve_frames(&agent, &frames, false);
        assert!(accepted(&out[0]).error.is_none());
        assert_eq!(out.len(), 1 + cases.len(), "{out:#?}");
        for (i, (frame, (req, _, want))) in out[1..].iter().zip(&cases).enumerate() {
            let r = reply(frame);
            assert_eq!(r.id, 100 + i as u64, "{req}");
            match (r.reply, want) {
                (Ok(got), Ok(want)) => assert_eq!(&got, want, "{req}"),
                (Err(got), Err(want)) => assert_eq!(&got.code, want, "{req}"),
                (got, want) => panic!("{req}: {got:?}, want {want:?}"),
            }
        }
        let mut want: Vec<String> = cases
            .iter()
            .filter_map(|(_, call, _)| call.map(str::to_string))
            .collect();
        want.push("shutdown".into());
        assert_eq!(agent.calls(), want);
    }

    #[test]
    fn a_malformed_request_gets_invalid_message_and_the_connection_stays_usable() {
        let (conn, host) = fake::pair();
        host.send_frame(&hello(json!({"kind": "control"})));
        host.send_frame(&request(5, json!({"type": "no_such_request"})));
        host.send_frame(&json!(["not", "a", "request"]));
        let mut not_json = 3u32.to_be_bytes().to_vec();
        not_json.extend_from_slice(b"{{{");
        host.send(&not_json);
        host.send_frame(&request(6, json!({"type": "ping"})));
        host.hang_up();
        let (events, _published) = Events::channel();
        let agent = FakeAgent::default();
        connection(Box::new(conn), &agent, &events);
        let out = host.frames();
        assert_eq!(out.len(), 5, "{out:#?}");
        for (frame, id) in out[1..4].iter().zip([5, 0, 0]) {
            let r = reply(frame);
            assert_eq!(r.id, id);
            assert_eq!(r.reply.unwrap_err().code, ErrorCode::InvalidMessage);
        }
        assert!(matches!(reply(&out[4]).reply, Ok(Response::Pong { .. })));
        assert!(agent.calls().is_empty());
    }

    #[test]
    fn an_oversized_or_truncated_frame_is_refused_and_the_connection_closed() {
        let too_big = (frame::MAX_FRAME as u32 + 1).to_be_bytes();
        let mut truncated = 100u32.to_be_bytes().to_vec();
        truncated.extend_from_slice(b"{\"id\": 1");
        for bad in [&too_big[..], &truncated[..]] {
            let (conn, host) = fake::pair();
            host.send_frame(&hello(json!({"kind": "control"})));
            host.send(bad);
            if bad.len() == 4 {
                // Never read: the connection is closed after the error.
                host.send_frame(&request(2, json!({"type": "ping"})));
            } else {
                host.hang_up();
            }
            let (events, _published) = Events::channel();
            connection(Box::new(conn), &FakeAgent::default(), &events);
            let out = host.frames();
            assert_eq!(out.len(), 2, "{out:#?}");
            let r = reply(&out[1]);
            assert_eq!(r.id, 0);
            assert_eq!(r.reply.unwrap_err().code, ErrorCode::InvalidMessage);
        }
    }

    #[test]
    fn a_bad_hello_or_another_version_is_refused_and_closed() {
        let agent = FakeAgent::default();
        let out = serve_frames(&agent, &[json!({"version": 1})], false);
        assert_eq!(out.len(), 1);
        let a = accepted(&out[0]);
        assert_eq!(a.error.unwrap().code, ErrorCode::InvalidMessage);

        let out = serve_frames(
            &agent,
            &[
                json!({"version": PROTOCOL_VERSION + 1, "channel": {"kind": "control"}}),
                request(1, json!({"type": "ping"})),
            ],
            false,
        );
        assert_eq!(out.len(), 1, "nothing is served after the refusal");
        let a = accepted(&out[0]);
        assert_eq!(a.version, PROTOCOL_VERSION);
        assert_eq!(a.error.unwrap().code, ErrorCode::UnsupportedVersion);

        // A host that leaves before saying hello gets nothing.
        assert!(serve_frames(&agent, &[], true).is_empty());
        assert!(agent.calls().is_empty());
    }

    #[test]
    fn a_stdio_channel_is_accepted_and_copies_or_refused_with_the_reason() {
        let agent = FakeAgent::default();
        let (conn, host) = fake::pair();
        host.send_frame(&hello(
            json!({"kind": "stdio", "container_id": "c1", "stream": "stdout"}),
        ));
        let (events, _published) = Events::channel();
        connection(Box::new(conn), &agent, &events);
        assert!(accepted(&host.frames()[0]).error.is_none());
        let accepted_len = frame::encode(&Accepted {
            version: PROTOCOL_VERSION,
            error: None,
        })
        .unwrap()
        .len();
        assert_eq!(&host.written()[accepted_len..], b"hello\n");

        let out = serve_frames(
            &agent,
            &[hello(
                json!({"kind": "stdio", "container_id": "c9", "exec_id": "e", "stream": "stdin"}),
            )],
            false,
        );
        assert_eq!(accepted(&out[0]).error.unwrap().code, ErrorCode::NotFound);
        assert_eq!(agent.calls(), ["attach c1/- Stdout", "attach c9/e Stdin"]);
    }

    /// An event subscriber served on its own thread, as the server does.
    fn subscriber(events: &Events) -> (Host, std::thread::JoinHandle<()>) {
        let (conn, host) = fake::pair();
        host.send_frame(&hello(json!({"kind": "events"})));
        let events = events.clone();
        let thread =
            std::thread::spawn(move || connection(Box::new(conn), &FakeAgent::default(), &events));
        let out = host.wait_for_frames(1);
        assert!(accepted(&out[0]).error.is_none());
        (host, thread)
    }

    fn exit(code: i32) -> Event {
        Event::ProcessExited {
            process: ProcessRef {
                container_id: "c1".into(),
                exec_id: None,
            },
            status: ExitStatus::Code(code),
        }
    }

    fn event(frame: &Value) -> Event {
        serde_json::from_value(frame.clone()).unwrap()
    }

    #[test]
    fn an_event_subscriber_that_stops_reading_is_dropped_and_shut_down() {
        let events = Events::start(WRITE_TIMEOUT).unwrap();
        let (slow, slow_thread) = subscriber(&events);
        let (fine, fine_thread) = subscriber(&events);
        slow.stop_reading();
        events.publish(exit(1));
        slow.wait_for_shutdown();
        assert!(!slow.blocked_for_ever(), "the write had no timeout");
        // Shut down both ways: the agent's thread reading it ends too.
        slow_thread.join().unwrap();
        events.publish(exit(2));
        let out = fine.wait_for_frames(3);
        assert_eq!(event(&out[1]), exit(1));
        assert_eq!(event(&out[2]), exit(2));
        assert!(!fine.is_shut_down());
        fine.hang_up();
        fine_thread.join().unwrap();
    }

    #[test]
    fn two_subscribers_both_get_an_exit_the_reaper_reaps() {
        let _serial = FORK_TESTS.lock().unwrap_or_else(|e| e.into_inner());
        let events = Events::start(WRITE_TIMEOUT).unwrap();
        let reaper = Reaper::new(events.clone());
        let (a, a_thread) = subscriber(&events);
        let (b, b_thread) = subscriber(&events);
        let guard = reaper.lock();
        // SAFETY: the child only calls _exit.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: _exit(2) in the forked child, which touches nothing else.
            unsafe { libc::_exit(3) };
        }
        let who = ProcessRef {
            container_id: "c1".into(),
            exec_id: None,
        };
        let exited = guard.register(pid, who);
        while exited.status().is_none() {
            reaper.reap();
            std::thread::sleep(Duration::from_millis(5));
        }
        for host in [&a, &b] {
            let out = host.wait_for_frames(2);
            assert_eq!(event(&out[1]), exit(3));
        }
        for (host, thread) in [(a, a_thread), (b, b_thread)] {
            host.hang_up();
            thread.join().unwrap();
        }
    }

    #[test]
    fn a_subscriber_that_hangs_up_is_removed_and_the_newer_one_stays() {
        let events = Events::start(WRITE_TIMEOUT).unwrap();
        let (old, old_thread) = subscriber(&events);
        let (new, new_thread) = subscriber(&events);
        old.hang_up();
        // Its thread has unsubscribed it when it ends.
        old_thread.join().unwrap();
        events.publish(exit(5));
        let out = new.wait_for_frames(2);
        assert_eq!(event(&out[1]), exit(5));
        assert_eq!(old.frames().len(), 1, "only Accepted");
        new.hang_up();
        new_thread.join().unwrap();
    }

    /// A real socket that tells the test when the agent shut it down, so
    /// the host can stay away from it until then however slow the machine.
    struct Watched {
        socket: UnixStream,
        shut: std::sync::mpsc::Sender<()>,
    }

    impl std::io::Read for Watched {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.socket.read(buf)
        }
    }

    impl std::io::Write for Watched {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.socket.write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.socket.flush()
        }
    }

    impl Stream for Watched {
        fn try_clone_stream(&self) -> std::io::Result<Box<dyn Stream>> {
            Ok(Box::new(Watched {
                socket: self.socket.try_clone()?,
                shut: self.shut.clone(),
            }))
        }
        fn set_write_timeout(&self, timeout: Duration) -> std::io::Result<()> {
            Stream::set_write_timeout(&self.socket, timeout)
        }
        fn shutdown(&self) -> std::io::Result<()> {
            let result = Stream::shutdown(&self.socket);
            let _ = self.shut.send(());
            result
        }
    }

    #[test]
    fn a_host_that_stops_reading_a_real_socket_then_reads_end_of_file() {
        // The bug this guards against: the agent dropped its writing handle
        // but the reading duplicate kept the socket open, so the host saw
        // neither events nor end of file.
        use std::io::Read;
        let (agent_end, mut host_end) = UnixStream::pair().unwrap();
        let (shut, was_shut) = std::sync::mpsc::channel();
        let agent_end = Watched {
            socket: agent_end,
            shut,
        };
        let events = Events::start(Duration::from_millis(50)).unwrap();
        let thread = {
            let events = events.clone();
            std::thread::spawn(move || {
                connection(Box::new(agent_end), &FakeAgent::default(), &events)
            })
        };
        frame::write_frame(&mut host_end, &hello(json!({"kind": "events"}))).unwrap();
        let a: Accepted = frame::read_frame(&mut host_end).unwrap();
        assert!(a.error.is_none());
        // The host reads nothing while the socket's buffers fill up.
        for code in 0..100_000 {
            events.publish(exit(code));
        }
        // Reading before the publisher gave up would drain the buffers and
        // let every event through; wait (bounded) for the shutdown instead.
        was_shut
            .recv_timeout(Duration::from_secs(30))
            .expect("the publisher shuts down a subscriber that stopped reading");
        // A bound on a hang, not a timing assertion.
        host_end
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut rest = Vec::new();
        host_end
            .read_to_end(&mut rest)
            .expect("end of file, not a timeout");
        thread.join().unwrap();
    }
}
