// SPDX-License-Identifier: GPL-2.0

//! The in-guest benchmark: every op the module can run safely in ring 0, every path that
//! exists for it, in TSC cycles per op.
//!
//! Paths, all measured in one run on the same call sites:
//!
//! - `raw`: the bare instruction, inline (the physical limit);
//! - `inline`: the pvops sites patched inline (when the backend has a replacement that fits);
//! - `direct`: the same sites patched to direct calls (re-patched with the inline
//!   replacements withheld);
//! - `indirect`: the same sites unpatched (indirect calls through `PV_OPS`);
//! - `linux`: Linux's own paravirt path for the operation (linux_peer.c), patched by the
//!   kernel for the running hypervisor; `linux_indirect`: an indirect call through Linux's own
//!   `pv_ops` slot, with the kernel's retpoline settings.
//!
//! Each path is a loop of `REPS` operations timed with serialised TSC reads (`lfence; rdtsc`),
//! interrupts off; after a warm-up, `SAMPLES` samples give the median and the 10th/90th
//! percentiles. The loop's own cost (an empty loop, measured the same way, per harness) is
//! subtracted. Integers only: results are TSC cycles per 100 operations.

use core::ffi::c_int;
use core::fmt::Write;

use kernel::prelude::*;
use pvops::arch::{raw_cpuid, rdtsc_ordered};
use pvops::ops::{cpu, irq, mmu, timer, Op};
use pvops::{Backend, Patcher, PV_OPS};

use crate::platform::KernelPlatform;
use crate::shim;
use crate::shim::pvops_linux_loop as Loop;
use crate::text::{module_sites, transition, ReadOnlyText};

/// Operations per timed loop.
const REPS: u32 = 200;
/// Timed loops per path (after one warm-up).
const SAMPLES: usize = 21;

/// Median and spread of one path, in TSC cycles per 100 operations.
#[derive(Clone, Copy)]
struct Stats {
    /// The median sample.
    median: u64,
    /// The 10th percentile.
    p10: u64,
    /// The 90th percentile.
    p90: u64,
}

/// Time `reps` runs of `f` (inlined into the loop).
#[inline(always)]
fn timed<F: FnMut()>(reps: u32, mut f: F) -> u64 {
    let t0 = rdtsc_ordered();
    for _ in 0..reps {
        f();
    }
    rdtsc_ordered().wrapping_sub(t0)
}

/// A path: runs its loop `reps` times and returns the cycles it took.
type Path = fn(u32) -> u64;

/// Sample a path with interrupts off; subtract `baseline` (cycles per loop of REPS).
fn measure(path: &dyn Fn(u32) -> u64, baseline: u64) -> Stats {
    let mut s = [0u64; SAMPLES];
    // SAFETY: the kernel's local_irq_save; restored below.
    let flags = unsafe { shim::pvops_shim_irq_save() };
    path(REPS); // warm-up
    for v in s.iter_mut() {
        *v = path(REPS).saturating_sub(baseline) * 100 / u64::from(REPS);
    }
    // SAFETY: restores the flags saved above.
    unsafe { shim::pvops_shim_irq_restore(flags) };
    insertion_sort(&mut s);
    Stats {
        median: s[SAMPLES / 2],
        p10: s[SAMPLES / 10],
        p90: s[SAMPLES * 9 / 10],
    }
}

/// Sorts a sample set (core's sort pulls in panic paths objtool cannot follow).
fn insertion_sort(s: &mut [u64; SAMPLES]) {
    for i in 1..SAMPLES {
        let mut j = i;
        while j > 0 && s[j - 1] > s[j] {
            s.swap(j - 1, j);
            j -= 1;
        }
    }
}

/// Raw cycles of the loop itself (median), so it can be subtracted.
fn baseline(path: &dyn Fn(u32) -> u64) -> u64 {
    let st = measure(path, 0);
    st.median * u64::from(REPS) / 100
}

