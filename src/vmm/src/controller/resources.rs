//! What a microVM is configured with before it starts, in the shapes of
//! Firecracker's API bodies (the same field names, so its users, scripts and
//! SDKs work unchanged), and the checks each body gets when it arrives. The
//! same bodies, gathered in one document, are the `--config-file` format
//! and what `GET /vm/config` returns.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{DriveConfig, NetConfig, VsockConfig, MAX_VIRTIO_DEVICES, MIN_MEM_MIB};
use crate::devices::virtio::block::BlockConfig;
use crate::devices::virtio::net::MacAddr;

/// The most vCPUs a VM can have (the MP table's limit).
pub const MAX_VCPU_COUNT: u8 = crate::arch::x86_64::mptable::MAX_VCPUS;

/// The command line used when `boot_args` is absent.
pub const DEFAULT_BOOT_ARGS: &str = crate::config::DEFAULT_CMDLINE;

/// A body or a value that cannot be accepted; the API answers 400.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResourceError {
    /// vcpu_count out of range.
    #[error("vcpu_count must be between 1 and {MAX_VCPU_COUNT}, not {0}")]
    VcpuCount(u64),
    /// mem_size_mib out of range.
    #[error("mem_size_mib must be at least {MIN_MEM_MIB}, not {0}")]
    MemSize(u64),
    /// A feature husk does not have.
    #[error("{0} is not supported by husk")]
    Unsupported(&'static str),
    /// An id with characters outside [A-Za-z0-9_-] or too long.
    #[error("invalid {kind} id {id:?}: use 1 to 64 of A-Z a-z 0-9 _ -")]
    InvalidId {
        /// drive, network interface.
        kind: &'static str,
        /// The id.
        id: String,
    },
    /// The id in the URL and in the body differ.
    #[error("the {kind} id in the path ({path:?}) and in the body ({body:?}) differ")]
    IdMismatch {
        /// drive, network interface.
        kind: &'static str,
        /// From the URL.
        path: String,
        /// From the body.
        body: String,
    },
    /// A file the VM needs is not there.
    #[error("{what} {path}: {reason}")]
    File {
        /// kernel image, initrd, drive.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why it cannot be used.
        reason: String,
    },
    /// A second root drive.
    #[error("drive {0:?} cannot be the root device: another drive already is")]
    SecondRoot(String),
    /// More devices than IOAPIC pins.
    #[error("at most {MAX_VIRTIO_DEVICES} virtio devices fit in a VM")]
    TooManyDevices,
    /// A MAC address that does not parse.
    #[error("guest_mac {0:?} is not a MAC address like 06:00:ac:10:00:02")]
    Mac(String),
    /// A host interface name that Linux would refuse.
    #[error("host_dev_name {0:?} must be 1 to 15 characters, no '/' or whitespace")]
    TapName(String),
    /// guest_cid 0, 1 or 2 (reserved) or too large.
    #[error("guest_cid must be at least 3 and below 2^32 - 1, not {0}")]
    GuestCid(u64),
    /// A unix socket path that is empty or too long.
    #[error("uds_path {0:?} must be a non-empty path of at most 96 bytes")]
    UdsPath(PathBuf),
    /// The boot command line is too long.
    #[error("boot_args is {0} bytes; the limit is {max}", max = crate::arch::x86_64::layout::CMDLINE_MAX_SIZE - 1)]
    BootArgs(usize),
    /// A patch of something that was never put.
    #[error("no drive {0:?} to update (PUT it first)")]
    NoSuchDrive(String),
    /// PATCH /machine-config before PUT.
    #[error("machine configuration can only be patched after it was put")]
    NoMachineConfig,
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
        }
    }
}

impl MachineConfig {
    /// Checks ranges and features.
    pub fn validate(&self) -> Result<(), ResourceError> {
        if self.vcpu_count == 0 || self.vcpu_count > MAX_VCPU_COUNT {
            return Err(ResourceError::VcpuCount(u64::from(self.vcpu_count)));
        }
        if self.mem_size_mib < MIN_MEM_MIB {
            return Err(ResourceError::MemSize(self.mem_size_mib));
        }
        if self.smt {
            return Err(ResourceError::Unsupported("smt"));
        }
        if self.track_dirty_pages {
            return Err(ResourceError::Unsupported("track_dirty_pages"));
        }
        if self.cpu_template.as_deref().is_some_and(|t| t != "None") {
            return Err(ResourceError::Unsupported("a CPU template"));
        }
        if self.huge_pages.as_deref().is_some_and(|t| t != "None") {
            return Err(ResourceError::Unsupported("huge pages"));
        }
        Ok(())
    }
}

