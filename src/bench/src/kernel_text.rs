//! `husk-bench kernel-text`: whether anything wrote the guest kernel's code
//! or read-only data between two snapshots of one VM.
//!
//! After boot the guest kernel's `.text` and `.rodata` are read-only to the
//! guest itself (STRICT_KERNEL_RWX) and, in husk's guest kernel, nothing
//! patches them later (no jump labels, ftrace, kprobes, BPF JIT or
//! modules); only the static-call trampolines (`__SCT__*`) may be
//! rewritten. A VMM that writes guest memory it does not own (a used-ring or
//! rx write past its buffer, a stale descriptor after a reset) is not held
//! back by the guest's page protections, so a byte that changed there
//! between a snapshot taken after boot and one taken after heavy device
//! traffic is the corruption issue 22 looks for. The memory files are
//! husk's (`PUT /snapshot/create`): the guest's RAM from physical address 0,
//! file offset = physical address.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde_json::json;

/// Flags of `husk-bench kernel-text`.
#[derive(clap::Args)]
pub struct KernelTextArgs {
    /// The guest kernel the VM booted (an ELF vmlinux with its symbols).
    #[arg(long)]
    vmlinux: PathBuf,
    /// The memory file of the earlier snapshot.
    before: PathBuf,
    /// The memory file of the later snapshot.
    after: PathBuf,
}

/// The sections compared.
const SECTIONS: [&str; 2] = [".text", ".rodata"];
/// Code the kernel may rewrite at run time: static-call trampolines.
const MAY_CHANGE: &str = "__SCT__";

/// What the comparison needs from the vmlinux: the sections' virtual and
/// physical addresses, and the function symbols to name a difference by.
struct Kernel {
    /// (name, virtual address, physical address, length).
    sections: Vec<(String, u64, u64, u64)>,
    /// (address, size, name), sorted by address.
    symbols: Vec<(u64, u64, String)>,
}

