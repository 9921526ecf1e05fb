// SPDX-License-Identifier: GPL-2.0

//! Built into the kernel: pvops as the kernel's own paravirt layer.
//!
//! `alternative_instructions()` calls [`pvops_kernel_early`] (kernel/pvops-early.patch) before
//! `apply_alternatives()`, with vmlinux's `.altinstructions`. There, with only the boot CPU
//! running and kernel text still writable, pvops detects, selects and starts its backend, takes
//! a census of the kernel's pv call sites ([`pvops::linux`]), and, for the members it serves,
//! writes each site itself (the backend's inline bytes or a direct call into pvops), flags the
//! site's entries `ALT_FLAG_PVOPS` so that `apply_alternatives()` leaves them alone. Linux's
//! `apply_alternatives()` then computes what it would have written at each of those sites into
//! pvops's copy ([`pvops_kernel_linux_bytes`]): Linux's own bytes, which pvops writes back when
//! root hands the kernel's sites back to Linux at run time ([`pvops_kernel_hand`],
//! `/sys/kernel/pvops/kernel_holder`). Right after, [`pvops_kernel_late`] points the `pv_ops`
//! members pvops serves at pvops's functions (so modules loaded later call pvops), keeping
//! Linux's for the hand-back.
//!
//! What is not available that early is deferred to the initcall (`PvopsGuest::init`, which
//! takes the started backend with [`take_early`]): the other CPUs (not up yet: a backend's
//! per-CPU records are read for CPU 0 only, and again there, so `pv_steal_clock` is taken
//! there), sysfs (`/sys/kernel/pvops/kernel` is written there), the self-test, the patching of
//! pvops's own call sites (under `stop_machine`, as in the module), and the read-back of every
//! kernel site pvops wrote ([`readback`]).
//!
//! Each backend says which of its ops may serve the kernel ([`pvops::Backend::serves_kernel`]):
//! an op that forwards to the kernel's own accessor (Xen PV's CR3, for one) would call itself.
//! Native, KVM, Xen HVM, VMI and lguest serve every member pvops serves, Xen PV the interrupt
//! flag and CR2; of the clocks, KVM's where the kernel reads the same records. Two choices
//! Linux made at boot must be the backend's too ([`linux::LinuxChoices`]): the lock protocol
//! (native, or KVM's paravirt spinlocks around the kernel's paravirt slow path), the I/O delay,
//! and how other CPUs' TLBs are flushed. Members whose signature differs from their op's (the MSR
//! accessors, `cpuid`, the page-table notifications) are reached through the adapters of
//! [`crate::adapters`]. The rest is left to Linux, with the reason. Where the backend sends IPIs
//! itself (KVM's PV send-IPI), the APIC driver's `send_IPI_mask` callbacks become the shim's,
//! which call `irq.send_ipi` ([`take_ipis`], at the initcall); they change hands with the sites.

use core::cell::UnsafeCell;
use core::ffi::{c_int, c_void};
use core::fmt;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use kernel::prelude::*;
use kernel::str::CString;
use pvops::linux::{self, KernelAction, OddSite, Served, Via, ALT_FLAG_PVOPS};
use pvops::{BackendOps, Op, ReadText, Request, PV_OPS};
use pvops_backends::describe::Writer;

use crate::adapters;
use crate::platform::KernelPlatform;
use crate::text::{AlsoSwitched, ReadOnlyText};
use crate::{choose, param, shim, Chosen};

/// At most this many `pv_ops` members (6.12 with every option has about 90).
const MAX_MEMBERS: usize = 128;
/// At most this many 8-byte slots in `pv_ops`.
const MAX_SLOTS: usize = 256;
/// No member at this slot.
const NO_MEMBER: u8 = u8::MAX;

/// One `pv_ops` member and what happened to its sites.
#[derive(Clone, Copy)]
struct Member {
    /// `group.member`.
    name: &'static str,
    /// Byte offset in `pv_ops`.
    offset: u32,
    /// Whether pvops serves it, and if not why.
    served: Served,
    /// Its sites.
    sites: u32,
    /// Sites given the backend's inline bytes.
    inline: u32,
    /// Sites turned into direct calls into pvops.
    direct: u32,
    /// What Linux's `pv_ops` held for it before pvops filled it in (served members).
    linux_fn: usize,
    /// Why the running backend leaves this member, served at boot, to Linux, if it does (a
    /// live switch to a backend that cannot serve it, [`KernelSwitch`]).
    given: Option<&'static str>,
}

/// A kernel site pvops wrote.
#[derive(Clone, Copy)]
struct Written {
    /// Its address.
    addr: usize,
    /// Its member (index into the census's members).
    member: u8,
    /// What pvops wrote (its plan).
    pvops: [u8; linux::PV_SITE_LEN as usize],
    /// What Linux's own pv layer holds there: the original bytes until `apply_alternatives()`
    /// computes its own into this copy.
    linux: [u8; linux::PV_SITE_LEN as usize],
    /// Whether `apply_alternatives()` did ([`pvops_kernel_linux_bytes`] was asked for it).
    linux_done: bool,
    /// Whether it is in the kernel's init text, freed (and poisoned) once boot is over.
    init: bool,
}

impl Written {
    /// What `holder` has at this site.
    fn bytes(&self, holder: Holder) -> [u8; linux::PV_SITE_LEN as usize] {
        match holder {
            Holder::Pvops => self.pvops,
            Holder::Linux => self.linux,
        }
    }
}

impl Member {
    /// What `holder` has in this member's `pv_ops` slot: for pvops, the backend's function for
    /// the member's op, or the member's adapter where Linux's signature differs.
    fn function(&self, holder: Holder, ops: &BackendOps) -> usize {
        match (holder.unless(self.given), self.served) {
            (Holder::Pvops, Served::Yes { op, via, .. }) => pvops_function(op, via, ops),
            (Holder::Linux, _) | (Holder::Pvops, Served::No(_)) => self.linux_fn,
        }
    }
}

/// What pvops gives a member served by `op` `via`: the backend's function for the op, or the
/// member's adapter where Linux's signature differs (what its `pv_ops` slot holds, and where a
/// direct call at one of its sites goes).
fn pvops_function(op: Op, via: Via, ops: &BackendOps) -> usize {
    match via {
        Via::Op => ops.target(op),
        Via::Adapter(a) => adapters::address(a),
    }
}

/// Who holds the kernel's sites pvops patched.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Holder {
    /// pvops's bytes and functions (after boot).
    Pvops,
    /// Linux's own (handed back at run time).
    Linux,
}

/// What happened at boot.
struct Census {
    /// Whether boot took it (pvops_kernel_early ran).
    taken: bool,
    /// `pvops.kernel=on`.
    on: bool,
    /// The backend started at boot, until the initcall takes it.
    chosen: Option<Chosen>,
    /// Its ops (what the sites were planned for).
    ops: Option<BackendOps>,
    /// The members, as the kernel lays them out.
    members: [Member; MAX_MEMBERS],
    /// How many of `members` are real.
    n: usize,
    /// Direct-call entries that were not a pv call into `pv_ops` (Linux's layer stays).
    odd: u32,
    /// Why nothing was written, if so.
    refused: Option<&'static str>,
    /// The first odd site, for the message.
    first_odd: Option<OddSite>,
    /// Every site pvops wrote (for the read-back and the hand-back).
    written: KVec<Written>,
    /// Where `pvops_kernel_linux_bytes` looks first (Linux walks the table in pvops's order).
    cursor: usize,
    /// Whether `pvops_kernel_late` filled `pv_ops`.
    late: bool,
    /// Who holds the sites now.
    holder: Holder,
    /// Hand-backs to Linux and take-backs by pvops done at run time.
    hand_backs: u32,
    /// See `hand_backs`.
    take_backs: u32,
    /// The kernel's clocks (`pv_sched_clock`, `pv_steal_clock`), by [`KernelClock`].
    clocks: [ClockHold; 2],
    /// Whether the APIC driver's `send_IPI_mask` callbacks are pvops's (taken at the
    /// initcall, [`take_ipis`]), or why not.
    ipis: Result<(), &'static str>,
    /// Why the running backend leaves the IPIs, taken at the initcall, to Linux, if it does.
    ipis_given: Option<&'static str>,
    /// What Linux chose at boot that a backend serving the kernel must choose too (kept for
    /// the backend of a live switch).
    linux: Option<linux::LinuxChoices>,
    /// Live switches of backend done at run time.
    switches: u32,
}

