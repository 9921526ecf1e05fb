//! # pvops backends
//!
//! One file per backend, each filling the [`pvops`] table for its hypervisor:
//!
//! | backend | file | status |
//! |---|---|---|
//! | native | [`native`] | built |
//! | KVM | [`kvm`] | built (kvmclock, steal time, hypercalls) |
//! | Xen, HVM and PV | [`xen`], PV ops in [`xen_pv`] | built (pvclock/vcpu_info time; PV: upcall mask, mmuext, mmu_update) |
//! | VMI (64-bit variant, ROM shipped) | [`vmi`] | built: ROM found in the option-ROM area, routines copied into an arena |
//! | lguest | [`lguest`] | built (the project's 64-bit port; host: `lguest-host/`) |
//!
//! [`candidates`] asks each backend whether its hypervisor is here; [`pvops::select()`] picks one;
//! [`start`] brings the chosen backend up, ready to install, and [`stop`] releases it. A
//! backend that is not part of this build answers [`Presence::NotBuilt`], so a guest of its
//! hypervisor reports "vmi backend not built" rather than silently running native.
//!
//! ## Adding a backend
//!
//! 1. Write `src/<name>.rs` with a type implementing [`pvops::Backend`] (its table and its inline
//!    replacements) and a presence probe.
//! 2. Answer for it in [`candidates`], start it in [`start`] and release it in [`stop`].
//! 3. Add a rig (`scripts/rig <name>`) and host tests with a modelled hypervisor.
#![cfg_attr(not(test), no_std)]

pub mod hypercall;
pub mod kvm;
pub mod lguest;
pub mod native;
pub mod pvclock;
pub mod vmi;
pub mod xen;
pub mod xen_pv;

pub use pvclock::PvclockVcpuTimeInfo;

use pvops::{BackendId, Candidate, Detection, Presence};

/// What the environment tells backends that CPUID cannot, and the privileged accesses they need
/// to set up (ring 0 in the kernel; host tests model them). Every method has a "cannot" default.
pub trait Platform {
    /// The TSC frequency in kHz, 0 when unknown.
    fn tsc_khz(&self) -> u64;

    /// A monotonic nanosecond clock the platform trusts (the kernel's ktime), to calibrate
    /// against; `None`: there is none.
    fn clock_ns(&self) -> Option<u64> {
        None
    }

    /// CPUID (the instruction, unless a test models a hypervisor).
    fn cpuid(&self, leaf: u32, subleaf: u32) -> pvops::ops::CpuidResult {
        pvops::arch::raw_cpuid(leaf, subleaf)
    }

    /// Read an MSR on this CPU (`None`: it faulted).
    fn rdmsr(&self, _msr: u32) -> Option<u64> {
        None
    }

    /// Write an MSR on this CPU (`false`: it faulted).
    fn wrmsr(&self, _msr: u32, _value: u64) -> bool {
        false
    }

    /// Read an MSR on another CPU (`None`: no such CPU, or it faulted).
    fn rdmsr_on_cpu(&self, _cpu: u32, _msr: u32) -> Option<u64> {
        None
    }

    /// Whether the kernel itself runs kvmclock (`None`: unknown, judge by the MSR alone). A
    /// registration the kernel does not own (the firmware's, left behind) must not be used.
    fn kernel_kvmclock(&self) -> Option<bool> {
        None
    }

    /// The kernel's own pvclock record for CPU 0, if it published one
    /// (`pvclock_get_pvti_cpu0_va()`: kvmclock's, or Xen's secondary time area).
    fn kernel_pvclock_cpu0(&self) -> Option<usize> {
        None
    }

    /// Whether this is a Xen PV domain (announced by the boot path, not by CPUID).
    fn xen_pv(&self) -> bool {
        false
    }

    /// What a Xen PV kernel shares with the backend (`None`: not a PV domain, or unknown).
    fn xen_pv_kernel(&self) -> Option<xen_pv::XenPvKernel> {
        None
    }

    /// `boot_params.hdr.hardware_subarch` and `hardware_subarch_data` as the boot loader set
    /// them (`None`: unknown). lguest is announced here, not by CPUID.
    fn boot_subarch(&self) -> Option<(u32, u64)> {
        None
    }

    /// A modelled lguest host's hypercall entry, for host tests (`None`: the instruction).
    fn lguest_host(&self) -> Option<lguest::HypercallFn> {
        None
    }

    /// Whether backends run in ring 0 and drive the real CPU state (interrupt flag, CR3, TLB)
    /// alongside their hypervisor calls; host tests model only the hypervisor (`false`).
    fn privileged(&self) -> bool {
        true
    }

    /// The Xen vCPU id of `cpu`.
    fn xen_vcpu_id(&self, _cpu: u32) -> Option<u32> {
        None
    }

