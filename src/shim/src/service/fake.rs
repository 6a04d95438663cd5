//! Stand-ins for the task service's collaborators in its unit tests:
//! [`FakeVm`] for husk and the agent in its guest, [`FakeStdio`] for a
//! process's stdio plumbing, [`Events`] for containerd's event service.
//! The fake agent answers as husk-agent does for a well-behaved guest (a
//! signal ends the process and sends its exit on the event stream); a
//! test makes it slow, silent or hostile with a hook. Everything asked of
//! the VM is written to a journal, in order.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use containerd_shim::protos::events::task::{TaskExit, TaskOOM};
use containerd_shim::protos::protobuf::{MessageDyn, MessageFull};
use husk_protocol::client::ClientError;
use husk_protocol::{
    AgentError, ErrorCode, Event, ExitStatus, FrameError, ProcessRef, ProcessState, Request,
    Response, Stats, PROTOCOL_VERSION,
};

use crate::io::StdioPaths;
use crate::pod::{EventStream, PodDir, PodVm, ProcessStdio, Publisher, VmLauncher, VmSpec};
use crate::slots::SlotSpec;
use crate::vm::VmError;

/// Answers a request instead of the fake agent when it returns `Some`.
pub type Hook = Arc<dyn Fn(&Request) -> Option<Result<Response, ClientError>> + Send + Sync>;

/// A process as the fake agent keeps it.
struct Proc {
    pid: u32,
    exit: Option<ExitStatus>,
}

/// husk and its guest's agent.
pub struct FakeVm {
    journal: Mutex<Vec<String>>,
    hook: Mutex<Option<Hook>>,
    procs: Mutex<BTreeMap<(String, Option<String>), Proc>>,
    next_pid: AtomicU32,
    end: Mutex<Option<String>>,
    ended: Condvar,
    /// The open event stream's sending end.
    stream: Mutex<Option<Sender<Event>>>,
    /// How many event streams were opened.
    pub streams: AtomicUsize,
    /// Whether processes' output stays open until they are finished.
    pub output_lingers: AtomicBool,
    stdio: Mutex<Vec<Arc<FakeStdio>>>,
    /// Where it was booted.
    pub dir: Mutex<Option<PodDir>>,
    /// What husk's log ends with.
    pub log: Mutex<String>,
    /// The memory plugged from the hot-pluggable region (MiB).
    pub plugged: AtomicU64,
    /// Whether the guest leaves requested memory unplugged.
    pub plug_stalls: AtomicBool,
    /// How it was booted.
    pub spec: Mutex<Option<VmSpec>>,
}

fn kind(request: &Request) -> String {
    let json = serde_json::to_value(request).unwrap_or_default();
    json["type"].as_str().unwrap_or("?").to_string()
}

fn refused(code: ErrorCode, message: &str) -> Result<Response, ClientError> {
    Err(ClientError::Agent(AgentError::new(code, message)))
}

impl FakeVm {
    /// A VM whose agent is well-behaved.
    pub fn new() -> Arc<FakeVm> {
        Arc::new(FakeVm {
            journal: Mutex::new(Vec::new()),
            hook: Mutex::new(None),
            procs: Mutex::new(BTreeMap::new()),
            next_pid: AtomicU32::new(100),
            end: Mutex::new(None),
            ended: Condvar::new(),
            stream: Mutex::new(None),
            streams: AtomicUsize::new(0),
            output_lingers: AtomicBool::new(false),
            stdio: Mutex::new(Vec::new()),
            dir: Mutex::new(None),
            log: Mutex::new(String::new()),
            plugged: AtomicU64::new(0),
            plug_stalls: AtomicBool::new(false),
            spec: Mutex::new(None),
        })
    }

    /// Lets `hook` answer first.
    pub fn hook(
        &self,
        hook: impl Fn(&Request) -> Option<Result<Response, ClientError>> + Send + Sync + 'static,
    ) {
        *self.hook.lock().unwrap() = Some(Arc::new(hook));
    }

    fn note(&self, entry: String) {
        self.journal.lock().unwrap().push(entry);
    }

    /// What was asked of the VM, in order.
    pub fn journal(&self) -> Vec<String> {
        self.journal.lock().unwrap().clone()
    }

    /// Sends `event` on the open event stream (lost if none is open).
    pub fn send(&self, event: Event) {
        if let Some(tx) = &*self.stream.lock().unwrap() {
            let _ = tx.send(event);
        }
    }

    /// The agent's process `id`/`exec_id` ends; `announce`: its exit goes
    /// out on the event stream.
    pub fn end_process(&self, id: &str, exec_id: Option<&str>, status: ExitStatus, announce: bool) {
        let key = (id.to_string(), exec_id.map(str::to_string));
        if let Some(p) = self.procs.lock().unwrap().get_mut(&key) {
            p.exit.get_or_insert(status);
        }
        if announce {
            self.send(Event::ProcessExited {
                process: ProcessRef {
                    container_id: id.to_string(),
                    exec_id: exec_id.map(str::to_string),
                },
                status,
            });
        }
    }

