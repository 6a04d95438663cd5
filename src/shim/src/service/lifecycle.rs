//! The pod's VM from boot to end. The first create boots it (others wait
//! on the Booting state, not on a lock); three threads then serve it: one
//! waits for husk to exit, one reads the agent's event stream, one turns
//! events into task events (`events.rs`). husk's end ends every process
//! (status 255), undoes the pod's network and removes its files; a stop
//! asks the agent to power the guest off and kills husk if it does not.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use containerd_shim::protos::events::task::TaskExit;
use containerd_shim::protos::protobuf::MessageField;
use oci_spec::runtime::Spec;

use super::events::{self, Job, QUEUE};
use super::resize::Sizing;
use super::state::{RunningPod, VmEnd, VmState};
use super::{now, pod_dir, Inner, TaskError, VM_GONE_STATUS};
use crate::cgroup::{self, PodCgroup};
use crate::config::Config;
use crate::error::Chain;
use crate::jail::PodJail;
use crate::pod::{EventStream, VmSpec};
use crate::portforward::PortForward;
use crate::share::{self, PodShare};
use crate::sizing::{self, Plan};
use crate::slots::{self, Slots};
use crate::{network, spec, vm};
use husk_protocol::client::Endpoint;
use husk_protocol::DEFAULT_AGENT_PORT;

/// How long the agent may take to answer a shutdown (it answers at once,
/// then stops what is left and powers the guest off).
const SHUTDOWN_ANSWER: Duration = Duration::from_secs(5);

/// How long husk may take to exit after the guest was asked to power off
/// (or after it was killed), and its files to go.
const CLEANUP: Duration = Duration::from_secs(10);

/// Starts a named thread; a thread the system cannot give is an error.
fn spawn(name: &'static str, f: impl FnOnce() + Send + 'static) -> Result<(), TaskError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map(drop)
        .map_err(|source| TaskError::Thread { what: name, source })
}

/// A VM just booted, before its threads run.
struct Booted {
    pod: Arc<RunningPod>,
    /// The event worker's end of the queue.
    jobs: Receiver<Job>,
    /// The agent's event stream, if it opened.
    stream: Option<Box<dyn EventStream>>,
}

impl Inner {
    /// The running VM, booted first if no create has.
    pub(super) fn ensure_vm(
        self: &Arc<Self>,
        pod_id: &str,
        spec: &Spec,
    ) -> Result<Arc<RunningPod>, TaskError> {
        {
            let mut st = self.lock();
            loop {
                match &st.vm {
                    VmState::Running { pod, .. } => return Ok(pod.clone()),
                    VmState::Booting => {
                        st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
                    }
                    VmState::Gone | VmState::Cleaned => return Err(TaskError::VmExited),
                    VmState::NotBooted => break,
                }
            }
            st.vm = VmState::Booting;
            st.pod_id = Some(pod_id.to_string());
        }
        let booted = self.boot(pod_id, spec);
        let Booted { pod, jobs, stream } = match booted {
            Ok(b) => b,
            Err(e) => {
                self.lock().vm = VmState::NotBooted;
                self.changed.notify_all();
                return Err(e);
            }
        };
        // The pod's own size, asked for while its first containers are made.
        pod.presize();
        self.lock().vm = VmState::Running {
            pod: pod.clone(),
            paused: false,
        };
        self.changed.notify_all();
        self.serve(&pod, jobs, stream)?;
        Ok(pod)
    }

