//! The bodies of husk's REST API, in the shapes of Firecracker's (the same
//! field names, so its users, scripts and SDKs work unchanged). The VMM
//! deserializes and checks them (`vmm::controller`), and the containerd
//! shim builds and serializes them, so both sides of the socket agree at
//! compile time. Nothing here knows about KVM or checks a value against the
//! host: that is the VMM's job. The same bodies, gathered in one document
//! ([`VmResources`]), are the `--config-file` format and what `GET
//! /vm/config` returns.

#![deny(missing_docs)]

pub mod metrics;
pub mod template;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The most virtio devices (drives, network interfaces and the vsock
/// together) a VM can have: one IOAPIC pin each, after the legacy devices.
pub const MAX_VIRTIO_DEVICES: usize = 19;

/// Whether `id` is a valid id for the API: a VM's `--id`, a drive or a
/// network interface. 1 to 64 of A-Z a-z 0-9 _ -, so it fits in file
/// names and sysfs serials.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
}

/// `PUT /machine-config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// Number of vCPUs.
    pub vcpu_count: u8,
    /// Guest memory in MiB.
    pub mem_size_mib: u64,
    /// Simultaneous multithreading (two threads per core).
    #[serde(default)]
    pub smt: bool,
    /// Dirty page tracking (for snapshots; husk has none).
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// CPU template ("None" only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
    /// Huge pages ("None" only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<String>,
    /// husk's extension: vCPUs the VM is built with (at least
    /// `vcpu_count`). The guest boots `vcpu_count` of them online
    /// (`maxcpus=` on its command line); the rest wait, parked, until the
    /// guest brings them online (the agent, through sysfs). Absent: as many
    /// as `vcpu_count`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_vcpu_count: Option<u8>,
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            track_dirty_pages: false,
            cpu_template: None,
            huge_pages: None,
            max_vcpu_count: None,
        }
    }
}

/// `PATCH /machine-config`: any subset of the fields.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    /// Number of vCPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu_count: Option<u8>,
    /// Guest memory in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_size_mib: Option<u64>,
    /// Simultaneous multithreading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smt: Option<bool>,
    /// Dirty page tracking.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    /// CPU template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
    /// Huge pages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<String>,
    /// vCPUs the VM is built with (husk's extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_vcpu_count: Option<u8>,
}

impl MachineConfigUpdate {
    /// `base` with the given fields replaced.
    pub fn apply(&self, base: &MachineConfig) -> MachineConfig {
        MachineConfig {
            vcpu_count: self.vcpu_count.unwrap_or(base.vcpu_count),
            mem_size_mib: self.mem_size_mib.unwrap_or(base.mem_size_mib),
            smt: self.smt.unwrap_or(base.smt),
            track_dirty_pages: self.track_dirty_pages.unwrap_or(base.track_dirty_pages),
            cpu_template: self.cpu_template.clone().or(base.cpu_template.clone()),
            huge_pages: self.huge_pages.clone().or(base.huge_pages.clone()),
            max_vcpu_count: self.max_vcpu_count.or(base.max_vcpu_count),
        }
    }
}

/// `PUT /boot-source`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSourceConfig {
    /// The guest kernel (ELF vmlinux or bzImage).
    pub kernel_image_path: PathBuf,
    /// An initramfs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<PathBuf>,
    /// The kernel command line (the VMM's default when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

/// Firecracker's rate limiter object; husk accepts only its absence.
pub type RateLimiter = Option<serde_json::Value>;

/// `PUT /drives/{drive_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    /// The id (also the virtio-blk serial the guest sees).
    pub drive_id: String,
    /// The backing file.
    pub path_on_host: PathBuf,
    /// Boot from it (/dev/vda, `root=/dev/vda`).
    pub is_root_device: bool,
    /// Open it read-only and offer VIRTIO_BLK_F_RO.
    #[serde(default)]
    pub is_read_only: bool,
    /// Root by partition UUID (unsupported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// "Unsafe" (default; flushes are honoured either way) or "Writeback".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<String>,
    /// "Sync" only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<String>,
    /// Unsupported; null or absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: RateLimiter,
}