    /// Ends the open event stream, as an agent that dropped its
    /// subscriber does.
    pub fn cut_stream(&self) {
        self.stream.lock().unwrap().take();
    }

    /// husk exits.
    pub fn die(&self, how: &str) {
        let mut end = self.end.lock().unwrap();
        if end.is_none() {
            *end = Some(how.to_string());
            self.ended.notify_all();
        }
        drop(end);
        self.cut_stream();
    }

    /// Whether husk has exited.
    pub fn is_dead(&self) -> bool {
        self.end.lock().unwrap().is_some()
    }

    /// Every stdio attached so far.
    pub fn stdio(&self) -> Vec<Arc<FakeStdio>> {
        self.stdio.lock().unwrap().clone()
    }

    /// The well-behaved agent.
    fn agent(&self, request: &Request) -> Result<Response, ClientError> {
        let mut procs = self.procs.lock().unwrap();
        type Procs = BTreeMap<(String, Option<String>), Proc>;
        let new_pid = |procs: &mut Procs, key: (String, Option<String>)| {
            let pid = self.next_pid.fetch_add(1, Ordering::Relaxed);
            procs.insert(key, Proc { pid, exit: None });
            Ok(Response::Started { pid })
        };
        match request {
            Request::Ping => Ok(Response::Pong {
                version: PROTOCOL_VERSION,
                agent_version: "fake".into(),
            }),
            Request::CreateContainer(c) => new_pid(&mut procs, (c.container_id.clone(), None)),
            Request::ExecProcess {
                container_id,
                exec_id,
                ..
            } => new_pid(&mut procs, (container_id.clone(), Some(exec_id.clone()))),
            Request::StartContainer { container_id } => {
                match procs.get(&(container_id.clone(), None)) {
                    Some(_) => Ok(Response::Ok),
                    None => refused(ErrorCode::NotFound, "no such container"),
                }
            }
            Request::SignalProcess {
                process, signal, ..
            } => {
                let key = (process.container_id.clone(), process.exec_id.clone());
                let Some(p) = procs.get_mut(&key) else {
                    return refused(ErrorCode::NotFound, "no such process");
                };
                if p.exit.is_none() && *signal != 0 {
                    p.exit = Some(ExitStatus::Signal(*signal));
                    drop(procs);
                    self.send(Event::ProcessExited {
                        process: process.clone(),
                        status: ExitStatus::Signal(*signal),
                    });
                }
                Ok(Response::Ok)
            }
            Request::RemoveContainer { container_id } => {
                procs.retain(|(c, _), _| c != container_id);
                Ok(Response::Ok)
            }
            Request::ListProcesses { container_id } => Ok(Response::Processes {
                pids: procs
                    .iter()
                    .filter(|((c, _), p)| c == container_id && p.exit.is_none())
                    .map(|(_, p)| p.pid)
                    .collect(),
            }),
            Request::ListProcessStates => Ok(Response::ProcessStates {
                processes: procs
                    .iter()
                    .map(|((c, e), p)| ProcessState {
                        process: ProcessRef {
                            container_id: c.clone(),
                            exec_id: e.clone(),
                        },
                        pid: p.pid,
                        exit: p.exit,
                    })
                    .collect(),
            }),
            Request::StatsContainer { .. } => Ok(Response::Stats(Stats::default())),
            Request::SetOnlineCpus { online } => Ok(Response::Cpus {
                online: *online,
                present: 8,
            }),
            Request::PrepareTemplate => Ok(Response::TemplatePrepared { zeroed_bytes: 0 }),
            Request::WaitProcess(_) => refused(ErrorCode::Unsupported, "use the event stream"),
            Request::CreateSandbox(_)
            | Request::ResizeTty { .. }
            | Request::CloseStdin(_)
            | Request::UpdateContainer { .. }
            | Request::Shutdown => Ok(Response::Ok),
        }
    }
}

impl PodVm for FakeVm {
    fn pid(&self) -> u32 {
        4242
    }

    fn call(&self, request: Request) -> Result<Response, ClientError> {
        self.note(format!("call {}", kind(&request)));
        let hook = self.hook.lock().unwrap().clone();
        if let Some(answer) = hook.and_then(|h| h(&request)) {
            return answer;
        }
        self.agent(&request)
    }

    fn events(&self) -> Result<Box<dyn EventStream>, ClientError> {
        if self.is_dead() {
            return Err(ClientError::Io(
                std::io::ErrorKind::ConnectionRefused.into(),
            ));
        }
        self.streams.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = channel();
        *self.stream.lock().unwrap() = Some(tx);
        Ok(Box::new(FakeStream(rx)))
    }

    fn attach_stdio(
        &self,
        _process: &ProcessRef,
        _paths: &StdioPaths,
    ) -> Result<Arc<dyn ProcessStdio>, ClientError> {
        let io = Arc::new(FakeStdio {
            lingers: self.output_lingers.load(Ordering::Relaxed),
            finished: AtomicBool::new(false),
        });
        self.stdio.lock().unwrap().push(io.clone());
        Ok(io)
    }

