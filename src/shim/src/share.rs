//! The pod's share: one host directory per pod, served to its guest by
//! one virtiofsd (virtio-fs tag [`TAG`]), through which every bind mount
//! of the pod's containers reaches the guest as the node's own files, not
//! a copy. Writes reach the node, the node's updates (a configMap's
//! `..data` swap) reach the container, and a volume two containers bind
//! is one directory for both.
//!
//! ```text
//! <state>/<namespace>/<pod>.share/        private mount (nothing propagates out of it)
//!     entries/    a shared mount: the shim binds each volume here, as v<N>
//!     root/       its peer, read-only: what virtiofsd serves
//! ```
//!
//! The guest sees `root/`, which it cannot write: it can neither fill the
//! node's disk there nor plant a symbolic link where the shim will mount
//! next. Each volume is bound under `entries/` in one step, read-only
//! where its spec says so (`open_tree` + `mount_setattr` + `move_mount`,
//! so the flag is on the mount before it propagates to `root/` and to
//! virtiofsd's namespace; a remount would not propagate). As under runc,
//! `ro` makes the bind itself read-only, not the mounts under it, and a
//! volume follows the mounts the node makes under its source later only
//! when its propagation asks for it (`rslave`, `rshared`): the entry is
//! then a slave of the source, else private. Entries are
//! keyed by the source and the [`BindMode`], counted by container, and unmounted
//! when the last container using one is deleted. Teardown detaches every
//! mount under the share and then removes only what the shim made, one
//! empty directory or empty file at a time: nothing is ever removed
//! through a mount, so a volume's data cannot be lost to a cleanup.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The virtio-fs tag of the pod's share.
pub const TAG: &str = "husk-pod";

/// Why a share or one of its entries could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    /// A mount operation failed.
    #[error("cannot {what} {}", path.display())]
    Mount {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file operation failed.
    #[error("cannot {what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A volume's source is neither a directory nor a regular file.
    #[error("{}: only directories and regular files can be shared with the guest", .0.display())]
    NotShareable(PathBuf),
}

/// The share's directory beside the pod's state directory `pod_dir`
/// (`<pod>.share`: pod ids have no `.`, so no pod's directory is named
/// so). Never inside it: the pod's directory is removed recursively.
pub fn share_dir(pod_dir: &Path) -> PathBuf {
    let mut name = pod_dir.as_os_str().to_owned();
    name.push(".share");
    PathBuf::from(name)
}

/// How a volume is bound into the share, from its mount's options.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct BindMode {
    /// `ro`: the bind is read-only (what is mounted under it keeps its
    /// own flags, as runc's non-recursive `ro`).
    pub read_only: bool,
    /// `rbind`: the mounts under the source come along (a plain `bind`
    /// takes the source's own mount only).
    pub recursive: bool,
    /// `rslave`, `rshared` (or `slave`, `shared`): mounts the node makes
    /// under the source later reach the container. Else (`rprivate`, the
    /// default) the volume is what was mounted when it was bound.
    pub follows_node: bool,
}

impl BindMode {
    /// The mode a bind mount's OCI options ask for.
    pub fn from_options<'a>(options: impl IntoIterator<Item = &'a str>) -> BindMode {
        let mut mode = BindMode::default();
        for o in options {
            match o {
                "ro" => mode.read_only = true,
                "rw" => mode.read_only = false,
                "rbind" => mode.recursive = true,
                "rslave" | "slave" | "rshared" | "shared" => mode.follows_node = true,
                "rprivate" | "private" | "runbindable" | "unbindable" => mode.follows_node = false,
                _ => {}
            }
        }
        mode
    }

    /// A container's root filesystem: writable, with what is under it.
    pub const ROOT: BindMode = BindMode {
        read_only: false,
        recursive: true,
        follows_node: false,
    };
}

impl std::fmt::Display for BindMode {
    /// As mount options: `ro,rbind,rslave`, `rw,bind,rprivate`, ...
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ro = if self.read_only { "ro" } else { "rw" };
        let bind = if self.recursive { "rbind" } else { "bind" };
        let propagation = if self.follows_node {
            "rslave"
        } else {
            "rprivate"
        };
        write!(f, "{ro},{bind},{propagation}")
    }
}

