//! Detection and selection against CPUID tables modelled on each hypervisor, and against the
//! real CPUID of the machine running the tests.

use pvops_host_tests::NoPlatform;
use std::cell::Cell;

use pvops::detect::{CpuVendor, HypervisorKind};
use pvops::select::SelectError;
use pvops::{detect, select, BackendId, Candidate, Presence, Reason, Request};
use pvops_backends::BACKENDS;
use pvops_host_tests::models;

/// `auto` on `d` with every backend probed (on a platform with nothing but CPUID).
fn auto(d: &pvops::Detection) -> pvops::Selection {
    select(
        Request::Auto,
        d,
        &pvops_backends::probe(d, &NoPlatform).candidates(),
    )
    .unwrap()
}

/// `auto` on `d`, with only native present, selects native for `reason`; the selection.
fn assert_native(d: &pvops::Detection, reason: Reason) -> pvops::Selection {
    let s = select(Request::Auto, d, &present(&[])).unwrap();
    assert_eq!((s.backend, s.reason), (BackendId::NATIVE, reason));
    s
}

/// Candidates as a build with these backends present (native always is).
fn present(ids: &[(BackendId, Option<u32>)]) -> Vec<Candidate> {
    pvops_backends::probe(&detect(&models::bare().source()), &NoPlatform)
        .candidates()
        .iter()
        .map(|c| Candidate {
            id: c.id,
            serves: c.serves,
            presence: match ids.iter().find(|(i, _)| *i == c.id) {
                Some(&(_, base)) => Presence::Present { base },
                None if c.id == BackendId::NATIVE => Presence::Present { base: None },
                None => Presence::Absent,
            },
        })
        .collect()
}

#[test]
fn bare_hardware_is_not_scanned() {
    let m = models::bare();
    let calls = Cell::new(0u32);
    let src = |leaf: u32, sub: u32| {
        if leaf >= 0x4000_0000 {
            calls.set(calls.get() + 1);
        }
        m.get(leaf, sub)
    };
    let d = detect(&src);
    assert!(!d.hypervisor_bit);
    assert_eq!(d.interfaces().count(), 0);
    assert_eq!(
        calls.get(),
        0,
        "hypervisor leaves must not be read without the hypervisor bit"
    );
    assert_eq!(d.vendor, CpuVendor::Intel);
    let _ = assert_native(&d, Reason::NoHypervisor);
}

#[test]
fn scan_covers_every_base() {
    let m = models::kvm();
    let bases = Cell::new(0u32);
    let src = |leaf: u32, sub: u32| {
        if leaf >= 0x4000_0000 && leaf & 0xff == 0 {
            bases.set(bases.get() + 1);
        }
        m.get(leaf, sub)
    };
    detect(&src);
    assert_eq!(bases.get(), 256);
}

#[test]
fn kvm() {
    let m = models::kvm();
    let d = detect(&m.source());
    let kvm = d.find(HypervisorKind::Kvm).expect("KVM found");
    assert_eq!(
        (kvm.base, kvm.max_leaf, kvm.leaves()),
        (0x4000_0000, 0x4000_0001, 1)
    );
    assert_eq!(kvm.signature_str().to_string(), "KVMKVMKVM");
    assert_eq!(d.interfaces().count(), 1);
    assert!(d.vendor.uses_vmmcall());

    // Auto picks the KVM backend, and the report says where it found the interface.
    let c = pvops_backends::probe(&d, &NoPlatform).candidates();
    let s = select(Request::Auto, &d, &c).unwrap();
    assert_eq!(
        (s.backend, s.reason),
        (pvops_host_tests::ids::KVM, Reason::Detected)
    );
    assert_eq!(
        s.to_string(),
        "backend=kvm reason=\"detected\" hypervisor=KVMKVMKVM@0x40000000"
    );
    assert_eq!(s.interface.unwrap().base, 0x4000_0000);
}

