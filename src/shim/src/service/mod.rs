//! The task service containerd talks to: one shim per pod, one microVM
//! per shim. The first container created boots the VM; each container's
//! root filesystem becomes a disk in a spare drive slot; the agent in the
//! guest creates, starts, execs, signals and removes the processes; its
//! events become containerd's task events.
//!
//! - [`state`]: the pod's containers and VM as state machines, under one
//!   lock that no round trip (guest, VMM, containerd) is made under.
//! - [`tasks`]: the task API's handlers; [`create`]: a container's disks
//!   and its creation in the guest.
//! - [`lifecycle`]: booting the VM, its end, stopping it.
//! - [`events`]: the agent's event stream and the one worker that turns
//!   exits and OOMs into task events, checked against the table.
//!
//! The VM, the stdio plumbing and containerd's publisher are the traits of
//! [`crate::pod`], so the unit tests ([`tests`]) run the service against
//! fakes.

mod create;
mod error;
mod events;
#[cfg(test)]
mod fake;
mod lifecycle;
mod resize;
mod state;
mod tasks;
#[cfg(test)]
mod tests;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use containerd_shim::api::{self, Empty};
use containerd_shim::event::Event as ShimEvent;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::{ExitSignal, TtrpcContext, TtrpcResult};
use husk_protocol::ProcessRef;

pub use error::TaskError;
pub use lifecycle::cleanup_after_crash;

use crate::config::Config;
use crate::error::Chain;
use crate::pod::{PodDir, Publisher, VmLauncher};
use state::{Container, Process, State};

/// The exit status reported for processes the VM took with it.
pub const VM_GONE_STATUS: u32 = 255;

/// The shim's task service.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

/// The service's state and its collaborators.
struct Inner {
    namespace: String,
    config: Config,
    exit: Arc<ExitSignal>,
    launcher: Box<dyn VmLauncher>,
    publisher: Box<dyn Publisher>,
    /// The pod: its containers and its VM. Never held across a round trip.
    state: Mutex<State>,
    /// Signalled on every change of `state` that someone may wait for
    /// (an exit, the VM's boot or end, a container's removal).
    changed: Condvar,
    /// Events from the agent that were refused: ids this pod does not
    /// have, statuses no process can end with.
    rejected: AtomicU64,
    /// Mounts the pods' shares' volumes (the kernel; a recorder in tests).
    mounter: Arc<dyn crate::share::Mounter>,
}

impl Service {
    /// A service for pods in `namespace` whose VMs `launcher` boots and
    /// whose events go to `publisher`.
    pub fn new(
        namespace: &str,
        config: Config,
        exit: Arc<ExitSignal>,
        launcher: Box<dyn VmLauncher>,
        publisher: Box<dyn Publisher>,
        mounter: Arc<dyn crate::share::Mounter>,
    ) -> Service {
        Service {
            inner: Arc::new(Inner {
                namespace: namespace.to_string(),
                config,
                exit,
                launcher,
                publisher,
                state: Mutex::new(State::default()),
                changed: Condvar::new(),
                rejected: AtomicU64::new(0),
                mounter,
            }),
        }
    }
}

/// The pod's state directory.
pub fn pod_dir(config: &Config, namespace: &str, pod_id: &str) -> PodDir {
    PodDir(config.state_dir.join(namespace).join(pod_id))
}

fn now() -> Timestamp {
    containerd_shim::util::timestamp().unwrap_or_default()
}

fn process_ref(id: &str, exec_id: &str) -> ProcessRef {
    ProcessRef {
        container_id: id.to_string(),
        exec_id: (!exec_id.is_empty()).then(|| exec_id.to_string()),
    }
}

/// "container ID" or "exec EXEC of container ID", for messages.
fn describe(id: &str, exec_id: &str) -> String {
    if exec_id.is_empty() {
        format!("container {id}")
    } else {
        format!("exec {exec_id} of container {id}")
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes a task event (never under the lock: it is a round trip
    /// to containerd).
    fn publish<E: ShimEvent + 'static>(&self, event: E) {
        let topic = event.topic();
        if let Err(e) = self.publisher.publish(&topic, Box::new(event)) {
            tracing::warn!(topic, error = %Chain(&e), "cannot publish an event to containerd");
        }
    }

    fn pod_dir(&self, pod_id: &str) -> PodDir {
        pod_dir(&self.config, &self.namespace, pod_id)
    }
}

/// The container `id`, or NOT_FOUND.
fn container<'a>(st: &'a mut State, id: &str) -> Result<&'a mut Container, TaskError> {
    st.table
        .containers
        .get_mut(id)
        .ok_or_else(|| TaskError::NoContainer(id.to_string()))
}

/// The process `exec_id` of container `id`, or NOT_FOUND.
fn process<'a>(st: &'a mut State, id: &str, exec_id: &str) -> Result<&'a mut Process, TaskError> {
    container(st, id)?
        .process_mut(exec_id)
        .ok_or_else(|| TaskError::NoExec {
            id: id.to_string(),
            exec_id: exec_id.to_string(),
        })
}

impl containerd_shim::Task for Service {
    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let pid = self.inner.create(&req)?;
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let pid = self.inner.start(&req.id, &req.exec_id)?;
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        Ok(self.inner.delete(&req.id, &req.exec_id)?)
    }

    fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        Ok(self.inner.state(&req.id, &req.exec_id)?)
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<Empty> {
        self.inner.exec(&req)?;
        Ok(Empty::new())
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<Empty> {
        self.inner
            .kill(&req.id, &req.exec_id, req.signal, req.all)?;
        Ok(Empty::new())
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        Ok(self.inner.wait(&req.id, &req.exec_id)?)
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        Ok(self.inner.pids(&req.id)?)
    }

    fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<Empty> {
        self.inner.pause_or_resume(&req.id, true)?;
        Ok(Empty::new())
    }

    fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<Empty> {
        self.inner.pause_or_resume(&req.id, false)?;
        Ok(Empty::new())
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<Empty> {
        self.inner.close_io(&req.id, &req.exec_id)?;
        Ok(Empty::new())
    }

    fn resize_pty(&self, _ctx: &TtrpcContext, req: api::ResizePtyRequest) -> TtrpcResult<Empty> {
        self.inner
            .resize_pty(&req.id, &req.exec_id, req.height, req.width)?;
        Ok(Empty::new())
    }

    fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<Empty> {
        self.inner.update(&req.id, &req.resources.value)?;
        Ok(Empty::new())
    }

    fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        Ok(self.inner.stats(&req.id)?)
    }

    fn connect(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        Ok(self.inner.connect())
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<Empty> {
        self.inner.shutdown();
        Ok(Empty::new())
    }
}
