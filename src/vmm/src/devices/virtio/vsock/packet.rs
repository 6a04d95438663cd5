//! vsock packets as they cross the virtqueues: the 44-byte little-endian
//! `virtio_vsock_hdr` and the guest buffers of one descriptor chain.
//!
//! A chain is checked as a whole before a byte of it is used: no
//! descriptor may be indirect, and every one must go the expected way
//! (device-readable on the tx queue, device-writable on the rx queue), be
//! non-empty, lie inside guest memory and not overlap another descriptor of
//! the same chain; the total is bounded. Only then are the header and
//! payload copied, through vm-memory.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::devices::virtio::chain::{Chain, ChainError};

/// Size of `struct virtio_vsock_hdr`.
pub const HDR_SIZE: usize = 44;
/// The largest payload one packet carries (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// The largest tx chain accepted: a header and a maximal payload.
pub const MAX_TX_CHAIN: u32 = (HDR_SIZE + MAX_PAYLOAD) as u32;

/// The only socket type virtio-vsock 1.x defines.
pub const TYPE_STREAM: u16 = 1;

/// Packet operations.
pub mod op {
    /// Open a connection.
    pub const REQUEST: u16 = 1;
    /// Accept a connection.
    pub const RESPONSE: u16 = 2;
    /// Refuse or abort a connection.
    pub const RST: u16 = 3;
    /// Half- or full close (flags say which).
    pub const SHUTDOWN: u16 = 4;
    /// Stream data.
    pub const RW: u16 = 5;
    /// The sender's buf_alloc/fwd_cnt changed.
    pub const CREDIT_UPDATE: u16 = 6;
    /// Asks the receiver for a CREDIT_UPDATE.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// SHUTDOWN flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// Why a descriptor chain is not a usable vsock buffer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
    /// The chain has no descriptors.
    #[error("empty descriptor chain")]
    EmptyChain,
    /// A descriptor goes the wrong way for its queue.
    #[error("descriptor has the wrong direction")]
    WrongDirection,
    /// A descriptor of length zero.
    #[error("zero-length descriptor")]
    ZeroLength,
    /// A buffer lies (partly) outside guest memory.
    #[error("buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutOfRange {
        /// Buffer start.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
    /// Two descriptors of the chain cover the same guest memory.
    #[error("descriptors overlap")]
    Overlap,
    /// The chain is longer than the queue accepts.
    #[error("descriptor chain longer than {0} bytes")]
    TooLong(u32),
    /// Fewer than 44 bytes for the header.
    #[error("descriptor chain too short for the packet header")]
    ShortHeader,
    /// The header announces more payload than a packet may carry.
    #[error("payload length {0} exceeds the maximum")]
    PayloadTooLarge(u32),
    /// The header announces more payload than the chain holds.
    #[error("header announces {want} payload bytes, the chain has {have}")]
    ShortPayload {
        /// Announced.
        want: u32,
        /// Present.
        have: u32,
    },
    /// Reading or writing guest memory failed.
    #[error("guest memory access failed")]
    Memory,
    /// The chain could not be walked (an indirect descriptor).
    #[error("unusable descriptor chain")]
    Chain(#[source] ChainError),
}

/// `struct virtio_vsock_hdr`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// Source context id.
    pub src_cid: u64,
    /// Destination context id.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type ([`TYPE_STREAM`]).
    pub type_: u16,
    /// Operation ([`op`]).
    pub op: u16,
    /// Operation flags (SHUTDOWN's).
    pub flags: u32,
    /// The sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer.
    pub fwd_cnt: u32,
}

fn le_u32(b: &[u8; HDR_SIZE], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(v)
}

