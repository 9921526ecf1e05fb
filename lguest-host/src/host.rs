//! The lguest host proper: what services the guest's `LHCALL_*` (the port specified in
//! `backends/src/lguest.md`). It owns the guest's registered `lguest_data`, drains the async
//! ring before every synchronous call, keeps `time` / `time_tsc` / `tsc_khz`, runs the one-shot
//! clockevent, and checks every page-table notification against the guest's memory.
//!
//! It knows the vCPU only through [`Vcpu`] and guest memory only through [`GuestRam`], so the
//! unit tests below run it without KVM.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pvops_backends::lguest::abi::{
    LguestData, HCALL_FREE, LHCALL_FLUSH_ASYNC, LHCALL_FLUSH_TLB, LHCALL_HALT, LHCALL_LGUEST_INIT,
    LHCALL_NEW_PGTABLE, LHCALL_RING_SIZE, LHCALL_SEND_INTERRUPTS, LHCALL_SET_CLOCKEVENT,
    LHCALL_SET_PGD, LHCALL_SET_PMD, LHCALL_SET_PTE, LHCALL_SHUTDOWN, X86_EFLAGS_IF,
};

/// What the host answers a refused call (no `lguest_data` yet, a user-mode caller, a bad
/// address): -EPERM.
pub const REFUSED: i64 = -1;
/// What it answers an unknown call: -ENOSYS.
pub const UNKNOWN: i64 = -38;

/// The vCPU, as far as the host needs it (stopped in a hypercall exit while asked).
pub trait Vcpu {
    /// The guest's TSC now.
    fn guest_tsc(&self) -> Option<u64>;
    /// The guest-physical address of guest-virtual `va` under the current page tables.
    fn translate(&self, va: u64) -> Option<u64>;
    /// The CR3 the vCPU runs with.
    fn cr3(&self) -> Option<u64>;
}

/// Guest RAM as mapped in the launcher: guest-physical 0 … `size`.
#[derive(Clone, Copy, Debug)]
pub struct GuestRam {
    /// Host address of guest-physical 0.
    pub base: usize,
    /// Bytes.
    pub size: u64,
}

impl GuestRam {
    /// Host address of `len` bytes at `pa`, if all of them are RAM.
    pub fn host(&self, pa: u64, len: u64) -> Option<usize> {
        (pa.checked_add(len)? <= self.size).then(|| self.base + pa as usize)
    }

    /// The u64 at `pa` (8-aligned).
    pub fn read_u64(&self, pa: u64) -> Option<u64> {
        if !pa.is_multiple_of(8) {
            return None;
        }
        let p = self.host(pa, 8)? as *const AtomicU64;
        // SAFETY: inside guest RAM, aligned; the guest may write it concurrently (atomic).
        Some(unsafe { (*p).load(Ordering::Relaxed) })
    }
}

/// Counters the launcher prints at exit.
#[derive(Debug, Default)]
pub struct Stats {
    /// Synchronous hypercalls by number (0–31).
    pub sync: [u64; 32],
    /// Ring entries run, by number.
    pub ring: [u64; 32],
    /// Page-table entry notifications checked against guest memory / found holding the value.
    pub entries: (u64, u64),
    /// CR3 notifications checked / matching the vCPU's CR3.
    pub cr3: (u64, u64),
    /// Interrupt requests (`LHCALL_SEND_INTERRUPTS`) that found one pending.
    pub irqs_sent: u64,
    /// Refused calls.
    pub refused: u64,
    /// The guest-physical addresses `lguest_data` was registered at, in order.
    pub registered_at: Vec<u64>,
}

/// The one-shot clockevent: a thread that fires virtual IRQ 0 at the deadline.
#[derive(Debug, Default)]
pub struct Clockevent {
    deadline: Mutex<Option<Instant>>,
    wake: Condvar,
    /// Expiries so far.
    pub fired: AtomicU64,
    /// Virtual IRQ 0 raised and not yet asked for.
    pub pending: AtomicBool,
    /// Host address of the registered `lguest_data` (0: none).
    data: AtomicUsize,
    stop: AtomicBool,
}

impl Clockevent {
    /// Start the timer thread.
    pub fn spawn() -> Arc<Clockevent> {
        let c = Arc::new(Clockevent::default());
        let t = c.clone();
        std::thread::spawn(move || t.run());
        c
    }

