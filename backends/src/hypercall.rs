//! The `cpu.hypercall` slot's functions, one pair per hypervisor ABI.
//!
//! [`hypercall_fns!`](crate::hypercall_fns) defines, in the backend module that invokes it,
//! `hypercall_vmcall` and `hypercall_vmmcall` (naked functions with the op's C signature that
//! move the arguments into the hypervisor's registers and execute the instruction) and
//! `hypercall_for(vendor)`, which picks one of them once from the CPU vendor. The table slot
//! holds the pick, so every patched site calls the right instruction directly.

/// A hypercall entry with the `cpu.hypercall` signature (number, four arguments; the answer):
/// a backend's instruction, or a modelled host's in host tests
/// ([`Platform::hypercall_model`](crate::Platform::hypercall_model)).
pub type HypercallFn = unsafe extern "C" fn(u64, u64, u64, u64, u64) -> i64;

/// Defines `hypercall_vmcall`, `hypercall_vmmcall` and `hypercall_for` for one hypervisor ABI:
/// `$before` moves the C arguments (RDI = nr, RSI, RDX, RCX, R8 = a0..a3) into the
/// hypervisor's registers, `$after` undoes what it saved.
#[macro_export]
#[doc(hidden)]
macro_rules! hypercall_fns {
    // KVM's registers (RAX = nr, RBX, RCX, RDX, RSI = a0..a3), which lguest's 64-bit port
    // keeps; RBX is callee-saved in the C ABI, so it is saved around the instruction.
    ($hv:literal, kvm_registers) => {
        $crate::hypercall_fns!(
            $hv,
            ["push rbx", "mov rax, rdi", "mov rbx, rsi", "mov rsi, r8", "xchg rcx, rdx"],
            ["pop rbx"]
        );
    };
    ($hv:literal, [$($before:literal),*], [$($after:literal),*]) => {
        $crate::hypercall_fns!(@one $hv, hypercall_vmcall, "vmcall", "Intel VMX",
                               [$($before),*], [$($after),*]);
        $crate::hypercall_fns!(@one $hv, hypercall_vmmcall, "vmmcall", "AMD SVM, Hygon",
                               [$($before),*], [$($after),*]);

        /// The hypercall function for this CPU vendor.
        pub fn hypercall_for(
            vendor: pvops::detect::CpuVendor,
        ) -> unsafe extern "C" fn(u64, u64, u64, u64, u64) -> i64 {
            hypercall_pick(vendor.uses_vmmcall())
        }

        /// `hypercall_vmmcall` or `hypercall_vmcall`.
        pub fn hypercall_pick(vmmcall: bool) -> unsafe extern "C" fn(u64, u64, u64, u64, u64) -> i64 {
            if vmmcall {
                hypercall_vmmcall
            } else {
                hypercall_vmcall
            }
        }
    };
    (@one $hv:literal, $name:ident, $insn:literal, $cpus:literal,
     [$($before:literal),*], [$($after:literal),*]) => {
        #[doc = concat!("A ", $hv, " hypercall with `", $insn, "` (", $cpus, ").")]
        ///
        /// # Safety
        ///
        /// The hypervisor is present (the instruction faults on bare metal) and the hypercall's
        /// own contract holds (pointers in the arguments are valid for it).
        #[unsafe(naked)]
        // rustc gives each naked function a section of its own (`.text.<symbol>`), which the
        // kernel's vmlinux linker script does not place: keep them in `.text`.
        #[link_section = ".text"]
        pub unsafe extern "C" fn $name(nr: u64, a0: u64, a1: u64, a2: u64, a3: u64) -> i64 {
            core::arch::naked_asm!(
                "endbr64",
                $($before,)*
                $insn,
                $($after,)*
                pvops::__asm_ret!(),
            )
        }
    };
}
