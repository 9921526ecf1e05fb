// SPDX-License-Identifier: GPL-2.0

//! Linux's signatures over pvops's ops: what a kernel site of a member whose signature differs
//! from its op's calls ([`pvops::linux::Adapter`]).
//!
//! Each adapter does what Linux's native function for the member does around the op, no more:
//! the MSR accessors fire Linux's `msr:*` tracepoints and, for the unchecked ones, turn a
//! faulting access into Linux's one warning (a read then gives 0), over the backend's `_safe`
//! ops, whose fault is caught; `cpuid` passes the leaf and subleaf in and the four registers
//! out; the page-table notifications name their level; `flush_tlb_multi` leaves out the CPUs
//! whose flush the backend takes over. Each calls its op through a call site of
//! its own, which pvops patches like all of its sites (a direct call into the backend, or its
//! inline bytes), so a kernel site costs one call more than the op.

use core::ffi::{c_int, c_uint, c_ulong, c_void};

use kernel::prelude::*;

use pvops::linux::{Adapter, PtLevel};
use pvops::ops::{cpu, mmu};

use crate::shim;

/// The function of adapter `a`: what a kernel site of its member calls, and what its `pv_ops`
/// slot holds while pvops holds the kernel.
pub(crate) fn address(a: Adapter) -> usize {
    use PtLevel::{P4d, Pmd, Pte, Pud};
    match a {
        Adapter::ReadMsr => read_msr as *const () as usize,
        Adapter::WriteMsr => write_msr as *const () as usize,
        Adapter::ReadMsrSafe => read_msr_safe as *const () as usize,
        Adapter::WriteMsrSafe => write_msr_safe as *const () as usize,
        Adapter::Cpuid => cpuid as *const () as usize,
        Adapter::AllocPt(Pte) => alloc_pt::<{ Pte as u32 }> as *const () as usize,
        Adapter::AllocPt(Pmd) => alloc_pt::<{ Pmd as u32 }> as *const () as usize,
        Adapter::AllocPt(Pud) => alloc_pt::<{ Pud as u32 }> as *const () as usize,
        Adapter::AllocPt(P4d) => alloc_pt::<{ P4d as u32 }> as *const () as usize,
        Adapter::ReleasePt(Pte) => release_pt::<{ Pte as u32 }> as *const () as usize,
        Adapter::ReleasePt(Pmd) => release_pt::<{ Pmd as u32 }> as *const () as usize,
        Adapter::ReleasePt(Pud) => release_pt::<{ Pud as u32 }> as *const () as usize,
        Adapter::ReleasePt(P4d) => release_pt::<{ P4d as u32 }> as *const () as usize,
        Adapter::FlushTlbMulti => flush_tlb_multi as *const () as usize,
    }
}

/// `void flush_tlb_multi(const struct cpumask *cpus, const struct flush_tlb_info *info)`: the
/// shim copies the mask (into this CPU's own), drops each CPU [`flush_tlb_defer`] takes over,
/// and calls Linux's `native_flush_tlb_multi` with the rest (what `kvm_flush_tlb_multi` does).
///
/// # Safety
///
/// The member's contract: preemption off, `cpus` and `info` the kernel's.
unsafe extern "C" fn flush_tlb_multi(cpus: *const c_void, info: *const c_void) {
    // SAFETY: forwarded contract; `flush_tlb_defer` is called for CPUs of the mask, with
    // preemption off.
    unsafe { shim::pvops_shim_flush_tlb_multi(cpus, info, Some(flush_tlb_defer)) };
}

/// Whether the backend takes over `cpu`'s flush (the op, through a site of this adapter's).
///
/// # Safety
///
/// Called by the shim inside a cross-CPU flush, preemption off.
unsafe extern "C" fn flush_tlb_defer(cpu: c_uint) -> bool {
    // SAFETY: forwarded contract: every CPU not taken over gets the flush.
    unsafe { mmu::flush_tlb_defer(cpu) }
}

/// `u64 read_msr(unsigned int msr)`: Linux's `native_read_msr`: [`read_msr_safe`] (its
/// tracepoint), and a fault warned of once.
///
/// # Safety
///
/// Ring 0 (the kernel's own contract for the member).
unsafe extern "C" fn read_msr(msr: c_uint) -> u64 {
    let mut err = 0;
    // SAFETY: ring 0 (forwarded); `err` is writable; a fault is caught (it reads 0).
    let v = unsafe { read_msr_safe(msr, &mut err) };
    if err != 0 {
        // SAFETY: prints a warning and the stack, once.
        unsafe { shim::pvops_shim_msr_fault(0, msr, 0) };
    }
    v
}

/// `void write_msr(unsigned int msr, unsigned low, unsigned high)`: Linux's `native_write_msr`:
/// [`write_msr_safe`] (its tracepoint), and a fault warned of once.
///
/// # Safety
///
/// Ring 0, and the value keeps the system consistent (the member's contract).
unsafe extern "C" fn write_msr(msr: c_uint, low: c_uint, high: c_uint) {
    // SAFETY: forwarded contract; a fault is caught.
    if unsafe { write_msr_safe(msr, low, high) } != 0 {
        let v = u64::from(high) << 32 | u64::from(low);
        // SAFETY: prints a warning and the stack, once.
        unsafe { shim::pvops_shim_msr_fault(1, msr, v) };
    }
}