    fn run(&self) {
        let mut dl = self.deadline.lock().unwrap();
        while !self.stop.load(Ordering::Relaxed) {
            match *dl {
                None => dl = self.wake.wait(dl).unwrap(),
                Some(t) if Instant::now() < t => {
                    dl = self.wake.wait_timeout(dl, t - Instant::now()).unwrap().0
                }
                Some(_) => {
                    *dl = None;
                    self.fire();
                }
            }
        }
    }

    /// Raise virtual IRQ 0: with the guest's virtual IF off, mark it pending in `lguest_data`
    /// (the guest asks for it with `LHCALL_SEND_INTERRUPTS` when it enables).
    fn fire(&self) {
        self.fired.fetch_add(1, Ordering::Relaxed);
        self.pending.store(true, Ordering::Relaxed);
        let p = self.data.load(Ordering::Acquire);
        if p != 0 {
            // SAFETY: the registered page, inside guest RAM (checked at LGUEST_INIT).
            let d = unsafe { &*(p as *const LguestData) };
            if d.irq_enabled.load(Ordering::Relaxed) & X86_EFLAGS_IF == 0 {
                d.irq_pending.store(X86_EFLAGS_IF as i32, Ordering::Relaxed);
            }
        }
    }

    /// Arm `delta_ns` from now (0: stop).
    pub fn set(&self, delta_ns: u64) {
        *self.deadline.lock().unwrap() =
            (delta_ns != 0).then(|| Instant::now() + Duration::from_nanos(delta_ns));
        self.wake.notify_all();
    }

    /// End the thread.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.set(0);
    }
}

/// The lguest host of one guest.
pub struct Host {
    ram: GuestRam,
    /// Guest-physical address of the registered `lguest_data`.
    data_pa: Option<u64>,
    cursor: usize,
    tsc_khz: u32,
    /// What happened so far.
    pub stats: Stats,
    /// The one-shot timer.
    pub clock: Arc<Clockevent>,
    /// Set by `LHCALL_SHUTDOWN`: the guest's message.
    pub shutdown: Option<String>,
    time_version: AtomicU32,
}

impl Host {
    /// A host for `ram`, announcing a TSC of `tsc_khz`.
    pub fn new(ram: GuestRam, tsc_khz: u32, clock: Arc<Clockevent>) -> Host {
        Host {
            ram,
            data_pa: None,
            cursor: 0,
            tsc_khz,
            stats: Stats::default(),
            clock,
            shutdown: None,
            time_version: AtomicU32::new(0),
        }
    }

    fn data(&self) -> Option<&LguestData> {
        let pa = self.data_pa?;
        let p = self.ram.host(pa, 4096)?;
        // SAFETY: a page of guest RAM the guest registered (checked to lie inside RAM); its
        // fields are atomics, so the guest writing them concurrently is fine.
        Some(unsafe { &*(p as *const LguestData) })
    }

    /// Whether the guest has registered `lguest_data`.
    pub fn registered(&self) -> bool {
        self.data_pa.is_some()
    }

    /// Write `time` (CLOCK_REALTIME) and the guest TSC it was taken at, version-protected.
    fn write_time(&self, vcpu: &dyn Vcpu) {
        let Some(d) = self.data() else { return };
        let t0 = SystemTime::now();
        let Some(tsc) = vcpu.guest_tsc() else { return };
        let t1 = SystemTime::now();
        // the midpoint of the two reads around the TSC's
        let a = t0.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos() as u64;
        let b = t1.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos() as u64;
        let ns = a + b.saturating_sub(a) / 2;
        let v = self.time_version.fetch_add(2, Ordering::Relaxed);
        d.time_version.store(v | 1, Ordering::Release);
        d.time.tv_sec.store(ns / 1_000_000_000, Ordering::Relaxed);
        d.time.tv_nsec.store(ns % 1_000_000_000, Ordering::Relaxed);
        d.time_tsc.store(tsc, Ordering::Relaxed);
        d.time_version.store(v + 2, Ordering::Release);
    }

    /// Check a page-table notification: the entry at guest-virtual `va` holds `value`, but for
    /// the Accessed and Dirty bits, which the hardware's own page walks may have set since.
    fn check_entry(&mut self, vcpu: &dyn Vcpu, va: u64, value: u64) {
        const ACCESSED_DIRTY: u64 = 0x60;
        self.stats.entries.0 += 1;
        let held = vcpu.translate(va).and_then(|pa| self.ram.read_u64(pa));
        if held.map(|h| h & !ACCESSED_DIRTY) == Some(value & !ACCESSED_DIRTY) {
            self.stats.entries.1 += 1;
        }
    }

