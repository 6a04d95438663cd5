//! The host <-> agent protocol: what the host (`husk run`, the containerd
//! shim) asks husk-agent in the guest, and what it answers.
//!
//! Every connection to the agent (vsock port 1024 by default, or a unix
//! socket in host-side tests) starts with a [`Hello`] frame that says what
//! the connection is for: a control channel carrying [`Request`]s and
//! [`Reply`]s, one stdio stream of one process, or the event stream. A frame
//! is a 4-byte big-endian length followed by that many bytes of JSON
//! ([`frame`]); frames are capped at [`MAX_FRAME`]. Both sides share these
//! types, so nothing is stringly typed on either side.

#![deny(missing_docs)]

pub mod client;
pub mod frame;
pub mod messages;

/// The OCI runtime spec types the messages carry.
pub use oci_spec;

pub use frame::{read_frame, write_frame, FrameError, MAX_FRAME};
pub use messages::*;

/// The protocol version this crate speaks. A peer with another major
/// version is refused with [`ErrorCode::UnsupportedVersion`].
pub const PROTOCOL_VERSION: u32 = 1;

/// The vsock port the agent listens on unless the kernel command line says
/// `husk.agent_port=N`.
pub const DEFAULT_AGENT_PORT: u32 = 1024;

/// The guest kernel's command line of a VM that runs the agent (`husk
/// run`, the shim's pods), before what the user configures is appended:
/// the serial console, a reset through the i8042 on reboot (so the VMM
/// exits cleanly), a reboot on panic, no PCI probing, a quiet console.
pub const AGENT_KERNEL_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off quiet";

/// The vsock context id of a VM that runs the agent. Each VM has a vsock
/// device of its own, reached through its own host socket, so one number
/// serves every VM.
pub const AGENT_GUEST_CID: u32 = 3;
