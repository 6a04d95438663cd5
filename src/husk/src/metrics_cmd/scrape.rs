//! One scrape of the node: every pod directory under the shim's state
//! directory (`<state dir>/<containerd namespace>/<pod id>/`) whose husk
//! still runs is asked for a fresh metrics line (`FlushMetrics` on its API
//! socket, within a deadline), then its files are read: the last whole
//! line of `metrics.json` (or of `metrics.json.1` just after a rotation),
//! `labels.json`, and husk's resident memory from /proc. A pod that goes
//! away meanwhile, or whose files are garbage, is left out and counted;
//! it never fails the scrape.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use husk_api_types::metrics::{
    serves_api_socket, BootHistogram, MetricsLine, PodLabels, API_SOCKET, BOOT_TIMES_FILE,
    LABELS_FILE, METRICS_FILE, METRICS_FILE_ROTATED, PID_FILE,
};

/// The most of a metrics file's end that is read for its last line.
const TAIL_BYTES: u64 = 128 << 10;

/// Pods asked for their metrics at the same time.
const PARALLEL: usize = 16;

/// Why a pod was left out of a scrape, or served with older numbers.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    /// The pod's directory or husk went away during the scrape.
    #[error("the pod is gone")]
    Vanished,
    /// husk did not write a fresh line in time; the last one is served.
    #[error("husk did not flush its metrics")]
    Flush(#[source] FlushError),
    /// The labels file is not what the shim writes.
    #[error("cannot read {}", path.display())]
    Labels {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: FileError,
    },
    /// No line of the metrics file could be read.
    #[error("no readable metrics line in {}", path.display())]
    Metrics {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: FileError,
    },
}

impl PodError {
    /// The `reason` label of the error counter.
    pub fn reason(&self) -> &'static str {
        match self {
            PodError::Vanished => "vanished",
            PodError::Flush(_) => "flush",
            PodError::Labels { .. } => "labels",
            PodError::Metrics { .. } => "metrics",
        }
    }
}

/// Why a file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// It could not be read.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// It is not the JSON it should be.
    #[error("not valid: {0}")]
    Json(#[from] serde_json::Error),
    /// It has no complete line.
    #[error("no complete line")]
    Empty,
}

/// Why `FlushMetrics` failed.
#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    /// The socket failed or timed out.
    #[error("the API socket: {0}")]
    Io(#[from] std::io::Error),
    /// husk refused the request or answered something else.
    #[error("husk answered {0:?}")]
    Refused(String),
}

/// What one pod's scrape found.
#[derive(Debug)]
pub struct PodMetrics {
    /// Who the pod is.
    pub labels: PodLabels,
    /// husk's counters.
    pub line: MetricsLine,
    /// husk's resident memory (bytes), if /proc had it.
    pub rss_bytes: Option<u64>,
}

/// What a scrape of the node found.
#[derive(Debug, Default)]
pub struct NodeMetrics {
    /// The pods served.
    pub pods: Vec<PodMetrics>,
    /// Pod VMs running (booting ones too, and ones left out).
    pub running: usize,
    /// What went wrong, one reason per pod and problem.
    pub errors: Vec<&'static str>,
    /// The node's boot-time histogram, if there is a valid one.
    pub boots: Option<BootHistogram>,
}