#[test]
fn old_kvm_with_zero_max_leaf() {
    let d = detect(&models::old_kvm().source());
    let kvm = d.find(HypervisorKind::Kvm).unwrap();
    assert_eq!(kvm.max_leaf, 0x4000_0001);
}

#[test]
fn hyperv_compatibility_interface_below_kvm() {
    let d = detect(&models::kvm_with_hyperv().source());
    let kinds: Vec<_> = d.interfaces().map(|i| (i.kind, i.base)).collect();
    assert_eq!(
        kinds,
        [
            (HypervisorKind::HyperV, 0x4000_0000),
            (HypervisorKind::Kvm, 0x4000_0100)
        ]
    );
    assert_eq!(d.primary().unwrap().kind, HypervisorKind::Kvm);
    let s = select(
        Request::Auto,
        &d,
        &present(&[(pvops_host_tests::ids::KVM, Some(0x4000_0100))]),
    )
    .unwrap();
    assert_eq!(s.backend, pvops_host_tests::ids::KVM);
    assert_eq!(s.interface.unwrap().base, 0x4000_0100);
    // raw-cpuid would have said Hyper-V: it reads only 0x4000_0000.
}

#[test]
fn hyperv_compatibility_interface_below_xen() {
    let d = detect(&models::xen_with_viridian().source());
    let xen = d.find(HypervisorKind::Xen).unwrap();
    assert_eq!((xen.base, xen.leaves()), (0x4000_0100, 5));
    assert_eq!(d.find(HypervisorKind::HyperV).unwrap().base, 0x4000_0000);
    let s = select(
        Request::Auto,
        &d,
        &present(&[(pvops_host_tests::ids::XEN, Some(0x4000_0100))]),
    )
    .unwrap();
    assert_eq!(
        (s.backend, s.interface.unwrap().base),
        (pvops_host_tests::ids::XEN, 0x4000_0100)
    );
}

#[test]
fn xen_hvm_as_qemu_emulates_it() {
    let d = detect(&models::xen_hvm_qemu().source());
    let xen = d.find(HypervisorKind::Xen).unwrap();
    assert_eq!((xen.base, xen.max_leaf), (0x4000_0000, 0x4000_0004));
    let s = auto(&d);
    assert_eq!(
        (s.backend, s.reason),
        (pvops_host_tests::ids::XEN, Reason::Detected)
    );

    // A Xen PV domain (announced by the boot path), scanned through Xen's forced-emulation
    // CPUID, which shows Xen's leaves: the Xen backend (its PV half) serves it ...
    struct Pv;
    impl pvops_backends::Platform for Pv {
        fn tsc_khz(&self) -> u64 {
            0
        }
        fn xen_pv(&self) -> bool {
            true
        }
    }
    let c = pvops_backends::probe(&d, &Pv).candidates();
    assert_eq!(
        select(Request::Auto, &d, &c).map(|s| s.backend),
        Ok(pvops_host_tests::ids::XEN)
    );
    // ... and native would fault there (the kernel is deprivileged): refused by name.
    assert_eq!(
        select(Request::Backend(BackendId::NATIVE), &d, &c),
        Err(SelectError::Absent(BackendId::NATIVE))
    );
    // A PV domain whose scan showed no Xen (the bare instruction reports the physical CPU):
    // nothing is selected, so nothing is installed or patched.
    let bare = detect(&models::tcg().source());
    let c = pvops_backends::probe(&bare, &Pv).candidates();
    assert_eq!(
        select(Request::Auto, &bare, &c),
        Err(SelectError::NothingRuns)
    );
    assert_eq!(
        SelectError::NothingRuns.to_string(),
        "no backend can run here: none serves this hypervisor and native would fault"
    );
}

