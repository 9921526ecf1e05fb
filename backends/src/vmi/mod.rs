//! The VMI backend: VMware's Virtual Machine Interface, ported to 64 bits. The host side is an
//! option ROM full of code; the guest finds it in the option-ROM area, validates it, copies the
//! routines it needs into memory it owns and patches its call sites with them. The ABI (what
//! stays as VMI API 3.0 had it, what the 64-bit port changes) is `backends/src/VMI-64.md`; the
//! ROM this project ships is `backends/vmi-rom/vmi.S`, built by `scripts/vmi-rom`. The original
//! 32-bit ABI: shared/docs/abi-vmi.md.
//!
//! - **Detection**: physical 0xC0000–0xDFFFF in 2 KiB steps through the direct map
//!   ([`rom::probe`], [`rom::scan`]); the first image with `55 AA` and `"cVmi"` is the ROM. It is then
//!   validated ([`rom::Rom::parse`]): header length, API version 3.1, the declared length, the byte
//!   checksum (which Linux skipped), the license, the PCI data structure and every relocation
//!   entry. A ROM that fails is refused with the reason and the backend is absent.
//! - **The arena**: ROM memory is never executed (the direct map is NX). the backend's start lays out, in
//!   a 2 KiB arena reserved in this image's own `.text`, one function per routine the ROM
//!   provides: `endbr64`, the ROM's body byte for byte, and this image's own return (a copy of
//!   [`arena::return_template`]'s, as the kernel patched it at load: `ret`, or a jump to the return
//!   thunk), then writes it through
//!   [`crate::Platform::write_code`]. Table slots point into the arena; call sites get the body inline
//!   when the ROM flags it inlinable and it fits, a direct call into the arena otherwise.
//!   Its stop fills the arena with `int3` again.
//! - **Routes**: ops whose signature is the call's own take the arena function directly
//!   (CPUID, CRs, MSRs, descriptor tables, interrupt flag, halt, page-table store, `invlpg`,
//!   `io_delay`, AllocatePage/ReleasePage); ops that pass a fixed argument (FlushTLB flags,
//!   SetLazyMode mode, GetCycleCounter counter) go through small wrappers; a call the ROM marks
//!   NONE keeps the native op, as VMI specified. `read_msr_safe`/`write_msr_safe` (exception
//!   tables), `halt` (VMI has no plain halt), `set_next_event` and `cpu.hypercall` are native.
//! - **Time**: `sched_clock` is GetCycleCounter(AVAILABLE) scaled by the TSC rate; a static ROM
//!   cannot know that rate (GetCycleFrequency is NONE in the project's ROM), so the rate is the
//!   kernel's `tsc_khz`, or calibrated at load, as the native backend does.

pub mod arena;
pub mod rom;

use core::fmt;
use core::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, AtomicUsize, Ordering};

use pvops::ops::{BackendOps, Clobbers, Impl, Inline, Op, MAX_SITE_LEN};
use pvops::{Backend, BackendId, Detection};

use crate::describe::Describe;
use crate::time::TscScale;
use crate::{native, Driver, Platform};
use arena::{ArenaFull, Layout, ENDBR64};
pub use rom::{call, ProbeError, RelocType, Rom, RomError};
use rom::{FLAG_INLINE, VMI_CYCLES_AVAILABLE, VMI_CYCLES_STOLEN, VMI_FLUSH_GLOBAL, VMI_FLUSH_TLB};
use rom::{VMI_LAZY_MMU, VMI_LAZY_NONE};

/// Why the backend did not start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmiError {
    /// The routines do not fit the arena.
    ArenaFull,
    /// The platform cannot write this image's text.
    NoWriter,
    /// VMI_Init returned non-zero.
    InitFailed(u64),
    /// The ROM says a call this backend uses must be reached by a jump.
    Jump(u16),
    /// A routine changes registers its op's convention must keep.
    Clobbers(u16),
}

impl From<ArenaFull> for VmiError {
    fn from(_: ArenaFull) -> VmiError {
        VmiError::ArenaFull
    }
}

