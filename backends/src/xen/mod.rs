//! The Xen backend, for HVM guests and PV domains. ABI: shared/docs/abi-xen.md.
//!
//! What both share lives here (version, time, steal, one-shot timer); what a PV domain needs
//! instead of privileged instructions is in [`pv`], chosen at start when the kernel
//! says it is a PV domain.
//!
//! - **Found** by the CPUID scan (`XenVMMXenVMM` with at least two leaves after its base, as
//!   Linux demands), at 0x4000_0000 or 0x4000_0100 behind Viridian.
//! - **Hypercalls** fill `cpu.hypercall`: Xen's convention (RAX = number, RDI, RSI, RDX, R10, R8)
//!   with `vmcall` or `vmmcall` chosen once from the CPU vendor, as for KVM.
//! - **Time** from a pvclock record Xen keeps for vCPU 0: the kernel's secondary time area (the
//!   one it registers for its vDSO when the TSC is stable, published through
//!   `pvclock_get_pvti_cpu0_va()`), read back; or, where the kernel registered none, one the
//!   backend registers with `VCPUOP_register_vcpu_time_memory_area`, in a page of its own, and
//!   unregisters at teardown (a NULL area). QEMU's Xen emulation refuses the NULL area, so the
//!   host would go on writing into that page: the page is then kept allocated (a deliberate
//!   leak of one page, reported) rather than freed under the host's writes. The kernel's `vcpu_info` and `shared_info` are not reachable from a module in
//!   6.12 (neither `xen_vcpu` nor `HYPERVISOR_shared_info` is exported), and mapping
//!   `shared_info` again would move the kernel's, so the backend stays off both: the wall clock
//!   reads 0 (unknown).
//! - **One-shot timer** with `VCPUOP_set_singleshot_timer` (absolute Xen system time).
//! - **Steal time** from `VCPUOP_get_runstate_info` (runnable + offline), 0 where the host does
//!   not implement it (QEMU's emulation).
//! - **PV domains** take time from vCPU 0's `vcpu_info` (the kernel's, which Xen keeps
//!   current), the wall clock from `shared_info`, hypercalls through `syscall`, and every
//!   privileged op through its PV replacement ([`pv`]).
//! - **Everything else is native** on HVM: an HVM guest's kernel runs in ring 0 with real
//!   interrupt flags and page tables.

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

pub mod abi;
pub mod decode;
pub mod pv;

use pvops::detect::{Detection, HypervisorKind, Interface};
use pvops::ops::{BackendOps, Impl};
use pvops::{arch, Backend, BackendId, NullHypercall};

use crate::pvclock::{self, Clock, PvclockVcpuTimeInfo};
use crate::{native, Driver, Platform, MAX_CPUS};
use abi::*;
use pv::PvError;

// Xen's registers: RAX = nr, RDI, RSI, RDX, R10 = a0..a3.
crate::hypercall_fns!(
    "Xen",
    [
        "mov rax, rdi",
        "mov rdi, rsi",
        "mov rsi, rdx",
        "mov rdx, rcx",
        "mov r10, r8"
    ],
    []
);

struct State {
    /// Xen system time: the kernel's secondary time area, or the backend's own.
    clock: Clock,
    vmmcall: AtomicBool,
    /// A PV domain: `syscall` hypercalls and the ops of [`pv`].
    pv: AtomicBool,
    version: AtomicU32,
    /// Xen vCPU id of each CPU (u32::MAX: unknown).
    vcpu_ids: [AtomicU32; MAX_CPUS],
    /// The vCPU the backend registered its own time area for (u32::MAX: none).
    own_area: AtomicU32,
    /// VCPUOP_get_runstate_info answered once with an error: do not ask again.
    no_runstate: AtomicBool,
    /// A modelled host's hypercall entry (HVM, host tests; 0: the instruction).
    model: AtomicUsize,
}

static STATE: State = State {
    clock: Clock::new(),
    vmmcall: AtomicBool::new(false),
    pv: AtomicBool::new(false),
    version: AtomicU32::new(0),
    vcpu_ids: [const { AtomicU32::new(u32::MAX) }; MAX_CPUS],
    own_area: AtomicU32::new(u32::MAX),
    no_runstate: AtomicBool::new(false),
    model: AtomicUsize::new(0),
};