/// Scrapes every pod under `state_dir`, each flush within `timeout`.
pub fn scrape(state_dir: &Path, timeout: Duration) -> NodeMetrics {
    let dirs = pod_dirs(state_dir);
    let mut node = NodeMetrics::default();
    for chunk in dirs.chunks(PARALLEL) {
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = chunk
                .iter()
                .map(|dir| s.spawn(move || scrape_pod(dir, timeout)))
                .collect();
            handles.into_iter().map(|h| h.join()).collect()
        });
        for result in results {
            let Ok(outcome) = result else {
                // A panicking pod scrape is a bug; the others still count.
                node.errors.push("internal");
                continue;
            };
            let Some(outcome) = outcome else { continue };
            node.running += 1;
            node.errors
                .extend(outcome.warnings.iter().map(PodError::reason));
            for w in &outcome.warnings {
                tracing::debug!(dir = %outcome.dir.display(), error = %vmm::error::Chain(w), "pod metrics");
            }
            match outcome.result {
                Ok(Some(pod)) => node.pods.push(pod),
                // Still booting: no labels yet.
                Ok(None) => {}
                Err(e) => {
                    tracing::info!(dir = %outcome.dir.display(), error = %vmm::error::Chain(&e),
                        "a pod is left out of the scrape");
                    node.errors.push(e.reason());
                }
            }
        }
    }
    node.boots = match read_json::<BootHistogram>(&state_dir.join(BOOT_TIMES_FILE)) {
        Ok(h) if h.is_valid() => Some(h),
        Ok(_) => {
            node.errors.push("boot_times");
            None
        }
        Err(FileError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            tracing::info!(error = %vmm::error::Chain(&e), "the boot-time histogram is left out");
            node.errors.push("boot_times");
            None
        }
    };
    node
}

/// The pod directories: two levels under the state directory.
fn pod_dirs(state_dir: &Path) -> Vec<PathBuf> {
    let subdirs = |d: &Path| -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(d) else {
            return Vec::new();
        };
        let mut dirs: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect();
        dirs.sort();
        dirs
    };
    subdirs(state_dir)
        .iter()
        .flat_map(|ns| subdirs(ns))
        .collect()
}

/// One pod's scrape.
struct PodOutcome {
    dir: PathBuf,
    /// The pod, `None` while it boots (no labels yet), or why it is left out.
    result: Result<Option<PodMetrics>, PodError>,
    /// Problems that did not leave it out.
    warnings: Vec<PodError>,
}

/// Scrapes the pod in `dir`; `None` if no husk runs there.
fn scrape_pod(dir: &Path, timeout: Duration) -> Option<PodOutcome> {
    let pid = running_husk(dir)?;
    let mut warnings = Vec::new();
    if let Err(e) = flush(&dir.join(API_SOCKET), timeout) {
        warnings.push(PodError::Flush(e));
    }
    let result = read_pod(dir, pid);
    // A directory that went away explains any error reading it.
    let result = match result {
        Err(_) if !dir.exists() => Err(PodError::Vanished),
        other => other,
    };
    Some(PodOutcome {
        dir: dir.to_path_buf(),
        result,
        warnings,
    })
}

/// The pid of the husk that serves `dir`'s API socket, if it still runs
/// (the pid in husk.pid, serving that socket: a pid reused by another
/// process does not count).
fn running_husk(dir: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(dir.join(PID_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    serves_api_socket(pid, &dir.join(API_SOCKET)).then_some(pid)
}

fn read_pod(dir: &Path, pid: u32) -> Result<Option<PodMetrics>, PodError> {
    let labels_path = dir.join(LABELS_FILE);
    let labels = match read_json::<PodLabels>(&labels_path) {
        Ok(l) => l,
        Err(FileError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(PodError::Labels {
                path: labels_path,
                source,
            })
        }
    };
    let path = dir.join(METRICS_FILE);
    let line = match last_line(&path) {
        Ok(line) => line,
        // Rotated a moment ago: the line before is in the copy.
        Err(FileError::Empty) => {
            last_line(&dir.join(METRICS_FILE_ROTATED)).map_err(|source| PodError::Metrics {
                path: path.clone(),
                source,
            })?
        }
        Err(source) => return Err(PodError::Metrics { path, source }),
    };
    Ok(Some(PodMetrics {
        labels,
        line,
        rss_bytes: rss_bytes(pid),
    }))
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, FileError> {
    let bytes = std::fs::read(path)?;
    Ok(serde_json::from_slice(&bytes)?)
}

/// The last whole line of a metrics file that reads as one (a line being
/// written, or garbage, is passed over for the one before it).
pub fn last_line(path: &Path) -> Result<MetricsLine, FileError> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)))?;
    let mut tail = Vec::new();
    f.take(TAIL_BYTES).read_to_end(&mut tail)?;
    // Only what ends in a line feed is whole.
    let end = tail
        .iter()
        .rposition(|b| *b == b'\n')
        .ok_or(FileError::Empty)?;
    let mut last_error = None;
    for line in tail[..end].split(|b| *b == b'\n').rev() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<MetricsLine>(line) {
            Ok(m) => return Ok(m),
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.map_or(FileError::Empty, FileError::Json))
}

