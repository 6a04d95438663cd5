//! `husk`: one process per microVM. `husk boot` launches a guest from the
//! command line and returns when it ends; its exit status says how:
//!
//! | status | meaning |
//! | --- | --- |
//! | 0 | the guest reset or shut down (the normal end of `reboot`) |
//! | 1 | the VMM could not build or run the VM (bad configuration, KVM error) |
//! | 2 | usage error |
//! | 3 | the guest crashed: triple fault, KVM internal error, entry failure |
//! | 128+N | stopped by signal N (SIGTERM, SIGINT, SIGHUP): vCPUs stopped, VM torn down |

mod boot_cmd;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "husk", version, about = "A microVM monitor for pods")]
struct Cli {
    /// Log filter (error, warn, info, debug, trace, or a tracing directive).
    /// HUSK_LOG overrides it.
    #[arg(long, global = true, default_value = "warn")]
    log_level: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a microVM and wait until the guest ends.
    Boot(boot_cmd::BootArgs),
}

fn init_logging(level: &str) {
    let filter = EnvFilter::try_from_env("HUSK_LOG")
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}

/// The error and its causes on one line, skipping causes whose text an outer
/// error already quotes (many of ours name their source in their message).
fn render(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if msg.contains(&text) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&text);
    }
    msg
}

fn main() -> ExitCode {
    let started = Instant::now();
    let cli = Cli::parse();
    init_logging(&cli.log_level);
    let result = match cli.command {
        Command::Boot(args) => boot_cmd::run(args, started),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("husk: error: {}", render(&e));
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_skips_quoted_causes() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "gone");
        let e = anyhow::Error::new(io)
            .context("cannot read kernel /x: gone")
            .context("cannot build");
        assert_eq!(render(&e), "cannot build: cannot read kernel /x: gone");
    }
}
