//! The Xen backend's HVM half against a modelled Xen: CPUID as QEMU's Xen emulation shows it
//! (`xen-version=0x40011`), and a host behind [`Platform::hypercall_model`] that answers
//! `XENVER_version`, `XENVER_get_features`, `VCPUOP_register_vcpu_time_memory_area` (filling
//! the area with a pvclock record) and `VCPUOP_get_runstate_info`, as abi-xen.md describes.
//! Guest virtual addresses are host addresses.
//!
//! One test function: the backend's state is global (and `VCPUOP_get_runstate_info` refused
//! once is never asked again, so the host without it comes last).

use std::sync::{Mutex, MutexGuard};

use pvops::ops::CpuidResult;
use pvops::{detect, Detection};
use pvops_backends::pvclock::{PvclockVcpuTimeInfo, PVCLOCK_TSC_STABLE_BIT};
use pvops_backends::xen::abi::{
    VcpuRunstateInfo, HYPERVISOR_VCPU_OP, HYPERVISOR_XEN_VERSION, VCPUOP_GET_RUNSTATE_INFO,
    VCPUOP_REGISTER_VCPU_TIME_MEMORY_AREA, XENFEAT_HVM_SAFE_PVCLOCK, XENVER_GET_FEATURES,
    XENVER_VERSION,
};
use pvops_backends::xen::{self, XenError};
use pvops_backends::{Platform, StartError};
use pvops_host_tests::{ids, models, CpuidModel};

/// The version QEMU's `xen-version=0x40011` announces (CPUID base+1 EAX), and answers.
const VERSION: i64 = 0x0004_0011;
/// The time area's scale: abi-kvm.md's worked example (2 445 406 kHz).
const MUL: u32 = 3_512_682_389;
const SHIFT: i8 = -1;
const KHZ: u64 = 2_445_406;
const SYSTEM_TIME: u64 = 7_000_000_000;
const EINVAL: i64 = -22;
const ENOSYS: i64 = -38;

/// The model's nanoseconds for `cycles` of TSC (shift -1: halve, then × mul / 2^32).
fn model_ns(cycles: u64) -> u64 {
    ((u128::from(cycles >> 1) * u128::from(MUL)) >> 32) as u64
}

fn rdtsc() -> u64 {
    pvops::arch::rdtsc_ordered()
}

/// One hypercall as the host saw it.
type Call = (u64, [u64; 4]);

/// The modelled Xen.
struct Host {
    /// `XENVER_get_features` submap 0.
    features: u32,
    /// `XENVER_get_features` fails.
    no_features: bool,
    /// Registrations of a time area are refused.
    refuse_register: bool,
    /// Registrations are accepted but the area is never filled.
    silent: bool,
    /// A NULL area (unregistering) is refused, as QEMU's emulation does.
    refuse_unregister: bool,
    /// `VCPUOP_get_runstate_info` is implemented, with these state times.
    runstate: Option<[u64; 4]>,
    /// The registered time area per vCPU.
    areas: Vec<(u64, u64)>,
    calls: Vec<Call>,
    /// This hypercall (counting from 0) fails with -EINVAL, whatever it is.
    fail_call: Option<usize>,
}

impl Host {
    fn new() -> Host {
        Host {
            features: XENFEAT_HVM_SAFE_PVCLOCK,
            no_features: false,
            refuse_register: false,
            silent: false,
            refuse_unregister: false,
            runstate: Some([5_000, 111, 7_000, 222]),
            areas: Vec::new(),
            calls: Vec::new(),
            fail_call: None,
        }
    }

