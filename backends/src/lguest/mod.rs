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
//!   (cli/sti alongside each store), and `save_fl` reports the hardware flag, the one that
//!   gates delivery. The kernel's own code changes it without telling the backend (`iret`,
//!   `popf`, the entry code): after an interrupt whose handler ended with interrupts disabled,
//!   `iret` turns the hardware flag back on while the virtual one stays off, and reporting
//!   "off" then would make the next `local_irq_save`/`restore` pair leave interrupts disabled
//!   in code that runs with them enabled.
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

pub mod abi;

use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};

use pvops::detect::Detection;
use pvops::ops::{BackendOps, Group, Impl, Op};
use pvops::{arch, Backend, BackendId, NullHypercall};

use crate::describe::Describe;
use crate::time::{read_versioned, Monotonic, TscScale};
use crate::{native, Driver, Platform};
use abi::*;

// The 4.x registers, widened: RAX = nr, RBX, RCX, RDX, RSI = a1..a4 (KVM's moves: RBX is
// callee-saved and kept).
crate::hypercall_fns!("lguest", kvm_registers);

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
fn probe(platform: &dyn Platform) -> Result<(), BootError> {
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
    /// The host's TSC rate (`lguest_data.tsc_khz`).
    tsc: TscScale,
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
    tsc: TscScale::new(),
    start_ns: AtomicU64::new(0),
    last: Monotonic::new(),
};

/// The report text: where `lguest_data` was registered, and the host's TSC rate.
static DESCRIBE: Describe = Describe::new();

/// The registered `lguest_data`.
fn data() -> &'static LguestData {
    let p = STATE.data.load(Ordering::Acquire);
    // SAFETY: the table holding these ops is installed only after `start` registered the page,
    // and cleared before `stop` takes it back, so `p` is the live, zero-initialised page.
    unsafe { &*p }
}

fn privileged() -> bool {
    STATE.privileged.load(Ordering::Relaxed)
}

/// A synchronous hypercall; the host has drained the ring when it returns.
fn hcall(nr: u64, a1: u64, a2: u64, a3: u64, a4: u64) -> i64 {
    let f = STATE.hcall.load(Ordering::Relaxed);
    // SAFETY: `f` is a `HypercallFn` stored by `start` (the instruction, for a host the boot
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

/// `irq.save_fl`: the hardware flag in ring 0 (the one that gates delivery, and the one the
/// kernel's `iret` and `popf` restore without telling the backend), the virtual one elsewhere.
extern "C" fn save_fl() -> u64 {
    if !privileged() {
        return u64::from(data().irq_enabled.load(Ordering::Relaxed) & X86_EFLAGS_IF);
    }
    let hw: u64;
    // SAFETY: reads RFLAGS.
    unsafe { core::arch::asm!("pushfq", "pop {}", out(reg) hw, options(nomem)) };
    hw & u64::from(X86_EFLAGS_IF)
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

/// `mmu.set_pte`: store the page-table entry and tell the host (batched in lazy-MMU sections).
///
/// # Safety
///
/// The op's contract: the pointer is an entry of a live page table the caller may write.
unsafe extern "C" fn set_pte(ptep: *mut u64, value: u64) {
    // SAFETY: the op's contract.
    unsafe { set_entry(LHCALL_SET_PTE, ptep, value) }
}

/// `mmu.set_pmd`: store the page-middle-directory entry and tell the host (batched in lazy-MMU sections).
///
/// # Safety
///
/// The op's contract: the pointer is an entry of a live page table the caller may write.
unsafe extern "C" fn set_pmd(pmdp: *mut u64, value: u64) {
    // SAFETY: the op's contract.
    unsafe { set_entry(LHCALL_SET_PMD, pmdp, value) }
}

/// `mmu.set_pud`: store the page-upper-directory entry and tell the host (batched in lazy-MMU sections).
///
/// # Safety
///
/// The op's contract: the pointer is an entry of a live page table the caller may write.
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
    read_versioned(
        || d.time_version.load(Ordering::Acquire),
        || {
            let sec = d.time.tv_sec.load(Ordering::Acquire);
            let nsec = d.time.tv_nsec.load(Ordering::Acquire);
            let tsc0 = d.time_tsc.load(Ordering::Acquire);
            let since = STATE.tsc.ns(arch::rdtsc_ordered().saturating_sub(tsc0));
            sec.wrapping_mul(1_000_000_000)
                .wrapping_add(nsec)
                .wrapping_add(since)
        },
    )
    .unwrap_or(0)
}

/// Nanoseconds since the backend started, never going back (the host re-anchors `time` on
/// every exit; a host clock stepped back is absorbed).
pub extern "C" fn sched_clock() -> u64 {
    crate::time::handed_out(
        STATE
            .last
            .clamp(clock_ns())
            .saturating_sub(STATE.start_ns.load(Ordering::Relaxed)),
    )
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
    // SAFETY: stored by `start` from a `HypercallFn`.
    unsafe { core::mem::transmute::<usize, HypercallFn>(f) }
}

/// The lguest backend.
#[derive(Debug)]
pub struct Lguest;

/// The one instance.
pub static LGUEST: Lguest = Lguest;

impl Driver for Lguest {
    const ID: BackendId = BackendId::new("lguest");
    type Found = ();
    type Absent = BootError;
    type Error = LguestError;

    /// Announced by boot data only: absent unless the launcher said so.
    fn probe(_: &Detection, platform: &dyn Platform) -> Result<(), BootError> {
        probe(platform)
    }

    /// Register `lguest_data` with the host (the boot data announced it) and start the backend.
    fn start(
        _: (),
        detection: &Detection,
        platform: &dyn Platform,
    ) -> Result<&'static Lguest, LguestError> {
        let cpus = platform.nr_cpus();
        if cpus != 1 {
            return Err(LguestError::Smp(cpus));
        }
        let hcall_fn = platform
            .hypercall_model()
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
        if khz == 0 || !filled {
            let _ = Self::stop(platform);
            return Err(LguestError::HostSilent);
        }
        STATE.tsc.set(u64::from(khz));
        // SAFETY: start is exclusive with stop and with `describe` (asked of a started backend).
        unsafe {
            DESCRIBE.set(format_args!(
                "lguest_data at {pa:#x} registered with LHCALL_LGUEST_INIT; host TSC {khz} kHz"
            ))
        };
        let now = clock_ns();
        STATE.start_ns.store(now, Ordering::Relaxed);
        STATE.last.reset(now);
        Ok(&LGUEST)
    }

    /// Drain the ring, take `lguest_data` back from the host and forget it; says what happened.
    fn stop(platform: &dyn Platform) -> &'static str {
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
}

