//! `husk-bench soak`: many VM creations in a row, each one classified, so
//! that rare failures get rates instead of anecdotes.
//!
//! Each creation boots a guest whose /husk-test.sh serves vsock test
//! streams (`husk-bench vsock-serve`, as `husk-bench vsock` does), checks
//! one small echo stream (without half-close, since 2026-12-05: the same
//! streams run on Firecracker, which has none) through husk's vsock (every `--stress-every`-th
//! creation: `--streams` concurrent echo streams instead), tells the
//! server to quit, and waits for husk to exit with the guest's reset. The
//! outcome of each is one of:
//!
//! - `ok`;
//! - `triple_fault`: husk ended with the exit code of a guest triple fault;
//! - `stall`: a stream timed out (the guest stopped answering: the vsock
//!   stall of docs/devices.md, or a guest stuck elsewhere);
//! - `stuck`: the streams were fine but husk did not exit after the quit;
//! - `failed`: anything else (husk's or the stream's error, quoted).
//!
//! A VMM that has to be stopped gets SIGTERM first (husk then logs where
//! each vCPU was and writes its final metrics), SIGKILL only if it does
//! not exit; a creation that did not end well keeps the last lines of the
//! VMM's log and of the guest's serial console in its record.
//!
//! The husk of each creation writes its metrics at exit; the
//! `*_found_by_timer` counters (lost queue notifications husk's
//! one-second timers found) are summed per creation.
//! Each creation is one `SOAK-RUN {json}` line on stdout as it ends, so a
//! node VM that fails half-way loses nothing it measured;
//! `husk-bench soak-report` adds those lines and resources/node/run.sh's
//! record of the node's own failures (resources/bench.sh soak) into the
//! rates per thousand creations.
//!
//! `--vmm firecracker --firecracker PATH` runs the same creations with a
//! Firecracker binary the user provides (same configuration file, same
//! guest, same vsock protocol), so that each failure class can be put on
//! the VMM or on what runs it by measurement; `--vmm husk,firecracker`
//! has them take turns, so both meet the same node in the same state (the
//! report then has each one's counts under `by_vmm`).
//!
//! A stalled guest is examined before its VMM is stopped: paused and
//! snapshotted through the VMM's API, its kernel's `.text` and `.rodata`
//! compared with those of a healthy husk guest snapshotted earlier in the
//! same soak (`husk-bench kernel-text`), and, from the registers husk logs
//! at SIGTERM, its instruction and stack pointers walked through the
//! guest's own page tables in the snapshot (`forensics` in the record): a
//! device that wrote where it must not shows in the first, a vCPU whose
//! state was lost in the second. Last, the node kernel's guest-entry
//! function (`__svm_vcpu_run` in /proc/kallsyms) is looked for in the
//! logged rip and, as a 64-bit value, anywhere in the snapshot's vCPU
//! state (so for Firecracker too): a guest whose vCPU holds the node's
//! own return address from VMRUN is running the node's state, not its
//! own, which no VMM can cause (`node_state`). Firecracker ends on a guest
//! triple fault with its generic error code and logs the unexpected
//! `Shutdown` exit, which is how its triple faults are told apart; it has
//! no such timers (its `found_by_timer` is 0).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Map, Value};

use crate::api::Api;
use crate::kernel_text;
use crate::vsock::{self, Target};
use crate::VmmKind;

/// husk's exit code for a guest's triple fault (vmm::exit::VmExit).
const TRIPLE_FAULT_EXIT: i32 = 3;
/// How long a creation's husk may take to exit once its guest was told to
/// quit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a VMM whose streams broke (not timed out) may take to exit
/// by itself before it is stopped.
const DEATH_GRACE: Duration = Duration::from_secs(5);
/// The guest port the stream server listens on.
const PORT: u32 = 5201;
/// What Firecracker logs when a vCPU gets KVM_EXIT_SHUTDOWN (a triple
/// fault): it has no exit code of its own for one.
const FIRECRACKER_SHUTDOWN_LOG: &str = "Unexpected exit reason on vcpu run: Shutdown";

#[derive(clap::Args)]
pub struct SoakBench {
    /// Its server listens on port 5201.
    #[command(flatten)]
    guest: vsock::VsockGuest,
    /// VM creations.
    #[arg(long, default_value_t = 100)]
    runs: usize,
    /// Every Nth creation runs the stress (0: never).
    #[arg(long, default_value_t = 5)]
    stress_every: usize,
    /// Concurrent echo streams of the stress.
    #[arg(long, default_value_t = 32)]
    streams: usize,
    /// MiB the stress echoes, over all its streams.
    #[arg(long, default_value_t = 32)]
    stress_mib: u64,
    /// Where each creation's files go (config, sockets, metrics, log).
    #[arg(long, default_value = "soak")]
    dir: PathBuf,
    /// The VMMs that run the guests, taking turns creation by creation
    /// (`husk,firecracker`: the two share every node boot and whatever
    /// state the node is in).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "husk")]
    vmm: Vec<VmmKind>,
    /// The Firecracker binary, with --vmm firecracker.
    #[arg(long, default_value = "firecracker")]
    firecracker: PathBuf,
}

