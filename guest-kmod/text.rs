// SPDX-License-Identifier: GPL-2.0

//! The text writer: this module's call sites ([`module_sites`]), read in place
//! ([`ReadOnlyText`]) and written through a temporary writable alias of their pages
//! ([`AliasText`]) while `stop_machine` parks the other CPUs: patched or reverted
//! ([`transition`]), or switched from one backend's bytes and table to another's
//! ([`switch_sites`]), with more text switched in the same stop_machine where the caller has
//! some ([`AlsoSwitched`]: built in, the kernel's own sites).

use core::ffi::{c_int, c_void};

use pvops::ops::PvOps;
use pvops::site::SiteRecord;
use pvops::{PatchError, PatchReport, Patcher, SiteTable, PV_OPS};

use crate::faults::{self, Step};
use crate::shim;

extern "C" {
    /// Start of the call-site section: defined by sites_start.S, the module's first object.
    static pvops_sites_start: SiteRecord;
    /// End of the call-site section: defined by sites_end.S, the module's last object.
    static pvops_sites_end: SiteRecord;
}

/// This module's call sites: everything between the two markers.
pub(crate) fn module_sites() -> SiteTable {
    // SAFETY: sites_start.S and sites_end.S are the first and last objects of the module, so the
    // linker put every record of the `pvops_sites` section between their two symbols.
    unsafe {
        SiteTable::from_bounds(
            core::ptr::addr_of!(pvops_sites_start),
            core::ptr::addr_of!(pvops_sites_end),
        )
    }
}

/// Module text, written through a temporary writable alias of its pages.
struct AliasText {
    /// The first page of the aliased range (the address `alias` maps).
    page: usize,
    /// The writable alias of `page` and the pages after it.
    alias: *mut u8,
}

/// Text read in place (verifying needs no alias).
pub(crate) struct ReadOnlyText;

impl pvops::ReadText for ReadOnlyText {
    fn read(&self, addr: usize, out: &mut [u8]) {
        // SAFETY: `addr` is a call site inside this module's (or the kernel's) text, which is
        // mapped and readable.
        unsafe { core::ptr::copy_nonoverlapping(addr as *const u8, out.as_mut_ptr(), out.len()) };
    }
}

impl pvops::ReadText for AliasText {
    fn read(&self, addr: usize, out: &mut [u8]) {
        ReadOnlyText.read(addr, out)
    }
}

impl pvops::Text for AliasText {
    unsafe fn write(&mut self, addr: usize, bytes: &[u8]) {
        // SAFETY: the alias maps every page from `page` to the end of module text writable; the
        // engine verified the site; stop_machine keeps every other CPU out of it.
        unsafe {
            core::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.alias.add(addr - self.page),
                bytes.len(),
            )
        };
    }
}

/// More of a live switch, done in the same stop_machine as this module's sites: built in, the
/// kernel's own sites, `pv_ops` and the kernel's clocks (`builtin::KernelSwitch`).
pub(crate) trait AlsoSwitched {
    /// Whether everything it writes holds what it should now; runs first, writes nothing, and
    /// a `false` refuses the whole switch.
    fn check(&mut self) -> bool;
    /// Write it: after this module's sites were switched and the new table installed, with
    /// every other CPU parked.
    fn write(&mut self);
}

/// What a [`Job`] does to the sites.
enum Kind<'a> {
    /// Original bytes to the patcher's.
    Apply,
    /// The patcher's bytes back to the original ones.
    Revert,
    /// From `from`'s bytes to the patcher's, installing `table` (the new backend's) in
    /// [`PV_OPS`] and carrying the clock on.
    Switch {
        /// The running backend's patch set.
        from: &'a Patcher<'a>,
        /// The new backend's table.
        table: &'a PvOps,
        /// What else the switch writes.
        also: Option<&'a mut dyn AlsoSwitched>,
    },
}

/// One patch, revert or switch, run under stop_machine.
struct Job<'a> {
    /// The sites and what to write into them.
    patcher: &'a Patcher<'a>,
    /// Where to write.
    text: AliasText,
    /// What to do.
    kind: Kind<'a>,
    /// The engine's answer; `None` if the callback never ran.
    result: Option<Result<PatchReport, PatchError>>,
    /// A switch: the old backend's clock at the switch.
    clock: u64,
    /// A switch: whether [`AlsoSwitched::check`] refused it.
    also_refused: bool,
}