/// One of the kernel's clocks: what Linux had in it when pvops took it, or why pvops did not.
#[derive(Clone, Copy)]
struct ClockHold {
    /// Linux's function, when pvops took the static call (0: not taken).
    linux_fn: usize,
    /// Why pvops did not take it, if known.
    why: Option<&'static str>,
    /// Why the running backend leaves it, taken at boot, to Linux, if it does (a live switch).
    given: Option<&'static str>,
}

impl ClockHold {
    /// Take clock `k` for pvops where `may` says so (its backend function is stored), keeping
    /// Linux's function for the hand-back; else keep why not.
    fn take(&mut self, k: KernelClock, may: Result<(), &'static str>) {
        match may {
            Ok(()) => {
                self.linux_fn = k.current();
                k.hand(Holder::Pvops, self.linux_fn);
            }
            Err(why) => self.why = Some(why),
        }
    }
}

impl Census {
    fn members(&self) -> &[Member] {
        &self.members[..self.n]
    }

    fn totals(&self) -> (u32, u32, u32) {
        self.members().iter().fold((0, 0, 0), |(t, i, d), m| {
            (t + m.sites, i + m.inline, d + m.direct)
        })
    }
}

/// The census, written once by [`pvops_kernel_early`] (boot CPU alone) and read afterwards.
/// A static rather than a local: the member array is a few KiB, too much for the boot stack.
struct Slot(UnsafeCell<Census>);

// SAFETY: written by pvops_kernel_early, pvops_kernel_linux_bytes and pvops_kernel_late, which
// run on the boot CPU before any other CPU or thread exists; then by the initcall (one thread,
// once, before the sysfs files exist); then only by pvops_kernel_hand, which the shim calls
// with its holder_lock held (one at a time).
unsafe impl Sync for Slot {}

/// A member not filled in yet.
const NO_SUCH_MEMBER: Member = Member {
    name: "",
    offset: 0,
    served: Served::No(""),
    sites: 0,
    inline: 0,
    direct: 0,
    linux_fn: 0,
    given: None,
};

static CENSUS: Slot = Slot(UnsafeCell::new(Census {
    taken: false,
    on: false,
    chosen: None,
    ops: None,
    members: [NO_SUCH_MEMBER; MAX_MEMBERS],
    n: 0,
    odd: 0,
    refused: None,
    first_odd: None,
    written: KVec::new(),
    cursor: 0,
    late: false,
    holder: Holder::Pvops,
    hand_backs: 0,
    take_backs: 0,
    clocks: [ClockHold {
        linux_fn: 0,
        why: None,
        given: None,
    }; 2],
    ipis: Err("not taken yet"),
    ipis_given: None,
    linux: None,
    switches: 0,
}));

/// The census.
///
/// # Safety
///
/// As for [`Slot`]: the boot CPU alone at boot, the initcall afterwards, then one
/// [`pvops_kernel_hand`] at a time; no two references are live at once.
unsafe fn census() -> &'static mut Census {
    // SAFETY: the caller's contract.
    unsafe { &mut *CENSUS.0.get() }
}

/// The backend started at boot, for the initcall.
pub(crate) fn take_early() -> Option<Chosen> {
    // SAFETY: the initcall, after boot; the reference ends here.
    unsafe { census() }.chosen
}

