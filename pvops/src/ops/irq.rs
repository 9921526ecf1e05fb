//! IRQ group: call-site wrappers for [`IrqOps`](super::IrqOps). All callee-save but
//! [`send_ipi`]: a patched inline site costs what the bare instruction costs.

use super::Op;
use crate::pv_site;

/// RFLAGS.IF, the only bit of [`save_fl`]'s result that backends must keep meaningful.
pub const X86_EFLAGS_IF: u64 = 1 << 9;

/// The current flags; test [`X86_EFLAGS_IF`] for the interrupt flag.
#[inline(always)]
pub fn save_fl() -> u64 {
    let flags;
    // SAFETY: reading the flags has no precondition; callee-save operands.
    unsafe { pv_site!(Op::SaveFl; lateout("rax") flags) };
    flags
}

/// Restore the interrupt flag from a value [`save_fl`] returned.
///
/// # Safety
///
/// `flags` came from [`save_fl`] on this CPU, in this context, and restoring it does not
/// re-enable interrupts inside a section that relies on them being off.
#[inline(always)]
pub unsafe fn restore_fl(flags: u64) {
    // SAFETY: forwarded contract; callee-save operands.
    unsafe { pv_site!(Op::RestoreFl; in("rdi") flags, lateout("rax") _) };
}

/// Disable interrupts on this CPU.
///
/// # Safety
///
/// Ring 0; the caller re-enables or restores them.
#[inline(always)]
pub unsafe fn irq_disable() {
    // SAFETY: forwarded contract; callee-save operands.
    unsafe { pv_site!(Op::IrqDisable; lateout("rax") _) };
}

/// Enable interrupts on this CPU.
///
/// # Safety
///
/// Ring 0, and no enclosing section relies on interrupts being off.
#[inline(always)]
pub unsafe fn irq_enable() {
    // SAFETY: forwarded contract; callee-save operands.
    unsafe { pv_site!(Op::IrqEnable; lateout("rax") _) };
}

/// Enable interrupts and halt until one arrives.
///
/// # Safety
///
/// As [`irq_enable`].
#[inline(always)]
pub unsafe fn safe_halt() {
    // SAFETY: forwarded contract; callee-save operands.
    unsafe { pv_site!(Op::SafeHalt; lateout("rax") _) };
}

/// Halt until the next interrupt (or forever, with interrupts off).
///
/// # Safety
///
/// Ring 0.
#[inline(always)]
pub unsafe fn halt() {
    // SAFETY: forwarded contract; callee-save operands.
    unsafe { pv_site!(Op::Halt; lateout("rax") _) };
}

/// NMI's vector number: [`send_ipi`] with it sends an NMI, not a fixed interrupt.
pub const NMI_VECTOR: u32 = 2;

/// Send `vector` to the CPUs of `mask` (a cpumask of `nbits` bits) the backend's way; `false`
/// when the backend sent nothing and the caller must send them itself (through the local APIC).
///
/// # Safety
///
/// Ring 0, interrupts off; `mask` is readable for `nbits` bits and names only online CPUs;
/// `vector` is one the kernel handles (or [`NMI_VECTOR`]).
#[inline(always)]
pub unsafe fn send_ipi(mask: *const u64, nbits: u32, vector: u32) -> bool {
    let sent: u64;
    // SAFETY: forwarded contract; C operands.
    unsafe {
        pv_site!(Op::SendIpi; in("rdi") mask, in("esi") nbits, in("edx") vector,
                 lateout("rax") sent, clobber_abi("C"))
    };
    sent & 1 != 0
}
