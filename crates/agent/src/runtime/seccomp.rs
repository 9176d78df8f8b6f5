//! OCI seccomp profiles compiled to classic BPF for x86_64, and loaded by the cloned child.
//!
//! [`compile`] runs in the agent (it allocates and logs); [`load`] runs in the child between
//! `clone` and `execve`: one raw `seccomp(2)` call on the prepared program.
//!
//! # Semantics
//!
//! - Only x86_64 system calls are filtered: a call made with any other audit architecture (i386
//!   through `int 0x80`, ...) kills the process, whatever the profile's `architectures` say.
//! - A number with the x32 bit (`0x40000000`) set fails with `ENOSYS`. x32 calls arrive with the
//!   x86_64 audit architecture but the number `0x40000000 | n` and mostly run the same kernel
//!   code as `n`, so a rule that denies `n` by number would not see them.
//! - Names this table does not know are skipped (logged at debug), like runc does: profiles
//!   list the calls of newer kernels and of other architectures.
//! - The rules naming one system call are tried in profile order; the first whose argument
//!   conditions all hold (a rule without conditions always does) decides. Conditions compare
//!   the full 64-bit argument, unsigned, like libseccomp on 64-bit architectures;
//!   `SCMP_CMP_MASKED_EQ` takes `value` as the mask and `valueTwo` as the datum.
//! - `errnoRet` (and `defaultErrnoRet`) defaults to `EPERM` for `SCMP_ACT_ERRNO` and
//!   `SCMP_ACT_TRACE` (where it is the tracer's data), like runc. `SCMP_ACT_NOTIFY` is refused:
//!   there is no listener.
//!
//! # The generated program
//!
//! ```text
//!     ld  [4]                         ; seccomp_data.arch
//!     jeq #AUDIT_ARCH_X86_64, 1, 0
//!     ret #KILL_PROCESS
//!     ld  [0]                         ; seccomp_data.nr
//!     jset #0x40000000, 0, 1
//!     ret #ERRNO(ENOSYS)              ; x32
//!   then per system call, in the order the profile first names it, either
//!     jeq #nr, 0, 1                   ; its first rule has no conditions
//!     ret #action
//!   or
//!     jeq #nr, 1, 0
//!     ja  <next system call>          ; 32-bit offset: blocks of any size
//!     <per condition: a few loads and tests ending in `ja <next rule>`>
//!     ret #action of rule 1
//!     ...                             ; the other rules
//!     ret #default
//!   and finally
//!     ret #default
//! ```
//!
//! Conditional jumps (8-bit offsets) only ever jump within one condition's few instructions;
//! everything farther goes through `ja`, so the length is bounded only by the kernel's limit
//! of [`MAX_INSNS`] instructions.

use std::collections::HashMap;
use std::str::FromStr;

use libc::sock_filter;
use oci_spec::runtime::{
    LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompFilterFlag, LinuxSeccompOperator,
};
use syscalls::x86_64::Sysno;

use super::rootfs::{check, StepError, StepResult};

/// The kernel's limit on the length of one filter (`BPF_MAXINSNS`).
pub const MAX_INSNS: usize = 4096;

/// The largest argument index: system calls take six arguments.
const MAX_ARG_INDEX: usize = 5;

/// A seccomp profile that cannot be compiled.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SeccompError {
    /// `SCMP_ACT_NOTIFY` needs a listener, which this runtime does not provide.
    #[error("SCMP_ACT_NOTIFY is not supported (no seccomp listener)")]
    Notify,
    /// An argument condition names an argument a system call does not have.
    #[error("rule for {syscalls}: argument index {index} is out of range 0..=5")]
    ArgIndex { syscalls: String, index: usize },
    /// An errno or trace value does not fit the 16 bits of `SECCOMP_RET_DATA`.
    #[error("return value {0} does not fit in 16 bits")]
    ReturnValue(u32),
    /// The compiled program exceeds the kernel's limit.
    #[error("the profile compiles to {0} BPF instructions, more than the kernel's limit of 4096")]
    TooLong(usize),
}

// Offsets in `struct seccomp_data`.
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;
const DATA_ARGS: u32 = 16;

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

