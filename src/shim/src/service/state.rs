//! What the shim knows of its pod, as state machines that cannot hold an
//! impossible state: each process is one [`ProcState`], the pod's VM one
//! [`VmState`]. Every transition is a method that refuses what the state
//! does not allow ([`WrongState`], answered FAILED_PRECONDITION as
//! runc-based shims do). All of it lives under the service's one lock,
//! which is never held across a round trip to the guest, the VMM or
//! containerd.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};

use containerd_shim::api::Status;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use husk_protocol::ExitStatus;

use super::events::Job;
use crate::io::StdioPaths;
use crate::network::PodNetwork;
use crate::pod::{PodDir, PodVm, ProcessStdio};
use crate::slots::{SlotError, Slots, Swap};

/// Where a process is in its life.
pub enum ProcState {
    /// An exec containerd added, not in the guest yet.
    Added {
        /// What to run.
        spec: Box<oci_spec::runtime::Process>,
    },
    /// In the guest, waiting to be started (a container's init process).
    Created {
        /// Its pid in the guest.
        pid: u32,
        /// Its stdio.
        io: Arc<dyn ProcessStdio>,
    },
    /// Start was asked of the guest and is not finished; an exit that
    /// arrives meanwhile waits here until the start is announced.
    Starting {
        /// Its pid, once the guest said.
        pid: Option<u32>,
        /// Its stdio, once attached.
        io: Option<Arc<dyn ProcessStdio>>,
        /// An exit reported before the start was announced.
        early_exit: Option<ExitStatus>,
    },
    /// Started and announced.
    Running {
        /// Its pid in the guest.
        pid: u32,
        /// Its stdio.
        io: Arc<dyn ProcessStdio>,
    },
    /// Ended (or lost with the VM).
    Exited {
        /// Its pid in the guest (0 if it never started).
        pid: u32,
        /// The shell status.
        code: u32,
        /// When the shim learned of it.
        at: Timestamp,
    },
}

/// A request the process's state does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WrongState(pub &'static str);

/// One process: containerd's stdio paths and its state.
pub struct Process {
    /// The fifos containerd gave it.
    pub paths: StdioPaths,
    /// Where it is in its life.
    pub state: ProcState,
}

