//! cgroup v2 for containers: one cgroup per container at
//! `<root>/husk/<id>` (root: /sys/fs/cgroup in the guest), with the cpu,
//! cpuset, memory, pids and io controllers enabled where the kernel offers
//! them. The spec's limits become memory.max/low/swap.max, cpu.max/weight,
//! cpuset.cpus/mems and pids.max; values are checked before anything is
//! written, and a value the kernel still refuses is reported, not ignored.
//! Stats come from cpu.stat, memory.current/max/events, pids.current and
//! io.stat. OOM kills are seen by watching memory.events with inotify.

use std::path::{Path, PathBuf};

use husk_protocol::{AgentError, ErrorCode, Stats};
use oci_spec::runtime::LinuxResources;

const CONTROLLERS: &[&str] = &["cpu", "cpuset", "memory", "pids", "io"];

/// A container's cgroup.
#[derive(Debug)]
pub struct Cgroup {
    /// Its directory.
    pub path: PathBuf,
}

fn invalid(msg: String) -> AgentError {
    AgentError::new(ErrorCode::InvalidArgument, msg)
}

fn system(what: String, e: std::io::Error) -> AgentError {
    crate::error::reply(ErrorCode::System, what, &e)
}

/// Enables `CONTROLLERS` (those available) for the children of `dir`.
fn enable_controllers(dir: &Path) {
    let available = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    for c in CONTROLLERS {
        if available.split_whitespace().any(|a| a == *c) {
            // One at a time: one refused controller must not block the rest.
            let _ = std::fs::write(dir.join("cgroup.subtree_control"), format!("+{c}"));
        }
    }
}

/// A cpuset list such as "0-3,7".
fn valid_cpuset(s: &str) -> bool {
    !s.is_empty()
        && s.split(',').all(|part| {
            let mut ends = part.splitn(2, '-');
            ends.all(|n| !n.is_empty() && n.len() <= 5 && n.bytes().all(|b| b.is_ascii_digit()))
        })
}

/// The files to write for `r`, checked; `Err` for values no kernel takes.
fn settings(r: &LinuxResources) -> Result<Vec<(&'static str, String)>, AgentError> {
    let mut out = Vec::new();
    if let Some(m) = r.memory() {
        if let Some(limit) = m.limit() {
            match limit {
                -1 => out.push(("memory.max", "max".to_string())),
                l if l > 0 => out.push(("memory.max", l.to_string())),
                l => return Err(invalid(format!("memory limit {l} is not positive"))),
            }
            if let Some(swap) = m.swap() {
                // OCI's swap is memory + swap; v2 counts swap alone.
                match swap {
                    -1 => out.push(("memory.swap.max", "max".to_string())),
                    s if s >= limit && limit > 0 => {
                        out.push(("memory.swap.max", (s - limit).to_string()))
                    }
                    s => {
                        return Err(invalid(format!(
                            "memory+swap limit {s} is below the memory limit {limit}"
                        )))
                    }
                }
            }
        }
        if let Some(res) = m.reservation() {
            match res {
                -1 => out.push(("memory.low", "max".to_string())),
                r if r >= 0 => out.push(("memory.low", r.to_string())),
                r => return Err(invalid(format!("memory reservation {r} is negative"))),
            }
        }
    }
    if let Some(c) = r.cpu() {
        if c.quota().is_some() || c.period().is_some() {
            let period = c.period().unwrap_or(100_000);
            if !(1_000..=1_000_000).contains(&period) {
                return Err(invalid(format!(
                    "cpu period {period} is outside 1000..=1000000 µs"
                )));
            }
            let quota = match c.quota() {
                None | Some(-1) => "max".to_string(),
                Some(q) if q >= 1_000 => q.to_string(),
                Some(q) => return Err(invalid(format!("cpu quota {q} is below 1000 µs"))),
            };
            out.push(("cpu.max", format!("{quota} {period}")));
        }
        if let Some(shares) = c.shares() {
            if !(2..=262_144).contains(&shares) {
                return Err(invalid(format!("cpu shares {shares} outside 2..=262144")));
            }
            // The conversion runc and crun use.
            let weight = 1 + ((shares - 2) * 9999) / 262_142;
            out.push(("cpu.weight", weight.to_string()));
        }
        for (file, value) in [("cpuset.cpus", c.cpus()), ("cpuset.mems", c.mems())] {
            if let Some(v) = value {
                if !valid_cpuset(v) {
                    return Err(invalid(format!("{file} {v:?} is not a cpu list")));
                }
                out.push((file, v.clone()));
            }
        }
    }
    if let Some(p) = r.pids() {
        match p.limit() {
            l if l <= 0 => out.push(("pids.max", "max".to_string())),
            l => out.push(("pids.max", l.to_string())),
        }
    }
    if let Some(unified) = r.unified() {
        if !unified.is_empty() {
            return Err(AgentError::new(
                ErrorCode::Unsupported,
                "linux.resources.unified is not supported",
            ));
        }
    }
    Ok(out)
}

