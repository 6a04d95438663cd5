//! `husk-bench`: benchmarks as commands that print JSON.
//!
//! `husk-bench blk` runs `husk-bench io` inside a guest against a
//! virtio-blk drive and directly against the drive's backing file, and
//! reports both and their ratio.
//!
//! `husk-bench net` measures TCP throughput between a guest and the node
//! through virtio-net and a tap, both ways (see `net`).
//! `husk-bench vsock` boots a guest that runs `husk-bench vsock-serve` and
//! measures streams through husk's vsock in both directions;
//! `vsock-serve` and `vsock-client` are the two ends, usable on their own
//! (the integration tests use them).
//!
//! `husk-bench run` times `husk run` (and `runc run` of the same image) to
//! the container's first output byte, and in one guest the agent's
//! container starts and memory (see `run`).
//!
//! `husk-bench pod` starts pods through containerd with husk's shim and
//! with runc's, and measures start latency, memory and concurrency (see
//! `pod`).
//!
//! `husk-bench hotplug` times a guest's plugging and unplugging of
//! virtio-mem memory (see `hotplug`).
//!
//! `husk-bench soak` creates VMs one after another and classifies how each
//! ended (see `soak`); `soak-report` turns its lines and the node VM's
//! record of its own failures into rates per thousand creations.
//!
//! `husk-bench boot` starts `husk boot` N times and measures, per run, the
//! wall time from spawning the VMM process to the guest's first user-space
//! line (the marker the test init prints first), the VMM's own setup time
//! before the first vCPU entry (reported by `husk boot --timings`), and the
//! VMM's resident memory beyond guest RAM, read from /proc/PID/smaps while
//! the guest is up (mappings exactly the size of a guest RAM region are guest
//! memory; everything else is overhead).

mod api;
mod fs;
mod hotplug;
mod io;
mod kernel_text;
mod meta;
mod net;
mod pod;
mod run;
mod snapshot;
mod soak;
mod stats;
mod vsock;

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "husk-bench",
    about = "husk benchmarks; each prints one JSON document"
)]
struct Cli {
    #[command(subcommand)]
    command: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Boot time, VMM setup time and VMM memory overhead over repeated boots.
    Boot(BootBench),
    /// I/O load on a file or block device: sequential MiB/s, 4 KiB random IOPS.
    Io(IoArgs),
    /// Metadata load on a directory: small files created and stat-ed, a tree tarred.
    Meta(MetaArgs),
    /// virtio-blk in a guest against the same backing file used directly.
    Blk(BlkBench),
    /// virtio-fs (virtiofsd) against virtio-blk in the same guest.
    Fs(fs::FsBench),
    /// REST API request latency (and InstanceStart to first vCPU entry).
    Api(api::ApiBench),
    /// virtio-net TCP throughput between a guest and the node, over a tap.
    Net(net::NetBench),
    /// Creates a persistent tap (set-up helper, prints nothing).
    Tap(net::TapArgs),
    /// vsock throughput, host->guest and guest->host, through husk's unix socket.
    Vsock(VsockBench),
    /// `husk run` to the container's first output byte (against `runc run`),
    /// and in a guest the agent's container start latency and memory.
    Run(run::RunBench),
    /// Pods through containerd: husk's shim against runc's (start latency,
    /// memory per pod, many pods at once).
    Pod(pod::PodBench),
    /// Memory hot-plug: PATCH /hotplug/memory to the guest having the memory
    /// plugged (and unplugged again), per size.
    Hotplug(hotplug::HotplugBench),
    /// Snapshots: create time, file sizes, and restore time (load request to
    /// the guest answering through vsock), for husk and optionally Firecracker.
    Snapshot(snapshot::SnapshotBench),
    /// Many VM creations in a row (boot, vsock streams, exit), each classified:
    /// ok, triple fault, stall, stuck, failed; with the timers' re-serve counts.
    Soak(soak::SoakBench),
    /// The report of one or more soak runs' SOAK-RUN lines and run.sh's
    /// record of the node VM's own failures.
    SoakReport(soak::SoakReportArgs),
    /// Whether the guest kernel's code or read-only data changed between
    /// two snapshots' memory files of one VM (a VMM writing memory it does
    /// not own).
    KernelText(kernel_text::KernelTextArgs),
    /// Serve vsock test streams (echo, upload, download) until told to quit.
    VsockServe(VsockServeArgs),
    /// Open concurrent vsock test streams and check every byte.
    VsockClient(VsockClientArgs),
}

