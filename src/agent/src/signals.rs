//! The agent's signals: SIGCHLD (reap), SIGTERM and SIGINT (stop the
//! containers and end the guest, or outside one the process). [`block`]
//! blocks them in `main` before any thread exists, so every thread
//! inherits the mask and none of them is ever interrupted; one thread reads
//! them from a signalfd ([`spawn`]).
//!
//! That thread must not spin: a read that fails for good (or no signalfd
//! at all) makes it back off, from 10 ms up to one reap a second, so
//! orphans and container processes are still reaped and their exits still
//! reported, and the CPU is left to the guest ([`SignalLoop`]).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

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

/// What the signal thread does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Reap the children that have exited.
    Reap,
    /// Stop everything and end the guest (the signal's number).
    Shutdown(libc::c_int),
    /// Read again.
    Read,
    /// The read failed: wait this long, reap (a SIGCHLD may have been
    /// lost), and read again.
    ReapAfter(Duration),
}

/// The first wait after a failed read; it doubles per failure in a row.
const FIRST_BACK_OFF: Duration = Duration::from_millis(10);
/// The longest wait: with a broken signalfd, one reap a second.
const MAX_BACK_OFF: Duration = Duration::from_secs(1);

/// The signal thread's decisions: a signal to act on, or how long to back
/// off after a failed read.
#[derive(Debug, Default)]
pub struct SignalLoop {
    /// Failed reads in a row.
    failures: u32,
}

impl SignalLoop {
    /// The action for one read's result.
    pub fn next(&mut self, read: std::io::Result<libc::c_int>) -> Action {
        match read {
            Ok(sig) => {
                self.failures = 0;
                match sig {
                    libc::SIGCHLD => Action::Reap,
                    libc::SIGTERM | libc::SIGINT => Action::Shutdown(sig),
                    _ => Action::Read,
                }
            }
            // A signal handler ran (the agent has none): nothing is wrong.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Action::Read,
            Err(e) => {
                self.failures = self.failures.saturating_add(1);
                // Say so on the first failure, then at 2, 4, 8, ... in a row.
                if self.failures.is_power_of_two() {
                    log::error(&format!(
                        "reading signals failed {} time(s) in a row ({e}): reaping every {:?}",
                        self.failures,
                        self.back_off()
                    ));
                }
                Action::ReapAfter(self.back_off())
            }
        }
    }

    fn back_off(&self) -> Duration {
        let doublings = self.failures.saturating_sub(1).min(16);
        (FIRST_BACK_OFF * 2u32.pow(doublings)).min(MAX_BACK_OFF)
    }
}

/// Starts the signal thread for `runtime`; `fd` is [`block`]'s signalfd
/// (`None` if it could not be made: the thread then only reaps, once a
/// second).
pub fn spawn(fd: Option<OwnedFd>, runtime: Arc<Runtime>) {
    let spawned = std::thread::Builder::new()
        .name("husk-agent-signals".into())
        .spawn(move || {
            let mut decisions = SignalLoop::default();
            loop {
                match decisions.next(read_signal(fd.as_ref())) {
                    Action::Reap => {
                        runtime.reaper().reap();
                    }
                    Action::Shutdown(sig) => {
                        log::info(&format!("signal {sig}: shutting down"));
                        runtime.power_off()
                    }
                    Action::Read => {}
                    Action::ReapAfter(wait) => {
                        std::thread::sleep(wait);
                        runtime.reaper().reap();
                    }
                }
            }
        });
    if let Err(e) = spawned {
        log::error(&format!("cannot start the signal thread: {e}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed() -> std::io::Result<libc::c_int> {
        Err(std::io::Error::from_raw_os_error(libc::EBADF))
    }

    #[test]
    fn signals_become_reaps_and_shutdowns() {
        let mut l = SignalLoop::default();
        assert_eq!(l.next(Ok(libc::SIGCHLD)), Action::Reap);
        assert_eq!(l.next(Ok(libc::SIGTERM)), Action::Shutdown(libc::SIGTERM));
        assert_eq!(l.next(Ok(libc::SIGINT)), Action::Shutdown(libc::SIGINT));
        assert_eq!(l.next(Ok(libc::SIGUSR1)), Action::Read);
        assert_eq!(
            l.next(Err(std::io::ErrorKind::Interrupted.into())),
            Action::Read
        );
    }

    #[test]
    fn a_read_that_keeps_failing_backs_off_to_one_reap_a_second() {
        let mut l = SignalLoop::default();
        let waits: Vec<Duration> = (0..40)
            .map(|_| match l.next(failed()) {
                Action::ReapAfter(d) => d,
                other => panic!("a failed read gave {other:?}"),
            })
            .collect();
        assert_eq!(waits[0], FIRST_BACK_OFF);
        assert!(waits.windows(2).all(|w| w[0] <= w[1]), "{waits:?}");
        assert_eq!(*waits.last().unwrap(), MAX_BACK_OFF);
        assert!(waits.iter().all(|d| !d.is_zero()));
    }

    #[test]
    fn a_good_read_ends_the_back_off() {
        let mut l = SignalLoop::default();
        for _ in 0..10 {
            l.next(failed());
        }
        assert_eq!(l.next(Ok(libc::SIGCHLD)), Action::Reap);
        assert_eq!(l.next(failed()), Action::ReapAfter(FIRST_BACK_OFF));
    }

    #[test]
    fn without_a_signalfd_a_read_fails_instead_of_blocking() {
        assert!(read_signal(None).is_err());
    }
}
