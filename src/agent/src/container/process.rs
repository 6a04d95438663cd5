//! Cloning a container process and what the child does before execve.
//!
//! The child is made with the raw clone(2) system call (fork semantics, plus
//! the new namespaces) while the reaper's table is locked, so its pid is
//! registered before its exit can be reaped. It then waits for the agent to
//! put it into its cgroup (and write its user namespace maps), joins or
//! sets up the namespaces, mounts, /dev, pivot_root, sysctls, masked and
//! read-only paths, rlimits, finds the executable, and -- for a container's
//! init -- reports "ready" and waits for StartContainer; then umask, user,
//! capabilities, no_new_privs and seccomp, and execve. Every failure is
//! written to a close-on-exec pipe as (step, index, errno), so the agent
//! answers with a clear error; a clean execve closes the pipe instead.
//!
//! Joining a running container (ExecProcess) enters its pid namespace in
//! the calling thread only (setns sets the namespace for that thread's
//! future children), so the clone lands there, and the thread returns to
//! the agent's namespace right after.
//!
//! The child's own code is in [`super::child`]; it allocates nothing, it only
//! uses what [`super::plan`] prepared.

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use husk_protocol::{AgentError, ErrorCode, ProcessRef};

use super::cgroup::Cgroup;
use super::child::{child, ChildFds, Step, STEPS};
use super::plan::Plan;
use crate::reaper::{Exit, Reaper};

/// The fds a child gets for its stdio (the agent keeps the other ends).
pub enum ChildStdio {
    /// stdin, stdout, stderr.
    Pipes(OwnedFd, OwnedFd, OwnedFd),
    /// One terminal for all three, and its path in the agent's /dev/pts.
    Tty(OwnedFd, CString),
}

/// A cloned process, its exit cell, and (for a container's init, until
/// started) the pipes to start it.
pub struct Spawned {
    pub pid: i32,
    pub exit: Arc<Exit>,
    sync: Option<File>,
    start: Option<File>,
}

fn pipe() -> std::io::Result<(File, File)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh fds nothing else owns.
    Ok(unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) })
}

fn sys(what: &str, e: std::io::Error) -> AgentError {
    crate::error::reply(ErrorCode::System, what, &e)
}

fn open_ns(path: &std::path::Path) -> Result<OwnedFd, AgentError> {
    File::open(path).map(OwnedFd::from).map_err(|e| {
        AgentError::new(
            ErrorCode::InvalidArgument,
            format!("namespace {}: {e}", path.display()),
        )
    })
}

