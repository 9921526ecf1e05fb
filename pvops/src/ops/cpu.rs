//! CPU group: call-site wrappers for [`CpuOps`](super::CpuOps).
//!
//! Each wrapper is `#[inline(always)]` and contains one call site: wherever it is inlined, the
//! patch engine can rewrite that place for the installed backend.

use super::Op;
use crate::pv_site;

/// The four registers CPUID returns.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuidResult {
    /// EAX.
    pub eax: u32,
    /// EBX.
    pub ebx: u32,
    /// ECX.
    pub ecx: u32,
    /// EDX.
    pub edx: u32,
}

/// The operand of LIDT/LGDT: a 16-bit limit and a 64-bit base, packed.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DescriptorPointer {
    /// Size of the table minus one.
    pub limit: u16,
    /// Linear address of the table.
    pub base: u64,
}

static_assertions::assert_eq_size!(CpuidResult, [u8; 16]);
static_assertions::assert_eq_size!(DescriptorPointer, [u8; 10]);

/// CPUID `leaf`/`subleaf` through the table ([`CpuOps::cpuid`](super::CpuOps::cpuid)).
#[inline(always)]
pub fn cpuid(leaf: u32, subleaf: u32) -> CpuidResult {
    let mut out = CpuidResult::default();
    // SAFETY: cpuid has no precondition; `out` is a valid, writable CpuidResult; the operands
    // follow the C convention.
    unsafe {
        pv_site!(Op::Cpuid; in("rdi") leaf, in("rsi") subleaf,
                 in("rdx") core::ptr::addr_of_mut!(out), clobber_abi("C"))
    };
    out
}

/// Read CR0.
///
/// # Safety
///
/// Ring 0 (or a backend that emulates it).
#[inline(always)]
pub unsafe fn read_cr0() -> u64 {
    let v;
    // SAFETY: the caller runs in ring 0; callee-save operands.
    unsafe { pv_site!(Op::ReadCr0; lateout("rax") v) };
    v
}

/// Write CR0.
///
/// # Safety
///
/// Ring 0, and `value` keeps paging, protection and caching as the rest of the system expects.
#[inline(always)]
pub unsafe fn write_cr0(value: u64) {
    // SAFETY: forwarded contract; callee-save operands.
    unsafe { pv_site!(Op::WriteCr0; in("rdi") value, lateout("rax") _) };
}

/// Read CR4.
///
/// # Safety
///
/// Ring 0 (or a backend that emulates it).
#[inline(always)]
pub unsafe fn read_cr4() -> u64 {
    let v;
    // SAFETY: the caller runs in ring 0; callee-save operands.
    unsafe { pv_site!(Op::ReadCr4; lateout("rax") v) };
    v
}

/// Write CR4.
///
/// # Safety
///
/// Ring 0; interrupts off if PGE or PCIDE change; `value` keeps the features the system uses.
#[inline(always)]
pub unsafe fn write_cr4(value: u64) {
    // SAFETY: forwarded contract; callee-save operands.
    unsafe { pv_site!(Op::WriteCr4; in("rdi") value, lateout("rax") _) };
}

/// Read an MSR that is known to exist.
///
/// # Safety
///
/// Ring 0, and `msr` exists on this CPU (otherwise the CPU faults).
#[inline(always)]
pub unsafe fn read_msr(msr: u32) -> u64 {
    let v;
    // SAFETY: forwarded contract; C operands.
    unsafe { pv_site!(Op::ReadMsr; in("rdi") msr, lateout("rax") v, clobber_abi("C")) };
    v
}

/// Write an MSR that is known to exist.
///
/// # Safety
///
/// Ring 0, `msr` exists, and the new value keeps the system consistent.
#[inline(always)]
pub unsafe fn write_msr(msr: u32, value: u64) {
    // SAFETY: forwarded contract; C operands.
    unsafe { pv_site!(Op::WriteMsr; in("rdi") msr, in("rsi") value, clobber_abi("C")) };
}

/// Read an MSR that may not exist: `Err(-EIO)` when the access faults.
///
/// # Safety
///
/// Ring 0.
#[inline(always)]
pub unsafe fn read_msr_safe(msr: u32) -> Result<u64, i32> {
    let mut v = 0u64;
    let rc: i32;
    // SAFETY: forwarded contract; `v` is writable; C operands.
    unsafe {
        pv_site!(Op::ReadMsrSafe; in("rdi") msr, in("rsi") core::ptr::addr_of_mut!(v),
                 lateout("eax") rc, clobber_abi("C"))
    };
    if rc == 0 {
        Ok(v)
    } else {
        Err(rc)
    }
}

/// Write an MSR that may not exist: `Err(-EIO)` when the access faults.
///
/// # Safety
///
/// Ring 0, and the new value keeps the system consistent.
#[inline(always)]
pub unsafe fn write_msr_safe(msr: u32, value: u64) -> Result<(), i32> {
    let rc: i32;
    // SAFETY: forwarded contract; C operands.
    unsafe {
        pv_site!(Op::WriteMsrSafe; in("rdi") msr, in("rsi") value, lateout("eax") rc,
                 clobber_abi("C"))
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(rc)
    }
}

/// Write back and invalidate all caches.
///
/// # Safety
///
/// Ring 0.
#[inline(always)]
pub unsafe fn wbinvd() {
    // SAFETY: forwarded contract; callee-save operands.
    unsafe { pv_site!(Op::Wbinvd; lateout("rax") _) };
}

/// Load the IDT register.
///
/// # Safety
///
/// Ring 0, interrupts off, and `*desc` describes a valid IDT that outlives its use.
#[inline(always)]
pub unsafe fn load_idt(desc: &DescriptorPointer) {
    // SAFETY: forwarded contract; callee-save operands.
    unsafe { pv_site!(Op::LoadIdt; in("rdi") desc as *const _, lateout("rax") _) };
}

/// Load the GDT register.
///
/// # Safety
///
/// Ring 0, interrupts off, and `*desc` describes a valid GDT that outlives its use.
#[inline(always)]
pub unsafe fn load_gdt(desc: &DescriptorPointer) {
    // SAFETY: forwarded contract; callee-save operands.
    unsafe { pv_site!(Op::LoadGdt; in("rdi") desc as *const _, lateout("rax") _) };
}

/// The task register's selector.
#[inline(always)]
pub fn store_tr() -> u64 {
    let v;
    // SAFETY: STR has no precondition (it works in ring 3 unless UMIP is on, where the
    // backend's function is used); callee-save operands.
    unsafe { pv_site!(Op::StoreTr; lateout("rax") v) };
    v
}

/// The short delay legacy port I/O needs.
///
/// # Safety
///
/// Ring 0 (or I/O privilege for port 0x80).
#[inline(always)]
pub unsafe fn io_delay() {
    // SAFETY: forwarded contract; callee-save operands.
    unsafe { pv_site!(Op::IoDelay; lateout("rax") _) };
}

/// The backend's hypercall `nr` with up to four arguments (see
/// [`CpuOps::hypercall`](super::CpuOps::hypercall)).
///
/// # Safety
///
/// The hypercall's own contract (a hypercall can change guest memory, stop the vCPU, …).
#[inline(always)]
pub unsafe fn hypercall(nr: u64, a0: u64, a1: u64, a2: u64, a3: u64) -> i64 {
    let r;
    // SAFETY: forwarded contract; C operands.
    unsafe {
        pv_site!(Op::Hypercall; in("rdi") nr, in("rsi") a0, in("rdx") a1, in("rcx") a2,
                 in("r8") a3, lateout("rax") r, clobber_abi("C"))
    };
    r
}
