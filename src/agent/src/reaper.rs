//! PID 1 inherits every orphan and must reap it, or zombies pile up. The
//! signal thread calls [`Reaper::reap`] on each SIGCHLD. Processes the
//! agent starts itself are registered here ([`Reaper::lock`] then
//! [`Guard::register`], with the lock held across the clone so the exit
//! cannot be reaped before the pid is known); their exit status is kept for
//! WaitProcess and sent into the event channel as `process_exited`.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use husk_protocol::{Event, ExitStatus, ProcessRef};

use crate::events::Events;

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

    /// Blocks until the process has exited or `timeout` has passed.
    pub fn wait_timeout(&self, timeout: std::time::Duration) -> Option<ExitStatus> {
        let s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        let (s, _) = self
            .cv
            .wait_timeout_while(s, timeout, |s| s.is_none())
            .unwrap_or_else(|e| e.into_inner());
        *s
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

/// The pids the agent started and is waiting for, and where their exits
/// go: the exit cell (for WaitProcess and ListProcessStates) and the event
/// channel (`process_exited`).
pub struct Reaper {
    table: Mutex<HashMap<i32, Arc<Exit>>>,
    events: Events,
}

/// The locked registry (hold it across the clone).
pub struct Guard<'a>(MutexGuard<'a, HashMap<i32, Arc<Exit>>>);

impl Guard<'_> {
    /// Registers `pid`; its exit will be delivered to the returned cell.
    /// Registering unlocks the registry.
    pub fn register(mut self, pid: i32, who: ProcessRef) -> Arc<Exit> {
        let exit = Arc::new(Exit {
            status: Mutex::new(None),
            cv: Condvar::new(),
            who,
        });
        self.0.insert(pid, exit.clone());
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

impl Reaper {
    /// An empty registry whose exits are published on `events`.
    pub fn new(events: Events) -> Self {
        Reaper {
            table: Mutex::new(HashMap::new()),
            events,
        }
    }

    /// The registry, locked.
    pub fn lock(&self) -> Guard<'_> {
        Guard(self.table.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Reaps every child that has exited; returns how many. A registered
    /// process's status is set before its event is sent, so a host that
    /// missed the event finds the exit in ListProcessStates.
    pub fn reap(&self) -> usize {
        let mut n = 0;
        loop {
            let mut status = 0;
            // SAFETY: waitpid(2) with a valid out-pointer; WNOHANG never blocks.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                return n;
            }
            n += 1;
            let exit = self.lock().0.remove(&pid);
            if let Some(exit) = exit {
                let st = decode(status);
                exit.set(st);
                self.events.publish(Event::ProcessExited {
                    process: exit.who.clone(),
                    status: st,
                });
            }
        }
    }
}

/// Serialises the unit tests that fork, so [`Reaper::reap`]'s waitpid(-1) in one
/// test cannot take another test's child.
#[cfg(test)]
pub static FORK_TESTS: Mutex<()> = Mutex::new(());

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Message;

    #[test]
    fn a_bounded_wait_ends_without_an_exit_and_returns_one_that_came() {
        let (events, _published) = Events::channel();
        let reaper = Reaper::new(events);
        let who = ProcessRef {
            container_id: "c".into(),
            exec_id: None,
        };
        // A pid no process has: nothing will ever reap it.
        let exit = reaper.lock().register(-2, who);
        assert_eq!(exit.wait_timeout(std::time::Duration::from_millis(1)), None);
        exit.set(ExitStatus::Signal(9));
        assert_eq!(
            exit.wait_timeout(std::time::Duration::from_secs(10)),
            Some(ExitStatus::Signal(9))
        );
    }

    #[test]
    fn exited_children_are_reaped_and_a_registered_exit_is_published() {
        // Only this test reaps in this process (the others use waitpid on
        // their own pid), so count our three.
        let _serial = FORK_TESTS.lock().unwrap_or_else(|e| e.into_inner());
        let (events, published) = Events::channel();
        let reaper = Reaper::new(events);
        let guard = reaper.lock();
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
            reaped += reaper.reap();
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(reaped >= 3);
        assert_eq!(exit.wait(), ExitStatus::Code(2));
        // Only the registered one is published.
        let sent: Vec<Event> = published
            .try_iter()
            .filter_map(|m| match m {
                Message::Event(e) => Some(e),
                _ => None,
            })
            .collect();
        assert_eq!(
            sent,
            [Event::ProcessExited {
                process: ProcessRef {
                    container_id: "c".into(),
                    exec_id: None,
                },
                status: ExitStatus::Code(2),
            }]
        );
    }
}
