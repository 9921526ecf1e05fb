//! The lguest backend against a modelled lguest host: the host owns nothing but what the ABI
//! gives it (the registered `lguest_data`, the hypercalls), services every `LHCALL_*`, drains
//! the async ring before each synchronous call and keeps `lguest_data.time`, as the real host
//! (`lguest-host/`) does. Guest-physical addresses are host addresses (identity).
//!
//! The backend's state is global, so the tests take turns (`turn()`).

use std::sync::{Mutex, MutexGuard};

use pvops::{detect, select, BackendId, Op, Presence, Request};
use pvops_backends::lguest::abi::{
    self as lguest, boot_signature, LguestData, ABI_VERSION, HCALL_FREE, HCALL_PENDING,
    LHCALL_FLUSH_ASYNC, LHCALL_FLUSH_TLB, LHCALL_LGUEST_INIT, LHCALL_NEW_PGTABLE,
    LHCALL_SEND_INTERRUPTS, LHCALL_SET_CLOCKEVENT, LHCALL_SET_PGD, LHCALL_SET_PMD, LHCALL_SET_PTE,
    X86_EFLAGS_IF, X86_SUBARCH_LGUEST,
};
use pvops_backends::lguest::{BootError, Lguest, LguestError};
use pvops_backends::{Driver, Platform, StartError};
use pvops_host_tests::models;
use std::sync::atomic::Ordering;

/// One hypercall as the host saw it: number and four arguments.
type Call = (u64, [u64; 4]);

/// The modelled host.
#[derive(Default)]
struct Host {
    /// The registered `lguest_data` (0: none).
    data: usize,
    /// Synchronous hypercalls, in order.
    sync: Vec<Call>,
    /// Ring entries the host ran, in order.
    ran: Vec<Call>,
    /// The host's ring cursor.
    cursor: usize,
    /// What it writes into `tsc_khz`.
    tsc_khz: u32,
    /// Whether it refuses `LHCALL_LGUEST_INIT`.
    refuse: bool,
    /// Whether it accepts `LHCALL_LGUEST_INIT` but never fills the time (a broken host).
    silent: bool,
    /// Virtual IRQs raised and not delivered yet (bit n = IRQ n).
    pending: u32,
    /// Virtual IRQs delivered.
    delivered: Vec<u32>,
    /// Armed one-shot timer deltas.
    clockevents: Vec<u64>,
    /// Seconds to step the host's realtime clock by (tests of a clock stepped back).
    offset_ns: i64,
    /// `time_tsc` back-dated by this many cycles (scaling tests).
    backdate_cycles: u64,
    /// A host that begins rewriting the time (version odd, fields 1000 s ahead) and never
    /// finishes.
    stuck: bool,
}

static HOST: Mutex<Option<Host>> = Mutex::new(None);
static TURN: Mutex<()> = Mutex::new(());

fn turn() -> MutexGuard<'static, ()> {
    TURN.lock().unwrap_or_else(|e| e.into_inner())
}

