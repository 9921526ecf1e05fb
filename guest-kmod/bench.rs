// SPDX-License-Identifier: GPL-2.0

//! The in-guest benchmark: every op the module can run safely in ring 0, every path that
//! exists for it, in TSC cycles per op.
//!
//! One harness measures every path: linux_peer.c's `BENCH_LOOP`, one C loop shape for the raw
//! instruction, the pvops call site and Linux's own path, so identical bytes cost the same.
//! The pvops sites there are emitted from C exactly as `pv_site!` emits them and call through
//! [`BENCH_PV_OPS`], a copy of the installed table; this file patches them with the pvops
//! engine ([`Patcher`], the same stop_machine writer as the module's own sites) into each state
//! measured:
//!
//! - `raw`: the bare instruction, inline (the physical limit);
//! - `inline`: the sites patched for the backend, where the engine inlined every site of the row;
//! - `direct`: the sites patched with the inline replacements withheld (direct calls);
//! - `indirect`: the sites unpatched (indirect calls through the table);
//! - `linux`: Linux's own path (a pv_ops site the kernel patched, or native code where Linux
//!   has no pv op: the row says which); `linux_indirect`: an indirect call through Linux's own
//!   `pv_ops` slot.
//!
//! Each path: `REPS` operations per loop (`REPS_SLOW` for a path whose operation costs more than
//! `SLOW` cycles, a VM exit: the nested rigs would otherwise take minutes), interrupts off, a
//! warm-up loop, `SAMPLES` loops; the
//! run's value is the median minus the empty loop's median (the same macro with no body, measured
//! in the same run), never clamped. Every path is measured `RUNS` times in one boot (state by
//! state: run `i` of the patched paths, then of the direct, then of the indirect); the JSON keeps
//! every run's value. The resolution is the empty loop's spread (10th to 90th
//! percentile). Integers only: TSC cycles per 100 operations.

use core::cell::UnsafeCell;
use core::ffi::{c_int, CStr};
use core::fmt::Write;

use kernel::prelude::*;
use pvops::arch::raw_cpuid;
use pvops::ops::{Op, PvOps};
use pvops::patch::Action;
use pvops::site::SiteRecord;
use pvops::{Backend, Patcher, SiteTable};

use crate::platform::KernelPlatform;
use crate::shim;
use crate::shim::pvops_linux_loop as Loop;
use crate::text::{transition, ReadOnlyText};

/// Operations per timed loop.
const REPS: u32 = 200;
/// Operations per timed loop for a slow path.
const REPS_SLOW: u32 = 20;
/// TSC cycles per operation above which a path is slow (probe loops of `REPS_SLOW` decide).
const SLOW: u64 = 10_000;
/// The same in nanoseconds of the kernel's clock: in a nested guest the TSC alone may not show
/// what a path costs in time.
const SLOW_NS: u64 = 4_000;
/// Timed loops per path and run (after one warm-up loop).
const SAMPLES: usize = 21;
/// Runs of the whole table.
const RUNS: usize = 5;

/// The table the benchmark's C call sites call through (linux_peer.c names it
/// `pvops_bench_pv_ops`): C cannot name the mangled `PV_OPS`, so `run` copies the installed
/// table here before any of those sites runs.
#[repr(transparent)]
pub(crate) struct BenchTable(UnsafeCell<PvOps>);

// SAFETY: written only by `run`, under the bench mutex, while no benchmark site runs; the C sites
// read pointer-sized slots.
unsafe impl Sync for BenchTable {}

/// See [`BenchTable`].
#[export_name = "pvops_bench_pv_ops"]
pub(crate) static BENCH_PV_OPS: BenchTable = BenchTable(UnsafeCell::new(PvOps::UNFILLED));

