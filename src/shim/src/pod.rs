//! The seams of the task service: what it needs from a pod's microVM
//! (husk, and the agent in its guest), from the process's stdio plumbing
//! and from containerd's event service, as traits. `vm.rs` implements the
//! VM with a real husk and `io.rs` the stdio; containerd's publisher is
//! wrapped here. The service's unit tests put fakes in their place, so
//! its state machines run in milliseconds without a guest.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::ttrpc::context::Context;
use containerd_shim::publisher::RemotePublisher;
use husk_protocol::client::ClientError;
use husk_protocol::{Event, FrameError, ProcessRef, Request, Response};

use crate::io::StdioPaths;
use crate::network::PodNetwork;
use crate::slots::SlotSpec;
use crate::vm::VmError;

/// The files of a pod's VM under the state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodDir(pub PathBuf);

impl PodDir {
    /// Where husk makes its sockets (the one directory a jailed husk may
    /// write).
    pub fn run_dir(&self) -> PathBuf {
        self.0.join("run")
    }
    /// husk's API socket.
    pub fn api_socket(&self) -> PathBuf {
        self.0.join(husk_api_types::metrics::API_SOCKET)
    }
    /// The vsock device's host socket.
    pub fn vsock(&self) -> PathBuf {
        self.run_dir().join("vsock.sock")
    }
    /// husk's stderr and the guest's console.
    pub fn log(&self) -> PathBuf {
        self.0.join("husk.log")
    }
    /// husk's pid, for `delete` after a shim crash (and the exporter's
    /// reading of husk's memory).
    pub fn pid_file(&self) -> PathBuf {
        self.0.join(husk_api_types::metrics::PID_FILE)
    }
    /// husk's metrics (`PUT /metrics`), read by `husk metrics`.
    pub fn metrics(&self) -> PathBuf {
        self.0.join(husk_api_types::metrics::METRICS_FILE)
    }
    /// Who the pod is, for the labels of `husk metrics`.
    pub fn labels(&self) -> PathBuf {
        self.0.join(husk_api_types::metrics::LABELS_FILE)
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

/// What a VM is sized and named as.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// The pod's id (husk's instance id).
    pub id: String,
    /// vCPUs online at boot.
    pub vcpus: u32,
    /// vCPUs built (the others parked until brought online).
    pub max_vcpus: u32,
    /// Guest memory at boot (MiB).
    pub mem_mib: u64,
    /// The hot-pluggable memory region (MiB; 0: none).
    pub hotplug_mib: u64,
    /// The pod's cgroup on the node, husk's home (docs: "The pod's
    /// cgroup").
    pub cgroup: Option<PathBuf>,
    /// The guest's hostname.
    pub hostname: Option<String>,
    /// The pod's network, wired already: husk runs in its namespace.
    pub network: Option<PodNetwork>,
    /// husk's jail, when it runs in one (docs/security.md).
    pub jail: Option<Arc<crate::jail::PodJail>>,
    /// The pod's share (what virtiofsd serves), when volumes are shared.
    pub share: Option<PathBuf>,
}

/// Boots pods' microVMs.
pub trait VmLauncher: Send + Sync {
    /// Starts a VM sized and named as `spec`, its files in `dir`, with
    /// the spare drives `slots` (empty placeholders), and returns once its
    /// agent has set up the pod. Nothing of it is left on failure.
    fn boot(
        &self,
        dir: &PodDir,
        spec: &VmSpec,
        slots: &[SlotSpec],
    ) -> Result<Arc<dyn PodVm>, VmError>;
}

/// A booted pod VM. Every method may be called from any thread; none
/// takes a lock of the service's, and the ones that reach the guest are
/// bounded by the agent's deadline.
pub trait PodVm: Send + Sync {
    /// The VMM's host pid.
    fn pid(&self) -> u32;
    /// One request to the agent (a guest round trip).
    fn call(&self, request: Request) -> Result<Response, ClientError>;
    /// Opens the agent's event stream.
    fn events(&self) -> Result<Box<dyn EventStream>, ClientError>;
    /// Joins a process's stdio in the guest to containerd's fifos.
    fn attach_stdio(
        &self,
        process: &ProcessRef,
        paths: &StdioPaths,
    ) -> Result<Arc<dyn ProcessStdio>, ClientError>;
    /// Points the drive `drive_id` at `image` (the VMM's API; the guest
    /// learns of it on its own).
    fn swap_drive(&self, drive_id: &str, image: &Path) -> Result<(), VmError>;
    /// Pauses or resumes the vCPUs.
    fn set_paused(&self, paused: bool) -> Result<(), VmError>;
    /// Asks the guest to have `mib` of the hot-pluggable region plugged
    /// (it plugs or unplugs on its own, after this returns).
    fn request_memory(&self, mib: u64) -> Result<(), VmError>;
    /// What the guest has plugged of the region (MiB).
    fn plugged_memory(&self) -> Result<u64, VmError>;
    /// Asks the agent to stop everything and power the guest off, waiting
    /// at most `limit` for its answer; false if it did not take it (or
    /// its connection failed before, so it is not asked).
    fn shutdown_guest(&self, limit: Duration) -> bool;
    /// Kills the VMM.
    fn kill(&self);
    /// Blocks until the VMM has exited; how it ended. Called once.
    fn wait_exit(&self) -> String;
    /// After a request failed: `None` if the agent's connection did not
    /// break, else whether a new connection gets an answer within
    /// `limit` (a request stuck in the agent, or a guest that stopped).
    fn probe_agent(&self, limit: Duration) -> Option<bool>;
    /// The last lines of the VMM's log and the guest's console.
    fn log_tail(&self) -> String;
}

/// The agent's event stream.
pub trait EventStream: Send {
    /// The next event; `Ok(None)` when the agent closed the stream.
    fn next_event(&mut self) -> Result<Option<Event>, FrameError>;
}

/// The copying of one process's stdio.
pub trait ProcessStdio: Send + Sync {
    /// Closes the process's stdin (CloseIO).
    fn close_stdin(&self);
    /// Whether every output stream has ended (the process and whatever
    /// inherited its output are done writing).
    fn output_done(&self) -> bool;
    /// Ends the copying, output still open or not.
    fn finish(&self);
}

/// Where task events go.
pub trait Publisher: Send + Sync {
    /// Publishes `event` under `topic` (a round trip to containerd).
    fn publish(
        &self,
        topic: &str,
        event: Box<dyn MessageDyn>,
    ) -> Result<(), containerd_shim::Error>;
}

/// containerd's event service, in the shim's namespace.
pub struct Containerd {
    /// The client containerd handed the shim.
    pub publisher: RemotePublisher,
    /// The namespace events are published in.
    pub namespace: String,
}

impl Publisher for Containerd {
    fn publish(
        &self,
        topic: &str,
        event: Box<dyn MessageDyn>,
    ) -> Result<(), containerd_shim::Error> {
        self.publisher
            .publish(Context::default(), topic, &self.namespace, event)
    }
}