#[derive(clap::Args)]
struct MetaArgs {
    /// The directory to work in (on the filesystem measured).
    #[arg(long)]
    dir: PathBuf,
    /// How many 4 KiB files to create and stat.
    #[arg(long, default_value_t = 1000)]
    files: u32,
    /// A tree to `tar c` (cold cache), for example a busybox root.
    #[arg(long)]
    tree: Option<PathBuf>,
}

#[derive(clap::Args)]
struct VsockServeArgs {
    /// vsock:PORT (in a guest) or unix:PATH (on the host, e.g. UDS_PORT).
    #[arg(long)]
    listen: String,
}

#[derive(clap::Args)]
struct VsockClientArgs {
    /// vsock:CID:PORT (in a guest) or uds:PATH:PORT (husk's socket, on the host).
    #[arg(long)]
    connect: vsock::Target,
    /// echo, echo-open (an echo that does not half-close: what a VMM
    /// without half-close runs), upload, download, flood (upload of zeros the server counts
    /// but does not check: as fast as the transport goes), probe (one
    /// connect attempt, timed), hold (one stream kept open until it ends;
    /// says how) or quit.
    #[arg(long, default_value = "echo")]
    mode: String,
    /// Concurrent streams.
    #[arg(long, default_value_t = 1)]
    streams: usize,
    /// Bytes in all, split over the streams.
    #[arg(long, default_value_t = 1 << 20)]
    bytes: u64,
    /// Keep retrying the first connection this long (the server may not be up yet).
    #[arg(long, default_value_t = 0)]
    retry_s: u64,
}

#[derive(clap::Args)]
struct VsockBench {
    #[command(flatten)]
    guest: vsock::VsockGuest,
    /// The guest port the server listens on.
    #[arg(long, default_value_t = 5201)]
    port: u32,
    /// MiB per run.
    #[arg(long, default_value_t = 64)]
    size_mib: u64,
    /// Streams of the multi-stream runs.
    #[arg(long, default_value_t = 8)]
    streams: usize,
}

#[derive(clap::Args)]
struct IoArgs {
    /// File or block device.
    #[arg(long)]
    path: PathBuf,
    /// How much of it to use.
    #[arg(long, default_value_t = 128)]
    size_mib: u64,
    /// Seconds per pattern.
    #[arg(long, default_value_t = 5)]
    runtime_s: u64,
    /// Requests in flight (one thread each).
    #[arg(long, default_value_t = 1)]
    depth: usize,
}

#[derive(clap::Args)]
struct BlkBench {
    /// The husk binary.
    #[arg(long, default_value = "husk")]
    husk: PathBuf,
    /// Guest kernel.
    #[arg(long)]
    kernel: PathBuf,
    /// Guest initramfs whose /husk-test.sh runs `husk-bench io` on /dev/vda
    /// once per depth listed in `husk.io_depths=` on its kernel command
    /// line, printing each JSON after `HUSK-IO-JSON ` (resources/bench.sh
    /// makes it).
    #[arg(long)]
    initrd: PathBuf,
    /// Each depth is measured in the guest and in the node.
    #[command(flatten)]
    load: io::Load,
}

/// Which VMM `husk-bench boot` (and `soak`) launches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum VmmKind {
    /// husk boot.
    Husk,
    /// Firecracker (--no-api --config-file), for comparison on the same guest.
    Firecracker,
}

impl VmmKind {
    /// As reports name it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            VmmKind::Husk => "husk",
            VmmKind::Firecracker => "firecracker",
        }
    }
}

