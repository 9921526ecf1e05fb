//! The pvclock record KVM's kvmclock and Xen's `vcpu_info.time` share
//! (shared/docs/abi-kvm.md §4–5), and its reader.
//!
//! The host updates a record with a version seqlock: it stores an odd version, writes the
//! fields, then stores the next even one. A reader takes the version, reads the TSC and the
//! fields, and retries if the version was odd or changed. Scaling uses a 64×64→128 multiply
//! (no division), and a record with a zero multiplier (never registered, or emulated away) is
//! refused rather than read as time zero.

use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};

use pvops::arch;

use crate::time::{read_versioned, Monotonic};

/// `struct pvclock_vcpu_time_info` (32 bytes, packed in the ABI; naturally aligned here).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PvclockVcpuTimeInfo {
    /// Odd while the host updates the record.
    pub version: u32,
    /// Padding.
    pub pad0: u32,
    /// Guest TSC at the last update.
    pub tsc_timestamp: u64,
    /// Nanoseconds at `tsc_timestamp`.
    pub system_time: u64,
    /// 32.32 fixed-point multiplier from (shifted) TSC cycles to nanoseconds.
    pub tsc_to_system_mul: u32,
    /// Shift applied to the TSC delta before multiplying (negative: right).
    pub tsc_shift: i8,
    /// [`PVCLOCK_TSC_STABLE_BIT`], [`PVCLOCK_GUEST_STOPPED`].
    pub flags: u8,
    /// Padding.
    pub pad: [u8; 2],
}

/// `struct pvclock_wall_clock` (12 bytes): wall time at `system_time` = 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PvclockWallClock {
    /// Odd while the host updates it.
    pub version: u32,
    /// Seconds since the epoch.
    pub sec: u32,
    /// Nanoseconds.
    pub nsec: u32,
}

static_assertions::assert_eq_size!(PvclockVcpuTimeInfo, [u8; 32]);
static_assertions::assert_eq_size!(PvclockWallClock, [u8; 12]);
static_assertions::const_assert_eq!(
    core::mem::offset_of!(PvclockVcpuTimeInfo, tsc_to_system_mul),
    24
);
static_assertions::const_assert_eq!(core::mem::offset_of!(PvclockVcpuTimeInfo, flags), 29);

/// Readings from different vCPUs are mutually monotonic (when the interface vouches for it).
pub const PVCLOCK_TSC_STABLE_BIT: u8 = 1 << 0;
/// The host paused the guest.
pub const PVCLOCK_GUEST_STOPPED: u8 = 1 << 1;

/// Why a record could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PvclockError {
    /// The multiplier is zero: nothing is registered there.
    NotRunning,
    /// The version never settled within [`MAX_RETRIES`](crate::time::MAX_RETRIES).
    Unstable,
}

/// `delta` TSC cycles in nanoseconds under `mul`/`shift` (Linux's `pvclock_scale_delta`).
pub fn scale_delta(delta: u64, mul: u32, shift: i8) -> u64 {
    let d = if shift < 0 {
        delta >> shift.unsigned_abs().min(63)
    } else {
        delta << (shift as u32).min(63)
    };
    ((u128::from(d) * u128::from(mul)) >> 32) as u64
}

/// The TSC frequency a record implies, in kHz (0 for a zero multiplier). The one division is by
/// a 32-bit value, at setup, not on a clock read.
pub fn tsc_khz(mul: u32, shift: i8) -> u64 {
    if mul == 0 {
        return 0;
    }
    let khz = (1_000_000u64 << 32) / u64::from(mul);
    if shift < 0 {
        khz << shift.unsigned_abs().min(31)
    } else {
        khz >> (shift as u32).min(31)
    }
}

/// One consistent reading of a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reading {
    /// Nanoseconds (the record's timeline).
    pub ns: u64,
    /// The record's flags.
    pub flags: u8,
    /// The multiplier and shift in force.
    pub mul: u32,
    /// The shift in force.
    pub shift: i8,
}

/// Read a record with the version protocol, `rdtsc` supplying the (ordered) TSC.
///
/// # Safety
///
/// `rec` points to a live record the host (or a test) may update concurrently.
pub unsafe fn read(
    rec: *const PvclockVcpuTimeInfo,
    rdtsc: impl Fn() -> u64,
) -> Result<Reading, PvclockError> {
    let (tsc, r) = read_versioned(
        // SAFETY: `rec` is live (caller); volatile because the host writes it behind the
        // compiler's back (likewise below).
        || unsafe { core::ptr::addr_of!((*rec).version).read_volatile() },
        // SAFETY: as above.
        || (rdtsc(), unsafe { rec.read_volatile() }),
    )
    .map_err(|_| PvclockError::Unstable)?;
    if r.tsc_to_system_mul == 0 {
        return Err(PvclockError::NotRunning);
    }
    let delta = tsc.wrapping_sub(r.tsc_timestamp);
    // A TSC behind the record's timestamp (another vCPU's record, an unsynchronised TSC) counts
    // as no time elapsed rather than wrapping to centuries.
    let delta = if (delta as i64) < 0 { 0 } else { delta };
    Ok(Reading {
        ns: r
            .system_time
            .wrapping_add(scale_delta(delta, r.tsc_to_system_mul, r.tsc_shift)),
        flags: r.flags,
        mul: r.tsc_to_system_mul,
        shift: r.tsc_shift,
    })
}

