//! What the jailer does to its own process: closes inherited descriptors,
//! joins a network namespace, optionally forks into a new pid namespace,
//! drops to the target uid/gid with no capabilities (bounding and ambient
//! sets cleared, no_new_privs set, the result verified), and finally execs
//! husk with a minimal environment.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};

use crate::error::{Error, Result};

/// Closes every descriptor >= 3 except `keep`, and makes sure the kept ones
/// survive exec (FD_CLOEXEC cleared). Refuses a `keep` that is not open.
pub fn close_inherited_fds(keep: &[i32]) -> Result<()> {
    for &fd in keep {
        // SAFETY: F_GETFD on any integer is harmless; -1 means not open.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags < 0 {
            return Err(Error::BadKeepFd(fd));
        }
        // SAFETY: as above, on a descriptor we know is open.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) } < 0 {
            return Err(Error::last_os("clear FD_CLOEXEC on a kept descriptor"));
        }
    }
    // Read the whole list first: the directory's own descriptor is in it.
    let fds: Vec<i32> = fs::read_dir("/proc/self/fd")
        .map_err(Error::path("list open descriptors in", "/proc/self/fd"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    for fd in fds {
        if fd >= 3 && !keep.contains(&fd) {
            // SAFETY: closing a descriptor this process inherited and no
            // Rust object owns (the read_dir handle is already dropped, so
            // its descriptor fails with EBADF, which is ignored).
            unsafe { libc::close(fd) };
        }
    }
    Ok(())
}

/// Joins the network namespace at `path` (e.g. /var/run/netns/NAME).
pub fn join_netns(path: &Path) -> Result<()> {
    let f = fs::File::open(path).map_err(Error::path("open network namespace", path))?;
    // SAFETY: f is an open descriptor; setns only reads it.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(Error::last_os_path("join network namespace", path));
    }
    Ok(())
}

/// The signals husk stops cleanly on; with a new pid namespace the jailer
/// passes them on to husk.
const FORWARDED: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// husk's pid (the jailer's child) for the forwarding handler; 0 until set.
static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let child = CHILD.load(Ordering::Relaxed);
    if child > 0 {
        // SAFETY: kill is async-signal-safe; child is our own child's pid
        // (never 0 or negative, which would signal a process group).
        unsafe { libc::kill(child, sig) };
    }
}

/// Blocks (`how` = SIG_BLOCK) or unblocks the forwarded signals.
fn mask_forwarded(how: libc::c_int) -> Result<()> {
    // SAFETY: set is a local sigset_t, initialised by sigemptyset before
    // use; sigprocmask reads it and writes no old set (NULL).
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in FORWARDED {
            libc::sigaddset(&mut set, sig);
        }
        if libc::sigprocmask(how, &set, std::ptr::null_mut()) != 0 {
            return Err(Error::last_os("sigprocmask"));
        }
    }
    Ok(())
}

/// Enters a new pid namespace: the jailer forks, the child (pid 1 there)
/// returns to exec husk and dies with the jailer (PDEATHSIG); the parent
/// passes SIGTERM, SIGINT and SIGHUP on to it, waits, and exits with its
/// status. Returns only in the child.
pub fn enter_new_pid_ns(uid: u32, gid: u32) -> Result<()> {
    // SAFETY: unshare takes flags only.
    if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
        return Err(Error::last_os("unshare pid namespace"));
    }
    // Blocked across the fork: a stop signal that comes before the parent
    // can forward it waits instead of killing the jailer (and, through
    // PDEATHSIG, husk without a clean stop).
    mask_forwarded(libc::SIG_BLOCK)?;
    // SAFETY: the jailer is single-threaded, so the child is a complete
    // copy and may go on running ordinary code until it execs.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(Error::last_os("fork into the new pid namespace"));
    }
    if pid == 0 {
        // The signal mask survives exec: husk must get its signals.
        mask_forwarded(libc::SIG_UNBLOCK)?;
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } != 0 {
            return Err(Error::last_os("set the parent-death signal"));
        }
        return Ok(());
    }
    CHILD.store(pid, Ordering::Relaxed);
    for sig in FORWARDED {
        // SAFETY: forward is an extern "C" fn(c_int) that only calls the
        // async-signal-safe kill.
        if unsafe { libc::signal(sig, forward as *const () as libc::sighandler_t) } == libc::SIG_ERR
        {
            return Err(Error::last_os("install a signal handler"));
        }
    }
    mask_forwarded(libc::SIG_UNBLOCK)?;
    // The parent: drop privileges too (it has nothing left to do as root),
    // then wait and mirror the child's end. If dropping fails, the error
    // ends the jailer and PDEATHSIG ends the child.
    drop_privileges(uid, gid)?;
    let mut status = 0;
    loop {
        // SAFETY: status is a valid out pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        if r < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            std::process::exit(125);
        }
    }
    if libc::WIFEXITED(status) {
        std::process::exit(libc::WEXITSTATUS(status));
    }
    std::process::exit(128 + libc::WTERMSIG(status));
}

