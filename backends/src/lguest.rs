//! The lguest backend: a faithful 64-bit port of lguest's guest ABI (lguest lived in Linux
//! 2.6.23–4.13, 32-bit only; the historical ABIs are in shared/docs/abi-lguest.md). The port
//! itself, everything a host must implement, is specified in `lguest.md` beside this file; the
//! host the project ships is `lguest-host/` (a KVM launcher, `scripts/rig lguest`), and the
//! host tests run the same backend against a modelled host (`tests/lguest.rs`).
//!
//! - **Found** by boot data, never by CPUID (lguest has no signature): the launcher sets
//!   `boot_params.hdr.hardware_subarch` = [`X86_SUBARCH_LGUEST`] (the value Linux still
//!   reserves) and `hardware_subarch_data` = [`boot_signature`]`(ABI_VERSION)`. Anything else
//!   (another subarch, a wrong magic, another ABI version, no boot data at all) is
//!   [`Presence::Absent`](pvops::Presence::Absent), so `auto` never picks lguest where its host
//!   is missing, and `backend=lguest` is refused with -ENODEV.
//! - **`lguest_data`** ([`LguestData`], the 4.x structure laid out LP64, plus three fields the
//!   port appends) lives in a page the guest allocates and hands over with
//!   `LHCALL_LGUEST_INIT`; `LHCALL_LGUEST_INIT(0)` (a port addition: a module can unload)
//!   takes it back.
//! - **Hypercalls**: RAX = `LHCALL_*` number, RBX, RCX, RDX, RSI = arguments, result in RAX
//!   (the 4.x registers, widened), issued with `vmcall` (Intel) or `vmmcall` (AMD, Hygon),
//!   chosen once from the CPU vendor: the instruction lguest's KVM-hypercall era used, since a
//!   long-mode guest kernel runs in ring 0 and owns its IDT (no `int $0x1f`).
//! - **Asynchronous ring**: 64 slots of five u64 in `lguest_data`; inside a lazy-MMU section
//!   page-table notifications are queued there and the host runs them, in order, before the
//!   next synchronous hypercall (`lazy_mode_leave` makes one, `LHCALL_FLUSH_ASYNC`). A full
//!   ring falls back to a synchronous call, which drains it first.
//! - **IRQ group**: the virtual interrupt flag is `lguest_data.irq_enabled` (0 or 0x200), the
//!   ABI the host reads; enabling checks `irq_pending` and asks for delivery with
//!   `LHCALL_SEND_INTERRUPTS`. The guest kernel runs natively in ring 0 under hardware
//!   virtualisation and interrupts reach it through the (in-kernel) interrupt controller, which
//!   only the hardware flag gates: so the ops keep the hardware IF in step with the virtual one
//!   (cli/sti alongside each store), and `save_fl` reports IF on only when both are on (the
//!   kernel's own code may have cleared the hardware flag without telling us; reporting "on"
//!   then would let a `restore_fl` re-enable interrupts inside its critical section).
//! - **MMU group**: the guest's page tables are the hardware's (nested paging), so each op does
//!   the native operation and tells the host what changed: `LHCALL_NEW_PGTABLE` for CR3 loads
//!   (synchronous), `LHCALL_FLUSH_TLB` for flushes and `LHCALL_SET_PTE` / `SET_PMD` / `SET_PGD`
//!   for entry writes (through the ring when lazy). A shadow-paging host (the original
//!   lguest's) rebuilds its shadows from exactly these; ours validates and counts them.
//! - **Timer group**: the host writes `lguest_data.time` (CLOCK_REALTIME) with the TSC it was
//!   taken at and `tsc_khz`, under a version seqlock, at registration and on every exit it
//!   services; the clock is that time plus the TSC since, scaled without division. One-shot
//!   timer: `LHCALL_SET_CLOCKEVENT(delta ns)`, deltas under 100 ns refused with -ETIME (as the
//!   original clockevent did).
//! - **Uniprocessor**: one `lguest_data`, one flag, one ring (lguest guests were UP); a kernel
//!   with more than one possible CPU is refused at start.

use core::num::NonZeroU64;
use core::sync::atomic::{
    AtomicBool, AtomicI32, AtomicPtr, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};

use pvops::detect::Detection;
use pvops::ops::{Op, PvOps};
use pvops::{arch, Backend, BackendId, Inline, InlineSource};

use crate::pvclock::Monotonic;
use crate::{native, Platform};

