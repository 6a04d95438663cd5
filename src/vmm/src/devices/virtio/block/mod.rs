//! virtio-blk backed by a raw file.
//!
//! `request` parses and checks one descriptor chain (header, data buffers,
//! status byte) and performs it against the file; `device` is the virtio
//! device (features, config space, queue processing); `event_handler` wires
//! its queue eventfd into the VMM's event loop. Requests the guest gets
//! wrong, and host I/O errors, end as a status byte for the guest (IOERR or
//! UNSUPP), never as an error of the VMM.

pub mod device;
pub mod event_handler;
pub mod persist;
pub mod request;

pub use device::{Block, BlockConfig, BlockError};

/// virtio device id of a block device.
pub const TYPE_BLOCK: u32 = 2;
/// Sector size the virtio-blk protocol counts in.
pub const SECTOR_SIZE: u64 = 512;
/// Entries per queue.
pub const QUEUE_SIZE: u16 = 256;
/// Length of the id returned by GET_ID.
pub const ID_BYTES: usize = 20;
