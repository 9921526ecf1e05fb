// SPDX-License-Identifier: GPL-2.0

//! pvops guest module: detect → select → fill the table → patch this module's call sites →
//! report (dmesg and `/sys/kernel/pvops/`); on unload, every site is restored byte for byte.
//!
//! Parameter `backend=` (`auto`, `native`, `kvm`, `xen`, `vmi`, `lguest`): an unknown name is
//! refused with -EINVAL and a backend whose hypervisor is absent with -ENODEV; in both cases
//! nothing is installed or patched.

use core::ffi::{c_int, c_void};

use core::format_args as fmt;
use kernel::prelude::*;
use kernel::str::CString;
use pvops::ops::{cpu, irq, mmu, timer};
use pvops::{Backend, BackendId, PatchError, PatchReport, Patcher, Request, SiteTable, PV_OPS};

mod bench;

module! {
    type: PvopsGuest,
    name: "pvops_guest",
    author: "pvops developers",
    description: "paravirt_ops in Rust: picks a backend, patches its call sites, reports the choice",
    license: "GPL",
}

/// The C side: shim.c and linux_peer.c, declared by shim.h. Kbuild generates these bindings
/// from shim.h with bindgen (`shim_bindings.rs` in the object folder).
#[allow(
    missing_docs,
    non_camel_case_types,
    non_upper_case_globals,
    unreachable_pub,
    clippy::all
)]
mod shim {
    use kernel::ffi;

    include!(env!("PVOPS_SHIM_BINDINGS"));
}

/// The call-site section's two markers (sites_start.S, sites_end.S).
mod sites {
    extern "C" {
        pub(crate) static pvops_sites_start: pvops::site::SiteRecord;
        pub(crate) static pvops_sites_end: pvops::site::SiteRecord;
    }
}

/// What the kernel knows that backends need.
struct KernelPlatform;

impl pvops_backends::Platform for KernelPlatform {
    fn tsc_khz(&self) -> u64 {
        // SAFETY: reads the exported `tsc_khz`.
        unsafe { shim::pvops_shim_tsc_khz() as u64 }
    }

    fn rdmsr(&self, msr: u32) -> Option<u64> {
        let mut v = 0;
        // SAFETY: the kernel's rdmsrl_safe: a fault is caught and reported.
        (unsafe { shim::pvops_shim_rdmsr(msr, &mut v) } == 0).then_some(v)
    }

    fn wrmsr(&self, msr: u32, value: u64) -> bool {
        // SAFETY: the kernel's wrmsrl_safe; the backends only write their own registrations.
        unsafe { shim::pvops_shim_wrmsr(msr, value) == 0 }
    }

    fn rdmsr_on_cpu(&self, cpu: u32, msr: u32) -> Option<u64> {
        let mut v = 0;
        // SAFETY: the kernel's rdmsrl_safe_on_cpu (an IPI to an online CPU).
        (unsafe { shim::pvops_shim_rdmsr_on_cpu(cpu, msr, &mut v) } == 0).then_some(v)
    }

    fn clock_ns(&self) -> Option<u64> {
        // SAFETY: reads the kernel's monotonic clock.
        Some(unsafe { shim::pvops_shim_ktime_ns() })
    }

    fn kernel_pvclock_cpu0(&self) -> Option<usize> {
        // SAFETY: reads the kernel's published pvclock pointer.
        let va = unsafe { shim::pvops_shim_kernel_pvclock_cpu0() };
        (va != 0).then_some(va)
    }

    fn xen_pv(&self) -> bool {
        // SAFETY: reads x86_hyper_type.
        unsafe { shim::pvops_shim_xen_pv() != 0 }
    }

    fn boot_subarch(&self) -> Option<(u32, u64)> {
        let (mut subarch, mut data) = (0, 0);
        // SAFETY: reads the kernel's published copy of boot_params into two locals.
        (unsafe { shim::pvops_shim_boot_subarch(&mut subarch, &mut data) } == 0)
            .then_some((subarch, data))
    }

    fn xen_vcpu_id(&self, cpu: u32) -> Option<u32> {
        // SAFETY: reads a possible CPU's xen_vcpu_id.
        u32::try_from(unsafe { shim::pvops_shim_xen_vcpu_id(cpu) }).ok()
    }