impl Drive {
    /// A drive with Firecracker's defaults for everything but its id, its
    /// backing file and whether it is read-only.
    pub fn new(
        drive_id: impl Into<String>,
        path_on_host: impl Into<PathBuf>,
        read_only: bool,
    ) -> Self {
        Drive {
            drive_id: drive_id.into(),
            path_on_host: path_on_host.into(),
            is_root_device: false,
            is_read_only: read_only,
            partuuid: None,
            cache_type: None,
            io_engine: None,
            rate_limiter: None,
        }
    }
}

/// `PATCH /drives/{drive_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveUpdate {
    /// The id.
    pub drive_id: String,
    /// The new backing file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<PathBuf>,
    /// Unsupported; null or absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: RateLimiter,
}

/// `PUT /network-interfaces/{iface_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    /// The id.
    pub iface_id: String,
    /// The tap device on the host (it must exist).
    pub host_dev_name: String,
    /// The guest's MAC address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    /// Unsupported; null or absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: RateLimiter,
    /// Unsupported; null or absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: RateLimiter,
}

/// `PUT /vsock`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    /// The guest's context id (3 and up).
    pub guest_cid: u64,
    /// The host-side unix socket.
    pub uds_path: PathBuf,
    /// Deprecated in Firecracker; accepted and ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
}

/// The default `num_queues` of a virtio-fs device.
pub const DEFAULT_FS_NUM_QUEUES: u64 = 1;
/// The default `queue_size` of a virtio-fs device.
pub const DEFAULT_FS_QUEUE_SIZE: u64 = 1024;

/// `PUT /fs/{id}`: a virtio-fs device served by a vhost-user backend
/// (virtiofsd) listening on `socket`; Cloud Hypervisor's field names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsConfig {
    /// The id (as in the path).
    pub id: String,
    /// What the guest mounts: `mount -t virtiofs TAG DIR` (1 to 36 bytes).
    pub tag: String,
    /// The backend's listening unix socket.
    pub socket: PathBuf,
    /// Request queues (the device has a high-priority queue besides).
    #[serde(default = "default_fs_num_queues")]
    pub num_queues: u64,
    /// Entries per queue: a power of two up to 1024.
    #[serde(default = "default_fs_queue_size")]
    pub queue_size: u64,
    /// husk relays each request and reply through buffers of its own, so
    /// the backend never maps guest memory (and guest memory need not be
    /// shared); husk's own field, off by default.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub relay: bool,
}

fn default_fs_num_queues() -> u64 {
    DEFAULT_FS_NUM_QUEUES
}

fn default_fs_queue_size() -> u64 {
    DEFAULT_FS_QUEUE_SIZE
}

/// `PUT /logger`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    /// Where log lines go (appended); stderr when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<PathBuf>,
    /// Error, Warning, Info, Debug, Trace or Off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
    /// Print the level on each line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    /// Print the source file and line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    /// Only log from this module path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

/// `PUT /metrics`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// The file (or FIFO) JSON lines are appended to.
    pub metrics_path: PathBuf,
}

/// The default `block_size_mib` of hot-pluggable memory: the smallest
/// unit the guest plugs and unplugs.
pub const DEFAULT_HOTPLUG_BLOCK_SIZE_MIB: u64 = 2;

/// The default `slot_size_mib`: the unit in which the host hands the
/// region's memory to KVM (a slot with no plugged block is not mapped, so
/// the guest cannot touch it).
pub const DEFAULT_HOTPLUG_SLOT_SIZE_MIB: u64 = 128;

