//! What a microVM is made of, and the limits a configuration is checked
//! against before anything is allocated.

use std::path::PathBuf;

use crate::arch::x86_64::mptable::MAX_VCPUS;
use crate::boot::BootSource;
use crate::devices::virtio::block::BlockConfig;
use crate::devices::virtio::net::MacAddr;

/// The smallest guest husk boots: room for a kernel, its page tables and an
/// initramfs.
pub const MIN_MEM_MIB: u64 = 32;

/// The kernel command line used when none is given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off";

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialOutput {
    /// The VMM's stdout.
    Stdout,
    /// Appended to a file.
    File(PathBuf),
    /// Discarded.
    Sink,
}

/// A microVM's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Number of vCPUs (validated against the host by [`check_vcpus`]).
    pub vcpus: usize,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// Kernel, initrd, command line.
    pub boot: BootSource,
    /// The console.
    pub serial: SerialOutput,
    /// virtio-blk drives; the root drive (if any) becomes /dev/vda.
    pub drives: Vec<DriveConfig>,
    /// virtio-net interfaces, in order (eth0, eth1, ... in the guest).
    pub net: Vec<NetConfig>,
    /// A virtio-vsock device, exposed on the host as a unix socket.
    pub vsock: Option<VsockConfig>,
    /// vCPUs the VM is built with, `vcpus` of them online at boot (the
    /// rest parked until the guest brings them online); `None`: `vcpus`.
    pub max_vcpus: Option<usize>,
    /// Memory the guest can plug and unplug while it runs (virtio-mem).
    pub mem_hotplug: Option<MemHotplugConfig>,
    /// virtio-fs devices, each served by a vhost-user backend (virtiofsd).
    /// With any that does not relay, guest memory is shared (memfd) with
    /// the backends.
    pub fs: Vec<FsConfig>,
}

/// A virtio-fs device whose requests a vhost-user backend serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsConfig {
    /// Id (same rules as drive ids).
    pub id: String,
    /// The tag the guest mounts (`mount -t virtiofs TAG DIR`): 1 to 36 bytes.
    pub tag: String,
    /// The backend's listening unix socket.
    pub socket: PathBuf,
    /// Request queues (the device has one high-priority queue besides).
    pub num_queues: u16,
    /// Entries per queue: a power of two up to [`MAX_FS_QUEUE_SIZE`].
    pub queue_size: u16,
    /// husk copies each request and reply between the guest's buffers and
    /// a small area it shares with the backend, which never maps guest
    /// memory (`devices::virtio::fs::relay`); guest memory then need not
    /// be shared.
    pub relay: bool,
}

/// Default entries per virtio-fs queue (Cloud Hypervisor's default too).
pub const DEFAULT_FS_QUEUE_SIZE: u16 = 1024;
/// The most entries per virtio-fs queue.
pub const MAX_FS_QUEUE_SIZE: u16 = 1024;
/// The most request queues of one virtio-fs device.
pub const MAX_FS_REQUEST_QUEUES: u16 = 16;

/// Checks virtio-fs devices: ids and tags valid and unique, queue counts
/// and sizes usable.
pub fn check_fs(fs: &[FsConfig]) -> Result<(), ConfigError> {
    let mut ids = std::collections::HashSet::new();
    let mut tags = std::collections::HashSet::new();
    for f in fs {
        if !valid_id(&f.id) {
            return Err(ConfigError::InvalidFsId(f.id.clone()));
        }
        if !ids.insert(f.id.as_str()) {
            return Err(ConfigError::DuplicateFs(f.id.clone()));
        }
        let tag_ok = !f.tag.is_empty()
            && f.tag.len() <= crate::devices::virtio::fs::TAG_LEN
            && !f.tag.bytes().any(|b| b == 0 || b.is_ascii_whitespace());
        if !tag_ok {
            return Err(ConfigError::InvalidFsTag(f.tag.clone()));
        }
        if !tags.insert(f.tag.as_str()) {
            return Err(ConfigError::DuplicateFsTag(f.tag.clone()));
        }
        if f.num_queues == 0 || f.num_queues > MAX_FS_REQUEST_QUEUES {
            return Err(ConfigError::FsQueues(f.num_queues));
        }
        if f.queue_size < 2 || f.queue_size > MAX_FS_QUEUE_SIZE || !f.queue_size.is_power_of_two() {
            return Err(ConfigError::FsQueueSize(f.queue_size));
        }
        if f.socket.as_os_str().is_empty() || f.socket.as_os_str().len() > 107 {
            return Err(ConfigError::FsSocket(f.socket.clone()));
        }
    }
    Ok(())
}

