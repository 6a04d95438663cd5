//! `husk-bench fs`: virtio-fs against virtio-blk in one VM. The node
//! makes a backing file for a drive and a file of the same size in a
//! directory virtiofsd shares; the guest runs `husk-bench io` on
//! /dev/vda and on the shared file at each queue depth, so both devices
//! are measured in the same guest, the same node run and the same host
//! page cache. Both bypass the guest's page cache (O_DIRECT); both end in
//! buffered I/O on the node's file (husk's block backend and virtiofsd
//! alike). With `--meta-root` and `--meta-image`, the guest also runs
//! `husk-bench meta` (small files, cold stats, `tar c` of a busybox root)
//! on an ext4 drive holding that tree and on the share holding a copy.
//! `--relay` measures a relaying virtio-fs device instead of one that
//! shares guest memory with virtiofsd.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

/// Flags of `husk-bench fs`.
#[derive(clap::Args)]
pub struct FsBench {
    /// The husk binary.
    #[arg(long, default_value = "husk")]
    husk: PathBuf,
    /// virtiofsd (the virtio-fs project's vhost-user file server).
    #[arg(long, default_value = "virtiofsd")]
    virtiofsd: PathBuf,
    /// Guest kernel.
    #[arg(long)]
    kernel: PathBuf,
    /// Guest initramfs whose /husk-test.sh, for each depth listed in
    /// `husk.io_depths=`, runs `husk-bench io` on /dev/vda (printing
    /// `HUSK-IO-JSON `) and on /mnt/bench.bin of the `bench` virtio-fs tag
    /// (printing `HUSK-FS-IO-JSON `); resources/bench.sh makes it.
    #[arg(long)]
    initrd: PathBuf,
    /// Each depth is measured on both devices.
    #[command(flatten)]
    load: crate::io::Load,
    /// A directory whose contents (a `tree/` to tar) are copied into the
    /// share for the metadata runs (the guest mounts /dev/vdb on /m and
    /// prints `HUSK-META-JSON ` and `HUSK-FS-META-JSON ` lines).
    #[arg(long, requires = "meta_image")]
    meta_root: Option<PathBuf>,
    /// An ext4 image of the same contents, attached (a copy) as the
    /// second drive.
    #[arg(long, requires = "meta_root")]
    meta_image: Option<PathBuf>,
    /// The virtio-fs device relays (husk copies requests and replies
    /// through buffers of its own; guest memory is not shared).
    #[arg(long)]
    relay: bool,
    /// GLIBC_TUNABLES for husk alone (not virtiofsd): for example
    /// `glibc.cpu.x86_rep_movsb_threshold=1073741824` keeps its copies off
    /// `rep movsb`, which QEMU's TCG (the node VM) runs 5-7 times slower
    /// than a vector loop, where hardware runs it at full speed.
    #[arg(long)]
    husk_glibc_tunables: Option<String>,
    /// A guest that prints nothing for this long is taken as stalled:
    /// husk gets SIGTERM (its vCPUs then log where the guest was) and the
    /// run fails with husk's log and the guest's console, rather than
    /// waiting for the node's own timeout, which takes both with it.
    #[arg(long, default_value_t = 120)]
    stall_s: u64,
}

