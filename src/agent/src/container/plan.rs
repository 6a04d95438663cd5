//! Everything a container process needs, computed from the OCI spec before
//! it is cloned: the child runs in a copy of a multi-threaded agent, so it
//! must not allocate; it only walks these ready-made C strings, masks and
//! numbers and makes system calls ([`super::process`]). Checking the spec
//! here also turns bad input (a relative mount destination, an unknown
//! user, a capability or rlimit the agent does not know) into an error
//! reply before anything is created.

use std::ffi::CString;
use std::path::{Component, Path, PathBuf};

use husk_protocol::{AgentError, ErrorCode};
use oci_spec::runtime::{LinuxNamespaceType, Process, Spec};

use super::caps::Caps;
use super::devices::{self, KernelDevices, Kind};

fn invalid(msg: impl Into<String>) -> AgentError {
    AgentError::new(ErrorCode::InvalidArgument, msg)
}

fn cstring(s: impl Into<Vec<u8>>) -> Result<CString, AgentError> {
    CString::new(s).map_err(|_| invalid("a string in the spec contains a NUL byte"))
}

fn path_c(p: &Path) -> Result<CString, AgentError> {
    cstring(p.as_os_str().as_encoded_bytes())
}

/// `dest` (absolute, inside the container) under `root`, refusing `..`.
fn under(root: &Path, dest: &Path) -> Result<PathBuf, AgentError> {
    if !dest.is_absolute() {
        return Err(invalid(format!(
            "{} is not an absolute path",
            dest.display()
        )));
    }
    let mut out = root.to_path_buf();
    for c in dest.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir => {}
            _ => {
                return Err(invalid(format!(
                    "{} leaves the container root",
                    dest.display()
                )))
            }
        }
    }
    Ok(out)
}

/// Every directory from `root` (exclusive) down to `dir` (inclusive).
fn dirs_to(root: &Path, dir: &Path) -> Result<Vec<CString>, AgentError> {
    let rel = dir.strip_prefix(root).unwrap_or(dir);
    let mut cur = root.to_path_buf();
    let mut out = Vec::new();
    for c in rel.components() {
        cur.push(c);
        out.push(path_c(&cur)?);
    }
    Ok(out)
}

/// One mount from the spec, ready for mount(2).
pub struct MountOp {
    /// For messages.
    pub destination: String,
    pub source: CString,
    pub target: CString,
    pub fstype: CString,
    pub flags: libc::c_ulong,
    pub data: CString,
    /// A bind mount: flags other than MS_BIND|MS_REC need a remount.
    pub bind: bool,
    /// MS_PRIVATE etc., applied after the mount.
    pub propagation: libc::c_ulong,
    /// Directories to create first.
    pub mkdirs: Vec<CString>,
    /// The target is a file (a bind mount of a file).
    pub file: bool,
}

/// A device node under the new root's /dev.
pub struct DeviceOp {
    pub path: String,
    pub target: CString,
    /// Directories to create first (/dev/net for /dev/net/tun).
    pub mkdirs: Vec<CString>,
    pub mode: libc::mode_t,
    pub dev: libc::dev_t,
    pub uid: u32,
    pub gid: u32,
    /// The agent's own node, bind-mounted when mknod is not allowed (in a
    /// user namespace).
    pub host: CString,
}

/// Container set-up done only for a container's init process.
pub struct InitPlan {
    pub rootfs: CString,
    pub root_propagation: libc::c_ulong,
    pub mounts: Vec<MountOp>,
    pub devices: Vec<DeviceOp>,
    pub dev_links: Vec<(CString, CString)>,
    /// `/dev/console` under the new root, where a terminal is bound.
    pub console: Option<CString>,
    pub readonly_root: bool,
    pub sysctls: Vec<(String, CString, CString)>,
    pub masked: Vec<CString>,
    pub readonly: Vec<CString>,
    pub hostname: Option<CString>,
    pub domainname: Option<CString>,
    pub unshare_cgroupns: bool,
}