const CAP_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn capget() -> Result<[CapData; 2]> {
    let mut hdr = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: hdr and data are valid, correctly sized v3 structures.
    if unsafe { libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) } != 0 {
        return Err(Error::last_os("capget"));
    }
    Ok(data)
}

/// Drops to uid/gid with no capabilities at all: clears the bounding set
/// (needs CAP_SETPCAP, so before the uid changes) and the ambient set,
/// sets the groups to none, then gid and uid (real, effective, saved),
/// clears the remaining sets explicitly (a uid of 0 would keep them), sets
/// no_new_privs, and checks that nothing is left.
pub fn drop_privileges(uid: u32, gid: u32) -> Result<()> {
    for cap in 0..64 {
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
                break; // past the last capability this kernel knows
            }
            return Err(Error::last_os("drop a capability from the bounding set"));
        }
    }
    // SAFETY: prctl with integer arguments.
    if unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    } != 0
    {
        return Err(Error::last_os("clear the ambient capabilities"));
    }
    // SAFETY: a zero-length list; the pointer is not read.
    if unsafe { libc::setgroups(0, std::ptr::null()) } != 0 {
        return Err(Error::last_os("setgroups([])"));
    }
    // SAFETY: integer arguments.
    if unsafe { libc::setresgid(gid, gid, gid) } != 0 {
        return Err(Error::last_os("setresgid"));
    }
    // SAFETY: integer arguments.
    if unsafe { libc::setresuid(uid, uid, uid) } != 0 {
        return Err(Error::last_os("setresuid"));
    }
    let mut hdr = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let none = [CapData::default(); 2];
    // SAFETY: hdr and none are valid, correctly sized v3 structures.
    if unsafe { libc::syscall(libc::SYS_capset, &mut hdr, none.as_ptr()) } != 0 {
        return Err(Error::last_os("capset (clear all)"));
    }
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(Error::last_os("set no_new_privs"));
    }
    let left = capget()?;
    if left
        .iter()
        .any(|d| d.effective | d.permitted | d.inheritable != 0)
    {
        return Err(Error::CapsRemain(format!("{left:?}")));
    }
    // SAFETY: prctl with integer arguments.
    if (0..64).any(|cap| unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap, 0, 0, 0) } == 1) {
        return Err(Error::CapsRemain("the bounding set is not empty".into()));
    }
    let (mut r, mut e, mut s) = (0, 0, 0);
    // SAFETY: three valid out pointers.
    unsafe { libc::getresuid(&mut r, &mut e, &mut s) };
    if (r, e, s) != (uid, uid, uid) {
        return Err(Error::CapsRemain(format!(
            "uids are {r}/{e}/{s}, not {uid}"
        )));
    }
    Ok(())
}

fn cstring(s: &[u8], what: &'static str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::NulByte { what: what.into() })
}

/// Replaces this process with `exec` (a path inside the jail), argv[0] its
/// file name, with only `env` in the environment. Returns only on failure.
pub fn exec(exec: &Path, args: &[String], env: &[(String, String)]) -> Error {
    let run = || -> Result<()> {
        let path = cstring(exec.as_os_str().as_bytes(), "the exec path")?;
        let argv0 = exec.file_name().map_or(&b"husk"[..], |n| n.as_bytes());
        let argv: Vec<CString> = std::iter::once(cstring(argv0, "an argument"))
            .chain(args.iter().map(|a| cstring(a.as_bytes(), "an argument")))
            .collect::<Result<_>>()?;
        let envp: Vec<CString> = env
            .iter()
            .map(|(k, v)| cstring(format!("{k}={v}").as_bytes(), "an environment entry"))
            .collect::<Result<_>>()?;
        let mut argv_p: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        argv_p.push(std::ptr::null());
        let mut envp_p: Vec<*const libc::c_char> = envp.iter().map(|a| a.as_ptr()).collect();
        envp_p.push(std::ptr::null());
        // SAFETY: path, argv and envp are NUL-terminated arrays of valid
        // C strings that outlive the call.
        unsafe { libc::execve(path.as_ptr(), argv_p.as_ptr(), envp_p.as_ptr()) };
        Err(Error::last_os_path("execve", exec))
    };
    match run() {
        Err(e) => e,
        Ok(()) => Error::last_os_path("execve", exec),
    }
}
