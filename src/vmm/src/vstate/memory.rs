//! Guest RAM: MAP_NORESERVE mappings laid out around the MMIO gap (see
//! `arch::x86_64::layout`), and the hot-pluggable region a virtio-mem
//! device hands out block by block: mapped the same way, added to guest
//! memory after the boot RAM went to KVM, and given back to the host a
//! block at a time ([`discard`]) when the guest unplugs it.
//!
//! Memory is anonymous and private ([`Backing::Private`]) unless another
//! process must map it too: a vhost-user backend (virtiofsd) reads and
//! writes the guest's buffers itself, so a VM with such a device gets
//! [`Backing::Shared`] memory, one memfd per region mapped `MAP_SHARED`,
//! whose descriptors go to the backend.

use std::sync::Arc;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap};

use crate::arch::x86_64::layout::ram_regions;
use crate::error::Flat;

/// Errors while allocating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The size does not fit this host's address space.
    #[error("guest memory of {0} bytes does not fit the host's address space")]
    TooLarge(u64),
    /// mmap refused.
    #[error("cannot map {size} bytes of guest memory")]
    Map {
        /// Requested size.
        size: u64,
        /// The mapping error (vm-memory's message names its cause).
        source: Flat<vm_memory::mmap::FromRangesError>,
    },
    /// The memfd behind shared guest memory could not be made.
    #[error("cannot create a memfd of {size} bytes for shared guest memory")]
    Memfd {
        /// Requested size.
        size: u64,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Why part of guest memory could not be given back to the host.
#[derive(Debug, thiserror::Error)]
pub enum DiscardError {
    /// The range is not inside one region of guest memory, or not page aligned.
    #[error("{len:#x} bytes at {addr:#x} are not a page-aligned range of one guest memory region")]
    Range {
        /// Start of the range.
        addr: u64,
        /// Its length.
        len: u64,
    },
    /// madvise refused.
    #[error("cannot release {len:#x} bytes of guest memory at {addr:#x}")]
    Madvise {
        /// Start of the range.
        addr: u64,
        /// Its length.
        len: u64,
        /// The OS error.
        source: std::io::Error,
    },
}

/// How guest memory is backed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backing {
    /// Anonymous private mappings: only the VMM (and KVM) see them.
    #[default]
    Private,
    /// One memfd per region, mapped `MAP_SHARED`, so a vhost-user backend
    /// can map the same pages (see `devices::virtio::fs`).
    Shared,
}

/// A new memfd of `size` bytes for one region of shared memory, named
/// `name` (what `/proc/PID/maps` shows of its mappings).
fn memfd(size: u64, name: &std::ffi::CStr) -> Result<std::fs::File, MemoryError> {
    use std::os::fd::FromRawFd;
    let map_err = |source: std::io::Error| MemoryError::Memfd { size, source };
    // SAFETY: memfd_create reads the NUL-terminated name and returns a new
    // file descriptor or -1; it touches no memory of ours otherwise.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(map_err(std::io::Error::last_os_error()));
    }
    // SAFETY: fd was just returned by memfd_create and nothing else owns it.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    // Sparse: pages are allocated when the guest (or the backend) touches them.
    file.set_len(size).map_err(map_err)?;
    Ok(file)
}

/// `size` bytes at `addr`: anonymous and private without `file`; with
/// one, vm-memory maps it `MAP_SHARED | MAP_NORESERVE`.
fn map(
    addr: GuestAddress,
    size: u64,
    file: Option<vm_memory::FileOffset>,
) -> Result<GuestRegionMmap, MemoryError> {
    let len = usize::try_from(size).map_err(|_| MemoryError::TooLarge(size))?;
    GuestRegionMmap::from_range(addr, len, file).map_err(|source| MemoryError::Map {
        size,
        source: Flat(source),
    })
}

