//! The command line and its validation. Everything that can be checked
//! without touching the system (the id, the uid/gid policy, cgroup names
//! and settings) is checked here, before the jailer does anything, so a bad
//! invocation changes nothing on the host.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

use crate::error::{Error, Result};

/// Which cgroup hierarchy to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CgroupVersion {
    /// v2 when /sys/fs/cgroup is the unified hierarchy, else v1.
    Auto,
    /// The v1 per-controller hierarchies.
    #[value(name = "1")]
    V1,
    /// The unified (v2) hierarchy.
    #[value(name = "2")]
    V2,
}

/// `husk-jailer`: starts husk confined to its own chroot, cgroup and mount
/// namespace, as an unprivileged uid/gid without capabilities.
#[derive(Parser, Debug)]
#[command(name = "husk-jailer", version, about)]
pub struct Cli {
    /// The microVM's id: 1 to 64 characters from [A-Za-z0-9-].
    #[arg(long)]
    pub id: Option<String>,
    /// The husk binary to run; copied (or hard-linked) into the jail.
    #[arg(long)]
    pub exec_file: PathBuf,
    /// The uid husk runs as.
    #[arg(long)]
    pub uid: u32,
    /// The gid husk runs as.
    #[arg(long)]
    pub gid: u32,
    /// The jail is <base>/<exec-file name>/<id>/root.
    #[arg(long, default_value = "/srv/jailer")]
    pub chroot_base_dir: PathBuf,
    /// The jail's root itself (root's, not writable by others), instead of
    /// `<chroot-base-dir>/<exec name>/<id>/root`: for a caller that keeps
    /// a VM's files in a directory of its own (the containerd shim).
    #[arg(long, conflicts_with = "chroot_base_dir")]
    pub chroot_dir: Option<PathBuf>,
    /// A host file or directory bound read-only at /NAME in the jail,
    /// SOURCE:NAME, in the jail's own mount namespace only (nothing is
    /// mounted on the host, nothing is left when husk exits); repeatable.
    #[arg(long = "bind-ro")]
    pub binds: Vec<String>,
    /// Make no cgroup: the caller places husk (e.g. into a pod's cgroup).
    #[arg(long)]
    pub no_cgroup: bool,
    /// cgroup hierarchy: 1, 2 or auto.
    #[arg(long, value_enum, default_value = "auto")]
    pub cgroup_version: CgroupVersion,
    /// The cgroup (relative to the hierarchy's root) under which <id> is made.
    #[arg(long, default_value = "husk")]
    pub parent_cgroup: String,
    /// A cgroup file to write, FILE=VALUE (e.g. memory.max=268435456); repeatable.
    #[arg(long = "cgroup")]
    pub cgroups: Vec<String>,
    /// Join this network namespace (e.g. /var/run/netns/NAME).
    #[arg(long)]
    pub netns: Option<PathBuf>,
    /// Run husk as pid 1 of a new pid namespace.
    #[arg(long)]
    pub new_pid_ns: bool,
    /// A file descriptor (>= 3) husk inherits; all others >= 3 are closed.
    #[arg(long = "keep-fd")]
    pub keep_fds: Vec<i32>,
    /// Allow --uid 0 / --gid 0 (capabilities are dropped all the same).
    #[arg(long)]
    pub allow_root: bool,
    /// husk's arguments (after `--`).
    #[arg(last = true)]
    pub husk_args: Vec<String>,
}

/// One cgroup file to write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupSetting {
    /// The controller (the file name before its first '.').
    pub controller: String,
    /// The file name, e.g. memory.max.
    pub file: String,
    /// What to write into it.
    pub value: String,
}

/// A host path bound read-only at `/<name>` in the jail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BindRo {
    /// What is bound (absolute).
    pub source: PathBuf,
    /// Its name in the jail's root.
    pub name: String,
}

/// Parses SOURCE:NAME: an absolute source, and a single plain file name
/// (so the mount point can only be a new entry of the jail's root).
pub fn parse_bind(bind: &str) -> Result<BindRo> {
    let bad = || Error::InvalidBind(bind.to_string());
    let (source, name) = bind.rsplit_once(':').ok_or_else(bad)?;
    let ok_name = !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if !ok_name || !source.starts_with('/') {
        return Err(bad());
    }
    Ok(BindRo {
        source: PathBuf::from(source),
        name: name.to_string(),
    })
}

/// A validated invocation.
#[derive(Debug)]
pub struct Config {
    /// The microVM's id.
    pub id: String,
    /// The husk binary on the host.
    pub exec_file: PathBuf,
    /// The file name of `exec_file` (also its name inside the jail).
    pub exec_name: String,
    /// Target uid.
    pub uid: u32,
    /// Target gid.
    pub gid: u32,
    /// Base of all jails.
    pub chroot_base_dir: PathBuf,
    /// The jail's root, when given exactly.
    pub chroot_dir: Option<PathBuf>,
    /// Read-only binds into the jail.
    pub binds: Vec<BindRo>,
    /// Whether to make and join a cgroup.
    pub cgroup: bool,
    /// Hierarchy choice.
    pub cgroup_version: CgroupVersion,
    /// Parent cgroup, as validated path components.
    pub parent_cgroup: Vec<String>,
    /// Files to write in the VM's cgroup.
    pub cgroups: Vec<CgroupSetting>,
    /// Network namespace to join.
    pub netns: Option<PathBuf>,
    /// New pid namespace.
    pub new_pid_ns: bool,
    /// Descriptors to keep open.
    pub keep_fds: Vec<i32>,
    /// husk's arguments.
    pub husk_args: Vec<String>,
}