fn u16_at(b: &[u8], at: usize) -> anyhow::Result<u16> {
    let s = b.get(at..at + 2).context("vmlinux is truncated")?;
    Ok(u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], at: usize) -> anyhow::Result<u32> {
    let s = b.get(at..at + 4).context("vmlinux is truncated")?;
    Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn u64_at(b: &[u8], at: usize) -> anyhow::Result<u64> {
    let s = b.get(at..at + 8).context("vmlinux is truncated")?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Ok(u64::from_le_bytes(a))
}

fn idx(v: u64) -> anyhow::Result<usize> {
    usize::try_from(v).context("vmlinux offset out of range")
}

/// The NUL-terminated string at `at` of a string table.
fn name_at(b: &[u8], table: usize, at: u32) -> String {
    let start = table.saturating_add(at as usize);
    let bytes = b.get(start..).unwrap_or_default();
    let end = bytes.iter().position(|&c| c == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

impl Kernel {
    /// Reads an x86-64 little-endian ELF vmlinux.
    fn parse(b: &[u8]) -> anyhow::Result<Kernel> {
        if b.get(..4) != Some(b"\x7fELF") || b.get(4) != Some(&2) || b.get(5) != Some(&1) {
            bail!("not a 64-bit little-endian ELF file");
        }
        let phoff = idx(u64_at(b, 0x20)?)?;
        let shoff = idx(u64_at(b, 0x28)?)?;
        let phnum = usize::from(u16_at(b, 0x38)?);
        let shnum = usize::from(u16_at(b, 0x3c)?);
        let shstrndx = usize::from(u16_at(b, 0x3e)?);
        // Loadable segments: (vaddr, paddr, memsz).
        let mut loads = Vec::new();
        for i in 0..phnum {
            let p = phoff + 56 * i;
            if u32_at(b, p)? == 1 {
                loads.push((u64_at(b, p + 16)?, u64_at(b, p + 24)?, u64_at(b, p + 40)?));
            }
        }
        let shdr = |i: usize| shoff + 64 * i;
        let shstr = idx(u64_at(b, shdr(shstrndx) + 24)?)?;
        let mut sections = Vec::new();
        let mut symbols = Vec::new();
        for i in 0..shnum {
            let h = shdr(i);
            let name = name_at(b, shstr, u32_at(b, h)?);
            let (kind, addr, offset, size) = (
                u32_at(b, h + 4)?,
                u64_at(b, h + 16)?,
                u64_at(b, h + 24)?,
                u64_at(b, h + 32)?,
            );
            if SECTIONS.contains(&name.as_str()) {
                let phys = loads
                    .iter()
                    .find(|(v, _, len)| addr >= *v && addr + size <= v + len)
                    .map(|(v, p, _)| addr - v + p)
                    .with_context(|| format!("{name} is in no loadable segment"))?;
                sections.push((name, addr, phys, size));
            } else if kind == 2 {
                // SHT_SYMTAB; its string table is the section it links to.
                let strtab = idx(u64_at(b, shdr(idx(u64::from(u32_at(b, h + 40)?))?) + 24)?)?;
                let (offset, size) = (idx(offset)?, idx(size)?);
                for s in (offset..offset + size).step_by(24) {
                    let value = u64_at(b, s + 8)?;
                    if value == 0 {
                        continue;
                    }
                    symbols.push((value, u64_at(b, s + 16)?, name_at(b, strtab, u32_at(b, s)?)));
                }
            }
        }
        if sections.len() != SECTIONS.len() {
            bail!("vmlinux lacks one of {SECTIONS:?}");
        }
        if symbols.is_empty() {
            bail!("vmlinux has no symbol table");
        }
        symbols.sort_unstable();
        Ok(Kernel { sections, symbols })
    }

    /// The symbol at or before `addr`, and whether `addr` lies inside one
    /// the kernel may rewrite (aliases at one address are all looked at).
    fn symbol(&self, addr: u64) -> (String, bool) {
        let i = self.symbols.partition_point(|s| s.0 <= addr);
        let Some((start, _, name)) = i.checked_sub(1).map(|i| &self.symbols[i]) else {
            return ("?".into(), false);
        };
        let allowed = self.symbols[..i]
            .iter()
            .rev()
            .take(32)
            .any(|(s, size, n)| addr < s + size && n.starts_with(MAY_CHANGE));
        (format!("{name}+{:#x}", addr - start), allowed)
    }
}

/// One run of changed bytes: (virtual address, length).
fn differences(a: &[u8], b: &[u8], base: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        if x == y {
            continue;
        }
        let at = base + i as u64;
        match out.last_mut() {
            Some((start, len)) if *start + *len == at => *len += 1,
            _ => out.push((at, 1)),
        }
    }
    out
}

fn read_section(f: &File, path: &Path, phys: u64, len: u64) -> anyhow::Result<Vec<u8>> {
    let mut buf = vec![0u8; idx(len)?];
    f.read_exact_at(&mut buf, phys)
        .with_context(|| format!("{} does not hold {phys:#x}+{len:#x}", path.display()))?;
    Ok(buf)
}

/// Compares; the JSON says where and what changed. Fails only when the
/// files cannot be read: the caller judges `unexpected`.
pub fn kernel_text(a: KernelTextArgs) -> anyhow::Result<serde_json::Value> {
    let elf = std::fs::read(&a.vmlinux)
        .with_context(|| format!("cannot read {}", a.vmlinux.display()))?;
    let kernel = Kernel::parse(&elf).with_context(|| format!("{}", a.vmlinux.display()))?;
    let open = |p: &Path| File::open(p).with_context(|| format!("cannot open {}", p.display()));
    let (before, after) = (open(&a.before)?, open(&a.after)?);
    let mut compared = 0u64;
    let mut changes = Vec::new();
    let mut unexpected = 0u64;
    for (name, vaddr, phys, len) in &kernel.sections {
        let x = read_section(&before, &a.before, *phys, *len)?;
        let y = read_section(&after, &a.after, *phys, *len)?;
        if x.iter().all(|&c| c == 0) {
            bail!(
                "{name} is all zeroes in {}: not this kernel's memory",
                a.before.display()
            );
        }
        compared += len;
        for (at, n) in differences(&x, &y, *vaddr) {
            let (symbol, allowed) = kernel.symbol(at);
            if !allowed {
                unexpected += n;
            }
            changes.push(json!({
                "section": name,
                "addr": format!("{at:#x}"),
                "len": n,
                "symbol": symbol,
                "allowed": allowed,
            }));
        }
    }
    changes.truncate(64);
    Ok(json!({
        "sections": kernel.sections.iter().map(|(n, v, p, l)| json!({
            "name": n, "addr": format!("{v:#x}"), "phys": format!("{p:#x}"), "len": l,
        })).collect::<Vec<_>>(),
        "compared_bytes": compared,
        "unexpected_bytes": unexpected,
        "changes": changes,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_of_changed_bytes_are_merged() {
        let a = [0u8, 1, 2, 3, 4, 5, 6, 7];
        let b = [0u8, 9, 9, 3, 4, 9, 6, 9];
        assert_eq!(
            differences(&a, &b, 0x1000),
            vec![(0x1001, 2), (0x1005, 1), (0x1007, 1)]
        );
        assert!(differences(&a, &a, 0).is_empty());
    }

    #[test]
    fn a_file_that_is_not_elf_is_refused() {
        assert!(Kernel::parse(b"MZ\x90\x00 not an ELF file at all").is_err());
        assert!(Kernel::parse(b"\x7fELF\x02\x01").is_err());
    }
}
