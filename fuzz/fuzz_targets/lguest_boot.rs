//! What an lguest host hands the guest: the boot data that announces it
//! (`hardware_subarch`, `hardware_subarch_data`) and the fields it writes into the registered
//! `lguest_data` (`tsc_khz`, the time and its version seqlock, answers to hypercalls).
//!
//! The boot data has a pure parser (the backend's probe). Checks: lguest is present exactly
//! for subarch [`X86_SUBARCH_LGUEST`] with `boot_signature(ABI_VERSION)`, and every other value
//! is refused with the error naming what is wrong (`NoBootData`, `NotLguest(subarch)`,
//! `BadSignature(data)`, `Version(v)`); `auto` then picks lguest exactly when present.
//!
//! `lguest_data` has no parser of its own: the backend reads it in `start` and in its clock. So
//! an announced input also starts the backend against a modelled host that fills
//! `lguest_data` with fuzzed values and rewrites them between the backend's reads. Checks:
//! `start` succeeds exactly when the host filled the time (even version, non-zero `time_tsc`
//! and seconds) and a TSC rate, and otherwise unregisters and frees its page; a started
//! backend reports the host's `tsc_khz`, its `sched_clock` never goes back whatever the host
//! writes (odd versions that never settle included), `set_next_event` refuses deltas under
//! `LG_CLOCK_MIN_DELTA` without a hypercall and returns the host's answer otherwise, and
//! `stop` unregisters and frees the page (or keeps it when the host refuses to let go).
#![no_main]

use std::alloc::Layout;
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use libfuzzer_sys::arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use pvops::{detect, select, Backend, Presence, Request};
use pvops_backends::lguest::abi::{
    boot_signature, LguestData, ABI_VERSION, ETIME, LGUEST_BOOT_MAGIC, LG_CLOCK_MIN_DELTA,
    LHCALL_LGUEST_INIT, LHCALL_SET_CLOCKEVENT, X86_SUBARCH_LGUEST,
};
use pvops_backends::lguest::{BootError, Lguest, LguestError};
use pvops_backends::{Driver, Platform};

const PAGE: Layout = match Layout::from_size_align(4096, 4096) {
    Ok(l) => l,
    Err(_) => panic!("a page layout"),
};

/// The fields a host writes into `lguest_data`.
#[derive(Clone, Copy, Debug, Default)]
struct HostFields {
    tsc_khz: u32,
    time_version: u32,
    time_tsc: u64,
    tv_sec: u64,
    tv_nsec: u64,
}

impl HostFields {
    fn write(&self, d: &LguestData) {
        d.tsc_khz.store(self.tsc_khz, Ordering::Relaxed);
        d.time.tv_sec.store(self.tv_sec, Ordering::Relaxed);
        d.time.tv_nsec.store(self.tv_nsec, Ordering::Relaxed);
        d.time_tsc.store(self.time_tsc, Ordering::Relaxed);
        d.time_version.store(self.time_version, Ordering::Release);
    }
}

/// The modelled host: what it answers and what it saw.
#[derive(Default)]
struct Host {
    /// The registered `lguest_data` (0: none).
    data: usize,
    /// Filled in at `LHCALL_LGUEST_INIT`.
    init: HostFields,
    /// Its answer to `LHCALL_LGUEST_INIT` with a page, and with 0 (unregister).
    init_rc: i64,
    unregister_rc: i64,
    /// Its answer to `LHCALL_SET_CLOCKEVENT`.
    clockevent_rc: i64,
    /// Hypercalls seen: number and first argument.
    calls: Vec<(u64, u64)>,
}

static HOST: Mutex<Option<Host>> = Mutex::new(None);

fn with_host<T>(f: impl FnOnce(&mut Host) -> T) -> T {
    f(HOST
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_mut()
        .expect("a host"))
}

/// The hypercall instruction of the modelled host.
unsafe extern "C" fn model_hypercall(nr: u64, a1: u64, _a2: u64, _a3: u64, _a4: u64) -> i64 {
    with_host(|h| {
        h.calls.push((nr, a1));
        match nr {
            LHCALL_LGUEST_INIT if a1 == 0 => {
                if h.unregister_rc == 0 {
                    h.data = 0;
                }
                h.unregister_rc
            }
            LHCALL_LGUEST_INIT => {
                if h.init_rc == 0 {
                    h.data = a1 as usize;
                    // SAFETY: the guest registers a page of its own holding an `LguestData`,
                    // which stays allocated until it unregisters.
                    h.init.write(unsafe { &*(h.data as *const LguestData) });
                }
                h.init_rc
            }
            LHCALL_SET_CLOCKEVENT => h.clockevent_rc,
            _ => 0,
        }
    })
}

