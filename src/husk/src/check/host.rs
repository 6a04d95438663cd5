//! The host's kernel and this process: KVM (a probe guest that makes a
//! syscall from user space), the capabilities the shim and husk use, tun,
//! vsock, vhost, cgroup v2.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

use vmm::error::Chain;
use vmm::vstate::probe::{probe_linux_guest, ProbeOutcome};

use super::Check;

/// How long the probe guest may take (it needs microseconds on a real KVM;
/// an emulating one can be slow).
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);

pub(super) fn checks() -> Vec<Check> {
    let caps = effective_caps();
    vec![
        kvm(),
        capabilities(caps),
        tun(caps),
        vsock(),
        vhost(),
        cgroup(),
    ]
}

fn has_cpu_virtualization() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| {
            c.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        })
        .unwrap_or(false)
}

fn kvm() -> Check {
    const NAME: &str = "kvm";
    let dev = Path::new("/dev/kvm");
    if !dev.exists() {
        return Check::fail(
            NAME,
            "/dev/kvm does not exist",
            "enable hardware virtualization (VT-x/AMD-V) in the firmware and load kvm_intel or kvm_amd",
        );
    }
    if let Err(e) = OpenOptions::new().read(true).write(true).open(dev) {
        return Check::fail(
            NAME,
            format!("cannot open /dev/kvm: {e}"),
            "run as root, or give the user running husk the kvm group",
        );
    }
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    match probe_linux_guest(PROBE_TIMEOUT) {
        Ok(outcome) if outcome.passed() => Check::ok(
            NAME,
            format!(
                "/dev/kvm ran a 64-bit probe guest through ring 0, user space and a syscall{}",
                if pvm { " (kvm_pvm)" } else { "" }
            ),
        ),
        Ok(outcome) => probe_failed(NAME, &outcome, pvm),
        Err(e) => Check::fail(
            NAME,
            format!(
                "/dev/kvm opens, but the probe guest could not be set up: {}",
                Chain(&e)
            ),
            "check the kernel log (dmesg) for KVM's complaint; husk needs the capabilities a \
             stock kvm_intel or kvm_amd offers",
        ),
    }
}

fn probe_failed(name: &'static str, outcome: &ProbeOutcome, pvm: bool) -> Check {
    let how = outcome.stopped_by.as_deref().unwrap_or("no report");
    let seen = format!("{} ({how})", outcome.reached.describe());
    if pvm {
        Check::fail(
            name,
            format!(
                "this host's /dev/kvm is kvm_pvm (paravirtual, the CPU shows no VMX/SVM) and cannot \
                 run a Linux guest's user space: the probe guest's {seen}"
            ),
            "run husk inside a node VM with a real KVM (resources/node/run.sh boots one: QEMU with \
             an emulated AMD SVM) or on a host with hardware virtualization",
        )
    } else if !has_cpu_virtualization() {
        Check::fail(
            name,
            format!("the CPU shows no VMX/SVM and the probe guest's {seen}"),
            "run husk on a host with hardware virtualization (or nested virtualization enabled)",
        )
    } else {
        Check::fail(
            name,
            format!("/dev/kvm cannot run a Linux guest: the probe guest's {seen}"),
            "check the kernel log (dmesg) for KVM errors; a nested hypervisor may need nested \
             virtualization turned on",
        )
    }
}

/// The capabilities of this process's effective set (bit N is capability N).
fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// What the shim and husk do as root, and why.
const NEEDED_CAPS: [(u32, &str, &str); 6] = [
    (
        21,
        "CAP_SYS_ADMIN",
        "mounts images' layers, joins the pod's network namespace",
    ),
    (
        12,
        "CAP_NET_ADMIN",
        "creates the pod's tap and its tc redirect",
    ),
    (0, "CAP_CHOWN", "keeps images' file owners"),
    (
        1,
        "CAP_DAC_OVERRIDE",
        "reads images' files whatever their modes",
    ),
    (3, "CAP_FOWNER", "keeps images' modes and times"),
    (27, "CAP_MKNOD", "keeps images' device nodes"),
];
const CAP_NET_ADMIN: u32 = 12;

fn capabilities(caps: u64) -> Check {
    const NAME: &str = "capabilities";
    let missing: Vec<String> = NEEDED_CAPS
        .iter()
        .filter(|(bit, _, _)| caps & (1 << bit) == 0)
        .map(|(_, cap, why)| format!("{cap} ({why})"))
        .collect();
    if missing.is_empty() {
        Check::ok(
            NAME,
            "CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER, CAP_MKNOD",
        )
    } else {
        Check::fail(
            NAME,
            format!("missing {}", missing.join(", ")),
            "run husk check as root: containerd starts the shim as root, with every capability",
        )
    }
}

/// `struct ifreq` as TUNSETIFF reads it: a name and the flags.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

