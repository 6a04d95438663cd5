//! Can this host's KVM run a Linux guest? A probe for `husk check`, cheaper
//! than booting a kernel and more honest than opening `/dev/kvm`.
//!
//! Some KVMs create VMs and run a real-mode `out`/`hlt` guest, yet cannot
//! run Linux's user space: `kvm_pvm` (a paravirtual KVM on hosts without
//! VMX/SVM) emulates an unmodified guest's ring-0 code instruction by
//! instruction and faults on the first `syscall` from user space. So the
//! probe guest does what every Linux guest does within its first second
//! of user space, in a few instructions: it starts in 64-bit long mode with
//! paging (through the same capabilities, irqchip and PIT a microVM uses),
//! drops to ring 3 with `sysretq`, and from there makes a `syscall` into a
//! ring-0 handler that runs `swapgs`. Each step reports itself with an
//! `out` to [`PROBE_PORT`]; the guest passes when all four reports arrive
//! in order. Nothing in the probe depends on a guest kernel or image.

use std::sync::mpsc;
use std::time::Duration;

use kvm_bindings::{kvm_msr_entry, kvm_regs, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::VcpuExit;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::vm::{open_kvm, Vm, VmError};
use crate::arch::x86_64::gdt::{gdt_entry, segment_from_gdt};

/// The I/O port the probe guest reports its progress on.
pub const PROBE_PORT: u16 = 0x500;

/// Guest memory: one 2 MiB page, identity-mapped and open to ring 3.
const MEM_SIZE: usize = 2 << 20;
const GDT: u64 = 0x500;
const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000;
const KERNEL_ENTRY: u64 = 0x4000;
const USER_ENTRY: u64 = 0x4100;
const SYSCALL_ENTRY: u64 = 0x4200;

/// null, kernel code (0x08), kernel data (0x10), user data (0x18), user
/// code (0x20): the order `syscall`/`sysret` derive their selectors from
/// (STAR[47:32] = 0x08, STAR[63:48] = 0x10), as Linux lays out its GDT;
/// then a TSS (0x28), which VM entry wants loaded.
const PROBE_GDT: [u64; 6] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0xc0f3, 0, 0xfffff),
    gdt_entry(0xa0fb, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const EFER_SCE: u64 = 0x1;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// `mov dx, PROBE_PORT; mov al, STEP; out dx, al`.
const fn report(step: u8) -> [u8; 7] {
    let port = PROBE_PORT.to_le_bytes();
    [0x66, 0xba, port[0], port[1], 0xb0, step, 0xee]
}

/// Ring 0 at [`KERNEL_ENTRY`]: report 1, then `sysretq` to [`USER_ENTRY`]
/// with IOPL 3 (so ring 3 may report too) and interrupts off.
fn kernel_code() -> Vec<u8> {
    let mut code = report(Step::Kernel as u8).to_vec();
    code.extend([0x48, 0xb9]); // mov rcx, imm64: where sysret returns to
    code.extend(USER_ENTRY.to_le_bytes());
    code.extend([0x41, 0xbb, 0x02, 0x30, 0x00, 0x00]); // mov r11d, 0x3002: RFLAGS
    code.extend([0x48, 0x0f, 0x07]); // sysretq
    code
}

/// Ring 3 at [`USER_ENTRY`]: report 2, then `syscall`.
fn user_code() -> Vec<u8> {
    let mut code = report(Step::User as u8).to_vec();
    code.extend([0x0f, 0x05]); // syscall
    code.extend([0x0f, 0x0b]); // ud2: never reached
    code
}

/// Ring 0 at [`SYSCALL_ENTRY`] (LSTAR): `swapgs` as Linux's entry does,
/// report 3, then the final report 4. The vCPU is never entered again.
fn syscall_code() -> Vec<u8> {
    let mut code = vec![0x0f, 0x01, 0xf8]; // swapgs
    code.extend(report(Step::Syscall as u8));
    code.extend(report(Step::Done as u8));
    code.extend([0x0f, 0x0b]); // ud2: never reached
    code
}

/// How far the probe guest got, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Step {
    /// Not even the first instruction reported.
    None = 0,
    /// Ring 0 in long mode ran.
    Kernel = 1,
    /// `sysretq` reached ring 3, which ran.
    User = 2,
    /// `syscall` from ring 3 entered the ring-0 handler.
    Syscall = 3,
    /// The handler ran to its end.
    Done = 4,
}