/// Linux's own path for an op: loop `id` of linux_peer.c.
fn linux(id: Loop) -> impl Fn(u32) -> u64 {
    // SAFETY: runs one of linux_peer.c's loops; interrupts are off (measure).
    move |reps| unsafe { shim::pvops_linux_loop(id, reps) }
}

/// What the MMU rows write as their "page-table entry" and flush from the TLB.
static mut SCRATCH: u64 = 0;
/// The IDT register as SIDT found it, which the load_idt rows load again.
static mut IDT_NOW: pvops::ops::DescriptorPointer =
    pvops::ops::DescriptorPointer { limit: 0, base: 0 };

/// The scratch variable's address.
fn scratch() -> *mut u64 {
    core::ptr::addr_of_mut!(SCRATCH)
}

/// The IDT register as `run` read it.
fn idt_now() -> &'static pvops::ops::DescriptorPointer {
    // SAFETY: written once by `run` (SIDT) before any path reads it, under the bench mutex.
    unsafe { &*core::ptr::addr_of!(IDT_NOW) }
}

/// Keeps a result alive the way linux_peer.c's `KEEP` does: an empty asm statement that takes
/// it in a register (no store to memory), so both harnesses pay the same for it.
trait Sink {
    /// Consume `self` in a register.
    fn sink(self);
}

impl Sink for u64 {
    #[inline(always)]
    fn sink(self) {
        // SAFETY: an empty asm statement.
        unsafe {
            core::arch::asm!("/* {0} */", in(reg) self, options(nomem, nostack, preserves_flags))
        };
    }
}

impl Sink for i64 {
    #[inline(always)]
    fn sink(self) {
        (self as u64).sink()
    }
}

impl Sink for u32 {
    #[inline(always)]
    fn sink(self) {
        u64::from(self).sink()
    }
}

impl Sink for () {
    #[inline(always)]
    fn sink(self) {}
}

/// A path: a loop around `$body`, timed.
macro_rules! path {
    ($body:expr) => {{
        fn p(reps: u32) -> u64 {
            timed(reps, || Sink::sink($body))
        }
        p as Path
    }};
}

/// A path whose body is unsafe.
macro_rules! path_unsafe {
    ($body:expr) => {
        path!({
            // SAFETY: every body in `rows` keeps the invariant stated there.
            unsafe { $body }
        })
    };
}

/// The raw instruction(s) as a path.
macro_rules! raw {
    ($($asm:tt)*) => { path_unsafe!(core::arch::asm!($($asm)*)) };
}

/// One benchmarked op: its raw form, its pvops wrapper, and Linux's peer (a loop of
/// linux_peer.c, `enum pvops_linux_loop` in shim.h).
struct Row {
    /// The op (whether the backend inlines it decides the `inline` path).
    op: Op,
    /// Its name in the JSON.
    label: &'static str,
    /// The bare instruction(s), where they exist and are safe to run.
    raw: Option<Path>,
    /// Through the pvops call sites.
    pvops: Path,
    /// Linux's own path, where it has one.
    linux: Option<Loop>,
}

/// The backend's harmless hypercall (number, first argument), set by `run` before measuring.
static HYPERCALL: [core::sync::atomic::AtomicU64; 2] = [
    core::sync::atomic::AtomicU64::new(0),
    core::sync::atomic::AtomicU64::new(0),
];
/// Whether the KVM hypercall instruction is `vmmcall`.
static VMMCALL: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// The hypercall `run` set: number and first argument.
fn hc() -> (u64, u64) {
    use core::sync::atomic::Ordering::Relaxed;
    (HYPERCALL[0].load(Relaxed), HYPERCALL[1].load(Relaxed))
}

