//! One virtio-blk request: parsing a descriptor chain into a checked
//! [`Request`], and executing it against the backing file.
//!
//! The chain is: a device-readable 16-byte header (type, reserved, sector),
//! zero or more data buffers, and a device-writable status byte. Every
//! buffer's direction and range is checked before any I/O; a chain that is
//! wrong gets IOERR, an unknown type UNSUPP.

use std::fs::File;
use std::io::{Seek, SeekFrom};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::{ID_BYTES, SECTOR_SIZE};
use crate::devices::virtio::chain::{Chain, ChainError};
use crate::log_limit::LogLimiter;

/// Why a chain is not a valid request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    /// The chain has no descriptors, or only a header.
    #[error("descriptor chain too short")]
    ChainTooShort,
    /// The header is write-only or shorter than 16 bytes.
    #[error("invalid request header")]
    BadHeader,
    /// The last descriptor is not a writable status byte.
    #[error("invalid status descriptor")]
    BadStatus,
    /// A data buffer goes the wrong way for the request type.
    #[error("data buffer has the wrong direction")]
    WrongDirection,
    /// A buffer lies (partly) outside guest memory.
    #[error("buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutOfRange {
        /// Buffer start.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
    /// Reading or writing guest memory failed.
    #[error("guest memory access failed")]
    Memory,
    /// The chain could not be walked (an indirect descriptor).
    #[error("unusable descriptor chain")]
    Chain(#[source] ChainError),
}

/// The request types husk serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    /// Read sectors into guest buffers.
    In,
    /// Write guest buffers to sectors.
    Out,
    /// Make written data durable.
    Flush,
    /// Return the drive id.
    GetId,
    /// Anything else.
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(t: u32) -> Self {
        match t {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            other => RequestType::Unsupported(other),
        }
    }
}

/// A parsed, checked request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub kind: RequestType,
    /// First sector.
    pub sector: u64,
    /// Data buffers in guest memory, in order.
    pub data: Vec<(GuestAddress, u32)>,
    /// Where the status byte goes.
    pub status_addr: GuestAddress,
    /// The used length once the status is written (see [`Completion`]).
    pub used_len: u32,
}

/// The outcome of executing a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// VIRTIO_BLK_S_*.
    pub status: u8,
    /// The used length once the status byte is written, whatever the
    /// request's outcome: every device-writable byte before the status
    /// byte, and the status byte (the spec counts the length from the
    /// first writable byte, and the status comes last; QEMU returns the
    /// same); 0 when it could not be written.
    pub used_len: u32,
}

fn check_range(mem: &GuestMemoryMmap, d: &Descriptor) -> Result<(), RequestError> {
    let len = usize::try_from(d.len()).map_err(|_| RequestError::Memory)?;
    if d.len() == 0 || !mem.check_range(d.addr(), len) {
        return Err(RequestError::OutOfRange {
            addr: d.addr().0,
            len: d.len(),
        });
    }
    Ok(())
}

impl Request {
    /// Parses `chain`. On error, the status address and the used length to
    /// return once it is written come too when the status could be found,
    /// so the guest can still be told. A chain with an indirect descriptor
    /// is refused whole: its status byte, if any, lies past the descriptor
    /// that was not followed.
    pub fn parse(
        chain: Chain<'_>,
        mem: &GuestMemoryMmap,
    ) -> Result<Request, (RequestError, Option<(GuestAddress, u32)>)> {
        let descs: Vec<Descriptor> = chain
            .collect::<Result<_, ChainError>>()
            .map_err(|e| (RequestError::Chain(e), None))?;
        let (status, rest) = descs
            .split_last()
            .ok_or((RequestError::ChainTooShort, None))?;
        let status_ok =
            status.is_write_only() && status.len() >= 1 && check_range(mem, status).is_ok();
        if !status_ok {
            return Err((RequestError::BadStatus, None));
        }
        let status_addr = status.addr();
        // Every device-writable byte before the status, and the status.
        let used_len = rest
            .iter()
            .filter(|d| d.is_write_only())
            .map(|d| u64::from(d.len()))
            .sum::<u64>()
            + 1;
        // A chain is below 4 GiB (virtio-queue stops there).
        let used_len = u32::try_from(used_len).unwrap_or(u32::MAX);
        let fail = |e| Err((e, Some((status_addr, used_len))));
        let Some((header, data)) = rest.split_first() else {
            return fail(RequestError::ChainTooShort);
        };
        if header.is_write_only() || header.len() < 16 {
            return fail(RequestError::BadHeader);
        }
        let kind: u32 = match mem.read_obj(header.addr()) {
            Ok(k) => k,
            Err(_) => return fail(RequestError::BadHeader),
        };
        let sector: u64 = match header
            .addr()
            .checked_add(8)
            .and_then(|a| mem.read_obj(a).ok())
        {
            Some(s) => s,
            None => return fail(RequestError::BadHeader),
        };
        let kind = RequestType::from(kind);
        let device_writes = matches!(kind, RequestType::In | RequestType::GetId);
        let mut buffers = Vec::with_capacity(data.len());
        for d in data {
            if let Err(e) = check_range(mem, d) {
                return fail(e);
            }
            if matches!(
                kind,
                RequestType::In | RequestType::Out | RequestType::GetId
            ) && d.is_write_only() != device_writes
            {
                return fail(RequestError::WrongDirection);
            }
            buffers.push((d.addr(), d.len()));
        }
        Ok(Request {
            kind,
            sector,
            data: buffers,
            status_addr,
            used_len,
        })
    }

    fn data_len(&self) -> u64 {
        self.data.iter().map(|(_, l)| u64::from(*l)).sum()
    }

