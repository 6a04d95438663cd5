//! Feeds arbitrary bytes to the agent's decoding path: frames are split off
//! as the agent does (length prefix, size cap), and each is decoded as every
//! message the agent accepts. Whatever decodes must encode again. Nothing
//! may panic or allocate beyond the frame cap.
#![no_main]

use husk_protocol::frame::{encode, read_raw};
use husk_protocol::{Hello, ReplyFrame, RequestFrame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut input = data;
    while let Ok(Some(raw)) = read_raw(&mut input) {
        if let Ok(req) = serde_json::from_slice::<RequestFrame>(&raw) {
            let bytes = encode(&req).expect("a decoded request encodes");
            let mut again = &bytes[..];
            let back = read_raw(&mut again).expect("re-read").expect("a frame");
            serde_json::from_slice::<RequestFrame>(&back).expect("what was encoded decodes");
        }
        let _ = serde_json::from_slice::<Hello>(&raw);
        let _ = serde_json::from_slice::<ReplyFrame>(&raw);
    }
});
