//! The KVM backend: KVM's paravirtual interface, found by the CPUID scan at whatever base it
//! sits (0x4000_0000, or 0x4000_0100 behind a Hyper-V interface). ABI: shared/docs/abi-kvm.md.
//!
//! - **Timer group** from kvmclock: `sched_clock`, `tsc_khz` and the wall clock read the
//!   pvclock record with the version protocol ([`crate::pvclock`]); `steal_clock` reads each
//!   CPU's steal-time record.
//! - **Coexistence**: a Linux guest has already registered kvmclock and steal time on every
//!   CPU. The backend reads the MSRs back and uses those records; it never writes them (that
//!   would redirect the host's updates and freeze the kernel's own clock). Only when the
//!   kernel runs without kvmclock (`no-kvmclock`) does the backend register a record of its own
//!   (on CPU 0, [`OWN_RECORD_CPU`]; with the TSC-stable flag any CPU may read it), and it
//!   unregisters that record at teardown, on the same CPU: the MSR is per vCPU, and a
//!   registration left on another vCPU would have the host write into the module's memory
//!   after it is freed.
//! - **Hypercalls** fill `cpu.hypercall`: `vmcall` on Intel and others, `vmmcall` on AMD and
//!   Hygon, chosen once from the CPU vendor: the slot holds the matching function, so every
//!   patched site calls it directly and no site ever executes the wrong instruction.
//! - **Lock group**: `vcpu_is_preempted` reads the preempted flag of the vCPU's steal-time
//!   record (where KVM offers steal time). Built into the kernel, with Linux's own gating
//!   (`KVM_FEATURE_PV_UNHALT`, no `KVM_HINTS_REALTIME`, more than one possible CPU, no
//!   `nopvspin`), the paravirt spinlock ops around the kernel's paravirt qspinlock slow path:
//!   a waiter halts until kicked (`wait`), `kick` is `KVM_HC_KICK_CPU` with the CPU's APIC ID,
//!   and the unlock releases with one `cmpxchg`, leaving a halted waiter to the kernel's unlock
//!   slow path (which kicks it through `kick`). Elsewhere (a module: no kernel slow path to
//!   call) the lock group is native's.
//! - **PV TLB flush**, built in, with Linux's gating: `flush_tlb_defer` leaves a preempted
//!   vCPU's flush to the host (the request bit of its steal-time record) instead of an IPI.
//! - **PV send-IPI**, with Linux's gating (`KVM_FEATURE_PV_SEND_IPI`, more than one possible
//!   CPU): `irq.send_ipi` turns a CPU mask into APIC IDs and sends each window of 128 of them
//!   with one `KVM_HC_SEND_IPI` ([`ipi_batches`]), where the local APIC would take one ICR
//!   write (an exit) per CPU. Built in, the kernel's APIC callbacks call it.
//! - **Everything else is native**: a KVM guest runs its kernel in ring 0 with real interrupt
//!   flags and page tables, so the CPU, IRQ and MMU groups and their inline replacements are the
//!   native backend's; `io_delay` becomes nothing when KVM says port 0x80 delays are useless.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};

use pvops::detect::{Detection, HypervisorKind, Interface};
use pvops::ops::{BackendOps, Group, Impl, Op};
use pvops::{arch, Backend, BackendId, NullHypercall};

use crate::pvclock::{self, Clock, PvclockVcpuTimeInfo, PvclockWallClock};
use crate::time::{read_versioned, Monotonic};
use crate::{native, Driver, Platform, MAX_CPUS};

/// `KVM_FEATURE_CLOCKSOURCE`: kvmclock on the legacy MSRs.
pub const KVM_FEATURE_CLOCKSOURCE: u32 = 1 << 0;
/// `KVM_FEATURE_NOP_IO_DELAY`.
pub const KVM_FEATURE_NOP_IO_DELAY: u32 = 1 << 1;
/// `KVM_FEATURE_CLOCKSOURCE2`: kvmclock on MSRs 0x4b564d00/01.
pub const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;
/// `KVM_FEATURE_STEAL_TIME`.
pub const KVM_FEATURE_STEAL_TIME: u32 = 1 << 5;
/// `KVM_FEATURE_PV_UNHALT`: a halted vCPU can be woken with `KVM_HC_KICK_CPU`.
pub const KVM_FEATURE_PV_UNHALT: u32 = 1 << 7;
/// `KVM_FEATURE_PV_TLB_FLUSH`: the host flushes a preempted vCPU's TLB on request.
pub const KVM_FEATURE_PV_TLB_FLUSH: u32 = 1 << 9;
/// `KVM_FEATURE_PV_SEND_IPI`: `KVM_HC_SEND_IPI` sends an IPI to up to 128 vCPUs at once.
pub const KVM_FEATURE_PV_SEND_IPI: u32 = 1 << 11;
/// `KVM_FEATURE_PV_SCHED_YIELD`.
pub const KVM_FEATURE_PV_SCHED_YIELD: u32 = 1 << 13;
/// `KVM_HINTS_REALTIME` (CPUID base+1 EDX): vCPUs never preempted, pCPUs dedicated.
pub const KVM_HINTS_REALTIME: u32 = 1 << 0;
/// `KVM_VCPU_PREEMPTED`: bit 0 of the steal-time record's `preempted`.
pub const KVM_VCPU_PREEMPTED: u8 = 1 << 0;
/// `KVM_VCPU_FLUSH_TLB`: bit 1, the guest's request to flush before the vCPU runs again.
pub const KVM_VCPU_FLUSH_TLB: u8 = 1 << 1;
/// `KVM_FEATURE_CLOCKSOURCE_STABLE_BIT`: the record's stable flag can be trusted.
pub const KVM_FEATURE_CLOCKSOURCE_STABLE_BIT: u32 = 1 << 24;

