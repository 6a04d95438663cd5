//! The metrics files of a pod's microVM, shared by the containerd shim
//! that writes them and `husk metrics`, the node's exporter, that reads
//! them. In a pod's state directory:
//!
//! - [`METRICS_FILE`]: husk's own metrics (`PUT /metrics`), one JSON
//!   line per flush; [`MetricsLine`] is the part the exporter reads.
//! - [`LABELS_FILE`]: who the pod is ([`PodLabels`]): its namespaces,
//!   names and containers, and which container uses which drive.
//!
//! At the root of the shim's state directory, [`BOOT_TIMES_FILE`]: how
//! long the node's pod VMs took to boot, as the counts of a fixed set of
//! buckets ([`BootHistogram`]), so it never grows.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// husk's API socket in a pod's state directory.
pub const API_SOCKET: &str = "run/api.sock";
/// husk's pid in a pod's state directory.
pub const PID_FILE: &str = "husk.pid";

/// Whether process `pid` is the husk serving `api_socket` (a host path):
/// its command line's `--api-sock P` names, from the process's own root
/// (a jailed husk's is the pod directory), the same socket. A pid reused
/// by another process, or a husk of another pod, is not.
pub fn serves_api_socket(pid: u32, api_socket: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let mut args = cmdline.split(|b| *b == 0);
    let Some(named) = args
        .by_ref()
        .find(|a| *a == b"--api-sock")
        .and_then(|_| args.next())
    else {
        return false;
    };
    let Ok(named) = std::str::from_utf8(named) else {
        return false;
    };
    let seen = std::fs::metadata(format!(
        "/proc/{pid}/root/{}",
        named.trim_start_matches('/')
    ));
    match (seen, std::fs::metadata(api_socket)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// husk's metrics file in a pod's state directory.
pub const METRICS_FILE: &str = "metrics.json";
/// Where the metrics file moves when it reaches its cap (the shim then
/// empties it; the exporter reads this one while it is still empty).
pub const METRICS_FILE_ROTATED: &str = "metrics.json.1";
/// The pod's labels in its state directory.
pub const LABELS_FILE: &str = "labels.json";
/// The boot-time histogram at the root of the state directory.
pub const BOOT_TIMES_FILE: &str = "boot-times.json";
/// The lock file writers of [`BOOT_TIMES_FILE`] take (flock) around their
/// read, update and rename.
pub const BOOT_TIMES_LOCK: &str = "boot-times.lock";

/// One line of husk's metrics file: the counters the exporter serves.
/// Fields husk adds later are ignored and missing ones read as 0, so an
/// exporter and a husk of different versions still agree.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MetricsLine {
    /// When the line was written (ms since the Unix epoch).
    pub utc_timestamp_ms: u64,
    /// How long the VMM had run (ms).
    pub uptime_ms: u64,
    /// The API server.
    pub api: ApiCounters,
    /// vCPU exits, summed over the vCPUs.
    pub vcpu: VcpuCounters,
    /// Per-device counters.
    pub devices: DeviceCounters,
}

/// The API server's counters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ApiCounters {
    /// Requests answered.
    pub requests: u64,
    /// Requests answered with a 4xx or 5xx status.
    pub failures: u64,
}

/// vCPU exits by reason.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VcpuCounters {
    /// Port reads.
    pub exit_io_in: u64,
    /// Port writes.
    pub exit_io_out: u64,
    /// MMIO reads.
    pub exit_mmio_read: u64,
    /// MMIO writes.
    pub exit_mmio_write: u64,
    /// KVM_RUN interrupted by a signal.
    pub exit_interrupted: u64,
    /// Exits that ended the VM.
    pub exit_final: u64,
    /// KVM_RUN failures and exits husk does not handle.
    pub failures: u64,
}

/// Devices by kind, then id.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeviceCounters {
    /// virtio-blk drives by drive id.
    pub block: BTreeMap<String, BlockCounters>,
    /// virtio-net interfaces by interface id.
    pub net: BTreeMap<String, NetCounters>,
    /// The virtio-vsock device (id `vsock`).
    pub vsock: BTreeMap<String, VsockCounters>,
    /// Hot-pluggable memory (id `hotplug`).
    pub mem: BTreeMap<String, MemCounters>,
    /// virtio-fs devices by id.
    pub fs: BTreeMap<String, FsCounters>,
}

