// SPDX-License-Identifier: GPL-2.0

//! The self-test run at load, once the sites are patched: every check runs what the sites now
//! hold, in ring 0, against the raw instructions, the kernel's own accessors and clocks, and the
//! hypervisor.

use kernel::prelude::*;
use pvops::ops::{cpu, irq, lock, mmu, timer, BackendOps, Inline, Op};
use pvops::{Backend, BackendId, PV_OPS};
use pvops_backends::{kvm, lguest, vmi, xen, Driver, Platform as _};

use crate::platform::KernelPlatform;
use crate::shim;

/// How far the backend's wall clock may be from the kernel's: a sanity bound (right epoch, right
/// unit). The two come from different sources (the host's wall clock against the RTC the guest
/// read at boot plus its own clocksource) and drift apart by seconds in nested emulation.
const WALL_CLOCK_TOLERANCE_NS: u64 = 60_000_000_000;

/// How one check came out.
#[derive(Clone, Copy)]
pub(crate) enum Outcome {
    /// It ran and held.
    Ok,
    /// It ran and did not hold.
    Fail,
    /// It cannot fail on this backend (the reason): not run, not counted.
    NotApplicable(&'static str),
}

/// What the self-test found: every check by name, in the order it ran.
pub(crate) struct SelfTest {
    /// Each check and its outcome.
    pub(crate) checks: KVec<(&'static str, Outcome)>,
    /// The hypercall made, and its answer.
    pub(crate) hypercall: Option<(u64, i64)>,
}

impl SelfTest {
    /// Checks that ran (n/a ones are not counted).
    pub(crate) fn ran(&self) -> usize {
        self.checks
            .iter()
            .filter(|(_, o)| !matches!(o, Outcome::NotApplicable(_)))
            .count()
    }

    /// Checks that cannot fail on this backend.
    pub(crate) fn not_applicable(&self) -> usize {
        self.checks.len() - self.ran()
    }

    /// The names of the checks that failed.
    pub(crate) fn failed(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.checks
            .iter()
            .filter(|(_, o)| matches!(o, Outcome::Fail))
            .map(|(n, _)| *n)
    }
}

/// Collects the checks' outcomes in order.
struct Recorder(KVec<(&'static str, Outcome)>);

impl Recorder {
    /// A check that ran: `ok` or not.
    fn check(&mut self, name: &'static str, ok: bool) {
        let outcome = if ok { Outcome::Ok } else { Outcome::Fail };
        let _ = self.0.push((name, outcome), GFP_KERNEL);
    }

    /// A check that cannot fail here, and why.
    fn na(&mut self, name: &'static str, why: &'static str) {
        let _ = self.0.push((name, Outcome::NotApplicable(why)), GFP_KERNEL);
    }
}

/// The checks one per line, `NAME ok`, `NAME FAIL` or `NAME n/a REASON`
/// (`/sys/kernel/pvops/checks`).
pub(crate) struct Lines<'a>(pub(crate) &'a SelfTest);

impl core::fmt::Display for Lines<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for (i, (name, outcome)) in self.0.checks.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            match outcome {
                Outcome::Ok => write!(f, "{name} ok")?,
                Outcome::Fail => write!(f, "{name} FAIL")?,
                Outcome::NotApplicable(why) => write!(f, "{name} n/a {why}")?,
            }
        }
        Ok(())
    }
}

/// The names of the failed checks, comma-separated.
pub(crate) struct Failed<'a>(pub(crate) &'a SelfTest);

impl core::fmt::Display for Failed<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for (i, name) in self.0.failed().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(name)?;
        }
        Ok(())
    }
}

