//! Create: the pod's VM booted if this is its first container, the
//! container's disks built on the host and put into drive slots, the
//! container created in the guest and its stdio attached. Whatever fails
//! is undone; a create that fails in a VM no container uses any more
//! stops that VM, so nothing is left.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use containerd_shim::api;
use containerd_shim::protos::events::task::{TaskCreate, TaskIO};
use containerd_shim::protos::protobuf::MessageField;
use husk_protocol::{CreateContainer, Request, Response, Rootfs, WritableLayer};
use oci_spec::runtime::Spec;

use super::state::{Container, ProcState, Process, RunningPod};
use super::{process_ref, Inner, TaskError};
use crate::error::Chain;
use crate::io::StdioPaths;
use crate::rootfs;
use crate::sizing::Ask;
use crate::slots::SlotError;
use crate::spec;

/// The owner of a container's volumes disk slot (its rootfs slot's owner
/// is the container id).
pub fn volumes_slot_owner(container_id: &str) -> String {
    format!("{container_id}/volumes")
}

/// The container a slot's owner is: the inverse of [`volumes_slot_owner`].
pub fn slot_owner_container(owner: &str) -> &str {
    owner.strip_suffix("/volumes").unwrap_or(owner)
}

/// A writable disk of `size` bytes, its drive id to be filled in.
fn disk(size: u64) -> Rootfs {
    Rootfs {
        drive_id: String::new(),
        fstype: "ext4".into(),
        read_only: false,
        writable_overlay: false,
        writable_layer: None,
        size_bytes: Some(size),
        share: None,
    }
}

impl Inner {
    pub(super) fn create(self: &Arc<Self>, req: &api::CreateTaskRequest) -> Result<u32, TaskError> {
        if req.id.is_empty() {
            return Err(TaskError::InvalidArgument("no container id".into()));
        }
        if !spec::valid_container_id(&req.id) {
            return Err(TaskError::InvalidId {
                what: "the container",
                id: req.id.clone(),
                rule: "alphanumeric runs joined by single '.', '_' or '-', at most 76 bytes",
            });
        }
        if !req.checkpoint.is_empty() {
            return Err(TaskError::Unsupported("checkpoint/restore"));
        }
        {
            let mut st = self.lock();
            if st.table.has(&req.id) {
                return Err(TaskError::Exists(format!("container {}", req.id)));
            }
            st.table.creating.insert(req.id.clone());
        }
        // Told before the shim stops the VM itself, below.
        let created = self.create_reserved(req).map_err(|e| self.with_vm_end(e));
        if let Err(e) = &created {
            let (unused, pod) = {
                let mut st = self.lock();
                st.table.creating.remove(&req.id);
                (st.table.is_empty(), st.vm.running().cloned())
            };
            tracing::error!(container = %req.id, error = %Chain(e), "cannot create the container");
            // The VM was booted for this container (or outlived every
            // other): nobody would stop it.
            if let (true, Some(pod)) = (unused, pod) {
                // Evidence for a guest that stopped answering: is it the
                // one request, or the whole agent?
                let agent_answers = pod.vm.probe_agent(Duration::from_secs(2));
                let log = pod.vm.log_tail();
                drop(pod);
                tracing::warn!(
                    ?agent_answers,
                    log,
                    "no container left in the pod's microVM: stopping it"
                );
                self.stop_vm();
            }
        }
        created
    }