impl fmt::Display for VmiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmiError::ArenaFull => f.write_str("the ROM's routines do not fit the arena"),
            VmiError::NoWriter => f.write_str("cannot write the arena"),
            VmiError::InitFailed(rc) => write!(f, "VMI_Init returned {rc:#x}"),
            VmiError::Jump(c) => write!(f, "call {c} is JUMP-relocated, not callable"),
            VmiError::Clobbers(c) => {
                write!(f, "call {c} changes registers its op must keep")
            }
        }
    }
}

/// How the backend serves an op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    /// The arena function of the call is the op.
    Direct(u16),
    /// A wrapper calls the arena function (a fixed argument, or time scaling).
    Wrapped(u16),
    /// The native op.
    Native,
}

fn route(op: Op) -> Route {
    use call::*;
    match op {
        Op::Cpuid => Route::Direct(CPUID),
        Op::ReadCr0 => Route::Direct(GET_CR0),
        Op::WriteCr0 => Route::Direct(SET_CR0),
        Op::ReadCr4 => Route::Direct(GET_CR4),
        Op::WriteCr4 => Route::Direct(SET_CR4),
        Op::ReadMsr => Route::Direct(RDMSR),
        Op::WriteMsr => Route::Direct(WRMSR),
        Op::Wbinvd => Route::Direct(WBINVD),
        Op::LoadIdt => Route::Direct(SET_IDT),
        Op::LoadGdt => Route::Direct(SET_GDT),
        Op::StoreTr => Route::Direct(GET_TR),
        Op::IoDelay => Route::Direct(IO_DELAY),
        Op::SaveFl => Route::Direct(GET_INTERRUPT_MASK),
        Op::RestoreFl => Route::Direct(SET_INTERRUPT_MASK),
        Op::IrqDisable => Route::Direct(DISABLE_INTERRUPTS),
        Op::IrqEnable => Route::Direct(ENABLE_INTERRUPTS),
        Op::SafeHalt => Route::Direct(HALT),
        Op::ReadCr2 => Route::Direct(GET_CR2),
        Op::WriteCr2 => Route::Direct(SET_CR2),
        Op::ReadCr3 => Route::Direct(GET_CR3),
        Op::WriteCr3 => Route::Direct(SET_CR3),
        Op::FlushTlbOneUser => Route::Direct(INVAL_PAGE),
        Op::SetPte | Op::SetPmd | Op::SetPud => Route::Direct(SET_PXE),
        Op::AllocPt => Route::Direct(ALLOCATE_PAGE),
        Op::ReleasePt => Route::Direct(RELEASE_PAGE),
        Op::FlushTlbUser | Op::FlushTlbKernel => Route::Wrapped(FLUSH_TLB),
        Op::LazyModeEnter | Op::LazyModeLeave => Route::Wrapped(SET_LAZY_MODE),
        Op::SchedClock | Op::StealClock => Route::Wrapped(GET_CYCLE_COUNTER),
        Op::TscKhz => Route::Wrapped(GET_CYCLE_FREQUENCY),
        Op::WallClock => Route::Wrapped(GET_WALLCLOCK_TIME),
        Op::ReadMsrSafe | Op::WriteMsrSafe | Op::Halt | Op::SetNextEvent | Op::Hypercall => {
            Route::Native
        }
        // VMI has no call for them: a VMI guest's page-table entries hold its own physical
        // frames (the hypervisor shadows or nests them), so an entry is its value
        Op::PteVal
        | Op::MakePte
        | Op::PmdVal
        | Op::MakePmd
        | Op::PudVal
        | Op::MakePud
        | Op::P4dVal
        | Op::MakeP4d
        | Op::PgdVal
        | Op::MakePgd => Route::Native,
        // nor for the lock ops: a VMI guest's locks are bare hardware's; nor for taking over
        // another vCPU's TLB flush, nor for IPIs (its local APIC is the hardware's model)
        Op::SendIpi
        | Op::QueuedSpinUnlock
        | Op::LockWait
        | Op::LockKick
        | Op::VcpuIsPreempted
        | Op::FlushTlbDefer => Route::Native,
    }
}

