//! `husk-bench run`: the main job's latency, and the agent's costs.
//!
//! - `husk run --no-template IMAGE -- echo MARK`, N times: wall time from
//!   spawning husk to the container's first output byte, and to husk's
//!   exit, each guest booted.
//! - The same restored from a template (`husk run`'s default): the run
//!   that makes the template (from a cache without one), then N runs.
//! - The same container with `runc run` (bundle from the same image), N
//!   times, measured the same way, when `--runc` is given: the yardstick.
//! - In one microVM booted with the agent (`husk boot`, a vsock, the
//!   image's root filesystem as a read-only drive): CreateContainer to the
//!   process's first output byte over N containers, as a runtime shim
//!   sees it; the agent's RSS once they ran; the initramfs's size.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use husk_protocol::client::{AgentClient, Endpoint};
use husk_protocol::oci_spec::runtime::Spec;
use husk_protocol::{
    CreateContainer, ExitStatus, ProcessRef, Request, Response, Rootfs, Sandbox, StdioStream,
    DEFAULT_AGENT_PORT,
};
use serde_json::{json, Value};

use crate::stats::summary;

const MARK: &str = "husk-bench-first-byte";

#[derive(clap::Args)]
pub struct RunBench {
    /// The husk binary.
    #[arg(long, default_value = "husk")]
    husk: PathBuf,
    /// Guest kernel.
    #[arg(long)]
    kernel: PathBuf,
    /// The agent initramfs (resources/agent/build.sh).
    #[arg(long)]
    agent_initrd: PathBuf,
    /// The OCI image `husk run` runs (its root filesystem should be cached
    /// already: building it is not what this measures).
    #[arg(long)]
    image: PathBuf,
    /// The image's root filesystem (ext4), for the in-guest agent part.
    #[arg(long)]
    rootfs: PathBuf,
    /// runc, for the comparison.
    #[arg(long)]
    runc: Option<PathBuf>,
    /// An OCI bundle of the same image (rootfs/ and config.json, as
    /// `umoci unpack` writes it); its process is replaced by `echo`.
    #[arg(long)]
    bundle: Option<PathBuf>,
    /// Pass --no-pivot to runc (needed where / is an initramfs, as in the
    /// node VM, which pivot_root cannot leave).
    #[arg(long)]
    runc_no_pivot: bool,
    /// Runs of each kind.
    #[arg(long, default_value_t = 10)]
    runs: usize,
}

/// Spawns `cmd`, returns (ms to the first stdout byte, ms to exit).
fn first_byte(cmd: &mut Command, what: &str) -> anyhow::Result<(f64, f64)> {
    let t0 = Instant::now();
    let mut child: Child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {what}"))?;
    let mut out = child.stdout.take().context("no stdout")?;
    let mut byte = [0u8; 1];
    let n = out.read(&mut byte)?;
    let first = t0.elapsed();
    let mut rest = Vec::new();
    out.read_to_end(&mut rest)?;
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut err)?;
    }
    let status = child.wait()?;
    let total = t0.elapsed();
    if n == 0 || !status.success() {
        bail!("{what} failed ({status}): {err}");
    }
    let text = String::from_utf8_lossy(&byte).into_owned() + &String::from_utf8_lossy(&rest);
    if !text.contains(MARK) {
        bail!("{what} printed {text:?}, not the mark");
    }
    Ok((first.as_secs_f64() * 1e3, total.as_secs_f64() * 1e3))
}

fn husk_run(b: &RunBench, template: bool) -> anyhow::Result<(f64, f64)> {
    let mut cmd = Command::new(&b.husk);
    cmd.arg("run");
    if !template {
        cmd.arg("--no-template");
    }
    first_byte(
        cmd.arg("--kernel")
            .arg(&b.kernel)
            .arg("--agent-initrd")
            .arg(&b.agent_initrd)
            .arg(&b.image)
            .args(["--", "echo", MARK]),
        "husk run",
    )
}