/// Hot-pluggable memory: a virtio-mem device with a region of
/// `total_mib` above the guest's RAM, all of it unplugged at boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemHotplugConfig {
    /// The region's size in MiB (a multiple of `slot_mib`).
    pub total_mib: u64,
    /// What the guest plugs and unplugs, in MiB (a power of two, at least 2).
    pub block_mib: u64,
    /// What KVM maps, in MiB (a multiple of 128 and of `block_mib`).
    pub slot_mib: u64,
}

impl MemHotplugConfig {
    /// `total_mib` with the default block (2 MiB) and slot (128 MiB) sizes.
    pub fn new(total_mib: u64) -> Self {
        MemHotplugConfig {
            total_mib,
            block_mib: 2,
            slot_mib: 128,
        }
    }
}

/// A virtio-net interface backed by a host tap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// Id (same rules as drive ids).
    pub id: String,
    /// The existing host tap interface to attach to.
    pub host_dev_name: String,
    /// The guest's MAC; without one the guest picks a random address.
    pub guest_mac: Option<MacAddr>,
}

/// A virtio-vsock device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context id (3 or more; 0-2 are reserved, u32::MAX is "any").
    pub guest_cid: u32,
    /// The host socket for host-initiated streams; guest-initiated streams
    /// to host port P go to `<uds_path>_<P>`.
    pub uds_path: PathBuf,
}

/// Checks a vsock configuration: a usable CID, and a socket path short
/// enough for `<uds_path>_<port>` to fit a unix socket address.
pub fn check_vsock(v: &VsockConfig) -> Result<(), ConfigError> {
    if v.guest_cid < 3 || v.guest_cid == u32::MAX {
        return Err(ConfigError::InvalidVsockCid(v.guest_cid));
    }
    // sun_path holds 107 bytes and a NUL; "_4294967295" is 11 more.
    let len = v.uds_path.as_os_str().len();
    if len == 0 || len + 11 > 107 {
        return Err(ConfigError::InvalidVsockPath(v.uds_path.clone()));
    }
    Ok(())
}

/// A virtio-blk drive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriveConfig {
    /// Id, backing file, read-only.
    pub block: BlockConfig,
    /// Boot from it: it becomes /dev/vda and `root=/dev/vda` joins the
    /// command line.
    pub is_root: bool,
}

/// Most virtio devices one VM can have: one IOAPIC pin each, from GSI 5
/// (the API's documented limit).
pub use husk_api_types::MAX_VIRTIO_DEVICES;

/// Checks drive ids, root flags and count; returns the drives in device
/// order (the root drive first).
pub fn check_drives(drives: &[DriveConfig]) -> Result<Vec<DriveConfig>, ConfigError> {
    if drives.len() > MAX_VIRTIO_DEVICES {
        return Err(ConfigError::TooManyDevices(drives.len()));
    }
    let mut seen = std::collections::HashSet::new();
    for d in drives {
        let id = &d.block.id;
        if !valid_id(id) {
            return Err(ConfigError::InvalidDriveId(id.clone()));
        }
        if !seen.insert(id.as_str()) {
            return Err(ConfigError::DuplicateDrive(id.clone()));
        }
    }
    if drives.iter().filter(|d| d.is_root).count() > 1 {
        return Err(ConfigError::SeveralRootDrives);
    }
    let mut ordered = drives.to_vec();
    ordered.sort_by_key(|d| !d.is_root);
    Ok(ordered)
}

pub use husk_api_types::valid_id;

/// Checks network interface ids (valid, unique) and tap names (unique).
pub fn check_net(net: &[NetConfig]) -> Result<(), ConfigError> {
    let mut ids = std::collections::HashSet::new();
    let mut taps = std::collections::HashSet::new();
    for n in net {
        if !valid_id(&n.id) {
            return Err(ConfigError::InvalidNetId(n.id.clone()));
        }
        if !ids.insert(n.id.as_str()) {
            return Err(ConfigError::DuplicateNet(n.id.clone()));
        }
        if !taps.insert(n.host_dev_name.as_str()) {
            return Err(ConfigError::DuplicateTap(n.host_dev_name.clone()));
        }
    }
    Ok(())
}