impl Step {
    /// What reaching this step shows, for a report.
    pub fn describe(self) -> &'static str {
        match self {
            Step::None => "no guest instruction ran",
            Step::Kernel => "64-bit ring-0 code ran, but the guest never reached user space",
            Step::User => "user space ran, but its first syscall failed",
            Step::Syscall => "the syscall entered the kernel, whose handler then failed",
            Step::Done => "a 64-bit guest ran ring 0, user space and a syscall",
        }
    }
}

/// What the probe saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeOutcome {
    /// The last step the guest reported.
    pub reached: Step,
    /// How the run ended when it did not pass: the exit KVM gave
    /// (`KVM_EXIT_INTERNAL_ERROR`, a triple fault, ...).
    pub stopped_by: Option<String>,
}

impl ProbeOutcome {
    /// True when the guest ran every step: this KVM runs Linux guests.
    pub fn passed(&self) -> bool {
        self.reached == Step::Done
    }
}

/// Errors setting up the probe (before any guest instruction runs).
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// /dev/kvm, its API version, its capabilities or the VM's creation.
    #[error("cannot create a VM")]
    Vm(#[from] VmError),
    /// The probe's memory could not be made or written.
    #[error("cannot set up the probe guest's memory")]
    Memory(#[source] vm_memory::GuestMemoryError),
    /// The probe's memory could not be mapped.
    #[error("cannot map the probe guest's memory")]
    Mmap(#[from] super::memory::MemoryError),
    /// The MSR list could not be built.
    #[error("cannot build the probe's MSR list")]
    Msrs(#[source] vmm_sys_util::fam::Error),
    /// A vCPU ioctl failed.
    #[error("cannot {what}")]
    Vcpu {
        /// What was being done.
        what: &'static str,
        /// The KVM error.
        source: kvm_ioctls::Error,
    },
    /// The probe's thread could not start.
    #[error("cannot start the probe's thread")]
    Thread(#[source] std::io::Error),
}

fn vcpu_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> ProbeError {
    move |source| ProbeError::Vcpu { what, source }
}

fn write_memory(mem: &GuestMemoryMmap) -> Result<(), vm_memory::GuestMemoryError> {
    for (i, entry) in PROBE_GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT + (i as u64) * 8))?;
    }
    // Present, writable, user-accessible at every level; one 2 MiB page.
    mem.write_obj(PDPT | 0x07, GuestAddress(PML4))?;
    mem.write_obj(PD | 0x07, GuestAddress(PDPT))?;
    mem.write_obj(0x87u64, GuestAddress(PD))?;
    mem.write_slice(&kernel_code(), GuestAddress(KERNEL_ENTRY))?;
    mem.write_slice(&user_code(), GuestAddress(USER_ENTRY))?;
    mem.write_slice(&syscall_code(), GuestAddress(SYSCALL_ENTRY))?;
    Ok(())
}

/// Runs the probe guest; gives up on a guest still running after
/// `timeout` (its thread is left blocked in KVM_RUN, to end with the
/// process).
pub fn probe_linux_guest(timeout: Duration) -> Result<ProbeOutcome, ProbeError> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("kvm-probe".into())
        .spawn(move || {
            let _ = tx.send(run_probe());
        })
        .map_err(ProbeError::Thread)?;
    match rx.recv_timeout(timeout) {
        Ok(result) => result,
        Err(_) => Ok(ProbeOutcome {
            reached: Step::None,
            stopped_by: Some(format!("the guest was still running after {timeout:?}")),
        }),
    }
}