/// One region of `size` bytes at `addr`, backed as `backing` says.
fn region(addr: GuestAddress, size: u64, backing: Backing) -> Result<GuestRegionMmap, MemoryError> {
    let file = match backing {
        Backing::Private => None,
        Backing::Shared => Some(vm_memory::FileOffset::new(
            memfd(size, c"husk-guest-ram")?,
            0,
        )),
    };
    let region = map(addr, size, file)?;
    if backing == Backing::Shared {
        // `map` checked that `size` fits a usize.
        let len = size as usize;
        // Private guest RAM gets transparent huge pages where the host's
        // THP is on (Debian's default); shared memory only if asked and
        // the host's shmem_enabled allows it ("advise"). Without them, a
        // large guest is millions of 4 KiB pages behind KVM's two-level
        // paging (docs/devices.md).
        // SAFETY: madvise(2) on the whole mapping the region owns; the
        // advice changes how its pages are allocated, never their contents.
        let rc = unsafe { libc::madvise(region.as_ptr().cast(), len, libc::MADV_HUGEPAGE) };
        if rc != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "no huge pages for shared guest memory");
        }
    }
    Ok(region)
}

/// `mem` with a region of `size` bytes at `addr` added: the hot-pluggable
/// memory, mapped like guest RAM (nothing is allocated until touched).
/// KVM does not see it yet; the virtio-mem device maps it slot by slot.
pub fn add_region(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    size: u64,
    backing: Backing,
) -> Result<GuestMemoryMmap, MemoryError> {
    let region = region(addr, size, backing)?;
    // Overlapping an existing region is the only failure left.
    mem.insert_region(Arc::new(region))
        .map_err(|_| MemoryError::TooLarge(size))
}

const PAGE_SIZE: u64 = 4096;

