//! The KVM backend (in progress): KVM's paravirtual interface, found by the CPUID scan at
//! whatever base it sits (0x4000_0000, or 0x4000_0100 behind a Hyper-V interface).
//!
//! What is here so far: the ABI constants (shared/docs/abi-kvm.md) and the hypercall, which
//! fills `cpu.hypercall` — `vmcall` on Intel and others, `vmmcall` on AMD and Hygon, chosen once
//! from the CPU vendor: the table slot holds the matching function, so every patched site
//! calls it directly and no site ever executes the wrong instruction (KVM would otherwise
//! rewrite it, or raise #UD).

use pvops::detect::CpuVendor;

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

/// Defines a hypercall function for one instruction: the C arguments (RDI = nr, RSI, RDX,
/// RCX, R8 = a0..a3) moved into KVM's registers (RAX = nr, RBX, RCX, RDX, RSI = a0..a3).
macro_rules! kvm_hypercall_fn {
    ($(#[$doc:meta])* $name:ident, $insn:literal) => {
        $(#[$doc])*
        ///
        /// # Safety
        ///
        /// A KVM host is present (the instruction faults on bare metal) and the hypercall's own
        /// contract holds.
        #[unsafe(naked)]
        // rustc gives each naked function a section of its own (`.text.<symbol>`), which the
        // kernel's vmlinux linker script does not place: keep them in `.text`.
        #[link_section = ".text"]
        pub unsafe extern "C" fn $name(nr: u64, a0: u64, a1: u64, a2: u64, a3: u64) -> i64 {
            core::arch::naked_asm!(
                "endbr64",
                "push rbx",
                "mov rax, rdi",
                "mov rbx, rsi",
                "mov rsi, r8",
                "xchg rcx, rdx",
                $insn,
                "pop rbx",
                pvops::__asm_ret!(),
            )
        }
    };
}

kvm_hypercall_fn!(
    /// A KVM hypercall with `vmcall` (Intel VMX).
    hypercall_vmcall,
    "vmcall"
);
kvm_hypercall_fn!(
    /// A KVM hypercall with `vmmcall` (AMD SVM, Hygon).
    hypercall_vmmcall,
    "vmmcall"
);

/// The hypercall function for this CPU vendor.
pub fn hypercall_for(vendor: CpuVendor) -> unsafe extern "C" fn(u64, u64, u64, u64, u64) -> i64 {
    if vendor.uses_vmmcall() {
        hypercall_vmmcall
    } else {
        hypercall_vmcall
    }
}