    fn service(&mut self, nr: u64, a: [u64; 4]) -> i64 {
        self.calls.push((nr, a));
        if self.fail_call == Some(self.calls.len() - 1) {
            return EINVAL;
        }
        match (nr, a[0]) {
            (HYPERVISOR_XEN_VERSION, XENVER_VERSION) => VERSION,
            (HYPERVISOR_XEN_VERSION, XENVER_GET_FEATURES) => {
                if self.no_features {
                    return ENOSYS;
                }
                let fi = a[1] as *mut [u32; 2];
                // SAFETY: the guest passes its `xen_feature_info` (8 bytes).
                unsafe {
                    assert_eq!((*fi)[0], 0, "submap_idx 0");
                    (*fi)[1] = self.features;
                }
                0
            }
            (HYPERVISOR_VCPU_OP, VCPUOP_REGISTER_VCPU_TIME_MEMORY_AREA) => {
                let vcpu = a[1];
                // SAFETY: the guest passes a `vcpu_register_time_memory_area` (one address).
                let va = unsafe { *(a[2] as *const u64) };
                if va == 0 {
                    if self.refuse_unregister {
                        return EINVAL;
                    }
                    self.areas.retain(|&(v, _)| v != vcpu);
                    return 0;
                }
                if self.refuse_register {
                    return EINVAL;
                }
                self.areas.retain(|&(v, _)| v != vcpu);
                self.areas.push((vcpu, va));
                if !self.silent {
                    fill(va as *mut PvclockVcpuTimeInfo);
                }
                0
            }
            (HYPERVISOR_VCPU_OP, VCPUOP_GET_RUNSTATE_INFO) => match self.runstate {
                Some(time) => {
                    // SAFETY: the guest passes a `vcpu_runstate_info` (48 bytes).
                    unsafe {
                        (a[2] as *mut VcpuRunstateInfo).write(VcpuRunstateInfo {
                            state: 0,
                            state_entry_time: 1,
                            time,
                        })
                    };
                    0
                }
                None => ENOSYS,
            },
            _ => ENOSYS,
        }
    }
}

/// A pvclock record as Xen writes one: stable, the model's scale, the TSC now.
fn fill(rec: *mut PvclockVcpuTimeInfo) {
    // SAFETY: a record the test or the backend owns; single-threaded.
    unsafe {
        rec.write_volatile(PvclockVcpuTimeInfo {
            version: 2,
            tsc_timestamp: rdtsc(),
            system_time: SYSTEM_TIME,
            tsc_to_system_mul: MUL,
            tsc_shift: SHIFT,
            flags: PVCLOCK_TSC_STABLE_BIT,
            ..Default::default()
        })
    }
}

static HOST: Mutex<Option<Host>> = Mutex::new(None);

fn host() -> MutexGuard<'static, Option<Host>> {
    HOST.lock().unwrap_or_else(|e| e.into_inner())
}

fn with_host<T>(f: impl FnOnce(&mut Host) -> T) -> T {
    f(host().as_mut().expect("a host"))
}

/// The hypercall instruction of the modelled Xen.
unsafe extern "C" fn model_hypercall(nr: u64, a0: u64, a1: u64, a2: u64, a3: u64) -> i64 {
    with_host(|h| h.service(nr, [a0, a1, a2, a3]))
}

/// What the HVM guest's kernel would tell the backend.
struct Guest {
    cpuid: CpuidModel,
    /// The kernel's secondary time area for CPU 0, if it registered one.
    kernel_area: Option<usize>,
    pages: pvops_host_tests::Pages,
}

impl Platform for Guest {
    fn tsc_khz(&self) -> u64 {
        0
    }
    fn clock_ns(&self) -> Option<u64> {
        Some(pvops_host_tests::clock::monotonic_ns())
    }
    fn cpuid(&self, leaf: u32, sub: u32) -> CpuidResult {
        self.cpuid.get(leaf, sub)
    }
    fn hypercall_model(&self) -> Option<pvops_backends::hypercall::HypercallFn> {
        Some(model_hypercall)
    }
    fn kernel_pvclock_cpu0(&self) -> Option<usize> {
        self.kernel_area
    }
    fn xen_vcpu_id(&self, cpu: u32) -> Option<u32> {
        Some(cpu)
    }
    fn nr_cpus(&self) -> u32 {
        2
    }
    fn alloc_page(&self) -> Option<usize> {
        self.pages.alloc()
    }
    fn free_page(&self, va: usize) {
        self.pages.free(va)
    }
}

fn guest(kernel_area: Option<usize>) -> Guest {
    Guest {
        cpuid: models::xen_hvm_qemu(),
        kernel_area,
        pages: Default::default(),
    }
}

fn detection(g: &Guest) -> Detection {
    detect(&g.cpuid.source())
}

