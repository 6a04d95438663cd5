//! virtio-fs through a vhost-user backend (virtiofsd).
//!
//! The VMM does not serve FUSE requests: a separate process, the backend,
//! maps the guest's memory (shared memfds, see `vstate::memory`), reads
//! the requests from the queues and writes the replies. husk is the
//! vhost-user *frontend*: it owns the device the guest sees (its feature
//! bits, its configuration space with the tag, its interrupt), tells the
//! backend over a unix socket where guest memory and each queue's rings
//! are, and hands it two eventfds per queue:
//!
//! - the *kick*: the queue's KVM ioeventfd, so a guest notification goes
//!   from the vCPU's MMIO write straight to the backend;
//! - the *call*: the backend signals it when it used buffers; the VMM's
//!   event loop turns it into the device's interrupt (virtio-mmio has one
//!   interrupt line per device, whose status register the VMM keeps).
//!
//! The vhost-user conversation never runs on a vCPU thread: activation and
//! reset only queue work for the event loop ([`device::Fs`]), whose
//! seccomp policy allows the socket's `sendmsg`/`recvmsg`. A backend that
//! goes away (virtiofsd killed) is noticed by the socket's hang-up: the
//! device reports DEVICE_NEEDS_RESET and raises a configuration interrupt;
//! the VM and every other device keep running.

pub mod device;
pub mod event_handler;
pub mod metrics;
pub mod persist;
pub mod relay;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_backend;

pub use device::{Fs, FsError};

/// virtio device id of a file system device.
pub const TYPE_FS: u32 = 26;
/// Bytes of the tag in the configuration space (NUL padded; a tag of
/// exactly 36 bytes has no NUL).
pub const TAG_LEN: usize = 36;
/// The high-priority queue (FORGET and interrupt requests).
pub const HIPRIO_QUEUE: usize = 0;
