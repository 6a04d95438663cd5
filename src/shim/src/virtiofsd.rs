//! The pod's virtiofsd: the virtio-fs project's daemon serving the pod's
//! share (crate::share) to husk's vhost-user-fs device, one per pod, in
//! its own namespace sandbox, in the pod's cgroup. Its pid is recorded
//! for a cleanup after a shim crash; a watcher notices its death, and a
//! death the shim did not ask for ends the pod (its volumes are gone).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::pod::PodDir;

/// Why virtiofsd could not be started.
#[derive(Debug, thiserror::Error)]
pub enum VirtiofsdError {
    /// The binary could not be run.
    #[error("cannot start virtiofsd ({}): install it or set virtiofsd = \"PATH\" in the shim's configuration (volumes = \"copy\" copies volumes instead)", path.display())]
    Spawn {
        /// The binary.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// It ended before it listened.
    #[error("virtiofsd ended during start ({status}): {log}")]
    Ended {
        /// How.
        status: String,
        /// The end of its log.
        log: String,
    },
    /// It did not listen in time.
    #[error("virtiofsd did not listen on {} within {secs} s", socket.display())]
    Timeout {
        /// Its socket.
        socket: PathBuf,
        /// The time it had.
        secs: u64,
    },
    /// A file or process operation around it failed.
    #[error("cannot {what}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VirtiofsdError {
    let what = what.into();
    move |source| VirtiofsdError::Io { what, source }
}

/// How long virtiofsd may take to listen.
const START: Duration = Duration::from_secs(10);

/// The pod's virtiofsd's socket.
pub fn socket(dir: &PodDir) -> PathBuf {
    dir.run_dir().join("fs.sock")
}

/// Where its pid is recorded.
fn pid_file(dir: &PodDir) -> PathBuf {
    dir.0.join("virtiofsd.pid")
}

/// Its log (what it says before it serves, and its errors).
pub fn log(dir: &PodDir) -> PathBuf {
    dir.0.join("virtiofsd.log")
}

/// How virtiofsd ended, as the watcher saw it.
#[derive(Debug, Default)]
struct End {
    /// The shim stopped it.
    asked: bool,
    /// How it ended.
    how: Option<String>,
}

/// A running virtiofsd: killed (and waited for) when stopped or dropped.
#[derive(Debug)]
pub struct Virtiofsd {
    pid: u32,
    /// A pidfd: signals reach this process, never a later one with its pid.
    pidfd: Option<OwnedFd>,
    child: Option<Child>,
    end: Arc<Mutex<End>>,
    watcher: Option<std::thread::JoinHandle<()>>,
}

/// pidfd_open(2); None where the kernel has none (before 5.3).
fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    // SAFETY: a non-negative result is a descriptor nothing else owns.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

impl Virtiofsd {
    /// Starts `binary` serving `served` on the pod's socket, in `cgroup`
    /// when given, and waits until it listens. The socket is made
    /// `owner`'s (a jailed husk's uid and group) so husk can connect.
    pub fn start(
        binary: &Path,
        dir: &PodDir,
        served: &Path,
        cgroup: Option<&Path>,
        owner: Option<(u32, u32)>,
    ) -> Result<Virtiofsd, VirtiofsdError> {
        let sock = socket(dir);
        let _ = std::fs::remove_file(&sock);
        let log_file = crate::private::file(&log(dir))
            .map_err(io(format!("create {}", log(dir).display())))?;
        let mut cmd = Command::new(binary);
        cmd.arg(format!("--socket-path={}", sock.display()))
            .arg(format!("--shared-dir={}", served.display()))
            // Its own mount, pid and network namespaces, pivoted into the
            // share; the share's entries are its submounts, announced so
            // the guest sees each as its own file system.
            .args([
                "--sandbox=namespace",
                "--announce-submounts",
                "--cache=auto",
                "--log-level=error",
            ])
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().map_err(io("dup virtiofsd's log"))?)
            .stderr(log_file);
        let child = cmd.spawn().map_err(|source| VirtiofsdError::Spawn {
            path: binary.to_path_buf(),
            source,
        })?;
        let pid = child.id();
        let mut v = Virtiofsd {
            pid,
            pidfd: pidfd_open(pid),
            child: Some(child),
            end: Arc::default(),
            watcher: None,
        };
        if let Some(cgroup) = cgroup {
            let procs = cgroup.join("cgroup.procs");
            std::fs::write(&procs, pid.to_string())
                .map_err(io(format!("move virtiofsd into {}", procs.display())))?;
        }
        std::fs::write(pid_file(dir), pid.to_string())
            .map_err(io(format!("write {}", pid_file(dir).display())))?;
        let deadline = Instant::now() + START;
        while !sock.exists() {
            if let Some(c) = v.child.as_mut() {
                if let Some(status) = c.try_wait().map_err(io("wait for virtiofsd"))? {
                    v.child = None;
                    return Err(VirtiofsdError::Ended {
                        status: status.to_string(),
                        log: crate::vm::log_tail(&log(dir)),
                    });
                }
            }
            if Instant::now() >= deadline {
                return Err(VirtiofsdError::Timeout {
                    socket: sock,
                    secs: START.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&sock, Some(uid), Some(gid))
                .map_err(io(format!("chown {}", sock.display())))?;
        }
        Ok(v)
    }

    /// Watches it from now on: a death the shim did not ask for (see
    /// [`Virtiofsd::stop`]) calls `died` with how it ended. virtiofsd
    /// exits 0 when its frontend hangs up (husk exited): that is husk's
    /// end, noticed as such, not a death of virtiofsd's.
    pub fn watch(&mut self, died: impl FnOnce(&str) + Send + 'static) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let end = self.end.clone();
        let watcher = std::thread::Builder::new()
            .name("shim-virtiofsd".into())
            .spawn(move || {
                let (how, failed) = match child.wait() {
                    Ok(status) => (status.to_string(), !status.success()),
                    Err(e) => (format!("cannot wait for virtiofsd: {e}"), true),
                };
                let asked = {
                    let mut end = end.lock().unwrap_or_else(|e| e.into_inner());
                    end.how = failed.then(|| how.clone());
                    end.asked
                };
                if failed && !asked {
                    died(&how);
                }
            });
        match watcher {
            Ok(w) => self.watcher = Some(w),
            Err(e) => tracing::warn!(error = %e, "cannot watch virtiofsd"),
        }
    }

    /// How it failed on its own, if it did.
    pub fn died(&self) -> Option<String> {
        let end = self.end.lock().unwrap_or_else(|e| e.into_inner());
        end.how.clone().filter(|_| !end.asked)
    }

    /// Kills it (its guest is gone or going) and waits for it.
    pub fn stop(&mut self) {
        self.end.lock().unwrap_or_else(|e| e.into_inner()).asked = true;
        match &self.pidfd {
            // SAFETY: pidfd_send_signal on this process's own pidfd, no
            // siginfo, no flags.
            Some(fd) => unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd.as_raw_fd(),
                    libc::SIGKILL,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                );
            },
            None => {
                // Not yet reaped (waited for below or by the watcher), so
                // the pid is still this process's.
                if let Ok(pid) = libc::pid_t::try_from(self.pid) {
                    // SAFETY: kill(2) of our own unreaped child.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
        if let Some(w) = self.watcher.take() {
            let _ = w.join();
        }
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Kills the virtiofsd recorded in `dir` (after a shim crash) if it is
/// still the one serving the pod's socket.
pub fn kill_recorded(dir: &PodDir) {
    let Some(pid) = std::fs::read_to_string(pid_file(dir))
        .ok()
        .and_then(|t| t.trim().parse::<libc::pid_t>().ok())
        .filter(|&p| p > 1)
    else {
        return;
    };
    let want = format!("--socket-path={}", socket(dir).display());
    let ours = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| c.split(|&b| b == 0).any(|a| a == want.as_bytes()))
        .unwrap_or(false);
    if ours {
        // SAFETY: kill(2) of the virtiofsd serving this pod's socket.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(t: &Path) -> PodDir {
        let dir = PodDir(t.join("pod"));
        std::fs::create_dir_all(dir.run_dir()).unwrap();
        dir
    }

    /// A stand-in virtiofsd: a shell that makes its socket's path (a
    /// plain file is enough for the start's wait) and sleeps. The real one
    /// runs in the node VM's tests (tests/cri.rs).
    fn fake(t: &Path, body: &str) -> PathBuf {
        let p = t.join("virtiofsd");
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        p
    }

    const LISTENS: &str = r#"for a; do case $a in --socket-path=*) : > "${a#--socket-path=}";; esac; done; while :; do sleep 0.1; done"#;

    #[test]
    fn a_death_not_asked_for_is_reported_and_a_stop_is_not() {
        let t = tempfile::tempdir().unwrap();
        let dir = pod(t.path());
        let bin = fake(t.path(), LISTENS);
        let mut v = Virtiofsd::start(&bin, &dir, t.path(), None, None).unwrap();
        assert!(socket(&dir).exists());
        let (tx, rx) = std::sync::mpsc::channel();
        v.watch(move |how| tx.send(how.to_string()).unwrap());
        kill_recorded(&dir);
        let how = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(how.contains("signal: 9"), "{how}");
        assert_eq!(v.died().as_deref(), Some(how.as_str()));

        let mut v = Virtiofsd::start(&bin, &dir, t.path(), None, None).unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        v.watch(move |how| tx.send(how.to_string()).unwrap());
        let pid = v.pid;
        v.stop();
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
        assert!(v.died().is_none());
        // Killed and reaped.
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
    }

    #[test]
    fn an_end_after_its_frontend_hung_up_is_not_a_death() {
        let t = tempfile::tempdir().unwrap();
        let dir = pod(t.path());
        // virtiofsd's exit when husk goes: status 0.
        let bin = fake(
            t.path(),
            r#"for a; do case $a in --socket-path=*) : > "${a#--socket-path=}";; esac; done; sleep 0.2; exit 0"#,
        );
        let mut v = Virtiofsd::start(&bin, &dir, t.path(), None, None).unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        v.watch(move |how| tx.send(how.to_string()).unwrap());
        assert!(rx.recv_timeout(Duration::from_secs(2)).is_err());
        assert!(v.died().is_none());
    }

    #[test]
    fn one_that_ends_or_never_listens_is_a_clear_error() {
        let t = tempfile::tempdir().unwrap();
        let dir = pod(t.path());
        let bin = fake(t.path(), "echo 'no such share' >&2; exit 3");
        let e = Virtiofsd::start(&bin, &dir, t.path(), None, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("exit status: 3") && e.contains("no such share"),
            "{e}"
        );
        let e = Virtiofsd::start(&t.path().join("absent"), &dir, t.path(), None, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("volumes = \"copy\""), "{e}");
    }
}
