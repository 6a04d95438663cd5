//! `husk-bench api`: the REST API's request latency, and with a guest, the
//! time from InstanceStart to the guest's first instruction.
//!
//! Latency is measured on one keep-alive connection (as SDKs use the API),
//! from writing a request to reading the last byte of its response, for
//! `GET /` and `PUT /machine-config`. With `--kernel`, each run configures a
//! fresh VMM through the API, sends InstanceStart, and reads the VMM's own
//! boot metrics (InstanceStart received to vCPU 0 entering the guest).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::stats;

/// Flags of `husk-bench api`.
#[derive(clap::Args)]
pub struct ApiBench {
    /// The husk binary.
    #[arg(long, default_value = "husk")]
    husk: PathBuf,
    /// Requests per endpoint.
    #[arg(long, default_value_t = 2000)]
    requests: usize,
    /// Guest kernel: also measure InstanceStart to the first vCPU entry.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Guest initramfs (with --kernel).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Boots (with --kernel).
    #[arg(long, default_value_t = 10)]
    runs: usize,
}

/// A VMM process driven over its API socket (husk, or Firecracker for
/// comparisons), in a scratch directory of its own.
pub(crate) struct Vmm {
    pub(crate) child: Child,
    pub(crate) dir: PathBuf,
    api: Api,
}

/// One keep-alive connection to a VMM's API socket.
pub(crate) struct Api {
    conn: UnixStream,
}

impl Api {
    /// Connects to the API socket at `sock`; a reply may take `timeout`.
    pub(crate) fn connect(sock: &Path, timeout: Duration) -> anyhow::Result<Api> {
        let conn = UnixStream::connect(sock)
            .with_context(|| format!("cannot connect to {}", sock.display()))?;
        conn.set_read_timeout(Some(timeout))?;
        Ok(Api { conn })
    }

    /// One request; returns (status, body).
    pub(crate) fn call(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<(u16, Vec<u8>)> {
        let body = body.map(Value::to_string).unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.conn.write_all(req.as_bytes())?;
        let mut head = Vec::with_capacity(256);
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if self.conn.read(&mut byte)? == 0 {
                bail!("the API closed the connection");
            }
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head);
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .context("no status")?;
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0usize);
        let mut body = vec![0u8; len];
        self.conn.read_exact(&mut body)?;
        Ok((status, body))
    }

    /// One request that must answer `status`; returns the body.
    pub(crate) fn expect(
        &mut self,
        method: &str,
        path: &str,
        body: Value,
        status: u16,
    ) -> anyhow::Result<Vec<u8>> {
        let (got, resp) = self.call(method, path, Some(&body))?;
        if got != status {
            bail!("{method} {path}: {got} {}", String::from_utf8_lossy(&resp));
        }
        Ok(resp)
    }
}

impl Vmm {
    fn spawn(husk: &Path, tag: &str) -> anyhow::Result<Vmm> {
        Self::spawn_program(husk, &[], tag)
    }

    /// Starts `program --api-sock <dir>/api.sock <extra...>` and connects.
    pub(crate) fn spawn_program(program: &Path, extra: &[&str], tag: &str) -> anyhow::Result<Vmm> {
        Self::spawn_with_console(program, extra, tag, false)
    }

