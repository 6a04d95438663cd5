//! KVM memory slots for the hot-pluggable region: the virtio-mem device
//! decides which slots of its region the guest may use (one with a plugged
//! block in it), and this maps or unmaps them with
//! `KVM_SET_USER_MEMORY_REGION`. A slot that is not mapped is not memory
//! to the guest at all: its accesses exit to the VMM as MMIO, which reads
//! zeros and drops writes.

use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::devices::virtio::mem::SlotMapper;

/// The region's slots in one VM.
pub struct KvmSlots {
    // Declared before `mem`: this clone of the VM fd goes first, so the
    // VM never outlives the mapping its slots point into.
    fd: Arc<VmFd>,
    mem: GuestMemoryMmap,
    first_slot: u32,
}

impl KvmSlots {
    /// Slots `first_slot`, `first_slot + 1`, ... of the VM behind `fd`,
    /// pointing into `mem` (which holds the hot-pluggable region).
    pub fn new(fd: Arc<VmFd>, mem: GuestMemoryMmap, first_slot: u32) -> Self {
        KvmSlots {
            fd,
            mem,
            first_slot,
        }
    }

    fn set(&self, index: u32, addr: GuestAddress, size: u64, map: bool) -> std::io::Result<()> {
        let invalid = || std::io::Error::from_raw_os_error(libc::EINVAL);
        let len = usize::try_from(size).map_err(|_| invalid())?;
        let slice = self.mem.get_slice(addr, len).map_err(|_| invalid())?;
        if slice.len() != len {
            return Err(invalid());
        }
        let slot = self.first_slot.checked_add(index).ok_or_else(invalid)?;
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: addr.0,
            memory_size: if map { size } else { 0 },
            userspace_addr: slice.ptr_guard().as_ptr() as u64,
        };
        // SAFETY: the host range is inside a mapping of `self.mem` (checked
        // just above), which this value keeps alive for as long as it holds
        // the VM fd (and the fd goes first when it is dropped; the VMM's own
        // fd goes before its memory too). The region is the hot-pluggable
        // one, which no other slot covers. Size 0 deletes the slot.
        unsafe { self.fd.set_user_memory_region(region) }.map_err(std::io::Error::from)
    }
}

impl SlotMapper for KvmSlots {
    fn map(&mut self, index: u32, addr: GuestAddress, size: u64) -> std::io::Result<()> {
        self.set(index, addr, size, true)
    }

    fn unmap(&mut self, index: u32, addr: GuestAddress, size: u64) -> std::io::Result<()> {
        self.set(index, addr, size, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory;

    #[test]
    fn slots_map_and_unmap_in_a_real_vm() {
        // A VM with its boot RAM in slot 0 and a hot-pluggable region
        // above; needs /dev/kvm (any KVM, the paravirtual one included).
        let kvm = crate::vstate::vm::open_kvm().expect("/dev/kvm");
        let vm = crate::vstate::vm::Vm::new(&kvm).unwrap();
        let boot = memory::create(32 << 20).unwrap();
        vm.register_memory(&boot).unwrap();
        let at = GuestAddress(4 << 30);
        let mem = memory::add_region(&boot, at, 256 << 20, memory::Backing::Private).unwrap();
        let mut slots = vm.memory_slots(mem, 1);
        slots.map(0, at, 128 << 20).unwrap();
        slots
            .map(1, GuestAddress(at.0 + (128 << 20)), 128 << 20)
            .unwrap();
        // The same range in a second slot overlaps: KVM refuses.
        assert!(slots.map(2, at, 128 << 20).is_err());
        slots.unmap(0, at, 128 << 20).unwrap();
        // Mapped again after it was taken away.
        slots.map(0, at, 128 << 20).unwrap();
        // Beyond the region: refused before KVM is asked.
        assert!(slots
            .map(3, GuestAddress(at.0 + (256 << 20)), 128 << 20)
            .is_err());
    }
}
