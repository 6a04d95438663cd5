//! Legacy PC devices on the port-I/O bus: the 16550 UART that carries the
//! guest console, and the i8042 whose reset command ends the VM.

pub mod i8042;
pub mod persist;
pub mod serial;

pub use i8042::I8042;
pub use serial::{EventFdTrigger, Serial};