/// Clones a process for `plan`, registered with `reaper`; `pidns` is a
/// running container's pid namespace to clone into (else the one `plan`
/// names by path, if any); `join` the namespaces the child enters (fds,
/// CLONE_NEW* types); `maps` the user namespace's uid and gid maps.
#[allow(clippy::too_many_arguments)]
pub fn spawn(
    reaper: &Reaper,
    plan: &Plan,
    who: ProcessRef,
    stdio: ChildStdio,
    cgroup: Option<&Cgroup>,
    pidns: Option<&OwnedFd>,
    join: &[(OwnedFd, libc::c_int)],
    maps: Option<(String, String)>,
) -> Result<Spawned, AgentError> {
    let mut joined: Vec<(OwnedFd, libc::c_int)> = Vec::new();
    // A pid namespace named by path (a pod sharing its sandbox's process
    // namespace) is entered like an exec's: setns applies to children only.
    let mut pidns_by_path = None;
    for (path, flag) in &plan.join {
        if *flag == libc::CLONE_NEWPID {
            pidns_by_path = Some(open_ns(path)?);
        } else {
            joined.push((open_ns(path)?, *flag));
        }
    }
    let pidns = pidns.or(pidns_by_path.as_ref());
    let (sync_r, sync_w) = pipe().map_err(|e| sys("pipe", e))?;
    let (go_r, mut go_w) = pipe().map_err(|e| sys("pipe", e))?;
    let start = if plan.init.is_some() {
        Some(pipe().map_err(|e| sys("pipe", e))?)
    } else {
        None
    };
    let (stdio_fds, tty) = match &stdio {
        ChildStdio::Pipes(i, o, e) => ([i.as_raw_fd(), o.as_raw_fd(), e.as_raw_fd()], None),
        ChildStdio::Tty(t, path) => ([t.as_raw_fd(); 3], Some(path)),
    };
    let join_raw: Vec<(RawFd, libc::c_int)> = join
        .iter()
        .chain(joined.iter())
        .map(|(fd, t)| (fd.as_raw_fd(), *t))
        // The user namespace first: it grants the rights for the others.
        .fold(Vec::new(), |mut v, (fd, t)| {
            if t == libc::CLONE_NEWUSER {
                v.insert(0, (fd, t));
            } else {
                v.push((fd, t));
            }
            v
        });
    let mut keep: Vec<RawFd> = vec![sync_w.as_raw_fd(), go_r.as_raw_fd()];
    keep.extend(start.as_ref().map(|(r, _)| r.as_raw_fd()));
    keep.extend(stdio_fds);
    keep.extend(join_raw.iter().map(|(fd, _)| *fd));
    keep.sort_unstable();
    keep.dedup();
    let fds = ChildFds {
        sync: sync_w.as_raw_fd(),
        go: go_r.as_raw_fd(),
        start: start.as_ref().map(|(r, _)| r.as_raw_fd()),
        stdio: stdio_fds,
        tty,
        join: &join_raw,
        keep: &keep,
    };

    let table = reaper.lock();
    let own_pidns = match pidns {
        Some(target) => {
            let own = File::open("/proc/thread-self/ns/pid")
                .map_err(|e| sys("open own pid namespace", e))?;
            // SAFETY: setns on fds we own; affects only this thread's children.
            if unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWPID) } < 0 {
                return Err(sys(
                    "enter the container's pid namespace",
                    std::io::Error::last_os_error(),
                ));
            }
            Some(own)
        }
        None => None,
    };
    let flags = (plan.clone_flags | libc::SIGCHLD) as libc::c_ulong;
    // SAFETY: clone with a null stack is fork with namespace flags; the
    // child only runs `child`, which makes system calls on prepared data.
    let pid =
        unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) } as i32;
    if pid == 0 {
        // SAFETY: in the child, see above.
        unsafe { child(plan, &fds) }
    }
    let clone_err = std::io::Error::last_os_error();
    if let Some(own) = own_pidns {
        // SAFETY: back to the agent's own pid namespace for this thread.
        if unsafe { libc::setns(own.as_raw_fd(), libc::CLONE_NEWPID) } < 0 {
            crate::log::error("cannot return to the agent's pid namespace");
        }
    }
    if pid < 0 {
        return Err(sys("clone", clone_err));
    }
    // Registering unlocks the table.
    let exit = table.register(pid, who);
    drop(sync_w);
    drop(go_r);
    drop(stdio);
    let mut sync_r = sync_r;
    let start_w = start.map(|(r, w)| {
        drop(r);
        w
    });
    // A child that failed is gone (reaped) before its error is answered,
    // so nothing of it shows in the container's cgroup afterwards; a child
    // stuck in the kernel is not waited for longer than GONE_WAIT.
    let kill = |e: AgentError| {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        if exit.wait_timeout(GONE_WAIT).is_none() {
            crate::log::warn(&format!("process {pid} outlived SIGKILL by {GONE_WAIT:?}"));
        }
        e
    };
    if let Some((uid_map, gid_map)) = maps {
        std::fs::write(format!("/proc/{pid}/uid_map"), uid_map).map_err(|e| {
            kill(AgentError::new(
                ErrorCode::InvalidArgument,
                format!("uid_map: {e}"),
            ))
        })?;
        std::fs::write(format!("/proc/{pid}/gid_map"), gid_map).map_err(|e| {
            kill(AgentError::new(
                ErrorCode::InvalidArgument,
                format!("gid_map: {e}"),
            ))
        })?;
    }
    if let Some(cg) = cgroup {
        cg.add(pid).map_err(kill)?;
    }
    if let Some(adj) = plan.proc.oom_score_adj {
        std::fs::write(format!("/proc/{pid}/oom_score_adj"), adj.to_string())
            .map_err(|e| kill(sys("oom_score_adj", e)))?;
    }
    go_w.write_all(b"g")
        .map_err(|e| kill(sys("start the child", e)))?;
    drop(go_w);
    match read_report(&mut sync_r) {
        Report::Ready if plan.init.is_some() => Ok(Spawned {
            pid,
            exit,
            sync: Some(sync_r),
            start: start_w,
        }),
        Report::Exec if plan.init.is_none() => Ok(Spawned {
            pid,
            exit,
            sync: None,
            start: None,
        }),
        Report::Failed(step, index, errno) => Err(kill(describe(plan, step, index, errno))),
        Report::TimedOut => Err(kill(AgentError::new(
            ErrorCode::System,
            "the process did not finish its set-up in 30 s",
        ))),
        _ => Err(kill(AgentError::new(
            ErrorCode::System,
            "the process died while being set up",
        ))),
    }
}