/// The process itself: identity, limits, what to execute.
pub struct ProcPlan {
    pub argv: Vec<CString>,
    pub env: Vec<CString>,
    /// Where args[0] may be, in PATH order.
    pub candidates: Vec<CString>,
    pub cwd: CString,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<libc::gid_t>,
    pub umask: Option<u32>,
    pub caps: Option<Caps>,
    pub no_new_privs: bool,
    pub rlimits: Vec<(String, libc::c_int, libc::rlimit)>,
    pub terminal: bool,
    pub seccomp: Option<Vec<libc::sock_filter>>,
    /// Written to /proc/<pid>/oom_score_adj by the agent.
    pub oom_score_adj: Option<i32>,
}

/// A whole child: clone flags, the container set-up (init only), the process.
pub struct Plan {
    pub clone_flags: libc::c_int,
    /// Namespaces to join by path: (path, CLONE_NEW*).
    pub join: Vec<(PathBuf, libc::c_int)>,
    pub init: Option<InitPlan>,
    pub proc: ProcPlan,
}

const RLIMITS: &[(&str, libc::c_int)] = &[
    ("RLIMIT_CPU", libc::RLIMIT_CPU as libc::c_int),
    ("RLIMIT_FSIZE", libc::RLIMIT_FSIZE as libc::c_int),
    ("RLIMIT_DATA", libc::RLIMIT_DATA as libc::c_int),
    ("RLIMIT_STACK", libc::RLIMIT_STACK as libc::c_int),
    ("RLIMIT_CORE", libc::RLIMIT_CORE as libc::c_int),
    ("RLIMIT_RSS", libc::RLIMIT_RSS as libc::c_int),
    ("RLIMIT_NPROC", libc::RLIMIT_NPROC as libc::c_int),
    ("RLIMIT_NOFILE", libc::RLIMIT_NOFILE as libc::c_int),
    ("RLIMIT_MEMLOCK", libc::RLIMIT_MEMLOCK as libc::c_int),
    ("RLIMIT_AS", libc::RLIMIT_AS as libc::c_int),
    ("RLIMIT_LOCKS", libc::RLIMIT_LOCKS as libc::c_int),
    ("RLIMIT_SIGPENDING", libc::RLIMIT_SIGPENDING as libc::c_int),
    ("RLIMIT_MSGQUEUE", libc::RLIMIT_MSGQUEUE as libc::c_int),
    ("RLIMIT_NICE", libc::RLIMIT_NICE as libc::c_int),
    ("RLIMIT_RTPRIO", libc::RLIMIT_RTPRIO as libc::c_int),
    ("RLIMIT_RTTIME", libc::RLIMIT_RTTIME as libc::c_int),
];

/// (flag, set?) for each mount option that is a flag.
fn mount_flag(opt: &str) -> Option<(libc::c_ulong, bool)> {
    Some(match opt {
        "ro" => (libc::MS_RDONLY, true),
        "rw" => (libc::MS_RDONLY, false),
        "nosuid" => (libc::MS_NOSUID, true),
        "suid" => (libc::MS_NOSUID, false),
        "nodev" => (libc::MS_NODEV, true),
        "dev" => (libc::MS_NODEV, false),
        "noexec" => (libc::MS_NOEXEC, true),
        "exec" => (libc::MS_NOEXEC, false),
        "sync" => (libc::MS_SYNCHRONOUS, true),
        "async" => (libc::MS_SYNCHRONOUS, false),
        "dirsync" => (libc::MS_DIRSYNC, true),
        "remount" => (libc::MS_REMOUNT, true),
        "mand" => (libc::MS_MANDLOCK, true),
        "nomand" => (libc::MS_MANDLOCK, false),
        "noatime" => (libc::MS_NOATIME, true),
        "atime" => (libc::MS_NOATIME, false),
        "nodiratime" => (libc::MS_NODIRATIME, true),
        "diratime" => (libc::MS_NODIRATIME, false),
        "relatime" => (libc::MS_RELATIME, true),
        "norelatime" => (libc::MS_RELATIME, false),
        "strictatime" => (libc::MS_STRICTATIME, true),
        "nostrictatime" => (libc::MS_STRICTATIME, false),
        "bind" => (libc::MS_BIND, true),
        "rbind" => (libc::MS_BIND | libc::MS_REC, true),
        _ => return None,
    })
}

