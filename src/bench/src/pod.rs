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

use crate::stats::summary;

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

/// A process's CPU time so far (user and system), in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // After the command's closing parenthesis: state is field 3, utime 14.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i)?.parse::<u64>().ok())
        .sum();
    // SAFETY: sysconf(3) takes a constant and touches no memory.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    ticks as f64 / hz as f64
}

/// How long the idle pod's CPU use is sampled.
const IDLE_SAMPLE: Duration = Duration::from_secs(10);

/// The running husk pod `id`'s memory, and the CPU its husk and shim use
/// while its container sleeps (thousandths of a CPU: what a RuntimeClass's
/// `overhead.podFixed.cpu` is written in).
fn memory(b: &PodBench, id: &str) -> anyhow::Result<Value> {
    let shim =
        find_process(&["containerd-shim-husk-v2", id]).context("the pod's shim is not running")?;
    let husk = find_process(&["--api-sock", &format!("/{id}/api.sock")])
        .context("the pod's husk is not running")?;
    let smaps =
        std::fs::read_to_string(format!("/proc/{husk}/smaps")).context("reading husk's smaps")?;
    let (overhead, guest) = super::split_rss(&smaps, &super::guest_region_sizes(b.mem_mib));
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
                std::thread::spawn(move || {
                    let bench = PodBench {
                        ctr,
                        image,
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
        for i in 0..b.concurrent {
            let _ = remove(&b, &format!("bench-many-{i}"));
        }
        result["concurrent"] = json!({
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