impl Process {
    /// The state's name, for messages.
    pub fn state_name(&self) -> &'static str {
        match self.state {
            ProcState::Added { .. } | ProcState::Created { .. } => "created",
            ProcState::Starting { .. } => "starting",
            ProcState::Running { .. } => "running",
            ProcState::Exited { .. } => "stopped",
        }
    }

    /// containerd's status; running processes of a paused VM are paused.
    pub fn status(&self, vm_paused: bool) -> Status {
        match self.state {
            ProcState::Added { .. } | ProcState::Created { .. } | ProcState::Starting { .. } => {
                Status::CREATED
            }
            ProcState::Running { .. } if vm_paused => Status::PAUSED,
            ProcState::Running { .. } => Status::RUNNING,
            ProcState::Exited { .. } => Status::STOPPED,
        }
    }

    /// Its pid in the guest, 0 while unknown.
    pub fn pid(&self) -> u32 {
        match self.state {
            ProcState::Added { .. } => 0,
            ProcState::Starting { pid, .. } => pid.unwrap_or(0),
            ProcState::Created { pid, .. }
            | ProcState::Running { pid, .. }
            | ProcState::Exited { pid, .. } => pid,
        }
    }

    /// Its stdio, while attached.
    pub fn io(&self) -> Option<Arc<dyn ProcessStdio>> {
        match &self.state {
            ProcState::Created { io, .. } | ProcState::Running { io, .. } => Some(io.clone()),
            ProcState::Starting { io, .. } => io.clone(),
            ProcState::Added { .. } | ProcState::Exited { .. } => None,
        }
    }

    /// Its end: shell status and time.
    pub fn exit(&self) -> Option<(u32, Timestamp)> {
        match &self.state {
            ProcState::Exited { code, at, .. } => Some((*code, at.clone())),
            _ => None,
        }
    }

    /// Whether it has ended.
    pub fn is_exited(&self) -> bool {
        matches!(self.state, ProcState::Exited { .. })
    }

    /// Whether it runs in the guest or may be about to.
    pub fn is_live(&self) -> bool {
        matches!(
            self.state,
            ProcState::Starting { .. } | ProcState::Running { .. }
        )
    }

    /// Start of a container's init: Created to Starting.
    pub fn begin_start(&mut self) -> Result<(), WrongState> {
        let ProcState::Created { pid, io } = &self.state else {
            return Err(WrongState(self.state_name()));
        };
        self.state = ProcState::Starting {
            pid: Some(*pid),
            io: Some(io.clone()),
            early_exit: None,
        };
        Ok(())
    }

    /// Start of an exec: Added to Starting; what to run.
    pub fn begin_exec(&mut self) -> Result<Box<oci_spec::runtime::Process>, WrongState> {
        let name = self.state_name();
        let starting = ProcState::Starting {
            pid: None,
            io: None,
            early_exit: None,
        };
        match std::mem::replace(&mut self.state, starting) {
            ProcState::Added { spec } => Ok(spec),
            other => {
                self.state = other;
                Err(WrongState(name))
            }
        }
    }

    /// The guest started an exec as `pid`, its stdio attached as `io`.
    /// False if it is no longer starting (the VM went meanwhile).
    pub fn record_started(&mut self, new_pid: u32, new_io: Arc<dyn ProcessStdio>) -> bool {
        let ProcState::Starting { pid, io, .. } = &mut self.state else {
            return false;
        };
        *pid = Some(new_pid);
        *io = Some(new_io);
        true
    }

    /// The start was announced: Starting to Running; an exit reported
    /// meanwhile is handed back to be handled now.
    pub fn finish_start(&mut self) -> Result<Option<ExitStatus>, WrongState> {
        let ProcState::Starting {
            pid: Some(pid),
            io: Some(io),
            early_exit,
        } = &self.state
        else {
            return Err(WrongState(self.state_name()));
        };
        let early = *early_exit;
        self.state = ProcState::Running {
            pid: *pid,
            io: io.clone(),
        };
        Ok(early)
    }

    /// The guest did not start it: back to where it was (an exec to
    /// Added with `spec`, an init to Created), so containerd may try
    /// again or delete it.
    pub fn abort_start(&mut self, spec: Option<Box<oci_spec::runtime::Process>>) {
        let ProcState::Starting { pid, io, .. } = &self.state else {
            return;
        };
        self.state = match (spec, pid, io) {
            (Some(spec), _, _) => ProcState::Added { spec },
            (None, Some(pid), Some(io)) => ProcState::Created {
                pid: *pid,
                io: io.clone(),
            },
            (None, ..) => return,
        };
    }

    /// Keeps an exit that arrived while starting; false if the process
    /// is not starting.
    pub fn park_exit(&mut self, status: ExitStatus) -> bool {
        let ProcState::Starting { early_exit, .. } = &mut self.state else {
            return false;
        };
        early_exit.get_or_insert(status);
        true
    }

    /// It ended with `code`: any state but Exited to Exited. Returns its
    /// stdio to finish, or `None` if it had ended already.
    pub fn end(&mut self, code: u32, at: Timestamp) -> Option<Option<Arc<dyn ProcessStdio>>> {
        if self.is_exited() {
            return None;
        }
        let io = self.io();
        self.state = ProcState::Exited {
            pid: self.pid(),
            code,
            at,
        };
        Some(io)
    }
}

/// A container of the pod.
pub struct Container {
    /// Its bundle.
    pub bundle: String,
    /// Its rootfs or writable layer image on the host.
    pub image: Option<PathBuf>,
    /// Its volumes disk image.
    pub volumes_image: Option<PathBuf>,
    /// Where the shim mounted containerd's snapshot for a rootfs served
    /// through the pod's share (unmounted at delete).
    pub mounted_root: Option<PathBuf>,
    /// Delete is under way: events for it are expected and ignored, new
    /// processes refused.
    pub deleting: bool,
    /// Its init process.
    pub init: Process,
    /// Its execs, by exec id.
    pub execs: HashMap<String, Process>,
}

impl Container {
    /// The process `exec_id` ("" for the init process).
    pub fn process(&self, exec_id: &str) -> Option<&Process> {
        if exec_id.is_empty() {
            Some(&self.init)
        } else {
            self.execs.get(exec_id)
        }
    }

    /// The process `exec_id` ("" for the init process).
    pub fn process_mut(&mut self, exec_id: &str) -> Option<&mut Process> {
        if exec_id.is_empty() {
            Some(&mut self.init)
        } else {
            self.execs.get_mut(exec_id)
        }
    }

    /// Every process, the init's exec id "".
    pub fn processes_mut(&mut self) -> impl Iterator<Item = (&str, &mut Process)> {
        std::iter::once(("", &mut self.init))
            .chain(self.execs.iter_mut().map(|(id, p)| (id.as_str(), p)))
    }
}

