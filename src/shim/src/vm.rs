//! The pod's microVM: one `husk` process with its API socket under the
//! pod's state directory, configured through the REST API (kernel, agent
//! initramfs, vCPUs, memory, a vsock for the agent, spare drive slots for
//! containers' root filesystems), and the agent inside it.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use husk_api_types::{
    ActionType, BootSourceConfig, Drive, DriveUpdate, MachineConfig, NetworkInterface,
    VmStateRequest, Vsock,
};
use husk_protocol::client::{AgentClient, ClientError, Endpoint};
use husk_protocol::{
    Request, Response, Sandbox, AGENT_GUEST_CID, AGENT_KERNEL_CMDLINE, DEFAULT_AGENT_PORT,
};

use crate::api_client::{ApiClient, ApiError};
use crate::config::Config;
use crate::network::{self, PodNetwork};

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
    /// The agent could not be reached or refused.
    #[error("the agent did not set up the pod")]
    Agent(#[from] ClientError),
    /// husk exited during start.
    #[error("husk exited during start ({status}); its log: {log}")]
    Exited {
        /// How it ended.
        status: String,
        /// The tail of its log (stderr and the guest console).
        log: String,
    },
    /// Every drive slot holds a container's disk.
    #[error("all {0} drive slots are in use (raise drive_slots in /etc/husk/config.toml)")]
    NoSlot(u32),
    /// Every image slot holds another image's layers.
    #[error("all {0} image slots hold other images' layers")]
    NoImageSlot(u32),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmError {
    let what = what.into();
    move |source| VmError::Io { what, source }
}

/// The files of a pod's VM under the state directory.
#[derive(Debug, Clone)]
pub struct PodDir(pub PathBuf);

impl PodDir {
    /// husk's API socket.
    pub fn api_socket(&self) -> PathBuf {
        self.0.join("api.sock")
    }
    /// The vsock device's host socket.
    pub fn vsock(&self) -> PathBuf {
        self.0.join("vsock.sock")
    }
    /// husk's stderr and the guest's console.
    pub fn log(&self) -> PathBuf {
        self.0.join("husk.log")
    }
    /// husk's pid, for `delete` after a shim crash.
    pub fn pid_file(&self) -> PathBuf {
        self.0.join("husk.pid")
    }
    /// The placeholder image of the drive slot `id`.
    pub fn slot_placeholder(&self, id: &str) -> PathBuf {
        self.0.join(format!("{id}.empty"))
    }
    /// A container's rootfs image.
    pub fn image(&self, container_id: &str) -> PathBuf {
        self.0.join(format!("rootfs-{container_id}.ext4"))
    }

    /// A container's volumes disk image.
    pub fn volumes_image(&self, container_id: &str) -> PathBuf {
        self.0.join(format!("volumes-{container_id}.ext4"))
    }
}

/// The drive id of slot `n` (the disk's serial in the guest).
pub fn slot_id(n: u32) -> String {
    format!("slot{n}")
}

/// The drive id of read-only image slot `n`.
pub fn image_slot_id(n: u32) -> String {
    format!("image{n}")
}

/// A spare drive of the VM and what it holds.
#[derive(Debug, Clone)]
struct Slot {
    /// Its drive id.
    id: String,
    /// Read-only: an image's layers, shareable by several containers.
    read_only: bool,
    /// Its image when empty.
    placeholder: PathBuf,
    /// The image it holds, if any.
    image: Option<PathBuf>,
    /// Who uses it: container ids (or a container's volumes key).
    owners: Vec<String>,
}

/// What a VM is sized and named as.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// The pod's id (husk's instance id).
    pub id: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest memory (MiB).
    pub mem_mib: u64,
    /// The guest's hostname.
    pub hostname: Option<String>,
    /// The pod's network, wired already: husk runs in its namespace.
    pub network: Option<PodNetwork>,
}

/// A running pod VM.
pub struct PodVm {
    /// Its files.
    pub dir: PodDir,
    /// husk's host pid.
    pub pid: u32,
    api: ApiClient,
    endpoint: Endpoint,
    agent: Mutex<AgentClient>,
    /// The spare drives, writable ones first.
    slots: Mutex<Vec<Slot>>,
}

/// Placeholder size of an empty slot: one sector's worth of zeros is a
/// disk the guest accepts and nothing mounts.
const PLACEHOLDER_BYTES: u64 = 4096;

