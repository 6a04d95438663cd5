//! The virtiofsd processes `husk run` starts: one per `--volume`, and one
//! per share device of a template's guest (on an empty directory: the
//! template's guest never mounts it, and a clone connects to its run's
//! own). Each serves one directory on a socket, in its namespace sandbox;
//! all are killed and waited for when their [`Virtiofsds`] goes.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmm::config::FsConfig;

/// How long a virtiofsd has to listen on its socket.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a virtiofsd could not be started.
#[derive(Debug, thiserror::Error)]
pub enum VirtiofsdError {
    /// The directory to share is not one.
    #[error("volume {}: {reason}", .path.display())]
    Share {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The process did not start, or could not be watched.
    #[error("cannot start virtiofsd ({}) for {}", .virtiofsd.display(), .share.display())]
    Spawn {
        /// The virtiofsd binary.
        virtiofsd: PathBuf,
        /// The directory it was to share.
        share: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It exited before it listened.
    #[error("virtiofsd for {} ended with {status}", .share.display())]
    Ended {
        /// The directory it was to share.
        share: PathBuf,
        /// How it ended.
        status: std::process::ExitStatus,
    },
    /// It did not listen in time.
    #[error("virtiofsd for {} did not listen in {}s", .share.display(), LISTEN_TIMEOUT.as_secs())]
    Timeout {
        /// The directory it was to share.
        share: PathBuf,
    },
}

/// The virtiofsd to run: `given` (the flag or $HUSK_VIRTIOFSD), else one
/// on PATH, else Debian's.
pub fn find(given: Option<PathBuf>) -> PathBuf {
    given
        .or_else(|| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|d| d.join("virtiofsd"))
                    .find(|p| p.is_file())
            })
        })
        .unwrap_or_else(|| PathBuf::from("/usr/libexec/virtiofsd"))
}

/// Running virtiofsd processes, killed and waited for when this is
/// dropped (each would end with its VM anyway: virtiofsd serves one
/// frontend).
#[derive(Default)]
pub struct Virtiofsds(Vec<Child>);

impl Drop for Virtiofsds {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One directory to share, and whether virtiofsd refuses writes to it.
pub struct Share<'a> {
    /// The host directory.
    pub dir: &'a Path,
    /// Served read-only (`--readonly`).
    pub read_only: bool,
}

/// Starts one virtiofsd per share, share N on `dir/volN.sock` with tag
/// and device id `volN` (what the agent's binds name); returns them and
/// the devices to give the VM. Each is waited for until it listens.
pub fn start(
    shares: &[Share<'_>],
    virtiofsd: &Path,
    dir: &Path,
) -> Result<(Virtiofsds, Vec<FsConfig>), VirtiofsdError> {
    let mut running = Virtiofsds::default();
    let mut devices = Vec::new();
    for (i, s) in shares.iter().enumerate() {
        let share_err = |reason: String| VirtiofsdError::Share {
            path: s.dir.to_path_buf(),
            reason,
        };
        let host = s.dir.canonicalize().map_err(|e| share_err(e.to_string()))?;
        if !host.is_dir() {
            return Err(share_err("not a directory".into()));
        }
        let tag = format!("vol{i}");
        let socket = dir.join(format!("{tag}.sock"));
        let mut cmd = Command::new(virtiofsd);
        cmd.arg(format!("--socket-path={}", socket.display()))
            .arg(format!("--shared-dir={}", host.display()))
            .args(["--sandbox=namespace", "--cache=auto", "--log-level=error"])
            .stdin(Stdio::null());
        if s.read_only {
            cmd.arg("--readonly");
        }
        // Killed with husk, however husk ends: a SIGTERM or SIGKILL that
        // comes before the VM's signal handling is in place (while a
        // template is made) never runs `Virtiofsds`' drop. The death
        // signal follows the thread that spawns, which for both callers
        // is `husk run`'s main thread, alive as long as husk.
        let husk = std::process::id();
        // SAFETY: the closure runs in the child between fork and exec and
        // calls only async-signal-safe functions (prctl, getppid), touching
        // no memory but its own copy of `husk`.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // husk ended before the prctl: nobody would kill this one.
                if u32::try_from(libc::getppid()).ok() != Some(husk) {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            })
        };
        let spawn_err = |source| VirtiofsdError::Spawn {
            virtiofsd: virtiofsd.to_path_buf(),
            share: host.clone(),
            source,
        };
        running.0.push(cmd.spawn().map_err(&spawn_err)?);
        let deadline = Instant::now() + LISTEN_TIMEOUT;
        while !socket.exists() {
            if let Some(child) = running.0.last_mut() {
                if let Some(status) = child.try_wait().map_err(&spawn_err)? {
                    return Err(VirtiofsdError::Ended {
                        share: host,
                        status,
                    });
                }
            }
            if Instant::now() > deadline {
                return Err(VirtiofsdError::Timeout { share: host });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        devices.push(FsConfig {
            id: tag.clone(),
            tag,
            socket,
            num_queues: 1,
            queue_size: vmm::config::DEFAULT_FS_QUEUE_SIZE,
            // virtiofsd never maps guest memory, and a guest restored
            // from a template maps its memory file private.
            relay: true,
        });
    }
    Ok((running, devices))
}