/// `PUT /hotplug/memory` (and `memory-hotplug` in a configuration
/// document): a virtio-mem device whose region of `total_size_mib` lies
/// above the guest's RAM, all of it unplugged at boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryHotplugConfig {
    /// The most memory that can be plugged, in MiB: a multiple of
    /// `slot_size_mib`.
    pub total_size_mib: u64,
    /// The unit the guest plugs and unplugs, in MiB: a power of two, at
    /// least 2, dividing `slot_size_mib`.
    #[serde(default = "default_hotplug_block")]
    pub block_size_mib: u64,
    /// The unit the host maps into the guest, in MiB: a multiple of 128
    /// (the guest's memory block) and of `block_size_mib`.
    #[serde(default = "default_hotplug_slot")]
    pub slot_size_mib: u64,
}

fn default_hotplug_block() -> u64 {
    DEFAULT_HOTPLUG_BLOCK_SIZE_MIB
}

fn default_hotplug_slot() -> u64 {
    DEFAULT_HOTPLUG_SLOT_SIZE_MIB
}

impl MemoryHotplugConfig {
    /// A region of `total_size_mib` with the default block and slot sizes.
    pub fn new(total_size_mib: u64) -> Self {
        MemoryHotplugConfig {
            total_size_mib,
            block_size_mib: DEFAULT_HOTPLUG_BLOCK_SIZE_MIB,
            slot_size_mib: DEFAULT_HOTPLUG_SLOT_SIZE_MIB,
        }
    }
}

/// `PATCH /hotplug/memory`: how much of the region the guest should have
/// plugged. The guest's driver plugs or unplugs blocks until it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryHotplugSizeUpdate {
    /// The new target, in MiB: a multiple of `block_size_mib`, at most
    /// `total_size_mib`.
    pub requested_size_mib: u64,
}

/// `GET /hotplug/memory`: the region and how much of it is plugged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryHotplugStatus {
    /// The region's size, in MiB.
    pub total_size_mib: u64,
    /// The guest's unit, in MiB.
    pub block_size_mib: u64,
    /// The host's unit, in MiB.
    pub slot_size_mib: u64,
    /// What the guest has plugged, in MiB.
    pub plugged_size_mib: u64,
    /// What the host asked for, in MiB.
    pub requested_size_mib: u64,
}

/// Everything put so far; `--config-file` and `GET /vm/config`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmResources {
    /// `PUT /boot-source`.
    #[serde(
        rename = "boot-source",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub boot_source: Option<BootSourceConfig>,
    /// `PUT /drives/{id}`, in the order they were first put.
    #[serde(default)]
    pub drives: Vec<Drive>,
    /// `PUT /machine-config` (defaults: 1 vCPU, 128 MiB).
    #[serde(rename = "machine-config", default)]
    pub machine_config: MachineConfig,
    /// `PUT /network-interfaces/{id}`.
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterface>,
    /// `PUT /vsock`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<Vsock>,
    /// `PUT /fs/{id}`, in the order they were first put.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fs: Vec<FsConfig>,
    /// `PUT /logger`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logger: Option<Logger>,
    /// `PUT /metrics`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsConfig>,
    /// `PUT /hotplug/memory`.
    #[serde(
        rename = "memory-hotplug",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub memory_hotplug: Option<MemoryHotplugConfig>,
    /// Config file only: restore this snapshot instead of booting (no
    /// boot source, machine configuration or devices may be given with
    /// it). `GET /vm/config` never returns it.
    #[serde(
        rename = "snapshot-load",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub snapshot_load: Option<SnapshotLoadParams>,
}

/// `PUT /snapshot/create` snapshot types.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    /// All of guest memory (the only type husk writes).
    #[default]
    Full,
    /// Only the memory dirtied since the last snapshot (unsupported).
    Diff,
}

/// `PUT /snapshot/create` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateParams {
    /// Full (the default) or Diff.
    #[serde(default)]
    pub snapshot_type: SnapshotType,
    /// Where the VM state file goes (replaced if it exists).
    pub snapshot_path: PathBuf,
    /// Where the guest memory file goes (replaced if it exists).
    pub mem_file_path: PathBuf,
}

