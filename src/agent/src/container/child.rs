//! The cloned child's side: everything between clone and execve, in
//! order (see [`super::process`]). It runs in a copy of the multi-threaded
//! agent, so it allocates nothing and takes no locks: it walks what
//! [`super::plan`] prepared and makes system calls, reporting a failure as
//! (step, item, errno) on the close-on-exec pipe and exiting.
//!
//! Two kinds of functions here. The thin wrappers at the top ([`mount`],
//! [`chdir`], ...) make one system call on borrowed C strings; their only
//! precondition is that the pointers are valid, which the borrows ensure,
//! so they are safe. The steps ([`child`] and what it calls) are `unsafe
//! fn`s: they close, duplicate and write raw file descriptors and end the
//! process, which is sound only in the child, between clone and execve,
//! where the agent's other threads and the objects owning those
//! descriptors do not exist (the child never returns into Rust code that
//! could use them).

use std::ffi::{CStr, CString};
use std::os::fd::RawFd;

use super::plan::{InitPlan, Plan};

/// Steps of the child, for error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub(super) enum Step {
    Ready = 0,
    Wait,
    Join,
    CgroupNs,
    Stdio,
    Propagation,
    BindRoot,
    Mkdir,
    Mount,
    Remount,
    MountPropagation,
    Device,
    DevLink,
    PivotRoot,
    ReadonlyRoot,
    Sysctl,
    Mask,
    Readonly,
    Hostname,
    Rlimit,
    Cwd,
    Lookup,
    Umask,
    Bounding,
    Groups,
    Gid,
    Uid,
    Capabilities,
    NoNewPrivs,
    Seccomp,
    Exec,
}

pub(super) const STEPS: &[Step] = &[
    Step::Ready,
    Step::Wait,
    Step::Join,
    Step::CgroupNs,
    Step::Stdio,
    Step::Propagation,
    Step::BindRoot,
    Step::Mkdir,
    Step::Mount,
    Step::Remount,
    Step::MountPropagation,
    Step::Device,
    Step::DevLink,
    Step::PivotRoot,
    Step::ReadonlyRoot,
    Step::Sysctl,
    Step::Mask,
    Step::Readonly,
    Step::Hostname,
    Step::Rlimit,
    Step::Cwd,
    Step::Lookup,
    Step::Umask,
    Step::Bounding,
    Step::Groups,
    Step::Gid,
    Step::Uid,
    Step::Capabilities,
    Step::NoNewPrivs,
    Step::Seccomp,
    Step::Exec,
];

/// What the child needs besides the plan (all raw fds it keeps).
pub(super) struct ChildFds<'a> {
    pub(super) sync: RawFd,
    pub(super) go: RawFd,
    pub(super) start: Option<RawFd>,
    pub(super) stdio: [RawFd; 3],
    pub(super) tty: Option<&'a CString>,
    pub(super) join: &'a [(RawFd, libc::c_int)],
    pub(super) keep: &'a [RawFd],
}

fn errno() -> i32 {
    // SAFETY: __errno_location returns the calling thread's errno slot,
    // valid for as long as the thread runs.
    unsafe { *libc::__errno_location() }
}

/// A null C string pointer (an absent source, type or data).
const NONE: *const libc::c_char = std::ptr::null();

fn ptr(s: Option<&CStr>) -> *const libc::c_char {
    s.map_or(NONE, CStr::as_ptr)
}