/// Checks, at compile time, every constant linux_peer.c's sites record (shim.h,
/// `enum pvops_linux_abi`) against the ops table; [`abi_matches`] asks C for its view too.
macro_rules! abi {
    ($($c:ident => $op:ident),* $(,)?) => {
        kernel::macros::paste! {
            const _: () = {
                assert!(shim::pvops_linux_abi_PVOPS_ABI_SLOT_SIZE as usize == core::mem::size_of::<usize>());
                assert!(shim::pvops_linux_abi_PVOPS_ABI_INDIRECT_CALL_LEN == pvops::ops::INDIRECT_CALL_LEN as u32);
                assert!(shim::pvops_linux_abi_PVOPS_ABI_CLOB_CALLEE_SAVE
                    == pvops::ops::Convention::CalleeSave.clobbers().bits() as u32);
                assert!(shim::pvops_linux_abi_PVOPS_ABI_CLOB_C == pvops::ops::Convention::C.clobbers().bits() as u32);
                $(
                    assert!(shim::[<pvops_linux_abi_PVOPS_OP_ $c>] == Op::$op as u32);
                    assert!(shim::[<pvops_linux_abi_PVOPS_LEN_ $c>] == Op::$op.site_len() as u32);
                    assert!(shim::[<pvops_linux_abi_PVOPS_CLOB_ $c>] == Op::$op.convention().clobbers().bits() as u32);
                    assert!(Op::$op.slot() == Op::$op as usize * core::mem::size_of::<usize>());
                )*
            };

            /// Whether the C object was compiled with the constants checked above.
            fn abi_matches() -> bool {
                // SAFETY: returns its argument.
                let c = |k| unsafe { shim::pvops_linux_abi(k) };
                true $(&& c(shim::[<pvops_linux_abi_PVOPS_OP_ $c>]) == Op::$op as u32
                    && c(shim::[<pvops_linux_abi_PVOPS_LEN_ $c>]) == u32::from(Op::$op.site_len()))*
            }
        }
    };
}

abi! {
    CPUID => Cpuid, READ_CR0 => ReadCr0, READ_CR4 => ReadCr4, READ_MSR => ReadMsr,
    READ_MSR_SAFE => ReadMsrSafe, LOAD_IDT => LoadIdt, STORE_TR => StoreTr, IO_DELAY => IoDelay,
    HYPERCALL => Hypercall, SAVE_FL => SaveFl, RESTORE_FL => RestoreFl, IRQ_DISABLE => IrqDisable,
    IRQ_ENABLE => IrqEnable, READ_CR2 => ReadCr2, WRITE_CR2 => WriteCr2, READ_CR3 => ReadCr3,
    WRITE_CR3 => WriteCr3, FLUSH_TLB_USER => FlushTlbUser, FLUSH_TLB_ONE_USER => FlushTlbOneUser,
    SET_PTE => SetPte, ALLOC_PT => AllocPt, LAZY_MODE_ENTER => LazyModeEnter,
    LAZY_MODE_LEAVE => LazyModeLeave, SCHED_CLOCK => SchedClock, STEAL_CLOCK => StealClock,
    TSC_KHZ => TscKhz,
}

/// The benchmark's call sites: the records linux_peer.c put in `.pvops_bench_sites`.
fn bench_sites() -> SiteTable {
    let (mut start, mut end) = (0, 0);
    // SAFETY: writes the two bounds.
    unsafe { shim::pvops_linux_bench_sites(&mut start, &mut end) };
    // SAFETY: linux_peer.c brackets the section's records (subsection 1) with these two labels
    // (subsections 0 and 2), 4-aligned, and only PV_SITE writes records there.
    unsafe { SiteTable::from_bounds(start as *const SiteRecord, end as *const SiteRecord) }
}

/// Sorts a few values (core's sort pulls in panic paths objtool cannot follow).
fn insertion_sort(s: &mut [i64]) {
    for i in 1..s.len() {
        let mut j = i;
        while j > 0 && s[j - 1] > s[j] {
            s.swap(j - 1, j);
            j -= 1;
        }
    }
}

/// `SAMPLES` loops of `path` after a warm-up, interrupts off, sorted: TSC cycles per loop.
fn samples(path: &dyn Fn(u32) -> u64, reps: u32) -> [i64; SAMPLES] {
    let mut s = [0i64; SAMPLES];
    // SAFETY: the kernel's local_irq_save; restored below.
    let flags = unsafe { shim::pvops_shim_irq_save() };
    path(reps); // warm-up
    for v in s.iter_mut() {
        *v = path(reps) as i64;
    }
    // SAFETY: restores the flags saved above.
    unsafe { shim::pvops_shim_irq_restore(flags) };
    insertion_sort(&mut s);
    s
}

/// Cycles per loop of `reps` as cycles per 100 operations.
fn per100(cycles: i64, reps: u32) -> i64 {
    cycles * 100 / i64::from(reps)
}

/// How many operations a loop of this path runs: the fastest of three probe loops of
/// `REPS_SLOW`, interrupts off (the first run of fresh code costs more under TCG: translation).
fn reps_for(row: u32, path: Loop) -> u32 {
    // SAFETY: the kernel's local_irq_save; restored below.
    let flags = unsafe { shim::pvops_shim_irq_save() };
    // SAFETY: reads the kernel's monotonic clock.
    let t0 = unsafe { shim::pvops_shim_ktime_ns() };
    // SAFETY: runs one of linux_peer.c's loops, interrupts off.
    let c = (0..3)
        .map(|_| unsafe { shim::pvops_linux_run(row, path, REPS_SLOW) })
        .min()
        .unwrap_or(0);
    // SAFETY: as above.
    let ns = unsafe { shim::pvops_shim_ktime_ns() }.wrapping_sub(t0) / u64::from(3 * REPS_SLOW);
    // SAFETY: restores the flags saved above.
    unsafe { shim::pvops_shim_irq_restore(flags) };
    if c / u64::from(REPS_SLOW) > SLOW || ns > SLOW_NS {
        REPS_SLOW
    } else {
        REPS
    }
}