/// Only traps to the host, which drains the async ring first.
pub const LHCALL_FLUSH_ASYNC: u64 = 0;
/// a1 = guest-physical address of `lguest_data` (0: unregister, a port addition).
pub const LHCALL_LGUEST_INIT: u64 = 1;
/// a1 = guest-physical address of a message (≤ 128 bytes), a2 = [`LGUEST_SHUTDOWN_POWEROFF`]
/// or [`LGUEST_SHUTDOWN_RESTART`].
pub const LHCALL_SHUTDOWN: u64 = 2;
/// a1 = the new CR3 value (top-level table and PCID), already loaded by the guest.
pub const LHCALL_NEW_PGTABLE: u64 = 4;
/// a1 = 0: user mappings; 1: everything, global mappings included.
pub const LHCALL_FLUSH_TLB: u64 = 5;
/// a1 = delta in ns (0: stop): one-shot timer raising virtual IRQ 0.
pub const LHCALL_SET_CLOCKEVENT: u64 = 9;
/// Halt until an interrupt; re-enables the virtual IF.
pub const LHCALL_HALT: u64 = 10;
/// a1 = guest-virtual address of a level-2 entry, a2 = its new value.
pub const LHCALL_SET_PMD: u64 = 13;
/// a1 = guest-virtual address of a level-1 entry, a2 = its new value.
pub const LHCALL_SET_PTE: u64 = 14;
/// a1 = guest-virtual address of a level-3 or level-4 entry, a2 = its new value.
pub const LHCALL_SET_PGD: u64 = 15;
/// Only exits, so the host delivers pending interrupts.
pub const LHCALL_SEND_INTERRUPTS: u64 = 19;

/// `LHCALL_SHUTDOWN` a2: power off.
pub const LGUEST_SHUTDOWN_POWEROFF: u64 = 1;
/// `LHCALL_SHUTDOWN` a2: restart.
pub const LGUEST_SHUTDOWN_RESTART: u64 = 2;

/// Slots in the asynchronous hypercall ring.
pub const LHCALL_RING_SIZE: usize = 64;
/// `hcall_status` of a free (or completed) slot; the host writes it.
pub const HCALL_FREE: u8 = 0xff;
/// `hcall_status` of a slot the host has yet to run; the guest writes it.
pub const HCALL_PENDING: u8 = 0;
/// `irq_enabled` / `irq_pending` value meaning "on" (X86_EFLAGS_IF).
pub const X86_EFLAGS_IF: u32 = 0x200;
/// `LG_CLOCK_MIN_DELTA`: shorter one-shot deltas are refused with `-ETIME`.
pub const LG_CLOCK_MIN_DELTA: u64 = 100;
/// `ETIME`.
pub const ETIME: i32 = 62;

/// `boot_params.hdr.hardware_subarch` of an lguest guest (`X86_SUBARCH_LGUEST`).
pub const X86_SUBARCH_LGUEST: u32 = 1;
/// The upper 48 bits of `hardware_subarch_data`: ASCII "LG64PV", big-endian.
pub const LGUEST_BOOT_MAGIC: u64 = 0x4c47_3634_5056;
/// The version of the port this backend speaks (the low 16 bits of `hardware_subarch_data`).
pub const ABI_VERSION: u16 = 1;

/// The `hardware_subarch_data` a launcher of ABI `version` passes.
pub const fn boot_signature(version: u16) -> u64 {
    (LGUEST_BOOT_MAGIC << 16) | version as u64
}

/// One slot of the asynchronous ring: `{arg0 = call number, arg1 … arg4}` (40 bytes).
#[repr(C)]
#[derive(Debug, Default)]
pub struct HcallArgs {
    /// The `LHCALL_*` number.
    pub arg0: AtomicU64,
    /// First argument.
    pub arg1: AtomicU64,
    /// Second argument.
    pub arg2: AtomicU64,
    /// Third argument.
    pub arg3: AtomicU64,
    /// Fourth argument.
    pub arg4: AtomicU64,
}

/// `struct timespec` (LP64).
#[repr(C)]
#[derive(Debug, Default)]
pub struct Timespec {
    /// Seconds since the epoch.
    pub tv_sec: AtomicU64,
    /// Nanoseconds.
    pub tv_nsec: AtomicU64,
}