/// Waits for virtiofsd's socket to appear (or virtiofsd to end).
fn wait_for_socket(child: &mut std::process::Child, socket: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if let Some(status) = child.try_wait()? {
            bail!("virtiofsd ended with {status} before listening");
        }
        if Instant::now() > deadline {
            bail!("virtiofsd did not listen on {} in 10 s", socket.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The guest's result lines for /dev/vda and for the share; each ends a
/// measured phase and names its depth.
const BLK_LINE: &str = "HUSK-IO-JSON ";
const FS_LINE: &str = "HUSK-FS-IO-JSON ";
const PHASE_LINES: [&str; 2] = [BLK_LINE, FS_LINE];
/// The metadata runs' result lines, drive then share.
const META_LINES: [(&str, &str); 2] = [
    ("HUSK-META-JSON ", "virtio-blk"),
    ("HUSK-FS-META-JSON ", "virtio-fs"),
];

/// What one husk run left: its console, its stderr, and the node CPU each
/// phase took, by the phase's line prefix and depth.
struct Sampled {
    status: std::process::ExitStatus,
    /// The guest printed nothing for `--stall-s` and husk was stopped.
    stalled: bool,
    console: String,
    stderr: String,
    cpu: std::collections::HashMap<(&'static str, usize), Value>,
}

/// Runs husk to its end, reading its console as it comes; each time the
/// guest prints a phase's result, the CPU time husk's threads (by name:
/// the event loop, where both devices' host side runs, and each vCPU) and
/// virtiofsd used since the last one is that phase's: where a device's
/// cost goes on the node, which throughput alone does not say.
fn run_sampling_cpu(
    husk: &mut Command,
    virtiofsd: u32,
    stall: Duration,
) -> anyhow::Result<Sampled> {
    use std::io::{BufRead, Read};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let mut child = husk.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let pid = child.id();
    // The stall watch: seconds since `start` at the guest's last line.
    let start = Instant::now();
    let last_line = Arc::new(AtomicU64::new(0));
    let (done, stalled) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let watch = {
        let (last_line, done, stalled) = (last_line.clone(), done.clone(), stalled.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(500));
                let quiet = start
                    .elapsed()
                    .as_secs()
                    .saturating_sub(last_line.load(Ordering::Relaxed));
                if quiet >= stall.as_secs() {
                    stalled.store(true, Ordering::Relaxed);
                    eprintln!(
                        "husk-bench fs: the guest printed nothing for {quiet} s; stopping husk"
                    );
                    if let Ok(pid) = libc::pid_t::try_from(pid) {
                        // SAFETY: kill(2) with a pid and a signal number: no
                        // memory is involved; husk is our child, not yet
                        // waited for, so the pid is still its.
                        unsafe { libc::kill(pid, libc::SIGTERM) };
                    }
                    return;
                }
            }
        })
    };
    let mut stderr = child.stderr.take().context("husk's stderr")?;
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let sample = || {
        (
            crate::stats::thread_cpu_seconds(pid),
            crate::stats::cpu_seconds(virtiofsd),
        )
    };
    let mut last = sample();
    let mut console = String::new();
    let mut cpu = std::collections::HashMap::new();
    let stdout = child.stdout.take().context("husk's stdout")?;
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line?;
        last_line.store(start.elapsed().as_secs(), Ordering::Relaxed);
        if let Some((_, device)) = META_LINES.iter().find(|(p, _)| line.trim().starts_with(p)) {
            eprintln!("husk-bench fs: {device} metadata done");
        }
        let phase = PHASE_LINES.iter().find_map(|p| {
            let v: Value = serde_json::from_str(line.trim().strip_prefix(p)?).ok()?;
            Some((*p, usize::try_from(v["depth"].as_u64()?).ok()?))
        });
        if let Some(key) = phase {
            // Progress on stderr: when a guest stalls and the node's
            // timeout ends the run, this says how far it got.
            let device = if key.0 == FS_LINE {
                "virtio-fs"
            } else {
                "virtio-blk"
            };
            eprintln!("husk-bench fs: {device} at depth {} done", key.1);
            let now = sample();
            let r = |x: f64| (x * 100.0).round() / 100.0;
            let husk: serde_json::Map<String, Value> = now
                .0
                .iter()
                .map(|(name, t)| {
                    let before = last.0.get(name).copied().unwrap_or(0.0);
                    (name.clone(), json!(r(t - before)))
                })
                .collect();
            cpu.insert(key, json!({"husk": husk, "virtiofsd": r(now.1 - last.1)}));
            last = now;
        }
        console.push_str(&line);
        console.push('\n');
    }
    let status = child.wait()?;
    done.store(true, Ordering::Relaxed);
    let _ = watch.join();
    Ok(Sampled {
        status,
        stalled: stalled.load(Ordering::Relaxed),
        console,
        stderr: stderr.join().unwrap_or_default(),
        cpu,
    })
}

