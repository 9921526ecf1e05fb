//! Hypervisor detection: the CPUID scan Linux does, reporting every interface it sees.
//!
//! 1. CPUID.1:ECX bit 31 ("hypervisor present") must be set; otherwise nothing is scanned.
//! 2. Each base 0x4000_0000, 0x4000_0100, … 0x4000_FF00 is read; CPUID(base) gives the highest
//!    leaf of that interface in EAX and a 12-byte signature in EBX, ECX, EDX. All 12 bytes are
//!    compared. A base whose signature is all zero or whose EAX is below the base (leftover
//!    basic-leaf values, as QEMU TCG returns for unused bases) holds no interface.
//! 3. Very old KVM returned EAX = 0 at its base: that means "highest leaf = base + 1".
//!
//! VMI (an option ROM) and lguest (boot data) are not announced through CPUID: their backends
//! detect them through the platform hooks of [`crate::select`](mod@crate::select).

use crate::ops::CpuidResult;

/// Where CPUID answers come from: the real instruction ([`crate::arch::NativeCpuid`]), or a
/// table modelling a hypervisor in tests.
pub trait CpuidSource {
    /// CPUID for `leaf`/`subleaf`.
    fn cpuid(&self, leaf: u32, subleaf: u32) -> CpuidResult;
}

impl<F: Fn(u32, u32) -> CpuidResult> CpuidSource for F {
    fn cpuid(&self, leaf: u32, subleaf: u32) -> CpuidResult {
        self(leaf, subleaf)
    }
}

/// The first hypervisor CPUID base.
pub const HYPERVISOR_BASE_FIRST: u32 = 0x4000_0000;
/// The last hypervisor CPUID base.
pub const HYPERVISOR_BASE_LAST: u32 = 0x4000_ff00;
/// Distance between two bases.
pub const HYPERVISOR_BASE_STEP: u32 = 0x100;
/// CPUID.1:ECX bit 31.
pub const CPUID_1_ECX_HYPERVISOR: u32 = 1 << 31;

/// The hypervisor interfaces pvops knows by signature.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HypervisorKind {
    /// `KVMKVMKVM\0\0\0`.
    Kvm,
    /// `XenVMMXenVMM`.
    Xen,
    /// `VMwareVMware`.
    VMware,
    /// `Microsoft Hv` (also offered by KVM and Xen as a compatibility interface).
    HyperV,
    /// `TCGTCGTCGTCG`: QEMU's emulator, which offers no paravirtual interface.
    Tcg,
    /// `bhyve bhyve ` (FreeBSD).
    Bhyve,
    /// `ACRNACRNACRN`.
    Acrn,
    /// Anything else; the raw signature is in [`Interface::signature`].
    Unknown,
}

impl HypervisorKind {
    const SIGNATURES: [(&'static [u8; 12], HypervisorKind); 8] = [
        (b"KVMKVMKVM\0\0\0", HypervisorKind::Kvm),
        (b"XenVMMXenVMM", HypervisorKind::Xen),
        (b"VMwareVMware", HypervisorKind::VMware),
        (b"Microsoft Hv", HypervisorKind::HyperV),
        (b"TCGTCGTCGTCG", HypervisorKind::Tcg),
        (b"bhyve bhyve ", HypervisorKind::Bhyve),
        (b"ACRNACRNACRN", HypervisorKind::Acrn),
        // bhyve's older signature
        (b"BHyVE BHyVE ", HypervisorKind::Bhyve),
    ];

    /// The kind a full 12-byte signature names.
    pub fn from_signature(sig: &[u8; 12]) -> HypervisorKind {
        Self::SIGNATURES
            .iter()
            .find(|(s, _)| *s == sig)
            .map_or(HypervisorKind::Unknown, |&(_, k)| k)
    }

    /// A short lower-case name (`kvm`, `xen`, `hyperv`, …).
    pub fn name(self) -> &'static str {
        match self {
            HypervisorKind::Kvm => "kvm",
            HypervisorKind::Xen => "xen",
            HypervisorKind::VMware => "vmware",
            HypervisorKind::HyperV => "hyperv",
            HypervisorKind::Tcg => "tcg",
            HypervisorKind::Bhyve => "bhyve",
            HypervisorKind::Acrn => "acrn",
            HypervisorKind::Unknown => "unknown",
        }
    }
}

/// One interface found in the hypervisor CPUID range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interface {
    /// Its base leaf (0x4000_0000, 0x4000_0100, …).
    pub base: u32,
    /// Its highest leaf (absolute).
    pub max_leaf: u32,
    /// What the signature names.
    pub kind: HypervisorKind,
    /// The raw 12 signature bytes (EBX, ECX, EDX).
    pub signature: [u8; 12],
}

impl Interface {
    /// Leaves after the base (`max_leaf - base`).
    pub fn leaves(&self) -> u32 {
        self.max_leaf - self.base
    }

