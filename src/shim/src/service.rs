//! The task service containerd talks to: one shim per pod, one microVM per
//! shim. The first container created boots the VM; each container's root
//! filesystem becomes a disk in a spare drive slot; the agent in the guest
//! creates, starts, execs, signals and removes the processes; its events
//! become containerd's task events.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use containerd_shim::api::Empty;
use containerd_shim::api::{self, Status};
use containerd_shim::event::Event as ShimEvent;
use containerd_shim::protos::cgroups_v2::metrics as cg2;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{Message, MessageField};
use containerd_shim::protos::ttrpc::{self, context::Context, Code};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{ExitSignal, TtrpcContext, TtrpcResult};
use husk_protocol::client::ClientError;
use husk_protocol::{
    AgentError, CreateContainer, ErrorCode, Event, ExitStatus, ProcessRef, Request, Response,
    Rootfs, WritableLayer,
};
use oci_spec::runtime::Spec;

use crate::config::Config;
use crate::error::Chain;
use crate::io::{ProcessIo, StdioPaths};
use crate::rootfs;
use crate::spec;
use crate::vm::{self, PodDir, PodVm, VmError, VmSpec};

/// How long a process's output may keep arriving after it exited before
/// its exit is reported anyway.
const OUTPUT_DRAIN: Duration = Duration::from_secs(2);

/// How long the agent may take to answer a shutdown (it answers at once,
/// then stops what is left and powers the guest off).
const SHUTDOWN_ANSWER: Duration = Duration::from_secs(5);

/// The exit status reported for processes the VM took with it.
pub const VM_GONE_STATUS: u32 = 255;

/// The shim's task service.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

struct Inner {
    namespace: String,
    config: Config,
    exit: Arc<ExitSignal>,
    publisher: Option<RemotePublisher>,
    state: Mutex<State>,
    changed: Condvar,
    /// Held while the VM boots, so one Create boots it and others wait.
    boot: Mutex<()>,
}

#[derive(Default)]
struct State {
    /// The pod's id (its sandbox id, or the first container's id).
    pod_id: Option<String>,
    vm: Option<Arc<PodVm>>,
    /// Set when husk exited (every process then is exited too).
    vm_gone: bool,
    /// Set once the VM's files and network are gone too.
    vm_cleaned: bool,
    /// The guest pid of the pod's sandbox container.
    sandbox_pid: Option<u32>,
    /// The pod's wired network, to undo when the VM goes.
    network: Option<crate::network::PodNetwork>,
    containers: HashMap<String, Container>,
}

struct Container {
    bundle: String,
    image: Option<PathBuf>,
    /// The volumes disk image, if the container has bind mounts.
    volumes_image: Option<PathBuf>,
    /// "" is the init process.
    procs: HashMap<String, Proc>,
}

struct Proc {
    pid: u32,
    status: Status,
    exit: Option<(u32, Timestamp)>,
    paths: StdioPaths,
    io: Option<Arc<ProcessIo>>,
    /// An exec's process, until it starts.
    exec_spec: Option<oci_spec::runtime::Process>,
}

impl Proc {
    fn new(paths: StdioPaths) -> Proc {
        Proc {
            pid: 0,
            status: Status::CREATED,
            exit: None,
            paths,
            io: None,
            exec_spec: None,
        }
    }
}

fn err(code: Code, message: impl std::fmt::Display) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message.to_string()))
}

fn agent_err(e: ClientError) -> ttrpc::Error {
    match &e {
        ClientError::Agent(AgentError { code, .. }) => {
            let c = match code {
                ErrorCode::NotFound => Code::NOT_FOUND,
                ErrorCode::AlreadyExists => Code::ALREADY_EXISTS,
                ErrorCode::InvalidArgument | ErrorCode::InvalidMessage => Code::INVALID_ARGUMENT,
                ErrorCode::FailedPrecondition => Code::FAILED_PRECONDITION,
                ErrorCode::Unsupported | ErrorCode::UnsupportedVersion => Code::UNIMPLEMENTED,
                ErrorCode::System => Code::INTERNAL,
            };
            err(c, Chain(&e))
        }
        _ => err(Code::UNAVAILABLE, Chain(&e)),
    }
}

fn now() -> Timestamp {
    containerd_shim::util::timestamp().unwrap_or_default()
}

fn exit_code(status: ExitStatus) -> u32 {
    u32::try_from(status.as_shell_status()).unwrap_or(VM_GONE_STATUS)
}

/// The pod's state directory.
pub fn pod_dir(config: &Config, namespace: &str, pod_id: &str) -> PodDir {
    PodDir(config.state_dir.join(namespace).join(pod_id))
}