/// Checks an id: [A-Za-z0-9-]{1,64}.
pub fn validate_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidId(id.to_string()))
    }
}

/// Splits and checks a parent cgroup path.
pub fn validate_parent_cgroup(parent: &str) -> Result<Vec<String>> {
    let bad = || Error::InvalidParentCgroup(parent.to_string());
    if parent.is_empty() || parent.starts_with('/') {
        return Err(bad());
    }
    parent
        .split('/')
        .map(|c| {
            let ok = !c.is_empty()
                && c != "."
                && c != ".."
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
            if ok {
                Ok(c.to_string())
            } else {
                Err(bad())
            }
        })
        .collect()
}

/// Parses FILE=VALUE and checks that FILE is a controller's own file: a
/// single name `controller.attribute`, no path separators or `..`, not one
/// of the files that move processes or run programs (`cgroup.*`, `tasks`,
/// `release_agent`, `notify_on_release`).
pub fn parse_cgroup_setting(setting: &str) -> Result<CgroupSetting> {
    let bad = |why| Error::InvalidCgroupSetting {
        setting: setting.to_string(),
        why,
    };
    let (file, value) = setting
        .split_once('=')
        .ok_or_else(|| bad("expected FILE=VALUE"))?;
    if file.contains('/') || file.contains("..") {
        return Err(bad("the file name must not contain '/' or '..'"));
    }
    if !file
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.')
    {
        return Err(bad("the file name has characters outside [a-z0-9_.]"));
    }
    let (controller, attribute) = file
        .split_once('.')
        .ok_or_else(|| bad("the file name must be CONTROLLER.ATTRIBUTE"))?;
    if controller.is_empty() || attribute.is_empty() {
        return Err(bad("the file name must be CONTROLLER.ATTRIBUTE"));
    }
    if controller == "cgroup" || file.contains("release_agent") || file == "notify_on_release" {
        return Err(bad(
            "only controller files may be written, not cgroup.* or release agents",
        ));
    }
    if value.is_empty() || value.contains('\n') {
        return Err(bad("the value must be one non-empty line"));
    }
    Ok(CgroupSetting {
        controller: controller.to_string(),
        file: file.to_string(),
        value: value.to_string(),
    })
}

