//! The agent's one error convention at its edge: an error's message says
//! what failed at its own level and never repeats its source; where an
//! error leaves the agent (a reply's [`AgentError`], a log line) its chain
//! is joined here, once, as `outer: inner: innermost`.

use std::error::Error;
use std::fmt::Display;

use husk_protocol::{AgentError, ErrorCode};

/// `e` and every source below it, joined with ": ".
pub fn chain(e: &dyn Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// A reply for the host: `what` failed because of `e` (and its sources).
pub fn reply(code: ErrorCode, what: impl Display, e: &dyn Error) -> AgentError {
    AgentError::new(code, format!("{what}: {}", chain(e)))
}

/// A reply that is `e`'s chain alone (its message already says what failed).
pub fn reply_from(code: ErrorCode, e: &dyn Error) -> AgentError {
    AgentError::new(code, chain(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot mount the rootfs")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn the_chain_is_joined_once() {
        let e = Outer(std::io::Error::from_raw_os_error(libc::ENOENT));
        let r = reply(ErrorCode::System, "create container c1", &e);
        assert_eq!(
            r.message,
            "create container c1: cannot mount the rootfs: No such file or directory (os error 2)"
        );
        assert_eq!(chain(&e).matches("No such file").count(), 1);
        assert_eq!(
            reply_from(ErrorCode::System, &e).message,
            "cannot mount the rootfs: No such file or directory (os error 2)"
        );
    }
}