/// `mem_backend.backend_type` of `PUT /snapshot/load`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemBackendType {
    /// A memory file, mapped private and copy-on-write.
    File,
    /// A userfaultfd handler's socket (unsupported).
    Uffd,
}

/// `mem_backend` of `PUT /snapshot/load`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemBackend {
    /// File (Uffd is refused).
    pub backend_type: MemBackendType,
    /// The memory file.
    pub backend_path: PathBuf,
}

/// A network interface's new tap for a restored VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    /// The interface's id in the snapshot.
    pub iface_id: String,
    /// The tap to attach it to.
    pub host_dev_name: String,
    /// husk only: the MAC its configuration space reports from now on
    /// (the running guest driver keeps the one it read until it probes the
    /// device again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
}

/// The vsock device's new host socket for a restored VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    /// The unix socket to listen on.
    pub uds_path: PathBuf,
}

/// husk only: a drive's new backing file for a restored VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveOverride {
    /// The drive's id in the snapshot.
    pub drive_id: String,
    /// The file to open instead of the snapshot's (which need not exist).
    /// Of another size, the guest is told of the new capacity.
    pub path_on_host: PathBuf,
}

/// husk only: a virtio-fs device's new backend for a restored VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsOverride {
    /// The device's id in the snapshot.
    pub id: String,
    /// The vhost-user backend's socket to connect to instead.
    pub socket: PathBuf,
}

/// `PUT /snapshot/load` body (and `"snapshot-load"` in a config file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoadParams {
    /// The VM state file.
    pub snapshot_path: PathBuf,
    /// The memory file (exactly one of this and `mem_file_path`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_backend: Option<MemBackend>,
    /// Deprecated in Firecracker: the memory file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_file_path: Option<PathBuf>,
    /// Resume the VM once loaded (otherwise it is Paused).
    #[serde(default)]
    pub resume_vm: bool,
    /// Taps to use instead of the snapshot's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_overrides: Vec<NetworkOverride>,
    /// A socket to use instead of the snapshot's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_override: Option<VsockOverride>,
    /// husk only: backing files to open instead of the snapshot's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drive_overrides: Vec<DriveOverride>,
    /// husk only: virtio-fs backends to connect to instead of the
    /// snapshot's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fs_overrides: Vec<FsOverride>,
    /// Dirty page tracking (only false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    /// Deprecated name of `track_dirty_pages` (only false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_diff_snapshots: Option<bool>,
    /// Advance kvmclock by the real time elapsed (only false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_realtime: Option<bool>,
    /// Huge pages ("Snapshot" or "None" only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<String>,
}

impl SnapshotLoadParams {
    /// A load of `snapshot_path` with its memory in `mem_file`, everything
    /// else as Firecracker defaults it.
    pub fn new(snapshot_path: impl Into<PathBuf>, mem_file: impl Into<PathBuf>) -> Self {
        SnapshotLoadParams {
            snapshot_path: snapshot_path.into(),
            mem_backend: Some(MemBackend {
                backend_type: MemBackendType::File,
                backend_path: mem_file.into(),
            }),
            mem_file_path: None,
            resume_vm: false,
            network_overrides: Vec::new(),
            vsock_override: None,
            drive_overrides: Vec::new(),
            fs_overrides: Vec::new(),
            track_dirty_pages: None,
            enable_diff_snapshots: None,
            clock_realtime: None,
            huge_pages: None,
        }
    }
}

/// `PUT /actions` action types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    /// Build and boot the configured VM.
    InstanceStart,
    /// Press Ctrl+Alt+Del on the guest's i8042 keyboard.
    SendCtrlAltDel,
    /// Write one metrics line now.
    FlushMetrics,
}

/// `PUT /actions` body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Action {
    /// What to do.
    pub action_type: ActionType,
}

/// `PATCH /vm` states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmStateRequest {
    /// Stop the vCPUs.
    Paused,
    /// Let them run again.
    Resumed,
}