/// Called by `alternative_instructions()` before `apply_alternatives()` (the kernel patch).
///
/// # Safety
///
/// `start..end` is vmlinux's `.altinstructions`, writable; only the boot CPU runs and kernel
/// text is still writable.
#[no_mangle]
pub(crate) unsafe extern "C" fn pvops_kernel_early(start: *mut u8, end: *mut u8) {
    // SAFETY: reads a flag set by early_param.
    let on = unsafe { shim::pvops_shim_kernel_param() } != 0;
    // SAFETY: the boot CPU alone runs, once (see `Slot`).
    let c = unsafe { census() };
    c.taken = true;
    c.on = on;
    // the kernel's own layout of pv_ops
    let mut size = 0;
    // SAFETY: returns &pv_ops and its size.
    let pv_ops = unsafe { shim::pvops_shim_pv_ops(&mut size) } as usize;
    let mut slots = [NO_MEMBER; MAX_SLOTS];
    loop {
        let mut offset = 0;
        // SAFETY: a static table of the shim; NULL past its end.
        let name = unsafe { shim::pvops_shim_pv_member(c.n as u32, &mut offset) };
        if name.is_null() || c.n == MAX_MEMBERS {
            break;
        }
        // SAFETY: a NUL-terminated string literal of the shim.
        let name = unsafe { CStr::from_char_ptr(name) }.to_str().unwrap_or("?");
        if let Some(s) = slots.get_mut(offset as usize / 8) {
            *s = c.n as u8;
        }
        c.members[c.n] = Member {
            name,
            offset,
            served: linux::served(name),
            sites: 0,
            inline: 0,
            direct: 0,
            linux_fn: 0,
            given: None,
        };
        c.n += 1;
    }
    if !on {
        pr_info!("kernel: pvops.kernel=off: Linux's paravirt layer left untouched\n");
        c.refused = Some("pvops.kernel=off");
    }
    let chosen = if on {
        match Request::parse(param(), &pvops_backends::BACKENDS) {
            Ok(r) => choose(r).ok(),
            Err(_) => None,
        }
    } else {
        None
    };
    if on && chosen.is_none() {
        c.refused = Some("no backend started at boot");
    }
    if let Some(ch) = chosen {
        pr_info!(
            "kernel: {} started at boot (before apply_alternatives)\n",
            ch.selection
        );
        let ops = ch.backend.ops();
        // SAFETY: nothing calls pvops yet (its own sites are patched by the initcall); the
        // backend's functions honour the ops' contracts.
        unsafe { PV_OPS.install(&ops.table()) };
        c.ops = Some(ops);
        // the members pvops serves, as far as this backend's ops may serve the kernel and it
        // chose what Linux chose: the lock protocol (paravirt_set_cap() has asked the same:
        // Linux's hypervisor code ran before), flush_tlb_multi (Linux's IPIs, or the same
        // hypervisor's PV flush), and io_delay (io_delay_init() and init_hypervisor_platform()
        // ran in setup_arch())
        // SAFETY: read pv_ops and io_delay_type.
        let linux = unsafe {
            linux::LinuxChoices {
                locks: linux::LinuxLocks {
                    native_unlock: shim::pvops_shim_native_spin_unlock() != 0,
                    native_vcpu_is_preempted: shim::pvops_shim_native_vcpu_is_preempted() != 0,
                },
                io_delay: match shim::pvops_shim_io_delay() {
                    shim::pvops_io_delay_PVOPS_IO_DELAY_PORT80 => linux::LinuxIoDelay::Port80,
                    shim::pvops_io_delay_PVOPS_IO_DELAY_NOTHING => linux::LinuxIoDelay::Nothing,
                    shim::pvops_io_delay_PVOPS_IO_DELAY_OTHER => linux::LinuxIoDelay::Other,
                    // (the shim returns one of the three)
                    _ => linux::LinuxIoDelay::Other,
                },
                native_flush_tlb_multi: shim::pvops_shim_native_flush_tlb_multi() != 0,
            }
        };
        let n = c.n;
        for m in c.members[..n].iter_mut() {
            if let Served::Yes { op, .. } = m.served {
                if let Err(why) = may_serve(ch.backend, &ops, &linux, op) {
                    m.served = Served::No(why);
                }
            }
        }
        c.linux = Some(linux);
    }
    c.chosen = chosen;

    let len = (end as usize).saturating_sub(start as usize);
    // SAFETY: the caller passes vmlinux's .altinstructions.
    let table = unsafe { core::slice::from_raw_parts(start.cast_const(), len) };
    let base = start as usize;
    let member_of = |slot: usize| -> Option<usize> {
        let m = *slots.get(slot / 8)?;
        (m != NO_MEMBER).then_some(m as usize)
    };
    // pass 1: count, verify every site's bytes (pv_sites reads them: ff 15 <disp32> into
    // pv_ops), and plan
    let mut planned = 0usize;
    for s in linux::pv_sites(table, base, pv_ops, size, &ReadOnlyText) {
        let s = match s {
            Ok(s) => s,
            Err(odd) => {
                c.odd += 1;
                c.first_odd.get_or_insert(odd);
                continue;
            }
        };
        let Some(m) = member_of(s.slot) else {
            c.odd += 1;
            continue;
        };
        c.members[m].sites += 1;
        if let (Served::Yes { op, conv, via }, Some(ops)) = (c.members[m].served, c.ops.as_ref()) {
            if linux::plan(s.addr, op, conv, via, pvops_function(op, via, ops), ops).is_some() {
                planned += 1;
            }
        }
    }
    if c.odd > 0 && c.refused.is_none() {
        c.refused = Some("a direct-call entry is not a pv call into pv_ops");
    }
    if c.refused.is_none() && planned > 0 && c.written.reserve(planned, GFP_KERNEL).is_err() {
        c.refused = Some("no memory for the list of written sites");
    }
    // pass 2: write (all or nothing: pass 1 found every site as expected)
    if let (None, Some(ops)) = (c.refused, c.ops) {
        for s in linux::pv_sites(table, base, pv_ops, size, &ReadOnlyText).flatten() {
            let Some(m) = member_of(s.slot) else { continue };
            let Served::Yes { op, conv, via } = c.members[m].served else {
                continue;
            };
            let Some((action, bytes)) =
                linux::plan(s.addr, op, conv, via, pvops_function(op, via, &ops), &ops)
            else {
                continue;
            };
            let mut original = [0u8; linux::PV_SITE_LEN as usize];
            ReadOnlyText.read(s.addr, &mut original);
            // SAFETY: the boot CPU alone runs; the site holds `call *pv_ops+slot(%rip)`
            // (pv_sites checked it just now); kernel text is writable until mark_rodata_ro.
            unsafe { shim::pvops_shim_poke_early(s.addr, bytes.as_ptr(), bytes.len() as u32) };
            for e in s.first..s.first + s.entries {
                let at = base + e * linux::ALT_INSTR_LEN + 8;
                // SAFETY: `at` is the ft_flags word of entry `e` of the table, which is
                // writable init data (apply_alternatives writes it too); the flags are its
                // upper 16 bits.
                unsafe {
                    let p = at as *mut u32;
                    p.write_unaligned(p.read_unaligned() | (u32::from(ALT_FLAG_PVOPS) << 16));
                }
            }
            match action {
                KernelAction::Inline => c.members[m].inline += 1,
                KernelAction::Direct => c.members[m].direct += 1,
            }
            // cannot fail: reserved above
            let _ = c.written.push(
                Written {
                    addr: s.addr,
                    member: m as u8,
                    pvops: bytes,
                    linux: original,
                    linux_done: false,
                    // SAFETY: compares an address with the kernel's init-text bounds.
                    init: unsafe { shim::pvops_shim_is_init_text(s.addr) } != 0,
                },
                GFP_KERNEL,
            );
        }
    }
    let (t, i, d) = c.totals();
    match (c.refused, c.first_odd) {
        (Some(why), Some(odd)) => pr_warn!(
            "kernel: {} pv sites, nothing written ({}: {:?}); Linux's paravirt layer stays\n",
            t,
            why,
            odd
        ),
        (Some(why), None) => pr_info!(
            "kernel: {} pv sites, 0 patched ({}); Linux's paravirt layer stays\n",
            t,
            why
        ),
        (None, _) => pr_info!(
            "kernel: {} pv sites, {} patched by pvops (inline {}, direct {}), {} left to Linux\n",
            t,
            i + d,
            i,
            d,
            t - i - d
        ),
    }
}

/// Whether `backend` (with its `ops`) may serve `op` at the kernel's sites, Linux having made
/// the choices `linux` at boot.
fn may_serve(
    backend: &dyn pvops::Backend,
    ops: &BackendOps,
    linux: &linux::LinuxChoices,
    op: Op,
) -> Result<(), &'static str> {
    backend
        .serves_kernel(op)
        .and_then(|()| linux.agree(op, ops, &pvops_backends::native::OPS))
}

/// Called by `apply_alternatives()` for each entry of a site pvops flagged: pvops's copy of the
/// site's bytes, which Linux patches instead of the site (the bytes Linux's own layer would
/// hold there). NULL for a site pvops did not write (Linux then skips the entry).
///
/// # Safety
///
/// Called by the kernel patch's `apply_alternatives()` on the boot CPU alone, between
/// [`pvops_kernel_early`] and [`pvops_kernel_late`]; Linux writes at most
/// [`linux::PV_SITE_LEN`] bytes through the pointer.
#[no_mangle]
pub(crate) unsafe extern "C" fn pvops_kernel_linux_bytes(instr: *mut u8) -> *mut u8 {
    // SAFETY: the boot CPU alone runs (see `Slot`).
    let c = unsafe { census() };
    let addr = instr as usize;
    let n = c.written.len();
    // Linux walks .altinstructions in the order pass 2 wrote it: the site is at the cursor or
    // just after it; anything else is looked up from the start.
    let at = Iterator::chain((c.cursor..n).take(2), 0..n).find(|&i| c.written[i].addr == addr);
    match at {
        Some(i) => {
            c.cursor = i;
            c.written[i].linux_done = true;
            c.written[i].linux.as_mut_ptr()
        }
        None => core::ptr::null_mut(),
    }
}

/// Called by `alternative_instructions()` right after `apply_alternatives()`, on the boot CPU
/// alone: the `pv_ops` members pvops serves point at pvops's functions from now on (what
/// modules loaded later are patched with); Linux's are kept for the hand-back.
#[no_mangle]
pub(crate) extern "C" fn pvops_kernel_late() {
    // SAFETY: the boot CPU alone runs (see `Slot`).
    let c = unsafe { census() };
    let Some(ops) = c.ops.filter(|_| c.refused.is_none()) else {
        return;
    };
    let n = c.n;
    for m in c.members[..n].iter_mut() {
        if let Served::Yes { .. } = m.served {
            // SAFETY: reads one pointer of pv_ops.
            m.linux_fn = unsafe { shim::pvops_shim_pv_op(m.offset) } as usize;
            // SAFETY: writes one pointer of pv_ops, a function of the member's type and
            // convention (linux::served checked each, and each adapter has Linux's
            // signature); only the boot CPU runs.
            unsafe { shim::pvops_shim_set_pv_op(m.offset, m.function(Holder::Pvops, &ops) as _) };
        }
    }
    c.late = true;
    if let Some(ch) = c.chosen {
        let may = ch.backend.serves_kernel(Op::SchedClock).map(|()| {
            SCHED_FN.store(ops.target(Op::SchedClock), Ordering::Relaxed);
        });
        c.clocks[KernelClock::Sched as usize].take(KernelClock::Sched, may);
    }
}

