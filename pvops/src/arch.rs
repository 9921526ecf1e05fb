//! The few raw instructions pvops itself executes, outside any call site.

use crate::detect::CpuidSource;
use crate::ops::CpuidResult;

/// The CPUID instruction itself (for detection, which runs before any backend is installed).
#[derive(Clone, Copy, Debug, Default)]
pub struct NativeCpuid;

impl CpuidSource for NativeCpuid {
    fn cpuid(&self, leaf: u32, subleaf: u32) -> CpuidResult {
        raw_cpuid(leaf, subleaf)
    }
}

/// Execute CPUID. Works in every ring; exits to the hypervisor in a VM.
pub fn raw_cpuid(leaf: u32, subleaf: u32) -> CpuidResult {
    // SAFETY: CPUID has no side effects beyond the four registers.
    unsafe { crate::__cpuid!(leaf, subleaf) }
}

/// The CPUID instruction for `$leaf`/`$subleaf`, optionally behind a `$prefix` some hypervisor
/// recognises (Xen PV's forced emulation), as a [`CpuidResult`]; RBX, which LLVM reserves, is
/// saved in another register around it. Expands to inline assembly: the caller's `unsafe`
/// block vouches for the prefix.
#[doc(hidden)]
#[macro_export]
macro_rules! __cpuid {
    ($leaf:expr, $subleaf:expr $(, $prefix:literal)?) => {{
        let (eax, ebx, ecx, edx): (u32, u32, u32, u32);
        core::arch::asm!(
            "mov {tmp:r}, rbx",
            $($prefix,)?
            "cpuid",
            "xchg {tmp:r}, rbx",
            tmp = out(reg) ebx,
            inout("eax") $leaf => eax,
            inout("ecx") $subleaf => ecx,
            out("edx") edx,
            options(nostack, preserves_flags, nomem),
        );
        $crate::ops::CpuidResult { eax, ebx, ecx, edx }
    }};
}

/// Read the time-stamp counter, ordered after every earlier instruction (`lfence; rdtsc`).
#[inline(always)]
pub fn rdtsc_ordered() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: RDTSC is allowed in every ring unless CR4.TSD is set, which no supported
    // environment does; LFENCE has no effect on memory.
    unsafe {
        core::arch::asm!("lfence", "rdtsc", out("eax") lo, out("edx") hi,
                         options(nostack, preserves_flags, nomem))
    };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Read the time-stamp counter and TSC_AUX together (`rdtscp`): Linux keeps the CPU's number
/// in TSC_AUX's low 12 bits (and its node above), so the pair says which CPU's TSC this is.
/// Only where CPUID 0x8000_0001 EDX bit 27 says the instruction exists.
#[inline(always)]
pub fn rdtscp() -> (u64, u32) {
    let (lo, hi, aux): (u32, u32, u32);
    // SAFETY: RDTSCP reads the TSC and TSC_AUX only (allowed in every ring, as RDTSC); callers
    // check the CPUID bit first.
    unsafe {
        core::arch::asm!("rdtscp", out("eax") lo, out("edx") hi, out("ecx") aux,
                         options(nostack, preserves_flags, nomem))
    };
    ((u64::from(hi) << 32) | u64::from(lo), aux)
}

/// A reading of `sample` and of the reference clock `now` at (nearly) the same instant: the
/// clock value is the midpoint of two reads around `sample`, from the tightest of up to eight
/// tries (a preemption or interrupt between the reads widens the bracket and is thrown away);
/// tries stop early once a bracket is narrower than `good_ns`. `None` if `now` has no value.
pub fn bracketed(
    now: &mut dyn FnMut() -> Option<u64>,
    sample: &mut dyn FnMut() -> u64,
    good_ns: u64,
) -> Option<(u64, u64)> {
    let mut best: Option<(u64, u64, u64)> = None;
    for _ in 0..8 {
        let before = now()?;
        let value = sample();
        let after = now()?;
        let width = after.saturating_sub(before);
        // (not `Option::is_none_or`: the kernel's clippy.toml sets the MSRV to 1.78)
        if !matches!(best, Some((w, _, _)) if width >= w) {
            best = Some((width, before.saturating_add(width / 2), value));
        }
        if width < good_ns {
            break;
        }
    }
    best.map(|(_, ns, value)| (ns, value))
}