    /// `e`, or `e` as the consequence of the VM's end if the VM ended
    /// under it: a guest that crashed shows first as a broken agent
    /// connection, and husk's exit is noticed a moment later (waited for
    /// up to a second), its log then the only evidence.
    fn with_vm_end(&self, e: TaskError) -> TaskError {
        let transport = matches!(&e, TaskError::Agent { source, .. }
            if !matches!(source, husk_protocol::client::ClientError::Agent(_)));
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        let mut st = self.lock();
        // The VM is Gone a moment before its end is recorded: wait for the
        // record, not the state.
        while transport && st.vm_end.is_none() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            st = match self.changed.wait_timeout(st, left) {
                Ok((st, _)) => st,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        match st.vm_end.clone() {
            Some(end) if !matches!(e, TaskError::VmEnded { .. }) => TaskError::VmEnded {
                how: end.how,
                log: end.log,
                source: Box::new(e),
            },
            _ => e,
        }
    }

    /// Create once the id is reserved.
    fn create_reserved(self: &Arc<Self>, req: &api::CreateTaskRequest) -> Result<u32, TaskError> {
        let path = Path::new(&req.bundle).join("config.json");
        let spec = Spec::load(&path).map_err(|source| TaskError::Spec { path, source })?;
        let pod_id = spec::sandbox_id(&spec, &req.id);
        if !spec::valid_pod_id(&pod_id) {
            // Before it names a directory, a file or husk's --id.
            return Err(TaskError::InvalidId {
                what: "the pod (annotation io.kubernetes.cri.sandbox-id, or the container's own)",
                id: pod_id,
                rule: "1 to 64 of A-Z a-z 0-9 _ -",
            });
        }
        if let Some(p) = &self.lock().pod_id {
            if *p != pod_id {
                return Err(TaskError::OtherPod {
                    id: req.id.clone(),
                    pod: pod_id,
                    serves: p.clone(),
                });
            }
        }
        let pod = self.ensure_vm(&pod_id, &spec)?;
        self.create_in(&pod, req, spec, &pod_id)
    }

    /// Create's work once the pod's VM runs: the container's disks, the
    /// agent's container, its stdio. Whatever fails is undone here but
    /// the VM.
    fn create_in(
        &self,
        pod: &RunningPod,
        req: &api::CreateTaskRequest,
        mut spec: Spec,
        pod_id: &str,
    ) -> Result<u32, TaskError> {
        let id = req.id.as_str();
        let bundle = PathBuf::from(&req.bundle);
        // The root filesystem: containerd's mounts, or the bundle's tree.
        let root = spec
            .root()
            .as_ref()
            .map(|r| r.path().clone())
            .unwrap_or_else(|| PathBuf::from("rootfs"));
        let root = if root.is_absolute() {
            root
        } else {
            bundle.join(root)
        };
        let name = crate::metrics::container_name(&spec, id);
        let sandbox_pid = self.lock().sandbox_pid;
        let adjusted = spec::for_guest(&mut spec, sandbox_pid);
        if !adjusted.special_mounts.is_empty() {
            // A container that runs without the socket or device it asked
            // for fails later and obscurely: refuse it now, naming them.
            let mounts: Vec<String> = adjusted
                .special_mounts
                .iter()
                .map(|m| m.to_string())
                .collect();
            return Err(TaskError::InvalidArgument(format!(
                "container {id} binds {}: a container in a microVM cannot reach the node's sockets, FIFOs or device nodes through bind mounts",
                mounts.join(", ")
            )));
        }
        if adjusted.dropped_hooks {
            tracing::warn!(
                container = id,
                "OCI hooks run on the node and are not carried into the microVM"
            );
        }
        let ask = Ask::of_spec(&spec);
        let image = pod.dir.image(id);
        let volumes_image = pod.dir.volumes_image(id);
        let shared_root = self.config.rootfs == crate::config::RootfsMode::Share
            && pod.share.is_some()
            && !req.rootfs.is_empty();
        let undo = || {
            pod.release(id);
            pod.labels.remove_container(id);
            for owner in [id.to_string(), volumes_slot_owner(id)] {
                if let Err(e) = pod.detach(&owner) {
                    tracing::warn!(container = id, error = %Chain(&e), "cannot free a drive slot");
                }
            }
            let _ = std::fs::remove_file(&image);
            let _ = std::fs::remove_file(&volumes_image);
            if let Some(share) = &pod.share {
                share.release(id);
            }
            if shared_root {
                rootfs::unmount_tree(&root);
            }
        };
        pod.labels.add_container(id, &name);
        // Shared, the volumes are the node's own directories and files,
        // bound into the pod's share; else they are copied onto a disk.
        let mut to_copy: &[spec::Volume] = &adjusted.volumes;
        if let Some(share) = &pod.share {
            let mut entries = Vec::with_capacity(adjusted.volumes.len());
            for v in &adjusted.volumes {
                match share.add(id, &v.source, v.mode) {
                    Ok(entry) => entries.push(entry),
                    Err(e) => {
                        undo();
                        return Err(TaskError::Share {
                            what: format!("volume {} of container {id}", v.source.display()),
                            source: Box::new(e),
                        });
                    }
                }
            }
            // The node's mount table, read only if a volume needs it.
            let mut mountinfo = None;
            let submounts: Vec<_> = adjusted
                .volumes
                .iter()
                .map(|v| {
                    if !(v.mode.read_only && v.mode.recursive) {
                        return Vec::new();
                    }
                    let info = mountinfo.get_or_insert_with(|| {
                        std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default()
                    });
                    let source = v.source.canonicalize().unwrap_or_else(|_| v.source.clone());
                    crate::share::submounts(info, &source)
                })
                .collect();
            spec::share_volumes(&mut spec, &entries, &submounts);
            to_copy = &[];
        }
        let disks = self.disks(pod, req, &root, &image, to_copy, &volumes_image);
        let (rootfs, volumes) = match disks {
            Ok(d) => d,
            Err(e) => {
                undo();
                return Err(e);
            }
        };
        // The VM grows before the container exists: a container never
        // starts in a guest smaller than its limits. (After its disks, so
        // that what the guest does right after its boot overlaps them.)
        if let Err(e) = pod.grow_for(id, ask) {
            undo();
            return Err(e);
        }
        let has_volumes = volumes.is_some();
        let created = pod.vm.call(Request::CreateContainer(CreateContainer {
            container_id: id.to_string(),
            spec: Box::new(spec),
            rootfs,
            volumes: volumes.map(Box::new),
        }));
        let pid = match created {
            Ok(Response::Started { pid }) if pid > 0 => pid,
            Ok(other) => {
                undo();
                return Err(TaskError::UnexpectedReply {
                    request: "CreateContainer",
                    reply: format!("{other:?}"),
                });
            }
            Err(e) => {
                undo();
                return Err(TaskError::agent(format!("create container {id}"))(e));
            }
        };
        let paths = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let io = match pod.vm.attach_stdio(&process_ref(id, ""), &paths) {
            Ok(io) => io,
            Err(e) => {
                let _ = pod.vm.call(Request::RemoveContainer {
                    container_id: id.to_string(),
                });
                undo();
                return Err(TaskError::agent(format!(
                    "attach the stdio of container {id}"
                ))(e));
            }
        };
        {
            let mut st = self.lock();
            st.table.creating.remove(id);
            if id == pod_id {
                st.sandbox_pid = Some(pid);
            }
            st.table.containers.insert(
                id.to_string(),
                Container {
                    bundle: req.bundle.clone(),
                    image: Some(image.clone()),
                    volumes_image: has_volumes.then(|| volumes_image.clone()),
                    mounted_root: shared_root.then(|| root.clone()),
                    deleting: false,
                    init: Process {
                        paths,
                        state: ProcState::Created { pid, io },
                    },
                    execs: Default::default(),
                },
            );
        }
        self.publish(TaskCreate {
            container_id: id.to_string(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: MessageField::some(TaskIO {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
                ..Default::default()
            }),
            pid,
            ..Default::default()
        });
        tracing::info!(container = id, pod = pod_id, pid, "container created");
        Ok(pid)
    }

    /// The container's disks, built and in their slots: its root
    /// filesystem, and its volumes if it has any.
    fn disks(
        &self,
        pod: &RunningPod,
        req: &api::CreateTaskRequest,
        root: &Path,
        image: &Path,
        volumes: &[spec::Volume],
        volumes_image: &Path,
    ) -> Result<(Rootfs, Option<Rootfs>), TaskError> {
        let id = req.id.as_str();
        let disk_error = |what| {
            move |source| TaskError::Disk {
                what,
                id: id.to_string(),
                source: Box::new(source),
            }
        };
        let slot_error = |what| {
            move |source| TaskError::Slot {
                what,
                id: id.to_string(),
                source: Box::new(source),
            }
        };
        // The copies are the pod's: charged to its cgroup, as its
        // writable layers are (husk, which writes them, is in it).
        let cgroup = pod.cgroup.as_ref().map(|c| c.path());
        if let (crate::config::RootfsMode::Share, Some(share)) = (self.config.rootfs, &pod.share) {
            let rootfs = self.shared_root(share, req, root)?;
            return Ok((rootfs, None));
        }
        let rootfs = match self.shared_layers(pod, req, root, image)? {
            Some(layered) => layered,
            None => {
                let size = rootfs::CopyJob::Tree {
                    mounts: req.rootfs.iter().map(rootfs::MountSpec::of).collect(),
                    root: root.to_path_buf(),
                    image: image.to_path_buf(),
                }
                .run(cgroup)
                .map_err(disk_error("root filesystem"))?;
                Rootfs {
                    drive_id: pod
                        .attach(id, image)
                        .map_err(slot_error("root filesystem"))?,
                    ..disk(size)
                }
            }
        };
        if volumes.is_empty() {
            return Ok((rootfs, None));
        }
        let staging = Path::new(&req.bundle).join("husk-volumes");
        let size = rootfs::CopyJob::Volumes {
            sources: volumes.iter().map(|v| v.source.clone()).collect(),
            staging,
            image: volumes_image.to_path_buf(),
        }
        .run(cgroup)
        .map_err(disk_error("volumes disk"))?;
        let volumes = Rootfs {
            drive_id: pod
                .attach(&volumes_slot_owner(id), volumes_image)
                .map_err(slot_error("volumes disk"))?,
            ..disk(size)
        };
        Ok((rootfs, Some(volumes)))
    }

    /// A new container's rootfs through the pod's share: containerd's
    /// snapshot mounted on the bundle's rootfs (as runc's shim mounts it),
    /// or the bundle's tree itself, bound into the share. Its writes are
    /// the snapshot's, on the node, as under runc.
    fn shared_root(
        &self,
        share: &crate::share::PodShare,
        req: &api::CreateTaskRequest,
        root: &Path,
    ) -> Result<Rootfs, TaskError> {
        let id = req.id.as_str();
        if !req.rootfs.is_empty() {
            rootfs::mount_tree(&req.rootfs, root).map_err(|source| TaskError::Disk {
                what: "root filesystem",
                id: id.to_string(),
                source: Box::new(source),
            })?;
        }
        let entry = share
            .add(id, root, crate::share::BindMode::ROOT)
            .map_err(|source| {
                if !req.rootfs.is_empty() {
                    rootfs::unmount_tree(root);
                }
                TaskError::Share {
                    what: format!("the root filesystem of container {id}"),
                    source: Box::new(source),
                }
            })?;
        Ok(Rootfs {
            drive_id: String::new(),
            fstype: String::new(),
            read_only: false,
            writable_overlay: false,
            writable_layer: None,
            size_bytes: None,
            share: Some(husk_protocol::share_source(crate::share::TAG, &entry)),
        })
    }

    /// A new container's rootfs as its image's shared layers (from the
    /// image cache, on a read-only slot) under an empty writable layer of
    /// its own (`image`, on a writable slot); `None` when that does not
    /// apply (see the rootfs module) and the rootfs is to be copied whole.
    fn shared_layers(
        &self,
        pod: &RunningPod,
        req: &api::CreateTaskRequest,
        root: &Path,
        image: &Path,
    ) -> Result<Option<Rootfs>, TaskError> {
        if self.config.image_slots == 0 {
            return Ok(None);
        }
        let Some(lowers) = rootfs::fresh_layers(&req.rootfs) else {
            return Ok(None);
        };
        let id = req.id.as_str();
        let cache = rootfs::ImageCache::new(&self.config.image_cache_dir);
        let (layers, layers_size) =
            cache
                .layers_image(&lowers, root)
                .map_err(|source| TaskError::Disk {
                    what: "image layers",
                    id: id.to_string(),
                    source: Box::new(source),
                })?;
        let layers_slot = match pod.attach_shared(id, &layers) {
            Ok(slot) => slot,
            Err(SlotError::NoImageSlot(n)) => {
                tracing::info!(
                    container = id,
                    slots = n,
                    "no image slot free: the rootfs is copied whole"
                );
                return Ok(None);
            }
            Err(source) => {
                return Err(TaskError::Slot {
                    what: "image layers",
                    id: id.to_string(),
                    source: Box::new(source),
                })
            }
        };
        let writable_size = rootfs::build_writable_layer(
            image,
            self.config.writable_layer_mib.saturating_mul(1 << 20),
        )
        .map_err(|source| TaskError::Disk {
            what: "writable layer",
            id: id.to_string(),
            source: Box::new(source),
        })?;
        let writable_slot = pod.attach(id, image).map_err(|source| TaskError::Slot {
            what: "writable layer",
            id: id.to_string(),
            source: Box::new(source),
        })?;
        Ok(Some(Rootfs {
            drive_id: layers_slot,
            fstype: "ext4".into(),
            read_only: true,
            writable_overlay: true,
            writable_layer: Some(WritableLayer {
                drive_id: writable_slot,
                fstype: "ext4".into(),
                size_bytes: Some(writable_size),
            }),
            size_bytes: Some(layers_size),
            share: None,
        }))
    }
}