/// The kernel's clocks: static calls, not `pv_ops` members, which pvops takes where the
/// backend serves them (`pv_sched_clock` at boot, [`pvops_kernel_late`]; `pv_steal_clock` at
/// the initcall, [`may_take_steal_clock`]) and which change hands with the sites.
#[derive(Clone, Copy, PartialEq, Eq)]
enum KernelClock {
    /// `pv_sched_clock`, behind `sched_clock()`.
    Sched = 0,
    /// `pv_steal_clock`, behind `paravirt_steal_clock(cpu)`.
    Steal = 1,
}

impl KernelClock {
    const ALL: [KernelClock; 2] = [KernelClock::Sched, KernelClock::Steal];

    fn name(self) -> &'static str {
        match self {
            KernelClock::Sched => "pv_sched_clock",
            KernelClock::Steal => "pv_steal_clock",
        }
    }

    /// The static call's function now.
    fn current(self) -> usize {
        // SAFETY: reads the static call's function.
        (unsafe {
            match self {
                KernelClock::Sched => shim::pvops_shim_sched_clock_fn(),
                KernelClock::Steal => shim::pvops_shim_steal_clock_fn(),
            }
        }) as usize
    }

    /// What `holder` puts in the static call (`linux`: Linux's function).
    fn function(self, holder: Holder, linux: usize) -> usize {
        match (holder, self) {
            (Holder::Linux, _) => linux,
            (Holder::Pvops, KernelClock::Sched) => kernel_sched_clock as *const () as usize,
            (Holder::Pvops, KernelClock::Steal) => STEAL_FN.load(Ordering::Relaxed),
        }
    }

    /// Point the static call at `to`'s function (`linux`: Linux's). pvops's `sched_clock` is
    /// anchored now to continue Linux's reading; its steal clock reads the kernel's own records.
    fn hand(self, to: Holder, linux: usize) {
        if self == KernelClock::Sched && to == Holder::Pvops {
            // SAFETY: a reading of the kernel's sched_clock.
            let linux_now = unsafe { shim::pvops_shim_sched_clock() };
            SCHED_OFFSET.store(
                linux_now.wrapping_sub(backend_sched_clock()),
                Ordering::Relaxed,
            );
        }
        let f = self.function(to, linux);
        // SAFETY: Linux's own function for the static call, or pvops's of its type (`u64
        // (*)(void)`, `u64 (*)(int)`), callable wherever the kernel calls it (the backend's ops
        // are NMI-safe by contract).
        unsafe {
            match self {
                KernelClock::Sched => shim::pvops_shim_set_sched_clock(f as _),
                KernelClock::Steal => shim::pvops_shim_set_steal_clock(f as _),
            }
        }
    }
}

/// The backend's `sched_clock`, for [`kernel_sched_clock`] (set before that is installed).
static SCHED_FN: AtomicUsize = AtomicUsize::new(0);
/// What [`kernel_sched_clock`] adds to it, so that it continues Linux's clock.
static SCHED_OFFSET: AtomicU64 = AtomicU64::new(0);

/// The backend's `sched_clock`, read.
fn backend_sched_clock() -> u64 {
    let f = SCHED_FN.load(Ordering::Relaxed);
    // SAFETY: SCHED_FN holds the backend's sched_clock, an `extern "C" fn() -> u64` (the op's
    // signature), stored before anything calls this and never cleared.
    let f = unsafe { core::mem::transmute::<usize, extern "C" fn() -> u64>(f) };
    f()
}

/// The kernel's `sched_clock()` (`pv_sched_clock`) while pvops holds it: the backend's clock,
/// moved to continue what Linux's read when pvops took it over.
extern "C" fn kernel_sched_clock() -> u64 {
    backend_sched_clock().wrapping_add(SCHED_OFFSET.load(Ordering::Relaxed))
}

/// The backend's `steal_clock`, what `pv_steal_clock` holds while pvops does.
static STEAL_FN: AtomicUsize = AtomicUsize::new(0);

/// A steal clock's reading of `cpu`: `f` is the backend's or Linux's (`u64 (*)(int)`).
fn steal_clock(f: usize, cpu: u32) -> u64 {
    // SAFETY: `f` is STEAL_FN (the backend's steal_clock, an `extern "C" fn(u32) -> u64`, the
    // op's signature) or what pv_steal_clock held before pvops took it (Linux's `u64 (*)(int)`,
    // the same registers), both callable in any context.
    let f = unsafe { core::mem::transmute::<usize, extern "C" fn(u32) -> u64>(f) };
    f(cpu)
}

/// Whether a backend's steal clock (`ours`) reads what Linux's (`linux`) does, on every CPU:
/// each reading lies between two of Linux's, taken just before and after. A record the backend
/// missed reads 0, and Linux, seeing a steal clock go back, would account a huge steal time.
fn steal_agrees(linux: usize, ours: usize) -> Result<(), (u32, u64, u64, u64)> {
    // SAFETY: reads nr_cpu_ids.
    for cpu in 0..unsafe { shim::pvops_shim_nr_cpus() } {
        // SAFETY: reads the online mask.
        if unsafe { shim::pvops_shim_cpu_online(cpu) } == 0 {
            continue;
        }
        let before = steal_clock(linux, cpu);
        let mine = steal_clock(ours, cpu);
        let after = steal_clock(linux, cpu);
        if mine < before || mine > after {
            return Err((cpu, before, mine, after));
        }
    }
    Ok(())
}

/// At the initcall, every CPU up: the backend reads its per-CPU records again (at boot only
/// the boot CPU's were there); whether `pv_steal_clock` may go to pvops: the backend serves it
/// and its readings are Linux's on every CPU (its function is stored then).
fn may_take_steal_clock(c: &Census) -> Result<(), &'static str> {
    let (Some(ch), Some(ops), true) = (c.chosen, c.ops, c.late) else {
        return Err(c.refused.unwrap_or("no backend started at boot"));
    };
    ch.backend.serves_kernel(Op::StealClock)?;
    // SAFETY: reads a static key.
    if unsafe { shim::pvops_shim_steal_enabled() } == 0 {
        return Err("Linux accounts no steal time here: nothing to take");
    }
    // SAFETY: reads the CPU masks.
    if unsafe { shim::pvops_shim_all_cpus_online() } == 0 {
        return Err(
            "a possible CPU is offline: coming up later, its steal record would be one the \
             backend never read",
        );
    }
    pvops_backends::refresh_cpus(ch.selection.backend, &KernelPlatform);
    STEAL_FN.store(ops.target(Op::StealClock), Ordering::Relaxed);
    if let Err((cpu, before, ours, after)) =
        steal_agrees(KernelClock::Steal.current(), ops.target(Op::StealClock))
    {
        pr_err!(
            "kernel: pv_steal_clock not taken: CPU {cpu} reads {ours} ns, Linux's {before} \
             to {after} ns\n"
        );
        return Err("the backend's steal clock disagrees with Linux's (see dmesg)");
    }
    Ok(())
}

/// At the initcall: whether the kernel's IPIs go through pvops (the APIC driver's
/// `send_IPI_mask` and `send_IPI_mask_allbutself` become the shim's, which call `irq.send_ipi`
/// and Linux's own callbacks for what it does not send), where the backend sends IPIs itself
/// (KVM's PV send-IPI).
fn take_ipis(c: &Census) -> Result<(), &'static str> {
    let (Some(ch), true) = (c.chosen, c.late) else {
        return Err(c.refused.unwrap_or("no backend started at boot"));
    };
    if !ch.backend.sends_ipis() {
        return Err("the backend sends no IPIs of its own: Linux's APIC driver does");
    }
    // SAFETY: the initcall (init data is still there); the shim keeps Linux's callbacks.
    match unsafe { shim::pvops_shim_ipi_install(Some(crate::platform::send_ipi)) } {
        0 => Ok(()),
        _ => Err("the kernel has no APIC driver with send_IPI_mask callbacks"),
    }
}

