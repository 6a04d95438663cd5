//! `husk --api-sock PATH` / `husk --config-file FILE`: one VMM process per
//! microVM, driven Firecracker-style. The main thread owns the
//! [`Controller`]; before InstanceStart it waits for API calls (and
//! termination signals), afterwards the VM's event loop wakes for them.
//! When the guest ends, the process exits with the same status `husk boot`
//! would (0 clean, 3 guest crash, 128+N signal).

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use vmm::controller::{ActionType, Controller, Request, VmResources};
use vmm::error::Chain;
use vmm::metrics::Metrics;
use vmm::seccomp::SeccompFilters;
use vmm::signal::TerminationFd;
use vmm::{SerialOutput, Vmm};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use crate::api::{self, Call, Refusal, VmmLink};

/// Flags of the API-driven VMM (no subcommand).
#[derive(Args, Debug, Default)]
pub struct ApiArgs {
    /// Serve the REST API on this unix socket (it must not exist yet).
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Configure from this JSON document (the API bodies under
    /// "boot-source", "machine-config", "drives", ...) and start at once.
    #[arg(long, value_name = "FILE")]
    config_file: Option<PathBuf>,
    /// Run without an API socket (needs --config-file).
    #[arg(long)]
    no_api: bool,
    /// The instance id reported by GET /.
    #[arg(long, default_value = "anonymous-instance")]
    id: String,
    /// A snapshot to load at start (`husk restore` fills it in).
    #[arg(skip)]
    pub restore: Option<vmm::controller::snapshot::SnapshotLoadParams>,
}

impl ApiArgs {
    /// True when any of these flags was given.
    pub fn given(&self) -> bool {
        self.api_sock.is_some() || self.config_file.is_some() || self.no_api
    }

    /// The flags `husk restore` runs the VMM with.
    pub fn for_restore(
        api_sock: Option<PathBuf>,
        id: String,
        load: vmm::controller::snapshot::SnapshotLoadParams,
    ) -> Self {
        ApiArgs {
            no_api: api_sock.is_none(),
            api_sock,
            config_file: None,
            id,
            restore: Some(load),
        }
    }
}

/// Removes the API socket when the process is done with it.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if path.exists() {
        bail!(
            "the API socket {} already exists (another husk, or a stale file to remove)",
            path.display()
        );
    }
    // Bound (and listening) under a temporary name in the same directory,
    // then renamed into place: a client that sees the path can connect.
    let tmp = path.with_file_name(format!(".husk-api-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)
        .with_context(|| format!("cannot bind the API socket {}", tmp.display()))?;
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot move the API socket to {}", path.display()));
    }
    Ok(listener)
}

/// Runs the VMM until its guest ends; returns the exit status.
pub fn run(args: ApiArgs, seccomp: &SeccompFilters) -> anyhow::Result<u8> {
    match (&args.api_sock, args.no_api, &args.config_file) {
        (Some(_), true, _) => bail!("--api-sock and --no-api exclude each other"),
        (None, true, None) if args.restore.is_none() => bail!("--no-api needs --config-file"),
        (None, false, _) => bail!("give --api-sock PATH (or --no-api with --config-file)"),
        _ => {}
    }
    // Blocked here, so the API thread inherits the mask and a SIGTERM
    // before InstanceStart is read below, not delivered to a random thread.
    let term = TerminationFd::new().context("cannot watch termination signals")?;
    let metrics = Arc::new(Metrics::default());
    let mut controller = Controller::new(args.id.clone(), SerialOutput::Stdout, metrics.clone());
    controller.set_seccomp(seccomp.clone());

    let mut snapshot_load = args.restore.clone();
    if let Some(file) = &args.config_file {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read the config file {}", file.display()))?;
        let resources: VmResources = serde_json::from_str(&text)
            .with_context(|| format!("invalid config file {}", file.display()))?;
        if let Some(logger) = &resources.logger {
            crate::logger::configure(logger)
                .with_context(|| format!("cannot set up logging from {}", file.display()))?;
        }
        if let Some(load) = &resources.snapshot_load {
            snapshot_load = Some(load.clone());
        }
        controller
            .load(resources)
            .with_context(|| format!("cannot use the config file {}", file.display()))?;
    }

    let (calls_tx, calls) = mpsc::channel::<Call>();
    let wake = EventFd::new(EFD_NONBLOCK).context("cannot create the API eventfd")?;
    // Created now: after InstanceStart this thread is confined, and its
    // filter allows arming timers, not making them.
    let metrics_timer = TimerFd::new().context("cannot create the metrics timer")?;
    let _socket = match &args.api_sock {
        Some(path) => {
            let listener = bind(path)?;
            let link = VmmLink {
                calls: calls_tx,
                wake: wake.try_clone().context("cannot clone the API eventfd")?,
            };
            api::spawn(listener, link, metrics.clone(), seccomp)
                .context("cannot start the API server")?;
            tracing::info!(socket = %path.display(), "API server listening");
            Some(SocketFile(path.clone()))
        }
        None => None,
    };

    let vmm = if let Some(load) = snapshot_load {
        match controller.handle(Request::LoadSnapshot(load)) {
            Ok((_, Some(vmm))) => vmm,
            Ok((_, None)) => bail!("the microVM was not restored"),
            Err(e) => return Err(anyhow::Error::new(e)),
        }
    } else if args.config_file.is_some() {
        match controller.handle(Request::Action(ActionType::InstanceStart)) {
            Ok((_, Some(vmm))) => vmm,
            Ok((_, None)) => bail!("the microVM did not start"),
            Err(e) => return Err(anyhow::Error::new(e)),
        }
    } else {
        match wait_for_start(&mut controller, &calls, &wake, &term)? {
            Started::Vmm(vmm) => *vmm,
            Started::Signal(sig) => {
                tracing::info!(
                    signal = vmm::signal::signal_name(sig),
                    "stopping before start"
                );
                return Ok(128u8.saturating_add(sig as u8));
            }
        }
    };
    drop(term);
    run_vm(controller, vmm, calls, wake, metrics_timer)
}