fn tun(caps: u64) -> Check {
    const NAME: &str = "tun";
    let file = match OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
    {
        Ok(f) => f,
        Err(e) => {
            return Check::fail(
                NAME,
                format!("cannot open /dev/net/tun: {e}"),
                "load the tun module (modprobe tun); pods' network devices are taps",
            )
        }
    };
    if caps & (1 << CAP_NET_ADMIN) == 0 {
        return Check::warn(
            NAME,
            "/dev/net/tun opens; a tap was not tried without CAP_NET_ADMIN",
            "run husk check as root to try one",
        );
    }
    // A tap as the shim makes one (with the virtio-net header), not made
    // persistent: it goes away when the file is closed.
    let mut req = IfReq {
        name: [0; 16],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    req.name[..11].copy_from_slice(b"huskcheck%d");
    // SAFETY: TUNSETIFF reads and writes a struct ifreq, which `req` is
    // laid out as (name, flags, padding to 40 bytes); the fd is open.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) };
    if rc != 0 {
        return Check::fail(
            NAME,
            format!(
                "/dev/net/tun refused a tap with a virtio-net header: {}",
                std::io::Error::last_os_error()
            ),
            "check that the kernel's tun driver is built with tap support",
        );
    }
    Check::ok(
        NAME,
        "a tap with a virtio-net header was created (and removed)",
    )
}

fn vsock() -> Check {
    const NAME: &str = "vsock";
    // husk's virtio-vsock device is in user space: the host's end of every
    // guest stream is a unix socket, so AF_UNIX is all the host needs.
    let dir = std::env::temp_dir().join(format!("husk-check-{}", std::process::id()));
    let result = std::fs::create_dir_all(&dir)
        .and_then(|_| std::os::unix::net::UnixListener::bind(dir.join("v.sock")).map(drop));
    let _ = std::fs::remove_dir_all(&dir);
    match result {
        Ok(()) => Check::ok(
            NAME,
            "husk's vsock is a user-space device over unix sockets (no vhost_vsock needed); a unix socket binds",
        ),
        Err(e) => Check::fail(
            NAME,
            format!("cannot bind a unix socket in {}: {e}", std::env::temp_dir().display()),
            "husk's vsock needs unix sockets in the shim's state directory",
        ),
    }
}

fn vhost() -> Check {
    let present: Vec<&str> = ["/dev/vhost-net", "/dev/vhost-vsock"]
        .into_iter()
        .filter(|p| Path::new(p).exists())
        .collect();
    Check::ok(
        "vhost",
        format!(
            "not used: husk's virtio-net and virtio-vsock run in user space ({})",
            if present.is_empty() {
                "no vhost devices here".to_string()
            } else {
                format!("{} present", present.join(", "))
            }
        ),
    )
}

/// The controllers a pod's cgroup needs on a cgroup v2 node (the kubelet's
/// pod cgroups, husk-jailer's limits).
const CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

fn cgroup() -> Check {
    const NAME: &str = "cgroup";
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let v2: Vec<&str> = mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then_some(dir)
        })
        .collect();
    let Some(root) = v2.iter().find(|d| **d == "/sys/fs/cgroup") else {
        let where_ = if v2.is_empty() {
            "no cgroup v2 hierarchy is mounted".to_string()
        } else {
            format!(
                "cgroup v2 is mounted at {} beside v1 hierarchies",
                v2.join(", ")
            )
        };
        return Check::warn(
            NAME,
            format!("{where_}: pods run, but the kubelet and husk-jailer use cgroup v1 here"),
            "boot with the unified hierarchy (systemd.unified_cgroup_hierarchy=1)",
        );
    };
    let available =
        std::fs::read_to_string(Path::new(root).join("cgroup.controllers")).unwrap_or_default();
    let missing: Vec<&str> = CONTROLLERS
        .into_iter()
        .filter(|c| !available.split_whitespace().any(|a| a == *c))
        .collect();
    if missing.is_empty() {
        Check::ok(
            NAME,
            format!("cgroup v2 at /sys/fs/cgroup with {}", available.trim()),
        )
    } else {
        Check::warn(
            NAME,
            format!(
                "cgroup v2 at /sys/fs/cgroup lacks the {} controller(s)",
                missing.join(", ")
            ),
            "enable them (a kernel without them cannot limit pods' VMs)",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifreq_has_the_kernels_size() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
    }

    #[test]
    fn missing_capabilities_fail_with_their_reasons() {
        let c = capabilities(0);
        assert_eq!(c.status, super::super::Status::Fail);
        assert!(c.detail.contains("CAP_SYS_ADMIN (mounts"), "{}", c.detail);
        let all = NEEDED_CAPS.iter().fold(0u64, |m, (b, _, _)| m | (1 << b));
        assert_eq!(capabilities(all).status, super::super::Status::Ok);
    }
}