/// Every op the benchmark runs. Invariant of every body: ring 0, interrupts off (`measure`),
/// and each op run so that it changes nothing: registers are written with the value they
/// hold, the TLB entry flushed is the scratch variable's, the "page-table entry" written is
/// the scratch variable, the IDT is reloaded with what SIDT returned.
///
/// Left out: halt and safe_halt (they wait for an interrupt), wbinvd (flushes every cache of
/// the machine), write_msr/write_cr0/write_cr4 (a wrong value is fatal and the gain is nil),
/// set_next_event (the timer belongs to the kernel), wall_clock (the RTC ports are the
/// kernel's), load_gdt (as load_idt). The hypercall is the backend's harmless one
/// (`Backend::null_hypercall`); its raw and Linux paths exist on KVM only (elsewhere the
/// instruction would fault).
fn rows() -> [Row; 25] {
    #[rustfmt::skip]
    let rows = [
        Row { op: Op::SaveFl, label: "irq.save_fl", linux: Some(Loop::PVOPS_LINUX_SAVE_FL),
              raw: Some(raw!("pushfq", "pop {}", out(reg) _)), pvops: path!(irq::save_fl()) },
        Row { op: Op::RestoreFl, label: "irq.restore_fl", linux: Some(Loop::PVOPS_LINUX_RESTORE_FL),
              raw: Some(raw!("pushfq", "popfq")), pvops: path_unsafe!(irq::restore_fl(irq::save_fl())) },
        Row { op: Op::IrqDisable, label: "irq.irq_disable", linux: Some(Loop::PVOPS_LINUX_IRQ_DISABLE),
              raw: Some(raw!("cli")), pvops: path_unsafe!(irq::irq_disable()) },
        Row { op: Op::IrqEnable, label: "irq.irq_enable+irq_disable", linux: Some(Loop::PVOPS_LINUX_IRQ_ENABLE_DISABLE),
              raw: Some(raw!("sti", "cli")),
              pvops: path_unsafe!({ irq::irq_enable(); irq::irq_disable() }) },
        Row { op: Op::ReadCr0, label: "cpu.read_cr0", linux: Some(Loop::PVOPS_LINUX_READ_CR0),
              raw: Some(raw!("mov {}, cr0", out(reg) _)), pvops: path_unsafe!(cpu::read_cr0()) },
        Row { op: Op::ReadCr2, label: "mmu.read_cr2", linux: Some(Loop::PVOPS_LINUX_READ_CR2),
              raw: Some(raw!("mov {}, cr2", out(reg) _)), pvops: path_unsafe!(mmu::read_cr2()) },
        Row { op: Op::WriteCr2, label: "mmu.write_cr2", linux: Some(Loop::PVOPS_LINUX_WRITE_CR2),
              raw: Some(raw!("mov {0}, cr2", "mov cr2, {0}", out(reg) _)),
              pvops: path_unsafe!(mmu::write_cr2(mmu::read_cr2())) },
        Row { op: Op::ReadCr3, label: "mmu.read_cr3", linux: Some(Loop::PVOPS_LINUX_READ_CR3),
              raw: Some(raw!("mov {}, cr3", out(reg) _)), pvops: path_unsafe!(mmu::read_cr3()) },
        Row { op: Op::ReadCr4, label: "cpu.read_cr4", linux: Some(Loop::PVOPS_LINUX_READ_CR4),
              raw: Some(raw!("mov {}, cr4", out(reg) _)), pvops: path_unsafe!(cpu::read_cr4()) },
        Row { op: Op::Cpuid, label: "cpu.cpuid", linux: Some(Loop::PVOPS_LINUX_CPUID),
              raw: Some(path!(raw_cpuid(0, 0).eax)), pvops: path!(cpu::cpuid(0, 0).eax) },
        Row { op: Op::ReadMsr, label: "cpu.read_msr", linux: Some(Loop::PVOPS_LINUX_READ_MSR),
              raw: Some(raw!("rdmsr", in("ecx") 0xc000_0080u32, out("eax") _, out("edx") _)),
              pvops: path_unsafe!(cpu::read_msr(0xc000_0080)) },
        Row { op: Op::ReadMsrSafe, label: "cpu.read_msr_safe", linux: None, raw: None,
              pvops: path_unsafe!(cpu::read_msr_safe(0xc000_0080).unwrap_or(0)) },
        Row { op: Op::FlushTlbOneUser, label: "mmu.flush_tlb_one_user", linux: Some(Loop::PVOPS_LINUX_FLUSH_TLB_ONE_USER),
              raw: Some(raw!("invlpg [{}]", in(reg) scratch())),
              pvops: path_unsafe!(mmu::flush_tlb_one_user(scratch() as u64)) },
        Row { op: Op::StoreTr, label: "cpu.store_tr", linux: Some(Loop::PVOPS_LINUX_STORE_TR),
              raw: Some(raw!("str {}", out(reg) _)), pvops: path!(cpu::store_tr()) },
        Row { op: Op::LoadIdt, label: "cpu.load_idt", linux: Some(Loop::PVOPS_LINUX_LOAD_IDT),
              raw: Some(raw!("lidt [{}]", in(reg) idt_now())),
              pvops: path_unsafe!(cpu::load_idt(idt_now())) },
        Row { op: Op::IoDelay, label: "cpu.io_delay", linux: Some(Loop::PVOPS_LINUX_IO_DELAY),
              raw: Some(raw!("out 0x80, al", out("al") _)), pvops: path_unsafe!(cpu::io_delay()) },
        Row { op: Op::SetPte, label: "mmu.set_pte", linux: Some(Loop::PVOPS_LINUX_SET_PTE),
              raw: Some(path_unsafe!(scratch().write_volatile(1))),
              pvops: path_unsafe!(mmu::set_pte(scratch(), 1)) },
        Row { op: Op::SchedClock, label: "timer.sched_clock", linux: Some(Loop::PVOPS_LINUX_SCHED_CLOCK),
              raw: Some(path!(rdtsc_ordered())), pvops: path!(timer::sched_clock()) },
        Row { op: Op::TscKhz, label: "timer.tsc_khz", linux: Some(Loop::PVOPS_LINUX_TSC_KHZ), raw: None,
              pvops: path!(timer::tsc_khz()) },
        Row { op: Op::StealClock, label: "timer.steal_clock", linux: None, raw: None,
              pvops: path!(timer::steal_clock(0)) },
        Row { op: Op::WriteCr3, label: "mmu.write_cr3", linux: Some(Loop::PVOPS_LINUX_WRITE_CR3),
              raw: Some(raw!("mov {0}, cr3", "mov cr3, {0}", out(reg) _)),
              pvops: path_unsafe!(mmu::write_cr3(mmu::read_cr3())) },
        Row { op: Op::FlushTlbUser, label: "mmu.flush_tlb_user", linux: None,
              raw: Some(raw!("mov {0}, cr3", "mov cr3, {0}", out(reg) _)),
              pvops: path_unsafe!(mmu::flush_tlb_user()) },
        Row { op: Op::LazyModeEnter, label: "mmu.lazy_mode_enter+leave", linux: None, raw: None,
              pvops: path_unsafe!({ mmu::lazy_mode_enter(); mmu::lazy_mode_leave() }) },
        Row { op: Op::Hypercall, label: "cpu.hypercall", linux: Some(Loop::PVOPS_LINUX_KVM_HYPERCALL),
              raw: Some(path_unsafe!(pvops_backends::kvm::raw_hypercall1(
                  VMMCALL.load(core::sync::atomic::Ordering::Relaxed), hc().0, hc().1))),
              pvops: path_unsafe!(cpu::hypercall(hc().0, hc().1, 0, 0, 0)) },
        Row { op: Op::AllocPt, label: "mmu.alloc_pt", linux: None, raw: None,
              pvops: path_unsafe!(mmu::alloc_pt(1, 1)) },
    ];
    rows
}

