//! A guest about to become a template is made cheap to copy. A snapshot's
//! memory file skips pages that are all zeroes, but a freshly booted guest
//! has freed, non-zero memory the snapshot would keep: the initramfs
//! archive the kernel unpacked and released, its own init sections, boot
//! time allocations, clean page cache. Every clone of the template
//! carries those pages (a pod's, whose memory is shared with its
//! virtio-fs backend, copies them at each restore). So, just before the
//! snapshot: sync, drop the clean page cache, and let a child process
//! allocate every free page the guest can spare (the kernel hands them out
//! zeroed) and exit (they go back to the free lists, still zero).

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};

use husk_protocol::{AgentError, ErrorCode};

/// Free memory left alone: the kernel's own reserves and what the agent
/// and the guest need while the child runs. Below the watermarks the
/// kernel would reclaim or call the OOM killer.
const RESERVE_FLOOR: u64 = 8 << 20;
/// The child allocates in steps of this much, so that a refusal (or the
/// OOM killer) stops it with the earlier steps done.
const STEP: usize = 2 << 20;

/// One `/proc/meminfo` line's value in bytes (the file gives kB).
fn meminfo_bytes(meminfo: &str, key: &str) -> Option<u64> {
    meminfo.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        let kb: u64 = rest.trim().strip_suffix("kB")?.trim().parse().ok()?;
        Some(kb * 1024)
    })
}

/// How much of `MemFree` to zero: all but a reserve of four times the
/// kernel's minimum free memory (its watermarks are multiples of it), and
/// never less than [`RESERVE_FLOOR`].
pub fn zero_target(meminfo: &str, min_free_kbytes: u64) -> u64 {
    let free = meminfo_bytes(meminfo, "MemFree").unwrap_or(0);
    let reserve = (min_free_kbytes * 1024 * 4).max(RESERVE_FLOOR);
    free.saturating_sub(reserve)
}

fn system(what: &str, e: std::io::Error) -> AgentError {
    crate::error::reply(ErrorCode::System, what, &e)
}

/// Syncs, drops the clean page cache and zeroes free memory; returns the
/// bytes zeroed. Only in a guest (`pid1`) with no container (`containers`
/// is how many exist).
pub fn prepare(pid1: bool, containers: usize) -> Result<u64, AgentError> {
    if !pid1 {
        return Err(AgentError::new(
            ErrorCode::Unsupported,
            "a template is prepared only in a guest",
        ));
    }
    if containers > 0 {
        return Err(AgentError::new(
            ErrorCode::FailedPrecondition,
            format!("{containers} containers exist: a template has none"),
        ));
    }
    // SAFETY: sync takes no arguments and cannot fail.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3")
        .map_err(|e| system("drop the page cache", e))?;
    let meminfo =
        std::fs::read_to_string("/proc/meminfo").map_err(|e| system("read /proc/meminfo", e))?;
    let min_free = std::fs::read_to_string("/proc/sys/vm/min_free_kbytes")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let target = zero_target(&meminfo, min_free);
    let zeroed = zero_free_memory(target)?;
    crate::log::debug(&format!(
        "template prepared: {zeroed} of {target} bytes of free memory zeroed"
    ));
    Ok(zeroed)
}

/// Runs the child that takes up to `target` bytes of free memory, and
/// returns how much it got.
fn zero_free_memory(target: u64) -> Result<u64, AgentError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two-element array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(system("create a pipe", std::io::Error::last_os_error()));
    }
    // SAFETY: both descriptors were just created and are owned here only.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let write_fd = std::os::fd::AsRawFd::as_raw_fd(&write_end);
    // SAFETY: the child calls only async-signal-safe functions (open,
    // write, close, mmap, _exit) before it exits, as a child of a
    // multi-threaded process must.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(system(
            "start the zeroing process",
            std::io::Error::last_os_error(),
        ));
    }
    if pid == 0 {
        zeroing_child(write_fd, target);
    }
    drop(write_end);
    let mut got = [0u8; 8];
    let mut file = std::fs::File::from(read_end);
    // Each step the child completes is reported; the last whole report
    // stands (a child killed mid-write leaves a partial one, ignored).
    let mut zeroed = 0u64;
    while file.read_exact(&mut got).is_ok() {
        zeroed = u64::from_ne_bytes(got);
    }
    let mut status = 0;
    // SAFETY: waits for the child forked above; `status` is written.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    Ok(zeroed)
}

/// The child: first in line for the OOM killer, it maps and populates
/// private anonymous memory step by step (each page allocated and zeroed
/// by the kernel), reporting its total on `report` after each step, until
/// `target` is reached or the kernel refuses; its exit frees it all. Only
/// in the child of a fork: it calls nothing but async-signal-safe
/// functions, and never returns.
fn zeroing_child(report: i32, target: u64) -> ! {
    let path = c"/proc/self/oom_score_adj";
    // SAFETY: a NUL-terminated path; the descriptor is closed below.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_WRONLY) };
    if fd >= 0 {
        // SAFETY: four bytes of a static string to a descriptor we own.
        unsafe {
            libc::write(fd, b"1000".as_ptr().cast(), 4);
            libc::close(fd);
        }
    }
    let mut done = 0u64;
    while done + STEP as u64 <= target {
        // SAFETY: a new private anonymous mapping; nothing else refers to
        // it, and it lives until this process exits.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                STEP,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            break;
        }
        done += STEP as u64;
        let bytes = done.to_ne_bytes();
        // SAFETY: eight bytes of a local to the pipe's write end.
        unsafe { libc::write(report, bytes.as_ptr().cast(), bytes.len()) };
    }
    // SAFETY: ends the child without running the parent's destructors or
    // atexit handlers.
    unsafe { libc::_exit(0) }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMINFO: &str =
        "MemTotal:         118404 kB\nMemFree:           81920 kB\nMemAvailable:      90000 kB\n";

    #[test]
    fn the_target_is_free_memory_less_a_reserve() {
        // 80 MiB free; reserve 4 x 1 MiB is under the 8 MiB floor.
        assert_eq!(zero_target(MEMINFO, 1024), (80 - 8) << 20);
        // A larger minimum: 4 x 4 MiB.
        assert_eq!(zero_target(MEMINFO, 4096), (80 - 16) << 20);
        // Less free than the reserve, or no MemFree line: nothing.
        assert_eq!(zero_target("MemFree: 4096 kB\n", 1024), 0);
        assert_eq!(zero_target("MemTotal: 4096 kB\n", 1024), 0);
        assert_eq!(meminfo_bytes(MEMINFO, "MemAvailable"), Some(90000 * 1024));
        assert_eq!(meminfo_bytes(MEMINFO, "Mem"), None);
    }

    #[test]
    fn only_in_a_guest_without_containers() {
        let e = prepare(false, 0).unwrap_err();
        assert_eq!(e.code, ErrorCode::Unsupported);
        let e = prepare(true, 1).unwrap_err();
        assert_eq!(e.code, ErrorCode::FailedPrecondition);
    }

    #[test]
    fn the_child_reports_what_it_took() {
        // Outside a guest too: 8 MiB of this process's child, released
        // when it exits.
        assert_eq!(zero_free_memory(8 << 20).unwrap(), 8 << 20);
        assert_eq!(zero_free_memory(STEP as u64 - 1).unwrap(), 0);
    }
}