/// Runs the benchmark; the JSON it prints.
pub fn fs(b: FsBench) -> anyhow::Result<Value> {
    b.load.check()?;
    let load = &b.load;
    let dir = std::env::current_dir()?;
    let disk = dir.join("husk-fs-bench.img");
    let share = dir.join("husk-fs-bench-share");
    let socket = dir.join("husk-fs-bench.sock");
    let bytes = vec![0x5au8; (load.size_mib << 20) as usize];
    std::fs::create_dir_all(&share)?;
    std::fs::write(&disk, &bytes).with_context(|| format!("cannot create {}", disk.display()))?;
    let shared_file = share.join("bench.bin");
    std::fs::write(&shared_file, &bytes)
        .with_context(|| format!("cannot create {}", shared_file.display()))?;
    drop(bytes);
    let _ = std::fs::remove_file(&socket);
    let meta_disk = dir.join("husk-fs-bench-meta.img");
    if let (Some(root), Some(image)) = (&b.meta_root, &b.meta_image) {
        let copied = Command::new("cp")
            .arg("-a")
            .arg(root.join("."))
            .arg(&share)
            .status()?;
        if !copied.success() {
            bail!("cannot copy {} into the share", root.display());
        }
        std::fs::copy(image, &meta_disk)
            .with_context(|| format!("cannot copy {}", image.display()))?;
    }

    // The chroot sandbox: the namespace one pivots its root, which Linux
    // refuses on an initramfs root such as the node VM's; throughput does
    // not depend on it.
    let mut virtiofsd = Command::new(&b.virtiofsd)
        .arg(format!("--socket-path={}", socket.display()))
        .arg(format!("--shared-dir={}", share.display()))
        .args(["--sandbox=chroot", "--cache=auto", "--log-level=error"])
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", b.virtiofsd.display()))?;
    let virtiofsd_pid = virtiofsd.id();
    let result = wait_for_socket(&mut virtiofsd, &socket).and_then(|()| {
        let depths = load.depth_list();
        let mut husk = Command::new(&b.husk);
        if let Some(t) = &b.husk_glibc_tunables {
            husk.env("GLIBC_TUNABLES", t);
        }
        husk.args(["boot", "--mem-mib", "512", "--kernel"])
            .arg(&b.kernel)
            .arg("--initrd")
            .arg(&b.initrd)
            .arg("--cmdline")
            .arg(format!(
                "console=ttyS0 reboot=k panic=1 pci=off quiet husk.io_depths={depths}"
            ))
            .arg("--drive")
            .arg(format!("id=bench,path={}", disk.display()))
            .args(
                b.meta_image
                    .as_ref()
                    .map(|_| {
                        [
                            "--drive".to_string(),
                            format!("id=meta,path={}", meta_disk.display()),
                        ]
                    })
                    .into_iter()
                    .flatten(),
            )
            .arg("--fs")
            .arg(format!(
                "tag=bench,socket={},relay={}",
                socket.display(),
                if b.relay { "on" } else { "off" }
            ))
            .stdin(Stdio::null());
        run_sampling_cpu(&mut husk, virtiofsd_pid, Duration::from_secs(b.stall_s))
            .with_context(|| format!("cannot run {}", b.husk.display()))
    });
    // virtiofsd serves one VM and ends with it; make sure.
    let _ = virtiofsd.kill();
    let _ = virtiofsd.wait();
    let _ = std::fs::remove_file(&disk);
    let _ = std::fs::remove_file(&meta_disk);
    let _ = std::fs::remove_dir_all(&share);
    let _ = std::fs::remove_file(&socket);
    let out = result?;
    let console = out.console;
    if out.stalled || !out.status.success() {
        let lines: Vec<&str> = console.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        let stalled = if out.stalled {
            format!("the guest stalled (nothing printed for {} s); ", b.stall_s)
        } else {
            String::new()
        };
        bail!(
            "{stalled}husk exited with {}; its log:\n{}\nthe guest's console (its last 40 lines):\n{tail}",
            out.status,
            out.stderr
        );
    }
    let blk = crate::io::guest_results(&console, BLK_LINE)?;
    let fs = crate::io::guest_results(&console, FS_LINE)?;
    let mut runs = Vec::new();
    for &depth in &load.depths {
        let find = |all: &[Value], what: &str| {
            all.iter()
                .find(|g| g["depth"] == depth)
                .cloned()
                .with_context(|| {
                    format!("the guest printed no {what} result for depth {depth}:\n{console}")
                })
        };
        let (blk, fs) = (find(&blk, "virtio-blk")?, find(&fs, "virtio-fs")?);
        let ratio = crate::io::mib_s_ratio(&fs, &blk);
        runs.push(json!({
            "depth": depth,
            "guest_virtio_blk": blk,
            "guest_virtio_fs": fs,
            "fs_to_blk_ratio": ratio,
            "node_cpu_s": {
                "virtio_blk": out.cpu.get(&(BLK_LINE, depth)),
                "virtio_fs": out.cpu.get(&(FS_LINE, depth)),
            },
        }));
    }
    let metadata = if b.meta_image.is_some() {
        let one = |prefix: &str, what: &str| {
            crate::io::guest_results(&console, prefix)?
                .into_iter()
                .next()
                .with_context(|| format!("the guest printed no {what} metadata result:\n{console}"))
        };
        let (blk, fs) = (
            one("HUSK-META-JSON ", "virtio-blk")?,
            one("HUSK-FS-META-JSON ", "virtio-fs")?,
        );
        let mut ratio = serde_json::Map::new();
        for (k, x, y) in [
            ("create_s", &fs["create_s"], &blk["create_s"]),
            ("stat_s", &fs["stat_s"], &blk["stat_s"]),
            ("tar_s", &fs["tar"]["tar_s"], &blk["tar"]["tar_s"]),
            ("remove_s", &fs["remove_s"], &blk["remove_s"]),
        ] {
            if let (Some(x), Some(y)) = (x.as_f64(), y.as_f64()) {
                if y > 0.0 {
                    ratio.insert(k.into(), json!((x / y * 100.0).round() / 100.0));
                }
            }
        }
        json!({"guest_virtio_blk_ext4": blk, "guest_virtio_fs": fs, "fs_to_blk_time_ratio": ratio})
    } else {
        Value::Null
    };
    Ok(json!({
        "benchmark": "virtio-fs",
        "virtiofsd": "--sandbox=chroot --cache=auto",
        "relay": b.relay,
        "husk_glibc_tunables": b.husk_glibc_tunables,
        "size_mib": load.size_mib,
        "runtime_s_per_pattern": load.runtime_s,
        "runs": runs,
        "metadata": metadata,
    }))
}