/// The host, locked.
struct HostGuard(MutexGuard<'static, Option<Host>>);

impl std::ops::Deref for HostGuard {
    type Target = Host;
    fn deref(&self) -> &Host {
        self.0.as_ref().expect("a host")
    }
}

impl std::ops::DerefMut for HostGuard {
    fn deref_mut(&mut self) -> &mut Host {
        self.0.as_mut().expect("a host")
    }
}

fn host() -> HostGuard {
    HostGuard(HOST.lock().unwrap_or_else(|e| e.into_inner()))
}

impl Host {
    fn lguest_data(&self) -> Option<&'static LguestData> {
        // SAFETY: the page the guest registered; it stays allocated until it unregisters.
        (self.data != 0).then(|| unsafe { &*(self.data as *const LguestData) })
    }

    /// Write the time as the real host does: version odd, fields, version even.
    fn write_time(&self) {
        let Some(d) = self.lguest_data() else { return };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        let ns = (now.as_nanos() as i128 + i128::from(self.offset_ns)) as u64;
        let v = d.time_version.load(Ordering::Relaxed);
        d.time_version.store(v | 1, Ordering::Release);
        if self.stuck {
            d.time
                .tv_sec
                .store(ns / 1_000_000_000 + 1000, Ordering::Relaxed);
            d.time_tsc
                .store(pvops::arch::rdtsc_ordered(), Ordering::Relaxed);
            return; // the version stays odd
        }
        d.time.tv_sec.store(ns / 1_000_000_000, Ordering::Relaxed);
        d.time.tv_nsec.store(ns % 1_000_000_000, Ordering::Relaxed);
        d.time_tsc.store(
            pvops::arch::rdtsc_ordered() - self.backdate_cycles,
            Ordering::Relaxed,
        );
        d.time_version.store((v | 1) + 1, Ordering::Release);
    }

    /// Run the ring from the cursor up to the first free slot.
    fn drain(&mut self) {
        let Some(d) = self.lguest_data() else { return };
        for _ in 0..lguest::LHCALL_RING_SIZE {
            let i = self.cursor;
            if d.hcall_status[i].load(Ordering::Acquire) == HCALL_FREE {
                break;
            }
            let s = &d.hcalls[i];
            self.ran.push((
                s.arg0.load(Ordering::Relaxed),
                [
                    s.arg1.load(Ordering::Relaxed),
                    s.arg2.load(Ordering::Relaxed),
                    s.arg3.load(Ordering::Relaxed),
                    s.arg4.load(Ordering::Relaxed),
                ],
            ));
            d.hcall_status[i].store(HCALL_FREE, Ordering::Release);
            self.cursor = (i + 1) % lguest::LHCALL_RING_SIZE;
        }
    }

    /// Raise virtual IRQ `n`: delivered now if the guest's IF is on, else marked pending.
    fn raise(&mut self, n: u32) {
        let d = self.lguest_data().expect("registered");
        if d.irq_enabled.load(Ordering::Relaxed) & X86_EFLAGS_IF != 0 {
            self.delivered.push(n);
        } else {
            self.pending |= 1 << n;
            d.irq_pending.store(X86_EFLAGS_IF as i32, Ordering::Relaxed);
        }
    }

    fn deliver_pending(&mut self) {
        let d = self.lguest_data().expect("registered");
        if d.irq_enabled.load(Ordering::Relaxed) & X86_EFLAGS_IF == 0 {
            return;
        }
        while self.pending != 0 {
            let n = self.pending.trailing_zeros();
            self.pending &= !(1 << n);
            self.delivered.push(n);
        }
        d.irq_pending.store(0, Ordering::Relaxed);
    }

    fn service(&mut self, nr: u64, a: [u64; 4]) -> i64 {
        self.sync.push((nr, a));
        if self.data == 0 && nr != LHCALL_LGUEST_INIT {
            return -1; // nothing registered: refused
        }
        self.drain();
        let rc = match nr {
            LHCALL_LGUEST_INIT if a[0] == 0 => {
                self.data = 0;
                return 0;
            }
            LHCALL_LGUEST_INIT if self.refuse || self.data != 0 => return -1,
            LHCALL_LGUEST_INIT => {
                assert_eq!(a[0] % 4096, 0, "lguest_data is page-aligned");
                self.data = a[0] as usize;
                if self.silent {
                    return 0;
                }
                let d = self.lguest_data().unwrap();
                d.tsc_khz.store(self.tsc_khz, Ordering::Relaxed);
                0
            }
            LHCALL_SEND_INTERRUPTS => {
                self.deliver_pending();
                0
            }
            LHCALL_SET_CLOCKEVENT => {
                self.clockevents.push(a[0]);
                0
            }
            LHCALL_FLUSH_ASYNC
            | LHCALL_NEW_PGTABLE
            | LHCALL_FLUSH_TLB
            | LHCALL_SET_PTE
            | LHCALL_SET_PMD
            | LHCALL_SET_PGD
            | lguest::LHCALL_HALT => 0,
            _ => -38,
        };
        if !self.silent {
            self.write_time();
        }
        rc
    }
}

/// The hypercall instruction of the modelled host.
unsafe extern "C" fn model_hypercall(nr: u64, a1: u64, a2: u64, a3: u64, a4: u64) -> i64 {
    host().service(nr, [a1, a2, a3, a4])
}

/// What the guest kernel would tell the backend.
struct Guest {
    boot: Option<(u32, u64)>,
    cpus: u32,
    pages: pvops_host_tests::Pages,
}

impl Platform for Guest {
    fn tsc_khz(&self) -> u64 {
        0
    }
    fn boot_subarch(&self) -> Option<(u32, u64)> {
        self.boot
    }
    fn hypercall_model(&self) -> Option<lguest::HypercallFn> {
        Some(model_hypercall)
    }
    fn privileged(&self) -> bool {
        false
    }
    fn nr_cpus(&self) -> u32 {
        self.cpus
    }
    fn alloc_page(&self) -> Option<usize> {
        self.pages.alloc()
    }
    fn free_page(&self, va: usize) {
        self.pages.free(va)
    }
    fn virt_to_phys(&self, va: usize) -> Option<u64> {
        Some(va as u64)
    }
}

