//! The records a host keeps time in (the pvclock record of kvmclock and Xen, its wall clock,
//! and any record read under the version seqlock, such as KVM's steal time), over fuzzed record
//! bytes and fuzzed host updates made while the guest reads.
//!
//! Checks:
//! - `scale_delta` never panics, is 0 for a zero multiplier, exact for shift 0
//!   (`delta × mul >> 32`), never more than the (right-)shifted delta, and monotonic in the
//!   delta and in the multiplier;
//! - `tsc_khz` is 0 for a zero multiplier, `1e6 << 32 / mul` for shift 0, and agrees with
//!   `scale_delta`: one second's worth of cycles at the rate it reports scales to one second, to
//!   within the rounding of the two (for shifts a record can sensibly hold, |shift| ≤ 31);
//!   `TscScale` likewise;
//! - `read_versioned` keeps the first reading taken under an even version that did not move,
//!   and gives up (`Unstable`) only after `MAX_RETRIES` attempts without one;
//! - `pvclock::read` over a record the host rewrites under the reader gives exactly the
//!   reading of the first consistent attempt (its TSC, flags, multiplier and shift; a TSC
//!   behind the record's timestamp counting as no time), `NotRunning` for a zero multiplier
//!   there, and `Unstable` when no attempt was consistent; `read_wall` likewise;
//! - a steal clock (the clamp over `read_versioned`) and a `Clock` over a record the host keeps
//!   rewriting never go back, unless the interface and the record both vouch for the record.
#![no_main]

use std::cell::{Cell, UnsafeCell};

use libfuzzer_sys::arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use pvops_backends::pvclock::{
    self, scale_delta, tsc_khz, Clock, PvclockError, PvclockVcpuTimeInfo, PvclockWallClock,
    Reading, PVCLOCK_TSC_STABLE_BIT,
};
use pvops_backends::time::{read_versioned, Monotonic, TscScale, Unstable, MAX_RETRIES};

/// The next value of the input (the default once it runs out).
fn take<'a, T: Arbitrary<'a> + Default>(u: &mut Unstructured<'a>) -> T {
    u.arbitrary().unwrap_or_default()
}

const ONE_SECOND: u128 = 1_000_000_000;

fn check_scale(delta: u64, more: u64, mul: u32, more_mul: u32, shift: i8) {
    let ns = scale_delta(delta, mul, shift);
    assert_eq!(scale_delta(delta, 0, shift), 0);
    if shift == 0 {
        assert_eq!(u128::from(ns), (u128::from(delta) * u128::from(mul)) >> 32);
    }
    if shift <= 0 {
        assert!(ns <= delta >> shift.unsigned_abs().min(63));
        // monotonic in the delta (a left shift can wrap the delta, so only without one)
        assert!(scale_delta(delta.saturating_add(more), mul, shift) >= ns);
    }
    assert!(scale_delta(delta, mul.saturating_add(more_mul), shift) >= ns);

    let khz = tsc_khz(mul, shift);
    if mul == 0 {
        assert_eq!(khz, 0);
        return;
    }
    let k0 = tsc_khz(mul, 0);
    assert_eq!(u128::from(k0), (1_000_000u128 << 32) / u128::from(mul));
    // one second of cycles at the reported rate is one second, where nothing wraps
    let s = i32::from(shift);
    let fits = |v: u128| v <= u128::from(u64::MAX);
    // (|shift| <= 31 first: no shift of 32 bits or more is taken here)
    let sensible = (-31..=31).contains(&s);
    let unwrapped = sensible && (s >= 0 || fits(u128::from(k0) << -s));
    if unwrapped && khz != 0 && fits(u128::from(k0) * 1000) && fits(u128::from(khz) * 1000) {
        let ns = u128::from(scale_delta(khz * 1000, mul, shift));
        let err = ((1000 * (1 + (1u128 << s.max(0))) * u128::from(mul)) >> 32) + 2;
        assert!(
            ns <= ONE_SECOND && ns + err >= ONE_SECOND,
            "mul {mul} shift {shift}: {khz} kHz, a second of cycles is {ns} ns"
        );
    }

    let scale = TscScale::new();
    scale.set(k0);
    assert_eq!(scale.khz(), k0);
    if fits(u128::from(k0) * 1000) && k0 != 0 {
        let ns = u128::from(scale.ns(k0 * 1000));
        let err = ((1000 * u128::from(k0)) >> 32) + 2;
        assert!(
            ns <= ONE_SECOND && ns + err >= ONE_SECOND,
            "{k0} kHz: {ns} ns"
        );
    }
    assert!(scale.ns(delta.saturating_add(more)) >= scale.ns(delta));
    scale.set(0);
    assert_eq!(scale.ns(delta), 0);
}

