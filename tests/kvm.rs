//! The KVM backend against a modelled KVM: CPUID leaves, MSRs and a host that fills the
//! records the guest registers. One test function: the backend's state is global.

use std::cell::{RefCell, UnsafeCell};
use std::collections::HashMap;

use pvops::ops::CpuidResult;
use pvops::{detect, Op};
use pvops_backends::kvm::{
    self, KvmStealTime, MSR_KVM_STEAL_TIME, MSR_KVM_SYSTEM_TIME_NEW, MSR_KVM_WALL_CLOCK_NEW,
};
use pvops_backends::pvclock::{PvclockVcpuTimeInfo, PvclockWallClock};
use pvops_backends::Platform;
use pvops_host_tests::models;

fn rdtsc() -> u64 {
    pvops::arch::rdtsc_ordered()
}

/// A KVM host as the guest sees it. Guest-physical addresses are host addresses (identity).
struct ModelKvm {
    cpuid: pvops_host_tests::CpuidModel,
    msrs: RefCell<HashMap<u32, u64>>,
    writes: RefCell<Vec<(u32, u64)>>,
    /// Whether the host fills records when the guest registers them (false: TCG, which drops
    /// the writes).
    host: bool,
    /// Each CPU's steal-time record, which the host (the test) writes while the backend reads.
    steal: Vec<UnsafeCell<KvmStealTime>>,
    /// How many CPUs are up (registered their steal record): a kernel with the backend built in
    /// starts it with the boot CPU alone.
    up: std::cell::Cell<u32>,
    /// What the platform says of the kernel's own kvmclock (`None`: unknown).
    kernel_clock: Option<bool>,
    /// Each vCPU's MSRs as last written (the MSRs are per vCPU: `wrmsr` writes the host CPU
    /// the test runs on, `wrmsr_on_cpu` the one named).
    per_cpu: RefCell<HashMap<(u32, u32), u64>>,
}

/// The record's scale: abi-kvm.md's worked example, 2 445 406 kHz (not 1 GHz, so that a
/// reading in cycles rather than nanoseconds shows).
const MUL: u32 = 3_512_682_389;
const SHIFT: i8 = -1;
const KHZ: u64 = 2_445_406;
/// The record's system time when filled.
const SYSTEM_TIME: u64 = 1_000_000_000;
/// The wall clock the host fills in: seconds at system time 0.
const WALL_SEC: u32 = 1_800_000_000;
const WALL_NSEC: u32 = 123_456_789;

/// The model's nanoseconds for `cycles` of TSC (the pvclock formula, computed here).
fn model_ns(cycles: u64) -> u64 {
    // shift -1: halve, then multiply by mul / 2^32
    ((u128::from(cycles >> 1) * u128::from(MUL)) >> 32) as u64
}