/// The page holding the backend's own time area (0: none).
static OWN_PAGE: AtomicU64 = AtomicU64::new(0);
/// A time area the host refused to unregister at a stop: it may still be written, so it is
/// never freed, but the next start (a live switch back to Xen) registers it again rather than
/// keeping a second page.
static KEPT_PAGE: AtomicU64 = AtomicU64::new(0);

/// A Xen hypercall through the function chosen at init.
///
/// # Safety
///
/// The backend is started (a Xen host is present) and the hypercall's contract holds.
unsafe fn hypercall(nr: u64, a0: u64, a1: u64, a2: u64) -> i64 {
    // SAFETY: forwarded contract.
    unsafe { hypercall_fn()(nr, a0, a1, a2, 0) }
}

/// The `cpu.hypercall` of this domain: `syscall` (PV) or the vendor's instruction (HVM; a
/// modelled host's entry instead in host tests, [`Platform::hypercall_model`]).
fn hypercall_fn() -> crate::hypercall::HypercallFn {
    if is_pv() {
        return pv::hypercall_syscall;
    }
    match STATE.model.load(Ordering::Relaxed) {
        0 => hypercall_pick(STATE.vmmcall.load(Ordering::Relaxed)),
        // SAFETY: stored by `start` from the platform's `HypercallFn`.
        f => unsafe { core::mem::transmute::<usize, crate::hypercall::HypercallFn>(f) },
    }
}

/// Whether the backend runs a PV domain.
pub fn is_pv() -> bool {
    STATE.pv.load(Ordering::Relaxed)
}

/// `vcpu_op(cmd, vcpu, arg)`.
///
/// # Safety
///
/// As [`hypercall`]; `arg` points at the structure `cmd` reads or writes.
unsafe fn vcpu_op<T>(cmd: u64, vcpu: u64, arg: *mut T) -> i64 {
    // SAFETY: forwarded contract.
    unsafe { hypercall(HYPERVISOR_VCPU_OP, cmd, vcpu, arg as u64) }
}

/// Register `va` (a guest virtual address; 0 unregisters) as `vcpu`'s secondary time area.
///
/// # Safety
///
/// As [`hypercall`]; `va` is 0 or a 32-byte area that stays allocated while registered.
unsafe fn register_time_area(vcpu: u64, va: u64) -> i64 {
    let mut area = va;
    // SAFETY: forwarded contract; `area` lives across the call.
    unsafe {
        vcpu_op(
            VCPUOP_REGISTER_VCPU_TIME_MEMORY_AREA,
            vcpu,
            core::ptr::addr_of_mut!(area),
        )
    }
}

/// Xen system time since the backend was set up.
pub extern "C" fn sched_clock() -> u64 {
    crate::time::handed_out(STATE.clock.since_start())
}

extern "C" fn tsc_khz() -> u64 {
    STATE.clock.tsc_khz()
}

extern "C" fn wall_clock() -> u64 {
    if is_pv() {
        pv::wall_clock(STATE.clock.now())
    } else {
        0
    }
}

/// The CPU this runs on, from TSC_AUX (Linux stores the CPU number in its low 12 bits; every
/// CPU Xen HVM runs on has `rdtscp`).
fn this_cpu() -> usize {
    (arch::rdtscp().1 & 0xfff) as usize
}

fn vcpu_id(cpu: usize) -> Option<u64> {
    let id = STATE.vcpu_ids.get(cpu)?.load(Ordering::Relaxed);
    (id != u32::MAX).then_some(u64::from(id))
}

extern "C" fn steal_clock(cpu: u32) -> u64 {
    if STATE.no_runstate.load(Ordering::Relaxed) {
        return 0;
    }
    let Some(id) = vcpu_id(cpu as usize) else {
        return 0;
    };
    let mut info = VcpuRunstateInfo::default();
    // SAFETY: VCPUOP_get_runstate_info only writes the 48-byte structure we pass.
    let rc = unsafe { vcpu_op(VCPUOP_GET_RUNSTATE_INFO, id, core::ptr::addr_of_mut!(info)) };
    if rc != 0 {
        STATE.no_runstate.store(true, Ordering::Relaxed);
        return 0;
    }
    info.time[1] + info.time[3]
}

