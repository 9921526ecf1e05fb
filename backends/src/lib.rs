//! # pvops backends
//!
//! One backend per file (or folder), each filling the [`pvops`] table for its hypervisor, and
//! one list of them, `registry!` below:
//!
//! | backend | where | what it drives |
//! |---|---|---|
//! | native | [`native`] | the real instructions |
//! | KVM | [`kvm`] | kvmclock, steal time, hypercalls |
//! | Xen, HVM and PV | [`xen`] (PV ops in [`xen::pv`], ABI in [`xen::abi`]) | pvclock/`vcpu_info` time; PV: upcall mask, mmuext, mmu_update |
//! | VMI (64-bit variant, ROM shipped) | [`vmi`] (ROM format in [`vmi::rom`], code arena in [`vmi::arena`]) | the ROM's routines, copied into an arena |
//! | lguest | [`lguest`] (ABI in [`lguest::abi`], shared with `lguest-host/`) | the project's 64-bit port |
//!
//! Every backend is a type implementing [`Driver`], one lifecycle: [`Driver::probe`] (is its
//! hypervisor here? it looks and changes nothing), [`Driver::start`] (with what the probe
//! found), then the live backend's [`pvops::Backend::ops`], and [`Driver::stop`]. The
//! registry turns the list into [`BACKENDS`] (the names, which the module's parameter and
//! reports use), [`probe`] (every backend probed once, giving [`Probes`]: the candidates
//! selection reads and what [`Probes::start`] starts), [`StartError`] and [`stop`].
//!
//! ## Adding a backend
//!
//! 1. Write `src/<name>.rs` with a type implementing [`pvops::Backend`] (its [`BackendOps`]:
//!    each op's function with its inline bytes) and [`Driver`] (probe, start, stop).
//! 2. Add one line to the `registry!` invocation in this file.
//! 3. Add a rig (`scripts/rigs/`) and host tests with a modelled hypervisor.
//!
//! [`BackendOps`]: pvops::BackendOps
#![cfg_attr(not(test), no_std)]

pub mod describe;
pub mod hypercall;
#[macro_use]
mod registry;
pub mod kvm;
pub mod lguest;
pub mod native;
pub mod pvclock;
pub mod time;
pub mod vmi;
pub mod xen;

pub use pvclock::PvclockVcpuTimeInfo;

use core::fmt;

use pvops::detect::HypervisorKind;
use pvops::{BackendId, Candidate, Detection, Presence};

/// The largest number of CPUs whose per-CPU records (steal time, vCPU ids) a backend tracks.
pub const MAX_CPUS: usize = 64;

registry! {
    /// The real instructions.
    native: Native => native::Native,
    /// KVM's paravirtual interface.
    kvm: Kvm => kvm::Kvm,
    /// Xen, HVM guest or PV domain.
    xen: Xen => xen::Xen,
    /// The 64-bit VMI ROM.
    vmi: Vmi => vmi::Vmi,
    /// The 64-bit lguest port.
    lguest: Lguest => lguest::Lguest,
}

/// A backend's lifecycle: probe → start → (its [`pvops::Backend`] ops installed and patched)
/// → stop. One type per backend implements it; `registry!` lists them.
pub trait Driver: pvops::Backend + Sized + 'static {
    /// The backend's identity: its name in parameters and reports.
    const ID: BackendId;
    /// The CPUID interface kind it serves, if detection finds it by the scan.
    const SERVES: Option<HypervisorKind> = None;
    /// What a successful probe found; [`Driver::start`] is handed it (nothing is probed twice).
    type Found: Probed;
    /// Why the backend's hypervisor is not here.
    type Absent: fmt::Display + Copy;
    /// Why the backend could not start.
    type Error: fmt::Display + Copy;

    /// Is this backend's hypervisor here? Looks only: registers, maps and writes nothing.
    fn probe(detection: &Detection, platform: &dyn Platform) -> Result<Self::Found, Self::Absent>;

    /// Whether an absence deserves a warning: something was there and the backend refused it
    /// (a corrupt ROM), rather than nothing at all.
    fn refused(_why: &Self::Absent) -> bool {
        false
    }

    /// Bring the backend up (find or register what it needs), ready to install. On error
    /// nothing stays registered.
    fn start(
        found: Self::Found,
        detection: &Detection,
        platform: &dyn Platform,
    ) -> Result<&'static Self, Self::Error>;

    /// Read again what the backend keeps per CPU (a record the kernel registers on each CPU as
    /// it comes up), for every CPU online now. Built in, the backend starts at boot with only
    /// the boot CPU up; the initcall calls this once the others are. Nothing by default.
    fn refresh_cpus(_platform: &dyn Platform) {}

    /// Release what [`Driver::start`] set up, once the backend's ops are no longer installed;
    /// says what was released.
    fn stop(platform: &dyn Platform) -> &'static str;
}

/// What a probe found, as selection sees it.
pub trait Probed: Copy {
    /// The CPUID base it was seen at (`None`: a platform hook found it, which `auto` prefers:
    /// VMI and lguest are announced only where they really are).
    fn base(&self) -> Option<u32> {
        None
    }
}

/// A backend that is simply there (native) or announced by boot data (lguest).
impl Probed for () {}

/// A CPUID interface found by the scan.
impl Probed for pvops::Interface {
    fn base(&self) -> Option<u32> {
        Some(self.base)
    }
}

/// One backend's absence, as [`Probes::absences`] lists them.
#[derive(Clone, Copy)]
pub struct Absence<'a> {
    /// The backend.
    pub id: BackendId,
    /// Something was there and was refused (see [`Driver::refused`]).
    pub refused: bool,
    /// Why.
    pub why: &'a dyn fmt::Display,
}

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

    /// Write an MSR on CPU `cpu` (`false`: no such CPU online, or it faulted): a per-CPU
    /// registration made and withdrawn on the same CPU whichever CPU runs the caller.
    fn wrmsr_on_cpu(&self, _cpu: u32, _msr: u32, _value: u64) -> bool {
        false
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
    fn xen_pv_kernel(&self) -> Option<xen::pv::XenPvKernel> {
        None
    }

    /// What KVM's paravirt spinlock ops, PV TLB flush and PV send-IPI need of the kernel
    /// (`None`: unknown; they stay native's).
    fn kvm_kernel(&self) -> Option<kvm::KvmKernel> {
        None
    }

    /// `boot_params.hdr.hardware_subarch` and `hardware_subarch_data` as the boot loader set
    /// them (`None`: unknown). lguest is announced here, not by CPUID.
    fn boot_subarch(&self) -> Option<(u32, u64)> {
        None
    }

    /// A modelled hypervisor's hypercall entry, for host tests (`None`: the instruction). The
    /// lguest and Xen HVM backends call it in place of `vmcall`/`vmmcall` when it is there.
    fn hypercall_model(&self) -> Option<hypercall::HypercallFn> {
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
        &xen::pv::PvCpuid
    } else {
        &pvops::arch::NativeCpuid
    }
}
