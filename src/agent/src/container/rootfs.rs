//! A container's root filesystem: the virtio-blk disk whose serial is the
//! drive id (`/sys/block/vdX/serial`), mounted at
//! `<state>/c/<id>/rootfs`, read-only if asked; with `writable_overlay` the
//! disk is mounted read-only underneath and an overlayfs goes on top, its
//! upper layer on the container's writable-layer disk if it has one, else
//! on a tmpfs. A rootfs in a virtio-fs share (`share`) is the host's tree
//! (containerd's snapshot, mounted by the shim) bound there instead: no
//! disk, no copy. Tests name the devices instead through
//! `HUSK_AGENT_DRIVES=id=/dev/loop3,...` (test-only: consulted first; read
//! at start into [`Drives`]).

use std::ffi::CString;
use std::path::{Path, PathBuf};

use husk_protocol::{AgentError, ErrorCode, Rootfs};

use crate::config::Drives;

/// A mounted root filesystem.
#[derive(Debug)]
pub struct MountedRootfs {
    /// The container's directory (`<state>/c/<id>`).
    pub dir: PathBuf,
    /// Where the root is mounted.
    pub root: PathBuf,
    /// Mounts to undo, innermost first.
    mounts: Vec<PathBuf>,
}

fn cstr(p: &Path) -> Result<CString, AgentError> {
    CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| AgentError::new(ErrorCode::InvalidArgument, "path with a NUL byte"))
}

/// mount(2) with strings.
pub fn mount(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> Result<(), AgentError> {
    let s = CString::new(source)
        .map_err(|_| AgentError::new(ErrorCode::InvalidArgument, "NUL in a mount source"))?;
    let t = cstr(target)?;
    let f = CString::new(fstype)
        .map_err(|_| AgentError::new(ErrorCode::InvalidArgument, "NUL in a filesystem type"))?;
    let d = CString::new(data)
        .map_err(|_| AgentError::new(ErrorCode::InvalidArgument, "NUL in mount options"))?;
    // SAFETY: NUL-terminated strings that outlive the call.
    let rc = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), flags, d.as_ptr().cast()) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        let code = match e.raw_os_error() {
            Some(libc::ENODEV) | Some(libc::EINVAL) | Some(libc::ENOTBLK) => {
                ErrorCode::InvalidArgument
            }
            _ => ErrorCode::System,
        };
        return Err(AgentError::new(
            code,
            format!("mount {source} ({fstype}) on {}: {e}", target.display()),
        ));
    }
    Ok(())
}

/// Detaches the mount at `target`.
pub fn umount(target: &Path) {
    if let Ok(t) = cstr(target) {
        // SAFETY: a NUL-terminated path.
        unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) };
    }
}

/// The block device that holds drive `id`.
fn find_drive(id: &str, drives: &Drives) -> Result<PathBuf, AgentError> {
    // Test-only: a map from drive ids to devices (loop devices on a host).
    if let Some((_, dev)) = drives.map.iter().find(|(k, _)| k == id) {
        return Ok(dev.clone());
    }
    if !drives.guest_disks {
        // Outside a guest the disks' serials mean nothing.
    } else if let Ok(dir) = std::fs::read_dir("/sys/block") {
        for entry in dir.flatten() {
            let serial = std::fs::read_to_string(entry.path().join("serial")).unwrap_or_default();
            if serial.trim_end_matches(['\n', '\0']) == id {
                return Ok(Path::new("/dev").join(entry.file_name()));
            }
        }
    }
    Err(AgentError::new(
        ErrorCode::InvalidArgument,
        format!("no block device with drive id {id:?} (is the drive attached?)"),
    ))
}