    fn swap_drive(&self, drive_id: &str, image: &Path) -> Result<(), VmError> {
        let file = image.file_name().unwrap_or_default().to_string_lossy();
        self.note(format!("swap {drive_id} {file}"));
        Ok(())
    }

    fn set_paused(&self, paused: bool) -> Result<(), VmError> {
        self.note(format!("paused {paused}"));
        Ok(())
    }

    fn request_memory(&self, mib: u64) -> Result<(), VmError> {
        self.note(format!("memory {mib}"));
        if !self.plug_stalls.load(Ordering::Relaxed) {
            self.plugged.store(mib, Ordering::Relaxed);
        }
        Ok(())
    }

    fn plugged_memory(&self) -> Result<u64, VmError> {
        Ok(self.plugged.load(Ordering::Relaxed))
    }

    fn shutdown_guest(&self, _limit: Duration) -> bool {
        match self.call(Request::Shutdown) {
            Ok(_) => {
                self.die("the guest reset");
                true
            }
            Err(_) => false,
        }
    }

    fn kill(&self) {
        self.note("kill".into());
        self.die("killed");
    }

    fn wait_exit(&self) -> String {
        let end = self.end.lock().unwrap();
        let end = self.ended.wait_while(end, |e| e.is_none()).unwrap();
        end.clone().unwrap_or_default()
    }

    fn probe_agent(&self, _limit: Duration) -> Option<bool> {
        None
    }

    fn log_tail(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

/// The fake agent's event stream.
struct FakeStream(Receiver<Event>);

impl EventStream for FakeStream {
    fn next_event(&mut self) -> Result<Option<Event>, FrameError> {
        Ok(self.0.recv().ok())
    }
}

/// A process's stdio: output ends at once, or when finished if it
/// lingers (a background process holding it open).
pub struct FakeStdio {
    lingers: bool,
    /// Whether [`ProcessStdio::finish`] was called.
    pub finished: AtomicBool,
}

impl ProcessStdio for FakeStdio {
    fn close_stdin(&self) {}

    fn output_done(&self) -> bool {
        !self.lingers || self.finished.load(Ordering::Relaxed)
    }

    fn finish(&self) {
        self.finished.store(true, Ordering::Relaxed);
    }
}

/// Boots the one fake VM it is given.
pub struct Launcher {
    vm: Arc<FakeVm>,
    /// Boots so far.
    pub boots: AtomicUsize,
}

impl Launcher {
    /// A launcher of `vm`.
    pub fn new(vm: &Arc<FakeVm>) -> Launcher {
        Launcher {
            vm: vm.clone(),
            boots: AtomicUsize::new(0),
        }
    }
}

impl VmLauncher for Launcher {
    fn boot(
        &self,
        dir: &PodDir,
        spec: &VmSpec,
        _slots: &[SlotSpec],
    ) -> Result<Arc<dyn PodVm>, VmError> {
        self.boots.fetch_add(1, Ordering::Relaxed);
        *self.vm.spec.lock().unwrap() = Some(spec.clone());
        std::fs::create_dir_all(&dir.0).map_err(|source| VmError::Io {
            what: "create the pod's directory".into(),
            source,
        })?;
        *self.vm.dir.lock().unwrap() = Some(dir.clone());
        Ok(self.vm.clone())
    }
}

/// containerd's event service: keeps what was published.
#[derive(Default)]
pub struct Events {
    published: Mutex<Vec<(String, Box<dyn MessageDyn>)>>,
}

impl Events {
    /// The topics published, in order.
    pub fn topics(&self) -> Vec<String> {
        let published = self.published.lock().unwrap();
        published.iter().map(|(t, _)| t.clone()).collect()
    }

    /// The events of type `M` published, in order.
    pub fn of<M: MessageFull + Clone>(&self) -> Vec<M> {
        let published = self.published.lock().unwrap();
        published
            .iter()
            .filter_map(|(_, e)| e.downcast_ref::<M>().cloned())
            .collect()
    }

    /// The TaskExits published.
    pub fn exits(&self) -> Vec<TaskExit> {
        self.of::<TaskExit>()
    }

    /// The TaskOOMs published.
    pub fn ooms(&self) -> Vec<TaskOOM> {
        self.of::<TaskOOM>()
    }

    /// Waits until `done` holds of what was published, at most 10 s (a
    /// hang fails the test instead of stalling it); false if it never did.
    pub fn wait_for(&self, done: impl Fn(&Events) -> bool) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !done(self) {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    }
}

impl Publisher for Arc<Events> {
    fn publish(
        &self,
        topic: &str,
        event: Box<dyn MessageDyn>,
    ) -> Result<(), containerd_shim::Error> {
        self.published
            .lock()
            .unwrap()
            .push((topic.to_string(), event));
        Ok(())
    }
}