impl Cli {
    /// Checks everything that needs no system access.
    pub fn validate(self) -> Result<Config> {
        let id = self.id.ok_or(Error::MissingId)?;
        validate_id(&id)?;
        if !self.allow_root {
            if self.uid == 0 {
                return Err(Error::RootUid { what: "uid" });
            }
            if self.gid == 0 {
                return Err(Error::RootUid { what: "gid" });
            }
        }
        let exec_name = self
            .exec_file
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| *n != "." && *n != "..")
            .map(str::to_string)
            .ok_or_else(|| Error::InvalidExecFile(self.exec_file.clone()))?;
        let parent_cgroup = validate_parent_cgroup(&self.parent_cgroup)?;
        let cgroups = self
            .cgroups
            .iter()
            .map(|s| parse_cgroup_setting(s))
            .collect::<Result<Vec<_>>>()?;
        if let Some(&fd) = self.keep_fds.iter().find(|&&fd| fd < 3) {
            return Err(Error::BadKeepFd(fd));
        }
        if self.no_cgroup && !cgroups.is_empty() {
            return Err(Error::Conflict(
                "--no-cgroup makes no cgroup, so it takes no --cgroup settings",
            ));
        }
        let binds = self
            .binds
            .iter()
            .map(|b| parse_bind(b))
            .collect::<Result<Vec<_>>>()?;
        Ok(Config {
            id,
            exec_file: self.exec_file,
            exec_name,
            uid: self.uid,
            gid: self.gid,
            chroot_base_dir: self.chroot_base_dir,
            chroot_dir: self.chroot_dir,
            binds,
            cgroup: !self.no_cgroup,
            cgroup_version: self.cgroup_version,
            parent_cgroup,
            cgroups,
            netns: self.netns,
            new_pid_ns: self.new_pid_ns,
            keep_fds: self.keep_fds,
            husk_args: self.husk_args,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(extra: &[&str]) -> Cli {
        let mut argv = vec!["husk-jailer", "--exec-file", "/usr/bin/husk"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).expect("parses")
    }

    #[test]
    fn ids() {
        for ok in ["vm1", "a", "A-b-9", &"x".repeat(64)] {
            validate_id(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "",
            "../x",
            "..",
            ".",
            "a/b",
            "a_b",
            "a.b",
            "é",
            " x",
            &"x".repeat(65),
        ] {
            assert!(
                matches!(validate_id(bad), Err(Error::InvalidId(_))),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn binds_name_one_entry_of_the_jail_root() {
        let b = parse_bind("/usr/share/husk/vmlinux:vmlinux").unwrap();
        assert_eq!(b.source, PathBuf::from("/usr/share/husk/vmlinux"));
        assert_eq!(b.name, "vmlinux");
        // A source may hold a colon; the name is after the last one.
        assert_eq!(parse_bind("/a:b:c").unwrap().name, "c");
        for bad in [
            "vmlinux",
            "relative:vmlinux",
            "/x:",
            "/x:..",
            "/x:.",
            "/x:a/b",
            "/x:/etc",
            "/x:a b",
        ] {
            assert!(
                matches!(parse_bind(bad), Err(Error::InvalidBind(_))),
                "{bad:?} accepted"
            );
        }
        let valid =
            |extra: &[&str]| cli(&[&["--id", "a", "--uid", "1", "--gid", "1"], extra].concat());
        let cfg = valid(&["--bind-ro", "/k:vmlinux", "--no-cgroup"])
            .validate()
            .unwrap();
        assert_eq!(cfg.binds.len(), 1);
        assert!(!cfg.cgroup);
        let e = valid(&["--no-cgroup", "--cgroup", "memory.max=1"])
            .validate()
            .unwrap_err();
        assert!(matches!(e, Error::Conflict(_)), "{e}");
    }

    #[test]
    fn missing_id_is_refused() {
        let e = cli(&["--uid", "1000", "--gid", "1000"])
            .validate()
            .unwrap_err();
        assert!(matches!(e, Error::MissingId), "{e}");
    }

    #[test]
    fn root_needs_allow_root() {
        let e = cli(&["--id", "a", "--uid", "0", "--gid", "1"])
            .validate()
            .unwrap_err();
        assert!(matches!(e, Error::RootUid { what: "uid" }), "{e}");
        let e = cli(&["--id", "a", "--uid", "1", "--gid", "0"])
            .validate()
            .unwrap_err();
        assert!(matches!(e, Error::RootUid { what: "gid" }), "{e}");
        let c = cli(&["--id", "a", "--uid", "0", "--gid", "0", "--allow-root"])
            .validate()
            .expect("allowed");
        assert_eq!((c.uid, c.gid), (0, 0));
    }

    #[test]
    fn a_full_invocation() {
        let c = cli(&[
            "--id",
            "vm-1",
            "--uid",
            "1000",
            "--gid",
            "1001",
            "--cgroup",
            "memory.max=268435456",
            "--cgroup",
            "cpu.max=50000 100000",
            "--keep-fd",
            "5",
            "--parent-cgroup",
            "a/b",
            "--",
            "boot",
            "--kernel",
            "/vmlinux",
        ])
        .validate()
        .expect("valid");
        assert_eq!(c.exec_name, "husk");
        assert_eq!(c.parent_cgroup, ["a", "b"]);
        assert_eq!(c.cgroups[1].controller, "cpu");
        assert_eq!(c.cgroups[1].value, "50000 100000");
        assert_eq!(c.keep_fds, [5]);
        assert_eq!(c.husk_args, ["boot", "--kernel", "/vmlinux"]);
    }

    #[test]
    fn keep_fd_below_3_is_refused() {
        let e = cli(&["--id", "a", "--uid", "1", "--gid", "1", "--keep-fd", "2"])
            .validate()
            .unwrap_err();
        assert!(matches!(e, Error::BadKeepFd(2)), "{e}");
    }

    #[test]
    fn cgroup_settings() {
        let s = parse_cgroup_setting("memory.max=1G").expect("valid");
        assert_eq!(
            (s.controller.as_str(), s.file.as_str(), s.value.as_str()),
            ("memory", "memory.max", "1G")
        );
        parse_cgroup_setting("cpu.cfs_quota_us=50000").expect("v1 name");
        parse_cgroup_setting("memory.limit_in_bytes=1=2").expect("value may hold '='");
        for bad in [
            "memory.max",
            "../memory.max=1",
            "a/memory.max=1",
            "memory..max=1",
            "cgroup.procs=1",
            "cgroup.subtree_control=+memory",
            "release_agent=/x",
            "notify_on_release=1",
            "tasks=1",
            "memory.max=",
            "memory.max=1\n2",
            "Memory.max=1",
            ".max=1",
            "memory.=1",
        ] {
            assert!(
                matches!(
                    parse_cgroup_setting(bad),
                    Err(Error::InvalidCgroupSetting { .. })
                ),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn parent_cgroups() {
        assert_eq!(validate_parent_cgroup("husk").expect("ok"), ["husk"]);
        for bad in ["", "/husk", "a/../b", "..", "a//b", "a/", "a b"] {
            assert!(validate_parent_cgroup(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn exec_file_needs_a_name() {
        let c = Cli::try_parse_from([
            "husk-jailer",
            "--exec-file",
            "/",
            "--id",
            "a",
            "--uid",
            "1",
            "--gid",
            "1",
        ])
        .expect("parses");
        assert!(matches!(c.validate(), Err(Error::InvalidExecFile(_))));
    }
}