/// One virtio-fs device (the requests are the backend's to serve: husk
/// counts what passes through it, and relaying, what it copies).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FsCounters {
    /// Times the driver started the device.
    pub activations: u64,
    /// Used-buffer notifications raised to the guest.
    pub interrupts: u64,
    /// The backend refused a request or went away.
    pub backend_failures: u64,
    /// Relaying: guest requests handed to the backend.
    pub requests: u64,
    /// Relaying: malformed guest requests, returned unforwarded.
    pub invalid_requests: u64,
    /// Relaying: request bytes copied from guest memory for the backend.
    pub bytes_to_backend: u64,
    /// Relaying: reply bytes copied from the backend to guest memory.
    pub bytes_from_backend: u64,
}

/// One drive.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BlockCounters {
    /// Read requests completed.
    pub read_count: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Write requests completed.
    pub write_count: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Flush requests.
    pub flush_count: u64,
    /// Requests that failed on the host.
    pub io_errors: u64,
    /// Malformed requests.
    pub invalid_requests: u64,
}

/// One network interface.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct NetCounters {
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Bytes delivered to the guest.
    pub rx_bytes: u64,
    /// Frames from the tap dropped.
    pub rx_dropped: u64,
    /// Frames the guest sent.
    pub tx_frames: u64,
    /// Bytes the guest sent.
    pub tx_bytes: u64,
    /// Frames the tap refused.
    pub tx_errors: u64,
}

/// The vsock device.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VsockCounters {
    /// Packets delivered to the guest.
    pub rx_packets: u64,
    /// Bytes delivered to the guest.
    pub rx_bytes: u64,
    /// Packets the guest sent.
    pub tx_packets: u64,
    /// Payload bytes the guest sent.
    pub tx_bytes: u64,
    /// Streams a host program opened to a guest port.
    pub host_connections: u64,
    /// Streams the guest opened to a host port.
    pub guest_connections: u64,
    /// Streams that ended (either side).
    pub closed_connections: u64,
}

/// Hot-pluggable memory.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MemCounters {
    /// Bytes the guest plugged, in all.
    pub plugged_bytes: u64,
    /// Bytes the guest unplugged, in all.
    pub unplugged_bytes: u64,
}

/// Who a pod is, for the exporter's labels: written by the shim when the
/// pod's VM has booted, and again as containers come and go.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PodLabels {
    /// The containerd namespace the pod runs in (`k8s.io` under the CRI).
    pub containerd_namespace: String,
    /// The pod's id: its sandbox id (its state directory's name).
    pub pod_id: String,
    /// The pod's Kubernetes namespace (`io.kubernetes.cri.sandbox-namespace`).
    pub kubernetes_namespace: Option<String>,
    /// The pod's Kubernetes name (`io.kubernetes.cri.sandbox-name`).
    pub kubernetes_pod: Option<String>,
    /// How long its VM took to boot, until the agent had set the pod up (s).
    pub boot_seconds: Option<f64>,
    /// The pod's containers: id to name (`io.kubernetes.cri.container-name`,
    /// or the id).
    pub containers: BTreeMap<String, String>,
    /// The drives containers use: drive id to the ids of the containers
    /// on it (one for a writable layer or volumes, every container of an
    /// image for its shared layers).
    pub drives: BTreeMap<String, Vec<String>>,
}

impl PodLabels {
    /// The `namespace` label: the Kubernetes namespace, else the
    /// containerd namespace (a pod started with `ctr`).
    pub fn namespace(&self) -> &str {
        self.kubernetes_namespace
            .as_deref()
            .filter(|s| !s.is_empty())
            .unwrap_or(&self.containerd_namespace)
    }

    /// The `pod` label: the Kubernetes name, else the pod's id.
    pub fn pod(&self) -> &str {
        self.kubernetes_pod
            .as_deref()
            .filter(|s| !s.is_empty())
            .unwrap_or(&self.pod_id)
    }

    /// The container a drive belongs to, by name: `None` for a drive no
    /// container or several containers (an image's shared layers) use.
    pub fn drive_container(&self, drive: &str) -> Option<&str> {
        match self.drives.get(drive).map(Vec::as_slice) {
            Some([id]) => Some(self.containers.get(id).map_or(id.as_str(), String::as_str)),
            _ => None,
        }
    }
}

/// The upper bounds (s) of the boot-time histogram's buckets.
pub const BOOT_BUCKETS: [f64; 11] = [0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0];

/// How long pod VMs took to boot, on this node: a count per bucket, so
/// the file stays the same size however many pods come and go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BootHistogram {
    /// The buckets' upper bounds (s), increasing.
    pub bounds: Vec<f64>,
    /// Boots per bucket (not cumulative): `counts[i]` took more than
    /// `bounds[i-1]` and at most `bounds[i]`; the last, one more than the
    /// bounds, took longer than every bound.
    pub counts: Vec<u64>,
    /// The boot times added up (s).
    pub sum_seconds: f64,
}