    fn xen_pv_kernel(&self) -> Option<pvops_backends::xen_pv::XenPvKernel> {
        if !self.xen_pv() {
            return None;
        }
        // SAFETY: plain queries of the kernel's state.
        let (irq_disable, save_fl, percpu_base0, shared_info, cr0) = unsafe {
            (
                shim::pvops_shim_xen_pv_irq_fn(0),
                shim::pvops_shim_xen_pv_irq_fn(1),
                shim::pvops_shim_percpu_base(0),
                shim::pvops_shim_xen_pv_shared_info(),
                shim::pvops_shim_read_cr0(),
            )
        };
        (irq_disable != 0 && save_fl != 0).then_some(pvops_backends::xen_pv::XenPvKernel {
            irq_disable,
            save_fl,
            percpu_base0,
            shared_info,
            cr0,
            read_cr3: shim::pvops_shim_read_cr3,
            write_cr3: shim::pvops_shim_write_cr3,
            read_cr4: shim::pvops_shim_read_cr4,
            virt_to_machine: shim::pvops_shim_virt_to_machine,
            pte_of: shim::pvops_shim_pte_of,
        })
    }

    fn alloc_page(&self) -> Option<usize> {
        // SAFETY: the kernel's page allocator.
        let va = unsafe { shim::pvops_shim_alloc_page() };
        (va != 0).then_some(va)
    }

    fn free_page(&self, va: usize) {
        // SAFETY: `va` came from alloc_page and nothing uses it any more (the backends' contract).
        unsafe { shim::pvops_shim_free_page(va) }
    }

    fn kernel_kvmclock(&self) -> Option<bool> {
        // SAFETY: reads the kernel's published kvmclock pointer.
        Some(unsafe { shim::pvops_shim_kernel_kvmclock() } != 0)
    }

    fn nr_cpus(&self) -> u32 {
        // SAFETY: reads nr_cpu_ids.
        unsafe { shim::pvops_shim_nr_cpus() }
    }

    fn phys_to_virt(&self, pa: u64) -> Option<usize> {
        // SAFETY: pure address arithmetic, with a pfn_valid check.
        let va = unsafe { shim::pvops_shim_phys_to_virt(pa) };
        (va != 0).then_some(va)
    }

    fn virt_to_phys(&self, va: usize) -> Option<u64> {
        // SAFETY: a page-table lookup of kernel memory the backend owns.
        let pa = unsafe { shim::pvops_shim_virt_to_phys(va) };
        (pa != 0).then_some(pa)
    }

    fn write_code(&self, addr: usize, bytes: &[u8]) -> bool {
        let end = addr + bytes.len();
        // SAFETY: [addr, end) is this module's own text (the VMI backend's arena); the alias
        // is dropped below.
        let alias = unsafe { shim::pvops_shim_alias_text(addr, end) };
        if alias.is_null() {
            return false;
        }
        // SAFETY: the alias maps every page of [addr, end) writable, starting at the page of
        // `addr`; no CPU executes these bytes while they are written (the caller's contract:
        // nothing calls the arena yet, or any more).
        unsafe {
            core::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                alias.cast::<u8>().add(addr & 0xfff),
                bytes.len(),
            );
            shim::pvops_shim_unalias_text(alias);
            // this CPU fetches the new bytes; the others serialise in the stop_machine that
            // patches the sites, before any of them can reach the arena
            shim::pvops_shim_sync_core();
        }
        true
    }
}

/// This module's call sites: everything between the two markers.
fn module_sites() -> SiteTable {
    // SAFETY: sites_start.S and sites_end.S are the first and last objects of the module, so the
    // linker put every record of the `pvops_sites` section between their two symbols.
    unsafe {
        SiteTable::from_bounds(
            core::ptr::addr_of!(sites::pvops_sites_start),
            core::ptr::addr_of!(sites::pvops_sites_end),
        )
    }
}

/// Module text, written through a temporary writable alias of its pages.
struct AliasText {
    page: usize,
    alias: *mut u8,
}

/// Text read in place (verifying needs no alias).
struct ReadOnlyText;

impl pvops::ReadText for ReadOnlyText {
    fn read(&self, addr: usize, out: &mut [u8]) {
        // SAFETY: `addr` is a call site inside this module's (or the kernel's) text, which is
        // mapped and readable.
        unsafe { core::ptr::copy_nonoverlapping(addr as *const u8, out.as_mut_ptr(), out.len()) };
    }
}