/// `struct lguest_data`: the 4.x structure compiled LP64 (abi-lguest.md §6.3, offsets kept),
/// then the port's three time fields. Shared with the host: every field is an atomic of the
/// ABI's width (same layout), written by the side the comments name.
#[repr(C)]
#[derive(Debug)]
pub struct LguestData {
    /// Guest (host at delivery): the virtual IF, [`X86_EFLAGS_IF`] or 0.
    pub irq_enabled: AtomicU32,
    /// Guest: per-IRQ mask (bit n blocks virtual IRQ n).
    pub blocked_interrupts: [AtomicU64; 1],
    /// Host: fault address of a page fault it reflected (unused with nested paging).
    pub cr2: AtomicU64,
    /// Host: CLOCK_REALTIME at `time_tsc`.
    pub time: Timespec,
    /// Host: [`X86_EFLAGS_IF`] when an interrupt waits for the guest to enable its IF.
    pub irq_pending: AtomicI32,
    /// Both: ring slot status ([`HCALL_FREE`] / [`HCALL_PENDING`]).
    pub hcall_status: [AtomicU8; LHCALL_RING_SIZE],
    /// Guest: ring slots.
    pub hcalls: [HcallArgs; LHCALL_RING_SIZE],
    /// Host: size of the top-of-address-space area the guest must avoid (0 here).
    pub reserve_mem: AtomicU64,
    /// Host: TSC frequency in kHz (0: the TSC must not be used).
    pub tsc_khz: AtomicU32,
    /// Guest: the one `iret` where no interrupt may be injected (0: none, hardware IF rules).
    pub noirq_iret: AtomicU64,
    /// Guest: where kernel mappings start (`__START_KERNEL_map`-style; informational).
    pub kernel_address: AtomicU64,
    /// Guest: the software-interrupt syscall vector (0: none, long mode uses SYSCALL).
    pub syscall_vec: AtomicU32,
    /// Host (port addition): the guest TSC at which `time` was taken.
    pub time_tsc: AtomicU64,
    /// Host (port addition): odd while the host rewrites `time`, `time_tsc`.
    pub time_version: AtomicU32,
}

// The layout of abi-lguest.md §6.3, then the port's fields.
static_assertions::const_assert_eq!(core::mem::offset_of!(LguestData, irq_enabled), 0);
static_assertions::const_assert_eq!(core::mem::offset_of!(LguestData, blocked_interrupts), 8);
static_assertions::const_assert_eq!(core::mem::offset_of!(LguestData, cr2), 16);
static_assertions::const_assert_eq!(core::mem::offset_of!(LguestData, time), 24);
static_assertions::const_assert_eq!(core::mem::offset_of!(LguestData, irq_pending), 40);
static_assertions::const_assert_eq!(core::mem::offset_of!(LguestData, hcall_status), 44);
static_assertions::const_assert_eq!(core::mem::offset_of!(LguestData, hcalls), 112);
static_assertions::const_assert_eq!(core::mem::offset_of!(LguestData, reserve_mem), 2672);
static_assertions::const_assert_eq!(core::mem::offset_of!(LguestData, tsc_khz), 2680);
static_assertions::const_assert_eq!(core::mem::offset_of!(LguestData, noirq_iret), 2688);
static_assertions::const_assert_eq!(core::mem::offset_of!(LguestData, kernel_address), 2696);
static_assertions::const_assert_eq!(core::mem::offset_of!(LguestData, syscall_vec), 2704);
static_assertions::const_assert_eq!(core::mem::offset_of!(LguestData, time_tsc), 2712);
static_assertions::const_assert_eq!(core::mem::offset_of!(LguestData, time_version), 2720);
static_assertions::assert_eq_size!(LguestData, [u8; 2728]);
static_assertions::assert_eq_size!(HcallArgs, [u8; 40]);
static_assertions::const_assert!(core::mem::size_of::<LguestData>() <= 4096);

// The 4.x registers, widened: RAX = nr, RBX, RCX, RDX, RSI = a1..a4 (KVM's moves: RBX is
// callee-saved and kept).
crate::hypercall_fns!(
    "lguest",
    [
        "push rbx",
        "mov rax, rdi",
        "mov rbx, rsi",
        "mov rsi, r8",
        "xchg rcx, rdx"
    ],
    ["pop rbx"]
);

/// A hypercall entry: the instruction's, or a modelled host's in host tests.
pub type HypercallFn = unsafe extern "C" fn(u64, u64, u64, u64, u64) -> i64;

/// Why lguest is not announced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootError {
    /// The platform gives no boot data (it could not be read).
    NoBootData,
    /// Another hardware subarchitecture (0 = PC).
    NotLguest(u32),
    /// The lguest subarch, but `hardware_subarch_data` does not carry the port's magic.
    BadSignature(u64),
    /// The port's magic, another ABI version.
    Version(u16),
}

