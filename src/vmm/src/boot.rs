//! Loading a guest: the kernel (ELF vmlinux or bzImage, told apart by their
//! magic), the command line, the initrd at the top of low memory, and the
//! zero page that points the kernel at all of them.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::{self, bzimage::BzImage, elf::Elf, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::arch::x86_64::bootparams::{self, InitrdPlacement};
use crate::arch::x86_64::layout::{low_mem_end, CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START};
use crate::error::Flat;
use crate::host_file::{self, Accept};

/// Offset of the 64-bit entry point from a bzImage's load address.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// bzImage `xloadflags` bit: the kernel has a 64-bit entry point.
const XLF_KERNEL_64: u16 = 1;
/// The boot page tables identity-map only the first GiB.
const IDENTITY_MAPPED_END: u64 = 1 << 30;
const PAGE_SIZE: u64 = 4096;

/// Errors while loading the guest.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A file could not be opened or read.
    #[error("cannot read {what} {path}")]
    Io {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Neither an ELF vmlinux nor a bzImage.
    #[error("kernel {0} is neither an ELF vmlinux nor a bzImage")]
    NotAKernel(PathBuf),
    /// A bzImage without a 64-bit entry point.
    #[error("bzImage {0} has no 64-bit entry point (xloadflags lacks XLF_KERNEL_64)")]
    Not64Bit(PathBuf),
    /// linux-loader refused the kernel.
    #[error("cannot load kernel {path} into {mem_mib} MiB of guest memory")]
    Load {
        /// The kernel file.
        path: PathBuf,
        /// Guest memory size.
        mem_mib: u64,
        /// The loader's error (whose message names its own cause).
        source: Flat<loader::Error>,
    },
    /// The kernel's entry point is outside the identity-mapped first GiB.
    #[error("kernel entry point {0:#x} lies outside the first GiB")]
    EntryOutOfRange(u64),
    /// The command line is too long or has invalid characters.
    #[error("invalid kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// Writing the command line failed.
    #[error("cannot write the kernel command line")]
    WriteCmdline(#[source] Flat<loader::Error>),
    /// The initrd does not fit between the kernel and the end of low memory.
    #[error(
        "initrd {path} ({size} bytes) does not fit in guest memory: {available} bytes free \
         between the kernel and the end of low memory"
    )]
    InitrdTooLarge {
        /// The initrd file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Space left for it.
        available: u64,
    },
    /// The zero page could not be built or written.
    #[error(transparent)]
    BootParams(#[from] bootparams::BootParamsError),
}

/// What to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootSource {
    /// ELF vmlinux or bzImage.
    pub kernel: PathBuf,
    /// Optional initramfs (cpio, possibly compressed).
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
}

/// The kernel as loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedKernel {
    /// Where the boot vCPU starts.
    pub entry: GuestAddress,
    /// Where the initrd went, if there was one.
    pub initrd: Option<InitrdPlacement>,
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> BootError + 'a {
    move |source| BootError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// Loads kernel, command line and initrd into `mem` and writes the zero page.