    /// Performs the request on `file` (of `capacity` bytes) and writes the
    /// status byte. Never fails: every problem becomes a status for the guest.
    /// Host I/O errors are logged through `io_log`: a guest can repeat the
    /// request that meets them (a write to a full disk) as often as it likes.
    pub fn execute(
        &self,
        mem: &GuestMemoryMmap,
        file: &mut File,
        capacity: u64,
        read_only: bool,
        id: &[u8; ID_BYTES],
        io_log: &mut LogLimiter,
    ) -> Completion {
        let status = match self.kind {
            RequestType::In | RequestType::Out => self.rw(mem, file, capacity, read_only, io_log),
            RequestType::Flush => {
                let ok = read_only || file.sync_data().is_ok();
                if ok {
                    VIRTIO_BLK_S_OK
                } else {
                    VIRTIO_BLK_S_IOERR
                }
            }
            RequestType::GetId => self.get_id(mem, id),
            RequestType::Unsupported(t) => {
                tracing::debug!(kind = t, "unsupported virtio-blk request");
                VIRTIO_BLK_S_UNSUPP
            }
        };
        let status = status as u8;
        let used_len = match mem.write_obj(status, self.status_addr) {
            Ok(()) => self.used_len,
            Err(_) => 0,
        };
        Completion { status, used_len }
    }

    fn rw(
        &self,
        mem: &GuestMemoryMmap,
        file: &mut File,
        capacity: u64,
        read_only: bool,
        io_log: &mut LogLimiter,
    ) -> u32 {
        let len = self.data_len();
        let in_bounds = self
            .sector
            .checked_mul(SECTOR_SIZE)
            .and_then(|start| start.checked_add(len).map(|end| (start, end)))
            .filter(|(_, end)| *end <= capacity);
        let Some((start, _)) = in_bounds else {
            tracing::debug!(
                sector = self.sector,
                len,
                capacity,
                "virtio-blk request beyond the disk"
            );
            return VIRTIO_BLK_S_IOERR;
        };
        if len % SECTOR_SIZE != 0 || (self.kind == RequestType::Out && read_only) {
            return VIRTIO_BLK_S_IOERR;
        }
        if let Some(done) = self.rw_vectored(mem, file, start) {
            return match done {
                Ok(()) => VIRTIO_BLK_S_OK,
                Err(e) => {
                    crate::limited!(io_log, warn, error = %crate::error::Chain(&e), "virtio-blk I/O failed");
                    VIRTIO_BLK_S_IOERR
                }
            };
        }
        // Buffers that span a guest memory region boundary: one at a time.
        if file.seek(SeekFrom::Start(start)).is_err() {
            return VIRTIO_BLK_S_IOERR;
        }
        for (addr, l) in &self.data {
            let n = *l as usize;
            let r = if self.kind == RequestType::In {
                mem.read_exact_volatile_from(*addr, file, n)
            } else {
                mem.write_all_volatile_to(*addr, file, n)
            };
            if let Err(e) = r {
                crate::limited!(io_log, warn, error = %crate::error::Chain(&e), "virtio-blk I/O failed");
                return VIRTIO_BLK_S_IOERR;
            }
        }
        VIRTIO_BLK_S_OK
    }

    /// The whole request in one `preadv`/`pwritev` (repeated only for
    /// short transfers) straight between the file and guest memory. `None`
    /// when a buffer spans two guest memory regions (the caller then goes
    /// buffer by buffer).
    fn rw_vectored(
        &self,
        mem: &GuestMemoryMmap,
        file: &File,
        start: u64,
    ) -> Option<std::io::Result<()>> {
        use std::os::fd::AsRawFd;
        let mut iovecs = Vec::with_capacity(self.data.len());
        for (addr, len) in &self.data {
            let slice = mem.get_slice(*addr, *len as usize).ok()?;
            iovecs.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: *len as usize,
            });
        }
        let mut offset = start;
        let mut first = 0usize;
        while first < iovecs.len() {
            let count = libc::c_int::try_from(iovecs.len() - first).ok()?;
            let off = libc::off64_t::try_from(offset).ok()?;
            // SAFETY: every iovec points into guest memory that get_slice
            // checked to lie within one mapped region for its whole length,
            // and the mapping outlives this call (`mem` is borrowed). The
            // kernel reads or writes only those ranges.
            let n = unsafe {
                let iov = iovecs.as_ptr().add(first);
                if self.kind == RequestType::In {
                    libc::preadv64(file.as_raw_fd(), iov, count, off)
                } else {
                    libc::pwritev64(file.as_raw_fd(), iov, count, off)
                }
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Some(Err(e));
            }
            if n == 0 {
                return Some(Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the backing file ended early",
                )));
            }
            // Skip what was transferred; resume inside a partly done buffer.
            let mut n = n as usize;
            offset += n as u64;
            while n > 0 {
                let iov = &mut iovecs[first];
                if n >= iov.iov_len {
                    n -= iov.iov_len;
                    first += 1;
                } else {
                    // SAFETY: advancing within the same buffer, by less than
                    // its remaining length.
                    iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(n).cast() };
                    iov.iov_len -= n;
                    n = 0;
                }
            }
        }
        Some(Ok(()))
    }

    fn get_id(&self, mem: &GuestMemoryMmap, id: &[u8; ID_BYTES]) -> u32 {
        let Some((addr, len)) = self.data.first() else {
            return VIRTIO_BLK_S_IOERR;
        };
        let n = (*len as usize).min(ID_BYTES);
        match mem.write_slice(&id[..n], *addr) {
            Ok(()) => VIRTIO_BLK_S_OK,
            Err(_) => VIRTIO_BLK_S_IOERR,
        }
    }
}
