//! The VM's cgroup: `<parent>/<id>` in the unified (v2) hierarchy, or in
//! each v1 hierarchy whose controller a setting names. The jailer writes
//! the settings, then moves itself in (cgroup.procs) while it is still
//! root, so husk and every thread it starts are born inside the limits.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::args::{CgroupSetting, CgroupVersion};
use crate::error::{Error, Result};

/// Where cgroup2 lives when it is the host's only hierarchy.
const UNIFIED_ROOT: &str = "/sys/fs/cgroup";

/// Decides the hierarchy: v2 when /sys/fs/cgroup is cgroup2 (it has
/// cgroup.controllers), else v1.
pub fn resolve_version(v: CgroupVersion) -> CgroupVersion {
    match v {
        CgroupVersion::Auto if Path::new(UNIFIED_ROOT).join("cgroup.controllers").exists() => {
            CgroupVersion::V2
        }
        CgroupVersion::Auto => CgroupVersion::V1,
        other => other,
    }
}

/// The mount points of cgroup file systems in a mountinfo text: (fstype,
/// mount point, super options).
fn cgroup_mounts(mountinfo: &str) -> Vec<(String, PathBuf, String)> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mount_point = pre.split(' ').nth(4)?;
            let mut post = post.split(' ');
            let fstype = post.next()?;
            let _source = post.next()?;
            let opts = post.next().unwrap_or("");
            (fstype == "cgroup" || fstype == "cgroup2").then(|| {
                (
                    fstype.to_string(),
                    PathBuf::from(mount_point.replace("\\040", " ")),
                    opts.to_string(),
                )
            })
        })
        .collect()
}

/// The v1 mount point of `controller`.
fn v1_mount(mountinfo: &str, controller: &str) -> Option<PathBuf> {
    cgroup_mounts(mountinfo)
        .into_iter()
        .find(|(t, _, opts)| t == "cgroup" && opts.split(',').any(|o| o == controller))
        .map(|(_, p, _)| p)
}

fn write(path: &Path, value: &str, step: &'static str) -> Result<()> {
    fs::write(path, value).map_err(Error::path(step, path))
}