// Classic BPF opcodes (linux/bpf_common.h).
const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
const ALU_AND_K: u16 = 0x54; // BPF_ALU | BPF_AND | BPF_K
const JMP_JA: u16 = 0x05; // BPF_JMP | BPF_JA
const JMP_JEQ_K: u16 = 0x15;
const JMP_JGT_K: u16 = 0x25;
const JMP_JGE_K: u16 = 0x35;
const JMP_JSET_K: u16 = 0x45;
const RET_K: u16 = 0x06; // BPF_RET | BPF_K

// Filter return values (linux/seccomp.h).
const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_KILL_THREAD: u32 = 0x0000_0000;
const RET_TRAP: u32 = 0x0003_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const RET_TRACE: u32 = 0x7ff0_0000;
const RET_LOG: u32 = 0x7ffc_0000;
const RET_ALLOW: u32 = 0x7fff_0000;

const SECCOMP_SET_MODE_FILTER: libc::c_ulong = 1;
const SECCOMP_FILTER_FLAG_LOG: u32 = 1 << 1;
const SECCOMP_FILTER_FLAG_SPEC_ALLOW: u32 = 1 << 2;

/// The filter's return value for an OCI action.
fn action_value(action: LinuxSeccompAction, errno_ret: Option<u32>) -> Result<u32, SeccompError> {
    let data = || {
        let value = errno_ret.unwrap_or(libc::EPERM.unsigned_abs());
        if value > 0xffff {
            return Err(SeccompError::ReturnValue(value));
        }
        Ok(value)
    };
    Ok(match action {
        LinuxSeccompAction::ScmpActAllow => RET_ALLOW,
        LinuxSeccompAction::ScmpActErrno => RET_ERRNO | data()?,
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => RET_KILL_THREAD,
        LinuxSeccompAction::ScmpActKillProcess => RET_KILL_PROCESS,
        LinuxSeccompAction::ScmpActTrap => RET_TRAP,
        LinuxSeccompAction::ScmpActLog => RET_LOG,
        LinuxSeccompAction::ScmpActTrace => RET_TRACE | data()?,
        LinuxSeccompAction::ScmpActNotify => return Err(SeccompError::Notify),
    })
}

/// One rule of the profile, validated.
struct Rule {
    action: u32,
    conditions: Vec<LinuxSeccompArg>,
}

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

fn ret(value: u32) -> sock_filter {
    stmt(RET_K, value)
}

fn high(v: u64) -> u32 {
    (v >> 32) as u32
}

fn low(v: u64) -> u32 {
    (v & 0xffff_ffff) as u32
}

/// Appends the test of one argument condition: it falls through to the next instruction when
/// the condition holds and reaches its last instruction, a `ja` whose offset the caller sets,
/// when it does not. Returns that `ja`'s index. The index was checked to be at most 5.
fn condition(out: &mut Vec<sock_filter>, arg: &LinuxSeccompArg) -> usize {
    // The argument is a little-endian u64: low word first.
    let lo = DATA_ARGS + 8 * (arg.index() as u32);
    let hi = lo + 4;
    let (vh, vl) = (high(arg.value()), low(arg.value()));
    let piece: &[sock_filter] = match arg.op() {
        LinuxSeccompOperator::ScmpCmpEq => &[
            stmt(LD_W_ABS, hi),
            jump(JMP_JEQ_K, vh, 0, 2),
            stmt(LD_W_ABS, lo),
            jump(JMP_JEQ_K, vl, 1, 0),
        ],
        LinuxSeccompOperator::ScmpCmpNe => &[
            stmt(LD_W_ABS, hi),
            jump(JMP_JEQ_K, vh, 0, 3),
            stmt(LD_W_ABS, lo),
            jump(JMP_JEQ_K, vl, 0, 1),
        ],
        // a > v: high words greater, or equal and low words greater.
        LinuxSeccompOperator::ScmpCmpGt => &[
            stmt(LD_W_ABS, hi),
            jump(JMP_JGT_K, vh, 4, 0),
            jump(JMP_JEQ_K, vh, 0, 2),
            stmt(LD_W_ABS, lo),
            jump(JMP_JGT_K, vl, 1, 0),
        ],
        LinuxSeccompOperator::ScmpCmpGe => &[
            stmt(LD_W_ABS, hi),
            jump(JMP_JGT_K, vh, 4, 0),
            jump(JMP_JEQ_K, vh, 0, 2),
            stmt(LD_W_ABS, lo),
            jump(JMP_JGE_K, vl, 1, 0),
        ],
        // a < v: high words smaller (not >=), or equal and low words smaller.
        LinuxSeccompOperator::ScmpCmpLt => &[
            stmt(LD_W_ABS, hi),
            jump(JMP_JGE_K, vh, 0, 4),
            jump(JMP_JEQ_K, vh, 0, 2),
            stmt(LD_W_ABS, lo),
            jump(JMP_JGE_K, vl, 0, 1),
        ],
        LinuxSeccompOperator::ScmpCmpLe => &[
            stmt(LD_W_ABS, hi),
            jump(JMP_JGE_K, vh, 0, 4),
            jump(JMP_JEQ_K, vh, 0, 2),
            stmt(LD_W_ABS, lo),
            jump(JMP_JGT_K, vl, 0, 1),
        ],
        // (a & value) == valueTwo, word by word.
        LinuxSeccompOperator::ScmpCmpMaskedEq => {
            let datum = arg.value_two().unwrap_or(0);
            &[
                stmt(LD_W_ABS, hi),
                stmt(ALU_AND_K, vh),
                jump(JMP_JEQ_K, high(datum), 0, 3),
                stmt(LD_W_ABS, lo),
                stmt(ALU_AND_K, vl),
                jump(JMP_JEQ_K, low(datum), 1, 0),
            ]
        }
    };
    out.extend_from_slice(piece);
    out.push(stmt(JMP_JA, 0));
    out.len() - 1
}

