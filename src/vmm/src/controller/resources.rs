//! The checks each API body (`husk-api-types`, Firecracker's shapes) gets
//! when it arrives, against the VMM's limits and the host, and the VMM's
//! own view of the bodies that describe devices.

use std::path::{Path, PathBuf};

pub use husk_api_types::{
    BootSourceConfig, Drive, DriveUpdate, FsConfig, Logger, MachineConfig, MachineConfigUpdate,
    MemoryHotplugConfig, MemoryHotplugSizeUpdate, MemoryHotplugStatus, MetricsConfig,
    NetworkInterface, RateLimiter, VmResources, Vsock,
};

use crate::config::{
    ConfigError, DriveConfig, MemHotplugConfig, NetConfig, VsockConfig, MAX_VIRTIO_DEVICES,
    MIN_MEM_MIB,
};
use crate::devices::virtio::block::BlockConfig;
use crate::devices::virtio::net::MacAddr;
use crate::host_file::Accept;

/// The most vCPUs a VM can have (the MP table's limit).
pub const MAX_VCPU_COUNT: u8 = crate::arch::x86_64::mptable::MAX_VCPUS;

/// The command line used when `boot_args` is absent.
pub const DEFAULT_BOOT_ARGS: &str = crate::config::DEFAULT_CMDLINE;