#[test]
fn tcg_means_native_and_leftovers_are_ignored() {
    let d = detect(&models::tcg().source());
    let all: Vec<_> = d.interfaces().map(|i| i.kind).collect();
    assert_eq!(
        all,
        [HypervisorKind::Tcg],
        "leftover basic-leaf values are no interface"
    );
    let s = assert_native(&d, Reason::Unsupported(HypervisorKind::Tcg));
    assert_eq!(
        s.to_string(),
        "backend=native reason=\"no backend for tcg\" hypervisor=TCGTCGTCGTCG@0x40000000"
    );
}

#[test]
fn other_hypervisors_are_named() {
    for (m, kind) in [
        (models::vmware(), HypervisorKind::VMware),
        (models::bhyve(), HypervisorKind::Bhyve),
        (models::acrn(), HypervisorKind::Acrn),
        (models::unknown(), HypervisorKind::Unknown),
    ] {
        let d = detect(&m.source());
        let i = d.primary().unwrap();
        assert_eq!(i.kind, kind);
        let _ = assert_native(&d, Reason::Unsupported(kind));
    }
    let d = detect(&models::unknown().source());
    let i = d.primary().unwrap();
    assert_eq!(&i.signature, b"NoSuchHyper\x01");
    assert_eq!(i.signature_str().as_str(), "NoSuchHyper.");
}

#[test]
fn hidden_hypervisor() {
    let d = detect(&models::hidden().source());
    assert!(d.hypervisor_bit);
    let _ = assert_native(&d, Reason::NoInterface);
}

#[test]
fn platform_hooks_win_over_cpuid() {
    // An lguest or VMI host announces itself outside CPUID; it is exclusive.
    let d = detect(&models::kvm().source());
    let c = present(&[
        (pvops_host_tests::ids::KVM, Some(0x4000_0000)),
        (pvops_host_tests::ids::LGUEST, None),
    ]);
    assert_eq!(
        select(Request::Auto, &d, &c).unwrap().backend,
        pvops_host_tests::ids::LGUEST
    );
}

#[test]
fn requests() {
    assert_eq!(Request::parse("auto", &BACKENDS), Ok(Request::Auto));
    assert_eq!(
        Request::parse("kvm\n", &BACKENDS),
        Ok(Request::Backend(pvops_host_tests::ids::KVM))
    );
    assert_eq!(
        Request::parse("native", &BACKENDS),
        Ok(Request::Backend(BackendId::NATIVE))
    );
    assert!(Request::parse("qemu", &BACKENDS).is_err());
    assert!(Request::parse("KVM", &BACKENDS).is_err());
    // the rest of the README's bad-input table for names: empty is auto, surrounding space
    // is dropped; two names, a stray character, a long name are unknown
    assert_eq!(Request::parse("", &BACKENDS), Ok(Request::Auto));
    assert_eq!(
        Request::parse(" kvm ", &BACKENDS),
        Ok(Request::Backend(pvops_host_tests::ids::KVM))
    );
    for bad in [
        "Native",
        "kvm,xen",
        "kvm xen",
        "kvm;",
        "kvm\0",
        &"k".repeat(300),
    ] {
        assert!(Request::parse(bad, &BACKENDS).is_err(), "{bad:?}");
    }

    let d = detect(&models::kvm().source());
    // native can always be forced
    let s = select(Request::Backend(BackendId::NATIVE), &d, &present(&[])).unwrap();
    assert_eq!(
        (s.backend, s.reason),
        (BackendId::NATIVE, Reason::Requested)
    );
    // a backend whose hypervisor is absent is refused
    let c = present(&[(pvops_host_tests::ids::KVM, Some(0x4000_0000))]);
    assert_eq!(
        select(Request::Backend(pvops_host_tests::ids::XEN), &d, &c),
        Err(SelectError::Absent(pvops_host_tests::ids::XEN))
    );
    // and so is VMI where there is no ROM to find
    let c = pvops_backends::probe(&d, &NoPlatform).candidates();
    assert_eq!(
        select(Request::Backend(pvops_host_tests::ids::VMI), &d, &c),
        Err(SelectError::Absent(pvops_host_tests::ids::VMI))
    );
    // A backend that fails to start: auto falls back to native and says why; a request by
    // name is refused instead.
    let c = present(&[(pvops_host_tests::ids::KVM, Some(0x4000_0000))]);
    let s = select(Request::Auto, &d, &c).unwrap();
    let f = s.fall_back(Request::Auto, &c).unwrap();
    assert_eq!(
        (f.backend, f.reason),
        (
            BackendId::NATIVE,
            Reason::StartFailed(pvops_host_tests::ids::KVM)
        )
    );
    assert_eq!(f.interface, s.interface);
    assert_eq!(
        s.fall_back(Request::Backend(pvops_host_tests::ids::KVM), &c),
        None
    );
    assert_eq!(
        f.fall_back(Request::Auto, &c),
        None,
        "native has nothing to fall back to"
    );

    // KVM is absent on TCG
    let tcg = detect(&models::tcg().source());
    let c = pvops_backends::probe(&tcg, &NoPlatform).candidates();
    assert_eq!(
        select(Request::Backend(pvops_host_tests::ids::KVM), &tcg, &c),
        Err(SelectError::Absent(pvops_host_tests::ids::KVM))
    );
}