fn fill(rec: *mut PvclockVcpuTimeInfo) {
    // SAFETY: `rec` points at a record the test or the backend owns; single-threaded.
    unsafe {
        rec.write_volatile(PvclockVcpuTimeInfo {
            version: 2,
            tsc_timestamp: pvops::arch::rdtsc_ordered(),
            system_time: SYSTEM_TIME,
            tsc_to_system_mul: MUL,
            tsc_shift: SHIFT,
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
        self.wrmsr_on_cpu(this_cpu() as u32, msr, value)
    }
    fn wrmsr_on_cpu(&self, cpu: u32, msr: u32, value: u64) -> bool {
        self.per_cpu.borrow_mut().insert((cpu, msr), value);
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
                        sec: WALL_SEC,
                        nsec: WALL_NSEC,
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
                .filter(|_| cpu < self.up.get())
                .map(|s| s.get() as u64 | 1)
        })?
    }
    fn nr_cpus(&self) -> u32 {
        2
    }
    fn kernel_kvmclock(&self) -> Option<bool> {
        self.kernel_clock
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
    // CPU 0's record stays mid-update (odd version) for good: its value is torn, never read
    let steal = [(777, 3), (12_345, 4)]
        .map(|(steal, version)| {
            UnsafeCell::new(KvmStealTime {
                steal,
                version,
                ..Default::default()
            })
        })
        .into();
    ModelKvm {
        cpuid: models::kvm(),
        msrs: RefCell::default(),
        writes: RefCell::default(),
        host,
        steal,
        up: std::cell::Cell::new(2),
        kernel_clock: None,
        per_cpu: RefCell::default(),
    }
}

/// The tests that start the backend (one global state) take turns.
static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn kvm_backend() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    // 1. The kernel registered kvmclock: the backend reads the record and never writes the MSR.
    let m = model(true);
    // the kernel's record, shared with the backend by address (written below only through
    // this pointer, as a host would)
    let kernel_rec: *mut PvclockVcpuTimeInfo = Box::into_raw(Box::default());
    fill(kernel_rec);
    // SAFETY: just allocated and filled; read once here.
    let ts = unsafe { (*kernel_rec).tsc_timestamp };
    m.msrs
        .borrow_mut()
        .insert(MSR_KVM_SYSTEM_TIME_NEW, kernel_rec as u64 | 1);
    let d = detect(&m.cpuid.source());
    let start_before = rdtsc();
    let b = pvops_host_tests::start(pvops_host_tests::ids::KVM, &d, &m).expect("kvm starts");
    let start_after = rdtsc();
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
    // SAFETY: the table's functions, called as the table would (likewise below).
    let (khz, steal0, steal1) = unsafe {
        (
            (ops.timer.tsc_khz)(),
            (ops.timer.steal_clock)(0),
            (ops.timer.steal_clock)(1),
        )
    };
    assert_eq!(khz, KHZ, "the rate from the record's mul/shift");
    assert_eq!(steal1, 12_345);
    assert_eq!(
        steal0, 0,
        "a steal record whose version stays odd is never read"
    );

    // sched_clock in nanoseconds of the model: the record's scale applied to the TSC since
    // the backend's first reading (taken inside `start`), each reading bracketed by the TSC.
    // SAFETY: as above (every call below).
    let sched = || unsafe { (ops.timer.sched_clock)() };
    let (a0, v0, b0) = (rdtsc(), sched(), rdtsc());
    assert!(
        v0 >= model_ns(a0 - start_after).saturating_sub(2) && v0 <= model_ns(b0 - start_before) + 2,
        "sched_clock {v0} ns, the model says {}..={} ns since start",
        model_ns(a0 - start_after),
        model_ns(b0 - start_before)
    );
    std::thread::sleep(std::time::Duration::from_millis(5));
    let (a1, v1, b1) = (rdtsc(), sched(), rdtsc());
    let (lo, hi) = (model_ns(a1 - b0), model_ns(b1 - a0));
    assert!(
        v1 - v0 + 2 >= lo && v1 - v0 <= hi + 2,
        "sched_clock advanced {} ns over 5 ms, the model says {lo}..={hi} ns",
        v1 - v0
    );

    // The wall clock: exactly the host's fill (the base at system time 0) plus the record's
    // nanoseconds now.
    let base = u64::from(WALL_SEC) * 1_000_000_000 + u64::from(WALL_NSEC);
    // SAFETY: as above.
    let (a, wall, bb) = (rdtsc(), unsafe { (ops.timer.wall_clock)() }, rdtsc());
    let (lo, hi) = (
        base + SYSTEM_TIME + model_ns(a - ts),
        base + SYSTEM_TIME + model_ns(bb - ts),
    );
    assert!(
        wall + 1 >= lo && wall <= hi + 1,
        "wall clock {wall}, the model says {lo}..={hi}"
    );

    // The host starts an update of the record and never finishes it (its version stays odd):
    // the half-written fields (a system time 1000 s ahead) are never used.
    let before = sched();
    // SAFETY: the record allocated above; the backend reads it with volatile loads.
    unsafe {
        core::ptr::addr_of_mut!((*kernel_rec).version).write_volatile(3);
        core::ptr::addr_of_mut!((*kernel_rec).system_time)
            .write_volatile(SYSTEM_TIME + 1_000_000_000_000);
    }
    let torn = sched();
    // SAFETY: as above.
    let torn_wall = unsafe { (ops.timer.wall_clock)() };
    assert!(
        torn < before + 1_000_000_000,
        "sched_clock used a record whose version stayed odd ({before} -> {torn})"
    );
    assert!(
        torn_wall < base + SYSTEM_TIME + 1_000_000_000_000,
        "the wall clock used a record whose version stayed odd"
    );
    // SAFETY: as above: the update completes.
    unsafe { core::ptr::addr_of_mut!((*kernel_rec).version).write_volatile(4) };
    assert!(
        sched() >= before + 1_000_000_000_000,
        "the finished update is used"
    );
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
    //    Started with CPU 1 not up yet (built in, at boot): its steal time reads 0 until the
    //    backend reads the records again with every CPU up (the initcall's refresh_cpus).
    let m = model(true);
    m.up.set(1);
    let b = pvops_host_tests::start(pvops_host_tests::ids::KVM, &d, &m).expect("kvm starts");
    assert!(kvm::owns_clock());
    let steal = b.ops().table().timer.steal_clock;
    // SAFETY: as above.
    assert_eq!(unsafe { steal(1) }, 0, "CPU 1's record is not known yet");
    m.up.set(2);
    pvops_backends::refresh_cpus(pvops_host_tests::ids::KVM, &m);
    // SAFETY: as above.
    assert_eq!(unsafe { steal(1) }, 12_345, "read again once CPU 1 is up");
    // The host starts an update of CPU 1's record and is preempted in the middle of it (the
    // version stays odd, a torn value in the field): the steal clock stays where it was, it
    // never reads 0 (Linux would take that as a huge steal).
    let rec = m.steal[1].get();
    // SAFETY: the model's record; the backend only reads it, volatile, as a host's.
    unsafe {
        core::ptr::addr_of_mut!((*rec).version).write_volatile(5);
        core::ptr::addr_of_mut!((*rec).steal).write_volatile(1);
    }
    // SAFETY: as above.
    let mid_update = unsafe { steal(1) };
    assert_eq!(
        mid_update, 12_345,
        "a record mid-update reads its last value"
    );
    // SAFETY: as above.
    unsafe {
        core::ptr::addr_of_mut!((*rec).steal).write_volatile(20_000);
        core::ptr::addr_of_mut!((*rec).version).write_volatile(6);
    }
    // SAFETY: as above.
    let settled = unsafe { steal(1) };
    assert_eq!(settled, 20_000, "and the new value once it settles");
    // The lock group: vcpu_is_preempted reads the preempted flag of each CPU's steal-time
    // record (KVM offers steal time here); the paravirt spinlock ops need the kernel's slow
    // path (built in), so the unlock, wait and kick stay native's here, as in a module.
    let preempted = b.ops().table().lock.vcpu_is_preempted.get();
    // SAFETY: the backend's function, a query with no precondition.
    assert_eq!(unsafe { preempted(1) } & 0xff, 0, "running");
    // SAFETY: the model's record, written as the host does when it deschedules the vCPU.
    unsafe { core::ptr::addr_of_mut!((*rec).preempted).write_volatile(kvm::KVM_VCPU_PREEMPTED) };
    // SAFETY: as above.
    assert_eq!(unsafe { preempted(1) } & 0xff, 1, "preempted by the host");
    // SAFETY: as above.
    assert_eq!(unsafe { preempted(9) } & 0xff, 0, "a CPU without a record");
    assert_eq!(kvm::lock_counts()[3], 1, "one preempted vCPU seen");
    // PV TLB flush: a preempted vCPU's flush is left to the host (the request bit set next to
    // the preempted one), a running vCPU's is not, nor one without a record
    assert_eq!(kvm::flush_tlb_defer(1), 1);
    // SAFETY: the model's record.
    let flags = unsafe { core::ptr::addr_of!((*rec).preempted).read_volatile() };
    assert_eq!(flags, kvm::KVM_VCPU_PREEMPTED | kvm::KVM_VCPU_FLUSH_TLB);
    assert_eq!(kvm::flush_tlb_defer(9), 0);
    assert_eq!(kvm::lock_counts()[4], 1, "one flush left to the host");
    // SAFETY: the host runs the vCPU again.
    unsafe { core::ptr::addr_of_mut!((*rec).preempted).write_volatile(0) };
    let native = pvops_backends::native::OPS;
    for op in [Op::QueuedSpinUnlock, Op::LockWait, Op::LockKick] {
        assert!(pvops::linux::is_native(&b.ops(), &native, op), "{op:?}");
    }
    assert!(!pvops::linux::is_native(
        &b.ops(),
        &native,
        Op::VcpuIsPreempted
    ));
    assert_eq!(
        kvm::flush_tlb_defer(1),
        0,
        "running again: the caller's IPI"
    );
    assert!(!kvm::pv_locks());
    // without the kernel (a module) the flush stays the IPI everywhere
    assert!(!kvm::pv_tlb_flush());
    assert!(pvops::linux::is_native(
        &b.ops(),
        &native,
        Op::FlushTlbDefer
    ));
    // SAFETY: as above.
    assert_eq!(unsafe { (b.ops().table().timer.tsc_khz)() }, KHZ);
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
    // SAFETY: from Box::into_raw above; the backend was stopped and forgot it.
    drop(unsafe { Box::from_raw(kernel_rec) });
}