impl core::fmt::Display for BootError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            BootError::NoBootData => f.write_str("no boot data"),
            BootError::NotLguest(s) => write!(f, "hardware_subarch {s} is not lguest"),
            BootError::BadSignature(d) => {
                write!(f, "lguest subarch without the LG64PV signature ({d:#x})")
            }
            BootError::Version(v) => {
                write!(f, "lguest host speaks ABI {v}, this backend {ABI_VERSION}")
            }
        }
    }
}

/// Whether the boot data announces an lguest host of this port.
pub fn probe(platform: &dyn Platform) -> Result<(), BootError> {
    let (subarch, data) = platform.boot_subarch().ok_or(BootError::NoBootData)?;
    if subarch != X86_SUBARCH_LGUEST {
        return Err(BootError::NotLguest(subarch));
    }
    if data >> 16 != LGUEST_BOOT_MAGIC {
        return Err(BootError::BadSignature(data));
    }
    match data as u16 {
        ABI_VERSION => Ok(()),
        v => Err(BootError::Version(v)),
    }
}

/// Why the lguest backend could not start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LguestError {
    /// Not announced by the boot data.
    Boot(BootError),
    /// More than one possible CPU: lguest guests are uniprocessor.
    Smp(u32),
    /// No page for `lguest_data`.
    NoMemory,
    /// The host refused `LHCALL_LGUEST_INIT` (its answer).
    Refused(i64),
    /// The host accepted but did not fill the time and TSC fields.
    HostSilent,
}

impl core::fmt::Display for LguestError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            LguestError::Boot(e) => write!(f, "{e}"),
            LguestError::Smp(n) => write!(f, "lguest guests are uniprocessor ({n} CPUs)"),
            LguestError::NoMemory => f.write_str("no page for lguest_data"),
            LguestError::Refused(rc) => write!(f, "the host refused LHCALL_LGUEST_INIT ({rc})"),
            LguestError::HostSilent => f.write_str("the host did not fill lguest_data's time"),
        }
    }
}

/// What the backend set up; the table's functions read it.
struct State {
    /// The registered `lguest_data` (null: none).
    data: AtomicPtr<LguestData>,
    /// The hypercall entry ([`HypercallFn`]).
    hcall: AtomicUsize,
    /// Whether the ops also drive the real CPU state (ring 0).
    privileged: AtomicBool,
    /// Inside a lazy-MMU section.
    lazy: AtomicBool,
    /// The next ring slot the guest writes.
    next: AtomicUsize,
    /// Slots queued since the last synchronous hypercall.
    queued: AtomicUsize,
    /// ns = cycles * mult >> 32.
    mult: AtomicU64,
    /// The clock's reading when the backend started (sched_clock's zero).
    start_ns: AtomicU64,
    /// The latest clock reading handed out (keeps sched_clock monotonic across re-anchoring).
    last: Monotonic,
}

static STATE: State = State {
    data: AtomicPtr::new(core::ptr::null_mut()),
    hcall: AtomicUsize::new(0),
    privileged: AtomicBool::new(true),
    lazy: AtomicBool::new(false),
    next: AtomicUsize::new(0),
    queued: AtomicUsize::new(0),
    mult: AtomicU64::new(0),
    start_ns: AtomicU64::new(0),
    last: Monotonic::new(),
};

/// The registered `lguest_data`.
fn data() -> &'static LguestData {
    let p = STATE.data.load(Ordering::Acquire);
    // SAFETY: the table holding these ops is installed only after `init` registered the page,
    // and cleared before `teardown` takes it back, so `p` is the live, zero-initialised page.
    unsafe { &*p }
}

fn privileged() -> bool {
    STATE.privileged.load(Ordering::Relaxed)
}

/// A synchronous hypercall; the host has drained the ring when it returns.
fn hcall(nr: u64, a1: u64, a2: u64, a3: u64, a4: u64) -> i64 {
    let f = STATE.hcall.load(Ordering::Relaxed);
    // SAFETY: `f` is a `HypercallFn` stored by `init` (the instruction, for a host the boot
    // data announced, or the platform's model), and every LHCALL the backend makes is one the
    // port defines with arguments that are valid for it.
    let r = unsafe {
        let f: HypercallFn = core::mem::transmute::<usize, HypercallFn>(f);
        f(nr, a1, a2, a3, a4)
    };
    STATE.queued.store(0, Ordering::Relaxed);
    r
}

