//! Seccomp confinement, one filter per kind of thread.
//!
//! The policies live in `resources/seccomp/<arch>.json` and are compiled to
//! BPF by build.rs, so nothing is parsed at run time. Each thread installs
//! its own filter before it does the work the filter is meant to confine:
//! the API thread before it accepts a connection, every vCPU thread before
//! its first `KVM_RUN`, and the VMM thread (the one that runs the event
//! loop) right after starting the vCPUs, which wait for it before entering
//! the guest. A thread inherits its creator's filter, which is why the VMM
//! thread installs its own only once its vCPU threads exist.
//!
//! A forbidden system call traps. The SIGSYS handler writes one line naming
//! the thread and the system call number to stderr and then kills the whole
//! process by SIGSYS (not just the thread: a VMM missing a thread is in no
//! state to go on).

use std::cell::Cell;
use std::sync::Once;

use seccompiler::sock_filter;

use crate::error::Flat;

/// One BPF instruction as build.rs writes it: (code, jt, jf, k).
type Insn = (u16, u8, u8, u32);

// `FILTERS`: each policy's name and program, compiled by build.rs.
include!(concat!(env!("OUT_DIR"), "/seccomp_filters.rs"));

/// A system call no policy allows, harmless when it runs: the probe a
/// self-test makes, and how the SIGSYS handler turns a trap into the death
/// of the process (a second trap while SIGSYS is blocked in its own handler
/// makes the kernel reset it to the default action, which ends the process).
pub const PROBE_SYSCALL: libc::c_long = libc::SYS_getppid;

/// Errors installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// This build has no policy for the thread kind (or the architecture).
    #[error("no seccomp policy for {0} threads in this build (run with --no-seccomp to go on unconfined)")]
    NoPolicy(&'static str),
    /// The SIGSYS handler could not be installed.
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] std::io::Error),
    /// The kernel refused the filter.
    #[error("cannot install the seccomp filter for {kind} threads")]
    Install {
        /// The thread kind.
        kind: &'static str,
        /// What the kernel said (seccompiler's message names its cause).
        #[source]
        source: Flat<seccompiler::Error>,
    },
}

/// The kinds of threads husk runs, each with its own policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The thread that runs the event loop: devices, signals, the controller.
    Vmm,
    /// The REST API server.
    Api,
    /// A vCPU.
    Vcpu,
    /// The thread that fills a restored VM's shared memory from its memory
    /// file (`vstate::lazy_memory`).
    Fill,
}

impl ThreadKind {
    /// The policy's name in the JSON file.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Api => "api",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Fill => "fill",
        }
    }

    /// Parses a policy name.
    pub fn from_name(name: &str) -> Option<Self> {
        [
            ThreadKind::Vmm,
            ThreadKind::Api,
            ThreadKind::Vcpu,
            ThreadKind::Fill,
        ]
        .into_iter()
        .find(|k| k.name() == name)
    }
}

/// Which filters to install: the built-in ones, or none (`--no-seccomp`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeccompFilters {
    enabled: bool,
    probe: Option<ThreadKind>,
}

impl Default for SeccompFilters {
    /// Confined: the built-in filters.
    fn default() -> Self {
        Self::builtin()
    }
}

impl SeccompFilters {
    /// The policies compiled into this binary.
    pub fn builtin() -> Self {
        SeccompFilters {
            enabled: true,
            probe: None,
        }
    }

    /// No filters at all, for debugging.
    pub fn disabled() -> Self {
        SeccompFilters {
            enabled: false,
            probe: None,
        }
    }

    /// A self-test: threads of `kind` make a forbidden system call right
    /// after installing their filter, so the process must die by SIGSYS.
    pub fn with_probe(mut self, kind: ThreadKind) -> Self {
        self.probe = Some(kind);
        self
    }

    /// True unless built with [`SeccompFilters::disabled`].
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Confines the calling thread with the policy for `kind`.
    pub fn install(&self, kind: ThreadKind) -> Result<(), SeccompError> {
        if !self.enabled {
            return Ok(());
        }
        let program = program(kind).ok_or(SeccompError::NoPolicy(kind.name()))?;
        install_sigsys_handler()?;
        remember_thread(kind);
        seccompiler::apply_filter(&program).map_err(|source| SeccompError::Install {
            kind: kind.name(),
            source: Flat(source),
        })?;
        tracing::debug!(
            thread = kind.name(),
            instructions = program.len(),
            "seccomp filter installed"
        );
        if self.probe == Some(kind) {
            tracing::warn!(
                thread = kind.name(),
                "seccomp self-test: making a forbidden call"
            );
            // SAFETY: getppid takes no arguments and has no effect.
            unsafe { libc::syscall(PROBE_SYSCALL) };
        }
        Ok(())
    }
}

/// The BPF program for `kind`, if this build has one.
fn program(kind: ThreadKind) -> Option<Vec<sock_filter>> {
    FILTERS
        .iter()
        .find(|(name, _)| *name == kind.name())
        .map(|(_, insns)| {
            insns
                .iter()
                .map(|&(code, jt, jf, k)| sock_filter { code, jt, jf, k })
                .collect()
        })
}