/// The pvclock reader on a record whose version stays odd: never a reading, however
/// plausible its fields; the same record with an even version reads.
#[test]
fn a_pvclock_record_whose_version_stays_odd_is_never_read() {
    use pvops_backends::pvclock::{read, PvclockError};
    let mut rec = PvclockVcpuTimeInfo {
        version: 7,
        tsc_timestamp: 1_000,
        system_time: 5_000_000_000,
        tsc_to_system_mul: 1 << 31,
        tsc_shift: 1,
        ..Default::default()
    };
    // SAFETY: a live local record (likewise below).
    let odd = unsafe { read(&rec, || 2_000) };
    assert_eq!(odd, Err(PvclockError::Unstable));
    rec.version = 8;
    // SAFETY: as above.
    let even = unsafe { read(&rec, || 2_000) };
    assert_eq!(even.map(|r| r.ns), Ok(5_000_001_000));
    // and the wall-clock record likewise
    let mut wall = PvclockWallClock {
        version: 1,
        sec: 1,
        nsec: 2,
    };
    // SAFETY: a live local record (likewise below).
    let odd = unsafe { pvops_backends::pvclock::read_wall(&wall) };
    assert_eq!(odd, Err(PvclockError::Unstable));
    wall.version = 2;
    // SAFETY: as above.
    let even = unsafe { pvops_backends::pvclock::read_wall(&wall) };
    assert_eq!(even, Ok((1, 2)));
}

