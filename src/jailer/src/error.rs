//! The jailer's one error type. Every variant names the step that failed
//! and, where there is one, the path it was working on, so a refusal or a
//! failure reads as a sentence an operator can act on.

use std::io;
use std::path::PathBuf;

/// Why the jailer refused to start husk, or which step failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No --id was given.
    #[error("missing --id: every jail needs an id (1 to 64 characters from [A-Za-z0-9-])")]
    MissingId,
    /// The id is empty, too long or has characters outside [A-Za-z0-9-].
    #[error(
        "invalid --id {0:?}: an id is 1 to 64 characters from [A-Za-z0-9-] (no '/', '.', or '..')"
    )]
    InvalidId(String),
    /// --uid 0 or --gid 0 without --allow-root.
    #[error("refusing to run husk as {what} 0 (root): pass --allow-root if you really mean it")]
    RootUid {
        /// "uid" or "gid".
        what: &'static str,
    },
    /// A --parent-cgroup that is absolute or climbs out of the hierarchy.
    #[error("invalid --parent-cgroup {0:?}: a relative path of names from [A-Za-z0-9_.-], none of them '.' or '..'")]
    InvalidParentCgroup(String),
    /// A --cgroup that is not FILE=VALUE with a safe file name.
    #[error("invalid --cgroup {setting:?}: {why}")]
    InvalidCgroupSetting {
        /// The setting as given.
        setting: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A --bind-ro that is not SOURCE:NAME with a plain file name.
    #[error("invalid --bind-ro {0:?}: expected SOURCE:NAME, SOURCE an absolute path, NAME one file name from [A-Za-z0-9_.-] (not . or ..)")]
    InvalidBind(String),
    /// --no-cgroup with cgroup settings, or --chroot-dir with a base.
    #[error("{0}")]
    Conflict(&'static str),
    /// The exec file has no usable file name.
    #[error("invalid --exec-file {0}: it must name a regular file")]
    InvalidExecFile(PathBuf),
    /// The jailer was not started as root.
    #[error(
        "the jailer must run as root (it mounts, mknods and changes uid); effective uid is {0}"
    )]
    NotRoot(u32),
    /// A directory the jailer owns exists but is not what it would have made.
    #[error("refusing to use {path}: {why}")]
    UnsafeDir {
        /// The offending path.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// A system call in a named step failed on a path.
    #[error("cannot {step} {path}")]
    Path {
        /// The step, as a short imperative ("create directory", "mknod").
        step: &'static str,
        /// The path it worked on.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A system call in a named step failed (no path involved).
    #[error("cannot {step}")]
    Step {
        /// The step, as a short imperative.
        step: &'static str,
        /// The underlying error.
        source: io::Error,
    },
    /// A path, argument or environment entry that the kernel cannot take.
    #[error("{what} has a NUL byte")]
    NulByte {
        /// Which string ("the exec path", "an argument", ...).
        what: String,
    },
    /// A cgroup controller the settings need is not available.
    #[error("cgroup controller {controller:?} is not available ({why})")]
    NoController {
        /// The controller's name.
        controller: String,
        /// Where it was looked for.
        why: String,
    },
    /// A --keep-fd that is not open.
    #[error("--keep-fd {0} is not an open file descriptor")]
    BadKeepFd(i32),
    /// After dropping privileges, some remain.
    #[error("capabilities remain after dropping them: {0}")]
    CapsRemain(String),
}

impl Error {
    /// Wraps an io::Error from a step on a path.
    pub fn path(step: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Error {
        let path = path.into();
        move |source| Error::Path { step, path, source }
    }

    /// Wraps the last OS error of a step on a path.
    pub fn last_os_path(step: &'static str, path: impl Into<PathBuf>) -> Error {
        Error::Path {
            step,
            path: path.into(),
            source: io::Error::last_os_error(),
        }
    }

    /// Wraps the last OS error of a step without a path.
    pub fn last_os(step: &'static str) -> Error {
        Error::Step {
            step,
            source: io::Error::last_os_error(),
        }
    }
}

/// The jailer's results.
pub type Result<T> = std::result::Result<T, Error>;