thread_local! {
    /// The thread's kind and name, for the SIGSYS handler (which can read a
    /// thread-local but must not allocate or lock).
    static THREAD: Cell<(&'static str, [u8; 16])> = const { Cell::new(("unconfined", [0; 16])) };
}

fn remember_thread(kind: ThreadKind) {
    let mut name = [0u8; 16];
    if let Some(n) = std::thread::current().name() {
        let len = n.len().min(name.len());
        name[..len].copy_from_slice(&n.as_bytes()[..len]);
    }
    THREAD.with(|t| t.set((kind.name(), name)));
}

fn install_sigsys_handler() -> Result<(), SeccompError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is valid; the handler has the
        // SA_SIGINFO signature and only calls async-signal-safe functions.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigsys as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
                result = Err(SeccompError::Handler(std::io::Error::last_os_error()));
            }
        }
    });
    result
}

/// A small stack buffer for the handler's one line.
struct Line {
    buf: [u8; 192],
    len: usize,
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_number(&mut self, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// The line the SIGSYS handler writes.
fn violation_line(kind: &str, name: &[u8], syscall: i32) -> Line {
    let mut line = Line {
        buf: [0; 192],
        len: 0,
    };
    let name_len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    line.push(b"husk: seccomp violation: thread=");
    line.push(&name[..name_len]);
    line.push(b" policy=");
    line.push(kind.as_bytes());
    line.push(b" syscall=");
    line.push_number(u64::from(syscall.unsigned_abs()));
    line.push(b"; killing the process\n");
    line
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: with SA_SIGINFO the kernel passes a valid siginfo; for a
    // seccomp SIGSYS, si_syscall is the int at byte 24 (after signo, errno,
    // code, padding and si_call_addr).
    let syscall = unsafe { info.cast::<u8>().add(24).cast::<i32>().read_unaligned() };
    let (kind, name) = THREAD.with(Cell::get);
    let line = violation_line(kind, &name, syscall);
    // SAFETY: write(2) on stderr from a stack buffer is async-signal-safe;
    // the probe call traps again while SIGSYS is blocked, so the kernel
    // restores the default action and the whole process dies by SIGSYS.
    // _exit is the fallback should that somehow return.
    unsafe {
        libc::write(2, line.buf.as_ptr().cast(), line.len);
        libc::syscall(PROBE_SYSCALL);
        libc::_exit(128 + libc::SIGSYS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = include_str!("../../../resources/seccomp/x86_64.json");

    #[test]
    fn every_kind_has_a_program() {
        for kind in [
            ThreadKind::Vmm,
            ThreadKind::Api,
            ThreadKind::Vcpu,
            ThreadKind::Fill,
        ] {
            let p = program(kind).unwrap();
            assert!(p.len() > 10, "{kind:?}");
            assert_eq!(ThreadKind::from_name(kind.name()), Some(kind));
        }
        assert_eq!(ThreadKind::from_name("other"), None);
    }

    #[test]
    fn no_policy_allows_the_probe_or_process_creation() {
        let policy: serde_json::Value = serde_json::from_str(POLICY).unwrap();
        for (kind, filter) in policy.as_object().unwrap() {
            for rule in filter["filter"].as_array().unwrap() {
                let name = rule["syscall"].as_str().unwrap();
                for never in [
                    "getppid",
                    "execve",
                    "execveat",
                    "fork",
                    "vfork",
                    "ptrace",
                    "mount",
                    "setuid",
                    "setgid",
                    "chroot",
                    "pivot_root",
                    "bpf",
                    "kexec_load",
                ] {
                    assert_ne!(name, never, "{kind} allows {never}");
                }
                // Threads are created with clone3 (or clone with the thread
                // flags); a new process never.
                if name == "clone" {
                    assert!(
                        rule["args"].is_array(),
                        "{kind} allows clone unconditionally"
                    );
                }
            }
        }
    }

    #[test]
    fn the_violation_line_names_thread_policy_and_call() {
        let mut name = [0u8; 16];
        name[..10].copy_from_slice(b"husk-vcpu0");
        let l = violation_line("vcpu", &name, 110);
        assert_eq!(
            std::str::from_utf8(&l.buf[..l.len]).unwrap(),
            "husk: seccomp violation: thread=husk-vcpu0 policy=vcpu syscall=110; killing the process\n"
        );
        let l = violation_line("api", &[b'x'; 16], 0);
        assert!(std::str::from_utf8(&l.buf[..l.len])
            .unwrap()
            .contains("thread=xxxxxxxxxxxxxxxx policy=api syscall=0;"));
    }

    /// Runs `case` in a fresh copy of this test binary (a filter is for
    /// good: it must not land on the harness's threads) and returns how
    /// the child ended and what it wrote.
    fn in_child(case: &str) -> (std::process::ExitStatus, String) {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "seccomp::tests::child_case",
                "--test-threads=1",
                "--nocapture",
            ])
            .env("HUSK_SECCOMP_CASE", case)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status, text)
    }

    /// Not a test by itself: the body [`in_child`] runs.
    #[test]
    fn child_case() {
        let Ok(case) = std::env::var("HUSK_SECCOMP_CASE") else {
            return;
        };
        let (kind, call) = case.split_once(':').unwrap();
        let kind = ThreadKind::from_name(kind).unwrap();
        let call = call.to_string();
        std::thread::Builder::new()
            .name(format!("case-{}", kind.name()))
            .spawn(move || {
                SeccompFilters::builtin().install(kind).unwrap();
                // SAFETY: each call is made with arguments that cannot harm
                // this process; the point is whether the filter lets it in.
                let rc = unsafe {
                    match call.as_str() {
                        "getppid" => libc::syscall(PROBE_SYSCALL),
                        "socket-inet" => libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) as i64,
                        "socket-unix" => libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) as i64,
                        "ioctl-kvm-create-vm" => libc::ioctl(-1, 0xae01) as i64,
                        "ioctl-kvm-run" => libc::ioctl(-1, 0xae80) as i64,
                        "ioctl-kvm-set-memory-region" => libc::ioctl(-1, 0x4020_ae46) as i64,
                        "mmap-exec" => libc::mmap(
                            std::ptr::null_mut(),
                            4096,
                            libc::PROT_READ | libc::PROT_EXEC,
                            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                            -1,
                            0,
                        ) as i64,
                        "mmap-rw" => libc::mmap(
                            std::ptr::null_mut(),
                            4096,
                            libc::PROT_READ | libc::PROT_WRITE,
                            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                            -1,
                            0,
                        ) as i64,
                        other => panic!("unknown call {other}"),
                    }
                };
                println!("SURVIVED {rc}");
            })
            .unwrap()
            .join()
            .unwrap();
    }

    fn assert_killed(case: &str, thread: &str) {
        use std::os::unix::process::ExitStatusExt;
        let (status, text) = in_child(case);
        assert_eq!(
            status.signal(),
            Some(libc::SIGSYS),
            "{case}: {status:?}\n{text}"
        );
        assert!(!text.contains("SURVIVED"), "{case}: {text}");
        assert!(
            text.contains(&format!("husk: seccomp violation: thread={thread} ")),
            "{case}: {text}"
        );
    }

    fn assert_allowed(case: &str) {
        let (status, text) = in_child(case);
        assert!(
            status.success() && text.contains("SURVIVED"),
            "{case}: {status:?}\n{text}"
        );
    }

    #[test]
    fn a_forbidden_call_kills_the_whole_process_with_a_line_naming_it() {
        for kind in ["vmm", "api", "vcpu", "fill"] {
            let (_, text) = in_child(&format!("{kind}:getppid"));
            assert!(
                text.contains(&format!("policy={kind} syscall={PROBE_SYSCALL};")),
                "{text}"
            );
            assert_killed(&format!("{kind}:getppid"), &format!("case-{kind}"));
        }
    }

    #[test]
    fn argument_rules_tell_allowed_from_forbidden_calls() {
        // Sockets: the VMM thread opens unix ones (vsock), no other family.
        assert_allowed("vmm:socket-unix");
        assert_killed("vmm:socket-inet", "case-vmm");
        assert_killed("api:socket-unix", "case-api");
        // ioctl: a vCPU may run itself, never create a VM.
        assert_allowed("vcpu:ioctl-kvm-run");
        assert_killed("vcpu:ioctl-kvm-create-vm", "case-vcpu");
        assert_killed("vmm:ioctl-kvm-create-vm", "case-vmm");
        // Memory slots: the VMM thread maps hot-pluggable memory; a vCPU
        // or the API thread never changes the guest's memory map.
        assert_allowed("vmm:ioctl-kvm-set-memory-region");
        assert_killed("vcpu:ioctl-kvm-set-memory-region", "case-vcpu");
        assert_killed("api:ioctl-kvm-set-memory-region", "case-api");
        // mmap: no executable mappings after start.
        assert_allowed("vcpu:mmap-rw");
        assert_killed("vcpu:mmap-exec", "case-vcpu");
        assert_killed("api:mmap-exec", "case-api");
        // The fill thread copies pages into guest memory; it creates no
        // VM, opens nothing and touches no socket.
        assert_killed("fill:ioctl-kvm-create-vm", "case-fill");
        assert_killed("fill:socket-unix", "case-fill");
    }

    #[test]
    fn the_fill_policy_allows_exactly_the_userfaultfd_requests_it_makes() {
        let policy: serde_json::Value = serde_json::from_str(POLICY).unwrap();
        let mut allowed: Vec<u64> = policy["fill"]["filter"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["syscall"] == "ioctl")
            .map(|r| r["args"][0]["val"].as_u64().unwrap())
            .collect();
        allowed.sort_unstable();
        let mut used = crate::vstate::lazy_memory::fill_ioctls().to_vec();
        used.sort_unstable();
        assert_eq!(allowed, used);
    }
}