#[derive(clap::Args)]
struct BootBench {
    /// The husk binary.
    #[arg(long, default_value = "husk")]
    husk: PathBuf,
    /// The VMM to measure.
    #[arg(long, value_enum, default_value = "husk")]
    vmm: VmmKind,
    /// The Firecracker binary, with --vmm firecracker.
    #[arg(long, default_value = "firecracker")]
    firecracker: PathBuf,
    /// Guest kernel.
    #[arg(long)]
    kernel: PathBuf,
    /// Guest initramfs whose /init prints the marker first.
    #[arg(long)]
    initrd: PathBuf,
    /// Number of boots.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// vCPUs per guest.
    #[arg(long, default_value_t = 1)]
    vcpus: usize,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    mem_mib: u64,
    /// Kernel command line (`husk.hold=1` is appended so the guest stays up
    /// while its VMM's memory is read).
    #[arg(long, default_value = "console=ttyS0 reboot=k panic=1 pci=off quiet")]
    cmdline: String,
    /// The line that marks the guest's first user-space output.
    #[arg(long, default_value = "HUSK-GUEST-READY")]
    marker: String,
}

struct Sample {
    to_marker_ms: f64,
    /// Only husk reports these.
    setup_ms: Option<f64>,
    image_load_ms: Option<f64>,
    rss_overhead_kib: u64,
    guest_rss_kib: u64,
}

/// Sums the Rss of the mappings in an smaps dump, split into (overhead,
/// guest) by whether a mapping is a guest RAM region's size (or up to 2 MiB
/// more, merged with a neighbour).
fn split_rss(smaps: &str, guest_region_sizes: &[u64]) -> (u64, u64) {
    let (mut overhead, mut guest) = (0u64, 0u64);
    let mut current_is_guest = false;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or("");
        if let Some((start, end)) = first.split_once('-') {
            if let (Ok(s), Ok(e)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16)) {
                // The kernel may merge a guest region with a small
                // neighbouring anonymous mapping (a thread's stack): a
                // region up to 2 MiB larger counts as guest memory.
                let size = e.saturating_sub(s);
                current_is_guest = guest_region_sizes
                    .iter()
                    .any(|&g| size >= g && size < g + (2 << 20));
                continue;
            }
        }
        if first == "Rss:" {
            let kib: u64 = fields.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            if current_is_guest {
                guest += kib;
            } else {
                overhead += kib;
            }
        }
    }
    (overhead, guest)
}

fn guest_region_sizes(mem_mib: u64) -> Vec<u64> {
    const GAP_START: u64 = 0x8000_0000;
    let size = mem_mib << 20;
    if size <= GAP_START {
        vec![size]
    } else {
        vec![GAP_START, size - GAP_START]
    }
}

/// The command that boots the guest with the VMM under test.
fn vmm_command(b: &BootBench, cmdline: &str) -> anyhow::Result<Command> {
    match b.vmm {
        VmmKind::Husk => {
            let mut c = Command::new(&b.husk);
            c.args(["boot", "--timings", "--kernel"])
                .arg(&b.kernel)
                .arg("--initrd")
                .arg(&b.initrd)
                .args(["--vcpus", &b.vcpus.to_string()])
                .args(["--mem-mib", &b.mem_mib.to_string()])
                .args(["--cmdline", cmdline]);
            Ok(c)
        }
        VmmKind::Firecracker => {
            let config = json!({
                "boot-source": {
                    "kernel_image_path": b.kernel,
                    "initrd_path": b.initrd,
                    "boot_args": cmdline,
                },
                "drives": [],
                "machine-config": { "vcpu_count": b.vcpus, "mem_size_mib": b.mem_mib, "smt": false },
            });
            let path =
                std::env::temp_dir().join(format!("husk-bench-fc-{}.json", std::process::id()));
            std::fs::write(&path, config.to_string())?;
            let mut c = Command::new(&b.firecracker);
            c.args(["--no-api", "--level", "Error", "--config-file"])
                .arg(path);
            Ok(c)
        }
    }
}

