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

use husk_protocol::client::{AgentClient, ClientError, Endpoint};
use husk_protocol::{Request, Response, Sandbox, DEFAULT_AGENT_PORT};
use serde_json::json;

use crate::api_client::{ApiClient, ApiError};
use crate::config::Config;
use crate::network::{self, PodNetwork};

/// Why the VM could not be started or driven.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// husk's API refused or failed.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The agent could not be reached or refused.
    #[error("agent: {0}")]
    Agent(#[from] ClientError),
    /// husk exited during start.
    #[error("husk exited during start ({status}); its log: {log}")]
    Exited {
        /// How it ended.
        status: String,
        /// The tail of its log (stderr and the guest console).
        log: String,
    },
    /// Every drive slot holds a container's root filesystem.
    #[error("all {0} drive slots are in use (raise drive_slots in /etc/husk/config.toml)")]
    NoSlot(u32),
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
    /// The placeholder image of drive slot `n`.
    pub fn slot_placeholder(&self, n: u32) -> PathBuf {
        self.0.join(format!("slot{n}.empty"))
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
    /// Which container holds each slot.
    slots: Mutex<Vec<Option<String>>>,
}

/// Placeholder size of an empty slot: one sector's worth of zeros is a
/// disk the guest accepts and nothing mounts.
const PLACEHOLDER_BYTES: u64 = 4096;

/// The longest the shim waits for one answer from the agent.
const AGENT_CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// The guest kernel's command line before the configured parameters.
const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off quiet";

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
        while let Err(e) = api.call("GET", "/", None) {
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
        api.put(
            "/machine-config",
            json!({"vcpu_count": spec.vcpus, "mem_size_mib": spec.mem_mib}),
        )?;
        let mut cmdline = BASE_CMDLINE.to_string();
        if !config.kernel_params.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(&config.kernel_params);
        }
        api.put(
            "/boot-source",
            json!({
                "kernel_image_path": config.kernel,
                "initrd_path": config.initrd,
                "boot_args": cmdline,
            }),
        )?;
        for n in 0..config.drive_slots {
            let placeholder = dir.slot_placeholder(n);
            let f = File::create(&placeholder)
                .map_err(io(format!("create {}", placeholder.display())))?;
            f.set_len(PLACEHOLDER_BYTES)
                .map_err(io(format!("size {}", placeholder.display())))?;
            api.put(
                &format!("/drives/{}", slot_id(n)),
                json!({
                    "drive_id": slot_id(n),
                    "path_on_host": placeholder,
                    "is_root_device": false,
                    "is_read_only": false,
                }),
            )?;
        }
        if let Some(net) = &spec.network {
            api.put(
                "/network-interfaces/eth0",
                json!({
                    "iface_id": "eth0",
                    "host_dev_name": network::TAP,
                    "guest_mac": net.interface.mac,
                }),
            )?;
        }
        api.put("/vsock", json!({"guest_cid": 3, "uds_path": dir.vsock()}))?;
        api.put("/actions", json!({"action_type": "InstanceStart"}))?;
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
        agent.set_timeout(Some(AGENT_CALL_TIMEOUT))?;
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
            slots: Mutex::new(vec![None; config.drive_slots as usize]),
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

    /// Puts `image` into a free drive slot for `container_id`; returns the
    /// slot's drive id.
    pub fn attach_disk(&self, container_id: &str, image: &Path) -> Result<String, VmError> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let n = slots
            .iter()
            .position(Option::is_none)
            .ok_or(VmError::NoSlot(slots.len() as u32))?;
        let id = slot_id(n as u32);
        self.api.patch(
            &format!("/drives/{id}"),
            json!({"drive_id": id, "path_on_host": image}),
        )?;
        slots[n] = Some(container_id.to_string());
        Ok(id)
    }

    /// Gives `container_id`'s slot its placeholder back.
    pub fn detach_disk(&self, container_id: &str) -> Result<(), VmError> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let Some(n) = slots
            .iter()
            .position(|s| s.as_deref() == Some(container_id))
        else {
            return Ok(());
        };
        let id = slot_id(n as u32);
        self.api.patch(
            &format!("/drives/{id}"),
            json!({"drive_id": id, "path_on_host": self.dir.slot_placeholder(n as u32)}),
        )?;
        slots[n] = None;
        Ok(())
    }

    /// Pauses or resumes the vCPUs.
    pub fn set_paused(&self, paused: bool) -> Result<(), VmError> {
        let state = if paused { "Paused" } else { "Resumed" };
        self.api.patch("/vm", json!({ "state": state }))?;
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