/// Checks that every virtio device of `config` gets an interrupt line.
pub fn check_device_count(config: &VmConfig) -> Result<(), ConfigError> {
    let count = config.drives.len()
        + config.net.len()
        + usize::from(config.vsock.is_some())
        + usize::from(config.mem_hotplug.is_some())
        + config.fs.len();
    if count > MAX_VIRTIO_DEVICES {
        return Err(ConfigError::TooManyDevices(count));
    }
    Ok(())
}

/// What the host can offer, for validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostLimits {
    /// KVM_CAP_MAX_VCPUS.
    pub kvm_max_vcpus: usize,
    /// The guest-physical address width KVM supports.
    pub phys_address_bits: u8,
    /// The host's physical memory.
    pub host_mem_mib: u64,
    /// KVM_CAP_NR_MEMSLOTS: memory slots per VM.
    pub kvm_memslots: usize,
}

/// A configuration that cannot be booted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// Zero vCPUs.
    #[error("a microVM needs at least 1 vCPU")]
    NoVcpus,
    /// More vCPUs than allowed.
    #[error("{requested} vCPUs requested, but at most {max} are possible here (KVM allows {kvm_max}, the MP table {MAX_VCPUS})")]
    TooManyVcpus {
        /// What was asked for.
        requested: usize,
        /// The effective maximum.
        max: usize,
        /// KVM's own maximum.
        kvm_max: usize,
    },
    /// Less memory than any guest can boot in.
    #[error("{0} MiB of guest memory is too small: at least {MIN_MEM_MIB} MiB are needed")]
    MemoryTooSmall(u64),
    /// Two drives with one id.
    #[error("drive id {0:?} is used twice")]
    DuplicateDrive(String),
    /// An id that is empty, too long, or has characters other than [A-Za-z0-9_-].
    #[error("invalid drive id {0:?}: use 1 to 64 of A-Z a-z 0-9 _ -")]
    InvalidDriveId(String),
    /// Two network interfaces with one id.
    #[error("network interface id {0:?} is used twice")]
    DuplicateNet(String),
    /// A network interface id that breaks the drive id rules.
    #[error("invalid network interface id {0:?}: use 1 to 64 of A-Z a-z 0-9 _ -")]
    InvalidNetId(String),
    /// Two network interfaces on one tap.
    #[error("tap {0:?} is used by two network interfaces")]
    DuplicateTap(String),
    /// More than one drive marked root.
    #[error("only one drive can be the root device")]
    SeveralRootDrives,
    /// More devices than interrupt lines.
    #[error("{0} virtio devices requested, at most {MAX_VIRTIO_DEVICES} are possible")]
    TooManyDevices(usize),
    /// A reserved vsock CID.
    #[error("invalid vsock guest cid {0}: use 3 to 4294967294")]
    InvalidVsockCid(u32),
    /// An empty or too long vsock socket path.
    #[error("invalid vsock socket path {0:?}: 1 to 96 bytes")]
    InvalidVsockPath(PathBuf),
    /// A virtio-fs id that breaks the drive id rules.
    #[error("invalid file system id {0:?}: use 1 to 64 of A-Z a-z 0-9 _ -")]
    InvalidFsId(String),
    /// Two virtio-fs devices with one id.
    #[error("file system id {0:?} is used twice")]
    DuplicateFs(String),
    /// A tag the guest cannot mount.
    #[error("invalid file system tag {0:?}: 1 to 36 bytes, no spaces or NULs")]
    InvalidFsTag(String),
    /// Two virtio-fs devices with one tag.
    #[error("file system tag {0:?} is used twice")]
    DuplicateFsTag(String),
    /// A request queue count out of range.
    #[error("{0} request queues: use 1 to {MAX_FS_REQUEST_QUEUES}")]
    FsQueues(u16),
    /// A queue size that is not a power of two in range.
    #[error("a queue size of {0}: use a power of two from 2 to {MAX_FS_QUEUE_SIZE}")]
    FsQueueSize(u16),
    /// An empty or too long backend socket path.
    #[error("invalid vhost-user socket path {0:?}: 1 to 107 bytes")]
    FsSocket(PathBuf),
    /// More memory than the host or the address width allows.
    #[error("{mib} MiB of guest memory is too large: {reason}")]
    MemoryTooLarge {
        /// What was asked for.
        mib: u64,
        /// Which limit it exceeds.
        reason: String,
    },
    /// A maximum vCPU count below the boot count or above the limit.
    #[error(
        "a maximum of {max} vCPUs must be between the {vcpus} the guest boots with and {limit}"
    )]
    MaxVcpus {
        /// The maximum asked for.
        max: usize,
        /// The boot count.
        vcpus: usize,
        /// The most this host allows.
        limit: usize,
    },
    /// A hot-pluggable block size the guest cannot use.
    #[error("a hot-pluggable block of {0} MiB is not a power of two of at least 2 MiB")]
    HotplugBlock(u64),
    /// A slot size that does not hold whole blocks and guest memory blocks.
    #[error("a hot-pluggable slot of {slot} MiB is not a multiple of 128 MiB (the guest's memory block) and of the {block} MiB block")]
    HotplugSlot {
        /// The slot size.
        slot: u64,
        /// The block size.
        block: u64,
    },
    /// A region that is not a whole number of slots.
    #[error(
        "{total} MiB of hot-pluggable memory is not a positive multiple of the {slot} MiB slot"
    )]
    HotplugTotal {
        /// The region's size.
        total: u64,
        /// The slot size.
        slot: u64,
    },
    /// A region the host or the guest cannot have.
    #[error("{mib} MiB of hot-pluggable memory is too large: {reason}")]
    HotplugTooLarge {
        /// The region's size.
        mib: u64,
        /// Which limit it exceeds.
        reason: String,
    },
}

