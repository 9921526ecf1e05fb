// SPDX-License-Identifier: GPL-2.0

//! The self-test run at load, once the sites are patched: every check runs what the sites now
//! hold, in ring 0, against the raw instructions, the kernel's own accessors and clocks, and the
//! hypervisor.

use kernel::prelude::*;
use pvops::ops::{cpu, irq, mmu, timer};
use pvops::{Backend, BackendId, PV_OPS};
use pvops_backends::{vmi, xen, Driver, Platform as _};

use crate::platform::KernelPlatform;
use crate::shim;

/// How far the backend's wall clock may be from the kernel's: a sanity bound (right epoch, right
/// unit). The two come from different sources (the host's wall clock against the RTC the guest
/// read at boot plus its own clocksource) and drift apart by seconds in nested emulation.
const WALL_CLOCK_TOLERANCE_NS: u64 = 60_000_000_000;

/// What the self-test found.
pub(crate) struct SelfTest {
    /// Checks run.
    pub(crate) ran: u32,
    /// Names of the checks that failed.
    pub(crate) failed: KVec<&'static str>,
    /// The hypercall made, and its answer.
    pub(crate) hypercall: Option<(u64, i64)>,
}

/// Run what the patched sites now hold, in ring 0, and check it against the raw instructions,
/// the kernel's clocks and the hypervisor.
pub(crate) fn selftest(backend: &dyn Backend) -> SelfTest {
    let mut failed = KVec::new();
    let mut ran = 0;
    let mut check = |name: &'static str, ok: bool| {
        ran += 1;
        if !ok {
            let _ = failed.push(name, GFP_KERNEL);
        }
    };
    let mut hypercall = None;
    // Backends whose ops are the real instructions, checked against them: native, and VMI with
    // the project's ROM (its routines are the native implementations).
    let native = backend.id() == BackendId::NATIVE || backend.id() == <vmi::Vmi as Driver>::ID;

    // CPUID as the kernel sees it (the instruction, or Xen's emulation in a PV domain).
    let mut k = [0u32; 4];
    // SAFETY: writes four words.
    unsafe { shim::pvops_shim_cpuid(0, 0, k.as_mut_ptr()) };
    let c = cpu::cpuid(0, 0);
    check("cpuid", [c.eax, c.ebx, c.ecx, c.edx] == k);

    // Interrupt flag: off and on again through the sites; the raw flags must agree on native.
    let f0 = irq::save_fl();
    check("irq-initially-on", f0 & irq::X86_EFLAGS_IF != 0);
    // SAFETY: module init runs with interrupts on; they are back on before this block ends.
    unsafe {
        irq::irq_disable();
        let off = irq::save_fl();
        let raw_off = raw_flags();
        let kernel_off = shim::pvops_shim_irqs_disabled();
        irq::irq_enable();
        let on = irq::save_fl();
        let kernel_on = shim::pvops_shim_irqs_disabled();
        check("irq-disable", off & irq::X86_EFLAGS_IF == 0);
        check("irq-enable", on & irq::X86_EFLAGS_IF != 0);
        // the kernel's own view of the flag follows the sites' (cli/sti, or Xen's upcall mask)
        check("irq-kernel-view", kernel_off != 0 && kernel_on == 0);
        check("irq-raw", !native || raw_off & irq::X86_EFLAGS_IF == 0);
        irq::restore_fl(off);
        let restored_off = irq::save_fl();
        irq::restore_fl(f0);
        check("restore-fl", restored_off & irq::X86_EFLAGS_IF == 0);
        check("restore-fl-on", irq::save_fl() & irq::X86_EFLAGS_IF != 0);
    }

    // SAFETY: ring 0; reads only, and an invlpg of a mapped kernel address.
    unsafe {
        let cr0 = cpu::read_cr0();
        check("cr0", cr0 & 0x8000_0001 == 0x8000_0001); // PG | PE
        let cr3 = mmu::read_cr3();
        check(
            "cr3",
            cr3 == shim::pvops_shim_read_cr3() && (!native || cr3 == raw_cr3()),
        );
        let cr4 = cpu::read_cr4();
        check(
            "cr4",
            cr4 & (1 << 5) != 0 && cr4 == shim::pvops_shim_read_cr4(),
        ); // PAE
        let efer = cpu::read_msr_safe(0xc000_0080);
        check("msr-efer", matches!(efer, Ok(v) if v & 0x500 == 0x500)); // LME | LMA
        mmu::flush_tlb_one_user(core::ptr::addr_of!(PV_OPS) as u64);
    }
    check("set-pte", set_pte_round_trip());
    check("alloc-pt", alloc_pt_round_trip());

    // Page-table writes inside a lazy-MMU section (which a shadow-paging backend batches) are
    // all in place once the section ends; on a scratch array, as the benchmark does. Not in a
    // Xen PV domain, where every entry write is an mmu_update that Xen refuses for memory that
    // is not a page table (set-pte above covers its writes, on a real PTE).
    if !KernelPlatform.xen_pv() {
        check("lazy-mmu", lazy_mmu_round_trip());
    }

    let t0 = timer::sched_clock();
    let mut t1 = t0;
    for _ in 0..1000 {
        t1 = timer::sched_clock();
    }
    check("sched-clock", t1 > t0);
    check(
        "tsc-khz",
        !native || KernelPlatform.tsc_khz() == 0 || timer::tsc_khz() == KernelPlatform.tsc_khz(),
    );

    // The backend's clock against the kernel's (ktime) over 20 ms: within 2% + 200 us. Each
    // reading of the backend's clock is bracketed by two ktime reads with interrupts off, and
    // retried if something (a host-side preemption) stretched the bracket.
    let (k0, c0) = clock_pair();
    // SAFETY: busy-waits 20 ms.
    unsafe { shim::pvops_shim_mdelay(20) };
    let (k1, c1) = clock_pair();
    let (dk, dc) = (k1 - k0, c1.wrapping_sub(c0));
    check(
        "clock-vs-ktime",
        c1 > c0 && dc.abs_diff(dk) <= dk / 50 + 200_000,
    );
    let wall = timer::wall_clock();
    // SAFETY: reads the kernel's wall clock.
    let real = unsafe { shim::pvops_shim_ktime_real_ns() };
    // Every backend knows the wall clock but Xen HVM (its shared_info is the kernel's, unexported).
    let may_not_know = backend.id() == <xen::Xen as Driver>::ID && !KernelPlatform.xen_pv();
    check(
        "wall-clock",
        (wall == 0 && may_not_know) || wall.abs_diff(real) < WALL_CLOCK_TOLERANCE_NS,
    );

    // A real hypercall, answered as the hypervisor documents.
    if let Some(h) = backend.null_hypercall() {
        let [nr, a0, a1, a2, a3] = h.args;
        // SAFETY: the backend vouches that this hypercall has no side effect.
        let r = unsafe { cpu::hypercall(nr, a0, a1, a2, a3) };
        check("hypercall", r == h.expect);
        hypercall = Some((nr, r));
    }
    SelfTest {
        ran,
        failed,
        hypercall,
    }
}
/// The Accessed bit of a page-table entry.
const PAGE_ACCESSED: u64 = 1 << 5;
/// The Writable bit of a page-table entry.
const PAGE_RW: u64 = 1 << 1;