/// The wrapped ops that return nothing (a NOP call can stand for them).
fn returns_nothing(op: Op) -> bool {
    matches!(
        op,
        Op::FlushTlbUser | Op::FlushTlbKernel | Op::LazyModeEnter | Op::LazyModeLeave
    )
}

/// What the backend copied from the ROM, per call number. Written by [`Driver::start`] and
/// [`Driver::stop`] only, while no op of the backend is installed.
struct Calls {
    /// Arena address of the call's function (0: NONE, or not copied).
    entry: [AtomicUsize; call::COUNT],
    kind: [AtomicU8; call::COUNT],
    flags: [AtomicU8; call::COUNT],
    len: [AtomicU16; call::COUNT],
    clobbers: [AtomicU16; call::COUNT],
}

static CALLS: Calls = Calls {
    entry: [const { AtomicUsize::new(0) }; call::COUNT],
    kind: [const { AtomicU8::new(0) }; call::COUNT],
    flags: [const { AtomicU8::new(0) }; call::COUNT],
    len: [const { AtomicU16::new(0) }; call::COUNT],
    clobbers: [const { AtomicU16::new(0) }; call::COUNT],
};

/// Where the ROM was and what the TSC runs at.
static ROM_PA: AtomicU64 = AtomicU64::new(0);
static API: AtomicU16 = AtomicU16::new(0);
static TSC: TscScale = TscScale::new();
static COPIED: AtomicUsize = AtomicUsize::new(0);
static INLINABLE: AtomicUsize = AtomicUsize::new(0);

/// The report text (`describe`), formatted at start.
static DESCRIBE: Describe = Describe::new();

fn kind_of(c: u16) -> RelocType {
    match CALLS
        .kind
        .get(usize::from(c))
        .map(|k| k.load(Ordering::Relaxed))
    {
        Some(1) => RelocType::Call,
        Some(2) => RelocType::Jump,
        Some(3) => RelocType::Nop,
        _ => RelocType::None,
    }
}

fn entry_of(c: u16) -> usize {
    CALLS
        .entry
        .get(usize::from(c))
        .map_or(0, |e| e.load(Ordering::Relaxed))
}

/// Whether the backend has a function for `c` (CALL or NOP, copied).
fn provided(c: u16) -> bool {
    entry_of(c) != 0
}

/// Call the arena function of `c` with one argument (C convention); 0 if there is none.
fn call1(c: u16, arg: u64) -> u64 {
    let e = entry_of(c);
    if e == 0 {
        return 0;
    }
    // SAFETY: `e` is the arena copy of the ROM's routine for `c`, framed by `start` as a
    // function (endbr64, body, return); the 64-bit VMI ABI makes each such routine callable
    // with the C convention, one argument in RDI and its result in RAX (VMI-64.md).
    let f: unsafe extern "C" fn(u64) -> u64 = unsafe { core::mem::transmute(e) };
    // SAFETY: the routine's own contract; the wrappers below only pass what VMI-64.md lists.
    unsafe { f(arg) }
}

extern "C" fn flush_tlb_user_c() {
    call1(call::FLUSH_TLB, VMI_FLUSH_TLB);
}
pvops::callee_save_thunk!(fn flush_tlb_user() => flush_tlb_user_c);
extern "C" fn flush_tlb_kernel() {
    call1(call::FLUSH_TLB, VMI_FLUSH_TLB | VMI_FLUSH_GLOBAL);
}
extern "C" fn lazy_mode_enter() {
    call1(call::SET_LAZY_MODE, VMI_LAZY_MMU);
}
extern "C" fn lazy_mode_leave() {
    call1(call::SET_LAZY_MODE, VMI_LAZY_NONE);
}

/// `sched_clock`: GetCycleCounter(AVAILABLE) in ns.
pub extern "C" fn sched_clock() -> u64 {
    crate::time::handed_out(TSC.ns(call1(call::GET_CYCLE_COUNTER, VMI_CYCLES_AVAILABLE)))
}