fn guest(boot: Option<(u32, u64)>) -> Guest {
    Guest {
        boot,
        cpus: 1,
        pages: Default::default(),
    }
}

const GOOD: Option<(u32, u64)> = Some((X86_SUBARCH_LGUEST, boot_signature(ABI_VERSION)));

fn new_host(tsc_khz: u32) {
    *HOST.lock().unwrap_or_else(|e| e.into_inner()) = Some(Host {
        tsc_khz,
        ..Host::default()
    });
}

/// Start the backend against a fresh host.
fn started(tsc_khz: u32) -> (Guest, &'static dyn pvops::Backend) {
    new_host(tsc_khz);
    let g = guest(GOOD);
    let d = detect(&models::tcg().source());
    let b = pvops_host_tests::start(pvops_host_tests::ids::LGUEST, &d, &g).expect("lguest starts");
    (g, b)
}

fn calls_since(n: usize) -> Vec<Call> {
    host().sync[n..].to_vec()
}

#[test]
fn detection_needs_the_boot_data() {
    let _t = turn();
    new_host(1_000_000);
    let tcg = detect(&models::tcg().source());
    let kvm = detect(&models::kvm().source());
    let cases = [
        (None, Err(BootError::NoBootData)),
        (Some((0, 0)), Err(BootError::NotLguest(0))),
        (
            Some((2, boot_signature(ABI_VERSION))),
            Err(BootError::NotLguest(2)),
        ),
        (
            Some((X86_SUBARCH_LGUEST, 0)),
            Err(BootError::BadSignature(0)),
        ),
        (
            Some((X86_SUBARCH_LGUEST, 0x4c47_3634_5057_0001)),
            Err(BootError::BadSignature(0x4c47_3634_5057_0001)),
        ),
        (
            Some((X86_SUBARCH_LGUEST, boot_signature(2))),
            Err(BootError::Version(2)),
        ),
        (GOOD, Ok(())),
    ];
    for (boot, want) in cases {
        let g = guest(boot);
        assert_eq!(
            <Lguest as Driver>::probe(&tcg, &g).map(|_| ()),
            want,
            "{boot:x?}"
        );
        let c = pvops_backends::probe(&tcg, &g).candidates();
        let lg = c
            .iter()
            .find(|c| c.id == pvops_host_tests::ids::LGUEST)
            .unwrap();
        if want.is_ok() {
            assert_eq!(lg.presence, Presence::Present { base: None });
            // announced by boot data: auto prefers it even over a CPUID interface
            for d in [&tcg, &kvm] {
                let cands = pvops_backends::probe(d, &g).candidates();
                let s = select(Request::Auto, d, &cands).unwrap();
                assert_eq!(s.backend, pvops_host_tests::ids::LGUEST);
            }
            continue;
        }
        // never chosen, and refused by name, without a single hypercall or page
        assert_eq!(lg.presence, Presence::Absent, "{boot:x?}");
        let s = select(Request::Auto, &tcg, &c).unwrap();
        assert_eq!(s.backend, BackendId::NATIVE);
        assert_eq!(
            select(Request::Backend(pvops_host_tests::ids::LGUEST), &tcg, &c),
            Err(pvops::select::SelectError::Absent(
                pvops_host_tests::ids::LGUEST
            ))
        );
        match pvops_host_tests::start(pvops_host_tests::ids::LGUEST, &tcg, &g) {
            Err(StartError::Absent(id)) => assert_eq!(id, pvops_host_tests::ids::LGUEST),
            other => panic!("started without boot data: {:?}", other.map(|b| b.id())),
        }
        assert!(host().sync.is_empty(), "no hypercall without the boot data");
        assert!(
            g.pages.given.lock().unwrap().is_empty(),
            "no page allocated"
        );
    }
}

