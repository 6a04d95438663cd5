//! The jail's file system: `<base>/<exec name>/<id>/root` with the husk
//! binary and the three device nodes husk needs, and the switch of this
//! process's root into it (a private mount namespace, a bind mount of the
//! jail onto itself, pivot_root, and a lazy unmount of the old root).
//!
//! Every directory the jailer is responsible for is checked with lstat
//! (never following a link): it must be a real directory, owned by root and
//! writable by nobody else. So nothing an unprivileged user controls can
//! redirect where the jailer creates nodes or copies files. The exec file
//! is checked and installed through one open descriptor, so the file in
//! the jail is the one that was checked.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::args::BindRo;
use crate::error::{Error, Result};

/// The device nodes made in the jail: host path (also the jail path) and mode.
pub const DEVICES: [(&str, u32); 3] = [
    ("/dev/kvm", 0o600),
    ("/dev/net/tun", 0o600),
    ("/dev/urandom", 0o600),
];

/// Device nodes made in the jail when the host has them: the
/// userfaultfd device (Linux 6.1), through which a restore fills shared
/// guest memory on demand (husk falls back to copying it up front).
pub const OPTIONAL_DEVICES: [(&str, u32); 1] = [("/dev/userfaultfd", 0o600)];

fn cstr(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| Error::NulByte {
        what: format!("the path {}", path.display()),
    })
}