/// `steal_clock`: GetCycleCounter(STOLEN) of the calling vCPU in ns (VMI reads no other
/// vCPU's counter).
extern "C" fn steal_clock(_cpu: u32) -> u64 {
    TSC.ns(call1(call::GET_CYCLE_COUNTER, VMI_CYCLES_STOLEN))
}

extern "C" fn tsc_khz() -> u64 {
    TSC.khz()
}

extern "C" fn wall_clock() -> u64 {
    call1(call::GET_WALLCLOCK_TIME, 0)
}

/// Lay the ROM's routines out; returns the VMI_Init function's address (if any).
fn lay_out(rom: &Rom<'_>, layout: &mut Layout) -> Result<Option<usize>, VmiError> {
    let init = rom.init();
    let init_at = if init.is_empty() {
        None
    } else {
        Some(layout.place(init)?)
    };
    for r in rom.relocs() {
        let i = usize::from(r.call);
        let kind = match r.kind {
            RelocType::None => 0,
            RelocType::Call => 1,
            RelocType::Jump => 2,
            RelocType::Nop => 3,
        };
        CALLS.kind[i].store(kind, Ordering::Relaxed);
        CALLS.flags[i].store(r.flags, Ordering::Relaxed);
        CALLS.len[i].store(r.len, Ordering::Relaxed);
        CALLS.clobbers[i].store(r.clobbers.bits(), Ordering::Relaxed);
        if matches!(r.kind, RelocType::Call | RelocType::Nop) {
            let at = layout.place(rom.body(&r))?;
            CALLS.entry[i].store(at, Ordering::Relaxed);
        }
    }
    Ok(init_at)
}