fn new_host(f: impl FnOnce(&mut Host)) {
    let mut h = Host::new();
    f(&mut h);
    *host() = Some(h);
}

fn calls() -> Vec<Call> {
    with_host(|h| h.calls.clone())
}

fn start(g: &Guest) -> Result<&'static dyn pvops::Backend, StartError> {
    pvops_host_tests::start(ids::XEN, &detection(g), g)
}

/// The started backend's clock against the model: sched_clock in the record's nanoseconds
/// since the backend's first reading (bracketed by the TSC around `start` and each reading).
fn check_clock(b: &dyn pvops::Backend, start_before: u64, start_after: u64) {
    let ops = b.ops().table();
    // SAFETY: the table's functions, called as the table would (likewise below).
    assert_eq!(unsafe { (ops.timer.tsc_khz)() }, KHZ, "from mul/shift");
    // SAFETY: as above.
    let sched = || unsafe { (ops.timer.sched_clock)() };
    let (a0, v0, b0) = (rdtsc(), sched(), rdtsc());
    let (lo, hi) = (model_ns(a0 - start_after), model_ns(b0 - start_before));
    assert!(
        v0 + 2 >= lo && v0 <= hi + 2,
        "sched_clock {v0} ns, the model says {lo}..={hi} ns since start"
    );
    std::thread::sleep(std::time::Duration::from_millis(5));
    let (a1, v1, b1) = (rdtsc(), sched(), rdtsc());
    let (lo, hi) = (model_ns(a1 - b0), model_ns(b1 - a0));
    assert!(
        v1 - v0 + 2 >= lo && v1 - v0 <= hi + 2,
        "sched_clock advanced {} ns, the model says {lo}..={hi} ns",
        v1 - v0
    );
    // SAFETY: as above.
    assert_eq!(unsafe { (ops.timer.wall_clock)() }, 0, "HVM: unknown");
}

/// The tests that start the backend (one global state, one modelled host) take turns.
static TURN: Mutex<()> = Mutex::new(());