/// Checks a vCPU count against the host's limits.
pub fn check_vcpus(requested: usize, limits: &HostLimits) -> Result<u8, ConfigError> {
    if requested == 0 {
        return Err(ConfigError::NoVcpus);
    }
    let max = limits.kvm_max_vcpus.min(usize::from(MAX_VCPUS));
    if requested > max {
        return Err(ConfigError::TooManyVcpus {
            requested,
            max,
            kvm_max: limits.kvm_max_vcpus,
        });
    }
    // max <= 254, so this cannot fail.
    u8::try_from(requested).map_err(|_| ConfigError::TooManyVcpus {
        requested,
        max,
        kvm_max: limits.kvm_max_vcpus,
    })
}

/// Checks the vCPUs a VM is built with: at least the `vcpus` it boots
/// with, at most what the host allows (as [`check_vcpus`]).
pub fn check_max_vcpus(
    vcpus: usize,
    max: Option<usize>,
    limits: &HostLimits,
) -> Result<u8, ConfigError> {
    let Some(max) = max else {
        return check_vcpus(vcpus, limits);
    };
    let limit = limits.kvm_max_vcpus.min(usize::from(MAX_VCPUS));
    if max < vcpus || max > limit {
        return Err(ConfigError::MaxVcpus { max, vcpus, limit });
    }
    check_vcpus(max, limits)
}

/// Checks a hot-pluggable region's shape (the API's checks, with no host
/// in sight): block, slot and total sizes.
pub fn check_mem_hotplug_shape(h: &MemHotplugConfig) -> Result<(), ConfigError> {
    use crate::devices::virtio::mem::{GUEST_MEMORY_BLOCK, MIN_BLOCK_SIZE};
    if !h.block_mib.is_power_of_two() || h.block_mib < MIN_BLOCK_SIZE >> 20 {
        return Err(ConfigError::HotplugBlock(h.block_mib));
    }
    if h.slot_mib == 0
        || h.slot_mib % h.block_mib != 0
        || h.slot_mib % (GUEST_MEMORY_BLOCK >> 20) != 0
    {
        return Err(ConfigError::HotplugSlot {
            slot: h.slot_mib,
            block: h.block_mib,
        });
    }
    if h.total_mib == 0 || h.total_mib % h.slot_mib != 0 {
        return Err(ConfigError::HotplugTotal {
            total: h.total_mib,
            slot: h.slot_mib,
        });
    }
    if h.total_mib.checked_mul(1 << 20).is_none() {
        return Err(ConfigError::HotplugTooLarge {
            mib: h.total_mib,
            reason: "it overflows 64 bits".into(),
        });
    }
    Ok(())
}

