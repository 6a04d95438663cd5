//! The task service against fakes of the VM, its agent and containerd
//! (`fake.rs`): each test drives the handlers as containerd would and
//! checks what the guest was asked, what containerd was told, and what is
//! left, in milliseconds. Disk images are built for real (mke2fs of an
//! empty tree).

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use containerd_shim::api::{CreateTaskRequest, ExecProcessRequest, Status};
use containerd_shim::protos::events::task::{TaskCreate, TaskDelete, TaskExecStarted};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::ttrpc::Code;
use containerd_shim::ExitSignal;
use husk_protocol::client::{ClientError, Endpoint};
use husk_protocol::{AgentError, ErrorCode, Event, ExitStatus, ProcessRef, Request, Response};

use super::fake::{Events, FakeVm, Launcher};
use super::state::VmState;
use super::{Inner, Service, TaskError};
use crate::config::Config;

/// A pod's shim with a fake VM; the VM dies with it.
struct Pod {
    svc: Arc<Inner>,
    /// The share's mount calls.
    mounts: Arc<crate::share::Recorder>,
    vm: Arc<FakeVm>,
    events: Arc<Events>,
    dir: tempfile::TempDir,
}

impl Drop for Pod {
    fn drop(&mut self) {
        self.vm.die("the test is over");
    }
}

/// The pod every test container belongs to; its sandbox has this id.
const POD: &str = "pod";

fn pod_with(configure: impl FnOnce(&mut Config)) -> Pod {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config {
        state_dir: dir.path().join("state"),
        image_cache_dir: dir.path().join("images"),
        // The fake VMs need no jail (vm.rs's jail is tested in the node
        // VM, jail.rs's uids here).
        jailer: false,
        // Root filesystems as disks: the slot and image-cache paths these
        // tests follow (a shared root is tested on its own below).
        rootfs: crate::config::RootfsMode::Block,
        ..Config::default()
    };
    configure(&mut config);
    let vm = FakeVm::new();
    let events = Arc::new(Events::default());
    let mounts = Arc::new(crate::share::Recorder::default());
    let service = Service::new(
        "test",
        config,
        Arc::new(ExitSignal::default()),
        Box::new(Launcher::new(&vm)),
        Box::new(events.clone()),
        mounts.clone(),
    );
    Pod {
        svc: service.inner,
        mounts,
        vm,
        events,
        dir,
    }
}

fn pod() -> Pod {
    pod_with(|_| {})
}

fn code(e: TaskError) -> Code {
    e.code()
}

impl Pod {
    /// A bundle for container `id` of the pod, its rootfs an empty tree.
    fn bundle(&self, id: &str) -> String {
        self.bundle_in(id, POD)
    }

    /// A bundle for container `id` whose spec names `pod` as its sandbox.
    fn bundle_in(&self, id: &str, pod: &str) -> String {
        self.bundle_with(id, pod, |_| {})
    }

    /// As [`Pod::bundle_in`], the spec changed by `f`.
    fn bundle_with(
        &self,
        id: &str,
        pod: &str,
        f: impl FnOnce(&mut oci_spec::runtime::Spec),
    ) -> String {
        let bundle = self.dir.path().join("bundles").join(id);
        std::fs::create_dir_all(bundle.join("rootfs")).unwrap();
        let mut spec = oci_spec::runtime::Spec::default();
        spec.set_annotations(Some(
            [(crate::spec::SANDBOX_ID.to_string(), pod.to_string())].into(),
        ));
        f(&mut spec);
        spec.save(bundle.join("config.json")).unwrap();
        bundle.display().to_string()
    }

    fn create(&self, id: &str) -> Result<u32, TaskError> {
        self.svc.create(&CreateTaskRequest {
            id: id.into(),
            bundle: self.bundle(id),
            ..Default::default()
        })
    }

    /// Creates container `id` of the pod from a spec changed by `f`.
    fn create_with(
        &self,
        id: &str,
        f: impl FnOnce(&mut oci_spec::runtime::Spec),
    ) -> Result<u32, TaskError> {
        self.svc.create(&CreateTaskRequest {
            id: id.into(),
            bundle: self.bundle_with(id, POD, f),
            ..Default::default()
        })
    }

    fn exec(&self, id: &str, exec_id: &str) -> Result<(), TaskError> {
        let spec = serde_json::to_vec(&oci_spec::runtime::Process::default()).unwrap();
        self.svc.exec(&ExecProcessRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            spec: Some(Any {
                value: spec,
                ..Default::default()
            })
            .into(),
            ..Default::default()
        })
    }

    fn status(&self, id: &str, exec_id: &str) -> Result<Status, TaskError> {
        let s = self.svc.state(id, exec_id)?;
        Ok(s.status.enum_value_or_default())
    }

    fn pod_dir(&self) -> PathBuf {
        self.dir.path().join("state/test").join(POD)
    }

    /// The pod's sandbox, created and started.
    fn running(&self) -> u32 {
        self.create(POD).unwrap();
        self.svc.start(POD, "").unwrap()
    }

    fn cleaned(&self) -> bool {
        matches!(self.svc.lock().vm, VmState::Cleaned)
    }
}

/// Runs `f` on a thread; its result, or `None` if it did not return
/// within 10 s (it hangs: the test fails rather than stalls).
fn within<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(10)).ok()
}