/// A record field a host update sets.
fn update(r: &mut PvclockVcpuTimeInfo, u: &mut Unstructured<'_>) {
    let v: u64 = take(u);
    match take::<u8>(u) % 6 {
        0 => r.version = v as u32,
        1 => r.version = r.version.wrapping_add(1),
        2 => r.tsc_timestamp = v,
        3 => r.system_time = v,
        4 => r.tsc_to_system_mul = v as u32,
        _ => {
            r.tsc_shift = v as i8;
            r.flags = (v >> 8) as u8;
        }
    }
}

fn record(u: &mut Unstructured<'_>) -> PvclockVcpuTimeInfo {
    PvclockVcpuTimeInfo {
        version: take(u),
        tsc_timestamp: take(u),
        system_time: take(u),
        tsc_to_system_mul: take(u),
        tsc_shift: take(u),
        flags: take(u),
        ..Default::default()
    }
}

/// `pvclock::read` while the host rewrites the record: before the reader's n-th TSC read, the
/// host applies the n-th of a list of updates.
fn check_read(u: &mut Unstructured<'_>) {
    let initial = record(u);
    let n = usize::from(take::<u8>(u) % 16);
    let mut states = Vec::with_capacity(n);
    let mut tscs = Vec::with_capacity(n + 1);
    let mut r = initial;
    for _ in 0..n {
        update(&mut r, u);
        states.push(r);
        tscs.push(take::<u64>(u));
    }
    let last_tsc = take::<u64>(u);

    // what the protocol says: the first attempt whose version was even before and unchanged
    // after (the fields read after the host's update of that attempt)
    let mut want = Err(PvclockError::Unstable);
    let mut attempts = MAX_RETRIES as usize;
    let mut v0 = initial.version;
    for i in 0..MAX_RETRIES as usize {
        let rec = states.get(i).or(states.last()).copied().unwrap_or(initial);
        let tsc = tscs.get(i).copied().unwrap_or(last_tsc);
        if v0 & 1 == 0 && v0 == rec.version {
            want = if rec.tsc_to_system_mul == 0 {
                Err(PvclockError::NotRunning)
            } else {
                let delta = tsc.wrapping_sub(rec.tsc_timestamp);
                let delta = if (delta as i64) < 0 { 0 } else { delta };
                Ok(Reading {
                    ns: rec.system_time.wrapping_add(scale_delta(
                        delta,
                        rec.tsc_to_system_mul,
                        rec.tsc_shift,
                    )),
                    flags: rec.flags,
                    mul: rec.tsc_to_system_mul,
                    shift: rec.tsc_shift,
                })
            };
            attempts = i + 1;
            break;
        }
        v0 = rec.version;
    }

    let cell = UnsafeCell::new(initial);
    let calls = Cell::new(0usize);
    let rdtsc = || {
        let i = calls.get();
        calls.set(i + 1);
        if let Some(s) = states.get(i) {
            // SAFETY: single-threaded; the reader only reads the record through volatile
            // pointers, never while this closure runs.
            unsafe { *cell.get() = *s };
        }
        tscs.get(i).copied().unwrap_or(last_tsc)
    };
    // SAFETY: the record lives in `cell` for the whole call.
    let got = unsafe { pvclock::read(cell.get(), rdtsc) };
    assert_eq!(got, want, "record {initial:?} updated to {states:?}");
    assert_eq!(calls.get(), attempts, "one TSC read per attempt");
}