/// One run's value of a path: median loop minus the empty loop's median (of the same `reps`),
/// per 100 ops.
fn measure(row: u32, path: Loop, reps: u32, base: i64) -> i64 {
    // SAFETY: runs one of linux_peer.c's loops; `samples` turned interrupts off.
    let s = samples(&|n| unsafe { shim::pvops_linux_run(row, path, n) }, reps);
    per100(s[SAMPLES / 2] - base, reps)
}

/// The paths, in JSON order.
const PATHS: [&str; 6] = [
    "raw",
    "inline",
    "direct",
    "indirect",
    "linux",
    "linux_indirect",
];
const RAW: usize = 0;
const INLINE: usize = 1;
const DIRECT: usize = 2;
const INDIRECT: usize = 3;
const LINUX: usize = 4;
const LINUX_IND: usize = 5;

/// One row's results and facts.
struct RowRes {
    /// Per path, each run's value (`None`: the path does not exist for the row).
    v: [Option<[i64; RUNS]>; 6],
    /// Per path, the operations per loop (decided in the first run).
    reps: [u32; 6],
    /// What the engine makes of the row's sites when patching for the backend.
    actions: [Option<Action>; 2],
    /// The row's sites hold the native backend's bytes once patched, which is what Linux's site
    /// holds on every kernel the benchmark runs in (not Xen PV): a control row.
    native_bytes: bool,
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
struct Slot(UnsafeCell<Option<State>>);
// SAFETY: written by init before the debugfs file exists, by a live switch under shim.c's
// bench_lock and by exit after the file is gone; read by pvops_bench_run, which shim.c
// serialises with the same lock and debugfs keeps within the file's life.
unsafe impl Sync for Slot {}
/// The module's state while the debugfs file exists.
static STATE: Slot = Slot(UnsafeCell::new(None));

/// Publish (or, with `None`, withdraw) the module's state.
///
/// # Safety
///
/// No benchmark may be running: call before creating the debugfs file, after removing it, or
/// holding shim.c's bench_lock (a live switch).
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

impl Json {
    /// A C string as a JSON string (NULL: `null`).
    fn c_str(&mut self, p: *const kernel::ffi::c_char) -> core::fmt::Result {
        if p.is_null() {
            return self.write_str("null");
        }
        // SAFETY: linux_peer.c's strings are NUL-terminated literals.
        let s = unsafe { CStr::from_ptr(p.cast()) };
        self.write_str("\"")?;
        for &b in s.to_bytes() {
            match b {
                b'"' | b'\\' => write!(self, "\\{}", b as char)?,
                0x20..=0x7e => write!(self, "{}", b as char)?,
                _ => write!(self, "\\u{:04x}", b)?,
            }
        }
        self.write_str("\"")
    }

