//! The container runtime: the table of the pod's containers and the
//! request handlers. A container is *created* (root filesystem mounted,
//! cgroup made, init process cloned and set up, waiting before execve),
//! then *running* (StartContainer let it exec), then *stopped* (its init
//! exited); RemoveContainer undoes it all. Processes run in their own
//! mount, pid, ipc and uts namespaces as the spec asks, and share the
//! guest's network namespace (the VM is the pod) unless the spec asks for a
//! new one. Nothing here panics on bad input: every failure is an
//! [`AgentError`] reply.

pub mod caps;
pub mod cgroup;
mod child;
pub mod devices;
pub mod plan;
pub mod process;
pub mod rootfs;
pub mod seccomp;
pub mod stdio;
mod syscalls;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use husk_protocol::{
    AgentError, CreateContainer, ErrorCode, Event, ExitStatus, ProcessRef, ProcessState, Stats,
    StdioStream,
};
use oci_spec::runtime::{LinuxResources, Spec};

use self::cgroup::Cgroup;
use self::plan::Plan;
use self::process::Spawned;
use self::rootfs::MountedRootfs;
use self::stdio::{Attachment, ProcStdio};
use crate::config::{Drives, Paths};
use crate::events::Events;
use crate::reaper::{Exit, Reaper};

/// One process the agent started.
struct Proc {
    pid: i32,
    exit: Arc<Exit>,
    stdio: Arc<ProcStdio>,
}

struct Container {
    rootfs: MountedRootfs,
    cgroup: Option<Cgroup>,
    plan: Plan,
    spec: Spec,
    init: Proc,
    spawned: Spawned,
    started: bool,
    execs: HashMap<String, Proc>,
    /// The init's namespaces for execs to join, and its pid namespace.
    ns: Namespaces,
    pidns: Option<OwnedFd>,
}

impl Container {
    fn stopped(&self) -> bool {
        self.init.exit.status().is_some()
    }

    fn process(&self, exec_id: Option<&str>) -> Result<&Proc, AgentError> {
        match exec_id {
            None => Ok(&self.init),
            Some(e) => self.execs.get(e).ok_or_else(|| {
                AgentError::new(
                    ErrorCode::NotFound,
                    format!("no process {e:?} in the container"),
                )
            }),
        }
    }
}

/// The pod's containers and what creating them needs: the one owner of
/// the container table.
pub struct Containers {
    table: Mutex<BTreeMap<String, Container>>,
    /// The virtio-fs shares mounted so far (by tag).
    shares: Mutex<std::collections::BTreeSet<String>>,
    paths: Paths,
    drives: Drives,
    reaper: Arc<Reaper>,
    events: Events,
}

fn not_found(id: &str) -> AgentError {
    AgentError::new(ErrorCode::NotFound, format!("no container {id:?}"))
}

fn precondition(msg: impl Into<String>) -> AgentError {
    AgentError::new(ErrorCode::FailedPrecondition, msg)
}

fn check_id(kind: &str, id: &str) -> Result<(), AgentError> {
    if id.is_empty()
        || id.len() > 64
        || id.starts_with('.')
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(AgentError::new(
            ErrorCode::InvalidArgument,
            format!("{kind} id {id:?}: 1-64 of [A-Za-z0-9._-], not starting with '.'"),
        ));
    }
    Ok(())
}

fn id_maps(spec: &Spec) -> Option<(String, String)> {
    let linux = spec.linux().as_ref()?;
    let new_user = linux
        .namespaces()
        .iter()
        .flatten()
        .any(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::User && n.path().is_none());
    if !new_user {
        return None;
    }
    let fmt = |maps: &Option<Vec<oci_spec::runtime::LinuxIdMapping>>| {
        maps.iter()
            .flatten()
            .map(|m| format!("{} {} {}\n", m.container_id(), m.host_id(), m.size()))
            .collect::<String>()
    };
    Some((fmt(linux.uid_mappings()), fmt(linux.gid_mappings())))
}

/// Namespace fds with their CLONE_NEW* types.
type Namespaces = Vec<(OwnedFd, libc::c_int)>;

