//! Shared guest memory restored on demand from a memory file.
//!
//! A VM with a vhost-user device restores into memfds (the backend maps
//! them too), so the memory file's pages must be copied in; copying them
//! all before the guest runs was the largest single cost of a pod's
//! restore (docs/snapshots.md). Here the regions are registered with a
//! userfaultfd instead, in missing-page mode, and one thread (`husk-fill`)
//! fills them: a page the guest (through KVM) or a device touches first is
//! read from the file at once, and in between the thread copies the rest of
//! the file's data in the background. When everything the file holds is
//! in, the regions are unregistered (a page never filled is a hole of the
//! file, so it is zeroes, which is what shmem gives an untouched page) and
//! the devices waiting for complete memory are told ([`FillHandle::when_done`]).
//!
//! Only this process's mapping is registered: a vhost-user backend's own
//! mapping of the memfds would see a page not yet filled as zeroes (shmem
//! allocates it), not as the file's. So such a backend must not touch
//! guest memory before the fill is done; the virtio-fs device holds its
//! queues' kicks back until then (`devices::virtio::fs`).
//!
//! The userfaultfd comes from `/dev/userfaultfd` (Linux 6.1; the jailer
//! makes the node in a jail) or, failing that, from the `userfaultfd`
//! system call, which needs CAP_SYS_PTRACE or `vm.unprivileged_userfaultfd`
//! for faults taken in the kernel, as KVM's are. Without either, the
//! caller copies the file up front as before ([`LazyError::Unavailable`]).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::memory::{self, MemoryFileError, RegionState};
use crate::error::Chain;
use crate::exit::{ExitNotifier, VmExit};
use crate::seccomp::{SeccompFilters, ThreadKind};

const PAGE: u64 = 4096;
/// Pages the background fill copies in one run (one read, one copy).
const RUN_PAGES: u64 = 32;
/// Pages around a faulting one filled with it (aligned): the guest's next
/// touches are usually near its last.
const FAULT_PAGES: u64 = 16;

// linux/userfaultfd.h. The structures are the kernel's, field for field.
const UFFD_API: u64 = 0xaa;
const UFFDIO: u32 = 0xaa;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_FEATURE_MISSING_SHMEM: u64 = 1 << 5;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// `struct uffd_msg` for a page fault: the event, then (after reserved
/// bytes) the fault's flags and address, then the thread id.
#[repr(C)]
#[derive(Default)]
struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    flags: u64,
    address: u64,
    ptid: u64,
}

/// The request numbers (private: the macros make public functions).
mod nr {
    use super::{UffdioApi, UffdioCopy, UffdioRange, UffdioRegister, UffdioZeropage, UFFDIO};
    use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iowr_nr};

    ioctl_io_nr!(USERFAULTFD_IOC_NEW, UFFDIO, 0x00);
    ioctl_iowr_nr!(UFFDIO_API, UFFDIO, 0x3f, UffdioApi);
    ioctl_iowr_nr!(UFFDIO_REGISTER, UFFDIO, 0x00, UffdioRegister);
    ioctl_ior_nr!(UFFDIO_UNREGISTER, UFFDIO, 0x01, UffdioRange);
    ioctl_ior_nr!(UFFDIO_WAKE, UFFDIO, 0x02, UffdioRange);
    ioctl_iowr_nr!(UFFDIO_COPY, UFFDIO, 0x03, UffdioCopy);
    ioctl_iowr_nr!(UFFDIO_ZEROPAGE, UFFDIO, 0x04, UffdioZeropage);
}
use nr::{
    UFFDIO_API, UFFDIO_COPY, UFFDIO_REGISTER, UFFDIO_UNREGISTER, UFFDIO_WAKE, UFFDIO_ZEROPAGE,
    USERFAULTFD_IOC_NEW,
};

/// The ioctl numbers the fill thread's seccomp policy allows (checked
/// against resources/seccomp by a test).
pub fn fill_ioctls() -> [u64; 4] {
    [
        UFFDIO_COPY(),
        UFFDIO_ZEROPAGE(),
        UFFDIO_WAKE(),
        UFFDIO_UNREGISTER(),
    ]
    .map(u64::from)
}

