//! husk's virtual machine monitor.
//!
//! A microVM is a KVM VM with anonymous guest memory, a Linux kernel loaded
//! by the 64-bit boot protocol, one thread per vCPU, and devices on a
//! port-I/O and an MMIO bus. [`Vmm`] is the one controller: the CLI and the
//! API build, start and run VMs through it, never through KVM directly.
//!
//! ```text
//! config ──► Vmm::new ──► vstate::vm (KVM fd, irqchip, PIT, memory slots)
//!                     ──► boot (kernel, cmdline, initrd, zero page)
//!                     ──► arch::x86_64 (page tables, GDT, MP table, CPUID, MSRs)
//!                     ──► devices (serial, i8042)
//!        Vmm::start  ──► vCPU threads (KVM_RUN loop, I/O exits to the buses),
//!                        each thread under its seccomp filter (seccomp.rs)
//!        Vmm::run    ──► event loop until the guest resets or dies
//! ```

#![deny(missing_docs)]

pub mod arch;
pub mod boot;
pub mod config;
pub mod controller;
pub mod devices;
pub mod error;
pub mod exit;
pub mod host_file;
pub mod log_limit;
pub mod metrics;
pub mod persist;
pub mod seccomp;
pub mod signal;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;
pub mod vmm;
pub mod vstate;

pub use boot::BootSource;
pub use config::{DriveConfig, NetConfig, SerialOutput, VmConfig, VsockConfig, DEFAULT_CMDLINE};
pub use devices::virtio::block::BlockConfig;
pub use devices::virtio::net::MacAddr;
pub use exit::VmExit;
pub use vmm::{Vmm, VmmError};