/// `MSR_KVM_WALL_CLOCK` (legacy).
pub const MSR_KVM_WALL_CLOCK: u32 = 0x11;
/// `MSR_KVM_SYSTEM_TIME` (legacy).
pub const MSR_KVM_SYSTEM_TIME: u32 = 0x12;
/// `MSR_KVM_WALL_CLOCK_NEW`.
pub const MSR_KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;
/// `MSR_KVM_SYSTEM_TIME_NEW`.
pub const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
/// `MSR_KVM_STEAL_TIME`.
pub const MSR_KVM_STEAL_TIME: u32 = 0x4b56_4d03;
/// `KVM_HC_VAPIC_POLL_IRQ`: forces an exit; returns 0.
pub const KVM_HC_VAPIC_POLL_IRQ: u64 = 1;
/// `KVM_HC_FEATURES` (PowerPC only): -KVM_ENOSYS on x86, a "null" hypercall.
pub const KVM_HC_FEATURES: u64 = 3;
/// `KVM_HC_KICK_CPU`: a0 = flags (0), a1 = APIC ID to wake.
pub const KVM_HC_KICK_CPU: u64 = 5;
/// `KVM_HC_SEND_IPI`: a0/a1 = bitmap, a2 = lowest APIC ID, a3 = ICR low.
pub const KVM_HC_SEND_IPI: u64 = 10;
/// `KVM_HC_SCHED_YIELD`: a0 = APIC ID to yield to; returns 0.
pub const KVM_HC_SCHED_YIELD: u64 = 11;
/// `KVM_EPERM`: what a hypercall from CPL > 0 returns (negated).
pub const KVM_EPERM: i64 = 1;
/// `KVM_ENOSYS`: an unknown hypercall (negated).
pub const KVM_ENOSYS: i64 = 1000;

// KVM's registers: RAX = nr, RBX, RCX, RDX, RSI = a0..a3 (RBX is callee-saved: kept).
crate::hypercall_fns!("KVM", kvm_registers);

/// The bare hypercall instruction, inline: `nr` and `a0` in KVM's registers, `vmmcall` or
/// `vmcall` (the benchmark's "raw" path).
///
/// # Safety
///
/// A KVM host is present and the hypercall's own contract holds.
#[inline(always)]
pub unsafe fn raw_hypercall1(vmmcall: bool, nr: u64, a0: u64) -> i64 {
    let r: i64;
    // SAFETY: forwarded contract. RBX is reserved by LLVM: saved in another register around
    // the instruction.
    unsafe {
        if vmmcall {
            core::arch::asm!("xchg {a0}, rbx", "vmmcall", "xchg {a0}, rbx", a0 = inout(reg) a0 => _,
                             inlateout("rax") nr as i64 => r, options(nostack))
        } else {
            core::arch::asm!("xchg {a0}, rbx", "vmcall", "xchg {a0}, rbx", a0 = inout(reg) a0 => _,
                             inlateout("rax") nr as i64 => r, options(nostack))
        }
    };
    r
}

/// `struct kvm_steal_time` (64 bytes).
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default)]
pub struct KvmStealTime {
    /// Nanoseconds runnable but not running.
    pub steal: u64,
    /// Even when consistent.
    pub version: u32,
    /// Flags (0).
    pub flags: u32,
    /// Bit 0 preempted, bit 1 flush TLB.
    pub preempted: u8,
    /// Padding.
    pub u8_pad: [u8; 3],
    /// Padding.
    pub pad: [u32; 11],
}

static_assertions::assert_eq_size!(KvmStealTime, [u8; 64]);
static_assertions::const_assert_eq!(core::mem::offset_of!(KvmStealTime, preempted), 16);

/// What the backend found and set up; the table's functions read it.
struct State {
    /// kvmclock: the kernel's record of the CPU that started the backend, or the backend's own.
    clock: Clock,
    /// Each CPU's kvmclock record (the kernel's), null where none was read. A CPU reads its
    /// own: KVM keeps one per vCPU, and another vCPU's is valid with this one's TSC only while
    /// the records are stable (seen frozen for 20 ms with 4 vCPUs of a nested guest on one
    /// CPU: this TSC behind the other record's timestamp).
    clocks: [AtomicPtr<PvclockVcpuTimeInfo>; MAX_CPUS],
    /// The MSR the kernel's records were read from (0: the backend's own record, one for all).
    kernel_msr: AtomicU64,
    /// The CPU has `rdtscp`, which tells a reader its CPU number (else all read `clock`'s).
    rdtscp: AtomicBool,
    /// Wall time at system_time 0, in ns (read once at setup).
    wall_base: AtomicU64,
    /// Each CPU's steal-time record (the kernel's), null where none was found.
    steal: [AtomicPtr<KvmStealTime>; MAX_CPUS],
    /// Each CPU's steal time as last read: a steal clock never goes back.
    steal_last: [Monotonic; MAX_CPUS],
    /// The MSR the backend registered its own record with (0: none).
    own_msr: AtomicU64,
    features: AtomicU64,
    /// Whether the lock group is the paravirt one (built in, with Linux's gating).
    pv_locks: AtomicBool,
    /// Whether preempted vCPUs' TLB flushes are left to the host (built in, Linux's gating).
    pv_tlb_flush: AtomicBool,
    /// Whether `irq.send_ipi` is KVM's (Linux's gating).
    pv_ipi: AtomicBool,
    /// Waits entered, halts taken, kicks sent, preempted vCPUs seen, flushes left to the host;
    /// send-IPI hypercalls made, vCPUs they reached, and refused.
    counts: [AtomicU64; COUNTS],
}

static STATE: State = State {
    clock: Clock::new(),
    clocks: [const { AtomicPtr::new(core::ptr::null_mut()) }; MAX_CPUS],
    kernel_msr: AtomicU64::new(0),
    rdtscp: AtomicBool::new(false),
    wall_base: AtomicU64::new(0),
    steal: [const { AtomicPtr::new(core::ptr::null_mut()) }; MAX_CPUS],
    steal_last: [const { Monotonic::new() }; MAX_CPUS],
    own_msr: AtomicU64::new(0),
    features: AtomicU64::new(0),
    pv_locks: AtomicBool::new(false),
    pv_tlb_flush: AtomicBool::new(false),
    pv_ipi: AtomicBool::new(false),
    counts: [const { AtomicU64::new(0) }; COUNTS],
};

/// How many counters [`State::counts`] has: one per [`Count`].
const COUNTS: usize = 8;

