//! The cloned child's side: everything between clone and execve, in
//! order (see [`super::process`]). It runs in a copy of the multi-threaded
//! agent, so it allocates nothing and takes no locks: it walks what
//! [`super::plan`] prepared and makes system calls, reporting a failure as
//! (step, item, errno) on the close-on-exec pipe and exiting.

// The per-call unsafe blocks this lint asks for come with the agent's
// restructuring (issue 15); until then the child's unsafe fns are whole.
#![allow(unsafe_op_in_unsafe_fn)]

use std::ffi::CString;
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
    // SAFETY: reading the thread's errno.
    unsafe { *libc::__errno_location() }
}

// glibc's setuid family changes every thread of the process: it signals
// the threads it knows and waits for them. The child's copy of that list
// names the agent's threads, which are not in the child -- and in a new pid
// namespace their thread ids may be the child's own (the agent as PID 1 has
// thread id 1): it would wait forever. So the raw system calls, which
// change just the calling (only) thread.
unsafe fn setresuid(uid: u32) -> libc::c_long {
    libc::syscall(libc::SYS_setresuid, uid, uid, uid)
}

unsafe fn setresgid(gid: u32) -> libc::c_long {
    libc::syscall(libc::SYS_setresgid, gid, gid, gid)
}

unsafe fn setgroups(groups: &[libc::gid_t]) -> libc::c_long {
    libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr())
}

/// Reports a failure and exits.
unsafe fn fail(fds: &ChildFds, step: Step, index: usize, err: i32) -> ! {
    let mut buf = [0u8; 12];
    buf[0..4].copy_from_slice(&(step as u32).to_ne_bytes());
    buf[4..8].copy_from_slice(&(index as u32).to_ne_bytes());
    buf[8..12].copy_from_slice(&err.to_ne_bytes());
    libc::write(fds.sync, buf.as_ptr().cast(), buf.len());
    libc::_exit(127)
}

/// Checks a system call's result; on failure reports `step` and exits.
unsafe fn check(fds: &ChildFds, rc: libc::c_long, step: Step, index: usize) {
    if rc < 0 {
        fail(fds, step, index, errno())
    }
}

/// Creates `path` as an empty file (a mount point for a file) if it is
/// missing; fails the child at `step` if it cannot.
unsafe fn touch(fds: &ChildFds, path: &CString, mode: libc::mode_t, step: Step, index: usize) {
    let fd = libc::open(
        path.as_ptr(),
        libc::O_CREAT | libc::O_CLOEXEC | libc::O_WRONLY,
        mode,
    );
    check(fds, fd as libc::c_long, step, index);
    libc::close(fd);
}

unsafe fn mkdir_ok(path: &CString) -> libc::c_long {
    if libc::mkdir(path.as_ptr(), 0o755) < 0 && errno() != libc::EEXIST {
        return -1;
    }
    0
}

unsafe fn close_others(keep: &[RawFd]) {
    let mut from: u32 = 3;
    for &fd in keep {
        let fd = fd as u32;
        if fd > from {
            libc::syscall(libc::SYS_close_range, from, fd - 1, 0u32);
        }
        if fd >= from {
            from = fd + 1;
        }
    }
    libc::syscall(libc::SYS_close_range, from, u32::MAX, 0u32);
}

unsafe fn setup_stdio(fds: &ChildFds) {
    if fds.tty.is_some() {
        check(fds, libc::setsid() as libc::c_long, Step::Stdio, 0);
        check(
            fds,
            libc::ioctl(fds.stdio[0], libc::TIOCSCTTY, 0) as libc::c_long,
            Step::Stdio,
            1,
        );
    }
    for (target, &fd) in fds.stdio.iter().enumerate() {
        if fd != target as RawFd {
            check(
                fds,
                libc::dup2(fd, target as RawFd) as libc::c_long,
                Step::Stdio,
                target,
            );
        }
    }
}

