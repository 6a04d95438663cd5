//! What a virtio-fs device counts. The requests are the backend's to
//! serve, so husk counts what passes through it: starts and stops, the
//! used-buffer notifications it raised to the guest, and failures; a
//! relaying device also counts the requests and bytes it copied.
//! Written as `devices.fs.<id>` in the metrics file.

use crate::metrics::Counter;

/// One virtio-fs device.
#[derive(Debug, Default, serde::Serialize)]
pub struct FsMetrics {
    /// Times the driver started the device and the backend took it.
    pub activations: Counter,
    /// Driver resets of a started device.
    pub resets: Counter,
    /// Used-buffer notifications from the backend, raised to the guest.
    pub interrupts: Counter,
    /// The backend refused a request or went away (the device then
    /// needs a reset for good).
    pub backend_failures: Counter,
    /// Relay mode: guest requests handed to the backend.
    pub requests: Counter,
    /// Relay mode: malformed guest requests, returned without reaching
    /// the backend.
    pub invalid_requests: Counter,
    /// Relay mode: request bytes copied from guest memory for the backend.
    pub bytes_to_backend: Counter,
    /// Relay mode: reply bytes copied from the backend into guest memory.
    pub bytes_from_backend: Counter,
}