/// Whether the kernel's IPIs are `holder`'s: the shim's callbacks in the APIC driver, sending
/// through pvops or handed back to Linux's.
fn ipis_read_back(holder: Holder) -> bool {
    // SAFETY: reads the APIC driver's callbacks and a flag.
    let found = unsafe { shim::pvops_shim_ipi_holder() };
    found
        == match holder {
            Holder::Pvops => 0,
            Holder::Linux => 1,
        }
}

/// The census as text: the totals, then one line per member with sites.
struct Report<'a>(&'a Census, u32);

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = self.0;
        let (t, i, d) = c.totals();
        writeln!(
            f,
            "total sites={t} patched={} inline={i} direct={d} linux={} odd={} readback-mismatch={} \
             backend={} switches={}",
            i + d,
            t - i - d,
            c.odd,
            self.1,
            c.chosen.map_or("none", |ch| ch.backend.id().name()),
            c.switches
        )?;
        for k in KernelClock::ALL {
            match c.clocks[k as usize] {
                ClockHold {
                    linux_fn: 0, why, ..
                }
                | ClockHold {
                    given: why @ Some(_),
                    ..
                } => match c.refused.or(why) {
                    Some(why) => writeln!(f, "{} linux why=\"{why}\"", k.name())?,
                    None => writeln!(f, "{} linux", k.name())?,
                },
                _ => writeln!(f, "{} pvops", k.name())?,
            }
        }
        match c.ipis.and(c.ipis_given.map_or(Ok(()), Err)) {
            Ok(()) => writeln!(f, "apic.send_IPI_mask pvops")?,
            Err(why) => writeln!(f, "apic.send_IPI_mask linux why=\"{why}\"")?,
        }
        for m in c.members().iter().filter(|m| m.sites > 0) {
            let linux = m.sites - m.inline - m.direct;
            write!(
                f,
                "{} sites={} inline={} direct={} linux={}",
                m.name, m.sites, m.inline, m.direct, linux
            )?;
            if let Served::Yes {
                via: Via::Adapter(_),
                ..
            } = m.served
            {
                write!(f, " via=adapter")?;
            }
            if linux > 0 {
                let why = match (c.refused, m.served, m.given) {
                    (Some(why), ..) => why,
                    (None, Served::No(why), _) => why,
                    (None, Served::Yes { .. }, Some(why)) => why,
                    (None, Served::Yes { .. }, None) => "out of reach",
                };
                write!(f, " why=\"{why}\"")?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

/// After boot (the initcall): read every site pvops wrote back and compare it with the plan,
/// check that Linux computed its own bytes for each (the hand-back's), and publish the census
/// in `/sys/kernel/pvops/kernel` and the holder in `/sys/kernel/pvops/kernel_holder`. Returns
/// the number of sites that do not hold what was planned.
pub(crate) fn readback() -> u32 {
    // SAFETY: the initcall, after boot; the only reference while it runs.
    let c = unsafe { census() };
    if !c.taken {
        return 0;
    }
    // (init text is still there: the initcall runs before it is freed)
    let bad = mismatches(c, c.written.iter(), Holder::Pvops);
    if let Some(w) = c.written.iter().find(|w| !w.linux_done) {
        pr_err!(
            "kernel: Linux computed no bytes of its own for site {:#x} ({}): no hand-back\n",
            w.addr,
            c.members[w.member as usize].name
        );
    }
    let may = may_take_steal_clock(c);
    c.clocks[KernelClock::Steal as usize].take(KernelClock::Steal, may);
    c.ipis = take_ipis(c);
    let mut bad = bad;
    if c.ipis.is_ok() && !ipis_read_back(Holder::Pvops) {
        pr_err!("kernel: the APIC driver's send_IPI_mask callbacks are not pvops's\n");
        bad += 1;
    }
    let (t, i, d) = c.totals();
    if c.refused.is_none() {
        pr_info!(
            "kernel: read back {} sites pvops wrote: {}\n",
            i + d,
            if bad == 0 {
                "all as planned"
            } else {
                "MISMATCH"
            }
        );
    }
    pr_info!(
        "kernel: kernel-sites={}/{} inline={} direct={} left-to-linux={}\n",
        i + d,
        t,
        i,
        d,
        t - i - d
    );
    if let Ok(text) = CString::try_from_fmt(format_args!("{}", Report(c, bad))) {
        // SAFETY: a NUL-terminated string; the shim copies it.
        unsafe { shim::pvops_shim_set_kernel_report(text.as_char_ptr()) };
    }
    publish_holder(c);
    bad
}

/// `/sys/kernel/pvops/counters` (read live, under the shim's holder lock): `backend=NAME` and
/// what the backend counted of its work so far ([`pvops::Backend::counters`]), at most `len`
/// bytes at `buf`. Returns the length.
///
/// # Safety
///
/// `buf` is valid for `len` bytes of writes; called by the shim's `counters_show`, after boot.
#[no_mangle]
pub(crate) unsafe extern "C" fn pvops_kernel_counters(buf: *mut u8, len: usize) -> usize {
    use fmt::Write as _;
    // SAFETY: after boot; the holder lock keeps the hand-back (the census's one writer) out.
    let c = unsafe { census() };
    // SAFETY: the caller's buffer.
    let mut out = Writer::new(unsafe { core::slice::from_raw_parts_mut(buf, len) });
    match c.chosen {
        Some(ch) => {
            let _ = write!(out, "backend={}", ch.backend.id());
            ch.backend.counters(&mut |name, n| {
                let _ = write!(out, " {name}={n}");
            });
        }
        None => {
            let _ = write!(out, "backend=none");
        }
    }
    out.written()
}

/// How many of the kernel's clocks and IPIs, besides the sites, are not what `to` (the sites'
/// holder) gives them, each reported; and whether pvops's steal clock, where it has one, reads
/// what Linux's does.
fn others_mismatch(c: &Census, to: Holder) -> u32 {
    let mut bad = 0;
    for k in KernelClock::ALL {
        let hold = c.clocks[k as usize];
        if hold.linux_fn == 0 {
            continue;
        }
        let to = to.unless(hold.given);
        if k.current() != k.function(to, hold.linux_fn) {
            pr_err!("kernel: {} is not {}'s\n", k.name(), to.name());
            bad += 1;
        }
    }
    if c.ipis.is_ok() && !ipis_read_back(to.unless(c.ipis_given)) {
        pr_err!(
            "kernel: the kernel's IPIs are not {}'s\n",
            to.unless(c.ipis_given).name()
        );
        bad += 1;
    }
    let steal = c.clocks[KernelClock::Steal as usize];
    if steal.linux_fn != 0 && steal.given.is_none() {
        if let Err((cpu, before, ours, after)) =
            steal_agrees(steal.linux_fn, STEAL_FN.load(Ordering::Relaxed))
        {
            pr_err!(
                "kernel: pvops's steal clock of CPU {cpu} reads {ours} ns, the kernel's {before} \
                 to {after} ns\n"
            );
            bad += 1;
        }
    }
    bad
}

/// How many sites pvops wrote do not hold `holder`'s bytes (the first one is reported), and
/// whether every `pv_ops` member pvops serves holds `holder`'s function (a wrong one counts).
fn mismatches<'a>(c: &'a Census, sites: impl Iterator<Item = &'a Written>, holder: Holder) -> u32 {
    let mut bad = 0u32;
    for w in sites {
        let want = w.bytes(holder);
        let mut found = [0u8; linux::PV_SITE_LEN as usize];
        ReadOnlyText.read(w.addr, &mut found);
        if found != want {
            if bad == 0 {
                pr_err!(
                    "kernel: site {:#x} ({}) holds {:02x?}, {} {:02x?}\n",
                    w.addr,
                    c.members[w.member as usize].name,
                    found,
                    holder.name(),
                    want
                );
            }
            bad += 1;
        }
    }
    if let (true, Some(ops)) = (c.late, c.ops) {
        for m in c.members() {
            let Served::Yes { .. } = m.served else {
                continue;
            };
            let want = m.function(holder, &ops);
            // SAFETY: reads one pointer of pv_ops.
            let found = unsafe { shim::pvops_shim_pv_op(m.offset) } as usize;
            if found != want {
                pr_err!(
                    "kernel: pv_ops.{} holds {:#x}, {} {:#x}\n",
                    m.name,
                    found,
                    holder.name(),
                    want
                );
                bad += 1;
            }
        }
    }
    bad
}

impl Holder {
    fn name(self) -> &'static str {
        match self {
            Holder::Pvops => "pvops",
            Holder::Linux => "linux",
        }
    }

    /// The holder the sites come from when they go to this one.
    fn other(self) -> Holder {
        match self {
            Holder::Pvops => Holder::Linux,
            Holder::Linux => Holder::Pvops,
        }
    }

    /// Who holds something the running backend may leave to Linux (`given`: why it does) while
    /// the sites are this holder's.
    fn unless(self, given: Option<&'static str>) -> Holder {
        match given {
            Some(_) => Holder::Linux,
            None => self,
        }
    }
}