/// Checks `r` without touching any cgroup.
pub fn check(r: &LinuxResources) -> Result<(), AgentError> {
    settings(r).map(drop)
}

impl Cgroup {
    /// Creates the cgroup of container `id` under `root`.
    pub fn create(root: &Path, id: &str) -> Result<Cgroup, AgentError> {
        enable_controllers(root);
        let parent = root.join("husk");
        match std::fs::create_dir(&parent) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(system(format!("create {}", parent.display()), e)),
        }
        enable_controllers(&parent);
        let path = parent.join(id);
        std::fs::create_dir(&path).map_err(|e| system(format!("create {}", path.display()), e))?;
        Ok(Cgroup { path })
    }

    /// Writes the limits in `r`.
    pub fn apply(&self, r: &LinuxResources) -> Result<(), AgentError> {
        for (file, value) in settings(r)? {
            let path = self.path.join(file);
            if file == "memory.swap.max" && !path.exists() {
                // A kernel without swap accounting has no swap to limit.
                crate::log::debug("no memory.swap.max: the swap limit is moot");
                continue;
            }
            if !path.exists() {
                let controller = file.split('.').next().unwrap_or(file);
                return Err(AgentError::new(
                    ErrorCode::Unsupported,
                    format!("{file}: the {controller} controller is not available in this cgroup"),
                ));
            }
            std::fs::write(&path, &value).map_err(|e| {
                let code = if e.raw_os_error() == Some(libc::EINVAL)
                    || e.raw_os_error() == Some(libc::ERANGE)
                {
                    ErrorCode::InvalidArgument
                } else {
                    ErrorCode::System
                };
                AgentError::new(code, format!("{file} = {value:?}: the kernel refused: {e}"))
            })?;
        }
        Ok(())
    }

    /// Moves `pid` into the cgroup.
    pub fn add(&self, pid: i32) -> Result<(), AgentError> {
        std::fs::write(self.path.join("cgroup.procs"), pid.to_string())
            .map_err(|e| system(format!("add pid {pid} to {}", self.path.display()), e))
    }

    /// The pids in the cgroup.
    pub fn pids(&self) -> Vec<u32> {
        std::fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.path.join(file)).unwrap_or_default()
    }

    fn keyed(&self, file: &str, key: &str) -> u64 {
        self.read(file)
            .lines()
            .find_map(|l| {
                let mut w = l.split_whitespace();
                (w.next() == Some(key)).then(|| w.next().and_then(|v| v.parse().ok()))?
            })
            .unwrap_or(0)
    }

    /// Resource usage (zero for what the kernel does not account here).
    pub fn stats(&self) -> Stats {
        let mut io_read_bytes = 0;
        let mut io_write_bytes = 0;
        for line in self.read("io.stat").lines() {
            for field in line.split_whitespace().skip(1) {
                if let Some(v) = field.strip_prefix("rbytes=") {
                    io_read_bytes += v.parse::<u64>().unwrap_or(0);
                } else if let Some(v) = field.strip_prefix("wbytes=") {
                    io_write_bytes += v.parse::<u64>().unwrap_or(0);
                }
            }
        }
        Stats {
            cpu_usage_usec: self.keyed("cpu.stat", "usage_usec"),
            cpu_user_usec: self.keyed("cpu.stat", "user_usec"),
            cpu_system_usec: self.keyed("cpu.stat", "system_usec"),
            memory_bytes: self.read("memory.current").trim().parse().unwrap_or(0),
            memory_limit_bytes: self.read("memory.max").trim().parse().ok(),
            oom_kills: self.keyed("memory.events", "oom_kill"),
            pids: self.read("pids.current").trim().parse().unwrap_or(0),
            io_read_bytes,
            io_write_bytes,
        }
    }

    /// Kills what is left in the cgroup and removes it.
    pub fn destroy(&self) {
        for _ in 0..100 {
            if std::fs::write(self.path.join("cgroup.kill"), "1").is_err() {
                for pid in self.pids() {
                    // SAFETY: kill(2) with a pid and a constant signal.
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                }
            }
            match std::fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        }
        crate::log::warn(&format!("cannot remove cgroup {}", self.path.display()));
    }

    /// Calls `on_oom` for every new OOM kill until the cgroup is removed
    /// (a thread blocked on inotify; nothing happens without memory.events).
    pub fn watch_oom(&self, on_oom: impl Fn() + Send + 'static) {
        let events = self.path.join("memory.events");
        if !events.exists() {
            return;
        }
        let Ok(path_c) = std::ffi::CString::new(events.as_os_str().as_encoded_bytes()) else {
            return;
        };
        // SAFETY: inotify_init1 with a constant flag.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
        if fd < 0 {
            return;
        }
        // SAFETY: a fresh fd nothing else owns.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
        // SAFETY: a valid path and our inotify fd.
        if unsafe { libc::inotify_add_watch(raw, path_c.as_ptr(), libc::IN_MODIFY) } < 0 {
            return;
        }
        let cg = Cgroup {
            path: self.path.clone(),
        };
        let _ = std::thread::Builder::new()
            .name("husk-agent-oom".into())
            .spawn(move || {
                let mut seen = cg.keyed("memory.events", "oom_kill");
                let mut buf = [0u8; 1024];
                loop {
                    // SAFETY: reading into a buffer of its size from our fd.
                    let n = unsafe { libc::read(raw, buf.as_mut_ptr().cast(), buf.len()) };
                    if n <= 0 || !cg.path.exists() {
                        return;
                    }
                    let now = cg.keyed("memory.events", "oom_kill");
                    if now > seen {
                        seen = now;
                        on_oom();
                    }
                    let _ = &fd;
                }
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resources(json: serde_json::Value) -> LinuxResources {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn limits_become_v2_files() {
        let r = resources(serde_json::json!({
            "memory": {"limit": 67108864, "swap": 134217728},
            "cpu": {"quota": 50000, "period": 100000, "shares": 1024, "cpus": "0-1,3"},
            "pids": {"limit": 32},
        }));
        let s = settings(&r).unwrap();
        assert!(s.contains(&("memory.max", "67108864".into())));
        assert!(s.contains(&("memory.swap.max", "67108864".into())));
        assert!(s.contains(&("cpu.max", "50000 100000".into())));
        assert!(s.contains(&("cpu.weight", "39".into())));
        assert!(s.contains(&("cpuset.cpus", "0-1,3".into())));
        assert!(s.contains(&("pids.max", "32".into())));
    }

    #[test]
    fn impossible_values_are_refused() {
        for bad in [
            serde_json::json!({"memory": {"limit": -5}}),
            serde_json::json!({"memory": {"limit": 0}}),
            serde_json::json!({"cpu": {"quota": 10, "period": 100000}}),
            serde_json::json!({"cpu": {"period": 5}}),
            serde_json::json!({"cpu": {"cpus": "zero"}}),
            serde_json::json!({"cpu": {"shares": 1}}),
        ] {
            let e = check(&resources(bad.clone())).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidArgument, "{bad}");
        }
    }
}
