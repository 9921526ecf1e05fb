// SPDX-License-Identifier: GPL-2.0

//! The kernel as the backends see it: [`KernelPlatform`], the module's implementation of
//! [`pvops_backends::Platform`], each method one call into shim.c. The fallible ones can be
//! made to fail one at a time (`fault=platform:N`, [`crate::faults`]).

use crate::{faults, shim};

/// What the kernel knows that backends need.
pub(crate) struct KernelPlatform;

impl pvops_backends::Platform for KernelPlatform {
    fn tsc_khz(&self) -> u64 {
        // SAFETY: reads the exported `tsc_khz`.
        unsafe { shim::pvops_shim_tsc_khz() as u64 }
    }

    fn rdmsr(&self, msr: u32) -> Option<u64> {
        if faults::platform("rdmsr") {
            return None;
        }
        let mut v = 0;
        // SAFETY: the kernel's rdmsrl_safe: a fault is caught and reported.
        (unsafe { shim::pvops_shim_rdmsr(msr, &mut v) } == 0).then_some(v)
    }

    fn wrmsr(&self, msr: u32, value: u64) -> bool {
        if faults::platform("wrmsr") {
            return false;
        }
        // SAFETY: the kernel's wrmsrl_safe; the backends only write their own registrations.
        unsafe { shim::pvops_shim_wrmsr(msr, value) == 0 }
    }

    fn rdmsr_on_cpu(&self, cpu: u32, msr: u32) -> Option<u64> {
        if faults::platform("rdmsr_on_cpu") {
            return None;
        }
        let mut v = 0;
        // SAFETY: the kernel's rdmsrl_safe_on_cpu (an IPI to an online CPU).
        (unsafe { shim::pvops_shim_rdmsr_on_cpu(cpu, msr, &mut v) } == 0).then_some(v)
    }

    fn wrmsr_on_cpu(&self, cpu: u32, msr: u32, value: u64) -> bool {
        if faults::platform("wrmsr_on_cpu") {
            return false;
        }
        // SAFETY: the kernel's wrmsrl_safe_on_cpu (an IPI to an online CPU); the backends only
        // write their own registrations.
        unsafe { shim::pvops_shim_wrmsr_on_cpu(cpu, msr, value) == 0 }
    }

    fn clock_ns(&self) -> Option<u64> {
        // SAFETY: reads the kernel's monotonic clock.
        Some(unsafe { shim::pvops_shim_ktime_ns() })
    }

    fn kernel_pvclock_cpu0(&self) -> Option<usize> {
        // SAFETY: reads the kernel's published pvclock pointer.
        let va = unsafe { shim::pvops_shim_kernel_pvclock_cpu0() };
        (va != 0).then_some(va)
    }

    fn xen_pv(&self) -> bool {
        // SAFETY: reads x86_hyper_type.
        unsafe { shim::pvops_shim_xen_pv() != 0 }
    }

    fn boot_subarch(&self) -> Option<(u32, u64)> {
        let (mut subarch, mut data) = (0, 0);
        // SAFETY: reads the kernel's published copy of boot_params into two locals.
        (unsafe { shim::pvops_shim_boot_subarch(&mut subarch, &mut data) } == 0)
            .then_some((subarch, data))
    }

    fn xen_vcpu_id(&self, cpu: u32) -> Option<u32> {
        // SAFETY: reads a possible CPU's xen_vcpu_id.
        u32::try_from(unsafe { shim::pvops_shim_xen_vcpu_id(cpu) }).ok()
    }

    fn xen_pv_kernel(&self) -> Option<pvops_backends::xen::pv::XenPvKernel> {
        if !self.xen_pv() {
            return None;
        }
        // SAFETY: plain queries of the kernel's state.
        let (irq_disable, save_fl, percpu_base0, shared_info, cr0) = unsafe {
            (
                shim::pvops_shim_xen_pv_irq_fn(0),
                shim::pvops_shim_xen_pv_irq_fn(1),
                shim::pvops_shim_percpu_base(0),
                shim::pvops_shim_xen_pv_shared_info(),
                shim::pvops_shim_read_cr0(),
            )
        };
        (irq_disable != 0 && save_fl != 0).then_some(pvops_backends::xen::pv::XenPvKernel {
            irq_disable,
            save_fl,
            percpu_base0,
            shared_info,
            cr0,
            read_cr3: shim::pvops_shim_read_cr3,
            write_cr3: shim::pvops_shim_write_cr3,
            read_cr4: shim::pvops_shim_read_cr4,
            virt_to_machine: shim::pvops_shim_virt_to_machine,
            pte_of: shim::pvops_shim_pte_of,
            value: kernel_value,
        })
    }

