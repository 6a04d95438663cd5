//! Counters a running microVM keeps about itself: vCPU exits by reason,
//! per-device I/O and errors, API requests. Everything is a relaxed atomic
//! bumped on the hot path and read only when a snapshot is written, as one
//! JSON line, to the metrics file (on the API's FlushMetrics and once a
//! minute). Counters are cumulative since the VMM started.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::ser::{Serialize, Serializer};

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The current count.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Serialize for Counter {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.get())
    }
}

/// vCPU exits, summed over the VM's vCPUs.
#[derive(Debug, Default, serde::Serialize)]
pub struct VcpuMetrics {
    /// Port reads.
    pub exit_io_in: Counter,
    /// Port writes.
    pub exit_io_out: Counter,
    /// MMIO reads (virtio-mmio registers, unassigned addresses).
    pub exit_mmio_read: Counter,
    /// MMIO writes.
    pub exit_mmio_write: Counter,
    /// KVM_RUN interrupted by a signal (kicks for pause and stop).
    pub exit_interrupted: Counter,
    /// Exits that ended the VM (reset, shutdown, faults).
    pub exit_final: Counter,
    /// KVM_RUN failures and exits husk does not handle.
    pub failures: Counter,
}

/// One virtio-blk drive.
#[derive(Debug, Default, serde::Serialize)]
pub struct BlockMetrics {
    /// Read requests completed.
    pub read_count: Counter,
    /// Bytes read by the guest.
    pub read_bytes: Counter,
    /// Write requests completed.
    pub write_count: Counter,
    /// Bytes written by the guest.
    pub write_bytes: Counter,
    /// Flush requests.
    pub flush_count: Counter,
    /// Requests that failed on the host (VIRTIO_BLK_S_IOERR).
    pub io_errors: Counter,
    /// Malformed requests (bad descriptors, out-of-range sectors, ...).
    pub invalid_requests: Counter,
    /// Backing-file swaps.
    pub swaps: Counter,
}

/// One virtio-net interface.
#[derive(Debug, Default, serde::Serialize)]
pub struct NetMetrics {
    /// Frames delivered to the guest.
    pub rx_frames: Counter,
    /// Bytes delivered to the guest (virtio-net header included).
    pub rx_bytes: Counter,
    /// Frames from the tap dropped (too large for the guest's buffer or the
    /// device's, runts).
    pub rx_dropped: Counter,
    /// Frames the guest sent to the tap.
    pub tx_frames: Counter,
    /// Bytes the guest sent (virtio-net header included).
    pub tx_bytes: Counter,
    /// Frames the tap refused.
    pub tx_errors: Counter,
    /// Malformed descriptor chains returned unused.
    pub invalid_chains: Counter,
    /// Times tx frames waited a whole tick of the once-a-second timer with
    /// no notification and none taken: a lost queue notification (0 unless
    /// one was lost; counted and logged, not served).
    pub tx_found_by_timer: Counter,
    /// Times a frame waited a whole tick for rx buffers the guest had
    /// already given, with no notification: a lost queue notification (0
    /// unless one was lost; counted and logged, not served).
    pub rx_found_by_timer: Counter,
}

/// The virtio-vsock device.
#[derive(Debug, Default, serde::Serialize)]
pub struct VsockMetrics {
    /// Packets delivered to the guest.
    pub rx_packets: Counter,
    /// Bytes delivered to the guest (headers included).
    pub rx_bytes: Counter,
    /// Packets the guest sent.
    pub tx_packets: Counter,
    /// Payload bytes the guest sent.
    pub tx_bytes: Counter,
    /// Malformed descriptor chains returned unused.
    pub invalid_chains: Counter,
    /// Times tx packets waited a whole tick of the once-a-second timer
    /// with no notification and none taken: a lost queue notification (0
    /// unless one was lost; counted and logged, not served).
    pub tx_found_by_timer: Counter,
    /// Passes over the tx queue that stopped at the per-turn budget (a
    /// queue's worth) with the guest still adding packets.
    pub tx_budget_spent: Counter,
    /// Streams a host program asked for (a `CONNECT` line read; one the
    /// guest refuses ends at once).
    pub host_connections: Counter,
    /// Streams the guest opened to a host port (someone listened there).
    pub guest_connections: Counter,
    /// Streams that ended, whichever side opened them (opened less ended:
    /// the streams open now).
    pub closed_connections: Counter,
}

/// How long starting the VM took, set once per VM.
#[derive(Debug, Default, serde::Serialize)]
pub struct BootMetrics {
    /// InstanceStart received to vCPU threads started (memory, kernel and
    /// initrd loading, devices, vCPU setup), in microseconds.
    pub build_us: Counter,
    /// InstanceStart received to vCPU 0's first entry into the guest, in
    /// microseconds (0 until it happened).
    pub start_to_first_entry_us: Counter,
}

/// The API server.
#[derive(Debug, Default, serde::Serialize)]
pub struct ApiMetrics {
    /// Requests answered.
    pub requests: Counter,
    /// Requests answered with a 4xx or 5xx status.
    pub failures: Counter,
}