/// Rewrites the bundle's process to print the mark.
fn prepare_bundle(bundle: &Path) -> anyhow::Result<()> {
    let path = bundle.join("config.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let mut config: Value = serde_json::from_str(&text).context("config.json")?;
    config["process"]["args"] = json!(["echo", MARK]);
    config["process"]["terminal"] = json!(false);
    std::fs::write(&path, config.to_string())?;
    Ok(())
}

fn runc_run(runc: &Path, bundle: &Path, no_pivot: bool, i: usize) -> anyhow::Result<(f64, f64)> {
    let mut cmd = Command::new(runc);
    cmd.arg("run");
    if no_pivot {
        cmd.arg("--no-pivot");
    }
    first_byte(
        cmd.arg("--bundle")
            .arg(bundle)
            .arg(format!("husk-bench-{}-{i}", std::process::id())),
        "runc run",
    )
}

/// A container spec like containerd's default, printing the mark.
fn spec(args: Value, pid_namespace: bool) -> anyhow::Result<Spec> {
    let mut namespaces = vec![
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
        json!({"type": "mount"}),
    ];
    if pid_namespace {
        namespaces.push(json!({"type": "pid"}));
    }
    let v = json!({
        "ociVersion": "1.1.0",
        "process": {
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/bin:/usr/bin"],
            "cwd": "/",
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs"},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]}
        ],
        "linux": {"namespaces": namespaces}
    });
    serde_json::from_value(v).context("a container spec")
}

struct Guest {
    vmm: Child,
    dir: PathBuf,
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.vmm.kill();
        let _ = self.vmm.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn call(agent: &mut AgentClient, request: Request) -> anyhow::Result<Response> {
    agent.call(request).context("the agent request failed")
}

/// One container's life as a shim drives it; returns ms from
/// CreateContainer to the first byte of its stdout, and what it printed.
fn one_container(agent: &mut AgentClient, id: &str, spec: Spec) -> anyhow::Result<(f64, String)> {
    let t0 = Instant::now();
    call(
        agent,
        Request::CreateContainer(CreateContainer {
            container_id: id.into(),
            spec: Box::new(spec),
            rootfs: Rootfs {
                drive_id: "rootfs".into(),
                fstype: "ext4".into(),
                read_only: true,
                writable_overlay: false,
                writable_layer: None,
                size_bytes: None,
                share: None,
            },
            volumes: None,
        }),
    )?;
    let mut out: UnixStream = agent
        .open_stdio(id, None, StdioStream::Stdout)
        .with_context(|| format!("cannot open the stdout of {id}"))?;
    call(
        agent,
        Request::StartContainer {
            container_id: id.into(),
        },
    )?;
    let mut byte = [0u8; 1];
    let n = out.read(&mut byte)?;
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    let mut rest = String::new();
    out.read_to_string(&mut rest)?;
    if n == 0 {
        bail!("container {id} printed nothing");
    }
    let status = match call(
        agent,
        Request::WaitProcess(ProcessRef {
            container_id: id.into(),
            exec_id: None,
        }),
    )? {
        Response::Exited(s) => s,
        other => bail!("WaitProcess answered {other:?}"),
    };
    if status != ExitStatus::Code(0) {
        bail!("container {id} ended with {status:?}");
    }
    call(
        agent,
        Request::RemoveContainer {
            container_id: id.into(),
        },
    )?;
    Ok((ms, String::from_utf8_lossy(&byte).into_owned() + &rest))
}

/// Boots one microVM with the agent and measures container starts in it.
fn in_guest(b: &RunBench) -> anyhow::Result<Value> {
    let dir = std::env::temp_dir().join(format!("husk-bench-run-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let uds = dir.join("v.sock");
    let vmm = Command::new(&b.husk)
        .arg("boot")
        .arg("--kernel")
        .arg(&b.kernel)
        .arg("--initrd")
        .arg(&b.agent_initrd)
        .args(["--vcpus", "1", "--mem-mib", "256"])
        .args(["--cmdline", "console=ttyS0 reboot=k panic=1 pci=off quiet"])
        .arg("--drive")
        .arg(format!("id=rootfs,path={},ro", b.rootfs.display()))
        .arg("--vsock")
        .arg(format!("cid=3,uds={}", uds.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start husk boot")?;
    let mut guest = Guest { vmm, dir };
    let endpoint = Endpoint::Vsock {
        uds,
        port: DEFAULT_AGENT_PORT,
    };
    let mut agent = AgentClient::connect(endpoint, Duration::from_secs(120))
        .context("the agent did not answer")?;
    call(&mut agent, Request::CreateSandbox(Sandbox::default()))?;
    let mut starts = Vec::with_capacity(b.runs);
    for i in 0..b.runs {
        let (ms, _) = one_container(
            &mut agent,
            &format!("c{i}"),
            spec(json!(["echo", MARK]), true)?,
        )?;
        starts.push(ms);
    }
    // A container in the agent's pid namespace reads PID 1, the agent.
    let (_, status) = one_container(
        &mut agent,
        "rss",
        spec(json!(["cat", "/proc/1/status"]), false)?,
    )?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS for the agent")?;
    let _ = call(&mut agent, Request::Shutdown);
    let _ = guest.vmm.wait();
    Ok(json!({
        "create_to_first_byte_ms": summary(&starts),
        "agent_rss_kib": rss_kib,
        "agent_initrd_bytes": std::fs::metadata(&b.agent_initrd)?.len(),
    }))
}

pub fn run(b: RunBench) -> anyhow::Result<Value> {
    // One unmeasured run: the root filesystem cache and the page cache
    // warm up; every measured run then finds the same state.
    husk_run(&b, false).context("warm-up run")?;
    let (mut first, mut total) = (Vec::new(), Vec::new());
    for _ in 0..b.runs {
        let (f, t) = husk_run(&b, false)?;
        first.push(f);
        total.push(t);
    }
    // With a template: the first run boots the template guest and
    // snapshots it (timed on its own, from a cache without templates),
    // every later one is restored from it.
    let templates = std::env::var_os("HUSK_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/husk"))
        .join("templates");
    let _ = std::fs::remove_dir_all(&templates);
    let (make_first, make_total) = husk_run(&b, true).context("the run that makes the template")?;
    let (mut tfirst, mut ttotal) = (Vec::new(), Vec::new());
    for _ in 0..b.runs {
        let (f, t) = husk_run(&b, true)?;
        tfirst.push(f);
        ttotal.push(t);
    }
    let mut report = json!({
        "bench": "run",
        "runs": b.runs,
        "husk_run": {
            "to_first_byte_ms": summary(&first),
            "to_exit_ms": summary(&total),
        },
        "husk_run_template": {
            "making_the_template": {
                "to_first_byte_ms": make_first,
                "to_exit_ms": make_total,
            },
            "to_first_byte_ms": summary(&tfirst),
            "to_exit_ms": summary(&ttotal),
        },
        "agent_in_guest": in_guest(&b)?,
    });
    if let (Some(runc), Some(bundle)) = (&b.runc, &b.bundle) {
        prepare_bundle(bundle)?;
        runc_run(runc, bundle, b.runc_no_pivot, b.runs).context("warm-up runc run")?;
        let (mut rf, mut rt) = (Vec::new(), Vec::new());
        for i in 0..b.runs {
            let (f, t) = runc_run(runc, bundle, b.runc_no_pivot, i)?;
            rf.push(f);
            rt.push(t);
        }
        let ratio = |a: &[f64], b: &[f64]| {
            let m = |v: &[f64]| summary(v)["median"].as_f64().unwrap_or(f64::NAN);
            ((m(a) / m(b)) * 100.0).round() / 100.0
        };
        report["runc_run"] = json!({
            "to_first_byte_ms": summary(&rf),
            "to_exit_ms": summary(&rt),
        });
        report["husk_over_runc_first_byte"] = json!(ratio(&first, &rf));
        report["husk_template_over_runc_first_byte"] = json!(ratio(&tfirst, &rf));
    }
    Ok(report)
}