/// Eight `set_pte`s on a scratch array inside a lazy-MMU section, all in place when it ends.
fn lazy_mmu_round_trip() -> bool {
    let mut scratch = [0u64; 8];
    // SAFETY: the entries are this array's, not a live page table; the section is closed.
    unsafe {
        mmu::lazy_mode_enter();
        for (i, e) in scratch.iter_mut().enumerate() {
            mmu::set_pte(e, (i as u64) << 12 | 0x63);
        }
        mmu::lazy_mode_leave();
    }
    scratch
        .iter()
        .enumerate()
        .all(|(i, &v)| v == (i as u64) << 12 | 0x63)
}

/// A page-table write through `set_pte` (a store natively, `mmu_update` on Xen PV): toggle the
/// Accessed bit in the PTE of a page the module owns, read it back, restore it.
fn set_pte_round_trip() -> bool {
    // SAFETY: allocates a page; freed below.
    let page = unsafe { shim::pvops_shim_vmalloc_page() };
    if page == 0 {
        return false;
    }
    // SAFETY: the kernel's entry for a page only this function uses.
    let ptep = unsafe { shim::pvops_shim_pte_of(page) } as *mut u64;
    let ok = !ptep.is_null() && {
        // SAFETY: `ptep` is the page's live 4 KiB entry; only the Accessed bit changes, and the
        // page is not touched meanwhile (the CPU would set that bit itself).
        unsafe {
            let old = core::ptr::read_volatile(ptep);
            mmu::set_pte(ptep, old ^ PAGE_ACCESSED);
            let toggled = core::ptr::read_volatile(ptep);
            mmu::set_pte(ptep, old);
            mmu::flush_tlb_one_user(page as u64);
            toggled == old ^ PAGE_ACCESSED && core::ptr::read_volatile(ptep) == old
        }
    };
    // SAFETY: frees the page allocated above.
    unsafe { shim::pvops_shim_vfree(page) };
    ok
}

