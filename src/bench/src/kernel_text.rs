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
use serde_json::{json, Value};

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
    /// The files are of two boots (of one kernel on one kind of machine):
    /// the `__ro_after_init` data, set while each booted, may differ.
    #[arg(long)]
    across_boots: bool,
}

/// The sections compared.
const SECTIONS: [&str; 2] = [".text", ".rodata"];
/// Code the kernel may rewrite at run time: static-call trampolines.
const MAY_CHANGE: &str = "__SCT__";

/// What the comparison needs from the vmlinux: the sections' virtual and
/// physical addresses, and the function symbols to name a difference by.
pub struct Kernel {
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

    /// The `__ro_after_init` data (inside `.rodata`): written while the
    /// kernel boots, read-only after, so equal within one boot but not
    /// across two (the sched-clock offset, per-CPU layout, CPU bugs).
    fn ro_after_init(&self) -> Option<std::ops::Range<u64>> {
        let at = |n: &str| self.symbols.iter().find(|s| s.2 == n).map(|s| s.0);
        Some(at("__start_ro_after_init")?..at("__end_ro_after_init")?)
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
pub fn kernel_text(a: KernelTextArgs) -> anyhow::Result<Value> {
    compare(
        &Kernel::read(&a.vmlinux)?,
        &a.before,
        &a.after,
        a.across_boots,
    )
}

impl Kernel {
    /// Reads and parses the vmlinux at `vmlinux`.
    pub fn read(vmlinux: &Path) -> anyhow::Result<Kernel> {
        let elf =
            std::fs::read(vmlinux).with_context(|| format!("cannot read {}", vmlinux.display()))?;
        Kernel::parse(&elf).with_context(|| format!("{}", vmlinux.display()))
    }
}

/// [`kernel_text`] on two memory files of guests that booted `kernel`:
/// one guest's, or with `across_boots` two guests' (whose
/// `__ro_after_init` data may then differ).
pub fn compare(
    kernel: &Kernel,
    before_path: &Path,
    after_path: &Path,
    across_boots: bool,
) -> anyhow::Result<Value> {
    let boot_data = if across_boots {
        kernel.ro_after_init()
    } else {
        None
    };
    let open = |p: &Path| File::open(p).with_context(|| format!("cannot open {}", p.display()));
    let (before, after) = (open(before_path)?, open(after_path)?);
    let mut compared = 0u64;
    let mut changes = Vec::new();
    let mut unexpected = 0u64;
    for (name, vaddr, phys, len) in &kernel.sections {
        let x = read_section(&before, before_path, *phys, *len)?;
        let y = read_section(&after, after_path, *phys, *len)?;
        if x.iter().all(|&c| c == 0) {
            bail!(
                "{name} is all zeroes in {}: not this kernel's memory",
                before_path.display()
            );
        }
        compared += len;
        for (at, n) in differences(&x, &y, *vaddr) {
            let (symbol, may_change) = kernel.symbol(at);
            let allowed = may_change || boot_data.as_ref().is_some_and(|r| r.contains(&at));
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

/// Bits 51:12 of a page-table entry or CR3: the next table or the page.
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
const PRESENT: u64 = 1;
/// A 2 MiB or 1 GiB page in a page directory or PDPT entry.
const HUGE: u64 = 1 << 7;
/// CR4.LA57: five paging levels.
const CR4_LA57: u64 = 1 << 12;

/// How a guest virtual address translates through the page tables at
/// `cr3` in a memory file (file offset = guest physical address).
#[derive(Debug, PartialEq, Eq)]
pub enum Walk {
    /// To this guest physical address.
    Mapped(u64),
    /// Not present at this level (5 or 4 = the top table, 1 = the PTE).
    NotPresent { level: u8 },
    /// A table lies outside the file: the entry above it is garbage.
    TableOutside { level: u8, table: u64 },
}

/// Walks `va` through the guest's 4- or 5-level page tables (x86-64 long
/// mode); also returns each level's entry as read.
pub fn walk(mem: &File, cr3: u64, cr4: u64, va: u64) -> anyhow::Result<(Walk, Vec<u64>)> {
    let len = mem.metadata()?.len();
    let levels: u8 = if cr4 & CR4_LA57 != 0 { 5 } else { 4 };
    let mut table = cr3 & ADDR_MASK;
    let mut entries = Vec::new();
    for level in (1..=levels).rev() {
        let shift = 12 + 9 * u32::from(level - 1);
        let at = table + ((va >> shift) & 0x1ff) * 8;
        if at + 8 > len {
            return Ok((Walk::TableOutside { level, table }, entries));
        }
        let mut e = [0u8; 8];
        mem.read_exact_at(&mut e, at)?;
        let entry = u64::from_le_bytes(e);
        entries.push(entry);
        if entry & PRESENT == 0 {
            return Ok((Walk::NotPresent { level }, entries));
        }
        let page = 1u64 << shift;
        if level == 1 || ((level == 2 || level == 3) && entry & HUGE != 0) {
            let base = entry & ADDR_MASK & !(page - 1);
            return Ok((Walk::Mapped(base | (va & (page - 1))), entries));
        }
        table = entry & ADDR_MASK;
    }
    unreachable!("level 1 always returns")
}

/// What a stuck guest's `va` is: where it maps in the memory file `mem`,
/// the kernel symbol it falls in (if in the image) and the 32 bytes there.
pub fn describe(kernel: &Kernel, mem: &Path, cr3: u64, cr4: u64, va: u64) -> anyhow::Result<Value> {
    let f = File::open(mem).with_context(|| format!("cannot open {}", mem.display()))?;
    let (w, entries) = walk(&f, cr3, cr4, va)?;
    let in_image = kernel
        .sections
        .iter()
        .any(|(_, v, _, l)| va >= *v && va < v + l);
    let mut out = json!({
        "addr": format!("{va:#x}"),
        "entries": entries.iter().map(|e| format!("{e:#x}")).collect::<Vec<_>>(),
        "symbol": in_image.then(|| kernel.symbol(va).0),
    });
    match w {
        Walk::Mapped(phys) => {
            out["phys"] = json!(format!("{phys:#x}"));
            let mut bytes = [0u8; 32];
            if f.read_exact_at(&mut bytes, phys).is_ok() {
                out["bytes"] = json!(bytes.iter().map(|b| format!("{b:02x}")).collect::<String>());
            }
        }
        Walk::NotPresent { level } => out["not_present_at_level"] = json!(level),
        Walk::TableOutside { level, table } => {
            out["table_outside_memory"] = json!({"level": level, "table": format!("{table:#x}")})
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A memory file with 4-level tables at 0x1000.. mapping
    /// 0xffffffff81000000 by a 2 MiB page to 0x200000 and 0x400000 by a
    /// 4 KiB page to 0x3000, nothing else.
    fn paged_memory(path: &Path) -> u64 {
        let mut m = vec![0u8; 0x40_0000];
        let mut put =
            |at: u64, v: u64| m[at as usize..at as usize + 8].copy_from_slice(&v.to_le_bytes());
        let va: u64 = 0xffff_ffff_8100_0000;
        let (l4, l3, l2) = (0x1000u64, 0x2000u64, 0x4000u64);
        put(l4 + ((va >> 39) & 0x1ff) * 8, l3 | 3);
        put(l3 + ((va >> 30) & 0x1ff) * 8, l2 | 3);
        put(l2 + ((va >> 21) & 0x1ff) * 8, 0x20_0000 | HUGE | 3);
        // 0x400000: PML4[0] -> 0x5000, PDPT[0] -> 0x6000, PD[2] -> 0x7000,
        // PT[0] -> 0x3000.
        put(0x1000, 0x5000 | 3);
        put(0x5000, 0x6000 | 3);
        put(0x6000 + 2 * 8, 0x7000 | 3);
        put(0x7000, 0x3000 | 3 | (1 << 63));
        // PD[3] points outside the file.
        put(0x6000 + 3 * 8, 0x7fff_0000 | 3);
        std::fs::write(path, &m).unwrap();
        l4
    }

    #[test]
    fn boot_time_data_is_found_by_its_bounds() {
        let sym = |a: u64, n: &str| (a, 0, n.to_string());
        let mut k = Kernel {
            sections: Vec::new(),
            symbols: vec![
                sym(0x100, "__start_ro_after_init"),
                sym(0x180, "x86_arch_cap_msr"),
                sym(0x200, "__end_ro_after_init"),
            ],
        };
        assert_eq!(k.ro_after_init(), Some(0x100..0x200));
        k.symbols.pop();
        assert_eq!(k.ro_after_init(), None);
    }

    #[test]
    fn walks_find_huge_and_small_pages_and_say_where_a_walk_ends() {
        let path = std::env::temp_dir().join(format!("husk-bench-walk-{}", std::process::id()));
        let cr3 = paged_memory(&path);
        let file = File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let w = |va| walk(&file, cr3, 0, va).unwrap().0;
        assert_eq!(w(0xffff_ffff_8100_0dcc), Walk::Mapped(0x20_0dcc));
        assert_eq!(w(0xffff_ffff_811f_ffff), Walk::Mapped(0x3f_ffff));
        assert_eq!(w(0x40_0123), Walk::Mapped(0x3123));
        assert_eq!(w(0x40_1000), Walk::NotPresent { level: 1 });
        assert_eq!(w(0xffff_ffff_c04c_4dcc), Walk::NotPresent { level: 3 });
        assert_eq!(w(0xff66_3db6_80bc_7d40), Walk::NotPresent { level: 4 });
        assert_eq!(
            w(0x60_0000),
            Walk::TableOutside {
                level: 1,
                table: 0x7fff_0000
            }
        );
        // LA57: one more level on top, so every table is read a level
        // higher up (PDPT[0] of 0x6000 is empty).
        assert_eq!(
            walk(&file, 0x1000, CR4_LA57, 0x40_0123).unwrap().0,
            Walk::NotPresent { level: 3 }
        );
    }

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
