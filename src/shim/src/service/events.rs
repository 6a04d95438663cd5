//! The agent's events, distrusted. One thread reads the event stream and
//! queues what it reads (a bounded queue: a flood waits for the worker,
//! it does not grow memory or threads); one worker thread checks each
//! event against the shim's own table and turns it into containerd's task
//! event. What names a container or process this pod does not have, a
//! pid other than the one the shim knows, or an exit status no process
//! can end with, is refused with a log line and counted.
//!
//! An exit is reported once the process's output has ended (a process's
//! last words must reach containerd's fifos first) or after
//! [`OUTPUT_DRAIN`]; the worker polls the exits it holds rather than
//! waiting on any one of them.
//!
//! When the stream ends while the VM runs (the agent dropped a
//! subscriber it could not write to), the reader reconnects with a
//! bounded backoff and asks for every process's state (ListProcessStates),
//! so an exit sent to the lost stream is still delivered. When the VM is
//! gone, it stops.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use containerd_shim::protos::events::task::{TaskExit, TaskOOM};
use containerd_shim::protos::protobuf::MessageField;
use husk_protocol::{Event, ExitStatus, ProcessRef, Request, Response};

use super::state::ProcState;
use super::{describe, now, Inner};
use crate::error::Chain;
use crate::pod::{EventStream, PodVm, ProcessStdio};

/// How many events may wait for the worker.
pub const QUEUE: usize = 1024;

/// How long a process's output may keep arriving after it exited before
/// its exit is reported anyway.
pub const OUTPUT_DRAIN: Duration = Duration::from_secs(2);

/// How often the worker looks at exits waiting for their output.
const DRAIN_POLL: Duration = Duration::from_millis(5);

/// The first and the longest wait between attempts to get the event
/// stream back.
const RECONNECT_FIRST: Duration = Duration::from_millis(10);
const RECONNECT_MAX: Duration = Duration::from_secs(1);

/// What the worker is given.
#[derive(Debug)]
pub enum Job {
    /// A process ended, as the agent says.
    Exit {
        /// The process.
        process: ProcessRef,
        /// How.
        status: ExitStatus,
        /// Its pid, when the agent said (ListProcessStates).
        pid: Option<u32>,
        /// From ListProcessStates, which also lists exited execs that
        /// containerd has deleted since.
        from_listing: bool,
    },
    /// The kernel's OOM killer acted in a container.
    Oom {
        /// The container.
        container_id: String,
    },
}

/// An exit whose process's output has not ended yet.
struct Pending {
    process: ProcessRef,
    status: ExitStatus,
    code: u32,
    io: Arc<dyn ProcessStdio>,
    deadline: Instant,
}

impl Pending {
    fn is(&self, process: &ProcessRef) -> bool {
        self.process == *process
    }
}

/// The shell status of an exit, if a Linux process can end so: a code of
/// 0-255, or a signal of 1-64.
pub fn shell_status(status: ExitStatus) -> Option<u32> {
    match status {
        ExitStatus::Code(c) => u8::try_from(c).ok().map(u32::from),
        ExitStatus::Signal(s) if (1..=64).contains(&s) => Some(128 + s as u32),
        ExitStatus::Signal(_) => None,
    }
}

/// The worker: takes jobs until every sender is gone and nothing waits.
pub(super) fn worker(inner: Weak<Inner>, jobs: Receiver<Job>) {
    let mut pending: Vec<Pending> = Vec::new();
    let mut open = true;
    loop {
        let job = if !open {
            if pending.is_empty() {
                return;
            }
            std::thread::sleep(DRAIN_POLL);
            None
        } else if pending.is_empty() {
            match jobs.recv() {
                Ok(job) => Some(job),
                Err(_) => return,
            }
        } else {
            match jobs.recv_timeout(DRAIN_POLL) {
                Ok(job) => Some(job),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => {
                    open = false;
                    None
                }
            }
        };
        let Some(me) = inner.upgrade() else { return };
        if let Some(job) = job {
            me.take(job, &mut pending);
        }
        me.complete(&mut pending);
    }
}