/// What the paravirt spinlock ops (built in: the kernel's slow path), the PV TLB flush and PV
/// send-IPI need of the kernel. Provided by the platform ([`Platform::kvm_kernel`]).
#[derive(Clone, Copy, Debug)]
pub struct KvmKernel {
    /// Linux's `nopvspin`.
    pub nopvspin: bool,
    /// `num_possible_cpus()`.
    pub possible_cpus: u32,
    /// `in_nmi()`: nonzero in NMI context.
    pub in_nmi: unsafe extern "C" fn() -> i32,
    /// `per_cpu(x86_cpu_to_apicid, cpu)`.
    pub apic_id: unsafe extern "C" fn(u32) -> u32,
}

/// Set once by `start` before the table is installed; read by the ops afterwards.
struct KernelCell(UnsafeCell<Option<KvmKernel>>);

// SAFETY: written only by `start`, before the ops are installed (no op can run concurrently);
// read-only afterwards.
unsafe impl Sync for KernelCell {}

static KERNEL: KernelCell = KernelCell(UnsafeCell::new(None));

fn kernel() -> Option<&'static KvmKernel> {
    // SAFETY: see `KernelCell`.
    unsafe { (*KERNEL.0.get()).as_ref() }
}

/// Which counter of [`lock_counts`].
#[derive(Clone, Copy)]
enum Count {
    Waits,
    Halts,
    Kicks,
    Preempted,
    FlushesDeferred,
    IpiHypercalls,
    IpiVcpusReached,
    IpiRefused,
}

fn count(c: Count) {
    count_n(c, 1);
}

fn count_n(c: Count, n: u64) {
    STATE.counts[c as usize].fetch_add(n, Ordering::Relaxed);
}

/// The counters since start: the lock group's waits entered, halts taken, kicks sent, the
/// preempted vCPUs `vcpu_is_preempted` saw, and the TLB flushes left to the host.
pub fn lock_counts() -> [u64; 5] {
    let c = &STATE.counts;
    [0, 1, 2, 3, 4].map(|i| c[i].load(Ordering::Relaxed))
}

/// The PV send-IPI counters since start: `KVM_HC_SEND_IPI` hypercalls made, the vCPUs the host
/// says they reached, and the hypercalls it refused.
pub fn ipi_counts() -> [u64; 3] {
    let c = &STATE.counts;
    [5, 6, 7].map(|i| c[i].load(Ordering::Relaxed))
}

/// Whether `irq.send_ipi` is KVM's PV send-IPI.
pub fn pv_ipi() -> bool {
    STATE.pv_ipi.load(Ordering::Relaxed)
}

/// Whether Linux's KVM guest would send IPIs by hypercall (its `pv_ipi_supported`): the host
/// offers it and there is more than one possible CPU.
pub fn wants_pv_ipi(features: u32, k: &KvmKernel) -> bool {
    features & KVM_FEATURE_PV_SEND_IPI != 0 && k.possible_cpus > 1
}

/// APIC IDs one `KVM_HC_SEND_IPI` covers: a 128-bit bitmap from the lowest of them.
pub const KVM_IPI_CLUSTER_SIZE: u32 = 128;
/// The ICR's delivery mode for an NMI (`APIC_DM_NMI`); a fixed interrupt's is 0.
pub const APIC_DM_NMI: u64 = 0x400;

/// The ICR low word `KVM_HC_SEND_IPI` takes for `vector`: a fixed interrupt of that vector, or
/// an NMI for [`NMI_VECTOR`](pvops::ops::irq::NMI_VECTOR) (Linux's `__send_ipi_mask`).
pub fn ipi_icr(vector: u32) -> u64 {
    if vector == pvops::ops::irq::NMI_VECTOR {
        APIC_DM_NMI
    } else {
        u64::from(vector & 0xff)
    }
}

/// Group `apic_ids` (in CPU order) into `KVM_HC_SEND_IPI` batches as Linux's `__send_ipi_mask`
/// does: a batch is a 128-bit bitmap of APIC IDs from its lowest, `min`; an ID that fits the
/// window (below `min` with the highest still inside, or above it) joins the batch, anything
/// else sends it and starts the next. `send(bitmap_low, bitmap_high, min)` makes each one.
/// Pure (the hypercall is `send`), so host tests check it against a modelled host.
pub fn ipi_batches(apic_ids: impl IntoIterator<Item = u32>, mut send: impl FnMut(u64, u64, u32)) {
    let mut bitmap: u128 = 0;
    let (mut min, mut max) = (0u32, 0u32);
    for id in apic_ids {
        if bitmap == 0 {
            (min, max) = (id, id);
        } else if id < min && max - id < KVM_IPI_CLUSTER_SIZE {
            bitmap <<= min - id;
            min = id;
        } else if id >= min && id - min < KVM_IPI_CLUSTER_SIZE {
            max = max.max(id);
        } else {
            send(bitmap as u64, (bitmap >> 64) as u64, min);
            (bitmap, min, max) = (0, id, id);
        }
        bitmap |= 1 << (id - min);
    }
    if bitmap != 0 {
        send(bitmap as u64, (bitmap >> 64) as u64, min);
    }
}

/// The CPUs of a cpumask: the bits set in `mask` below `nbits`, lowest first (one step per set
/// bit, not per bit: it runs on every IPI the kernel sends).
pub fn mask_cpus(mask: &[u64], nbits: u32) -> impl Iterator<Item = u32> + '_ {
    mask.iter()
        .enumerate()
        .flat_map(|(w, &word)| {
            let mut bits = word;
            core::iter::from_fn(move || {
                let b = (bits != 0).then(|| bits.trailing_zeros())?;
                bits &= bits - 1;
                Some(w as u32 * 64 + b)
            })
        })
        .take_while(move |&cpu| cpu < nbits)
}

