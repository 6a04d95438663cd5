//! vCPUs: per-vCPU configuration (CPUID, MSRs, LAPIC, entry registers) and the
//! run loop each vCPU thread executes. Port and MMIO exits are dispatched to
//! the buses; anything that ends the guest is reported to the
//! [`ExitNotifier`]. A vCPU leaves KVM_RUN when kicked with
//! [`vcpu_kick_signal`] and stops once the VM's stop flag is set.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_regs, kvm_sregs, kvm_vcpu_events, CpuId, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vm_memory::GuestAddress;

use crate::arch::x86_64::{cpuid, interrupts, msr, regs};
use crate::devices::bus::Bus;
use crate::error::Chain;
use crate::exit::{ExitNotifier, VmExit};
use crate::metrics::Metrics;
use crate::vstate::persist::{StateError, VcpuState};

/// Errors while creating or configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// KVM_CREATE_VCPU failed.
    #[error("cannot create vCPU {index}")]
    Create {
        /// The vCPU index.
        index: u8,
        /// The KVM error.
        source: kvm_ioctls::Error,
    },
    /// CPUID could not be built.
    #[error("cannot build the CPUID of vCPU {index}")]
    Cpuid {
        /// The vCPU index.
        index: u8,
        /// What went wrong.
        source: cpuid::CpuidError,
    },
    /// KVM_SET_CPUID2 failed.
    #[error("cannot set vCPU {index} CPUID")]
    SetCpuid {
        /// The vCPU index.
        index: u8,
        /// The KVM error.
        source: kvm_ioctls::Error,
    },
    /// MSR setup failed.
    #[error("cannot set up the MSRs of vCPU {index}")]
    Msrs {
        /// The vCPU index.
        index: u8,
        /// What went wrong.
        source: msr::MsrError,
    },
    /// Register setup failed.
    #[error("cannot set up the registers of vCPU {index}")]
    Regs {
        /// The vCPU index.
        index: u8,
        /// What went wrong.
        source: regs::RegsError,
    },
    /// A snapshot's state could not be written into the vCPU.
    #[error("cannot restore vCPU {index}")]
    Restore {
        /// The vCPU index.
        index: u8,
        /// The KVM error.
        #[source]
        source: StateError,
    },
    /// LAPIC setup failed.
    #[error("cannot set up the local APIC of vCPU {index}")]
    Lapic {
        /// The vCPU index.
        index: u8,
        /// What went wrong.
        source: interrupts::InterruptError,
    },
}

/// The real-time signal used to kick vCPU threads out of KVM_RUN.
pub fn vcpu_kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Installs the (empty) handler for the kick signal. Its only job is to make
/// KVM_RUN return EINTR instead of killing the process.
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    extern "C" fn noop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    vmm_sys_util::signal::register_signal_handler(vcpu_kick_signal(), noop)
}

/// What the vCPU threads share with the rest of the VMM.
#[derive(Clone)]
pub struct VcpuShared {
    /// Port I/O devices.
    pub pio: Arc<Bus>,
    /// MMIO devices.
    pub mmio: Arc<Bus>,
    /// Where to report the end of the guest.
    pub exit: Arc<ExitNotifier>,
    /// Set when the VMM wants every vCPU to stop.
    pub stop: Arc<AtomicBool>,
    /// When vCPU 0 first entered the guest.
    pub first_entry: Arc<OnceLock<Instant>>,
    /// Where vCPUs park while the VM is paused.
    pub pause: Arc<PauseGate>,
    /// Exit counters (in `metrics.vcpu`).
    pub metrics: Arc<Metrics>,
}

/// Pausing and resuming vCPU threads: a pause request is raised, each vCPU
/// is kicked out of KVM_RUN and parks here until the VM resumes or stops.
#[derive(Debug, Default)]
pub struct PauseGate {
    requested: AtomicBool,
    parked: Mutex<usize>,
    cond: Condvar,
    /// A snapshot's request for every parked vCPU's state (see
    /// [`PauseGate::request_state`]).
    state_request: Mutex<Option<StateRequest>>,
    /// The last request's generation: it only grows, so a vCPU that
    /// answered one request (its `served`) answers every later one, also
    /// after the request was cleared and the VM resumed and paused again.
    generations: AtomicU64,
}