impl Header {
    /// Decodes the wire format.
    pub fn from_bytes(b: &[u8; HDR_SIZE]) -> Self {
        let mut cid = [0u8; 8];
        cid.copy_from_slice(&b[0..8]);
        let src_cid = u64::from_le_bytes(cid);
        cid.copy_from_slice(&b[8..16]);
        let dst_cid = u64::from_le_bytes(cid);
        Header {
            src_cid,
            dst_cid,
            src_port: le_u32(b, 16),
            dst_port: le_u32(b, 20),
            len: le_u32(b, 24),
            type_: u16::from_le_bytes([b[28], b[29]]),
            op: u16::from_le_bytes([b[30], b[31]]),
            flags: le_u32(b, 32),
            buf_alloc: le_u32(b, 36),
            fwd_cnt: le_u32(b, 40),
        }
    }

    /// Encodes the wire format.
    pub fn to_bytes(&self) -> [u8; HDR_SIZE] {
        let mut b = [0u8; HDR_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// The checked guest buffers of one descriptor chain, in chain order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Buffers {
    regions: Vec<(GuestAddress, u32)>,
    total: u32,
}

impl Buffers {
    /// Checks the descriptors of a chain popped from a queue, as
    /// [`Buffers::from_descriptors`] does; an indirect descriptor fails it.
    pub fn from_chain(
        chain: Chain<'_>,
        mem: &GuestMemoryMmap,
        writable: bool,
        limit: u32,
    ) -> Result<Self, PacketError> {
        Self::check(chain, mem, writable, limit)
    }

    /// Checks the descriptors of a chain: all `writable` (or all readable),
    /// non-empty, inside `mem`, not overlapping, `limit` bytes at most.
    pub fn from_descriptors<I>(
        descs: I,
        mem: &GuestMemoryMmap,
        writable: bool,
        limit: u32,
    ) -> Result<Self, PacketError>
    where
        I: IntoIterator<Item = Descriptor>,
    {
        Self::check(descs.into_iter().map(Ok), mem, writable, limit)
    }

    fn check<I>(
        descs: I,
        mem: &GuestMemoryMmap,
        writable: bool,
        limit: u32,
    ) -> Result<Self, PacketError>
    where
        I: IntoIterator<Item = Result<Descriptor, ChainError>>,
    {
        let mut regions = Vec::new();
        let mut total = 0u32;
        for d in descs {
            let d = d.map_err(PacketError::Chain)?;
            if d.is_write_only() != writable {
                return Err(PacketError::WrongDirection);
            }
            let (addr, len) = (d.addr(), d.len());
            if len == 0 {
                return Err(PacketError::ZeroLength);
            }
            if !mem.check_range(addr, len as usize) {
                return Err(PacketError::OutOfRange { addr: addr.0, len });
            }
            total = total
                .checked_add(len)
                .filter(|t| *t <= limit)
                .ok_or(PacketError::TooLong(limit))?;
            regions.push((addr, len));
        }
        if regions.is_empty() {
            return Err(PacketError::EmptyChain);
        }
        let mut sorted = regions.clone();
        sorted.sort_unstable_by_key(|(a, _)| a.0);
        for pair in sorted.windows(2) {
            if let [(a, alen), (b, _)] = pair {
                // check_range succeeded, so a + alen does not wrap.
                if a.0.saturating_add(u64::from(*alen)) > b.0 {
                    return Err(PacketError::Overlap);
                }
            }
        }
        Ok(Buffers { regions, total })
    }

    /// Total bytes.
    pub fn len(&self) -> u32 {
        self.total
    }

    /// Never true for a checked chain.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Visits the guest ranges that make up `[offset, offset + len)` of the chain.
    fn for_each_range(
        &self,
        offset: usize,
        len: usize,
        mut f: impl FnMut(GuestAddress, usize, usize) -> Result<(), PacketError>,
    ) -> Result<(), PacketError> {
        let end = offset.checked_add(len).ok_or(PacketError::Memory)?;
        if end > self.total as usize {
            return Err(PacketError::Memory);
        }
        let (mut skip, mut done) = (offset, 0usize);
        for &(addr, rlen) in &self.regions {
            if done == len {
                break;
            }
            let rlen = rlen as usize;
            if skip >= rlen {
                skip -= rlen;
                continue;
            }
            let n = (rlen - skip).min(len - done);
            let at = addr
                .0
                .checked_add(skip as u64)
                .map(GuestAddress)
                .ok_or(PacketError::Memory)?;
            f(at, done, n)?;
            done += n;
            skip = 0;
        }
        Ok(())
    }

    /// Copies `out.len()` bytes from chain offset `offset`.
    pub fn read_at(
        &self,
        mem: &GuestMemoryMmap,
        offset: usize,
        out: &mut [u8],
    ) -> Result<(), PacketError> {
        let len = out.len();
        self.for_each_range(offset, len, |addr, at, n| {
            let dst = out.get_mut(at..at + n).ok_or(PacketError::Memory)?;
            mem.read_slice(dst, addr).map_err(|_| PacketError::Memory)
        })
    }

    /// Copies `data` to chain offset `offset`.
    pub fn write_at(
        &self,
        mem: &GuestMemoryMmap,
        offset: usize,
        data: &[u8],
    ) -> Result<(), PacketError> {
        self.for_each_range(offset, data.len(), |addr, at, n| {
            let src = data.get(at..at + n).ok_or(PacketError::Memory)?;
            mem.write_slice(src, addr).map_err(|_| PacketError::Memory)
        })
    }

    /// Reads and checks a tx packet's header: the payload it announces is
    /// at most [`MAX_PAYLOAD`] and present in the chain (at offset [`HDR_SIZE`]).
    pub fn tx_header(&self, mem: &GuestMemoryMmap) -> Result<Header, PacketError> {
        if (self.total as usize) < HDR_SIZE {
            return Err(PacketError::ShortHeader);
        }
        let mut raw = [0u8; HDR_SIZE];
        self.read_at(mem, 0, &mut raw)?;
        let hdr = Header::from_bytes(&raw);
        if hdr.len as usize > MAX_PAYLOAD {
            return Err(PacketError::PayloadTooLarge(hdr.len));
        }
        let have = self.total - HDR_SIZE as u32;
        if hdr.len > have {
            return Err(PacketError::ShortPayload {
                want: hdr.len,
                have,
            });
        }
        Ok(hdr)
    }

    /// Writes a packet (header, then `payload`) into an rx chain; returns the
    /// bytes written. `hdr.len` must already be `payload.len()`.
    pub fn write_packet(
        &self,
        mem: &GuestMemoryMmap,
        hdr: &Header,
        payload: &[u8],
    ) -> Result<u32, PacketError> {
        let total = HDR_SIZE
            .checked_add(payload.len())
            .filter(|t| *t <= self.total as usize)
            .ok_or(PacketError::ShortHeader)?;
        self.write_at(mem, 0, &hdr.to_bytes())?;
        self.write_at(mem, HDR_SIZE, payload)?;
        u32::try_from(total).map_err(|_| PacketError::Memory)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRITE: u16 = 2;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn hdr() -> Header {
        Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1234,
            dst_port: 1024,
            len: 5,
            type_: TYPE_STREAM,
            op: op::RW,
            flags: 0,
            buf_alloc: 262144,
            fwd_cnt: 77,
        }
    }

    #[test]
    fn header_round_trips_little_endian() {
        let h = hdr();
        let b = h.to_bytes();
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[24..28], &5u32.to_le_bytes());
        assert_eq!(&b[30..32], &op::RW.to_le_bytes());
        assert_eq!(Header::from_bytes(&b), h);
    }

    #[test]
    fn header_and_payload_split_across_descriptors() {
        let m = mem();
        let mut bytes = hdr().to_bytes().to_vec();
        bytes.extend_from_slice(b"hello");
        // 10 bytes at 0x1000, the rest at 0x3000.
        m.write_slice(&bytes[..10], GuestAddress(0x1000)).unwrap();
        m.write_slice(&bytes[10..], GuestAddress(0x3000)).unwrap();
        let b = Buffers::from_descriptors(
            [
                Descriptor::new(0x1000, 10, 0, 0),
                Descriptor::new(0x3000, 39, 0, 0),
            ],
            &m,
            false,
            MAX_TX_CHAIN,
        )
        .unwrap();
        assert_eq!(b.tx_header(&m).unwrap(), hdr());
        let mut p = [0u8; 5];
        b.read_at(&m, HDR_SIZE, &mut p).unwrap();
        assert_eq!(&p, b"hello");
    }

    #[test]
    fn hostile_descriptors_are_rejected() {
        let m = mem();
        let check = |descs: Vec<Descriptor>, writable| {
            Buffers::from_descriptors(descs, &m, writable, MAX_TX_CHAIN).unwrap_err()
        };
        assert_eq!(
            check(vec![Descriptor::new(0x1000, 64, WRITE, 0)], false),
            PacketError::WrongDirection
        );
        assert_eq!(
            check(vec![Descriptor::new(0x1000, 64, 0, 0)], true),
            PacketError::WrongDirection
        );
        assert_eq!(
            check(vec![Descriptor::new(0x1000, 0, 0, 0)], false),
            PacketError::ZeroLength
        );
        assert!(matches!(
            check(vec![Descriptor::new(0xff000, 0x2000, 0, 0)], false),
            PacketError::OutOfRange { .. }
        ));
        assert!(matches!(
            check(vec![Descriptor::new(u64::MAX - 8, 64, 0, 0)], false),
            PacketError::OutOfRange { .. }
        ));
        assert_eq!(
            check(vec![Descriptor::new(0x1000, MAX_TX_CHAIN + 1, 0, 0)], false),
            PacketError::TooLong(MAX_TX_CHAIN)
        );
        assert_eq!(
            check(
                vec![
                    Descriptor::new(0x1000, 0x100, WRITE, 0),
                    Descriptor::new(0x10ff, 0x100, WRITE, 0)
                ],
                true
            ),
            PacketError::Overlap
        );
        assert_eq!(check(vec![], true), PacketError::EmptyChain);
    }

    #[test]
    fn short_headers_and_payloads_are_rejected() {
        let m = mem();
        let one = |len| {
            Buffers::from_descriptors(
                [Descriptor::new(0x1000, len, 0, 0)],
                &m,
                false,
                MAX_TX_CHAIN,
            )
            .unwrap()
        };
        assert_eq!(one(43).tx_header(&m), Err(PacketError::ShortHeader));
        let mut h = hdr();
        h.len = 100;
        m.write_slice(&h.to_bytes(), GuestAddress(0x1000)).unwrap();
        assert_eq!(
            one(44 + 99).tx_header(&m),
            Err(PacketError::ShortPayload {
                want: 100,
                have: 99
            })
        );
        h.len = u32::MAX;
        m.write_slice(&h.to_bytes(), GuestAddress(0x1000)).unwrap();
        assert_eq!(
            one(44).tx_header(&m),
            Err(PacketError::PayloadTooLarge(u32::MAX))
        );
    }

    #[test]
    fn rx_packets_fill_split_buffers_and_respect_capacity() {
        let m = mem();
        let b = Buffers::from_descriptors(
            [
                Descriptor::new(0x2000, 20, WRITE, 0),
                Descriptor::new(0x5000, 4096, WRITE, 0),
            ],
            &m,
            true,
            u32::MAX,
        )
        .unwrap();
        let h = hdr();
        assert_eq!(b.write_packet(&m, &h, b"hello").unwrap(), 49);
        let mut raw = [0u8; HDR_SIZE];
        b.read_at(&m, 0, &mut raw).unwrap();
        assert_eq!(Header::from_bytes(&raw), h);
        let mut p = [0u8; 5];
        m.read_slice(&mut p, GuestAddress(0x5000 + 24)).unwrap();
        assert_eq!(&p, b"hello");
        assert!(b.write_packet(&m, &h, &vec![0; 4096]).is_err());
    }
}