/// Checks a hot-pluggable region against the host for a guest of
/// `mem_size` bytes of RAM with `boot_slots` KVM slots, and places it.
pub fn check_mem_hotplug(
    h: &MemHotplugConfig,
    mem_size: u64,
    boot_slots: usize,
    limits: &HostLimits,
) -> Result<crate::devices::virtio::mem::MemRegion, ConfigError> {
    check_mem_hotplug_shape(h)?;
    let too_large = |reason: String| ConfigError::HotplugTooLarge {
        mib: h.total_mib,
        reason,
    };
    let size = h
        .total_mib
        .checked_mul(1 << 20)
        .ok_or_else(|| too_large("it overflows 64 bits".into()))?;
    let mem_mib = mem_size >> 20;
    if h.total_mib.saturating_add(mem_mib) > limits.host_mem_mib {
        return Err(too_large(format!(
            "with {mem_mib} MiB of RAM it exceeds the host's {} MiB of physical memory",
            limits.host_mem_mib
        )));
    }
    let addr = crate::arch::x86_64::layout::hotplug_region_start(mem_size)
        .ok_or_else(|| too_large("it does not fit above the guest's RAM".into()))?;
    let top = addr
        .checked_add(size)
        .ok_or_else(|| too_large("it does not fit above the guest's RAM".into()))?;
    let addressable = 1u64
        .checked_shl(u32::from(limits.phys_address_bits))
        .unwrap_or(u64::MAX);
    if top > addressable {
        return Err(too_large(format!(
            "its top address {top:#x} exceeds the {}-bit guest physical address space",
            limits.phys_address_bits
        )));
    }
    let slots = h.total_mib / h.slot_mib;
    if boot_slots as u64 + slots > limits.kvm_memslots as u64 {
        return Err(too_large(format!(
            "its {slots} slots of {} MiB and the guest's RAM need more than the {} memory slots KVM offers",
            h.slot_mib, limits.kvm_memslots
        )));
    }
    Ok(crate::devices::virtio::mem::MemRegion {
        addr,
        size,
        block_size: h.block_mib << 20,
        slot_size: h.slot_mib << 20,
    })
}

