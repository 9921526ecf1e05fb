//! The native backend: the real instructions, for bare hardware and for hypervisors that offer
//! no paravirtual interface (QEMU's TCG, or a hypervisor whose backend was not asked for).
//!
//! Every callee-save op has one byte sequence, defined once in `native_ops!`: it is both the
//! inline replacement the patch engine copies into call sites and the body of the function the
//! table slot points at, so the inline, direct and indirect paths execute the same
//! instructions. The host tests decode each sequence to check it is what its comment says.

use core::sync::atomic::{AtomicU64, Ordering};

use pvops::ops::{
    BackendOps, CalleeSave, CpuImpls, CpuidResult, Impl, Inline, IrqImpls, LockImpls, MmuImpls,
    TimerImpls,
};
use pvops::{arch, Backend, BackendId, Detection};

use crate::time::TscScale;
use crate::{Driver, Platform};

/// `-EIO`, returned by the `_safe` MSR ops when the access faults.
pub const EIO: i32 = 5;
/// `-EINVAL`.
pub const EINVAL: i32 = 22;
/// IA32_TSC_DEADLINE.
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// CR4.PGE (global pages).
pub const X86_CR4_PGE: u64 = 1 << 7;

/// Defines, for each callee-save op the native backend runs inline, a naked function executing
/// exactly its bytes and, in [`imp`], the op's [`Impl`]: that function paired with the same
/// bytes as its inline replacement.
macro_rules! native_ops {
    ($(
        $(#[$doc:meta])*
        $fn:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)?,
            [$($byte:literal),*], clobbers $clob:expr;
    )*) => {
        $(
            $(#[$doc])*
            ///
            /// # Safety
            ///
            /// The op's contract (see [`pvops::ops`]).
            #[unsafe(naked)]
            // rustc gives each naked function a section of its own (`.text.<symbol>`), which
            // the kernel's vmlinux linker script does not place: keep them in `.text`.
            #[link_section = ".text"]
            pub unsafe extern "C" fn $fn($($arg: $ty),*) $(-> $ret)? {
                core::arch::naked_asm!(
                    "endbr64",
                    concat!(".byte ", stringify!($($byte),*)),
                    pvops::__asm_ret!(),
                )
            }
        )*

        /// Each inline op's [`Impl`]: the naked function above and its bytes.
        #[allow(non_upper_case_globals)]
        pub mod imp {
            use pvops::ops::{CalleeSave, Clobbers, Impl, Inline};
            $(
                $(#[$doc])*
                pub const $fn: Impl<CalleeSave<unsafe extern "C" fn($($ty),*) $(-> $ret)?>> =
                    Impl::inline(
                        // SAFETY: the function is exactly these bytes (then `ret`), which
                        // change nothing outside `clobbers`, a subset of RAX and the flags.
                        unsafe { CalleeSave::declare(super::$fn) },
                        Inline { bytes: &[$($byte),*], clobbers: $clob },
                    );
            )*
        }
    };
}

native_ops! {
    /// `mov rax, cr0`
    read_cr0() -> u64, [0x0f, 0x20, 0xc0], clobbers Clobbers::RAX;
    /// `mov cr0, rdi`
    write_cr0(value: u64), [0x0f, 0x22, 0xc7], clobbers Clobbers::empty();
    /// `mov rax, cr4`
    read_cr4() -> u64, [0x0f, 0x20, 0xe0], clobbers Clobbers::RAX;
    /// `mov cr4, rdi`
    write_cr4(value: u64), [0x0f, 0x22, 0xe7], clobbers Clobbers::empty();
    /// `wbinvd`
    wbinvd(), [0x0f, 0x09], clobbers Clobbers::empty();
    /// `lidt [rdi]`
    load_idt(desc: *const pvops::ops::DescriptorPointer), [0x0f, 0x01, 0x1f],
        clobbers Clobbers::empty();
    /// `lgdt [rdi]`
    load_gdt(desc: *const pvops::ops::DescriptorPointer), [0x0f, 0x01, 0x17],
        clobbers Clobbers::empty();
    /// `str rax`
    store_tr() -> u64, [0x48, 0x0f, 0x00, 0xc8], clobbers Clobbers::RAX;
    /// `out 0x80, al`
    io_delay(), [0xe6, 0x80], clobbers Clobbers::empty();
    /// `pushfq; pop rax`
    save_fl() -> u64, [0x9c, 0x58], clobbers Clobbers::RAX;
    /// `push rdi; popfq`
    restore_fl(flags: u64), [0x57, 0x9d], clobbers Clobbers::FLAGS;
    /// `cli`
    irq_disable(), [0xfa], clobbers Clobbers::empty();
    /// `sti`
    irq_enable(), [0xfb], clobbers Clobbers::empty();
    /// `sti; hlt`
    safe_halt(), [0xfb, 0xf4], clobbers Clobbers::empty();
    /// `hlt`
    halt(), [0xf4], clobbers Clobbers::empty();
    /// `mov rax, cr2`
    read_cr2() -> u64, [0x0f, 0x20, 0xd0], clobbers Clobbers::RAX;
    /// `mov cr2, rdi`
    write_cr2(value: u64), [0x0f, 0x22, 0xd7], clobbers Clobbers::empty();
    /// `mov rax, cr3`
    read_cr3() -> u64, [0x0f, 0x20, 0xd8], clobbers Clobbers::RAX;
    /// `mov cr3, rdi`
    write_cr3(value: u64), [0x0f, 0x22, 0xdf], clobbers Clobbers::empty();
    /// `mov rax, cr3; mov cr3, rax`
    flush_tlb_user(), [0x0f, 0x20, 0xd8, 0x0f, 0x22, 0xd8], clobbers Clobbers::RAX;
    /// `invlpg [rdi]`
    flush_tlb_one_user(address: u64), [0x0f, 0x01, 0x3f], clobbers Clobbers::empty();
    /// `mov [rdi], rsi`
    set_pte(ptep: *mut u64, value: u64), [0x48, 0x89, 0x37], clobbers Clobbers::empty();
    /// `mov [rdi], rsi`
    set_pmd(pmdp: *mut u64, value: u64), [0x48, 0x89, 0x37], clobbers Clobbers::empty();
    /// `mov [rdi], rsi`
    set_pud(pudp: *mut u64, value: u64), [0x48, 0x89, 0x37], clobbers Clobbers::empty();
    /// `mov rax, rdi`: on hardware an entry is its value (every `*_val` and `make_*`)
    identity(value: u64) -> u64, [0x48, 0x89, 0xf8], clobbers Clobbers::RAX;
    /// `mov byte ptr [rdi], 0`: a queued spinlock is released by clearing its locked byte
    queued_spin_unlock(lock: *mut u8), [0xc6, 0x07, 0x00], clobbers Clobbers::empty();
    /// `xor eax, eax`: bare hardware preempts no vCPU
    vcpu_is_preempted(cpu: u64) -> u64, [0x31, 0xc0],
        clobbers Clobbers::RAX.union(Clobbers::FLAGS);
}

/// A callee-save op that does nothing (for a backend that turns a native op into nothing).
///
/// # Safety
///
/// None beyond the call itself; `unsafe` only to fit the table's slot type.
#[unsafe(naked)]
#[link_section = ".text"]
pub unsafe extern "C" fn nothing_callee_save() {
    core::arch::naked_asm!("endbr64", pvops::__asm_ret!())
}

/// [`nothing_callee_save`] as a void callee-save op's implementation: sites become NOPs.
pub const NOTHING_CALLEE_SAVE: Impl<CalleeSave<unsafe extern "C" fn()>> = Impl::inline(
    // SAFETY: the function only returns.
    unsafe { CalleeSave::declare(nothing_callee_save) },
    Inline::NOTHING,
);

/// `cpuid(leaf, subleaf, out)`: the instruction.
///
/// # Safety
///
/// `out` is valid for writes.
pub unsafe extern "C" fn cpuid(leaf: u32, subleaf: u32, out: *mut CpuidResult) {
    // SAFETY: the caller guarantees `out` is writable.
    unsafe { out.write(arch::raw_cpuid(leaf, subleaf)) }
}

/// `rdmsr`.
///
/// # Safety
///
/// Ring 0 and the MSR exists.
pub unsafe extern "C" fn read_msr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: forwarded contract.
    unsafe {
        core::arch::asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nostack))
    };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// `wrmsr`.