    /// A list of integers.
    fn list(&mut self, v: &[i64]) -> core::fmt::Result {
        self.write_str("[")?;
        for (i, x) in v.iter().enumerate() {
            write!(self, "{}{x}", if i > 0 { "," } else { "" })?;
        }
        self.write_str("]")
    }
}

/// The median, lowest and highest of the runs.
fn spread(v: &[i64; RUNS]) -> (i64, i64, i64) {
    let mut s = *v;
    insertion_sort(&mut s);
    (s[RUNS / 2], s[0], s[RUNS - 1])
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

/// A patch or revert of the benchmark's sites, or EIO.
fn step(p: &Patcher<'_>, revert: bool) -> Result {
    transition(p, revert).map(|_| ()).map_err(|e| {
        pr_warn!("benchmark: patching its sites failed: {}\n", e);
        EIO
    })
}

/// Measure every row on every path `RUNS` times, leave the sites unpatched (as loaded) and
/// publish the JSON.
fn run(state: &State) -> Result {
    if pvops_backends::Platform::xen_pv(&KernelPlatform) {
        // The raw paths are ring-0 instructions and the MMU rows write scratch memory as if it
        // were a page table: neither is safe in a deprivileged kernel.
        pr_warn!("benchmark: not available in a Xen PV domain (its raw paths need ring 0)\n");
        return Err(Error::from_errno(-95)); // EOPNOTSUPP
    }
    if !abi_matches() {
        pr_warn!("benchmark: linux_peer.c was built with other site constants\n");
        return Err(EINVAL);
    }
    // SAFETY: no benchmark site runs (the bench mutex; every site is unpatched or about to be
    // patched for these same functions); the table honours the ops' contracts as PV_OPS does.
    unsafe { BENCH_PV_OPS.0.get().write_volatile(state.ops.table()) };
    let table = BENCH_PV_OPS.0.get() as usize;
    let normal = Patcher::new(bench_sites(), table, &state.ops).map_err(|_| EINVAL)?;
    // the inline replacements withheld: every site a direct call
    let calls = state.ops.calls_only();
    let direct_only = Patcher::new(bench_sites(), table, &calls).map_err(|_| EINVAL)?;
    normal.verify(&ReadOnlyText, false).map_err(|_| EIO)?;
    let native = pvops_backends::native::NATIVE.ops();

    let kvm = state.backend.id() == <pvops_backends::kvm::Kvm as pvops_backends::Driver>::ID;
    let (nr, a0) = state
        .backend
        .null_hypercall()
        .map_or((0, 0), |h| (h.args[0], h.args[1]));
    // the vendor alone: one CPUID, not the whole hypervisor scan
    let vmmcall = pvops::detect::CpuVendor::of(&raw_cpuid(0, 0)).uses_vmmcall();
    // SAFETY: records what the loops use; stores the IDT register (SIDT) for load_idt.
    unsafe { shim::pvops_linux_setup(nr, a0, c_int::from(kvm), c_int::from(vmmcall)) };

    // SAFETY: a count.
    let nrows = unsafe { shim::pvops_linux_rows() };
    let mut res: KVec<RowRes> = KVec::with_capacity(nrows as usize, GFP_KERNEL)?;
    for row in 0..nrows {
        let mut r = RowRes {
            v: [None; 6],
            reps: [0; 6],
            actions: [None; 2],
            native_bytes: true,
        };
        for (n, a) in r.actions.iter_mut().enumerate() {
            // SAFETY: a lookup.
            let addr = unsafe { shim::pvops_linux_row_site(row, n as u32) } as usize;
            if addr == 0 {
                continue;
            }
            let site = normal.sites().find(|s| s.addr == addr).ok_or(EINVAL)?;
            *a = Some(normal.patched(&site).0);
            r.native_bytes &= state.ops.inline(site.op).is_some()
                && state.ops.inline(site.op) == native.inline(site.op);
        }
        res.push(r, GFP_KERNEL)?;
    }
    let inlined = |r: &RowRes| {
        r.actions.iter().flatten().all(|a| *a == Action::Inline) && r.actions[0].is_some()
    };
    // SAFETY: a lookup.
    let has = |row: u32, l: Loop| unsafe { shim::pvops_linux_has(row, l) } != 0;

    let mut empty = [0i64; RUNS];
    let mut resolution = [0i64; RUNS];
    // The empty loop (the same macro, no body), measured before every run of every state: the
    // base subtracted from that run's values (and, in the first state, the resolution).
    let empty_loop = || {
        // SAFETY: linux_peer.c's empty loop.
        let e = samples(&|n| unsafe { shim::pvops_linux_empty(n) }, REPS);
        // SAFETY: as above.
        let slow = samples(&|n| unsafe { shim::pvops_linux_empty(n) }, REPS_SLOW);
        (e, slow[SAMPLES / 2])
    };
    let put =
        |run: usize, bases: (i64, i64), row: u32, path: usize, l: Loop, res: &mut KVec<RowRes>| {
            let r = &mut res[row as usize];
            if r.reps[path] == 0 {
                r.reps[path] = reps_for(row, l);
            }
            let reps = r.reps[path];
            let v = measure(row, l, reps, if reps == REPS { bases.0 } else { bases.1 });
            r.v[path].get_or_insert([0; RUNS])[run] = v;
        };
    // State by state (a patch or revert is a stop_machine: four in all, not four per run), each
    // state's paths RUNS times.
    // 1. patched for the backend: raw, inline (rows the engine inlined), Linux's paths
    step(&normal, false)?;
    for run in 0..RUNS {
        let (e, slow) = empty_loop();
        empty[run] = e[SAMPLES / 2];
        resolution[run] = per100(e[SAMPLES * 9 / 10] - e[SAMPLES / 10], REPS).max(1);
        let b = (e[SAMPLES / 2], slow);
        for row in 0..nrows {
            if has(row, Loop::PVOPS_LINUX_LOOP_RAW) {
                put(run, b, row, RAW, Loop::PVOPS_LINUX_LOOP_RAW, &mut res);
            }
            if inlined(&res[row as usize]) {
                put(run, b, row, INLINE, Loop::PVOPS_LINUX_LOOP_PVOPS, &mut res);
            }
            if has(row, Loop::PVOPS_LINUX_LOOP_LINUX) {
                put(run, b, row, LINUX, Loop::PVOPS_LINUX_LOOP_LINUX, &mut res);
            }
            if has(row, Loop::PVOPS_LINUX_LOOP_LINUX_INDIRECT) {
                put(
                    run,
                    b,
                    row,
                    LINUX_IND,
                    Loop::PVOPS_LINUX_LOOP_LINUX_INDIRECT,
                    &mut res,
                );
            }
        }
    }
    step(&normal, true)?;
    // 2. direct calls everywhere (re-patched with the inline replacements withheld), then
    // 3. unpatched: indirect calls through the table
    for (path, patcher) in [(DIRECT, Some(&direct_only)), (INDIRECT, None)] {
        if let Some(p) = patcher {
            step(p, false)?;
        }
        for run in 0..RUNS {
            let (e, slow) = empty_loop();
            for row in 0..nrows {
                let b = (e[SAMPLES / 2], slow);
                put(run, b, row, path, Loop::PVOPS_LINUX_LOOP_PVOPS, &mut res);
            }
        }
        if let Some(p) = patcher {
            step(p, true)?;
        }
    }
    let res_max = resolution.iter().copied().max().unwrap_or(1);

    let mut j = Json(KVec::new());
    let l = state.load;
    let sel = state.backend.id();
    (|| -> core::fmt::Result {
        write!(j, "{{\"backend\":\"{sel}\",\"tsc_khz\":{},\"reps\":{REPS},\"reps_slow\":{REPS_SLOW},\"slow_cycles\":{SLOW},\"samples\":{SAMPLES},\"runs\":{RUNS},", state.tsc_khz)?;
        write!(j, "\"unit\":\"TSC cycles per 100 ops\",\"resolution\":{res_max},\"empty_loop\":{{\"runs\":")?;
        j.list(&empty)?;
        j.write_str(",\"spread\":")?;
        j.list(&resolution)?;
        write!(j, "}},\"bench_sites\":{},", normal.sites().count())?;
        write!(
            j,
            "\"load\":{{\"detect\":{},\"select\":{},\"patch\":{},\"sites\":{},\"patch_per_site\":{}}},",
            l.detect, l.select, l.patch, l.sites, l.patch / (l.sites.max(1) as u64)
        )?;
        j.write_str("\"ops\":[")?;
        for (row, r) in res.iter().enumerate() {
            let row = row as u32;
            j.write_str(if row > 0 { ",{\"op\":" } else { "{\"op\":" })?;
            // SAFETY: lookups of linux_peer.c's row table.
            let (name, kind, note, control) = unsafe {
                (
                    shim::pvops_linux_row_name(row),
                    shim::pvops_linux_row_kind(row),
                    shim::pvops_linux_row_note(row),
                    shim::pvops_linux_row_control(row) != 0,
                )
            };
            j.c_str(name)?;
            let kind = match kind {
                shim::pvops_linux_kind_PVOPS_LINUX_KIND_PV => "pv",
                shim::pvops_linux_kind_PVOPS_LINUX_KIND_NATIVE => "native",
                shim::pvops_linux_kind_PVOPS_LINUX_KIND_NONE => "none",
                _ => "?",
            };
            write!(j, ",\"linux_kind\":\"{kind}\",\"linux_note\":")?;
            j.c_str(note)?;
            let control = control && inlined(r) && r.native_bytes && r.v[LINUX].is_some();
            write!(j, ",\"control\":{control},\"sites\":[")?;
            for (n, a) in r.actions.iter().flatten().enumerate() {
                let a = match a {
                    Action::Inline => "inline",
                    Action::DirectCall => "direct",
                    Action::Indirect => "indirect",
                };
                write!(j, "{}\"{a}\"", if n > 0 { "," } else { "" })?;
            }
            j.write_str("]")?;
            for ((name, v), reps) in PATHS.iter().zip(r.v.iter()).zip(r.reps.iter()) {
                if let Some(v) = v {
                    let (m, lo, hi) = spread(v);
                    write!(j, ",\"{name}\":{{\"median\":{m},\"min\":{lo},\"max\":{hi},\"reps\":{reps},\"runs\":")?;
                    j.list(v)?;
                    j.write_str("}")?;
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