/// Linux's gating of paravirt spinlocks on KVM (`kvm_spinlock_init`), its waiter
/// (`kvm_wait`) and its kick (`kvm_kick_cpu`), as the backend repeats them.
#[test]
fn kvm_paravirt_spinlocks_follow_linux() {
    use kvm::{wait_action, wants_pv_locks, KvmKernel, WaitAction};
    unsafe extern "C" fn no_nmi() -> i32 {
        0
    }
    unsafe extern "C" fn apic_id(cpu: u32) -> u32 {
        cpu * 2
    }
    let k = |possible_cpus, nopvspin| KvmKernel {
        nopvspin,
        possible_cpus,
        in_nmi: no_nmi,
        apic_id,
    };
    let unhalt = kvm::KVM_FEATURE_PV_UNHALT;
    assert!(wants_pv_locks(unhalt, 0, &k(2, false)));
    assert!(!wants_pv_locks(0, 0, &k(2, false)), "no host support");
    assert!(
        !wants_pv_locks(unhalt, kvm::KVM_HINTS_REALTIME, &k(2, false)),
        "dedicated pCPUs"
    );
    assert!(!wants_pv_locks(unhalt, 0, &k(1, false)), "one vCPU");
    assert!(!wants_pv_locks(unhalt, 0, &k(4, true)), "nopvspin");
    // the waiter: never halts in NMI context nor once the byte changed; halts with interrupts
    // as they were
    assert_eq!(wait_action(true, false, 3, 3), WaitAction::Return);
    assert_eq!(wait_action(false, true, 0, 3), WaitAction::Return);
    assert_eq!(wait_action(false, false, 3, 3), WaitAction::Halt);
    assert_eq!(wait_action(false, true, 3, 3), WaitAction::SafeHalt);
    // the kick: KVM_HC_KICK_CPU, flags 0, the CPU's APIC ID
    assert_eq!(kvm::kick_args(6), [kvm::KVM_HC_KICK_CPU, 0, 6, 0, 0]);
    // PV TLB flush (pv_tlb_flush_supported): the host's feature and steal time, no dedicated
    // pCPUs, no MWAIT, more than one vCPU
    use kvm::wants_pv_tlb_flush;
    let f = kvm::KVM_FEATURE_PV_TLB_FLUSH | kvm::KVM_FEATURE_STEAL_TIME;
    assert!(wants_pv_tlb_flush(f, 0, false, &k(2, false)));
    assert!(!wants_pv_tlb_flush(
        kvm::KVM_FEATURE_PV_TLB_FLUSH,
        0,
        false,
        &k(2, false)
    ));
    assert!(!wants_pv_tlb_flush(
        f,
        kvm::KVM_HINTS_REALTIME,
        false,
        &k(2, false)
    ));
    assert!(!wants_pv_tlb_flush(f, 0, true, &k(2, false)), "MWAIT");
    assert!(!wants_pv_tlb_flush(f, 0, false, &k(1, false)), "one vCPU");
}

