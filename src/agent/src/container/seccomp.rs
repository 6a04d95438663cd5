//! The spec's seccomp profile (`linux.seccomp`) compiled to a classic BPF
//! program for x86_64, so the agent needs no libseccomp. Rules are tried in
//! the spec's order and the first match decides (each rule is one block:
//! load the syscall number, compare, test each argument condition, return
//! the rule's action; a failed test jumps to the next block); no match gives
//! the default action. Argument conditions compare all 64 bits with every
//! OCI operator. Another architecture's system calls (i386 through int 0x80,
//! whose numbers mean other calls) get the default action, or are killed
//! when that action would allow them.

use oci_spec::runtime::{LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompOperator};

use super::syscalls::SYSCALLS;

/// A profile that cannot be compiled.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// SCMP_ACT_NOTIFY needs a listener the agent does not provide.
    #[error("seccomp action {0:?} is not supported")]
    Action(LinuxSeccompAction),
    /// Argument index beyond the six a system call has.
    #[error("seccomp argument index {0} is out of range (0..6)")]
    ArgIndex(usize),
    /// The kernel takes at most 4096 instructions.
    #[error("the seccomp profile compiles to {0} BPF instructions, more than 4096")]
    TooLong(usize),
    /// A notify listener was asked for.
    #[error("seccomp listenerPath is not supported")]
    Listener,
}

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
const SECCOMP_RET_KILL_PROCESS: u32 = 0x8000_0000;
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const OFF_ARGS: u32 = 16;

const LD_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
const AND_K: u16 = 0x54; // BPF_ALU | BPF_AND | BPF_K
const JEQ: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const JGT: u16 = 0x25;
const JGE: u16 = 0x35;
const RET: u16 = 0x06; // BPF_RET | BPF_K

/// A jump target inside a rule's block.
#[derive(Clone, Copy)]
enum Jump {
    /// Skip this many instructions.
    Skip(u8),
    /// The rule does not match: go to the next block.
    Fail,
}

struct Insn {
    code: u16,
    jt: Jump,
    jf: Jump,
    k: u32,
}

fn stmt(code: u16, k: u32) -> Insn {
    Insn {
        code,
        jt: Jump::Skip(0),
        jf: Jump::Skip(0),
        k,
    }
}

fn jump(code: u16, k: u32, jt: Jump, jf: Jump) -> Insn {
    Insn { code, jt, jf, k }
}

/// The number for a system call name on x86_64.
pub fn syscall_number(name: &str) -> Option<u32> {
    SYSCALLS
        .binary_search_by(|(n, _)| n.cmp(&name))
        .ok()
        .and_then(|i| SYSCALLS.get(i))
        .map(|&(_, nr)| nr)
}

fn action(a: LinuxSeccompAction, errno: Option<u32>) -> Result<u32, SeccompError> {
    match a {
        LinuxSeccompAction::ScmpActNotify => Err(SeccompError::Action(a)),
        // EPERM unless the spec names another errno.
        _ => Ok(a.as_u32(errno.map(|e| e & 0xffff))),
    }
}