#[test]
fn a_container_is_created_started_waited_for_and_deleted() {
    let p = pod();
    let pid = p.create(POD).unwrap();
    assert_eq!(p.status(POD, "").unwrap(), Status::CREATED);
    assert_eq!(p.svc.start(POD, "").unwrap(), pid);
    assert_eq!(p.status(POD, "").unwrap(), Status::RUNNING);
    p.vm.end_process(POD, None, ExitStatus::Code(3), true);
    let svc = p.svc.clone();
    let waited = within(move || svc.wait(POD, "")).expect("wait returned");
    assert_eq!(waited.unwrap().exit_status, 3);
    assert_eq!(p.status(POD, "").unwrap(), Status::STOPPED);
    let deleted = p.svc.delete(POD, "").unwrap();
    assert_eq!((deleted.pid, deleted.exit_status), (pid, 3));
    assert_eq!(code(p.svc.state(POD, "").unwrap_err()), Code::NOT_FOUND);
    assert_eq!(
        p.events.topics(),
        [
            "/tasks/create",
            "/tasks/start",
            "/tasks/exit",
            "/tasks/delete"
        ]
    );
    // The pod's last container went, and its VM with it.
    assert!(p.vm.is_dead() && p.cleaned());
    assert!(!p.pod_dir().exists());
}

#[test]
fn requests_in_the_wrong_state_are_failed_precondition() {
    let p = pod();
    p.running();
    fn precondition<T: std::fmt::Debug>(r: Result<T, TaskError>) -> Code {
        code(r.unwrap_err())
    }
    assert_eq!(
        precondition(p.svc.start(POD, "")),
        Code::FAILED_PRECONDITION
    );
    assert_eq!(
        precondition(p.svc.delete(POD, "")),
        Code::FAILED_PRECONDITION
    );
    p.exec(POD, "e1").unwrap();
    assert_eq!(code(p.exec(POD, "e1").unwrap_err()), Code::ALREADY_EXISTS);
    assert_eq!(
        precondition(p.svc.kill(POD, "e1", 9, false)),
        Code::FAILED_PRECONDITION
    );
    p.svc.start(POD, "e1").unwrap();
    assert_eq!(
        precondition(p.svc.start(POD, "e1")),
        Code::FAILED_PRECONDITION
    );
    assert_eq!(
        precondition(p.svc.delete(POD, "e1")),
        Code::FAILED_PRECONDITION
    );
    p.svc.pause_or_resume(POD, true).unwrap();
    assert_eq!(p.status(POD, "").unwrap(), Status::PAUSED);
    assert_eq!(
        precondition(p.svc.pause_or_resume(POD, true)),
        Code::FAILED_PRECONDITION
    );
    p.svc.pause_or_resume(POD, false).unwrap();
    assert_eq!(
        precondition(p.svc.pause_or_resume(POD, false)),
        Code::FAILED_PRECONDITION
    );
    // Killed: gone from the guest, then in the table.
    p.svc.kill(POD, "", 9, true).unwrap();
    let svc = p.svc.clone();
    assert_eq!(
        within(move || svc.wait(POD, ""))
            .unwrap()
            .unwrap()
            .exit_status,
        137
    );
    // As runc-based shims answer: a finished process is not found.
    assert_eq!(
        code(p.svc.kill(POD, "", 9, false).unwrap_err()),
        Code::NOT_FOUND
    );
    assert_eq!(
        code(p.exec(POD, "e2").unwrap_err()),
        Code::FAILED_PRECONDITION
    );
    assert_eq!(
        precondition(p.svc.start(POD, "")),
        Code::FAILED_PRECONDITION
    );
    let message = p.svc.start(POD, "").unwrap_err().to_string();
    assert_eq!(message, "cannot start container pod: it is stopped");
}

#[test]
fn a_create_that_fails_after_the_vm_booted_leaves_nothing() {
    let p = pod();
    p.vm.hook(|r| {
        matches!(r, Request::CreateContainer(_)).then(|| {
            Err(ClientError::Agent(AgentError::new(
                ErrorCode::System,
                "no space left on the guest",
            )))
        })
    });
    let e = p.create(POD).unwrap_err();
    let message = ttrpc_message(e);
    assert!(
        message.starts_with("cannot create container pod in the guest: the agent refused"),
        "{message}"
    );
    assert_eq!(message.matches("no space left").count(), 1, "{message}");
    // The disk went into a slot and came out; the guest was shut down.
    assert_eq!(
        p.vm.journal(),
        [
            "swap slot0 rootfs-pod.ext4",
            "call create_container",
            "swap slot0 slot0.empty",
            "call shutdown",
        ]
    );
    assert!(p.vm.is_dead() && p.cleaned());
    assert!(!p.pod_dir().exists(), "the pod's files are left");
    assert!(p.events.topics().is_empty(), "{:?}", p.events.topics());
    assert!(p.svc.lock().table.is_empty());
}

fn ttrpc_message(e: TaskError) -> String {
    match containerd_shim::protos::ttrpc::Error::from(e) {
        containerd_shim::protos::ttrpc::Error::RpcStatus(s) => s.message,
        other => format!("{other:?}"),
    }
}

#[test]
fn delete_kills_removes_frees_the_slots_and_then_stops_the_vm() {
    let p = pod();
    p.create(POD).unwrap();
    p.create("c2").unwrap();
    let image = p.pod_dir().join("rootfs-c2.ext4");
    assert!(image.exists());
    let before = p.vm.journal().len();
    // A member, created and never started: its waiting init is killed.
    p.svc.delete("c2", "").unwrap();
    assert_eq!(
        p.vm.journal()[before..],
        [
            "call signal_process",
            "call remove_container",
            "swap slot1 slot1.empty",
        ]
    );
    assert!(!image.exists());
    assert!(!p.vm.is_dead(), "a member's delete stopped the pod");
    // The sandbox: the same, then the VM goes, then containerd hears.
    let before = p.vm.journal().len();
    let deleted = p.svc.delete(POD, "").unwrap();
    assert_eq!(deleted.exit_status, super::VM_GONE_STATUS);
    assert_eq!(
        p.vm.journal()[before..],
        [
            "call signal_process",
            "call remove_container",
            "swap slot0 slot0.empty",
            "call shutdown",
        ]
    );
    assert!(p.cleaned() && !p.pod_dir().exists());
    assert_eq!(
        p.events.topics().last().map(String::as_str),
        Some("/tasks/delete")
    );
    let deleted: Vec<String> = p
        .events
        .of::<TaskDelete>()
        .into_iter()
        .map(|d| d.container_id)
        .collect();
    assert_eq!(deleted, ["c2", POD]);
    // The kills' exits came while the containers were being deleted:
    // expected, not reported, not refused.
    assert!(p.events.exits().is_empty());
    assert_eq!(p.svc.rejected.load(Ordering::Relaxed), 0);
}

