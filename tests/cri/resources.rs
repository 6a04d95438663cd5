//! `husk-cri resources`: a pod's CPU and memory limits, as Kubernetes
//! promises them, for one handler. One pod, sized as the kubelet sizes it
//! (its `resources` the sum of its containers' limits: containerd 1.7
//! passes them to the runtime as sandbox annotations, 1.6 does not), in a
//! cgroup parent of the test's, runs in turn:
//!
//! - `fit`: a 1 GiB limit, touching 900 MiB: exits 0.
//! - `over`: a 1 GiB limit, touching 1200 MiB: OOM-killed (137, OOMKilled).
//! - `held`: a 512 MiB limit and 2 CPUs: prints `nproc`, then holds 200 MiB
//!   while the node's pod cgroup is read (its memory.current, and whether
//!   husk is in it).
//! - `grow`: a 256 MiB limit raised to 1 GiB by UpdateContainerResources
//!   (an exec then touches 900 MiB: exit 0), then lowered to 256 MiB again
//!   (the same exec is OOM-killed).
//!
//! A second pod, sized by the kubelet's pod resources and nothing else,
//! shows the size its VM boots with. Each line is `CRI-R <container> <key>
//! <value>`; with the husk handler the VM's size is read from husk's API
//! as well (`CRI-R vm ...`, `CRI-R sized ...`). A step that
//! fails prints `CRI-R <container> failed <error>` and the next one runs.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_cri::v1::{
    ContainerConfig, ContainerStatusRequest, ExecSyncRequest, LinuxContainerResources,
    LinuxPodSandboxConfig, RemoveContainerRequest, UpdateContainerResourcesRequest,
};

use crate::{container_config, log_lines, pod_config, wait_exited, Args, Client, Pod, Result};

const MIB: i64 = 1 << 20;

/// Where the pods' cgroups go on the node (the kubelet's would be
/// /kubepods/...; cgroupfs driver).
const CGROUP_PARENT: &str = "/husk-test";

fn limits(memory_mib: i64, cpus: i64) -> LinuxContainerResources {
    LinuxContainerResources {
        memory_limit_in_bytes: memory_mib * MIB,
        cpu_period: 100_000,
        cpu_quota: cpus * 100_000,
        cpu_shares: cpus * 1024,
        ..Default::default()
    }
}

fn limited(name: &str, image: &str, memory_mib: i64, cpus: i64, cmd: &[&str]) -> ContainerConfig {
    let mut c = container_config(name, image, cmd);
    if let Some(l) = c.linux.as_mut() {
        l.resources = Some(limits(memory_mib, cpus));
    }
    c
}

/// A GET of husk's API socket; the body.
fn husk_get(socket: &Path, uri: &str) -> Result<serde_json::Value> {
    let mut s = UnixStream::connect(socket).map_err(|e| format!("{}: {e}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {uri} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    serde_json::from_str(body).map_err(|e| format!("GET {uri}: {e}: {text}"))
}

/// The pod's VM's API socket (the shim's state directory).
fn api_socket(pod_id: &str) -> PathBuf {
    Path::new("/run/husk/k8s.io")
        .join(pod_id)
        .join("run/api.sock")
}

/// What the guest has plugged (MiB), once it is at most `at_most` (for
/// at most 30 s), else what it has then.
fn plugged_settles(socket: &Path, at_most: u64) -> Result<u64> {
    let t0 = Instant::now();
    loop {
        let v = husk_get(socket, "/hotplug/memory")?;
        let plugged = v["plugged_size_mib"].as_u64().unwrap_or(u64::MAX);
        if plugged <= at_most || t0.elapsed() > Duration::from_secs(30) {
            return Ok(plugged);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The memory charged to the node's cgroup `dir` (MiB), and whether a
/// husk process is in it or below it.
fn pod_cgroup(dir: &Path) -> (Option<u64>, bool) {
    let mib = std::fs::read_to_string(dir.join("memory.current"))
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|b| b >> 20);
    fn holds_husk(dir: &Path) -> bool {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        if procs.lines().any(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "husk")
        }) {
            return true;
        }
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.file_type().is_ok_and(|t| t.is_dir()) && holds_husk(&e.path()))
    }
    (mib, holds_husk(dir))
}

async fn exec(c: &mut Client, id: &str, cmd: &[&str]) -> Result<(i32, String)> {
    let r = c
        .exec_sync(ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: 120,
        })
        .await
        .map_err(crate::status_err("ExecSync"))?
        .into_inner();
    Ok((
        r.exit_code,
        String::from_utf8_lossy(&r.stderr).trim().to_string(),
    ))
}