///
/// # Safety
///
/// Ring 0, the MSR exists and the value is consistent.
pub unsafe extern "C" fn write_msr(msr: u32, value: u64) {
    // SAFETY: forwarded contract.
    unsafe {
        core::arch::asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32,
                         options(nostack))
    };
}

/// An exception-table entry that resumes a faulting instruction at label `773:` (Linux
/// `EX_TYPE_DEFAULT`), so the kernel turns the fault into the `-EIO` path.
#[cfg(pvops_kernel)]
macro_rules! extable_resume {
    () => {
        ".pushsection __ex_table, \"a\"\n.balign 4\n.long 772b - .\n.long 773b - .\n.long 1\n.popsection"
    };
}

/// Outside the kernel a faulting MSR access is not recoverable (nothing runs them in ring 3).
#[cfg(not(pvops_kernel))]
macro_rules! extable_resume {
    () => {
        ""
    };
}

/// An MSR access (`$insn`, with its register operands) that reports a fault as `rc = -EIO`
/// instead of oopsing (kernel builds: an exception-table entry resumes at `773:`).
macro_rules! msr_access_safe {
    ($insn:literal, $($operands:tt)*) => {{
        let rc: i32;
        // SAFETY: the caller's contract (ring 0); a fault resumes at `773:` with rc = -EIO.
        unsafe {
            core::arch::asm!(
                "xor {rc:e}, {rc:e}",
                concat!("772: ", $insn),
                "jmp 774f",
                "773: mov {rc:e}, {eio}",
                "774:",
                extable_resume!(),
                rc = out(reg) rc,
                eio = const -EIO,
                $($operands)*
                options(nostack),
            )
        };
        rc
    }};
}