/// The mount operations a share needs; [`Kernel`] does them, the unit
/// tests record them.
pub trait Mounter: Send + Sync {
    /// Makes `base/entries` a shared mount and `base/root` its read-only
    /// peer, under `base` made a private mount.
    fn set_up(&self, base: &Path) -> Result<(), ShareError>;
    /// Binds `source` onto `target` as `mode` says.
    fn bind(&self, source: &Path, target: &Path, mode: BindMode) -> Result<(), ShareError>;
    /// Detaches the mount on `target` and everything under it.
    fn detach(&self, target: &Path);
    /// Detaches every mount under `base` (and `base` itself).
    fn detach_all(&self, base: &Path);
}

/// One entry: its name under `entries/` and the containers binding it.
#[derive(Debug)]
struct Entry {
    name: String,
    users: BTreeSet<String>,
}

/// What the share holds.
#[derive(Debug, Default)]
struct Table {
    /// By canonical source and mode.
    entries: BTreeMap<(PathBuf, BindMode), Entry>,
    /// The next entry's number (names are never reused in a pod).
    next: u64,
}

/// A pod's share, set up.
pub struct PodShare {
    base: PathBuf,
    mounter: std::sync::Arc<dyn Mounter>,
    table: Mutex<Table>,
}

impl std::fmt::Debug for PodShare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodShare")
            .field("base", &self.base)
            .finish()
    }
}

impl PodShare {
    /// Sets up the share at `base` (made, 0700). A share left there by a
    /// shim that died is taken down first.
    pub fn create(
        base: &Path,
        mounter: std::sync::Arc<dyn Mounter>,
    ) -> Result<PodShare, ShareError> {
        if base.exists() {
            remove(base, mounter.as_ref());
        }
        for d in [base.to_path_buf(), base.join("entries"), base.join("root")] {
            crate::private::dir(&d).map_err(|source| ShareError::Io {
                what: "create",
                path: d.clone(),
                source,
            })?;
        }
        if let Err(e) = mounter.set_up(base) {
            remove(base, mounter.as_ref());
            return Err(e);
        }
        Ok(PodShare {
            base: base.to_path_buf(),
            mounter,
            table: Mutex::new(Table::default()),
        })
    }

    /// What virtiofsd serves.
    pub fn served(&self) -> PathBuf {
        self.base.join("root")
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The entry through which `container` binds `source` as `mode`
    /// says: the one already there for the same source and mode, else a
    /// new one. Its name is the path under the share's root.
    pub fn add(
        &self,
        container: &str,
        source: &Path,
        mode: BindMode,
    ) -> Result<String, ShareError> {
        let io = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| ShareError::Io { what, path, source }
        };
        let canonical = source.canonicalize().map_err(io("find", source))?;
        let mut table = self.table();
        if let Some(e) = table.entries.get_mut(&(canonical.clone(), mode)) {
            e.users.insert(container.to_string());
            return Ok(e.name.clone());
        }
        let md = std::fs::metadata(&canonical).map_err(io("look at", &canonical))?;
        let name = format!("v{}", table.next);
        let target = self.base.join("entries").join(&name);
        if md.is_dir() {
            std::fs::create_dir(&target).map_err(io("create", &target))?;
        } else if md.is_file() {
            crate::private::file(&target).map_err(io("create", &target))?;
        } else {
            return Err(ShareError::NotShareable(canonical));
        }
        table.next += 1;
        if let Err(e) = self.mounter.bind(&canonical, &target, mode) {
            remove_placeholder(&target);
            return Err(e);
        }
        table.entries.insert(
            (canonical, mode),
            Entry {
                name: name.clone(),
                users: BTreeSet::from([container.to_string()]),
            },
        );
        Ok(name)
    }

    /// `container` binds nothing any more: the entries no other container
    /// uses are unmounted and removed.
    pub fn release(&self, container: &str) {
        let mut table = self.table();
        let mut unused = Vec::new();
        table.entries.retain(|_, e| {
            e.users.remove(container);
            if e.users.is_empty() {
                unused.push(e.name.clone());
            }
            !e.users.is_empty()
        });
        drop(table);
        for name in unused {
            let target = self.base.join("entries").join(&name);
            self.mounter.detach(&target);
            remove_placeholder(&target);
        }
    }