impl pvops::ReadText for AliasText {
    fn read(&self, addr: usize, out: &mut [u8]) {
        ReadOnlyText.read(addr, out)
    }
}

impl pvops::Text for AliasText {
    unsafe fn write(&mut self, addr: usize, bytes: &[u8]) {
        // SAFETY: the alias maps every page from `page` to the end of module text writable; the
        // engine verified the site; stop_machine keeps every other CPU out of it.
        unsafe {
            core::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.alias.add(addr - self.page),
                bytes.len(),
            )
        };
    }
}

/// One patch or revert, run under stop_machine.
struct Job<'a> {
    patcher: &'a Patcher<'a>,
    text: AliasText,
    revert: bool,
    result: Option<Result<PatchReport, PatchError>>,
}

/// stop_machine callback.
///
/// # Safety
///
/// `data` points at a live `Job`.
unsafe extern "C" fn run_job(data: *mut c_void) -> c_int {
    // SAFETY: `transition` passes a pointer to its own `Job`, alive until stop_machine returns.
    let job = unsafe { &mut *data.cast::<Job<'_>>() };
    job.result = Some(if job.revert {
        job.patcher.revert(&mut job.text)
    } else {
        job.patcher.apply(&mut job.text)
    });
    // SAFETY: serialising this CPU has no precondition; the others serialise on their way
    // out of stop_machine (interrupt return).
    unsafe { shim::pvops_shim_sync_core() };
    0
}

/// Patch (or revert) every site, all or nothing, with the other CPUs parked.
/// Why a patch or revert did not happen. Nothing was written in any case.
enum TransitionError {
    /// The engine refused (a site does not hold what it expects).
    Patch(PatchError),
    /// The text alias could not be mapped.
    NoAlias,
    /// stop_machine failed.
    StopMachine(c_int),
}

impl core::fmt::Display for TransitionError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            TransitionError::Patch(e) => write!(f, "{e}"),
            TransitionError::NoAlias => f.write_str("cannot map the call sites' text writable"),
            TransitionError::StopMachine(rc) => write!(f, "stop_machine failed ({rc})"),
        }
    }
}

fn transition(patcher: &Patcher<'_>, revert: bool) -> Result<PatchReport, TransitionError> {
    let Some((start, end)) = patcher.span() else {
        return Ok(PatchReport::default());
    };
    let page = start & !0xfff;
    // SAFETY: [start, end) is text of this module (or of the kernel, when built in) holding
    // call sites; the alias is dropped below.
    let alias = unsafe { shim::pvops_shim_alias_text(start, end) };
    if alias.is_null() {
        return Err(TransitionError::NoAlias);
    }
    let mut job = Job {
        patcher,
        text: AliasText {
            page,
            alias: alias.cast(),
        },
        revert,
        result: None,
    };
    // SAFETY: `job` outlives the call; run_job is the matching callback.
    let rc = unsafe {
        shim::pvops_shim_stop_machine(Some(run_job), core::ptr::addr_of_mut!(job).cast())
    };
    // SAFETY: the alias came from pvops_shim_alias_text and is no longer used.
    unsafe { shim::pvops_shim_unalias_text(alias) };
    match job.result {
        Some(r) => r.map_err(TransitionError::Patch),
        None => Err(TransitionError::StopMachine(rc)),
    }
}

/// How far the backend's wall clock may be from the kernel's: a sanity bound (right epoch, right
/// unit). The two come from different sources (the host's wall clock against the RTC the guest
/// read at boot plus its own clocksource) and drift apart by seconds in nested emulation.
const WALL_CLOCK_TOLERANCE_NS: u64 = 60_000_000_000;

/// What the self-test found.
struct SelfTest {
    /// Checks run.
    ran: u32,
    /// Names of the checks that failed.
    failed: KVec<&'static str>,
    /// The hypercall made, and its answer.
    hypercall: Option<(u64, i64)>,
}