/// Reads the event stream into the worker's queue; gets it back when it
/// is lost while the VM runs.
pub(super) fn reader(
    inner: Weak<Inner>,
    vm: Arc<dyn PodVm>,
    queue: SyncSender<Job>,
    mut stream: Option<Box<dyn EventStream>>,
) {
    let mut delay = RECONNECT_FIRST;
    loop {
        if let Some(s) = stream.as_mut() {
            loop {
                let job = match s.next_event() {
                    Ok(Some(Event::ProcessExited { process, status })) => Job::Exit {
                        process,
                        status,
                        pid: None,
                        from_listing: false,
                    },
                    Ok(Some(Event::Oom { container_id })) => Job::Oom { container_id },
                    Ok(None) => {
                        tracing::debug!("the agent's event stream ended");
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %Chain(&e), "the agent's event stream failed");
                        break;
                    }
                };
                // A stream that delivers is a stream worth having again
                // at once.
                delay = RECONNECT_FIRST;
                if queue.send(job).is_err() {
                    return;
                }
            }
        }
        stream = None;
        while stream.is_none() {
            std::thread::sleep(delay);
            delay = (delay * 2).min(RECONNECT_MAX);
            match inner.upgrade() {
                Some(me) if me.lock().vm.running().is_some() => {}
                _ => return,
            }
            match vm.events() {
                Ok(s) => stream = Some(s),
                Err(e) => {
                    tracing::debug!(error = %Chain(&e), "the agent's event stream is not back yet")
                }
            }
        }
        tracing::info!("the agent's event stream is back; reading the exits it missed");
        let processes = match vm.call(Request::ListProcessStates) {
            Ok(Response::ProcessStates { processes }) => processes,
            Ok(other) => {
                tracing::warn!(reply = ?other, "the agent answered ListProcessStates with something else");
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %Chain(&e), "cannot list the processes: exits may have been missed");
                continue;
            }
        };
        for p in processes {
            let Some(status) = p.exit else { continue };
            let job = Job::Exit {
                process: p.process,
                status,
                pid: Some(p.pid),
                from_listing: true,
            };
            if queue.send(job).is_err() {
                return;
            }
        }
    }
}

impl Inner {
    /// Refuses an event: logged and counted.
    fn refuse(&self, event: &str, reason: &str) {
        let refused = self.rejected.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::warn!(event, reason, refused, "refused an event from the agent");
    }

    /// Checks a job against the table.
    fn take(&self, job: Job, pending: &mut Vec<Pending>) {
        match job {
            Job::Oom { container_id } => self.oom(container_id),
            Job::Exit {
                process,
                status,
                pid,
                from_listing,
            } => self.exit(process, status, pid, from_listing, pending),
        }
    }

    fn oom(&self, container_id: String) {
        let known = {
            let st = self.lock();
            match st.table.containers.get(&container_id) {
                Some(c) => Some(!c.deleting),
                None if st.table.creating.contains(&container_id)
                    || st.table.was_deleted(&container_id) =>
                {
                    Some(false)
                }
                None => None,
            }
        };
        match known {
            Some(true) => self.publish(TaskOOM {
                container_id,
                ..Default::default()
            }),
            Some(false) => {
                tracing::debug!(
                    container = container_id,
                    "an OOM for a container not in service"
                )
            }
            None => self.refuse(
                &format!("OOM of container {container_id}"),
                "no such container in this pod",
            ),
        }
    }

