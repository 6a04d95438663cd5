//! The pod's cgroup on the node: husk runs in it, so what the kubelet,
//! cadvisor and eviction read of the pod (its memory.current, its CPU
//! time) includes the guest's memory as the VM touches it and the VMM's
//! own overhead, as it includes a runc container's processes. The path is
//! the sandbox's `linux.cgroupsPath`, in either driver's form: cgroupfs
//! (`/kubepods/burstable/pod<uid>/<id>`) or systemd
//! (`kubepods-burstable-pod<uid>.slice:cri-containerd:<id>`, the slice
//! expanded as systemd nests it and the leaf a `<prefix>-<id>.scope`).
//! Only cgroup v2 is supported. Directories the shim made are removed when
//! the VM is gone; the kubelet's own are left alone.

use std::path::{Path, PathBuf};

/// Where the node's cgroup v2 hierarchy is mounted.
pub const ROOT: &str = "/sys/fs/cgroup";

/// The controllers turned on down to the pod's cgroup, where the node has
/// them: what the kubelet reads and limits.
const CONTROLLERS: &[&str] = &["cpu", "memory", "pids", "io"];

/// Why husk could not be put in the pod's cgroup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// The spec's cgroupsPath is not one either driver writes.
    #[error("the sandbox's cgroupsPath {0:?} is not a cgroup path")]
    InvalidPath(String),
    /// A directory or file of the hierarchy could not be made or written.
    #[error("cannot {what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The directory `cgroups_path` names, relative to the hierarchy's root.
pub fn resolve(cgroups_path: &str) -> Result<PathBuf, CgroupError> {
    let invalid = || CgroupError::InvalidPath(cgroups_path.to_string());
    let parts: Vec<&str> = cgroups_path.split(':').collect();
    if let [slice, prefix, name] = parts[..] {
        // The systemd driver's form.
        let plain = |s: &str| !s.contains('/') && s != "." && s != "..";
        if !plain(slice) || !plain(prefix) || name.is_empty() || !plain(name) {
            return Err(invalid());
        }
        let mut path = expand_slice(slice).ok_or_else(invalid)?;
        let leaf = if name.ends_with(".slice") {
            name.to_string()
        } else if prefix.is_empty() {
            format!("{name}.scope")
        } else {
            format!("{prefix}-{name}.scope")
        };
        path.push(leaf);
        return Ok(path);
    }
    // The cgroupfs driver's: an absolute path of plain components.
    let Some(rest) = cgroups_path.strip_prefix('/') else {
        return Err(invalid());
    };
    let mut out = PathBuf::new();
    for part in rest.split('/').filter(|p| !p.is_empty()) {
        if part == "." || part == ".." {
            return Err(invalid());
        }
        out.push(part);
    }
    if out.as_os_str().is_empty() {
        return Err(invalid());
    }
    Ok(out)
}

/// A systemd slice's directory: `a-b-c.slice` nests in `a-b.slice` in
/// `a.slice`; `-.slice` (or none) is the root.
fn expand_slice(slice: &str) -> Option<PathBuf> {
    if slice.is_empty() || slice == "-.slice" {
        return Some(PathBuf::new());
    }
    let stem = slice.strip_suffix(".slice")?;
    if stem.is_empty() || stem.starts_with('-') || stem.ends_with('-') || stem.contains("--") {
        return None;
    }
    let mut path = PathBuf::new();
    let mut prefix = String::new();
    for part in stem.split('-') {
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(part);
        path.push(format!("{prefix}.slice"));
    }
    Some(path)
}

/// Whether `root` is a cgroup v2 hierarchy.
pub fn is_v2(root: &Path) -> bool {
    root.join("cgroup.controllers").is_file()
}

/// The pod's cgroup, made (with whatever of its parents was missing).
#[derive(Debug)]
pub struct PodCgroup {
    /// Its directory.
    path: PathBuf,
    /// The directories the shim made, outermost first.
    made: Vec<PathBuf>,
}