/// What a parked vCPU answers a state request with.
pub type StateReply = (u8, Result<VcpuState, StateError>);

/// A request for the state of every vCPU, served by each vCPU thread while
/// it is parked: the thread owns its vCPU fd, and only it knows whether
/// the last exit's I/O has been completed.
#[derive(Debug, Clone)]
struct StateRequest {
    generation: u64,
    msrs: Arc<Vec<u32>>,
    reply: mpsc::Sender<StateReply>,
}

impl PauseGate {
    /// Asks every vCPU to park; the caller then kicks them and waits with
    /// [`PauseGate::wait_parked`].
    pub fn request_pause(&self) {
        self.requested.store(true, Ordering::Release);
    }

    /// True while a pause is requested or in effect.
    pub fn is_paused(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) {
        self.requested.store(false, Ordering::Release);
        let _guard = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        self.cond.notify_all();
    }

    /// Wakes parked vCPUs so they notice the stop flag.
    pub fn wake_all(&self) {
        let _guard = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        self.cond.notify_all();
    }

    /// How many vCPUs are parked now.
    pub fn parked(&self) -> usize {
        *self.parked.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits up to `timeout` for `count` vCPUs to park; true if they did.
    pub fn wait_parked(&self, count: usize, timeout: Duration) -> bool {
        let guard = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        let (guard, _) = self
            .cond
            .wait_timeout_while(guard, timeout, |parked| *parked < count)
            .unwrap_or_else(|e| e.into_inner());
        *guard >= count
    }

    /// Asks every parked vCPU for its state (the MSRs in `msrs`); the
    /// answers arrive on the returned channel, one per vCPU. Call it only
    /// while the VM is paused.
    pub fn request_state(&self, msrs: Arc<Vec<u32>>) -> mpsc::Receiver<StateReply> {
        let (reply, answers) = mpsc::channel();
        {
            let mut slot = self.state_request.lock().unwrap_or_else(|e| e.into_inner());
            let generation = self.generations.fetch_add(1, Ordering::AcqRel) + 1;
            *slot = Some(StateRequest {
                generation,
                msrs,
                reply,
            });
        }
        // Under the lock the parked vCPUs check for requests with: none
        // can miss this wake-up between its check and its wait.
        let _guard = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        self.cond.notify_all();
        answers
    }

    /// Drops the request once answered, so its channel closes.
    pub fn clear_state_request(&self) {
        *self.state_request.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn pending_state_request(&self, served: u64) -> Option<StateRequest> {
        self.state_request
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .filter(|r| r.generation > served)
            .cloned()
    }

    /// Called by a vCPU thread between KVM_RUNs: parks while paused, and
    /// serves state requests (through `serve`) while parked.
    fn park_if_requested(
        &self,
        stop: &AtomicBool,
        served: &mut u64,
        mut serve: impl FnMut(&StateRequest),
    ) {
        if !self.requested.load(Ordering::Acquire) {
            return;
        }
        let mut parked = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        *parked += 1;
        self.cond.notify_all();
        while self.requested.load(Ordering::Acquire) && !stop.load(Ordering::Acquire) {
            if let Some(request) = self.pending_state_request(*served) {
                drop(parked);
                serve(&request);
                *served = request.generation;
                parked = self.parked.lock().unwrap_or_else(|e| e.into_inner());
                continue;
            }
            parked = self.cond.wait(parked).unwrap_or_else(|e| e.into_inner());
        }
        *parked -= 1;
    }
}

/// One vCPU.
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    shared: VcpuShared,
    /// The last state request this vCPU answered.
    state_served: u64,
}

/// Finishes the instruction the vCPU last exited for. KVM completes a port
/// or MMIO read only on the next KVM_RUN (it puts the data where the
/// instruction wants it and moves past it); state read before that would
/// replay the instruction on restore. An entry with `immediate_exit` set
/// completes it and returns at once, without running the guest; a string
/// instruction may need a few such rounds.
fn complete_pending_io(fd: &mut VcpuFd, shared: &VcpuShared) {
    fd.set_kvm_immediate_exit(1);
    for _ in 0..64 {
        match fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                if !shared.pio.read(u64::from(port), data) {
                    data.fill(0xff);
                }
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                shared.pio.write(u64::from(port), data);
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !shared.mmio.read(addr, data) {
                    data.fill(0);
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                shared.mmio.write(addr, data);
            }
            // EINTR: done. Anything else is left for the next real entry.
            _ => break,
        }
    }
    fd.set_kvm_immediate_exit(0);
}