    /// A zeroed page of kernel memory (its address), for records a hypervisor writes into.
    fn alloc_page(&self) -> Option<usize> {
        None
    }

    /// Free a page from [`Platform::alloc_page`].
    fn free_page(&self, _va: usize) {}

    /// The number of possible CPUs.
    fn nr_cpus(&self) -> u32 {
        1
    }

    /// The kernel address of guest-physical memory at `pa` (the direct map).
    fn phys_to_virt(&self, _pa: u64) -> Option<usize> {
        None
    }

    /// The guest-physical address of kernel memory at `va` (direct map or vmalloc).
    fn virt_to_phys(&self, _va: usize) -> Option<u64> {
        None
    }

    /// Write `bytes` at `addr`, inside this image's own text (read-only, executable), and make
    /// the change visible to instruction fetch; `false`: cannot. No CPU may execute those bytes
    /// while they are written (the VMI backend's arena, which nothing calls yet).
    fn write_code(&self, _addr: usize, _bytes: &[u8]) -> bool {
        false
    }
}

/// Where detection reads CPUID: a PV domain must ask Xen through the forced-emulation prefix
/// (the instruction alone shows the physical CPU).
pub fn cpuid_source(platform: &dyn Platform) -> &'static dyn pvops::detect::CpuidSource {
    if platform.xen_pv() {
        &xen_pv::PvCpuid
    } else {
        &pvops::arch::NativeCpuid
    }
}

/// Each backend's answer to "is your hypervisor here?".
pub fn candidates(detection: &Detection, platform: &dyn Platform) -> [Candidate; 5] {
    BackendId::ALL.map(|id| Candidate {
        id,
        presence: match id {
            // A Xen PV kernel runs deprivileged: cli, CR and MSR accesses would fault
            BackendId::Native if platform.xen_pv() => Presence::Absent,
            BackendId::Native => Presence::Present { base: None },
            BackendId::Kvm => match kvm::interface(detection) {
                Some(i) => Presence::Present { base: Some(i.base) },
                None => Presence::Absent,
            },
            // In a PV domain the detection must have asked Xen (xen_pv::PvCpuid)
            BackendId::Xen => match xen::interface(detection) {
                Some(i) => Presence::Present { base: Some(i.base) },
                None => Presence::Absent,
            },
            // a valid VMI ROM in the option-ROM area (a refused one counts as absent)
            BackendId::Vmi => match vmi::probe(platform) {
                Ok(_) => Presence::Present { base: None },
                Err(_) => Presence::Absent,
            },
            // Announced by boot data only: absent unless the launcher said so
            BackendId::Lguest => match lguest::probe(platform) {
                Ok(()) => Presence::Present { base: None },
                Err(_) => Presence::Absent,
            },
        },
    })
}

/// Why a selected backend could not be brought up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartError {
    /// The KVM backend refused.
    Kvm(kvm::KvmError),
    /// The Xen backend refused.
    Xen(xen::XenError),
    /// The VMI backend refused.
    Vmi(vmi::VmiError),
    /// The lguest backend refused.
    Lguest(lguest::LguestError),
    /// Not part of this build.
    NotBuilt(BackendId),
}

impl core::fmt::Display for StartError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            StartError::Kvm(e) => write!(f, "kvm: {e}"),
            StartError::Xen(e) => write!(f, "xen: {e}"),
            StartError::Vmi(e) => write!(f, "vmi: {e}"),
            StartError::Lguest(e) => write!(f, "lguest: {e}"),
            StartError::NotBuilt(b) => write!(f, "{b} backend not built"),
        }
    }
}

/// Bring the selected backend up and hand it out, ready to install.
pub fn start(
    id: BackendId,
    detection: &Detection,
    platform: &dyn Platform,
) -> Result<&'static dyn pvops::Backend, StartError> {
    match id {
        BackendId::Native => {
            native::start(platform);
            Ok(&native::NATIVE)
        }
        BackendId::Kvm => Ok(kvm::init(detection, platform).map_err(StartError::Kvm)?),
        BackendId::Xen => Ok(xen::init(detection, platform).map_err(StartError::Xen)?),
        BackendId::Vmi => Ok(vmi::init(platform).map_err(StartError::Vmi)?),
        BackendId::Lguest => Ok(lguest::init(detection, platform).map_err(StartError::Lguest)?),
    }
}

/// Release what [`start`] set up (registrations, mappings) after the backend was uninstalled;
/// says what was released.
pub fn stop(id: BackendId, platform: &dyn Platform) -> &'static str {
    match id {
        BackendId::Kvm => kvm::teardown(platform),
        BackendId::Xen => xen::teardown(platform),
        BackendId::Vmi => vmi::teardown(platform),
        BackendId::Lguest => lguest::teardown(platform),
        _ => "nothing registered",
    }
}
