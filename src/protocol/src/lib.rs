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