/// Why guest memory could not be set up for filling on demand.
#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    /// This host gives husk no userfaultfd able to take KVM's faults on
    /// shared memory: the memory file is copied up front instead.
    #[error("no userfaultfd for shared guest memory: {0}")]
    Unavailable(String),
    /// The memory file does not match the snapshot, or memory could not
    /// be made.
    #[error(transparent)]
    File(#[from] MemoryFileError),
    /// The fill thread could not be started.
    #[error("cannot start the guest memory fill thread")]
    Thread(#[source] std::io::Error),
}

/// Why the fill stopped before the memory was complete.
#[derive(Debug, thiserror::Error)]
enum FillError {
    #[error("cannot read the memory file at offset {offset:#x}")]
    Read {
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot fill guest memory at host address {addr:#x}")]
    Copy {
        addr: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the userfaultfd")]
    Fault(#[source] std::io::Error),
    #[error("a fault at host address {0:#x}, outside guest memory")]
    Outside(u64),
    #[error("the fill thread cannot confine itself")]
    Confine(#[source] crate::seccomp::SeccompError),
}

/// A userfaultfd.
struct Uffd(OwnedFd);

/// Runs `ioctl(fd, request, arg)`.
fn uffd_ioctl<T>(fd: &OwnedFd, request: libc::c_ulong, arg: &mut T) -> std::io::Result<()> {
    // SAFETY: every caller passes a request whose argument is a `T` (the
    // pairs are fixed by the ioctl_*_nr! definitions above), which the
    // kernel reads and writes within its size; `arg` lives across the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request, arg as *mut T) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl Uffd {
    /// A userfaultfd for this process, non-blocking.
    fn open() -> std::io::Result<Self> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        let dev_err = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/userfaultfd")
        {
            Ok(dev) => {
                // SAFETY: USERFAULTFD_IOC_NEW takes its flags by value and
                // returns a new descriptor or -1.
                let fd = unsafe {
                    libc::ioctl(
                        dev.as_raw_fd(),
                        USERFAULTFD_IOC_NEW() as _,
                        flags as libc::c_ulong,
                    )
                };
                if fd >= 0 {
                    // SAFETY: fd is new and owned by nothing else.
                    return Ok(Uffd(unsafe { OwnedFd::from_raw_fd(fd) }));
                }
                std::io::Error::last_os_error()
            }
            Err(e) => e,
        };
        // SAFETY: userfaultfd(2) takes its flags and returns a new
        // descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        if fd < 0 {
            let sys_err = std::io::Error::last_os_error();
            return Err(std::io::Error::new(
                sys_err.kind(),
                format!("/dev/userfaultfd: {dev_err}; the userfaultfd system call: {sys_err}"),
            ));
        }
        // SAFETY: fd is new and owned by nothing else.
        Ok(Uffd(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
    }

    /// The API handshake; fails unless shared memory can be registered.
    fn handshake(&self) -> std::io::Result<()> {
        let mut api = UffdioApi {
            api: UFFD_API,
            ..Default::default()
        };
        uffd_ioctl(&self.0, UFFDIO_API() as _, &mut api)?;
        if api.features & UFFD_FEATURE_MISSING_SHMEM == 0 {
            return Err(std::io::Error::other(
                "the kernel cannot register shared memory (UFFD_FEATURE_MISSING_SHMEM)",
            ));
        }
        Ok(())
    }

    fn register(&self, start: u64, len: u64) -> std::io::Result<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        uffd_ioctl(&self.0, UFFDIO_REGISTER() as _, &mut reg)
    }

    fn unregister(&self, start: u64, len: u64) -> std::io::Result<()> {
        let mut range = UffdioRange { start, len };
        uffd_ioctl(&self.0, UFFDIO_UNREGISTER() as _, &mut range)
    }

    fn wake(&self, start: u64, len: u64) -> std::io::Result<()> {
        let mut range = UffdioRange { start, len };
        uffd_ioctl(&self.0, UFFDIO_WAKE() as _, &mut range)
    }

    /// Copies `src` to `dst` (registered, missing pages), waking whoever
    /// waits on them. Pages already there are skipped.
    fn copy(&self, dst: u64, src: &[u8]) -> std::io::Result<()> {
        let mut done = 0u64;
        let len = src.len() as u64;
        while done < len {
            let mut c = UffdioCopy {
                dst: dst + done,
                src: src.as_ptr() as u64 + done,
                len: len - done,
                mode: 0,
                copy: 0,
            };
            match uffd_ioctl(&self.0, UFFDIO_COPY() as _, &mut c) {
                Ok(()) => done = len,
                Err(e) => {
                    let copied = u64::try_from(c.copy).unwrap_or(0);
                    match e.raw_os_error() {
                        // Partly done: go on from where it stopped.
                        Some(libc::EAGAIN) => done += copied,
                        // A page is there already (its fault was served):
                        // skip it, and wake its waiters in case.
                        Some(libc::EEXIST) => {
                            let at = dst + done + copied;
                            self.wake(at, PAGE)?;
                            done += copied + PAGE;
                        }
                        _ => return Err(e),
                    }
                }
            }
        }
        Ok(())
    }

    /// Maps zero pages at `[dst, dst + len)`, waking their waiters; pages
    /// already there are left.
    fn zero(&self, dst: u64, len: u64) -> std::io::Result<()> {
        let mut z = UffdioZeropage {
            range: UffdioRange { start: dst, len },
            mode: 0,
            zeropage: 0,
        };
        match uffd_ioctl(&self.0, UFFDIO_ZEROPAGE() as _, &mut z) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => self.wake(dst, len),
            Err(e) => Err(e),
        }
    }

    /// The next page fault's address, if one is queued.
    fn next_fault(&self) -> std::io::Result<Option<u64>> {
        loop {
            let mut msg = UffdMsg::default();
            let size = std::mem::size_of::<UffdMsg>();
            // SAFETY: reads at most `size` bytes into `msg`, which is a
            // plain struct of that size that lives across the call.
            let n =
                unsafe { libc::read(self.0.as_raw_fd(), (&mut msg as *mut UffdMsg).cast(), size) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(libc::EAGAIN) => Ok(None),
                    Some(libc::EINTR) => continue,
                    _ => Err(e),
                };
            }
            if n as usize == size && msg.event == UFFD_EVENT_PAGEFAULT {
                return Ok(Some(msg.address));
            }
            // No other events were asked for; anything else is skipped.
        }
    }
}

/// madvise(2) `advice` on a whole region's mapping; a refusal only costs
/// huge pages, so it is logged.
fn advise(host: u64, len: u64, advice: libc::c_int) {
    // SAFETY: [host, host + len) is one region's whole mapping, kept alive
    // by the guest memory the caller holds; these advices change how its
    // pages are allocated, never their contents.
    if unsafe { libc::madvise(host as *mut libc::c_void, len as usize, advice) } != 0 {
        tracing::debug!(advice, error = %std::io::Error::last_os_error(), "madvise on guest memory refused");
    }
}

/// Which pages of one region of guest memory are still to be filled.
struct RegionFill {
    /// Its length in bytes.
    len: u64,
    /// One bit per page: the file holds data there not yet in memory.
    pending: Vec<u64>,
    /// Pages still pending.
    left: u64,
}

impl RegionFill {
    fn is_pending(&self, page: u64) -> bool {
        self.pending[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    fn set(&mut self, page: u64, on: bool) {
        let word = &mut self.pending[(page / 64) as usize];
        let bit = 1 << (page % 64);
        if on && *word & bit == 0 {
            *word |= bit;
            self.left += 1;
        } else if !on && *word & bit != 0 {
            *word &= !bit;
            self.left -= 1;
        }
    }

    /// The first pending page at or after `from`.
    fn next_pending(&self, from: u64) -> Option<u64> {
        let pages = self.len / PAGE;
        let mut page = from;
        while page < pages {
            let word = self.pending[(page / 64) as usize] >> (page % 64);
            if word != 0 {
                return Some(page + u64::from(word.trailing_zeros()));
            }
            page = (page / 64 + 1) * 64;
        }
        None
    }
}

/// What the fill did, for the log.
#[derive(Debug, Default, Clone, Copy)]
pub struct FillStats {
    /// Faults served.
    pub faults: u64,
    /// Pages the faults brought in from the file.
    pub fault_pages: u64,
    /// Pages the background fill brought in from the file.
    pub filled_pages: u64,
    /// Pages of the file's data left out because they are all zeroes.
    pub zero_pages: u64,
}

#[derive(Default)]
struct Counters {
    faults: AtomicU64,
    fault_pages: AtomicU64,
    filled_pages: AtomicU64,
    zero_pages: AtomicU64,
}

impl Counters {
    fn get(&self) -> FillStats {
        FillStats {
            faults: self.faults.load(Ordering::Relaxed),
            fault_pages: self.fault_pages.load(Ordering::Relaxed),
            filled_pages: self.filled_pages.load(Ordering::Relaxed),
            zero_pages: self.zero_pages.load(Ordering::Relaxed),
        }
    }
}

#[derive(Default)]
struct Waiters {
    done: bool,
    events: Vec<EventFd>,
    stats: FillStats,
}

/// Where a region is: host address, length and offset in the file.
#[derive(Clone, Copy)]
struct Span {
    host: u64,
    len: u64,
    file_offset: u64,
}

/// What the two fill threads share.
struct Shared {
    uffd: Uffd,
    file: File,
    spans: Vec<Span>,
    /// Per region, the pages whose data is still only in the file. A page
    /// leaves it only once it is in memory, so a page not pending is
    /// either there or a hole of the file.
    pending: Mutex<Vec<RegionFill>>,
    /// Set once every data page is in (or the fill was stopped): the
    /// regions are then unregistered, and faults no longer come.
    done: AtomicBool,
    /// Wakes the fault thread when `done` is set.
    wake: EventFd,
    counters: Counters,
}

impl Shared {
    fn pending(&self) -> std::sync::MutexGuard<'_, Vec<RegionFill>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads pages `[first, first + count)` of region `region` into `buf`.
    fn read(&self, region: usize, first: u64, count: u64, buf: &mut [u8]) -> Result<(), FillError> {
        let offset = self.spans[region].file_offset + first * PAGE;
        let buf = &mut buf[..(count * PAGE) as usize];
        self.file
            .read_exact_at(buf, offset)
            .map_err(|source| FillError::Read { offset, source })
    }

    /// Clears pages `[first, end)` of region `region` from the pending set.
    fn filled(&self, region: usize, first: u64, end: u64) {
        let mut pending = self.pending();
        for page in first..end {
            pending[region].set(page, false);
        }
    }

    /// Serves a fault at host address `addr`: the aligned block of
    /// FAULT_PAGES around it gets its pending pages from the file, and the
    /// faulting page, if it is not pending (a hole of the file, or in
    /// memory already), a zero page unless one is there.
    fn serve_fault(&self, addr: u64, buf: &mut [u8]) -> Result<(), FillError> {
        self.counters.faults.fetch_add(1, Ordering::Relaxed);
        let Some(region) = self
            .spans
            .iter()
            .position(|r| addr >= r.host && addr < r.host + r.len)
        else {
            return Err(FillError::Outside(addr));
        };
        let span = self.spans[region];
        let page = (addr - span.host) / PAGE;
        let block = page - page % FAULT_PAGES;
        let end = (block + FAULT_PAGES).min(span.len / PAGE);
        let (runs, page_pending) = {
            let pending = self.pending();
            let r = &pending[region];
            let mut runs = Vec::new();
            let mut p = block;
            while p < end {
                if r.is_pending(p) {
                    let start = p;
                    while p < end && r.is_pending(p) {
                        p += 1;
                    }
                    runs.push((start, p));
                } else {
                    p += 1;
                }
            }
            (runs, r.is_pending(page))
        };
        for (first, last) in runs {
            self.read(region, first, last - first, buf)?;
            let dst = span.host + first * PAGE;
            self.uffd
                .copy(dst, &buf[..((last - first) * PAGE) as usize])
                .map_err(|source| FillError::Copy { addr: dst, source })?;
            self.counters
                .fault_pages
                .fetch_add(last - first, Ordering::Relaxed);
            self.filled(region, first, last);
        }
        if !page_pending {
            let dst = span.host + page * PAGE;
            self.uffd
                .zero(dst, PAGE)
                .map_err(|source| FillError::Copy { addr: dst, source })?;
        }
        Ok(())
    }

    /// The next run of up to RUN_PAGES pending pages from `cursor` on
    /// (region, first page, end), moving the cursor past it.
    fn next_run(&self, cursor: &mut (usize, u64)) -> Option<(usize, u64, u64)> {
        let pending = self.pending();
        while cursor.0 < pending.len() {
            let r = &pending[cursor.0];
            if let Some(first) = r.next_pending(cursor.1) {
                let pages = r.len / PAGE;
                let mut end = first;
                while end < first + RUN_PAGES && end < pages && r.is_pending(end) {
                    end += 1;
                }
                cursor.1 = end;
                return Some((cursor.0, first, end));
            }
            *cursor = (cursor.0 + 1, 0);
        }
        None
    }

    /// Copies pages `[first, end)` of `region` from the file, leaving out
    /// those that are all zeroes (they read as zeroes once the regions
    /// are unregistered).
    fn fill_run(
        &self,
        region: usize,
        first: u64,
        end: u64,
        buf: &mut [u8],
    ) -> Result<(), FillError> {
        let count = end - first;
        self.read(region, first, count, buf)?;
        let host = self.spans[region].host;
        let mut copied = 0;
        for run in memory::nonzero_runs(&buf[..(count * PAGE) as usize]) {
            let dst = host + first * PAGE + run.start as u64;
            self.uffd
                .copy(dst, &buf[run.clone()])
                .map_err(|source| FillError::Copy { addr: dst, source })?;
            copied += run.len() as u64 / PAGE;
        }
        self.counters
            .filled_pages
            .fetch_add(copied, Ordering::Relaxed);
        self.counters
            .zero_pages
            .fetch_add(count - copied, Ordering::Relaxed);
        self.filled(region, first, end);
        Ok(())
    }

    /// The fault thread: serves faults as they come until `done`.
    fn serve_faults(&self) -> Result<(), FillError> {
        let mut buf = vec![0u8; (FAULT_PAGES * PAGE) as usize];
        let mut fds = [
            libc::pollfd {
                fd: self.uffd.0.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        while !self.done.load(Ordering::Acquire) {
            // SAFETY: two pollfds that live across the call.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if rc < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(FillError::Fault(e));
            }
            while let Some(addr) = self.uffd.next_fault().map_err(FillError::Fault)? {
                match self.serve_fault(addr, &mut buf) {
                    Ok(()) => {}
                    // Unregistered under it: the faulting thread retries
                    // and finds its page (or a hole's zeroes).
                    Err(_) if self.done.load(Ordering::Acquire) => return Ok(()),
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    /// The background fill: every pending page, in file order.
    fn fill_all(&self, stop: &AtomicBool, background: bool) -> Result<(), FillError> {
        let mut buf = vec![0u8; (RUN_PAGES * PAGE) as usize];
        let mut cursor = (0usize, 0u64);
        while !stop.load(Ordering::Relaxed) {
            if !background {
                std::thread::sleep(std::time::Duration::from_millis(1));
                continue;
            }
            let Some((region, first, end)) = self.next_run(&mut cursor) else {
                // Faults may have taken pages behind the cursor, never
                // added any: nothing is pending any more.
                return Ok(());
            };
            self.fill_run(region, first, end, &mut buf)?;
        }
        Ok(())
    }

    /// Ends the fill: unregisters the regions (whoever still waits on a
    /// page retries and finds it, or a hole's zeroes) and stops the fault
    /// thread.
    fn end(&self) {
        self.done.store(true, Ordering::Release);
        for s in &self.spans {
            if let Err(e) = self.uffd.unregister(s.host, s.len) {
                tracing::error!(error = %Chain(&e), "cannot unregister guest memory from its userfaultfd");
            }
            // Complete now: huge pages may come back (see `from_file`).
            advise(s.host, s.len, libc::MADV_HUGEPAGE);
        }
        if let Err(e) = self.wake.write(1) {
            tracing::error!(error = %Chain(&e), "cannot wake the guest memory fault thread");
        }
    }
}

/// Shared guest memory registered for filling, before its threads start.
pub struct LazyFill {
    shared: Shared,
    /// Keeps the mappings alive while the threads write into them.
    mem: GuestMemoryMmap,
    /// Whether pages nobody touched are copied too (tests turn it off to
    /// see faults served).
    background: bool,
}

/// The running fill: who waits for its end, and how to stop it.
#[derive(Clone)]
pub struct FillHandle {
    waiters: Arc<Mutex<Waiters>>,
    stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for FillHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FillHandle").finish_non_exhaustive()
    }
}

impl FillHandle {
    /// An eventfd that becomes readable once guest memory is complete
    /// (at once if it already is).
    pub fn when_done(&self) -> std::io::Result<EventFd> {
        let event = EventFd::new(EFD_NONBLOCK)?;
        let mut w = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        if w.done {
            event.write(1)?;
        } else {
            w.events.push(event.try_clone()?);
        }
        Ok(event)
    }

    /// What the fill did, once it is done.
    pub fn stats(&self) -> Option<FillStats> {
        let w = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        w.done.then_some(w.stats)
    }

    /// Ends the fill early (the VM is going away): the regions are
    /// unregistered, so nothing waits on a page any more.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Guest memory for `regions` of `file` in memfds (as
/// [`memory::from_file_shared`] makes it), registered for filling on
/// demand: nothing of the file is read yet. Start the fill with
/// [`LazyFill::spawn`] before anything touches guest memory.
pub fn from_file(
    file: &File,
    regions: &[RegionState],
) -> Result<(GuestMemoryMmap, LazyFill), LazyError> {
    let mem = memory::shared_regions(file, regions)?;
    let uffd = Uffd::open()
        .and_then(|u| u.handshake().map(|()| u))
        .map_err(|e| LazyError::Unavailable(e.to_string()))?;
    let mut fills = Vec::with_capacity(regions.len());
    let mut spans = Vec::with_capacity(regions.len());
    for (r, state) in mem.iter().zip(regions) {
        let host = r.as_ptr() as u64;
        // No huge pages while pages are missing: khugepaged collapsing a
        // range of the memfd would fill its missing pages with zeroes,
        // which no fault would then ever ask the file for (kernels before
        // 6.3 do not skip ranges a userfaultfd watches).
        advise(host, r.len(), libc::MADV_NOHUGEPAGE);
        uffd.register(host, r.len())
            .map_err(|e| LazyError::Unavailable(format!("cannot register guest memory: {e}")))?;
        let pages = r.len() / PAGE;
        let mut fill = RegionFill {
            len: r.len(),
            pending: vec![0; pages.div_ceil(64) as usize],
            left: 0,
        };
        for (start, end) in memory::data_extents(file, state)? {
            for page in (start - state.file_offset) / PAGE..(end - state.file_offset).div_ceil(PAGE)
            {
                fill.set(page, true);
            }
        }
        fills.push(fill);
        spans.push(Span {
            host,
            len: r.len(),
            file_offset: state.file_offset,
        });
    }
    let file = file
        .try_clone()
        .map_err(|e| LazyError::File(MemoryFileError::Map(e)))?;
    let wake = EventFd::new(EFD_NONBLOCK).map_err(LazyError::Thread)?;
    Ok((
        mem.clone(),
        LazyFill {
            shared: Shared {
                uffd,
                file,
                spans,
                pending: Mutex::new(fills),
                done: AtomicBool::new(false),
                wake,
                counters: Counters::default(),
            },
            mem,
            background: true,
        },
    ))
}

impl LazyFill {
    /// Bytes of the file's data still to be filled.
    pub fn pending_bytes(&self) -> u64 {
        self.shared.pending().iter().map(|r| r.left * PAGE).sum()
    }

    /// Starts the fill's two threads, each confined by `seccomp`'s fill
    /// policy: `husk-fault` serves faults as they come, `husk-fill` copies
    /// the rest, unregisters the regions when everything is in and tells
    /// the waiters. If the file cannot be read, the VM is stopped through
    /// `exit` (its memory would be wrong) and the regions are
    /// unregistered.
    pub fn spawn(
        self,
        seccomp: &SeccompFilters,
        exit: Arc<ExitNotifier>,
    ) -> Result<FillHandle, LazyError> {
        let handle = FillHandle {
            waiters: Arc::default(),
            stop: Arc::default(),
        };
        let pending = self.pending_bytes();
        let LazyFill {
            shared,
            mem,
            background,
        } = self;
        let shared = Arc::new(shared);
        let lost = |exit: &ExitNotifier, what: &str, e: &FillError| {
            tracing::error!(error = %Chain(e), "{what}: stopping the VM");
            exit.notify(VmExit::MemoryLost(Chain(e).to_string()));
        };

        let faults = {
            let shared = shared.clone();
            let seccomp = seccomp.clone();
            let exit = exit.clone();
            std::thread::Builder::new()
                .name("husk-fault".into())
                .spawn(move || {
                    let result = seccomp
                        .install(ThreadKind::Fill)
                        .map_err(FillError::Confine)
                        .and_then(|()| shared.serve_faults());
                    if let Err(e) = result {
                        lost(&exit, "guest memory faults cannot be served", &e);
                        shared.end();
                    }
                })
                .map_err(LazyError::Thread)?
        };

        let h = handle.clone();
        let seccomp = seccomp.clone();
        let ours = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("husk-fill".into())
            .spawn(move || {
                let t = Instant::now();
                let result = seccomp
                    .install(ThreadKind::Fill)
                    .map_err(FillError::Confine)
                    .and_then(|()| shared.fill_all(&h.stop, background));
                if let Err(e) = &result {
                    lost(&exit, "guest memory could not be filled", e);
                }
                shared.end();
                let _ = faults.join();
                let stats = shared.counters.get();
                tracing::info!(
                    elapsed_us = t.elapsed().as_micros() as u64,
                    pending_bytes = pending,
                    faults = stats.faults,
                    fault_pages = stats.fault_pages,
                    filled_pages = stats.filled_pages,
                    zero_pages = stats.zero_pages,
                    stopped = h.stop.load(Ordering::Relaxed),
                    "shared guest memory filled from the memory file"
                );
                let mut w = h.waiters.lock().unwrap_or_else(|e| e.into_inner());
                w.done = true;
                w.stats = stats;
                for e in w.events.drain(..) {
                    if let Err(err) = e.write(1) {
                        tracing::error!(error = %Chain(&err), "cannot tell a device guest memory is complete");
                    }
                }
                drop(w);
                drop(mem);
            });
        if let Err(e) = spawned {
            // The fault thread must not wait for ever.
            ours.end();
            return Err(LazyError::Thread(e));
        }
        Ok(handle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::{Bytes, GuestAddress};

    const SIZE: u64 = 8 << 20;

    /// A memory file for one region of SIZE bytes at guest address 0:
    /// data in a few extents (one with an all-zero page inside), the rest
    /// holes. Returns the file and the bytes guest memory must hold.
    fn memory_file(name: &str) -> (File, Vec<u8>) {
        let path = std::env::temp_dir().join(format!(
            "husk-lazy-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        file.set_len(SIZE).unwrap();
        let mut want = vec![0u8; SIZE as usize];
        // Pages 0-2, a run of 100 pages at 1 MiB with page 50 of it zero,
        // the last page.
        let mut extents = vec![(0u64, 3u64), (256, 356), (SIZE / PAGE - 1, SIZE / PAGE)];
        extents.sort_unstable();
        for (first, end) in extents {
            for page in first..end {
                let at = (page * PAGE) as usize;
                if page != 306 {
                    for (i, b) in want[at..at + PAGE as usize].iter_mut().enumerate() {
                        *b = (page as u8) ^ (i as u8) | 1;
                    }
                }
            }
            let (a, b) = ((first * PAGE) as usize, (end * PAGE) as usize);
            file.write_all_at(&want[a..b], a as u64).unwrap();
        }
        file.flush().unwrap();
        (file, want)
    }

    fn regions() -> Vec<RegionState> {
        vec![RegionState {
            guest_base: 0,
            size: SIZE,
            file_offset: 0,
        }]
    }

    fn wait_done(h: &FillHandle) {
        let t = Instant::now();
        while h.stats().is_none() {
            assert!(
                t.elapsed() < std::time::Duration::from_secs(30),
                "the fill did not end"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    #[test]
    fn pages_come_from_the_file_on_first_touch_and_the_rest_in_the_background() {
        let (file, want) = memory_file("fill");
        let (mem, fill) = from_file(&file, &regions()).unwrap();
        // Three extents: 3 + 100 + 1 pages (the zero page inside is data).
        assert_eq!(fill.pending_bytes(), 104 * PAGE);
        let exit = ExitNotifier::new().unwrap();
        // The real policy: a call it lacks kills this test process.
        let handle = fill
            .spawn(&SeccompFilters::builtin(), exit.clone())
            .unwrap();
        let done = handle.when_done().unwrap();
        // Touched from the end (a hole, then data, then the middle of the
        // second extent): each read faults and is served from the file.
        for page in [SIZE / PAGE - 2, SIZE / PAGE - 1, 300, 306, 2, 1000] {
            let mut got = vec![0u8; PAGE as usize];
            mem.read_slice(&mut got, GuestAddress(page * PAGE)).unwrap();
            let at = (page * PAGE) as usize;
            assert!(got == want[at..at + PAGE as usize], "page {page}");
        }
        wait_done(&handle);
        assert_eq!(done.read().unwrap(), 1);
        assert!(exit.reason().is_none(), "{:?}", exit.reason());
        // Everything reads as the file says, through this mapping...
        let mut all = vec![0u8; SIZE as usize];
        mem.read_slice(&mut all, GuestAddress(0)).unwrap();
        assert!(all == want);
        // ... and through the memfd, as a vhost-user backend's own mapping
        // sees it: no data page is missing there once the fill is done.
        let region = mem.iter().next().unwrap();
        let memfd = region.file_offset().unwrap().file();
        let mut seen = vec![0u8; SIZE as usize];
        memfd.read_exact_at(&mut seen, 0).unwrap();
        assert!(seen == want);
        // A waiter that comes late is told at once.
        assert_eq!(handle.when_done().unwrap().read().unwrap(), 1);
    }

    #[test]
    fn faults_are_served_from_the_file_or_with_zero_pages() {
        let (file, want) = memory_file("faults");
        let (mem, mut fill) = from_file(&file, &regions()).unwrap();
        fill.background = false;
        let exit = ExitNotifier::new().unwrap();
        let handle = fill.spawn(&SeccompFilters::builtin(), exit).unwrap();
        // A hole, a data page, the zero page inside the second extent, and
        // a page of the same 16-page block as the data page (filled with
        // it: no second fault).
        for page in [1000, 300, 306, 301] {
            let mut got = vec![0u8; PAGE as usize];
            mem.read_slice(&mut got, GuestAddress(page * PAGE)).unwrap();
            let at = (page * PAGE) as usize;
            assert!(got == want[at..at + PAGE as usize], "page {page}");
        }
        handle.stop();
        wait_done(&handle);
        let stats = handle.stats().unwrap();
        // The hole at 1000, the block 288-303 of page 300 and the block
        // 304-319 of page 306; page 301 was there already.
        assert_eq!(stats.faults, 3, "{stats:?}");
        assert_eq!(stats.fault_pages, 32, "{stats:?}");
        assert_eq!(stats.filled_pages, 0, "{stats:?}");
    }

    #[test]
    fn a_write_before_the_fill_reaches_a_page_keeps_the_write() {
        let (file, mut want) = memory_file("write");
        let (mem, fill) = from_file(&file, &regions()).unwrap();
        let exit = ExitNotifier::new().unwrap();
        let handle = fill.spawn(&SeccompFilters::disabled(), exit).unwrap();
        // The write faults the page in from the file first, then changes
        // part of it; the background fill must not overwrite it later.
        let at = 355 * PAGE + 100;
        mem.write_slice(b"guest", GuestAddress(at)).unwrap();
        want[at as usize..at as usize + 5].copy_from_slice(b"guest");
        wait_done(&handle);
        let mut all = vec![0u8; SIZE as usize];
        mem.read_slice(&mut all, GuestAddress(0)).unwrap();
        assert!(all == want);
    }

    #[test]
    fn a_stopped_fill_lets_go_of_memory() {
        let (file, _) = memory_file("stop");
        let (mem, mut fill) = from_file(&file, &regions()).unwrap();
        fill.background = false;
        let handle = fill
            .spawn(&SeccompFilters::disabled(), ExitNotifier::new().unwrap())
            .unwrap();
        handle.stop();
        wait_done(&handle);
        let stats = handle.stats().unwrap();
        assert_eq!(stats.filled_pages + stats.fault_pages, 0, "{stats:?}");
        // Unregistered: a page never filled reads as zeroes, and nothing
        // waits for it.
        let mut got = vec![1u8; PAGE as usize];
        mem.read_slice(&mut got, GuestAddress(0)).unwrap();
        assert!(got.iter().all(|b| *b == 0));
    }
}
