//! The KVM backend against a modelled KVM: CPUID leaves, MSRs and a host that fills the
//! records the guest registers. One test function: the backend's state is global.

use std::cell::RefCell;
use std::collections::HashMap;

use pvops::ops::CpuidResult;
use pvops::{detect, Op};
use pvops_backends::kvm::{
    self, KvmStealTime, MSR_KVM_STEAL_TIME, MSR_KVM_SYSTEM_TIME_NEW, MSR_KVM_WALL_CLOCK_NEW,
};
use pvops_backends::pvclock::{PvclockVcpuTimeInfo, PvclockWallClock};
use pvops_backends::Platform;
use pvops_host_tests::models;

/// A KVM host as the guest sees it. Guest-physical addresses are host addresses (identity).
struct ModelKvm {
    cpuid: pvops_host_tests::CpuidModel,
    msrs: RefCell<HashMap<u32, u64>>,
    writes: RefCell<Vec<(u32, u64)>>,
    /// Whether the host fills records when the guest registers them (false: TCG, which drops
    /// the writes).
    host: bool,
    steal: Vec<KvmStealTime>,
}

const TSC_MUL_1GHZ: u32 = 1 << 31; // with shift 1: 1 ns per cycle

fn fill(rec: *mut PvclockVcpuTimeInfo) {
    // SAFETY: `rec` points at a record the test or the backend owns; single-threaded.
    unsafe {
        rec.write_volatile(PvclockVcpuTimeInfo {
            version: 2,
            tsc_timestamp: pvops::arch::rdtsc_ordered(),
            system_time: 1_000_000_000,
            tsc_to_system_mul: TSC_MUL_1GHZ,
            tsc_shift: 1,
            flags: pvops_backends::pvclock::PVCLOCK_TSC_STABLE_BIT,
            ..Default::default()
        })
    }
}

impl Platform for ModelKvm {
    fn tsc_khz(&self) -> u64 {
        0
    }
    fn cpuid(&self, leaf: u32, sub: u32) -> CpuidResult {
        self.cpuid.get(leaf, sub)
    }
    fn rdmsr(&self, msr: u32) -> Option<u64> {
        Some(self.msrs.borrow().get(&msr).copied().unwrap_or(0))
    }
    fn wrmsr(&self, msr: u32, value: u64) -> bool {
        self.writes.borrow_mut().push((msr, value));
        if !self.host {
            return true; // TCG: accepted and dropped
        }
        self.msrs.borrow_mut().insert(msr, value);
        match msr {
            MSR_KVM_SYSTEM_TIME_NEW if value & 1 != 0 => fill((value & !1) as *mut _),
            MSR_KVM_WALL_CLOCK_NEW => {
                // SAFETY: the backend's wall-clock buffer.
                unsafe {
                    (value as *mut PvclockWallClock).write_volatile(PvclockWallClock {
                        version: 2,
                        sec: 1_800_000_000,
                        nsec: 0,
                    })
                }
            }
            _ => {}
        }
        true
    }
    fn rdmsr_on_cpu(&self, cpu: u32, msr: u32) -> Option<u64> {
        (msr == MSR_KVM_STEAL_TIME).then(|| {
            self.steal
                .get(cpu as usize)
                .map(|s| s as *const _ as u64 | 1)
        })?
    }
    fn nr_cpus(&self) -> u32 {
        2
    }
    /// Guest-physical is host-virtual (identity) for the records this process allocates; the
    /// model has no low memory (no option-ROM area: the VMI probe finds nothing mapped).
    fn phys_to_virt(&self, pa: u64) -> Option<usize> {
        (pa >= 1 << 20).then_some(pa as usize)
    }
    fn virt_to_phys(&self, va: usize) -> Option<u64> {
        Some(va as u64)
    }
}

fn model(host: bool) -> ModelKvm {
    let mut steal = vec![KvmStealTime::default(), KvmStealTime::default()];
    steal[1].steal = 12_345;
    steal[1].version = 4;
    ModelKvm {
        cpuid: models::kvm(),
        msrs: RefCell::default(),
        writes: RefCell::default(),
        host,
        steal,
    }
}

