//! What the shim leaves for `husk metrics`, the node's exporter, beside
//! husk's own metrics file: the pod's labels (its namespaces and names,
//! its containers' names, which container uses which drive) in its state
//! directory, and each boot's duration in the node's boot-time histogram
//! at the root of the state directory. The formats are
//! `husk_api_types::metrics`. Nothing here fails a pod: a file that
//! cannot be written is logged and the pod runs on without it.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use husk_api_types::metrics::{BootHistogram, PodLabels, BOOT_TIMES_FILE, BOOT_TIMES_LOCK};
use oci_spec::runtime::Spec;

use crate::error::Chain;

/// The CRI's annotation with the pod's Kubernetes namespace.
pub const SANDBOX_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
/// The CRI's annotation with the pod's Kubernetes name.
pub const SANDBOX_NAME: &str = "io.kubernetes.cri.sandbox-name";
/// The CRI's annotation with a container's name in its pod.
pub const CONTAINER_NAME: &str = "io.kubernetes.cri.container-name";

/// Why a metrics file could not be written.
#[derive(Debug, thiserror::Error)]
pub enum MetricsFileError {
    /// A file operation failed.
    #[error("cannot {what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The value could not be encoded.
    #[error("cannot encode {}", path.display())]
    Encode {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> MetricsFileError {
    let path = path.to_path_buf();
    move |source| MetricsFileError::Io { what, path, source }
}

/// Writes `value` as JSON to `path` whole or not at all (a temporary file
/// beside it, 0600, renamed over it), so a reader never sees half of it.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<(), MetricsFileError> {
    let text = serde_json::to_vec(value).map_err(|source| MetricsFileError::Encode {
        path: path.to_path_buf(),
        source,
    })?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = crate::private::file(&tmp).map_err(io_error("create", &tmp))?;
    f.write_all(&text).map_err(io_error("write", &tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io_error("replace", path)(e)
    })
}

/// An annotation of `spec`, if set and not empty.
pub fn annotation(spec: &Spec, key: &str) -> Option<String> {
    spec.annotations()
        .as_ref()
        .and_then(|a| a.get(key))
        .filter(|v| !v.is_empty())
        .cloned()
}

/// The labels of a booted pod from its first container's spec (the
/// sandbox's, under the CRI).
pub fn pod_labels(namespace: &str, pod_id: &str, spec: &Spec, boot_seconds: f64) -> PodLabels {
    PodLabels {
        containerd_namespace: namespace.to_string(),
        pod_id: pod_id.to_string(),
        kubernetes_namespace: annotation(spec, SANDBOX_NAMESPACE),
        kubernetes_pod: annotation(spec, SANDBOX_NAME),
        boot_seconds: Some(boot_seconds),
        ..Default::default()
    }
}

/// A container's name: its CRI name, else its id.
pub fn container_name(spec: &Spec, id: &str) -> String {
    annotation(spec, CONTAINER_NAME).unwrap_or_else(|| id.to_string())
}

/// The pod's labels file, rewritten whole on every change.
pub struct LabelsFile {
    path: PathBuf,
    labels: Mutex<PodLabels>,
}

impl LabelsFile {
    /// Writes `labels` to `path` and keeps them for later changes.
    pub fn create(path: PathBuf, labels: PodLabels) -> LabelsFile {
        let file = LabelsFile {
            path,
            labels: Mutex::new(labels),
        };
        file.change(|_| {});
        file
    }

    /// Applies `f` and writes the result (under the lock, so writes land
    /// in the order of the changes).
    fn change(&self, f: impl FnOnce(&mut PodLabels)) {
        let mut labels = self.labels.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut labels);
        match write_json(&self.path, &*labels) {
            Ok(()) => {}
            // The VM ended and its directory went: nothing to label.
            Err(MetricsFileError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                tracing::debug!("the pod's directory is gone: its labels are not written");
            }
            Err(e) => {
                tracing::warn!(error = %Chain(&e), "cannot write the pod's labels for husk metrics");
            }
        }
    }

    /// Names container `id`.
    pub fn add_container(&self, id: &str, name: &str) {
        self.change(|l| {
            l.containers.insert(id.to_string(), name.to_string());
        });
    }

    /// Forgets container `id`.
    pub fn remove_container(&self, id: &str) {
        self.change(|l| {
            l.containers.remove(id);
        });
    }