/// KVM's PV send-IPI over any hypercall (`hypercall(args)`, the backend's or a model's): the
/// CPUs of `mask` as APIC IDs (`apic_id`), batched by [`ipi_batches`], one `KVM_HC_SEND_IPI`
/// each. 1 when every CPU was sent to; 0 when the host refused the first hypercall (nothing
/// was sent: the caller sends through the local APIC). A host that refuses a later batch,
/// having taken earlier ones, is counted (`ipi-refused`) and the rest still sent: sending
/// everything again would interrupt the CPUs reached twice.
pub fn send_ipi_with(
    mask: &[u64],
    nbits: u32,
    vector: u32,
    apic_id: impl Fn(u32) -> u32,
    mut hypercall: impl FnMut([u64; 5]) -> i64,
) -> u64 {
    let icr = ipi_icr(vector);
    let (mut sent, mut refused_first) = (0u32, false);
    ipi_batches(mask_cpus(mask, nbits).map(apic_id), |lo, hi, min| {
        if refused_first {
            return;
        }
        count(Count::IpiHypercalls);
        let r = hypercall([KVM_HC_SEND_IPI, lo, hi, u64::from(min), icr]);
        if r < 0 {
            count(Count::IpiRefused);
            refused_first = sent == 0;
        } else {
            count_n(Count::IpiVcpusReached, r as u64);
        }
        sent += 1;
    });
    u64::from(sent > 0 && !refused_first)
}

/// `irq.send_ipi(mask, nbits, vector)`: KVM's PV send-IPI ([`send_ipi_with`] over the
/// backend's hypercall). Linux's `kvm_send_ipi_mask`.
///
/// # Safety
///
/// Ring 0, interrupts off; `mask` is readable for `nbits` bits.
unsafe extern "C" fn send_ipi(mask: *const u64, nbits: u32, vector: u32) -> u64 {
    let Some(k) = kernel() else { return 0 };
    // SAFETY: the caller's mask, readable for `nbits` bits (rounded up to whole words).
    let mask = unsafe { core::slice::from_raw_parts(mask, nbits.div_ceil(64) as usize) };
    let hypercall = hypercall_pick(KVM.vmmcall.load(Ordering::Relaxed));
    send_ipi_with(
        mask,
        nbits,
        vector,
        // SAFETY: a kernel helper; the mask names possible CPUs.
        |cpu| unsafe { (k.apic_id)(cpu) },
        // SAFETY: KVM is present (the backend started); the hypercall only sends IPIs.
        |[nr, a0, a1, a2, a3]| unsafe { hypercall(nr, a0, a1, a2, a3) },
    )
}

/// Whether preempted vCPUs' TLB flushes are left to the host.
pub fn pv_tlb_flush() -> bool {
    STATE.pv_tlb_flush.load(Ordering::Relaxed)
}

/// Whether Linux's KVM guest would leave preempted vCPUs' TLB flushes to the host (its
/// `pv_tlb_flush_supported`): the host offers it and steal time, the vCPUs are not dedicated,
/// the CPU has no MWAIT (`mwait`: CPUID.1:ECX.MONITOR), and there is more than one.
pub fn wants_pv_tlb_flush(features: u32, hints: u32, mwait: bool, k: &KvmKernel) -> bool {
    features & KVM_FEATURE_PV_TLB_FLUSH != 0
        && features & KVM_FEATURE_STEAL_TIME != 0
        && hints & KVM_HINTS_REALTIME == 0
        && !mwait
        && k.possible_cpus > 1
}

/// `mmu.flush_tlb_defer(cpu)`: KVM's PV TLB flush (Linux's `kvm_flush_tlb_multi`): where
/// `cpu`'s vCPU is preempted, set the flush request in its steal-time record, atomically
/// against the host clearing `preempted` as it resumes the vCPU; the host flushes before it
/// runs again, so the caller need not interrupt it. A running vCPU (or one resumed meanwhile)
/// is left to the caller's IPI.
pub extern "C" fn flush_tlb_defer(cpu: u32) -> u64 {
    let Some(rec) = steal_record(cpu) else {
        return 0;
    };
    // SAFETY: the kernel's steal-time record of `cpu`, live while the CPU is possible, whose
    // `preempted` byte the host and the guest change only atomically.
    let flag = unsafe {
        core::sync::atomic::AtomicU8::from_ptr(core::ptr::addr_of_mut!((*rec).preempted))
    };
    let state = flag.load(Ordering::Relaxed);
    if state & KVM_VCPU_PREEMPTED == 0 {
        return 0;
    }
    match flag.compare_exchange(
        state,
        state | KVM_VCPU_FLUSH_TLB,
        Ordering::AcqRel,
        Ordering::Relaxed,
    ) {
        Ok(_) => {
            count(Count::FlushesDeferred);
            1
        }
        Err(_) => 0,
    }
}

/// Whether the lock group is the paravirt one.
pub fn pv_locks() -> bool {
    STATE.pv_locks.load(Ordering::Relaxed)
}

/// Whether Linux's KVM guest would run paravirt spinlocks (its `kvm_spinlock_init`): the host
/// can wake a halted vCPU, the vCPUs are not dedicated, there is more than one, and
/// `nopvspin` was not given.
pub fn wants_pv_locks(features: u32, hints: u32, k: &KvmKernel) -> bool {
    features & KVM_FEATURE_PV_UNHALT != 0
        && hints & KVM_HINTS_REALTIME == 0
        && k.possible_cpus > 1
        && !k.nopvspin
}

/// What a waiter does (the lock group's `wait`): Linux's `kvm_wait`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitAction {
    /// Return at once: in NMI context, or the byte changed already.
    Return,
    /// `hlt` with interrupts off (they were off): only a kick wakes it.
    Halt,
    /// `sti; hlt` (they were on): a kick or an interrupt wakes it.
    SafeHalt,
}

/// [`WaitAction`] for a waiter on a byte that holds `now` and waits while it is `val`.
pub fn wait_action(in_nmi: bool, irqs_on: bool, now: u8, val: u8) -> WaitAction {
    match (in_nmi, now == val, irqs_on) {
        (true, ..) | (false, false, _) => WaitAction::Return,
        (false, true, false) => WaitAction::Halt,
        (false, true, true) => WaitAction::SafeHalt,
    }
}