/// The init's namespaces an exec joins (all but pid, which is entered
/// around the clone; the user namespace only if the container has its own).
fn open_namespaces(
    pid: i32,
    flags: libc::c_int,
) -> Result<(Namespaces, Option<OwnedFd>), AgentError> {
    let mut out = Vec::new();
    let mut kinds = vec![
        ("mnt", libc::CLONE_NEWNS),
        ("uts", libc::CLONE_NEWUTS),
        ("ipc", libc::CLONE_NEWIPC),
        ("net", libc::CLONE_NEWNET),
        ("cgroup", libc::CLONE_NEWCGROUP),
    ];
    if flags & libc::CLONE_NEWUSER != 0 {
        kinds.insert(0, ("user", libc::CLONE_NEWUSER));
    }
    for (name, kind) in kinds {
        // One the agent shares (the pod's network, typically) needs no
        // joining, and after joining a user namespace could not be joined.
        let same = |a: &str, b: &str| {
            use std::os::unix::fs::MetadataExt;
            match (std::fs::metadata(a), std::fs::metadata(b)) {
                (Ok(x), Ok(y)) => x.ino() == y.ino() && x.dev() == y.dev(),
                _ => false,
            }
        };
        if same(
            &format!("/proc/{pid}/ns/{name}"),
            &format!("/proc/self/ns/{name}"),
        ) {
            continue;
        }
        let f = File::open(format!("/proc/{pid}/ns/{name}")).map_err(|e| {
            AgentError::new(
                ErrorCode::System,
                format!("open the container's {name} namespace: {e}"),
            )
        })?;
        out.push((OwnedFd::from(f), kind));
    }
    let pidns = File::open(format!("/proc/{pid}/ns/pid"))
        .map(OwnedFd::from)
        .map_err(|e| AgentError::new(ErrorCode::System, format!("open the pid namespace: {e}")))?;
    Ok((out, Some(pidns)))
}

/// Points the spec's mounts of volume entries (see
/// [`husk_protocol::VOLUME_SOURCE_PREFIX`]) at the mounted volumes disk.
fn bind_volumes(spec: &mut Spec, volumes: Option<&Path>) -> Result<(), AgentError> {
    for m in spec.mounts_mut().iter_mut().flatten() {
        let Some(source) = m.source().as_ref().and_then(|s| s.to_str()) else {
            continue;
        };
        let n = match husk_protocol::volume_entry(source) {
            None => continue,
            Some(Ok(n)) => n,
            Some(Err(())) => {
                return Err(AgentError::new(
                    ErrorCode::InvalidArgument,
                    format!("mount source {source:?} is not a volume entry"),
                ))
            }
        };
        let Some(dir) = volumes else {
            return Err(AgentError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "mount source {source:?} names a volume, but the container has no volumes disk"
                ),
            ));
        };
        m.set_source(Some(dir.join(n.to_string())));
    }
    Ok(())
}

/// Points the spec's mounts of virtio-fs share paths (see
/// [`husk_protocol::SHARE_SOURCE_PREFIX`]) at the share, mounting each
/// tag once under `shares_dir` (`mounted` remembers which are). A path
/// must exist and resolve inside its share: a symlink in the share (which
/// another container of the pod may have written) never leads a bind out
/// of it.
fn bind_shares(
    spec: &mut Spec,
    shares_dir: &Path,
    mounted: &Mutex<std::collections::BTreeSet<String>>,
) -> Result<(), AgentError> {
    for m in spec.mounts_mut().iter_mut().flatten() {
        let Some(source) = m.source().as_ref().and_then(|s| s.to_str()) else {
            continue;
        };
        if husk_protocol::share_entry(source).is_none() {
            continue;
        }
        let resolved = share_path(source, shares_dir, mounted)?;
        m.set_source(Some(resolved));
    }
    Ok(())
}