/// The VMM's exit code in husk's terms: Firecracker's generic error with
/// its log's `Shutdown` line is a triple fault.
fn exit_in_husk_terms(vmm: VmmKind, exit: Option<i32>, log: &str) -> Option<i32> {
    match (vmm, exit) {
        (VmmKind::Firecracker, Some(c)) if c != 0 && log.contains(FIRECRACKER_SHUTDOWN_LOG) => {
            Some(TRIPLE_FAULT_EXIT)
        }
        _ => exit,
    }
}

/// How one creation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    TripleFault,
    GuestPanic,
    Stall,
    Stuck,
    Failed,
}

impl Outcome {
    const ALL: [Outcome; 6] = [
        Outcome::Ok,
        Outcome::TripleFault,
        Outcome::GuestPanic,
        Outcome::Stall,
        Outcome::Stuck,
        Outcome::Failed,
    ];

    fn name(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::TripleFault => "triple_fault",
            Outcome::GuestPanic => "guest_panic",
            Outcome::Stall => "stall",
            Outcome::Stuck => "stuck",
            Outcome::Failed => "failed",
        }
    }
}

/// The outcome from what was seen: husk's exit code (None: it had to be
/// stopped), the streams' error, if any, whether that error was a
/// timeout, and whether the guest's kernel said it panicked. A guest
/// whose streams failed while its VMM kept running, past the grace a
/// dying one gets, stopped answering: a stall, timed out or not (a
/// connection the VMM closed because the guest never took it).
fn classify(
    exit: Option<i32>,
    stream_error: Option<&str>,
    timed_out: bool,
    guest_panicked: bool,
) -> Outcome {
    match (exit, stream_error) {
        (Some(TRIPLE_FAULT_EXIT), _) => Outcome::TripleFault,
        _ if guest_panicked => Outcome::GuestPanic,
        (_, Some(_)) if timed_out => Outcome::Stall,
        (None, Some(_)) => Outcome::Stall,
        (_, Some(_)) => Outcome::Failed,
        (None, None) => Outcome::Stuck,
        (Some(0), None) => Outcome::Ok,
        (Some(_), None) => Outcome::Failed,
    }
}

/// What a guest kernel prints when it panics (with `panic=1 reboot=k` it
/// then reboots, which ends its VMM with status 0).
const GUEST_PANIC: &str = "Kernel panic - not syncing";

/// Whether a stream error says it waited too long (the socket timeouts of
/// `vsock::connect`), as opposed to a refusal or a checksum mismatch.
fn is_timeout(error: &str) -> bool {
    let e = error.to_ascii_lowercase();
    e.contains("timed out") || e.contains("would block") || e.contains("temporarily unavailable")
}

/// The sum of every counter named `*_found_by_timer` in a metrics line.
fn found_by_timer(metrics: &Value) -> u64 {
    match metrics {
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| match v {
                Value::Number(n) if k.ends_with("_found_by_timer") => n.as_u64().unwrap_or(0),
                _ => found_by_timer(v),
            })
            .sum(),
        _ => 0,
    }
}

/// The last line of husk's metrics file, as JSON (Null if none).
fn last_metrics(path: &Path) -> Value {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(str::to_string)
        })
        .and_then(|l| serde_json::from_str(&l).ok())
        .unwrap_or(Value::Null)
}

/// Polls the VMM until it exits (Some(its exit code)), `done` holds or
/// `timeout` passes (None).
fn wait_for(
    vmm: &mut Child,
    timeout: Duration,
    done: impl Fn() -> bool,
) -> anyhow::Result<Option<i32>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = vmm.try_wait()? {
            return Ok(Some(status.code().unwrap_or(-1)));
        }
        if done() || Instant::now() > deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// How long a VMM that had to be stopped gets to exit on SIGTERM (husk
/// logs where each vCPU was and writes its final metrics) before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(5);