/// `rdmsr` that reports a fault as `-EIO`.
///
/// # Safety
///
/// Ring 0; `out` is valid for writes.
pub unsafe extern "C" fn read_msr_safe(msr: u32, out: *mut u64) -> i32 {
    let (lo, hi): (u32, u32);
    let rc = msr_access_safe!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi,);
    if rc == 0 {
        // SAFETY: the caller guarantees `out` is writable.
        unsafe { out.write((u64::from(hi) << 32) | u64::from(lo)) };
    }
    rc
}

/// `wrmsr` that reports a fault as `-EIO`.
///
/// # Safety
///
/// Ring 0; the value is consistent.
pub unsafe extern "C" fn write_msr_safe(msr: u32, value: u64) -> i32 {
    msr_access_safe!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32,)
}

/// Flush every translation, global ones included: toggle CR4.PGE twice with interrupts off.
///
/// # Safety
///
/// Ring 0.
pub unsafe extern "C" fn flush_tlb_kernel() {
    // SAFETY: ring 0 (forwarded). Interrupts are off around the two CR4 writes so nothing runs
    // with PGE flipped; the flags (and IF) are restored afterwards.
    unsafe {
        core::arch::asm!(
            "pushfq",
            "cli",
            "mov {cr4}, cr4",
            "xor {cr4}, {pge}",
            "mov cr4, {cr4}",
            "xor {cr4}, {pge}",
            "mov cr4, {cr4}",
            "popfq",
            cr4 = out(reg) _,
            pge = const X86_CR4_PGE,
        )
    };
}

/// `-ENOSYS`: no hypervisor to call.
pub const ENOSYS: i64 = 38;

extern "C" fn hypercall(_nr: u64, _a0: u64, _a1: u64, _a2: u64, _a3: u64) -> i64 {
    -ENOSYS
}

/// Page-table notifications and lazy mode: nothing to do on hardware.
extern "C" fn nothing_pt(_pfn: u64, _level: u32) {}
extern "C" fn nothing() {}
extern "C" fn nothing_wait(_ptr: *mut u8, _val: u8) {}
extern "C" fn nothing_kick(_cpu: u32) {}
/// A cross-CPU flush interrupts every CPU it flushes: hardware takes none over.
extern "C" fn never_defer(_cpu: u32) -> u64 {
    0
}
/// Hardware sends IPIs through the local APIC alone: the caller writes the ICR.
extern "C" fn never_send_ipi(_mask: *const u64, _nbits: u32, _vector: u32) -> u64 {
    0
}

/// `xor eax, eax`: the inline form of an op whose native answer is 0.
const ZERO: Inline = Inline {
    bytes: &[0x31, 0xc0],
    clobbers: pvops::ops::Clobbers::RAX.union(pvops::ops::Clobbers::FLAGS),
};

/// The TSC rate sched_clock and the timer scale by.
static TSC: TscScale = TscScale::new();

