//! The Linux zero page (`struct boot_params`): where the command line and the
//! initrd are, and the E820 map of guest RAM.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{
    low_mem_end, ram_regions, CMDLINE_START, EBDA_START, HIMEM_START, ZERO_PAGE_START,
};

const E820_RAM: u32 = 1;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;

/// Errors while building the zero page.
#[derive(Debug, thiserror::Error)]
pub enum BootParamsError {
    /// More E820 entries than the zero page holds.
    #[error("too many E820 entries")]
    E820Full,
    /// Guest memory could not be written.
    #[error("cannot write the zero page into guest memory")]
    Write(#[from] vm_memory::GuestMemoryError),
}

/// `boot_params` as plain bytes for guest memory.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ZeroPage(boot_params);

// SAFETY: boot_params is a packed C struct of integers and arrays of integers
// with no padding bytes and no invalid bit patterns.
unsafe impl ByteValued for ZeroPage {}

/// Where the initrd was placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitrdPlacement {
    /// Guest-physical address of its first byte.
    pub address: GuestAddress,
    /// Its size in bytes.
    pub size: u32,
}

fn add_e820(params: &mut boot_params, addr: u64, size: u64) -> Result<(), BootParamsError> {
    let n = usize::from(params.e820_entries);
    let slot = params
        .e820_table
        .get_mut(n)
        .ok_or(BootParamsError::E820Full)?;
    *slot = boot_e820_entry {
        addr,
        size,
        r#type: E820_RAM,
    };
    params.e820_entries += 1;
    Ok(())
}

/// Builds the zero page. `header` is the bzImage's setup header, or `None`
/// for an ELF vmlinux (a minimal header is made up then).
pub fn build(
    header: Option<setup_header>,
    mem_size: u64,
    cmdline_len: usize,
    initrd: Option<InitrdPlacement>,
) -> Result<boot_params, BootParamsError> {
    let mut params = boot_params::default();
    match header {
        Some(h) => params.hdr = h,
        None => {
            params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            params.hdr.header = KERNEL_HDR_MAGIC;
            params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
        }
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.address.0 as u32;
        params.hdr.ramdisk_size = initrd.size;
    }

    // Conventional memory up to the EBDA; the legacy video/BIOS hole and the
    // MP table area stay out of the map.
    add_e820(&mut params, 0, EBDA_START)?;
    let low_end = low_mem_end(mem_size);
    if low_end > HIMEM_START {
        add_e820(&mut params, HIMEM_START, low_end - HIMEM_START)?;
    }
    for (start, size) in ram_regions(mem_size).into_iter().skip(1) {
        add_e820(&mut params, start.0, size)?;
    }
    Ok(params)
}

/// Writes the zero page where `rsi` will point.
pub fn write(mem: &GuestMemoryMmap, params: boot_params) -> Result<(), BootParamsError> {
    mem.write_obj(ZeroPage(params), GuestAddress(ZERO_PAGE_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::{MMIO_GAP_END, MMIO_GAP_START};

    fn e820(p: &boot_params) -> Vec<(u64, u64)> {
        p.e820_table[..usize::from(p.e820_entries)]
            .iter()
            .map(|e| (e.addr, e.size))
            .collect()
    }

    #[test]
    fn small_guest_map() {
        let p = build(None, 128 << 20, 20, None).unwrap();
        assert_eq!(
            e820(&p),
            vec![(0, EBDA_START), (HIMEM_START, (128 << 20) - HIMEM_START)]
        );
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ p.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ p.hdr.ramdisk_image }, 0);
    }

    #[test]
    fn large_guest_map_skips_the_gap() {
        let p = build(None, 3 << 30, 20, None).unwrap();
        assert_eq!(
            e820(&p),
            vec![
                (0, EBDA_START),
                (HIMEM_START, MMIO_GAP_START - HIMEM_START),
                (MMIO_GAP_END, (3u64 << 30) - MMIO_GAP_START)
            ]
        );
    }

    #[test]
    fn bzimage_header_is_kept_and_initrd_recorded() {
        let h = setup_header {
            version: 0x20f,
            kernel_alignment: 0x20_0000,
            ..Default::default()
        };
        let initrd = InitrdPlacement {
            address: GuestAddress(0x700_0000),
            size: 4096,
        };
        let p = build(Some(h), 128 << 20, 10, Some(initrd)).unwrap();
        assert_eq!({ p.hdr.version }, 0x20f);
        assert_eq!({ p.hdr.kernel_alignment }, 0x20_0000);
        assert_eq!({ p.hdr.type_of_loader }, KERNEL_LOADER_OTHER);
        assert_eq!({ p.hdr.ramdisk_image }, 0x700_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 4096);
    }

    #[test]
    fn zero_page_is_written_where_rsi_points() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        write(&mem, build(None, 128 << 20, 5, None).unwrap()).unwrap();
        let magic: u32 = mem.read_obj(GuestAddress(ZERO_PAGE_START + 0x202)).unwrap();
        assert_eq!(magic, KERNEL_HDR_MAGIC);
        let entries: u8 = mem.read_obj(GuestAddress(ZERO_PAGE_START + 0x1e8)).unwrap();
        assert_eq!(entries, 2);
    }
}
