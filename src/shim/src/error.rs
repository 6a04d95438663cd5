//! Error chains at the shim's edges. Every error type in the shim says
//! what failed at its own level and leaves the cause to its `source()`;
//! where an error leaves the process (a ttrpc status containerd shows the
//! user, a log field) the chain is joined here, once.

use std::fmt;

/// Displays an error and each of its sources, joined by `": "`.
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot boot the pod's microVM")]
    struct Outer(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("cannot open {0}")]
    struct Inner(&'static str, #[source] std::io::Error);

    #[test]
    fn each_cause_appears_once_in_order() {
        let e = Outer(Inner(
            "/dev/kvm",
            std::io::Error::from(std::io::ErrorKind::NotFound),
        ));
        assert_eq!(
            Chain(&e).to_string(),
            "cannot boot the pod's microVM: cannot open /dev/kvm: entity not found"
        );
    }
}