impl Backend for Lguest {
    fn id(&self) -> BackendId {
        Self::ID
    }

    fn ops(&self) -> BackendOps {
        let mut ops = native::OPS;
        ops.cpu.hypercall = Impl::call(hypercall_fn());
        ops.irq.save_fl = Impl::call(save_fl_thunk);
        ops.irq.restore_fl = Impl::call(restore_fl_thunk);
        ops.irq.irq_disable = Impl::call(irq_disable_thunk);
        ops.irq.irq_enable = Impl::call(irq_enable_thunk);
        ops.irq.safe_halt = Impl::call(safe_halt_thunk);
        ops.irq.halt = Impl::call(halt_thunk);
        ops.mmu.write_cr3 = Impl::call(write_cr3_thunk);
        ops.mmu.flush_tlb_user = Impl::call(flush_tlb_user_thunk);
        ops.mmu.flush_tlb_kernel = Impl::call(flush_tlb_kernel);
        ops.mmu.flush_tlb_one_user = Impl::call(flush_tlb_one_user_thunk);
        ops.mmu.set_pte = Impl::call(set_pte_thunk);
        ops.mmu.set_pmd = Impl::call(set_pmd_thunk);
        ops.mmu.set_pud = Impl::call(set_pud_thunk);
        ops.mmu.lazy_mode_enter = Impl::call(lazy_mode_enter);
        ops.mmu.lazy_mode_leave = Impl::call(lazy_mode_leave);
        ops.timer.sched_clock = Impl::call(sched_clock);
        ops.timer.steal_clock = Impl::call(steal_clock);
        ops.timer.tsc_khz = Impl::call(tsc_khz);
        ops.timer.wall_clock = Impl::call(wall_clock);
        ops.timer.set_next_event = Impl::call(set_next_event);
        ops
    }

    fn null_hypercall(&self) -> Option<NullHypercall> {
        // Drains an empty ring: answered 0 (a KVM host would say -KVM_ENOSYS).
        Some(NullHypercall {
            args: [LHCALL_FLUSH_ASYNC, 0, 0, 0, 0],
            expect: 0,
        })
    }

    fn describe(&self) -> &'static str {
        DESCRIBE.get()
    }

    fn serves_kernel(&self, op: Op) -> Result<(), &'static str> {
        // The CPU ops are the native backend's. The IRQ ops keep both flags and report the
        // hardware one, which the kernel's own iret/popf restore (see the module's docs). The
        // MMU ops are the native operation plus a notification, queued in the ring inside the
        // kernel's lazy-MMU sections (uniprocessor: one ring, one lazy flag) and sent when the
        // section ends, as 4.x batched them. The time ops are not the kernel's: its clock is
        // the TSC (tsc_early_khz), this one the host's realtime re-anchored at every exit, and
        // the port has no steal time.
        match op {
            Op::Hypercall => Err("this backend's own, not a kernel member"),
            _ if op.group() == Group::Timer => Err(
                "the kernel's clock is the TSC; lguest's follows the host's realtime, \
                 re-anchored at every exit: they would drift apart",
            ),
            _ => Ok(()),
        }
    }
}
