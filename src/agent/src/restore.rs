//! A guest restored from a template becomes itself again: every clone of
//! one snapshot wakes with the same random pool (so the same "random"
//! bytes from `/dev/urandom` and `getrandom`) and a wall clock stopped at
//! the moment the snapshot was taken. Before the pod's sandbox is set up,
//! the host's fresh entropy is mixed into the pool and credited
//! (`RNDADDENTROPY`), the kernel's generator is reseeded from it at once
//! (`RNDRESEEDCRNG`, instead of at its next scheduled reseed), and the
//! wall clock is set from the host's.

use std::os::fd::AsRawFd;

use husk_protocol::{AgentError, ErrorCode, Restored, MAX_RESTORE_ENTROPY, MIN_RESTORE_ENTROPY};

/// `_IOW('R', 0x03, int[2])` (linux/random.h).
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `_IO('R', 0x07)` (linux/random.h).
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Checks `r` without applying it.
pub fn check(r: &Restored) -> Result<(), AgentError> {
    let n = r.entropy.len();
    if !(MIN_RESTORE_ENTROPY..=MAX_RESTORE_ENTROPY).contains(&n) {
        return Err(AgentError::new(
            ErrorCode::InvalidArgument,
            format!(
                "restored: {n} bytes of entropy; {MIN_RESTORE_ENTROPY} to {MAX_RESTORE_ENTROPY} are needed"
            ),
        ));
    }
    if r.entropy.iter().all(|b| *b == r.entropy[0]) {
        // All one byte value is a caller that forgot to fill its buffer.
        return Err(AgentError::new(
            ErrorCode::InvalidArgument,
            "restored: the entropy bytes are all the same",
        ));
    }
    if r.realtime_ns == 0 {
        return Err(AgentError::new(
            ErrorCode::InvalidArgument,
            "restored: no wall clock time",
        ));
    }
    Ok(())
}

/// The `struct rand_pool_info` RNDADDENTROPY reads: two ints, then the
/// bytes.
fn pool_info(entropy: &[u8]) -> Vec<u8> {
    let len = entropy.len();
    let bits = i32::try_from(len * 8).unwrap_or(i32::MAX);
    let size = i32::try_from(len).unwrap_or(i32::MAX);
    let mut buf = Vec::with_capacity(8 + len);
    buf.extend_from_slice(&bits.to_ne_bytes());
    buf.extend_from_slice(&size.to_ne_bytes());
    buf.extend_from_slice(entropy);
    buf
}

/// Reseeds the guest kernel's generator from `r.entropy` and sets the
/// wall clock. Needs CAP_SYS_ADMIN and CAP_SYS_TIME (the agent is init).
pub fn apply(r: &Restored) -> Result<(), AgentError> {
    check(r)?;
    let fail = |what: &str, e: std::io::Error| crate::error::reply(ErrorCode::System, what, &e);
    let random = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| fail("open /dev/urandom", e))?;
    let info = pool_info(&r.entropy);
    // SAFETY: `info` is a rand_pool_info of the size its header gives,
    // alive for the call; the kernel only reads it.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) } < 0 {
        return Err(fail(
            "add entropy (RNDADDENTROPY)",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: an ioctl without an argument on a descriptor we own.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG as _) } < 0 {
        return Err(fail(
            "reseed the generator (RNDRESEEDCRNG)",
            std::io::Error::last_os_error(),
        ));
    }
    let ts = libc::timespec {
        tv_sec: (r.realtime_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (r.realtime_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: a valid timespec, read by the kernel during the call.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } < 0 {
        return Err(fail("set the wall clock", std::io::Error::last_os_error()));
    }
    crate::log::debug(&format!(
        "restored: random pool reseeded from {} bytes, wall clock set",
        r.entropy.len()
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn restored(entropy: Vec<u8>) -> Restored {
        Restored {
            entropy,
            realtime_ns: 1_700_000_000_000_000_000,
        }
    }

    #[test]
    fn entropy_must_be_enough_and_not_one_value() {
        let varied: Vec<u8> = (0..64).collect();
        assert!(check(&restored(varied.clone())).is_ok());
        assert!(check(&restored(varied[..31].to_vec())).is_err());
        assert!(check(&restored((0..=255).cycle().take(513).collect())).is_err());
        assert!(check(&restored(vec![0; 64])).is_err());
        let mut no_clock = restored(varied);
        no_clock.realtime_ns = 0;
        assert!(check(&no_clock).is_err());
    }

    #[test]
    fn pool_info_is_the_kernels_layout() {
        let info = pool_info(&[1, 2, 3, 4]);
        assert_eq!(&info[..4], &32i32.to_ne_bytes());
        assert_eq!(&info[4..8], &4i32.to_ne_bytes());
        assert_eq!(&info[8..], &[1, 2, 3, 4]);
    }
}
