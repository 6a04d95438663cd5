//! The API server's parsing of what a client writes on its socket: a byte
//! stream of pipelined HTTP/1.1 requests, each routed to a controller
//! request from its method, path and JSON body. The server's own modules
//! are compiled in as they are (husk is a binary crate).
//!
//! Invariants: nothing panics; a parsed request consumes at least one and
//! at most all of the buffered bytes; whatever is refused is refused with
//! a 4xx (501 only for a transfer coding), never a 5xx the client did not
//! cause; every response serializes.
#![no_main]

use libfuzzer_sys::fuzz_target;

// routes.rs reaches its sibling as `super::http`: both sit at the root.
#[allow(dead_code)]
#[path = "../../src/api/http.rs"]
mod http;
#[allow(dead_code)]
#[path = "../../src/api/routes.rs"]
mod routes;

use http::Parsed;

fuzz_target!(|data: &[u8]| {
    let mut buf = data;
    // Pipelined requests, as the server consumes them from one buffer.
    while !buf.is_empty() {
        match http::parse(buf) {
            Parsed::Incomplete { .. } => break,
            Parsed::Invalid(response) => {
                assert!(
                    (400..500).contains(&response.status) || response.status == 501,
                    "parse refused with {}",
                    response.status
                );
                let _ = response.to_bytes(false);
                break;
            }
            Parsed::Done(request, used) => {
                assert!(
                    used > 0 && used <= buf.len(),
                    "used {used} of {}",
                    buf.len()
                );
                if let Err(response) = routes::route(&request.method, &request.path, &request.body)
                {
                    assert!(
                        (400..500).contains(&response.status),
                        "{} {} refused with {}",
                        request.method,
                        request.path,
                        response.status
                    );
                    let _ = response.to_bytes(request.keep_alive);
                }
                buf = &buf[used..];
            }
        }
    }
});