/// `lock.wait(ptr, val)`: halt until `*ptr` is no longer `val` or this vCPU is kicked (Linux's
/// `kvm_wait`). The byte is read with interrupts off, so a kick that comes between the read
/// and the halt is not lost (KVM's unhalt flag keeps it).
///
/// # Safety
///
/// Ring 0; `ptr` is readable.
unsafe extern "C" fn wait(ptr: *mut u8, val: u8) {
    // SAFETY: a kernel helper with no precondition.
    let in_nmi = kernel().is_some_and(|k| unsafe { (k.in_nmi)() } != 0);
    count(Count::Waits);
    let flags: u64;
    // SAFETY: reads RFLAGS.
    unsafe {
        core::arch::asm!("pushfq", "pop {}", out(reg) flags, options(nomem, preserves_flags))
    };
    let irqs_on = flags & pvops::ops::irq::X86_EFLAGS_IF != 0;
    // SAFETY: ring 0 (forwarded): interrupts off while the byte is read (restored below).
    unsafe { core::arch::asm!("cli", options(nomem, nostack)) };
    // SAFETY: the caller passes a readable byte; volatile, as another CPU changes it.
    let now = unsafe { ptr.read_volatile() };
    match wait_action(in_nmi, irqs_on, now, val) {
        WaitAction::Return if irqs_on => {
            // SAFETY: they were on.
            unsafe { core::arch::asm!("sti", options(nomem, nostack)) }
        }
        WaitAction::Return => {}
        WaitAction::Halt => {
            count(Count::Halts);
            // SAFETY: ring 0; interrupts stay off: a kick (or an NMI) wakes it.
            unsafe { core::arch::asm!("hlt", options(nomem, nostack)) }
        }
        WaitAction::SafeHalt => {
            count(Count::Halts);
            // SAFETY: ring 0; `sti` takes effect after `hlt` starts, so no wake-up is lost.
            unsafe { core::arch::asm!("sti", "hlt", options(nomem, nostack)) }
        }
    }
}

/// The hypercall the lock group's `kick` makes for the CPU with APIC ID `apic_id`: `KVM_HC_KICK_CPU`, flags 0.
pub fn kick_args(apic_id: u32) -> [u64; 5] {
    [KVM_HC_KICK_CPU, 0, u64::from(apic_id), 0, 0]
}

/// `lock.kick(cpu)`: wake `cpu`'s vCPU from [`wait`] (Linux's `kvm_kick_cpu`).
///
/// # Safety
///
/// Ring 0; `cpu` is a possible CPU.
unsafe extern "C" fn kick(cpu: u32) {
    let Some(k) = kernel() else { return };
    // SAFETY: a kernel helper; `cpu` is a possible CPU.
    let [nr, a0, a1, a2, a3] = kick_args(unsafe { (k.apic_id)(cpu) });
    count(Count::Kicks);
    let hypercall = hypercall_pick(KVM.vmmcall.load(Ordering::Relaxed));
    // SAFETY: KVM is present (the backend started); a kick only wakes a vCPU.
    let _ = unsafe { hypercall(nr, a0, a1, a2, a3) };
}

/// Whether `cpu`'s vCPU is preempted: the preempted flag of its steal-time record (false where
/// the CPU has none, or none was read yet: Linux's reads a zeroed record then).
pub extern "C" fn vcpu_is_preempted(cpu: u64) -> u64 {
    let Some(rec) = u32::try_from(cpu).ok().and_then(steal_record) else {
        return 0;
    };
    // SAFETY: the kernel's steal-time record of `cpu`, live while the CPU is possible;
    // volatile, as the host writes it.
    let flag = unsafe { core::ptr::addr_of!((*rec).preempted).read_volatile() };
    if flag & KVM_VCPU_PREEMPTED == 0 {
        return 0;
    }
    count(Count::Preempted);
    1
}

pvops::callee_save_thunk!(
    /// [`vcpu_is_preempted`] in the lock group's callee-save slot.
    fn vcpu_is_preempted_thunk(cpu: u64) -> u64 => vcpu_is_preempted
);

#[cfg(pvops_builtin)]
extern "C" {
    /// The kernel's slow path of the paravirt unlock (a waiter halted on the lock: find it and
    /// kick it), callee-save: the lock in RDI, the locked byte found in RSI.
    fn __raw_callee_save___pv_queued_spin_unlock_slowpath();
}

/// `lock.queued_spin_unlock(lock)` of the kernel's paravirt qspinlock: release the locked byte
/// from `_Q_LOCKED_VAL` (1) to 0 with `cmpxchg`; if it held anything else (`_Q_SLOW_VAL`: a
/// waiter halted), leave the release to the kernel's slow path with the byte found. Callee-save
/// (it keeps RDX and RSI); in `.spinlock.text` with the kernel's own lock functions.
///
/// # Safety
///
/// `lock` is a kernel qspinlock this CPU holds.
#[cfg(pvops_builtin)]
#[unsafe(naked)]
#[link_section = ".spinlock.text"]
unsafe extern "C" fn pv_queued_spin_unlock(lock: *mut u8) {
    core::arch::naked_asm!(
        "endbr64",
        "push rdx",
        "mov eax, 1",
        "xor edx, edx",
        "lock cmpxchg byte ptr [rdi], dl",
        "jne 2f",
        "pop rdx",
        pvops::__asm_ret!(),
        "2:",
        "push rsi",
        "movzx esi, al",
        "call {slowpath}",
        "pop rsi",
        "pop rdx",
        pvops::__asm_ret!(),
        slowpath = sym __raw_callee_save___pv_queued_spin_unlock_slowpath,
    )
}

/// The CPU the backend's own record is registered on, and unregistered on, whichever CPU runs
/// `start` and `stop` (CPU 0: the boot CPU, never taken offline).
pub const OWN_RECORD_CPU: u32 = 0;

/// A record of the backend's own, for kernels booted without kvmclock: 64-byte aligned so the
/// 32 bytes never cross a page.
#[repr(C, align(64))]
struct OwnRecord(core::cell::UnsafeCell<PvclockVcpuTimeInfo>);
// SAFETY: written only by the host (through the registration) and read with the version
// protocol.
unsafe impl Sync for OwnRecord {}
static OWN_RECORD: OwnRecord = OwnRecord(core::cell::UnsafeCell::new(PvclockVcpuTimeInfo {
    version: 0,
    pad0: 0,
    tsc_timestamp: 0,
    system_time: 0,
    tsc_to_system_mul: 0,
    tsc_shift: 0,
    flags: 0,
    pad: [0; 2],
}));