impl Service {
    /// A service for pods in `namespace`.
    pub fn new(
        namespace: &str,
        config: Config,
        exit: Arc<ExitSignal>,
        publisher: Option<RemotePublisher>,
    ) -> Service {
        Service {
            inner: Arc::new(Inner {
                namespace: namespace.to_string(),
                config,
                exit,
                publisher,
                state: Mutex::new(State::default()),
                changed: Condvar::new(),
                boot: Mutex::new(()),
            }),
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish<E: ShimEvent + 'static>(&self, event: E) {
        let topic = event.topic();
        let Some(p) = &self.publisher else { return };
        if let Err(e) = p.publish(Context::default(), &topic, &self.namespace, Box::new(event)) {
            tracing::warn!(topic, error = %Chain(&e), "cannot publish an event to containerd");
        }
    }

    /// The running VM, or UNAVAILABLE.
    fn vm(&self) -> TtrpcResult<Arc<PodVm>> {
        let st = self.lock();
        match (&st.vm, st.vm_gone) {
            (Some(vm), false) => Ok(vm.clone()),
            _ => Err(err(Code::UNAVAILABLE, "the pod's microVM is not running")),
        }
    }

    /// Boots the pod's VM unless it runs.
    fn ensure_vm(self: &Arc<Self>, pod_id: &str, spec: &Spec) -> TtrpcResult<Arc<PodVm>> {
        let _boot = self.boot.lock().unwrap_or_else(|e| e.into_inner());
        {
            let mut st = self.lock();
            if st.vm_gone {
                return Err(err(Code::UNAVAILABLE, "the pod's microVM has exited"));
            }
            if let Some(vm) = &st.vm {
                return Ok(vm.clone());
            }
            st.pod_id = Some(pod_id.to_string());
        }
        let (vcpus, mem_mib) = spec::vm_size(
            spec,
            self.config.default_vcpus,
            self.config.default_memory_mib,
            self.config.max_vcpus,
        );
        let network = match crate::network::netns_path(spec) {
            Some(netns) => crate::network::setup(&netns).map_err(|e| {
                tracing::error!(pod = pod_id, error = %Chain(&e), "cannot wire the pod's network");
                err(
                    Code::INTERNAL,
                    format!("cannot wire the pod's network: {}", Chain(&e)),
                )
            })?,
            None => None,
        };
        let vm_spec = VmSpec {
            id: pod_id.to_string(),
            vcpus,
            mem_mib,
            hostname: spec.hostname().clone(),
            network: network.clone(),
        };
        let dir = pod_dir(&self.config, &self.namespace, pod_id);
        tracing::info!(pod = pod_id, vcpus, mem_mib, dir = %dir.0.display(), "booting the pod's microVM");
        let (vm, child) = PodVm::boot(&self.config, dir, &vm_spec).map_err(|e| {
            tracing::error!(pod = pod_id, error = %Chain(&e), "cannot boot the pod's microVM");
            if let Some(net) = &network {
                crate::network::teardown(net);
            }
            err(
                Code::INTERNAL,
                format!("cannot boot the pod's microVM: {}", Chain(&e)),
            )
        })?;
        let vm = Arc::new(vm);
        {
            let mut st = self.lock();
            st.vm = Some(vm.clone());
            st.network = network;
        }
        self.watch_vm(child);
        self.watch_events(&vm);
        Ok(vm)
    }

    /// Waits for husk on a thread of its own; its end ends every process.
    fn watch_vm(self: &Arc<Self>, mut child: Child) {
        let me = self.clone();
        std::thread::spawn(move || {
            let status = child.wait();
            me.vm_exited(
                status
                    .map(|s| s.to_string())
                    .unwrap_or_else(|e| e.to_string()),
            );
        });
    }

    /// Reads the agent's events on a thread of its own.
    fn watch_events(self: &Arc<Self>, vm: &Arc<PodVm>) {
        let me = self.clone();
        let endpoint = vm.endpoint().clone();
        std::thread::spawn(move || {
            let mut conn = match endpoint.open(husk_protocol::Channel::Events) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %Chain(&e), "cannot open the agent's event stream");
                    return;
                }
            };
            while let Ok(event) = husk_protocol::read_frame::<_, Event>(&mut conn) {
                me.agent_event(event);
            }
            tracing::debug!("the agent's event stream ended");
        });
    }

    fn agent_event(self: &Arc<Self>, event: Event) {
        match event {
            Event::Oom { container_id } => self.publish(TaskOOM {
                container_id,
                ..Default::default()
            }),
            Event::ProcessExited { process, status } => {
                let me = self.clone();
                // The output may still be on its way: let it drain first,
                // without holding up other events.
                std::thread::spawn(move || me.process_exited(process, exit_code(status)));
            }
        }
    }

    fn process_exited(&self, process: ProcessRef, code: u32) {
        let exec = process.exec_id.clone().unwrap_or_default();
        let io = {
            let st = self.lock();
            st.containers
                .get(&process.container_id)
                .and_then(|c| c.procs.get(&exec))
                .and_then(|p| p.io.clone())
        };
        if let Some(io) = &io {
            if !io.drain(OUTPUT_DRAIN) {
                tracing::debug!(container = %process.container_id, exec, "output still open after the process exited");
            }
        }
        let exited_at = now();
        let pid = {
            let mut st = self.lock();
            let Some(p) = st
                .containers
                .get_mut(&process.container_id)
                .and_then(|c| c.procs.get_mut(&exec))
            else {
                return;
            };
            if p.exit.is_some() {
                return;
            }
            p.exit = Some((code, exited_at.clone()));
            p.status = Status::STOPPED;
            p.pid
        };
        self.changed.notify_all();
        if let Some(io) = io {
            io.finish();
        }
        let id = if exec.is_empty() {
            process.container_id.clone()
        } else {
            exec
        };
        self.publish(TaskExit {
            container_id: process.container_id,
            id,
            pid,
            exit_status: code,
            exited_at: MessageField::some(exited_at),
            ..Default::default()
        });
    }

    /// husk exited: every process still running is reported exited, and
    /// the VM's files go.
    fn vm_exited(&self, how: String) {
        let exited_at = now();
        let mut exits = Vec::new();
        let mut ios = Vec::new();
        let (dir, network) = {
            let mut st = self.lock();
            st.vm_gone = true;
            for (cid, c) in st.containers.iter_mut() {
                for (exec, p) in c.procs.iter_mut() {
                    if let Some(io) = p.io.take() {
                        ios.push(io);
                    }
                    if p.exit.is_none() {
                        p.exit = Some((VM_GONE_STATUS, exited_at.clone()));
                        p.status = Status::STOPPED;
                        let id = if exec.is_empty() {
                            cid.clone()
                        } else {
                            exec.clone()
                        };
                        exits.push((cid.clone(), id, p.pid));
                    }
                }
                c.image = None;
                c.volumes_image = None;
            }
            (st.vm.as_ref().map(|vm| vm.dir.clone()), st.network.take())
        };
        if let Some(net) = &network {
            crate::network::teardown(net);
        }
        self.changed.notify_all();
        if !exits.is_empty() {
            let log = dir
                .as_ref()
                .map(|d| vm::log_tail(&d.log()))
                .unwrap_or_default();
            tracing::error!(
                how,
                processes = exits.len(),
                log,
                "the pod's microVM exited under running processes"
            );
        } else {
            tracing::info!(how, "the pod's microVM exited");
        }
        for io in ios {
            io.finish();
        }
        for (container_id, id, pid) in exits {
            self.publish(TaskExit {
                container_id,
                id,
                pid,
                exit_status: VM_GONE_STATUS,
                exited_at: MessageField::some(exited_at.clone()),
                ..Default::default()
            });
        }
        // Sockets, disk images, the log: nothing of the VM stays.
        if let Some(dir) = dir {
            vm::remove_dir(&dir);
        }
        self.lock().vm_cleaned = true;
        self.changed.notify_all();
    }

    fn create(self: &Arc<Self>, req: api::CreateTaskRequest) -> TtrpcResult<u32> {
        if req.id.is_empty() {
            return Err(err(Code::INVALID_ARGUMENT, "no container id"));
        }
        if !req.checkpoint.is_empty() {
            return Err(err(
                Code::UNIMPLEMENTED,
                "checkpoint/restore is not supported",
            ));
        }
        if self.lock().containers.contains_key(&req.id) {
            return Err(err(
                Code::ALREADY_EXISTS,
                format!("container {} exists", req.id),
            ));
        }
        let bundle = PathBuf::from(&req.bundle);
        let spec = Spec::load(bundle.join("config.json")).map_err(|e| {
            err(
                Code::INVALID_ARGUMENT,
                format!("{}/config.json: {e}", req.bundle),
            )
        })?;
        let pod_id = spec::sandbox_id(&spec, &req.id);
        {
            let st = self.lock();
            if let Some(p) = &st.pod_id {
                if *p != pod_id {
                    return Err(err(
                        Code::FAILED_PRECONDITION,
                        format!(
                            "container {} belongs to pod {pod_id}, this shim serves {p}",
                            req.id
                        ),
                    ));
                }
            }
        }
        let vm = self.ensure_vm(&pod_id, &spec)?;
        let created = self.create_in(&vm, &req, spec, &pod_id);
        if let Err(e) = &created {
            let error = match e {
                ttrpc::Error::RpcStatus(status) => status.message.clone(),
                other => other.to_string(),
            };
            tracing::error!(container = %req.id, pod = %pod_id, error, "cannot create the container");
            // The VM was booted for this container (or outlived every
            // other): nobody would stop it.
            if self.lock().containers.is_empty() {
                let log = vm::log_tail(&vm.dir.log());
                // Evidence for a guest that stopped answering: is it the
                // one request, or the whole agent?
                let agent_answers = vm
                    .agent_broken()
                    .then(|| vm.agent_answers(Duration::from_secs(2)));
                tracing::warn!(pod = %pod_id, ?agent_answers, log, "no container left in the pod's microVM: stopping it");
                self.stop_vm();
            }
        }
        created
    }

    /// Create's work once the pod's VM runs: the container's disks, the
    /// agent's container, its stdio. Whatever fails is undone here but the
    /// VM.
    fn create_in(
        self: &Arc<Self>,
        vm: &Arc<PodVm>,
        req: &api::CreateTaskRequest,
        mut spec: Spec,
        pod_id: &str,
    ) -> TtrpcResult<u32> {
        let bundle = PathBuf::from(&req.bundle);
        // The root filesystem: containerd's mounts, or the bundle's tree.
        let root = spec
            .root()
            .as_ref()
            .map(|r| r.path().clone())
            .unwrap_or_else(|| PathBuf::from("rootfs"));
        let root = if root.is_absolute() {
            root
        } else {
            bundle.join(root)
        };
        let sandbox_pid = self.lock().sandbox_pid;
        let adjusted = spec::for_guest(&mut spec, sandbox_pid);
        if !adjusted.dropped_mounts.is_empty() || adjusted.dropped_hooks {
            tracing::warn!(container = %req.id, mounts = ?adjusted.dropped_mounts, hooks = adjusted.dropped_hooks,
                "bind mounts of special files and hooks are not carried into the microVM");
        }
        let image = vm.dir.image(&req.id);
        let volumes_image = vm.dir.volumes_image(&req.id);
        let volumes_key = volumes_slot_owner(&req.id);
        let cleanup = |vm: &PodVm| {
            let _ = vm.detach_disk(&req.id);
            let _ = vm.detach_disk(&volumes_key);
            let _ = std::fs::remove_file(&image);
            let _ = std::fs::remove_file(&volumes_image);
        };
        let disk = |size| Rootfs {
            drive_id: String::new(),
            fstype: "ext4".into(),
            read_only: false,
            writable_overlay: false,
            writable_layer: None,
            size_bytes: Some(size),
        };
        let disks = (|| {
            let rootfs = match self.shared_layers(vm, req, &root, &image)? {
                Some(layered) => layered,
                None => {
                    let size = rootfs::build_image(&req.rootfs, &root, &image)
                        .map_err(|e| err(Code::INTERNAL, Chain(&e)))?;
                    Rootfs {
                        drive_id: vm
                            .attach_disk(&req.id, &image)
                            .map_err(|e| err(Code::RESOURCE_EXHAUSTED, Chain(&e)))?,
                        ..disk(size)
                    }
                }
            };
            if adjusted.volumes.is_empty() {
                return Ok((rootfs, None));
            }
            let size = rootfs::build_volumes_image(
                &adjusted.volumes,
                &bundle.join("husk-volumes"),
                &volumes_image,
            )
            .map_err(|e| err(Code::INTERNAL, format!("volumes: {}", Chain(&e))))?;
            let volumes = Rootfs {
                drive_id: vm
                    .attach_disk(&volumes_key, &volumes_image)
                    .map_err(|e| err(Code::RESOURCE_EXHAUSTED, Chain(&e)))?,
                ..disk(size)
            };
            Ok((rootfs, Some(volumes)))
        })();
        let (rootfs, volumes) = match disks {
            Ok(d) => d,
            Err(e) => {
                cleanup(vm);
                return Err(e);
            }
        };
        let has_volumes = volumes.is_some();
        let created = vm.call(Request::CreateContainer(CreateContainer {
            container_id: req.id.clone(),
            spec: Box::new(spec),
            rootfs,
            volumes,
        }));
        let pid = match created {
            Ok(Response::Started { pid }) => pid,
            Ok(other) => {
                cleanup(vm);
                return Err(err(Code::INTERNAL, format!("agent answered {other:?}")));
            }
            Err(e) => {
                cleanup(vm);
                return Err(agent_err(e));
            }
        };
        let paths = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let io = match ProcessIo::attach(vm.endpoint(), &req.id, None, &paths) {
            Ok(io) => io,
            Err(e) => {
                let _ = vm.call(Request::RemoveContainer {
                    container_id: req.id.clone(),
                });
                cleanup(vm);
                return Err(agent_err(e));
            }
        };
        let mut proc = Proc::new(paths);
        proc.pid = pid;
        proc.io = Some(Arc::new(io));
        {
            let mut st = self.lock();
            if req.id == pod_id {
                st.sandbox_pid = Some(pid);
            }
            let mut procs = HashMap::new();
            procs.insert(String::new(), proc);
            st.containers.insert(
                req.id.clone(),
                Container {
                    bundle: req.bundle.clone(),
                    image: Some(image.clone()),
                    volumes_image: has_volumes.then(|| volumes_image.clone()),
                    procs,
                },
            );
        }
        self.publish(TaskCreate {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: MessageField::some(TaskIO {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
                ..Default::default()
            }),
            pid,
            ..Default::default()
        });
        tracing::info!(container = %req.id, pod = %pod_id, pid, "container created");
        Ok(pid)
    }

    /// A new container's rootfs as its image's shared layers (from the
    /// image cache, on a read-only slot) under an empty writable layer of
    /// its own (`image`, on a writable slot); `None` when that does not
    /// apply (see the rootfs module) and the rootfs is to be copied whole.
    fn shared_layers(
        &self,
        vm: &PodVm,
        req: &api::CreateTaskRequest,
        root: &Path,
        image: &Path,
    ) -> TtrpcResult<Option<Rootfs>> {
        if self.config.image_slots == 0 {
            return Ok(None);
        }
        let Some(lowers) = rootfs::fresh_layers(&req.rootfs) else {
            return Ok(None);
        };
        let cache = rootfs::ImageCache::new(&self.config.image_cache_dir);
        let (layers, layers_size) = cache
            .layers_image(&lowers, root)
            .map_err(|e| err(Code::INTERNAL, Chain(&e)))?;
        let layers_slot = match vm.attach_shared(&req.id, &layers) {
            Ok(slot) => slot,
            Err(VmError::NoImageSlot(n)) => {
                tracing::info!(container = %req.id, slots = n, "no image slot free: the rootfs is copied whole");
                return Ok(None);
            }
            Err(e) => return Err(err(Code::INTERNAL, Chain(&e))),
        };
        let writable_size = rootfs::build_writable_layer(
            image,
            self.config.writable_layer_mib.saturating_mul(1 << 20),
        )
        .map_err(|e| err(Code::INTERNAL, Chain(&e)))?;
        let writable_slot = vm
            .attach_disk(&req.id, image)
            .map_err(|e| err(Code::RESOURCE_EXHAUSTED, Chain(&e)))?;
        Ok(Some(Rootfs {
            drive_id: layers_slot,
            fstype: "ext4".into(),
            read_only: true,
            writable_overlay: true,
            writable_layer: Some(WritableLayer {
                drive_id: writable_slot,
                fstype: "ext4".into(),
                size_bytes: Some(writable_size),
            }),
            size_bytes: Some(layers_size),
        }))
    }

    fn start(&self, id: &str, exec_id: &str) -> TtrpcResult<u32> {
        let vm = self.vm()?;
        if exec_id.is_empty() {
            {
                let st = self.lock();
                let p = st
                    .containers
                    .get(id)
                    .and_then(|c| c.procs.get(""))
                    .ok_or_else(|| err(Code::NOT_FOUND, format!("container {id}")))?;
                if p.status != Status::CREATED {
                    return Err(err(
                        Code::FAILED_PRECONDITION,
                        format!("container {id} is not created but {:?}", p.status),
                    ));
                }
            }
            vm.call(Request::StartContainer {
                container_id: id.to_string(),
            })
            .map_err(agent_err)?;
            let pid = {
                let mut st = self.lock();
                let p = st
                    .containers
                    .get_mut(id)
                    .and_then(|c| c.procs.get_mut(""))
                    .ok_or_else(|| err(Code::NOT_FOUND, format!("container {id}")))?;
                if p.exit.is_none() {
                    p.status = Status::RUNNING;
                }
                p.pid
            };
            self.publish(TaskStart {
                container_id: id.to_string(),
                pid,
                ..Default::default()
            });
            return Ok(pid);
        }
        // An exec: started and attached under the state lock, so its exit
        // event (handled under the same lock) finds it complete.
        let mut st = self.lock();
        let p = st
            .containers
            .get_mut(id)
            .and_then(|c| c.procs.get_mut(exec_id))
            .ok_or_else(|| err(Code::NOT_FOUND, format!("exec {exec_id} of {id}")))?;
        let process = p.exec_spec.take().ok_or_else(|| {
            err(
                Code::FAILED_PRECONDITION,
                format!("exec {exec_id} was started already"),
            )
        })?;
        let pid = match vm.call(Request::ExecProcess {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            process: Box::new(process),
        }) {
            Ok(Response::Started { pid }) => pid,
            Ok(other) => return Err(err(Code::INTERNAL, format!("agent answered {other:?}"))),
            Err(e) => return Err(agent_err(e)),
        };
        let io =
            ProcessIo::attach(vm.endpoint(), id, Some(exec_id), &p.paths).map_err(agent_err)?;
        p.pid = pid;
        p.status = Status::RUNNING;
        p.io = Some(Arc::new(io));
        drop(st);
        self.publish(TaskExecStarted {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            pid,
            ..Default::default()
        });
        Ok(pid)
    }

    fn delete(&self, id: &str, exec_id: &str) -> TtrpcResult<api::DeleteResponse> {
        let mut st = self.lock();
        let c = st
            .containers
            .get_mut(id)
            .ok_or_else(|| err(Code::NOT_FOUND, format!("container {id}")))?;
        if !exec_id.is_empty() {
            let p = c
                .procs
                .get(exec_id)
                .ok_or_else(|| err(Code::NOT_FOUND, format!("exec {exec_id} of {id}")))?;
            if p.status == Status::RUNNING {
                return Err(err(
                    Code::FAILED_PRECONDITION,
                    format!("exec {exec_id} is running"),
                ));
            }
            let p = c
                .procs
                .remove(exec_id)
                .ok_or_else(|| err(Code::NOT_FOUND, exec_id))?;
            let (status, at) = p.exit.unwrap_or_default();
            return Ok(api::DeleteResponse {
                pid: p.pid,
                exit_status: status,
                exited_at: MessageField::some(at),
                ..Default::default()
            });
        }
        let init = c.procs.get("").ok_or_else(|| err(Code::NOT_FOUND, id))?;
        if init.status == Status::RUNNING || init.status == Status::PAUSED {
            return Err(err(
                Code::FAILED_PRECONDITION,
                format!("container {id} is running"),
            ));
        }
        let c = st
            .containers
            .remove(id)
            .ok_or_else(|| err(Code::NOT_FOUND, id))?;
        let is_pod = st.pod_id.as_deref() == Some(id);
        let vm = if st.vm_gone { None } else { st.vm.clone() };
        drop(st);
        let init = c.procs.get("").ok_or_else(|| err(Code::NOT_FOUND, id))?;
        for p in c.procs.values() {
            if let Some(io) = &p.io {
                io.finish();
            }
        }
        if let Some(vm) = &vm {
            if init.exit.is_none() {
                // Created, never started: its init waits in the guest.
                let _ = vm.call(Request::SignalProcess {
                    process: ProcessRef {
                        container_id: id.to_string(),
                        exec_id: None,
                    },
                    signal: libc::SIGKILL,
                    all: true,
                });
            }
            if let Err(e) = vm.call(Request::RemoveContainer {
                container_id: id.to_string(),
            }) {
                tracing::warn!(container = id, error = %Chain(&e), "the agent could not remove the container");
            }
            for owner in [id.to_string(), volumes_slot_owner(id)] {
                if let Err(e) = vm.detach_disk(&owner) {
                    tracing::warn!(container = id, error = %Chain(&e), "cannot free the container's drive slot");
                }
            }
        }
        for image in c.image.iter().chain(c.volumes_image.iter()) {
            let _ = std::fs::remove_file(image);
        }
        let (status, at) = init.exit.clone().unwrap_or((VM_GONE_STATUS, now()));
        if is_pod {
            self.stop_vm();
        }
        self.publish(TaskDelete {
            container_id: id.to_string(),
            id: id.to_string(),
            pid: init.pid,
            exit_status: status,
            exited_at: MessageField::some(at.clone()),
            ..Default::default()
        });
        tracing::info!(container = id, bundle = %c.bundle, "container deleted");
        Ok(api::DeleteResponse {
            pid: init.pid,
            exit_status: status,
            exited_at: MessageField::some(at),
            ..Default::default()
        })
    }

    /// Shuts the guest down (the agent stops what is left and resets it)
    /// and waits for husk to exit; kills it if it does not.
    fn stop_vm(&self) {
        let vm = {
            let st = self.lock();
            if st.vm_gone {
                None
            } else {
                st.vm.clone()
            }
        };
        if let Some(vm) = &vm {
            if !vm.shutdown_guest(SHUTDOWN_ANSWER) || !self.wait_cleaned(Duration::from_secs(10)) {
                tracing::warn!(pid = vm.pid, "the guest did not shut down; killing husk");
                vm::kill_recorded(&vm.dir);
            }
        }
        // The VM's end is handled on its watcher thread: wait for the
        // files and the network to be gone, so the shim never exits
        // half-way through.
        if self.lock().vm.is_some() && !self.wait_cleaned(Duration::from_secs(10)) {
            tracing::warn!("the pod's microVM was not cleaned up in time");
        }
    }

    /// Waits until the VM's end is fully handled; false on timeout.
    fn wait_cleaned(&self, limit: Duration) -> bool {
        let st = self.lock();
        let (_st, timeout) = self
            .changed
            .wait_timeout_while(st, limit, |s| !s.vm_cleaned)
            .unwrap_or_else(|e| e.into_inner());
        !timeout.timed_out()
    }

    fn with_proc<T>(
        &self,
        id: &str,
        exec_id: &str,
        f: impl FnOnce(&mut Proc) -> TtrpcResult<T>,
    ) -> TtrpcResult<T> {
        let mut st = self.lock();
        let p = st
            .containers
            .get_mut(id)
            .and_then(|c| c.procs.get_mut(exec_id))
            .ok_or_else(|| {
                if exec_id.is_empty() {
                    err(Code::NOT_FOUND, format!("container {id}"))
                } else {
                    err(Code::NOT_FOUND, format!("exec {exec_id} of {id}"))
                }
            })?;
        f(p)
    }

    fn process_ref(id: &str, exec_id: &str) -> ProcessRef {
        ProcessRef {
            container_id: id.to_string(),
            exec_id: (!exec_id.is_empty()).then(|| exec_id.to_string()),
        }
    }
}

