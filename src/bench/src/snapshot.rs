//! `husk-bench snapshot`: what a snapshot costs and how fast a VM comes
//! back from one, for husk and (with `--firecracker PATH`) for Firecracker
//! on the same guest, in the same run.
//!
//! For each VMM: a guest is booted through the API with a vsock device
//! and an initramfs whose test script serves vsock streams
//! (`husk-bench vsock-serve`); once it answers, it is paused and a full
//! snapshot is written (`PUT /snapshot/create`, timed from request to
//! response), the files' sizes (and the memory file's allocated bytes:
//! husk leaves untouched pages as holes) are noted, and the VMM is killed.
//! Then, `--runs` times, a fresh VMM process loads the snapshot with
//! `resume_vm` (`PUT /snapshot/load`), and the time from that request to
//! the guest answering a ping (a 64-byte echo through the vsock socket's
//! `CONNECT` handshake) is the restore time. The restored VMM's Rss and
//! Pss are read right after: the guest memory it has touched so far.

use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::api::Vmm;
use crate::stats;

/// Flags of `husk-bench snapshot`.
#[derive(clap::Args)]
pub struct SnapshotBench {
    /// The husk binary.
    #[arg(long, default_value = "husk")]
    husk: PathBuf,
    /// Also measure this Firecracker binary on the same guest.
    #[arg(long)]
    firecracker: Option<PathBuf>,
    /// Guest kernel.
    #[arg(long)]
    kernel: PathBuf,
    /// Guest initramfs whose /husk-test.sh runs `husk-bench vsock-serve
    /// --listen vsock:PORT` (resources/bench.sh makes it).
    #[arg(long)]
    initrd: PathBuf,
    /// The guest port the server listens on.
    #[arg(long, default_value_t = 5000)]
    port: u32,
    /// Restores per VMM.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: usize,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    mem_mib: u64,
}

/// How long a guest has to answer its first ping after a boot.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// ... and after a restore.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(60);

/// One echo of 64 bytes through the VMM's vsock socket; Err if the guest
/// does not answer (yet).
fn ping(uds: &Path, port: u32) -> std::io::Result<()> {
    let mut s = UnixStream::connect(uds)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while !line.ends_with(b"\n") {
        if s.read(&mut b)? == 0 {
            return Err(std::io::ErrorKind::ConnectionRefused.into());
        }
        line.push(b[0]);
    }
    if !line.starts_with(b"OK ") {
        return Err(std::io::ErrorKind::ConnectionRefused.into());
    }
    // husk-bench's echo request: mode, size, seed; then the bytes.
    let payload = [0x5au8; 64];
    let mut req = vec![b'E'];
    req.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    req.extend_from_slice(&0u64.to_le_bytes());
    req.extend_from_slice(&payload);
    s.write_all(&req)?;
    let mut back = [0u8; 64];
    s.read_exact(&mut back)?;
    if back != payload {
        return Err(std::io::Error::other("echo mismatch"));
    }
    Ok(())
}