/// Everything the VMM counts.
#[derive(Debug)]
pub struct Metrics {
    started: Instant,
    /// vCPU exits.
    pub vcpu: VcpuMetrics,
    /// The API server.
    pub api: ApiMetrics,
    /// Start-up times.
    pub boot: BootMetrics,
    /// Per-device counters, by device kind and id ("block" -> "rootfs" -> ...).
    devices: Mutex<DeviceRegistry>,
}

/// Device counters by kind, then id.
type DeviceRegistry = BTreeMap<String, BTreeMap<String, Arc<dyn DeviceMetrics>>>;

/// Counters of one device, serialisable as a JSON object.
pub trait DeviceMetrics: Send + Sync + std::fmt::Debug {
    /// The counters as JSON.
    fn to_json(&self) -> serde_json::Value;
}

impl<T> DeviceMetrics for T
where
    T: serde::Serialize + Send + Sync + std::fmt::Debug,
{
    fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            started: Instant::now(),
            vcpu: VcpuMetrics::default(),
            api: ApiMetrics::default(),
            boot: BootMetrics::default(),
            devices: Mutex::new(BTreeMap::new()),
        }
    }
}

impl Metrics {
    /// Registers a device's counters under `kind` / `id` (replacing any
    /// earlier registration of the same id).
    pub fn register_device(&self, kind: &str, id: &str, metrics: Arc<dyn DeviceMetrics>) {
        self.devices
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(kind.to_string())
            .or_default()
            .insert(id.to_string(), metrics);
    }

    /// One snapshot of every counter, as the JSON object written per line.
    pub fn snapshot(&self) -> serde_json::Value {
        let devices: serde_json::Map<String, serde_json::Value> = self
            .devices
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(kind, by_id)| {
                let ids = by_id
                    .iter()
                    .map(|(id, m)| (id.clone(), m.to_json()))
                    .collect::<serde_json::Map<_, _>>();
                (kind.clone(), serde_json::Value::Object(ids))
            })
            .collect();
        let utc_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        serde_json::json!({
            "utc_timestamp_ms": utc_ms,
            "uptime_ms": self.started.elapsed().as_millis() as u64,
            "vcpu": serde_json::to_value(&self.vcpu).unwrap_or_default(),
            "api": serde_json::to_value(&self.api).unwrap_or_default(),
            "boot": serde_json::to_value(&self.boot).unwrap_or_default(),
            "devices": devices,
        })
    }
}

/// Errors of the metrics sink.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The metrics file could not be opened.
    #[error("cannot open the metrics file {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A snapshot could not be written.
    #[error("cannot write metrics")]
    Write(#[source] std::io::Error),
    /// FlushMetrics before a metrics file was configured.
    #[error("no metrics file is configured (PUT /metrics first)")]
    NotConfigured,
}

/// Where snapshots go: a file (or FIFO) opened once, appended to.
#[derive(Debug)]
pub struct MetricsSink {
    file: File,
    path: PathBuf,
}

impl MetricsSink {
    /// Opens (creating it if needed) the metrics file. A FIFO is opened
    /// non-blocking, so a missing reader fails here instead of hanging.
    pub fn open(path: &Path) -> Result<Self, MetricsError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| MetricsError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(MetricsSink {
            file,
            path: path.to_path_buf(),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one snapshot line.
    pub fn write(&mut self, metrics: &Metrics) -> Result<(), MetricsError> {
        let mut line = metrics.snapshot().to_string();
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .map_err(MetricsError::Write)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_has_every_section() {
        let m = Metrics::default();
        m.vcpu.exit_io_out.add(3);
        m.api.requests.inc();
        let blk = Arc::new(BlockMetrics::default());
        blk.read_bytes.add(4096);
        m.register_device("block", "rootfs", blk.clone());
        blk.read_count.inc();
        let s = m.snapshot();
        assert_eq!(s["vcpu"]["exit_io_out"], 3);
        assert_eq!(s["api"]["requests"], 1);
        assert_eq!(s["devices"]["block"]["rootfs"]["read_bytes"], 4096);
        assert_eq!(s["devices"]["block"]["rootfs"]["read_count"], 1);
        assert!(s["uptime_ms"].is_u64());
    }

    #[test]
    fn sink_appends_lines() {
        let path = std::env::temp_dir().join(format!("husk-metrics-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let m = Metrics::default();
        let mut sink = MetricsSink::open(&path).unwrap();
        sink.write(&m).unwrap();
        m.api.failures.inc();
        sink.write(&m).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1]["api"]["failures"], 1);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_fifo_without_reader_fails_instead_of_hanging() {
        let path = std::env::temp_dir().join(format!("husk-metrics-fifo-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo only creates a file.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(matches!(
            MetricsSink::open(&path),
            Err(MetricsError::Open { .. })
        ));
        std::fs::remove_file(path).unwrap();
    }
}