fn mkdir(path: &Path) -> Result<()> {
    match fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(Error::Path {
            step: "create cgroup",
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

/// Creates the VM's cgroup(s), writes the settings and moves this process
/// in. Returns the cgroup directories it joined.
pub fn setup(
    version: CgroupVersion,
    parent: &[String],
    id: &str,
    settings: &[CgroupSetting],
) -> Result<Vec<PathBuf>> {
    match resolve_version(version) {
        CgroupVersion::V1 => setup_v1(parent, id, settings),
        _ => {
            // /sys/fs/cgroup itself, or where a hybrid host mounts cgroup2
            // (e.g. /sys/fs/cgroup/unified).
            let mountinfo = fs::read_to_string("/proc/self/mountinfo")
                .map_err(Error::path("read", "/proc/self/mountinfo"))?;
            let root = cgroup_mounts(&mountinfo)
                .into_iter()
                .filter(|(t, _, _)| t == "cgroup2")
                .min_by_key(|(_, p, _)| p != Path::new(UNIFIED_ROOT))
                .map(|(_, p, _)| p)
                .ok_or_else(|| Error::NoController {
                    controller: "cgroup2".into(),
                    why: "no cgroup2 file system is mounted".into(),
                })?;
            setup_v2(&root, parent, id, settings)
        }
    }
}

fn setup_v2(
    root: &Path,
    parent: &[String],
    id: &str,
    settings: &[CgroupSetting],
) -> Result<Vec<PathBuf>> {
    let mut controllers: Vec<&str> = settings.iter().map(|s| s.controller.as_str()).collect();
    controllers.sort_unstable();
    controllers.dedup();
    let available_path = root.join("cgroup.controllers");
    let available =
        fs::read_to_string(&available_path).map_err(Error::path("read", &available_path))?;
    if let Some(c) = controllers
        .iter()
        .find(|c| !available.split_whitespace().any(|a| a == **c))
    {
        return Err(Error::NoController {
            controller: c.to_string(),
            why: format!("not in {}: {}", available_path.display(), available.trim()),
        });
    }
    let enable: String = controllers
        .iter()
        .map(|c| format!("+{c}"))
        .collect::<Vec<_>>()
        .join(" ");
    // Enable the controllers from the root down to the parent: a cgroup's
    // files exist only when its parent's subtree_control has them.
    let mut dir = root.to_path_buf();
    for component in parent {
        if !enable.is_empty() {
            write(
                &dir.join("cgroup.subtree_control"),
                &enable,
                "enable controllers in",
            )?;
        }
        dir.push(component);
        mkdir(&dir)?;
    }
    if !enable.is_empty() {
        write(
            &dir.join("cgroup.subtree_control"),
            &enable,
            "enable controllers in",
        )?;
    }
    dir.push(id);
    mkdir(&dir)?;
    for s in settings {
        write(&dir.join(&s.file), &s.value, "write cgroup setting")?;
    }
    write(
        &dir.join("cgroup.procs"),
        &std::process::id().to_string(),
        "join cgroup",
    )?;
    Ok(vec![dir])
}

fn setup_v1(parent: &[String], id: &str, settings: &[CgroupSetting]) -> Result<Vec<PathBuf>> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .map_err(Error::path("read", "/proc/self/mountinfo"))?;
    let mut joined: Vec<PathBuf> = Vec::new();
    for s in settings {
        let mount = v1_mount(&mountinfo, &s.controller).ok_or_else(|| Error::NoController {
            controller: s.controller.clone(),
            why: "no cgroup v1 hierarchy has it mounted".into(),
        })?;
        let mut dir = mount.clone();
        for component in parent {
            dir.push(component);
            mkdir(&dir)?;
            if s.controller == "cpuset" {
                inherit_cpuset(&dir)?;
            }
        }
        dir.push(id);
        mkdir(&dir)?;
        if s.controller == "cpuset" {
            inherit_cpuset(&dir)?;
        }
        write(&dir.join(&s.file), &s.value, "write cgroup setting")?;
        if !joined.contains(&dir) {
            joined.push(dir);
        }
    }
    for dir in &joined {
        write(
            &dir.join("cgroup.procs"),
            &std::process::id().to_string(),
            "join cgroup",
        )?;
    }
    Ok(joined)
}

/// A new v1 cpuset starts with no CPUs and no memory nodes (no task may
/// join it): copy the parent's.
fn inherit_cpuset(dir: &Path) -> Result<()> {
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let own = dir.join(file);
        let current = fs::read_to_string(&own).map_err(Error::path("read", &own))?;
        if current.trim().is_empty() {
            let parent = dir.parent().unwrap_or(dir).join(file);
            let value = fs::read_to_string(&parent).map_err(Error::path("read", &parent))?;
            write(&own, value.trim(), "inherit cpuset")?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
24 29 0:22 / /sys rw,nosuid shared:7 - sysfs sysfs rw
30 24 0:26 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate
35 30 0:31 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:15 - cgroup cgroup rw,cpu,cpuacct
36 30 0:32 / /sys/fs/cgroup/memory rw,nosuid shared:16 - cgroup cgroup rw,memory
";

    #[test]
    fn v1_mounts_are_found_by_controller() {
        assert_eq!(
            v1_mount(MOUNTINFO, "cpu").as_deref(),
            Some(Path::new("/sys/fs/cgroup/cpu,cpuacct"))
        );
        assert_eq!(
            v1_mount(MOUNTINFO, "memory").as_deref(),
            Some(Path::new("/sys/fs/cgroup/memory"))
        );
        assert_eq!(v1_mount(MOUNTINFO, "pids"), None);
        assert_eq!(cgroup_mounts(MOUNTINFO).len(), 3);
    }

    #[test]
    fn explicit_versions_are_kept() {
        assert_eq!(resolve_version(CgroupVersion::V1), CgroupVersion::V1);
        assert_eq!(resolve_version(CgroupVersion::V2), CgroupVersion::V2);
    }
}