fn propagation(opt: &str) -> Option<libc::c_ulong> {
    Some(match opt {
        "private" => libc::MS_PRIVATE,
        "rprivate" => libc::MS_PRIVATE | libc::MS_REC,
        "shared" => libc::MS_SHARED,
        "rshared" => libc::MS_SHARED | libc::MS_REC,
        "slave" => libc::MS_SLAVE,
        "rslave" => libc::MS_SLAVE | libc::MS_REC,
        "unbindable" => libc::MS_UNBINDABLE,
        "runbindable" => libc::MS_UNBINDABLE | libc::MS_REC,
        _ => return None,
    })
}

fn mount_op(root: &Path, m: &oci_spec::runtime::Mount) -> Result<MountOp, AgentError> {
    let dest = m.destination();
    let target = under(root, dest)?;
    let mut fstype = m.typ().clone().unwrap_or_default();
    let mut flags = 0;
    let mut prop = 0;
    let mut data = Vec::new();
    for opt in m.options().iter().flatten() {
        if let Some((f, set)) = mount_flag(opt) {
            if set {
                flags |= f;
            } else {
                flags &= !f;
            }
        } else if let Some(p) = propagation(opt) {
            prop = p;
        } else {
            data.push(opt.as_str());
        }
    }
    if fstype == "bind" {
        flags |= libc::MS_BIND;
    }
    let bind = flags & libc::MS_BIND != 0;
    if fstype == "cgroup" {
        // cgroup v1 hierarchies do not exist in the guest.
        fstype = "cgroup2".into();
    }
    if !bind && fstype.is_empty() {
        return Err(invalid(format!("mount on {} has no type", dest.display())));
    }
    let source = m.source().clone().unwrap_or_else(|| PathBuf::from(&fstype));
    let file = bind && source.metadata().map(|md| !md.is_dir()).unwrap_or(false);
    let dir = if file {
        target.parent().unwrap_or(root).to_path_buf()
    } else {
        target.clone()
    };
    Ok(MountOp {
        destination: dest.display().to_string(),
        source: path_c(&source)?,
        target: path_c(&target)?,
        fstype: cstring(if bind { "" } else { fstype.as_str() })?,
        flags,
        data: cstring(data.join(","))?,
        bind,
        propagation: prop,
        mkdirs: dirs_to(root, &dir)?,
        file,
    })
}

/// uid, gid and extra groups of `name` from the rootfs's /etc/passwd and
/// /etc/group.
fn lookup_user(rootfs: &Path, name: &str) -> Result<(u32, u32, Vec<u32>), AgentError> {
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap_or_default();
    let (uid, gid) = passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            match f.as_slice() {
                [n, _, uid, gid, ..] if *n == name => Some((uid.parse().ok()?, gid.parse().ok()?)),
                _ => None,
            }
        })
        .ok_or_else(|| {
            invalid(format!(
                "unknown user {name:?}: not in the container's /etc/passwd"
            ))
        })?;
    let group = std::fs::read_to_string(rootfs.join("etc/group")).unwrap_or_default();
    let groups = group
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            match f.as_slice() {
                [_, _, gid, members] if members.split(',').any(|m| m == name) => gid.parse().ok(),
                _ => None,
            }
        })
        .collect();
    Ok((uid, gid, groups))
}