    /// Run one call (from the ring or synchronous); `None`: unknown.
    fn run(&mut self, vcpu: &dyn Vcpu, nr: u64, a: [u64; 4]) -> Option<i64> {
        Some(match nr {
            LHCALL_FLUSH_ASYNC => 0,
            LHCALL_NEW_PGTABLE => {
                self.stats.cr3.0 += 1;
                if vcpu.cr3() == Some(a[0] & !(1 << 63)) {
                    self.stats.cr3.1 += 1;
                }
                0
            }
            LHCALL_FLUSH_TLB => 0,
            LHCALL_SET_PTE | LHCALL_SET_PMD | LHCALL_SET_PGD => {
                self.check_entry(vcpu, a[0], a[1]);
                0
            }
            LHCALL_SET_CLOCKEVENT => {
                self.clock.set(a[0]);
                0
            }
            LHCALL_HALT => 0,
            LHCALL_SEND_INTERRUPTS => {
                let d = self.data()?;
                // delivered only to a guest whose virtual IF is on; until then it stays pending
                if d.irq_enabled.load(Ordering::Relaxed) & X86_EFLAGS_IF != 0 {
                    d.irq_pending.store(0, Ordering::Relaxed);
                    let sent = self.clock.pending.swap(false, Ordering::Relaxed);
                    self.stats.irqs_sent += u64::from(sent);
                }
                0
            }
            _ => return None,
        })
    }

    /// Run the ring from the host's cursor up to the first free slot, in order.
    fn drain(&mut self, vcpu: &dyn Vcpu) {
        for _ in 0..LHCALL_RING_SIZE {
            let Some(d) = self.data() else { return };
            let i = self.cursor;
            if d.hcall_status[i].load(Ordering::Acquire) == HCALL_FREE {
                return;
            }
            let s = &d.hcalls[i];
            let nr = s.arg0.load(Ordering::Relaxed);
            let a = [
                s.arg1.load(Ordering::Relaxed),
                s.arg2.load(Ordering::Relaxed),
                s.arg3.load(Ordering::Relaxed),
                s.arg4.load(Ordering::Relaxed),
            ];
            d.hcall_status[i].store(HCALL_FREE, Ordering::Release);
            self.cursor = (i + 1) % LHCALL_RING_SIZE;
            if let Some(n) = self.stats.ring.get_mut(nr as usize) {
                *n += 1;
            }
            let _ = self.run(vcpu, nr, a);
        }
    }

    /// A synchronous hypercall from a vCPU at privilege level `cpl`: its answer.
    pub fn hypercall(&mut self, vcpu: &dyn Vcpu, cpl: u32, nr: u64, a: [u64; 4]) -> i64 {
        if let Some(n) = self.stats.sync.get_mut(nr as usize) {
            *n += 1;
        }
        if cpl != 0 || (nr != LHCALL_LGUEST_INIT && !self.registered()) {
            self.stats.refused += 1;
            return REFUSED;
        }
        self.drain(vcpu);
        let rc = match nr {
            LHCALL_LGUEST_INIT if a[0] == 0 => {
                self.data_pa = None;
                self.clock.data.store(0, Ordering::Release);
                self.clock.set(0);
                return 0;
            }
            LHCALL_LGUEST_INIT => {
                if self.registered()
                    || !a[0].is_multiple_of(4096)
                    || self.ram.host(a[0], 4096).is_none()
                {
                    self.stats.refused += 1;
                    return REFUSED;
                }
                self.data_pa = Some(a[0]);
                self.stats.registered_at.push(a[0]);
                self.cursor = 0;
                let d = self.data().expect("checked above");
                d.tsc_khz.store(self.tsc_khz, Ordering::Relaxed);
                d.reserve_mem.store(0, Ordering::Relaxed);
                d.irq_pending.store(0, Ordering::Relaxed);
                let host = self.ram.host(a[0], 4096).unwrap_or(0);
                self.clock.data.store(host, Ordering::Release);
                self.clock.pending.store(false, Ordering::Relaxed);
                0
            }
            LHCALL_SHUTDOWN => {
                let msg = self
                    .ram
                    .host(a[0], 128)
                    .map(|p| {
                        // SAFETY: 128 bytes inside guest RAM.
                        let bytes = unsafe { std::slice::from_raw_parts(p as *const u8, 128) };
                        let end = bytes.iter().position(|&b| b == 0).unwrap_or(128);
                        String::from_utf8_lossy(&bytes[..end]).into_owned()
                    })
                    .unwrap_or_default();
                self.shutdown = Some(msg);
                0
            }
            _ => self.run(vcpu, nr, a).unwrap_or(UNKNOWN),
        };
        self.write_time(vcpu);
        rc
    }