/// Run what the patched sites now hold, in ring 0, and check it against the raw instructions,
/// the kernel's accessors and clocks, and the hypervisor. A check whose comparison cannot fail
/// on this backend (it would compare a value with itself, or with what the op forwards to) is
/// recorded as not applicable, with the reason, instead of as passed.
pub(crate) fn selftest(backend: &dyn Backend, ops: &BackendOps) -> SelfTest {
    let mut t = Recorder(KVec::new());
    let mut hypercall = None;
    let pv = KernelPlatform.xen_pv();
    let id = backend.id();
    // Backends whose tsc_khz is the kernel's own value (native; VMI with the project's ROM,
    // which has no GetCycleFrequency): comparing it with the kernel's cannot fail.
    let kernels_tsc_khz = id == BackendId::NATIVE || id == <vmi::Vmi as Driver>::ID;

    // CPUID as the kernel sees it (the instruction, or Xen's emulation in a PV domain).
    let mut k = [0u32; 4];
    // SAFETY: writes four words.
    unsafe { shim::pvops_shim_cpuid(0, 0, k.as_mut_ptr()) };
    let c = cpu::cpuid(0, 0);
    t.check("cpuid", [c.eax, c.ebx, c.ecx, c.edx] == k);

    // Interrupt flag: off and on again through the sites; the raw flags must agree wherever the
    // backend's flag is the hardware's (everywhere but a Xen PV domain, whose flag is the
    // upcall mask while the hardware IF stays on).
    let f0 = irq::save_fl();
    t.check("irq-initially-on", f0 & irq::X86_EFLAGS_IF != 0);
    // SAFETY: module init runs with interrupts on; they are back on before this block ends.
    let raw_off = unsafe {
        irq::irq_disable();
        let off = irq::save_fl();
        let raw_off = raw_flags();
        let kernel_off = shim::pvops_shim_irqs_disabled();
        irq::irq_enable();
        let on = irq::save_fl();
        let kernel_on = shim::pvops_shim_irqs_disabled();
        t.check("irq-disable", off & irq::X86_EFLAGS_IF == 0);
        t.check("irq-enable", on & irq::X86_EFLAGS_IF != 0);
        // the kernel's own view of the flag follows the sites' (cli/sti, or Xen's upcall mask)
        t.check("irq-kernel-view", kernel_off != 0 && kernel_on == 0);
        irq::restore_fl(off);
        let restored_off = irq::save_fl();
        irq::restore_fl(f0);
        t.check("restore-fl", restored_off & irq::X86_EFLAGS_IF == 0);
        t.check("restore-fl-on", irq::save_fl() & irq::X86_EFLAGS_IF != 0);
        raw_off
    };
    if pv {
        t.na(
            "irq-raw",
            "xen pv: the flag is the upcall mask, the hardware IF stays on",
        );
    } else {
        t.check("irq-raw", raw_off & irq::X86_EFLAGS_IF == 0);
    }

    // SAFETY: ring 0; reads only, and an invlpg of a mapped kernel address.
    unsafe {
        let cr0 = cpu::read_cr0();
        t.check("cr0", cr0 & 0x8000_0001 == 0x8000_0001); // PG | PE
                                                          // In a PV domain the CR3 and CR4 ops are the kernel's own accessors, the very values
                                                          // they would be compared with.
        const PV_CR: &str = "xen pv: the op is the kernel's own accessor";
        let cr3 = mmu::read_cr3();
        if pv {
            t.na("cr3", PV_CR);
        } else {
            t.check(
                "cr3",
                cr3 == shim::pvops_shim_read_cr3() && cr3 == raw_cr3(),
            );
        }
        let cr4 = cpu::read_cr4();
        if pv {
            t.na("cr4", PV_CR);
        } else {
            t.check(
                "cr4",
                cr4 & (1 << 5) != 0 && cr4 == raw_cr4() && cr4 == shim::pvops_shim_read_cr4(),
            ); // PAE
        }
        let efer = cpu::read_msr_safe(0xc000_0080);
        t.check("msr-efer", matches!(efer, Ok(v) if v & 0x500 == 0x500)); // LME | LMA
        mmu::flush_tlb_one_user(core::ptr::addr_of!(PV_OPS) as u64);
    }
    t.check("set-pte", set_pte_round_trip());
    if ops.inline(Op::AllocPt) == Some(Inline::NOTHING) {
        t.na(
            "alloc-pt",
            "alloc_pt does nothing here (its sites are NOPs)",
        );
    } else {
        t.check("alloc-pt", alloc_pt_round_trip());
    }

    // The page-table value ops at this module's own sites, on a real entry, against the
    // kernel's own conversions (its pv_ops).
    if pv {
        t.na(
            "value-ops",
            "xen pv: the value ops forward to the kernel's own conversions",
        );
    } else {
        t.check("value-ops", value_ops_agree());
    }

    t.check("lock-ops", lock_ops_round_trip());

    // PV send-IPI, where the backend sends IPIs itself (KVM's hypercall).
    if !backend.sends_ipis() {
        t.na(
            "send-ipi",
            "the backend sends no IPIs of its own: the local APIC does",
        );
    } else {
        match send_ipi_round_trip() {
            Ok(held) => t.check("send-ipi", held),
            Err(why) => t.na("send-ipi", why),
        }
    }

    // The adapters kernel sites of Linux's MSR and CPUID members call (built in only), against
    // the bare instructions.
    #[cfg(MODULE)]
    {
        t.na(
            "kernel-adapters",
            "built in only: the adapters serve the kernel's own sites",
        );
    }
    #[cfg(not(MODULE))]
    if pv {
        t.na(
            "kernel-adapters",
            "xen pv: the kernel's MSR and CPUID members stay its own",
        );
    } else {
        t.check("kernel-adapters", crate::adapters::selftest());
    }

    // Page-table writes inside a lazy-MMU section (which a shadow-paging backend batches) are
    // all in place once the section ends; on a scratch array, as the benchmark does.
    if pv {
        // every entry write is an mmu_update, which Xen refuses for memory that is not a page
        // table (set-pte above covers its writes, on a real PTE)
        t.na("lazy-mmu", "xen pv: scratch entries are not page tables");
    } else if id == <lguest::Lguest as Driver>::ID {
        // The writes go through the ring (the rig's host-side check counts them there), but the
        // backend stores each entry itself before queueing the notification, so here the
        // entries are in place whatever the ring does: run it, report n/a.
        let _ = lazy_mmu_round_trip();
        t.na(
            "lazy-mmu",
            "lguest: entries are stored before queueing; the rig checks the ring host-side",
        );
    } else {
        t.check("lazy-mmu", lazy_mmu_round_trip());
    }

    let t0 = timer::sched_clock();
    let mut t1 = t0;
    for _ in 0..1000 {
        t1 = timer::sched_clock();
    }
    t.check("sched-clock", t1 > t0);
    let kernel_khz = KernelPlatform.tsc_khz();
    if kernels_tsc_khz {
        t.na("tsc-khz", "the backend's tsc_khz is the kernel's own value");
    } else if kernel_khz == 0 {
        t.na("tsc-khz", "the kernel has no tsc_khz to compare with");
    } else {
        // the hypervisor's rate against the kernel's calibration: within 0.5%
        t.check(
            "tsc-khz",
            timer::tsc_khz().abs_diff(kernel_khz) <= kernel_khz / 200,
        );
    }

    // The backend's clock against the kernel's (ktime) over 20 ms: within 2% + 200 us. Each
    // reading of the backend's clock is bracketed by two ktime reads with interrupts off, and
    // retried if something (a host-side preemption) stretched the bracket. Under nested
    // emulation a host can stall a vCPU for longer than the whole interval (seen on the xen-pv
    // rig with the machine loaded): up to three intervals are measured, each miss is logged
    // with its figures, and the check holds if one interval agrees. A clock that runs at the
    // wrong rate or stands still misses all three.
    let mut held = false;
    for attempt in 1..=3 {
        let (k0, c0) = clock_pair();
        // SAFETY: busy-waits 20 ms.
        unsafe { shim::pvops_shim_mdelay(20) };
        let (k1, c1) = clock_pair();
        let (dk, dc) = (k1 - k0, c1.wrapping_sub(c0));
        if c1 > c0 && dc.abs_diff(dk) <= dk / 50 + 200_000 {
            held = true;
            break;
        }
        pr_warn!(
            "self-test: clock-vs-ktime interval {attempt}/3: the backend's clock advanced {dc} ns while ktime advanced {dk} ns\n"
        );
    }
    t.check("clock-vs-ktime", held);
    let wall = timer::wall_clock();
    // SAFETY: reads the kernel's wall clock.
    let real = unsafe { shim::pvops_shim_ktime_real_ns() };
    if wall == 0 && id == <xen::Xen as Driver>::ID && !pv {
        // the one backend that knows no wall clock: Xen HVM (the kernel's shared_info is unexported)
        t.na(
            "wall-clock",
            "xen hvm: the kernel's shared_info is unexported; the backend reports 0",
        );
    } else if wall == 0 && id == <kvm::Kvm as Driver>::ID && !kvm::has_wall_clock() {
        // an optional part KVM's start could not read (an MSR write refused: fault=platform:N)
        t.na(
            "wall-clock",
            "kvm: the host's wall clock could not be read at start; the backend reports 0",
        );
    } else {
        t.check("wall-clock", wall.abs_diff(real) < WALL_CLOCK_TOLERANCE_NS);
    }

    // A real hypercall, answered as the hypervisor documents.
    match backend.null_hypercall() {
        Some(h) => {
            let [nr, a0, a1, a2, a3] = h.args;
            // SAFETY: the backend vouches that this hypercall has no side effect.
            let r = unsafe { cpu::hypercall(nr, a0, a1, a2, a3) };
            t.check("hypercall", r == h.expect);
            hypercall = Some((nr, r));
        }
        None => t.na("hypercall", "no hypervisor to call"),
    }
    SelfTest {
        checks: t.0,
        hypercall,
    }
}