/// The process part of a plan. `rootfs` is where the container's files are
/// seen from the agent (for user names).
pub fn proc_plan(
    p: &Process,
    rootfs: &Path,
    seccomp: Option<Vec<libc::sock_filter>>,
) -> Result<ProcPlan, AgentError> {
    let args = p.args().clone().unwrap_or_default();
    let Some(arg0) = args.first() else {
        return Err(invalid("process.args is empty"));
    };
    if args.len() > 1023 {
        return Err(invalid("more than 1023 arguments"));
    }
    let argv = args
        .iter()
        .map(|a| cstring(a.as_str()))
        .collect::<Result<Vec<_>, _>>()?;
    let env_list = p.env().clone().unwrap_or_default();
    if env_list.len() > 4095 {
        return Err(invalid("more than 4095 environment variables"));
    }
    let env = env_list
        .iter()
        .map(|e| cstring(e.as_str()))
        .collect::<Result<Vec<_>, _>>()?;
    let path_var = env_list
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    let candidates = if arg0.contains('/') {
        vec![cstring(arg0.as_str())?]
    } else {
        path_var
            .split(':')
            .filter(|d| !d.is_empty())
            .map(|d| cstring(format!("{d}/{arg0}")))
            .collect::<Result<Vec<_>, _>>()?
    };
    let cwd = p.cwd();
    if !cwd.is_absolute() {
        return Err(invalid(format!("cwd {} is not absolute", cwd.display())));
    }
    let user = p.user();
    let (mut uid, mut gid) = (user.uid(), user.gid());
    let mut groups: Vec<u32> = user.additional_gids().clone().unwrap_or_default();
    if let Some(name) = user.username().as_deref().filter(|n| !n.is_empty()) {
        let (u, g, extra) = lookup_user(rootfs, name)?;
        (uid, gid) = (u, g);
        groups.extend(extra);
    }
    let caps = match p.capabilities() {
        Some(c) => Some(
            Caps::from_spec(c)
                .map_err(|e| crate::error::reply_from(ErrorCode::InvalidArgument, &e))?,
        ),
        None => None,
    };
    let mut rlimits = Vec::new();
    for r in p.rlimits().iter().flatten() {
        let name = serde_json::to_value(r.typ())
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let res = RLIMITS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|&(_, r)| r)
            .ok_or_else(|| invalid(format!("unknown rlimit {name}")))?;
        if r.soft() > r.hard() {
            return Err(invalid(format!("{name}: soft limit above the hard limit")));
        }
        rlimits.push((
            name,
            res,
            libc::rlimit {
                rlim_cur: r.soft(),
                rlim_max: r.hard(),
            },
        ));
    }
    Ok(ProcPlan {
        argv,
        env,
        candidates,
        cwd: path_c(cwd)?,
        uid,
        gid,
        groups,
        umask: user.umask(),
        caps,
        no_new_privs: p.no_new_privileges().unwrap_or(false),
        rlimits,
        terminal: p.terminal().unwrap_or(false),
        seccomp,
        oom_score_adj: match p.oom_score_adj() {
            Some(v) if !(-1000..=1000).contains(&v) => {
                return Err(invalid(format!("oomScoreAdj {v} is outside -1000..=1000")))
            }
            v => v,
        },
    })
}

/// The seccomp program of `spec`, if it has a profile.
pub fn seccomp_of(spec: &Spec) -> Result<Option<Vec<libc::sock_filter>>, AgentError> {
    match spec.linux().as_ref().and_then(|l| l.seccomp().as_ref()) {
        None => Ok(None),
        Some(s) => super::seccomp::compile(s)
            .map(Some)
            .map_err(|e| crate::error::reply_from(ErrorCode::Unsupported, &e)),
    }
}

fn ns_flag(t: LinuxNamespaceType) -> libc::c_int {
    match t {
        LinuxNamespaceType::Mount => libc::CLONE_NEWNS,
        LinuxNamespaceType::Cgroup => libc::CLONE_NEWCGROUP,
        LinuxNamespaceType::Uts => libc::CLONE_NEWUTS,
        LinuxNamespaceType::Ipc => libc::CLONE_NEWIPC,
        LinuxNamespaceType::User => libc::CLONE_NEWUSER,
        LinuxNamespaceType::Pid => libc::CLONE_NEWPID,
        LinuxNamespaceType::Network => libc::CLONE_NEWNET,
        LinuxNamespaceType::Time => 0x80, // CLONE_NEWTIME
    }
}