async fn remove(c: &mut Client, id: &str) -> Result<()> {
    c.remove_container(RemoveContainerRequest {
        container_id: id.into(),
    })
    .await
    .map_err(crate::status_err("RemoveContainer"))?;
    Ok(())
}

/// Stops container `id` at once and removes it.
async fn stop_and_remove(c: &mut Client, id: &str) -> Result<()> {
    c.stop_container(k8s_cri::v1::StopContainerRequest {
        container_id: id.into(),
        timeout: 0,
    })
    .await
    .map_err(crate::status_err("StopContainer"))?;
    remove(c, id).await
}

async fn reason(c: &mut Client, id: &str) -> String {
    c.container_status(ContainerStatusRequest {
        container_id: id.into(),
        verbose: false,
    })
    .await
    .ok()
    .and_then(|r| r.into_inner().status)
    .map(|s| s.reason)
    .unwrap_or_default()
}

const TOUCH_900: &[&str] = &["dd", "if=/dev/zero", "of=/dev/null", "bs=900M", "count=1"];

/// Runs a container to its end; prints its exit code, reason and log.
async fn run_to_end(
    c: &mut Client,
    pod: &Pod,
    log_dir: &Path,
    config: ContainerConfig,
) -> Result<()> {
    let name = config
        .metadata
        .as_ref()
        .map(|m| m.name.clone())
        .unwrap_or_default();
    let id = pod.create(c, config).await?;
    let code = wait_exited(c, &id, Duration::from_secs(120)).await?;
    println!("CRI-R {name} exit {code}");
    println!("CRI-R {name} reason {}", reason(c, &id).await);
    for (stream, text) in log_lines(&log_dir.join(format!("{name}.log")), 1).await {
        println!("CRI-R {name} {stream} {text}");
    }
    remove(c, &id).await
}