#[test]
fn xen_hvm_backend() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let g = guest(None);
    let d = detection(&g);
    assert_eq!(
        d.find(pvops::HypervisorKind::Xen).map(|i| i.base),
        Some(0x4000_0000)
    );

    // 1. No hvm_safe_pvclock: refused, after asking for the features and nothing else.
    for (features, broken) in [(!XENFEAT_HVM_SAFE_PVCLOCK, false), (u32::MAX, true)] {
        new_host(|h| {
            h.features = features;
            h.no_features = broken;
        });
        let g = guest(None);
        assert_eq!(
            start(&g).err(),
            Some(StartError::Xen(XenError::NoSafePvclock)),
            "features {features:#x}, get_features failing: {broken}"
        );
        assert_eq!(
            calls(),
            vec![(
                HYPERVISOR_XEN_VERSION,
                [XENVER_GET_FEATURES, calls()[0].1[1], 0, 0]
            )]
        );
        assert!(
            g.pages.given.lock().unwrap().is_empty(),
            "nothing allocated"
        );
    }

    // 2. The kernel's secondary time area: read back, nothing registered.
    new_host(|_| {});
    let kernel_area: *mut PvclockVcpuTimeInfo = Box::into_raw(Box::default());
    fill(kernel_area);
    let g = guest(Some(kernel_area as usize));
    let t0 = rdtsc();
    let b = start(&g).expect("xen starts");
    let t1 = rdtsc();
    assert_eq!(b.id(), ids::XEN);
    assert!(!xen::owns_clock());
    assert_eq!(
        b.describe(),
        "xen hvm: the kernel's secondary time area, read back"
    );
    assert!(
        calls()
            .iter()
            .all(|c| c.1[0] != VCPUOP_REGISTER_VCPU_TIME_MEMORY_AREA),
        "the kernel's area is never re-registered"
    );
    assert_eq!(
        pvops_host_tests::conventions::check(&b.ops()),
        Vec::<String>::new()
    );
    check_clock(b, t0, t1);
    let ops = b.ops().table();
    assert_eq!(
        ops.cpu.hypercall as usize, model_hypercall as *const () as usize,
        "cpu.hypercall is the host's entry"
    );
    // the self-test's null hypercall: XENVER_version, answered with the version CPUID shows
    let n = b.null_hypercall().expect("a null hypercall");
    assert_eq!(n.args[..2], [HYPERVISOR_XEN_VERSION, XENVER_VERSION]);
    assert_eq!(n.expect, VERSION, "expected: the CPUID version");
    let [nr, a0, a1, a2, a3] = n.args;
    // SAFETY: the table's hypercall with the backend's own harmless arguments.
    assert_eq!(unsafe { (ops.cpu.hypercall)(nr, a0, a1, a2, a3) }, n.expect);
    // steal time: runnable + offline, from VCPUOP_get_runstate_info of each CPU's vCPU
    // SAFETY: the table's functions.
    let (s0, s1) = unsafe { ((ops.timer.steal_clock)(0), (ops.timer.steal_clock)(1)) };
    assert_eq!((s0, s1), (333, 333));
    let runstate: Vec<u64> = calls()
        .iter()
        .filter(|c| c.0 == HYPERVISOR_VCPU_OP && c.1[0] == VCPUOP_GET_RUNSTATE_INFO)
        .map(|c| c.1[1])
        .collect();
    assert_eq!(runstate, vec![0, 1], "each CPU's own vCPU");
    assert_eq!(pvops_backends::stop(ids::XEN, &g), "nothing registered");

    // 3. No kernel area: the backend registers one in a page of its own, and unregisters it.
    new_host(|_| {});
    let g = guest(None);
    let t0 = rdtsc();
    let b = start(&g).expect("xen starts with its own area");
    let t1 = rdtsc();
    assert!(xen::owns_clock());
    assert_eq!(
        b.describe(),
        "xen hvm: own time area for vCPU 0, registered at load"
    );
    let page = g.pages.given.lock().unwrap()[0];
    assert_eq!(with_host(|h| h.areas.clone()), vec![(0, page as u64)]);
    check_clock(b, t0, t1);
    assert_eq!(
        pvops_backends::stop(ids::XEN, &g),
        "own time area unregistered"
    );
    assert!(with_host(|h| h.areas.is_empty()));
    assert_eq!(*g.pages.freed.lock().unwrap(), vec![page]);
    assert_eq!(pvops_backends::stop(ids::XEN, &g), "nothing registered");

    // 4. The host refuses the NULL area (QEMU): the page stays allocated, never freed while the
    //    host may write it, and registered again by the next start.
    new_host(|h| h.refuse_unregister = true);
    let g = guest(None);
    start(&g).expect("xen starts");
    assert_eq!(
        pvops_backends::stop(ids::XEN, &g),
        "own time area kept: the host refused to unregister it (its page stays allocated)"
    );
    assert!(g.pages.freed.lock().unwrap().is_empty(), "the page is kept");
    // started again (a live switch back to Xen): the kept page is registered again, no other
    start(&g).expect("xen starts again");
    let given = g.pages.given.lock().unwrap().clone();
    assert_eq!(given.len(), 1, "no second page");
    assert_eq!(with_host(|h| h.areas.clone()), vec![(0, given[0] as u64)]);
    assert_eq!(
        pvops_backends::stop(ids::XEN, &g),
        "own time area kept: the host refused to unregister it (its page stays allocated)"
    );
    // a host that never fills it this time: the old record does not pass for its answer
    with_host(|h| h.silent = true);
    assert_eq!(
        start(&g).err(),
        Some(StartError::Xen(XenError::ClockUnavailable))
    );
    // a host that lets go of it at last: the kept page is unregistered and freed
    with_host(|h| {
        h.silent = false;
        h.refuse_unregister = false;
    });
    start(&g).expect("xen starts again");
    assert_eq!(
        pvops_backends::stop(ids::XEN, &g),
        "own time area unregistered"
    );
    assert_eq!(*g.pages.freed.lock().unwrap(), given, "freed once let go");

    // 5. The host refuses the registration: refused, the page freed.
    new_host(|h| h.refuse_register = true);
    let g = guest(None);
    assert_eq!(
        start(&g).err(),
        Some(StartError::Xen(XenError::ClockUnavailable))
    );
    assert_eq!(
        *g.pages.given.lock().unwrap(),
        *g.pages.freed.lock().unwrap()
    );

    // 6. Accepted but never filled: given up after the registration timeout, unregistered.
    new_host(|h| h.silent = true);
    let g = guest(None);
    let t = std::time::Instant::now();
    assert_eq!(
        start(&g).err(),
        Some(StartError::Xen(XenError::ClockUnavailable))
    );
    // (the wait is bounded by the timeout or a number of polls, whichever ends first)
    eprintln!(
        "an area never filled was given up after {:?} (timeout {} ns)",
        t.elapsed(),
        xen::REGISTRATION_TIMEOUT_NS
    );
    assert!(with_host(|h| h.areas.is_empty()), "unregistered");
    assert_eq!(
        *g.pages.given.lock().unwrap(),
        *g.pages.freed.lock().unwrap()
    );

    // 7. No VCPUOP_get_runstate_info (QEMU's emulation): steal time reads 0.
    new_host(|h| h.runstate = None);
    let g = guest(Some(kernel_area as usize));
    let b = start(&g).expect("xen starts");
    // SAFETY: the table's function.
    assert_eq!(unsafe { (b.ops().table().timer.steal_clock)(0) }, 0);
    pvops_backends::stop(ids::XEN, &g);

    // SAFETY: from Box::into_raw above; the backend is stopped and forgot it.
    drop(unsafe { Box::from_raw(kernel_area) });
}