    /// As [`Vmm::spawn_program`]; with `console`, the VMM's stdout (the
    /// guest's console) goes to `<dir>/console.txt`.
    pub(crate) fn spawn_with_console(
        program: &Path,
        extra: &[&str],
        tag: &str,
        console: bool,
    ) -> anyhow::Result<Vmm> {
        let dir = std::env::temp_dir().join(format!("husk-bench-api-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let sock = dir.join("api.sock");
        let stdout = if console {
            Stdio::from(std::fs::File::create(dir.join("console.txt"))?)
        } else {
            Stdio::null()
        };
        let child = Command::new(program)
            .arg("--api-sock")
            .arg(&sock)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot run {}", program.display()))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            if Instant::now() > deadline {
                bail!("husk did not create its API socket");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let api = Api::connect(&sock, Duration::from_secs(30))?;
        Ok(Vmm { child, dir, api })
    }

    /// Configures the boot tests' guest: 1 vCPU, 128 MiB, `kernel` and
    /// the test `initrd`, held up `hold_s` seconds (`husk.hold`).
    pub(crate) fn test_guest(
        &mut self,
        kernel: &Path,
        initrd: &Path,
        hold_s: u32,
    ) -> anyhow::Result<()> {
        self.expect(
            "PUT",
            "/machine-config",
            json!({"vcpu_count": 1, "mem_size_mib": 128}),
            204,
        )?;
        self.expect(
            "PUT",
            "/boot-source",
            json!({
                "kernel_image_path": kernel,
                "initrd_path": initrd,
                "boot_args": format!("console=ttyS0 reboot=k panic=1 pci=off quiet husk.hold={hold_s}"),
            }),
            204,
        )?;
        Ok(())
    }

    /// `InstanceStart`.
    pub(crate) fn start(&mut self) -> anyhow::Result<()> {
        self.expect(
            "PUT",
            "/actions",
            json!({"action_type": "InstanceStart"}),
            204,
        )?;
        Ok(())
    }
}

/// A VMM's requests go through its connection.
impl std::ops::Deref for Vmm {
    type Target = Api;
    fn deref(&self) -> &Api {
        &self.api
    }
}

impl std::ops::DerefMut for Vmm {
    fn deref_mut(&mut self) -> &mut Api {
        &mut self.api
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn latency(
    vmm: &mut Vmm,
    n: usize,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<Value> {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        let (status, _) = vmm.call(method, path, body.as_ref())?;
        samples.push(t0.elapsed().as_secs_f64() * 1e6);
        if status >= 300 {
            bail!("{method} {path} answered {status}");
        }
    }
    Ok(percentiles(&mut samples))
}

fn percentiles(samples: &mut [f64]) -> Value {
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    json!({
        "n": samples.len(),
        "p50_us": (at(0.50) * 10.0).round() / 10.0,
        "p99_us": (at(0.99) * 10.0).round() / 10.0,
        "max_us": (at(1.0) * 10.0).round() / 10.0,
    })
}

fn start_to_entry(b: &ApiBench, kernel: &Path, run: usize) -> anyhow::Result<(f64, f64, f64)> {
    let initrd = b.initrd.as_ref().context("--kernel needs --initrd")?;
    let mut vmm = Vmm::spawn(&b.husk, &format!("boot{run}"))?;
    let metrics = vmm.dir.join("metrics.json");
    vmm.test_guest(kernel, initrd, 1)?;
    vmm.expect("PUT", "/metrics", json!({"metrics_path": metrics}), 204)?;
    let t0 = Instant::now();
    vmm.start()?;
    let request_ms = t0.elapsed().as_secs_f64() * 1e3;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        vmm.expect(
            "PUT",
            "/actions",
            json!({"action_type": "FlushMetrics"}),
            204,
        )?;
        let text = std::fs::read_to_string(&metrics)?;
        let last: Value = serde_json::from_str(text.lines().last().unwrap_or("{}"))?;
        let entry = last["boot"]["start_to_first_entry_us"]
            .as_u64()
            .unwrap_or(0);
        if entry > 0 {
            let build = last["boot"]["build_us"].as_u64().unwrap_or(0);
            return Ok((request_ms, build as f64 / 1e3, entry as f64 / 1e3));
        }
        if Instant::now() > deadline {
            bail!("the guest never entered");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs the benchmark and returns its JSON.
pub fn run(b: &ApiBench) -> anyhow::Result<Value> {
    let mut vmm = Vmm::spawn(&b.husk, "latency")?;
    // Warm up the connection and the server's buffers.
    latency(&mut vmm, 50, "GET", "/", None)?;
    let get = latency(&mut vmm, b.requests, "GET", "/", None)?;
    let put = latency(
        &mut vmm,
        b.requests,
        "PUT",
        "/machine-config",
        Some(json!({"vcpu_count": 2, "mem_size_mib": 256})),
    )?;
    drop(vmm);
    let mut out = json!({
        "benchmark": "api",
        "get_root": get,
        "put_machine_config": put,
    });
    if let Some(kernel) = &b.kernel {
        let (mut request, mut build, mut entry) = (Vec::new(), Vec::new(), Vec::new());
        for run in 0..b.runs {
            let (r, bu, e) = start_to_entry(b, kernel, run)?;
            request.push(r);
            build.push(bu);
            entry.push(e);
        }
        out["instance_start"] = json!({
            "runs": b.runs,
            "request_ms": stats::summary(&request),
            "build_ms": stats::summary(&build),
            "to_first_vcpu_entry_ms": stats::summary(&entry),
        });
    }
    Ok(out)
}