/// A vCPU's registers as `key=value` words, for the logs of a guest that
/// died or was stopped (husk-bench soak reads them back).
struct Registers<'a>(&'a kvm_regs, &'a kvm_sregs);

impl std::fmt::Display for Registers<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (r, s) = (self.0, self.1);
        write!(
            f,
            "rip={:#x} rsp={:#x} rflags={:#x} cs={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} idt={:#x}/{:#x} tr={:#x}/{:#x}",
            r.rip, r.rsp, r.rflags, s.cs.selector, s.cr0, s.cr2, s.cr3, s.cr4, s.efer,
            s.idt.base, s.idt.limit, s.tr.base, s.tr.limit
        )
    }
}

/// A vCPU's pending and injected events as `key=value` words.
struct Events<'a>(&'a kvm_vcpu_events);

impl std::fmt::Display for Events<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ev = self.0;
        write!(
            f,
            "exception_injected={} exception_pending={} exception_nr={} exception_error_code={:#x} nmi_injected={} nmi_pending={} interrupt_injected={} interrupt_nr={}",
            ev.exception.injected, ev.exception.pending, ev.exception.nr, ev.exception.error_code,
            ev.nmi.injected, ev.nmi.pending, ev.interrupt.injected, ev.interrupt.nr
        )
    }
}

/// What a single KVM_RUN exit means for the run loop.
enum Step {
    Continue,
    Stop(VmExit),
}

