//! The Xen backend's PV half: the ops a deprivileged (PV) kernel needs. ABI:
//! shared/docs/abi-xen.md §6.
//!
//! A PV kernel runs in ring 3 of a 64-bit domain: `cli`, `mov %cr3` or `invlpg` would trap, so
//! no patched site may execute one. [`super`] selects these ops when the kernel says it is
//! a PV domain ([`crate::Platform::xen_pv`]); everything shared with HVM (version, time, steal, timer)
//! stays there.
//!
//! - **Detection.** CPUID is not intercepted in a PV domain (it returns the physical CPU's
//!   leaves, without Xen's); the forced-emulation prefix (`ud2; .ascii "xen"; cpuid`) asks Xen.
//!   [`PvCpuid`] scans with it, and `cpu.cpuid` uses it.
//! - **Hypercalls** are `syscall` with Xen's registers ([`hypercall_syscall`]).
//! - **Interrupt flag** = the vCPU's `evtchn_upcall_mask` in its `vcpu_info`. The kernel
//!   registered a per-CPU `vcpu_info` (`xen_vcpu_info`), which Linux 6.12 does not export; its
//!   per-CPU offset is read from the kernel's own PV `irq_disable` and `save_fl` (the functions
//!   `pv_ops` holds: `movb $1, %gs:xen_vcpu_info+1(%rip)` and `testb $0xff, ...`), accepted only
//!   when both decode to the same address ([`vcpu_info_offset`]). The ops then work on
//!   `%gs:offset`, as Linux's do: disable stores 1 to the mask, enable stores 0 and, when an
//!   event is already pending, makes a hypercall so that Xen delivers it.
//! - **CR2** is `vcpu_info.arch.cr2`. **CR0** is the value the kernel read at load (Xen keeps
//!   it; only TS may change, through `fpu_taskswitch`). **CR3 and CR4** belong to the kernel: it
//!   keeps the pseudo-physical CR3 and the kernel/user page-table pair Xen runs on, and CR4's
//!   value; the backend asks the kernel ([`XenPvKernel`]). Writes to CR4 are ignored, as Xen
//!   ignores the bits a PV kernel may not change.
//! - **TLB and caches** through `mmuext_op`: `TLB_FLUSH_LOCAL`, `INVLPG_LOCAL`, `FLUSH_CACHE`.
//! - **Page-table writes** through `mmu_update` (the entry's machine address, the value as the
//!   hardware sees it); `alloc_pt`/`release_pt` pin and unpin the page (Xen validates it as a
//!   table of that level; it must be mapped read-only, which the backend arranges with
//!   `update_va_mapping` on the kernel's direct map, and undoes on release).
//! - **Halting**: `safe_halt` is `SCHEDOP_block` (which unmasks events atomically); `halt` with
//!   events masked yields instead, as a PV domain has no halt that keeps them masked.
//! - **Descriptor tables** stay the kernel's: `load_idt`/`load_gdt` take Xen's formats
//!   (`set_trap_table`, `set_gdt` with frame lists) and are not taken over; they change nothing.
//!   `store_tr` returns 0, as in Linux. MSRs have no hypercall in the PV ABI: Xen emulates
//!   `rdmsr`/`wrmsr` for PV kernels (or reflects #GP, caught by the `_safe` variants), so the
//!   MSR ops stay native — the one trapping instruction the ABI prescribes, as in Linux.
//! - **Wall clock** from `shared_info.wc` (the kernel maps `shared_info` at the
//!   `FIX_PARAVIRT_BOOTMAP` fixmap slot) plus Xen system time.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use pvops::ops::{BackendOps, CalleeSave, CpuidResult, DescriptorPointer, Impl};

use super::abi::*;
use super::decode::vcpu_info_offset;
use crate::native;
use crate::pvclock::{self, PvclockVcpuTimeInfo, PvclockWallClock};