impl PodCgroup {
    /// Makes `relative` under `root`, turning the controllers the node has
    /// on in each parent on the way so that the pod's cgroup accounts
    /// memory and CPU.
    pub fn create(root: &Path, relative: &Path) -> Result<PodCgroup, CgroupError> {
        let io = |what: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| CgroupError::Io { what, path, source }
        };
        let mut made = Vec::new();
        let mut dir = root.to_path_buf();
        let undo = |made: &[PathBuf]| {
            for d in made.iter().rev() {
                let _ = std::fs::remove_dir(d);
            }
        };
        for part in relative.components() {
            enable_controllers(&dir);
            dir.push(part);
            match std::fs::create_dir(&dir) {
                Ok(()) => made.push(dir.clone()),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    undo(&made);
                    return Err(io("create the cgroup", &dir)(e));
                }
            }
        }
        Ok(PodCgroup { path: dir, made })
    }

    /// Its directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the directories the shim made, innermost first, once their
    /// processes are gone; one still in use (another pod's parent) stays.
    pub fn remove(&self) {
        for d in self.made.iter().rev() {
            match std::fs::remove_dir(d) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                // A parent another pod's cgroup still lives in.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && d != &self.path => {}
                Err(e) => {
                    tracing::warn!(cgroup = %d.display(), error = %e, "cannot remove the pod's cgroup")
                }
            }
        }
    }
}

/// Turns on, in `dir`'s children, the [`CONTROLLERS`] `dir` has. A cgroup
/// that holds processes itself cannot (cgroup v2's rule): the pod's
/// cgroup then only lacks those numbers, logged.
fn enable_controllers(dir: &Path) {
    let Ok(available) = std::fs::read_to_string(dir.join("cgroup.controllers")) else {
        return;
    };
    let on = std::fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
    let missing: Vec<String> = CONTROLLERS
        .iter()
        .filter(|c| available.split_whitespace().any(|a| a == **c))
        .filter(|c| !on.split_whitespace().any(|a| a == **c))
        .map(|c| format!("+{c}"))
        .collect();
    if missing.is_empty() {
        return;
    }
    if let Err(e) = std::fs::write(dir.join("cgroup.subtree_control"), missing.join(" ")) {
        tracing::warn!(cgroup = %dir.display(), controllers = ?missing, error = %e,
            "cannot turn on cgroup controllers for the pod's cgroup");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_drivers_paths_resolve() {
        assert_eq!(
            resolve("/kubepods/burstable/pod12/abc").unwrap(),
            Path::new("kubepods/burstable/pod12/abc")
        );
        assert_eq!(
            resolve("kubepods-burstable-pod12.slice:cri-containerd:abc").unwrap(),
            Path::new(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod12.slice/cri-containerd-abc.scope"
            )
        );
        assert_eq!(
            resolve("-.slice:husk:abc").unwrap(),
            Path::new("husk-abc.scope")
        );
        assert_eq!(
            resolve("system.slice::abc").unwrap(),
            Path::new("system.slice/abc.scope")
        );
    }

    #[test]
    fn paths_that_leave_the_hierarchy_are_refused() {
        for bad in [
            "",
            "/",
            "relative/path",
            "/kubepods/../../etc",
            "/kubepods/./x",
            "a.slice:p:../x",
            "a.slice:p:x/y",
            "a--b.slice:p:x",
            "notaslice:p:x",
            "a.slice:p:",
            "a:b",
        ] {
            assert!(resolve(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn made_directories_are_removed_and_others_left() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("kubepods")).unwrap();
        let cg = PodCgroup::create(root.path(), Path::new("kubepods/pod1/sandbox")).unwrap();
        assert_eq!(cg.path(), root.path().join("kubepods/pod1/sandbox"));
        assert!(cg.path().is_dir());
        cg.remove();
        assert!(!root.path().join("kubepods/pod1").exists());
        assert!(root.path().join("kubepods").is_dir());
    }
}