impl Vcpu {
    /// Creates vCPU `index`.
    pub fn new(vm: &VmFd, index: u8, shared: VcpuShared) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(|source| VcpuError::Create { index, source })?;
        Ok(Vcpu {
            index,
            fd,
            shared,
            state_served: 0,
        })
    }

    /// The vCPU index (and APIC id).
    pub fn index(&self) -> u8 {
        self.index
    }

    /// Sets CPUID, MSRs, FPU, special registers and the LAPIC; the boot vCPU
    /// also gets `entry` in `rip`. Application processors wait for INIT/SIPI
    /// from the boot vCPU, which the in-kernel LAPIC delivers.
    pub fn configure(
        &self,
        host_cpuid: &CpuId,
        vcpu_count: u8,
        entry: Option<GuestAddress>,
    ) -> Result<(), VcpuError> {
        let index = self.index;
        let mut cpuid = host_cpuid.clone();
        cpuid::normalize(&mut cpuid, index, vcpu_count)
            .map_err(|source| VcpuError::Cpuid { index, source })?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(|source| VcpuError::SetCpuid { index, source })?;
        msr::setup_msrs(&self.fd).map_err(|source| VcpuError::Msrs { index, source })?;
        let regs_err = |source| VcpuError::Regs { index, source };
        if let Some(entry) = entry {
            regs::setup_regs(&self.fd, entry).map_err(regs_err)?;
            regs::setup_fpu(&self.fd).map_err(regs_err)?;
            regs::setup_sregs(&self.fd).map_err(regs_err)?;
        }
        interrupts::setup_lint(&self.fd).map_err(|source| VcpuError::Lapic { index, source })
    }

    /// Runs the guest until it ends or the VMM asks this vCPU to stop.
    pub fn run(mut self) {
        let span = tracing::debug_span!("vcpu", index = self.index);
        let _enter = span.enter();
        if self.index == 0 {
            let _ = self.shared.first_entry.set(Instant::now());
        }
        while !self.shared.stop.load(Ordering::Acquire) {
            // Before every entry, the first included: a restored VM may
            // start paused.
            self.park_if_paused();
            if self.shared.stop.load(Ordering::Acquire) {
                break;
            }
            match self.run_once() {
                Step::Continue => {}
                Step::Stop(exit) => {
                    tracing::debug!(%exit, "vCPU stops the VM");
                    if !exit.is_clean() {
                        self.log_failure_state(&exit);
                    }
                    if matches!(exit, VmExit::VcpuFault { .. }) {
                        self.shared.metrics.vcpu.failures.inc();
                    } else {
                        self.shared.metrics.vcpu.exit_final.inc();
                    }
                    self.shared.exit.notify(exit);
                    return;
                }
            }
        }
        // Stopped from outside (a signal, another vCPU's exit): say where the
        // guest was, which is what one wants to know about a stuck guest.
        // A signal means someone gave up on this VM (often a timeout):
        // then it is worth a warning.
        let killed = matches!(self.shared.exit.reason(), Some(VmExit::Signal(_)));
        let regs = match self.fd.get_regs() {
            Ok(regs) => regs,
            Err(e) => {
                tracing::info!(error = %Chain(&e), "vCPU stopped; registers unreadable");
                return;
            }
        };
        if !killed {
            tracing::info!(
                rip = format_args!("{:#x}", regs.rip),
                rsp = format_args!("{:#x}", regs.rsp),
                "vCPU stopped"
            );
            return;
        }
        // A stuck guest's paging and pending events say whether it runs
        // wild code or waits: with them, a memory dump can walk its
        // addresses (husk-bench soak does).
        match (self.fd.get_sregs(), self.fd.get_vcpu_events()) {
            (Ok(s), Ok(ev)) => tracing::warn!(
                vcpu = self.index,
                "vCPU stopped by a signal: {} {}",
                Registers(&regs, &s),
                Events(&ev)
            ),
            _ => tracing::warn!(
                vcpu = self.index,
                rip = format_args!("{:#x}", regs.rip),
                rsp = format_args!("{:#x}", regs.rsp),
                "vCPU stopped by a signal"
            ),
        }
    }

    /// Parks while the VM is paused, answering state requests meanwhile.
    fn park_if_paused(&mut self) {
        let Vcpu {
            index,
            fd,
            shared,
            state_served,
        } = self;
        shared
            .pause
            .park_if_requested(&shared.stop, state_served, |request| {
                complete_pending_io(fd, shared);
                let state = VcpuState::save(fd, *index, &request.msrs);
                let _ = request.reply.send((*index, state));
            });
    }

    /// Writes a snapshot's state into this (new) vCPU instead of the boot
    /// configuration.
    pub fn restore(&self, state: &VcpuState) -> Result<(), VcpuError> {
        state
            .restore(&self.fd)
            .map_err(|source| VcpuError::Restore {
                index: self.index,
                source,
            })
    }

    /// A guest that died (triple fault, emulation failure, entry failure)
    /// leaves only this vCPU's state as evidence: log it where it can be
    /// read after the process is gone.
    fn log_failure_state(&self, exit: &VmExit) {
        let regs = self.fd.get_regs();
        let sregs = self.fd.get_sregs();
        let events = self.fd.get_vcpu_events();
        match (regs, sregs) {
            // KVM on AMD re-initialises the vCPU on a shutdown intercept
            // (the VMCB is undefined after one), so a triple fault there
            // leaves the reset vector, not the state that faulted.
            (Ok(r), Ok(s)) if r.rip == 0xfff0 && s.cs.selector == 0xf000 && s.cr0 & 1 == 0 => {
                tracing::error!(
                    %exit,
                    vcpu = self.index,
                    "vCPU state at the guest's failure: reset by KVM (as on AMD after a triple fault); the faulting state is lost"
                )
            }
            (Ok(r), Ok(s)) => tracing::error!(
                %exit,
                vcpu = self.index,
                "vCPU state at the guest's failure: {}",
                Registers(&r, &s)
            ),
            (r, s) => tracing::error!(
                %exit,
                regs_error = ?r.err(),
                sregs_error = ?s.err(),
                "vCPU state at the guest's failure unreadable"
            ),
        }
        if let Ok(ev) = events {
            tracing::error!("vCPU events at the guest's failure: {}", Events(&ev));
        }
    }

    fn run_once(&mut self) -> Step {
        let index = self.index;
        let shared = &self.shared;
        let m = &shared.metrics.vcpu;
        match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                m.exit_io_in.inc();
                if !shared.pio.read(u64::from(port), data) {
                    // Nothing there: a floating ISA bus reads as all ones.
                    data.fill(0xff);
                }
                Step::Continue
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                m.exit_io_out.inc();
                shared.pio.write(u64::from(port), data);
                Step::Continue
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                m.exit_mmio_read.inc();
                if !shared.mmio.read(addr, data) {
                    tracing::trace!(addr, len = data.len(), "MMIO read of unassigned address");
                    data.fill(0);
                }
                Step::Continue
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                m.exit_mmio_write.inc();
                if !shared.mmio.write(addr, data) {
                    tracing::trace!(addr, len = data.len(), "MMIO write to unassigned address");
                }
                Step::Continue
            }
            Ok(VcpuExit::Shutdown) => Step::Stop(VmExit::TripleFault { vcpu: index }),
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                KVM_SYSTEM_EVENT_RESET => Step::Stop(VmExit::Reset),
                KVM_SYSTEM_EVENT_SHUTDOWN => Step::Stop(VmExit::Shutdown),
                KVM_SYSTEM_EVENT_CRASH => Step::Stop(VmExit::Crash { vcpu: index }),
                other => Step::Stop(VmExit::VcpuFault {
                    vcpu: index,
                    detail: format!("unknown system event {other}"),
                }),
            },
            Ok(VcpuExit::FailEntry(reason, _cpu)) => Step::Stop(VmExit::EntryFailure {
                vcpu: index,
                reason,
            }),
            Ok(VcpuExit::InternalError) => {
                let run = self.fd.get_kvm_run();
                // SAFETY: KVM filled the `internal` member of the exit union:
                // exit_reason is KVM_EXIT_INTERNAL_ERROR.
                let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
                Step::Stop(VmExit::InternalError {
                    vcpu: index,
                    suberror,
                })
            }
            Ok(VcpuExit::Intr) => {
                m.exit_interrupted.inc();
                Step::Continue
            }
            // Only reachable without an in-kernel irqchip; treat like an idle
            // vCPU that the next interrupt wakes.
            Ok(VcpuExit::Hlt) => Step::Continue,
            Ok(other) => Step::Stop(VmExit::VcpuFault {
                vcpu: index,
                detail: format!("unexpected exit {other:?}"),
            }),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                m.exit_interrupted.inc();
                Step::Continue
            }
            Err(e) => Step::Stop(VmExit::VcpuFault {
                vcpu: index,
                detail: format!("KVM_RUN failed: {e}"),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stopped_vcpus_state_is_logged_as_key_value_words() {
        let regs = kvm_regs {
            rip: 0xffff_ffff_c04c_4dcc,
            rsp: 0xff66_3db6_80bc_7d40,
            ..Default::default()
        };
        let mut sregs = kvm_sregs {
            cr3: 0x2a3_c000,
            cr4: 0x7506b0,
            ..Default::default()
        };
        sregs.cs.selector = 0x10;
        let line = Registers(&regs, &sregs).to_string();
        for word in [
            "rip=0xffffffffc04c4dcc",
            "rsp=0xff663db680bc7d40",
            "cs=0x10",
            "cr3=0x2a3c000",
            "cr4=0x7506b0",
        ] {
            assert!(line.split(' ').any(|w| w == word), "{word} in {line}");
        }
        let mut ev = kvm_vcpu_events::default();
        ev.interrupt.injected = 1;
        ev.interrupt.nr = 236;
        let line = Events(&ev).to_string();
        assert!(
            line.contains("interrupt_injected=1 interrupt_nr=236"),
            "{line}"
        );
    }

    #[test]
    fn a_parked_vcpu_answers_the_state_request_of_every_pause() {
        // A vCPU thread's loop, without KVM: park between "runs", answer
        // state requests with the request's generation.
        let gate = Arc::new(PauseGate::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, answers) = mpsc::channel();
        let vcpu = {
            let (gate, stop) = (gate.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut served = 0;
                while !stop.load(Ordering::Acquire) {
                    gate.park_if_requested(&stop, &mut served, |r| {
                        let _ = tx.send(r.generation);
                    });
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        };
        // Snapshot, resume, pause, snapshot again: each request answered
        // (the second was once left unanswered: its generation restarted
        // at the first's after the first was cleared).
        for pause in 0..3 {
            gate.request_pause();
            assert!(gate.wait_parked(1, Duration::from_secs(5)), "pause {pause}");
            let _replies = gate.request_state(Arc::new(Vec::new()));
            let answered = answers.recv_timeout(Duration::from_secs(5));
            assert!(answered.is_ok(), "pause {pause}: no answer");
            gate.clear_state_request();
            gate.resume();
        }
        stop.store(true, Ordering::Release);
        gate.wake_all();
        vcpu.join().unwrap();
    }
}
