//! One virtio-mem request: a descriptor chain parsed into a checked
//! [`Request`] and the place its [`Response`] goes.
//!
//! The chain is one or more device-readable buffers holding the 24-byte
//! `struct virtio_mem_req` (type, padding, then address and block count),
//! followed by a device-writable buffer for the 10-byte `struct
//! virtio_mem_resp` (type, padding, state). Every buffer must be non-empty
//! and inside guest memory. A chain whose response buffer cannot be used is
//! returned to the guest unanswered; any other fault (a short request, a
//! readable buffer after the response buffer) is answered with
//! `VIRTIO_MEM_RESP_ERROR`. The chain is walked with
//! [`Chain`](crate::devices::virtio::chain::Chain): an indirect descriptor,
//! a feature the device does not offer, makes the whole chain unanswerable.
//! What the request asks for is checked against the device's state by the
//! device, not here.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::devices::virtio::chain::{Chain, ChainError};

/// VIRTIO_MEM_REQ_PLUG.
pub const REQ_PLUG: u16 = 0;
/// VIRTIO_MEM_REQ_UNPLUG.
pub const REQ_UNPLUG: u16 = 1;
/// VIRTIO_MEM_REQ_UNPLUG_ALL.
pub const REQ_UNPLUG_ALL: u16 = 2;
/// VIRTIO_MEM_REQ_STATE.
pub const REQ_STATE: u16 = 3;

/// VIRTIO_MEM_RESP_ACK: done.
pub const RESP_ACK: u16 = 0;
/// VIRTIO_MEM_RESP_NACK: refused, plugging would pass the requested size.
pub const RESP_NACK: u16 = 1;
/// VIRTIO_MEM_RESP_BUSY: not now, try again.
pub const RESP_BUSY: u16 = 2;
/// VIRTIO_MEM_RESP_ERROR: an invalid request.
pub const RESP_ERROR: u16 = 3;

/// VIRTIO_MEM_STATE_PLUGGED: every block of the range is plugged.
pub const STATE_PLUGGED: u16 = 0;
/// VIRTIO_MEM_STATE_UNPLUGGED: none is.
pub const STATE_UNPLUGGED: u16 = 1;
/// VIRTIO_MEM_STATE_MIXED: some are.
pub const STATE_MIXED: u16 = 2;

/// Bytes of `struct virtio_mem_req`.
pub const REQUEST_LEN: usize = 24;
/// Bytes of `struct virtio_mem_resp`.
pub const RESPONSE_LEN: usize = 10;

/// What is wrong with a chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// No device-writable buffer of at least 10 bytes follows the request.
    #[error("no usable response buffer")]
    NoResponse,
    /// Fewer than 24 device-readable bytes before the response buffer.
    #[error("the request is shorter than {REQUEST_LEN} bytes")]
    ShortRequest,
    /// A buffer is empty or lies (partly) outside guest memory.
    #[error("buffer {addr:#x}+{len:#x} is empty or outside guest memory")]
    OutOfRange {
        /// Buffer start.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
    /// A device-readable buffer after a device-writable one.
    #[error("a device-readable buffer follows the response buffer")]
    ReadableAfterWritable,
    /// The chain could not be walked (an indirect descriptor).
    #[error("unusable descriptor chain")]
    Chain(#[source] ChainError),
}

/// A request, as the guest sent it (its range not yet checked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Plug `nb_blocks` blocks from `addr`.
    Plug {
        /// Guest-physical start.
        addr: u64,
        /// Number of blocks.
        nb_blocks: u16,
    },
    /// Unplug `nb_blocks` blocks from `addr`.
    Unplug {
        /// Guest-physical start.
        addr: u64,
        /// Number of blocks.
        nb_blocks: u16,
    },
    /// Unplug every block.
    UnplugAll,
    /// Are the blocks of the range plugged?
    State {
        /// Guest-physical start.
        addr: u64,
        /// Number of blocks.
        nb_blocks: u16,
    },
    /// A type the spec does not define.
    Unknown(u16),
}

impl Request {
    /// Decodes the 24 bytes of `struct virtio_mem_req` (the padding is
    /// ignored).
    pub fn decode(bytes: &[u8; REQUEST_LEN]) -> Request {
        let kind = u16::from_le_bytes([bytes[0], bytes[1]]);
        let mut addr = [0u8; 8];
        addr.copy_from_slice(&bytes[8..16]);
        let addr = u64::from_le_bytes(addr);
        let nb_blocks = u16::from_le_bytes([bytes[16], bytes[17]]);
        match kind {
            REQ_PLUG => Request::Plug { addr, nb_blocks },
            REQ_UNPLUG => Request::Unplug { addr, nb_blocks },
            REQ_UNPLUG_ALL => Request::UnplugAll,
            REQ_STATE => Request::State { addr, nb_blocks },
            other => Request::Unknown(other),
        }
    }