/// The sites pvops wrote that outlive boot: not those in the kernel's init text.
fn lasting(c: &Census) -> impl Iterator<Item = &Written> + '_ {
    c.written.iter().filter(|w| !w.init)
}

/// `/sys/kernel/pvops/kernel_holder`: who holds the sites, and the round trips so far.
fn publish_holder(c: &Census) {
    let text = match hand_refusal(c) {
        Some(why) => CString::try_from_fmt(format_args!("linux (pvops patched none: {why})")),
        None => {
            let (n, differ) = lasting(c).fold((0, 0), |(n, d), w| {
                (n + 1, d + u32::from(w.pvops != w.linux))
            });
            CString::try_from_fmt(format_args!(
                "{} sites={n} differ={differ} init={} hand-backs={} take-backs={}",
                c.holder.name(),
                c.written.len() - n,
                c.hand_backs,
                c.take_backs
            ))
        }
    };
    if let Ok(text) = text {
        // SAFETY: a NUL-terminated string; the shim copies it.
        unsafe { shim::pvops_shim_set_kernel_holder(text.as_char_ptr()) };
    }
}

/// Why the kernel's sites cannot change hands, if so.
fn hand_refusal(c: &Census) -> Option<&'static str> {
    if !c.taken {
        return Some("pvops_kernel_early did not run");
    }
    if let Some(why) = c.refused {
        return Some(why);
    }
    if c.written.is_empty() || !c.late {
        return Some("this backend serves none of the kernel's sites");
    }
    if c.written.iter().any(|w| !w.linux_done) {
        return Some("Linux computed no bytes of its own for some site");
    }
    None
}

/// A hand-back or take-back, run under stop_machine by the CPU that leads.
struct Hand<'a> {
    /// The census (the sites, both layouts, the members).
    c: &'a Census,
    /// Who takes the sites.
    to: Holder,
    /// The sites' text, writable (`None`: no site outlives boot).
    text: Option<SitesText>,
    /// The site that did not hold what it should before anything was written.
    refused: Option<(usize, [u8; linux::PV_SITE_LEN as usize])>,
    /// Whether the callback ran.
    ran: bool,
}

/// stop_machine callback: every site checked, then every site and `pv_ops` member written.
///
/// # Safety
///
/// `data` points at a live [`Hand`]; the other CPUs wait in the shim's stop_machine callback.
unsafe extern "C" fn run_hand(data: *mut c_void) -> c_int {
    // SAFETY: pvops_kernel_hand passes its own `Hand`, alive until stop_machine returns.
    let h = unsafe { &mut *data.cast::<Hand<'_>>() };
    h.ran = true;
    // all or nothing: every site must hold what the other holder left there
    h.refused = first_differing(h.c, |w| w.bytes(h.to.other()));
    if h.refused.is_some() {
        return 0;
    }
    if let Some(text) = &h.text {
        for w in lasting(h.c) {
            // SAFETY: a site that outlives boot; no other CPU runs kernel code (they wait in
            // the shim's callback) and this one runs none of the sites while it writes.
            unsafe { text.write(w.addr, &w.bytes(h.to)) };
        }
    }
    // SAFETY: no other CPU runs.
    unsafe { set_ipi_holder(h.c, h.to.unless(h.c.ipis_given)) };
    if let Some(ops) = h.c.ops {
        // SAFETY: no other CPU runs.
        unsafe { set_pv_ops(h.c.members().iter().copied(), h.to, &ops) };
    }
    0
}

/// A writable alias of the kernel text from the first site pvops wrote that outlives boot to
/// the last: what a hand-back or a switch writes the sites through. Unmapped when dropped.
struct SitesText {
    /// The first page of the aliased text.
    page: usize,
    /// Its writable alias.
    alias: *mut u8,
}

impl SitesText {
    /// Map the sites' text: `Ok(None)` when no site outlives boot, `Err` when the kernel
    /// cannot map its text writable.
    fn map(c: &Census) -> Result<Option<SitesText>, ()> {
        let (Some(start), Some(last)) = (
            lasting(c).map(|w| w.addr).min(),
            lasting(c).map(|w| w.addr).max(),
        ) else {
            return Ok(None);
        };
        // SAFETY: [start, last + PV_SITE_LEN) is kernel text holding the sites; unmapped on
        // drop.
        let alias =
            unsafe { shim::pvops_shim_alias_text(start, last + linux::PV_SITE_LEN as usize) };
        if alias.is_null() {
            return Err(());
        }
        Ok(Some(SitesText {
            page: start & !0xfff,
            alias: alias.cast(),
        }))
    }

    /// Write `bytes` at `addr`, in the mapped text.
    ///
    /// # Safety
    ///
    /// `addr..addr + bytes.len()` is inside a site that outlives boot, and no CPU runs it.
    unsafe fn write(&self, addr: usize, bytes: &[u8]) {
        // SAFETY: the alias maps every page from `page` to the last site writable; the
        // caller's contract.
        unsafe {
            core::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.alias.add(addr - self.page),
                bytes.len(),
            )
        };
    }
}

impl Drop for SitesText {
    fn drop(&mut self) {
        // SAFETY: the alias came from pvops_shim_alias_text and is no longer used.
        unsafe { shim::pvops_shim_unalias_text(self.alias.cast()) };
    }
}

/// The first site that outlives boot and does not hold `want` of it: its address and bytes.
fn first_differing(
    c: &Census,
    want: impl Fn(&Written) -> [u8; linux::PV_SITE_LEN as usize],
) -> Option<(usize, [u8; linux::PV_SITE_LEN as usize])> {
    lasting(c).find_map(|w| {
        let mut found = [0u8; linux::PV_SITE_LEN as usize];
        ReadOnlyText.read(w.addr, &mut found);
        (found != want(w)).then_some((w.addr, found))
    })
}

/// Point the `pv_ops` slot of each member pvops serves at what `holder` gives it (`ops`: the
/// running backend's).
///
/// # Safety
///
/// No other CPU runs (stop_machine).
unsafe fn set_pv_ops(members: impl Iterator<Item = Member>, holder: Holder, ops: &BackendOps) {
    for m in members.filter(|m| matches!(m.served, Served::Yes { .. })) {
        let f = m.function(holder, ops);
        // SAFETY: one pointer of pv_ops, Linux's own function for the member or pvops's of
        // the member's type and convention; the caller's contract.
        unsafe { shim::pvops_shim_set_pv_op(m.offset, f as _) };
    }
}

/// Send the kernel's IPIs through `to`, where pvops took them at the initcall.
///
/// # Safety
///
/// No other CPU runs (stop_machine).
unsafe fn set_ipi_holder(c: &Census, to: Holder) {
    if c.ipis.is_ok() {
        // SAFETY: a flag the shim's APIC callbacks read; the caller's contract.
        unsafe { shim::pvops_shim_ipi_to_linux(c_int::from(to == Holder::Linux)) };
    }
}