pub fn load(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    source: &BootSource,
) -> Result<LoadedKernel, BootError> {
    let kpath = source.kernel.as_path();
    let mut kernel =
        host_file::open(kpath, false, Accept::RegularFile).map_err(io_err("kernel", kpath))?;
    let mut magic = [0u8; 4];
    let is_elf = match kernel.read_exact(&mut magic) {
        Ok(()) => magic == *b"\x7fELF",
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => false,
        Err(e) => return Err(io_err("kernel", kpath)(e)),
    };
    kernel.rewind().map_err(io_err("kernel", kpath))?;

    let load_err = |source| BootError::Load {
        path: kpath.to_path_buf(),
        mem_mib: mem_size >> 20,
        source: Flat(source),
    };
    let himem = Some(GuestAddress(HIMEM_START));
    let (entry, header, kernel_end) = if is_elf {
        let r = Elf::load(mem, None, &mut kernel, himem).map_err(load_err)?;
        (r.kernel_load, None, r.kernel_end)
    } else {
        let r = match BzImage::load(mem, None, &mut kernel, himem) {
            Ok(r) => r,
            Err(loader::Error::Bzimage(loader::bzimage::Error::InvalidBzImage)) => {
                return Err(BootError::NotAKernel(kpath.to_path_buf()))
            }
            Err(e) => return Err(load_err(e)),
        };
        let hdr = r
            .setup_header
            .ok_or_else(|| BootError::NotAKernel(kpath.to_path_buf()))?;
        if hdr.xloadflags & XLF_KERNEL_64 == 0 {
            return Err(BootError::Not64Bit(kpath.to_path_buf()));
        }
        // The decompressor needs init_size bytes from the load address.
        let end = r.kernel_load.0 + u64::from(hdr.init_size);
        if end > low_mem_end(mem_size) {
            return Err(load_err(loader::Error::Bzimage(
                loader::bzimage::Error::ReadBzImageCompressedKernel,
            )));
        }
        let entry = r.kernel_load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET);
        (entry, Some(hdr), r.kernel_end.max(end))
    };
    if entry.0 >= IDENTITY_MAPPED_END {
        return Err(BootError::EntryOutOfRange(entry.0));
    }

    let max_cmdline = match header {
        Some(h) if h.cmdline_size > 0 => (h.cmdline_size as usize + 1).min(CMDLINE_MAX_SIZE),
        _ => CMDLINE_MAX_SIZE,
    };
    let cmdline = Cmdline::try_from(&source.cmdline, max_cmdline).map_err(BootError::Cmdline)?;
    loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline)
        .map_err(|e| BootError::WriteCmdline(Flat(e)))?;

    let initrd = match &source.initrd {
        Some(path) => Some(load_initrd(
            mem,
            mem_size,
            path,
            align_up(kernel_end, PAGE_SIZE),
            header.map(|h| u64::from(h.initrd_addr_max)),
        )?),
        None => None,
    };

    let params = bootparams::build(header, mem_size, source.cmdline.len() + 1, initrd)?;
    bootparams::write(mem, params)?;
    Ok(LoadedKernel { entry, initrd })
}

