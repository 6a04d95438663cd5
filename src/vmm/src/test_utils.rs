//! Helpers for tests of this crate and of the integration tests.

/// Where [`tiny_elf`] loads its code (and enters it).
pub const TINY_ELF_ENTRY: u64 = 0x100_0000;

/// A minimal x86_64 ELF "kernel": one PT_LOAD of `code` at 16 MiB, entered
/// in 64-bit mode like a vmlinux. For tests of guests that misbehave on
/// purpose (triple faults, emulation failures) and of the ELF loader.
pub fn tiny_elf(code: &[u8]) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let entry = TINY_ELF_ENTRY;
    let mut e = vec![0u8; EHDR + PHDR];
    e[0..4].copy_from_slice(b"\x7fELF");
    e[4] = 2; // ELFCLASS64
    e[5] = 1; // little endian
    e[6] = 1; // EV_CURRENT
    e[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    e[20..24].copy_from_slice(&1u32.to_le_bytes());
    e[24..32].copy_from_slice(&entry.to_le_bytes());
    e[32..40].copy_from_slice(&(EHDR as u64).to_le_bytes()); // e_phoff
    e[52..54].copy_from_slice(&(EHDR as u16).to_le_bytes());
    e[54..56].copy_from_slice(&(PHDR as u16).to_le_bytes());
    e[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
    let ph = EHDR;
    let len = code.len() as u64;
    e[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    e[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes()); // R+X
    e[ph + 8..ph + 16].copy_from_slice(&((EHDR + PHDR) as u64).to_le_bytes());
    e[ph + 16..ph + 24].copy_from_slice(&entry.to_le_bytes());
    e[ph + 24..ph + 32].copy_from_slice(&entry.to_le_bytes());
    e[ph + 32..ph + 40].copy_from_slice(&len.to_le_bytes());
    e[ph + 40..ph + 48].copy_from_slice(&len.to_le_bytes());
    e[ph + 48..ph + 56].copy_from_slice(&0x1000u64.to_le_bytes());
    e.extend_from_slice(code);
    e
}