/// A reschedule IPI to every other online CPU through this module's `irq.send_ipi` site: each
/// of them must count it (its irq_stat) within a second, and the host must say it reached as
/// many vCPUs (KVM's counters; the one backend with an `irq.send_ipi` of its own).
fn send_ipi_round_trip() -> Result<bool, &'static str> {
    let reached0 = pvops_backends::kvm::ipi_counts()[1];
    let mut targets = 0;
    // SAFETY: the shim's self-test; `send_ipi` is the op's entry for the shim.
    let took =
        unsafe { shim::pvops_shim_selftest_ipi(Some(crate::platform::send_ipi), &mut targets) };
    let reached = pvops_backends::kvm::ipi_counts()[1] - reached0;
    if targets == 0 {
        return Err("one CPU online: no other to send to");
    }
    pr_info!(
        "self-test: send-ipi: {} of {} CPUs took the reschedule IPI; the host reached {} vCPUs\n",
        took.max(0),
        targets,
        reached
    );
    Ok(took == targets as i32 && reached >= u64::from(targets))
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
    with_own_pte(|page, ptep| {
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
    })
}

/// Each level's value op and its inverse on a real entry (the kernel's PTE of a page of our
/// own): the kernel's conversion gives the same value, and the pair round-trips.
fn value_ops_agree() -> bool {
    use shim::pvops_value_op as V;
    // SAFETY: the page's live entry, read.
    let Some(e) = with_own_pte(|_, ptep| Some(unsafe { ptep.read_volatile() })) else {
        return false;
    };
    // SAFETY: the kernel's conversions, pure.
    let kernel = |which, v| unsafe { shim::pvops_shim_value(which, v) };
    let pair = |v: u64, made: u64, kv, km| v == kernel(kv, e) && made == kernel(km, v) && made == e;
    pair(
        mmu::pte_val(e),
        mmu::make_pte(mmu::pte_val(e)),
        V::PVOPS_PTE_VAL,
        V::PVOPS_MAKE_PTE,
    ) && pair(
        mmu::pmd_val(e),
        mmu::make_pmd(mmu::pmd_val(e)),
        V::PVOPS_PMD_VAL,
        V::PVOPS_MAKE_PMD,
    ) && pair(
        mmu::pud_val(e),
        mmu::make_pud(mmu::pud_val(e)),
        V::PVOPS_PUD_VAL,
        V::PVOPS_MAKE_PUD,
    ) && pair(
        mmu::p4d_val(e),
        mmu::make_p4d(mmu::p4d_val(e)),
        V::PVOPS_P4D_VAL,
        V::PVOPS_MAKE_P4D,
    ) && pair(
        mmu::pgd_val(e),
        mmu::make_pgd(mmu::pgd_val(e)),
        V::PVOPS_PGD_VAL,
        V::PVOPS_MAKE_PGD,
    )
}

