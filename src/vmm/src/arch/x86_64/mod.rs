//! x86_64 guest setup: the guest-physical memory map, the Linux zero page,
//! 64-bit entry state (GDT, page tables, control registers), CPUID, MSRs, the
//! local APIC and the MP table that announces the vCPUs and the IOAPIC.

pub mod bootparams;
pub mod cpuid;
pub mod gdt;
pub mod interrupts;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