/// What a PV kernel shares with the backend: where its per-CPU state is, and its accessors for
/// the control registers it owns. Provided by the platform ([`crate::Platform::xen_pv_kernel`]).
#[derive(Clone, Copy, Debug)]
pub struct XenPvKernel {
    /// The kernel's PV `irq_disable` (the function its `pv_ops` holds).
    pub irq_disable: usize,
    /// The kernel's PV `save_fl`.
    pub save_fl: usize,
    /// CPU 0's per-CPU base (`per_cpu_offset(0)`).
    pub percpu_base0: usize,
    /// Where the kernel mapped `shared_info` (0: unknown).
    pub shared_info: usize,
    /// CR0 as the kernel reads it.
    pub cr0: u64,
    /// The kernel's `__read_cr3()` (pseudo-physical).
    pub read_cr3: unsafe extern "C" fn() -> u64,
    /// The kernel's `write_cr3()` (switches the kernel/user pair Xen runs on).
    pub write_cr3: unsafe extern "C" fn(u64),
    /// The kernel's `__read_cr4()`.
    pub read_cr4: unsafe extern "C" fn() -> u64,
    /// Machine address of a kernel virtual address (0: none).
    pub virt_to_machine: unsafe extern "C" fn(usize) -> u64,
    /// The kernel's page-table entry that maps a direct-map address at 4 KiB (0: none).
    pub pte_of: unsafe extern "C" fn(usize) -> usize,
    /// The kernel's page-table value conversion `op` (one of the ten value ops) of `value`:
    /// its `pte_val`, `make_pte`, …, which turn machine frames into pseudo-physical ones and
    /// back through the kernel's own p2m.
    pub value: unsafe extern "C" fn(op: pvops::Op, value: u64) -> u64,
}

/// Set once by [`start`] before the table is installed; read by the ops afterwards.
struct KernelCell(UnsafeCell<Option<XenPvKernel>>);

// SAFETY: written only by `start`/`stop`, which run before the ops are installed and after they
// are removed (no op can run concurrently); read-only in between.
unsafe impl Sync for KernelCell {}

static KERNEL: KernelCell = KernelCell(UnsafeCell::new(None));

/// The per-CPU offset of the kernel's `vcpu_info` (`%gs`-relative).
static VCPU_INFO: AtomicU64 = AtomicU64::new(0);

fn kernel() -> &'static XenPvKernel {
    // SAFETY: see `KernelCell`: the ops run only between `start` and `stop`.
    match unsafe { &*KERNEL.0.get() } {
        Some(k) => k,
        None => unreachable!("xen pv ops used before start"),
    }
}

/// Why the PV half could not start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PvError {
    /// The platform shares nothing about the PV kernel.
    NoKernelInfo,
    /// The kernel's PV irq code does not show where its `vcpu_info` is.
    VcpuInfoNotFound,
    /// The kernel's direct map is unknown: `alloc_pt` could not pin page-table pages.
    NoDirectMap,
}

impl core::fmt::Display for PvError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            PvError::NoKernelInfo => "the kernel shares nothing about its PV state",
            PvError::VcpuInfoNotFound => {
                "the kernel's vcpu_info could not be located from its PV irq ops"
            }
            PvError::NoDirectMap => {
                "the kernel's direct map is unknown, so page-table pages could not be pinned"
            }
        })
    }
}

/// Locate the kernel's `vcpu_info` and keep what the kernel shares; returns vCPU 0's time
/// record (in CPU 0's `vcpu_info`).
pub fn start(k: XenPvKernel) -> Result<*mut PvclockVcpuTimeInfo, PvError> {
    let (mut d, mut s) = ([0u8; 12], [0u8; 12]);
    // SAFETY: the platform names two functions of the kernel's text, which is mapped and at
    // least 12 bytes long for each (an endbr64 and one instruction, then the return).
    unsafe {
        core::ptr::copy_nonoverlapping(k.irq_disable as *const u8, d.as_mut_ptr(), 12);
        core::ptr::copy_nonoverlapping(k.save_fl as *const u8, s.as_mut_ptr(), 12);
    }
    let off = vcpu_info_offset((&d, k.irq_disable as u64), (&s, k.save_fl as u64))
        .ok_or(PvError::VcpuInfoNotFound)?;
    VCPU_INFO.store(off, Ordering::Relaxed);
    CR0.store(k.cr0, Ordering::Relaxed);
    // SAFETY: no op of this backend is installed yet (see `KernelCell`).
    unsafe { *KERNEL.0.get() = Some(k) };
    Ok((k.percpu_base0 as u64 + off + VCPU_INFO_TIME) as *mut PvclockVcpuTimeInfo)
}

