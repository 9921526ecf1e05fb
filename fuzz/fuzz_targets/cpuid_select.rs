//! CPUID tables from outside (a hypervisor says what it likes in leaves 0, 1 and
//! 0x4000_0000 + 0x100·k), with the boot data a platform may add (lguest's subarch, a Xen PV
//! domain), through detection, every backend's probe and selection.
//!
//! Checks:
//! - `detect` reads no hypervisor leaf without the hypervisor bit, and records exactly the
//!   interfaces the scan rule admits (module docs of `pvops::detect`): lowest base first, at most
//!   `MAX_INTERFACES` with the rest counted in `dropped`, each with the table's signature and
//!   the kind it names, a highest leaf within its base's 0x100 leaves (old KVM's EAX = 0 read as
//!   base + 1, only under a known signature); `find` and `primary` agree with that list;
//! - `auto` selects a backend whenever native can run (always, outside a Xen PV domain): a
//!   present non-native backend, found by a platform hook before any CPUID base and otherwise
//!   at the highest base, or else native with the reason the detection gives; where native
//!   cannot run and nothing else is present it is `NothingRuns`, never a panic;
//! - a backend asked for by name is selected exactly when its probe found it present, with
//!   reason `Requested`; otherwise `Absent(id)`;
//! - `fall_back` from an `auto` selection of a non-native backend is native (when it runs).
#![no_main]

use std::cell::Cell;
use std::collections::BTreeMap;

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use pvops::detect::{
    HypervisorKind, CPUID_1_ECX_HYPERVISOR, HYPERVISOR_BASE_FIRST, HYPERVISOR_BASE_LAST,
    HYPERVISOR_BASE_STEP, MAX_INTERFACES,
};
use pvops::ops::cpu::CpuidResult;
use pvops::select::SelectError;
use pvops::{detect, select, BackendId, Candidate, Presence, Reason, Request};
use pvops_backends::lguest::abi::{boot_signature, ABI_VERSION, X86_SUBARCH_LGUEST};
use pvops_backends::BACKENDS;

/// Signatures the fuzzer would not find by itself: every one `detect` knows, and a vendor's.
const SIGNATURES: [&[u8; 12]; 9] = [
    b"KVMKVMKVM\0\0\0",
    b"XenVMMXenVMM",
    b"VMwareVMware",
    b"Microsoft Hv",
    b"TCGTCGTCGTCG",
    b"bhyve bhyve ",
    b"ACRNACRNACRN",
    b"BHyVE BHyVE ",
    b"LinuxGuest\0\0",
];
const VENDORS: [&[u8; 12]; 3] = [b"GenuineIntel", b"AuthenticAMD", b"HygonGenuine"];

fn word(sig: &[u8; 12], i: usize) -> u32 {
    u32::from_le_bytes([sig[i], sig[i + 1], sig[i + 2], sig[i + 3]])
}

fn regs(u: &mut Unstructured<'_>) -> Result<CpuidResult> {
    Ok(CpuidResult {
        eax: u.arbitrary()?,
        ebx: u.arbitrary()?,
        ecx: u.arbitrary()?,
        edx: u.arbitrary()?,
    })
}

/// What the platform tells backends besides CPUID.
struct FuzzPlatform {
    boot: Option<(u32, u64)>,
    xen_pv: bool,
}

impl pvops_backends::Platform for FuzzPlatform {
    fn tsc_khz(&self) -> u64 {
        0
    }
    fn boot_subarch(&self) -> Option<(u32, u64)> {
        self.boot
    }
    fn xen_pv(&self) -> bool {
        self.xen_pv
    }
}

struct Input {
    leaves: BTreeMap<u32, CpuidResult>,
    platform: FuzzPlatform,
}

fn input(u: &mut Unstructured<'_>) -> Result<Input> {
    let mut leaves = BTreeMap::new();
    let mut leaf0 = regs(u)?;
    if let Some(v) = VENDORS.get(usize::from(u.arbitrary::<u8>()?)) {
        (leaf0.ebx, leaf0.edx, leaf0.ecx) = (word(v, 0), word(v, 4), word(v, 8));
    }
    leaves.insert(0, leaf0);
    let mut leaf1 = regs(u)?;
    if u.arbitrary()? {
        leaf1.ecx |= CPUID_1_ECX_HYPERVISOR;
    }
    leaves.insert(1, leaf1);
    let boot = match u.arbitrary::<u8>()? % 4 {
        0 => None,
        1 => Some((X86_SUBARCH_LGUEST, boot_signature(ABI_VERSION))),
        _ => Some((u.arbitrary()?, u.arbitrary()?)),
    };
    let xen_pv = u.ratio(1, 8)?;
    while !u.is_empty() {
        // one past the last base too: the scan must stop at 0x4000_FF00
        let base =
            HYPERVISOR_BASE_FIRST + HYPERVISOR_BASE_STEP * u32::from(u.arbitrary::<u16>()? % 0x101);
        let mut r = regs(u)?;
        if let Some(sig) = SIGNATURES.get(usize::from(u.arbitrary::<u8>()?)) {
            (r.ebx, r.ecx, r.edx) = (word(sig, 0), word(sig, 4), word(sig, 8));
        }
        match u.arbitrary::<u8>()? % 4 {
            0 => r.eax = base + u32::from(u.arbitrary::<u8>()?),
            1 => r.eax = 0,
            _ => {}
        }
        leaves.insert(base, r);
        for l in 1..u32::from(u.arbitrary::<u8>()? % 0x20) {
            leaves.insert(base + l, regs(u)?);
        }
    }
    Ok(Input {
        leaves,
        platform: FuzzPlatform { boot, xen_pv },
    })
}