/// A forward `ja` offset: `distance` instructions skipped.
fn offset(distance: usize) -> Result<u32, SeccompError> {
    u32::try_from(distance).map_err(|_| SeccompError::TooLong(distance))
}

/// The code for one system call's rules, entered with its number matched.
fn syscall_block(rules: &[&Rule], default: u32) -> Result<Vec<sock_filter>, SeccompError> {
    let mut body = Vec::new();
    for rule in rules {
        let mut fails = Vec::with_capacity(rule.conditions.len());
        for arg in &rule.conditions {
            fails.push(condition(&mut body, arg));
        }
        body.push(ret(rule.action));
        // A failed condition continues with the next rule, right after this one's `ret`.
        let next = body.len();
        for ja in fails {
            body[ja].k = offset(next - ja - 1)?;
        }
        if rule.conditions.is_empty() {
            // Later rules for this call can never be reached.
            return Ok(body);
        }
    }
    body.push(ret(default));
    Ok(body)
}

/// Compiles a profile for x86_64 (see the module documentation for the semantics).
pub fn compile(profile: &LinuxSeccomp) -> Result<Vec<sock_filter>, SeccompError> {
    let default = action_value(profile.default_action(), profile.default_errno_ret())?;
    if let Some(archs) = profile.architectures() {
        log::debug!("seccomp: architectures {archs:?} ignored: only x86_64 calls are allowed");
    }

    let mut rules = Vec::new();
    // Per system call number, in first-named order: the indices of its rules.
    let mut calls: Vec<(u32, Vec<usize>)> = Vec::new();
    let mut call_index: HashMap<u32, usize> = HashMap::new();
    for syscall in profile.syscalls().iter().flatten() {
        let action = action_value(syscall.action(), syscall.errno_ret())?;
        let conditions = syscall.args().clone().unwrap_or_default();
        if let Some(bad) = conditions.iter().find(|a| a.index() > MAX_ARG_INDEX) {
            return Err(SeccompError::ArgIndex {
                syscalls: syscall.names().join(","),
                index: bad.index(),
            });
        }
        let rule = rules.len();
        rules.push(Rule { action, conditions });
        for name in syscall.names() {
            let Ok(sysno) = Sysno::from_str(name) else {
                log::debug!("seccomp: unknown system call {name:?} ignored");
                continue;
            };
            let nr = sysno.id().unsigned_abs();
            let i = *call_index.entry(nr).or_insert_with(|| {
                calls.push((nr, Vec::new()));
                calls.len() - 1
            });
            let list = &mut calls[i].1;
            if list.last() != Some(&rule) {
                list.push(rule);
            }
        }
    }

    let mut prog = vec![
        stmt(LD_W_ABS, DATA_ARCH),
        jump(JMP_JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
        ret(RET_KILL_PROCESS),
        stmt(LD_W_ABS, DATA_NR),
        jump(JMP_JSET_K, X32_SYSCALL_BIT, 0, 1),
        ret(RET_ERRNO | libc::ENOSYS.unsigned_abs()),
    ];
    for (nr, indices) in &calls {
        let call_rules: Vec<&Rule> = indices.iter().map(|&i| &rules[i]).collect();
        match call_rules.first() {
            Some(first) if first.conditions.is_empty() => {
                prog.push(jump(JMP_JEQ_K, *nr, 0, 1));
                prog.push(ret(first.action));
            }
            _ => {
                let body = syscall_block(&call_rules, default)?;
                prog.push(jump(JMP_JEQ_K, *nr, 1, 0));
                prog.push(stmt(JMP_JA, offset(body.len())?));
                prog.extend(body);
            }
        }
        if prog.len() > MAX_INSNS {
            return Err(SeccompError::TooLong(prog.len()));
        }
    }
    prog.push(ret(default));
    if prog.len() > MAX_INSNS {
        return Err(SeccompError::TooLong(prog.len()));
    }
    Ok(prog)
}

/// The `seccomp(2)` flags the profile asks for. `SECCOMP_FILTER_FLAG_TSYNC` is dropped (the
/// child is single-threaded), as is `WAIT_KILLABLE_RECV` (it only applies to a listener).
pub fn filter_flags(profile: &LinuxSeccomp) -> u32 {
    profile
        .flags()
        .iter()
        .flatten()
        .map(|flag| match flag {
            LinuxSeccompFilterFlag::SeccompFilterFlagLog => SECCOMP_FILTER_FLAG_LOG,
            LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => SECCOMP_FILTER_FLAG_SPEC_ALLOW,
            LinuxSeccompFilterFlag::SeccompFilterFlagTsync
            | LinuxSeccompFilterFlag::SeccompFilterFlagWaitKillableRecv => 0,
        })
        .fold(0, |all, flag| all | flag)
}

/// Installs a compiled filter on the calling thread. Child side: one raw system call, no
/// allocation. Needs `no_new_privs` or `CAP_SYS_ADMIN`.
pub fn load(prog: &[sock_filter], flags: u32) -> StepResult {
    let Ok(len) = u16::try_from(prog.len()) else {
        return Err(StepError {
            step: "seccomp",
            errno: libc::EINVAL,
        });
    };
    let fprog = libc::sock_fprog {
        len,
        filter: prog.as_ptr().cast_mut(),
    };
    // SAFETY: `fprog` describes `prog`, which outlives the call; the kernel copies the program
    // and never writes through the pointer.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            SECCOMP_SET_MODE_FILTER,
            libc::c_ulong::from(flags),
            &fprog as *const libc::sock_fprog,
        )
    };
    check("seccomp", if ret < 0 { -1 } else { 0 })
}