/// A body or a value that cannot be accepted; the API answers 400.
#[derive(Debug, thiserror::Error)]
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
    /// A file the VM needs is not there or cannot be opened.
    #[error("cannot read {what} {path}")]
    File {
        /// kernel image, initrd, drive.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why it cannot be used.
        #[source]
        source: std::io::Error,
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
    /// A virtio-fs device that cannot be built.
    #[error("invalid file system {id:?}")]
    Fs {
        /// The device's id.
        id: String,
        /// What is wrong.
        #[source]
        source: ConfigError,
    },
    /// A patch of something that was never put.
    #[error("no drive {0:?} to update (PUT it first)")]
    NoSuchDrive(String),
    /// A snapshot's two files are missing or the same file.
    #[error("snapshot_path and mem_file_path must be two different files")]
    SnapshotPaths,
    /// Not exactly one memory backend in a snapshot load.
    #[error("give the memory file as mem_backend (backend_type File) or mem_file_path, not both or neither")]
    MemBackend,
    /// Two overrides for one device.
    #[error("{kind} {id:?} is overridden twice")]
    DuplicateOverride {
        /// What kind of device ("network interface", "drive", ...).
        kind: &'static str,
        /// Its id.
        id: String,
    },
    /// An override's path that cannot be used.
    #[error("the {kind} override for {id:?} has an invalid path {path:?} (empty, or too long for a unix socket)")]
    OverridePath {
        /// What kind of device.
        kind: &'static str,
        /// Its id.
        id: String,
        /// The path given.
        path: std::path::PathBuf,
    },
    /// PATCH /machine-config before PUT.
    #[error("machine configuration can only be patched after it was put")]
    NoMachineConfig,
    /// max_vcpu_count below vcpu_count or above the limit.
    #[error("max_vcpu_count must be between vcpu_count ({vcpus}) and {MAX_VCPU_COUNT}, not {max}")]
    MaxVcpuCount {
        /// The maximum asked for.
        max: u8,
        /// vcpu_count.
        vcpus: u8,
    },
    /// A hot-pluggable region of the wrong shape.
    #[error("invalid memory hot-plug configuration")]
    MemoryHotplug(#[source] ConfigError),
    /// /hotplug/memory requests in a VM without hot-pluggable memory.
    #[error("no hot-pluggable memory is configured (PUT /hotplug/memory before InstanceStart)")]
    NoMemoryHotplug,
    /// More than the region holds.
    #[error("requested_size_mib {requested} exceeds the hot-pluggable region: total_size_mib is {total}")]
    HotplugRequestTooLarge {
        /// What was asked for.
        requested: u64,
        /// The region's size.
        total: u64,
    },
    /// Not a whole number of blocks.
    #[error("requested_size_mib {requested} is not a multiple of block_size_mib {block}")]
    HotplugRequestUnaligned {
        /// What was asked for.
        requested: u64,
        /// The block size.
        block: u64,
    },
}

/// A body's checks against the VMM's limits and the host, for the bodies
/// that stand alone.
pub trait Validate {
    /// Checks ranges, features and files.
    fn validate(&self) -> Result<(), ResourceError>;
}

/// A body's checks for the bodies whose id is also in the URL.
pub trait ValidateAt {
    /// Checks the body against the id in the URL (`path_id`).
    fn validate(&self, path_id: &str) -> Result<(), ResourceError>;
}

impl Validate for MachineConfig {
    fn validate(&self) -> Result<(), ResourceError> {
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
        if let Some(max) = self.max_vcpu_count {
            if max < self.vcpu_count || max > MAX_VCPU_COUNT {
                return Err(ResourceError::MaxVcpuCount {
                    max,
                    vcpus: self.vcpu_count,
                });
            }
        }
        Ok(())
    }
}

impl Validate for MemoryHotplugConfig {
    /// Checks the block, slot and total sizes (the host's limits are
    /// checked at InstanceStart).
    fn validate(&self) -> Result<(), ResourceError> {
        crate::config::check_mem_hotplug_shape(&mem_hotplug_config(self))
            .map_err(ResourceError::MemoryHotplug)
    }
}

/// The VMM's view of the hot-pluggable memory.
pub fn mem_hotplug_config(h: &MemoryHotplugConfig) -> MemHotplugConfig {
    MemHotplugConfig {
        total_mib: h.total_size_mib,
        block_mib: h.block_size_mib,
        slot_mib: h.slot_size_mib,
    }
}

/// Checks a new requested size against the configured region; returns it
/// in bytes.
pub fn requested_bytes(
    h: &MemoryHotplugConfig,
    update: &MemoryHotplugSizeUpdate,
) -> Result<u64, ResourceError> {
    let requested = update.requested_size_mib;
    if requested > h.total_size_mib {
        return Err(ResourceError::HotplugRequestTooLarge {
            requested,
            total: h.total_size_mib,
        });
    }
    if h.block_size_mib == 0 || requested % h.block_size_mib != 0 {
        return Err(ResourceError::HotplugRequestUnaligned {
            requested,
            block: h.block_size_mib,
        });
    }
    requested
        .checked_mul(1 << 20)
        .ok_or(ResourceError::HotplugRequestTooLarge {
            requested,
            total: h.total_size_mib,
        })
}

/// The status before InstanceStart: nothing plugged, nothing requested.
pub fn unplugged_status(h: &MemoryHotplugConfig) -> MemoryHotplugStatus {
    MemoryHotplugStatus {
        total_size_mib: h.total_size_mib,
        block_size_mib: h.block_size_mib,
        slot_size_mib: h.slot_size_mib,
        plugged_size_mib: 0,
        requested_size_mib: 0,
    }
}

/// The status of a running VM's device.
pub fn hotplug_status(s: &crate::devices::virtio::mem::MemStatus) -> MemoryHotplugStatus {
    MemoryHotplugStatus {
        total_size_mib: s.region_size >> 20,
        block_size_mib: s.block_size >> 20,
        slot_size_mib: s.slot_size >> 20,
        plugged_size_mib: s.plugged_size >> 20,
        requested_size_mib: s.requested_size >> 20,
    }
}

/// Checks that `path` can be opened for reading and names something `accept`
/// takes: opened non-blocking and its type checked first, so a FIFO, a
/// socket or a device is a clear refusal, never a hung VMM thread.
fn readable_file(what: &'static str, path: &Path, accept: Accept) -> Result<(), ResourceError> {
    crate::host_file::open(path, false, accept).map_err(|source| ResourceError::File {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    Ok(())
}

impl Validate for BootSourceConfig {
    /// The files exist and the command line fits.
    fn validate(&self) -> Result<(), ResourceError> {
        readable_file("kernel image", &self.kernel_image_path, Accept::RegularFile)?;
        if let Some(initrd) = &self.initrd_path {
            readable_file("initrd", initrd, Accept::RegularFile)?;
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

impl ValidateAt for Drive {
    fn validate(&self, path_id: &str) -> Result<(), ResourceError> {
        same_id("drive", path_id, &self.drive_id)?;
        check_id("drive", &self.drive_id)?;
        readable_file("drive", &self.path_on_host, Accept::FileOrBlockDevice)?;
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
}

/// The VMM's view of a drive.
pub fn drive_config(drive: &Drive) -> DriveConfig {
    DriveConfig {
        block: BlockConfig {
            id: drive.drive_id.clone(),
            path: drive.path_on_host.clone(),
            read_only: drive.is_read_only,
        },
        is_root: drive.is_root_device,
    }
}

impl ValidateAt for DriveUpdate {
    fn validate(&self, path_id: &str) -> Result<(), ResourceError> {
        same_id("drive", path_id, &self.drive_id)?;
        check_id("drive", &self.drive_id)?;
        if let Some(p) = &self.path_on_host {
            readable_file("drive", p, Accept::FileOrBlockDevice)?;
        }
        no_rate_limiter(&self.rate_limiter)
    }
}

/// Parses "aa:bb:cc:dd:ee:ff".
pub fn parse_mac(s: &str) -> Result<MacAddr, ResourceError> {
    s.parse::<MacAddr>()
        .map_err(|_| ResourceError::Mac(s.to_string()))
}

impl ValidateAt for NetworkInterface {
    fn validate(&self, path_id: &str) -> Result<(), ResourceError> {
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
}

/// The VMM's view of a network interface (validated first).
pub fn net_config(iface: &NetworkInterface) -> Result<NetConfig, ResourceError> {
    Ok(NetConfig {
        id: iface.iface_id.clone(),
        host_dev_name: iface.host_dev_name.clone(),
        guest_mac: iface.guest_mac.as_deref().map(parse_mac).transpose()?,
    })
}

impl Validate for Vsock {
    /// Checks the cid and the socket path (room is left for the `_<port>`
    /// suffix of guest-initiated connections).
    fn validate(&self) -> Result<(), ResourceError> {
        vsock_config(self).map(|_| ())
    }
}

/// The VMM's view of the vsock device (validated first).
pub fn vsock_config(vsock: &Vsock) -> Result<VsockConfig, ResourceError> {
    let guest_cid = u32::try_from(vsock.guest_cid)
        .ok()
        .filter(|c| *c >= 3 && *c < u32::MAX)
        .ok_or(ResourceError::GuestCid(vsock.guest_cid))?;
    let config = VsockConfig {
        guest_cid,
        uds_path: vsock.uds_path.clone(),
    };
    crate::config::check_vsock(&config)
        .map_err(|_| ResourceError::UdsPath(vsock.uds_path.clone()))?;
    Ok(config)
}

impl ValidateAt for FsConfig {
    fn validate(&self, path_id: &str) -> Result<(), ResourceError> {
        same_id("file system", path_id, &self.id)?;
        check_id("file system", &self.id)?;
        let config = fs_config(self)?;
        crate::config::check_fs(std::slice::from_ref(&config)).map_err(|source| ResourceError::Fs {
            id: self.id.clone(),
            source,
        })
    }
}

/// The VMM's view of a virtio-fs device.
pub fn fs_config(fs: &FsConfig) -> Result<crate::config::FsConfig, ResourceError> {
    let err = |source| ResourceError::Fs {
        id: fs.id.clone(),
        source,
    };
    let num_queues =
        u16::try_from(fs.num_queues).map_err(|_| err(ConfigError::FsQueues(u16::MAX)))?;
    let queue_size =
        u16::try_from(fs.queue_size).map_err(|_| err(ConfigError::FsQueueSize(u16::MAX)))?;
    Ok(crate::config::FsConfig {
        id: fs.id.clone(),
        tag: fs.tag.clone(),
        socket: fs.socket.clone(),
        num_queues,
        queue_size,
        relay: fs.relay,
    })
}

/// Adds or replaces a virtio-fs device; a tag already used by another
/// device is refused.
pub fn put_fs(r: &mut VmResources, fs: FsConfig) -> Result<(), ResourceError> {
    if let Some(other) = r.fs.iter().find(|f| f.tag == fs.tag && f.id != fs.id) {
        return Err(ResourceError::Fs {
            id: fs.id.clone(),
            source: ConfigError::DuplicateFsTag(other.tag.clone()),
        });
    }
    let count = device_count(r);
    match r.fs.iter_mut().find(|f| f.id == fs.id) {
        Some(slot) => *slot = fs,
        None => {
            if count >= MAX_VIRTIO_DEVICES {
                return Err(ResourceError::TooManyDevices);
            }
            r.fs.push(fs);
        }
    }
    Ok(())
}

fn device_count(r: &VmResources) -> usize {
    r.drives.len()
        + r.fs.len()
        + r.network_interfaces.len()
        + usize::from(r.vsock.is_some())
        + usize::from(r.memory_hotplug.is_some())
}

/// Adds or replaces a drive (same id: replaced in place).
pub fn put_drive(r: &mut VmResources, drive: Drive) -> Result<(), ResourceError> {
    if drive.is_root_device {
        if let Some(other) = r
            .drives
            .iter()
            .find(|d| d.is_root_device && d.drive_id != drive.drive_id)
        {
            return Err(ResourceError::SecondRoot(other.drive_id.clone()));
        }
    }
    let count = device_count(r);
    match r.drives.iter_mut().find(|d| d.drive_id == drive.drive_id) {
        Some(slot) => *slot = drive,
        None => {
            if count >= MAX_VIRTIO_DEVICES {
                return Err(ResourceError::TooManyDevices);
            }
            r.drives.push(drive);
        }
    }
    Ok(())
}

/// Adds or replaces a network interface.
pub fn put_network_interface(
    r: &mut VmResources,
    iface: NetworkInterface,
) -> Result<(), ResourceError> {
    let count = device_count(r);
    match r
        .network_interfaces
        .iter_mut()
        .find(|i| i.iface_id == iface.iface_id)
    {
        Some(slot) => *slot = iface,
        None => {
            if count >= MAX_VIRTIO_DEVICES {
                return Err(ResourceError::TooManyDevices);
            }
            r.network_interfaces.push(iface);
        }
    }
    Ok(())
}

/// Sets the hot-pluggable memory (one virtio-mem device).
pub fn put_memory_hotplug(
    r: &mut VmResources,
    hotplug: MemoryHotplugConfig,
) -> Result<(), ResourceError> {
    if r.memory_hotplug.is_none() && device_count(r) >= MAX_VIRTIO_DEVICES {
        return Err(ResourceError::TooManyDevices);
    }
    r.memory_hotplug = Some(hotplug);
    Ok(())
}

/// Sets the vsock device.
pub fn put_vsock(r: &mut VmResources, vsock: Vsock) -> Result<(), ResourceError> {
    if r.vsock.is_none() && device_count(r) >= MAX_VIRTIO_DEVICES {
        return Err(ResourceError::TooManyDevices);
    }
    r.vsock = Some(vsock);
    Ok(())
}

impl Validate for VmResources {
    /// Checks every part, as each PUT would have (for `--config-file`).
    fn validate(&self) -> Result<(), ResourceError> {
        self.machine_config.validate()?;
        if let Some(b) = &self.boot_source {
            b.validate()?;
        }
        let mut check = VmResources::default();
        for d in &self.drives {
            d.validate(&d.drive_id)?;
            put_drive(&mut check, d.clone())?;
        }
        for i in &self.network_interfaces {
            i.validate(&i.iface_id)?;
            put_network_interface(&mut check, i.clone())?;
        }
        if let Some(v) = &self.vsock {
            v.validate()?;
            put_vsock(&mut check, v.clone())?;
        }
        if let Some(h) = &self.memory_hotplug {
            h.validate()?;
            put_memory_hotplug(&mut check, h.clone())?;
        }
        for f in &self.fs {
            f.validate(&f.id)?;
            put_fs(&mut check, f.clone())?;
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
        assert!(matches!(m.validate(), Err(ResourceError::VcpuCount(0))));
        m.vcpu_count = 2;
        m.mem_size_mib = 8;
        assert!(matches!(m.validate(), Err(ResourceError::MemSize(8))));
        m.mem_size_mib = 256;
        m.smt = true;
        assert!(matches!(
            m.validate(),
            Err(ResourceError::Unsupported("smt"))
        ));
    }

    #[test]
    fn max_vcpus_and_hotplug_shapes() {
        let m = MachineConfig {
            vcpu_count: 2,
            max_vcpu_count: Some(1),
            ..Default::default()
        };
        let err = m.validate().unwrap_err();
        assert_eq!(
            err.to_string(),
            "max_vcpu_count must be between vcpu_count (2) and 254, not 1"
        );
        let m = MachineConfig {
            max_vcpu_count: Some(255),
            ..Default::default()
        };
        assert!(matches!(
            m.validate(),
            Err(ResourceError::MaxVcpuCount { .. })
        ));
        let m = MachineConfig {
            max_vcpu_count: Some(4),
            ..Default::default()
        };
        assert!(m.validate().is_ok());

        let h = MemoryHotplugConfig::new(1024);
        assert!(h.validate().is_ok());
        let bad = MemoryHotplugConfig {
            block_size_mib: 3,
            ..h.clone()
        };
        let err = bad.validate().unwrap_err();
        assert_eq!(
            crate::error::chain(&err),
            "invalid memory hot-plug configuration: a hot-pluggable block of 3 MiB is not a power of two of at least 2 MiB"
        );
        let update = |mib| MemoryHotplugSizeUpdate {
            requested_size_mib: mib,
        };
        assert_eq!(requested_bytes(&h, &update(768)).unwrap(), 768 << 20);
        assert_eq!(requested_bytes(&h, &update(0)).unwrap(), 0);
        let err = requested_bytes(&h, &update(1026)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "requested_size_mib 1026 exceeds the hot-pluggable region: total_size_mib is 1024"
        );
        assert!(matches!(
            requested_bytes(&h, &update(3)),
            Err(ResourceError::HotplugRequestUnaligned {
                requested: 3,
                block: 2
            })
        ));
        // The memory device counts against the device limit.
        let mut r = VmResources {
            drives: (0..MAX_VIRTIO_DEVICES)
                .map(|i| Drive::new(format!("d{i}"), "/x", false))
                .collect(),
            ..Default::default()
        };
        assert!(matches!(
            put_memory_hotplug(&mut r, h),
            Err(ResourceError::TooManyDevices)
        ));
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
            Err(ResourceError::File { source, .. }) if source.kind() == std::io::ErrorKind::NotFound
        ));
        let mut directory = drive("d", false);
        directory.path_on_host = std::env::temp_dir();
        let err = directory.validate("d").unwrap_err();
        assert!(
            matches!(&err, ResourceError::File { source, .. } if source.kind() == std::io::ErrorKind::InvalidInput),
            "{err:?}"
        );
        assert!(
            crate::error::chain(&err).contains("a directory"),
            "{}",
            crate::error::chain(&err)
        );
        let mut limited = drive("d", false);
        limited.rate_limiter = Some(serde_json::json!({"bandwidth": {}}));
        assert!(matches!(
            limited.validate("d"),
            Err(ResourceError::Unsupported("rate limiting"))
        ));

        let mut r = VmResources::default();
        put_drive(&mut r, drive("a", true)).unwrap();
        assert!(matches!(
            put_drive(&mut r, drive("b", true)),
            Err(ResourceError::SecondRoot(id)) if id == "a"
        ));
        // Replacing the root drive itself is fine.
        put_drive(&mut r, drive("a", true)).unwrap();
        for i in 0..18 {
            put_drive(&mut r, drive(&format!("d{i}"), false)).unwrap();
        }
        assert!(matches!(
            put_drive(&mut r, drive("one-more", false)),
            Err(ResourceError::TooManyDevices)
        ));
        std::fs::remove_file(f).unwrap();
    }

    #[test]
    fn macs_taps_and_cids() {
        assert_eq!(
            parse_mac("06:00:AC:10:00:02").map(|m| m.0).ok(),
            Some([6, 0, 0xac, 0x10, 0, 2])
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
        assert!(matches!(
            vsock(2).validate(),
            Err(ResourceError::GuestCid(2))
        ));
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
        std::fs::remove_file(f).unwrap();
    }
}
