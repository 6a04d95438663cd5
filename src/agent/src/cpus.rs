//! vCPUs online and offline, through sysfs: the VM is built with the
//! most vCPUs its pod may get, the guest boots with some of them
//! (`maxcpus=`) and the others wait parked until the host asks for them
//! (SetOnlineCpus). The lowest-numbered are kept online: vCPU 0 always,
//! the others brought up in order and taken down from the top.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use husk_protocol::{AgentError, ErrorCode};

/// Where the guest kernel lists its CPUs.
pub const SYSFS_CPUS: &str = "/sys/devices/system/cpu";

/// Why the online vCPUs could not be set.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// A sysfs file could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A CPU list did not parse.
    #[error("{} holds {text:?}, not a CPU list", path.display())]
    List {
        /// The file.
        path: PathBuf,
        /// What it held.
        text: String,
    },
    /// More or fewer than the guest can have.
    #[error("{asked} vCPUs online asked, the guest has {present} (at least 1)")]
    OutOfRange {
        /// What was asked.
        asked: u32,
        /// What the guest has.
        present: u32,
    },
    /// The kernel refused to bring a vCPU up or down.
    #[error("cannot bring vCPU {cpu} {}", if *online { "online" } else { "offline" })]
    Write {
        /// The vCPU.
        cpu: u32,
        /// Up or down.
        online: bool,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl CpuError {
    /// The protocol's code for it.
    pub fn code(&self) -> ErrorCode {
        match self {
            CpuError::OutOfRange { .. } => ErrorCode::InvalidArgument,
            _ => ErrorCode::System,
        }
    }
}

impl From<CpuError> for AgentError {
    fn from(e: CpuError) -> AgentError {
        crate::error::reply_from(e.code(), &e)
    }
}

/// The CPUs of a list such as `0-3,6` (sysfs' `present`, `online`).
fn parse_list(path: &Path, text: &str) -> Result<BTreeSet<u32>, CpuError> {
    let bad = || CpuError::List {
        path: path.to_path_buf(),
        text: text.to_string(),
    };
    let mut cpus = BTreeSet::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let (lo, hi) = match part.split_once('-') {
            Some((lo, hi)) => (lo, hi),
            None => (part, part),
        };
        let lo: u32 = lo.parse().map_err(|_| bad())?;
        let hi: u32 = hi.parse().map_err(|_| bad())?;
        // No guest has more than husk's 254 vCPUs: a longer range is junk.
        if lo > hi || hi >= 1024 {
            return Err(bad());
        }
        cpus.extend(lo..=hi);
    }
    Ok(cpus)
}

fn read_list(path: &Path) -> Result<BTreeSet<u32>, CpuError> {
    let text = std::fs::read_to_string(path).map_err(|source| CpuError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_list(path, &text)
}

/// Brings the lowest `want` of the vCPUs under `root` (sysfs'
/// /sys/devices/system/cpu) online and the others offline; returns the
/// vCPUs online afterwards and those present.
pub fn set_online(root: &Path, want: u32) -> Result<(u32, u32), CpuError> {
    let present = read_list(&root.join("present"))?;
    let count = present.len() as u32;
    if want == 0 || want > count {
        return Err(CpuError::OutOfRange {
            asked: want,
            present: count,
        });
    }
    let online = read_list(&root.join("online"))?;
    let (up, down): (Vec<u32>, Vec<u32>) = {
        let mut up = Vec::new();
        let mut down = Vec::new();
        for (i, cpu) in present.iter().enumerate() {
            let wanted = (i as u32) < want;
            if wanted && !online.contains(cpu) {
                up.push(*cpu);
            } else if !wanted && online.contains(cpu) {
                down.push(*cpu);
            }
        }
        (up, down)
    };
    let set = |cpu: u32, on: bool| {
        std::fs::write(
            root.join(format!("cpu{cpu}/online")),
            if on { "1" } else { "0" },
        )
        .map_err(|source| CpuError::Write {
            cpu,
            online: on,
            source,
        })
    };
    for cpu in up {
        set(cpu, true)?;
    }
    for cpu in down.into_iter().rev() {
        set(cpu, false)?;
    }
    let now = read_list(&root.join("online"))?;
    Ok((now.len() as u32, count))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sysfs stand-in: `present` and `online` lists and each vCPU's
    /// `online` file (not cpu0's, as on x86), and a writer that keeps the
    /// `online` list in step, as the kernel does.
    struct FakeSysfs(tempfile::TempDir);

    impl FakeSysfs {
        fn new(present: u32, online: &[u32]) -> FakeSysfs {
            let d = tempfile::tempdir().unwrap();
            std::fs::write(d.path().join("present"), format!("0-{}\n", present - 1)).unwrap();
            for cpu in 1..present {
                let dir = d.path().join(format!("cpu{cpu}"));
                std::fs::create_dir(&dir).unwrap();
                let on = online.contains(&cpu);
                std::fs::write(dir.join("online"), if on { "1\n" } else { "0\n" }).unwrap();
            }
            let f = FakeSysfs(d);
            f.sync();
            f
        }

        /// Rewrites the `online` list from the vCPUs' files.
        fn sync(&self) {
            let mut on = vec![0u32];
            for e in std::fs::read_dir(self.0.path()).unwrap() {
                let e = e.unwrap();
                let name = e.file_name().into_string().unwrap();
                if let Some(n) = name.strip_prefix("cpu") {
                    let v = std::fs::read_to_string(e.path().join("online")).unwrap();
                    if v.trim() == "1" {
                        on.push(n.parse().unwrap());
                    }
                }
            }
            on.sort();
            let list: Vec<String> = on.iter().map(|c| c.to_string()).collect();
            std::fs::write(self.0.path().join("online"), list.join(",")).unwrap();
        }
    }

    #[test]
    fn lists_parse_as_the_kernel_writes_them() {
        let p = Path::new("x");
        assert_eq!(
            parse_list(p, "0-2,5\n").unwrap(),
            BTreeSet::from([0, 1, 2, 5])
        );
        assert_eq!(parse_list(p, "0").unwrap(), BTreeSet::from([0]));
        for bad in ["a", "3-1", "0-99999", "1-"] {
            assert!(parse_list(p, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_lowest_vcpus_go_online_and_the_highest_offline() {
        let fs = FakeSysfs::new(4, &[]);
        // Each write lands in the vCPU's file; the list follows on sync.
        set_online(fs.0.path(), 3).unwrap();
        fs.sync();
        assert_eq!(
            std::fs::read_to_string(fs.0.path().join("online")).unwrap(),
            "0,1,2"
        );
        set_online(fs.0.path(), 1).unwrap();
        fs.sync();
        assert_eq!(
            std::fs::read_to_string(fs.0.path().join("online")).unwrap(),
            "0"
        );
        let (online, present) = set_online(fs.0.path(), 1).unwrap();
        assert_eq!((online, present), (1, 4));
    }

    #[test]
    fn more_than_present_or_none_is_refused() {
        let fs = FakeSysfs::new(2, &[1]);
        for want in [0, 3] {
            let e = set_online(fs.0.path(), want).unwrap_err();
            assert!(matches!(e, CpuError::OutOfRange { present: 2, .. }), "{e}");
            assert_eq!(e.code(), ErrorCode::InvalidArgument);
        }
    }
}