/// This machine kind is itself a KVM guest: the real CPUID must show KVM. Elsewhere (bare
/// metal, another hypervisor) the test says what it saw and checks the native path instead.
#[test]
fn real_cpuid() {
    let d = detect(&pvops::arch::NativeCpuid);
    let raw = pvops::arch::raw_cpuid(1, 0);
    assert_eq!(d.hypervisor_bit, raw.ecx & (1 << 31) != 0);
    let seen: Vec<String> = d
        .interfaces()
        .map(|i| format!("{}@{:#x}", i.signature_str(), i.base))
        .collect();
    eprintln!(
        "real CPUID: hypervisor bit {}, interfaces {:?}",
        d.hypervisor_bit, seen
    );
    let s = auto(&d);
    eprintln!("selection: {s}");
    if !d.hypervisor_bit {
        eprintln!("no hypervisor here: checking the native path");
        assert_eq!(
            (s.backend, s.reason),
            (BackendId::NATIVE, Reason::NoHypervisor)
        );
        return;
    }
    match d.primary().map(|i| i.kind) {
        Some(HypervisorKind::Kvm) => {
            let kvm = d.find(HypervisorKind::Kvm).unwrap();
            let features = pvops::arch::raw_cpuid(kvm.base + 1, 0).eax;
            eprintln!("KVM at {:#x}, features {features:#x}", kvm.base);
            assert_eq!(
                (s.backend, s.reason),
                (pvops_host_tests::ids::KVM, Reason::Detected)
            );
        }
        other => {
            eprintln!("not KVM ({other:?}): checking the native path");
            assert_eq!(s.backend, BackendId::NATIVE);
        }
    }
}

/// A real KVM hypercall from ring 3: KVM exits to the host and answers -KVM_EPERM, through the
/// instruction the backend picks for this CPU vendor. Only where the CPUID scan found KVM.
#[test]
fn real_hypercall_from_user_mode() {
    let d = detect(&pvops::arch::NativeCpuid);
    if d.find(HypervisorKind::Kvm).is_none() {
        eprintln!("no KVM here: nothing to call");
        return;
    }
    let hc = pvops_backends::kvm::hypercall_for(d.vendor);
    // SAFETY: KVM is present; from CPL 3 every hypercall is refused without side effects.
    let r = unsafe { hc(pvops_backends::kvm::KVM_HC_VAPIC_POLL_IRQ, 0, 0, 0, 0) };
    assert_eq!(r, -pvops_backends::kvm::KVM_EPERM);
}

