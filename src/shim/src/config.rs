//! `/etc/husk/config.toml`: where the shim finds husk, the guest kernel and
//! the agent, and the defaults for each pod's microVM. Every key is
//! optional; docs/getting-started.md lists them with their defaults.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The file the shim reads unless `HUSK_SHIM_CONFIG` names another.
pub const DEFAULT_PATH: &str = "/etc/husk/config.toml";

/// Why the configuration could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file exists but cannot be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown keys or wrong types.
    #[error("{}: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A value is out of range.
    #[error("{}: {message}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// Drive slots a VM can have: its virtio devices less the net, vsock,
/// memory and share devices.
pub const MAX_SLOTS: u32 = husk_api_types::MAX_VIRTIO_DEVICES as u32 - 4;

/// How a container's root filesystem reaches the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RootfsMode {
    /// containerd's snapshot, mounted on the node and bound into the pod's
    /// virtio-fs share (with `volumes = "share"`): no copy, no drive slot.
    Share,
    /// A disk: the image's layers merged once into the image cache under
    /// a writable layer of the container's own (or a whole copy).
    Block,
}

/// How containers' bind mounts (Kubernetes volumes, /etc/hosts, the
/// termination log) reach the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Volumes {
    /// Through the pod's virtio-fs share, served by one virtiofsd per pod:
    /// the node's own files, both ways (docs/volumes.md).
    Share,
    /// Copied once onto a disk per container when it is created: writes
    /// never reach the node, updates never reach the pod.
    Copy,
}

/// The shim's configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The husk binary (default: `husk` beside the shim's own binary, else
    /// on PATH).
    pub husk_binary: Option<PathBuf>,
    /// The guest kernel (an uncompressed vmlinux or a bzImage).
    pub kernel: PathBuf,
    /// The agent's initramfs.
    pub initrd: PathBuf,
    /// Extra guest kernel command line, after husk's own.
    pub kernel_params: String,
    /// The fewest vCPUs a pod's VM has online (more if its CPU limits
    /// ask for more).
    pub default_vcpus: u32,
    /// Guest memory for the guest itself, beyond its containers' memory
    /// limits (MiB): the guest kernel, the agent, and what containers
    /// without a limit share.
    pub default_memory_mib: u64,
    /// The most vCPUs a pod may get: each VM is built with this many, the
    /// ones its pod does not need parked (a thread each, no CPU time)
    /// until its limits grow.
    pub max_vcpus: u32,
    /// The most guest memory a pod's VM may grow to (MiB), within the
    /// node's memory: what its boot size leaves of it is a hot-pluggable
    /// region that takes host memory only as it is plugged. 0 turns
    /// growing off (pods then keep their boot size).
    pub max_memory_mib: u64,
    /// Spare writable drive slots per VM: each container takes one for its
    /// writable layer (or its whole rootfs) and one more if it has volumes.
    pub drive_slots: u32,
    /// Read-only drive slots per VM for images' shared layers: containers
    /// of one image share one. 0 turns sharing off (every container's
    /// rootfs is then a full copy).
    pub image_slots: u32,
    /// Where images' layers are kept as read-only ext4 files, built once
    /// per chain of snapshot layers and shared by every pod.
    pub image_cache_dir: PathBuf,
    /// The size of a container's writable layer (MiB): the most its
    /// processes can write to its root filesystem (a sparse file on the
    /// host, which uses only what they write).
    pub writable_layer_mib: u64,
    /// How long the guest may take to boot until its agent answers (s).
    pub boot_timeout_secs: u64,
    /// The longest the shim waits for the agent's answer to one request
    /// (s). A guest that stops answering fails that request (and the pod
    /// is torn down if the request was creating its first container).
    pub agent_timeout_secs: u64,
    /// Per-pod state (API and vsock sockets, console log, disk images).
    pub state_dir: PathBuf,
    /// Run husk with its seccomp filters (turn off only to debug).
    pub seccomp: bool,
    /// Start each pod's husk through `husk-jailer`: a uid of the pod's
    /// own, no capabilities, chrooted into the pod's state directory with
    /// only its files (docs/security.md). `false` runs husk as root,
    /// unconfined but for seccomp, with a warning for every pod.
    pub jailer: bool,
    /// The husk-jailer binary (default: beside the shim's own binary,
    /// else on PATH).
    pub jailer_binary: Option<PathBuf>,
    /// The first of the uids jailed husks run as: each pod takes one of
    /// `jail_uid_base + 1 ..= jail_uid_base + jail_uids` while it runs;
    /// `jail_uid_base` itself is their shared group (which may read the
    /// image cache).
    pub jail_uid_base: u32,
    /// How many uids pods take from (the most jailed pods on the node).
    pub jail_uids: u32,
    /// The shim's log level when containerd does not ask for debug.
    pub log_level: String,
    /// The most husk's log (the guest's console and husk's own lines) may
    /// hold (KiB): past it, it moves to `husk.log.1` and starts again, so
    /// a pod's log takes at most about twice this on the node.
    pub console_log_kib: u64,
    /// How bind mounts reach the guest: `"share"` (virtio-fs) or
    /// `"copy"`.
    pub volumes: Volumes,
    /// How a container's root filesystem reaches the guest: `"share"`
    /// (the node's snapshot through the pod's share; with `volumes =
    /// "copy"` there is no share, and roots are disks) or `"block"` (a
    /// disk).
    pub rootfs: RootfsMode,
    /// The virtiofsd that serves each pod's share (default: `virtiofsd`
    /// beside the shim's own binary, else on PATH, else Debian's
    /// `/usr/libexec/virtiofsd`).
    pub virtiofsd: Option<PathBuf>,
    /// husk relays the share's requests through buffers of its own, so
    /// virtiofsd never maps the guest's memory (default: on). Off, the
    /// guest's memory is shared with virtiofsd (one copy less per
    /// request; a restored pod then gets its own copy of its template's
    /// memory instead of sharing its pages).
    pub share_relay: bool,
    /// Restore each pod's microVM from a template (a snapshot of a guest
    /// booted to its agent, made on first use per pod shape and kept under
    /// `image_cache_dir/templates`) instead of booting it (default: on;
    /// pods start in about three quarters of a boot's time).
    pub template: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            husk_binary: None,
            kernel: PathBuf::from("/usr/share/husk/vmlinux"),
            initrd: PathBuf::from("/usr/share/husk/husk-agent.cpio"),
            kernel_params: String::new(),
            default_vcpus: 1,
            default_memory_mib: 256,
            max_vcpus: 8,
            max_memory_mib: 16384,
            drive_slots: 8,
            image_slots: 4,
            image_cache_dir: PathBuf::from("/var/lib/husk/images"),
            writable_layer_mib: 1024,
            boot_timeout_secs: 60,
            agent_timeout_secs: 60,
            state_dir: PathBuf::from("/run/husk"),
            seccomp: true,
            jailer: true,
            jailer_binary: None,
            jail_uid_base: 1_800_000_000,
            jail_uids: 65536,
            log_level: "warn".into(),
            console_log_kib: 4096,
            volumes: Volumes::Share,
            rootfs: RootfsMode::Share,
            virtiofsd: None,
            share_relay: true,
            template: true,
        }
    }
}