/// Module load costs, measured at init (TSC cycles).
#[derive(Clone, Copy, Default)]
pub(crate) struct LoadCost {
    /// The hypervisor scan.
    pub(crate) detect: u64,
    /// Selecting and starting the backend.
    pub(crate) select: u64,
    /// Patching every site (stop_machine and the text alias included).
    pub(crate) patch: u64,
    /// The sites patched.
    pub(crate) sites: usize,
}

/// What the benchmark needs from the loaded module.
pub(crate) struct State {
    /// The running backend.
    pub(crate) backend: &'static dyn Backend,
    /// Its table, as installed.
    pub(crate) ops: pvops::BackendOps,
    /// What loading cost.
    pub(crate) load: LoadCost,
    /// The kernel's TSC frequency (0: unknown).
    pub(crate) tsc_khz: u64,
}

/// Where [`State`] is published for the benchmark.
struct Slot(core::cell::UnsafeCell<Option<State>>);
// SAFETY: written by init before the debugfs file exists and by exit after it is gone; read by
// pvops_bench_run, which shim.c serialises with a mutex and debugfs keeps within the file's life.
unsafe impl Sync for Slot {}
/// The module's state while the debugfs file exists.
static STATE: Slot = Slot(core::cell::UnsafeCell::new(None));

/// Publish (or, with `None`, withdraw) the module's state.
///
/// # Safety
///
/// No benchmark may be running: call before creating the debugfs file, or after removing it.
pub(crate) unsafe fn set_state(s: Option<State>) {
    // SAFETY: forwarded contract.
    unsafe { *STATE.0.get() = s };
}