/// `f(page, entry)` on a page only this call uses (vmalloc'd for it, freed after) and the
/// kernel's live 4 KiB entry for it; the default (false, None) when either is missing.
fn with_own_pte<T: Default>(f: impl FnOnce(usize, *mut u64) -> T) -> T {
    // SAFETY: allocates a page; freed below.
    let page = unsafe { shim::pvops_shim_vmalloc_page() };
    if page == 0 {
        return T::default();
    }
    // SAFETY: the kernel's entry for a page only this call uses.
    let ptep = unsafe { shim::pvops_shim_pte_of(page) } as *mut u64;
    let r = if ptep.is_null() {
        T::default()
    } else {
        f(page, ptep)
    };
    // SAFETY: frees the page allocated above.
    unsafe { shim::pvops_shim_vfree(page) };
    r
}

/// The lock ops on a lock byte of our own: released through the unlock site, a `wait` on a
/// value the byte no longer holds returns at once, and this CPU, running, is not preempted.
fn lock_ops_round_trip() -> bool {
    let mut locked = 1u8;
    // SAFETY: our own lock byte, "held"; the wait's value is stale (the byte is 0 by then), so
    // a halting backend returns at once.
    unsafe {
        lock::queued_spin_unlock(&mut locked);
        lock::wait(&mut locked, 1);
    }
    let flags = irq::save_fl();
    // SAFETY: ring 0; restored below (the CPU cannot change under us meanwhile).
    unsafe { irq::irq_disable() };
    // SAFETY: reads this CPU's number.
    let preempted = lock::vcpu_is_preempted(unsafe { shim::pvops_shim_this_cpu() });
    // SAFETY: the flags saved above.
    unsafe { irq::restore_fl(flags) };
    core::hint::black_box(locked) == 0 && !preempted
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

/// CR4, read with the instruction itself (not through a site).
fn raw_cr4() -> u64 {
    let v: u64;
    // SAFETY: ring 0 (module code); reads CR4.
    unsafe { core::arch::asm!("mov {}, cr4", out(reg) v, options(nostack, nomem)) };
    v
}

/// CR3, read with the instruction itself (not through a site).
fn raw_cr3() -> u64 {
    let v: u64;
    // SAFETY: ring 0 (module code); reads CR3.
    unsafe { core::arch::asm!("mov {}, cr3", out(reg) v, options(nostack, nomem)) };
    v
}