/// Run what the patched sites now hold, in ring 0, and check it against the raw instructions,
/// the kernel's clocks and the hypervisor.
fn selftest(backend: &dyn Backend) -> SelfTest {
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
    let native = matches!(backend.id(), BackendId::Native | BackendId::Vmi);

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
    let may_not_know = backend.id() == BackendId::Xen && !KernelPlatform.xen_pv();
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

use pvops_backends::Platform as _;

const PAGE_ACCESSED: u64 = 1 << 5;
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
    let writable_after = after.is_none_or(|p| p & PAGE_RW != 0);
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

fn raw_flags() -> u64 {
    let f: u64;
    // SAFETY: reads RFLAGS.
    unsafe { core::arch::asm!("pushfq", "pop {}", out(reg) f) };
    f
}

fn raw_cr3() -> u64 {
    let v: u64;
    // SAFETY: ring 0 (module code); reads CR3.
    unsafe { core::arch::asm!("mov {}, cr3", out(reg) v, options(nostack, nomem)) };
    v
}

fn param() -> &'static str {
    // SAFETY: the shim returns the module parameter, a NUL-terminated string that lives as long
    // as the module.
    let s = unsafe { CStr::from_char_ptr(shim::pvops_shim_backend_param()) };
    s.to_str().unwrap_or("<invalid utf-8>")
}

struct PvopsGuest {
    backend: &'static dyn Backend,
    ops: pvops::PvOps,
    patched: bool,
}

impl PvopsGuest {
    fn patcher(&self) -> Patcher<'static> {
        // Records were checked at load; they cannot have changed.
        Patcher::new(module_sites(), PV_OPS.addr(), self.ops, self.backend)
            .unwrap_or_else(|_| unreachable!())
    }
}

