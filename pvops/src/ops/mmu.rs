//! MMU group: call-site wrappers for [`MmuOps`](super::MmuOps).

use super::Op;
use crate::pv_site;

/// The last page-fault address.
///
/// # Safety
///
/// Ring 0.
#[inline(always)]
pub unsafe fn read_cr2() -> u64 {
    let v;
    // SAFETY: forwarded contract; callee-save operands.
    unsafe { pv_site!(Op::ReadCr2; lateout("rax") v) };
    v
}

/// Set CR2.
///
/// # Safety
///
/// Ring 0.
#[inline(always)]
pub unsafe fn write_cr2(value: u64) {
    // SAFETY: forwarded contract; callee-save operands.
    unsafe { pv_site!(Op::WriteCr2; in("rdi") value, lateout("rax") _) };
}

/// The page-table root.
///
/// # Safety
///
/// Ring 0.
#[inline(always)]
pub unsafe fn read_cr3() -> u64 {
    let v;
    // SAFETY: forwarded contract; callee-save operands.
    unsafe { pv_site!(Op::ReadCr3; lateout("rax") v) };
    v
}

/// Switch page tables.
///
/// # Safety
///
/// Ring 0, preemption off, and `value` roots page tables that map everything in use.
#[inline(always)]
pub unsafe fn write_cr3(value: u64) {
    // SAFETY: forwarded contract; callee-save operands.
    unsafe { pv_site!(Op::WriteCr3; in("rdi") value, lateout("rax") _) };
}

/// Flush this CPU's non-global translations.
///
/// # Safety
///
/// Ring 0, preemption off.
#[inline(always)]
pub unsafe fn flush_tlb_user() {
    // SAFETY: forwarded contract; callee-save operands.
    unsafe { pv_site!(Op::FlushTlbUser; lateout("rax") _) };
}

/// Flush this CPU's translations, global ones included.
///
/// # Safety
///
/// Ring 0, preemption off.
#[inline(always)]
pub unsafe fn flush_tlb_kernel() {
    // SAFETY: forwarded contract; C operands.
    unsafe { pv_site!(Op::FlushTlbKernel; clobber_abi("C")) };
}

/// Flush one page's translation on this CPU.
///
/// # Safety
///
/// Ring 0.
#[inline(always)]
pub unsafe fn flush_tlb_one_user(address: u64) {
    // SAFETY: forwarded contract; callee-save operands.
    unsafe { pv_site!(Op::FlushTlbOneUser; in("rdi") address, lateout("rax") _) };
}

macro_rules! set_entry {
    ($(#[$doc:meta])* $name:ident, $op:expr) => {
        $(#[$doc])*
        ///
        /// # Safety
        ///
        /// `entry` points at an entry of a live page table of that level, and the new value
        /// keeps every mapping in use valid (the caller flushes the TLB as needed).
        #[inline(always)]
        pub unsafe fn $name(entry: *mut u64, value: u64) {
            // SAFETY: forwarded contract; callee-save operands.
            unsafe { pv_site!($op; in("rdi") entry, in("rsi") value, lateout("rax") _) };
        }
    };
}

set_entry!(
    /// Store a level-1 page-table entry.
    set_pte,
    Op::SetPte
);
set_entry!(
    /// Store a level-2 page-table entry.
    set_pmd,
    Op::SetPmd
);
set_entry!(
    /// Store a level-3 page-table entry.
    set_pud,
    Op::SetPud
);

/// Announce that page `pfn` becomes a page table of `level` (1 = PTE … 4 = PGD).
///
/// # Safety
///
/// `pfn` is a page the caller owns and is about to link into a page table.
#[inline(always)]
pub unsafe fn alloc_pt(pfn: u64, level: u32) {
    // SAFETY: forwarded contract; C operands.
    unsafe { pv_site!(Op::AllocPt; in("rdi") pfn, in("esi") level, clobber_abi("C")) };
}

/// Announce that page `pfn` stops being a page table of `level`.
///
/// # Safety
///
/// `pfn` was announced with [`alloc_pt`] and is no longer linked into any page table.
#[inline(always)]
pub unsafe fn release_pt(pfn: u64, level: u32) {
    // SAFETY: forwarded contract; C operands.
    unsafe { pv_site!(Op::ReleasePt; in("rdi") pfn, in("esi") level, clobber_abi("C")) };
}

/// Start batching page-table updates.
///
/// # Safety
///
/// Ring 0, preemption off until the matching [`lazy_mode_leave`].
#[inline(always)]
pub unsafe fn lazy_mode_enter() {
    // SAFETY: forwarded contract; C operands.
    unsafe { pv_site!(Op::LazyModeEnter; clobber_abi("C")) };
}

/// Flush batched page-table updates and stop batching.
///
/// # Safety
///
/// Pairs with a [`lazy_mode_enter`] on this CPU.
#[inline(always)]
pub unsafe fn lazy_mode_leave() {
    // SAFETY: forwarded contract; C operands.
    unsafe { pv_site!(Op::LazyModeLeave; clobber_abi("C")) };
}

macro_rules! value_op {
    ($(#[$doc:meta])* $name:ident, $op:expr) => {
        $(#[$doc])*
        #[inline(always)]
        pub fn $name(value: u64) -> u64 {
            let v;
            // SAFETY: a value op has no precondition and touches no state; the table holds a
            // function of the op's convention (`Table::install`'s contract); callee-save
            // operands.
            unsafe { pv_site!($op; in("rdi") value, lateout("rax") v) };
            v
        }
    };
}

value_op!(
    /// A level-1 entry as the kernel reads it (Xen PV: machine frames become pseudo-physical).
    pte_val,
    Op::PteVal
);
value_op!(
    /// The level-1 entry to store for a value (the inverse of [`pte_val`]).
    make_pte,
    Op::MakePte
);
value_op!(
    /// A level-2 entry as the kernel reads it.
    pmd_val,
    Op::PmdVal
);
value_op!(
    /// The level-2 entry to store for a value.
    make_pmd,
    Op::MakePmd
);
value_op!(
    /// A level-3 entry as the kernel reads it.
    pud_val,
    Op::PudVal
);
value_op!(
    /// The level-3 entry to store for a value.
    make_pud,
    Op::MakePud
);
value_op!(
    /// A level-4 entry as the kernel reads it.
    p4d_val,
    Op::P4dVal
);
value_op!(
    /// The level-4 entry to store for a value.
    make_p4d,
    Op::MakeP4d
);
value_op!(
    /// A top-level entry as the kernel reads it.
    pgd_val,
    Op::PgdVal
);
value_op!(
    /// The top-level entry to store for a value.
    make_pgd,
    Op::MakePgd
);

/// Whether the backend takes over flushing `cpu`'s TLB for a cross-CPU flush (then the caller
/// sends it no IPI).
///
/// # Safety
///
/// Ring 0, preemption off, inside a cross-CPU flush that will flush every CPU it does not
/// leave to the backend.
#[inline(always)]
pub unsafe fn flush_tlb_defer(cpu: u32) -> bool {
    let v: u64;
    // SAFETY: forwarded contract; C operands.
    unsafe { pv_site!(Op::FlushTlbDefer; in("edi") cpu, lateout("rax") v, clobber_abi("C")) };
    v & 1 != 0
}
