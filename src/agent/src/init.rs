//! PID 1 duties: leave the initramfs; mount proc, sysfs, devtmpfs,
//! /dev/pts, /dev/shm, /run and cgroup2; and end the guest by syncing and
//! resetting it (with `reboot=k` the VMM sees the reset and exits cleanly).
//! PID 1 must never exit: that panics the kernel. (Reaping every orphan and
//! turning SIGTERM into an orderly shutdown are [`crate::signals`]'.)

use std::ffi::CString;

use crate::config::SWITCHED;
use crate::log;

fn mount(source: &str, target: &str, fstype: &str, flags: libc::c_ulong, data: Option<&str>) {
    let _ = std::fs::create_dir_all(target);
    let c = |s: &str| CString::new(s).unwrap_or_default();
    let (source_c, target_c, fstype_c) = (c(source), c(target), c(fstype));
    let data_c = data.map(c);
    // SAFETY: NUL-terminated strings that outlive the call; data may be null.
    let rc = unsafe {
        libc::mount(
            source_c.as_ptr(),
            target_c.as_ptr(),
            fstype_c.as_ptr(),
            flags,
            data_c
                .as_ref()
                .map_or(std::ptr::null(), |d| d.as_ptr().cast()),
        )
    };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        // Already mounted (the kernel's devtmpfs automount, for one) is fine.
        if e.raw_os_error() != Some(libc::EBUSY) {
            log::warn(&format!("mount {fstype} on {target}: {e}"));
        }
    }
}

/// The filesystems every container setup relies on.
fn mount_basics() {
    let nosuid_nodev_noexec = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount("proc", "/proc", "proc", nosuid_nodev_noexec, None);
    mount("sysfs", "/sys", "sysfs", nosuid_nodev_noexec, None);
    mount(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        libc::MS_NOSUID,
        Some("mode=0755"),
    );
    mount(
        "devpts",
        "/dev/pts",
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    );
    mount(
        "shm",
        "/dev/shm",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=1777"),
    );
    mount(
        "tmpfs",
        "/run",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=0755"),
    );
    mount(
        "cgroup2",
        "/sys/fs/cgroup",
        "cgroup2",
        nosuid_nodev_noexec,
        None,
    );
    let _ = std::os::unix::fs::symlink("/proc/self/fd", "/dev/fd");
    let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
}

/// pivot_root(2) refuses to move away from the initial rootfs (EINVAL), so
/// containers could not pivot while the agent runs from the initramfs.
/// Like switch_root: copy the agent into a tmpfs, move that tmpfs over /,
/// chroot into it and re-exec; the initramfs copy is deleted to free its
/// memory. On failure the agent carries on from the initramfs (containers
/// then fail with a clear pivot_root error).
fn leave_initramfs(switched: bool) {
    if switched {
        return;
    }
    if let Err(e) = switch_root() {
        log::warn(&format!("cannot leave the initramfs: {e}"));
    }
}

fn switch_root() -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::PermissionsExt;
    let last = || std::io::Error::last_os_error();
    let new_root = "/.husk-root";
    std::fs::create_dir_all(new_root)?;
    mount(
        "tmpfs",
        new_root,
        "tmpfs",
        libc::MS_NOSUID,
        Some("mode=0755"),
    );
    for d in ["dev", "proc", "sys", "run", "tmp", "etc", "mnt"] {
        std::fs::create_dir_all(format!("{new_root}/{d}"))?;
    }
    std::fs::set_permissions(
        format!("{new_root}/tmp"),
        std::fs::Permissions::from_mode(0o1777),
    )?;
    let exe = std::env::current_exe().unwrap_or_else(|_| "/init".into());
    std::fs::copy(&exe, format!("{new_root}/init"))?;
    let _ = std::fs::remove_file(&exe);
    std::env::set_current_dir(new_root)?;
    // SAFETY: constant NUL-terminated strings.
    if unsafe {
        libc::mount(
            c".".as_ptr(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_MOVE,
            std::ptr::null(),
        )
    } < 0
    {
        return Err(last());
    }
    // SAFETY: constant NUL-terminated string.
    if unsafe { libc::chroot(c".".as_ptr()) } < 0 {
        return Err(last());
    }
    std::env::set_current_dir("/")?;
    let args: Vec<CString> = std::env::args_os()
        .filter_map(|a| CString::new(a.as_bytes()).ok())
        .collect();
    let mut env: Vec<CString> = std::env::vars_os()
        .filter_map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            CString::new(kv).ok()
        })
        .collect();
    env.push(CString::new(format!("{SWITCHED}=1")).unwrap_or_default());
    let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
    envp.push(std::ptr::null());
    // SAFETY: NULL-terminated arrays of NUL-terminated strings that outlive
    // the call; on success it does not return.
    unsafe { libc::execve(c"/init".as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    Err(last())
}

/// The guest's memory is its containers' limits and little more, where a
/// node's is many times any limit: with the kernel's heuristic
/// overcommit, an allocation past a container's limit would fail with
/// ENOMEM in the guest (it exceeds the guest's RAM) where on a node it
/// succeeds and the container is OOM-killed as it touches the memory, as
/// Kubernetes reports (OOMKilled). Always overcommitting gives the node's
/// behaviour: the limit, enforced by the container's cgroup, decides.
fn overcommit_as_a_node() {
    if let Err(e) = std::fs::write("/proc/sys/vm/overcommit_memory", "1") {
        log::warn(&format!("cannot set vm.overcommit_memory: {e}"));
    }
}

/// Makes this process the guest's init, before any thread is started:
/// leaves the initramfs (re-executing from a tmpfs unless `switched` says
/// that happened), mounts the basics and sets PATH.
pub fn prepare(switched: bool) {
    leave_initramfs(switched);
    mount_basics();
    overcommit_as_a_node();
    std::env::set_var(
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    );
}

/// Ends the guest (as init: sync, then reset through the kernel's reboot
/// path) or, outside a guest, the process.
pub fn shutdown(pid1: bool) -> ! {
    if !pid1 {
        log::info("shutdown requested");
        std::process::exit(0);
    }
    log::info("syncing and resetting the guest");
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    // SAFETY: reboot(2) as PID 1 with a constant command.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    // Only reachable if reboot failed; PID 1 must not exit.
    log::error(&format!("reboot: {}", std::io::Error::last_os_error()));
    loop {
        // SAFETY: pause(2) just sleeps until a signal.
        unsafe { libc::pause() };
    }
}