#[test]
fn wait_returns_when_the_vm_dies() {
    let p = pod();
    p.running();
    p.exec(POD, "e1").unwrap();
    p.svc.start(POD, "e1").unwrap();
    let (svc, svc2) = (p.svc.clone(), p.svc.clone());
    let init = std::thread::spawn(move || svc.wait(POD, ""));
    let exec = std::thread::spawn(move || svc2.wait(POD, "e1"));
    p.vm.die("killed by the test");
    let init = within(move || init.join().unwrap()).expect("wait returned");
    assert_eq!(init.unwrap().exit_status, super::VM_GONE_STATUS);
    let exec = within(move || exec.join().unwrap()).expect("wait returned");
    assert_eq!(exec.unwrap().exit_status, super::VM_GONE_STATUS);
    assert!(p.events.wait_for(|e| e.exits().len() == 2));
    let svc = p.svc.clone();
    assert!(within(move || svc.wait_cleaned(Duration::from_secs(10))).unwrap());
    assert!(!p.pod_dir().exists());
    // Nothing more is created in a VM that is gone.
    assert_eq!(code(p.create("c2").unwrap_err()), Code::UNAVAILABLE);
}

#[test]
fn a_stalled_exec_start_does_not_hold_up_other_tasks() {
    let p = pod();
    p.running();
    p.create("c2").unwrap();
    p.exec(POD, "e1").unwrap();
    let (entered, release) = (channel(), channel::<()>());
    let (entered_tx, release_rx) = (Mutex::new(entered.0), Mutex::new(release.1));
    p.vm.hook(move |r| {
        if matches!(r, Request::ExecProcess { .. }) {
            let _ = entered_tx.lock().unwrap().send(());
            // A guest that takes its time to answer.
            let _ = release_rx.lock().unwrap().recv();
        }
        None
    });
    let svc = p.svc.clone();
    let start = std::thread::spawn(move || svc.start(POD, "e1"));
    entered.1.recv().unwrap();
    // While the guest sits on the exec: state, start, kill, wait and
    // delete of other tasks go through.
    let svc = p.svc.clone();
    let others = within(move || {
        let state = svc
            .state("c2", "")
            .map(|s| s.status.enum_value_or_default());
        let starting = svc
            .state(POD, "e1")
            .map(|s| s.status.enum_value_or_default());
        svc.start("c2", "").unwrap();
        svc.kill("c2", "", 9, false).unwrap();
        let waited = svc.wait("c2", "").map(|w| w.exit_status);
        svc.delete("c2", "").unwrap();
        (state.unwrap(), starting.unwrap(), waited.unwrap())
    });
    assert_eq!(others, Some((Status::CREATED, Status::CREATED, 137)));
    release.0.send(()).unwrap();
    let pid = within(move || start.join().unwrap()).expect("start returned");
    assert!(pid.unwrap() > 0);
    assert_eq!(p.status(POD, "e1").unwrap(), Status::RUNNING);
}

#[test]
fn the_labels_for_husk_metrics_follow_the_pod_s_containers() {
    use husk_api_types::metrics::{BootHistogram, PodLabels};
    let read = |path: PathBuf| -> PodLabels {
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    };
    let p = pod_with(|c| c.image_slots = 0);
    let name = |n: &str| {
        let n = n.to_string();
        move |spec: &mut oci_spec::runtime::Spec| {
            let mut a = spec.annotations().clone().unwrap_or_default();
            a.insert(crate::metrics::SANDBOX_NAMESPACE.into(), "shop".into());
            a.insert(crate::metrics::SANDBOX_NAME.into(), "cart".into());
            a.insert(crate::metrics::CONTAINER_NAME.into(), n);
            spec.set_annotations(Some(a));
        }
    };
    p.create_with(POD, name("")).unwrap();
    p.create_with("c2", name("web")).unwrap();
    let labels = read(p.pod_dir().join("labels.json"));
    assert_eq!(
        (
            labels.containerd_namespace.as_str(),
            labels.namespace(),
            labels.pod(),
            labels.pod_id.as_str()
        ),
        ("test", "shop", "cart", POD)
    );
    assert!(labels.boot_seconds.is_some());
    // The sandbox has no name annotation: its id names it.
    assert_eq!(labels.drive_container("slot0"), Some(POD));
    assert_eq!(labels.drive_container("slot1"), Some("web"));
    p.svc.delete("c2", "").unwrap();
    let labels = read(p.pod_dir().join("labels.json"));
    assert_eq!(labels.drive_container("slot1"), None);
    assert!(!labels.containers.contains_key("c2"));
    // A create that fails leaves no label behind either.
    p.vm.hook(|r| {
        matches!(r, Request::CreateContainer(_))
            .then(|| Err(ClientError::Agent(AgentError::new(ErrorCode::System, "no"))))
    });
    assert!(p.create_with("c3", name("bad")).is_err());
    let labels = read(p.pod_dir().join("labels.json"));
    assert_eq!(labels.containers.keys().collect::<Vec<_>>(), [POD]);
    assert_eq!(labels.drives.keys().collect::<Vec<_>>(), ["slot0"]);
    // The node's histogram has the boot.
    let h: BootHistogram =
        serde_json::from_slice(&std::fs::read(p.dir.path().join("state/boot-times.json")).unwrap())
            .unwrap();
    assert_eq!(h.count(), 1);
}