#[test]
fn start_registers_and_stop_unregisters() {
    let _t = turn();
    // Uniprocessor only.
    new_host(1_000_000);
    let mut g = guest(GOOD);
    g.cpus = 2;
    let d = detect(&models::tcg().source());
    assert_eq!(
        pvops_host_tests::start(pvops_host_tests::ids::LGUEST, &d, &g).err(),
        Some(StartError::Lguest(LguestError::Smp(2)))
    );
    assert!(host().sync.is_empty());

    // A host that refuses LGUEST_INIT: the page goes back.
    host().refuse = true;
    let g = guest(GOOD);
    assert_eq!(
        pvops_host_tests::start(pvops_host_tests::ids::LGUEST, &d, &g).err(),
        Some(StartError::Lguest(LguestError::Refused(-1)))
    );
    assert_eq!(
        *g.pages.given.lock().unwrap(),
        *g.pages.freed.lock().unwrap()
    );

    // A host that accepts but never fills the time: refused, unregistered, freed.
    new_host(1_000_000);
    host().silent = true;
    let g = guest(GOOD);
    assert_eq!(
        pvops_host_tests::start(pvops_host_tests::ids::LGUEST, &d, &g).err(),
        Some(StartError::Lguest(LguestError::HostSilent))
    );
    assert_eq!(
        calls_since(0).last(),
        Some(&(LHCALL_LGUEST_INIT, [0; 4])),
        "unregistered"
    );
    assert_eq!(host().data, 0);
    assert_eq!(
        *g.pages.given.lock().unwrap(),
        *g.pages.freed.lock().unwrap()
    );

    // A working host.
    let (g, b) = started(2_000_000);
    assert_eq!(b.id(), pvops_host_tests::ids::LGUEST);
    let page = g.pages.given.lock().unwrap()[0];
    assert_eq!(
        calls_since(0),
        vec![(LHCALL_LGUEST_INIT, [page as u64, 0, 0, 0])]
    );
    let ld = host().lguest_data().expect("registered");
    assert!(ld
        .hcall_status
        .iter()
        .all(|s| s.load(Ordering::Relaxed) == HCALL_FREE));
    assert_eq!(
        pvops_host_tests::conventions::check(&b.ops()),
        Vec::<String>::new()
    );
    let ops = b.ops().table();
    // SAFETY: the table's functions, called as the table would.
    unsafe {
        assert_eq!((ops.timer.tsc_khz)(), 2_000_000);
        assert_eq!(
            ops.cpu.hypercall as usize, model_hypercall as *const () as usize,
            "cpu.hypercall is the host's entry"
        );
        let n = b.null_hypercall().unwrap();
        let [nr, a0, a1, a2, a3] = n.args;
        assert_eq!((ops.cpu.hypercall)(nr, a0, a1, a2, a3), n.expect);
    }
    // Ours are direct calls; the CPU group stays native, inline included.
    for op in [
        Op::SaveFl,
        Op::IrqDisable,
        Op::SetPte,
        Op::WriteCr3,
        Op::LazyModeLeave,
    ] {
        assert_eq!(b.ops().inline(op), None, "{op:?}");
    }
    assert_eq!(
        b.ops().inline(Op::ReadCr0),
        pvops_backends::native::OPS.inline(Op::ReadCr0)
    );
    assert_eq!(
        pvops_backends::stop(pvops_host_tests::ids::LGUEST, &g),
        "lguest_data unregistered"
    );
    assert_eq!(host().data, 0);
    assert_eq!(*g.pages.freed.lock().unwrap(), vec![page]);
    assert_eq!(
        pvops_backends::stop(pvops_host_tests::ids::LGUEST, &g),
        "nothing registered"
    );
}

#[test]
fn irq_flag_and_pending_interrupts() {
    let _t = turn();
    let (g, b) = started(1_000_000);
    let ops = b.ops().table();
    let ld = host().lguest_data().unwrap();
    let n0 = host().sync.len();
    // SAFETY: the table's functions (host tests: only the virtual flag).
    unsafe {
        assert_eq!((ops.irq.save_fl.get())() & u64::from(X86_EFLAGS_IF), 0x200);
        (ops.irq.irq_disable.get())();
        assert_eq!(
            ld.irq_enabled.load(Ordering::Relaxed),
            0,
            "the host sees it"
        );
        assert_eq!((ops.irq.save_fl.get())() & 0x200, 0);
        // enabling with nothing pending: no exit
        (ops.irq.irq_enable.get())();
        assert_eq!(ld.irq_enabled.load(Ordering::Relaxed), 0x200);
        assert_eq!(
            host().sync.len(),
            n0,
            "no hypercall without a pending interrupt"
        );

        // An interrupt arrives while the flag is off: held, then asked for on enable.
        (ops.irq.restore_fl.get())(0);
        assert_eq!(ld.irq_enabled.load(Ordering::Relaxed), 0);
        host().raise(0);
        assert!(host().delivered.is_empty(), "held while the IF is off");
        assert_eq!(ld.irq_pending.load(Ordering::Relaxed), 0x200);
        (ops.irq.restore_fl.get())(0x200);
        assert_eq!(calls_since(n0), vec![(LHCALL_SEND_INTERRUPTS, [0; 4])]);
        assert_eq!(host().delivered, vec![0]);
        assert_eq!(ld.irq_pending.load(Ordering::Relaxed), 0);
        // with the IF on, the host delivers at once
        host().raise(3);
        assert_eq!(host().delivered, vec![0, 3]);
        (ops.irq.irq_enable.get())();
        assert_eq!(host().sync.len(), n0 + 1, "nothing pending: no exit");
        (ops.irq.safe_halt.get())();
        assert_eq!(calls_since(n0 + 1), vec![(lguest::LHCALL_HALT, [0; 4])]);
    }
    pvops_backends::stop(pvops_host_tests::ids::LGUEST, &g);
}