/// Root wrote `linux` (`to_linux`) or `pvops` to `/sys/kernel/pvops/kernel_holder`: every
/// kernel site pvops patched, and the `pv_ops` members it serves, go to that holder under
/// stop_machine, all or nothing, and are read back byte for byte. Modules loaded before keep
/// the calls Linux's loader gave them (into pvops, whose functions stay). 0 or -errno.
#[no_mangle]
pub(crate) extern "C" fn pvops_kernel_hand(to_linux: c_int) -> c_int {
    // SAFETY: the shim calls this with its holder_lock held, after the initcall.
    let c = unsafe { census() };
    let to = if to_linux != 0 {
        Holder::Linux
    } else {
        Holder::Pvops
    };
    if let Some(why) = hand_refusal(c) {
        pr_err!("kernel: nothing to hand over ({why})\n");
        return -(kernel::bindings::EOPNOTSUPP as c_int);
    }
    // SAFETY: reads the kernel's preemption model.
    if unsafe { shim::pvops_shim_preemptible() } != 0 {
        pr_err!(
            "kernel: not handed over: this kernel preempts kernel code, so a task may be \
             stopped between two instructions of a site (the two layouts differ there)\n"
        );
        return -(kernel::bindings::EOPNOTSUPP as c_int);
    }
    if c.holder == to {
        pr_info!("kernel: the sites are {}'s already\n", to.name());
        return 0;
    }
    let Ok(text) = SitesText::map(c) else {
        pr_err!("kernel: not handed over: cannot map the kernel's text writable\n");
        return ENOMEM.to_errno();
    };
    let mut h = Hand {
        c,
        to,
        text,
        refused: None,
        ran: false,
    };
    // SAFETY: `h` outlives the call; run_hand is the matching callback.
    let rc =
        unsafe { shim::pvops_shim_stop_machine(Some(run_hand), core::ptr::addr_of_mut!(h).cast()) };
    let (ran, refused) = (h.ran, h.refused);
    // (the alias is unmapped here)
    drop(h);
    if !ran {
        pr_err!("kernel: not handed over: stop_machine failed ({rc})\n");
        return EBUSY.to_errno();
    }
    if let Some((addr, found)) = refused {
        pr_err!(
            "kernel: not handed over: site {:#x} holds {:02x?}, not {}'s bytes (another \
             patcher, or a probe, changed it); nothing written\n",
            addr,
            found,
            c.holder.name()
        );
        return EBUSY.to_errno();
    }
    let taken = || {
        KernelClock::ALL
            .into_iter()
            .filter(|&k| c.clocks[k as usize].linux_fn != 0)
    };
    for k in taken() {
        let hold = c.clocks[k as usize];
        k.hand(to.unless(hold.given), hold.linux_fn);
    }
    let bad = mismatches(c, lasting(c), to) + others_mismatch(c, to);
    c.holder = to;
    match to {
        Holder::Linux => c.hand_backs += 1,
        Holder::Pvops => c.take_backs += 1,
    }
    publish_holder(c);
    if bad > 0 {
        pr_err!(
            "kernel: {} sites and pv_ops members do not read back as {}'s\n",
            bad,
            to.name()
        );
        return EIO.to_errno();
    }
    pr_info!(
        "kernel: {} sites and pv_ops now {}'s, read back byte for byte\n",
        lasting(c).count(),
        to.name()
    );
    0
}