/// Forget the kernel's state (the ops are uninstalled).
pub fn stop() {
    // SAFETY: no op of this backend is installed any more (see `KernelCell`).
    unsafe { *KERNEL.0.get() = None };
}

/// CPUID through Xen's forced-emulation prefix: the leaves Xen shows this domain.
pub fn pv_cpuid(leaf: u32, subleaf: u32) -> CpuidResult {
    // SAFETY: in a PV domain Xen recognises `ud2; "xen"` before CPUID and emulates the CPUID
    // (RIP moves past it); no other effect. Only called in PV domains (detection and the PV
    // table), where the kernel said so.
    unsafe { pvops::__cpuid!(leaf, subleaf, ".byte 0x0f, 0x0b, 0x78, 0x65, 0x6e") }
}

/// A [`pvops::detect::CpuidSource`] for PV domains (see [`pv_cpuid`]).
#[derive(Debug)]
pub struct PvCpuid;

impl pvops::detect::CpuidSource for PvCpuid {
    fn cpuid(&self, leaf: u32, subleaf: u32) -> CpuidResult {
        pv_cpuid(leaf, subleaf)
    }
}

/// A Xen hypercall from a PV kernel: `syscall` with RAX = nr, RDI, RSI, RDX, R10 = a0..a3
/// (RCX and R11 are the `syscall`'s, caller-saved in the C ABI anyway).
///
/// # Safety
///
/// This is a Xen PV domain (elsewhere `syscall` enters the kernel's own entry code), and the
/// hypercall's contract holds.
#[unsafe(naked)]
#[link_section = ".text"]
pub unsafe extern "C" fn hypercall_syscall(nr: u64, a0: u64, a1: u64, a2: u64, a3: u64) -> i64 {
    core::arch::naked_asm!(
        "endbr64",
        "mov rax, rdi",
        "mov rdi, rsi",
        "mov rsi, rdx",
        "mov rdx, rcx",
        "mov r10, r8",
        pvops::__asm_syscall!(),
        pvops::__asm_ret!(),
    )
}

// ---- interrupt flag: the vCPU's upcall mask -------------------------------------------------

/// `save_fl`: `X86_EFLAGS_IF` when events are unmasked, else 0.
///
/// # Safety
///
/// [`start`] located the `vcpu_info`.
#[unsafe(naked)]
#[link_section = ".text"]
pub unsafe extern "C" fn save_fl() -> u64 {
    core::arch::naked_asm!(
        "endbr64",
        "mov rax, qword ptr [rip + {vi}]",
        "cmp byte ptr gs:[rax + 1], 0",
        "sete al",
        "movzx eax, al",
        "shl eax, 9",
        pvops::__asm_ret!(),
        vi = sym VCPU_INFO,
    )
}

/// `irq_disable`: mask events.
///
/// # Safety
///
/// As [`save_fl`].
#[unsafe(naked)]
#[link_section = ".text"]
pub unsafe extern "C" fn irq_disable() {
    core::arch::naked_asm!(
        "endbr64",
        "mov rax, qword ptr [rip + {vi}]",
        "mov byte ptr gs:[rax + 1], 1",
        pvops::__asm_ret!(),
        vi = sym VCPU_INFO,
    )
}

/// `irq_enable`: unmask events; if one is already pending, a hypercall makes Xen deliver it.
///
/// # Safety
///
/// As [`save_fl`].
#[unsafe(naked)]
#[link_section = ".text"]
pub unsafe extern "C" fn irq_enable() {
    core::arch::naked_asm!(
        "endbr64",
        "mov rax, qword ptr [rip + {vi}]",
        "mov byte ptr gs:[rax + 1], 0",
        "cmp byte ptr gs:[rax], 0",
        "jne {check}",
        pvops::__asm_ret!(),
        vi = sym VCPU_INFO,
        check = sym check_events,
    )
}