/// `u64 read_msr_safe(unsigned int msr, int *err)`: Linux's `native_read_msr_safe` (`*err` = 0
/// or `-EIO`, and then 0 is read).
///
/// # Safety
///
/// Ring 0; `err` is valid for writes.
unsafe extern "C" fn read_msr_safe(msr: c_uint, err: *mut c_int) -> u64 {
    // SAFETY: ring 0 (forwarded).
    let (v, rc) = match unsafe { cpu::read_msr_safe(msr) } {
        Ok(v) => (v, 0),
        Err(e) => (0, e),
    };
    // SAFETY: the caller passes a writable int.
    unsafe { err.write(rc) };
    // SAFETY: a tracepoint call with plain values.
    unsafe { shim::pvops_shim_trace_msr(0, msr, v, rc) };
    v
}

/// `int write_msr_safe(unsigned int msr, unsigned low, unsigned high)`: Linux's
/// `native_write_msr_safe` (0 or `-EIO`).
///
/// # Safety
///
/// Ring 0, and the value keeps the system consistent.
unsafe extern "C" fn write_msr_safe(msr: c_uint, low: c_uint, high: c_uint) -> c_int {
    let v = u64::from(high) << 32 | u64::from(low);
    // SAFETY: forwarded contract.
    let rc = match unsafe { cpu::write_msr_safe(msr, v) } {
        Ok(()) => 0,
        Err(e) => e,
    };
    // SAFETY: a tracepoint call with plain values.
    unsafe { shim::pvops_shim_trace_msr(1, msr, v, rc) };
    rc
}

/// `void cpuid(unsigned *eax, unsigned *ebx, unsigned *ecx, unsigned *edx)`: Linux's
/// `native_cpuid` (leaf in `*eax`, subleaf in `*ecx`).
///
/// # Safety
///
/// The four pointers are valid for reads and writes.
unsafe extern "C" fn cpuid(eax: *mut c_uint, ebx: *mut c_uint, ecx: *mut c_uint, edx: *mut c_uint) {
    // SAFETY: the caller passes four valid pointers.
    unsafe {
        let r = cpu::cpuid(eax.read(), ecx.read());
        eax.write(r.eax);
        ebx.write(r.ebx);
        ecx.write(r.ecx);
        edx.write(r.edx);
    }
}

/// `void alloc_pte/pmd/pud/p4d(struct mm_struct *mm, unsigned long pfn)` for level `L`.
///
/// # Safety
///
/// `pfn` is about to become a page table of level `L` (the member's contract).
unsafe extern "C" fn alloc_pt<const L: u32>(_mm: *mut c_void, pfn: c_ulong) {
    // SAFETY: forwarded contract.
    unsafe { mmu::alloc_pt(pfn, L) };
}

/// `void release_pte/pmd/pud/p4d(unsigned long pfn)` for level `L`.
///
/// # Safety
///
/// `pfn` stops being a page table of level `L`.
unsafe extern "C" fn release_pt<const L: u32>(pfn: c_ulong) {
    // SAFETY: forwarded contract.
    unsafe { mmu::release_pt(pfn, L) };
}

/// `MSR_EFER`: exists on every x86-64 CPU.
const MSR_EFER: u32 = 0xc000_0080;
/// An MSR no CPU has: its accesses fault (#GP) where the hypervisor follows the hardware (TCG
/// ignores unknown MSRs: they read 0).
const MSR_NONE: u32 = 0xdead_beef;

/// The self-test of the MSR and CPUID adapters, against the bare instructions (not the kernel's
/// accessors: built in, those call the adapters): CPUID leaves 0 and 0x8000_0000; EFER read
/// through `read_msr` and `read_msr_safe`, and written back unchanged through `write_msr` and
/// `write_msr_safe`; an MSR that does not exist read and written through the checked ones,
/// which must answer as Linux's own native accessors do (`-EIO` and 0 where the access faults).
/// A step that fails is named in dmesg.
pub(crate) fn selftest() -> bool {
    let step = |name: &str, ok: bool| {
        if !ok {
            pr_warn!("self-test: kernel-adapters: {name} differs\n");
        }
        ok
    };
    let mut ok = true;
    for leaf in [0, 0x8000_0000] {
        let (mut a, mut b, mut c, mut d) = (leaf, 0, 0, 0);
        // SAFETY: four writable words.
        unsafe { cpuid(&mut a, &mut b, &mut c, &mut d) };
        let raw = pvops::arch::raw_cpuid(leaf, 0);
        ok &= step(
            "cpuid",
            [a, b, c, d] == [raw.eax, raw.ebx, raw.ecx, raw.edx],
        );
    }
    // SAFETY: ring 0; EFER exists, and is written back with the value it holds; the MSR that
    // does not exist is written only where Linux's own accessor writes it too.
    unsafe {
        let raw = pvops_backends::native::read_msr(MSR_EFER);
        let mut err = -1;
        ok &= step("read_msr(EFER)", read_msr(MSR_EFER) == raw);
        ok &= step(
            "read_msr_safe(EFER)",
            read_msr_safe(MSR_EFER, &mut err) == raw && err == 0,
        );
        write_msr(MSR_EFER, raw as u32, (raw >> 32) as u32);
        ok &= step(
            "write_msr_safe(EFER)",
            write_msr_safe(MSR_EFER, raw as u32, (raw >> 32) as u32) == 0,
        );
        ok &= step(
            "EFER after",
            pvops_backends::native::read_msr(MSR_EFER) == raw,
        );
        let mut linux = 0;
        let linux_err = shim::pvops_shim_native_rdmsr_safe(MSR_NONE, &mut linux);
        err = 1;
        let v = read_msr_safe(MSR_NONE, &mut err);
        ok &= step("read_msr_safe(none)", (v, err) == (linux, linux_err));
        if linux_err != 0 {
            ok &= step(
                "write_msr_safe(none)",
                write_msr_safe(MSR_NONE, 0, 0) == shim::pvops_shim_native_wrmsr_safe(MSR_NONE, 0),
            );
        }
    }
    ok
}