/// Gives the pages of `[addr, addr + len)` back to the host: the VMM's
/// resident memory drops by what the guest had touched there, and the
/// range reads as zeros afterwards (private memory: `MADV_DONTNEED`;
/// shared memory: `MADV_REMOVE`, which frees the memfd's pages for every
/// process that maps them, where `MADV_DONTNEED` would only unmap them
/// from ours). The range must be page aligned and inside one region of
/// `mem`.
pub fn discard(mem: &GuestMemoryMmap, addr: GuestAddress, len: u64) -> Result<(), DiscardError> {
    let range = || DiscardError::Range { addr: addr.0, len };
    if addr.0 % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 || len == 0 {
        return Err(range());
    }
    let count = usize::try_from(len).map_err(|_| range())?;
    let slice = mem.get_slice(addr, count).map_err(|_| range())?;
    if slice.len() != count {
        return Err(range());
    }
    let shared = mem
        .find_region(addr)
        .is_some_and(|r| r.flags() & libc::MAP_SHARED != 0);
    let advice = if shared {
        libc::MADV_REMOVE
    } else {
        libc::MADV_DONTNEED
    };
    let host = slice.ptr_guard_mut().as_ptr();
    // SAFETY: [host, host + count) lies inside one mapping that `mem` owns
    // and keeps alive (get_slice checked the bounds), and both ends are
    // page aligned (the regions' mappings start on a page and addr and len
    // are multiples of a page). Either advice only drops the pages'
    // contents, which then read as zeros (MADV_REMOVE punches a hole in the
    // region's memfd, so the backend's mapping reads zeros too); nothing in
    // the VMM holds a Rust reference into guest memory (vm-memory copies in
    // and out with volatile accesses), so no reference sees its memory
    // change under it.
    let rc = unsafe { libc::madvise(host.cast(), count, advice) };
    if rc != 0 {
        return Err(DiscardError::Madvise {
            addr: addr.0,
            len,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Maps `mem_size` bytes of private guest RAM.
pub fn create(mem_size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    create_with(mem_size, Backing::Private)
}

/// `size` bytes of memory to share with another process, not guest RAM:
/// one memfd mapped `MAP_SHARED` at address 0 of an address space of its
/// own (a virtio-fs relay's rings and buffers, `devices::virtio::fs::relay`).
pub fn shared_buffer(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let file = vm_memory::FileOffset::new(memfd(size, c"husk-fs-relay")?, 0);
    let region = map(GuestAddress(0), size, Some(file))?;
    GuestMemoryMmap::from_regions(vec![region]).map_err(|_| MemoryError::TooLarge(size))
}

/// Maps `mem_size` bytes of guest RAM, backed as `backing` says.
pub fn create_with(mem_size: u64, backing: Backing) -> Result<GuestMemoryMmap, MemoryError> {
    let regions = ram_regions(mem_size)
        .into_iter()
        .map(|(addr, size)| region(GuestAddress(addr.0), size, backing))
        .collect::<Result<Vec<_>, _>>()?;
    GuestMemoryMmap::from_regions(regions).map_err(|_| MemoryError::TooLarge(mem_size))
}

/// One region of guest memory as a snapshot records it: where it sits in
/// the guest and where its bytes are in the memory file (the regions lie
/// end to end there, in guest address order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RegionState {
    /// Guest physical address of the region's first byte.
    pub guest_base: u64,
    /// Its size in bytes.
    pub size: u64,
    /// Where it starts in the memory file.
    pub file_offset: u64,
}

/// Errors while writing or mapping a memory file.
#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    /// The memory file could not be written.
    #[error("cannot write the memory file")]
    Write(#[source] std::io::Error),
    /// Guest memory could not be read.
    #[error("cannot read guest memory at {0:#x}")]
    Read(u64),
    /// The memory file's size is not the sum of the regions'.
    #[error("the memory file is {found} bytes; the snapshot's guest memory is {expected} bytes")]
    Size {
        /// Bytes the snapshot's regions add up to.
        expected: u64,
        /// Bytes in the file.
        found: u64,
    },
    /// The regions recorded in the snapshot do not describe guest memory.
    #[error("the snapshot's memory regions are not a valid guest memory layout")]
    Layout,
    /// The memory file could not be inspected or mapped.
    #[error("cannot map the memory file")]
    Map(#[source] std::io::Error),
    /// Shared guest memory for the memory file's data could not be made.
    #[error("cannot allocate shared guest memory for the memory file")]
    Shared(#[source] MemoryError),
    /// The memory file could not be read into shared guest memory.
    #[error("cannot copy the memory file at offset {offset:#x} into shared guest memory")]
    Copy {
        /// Where in the memory file.
        offset: u64,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Where each region of `mem` goes in a memory file.
pub fn region_states(mem: &GuestMemoryMmap) -> Vec<RegionState> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let mut offset = 0;
    mem.iter()
        .map(|r| {
            let state = RegionState {
                guest_base: r.start_addr().0,
                size: r.len(),
                file_offset: offset,
            };
            offset += r.len();
            state
        })
        .collect()
}

/// Bytes the memory file holds for these regions.
pub fn file_size(regions: &[RegionState]) -> u64 {
    regions.iter().map(|r| r.size).sum()
}

/// [`region_states`] of every region of `mem` but the one starting at
/// `except` (the hot-pluggable region, whose unplugged memory is not
/// saved), laid out end to end in the memory file.
pub fn region_states_except(mem: &GuestMemoryMmap, except: Option<u64>) -> Vec<RegionState> {
    let mut offset = 0;
    region_states(mem)
        .into_iter()
        .filter(|r| Some(r.guest_base) != except)
        .map(|mut r| {
            r.file_offset = offset;
            offset += r.size;
            r
        })
        .collect()
}

const PAGE: usize = 4096;
const CHUNK: usize = 1 << 20;
static ZERO_PAGE: [u8; PAGE] = [0; PAGE];

/// The runs of pages of `chunk` that are not all zeroes, as byte ranges
/// (a page is compared with a zero page: a memcmp, fast in any build).
pub(crate) fn nonzero_runs(chunk: &[u8]) -> Vec<std::ops::Range<usize>> {
    let len = chunk.len();
    let is_zero = |p: &[u8]| p == &ZERO_PAGE[..p.len()];
    let mut runs = Vec::new();
    let mut page = 0;
    while page < len {
        let start = page;
        while page < len && !is_zero(&chunk[page..(page + PAGE).min(len)]) {
            page += PAGE;
        }
        let end = page.min(len);
        if end > start {
            runs.push(start..end);
        }
        page += PAGE;
    }
    runs
}

/// Writes the `regions` of guest memory (from [`region_states`] or
/// [`region_states_except`]) to `file`, region after region. Pages that
/// are all zeroes are not written: the file is sized first, so they are
/// holes that read as zeroes and take no disk space (most of a freshly
/// booted guest's memory was never touched).
pub fn dump(
    mem: &GuestMemoryMmap,
    regions: &[RegionState],
    file: &std::fs::File,
) -> Result<u64, MemoryFileError> {
    use std::os::unix::fs::FileExt;
    use vm_memory::Bytes;
    file.set_len(file_size(regions))
        .map_err(MemoryFileError::Write)?;
    let mut buf = vec![0u8; CHUNK];
    let mut written = 0u64;
    for r in regions {
        let mut done = 0u64;
        while done < r.size {
            let len = (r.size - done).min(CHUNK as u64) as usize;
            let chunk = &mut buf[..len];
            let addr = r.guest_base + done;
            mem.read_slice(chunk, GuestAddress(addr))
                .map_err(|_| MemoryFileError::Read(addr))?;
            // Runs of non-zero pages, each written with one call.
            for run in nonzero_runs(chunk) {
                let at = r.file_offset + done + run.start as u64;
                written += run.len() as u64;
                file.write_all_at(&chunk[run], at)
                    .map_err(MemoryFileError::Write)?;
            }
            done += len as u64;
        }
    }
    Ok(written)
}

/// Maps a memory file as guest memory, private and copy-on-write: nothing
/// is read until the guest touches a page, the pages it only reads stay in
/// the host's page cache (shared with every other VM restored from the
/// same file), and its writes go to private copies, never to the file.
pub fn from_file(
    file: &std::fs::File,
    regions: &[RegionState],
) -> Result<GuestMemoryMmap, MemoryFileError> {
    use vm_memory::mmap::MmapRegionBuilder;
    use vm_memory::{FileOffset, GuestRegionMmap};
    check_file(file, regions)?;
    let mut mapped = Vec::with_capacity(regions.len());
    for r in regions {
        let size = usize::try_from(r.size).map_err(|_| MemoryFileError::Layout)?;
        let fd = file.try_clone().map_err(MemoryFileError::Map)?;
        let region = MmapRegionBuilder::new(size)
            .with_file_offset(FileOffset::new(fd, r.file_offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| MemoryFileError::Map(std::io::Error::other(e.to_string())))?;
        mapped.push(
            GuestRegionMmap::new(region, GuestAddress(r.guest_base))
                .ok_or(MemoryFileError::Layout)?,
        );
    }
    GuestMemoryMmap::from_regions(mapped).map_err(|_| MemoryFileError::Layout)
}

/// Checks that `file` is as large as `regions` say and that each region
/// lies inside it.
fn check_file(file: &std::fs::File, regions: &[RegionState]) -> Result<(), MemoryFileError> {
    let expected = file_size(regions);
    let found = file.metadata().map_err(MemoryFileError::Map)?.len();
    if found != expected {
        return Err(MemoryFileError::Size { expected, found });
    }
    for r in regions {
        let fits = r
            .file_offset
            .checked_add(r.size)
            .is_some_and(|end| end <= expected);
        if r.size == 0 || usize::try_from(r.size).is_err() || !fits {
            return Err(MemoryFileError::Layout);
        }
    }
    Ok(())
}

/// What filling shared guest memory from a memory file did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// Bytes of the file's data extents that were read.
    pub read_bytes: u64,
    /// Bytes written into guest memory (the pages of those extents that
    /// are not all zeroes).
    pub copied_bytes: u64,
    /// Data extents the file system reported.
    pub extents: u64,
}

/// `lseek(fd, offset, whence)` for SEEK_DATA and SEEK_HOLE: `None` when
/// there is no data at or past `offset` (ENXIO).
fn seek(file: &std::fs::File, offset: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
    use std::os::fd::AsRawFd;
    let off = libc::off_t::try_from(offset)
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    // SAFETY: lseek(2) on a descriptor `file` owns; it only moves the
    // file's offset (which nothing here relies on: reads are positioned)
    // and touches no memory of ours.
    let rc = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(rc as u64))
}

/// Copies the data of `[start, end)` of `file` into `dst` at
/// `start - base`, skipping pages that are all zeroes; adds what it did to
/// `stats`. The pages are written through `dst`'s mapping, not the memfd:
/// faults on a mapping that asked for huge pages (MADV_HUGEPAGE, as guest
/// memory does) fill 2 MiB at a time where shmem's huge pages are on,
/// where writes to the file itself would allocate 4 KiB pages one by one.
fn copy_extent(
    file: &std::fs::File,
    dst: &GuestRegionMmap,
    (start, end, base): (u64, u64, u64),
    buf: &mut [u8],
    stats: &mut CopyStats,
) -> Result<(), MemoryFileError> {
    use std::os::unix::fs::FileExt;
    use vm_memory::{Bytes, MemoryRegionAddress};
    let mut at = start;
    while at < end {
        let len = (end - at).min(buf.len() as u64) as usize;
        let chunk = &mut buf[..len];
        file.read_exact_at(chunk, at)
            .map_err(|source| MemoryFileError::Copy { offset: at, source })?;
        stats.read_bytes += len as u64;
        for run in nonzero_runs(chunk) {
            let to = at - base + run.start as u64;
            stats.copied_bytes += run.len() as u64;
            dst.write_slice(&chunk[run], MemoryRegionAddress(to))
                .map_err(|e| MemoryFileError::Copy {
                    offset: at,
                    source: std::io::Error::other(e.to_string()),
                })?;
        }
        at += len as u64;
    }
    Ok(())
}

/// Guest memory for a VM restored with a vhost-user device, which must map
/// guest memory itself: one memfd per region, mapped `MAP_SHARED` as
/// [`Backing::Shared`] memory is at boot, filled with the memory file's
/// data. Only the file's data extents are read (SEEK_DATA/SEEK_HOLE) and
/// only their pages that are not all zeroes are written, through the
/// mapping (so in huge pages where shmem has them: then a 2 MiB page
/// with any data is allocated whole; otherwise the file's holes stay
/// unallocated in the memfds). Unlike [`from_file`], everything
/// the guest had touched is copied up front, and the copy is this VM's
/// own: clones restored this way share no pages with the file or with
/// each other.
pub fn from_file_shared(
    file: &std::fs::File,
    regions: &[RegionState],
) -> Result<(GuestMemoryMmap, CopyStats), MemoryFileError> {
    let mem = shared_regions(file, regions)?;
    let mut stats = CopyStats::default();
    let mut buf = vec![0u8; CHUNK];
    for (region, r) in mem.iter().zip(regions) {
        for (data, hole) in data_extents(file, r)? {
            stats.extents += 1;
            copy_extent(
                file,
                region,
                (data, hole, r.file_offset),
                &mut buf,
                &mut stats,
            )?;
        }
    }
    Ok((mem, stats))
}

/// Empty shared guest memory (one memfd per region, mapped `MAP_SHARED`)
/// laid out as `regions` of `file` say, once `file` is checked against
/// them.
pub(crate) fn shared_regions(
    file: &std::fs::File,
    regions: &[RegionState],
) -> Result<GuestMemoryMmap, MemoryFileError> {
    check_file(file, regions)?;
    let made = regions
        .iter()
        .map(|r| region(GuestAddress(r.guest_base), r.size, Backing::Shared))
        .collect::<Result<Vec<_>, _>>()
        .map_err(MemoryFileError::Shared)?;
    GuestMemoryMmap::from_regions(made).map_err(|_| MemoryFileError::Layout)
}

/// The data extents of `file` inside region `r` (SEEK_DATA/SEEK_HOLE), as
/// `[start, end)` file offsets; the rest of the region is holes.
pub(crate) fn data_extents(
    file: &std::fs::File,
    r: &RegionState,
) -> Result<Vec<(u64, u64)>, MemoryFileError> {
    let end = r.file_offset + r.size;
    let mut pos = r.file_offset;
    let mut extents = Vec::new();
    while pos < end {
        let seek_err = |source| MemoryFileError::Copy {
            offset: pos,
            source,
        };
        let Some(data) = seek(file, pos, libc::SEEK_DATA).map_err(seek_err)? else {
            break;
        };
        if data >= end {
            break;
        }
        let hole = seek(file, data, libc::SEEK_HOLE)
            .map_err(seek_err)?
            .unwrap_or(end)
            .min(end);
        extents.push((data, hole));
        pos = hole;
    }
    Ok(extents)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::{MMIO_GAP_END, MMIO_GAP_START};
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn regions_follow_the_layout() {
        let m = create(64 << 20).unwrap();
        assert_eq!(m.num_regions(), 1);
        // 3 GiB of MAP_NORESERVE costs nothing until touched.
        let m = create(3 << 30).unwrap();
        let r: Vec<_> = m.iter().map(|r| (r.start_addr().0, r.len())).collect();
        assert_eq!(
            r,
            vec![
                (0, MMIO_GAP_START),
                (MMIO_GAP_END, (3 << 30) - MMIO_GAP_START)
            ]
        );
        assert!(!m.address_in_range(GuestAddress(MMIO_GAP_START)));
        assert!(m.address_in_range(GuestAddress(MMIO_GAP_END)));
    }

    /// How many of the `len` bytes at `addr` are resident (mincore).
    fn resident(mem: &GuestMemoryMmap, addr: u64, len: usize) -> usize {
        let slice = mem.get_slice(GuestAddress(addr), len).unwrap();
        let mut vec = vec![0u8; len / 4096];
        // SAFETY: the slice is a live, page-aligned range of guest memory
        // and `vec` has one byte per page of it.
        let rc =
            unsafe { libc::mincore(slice.ptr_guard_mut().as_ptr().cast(), len, vec.as_mut_ptr()) };
        assert_eq!(rc, 0);
        vec.iter().filter(|b| *b & 1 == 1).count() * 4096
    }

    #[test]
    fn a_hotplug_region_joins_guest_memory_and_discarding_returns_its_pages() {
        for backing in [Backing::Private, Backing::Shared] {
            hotplug_region_and_discard(backing);
        }
    }

    fn hotplug_region_and_discard(backing: Backing) {
        use vm_memory::Bytes;
        let boot = create_with(64 << 20, backing).unwrap();
        let at = 4u64 << 30;
        let m = add_region(&boot, GuestAddress(at), 32 << 20, backing).unwrap();
        assert_eq!(m.num_regions(), 2);
        assert!(m.address_in_range(GuestAddress(at + (32 << 20) - 1)));
        assert!(!m.address_in_range(GuestAddress(at + (32 << 20))));
        // Touch 4 MiB: resident; discard 2 MiB of it: that half is gone and
        // reads as zeros, the rest keeps its bytes.
        let block = 2usize << 20;
        m.write_slice(&vec![0xa5u8; 2 * block], GuestAddress(at))
            .unwrap();
        assert_eq!(resident(&m, at, 2 * block), 2 * block);
        discard(&m, GuestAddress(at), block as u64).unwrap();
        assert_eq!(resident(&m, at, block), 0);
        assert_eq!(resident(&m, at + block as u64, block), block);
        let mut back = vec![1u8; 16];
        m.read_slice(&mut back, GuestAddress(at)).unwrap();
        assert_eq!(back, [0u8; 16]);
        m.read_slice(&mut back, GuestAddress(at + block as u64))
            .unwrap();
        assert_eq!(back, [0xa5u8; 16]);
    }

    #[test]
    fn shared_memory_is_one_memfd_per_region_that_another_mapping_sees() {
        use std::os::unix::fs::FileExt;
        use vm_memory::{Bytes, GuestMemoryRegion};
        let m = create_with(64 << 20, Backing::Shared).unwrap();
        let private = create(64 << 20).unwrap();
        assert!(private.iter().all(|r| r.file_offset().is_none()));
        for r in m.iter() {
            assert_ne!(r.flags() & libc::MAP_SHARED, 0);
            let f = r.file_offset().expect("a memfd behind each shared region");
            assert_eq!(f.start(), 0);
            assert_eq!(f.file().metadata().unwrap().len(), r.len());
        }
        // What the guest writes, the backend (another mapping of the same
        // memfd; here a read through the file) sees, and the other way.
        m.write_slice(b"guest", GuestAddress(0x2000)).unwrap();
        let region = m.find_region(GuestAddress(0)).unwrap();
        let file = region.file_offset().unwrap().file();
        let mut buf = [0u8; 5];
        file.read_exact_at(&mut buf, 0x2000).unwrap();
        assert_eq!(&buf, b"guest");
        file.write_all_at(b"backend", 0x3000).unwrap();
        let mut back = [0u8; 7];
        m.read_slice(&mut back, GuestAddress(0x3000)).unwrap();
        assert_eq!(&back, b"backend");
    }

    #[test]
    fn discarding_outside_one_region_or_unaligned_is_refused() {
        let boot = create(64 << 20).unwrap();
        let m = add_region(&boot, GuestAddress(4 << 30), 8 << 20, Backing::Private).unwrap();
        for (addr, len) in [
            ((4u64 << 30) + 100, 4096u64),
            (4 << 30, 100),
            (4 << 30, 0),
            ((4 << 30) + (4 << 20), 8 << 20),
            (2 << 30, 4096),
            ((64 << 20) - 4096, 8192),
        ] {
            assert!(
                matches!(
                    discard(&m, GuestAddress(addr), len),
                    Err(DiscardError::Range { .. })
                ),
                "{addr:#x}+{len:#x}"
            );
        }
        // A region that overlaps guest RAM cannot be added.
        assert!(add_region(&boot, GuestAddress(32 << 20), 64 << 20, Backing::Private).is_err());
    }

    fn tmp(name: &str) -> (std::path::PathBuf, std::fs::File) {
        let p = std::env::temp_dir().join(format!("husk-mem-{}-{name}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        (p, f)
    }

    #[test]
    fn a_dump_maps_back_with_the_same_bytes_and_writes_stay_private() {
        use vm_memory::Bytes;
        let m = create(64 << 20).unwrap();
        m.write_obj(0x1122_3344_5566_7788u64, GuestAddress(0x1000))
            .unwrap();
        m.write_slice(b"last page", GuestAddress((64 << 20) - 9))
            .unwrap();
        let (path, file) = tmp("dump");
        let written = dump(&m, &region_states(&m), &file).unwrap();
        assert_eq!(written, 2 * 4096, "only the two touched pages");
        assert_eq!(file.metadata().unwrap().len(), 64 << 20);
        let regions = region_states(&m);
        let back = from_file(&file, &regions).unwrap();
        let v: u64 = back.read_obj(GuestAddress(0x1000)).unwrap();
        assert_eq!(v, 0x1122_3344_5566_7788);
        let mut tail = [0u8; 9];
        back.read_slice(&mut tail, GuestAddress((64 << 20) - 9))
            .unwrap();
        assert_eq!(&tail, b"last page");
        // Copy-on-write: the restored guest's writes never reach the file.
        back.write_obj(0u64, GuestAddress(0x1000)).unwrap();
        let again = from_file(&file, &regions).unwrap();
        let v: u64 = again.read_obj(GuestAddress(0x1000)).unwrap();
        assert_eq!(v, 0x1122_3344_5566_7788);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_dump_fills_shared_memory_with_its_data_only() {
        use std::os::unix::fs::MetadataExt;
        use vm_memory::{Bytes, GuestMemoryRegion};
        let m = create(64 << 20).unwrap();
        m.write_slice(b"first", GuestAddress(0x1000)).unwrap();
        m.write_slice(&[7u8; 3 * 4096], GuestAddress(32 << 20))
            .unwrap();
        m.write_slice(b"last page", GuestAddress((64 << 20) - 9))
            .unwrap();
        let (path, file) = tmp("shared");
        let regions = region_states(&m);
        let written = dump(&m, &regions, &file).unwrap();
        let (back, stats) = from_file_shared(&file, &regions).unwrap();
        // Every non-zero page, and nothing else, was written.
        assert_eq!(stats.copied_bytes, written);
        assert_eq!(written, 5 * 4096);
        assert!(stats.extents >= 1);
        let mut buf = [0u8; 5];
        back.read_slice(&mut buf, GuestAddress(0x1000)).unwrap();
        assert_eq!(&buf, b"first");
        let v: u8 = back
            .read_obj(GuestAddress((32 << 20) + 3 * 4096 - 1))
            .unwrap();
        assert_eq!(v, 7);
        let mut tail = [0u8; 9];
        back.read_slice(&mut tail, GuestAddress((64 << 20) - 9))
            .unwrap();
        assert_eq!(&tail, b"last page");
        for r in back.iter() {
            // A memfd behind each region, mapped shared, holding only the
            // copied pages (st_blocks counts 512-byte blocks).
            assert_ne!(r.flags() & libc::MAP_SHARED, 0);
            let f = r.file_offset().expect("a memfd");
            let allocated = f.file().metadata().unwrap().blocks() * 512;
            assert!(allocated <= 64 * 4096, "{allocated} bytes allocated");
        }
        // Writes go to the memfd, never to the file.
        back.write_slice(b"later", GuestAddress(0x1000)).unwrap();
        let again = from_file(&file, &regions).unwrap();
        again.read_slice(&mut buf, GuestAddress(0x1000)).unwrap();
        assert_eq!(&buf, b"first");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_memory_file_of_the_wrong_size_is_refused() {
        let m = create(32 << 20).unwrap();
        let (path, file) = tmp("size");
        dump(&m, &region_states(&m), &file).unwrap();
        file.set_len((32 << 20) - 4096).unwrap();
        assert!(matches!(
            from_file(&file, &region_states(&m)),
            Err(MemoryFileError::Size { expected, found })
                if expected == 32 << 20 && found == (32 << 20) - 4096
        ));
        assert!(matches!(
            from_file_shared(&file, &region_states(&m)),
            Err(MemoryFileError::Size { .. })
        ));
        std::fs::remove_file(path).unwrap();
    }
}