/// Queue a call in the ring (a full ring: make it synchronously, which drains the ring first).
fn async_hcall(nr: u64, a1: u64, a2: u64, a3: u64, a4: u64) {
    let flags = hw_irq_save();
    let d = data();
    let next = STATE.next.load(Ordering::Relaxed) % LHCALL_RING_SIZE;
    if d.hcall_status[next].load(Ordering::Acquire) != HCALL_FREE {
        hcall(nr, a1, a2, a3, a4);
    } else {
        let slot = &d.hcalls[next];
        slot.arg0.store(nr, Ordering::Relaxed);
        slot.arg1.store(a1, Ordering::Relaxed);
        slot.arg2.store(a2, Ordering::Relaxed);
        slot.arg3.store(a3, Ordering::Relaxed);
        slot.arg4.store(a4, Ordering::Relaxed);
        d.hcall_status[next].store(HCALL_PENDING, Ordering::Release);
        STATE
            .next
            .store((next + 1) % LHCALL_RING_SIZE, Ordering::Relaxed);
        STATE.queued.fetch_add(1, Ordering::Relaxed);
    }
    hw_irq_restore(flags);
}

/// In a lazy section through the ring, otherwise synchronously.
fn lazy_hcall(nr: u64, a1: u64, a2: u64) {
    if STATE.lazy.load(Ordering::Relaxed) {
        async_hcall(nr, a1, a2, 0, 0);
    } else {
        hcall(nr, a1, a2, 0, 0);
    }
}

/// Clear the hardware IF (ring 0 only), returning the flags to restore.
fn hw_irq_save() -> u64 {
    if !privileged() {
        return 0;
    }
    let f: u64;
    // SAFETY: ring 0 (privileged); pushf/pop/cli only change RFLAGS.IF.
    unsafe { core::arch::asm!("pushfq", "pop {}", "cli", out(reg) f) };
    f
}

fn hw_irq_restore(flags: u64) {
    if privileged() && flags & u64::from(X86_EFLAGS_IF) != 0 {
        // SAFETY: ring 0; re-enables what `hw_irq_save` found enabled.
        unsafe { core::arch::asm!("sti", options(nomem, nostack)) };
    }
}

extern "C" fn save_fl() -> u64 {
    let virt = u64::from(data().irq_enabled.load(Ordering::Relaxed) & X86_EFLAGS_IF);
    if !privileged() {
        return virt;
    }
    let hw: u64;
    // SAFETY: reads RFLAGS.
    unsafe { core::arch::asm!("pushfq", "pop {}", out(reg) hw, options(nomem)) };
    virt & hw
}

extern "C" fn irq_disable() {
    if privileged() {
        // SAFETY: ring 0; the op's purpose.
        unsafe { core::arch::asm!("cli", options(nomem, nostack)) };
    }
    data().irq_enabled.store(0, Ordering::Relaxed);
}

extern "C" fn irq_enable() {
    let d = data();
    d.irq_enabled.store(X86_EFLAGS_IF, Ordering::Relaxed);
    if privileged() {
        // SAFETY: ring 0; the op's purpose.
        unsafe { core::arch::asm!("sti", options(nomem, nostack)) };
    }
    // The host raised an interrupt while the flag was off: ask for it now.
    if d.irq_pending.load(Ordering::Relaxed) != 0 {
        hcall(LHCALL_SEND_INTERRUPTS, 0, 0, 0, 0);
    }
}

extern "C" fn restore_fl(flags: u64) {
    if flags & u64::from(X86_EFLAGS_IF) != 0 {
        irq_enable();
    } else {
        irq_disable();
    }
}

extern "C" fn safe_halt() {
    let d = data();
    d.irq_enabled.store(X86_EFLAGS_IF, Ordering::Relaxed);
    if privileged() {
        // The hardware halts in the in-kernel irqchip's care; sti's shadow covers hlt.
        // SAFETY: ring 0; the op's purpose.
        unsafe { core::arch::asm!("sti", "hlt", options(nomem, nostack)) };
    } else {
        hcall(LHCALL_HALT, 0, 0, 0, 0);
    }
}

extern "C" fn halt() {
    if privileged() {
        // SAFETY: ring 0; the op's purpose.
        unsafe { core::arch::asm!("hlt", options(nomem, nostack)) };
    } else {
        hcall(LHCALL_HALT, 0, 0, 0, 0);
    }
}