#[test]
fn drive_slots_are_handed_out_and_come_back() {
    let p = pod_with(|c| c.drive_slots = 2);
    p.create(POD).unwrap();
    p.create("c2").unwrap();
    let full = p.create("c3").unwrap_err();
    assert_eq!(code(full), Code::RESOURCE_EXHAUSTED);
    // The failed create left no image and the VM runs on.
    assert!(!p.pod_dir().join("rootfs-c3.ext4").exists());
    assert!(!p.vm.is_dead());
    p.svc.delete("c2", "").unwrap();
    p.create("c3").unwrap();
    let journal = p.vm.journal();
    let swaps: Vec<&str> = journal
        .iter()
        .filter(|j| j.starts_with("swap"))
        .map(String::as_str)
        .collect();
    assert_eq!(
        swaps,
        [
            "swap slot0 rootfs-pod.ext4",
            "swap slot1 rootfs-c2.ext4",
            "swap slot1 slot1.empty",
            "swap slot1 rootfs-c3.ext4",
        ]
    );
}

#[test]
fn an_agent_reply_sent_a_byte_at_a_time_fails_at_its_deadline_and_the_pod_still_deletes() {
    // The real client (with its one deadline per call) against a guest
    // that answers every request a byte at a time, for ever.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                use std::io::Write;
                let _: husk_protocol::Hello = husk_protocol::read_frame(&mut conn).unwrap();
                let accepted = husk_protocol::Accepted {
                    version: husk_protocol::PROTOCOL_VERSION,
                    error: None,
                };
                husk_protocol::write_frame(&mut conn, &accepted).unwrap();
                let _: husk_protocol::RequestFrame = husk_protocol::read_frame(&mut conn).unwrap();
                // A length prefix, then a reply that never ends.
                let _ = conn.write_all(&(1u32 << 20).to_be_bytes());
                while conn.write_all(b" ").is_ok() {
                    std::thread::sleep(Duration::from_millis(10));
                }
            });
        }
    });
    let agent = crate::vm::AgentPool::new(Endpoint::Unix(path), Duration::from_millis(200), None);
    let p = pod();
    p.create(POD).unwrap();
    p.vm.hook(move |r| match r {
        Request::SignalProcess { .. } | Request::RemoveContainer { .. } | Request::Shutdown => {
            Some(agent.call(r.clone()))
        }
        _ => None,
    });
    let svc = p.svc.clone();
    let deleted = within(move || svc.delete(POD, "")).expect("delete returned");
    assert!(deleted.is_ok(), "{deleted:?}");
    // Each call failed at its deadline; the guest was not waited for but
    // killed, and nothing is left.
    assert_eq!(
        p.vm.journal()[2..],
        [
            "call signal_process",
            "call remove_container",
            "swap slot0 slot0.empty",
            "call shutdown",
            "kill",
        ]
    );
    assert!(p.cleaned() && !p.pod_dir().exists());
}

/// Threads of this process.
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

#[test]
fn ten_thousand_exit_events_leave_the_thread_count_bounded() {
    const EXECS: usize = 200;
    let p = pod();
    p.running();
    // Processes whose output stays open, as with a background child: an
    // exit then waits for it (up to two seconds).
    p.vm.output_lingers.store(true, Ordering::Relaxed);
    for n in 0..EXECS {
        p.exec(POD, &format!("e{n}")).unwrap();
        p.svc.start(POD, &format!("e{n}")).unwrap();
    }
    let before = threads();
    let mut most = before;
    for n in 0..10_000 {
        let exec_id = format!("e{}", n % (EXECS * 2));
        // Half of them name execs the pod does not have, the rest come
        // twice or more.
        p.vm.send(Event::ProcessExited {
            process: ProcessRef {
                container_id: POD.into(),
                exec_id: Some(exec_id),
            },
            status: ExitStatus::Code(1),
        });
        if n % 100 == 0 {
            most = most.max(threads());
        }
    }
    // Every real exit is held for its output, none reported yet.
    let refused = (10_000 / (EXECS * 2) * EXECS) as u64;
    let svc = p.svc.clone();
    assert!(p
        .events
        .wait_for(|_| svc.rejected.load(Ordering::Relaxed) == refused));
    most = most.max(threads());
    assert!(
        most <= before + 16,
        "{most} threads during the flood, {before} before"
    );
    assert!(p.events.exits().is_empty());
    // The output ends: every exit is reported, once.
    for io in p.vm.stdio() {
        io.finished.store(true, Ordering::Relaxed);
    }
    assert!(p.events.wait_for(|e| e.exits().len() == EXECS));
    assert_eq!(p.svc.rejected.load(Ordering::Relaxed), refused);
}

#[test]
fn events_for_other_containers_or_impossible_statuses_are_refused() {
    let p = pod();
    p.running();
    let exit = |id: &str, exec_id: Option<&str>, status| Event::ProcessExited {
        process: ProcessRef {
            container_id: id.into(),
            exec_id: exec_id.map(Into::into),
        },
        status,
    };
    p.vm.send(Event::Oom {
        container_id: "another-pods-container".into(),
    });
    p.vm.send(exit("another-pods-container", None, ExitStatus::Code(0)));
    p.vm.send(exit(POD, Some("no-such-exec"), ExitStatus::Code(0)));
    p.vm.send(exit(POD, None, ExitStatus::Signal(i32::MAX)));
    p.vm.send(exit(POD, None, ExitStatus::Code(-1)));
    // One of its own, after them on the same queue.
    p.vm.send(Event::Oom {
        container_id: POD.into(),
    });
    assert!(p.events.wait_for(|e| !e.ooms().is_empty()));
    let ooms: Vec<String> = p
        .events
        .ooms()
        .into_iter()
        .map(|o| o.container_id)
        .collect();
    assert_eq!(ooms, [POD]);
    assert_eq!(p.svc.rejected.load(Ordering::Relaxed), 5);
    assert!(p.events.exits().is_empty());
    assert_eq!(p.status(POD, "").unwrap(), Status::RUNNING);
}

