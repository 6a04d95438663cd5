//! Log lines on the console (the guest's serial port, which is the VMM's
//! stdout or log): `husk-agent: LEVEL message`. The agent is quiet unless
//! something goes wrong or `husk.agent_debug` is on the kernel command line.

use std::sync::atomic::{AtomicBool, Ordering};

static DEBUG: AtomicBool = AtomicBool::new(false);

/// Turns debug lines on.
pub fn enable_debug() {
    DEBUG.store(true, Ordering::Relaxed);
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
    if DEBUG.load(Ordering::Relaxed) {
        eprintln!("husk-agent: debug: {msg}");
    }
}
