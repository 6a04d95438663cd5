//! The device nodes the guest's kernel has, read from sysfs
//! (`/sys/dev/{char,block}/MAJOR:MINOR/uevent`), and what a container's
//! device list becomes in the VM. A spec's devices name the *host's* nodes
//! (a privileged container under CRI gets the node's whole /dev); the guest
//! kernel has its own, different set. So:
//!
//! - a privileged container (its device cgroup allows every device) gets
//!   the guest's device nodes, as a privileged container on a node gets the
//!   node's; host devices the guest lacks are skipped and named in the log;
//! - any other container gets exactly the devices its spec lists, each of
//!   which must exist in the guest (a device plugin's /dev/fuse, say): a
//!   missing one is an error naming it, not a node that would not work.
//!
//! Device numbers are the kernel's fixed assignments (devices.txt), so a
//! number means the same device on the host and in the guest.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;

/// A character or block device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// A character device (`c`, `u`).
    Char,
    /// A block device (`b`).
    Block,
}

/// A device's type and number.
pub type DevNum = (Kind, u32, u32);

/// The kernel's device nodes by number, with their names under /dev.
#[derive(Debug, Default, Clone)]
pub struct KernelDevices(BTreeMap<DevNum, PathBuf>);

impl KernelDevices {
    /// Reads `sys_dev` (`/sys/dev` in the guest). Entries without a
    /// DEVNAME (no node in /dev) are left out; a missing directory gives
    /// an empty table.
    pub fn scan(sys_dev: &Path) -> Self {
        let mut table = BTreeMap::new();
        for (kind, sub) in [(Kind::Char, "char"), (Kind::Block, "block")] {
            let Ok(entries) = std::fs::read_dir(sys_dev.join(sub)) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name();
                let Some((major, minor)) = name.to_str().and_then(parse_number) else {
                    continue;
                };
                let uevent = std::fs::read_to_string(e.path().join("uevent")).unwrap_or_default();
                let Some(devname) = uevent.lines().find_map(|l| l.strip_prefix("DEVNAME=")) else {
                    continue;
                };
                // A name the kernel gives is relative to /dev; refuse
                // anything that would leave it.
                if devname.is_empty()
                    || devname.starts_with('/')
                    || devname.split('/').any(|c| c == ".." || c.is_empty())
                {
                    continue;
                }
                table.insert((kind, major, minor), Path::new("/dev").join(devname));
            }
        }
        KernelDevices(table)
    }

    /// The node of device `num` in /dev, if the kernel has it.
    pub fn get(&self, num: DevNum) -> Option<&Path> {
        self.0.get(&num).map(PathBuf::as_path)
    }

    /// Every device, in number order.
    pub fn iter(&self) -> impl Iterator<Item = (DevNum, &Path)> {
        self.0.iter().map(|(n, p)| (*n, p.as_path()))
    }

    #[cfg(test)]
    pub fn from_entries(entries: &[(DevNum, &str)]) -> Self {
        KernelDevices(
            entries
                .iter()
                .map(|(n, p)| (*n, PathBuf::from(p)))
                .collect(),
        )
    }
}