/// KVM's PV send-IPI (Linux's `__send_ipi_mask`) against a modelled host that delivers each
/// `KVM_HC_SEND_IPI` as KVM's `kvm_pv_send_ipi` does (bit `i` of the 128-bit bitmap is APIC ID
/// `min + i`), over seeded random masks and APIC-ID layouts: every CPU of the mask gets the
/// interrupt exactly once, no other does, with the ICR's vector or NMI mode, in as few
/// hypercalls as the 128-ID windows allow.
#[test]
fn kvm_pv_send_ipi_reaches_each_cpu_of_the_mask_once() {
    use std::collections::HashMap;
    const CPUS: u32 = 256;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    // APIC-ID layouts: dense, every other, reversed, far apart, shuffled
    let mut shuffled: Vec<u32> = (0..CPUS).map(|c| c * 3 + 1).collect();
    for i in (1..shuffled.len()).rev() {
        shuffled.swap(i, (rand() % (i as u64 + 1)) as usize);
    }
    type Layout = (&'static str, Box<dyn Fn(u32) -> u32>);
    let layouts: [Layout; 5] = [
        ("dense", Box::new(|c| c)),
        ("every other", Box::new(|c| c * 2)),
        ("reversed", Box::new(|c| 1000 - c)),
        ("far apart", Box::new(|c| c * 97)),
        ("shuffled", Box::new(move |c| shuffled[c as usize])),
    ];
    for (name, apic) in &layouts {
        let vcpu_of: HashMap<u32, u32> = (0..CPUS).map(|c| (apic(c), c)).collect();
        for round in 0..200 {
            let mut mask = [0u64; (CPUS / 64) as usize];
            let density = round % 4; // sparse .. full
            for w in &mut mask {
                *w = match density {
                    0 => rand() & rand() & rand(),
                    1 => rand(),
                    2 => rand() | rand(),
                    _ => !0,
                };
            }
            let nbits = if round % 5 == 0 { CPUS - 37 } else { CPUS };
            let vector = if round % 7 == 0 { 2 } else { 0xfd };
            let mut got: HashMap<u32, u32> = HashMap::new();
            let mut calls = 0;
            let sent = kvm::send_ipi_with(&mask, nbits, vector, apic, |[nr, lo, hi, min, icr]| {
                assert_eq!(nr, kvm::KVM_HC_SEND_IPI);
                let want = if vector == 2 { kvm::APIC_DM_NMI } else { 0xfd };
                assert_eq!(icr, want, "{name}: the ICR");
                calls += 1;
                let mut reached = 0;
                for (word, bits) in [(0, lo), (1, hi)] {
                    for b in 0..64 {
                        if bits & (1 << b) != 0 {
                            let id = min as u32 + word * 64 + b;
                            if let Some(&cpu) = vcpu_of.get(&id) {
                                *got.entry(cpu).or_default() += 1;
                                reached += 1;
                            }
                        }
                    }
                }
                reached
            });
            let want: Vec<u32> = (0..nbits)
                .filter(|c| mask[(c / 64) as usize] & (1 << (c % 64)) != 0)
                .collect();
            assert_eq!(sent, u64::from(!want.is_empty()), "{name}: sent");
            assert_eq!(got.len(), want.len(), "{name}: CPUs reached");
            for c in &want {
                assert_eq!(got.get(c), Some(&1), "{name}: CPU {c} reached once");
            }
            if *name == "dense" && density == 3 {
                // 219 or 256 consecutive IDs: ceil(n / 128) windows
                assert_eq!(
                    calls,
                    nbits.div_ceil(128),
                    "{name}: one hypercall per window"
                );
            }
        }
    }
    // A host that refuses hypercall `k` (from 1): what the op answers, after how many calls.
    let refusing = |k: u32| {
        let mut calls = 0;
        let sent = kvm::send_ipi_with(
            &[!0u64],
            64,
            0xfd,
            |c| c * 97,
            |_| {
                calls += 1;
                if calls == k {
                    -kvm::KVM_ENOSYS
                } else {
                    1
                }
            },
        );
        (sent, calls)
    };
    // refused at once: nothing was sent, the caller sends them all, no more hypercalls
    assert_eq!(refusing(1), (0, 1), "refused at once");
    // refused later: the earlier batches were delivered, so it is not sent again; the rest is
    // still sent (IDs 97 apart: two to a 128-ID window, 32 windows)
    assert_eq!(refusing(3), (1, 32), "refused later: the rest still sent");
    // An empty mask makes no hypercall and sends nothing.
    assert_eq!(
        kvm::send_ipi_with(&[0], 64, 0xfd, |c| c, |_| unreachable!()),
        0
    );
    // Linux's gating: the host's feature and more than one possible CPU.
    unsafe extern "C" fn no_nmi() -> i32 {
        0
    }
    unsafe extern "C" fn apic_id(cpu: u32) -> u32 {
        cpu
    }
    let k = |possible_cpus| kvm::KvmKernel {
        nopvspin: false,
        possible_cpus,
        in_nmi: no_nmi,
        apic_id,
    };
    assert!(kvm::wants_pv_ipi(kvm::KVM_FEATURE_PV_SEND_IPI, &k(2)));
    assert!(!kvm::wants_pv_ipi(0, &k(2)), "no host support");
    assert!(
        !kvm::wants_pv_ipi(kvm::KVM_FEATURE_PV_SEND_IPI, &k(1)),
        "one vCPU"
    );
}

/// Fault injection on the backend's start with the most steps (the kernel has no kvmclock: the
/// backend registers its own record): each fallible platform call fails in turn (an MSR that
/// faults, memory the kernel cannot translate). Every start either refuses with a message or
/// survives the fault (the wall clock or a CPU's steal record is optional) with a clock that
/// runs; either way, once it is refused or stopped, no record of the backend's stays
/// registered with the host.
#[test]
fn kvm_start_fails_cleanly_at_each_step() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let (mut refused, mut survived) = (Vec::new(), Vec::new());
    for n in 0.. {
        let m = model(true);
        let d = detect(&m.cpuid.source());
        let f = pvops_host_tests::Faulty::new(&m, n);
        let started = pvops_host_tests::start(pvops_host_tests::ids::KVM, &d, &f);
        f.disarm();
        let Some(what) = f.failed() else {
            // past the last fallible call: the start with nothing failing
            let b = started.expect("kvm starts when nothing fails");
            assert!(kvm::owns_clock());
            assert_eq!(b.id(), pvops_host_tests::ids::KVM);
            pvops_backends::stop(pvops_host_tests::ids::KVM, &m);
            break;
        };
        match started {
            Err(e) => {
                assert!(!e.to_string().is_empty(), "step {n} ({what}): a message");
                refused.push(format!("{n}:{what}: {e}"));
            }
            Ok(b) => {
                let sched = b.ops().table().timer.sched_clock;
                // SAFETY: the started backend's function, as the table calls it.
                let (t0, t1) = unsafe {
                    (sched(), {
                        std::thread::sleep(std::time::Duration::from_millis(2));
                        sched()
                    })
                };
                assert!(t1 > t0, "step {n} ({what}): started, so its clock runs");
                survived.push(format!("{n}:{what}"));
                pvops_backends::stop(pvops_host_tests::ids::KVM, &m);
            }
        }
        let own = m
            .msrs
            .borrow()
            .get(&MSR_KVM_SYSTEM_TIME_NEW)
            .copied()
            .unwrap_or(0);
        assert_eq!(
            own & 1,
            0,
            "step {n} ({what}): the backend's record stays registered"
        );
        assert!(
            !kvm::owns_clock(),
            "step {n} ({what}): the backend still owns a clock"
        );
    }
    // the registration's own steps refuse; the optional ones (wall clock, steal records) pass
    assert!(
        refused.len() >= 2,
        "the own record's translation and registration each refuse: {refused:?}"
    );
    assert!(
        !survived.is_empty(),
        "the wall clock and steal time are optional: {survived:?}"
    );
    println!("refused: {refused:?}\nsurvived: {survived:?}");
}