/// How many deleted containers' ids are remembered, so that their late
/// events are recognised rather than taken for another pod's.
const RETIRED: usize = 256;

/// The pod's containers.
#[derive(Default)]
pub struct Table {
    /// By container id.
    pub containers: HashMap<String, Container>,
    /// Ids whose create is under way.
    pub creating: HashSet<String>,
    /// Recently deleted ids, newest last.
    retired: VecDeque<String>,
}

impl Table {
    /// Whether `id` is taken or being created.
    pub fn has(&self, id: &str) -> bool {
        self.containers.contains_key(id) || self.creating.contains(id)
    }

    /// Removes a container, remembering its id.
    pub fn remove(&mut self, id: &str) -> Option<Container> {
        let c = self.containers.remove(id)?;
        if self.retired.len() == RETIRED {
            self.retired.pop_front();
        }
        self.retired.push_back(id.to_string());
        Some(c)
    }

    /// Whether `id` was a container of this pod, deleted since.
    pub fn was_deleted(&self, id: &str) -> bool {
        self.retired.iter().any(|r| r == id)
    }

    /// Whether no container exists or is being created.
    pub fn is_empty(&self) -> bool {
        self.containers.is_empty() && self.creating.is_empty()
    }
}

/// The pod's VM while it runs: shared by the requests that use it, none
/// of them holding the service's lock while they do.
pub struct RunningPod {
    /// The VM.
    pub vm: Arc<dyn PodVm>,
    /// Its files.
    pub dir: PodDir,
    /// Its spare drives; held across a drive swap (a VMM round trip,
    /// never a guest one), so only disk attach and detach wait on it.
    pub slots: Mutex<Slots>,
    /// Its wired network, undone when it goes.
    pub network: Option<PodNetwork>,
    /// Its cgroup on the node, removed when it goes.
    pub cgroup: Option<crate::cgroup::PodCgroup>,
    /// Port forwarding from its network namespace, stopped when it goes.
    pub port_forward: Mutex<Option<crate::portforward::PortForward>>,
    /// Its size and its containers' asks; held across a resize (a VMM or
    /// agent round trip), so only resizes wait on it.
    pub sizing: Mutex<super::resize::Sizing>,
    /// The event worker's queue.
    pub events: SyncSender<Job>,
    /// Who the pod is, for `husk metrics`.
    pub labels: crate::metrics::LabelsFile,
    /// husk's jail uid, given back when the VM's end is handled.
    pub jail: Option<Arc<crate::jail::PodJail>>,
    /// Its share (volumes = "share"), taken down when it goes.
    pub share: Option<crate::share::PodShare>,
}

impl RunningPod {
    /// Changes the slots with `f`, then tells the labels file which
    /// container uses which drive now (under the slots' lock, so the
    /// file follows the slots in order).
    fn with_slots<T>(&self, f: impl FnOnce(&mut Slots, Swap) -> T) -> T {
        let swap = |drive: &str, file: &Path| self.vm.swap_drive(drive, file);
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let result = f(&mut slots, &swap);
        self.labels
            .set_drives(slots.drive_users(super::create::slot_owner_container));
        result
    }

    /// Puts `image` into a free writable slot for `owner`.
    pub fn attach(&self, owner: &str, image: &Path) -> Result<String, SlotError> {
        self.with_slots(|slots, swap| slots.attach(owner, image, swap))
    }

    /// Gives `owner` a read-only slot holding `image`, shared.
    pub fn attach_shared(&self, owner: &str, image: &Path) -> Result<String, SlotError> {
        self.with_slots(|slots, swap| slots.attach_shared(owner, image, swap))
    }

    /// Releases every slot `owner` uses.
    pub fn detach(&self, owner: &str) -> Result<(), SlotError> {
        self.with_slots(|slots, swap| slots.detach(owner, swap))
    }
}

/// The pod's VM.
pub enum VmState {
    /// No container has been created yet (or the first boot failed).
    NotBooted,
    /// A create is booting it; others wait.
    Booting,
    /// It runs.
    Running {
        /// The VM and what goes with it.
        pod: Arc<RunningPod>,
        /// Whether its vCPUs are paused.
        paused: bool,
    },
    /// husk exited; its processes are ended, its files and network being
    /// removed.
    Gone,
    /// husk exited and nothing of it is left.
    Cleaned,
}

