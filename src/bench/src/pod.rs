//! `husk-bench pod`: pods through containerd (Debian's containerd with
//! `ctr`, already running, the image imported), husk's shim against runc's.
//!
//! - Start latency: `ctr run -d` of a container that sleeps, from the
//!   command's start until it returns (containerd has created the task,
//!   the runtime started it), N times per runtime; each pod is removed
//!   before the next.
//! - Memory per husk pod while it runs: the VMM's resident memory beyond
//!   guest RAM (smaps, as `husk-bench boot` reads it), the guest RAM it
//!   touched, and the shim's RSS; and the CPU husk and the shim use over
//!   10 s while the container sleeps (for a RuntimeClass's overhead).
//! - Concurrency: P pods started at once (the VM size comes from the
//!   shim's configuration), how long until every `ctr run -d` returned,
//!   how many failed, and whether all were running.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::stats::{cpu_seconds, summary};

#[derive(clap::Args)]
pub struct PodBench {
    /// ctr.
    #[arg(long, default_value = "ctr")]
    ctr: PathBuf,
    /// The image, as imported.
    #[arg(long, default_value = "busybox:latest")]
    image: String,
    /// Guest memory of a husk pod (what the shim's configuration says), to
    /// tell guest RAM from the VMM's own memory.
    #[arg(long, default_value_t = 128)]
    mem_mib: u64,
    /// Pods per runtime for the latency.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Pods started at once (0: skip).
    #[arg(long, default_value_t = 20)]
    concurrent: usize,
    /// Pass --no-pivot to runc (the node VM's / is an initramfs).
    #[arg(long)]
    runc_no_pivot: bool,
    /// The shim's state directory (its pods in `<dir>/default/<id>`).
    #[arg(long, default_value = "/run/husk")]
    state_dir: PathBuf,
}

const HUSK: &str = "io.containerd.husk.v2";
const RUNC: &str = "io.containerd.runc.v2";

fn ctr(b: &PodBench, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(&b.ctr)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {}", b.ctr.display()))?;
    if !out.status.success() {
        bail!(
            "ctr {}: {}: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ctr run -d`; returns its wall time in ms.
fn start(b: &PodBench, runtime: &str, id: &str) -> anyhow::Result<f64> {
    let mut args = vec!["run", "-d", "--runtime", runtime];
    if runtime == RUNC && b.runc_no_pivot {
        args.push("--no-pivot");
    }
    args.extend([b.image.as_str(), id, "sleep", "600"]);
    let t0 = Instant::now();
    ctr(b, &args)?;
    Ok(t0.elapsed().as_secs_f64() * 1000.0)
}

/// Kills and removes a pod, waiting for its task to stop.
fn remove(b: &PodBench, id: &str) -> anyhow::Result<()> {
    let _ = ctr(b, &["task", "kill", "-s", "SIGKILL", id]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let tasks = ctr(b, &["task", "ls"])?;
        let stopped = tasks
            .lines()
            .any(|l| l.split_whitespace().next() == Some(id) && l.contains("STOPPED"));
        if stopped || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // ctr warns about the non-zero status and exits 0.
    ctr(b, &["task", "rm", id])?;
    ctr(b, &["container", "rm", id])?;
    Ok(())
}

/// The pid of the process whose command line contains every one of `parts`.
fn find_process(parts: &[&str]) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let args: Vec<String> = cmdline
            .split(|c| *c == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        parts
            .iter()
            .all(|p| args.iter().any(|a| a.contains(p)))
            .then_some(pid)
    })
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// The size of husk's hot-pluggable memory region (MiB; 0 without one),
/// from `GET /hotplug/memory` on its API socket.
fn hotplug_total_mib(api: &std::path::Path) -> anyhow::Result<u64> {
    use std::io::{Read, Write};
    let mut conn = std::os::unix::net::UnixStream::connect(api)
        .with_context(|| format!("cannot connect to {}", api.display()))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.write_all(
        b"GET /hotplug/memory HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )?;
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    // Until the body is whole (Content-Length) or the connection closes.
    loop {
        let n = conn.read(&mut buf)?;
        text.extend_from_slice(&buf[..n]);
        let whole = String::from_utf8_lossy(&text);
        if let Some((head, body)) = whole.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>())
                })
                .and_then(Result::ok)
                .unwrap_or(0);
            if n == 0 || body.len() >= len {
                if !head.starts_with("HTTP/1.1 200") {
                    return Ok(0);
                }
                let v: Value = serde_json::from_str(body).context("GET /hotplug/memory")?;
                return Ok(v["total_size_mib"].as_u64().unwrap_or(0));
            }
        }
        if n == 0 {
            bail!("husk closed its API connection mid-answer");
        }
    }
}

/// How long the idle pod's CPU use is sampled.
const IDLE_SAMPLE: Duration = Duration::from_secs(10);