/// The VMM's exit code once it exits, within `timeout`; None if it had to
/// be stopped (SIGTERM, then SIGKILL after [`TERM_GRACE`]).
fn wait_exit(vmm: &mut Child, timeout: Duration) -> anyhow::Result<Option<i32>> {
    if let Some(code) = wait_for(vmm, timeout, || false)? {
        return Ok(Some(code));
    }
    if let Ok(pid) = libc::pid_t::try_from(vmm.id()) {
        // SAFETY: kill(2) on our own child, not yet reaped (try_wait saw it
        // running), so the pid is still its.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    if wait_for(vmm, TERM_GRACE, || false)?.is_none() {
        let _ = vmm.kill();
        let _ = vmm.wait();
    }
    Ok(None)
}

/// The last `n` lines of a file, for a creation that did not end well.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// Pauses the VM behind `api` and writes a full snapshot as `<name>.state`
/// and `<name>.mem` in `dir`; returns the memory file.
fn snapshot(api: &mut Api, dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    api.expect("PATCH", "/vm", json!({"state": "Paused"}), 204)?;
    let mem = dir.join(format!("{name}.mem"));
    api.expect(
        "PUT",
        "/snapshot/create",
        json!({"snapshot_type": "Full",
               "snapshot_path": dir.join(format!("{name}.state")),
               "mem_file_path": mem}),
        204,
    )?;
    Ok(mem)
}

/// `key=value` fields of the last line of `log` holding `marker` (husk's
/// structured log), as numbers where they are hex.
fn log_fields(log: &str, marker: &str) -> Map<String, Value> {
    let mut out = Map::new();
    if let Some(line) = log.lines().rev().find(|l| l.contains(marker)) {
        for (k, v) in line.split_whitespace().filter_map(|w| w.split_once('=')) {
            let n = v
                .strip_prefix("0x")
                .and_then(|h| u64::from_str_radix(h, 16).ok());
            out.insert(k.into(), n.map_or_else(|| json!(v), |n| json!(n)));
        }
    }
    out
}

/// What can be learnt about a stalled guest from a snapshot of it taken
/// before its VMM was stopped: whether its kernel's code and read-only
/// data still equal `reference`'s (a healthy VM's, same kernel), and where
/// the instruction and stack pointers husk logged at SIGTERM lead through
/// the guest's own page tables.
fn forensics(b: &SoakBench, mem: &Path, reference: Option<&Path>, log: &str) -> Value {
    let mut out = json!({});
    // Read once for the comparison and both walks (tens of MiB).
    let kernel = kernel_text::Kernel::read(&b.guest.kernel);
    let text = |f: &dyn Fn(&kernel_text::Kernel) -> anyhow::Result<Value>| match &kernel {
        Ok(k) => f(k).unwrap_or_else(|e| json!(format!("{e:#}"))),
        Err(e) => json!(format!("{e:#}")),
    };
    out["kernel_text"] = match reference {
        Some(r) => text(&|k| {
            let mut v = kernel_text::compare(k, r, mem, true)?;
            v.as_object_mut().map(|o| o.remove("sections"));
            Ok(v)
        }),
        None => json!("no reference snapshot yet"),
    };
    let regs = log_fields(log, "vCPU stopped by a signal");
    if let (Some(cr3), Some(cr4)) = (regs.get("cr3"), regs.get("cr4")) {
        let (cr3, cr4) = (cr3.as_u64().unwrap_or(0), cr4.as_u64().unwrap_or(0));
        for reg in ["rip", "rsp"] {
            if let Some(va) = regs.get(reg).and_then(Value::as_u64) {
                out[reg] = text(&|k| kernel_text::describe(k, mem, cr3, cr4, va));
            }
        }
    }
    let rip = regs.get("rip").and_then(Value::as_u64);
    out["node_state"] = node_state(
        rip,
        &std::fs::read(mem.with_extension("state")).unwrap_or_default(),
        &std::fs::read_to_string("/proc/kallsyms").unwrap_or_default(),
    );
    out["registers"] = Value::Object(regs);
    out
}

/// The node kernel's function that enters a guest (AMD's VMRUN, Intel's
/// VMLAUNCH/VMRESUME), from the text of /proc/kallsyms: its name, start
/// and end (the next symbol's address). None where the node hides its
/// addresses (all zero) or has no KVM module loaded.
fn node_vcpu_run(kallsyms: &str) -> Option<(String, u64, u64)> {
    let syms: Vec<(u64, &str)> = kallsyms
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let addr = u64::from_str_radix(w.next()?, 16).ok()?;
            let _kind = w.next()?;
            Some((addr, w.next()?))
        })
        .collect();
    let (start, name) = syms
        .iter()
        .find(|(a, n)| *a != 0 && (*n == "__svm_vcpu_run" || *n == "__vmx_vcpu_run"))?;
    let end = syms.iter().map(|(a, _)| *a).filter(|a| a > start).min()?;
    Some((name.to_string(), *start, end))
}