#[test]
fn lazy_mmu_batches_through_the_ring() {
    let _t = turn();
    let (g, b) = started(1_000_000);
    let ops = b.ops().table();
    let ld = host().lguest_data().unwrap();
    let mut ptes = vec![0u64; 80];
    let base = ptes.as_mut_ptr();
    let n0 = host().sync.len();
    // SAFETY: the table's functions; every entry pointer is into `ptes`.
    unsafe {
        // Outside a lazy section: one synchronous call per write.
        (ops.mmu.set_pte.get())(base, 0x1003);
        assert_eq!(ptes[0], 0x1003, "the guest's own store");
        assert_eq!(
            calls_since(n0),
            vec![(LHCALL_SET_PTE, [base as u64, 0x1003, 0, 0])]
        );

        // Lazy: N writes, no exit, N pending slots; leaving flushes once, in order.
        let n1 = host().sync.len();
        (ops.mmu.lazy_mode_enter)();
        for i in 0..10 {
            (ops.mmu.set_pte.get())(base.add(i), 0x2000 + i as u64);
        }
        (ops.mmu.set_pmd.get())(base.add(10), 0x3000);
        (ops.mmu.set_pud.get())(base.add(11), 0x4000);
        (ops.mmu.flush_tlb_user.get())();
        assert_eq!(host().sync.len(), n1, "batched: no hypercall yet");
        let pending = ld
            .hcall_status
            .iter()
            .filter(|s| s.load(Ordering::Relaxed) == HCALL_PENDING)
            .count();
        assert_eq!(pending, 13);
        (ops.mmu.lazy_mode_leave)();
        assert_eq!(calls_since(n1), vec![(LHCALL_FLUSH_ASYNC, [0; 4])]);
        let mut want: Vec<Call> = (0..10)
            .map(|i| {
                (
                    LHCALL_SET_PTE,
                    [base.add(i) as u64, 0x2000 + i as u64, 0, 0],
                )
            })
            .collect();
        want.push((LHCALL_SET_PMD, [base.add(10) as u64, 0x3000, 0, 0]));
        want.push((LHCALL_SET_PGD, [base.add(11) as u64, 0x4000, 0, 0]));
        want.push((LHCALL_FLUSH_TLB, [0; 4]));
        assert_eq!(host().ran, want);
        assert!(ld
            .hcall_status
            .iter()
            .all(|s| s.load(Ordering::Relaxed) == HCALL_FREE));

        // An empty lazy section costs no exit.
        let n2 = host().sync.len();
        (ops.mmu.lazy_mode_enter)();
        (ops.mmu.lazy_mode_leave)();
        assert_eq!(host().sync.len(), n2);

        // More writes than slots: the one that finds the ring full goes synchronously (the
        // host drains the 64 queued first), the rest queue again; order is kept throughout.
        host().ran.clear();
        (ops.mmu.lazy_mode_enter)();
        for i in 0..70 {
            (ops.mmu.set_pte.get())(base.add(i), 0x5000 + i as u64);
        }
        let mid = calls_since(n2);
        (ops.mmu.lazy_mode_leave)();
        let ran = host().ran.clone();
        assert_eq!(mid.len(), 1, "one synchronous call when the ring filled");
        assert_eq!(mid[0].0, LHCALL_SET_PTE);
        let mut seen: Vec<u64> = ran.iter().map(|c| c.1[1]).collect();
        seen.insert(64, mid[0].1[1]);
        assert_eq!(seen, (0..70).map(|i| 0x5000 + i).collect::<Vec<u64>>());

        // CR3 loads are synchronous.
        let n3 = host().sync.len();
        (ops.mmu.write_cr3.get())(0x1234_5000);
        assert_eq!(
            calls_since(n3),
            vec![(LHCALL_NEW_PGTABLE, [0x1234_5000, 0, 0, 0])]
        );
    }
    pvops_backends::stop(pvops_host_tests::ids::LGUEST, &g);
}