/// The instruction that returns from an assembly function: a plain `ret`, or a jump to the
/// kernel's return thunk when the kernel is built with return-thunk mitigations.
#[cfg(pvops_rethunk)]
#[doc(hidden)]
#[macro_export]
macro_rules! __asm_ret {
    () => {
        "jmp __x86_return_thunk"
    };
}

/// The instruction that returns from an assembly function (plain `ret`: no return thunks here).
#[cfg(not(pvops_rethunk))]
#[doc(hidden)]
#[macro_export]
macro_rules! __asm_ret {
    () => {
        "ret"
    };
}

/// `syscall` inside a function, as a Xen PV hypercall uses it. In kernel builds it carries
/// objtool's save/restore unwind hints (as Linux's `xen_hypercall_pv` does): the stack is the
/// same after the instruction as before, which objtool cannot know of a `syscall`.
#[cfg(pvops_kernel)]
#[doc(hidden)]
#[macro_export]
macro_rules! __asm_syscall {
    () => {
        concat!(
            "988:\n",
            ".pushsection .discard.unwind_hints\n",
            ".long 988b - .\n.short 0\n.byte 0\n.byte 6\n.byte 0\n.balign 4\n",
            ".popsection\n",
            "syscall\n",
            "989:\n",
            ".pushsection .discard.unwind_hints\n",
            ".long 989b - .\n.short 0\n.byte 0\n.byte 7\n.byte 0\n.balign 4\n",
            ".popsection",
        )
    };
}

/// `syscall` inside a function (no objtool outside the kernel).
#[cfg(not(pvops_kernel))]
#[doc(hidden)]
#[macro_export]
macro_rules! __asm_syscall {
    () => {
        "syscall"
    };
}

/// Define a callee-save thunk: a [`CalleeSave`] slot value (a constant named `$thunk`) whose
/// function is an assembly thunk with the op's signature that preserves every register but RAX
/// and calls the ordinary `extern "C"` function `$target` with the same arguments. This is how a
/// Rust function fills a [`Convention::CalleeSave`] slot (Linux's `PV_CALLEE_SAVE_REGS_THUNK`).
///
/// [`CalleeSave`]: crate::ops::CalleeSave
/// [`Convention::CalleeSave`]: crate::ops::Convention::CalleeSave
///
/// ```ignore
/// extern "C" fn xen_save_fl() -> u64 { ... }
/// pvops::callee_save_thunk!(pub fn xen_save_fl_thunk() -> u64 => xen_save_fl);
/// ops.irq.save_fl = Impl::call(xen_save_fl_thunk);
/// ```
#[macro_export]
macro_rules! callee_save_thunk {
    ($(#[$m:meta])* $vis:vis fn $thunk:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? => $target:path) => {
        $(#[$m])*
        #[allow(non_upper_case_globals)]
        $vis const $thunk: $crate::ops::CalleeSave<unsafe extern "C" fn($($ty),*) $(-> $ret)?> = {
            /// The thunk.
            ///
            /// # Safety
            ///
            /// As for the function it wraps.
            #[unsafe(naked)]
            // rustc gives each naked function a section of its own (`.text.<symbol>`), which
            // the kernel's vmlinux linker script does not place: keep them in `.text`.
            #[link_section = ".text"]
            unsafe extern "C" fn thunk($($arg: $ty),*) $(-> $ret)? {
                // Nine pushes after the return address keep the stack 16-byte aligned at the
                // call.
                core::arch::naked_asm!(
                    "endbr64",
                    "push rbp",
                    "push rcx", "push rdx", "push rsi", "push rdi",
                    "push r8", "push r9", "push r10", "push r11",
                    "call {target}",
                    "pop r11", "pop r10", "pop r9", "pop r8",
                    "pop rdi", "pop rsi", "pop rdx", "pop rcx",
                    "pop rbp",
                    $crate::__asm_ret!(),
                    target = sym $target,
                )
            }
            // SAFETY: the thunk saves every register the C ABI lets `$target` change, except
            // RAX (the result), and restores them before it returns.
            unsafe {
                $crate::ops::CalleeSave::declare(thunk as unsafe extern "C" fn($($ty),*) $(-> $ret)?)
            }
        };
    };
}