/// `restore_fl(flags)`: enable or disable from bit 9.
///
/// # Safety
///
/// As [`save_fl`].
#[unsafe(naked)]
#[link_section = ".text"]
pub unsafe extern "C" fn restore_fl(flags: u64) {
    core::arch::naked_asm!(
        "endbr64",
        "test edi, 0x200",
        "jnz {enable}",
        "jmp {disable}",
        enable = sym irq_enable,
        disable = sym irq_disable,
    )
}

/// Deliver pending events: any hypercall does (`xen_version(0, NULL)`, as Linux's
/// `xen_force_evtchn_callback`); every register but RAX is kept (the callee-save contract of
/// the irq ops that jump here).
///
/// # Safety
///
/// A PV domain.
#[unsafe(naked)]
#[link_section = ".text"]
unsafe extern "C" fn check_events() {
    core::arch::naked_asm!(
        "push rcx",
        "push rdx",
        "push rsi",
        "push rdi",
        "push r8",
        "push r9",
        "push r10",
        "push r11",
        "mov eax, 17",
        "xor edi, edi",
        "xor esi, esi",
        pvops::__asm_syscall!(),
        "pop r11",
        "pop r10",
        "pop r9",
        "pop r8",
        "pop rdi",
        "pop rsi",
        "pop rdx",
        "pop rcx",
        pvops::__asm_ret!(),
    )
}

extern "C" fn block() {
    // SAFETY: SCHEDOP_block takes no argument; it unmasks events and sleeps until one arrives.
    unsafe { hypercall_syscall(HYPERVISOR_SCHED_OP, SCHEDOP_BLOCK, 0, 0, 0) };
}

extern "C" fn halt_as_is() {
    // SAFETY: reads the mask (see `save_fl`).
    let masked = unsafe { save_fl() } == 0;
    let cmd = if masked { SCHEDOP_YIELD } else { SCHEDOP_BLOCK };
    // SAFETY: yield and block take no argument.
    unsafe { hypercall_syscall(HYPERVISOR_SCHED_OP, cmd, 0, 0, 0) };
}

pvops::callee_save_thunk!(
    /// `safe_halt`: `SCHEDOP_block`.
    pub fn safe_halt() => block
);
pvops::callee_save_thunk!(
    /// `halt`: block if events are unmasked, else yield.
    pub fn halt() => halt_as_is
);

// ---- control registers ----------------------------------------------------------------------

/// `read_cr2`: `vcpu_info.arch.cr2`.
///
/// # Safety
///
/// As [`save_fl`].
#[unsafe(naked)]
#[link_section = ".text"]
pub unsafe extern "C" fn read_cr2() -> u64 {
    core::arch::naked_asm!(
        "endbr64",
        "mov rax, qword ptr [rip + {vi}]",
        "mov rax, qword ptr gs:[rax + 16]",
        pvops::__asm_ret!(),
        vi = sym VCPU_INFO,
    )
}

/// `write_cr2`: `vcpu_info.arch.cr2`.
///
/// # Safety
///
/// As [`save_fl`].
#[unsafe(naked)]
#[link_section = ".text"]
pub unsafe extern "C" fn write_cr2(value: u64) {
    core::arch::naked_asm!(
        "endbr64",
        "mov rax, qword ptr [rip + {vi}]",
        "mov qword ptr gs:[rax + 16], rdi",
        pvops::__asm_ret!(),
        vi = sym VCPU_INFO,
    )
}

/// CR0 as the kernel read it at load, with TS as last set through `write_cr0`.
static CR0: AtomicU64 = AtomicU64::new(0);
const X86_CR0_TS: u64 = 1 << 3;

extern "C" fn cr0() -> u64 {
    CR0.load(Ordering::Relaxed)
}

