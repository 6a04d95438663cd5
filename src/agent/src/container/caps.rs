//! Linux capabilities: the spec's five sets (bounding, effective,
//! permitted, inheritable, ambient) as bit masks, computed before the
//! process is cloned; [`Caps::apply_bounding`] and [`Caps::apply`] are the
//! system calls the child makes (no allocation there).

use oci_spec::runtime::LinuxCapabilities;

/// Capability names in number order (CAP_CHOWN is 0).
const NAMES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// A capability the agent does not know.
#[derive(Debug, thiserror::Error)]
#[error("unknown capability {0}")]
pub struct UnknownCapability(String);

/// The five sets as masks (bit n is capability n).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Caps {
    /// Bounding set.
    pub bounding: u64,
    /// Effective set.
    pub effective: u64,
    /// Permitted set.
    pub permitted: u64,
    /// Inheritable set.
    pub inheritable: u64,
    /// Ambient set.
    pub ambient: u64,
    /// The highest capability this kernel knows.
    pub last_cap: u32,
}

fn mask(set: &Option<oci_spec::runtime::Capabilities>) -> Result<u64, UnknownCapability> {
    let mut m = 0u64;
    for cap in set.iter().flatten() {
        let name = serde_json::to_value(cap)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let n = NAMES
            .iter()
            .position(|&k| k == name)
            .ok_or(UnknownCapability(name))?;
        m |= 1 << n;
    }
    Ok(m)
}

impl Caps {
    /// The masks for `caps`.
    pub fn from_spec(caps: &LinuxCapabilities) -> Result<Caps, UnknownCapability> {
        let last_cap = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(40);
        Ok(Caps {
            bounding: mask(caps.bounding())?,
            effective: mask(caps.effective())?,
            permitted: mask(caps.permitted())?,
            inheritable: mask(caps.inheritable())?,
            ambient: mask(caps.ambient())?,
            last_cap,
        })
    }

    /// Drops what is not in the bounding set (needs CAP_SETPCAP: call
    /// before changing user). Returns the failing capability on error.
    pub fn apply_bounding(&self) -> Result<(), u32> {
        for cap in 0..=self.last_cap.min(63) {
            if self.bounding & (1 << cap) == 0 {
                // SAFETY: prctl with integer arguments.
                let rc =
                    unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
                if rc < 0 && errno() != libc::EINVAL {
                    return Err(cap);
                }
            }
        }
        Ok(())
    }

    /// Sets effective, permitted and inheritable, then raises the ambient
    /// ones (after the user change, with keep-caps set before it).
    pub fn apply(&self) -> Result<(), u32> {
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Clone, Copy)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        let mut header = Header {
            version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
            pid: 0,
        };
        let split = |m: u64| [m as u32, (m >> 32) as u32];
        let (e, p, i) = (
            split(self.effective),
            split(self.permitted),
            split(self.inheritable),
        );
        let data = [
            Data {
                effective: e[0],
                permitted: p[0],
                inheritable: i[0],
            },
            Data {
                effective: e[1],
                permitted: p[1],
                inheritable: i[1],
            },
        ];
        // SAFETY: capset with a v3 header and two data structs, as the ABI
        // wants; both outlive the call.
        let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
        if rc < 0 {
            return Err(u32::MAX);
        }
        // SAFETY: prctl with integer arguments.
        unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                0,
                0,
                0,
            )
        };
        for cap in 0..=self.last_cap.min(63) {
            if self.ambient & (1 << cap) != 0 {
                // SAFETY: prctl with integer arguments.
                let rc = unsafe {
                    libc::prctl(
                        libc::PR_CAP_AMBIENT,
                        libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                        cap as libc::c_ulong,
                        0,
                        0,
                    )
                };
                if rc < 0 {
                    return Err(cap);
                }
            }
        }
        Ok(())
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// The name of capability `n`, for error messages.
pub fn name(n: u32) -> &'static str {
    NAMES
        .get(n as usize)
        .copied()
        .unwrap_or("the capability sets")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_sets_become_masks() {
        let caps: LinuxCapabilities = serde_json::from_value(serde_json::json!({
            "bounding": ["CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
            "effective": ["CAP_KILL"],
            "ambient": ["CAP_CHECKPOINT_RESTORE"],
        }))
        .unwrap();
        let c = Caps::from_spec(&caps).unwrap();
        assert_eq!(c.bounding, 1 | (1 << 5) | (1 << 10));
        assert_eq!(c.effective, 1 << 5);
        assert_eq!(c.permitted, 0);
        assert_eq!(c.ambient, 1 << 40);
        assert_eq!(name(21), "CAP_SYS_ADMIN");
    }
}