/// Arm this vCPU's one-shot timer `delta_ns` from now.
///
/// # Safety
///
/// The caller owns this CPU's timer (see the op's contract).
unsafe extern "C" fn set_next_event(delta_ns: u64) -> i32 {
    let Some(id) = vcpu_id(this_cpu()) else {
        return -(native::EINVAL);
    };
    let mut t = SingleshotTimer {
        timeout_abs_ns: STATE.clock.now().saturating_add(delta_ns),
        flags: 0,
        pad: 0,
    };
    // SAFETY: forwarded contract; the structure lives across the call.
    let rc = unsafe { vcpu_op(VCPUOP_SET_SINGLESHOT_TIMER, id, core::ptr::addr_of_mut!(t)) };
    rc as i32
}

/// Why the Xen backend could not start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XenError {
    /// Xen does not let an HVM guest use its pvclock.
    NoSafePvclock,
    /// No time record could be found or registered.
    ClockUnavailable,
    /// The PV half could not start.
    Pv(PvError),
}

impl core::fmt::Display for XenError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            XenError::NoSafePvclock => "Xen does not offer hvm_safe_pvclock",
            XenError::ClockUnavailable => "no Xen time record could be found or registered",
            XenError::Pv(e) => return write!(f, "pv: {e}"),
        })
    }
}

/// The Xen backend.
#[derive(Debug)]
pub struct Xen;

/// The one instance.
pub static XEN: Xen = Xen;

/// No Xen interface (with at least two leaves, as Linux demands) in the CPUID scan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoXen;

impl core::fmt::Display for NoXen {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("no Xen interface (with two leaves) in the CPUID scan")
    }
}

fn learn_vcpu_ids(platform: &dyn Platform) {
    for cpu in 0..platform.nr_cpus().min(MAX_CPUS as u32) {
        if let Some(id) = platform.xen_vcpu_id(cpu) {
            STATE.vcpu_ids[cpu as usize].store(id, Ordering::Relaxed);
        }
    }
}

/// Start in a PV domain: the kernel's `vcpu_info` (interrupt flag, CR2, time), `syscall`
/// hypercalls. No feature check: a PV domain's time is always Xen's to give.
fn start_pv(iface: Interface, platform: &dyn Platform) -> Result<&'static Xen, XenError> {
    STATE.pv.store(true, Ordering::Relaxed);
    STATE
        .version
        .store(pv::pv_cpuid(iface.base + 1, 0).eax, Ordering::Relaxed);
    learn_vcpu_ids(platform);
    let kernel = platform
        .xen_pv_kernel()
        .ok_or(XenError::Pv(PvError::NoKernelInfo))?;
    let Some(direct_map) = platform.phys_to_virt(0) else {
        return Err(XenError::Pv(PvError::NoDirectMap));
    };
    let rec = pv::start(kernel).map_err(XenError::Pv)?;
    pv::set_direct_map(Some(direct_map));
    let Some(first) = first_reading(rec, platform) else {
        pv::stop();
        return Err(XenError::ClockUnavailable);
    };
    // SAFETY: CPU 0's vcpu_info is the kernel's, registered with Xen for the kernel's lifetime.
    unsafe { STATE.clock.start(rec, first, true) };
    Ok(&XEN)
}

/// How long a newly registered time area may take to be filled: the registration can complete
/// asynchronously (QEMU's emulation applies it when the target vCPU next runs).
pub const REGISTRATION_TIMEOUT_NS: u64 = 200_000_000;

/// The first consistent reading of `rec`, waiting up to [`REGISTRATION_TIMEOUT_NS`] (measured on
/// the platform's clock; a bounded number of polls without one) for the host to fill it.
fn first_reading(
    rec: *const PvclockVcpuTimeInfo,
    platform: &dyn Platform,
) -> Option<pvclock::Reading> {
    let start = platform.clock_ns();
    // bounded by the time where the platform has a clock, by a number of polls where it has none
    let polls = if start.is_some() { u32::MAX } else { 1_000_000 };
    for _ in 0..polls {
        // SAFETY: `rec` is registered with Xen (the kernel's or ours) and stays mapped.
        if let Ok(r) = unsafe { pvclock::read(rec, arch::rdtsc_ordered) } {
            return Some(r);
        }
        match (start, platform.clock_ns()) {
            (Some(t0), Some(t)) if t.saturating_sub(t0) > REGISTRATION_TIMEOUT_NS => return None,
            _ => core::hint::spin_loop(),
        }
    }
    None
}

/// Whether the backend registered a time area of its own.
pub fn owns_clock() -> bool {
    STATE.own_area.load(Ordering::Relaxed) != u32::MAX
}