/// A built-in live switch's share of the kernel (`echo NAME > /sys/kernel/pvops/backend`): every
/// kernel site pvops wrote goes from the running backend's bytes to the new backend's, or to
/// Linux's own where the new backend cannot serve its member (its `serves_kernel`, or a choice
/// Linux made at boot that it does not share: a lock protocol, say); so do the `pv_ops` members
/// pvops serves, the kernel's clocks and its IPIs. All of it in the stop_machine that switches
/// pvops's own sites ([`AlsoSwitched`]): checked first, all or nothing. A switch serves at most
/// what boot took: members, clocks and IPIs Linux kept at boot stay Linux's.
pub(crate) struct KernelSwitch {
    /// The new backend.
    to: Chosen,
    /// Its ops.
    ops: BackendOps,
    /// Per member (as in the census): why the new backend leaves it to Linux, if it does.
    given: KVec<Option<&'static str>>,
    /// Per site pvops wrote (as in the census): the new bytes, and what they are (`None`:
    /// Linux's).
    bytes: KVec<([u8; linux::PV_SITE_LEN as usize], Option<KernelAction>)>,
    /// Per clock: why the new backend leaves it to Linux, if it does.
    clocks: [Option<&'static str>; 2],
    /// Why the new backend leaves the IPIs to Linux, if it does.
    ipis_given: Option<&'static str>,
    /// The sites' text, writable (`None`: no site outlives boot).
    text: Option<SitesText>,
    /// The site that did not hold the running backend's bytes, found by the check.
    refused: Option<(usize, [u8; linux::PV_SITE_LEN as usize])>,
}

/// Why a built-in switch cannot start, before anything is written.
pub(crate) struct NotSwitched(pub(crate) Error, pub(crate) &'static str);

/// Prepare the kernel's share of a live switch to `to` (started, with `ops`): `None` when pvops
/// holds nothing of the kernel (pvops.kernel=off, or boot refused), so only pvops's own sites
/// change.
///
/// # Safety
///
/// The caller holds the shim's holder lock (no hand-back runs) and the switch's lock; init is
/// over.
pub(crate) unsafe fn prepare_switch(
    to: Chosen,
    ops: BackendOps,
) -> Result<Option<KernelSwitch>, NotSwitched> {
    // SAFETY: the caller's locks; the reference ends with this function.
    let c = unsafe { census() };
    let (true, None, Some(choices)) = (c.late, c.refused, c.linux) else {
        return Ok(None);
    };
    if c.holder == Holder::Linux {
        return Err(NotSwitched(
            EBUSY,
            "the kernel's sites are Linux's (/sys/kernel/pvops/kernel_holder): take them back first",
        ));
    }
    // SAFETY: reads the kernel's preemption model.
    if unsafe { shim::pvops_shim_preemptible() } != 0 {
        return Err(NotSwitched(
            Error::from_errno(-(kernel::bindings::EOPNOTSUPP as c_int)),
            "this kernel preempts kernel code: a task may be stopped between two instructions \
             of a kernel site, whose bytes a switch changes",
        ));
    }
    // SAFETY: reads the shim's count.
    let late = unsafe { shim::pvops_shim_late_modules() };
    if late != 0 {
        match late {
            -1 => pr_err!("kernel: the modules loaded after boot are not counted here\n"),
            n => pr_err!("kernel: {n} modules loaded after boot are still loaded (lsmod)\n"),
        }
        return Err(NotSwitched(
            EBUSY,
            "a module loaded after boot holds direct calls to the running \
             backend's functions, which Linux's loader wrote from pv_ops: unload it first",
        ));
    }
    if crate::faults::hit(
        crate::faults::Step::Alloc,
        "an allocation of the switch's new bytes",
    ) {
        return Err(NotSwitched(
            ENOMEM,
            "no memory for the new bytes of the kernel's sites",
        ));
    }
    let mut given =
        KVec::with_capacity(c.n, GFP_KERNEL).map_err(|_| NotSwitched(ENOMEM, "no memory"))?;
    for m in c.members() {
        let why = match m.served {
            Served::Yes { op, .. } => may_serve(to.backend, &ops, &choices, op).err(),
            Served::No(_) => None,
        };
        given
            .push(why, GFP_KERNEL)
            .map_err(|_| NotSwitched(ENOMEM, "no memory"))?;
    }
    let mut bytes = KVec::with_capacity(c.written.len(), GFP_KERNEL)
        .map_err(|_| NotSwitched(ENOMEM, "no memory for the new bytes of the kernel's sites"))?;
    for w in c.written.iter() {
        let m = &c.members[w.member as usize];
        let planned = match (m.served, given[w.member as usize]) {
            (Served::Yes { op, conv, via }, None) => {
                linux::plan(w.addr, op, conv, via, pvops_function(op, via, &ops), &ops)
            }
            _ => None,
        };
        let b = match planned {
            Some((action, b)) => (b, Some(action)),
            None => (w.linux, None),
        };
        bytes
            .push(b, GFP_KERNEL)
            .map_err(|_| NotSwitched(ENOMEM, "no memory"))?;
    }
    let sched = (c.clocks[KernelClock::Sched as usize].linux_fn != 0)
        .then(|| to.backend.serves_kernel(Op::SchedClock).err())
        .flatten();
    let steal_hold = c.clocks[KernelClock::Steal as usize];
    let steal = (steal_hold.linux_fn != 0)
        .then(|| {
            to.backend.serves_kernel(Op::StealClock).err().or_else(|| {
                pvops_backends::refresh_cpus(to.selection.backend, &KernelPlatform);
                steal_agrees(steal_hold.linux_fn, ops.target(Op::StealClock))
                    .err()
                    .map(|_| "the backend's steal clock disagrees with Linux's")
            })
        })
        .flatten();
    let ipis_given = (c.ipis.is_ok() && !to.backend.sends_ipis())
        .then_some("the backend sends no IPIs of its own: Linux's APIC driver does");
    let text = SitesText::map(c)
        .map_err(|()| NotSwitched(ENOMEM, "cannot map the kernel's text writable"))?;
    Ok(Some(KernelSwitch {
        to,
        ops,
        given,
        bytes,
        clocks: [sched, steal],
        ipis_given,
        text,
        refused: None,
    }))
}

impl AlsoSwitched for KernelSwitch {
    fn check(&mut self) -> bool {
        // SAFETY: under stop_machine, the caller holding the holder lock: the census's only
        // reader; the reference ends here.
        let c = unsafe { census() };
        // fault=kernel-site: one byte of the first site changed under the check, put back after
        let tampered = match (lasting(c).next(), &self.text) {
            (Some(w), Some(text))
                if crate::faults::hit(
                    crate::faults::Step::KernelSite,
                    "a kernel site changed under the switch",
                ) =>
            {
                let mut b = [0u8];
                ReadOnlyText.read(w.addr, &mut b);
                // SAFETY: a byte of a site (every other CPU is parked); put back below before
                // any CPU can run it.
                unsafe { text.write(w.addr, &[b[0] ^ 0xff]) };
                Some((text, w.addr, b[0]))
            }
            _ => None,
        };
        // every site must hold the running backend's bytes
        self.refused = first_differing(c, |w| w.pvops);
        if let Some((text, addr, byte)) = tampered {
            // SAFETY: as above: the byte changed just now, put back.
            unsafe { text.write(addr, &[byte]) };
        }
        self.refused.is_none()
    }

    fn write(&mut self) {
        // SAFETY: as in `check`.
        let c = unsafe { census() };
        if let Some(text) = &self.text {
            for (w, (bytes, _)) in c.written.iter().zip(self.bytes.iter()) {
                if !w.init {
                    // SAFETY: a site that outlives boot; no other CPU runs kernel code
                    // (stop_machine) and this one runs none of the sites while it writes.
                    unsafe { text.write(w.addr, bytes) };
                }
            }
        }
        // the members as the new backend serves them
        let members = c
            .members()
            .iter()
            .zip(self.given.iter())
            .map(|(m, &given)| Member { given, ..*m });
        // SAFETY: no other CPU runs (stop_machine).
        unsafe {
            set_pv_ops(members, Holder::Pvops, &self.ops);
            set_ipi_holder(c, Holder::Pvops.unless(self.ipis_given));
        }
        if c.clocks[KernelClock::Sched as usize].linux_fn != 0 && self.clocks[0].is_none() {
            // the new backend's clock, carried on from the old one's (the caller moved the
            // switch base just now), under the same offset to Linux's
            SCHED_FN.store(self.ops.target(Op::SchedClock), Ordering::Relaxed);
        }
    }
}

impl KernelSwitch {
    /// Say why the check refused the switch (nothing was written).
    pub(crate) fn refusal(&self) {
        if let Some((addr, found)) = self.refused {
            pr_err!(
                "kernel: site {:#x} holds {:02x?}, not the running backend's bytes (another \
                 patcher, or a probe, changed it)\n",
                addr,
                found
            );
        }
    }

    /// After the stop_machine that wrote it: the census becomes the new backend's, the
    /// kernel's clocks change hands where they must (static calls: not under stop_machine),
    /// everything is read back and the census republished. The old backend still runs (the
    /// clocks read it until here). Returns how many things do not read back as written.
    ///
    /// # Safety
    ///
    /// As for [`prepare_switch`], after the switch's stop_machine wrote it.
    pub(crate) unsafe fn finish(self) -> u32 {
        // SAFETY: the caller's locks; the reference ends with this function.
        let c = unsafe { census() };
        for (w, (bytes, _)) in c.written.iter_mut().zip(self.bytes.iter()) {
            w.pvops = *bytes;
        }
        for m in c.members[..c.n].iter_mut() {
            m.inline = 0;
            m.direct = 0;
        }
        for (w, (_, action)) in c.written.iter().zip(self.bytes.iter()) {
            let m = &mut c.members[w.member as usize];
            match action {
                Some(KernelAction::Inline) => m.inline += 1,
                Some(KernelAction::Direct) => m.direct += 1,
                None => {}
            }
        }
        let n = c.n;
        for (m, given) in c.members[..n].iter_mut().zip(self.given.iter()) {
            m.given = *given;
        }
        c.chosen = Some(self.to);
        c.ops = Some(self.ops);
        c.ipis_given = self.ipis_given;
        for k in KernelClock::ALL {
            let hold = &mut c.clocks[k as usize];
            let given = self.clocks[k as usize];
            if hold.linux_fn == 0 {
                continue;
            }
            let (was, now) = (
                Holder::Pvops.unless(hold.given),
                Holder::Pvops.unless(given),
            );
            hold.given = given;
            if k == KernelClock::Steal && now == Holder::Pvops {
                STEAL_FN.store(self.ops.target(Op::StealClock), Ordering::Relaxed);
            }
            // pv_sched_clock stays pvops's function while both backends serve it (the new
            // one's clock is behind it since the stop_machine); the steal clock is the
            // backend's own function
            if was != now || k == KernelClock::Steal {
                k.hand(now, hold.linux_fn);
            }
        }
        c.switches += 1;
        let bad = mismatches(c, lasting(c), Holder::Pvops) + others_mismatch(c, Holder::Pvops);
        if bad > 0 {
            pr_err!(
                "kernel: {} sites and pv_ops members do not read back as written\n",
                bad
            );
        } else {
            let (pvops, linux) = c
                .written
                .iter()
                .zip(self.bytes.iter())
                .filter(|(w, _)| !w.init)
                .fold((0, 0), |(p, l), (_, (_, action))| match action {
                    Some(_) => (p + 1, l),
                    None => (p, l + 1),
                });
            pr_info!(
                "kernel: {} sites switched to {} ({} of its bytes, {} Linux's), read back byte \
                 for byte\n",
                pvops + linux,
                self.to.selection.backend,
                pvops,
                linux
            );
        }
        if let Ok(text) = CString::try_from_fmt(format_args!("{}", Report(c, bad))) {
            // SAFETY: a NUL-terminated string; the shim copies it.
            unsafe { shim::pvops_shim_set_kernel_report(text.as_char_ptr()) };
        }
        publish_holder(c);
        bad
    }
}