/// The container's device nodes beyond the standard ones (see
/// [`devices`]): the guest's for a privileged container, else the spec's,
/// each of which must exist in the guest.
fn spec_devices(
    spec: &Spec,
    linux: &oci_spec::runtime::Linux,
    rootfs: &Path,
    kernel: &KernelDevices,
) -> Result<Vec<DeviceOp>, AgentError> {
    let op = |path: &Path,
              mode: libc::mode_t,
              (major, minor): (u32, u32),
              owner: (u32, u32),
              guest_node: &Path|
     -> Result<DeviceOp, AgentError> {
        let target = under(rootfs, path)?;
        let parent = target.parent().unwrap_or(rootfs);
        Ok(DeviceOp {
            path: path.display().to_string(),
            mkdirs: dirs_to(rootfs, parent)?,
            target: path_c(&target)?,
            mode,
            dev: libc::makedev(major, minor),
            uid: owner.0,
            gid: owner.1,
            host: path_c(guest_node)?,
        })
    };
    let mut out = Vec::new();
    if devices::all_devices_allowed(spec) {
        let mut missing = Vec::new();
        for d in linux.devices().iter().flatten() {
            let kind = if d.typ().as_str() == "b" {
                Kind::Block
            } else {
                Kind::Char
            };
            let num = (kind, d.major() as u32, d.minor() as u32);
            if d.major() < 0 || d.minor() < 0 || kernel.get(num).is_none() {
                missing.push(d.path().display().to_string());
            }
        }
        if !missing.is_empty() {
            crate::log::info(&format!(
                "privileged container: {} host devices the guest does not have are left out ({})",
                missing.len(),
                missing.join(" ")
            ));
        }
        for (path, (kind, major, minor)) in devices::privileged_set(kernel) {
            // The guest node's own permissions (devtmpfs sets them).
            let perms = std::fs::metadata(&path)
                .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o7777)
                .unwrap_or(0o660);
            let mode = match kind {
                Kind::Char => libc::S_IFCHR,
                Kind::Block => libc::S_IFBLK,
            } | perms;
            out.push(op(&path, mode, (major, minor), (0, 0), &path)?);
        }
        return Ok(out);
    }
    for d in linux.devices().iter().flatten() {
        let (kind, mode) = match d.typ().as_str() {
            "c" | "u" => (Some(Kind::Char), libc::S_IFCHR),
            "b" => (Some(Kind::Block), libc::S_IFBLK),
            "p" => (None, libc::S_IFIFO),
            t => return Err(invalid(format!("device type {t:?}"))),
        };
        let major = u32::try_from(d.major()).map_err(|_| invalid("negative device major"))?;
        let minor = u32::try_from(d.minor()).map_err(|_| invalid("negative device minor"))?;
        // A FIFO is made, not found; a device must be the guest kernel's.
        let guest_node = match kind {
            None => d.path().to_path_buf(),
            Some(k) => kernel
                .get((k, major, minor))
                .map(Path::to_path_buf)
                .ok_or_else(|| {
                    AgentError::new(
                        ErrorCode::InvalidArgument,
                        format!(
                            "device {} ({} {major}:{minor}) does not exist in the pod's VM",
                            d.path().display(),
                            d.typ().as_str()
                        ),
                    )
                })?,
        };
        out.push(op(
            d.path(),
            mode | (d.file_mode().unwrap_or(0o666) & 0o7777),
            (major, minor),
            (d.uid().unwrap_or(0), d.gid().unwrap_or(0)),
            &guest_node,
        )?);
    }
    Ok(out)
}