impl PodVm {
    /// Starts husk, configures and boots the VM, and waits for the agent.
    /// Returns the VM and husk's process (for the caller to wait on).
    pub fn boot(config: &Config, dir: PodDir, spec: &VmSpec) -> Result<(PodVm, Child), VmError> {
        std::fs::create_dir_all(&dir.0).map_err(io(format!("create {}", dir.0.display())))?;
        for f in [dir.api_socket(), dir.vsock()] {
            let _ = std::fs::remove_file(f);
        }
        let log = File::create(dir.log()).map_err(io(format!("create {}", dir.log().display())))?;
        let mut cmd = Command::new(config.husk());
        cmd.arg("--api-sock")
            .arg(dir.api_socket())
            .arg("--id")
            .arg(&spec.id);
        if !config.seccomp {
            cmd.arg("--no-seccomp");
        }
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
            .map_err(io(format!("start {}", config.husk().display())))?;
        drop(netns);
        let pid = child.id();
        std::fs::write(dir.pid_file(), pid.to_string())
            .map_err(io(format!("write {}", dir.pid_file().display())))?;
        match Self::configure(config, &dir, spec, &mut child) {
            Ok(vm) => Ok((PodVm { pid, ..vm }, child)),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                // The error carries the log's tail; nothing else is kept.
                remove_dir(&dir);
                Err(e)
            }
        }
    }

    fn configure(
        config: &Config,
        dir: &PodDir,
        spec: &VmSpec,
        child: &mut Child,
    ) -> Result<PodVm, VmError> {
        let api = ApiClient::new(&dir.api_socket());
        // husk serves the API once the socket accepts (it exists a moment
        // before husk listens on it).
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Err(e) = api.instance_info() {
            if let Some(status) = child.try_wait().map_err(io("wait for husk"))? {
                return Err(VmError::Exited {
                    status: status.to_string(),
                    log: log_tail(&dir.log()),
                });
            }
            if Instant::now() >= deadline {
                return Err(e.into());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        api.put_machine_config(&MachineConfig {
            vcpu_count: u8::try_from(spec.vcpus).unwrap_or(u8::MAX),
            mem_size_mib: spec.mem_mib,
            ..Default::default()
        })?;
        let mut cmdline = AGENT_KERNEL_CMDLINE.to_string();
        if !config.kernel_params.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(&config.kernel_params);
        }
        api.put_boot_source(&BootSourceConfig {
            kernel_image_path: config.kernel.clone(),
            initrd_path: Some(config.initrd.clone()),
            boot_args: Some(cmdline),
        })?;
        let writable = (0..config.drive_slots).map(|n| (slot_id(n), false));
        let read_only = (0..config.image_slots).map(|n| (image_slot_id(n), true));
        let mut slots = Vec::new();
        for (id, read_only) in writable.chain(read_only) {
            let placeholder = dir.slot_placeholder(&id);
            let f = File::create(&placeholder)
                .map_err(io(format!("create {}", placeholder.display())))?;
            f.set_len(PLACEHOLDER_BYTES)
                .map_err(io(format!("size {}", placeholder.display())))?;
            api.put_drive(&Drive::new(&id, &placeholder, read_only))?;
            slots.push(Slot {
                id,
                read_only,
                placeholder,
                image: None,
                owners: Vec::new(),
            });
        }
        if let Some(net) = &spec.network {
            api.put_network_interface(&NetworkInterface {
                iface_id: "eth0".into(),
                host_dev_name: network::TAP.into(),
                guest_mac: Some(net.interface.mac.clone()),
                rx_rate_limiter: None,
                tx_rate_limiter: None,
            })?;
        }
        api.put_vsock(&Vsock {
            guest_cid: u64::from(AGENT_GUEST_CID),
            uds_path: dir.vsock(),
            vsock_id: None,
        })?;
        api.action(ActionType::InstanceStart)?;
        let endpoint = Endpoint::Vsock {
            uds: dir.vsock(),
            port: DEFAULT_AGENT_PORT,
        };
        let mut agent = match AgentClient::connect(
            endpoint.clone(),
            Duration::from_secs(config.boot_timeout_secs),
        ) {
            Ok(a) => a,
            Err(e) => {
                if let Some(status) = child.try_wait().map_err(io("wait for husk"))? {
                    return Err(VmError::Exited {
                        status: status.to_string(),
                        log: log_tail(&dir.log()),
                    });
                }
                return Err(e.into());
            }
        };
        // A guest that stops answering fails the call, not the shim's
        // whole task API (the agent bounds its own steps at 30 s).
        agent.set_timeout(Some(Duration::from_secs(config.agent_timeout_secs)))?;
        agent.call(Request::CreateSandbox(Sandbox {
            hostname: spec.hostname.clone(),
            interfaces: spec.network.iter().map(|n| n.interface.clone()).collect(),
            routes: spec.network.iter().flat_map(|n| n.routes.clone()).collect(),
            ..Default::default()
        }))?;
        Ok(PodVm {
            dir: dir.clone(),
            pid: 0,
            api,
            endpoint,
            agent: Mutex::new(agent),
            slots: Mutex::new(slots),
        })
    }

    /// Where the agent is, for stdio and event channels.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// One request to the agent.
    pub fn call(&self, request: Request) -> Result<Response, ClientError> {
        self.agent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .call(request)
    }

    /// Whether the control connection's last request failed (timed out
    /// or broke): the next one reconnects first.
    pub fn agent_broken(&self) -> bool {
        self.agent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_broken()
    }

    /// Whether the agent answers a Ping on a new connection within
    /// `limit`: after a request went unanswered, tells a request stuck in
    /// the agent (it answers) from a guest or vsock that stopped (it does
    /// not).
    pub fn agent_answers(&self, limit: Duration) -> bool {
        AgentClient::connect(self.endpoint.clone(), limit).is_ok()
    }

    /// Asks the agent to power the guest off, waiting at most `limit` for
    /// its answer; false if it did not take it. A control connection that
    /// failed its last request (the guest stopped answering) is not tried
    /// again: the caller goes straight to killing husk.
    pub fn shutdown_guest(&self, limit: Duration) -> bool {
        let mut agent = self.agent.lock().unwrap_or_else(|e| e.into_inner());
        if agent.is_broken() {
            tracing::warn!("the agent's connection failed before: not asking it to shut down");
            return false;
        }
        let result = agent
            .set_timeout(Some(limit))
            .and_then(|()| agent.call(Request::Shutdown));
        match result {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(error = %crate::error::Chain(&e), "the agent did not take the shutdown");
                false
            }
        }
    }

    /// Puts `image` into a free writable drive slot for `owner`; returns
    /// the slot's drive id.
    pub fn attach_disk(&self, owner: &str, image: &Path) -> Result<String, VmError> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let writable = slots.iter().filter(|s| !s.read_only).count() as u32;
        let slot = slots
            .iter_mut()
            .find(|s| !s.read_only && s.owners.is_empty())
            .ok_or(VmError::NoSlot(writable))?;
        self.swap(slot, image)?;
        slot.owners.push(owner.to_string());
        Ok(slot.id.clone())
    }

    /// Gives `owner` a read-only slot holding `image` (an image's layers):
    /// the one that holds it already, shared, or a free one; returns the
    /// slot's drive id.
    pub fn attach_shared(&self, owner: &str, image: &Path) -> Result<String, VmError> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let count = slots.iter().filter(|s| s.read_only).count() as u32;
        if let Some(slot) = slots
            .iter_mut()
            .find(|s| s.read_only && s.image.as_deref() == Some(image))
        {
            slot.owners.push(owner.to_string());
            return Ok(slot.id.clone());
        }
        let slot = slots
            .iter_mut()
            .find(|s| s.read_only && s.owners.is_empty())
            .ok_or(VmError::NoImageSlot(count))?;
        self.swap(slot, image)?;
        slot.owners.push(owner.to_string());
        Ok(slot.id.clone())
    }

    /// Points `slot`'s drive at `image` on the running VM.
    fn swap(&self, slot: &mut Slot, image: &Path) -> Result<(), VmError> {
        self.api.patch_drive(&DriveUpdate {
            drive_id: slot.id.clone(),
            path_on_host: Some(image.to_path_buf()),
            rate_limiter: None,
        })?;
        slot.image = Some(image.to_path_buf());
        Ok(())
    }

    /// Releases every slot `owner` uses; a slot nobody uses any more gets
    /// its placeholder back.
    pub fn detach_disk(&self, owner: &str) -> Result<(), VmError> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let mut result = Ok(());
        for slot in slots.iter_mut() {
            let before = slot.owners.len();
            slot.owners.retain(|o| o != owner);
            if slot.owners.len() == before || !slot.owners.is_empty() {
                continue;
            }
            let placeholder = slot.placeholder.clone();
            if let Err(e) = self.swap(slot, &placeholder) {
                // Still holding the image: not handed out again.
                slot.owners.push(owner.to_string());
                result = Err(e);
            } else {
                slot.image = None;
            }
        }
        result
    }

    /// Pauses or resumes the vCPUs.
    pub fn set_paused(&self, paused: bool) -> Result<(), VmError> {
        self.api.set_vm_state(if paused {
            VmStateRequest::Paused
        } else {
            VmStateRequest::Resumed
        })?;
        Ok(())
    }
}

/// The last lines of a log file.
pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join(" | ")
}

/// Kills the husk recorded in `dir` if it still runs (after a shim crash),
/// checking that the pid is still a husk first.
pub fn kill_recorded(dir: &PodDir) {
    let Ok(text) = std::fs::read_to_string(dir.pid_file()) else {
        return;
    };
    let Ok(pid) = text.trim().parse::<i32>() else {
        return;
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let api = dir.api_socket();
    let is_ours = cmdline
        .split(|b| *b == 0)
        .any(|arg| arg == api.as_os_str().as_encoded_bytes());
    if pid > 1 && is_ours {
        // SAFETY: kill(2) with a pid whose command line names this pod's
        // API socket.
        unsafe { libc::kill(pid, libc::SIGKILL) };
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