/// mount(2). `data` is the filesystem's option string.
fn mount(
    source: Option<&CStr>,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> libc::c_long {
    // SAFETY: every pointer is null or a NUL-terminated string borrowed
    // for the call.
    let rc = unsafe {
        libc::mount(
            ptr(source),
            target.as_ptr(),
            ptr(fstype),
            flags,
            ptr(data).cast(),
        )
    };
    rc.into()
}

/// mkdir(2) with mode 0755; an existing directory is success.
fn mkdir_ok(path: &CStr) -> libc::c_long {
    // SAFETY: a NUL-terminated path borrowed for the call.
    if unsafe { libc::mkdir(path.as_ptr(), 0o755) } < 0 && errno() != libc::EEXIST {
        return -1;
    }
    0
}

/// mknod(2).
fn mknod(path: &CStr, mode: libc::mode_t, dev: libc::dev_t) -> libc::c_long {
    // SAFETY: a NUL-terminated path borrowed for the call.
    unsafe { libc::mknod(path.as_ptr(), mode, dev) }.into()
}

/// chown(2).
fn chown(path: &CStr, uid: libc::uid_t, gid: libc::gid_t) -> libc::c_long {
    // SAFETY: a NUL-terminated path borrowed for the call.
    unsafe { libc::chown(path.as_ptr(), uid, gid) }.into()
}

/// symlink(2): `link` pointing at `to`.
fn symlink(to: &CStr, link: &CStr) -> libc::c_long {
    // SAFETY: NUL-terminated paths borrowed for the call.
    unsafe { libc::symlink(to.as_ptr(), link.as_ptr()) }.into()
}

/// chdir(2).
fn chdir(path: &CStr) -> libc::c_long {
    // SAFETY: a NUL-terminated path borrowed for the call.
    unsafe { libc::chdir(path.as_ptr()) }.into()
}

/// chroot(2).
fn chroot(path: &CStr) -> libc::c_long {
    // SAFETY: a NUL-terminated path borrowed for the call.
    unsafe { libc::chroot(path.as_ptr()) }.into()
}

/// pivot_root(2) (glibc has no wrapper).
fn pivot_root(new_root: &CStr, put_old: &CStr) -> libc::c_long {
    // SAFETY: NUL-terminated paths borrowed for the call.
    unsafe { libc::syscall(libc::SYS_pivot_root, new_root.as_ptr(), put_old.as_ptr()) }
}

/// umount2(2).
fn umount2(target: &CStr, flags: libc::c_int) -> libc::c_long {
    // SAFETY: a NUL-terminated path borrowed for the call.
    unsafe { libc::umount2(target.as_ptr(), flags) }.into()
}

/// Whether `path` is a directory; `None` if it cannot be stat'ed.
fn is_dir(path: &CStr) -> Option<bool> {
    // SAFETY: `stat` is plain data; all-zero is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a `stat` to fill, both borrowed
    // for the call.
    if unsafe { libc::stat(path.as_ptr(), &mut st) } < 0 {
        return None;
    }
    Some(st.st_mode & libc::S_IFMT == libc::S_IFDIR)
}

/// access(2) with X_OK.
fn executable(path: &CStr) -> bool {
    // SAFETY: a NUL-terminated path borrowed for the call.
    unsafe { libc::access(path.as_ptr(), libc::X_OK) == 0 }
}

// glibc's setuid family changes every thread of the process: it signals
// the threads it knows and waits for them. The child's copy of that list
// names the agent's threads, which are not in the child -- and in a new pid
// namespace their thread ids may be the child's own (the agent as PID 1 has
// thread id 1): it would wait forever. So the raw system calls, which
// change just the calling (only) thread.

/// setresuid(2), all three ids.
///
/// # Safety
///
/// Only in the child: the raw call changes the calling thread's ids alone,
/// which are the process's only when it has one thread.
unsafe fn setresuid(uid: u32) -> libc::c_long {
    // SAFETY: a system call with integer arguments.
    unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) }
}

/// setresgid(2), all three ids.
///
/// # Safety
///
/// As [`setresuid`].
unsafe fn setresgid(gid: u32) -> libc::c_long {
    // SAFETY: a system call with integer arguments.
    unsafe { libc::syscall(libc::SYS_setresgid, gid, gid, gid) }
}

/// setgroups(2).
///
/// # Safety
///
/// As [`setresuid`].
unsafe fn setgroups(groups: &[libc::gid_t]) -> libc::c_long {
    // SAFETY: the kernel reads `groups.len()` ids from the slice, borrowed
    // for the call.
    unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) }
}

/// Reports a failure and exits.
///
/// # Safety
///
/// Only in the child: `fds.sync` is written by number and the process ends
/// without running any destructor.
unsafe fn fail(fds: &ChildFds, step: Step, index: usize, err: i32) -> ! {
    let mut buf = [0u8; 12];
    buf[0..4].copy_from_slice(&(step as u32).to_ne_bytes());
    buf[4..8].copy_from_slice(&(index as u32).to_ne_bytes());
    buf[8..12].copy_from_slice(&err.to_ne_bytes());
    // SAFETY: writing the 12 bytes of `buf` to the report pipe, which the
    // child keeps open; a short write shows as garbage to the agent.
    unsafe { libc::write(fds.sync, buf.as_ptr().cast(), buf.len()) };
    // SAFETY: _exit(2) ends the child at once, as it must (no atexit
    // handlers or buffered streams of the agent's).
    unsafe { libc::_exit(127) }
}