impl Driver for Xen {
    const ID: BackendId = BackendId::new("xen");
    const SERVES: Option<HypervisorKind> = Some(HypervisorKind::Xen);
    type Found = Interface;
    type Absent = NoXen;
    type Error = XenError;

    /// In a PV domain the detection must have asked Xen ([`pv::PvCpuid`]).
    fn probe(detection: &Detection, _: &dyn Platform) -> Result<Interface, NoXen> {
        detection
            .find(HypervisorKind::Xen)
            .filter(|i| i.leaves() >= 2)
            .copied()
            .ok_or(NoXen)
    }

    /// Start the backend: version and features, the time record, the vCPU ids.
    fn start(
        iface: Interface,
        detection: &Detection,
        platform: &dyn Platform,
    ) -> Result<&'static Xen, XenError> {
        STATE
            .vmmcall
            .store(detection.vendor.uses_vmmcall(), Ordering::Relaxed);
        // a host that refused runstate info to an earlier start is asked again
        STATE.no_runstate.store(false, Ordering::Relaxed);
        if platform.xen_pv() {
            return start_pv(iface, platform);
        }
        STATE.pv.store(false, Ordering::Relaxed);
        STATE.model.store(
            platform.hypercall_model().map_or(0, |f| f as usize),
            Ordering::Relaxed,
        );
        STATE
            .version
            .store(platform.cpuid(iface.base + 1, 0).eax, Ordering::Relaxed);
        let mut features = [0u32; 2]; // xen_feature_info { submap_idx, submap }
                                      // SAFETY: Xen is present; XENVER_get_features writes the 8-byte structure we pass.
        let rc = unsafe {
            hypercall(
                HYPERVISOR_XEN_VERSION,
                XENVER_GET_FEATURES,
                features.as_mut_ptr() as u64,
                0,
            )
        };
        if rc != 0 || features[1] & XENFEAT_HVM_SAFE_PVCLOCK == 0 {
            return Err(XenError::NoSafePvclock);
        }
        learn_vcpu_ids(platform);

        let rec = match platform.kernel_pvclock_cpu0() {
            Some(va) => va as *mut PvclockVcpuTimeInfo,
            None => {
                let vcpu0 = vcpu_id(0).ok_or(XenError::ClockUnavailable)?;
                // A page of its own, not module memory: it may have to outlive the module.
                let kept = KEPT_PAGE.swap(0, Ordering::Relaxed) as usize;
                let page = match kept {
                    0 => platform.alloc_page().ok_or(XenError::ClockUnavailable)?,
                    kept => kept,
                };
                let own = page as *mut PvclockVcpuTimeInfo;
                // SAFETY: the page is ours (fresh, or kept from an earlier start); its old
                // record must not pass for the host's answer to this registration.
                unsafe { own.write_volatile(PvclockVcpuTimeInfo::default()) };
                // SAFETY: registers the page for vCPU 0 (Xen translates the virtual address); it
                // stays allocated until teardown unregisters it, or for good if that is refused.
                let rc = unsafe { register_time_area(vcpu0, page as u64) };
                if rc != 0 {
                    match kept {
                        0 => platform.free_page(page),
                        // still registered from before: kept
                        _ => KEPT_PAGE.store(page as u64, Ordering::Relaxed),
                    }
                    return Err(XenError::ClockUnavailable);
                }
                STATE.own_area.store(vcpu0 as u32, Ordering::Relaxed);
                OWN_PAGE.store(page as u64, Ordering::Relaxed);
                own
            }
        };
        let Some(first) = first_reading(rec, platform) else {
            let _ = Self::stop(platform);
            return Err(XenError::ClockUnavailable);
        };
        // SAFETY: the area stays registered (the kernel's, or ours until teardown) and mapped.
        // Xen's stable flag means cross-vCPU consistency (abi-xen.md §3.4).
        unsafe { STATE.clock.start(rec, first, true) };
        Ok(&XEN)
    }

    /// Unregister what `start` registered; says what was released.
    fn stop(platform: &dyn Platform) -> &'static str {
        let vcpu = STATE.own_area.swap(u32::MAX, Ordering::Relaxed);
        STATE.clock.stop();
        if STATE.pv.swap(false, Ordering::Relaxed) {
            pv::stop();
            return "nothing registered (the kernel's vcpu_info and shared_info were read)";
        }
        if vcpu == u32::MAX {
            return "nothing registered";
        }
        // SAFETY: unregisters (NULL area) what init registered.
        let rc = unsafe { register_time_area(u64::from(vcpu), 0) };
        let page = OWN_PAGE.swap(0, Ordering::Relaxed) as usize;
        if rc == 0 {
            platform.free_page(page);
            "own time area unregistered"
        } else {
            // The host keeps writing into the page: it must never be freed (a later start
            // registers it again).
            KEPT_PAGE.store(page as u64, Ordering::Relaxed);
            "own time area kept: the host refused to unregister it (its page stays allocated)"
        }
    }
}