/// The buffer the host fills when MSR_KVM_WALL_CLOCK_NEW is written.
#[repr(C, align(16))]
struct WallBuf(core::cell::UnsafeCell<PvclockWallClock>);
// SAFETY: written by the host once per MSR write, read with the version protocol.
unsafe impl Sync for WallBuf {}
static WALL: WallBuf = WallBuf(core::cell::UnsafeCell::new(PvclockWallClock {
    version: 0,
    sec: 0,
    nsec: 0,
}));

/// The kvmclock record of the CPU this runs on, if one was read for it. (A reader moved to
/// another CPU right after may read this one's record with that CPU's TSC, as a reader always
/// did before: the clamp of a clock that is not stable keeps that monotonic.)
fn this_cpu_record() -> Option<*mut PvclockVcpuTimeInfo> {
    if !STATE.rdtscp.load(Ordering::Relaxed) {
        return None;
    }
    let cpu = (arch::rdtscp().1 & 0xfff) as usize;
    let rec = STATE.clocks.get(cpu)?.load(Ordering::Acquire);
    (!rec.is_null()).then_some(rec)
}

/// kvmclock nanoseconds since the backend was set up, from this CPU's record.
pub extern "C" fn sched_clock() -> u64 {
    crate::time::handed_out(STATE.clock.since_start_at(clock_now()))
}

/// kvmclock nanoseconds (the record's timeline), from this CPU's record.
fn clock_now() -> u64 {
    match this_cpu_record() {
        // SAFETY: the kernel's record of this CPU: registered while the CPU is possible, in
        // memory the kernel never frees.
        Some(rec) => unsafe { STATE.clock.now_on(rec) },
        None => STATE.clock.now(),
    }
}

extern "C" fn tsc_khz() -> u64 {
    STATE.clock.tsc_khz()
}

/// Whether the host's wall clock was read at start (an optional part: without it the wall
/// clock reads 0, unknown).
pub fn has_wall_clock() -> bool {
    STATE.wall_base.load(Ordering::Relaxed) != 0
}

extern "C" fn wall_clock() -> u64 {
    let base = STATE.wall_base.load(Ordering::Relaxed);
    if base == 0 {
        return 0;
    }
    base + clock_now()
}

/// `cpu`'s steal-time record (the kernel's), if one was read for it.
fn steal_record(cpu: u32) -> Option<*mut KvmStealTime> {
    let rec = STATE.steal.get(cpu as usize)?.load(Ordering::Acquire);
    (!rec.is_null()).then_some(rec)
}

/// The steal time of `cpu` in ns (0 when KVM does not offer it or the CPU is not tracked),
/// never less than the last reading: a record whose version stays odd (its vCPU preempted by
/// the host in the middle of an update) reads as its last value, never as 0. Linux takes a
/// steal clock that goes back as a huge steal, and would count every later tick as stolen.
pub extern "C" fn steal_clock(cpu: u32) -> u64 {
    let (Some(rec), Some(last)) = (steal_record(cpu), STATE.steal_last.get(cpu as usize)) else {
        return 0;
    };
    let read = read_versioned(
        // SAFETY: the kernel's steal-time record of `cpu` lives as long as the CPU is possible;
        // volatile because the host updates it (likewise below).
        || unsafe { core::ptr::addr_of!((*rec).version).read_volatile() },
        // SAFETY: as above.
        || unsafe { core::ptr::addr_of!((*rec).steal).read_volatile() },
    );
    last.clamp(read.unwrap_or(0))
}

/// The kernel's per-CPU record registered on `msr` of every CPU that has one now (bit 0 of the
/// MSR set; the address is the MSR's value with its low `flags` bits cleared) into `into`: read
/// back, never registered by the backend.
fn read_kernel_records<T>(platform: &dyn Platform, msr: u32, flags: u64, into: &[AtomicPtr<T>]) {
    for cpu in 0..platform.nr_cpus().min(MAX_CPUS as u32) {
        let rec = platform
            .rdmsr_on_cpu(cpu, msr)
            .filter(|v| v & 1 != 0)
            .and_then(|v| platform.phys_to_virt(v & !flags));
        if let Some(va) = rec {
            into[cpu as usize].store(va as *mut T, Ordering::Release);
        }
    }
}

/// kvmclock: each CPU's record (the kernel's), where the backend reads the kernel's.
fn read_clock_records(platform: &dyn Platform) {
    let msr = STATE.kernel_msr.load(Ordering::Relaxed) as u32;
    if msr != 0 {
        read_kernel_records(platform, msr, 1, &STATE.clocks);
    }
}

/// Steal time: each CPU's record (the kernel's), where KVM offers steal time.
fn read_steal_records(platform: &dyn Platform) {
    if features() & KVM_FEATURE_STEAL_TIME != 0 {
        read_kernel_records(platform, MSR_KVM_STEAL_TIME, 0x3f, &STATE.steal);
    }
}

/// Why the KVM backend could not start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvmError {
    /// KVM offers no kvmclock.
    NoClock,
    /// The clock record could not be found or registered.
    ClockUnavailable,
}

impl core::fmt::Display for KvmError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            KvmError::NoClock => "KVM offers no kvmclock",
            KvmError::ClockUnavailable => "the kvmclock record could not be reached",
        })
    }
}

/// The KVM backend.
#[derive(Debug)]
pub struct Kvm {
    /// AMD or Hygon: hypercalls use `vmmcall`.
    vmmcall: AtomicBool,
}

/// The one instance.
pub static KVM: Kvm = Kvm {
    vmmcall: AtomicBool::new(false),
};

/// No KVM interface in the CPUID scan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoKvm;

impl core::fmt::Display for NoKvm {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("no KVM interface in the CPUID scan")
    }
}

/// Whether the backend registered a clock record of its own (the kernel had none).
pub fn owns_clock() -> bool {
    STATE.own_msr.load(Ordering::Relaxed) != 0
}

/// KVM's feature bits (CPUID base+1 EAX) as found at start.
pub fn features() -> u32 {
    STATE.features.load(Ordering::Relaxed) as u32
}

impl Driver for Kvm {
    const ID: BackendId = BackendId::new("kvm");
    const SERVES: Option<HypervisorKind> = Some(HypervisorKind::Kvm);
    type Found = Interface;
    type Absent = NoKvm;
    type Error = KvmError;

