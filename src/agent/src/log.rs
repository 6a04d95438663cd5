//! Log lines on the console (the guest's serial port, which is the VMM's
//! stdout or log): `husk-agent: LEVEL message`. The agent is quiet unless
//! something goes wrong or `husk.agent_debug` is on the kernel command line.
//! Whether debug lines show is set once, in `main`, from the configuration
//! (a process-wide setting, as a logger's level is; it never changes after).

use std::sync::OnceLock;

static DEBUG: OnceLock<bool> = OnceLock::new();

/// Sets whether debug lines show (the first call wins).
pub fn init(debug: bool) {
    let _ = DEBUG.set(debug);
}

/// Something the operator must see.
pub fn error(msg: &str) {
    eprintln!("husk-agent: error: {msg}");
}

/// Something unusual.
pub fn warn(msg: &str) {
    eprintln!("husk-agent: warning: {msg}");
}

/// Lifecycle milestones (start, shutdown).
pub fn info(msg: &str) {
    eprintln!("husk-agent: {msg}");
}

/// Details for debugging.
pub fn debug(msg: &str) {
    if DEBUG.get().copied().unwrap_or(false) {
        eprintln!("husk-agent: debug: {msg}");
    }
}