fn run_probe() -> Result<ProbeOutcome, ProbeError> {
    let kvm = open_kvm()?;
    let vm = Vm::new(&kvm)?;
    let mem = super::memory::create(MEM_SIZE as u64)?;
    write_memory(&mem).map_err(ProbeError::Memory)?;
    vm.register_memory(&mem)?;
    let mut vcpu = vm
        .fd()
        .create_vcpu(0)
        .map_err(vcpu_err("create the vCPU"))?;
    // Long mode needs the LM bit in the guest's CPUID: hand it the host's.
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(vcpu_err("read the supported CPUID"))?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(vcpu_err("set the vCPU's CPUID"))?;

    let mut sregs = vcpu
        .get_sregs()
        .map_err(vcpu_err("get special registers"))?;
    sregs.gdt.base = GDT;
    sregs.gdt.limit = (std::mem::size_of_val(&PROBE_GDT) - 1) as u16;
    // No IDT: any exception becomes a triple fault, which ends the run.
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    let data = segment_from_gdt(PROBE_GDT[2], 2);
    sregs.cs = segment_from_gdt(PROBE_GDT[1], 1);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(PROBE_GDT[5], 5);
    sregs.cr3 = PML4;
    sregs.cr4 |= 0x20; // PAE
    sregs.cr0 |= 0x8000_0011; // PG, ET, PE
    sregs.efer |= EFER_LME | EFER_LMA | EFER_SCE;
    vcpu.set_sregs(&sregs)
        .map_err(vcpu_err("set special registers"))?;
    let msrs = Msrs::from_entries(&[
        msr(MSR_STAR, (0x10 << 48) | (0x08 << 32)),
        msr(MSR_LSTAR, SYSCALL_ENTRY),
        msr(MSR_SYSCALL_MASK, 0),
        msr(MSR_KERNEL_GS_BASE, 0),
    ])
    .map_err(ProbeError::Msrs)?;
    let set = vcpu.set_msrs(&msrs).map_err(vcpu_err("set MSRs"))?;
    if set != msrs.as_slice().len() {
        return Err(ProbeError::Vcpu {
            what: "set every MSR",
            source: kvm_ioctls::Error::new(libc::EINVAL),
        });
    }
    vcpu.set_regs(&kvm_regs {
        rip: KERNEL_ENTRY,
        rflags: 0x2,
        ..Default::default()
    })
    .map_err(vcpu_err("set registers"))?;

    let mut reached = Step::None;
    // Each report is one exit; a few spurious ones (signals) are allowed.
    for _ in 0..16 {
        let stopped_by = match vcpu.run() {
            Ok(VcpuExit::IoOut(PROBE_PORT, data)) => {
                let next = match data.first() {
                    Some(1) => Step::Kernel,
                    Some(2) => Step::User,
                    Some(3) => Step::Syscall,
                    Some(4) => Step::Done,
                    _ => Step::None,
                };
                if next as u8 != reached as u8 + 1 {
                    Some(format!("out-of-order report {data:?} after {reached:?}"))
                } else {
                    reached = next;
                    if reached == Step::Done {
                        return Ok(ProbeOutcome {
                            reached,
                            stopped_by: None,
                        });
                    }
                    continue;
                }
            }
            Ok(VcpuExit::Intr) => continue,
            Ok(VcpuExit::InternalError) => Some("KVM_EXIT_INTERNAL_ERROR".to_string()),
            Ok(VcpuExit::Shutdown) => Some("a triple fault (KVM_EXIT_SHUTDOWN)".to_string()),
            Ok(VcpuExit::FailEntry(reason, _)) => {
                Some(format!("a failed VM entry (reason {reason:#x})"))
            }
            Ok(other) => Some(format!("an unexpected exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => Some(format!("KVM_RUN failed: {e}")),
        };
        return Ok(ProbeOutcome {
            reached,
            stopped_by,
        });
    }
    Ok(ProbeOutcome {
        reached,
        stopped_by: Some("too many exits without progress".into()),
    })
}

fn msr(index: u32, data: u64) -> kvm_msr_entry {
    kvm_msr_entry {
        index,
        data,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_code_fits_between_its_entry_points() {
        assert!(KERNEL_ENTRY + kernel_code().len() as u64 <= USER_ENTRY);
        assert!(USER_ENTRY + user_code().len() as u64 <= SYSCALL_ENTRY);
        assert!(SYSCALL_ENTRY + (syscall_code().len() as u64) < MEM_SIZE as u64);
        assert!(GDT + std::mem::size_of_val(&PROBE_GDT) as u64 <= PML4);
    }

    #[test]
    fn sysret_selectors_land_on_the_user_segments() {
        // sysretq: CS = STAR[63:48] + 16, SS = STAR[63:48] + 8, both RPL 3.
        let (cs, ss) = (0x10 + 16, 0x10 + 8);
        assert_eq!(segment_from_gdt(PROBE_GDT[cs / 8], 4).dpl, 3);
        assert_eq!(segment_from_gdt(PROBE_GDT[cs / 8], 4).l, 1);
        assert_eq!(segment_from_gdt(PROBE_GDT[ss / 8], 3).dpl, 3);
        // syscall: CS = STAR[47:32], SS = STAR[47:32] + 8, ring 0.
        assert_eq!(segment_from_gdt(PROBE_GDT[1], 1).dpl, 0);
        assert_eq!(segment_from_gdt(PROBE_GDT[2], 2).type_, 0x3);
    }

    #[test]
    fn reports_name_their_port_and_step() {
        assert_eq!(report(3), [0x66, 0xba, 0x00, 0x05, 0xb0, 3, 0xee]);
    }
}
