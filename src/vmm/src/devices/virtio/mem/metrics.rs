//! What the virtio-mem device counts: the guest's requests by outcome and
//! the memory they moved. Written with the other devices' counters as
//! `devices.mem.<id>` in the metrics file.

use crate::metrics::Counter;

/// One virtio-mem device.
#[derive(Debug, Default, serde::Serialize)]
pub struct MemMetrics {
    /// Plug requests acknowledged.
    pub plug_count: Counter,
    /// Bytes plugged by them.
    pub plugged_bytes: Counter,
    /// Unplug (and unplug-all) requests acknowledged.
    pub unplug_count: Counter,
    /// Bytes unplugged by them.
    pub unplugged_bytes: Counter,
    /// State requests answered.
    pub state_count: Counter,
    /// Plug requests refused because they went past the requested size (NACK).
    pub nacks: Counter,
    /// Requests refused as invalid (ERROR): bad ranges, blocks in the wrong
    /// state, unknown types.
    pub errors: Counter,
    /// Chains without a usable response buffer, returned unanswered.
    pub invalid_chains: Counter,
    /// Host failures (a slot KVM would not map, pages madvise would not
    /// release); the request got BUSY and the guest retries.
    pub host_failures: Counter,
    /// Changes of the requested size.
    pub resizes: Counter,
}