enum Started {
    Vmm(Box<Vmm>),
    Signal(libc::c_int),
}

const WAKE: u64 = 1;
const SIGNAL: u64 = 2;

/// Serves calls until one starts the VM, or a signal ends the process.
fn wait_for_start(
    controller: &mut Controller,
    calls: &Receiver<Call>,
    wake: &EventFd,
    term: &TerminationFd,
) -> anyhow::Result<Started> {
    use std::os::fd::AsRawFd;
    let epoll = Epoll::new().context("cannot watch for API calls and signals")?;
    epoll
        .ctl(
            ControlOperation::Add,
            wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, WAKE),
        )
        .context("cannot watch for API calls and signals")?;
    epoll
        .ctl(
            ControlOperation::Add,
            term.as_raw_fd(),
            EpollEvent::new(EventSet::IN, SIGNAL),
        )
        .context("cannot watch for API calls and signals")?;
    let mut events = [EpollEvent::default(); 2];
    loop {
        let timeout = controller.periodic_metrics();
        let ms = i32::try_from(timeout.as_millis())
            .unwrap_or(i32::MAX)
            .max(1);
        match epoll.wait(ms, &mut events) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("cannot wait for API calls and signals"),
        }
        if let Some(sig) = term.read() {
            return Ok(Started::Signal(sig));
        }
        let _ = wake.read();
        loop {
            let call = match calls.try_recv() {
                Ok(call) => call,
                Err(TryRecvError::Empty) => break,
                // The API thread is gone; nothing can start the VM now.
                Err(TryRecvError::Disconnected) => bail!("the API server stopped"),
            };
            // Logging belongs to the process, not the VM: applied here,
            // before start, then recorded by the controller for
            // GET /vm/config. (After start the controller refuses it.)
            if let Request::PutLogger(cfg) = &call.request {
                if let Err(e) = crate::logger::configure(cfg) {
                    tracing::debug!(error = %Chain(&e), "API request refused");
                    let _ = call.reply.send(Err(Refusal::Logger(e)));
                    continue;
                }
            }
            match controller.handle(call.request) {
                Ok((response, vmm)) => {
                    let _ = call.reply.send(Ok(response));
                    if let Some(vmm) = vmm {
                        return Ok(Started::Vmm(Box::new(vmm)));
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %Chain(&e), "API request refused");
                    let _ = call.reply.send(Err(Refusal::Action(e)));
                }
            }
        }
    }
}

/// Runs the started VM, serving calls between event-loop rounds.
fn run_vm(
    mut controller: Controller,
    mut vmm: Vmm,
    calls: Receiver<Call>,
    wake: EventFd,
    mut timer: TimerFd,
) -> anyhow::Result<u8> {
    vmm.add_wake_source(wake, |e| {
        let _ = e.read();
    });
    let period = vmm::controller::METRICS_PERIOD;
    timer
        .reset(period.max(Duration::from_secs(1)), Some(period))
        .context("cannot arm the metrics timer")?;
    vmm.add_wake_source(timer, |t| {
        let _ = t.wait();
    });
    let exit = vmm.run_with(|vmm| {
        controller.note_first_entry(vmm);
        while let Ok(call) = calls.try_recv() {
            let reply = controller
                .handle_running(vmm, call.request)
                .map_err(Refusal::Action);
            let _ = call.reply.send(reply);
        }
        controller.periodic_metrics();
    })?;
    if controller.resources().metrics.is_some() {
        if let Err(e) = controller.flush_metrics() {
            tracing::warn!(error = %Chain(&e), "cannot write the final metrics");
        }
    }
    tracing::info!(%exit, "microVM ended");
    Ok(exit.exit_code())
}