/// The running husk pod `id`'s memory, and the CPU its husk and shim use
/// while its container sleeps (thousandths of a CPU: what a RuntimeClass's
/// `overhead.podFixed.cpu` is written in).
fn memory(b: &PodBench, id: &str) -> anyhow::Result<Value> {
    let shim =
        find_process(&["containerd-shim-husk-v2", id]).context("the pod's shim is not running")?;
    let dir = b.state_dir.join("default").join(id);
    // The pid file, not the command line: a jailed husk names its socket
    // as /run/api.sock.
    let husk: u32 = std::fs::read_to_string(dir.join("husk.pid"))
        .ok()
        .and_then(|p| p.trim().parse().ok())
        .context("the pod's husk is not running")?;
    let smaps =
        std::fs::read_to_string(format!("/proc/{husk}/smaps")).context("reading husk's smaps")?;
    // Guest RAM: the boot regions, and the hot-pluggable region (one
    // mapping of its whole size, whose plugged pages are the guest's).
    let mut guest_sizes = super::guest_region_sizes(b.mem_mib);
    let hotplug_mib = hotplug_total_mib(&dir.join("run/api.sock"))?;
    if hotplug_mib > 0 {
        // The region lies right after the boot RAM, with the same
        // protection: the kernel may merge the two into one mapping.
        let hotplug = hotplug_mib << 20;
        let merged: Vec<u64> = guest_sizes.iter().map(|g| g + hotplug).collect();
        guest_sizes.push(hotplug);
        guest_sizes.extend(merged);
    }
    let (overhead, guest) = super::split_rss(&smaps, &guest_sizes);
    let before = cpu_seconds(husk) + cpu_seconds(shim);
    let t0 = Instant::now();
    std::thread::sleep(IDLE_SAMPLE);
    let used = cpu_seconds(husk) + cpu_seconds(shim) - before;
    let idle_millicores = (used / t0.elapsed().as_secs_f64() * 1000.0).round();
    Ok(json!({
        "vmm_overhead_kib": overhead,
        "guest_rss_kib": guest,
        "shim_rss_kib": rss_kib(shim),
        "overhead_kib": overhead + rss_kib(shim),
        "idle_millicores": idle_millicores,
    }))
}

pub fn pod(b: PodBench) -> anyhow::Result<Value> {
    let mut result = json!({ "runs": b.runs, "image": b.image });
    let mut medians = Vec::new();
    for (name, runtime) in [("runc", RUNC), ("husk", HUSK)] {
        let mut samples = Vec::new();
        let mut mem = Value::Null;
        for i in 0..b.runs {
            let id = format!("bench-{name}-{i}");
            samples.push(start(&b, runtime, &id)?);
            if runtime == HUSK && i == 0 {
                // Let the guest settle (the agent's start-up is done).
                std::thread::sleep(Duration::from_secs(1));
                mem = memory(&b, &id)?;
            }
            remove(&b, &id)?;
        }
        let s = summary(&samples);
        medians.push(s["median"].as_f64().unwrap_or(f64::NAN));
        result[name] = json!({ "start_ms": s });
        if !mem.is_null() {
            result[name]["memory"] = mem;
        }
    }
    if let [runc, husk] = medians[..] {
        result["husk_over_runc"] = json!((husk / runc * 100.0).round() / 100.0);
    }
    if b.concurrent > 0 {
        let t0 = Instant::now();
        let handles: Vec<_> = (0..b.concurrent)
            .map(|i| {
                let ctr = b.ctr.clone();
                let image = b.image.clone();
                let state_dir = b.state_dir.clone();
                std::thread::spawn(move || {
                    let bench = PodBench {
                        ctr,
                        image,
                        state_dir,
                        mem_mib: 0,
                        runs: 0,
                        concurrent: 0,
                        runc_no_pivot: false,
                    };
                    start(&bench, HUSK, &format!("bench-many-{i}")).map_err(|e| format!("{e:#}"))
                })
            })
            .collect();
        let outcomes: Vec<Result<f64, String>> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("the thread panicked".into()))
            })
            .collect();
        let started = outcomes.iter().filter(|o| o.is_ok()).count();
        let mut errors: Vec<String> = outcomes.into_iter().filter_map(Result::err).collect();
        errors.dedup();
        errors.truncate(3);
        let seconds = t0.elapsed().as_secs_f64();
        let tasks = ctr(&b, &["task", "ls"])?;
        let running = tasks
            .lines()
            .filter(|l| l.starts_with("bench-many-") && l.contains("RUNNING"))
            .count();
        // What they take together: each husk's proportional set size
        // (pages shared between them, such as a template's, are split
        // among them), and each pod's virtiofsd's (its processes'): with
        // guest memory shared with it, virtiofsd's Pss holds its half of
        // every guest page both map.
        let pod_pids = |file: &str| -> Vec<u32> {
            (0..b.concurrent)
                .filter_map(|i| {
                    let dir = b.state_dir.join("default").join(format!("bench-many-{i}"));
                    std::fs::read_to_string(dir.join(file))
                        .ok()?
                        .trim()
                        .parse()
                        .ok()
                })
                .collect()
        };
        let pss_kib: u64 = pod_pids("husk.pid").into_iter().filter_map(pss).sum();
        let virtiofsd_pss_kib: u64 = pod_pids("virtiofsd.pid")
            .into_iter()
            .flat_map(|pid| std::iter::once(pid).chain(children(pid)))
            .filter_map(pss)
            .sum();
        for i in 0..b.concurrent {
            let _ = remove(&b, &format!("bench-many-{i}"));
        }
        result["concurrent"] = json!({
            "husk_pss_sum_kib": pss_kib,
            "virtiofsd_pss_sum_kib": virtiofsd_pss_kib,
            "pods": b.concurrent,
            "mem_mib": b.mem_mib,
            "started": started,
            "failed": b.concurrent - started,
            "running": running,
            "seconds": (seconds * 100.0).round() / 100.0,
            "errors": errors,
        });
    }
    Ok(result)
}

/// A process's proportional set size (KiB), from `smaps_rollup`.
fn pss(pid: u32) -> Option<u64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    rollup
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// A process's children and their descendants (virtiofsd's sandbox
/// forks).
fn children(pid: u32) -> Vec<u32> {
    let direct: Vec<u32> = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    direct
        .iter()
        .flat_map(|c| std::iter::once(*c).chain(children(*c)))
        .collect()
}