async fn held(c: &mut Client, pod: &Pod, args: &Args, log_dir: &Path, cgroup: &Path) -> Result<()> {
    // dd reads 200 MiB into its buffer, then blocks writing it to a pipe
    // nobody reads: the memory stays touched and held.
    let config = limited(
        "held",
        &args.image,
        512,
        2,
        &[
            "sh",
            "-c",
            "echo nproc $(nproc); dd if=/dev/zero bs=200M count=1 2>/dev/null | sleep 120",
        ],
    );
    let id = pod.create(c, config).await?;
    for (stream, text) in log_lines(&log_dir.join("held.log"), 1).await {
        println!("CRI-R held {stream} {text}");
    }
    // The pod's cgroup, once it holds the 200 MiB (at most 30 s).
    let t0 = Instant::now();
    let (mib, husk) = loop {
        let (mib, husk) = pod_cgroup(cgroup);
        if mib.unwrap_or(0) >= 200 || t0.elapsed() > Duration::from_secs(30) {
            break (mib, husk);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!(
        "CRI-R held pod-cgroup-mib {}",
        mib.map_or("none".into(), |m| m.to_string())
    );
    println!("CRI-R held husk-in-pod-cgroup {husk}");
    stop_and_remove(c, &id).await
}

async fn grow(c: &mut Client, pod: &Pod, args: &Args) -> Result<()> {
    let config = limited("grow", &args.image, 256, 1, &["sleep", "3600"]);
    let id = pod.create(c, config).await?;
    let husk = args.handler == "husk";
    let socket = api_socket(&pod.id);
    let update = |mib: i64| UpdateContainerResourcesRequest {
        container_id: id.clone(),
        linux: Some(limits(mib, 1)),
        ..Default::default()
    };
    c.update_container_resources(update(1024))
        .await
        .map_err(crate::status_err("UpdateContainerResources"))?;
    let (code, err) = exec(c, &id, TOUCH_900).await?;
    println!("CRI-R grow raised-exec {code}");
    if code != 0 {
        println!("CRI-R grow raised-stderr {err}");
    }
    if husk {
        let v = husk_get(&socket, "/hotplug/memory")?;
        println!("CRI-R vm plugged-raised {}", v["plugged_size_mib"]);
    }
    c.update_container_resources(update(256))
        .await
        .map_err(crate::status_err("UpdateContainerResources"))?;
    if husk {
        println!(
            "CRI-R vm plugged-lowered {}",
            plugged_settles(&socket, 256)?
        );
    }
    let (code, _) = exec(c, &id, TOUCH_900).await?;
    println!("CRI-R grow lowered-exec {code}");
    stop_and_remove(c, &id).await
}

/// A pod the kubelet sized (its resources the sum of its container's
/// limits: 1 GiB, 2 CPUs), with that container: prints the CPUs and the
/// memory the container sees (`CRI-R sized nproc N`, `memtotal-mib M`)
/// and, with husk, what the VM booted with and what was requested right
/// after (`CRI-R sized boot ...`, `requested-mib`).
async fn sized(c: &mut Client, args: &Args) -> Result<()> {
    let mut config = pod_config(&format!("r-sized-{}", args.handler), &args.log_dir);
    let linux = config
        .linux
        .get_or_insert_with(LinuxPodSandboxConfig::default);
    linux.resources = Some(limits(1024, 2));
    let log_dir = PathBuf::from(&config.log_directory);
    std::fs::create_dir_all(&log_dir).map_err(|e| e.to_string())?;
    let pod = Pod::run(c, config, &args.handler).await?;
    let result = async {
        if args.handler == "husk" {
            let socket = api_socket(&pod.id);
            let m = husk_get(&socket, "/machine-config")?;
            println!(
                "CRI-R sized boot vcpus {} mem {}",
                m["vcpu_count"], m["mem_size_mib"]
            );
            let h = husk_get(&socket, "/hotplug/memory")?;
            println!("CRI-R sized requested-mib {}", h["requested_size_mib"]);
        }
        let probe = limited(
            "sized",
            &args.image,
            1024,
            2,
            &[
                "sh",
                "-c",
                "echo nproc $(nproc); echo memtotal-mib $(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 ))",
            ],
        );
        let id = pod.create(c, probe).await?;
        wait_exited(c, &id, Duration::from_secs(60)).await?;
        for (stream, text) in log_lines(&log_dir.join("sized.log"), 2).await {
            if stream == "stdout" {
                println!("CRI-R sized {text}");
            }
        }
        Ok::<_, String>(())
    }
    .await;
    let removed = pod.remove(c).await;
    result.and(removed)
}

/// Runs the steps; an error only if the pod cannot run at all.
pub async fn resources(c: &mut Client, args: &Args) -> Result<()> {
    if let Err(e) = sized(c, args).await {
        println!("CRI-R sized failed {e}");
    }
    if args.sized_only {
        return Ok(());
    }
    // The main pod has no resources of its own, as the kubelet leaves a
    // pod some of whose containers have no limits: its VM boots small
    // and grows for each container.
    let name = format!("r-{}", args.handler);
    let mut config = pod_config(&name, &args.log_dir);
    let cgroup_parent = format!("{CGROUP_PARENT}/{name}");
    let linux = config
        .linux
        .get_or_insert_with(LinuxPodSandboxConfig::default);
    linux.cgroup_parent = cgroup_parent.clone();
    let log_dir = PathBuf::from(&config.log_directory);
    std::fs::create_dir_all(&log_dir).map_err(|e| e.to_string())?;
    let pod = Pod::run(c, config, &args.handler).await?;
    let cgroup = Path::new("/sys/fs/cgroup").join(cgroup_parent.trim_start_matches('/'));
    let fit = limited("fit", &args.image, 1024, 1, TOUCH_900);
    if let Err(e) = run_to_end(c, &pod, &log_dir, fit).await {
        println!("CRI-R fit failed {e}");
    }
    let over = limited(
        "over",
        &args.image,
        1024,
        1,
        &["dd", "if=/dev/zero", "of=/dev/null", "bs=1200M", "count=1"],
    );
    if let Err(e) = run_to_end(c, &pod, &log_dir, over).await {
        println!("CRI-R over failed {e}");
    }
    if let Err(e) = held(c, &pod, args, &log_dir, &cgroup).await {
        println!("CRI-R held failed {e}");
    }
    if let Err(e) = grow(c, &pod, args).await {
        println!("CRI-R grow failed {e}");
    }
    pod.remove(c).await?;
    // The sandbox's own cgroup goes with the pod (runc removes its
    // container's; the shim the one it made for husk).
    println!("CRI-R pod cgroup-left {}", cgroup.join(&pod.id).exists());
    Ok(())
}