impl Backend for Xen {
    fn id(&self) -> BackendId {
        Self::ID
    }

    fn ops(&self) -> BackendOps {
        // A PV kernel runs in ring 3: its table replaces every privileged native op and
        // inlines nothing.
        let mut ops = if is_pv() { pv::ops() } else { native::OPS };
        ops.timer.sched_clock = Impl::call(sched_clock);
        ops.timer.steal_clock = Impl::call(steal_clock);
        ops.timer.tsc_khz = Impl::call(tsc_khz);
        ops.timer.wall_clock = Impl::call(wall_clock);
        ops.timer.set_next_event = Impl::call(set_next_event);
        ops.cpu.hypercall = Impl::call(hypercall_fn());
        ops
    }

    fn null_hypercall(&self) -> Option<NullHypercall> {
        // XENVER_version: answers the version CPUID announced.
        Some(NullHypercall {
            args: [HYPERVISOR_XEN_VERSION, XENVER_VERSION, 0, 0, 0],
            expect: i64::from(STATE.version.load(Ordering::Relaxed)),
        })
    }

    fn describe(&self) -> &'static str {
        if is_pv() {
            "xen pv: the kernel's vcpu_info (upcall mask, cr2, time) and shared_info (wall clock)"
        } else if owns_clock() {
            "xen hvm: own time area for vCPU 0, registered at load"
        } else {
            "xen hvm: the kernel's secondary time area, read back"
        }
    }

    fn serves_kernel(&self, op: pvops::Op) -> Result<(), &'static str> {
        use pvops::ops::Group;
        use pvops::Op;
        if is_pv() {
            // the ops that work on the kernel's vcpu_info the way Linux's xen-asm.S does (the
            // upcall mask with the pending check, CR2)
            match op {
                Op::SaveFl | Op::IrqDisable | Op::IrqEnable | Op::ReadCr2 | Op::WriteCr2 => Ok(()),
                // state shared by several members is taken whole or left whole
                Op::SetPte | Op::SetPmd | Op::SetPud | Op::LazyModeEnter | Op::LazyModeLeave => Err(
                    "Xen PV's page-table writes share the kernel's lazy-MMU multicall batch: \
                     left whole to the kernel",
                ),
                Op::ReadCr3 | Op::WriteCr3 | Op::ReadCr4 | Op::WriteCr4 => Err(
                    "forwards to the kernel's own accessor, itself a pv site (it would call itself)",
                ),
                op if op.is_page_table_value() => Err(
                    "the frame conversion needs the kernel's own p2m: forwards to the kernel's \
                     conversion, itself a pv site (it would call itself)",
                ),
                Op::Cpuid => Err(
                    "Linux's xen_cpuid hides what a PV kernel must not use (its leaf masks); \
                     this backend's is Xen's answer unmasked",
                ),
                Op::ReadMsr | Op::WriteMsr | Op::ReadMsrSafe | Op::WriteMsrSafe => Err(
                    "Linux's xen_read_msr/xen_write_msr emulate the MSRs a PV kernel cannot \
                     reach (segment bases, the SYSCALL MSRs, ...)",
                ),
                Op::FlushTlbDefer => Err(
                    "Linux's xen_flush_tlb_multi flushes other vCPUs with one \
                     MMUEXT_TLB_FLUSH_MULTI",
                ),
                Op::AllocPt | Op::ReleasePt => Err(
                    "the kernel's own Xen PV code pins and unpins its page tables (with its \
                     lazy-MMU batch): left whole to it",
                ),
                _ => Err("the kernel's own Xen PV code owns this state"),
            }
        } else {
            // HVM: the CPU, IRQ and MMU ops are the native backend's (ring 0, real flags and
            // page tables); not the time ops nor the hypercall, which are Xen's
            if op.group() == Group::Timer {
                Err("the kernel's own Xen time code reads its time areas itself")
            } else if op == Op::Hypercall {
                Err("this backend's own")
            } else {
                Ok(())
            }
        }
    }
}
