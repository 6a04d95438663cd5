//! virtio-mem (virtio 1.2, 5.15): memory the guest plugs and unplugs in
//! blocks while it runs, from a region above its RAM that the host sized
//! at boot. The host says how much it wants plugged (`requested_size`, a
//! configuration-change interrupt); the guest's driver asks to plug or
//! unplug blocks on the device's one queue until `plugged_size` matches.
//!
//! `request` parses and checks one descriptor chain (a 24-byte request, a
//! 10-byte response buffer); `device` keeps the state of every block and
//! answers, mapping a slot of the region into the guest (a KVM memory slot,
//! through a [`SlotMapper`]) when it gets its first plugged block and
//! unmapping it when it loses its last, and giving an unplugged block's
//! pages back to the host; `event_handler` wires the queue into the event
//! loop. Whatever the guest sends is answered with the spec's response
//! (ACK, NACK, ERROR), never a panic, and nothing outside the region is
//! ever plugged, mapped or released.

pub mod device;
pub mod event_handler;
pub mod metrics;
pub mod persist;
pub mod request;

pub use device::{Mem, MemError, MemRegion, MemStatus, SlotMapper};
pub use metrics::MemMetrics;

/// virtio device id of a memory device.
pub const TYPE_MEM: u32 = 24;
/// Entries in the request queue (the Linux driver has one request in
/// flight at a time).
pub const QUEUE_SIZE: u16 = 128;
/// VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE: the driver must not touch
/// unplugged memory (husk enforces it for whole slots).
pub const VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE: u32 = 1;
/// The smallest block the device offers: the guest's pageblock is 2 MiB
/// with huge pages, 4 MiB without, and its driver plugs at least that.
pub const MIN_BLOCK_SIZE: u64 = 2 << 20;
/// The guest's memory block on x86_64 (below 64 GiB of boot RAM): Linux
/// adds and removes memory in these, so the region's start and end are
/// aligned to it.
pub const GUEST_MEMORY_BLOCK: u64 = 128 << 20;