/// `PATCH /vm` body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmState {
    /// The wanted state.
    pub state: VmStateRequest,
}

/// The VM's state as `GET /` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstanceState {
    /// Configurable; no guest yet.
    #[serde(rename = "Not started")]
    NotStarted,
    /// The guest runs.
    Running,
    /// The vCPUs are stopped.
    Paused,
}

/// `GET /` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    /// The instance id (`--id`).
    pub id: String,
    /// Its state.
    pub state: InstanceState,
    /// husk's version.
    pub vmm_version: String,
    /// "husk".
    pub app_name: String,
}

/// The body of every refusal (4xx and 5xx).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    /// What went wrong, for a person.
    pub fault_message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_reject_unknown_and_missing_fields() {
        assert!(serde_json::from_str::<MachineConfig>(r#"{"vcpu_count":1}"#).is_err());
        assert!(serde_json::from_str::<MachineConfig>(
            r#"{"vcpu_count":1,"mem_size_mib":64,"bogus":1}"#
        )
        .is_err());
        assert!(
            serde_json::from_str::<MachineConfig>(r#"{"vcpu_count":300,"mem_size_mib":64}"#)
                .is_err()
        );
        let d: Drive = serde_json::from_str(
            r#"{"drive_id":"rootfs","path_on_host":"/x","is_root_device":true}"#,
        )
        .unwrap();
        assert!(!d.is_read_only);
        assert!(serde_json::from_str::<VmResources>(r#"{"machine_config":{}}"#).is_err());
    }

    #[test]
    fn what_a_client_sends_is_what_the_server_reads() {
        // The shim's bodies, as Firecracker documents them.
        let d = Drive::new("slot0", "/run/x.ext4", true);
        assert_eq!(
            serde_json::to_value(&d).unwrap(),
            serde_json::json!({"drive_id": "slot0", "path_on_host": "/run/x.ext4",
                               "is_root_device": false, "is_read_only": true})
        );
        let a = Action {
            action_type: ActionType::InstanceStart,
        };
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            r#"{"action_type":"InstanceStart"}"#
        );
        let p = DriveUpdate {
            drive_id: "slot0".into(),
            path_on_host: Some("/y".into()),
            rate_limiter: None,
        };
        assert_eq!(
            serde_json::to_string(&p).unwrap(),
            r#"{"drive_id":"slot0","path_on_host":"/y"}"#
        );
        let s = VmState {
            state: VmStateRequest::Paused,
        };
        assert_eq!(serde_json::to_string(&s).unwrap(), r#"{"state":"Paused"}"#);
        let info: InstanceInfo = serde_json::from_str(
            r#"{"id":"p","state":"Not started","vmm_version":"0.1.0","app_name":"husk"}"#,
        )
        .unwrap();
        assert_eq!(info.state, InstanceState::NotStarted);
    }

    #[test]
    fn hotplug_bodies_have_firecrackers_shapes_and_defaults() {
        let c: MemoryHotplugConfig = serde_json::from_str(r#"{"total_size_mib":1024}"#).unwrap();
        assert_eq!(c, MemoryHotplugConfig::new(1024));
        assert_eq!((c.block_size_mib, c.slot_size_mib), (2, 128));
        assert!(serde_json::from_str::<MemoryHotplugConfig>(r#"{"block_size_mib":2}"#).is_err());
        assert!(
            serde_json::from_str::<MemoryHotplugConfig>(r#"{"total_size_mib":1024,"size":1}"#)
                .is_err()
        );
        let u: MemoryHotplugSizeUpdate =
            serde_json::from_str(r#"{"requested_size_mib":512}"#).unwrap();
        assert_eq!(u.requested_size_mib, 512);
        assert!(
            serde_json::from_str::<MemoryHotplugSizeUpdate>(r#"{"requested_size_mib":-1}"#)
                .is_err()
        );
        let r: VmResources = serde_json::from_str(
            r#"{"memory-hotplug":{"total_size_mib":2048,"block_size_mib":4,"slot_size_mib":256}}"#,
        )
        .unwrap();
        assert_eq!(
            r.memory_hotplug,
            Some(MemoryHotplugConfig {
                total_size_mib: 2048,
                block_size_mib: 4,
                slot_size_mib: 256
            })
        );
        // Absent from a document that has none.
        let v = serde_json::to_value(VmResources::default()).unwrap();
        assert!(v.get("memory-hotplug").is_none());
        let m: MachineConfig =
            serde_json::from_str(r#"{"vcpu_count":1,"mem_size_mib":256,"max_vcpu_count":4}"#)
                .unwrap();
        assert_eq!(m.max_vcpu_count, Some(4));
        assert!(serde_json::to_value(MachineConfig::default())
            .unwrap()
            .get("max_vcpu_count")
            .is_none());
    }

    #[test]
    fn snapshot_bodies_take_firecrackers_shapes() {
        let c: SnapshotCreateParams =
            serde_json::from_str(r#"{"snapshot_path":"/s","mem_file_path":"/m"}"#).unwrap();
        assert_eq!(c.snapshot_type, SnapshotType::Full);
        assert!(serde_json::from_str::<SnapshotCreateParams>(r#"{"snapshot_path":"/s"}"#).is_err());
        let l: SnapshotLoadParams = serde_json::from_str(
            r#"{"snapshot_path":"/s","mem_backend":{"backend_type":"File","backend_path":"/m"},
                "resume_vm":true,"network_overrides":[{"iface_id":"eth0","host_dev_name":"tap1"}],
                "vsock_override":{"uds_path":"/v.sock"}}"#,
        )
        .unwrap();
        assert!(l.resume_vm);
        assert_eq!(l.network_overrides[0].host_dev_name, "tap1");
        assert_eq!(l.vsock_override.unwrap().uds_path, PathBuf::from("/v.sock"));
        let bare = SnapshotLoadParams::new("/s", "/m");
        assert_eq!(
            serde_json::to_value(&bare).unwrap(),
            serde_json::json!({"snapshot_path": "/s", "resume_vm": false,
                               "mem_backend": {"backend_type": "File", "backend_path": "/m"}})
        );
        assert!(serde_json::from_str::<SnapshotLoadParams>(
            r#"{"snapshot_path":"/s","mem_backend":{"backend_type":"Disk","backend_path":"/m"}}"#
        )
        .is_err());
        // husk's overrides, as the shim sends them.
        let o: SnapshotLoadParams = serde_json::from_str(
            r#"{"snapshot_path":"/s","mem_file_path":"/m",
                "drive_overrides":[{"drive_id":"rootfs","path_on_host":"/pods/a/root.img"}],
                "fs_overrides":[{"id":"share","socket":"/pods/a/fs.sock"}]}"#,
        )
        .unwrap();
        assert_eq!(o.drive_overrides[0].drive_id, "rootfs");
        assert_eq!(
            o.drive_overrides[0].path_on_host,
            PathBuf::from("/pods/a/root.img")
        );
        assert_eq!(o.fs_overrides[0].id, "share");
        assert_eq!(o.fs_overrides[0].socket, PathBuf::from("/pods/a/fs.sock"));
        assert!(serde_json::from_str::<SnapshotLoadParams>(
            r#"{"snapshot_path":"/s","mem_file_path":"/m","fs_overrides":[{"id":"a","path":"/x"}]}"#
        )
        .is_err());
    }

    #[test]
    fn a_patch_replaces_only_what_it_names() {
        let base = MachineConfig {
            mem_size_mib: 256,
            ..Default::default()
        };
        let patched = MachineConfigUpdate {
            smt: Some(false),
            vcpu_count: Some(4),
            ..Default::default()
        }
        .apply(&base);
        assert_eq!(
            (patched.vcpu_count, patched.mem_size_mib, patched.smt),
            (4, 256, false)
        );
    }
}