    fn exit(
        &self,
        process: ProcessRef,
        status: ExitStatus,
        pid: Option<u32>,
        from_listing: bool,
        pending: &mut Vec<Pending>,
    ) {
        let id = process.container_id.as_str();
        let exec_id = process.exec_id.as_deref().unwrap_or("");
        let what = || format!("exit of {}", describe(id, exec_id));
        let Some(code) = shell_status(status) else {
            return self.refuse(&what(), &format!("no process ends with {status:?}"));
        };
        let mut st = self.lock();
        let known_id = st.table.creating.contains(id) || st.table.was_deleted(id);
        let Some(c) = st.table.containers.get_mut(id) else {
            drop(st);
            if known_id {
                tracing::debug!(container = id, "an exit for a container not in service");
                return;
            }
            return self.refuse(&what(), "no such container in this pod");
        };
        if c.deleting {
            tracing::debug!(container = id, "an exit for a container being deleted");
            return;
        }
        let Some(p) = c.process_mut(exec_id) else {
            drop(st);
            if from_listing {
                // containerd deleted the exec after it exited; the agent
                // keeps it until the container goes.
                return;
            }
            return self.refuse(&what(), "no such process");
        };
        if let Some(pid) = pid {
            let known = p.pid();
            if known != 0 && known != pid {
                drop(st);
                return self.refuse(&what(), &format!("pid {pid}, not {known}"));
            }
        }
        let io = match &p.state {
            ProcState::Added { .. } => {
                drop(st);
                return self.refuse(&what(), "the process was never started");
            }
            ProcState::Exited { .. } => {
                tracing::debug!(process = what(), "an exit reported twice");
                return;
            }
            ProcState::Starting { .. } => None,
            ProcState::Created { io, .. } | ProcState::Running { io, .. } => Some(io.clone()),
        };
        let Some(io) = io else {
            p.park_exit(status);
            return;
        };
        if !pending.iter().any(|x| x.is(&process)) {
            pending.push(Pending {
                process,
                status,
                code,
                io,
                deadline: Instant::now() + OUTPUT_DRAIN,
            });
        }
    }

    /// Reports the exits whose output has ended or waited long enough.
    fn complete(&self, pending: &mut Vec<Pending>) {
        let now = Instant::now();
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(pending)
            .into_iter()
            .partition(|p| p.io.output_done() || now >= p.deadline);
        *pending = waiting;
        for p in ready {
            self.exited(p);
        }
    }

    /// A process has exited: its state, its stdio, TaskExit.
    fn exited(&self, p: Pending) {
        let id = p.process.container_id.as_str();
        let exec_id = p.process.exec_id.as_deref().unwrap_or("");
        if !p.io.output_done() {
            tracing::debug!(
                container = id,
                exec_id,
                "output still open after the process exited"
            );
        }
        let exited_at = now();
        let ended = {
            let mut st = self.lock();
            let proc = st
                .table
                .containers
                .get_mut(id)
                .filter(|c| !c.deleting)
                .and_then(|c| c.process_mut(exec_id));
            match proc {
                Some(proc) if matches!(proc.state, ProcState::Starting { .. }) => {
                    // Started again meanwhile (an init that died before its
                    // start reached it): the start hands it back.
                    proc.park_exit(p.status);
                    None
                }
                Some(proc) => proc
                    .end(p.code, exited_at.clone())
                    .map(|io| (proc.pid(), io)),
                None => None,
            }
        };
        let Some((pid, io)) = ended else { return };
        self.changed.notify_all();
        if let Some(io) = io {
            io.finish();
        }
        self.publish(TaskExit {
            container_id: id.to_string(),
            id: if exec_id.is_empty() { id } else { exec_id }.to_string(),
            pid,
            exit_status: p.code,
            exited_at: MessageField::some(exited_at),
            ..Default::default()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_statuses_a_process_can_end_with_are_taken() {
        assert_eq!(shell_status(ExitStatus::Code(0)), Some(0));
        assert_eq!(shell_status(ExitStatus::Code(255)), Some(255));
        assert_eq!(shell_status(ExitStatus::Signal(9)), Some(137));
        assert_eq!(shell_status(ExitStatus::Signal(64)), Some(192));
        for bad in [
            ExitStatus::Code(-1),
            ExitStatus::Code(256),
            ExitStatus::Signal(0),
            ExitStatus::Signal(65),
            ExitStatus::Signal(i32::MAX),
            ExitStatus::Signal(i32::MIN),
        ] {
            assert_eq!(shell_status(bad), None, "{bad:?}");
        }
    }
}
