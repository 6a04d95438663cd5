//! Both sides of a virtio-fs relay are hostile: a guest that controls all
//! of guest memory (descriptor table, rings, buffers) and the queue's
//! size and ring addresses, and a backend that returns whatever used-ring
//! entries it likes (chains it was given or not, any lengths, the same
//! chain twice). The relay must forward, refuse or stop without
//! panicking, hanging or touching memory outside the guest's and its own.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::devices::virtio::fs::relay::{Relay, Shadow};

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    if data.len() < 32 {
        return;
    }
    // Header: queue size, three ring addresses, then 16 bytes that script
    // the backend; the guest's memory after them.
    let mem = common::guest_memory(&data[32..]);
    let Some(q) = common::queue_from(data, 0, [4, 8, 12], &mem) else {
        return;
    };
    // One queue: the high-priority one, whose small pool makes requests
    // wait for room and too-large ones get their EIO.
    let Ok(shadow) = Shadow::new(1) else {
        return;
    };
    let Ok(mut relay) = Relay::new(&shadow, mem, vec![q]) else {
        return;
    };
    let script = &data[16..32];
    let (mut taken, mut used) = (0u16, 0u16);
    for round in 0..4 {
        if relay.requests(&shadow, 0).is_err() {
            return;
        }
        let heads = shadow.backend_takes(0, taken);
        taken = taken.wrapping_add(heads.len() as u16);
        let s = |i: usize| u32::from(script[(round * 4 + i) % script.len()]);
        // Replies for what it was given, of lengths from the script, and
        // now and then one for a chain it was not.
        let mut entries: Vec<(u32, u32)> = heads
            .iter()
            .enumerate()
            .map(|(i, h)| (u32::from(*h), s(i) * 97))
            .collect();
        if s(3) % 5 == 0 {
            entries.push((s(1) % 140, s(2)));
        }
        if s(0) % 3 == 0 {
            entries.reverse();
        }
        used = shadow.backend_uses(0, used, &entries);
        if relay.replies(&shadow, 0).is_err() {
            return;
        }
    }
});