/// Nanoseconds from TSC cycles (0 until [`Native::start`] gave the frequency). No division.
pub extern "C" fn sched_clock() -> u64 {
    crate::time::handed_out(TSC.ns(arch::rdtsc_ordered()))
}

extern "C" fn steal_clock(_cpu: u32) -> u64 {
    0
}

extern "C" fn tsc_khz() -> u64 {
    TSC.khz()
}

/// The CMOS real-time clock, read with the update-in-progress protocol, as ns since 1970.
///
/// # Safety
///
/// Ring 0 (port I/O); nobody else accesses the RTC index port at the same time.
unsafe extern "C" fn wall_clock() -> u64 {
    // SAFETY: forwarded contract.
    unsafe { rtc::read_ns() }
}

/// Arm the TSC-deadline timer `delta_ns` from now.
///
/// # Safety
///
/// Ring 0; this CPU's local APIC timer is in TSC-deadline mode and owned by the caller.
unsafe extern "C" fn set_next_event(delta_ns: u64) -> i32 {
    let khz = TSC.khz();
    if khz == 0 {
        return -EINVAL;
    }
    let cycles = delta_ns.saturating_mul(khz) / 1_000_000;
    // SAFETY: forwarded contract; the MSR exists when the APIC is in TSC-deadline mode.
    unsafe {
        write_msr_safe(
            MSR_IA32_TSC_DEADLINE,
            arch::rdtsc_ordered().saturating_add(cycles),
        )
    }
}

mod rtc {
    //! The MC146818 CMOS clock behind ports 0x70/0x71.

    const INDEX: u16 = 0x70;
    const DATA: u16 = 0x71;

    /// # Safety
    ///
    /// Ring 0; exclusive use of the RTC index port.
    unsafe fn read(reg: u8) -> u8 {
        let v: u8;
        // SAFETY: forwarded contract; ports 0x70/0x71 are the RTC on every PC.
        unsafe {
            core::arch::asm!("out dx, al", in("dx") INDEX, in("al") reg, options(nostack, nomem));
            core::arch::asm!("in al, dx", in("dx") DATA, out("al") v, options(nostack, nomem));
        }
        v
    }

    fn bcd(v: u8) -> u64 {
        u64::from(v & 0x0f) + u64::from(v >> 4) * 10
    }

    /// Days from 1970-01-01 to the given civil date (Howard Hinnant's algorithm, integers only).
    pub(super) fn days_from_civil(y: i64, m: u64, d: u64) -> i64 {
        let y = if m <= 2 { y - 1 } else { y };
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let mp = (m + 9) % 12;
        let doy = (153 * mp + 2) / 5 + d - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy as i64;
        era * 146_097 + doe - 719_468
    }

    /// Seconds, minutes, hours, day, month, year and status register B, read once the clock
    /// is not in the middle of an update.
    ///
    /// # Safety
    ///
    /// As [`read`].
    unsafe fn snapshot() -> [u8; 7] {
        // SAFETY: forwarded contract.
        unsafe {
            // Wait for "update in progress" (register A bit 7) to clear; bounded.
            for _ in 0..1_000_000 {
                if read(0x0a) & 0x80 == 0 {
                    break;
                }
            }
            [
                read(0x00),
                read(0x02),
                read(0x04),
                read(0x07),
                read(0x08),
                read(0x09),
                read(0x0b),
            ]
        }
    }

    /// # Safety
    ///
    /// As [`read`].
    pub(super) unsafe fn read_ns() -> u64 {
        // SAFETY: forwarded contract.
        let mut t = unsafe { snapshot() };
        // Read until two snapshots agree, so no field is torn by an update.
        for _ in 0..10 {
            // SAFETY: forwarded contract.
            let u = unsafe { snapshot() };
            if u == t {
                break;
            }
            t = u;
        }
        let [s, mi, h, d, mo, y, status_b] = t;
        let binary = status_b & 0x04 != 0;
        let conv = |v: u8| if binary { u64::from(v) } else { bcd(v) };
        let hour = if status_b & 0x02 == 0 && h & 0x80 != 0 {
            (conv(h & 0x7f) % 12) + 12 // 12-hour mode, PM
        } else {
            conv(h & 0x7f)
        };
        let days = days_from_civil(2000 + conv(y) as i64, conv(mo), conv(d));
        let secs = days * 86_400 + (hour * 3600 + conv(mi) * 60 + conv(s)) as i64;
        (secs.max(0) as u64) * 1_000_000_000
    }
}