/// Checks a system call's result; on failure reports `step` and exits.
///
/// # Safety
///
/// As [`fail`].
unsafe fn check(fds: &ChildFds, rc: libc::c_long, step: Step, index: usize) {
    if rc < 0 {
        // SAFETY: in the child, as this function requires.
        unsafe { fail(fds, step, index, errno()) }
    }
}

/// Creates `path` as an empty file (a mount point for a file) if it is
/// missing; fails the child at `step` if it cannot.
///
/// # Safety
///
/// As [`fail`].
unsafe fn touch(fds: &ChildFds, path: &CStr, mode: libc::mode_t, step: Step, index: usize) {
    // SAFETY: a NUL-terminated path borrowed for the call; the fd it
    // returns is closed below.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_CREAT | libc::O_CLOEXEC | libc::O_WRONLY,
            mode,
        )
    };
    // SAFETY: in the child, as this function requires.
    unsafe { check(fds, fd.into(), step, index) };
    // SAFETY: the fd opened above, which nothing else owns.
    unsafe { libc::close(fd) };
}

/// Closes every fd but those in `keep` (sorted) and 0, 1, 2.
///
/// # Safety
///
/// Only in the child: the descriptors it closes belong to objects of the
/// agent's that the child never uses again.
unsafe fn close_others(keep: &[RawFd]) {
    let mut from: u32 = 3;
    for &fd in keep {
        let fd = fd as u32;
        if fd > from {
            // SAFETY: close_range(2) on descriptors the child does not use
            // (see the function's contract).
            unsafe { libc::syscall(libc::SYS_close_range, from, fd - 1, 0u32) };
        }
        if fd >= from {
            from = fd + 1;
        }
    }
    // SAFETY: as above, for every descriptor above the last kept one.
    unsafe { libc::syscall(libc::SYS_close_range, from, u32::MAX, 0u32) };
}

/// Makes the terminal the controlling one (with a new session) and puts
/// the stdio fds at 0, 1 and 2.
///
/// # Safety
///
/// As [`fail`]; 0, 1 and 2 are replaced.
unsafe fn setup_stdio(fds: &ChildFds) {
    if fds.tty.is_some() {
        // SAFETY: setsid(2) takes no arguments.
        let rc = unsafe { libc::setsid() };
        // SAFETY: in the child, as this function requires.
        unsafe { check(fds, rc.into(), Step::Stdio, 0) };
        // SAFETY: TIOCSCTTY on the terminal's fd, with an integer argument.
        let rc = unsafe { libc::ioctl(fds.stdio[0], libc::TIOCSCTTY, 0) };
        // SAFETY: in the child, as this function requires.
        unsafe { check(fds, rc.into(), Step::Stdio, 1) };
    }
    for (target, &fd) in fds.stdio.iter().enumerate() {
        if fd != target as RawFd {
            // SAFETY: dup2(2) onto 0, 1 or 2, which in the child belong to
            // no Rust object any more.
            let rc = unsafe { libc::dup2(fd, target as RawFd) };
            // SAFETY: in the child, as this function requires.
            unsafe { check(fds, rc.into(), Step::Stdio, target) };
        }
    }
}