/// The guest kernel's side: boot data, pages, the host's hypercall.
struct Guest {
    boot: Option<(u32, u64)>,
    given: Mutex<Vec<usize>>,
    freed: Mutex<Vec<usize>>,
}

impl Platform for Guest {
    fn tsc_khz(&self) -> u64 {
        0
    }
    fn boot_subarch(&self) -> Option<(u32, u64)> {
        self.boot
    }
    fn hypercall_model(&self) -> Option<pvops_backends::lguest::abi::HypercallFn> {
        Some(model_hypercall)
    }
    fn privileged(&self) -> bool {
        false
    }
    fn alloc_page(&self) -> Option<usize> {
        // SAFETY: a non-zero-sized layout.
        let p = unsafe { std::alloc::alloc_zeroed(PAGE) } as usize;
        (p != 0).then(|| {
            self.given.lock().unwrap().push(p);
            p
        })
    }
    fn free_page(&self, va: usize) {
        self.freed.lock().unwrap().push(va);
        // SAFETY: allocated by `alloc_page` with the same layout, freed once.
        unsafe { std::alloc::dealloc(va as *mut u8, PAGE) };
    }
    fn virt_to_phys(&self, va: usize) -> Option<u64> {
        Some(va as u64)
    }
}

/// The next value of the input (the default once it runs out): nothing below may stop half-way
/// with the backend started.
fn take<'a, T: Arbitrary<'a> + Default>(u: &mut Unstructured<'a>) -> T {
    u.arbitrary().unwrap_or_default()
}

/// One time in `one_in`.
fn chance(u: &mut Unstructured<'_>, one_in: u8) -> bool {
    u.ratio(1, one_in).unwrap_or(false)
}

fn fields(u: &mut Unstructured<'_>) -> HostFields {
    HostFields {
        tsc_khz: take(u),
        time_version: take(u),
        time_tsc: take(u),
        tv_sec: take(u),
        tv_nsec: take(u),
    }
}

fn boot(u: &mut Unstructured<'_>) -> Option<(u32, u64)> {
    match take::<u8>(u) % 4 {
        0 => None,
        // the announcement, now and then with one thing wrong
        1 => {
            let subarch = if chance(u, 4) {
                take(u)
            } else {
                X86_SUBARCH_LGUEST
            };
            let version = if chance(u, 4) { take(u) } else { ABI_VERSION };
            Some((subarch, boot_signature(version)))
        }
        _ => Some((take(u), take(u))),
    }
}

fn expected_probe(boot: Option<(u32, u64)>) -> core::result::Result<(), BootError> {
    let (subarch, data) = boot.ok_or(BootError::NoBootData)?;
    if subarch != X86_SUBARCH_LGUEST {
        return Err(BootError::NotLguest(subarch));
    }
    if data >> 16 != LGUEST_BOOT_MAGIC {
        return Err(BootError::BadSignature(data));
    }
    let version = (data & 0xffff) as u16;
    if version != ABI_VERSION {
        return Err(BootError::Version(version));
    }
    Ok(())
}

