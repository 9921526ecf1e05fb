//! Timer group: call-site wrappers for [`TimerOps`](super::TimerOps).

use super::Op;
use crate::pv_site;

/// A per-CPU monotonic clock in nanoseconds.
#[inline(always)]
pub fn sched_clock() -> u64 {
    let v;
    // SAFETY: no precondition; C operands.
    unsafe { pv_site!(Op::SchedClock; lateout("rax") v, clobber_abi("C")) };
    v
}

/// Nanoseconds `cpu` was runnable while the host ran something else.
#[inline(always)]
pub fn steal_clock(cpu: u32) -> u64 {
    let v;
    // SAFETY: no precondition; C operands.
    unsafe { pv_site!(Op::StealClock; in("rdi") cpu, lateout("rax") v, clobber_abi("C")) };
    v
}

/// The TSC frequency in kHz (0 when unknown).
#[inline(always)]
pub fn tsc_khz() -> u64 {
    let v;
    // SAFETY: no precondition; C operands.
    unsafe { pv_site!(Op::TscKhz; lateout("rax") v, clobber_abi("C")) };
    v
}

/// Nanoseconds since the Unix epoch (0 when unknown).
#[inline(always)]
pub fn wall_clock() -> u64 {
    let v;
    // SAFETY: no precondition; C operands.
    unsafe { pv_site!(Op::WallClock; lateout("rax") v, clobber_abi("C")) };
    v
}

/// Program this CPU's one-shot timer `delta_ns` from now; `Err(-errno)` on failure.
///
/// # Safety
///
/// The caller owns this CPU's timer (it is the clock-event device built on this backend).
#[inline(always)]
pub unsafe fn set_next_event(delta_ns: u64) -> Result<(), i32> {
    let rc: i32;
    // SAFETY: forwarded contract; C operands.
    unsafe { pv_site!(Op::SetNextEvent; in("rdi") delta_ns, lateout("eax") rc, clobber_abi("C")) };
    if rc == 0 {
        Ok(())
    } else {
        Err(rc)
    }
}