/// The guest path of the share path `source` (`/.husk-shares/<tag>/<path>`),
/// the tag mounted under `shares_dir` on first use. It must exist and
/// resolve inside its share.
fn share_path(
    source: &str,
    shares_dir: &Path,
    mounted: &Mutex<std::collections::BTreeSet<String>>,
) -> Result<std::path::PathBuf, AgentError> {
    let (tag, path) = match husk_protocol::share_entry(source) {
        Some(Ok(entry)) => entry,
        _ => {
            return Err(AgentError::new(
                ErrorCode::InvalidArgument,
                format!("mount source {source:?} is not a share path"),
            ))
        }
    };
    let dir = shares_dir.join(tag);
    {
        let mut mounted = mounted.lock().unwrap_or_else(|e| e.into_inner());
        if !mounted.contains(tag) {
            std::fs::create_dir_all(&dir).map_err(|e| {
                AgentError::new(ErrorCode::System, format!("create {}: {e}", dir.display()))
            })?;
            // Shared: a container's `rshared` bind of a volume is a peer of
            // the agent's, so what one container of the pod mounts there
            // the others binding it `rshared` or `rslave` see, as
            // containers on one node see each other's through the node's
            // shared mounts. (The node never sees a guest's mounts.)
            rootfs::mount(tag, &dir, "virtiofs", libc::MS_NOSUID | libc::MS_NODEV, "")
                .and_then(|()| rootfs::mount("", &dir, "", libc::MS_SHARED, ""))
                .map_err(|e| {
                    AgentError::new(
                        e.code,
                        format!("the virtio-fs share {tag:?}: {}", e.message),
                    )
                })?;
            mounted.insert(tag.to_string());
        }
    }
    let dir = dir
        .canonicalize()
        .map_err(|e| AgentError::new(ErrorCode::System, format!("{}: {e}", dir.display())))?;
    let resolved = dir.join(path).canonicalize().map_err(|e| {
        AgentError::new(
            ErrorCode::InvalidArgument,
            format!("mount source {source:?}: {e}"),
        )
    })?;
    if !resolved.starts_with(&dir) {
        return Err(AgentError::new(
            ErrorCode::InvalidArgument,
            format!("mount source {source:?} leads out of its share"),
        ));
    }
    // A volume is a mount on the host, which the guest mounts on first
    // use (a virtio-fs submount). stat(2) stops short of it; opening it
    // crosses it, here in the agent's namespace, so every container binds
    // the agent's one mount of the volume (one superblock and cache, one
    // peer group for `rshared`) rather than mounting its own on its bind.
    if resolved.is_dir() {
        let _ = std::fs::File::open(&resolved);
    }
    Ok(resolved)
}

impl Containers {
    /// No containers yet. `paths` says where they go, `drives` how their
    /// disks are found; their processes are registered with `reaper`, and
    /// OOM kills go to `events`.
    pub fn new(paths: Paths, drives: Drives, reaper: Arc<Reaper>, events: Events) -> Self {
        Containers {
            table: Mutex::new(BTreeMap::new()),
            shares: Mutex::new(std::collections::BTreeSet::new()),
            paths,
            drives,
            reaper,
            events,
        }
    }