    /// Boots the VM: the pod's network wired first, husk in it.
    fn boot(&self, pod_id: &str, spec: &Spec) -> Result<Booted, TaskError> {
        let plan = Plan::new(&self.config, spec, sizing::host_memory_mib());
        // Refused before anything is made: never a pod that runs and
        // silently lacks what it asked for.
        let mut shared = spec::host_namespaces(spec);
        let netns = network::netns_path(spec);
        if netns.as_deref().is_some_and(network::is_the_nodes) {
            shared.insert(0, "network");
        }
        if !shared.is_empty() {
            return Err(TaskError::HostNamespaces(shared));
        }
        let dir = self.pod_dir(pod_id);
        let jail = if self.config.jailer {
            Some(Arc::new(
                PodJail::claim(&self.config, &dir).map_err(|e| TaskError::Jail(Box::new(e)))?,
            ))
        } else {
            tracing::warn!(
                pod = pod_id,
                "jailer = false: husk runs as root, unconfined but for seccomp"
            );
            None
        };
        let owner = jail.as_ref().map(|j| (j.uid, j.gid));
        let cgroup = self.pod_cgroup(spec)?;
        let network = match netns {
            Some(netns) => match network::setup(&netns, owner) {
                Ok(n) => n,
                Err(e) => {
                    if let Some(cg) = &cgroup {
                        cg.remove();
                    }
                    return Err(TaskError::Network(Box::new(e)));
                }
            },
            None => None,
        };
        // The pod's share: made before the VM (virtiofsd serves it from
        // the start), taken down with it.
        let share = match self.config.volumes {
            crate::config::Volumes::Share => {
                match PodShare::create(&share::share_dir(&dir.0), self.mounter.clone()) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        if let Some(net) = &network {
                            network::teardown(net);
                        }
                        if let Some(cg) = &cgroup {
                            cg.remove();
                        }
                        return Err(TaskError::Share {
                            what: "the pod's volumes".into(),
                            source: Box::new(e),
                        });
                    }
                }
            }
            crate::config::Volumes::Copy => None,
        };
        let vm_spec = VmSpec {
            id: pod_id.to_string(),
            vcpus: plan.boot_vcpus,
            max_vcpus: plan.max_vcpus,
            mem_mib: plan.boot_mib,
            hotplug_mib: plan.hotplug_mib,
            cgroup: cgroup.as_ref().map(|c| c.path().to_path_buf()),
            hostname: spec.hostname().clone(),
            network: network.clone(),
            jail,
            share: share.as_ref().map(PodShare::served),
        };
        let slot_specs = slots::layout(&self.config, &dir);
        tracing::info!(pod = pod_id, vcpus = plan.boot_vcpus, max_vcpus = plan.max_vcpus,
            mem_mib = plan.boot_mib, hotplug_mib = plan.hotplug_mib,
            cgroup = ?vm_spec.cgroup, dir = %dir.0.display(), "booting the pod's microVM");
        let started = Instant::now();
        let vm = match self.launcher.boot(&dir, &vm_spec, &slot_specs) {
            Ok(vm) => vm,
            Err(e) => {
                if let Some(s) = &share {
                    s.remove();
                }
                if let Some(net) = &network {
                    network::teardown(net);
                }
                if let Some(cg) = &cgroup {
                    cg.remove();
                }
                return Err(TaskError::Boot(Box::new(e)));
            }
        };
        // For `husk metrics`: the pod's labels beside husk's metrics, the
        // boot in the node's histogram.
        let boot_seconds = started.elapsed().as_secs_f64();
        let labels = crate::metrics::LabelsFile::create(
            dir.labels(),
            crate::metrics::pod_labels(&self.namespace, pod_id, spec, boot_seconds),
        );
        if let Err(e) = crate::metrics::record_boot(&self.config.state_dir, boot_seconds) {
            tracing::warn!(error = %Chain(&e), "cannot record the boot's duration for husk metrics");
        }
        // Subscribed before any container exists, so no exit can be missed.
        let stream = match vm.events() {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %Chain(&e), "cannot open the agent's event stream yet");
                None
            }
        };
        // kubectl port-forward: containerd dials the port in the pod's
        // namespace; the shim carries it into the guest. A node that
        // cannot (no BPF) runs the pod without it.
        let port_forward = match &network {
            Some(net) => match PortForward::start(
                &net.netns,
                Endpoint::Vsock {
                    uds: dir.vsock(),
                    port: DEFAULT_AGENT_PORT,
                },
            ) {
                Ok(f) => Some(f),
                Err(e) => {
                    tracing::warn!(error = %Chain(&e),
                        "port forwarding into the pod is not available");
                    None
                }
            },
            None => None,
        };
        let (events, jobs) = sync_channel(QUEUE);
        let pod = Arc::new(RunningPod {
            vm,
            dir,
            slots: Mutex::new(Slots::new(&slot_specs)),
            network,
            cgroup,
            port_forward: Mutex::new(port_forward),
            // The agent's deadline: as long as any guest step may take.
            sizing: Mutex::new(Sizing::new(
                plan,
                Duration::from_secs(self.config.agent_timeout_secs),
            )),
            events,
            labels,
            jail: vm_spec.jail.clone(),
            share,
        });
        Ok(Booted { pod, jobs, stream })
    }

    /// The pod's cgroup on the node from the sandbox's cgroupsPath, made;
    /// none without one, or on a node without cgroup v2 (logged).
    fn pod_cgroup(&self, spec: &Spec) -> Result<Option<PodCgroup>, TaskError> {
        let Some(path) = spec
            .linux()
            .as_ref()
            .and_then(|l| l.cgroups_path().as_ref())
            .and_then(|p| p.to_str())
            .filter(|p| !p.is_empty())
        else {
            return Ok(None);
        };
        let relative = cgroup::resolve(path).map_err(TaskError::Cgroup)?;
        let root = Path::new(cgroup::ROOT);
        if !cgroup::is_v2(root) {
            tracing::warn!(cgroups_path = path,
                "the node has no cgroup v2 hierarchy: the pod's microVM is not charged to the pod's cgroup");
            return Ok(None);
        }
        PodCgroup::create(root, &relative)
            .map(Some)
            .map_err(TaskError::Cgroup)
    }

    /// Starts the running VM's threads. If one cannot start, husk is
    /// killed and its end handled as any other.
    fn serve(
        self: &Arc<Self>,
        pod: &Arc<RunningPod>,
        jobs: Receiver<Job>,
        stream: Option<Box<dyn EventStream>>,
    ) -> Result<(), TaskError> {
        let me = Arc::downgrade(self);
        let vm = pod.vm.clone();
        let watched = spawn("shim-vm-watch", move || {
            let how = vm.wait_exit();
            if let Some(me) = me.upgrade() {
                me.vm_exited(&how);
            }
        });
        if let Err(e) = watched {
            pod.vm.kill();
            let how = pod.vm.wait_exit();
            self.vm_exited(&how);
            return Err(e);
        }
        let me = Arc::downgrade(self);
        let others = spawn("shim-exits", move || events::worker(me, jobs)).and_then(|()| {
            let (me, vm, queue) = (Arc::downgrade(self), pod.vm.clone(), pod.events.clone());
            spawn("shim-events", move || events::reader(me, vm, queue, stream))
        });
        if others.is_err() {
            pod.vm.kill();
        }
        others
    }

    /// husk exited: every process still running is reported exited, and
    /// the VM's network and files go.
    pub(super) fn vm_exited(&self, how: &str) {
        let exited_at = now();
        let mut exits = Vec::new();
        let mut ios = Vec::new();
        // Unwired before any task shows as exited: whoever acts on the
        // exit (a new pod in the same namespace) finds the namespace as
        // CNI left it. (This thread alone ends the VM.)
        let Some(running) = self.lock().vm.running().cloned() else {
            return;
        };
        if let Some(net) = &running.network {
            network::teardown(net);
        }
        drop(running);
        let pod = {
            let mut st = self.lock();
            let pod = match std::mem::replace(&mut st.vm, VmState::Gone) {
                VmState::Running { pod, .. } => pod,
                other => {
                    st.vm = other;
                    return;
                }
            };
            for (cid, c) in st.table.containers.iter_mut() {
                for (exec, p) in c.processes_mut() {
                    if let Some(io) = p.end(VM_GONE_STATUS, exited_at.clone()) {
                        ios.extend(io);
                        let id = if exec.is_empty() { cid } else { exec };
                        exits.push((cid.clone(), id.to_string(), p.pid()));
                    }
                }
                // Its files go with the pod's directory.
                c.image = None;
                c.volumes_image = None;
            }
            pod
        };
        self.changed.notify_all();
        pod.port_forward
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        // husk has exited: its cgroup is empty.
        if let Some(cg) = &pod.cgroup {
            cg.remove();
        }
        // Read before the directory goes: a crashed guest's only evidence.
        let log = pod.vm.log_tail();
        // husk exits 0 when its guest reset or shut down; anything else on
        // its own (a crash is 3) is a failure, even with nothing running.
        let failed = how.starts_with("exit status") && how != "exit status: 0";
        if !exits.is_empty() {
            tracing::error!(
                how,
                processes = exits.len(),
                log,
                "the pod's microVM exited under running processes"
            );
        } else if failed {
            tracing::warn!(how, log, "the pod's microVM failed");
        } else {
            tracing::info!(how, "the pod's microVM exited");
        }
        self.lock().vm_end = Some(VmEnd {
            how: how.to_string(),
            log,
        });
        self.changed.notify_all();
        for io in ios {
            io.finish();
        }
        for (container_id, id, pid) in exits {
            self.publish(TaskExit {
                container_id,
                id,
                pid,
                exit_status: VM_GONE_STATUS,
                exited_at: MessageField::some(exited_at.clone()),
                ..Default::default()
            });
        }
        // husk and virtiofsd are gone: the share's mounts go.
        if let Some(s) = &pod.share {
            s.remove();
        }
        // Sockets, disk images, the log: nothing of the VM stays; its
        // jail uid is free (not when the last handle goes, which a thread
        // still running at the shim's exit would never let happen).
        vm::remove_dir(&pod.dir);
        if let Some(jail) = &pod.jail {
            jail.release();
        }
        tracing::debug!(
            rejected_events = self.rejected.load(Ordering::Relaxed),
            "the pod's microVM is cleaned up"
        );
        drop(pod);
        self.lock().vm = VmState::Cleaned;
        self.changed.notify_all();
    }

    /// Shuts the guest down (the agent stops what is left and resets it)
    /// and waits for husk to exit and its end to be handled; kills husk
    /// if the guest does not go.
    pub(super) fn stop_vm(&self) {
        let pod = self.lock().vm.running().cloned();
        if let Some(pod) = pod {
            if !pod.vm.shutdown_guest(SHUTDOWN_ANSWER) || !self.wait_cleaned(CLEANUP) {
                tracing::warn!(
                    pid = pod.vm.pid(),
                    "the guest did not shut down; killing husk"
                );
                pod.vm.kill();
            }
        }
        // The VM's end is handled on its watcher thread: wait for the
        // files and the network to be gone, so the shim never exits
        // half-way through.
        let booted = matches!(self.lock().vm, VmState::Running { .. } | VmState::Gone);
        if booted && !self.wait_cleaned(CLEANUP) {
            tracing::warn!("the pod's microVM was not cleaned up in time");
        }
    }

    /// Waits until the VM's end is fully handled; false on timeout.
    pub(super) fn wait_cleaned(&self, limit: Duration) -> bool {
        let st = self.lock();
        let (_st, timeout) = self
            .changed
            .wait_timeout_while(st, limit, |s| !matches!(s.vm, VmState::Cleaned))
            .unwrap_or_else(|e| e.into_inner());
        !timeout.timed_out()
    }

    /// Shutdown: once no container is left, the VM goes and the shim
    /// exits.
    pub(super) fn shutdown(&self) {
        if !self.lock().table.is_empty() {
            return;
        }
        self.stop_vm();
        let pod_id = self.lock().pod_id.clone();
        if let Some(pod_id) = pod_id {
            vm::remove_dir(&self.pod_dir(&pod_id));
        }
        self.exit.signal();
    }
}