    fn probe(detection: &Detection, _: &dyn Platform) -> Result<Interface, NoKvm> {
        detection.find(HypervisorKind::Kvm).copied().ok_or(NoKvm)
    }

    /// Find (or, without kvmclock in the kernel, register) the records and start the backend.
    fn start(
        iface: Interface,
        detection: &Detection,
        platform: &dyn Platform,
    ) -> Result<&'static Kvm, KvmError> {
        // features in EAX, hints in EDX
        let leaf = platform.cpuid(iface.base + 1, 0);
        let (features, hints) = (leaf.eax, leaf.edx);
        STATE.features.store(u64::from(features), Ordering::Relaxed);
        let msr = if features & KVM_FEATURE_CLOCKSOURCE2 != 0 {
            MSR_KVM_SYSTEM_TIME_NEW
        } else if features & KVM_FEATURE_CLOCKSOURCE != 0 {
            MSR_KVM_SYSTEM_TIME
        } else {
            return Err(KvmError::NoClock);
        };

        // The kernel's record, if it registered one (bit 0 = enabled). Firmware registers a record
        // too (SeaBIOS: GPA 0xe8380) and a kernel booted with no-kvmclock leaves it in place: that
        // one is not the kernel's, and the backend registers its own instead.
        // Where the kernel runs kvmclock, its registration must be read back or the start
        // refused: registering a record of the backend's own would take the host's updates from
        // the kernel's record on this CPU, and unregistering it at unload would stop them.
        let registered = match platform.kernel_kvmclock() {
            Some(false) => None,
            Some(true) => Some(
                platform
                    .rdmsr(msr)
                    .filter(|v| v & 1 != 0)
                    .ok_or(KvmError::ClockUnavailable)?,
            ),
            None => platform.rdmsr(msr).filter(|v| v & 1 != 0),
        };
        let rec = match registered {
            Some(v) => {
                STATE.kernel_msr.store(u64::from(msr), Ordering::Relaxed);
                platform
                    .phys_to_virt(v & !1)
                    .ok_or(KvmError::ClockUnavailable)? as *mut _
            }
            None => {
                let own = OWN_RECORD.0.get();
                // A stale record (from an earlier registration) must not pass for a live one.
                // SAFETY: our own record, not registered with the host right now.
                unsafe { own.write_volatile(PvclockVcpuTimeInfo::default()) };
                let pa = platform
                    .virt_to_phys(own as usize)
                    .ok_or(KvmError::ClockUnavailable)?;
                if !platform.wrmsr_on_cpu(OWN_RECORD_CPU, msr, pa | 1) {
                    return Err(KvmError::ClockUnavailable);
                }
                STATE.own_msr.store(u64::from(msr), Ordering::Relaxed);
                own
            }
        };
        // SAFETY: `rec` is a registered record (the kernel's, or ours just registered).
        let first = unsafe { pvclock::read(rec, arch::rdtsc_ordered) };
        let Ok(first) = first else {
            let _ = Self::stop(platform);
            return Err(KvmError::ClockUnavailable);
        };
        let stable = features & KVM_FEATURE_CLOCKSOURCE_STABLE_BIT != 0;
        // SAFETY: the record stays registered (the kernel's, or ours until teardown) and mapped.
        unsafe { STATE.clock.start(rec, first, stable) };

        // Wall clock: ask the host for one fill of our buffer (this redirects no update stream).
        let wall_msr = if msr == MSR_KVM_SYSTEM_TIME_NEW {
            MSR_KVM_WALL_CLOCK_NEW
        } else {
            MSR_KVM_WALL_CLOCK
        };
        let wall = WALL.0.get();
        if let Some(pa) = platform.virt_to_phys(wall as usize) {
            if platform.wrmsr(wall_msr, pa) {
                // SAFETY: the host just filled the buffer; it is ours.
                if let Ok((sec, nsec)) = unsafe { pvclock::read_wall(wall) } {
                    STATE.wall_base.store(
                        u64::from(sec) * 1_000_000_000 + u64::from(nsec),
                        Ordering::Relaxed,
                    );
                }
            }
        }

        // each CPU's own record, where the CPU can tell its number
        let rdtscp = platform.cpuid(0x8000_0000, 0).eax >= 0x8000_0001
            && platform.cpuid(0x8000_0001, 0).edx & (1 << 27) != 0;
        STATE.rdtscp.store(rdtscp, Ordering::Relaxed);
        read_clock_records(platform);
        read_steal_records(platform);

        // The paravirt spinlock ops, built in, with Linux's gating (the kernel's own choice,
        // made before, is compared with this one by the kernel glue).
        let k = platform.kvm_kernel();
        // SAFETY: see `KernelCell`: the ops are not installed yet.
        unsafe { *KERNEL.0.get() = k };
        let pv = cfg!(pvops_builtin) && k.is_some_and(|k| wants_pv_locks(features, hints, &k));
        STATE.pv_locks.store(pv, Ordering::Relaxed);
        let mwait = platform.cpuid(1, 0).ecx & (1 << 3) != 0;
        // (built in only: only the kernel's flush_tlb_multi adapter asks it)
        let flush = cfg!(pvops_builtin)
            && k.is_some_and(|k| wants_pv_tlb_flush(features, hints, mwait, &k));
        STATE.pv_tlb_flush.store(flush, Ordering::Relaxed);
        let ipi = k.is_some_and(|k| wants_pv_ipi(features, &k));
        STATE.pv_ipi.store(ipi, Ordering::Relaxed);
        for c in &STATE.counts {
            c.store(0, Ordering::Relaxed);
        }