/// `alloc_pt`/`release_pt` on a zeroed page (a valid empty table): a Xen PV backend pins it,
/// which needs it read-only everywhere, and undoes both; elsewhere they change nothing here.
fn alloc_pt_round_trip() -> bool {
    let Some(va) = KernelPlatform.alloc_page() else {
        return false;
    };
    let Some(pfn) = KernelPlatform.virt_to_phys(va).map(|pa| pa >> 12) else {
        KernelPlatform.free_page(va);
        return false;
    };
    // SAFETY: the kernel's direct-map entry for the page (0 when mapped by a large page).
    let pte = || unsafe {
        let p = shim::pvops_shim_pte_of(va) as *const u64;
        (!p.is_null()).then(|| core::ptr::read_volatile(p))
    };
    // SAFETY: the page is the module's, zeroed (an empty table of any level), and referenced
    // by no table; it is released before it is freed.
    let (during, after) = unsafe {
        mmu::alloc_pt(pfn, 1);
        let during = pte();
        mmu::release_pt(pfn, 1);
        (during, pte())
    };
    KernelPlatform.free_page(va);
    // (not `Option::is_none_or`: stable since 1.82, the kernel's clippy.toml says 1.78)
    let writable_after = !matches!(after, Some(p) if p & PAGE_RW == 0);
    if KernelPlatform.xen_pv() {
        matches!(during, Some(p) if p & PAGE_RW == 0) && writable_after
    } else {
        writable_after
    }
}

/// ktime and the backend's sched_clock read at (nearly) the same instant, with interrupts off
/// (see [`pvops::arch::bracketed`]).
fn clock_pair() -> (u64, u64) {
    // SAFETY: the kernel's local_irq_save; restored below.
    let flags = unsafe { shim::pvops_shim_irq_save() };
    let pair = pvops::arch::bracketed(
        // SAFETY: reads the kernel's monotonic clock.
        &mut || Some(unsafe { shim::pvops_shim_ktime_ns() }),
        &mut timer::sched_clock,
        20_000,
    );
    // SAFETY: restores the flags saved above.
    unsafe { shim::pvops_shim_irq_restore(flags) };
    pair.unwrap_or((0, 0))
}

/// RFLAGS, read with the instructions themselves (not through a site).
fn raw_flags() -> u64 {
    let f: u64;
    // SAFETY: reads RFLAGS.
    unsafe { core::arch::asm!("pushfq", "pop {}", out(reg) f) };
    f
}

/// CR3, read with the instruction itself (not through a site).
fn raw_cr3() -> u64 {
    let v: u64;
    // SAFETY: ring 0 (module code); reads CR3.
    unsafe { core::arch::asm!("mov {}, cr3", out(reg) v, options(nostack, nomem)) };
    v
}
