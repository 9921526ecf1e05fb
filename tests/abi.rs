//! pvops's register bits and MSR numbers against the x86 crate's, and its CPUID scan against
//! raw-cpuid's view of the first hypervisor leaf (the x86 crate's `CpuId`).

use pvops::detect::HypervisorKind;
use x86::bits64::rflags::RFlags;
use x86::controlregs::Cr4;

#[test]
fn constants_agree_with_the_x86_crate() {
    assert_eq!(pvops::ops::irq::X86_EFLAGS_IF, RFlags::FLAGS_IF.bits());
    assert_eq!(
        pvops_backends::native::X86_CR4_PGE,
        Cr4::CR4_ENABLE_GLOBAL_PAGES.bits() as u64
    );
    assert_eq!(
        pvops_backends::native::MSR_IA32_TSC_DEADLINE,
        x86::msr::IA32_TSC_DEADLINE
    );
    assert_eq!(pvops::detect::CPUID_1_ECX_HYPERVISOR, 1 << 31);
}

/// raw-cpuid reads only leaf 0x4000_0000; where an interface sits there, both must agree on it.
#[test]
fn scan_agrees_with_raw_cpuid_at_the_first_base() {
    let d = pvops::detect(&pvops::arch::NativeCpuid);
    let theirs = x86::cpuid::CpuId::new()
        .get_hypervisor_info()
        .map(|h| h.identify());
    let ours = d
        .interfaces()
        .find(|i| i.base == 0x4000_0000)
        .map(|i| i.kind);
    eprintln!("raw-cpuid: {theirs:?}, pvops: {ours:?}");
    use x86::cpuid::Hypervisor as H;
    match (theirs, ours) {
        (None, None) => {}
        (Some(H::KVM), Some(HypervisorKind::Kvm))
        | (Some(H::Xen), Some(HypervisorKind::Xen))
        | (Some(H::VMware), Some(HypervisorKind::VMware))
        | (Some(H::HyperV), Some(HypervisorKind::HyperV))
        | (Some(H::QEMU), Some(HypervisorKind::Tcg))
        | (Some(H::Bhyve), Some(HypervisorKind::Bhyve))
        | (Some(H::ACRN), Some(HypervisorKind::Acrn))
        | (Some(H::Unknown(..)), Some(HypervisorKind::Unknown)) => {}
        other => panic!("disagree: {other:?}"),
    }
}