    fn table(&self) -> MutexGuard<'_, BTreeMap<String, Container>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// CreateContainer: the init's pid.
    pub fn create(&self, req: CreateContainer) -> Result<u32, AgentError> {
        check_id("container", &req.container_id)?;
        let id = req.container_id.clone();
        let mut containers = self.table();
        if containers.contains_key(&id) {
            return Err(AgentError::new(
                ErrorCode::AlreadyExists,
                format!("container {id:?} exists"),
            ));
        }
        let mut spec = *req.spec;
        let resources = spec.linux().as_ref().and_then(|l| l.resources().clone());
        if let Some(r) = &resources {
            cgroup::check(r)?;
        }
        let shares_dir = self.paths.state.join("shares");
        let mut rootfs = MountedRootfs::mount(
            &self.paths.state,
            &id,
            &req.rootfs,
            &self.drives,
            &|source: &str| share_path(source, &shares_dir, &self.shares),
        )?;
        let mut cgroup_made: Option<Cgroup> = None;
        let result = (|| {
            let volumes = match &req.volumes {
                Some(v) => Some(rootfs.mount_volumes(v, &self.drives)?),
                None => None,
            };
            bind_volumes(&mut spec, volumes.as_deref())?;
            bind_shares(&mut spec, &shares_dir, &self.shares)?;
            // The guest's device table, read when the spec names devices
            // (sysfs, so memory or disks plugged since boot are there).
            let wants_devices = spec
                .linux()
                .as_ref()
                .is_some_and(|l| l.devices().as_ref().is_some_and(|d| !d.is_empty()))
                || devices::all_devices_allowed(&spec);
            let kernel = if wants_devices {
                devices::KernelDevices::scan(Path::new("/sys/dev"))
            } else {
                devices::KernelDevices::default()
            };
            let plan = plan::init_plan(&spec, &rootfs.root, &kernel)?;
            let cgroup = match &self.paths.cgroup_root {
                Some(root) => {
                    let cg = Cgroup::create(root, &id)?;
                    cgroup_made = Some(Cgroup {
                        path: cg.path.clone(),
                    });
                    if let Some(r) = &resources {
                        cg.apply(r)?;
                    }
                    Some(cg)
                }
                None if resources.is_some() => {
                    return Err(AgentError::new(
                        ErrorCode::Unsupported,
                        "resource limits need cgroup v2, which this agent has not found",
                    ))
                }
                None => None,
            };
            let (stdio, child_stdio) = ProcStdio::new(plan.proc.terminal)?;
            let who = ProcessRef {
                container_id: id.clone(),
                exec_id: None,
            };
            let spawned = process::spawn(
                &self.reaper,
                &plan,
                who,
                child_stdio,
                cgroup.as_ref(),
                None,
                &[],
                id_maps(&spec),
            )?;
            let (ns, pidns) = match open_namespaces(spawned.pid, plan.clone_flags) {
                Ok(n) => n,
                Err(e) => {
                    // SAFETY: kill(2) on our own child.
                    unsafe { libc::kill(spawned.pid, libc::SIGKILL) };
                    return Err(e);
                }
            };
            Ok((plan, cgroup, stdio, spawned, ns, pidns))
        })();
        let (plan, cgroup, stdio, spawned, ns, pidns) = match result {
            Ok(v) => v,
            Err(e) => {
                if let Some(cg) = cgroup_made {
                    cg.destroy();
                }
                rootfs.unmount();
                return Err(e);
            }
        };
        if let Some(cg) = &cgroup {
            let events = self.events.clone();
            let container_id = id.clone();
            cg.watch_oom(move || {
                events.publish(Event::Oom {
                    container_id: container_id.clone(),
                })
            });
        }
        let pid = spawned.pid;
        containers.insert(
            id,
            Container {
                rootfs,
                cgroup,
                plan,
                spec,
                init: Proc {
                    pid,
                    exit: spawned.exit.clone(),
                    stdio: Arc::new(stdio),
                },
                spawned,
                started: false,
                execs: HashMap::new(),
                ns,
                pidns,
            },
        );
        Ok(pid as u32)
    }

    /// StartContainer.
    pub fn start(&self, id: &str) -> Result<(), AgentError> {
        let mut containers = self.table();
        let c = containers.get_mut(id).ok_or_else(|| not_found(id))?;
        if c.started {
            return Err(precondition(format!(
                "container {id:?} was already started"
            )));
        }
        if c.stopped() {
            return Err(precondition(format!("container {id:?} has stopped")));
        }
        c.started = true;
        c.spawned.start(&c.plan)
    }