impl Spawned {
    /// Lets a created container's init run its program.
    pub fn start(&mut self, plan: &Plan) -> Result<(), AgentError> {
        let (Some(mut start), Some(mut sync)) = (self.start.take(), self.sync.take()) else {
            return Err(AgentError::new(
                ErrorCode::FailedPrecondition,
                "already started",
            ));
        };
        start
            .write_all(b"s")
            .map_err(|e| sys("start the container", e))?;
        match read_report(&mut sync) {
            Report::Exec => Ok(()),
            Report::Failed(step, index, errno) => Err(describe(plan, step, index, errno)),
            Report::TimedOut => {
                // SAFETY: kill(2) on our own child.
                unsafe { libc::kill(self.pid, libc::SIGKILL) };
                Err(AgentError::new(
                    ErrorCode::System,
                    "the process did not exec in 30 s",
                ))
            }
            _ => Err(AgentError::new(
                ErrorCode::System,
                "the process died before execve",
            )),
        }
    }
}

enum Report {
    Ready,
    /// The pipe closed: execve succeeded.
    Exec,
    Failed(u32, u32, i32),
    Garbage,
    TimedOut,
}

/// How long a child may take to set up or to exec before the agent gives
/// up on it (a mount that hangs must not hold the container table forever).
const CHILD_TIMEOUT_MS: libc::c_int = 30_000;

/// How long a failed child killed with SIGKILL may take to be reaped
/// before its error is answered anyway.
const GONE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

fn read_report(r: &mut File) -> Report {
    let mut buf = [0u8; 12];
    let mut got = 0;
    while got < buf.len() {
        let mut pfd = libc::pollfd {
            fd: r.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one pollfd we own.
        let n = unsafe { libc::poll(&mut pfd, 1, CHILD_TIMEOUT_MS) };
        if n == 0 {
            return Report::TimedOut;
        }
        if n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return Report::Garbage;
        }
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return Report::Garbage,
        }
    }
    if got == 0 {
        return Report::Exec;
    }
    if got < buf.len() {
        return Report::Garbage;
    }
    let word = |i: usize| {
        let mut w = [0u8; 4];
        w.copy_from_slice(&buf[i..i + 4]);
        w
    };
    let (step, index, errno) = (
        u32::from_ne_bytes(word(0)),
        u32::from_ne_bytes(word(4)),
        i32::from_ne_bytes(word(8)),
    );
    if step == Step::Ready as u32 {
        Report::Ready
    } else {
        Report::Failed(step, index, errno)
    }
}

/// The error reply for a failed step.
fn describe(plan: &Plan, step: u32, index: u32, errno: i32) -> AgentError {
    let e = std::io::Error::from_raw_os_error(errno);
    let i = index as usize;
    let init = plan.init.as_ref();
    let arg0 = plan
        .proc
        .argv
        .first()
        .map(|a| a.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mount_dest = || {
        init.and_then(|p| p.mounts.get(i))
            .map(|m| m.destination.clone())
            .unwrap_or_default()
    };
    let invalid = |m: String| AgentError::new(ErrorCode::InvalidArgument, m);
    let system = |m: String| AgentError::new(ErrorCode::System, m);
    match STEPS.get(step as usize).copied() {
        Some(Step::Lookup) => invalid(format!(
            "executable {arg0:?} not found in the container (PATH searched): {e}"
        )),
        Some(Step::Exec) => invalid(format!("execve {arg0:?}: {e}")),
        Some(Step::Cwd) => invalid(format!(
            "working directory {:?}: {e}",
            plan.proc.cwd.to_string_lossy()
        )),
        Some(Step::Mkdir) => system(format!("create mount point {}: {e}", mount_dest())),
        Some(Step::Mount) => system(format!("mount {}: {e}", mount_dest())),
        Some(Step::Remount) => system(format!("remount {}: {e}", mount_dest())),
        Some(Step::MountPropagation) => system(format!("propagation of {}: {e}", mount_dest())),
        Some(Step::Device) => system(format!(
            "create device {}: {e}",
            init.and_then(|p| p.devices.get(i))
                .map(|d| d.path.as_str())
                .unwrap_or("")
        )),
        Some(Step::Sysctl) => invalid(format!(
            "sysctl {}: {e}",
            init.and_then(|p| p.sysctls.get(i))
                .map(|s| s.0.as_str())
                .unwrap_or("")
        )),
        Some(Step::Rlimit) => invalid(format!(
            "{}: {e}",
            plan.proc
                .rlimits
                .get(i)
                .map(|r| r.0.as_str())
                .unwrap_or("rlimit")
        )),
        Some(Step::Bounding) | Some(Step::Capabilities) => {
            system(format!("{}: {e}", super::caps::name(index)))
        }
        Some(Step::Uid) => invalid(format!("setuid {}: {e}", plan.proc.uid)),
        Some(Step::Gid) => invalid(format!("setgid {}: {e}", plan.proc.gid)),
        Some(Step::Seccomp) => invalid(format!("install the seccomp filter: {e}")),
        Some(s) => system(format!(
            "container set-up failed at {s:?} (item {index}): {e}"
        )),
        None => system(format!("container set-up failed: {e}")),
    }
}