/// Forking helpers for the tests of this module and of `security`.
#[cfg(test)]
pub(crate) mod test_child {
    /// How a forked child ended.
    #[derive(Debug, PartialEq, Eq)]
    pub enum Outcome {
        Exited(i32),
        Signaled(i32),
    }

    /// Forks; the child runs `f` and exits with its result. The test harness is
    /// multi-threaded, so `f` must only make raw system calls on prepared data: no allocation,
    /// no locks, no panics. (`Fn`, called by reference: what it captures is not dropped, so
    /// not freed, in the child.)
    pub fn run(f: impl Fn() -> i32) -> Outcome {
        // SAFETY: the child only runs `f` (see above) and `_exit`s.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            let code = f();
            // SAFETY: `_exit` is always safe; it skips the harness's atexit handlers.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        loop {
            // SAFETY: waits for our own child into a local.
            let r = unsafe { libc::waitpid(pid, &mut status, 0) };
            if r == pid {
                break;
            }
            assert_eq!(
                std::io::Error::last_os_error().raw_os_error(),
                Some(libc::EINTR)
            );
        }
        if libc::WIFEXITED(status) {
            Outcome::Exited(libc::WEXITSTATUS(status))
        } else {
            Outcome::Signaled(libc::WTERMSIG(status))
        }
    }

    /// The calling thread's errno.
    pub fn errno() -> i32 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    }

    /// A raw system call: its result or `-errno`.
    pub fn sys(nr: libc::c_long, args: [u64; 6]) -> i64 {
        // SAFETY: the tests only pass calls whose arguments are plain numbers or point at
        // live buffers.
        let ret =
            unsafe { libc::syscall(nr, args[0], args[1], args[2], args[3], args[4], args[5]) };
        if ret < 0 {
            -i64::from(errno())
        } else {
            ret
        }
    }

    /// `prctl(PR_SET_NO_NEW_PRIVS, 1)`, true on success.
    pub fn set_no_new_privs() -> bool {
        sys(
            libc::SYS_prctl,
            [libc::PR_SET_NO_NEW_PRIVS as u64, 1, 0, 0, 0, 0],
        ) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::test_child::{run, set_no_new_privs, sys, Outcome};
    use super::*;

    fn profile(json: &str) -> LinuxSeccomp {
        serde_json::from_str(json).unwrap()
    }

    /// Runs `check` in a child under `no_new_privs` and the compiled profile; 0 means success.
    fn under(profile_json: &str, check: impl Fn() -> i32) -> Outcome {
        let p = profile(profile_json);
        let prog = compile(&p).unwrap();
        let flags = filter_flags(&p);
        run(move || {
            if !set_no_new_privs() {
                return 101;
            }
            if load(&prog, flags).is_err() {
                return 102;
            }
            check()
        })
    }

    const ENOSYS: i64 = libc::ENOSYS as i64;
    const EPERM: i64 = libc::EPERM as i64;

    #[test]
    fn errno_rule_with_default_allow() {
        let outcome = under(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[
                {"names":["uname","mkdirat"],"action":"SCMP_ACT_ERRNO","errnoRet":38}]}"#,
            || {
                let mut buf = [0u8; 512];
                if sys(libc::SYS_uname, [buf.as_mut_ptr() as u64, 0, 0, 0, 0, 0]) != -ENOSYS {
                    return 1;
                }
                if sys(libc::SYS_getppid, [0; 6]) <= 0 {
                    return 2;
                }
                0
            },
        );
        assert_eq!(outcome, Outcome::Exited(0));
    }

    #[test]
    fn allowlist_with_default_errno() {
        let outcome = under(
            r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[
                {"names":["exit_group","exit","getppid","not_a_syscall"],"action":"SCMP_ACT_ALLOW"}]}"#,
            || {
                if sys(libc::SYS_getppid, [0; 6]) <= 0 {
                    return 1;
                }
                if sys(libc::SYS_getpid, [0; 6]) != -EPERM {
                    return 2;
                }
                0
            },
        );
        assert_eq!(outcome, Outcome::Exited(0));
    }

    #[test]
    fn default_errno_ret_and_x32() {
        let outcome = under(
            r#"{"defaultAction":"SCMP_ACT_ERRNO","defaultErrnoRet":22,"syscalls":[
                {"names":["exit_group","getppid"],"action":"SCMP_ACT_ALLOW"}]}"#,
            || {
                if sys(libc::SYS_getpid, [0; 6]) != -i64::from(libc::EINVAL) {
                    return 1;
                }
                // getppid is allowed by number, but not through the x32 ABI.
                let x32 = 0x4000_0000 | libc::SYS_getppid;
                if sys(x32, [0; 6]) != -ENOSYS {
                    return 2;
                }
                0
            },
        );
        assert_eq!(outcome, Outcome::Exited(0));
    }

    #[test]
    fn personality_query_only() {
        // As in Docker's profile: personality(0xffffffff) (a query) is allowed, other values
        // are not. The second rule only applies when the first does not match.
        let outcome = under(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[
                {"names":["personality"],"action":"SCMP_ACT_ALLOW",
                 "args":[{"index":0,"value":4294967295,"op":"SCMP_CMP_EQ"}]},
                {"names":["personality"],"action":"SCMP_ACT_ERRNO"}]}"#,
            || {
                if sys(libc::SYS_personality, [0xffff_ffff, 0, 0, 0, 0, 0]) < 0 {
                    return 1;
                }
                if sys(libc::SYS_personality, [0, 0, 0, 0, 0, 0]) != -EPERM {
                    return 2;
                }
                // Same low word, different high word.
                if sys(libc::SYS_personality, [0x1_ffff_ffff, 0, 0, 0, 0, 0]) != -EPERM {
                    return 3;
                }
                0
            },
        );
        assert_eq!(outcome, Outcome::Exited(0));
    }

    /// getppid ignores its arguments, but the filter sees them: a rule on its argument 1
    /// answers ERRNO(77) when the condition holds.
    fn check_operator(op: &str, value: u64, value_two: u64, cases: &[(u64, bool)]) {
        let json = format!(
            r#"{{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[
                {{"names":["getppid"],"action":"SCMP_ACT_ERRNO","errnoRet":77,
                  "args":[{{"index":1,"value":{value},"valueTwo":{value_two},"op":"{op}"}}]}}]}}"#
        );
        let outcome = under(&json, || {
            for (i, &(arg, matches)) in cases.iter().enumerate() {
                let r = sys(libc::SYS_getppid, [0, arg, 0, 0, 0, 0]);
                if (r == -77) != matches {
                    return i32::try_from(i).unwrap_or(99) + 1;
                }
            }
            0
        });
        assert_eq!(
            outcome,
            Outcome::Exited(0),
            "{op} {value:#x}: case index + 1"
        );
    }

    #[test]
    fn argument_operators_on_64_bits() {
        let v = 0x0000_0001_8000_0000u64;
        let around = |f: fn(u64, u64) -> bool| -> Vec<(u64, bool)> {
            [
                0,
                v - 1,
                v,
                v + 1,
                0x8000_0000,
                0x1_0000_0000,
                0x2_0000_0000,
                0x2_0000_0000 + 0x8000_0000,
                u64::MAX,
            ]
            .iter()
            .map(|&a| (a, f(a, v)))
            .collect()
        };
        check_operator("SCMP_CMP_EQ", v, 0, &around(|a, v| a == v));
        check_operator("SCMP_CMP_NE", v, 0, &around(|a, v| a != v));
        check_operator("SCMP_CMP_LT", v, 0, &around(|a, v| a < v));
        check_operator("SCMP_CMP_LE", v, 0, &around(|a, v| a <= v));
        check_operator("SCMP_CMP_GT", v, 0, &around(|a, v| a > v));
        check_operator("SCMP_CMP_GE", v, 0, &around(|a, v| a >= v));
        // Docker's clone rule: no namespace flags (mask 0x7e020000, datum 0), plus a high bit.
        let mask = 0x1_7e02_0000u64;
        check_operator(
            "SCMP_CMP_MASKED_EQ",
            mask,
            0,
            &[
                (0, true),
                (0x11, true),
                (0x2_0000_0000, true),
                (0x1000_0000, false),
                (0x0002_0000, false),
                (0x1_0000_0000, false),
            ],
        );
        check_operator(
            "SCMP_CMP_MASKED_EQ",
            0xff00_0000_00ff,
            0x1200_0000_0034,
            &[
                (0x1200_0000_0034, true),
                (0x12ff_ffff_ff34, true),
                (0x1300_0000_0034, false),
                (0x1200_0000_0035, false),
            ],
        );
    }

    #[test]
    fn conditions_are_anded_and_rules_ordered() {
        let outcome = under(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[
                {"names":["getppid"],"action":"SCMP_ACT_ERRNO","errnoRet":11,
                 "args":[{"index":0,"value":1,"op":"SCMP_CMP_EQ"},
                         {"index":5,"value":2,"op":"SCMP_CMP_EQ"}]},
                {"names":["getppid"],"action":"SCMP_ACT_ERRNO","errnoRet":12,
                 "args":[{"index":0,"value":1,"op":"SCMP_CMP_EQ"}]},
                {"names":["getppid"],"action":"SCMP_ACT_ERRNO","errnoRet":13},
                {"names":["getppid"],"action":"SCMP_ACT_ERRNO","errnoRet":14}]}"#,
            || {
                for (args, want) in [
                    ([1, 0, 0, 0, 0, 2], -11),
                    ([1, 0, 0, 0, 0, 3], -12),
                    ([0, 0, 0, 0, 0, 2], -13),
                ] {
                    if sys(libc::SYS_getppid, args) != want {
                        return i32::try_from(-want).unwrap_or(99);
                    }
                }
                0
            },
        );
        assert_eq!(outcome, Outcome::Exited(0));
    }

    #[test]
    fn kill_trap_log_trace() {
        let kill = |action: &str| {
            under(
                &format!(
                    r#"{{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[
                        {{"names":["getppid"],"action":"{action}"}}]}}"#
                ),
                || {
                    sys(libc::SYS_getppid, [0; 6]);
                    0
                },
            )
        };
        for action in [
            "SCMP_ACT_KILL_PROCESS",
            "SCMP_ACT_KILL",
            "SCMP_ACT_KILL_THREAD",
            "SCMP_ACT_TRAP",
        ] {
            assert_eq!(kill(action), Outcome::Signaled(libc::SIGSYS), "{action}");
        }
        assert_eq!(kill("SCMP_ACT_LOG"), Outcome::Exited(0));
        // Without a tracer, SECCOMP_RET_TRACE fails the call with ENOSYS.
        let outcome = under(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[
                {"names":["getppid"],"action":"SCMP_ACT_TRACE","errnoRet":5}]}"#,
            || i32::from(sys(libc::SYS_getppid, [0; 6]) != -ENOSYS),
        );
        assert_eq!(outcome, Outcome::Exited(0));
    }

    /// getpid through the i386 ABI (`int 0x80`, number 20).
    fn i386_getpid() -> i32 {
        let ret: i32;
        // SAFETY: `int 0x80` with eax=20 is the i386 getpid: no memory is touched; the
        // kernel preserves every other register.
        unsafe {
            std::arch::asm!(
                "int 0x80",
                inlateout("eax") 20 => ret,
                out("r8") _, out("r9") _, out("r10") _, out("r11") _,
                options(nostack),
            );
        }
        ret
    }

    #[test]
    fn other_architectures_are_killed() {
        // Without a filter: does this kernel run i386 calls at all?
        if run(|| i32::from(i386_getpid() <= 0)) != Outcome::Exited(0) {
            eprintln!("skipped: no i386 emulation");
            return;
        }
        let outcome = under(r#"{"defaultAction":"SCMP_ACT_ALLOW"}"#, || {
            i386_getpid();
            0
        });
        assert_eq!(outcome, Outcome::Signaled(libc::SIGSYS));
    }

    #[test]
    fn docker_sized_profile() {
        // Every x86_64 call allowed by name, plus names of other architectures, with a few
        // conditional rules like Docker's default profile.
        let mut names: Vec<String> = Sysno::iter()
            .filter(|s| !matches!(s.name(), "personality" | "clone" | "clone3"))
            .map(|s| format!("\"{}\"", s.name()))
            .collect();
        let known = names.len();
        assert!(known > 350, "{known}");
        names.extend(["\"_llseek\"", "\"arm_fadvise64_64\""].map(String::from));
        let json = format!(
            r#"{{"defaultAction":"SCMP_ACT_ERRNO","defaultErrnoRet":1,
                "architectures":["SCMP_ARCH_X86_64","SCMP_ARCH_X86","SCMP_ARCH_X32"],
                "syscalls":[
                  {{"names":["personality"],"action":"SCMP_ACT_ALLOW",
                    "args":[{{"index":0,"value":0,"op":"SCMP_CMP_EQ"}}]}},
                  {{"names":["personality"],"action":"SCMP_ACT_ALLOW",
                    "args":[{{"index":0,"value":4294967295,"op":"SCMP_CMP_EQ"}}]}},
                  {{"names":["clone"],"action":"SCMP_ACT_ALLOW",
                    "args":[{{"index":0,"value":2114060288,"valueTwo":0,"op":"SCMP_CMP_MASKED_EQ"}}]}},
                  {{"names":["clone3"],"action":"SCMP_ACT_ERRNO","errnoRet":38}},
                  {{"names":[{}],"action":"SCMP_ACT_ALLOW"}}]}}"#,
            names.join(",")
        );
        let p = profile(&json);
        let prog = compile(&p).unwrap();
        assert!(prog.len() < MAX_INSNS, "{}", prog.len());
        let outcome = run(move || {
            if !set_no_new_privs() || load(&prog, 0).is_err() {
                return 101;
            }
            if sys(libc::SYS_getpid, [0; 6]) <= 0 {
                return 1;
            }
            // clone3 is denied by its own earlier rule; personality(8) by its conditions.
            if sys(libc::SYS_clone3, [0; 6]) != -ENOSYS {
                return 2;
            }
            if sys(libc::SYS_personality, [8, 0, 0, 0, 0, 0]) != -EPERM {
                return 3;
            }
            if sys(libc::SYS_personality, [0xffff_ffff, 0, 0, 0, 0, 0]) < 0 {
                return 4;
            }
            0
        });
        assert_eq!(outcome, Outcome::Exited(0));
    }

    #[test]
    fn too_long_is_an_error() {
        // 1,000 conditional rules of 6 instructions each.
        let rules: Vec<String> = (0..1000)
            .map(|i| {
                format!(
                    r#"{{"names":["getppid"],"action":"SCMP_ACT_ALLOW",
                        "args":[{{"index":0,"value":{i},"op":"SCMP_CMP_EQ"}}]}}"#
                )
            })
            .collect();
        let p = profile(&format!(
            r#"{{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[{}]}}"#,
            rules.join(",")
        ));
        assert!(matches!(compile(&p), Err(SeccompError::TooLong(n)) if n > MAX_INSNS));
    }

    #[test]
    fn long_blocks_compile() {
        // 600 conditions on one call: far more than an 8-bit jump can skip.
        let rules: Vec<String> = (0..600)
            .map(|i| {
                format!(
                    r#"{{"names":["getppid"],"action":"SCMP_ACT_ERRNO","errnoRet":{},
                        "args":[{{"index":2,"value":{i},"op":"SCMP_CMP_EQ"}}]}}"#,
                    i % 100 + 1
                )
            })
            .collect();
        let outcome = under(
            &format!(
                r#"{{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{}]}}"#,
                rules.join(",")
            ),
            || {
                if sys(libc::SYS_getppid, [0, 0, 599, 0, 0, 0]) != -100 {
                    return 1;
                }
                if sys(libc::SYS_getppid, [0, 0, 600, 0, 0, 0]) <= 0 {
                    return 2;
                }
                // A call after the long block is still filtered.
                if sys(libc::SYS_getpid, [0; 6]) <= 0 {
                    return 3;
                }
                0
            },
        );
        assert_eq!(outcome, Outcome::Exited(0));
    }

    #[test]
    fn invalid_profiles() {
        let notify = profile(r#"{"defaultAction":"SCMP_ACT_NOTIFY"}"#);
        assert!(matches!(compile(&notify), Err(SeccompError::Notify)));
        let notify_rule = profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[
                {"names":["getppid"],"action":"SCMP_ACT_NOTIFY"}]}"#,
        );
        assert!(matches!(compile(&notify_rule), Err(SeccompError::Notify)));
        let bad_index = profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[
                {"names":["getppid"],"action":"SCMP_ACT_ERRNO",
                 "args":[{"index":6,"value":1,"op":"SCMP_CMP_EQ"}]}]}"#,
        );
        assert!(matches!(
            compile(&bad_index),
            Err(SeccompError::ArgIndex { index: 6, .. })
        ));
        let bad_errno = profile(r#"{"defaultAction":"SCMP_ACT_ERRNO","defaultErrnoRet":65536}"#);
        assert!(matches!(
            compile(&bad_errno),
            Err(SeccompError::ReturnValue(65536))
        ));
        // Unknown actions and operators do not parse.
        for json in [
            r#"{"defaultAction":"SCMP_ACT_BOGUS"}"#,
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["read"],"action":"SCMP_ACT_MAYBE"}]}"#,
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["read"],"action":"SCMP_ACT_ALLOW",
                "args":[{"index":0,"value":1,"op":"SCMP_CMP_SIMILAR"}]}]}"#,
        ] {
            assert!(
                serde_json::from_str::<LinuxSeccomp>(json).is_err(),
                "{json}"
            );
        }
    }

    #[test]
    fn flags() {
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","flags":["SECCOMP_FILTER_FLAG_LOG","SECCOMP_FILTER_FLAG_TSYNC"]}"#,
        );
        assert_eq!(filter_flags(&p), SECCOMP_FILTER_FLAG_LOG);
    }
}