#[test]
fn clock_is_the_hosts_time_scaled_by_tsc_khz() {
    let _t = turn();
    // Scaling: time_tsc back-dated by 2e9 cycles reads as 2 s past `time` at 1 GHz, 1 s at
    // 2 GHz (plus what elapsed since, microseconds).
    for (khz, ahead_ns) in [(1_000_000u32, 2_000_000_000u64), (2_000_000, 1_000_000_000)] {
        new_host(khz);
        host().backdate_cycles = 2_000_000_000;
        let g = guest(GOOD);
        let d = detect(&models::tcg().source());
        let b = pvops_host_tests::start(pvops_host_tests::ids::LGUEST, &d, &g).expect("starts");
        let ld = host().lguest_data().unwrap();
        // SAFETY: the table's function.
        let wall = unsafe { (b.ops().table().timer.wall_clock)() };
        let time = ld.time.tv_sec.load(Ordering::Relaxed) * 1_000_000_000
            + ld.time.tv_nsec.load(Ordering::Relaxed);
        let past = wall - time;
        assert!(
            past >= ahead_ns && past < ahead_ns + 5_000_000,
            "{khz} kHz: {past} ns past the host's time, want {ahead_ns}"
        );
        pvops_backends::stop(pvops_host_tests::ids::LGUEST, &g);
    }

    // The real TSC rate: sched_clock follows real time (the rigs' rule, 2% + 200 µs), and
    // wall_clock is the host's realtime.
    let khz = pvops_host_tests::clock::tsc_khz();
    let (g, b) = started(khz as u32);
    let ops = b.ops().table();
    // SAFETY: the table's functions.
    unsafe {
        pvops_host_tests::clock::check_over("lguest sched_clock", 30, || (ops.timer.sched_clock)());
        // wall_clock against the realtime clock read around it, within the rigs' rule over
        // the time since the host last anchored `lguest_data.time` (the start, 30 ms ago)
        let realtime = || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        };
        let ld = host().lguest_data().unwrap();
        let anchor = ld.time.tv_sec.load(Ordering::Relaxed) * 1_000_000_000
            + ld.time.tv_nsec.load(Ordering::Relaxed);
        let r0 = realtime();
        let wall = (ops.timer.wall_clock)();
        let r1 = realtime();
        let now = r0 + (r1 - r0) / 2;
        let allowed = pvops_host_tests::clock::tolerance(now - anchor) + (r1 - r0) / 2;
        assert!(
            wall.abs_diff(now) <= allowed,
            "wall {wall} vs realtime {now}: {} ns apart, allowed {allowed}",
            wall.abs_diff(now)
        );

        // The host's clock steps back a second: sched_clock does not.
        let before = (ops.timer.sched_clock)();
        host().offset_ns = -1_000_000_000;
        (ops.cpu.hypercall)(LHCALL_FLUSH_ASYNC, 0, 0, 0, 0); // an exit: the host re-anchors
        let after = (ops.timer.sched_clock)();
        assert!(after >= before, "{before} -> {after}");

        // One-shot timer: too short is refused without an exit; otherwise the host arms it.
        let n = host().sync.len();
        assert_eq!((ops.timer.set_next_event)(50), -lguest::ETIME);
        assert_eq!(host().sync.len(), n);
        assert_eq!((ops.timer.set_next_event)(1_000_000), 0);
        assert_eq!(host().clockevents, vec![1_000_000]);
    }
    pvops_backends::stop(pvops_host_tests::ids::LGUEST, &g);
}