const STANDARD_DEVICES: &[(&str, u32, u32)] = &[
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// The plan for container `spec`'s init process, with its root at `rootfs`;
/// `kernel` is the guest's device table (see [`devices`]).
pub fn init_plan(spec: &Spec, rootfs: &Path, kernel: &KernelDevices) -> Result<Plan, AgentError> {
    let Some(process) = spec.process() else {
        return Err(invalid("the spec has no process"));
    };
    let linux = spec.linux().clone().unwrap_or_default();
    // A mount namespace always: pivot_root must not change the agent's.
    let mut clone_flags = libc::CLONE_NEWNS;
    let mut join = Vec::new();
    let mut unshare_cgroupns = false;
    for ns in linux.namespaces().iter().flatten() {
        if ns.typ() == LinuxNamespaceType::Time {
            // CLONE_NEWTIME shares clone's exit-signal bits; a time
            // namespace would need another process level.
            return Err(AgentError::new(
                ErrorCode::Unsupported,
                "time namespaces are not supported",
            ));
        }
        let flag = ns_flag(ns.typ());
        match ns.path() {
            Some(p) => {
                if matches!(
                    ns.typ(),
                    LinuxNamespaceType::Mount | LinuxNamespaceType::User
                ) {
                    return Err(AgentError::new(
                        ErrorCode::Unsupported,
                        format!(
                            "joining a {:?} namespace by path is not supported",
                            ns.typ()
                        ),
                    ));
                }
                join.push((p.clone(), flag));
            }
            // After the move into the container's cgroup, so that becomes
            // the namespace's root.
            None if flag == libc::CLONE_NEWCGROUP => unshare_cgroupns = true,
            None => clone_flags |= flag,
        }
    }
    let mut mounts = Vec::new();
    for m in spec.mounts().iter().flatten() {
        mounts.push(mount_op(rootfs, m)?);
    }
    let dev_mounted = spec
        .mounts()
        .iter()
        .flatten()
        .any(|m| m.destination() == Path::new("/dev"));
    let dev = rootfs.join("dev");
    let mut devices = Vec::new();
    if dev_mounted {
        for &(name, major, minor) in STANDARD_DEVICES {
            devices.push(DeviceOp {
                path: format!("/dev/{name}"),
                target: path_c(&dev.join(name))?,
                mkdirs: Vec::new(),
                mode: libc::S_IFCHR | 0o666,
                dev: libc::makedev(major, minor),
                uid: 0,
                gid: 0,
                host: path_c(&Path::new("/dev").join(name))?,
            });
        }
    }
    devices.extend(spec_devices(spec, &linux, rootfs, kernel)?);
    let mut dev_links = Vec::new();
    if dev_mounted {
        for (link, to) in [
            ("fd", "/proc/self/fd"),
            ("stdin", "/proc/self/fd/0"),
            ("stdout", "/proc/self/fd/1"),
            ("stderr", "/proc/self/fd/2"),
            ("ptmx", "pts/ptmx"),
            ("core", "/proc/kcore"),
        ] {
            dev_links.push((cstring(to)?, path_c(&dev.join(link))?));
        }
    }
    let mut sysctls = Vec::new();
    for (k, v) in linux.sysctl().iter().flatten() {
        if k.is_empty()
            || !k
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            || k.contains("..")
        {
            return Err(invalid(format!("invalid sysctl name {k:?}")));
        }
        let path = format!("/proc/sys/{}", k.replace('.', "/"));
        sysctls.push((k.clone(), cstring(path)?, cstring(v.as_str())?));
    }
    let abs = |p: &String| -> Result<CString, AgentError> {
        if !p.starts_with('/') || p.split('/').any(|c| c == "..") {
            return Err(invalid(format!("path {p:?} is not absolute and clean")));
        }
        cstring(p.as_str())
    };
    let masked = linux
        .masked_paths()
        .iter()
        .flatten()
        .map(abs)
        .collect::<Result<_, _>>()?;
    let readonly = linux
        .readonly_paths()
        .iter()
        .flatten()
        .map(abs)
        .collect::<Result<_, _>>()?;
    let root_propagation = match linux.rootfs_propagation() {
        None => libc::MS_PRIVATE | libc::MS_REC,
        Some(p) => propagation(p)
            .map(|f| f | libc::MS_REC)
            .ok_or_else(|| invalid(format!("rootfsPropagation {p:?}")))?,
    };
    let own_uts = clone_flags & libc::CLONE_NEWUTS != 0;
    let hostname = match spec.hostname() {
        Some(h) if !h.is_empty() => {
            if !own_uts || h.len() > 64 {
                return Err(invalid(
                    "a hostname needs a UTS namespace and at most 64 bytes",
                ));
            }
            Some(cstring(h.as_str())?)
        }
        _ => None,
    };
    let domainname = match spec.domainname() {
        Some(h) if !h.is_empty() && own_uts => Some(cstring(h.as_str())?),
        _ => None,
    };
    let init = InitPlan {
        rootfs: path_c(rootfs)?,
        root_propagation,
        mounts,
        devices,
        dev_links,
        console: if dev_mounted {
            Some(path_c(&dev.join("console"))?)
        } else {
            None
        },
        readonly_root: spec
            .root()
            .as_ref()
            .and_then(|r| r.readonly())
            .unwrap_or(false),
        sysctls,
        masked,
        readonly,
        hostname,
        domainname,
        unshare_cgroupns,
    };
    Ok(Plan {
        clone_flags,
        join,
        init: Some(init),
        proc: proc_plan(process, rootfs, seccomp_of(spec)?)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device_spec(devices: serde_json::Value, rules: serde_json::Value) -> Spec {
        serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "linux": {"devices": devices, "resources": {"devices": rules}}
        }))
        .unwrap()
    }

    fn guest_kernel() -> KernelDevices {
        KernelDevices::from_entries(&[
            ((Kind::Char, 1, 3), "/dev/null"),
            ((Kind::Char, 10, 200), "/dev/net/tun"),
            ((Kind::Char, 10, 229), "/dev/fuse"),
            ((Kind::Block, 254, 0), "/dev/vda"),
        ])
    }

    fn paths(ops: &[DeviceOp]) -> Vec<&str> {
        ops.iter().map(|d| d.path.as_str()).collect()
    }

    #[test]
    fn a_privileged_container_gets_the_guests_devices_not_the_hosts() {
        // containerd's privileged spec: the node's devices, all allowed.
        let spec = device_spec(
            serde_json::json!([
                {"path": "/dev/kvm", "type": "c", "major": 10, "minor": 232},
                {"path": "/dev/net/tun", "type": "c", "major": 10, "minor": 200},
                {"path": "/dev/sda", "type": "b", "major": 8, "minor": 0}
            ]),
            serde_json::json!([{"allow": true, "access": "rwm"}]),
        );
        let linux = spec.linux().clone().unwrap();
        let ops = spec_devices(&spec, &linux, Path::new("/r"), &guest_kernel()).unwrap();
        assert_eq!(
            paths(&ops),
            ["/dev/null", "/dev/net/tun", "/dev/fuse", "/dev/vda"]
        );
        let tun = &ops[1];
        assert_eq!(tun.target.to_str().unwrap(), "/r/dev/net/tun");
        let dirs: Vec<&str> = tun.mkdirs.iter().map(|d| d.to_str().unwrap()).collect();
        assert_eq!(dirs, ["/r/dev", "/r/dev/net"]);
        assert_eq!(tun.dev, libc::makedev(10, 200));
        assert_eq!(ops[3].mode & libc::S_IFMT, libc::S_IFBLK);
    }

    #[test]
    fn a_listed_device_must_exist_in_the_guest() {
        let rules = serde_json::json!([{"allow": false, "access": "rwm"}]);
        let fuse = device_spec(
            serde_json::json!([{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229,
                                "fileMode": 438, "uid": 0, "gid": 0}]),
            rules.clone(),
        );
        let linux = fuse.linux().clone().unwrap();
        let ops = spec_devices(&fuse, &linux, Path::new("/r"), &guest_kernel()).unwrap();
        assert_eq!(paths(&ops), ["/dev/fuse"]);
        assert_eq!(ops[0].mode, libc::S_IFCHR | 0o666);
        let kvm = device_spec(
            serde_json::json!([{"path": "/dev/kvm", "type": "c", "major": 10, "minor": 232}]),
            rules,
        );
        let linux = kvm.linux().clone().unwrap();
        let e = spec_devices(&kvm, &linux, Path::new("/r"), &guest_kernel())
            .err()
            .expect("a device the guest lacks is refused");
        assert_eq!(e.code, ErrorCode::InvalidArgument);
        assert!(e.message.contains("/dev/kvm (c 10:232)"), "{}", e.message);
    }

    #[test]
    fn mounts_parse_flags_data_and_propagation() {
        let m: oci_spec::runtime::Mount = serde_json::from_value(serde_json::json!({
            "destination": "/dev/shm", "type": "tmpfs", "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k", "rslave"]
        }))
        .unwrap();
        let op = mount_op(Path::new("/r"), &m).unwrap();
        assert_eq!(op.flags, libc::MS_NOSUID | libc::MS_NOEXEC | libc::MS_NODEV);
        assert_eq!(op.data.to_str().unwrap(), "mode=1777,size=65536k");
        assert_eq!(op.propagation, libc::MS_SLAVE | libc::MS_REC);
        assert_eq!(op.target.to_str().unwrap(), "/r/dev/shm");
        assert_eq!(op.mkdirs.len(), 2);
        let escape: oci_spec::runtime::Mount = serde_json::from_value(serde_json::json!({
            "destination": "/../etc", "type": "tmpfs"
        }))
        .unwrap();
        assert!(mount_op(Path::new("/r"), &escape).is_err());
    }

    #[test]
    fn users_come_from_the_rootfs() {
        let dir = std::env::temp_dir().join(format!("husk-plan-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("etc")).unwrap();
        std::fs::write(
            dir.join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\nweb:x:33:34::/:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(dir.join("etc/group"), "www:x:34:\nextra:x:50:web,other\n").unwrap();
        assert_eq!(lookup_user(&dir, "web").unwrap(), (33, 34, vec![50]));
        assert_eq!(
            lookup_user(&dir, "nobody").unwrap_err().code,
            ErrorCode::InvalidArgument
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