/// The native backend.
#[derive(Debug)]
pub struct Native;

/// The one instance.
pub static NATIVE: Native = Native;

/// Where the native backend's TSC frequency came from.
static TSC_SOURCE: AtomicU64 = AtomicU64::new(0);
const TSC_FROM_KERNEL: u64 = 1;
const TSC_CALIBRATED: u64 = 2;

/// How long [`calibrate_tsc_khz`] measures.
pub const CALIBRATION_NS: u64 = 50_000_000;

/// The other clock and the TSC at (nearly) the same instant (see [`arch::bracketed`]).
fn clock_and_tsc(now_ns: &dyn Fn() -> Option<u64>) -> Option<(u64, u64)> {
    arch::bracketed(&mut || now_ns(), &mut arch::rdtsc_ordered, 10_000)
}

/// The TSC frequency measured against another clock (`now_ns`) over [`CALIBRATION_NS`];
/// 0 if that clock does not advance.
pub fn calibrate_tsc_khz(now_ns: &dyn Fn() -> Option<u64>) -> u64 {
    let Some((t0, c0)) = clock_and_tsc(now_ns) else {
        return 0;
    };
    // bounded: a clock that never advances gives up after 2^32 polls
    for _ in 0..(1u64 << 32) {
        let Some(t) = now_ns() else { return 0 };
        if t.saturating_sub(t0) >= CALIBRATION_NS {
            let Some((t1, c1)) = clock_and_tsc(now_ns) else {
                return 0;
            };
            // (checked: no panic path, which objtool could not follow, even for t1 == t0)
            return c1
                .wrapping_sub(c0)
                .saturating_mul(1_000_000)
                .checked_div(t1.saturating_sub(t0))
                .unwrap_or(0);
        }
    }
    0
}

/// Set the TSC frequency sched_clock and the timer use (0 leaves the clock reading 0): the
/// kernel's (`tsc_khz`), or, where the kernel has none (it could not calibrate, e.g. under some
/// nested hypervisors), measured against the platform's clock. Returns where it came from.
pub fn set_tsc_khz(platform: &dyn crate::Platform) -> u64 {
    let mut khz = platform.tsc_khz();
    let mut source = TSC_FROM_KERNEL;
    if khz == 0 {
        khz = calibrate_tsc_khz(&|| platform.clock_ns());
        source = TSC_CALIBRATED;
    }
    TSC.set(khz);
    TSC_SOURCE.store(source, Ordering::Relaxed);
    khz
}

/// Why native cannot run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deprivileged;

impl core::fmt::Display for Deprivileged {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("the kernel runs deprivileged (a Xen PV domain): the instructions would fault")
    }
}

impl Driver for Native {
    const ID: BackendId = BackendId::NATIVE;
    type Found = ();
    type Absent = Deprivileged;
    type Error = core::convert::Infallible;

    fn probe(_: &Detection, platform: &dyn Platform) -> Result<(), Deprivileged> {
        // A Xen PV kernel runs in ring 3: cli, CR and MSR accesses would fault.
        if platform.xen_pv() {
            Err(Deprivileged)
        } else {
            Ok(())
        }
    }

    fn start(
        _: (),
        _: &Detection,
        platform: &dyn Platform,
    ) -> Result<&'static Native, Self::Error> {
        set_tsc_khz(platform);
        Ok(&NATIVE)
    }

    fn stop(_: &dyn Platform) -> &'static str {
        "nothing registered"
    }
}