    /// The signature as text, with NULs and other unprintable bytes shown as `.`.
    pub fn signature_str(&self) -> SignatureStr {
        let mut s = [b'.'; 12];
        for (d, &c) in s.iter_mut().zip(&self.signature) {
            if c.is_ascii_graphic() || c == b' ' {
                *d = c;
            }
        }
        SignatureStr(s)
    }
}

/// A printable copy of a signature.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SignatureStr([u8; 12]);

impl SignatureStr {
    /// The text (always ASCII).
    pub fn as_str(&self) -> &str {
        core::str::from_utf8(&self.0).unwrap_or("????????????")
    }
}

impl core::fmt::Display for SignatureStr {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.as_str().trim_end_matches('.'))
    }
}

impl core::fmt::Debug for SignatureStr {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

/// The CPU vendor (it decides between `vmcall` and `vmmcall`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuVendor {
    /// `GenuineIntel`.
    Intel,
    /// `AuthenticAMD`.
    Amd,
    /// `HygonGenuine`.
    Hygon,
    /// Anything else.
    Other,
}

impl CpuVendor {
    /// Whether hypercalls use `vmmcall` (AMD, Hygon) rather than `vmcall`.
    pub fn uses_vmmcall(self) -> bool {
        matches!(self, CpuVendor::Amd | CpuVendor::Hygon)
    }
}

/// At most this many interfaces are recorded (real hypervisors offer one or two).
pub const MAX_INTERFACES: usize = 4;

/// What the CPUID scan saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Detection {
    /// CPUID.1:ECX bit 31.
    pub hypervisor_bit: bool,
    /// The CPU vendor.
    pub vendor: CpuVendor,
    interfaces: [Option<Interface>; MAX_INTERFACES],
    /// Interfaces seen beyond [`MAX_INTERFACES`] (not recorded).
    pub dropped: usize,
}

impl Detection {
    /// Every interface seen, lowest base first.
    pub fn interfaces(&self) -> impl Iterator<Item = &Interface> {
        self.interfaces.iter().flatten()
    }

    /// The interface of `kind` at the highest base, if any (Linux's arbitration: a native
    /// interface moved above a compatibility one wins).
    pub fn find(&self, kind: HypervisorKind) -> Option<&Interface> {
        self.interfaces().filter(|i| i.kind == kind).last()
    }

    /// The interface at the highest base: the one Linux would call "the" hypervisor.
    pub fn primary(&self) -> Option<&Interface> {
        self.interfaces().last()
    }
}

fn signature(r: &CpuidResult) -> [u8; 12] {
    let mut s = [0u8; 12];
    s[0..4].copy_from_slice(&r.ebx.to_le_bytes());
    s[4..8].copy_from_slice(&r.ecx.to_le_bytes());
    s[8..12].copy_from_slice(&r.edx.to_le_bytes());
    s
}

impl CpuVendor {
    /// The vendor CPUID leaf 0 names (EBX, EDX, ECX).
    pub fn of(leaf0: &CpuidResult) -> CpuVendor {
        let spelled = signature(&CpuidResult {
            ebx: leaf0.ebx,
            ecx: leaf0.edx,
            edx: leaf0.ecx,
            eax: 0,
        });
        match &spelled {
            b"GenuineIntel" => CpuVendor::Intel,
            b"AuthenticAMD" => CpuVendor::Amd,
            b"HygonGenuine" => CpuVendor::Hygon,
            _ => CpuVendor::Other,
        }
    }
}

/// Scan CPUID as described in the module docs.
pub fn detect(cpu: &dyn CpuidSource) -> Detection {
    let leaf0 = cpu.cpuid(0, 0);
    let vendor = CpuVendor::of(&leaf0);
    let hypervisor_bit = leaf0.eax >= 1 && cpu.cpuid(1, 0).ecx & CPUID_1_ECX_HYPERVISOR != 0;
    let mut det = Detection {
        hypervisor_bit,
        vendor,
        interfaces: [None; MAX_INTERFACES],
        dropped: 0,
    };
    if !hypervisor_bit {
        return det;
    }
    let mut n = 0;
    let mut base = HYPERVISOR_BASE_FIRST;
    loop {
        let r = cpu.cpuid(base, 0);
        let sig = signature(&r);
        let kind = HypervisorKind::from_signature(&sig);
        let max_leaf = match r.eax {
            // Old KVM; trusted only with a signature we know, since unused bases read as zero
            // or as leftovers.
            0 if kind != HypervisorKind::Unknown => Some(base + 1),
            eax if eax >= base && eax - base < HYPERVISOR_BASE_STEP => Some(eax),
            _ => None,
        };
        if let Some(max_leaf) = max_leaf.filter(|_| sig != [0; 12]) {
            let iface = Interface {
                base,
                max_leaf,
                kind,
                signature: sig,
            };
            if n < MAX_INTERFACES {
                det.interfaces[n] = Some(iface);
                n += 1;
            } else {
                det.dropped += 1;
            }
        }
        if base == HYPERVISOR_BASE_LAST {
            break;
        }
        base += HYPERVISOR_BASE_STEP;
    }
    det
}