/// A host where KVM keeps one kvmclock record per vCPU and the records are not stable: each
/// CPU's record on its own timeline (CPU `c` at `(c + 1) × 10^6` s), so a reading shows whose
/// record it came from. Each CPU must read its own: another vCPU's record is valid only with
/// that vCPU's TSC (a nested guest's vCPUs were seen with the reader's TSC behind another
/// record's timestamp: a clock frozen for 20 ms).
struct PerCpuClocks {
    inner: ModelKvm,
    records: Vec<*mut PvclockVcpuTimeInfo>,
}

/// The host CPU this thread runs on (TSC_AUX is the same number: Linux writes it).
fn this_cpu() -> usize {
    // SAFETY: sched_getcpu takes no arguments.
    let cpu = unsafe { libc::sched_getcpu() };
    usize::try_from(cpu).expect("sched_getcpu")
}

/// Run this thread on `cpu` alone.
fn pin(cpu: usize) {
    // SAFETY: an all-zero cpu_set_t is an empty set; CPU_SET and sched_setaffinity get it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set),
            0,
            "pin to CPU {cpu}"
        );
    }
    assert_eq!(this_cpu(), cpu);
}

impl Platform for PerCpuClocks {
    fn tsc_khz(&self) -> u64 {
        0
    }
    fn cpuid(&self, leaf: u32, sub: u32) -> CpuidResult {
        self.inner.cpuid(leaf, sub)
    }
    fn rdmsr(&self, msr: u32) -> Option<u64> {
        match msr {
            MSR_KVM_SYSTEM_TIME_NEW => Some(self.records[this_cpu()] as u64 | 1),
            _ => self.inner.rdmsr(msr),
        }
    }
    fn wrmsr(&self, msr: u32, value: u64) -> bool {
        self.inner.wrmsr(msr, value)
    }
    fn rdmsr_on_cpu(&self, cpu: u32, msr: u32) -> Option<u64> {
        match msr {
            MSR_KVM_SYSTEM_TIME_NEW => Some(*self.records.get(cpu as usize)? as u64 | 1),
            _ => self.inner.rdmsr_on_cpu(cpu, msr),
        }
    }
    fn nr_cpus(&self) -> u32 {
        self.records.len() as u32
    }
    fn phys_to_virt(&self, pa: u64) -> Option<usize> {
        self.inner.phys_to_virt(pa)
    }
    fn virt_to_phys(&self, va: usize) -> Option<u64> {
        self.inner.virt_to_phys(va)
    }
}