fn one_boot(b: &BootBench) -> anyhow::Result<Sample> {
    let cmdline = format!("{} husk.hold=1", b.cmdline);
    let mut command = vmm_command(b, &cmdline)?;
    let start = Instant::now();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start the {:?} VMM", b.vmm))?;
    let pid = child.id();
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut to_marker = None;
    let mut rss = None;
    for line in lines.by_ref() {
        let line = line.context("reading the guest console")?;
        if to_marker.is_none() && line.contains(&b.marker) {
            to_marker = Some(start.elapsed());
            let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
                .context("reading the VMM's smaps")?;
            rss = Some(split_rss(&smaps, &guest_region_sizes(b.mem_mib)));
        }
    }
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .context("no stderr")?
        .read_to_string(&mut stderr)?;
    let status = child.wait()?;
    if !status.success() {
        bail!("the {:?} VMM exited with {status}: {stderr}", b.vmm);
    }
    let (Some(to_marker), Some((rss_overhead_kib, guest_rss_kib))) = (to_marker, rss) else {
        bail!("the guest never printed {}", b.marker);
    };
    let (setup_ms, image_load_ms) = if b.vmm == VmmKind::Husk {
        let timings: serde_json::Value = stderr
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str(l).ok())
            .context("husk printed no timings")?;
        let ms = |key: &str| {
            timings[key]
                .as_u64()
                .map(|us| us as f64 / 1e3)
                .with_context(|| format!("timings lack {key}"))
        };
        (
            Some(ms("setup_before_first_vcpu_entry_us")?),
            Some(ms("guest_image_load_us")?),
        )
    } else {
        (None, None)
    };
    Ok(Sample {
        to_marker_ms: to_marker.as_secs_f64() * 1e3,
        setup_ms,
        image_load_ms,
        rss_overhead_kib,
        guest_rss_kib,
    })
}

fn boot(b: BootBench) -> anyhow::Result<serde_json::Value> {
    if b.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let mut samples = Vec::with_capacity(b.runs);
    for i in 0..b.runs {
        samples.push(one_boot(&b).with_context(|| format!("boot {} of {}", i + 1, b.runs))?);
    }
    let col = |f: fn(&Sample) -> f64| stats::summary(&samples.iter().map(f).collect::<Vec<_>>());
    let opt = |f: fn(&Sample) -> Option<f64>| {
        stats::summary(&samples.iter().filter_map(f).collect::<Vec<_>>())
    };
    Ok(json!({
        "benchmark": "boot",
        "vmm": format!("{:?}", b.vmm).to_lowercase(),
        "runs": b.runs,
        "guest": {
            "vcpus": b.vcpus,
            "mem_mib": b.mem_mib,
            "kernel": b.kernel,
            "initrd": b.initrd,
            "cmdline": b.cmdline,
        },
        "boot_to_user_space_ms": col(|s| s.to_marker_ms),
        "setup_before_first_vcpu_entry_ms": opt(|s| s.setup_ms),
        "guest_image_load_ms": opt(|s| s.image_load_ms),
        "setup_without_image_load_ms": opt(|s| Some(s.setup_ms? - s.image_load_ms?)),
        "vmm_rss_overhead_kib": col(|s| s.rss_overhead_kib as f64),
        "guest_rss_kib": col(|s| s.guest_rss_kib as f64),
    }))
}

fn blk(b: BlkBench) -> anyhow::Result<serde_json::Value> {
    b.load.check()?;
    let load = &b.load;
    let disk = std::env::current_dir()?.join("husk-blk-bench.img");
    std::fs::write(&disk, vec![0x5au8; (load.size_mib << 20) as usize])
        .with_context(|| format!("cannot create {}", disk.display()))?;
    let runtime = std::time::Duration::from_secs(load.runtime_s);
    let host = load
        .depths
        .iter()
        .map(|&depth| io::io(&disk, load.size_mib, runtime, depth))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let depths = load.depth_list();

    let out = Command::new(&b.husk)
        .args(["boot", "--mem-mib", "256", "--kernel"])
        .arg(&b.kernel)
        .arg("--initrd")
        .arg(&b.initrd)
        .arg("--cmdline")
        .arg(format!(
            "console=ttyS0 reboot=k panic=1 pci=off quiet husk.io_depths={depths}"
        ))
        .arg("--drive")
        .arg(format!("id=bench,path={}", disk.display()))
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start {}", b.husk.display()))?;
    let _ = std::fs::remove_file(&disk);
    let console = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "husk exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let guest = io::guest_results(&console, "HUSK-IO-JSON ")?;

    let mut runs = Vec::new();
    for (&depth, host) in load.depths.iter().zip(host) {
        let guest = guest
            .iter()
            .find(|g| g["depth"] == depth)
            .with_context(|| format!("the guest printed no HUSK-IO-JSON line for depth {depth}"))?;
        let ratio = io::mib_s_ratio(guest, &host);
        runs.push(json!({
            "depth": depth,
            "guest_virtio_blk": guest,
            "host_same_file": host,
            "guest_to_host_ratio": ratio,
        }));
    }
    Ok(json!({
        "benchmark": "virtio-blk",
        "size_mib": load.size_mib,
        "runtime_s_per_pattern": load.runtime_s,
        "runs": runs,
    }))
}