/// Appends the test of one argument condition.
fn condition(block: &mut Vec<Insn>, c: &LinuxSeccompArg) -> Result<(), SeccompError> {
    if c.index() >= 6 {
        return Err(SeccompError::ArgIndex(c.index()));
    }
    let lo_off = OFF_ARGS + 8 * c.index() as u32;
    let hi_off = lo_off + 4;
    let (vhi, vlo) = ((c.value() >> 32) as u32, c.value() as u32);
    let ok = Jump::Skip(0);
    let fail = Jump::Fail;
    match c.op() {
        LinuxSeccompOperator::ScmpCmpEq => block.extend([
            stmt(LD_ABS, hi_off),
            jump(JEQ, vhi, ok, fail),
            stmt(LD_ABS, lo_off),
            jump(JEQ, vlo, ok, fail),
        ]),
        LinuxSeccompOperator::ScmpCmpNe => block.extend([
            stmt(LD_ABS, hi_off),
            jump(JEQ, vhi, ok, Jump::Skip(2)),
            stmt(LD_ABS, lo_off),
            jump(JEQ, vlo, fail, ok),
        ]),
        LinuxSeccompOperator::ScmpCmpMaskedEq => {
            // `(arg & value) == valueTwo`; the OCI spec lets valueTwo be
            // left out, meaning 0, and containerd's RuntimeDefault profile
            // leaves it out (Go's omitempty) in its clone rule.
            let want = c.value_two().unwrap_or(0);
            let (whi, wlo) = ((want >> 32) as u32, want as u32);
            block.extend([
                stmt(LD_ABS, hi_off),
                stmt(AND_K, vhi),
                jump(JEQ, whi, ok, fail),
                stmt(LD_ABS, lo_off),
                stmt(AND_K, vlo),
                jump(JEQ, wlo, ok, fail),
            ])
        }
        LinuxSeccompOperator::ScmpCmpGt | LinuxSeccompOperator::ScmpCmpGe => {
            let low = if c.op() == LinuxSeccompOperator::ScmpCmpGt {
                JGT
            } else {
                JGE
            };
            block.extend([
                stmt(LD_ABS, hi_off),
                jump(JGT, vhi, Jump::Skip(3), ok),
                jump(JEQ, vhi, ok, fail),
                stmt(LD_ABS, lo_off),
                jump(low, vlo, ok, fail),
            ])
        }
        LinuxSeccompOperator::ScmpCmpLt | LinuxSeccompOperator::ScmpCmpLe => {
            // a < v is !(a >= v); a <= v is !(a > v).
            let low = if c.op() == LinuxSeccompOperator::ScmpCmpLt {
                JGE
            } else {
                JGT
            };
            block.extend([
                stmt(LD_ABS, hi_off),
                jump(JGT, vhi, fail, ok),
                jump(JEQ, vhi, ok, Jump::Skip(2)),
                stmt(LD_ABS, lo_off),
                jump(low, vlo, fail, ok),
            ])
        }
    }
    Ok(())
}

fn resolve(j: Jump, at: usize, len: usize) -> u8 {
    match j {
        Jump::Skip(n) => n,
        // The block's last instruction is its return; "fail" lands just past
        // it. Blocks are short (at most 2 + 6 * 6 + 1), so this fits a u8.
        Jump::Fail => u8::try_from(len - at - 1).unwrap_or(u8::MAX),
    }
}