extern "C" fn write_cr3(value: u64) {
    if privileged() {
        // SAFETY: ring 0; the op's contract (a valid page-table root).
        unsafe { native::write_cr3(value) };
    }
    hcall(LHCALL_NEW_PGTABLE, value, 0, 0, 0);
}

extern "C" fn flush_tlb_user() {
    if privileged() {
        // SAFETY: ring 0.
        unsafe { native::flush_tlb_user() };
    }
    lazy_hcall(LHCALL_FLUSH_TLB, 0, 0);
}

extern "C" fn flush_tlb_kernel() {
    if privileged() {
        // SAFETY: ring 0.
        unsafe { native::flush_tlb_kernel() };
    }
    lazy_hcall(LHCALL_FLUSH_TLB, 1, 0);
}

extern "C" fn flush_tlb_one_user(address: u64) {
    if privileged() {
        // SAFETY: ring 0; invlpg of any address is harmless.
        unsafe { native::flush_tlb_one_user(address) };
    }
}

/// Store an entry and tell the host.
///
/// # Safety
///
/// `entry` is a page-table entry (or, in host tests, memory) the caller may write.
unsafe fn set_entry(nr: u64, entry: *mut u64, value: u64) {
    // SAFETY: forwarded contract.
    unsafe { entry.write_volatile(value) };
    lazy_hcall(nr, entry as u64, value);
}

unsafe extern "C" fn set_pte(ptep: *mut u64, value: u64) {
    // SAFETY: the op's contract.
    unsafe { set_entry(LHCALL_SET_PTE, ptep, value) }
}

unsafe extern "C" fn set_pmd(pmdp: *mut u64, value: u64) {
    // SAFETY: the op's contract.
    unsafe { set_entry(LHCALL_SET_PMD, pmdp, value) }
}

unsafe extern "C" fn set_pud(pudp: *mut u64, value: u64) {
    // SAFETY: the op's contract.
    unsafe { set_entry(LHCALL_SET_PGD, pudp, value) }
}

extern "C" fn lazy_mode_enter() {
    STATE.lazy.store(true, Ordering::Relaxed);
}

extern "C" fn lazy_mode_leave() {
    STATE.lazy.store(false, Ordering::Relaxed);
    if STATE.queued.load(Ordering::Relaxed) != 0 {
        hcall(LHCALL_FLUSH_ASYNC, 0, 0, 0, 0);
    }
}

pvops::callee_save_thunk!(
    /// `irq.save_fl` behind the callee-save thunk.
    pub fn save_fl_thunk() -> u64 => save_fl
);
pvops::callee_save_thunk!(
    /// `irq.restore_fl` behind the callee-save thunk.
    pub fn restore_fl_thunk(flags: u64) => restore_fl
);
pvops::callee_save_thunk!(
    /// `irq.irq_disable` behind the callee-save thunk.
    pub fn irq_disable_thunk() => irq_disable
);
pvops::callee_save_thunk!(
    /// `irq.irq_enable` behind the callee-save thunk.
    pub fn irq_enable_thunk() => irq_enable
);
pvops::callee_save_thunk!(
    /// `irq.safe_halt` behind the callee-save thunk.
    pub fn safe_halt_thunk() => safe_halt
);
pvops::callee_save_thunk!(
    /// `irq.halt` behind the callee-save thunk.
    pub fn halt_thunk() => halt
);
pvops::callee_save_thunk!(
    /// `mmu.write_cr3` behind the callee-save thunk.
    pub fn write_cr3_thunk(value: u64) => write_cr3
);
pvops::callee_save_thunk!(
    /// `mmu.flush_tlb_user` behind the callee-save thunk.
    pub fn flush_tlb_user_thunk() => flush_tlb_user
);
pvops::callee_save_thunk!(
    /// `mmu.flush_tlb_one_user` behind the callee-save thunk.
    pub fn flush_tlb_one_user_thunk(address: u64) => flush_tlb_one_user
);
pvops::callee_save_thunk!(
    /// `mmu.set_pte` behind the callee-save thunk.
    pub fn set_pte_thunk(ptep: *mut u64, value: u64) => set_pte
);
pvops::callee_save_thunk!(
    /// `mmu.set_pmd` behind the callee-save thunk.
    pub fn set_pmd_thunk(pmdp: *mut u64, value: u64) => set_pmd
);
pvops::callee_save_thunk!(
    /// `mmu.set_pud` behind the callee-save thunk.
    pub fn set_pud_thunk(pudp: *mut u64, value: u64) => set_pud
);

