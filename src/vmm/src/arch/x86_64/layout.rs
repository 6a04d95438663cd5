//! The guest-physical memory map.
//!
//! ```text
//! 0x0000_0500  GDT            0x0000_7000  zero page (boot_params)
//! 0x0000_0520  IDT            0x0000_8ff0  boot stack (grows down)
//! 0x0000_9000  PML4           0x0000_a000  PDPT      0x0000_b000  PD
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  MP floating pointer (EBDA)   0x000f_0000  MP config table
//! 0x0010_0000  high memory: bzImage load address; vmlinux loads where its ELF says
//! ...          initrd at the top of low memory
//! 0x8000_0000  start of the 32-bit MMIO gap (2 GiB): IOAPIC, LAPIC, virtio-mmio
//! 0x1_0000_0000 guest RAM above the gap, for guests larger than 2 GiB
//! ```
//!
//! The 2 GiB gap start keeps every low-memory address below the 31-bit
//! `initrd_addr_max` a Linux kernel advertises, and leaves room for device
//! windows; guests larger than that get the rest of their RAM above 4 GiB.

use vm_memory::GuestAddress;

/// Where the GDT is written.
pub const GDT_START: u64 = 0x500;
/// Where the (empty) IDT is written.
pub const IDT_START: u64 = 0x520;
/// The Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables: PML4, PDPT and one page directory.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory (512 x 2 MiB pages: the first GiB).
pub const PDE_START: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// The longest command line a 6.1 x86 kernel accepts (COMMAND_LINE_SIZE), NUL included.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area: end of usable conventional memory.
pub const EBDA_START: u64 = 0x9fc00;
/// The MP configuration table, in the BIOS area the kernel never uses as RAM.
pub const MPTABLE_START: u64 = 0xf0000;
/// Room for the MP configuration table (up to the 1 MiB boundary).
pub const MPTABLE_MAX_SIZE: usize = 0x10000;
/// First address above the legacy 1 MiB region.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap.
pub const MMIO_GAP_START: u64 = 0x8000_0000;
/// End of the 32-bit MMIO gap: RAM continues here.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// IOAPIC registers.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Local APIC registers.
pub const APIC_ADDR: u32 = 0xfee0_0000;
/// The TSS KVM needs on Intel hosts (three pages just below the BIOS ROM).
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// Virtio-mmio device windows are handed out from here, inside the gap.
pub const MMIO_DEVICES_START: u64 = 0xd000_0000;

// The fixed structures must not overlap; checked when the crate is built.
const _: () = {
    assert!(IDT_START >= GDT_START + 4 * 8);
    // The stack gets the page between the zero page and the PML4.
    assert!(ZERO_PAGE_START + 4096 <= BOOT_STACK_POINTER & !0xfff);
    assert!(BOOT_STACK_POINTER < PML4_START);
    assert!(PDE_START + 4096 <= CMDLINE_START);
    assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
    assert!(MPTABLE_START + MPTABLE_MAX_SIZE as u64 <= HIMEM_START);
    assert!(MMIO_DEVICES_START > MMIO_GAP_START && MMIO_DEVICES_START < IOAPIC_ADDR as u64);
};

/// The guest RAM regions for a guest of `mem_size` bytes: one region below the
/// MMIO gap and, when the guest is larger than the gap start, one above 4 GiB.
pub fn ram_regions(mem_size: u64) -> Vec<(GuestAddress, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(GuestAddress(0), mem_size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (GuestAddress(MMIO_GAP_END), mem_size - MMIO_GAP_START),
        ]
    }
}

/// Where hot-pluggable memory starts in a guest of `mem_size` bytes: at
/// the first 1 GiB boundary above both its RAM and the MMIO gap (so above
/// 4 GiB), which is aligned to the guest's 128 MiB memory blocks too.
/// `None` if that overflows.
pub fn hotplug_region_start(mem_size: u64) -> Option<u64> {
    let top = ram_regions(mem_size)
        .last()
        .map(|(start, size)| start.0.checked_add(*size))
        .unwrap_or(Some(0))?;
    top.max(MMIO_GAP_END)
        .checked_next_multiple_of(HOTPLUG_ALIGN)
}

/// The alignment of the hot-pluggable region.
pub const HOTPLUG_ALIGN: u64 = 1 << 30;

/// End (exclusive) of the RAM below the MMIO gap.
pub fn low_mem_end(mem_size: u64) -> u64 {
    mem_size.min(MMIO_GAP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_region() {
        assert_eq!(ram_regions(128 << 20), vec![(GuestAddress(0), 128 << 20)]);
        assert_eq!(low_mem_end(128 << 20), 128 << 20);
    }

    #[test]
    fn large_guest_skips_the_gap() {
        let r = ram_regions(3 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], (GuestAddress(0), MMIO_GAP_START));
        assert_eq!(
            r[1],
            (GuestAddress(MMIO_GAP_END), (3 << 30) - MMIO_GAP_START)
        );
        assert_eq!(r.iter().map(|x| x.1).sum::<u64>(), 3 << 30);
        assert_eq!(low_mem_end(3 << 30), MMIO_GAP_START);
    }

    #[test]
    fn hotplug_memory_goes_above_ram_and_the_gap() {
        assert_eq!(hotplug_region_start(256 << 20), Some(MMIO_GAP_END));
        assert_eq!(hotplug_region_start(MMIO_GAP_START), Some(MMIO_GAP_END));
        // 3 GiB: RAM up to 5 GiB.
        assert_eq!(hotplug_region_start(3 << 30), Some(5 << 30));
        // 3.5 GiB: RAM up to 5.5 GiB, the region at 6 GiB.
        assert_eq!(hotplug_region_start(7 << 29), Some(6 << 30));
        assert_eq!(hotplug_region_start(u64::MAX - (1 << 20)), None);
    }

    #[test]
    fn guest_exactly_at_gap_is_one_region() {
        assert_eq!(ram_regions(MMIO_GAP_START).len(), 1);
    }
}