    /// How many entries the share holds.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.table().entries.len()
    }

    /// Whether the share holds no entry.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes the share down: every mount detached, the share's own
    /// directories and placeholders removed.
    pub fn remove(&self) {
        self.table().entries.clear();
        remove(&self.base, self.mounter.as_ref());
    }
}

/// Removes a placeholder the shim made (an empty directory or an empty
/// file); anything else, or anything still mounted, stays.
fn remove_placeholder(path: &Path) {
    let Ok(md) = std::fs::symlink_metadata(path) else {
        return;
    };
    let removed = if md.is_dir() {
        std::fs::remove_dir(path)
    } else if md.is_file() && md.len() == 0 {
        std::fs::remove_file(path)
    } else {
        Err(std::io::Error::other("not a placeholder of the shim's"))
    };
    if let Err(e) = removed {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove a share entry");
    }
}

/// Takes down the share at `base` whatever state it is in (a shim that
/// died half-way, a crash cleanup): every mount under it detached, then
/// its placeholders and directories removed one by one, never
/// recursively.
pub fn remove(base: &Path, mounter: &dyn Mounter) {
    mounter.detach_all(base);
    let entries = base.join("entries");
    if let Ok(dir) = std::fs::read_dir(&entries) {
        for e in dir.flatten() {
            remove_placeholder(&e.path());
        }
    }
    for d in [entries, base.join("root"), base.to_path_buf()] {
        if let Err(e) = std::fs::remove_dir(&d) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %d.display(), error = %e, "cannot remove the pod's share");
            }
        }
    }
}

/// A mount on the node under a volume's source: where, relative to the
/// source, and whether it is read-only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submount {
    /// The path under the source.
    pub path: PathBuf,
    /// Whether the mount itself is read-only.
    pub read_only: bool,
}

/// The mounts strictly under `source` in `mountinfo` (the node's
/// `/proc/self/mountinfo`), shallowest first, each path once (the last,
/// uppermost mount on it decides its flags).
///
/// A read-only volume's entry is read-only on its top mount only, but in
/// the guest a virtio-fs submount is mounted on first use with the flags
/// of the mount it is reached through: under a read-only bind it would
/// come out read-only. The shim binds each of them explicitly instead
/// (see `spec::share_volumes`), so a tmpfs under a read-only volume stays
/// writable, as under runc.
pub fn submounts(mountinfo: &str, source: &Path) -> Vec<Submount> {
    let mut found: BTreeMap<PathBuf, bool> = BTreeMap::new();
    for line in mountinfo.lines() {
        let mut fields = line.split(' ').skip(4);
        let (Some(point), Some(options)) = (fields.next(), fields.next()) else {
            continue;
        };
        let point = PathBuf::from(unescape(point));
        let Ok(path) = point.strip_prefix(source) else {
            continue;
        };
        if path.as_os_str().is_empty() {
            continue;
        }
        let read_only = options.split(',').any(|o| o == "ro");
        found.insert(path.to_path_buf(), read_only);
    }
    let mut found: Vec<Submount> = found
        .into_iter()
        .map(|(path, read_only)| Submount { path, read_only })
        .collect();
    found.sort_by_key(|m| m.path.components().count());
    found
}

/// The mount points at or under `base` in `mountinfo`'s text, deepest
/// first.
pub fn mounts_under(mountinfo: &str, base: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape(p)))
        .filter(|p| p.starts_with(base))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

/// A mountinfo path with its octal escapes (`\040` for a space) undone.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The kernel's mounts.
pub struct Kernel;

fn c_path(p: &Path) -> Result<CString, std::io::Error> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "a NUL in the path"))
}