fn parse_number(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Whether the spec's device cgroup allows every device (`{"allow": true,
/// "access": "rwm"}` without a type or number): what a privileged
/// container gets from containerd and runc alike.
pub fn all_devices_allowed(spec: &Spec) -> bool {
    spec.linux()
        .as_ref()
        .and_then(|l| l.resources().as_ref())
        .and_then(|r| r.devices().as_ref())
        .is_some_and(|rules| {
            rules.iter().any(|d| {
                d.allow()
                    && d.major().is_none()
                    && d.minor().is_none()
                    && d.typ()
                        .is_none_or(|t| t == oci_spec::runtime::LinuxDeviceType::A)
                    && d.access()
                        .as_deref()
                        .is_none_or(|a| a.contains('r') && a.contains('w'))
            })
        })
}

/// Nodes a privileged container does not get as device nodes: the
/// terminal devices the agent sets up itself.
fn private_to_the_agent(path: &Path) -> bool {
    path.starts_with("/dev/pts") || path == Path::new("/dev/console")
}

/// The guest's devices for a privileged container: (path, number).
pub fn privileged_set(kernel: &KernelDevices) -> Vec<(PathBuf, DevNum)> {
    kernel
        .iter()
        .filter(|(_, p)| !private_to_the_agent(p))
        .map(|(n, p)| (p.to_path_buf(), n))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysfs_entries_become_nodes_and_bad_names_are_left_out() {
        let d = tempfile_dir();
        let put = |sub: &str, num: &str, uevent: &str| {
            let p = d.join(sub).join(num);
            std::fs::create_dir_all(&p).unwrap();
            std::fs::write(p.join("uevent"), uevent).unwrap();
        };
        put("char", "10:200", "MAJOR=10\nMINOR=200\nDEVNAME=net/tun\n");
        put(
            "char",
            "1:3",
            "MAJOR=1\nMINOR=3\nDEVNAME=null\nDEVMODE=0666\n",
        );
        put(
            "block",
            "254:0",
            "MAJOR=254\nMINOR=0\nDEVNAME=vda\nDEVTYPE=disk\n",
        );
        put("char", "4:64", "MAJOR=4\nMINOR=64\n");
        put("char", "10:1", "DEVNAME=../etc/passwd\n");
        put("char", "garbage", "DEVNAME=x\n");
        let k = KernelDevices::scan(&d);
        assert_eq!(
            k.get((Kind::Char, 10, 200)),
            Some(Path::new("/dev/net/tun"))
        );
        assert_eq!(k.get((Kind::Block, 254, 0)), Some(Path::new("/dev/vda")));
        assert_eq!(k.get((Kind::Char, 254, 0)), None);
        assert_eq!(k.get((Kind::Char, 4, 64)), None);
        assert_eq!(k.get((Kind::Char, 10, 1)), None);
        assert_eq!(k.iter().count(), 3);
        assert_eq!(KernelDevices::scan(&d.join("missing")).iter().count(), 0);
        std::fs::remove_dir_all(d).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "husk-devices-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn spec(json: serde_json::Value) -> Spec {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn a_device_cgroup_that_allows_everything_is_privileged() {
        let all = spec(
            serde_json::json!({"ociVersion": "1.0.2", "linux": {"resources": {
            "devices": [{"allow": false, "access": "rwm"}, {"allow": true, "access": "rwm"}]}}}),
        );
        assert!(all_devices_allowed(&all));
        let typed_all = spec(
            serde_json::json!({"ociVersion": "1.0.2", "linux": {"resources": {
            "devices": [{"allow": true, "type": "a", "access": "rwm"}]}}}),
        );
        assert!(all_devices_allowed(&typed_all));
        let default = spec(
            serde_json::json!({"ociVersion": "1.0.2", "linux": {"resources": {
            "devices": [{"allow": false, "access": "rwm"},
                        {"allow": true, "type": "c", "major": 1, "minor": 3, "access": "rwm"}]}}}),
        );
        assert!(!all_devices_allowed(&default));
        let read_only = spec(
            serde_json::json!({"ociVersion": "1.0.2", "linux": {"resources": {
            "devices": [{"allow": true, "access": "r"}]}}}),
        );
        assert!(!all_devices_allowed(&read_only));
        assert!(!all_devices_allowed(&spec(
            serde_json::json!({"ociVersion": "1.0.2"})
        )));
    }

    #[test]
    fn a_privileged_container_gets_the_guests_devices_but_the_terminals() {
        let k = KernelDevices::from_entries(&[
            ((Kind::Char, 1, 3), "/dev/null"),
            ((Kind::Char, 5, 1), "/dev/console"),
            ((Kind::Char, 136, 0), "/dev/pts/0"),
            ((Kind::Block, 254, 0), "/dev/vda"),
        ]);
        let set: Vec<PathBuf> = privileged_set(&k).into_iter().map(|(p, _)| p).collect();
        assert_eq!(set, [PathBuf::from("/dev/null"), PathBuf::from("/dev/vda")]);
    }
}