extern "C" fn set_cr0(value: u64) {
    let old = CR0.swap(value, Ordering::Relaxed);
    if (old ^ value) & X86_CR0_TS != 0 {
        // SAFETY: fpu_taskswitch sets (1) or clears (0) this vCPU's CR0.TS.
        unsafe {
            hypercall_syscall(
                HYPERVISOR_FPU_TASKSWITCH,
                u64::from(value & X86_CR0_TS != 0),
                0,
                0,
                0,
            )
        };
    }
}

extern "C" fn cr3() -> u64 {
    // SAFETY: the kernel's accessor, callable in any context the op allows.
    unsafe { (kernel().read_cr3)() }
}

extern "C" fn set_cr3(value: u64) {
    // SAFETY: forwarded: the caller switches to page tables the kernel built (and pinned).
    unsafe { (kernel().write_cr3)(value) }
}

extern "C" fn cr4() -> u64 {
    // SAFETY: the kernel's accessor.
    unsafe { (kernel().read_cr4)() }
}

extern "C" fn ignore(_value: u64) {}

/// The value ops: the kernel's own conversions (the frame translation needs its p2m).
macro_rules! value_ops {
    ($($(#[$doc:meta])* $thunk:ident => $f:ident, $op:ident;)*) => {
        $(
            extern "C" fn $f(value: u64) -> u64 {
                // SAFETY: the kernel's conversion, pure, callable in any context.
                unsafe { (kernel().value)(pvops::Op::$op, value) }
            }
            pvops::callee_save_thunk!($(#[$doc])* pub fn $thunk(value: u64) -> u64 => $f);
        )*
    };
}

value_ops! {
    /// `pte_val`: the kernel's (machine frame → pseudo-physical).
    pte_val => kernel_pte_val, PteVal;
    /// `make_pte`: the kernel's (pseudo-physical frame → machine).
    make_pte => kernel_make_pte, MakePte;
    /// `pmd_val`: the kernel's.
    pmd_val => kernel_pmd_val, PmdVal;
    /// `make_pmd`: the kernel's.
    make_pmd => kernel_make_pmd, MakePmd;
    /// `pud_val`: the kernel's.
    pud_val => kernel_pud_val, PudVal;
    /// `make_pud`: the kernel's.
    make_pud => kernel_make_pud, MakePud;
    /// `p4d_val`: the kernel's.
    p4d_val => kernel_p4d_val, P4dVal;
    /// `make_p4d`: the kernel's.
    make_p4d => kernel_make_p4d, MakeP4d;
    /// `pgd_val`: the kernel's.
    pgd_val => kernel_pgd_val, PgdVal;
    /// `make_pgd`: the kernel's.
    make_pgd => kernel_make_pgd, MakePgd;
}

pvops::callee_save_thunk!(
    /// `read_cr0`: the kernel's CR0.
    pub fn read_cr0() -> u64 => cr0
);
pvops::callee_save_thunk!(
    /// `write_cr0`: only TS reaches Xen (`fpu_taskswitch`).
    pub fn write_cr0(value: u64) => set_cr0
);
pvops::callee_save_thunk!(
    /// `read_cr3`: the kernel's (pseudo-physical) CR3.
    pub fn read_cr3() -> u64 => cr3
);
pvops::callee_save_thunk!(
    /// `write_cr3`: through the kernel, which switches the kernel/user page-table pair.
    pub fn write_cr3(value: u64) => set_cr3
);
pvops::callee_save_thunk!(
    /// `read_cr4`: the kernel's CR4.
    pub fn read_cr4() -> u64 => cr4
);
pvops::callee_save_thunk!(
    /// `write_cr4`: Xen owns CR4 in a PV domain; ignored.
    pub fn write_cr4(value: u64) => ignore
);

// ---- TLB, caches, page tables ---------------------------------------------------------------

/// One `mmuext_op` on this domain; its return value.
fn mmuext(cmd: u32, arg1: u64) -> i64 {
    let mut op = MmuextOp { cmd, arg1, arg2: 0 };
    // SAFETY: the structure lives across the call; commands used here only flush or (un)pin.
    unsafe {
        hypercall_syscall(
            HYPERVISOR_MMUEXT_OP,
            core::ptr::addr_of_mut!(op) as u64,
            1,
            0,
            DOMID_SELF,
        )
    }
}

extern "C" fn flush_local() {
    mmuext(mmuext::TLB_FLUSH_LOCAL, 0);
}

extern "C" fn invlpg_local(address: u64) {
    mmuext(mmuext::INVLPG_LOCAL, address);
}

extern "C" fn flush_cache() {
    mmuext(mmuext::FLUSH_CACHE, 0);
}

pvops::callee_save_thunk!(
    /// `flush_tlb_user`: `MMUEXT_TLB_FLUSH_LOCAL`.
    pub fn flush_tlb_user() => flush_local
);
pvops::callee_save_thunk!(
    /// `flush_tlb_one_user`: `MMUEXT_INVLPG_LOCAL`.
    pub fn flush_tlb_one_user(address: u64) => invlpg_local
);
pvops::callee_save_thunk!(
    /// `wbinvd`: `MMUEXT_FLUSH_CACHE`.
    pub fn wbinvd() => flush_cache
);

/// `flush_tlb_kernel`: `MMUEXT_TLB_FLUSH_LOCAL` (Xen flushes global entries of a PV domain
/// with it too: a PV kernel's mappings are never global in the guest's sense).
///
/// # Safety
///
/// A PV domain.
pub unsafe extern "C" fn flush_tlb_kernel() {
    flush_local();
}

/// `mmu_update` of one entry at `entry` (a kernel virtual address): 0 or a Xen error.
pub fn update_entry(entry: *mut u64, value: u64) -> i64 {
    // SAFETY: the kernel's accessor.
    let ma = unsafe { (kernel().virt_to_machine)(entry as usize) };
    if ma == 0 {
        return -i64::from(crate::native::EINVAL);
    }
    let mut req = MmuUpdate {
        ptr: ma,
        val: value,
    };
    // SAFETY: the request lives across the call; Xen validates the new entry against the
    // domain's pages (it refuses a mapping of a page the domain may not map that way).
    unsafe {
        hypercall_syscall(
            HYPERVISOR_MMU_UPDATE,
            core::ptr::addr_of_mut!(req) as u64,
            1,
            0,
            DOMID_SELF,
        )
    }
}

extern "C" fn set_entry(entry: *mut u64, value: u64) {
    update_entry(entry, value);
}

pvops::callee_save_thunk!(
    /// `set_pte`: `mmu_update`.
    pub fn set_pte(ptep: *mut u64, value: u64) => set_entry
);
pvops::callee_save_thunk!(
    /// `set_pmd`: `mmu_update`.
    pub fn set_pmd(pmdp: *mut u64, value: u64) => set_entry
);
pvops::callee_save_thunk!(
    /// `set_pud`: `mmu_update`.
    pub fn set_pud(pudp: *mut u64, value: u64) => set_entry
);

const PAGE_RW: u64 = 1 << 1;

/// The kernel's direct-map base (`PAGE_OFFSET`; 0: unknown), for `alloc_pt`/`release_pt`.
static DIRECT_MAP: AtomicUsize = AtomicUsize::new(0);

/// Tell the backend where the direct map starts (`phys_to_virt(0)`).
pub fn set_direct_map(base: Option<usize>) {
    DIRECT_MAP.store(base.unwrap_or(0), Ordering::Relaxed);
}

/// The direct-map address of page `pfn`.
fn direct_va(pfn: u64) -> Option<usize> {
    match DIRECT_MAP.load(Ordering::Relaxed) {
        0 => None,
        base => Some(base + (pfn << 12) as usize),
    }
}

/// The machine frame behind a kernel virtual address.
fn machine_frame(va: usize) -> u64 {
    // SAFETY: the kernel's accessor.
    unsafe { (kernel().virt_to_machine)(va) >> 12 }
}

/// Map the direct-map page at `va` read-only (or writable again); 0 or a Xen error.
fn protect(va: usize, writable: bool) -> i64 {
    // SAFETY: the kernel's accessor.
    let ptep = unsafe { (kernel().pte_of)(va) } as *const u64;
    if ptep.is_null() {
        return -i64::from(crate::native::EINVAL);
    }
    // SAFETY: the kernel's entry for `va`, mapped (readable) by the kernel.
    let pte = unsafe { core::ptr::read_volatile(ptep) };
    let new = if writable {
        pte | PAGE_RW
    } else {
        pte & !PAGE_RW
    };
    // SAFETY: changes only the write permission of the page's own direct-map mapping.
    unsafe { hypercall_syscall(HYPERVISOR_UPDATE_VA_MAPPING, va as u64, new, UVMF_INVLPG, 0) }
}

/// `alloc_pt(pfn, level)`: map the page read-only and pin it as a table of `level`.
///
/// # Safety
///
/// `pfn` is a page the caller owns, holding a valid table of `level` (e.g. zeroed).
pub unsafe extern "C" fn alloc_pt(pfn: u64, level: u32) {
    let Some(va) = direct_va(pfn) else {
        return;
    };
    if !(1..=4).contains(&level) || protect(va, false) != 0 {
        return;
    }
    if mmuext(mmuext::PIN_L1_TABLE + level - 1, machine_frame(va)) != 0 {
        protect(va, true);
    }
}

/// `release_pt(pfn, level)`: unpin the page and map it writable again.
///
/// # Safety
///
/// `pfn` went through [`alloc_pt`] and no table points at it any more.
pub unsafe extern "C" fn release_pt(pfn: u64, _level: u32) {
    let Some(va) = direct_va(pfn) else {
        return;
    };
    mmuext(mmuext::UNPIN_TABLE, machine_frame(va));
    protect(va, true);
}

// ---- descriptor tables, wall clock ----------------------------------------------------------

extern "C" fn keep_tables(_desc: *const DescriptorPointer) {}
extern "C" fn no_tr() -> u64 {
    0
}

pvops::callee_save_thunk!(
    /// `load_idt`: the kernel's trap table stays (see the module docs).
    pub fn load_idt(desc: *const DescriptorPointer) => keep_tables
);
pvops::callee_save_thunk!(
    /// `load_gdt`: the kernel's GDT frames stay (see the module docs).
    pub fn load_gdt(desc: *const DescriptorPointer) => keep_tables
);
pvops::callee_save_thunk!(
    /// `store_tr`: 0, as in Linux (a PV domain has no task register of its own).
    pub fn store_tr() -> u64 => no_tr
);

/// `io_delay`: nothing (Xen has no legacy port timing to honour).
///
/// # Safety
///
/// None.
#[unsafe(naked)]
#[link_section = ".text"]
pub unsafe extern "C" fn io_delay() {
    core::arch::naked_asm!("endbr64", pvops::__asm_ret!())
}

/// `cpu.cpuid` for PV: [`pv_cpuid`].
///
/// # Safety
///
/// `out` is valid for a write.
pub unsafe extern "C" fn cpuid(leaf: u32, subleaf: u32, out: *mut CpuidResult) {
    // SAFETY: forwarded contract.
    unsafe { out.write(pv_cpuid(leaf, subleaf)) };
}

/// Wall-clock nanoseconds: `shared_info.wc` (+ `wc_sec_hi`) plus Xen system time `now`; 0 when
/// `shared_info` is unknown or its record stays torn.
pub fn wall_clock(now: u64) -> u64 {
    let base = kernel().shared_info;
    if base == 0 {
        return 0;
    }
    let wc = (base + SHARED_INFO_WC) as *const PvclockWallClock;
    // SAFETY: the kernel maps shared_info for its lifetime; the wall-clock record sits in it.
    let Ok((sec, nsec)) = (unsafe { pvclock::read_wall(wc) }) else {
        return 0;
    };
    // SAFETY: as above; a torn high word is caught by the version check only for sec, which
    // changes its high half once every 136 years.
    let hi = unsafe { core::ptr::read_volatile((base + SHARED_INFO_WC_SEC_HI) as *const u32) };
    let secs = (u64::from(hi) << 32) | u64::from(sec);
    secs.saturating_mul(1_000_000_000)
        .saturating_add(u64::from(nsec))
        .saturating_add(now)
}

// ---- the table -------------------------------------------------------------------------------

/// A callee-save slot value from assembly of this file that keeps every register but RAX.
macro_rules! declared {
    ($f:expr) => {
        // SAFETY: the function is assembly of this file that changes only RAX and the flags
        // (check_events, which some of them jump to, saves every other register it uses).
        Impl::call(unsafe { CalleeSave::declare($f) })
    };
}

/// The PV domain's table: the ops of this file over the native ones that stay (MSRs, which Xen
/// emulates for PV kernels, and lazy mode); nothing inline (a native instruction would trap in
/// ring 3). The time ops and the hypercall are the Xen backend's ([`super::Xen`]).
pub fn ops() -> BackendOps {
    let mut ops = native::OPS;
    let (cpu, irq, mmu) = (&mut ops.cpu, &mut ops.irq, &mut ops.mmu);
    cpu.cpuid = Impl::call(cpuid);
    cpu.read_cr0 = Impl::call(read_cr0);
    cpu.write_cr0 = Impl::call(write_cr0);
    cpu.read_cr4 = Impl::call(read_cr4);
    cpu.write_cr4 = Impl::call(write_cr4);
    cpu.wbinvd = Impl::call(wbinvd);
    cpu.load_idt = Impl::call(load_idt);
    cpu.load_gdt = Impl::call(load_gdt);
    cpu.store_tr = Impl::call(store_tr);
    cpu.io_delay = declared!(io_delay);
    irq.save_fl = declared!(save_fl);
    irq.restore_fl = declared!(restore_fl);
    irq.irq_disable = declared!(irq_disable);
    irq.irq_enable = declared!(irq_enable);
    irq.safe_halt = Impl::call(safe_halt);
    irq.halt = Impl::call(halt);
    mmu.read_cr2 = declared!(read_cr2);
    mmu.write_cr2 = declared!(write_cr2);
    mmu.read_cr3 = Impl::call(read_cr3);
    mmu.write_cr3 = Impl::call(write_cr3);
    mmu.flush_tlb_user = Impl::call(flush_tlb_user);
    mmu.flush_tlb_kernel = Impl::call(flush_tlb_kernel);
    mmu.flush_tlb_one_user = Impl::call(flush_tlb_one_user);
    mmu.set_pte = Impl::call(set_pte);
    mmu.set_pmd = Impl::call(set_pmd);
    mmu.set_pud = Impl::call(set_pud);
    mmu.alloc_pt = Impl::call(alloc_pt);
    mmu.release_pt = Impl::call(release_pt);
    mmu.pte_val = Impl::call(pte_val);
    mmu.make_pte = Impl::call(make_pte);
    mmu.pmd_val = Impl::call(pmd_val);
    mmu.make_pmd = Impl::call(make_pmd);
    mmu.pud_val = Impl::call(pud_val);
    mmu.make_pud = Impl::call(make_pud);
    mmu.p4d_val = Impl::call(p4d_val);
    mmu.make_p4d = Impl::call(make_p4d);
    mmu.pgd_val = Impl::call(pgd_val);
    mmu.make_pgd = Impl::call(make_pgd);
    // the lock ops stay native's (unprivileged), called: this table inlines nothing
    ops.lock.queued_spin_unlock = Impl::call(native::OPS.lock.queued_spin_unlock.func);
    ops.lock.vcpu_is_preempted = Impl::call(native::OPS.lock.vcpu_is_preempted.func);
    ops.mmu.flush_tlb_defer = Impl::call(native::OPS.mmu.flush_tlb_defer.func);
    // IPIs are event channels the kernel bound (xen_send_IPI_mask): none sent here
    ops.irq.send_ipi = Impl::call(native::OPS.irq.send_ipi.func);
    ops
}