/// mount(2) with no data.
fn mount(source: Option<&Path>, target: &Path, flags: libc::c_ulong) -> std::io::Result<()> {
    let source = source.map(c_path).transpose()?;
    let target = c_path(target)?;
    // SAFETY: NUL-terminated strings that outlive the call; no data.
    let rc = unsafe {
        libc::mount(
            source.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            target.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

// linux/mount.h (the libc crate names them only in newer modules).
const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;

/// struct mount_attr (linux/mount.h).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

fn last_error(rc: libc::c_long) -> std::io::Result<libc::c_long> {
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// A failed mount operation `what` on `path`, as a [`ShareError`].
/// mount_setattr(2) on the detached tree `tree`: sets `set` and the
/// propagation type `propagation` (0: unchanged), on its top mount or on
/// all of them.
fn set_attr(
    tree: &OwnedFd,
    all: bool,
    set: u64,
    propagation: libc::c_ulong,
) -> std::io::Result<()> {
    let attr = MountAttr {
        attr_set: set,
        attr_clr: 0,
        propagation,
        userns_fd: 0,
    };
    let flags = if all {
        libc::AT_EMPTY_PATH | libc::AT_RECURSIVE
    } else {
        libc::AT_EMPTY_PATH
    };
    // SAFETY: mount_setattr(2) on the tree's descriptor with an empty
    // path and a mount_attr of the size passed.
    last_error(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            flags as libc::c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    })
    .map(drop)
}

fn err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ShareError {
    let path = path.to_path_buf();
    move |source| ShareError::Mount { what, path, source }
}

impl Mounter for Kernel {
    fn set_up(&self, base: &Path) -> Result<(), ShareError> {
        let entries = base.join("entries");
        let root = base.join("root");
        mount(Some(base), base, libc::MS_BIND).map_err(err("bind", base))?;
        mount(None, base, libc::MS_PRIVATE).map_err(err("make private", base))?;
        mount(Some(&entries), &entries, libc::MS_BIND).map_err(err("bind", &entries))?;
        mount(None, &entries, libc::MS_SHARED).map_err(err("make shared", &entries))?;
        mount(Some(&entries), &root, libc::MS_BIND).map_err(err("bind", &root))?;
        mount(
            None,
            &root,
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
        )
        .map_err(err("make read-only", &root))
    }

    fn bind(&self, source: &Path, target: &Path, mode: BindMode) -> Result<(), ShareError> {
        let src = c_path(source).map_err(err("bind", source))?;
        let dst = c_path(target).map_err(err("bind onto", target))?;
        let recursive = if mode.recursive {
            libc::AT_RECURSIVE as libc::c_uint
        } else {
            0
        };
        // SAFETY: open_tree(2) reads the NUL-terminated path; the result
        // is a new descriptor (or -1).
        let fd = last_error(unsafe {
            libc::syscall(
                libc::SYS_open_tree,
                libc::AT_FDCWD,
                src.as_ptr(),
                OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | recursive,
            )
        })
        .map_err(err("clone the mounts of", source))?;
        // SAFETY: fd is the new descriptor open_tree returned, owned here.
        let tree = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
        // Every mount of the tree: nosuid, nodev, and a slave of the
        // source's (receiving what the node mounts there later) or cut off
        // from it. Then the top one alone read-only, as runc's `ro`.
        let propagation = if mode.follows_node {
            libc::MS_SLAVE
        } else {
            libc::MS_PRIVATE
        };
        set_attr(
            &tree,
            true,
            MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
            propagation,
        )
        .map_err(err("set the flags of the mounts of", source))?;
        if mode.read_only {
            set_attr(&tree, false, MOUNT_ATTR_RDONLY, 0)
                .map_err(err("make read-only the bind of", source))?;
        }
        // SAFETY: move_mount(2) from the tree's descriptor to the
        // NUL-terminated target path.
        last_error(unsafe {
            libc::syscall(
                libc::SYS_move_mount,
                tree.as_raw_fd(),
                c"".as_ptr(),
                libc::AT_FDCWD,
                dst.as_ptr(),
                MOVE_MOUNT_F_EMPTY_PATH,
            )
        })
        .map_err(err("mount a volume on", target))?;
        Ok(())
    }

    fn detach(&self, target: &Path) {
        if let Ok(t) = c_path(target) {
            // SAFETY: umount2(2) of a NUL-terminated path.
            unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) };
        }
    }

    fn detach_all(&self, base: &Path) {
        let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
            return;
        };
        for m in mounts_under(&info, base) {
            self.detach(&m);
        }
    }
}

/// Records the mount calls and binds nothing (a source named `refused`
/// fails): the unit tests' mounter.
#[cfg(test)]
#[derive(Default, Clone)]
pub(crate) struct Recorder(pub std::sync::Arc<Mutex<Vec<String>>>);

