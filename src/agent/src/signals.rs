//! The agent's signals: SIGCHLD (reap), SIGTERM and SIGINT (stop the
//! containers and end the guest, or outside one the process). [`block`]
//! blocks them in `main` before any thread exists, so every thread
//! inherits the mask and none of them is ever interrupted; one thread reads
//! them from a signalfd ([`spawn`]).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use crate::log;
use crate::runtime::Runtime;

/// Blocks SIGCHLD, SIGTERM and SIGINT in the calling thread (and every
/// thread it starts from now on) and opens a signalfd for them.
pub fn block() -> std::io::Result<OwnedFd> {
    // SAFETY: sigset_t is plain data; all-zero is a valid start, and
    // sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the signal numbers are constants.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
    }
    // SAFETY: an initialised set; the old mask is not wanted.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    // SAFETY: a new signalfd for an initialised set; the result is checked.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reads one signal.
fn read_signal(fd: Option<&OwnedFd>) -> std::io::Result<libc::c_int> {
    let Some(fd) = fd else {
        return Err(std::io::Error::other("no signalfd"));
    };
    // SAFETY: signalfd_siginfo is plain data; all-zero is valid.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: reading at most `size` bytes into `info`, which is that big.
    let n = unsafe {
        libc::read(
            fd.as_raw_fd(),
            (&mut info as *mut libc::signalfd_siginfo).cast(),
            size,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if n as usize != size {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("a signalfd read of {n} bytes, not {size}"),
        ));
    }
    Ok(info.ssi_signo as libc::c_int)
}

/// Starts the signal thread for `runtime`; `fd` is [`block`]'s signalfd
/// (`None` if it could not be made: then there is no signal thread).
pub fn spawn(fd: Option<OwnedFd>, runtime: Arc<Runtime>) {
    let Some(fd) = fd else {
        return;
    };
    let spawned = std::thread::Builder::new()
        .name("husk-agent-signals".into())
        .spawn(move || loop {
            match read_signal(Some(&fd)) {
                Ok(libc::SIGCHLD) => {
                    runtime.reaper().reap();
                }
                Ok(sig @ (libc::SIGTERM | libc::SIGINT)) => {
                    log::info(&format!("signal {sig}: shutting down"));
                    runtime.power_off()
                }
                _ => continue,
            }
        });
    if let Err(e) = spawned {
        log::error(&format!("cannot start the signal thread: {e}"));
    }
}