/// `PATCH /machine-config`: any subset of the fields.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    /// Number of vCPUs.
    pub vcpu_count: Option<u8>,
    /// Guest memory in MiB.
    pub mem_size_mib: Option<u64>,
    /// Simultaneous multithreading.
    pub smt: Option<bool>,
    /// Dirty page tracking.
    pub track_dirty_pages: Option<bool>,
    /// CPU template.
    pub cpu_template: Option<String>,
    /// Huge pages.
    pub huge_pages: Option<String>,
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
    /// The kernel command line ([`DEFAULT_BOOT_ARGS`] when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

fn readable_file(what: &'static str, path: &Path) -> Result<(), ResourceError> {
    let err = |reason: String| ResourceError::File {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if meta.is_dir() {
        return Err(err("is a directory".into()));
    }
    std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    Ok(())
}

impl BootSourceConfig {
    /// The files exist and the command line fits.
    pub fn validate(&self) -> Result<(), ResourceError> {
        readable_file("kernel image", &self.kernel_image_path)?;
        if let Some(initrd) = &self.initrd_path {
            readable_file("initrd", initrd)?;
        }
        if let Some(args) = &self.boot_args {
            // Room is left for the devices husk appends.
            if args.len() >= crate::arch::x86_64::layout::CMDLINE_MAX_SIZE - 512 {
                return Err(ResourceError::BootArgs(args.len()));
            }
        }
        Ok(())
    }
}

/// Firecracker's rate limiter object; husk accepts only its absence.
pub type RateLimiter = Option<serde_json::Value>;

fn no_rate_limiter(r: &RateLimiter) -> Result<(), ResourceError> {
    match r {
        None | Some(serde_json::Value::Null) => Ok(()),
        Some(_) => Err(ResourceError::Unsupported("rate limiting")),
    }
}

/// Drive and interface ids: what fits in sysfs serials and file names.
pub fn check_id(kind: &'static str, id: &str) -> Result<(), ResourceError> {
    if crate::config::valid_id(id) {
        Ok(())
    } else {
        Err(ResourceError::InvalidId {
            kind,
            id: id.to_string(),
        })
    }
}

fn same_id(kind: &'static str, path: &str, body: &str) -> Result<(), ResourceError> {
    if path == body {
        Ok(())
    } else {
        Err(ResourceError::IdMismatch {
            kind,
            path: path.to_string(),
            body: body.to_string(),
        })
    }
}

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
    /// Checks the body against the id in the URL.
    pub fn validate(&self, path_id: &str) -> Result<(), ResourceError> {
        same_id("drive", path_id, &self.drive_id)?;
        check_id("drive", &self.drive_id)?;
        readable_file("drive", &self.path_on_host)?;
        if self.partuuid.is_some() {
            return Err(ResourceError::Unsupported("partuuid"));
        }
        if !matches!(
            self.cache_type.as_deref(),
            None | Some("Unsafe" | "Writeback")
        ) {
            return Err(ResourceError::Unsupported("that cache_type"));
        }
        if !matches!(self.io_engine.as_deref(), None | Some("Sync")) {
            return Err(ResourceError::Unsupported("that io_engine"));
        }
        no_rate_limiter(&self.rate_limiter)
    }

    /// The VMM's view of it.
    pub fn to_drive_config(&self) -> DriveConfig {
        DriveConfig {
            block: BlockConfig {
                id: self.drive_id.clone(),
                path: self.path_on_host.clone(),
                read_only: self.is_read_only,
            },
            is_root: self.is_root_device,
        }
    }
}

/// `PATCH /drives/{drive_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveUpdate {
    /// The id.
    pub drive_id: String,
    /// The new backing file.
    pub path_on_host: Option<PathBuf>,
    /// Unsupported; null or absent.
    #[serde(default)]
    pub rate_limiter: RateLimiter,
}

impl DriveUpdate {
    /// Checks the body against the id in the URL.
    pub fn validate(&self, path_id: &str) -> Result<(), ResourceError> {
        same_id("drive", path_id, &self.drive_id)?;
        check_id("drive", &self.drive_id)?;
        if let Some(p) = &self.path_on_host {
            readable_file("drive", p)?;
        }
        no_rate_limiter(&self.rate_limiter)
    }
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

/// Parses "aa:bb:cc:dd:ee:ff".
pub fn parse_mac(s: &str) -> Result<MacAddr, ResourceError> {
    s.parse::<MacAddr>()
        .map_err(|_| ResourceError::Mac(s.to_string()))
}

impl NetworkInterface {
    /// Checks the body against the id in the URL.
    pub fn validate(&self, path_id: &str) -> Result<(), ResourceError> {
        same_id("network interface", path_id, &self.iface_id)?;
        check_id("network interface", &self.iface_id)?;
        let name = &self.host_dev_name;
        if name.is_empty()
            || name.len() > 15
            || name.contains('/')
            || name.chars().any(char::is_whitespace)
        {
            return Err(ResourceError::TapName(name.clone()));
        }
        if let Some(mac) = &self.guest_mac {
            parse_mac(mac)?;
        }
        no_rate_limiter(&self.rx_rate_limiter)?;
        no_rate_limiter(&self.tx_rate_limiter)
    }

