//! PID 1 inherits every orphan and must reap it, or zombies pile up. The
//! signal thread calls [`reap`] on each SIGCHLD. Processes the agent starts
//! itself are registered here ([`lock`] then [`Table::register`], with the
//! lock held across the clone so the exit cannot be reaped before the pid
//! is known); their exit status is kept for WaitProcess and published as a
//! `process_exited` event.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use husk_protocol::{Event, ExitStatus, ProcessRef};

/// The exit of one registered process.
pub struct Exit {
    status: Mutex<Option<ExitStatus>>,
    cv: Condvar,
    who: ProcessRef,
}

impl Exit {
    /// Blocks until the process has exited.
    pub fn wait(&self) -> ExitStatus {
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(st) = *s {
                return st;
            }
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The status if it has exited.
    pub fn status(&self) -> Option<ExitStatus> {
        *self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, st: ExitStatus) {
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = Some(st);
        self.cv.notify_all();
    }
}

/// Registered pids.
pub struct Table(HashMap<i32, Arc<Exit>>);

static TABLE: Mutex<Option<Table>> = Mutex::new(None);

/// The registry, locked (hold it across the clone).
pub fn lock() -> Guard {
    Guard(TABLE.lock().unwrap_or_else(|e| e.into_inner()))
}

/// The locked registry.
pub struct Guard(MutexGuard<'static, Option<Table>>);

impl Guard {
    /// Registers `pid`; its exit will be delivered to the returned cell.
    pub fn register(mut self, pid: i32, who: ProcessRef) -> Arc<Exit> {
        let exit = Arc::new(Exit {
            status: Mutex::new(None),
            cv: Condvar::new(),
            who,
        });
        self.0
            .get_or_insert_with(|| Table(HashMap::new()))
            .0
            .insert(pid, exit.clone());
        exit
    }
}

fn decode(status: libc::c_int) -> ExitStatus {
    if libc::WIFSIGNALED(status) {
        ExitStatus::Signal(libc::WTERMSIG(status))
    } else {
        ExitStatus::Code(libc::WEXITSTATUS(status))
    }
}

/// Reaps every child that has exited; returns how many.
pub fn reap() -> usize {
    let mut n = 0;
    loop {
        let mut status = 0;
        // SAFETY: waitpid(2) with a valid out-pointer; WNOHANG never blocks.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return n;
        }
        n += 1;
        let exit = lock().0.as_mut().and_then(|t| t.0.remove(&pid));
        if let Some(exit) = exit {
            let st = decode(status);
            exit.set(st);
            crate::server::publish(&Event::ProcessExited {
                process: exit.who.clone(),
                status: st,
            });
        }
    }
}

/// Serialises the unit tests that fork, so [`reap`]'s waitpid(-1) in one
/// test cannot take another test's child.
#[cfg(test)]
pub static FORK_TESTS: Mutex<()> = Mutex::new(());

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exited_children_are_reaped() {
        // Only this test reaps in this process (the others use waitpid on
        // their own pid), so count our three.
        let _serial = FORK_TESTS.lock().unwrap_or_else(|e| e.into_inner());
        let guard = lock();
        let mut pids = Vec::new();
        for code in 0..3 {
            // SAFETY: the child only calls _exit.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                // SAFETY: _exit(2) in the forked child, which touches nothing else.
                unsafe { libc::_exit(code) };
            }
            pids.push(pid);
        }
        let who = ProcessRef {
            container_id: "c".into(),
            exec_id: None,
        };
        let exit = guard.register(pids[2], who);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut reaped = 0;
        while reaped < 3 && std::time::Instant::now() < deadline {
            reaped += reap();
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(reaped >= 3);
        assert_eq!(exit.wait(), ExitStatus::Code(2));
    }
}