/// Every byte offset of `state` holding a little-endian u64 in `range`.
fn values_in(state: &[u8], range: &std::ops::Range<u64>) -> Vec<(usize, u64)> {
    state
        .windows(8)
        .enumerate()
        .filter_map(|(i, w)| {
            let v = u64::from_le_bytes(w.try_into().ok()?);
            range.contains(&v).then_some((i, v))
        })
        .collect()
}

/// Whether a stalled guest's vCPU holds the node's own state: its
/// instruction pointer in the node kernel's guest-entry function (the
/// return address after VMRUN), which no guest can reach. Looked for in
/// the registers husk logged and, for any VMM, in the vCPU state of its
/// snapshot file (`state`), as a 64-bit value anywhere in it.
fn node_state(rip: Option<u64>, state: &[u8], kallsyms: &str) -> Value {
    let Some((name, start, end)) = node_vcpu_run(kallsyms) else {
        return json!("the node's kallsyms name no guest-entry function");
    };
    let at = |v: u64| format!("{name}+{:#x}", v - start);
    let range = start..end;
    let mut hits: Vec<String> = values_in(state, &range)
        .into_iter()
        .map(|(offset, v)| format!("{} at byte {offset}", at(v)))
        .collect();
    hits.truncate(8);
    json!({
        "function": format!("{name} {start:#x}..{end:#x}"),
        "rip_in_it": rip.filter(|r| range.contains(r)).map(at),
        "in_state_file": hits,
    })
}

/// Where a soak keeps what it learns across creations.
#[derive(Default)]
struct Evidence {
    /// A healthy husk VM's memory after the stress, once taken.
    reference: Option<PathBuf>,
}