#[test]
fn kvm_backend() {
    // 1. The kernel registered kvmclock: the backend reads the record and never writes the MSR.
    let m = model(true);
    let mut kernel_rec = Box::<PvclockVcpuTimeInfo>::default();
    fill(&mut *kernel_rec);
    m.msrs
        .borrow_mut()
        .insert(MSR_KVM_SYSTEM_TIME_NEW, &*kernel_rec as *const _ as u64 | 1);
    let d = detect(&m.cpuid.source());
    let b = pvops_host_tests::start(pvops_host_tests::ids::KVM, &d, &m).expect("kvm starts");
    assert_eq!(b.id(), pvops_host_tests::ids::KVM);
    assert!(!kvm::owns_clock());
    assert!(
        m.writes
            .borrow()
            .iter()
            .all(|&(msr, _)| msr != MSR_KVM_SYSTEM_TIME_NEW),
        "the kernel's clock registration must never be touched"
    );
    assert_eq!(
        pvops_host_tests::conventions::check(&b.ops()),
        Vec::<String>::new()
    );
    let ops = b.ops().table();
    // SAFETY: the table's functions, called as the table would.
    let (t0, khz, wall, steal0, steal1) = unsafe {
        (
            (ops.timer.sched_clock)(),
            (ops.timer.tsc_khz)(),
            (ops.timer.wall_clock)(),
            (ops.timer.steal_clock)(0),
            (ops.timer.steal_clock)(1),
        )
    };
    std::thread::sleep(std::time::Duration::from_millis(5));
    // SAFETY: as above.
    let t1 = unsafe { (ops.timer.sched_clock)() };
    assert!(t1 > t0, "sched_clock advances ({t0} -> {t1})");
    assert_eq!(khz, 1_000_000, "1 GHz from mul/shift");
    assert!(
        wall >= 1_800_000_000 * 1_000_000_000 + 1_000_000_000,
        "wall = host's base + pvclock ns"
    );
    assert_eq!((steal0, steal1), (0, 12_345));
    // Everything but the timer and the hypercall is the native backend's, inline included.
    assert_eq!(
        b.ops().inline(Op::SaveFl),
        pvops_backends::native::OPS.inline(Op::SaveFl)
    );
    assert_eq!(
        ops.cpu.hypercall as usize,
        kvm::hypercall_vmmcall as *const () as usize,
        "AMD model: vmmcall"
    );
    assert_eq!(
        b.ops().inline(Op::IoDelay).map(|i| i.bytes.len()),
        Some(0),
        "NOP_IO_DELAY: no delay"
    );
    pvops_backends::stop(pvops_host_tests::ids::KVM, &m);
    assert!(m
        .writes
        .borrow()
        .iter()
        .all(|&(msr, v)| msr != MSR_KVM_SYSTEM_TIME_NEW || v != 0));

    // 2. Booted with no-kvmclock: the backend registers its own record and unregisters it.
    let m = model(true);
    let b = pvops_host_tests::start(pvops_host_tests::ids::KVM, &d, &m).expect("kvm starts");
    assert!(kvm::owns_clock());
    // SAFETY: as above.
    assert_eq!(unsafe { (b.ops().table().timer.tsc_khz)() }, 1_000_000);
    pvops_backends::stop(pvops_host_tests::ids::KVM, &m);
    let writes = m.writes.borrow();
    let clock: Vec<_> = writes
        .iter()
        .filter(|w| w.0 == MSR_KVM_SYSTEM_TIME_NEW)
        .collect();
    assert_eq!(clock.len(), 2);
    assert_eq!(clock[0].1 & 1, 1, "registered");
    assert_eq!(clock[1].1, 0, "and unregistered at teardown");
    drop(writes);

    // 3. A "KVM" whose MSRs go nowhere (TCG drops the writes): the record stays zero, the
    //    backend refuses and undoes its registration instead of dividing by zero.
    let m = model(false);
    match pvops_host_tests::start(pvops_host_tests::ids::KVM, &d, &m) {
        Err(e) => assert_eq!(
            e.to_string(),
            "kvm: the kvmclock record could not be reached"
        ),
        Ok(_) => panic!("a dead kvmclock was accepted"),
    }
    assert_eq!(
        m.writes.borrow().last(),
        Some(&(MSR_KVM_SYSTEM_TIME_NEW, 0))
    );

    // 4. No KVM at all.
    let bare = models::tcg();
    let d = detect(&bare.source());
    assert!(pvops_host_tests::start(pvops_host_tests::ids::KVM, &d, &m).is_err());
}
