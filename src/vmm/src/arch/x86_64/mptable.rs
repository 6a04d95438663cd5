//! The Intel MultiProcessor Specification 1.4 table: how a guest kernel built
//! without ACPI learns its vCPUs (one processor entry each, APIC id = index),
//! the ISA bus, the IOAPIC and how the 24 IOAPIC pins map to ISA IRQs.
//!
//! The floating pointer sits at the start of the EBDA, where the kernel scans;
//! the configuration table goes into the BIOS area below 1 MiB (never RAM for
//! the guest), which leaves room for the largest vCPU count husk allows.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{APIC_ADDR, EBDA_START, IOAPIC_ADDR, MPTABLE_MAX_SIZE, MPTABLE_START};

/// Highest vCPU count the table (8-bit xAPIC ids, one left for the IOAPIC) can describe.
pub const MAX_VCPUS: u8 = 254;
/// Number of IOAPIC input pins described (the KVM in-kernel IOAPIC has 24).
pub const IOAPIC_PINS: u8 = 24;

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const CPU_SIGNATURE: u32 = 0x600; // family 6
const CPU_FEATURES: u32 = (1 << 9) | 1; // APIC, FPU

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_INTSRC: u8 = 3;
const ENTRY_LINTSRC: u8 = 4;
const IRQ_INT: u8 = 0;
const IRQ_NMI: u8 = 1;
const IRQ_EXTINT: u8 = 3;

/// Errors while writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// Zero vCPUs or more than the table can describe.
    #[error("the MP table can describe 1 to {MAX_VCPUS} vCPUs, not {0}")]
    VcpuCount(u8),
    /// The table would not fit its area.
    #[error("the MP table needs {0} bytes, more than its area holds")]
    TooLarge(usize),
    /// Guest memory could not be written.
    #[error("cannot write the MP table into guest memory")]
    Write(#[from] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |acc, b| acc.wrapping_add(*b))
        .wrapping_neg()
}

/// The configuration table (header and entries) for `vcpus` vCPUs.
fn config_table(vcpus: u8) -> Vec<u8> {
    let ioapic_id = vcpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;

    for cpu in 0..vcpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for pin in 0..IOAPIC_PINS {
        entries.extend_from_slice(&[ENTRY_INTSRC, IRQ_INT, 0, 0, 0, pin, ioapic_id, pin]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_LINTSRC, IRQ_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[ENTRY_LINTSRC, IRQ_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let length = (44 + entries.len()) as u16;
    let mut table = Vec::with_capacity(usize::from(length));
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&length.to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"HUSK    ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&APIC_ADDR.to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes()); // extended table: none
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);
    table
}

fn floating_pointer(table_addr: u32) -> [u8; 16] {
    let mut mpf = [0u8; 16];
    mpf[0..4].copy_from_slice(b"_MP_");
    mpf[4..8].copy_from_slice(&table_addr.to_le_bytes());
    mpf[8] = 1; // length in 16-byte paragraphs
    mpf[9] = 4; // spec revision 1.4
    mpf[10] = checksum(&mpf);
    mpf
}

/// Writes the MP floating pointer and configuration table for `vcpus` vCPUs.
pub fn setup_mptable(mem: &GuestMemoryMmap, vcpus: u8) -> Result<(), MptableError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(MptableError::VcpuCount(vcpus));
    }
    let table = config_table(vcpus);
    if table.len() > MPTABLE_MAX_SIZE {
        return Err(MptableError::TooLarge(table.len()));
    }
    mem.write_slice(
        &floating_pointer(MPTABLE_START as u32),
        GuestAddress(EBDA_START),
    )?;
    mem.write_slice(&table, GuestAddress(MPTABLE_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn checksums_are_valid_and_counts_match() {
        for vcpus in [1u8, 2, 64, MAX_VCPUS] {
            let m = mem();
            setup_mptable(&m, vcpus).unwrap();
            let mut mpf = [0u8; 16];
            m.read_slice(&mut mpf, GuestAddress(EBDA_START)).unwrap();
            assert_eq!(&mpf[0..4], b"_MP_");
            assert_eq!(sum(&mpf), 0);
            let ptr = u32::from_le_bytes(mpf[4..8].try_into().unwrap());
            assert_eq!(u64::from(ptr), MPTABLE_START);

            let mut hdr = [0u8; 44];
            m.read_slice(&mut hdr, GuestAddress(MPTABLE_START)).unwrap();
            assert_eq!(&hdr[0..4], b"PCMP");
            let len = u16::from_le_bytes([hdr[4], hdr[5]]) as usize;
            let mut table = vec![0u8; len];
            m.read_slice(&mut table, GuestAddress(MPTABLE_START))
                .unwrap();
            assert_eq!(sum(&table), 0);
            let count = u16::from_le_bytes([hdr[34], hdr[35]]);
            assert_eq!(count, u16::from(vcpus) + 2 + u16::from(IOAPIC_PINS) + 2);
            assert_eq!(len, 44 + 20 * usize::from(vcpus) + 8 * (2 + 24 + 2));
            // The first processor is the BSP, the others are not.
            assert_eq!(table[44 + 3], CPU_ENABLED | CPU_BOOTPROCESSOR);
            if vcpus > 1 {
                assert_eq!(table[44 + 20 + 1], 1);
                assert_eq!(table[44 + 20 + 3], CPU_ENABLED);
            }
        }
    }

    #[test]
    fn bad_vcpu_counts_are_refused() {
        assert!(matches!(
            setup_mptable(&mem(), 0),
            Err(MptableError::VcpuCount(0))
        ));
        assert!(matches!(
            setup_mptable(&mem(), 255),
            Err(MptableError::VcpuCount(255))
        ));
    }

    #[test]
    fn too_little_memory_is_an_error_not_a_panic() {
        let small = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        assert!(matches!(
            setup_mptable(&small, 1),
            Err(MptableError::Write(_))
        ));
    }
}