fn run(u: &mut Unstructured<'_>) {
    let g = Guest {
        boot: boot(u),
        given: Mutex::default(),
        freed: Mutex::default(),
    };
    // A bare CPU (no hypervisor bit): lguest is announced by boot data alone.
    let d = detect(&|_: u32, _: u32| pvops::ops::cpu::CpuidResult::default());

    let got = <Lguest as Driver>::probe(&d, &g);
    assert_eq!(got, expected_probe(g.boot), "{:x?}", g.boot);
    if let Err(e) = got {
        let _ = e.to_string();
    }
    let candidates = pvops_backends::probe(&d, &g).candidates();
    let lg = candidates
        .iter()
        .find(|c| c.id == Lguest::ID)
        .expect("lguest is registered");
    let s = select(Request::Auto, &d, &candidates).expect("native runs here");
    if got.is_ok() {
        assert_eq!(lg.presence, Presence::Present { base: None });
        assert_eq!(s.backend, Lguest::ID);
    } else {
        assert_eq!(lg.presence, Presence::Absent);
        assert_eq!(s.backend, pvops::BackendId::NATIVE);
        return;
    }

    // The host behind the announcement.
    let init = fields(u);
    let host = Host {
        init,
        init_rc: if chance(u, 16) { take(u) } else { 0 },
        unregister_rc: if chance(u, 16) { take(u) } else { 0 },
        clockevent_rc: take(u),
        ..Host::default()
    };
    let (init_rc, unregister_rc) = (host.init_rc, host.unregister_rc);
    *HOST.lock().unwrap_or_else(|e| e.into_inner()) = Some(host);

    let started = <Lguest as Driver>::start((), &d, &g);
    let filled = init.time_version & 1 == 0 && init.time_tsc != 0 && init.tv_sec != 0;
    let b = match started {
        Ok(b) => {
            assert!(
                init_rc == 0 && init.tsc_khz != 0 && filled,
                "started on {init:?}"
            );
            b
        }
        Err(e) => {
            let _ = e.to_string();
            let want = if init_rc != 0 {
                LguestError::Refused(init_rc)
            } else {
                LguestError::HostSilent
            };
            assert_eq!(e, want, "{init:?}");
            let given = g.given.lock().unwrap().clone();
            assert_eq!(given.len(), 1);
            if init_rc == 0 {
                // registered, then taken back
                assert_eq!(
                    with_host(|h| h.calls.last().copied()),
                    Some((LHCALL_LGUEST_INIT, 0))
                );
            }
            if init_rc != 0 || unregister_rc == 0 {
                assert_eq!(*g.freed.lock().unwrap(), given, "the page goes back");
            } else {
                // the host kept it: it must not be reused (the model lets go of it now)
                assert!(g.freed.lock().unwrap().is_empty());
                g.free_page(given[0]);
            }
            return;
        }
    };

    let page = g.given.lock().unwrap()[0];
    // SAFETY: the page the backend registered; it stays allocated until `stop` (below).
    let ld = unsafe { &*(page as *const LguestData) };
    let ops = b.ops().table();
    // SAFETY: the started backend's own functions, called as the table would; the host model
    // answers every hypercall and the backend is not privileged (no real CPU state changes).
    unsafe {
        assert_eq!((ops.timer.tsc_khz)(), u64::from(init.tsc_khz));
    }
    let mut last = 0;
    for _ in 0..16 {
        if u.is_empty() {
            break;
        }
        match take::<u8>(u) % 3 {
            // the host re-anchors the time (any values, any version)
            0 => fields(u).write(ld),
            // the guest arms its timer
            1 => {
                let delta = if take(u) {
                    take::<u8>(u).into()
                } else {
                    take(u)
                };
                let before = with_host(|h| h.calls.len());
                // SAFETY: as above.
                let rc = unsafe { (ops.timer.set_next_event)(delta) };
                let calls = with_host(|h| h.calls[before..].to_vec());
                if delta < LG_CLOCK_MIN_DELTA {
                    assert_eq!(rc, -ETIME);
                    assert!(calls.is_empty(), "a refused delta makes no hypercall");
                } else {
                    assert_eq!(rc, with_host(|h| h.clockevent_rc) as i32);
                    assert_eq!(calls, vec![(LHCALL_SET_CLOCKEVENT, delta)]);
                }
            }
            // the clocks
            _ => {
                // SAFETY: as above.
                let (now, _wall) = unsafe { ((ops.timer.sched_clock)(), (ops.timer.wall_clock)()) };
                assert!(now >= last, "sched_clock went back: {last} then {now}");
                last = now;
            }
        }
    }

    let said = <Lguest as Driver>::stop(&g);
    let freed = g.freed.lock().unwrap().clone();
    if unregister_rc == 0 {
        assert_eq!(freed, vec![page], "{said}");
        assert_eq!(with_host(|h| h.data), 0);
    } else {
        assert!(
            freed.is_empty(),
            "a page the host keeps is never freed: {said}"
        );
        g.free_page(page);
    }
}

fuzz_target!(|data: &[u8]| run(&mut Unstructured::new(data)));