#[test]
fn a_lost_event_stream_is_reopened_and_the_missed_exit_delivered() {
    let p = pod();
    p.running();
    // The exit goes to a stream the agent dropped: never seen.
    p.vm.end_process(POD, None, ExitStatus::Code(7), false);
    p.vm.cut_stream();
    let svc = p.svc.clone();
    let waited = within(move || svc.wait(POD, "")).expect("wait returned");
    assert_eq!(waited.unwrap().exit_status, 7);
    assert_eq!(p.vm.streams.load(Ordering::Relaxed), 2);
    assert!(p
        .vm
        .journal()
        .contains(&"call list_process_states".to_string()));
    // Published right after the state changed, which Wait saw.
    assert!(p.events.wait_for(|e| e.exits().len() == 1));
    // Events flow on the new stream.
    p.vm.send(Event::Oom {
        container_id: POD.into(),
    });
    assert!(p.events.wait_for(|e| e.ooms().len() == 1));
}

#[test]
fn an_exit_during_an_exec_start_is_reported_after_the_start() {
    let p = pod();
    p.running();
    p.exec(POD, "e1").unwrap();
    let vm = Arc::downgrade(&p.vm);
    p.vm.hook(move |r| {
        let Request::ExecProcess { .. } = r else {
            return None;
        };
        // The process is quick: its exit is on the stream before the
        // reply to its start.
        let vm = vm.upgrade()?;
        vm.send(Event::ProcessExited {
            process: ProcessRef {
                container_id: POD.into(),
                exec_id: Some("e1".into()),
            },
            status: ExitStatus::Code(5),
        });
        std::thread::sleep(Duration::from_millis(20));
        Some(Ok(Response::Started { pid: 77 }))
    });
    assert_eq!(p.svc.start(POD, "e1").unwrap(), 77);
    let svc = p.svc.clone();
    let waited = within(move || svc.wait(POD, "e1")).expect("wait returned");
    assert_eq!(waited.unwrap().exit_status, 5);
    let topics = p.events.topics();
    let started = topics.iter().position(|t| t == "/tasks/exec-started");
    let exited = topics.iter().position(|t| t == "/tasks/exit");
    assert!(started < exited && started.is_some(), "{topics:?}");
    assert_eq!(p.events.of::<TaskExecStarted>()[0].pid, 77);
    assert_eq!(p.svc.rejected.load(Ordering::Relaxed), 0);
}

#[test]
fn a_second_create_waits_for_the_boot_and_the_vm_boots_once() {
    let p = pod();
    let created = {
        let (a, b) = (p.svc.clone(), p.svc.clone());
        let (ba, bb) = (p.bundle(POD), p.bundle("c2"));
        let one = std::thread::spawn(move || {
            a.create(&CreateTaskRequest {
                id: POD.into(),
                bundle: ba,
                ..Default::default()
            })
        });
        let two = std::thread::spawn(move || {
            b.create(&CreateTaskRequest {
                id: "c2".into(),
                bundle: bb,
                ..Default::default()
            })
        });
        one.join().unwrap().unwrap();
        two.join().unwrap().unwrap();
        p.events.of::<TaskCreate>().len()
    };
    assert_eq!(created, 2);
    assert_eq!(p.vm.streams.load(Ordering::Relaxed), 1, "booted twice");
}

#[test]
fn pausing_one_container_of_several_is_refused() {
    let p = pod();
    p.running();
    p.create("c2").unwrap();
    assert_eq!(
        code(p.svc.pause_or_resume(POD, true).unwrap_err()),
        Code::UNIMPLEMENTED
    );
    assert!(!p.vm.journal().iter().any(|j| j.starts_with("paused")));
}

#[test]
fn ids_that_would_name_paths_outside_the_state_directory_are_refused() {
    let p = pod();
    let outside = p.dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    // The state dir is DIR/state/test/POD: four levels up is DIR.
    for pod_id in ["../../../outside", "/etc", "..", "a/b", "web.1"] {
        let bundle = p.bundle_in("c1", pod_id);
        let r = p.svc.create(&CreateTaskRequest {
            id: "c1".into(),
            bundle,
            ..Default::default()
        });
        let e = r.unwrap_err();
        assert_eq!(e.code(), Code::INVALID_ARGUMENT, "{pod_id}: {e}");
        let message = ttrpc_message(e);
        assert!(
            message.contains("io.kubernetes.cri.sandbox-id") && message.contains(pod_id),
            "{message}"
        );
    }
    for id in ["../c1", "c1/x", ".."] {
        let e = p
            .svc
            .create(&CreateTaskRequest {
                id: id.into(),
                bundle: p.bundle_in("c2", POD),
                ..Default::default()
            })
            .unwrap_err();
        assert_eq!(e.code(), Code::INVALID_ARGUMENT, "{id}: {e}");
    }
    // Nothing booted for them, nothing written anywhere, nothing kept.
    assert!(p.vm.journal().is_empty(), "{:?}", p.vm.journal());
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    assert!(!p.dir.path().join("state").exists());
    assert!(p.svc.lock().table.is_empty());
    assert!(p.events.topics().is_empty());
}

