//! virtio-net backed by a host tap device.
//!
//! `tap` opens an existing tap interface (with a virtio-net header on every
//! frame, so checksum and segmentation offloads pass straight through);
//! `device` is the virtio device (features, MAC in the config space, the rx
//! and tx queues, bounded frame copies between guest buffers and the tap);
//! `event_handler` wires the queues and the tap into the VMM's event loop and
//! stops polling the tap while the guest has no receive buffers. Chains the
//! guest gets wrong are returned unused, never an error of the VMM.

pub mod device;
pub mod event_handler;
pub mod persist;
pub mod tap;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;

use std::fmt;
use std::os::fd::AsRawFd;
use std::str::FromStr;

pub use device::{Net, NetError};

/// virtio device id of a network device.
pub const TYPE_NET: u32 = 1;
/// Entries per queue.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the receive queue (device to guest).
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue (guest to device).
pub const TX_QUEUE: usize = 1;
/// struct virtio_net_hdr_v1: what precedes every frame, in both directions,
/// once VIRTIO_F_VERSION_1 is negotiated.
pub const VNET_HDR_LEN: usize = 12;
/// The largest frame, header included: a 64 KiB TSO packet plus its
/// Ethernet header. Longer chains are refused, so a guest cannot make the
/// VMM allocate more than this per direction.
pub const MAX_FRAME_LEN: usize = 65562;

/// Where frames go and come from: a tap in production, a socket pair in
/// tests and the fuzzer. Frames carry their virtio_net_hdr_v1.
pub trait Backend: AsRawFd + Send {
    /// Reads one frame into `buf`; `WouldBlock` when none is pending.
    fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize>;
    /// Writes one frame.
    fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<usize>;
    /// Turns on the offloads in `tun_flags` (TUN_F_*) for frames towards the
    /// guest, which has negotiated them.
    fn set_offload(&mut self, tun_flags: u32) -> std::io::Result<()>;
}

/// An Ethernet MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MacAddr(pub [u8; 6]);

/// A MAC address that is not six colon-separated hex bytes.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("invalid MAC address {0:?}: want six hex bytes like 02:00:00:00:00:01")]
pub struct MacAddrError(pub String);

impl FromStr for MacAddr {
    type Err = MacAddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || MacAddrError(s.to_string());
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut mac {
            let part = parts
                .next()
                .filter(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
                .ok_or_else(err)?;
            *byte = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(MacAddr(mac))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_addresses_parse_and_print() {
        let mac: MacAddr = "02:00:0A:ff:00:01".parse().unwrap();
        assert_eq!(mac, MacAddr([2, 0, 10, 0xff, 0, 1]));
        assert_eq!(mac.to_string(), "02:00:0a:ff:00:01");
        for bad in [
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:01:02",
            "2:00:00:00:00:01",
            "02-00-00-00-00-01",
            "0g:00:00:00:00:01",
            "+2:00:00:00:00:01",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }
}