/// The container's root: propagation, mounts, devices, pivot_root,
/// sysctls, masked and read-only paths, hostname.
///
/// # Safety
///
/// As [`fail`]; the mount namespace and root it changes must be the
/// child's own (a new mount namespace).
unsafe fn setup_root(fds: &ChildFds, p: &InitPlan) {
    // SAFETY (for every `check` and `fail` below): in the child, as this
    // function requires.
    let slash = c"/";
    let dot = c".";
    let rc = mount(None, slash, None, p.root_propagation, None);
    // SAFETY: see the top of the function.
    unsafe { check(fds, rc, Step::Propagation, 0) };
    if p.root_propagation & libc::MS_SHARED != 0 {
        // A shared root (`rshared`, for Bidirectional volumes) keeps the
        // container's copies of the agent's shared mounts peers of them.
        // The root's own mount is made private, as runc does, so that its
        // bind below is private too and can be moved over `/` (a mount
        // whose parent is shared cannot be moved, nor pivoted to).
        let rc = mount(None, &p.rootfs, None, libc::MS_PRIVATE, None);
        if rc < 0 && errno() != libc::EINVAL {
            // SAFETY: see the top of the function.
            unsafe { fail(fds, Step::Propagation, 1, errno()) };
        }
    }
    let rc = mount(
        Some(&p.rootfs),
        &p.rootfs,
        None,
        libc::MS_BIND | libc::MS_REC,
        None,
    );
    // SAFETY: see the top of the function.
    unsafe { check(fds, rc, Step::BindRoot, 0) };
    for (i, m) in p.mounts.iter().enumerate() {
        for d in &m.mkdirs {
            // SAFETY: see the top of the function.
            unsafe { check(fds, mkdir_ok(d), Step::Mkdir, i) };
        }
        if m.file {
            // SAFETY: see the top of the function.
            unsafe { touch(fds, &m.target, 0o644, Step::Mkdir, i) };
        }
        let (flags, data, fstype) = if m.bind {
            (m.flags & (libc::MS_BIND | libc::MS_REC), None, None)
        } else {
            (m.flags, Some(m.data.as_c_str()), Some(m.fstype.as_c_str()))
        };
        let mut rc = mount(Some(&m.source), &m.target, fstype, flags, data);
        let mut bound = m.bind;
        if rc < 0 && errno() == libc::EPERM && m.fstype.as_bytes() == b"sysfs" {
            // sysfs of a network namespace the container does not own (a
            // user namespace sharing the VM's network): bind the agent's,
            // then make it as the spec asked (read-only, nosuid, ...) below.
            rc = mount(
                Some(c"/sys"),
                &m.target,
                None,
                libc::MS_BIND | libc::MS_REC,
                None,
            );
            bound = true;
        }
        // SAFETY: see the top of the function.
        unsafe { check(fds, rc, Step::Mount, i) };
        let extra = m.flags & !(libc::MS_BIND | libc::MS_REC | libc::MS_REMOUNT);
        // A new mount of a file system that is already mounted somewhere
        // (sysfs of the VM's network namespace, which the pod shares) gets
        // the existing superblock: MS_RDONLY only makes a new superblock
        // read-only, so the mount itself is made read-only as well.
        let read_only = extra & libc::MS_RDONLY != 0;
        if (bound || read_only) && extra != 0 {
            let rc = mount(
                None,
                &m.target,
                None,
                libc::MS_BIND | libc::MS_REMOUNT | extra,
                None,
            );
            // SAFETY: see the top of the function.
            unsafe { check(fds, rc, Step::Remount, i) };
        }
        if m.propagation != 0 {
            let rc = mount(None, &m.target, None, m.propagation, None);
            // SAFETY: see the top of the function.
            unsafe { check(fds, rc, Step::MountPropagation, i) };
        }
    }
    for (i, d) in p.devices.iter().enumerate() {
        for dir in &d.mkdirs {
            // SAFETY: see the top of the function.
            unsafe { check(fds, mkdir_ok(dir), Step::Device, i) };
        }
        if mknod(&d.target, d.mode, d.dev) == 0 {
            chown(&d.target, d.uid, d.gid);
            continue;
        }
        match errno() {
            libc::EEXIST => {}
            libc::EPERM => {
                // No mknod in a user namespace: bind the agent's node.
                // SAFETY: see the top of the function.
                unsafe { touch(fds, &d.target, 0o644, Step::Device, i) };
                let rc = mount(Some(&d.host), &d.target, None, libc::MS_BIND, None);
                // SAFETY: see the top of the function.
                unsafe { check(fds, rc, Step::Device, i) };
            }
            // SAFETY: see the top of the function.
            e => unsafe { fail(fds, Step::Device, i, e) },
        }
    }
    if let (Some(console), Some(tty)) = (&p.console, fds.tty) {
        // The terminal appears as /dev/console, as in runc (by path: a
        // bind mount cannot take the fd, whose mount is the agent's).
        // SAFETY: see the top of the function.
        unsafe { touch(fds, console, 0o600, Step::Device, usize::MAX) };
        let rc = mount(Some(tty), console, None, libc::MS_BIND, None);
        // SAFETY: see the top of the function.
        unsafe { check(fds, rc, Step::Device, usize::MAX) };
    }
    for (i, (to, link)) in p.dev_links.iter().enumerate() {
        if symlink(to, link) < 0 && errno() != libc::EEXIST {
            // SAFETY: see the top of the function.
            unsafe { fail(fds, Step::DevLink, i, errno()) };
        }
    }
    // The old root, to detach after pivot_root by descriptor, as runc
    // does, rather than by what "." resolves to.
    // SAFETY: a NUL-terminated path; the descriptor is closed below (and
    // close-on-exec).
    let old_root = unsafe {
        libc::open(
            slash.as_ptr(),
            libc::O_DIRECTORY | libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    // SAFETY: see the top of the function.
    unsafe { check(fds, old_root.into(), Step::PivotRoot, 7) };
    // SAFETY: see the top of the function.
    unsafe { check(fds, chdir(&p.rootfs), Step::PivotRoot, 0) };
    if pivot_root(dot, dot) == 0 {
        // The old root is stacked over the new one: detach it, made a
        // slave first, so that the detaching does not propagate to the
        // agent's own mounts (with a shared root, the container's copies
        // of the agent's shared mounts, the pod's share among them, are
        // their peers: a detach would unmount the agent's volumes too).
        // SAFETY: fchdir(2) to the descriptor opened above.
        let rc = unsafe { libc::fchdir(old_root) };
        // SAFETY: see the top of the function.
        unsafe { check(fds, rc.into(), Step::PivotRoot, 8) };
        let rc = mount(None, dot, None, libc::MS_SLAVE | libc::MS_REC, None);
        // SAFETY: see the top of the function.
        unsafe { check(fds, rc, Step::PivotRoot, 6) };
        // SAFETY: see the top of the function.
        unsafe { check(fds, umount2(dot, libc::MNT_DETACH), Step::PivotRoot, 2) };
    } else if errno() == libc::EINVAL {
        // The agent's root is the initial rootfs (an initramfs the agent
        // could not leave), which pivot_root refuses: move the container's
        // root over it and chroot, as runc's --no-pivot does.
        let rc = mount(Some(dot), slash, None, libc::MS_MOVE, None);
        // SAFETY: see the top of the function.
        unsafe { check(fds, rc, Step::PivotRoot, 4) };
        // SAFETY: see the top of the function.
        unsafe { check(fds, chroot(dot), Step::PivotRoot, 5) };
    } else {
        // SAFETY: see the top of the function.
        unsafe { fail(fds, Step::PivotRoot, 1, errno()) };
    }
    // SAFETY: the descriptor opened above, not used after.
    unsafe { libc::close(old_root) };
    // SAFETY: see the top of the function.
    unsafe { check(fds, chdir(slash), Step::PivotRoot, 3) };
    if p.readonly_root {
        let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY;
        let rc = mount(None, slash, None, flags, None);
        // SAFETY: see the top of the function.
        unsafe { check(fds, rc, Step::ReadonlyRoot, 0) };
    }
    for (i, (_, path, value)) in p.sysctls.iter().enumerate() {
        // SAFETY: a NUL-terminated path borrowed for the call; the fd it
        // returns is closed below.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
        // SAFETY: see the top of the function.
        unsafe { check(fds, fd.into(), Step::Sysctl, i) };
        let n = value.as_bytes().len();
        // SAFETY: writing the `n` bytes of `value` to the fd opened above.
        if unsafe { libc::write(fd, value.as_ptr().cast(), n) } != n as isize {
            // SAFETY: see the top of the function.
            unsafe { fail(fds, Step::Sysctl, i, errno()) };
        }
        // SAFETY: the fd opened above, which nothing else owns.
        unsafe { libc::close(fd) };
    }
    for (i, path) in p.masked.iter().enumerate() {
        let rc = match is_dir(path) {
            None => continue, // absent: nothing to mask
            Some(true) => mount(Some(c"tmpfs"), path, Some(c"tmpfs"), libc::MS_RDONLY, None),
            Some(false) => mount(Some(c"/dev/null"), path, None, libc::MS_BIND, None),
        };
        // SAFETY: see the top of the function.
        unsafe { check(fds, rc, Step::Mask, i) };
    }
    for (i, path) in p.readonly.iter().enumerate() {
        let rc = mount(Some(path), path, None, libc::MS_BIND | libc::MS_REC, None);
        if rc < 0 && errno() == libc::ENOENT {
            continue;
        }
        // SAFETY: see the top of the function.
        unsafe { check(fds, rc, Step::Readonly, i) };
        let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_REC;
        let rc = mount(Some(path), path, None, flags, None);
        // SAFETY: see the top of the function.
        unsafe { check(fds, rc, Step::Readonly, i) };
    }
    if let Some(h) = &p.hostname {
        // SAFETY: the name's bytes (without the NUL), borrowed for the call.
        let rc = unsafe { libc::sethostname(h.as_ptr(), h.as_bytes().len()) };
        // SAFETY: see the top of the function.
        unsafe { check(fds, rc.into(), Step::Hostname, 0) };
    }
    if let Some(d) = &p.domainname {
        // SAFETY: the name's bytes (without the NUL), borrowed for the call.
        let rc = unsafe { libc::setdomainname(d.as_ptr(), d.as_bytes().len()) };
        // SAFETY: see the top of the function.
        unsafe { check(fds, rc.into(), Step::Hostname, 1) };
    }
}

/// Installs the seccomp filter `prog`.
///
/// # Safety
///
/// As [`fail`]; the filter applies to the calling thread, the child's
/// only one.
unsafe fn install_seccomp(fds: &ChildFds, prog: &[libc::sock_filter]) {
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: the kernel copies the `len` instructions `fprog` points to;
    // both outlive the call and the kernel does not write through them.
    let rc = unsafe { libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &fprog) };
    // SAFETY: in the child, as this function requires.
    unsafe { check(fds, rc.into(), Step::Seccomp, 0) };
}

/// Reads one byte from `fd`, or ends the child (the agent gave up on it).
///
/// # Safety
///
/// As [`fail`]; `fd` is one of the child's pipes.
unsafe fn wait_for(fd: RawFd) {
    let mut b = 0u8;
    // SAFETY: reading one byte into `b`.
    if unsafe { libc::read(fd, (&mut b as *mut u8).cast(), 1) } != 1 {
        // SAFETY: _exit(2), as in `fail`.
        unsafe { libc::_exit(127) };
    }
    // SAFETY: the pipe's read end, used no more.
    unsafe { libc::close(fd) };
}

/// The child: never returns.
///
/// # Safety
///
/// Call only in the child of the raw clone in [`super::process::spawn`],
/// before anything else: it runs in a copy of the multi-threaded agent
/// whose other threads do not exist, so it must (and does) allocate
/// nothing and take no lock; it closes, duplicates and writes the
/// descriptors in `fds` and every other one by number, and ends in execve
/// or `_exit`.
pub(super) unsafe fn child(plan: &Plan, fds: &ChildFds) -> ! {
    // SAFETY (for every `check`, `fail` and step below): this is the child,
    // as this function requires.
    //
    // Signals the agent blocks or ignores must not stay so for the program.
    // SAFETY: sigset_t is plain data; all-zero is valid, and sigemptyset
    // initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t borrowed for the call.
    unsafe { libc::sigemptyset(&mut set) };
    // SAFETY: an initialised set; the old mask is not wanted.
    unsafe { libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) };
    // SAFETY: restores the default disposition; no handler is installed.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    // SAFETY: see the top of the function.
    unsafe { close_others(fds.keep) };
    // SAFETY: see the top of the function.
    unsafe { wait_for(fds.go) };
    for (i, &(fd, kind)) in fds.join.iter().enumerate() {
        // SAFETY: setns(2) on a namespace fd the child kept.
        let rc = unsafe { libc::setns(fd, kind) };
        // SAFETY: see the top of the function.
        unsafe { check(fds, rc.into(), Step::Join, i) };
        // SAFETY: that fd, used no more.
        unsafe { libc::close(fd) };
    }
    // SAFETY: see the top of the function.
    unsafe { setup_stdio(fds) };
    let userns = plan.clone_flags & libc::CLONE_NEWUSER != 0
        || fds.join.iter().any(|&(_, t)| t == libc::CLONE_NEWUSER);
    if userns {
        // Still the agent's (unmapped) uid: become the namespace's root, so
        // files made from here on have owners the namespace can name.
        // SAFETY: see the top of the function.
        unsafe {
            check(fds, setresgid(0), Step::Gid, 0);
            check(fds, setresuid(0), Step::Uid, 0);
            check(fds, setgroups(&[]), Step::Groups, 0);
        }
    }
    let p = &plan.proc;
    if let Some(init) = &plan.init {
        if init.unshare_cgroupns {
            // SAFETY: unshare(2) with a constant flag.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWCGROUP) };
            // SAFETY: see the top of the function.
            unsafe { check(fds, rc.into(), Step::CgroupNs, 0) };
        }
        // SAFETY: see the top of the function; the clone made a new mount
        // namespace for an init (the plan always asks for one).
        unsafe { setup_root(fds, init) };
    }
    for (i, (_, res, lim)) in p.rlimits.iter().enumerate() {
        // SAFETY: setrlimit(2) reads the rlimit borrowed for the call.
        let rc = unsafe { libc::setrlimit(*res as _, lim) };
        // SAFETY: see the top of the function.
        unsafe { check(fds, rc.into(), Step::Rlimit, i) };
    }
    // SAFETY: see the top of the function.
    unsafe { check(fds, chdir(&p.cwd), Step::Cwd, 0) };
    let mut exe: Option<&CString> = None;
    let mut lookup_err = libc::ENOENT;
    for c in &p.candidates {
        if executable(c) {
            exe = Some(c);
            break;
        }
        if errno() != libc::ENOENT && errno() != libc::ENOTDIR {
            lookup_err = errno();
        }
    }
    let Some(exe) = exe else {
        // SAFETY: see the top of the function.
        unsafe { fail(fds, Step::Lookup, 0, lookup_err) }
    };
    if let Some(start) = fds.start {
        let ready = [0u8; 12];
        // SAFETY: writing the 12 bytes of `ready` to the report pipe.
        unsafe { libc::write(fds.sync, ready.as_ptr().cast(), ready.len()) };
        // SAFETY: see the top of the function.
        unsafe { wait_for(start) };
    }
    for (i, &fd) in fds.stdio.iter().enumerate() {
        if fd > 2 && !fds.stdio[..i].contains(&fd) {
            // SAFETY: the original of a stdio fd, duplicated onto 0-2.
            unsafe { libc::close(fd) };
        }
    }
    if let Some(m) = p.umask {
        // SAFETY: umask(2) takes an integer and cannot fail.
        unsafe { libc::umask(m as libc::mode_t) };
    }
    if let (Some(prog), false) = (&p.seccomp, p.no_new_privs) {
        // Without no_new_privs the filter needs CAP_SYS_ADMIN: install it
        // while the process still has it.
        // SAFETY: see the top of the function.
        unsafe { install_seccomp(fds, prog) };
    }
    if let Some(caps) = &p.caps {
        // SAFETY: prctl(2) with integer arguments.
        unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) };
        if let Err(cap) = caps.apply_bounding() {
            // SAFETY: see the top of the function.
            unsafe { fail(fds, Step::Bounding, cap as usize, errno()) };
        }
    }
    // SAFETY: see the top of the function.
    unsafe {
        check(fds, setgroups(&p.groups), Step::Groups, 0);
        check(fds, setresgid(p.gid), Step::Gid, 0);
        check(fds, setresuid(p.uid), Step::Uid, 0);
    }
    if let Some(caps) = &p.caps {
        if let Err(cap) = caps.apply() {
            // SAFETY: see the top of the function.
            unsafe { fail(fds, Step::Capabilities, cap as usize, errno()) };
        }
    }
    if p.no_new_privs {
        // SAFETY: prctl(2) with integer arguments.
        let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
        // SAFETY: see the top of the function.
        unsafe { check(fds, rc.into(), Step::NoNewPrivs, 0) };
        if let Some(prog) = &p.seccomp {
            // SAFETY: see the top of the function.
            unsafe { install_seccomp(fds, prog) };
        }
    }
    // On the stack: the child may not allocate.
    let mut argv: [*const libc::c_char; 1024] = [std::ptr::null(); 1024];
    let mut envp: [*const libc::c_char; 4096] = [std::ptr::null(); 4096];
    for (slot, a) in argv.iter_mut().take(1023).zip(&p.argv) {
        *slot = a.as_ptr();
    }
    for (slot, e) in envp.iter_mut().take(4095).zip(&p.env) {
        *slot = e.as_ptr();
    }
    // SAFETY: a NUL-terminated path and NULL-terminated arrays of
    // NUL-terminated strings (the plan's, alive until the exec replaces
    // the process); it returns only on failure.
    unsafe { libc::execve(exe.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    // SAFETY: see the top of the function.
    unsafe { fail(fds, Step::Exec, 0, errno()) }
}