/// The host's time now: `time` plus the TSC since `time_tsc`, read with the version protocol
/// (0 if the host keeps the record busy).
fn clock_ns() -> u64 {
    let d = data();
    let mult = STATE.mult.load(Ordering::Relaxed);
    for _ in 0..crate::pvclock::MAX_RETRIES {
        let v0 = d.time_version.load(Ordering::Acquire);
        let sec = d.time.tv_sec.load(Ordering::Acquire);
        let nsec = d.time.tv_nsec.load(Ordering::Acquire);
        let tsc0 = d.time_tsc.load(Ordering::Acquire);
        let tsc = arch::rdtsc_ordered();
        let v1 = d.time_version.load(Ordering::Acquire);
        if v0 & 1 == 0 && v0 == v1 {
            let since = ((u128::from(tsc.saturating_sub(tsc0)) * u128::from(mult)) >> 32) as u64;
            return sec
                .wrapping_mul(1_000_000_000)
                .wrapping_add(nsec)
                .wrapping_add(since);
        }
        core::hint::spin_loop();
    }
    0
}

/// Nanoseconds since the backend started, never going back (the host re-anchors `time` on
/// every exit; a host clock stepped back is absorbed).
pub extern "C" fn sched_clock() -> u64 {
    STATE
        .last
        .clamp(clock_ns())
        .saturating_sub(STATE.start_ns.load(Ordering::Relaxed))
}

extern "C" fn wall_clock() -> u64 {
    clock_ns()
}

extern "C" fn tsc_khz() -> u64 {
    u64::from(data().tsc_khz.load(Ordering::Relaxed))
}

extern "C" fn steal_clock(_cpu: u32) -> u64 {
    0
}

extern "C" fn set_next_event(delta_ns: u64) -> i32 {
    if delta_ns < LG_CLOCK_MIN_DELTA {
        return -ETIME;
    }
    hcall(LHCALL_SET_CLOCKEVENT, delta_ns, 0, 0, 0) as i32
}

/// The hypercall `cpu.hypercall` holds.
fn hypercall_fn() -> HypercallFn {
    let f = STATE.hcall.load(Ordering::Relaxed);
    // SAFETY: stored by `init` from a `HypercallFn`.
    unsafe { core::mem::transmute::<usize, HypercallFn>(f) }
}

/// The lguest backend.
#[derive(Debug)]
pub struct Lguest;

/// The one instance.
pub static LGUEST: Lguest = Lguest;

/// Check the boot data, register `lguest_data` with the host and start the backend.
pub fn init(
    detection: &Detection,
    platform: &dyn Platform,
) -> Result<&'static Lguest, LguestError> {
    probe(platform).map_err(LguestError::Boot)?;
    let cpus = platform.nr_cpus();
    if cpus != 1 {
        return Err(LguestError::Smp(cpus));
    }
    let hcall_fn = platform
        .lguest_host()
        .unwrap_or(hypercall_pick(detection.vendor.uses_vmmcall()));
    STATE.hcall.store(hcall_fn as usize, Ordering::Relaxed);
    STATE
        .privileged
        .store(platform.privileged(), Ordering::Relaxed);

    let page = platform.alloc_page().ok_or(LguestError::NoMemory)?;
    let Some(pa) = platform.virt_to_phys(page) else {
        platform.free_page(page);
        return Err(LguestError::NoMemory);
    };
    // SAFETY: a zeroed page of our own, big and aligned enough for `LguestData` (all-zero is a
    // valid value of every field); the host does not know it yet.
    let d = unsafe { &*(page as *const LguestData) };
    for s in &d.hcall_status {
        s.store(HCALL_FREE, Ordering::Relaxed);
    }
    d.irq_enabled.store(
        if privileged() {
            let f: u64;
            // SAFETY: reads RFLAGS.
            unsafe { core::arch::asm!("pushfq", "pop {}", out(reg) f, options(nomem)) };
            f as u32 & X86_EFLAGS_IF
        } else {
            X86_EFLAGS_IF
        },
        Ordering::Relaxed,
    );
    STATE.next.store(0, Ordering::Relaxed);
    STATE.queued.store(0, Ordering::Relaxed);
    STATE.lazy.store(false, Ordering::Relaxed);
    STATE.data.store(page as *mut LguestData, Ordering::Release);

    let rc = hcall(LHCALL_LGUEST_INIT, pa, 0, 0, 0);
    if rc != 0 {
        STATE.data.store(core::ptr::null_mut(), Ordering::Release);
        platform.free_page(page);
        return Err(LguestError::Refused(rc));
    }
    let khz = d.tsc_khz.load(Ordering::Acquire);
    let filled = d.time_version.load(Ordering::Acquire) & 1 == 0
        && d.time_tsc.load(Ordering::Acquire) != 0
        && d.time.tv_sec.load(Ordering::Acquire) != 0;
    let Some(khz) = NonZeroU64::new(u64::from(khz)).filter(|_| filled) else {
        let _ = teardown(platform);
        return Err(LguestError::HostSilent);
    };
    STATE
        .mult
        .store((1_000_000u64 << 32) / khz, Ordering::Relaxed);
    let now = clock_ns();
    STATE.start_ns.store(now, Ordering::Relaxed);
    STATE.last.reset(now);
    Ok(&LGUEST)
}