    /// The VMM's view of it (validated first).
    pub fn to_net_config(&self) -> Result<NetConfig, ResourceError> {
        Ok(NetConfig {
            id: self.iface_id.clone(),
            host_dev_name: self.host_dev_name.clone(),
            guest_mac: self.guest_mac.as_deref().map(parse_mac).transpose()?,
        })
    }
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

impl Vsock {
    /// Checks the cid and the socket path (room is left for the `_<port>`
    /// suffix of guest-initiated connections).
    pub fn validate(&self) -> Result<(), ResourceError> {
        self.to_vsock_config().map(|_| ())
    }

    /// The VMM's view of it (validated first).
    pub fn to_vsock_config(&self) -> Result<VsockConfig, ResourceError> {
        let guest_cid = u32::try_from(self.guest_cid)
            .ok()
            .filter(|c| *c >= 3 && *c < u32::MAX)
            .ok_or(ResourceError::GuestCid(self.guest_cid))?;
        let config = VsockConfig {
            guest_cid,
            uds_path: self.uds_path.clone(),
        };
        crate::config::check_vsock(&config)
            .map_err(|_| ResourceError::UdsPath(self.uds_path.clone()))?;
        Ok(config)
    }
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
    /// `PUT /logger`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logger: Option<Logger>,
    /// `PUT /metrics`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsConfig>,
}

impl VmResources {
    fn device_count(&self) -> usize {
        self.drives.len() + self.network_interfaces.len() + usize::from(self.vsock.is_some())
    }

    /// Adds or replaces a drive (same id: replaced in place).
    pub fn put_drive(&mut self, drive: Drive) -> Result<(), ResourceError> {
        if drive.is_root_device {
            if let Some(other) = self
                .drives
                .iter()
                .find(|d| d.is_root_device && d.drive_id != drive.drive_id)
            {
                return Err(ResourceError::SecondRoot(other.drive_id.clone()));
            }
        }
        match self
            .drives
            .iter_mut()
            .find(|d| d.drive_id == drive.drive_id)
        {
            Some(slot) => *slot = drive,
            None => {
                if self.device_count() >= MAX_VIRTIO_DEVICES {
                    return Err(ResourceError::TooManyDevices);
                }
                self.drives.push(drive);
            }
        }
        Ok(())
    }

    /// Adds or replaces a network interface.
    pub fn put_network_interface(&mut self, iface: NetworkInterface) -> Result<(), ResourceError> {
        match self
            .network_interfaces
            .iter_mut()
            .find(|i| i.iface_id == iface.iface_id)
        {
            Some(slot) => *slot = iface,
            None => {
                if self.device_count() >= MAX_VIRTIO_DEVICES {
                    return Err(ResourceError::TooManyDevices);
                }
                self.network_interfaces.push(iface);
            }
        }
        Ok(())
    }

    /// Sets the vsock device.
    pub fn put_vsock(&mut self, vsock: Vsock) -> Result<(), ResourceError> {
        if self.vsock.is_none() && self.device_count() >= MAX_VIRTIO_DEVICES {
            return Err(ResourceError::TooManyDevices);
        }
        self.vsock = Some(vsock);
        Ok(())
    }