#[test]
fn kvm_each_cpu_reads_its_own_clock_record() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let ext = pvops::arch::raw_cpuid(0x8000_0001, 0).edx;
    assert!(
        ext & (1 << 27) != 0,
        "the test needs rdtscp (as the backend's per-CPU path does)"
    );
    // SAFETY: sysconf takes a constant.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let cpus = usize::try_from(cpus)
        .expect("CPUs")
        .min(pvops_backends::MAX_CPUS);
    assert!(cpus >= 2, "the test needs two CPUs to read two records");
    let mut inner = model(true);
    // rdtscp, as on every CPU KVM runs on
    inner.cpuid.leaf(0x8000_0000, [0x8000_0001, 0, 0, 0]);
    inner.cpuid.leaf(0x8000_0001, [0, 0, 0, 1 << 27]);
    const APART: u64 = 1_000_000 * 1_000_000_000;
    let records = (0..cpus)
        .map(|c| {
            let rec: *mut PvclockVcpuTimeInfo = Box::into_raw(Box::default());
            fill(rec);
            // SAFETY: just allocated; the backend is not started yet.
            unsafe {
                (*rec).system_time = (c as u64 + 1) * APART;
                (*rec).flags = 0;
            }
            rec
        })
        .collect();
    let m = PerCpuClocks { inner, records };
    let d = detect(&m.inner.cpuid.source());
    pin(0);
    let b = pvops_host_tests::start(pvops_host_tests::ids::KVM, &d, &m).expect("kvm starts");
    let ops = b.ops().table();
    let wall_base = u64::from(WALL_SEC) * 1_000_000_000 + u64::from(WALL_NSEC);
    // in CPU order, so the clamp (the records are not stable) never lifts a reading into the
    // next band
    for c in 0..cpus {
        pin(c);
        // SAFETY: the table's functions, called as the table would.
        let (wall, sched) = unsafe { ((ops.timer.wall_clock)(), (ops.timer.sched_clock)()) };
        let on = wall - wall_base;
        let band = (c as u64 + 1) * APART;
        assert!(
            (band..band + APART / 1000).contains(&on),
            "CPU {c} read {on} ns: not its own record ({band} ns on)"
        );
        // since the start on CPU 0's record
        assert!(
            (band - APART..band - APART + APART / 1000).contains(&sched),
            "CPU {c}: sched_clock {sched} ns"
        );
    }
    pvops_backends::stop(pvops_host_tests::ids::KVM, &m);
    for rec in m.records {
        // SAFETY: from Box::into_raw above; the backend was stopped and forgot it.
        drop(unsafe { Box::from_raw(rec) });
    }
}