fn main() -> std::process::ExitCode {
    match dispatch(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The error and its causes, once each, on one line.
            eprintln!("husk-bench: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs one command; what it measured goes to stdout.
fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let out = match cli.command {
        Bench::Boot(b) => boot(b)?,
        Bench::Blk(b) => blk(b)?,
        Bench::Fs(b) => fs::fs(b)?,
        Bench::Api(b) => api::run(&b)?,
        Bench::Run(b) => run::run(b)?,
        Bench::Pod(b) => pod::pod(b)?,
        Bench::Snapshot(b) => snapshot::snapshot(b)?,
        Bench::Hotplug(b) => hotplug::run(b)?,
        Bench::Soak(b) => soak::soak(b)?,
        Bench::SoakReport(a) => soak::soak_report(a)?,
        Bench::KernelText(a) => kernel_text::kernel_text(a)?,
        Bench::Net(b) => net::net(b)?,
        Bench::Tap(a) => return net::tap(a),
        Bench::Vsock(b) => vsock::bench(&b.guest, b.port, b.size_mib, b.streams)?,
        Bench::VsockServe(a) => {
            vsock::serve(&a.listen)?;
            return Ok(());
        }
        Bench::VsockClient(a) => {
            let v = vsock::client(
                &a.connect,
                &a.mode,
                a.streams,
                a.bytes,
                std::time::Duration::from_secs(a.retry_s),
            )?;
            // One line: it is read back from a guest console.
            println!("{v}");
            return Ok(());
        }
        Bench::Meta(a) => {
            // One line: it is read back from a guest console.
            println!("{}", meta::meta(&a.dir, a.files, a.tree.as_deref())?);
            return Ok(());
        }
        Bench::Io(a) => {
            // One line: it is read back from a guest console.
            let v = io::io(
                &a.path,
                a.size_mib,
                std::time::Duration::from_secs(a.runtime_s),
                a.depth,
            )?;
            println!("{v}");
            return Ok(());
        }
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_split_by_region_size() {
        let smaps = "\
55d000000000-55d000001000 r-xp 00000000 08:01 1 /usr/bin/husk
Size:                  4 kB
Rss:                   4 kB
7f0000000000-7f0008000000 rw-p 00000000 00:00 0
Size:             131072 kB
Rss:               20480 kB
7f0010000000-7f0010100000 rw-p 00000000 00:00 0
Rss:                 900 kB
";
        assert_eq!(split_rss(smaps, &guest_region_sizes(128)), (904, 20480));
        // 128 MiB merged with a 132 KiB neighbour is still guest memory;
        // a mapping 4 MiB larger is not.
        let merged = "\
7f0000000000-7f0008021000 rw-p 00000000 00:00 0
Rss:               19172 kB
7f1000000000-7f1008400000 rw-p 00000000 00:00 0
Rss:                 100 kB
";
        assert_eq!(split_rss(merged, &guest_region_sizes(128)), (100, 19172));
    }

    #[test]
    fn region_sizes_follow_the_gap() {
        assert_eq!(guest_region_sizes(128), vec![128 << 20]);
        assert_eq!(guest_region_sizes(3072), vec![2 << 30, 1 << 30]);
    }
}