/// Compiles `profile` to BPF.
pub fn compile(profile: &LinuxSeccomp) -> Result<Vec<libc::sock_filter>, SeccompError> {
    if profile.listener_path().is_some() {
        return Err(SeccompError::Listener);
    }
    let default = action(profile.default_action(), profile.default_errno_ret())?;
    let foreign = match profile.default_action() {
        LinuxSeccompAction::ScmpActAllow | LinuxSeccompAction::ScmpActLog => {
            SECCOMP_RET_KILL_PROCESS
        }
        _ => default,
    };
    let mut prog: Vec<Insn> = vec![
        stmt(LD_ABS, OFF_ARCH),
        jump(JEQ, AUDIT_ARCH_X86_64, Jump::Skip(1), Jump::Skip(0)),
        stmt(RET, foreign),
        stmt(LD_ABS, OFF_NR),
        jump(JGE, X32_SYSCALL_BIT, Jump::Skip(0), Jump::Skip(1)),
        stmt(RET, foreign),
    ];
    for rule in profile.syscalls().iter().flatten() {
        let act = action(rule.action(), rule.errno_ret())?;
        for name in rule.names() {
            // Profiles list calls of every architecture; the ones x86_64
            // lacks cannot be made, so they need no rule.
            let Some(nr) = syscall_number(name) else {
                continue;
            };
            let mut block = vec![
                stmt(LD_ABS, OFF_NR),
                jump(JEQ, nr, Jump::Skip(0), Jump::Fail),
            ];
            for c in rule.args().iter().flatten() {
                condition(&mut block, c)?;
            }
            block.push(stmt(RET, act));
            let len = block.len();
            for (at, mut insn) in block.into_iter().enumerate() {
                insn.jt = Jump::Skip(resolve(insn.jt, at, len));
                insn.jf = Jump::Skip(resolve(insn.jf, at, len));
                prog.push(insn);
            }
        }
    }
    prog.push(stmt(RET, default));
    if prog.len() > 4096 {
        return Err(SeccompError::TooLong(prog.len()));
    }
    Ok(prog
        .into_iter()
        .map(|i| libc::sock_filter {
            code: i.code,
            jt: resolve(i.jt, 0, 0),
            jf: resolve(i.jf, 0, 0),
            k: i.k,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(json: serde_json::Value) -> LinuxSeccomp {
        serde_json::from_value(json).unwrap()
    }

    /// Runs `probe` in a forked child under `prog`; returns its exit code.
    fn run_filtered(prog: &[libc::sock_filter], probe: fn() -> i32) -> i32 {
        let fprog = libc::sock_fprog {
            len: prog.len() as u16,
            filter: prog.as_ptr() as *mut libc::sock_filter,
        };
        let _serial = crate::reaper::FORK_TESTS
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // SAFETY: the child only makes system calls and exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: prctl with valid arguments; `fprog` outlives the call.
            unsafe {
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                if libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &fprog) != 0 {
                    libc::_exit(100);
                }
                libc::_exit(probe());
            }
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status), "status {status:#x}");
        libc::WEXITSTATUS(status)
    }

    fn errno() -> i32 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    }

    #[test]
    fn names_resolve() {
        assert_eq!(syscall_number("read"), Some(0));
        assert_eq!(syscall_number("getppid"), Some(110));
        assert_eq!(syscall_number("no_such_call"), None);
    }

    #[test]
    fn first_matching_rule_wins_and_default_applies() {
        let p = profile(serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [
                {"names": ["getppid", "not_on_x86_64"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13},
                {"names": ["getppid"], "action": "SCMP_ACT_KILL_PROCESS"},
            ]
        }));
        let prog = compile(&p).unwrap();
        let code = run_filtered(&prog, || {
            // SAFETY: getppid has no arguments.
            let r = unsafe { libc::syscall(libc::SYS_getppid) };
            if r == -1 && errno() == libc::EACCES {
                0
            } else {
                1
            }
        });
        assert_eq!(code, 0);
    }

    #[test]
    fn argument_conditions_compare_64_bits() {
        // personality(2) with arg0 == 0xffffffff is a query; block every
        // other value above 8 with EPERM, and arg0 >= 2^32 with EACCES.
        let p = profile(serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [
                {"names": ["personality"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13,
                 "args": [{"index": 0, "value": 4294967296u64, "op": "SCMP_CMP_GE"}]},
                {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 4294967295u64, "op": "SCMP_CMP_EQ"}]},
                {"names": ["personality"], "action": "SCMP_ACT_ERRNO",
                 "args": [{"index": 0, "value": 8, "op": "SCMP_CMP_GT"}]},
            ]
        }));
        let prog = compile(&p).unwrap();
        let code = run_filtered(&prog, || {
            // SAFETY: personality with query and harmless values.
            unsafe {
                let big = libc::syscall(libc::SYS_personality, 1u64 << 33);
                let big_errno = errno();
                let query = libc::syscall(libc::SYS_personality, 0xffff_ffffu64);
                let blocked = libc::syscall(libc::SYS_personality, 9u64);
                let blocked_errno = errno();
                let low = libc::syscall(libc::SYS_personality, 0xffff_ffffu64);
                match (big, big_errno, query >= 0, blocked, blocked_errno, low >= 0) {
                    (-1, libc::EACCES, true, -1, libc::EPERM, true) => 0,
                    _ => 1,
                }
            }
        });
        assert_eq!(code, 0);
    }

    #[test]
    fn masked_equality_without_value_two_compares_with_zero() {
        // containerd's RuntimeDefault shape: no valueTwo, so the rule
        // matches when none of the mask's bits are set. Here the rule
        // blocks personality() calls with no bit of 0x0004_0000 set.
        let p = profile(serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [
                {"names": ["personality"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13,
                 "args": [{"index": 0, "value": 0x0004_0000u64, "op": "SCMP_CMP_MASKED_EQ"}]},
            ]
        }));
        let prog = compile(&p).unwrap();
        let code = run_filtered(&prog, || {
            // SAFETY: personality with a query (all ones) and PER_LINUX32,
            // in a child that exits right after.
            unsafe {
                let set = libc::syscall(libc::SYS_personality, 0x0008u64);
                let set_errno = errno();
                let query = libc::syscall(libc::SYS_personality, 0xffff_ffffu64);
                match (set, set_errno, query >= 0) {
                    (-1, libc::EACCES, true) => 0,
                    _ => 1,
                }
            }
        });
        assert_eq!(code, 0);
    }

    #[test]
    fn unsupported_profiles_are_refused() {
        let p = profile(serde_json::json!({
            "defaultAction": "SCMP_ACT_NOTIFY",
        }));
        assert!(matches!(compile(&p), Err(SeccompError::Action(_))));
        let p = profile(serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ERRNO",
                          "args": [{"index": 6, "value": 1, "op": "SCMP_CMP_EQ"}]}]
        }));
        assert!(matches!(compile(&p), Err(SeccompError::ArgIndex(6))));
    }
}