/// Fault injection on the backend's start: each hypercall it makes fails in turn (-EINVAL from
/// the host), then each fallible platform call (the time area's page). Every start refuses with
/// a message or survives (steal time is optional) with a clock that runs; once refused or
/// stopped, no time area stays registered with the host and every page it took is back.
#[test]
fn xen_hvm_start_fails_cleanly_at_each_step() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let mut seen = Vec::new();
    for n in 0.. {
        new_host(|h| h.fail_call = Some(n));
        let g = guest(None);
        let started = start(&g);
        let failed = with_host(|h| h.calls.get(n).map(|c| c.0));
        let Some(nr) = failed else {
            started.expect("xen starts when nothing fails");
            pvops_backends::stop(ids::XEN, &g);
            break;
        };
        seen.push(format!("hypercall {n} ({nr}): {}", outcome(started, &g)));
        assert!(
            with_host(|h| h.areas.is_empty()),
            "hypercall {n}: a time area stays registered"
        );
        let (given, freed) = (
            g.pages.given.lock().unwrap().len(),
            g.pages.freed.lock().unwrap().len(),
        );
        assert_eq!(given, freed, "hypercall {n}: a page is not back");
    }
    for n in 0.. {
        new_host(|_| {});
        let g = guest(None);
        let f = pvops_host_tests::Faulty::new(&g, n);
        let started = pvops_host_tests::start(ids::XEN, &detection(&g), &f);
        f.disarm();
        let Some(what) = f.failed() else {
            started.expect("xen starts when nothing fails");
            pvops_backends::stop(ids::XEN, &g);
            break;
        };
        seen.push(format!(
            "platform call {n} ({what}): {}",
            outcome(started, &g)
        ));
        assert!(
            with_host(|h| h.areas.is_empty()),
            "call {n} ({what}): a time area stays registered"
        );
    }
    assert!(seen.iter().any(|s| s.contains("refused")), "{seen:?}");
    println!("{seen:#?}");
}

/// What a start under a fault came to: refused (with its message) or running (its clock checked,
/// then stopped).
fn outcome(started: Result<&'static dyn pvops::Backend, StartError>, g: &Guest) -> String {
    match started {
        Err(e) => {
            let why = e.to_string();
            assert!(!why.is_empty());
            format!("refused: {why}")
        }
        Ok(b) => {
            let sched = b.ops().table().timer.sched_clock;
            // SAFETY: the started backend's function, as the table calls it.
            let t0 = unsafe { sched() };
            std::thread::sleep(std::time::Duration::from_millis(2));
            // SAFETY: as above.
            assert!(unsafe { sched() } > t0, "started, so its clock runs");
            pvops_backends::stop(ids::XEN, g);
            "survived".into()
        }
    }
}