/// All 12 signature bytes decide: a signature one byte off anywhere (the last word included)
/// names no hypervisor pvops knows, and no backend serves it.
#[test]
fn near_miss_signatures_are_unknown() {
    let near_misses: [&[u8; 12]; 8] = [
        b"KVMKVMKVM\0\0\x01",
        b"KVMKVMKVM\x01\0\0",
        b"KVMKVMKVX\0\0\0",
        b"XKMKVMKVM\0\0\0",
        b"XenVMMXenVMX",
        b"XenVMMXenVmM",
        b"XenVMMxenVMM",
        b"Microsoft HV",
    ];
    for sig in near_misses {
        assert_eq!(
            HypervisorKind::from_signature(sig),
            HypervisorKind::Unknown,
            "{:?}",
            String::from_utf8_lossy(sig)
        );
        let mut m = pvops_host_tests::CpuidModel::cpu(models::AMD, true);
        m.interface(0x4000_0000, 0x4000_0005, sig);
        m.leaf(0x4000_0001, [0x0100_7efb, 0, 0, 0]);
        let d = detect(&m.source());
        let i = d.primary().expect("an interface is seen");
        assert_eq!((i.kind, &i.signature), (HypervisorKind::Unknown, sig));
        let s = auto(&d);
        assert_eq!(
            (s.backend, s.reason),
            (
                BackendId::NATIVE,
                Reason::Unsupported(HypervisorKind::Unknown)
            ),
            "{:?}",
            String::from_utf8_lossy(sig)
        );
    }
    // and the real ones are known
    for (sig, kind) in [
        (b"KVMKVMKVM\0\0\0", HypervisorKind::Kvm),
        (b"XenVMMXenVMM", HypervisorKind::Xen),
    ] {
        assert_eq!(HypervisorKind::from_signature(sig), kind);
    }
}

/// The max-leaf bound of detect.rs: a base's EAX below the base holds no interface (leftovers),
/// nor does one at or beyond the next base; EAX = 0 is old KVM's "base + 1" only with a known
/// signature; anything from the base to base + 0xff is that interface's highest leaf.
#[test]
fn max_leaf_bound() {
    let kvm = b"KVMKVMKVM\0\0\0";
    for (base, eax, want) in [
        (0x4000_0000, 0x4000_0001, Some(0x4000_0001)),
        (0x4000_0000, 0x4000_0000, Some(0x4000_0000)),
        (0x4000_0000, 0x4000_00ff, Some(0x4000_00ff)),
        (0x4000_0000, 0x4000_0100, None),
        (0x4000_0000, 0x4000_1000, None),
        (0x4000_0000, 0xffff_ffff, None),
        (0x4000_0000, 0x3fff_ffff, None),
        (0x4000_0000, 0x0000_000d, None),
        (0x4000_0000, 0, Some(0x4000_0001)),
        (0x4000_0100, 0x4000_0105, Some(0x4000_0105)),
        (0x4000_0100, 0x4000_00ff, None),
        (0x4000_0100, 0x4000_0001, None),
        (0x4000_0100, 0x4000_0200, None),
        (0x4000_0100, 0, Some(0x4000_0101)),
    ] {
        let mut m = pvops_host_tests::CpuidModel::cpu(models::INTEL, true);
        m.interface(base, eax, kvm);
        let d = detect(&m.source());
        let got = d.find(HypervisorKind::Kvm).map(|i| (i.base, i.max_leaf));
        assert_eq!(got, want.map(|w| (base, w)), "base {base:#x}, EAX {eax:#x}");
        assert_eq!(d.interfaces().count(), usize::from(want.is_some()));
        // the KVM backend's presence follows
        assert_eq!(
            <pvops_backends::kvm::Kvm as pvops_backends::Driver>::probe(&d, &NoPlatform).is_ok(),
            want.is_some()
        );
    }
    // EAX = 0 with a signature nobody knows is an unused base, not old KVM
    let mut m = pvops_host_tests::CpuidModel::cpu(models::INTEL, true);
    m.interface(0x4000_0000, 0, b"NoSuchHyper\x01");
    assert_eq!(detect(&m.source()).interfaces().count(), 0);
}
