//! The task API's handlers but Create (`create.rs`): each looks up and
//! changes the table under the lock, lets go of it, and only then talks
//! to the guest; what the guest answered is written back under the lock
//! again. A state that does not allow the request is FAILED_PRECONDITION.

use std::sync::Arc;

use containerd_shim::api;
use containerd_shim::protos::cgroups_v2::metrics as cg2;
use containerd_shim::protos::events::task::{
    TaskDelete, TaskExecAdded, TaskExecStarted, TaskPaused, TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::{Message, MessageField};
use husk_protocol::{ProcessRef, Request, Response};

use super::create::volumes_slot_owner;
use super::events::Job;
use super::state::{ProcState, Process, RunningPod, VmState, WrongState};
use super::{container, describe, now, process, process_ref, Inner, TaskError, VM_GONE_STATUS};
use crate::error::Chain;
use crate::io::StdioPaths;
use crate::sizing::Ask;

/// A state error of `action` on the process `id`/`exec_id`.
fn wrong(action: &'static str, id: &str, exec_id: &str) -> impl FnOnce(WrongState) -> TaskError {
    let what = describe(id, exec_id);
    move |WrongState(state)| TaskError::WrongState {
        action,
        what,
        state,
    }
}

impl Inner {
    pub(super) fn start(&self, id: &str, exec_id: &str) -> Result<u32, TaskError> {
        if exec_id.is_empty() {
            self.start_init(id)
        } else {
            self.start_exec(id, exec_id)
        }
    }

    /// Starts a created container's init process.
    fn start_init(&self, id: &str) -> Result<u32, TaskError> {
        let pod = {
            let mut st = self.lock();
            let pod = st.vm.running().cloned();
            let c = container(&mut st, id)?;
            if c.deleting {
                return Err(wrong("start", id, "")(WrongState("being deleted")));
            }
            let pod = pod.ok_or(TaskError::VmNotRunning)?;
            c.init.begin_start().map_err(wrong("start", id, ""))?;
            pod
        };
        let started = pod.vm.call(Request::StartContainer {
            container_id: id.to_string(),
        });
        if let Err(e) = started {
            if let Ok(p) = process(&mut self.lock(), id, "") {
                p.abort_start(None);
            }
            self.changed.notify_all();
            return Err(TaskError::agent(format!("start container {id}"))(e));
        }
        let pid = process(&mut self.lock(), id, "").map_or(0, |p| p.pid());
        self.publish(TaskStart {
            container_id: id.to_string(),
            pid,
            ..Default::default()
        });
        self.announce(&pod, id, "");
        Ok(pid)
    }

    /// Starts an exec: the guest runs it, its stdio is attached, and only
    /// then is it announced, so its exit cannot be reported first.
    fn start_exec(&self, id: &str, exec_id: &str) -> Result<u32, TaskError> {
        let (pod, spec, paths) = {
            let mut st = self.lock();
            let pod = st.vm.running().cloned();
            let c = container(&mut st, id)?;
            if c.deleting {
                return Err(wrong("start", id, exec_id)(WrongState("being deleted")));
            }
            let p = c.execs.get_mut(exec_id).ok_or_else(|| TaskError::NoExec {
                id: id.to_string(),
                exec_id: exec_id.to_string(),
            })?;
            let pod = pod.ok_or(TaskError::VmNotRunning)?;
            let spec = p.begin_exec().map_err(wrong("start", id, exec_id))?;
            (pod, spec, p.paths.clone())
        };
        let started = self.exec_in_guest(&pod, id, exec_id, &spec, &paths);
        let (pid, io) = match started {
            Ok(started) => started,
            Err(e) => {
                if let Ok(p) = process(&mut self.lock(), id, exec_id) {
                    p.abort_start(Some(spec));
                }
                self.changed.notify_all();
                return Err(e);
            }
        };
        let recorded = process(&mut self.lock(), id, exec_id)
            .map(|p| p.record_started(pid, io.clone()))
            .unwrap_or(false);
        if !recorded {
            // The VM went meanwhile, and the process with it.
            io.finish();
            return Err(TaskError::VmExited);
        }
        self.publish(TaskExecStarted {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            pid,
            ..Default::default()
        });
        self.announce(&pod, id, exec_id);
        Ok(pid)
    }

    /// The guest's part of an exec's start: the process, then its stdio.
    /// A process whose stdio cannot be attached is killed again.
    fn exec_in_guest(
        &self,
        pod: &RunningPod,
        id: &str,
        exec_id: &str,
        spec: &oci_spec::runtime::Process,
        paths: &StdioPaths,
    ) -> Result<(u32, Arc<dyn crate::pod::ProcessStdio>), TaskError> {
        let reply = pod
            .vm
            .call(Request::ExecProcess {
                container_id: id.to_string(),
                exec_id: exec_id.to_string(),
                process: Box::new(spec.clone()),
            })
            .map_err(TaskError::agent(format!("start {}", describe(id, exec_id))))?;
        let Response::Started { pid: pid @ 1.. } = reply else {
            return Err(TaskError::UnexpectedReply {
                request: "ExecProcess",
                reply: format!("{reply:?}"),
            });
        };
        match pod.vm.attach_stdio(&process_ref(id, exec_id), paths) {
            Ok(io) => Ok((pid, io)),
            Err(e) => {
                let _ = pod.vm.call(Request::SignalProcess {
                    process: process_ref(id, exec_id),
                    signal: libc::SIGKILL,
                    all: false,
                });
                Err(TaskError::agent(format!(
                    "attach the stdio of {}",
                    describe(id, exec_id)
                ))(e))
            }
        }
    }

    /// A start was announced: the process runs, and an exit that came
    /// while it started is handled now.
    fn announce(&self, pod: &RunningPod, id: &str, exec_id: &str) {
        let early = process(&mut self.lock(), id, exec_id)
            .ok()
            .and_then(|p| p.finish_start().ok().flatten());
        self.changed.notify_all();
        if let Some(status) = early {
            let _ = pod.events.send(Job::Exit {
                process: process_ref(id, exec_id),
                status,
                pid: None,
                from_listing: false,
            });
        }
    }

    pub(super) fn delete(&self, id: &str, exec_id: &str) -> Result<api::DeleteResponse, TaskError> {
        if !exec_id.is_empty() {
            return self.delete_exec(id, exec_id);
        }
        let (pod, ios, init_exited, images, is_pod, mounted_root) = {
            let mut st = self.lock();
            let is_pod = st.pod_id.as_deref() == Some(id);
            let pod = st.vm.running().cloned();
            let c = container(&mut st, id)?;
            if c.deleting {
                return Err(wrong("delete", id, "")(WrongState("being deleted")));
            }
            if c.init.is_live() {
                return Err(wrong("delete", id, "")(WrongState(c.init.state_name())));
            }
            c.deleting = true;
            let ios: Vec<_> = c.processes_mut().filter_map(|(_, p)| p.io()).collect();
            let images: Vec<_> = c.image.iter().chain(&c.volumes_image).cloned().collect();
            (
                pod,
                ios,
                c.init.is_exited(),
                images,
                is_pod,
                c.mounted_root.clone(),
            )
        };
        for io in ios {
            io.finish();
        }
        if let Some(pod) = &pod {
            self.remove_in_guest(pod, id, init_exited);
        }
        for image in images {
            let _ = std::fs::remove_file(image);
        }
        // After the guest let go of it (and its share entry is gone).
        if let Some(root) = mounted_root {
            crate::rootfs::unmount_tree(&root);
        }
        let c = {
            let mut st = self.lock();
            st.table.remove(id)
        };
        self.changed.notify_all();
        let Some(c) = c else {
            return Err(TaskError::NoContainer(id.to_string()));
        };
        let (status, at) = c.init.exit().unwrap_or((VM_GONE_STATUS, now()));
        let pid = c.init.pid();
        if is_pod {
            self.stop_vm();
        }
        self.publish(TaskDelete {
            container_id: id.to_string(),
            id: id.to_string(),
            pid,
            exit_status: status,
            exited_at: MessageField::some(at.clone()),
            ..Default::default()
        });
        tracing::info!(container = id, bundle = %c.bundle, "container deleted");
        Ok(api::DeleteResponse {
            pid,
            exit_status: status,
            exited_at: MessageField::some(at),
            ..Default::default()
        })
    }

    /// The guest's and the VM's part of a container's delete: its
    /// processes killed (an init never started still waits), the
    /// container removed, its drive slots freed.
    fn remove_in_guest(&self, pod: &RunningPod, id: &str, init_exited: bool) {
        if !init_exited {
            let killed = pod.vm.call(Request::SignalProcess {
                process: ProcessRef {
                    container_id: id.to_string(),
                    exec_id: None,
                },
                signal: libc::SIGKILL,
                all: true,
            });
            if let Err(e) = killed {
                tracing::debug!(container = id, error = %Chain(&e), "cannot kill the container's processes");
            }
        }
        if let Err(e) = pod.vm.call(Request::RemoveContainer {
            container_id: id.to_string(),
        }) {
            tracing::warn!(container = id, error = %Chain(&e), "the agent could not remove the container");
        }
        for owner in [id.to_string(), volumes_slot_owner(id)] {
            if let Err(e) = pod.detach(&owner) {
                tracing::warn!(container = id, error = %Chain(&e), "cannot free the container's drive slot");
            }
        }
        // Its volumes' entries in the share that no other container binds.
        if let Some(share) = &pod.share {
            share.release(id);
        }
        // What its limits took is given back.
        pod.release(id);
        pod.labels.remove_container(id);
    }

    fn delete_exec(&self, id: &str, exec_id: &str) -> Result<api::DeleteResponse, TaskError> {
        let p = {
            let mut st = self.lock();
            let c = container(&mut st, id)?;
            let p = c.execs.get(exec_id).ok_or_else(|| TaskError::NoExec {
                id: id.to_string(),
                exec_id: exec_id.to_string(),
            })?;
            if p.is_live() {
                return Err(wrong("delete", id, exec_id)(WrongState(p.state_name())));
            }
            c.execs.remove(exec_id)
        };
        self.changed.notify_all();
        let Some(p) = p else {
            return Err(TaskError::NoExec {
                id: id.to_string(),
                exec_id: exec_id.to_string(),
            });
        };
        let (status, at) = p.exit().unwrap_or_default();
        Ok(api::DeleteResponse {
            pid: p.pid(),
            exit_status: status,
            exited_at: MessageField::some(at),
            ..Default::default()
        })
    }

    pub(super) fn state(&self, id: &str, exec_id: &str) -> Result<api::StateResponse, TaskError> {
        let mut st = self.lock();
        let paused = st.vm.paused();
        let c = container(&mut st, id)?;
        let bundle = c.bundle.clone();
        let p = c.process(exec_id).ok_or_else(|| TaskError::NoExec {
            id: id.to_string(),
            exec_id: exec_id.to_string(),
        })?;
        let (exit_status, exited_at) = p.exit().unwrap_or_default();
        Ok(api::StateResponse {
            id: id.to_string(),
            bundle,
            pid: p.pid(),
            status: p.status(paused).into(),
            stdin: p.paths.stdin.clone(),
            stdout: p.paths.stdout.clone(),
            stderr: p.paths.stderr.clone(),
            terminal: p.paths.terminal,
            exit_status,
            exited_at: MessageField::some(exited_at),
            exec_id: exec_id.to_string(),
            ..Default::default()
        })
    }

    pub(super) fn exec(&self, req: &api::ExecProcessRequest) -> Result<(), TaskError> {
        if req.exec_id.is_empty() {
            return Err(TaskError::InvalidArgument("no exec id".into()));
        }
        let spec: oci_spec::runtime::Process =
            serde_json::from_slice(&req.spec.value).map_err(|source| TaskError::Malformed {
                what: "exec's process spec",
                source,
            })?;
        {
            let mut st = self.lock();
            let c = container(&mut st, &req.id)?;
            if c.deleting {
                return Err(wrong("exec in", &req.id, "")(WrongState("being deleted")));
            }
            if c.init.is_exited() {
                return Err(wrong("exec in", &req.id, "")(WrongState("stopped")));
            }
            if c.execs.contains_key(&req.exec_id) {
                return Err(TaskError::Exists(describe(&req.id, &req.exec_id)));
            }
            c.execs.insert(
                req.exec_id.clone(),
                Process {
                    paths: StdioPaths {
                        stdin: req.stdin.clone(),
                        stdout: req.stdout.clone(),
                        stderr: req.stderr.clone(),
                        terminal: req.terminal,
                    },
                    state: ProcState::Added {
                        spec: Box::new(spec),
                    },
                },
            );
        }
        self.publish(TaskExecAdded {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        });
        Ok(())
    }

    pub(super) fn kill(
        &self,
        id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), TaskError> {
        let pod = {
            let mut st = self.lock();
            let pod = st.vm.running().cloned();
            let p = process(&mut st, id, exec_id)?;
            match p.state {
                ProcState::Exited { .. } => return Err(TaskError::Finished),
                ProcState::Added { .. } => {
                    return Err(wrong("signal", id, exec_id)(WrongState("not started")))
                }
                _ => {}
            }
            pod.ok_or(TaskError::VmNotRunning)?
        };
        let signal = i32::try_from(signal)
            .map_err(|_| TaskError::InvalidArgument(format!("signal {signal}")))?;
        pod.vm
            .call(Request::SignalProcess {
                process: process_ref(id, exec_id),
                signal,
                all,
            })
            .map_err(TaskError::agent(format!(
                "signal {}",
                describe(id, exec_id)
            )))?;
        Ok(())
    }

    pub(super) fn wait(&self, id: &str, exec_id: &str) -> Result<api::WaitResponse, TaskError> {
        let mut st = self.lock();
        process(&mut st, id, exec_id)?;
        let st = self
            .changed
            .wait_while(st, |s| {
                s.table
                    .containers
                    .get(id)
                    .and_then(|c| c.process(exec_id))
                    .is_some_and(|p| !p.is_exited())
            })
            .unwrap_or_else(|e| e.into_inner());
        let (exit_status, exited_at) = st
            .table
            .containers
            .get(id)
            .and_then(|c| c.process(exec_id))
            .and_then(|p| p.exit())
            .ok_or_else(|| TaskError::Deleted(describe(id, exec_id)))?;
        Ok(api::WaitResponse {
            exit_status,
            exited_at: MessageField::some(exited_at),
            ..Default::default()
        })
    }

    /// The running VM, for a request about container `id`.
    fn vm_for(&self, id: &str) -> Result<Arc<RunningPod>, TaskError> {
        let mut st = self.lock();
        let pod = st.vm.running().cloned();
        container(&mut st, id)?;
        pod.ok_or(TaskError::VmNotRunning)
    }

    pub(super) fn pids(&self, id: &str) -> Result<api::PidsResponse, TaskError> {
        let pod = self.vm_for(id)?;
        let reply = pod
            .vm
            .call(Request::ListProcesses {
                container_id: id.to_string(),
            })
            .map_err(TaskError::agent(format!(
                "list the processes of container {id}"
            )))?;
        let Response::Processes { pids } = reply else {
            return Err(TaskError::UnexpectedReply {
                request: "ListProcesses",
                reply: format!("{reply:?}"),
            });
        };
        Ok(api::PidsResponse {
            processes: pids
                .into_iter()
                .map(|pid| containerd_shim::protos::types::task::ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    /// Pause and resume act on the VM's vCPUs: a pod of one container
    /// (what `ctr` makes) pauses as a whole; one container of several
    /// cannot be frozen alone yet.
    pub(super) fn pause_or_resume(&self, id: &str, pause: bool) -> Result<(), TaskError> {
        let action = if pause { "pause" } else { "resume" };
        let pod = {
            let mut st = self.lock();
            let others = st.table.containers.len() > 1;
            let is_pod = st.pod_id.as_deref() == Some(id);
            let c = container(&mut st, id)?;
            if others || !is_pod {
                return Err(TaskError::PauseOne);
            }
            if !c.init.is_live() {
                return Err(wrong(action, id, "")(WrongState(c.init.state_name())));
            }
            match &st.vm {
                VmState::Running { paused, .. } if *paused == pause => {
                    let state = if pause { "paused" } else { "running" };
                    return Err(wrong(action, id, "")(WrongState(state)));
                }
                VmState::Running { pod, .. } => pod.clone(),
                _ => return Err(TaskError::VmNotRunning),
            }
        };
        pod.vm.set_paused(pause).map_err(|source| TaskError::Vm {
            action,
            source: Box::new(source),
        })?;
        if let VmState::Running { paused, .. } = &mut self.lock().vm {
            *paused = pause;
        }
        if pause {
            self.publish(TaskPaused {
                container_id: id.to_string(),
                ..Default::default()
            });
        } else {
            self.publish(TaskResumed {
                container_id: id.to_string(),
                ..Default::default()
            });
        }
        Ok(())
    }

    pub(super) fn close_io(&self, id: &str, exec_id: &str) -> Result<(), TaskError> {
        let io = process(&mut self.lock(), id, exec_id)?.io();
        if let Some(io) = io {
            io.close_stdin();
        }
        Ok(())
    }

    pub(super) fn resize_pty(
        &self,
        id: &str,
        exec_id: &str,
        height: u32,
        width: u32,
    ) -> Result<(), TaskError> {
        let pod = {
            let mut st = self.lock();
            let pod = st.vm.running().cloned();
            process(&mut st, id, exec_id)?;
            pod.ok_or(TaskError::VmNotRunning)?
        };
        let clamp = |v: u32| u16::try_from(v).unwrap_or(u16::MAX);
        pod.vm
            .call(Request::ResizeTty {
                process: process_ref(id, exec_id),
                rows: clamp(height),
                cols: clamp(width),
            })
            .map_err(TaskError::agent(format!(
                "resize the terminal of {}",
                describe(id, exec_id)
            )))?;
        Ok(())
    }

    pub(super) fn update(&self, id: &str, resources: &[u8]) -> Result<(), TaskError> {
        let resources: oci_spec::runtime::LinuxResources = serde_json::from_slice(resources)
            .map_err(|source| TaskError::Malformed {
                what: "resources",
                source,
            })?;
        let pod = self.vm_for(id)?;
        // In-place resize: the VM grows before the guest's cgroup takes
        // the higher limits, and shrinks after it took lower ones.
        let ask = Ask::of_resources(Some(&resources));
        let before = pod.ask_of(id);
        pod.grow_for(id, ask)?;
        let updated = pod
            .vm
            .call(Request::UpdateContainer {
                container_id: id.to_string(),
                resources: Box::new(resources),
            })
            .map_err(TaskError::agent(format!("update container {id}")));
        match updated {
            Ok(_) => {
                pod.settle_to(id, ask);
                Ok(())
            }
            Err(e) => {
                pod.settle_to(id, before.unwrap_or_default());
                Err(e)
            }
        }
    }

    pub(super) fn stats(&self, id: &str) -> Result<api::StatsResponse, TaskError> {
        let pod = self.vm_for(id)?;
        let reply = pod
            .vm
            .call(Request::StatsContainer {
                container_id: id.to_string(),
            })
            .map_err(TaskError::agent(format!(
                "read the stats of container {id}"
            )))?;
        let Response::Stats(s) = reply else {
            return Err(TaskError::UnexpectedReply {
                request: "StatsContainer",
                reply: format!("{reply:?}"),
            });
        };
        let metrics = cg2::Metrics {
            pids: MessageField::some(cg2::PidsStat {
                current: s.pids,
                ..Default::default()
            }),
            cpu: MessageField::some(cg2::CPUStat {
                usage_usec: s.cpu_usage_usec,
                user_usec: s.cpu_user_usec,
                system_usec: s.cpu_system_usec,
                ..Default::default()
            }),
            memory: MessageField::some(cg2::MemoryStat {
                usage: s.memory_bytes,
                usage_limit: s.memory_limit_bytes.unwrap_or(u64::MAX),
                ..Default::default()
            }),
            memory_events: MessageField::some(cg2::MemoryEvents {
                oom_kill: s.oom_kills,
                ..Default::default()
            }),
            io: MessageField::some(cg2::IOStat {
                usage: vec![cg2::IOEntry {
                    rbytes: s.io_read_bytes,
                    wbytes: s.io_write_bytes,
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let value = metrics.write_to_bytes().map_err(TaskError::Metrics)?;
        Ok(api::StatsResponse {
            stats: MessageField::some(
                containerd_shim::protos::protobuf::well_known_types::any::Any {
                    type_url: "io.containerd.cgroups.v2.Metrics".into(),
                    value,
                    ..Default::default()
                },
            ),
            ..Default::default()
        })
    }

    pub(super) fn connect(&self) -> api::ConnectResponse {
        let task_pid = self.lock().vm.running().map_or(0, |p| p.vm.pid());
        api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        }
    }
}