/// Read a wall-clock record with the same protocol: (seconds, nanoseconds).
///
/// # Safety
///
/// `rec` points to a live record.
pub unsafe fn read_wall(rec: *const PvclockWallClock) -> Result<(u32, u32), PvclockError> {
    read_versioned(
        // SAFETY: `rec` is live (caller); volatile as in `read`.
        || unsafe { core::ptr::addr_of!((*rec).version).read_volatile() },
        // SAFETY: as above.
        || unsafe { rec.read_volatile() },
    )
    .map(|w| (w.sec, w.nsec))
    .map_err(|_| PvclockError::Unstable)
}

/// The clock a backend's timer ops read: a registered pvclock record (KVM's kvmclock, Xen's
/// time area), read with the version protocol, clamped to stay monotonic unless the interface
/// and the record both vouch for cross-vCPU consistency, and offset so that `since_start`
/// begins near zero.
#[derive(Debug)]
pub struct Clock {
    rec: AtomicPtr<PvclockVcpuTimeInfo>,
    /// The interface says the record's stable flag can be trusted.
    stable: AtomicBool,
    last: Monotonic,
    offset: AtomicU64,
    tsc_khz: AtomicU64,
}

impl Clock {
    /// A clock with no record (it reads 0).
    pub const fn new() -> Clock {
        Clock {
            rec: AtomicPtr::new(core::ptr::null_mut()),
            stable: AtomicBool::new(false),
            last: Monotonic::new(),
            offset: AtomicU64::new(0),
            tsc_khz: AtomicU64::new(0),
        }
    }

    /// Start reading `rec`, whose `first` reading was just taken; `stable`: the interface
    /// vouches for the record's stable flag.
    ///
    /// # Safety
    ///
    /// `rec` stays registered and mapped until [`Clock::stop`].
    pub unsafe fn start(&self, rec: *mut PvclockVcpuTimeInfo, first: Reading, stable: bool) {
        self.stable.store(stable, Ordering::Relaxed);
        self.tsc_khz
            .store(tsc_khz(first.mul, first.shift), Ordering::Relaxed);
        self.offset.store(first.ns, Ordering::Relaxed);
        self.rec.store(rec, Ordering::Release);
    }

    /// Stop reading the record (it reads 0 from now on).
    pub fn stop(&self) {
        self.rec.store(core::ptr::null_mut(), Ordering::Release);
    }

    /// Nanoseconds on the record's timeline (0 without a record).
    pub fn now(&self) -> u64 {
        let rec = self.rec.load(Ordering::Acquire);
        if rec.is_null() {
            return 0;
        }
        // SAFETY: `start`'s contract keeps the record registered and mapped until `stop`.
        unsafe { self.now_on(rec) }
    }

    /// [`Clock::now`] from `rec`, another record on the same timeline: where the host keeps one
    /// record per vCPU (kvmclock), the reading CPU's own, which is the only one its TSC may be
    /// applied to unless the records are stable (KVM's ABI). Same stable test and clamp.
    ///
    /// # Safety
    ///
    /// `rec` is a record the host keeps updating, registered and mapped for the whole call.
    pub unsafe fn now_on(&self, rec: *const PvclockVcpuTimeInfo) -> u64 {
        // SAFETY: the caller's contract.
        match unsafe { read(rec, arch::rdtsc_ordered) } {
            Ok(r)
                if self.stable.load(Ordering::Relaxed) && r.flags & PVCLOCK_TSC_STABLE_BIT != 0 =>
            {
                r.ns
            }
            Ok(r) => self.last.clamp(r.ns),
            Err(_) => self.last.clamp(0),
        }
    }

    /// Nanoseconds since [`Clock::start`].
    pub fn since_start(&self) -> u64 {
        self.since_start_at(self.now())
    }

    /// Nanoseconds since [`Clock::start`] at `ns`, a reading of this clock's timeline (from
    /// [`Clock::now`] or [`Clock::now_on`]).
    pub fn since_start_at(&self, ns: u64) -> u64 {
        ns.saturating_sub(self.offset.load(Ordering::Relaxed))
    }

    /// The TSC frequency the record implies, in kHz.
    pub fn tsc_khz(&self) -> u64 {
        self.tsc_khz.load(Ordering::Relaxed)
    }
}