/// Check every op the backend routes to the ROM against the entry's type and clobbers.
fn check_routes() -> Result<(), VmiError> {
    for &op in Op::ALL {
        let (Route::Direct(c) | Route::Wrapped(c)) = route(op) else {
            continue;
        };
        match kind_of(c) {
            RelocType::Jump => return Err(VmiError::Jump(c)),
            RelocType::Call if matches!(route(op), Route::Direct(_)) => {
                let clob = Clobbers::from_bits_truncate(
                    CALLS.clobbers[usize::from(c)].load(Ordering::Relaxed),
                );
                if !op.convention().clobbers().contains(clob) {
                    return Err(VmiError::Clobbers(c));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn forget() {
    for i in 0..call::COUNT {
        CALLS.entry[i].store(0, Ordering::Relaxed);
        CALLS.kind[i].store(0, Ordering::Relaxed);
        CALLS.flags[i].store(0, Ordering::Relaxed);
        CALLS.len[i].store(0, Ordering::Relaxed);
        CALLS.clobbers[i].store(0, Ordering::Relaxed);
    }
    COPIED.store(0, Ordering::Relaxed);
    INLINABLE.store(0, Ordering::Relaxed);
}

/// A ROM found in the option-ROM area (no CPUID base: a platform hook).
impl crate::Probed for (u64, Rom<'static>) {}

/// The VMI backend.
#[derive(Debug)]
pub struct Vmi;

/// The one instance.
pub static VMI: Vmi = Vmi;

impl Driver for Vmi {
    const ID: BackendId = BackendId::new("vmi");
    type Found = (u64, Rom<'static>);
    type Absent = ProbeError;
    type Error = VmiError;

    /// A valid VMI ROM in the option-ROM area (a refused one counts as absent).
    fn probe(_: &Detection, platform: &dyn Platform) -> Result<(u64, Rom<'static>), ProbeError> {
        rom::probe(platform)
    }

    fn refused(why: &ProbeError) -> bool {
        why.refused()
    }

    /// Validate what the probe found, copy its routines into the arena, run VMI_Init, and hand
    /// out the backend.
    ///
    /// Must not run concurrently with itself, [`Driver::stop`] or any op of this backend (the module
    /// calls it at load, before installing the table).
    fn start(
        (pa, rom): (u64, Rom<'static>),
        _: &Detection,
        platform: &dyn Platform,
    ) -> Result<&'static Vmi, VmiError> {
        forget();
        // SAFETY: start and stop are exclusive and the backend's ops are not installed
        // (contract above).
        let mut layout = unsafe { Layout::new() };
        let init_at = match lay_out(&rom, &mut layout).and_then(|i| check_routes().map(|()| i)) {
            Ok(i) => i,
            Err(e) => {
                // nothing was written
                forget();
                return Err(e);
            }
        };
        let used = layout.used();
        if !layout.write(platform) {
            forget();
            return Err(VmiError::NoWriter);
        }
        if let Some(at) = init_at {
            // SAFETY: the arena now holds VMI_Init framed as a function (written just above);
            // VMI_Init takes nothing and returns 0 in RAX when the ROM is ready (VMI-64.md).
            let f: unsafe extern "C" fn() -> u64 = unsafe { core::mem::transmute(at) };
            // SAFETY: as above.
            let rc = unsafe { f() };
            if rc != 0 {
                arena::wipe(platform);
                forget();
                return Err(VmiError::InitFailed(rc));
            }
        }

        // Time: GetCycleFrequency if the ROM has it, else the platform's TSC rate (native's way).
        let mut khz = if provided(call::GET_CYCLE_FREQUENCY) {
            call1(call::GET_CYCLE_FREQUENCY, 0) / 1000
        } else {
            0
        };
        let khz_source = if khz != 0 {
            native::set_tsc_rate(khz);
            "GetCycleFrequency"
        } else {
            khz = native::set_tsc_khz(platform);
            if platform.tsc_khz() != 0 {
                "the kernel's tsc_khz"
            } else {
                "calibrated at load"
            }
        };
        TSC.set(khz);
        ROM_PA.store(pa, Ordering::Relaxed);
        let (maj, min) = rom.api();
        API.store(u16::from(maj) << 8 | u16::from(min), Ordering::Relaxed);
        let copied = (0..call::COUNT as u16).filter(|c| provided(*c)).count();
        let inlinable = (0..call::COUNT as u16)
            .filter(|c| CALLS.flags[usize::from(*c)].load(Ordering::Relaxed) & FLAG_INLINE != 0)
            .count();
        COPIED.store(copied, Ordering::Relaxed);
        INLINABLE.store(inlinable, Ordering::Relaxed);

        // SAFETY: exclusive (contract above); `describe` reads it only after start returned.
        unsafe {
            DESCRIBE.set(format_args!(
                "ROM at {pa:#x} API {maj}.{min} ({} bytes): {copied} calls in the arena ({inlinable} inlinable, {used} bytes, returning by {}); TSC: {khz_source}",
                rom.bytes().len(),
                if arena::returns_by_thunk() { "the return thunk" } else { "ret" }
            ));
        }
        Ok(&VMI)
    }

    /// Release what [`Driver::start`] set up: the arena back to `int3`, the copied state forgotten. Same
    /// exclusion as [`Driver::start`]; the table must no longer hold the backend's functions.
    fn stop(platform: &dyn Platform) -> &'static str {
        let wiped = arena::wipe(platform);
        forget();
        if wiped {
            "ROM routines removed from the arena"
        } else {
            "arena NOT wiped (text not writable)"
        }
    }
}

/// The inline bytes of `c`'s arena copy, where the ROM flags it inlinable and it fits a site.
fn inline_body(c: u16) -> Option<Inline> {
    let i = usize::from(c);
    let len = usize::from(CALLS.len[i].load(Ordering::Relaxed));
    let entry = entry_of(c);
    if CALLS.flags[i].load(Ordering::Relaxed) & FLAG_INLINE == 0 || len > MAX_SITE_LEN || entry == 0
    {
        return None;
    }
    // SAFETY: the arena is this image's text ('static); `entry` + 4 is the body `start` copied
    // there, `len` bytes, unchanged until stop, which runs after every site was reverted.
    let bytes = unsafe { core::slice::from_raw_parts((entry + ENDBR64.len()) as *const u8, len) };
    Some(Inline {
        bytes,
        clobbers: Clobbers::from_bits_truncate(CALLS.clobbers[i].load(Ordering::Relaxed)),
    })
}

impl Backend for Vmi {
    fn id(&self) -> BackendId {
        Self::ID
    }

    fn describe(&self) -> &'static str {
        DESCRIBE.get()
    }

    fn ops(&self) -> BackendOps {
        let mut ops = native::OPS;
        for &op in Op::ALL {
            let (Route::Direct(c) | Route::Wrapped(c)) = route(op) else {
                continue; // native
            };
            // A call the ROM does not provide (NONE) or that must be jumped to keeps the
            // native op, as VMI specified.
            let nop = kind_of(c) == RelocType::Nop;
            match route(op) {
                Route::Direct(c) if provided(c) => {
                    let inline = if nop {
                        Some(Inline::NOTHING)
                    } else {
                        inline_body(c)
                    };
                    // SAFETY: the arena copy of the ROM's routine for `c`, framed as a function
                    // by `start`, which checked (check_routes) that it changes no register
                    // outside the op's convention; its inline bytes are the same body.
                    unsafe { ops.set_raw(op, entry_of(c), inline) };
                }
                // "does nothing here": the site becomes NOPs (ops without a result only)
                Route::Wrapped(c) if nop && returns_nothing(op) => {
                    // SAFETY: the arena copy of a NOP call: endbr64 and a return.
                    unsafe { ops.set_raw(op, entry_of(c), Some(Inline::NOTHING)) };
                }
                Route::Wrapped(c) if provided(c) => match op {
                    Op::FlushTlbUser => ops.mmu.flush_tlb_user = Impl::call(flush_tlb_user),
                    Op::FlushTlbKernel => ops.mmu.flush_tlb_kernel = Impl::call(flush_tlb_kernel),
                    Op::LazyModeEnter => ops.mmu.lazy_mode_enter = Impl::call(lazy_mode_enter),
                    Op::LazyModeLeave => ops.mmu.lazy_mode_leave = Impl::call(lazy_mode_leave),
                    Op::SchedClock => ops.timer.sched_clock = Impl::call(sched_clock),
                    Op::StealClock => ops.timer.steal_clock = Impl::call(steal_clock),
                    Op::WallClock => ops.timer.wall_clock = Impl::call(wall_clock),
                    _ => {}
                },
                _ => {}
            }
        }
        // tsc_khz: GetCycleFrequency's answer or the platform's, read once at start
        ops.timer.tsc_khz = Impl::call(tsc_khz);
        ops
    }

    fn serves_kernel(&self, op: Op) -> Result<(), &'static str> {
        // What VMI was for: the kernel's own sites call (or inline) the ROM's routines, which
        // start checked against each op's convention (check_routes) and which the self-test
        // checks against the native operation; ops the ROM leaves NONE are native's. Not the
        // time ops: the kernel's TSC clock stays its own.
        match op.group() {
            pvops::ops::Group::Timer => Err("the kernel's own TSC clock stays"),
            _ if op == Op::Hypercall => Err("this backend's own"),
            _ => Ok(()),
        }
    }
}

/// The ROM in use: physical address and API version (major, minor); `None` before start.
pub fn rom_in_use() -> Option<(u64, (u8, u8))> {
    let pa = ROM_PA.load(Ordering::Relaxed);
    let api = API.load(Ordering::Relaxed);
    (pa != 0).then_some((pa, ((api >> 8) as u8, api as u8)))
}

/// Whether `op` is served by a copy of a ROM routine (directly or through a wrapper).
pub fn from_rom(op: Op) -> bool {
    match route(op) {
        Route::Direct(c) | Route::Wrapped(c) => provided(c),
        Route::Native => false,
    }
}

/// The arena address of `c`'s function (0: none), for tests and the report.
pub fn entry(c: u16) -> usize {
    entry_of(c)
}