/// Fault injection where the kernel runs kvmclock: whatever call fails, the backend never
/// writes the kernel's registration (a failed read of the MSR once made it register a record
/// of its own over the kernel's, and unregister it at unload: the kernel's clock on that CPU
/// then stood still; found by fault=platform:N on the kvm rig).
#[test]
fn kvm_start_never_writes_the_kernels_clock_at_any_fault() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let kernel_rec: *mut PvclockVcpuTimeInfo = Box::into_raw(Box::default());
    fill(kernel_rec);
    let (mut refused, mut survived) = (Vec::new(), Vec::new());
    for n in 0.. {
        let mut m = model(true);
        m.kernel_clock = Some(true);
        m.msrs
            .borrow_mut()
            .insert(MSR_KVM_SYSTEM_TIME_NEW, kernel_rec as u64 | 1);
        let d = detect(&m.cpuid.source());
        let f = pvops_host_tests::Faulty::new(&m, n);
        let started = pvops_host_tests::start(pvops_host_tests::ids::KVM, &d, &f);
        f.disarm();
        let what = f.failed();
        match started {
            Ok(_) => {
                assert!(!kvm::owns_clock(), "step {n} ({what:?}): own record");
                survived.push(n);
                pvops_backends::stop(pvops_host_tests::ids::KVM, &m);
            }
            Err(e) => refused.push(format!("{n}:{what:?}: {e}")),
        }
        assert!(
            m.writes
                .borrow()
                .iter()
                .all(|&(msr, _)| msr != MSR_KVM_SYSTEM_TIME_NEW),
            "step {n} ({what:?}): the kernel's clock registration was written"
        );
        if what.is_none() {
            break;
        }
    }
    assert!(
        !refused.is_empty(),
        "the MSR read and its translation refuse"
    );
    println!("refused: {refused:?}\nsurvived: {survived:?}");
    // SAFETY: from Box::into_raw above; every backend started was stopped.
    drop(unsafe { Box::from_raw(kernel_rec) });
}

/// Without kvmclock in the kernel the backend registers a record of its own: on one vCPU (the
/// MSR is per vCPU), and unregisters it on that same vCPU whichever CPU runs the unload. (It
/// once unregistered on the CPU running `stop`: the loading CPU's registration stayed, and the
/// host went on writing into the module's memory after it was freed: page tables and the next
/// module's relocations corrupted on the kvm-noclock rig.)
#[test]
fn kvm_own_record_is_unregistered_on_the_cpu_it_was_registered_on() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let m = model(true);
    let d = detect(&m.cpuid.source());
    pin(1);
    pvops_host_tests::start(pvops_host_tests::ids::KVM, &d, &m).expect("kvm starts");
    assert!(kvm::owns_clock());
    pin(0);
    pvops_backends::stop(pvops_host_tests::ids::KVM, &m);
    let left: Vec<_> = m
        .per_cpu
        .borrow()
        .iter()
        .filter(|&(&(_, msr), &v)| msr == MSR_KVM_SYSTEM_TIME_NEW && v & 1 != 0)
        .map(|(&(cpu, _), &v)| (cpu, v))
        .collect();
    assert!(
        left.is_empty(),
        "registrations left after stop (cpu, value): {left:x?}"
    );
}