unsafe fn setup_root(fds: &ChildFds, p: &InitPlan) {
    let none = std::ptr::null::<libc::c_char>();
    let slash = c"/".as_ptr();
    check(
        fds,
        libc::mount(none, slash, none, p.root_propagation, std::ptr::null()) as libc::c_long,
        Step::Propagation,
        0,
    );
    check(
        fds,
        libc::mount(
            p.rootfs.as_ptr(),
            p.rootfs.as_ptr(),
            none,
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        ) as libc::c_long,
        Step::BindRoot,
        0,
    );
    for (i, m) in p.mounts.iter().enumerate() {
        for d in &m.mkdirs {
            check(fds, mkdir_ok(d), Step::Mkdir, i);
        }
        if m.file {
            touch(fds, &m.target, 0o644, Step::Mkdir, i);
        }
        let (flags, data) = if m.bind {
            (m.flags & (libc::MS_BIND | libc::MS_REC), std::ptr::null())
        } else {
            (m.flags, m.data.as_ptr().cast())
        };
        let fstype = if m.bind { none } else { m.fstype.as_ptr() };
        let mut rc = libc::mount(m.source.as_ptr(), m.target.as_ptr(), fstype, flags, data);
        if rc < 0 && errno() == libc::EPERM && m.fstype.as_bytes() == b"sysfs" {
            // sysfs of a network namespace the container does not own (a
            // user namespace sharing the VM's network): bind the agent's.
            rc = libc::mount(
                c"/sys".as_ptr(),
                m.target.as_ptr(),
                none,
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            );
        }
        check(fds, rc as libc::c_long, Step::Mount, i);
        let extra = m.flags & !(libc::MS_BIND | libc::MS_REC | libc::MS_REMOUNT);
        if m.bind && extra != 0 {
            check(
                fds,
                libc::mount(
                    none,
                    m.target.as_ptr(),
                    none,
                    libc::MS_BIND | libc::MS_REMOUNT | extra,
                    std::ptr::null(),
                ) as libc::c_long,
                Step::Remount,
                i,
            );
        }
        if m.propagation != 0 {
            check(
                fds,
                libc::mount(
                    none,
                    m.target.as_ptr(),
                    none,
                    m.propagation,
                    std::ptr::null(),
                ) as libc::c_long,
                Step::MountPropagation,
                i,
            );
        }
    }
    for (i, d) in p.devices.iter().enumerate() {
        if libc::mknod(d.target.as_ptr(), d.mode, d.dev) == 0 {
            libc::chown(d.target.as_ptr(), d.uid, d.gid);
            continue;
        }
        match errno() {
            libc::EEXIST => {}
            libc::EPERM => {
                // No mknod in a user namespace: bind the agent's node.
                touch(fds, &d.target, 0o644, Step::Device, i);
                check(
                    fds,
                    libc::mount(
                        d.host.as_ptr(),
                        d.target.as_ptr(),
                        none,
                        libc::MS_BIND,
                        std::ptr::null(),
                    ) as libc::c_long,
                    Step::Device,
                    i,
                );
            }
            e => fail(fds, Step::Device, i, e),
        }
    }
    if let (Some(console), Some(tty)) = (&p.console, fds.tty) {
        // The terminal appears as /dev/console, as in runc (by path: a
        // bind mount cannot take the fd, whose mount is the agent's).
        touch(fds, console, 0o600, Step::Device, usize::MAX);
        check(
            fds,
            libc::mount(
                tty.as_ptr(),
                console.as_ptr(),
                none,
                libc::MS_BIND,
                std::ptr::null(),
            ) as libc::c_long,
            Step::Device,
            usize::MAX,
        );
    }
    for (i, (to, link)) in p.dev_links.iter().enumerate() {
        if libc::symlink(to.as_ptr(), link.as_ptr()) < 0 && errno() != libc::EEXIST {
            fail(fds, Step::DevLink, i, errno());
        }
    }
    let dot = c".".as_ptr();
    check(
        fds,
        libc::chdir(p.rootfs.as_ptr()) as libc::c_long,
        Step::PivotRoot,
        0,
    );
    if libc::syscall(libc::SYS_pivot_root, dot, dot) == 0 {
        // The old root is stacked under the new one: detach it.
        check(
            fds,
            libc::umount2(dot, libc::MNT_DETACH) as libc::c_long,
            Step::PivotRoot,
            2,
        );
    } else if errno() == libc::EINVAL {
        // The agent's root is the initial rootfs (an initramfs the agent
        // could not leave), which pivot_root refuses: move the container's
        // root over it and chroot, as runc's --no-pivot does.
        check(
            fds,
            libc::mount(dot, slash, none, libc::MS_MOVE, std::ptr::null()) as libc::c_long,
            Step::PivotRoot,
            4,
        );
        check(fds, libc::chroot(dot) as libc::c_long, Step::PivotRoot, 5);
    } else {
        fail(fds, Step::PivotRoot, 1, errno());
    }
    check(fds, libc::chdir(slash) as libc::c_long, Step::PivotRoot, 3);
    if p.readonly_root {
        check(
            fds,
            libc::mount(
                none,
                slash,
                none,
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                std::ptr::null(),
            ) as libc::c_long,
            Step::ReadonlyRoot,
            0,
        );
    }
    for (i, (_, path, value)) in p.sysctls.iter().enumerate() {
        let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        check(fds, fd as libc::c_long, Step::Sysctl, i);
        let n = value.as_bytes().len();
        if libc::write(fd, value.as_ptr().cast(), n) != n as isize {
            fail(fds, Step::Sysctl, i, errno());
        }
        libc::close(fd);
    }
    for (i, path) in p.masked.iter().enumerate() {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::stat(path.as_ptr(), &mut st) < 0 {
            continue; // absent: nothing to mask
        }
        let rc = if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            libc::mount(
                c"tmpfs".as_ptr(),
                path.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_RDONLY,
                std::ptr::null(),
            )
        } else {
            libc::mount(
                c"/dev/null".as_ptr(),
                path.as_ptr(),
                none,
                libc::MS_BIND,
                std::ptr::null(),
            )
        };
        check(fds, rc as libc::c_long, Step::Mask, i);
    }
    for (i, path) in p.readonly.iter().enumerate() {
        let rc = libc::mount(
            path.as_ptr(),
            path.as_ptr(),
            none,
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        );
        if rc < 0 && errno() == libc::ENOENT {
            continue;
        }
        check(fds, rc as libc::c_long, Step::Readonly, i);
        check(
            fds,
            libc::mount(
                path.as_ptr(),
                path.as_ptr(),
                none,
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_REC,
                std::ptr::null(),
            ) as libc::c_long,
            Step::Readonly,
            i,
        );
    }
    if let Some(h) = &p.hostname {
        check(
            fds,
            libc::sethostname(h.as_ptr(), h.as_bytes().len()) as libc::c_long,
            Step::Hostname,
            0,
        );
    }
    if let Some(d) = &p.domainname {
        check(
            fds,
            libc::setdomainname(d.as_ptr(), d.as_bytes().len()) as libc::c_long,
            Step::Hostname,
            1,
        );
    }
}