impl kernel::Module for PvopsGuest {
    fn init(_module: &'static ThisModule) -> Result<Self> {
        // detect → select
        let request = Request::parse(param()).map_err(|_| {
            pr_err!(
                "unknown backend '{}' (auto, native, kvm, xen, vmi, lguest); nothing patched\n",
                param()
            );
            EINVAL
        })?;
        let t0 = pvops::arch::rdtsc_ordered();
        let detection = pvops::detect(pvops_backends::cpuid_source(&KernelPlatform));
        let t1 = pvops::arch::rdtsc_ordered();
        let candidates = pvops_backends::candidates(&detection, &KernelPlatform);
        if let Err(e @ pvops_backends::vmi::ProbeError::Refused { .. }) =
            pvops_backends::vmi::probe(&KernelPlatform)
        {
            pr_warn!("vmi: {}; the vmi backend is absent\n", e);
        }
        let selection = pvops::select(request, &detection, &candidates).map_err(|e| {
            pr_err!("{}; nothing patched\n", e);
            ENODEV
        })?;
        let (selection, backend) =
            match pvops_backends::start(selection.backend, &detection, &KernelPlatform) {
                Ok(b) => (selection, b),
                Err(e) => {
                    let Some(native) = selection.fall_back(request, &candidates) else {
                        pr_err!(
                            "backend {} failed to start ({}); nothing patched\n",
                            selection.backend,
                            e
                        );
                        return Err(ENODEV);
                    };
                    pr_warn!(
                        "backend {} failed to start ({}); falling back to native\n",
                        selection.backend,
                        e
                    );
                    let b = pvops_backends::start(BackendId::Native, &detection, &KernelPlatform)
                        .map_err(|_| ENODEV)?;
                    (native, b)
                }
            };

        let t2 = pvops::arch::rdtsc_ordered();

        // fill
        let ops = backend.ops();
        let patcher = Patcher::new(module_sites(), PV_OPS.addr(), ops, backend).map_err(|e| {
            pr_err!("{}; nothing patched\n", e);
            pvops_backends::stop(selection.backend, &KernelPlatform);
            ENOEXEC
        })?;
        // SAFETY: no op of this module runs yet, and the backend's functions honour the contracts.
        unsafe { PV_OPS.install(&ops) };

        // patch
        let t3 = pvops::arch::rdtsc_ordered();
        let patch_result = transition(&patcher, false);
        let load = bench::LoadCost {
            detect: t1 - t0,
            select: t2 - t1,
            patch: pvops::arch::rdtsc_ordered() - t3,
            sites: patcher.plan().total,
        };
        let (report, patched) = match patch_result {
            Ok(r) => (r, true),
            Err(e) => {
                pr_warn!("patching refused, sites stay indirect: {}\n", e);
                (
                    PatchReport {
                        total: patcher.plan().total,
                        ..Default::default()
                    },
                    false,
                )
            }
        };
        let verified = !patched || patcher.verify(&ReadOnlyText, true).is_ok();
        // From here on, dropping `guest` (an error below) undoes everything: sites, table,
        // backend, sysfs, debugfs.
        let guest = PvopsGuest {
            backend,
            ops,
            patched,
        };

        // report
        let st = selftest(backend);
        let hypervisor = match selection.interface {
            Some(i) => CString::try_from_fmt(fmt!(
                "{} base={:#x} max_leaf={:#x}",
                i.signature_str(),
                i.base,
                i.max_leaf
            ))?,
            None => match pvops_backends::vmi::rom_in_use() {
                Some((pa, (major, minor))) if selection.backend == BackendId::Vmi => {
                    CString::try_from_fmt(fmt!("VMI ROM at {pa:#x} API {major}.{minor}"))?
                }
                _ => CString::try_from_fmt(fmt!("none"))?,
            },
        };
        let sites = CString::try_from_fmt(fmt!(
            "{}/{} inline={} direct={} indirect={}",
            report.patched(),
            report.total,
            report.inline,
            report.direct,
            report.indirect
        ))?;
        let bytes = if verified { "verified" } else { "MISMATCH" };
        let (hc_nr, hc_ret) = st.hypercall.unwrap_or((0, 0));
        let hc = if st.hypercall.is_some() {
            "hypercall"
        } else {
            "no-hypercall"
        };
        let selftest = if st.failed.is_empty() && verified {
            CString::try_from_fmt(fmt!(
                "ok bytes={bytes} checks={} {hc}={hc_nr}:{hc_ret}",
                st.ran
            ))?
        } else {
            CString::try_from_fmt(fmt!(
                "FAILED bytes={bytes} checks={} failed={:?} {hc}={hc_nr}:{hc_ret}",
                st.ran,
                &st.failed[..]
            ))?
        };
        let name = CString::try_from_fmt(fmt!("{}", selection.backend))?;
        // SAFETY: four NUL-terminated strings; the shim copies them.
        unsafe {
            shim::pvops_shim_set_report(
                name.as_char_ptr(),
                hypervisor.as_char_ptr(),
                sites.as_char_ptr(),
                selftest.as_char_ptr(),
            )
        };
        pr_info!(
            "{} sites={}/{} (inline {}, direct {}) selftest={} {}\n",
            selection,
            report.patched(),
            report.total,
            report.inline,
            report.direct,
            selftest.to_str().unwrap_or("?"),
            backend.describe()
        );
        pr_info!(
            "load: detect {} cycles, select {}, patch {} ({} sites)\n",
            load.detect,
            load.select,
            load.patch,
            load.sites
        );
        // SAFETY: creates the sysfs directory; removed in drop.
        let err = unsafe { shim::pvops_shim_sysfs_create() };
        if err != 0 {
            pr_warn!("/sys/kernel/pvops not created ({})\n", err);
        }
        let tsc_khz = KernelPlatform.tsc_khz();
        // SAFETY: the debugfs file that runs the benchmark does not exist yet.
        unsafe {
            bench::set_state(Some(bench::State {
                backend,
                ops,
                load,
                tsc_khz,
            }))
        };
        // SAFETY: creates /sys/kernel/debug/pvops; removed in drop.
        unsafe { shim::pvops_shim_debugfs_create() };
        Ok(guest)
    }
}

impl Drop for PvopsGuest {
    fn drop(&mut self) {
        // SAFETY: removes what init created (a no-op if it was not); debugfs removal waits for
        // a running benchmark, after which the state can go.
        unsafe {
            shim::pvops_shim_sysfs_remove();
            shim::pvops_shim_debugfs_remove();
            bench::set_state(None);
        }
        let patcher = self.patcher();
        if self.patched {
            match transition(&patcher, true) {
                Ok(r) => match patcher.verify(&ReadOnlyText, false) {
                    Ok(()) => pr_info!("unload: {} sites restored byte-exact\n", r.total),
                    Err(e) => pr_err!("unload: restore did not verify: {}\n", e),
                },
                Err(e) => pr_err!("unload: sites left patched: {}\n", e),
            }
        } else {
            pr_info!("unload: nothing was patched\n");
        }
        // SAFETY: the module is going away; none of its ops can run any more.
        unsafe { PV_OPS.clear() };
        let released = pvops_backends::stop(self.backend.id(), &KernelPlatform);
        pr_info!(
            "unload: backend {} removed ({})\n",
            self.backend.id(),
            released
        );
    }
}