    /// Encodes it (for tests and the fuzzer's seeds).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let (kind, addr, nb) = match *self {
            Request::Plug { addr, nb_blocks } => (REQ_PLUG, addr, nb_blocks),
            Request::Unplug { addr, nb_blocks } => (REQ_UNPLUG, addr, nb_blocks),
            Request::UnplugAll => (REQ_UNPLUG_ALL, 0, 0),
            Request::State { addr, nb_blocks } => (REQ_STATE, addr, nb_blocks),
            Request::Unknown(kind) => (kind, 0, 0),
        };
        let mut b = [0u8; REQUEST_LEN];
        b[..2].copy_from_slice(&kind.to_le_bytes());
        b[8..16].copy_from_slice(&addr.to_le_bytes());
        b[16..18].copy_from_slice(&nb.to_le_bytes());
        b
    }
}

/// The device's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response {
    /// RESP_ACK, RESP_NACK, RESP_BUSY or RESP_ERROR.
    pub kind: u16,
    /// For an acknowledged STATE request: STATE_PLUGGED, _UNPLUGGED or _MIXED.
    pub state: u16,
}

impl Response {
    /// An answer without a state.
    pub fn of(kind: u16) -> Self {
        Response { kind, state: 0 }
    }

    /// `struct virtio_mem_resp`.
    pub fn encode(&self) -> [u8; RESPONSE_LEN] {
        let mut b = [0u8; RESPONSE_LEN];
        b[..2].copy_from_slice(&self.kind.to_le_bytes());
        b[8..10].copy_from_slice(&self.state.to_le_bytes());
        b
    }
}

/// A chain taken apart: the request (or why it is invalid) and where the
/// response goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// The request, or why it cannot be one (answered with ERROR).
    pub request: Result<Request, RequestError>,
    /// The response buffer.
    pub response: GuestAddress,
}

fn check_range(mem: &GuestMemoryMmap, d: &Descriptor) -> Result<(), RequestError> {
    let out = RequestError::OutOfRange {
        addr: d.addr().0,
        len: d.len(),
    };
    let len = usize::try_from(d.len()).map_err(|_| out.clone())?;
    if len == 0 || !mem.check_range(d.addr(), len) {
        return Err(out);
    }
    Ok(())
}