#[cfg(test)]
impl Mounter for Recorder {
    fn set_up(&self, base: &Path) -> Result<(), ShareError> {
        self.0
            .lock()
            .unwrap()
            .push(format!("set_up {}", base.display()));
        Ok(())
    }
    fn bind(&self, source: &Path, target: &Path, mode: BindMode) -> Result<(), ShareError> {
        let name = target.file_name().unwrap().to_string_lossy();
        if source.ends_with("refused") {
            return Err(ShareError::Mount {
                what: "bind",
                path: source.into(),
                source: std::io::Error::from_raw_os_error(libc::EPERM),
            });
        }
        self.0.lock().unwrap().push(format!(
            "bind {} {name} {mode}",
            source.file_name().unwrap().to_string_lossy()
        ));
        Ok(())
    }
    fn detach(&self, target: &Path) {
        let name = target.file_name().unwrap().to_string_lossy();
        self.0.lock().unwrap().push(format!("detach {name}"));
    }
    fn detach_all(&self, _: &Path) {
        self.0.lock().unwrap().push("detach_all".into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(t: &Path) -> (PodShare, std::sync::Arc<Mutex<Vec<String>>>) {
        let calls = std::sync::Arc::new(Mutex::new(Vec::new()));
        let s = PodShare::create(
            &t.join("pod.share"),
            std::sync::Arc::new(Recorder(calls.clone())),
        )
        .unwrap();
        (s, calls)
    }

    #[test]
    fn the_share_is_beside_the_pod_directory_never_in_it() {
        assert_eq!(
            share_dir(Path::new("/run/husk/k8s.io/abc")),
            Path::new("/run/husk/k8s.io/abc.share")
        );
    }

    #[test]
    fn one_entry_per_source_and_mode_counted_by_container() {
        let t = tempfile::tempdir().unwrap();
        let data = t.path().join("data");
        std::fs::create_dir(&data).unwrap();
        std::fs::write(t.path().join("hosts"), "127.0.0.1 localhost\n").unwrap();
        let (s, calls) = share(t.path());
        let rw = BindMode::from_options(["rbind", "rprivate", "rw"]);
        let ro = BindMode::from_options(["rbind", "rprivate", "ro"]);
        assert_eq!(s.add("init", &data, rw).unwrap(), "v0");
        // The same directory for the main container, spelt otherwise.
        assert_eq!(
            s.add("main", &t.path().join("data/../data"), rw).unwrap(),
            "v0"
        );
        assert_eq!(s.add("main", &data, ro).unwrap(), "v1");
        assert_eq!(s.add("main", &t.path().join("hosts"), ro).unwrap(), "v2");
        // The same directory following the node's mounts: another entry.
        let follows = BindMode::from_options(["rbind", "rslave", "rw"]);
        assert_eq!(s.add("main", &data, follows).unwrap(), "v3");
        let entries = t.path().join("pod.share/entries");
        assert!(entries.join("v0").is_dir() && entries.join("v2").is_file());
        s.release("init");
        assert_eq!(s.len(), 4, "v0 is still main's");
        s.release("main");
        assert!(s.is_empty());
        assert!(!entries.join("v0").exists() && !entries.join("v2").exists());
        // Names are never reused: a guest never finds an old entry's name
        // naming a new volume.
        assert_eq!(s.add("next", &data, rw).unwrap(), "v4");
        assert_eq!(
            calls.lock().unwrap()[1..],
            [
                "bind data v0 rw,rbind,rprivate",
                "bind data v1 ro,rbind,rprivate",
                "bind hosts v2 ro,rbind,rprivate",
                "bind data v3 rw,rbind,rslave",
                // In the table's order: by source, then mode.
                "detach v0",
                "detach v3",
                "detach v1",
                "detach v2",
                "bind data v4 rw,rbind,rprivate"
            ]
            .map(String::from)
        );
        s.remove();
        assert!(!t.path().join("pod.share").exists());
    }

    #[test]
    fn what_cannot_be_bound_is_a_clear_error_and_leaves_nothing() {
        let t = tempfile::tempdir().unwrap();
        let (s, _) = share(t.path());
        let e = s
            .add("c", &t.path().join("missing"), BindMode::ROOT)
            .unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
        let refused = t.path().join("refused");
        std::fs::create_dir(&refused).unwrap();
        assert!(s.add("c", &refused, BindMode::ROOT).is_err());
        let fifo = t.path().join("fifo");
        let c = CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: mkfifo with a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(matches!(
            s.add("c", &fifo, BindMode::ROOT),
            Err(ShareError::NotShareable(_))
        ));
        assert!(s.is_empty());
        let left: Vec<_> = std::fs::read_dir(t.path().join("pod.share/entries"))
            .unwrap()
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn a_mount_s_options_give_its_mode_the_last_word_winning() {
        let mode = |o: &[&str]| BindMode::from_options(o.iter().copied()).to_string();
        assert_eq!(mode(&["rbind", "ro"]), "ro,rbind,rprivate");
        assert_eq!(mode(&["bind"]), "rw,bind,rprivate");
        // containerd's HostToContainer and Bidirectional.
        assert_eq!(mode(&["rbind", "rslave", "rw"]), "rw,rbind,rslave");
        assert_eq!(mode(&["rbind", "rshared", "ro"]), "ro,rbind,rslave");
        assert_eq!(
            mode(&["rshared", "rprivate", "ro", "rw"]),
            "rw,bind,rprivate"
        );
        assert_eq!(BindMode::ROOT.to_string(), "rw,rbind,rprivate");
    }

    #[test]
    fn removal_never_recurses_into_what_it_did_not_make() {
        let t = tempfile::tempdir().unwrap();
        let base = t.path().join("pod.share");
        let (s, _) = share(t.path());
        // As if an unmount had failed: data under an entry stays.
        std::fs::create_dir(base.join("entries/v0")).unwrap();
        std::fs::write(base.join("entries/v0/precious"), "data").unwrap();
        std::fs::write(base.join("entries/v1"), "data").unwrap();
        s.remove();
        assert_eq!(
            std::fs::read_to_string(base.join("entries/v0/precious")).unwrap(),
            "data"
        );
        assert_eq!(
            std::fs::read_to_string(base.join("entries/v1")).unwrap(),
            "data"
        );
    }

    #[test]
    fn submounts_shallowest_first_with_their_own_flags() {
        let info = "\
22 1 0:21 / / rw - rootfs rootfs rw
40 22 0:40 / /srv/vol ro,nosuid shared:7 - tmpfs tmpfs rw
41 40 0:41 / /srv/vol/a/b rw - tmpfs tmpfs rw
42 40 0:42 / /srv/vol/a rw,noexec - tmpfs tmpfs rw
43 40 0:43 / /srv/vol/with\\040space ro - tmpfs tmpfs rw
44 40 0:44 / /srv/volume rw - tmpfs tmpfs rw
45 42 0:45 / /srv/vol/a ro - tmpfs tmpfs rw";
        let found = submounts(info, Path::new("/srv/vol"));
        let got: Vec<(String, bool)> = found
            .iter()
            .map(|m| (m.path.display().to_string(), m.read_only))
            .collect();
        assert_eq!(
            got,
            [
                ("a".to_string(), true),
                ("with space".to_string(), true),
                ("a/b".to_string(), false)
            ]
        );
        assert!(submounts(info, Path::new("/srv/volume")).is_empty());
    }

    #[test]
    fn mounts_under_a_path_deepest_first_with_escapes_undone() {
        let info = "\
22 1 0:21 / / rw - rootfs rootfs rw
30 22 0:21 /run/husk/p.share /run/husk/p.share rw - rootfs rootfs rw
31 30 0:21 /x /run/husk/p.share/entries rw shared:5 - rootfs rootfs rw
33 31 8:1 / /run/husk/p.share/entries/v0 rw shared:6 - ext4 /dev/vda rw
34 30 0:21 /x /run/husk/p.share/root ro shared:5 - rootfs rootfs rw
35 22 0:30 / /run/husk/p.shared rw - tmpfs tmpfs rw
36 22 0:31 / /srv/with\\040space rw - tmpfs tmpfs rw";
        let found = mounts_under(info, Path::new("/run/husk/p.share"));
        assert_eq!(found[0], Path::new("/run/husk/p.share/entries/v0"));
        assert_eq!(found.len(), 4);
        assert!(!found.contains(&PathBuf::from("/run/husk/p.shared")));
        assert_eq!(
            mounts_under(info, Path::new("/srv/with space")),
            [PathBuf::from("/srv/with space")]
        );
    }
}