fn load_initrd(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    path: &Path,
    lowest: u64,
    addr_max: Option<u64>,
) -> Result<InitrdPlacement, BootError> {
    let mut file =
        host_file::open(path, false, Accept::RegularFile).map_err(io_err("initrd", path))?;
    let size = file
        .seek(SeekFrom::End(0))
        .map_err(io_err("initrd", path))?;
    file.rewind().map_err(io_err("initrd", path))?;

    // The highest page-aligned spot below the end of low memory (and below
    // the kernel's initrd_addr_max, if it declared one).
    let mut top = low_mem_end(mem_size);
    if let Some(max) = addr_max.filter(|m| *m > 0) {
        top = top.min(max + 1);
    }
    let available = top.saturating_sub(lowest);
    let too_large = || BootError::InitrdTooLarge {
        path: path.to_path_buf(),
        size,
        available,
    };
    let size32 = u32::try_from(size).map_err(|_| too_large())?;
    if size > available {
        return Err(too_large());
    }
    let addr = (top - size) & !(PAGE_SIZE - 1);
    if addr < lowest {
        return Err(too_large());
    }
    let len = usize::try_from(size).map_err(|_| too_large())?;
    if !mem.check_range(GuestAddress(addr), len) {
        return Err(too_large());
    }
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, len)
        .map_err(|e| io_err("initrd", path)(std::io::Error::other(e)))?;
    Ok(InitrdPlacement {
        address: GuestAddress(addr),
        size: size32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::tiny_elf;
    use crate::vstate::memory;
    use std::fs::File;
    use std::io::Write;

    fn tmpfile(bytes: &[u8]) -> (tempdir::Dir, PathBuf) {
        let d = tempdir::Dir::new();
        let p = d.path().join("f");
        File::create(&p).unwrap().write_all(bytes).unwrap();
        (d, p)
    }

    /// A minimal tempdir without extra dependencies.
    mod tempdir {
        pub struct Dir(std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "husk-boot-test-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
            pub fn path(&self) -> &std::path::Path {
                &self.0
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    fn source(kernel: PathBuf, initrd: Option<PathBuf>) -> BootSource {
        BootSource {
            kernel,
            initrd,
            cmdline: "console=ttyS0 reboot=k".into(),
        }
    }

    #[test]
    fn elf_kernel_initrd_and_cmdline_land_where_expected() {
        let mem_size = 64 << 20;
        let mem = memory::create(mem_size).unwrap();
        let (_d1, k) = tmpfile(&tiny_elf(&[0xf4]));
        let (_d2, i) = tmpfile(&[0xab; 10000]);
        let loaded = load(&mem, mem_size, &source(k, Some(i))).unwrap();
        assert_eq!(loaded.entry, GuestAddress(0x100_0000));
        let initrd = loaded.initrd.unwrap();
        assert_eq!(initrd.size, 10000);
        assert_eq!(initrd.address.0 % PAGE_SIZE, 0);
        assert!(initrd.address.0 + 10000 <= mem_size);
        assert!(initrd.address.0 + 10000 > mem_size - PAGE_SIZE);
        let b: u8 = mem.read_obj(initrd.address).unwrap();
        assert_eq!(b, 0xab);
        let mut cmd = [0u8; 23];
        mem.read_slice(&mut cmd, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&cmd, b"console=ttyS0 reboot=k\0");
        let code: u8 = mem.read_obj(GuestAddress(0x100_0000)).unwrap();
        assert_eq!(code, 0xf4);
    }

    #[test]
    fn garbage_and_empty_kernels_are_refused() {
        let mem = memory::create(64 << 20).unwrap();
        for bytes in [&b""[..], &[0x5a; 8192][..], &b"\x7fEL"[..]] {
            let (_d, k) = tmpfile(bytes);
            let err = load(&mem, 64 << 20, &source(k, None)).unwrap_err();
            assert!(
                matches!(err, BootError::NotAKernel(_) | BootError::Load { .. }),
                "{err}"
            );
        }
    }

    #[test]
    fn missing_files_say_which() {
        let mem = memory::create(64 << 20).unwrap();
        let err = load(&mem, 64 << 20, &source("/nonexistent/vmlinux".into(), None)).unwrap_err();
        assert!(err
            .to_string()
            .contains("cannot read kernel /nonexistent/vmlinux"));
        let (_d, k) = tmpfile(&tiny_elf(&[0xf4]));
        let err = load(
            &mem,
            64 << 20,
            &source(k, Some("/nonexistent/initrd".into())),
        )
        .unwrap_err();
        assert!(err.to_string().contains("cannot read initrd"));
    }

    #[test]
    fn initrd_that_does_not_fit_is_refused() {
        let mem_size = 20 << 20; // kernel at 16 MiB leaves < 4 MiB above it
        let mem = memory::create(mem_size).unwrap();
        let (_d1, k) = tmpfile(&tiny_elf(&[0xf4]));
        let (_d2, i) = tmpfile(&vec![1u8; 5 << 20]);
        let err = load(&mem, mem_size, &source(k, Some(i))).unwrap_err();
        assert!(matches!(err, BootError::InitrdTooLarge { .. }), "{err}");
    }

    #[test]
    fn kernel_larger_than_memory_is_refused() {
        let mem = memory::create(8 << 20).unwrap();
        let (_d, k) = tmpfile(&tiny_elf(&[0xf4]));
        let err = load(&mem, 8 << 20, &source(k, None)).unwrap_err();
        assert!(matches!(err, BootError::Load { .. }), "{err}");
    }

    #[test]
    fn overlong_cmdline_is_refused() {
        let mem = memory::create(64 << 20).unwrap();
        let (_d, k) = tmpfile(&tiny_elf(&[0xf4]));
        let mut s = source(k, None);
        s.cmdline = "x".repeat(CMDLINE_MAX_SIZE + 1);
        assert!(matches!(
            load(&mem, 64 << 20, &s),
            Err(BootError::Cmdline(_))
        ));
    }
}