#[test]
fn a_pod_asking_for_the_nodes_namespaces_is_refused_before_it_boots() {
    use oci_spec::runtime::LinuxNamespaceType as T;
    let p = pod();
    let keep_only = |types: &'static [T]| {
        move |spec: &mut oci_spec::runtime::Spec| {
            let linux = spec.linux_mut().as_mut().unwrap();
            let ns = linux.namespaces().clone().unwrap_or_default();
            linux.set_namespaces(Some(
                ns.into_iter()
                    .filter(|n| types.contains(&n.typ()))
                    .collect(),
            ));
        }
    };
    for (types, named) in [
        (&[T::Pid, T::Ipc, T::Mount][..], "network"),
        (&[T::Pid, T::Network, T::Mount][..], "IPC"),
        (&[T::Ipc, T::Network, T::Mount][..], "PID"),
    ] {
        let e = p.create_with(POD, keep_only(types)).unwrap_err();
        assert_eq!(e.code(), Code::INVALID_ARGUMENT, "{e}");
        let message = ttrpc_message(e);
        assert!(
            message.contains(&format!("the node's {named} namespace")) && message.contains("runc"),
            "{message}"
        );
    }
    // The node's own namespace named by path is the node's too.
    let e = p
        .create_with(POD, |spec| {
            let linux = spec.linux_mut().as_mut().unwrap();
            let ns = linux.namespaces().clone().unwrap_or_default();
            linux.set_namespaces(Some(
                ns.into_iter()
                    .map(|mut n| {
                        if n.typ() == T::Network {
                            n.set_path(Some("/proc/self/ns/net".into()));
                        }
                        n
                    })
                    .collect(),
            ));
        })
        .unwrap_err();
    assert!(ttrpc_message(e).contains("the node's network namespace"));
    assert!(p.vm.journal().is_empty(), "{:?}", p.vm.journal());
    assert!(!p.pod_dir().exists());
    assert!(p.svc.lock().table.is_empty());
}

#[test]
fn a_container_binding_the_nodes_socket_is_refused_naming_it() {
    let p = pod();
    p.running();
    let sock = p.dir.path().join("docker.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let before = p.vm.journal().len();
    let e = p
        .create_with("app", |spec| {
            let mut mounts = spec.mounts().clone().unwrap_or_default();
            mounts.push(
                oci_spec::runtime::MountBuilder::default()
                    .destination("/var/run/docker.sock")
                    .typ("bind")
                    .source(sock.clone())
                    .options(vec!["rbind".to_string()])
                    .build()
                    .unwrap(),
            );
            spec.set_mounts(Some(mounts));
        })
        .unwrap_err();
    assert_eq!(e.code(), Code::INVALID_ARGUMENT, "{e}");
    let message = ttrpc_message(e);
    assert!(
        message.contains(&format!(
            "/var/run/docker.sock (the node's socket {})",
            sock.display()
        )) && message.contains("cannot reach the node's sockets"),
        "{message}"
    );
    // Nothing reached the guest; the sandbox runs on.
    assert_eq!(p.vm.journal().len(), before, "{:?}", p.vm.journal());
    assert!(!p.svc.lock().table.has("app"));
    assert_eq!(p.status(POD, "").unwrap(), Status::RUNNING);
}

#[test]
fn a_guest_that_crashes_under_a_create_is_named_with_its_log() {
    let p = pod();
    *p.vm.log.lock().unwrap() =
        "ERROR vCPU state at the guest's failure exit=vCPU 0 triple-faulted".into();
    let vm = p.vm.clone();
    p.vm.hook(move |r| {
        matches!(r, Request::CreateContainer(_)).then(|| {
            // husk's exit is noticed after the agent's connection broke.
            let vm = vm.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(10));
                vm.die("exit status: 3");
            });
            Err(ClientError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the peer closed the connection",
            )))
        })
    });
    let e = p.create(POD).unwrap_err();
    assert_eq!(e.code(), Code::UNAVAILABLE, "{e}");
    let message = ttrpc_message(e);
    assert!(
        message.starts_with("the pod's microVM ended (exit status: 3) meanwhile")
            && message.contains("triple-faulted")
            && message.contains("cannot create container pod in the guest")
            && message.contains("the peer closed the connection"),
        "{message}"
    );
    // The exit's clean-up finishes on its own thread.
    let t0 = std::time::Instant::now();
    while !p.cleaned() && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(p.cleaned());
    assert!(!p.pod_dir().exists());

    // An agent that refuses is not a VM that ended, and a VM the shim
    // stops itself after a failed create is not named as its cause.
    let q = pod();
    q.vm.hook(|r| {
        matches!(r, Request::CreateContainer(_)).then(|| {
            Err(ClientError::Agent(AgentError::new(
                ErrorCode::System,
                "no space",
            )))
        })
    });
    let message = ttrpc_message(q.create(POD).unwrap_err());
    assert!(
        message.starts_with("cannot create container pod in the guest"),
        "{message}"
    );
}

/// A spec change giving the container a memory limit of `mib` and `cpus`
/// CPUs (quota over a 100 ms period).
fn limits(mib: i64, cpus: i64) -> impl FnOnce(&mut oci_spec::runtime::Spec) {
    move |s| {
        let resources: oci_spec::runtime::LinuxResources = serde_json::from_value(
            serde_json::json!({"memory": {"limit": mib << 20}, "cpu": {"quota": cpus * 100000, "period": 100000}}),
        )
        .unwrap();
        let mut linux = s.linux().clone().unwrap_or_default();
        linux.set_resources(Some(resources));
        s.set_linux(Some(linux));
    }
}

/// The resizes the VM was asked for: `memory N` and `cpus N` entries.
fn resizes(vm: &FakeVm) -> Vec<String> {
    vm.journal()
        .into_iter()
        .filter(|e| e.starts_with("memory ") || e == "call set_online_cpus")
        .collect()
}

fn sized_pod() -> Pod {
    pod_with(|c| {
        c.default_memory_mib = 128;
        c.max_vcpus = 4;
        c.max_memory_mib = 2048;
        c.agent_timeout_secs = 1;
    })
}