/// What `containerd-shim-husk-v2 delete` does after a shim crash: kill the
/// pod's husk if it was this container's pod, remove the container's disk
/// (and the pod's state if it was the pod), unmount the bundle's rootfs.
pub fn cleanup_after_crash(config: &Config, namespace: &str, id: &str, bundle: &Path) {
    let pod_id = Spec::load(bundle.join("config.json"))
        .map(|s| spec::sandbox_id(&s, id))
        .unwrap_or_else(|_| id.to_string());
    // Ids create refused never had files; they name none here either.
    let valid = spec::valid_pod_id(&pod_id) && spec::valid_container_id(id);
    let dir = pod_dir(config, namespace, &pod_id);
    if !valid {
        tracing::warn!(pod = %pod_id, container = id, "invalid ids: no state to remove");
    } else if pod_id == id {
        vm::kill_recorded(&dir);
        crate::virtiofsd::kill_recorded(&dir);
        share::remove(&share::share_dir(&dir.0), &share::Kernel);
        vm::remove_dir(&dir);
    } else {
        let _ = std::fs::remove_file(dir.image(id));
        let _ = std::fs::remove_file(dir.volumes_image(id));
    }
    let _ =
        containerd_shim::mount::umount_recursive(bundle.join("rootfs").to_str(), libc::MNT_DETACH);
}