fn one(b: &SoakBench, vmm_kind: VmmKind, index: usize, ev: &mut Evidence) -> anyhow::Result<Value> {
    let dir = &b.dir;
    let uds = dir.join("vsock.sock");
    let api = dir.join("api.sock");
    let metrics = dir.join("metrics.json");
    let log = dir.join("husk.log");
    let console = dir.join("console.log");
    for f in [&uds, &api, &metrics] {
        let _ = std::fs::remove_file(f);
    }
    std::fs::write(&metrics, "")?;
    let mut config = json!({
        "boot-source": {
            "kernel_image_path": b.guest.kernel,
            "initrd_path": b.guest.initrd,
            "boot_args": "console=ttyS0 reboot=k panic=1 pci=off quiet",
        },
        "machine-config": { "vcpu_count": 1, "mem_size_mib": 128 },
        "vsock": { "guest_cid": 3, "uds_path": uds },
    });
    match vmm_kind {
        // husk writes them at exit; Firecracker only once a minute.
        VmmKind::Husk => config["metrics"] = json!({ "metrics_path": metrics }),
        // Firecracker's configuration file must list them.
        VmmKind::Firecracker => config["drives"] = json!([]),
    }
    let config_path = dir.join("config.json");
    std::fs::write(&config_path, config.to_string())?;
    let stress = b.stress_every > 0 && (index + 1) % b.stress_every == 0;
    let (streams, bytes) = if stress {
        (b.streams.max(1), b.stress_mib << 20)
    } else {
        (1, 64 << 10)
    };
    let start = Instant::now();
    let log_file = std::fs::File::create(&log)?;
    // Both with their API: a stalled guest is paused and snapshotted
    // through it before its VMM is stopped.
    let mut command = match vmm_kind {
        VmmKind::Husk => {
            let mut c = Command::new(&b.guest.husk);
            // The guest's serial console (`quiet`: its errors only).
            c.arg("--api-sock")
                .arg(&api)
                .arg("--config-file")
                .arg(&config_path)
                .stdout(std::fs::File::create(&console)?);
            c
        }
        VmmKind::Firecracker => {
            // Its log (the Shutdown line) goes to stdout, with the guest's
            // serial console.
            let _ = std::fs::remove_file(&console);
            let mut c = Command::new(&b.firecracker);
            c.arg("--api-sock")
                .arg(&api)
                .args(["--level", "Warning", "--config-file"])
                .arg(&config_path)
                .stdout(log_file.try_clone()?);
            c
        }
    };
    let binary = command.get_program().to_owned();
    let mut vmm = command
        .stdin(Stdio::null())
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("cannot start {}", Path::new(&binary).display()))?;
    let t = Target::Uds(uds.clone(), PORT);
    // The guest boots first: the streams retry their connection this long
    // (a VMM that exits before it listens fails the creation at once;
    // after the wait, the streams' own connection attempts fail).
    let streams_result = match wait_for(&mut vmm, Duration::from_secs(60), || uds.exists())? {
        // No half-close: Firecracker would end the echo's way back.
        None => vsock::client(&t, "echo-open", streams, bytes, Duration::from_secs(60)),
        Some(code) => Err(anyhow::anyhow!(
            "the VMM exited with status {code} before listening on its vsock socket"
        )),
    };
    let stream_error = match &streams_result {
        Ok(r) if r["checksums_equal"] == json!(true) => None,
        Ok(r) => Some(r["errors"].to_string()),
        Err(e) => Some(format!("{e:#}")),
    };
    let timed_out = stream_error.as_deref().is_some_and(is_timeout);
    // The first healthy husk VM, once its streams are done, is the
    // reference a stalled guest's kernel is compared with (paused,
    // snapshotted, resumed; the guest kernel's text is the same in every
    // boot of one kernel on one node).
    let mut took_reference = false;
    if stream_error.is_none() && ev.reference.is_none() && vmm_kind == VmmKind::Husk {
        let taken = Api::connect(&api, Duration::from_secs(30)).and_then(|mut c| {
            let mem = snapshot(&mut c, dir, "reference")?;
            c.expect("PATCH", "/vm", json!({"state": "Resumed"}), 204)?;
            Ok(mem)
        });
        match taken {
            Ok(mem) => {
                ev.reference = Some(mem);
                took_reference = true;
            }
            Err(e) => eprintln!("husk-bench soak: no reference snapshot: {e:#}"),
        }
    }
    // Streams reset or cut short: most likely the guest died and its VMM
    // is on its way out (a triple fault, a guest panic), which it must be
    // let to say with its exit code rather than be stopped first. One
    // still running after that grace has a guest that stopped answering.
    let died = if stream_error.is_some() && !timed_out {
        wait_for(&mut vmm, DEATH_GRACE, || false)?
    } else {
        None
    };
    let silent = stream_error.is_some() && died.is_none();
    let stalled_snapshot = if silent {
        Some(
            Api::connect(&api, Duration::from_secs(30))
                .and_then(|mut c| snapshot(&mut c, dir, "stalled")),
        )
    } else {
        None
    };
    if stream_error.is_none() {
        let _ = vsock::client(&t, "quit", 1, 0, Duration::ZERO);
    }
    let exit = match died {
        Some(code) => Some(code),
        // A guest that stopped answering will not reset on its own.
        None if silent => wait_exit(&mut vmm, Duration::ZERO)?,
        None => wait_exit(&mut vmm, EXIT_TIMEOUT)?,
    };
    let ms = start.elapsed().as_secs_f64() * 1e3;
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    let exit = exit_in_husk_terms(vmm_kind, exit, &log_text);
    // husk's guest console is its stdout; Firecracker's is in its log.
    let guest_panicked = log_text.contains(GUEST_PANIC)
        || std::fs::read_to_string(&console).is_ok_and(|c| c.contains(GUEST_PANIC));
    let outcome = classify(exit, stream_error.as_deref(), timed_out, guest_panicked);
    let mut run = json!({
        "run": index,
        "vmm": vmm_kind.name(),
        "stress": stress,
        "outcome": outcome.name(),
        "ms": ms.round(),
        "exit": exit,
        "found_by_timer": found_by_timer(&last_metrics(&metrics)),
    });
    if outcome != Outcome::Ok {
        run["error"] = json!(stream_error);
        // SIGTERM made husk log where its vCPU was: the last lines.
        run["vmm_log"] = json!(tail(&log, 8));
        run["console"] = json!(tail(&console, 8));
    }
    if took_reference {
        run["reference_snapshot"] = json!(true);
    }
    match stalled_snapshot {
        Some(Ok(mem)) => {
            run["forensics"] = forensics(b, &mem, ev.reference.as_deref(), &log_text);
            let _ = std::fs::remove_file(&mem);
            let _ = std::fs::remove_file(mem.with_extension("state"));
        }
        Some(Err(e)) => run["forensics"] = json!(format!("no snapshot of the stalled VM: {e:#}")),
        None => {}
    }
    Ok(run)
}