    /// Which containers use which drive now.
    pub fn set_drives(&self, drives: BTreeMap<String, Vec<String>>) {
        self.change(|l| l.drives = drives);
    }

    /// The labels as they are.
    #[cfg(test)]
    pub fn get(&self) -> PodLabels {
        self.labels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Holds an exclusive flock(2) on a file until dropped.
struct Flock(std::fs::File);

impl Flock {
    fn take(path: &Path) -> Result<Flock, MetricsFileError> {
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(crate::private::FILE_MODE)
            .open(path)
            .map_err(io_error("open", path))?;
        loop {
            // SAFETY: flock(2) on a descriptor this function owns.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(Flock(f));
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(io_error("lock", path)(e));
            }
        }
    }
}

impl Drop for Flock {
    fn drop(&mut self) {
        // SAFETY: flock(2) on the descriptor this value owns.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// Adds one boot of `seconds` to the node's boot-time histogram in
/// `state_dir`. Shims of other pods do the same at the same time: each
/// holds the lock file across its read, update and rename. A histogram
/// that cannot be read (garbage, other buckets) starts again from zero,
/// which Prometheus takes as a counter reset.
pub fn record_boot(state_dir: &Path, seconds: f64) -> Result<(), MetricsFileError> {
    crate::private::dir(state_dir).map_err(io_error("create", state_dir))?;
    let _lock = Flock::take(&state_dir.join(BOOT_TIMES_LOCK))?;
    let path = state_dir.join(BOOT_TIMES_FILE);
    let mut histogram = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice::<BootHistogram>(&b).ok())
        .filter(|h| h.is_valid() && h.bounds == BootHistogram::default().bounds)
        .unwrap_or_default();
    histogram.observe(seconds);
    write_json(&path, &histogram)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn read<T: serde::de::DeserializeOwned>(p: &Path) -> T {
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    }

    #[test]
    fn boots_from_many_shims_at_once_are_all_counted() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::thread::scope(|s| {
            for n in 0..8 {
                let state = &state;
                s.spawn(move || {
                    for _ in 0..25 {
                        record_boot(state, f64::from(n)).unwrap();
                    }
                });
            }
        });
        let h: BootHistogram = read(&state.join(BOOT_TIMES_FILE));
        assert_eq!(h.count(), 200);
        assert!((h.sum_seconds - 25.0 * 28.0).abs() < 1e-9);
        let mode = std::fs::metadata(state.join(BOOT_TIMES_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, crate::private::FILE_MODE);
        // Nothing else is left beside it: the lock file, no temporary.
        let mut names: Vec<_> = std::fs::read_dir(&state)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, [BOOT_TIMES_FILE, BOOT_TIMES_LOCK]);
        // Garbage starts again from zero.
        std::fs::write(state.join(BOOT_TIMES_FILE), b"{nope").unwrap();
        record_boot(&state, 1.5).unwrap();
        let h: BootHistogram = read(&state.join(BOOT_TIMES_FILE));
        assert_eq!(h.count(), 1);
    }

    #[test]
    fn labels_follow_the_pod_s_containers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("labels.json");
        let spec: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "annotations": {
                SANDBOX_NAMESPACE: "shop",
                SANDBOX_NAME: "cart-7d9",
                CONTAINER_NAME: "",
            }
        }))
        .unwrap();
        let labels = LabelsFile::create(path.clone(), pod_labels("k8s.io", "abc", &spec, 2.5));
        let on_disk: PodLabels = read(&path);
        assert_eq!(on_disk, labels.get());
        assert_eq!((on_disk.namespace(), on_disk.pod()), ("shop", "cart-7d9"));
        // An empty name annotation is no name.
        assert_eq!(container_name(&spec, "c1"), "c1");
        labels.add_container("c1", "cart");
        labels.set_drives(BTreeMap::from([(
            "slot0".to_string(),
            vec!["c1".to_string()],
        )]));
        let on_disk: PodLabels = read(&path);
        assert_eq!(on_disk.drive_container("slot0"), Some("cart"));
        labels.remove_container("c1");
        labels.set_drives(BTreeMap::new());
        let on_disk: PodLabels = read(&path);
        assert!(on_disk.containers.is_empty() && on_disk.drives.is_empty());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, crate::private::FILE_MODE);
    }
}
