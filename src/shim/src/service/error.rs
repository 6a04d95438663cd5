//! Why a task request failed, and how containerd hears of it: each
//! variant carries its ttrpc code, and the status message is the error's
//! chain, joined once here.

use std::path::PathBuf;

use containerd_shim::protos::ttrpc::{self, Code};
use husk_protocol::client::ClientError;
use husk_protocol::{AgentError, ErrorCode};

use crate::error::Chain;
use crate::network::NetError;
use crate::rootfs::RootfsError;
use crate::slots::SlotError;
use crate::vm::VmError;

/// Why a task request failed.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// A field of the request is missing or unusable.
    #[error("{0}")]
    InvalidArgument(String),
    /// An id that cannot name the pod's or the container's files.
    #[error("{what} id {id:?} is not valid: {rule}")]
    InvalidId {
        /// Whose id, and where it came from.
        what: &'static str,
        /// The id.
        id: String,
        /// What an id may be.
        rule: &'static str,
    },
    /// The pod asks for the node's namespaces.
    #[error(
        "the pod asks for the node's {} namespace (hostNetwork, hostIPC or hostPID): \
         a pod in a microVM has its own kernel and cannot share the node's; \
         run it with runc",
        .0.join(", ")
    )]
    HostNamespaces(Vec<&'static str>),
    /// A JSON field of the request does not parse.
    #[error("the {what} in the request is not valid")]
    Malformed {
        /// Which field.
        what: &'static str,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The bundle's runtime spec cannot be read.
    #[error("cannot read {}", path.display())]
    Spec {
        /// The spec file.
        path: PathBuf,
        /// Why.
        #[source]
        source: oci_spec::OciSpecError,
    },
    /// No such container.
    #[error("container {0} not found")]
    NoContainer(String),
    /// No such exec.
    #[error("exec {exec_id} of container {id} not found")]
    NoExec {
        /// The container.
        id: String,
        /// The exec.
        exec_id: String,
    },
    /// The process has exited (what runc-based shims answer to a kill).
    #[error("process already finished")]
    Finished,
    /// The process waited for was deleted.
    #[error("{0} was deleted while waited for")]
    Deleted(String),
    /// The id is taken.
    #[error("{0} already exists")]
    Exists(String),
    /// The process's or container's state does not allow the request.
    #[error("cannot {action} {what}: it is {state}")]
    WrongState {
        /// What was asked.
        action: &'static str,
        /// Of what.
        what: String,
        /// What it is.
        state: &'static str,
    },
    /// The container belongs to another pod.
    #[error("container {id} belongs to pod {pod}, this shim serves {serves}")]
    OtherPod {
        /// The container.
        id: String,
        /// Its pod.
        pod: String,
        /// This shim's pod.
        serves: String,
    },
    /// The pod's VM ended while a request was in flight: how, and its log
    /// (a guest crash is only seen there).
    #[error("the pod's microVM ended ({how}) meanwhile; the end of its log: {log}")]
    VmEnded {
        /// husk's exit status.
        how: String,
        /// The last lines of husk's log.
        log: String,
        /// What the request met.
        #[source]
        source: Box<TaskError>,
    },
    /// The pod's VM does not run (yet or any more).
    #[error("the pod's microVM is not running")]
    VmNotRunning,
    /// The pod's VM has exited: nothing more is created in it.
    #[error("the pod's microVM has exited")]
    VmExited,
    /// husk could not be put in the pod's cgroup.
    #[error("cannot put the pod's microVM in its cgroup")]
    Cgroup(#[source] crate::cgroup::CgroupError),
    /// The pod's network namespace could not be joined to the guest.
    #[error("cannot wire the pod's network")]
    Network(#[source] Box<NetError>),
    /// The pod's VM did not boot.
    #[error("cannot boot the pod's microVM")]
    Boot(#[source] Box<VmError>),
    /// The pod's share could not be made, or a volume put in it.
    #[error("cannot share {what} with the pod's microVM")]
    Share {
        /// The share, or which volume.
        what: String,
        /// Why.
        #[source]
        source: Box<crate::share::ShareError>,
    },
    /// The pod's jail could not be made.
    #[error("cannot jail the pod's microVM")]
    Jail(#[source] Box<crate::jail::JailError>),
    /// The VMM refused a request for a running VM.
    #[error("cannot {action} the pod's microVM")]
    Vm {
        /// What was asked.
        action: &'static str,
        /// Why.
        #[source]
        source: Box<VmError>,
    },
    /// A container's limits do not fit in the most the VM can have.
    #[error(transparent)]
    DoesNotFit(crate::sizing::SizeError),
    /// The guest did not plug the memory a container's limit needs.
    #[error(
        "the pod's microVM did not plug the {asked_mib} MiB its containers' memory limits need \
         within {within:?} (it has {plugged_mib} MiB plugged)"
    )]
    NotPlugged {
        /// What was asked of the hot-pluggable region.
        asked_mib: u64,
        /// What the guest had plugged.
        plugged_mib: u64,
        /// How long it was given.
        within: std::time::Duration,
    },
    /// A disk image could not be built on the host.
    #[error("cannot build the {what} of container {id}")]
    Disk {
        /// Which disk.
        what: &'static str,
        /// The container.
        id: String,
        /// Why.
        #[source]
        source: Box<RootfsError>,
    },
    /// A disk could not be put into a drive slot.
    #[error("cannot attach the {what} of container {id}")]
    Slot {
        /// Which disk.
        what: &'static str,
        /// The container.
        id: String,
        /// Why.
        #[source]
        source: Box<SlotError>,
    },
    /// The agent failed or refused.
    #[error("cannot {action} in the guest")]
    Agent {
        /// What was asked, and of what.
        action: String,
        /// Why.
        #[source]
        source: ClientError,
    },
    /// The agent answered with something else than the request calls for.
    #[error("the agent answered {request} with {reply}")]
    UnexpectedReply {
        /// The request.
        request: &'static str,
        /// What it answered.
        reply: String,
    },
    /// Not something this shim does.
    #[error("{0} is not supported")]
    Unsupported(&'static str),
    /// Pause and resume act on the whole VM.
    #[error(
        "pausing one container of a pod with several is not supported; pause the pod's sandbox"
    )]
    PauseOne,
    /// The container's metrics could not be encoded.
    #[error("cannot encode the metrics")]
    Metrics(#[source] containerd_shim::protos::protobuf::Error),
    /// The system would not give the shim a thread.
    #[error("cannot start a thread for {what}")]
    Thread {
        /// What the thread was for.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl TaskError {
    /// The ttrpc code containerd acts on.
    pub fn code(&self) -> Code {
        match self {
            TaskError::InvalidArgument(_)
            | TaskError::InvalidId { .. }
            | TaskError::HostNamespaces(_)
            | TaskError::Malformed { .. }
            | TaskError::Spec { .. } => Code::INVALID_ARGUMENT,
            TaskError::NoContainer(_)
            | TaskError::NoExec { .. }
            | TaskError::Finished
            | TaskError::Deleted(_) => Code::NOT_FOUND,
            TaskError::Exists(_) => Code::ALREADY_EXISTS,
            TaskError::WrongState { .. } | TaskError::OtherPod { .. } => Code::FAILED_PRECONDITION,
            TaskError::VmNotRunning | TaskError::VmExited | TaskError::VmEnded { .. } => {
                Code::UNAVAILABLE
            }
            TaskError::Slot { source, .. } if matches!(**source, SlotError::NoSlot(_)) => {
                Code::RESOURCE_EXHAUSTED
            }
            TaskError::DoesNotFit(_) | TaskError::NotPlugged { .. } => Code::RESOURCE_EXHAUSTED,
            TaskError::Agent {
                source: ClientError::Agent(AgentError { code, .. }),
                ..
            } => match code {
                ErrorCode::NotFound => Code::NOT_FOUND,
                ErrorCode::AlreadyExists => Code::ALREADY_EXISTS,
                ErrorCode::InvalidArgument | ErrorCode::InvalidMessage => Code::INVALID_ARGUMENT,
                ErrorCode::FailedPrecondition => Code::FAILED_PRECONDITION,
                ErrorCode::Unsupported | ErrorCode::UnsupportedVersion => Code::UNIMPLEMENTED,
                ErrorCode::System => Code::INTERNAL,
            },
            TaskError::Agent { .. } => Code::UNAVAILABLE,
            TaskError::Unsupported(_) | TaskError::PauseOne => Code::UNIMPLEMENTED,
            TaskError::Cgroup(crate::cgroup::CgroupError::InvalidPath(_)) => Code::INVALID_ARGUMENT,
            TaskError::Jail(e) if matches!(**e, crate::jail::JailError::NoUid { .. }) => {
                Code::RESOURCE_EXHAUSTED
            }
            TaskError::Share { source, .. }
                if matches!(**source, crate::share::ShareError::NotShareable(_)) =>
            {
                Code::INVALID_ARGUMENT
            }
            TaskError::Network(_)
            | TaskError::Share { .. }
            | TaskError::Jail(_)
            | TaskError::Cgroup(_)
            | TaskError::Boot(_)
            | TaskError::Vm { .. }
            | TaskError::Disk { .. }
            | TaskError::Slot { .. }
            | TaskError::UnexpectedReply { .. }
            | TaskError::Metrics(_)
            | TaskError::Thread { .. } => Code::INTERNAL,
        }
    }

    /// A request the agent failed or refused.
    pub fn agent(action: impl Into<String>) -> impl FnOnce(ClientError) -> TaskError {
        let action = action.into();
        move |source| TaskError::Agent { action, source }
    }
}

impl From<TaskError> for ttrpc::Error {
    fn from(e: TaskError) -> ttrpc::Error {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), Chain(&e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn status(e: TaskError) -> (Code, String) {
        match ttrpc::Error::from(e) {
            ttrpc::Error::RpcStatus(s) => (s.code(), s.message),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_status_carries_the_code_and_the_whole_chain_once() {
        let (code, message) = status(TaskError::Agent {
            action: "create container c1".into(),
            source: ClientError::Timeout(Duration::from_secs(10)),
        });
        assert_eq!(code, Code::UNAVAILABLE);
        assert_eq!(
            message,
            "cannot create container c1 in the guest: the agent did not answer within 10s"
        );
        let (code, message) = status(TaskError::Agent {
            action: "signal container c1".into(),
            source: ClientError::Agent(AgentError::new(ErrorCode::NotFound, "no c1")),
        });
        assert_eq!(code, Code::NOT_FOUND);
        assert_eq!(message.matches("no c1").count(), 1, "{message}");
        let (code, _) = status(TaskError::WrongState {
            action: "start",
            what: "container c1".into(),
            state: "running",
        });
        assert_eq!(code, Code::FAILED_PRECONDITION);
    }
}