    /// In a module too (the backend gates what a module cannot take over itself: the lock
    /// group and the TLB flush), for the APIC IDs of PV send-IPI.
    fn kvm_kernel(&self) -> Option<pvops_backends::kvm::KvmKernel> {
        // SAFETY: plain reads of the kernel's state (`nopvspin`, the possible mask).
        let (nopvspin, possible_cpus) = unsafe {
            (
                shim::pvops_shim_nopvspin() != 0,
                shim::pvops_shim_possible_cpus(),
            )
        };
        Some(pvops_backends::kvm::KvmKernel {
            nopvspin,
            possible_cpus,
            in_nmi: shim::pvops_shim_in_nmi,
            apic_id: shim::pvops_shim_apic_id,
        })
    }

    fn alloc_page(&self) -> Option<usize> {
        if faults::platform("alloc_page") {
            return None;
        }
        // SAFETY: the kernel's page allocator.
        let va = unsafe { shim::pvops_shim_alloc_page() };
        (va != 0).then_some(va)
    }

    fn free_page(&self, va: usize) {
        // SAFETY: `va` came from alloc_page and nothing uses it any more (the backends' contract).
        unsafe { shim::pvops_shim_free_page(va) }
    }

    fn kernel_kvmclock(&self) -> Option<bool> {
        // SAFETY: reads the kernel's published kvmclock pointer.
        Some(unsafe { shim::pvops_shim_kernel_kvmclock() } != 0)
    }

    fn nr_cpus(&self) -> u32 {
        // SAFETY: reads nr_cpu_ids.
        unsafe { shim::pvops_shim_nr_cpus() }
    }

    fn phys_to_virt(&self, pa: u64) -> Option<usize> {
        if faults::platform("phys_to_virt") {
            return None;
        }
        // SAFETY: pure address arithmetic, with a pfn_valid check.
        let va = unsafe { shim::pvops_shim_phys_to_virt(pa) };
        (va != 0).then_some(va)
    }

    fn virt_to_phys(&self, va: usize) -> Option<u64> {
        if faults::platform("virt_to_phys") {
            return None;
        }
        // SAFETY: a page-table lookup of kernel memory the backend owns.
        let pa = unsafe { shim::pvops_shim_virt_to_phys(va) };
        (pa != 0).then_some(pa)
    }

    fn write_code(&self, addr: usize, bytes: &[u8]) -> bool {
        if faults::platform("write_code") {
            return false;
        }
        let end = addr + bytes.len();
        // SAFETY: [addr, end) is this module's own text (the VMI backend's arena); the alias
        // is dropped below.
        let alias = unsafe { shim::pvops_shim_alias_text(addr, end) };
        if alias.is_null() {
            return false;
        }
        // SAFETY: the alias maps every page of [addr, end) writable, starting at the page of
        // `addr`; no CPU executes these bytes while they are written (the caller's contract:
        // nothing calls the arena yet, or any more).
        unsafe {
            core::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                alias.cast::<u8>().add(addr & 0xfff),
                bytes.len(),
            );
            shim::pvops_shim_unalias_text(alias);
            // this CPU fetches the new bytes; the others serialise in the stop_machine that
            // patches the sites, before any of them can reach the arena
            shim::pvops_shim_sync_core();
        }
        true
    }
}

/// The kernel's own page-table value conversion `op` (one of pvops's value ops) of `value`:
/// what a Xen PV domain's value ops forward to.
extern "C" fn kernel_value(op: pvops::Op, value: u64) -> u64 {
    use pvops::Op;
    use shim::pvops_value_op as V;
    let which = match op {
        Op::PteVal => V::PVOPS_PTE_VAL,
        Op::MakePte => V::PVOPS_MAKE_PTE,
        Op::PmdVal => V::PVOPS_PMD_VAL,
        Op::MakePmd => V::PVOPS_MAKE_PMD,
        Op::PudVal => V::PVOPS_PUD_VAL,
        Op::MakePud => V::PVOPS_MAKE_PUD,
        Op::P4dVal => V::PVOPS_P4D_VAL,
        Op::MakeP4d => V::PVOPS_MAKE_P4D,
        Op::PgdVal => V::PVOPS_PGD_VAL,
        Op::MakePgd => V::PVOPS_MAKE_PGD,
        _ => return value,
    };
    // SAFETY: the kernel's conversion, pure, callable in any context.
    unsafe { shim::pvops_shim_value(which, value) }
}

/// `irq.send_ipi` as the shim calls it (the kernel's APIC callbacks, built in; the module's
/// self-test): through a call site of its own, which pvops patches like all of its sites.
///
/// # Safety
///
/// The op's contract: interrupts off, `mask` a cpumask of `nbits` bits naming online CPUs.
pub(crate) unsafe extern "C" fn send_ipi(mask: *const usize, nbits: u32, vector: u32) -> u64 {
    // SAFETY: forwarded contract (the kernel's bindings give an unsigned long as a usize, 64
    // bits on x86-64).
    u64::from(unsafe { pvops::ops::irq::send_ipi(mask.cast(), nbits, vector) })
}