impl VmState {
    /// The running VM, if it runs.
    pub fn running(&self) -> Option<&Arc<RunningPod>> {
        match self {
            VmState::Running { pod, .. } => Some(pod),
            _ => None,
        }
    }

    /// Whether it runs with its vCPUs paused.
    pub fn paused(&self) -> bool {
        matches!(self, VmState::Running { paused: true, .. })
    }
}

/// Everything under the service's lock.
pub struct State {
    /// The pod's id (its sandbox id, or the first container's id).
    pub pod_id: Option<String>,
    /// The pod's VM.
    pub vm: VmState,
    /// The guest pid of the pod's sandbox container.
    pub sandbox_pid: Option<u32>,
    /// The containers.
    pub table: Table,
    /// How the VM ended and the end of its log, once it has: its
    /// directory (and the log) is gone by then.
    pub vm_end: Option<VmEnd>,
}

/// How the pod's VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmEnd {
    /// husk's exit status.
    pub how: String,
    /// The last lines of husk's log.
    pub log: String,
}

impl Default for State {
    fn default() -> Self {
        State {
            pod_id: None,
            vm: VmState::NotBooted,
            sandbox_pid: None,
            table: Table::default(),
            vm_end: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoIo;
    impl ProcessStdio for NoIo {
        fn close_stdin(&self) {}
        fn output_done(&self) -> bool {
            true
        }
        fn finish(&self) {}
    }

    fn created() -> Process {
        Process {
            paths: StdioPaths::default(),
            state: ProcState::Created {
                pid: 7,
                io: Arc::new(NoIo),
            },
        }
    }

    fn added() -> Process {
        Process {
            paths: StdioPaths::default(),
            state: ProcState::Added {
                spec: Box::default(),
            },
        }
    }

    #[test]
    fn an_init_runs_through_its_states_once() {
        let mut p = created();
        assert_eq!(p.status(false), Status::CREATED);
        p.begin_start().unwrap();
        assert_eq!(p.begin_start(), Err(WrongState("starting")));
        assert_eq!(p.finish_start().unwrap(), None);
        assert_eq!((p.status(false), p.pid()), (Status::RUNNING, 7));
        assert_eq!(p.status(true), Status::PAUSED);
        assert_eq!(p.begin_start(), Err(WrongState("running")));
        assert!(p.end(137, Timestamp::default()).is_some());
        assert_eq!(p.status(true), Status::STOPPED);
        assert_eq!(p.exit().map(|e| e.0), Some(137));
        assert!(p.end(0, Timestamp::default()).is_none(), "ends once");
        assert_eq!(p.exit().map(|e| e.0), Some(137));
        assert_eq!(p.begin_start(), Err(WrongState("stopped")));
    }

    #[test]
    fn an_exec_that_fails_to_start_can_be_started_again() {
        let mut p = added();
        let spec = p.begin_exec().unwrap();
        assert!(p.begin_exec().is_err());
        assert_eq!(p.finish_start(), Err(WrongState("starting")), "no pid yet");
        p.abort_start(Some(spec));
        assert!(matches!(p.state, ProcState::Added { .. }));
        p.begin_exec().unwrap();
        assert!(p.record_started(9, Arc::new(NoIo)));
        assert_eq!(p.pid(), 9);
        assert_eq!(p.status(false), Status::CREATED);
        p.finish_start().unwrap();
        assert_eq!(p.status(false), Status::RUNNING);
    }

    #[test]
    fn an_exit_during_start_waits_for_the_start_to_finish() {
        let mut p = created();
        assert!(!p.park_exit(ExitStatus::Code(1)), "not starting");
        p.begin_start().unwrap();
        assert!(p.park_exit(ExitStatus::Code(3)));
        assert!(p.park_exit(ExitStatus::Code(4)));
        assert_eq!(p.finish_start().unwrap(), Some(ExitStatus::Code(3)));
    }

    #[test]
    fn the_table_remembers_deleted_ids_up_to_a_bound() {
        let mut t = Table::default();
        for n in 0..=RETIRED {
            let id = format!("c{n}");
            t.containers.insert(
                id.clone(),
                Container {
                    bundle: String::new(),
                    image: None,
                    volumes_image: None,
                    mounted_root: None,
                    deleting: false,
                    init: created(),
                    execs: HashMap::new(),
                },
            );
            assert!(t.remove(&id).is_some());
        }
        assert!(!t.was_deleted("c0"));
        assert!(t.was_deleted("c1"));
        assert!(t.was_deleted(&format!("c{RETIRED}")));
        assert!(!t.was_deleted("elsewhere"));
    }
}