impl Config {
    /// Reads `path`; a missing file means the defaults.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Config::default()),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        Config::parse(path, &text)
    }

    /// Parses `text` (read from `path`) and checks its values.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.message().to_string(),
        })?;
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        if config.default_vcpus == 0 || config.default_vcpus > config.max_vcpus {
            return Err(invalid(format!(
                "default_vcpus = {} must be between 1 and max_vcpus ({})",
                config.default_vcpus, config.max_vcpus
            )));
        }
        if config.default_memory_mib < 64 {
            return Err(invalid(format!(
                "default_memory_mib = {} is too small for the guest (64 at least)",
                config.default_memory_mib
            )));
        }
        if config.max_vcpus > 254 {
            return Err(invalid(format!(
                "max_vcpus = {} must be at most 254 (husk's limit)",
                config.max_vcpus
            )));
        }
        if config.max_memory_mib != 0 && config.max_memory_mib < config.default_memory_mib {
            return Err(invalid(format!(
                "max_memory_mib = {} must be 0 (no growing) or at least default_memory_mib ({})",
                config.max_memory_mib, config.default_memory_mib
            )));
        }
        if config.drive_slots == 0 || config.drive_slots + config.image_slots > MAX_SLOTS {
            return Err(invalid(format!(
                "drive_slots = {} must be at least 1 and drive_slots + image_slots ({}) at most {MAX_SLOTS}",
                config.drive_slots,
                config.drive_slots.saturating_add(config.image_slots)
            )));
        }
        if !(16..=1 << 20).contains(&config.writable_layer_mib) {
            return Err(invalid(format!(
                "writable_layer_mib = {} must be between 16 and 1048576",
                config.writable_layer_mib
            )));
        }
        if config.boot_timeout_secs == 0 {
            return Err(invalid("boot_timeout_secs must be at least 1".into()));
        }
        if config.agent_timeout_secs == 0 {
            return Err(invalid("agent_timeout_secs must be at least 1".into()));
        }
        if !(16..=1 << 20).contains(&config.console_log_kib) {
            return Err(invalid(format!(
                "console_log_kib = {} must be between 16 and 1048576",
                config.console_log_kib
            )));
        }
        if config.jail_uid_base == 0
            || config.jail_uids == 0
            || config.jail_uid_base.checked_add(config.jail_uids).is_none()
        {
            return Err(invalid(format!(
                "jail_uid_base = {} and jail_uids = {} must be at least 1 each, their sum below 2^32",
                config.jail_uid_base, config.jail_uids
            )));
        }
        Ok(config)
    }

    /// The husk binary to run.
    pub fn husk(&self) -> PathBuf {
        beside_the_shim(self.husk_binary.as_deref(), "husk")
    }

    /// The husk-jailer binary.
    pub fn jailer(&self) -> PathBuf {
        beside_the_shim(self.jailer_binary.as_deref(), "husk-jailer")
    }

    /// The virtiofsd binary.
    pub fn virtiofsd(&self) -> PathBuf {
        let found = beside_the_shim(self.virtiofsd.as_deref(), "virtiofsd");
        if found.is_absolute() {
            return found;
        }
        std::env::var_os("PATH")
            .and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|d| d.join("virtiofsd"))
                    .find(|p| p.is_file())
            })
            .unwrap_or_else(|| PathBuf::from("/usr/libexec/virtiofsd"))
    }
}