/// Pings until the guest answers or `timeout` passes.
fn wait_for_guest(uds: &Path, port: u32, timeout: Duration) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        match ping(uds, port) {
            Ok(()) => return Ok(Instant::now()),
            Err(e) if Instant::now() > deadline => {
                return Err(e).context("the guest did not answer through vsock")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

/// Rss and Pss of a process, in KiB.
fn rss_pss(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("Rss:"), field("Pss:"))
}

struct Files {
    state: PathBuf,
    mem: PathBuf,
    create_ms: f64,
}

/// Boots the guest, snapshots it, and kills the VMM.
fn make_snapshot(b: &SnapshotBench, vmm_path: &Path, name: &str) -> anyhow::Result<Files> {
    let mut vmm = Vmm::spawn_program(vmm_path, &[], &format!("snap-{name}"))?;
    let dir = vmm.dir.clone();
    let uds = dir.join("v.sock");
    vmm.expect(
        "PUT",
        "/machine-config",
        json!({"vcpu_count": b.vcpus, "mem_size_mib": b.mem_mib, "smt": false}),
        204,
    )?;
    vmm.expect(
        "PUT",
        "/boot-source",
        json!({"kernel_image_path": std::path::absolute(&b.kernel)?,
               "initrd_path": std::path::absolute(&b.initrd)?,
               "boot_args": "console=ttyS0 reboot=k panic=1 pci=off quiet"}),
        204,
    )?;
    vmm.expect(
        "PUT",
        "/vsock",
        json!({"guest_cid": 3, "uds_path": uds}),
        204,
    )?;
    vmm.start()?;
    wait_for_guest(&uds, b.port, BOOT_TIMEOUT)?;
    vmm.expect("PATCH", "/vm", json!({"state": "Paused"}), 204)?;
    // Outside the VMM's directory: that goes with the VMM.
    let out = std::env::temp_dir().join(format!("husk-bench-snap-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&out)?;
    let files = Files {
        state: out.join("vm.state"),
        mem: out.join("vm.mem"),
        create_ms: 0.0,
    };
    let t0 = Instant::now();
    vmm.expect(
        "PUT",
        "/snapshot/create",
        json!({"snapshot_type": "Full", "snapshot_path": files.state, "mem_file_path": files.mem}),
        204,
    )?;
    let create_ms = t0.elapsed().as_secs_f64() * 1e3;
    drop(vmm);
    // The killed VMM may have left its vsock socket; the restored one
    // binds the same path.
    let _ = std::fs::remove_file(&uds);
    Ok(Files { create_ms, ..files })
}

struct Restore {
    load_ms: f64,
    to_answer_ms: f64,
    rss_kib: u64,
    pss_kib: u64,
}

fn restore_once(
    b: &SnapshotBench,
    vmm_path: &Path,
    name: &str,
    files: &Files,
    uds: &Path,
) -> anyhow::Result<Restore> {
    let _ = std::fs::remove_file(uds);
    let mut vmm = Vmm::spawn_program(vmm_path, &[], &format!("restore-{name}"))?;
    let t0 = Instant::now();
    vmm.expect(
        "PUT",
        "/snapshot/load",
        json!({"snapshot_path": files.state,
               "mem_backend": {"backend_type": "File", "backend_path": files.mem},
               "resume_vm": true}),
        204,
    )?;
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
    let answered = wait_for_guest(uds, b.port, RESTORE_TIMEOUT)?;
    let (rss_kib, pss_kib) = rss_pss(vmm.child.id());
    drop(vmm);
    let _ = std::fs::remove_file(uds);
    Ok(Restore {
        load_ms,
        to_answer_ms: answered.duration_since(t0).as_secs_f64() * 1e3,
        rss_kib,
        pss_kib,
    })
}

fn measure(b: &SnapshotBench, vmm_path: &Path, name: &str) -> anyhow::Result<Value> {
    let files = make_snapshot(b, vmm_path, name).context("taking the snapshot")?;
    // The snapshot records the socket path of the VMM it was taken from.
    let uds = std::env::temp_dir()
        .join(format!("husk-bench-api-{}-snap-{name}", std::process::id()))
        .join("v.sock");
    std::fs::create_dir_all(uds.parent().context("socket dir")?)?;
    let state = std::fs::metadata(&files.state)?;
    let mem = std::fs::metadata(&files.mem)?;
    let mut runs = Vec::with_capacity(b.runs);
    for i in 0..b.runs {
        runs.push(
            restore_once(b, vmm_path, name, &files, &uds)
                .with_context(|| format!("restore {} of {}", i + 1, b.runs))?,
        );
    }
    let col = |f: fn(&Restore) -> f64| stats::summary(&runs.iter().map(f).collect::<Vec<_>>());
    let result = json!({
        "vmm": name,
        "create_ms": (files.create_ms * 1000.0).round() / 1000.0,
        "state_file_bytes": state.len(),
        "mem_file_bytes": mem.len(),
        "mem_file_allocated_bytes": mem.blocks() * 512,
        "restores": b.runs,
        "load_request_ms": col(|r| r.load_ms),
        "load_to_guest_answer_ms": col(|r| r.to_answer_ms),
        "restored_rss_kib": col(|r| r.rss_kib as f64),
        "restored_pss_kib": col(|r| r.pss_kib as f64),
    });
    if let Some(dir) = files.state.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
    let _ = std::fs::remove_dir_all(uds.parent().context("socket dir")?);
    Ok(result)
}

/// Runs the benchmark.
pub fn snapshot(b: SnapshotBench) -> anyhow::Result<Value> {
    if b.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let mut vmms = vec![measure(&b, &b.husk, "husk")?];
    if let Some(fc) = &b.firecracker {
        vmms.push(measure(&b, fc, "firecracker")?);
    }
    Ok(json!({
        "benchmark": "snapshot",
        "guest": {
            "vcpus": b.vcpus,
            "mem_mib": b.mem_mib,
            "kernel": b.kernel,
            "initrd": b.initrd,
        },
        "vmms": vmms,
    }))
}
