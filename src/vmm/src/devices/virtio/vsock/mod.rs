//! virtio-vsock in userspace, with the host side on unix sockets.
//!
//! The guest's AF_VSOCK streams arrive as packets on the tx queue and leave
//! on the rx queue; `packet` checks the descriptor chains and decodes the
//! header, `connection` runs one stream (state, credit, the bounded buffer
//! toward the host), `muxer` maps streams to host unix sockets (a listening
//! socket with a `CONNECT <port>` handshake for host-initiated streams,
//! `<uds_path>_<port>` for guest-initiated ones), `device` is the virtio
//! device and `event_handler` its event-loop wiring. There is no vhost:
//! every byte is copied by the VMM's event loop thread.

pub mod connection;
pub mod device;
pub mod event_handler;
pub mod muxer;
pub mod packet;
pub mod persist;

pub use device::{Vsock, VsockConfig, VsockError};

/// virtio device id of a socket device.
pub const TYPE_VSOCK: u32 = 19;
/// The host's context id.
pub const HOST_CID: u32 = 2;
/// Entries per queue.
pub const QUEUE_SIZE: u16 = 256;
/// Queue indices.
pub const RX_QUEUE: usize = 0;
/// The guest's transmit queue.
pub const TX_QUEUE: usize = 1;
/// Only used to announce a transport reset, after a restore (see `persist`).
pub const EVENT_QUEUE: usize = 2;

#[cfg(test)]
mod tests;