/// Creates `path` (mode 0755, root-owned) if missing; if present, checks it
/// is a real directory owned by root and not writable by group or others.
pub fn ensure_root_dir(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) => check_root_dir(path, &m),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::DirBuilder::new()
                .mode(0o755)
                .create(path)
                .map_err(Error::path("create directory", path))?;
            // The umask may have taken bits away; set the mode exactly.
            fs::set_permissions(path, fs::Permissions::from_mode(0o755))
                .map_err(Error::path("chmod", path))?;
            let m = fs::symlink_metadata(path).map_err(Error::path("lstat", path))?;
            check_root_dir(path, &m)
        }
        Err(e) => Err(Error::Path {
            step: "lstat",
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

fn check_root_dir(path: &Path, m: &fs::Metadata) -> Result<()> {
    let unsafe_dir = |why: String| Error::UnsafeDir {
        path: path.to_path_buf(),
        why,
    };
    let ft = m.file_type();
    if ft.is_symlink() {
        return Err(unsafe_dir("it is a symbolic link".into()));
    }
    if !ft.is_dir() {
        return Err(unsafe_dir("it exists and is not a directory".into()));
    }
    if m.uid() != 0 {
        return Err(unsafe_dir(format!(
            "it is owned by uid {}, not root (not a directory the jailer made)",
            m.uid()
        )));
    }
    if m.mode() & 0o022 != 0 {
        return Err(unsafe_dir(format!(
            "its mode {:o} lets others than root write to it",
            m.mode() & 0o7777
        )));
    }
    Ok(())
}

/// Paths of one jail.
#[derive(Debug)]
pub struct Jail {
    /// `<base>/<exec name>/<id>/root`.
    pub root: PathBuf,
    /// The exec file's path inside the jail (`/<exec name>`).
    pub exec_in_jail: PathBuf,
}

/// The jail at exactly `root` (made if missing, else checked like the
/// others).
pub fn use_root(root: &Path, exec_name: &str) -> Result<Jail> {
    ensure_root_dir(root)?;
    Ok(Jail {
        exec_in_jail: Path::new("/").join(exec_name),
        root: root.to_path_buf(),
    })
}

/// Makes (or checks) the jail's directories: base (created if missing; it
/// may be a symbolic link, but must be root's and not writable by others),
/// then `<exec name>`, `<id>` and
/// `root`, each with [`ensure_root_dir`]. An existing jail of the same id is
/// reused when it passes the checks: that is how the caller provides the
/// kernel, initrd and drives (see docs/security.md).
pub fn prepare_dirs(base: &Path, exec_name: &str, id: &str) -> Result<Jail> {
    fs::create_dir_all(base).map_err(Error::path("create directory", base))?;
    // The base may be a link (the operator's choice), but whoever can write
    // to it could swap the directories below between check and use.
    let m = fs::metadata(base).map_err(Error::path("stat", base))?;
    check_root_dir(base, &m)?;
    let mut dir = base.join(exec_name);
    ensure_root_dir(&dir)?;
    dir.push(id);
    ensure_root_dir(&dir)?;
    dir.push("root");
    ensure_root_dir(&dir)?;
    Ok(Jail {
        exec_in_jail: Path::new("/").join(exec_name),
        root: dir,
    })
}

/// Removes whatever is at `path` if it is not a directory (never follows a
/// link), so the jailer's own files are always freshly made.
fn remove_non_dir(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => Err(Error::UnsafeDir {
            path: path.to_path_buf(),
            why: "a directory is where the jailer puts a file".into(),
        }),
        Ok(_) => fs::remove_file(path).map_err(Error::path("remove stale file", path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::Path {
            step: "lstat",
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

/// Puts the exec file into the jail as `/<exec name>`: a hard link when it
/// is on the same file system, root-owned and not writable by others, else a
/// copy with mode 0755 owned by root. Either way husk's uid cannot modify it.
///
/// The exec file is opened once (a symbolic link is followed to the file
/// it names) and the checks, the link and the copy all work on that open
/// file, never on the path again: what lands in the jail is the file whose
/// owner and mode were checked, not a link to it (which inside the jail
/// would name whatever the jail has at its target) and not a file swapped
/// in after the check.
pub fn install_exec(jail: &Jail, exec_file: &Path) -> Result<Option<fs::File>> {
    use std::os::unix::fs::OpenOptionsExt;
    // Non-blocking: a FIFO at that path must not hang the jailer (it is
    // refused below, as anything that is not a regular file).
    let src = fs::File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(exec_file)
        .map_err(Error::path("open exec file", exec_file))?;
    let m = src
        .metadata()
        .map_err(Error::path("stat exec file", exec_file))?;
    if !m.is_file() {
        return Err(Error::InvalidExecFile(exec_file.to_path_buf()));
    }
    let rel = jail
        .exec_in_jail
        .strip_prefix("/")
        .unwrap_or(&jail.exec_in_jail);
    let dst = jail.root.join(rel);
    remove_non_dir(&dst)?;
    let linkable = m.uid() == 0 && m.mode() & 0o022 == 0;
    if linkable && link_open_file(&src, &dst).is_ok() {
        return Ok(None);
    }
    // Another file system (or a file that is not root's, which a link
    // would let its owner change under the jail): the checked file is
    // bound read-only onto an empty file in the jail's own mount
    // namespace by [`enter`], never copied (a debug husk is ~100 MB).
    mount_point(&dst, false)?;
    Ok(Some(src))
}

/// Makes an empty mount point at `dst` (which must not exist, or be a
/// non-directory the jailer replaces): a root-owned file, or a directory.
fn mount_point(dst: &Path, dir: bool) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if dir {
        return ensure_root_dir(dst);
    }
    remove_non_dir(dst)?;
    fs::File::options()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dst)
        .map(drop)
        .map_err(Error::path("create a mount point at", dst))
}

/// Makes the mount points of `binds` in the jail (a directory for a
/// directory, an empty file otherwise).
pub fn prepare_binds(jail: &Jail, binds: &[BindRo]) -> Result<()> {
    for b in binds {
        let m = fs::metadata(&b.source).map_err(Error::path("stat", &b.source))?;
        mount_point(&jail.root.join(&b.name), m.is_dir())?;
    }
    Ok(())
}

/// Binds `source` read-only (and nosuid, nodev) onto `target`.
fn bind_read_only(source: &Path, target: &Path) -> Result<()> {
    mount(
        Some(source),
        target,
        libc::MS_BIND,
        "bind-mount into the jail at",
    )?;
    mount(
        None,
        target,
        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
        "make read-only the bind mount at",
    )
}

/// Hard-links the open `src` itself at `dst` (`linkat` with
/// `AT_EMPTY_PATH`, which root may do), so no path is resolved again.
fn link_open_file(src: &fs::File, dst: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let c = cstr(dst)?;
    // SAFETY: src is an open descriptor, "" and c are valid NUL-terminated
    // strings; linkat reads them only.
    let rc = unsafe {
        libc::linkat(
            src.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    };
    if rc != 0 {
        return Err(Error::last_os_path("hard-link exec file to", dst));
    }
    Ok(())
}

/// Makes /dev/kvm, /dev/net/tun and /dev/urandom (and /dev/userfaultfd
/// where the host has it) in the jail with the host nodes' major/minor
/// numbers, owned by uid:gid, mode 0600.
pub fn make_devices(jail: &Jail, uid: u32, gid: u32) -> Result<()> {
    ensure_root_dir(&jail.root.join("dev"))?;
    ensure_root_dir(&jail.root.join("dev/net"))?;
    let optional = OPTIONAL_DEVICES
        .into_iter()
        .filter(|(host, _)| fs::metadata(host).is_ok_and(|m| m.file_type().is_char_device()));
    for (host, mode) in DEVICES.into_iter().chain(optional) {
        let m = fs::metadata(host).map_err(Error::path("stat host device", host))?;
        let dst = jail.root.join(&host[1..]);
        remove_non_dir(&dst)?;
        let c = cstr(&dst)?;
        // SAFETY: c is a valid NUL-terminated path; mknod reads it only.
        if unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | mode, m.rdev()) } != 0 {
            return Err(Error::last_os_path("mknod", dst));
        }
        std::os::unix::fs::chown(&dst, Some(uid), Some(gid)).map_err(Error::path("chown", &dst))?;
        // mknod's mode went through the umask; set it exactly.
        fs::set_permissions(&dst, fs::Permissions::from_mode(mode))
            .map_err(Error::path("chmod", &dst))?;
    }
    Ok(())
}

fn mount(
    src: Option<&Path>,
    target: &Path,
    flags: libc::c_ulong,
    step: &'static str,
) -> Result<()> {
    let src_c = src.map(cstr).transpose()?;
    let target_c = cstr(target)?;
    // SAFETY: both strings are valid NUL-terminated paths (or NULL for the
    // source); fstype and data are NULL, which these flag combinations
    // (bind, move, propagation changes) ignore.
    let rc = unsafe {
        libc::mount(
            src_c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            target_c.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(Error::last_os_path(step, target));
    }
    Ok(())
}

fn chdir(path: &Path) -> Result<()> {
    let c = cstr(path)?;
    // SAFETY: c is a valid NUL-terminated path.
    if unsafe { libc::chdir(c.as_ptr()) } != 0 {
        return Err(Error::last_os_path("chdir", path));
    }
    Ok(())
}

/// True when this process's root is the initramfs (the kernel's rootfs),
/// per /proc/self/mountinfo: the one case the chroot fallback is for.
fn root_is_rootfs() -> bool {
    fs::read_to_string("/proc/self/mountinfo")
        .map(|m| root_fstype(&m) == Some("rootfs"))
        .unwrap_or(false)
}

/// The file system type of the last mount on "/" in a mountinfo text (the
/// one on top, which is the root).
fn root_fstype(mountinfo: &str) -> Option<&str> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            (pre.split(' ').nth(4)? == "/").then_some(post.split(' ').next()?)
        })
        .next_back()
}

/// How the root was switched.
#[derive(Debug, PartialEq, Eq)]
pub enum RootSwitch {
    /// pivot_root, and the old root unmounted.
    PivotRoot,
    /// The host's root is the initramfs (rootfs), which pivot_root cannot
    /// leave: the jail was moved over / and chrooted into instead.
    MoveAndChroot,
}

/// Makes the jail this process's root, in a new mount namespace: / becomes
/// a recursive slave (nothing we mount reaches the host; host mounts still
/// propagate in), the jail is bind-mounted onto itself (pivot_root needs a
/// mount point), then `pivot_root(".", ".")` stacks the old root under the
/// new one and `umount2(".", MNT_DETACH)` drops it, leaving no path to the
/// host's files.
/// `exec` is the exec file's path and its checked open file when it is to
/// be bound rather than linked, `binds` the read-only binds; both are
/// mounted after the self-bind, so only this namespace has them.
pub fn enter(
    jail: &Jail,
    exec: Option<(&Path, &fs::File)>,
    binds: &[BindRo],
) -> Result<RootSwitch> {
    // SAFETY: unshare takes flags only.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(Error::last_os("unshare mount namespace"));
    }
    mount(
        None,
        Path::new("/"),
        libc::MS_SLAVE | libc::MS_REC,
        "make the mount tree a recursive slave at",
    )?;
    mount(
        Some(&jail.root),
        &jail.root,
        libc::MS_BIND | libc::MS_REC,
        "bind-mount the jail onto itself at",
    )?;
    if let Some((path, checked)) = exec {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::OpenOptionsExt;
        // A bind's source must be in this mount namespace, so the file is
        // opened again here, and bound only if it is the one checked.
        let again = fs::File::options()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
            .open(path)
            .map_err(Error::path("open exec file", path))?;
        let (a, b) = (
            again
                .metadata()
                .map_err(Error::path("stat exec file", path))?,
            checked
                .metadata()
                .map_err(Error::path("stat exec file", path))?,
        );
        if (a.dev(), a.ino()) != (b.dev(), b.ino()) {
            return Err(Error::UnsafeDir {
                path: path.to_path_buf(),
                why: "the exec file was replaced while the jail was made".into(),
            });
        }
        let rel = jail
            .exec_in_jail
            .strip_prefix("/")
            .unwrap_or(&jail.exec_in_jail);
        let source = PathBuf::from(format!("/proc/self/fd/{}", again.as_raw_fd()));
        bind_read_only(&source, &jail.root.join(rel))?;
    }
    for b in binds {
        bind_read_only(&b.source, &jail.root.join(&b.name))?;
    }
    chdir(&jail.root)?;
    let dot = c".";
    // SAFETY: both arguments are the valid NUL-terminated string ".".
    let rc = unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) };
    if rc == 0 {
        // The old root now sits on top of the new one at "."; detach it.
        // SAFETY: "." is a valid NUL-terminated path.
        if unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) } != 0 {
            return Err(Error::last_os_path("unmount the old root at", "/"));
        }
        chdir(Path::new("/"))?;
        return Ok(RootSwitch::PivotRoot);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EINVAL) || !root_is_rootfs() {
        return Err(Error::Path {
            step: "pivot_root into",
            path: jail.root.clone(),
            source: err,
        });
    }
    // EINVAL with rootfs as the root (an initramfs), which can never be
    // pivoted away from; any other failure is an error, never a weaker jail. Do what switch_root does: move the jail's mount
    // over / and chroot into it. Without CAP_SYS_CHROOT/CAP_SYS_ADMIN (all
    // dropped later) there is no way back out.
    mount(
        Some(Path::new(".")),
        Path::new("/"),
        libc::MS_MOVE,
        "move the jail over /, from",
    )?;
    // SAFETY: "." is a valid NUL-terminated path.
    if unsafe { libc::chroot(dot.as_ptr()) } != 0 {
        return Err(Error::last_os_path("chroot into", &jail.root));
    }
    chdir(Path::new("/"))?;
    Ok(RootSwitch::MoveAndChroot)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("husk-jailer-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).expect("scratch dir");
        d
    }

    #[test]
    fn the_root_file_system_type_is_the_top_mount_on_slash() {
        let initramfs = "1 1 0:2 / / rw shared:1 - rootfs rootfs rw,size=1993392k\n\
            22 1 0:20 / /proc rw,relatime - proc proc rw\n";
        assert_eq!(root_fstype(initramfs), Some("rootfs"));
        let moved = "1 1 0:2 / / rw - rootfs rootfs rw\n\
            30 1 0:25 / / rw,relatime - tmpfs tmpfs rw\n";
        assert_eq!(root_fstype(moved), Some("tmpfs"));
        let disk = "25 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n";
        assert_eq!(root_fstype(disk), Some("ext4"));
        assert_eq!(root_fstype(""), None);
    }

    #[test]
    fn a_symlink_is_never_followed() {
        let d = scratch("symlink");
        std::os::unix::fs::symlink("/", d.join("l")).expect("symlink");
        let e = ensure_root_dir(&d.join("l")).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        fs::write(d.join("f"), b"").expect("file");
        let e = ensure_root_dir(&d.join("f")).unwrap_err();
        assert!(e.to_string().contains("not a directory"), "{e}");
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    #[ignore = "needs root to make root-owned directories"]
    fn writable_by_others_is_refused() {
        // SAFETY: geteuid has no arguments and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        assert!(root, "this test needs root to make root-owned directories");
        let d = scratch("mode");
        let j = d.join("j");
        ensure_root_dir(&j).expect("made");
        assert_eq!(fs::metadata(&j).expect("stat").mode() & 0o7777, 0o755);
        fs::set_permissions(&j, fs::Permissions::from_mode(0o777)).expect("chmod");
        let e = ensure_root_dir(&j).unwrap_err();
        assert!(e.to_string().contains("lets others"), "{e}");
        let _ = fs::remove_dir_all(&d);
    }
}