/// The interfaces the scan rule admits, lowest base first.
fn admitted(leaves: &BTreeMap<u32, CpuidResult>) -> Vec<(u32, u32, [u8; 12])> {
    let mut out = Vec::new();
    for k in 0..=(HYPERVISOR_BASE_LAST - HYPERVISOR_BASE_FIRST) / HYPERVISOR_BASE_STEP {
        let base = HYPERVISOR_BASE_FIRST + k * HYPERVISOR_BASE_STEP;
        let r = leaves.get(&base).copied().unwrap_or_default();
        let mut sig = [0u8; 12];
        sig[..4].copy_from_slice(&r.ebx.to_le_bytes());
        sig[4..8].copy_from_slice(&r.ecx.to_le_bytes());
        sig[8..].copy_from_slice(&r.edx.to_le_bytes());
        if sig == [0; 12] {
            continue;
        }
        let known = HypervisorKind::from_signature(&sig) != HypervisorKind::Unknown;
        let max_leaf = if r.eax == 0 && known {
            base + 1
        } else if r.eax >= base && r.eax - base < HYPERVISOR_BASE_STEP {
            r.eax
        } else {
            continue;
        };
        out.push((base, max_leaf, sig));
    }
    out
}

fn presence(candidates: &[Candidate], id: BackendId) -> Presence {
    candidates
        .iter()
        .find(|c| c.id == id)
        .map(|c| c.presence)
        .expect("a candidate for every backend")
}

fuzz_target!(|data: &[u8]| {
    let Ok(Input { leaves, platform }) = input(&mut Unstructured::new(data)) else {
        return;
    };
    let hv_reads = Cell::new(0u32);
    let cpu = |leaf: u32, _sub: u32| {
        if leaf >= HYPERVISOR_BASE_FIRST {
            hv_reads.set(hv_reads.get() + 1);
        }
        leaves.get(&leaf).copied().unwrap_or_default()
    };
    let d = detect(&cpu);

    // detection
    let bit = leaves[&0].eax >= 1 && leaves[&1].ecx & CPUID_1_ECX_HYPERVISOR != 0;
    assert_eq!(d.hypervisor_bit, bit);
    let want = if bit { admitted(&leaves) } else { Vec::new() };
    if !bit {
        assert_eq!(
            hv_reads.get(),
            0,
            "hypervisor leaves read without the hypervisor bit"
        );
    }
    let got: Vec<_> = d.interfaces().copied().collect();
    assert_eq!(got.len(), want.len().min(MAX_INTERFACES));
    assert_eq!(d.dropped, want.len().saturating_sub(MAX_INTERFACES));
    for (i, &(base, max_leaf, sig)) in got.iter().zip(&want) {
        assert_eq!((i.base, i.max_leaf, i.signature), (base, max_leaf, sig));
        assert_eq!(i.kind, HypervisorKind::from_signature(&sig));
        assert!(i.leaves() < HYPERVISOR_BASE_STEP);
        let _ = i.signature_str().to_string();
    }
    assert_eq!(d.primary(), got.last());
    for i in &got {
        assert_eq!(d.find(i.kind), got.iter().rfind(|j| j.kind == i.kind));
    }

    // probes
    let candidates = pvops_backends::probe(&d, &platform).candidates();
    for id in BACKENDS {
        assert_eq!(candidates.iter().filter(|c| c.id == id).count(), 1);
    }
    let native_runs = presence(&candidates, BackendId::NATIVE) == Presence::Present { base: None };
    assert_eq!(native_runs, !platform.xen_pv);
    let present: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| c.id != BackendId::NATIVE && matches!(c.presence, Presence::Present { .. }))
        .collect();

    // auto
    match select(Request::Auto, &d, &candidates) {
        Ok(s) => {
            let _ = s.to_string();
            if s.backend == BackendId::NATIVE {
                assert!(
                    native_runs && present.is_empty(),
                    "native chosen over {present:?}"
                );
                let reason = match d.primary() {
                    _ if !d.hypervisor_bit => Reason::NoHypervisor,
                    None => Reason::NoInterface,
                    Some(i) => Reason::Unsupported(i.kind),
                };
                assert_eq!(s.reason, reason);
                assert_eq!(s.interface.as_ref(), d.primary());
                assert_eq!(s.fall_back(Request::Auto, &candidates), None);
            } else {
                assert_eq!(s.reason, Reason::Detected);
                let rank = |c: &Candidate| match c.presence {
                    Presence::Present { base: None } => u64::MAX,
                    Presence::Present { base: Some(b) } => u64::from(b),
                    Presence::Absent => unreachable!(),
                };
                let chosen = present.iter().find(|c| c.id == s.backend).expect("present");
                assert!(present.iter().all(|c| rank(c) <= rank(chosen)));
                let fb = s.fall_back(Request::Auto, &candidates);
                assert_eq!(fb.is_some(), native_runs);
                if let Some(fb) = fb {
                    assert_eq!(fb.backend, BackendId::NATIVE);
                    assert_eq!(fb.reason, Reason::StartFailed(s.backend));
                }
                assert_eq!(s.fall_back(Request::Backend(s.backend), &candidates), None);
            }
        }
        Err(e) => {
            assert_eq!(e, SelectError::NothingRuns);
            assert!(!native_runs && present.is_empty());
        }
    }

    // by name
    for id in BACKENDS {
        let there = matches!(presence(&candidates, id), Presence::Present { .. });
        match select(Request::Backend(id), &d, &candidates) {
            Ok(s) => {
                assert!(there, "{id} selected while absent");
                assert_eq!((s.backend, s.reason), (id, Reason::Requested));
            }
            Err(e) => {
                assert!(!there, "{id} refused while present");
                assert_eq!(e, SelectError::Absent(id));
                let _ = e.to_string();
            }
        }
    }
});