/// Checks a memory size against the host's limits; returns it in bytes.
pub fn check_memory(mib: u64, limits: &HostLimits) -> Result<u64, ConfigError> {
    if mib < MIN_MEM_MIB {
        return Err(ConfigError::MemoryTooSmall(mib));
    }
    let too_large = |reason: String| ConfigError::MemoryTooLarge { mib, reason };
    if mib > limits.host_mem_mib {
        return Err(too_large(format!(
            "the host has {} MiB of physical memory",
            limits.host_mem_mib
        )));
    }
    let bytes = mib
        .checked_mul(1 << 20)
        .ok_or_else(|| too_large("it overflows 64 bits".into()))?;
    let top = crate::arch::x86_64::layout::ram_regions(bytes)
        .last()
        .map(|(start, size)| start.0 + size)
        .unwrap_or(bytes);
    let addressable = 1u64
        .checked_shl(u32::from(limits.phys_address_bits))
        .unwrap_or(u64::MAX);
    if top > addressable {
        return Err(too_large(format!(
            "its top address {top:#x} exceeds the {}-bit guest physical address space",
            limits.phys_address_bits
        )));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: HostLimits = HostLimits {
        kvm_max_vcpus: 1024,
        phys_address_bits: 36,
        host_mem_mib: 1 << 30,
        kvm_memslots: 509,
    };

    #[test]
    fn vcpu_limits() {
        assert_eq!(check_vcpus(0, &LIMITS), Err(ConfigError::NoVcpus));
        assert_eq!(check_vcpus(1, &LIMITS), Ok(1));
        assert_eq!(check_vcpus(254, &LIMITS), Ok(254));
        assert!(matches!(
            check_vcpus(255, &LIMITS),
            Err(ConfigError::TooManyVcpus { max: 254, .. })
        ));
        let small = HostLimits {
            kvm_max_vcpus: 8,
            ..LIMITS
        };
        let err = check_vcpus(9, &small).unwrap_err();
        assert!(err.to_string().contains("at most 8"), "{err}");
    }

    fn drive(id: &str, is_root: bool) -> DriveConfig {
        DriveConfig {
            block: BlockConfig {
                id: id.into(),
                path: "/x".into(),
                read_only: false,
            },
            is_root,
        }
    }

    #[test]
    fn drives_are_checked_and_root_goes_first() {
        let ordered = check_drives(&[drive("data", false), drive("rootfs", true)]).unwrap();
        assert_eq!(ordered[0].block.id, "rootfs");
        assert_eq!(
            check_drives(&[drive("a", false), drive("a", false)]),
            Err(ConfigError::DuplicateDrive("a".into()))
        );
        assert_eq!(
            check_drives(&[drive("a", true), drive("b", true)]),
            Err(ConfigError::SeveralRootDrives)
        );
        for bad in ["", "a b", "../x", &"x".repeat(65)] {
            assert!(matches!(
                check_drives(&[drive(bad, false)]),
                Err(ConfigError::InvalidDriveId(_))
            ));
        }
        let many: Vec<_> = (0..20).map(|i| drive(&format!("d{i}"), false)).collect();
        assert_eq!(check_drives(&many), Err(ConfigError::TooManyDevices(20)));
    }

    fn nic(id: &str, tap: &str) -> NetConfig {
        NetConfig {
            id: id.into(),
            host_dev_name: tap.into(),
            guest_mac: None,
        }
    }

    #[test]
    fn net_ids_and_taps_are_checked() {
        assert_eq!(
            check_net(&[nic("eth0", "tap0"), nic("eth1", "tap1")]),
            Ok(())
        );
        assert_eq!(
            check_net(&[nic("eth0", "tap0"), nic("eth0", "tap1")]),
            Err(ConfigError::DuplicateNet("eth0".into()))
        );
        assert_eq!(
            check_net(&[nic("a", "tap0"), nic("b", "tap0")]),
            Err(ConfigError::DuplicateTap("tap0".into()))
        );
        assert_eq!(
            check_net(&[nic("eth/0", "tap0")]),
            Err(ConfigError::InvalidNetId("eth/0".into()))
        );
    }

    #[test]
    fn every_virtio_device_counts_towards_the_limit() {
        let mut config = VmConfig {
            vcpus: 1,
            mem_mib: 128,
            boot: BootSource {
                kernel: "/k".into(),
                initrd: None,
                cmdline: String::new(),
            },
            serial: SerialOutput::Sink,
            drives: (0..10).map(|i| drive(&format!("d{i}"), false)).collect(),
            net: (0..8)
                .map(|i| nic(&format!("n{i}"), &format!("tap{i}")))
                .collect(),
            vsock: Some(VsockConfig {
                guest_cid: 3,
                uds_path: "/tmp/v.sock".into(),
            }),
            max_vcpus: None,
            mem_hotplug: None,
            fs: Vec::new(),
        };
        assert_eq!(check_device_count(&config), Ok(()));
        config.net.push(nic("n8", "tap8"));
        assert_eq!(
            check_device_count(&config),
            Err(ConfigError::TooManyDevices(20))
        );
        // The memory device takes a line too.
        config.net.pop();
        config.mem_hotplug = Some(MemHotplugConfig::new(1024));
        assert_eq!(
            check_device_count(&config),
            Err(ConfigError::TooManyDevices(20))
        );
    }

    #[test]
    fn max_vcpus_lie_between_the_boot_count_and_the_limit() {
        assert_eq!(check_max_vcpus(2, None, &LIMITS), Ok(2));
        assert_eq!(check_max_vcpus(1, Some(4), &LIMITS), Ok(4));
        assert_eq!(check_max_vcpus(2, Some(2), &LIMITS), Ok(2));
        let err = check_max_vcpus(3, Some(2), &LIMITS).unwrap_err();
        assert!(err.to_string().contains("between the 3"), "{err}");
        let small = HostLimits {
            kvm_max_vcpus: 8,
            ..LIMITS
        };
        let err = check_max_vcpus(1, Some(9), &small).unwrap_err();
        assert_eq!(
            err,
            ConfigError::MaxVcpus {
                max: 9,
                vcpus: 1,
                limit: 8
            }
        );
    }

    #[test]
    fn hotplug_regions_are_shaped_and_placed_above_ram() {
        let h = MemHotplugConfig::new(1024);
        let r = check_mem_hotplug(&h, 256 << 20, 1, &LIMITS).unwrap();
        assert_eq!(
            (r.addr, r.size, r.block_size, r.slot_size),
            (4 << 30, 1 << 30, 2 << 20, 128 << 20)
        );
        let shape = |total_mib, block_mib, slot_mib| {
            check_mem_hotplug_shape(&MemHotplugConfig {
                total_mib,
                block_mib,
                slot_mib,
            })
        };
        assert_eq!(shape(1024, 3, 128), Err(ConfigError::HotplugBlock(3)));
        assert_eq!(shape(1024, 1, 128), Err(ConfigError::HotplugBlock(1)));
        assert_eq!(shape(1024, 0, 128), Err(ConfigError::HotplugBlock(0)));
        assert!(matches!(
            shape(1024, 2, 192),
            Err(ConfigError::HotplugSlot { .. })
        ));
        assert!(matches!(
            shape(1024, 256, 128),
            Err(ConfigError::HotplugSlot { .. })
        ));
        assert!(matches!(
            shape(1000, 2, 128),
            Err(ConfigError::HotplugTotal { .. })
        ));
        assert!(matches!(
            shape(0, 2, 128),
            Err(ConfigError::HotplugTotal { .. })
        ));
        assert_eq!(shape(2048, 256, 256), Ok(()));
        // The host's limits: its memory, the address width, KVM's slots.
        let host = HostLimits {
            host_mem_mib: 1024,
            ..LIMITS
        };
        let err = check_mem_hotplug(&h, 256 << 20, 1, &host).unwrap_err();
        assert!(
            err.to_string().contains("1024 MiB of physical memory"),
            "{err}"
        );
        let narrow = HostLimits {
            phys_address_bits: 32,
            ..LIMITS
        };
        let err = check_mem_hotplug(&h, 256 << 20, 1, &narrow).unwrap_err();
        assert!(err.to_string().contains("32-bit"), "{err}");
        let few = HostLimits {
            kvm_memslots: 8,
            ..LIMITS
        };
        let err = check_mem_hotplug(&h, 256 << 20, 1, &few).unwrap_err();
        assert!(err.to_string().contains("8 memory slots"), "{err}");
        assert!(check_mem_hotplug(
            &MemHotplugConfig::new((u64::MAX >> 1) & !127),
            1 << 30,
            1,
            &LIMITS
        )
        .is_err());
    }

    #[test]
    fn vsock_cids_and_paths() {
        let v = |guest_cid, p: &str| VsockConfig {
            guest_cid,
            uds_path: p.into(),
        };
        assert_eq!(check_vsock(&v(3, "/tmp/v.sock")), Ok(()));
        for cid in [0, 1, 2, u32::MAX] {
            assert_eq!(
                check_vsock(&v(cid, "/tmp/v.sock")),
                Err(ConfigError::InvalidVsockCid(cid))
            );
        }
        assert!(check_vsock(&v(3, "")).is_err());
        assert!(check_vsock(&v(3, &"x".repeat(96))).is_ok());
        assert!(check_vsock(&v(3, &"x".repeat(97))).is_err());
    }

    #[test]
    fn memory_limits() {
        assert_eq!(
            check_memory(8, &LIMITS),
            Err(ConfigError::MemoryTooSmall(8))
        );
        assert_eq!(check_memory(128, &LIMITS), Ok(128 << 20));
        // 36 bits = 64 GiB of address space; with the 2 GiB gap, 62 GiB fits.
        assert!(check_memory(62 << 10, &LIMITS).is_ok());
        let err = check_memory(63 << 10, &LIMITS).unwrap_err();
        assert!(err.to_string().contains("36-bit"), "{err}");
        let host = HostLimits {
            host_mem_mib: 4096,
            ..LIMITS
        };
        let err = check_memory(4097, &host).unwrap_err();
        assert!(
            err.to_string().contains("4096 MiB of physical memory"),
            "{err}"
        );
        let huge = HostLimits {
            host_mem_mib: u64::MAX,
            phys_address_bits: 64,
            ..LIMITS
        };
        assert!(check_memory(u64::MAX, &huge).is_err());
    }
}