/// `husk-bench soak`: prints a `SOAK-RUN` line per creation, then the
/// report of those runs alone (no node failures: those are seen from
/// outside the node).
pub fn soak(b: SoakBench) -> anyhow::Result<Value> {
    std::fs::create_dir_all(&b.dir)
        .with_context(|| format!("cannot create {}", b.dir.display()))?;
    let mut runs = Vec::with_capacity(b.runs);
    let mut stdout = std::io::stdout();
    if b.vmm.is_empty() {
        bail!("--vmm names no VMM");
    }
    let mut evidence = Evidence::default();
    for i in 0..b.runs {
        let run = one(&b, b.vmm[i % b.vmm.len()], i, &mut evidence)?;
        writeln!(stdout, "SOAK-RUN {run}")?;
        stdout.flush()?;
        eprintln!(
            "husk-bench soak: {}/{} {} ({} ms)",
            i + 1,
            b.runs,
            run["outcome"].as_str().unwrap_or("?"),
            run["ms"]
        );
        runs.push(run);
    }
    Ok(report(&runs, &[]))
}

/// One failure of the node VM, from run.sh's record (HUSK_NODE_RETRIES):
/// its cause and evidence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFailure {
    cause: String,
    evidence: String,
}

/// Parses run.sh's record: label, cause, evidence, outcome per line,
/// tab-separated.
fn node_failures(record: &str) -> Vec<NodeFailure> {
    record
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f.len() >= 3).then(|| NodeFailure {
                cause: f[1].to_string(),
                evidence: f[2].to_string(),
            })
        })
        .collect()
}

/// Per thousand creations, one decimal.
fn per_thousand(n: usize, creations: usize) -> f64 {
    if creations == 0 {
        return 0.0;
    }
    (n as f64 * 10_000.0 / creations as f64).round() / 10.0
}

/// The soak's report: counts and rates per outcome and per node failure
/// cause, the timers' total, the creations' times, and each failure.
fn report(runs: &[Value], node: &[NodeFailure]) -> Value {
    let creations = runs.len();
    let mut outcomes = Map::new();
    let mut rates = Map::new();
    for o in Outcome::ALL {
        let n = runs.iter().filter(|r| r["outcome"] == o.name()).count();
        outcomes.insert(o.name().into(), json!(n));
        if o != Outcome::Ok {
            rates.insert(o.name().into(), json!(per_thousand(n, creations)));
        }
    }
    let mut causes = Map::new();
    for f in node {
        let n = causes.entry(f.cause.clone()).or_insert(json!(0));
        *n = json!(n.as_u64().unwrap_or(0) + 1);
    }
    rates.insert(
        "node_failures".into(),
        json!(per_thousand(node.len(), creations)),
    );
    let times: Vec<f64> = runs
        .iter()
        .filter(|r| r["outcome"] == "ok")
        .filter_map(|r| r["ms"].as_f64())
        .collect();
    let mut vmms: Vec<&str> = runs.iter().filter_map(|r| r["vmm"].as_str()).collect();
    vmms.sort_unstable();
    vmms.dedup();
    // VMMs that took turns in the same node boots: each one's own counts
    // (the node's failures are theirs together, so only above).
    let by_vmm: Map<String, Value> = if vmms.len() > 1 {
        vmms.iter()
            .map(|v| {
                let own: Vec<Value> = runs.iter().filter(|r| r["vmm"] == *v).cloned().collect();
                let mut r = report(&own, &[]);
                r.as_object_mut().map(|o| o.remove("node_failures"));
                ((*v).to_string(), r)
            })
            .collect()
    } else {
        Map::new()
    };
    let mut out = json!({
        "benchmark": "soak",
        "vmm": vmms.join(","),
        "creations": creations,
        "outcomes": outcomes,
        "node_failures": { "total": node.len(), "by_cause": causes },
        "per_1000_creations": rates,
        "found_by_timer_total": runs.iter().map(|r| r["found_by_timer"].as_u64().unwrap_or(0)).sum::<u64>(),
        "creations_with_found_by_timer": runs.iter().filter(|r| r["found_by_timer"].as_u64().unwrap_or(0) > 0).count(),
        "creation_ms": crate::stats::summary(&times),
        "failures": runs.iter().filter(|r| r["outcome"] != "ok").cloned().collect::<Vec<_>>(),
        "node_failure_evidence": node.iter().map(|f| format!("{}: {}", f.cause, f.evidence)).collect::<Vec<_>>(),
    });
    if !by_vmm.is_empty() {
        out["by_vmm"] = Value::Object(by_vmm);
    }
    out
}

#[derive(clap::Args)]
pub struct SoakReportArgs {
    /// Files holding `husk-bench soak`'s output (its SOAK-RUN lines), one
    /// per node boot, in any number.
    #[arg(long = "runs", required = true, num_args = 1..)]
    runs: Vec<PathBuf>,
    /// run.sh's record of the node's failures (HUSK_NODE_RETRIES).
    #[arg(long)]
    node_record: Option<PathBuf>,
    /// What ran the node (the QEMU and its version), for the record.
    #[arg(long, default_value = "")]
    node: String,
}