#[test]
fn a_container_past_the_boot_size_grows_the_vm_before_it_is_created() {
    let p = sized_pod();
    p.create(POD).unwrap();
    let spec = p.vm.spec.lock().unwrap().clone().unwrap();
    assert_eq!(
        (spec.vcpus, spec.max_vcpus, spec.mem_mib),
        (1, 4, 128),
        "{spec:?}"
    );
    assert_eq!(spec.hotplug_mib, 1920);
    assert!(resizes(&p.vm).is_empty(), "{:?}", p.vm.journal());
    p.create_with("app", limits(1024, 2)).unwrap();
    // Memory and vCPUs first, then the container.
    let journal = p.vm.journal();
    let grown = journal.iter().position(|e| e == "memory 1024").unwrap();
    let cpus = journal
        .iter()
        .position(|e| e == "call set_online_cpus")
        .unwrap();
    let created = journal
        .iter()
        .rposition(|e| e == "call create_container")
        .unwrap();
    assert!(grown < created && cpus < created, "{journal:?}");
    // Its end gives both back.
    p.svc.kill("app", "", 9, false).unwrap();
    assert!(p.events.wait_for(|e| e.exits().len() == 1));
    p.svc.delete("app", "").unwrap();
    assert_eq!(
        resizes(&p.vm),
        [
            "memory 1024",
            "call set_online_cpus",
            "memory 0",
            "call set_online_cpus"
        ]
    );
}

#[test]
fn a_limit_the_vm_cannot_have_is_refused_naming_it_and_nothing_is_plugged() {
    let p = sized_pod();
    p.create(POD).unwrap();
    let e = p.create_with("big", limits(4096, 1)).unwrap_err();
    assert_eq!(e.code(), Code::RESOURCE_EXHAUSTED);
    let message = crate::error::Chain(&e).to_string();
    assert!(
        message.contains("container big's memory limit of 4096 MiB")
            && message.contains("at most 2048 MiB"),
        "{message}"
    );
    assert!(resizes(&p.vm).is_empty(), "{:?}", p.vm.journal());
    // The pod goes on, and a container that fits is created.
    p.create_with("fits", limits(512, 1)).unwrap();
    assert_eq!(resizes(&p.vm), ["memory 512"]);
}

#[test]
fn memory_the_guest_does_not_plug_fails_the_create_and_is_given_back() {
    let p = sized_pod();
    p.create(POD).unwrap();
    p.vm.plug_stalls.store(true, Ordering::Relaxed);
    let e = p.create_with("app", limits(256, 1)).unwrap_err();
    assert_eq!(e.code(), Code::RESOURCE_EXHAUSTED);
    assert!(e.to_string().contains("did not plug the 256 MiB"), "{e}");
    assert_eq!(resizes(&p.vm), ["memory 256", "memory 0"]);
    assert_eq!(p.status("app", "").unwrap_err().code(), Code::NOT_FOUND);
}

#[test]
fn an_update_grows_before_the_guest_and_shrinks_after_it() {
    let p = sized_pod();
    p.create(POD).unwrap();
    p.create_with("app", limits(256, 1)).unwrap();
    let update = |mib: i64| {
        let r = serde_json::json!({"memory": {"limit": mib << 20}});
        p.svc.update("app", &serde_json::to_vec(&r).unwrap())
    };
    update(1024).unwrap();
    update(256).unwrap();
    let journal: Vec<String> =
        p.vm.journal()
            .into_iter()
            .filter(|e| e.starts_with("memory ") || e == "call update_container")
            .collect();
    assert_eq!(
        journal,
        [
            "memory 256",
            "memory 1024",
            "call update_container",
            "call update_container",
            "memory 256"
        ]
    );
    // Past the most the VM can have: refused before the guest is asked.
    assert_eq!(update(4096).unwrap_err().code(), Code::RESOURCE_EXHAUSTED);
    assert_eq!(
        p.vm.journal()
            .iter()
            .filter(|e| *e == "call update_container")
            .count(),
        2
    );
}