unsafe fn install_seccomp(fds: &ChildFds, prog: &[libc::sock_filter]) {
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    check(
        fds,
        libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &fprog) as libc::c_long,
        Step::Seccomp,
        0,
    );
}

/// The child: never returns.
pub(super) unsafe fn child(plan: &Plan, fds: &ChildFds) -> ! {
    // Signals the agent blocks or ignores must not stay so for the program.
    let mut set: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut set);
    libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    close_others(fds.keep);
    let mut b = 0u8;
    if libc::read(fds.go, (&mut b as *mut u8).cast(), 1) != 1 {
        libc::_exit(127);
    }
    libc::close(fds.go);
    for (i, &(fd, kind)) in fds.join.iter().enumerate() {
        check(fds, libc::setns(fd, kind) as libc::c_long, Step::Join, i);
        libc::close(fd);
    }
    setup_stdio(fds);
    let userns = plan.clone_flags & libc::CLONE_NEWUSER != 0
        || fds.join.iter().any(|&(_, t)| t == libc::CLONE_NEWUSER);
    if userns {
        // Still the agent's (unmapped) uid: become the namespace's root, so
        // files made from here on have owners the namespace can name.
        check(fds, setresgid(0), Step::Gid, 0);
        check(fds, setresuid(0), Step::Uid, 0);
        check(fds, setgroups(&[]), Step::Groups, 0);
    }
    let p = &plan.proc;
    if let Some(init) = &plan.init {
        if init.unshare_cgroupns {
            check(
                fds,
                libc::unshare(libc::CLONE_NEWCGROUP) as libc::c_long,
                Step::CgroupNs,
                0,
            );
        }
        setup_root(fds, init);
    }
    for (i, (_, res, lim)) in p.rlimits.iter().enumerate() {
        check(
            fds,
            libc::setrlimit(*res as _, lim) as libc::c_long,
            Step::Rlimit,
            i,
        );
    }
    check(
        fds,
        libc::chdir(p.cwd.as_ptr()) as libc::c_long,
        Step::Cwd,
        0,
    );
    let mut exe: Option<&CString> = None;
    let mut lookup_err = libc::ENOENT;
    for c in &p.candidates {
        if libc::access(c.as_ptr(), libc::X_OK) == 0 {
            exe = Some(c);
            break;
        }
        if errno() != libc::ENOENT && errno() != libc::ENOTDIR {
            lookup_err = errno();
        }
    }
    let Some(exe) = exe else {
        fail(fds, Step::Lookup, 0, lookup_err)
    };
    if let Some(start) = fds.start {
        let ready = [0u8; 12];
        libc::write(fds.sync, ready.as_ptr().cast(), ready.len());
        if libc::read(start, (&mut b as *mut u8).cast(), 1) != 1 {
            libc::_exit(127);
        }
        libc::close(start);
    }
    for (i, &fd) in fds.stdio.iter().enumerate() {
        if fd > 2 && !fds.stdio[..i].contains(&fd) {
            libc::close(fd);
        }
    }
    if let Some(m) = p.umask {
        libc::umask(m as libc::mode_t);
    }
    if let (Some(prog), false) = (&p.seccomp, p.no_new_privs) {
        // Without no_new_privs the filter needs CAP_SYS_ADMIN: install it
        // while the process still has it.
        install_seccomp(fds, prog);
    }
    if let Some(caps) = &p.caps {
        libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0);
        if let Err(cap) = caps.apply_bounding() {
            fail(fds, Step::Bounding, cap as usize, errno());
        }
    }
    check(fds, setgroups(&p.groups), Step::Groups, 0);
    check(fds, setresgid(p.gid), Step::Gid, 0);
    check(fds, setresuid(p.uid), Step::Uid, 0);
    if let Some(caps) = &p.caps {
        if let Err(cap) = caps.apply() {
            fail(fds, Step::Capabilities, cap as usize, errno());
        }
    }
    if p.no_new_privs {
        check(
            fds,
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) as libc::c_long,
            Step::NoNewPrivs,
            0,
        );
        if let Some(prog) = &p.seccomp {
            install_seccomp(fds, prog);
        }
    }
    let mut argv: [*const libc::c_char; 1024] = [std::ptr::null(); 1024];
    let mut envp: [*const libc::c_char; 4096] = [std::ptr::null(); 4096];
    for (slot, a) in argv.iter_mut().take(1023).zip(&p.argv) {
        *slot = a.as_ptr();
    }
    for (slot, e) in envp.iter_mut().take(4095).zip(&p.env) {
        *slot = e.as_ptr();
    }
    libc::execve(exe.as_ptr(), argv.as_ptr(), envp.as_ptr());
    fail(fds, Step::Exec, 0, errno())
}