/// How long a swapped disk may take to show its new size.
const RESIZE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Waits until the disk `device` (/dev/vdX) has `want` bytes: a drive whose
/// backing file the host swapped reaches this kernel's block layer through
/// a config-change interrupt that a workqueue handles, so right after the
/// swap the disk may still have its old size.
fn wait_for_size(device: &Path, want: u64) -> Result<(), AgentError> {
    let name = device.file_name().unwrap_or_default();
    let size_file = Path::new("/sys/block").join(name).join("size");
    let deadline = std::time::Instant::now() + RESIZE_WAIT;
    loop {
        // In 512-byte sectors, whatever the disk's block size.
        let sectors: u64 = std::fs::read_to_string(&size_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let have = sectors.saturating_mul(512);
        if have == want {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(AgentError::new(
                ErrorCode::FailedPrecondition,
                format!(
                    "{} has {have} bytes, not the {want} the host gave it (after {RESIZE_WAIT:?})",
                    device.display()
                ),
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// The block device of drive `id` once it has `size` bytes, if `fstype`
/// is one of `allowed` for `what`.
fn find_disk(
    what: &str,
    id: &str,
    fstype: &str,
    allowed: &[&str],
    size: Option<u64>,
    drives: &Drives,
) -> Result<PathBuf, AgentError> {
    if !allowed.contains(&fstype) {
        return Err(AgentError::new(
            ErrorCode::InvalidArgument,
            format!(
                "{what} of type {fstype:?}: the agent mounts {}",
                allowed.join(", ")
            ),
        ));
    }
    let device = find_drive(id, drives)?;
    if let (Some(want), true) = (size, drives.guest_disks) {
        wait_for_size(&device, want)?;
    }
    Ok(device)
}

impl MountedRootfs {
    /// The container's directory and its (empty) root mount point, made.
    fn empty(state: &Path, id: &str) -> Result<MountedRootfs, AgentError> {
        let dir = state.join("c").join(id);
        let root = dir.join("rootfs");
        std::fs::create_dir_all(&root).map_err(|e| {
            AgentError::new(ErrorCode::System, format!("create {}: {e}", root.display()))
        })?;
        Ok(MountedRootfs {
            dir,
            root,
            mounts: Vec::new(),
        })
    }

    /// Mounts `r` for container `id` under `state`; `share` resolves a
    /// share path to where the guest has it.
    pub fn mount(
        state: &Path,
        id: &str,
        r: &Rootfs,
        drives: &Drives,
        share: &dyn Fn(&str) -> Result<PathBuf, AgentError>,
    ) -> Result<MountedRootfs, AgentError> {
        if let Some(source) = &r.share {
            return Self::bind_share(state, id, &share(source)?, r.read_only);
        }
        let device = find_disk(
            "rootfs",
            &r.drive_id,
            &r.fstype,
            &["ext4", "ext3", "ext2", "xfs", "btrfs", "erofs", "squashfs"],
            r.size_bytes,
            drives,
        )?;
        // The writable layer's disk, found (and waited for) before anything
        // is created or mounted.
        let layer = match (&r.writable_layer, r.writable_overlay) {
            (None, _) => None,
            (Some(_), false) => {
                return Err(AgentError::new(
                    ErrorCode::InvalidArgument,
                    "a writable layer needs writable_overlay",
                ))
            }
            (Some(l), true) => Some((
                find_disk(
                    "writable layer",
                    &l.drive_id,
                    &l.fstype,
                    &["ext4", "ext3", "ext2", "xfs", "btrfs"],
                    l.size_bytes,
                    drives,
                )?,
                l.fstype.as_str(),
            )),
        };
        let mut m = MountedRootfs::empty(state, id)?;
        let dev = device.to_string_lossy();
        let result = if r.writable_overlay {
            m.overlay(&dev, &r.fstype, layer)
        } else {
            let flags = if r.read_only { libc::MS_RDONLY } else { 0 };
            mount(&dev, &m.root, &r.fstype, flags, "").map(|()| m.mounts.push(m.root.clone()))
        };
        if let Err(e) = result {
            m.unmount();
            return Err(e);
        }
        Ok(m)
    }

    /// The shared tree `tree` bound at the container's root. The share is
    /// mounted nosuid and nodev for volumes; a root keeps its image's
    /// set-uid programs, as under runc, so the bind is remounted without,
    /// and made private.
    fn bind_share(
        state: &Path,
        id: &str,
        tree: &Path,
        read_only: bool,
    ) -> Result<MountedRootfs, AgentError> {
        let mut m = MountedRootfs::empty(state, id)?;
        let result = mount(
            &tree.to_string_lossy(),
            &m.root,
            "",
            libc::MS_BIND | libc::MS_REC,
            "",
        )
        .and_then(|()| {
            m.mounts.push(m.root.clone());
            let ro = if read_only { libc::MS_RDONLY } else { 0 };
            mount("", &m.root, "", libc::MS_BIND | libc::MS_REMOUNT | ro, "")
        })
        // Cut from the share's peer group (the share mount is shared):
        // what a container with `rshared` root propagation mounts in its
        // root (proc, sys, dev) stays in the container, as runc keeps a
        // root's parent mount private.
        .and_then(|()| mount("", &m.root, "", libc::MS_PRIVATE, ""));
        if let Err(e) = result {
            m.unmount();
            return Err(e);
        }
        Ok(m)
    }

    /// The disk `dev` read-only under an overlay whose upper layer is on
    /// `layer` (a disk) or else on a tmpfs.
    fn overlay(
        &mut self,
        dev: &str,
        fstype: &str,
        layer: Option<(PathBuf, &str)>,
    ) -> Result<(), AgentError> {
        let lower = self.dir.join("lower");
        let rw = self.dir.join("rw");
        for d in [&lower, &rw] {
            std::fs::create_dir_all(d).map_err(|e| {
                AgentError::new(ErrorCode::System, format!("create {}: {e}", d.display()))
            })?;
        }
        mount(dev, &lower, fstype, libc::MS_RDONLY, "")?;
        self.mounts.push(lower.clone());
        match layer {
            // Fresh from mke2fs: its inode tables read as zeros already, so
            // the kernel need not write them out in the background.
            Some((layer, "ext4")) => {
                mount(&layer.to_string_lossy(), &rw, "ext4", 0, "noinit_itable")?
            }
            Some((layer, t)) => mount(&layer.to_string_lossy(), &rw, t, 0, "")?,
            None => mount("tmpfs", &rw, "tmpfs", 0, "mode=0755")?,
        }
        self.mounts.push(rw.clone());
        let (upper, work) = (rw.join("upper"), rw.join("work"));
        for d in [&upper, &work] {
            std::fs::create_dir_all(d).map_err(|e| {
                AgentError::new(ErrorCode::System, format!("create {}: {e}", d.display()))
            })?;
        }
        let data = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        );
        mount("overlay", &self.root, "overlay", 0, &data)?;
        self.mounts.push(self.root.clone());
        Ok(())
    }

    /// Mounts the container's volumes disk `v` at `<dir>/volumes`
    /// (undone with the rootfs); returns that directory.
    pub fn mount_volumes(&mut self, v: &Rootfs, drives: &Drives) -> Result<PathBuf, AgentError> {
        let device = find_disk(
            "volumes disk",
            &v.drive_id,
            &v.fstype,
            &["ext4", "ext3", "ext2"],
            v.size_bytes,
            drives,
        )?;
        let target = self.dir.join("volumes");
        std::fs::create_dir_all(&target).map_err(|e| {
            AgentError::new(
                ErrorCode::System,
                format!("create {}: {e}", target.display()),
            )
        })?;
        let flags = if v.read_only { libc::MS_RDONLY } else { 0 };
        mount(&device.to_string_lossy(), &target, &v.fstype, flags, "")?;
        self.mounts.push(target.clone());
        Ok(target)
    }

    /// Unmounts everything and removes the container's directory, unless
    /// something is still mounted in it: a root bound from the host's
    /// tree must never be removed through.
    pub fn unmount(&mut self) {
        while let Some(m) = self.mounts.pop() {
            umount(&m);
        }
        let still = std::fs::read_to_string("/proc/self/mountinfo")
            .map(|info| {
                info.lines()
                    .filter_map(|l| l.split(' ').nth(4))
                    .any(|p| Path::new(p).starts_with(&self.dir))
            })
            .unwrap_or(true);
        if still {
            crate::log::warn(&format!(
                "{} is still mounted: the container's directory is kept",
                self.dir.display()
            ));
            return;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