    /// ExecProcess: the new process's pid.
    pub fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process: &oci_spec::runtime::Process,
    ) -> Result<u32, AgentError> {
        check_id("exec", exec_id)?;
        let mut containers = self.table();
        let c = containers.get_mut(id).ok_or_else(|| not_found(id))?;
        if !c.started || c.stopped() {
            return Err(precondition(format!("container {id:?} is not running")));
        }
        if c.execs.contains_key(exec_id) {
            return Err(AgentError::new(
                ErrorCode::AlreadyExists,
                format!("process {exec_id:?} exists in container {id:?}"),
            ));
        }
        let seccomp = plan::seccomp_of(&c.spec)?;
        let plan = Plan {
            clone_flags: 0,
            join: Vec::new(),
            init: None,
            proc: plan::proc_plan(process, &c.rootfs.root, seccomp)?,
        };
        let (stdio, child_stdio) = ProcStdio::new(plan.proc.terminal)?;
        let who = ProcessRef {
            container_id: id.to_string(),
            exec_id: Some(exec_id.to_string()),
        };
        let spawned = process::spawn(
            &self.reaper,
            &plan,
            who,
            child_stdio,
            c.cgroup.as_ref(),
            c.pidns.as_ref(),
            &c.ns,
            None,
        )?;
        c.execs.insert(
            exec_id.to_string(),
            Proc {
                pid: spawned.pid,
                exit: spawned.exit.clone(),
                stdio: Arc::new(stdio),
            },
        );
        Ok(spawned.pid as u32)
    }

    /// WaitProcess: blocks the calling connection only (the table is not
    /// held while waiting).
    pub fn wait(&self, p: &ProcessRef) -> Result<ExitStatus, AgentError> {
        let exit = {
            let containers = self.table();
            let c = containers
                .get(&p.container_id)
                .ok_or_else(|| not_found(&p.container_id))?;
            c.process(p.exec_id.as_deref())?.exit.clone()
        };
        Ok(exit.wait())
    }

    /// SignalProcess.
    pub fn signal(&self, p: &ProcessRef, sig: i32, all: bool) -> Result<(), AgentError> {
        if !(1..=64).contains(&sig) {
            return Err(AgentError::new(
                ErrorCode::InvalidArgument,
                format!("signal {sig} is not 1..=64"),
            ));
        }
        let containers = self.table();
        let c = containers
            .get(&p.container_id)
            .ok_or_else(|| not_found(&p.container_id))?;
        let proc = c.process(p.exec_id.as_deref())?;
        let pids: Vec<i32> = match (&c.cgroup, all) {
            (Some(cg), true) => cg.pids().into_iter().map(|p| p as i32).collect(),
            _ => {
                if proc.exit.status().is_some() {
                    return Err(precondition("the process has exited"));
                }
                vec![proc.pid]
            }
        };
        for pid in pids {
            // SAFETY: kill(2) with a checked signal number.
            if unsafe { libc::kill(pid, sig) } < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::ESRCH) {
                    return Err(AgentError::new(
                        ErrorCode::System,
                        format!("kill {pid}: {e}"),
                    ));
                }
            }
        }
        Ok(())
    }

    fn with_stdio<T>(
        &self,
        p: &ProcessRef,
        f: impl FnOnce(&ProcStdio) -> Result<T, AgentError>,
    ) -> Result<T, AgentError> {
        let stdio = {
            let containers = self.table();
            let c = containers
                .get(&p.container_id)
                .ok_or_else(|| not_found(&p.container_id))?;
            c.process(p.exec_id.as_deref())?.stdio.clone()
        };
        f(&stdio)
    }

    /// ResizeTty.
    pub fn resize(&self, p: &ProcessRef, rows: u16, cols: u16) -> Result<(), AgentError> {
        self.with_stdio(p, |s| s.resize(rows, cols))
    }

    /// CloseStdin.
    pub fn close_stdin(&self, p: &ProcessRef) -> Result<(), AgentError> {
        self.with_stdio(p, |s| {
            s.close_stdin();
            Ok(())
        })
    }

    /// A Stdio channel's stream.
    pub fn attach(&self, p: &ProcessRef, stream: StdioStream) -> Result<Attachment, AgentError> {
        self.with_stdio(p, |s| s.attach(stream))
    }

    fn with_cgroup<T>(&self, id: &str, f: impl FnOnce(&Cgroup) -> T) -> Result<T, AgentError> {
        let containers = self.table();
        let c = containers.get(id).ok_or_else(|| not_found(id))?;
        let cg = c.cgroup.as_ref().ok_or_else(|| {
            AgentError::new(ErrorCode::Unsupported, "the agent runs without cgroup v2")
        })?;
        Ok(f(cg))
    }

    /// StatsContainer.
    pub fn stats(&self, id: &str) -> Result<Stats, AgentError> {
        self.with_cgroup(id, |cg| cg.stats())
    }

    /// ListProcesses.
    pub fn list(&self, id: &str) -> Result<Vec<u32>, AgentError> {
        self.with_cgroup(id, |cg| cg.pids())
    }

    /// UpdateContainer.
    pub fn update(&self, id: &str, r: &LinuxResources) -> Result<(), AgentError> {
        self.with_cgroup(id, |cg| cg.apply(r))?
    }

    /// RemoveContainer: a created or stopped container.
    pub fn remove(&self, id: &str) -> Result<(), AgentError> {
        let mut containers = self.table();
        let c = containers.get(id).ok_or_else(|| not_found(id))?;
        if c.started && !c.stopped() {
            return Err(precondition(format!(
                "container {id:?} is running: stop it first"
            )));
        }
        let Some(mut c) = containers.remove(id) else {
            return Err(not_found(id));
        };
        drop(containers);
        if !c.stopped() {
            // Created, never started: end the waiting init.
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(c.init.pid, libc::SIGKILL) };
            c.init.exit.wait();
        }
        c.ns.clear();
        c.pidns = None;
        if let Some(cg) = &c.cgroup {
            cg.destroy();
        }
        c.rootfs.unmount();
        Ok(())
    }

    /// ListProcessStates: every process of every container, init first.
    pub fn process_states(&self) -> Vec<ProcessState> {
        let state = |container_id: &str, exec_id: Option<&str>, p: &Proc| ProcessState {
            process: ProcessRef {
                container_id: container_id.to_string(),
                exec_id: exec_id.map(str::to_string),
            },
            pid: p.pid as u32,
            exit: p.exit.status(),
        };
        self.table()
            .iter()
            .flat_map(|(id, c)| {
                std::iter::once(state(id, None, &c.init))
                    .chain(c.execs.iter().map(|(e, p)| state(id, Some(e), p)))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// How many containers exist (created and not yet removed).
    pub fn count(&self) -> usize {
        self.table().len()
    }

    /// Kills every container's processes (Shutdown).
    pub fn kill_all(&self) {
        for c in self.table().values() {
            if let Some(cg) = &c.cgroup {
                cg.destroy();
            }
            if c.init.exit.status().is_none() {
                // SAFETY: kill(2) on our own child.
                unsafe { libc::kill(c.init.pid, libc::SIGKILL) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_with_sources(sources: &[&str]) -> Spec {
        let mounts: Vec<serde_json::Value> = sources
            .iter()
            .enumerate()
            .map(|(i, s)| serde_json::json!({"destination": format!("/m{i}"), "type": "bind", "source": s, "options": ["rbind"]}))
            .collect();
        serde_json::from_value(serde_json::json!({"ociVersion": "1.0.2", "mounts": mounts}))
            .unwrap()
    }

    fn sources(spec: &Spec) -> Vec<String> {
        spec.mounts()
            .iter()
            .flatten()
            .map(|m| m.source().as_ref().unwrap().display().to_string())
            .collect()
    }

    #[test]
    fn volume_entries_bind_from_the_mounted_volumes_disk() {
        let mut s = spec_with_sources(&["/.husk-volumes/1", "/proc", "/.husk-volumes/0"]);
        bind_volumes(&mut s, Some(Path::new("/run/husk/c/a/volumes"))).unwrap();
        assert_eq!(
            sources(&s),
            [
                "/run/husk/c/a/volumes/1",
                "/proc",
                "/run/husk/c/a/volumes/0"
            ]
        );
        // Without a volumes disk, or with a malformed entry: refused.
        let mut s = spec_with_sources(&["/.husk-volumes/0"]);
        let e = bind_volumes(&mut s, None).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument);
        let mut s = spec_with_sources(&["/.husk-volumes/../etc"]);
        assert!(bind_volumes(&mut s, Some(Path::new("/v"))).is_err());
        // No volume sources: nothing changes, with or without a disk.
        let mut s = spec_with_sources(&["/srv"]);
        bind_volumes(&mut s, None).unwrap();
        assert_eq!(sources(&s), ["/srv"]);
    }

    #[test]
    fn share_paths_bind_from_inside_their_share_only() {
        // The share is taken as mounted already (the tag is recorded), so
        // this checks the paths, not the virtio-fs mount.
        let shares = tempfile::tempdir().unwrap();
        let share = shares.path().join("vol0");
        std::fs::create_dir_all(share.join("data/sub")).unwrap();
        std::os::unix::fs::symlink("/etc", share.join("out")).unwrap();
        std::os::unix::fs::symlink("data/sub", share.join("in")).unwrap();
        let mounted = Mutex::new(["vol0".to_string()].into_iter().collect());
        let share = share.canonicalize().unwrap();
        let mut s = spec_with_sources(&[
            "/.husk-shares/vol0",
            "/proc",
            "/.husk-shares/vol0/data/sub",
            "/.husk-shares/vol0/in",
        ]);
        bind_shares(&mut s, &shares.path().canonicalize().unwrap(), &mounted).unwrap();
        let sub = share.join("data/sub").display().to_string();
        assert_eq!(
            sources(&s),
            [
                share.display().to_string(),
                "/proc".into(),
                sub.clone(),
                sub
            ]
        );
        // A symlink out of the share, a missing path, a malformed source.
        for bad in [
            "/.husk-shares/vol0/out",
            "/.husk-shares/vol0/missing",
            "/.husk-shares/vol0/../x",
        ] {
            let mut s = spec_with_sources(&[bad]);
            let e = bind_shares(&mut s, shares.path(), &mounted).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidArgument, "{bad}: {}", e.message);
        }
    }
}