        KVM.vmmcall
            .store(detection.vendor.uses_vmmcall(), Ordering::Relaxed);
        Ok(&KVM)
    }

    /// The kernel's steal-time record of every CPU online now (the boot CPU's alone, when the
    /// backend starts at boot).
    fn refresh_cpus(platform: &dyn Platform) {
        read_clock_records(platform);
        read_steal_records(platform);
    }

    /// Undo what `start` registered (the backend's own clock record, if any) and forget the rest.
    /// Says what it released.
    fn stop(platform: &dyn Platform) -> &'static str {
        let msr = STATE.own_msr.swap(0, Ordering::Relaxed);
        let released = if msr == 0 {
            "nothing registered"
        } else if platform.wrmsr_on_cpu(OWN_RECORD_CPU, msr as u32, 0) {
            "own kvmclock record unregistered"
        } else {
            "own kvmclock record could NOT be unregistered"
        };
        STATE.clock.stop();
        STATE.kernel_msr.store(0, Ordering::Relaxed);
        for c in &STATE.clocks {
            c.store(core::ptr::null_mut(), Ordering::Relaxed);
        }
        for s in &STATE.steal {
            s.store(core::ptr::null_mut(), Ordering::Relaxed);
        }
        for l in &STATE.steal_last {
            l.reset(0);
        }
        released
    }
}

impl Backend for Kvm {
    fn id(&self) -> BackendId {
        Self::ID
    }

    fn ops(&self) -> BackendOps {
        let mut ops = native::OPS;
        ops.timer.sched_clock = Impl::call(sched_clock);
        ops.timer.steal_clock = Impl::call(steal_clock);
        ops.timer.tsc_khz = Impl::call(tsc_khz);
        ops.timer.wall_clock = Impl::call(wall_clock);
        ops.cpu.hypercall = Impl::call(hypercall_pick(self.vmmcall.load(Ordering::Relaxed)));
        if features() & KVM_FEATURE_NOP_IO_DELAY != 0 {
            ops.cpu.io_delay = native::NOTHING_CALLEE_SAVE;
        }
        if features() & KVM_FEATURE_STEAL_TIME != 0 {
            ops.lock.vcpu_is_preempted = Impl::call(vcpu_is_preempted_thunk);
        }
        if pv_tlb_flush() {
            ops.mmu.flush_tlb_defer = Impl::call(flush_tlb_defer);
        }
        if pv_ipi() {
            ops.irq.send_ipi = Impl::call(send_ipi);
        }
        // (only ever set built in: the unlock calls the kernel's slow path)
        if pv_locks() {
            #[cfg(pvops_builtin)]
            {
                // SAFETY: a callee-save function (it keeps every register but RAX; the
                // kernel's slow path it calls is callee-save too).
                ops.lock.queued_spin_unlock = Impl::call(unsafe {
                    pvops::ops::CalleeSave::declare(
                        pv_queued_spin_unlock as unsafe extern "C" fn(*mut u8),
                    )
                });
            }
            ops.lock.wait = Impl::call(wait);
            ops.lock.kick = Impl::call(kick);
        }
        ops
    }

    fn null_hypercall(&self) -> Option<NullHypercall> {
        if features() & KVM_FEATURE_PV_SCHED_YIELD != 0 {
            // A directed yield to this very vCPU (not preempted): answered 0.
            let apic_id = u64::from(arch::raw_cpuid(1, 0).ebx >> 24);
            return Some(NullHypercall {
                args: [KVM_HC_SCHED_YIELD, apic_id, 0, 0, 0],
                expect: 0,
            });
        }
        // An exit to the host and back, always answered 0.
        Some(NullHypercall {
            args: [KVM_HC_VAPIC_POLL_IRQ, 0, 0, 0, 0],
            expect: 0,
        })
    }

    fn describe(&self) -> &'static str {
        let per_cpu = STATE.rdtscp.load(Ordering::Relaxed);
        match (owns_clock(), per_cpu, has_wall_clock()) {
            (true, _, true) => "kvmclock: own record, registered at load (the kernel has none)",
            (true, _, false) => "kvmclock: own record, registered at load (the kernel has none); no wall clock (the host's could not be read at start)",
            (false, true, true) => "kvmclock: the kernel's records, read back, each CPU its own",
            (false, true, false) => "kvmclock: the kernel's records, read back, each CPU its own; no wall clock (the host's could not be read at start)",
            (false, false, true) => "kvmclock: the kernel's record of the loading CPU, read back, for every CPU (no rdtscp to tell them apart)",
            (false, false, false) => "kvmclock: the kernel's record of the loading CPU, read back, for every CPU (no rdtscp to tell them apart); no wall clock (the host's could not be read at start)",
        }
    }

    fn sends_ipis(&self) -> bool {
        pv_ipi()
    }

    fn counters(&self, each: &mut dyn FnMut(&'static str, u64)) {
        let [waits, halts, kicks, preempted, deferred] = lock_counts();
        if pv_locks() {
            each("lock-waits", waits);
            each("lock-halts", halts);
            each("lock-kicks", kicks);
        }
        if features() & KVM_FEATURE_STEAL_TIME != 0 {
            each("preempted-seen", preempted);
        }
        if pv_tlb_flush() {
            each("tlb-flushes-deferred", deferred);
        }
        if pv_ipi() {
            let [hypercalls, reached, refused] = ipi_counts();
            each("ipi-hypercalls", hypercalls);
            each("ipi-vcpus-reached", reached);
            each("ipi-refused", refused);
        }
    }

    fn serves_kernel(&self, op: Op) -> Result<(), &'static str> {
        // The CPU, IRQ and MMU ops are the native backend's (a KVM guest's kernel runs in ring
        // 0): the bare instructions, the kernel's own native code. Not the hypercall; io_delay
        // (nothing where KVM says port 0x80 delays are useless, as Linux's KVM code has it)
        // where Linux's is the same delay (the kernel glue checks). Of the time ops, sched_clock when it reads the
        // kernel's own kvmclock record: the clock Linux's kvm_sched_clock_read reads, so the
        // two differ by a constant and the kernel's clock can change hands and back without a
        // step (with a record of its own, the kernel's clock is the TSC: they would drift).
        match op {
            Op::SchedClock if owns_clock() => Err(
                "the backend's kvmclock record is its own, the kernel's clock the TSC: they \
                 would drift apart",
            ),
            Op::SchedClock => Ok(()),
            // the kernel's own steal-time records, the ones Linux's kvm_steal_clock reads
            // (read again for every CPU at the initcall: refresh_cpus)
            Op::StealClock => Ok(()),
            Op::Hypercall => Err("this backend's own, not the kernel's native one"),
            _ if op.group() == Group::Timer => {
                Err("the kernel's own time code reads these records itself")
            }
            _ => Ok(()),
        }
    }
}
