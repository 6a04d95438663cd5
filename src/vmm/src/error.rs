//! How an error is shown. Every husk error says what failed at its own
//! level and keeps the error that caused it as its `source()`, never in its
//! message; the whole story is the chain, joined once where it leaves the
//! code: a log line ([`Chain`], `error = %Chain(&e)`), an API fault message
//! ([`chain`]), a binary's last words (anyhow's `{:#}`, which joins the
//! same way). [`Flat`] keeps the chain honest where another crate's error
//! already prints its cause in its own message.

use std::error::Error;
use std::fmt;

/// Displays an error and each of its causes, outermost first, joined by
/// `": "`: `cannot start the microVM: cannot read kernel /k: No such file`.
#[derive(Clone, Copy)]
pub struct Chain<'a>(pub &'a (dyn Error + 'a));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(e) = cause {
            write!(f, ": {e}")?;
            cause = e.source();
        }
        Ok(())
    }
}

impl fmt::Debug for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The error and its causes on one line (see [`Chain`]).
pub fn chain(e: &dyn Error) -> String {
    Chain(e).to_string()
}

/// An error from another crate whose message already includes its cause
/// (linux-loader's "failed to load ELF kernel image: {e}", seccompiler's
/// "Error calling `seccomp`: {errno}", ...) while also returning that cause
/// as its `source()`. Held as `Flat(e)` it shows the same message and ends
/// the chain, so the cause is printed once. The error itself is `.0`.
pub struct Flat<E>(pub E);

impl<E: fmt::Display> fmt::Display for Flat<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<E: fmt::Debug> fmt::Debug for Flat<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<E: fmt::Debug + fmt::Display> Error for Flat<E> {}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("cannot read kernel {path}")]
        Read {
            path: &'static str,
            #[source]
            source: std::io::Error,
        },
        #[error("cannot install the filter")]
        Foreign(#[source] Flat<Repeating>),
    }

    /// Stands in for a foreign error that names its source in its message.
    #[derive(Debug, thiserror::Error)]
    #[error("Error calling `seccomp`: {0}")]
    struct Repeating(#[source] std::io::Error);

    fn not_found() -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::NotFound, "gone")
    }

    #[test]
    fn chain_joins_every_cause_once_outermost_first() {
        let e = Outer::Read {
            path: "/k",
            source: not_found(),
        };
        assert_eq!(chain(&e), "cannot read kernel /k: gone");
        assert_eq!(format!("{}", Chain(&e)), chain(&e));
        assert_eq!(chain(&not_found()), "gone");
    }

    #[test]
    fn a_flat_foreign_error_prints_its_cause_once() {
        let e = Outer::Foreign(Flat(Repeating(not_found())));
        assert_eq!(
            chain(&e),
            "cannot install the filter: Error calling `seccomp`: gone"
        );
        // Unflattened, the same error would have said "gone" twice.
        assert_eq!(
            chain(&Repeating(not_found())),
            "Error calling `seccomp`: gone: gone"
        );
    }
}