/// The native implementation of every op: the table other backends start from.
pub const OPS: BackendOps = BackendOps {
    cpu: CpuImpls {
        cpuid: Impl::call(cpuid),
        read_cr0: imp::read_cr0,
        write_cr0: imp::write_cr0,
        read_cr4: imp::read_cr4,
        write_cr4: imp::write_cr4,
        read_msr: Impl::call(read_msr),
        write_msr: Impl::call(write_msr),
        read_msr_safe: Impl::call(read_msr_safe),
        write_msr_safe: Impl::call(write_msr_safe),
        wbinvd: imp::wbinvd,
        load_idt: imp::load_idt,
        load_gdt: imp::load_gdt,
        store_tr: imp::store_tr,
        io_delay: imp::io_delay,
        hypercall: Impl::call(hypercall),
    },
    irq: IrqImpls {
        save_fl: imp::save_fl,
        restore_fl: imp::restore_fl,
        irq_disable: imp::irq_disable,
        irq_enable: imp::irq_enable,
        safe_halt: imp::safe_halt,
        halt: imp::halt,
        // none sent: the caller writes the local APIC's ICR
        send_ipi: Impl::inline(never_send_ipi, ZERO),
    },
    mmu: MmuImpls {
        read_cr2: imp::read_cr2,
        write_cr2: imp::write_cr2,
        read_cr3: imp::read_cr3,
        write_cr3: imp::write_cr3,
        flush_tlb_user: imp::flush_tlb_user,
        flush_tlb_kernel: Impl::call(flush_tlb_kernel),
        flush_tlb_one_user: imp::flush_tlb_one_user,
        set_pte: imp::set_pte,
        set_pmd: imp::set_pmd,
        set_pud: imp::set_pud,
        // nothing to do on hardware: the sites become NOPs
        alloc_pt: Impl::inline(nothing_pt, Inline::NOTHING),
        release_pt: Impl::inline(nothing_pt, Inline::NOTHING),
        lazy_mode_enter: Impl::inline(nothing, Inline::NOTHING),
        lazy_mode_leave: Impl::inline(nothing, Inline::NOTHING),
        pte_val: imp::identity,
        make_pte: imp::identity,
        pmd_val: imp::identity,
        make_pmd: imp::identity,
        pud_val: imp::identity,
        make_pud: imp::identity,
        p4d_val: imp::identity,
        make_p4d: imp::identity,
        pgd_val: imp::identity,
        make_pgd: imp::identity,
        // none taken over
        flush_tlb_defer: Impl::inline(never_defer, ZERO),
    },
    lock: LockImpls {
        queued_spin_unlock: imp::queued_spin_unlock,
        // a waiter never halts on hardware: it spins on, and there is nothing to wake
        wait: Impl::inline(nothing_wait, Inline::NOTHING),
        kick: Impl::inline(nothing_kick, Inline::NOTHING),
        vcpu_is_preempted: imp::vcpu_is_preempted,
    },
    timer: TimerImpls {
        sched_clock: Impl::call(sched_clock),
        steal_clock: Impl::call(steal_clock),
        tsc_khz: Impl::call(tsc_khz),
        wall_clock: Impl::call(wall_clock),
        set_next_event: Impl::call(set_next_event),
    },
};

impl Backend for Native {
    fn id(&self) -> BackendId {
        BackendId::NATIVE
    }

    fn describe(&self) -> &'static str {
        match TSC_SOURCE.load(Ordering::Relaxed) {
            TSC_CALIBRATED => "TSC: calibrated at load (the kernel has no tsc_khz)",
            _ => "TSC: the kernel's tsc_khz",
        }
    }

    fn ops(&self) -> BackendOps {
        OPS
    }

    fn serves_kernel(&self, op: pvops::Op) -> Result<(), &'static str> {
        // every op is the bare instruction, the kernel's own native code; but bare hardware
        // steals nothing, so where the kernel has a steal clock it is its hypervisor's
        match op {
            pvops::Op::StealClock => Err(
                "bare hardware steals nothing: a steal clock the kernel has is its hypervisor's",
            ),
            _ => Ok(()),
        }
    }
}

/// Set the TSC rate the native clock and timer use, for a backend that learns it elsewhere
/// (VMI's GetCycleFrequency) and runs native time ops.
pub fn set_tsc_rate(khz: u64) {
    TSC.set(khz);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(rtc::days_from_civil(1970, 1, 1), 0);
        assert_eq!(rtc::days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(rtc::days_from_civil(2026, 11, 27), 20_784);
    }

    #[test]
    fn calibration_against_another_clock() {
        let t0 = std::time::Instant::now();
        let clock = || Some(t0.elapsed().as_nanos() as u64);
        let a = calibrate_tsc_khz(&clock);
        let b = calibrate_tsc_khz(&clock);
        assert!(a > 100_000, "a TSC of at least 100 MHz: {a} kHz");
        assert!(
            a.abs_diff(b) < a / 20,
            "two calibrations agree within 5%: {a} vs {b}"
        );
        assert_eq!(calibrate_tsc_khz(&|| None), 0, "no clock, no calibration");
    }
}