#[test]
fn a_sized_pod_boots_small_and_gets_its_size_right_after() {
    let p = sized_pod();
    p.create_with(POD, |s| {
        let mut a = s.annotations().clone().unwrap_or_default();
        a.insert(
            crate::sizing::SANDBOX_MEMORY.into(),
            (1u64 << 30).to_string(),
        );
        a.insert(crate::sizing::SANDBOX_CPU_QUOTA.into(), "200000".into());
        a.insert(crate::sizing::SANDBOX_CPU_PERIOD.into(), "100000".into());
        s.set_annotations(Some(a));
    })
    .unwrap();
    let spec = p.vm.spec.lock().unwrap().clone().unwrap();
    assert_eq!((spec.vcpus, spec.mem_mib), (1, 128), "{spec:?}");
    // Asked for without waiting; the vCPUs on a thread of their own.
    let journal = || p.vm.journal();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !journal().iter().any(|e| e == "call set_online_cpus") {
        assert!(std::time::Instant::now() < deadline, "{:?}", journal());
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(
        journal().iter().any(|e| e == "memory 1024"),
        "{:?}",
        journal()
    );
    // A container within the pod's size waits for what is plugged, and
    // asks for nothing more.
    p.create_with("app", limits(1024, 2)).unwrap();
    assert_eq!(
        resizes(&p.vm)
            .iter()
            .filter(|e| e.starts_with("memory"))
            .count(),
        1
    );
}

/// A bind mount of `source` at `destination` (read-only if asked).
fn bind(source: &std::path::Path, destination: &str, read_only: bool) -> oci_spec::runtime::Mount {
    let mode = if read_only { "ro" } else { "rw" };
    oci_spec::runtime::MountBuilder::default()
        .destination(destination)
        .typ("bind")
        .source(source)
        .options(vec!["rbind".to_string(), mode.to_string()])
        .build()
        .unwrap()
}

#[test]
fn shared_volumes_are_one_entry_per_source_and_go_with_their_last_container() {
    let p = pod();
    let data = p.dir.path().join("emptydir");
    let hosts = p.dir.path().join("hosts");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
    let sources = Arc::new(Mutex::new(Vec::new()));
    let seen = sources.clone();
    p.vm.hook(move |r| {
        if let Request::CreateContainer(c) = r {
            let binds: Vec<String> = c
                .spec
                .mounts()
                .iter()
                .flatten()
                .filter(|m| m.typ().as_deref() == Some("bind"))
                .map(|m| {
                    format!(
                        "{} {}",
                        m.destination().display(),
                        m.source().as_ref().unwrap().display()
                    )
                })
                .collect();
            seen.lock()
                .unwrap()
                .push((c.container_id.clone(), binds, c.volumes.is_some()));
        }
        None
    });
    p.running();
    let share = crate::share::share_dir(&p.pod_dir());
    assert!(share.join("root").is_dir(), "the share is made with the VM");
    let with = |ro_hosts: bool| {
        let (data, hosts) = (data.clone(), hosts.clone());
        move |spec: &mut oci_spec::runtime::Spec| {
            let mut mounts = spec.mounts().clone().unwrap_or_default();
            mounts.push(bind(&data, "/scratch", false));
            if ro_hosts {
                mounts.push(bind(&hosts, "/etc/hosts", true));
            }
            spec.set_mounts(Some(mounts));
        }
    };
    p.create_with("init", with(true)).unwrap();
    p.create_with("main", with(false)).unwrap();
    assert_eq!(
        sources.lock().unwrap()[1..],
        [
            (
                "init".to_string(),
                vec![
                    "/scratch /.husk-shares/husk-pod/v0".to_string(),
                    "/etc/hosts /.husk-shares/husk-pod/v1".to_string()
                ],
                false
            ),
            (
                "main".to_string(),
                vec!["/scratch /.husk-shares/husk-pod/v0".to_string()],
                false
            ),
        ]
    );
    // No volumes disk: only the rootfs took a slot.
    assert!(
        !p.vm.journal().iter().any(|j| j.contains("volumes-")),
        "{:?}",
        p.vm.journal()
    );
    let calls = || p.mounts.0.lock().unwrap().clone();
    assert_eq!(
        calls()[1..],
        [
            "bind emptydir v0 rw,rbind,rprivate",
            "bind hosts v1 ro,rbind,rprivate"
        ]
        .map(String::from)
    );
    p.svc.delete("init", "").unwrap();
    assert_eq!(calls().last().map(String::as_str), Some("detach v1"));
    p.svc.delete("main", "").unwrap();
    assert_eq!(calls().last().map(String::as_str), Some("detach v0"));
    // The VM's end takes the share down.
    p.vm.die("killed by the test");
    let svc = p.svc.clone();
    assert!(within(move || svc.wait_cleaned(Duration::from_secs(10))).unwrap());
    assert_eq!(calls().last().map(String::as_str), Some("detach_all"));
    assert!(!share.exists());
}

#[test]
fn a_volume_that_cannot_be_shared_fails_its_container_and_leaves_no_entry() {
    let p = pod();
    p.running();
    let data = p.dir.path().join("refused");
    std::fs::create_dir(&data).unwrap();
    let before = p.vm.journal().len();
    let e = p
        .create_with("app", |spec| {
            let mut mounts = spec.mounts().clone().unwrap_or_default();
            mounts.push(bind(&p.dir.path().join("missing"), "/a", false));
            spec.set_mounts(Some(mounts));
        })
        .unwrap_err();
    let message = ttrpc_message(e);
    assert!(
        message.contains("cannot share volume") && message.contains("missing"),
        "{message}"
    );
    let e = p
        .create_with("app", |spec| {
            let mut mounts = spec.mounts().clone().unwrap_or_default();
            mounts.push(bind(&data, "/a", false));
            spec.set_mounts(Some(mounts));
        })
        .unwrap_err();
    let message = ttrpc_message(e);
    assert!(
        message.contains("refused") && message.contains("Operation not permitted"),
        "{message}"
    );
    // Refused before its disks: nothing reached a slot or the agent.
    assert_eq!(p.vm.journal().len(), before, "{:?}", p.vm.journal());
    let entries: Vec<_> = std::fs::read_dir(crate::share::share_dir(&p.pod_dir()).join("entries"))
        .unwrap()
        .collect();
    assert!(entries.is_empty(), "{entries:?}");
    assert_eq!(p.status(POD, "").unwrap(), Status::RUNNING);
}

#[test]
fn a_shared_root_takes_no_slot_and_its_entry_goes_with_the_container() {
    let p = pod_with(|c| c.rootfs = crate::config::RootfsMode::Share);
    let roots = Arc::new(Mutex::new(Vec::new()));
    let seen = roots.clone();
    p.vm.hook(move |r| {
        if let Request::CreateContainer(c) = r {
            seen.lock().unwrap().push((
                c.container_id.clone(),
                c.rootfs.share.clone(),
                c.rootfs.drive_id.clone(),
            ));
        }
        None
    });
    p.running();
    // More containers than the pod has writable slots.
    let slots = p.svc.config.drive_slots;
    for i in 0..=slots {
        p.create(&format!("c{i}")).unwrap();
    }
    assert!(
        !p.vm.journal().iter().any(|j| j.starts_with("swap")),
        "{:?}",
        p.vm.journal()
    );
    let roots = roots.lock().unwrap().clone();
    assert_eq!(roots.len() as u32, slots + 2);
    assert_eq!(
        roots[1],
        (
            "c0".to_string(),
            Some("/.husk-shares/husk-pod/v1".to_string()),
            String::new()
        )
    );
    p.svc.delete("c0", "").unwrap();
    assert_eq!(
        p.mounts.0.lock().unwrap().last().map(String::as_str),
        Some("detach v1")
    );
}