fn check_wall(u: &mut Unstructured<'_>) {
    let w = PvclockWallClock {
        version: take(u),
        sec: take(u),
        nsec: take(u),
    };
    // SAFETY: a live local record nobody else writes.
    let got = unsafe { pvclock::read_wall(&w) };
    if w.version & 1 == 0 {
        assert_eq!(got, Ok((w.sec, w.nsec)));
    } else {
        assert_eq!(
            got,
            Err(PvclockError::Unstable),
            "an odd version is never accepted"
        );
    }
}

/// `read_versioned` over a script of version reads (the last one repeats), and the steal clock's
/// clamp over its readings.
fn check_versioned(u: &mut Unstructured<'_>, steal: &Monotonic, last_steal: &mut u64) {
    let script: Vec<u32> = (0..take::<u8>(u) % 32).map(|_| take(u)).collect();
    let at = |i: usize| script.get(i).or(script.last()).copied().unwrap_or(0);
    let reads = Cell::new(0usize);
    let fields = Cell::new(0usize);
    let got = read_versioned(
        || {
            let i = reads.get();
            reads.set(i + 1);
            at(i)
        },
        || {
            let n = fields.get();
            fields.set(n + 1);
            n
        },
    );
    let want = (0..MAX_RETRIES as usize)
        .find(|&i| at(2 * i) & 1 == 0 && at(2 * i) == at(2 * i + 1))
        .ok_or(Unstable);
    assert_eq!(got, want, "{script:?}");
    let attempts = want.map_or(MAX_RETRIES as usize, |i| i + 1);
    assert_eq!((reads.get(), fields.get()), (2 * attempts, attempts));

    // a steal clock: whatever the record says, never less than before
    let read = got.map(|i| at(2 * i) as u64 * 1000 + take::<u16>(u) as u64);
    let now = steal.clamp(read.unwrap_or(0));
    assert!(now >= *last_steal);
    *last_steal = now;
}

/// A `Clock` over a record the host rewrites between readings (the real TSC drives it).
fn check_clock(u: &mut Unstructured<'_>) {
    let rec = UnsafeCell::new(record(u));
    // SAFETY: single-threaded; nothing reads the record meanwhile.
    unsafe { (*rec.get()).version &= !1 };
    let stable = take::<bool>(u);
    let c = Clock::new();
    // SAFETY: the record lives in `rec` until `c.stop()` below.
    let Ok(first) = (unsafe { pvclock::read(rec.get(), pvops::arch::rdtsc_ordered) }) else {
        return;
    };
    // SAFETY: as above.
    unsafe { c.start(rec.get(), first, stable) };
    assert_eq!(c.tsc_khz(), tsc_khz(first.mul, first.shift));
    let mut clamped = 0;
    for _ in 0..16 {
        if u.is_empty() {
            break;
        }
        // SAFETY: single-threaded; the clock reads the record only inside `now`.
        update(unsafe { &mut *rec.get() }, u);
        // SAFETY: as above.
        let r = unsafe { *rec.get() };
        let now = c.now();
        let vouched = stable
            && r.flags & PVCLOCK_TSC_STABLE_BIT != 0
            && r.version & 1 == 0
            && r.tsc_to_system_mul != 0;
        if !vouched {
            assert!(now >= clamped, "the clock went back: {clamped} then {now}");
            clamped = now;
        }
        let _ = c.since_start();
    }
    c.stop();
    assert_eq!(c.now(), 0, "a stopped clock reads 0");
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let (delta, more): (u64, u64) = (take(&mut u), take(&mut u));
    let (mul, more_mul): (u32, u32) = (take(&mut u), take(&mut u));
    check_scale(delta, more, mul, more_mul, take(&mut u));
    check_read(&mut u);
    check_wall(&mut u);
    let steal = Monotonic::new();
    let mut last = 0;
    for _ in 0..4 {
        check_versioned(&mut u, &steal, &mut last);
    }
    check_clock(&mut u);
});
