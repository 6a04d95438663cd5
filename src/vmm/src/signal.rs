//! Termination signals (SIGTERM, SIGINT, SIGHUP) as an event source: they are
//! blocked in every thread and read from a signalfd by the event loop, so a
//! signal stops the VM in an orderly way (vCPUs stopped and joined, the exit
//! reported) instead of killing the process mid-write.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// The signals that stop a microVM.
pub const TERMINATION_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// A non-blocking signalfd for [`TERMINATION_SIGNALS`].
#[derive(Debug)]
pub struct TerminationFd {
    fd: OwnedFd,
}

fn termination_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, exclusively borrowed sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for sig in TERMINATION_SIGNALS {
        // SAFETY: as above; every signal number is a valid constant.
        unsafe { libc::sigaddset(&mut set, sig) };
    }
    set
}

impl TerminationFd {
    /// Blocks the termination signals in the calling thread (threads it
    /// spawns later inherit that) and opens a signalfd for them. Call it
    /// before starting any other thread.
    pub fn new() -> std::io::Result<Self> {
        let set = termination_set();
        // SAFETY: `set` is initialised; the old mask is not wanted.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        // SAFETY: -1 asks for a new fd; `set` is initialised.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: signalfd returned a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(TerminationFd { fd })
    }

    /// The next pending signal, if any.
    pub fn read(&self) -> Option<libc::c_int> {
        // SAFETY: signalfd_siginfo is plain data.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: the buffer is exactly one signalfd_siginfo, owned here.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size,
            )
        };
        (n == size as isize).then_some(info.ssi_signo as libc::c_int)
    }
}

impl AsRawFd for TerminationFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// The conventional name of a signal.
pub fn signal_name(sig: libc::c_int) -> &'static str {
    match sig {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        _ => "signal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blocked_signal_is_read_from_the_fd() {
        // Runs on its own thread so the blocked mask stays there.
        std::thread::spawn(|| {
            let fd = TerminationFd::new().unwrap();
            assert_eq!(fd.read(), None);
            // SAFETY: sending a signal to this very thread, which blocks it.
            unsafe { libc::pthread_kill(libc::pthread_self(), libc::SIGHUP) };
            assert_eq!(fd.read(), Some(libc::SIGHUP));
            assert_eq!(signal_name(libc::SIGHUP), "SIGHUP");
        })
        .join()
        .unwrap();
    }
}