/// Takes `chain` apart. `Err` means there is nowhere to answer: the chain
/// goes back to the guest with nothing written (an indirect descriptor is
/// such a chain: its response buffer would lie past it).
pub fn parse(chain: Chain<'_>, mem: &GuestMemoryMmap) -> Result<Parsed, RequestError> {
    let mut bytes = [0u8; REQUEST_LEN];
    let mut have = 0usize;
    let mut fault: Option<RequestError> = None;
    let mut response: Option<GuestAddress> = None;
    // Chain ends a walk at the queue size, so this is bounded.
    for d in chain {
        let d = d.map_err(RequestError::Chain)?;
        if d.is_write_only() {
            if response.is_none() {
                if check_range(mem, &d).is_err() || (d.len() as usize) < RESPONSE_LEN {
                    return Err(RequestError::NoResponse);
                }
                response = Some(d.addr());
            }
            continue;
        }
        if response.is_some() {
            fault.get_or_insert(RequestError::ReadableAfterWritable);
            continue;
        }
        if let Err(e) = check_range(mem, &d) {
            fault.get_or_insert(e);
            continue;
        }
        let take = (REQUEST_LEN - have).min(d.len() as usize);
        if take > 0
            && mem
                .read_slice(&mut bytes[have..have + take], d.addr())
                .is_ok()
        {
            have += take;
        }
    }
    let response = response.ok_or(RequestError::NoResponse)?;
    let request = match fault {
        Some(e) => Err(e),
        None if have < REQUEST_LEN => Err(RequestError::ShortRequest),
        None => Ok(Request::decode(&bytes)),
    };
    Ok(Parsed { request, response })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{d, mem, write_table, INDIRECT, NEXT, WRITE};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;

    const REQ: u64 = 0x10_0000;
    const RESP: u64 = 0x10_1000;

    fn parse_chain(m: &GuestMemoryMmap, descs: &[RawDescriptor]) -> Result<Parsed, RequestError> {
        let vq = MockSplitQueue::new(m, 16);
        vq.add_desc_chains(descs, 0).unwrap();
        let mut q: virtio_queue::Queue = vq.create_queue().unwrap();
        let chain = crate::devices::virtio::chain::pop(&mut q, m).expect("a chain");
        parse(chain, m)
    }

    #[test]
    fn requests_round_trip_through_their_encoding() {
        for r in [
            Request::Plug {
                addr: 0x1_0000_0000,
                nb_blocks: 2,
            },
            Request::Unplug {
                addr: 0x1_0020_0000,
                nb_blocks: u16::MAX,
            },
            Request::UnplugAll,
            Request::State {
                addr: 7,
                nb_blocks: 0,
            },
            Request::Unknown(9),
        ] {
            assert_eq!(Request::decode(&r.encode()), r);
        }
        let resp = Response {
            kind: RESP_ACK,
            state: STATE_MIXED,
        };
        assert_eq!(resp.encode(), [0, 0, 0, 0, 0, 0, 0, 0, 2, 0]);
    }

    #[test]
    fn a_well_formed_chain_parses() {
        let m = mem();
        let req = Request::Plug {
            addr: 0x1_0000_0000,
            nb_blocks: 3,
        };
        m.write_slice(&req.encode(), GuestAddress(REQ)).unwrap();
        let p = parse_chain(&m, &[d(REQ, 24, NEXT, 1), d(RESP, 10, WRITE, 0)]).unwrap();
        assert_eq!(p.request, Ok(req));
        assert_eq!(p.response, GuestAddress(RESP));
        // The request split over two buffers reads the same.
        m.write_slice(&req.encode()[..10], GuestAddress(REQ + 0x800))
            .unwrap();
        m.write_slice(&req.encode()[10..], GuestAddress(REQ + 0x100))
            .unwrap();
        let p = parse_chain(
            &m,
            &[
                d(REQ + 0x800, 10, NEXT, 1),
                d(REQ + 0x100, 14, NEXT, 2),
                d(RESP, 16, WRITE, 0),
            ],
        )
        .unwrap();
        assert_eq!(p.request, Ok(req));
    }

    #[test]
    fn an_indirect_descriptor_is_not_followed_and_the_chain_not_answered() {
        let m = mem();
        // A well-formed request behind an indirect table: it would parse if
        // husk followed the descriptor it never offered.
        let table = 0x20_0000;
        let len = write_table(&m, table, &[d(REQ, 24, NEXT, 1), d(RESP, 10, WRITE, 0)]);
        assert_eq!(
            parse_chain(&m, &[d(table, len, INDIRECT, 0)]),
            Err(RequestError::Chain(ChainError::IndirectNotNegotiated))
        );
    }

    #[test]
    fn a_chain_without_a_usable_response_buffer_is_not_answered() {
        let m = mem();
        for chain in [
            vec![d(REQ, 24, 0, 0)],
            vec![d(REQ, 24, NEXT, 1), d(RESP, 9, WRITE, 0)],
            vec![d(REQ, 24, NEXT, 1), d(0xffff_0000_0000, 10, WRITE, 0)],
            vec![d(REQ, 24, NEXT, 1), d(0x40_0000 - 4, 10, WRITE, 0)],
            vec![d(REQ, 24, NEXT, 1), d(RESP, 0, WRITE, 0)],
        ] {
            assert_eq!(
                parse_chain(&m, &chain),
                Err(RequestError::NoResponse),
                "{chain:?}"
            );
        }
    }

    #[test]
    fn malformed_requests_are_answered_with_an_error() {
        let m = mem();
        let cases: [(Vec<RawDescriptor>, RequestError); 5] = [
            (
                vec![d(REQ, 16, NEXT, 1), d(RESP, 10, WRITE, 0)],
                RequestError::ShortRequest,
            ),
            (vec![d(RESP, 10, WRITE, 0)], RequestError::ShortRequest),
            (
                vec![d(0xffff_0000_0000, 24, NEXT, 1), d(RESP, 10, WRITE, 0)],
                RequestError::OutOfRange {
                    addr: 0xffff_0000_0000,
                    len: 24,
                },
            ),
            (
                vec![
                    d(REQ, 0, NEXT, 1),
                    d(REQ, 24, NEXT, 2),
                    d(RESP, 10, WRITE, 0),
                ],
                RequestError::OutOfRange { addr: REQ, len: 0 },
            ),
            (
                vec![
                    d(REQ, 24, NEXT, 1),
                    d(RESP, 10, WRITE | NEXT, 2),
                    d(REQ, 24, 0, 0),
                ],
                RequestError::ReadableAfterWritable,
            ),
        ];
        for (chain, want) in cases {
            let p = parse_chain(&m, &chain).unwrap();
            assert_eq!(p.request, Err(want), "{chain:?}");
            assert_eq!(p.response, GuestAddress(RESP));
        }
    }
}
