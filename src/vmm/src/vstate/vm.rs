//! The KVM VM: capability checks, guest memory slots, the in-kernel irqchip
//! (PIC + IOAPIC) and PIT, and irqfd registration.

use std::sync::Arc;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::KVM_TSS_ADDRESS;

/// The KVM API version husk speaks.
const KVM_API_VERSION: i32 = 12;

/// Capabilities husk cannot work without.
const REQUIRED_CAPS: [(Cap, &str); 7] = [
    (Cap::Irqchip, "in-kernel irqchip"),
    (Cap::Irqfd, "irqfd"),
    (Cap::Ioeventfd, "ioeventfd"),
    (Cap::UserMemory, "user memory regions"),
    (Cap::SetTssAddr, "TSS address"),
    (Cap::Pit2, "in-kernel PIT"),
    (Cap::ExtCpuid, "extended CPUID"),
];

/// Errors while creating or configuring the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// The kernel speaks another KVM API.
    #[error("KVM API version {0} is not supported (want {KVM_API_VERSION})")]
    ApiVersion(i32),
    /// A required capability is missing.
    #[error("KVM lacks a capability husk needs: {0}")]
    MissingCap(&'static str),
    /// A guest memory region has no host mapping.
    #[error("guest memory region at {0:#x} has no host mapping")]
    NoHostMapping(u64),
    /// A VM ioctl failed.
    #[error("cannot {what}")]
    Ioctl {
        /// What was being done.
        what: &'static str,
        /// The KVM error.
        source: kvm_ioctls::Error,
    },
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Ioctl { what, source }
}

/// Opens /dev/kvm and checks the API version and capabilities.
pub fn open_kvm() -> Result<Kvm, VmError> {
    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    let version = kvm.get_api_version();
    if version != KVM_API_VERSION {
        return Err(VmError::ApiVersion(version));
    }
    for (cap, name) in REQUIRED_CAPS {
        if !kvm.check_extension(cap) {
            return Err(VmError::MissingCap(name));
        }
    }
    Ok(kvm)
}

/// A KVM VM with its irqchip and PIT.
pub struct Vm {
    // Shared with the hot-pluggable memory's slots ([`Vm::memory_slots`]).
    fd: Arc<VmFd>,
}

impl Vm {
    /// Creates the VM, its TSS area, the in-kernel irqchip and the PIT.
    pub fn new(kvm: &Kvm) -> Result<Self, VmError> {
        let fd = kvm.create_vm().map_err(ioctl("create the VM"))?;
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(ioctl("set the TSS address"))?;
        fd.create_irq_chip()
            .map_err(ioctl("create the in-kernel irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(ioctl("create the PIT"))?;
        Ok(Vm { fd: Arc::new(fd) })
    }

    /// Hands every guest memory region to KVM, one slot each.
    pub fn register_memory(&self, mem: &GuestMemoryMmap) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|_| VmError::NoHostMapping(region.start_addr().0))?;
            let desc = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mapping of exactly `memory_size`
            // bytes owned by `mem`, which outlives the VM (the Vmm holds both
            // and drops the VM fd first).
            unsafe { self.fd.set_user_memory_region(desc) }
                .map_err(ioctl("register guest memory"))?;
        }
        Ok(())
    }

    /// Makes writes to `event` raise `gsi` on the in-kernel irqchip.
    pub fn register_irqfd(&self, event: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(event, gsi)
            .map_err(ioctl("register an irqfd"))
    }

    /// Makes a 4-byte guest write of `datamatch` to MMIO `addr` signal
    /// `event` inside KVM, without an exit to userspace.
    pub fn register_ioevent(
        &self,
        event: &EventFd,
        addr: u64,
        datamatch: u32,
    ) -> Result<(), VmError> {
        self.fd
            .register_ioevent(event, &kvm_ioctls::IoEventAddress::Mmio(addr), datamatch)
            .map_err(ioctl("register an ioeventfd"))
    }

    /// The VM fd, for creating vCPUs.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The KVM memory slots of the hot-pluggable region of `mem`, from slot
    /// number `first_slot` on (the boot RAM holds the ones below).
    pub fn memory_slots(&self, mem: GuestMemoryMmap, first_slot: u32) -> super::slots::KvmSlots {
        super::slots::KvmSlots::new(self.fd.clone(), mem, first_slot)
    }
}