/// A host that leaves `lguest_data.time_version` odd (an update begun, never finished): the
/// clock never uses the half-written fields; sched_clock holds, the wall clock says unknown
/// (0), and both recover when the host completes an update.
#[test]
fn a_time_record_whose_version_stays_odd_is_never_used() {
    let _t = turn();
    let (g, b) = started(pvops_host_tests::clock::tsc_khz() as u32);
    let ops = b.ops().table();
    let realtime = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    };
    // SAFETY: the table's functions, called as the table would.
    unsafe {
        let sched0 = (ops.timer.sched_clock)();
        assert!((ops.timer.wall_clock)().abs_diff(realtime()) < 10_000_000);
        host().stuck = true;
        (ops.cpu.hypercall)(LHCALL_FLUSH_ASYNC, 0, 0, 0, 0); // an exit: the host writes
        let ld = host().lguest_data().unwrap();
        assert_eq!(ld.time_version.load(Ordering::Relaxed) & 1, 1, "mid-update");
        let wall = (ops.timer.wall_clock)();
        let sched = (ops.timer.sched_clock)();
        assert_eq!(wall, 0, "wall_clock read a record whose version stayed odd");
        assert!(
            sched < sched0 + 1_000_000_000,
            "sched_clock read a record whose version stayed odd ({sched0} -> {sched})"
        );
        host().stuck = false;
        (ops.cpu.hypercall)(LHCALL_FLUSH_ASYNC, 0, 0, 0, 0); // the next update completes
        assert!((ops.timer.wall_clock)().abs_diff(realtime()) < 10_000_000);
        assert!((ops.timer.sched_clock)() >= sched);
    }
    pvops_backends::stop(pvops_host_tests::ids::LGUEST, &g);
}

/// Write tracing for [`ring_slot_status_is_published_after_its_arguments`]: the traced page is
/// read-only; each store into it faults (SIGSEGV), the handler records the address, makes the
/// page writable and sets the trap flag, so the store runs and the next instruction traps
/// (SIGTRAP), where the page is made read-only again. The recorded addresses are the order in
/// which the program stores into the page (on x86, the order another CPU sees them in).
mod trace {
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// The traced page (0: none).
    static PAGE: AtomicUsize = AtomicUsize::new(0);
    /// Store addresses, in order.
    static WRITES: [AtomicUsize; 64] = [const { AtomicUsize::new(0) }; 64];
    static N: AtomicUsize = AtomicUsize::new(0);
    const TF: i64 = 1 << 8;

    fn protect(page: usize, writable: bool) {
        let prot = libc::PROT_READ | if writable { libc::PROT_WRITE } else { 0 };
        // SAFETY: `page` is the page `start` was given, allocated by the test; mprotect is
        // async-signal-safe.
        unsafe { libc::mprotect(page as *mut _, 4096, prot) };
    }

    extern "C" fn on_segv(_: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
        // SAFETY: the kernel hands a SIGSEGV handler installed with SA_SIGINFO a valid siginfo
        // and ucontext.
        let (addr, uc) = unsafe {
            (
                (*info).si_addr() as usize,
                &mut *(ctx as *mut libc::ucontext_t),
            )
        };
        let page = PAGE.load(Ordering::Relaxed);
        if page == 0 || addr & !4095 != page {
            // not ours: a real fault; let it kill the process as it would have
            // SAFETY: restoring the default action is async-signal-safe.
            unsafe { libc::signal(libc::SIGSEGV, libc::SIG_DFL) };
            return;
        }
        let n = N.fetch_add(1, Ordering::Relaxed);
        if let Some(w) = WRITES.get(n) {
            w.store(addr, Ordering::Relaxed);
        }
        protect(page, true);
        uc.uc_mcontext.gregs[libc::REG_EFL as usize] |= TF;
    }

    extern "C" fn on_trap(_: libc::c_int, _: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
        // SAFETY: as in `on_segv`.
        let uc = unsafe { &mut *(ctx as *mut libc::ucontext_t) };
        let page = PAGE.load(Ordering::Relaxed);
        if page != 0 {
            protect(page, false);
        }
        uc.uc_mcontext.gregs[libc::REG_EFL as usize] &= !TF;
    }

    fn install(sig: libc::c_int, f: usize) -> libc::sigaction {
        // SAFETY: a zeroed sigaction is a valid value; the handlers are async-signal-safe
        // (atomics and mprotect only).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = f;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            let mut old: libc::sigaction = std::mem::zeroed();
            assert_eq!(libc::sigaction(sig, &sa, &mut old), 0);
            old
        }
    }

    /// Run `f` with stores into `page` traced; returns their addresses, in order.
    pub fn stores(page: usize, f: impl FnOnce()) -> Vec<usize> {
        assert_eq!(page % 4096, 0);
        N.store(0, Ordering::Relaxed);
        let old_segv = install(libc::SIGSEGV, on_segv as *const () as usize);
        let old_trap = install(libc::SIGTRAP, on_trap as *const () as usize);
        PAGE.store(page, Ordering::SeqCst);
        protect(page, false);
        f();
        PAGE.store(0, Ordering::SeqCst);
        protect(page, true);
        // SAFETY: putting back the actions `install` replaced.
        unsafe {
            libc::sigaction(libc::SIGSEGV, &old_segv, std::ptr::null_mut());
            libc::sigaction(libc::SIGTRAP, &old_trap, std::ptr::null_mut());
        }
        let n = N.load(Ordering::Relaxed).min(WRITES.len());
        WRITES[..n]
            .iter()
            .map(|w| w.load(Ordering::Relaxed))
            .collect()
    }
}

