//! `husk`: one process per microVM. `husk --api-sock PATH` serves the REST
//! API and boots the guest on InstanceStart; `husk --config-file FILE`
//! boots from one JSON document; `husk boot` launches a guest from
//! command-line flags. Each returns when the guest ends; the exit status
//! says how:
//!
//! | status | meaning |
//! | --- | --- |
//! | 0 | the guest reset or shut down (the normal end of `reboot`) |
//! | 1 | the VMM could not build or run the VM (bad configuration, KVM error) |
//! | 2 | usage error |
//! | 3 | the guest crashed: triple fault, KVM internal error, entry failure |
//! | 128+N | stopped by signal N (SIGTERM, SIGINT, SIGHUP): vCPUs stopped, VM torn down |

mod api;
mod api_cmd;
mod boot_cmd;
mod check;
mod image_cmd;
mod logger;
mod metrics_cmd;
mod pull_cmd;
mod run_cmd;
mod snapshot_cmd;
mod template;
mod virtiofsd;

use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use vmm::seccomp::{SeccompFilters, ThreadKind};

#[derive(Parser)]
#[command(name = "husk", version, about = "A microVM monitor for pods")]
struct Cli {
    /// Log filter (error, warn, info, debug, trace, or a tracing directive).
    /// HUSK_LOG overrides it.
    #[arg(long, global = true, default_value = "warn")]
    log_level: String,

    /// Run without seccomp filters (for debugging; never in production).
    #[arg(long, global = true)]
    no_seccomp: bool,

    /// Self-test of the seccomp filters: threads of this kind (vmm, api,
    /// vcpu) make a forbidden system call once confined, which must kill
    /// the process by SIGSYS.
    #[arg(long, global = true, hide = true, value_name = "THREAD", value_parser = parse_thread_kind)]
    seccomp_selftest: Option<ThreadKind>,

    /// Without a subcommand: the API-driven VMM.
    #[command(flatten)]
    api: api_cmd::ApiArgs,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a microVM and wait until the guest ends.
    Boot(boot_cmd::BootArgs),
    /// Check whether a pod would run on this host (KVM, capabilities,
    /// tun, cgroups, containerd, the configured kernel and agent); exits 0
    /// only when it would.
    Check(check::CheckArgs),
    /// OCI images: root filesystems, the bundled busybox image.
    Image(image_cmd::ImageArgs),
    /// Serve the node's pod VMs' metrics to Prometheus (one exporter per
    /// node, reading the shim's state directory).
    Metrics(metrics_cmd::MetricsArgs),
    /// Pull an image from an OCI registry into the cache (a tag is always
    /// resolved again) and print the digest it resolved to.
    Pull(pull_cmd::PullArgs),
    /// Run a command in a container inside a fresh microVM (the bundled
    /// busybox image unless IMAGE is given: a local OCI layout or a
    /// registry reference); exits with its status.
    Run(run_cmd::RunArgs),
    /// Write a full snapshot of a running husk's microVM (through its API
    /// socket): pause, snapshot, resume.
    Snapshot(snapshot_cmd::SnapshotArgs),
    /// Run a microVM restored from a snapshot until the guest ends.
    Restore(snapshot_cmd::RestoreArgs),
}

fn parse_thread_kind(s: &str) -> Result<ThreadKind, String> {
    ThreadKind::from_name(s).ok_or_else(|| format!("'{s}' is not a thread kind (vmm, api, vcpu)"))
}

fn main() -> ExitCode {
    let started = Instant::now();
    let cli = Cli::parse();
    // The API-driven VMM's flags mean nothing to a subcommand; the global
    // ones (--log-level, --no-seccomp) go before or after it.
    if cli.command.is_some() && cli.api.given() {
        use clap::CommandFactory;
        Cli::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                "--api-sock, --config-file and --no-api run the API-driven VMM; they take no subcommand",
            )
            .exit();
    }
    logger::init(&cli.log_level);
    let seccomp = if cli.no_seccomp {
        tracing::warn!("seccomp filters are off (--no-seccomp): the guest faces an unconfined VMM");
        SeccompFilters::disabled()
    } else {
        let filters = SeccompFilters::builtin();
        match cli.seccomp_selftest {
            Some(kind) => filters.with_probe(kind),
            None => filters,
        }
    };
    let result = match cli.command {
        Some(Command::Boot(args)) => boot_cmd::run(args, started, &seccomp),
        Some(Command::Check(args)) => check::run(args),
        Some(Command::Image(args)) => image_cmd::run(args),
        Some(Command::Metrics(args)) => metrics_cmd::run(args),
        Some(Command::Pull(args)) => pull_cmd::run(args),
        Some(Command::Run(args)) => run_cmd::run(args, &seccomp),
        Some(Command::Snapshot(args)) => snapshot_cmd::snapshot(args),
        Some(Command::Restore(args)) => snapshot_cmd::restore(args, &seccomp),
        None if cli.api.given() => api_cmd::run(cli.api, &seccomp),
        None => {
            use clap::CommandFactory;
            let _ = Cli::command().print_help();
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // The error and its causes, once each: "cannot build the
            // microVM: cannot read kernel /k: No such file or directory".
            eprintln!("husk: error: {e:#}");
            ExitCode::from(1)
        }
    }
}