impl Default for BootHistogram {
    fn default() -> Self {
        BootHistogram {
            bounds: BOOT_BUCKETS.to_vec(),
            counts: vec![0; BOOT_BUCKETS.len() + 1],
            sum_seconds: 0.0,
        }
    }
}

impl BootHistogram {
    /// Counts one boot of `seconds` (a negative or not-a-number time
    /// counts as 0).
    pub fn observe(&mut self, seconds: f64) {
        let seconds = if seconds.is_finite() && seconds > 0.0 {
            seconds
        } else {
            0.0
        };
        let bucket = self
            .bounds
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(self.bounds.len());
        if let Some(c) = self.counts.get_mut(bucket) {
            *c = c.saturating_add(1);
        }
        self.sum_seconds += seconds;
    }

    /// Whether the histogram can be served: one count per bound and one
    /// more, bounds finite and increasing, a finite sum of at least 0.
    pub fn is_valid(&self) -> bool {
        self.counts.len() == self.bounds.len() + 1
            && self.bounds.iter().all(|b| b.is_finite())
            && self.bounds.windows(2).all(|w| w[0] < w[1])
            && self.sum_seconds.is_finite()
            && self.sum_seconds >= 0.0
    }

    /// Boots counted in all.
    pub fn count(&self) -> u64 {
        self.counts.iter().fold(0u64, |a, c| a.saturating_add(*c))
    }

    /// The cumulative counts per bound, as Prometheus' buckets have them
    /// (the `+Inf` bucket is [`BootHistogram::count`]).
    pub fn cumulative(&self) -> Vec<(f64, u64)> {
        let mut total = 0u64;
        self.bounds
            .iter()
            .zip(&self.counts)
            .map(|(b, c)| {
                total = total.saturating_add(*c);
                (*b, total)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_metrics_line_reads_with_unknown_and_missing_fields() {
        let line: MetricsLine = serde_json::from_str(
            r#"{"uptime_ms": 5, "api": {"requests": 3}, "future": {"x": 1},
                "devices": {"block": {"slot0": {"write_bytes": 8388608, "swaps": 2}}}}"#,
        )
        .unwrap();
        assert_eq!(line.uptime_ms, 5);
        assert_eq!(line.api.requests, 3);
        assert_eq!(line.api.failures, 0);
        assert_eq!(line.devices.block["slot0"].write_bytes, 8 << 20);
        assert!(serde_json::from_str::<MetricsLine>(r#"{"api": {"requests": -1}}"#).is_err());
    }

    #[test]
    fn labels_fall_back_to_containerd_s_names() {
        let mut l = PodLabels {
            containerd_namespace: "default".into(),
            pod_id: "p1".into(),
            ..Default::default()
        };
        assert_eq!((l.namespace(), l.pod()), ("default", "p1"));
        l.kubernetes_namespace = Some("web".into());
        l.kubernetes_pod = Some("nginx-0".into());
        assert_eq!((l.namespace(), l.pod()), ("web", "nginx-0"));
        l.containers.insert("c1".into(), "nginx".into());
        l.drives.insert("slot0".into(), vec!["c1".into()]);
        l.drives.insert("slot1".into(), vec!["c2".into()]);
        l.drives
            .insert("image0".into(), vec!["c1".into(), "c2".into()]);
        assert_eq!(l.drive_container("slot0"), Some("nginx"));
        assert_eq!(l.drive_container("slot1"), Some("c2"));
        assert_eq!(l.drive_container("image0"), None);
        assert_eq!(l.drive_container("slot7"), None);
    }

    #[test]
    fn boots_land_in_their_buckets() {
        let mut h = BootHistogram::default();
        assert!(h.is_valid());
        for s in [0.1, 0.25, 0.3, 4.0, 500.0, f64::NAN, -1.0] {
            h.observe(s);
        }
        assert_eq!(h.count(), 7);
        let c = h.cumulative();
        assert_eq!(c[0], (0.25, 4)); // 0.1, 0.25, NaN and -1 as 0
        assert_eq!(c[1], (0.5, 5));
        assert_eq!(c[5], (5.0, 6));
        assert_eq!(c.last().unwrap().1, 6); // 500 s only in +Inf
        assert!((h.sum_seconds - 504.65).abs() < 1e-9);
        h.counts.pop();
        assert!(!h.is_valid());
    }
}
