//! Lock group: call-site wrappers for [`LockOps`](super::LockOps).

use super::Op;
use crate::pv_site;

/// Release a queued spinlock this CPU holds.
///
/// # Safety
///
/// `lock` is a kernel queued spinlock (its locked byte) this CPU holds.
#[inline(always)]
pub unsafe fn queued_spin_unlock(lock: *mut u8) {
    // SAFETY: forwarded contract; callee-save operands.
    unsafe { pv_site!(Op::QueuedSpinUnlock; in("rdi") lock, lateout("rax") _) };
}

/// Halt until `*ptr` is no longer `val` or this CPU is kicked (it may also return early).
///
/// # Safety
///
/// Ring 0, interrupts as the kernel's waiter has them; `ptr` is readable.
#[inline(always)]
pub unsafe fn wait(ptr: *mut u8, val: u8) {
    // SAFETY: forwarded contract; C operands.
    unsafe { pv_site!(Op::LockWait; in("rdi") ptr, in("esi") u32::from(val), clobber_abi("C")) };
}

/// Wake `cpu` from [`wait`].
///
/// # Safety
///
/// Ring 0; `cpu` is a possible CPU.
#[inline(always)]
pub unsafe fn kick(cpu: u32) {
    // SAFETY: forwarded contract; C operands.
    unsafe { pv_site!(Op::LockKick; in("edi") cpu, clobber_abi("C")) };
}

/// Whether the host preempted `cpu`'s vCPU.
#[inline(always)]
pub fn vcpu_is_preempted(cpu: u32) -> bool {
    let v: u64;
    // SAFETY: a query with no precondition (any CPU number: a backend answers false for one it
    // does not know); callee-save operands.
    unsafe { pv_site!(Op::VcpuIsPreempted; in("rdi") u64::from(cpu), lateout("rax") v) };
    v & 0xff != 0
}
