//! What every backend's time ops share: the version-seqlock read of a record a host updates,
//! the TSC-to-nanoseconds scale, the clamp that keeps a clock monotonic, and the base that
//! carries `sched_clock` across a live switch of backend.

use core::sync::atomic::{compiler_fence, AtomicU64, Ordering};

/// How often a reader retries a record the host keeps updating before giving up.
pub const MAX_RETRIES: u32 = 1000;

/// A record never settled within [`MAX_RETRIES`] reads: its version stayed odd (an update in
/// progress) or kept changing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unstable;

/// Read a record a host updates under a version seqlock (pvclock records, KVM's steal time,
/// lguest's time): the host makes the version odd, writes the fields, then makes it even
/// again. `version` reads the version, `fields` the rest (with whatever else must be taken in
/// the same window, such as the TSC); a reading is kept only when the version was even and the
/// same before and after it. A version that stays odd is never accepted.
pub fn read_versioned<T>(
    mut version: impl FnMut() -> u32,
    mut fields: impl FnMut() -> T,
) -> Result<T, Unstable> {
    for _ in 0..MAX_RETRIES {
        let v0 = version();
        compiler_fence(Ordering::Acquire);
        let value = fields();
        compiler_fence(Ordering::Acquire);
        let v1 = version();
        if v0 & 1 == 0 && v0 == v1 {
            return Ok(value);
        }
        core::hint::spin_loop();
    }
    Err(Unstable)
}

/// The fixed-point factor from TSC cycles to nanoseconds: `ns = cycles * mult >> 32`, with
/// `mult = 10^6 * 2^32 / kHz` computed once (the only division, by a 64-bit value, at setup);
/// a read is one 64×64→128 multiply. Atomic, so a backend keeps one in a `static`.
#[derive(Debug)]
pub struct TscScale {
    khz: AtomicU64,
    mult: AtomicU64,
}

impl TscScale {
    /// A scale for an unknown rate: it reads 0 ns for any cycles.
    pub const fn new() -> TscScale {
        TscScale {
            khz: AtomicU64::new(0),
            mult: AtomicU64::new(0),
        }
    }

    /// Scale by a TSC of `khz` (0: unknown, every reading 0).
    pub fn set(&self, khz: u64) {
        let mult = (1_000_000u64 << 32).checked_div(khz).unwrap_or(0);
        self.khz.store(khz, Ordering::Relaxed);
        self.mult.store(mult, Ordering::Relaxed);
    }

    /// The rate in kHz (0: unknown).
    pub fn khz(&self) -> u64 {
        self.khz.load(Ordering::Relaxed)
    }

    /// `cycles` in nanoseconds.
    pub fn ns(&self, cycles: u64) -> u64 {
        ((u128::from(cycles) * u128::from(self.mult.load(Ordering::Relaxed))) >> 32) as u64
    }
}

impl Default for TscScale {
    fn default() -> TscScale {
        TscScale::new()
    }
}

/// Keeps a clock from going backwards when its readings come from records that are not
/// mutually monotonic (Linux's `last_value` clamp).
#[derive(Debug, Default)]
pub struct Monotonic(AtomicU64);

impl Monotonic {
    /// A clamp that has seen nothing.
    pub const fn new() -> Monotonic {
        Monotonic(AtomicU64::new(0))
    }

    /// `ns`, or the largest value returned so far if that is later.
    pub fn clamp(&self, ns: u64) -> u64 {
        let prev = self.0.fetch_max(ns, Ordering::AcqRel);
        prev.max(ns)
    }

    /// Start again from `ns` (a clock re-anchored at start-up).
    pub fn reset(&self, ns: u64) {
        self.0.store(ns, Ordering::Relaxed);
    }
}

/// What every backend's `sched_clock` adds to its own reading. Each backend counts from its own
/// zero (KVM's, Xen's and lguest's from their start, native's and VMI's from the TSC's), so a
/// live switch would step the clock callers see back or forward; [`continue_clock`] moves this
/// base at the switch so the new backend's readings carry on from the old one's. 0 until the
/// first switch.
static CLOCK_BASE: AtomicU64 = AtomicU64::new(0);

/// A backend's own `sched_clock` reading `own` as callers see it (with the switch base).
pub fn handed_out(own: u64) -> u64 {
    own.wrapping_add(CLOCK_BASE.load(Ordering::Relaxed))
}

/// At a live switch, with every other CPU parked: `old` is the old backend's `sched_clock`
/// and `new` the new one's, read just after (both as handed out). From here on the new
/// backend's readings are moved so that this instant reads `old`: the clock neither steps
/// back nor jumps.
pub fn continue_clock(old: u64, new: u64) {
    CLOCK_BASE.fetch_add(old.wrapping_sub(new), Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::cell::Cell;

    #[test]
    fn a_version_that_stays_odd_is_never_accepted() {
        assert_eq!(read_versioned(|| 3, || 7), Err(Unstable));
        assert_eq!(read_versioned(|| 4, || 7), Ok(7));
    }

    #[test]
    fn a_version_that_moves_during_the_read_retries() {
        let v = Cell::new(2);
        let tries = Cell::new(0);
        let got = read_versioned(
            || v.get(),
            || {
                tries.set(tries.get() + 1);
                if tries.get() == 1 {
                    v.set(4); // the host updated the record under the reader
                }
                tries.get()
            },
        );
        assert_eq!(got, Ok(2), "the first, torn reading is thrown away");
    }

    #[test]
    fn scale() {
        let s = TscScale::new();
        assert_eq!((s.khz(), s.ns(1_000_000)), (0, 0), "unknown rate: 0 ns");
        s.set(2_000_000); // 2 GHz: 0.5 ns per cycle
        assert_eq!(s.ns(2_000_000_000), 1_000_000_000);
        s.set(3_000_000); // 3 GHz: one second of cycles is a second, to the nanosecond
        assert!(s.ns(3_000_000_000).abs_diff(1_000_000_000) <= 1);
        assert!(s.ns(u64::MAX) > 0, "no overflow: 128-bit product");
    }

    #[test]
    fn a_switch_carries_the_clock_on() {
        // the old backend has handed out 5 s; the new one counts from its start, 2 ms ago
        let old = handed_out(5_000_000_000);
        let new = handed_out(2_000_000);
        continue_clock(old, new);
        assert_eq!(
            handed_out(2_000_000),
            old,
            "the switch instant reads the old clock"
        );
        assert_eq!(
            handed_out(3_000_000),
            old + 1_000_000,
            "and runs on at the new one's rate"
        );
        // and back to a backend whose clock is far ahead (native's, since the TSC's reset)
        let old = handed_out(3_000_000);
        continue_clock(old, handed_out(900_000_000_000));
        assert_eq!(handed_out(900_000_000_000), old);
    }

    #[test]
    fn clamp_never_goes_back() {
        let m = Monotonic::new();
        assert_eq!(m.clamp(10), 10);
        assert_eq!(m.clamp(5), 10);
        assert_eq!(m.clamp(12), 12);
    }
}
