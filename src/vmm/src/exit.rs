//! How a microVM ends, and how whoever sees it first (a vCPU thread, the
//! i8042 reset line) tells the event loop.

use std::sync::{Arc, Mutex};

use crate::error::Chain;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest reset itself (i8042 reset line or KVM system event): the
    /// normal end of a guest that ran `reboot`.
    Reset,
    /// The guest asked KVM to power it off.
    Shutdown,
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault {
        /// The vCPU index.
        vcpu: u8,
    },
    /// KVM could not emulate something the guest did.
    InternalError {
        /// The vCPU index.
        vcpu: u8,
        /// KVM's suberror code (1: emulation failure, 2: simultaneous exception, ...).
        suberror: u32,
    },
    /// The hardware refused to enter the guest.
    EntryFailure {
        /// The vCPU index.
        vcpu: u8,
        /// The hardware's reason code.
        reason: u64,
    },
    /// The guest reported a crash through a KVM system event.
    Crash {
        /// The vCPU index.
        vcpu: u8,
    },
    /// The VMM was asked to stop by a signal (SIGTERM, SIGINT, SIGHUP).
    Signal(libc::c_int),
    /// The program driving the VMM stopped the VM (a [`StopHandle`]),
    /// for example `husk run` when its container has ended but the guest
    /// cannot be asked to reset.
    Stopped,
    /// KVM_RUN failed or returned an exit husk does not handle.
    VcpuFault {
        /// The vCPU index.
        vcpu: u8,
        /// What happened.
        detail: String,
    },
    /// A restored VM's memory could not be filled from its memory file:
    /// the guest cannot go on with pages missing.
    MemoryLost(String),
}

impl VmExit {
    /// True when the guest ended on its own terms.
    pub fn is_clean(&self) -> bool {
        matches!(self, VmExit::Reset | VmExit::Shutdown | VmExit::Stopped)
    }

    /// The process exit status `husk boot` maps this to: 0 for a clean end,
    /// 128 + N for signal N, 3 for a guest that crashed or could not run.
    pub fn exit_code(&self) -> u8 {
        match self {
            _ if self.is_clean() => 0,
            VmExit::Signal(sig) => u8::try_from(128 + sig).unwrap_or(255),
            _ => 3,
        }
    }
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExit::Reset => write!(f, "the guest reset itself"),
            VmExit::Shutdown => write!(f, "the guest shut down"),
            VmExit::TripleFault { vcpu } => write!(f, "vCPU {vcpu} triple-faulted"),
            VmExit::InternalError { vcpu, suberror } => write!(
                f,
                "KVM internal error on vCPU {vcpu} (suberror {suberror}{})",
                match suberror {
                    1 => ": instruction emulation failed",
                    2 => ": simultaneous exceptions",
                    3 => ": delivery event failed",
                    _ => "",
                }
            ),
            VmExit::EntryFailure { vcpu, reason } => {
                write!(
                    f,
                    "vCPU {vcpu} could not enter the guest (reason {reason:#x})"
                )
            }
            VmExit::Crash { vcpu } => write!(f, "the guest reported a crash on vCPU {vcpu}"),
            VmExit::Signal(sig) => {
                write!(f, "stopped by {}", crate::signal::signal_name(*sig))
            }
            VmExit::Stopped => write!(f, "stopped by its controller"),
            VmExit::VcpuFault { vcpu, detail } => write!(f, "vCPU {vcpu} failed: {detail}"),
            VmExit::MemoryLost(detail) => {
                write!(f, "guest memory could not be restored: {detail}")
            }
        }
    }
}

/// Lets another thread stop a running VM (the event loop then stops the
/// vCPUs and `Vmm::run` returns [`VmExit::Stopped`]).
#[derive(Debug, Clone)]
pub struct StopHandle(pub(crate) Arc<ExitNotifier>);

impl StopHandle {
    /// Stops the VM (no effect if it already ended).
    pub fn stop(&self) {
        self.0.notify(VmExit::Stopped);
    }
}

/// The first exit reported wins; the event fd wakes the event loop.
#[derive(Debug)]
pub struct ExitNotifier {
    reason: Mutex<Option<VmExit>>,
    event: EventFd,
}

impl ExitNotifier {
    /// A notifier with nothing reported yet.
    pub fn new() -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(ExitNotifier {
            reason: Mutex::new(None),
            event: EventFd::new(EFD_NONBLOCK)?,
        }))
    }

    /// Records `exit` unless an earlier exit was already recorded, and wakes
    /// the event loop.
    pub fn notify(&self, exit: VmExit) {
        {
            let mut reason = self.reason.lock().unwrap_or_else(|e| e.into_inner());
            if reason.is_none() {
                *reason = Some(exit);
            }
        }
        if let Err(e) = self.event.write(1) {
            tracing::error!(error = %Chain(&e), "cannot signal the VM exit to the event loop");
        }
    }

    /// The recorded exit, if any.
    pub fn reason(&self) -> Option<VmExit> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The fd the event loop polls.
    pub fn event(&self) -> &EventFd {
        &self.event
    }
}

/// The i8042's reset line: pulls it by reporting [`VmExit::Reset`].
#[derive(Debug, Clone)]
pub struct ResetTrigger(pub Arc<ExitNotifier>);

impl vm_superio::Trigger for ResetTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.notify(VmExit::Reset);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_handle_ends_the_vm_once() {
        let n = ExitNotifier::new().unwrap();
        let h = StopHandle(n.clone());
        h.stop();
        n.notify(VmExit::Reset);
        assert_eq!(n.reason(), Some(VmExit::Stopped));
        assert_eq!(n.event().read().unwrap(), 2);
    }

    #[test]
    fn first_exit_wins_and_wakes() {
        let n = ExitNotifier::new().unwrap();
        assert_eq!(n.reason(), None);
        n.notify(VmExit::TripleFault { vcpu: 1 });
        n.notify(VmExit::Reset);
        assert_eq!(n.reason(), Some(VmExit::TripleFault { vcpu: 1 }));
        assert_eq!(n.event().read().unwrap(), 2);
    }

    #[test]
    fn exit_codes() {
        assert_eq!(VmExit::Reset.exit_code(), 0);
        assert_eq!(VmExit::Shutdown.exit_code(), 0);
        assert_eq!(VmExit::Stopped.exit_code(), 0);
        assert_eq!(VmExit::TripleFault { vcpu: 0 }.exit_code(), 3);
        let e = VmExit::InternalError {
            vcpu: 0,
            suberror: 1,
        };
        assert_eq!(e.exit_code(), 3);
        assert!(e.to_string().contains("emulation failed"));
        let term = VmExit::Signal(libc::SIGTERM);
        assert_eq!(term.exit_code(), 143);
        assert_eq!(term.to_string(), "stopped by SIGTERM");
    }

    #[test]
    fn reset_trigger_reports_reset() {
        use vm_superio::Trigger;
        let n = ExitNotifier::new().unwrap();
        ResetTrigger(n.clone()).trigger().unwrap();
        assert_eq!(n.reason(), Some(VmExit::Reset));
    }
}