/// VmRSS of `pid` in bytes.
fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_rss(&status)
}

fn parse_rss(status: &str) -> Option<u64> {
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}

/// `PUT /actions {"action_type": "FlushMetrics"}` on husk's API socket,
/// all of it within `timeout`: the connect does not wait (a full backlog
/// fails at once), reads and writes are bounded.
pub fn flush(socket: &Path, timeout: Duration) -> Result<(), FlushError> {
    let deadline = Instant::now() + timeout;
    let mut s = vmm::host_file::connect_nonblocking(socket)?;
    s.set_nonblocking(false)?;
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    let body = r#"{"action_type":"FlushMetrics"}"#;
    let request = format!(
        "PUT /actions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.set_write_timeout(Some(left()))?;
    s.write_all(request.as_bytes())?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 512];
    // The status line is all that is needed (204 has no body).
    while !answer.windows(2).any(|w| w == b"\r\n") && answer.len() < 4096 {
        if Instant::now() >= deadline {
            return Err(FlushError::Io(std::io::ErrorKind::TimedOut.into()));
        }
        s.set_read_timeout(Some(left()))?;
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
    }
    let answer = String::from_utf8_lossy(&answer);
    let status = answer.lines().next().unwrap_or_default();
    if status.split(' ').nth(1).is_some_and(|c| c.starts_with('2')) {
        Ok(())
    } else {
        Err(FlushError::Refused(status.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn the_last_whole_line_that_parses_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.json");
        std::fs::write(
            &p,
            "{\"uptime_ms\": 1}\n{\"uptime_ms\": 2}\n{garbage\n\n{\"uptime_ms\": 3",
        )
        .unwrap();
        // The unfinished line is being written; the garbage one is passed over.
        assert_eq!(last_line(&p).unwrap().uptime_ms, 2);
        std::fs::write(&p, "").unwrap();
        assert!(matches!(last_line(&p), Err(FileError::Empty)));
        std::fs::write(&p, "nope\n").unwrap();
        assert!(matches!(last_line(&p), Err(FileError::Json(_))));
        assert!(matches!(
            last_line(&dir.path().join("missing")),
            Err(FileError::Io(_))
        ));
        // A long file: only its tail is read.
        let mut long = "{\"uptime_ms\": 1}\n".repeat(20_000);
        long.push_str("{\"uptime_ms\": 9}\n");
        std::fs::write(&p, long).unwrap();
        assert_eq!(last_line(&p).unwrap().uptime_ms, 9);
    }

    #[test]
    fn rss_comes_from_proc_status() {
        assert_eq!(
            parse_rss("Name:\thusk\nVmRSS:\t   12345 kB\nVmData: 1 kB\n"),
            Some(12345 * 1024)
        );
        assert_eq!(parse_rss("Name:\thusk\n"), None);
        assert_eq!(parse_rss("VmRSS: lots kB\n"), None);
        assert!(rss_bytes(std::process::id()).is_some_and(|b| b > 0));
    }

    #[test]
    fn a_husk_that_never_answers_costs_the_timeout_only() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let _listener = UnixListener::bind(&sock).unwrap();
        let t0 = Instant::now();
        let e = flush(&sock, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(e, FlushError::Io(_)), "{e:?}");
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        assert!(flush(&dir.path().join("none.sock"), Duration::from_millis(200)).is_err());
    }

    #[test]
    fn flush_reads_the_status() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            for answer in [
                "HTTP/1.1 204 No Content\r\n\r\n",
                "HTTP/1.1 400 Bad Request\r\n\r\n",
            ] {
                let (mut c, _) = listener.accept().unwrap();
                let mut buf = [0u8; 1024];
                let n = c.read(&mut buf).unwrap();
                assert!(String::from_utf8_lossy(&buf[..n]).contains("FlushMetrics"));
                c.write_all(answer.as_bytes()).unwrap();
            }
        });
        flush(&sock, Duration::from_secs(5)).unwrap();
        assert!(matches!(
            flush(&sock, Duration::from_secs(5)),
            Err(FlushError::Refused(_))
        ));
        server.join().unwrap();
    }

    /// A state directory as the shim leaves it, with this test process
    /// standing in for husk (its command line does not name the socket,
    /// so pods are written with a pid whose cmdline is checked: ours is
    /// not, so such pods count as not running; `running_husk` is tested
    /// on its own below).
    #[test]
    fn pods_without_a_running_husk_are_not_scraped() {
        let dir = tempfile::tempdir().unwrap();
        let pod = dir.path().join("default/p1");
        std::fs::create_dir_all(&pod).unwrap();
        std::fs::write(pod.join("husk.pid"), std::process::id().to_string()).unwrap();
        assert_eq!(running_husk(&pod), None);
        std::fs::write(pod.join("husk.pid"), "garbage").unwrap();
        assert_eq!(running_husk(&pod), None);
        let node = scrape(dir.path(), Duration::from_millis(100));
        assert_eq!(node.running, 0);
        assert!(node.pods.is_empty() && node.errors.is_empty());
    }

    #[test]
    fn garbage_files_leave_the_pod_out_and_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let pod = dir.path().join("p");
        std::fs::create_dir_all(&pod).unwrap();
        let pid = std::process::id();
        // Booting: no labels yet.
        assert!(matches!(read_pod(&pod, pid), Ok(None)));
        std::fs::write(pod.join(LABELS_FILE), "{\"pod_id\": 7}").unwrap();
        assert!(matches!(read_pod(&pod, pid), Err(PodError::Labels { .. })));
        std::fs::write(pod.join(LABELS_FILE), "{\"pod_id\": \"p\"}").unwrap();
        assert!(matches!(read_pod(&pod, pid), Err(PodError::Metrics { .. })));
        std::fs::write(pod.join(METRICS_FILE), "\u{0}\u{1}binary\n").unwrap();
        let e = read_pod(&pod, pid).unwrap_err();
        assert_eq!(e.reason(), "metrics");
        // Just rotated: the copy has the line.
        std::fs::write(pod.join(METRICS_FILE), "").unwrap();
        std::fs::write(pod.join(METRICS_FILE_ROTATED), "{\"uptime_ms\": 4}\n").unwrap();
        let m = read_pod(&pod, pid).unwrap().unwrap();
        assert_eq!(m.line.uptime_ms, 4);
        assert_eq!(m.labels.pod_id, "p");
        assert!(m.rss_bytes.is_some());
    }

    #[test]
    fn a_garbage_boot_histogram_is_counted_not_served() {
        let dir = tempfile::tempdir().unwrap();
        assert!(scrape(dir.path(), Duration::from_millis(10))
            .boots
            .is_none());
        std::fs::write(dir.path().join(BOOT_TIMES_FILE), "[1,2]").unwrap();
        let node = scrape(dir.path(), Duration::from_millis(10));
        assert!(node.boots.is_none());
        assert_eq!(node.errors, ["boot_times"]);
        let mut h = BootHistogram::default();
        h.observe(1.0);
        std::fs::write(
            dir.path().join(BOOT_TIMES_FILE),
            serde_json::to_vec(&h).unwrap(),
        )
        .unwrap();
        assert_eq!(scrape(dir.path(), Duration::from_millis(10)).boots, Some(h));
    }
}