/// Drain the ring, take `lguest_data` back from the host and forget it; says what happened.
pub fn teardown(platform: &dyn Platform) -> &'static str {
    let p = STATE.data.load(Ordering::Acquire);
    if p.is_null() {
        return "nothing registered";
    }
    STATE.lazy.store(false, Ordering::Relaxed);
    if STATE.queued.load(Ordering::Relaxed) != 0 {
        hcall(LHCALL_FLUSH_ASYNC, 0, 0, 0, 0);
    }
    let rc = hcall(LHCALL_LGUEST_INIT, 0, 0, 0, 0);
    STATE.data.store(core::ptr::null_mut(), Ordering::Release);
    if rc == 0 {
        platform.free_page(p as usize);
        "lguest_data unregistered"
    } else {
        // The host may go on writing into the page: it must never be reused.
        "lguest_data kept: the host refused to unregister it (its page stays allocated)"
    }
}

impl InlineSource for Lguest {
    fn inline(&self, op: Op) -> Option<Inline> {
        match op {
            // Ours: reached by a direct call.
            Op::SaveFl
            | Op::RestoreFl
            | Op::IrqDisable
            | Op::IrqEnable
            | Op::SafeHalt
            | Op::Halt
            | Op::WriteCr3
            | Op::FlushTlbUser
            | Op::FlushTlbKernel
            | Op::FlushTlbOneUser
            | Op::SetPte
            | Op::SetPmd
            | Op::SetPud
            | Op::LazyModeEnter
            | Op::LazyModeLeave => None,
            _ => native::inline(op),
        }
    }
}

impl Backend for Lguest {
    fn id(&self) -> BackendId {
        BackendId::Lguest
    }

    fn ops(&self) -> PvOps {
        let mut ops = native::NATIVE.ops();
        ops.cpu.hypercall = hypercall_fn();
        ops.irq.save_fl = save_fl_thunk;
        ops.irq.restore_fl = restore_fl_thunk;
        ops.irq.irq_disable = irq_disable_thunk;
        ops.irq.irq_enable = irq_enable_thunk;
        ops.irq.safe_halt = safe_halt_thunk;
        ops.irq.halt = halt_thunk;
        ops.mmu.write_cr3 = write_cr3_thunk;
        ops.mmu.flush_tlb_user = flush_tlb_user_thunk;
        ops.mmu.flush_tlb_kernel = flush_tlb_kernel;
        ops.mmu.flush_tlb_one_user = flush_tlb_one_user_thunk;
        ops.mmu.set_pte = set_pte_thunk;
        ops.mmu.set_pmd = set_pmd_thunk;
        ops.mmu.set_pud = set_pud_thunk;
        ops.mmu.lazy_mode_enter = lazy_mode_enter;
        ops.mmu.lazy_mode_leave = lazy_mode_leave;
        ops.timer.sched_clock = sched_clock;
        ops.timer.steal_clock = steal_clock;
        ops.timer.tsc_khz = tsc_khz;
        ops.timer.wall_clock = wall_clock;
        ops.timer.set_next_event = set_next_event;
        ops
    }

    fn null_hypercall(&self) -> Option<pvops::select::NullHypercall> {
        // Drains an empty ring: answered 0 (a KVM host would say -KVM_ENOSYS).
        Some(pvops::select::NullHypercall {
            args: [LHCALL_FLUSH_ASYNC, 0, 0, 0, 0],
            expect: 0,
        })
    }

    fn describe(&self) -> &'static str {
        "lguest_data registered with LHCALL_LGUEST_INIT"
    }
}