impl containerd_shim::Task for Service {
    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let pid = self.inner.create(req)?;
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let pid = self.inner.start(&req.id, &req.exec_id)?;
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        self.inner.delete(&req.id, &req.exec_id)
    }

    fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let bundle = self
            .inner
            .lock()
            .containers
            .get(&req.id)
            .map(|c| c.bundle.clone())
            .unwrap_or_default();
        self.inner.with_proc(&req.id, &req.exec_id, |p| {
            let (exit_status, exited_at) = p.exit.clone().unwrap_or_default();
            Ok(api::StateResponse {
                id: req.id.clone(),
                bundle,
                pid: p.pid,
                status: p.status.into(),
                stdin: p.paths.stdin.clone(),
                stdout: p.paths.stdout.clone(),
                stderr: p.paths.stderr.clone(),
                terminal: p.paths.terminal,
                exit_status,
                exited_at: MessageField::some(exited_at),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            })
        })
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<Empty> {
        if req.exec_id.is_empty() {
            return Err(err(Code::INVALID_ARGUMENT, "no exec id"));
        }
        let process: oci_spec::runtime::Process =
            serde_json::from_slice(&req.spec.value).map_err(|e| {
                err(
                    Code::INVALID_ARGUMENT,
                    format!("the exec's process spec: {e}"),
                )
            })?;
        {
            let mut st = self.inner.lock();
            let c = st
                .containers
                .get_mut(&req.id)
                .ok_or_else(|| err(Code::NOT_FOUND, format!("container {}", req.id)))?;
            if c.procs.contains_key(&req.exec_id) {
                return Err(err(
                    Code::ALREADY_EXISTS,
                    format!("exec {} exists", req.exec_id),
                ));
            }
            let mut p = Proc::new(StdioPaths {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
            });
            p.exec_spec = Some(process);
            c.procs.insert(req.exec_id.clone(), p);
        }
        self.inner.publish(TaskExecAdded {
            container_id: req.id,
            exec_id: req.exec_id,
            ..Default::default()
        });
        Ok(Empty::new())
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<Empty> {
        let exited = self
            .inner
            .with_proc(&req.id, &req.exec_id, |p| Ok(p.exit.is_some()))?;
        if exited {
            return Err(err(Code::NOT_FOUND, "process already finished"));
        }
        let vm = self.inner.vm()?;
        let signal = i32::try_from(req.signal)
            .map_err(|_| err(Code::INVALID_ARGUMENT, format!("signal {}", req.signal)))?;
        vm.call(Request::SignalProcess {
            process: Inner::process_ref(&req.id, &req.exec_id),
            signal,
            all: req.all,
        })
        .map_err(agent_err)?;
        Ok(Empty::new())
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        self.inner.with_proc(&req.id, &req.exec_id, |_| Ok(()))?;
        let st = self.inner.lock();
        let st = self
            .inner
            .changed
            .wait_while(st, |s| {
                s.containers
                    .get(&req.id)
                    .and_then(|c| c.procs.get(&req.exec_id))
                    .is_some_and(|p| p.exit.is_none())
            })
            .unwrap_or_else(|e| e.into_inner());
        let (exit_status, exited_at) = st
            .containers
            .get(&req.id)
            .and_then(|c| c.procs.get(&req.exec_id))
            .and_then(|p| p.exit.clone())
            .ok_or_else(|| {
                err(
                    Code::NOT_FOUND,
                    format!("{} was deleted while waited for", req.id),
                )
            })?;
        Ok(api::WaitResponse {
            exit_status,
            exited_at: MessageField::some(exited_at),
            ..Default::default()
        })
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let vm = self.inner.vm()?;
        match vm
            .call(Request::ListProcesses {
                container_id: req.id,
            })
            .map_err(agent_err)?
        {
            Response::Processes { pids } => Ok(api::PidsResponse {
                processes: pids
                    .into_iter()
                    .map(|pid| containerd_shim::protos::types::task::ProcessInfo {
                        pid,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            other => Err(err(Code::INTERNAL, format!("agent answered {other:?}"))),
        }
    }

    fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<Empty> {
        self.pause_or_resume(&req.id, true)
    }

    fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<Empty> {
        self.pause_or_resume(&req.id, false)
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<Empty> {
        let io = self
            .inner
            .with_proc(&req.id, &req.exec_id, |p| Ok(p.io.clone()))?;
        if let Some(io) = io {
            io.close_stdin();
        }
        Ok(Empty::new())
    }

    fn resize_pty(&self, _ctx: &TtrpcContext, req: api::ResizePtyRequest) -> TtrpcResult<Empty> {
        let vm = self.inner.vm()?;
        let clamp = |v: u32| u16::try_from(v).unwrap_or(u16::MAX);
        vm.call(Request::ResizeTty {
            process: Inner::process_ref(&req.id, &req.exec_id),
            rows: clamp(req.height),
            cols: clamp(req.width),
        })
        .map_err(agent_err)?;
        Ok(Empty::new())
    }

    fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<Empty> {
        let resources: oci_spec::runtime::LinuxResources =
            serde_json::from_slice(&req.resources.value)
                .map_err(|e| err(Code::INVALID_ARGUMENT, format!("the resources: {e}")))?;
        let vm = self.inner.vm()?;
        vm.call(Request::UpdateContainer {
            container_id: req.id,
            resources: Box::new(resources),
        })
        .map_err(agent_err)?;
        Ok(Empty::new())
    }

    fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let vm = self.inner.vm()?;
        let s = match vm
            .call(Request::StatsContainer {
                container_id: req.id,
            })
            .map_err(agent_err)?
        {
            Response::Stats(s) => s,
            other => return Err(err(Code::INTERNAL, format!("agent answered {other:?}"))),
        };
        let metrics = cg2::Metrics {
            pids: MessageField::some(cg2::PidsStat {
                current: s.pids,
                ..Default::default()
            }),
            cpu: MessageField::some(cg2::CPUStat {
                usage_usec: s.cpu_usage_usec,
                user_usec: s.cpu_user_usec,
                system_usec: s.cpu_system_usec,
                ..Default::default()
            }),
            memory: MessageField::some(cg2::MemoryStat {
                usage: s.memory_bytes,
                usage_limit: s.memory_limit_bytes.unwrap_or(u64::MAX),
                ..Default::default()
            }),
            memory_events: MessageField::some(cg2::MemoryEvents {
                oom_kill: s.oom_kills,
                ..Default::default()
            }),
            io: MessageField::some(cg2::IOStat {
                usage: vec![cg2::IOEntry {
                    rbytes: s.io_read_bytes,
                    wbytes: s.io_write_bytes,
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let value = metrics
            .write_to_bytes()
            .map_err(|e| err(Code::INTERNAL, Chain(&e)))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(
                containerd_shim::protos::protobuf::well_known_types::any::Any {
                    type_url: "io.containerd.cgroups.v2.Metrics".into(),
                    value,
                    ..Default::default()
                },
            ),
            ..Default::default()
        })
    }

    fn connect(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = self.inner.lock().vm.as_ref().map(|v| v.pid).unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<Empty> {
        if !self.inner.lock().containers.is_empty() {
            return Ok(Empty::new());
        }
        self.inner.stop_vm();
        let dir = self.inner.lock().vm.as_ref().map(|v| v.dir.clone());
        if let Some(dir) = dir {
            vm::remove_dir(&dir);
        }
        self.inner.exit.signal();
        Ok(Empty::new())
    }
}

impl Service {
    /// Pause and resume act on the VM's vCPUs: a pod of one container
    /// (what `ctr` makes) pauses as a whole; one container of several
    /// cannot be frozen alone yet.
    fn pause_or_resume(&self, id: &str, pause: bool) -> TtrpcResult<Empty> {
        let (others, pod) = {
            let st = self.inner.lock();
            if !st.containers.contains_key(id) {
                return Err(err(Code::NOT_FOUND, format!("container {id}")));
            }
            (st.containers.len() > 1, st.pod_id.clone())
        };
        if others || pod.as_deref() != Some(id) {
            return Err(err(
                Code::UNIMPLEMENTED,
                "pausing one container of a pod with several is not supported; pause the pod's sandbox",
            ));
        }
        let vm = self.inner.vm()?;
        vm.set_paused(pause)
            .map_err(|e| err(Code::INTERNAL, Chain(&e)))?;
        let want = if pause {
            Status::PAUSED
        } else {
            Status::RUNNING
        };
        self.inner.with_proc(id, "", |p| {
            if p.exit.is_none() {
                p.status = want;
            }
            Ok(())
        })?;
        if pause {
            self.inner.publish(TaskPaused {
                container_id: id.to_string(),
                ..Default::default()
            });
        } else {
            self.inner.publish(TaskResumed {
                container_id: id.to_string(),
                ..Default::default()
            });
        }
        Ok(Empty::new())
    }
}

/// The owner of a container's volumes disk slot (its rootfs slot's owner
/// is the container id).
fn volumes_slot_owner(container_id: &str) -> String {
    format!("{container_id}/volumes")
}

/// What `containerd-shim-husk-v2 delete` does after a shim crash: kill the
/// pod's husk if it was this container's pod, remove the container's disk
/// (and the pod's state if it was the pod), unmount the bundle's rootfs.
pub fn cleanup_after_crash(config: &Config, namespace: &str, id: &str, bundle: &Path) {
    let pod_id = Spec::load(bundle.join("config.json"))
        .map(|s| spec::sandbox_id(&s, id))
        .unwrap_or_else(|_| id.to_string());
    let dir = pod_dir(config, namespace, &pod_id);
    if pod_id == id {
        vm::kill_recorded(&dir);
        vm::remove_dir(&dir);
    } else {
        let _ = std::fs::remove_file(dir.image(id));
        let _ = std::fs::remove_file(dir.volumes_image(id));
    }
    let _ =
        containerd_shim::mount::umount_recursive(bundle.join("rootfs").to_str(), libc::MNT_DETACH);
}
