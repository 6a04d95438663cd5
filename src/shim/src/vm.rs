//! A pod's microVM with a real husk: one `husk` process with its API
//! socket under the pod's state directory, configured through the REST
//! API (kernel, agent initramfs, vCPUs, memory, a vsock for the agent,
//! the spare drive slots), and the agent inside it, reached through the
//! vsock socket. [`Husk`] boots it; [`HuskVm`] is the task service's
//! [`PodVm`].

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use husk_api_types::{
    ActionType, BootSourceConfig, Drive, DriveUpdate, FsConfig, MachineConfig, MemoryHotplugConfig,
    NetworkInterface, VmStateRequest, Vsock,
};
use husk_protocol::client::{AgentClient, ClientError, Endpoint};
use husk_protocol::{
    Channel, Event, FrameError, ProcessRef, Request, Response, Sandbox, AGENT_GUEST_CID,
    AGENT_KERNEL_CMDLINE, DEFAULT_AGENT_PORT,
};

use crate::api_client::{ApiClient, ApiError};
use crate::config::Config;
use crate::io::{ProcessIo, StdioPaths};
use crate::network;
use crate::pod::{EventStream, PodDir, PodVm, ProcessStdio, VmLauncher, VmSpec};
use crate::slots::SlotSpec;

/// Why the VM could not be started or driven.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A file or process operation failed.
    #[error("cannot {what}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// husk's API refused or failed.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The agent did not come up or refused the pod's set-up.
    #[error("the agent did not set up the pod")]
    Agent(#[from] ClientError),
    /// husk's jail could not be made, or a file is outside it.
    #[error(transparent)]
    Jail(#[from] crate::jail::JailError),
    /// The pod's virtiofsd could not be started.
    #[error(transparent)]
    Virtiofsd(#[from] crate::virtiofsd::VirtiofsdError),
    /// husk exited during start.
    #[error("husk exited during start ({status}); its log: {log}")]
    Exited {
        /// How it ended.
        status: String,
        /// The tail of its log (stderr and the guest console).
        log: String,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmError {
    let what = what.into();
    move |source| VmError::Io { what, source }
}

/// Placeholder size of an empty slot: one sector's worth of zeros is a
/// disk the guest accepts and nothing mounts.
const PLACEHOLDER_BYTES: u64 = 4096;

/// The most idle control connections kept for later calls.
const IDLE_CONNECTIONS: usize = 4;

/// Control connections to the agent, so that requests in flight never
/// wait for each other: a call takes an idle connection (or opens one),
/// makes its request within the deadline, and gives the connection back
/// if it is still good. The pool's lock is held only to take or give one.
pub struct AgentPool {
    endpoint: Endpoint,
    timeout: Duration,
    idle: Mutex<Vec<AgentClient>>,
    /// Whether the last call to end left its connection broken (timed
    /// out, cut, or answered with someone else's reply).
    broken: AtomicBool,
}

impl AgentPool {
    /// Calls to the agent at `endpoint`, each within `timeout`; `first`
    /// is a connection already open.
    pub fn new(endpoint: Endpoint, timeout: Duration, first: Option<AgentClient>) -> AgentPool {
        AgentPool {
            endpoint,
            timeout,
            idle: Mutex::new(first.into_iter().collect()),
            broken: AtomicBool::new(false),
        }
    }

    /// One request within the pool's deadline.
    pub fn call(&self, request: Request) -> Result<Response, ClientError> {
        self.call_within(request, self.timeout)
    }

    /// One request within `limit`.
    pub fn call_within(&self, request: Request, limit: Duration) -> Result<Response, ClientError> {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut client = idle.unwrap_or_else(|| AgentClient::new(self.endpoint.clone(), None));
        let result = client.call_within(request, limit);
        let broken = client.is_broken();
        self.broken.store(broken, Ordering::Relaxed);
        if !broken {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            if idle.len() < IDLE_CONNECTIONS {
                idle.push(client);
            }
        }
        result
    }

    /// Whether the last call broke its connection.
    pub fn broken(&self) -> bool {
        self.broken.load(Ordering::Relaxed)
    }

    /// Where the agent is.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Each call's deadline.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

/// Boots pods' VMs with husk, as configured.
pub struct Husk {
    config: Config,
}

impl Husk {
    /// A launcher for `config`'s husk, kernel and agent.
    pub fn new(config: Config) -> Husk {
        Husk { config }
    }
}

impl VmLauncher for Husk {
    fn boot(
        &self,
        dir: &PodDir,
        spec: &VmSpec,
        slots: &[SlotSpec],
    ) -> Result<Arc<dyn PodVm>, VmError> {
        if self.config.template {
            if let Some(t) = crate::template::for_pod(&self.config, spec, slots) {
                match self.boot_with(dir, spec, slots, Some(&t)) {
                    Ok(vm) => return Ok(vm),
                    Err(e) => {
                        tracing::warn!(pod = %spec.id, template = %t.dir().display(), error = %crate::error::Chain(&e),
                            "the pod's template did not restore: removing it and booting the pod");
                        t.discard();
                    }
                }
            }
        }
        self.boot_with(dir, spec, slots, None)
    }
}

impl Husk {
    /// Boots the pod's VM, or restores it from `template`.
    fn boot_with(
        &self,
        dir: &PodDir,
        spec: &VmSpec,
        slots: &[SlotSpec],
        template: Option<&crate::template::Template>,
    ) -> Result<Arc<dyn PodVm>, VmError> {
        let config = &self.config;
        // Named here, before anything is made: jailed, husk would never
        // see a missing file (the jailer's bind of it fails first).
        for (what, path) in [
            ("guest kernel image", &config.kernel),
            ("agent initramfs", &config.initrd),
        ] {
            match std::fs::metadata(path) {
                Ok(m) if m.is_file() => {}
                Ok(_) => {
                    return Err(VmError::Io {
                        what: format!("use the {what} {}", path.display()),
                        source: std::io::Error::other("not a regular file"),
                    })
                }
                Err(e) => return Err(io(format!("open the {what} {}", path.display()))(e)),
            }
        }
        crate::private::dir(&dir.0).map_err(io(format!("create {}", dir.0.display())))?;
        crate::private::dir(&dir.run_dir())
            .map_err(io(format!("create {}", dir.run_dir().display())))?;
        if let Some(jail) = &spec.jail {
            jail.prepare(dir)?;
        }
        for f in [dir.api_socket(), dir.vsock()] {
            let _ = std::fs::remove_file(f);
        }
        crate::private::file(&dir.log()).map_err(io(format!("create {}", dir.log().display())))?;
        // The pod's file server first: husk connects to it at its start.
        let t_virtiofsd = Instant::now();
        let mut virtiofsd = match &spec.share {
            Some(served) => match crate::virtiofsd::Virtiofsd::start(
                &config.virtiofsd(),
                dir,
                served,
                spec.cgroup.as_deref(),
                spec.jail.as_ref().map(|j| (j.uid, j.gid)),
            ) {
                Ok(v) => Some(v),
                Err(e) => {
                    remove_dir(dir);
                    return Err(e.into());
                }
            },
            None => None,
        };
        if virtiofsd.is_some() {
            tracing::info!(pod = %spec.id, ms = t_virtiofsd.elapsed().as_millis() as u64,
                "virtiofsd serves the pod's share");
        }
        // Appending, so husk's writes follow the log keeper's truncation.
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.log())
            .map_err(io(format!("open {}", dir.log().display())))?;
        let jail = spec.jail.as_deref();
        let api_socket = husk_path(jail, &dir.api_socket())?;
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "--api-sock".as_ref(),
            api_socket.as_os_str(),
            "--id".as_ref(),
            spec.id.as_ref(),
        ];
        if !config.seccomp {
            args.push("--no-seccomp".as_ref());
        }
        let mut cmd = match jail {
            Some(j) => j.command(config, &spec.id, &args),
            None => {
                let mut c = Command::new(config.husk());
                c.args(&args);
                c
            }
        };
        // husk opens the pod's tap, so it lives in the pod's namespace.
        let netns = match &spec.network {
            Some(net) => Some(File::open(&net.netns).map_err(io(format!(
                "open the network namespace {}",
                net.netns.display()
            )))?),
            None => None,
        };
        if let Some(ns) = &netns {
            let fd = ns.as_raw_fd();
            // SAFETY: setns(2) is async-signal-safe; the descriptor stays
            // open until spawn returned.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io("dup the log"))?)
            .stderr(log)
            .spawn()
            .map_err(io(format!("start {}", cmd.get_program().to_string_lossy())))?;
        drop(netns);
        let pid = child.id();
        // In the pod's cgroup before the guest touches its memory, so all
        // of it is charged to the pod.
        if let Some(cgroup) = &spec.cgroup {
            let procs = cgroup.join("cgroup.procs");
            if let Err(e) = std::fs::write(&procs, pid.to_string()) {
                let _ = child.kill();
                let _ = child.wait();
                remove_dir(dir);
                return Err(VmError::Io {
                    what: format!("move husk into {}", procs.display()),
                    source: e,
                });
            }
        }
        let keeper = LogKeeper::start(dir.log(), config.console_log_kib << 10, dir.metrics());
        let configured = std::fs::write(dir.pid_file(), pid.to_string())
            .map_err(io(format!("write {}", dir.pid_file().display())))
            .and_then(|()| match template {
                Some(t) => restore(config, dir, spec, slots, t, &mut child),
                None => configure(config, dir, spec, slots, &mut child),
            });
        match configured {
            Ok((api, agent)) => {
                if let Some(v) = virtiofsd.as_mut() {
                    let dir = dir.clone();
                    v.watch(move |how| {
                        tracing::error!(how,
                            "virtiofsd, the pod's file server, exited: its volumes are gone; stopping the pod's microVM");
                        kill_recorded(&dir);
                    });
                }
                Ok(Arc::new(HuskVm {
                    dir: dir.clone(),
                    jail: spec.jail.clone(),
                    pid,
                    api,
                    agent,
                    child: Mutex::new(Some(child)),
                    virtiofsd: Mutex::new(virtiofsd),
                    _log_keeper: keeper,
                }))
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                // The error carries the log's tail; nothing else is kept.
                remove_dir(dir);
                Err(e)
            }
        }
    }
}

/// husk's end, as the error of a step that failed because of it.
fn exited(dir: &PodDir, child: &mut Child) -> Result<Option<VmError>, VmError> {
    Ok(child
        .try_wait()
        .map_err(io("wait for husk"))?
        .map(|status| VmError::Exited {
            status: status.to_string(),
            log: log_tail(&dir.log()),
        }))
}

/// husk's API, once it serves (the socket exists a moment before husk
/// listens on it).
pub(crate) fn wait_for_api(dir: &PodDir, child: &mut Child) -> Result<ApiClient, VmError> {
    let api = ApiClient::new(&dir.api_socket());
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = api.instance_info() {
        if let Some(e) = exited(dir, child)? {
            return Err(e);
        }
        if Instant::now() >= deadline {
            return Err(e.into());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(api)
}

/// Configures the VM through husk's API, everything but its start: the
/// machine, hot-pluggable memory, the kernel, the spare drives (their
/// placeholders made here), the network interface with `mac`, the share,
/// the vsock and the metrics file.
pub(crate) fn configure_devices(
    api: &ApiClient,
    config: &Config,
    dir: &PodDir,
    spec: &VmSpec,
    slots: &[SlotSpec],
    mac: Option<&str>,
) -> Result<(), VmError> {
    let vcpus = u8::try_from(spec.vcpus).unwrap_or(u8::MAX);
    api.put_machine_config(&MachineConfig {
        vcpu_count: vcpus,
        mem_size_mib: spec.mem_mib,
        max_vcpu_count: (spec.max_vcpus > spec.vcpus)
            .then(|| u8::try_from(spec.max_vcpus).unwrap_or(u8::MAX)),
        ..Default::default()
    })?;
    if spec.hotplug_mib > 0 {
        api.put_memory_hotplug(&MemoryHotplugConfig::new(spec.hotplug_mib))?;
    }
    let mut cmdline = AGENT_KERNEL_CMDLINE.to_string();
    if !config.kernel_params.is_empty() {
        cmdline.push(' ');
        cmdline.push_str(&config.kernel_params);
    }
    let jail = spec.jail.as_deref();
    let (kernel, initrd) = match jail {
        Some(_) => crate::jail::PodJail::boot_files(),
        None => (config.kernel.clone(), config.initrd.clone()),
    };
    api.put_boot_source(&BootSourceConfig {
        kernel_image_path: kernel,
        initrd_path: Some(initrd),
        boot_args: Some(cmdline),
    })?;
    for slot in slots {
        let placeholder = make_placeholder(jail, slot)?;
        api.put_drive(&Drive::new(&slot.id, &placeholder, slot.read_only))?;
    }
    if let Some(mac) = mac {
        api.put_network_interface(&NetworkInterface {
            iface_id: IFACE_ID.into(),
            host_dev_name: network::TAP.into(),
            guest_mac: Some(mac.to_string()),
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        })?;
    }
    if spec.share.is_some() {
        api.put_fs(&FsConfig {
            id: FS_ID.into(),
            tag: crate::share::TAG.into(),
            socket: husk_path(jail, &crate::virtiofsd::socket(dir))?,
            num_queues: husk_api_types::DEFAULT_FS_NUM_QUEUES,
            queue_size: husk_api_types::DEFAULT_FS_QUEUE_SIZE,
            relay: config.share_relay,
        })?;
    }
    api.put_vsock(&Vsock {
        guest_cid: u64::from(AGENT_GUEST_CID),
        uds_path: husk_path(jail, &dir.vsock())?,
        vsock_id: None,
    })?;
    put_metrics(api, jail, dir)
}

/// The network interface's id in every pod VM (and template).
pub(crate) const IFACE_ID: &str = "eth0";

/// The share's virtio-fs device id in every pod VM (and template).
pub(crate) const FS_ID: &str = "share";

/// Makes slot's empty placeholder and returns what husk calls it.
fn make_placeholder(
    jail: Option<&crate::jail::PodJail>,
    slot: &SlotSpec,
) -> Result<PathBuf, VmError> {
    let f = crate::private::file(&slot.placeholder)
        .map_err(io(format!("create {}", slot.placeholder.display())))?;
    f.set_len(PLACEHOLDER_BYTES)
        .map_err(io(format!("size {}", slot.placeholder.display())))?;
    give_to_husk(jail, &slot.placeholder)
}

/// Created here, 0600, so husk appends to a file only root (and a jailed
/// husk's uid) reads; the log keeper holds it to its cap, `husk metrics`
/// reads it.
fn put_metrics(
    api: &ApiClient,
    jail: Option<&crate::jail::PodJail>,
    dir: &PodDir,
) -> Result<(), VmError> {
    crate::private::file(&dir.metrics())
        .map_err(io(format!("create {}", dir.metrics().display())))?;
    api.put_metrics(&give_to_husk(jail, &dir.metrics())?)?;
    Ok(())
}

/// The agent's first connection, once it answers (within the boot
/// timeout; husk's end fails it at once).
pub(crate) fn connect_agent(
    config: &Config,
    dir: &PodDir,
    child: &mut Child,
) -> Result<AgentClient, VmError> {
    let endpoint = Endpoint::Vsock {
        uds: dir.vsock(),
        port: DEFAULT_AGENT_PORT,
    };
    match AgentClient::connect(endpoint, Duration::from_secs(config.boot_timeout_secs)) {
        Ok(a) => Ok(a),
        Err(e) => Err(exited(dir, child)?.unwrap_or(e.into())),
    }
}

/// Has the agent set up the pod (the first connection kept for later
/// calls); `restored` when the guest is a template's clone, whose NIC has
/// the template's MAC.
fn set_up_sandbox(
    config: &Config,
    dir: &PodDir,
    spec: &VmSpec,
    first: AgentClient,
    restored: bool,
) -> Result<AgentPool, VmError> {
    // A guest that stops answering fails the call, not the shim's whole
    // task API (the agent bounds its own steps at 30 s).
    let agent = AgentPool::new(
        Endpoint::Vsock {
            uds: dir.vsock(),
            port: DEFAULT_AGENT_PORT,
        },
        Duration::from_secs(config.agent_timeout_secs),
        Some(first),
    );
    let fresh = if restored {
        Some(husk_protocol::Restored::now().map_err(io("read this host's entropy and clock"))?)
    } else {
        None
    };
    agent.call(Request::CreateSandbox(Sandbox {
        hostname: spec.hostname.clone(),
        interfaces: spec
            .network
            .iter()
            .map(|n| {
                let mut i = n.interface.clone();
                if restored {
                    i.device_mac = Some(crate::template::TEMPLATE_MAC.to_string());
                }
                i
            })
            .collect(),
        routes: spec.network.iter().flat_map(|n| n.routes.clone()).collect(),
        restored: fresh,
        ..Default::default()
    }))?;
    Ok(agent)
}

/// Configures and starts the VM through husk's API, then waits for the
/// agent and has it set up the pod.
fn configure(
    config: &Config,
    dir: &PodDir,
    spec: &VmSpec,
    slots: &[SlotSpec],
    child: &mut Child,
) -> Result<(ApiClient, AgentPool), VmError> {
    let api = wait_for_api(dir, child)?;
    let mac = spec.network.as_ref().map(|n| n.interface.mac.clone());
    configure_devices(&api, config, dir, spec, slots, mac.as_deref())?;
    api.action(ActionType::InstanceStart)?;
    let first = connect_agent(config, dir, child)?;
    let agent = set_up_sandbox(config, dir, spec, first, false)?;
    Ok((api, agent))
}

/// Restores the VM from `template` through husk's API (`PUT
/// /snapshot/load`) with the pod's own tap, MAC, spare drives, share
/// socket and vsock socket in place of the template's, then has the agent
/// make the clone the pod's and set the pod up.
fn restore(
    config: &Config,
    dir: &PodDir,
    spec: &VmSpec,
    slots: &[SlotSpec],
    template: &crate::template::Template,
    child: &mut Child,
) -> Result<(ApiClient, AgentPool), VmError> {
    let t0 = Instant::now();
    let api = wait_for_api(dir, child)?;
    let api_ms = t0.elapsed().as_millis() as u64;
    let jail = spec.jail.as_deref();
    put_metrics(&api, jail, dir)?;
    let mut drives = Vec::with_capacity(slots.len());
    for slot in slots {
        let placeholder = make_placeholder(jail, slot)?;
        drives.push(serde_json::json!({"drive_id": slot.id, "path_on_host": placeholder}));
    }
    let mut load = serde_json::json!({
        "snapshot_path": husk_path(jail, &template.state())?,
        "mem_backend": {"backend_type": "File", "backend_path": husk_path(jail, &template.mem())?},
        "resume_vm": true,
        "vsock_override": {"uds_path": husk_path(jail, &dir.vsock())?},
        "drive_overrides": drives,
    });
    if let Some(net) = &spec.network {
        load["network_overrides"] = serde_json::json!([{
            "iface_id": IFACE_ID,
            "host_dev_name": network::TAP,
            "guest_mac": net.interface.mac,
        }]);
    }
    if spec.share.is_some() {
        load["fs_overrides"] = serde_json::json!([{
            "id": FS_ID,
            "socket": husk_path(jail, &crate::virtiofsd::socket(dir))?,
        }]);
    }
    let t = Instant::now();
    api.load_snapshot(&load)?;
    let load_ms = t.elapsed().as_millis() as u64;
    let t = Instant::now();
    let first = connect_agent(config, dir, child)?;
    let agent_ms = t.elapsed().as_millis() as u64;
    let t = Instant::now();
    let agent = set_up_sandbox(config, dir, spec, first, true)?;
    // Where a pod's start goes, for benchmarks (docs/benchmarks.md).
    tracing::info!(pod = %spec.id, ms = t0.elapsed().as_millis() as u64,
        api_ms, load_ms, agent_ms, sandbox_ms = t.elapsed().as_millis() as u64,
        template = %template.dir().display(), "the pod's microVM was restored from its template");
    Ok((api, agent))
}

/// What husk calls the host's `path`: the path itself, or where a jailed
/// husk sees it.
fn husk_path(jail: Option<&crate::jail::PodJail>, path: &Path) -> Result<PathBuf, VmError> {
    let Some(j) = jail else {
        return Ok(path.to_path_buf());
    };
    j.path_in_jail(path)?.ok_or_else(|| VmError::Io {
        what: format!("give husk {}", path.display()),
        source: std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "outside the pod's directory and the image cache, so outside husk's jail",
        ),
    })
}

/// [`husk_path`] of a file husk opens for writing: a jailed husk's own
/// when it is in the pod's directory.
fn give_to_husk(jail: Option<&crate::jail::PodJail>, path: &Path) -> Result<PathBuf, VmError> {
    if let Some(j) = jail {
        if path.starts_with(&j.root) {
            j.give(path)?;
        }
    }
    husk_path(jail, path)
}

/// A running pod VM: its husk and the agent in its guest.
pub struct HuskVm {
    dir: PodDir,
    /// husk's jail (its uid is given back when the VM goes).
    jail: Option<Arc<crate::jail::PodJail>>,
    pid: u32,
    api: ApiClient,
    agent: AgentPool,
    /// husk's process, until [`PodVm::wait_exit`] takes it.
    child: Mutex<Option<Child>>,
    /// The pod's virtiofsd, stopped once husk has exited.
    virtiofsd: Mutex<Option<crate::virtiofsd::Virtiofsd>>,
    /// Keeps husk.log at its cap while the VM is around.
    _log_keeper: LogKeeper,
}

/// How often the log keeper looks at the log's size: what a guest writes
/// in this time is how far past its cap the log can get.
const LOG_CHECK: Duration = Duration::from_secs(1);

/// The file a rotated log moves to.
fn rotated(log: &Path) -> std::path::PathBuf {
    let mut name = log.as_os_str().to_owned();
    name.push(".1");
    name.into()
}

/// If `log` holds more than `max` bytes, copies it to `<log>.1` (replacing
/// the older copy) and empties it; whoever writes it with O_APPEND goes
/// on at its new end. Lines written between the copy and the truncation
/// are lost (logrotate's copytruncate has the same gap). Returns whether
/// it rotated.
pub fn rotate_log(log: &Path, max: u64) -> std::io::Result<bool> {
    if std::fs::metadata(log)?.len() <= max {
        return Ok(false);
    }
    let old = rotated(log);
    // Copied, not renamed: husk keeps writing its descriptor of `log`
    // (the copy gets the log's own mode, 0600).
    std::fs::copy(log, &old)?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(log)?
        .set_len(0)?;
    Ok(true)
}

/// The most husk's metrics file holds before it moves to
/// `metrics.json.1`: a few dozen lines (a line per flush: once a minute,
/// and on each of the exporter's scrapes), of which only the last is read.
pub const METRICS_MAX: u64 = 64 << 10;

/// A thread that holds husk.log to its cap (everything the guest prints
/// on its console lands there, as fast as the guest likes) and the
/// metrics file to [`METRICS_MAX`], until dropped or the pod's directory
/// is gone.
struct LogKeeper(Arc<AtomicBool>);

impl LogKeeper {
    fn start(log: std::path::PathBuf, max: u64, metrics: std::path::PathBuf) -> LogKeeper {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let spawned = std::thread::Builder::new()
            .name("log-keeper".into())
            .spawn(move || {
                let mut rotations = 0u64;
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(LOG_CHECK);
                    match rotate_log(&log, max) {
                        Ok(false) => {}
                        Ok(true) => {
                            rotations += 1;
                            // The first, then every hundredth: a flooding
                            // guest does not flood the shim's log instead.
                            if rotations % 100 == 1 {
                                tracing::warn!(log = %log.display(), max, rotations,
                                    "husk's log reached its cap and was rotated");
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                        Err(e) => {
                            tracing::warn!(log = %log.display(), error = %e, "cannot rotate husk's log");
                            break;
                        }
                    }
                    // Made a moment after the keeper starts: until then
                    // it is not found, which is no reason to stop.
                    match rotate_log(&metrics, METRICS_MAX) {
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => {
                            tracing::warn!(file = %metrics.display(), error = %e, "cannot rotate husk's metrics");
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            // The pod runs on; only its log goes unbounded.
            tracing::warn!(error = %e, "cannot start the log keeper: husk's log is not capped");
        }
        LogKeeper(stop)
    }
}

impl Drop for LogKeeper {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The agent's event stream on its vsock connection.
struct AgentEvents(UnixStream);

impl EventStream for AgentEvents {
    fn next_event(&mut self) -> Result<Option<Event>, FrameError> {
        match husk_protocol::read_frame(&mut self.0) {
            Ok(event) => Ok(Some(event)),
            Err(FrameError::Closed) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl PodVm for HuskVm {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn call(&self, request: Request) -> Result<Response, ClientError> {
        self.agent.call(request)
    }

    fn events(&self) -> Result<Box<dyn EventStream>, ClientError> {
        let s = self
            .agent
            .endpoint()
            .open_within(Channel::Events, self.agent.timeout())?;
        Ok(Box::new(AgentEvents(s)))
    }

    fn attach_stdio(
        &self,
        process: &ProcessRef,
        paths: &StdioPaths,
    ) -> Result<Arc<dyn ProcessStdio>, ClientError> {
        let io = ProcessIo::attach(
            self.agent.endpoint(),
            self.agent.timeout(),
            &process.container_id,
            process.exec_id.as_deref(),
            paths,
        )?;
        Ok(Arc::new(io))
    }

    fn swap_drive(&self, drive_id: &str, image: &Path) -> Result<(), VmError> {
        let path = give_to_husk(self.jail.as_deref(), image)?;
        self.api.patch_drive(&DriveUpdate {
            drive_id: drive_id.to_string(),
            path_on_host: Some(path),
            rate_limiter: None,
        })?;
        Ok(())
    }

    fn set_paused(&self, paused: bool) -> Result<(), VmError> {
        self.api.set_vm_state(if paused {
            VmStateRequest::Paused
        } else {
            VmStateRequest::Resumed
        })?;
        Ok(())
    }

    fn request_memory(&self, mib: u64) -> Result<(), VmError> {
        self.api.patch_memory_hotplug(mib)?;
        Ok(())
    }

    fn plugged_memory(&self) -> Result<u64, VmError> {
        Ok(self.api.memory_hotplug()?.plugged_size_mib)
    }

    fn shutdown_guest(&self, limit: Duration) -> bool {
        if self.agent.broken() {
            tracing::warn!("the agent's connection failed before: not asking it to shut down");
            return false;
        }
        match self.agent.call_within(Request::Shutdown, limit) {
            Ok(_) => true,
            // The guest reset before its reply left it.
            Err(e) if e.is_closed() => true,
            Err(e) => {
                tracing::warn!(error = %crate::error::Chain(&e), "the agent did not take the shutdown");
                false
            }
        }
    }

    fn kill(&self) {
        kill_recorded(&self.dir);
    }

    fn wait_exit(&self) -> String {
        let child = self.child.lock().unwrap_or_else(|e| e.into_inner()).take();
        let how = match child.map(|mut c| c.wait()) {
            Some(Ok(status)) => status.to_string(),
            Some(Err(e)) => format!("cannot wait for husk: {e}"),
            None => "husk was waited for already".into(),
        };
        let virtiofsd = self
            .virtiofsd
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        match virtiofsd {
            Some(mut v) => {
                let died = v.died();
                v.stop();
                match died {
                    Some(d) => format!(
                        "{how}: stopped by the shim because virtiofsd, the pod's file server, ended ({d})"
                    ),
                    None => how,
                }
            }
            None => how,
        }
    }

    fn probe_agent(&self, limit: Duration) -> Option<bool> {
        self.agent
            .broken()
            .then(|| AgentClient::connect(self.agent.endpoint().clone(), limit).is_ok())
    }

    fn log_tail(&self) -> String {
        log_tail(&self.dir.log())
    }
}

/// The most of a log's end read for its tail.
const TAIL_BYTES: u64 = 16 * 1024;

/// The last lines of a log file, read from its end (the guest can make
/// the log large).
pub fn log_tail(path: &Path) -> String {
    let tail = |path: &Path| {
        let mut text = Vec::new();
        if let Ok(mut f) = File::open(path) {
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = f.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)));
            let _ = f.take(TAIL_BYTES).read_to_end(&mut text);
        }
        text
    };
    // A log just rotated holds little: the lines before are in its copy.
    let mut text = tail(&rotated(path));
    if !text.is_empty() && !text.ends_with(b"\n") {
        text.push(b'\n');
    }
    text.extend(tail(path));
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join(" | ")
}

/// Kills the husk recorded in `dir` if it still runs (after a shim crash),
/// checking that the pid is still a husk first.
pub fn kill_recorded(dir: &PodDir) {
    let Ok(text) = std::fs::read_to_string(dir.pid_file()) else {
        return;
    };
    let Ok(pid) = text.trim().parse::<u32>() else {
        return;
    };
    let is_ours = husk_api_types::metrics::serves_api_socket(pid, &dir.api_socket());
    if let (Ok(pid), true) = (i32::try_from(pid), is_ours) {
        if pid > 1 {
            // SAFETY: kill(2) with the pid of the husk serving this pod's
            // API socket.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Removes the pod's state directory.
pub fn remove_dir(dir: &PodDir) {
    if let Err(e) = std::fs::remove_dir_all(&dir.0) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(dir = %dir.0.display(), error = %e, "cannot remove the pod's state");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_log_tail_is_the_last_lines_of_a_large_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("husk.log");
        let mut text = "x".repeat(1 << 20);
        for n in 0..20 {
            text.push_str(&format!("\nline {n}"));
        }
        std::fs::write(&path, text).unwrap();
        let tail = log_tail(&path);
        assert!(tail.starts_with("line 5 | line 6"), "{tail}");
        assert!(tail.ends_with("line 19"), "{tail}");
        assert_eq!(log_tail(&dir.path().join("missing")), "");
    }

    #[test]
    fn a_log_past_its_cap_is_rotated_and_its_writer_goes_on_at_the_start() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("husk.log");
        crate::private::file(&log).unwrap();
        // husk's descriptor.
        let mut husk = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        husk.write_all(b"boot line\n").unwrap();
        assert!(!rotate_log(&log, 1000).unwrap());
        for n in 0..100 {
            writeln!(husk, "flood {n:04} {}", "x".repeat(40)).unwrap();
        }
        assert!(rotate_log(&log, 1000).unwrap());
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 0);
        let old = std::fs::read_to_string(rotated(&log)).unwrap();
        assert!(old.starts_with("boot line\nflood 0000"), "{old}");
        let mode = std::fs::metadata(rotated(&log))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, crate::private::FILE_MODE);
        // No hole where the old contents were: O_APPEND writes at the new end.
        husk.write_all(b"after the rotation\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "after the rotation\n"
        );
        // The tail reads across the rotation.
        let tail = log_tail(&log);
        assert!(
            tail.ends_with(&format!(
                "flood 0099 {} | after the rotation",
                "x".repeat(40)
            )),
            "{tail}"
        );
        assert!(rotate_log(&dir.path().join("gone"), 1).is_err());
    }

    #[test]
    fn the_log_keeper_holds_the_log_at_its_cap_until_the_pod_is_gone() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let pod = dir.path().join("pod");
        crate::private::dir(&pod).unwrap();
        let log = pod.join("husk.log");
        crate::private::file(&log).unwrap();
        let mut husk = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        let metrics = pod.join("metrics.json");
        let _keeper = LogKeeper::start(log.clone(), 4096, metrics.clone());
        let mut vmm = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&metrics)
            .unwrap();
        vmm.write_all(&vec![b'm'; METRICS_MAX as usize + 1])
            .unwrap();
        let t0 = Instant::now();
        let mut total = 0u64;
        // A guest printing as fast as it can for five check periods.
        while t0.elapsed() < LOG_CHECK * 5 {
            husk.write_all(&[b'y'; 1024]).unwrap();
            total += 1024;
            std::thread::sleep(Duration::from_micros(200));
        }
        let left = std::fs::metadata(&log).unwrap().len();
        let copy = std::fs::metadata(rotated(&log)).unwrap().len();
        // The log holds what came since the last check, not all of it.
        assert!(copy > 4096, "rotated {copy} bytes");
        assert!(left < total / 2, "{left} of {total} bytes in the log");
        // The metrics file, past its cap, moved aside and started again.
        assert_eq!(std::fs::metadata(&metrics).unwrap().len(), 0);
        assert_eq!(
            std::fs::metadata(rotated(&metrics)).unwrap().len(),
            METRICS_MAX + 1
        );
        assert_eq!(
            rotated(&metrics).file_name().unwrap(),
            husk_api_types::metrics::METRICS_FILE_ROTATED
        );
        std::fs::remove_dir_all(&pod).unwrap();
        std::thread::sleep(LOG_CHECK * 2);
        assert!(!pod.exists(), "the keeper made the pod's directory again");
    }
}