/// The ring's publication order, observed deterministically: the guest stores a slot's five
/// arguments first and its status (`HCALL_PENDING`) last, so a host that sees the status sees
/// the arguments. Every store the backend makes into `lguest_data` while it queues one call is
/// traced (see [`trace`]).
#[test]
fn ring_slot_status_is_published_after_its_arguments() {
    let _t = turn();
    let (g, b) = started(1_000_000);
    let ops = b.ops().table();
    let ld = host().lguest_data().unwrap();
    let page = ld as *const LguestData as usize;
    let mut pte = 0u64;
    // Two calls, so that a slot other than the first is checked too.
    for (slot, value) in [(0usize, 0x1003u64), (1, 0x2003)] {
        // SAFETY: the table's functions; the entry is a local.
        unsafe { (ops.mmu.lazy_mode_enter)() };
        let stores = trace::stores(page, || {
            // SAFETY: as above.
            unsafe { (ops.mmu.set_pte.get())(&mut pte, value) }
        });
        let s = &ld.hcalls[slot];
        let args = [&s.arg0, &s.arg1, &s.arg2, &s.arg3, &s.arg4].map(|a| a.as_ptr() as usize);
        let status = ld.hcall_status[slot].as_ptr() as usize;
        let mut want: Vec<usize> = args.to_vec();
        want.push(status);
        let mut got_sorted = stores.clone();
        got_sorted.sort();
        let mut want_sorted = want.clone();
        want_sorted.sort();
        assert_eq!(
            got_sorted, want_sorted,
            "slot {slot}: the stores queueing one call"
        );
        assert_eq!(
            stores.last(),
            Some(&status),
            "slot {slot}: the status must be stored after every argument (stores: {stores:#x?}, \
             status at {status:#x})"
        );
        assert_eq!(ld.hcall_status[slot].load(Ordering::Relaxed), HCALL_PENDING);
        assert_eq!(s.arg2.load(Ordering::Relaxed), value);
        // SAFETY: as above: leaving flushes the ring through the host.
        unsafe { (ops.mmu.lazy_mode_leave)() };
    }
    assert_eq!(
        host().ran.iter().map(|c| c.1[1]).collect::<Vec<_>>(),
        vec![0x1003, 0x2003]
    );
    pvops_backends::stop(pvops_host_tests::ids::LGUEST, &g);
}

/// Fault injection on the backend's start: each fallible platform call (the `lguest_data` page,
/// its translation, …) fails in turn. Every start refuses with a message or runs; once refused
/// or stopped, no `lguest_data` stays registered with the host and every page is back.
#[test]
fn start_fails_cleanly_at_each_platform_call() {
    let _t = turn();
    let d = detect(&models::tcg().source());
    let mut seen = Vec::new();
    for n in 0.. {
        new_host(1_000_000);
        let g = guest(GOOD);
        let f = pvops_host_tests::Faulty::new(&g, n);
        let started = pvops_host_tests::start(pvops_host_tests::ids::LGUEST, &d, &f);
        f.disarm();
        let Some(what) = f.failed() else {
            started.expect("lguest starts when nothing fails");
            pvops_backends::stop(pvops_host_tests::ids::LGUEST, &g);
            break;
        };
        match started {
            Err(e) => seen.push(format!("{n} ({what}): refused: {e}")),
            Ok(_) => {
                seen.push(format!("{n} ({what}): survived"));
                pvops_backends::stop(pvops_host_tests::ids::LGUEST, &g);
            }
        }
        assert_eq!(host().data, 0, "{n} ({what}): lguest_data stays registered");
        assert_eq!(
            g.pages.given.lock().unwrap().len(),
            g.pages.freed.lock().unwrap().len(),
            "{n} ({what}): a page is not back"
        );
    }
    assert!(!seen.is_empty(), "the start makes fallible calls");
    println!("{seen:#?}");
}