    /// One line per kind of call, for the log.
    pub fn summary(&self) -> String {
        let names = [
            (LHCALL_FLUSH_ASYNC, "FLUSH_ASYNC"),
            (LHCALL_LGUEST_INIT, "LGUEST_INIT"),
            (LHCALL_NEW_PGTABLE, "NEW_PGTABLE"),
            (LHCALL_FLUSH_TLB, "FLUSH_TLB"),
            (LHCALL_SET_CLOCKEVENT, "SET_CLOCKEVENT"),
            (LHCALL_HALT, "HALT"),
            (LHCALL_SET_PMD, "SET_PMD"),
            (LHCALL_SET_PTE, "SET_PTE"),
            (LHCALL_SET_PGD, "SET_PGD"),
            (LHCALL_SEND_INTERRUPTS, "SEND_INTERRUPTS"),
        ];
        let mut s = String::from("hypercalls (sync/ring):");
        for (nr, name) in names {
            let (y, r) = (self.stats.sync[nr as usize], self.stats.ring[nr as usize]);
            if y + r != 0 {
                s += &format!(" {name}={y}/{r}");
            }
        }
        s += &format!(
            "; entries checked={} holding={}; cr3 checked={} matching={}; refused={}; clockevent fired={}; interrupts sent={}",
            self.stats.entries.0,
            self.stats.entries.1,
            self.stats.cr3.0,
            self.stats.cr3.1,
            self.stats.refused,
            self.clock.fired.load(Ordering::Relaxed),
            self.stats.irqs_sent,
        );
        let at: Vec<String> = self
            .stats
            .registered_at
            .iter()
            .map(|pa| format!("{pa:#x}"))
            .collect();
        s += &format!(
            "; lguest_data held={}",
            if self.registered() { "yes" } else { "no" }
        );
        s += &format!(
            "; lguest_data registered at {}",
            if at.is_empty() {
                "-".into()
            } else {
                at.join(",")
            }
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guest RAM as a Vec; identity translation; a TSC that counts calls.
    struct Fake {
        cr3: u64,
        tsc: AtomicU64,
    }

    impl Vcpu for Fake {
        fn guest_tsc(&self) -> Option<u64> {
            Some(self.tsc.fetch_add(1000, Ordering::Relaxed) + 1000)
        }
        fn translate(&self, va: u64) -> Option<u64> {
            Some(va)
        }
        fn cr3(&self) -> Option<u64> {
            Some(self.cr3)
        }
    }

    fn setup() -> (Vec<u64>, Fake) {
        (
            vec![0u64; 4 * 4096 / 8],
            Fake {
                cr3: 0x2000,
                tsc: AtomicU64::new(0),
            },
        )
    }

    #[test]
    fn registers_fills_and_refuses() {
        let (mut mem, cpu) = setup();
        let ram = GuestRam {
            base: mem.as_mut_ptr() as usize,
            size: (mem.len() * 8) as u64,
        };
        let mut h = Host::new(ram, 2_500_000, Arc::new(Clockevent::default()));
        assert_eq!(h.hypercall(&cpu, 0, LHCALL_FLUSH_ASYNC, [0; 4]), REFUSED);
        assert_eq!(
            h.hypercall(&cpu, 0, LHCALL_LGUEST_INIT, [0x100, 0, 0, 0]),
            REFUSED
        );
        assert_eq!(
            h.hypercall(&cpu, 0, LHCALL_LGUEST_INIT, [0x4000, 0, 0, 0]),
            REFUSED
        );
        assert_eq!(
            h.hypercall(&cpu, 3, LHCALL_LGUEST_INIT, [0x1000, 0, 0, 0]),
            REFUSED
        );
        // the guest initialises its ring before registering
        // SAFETY: page 1 of `mem`, which outlives `d`; the fields are atomics.
        let d = unsafe { &*((ram.base + 0x1000) as *const LguestData) };
        for s in &d.hcall_status {
            s.store(HCALL_FREE, Ordering::Relaxed);
        }
        assert_eq!(
            h.hypercall(&cpu, 0, LHCALL_LGUEST_INIT, [0x1000, 0, 0, 0]),
            0
        );
        assert_eq!(d.tsc_khz.load(Ordering::Relaxed), 2_500_000);
        assert_eq!(d.time_version.load(Ordering::Relaxed), 2);
        assert_eq!(d.time_tsc.load(Ordering::Relaxed), 1000);
        assert!(d.time.tv_sec.load(Ordering::Relaxed) > 1_700_000_000);
        assert_eq!(
            h.hypercall(&cpu, 0, LHCALL_LGUEST_INIT, [0x1000, 0, 0, 0]),
            REFUSED,
            "twice"
        );
        assert_eq!(h.hypercall(&cpu, 0, 77, [0; 4]), UNKNOWN);
        assert_eq!(
            h.hypercall(&cpu, 0, LHCALL_NEW_PGTABLE, [0x2000, 0, 0, 0]),
            0
        );
        assert_eq!(h.stats.cr3, (1, 1));

        // Ring: two SET_PTEs, run in order before the synchronous call; one holds its value.
        mem[0x3000 / 8] = 0xabc;
        for (i, (va, v)) in [(0x3000u64, 0xabcu64), (0x3008, 0x999)]
            .into_iter()
            .enumerate()
        {
            let s = &d.hcalls[i];
            s.arg0.store(LHCALL_SET_PTE, Ordering::Relaxed);
            s.arg1.store(va, Ordering::Relaxed);
            s.arg2.store(v, Ordering::Relaxed);
            d.hcall_status[i].store(0, Ordering::Release);
        }
        assert_eq!(h.hypercall(&cpu, 0, LHCALL_FLUSH_ASYNC, [0; 4]), 0);
        assert_eq!(h.stats.ring[LHCALL_SET_PTE as usize], 2);
        assert_eq!(h.stats.entries, (2, 1));
        assert!(d
            .hcall_status
            .iter()
            .all(|s| s.load(Ordering::Relaxed) == HCALL_FREE));
        // Synchronous: the hardware set Accessed and Dirty since the store (still holding); a
        // frame bit differs (not holding).
        mem[0x3010 / 8] = 0xabc | 0x60;
        assert_eq!(
            h.hypercall(&cpu, 0, LHCALL_SET_PTE, [0x3010, 0xabc, 0, 0]),
            0
        );
        assert_eq!(h.stats.entries, (3, 2));
        assert_eq!(
            h.hypercall(&cpu, 0, LHCALL_SET_PTE, [0x3010, 0xabc | 0x1000, 0, 0]),
            0
        );
        assert_eq!(h.stats.entries, (4, 2));

        assert_eq!(h.hypercall(&cpu, 0, LHCALL_LGUEST_INIT, [0; 4]), 0);
        assert!(!h.registered());
        assert_eq!(h.hypercall(&cpu, 0, LHCALL_FLUSH_ASYNC, [0; 4]), REFUSED);
    }

    #[test]
    fn clockevent_fires_and_is_asked_for() {
        let (mut mem, cpu) = setup();
        let ram = GuestRam {
            base: mem.as_mut_ptr() as usize,
            size: (mem.len() * 8) as u64,
        };
        let clock = Clockevent::spawn();
        let mut h = Host::new(ram, 1_000_000, clock.clone());
        // SAFETY: page 1 of `mem`, which outlives `d`; the fields are atomics.
        let d = unsafe { &*((ram.base + 0x1000) as *const LguestData) };
        for s in &d.hcall_status {
            s.store(HCALL_FREE, Ordering::Relaxed);
        }
        assert_eq!(
            h.hypercall(&cpu, 0, LHCALL_LGUEST_INIT, [0x1000, 0, 0, 0]),
            0
        );
        // virtual IF off: the expiry is held as irq_pending
        d.irq_enabled.store(0, Ordering::Relaxed);
        assert_eq!(
            h.hypercall(&cpu, 0, LHCALL_SET_CLOCKEVENT, [2_000_000, 0, 0, 0]),
            0
        );
        let t0 = Instant::now();
        while clock.fired.load(Ordering::Relaxed) == 0 && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "fired");
        assert_eq!(d.irq_pending.load(Ordering::Relaxed), X86_EFLAGS_IF as i32);
        d.irq_enabled.store(X86_EFLAGS_IF, Ordering::Relaxed);
        assert_eq!(h.hypercall(&cpu, 0, LHCALL_SEND_INTERRUPTS, [0; 4]), 0);
        assert_eq!(h.stats.irqs_sent, 1);
        assert_eq!(d.irq_pending.load(Ordering::Relaxed), 0);
        clock.shutdown();
    }
}
