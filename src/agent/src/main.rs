//! husk-agent: the guest's /init. It mounts what a Linux system needs,
//! reaps orphans, and serves the host on vsock (port 1024, or
//! `husk.agent_port=N` on the kernel command line), where the host asks it to
//! set up the pod and run containers (the protocol is `husk-protocol`). On
//! a Shutdown request or SIGTERM it syncs and resets the guest, which ends
//! the VMM.
//!
//! Outside a guest (`--unix PATH`, not PID 1) it serves the same protocol on
//! a unix socket and leaves the system alone, for host-side tests.

mod container;
mod init;
mod log;
mod reaper;
mod sandbox;
mod server;
mod transport;

use std::process::ExitCode;

/// How the agent was started.
pub struct Options {
    /// Serve on this unix socket instead of vsock.
    pub unix: Option<std::path::PathBuf>,
    /// The vsock port.
    pub port: u32,
    /// Running as the guest's init (PID 1).
    pub pid1: bool,
}

fn parse_args() -> Result<Options, String> {
    let pid1 = std::process::id() == 1;
    let mut opts = Options {
        unix: None,
        port: husk_protocol::DEFAULT_AGENT_PORT,
        pid1,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--unix" => opts.unix = Some(args.next().ok_or("--unix needs a path")?.into()),
            "--port" => {
                opts.port = args
                    .next()
                    .and_then(|p| p.parse().ok())
                    .ok_or("--port needs a number")?
            }
            // The kernel passes unknown command-line words to init.
            _ if pid1 => {}
            other => {
                return Err(format!(
                    "unknown argument {other:?} (want --unix PATH, --port N)"
                ))
            }
        }
    }
    Ok(opts)
}

fn main() -> ExitCode {
    let mut opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("husk-agent: {e}");
            return ExitCode::from(2);
        }
    };
    if opts.pid1 {
        // Never returns: PID 1 exiting panics the kernel.
        init::run_as_init(&mut opts);
    }
    // Outside a guest: still reap the containers' processes (and adopt
    // their orphans), and turn SIGTERM into an exit.
    init::start_signal_thread(false);
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    match server::serve(&opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error(&format!("{e}"));
            ExitCode::FAILURE
        }
    }
}
