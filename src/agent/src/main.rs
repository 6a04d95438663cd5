//! husk-agent: the guest's /init. It mounts what a Linux system needs,
//! reaps orphans, and serves the host on vsock (port 1024, or
//! `husk.agent_port=N` on the kernel command line), where the host asks it to
//! set up the pod and run containers (the protocol is `husk-protocol`). On
//! a Shutdown request or SIGTERM it syncs and resets the guest, which ends
//! the VMM.
//!
//! Outside a guest (`--unix PATH`, not PID 1) it serves the same protocol on
//! a unix socket and leaves the system alone, for host-side tests.
//!
//! `main` reads the configuration (arguments, `HUSK_AGENT_*` variables,
//! kernel command line) once, builds the one [`runtime::Runtime`] from it
//! and hands that to the signal thread and the server.

mod config;
mod container;
mod cpus;
mod error;
mod events;
mod forward;
mod init;
mod log;
mod reaper;
mod restore;
mod runtime;
mod sandbox;
mod server;
mod signals;
mod template;
mod transport;

use std::process::ExitCode;

use config::{Config, Environment, KernelCmdline, Options};

fn main() -> ExitCode {
    let pid1 = std::process::id() == 1;
    let opts = match Options::parse(pid1, std::env::args().skip(1)) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("husk-agent: {}", error::chain(&e));
            return ExitCode::from(2);
        }
    };
    let env = Environment::capture();
    let cmdline = if pid1 {
        // May re-execute the agent from a tmpfs (then main starts again).
        init::prepare(env.switched);
        KernelCmdline::read()
    } else {
        KernelCmdline::default()
    };
    let config = Config::new(opts, env, &cmdline);
    log::init(config.debug);
    for word in &cmdline.ignored {
        log::warn(&format!("ignoring {word}: not a port number"));
    }
    // Before any thread exists, so that every thread inherits the mask.
    let signals = match signals::block() {
        Ok(fd) => Some(fd),
        Err(e) => {
            log::error(&format!("cannot read signals ({e}): reaping once a second"));
            None
        }
    };
    if pid1 {
        log::info(&format!("husk-agent {} started", env!("CARGO_PKG_VERSION")));
    }
    let runtime = match runtime::Runtime::start(config) {
        Ok(r) => r,
        Err(e) => return stop(pid1, &e),
    };
    signals::spawn(signals, runtime.clone());
    if !pid1 {
        // Outside a guest: still reap the containers' processes (and adopt
        // their orphans).
        // SAFETY: prctl with integer arguments.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    }
    let listen = runtime.config().listen.clone();
    let events = runtime.events().clone();
    match server::serve(&listen, runtime, events) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => stop(pid1, &e),
    }
}

/// The agent cannot serve: says why, then ends the guest (useless without
/// a way to reach the host) or, outside one, fails.
fn stop(pid1: bool, e: &dyn std::error::Error) -> ExitCode {
    log::error(&error::chain(e));
    if pid1 {
        init::shutdown(true)
    }
    ExitCode::FAILURE
}