/// A JSON document in kernel memory.
struct Json(KVec<u8>);

impl Write for Json {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        self.0
            .extend_from_slice(s.as_bytes(), GFP_KERNEL)
            .map_err(|_| core::fmt::Error)
    }
}

/// One path's statistics as a JSON member, `,"name":{...}`.
fn stats_json(j: &mut Json, name: &str, s: Stats) -> core::fmt::Result {
    write!(
        j,
        ",\"{name}\":{{\"median\":{},\"p10\":{},\"p90\":{}}}",
        s.median, s.p10, s.p90
    )
}

/// Run the benchmark and hand the JSON to the shim. Called from the debugfs write.
#[no_mangle]
pub(crate) extern "C" fn pvops_bench_run() -> c_int {
    // SAFETY: see `Slot`.
    let Some(state) = (unsafe { &*STATE.0.get() }) else {
        return ENODEV.to_errno();
    };
    match run(state) {
        Ok(()) => 0,
        Err(e) => e.to_errno(),
    }
}

/// Measure every row on every path, then put the sites back as loaded and publish the JSON.
fn run(state: &State) -> Result {
    if pvops_backends::Platform::xen_pv(&KernelPlatform) {
        // The raw paths are ring-0 instructions and the MMU rows write scratch memory as if it
        // were a page table: neither is safe in a deprivileged kernel.
        pr_warn!("benchmark: not available in a Xen PV domain (its raw paths need ring 0)\n");
        return Err(Error::from_errno(-95)); // EOPNOTSUPP
    }
    let normal = Patcher::new(module_sites(), PV_OPS.addr(), &state.ops).map_err(|_| EINVAL)?;
    // the inline replacements withheld: every site a direct call
    let calls = state.ops.calls_only();
    let direct_only = Patcher::new(module_sites(), PV_OPS.addr(), &calls).map_err(|_| EINVAL)?;
    let mut rows = rows();
    let kvm = state.backend.id() == <pvops_backends::kvm::Kvm as pvops_backends::Driver>::ID;
    match state.backend.null_hypercall() {
        Some(h) => {
            HYPERCALL[0].store(h.args[0], core::sync::atomic::Ordering::Relaxed);
            HYPERCALL[1].store(h.args[1], core::sync::atomic::Ordering::Relaxed);
            // SAFETY: tells linux_peer.c which hypercall to loop on (KVM only).
            unsafe { shim::pvops_linux_set_hypercall(h.args[0], h.args[1]) };
        }
        None => {
            // native: the slot answers -ENOSYS without a hypervisor; only the pvops path runs
        }
    }
    // the vendor alone: one CPUID, not the whole hypervisor scan
    VMMCALL.store(
        pvops::detect::CpuVendor::of(&raw_cpuid(0, 0)).uses_vmmcall(),
        core::sync::atomic::Ordering::Relaxed,
    );
    if !kvm {
        for row in rows.iter_mut().filter(|r| r.op == Op::Hypercall) {
            row.raw = None;
            row.linux = None;
        }
    }
    let mut res: KVec<[Option<Stats>; 6]> = KVec::with_capacity(rows.len(), GFP_KERNEL)?;
    for _ in 0..rows.len() {
        res.push([None; 6], GFP_KERNEL)?;
    }
    const RAW: usize = 0;
    const INLINE: usize = 1;
    const DIRECT: usize = 2;
    const INDIRECT: usize = 3;
    const LINUX: usize = 4;
    const LINUX_IND: usize = 5;

    // SAFETY: SIDT only stores; no path runs yet.
    unsafe { core::arch::asm!("sidt [{}]", in(reg) core::ptr::addr_of_mut!(IDT_NOW)) };
    // the same loop as every path (a register sink per iteration), doing nothing else
    let rust_base = baseline(&path!(0u64));
    let c_base = baseline(&linux(Loop::PVOPS_LINUX_EMPTY));

    // 1. as loaded: sites patched for the backend
    normal.verify(&ReadOnlyText, true).map_err(|_| EIO)?;
    for (row, r) in rows.iter().zip(res.iter_mut()) {
        if let Some(raw) = row.raw {
            r[RAW] = Some(measure(&raw, rust_base));
        }
        if state.ops.inline(row.op).is_some() {
            r[INLINE] = Some(measure(&row.pvops, rust_base));
        }
        if let Some(id) = row.linux {
            r[LINUX] = Some(measure(&linux(id), c_base));
        }
        if row.op == Op::SaveFl {
            r[LINUX_IND] = Some(measure(&linux(Loop::PVOPS_LINUX_SAVE_FL_INDIRECT), c_base));
        }
    }
    // 2. unpatched
    transition(&normal, true).map_err(|_| EIO)?;
    for (row, r) in rows.iter().zip(res.iter_mut()) {
        r[INDIRECT] = Some(measure(&row.pvops, rust_base));
    }
    // 3. direct calls everywhere
    let direct = transition(&direct_only, false);
    if direct.is_ok() {
        for (row, r) in rows.iter().zip(res.iter_mut()) {
            r[DIRECT] = Some(measure(&row.pvops, rust_base));
        }
        transition(&direct_only, true).map_err(|_| EIO)?;
    }
    // 4. back to how the module was loaded
    transition(&normal, false).map_err(|_| EIO)?;
    direct.map_err(|_| EIO)?;

    let mut j = Json(KVec::new());
    let l = state.load;
    let sel = state.backend.id();
    (|| -> core::fmt::Result {
        write!(j, "{{\"backend\":\"{sel}\",\"tsc_khz\":{},\"reps\":{REPS},\"samples\":{SAMPLES},", state.tsc_khz)?;
        write!(j, "\"unit\":\"TSC cycles per 100 ops\",\"loop_baseline\":{{\"rust\":{rust_base},\"linux\":{c_base}}},")?;
        write!(
            j,
            "\"load\":{{\"detect\":{},\"select\":{},\"patch\":{},\"sites\":{},\"patch_per_site\":{}}},",
            l.detect, l.select, l.patch, l.sites, l.patch / (l.sites.max(1) as u64)
        )?;
        j.write_str("\"ops\":[")?;
        for (i, (row, r)) in rows.iter().zip(res.iter()).enumerate() {
            write!(j, "{}{{\"op\":\"{}\"", if i > 0 { "," } else { "" }, row.label)?;
            let names = ["raw", "inline", "direct", "indirect", "linux", "linux_indirect"];
            for (name, s) in names.iter().zip(r.iter()) {
                if let Some(s) = s {
                    stats_json(&mut j, name, *s)?;
                }
            }
            j.write_str("}")?;
        }
        j.write_str("]}\n")
    })()
    .map_err(|_| ENOMEM)?;
    // SAFETY: a pointer and length into `j`, which the shim copies.
    let err = unsafe { shim::pvops_shim_set_bench(j.0.as_ptr().cast(), j.0.len()) };
    if err != 0 {
        return Err(ENOMEM);
    }
    Ok(())
}