/// `configured`, else `name` beside the shim's own binary, else `name`
/// (looked up on PATH).
fn beside_the_shim(configured: Option<&Path>, name: &str) -> PathBuf {
    if let Some(p) = configured {
        return p.to_path_buf();
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join(name)))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/husk/config.toml"), text)
    }

    #[test]
    fn empty_file_and_missing_file_mean_defaults() {
        assert_eq!(parse("").unwrap(), Config::default());
        let missing = Config::load(Path::new("/nonexistent/husk/config.toml")).unwrap();
        assert_eq!(missing, Config::default());
    }

    #[test]
    fn keys_override_defaults() {
        let c = parse(
            r#"
            kernel = "/opt/husk/vmlinux"
            default_vcpus = 2
            default_memory_mib = 512
            drive_slots = 4
            seccomp = false
            volumes = "copy"
            virtiofsd = "/usr/local/bin/virtiofsd"
            "#,
        )
        .unwrap();
        assert_eq!(c.kernel, PathBuf::from("/opt/husk/vmlinux"));
        assert_eq!(
            (c.default_vcpus, c.default_memory_mib, c.drive_slots),
            (2, 512, 4)
        );
        assert!(!c.seccomp);
        assert_eq!(c.volumes, Volumes::Copy);
        assert_eq!(c.virtiofsd(), PathBuf::from("/usr/local/bin/virtiofsd"));
        assert_eq!(c.initrd, Config::default().initrd);
    }

    #[test]
    fn unknown_keys_wrong_types_and_bad_values_are_refused() {
        let e = parse("kernal = \"/x\"").unwrap_err().to_string();
        assert!(e.contains("unknown field") && e.contains("kernal"), "{e}");
        let e = parse("default_vcpus = \"two\"").unwrap_err().to_string();
        assert!(e.contains("invalid type"), "{e}");
        let e = parse("volumes = \"nfs\"").unwrap_err().to_string();
        assert!(e.contains("unknown variant"), "{e}");
        for bad in [
            "default_vcpus = 0",
            "default_vcpus = 9",
            "default_memory_mib = 16",
            "max_vcpus = 256",
            "max_memory_mib = 100",
            "drive_slots = 0",
            "drive_slots = 16",
            "drive_slots = 12",
            "image_slots = 10",
            "writable_layer_mib = 1",
            "boot_timeout_secs = 0",
            "agent_timeout_secs = 0",
            "console_log_kib = 15",
            "console_log_kib = 1048577",
            "jail_uid_base = 0",
            "jail_uids = 0",
            "jail_uid_base = 4294967295",
        ] {
            assert!(
                matches!(parse(bad), Err(ConfigError::Invalid { .. })),
                "{bad}"
            );
        }
    }
}