impl Default for Clock {
    fn default() -> Clock {
        Clock::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::cell::Cell;

    fn rec(mul: u32, shift: i8) -> PvclockVcpuTimeInfo {
        PvclockVcpuTimeInfo {
            version: 2,
            tsc_timestamp: 1_000_000,
            system_time: 5_000_000_000,
            tsc_to_system_mul: mul,
            tsc_shift: shift,
            ..Default::default()
        }
    }

    #[test]
    fn worked_example_from_the_abi() {
        // mul = 3 512 682 389, shift = -1: 2 445 406 kHz
        assert_eq!(tsc_khz(3_512_682_389, -1), 2_445_406);
        assert_eq!(tsc_khz(0, 0), 0);
    }

    #[test]
    fn scaling() {
        // 1 GHz: mul 2^32 with shift 0 is 1 ns per cycle
        assert_eq!(scale_delta(1_000, 1 << 31, 1), 1_000);
        // 2.445 GHz: one second of cycles
        let ns = scale_delta(2_445_406_000, 3_512_682_389, -1);
        assert!(ns.abs_diff(1_000_000_000) < 1_000, "{ns}");
        // huge deltas do not overflow (128-bit product)
        assert!(scale_delta(u64::MAX >> 1, u32::MAX, 0) > 0);
    }

    #[test]
    fn read_consistent_record() {
        let r = rec(1 << 31, 1);
        // SAFETY: a live local record.
        let got = unsafe { read(&r, || 1_000_500) }.unwrap();
        assert_eq!(got.ns, 5_000_000_500);
    }

    #[test]
    fn zero_multiplier_is_refused() {
        let r = rec(0, 0);
        // SAFETY: a live local record.
        assert_eq!(unsafe { read(&r, || 0) }, Err(PvclockError::NotRunning));
    }

    #[test]
    fn odd_version_and_torn_reads_retry() {
        // The "host" updates the record while the reader is between its two version reads:
        // the first attempts must be thrown away and the final reading must be the new one.
        let r = core::cell::UnsafeCell::new(rec(1 << 31, 1));
        let calls = Cell::new(0);
        let rdtsc = || {
            calls.set(calls.get() + 1);
            let p = r.get();
            // SAFETY: single-threaded test; the reader reads through volatile pointers.
            unsafe {
                match calls.get() {
                    1 => (*p).version = 3, // update in progress
                    2 => {
                        (*p).system_time = 7_000_000_000; // torn: fields change...
                        (*p).version = 4; // ...and the version moves on
                    }
                    _ => {}
                }
            }
            1_000_000
        };
        // SAFETY: the record outlives the call.
        let got = unsafe { read(r.get(), rdtsc) }.unwrap();
        assert_eq!(got.ns, 7_000_000_000);
        assert_eq!(calls.get(), 3);
    }

    #[test]
    fn a_record_that_never_settles_is_an_error() {
        let r = core::cell::UnsafeCell::new(rec(1 << 31, 1));
        let rdtsc = || {
            // SAFETY: single-threaded test.
            unsafe { (*r.get()).version = (*r.get()).version.wrapping_add(2) | 1 };
            0
        };
        // SAFETY: the record outlives the call.
        assert_eq!(unsafe { read(r.get(), rdtsc) }, Err(PvclockError::Unstable));
    }

    #[test]
    fn tsc_behind_the_record_counts_as_no_time() {
        let r = rec(1 << 31, 1);
        // SAFETY: a live local record.
        assert_eq!(unsafe { read(&r, || 999_000) }.unwrap().ns, 5_000_000_000);
    }

    #[test]
    fn clock_over_a_record() {
        let c = Clock::new();
        assert_eq!((c.now(), c.since_start()), (0, 0), "no record, no time");
        let r = core::cell::UnsafeCell::new(rec(1 << 31, 1));
        // SAFETY: a live local record.
        let first = unsafe { read(r.get(), || 1_000_000) }.unwrap();
        // SAFETY: the record outlives `c`'s use of it (stopped below).
        unsafe { c.start(r.get(), first, true) };
        assert_eq!(c.tsc_khz(), 1_000_000);
        // The record is not flagged stable: readings are clamped, so moving the record back in
        // time does not move the clock back.
        let t1 = c.now();
        // SAFETY: single-threaded test.
        unsafe { (*r.get()).system_time -= 1_000_000_000 };
        assert!(c.now() >= t1);
        c.stop();
        assert_eq!(c.now(), 0);
    }

    #[test]
    fn wall_clock() {
        let w = PvclockWallClock {
            version: 4,
            sec: 1_800_000_000,
            nsec: 5,
        };
        // SAFETY: a live local record.
        assert_eq!(unsafe { read_wall(&w) }, Ok((1_800_000_000, 5)));
        let w = PvclockWallClock { version: 5, ..w };
        // SAFETY: a live local record.
        assert_eq!(unsafe { read_wall(&w) }, Err(PvclockError::Unstable));
    }
}