/// stop_machine callback.
///
/// # Safety
///
/// `data` points at a live `Job`.
unsafe extern "C" fn run_job(data: *mut c_void) -> c_int {
    // SAFETY: `transition` passes a pointer to its own `Job`, alive until stop_machine returns.
    let job = unsafe { &mut *data.cast::<Job<'_>>() };
    // fault=site: one byte of the first site changed under the engine, put back after it
    let tampered = match job.patcher.sites().next() {
        Some(site) if faults::hit(Step::Site, "a site changed under the engine") => {
            let mut b = [0u8];
            pvops::ReadText::read(&job.text, site.addr, &mut b);
            // SAFETY: a byte of a site, through the alias; stop_machine keeps every other CPU
            // out of it, and it is put back below before any CPU can run it.
            unsafe { pvops::Text::write(&mut job.text, site.addr, &[b[0] ^ 0xff]) };
            Some((site.addr, b[0]))
        }
        _ => None,
    };
    job.result = match &mut job.kind {
        Kind::Apply => Some(job.patcher.apply(&mut job.text)),
        Kind::Revert => Some(job.patcher.revert(&mut job.text)),
        Kind::Switch { from, table, also } => 'switch: {
            if also.as_deref_mut().is_some_and(|a| !a.check()) {
                job.also_refused = true;
                break 'switch None;
            }
            // SAFETY: sched_clock has no precondition; the old table is still installed.
            let old = unsafe { (PV_OPS.get().timer.sched_clock)() };
            let r = job.patcher.switch_from(from, &mut job.text);
            if r.is_ok() {
                // SAFETY: every other CPU is parked outside the ops (stop_machine), and the
                // new backend's functions honour the contracts (started by the caller).
                unsafe { PV_OPS.install(table) };
                // SAFETY: as above.
                let new = unsafe { (table.timer.sched_clock)() };
                pvops_backends::time::continue_clock(old, new);
                job.clock = old;
                if let Some(also) = also {
                    also.write();
                }
            }
            Some(r)
        }
    };
    if let Some((addr, byte)) = tampered {
        // SAFETY: as above; the engine refused the set, so the site holds the changed byte.
        unsafe { pvops::Text::write(&mut job.text, addr, &[byte]) };
    }
    // SAFETY: serialising this CPU has no precondition; the others serialise on their way
    // out of stop_machine (interrupt return).
    unsafe { shim::pvops_shim_sync_core() };
    0
}

/// Why a patch or revert did not happen. Nothing was written in any case.
pub(crate) enum TransitionError {
    /// The engine refused (a site does not hold what it expects).
    Patch(PatchError),
    /// The text alias could not be mapped.
    NoAlias,
    /// stop_machine failed.
    StopMachine(c_int),
    /// A switch's [`AlsoSwitched::check`] refused (it says why).
    Also,
}

impl core::fmt::Display for TransitionError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            TransitionError::Patch(e) => write!(f, "{e}"),
            TransitionError::NoAlias => f.write_str("cannot map the call sites' text writable"),
            TransitionError::StopMachine(rc) => write!(f, "stop_machine failed ({rc})"),
            TransitionError::Also => {
                f.write_str("a kernel site does not hold the running backend's bytes")
            }
        }
    }
}

/// Patch (or revert) every site, all or nothing, with the other CPUs parked.
pub(crate) fn transition(
    patcher: &Patcher<'_>,
    revert: bool,
) -> Result<PatchReport, TransitionError> {
    let kind = if revert { Kind::Revert } else { Kind::Apply };
    run(patcher, kind).map(|(r, _)| r)
}

/// A live switch, all or nothing, with the other CPUs parked: every site from `from`'s bytes
/// to `to`'s, and `table` (`to`'s backend's) installed, the clock carried on across, then
/// `also` written. Returns what `to` patched and the clock's reading at the switch. On error
/// nothing was written and the old table is still installed.
pub(crate) fn switch_sites<'a>(
    to: &'a Patcher<'a>,
    from: &'a Patcher<'a>,
    table: &'a PvOps,
    also: Option<&'a mut dyn AlsoSwitched>,
) -> Result<(PatchReport, u64), TransitionError> {
    run(to, Kind::Switch { from, table, also })
}

/// Run `kind` on `patcher`'s sites through a writable alias, under stop_machine.
fn run<'a>(
    patcher: &'a Patcher<'a>,
    kind: Kind<'a>,
) -> Result<(PatchReport, u64), TransitionError> {
    let Some((start, end)) = patcher.span() else {
        return Ok((PatchReport::default(), 0));
    };
    let page = start & !0xfff;
    if faults::hit(Step::Alias, "the text alias") {
        return Err(TransitionError::NoAlias);
    }
    // SAFETY: [start, end) is text of this module (or of the kernel, when built in) holding
    // call sites; the alias is dropped below.
    let alias = unsafe { shim::pvops_shim_alias_text(start, end) };
    if alias.is_null() {
        return Err(TransitionError::NoAlias);
    }
    let mut job = Job {
        patcher,
        text: AliasText {
            page,
            alias: alias.cast(),
        },
        kind,
        result: None,
        clock: 0,
        also_refused: false,
    };
    let rc = if faults::hit(Step::StopMachine, "stop_machine") {
        -(kernel::bindings::ENOMEM as c_int)
    } else {
        // SAFETY: `job` outlives the call; run_job is the matching callback.
        unsafe { shim::pvops_shim_stop_machine(Some(run_job), core::ptr::addr_of_mut!(job).cast()) }
    };
    // SAFETY: the alias came from pvops_shim_alias_text and is no longer used.
    unsafe { shim::pvops_shim_unalias_text(alias) };
    match job.result {
        Some(r) => r.map(|r| (r, job.clock)).map_err(TransitionError::Patch),
        None if job.also_refused => Err(TransitionError::Also),
        None => Err(TransitionError::StopMachine(rc)),
    }
}