    /// Checks every part, as each PUT would have (for `--config-file`).
    pub fn validate(&self) -> Result<(), ResourceError> {
        self.machine_config.validate()?;
        if let Some(b) = &self.boot_source {
            b.validate()?;
        }
        let mut check = VmResources::default();
        for d in &self.drives {
            d.validate(&d.drive_id)?;
            check.put_drive(d.clone())?;
        }
        for i in &self.network_interfaces {
            i.validate(&i.iface_id)?;
            check.put_network_interface(i.clone())?;
        }
        if let Some(v) = &self.vsock {
            v.validate()?;
            check.put_vsock(v.clone())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpfile(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("husk-res-{}-{name}", std::process::id()));
        std::fs::write(&p, b"x").unwrap();
        p
    }

    #[test]
    fn machine_config_ranges() {
        let mut m = MachineConfig::default();
        assert!(m.validate().is_ok());
        m.vcpu_count = 0;
        assert_eq!(m.validate(), Err(ResourceError::VcpuCount(0)));
        m.vcpu_count = 2;
        m.mem_size_mib = 8;
        assert_eq!(m.validate(), Err(ResourceError::MemSize(8)));
        m.mem_size_mib = 256;
        m.smt = true;
        assert_eq!(m.validate(), Err(ResourceError::Unsupported("smt")));
        let patched = MachineConfigUpdate {
            smt: Some(false),
            vcpu_count: Some(4),
            ..Default::default()
        }
        .apply(&m);
        assert_eq!(
            (patched.vcpu_count, patched.mem_size_mib, patched.smt),
            (4, 256, false)
        );
    }

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
    }

    #[test]
    fn drives_ids_roots_and_files() {
        let f = tmpfile("drive");
        let drive = |id: &str, root: bool| Drive {
            drive_id: id.into(),
            path_on_host: f.clone(),
            is_root_device: root,
            is_read_only: false,
            partuuid: None,
            cache_type: None,
            io_engine: None,
            rate_limiter: None,
        };
        assert!(drive("rootfs", true).validate("rootfs").is_ok());
        assert!(matches!(
            drive("rootfs", true).validate("other"),
            Err(ResourceError::IdMismatch { .. })
        ));
        assert!(matches!(
            drive("../x", false).validate("../x"),
            Err(ResourceError::InvalidId { .. })
        ));
        let mut missing = drive("d", false);
        missing.path_on_host = "/nonexistent/husk".into();
        assert!(matches!(
            missing.validate("d"),
            Err(ResourceError::File { .. })
        ));
        let mut limited = drive("d", false);
        limited.rate_limiter = Some(serde_json::json!({"bandwidth": {}}));
        assert_eq!(
            limited.validate("d"),
            Err(ResourceError::Unsupported("rate limiting"))
        );

        let mut r = VmResources::default();
        r.put_drive(drive("a", true)).unwrap();
        assert_eq!(
            r.put_drive(drive("b", true)),
            Err(ResourceError::SecondRoot("a".into()))
        );
        // Replacing the root drive itself is fine.
        r.put_drive(drive("a", true)).unwrap();
        for i in 0..18 {
            r.put_drive(drive(&format!("d{i}"), false)).unwrap();
        }
        assert_eq!(
            r.put_drive(drive("one-more", false)),
            Err(ResourceError::TooManyDevices)
        );
        std::fs::remove_file(f).unwrap();
    }

    #[test]
    fn macs_taps_and_cids() {
        assert_eq!(
            parse_mac("06:00:AC:10:00:02").map(|m| m.0),
            Ok([6, 0, 0xac, 0x10, 0, 2])
        );
        for bad in [
            "",
            "06:00:ac:10:00",
            "06:00:ac:10:00:02:03",
            "0g:00:00:00:00:00",
            "6:0:0:0:0:0",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
        let iface = |name: &str| NetworkInterface {
            iface_id: "eth0".into(),
            host_dev_name: name.into(),
            guest_mac: None,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        };
        assert!(iface("tap0").validate("eth0").is_ok());
        assert!(iface("a-very-long-tap-name").validate("eth0").is_err());
        assert!(iface("tap/0").validate("eth0").is_err());
        let vsock = |cid| Vsock {
            guest_cid: cid,
            uds_path: "/tmp/v.sock".into(),
            vsock_id: None,
        };
        assert!(vsock(3).validate().is_ok());
        assert_eq!(vsock(2).validate(), Err(ResourceError::GuestCid(2)));
    }

    #[test]
    fn config_file_round_trips() {
        let f = tmpfile("kernel");
        let json = format!(
            r#"{{"boot-source":{{"kernel_image_path":"{k}","boot_args":"console=ttyS0"}},
                "machine-config":{{"vcpu_count":2,"mem_size_mib":256}},
                "drives":[{{"drive_id":"rootfs","path_on_host":"{k}","is_root_device":true,"is_read_only":true}}]}}"#,
            k = f.display()
        );
        let r: VmResources = serde_json::from_str(&json).unwrap();
        r.validate().unwrap();
        assert_eq!(r.machine_config.vcpu_count, 2);
        let back: VmResources = serde_json::from_value(serde_json::to_value(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        assert!(serde_json::from_str::<VmResources>(r#"{"machine_config":{}}"#).is_err());
        std::fs::remove_file(f).unwrap();
    }
}