/// `husk-bench soak-report`: the SOAK-RUN lines of every node boot and the
/// node's failures, as one report.
pub fn soak_report(a: SoakReportArgs) -> anyhow::Result<Value> {
    let mut runs = Vec::new();
    for path in &a.runs {
        let f = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
        for line in BufReader::new(f).lines() {
            if let Some(json) = line?.strip_prefix("SOAK-RUN ") {
                runs.push(serde_json::from_str(json).context("a SOAK-RUN line")?);
            }
        }
    }
    let node = match &a.node_record {
        Some(p) => node_failures(&std::fs::read_to_string(p).unwrap_or_default()),
        None => Vec::new(),
    };
    if runs.is_empty() && node.is_empty() {
        bail!("no SOAK-RUN lines and no node failures: nothing ran");
    }
    let mut r = report(&runs, &node);
    r["node"] = json!(a.node);
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_follow_the_exit_code_and_the_streams() {
        assert_eq!(classify(Some(0), None, false, false), Outcome::Ok);
        assert_eq!(classify(Some(3), None, false, false), Outcome::TripleFault);
        // A triple fault explains a stream's timeout too.
        assert_eq!(
            classify(Some(3), Some("x"), true, false),
            Outcome::TripleFault
        );
        assert_eq!(
            classify(None, Some("timed out"), true, false),
            Outcome::Stall
        );
        // The VMM closed a connection the guest never took, and the VMM
        // still ran past the grace: the guest stopped answering.
        assert_eq!(
            classify(None, Some("closed without OK"), false, false),
            Outcome::Stall
        );
        // The VMM ended by itself after the streams broke, no panic seen.
        assert_eq!(
            classify(Some(0), Some("reset"), false, false),
            Outcome::Failed
        );
        // A panicked guest reboots, which ends its VMM with 0.
        assert_eq!(
            classify(Some(0), Some("No such file"), false, true),
            Outcome::GuestPanic
        );
        assert_eq!(
            classify(None, Some("timed out"), true, true),
            Outcome::GuestPanic
        );
        assert_eq!(classify(None, None, false, false), Outcome::Stuck);
        assert_eq!(classify(Some(1), None, false, false), Outcome::Failed);
        assert!(is_timeout(
            "connect: Resource temporarily unavailable (os error 11)"
        ));
        assert!(is_timeout("connection timed out"));
        assert!(!is_timeout("echo mismatch: 3 of 4 bytes"));
    }

    #[test]
    fn firecracker_triple_faults_are_told_by_its_log() {
        let shutdown = "2026-12-05T07:00:00 [anonymous-instance:fc_vcpu 0] Unexpected exit reason on vcpu run: Shutdown";
        assert_eq!(
            exit_in_husk_terms(VmmKind::Firecracker, Some(1), shutdown),
            Some(TRIPLE_FAULT_EXIT)
        );
        // A clean reset, another error, a kill: as they are.
        assert_eq!(
            exit_in_husk_terms(VmmKind::Firecracker, Some(0), shutdown),
            Some(0)
        );
        assert_eq!(
            exit_in_husk_terms(VmmKind::Firecracker, Some(1), "seccomp"),
            Some(1)
        );
        assert_eq!(
            exit_in_husk_terms(VmmKind::Firecracker, None, shutdown),
            None
        );
        // husk's own code is already a triple fault's; its log is not read.
        assert_eq!(
            exit_in_husk_terms(VmmKind::Husk, Some(1), shutdown),
            Some(1)
        );
    }

    #[test]
    fn vmms_taking_turns_get_their_own_counts() {
        let runs: Vec<Value> = (0..10)
            .map(|i| {
                let vmm = if i % 2 == 0 { "husk" } else { "firecracker" };
                let outcome = if i == 4 { "stall" } else { "ok" };
                json!({"run": i, "vmm": vmm, "outcome": outcome, "ms": 10.0, "found_by_timer": 0})
            })
            .collect();
        let node = node_failures("soak\tpanic\tKernel panic\tbooted again\n");
        let r = report(&runs, &node);
        assert_eq!(r["vmm"], "firecracker,husk");
        assert_eq!(r["creations"], 10);
        assert_eq!(r["node_failures"]["total"], 1);
        let h = &r["by_vmm"]["husk"];
        assert_eq!(h["creations"], 5);
        assert_eq!(h["outcomes"]["stall"], 1);
        assert_eq!(h["per_1000_creations"]["stall"], 200.0);
        assert!(h.get("node_failures").is_none());
        assert_eq!(r["by_vmm"]["firecracker"]["outcomes"]["ok"], 5);
        // One VMM: no split.
        assert!(report(&runs[..1], &[]).get("by_vmm").is_none());
    }

    #[test]
    fn the_signal_log_line_gives_the_registers() {
        let log = "x WARN vCPU stopped by a signal vcpu=0 rip=0xffffffff81000dcc rsp=0x10\n\
                   y WARN vCPU stopped by a signal: rip=0xffffffffc04c4dcc cr3=0x2a3c000 cs=0x10 efer=0xd01 note=a vcpu=0\n";
        let f = log_fields(log, "vCPU stopped by a signal");
        assert_eq!(f["rip"], 0xffff_ffff_c04c_4dcc_u64);
        assert_eq!(f["cr3"], 0x2a3_c000);
        assert_eq!(f["vcpu"], "0");
        assert_eq!(f["note"], "a");
        assert!(f.get("rsp").is_none());
        assert!(log_fields(log, "absent").is_empty());
    }

    #[test]
    fn a_vcpu_holding_the_nodes_vmrun_return_address_is_named() {
        let kallsyms = "ffffffff81000000 T _stext\n\
                        ffffffffc048cd30 t __svm_vcpu_run\t[kvm_amd]\n\
                        ffffffffc048ce80 t __svm_sev_es_vcpu_run\t[kvm_amd]\n\
                        ffffffffc047e000 t svm_init\t[kvm_amd]\n";
        let mut state = vec![0u8; 64];
        state[13..21].copy_from_slice(&0xffff_ffff_c048_cdcc_u64.to_le_bytes());
        let r = node_state(Some(0xffff_ffff_c048_cdcc), &state, kallsyms);
        assert_eq!(r["rip_in_it"], "__svm_vcpu_run+0x9c");
        assert_eq!(
            r["in_state_file"],
            json!(["__svm_vcpu_run+0x9c at byte 13"])
        );
        assert_eq!(
            r["function"],
            "__svm_vcpu_run 0xffffffffc048cd30..0xffffffffc048ce80"
        );
        // A guest's own rip, a clean state file: nothing.
        let r = node_state(Some(0xffff_ffff_8154_4a83), &[0u8; 64], kallsyms);
        assert_eq!(r["rip_in_it"], Value::Null);
        assert_eq!(r["in_state_file"], json!([]));
        // Hidden addresses (kptr_restrict): no claim either way.
        let hidden = "0000000000000000 t __svm_vcpu_run\t[kvm_amd]\n";
        assert!(node_state(None, &state, hidden).is_string());
    }

    #[test]
    fn timer_counters_are_summed_wherever_they_are() {
        let m = json!({
            "vsock": {"tx_found_by_timer": 2, "rx_found_by_timer": 1, "tx_packets": 40},
            "net": {"eth0": {"rx_found_by_timer": 4}},
            "found_by_timer_note": "not a number",
        });
        assert_eq!(found_by_timer(&m), 7);
        assert_eq!(found_by_timer(&Value::Null), 0);
    }

    #[test]
    fn the_report_counts_rates_per_thousand_and_node_causes() {
        let mut runs: Vec<Value> = (0..198)
            .map(|i| json!({"run": i, "outcome": "ok", "ms": 1000.0, "found_by_timer": 0}))
            .collect();
        runs.push(json!({"run": 198, "outcome": "stall", "ms": 5.0, "found_by_timer": 3}));
        runs.push(json!({"run": 199, "outcome": "triple_fault", "ms": 5.0, "found_by_timer": 0}));
        let node = node_failures(
            "soak\tpanic\tKernel panic - not syncing\tbooted again\n\
             soak\tsilent stop\tno heartbeat for 60 s\tbooted again\nbad line\n",
        );
        runs[0]["vmm"] = json!("husk");
        let r = report(&runs, &node);
        assert_eq!(r["vmm"], "husk");
        assert_eq!(r["creations"], 200);
        assert_eq!(r["outcomes"]["ok"], 198);
        assert_eq!(r["per_1000_creations"]["stall"], 5.0);
        assert_eq!(r["per_1000_creations"]["triple_fault"], 5.0);
        assert_eq!(r["per_1000_creations"]["node_failures"], 10.0);
        assert_eq!(r["node_failures"]["by_cause"]["panic"], 1);
        assert_eq!(r["node_failures"]["by_cause"]["silent stop"], 1);
        assert_eq!(r["found_by_timer_total"], 3);
        assert_eq!(r["creations_with_found_by_timer"], 1);
        assert_eq!(r["failures"].as_array().unwrap().len(), 2);
        assert_eq!(per_thousand(0, 0), 0.0);
    }
}
