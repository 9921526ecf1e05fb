// SPDX-License-Identifier: GPL-2.0

//! pvops guest module: detect → select → fill the table → patch this module's call sites →
//! report (dmesg and `/sys/kernel/pvops/`); a live switch of backend on a write to
//! `/sys/kernel/pvops/backend` ([`pvops_switch_backend`]); on unload, every site is restored
//! byte for byte.
//!
//! Parameter `backend=` (`auto` or a name of the backend registry, [`pvops_backends::BACKENDS`],
//! which `modinfo` lists): an unknown name is refused with -EINVAL and a backend whose
//! hypervisor is absent with -ENODEV; in both cases nothing is installed or patched. Parameter
//! `fault=`: a debug knob that makes one step fail ([`faults`]).

use core::cell::UnsafeCell;
use core::ffi::c_int;
use core::format_args as fmt;
use kernel::prelude::*;
use kernel::str::CString;
use pvops::{Backend, BackendId, BackendOps, PatchReport, Patcher, Request, PV_OPS};
use pvops_backends::{Platform as _, BACKENDS};

use platform::KernelPlatform;
use selftest::{selftest, Failed, Lines};
use text::{module_sites, switch_sites, transition, ReadOnlyText};

#[cfg(not(MODULE))]
mod adapters;
mod bench;
#[cfg(not(MODULE))]
mod builtin;
mod faults;
mod modinfo;
mod platform;
mod selftest;
mod text;

module! {
    type: PvopsGuest,
    name: "pvops_guest",
    author: "pvops developers",
    description: "paravirt_ops in Rust: picks a backend, patches its call sites, reports the choice",
    license: "GPL",
}

/// The C side: shim.c and linux_peer.c, declared by shim.h. Kbuild generates these bindings
/// from shim.h with bindgen (`shim_bindings.rs` in the object folder).
#[allow(
    missing_docs,
    non_camel_case_types,
    non_upper_case_globals,
    unreachable_pub,
    clippy::all
)]
// the built-in-only functions (builtin.rs) are unused in the module
#[cfg_attr(MODULE, allow(dead_code))]
mod shim {
    use kernel::ffi;

    include!(env!("PVOPS_SHIM_BINDINGS"));
}

/// The `backend=` parameter.
fn param() -> &'static str {
    // SAFETY: the shim returns the module parameter, a NUL-terminated string that lives as long
    // as the module.
    let s = unsafe { CStr::from_char_ptr(shim::pvops_shim_backend_param()) };
    s.to_str().unwrap_or("<invalid utf-8>")
}

/// What detect → probe → select → start chose.
#[derive(Clone, Copy)]
pub(crate) struct Chosen {
    /// The selection (with a fallback to native applied).
    pub(crate) selection: pvops::Selection,
    /// The started backend.
    pub(crate) backend: &'static dyn Backend,
    /// Cycles spent detecting.
    pub(crate) detect: u64,
    /// Cycles spent probing, selecting and starting.
    pub(crate) select: u64,
}

/// detect → probe → select → start, for `request` at load; errors are reported here. A
/// backend that fails to start falls back to native where `auto` allows it.
pub(crate) fn choose(request: Request) -> Result<Chosen> {
    choose_for(request, None)?.ok_or(ENODEV)
}

/// [`choose`], or for a live switch away from `running` (`Some`): then a backend that fails to
/// start is refused, never replaced by native, and a selection of `running` itself starts
/// nothing (`Ok(None)`).
fn choose_for(request: Request, running: Option<BackendId>) -> Result<Option<Chosen>> {
    // the backends' probes and start are what `fault=platform:N` counts
    faults::counting(true, running.is_none());
    let chosen = probe_and_start(request, running);
    faults::counting(false, running.is_none());
    chosen
}

/// [`choose_for`]'s work.
fn probe_and_start(request: Request, running: Option<BackendId>) -> Result<Option<Chosen>> {
    let t0 = pvops::arch::rdtsc_ordered();
    let detection = pvops::detect(pvops_backends::cpuid_source(&KernelPlatform));
    let t1 = pvops::arch::rdtsc_ordered();
    // every backend probed once; the chosen one starts from what its probe found
    let probes = pvops_backends::probe(&detection, &KernelPlatform);
    for a in probes.absences().filter(|a| a.refused) {
        pr_warn!("{}: {}; the {} backend is absent\n", a.id, a.why, a.id);
    }
    let nothing = if running.is_some() {
        "nothing changed"
    } else {
        "nothing patched"
    };
    let candidates = probes.candidates();
    let selection = pvops::select(request, &detection, &candidates).map_err(|e| {
        match probes.absences().find(|a| Some(a.id) == e.backend()) {
            Some(a) => pr_err!("{} ({}); {}\n", e, a.why, nothing),
            None => pr_err!("{}; {}\n", e, nothing),
        }
        ENODEV
    })?;
    if Some(selection.backend) == running {
        return Ok(None);
    }
    let (selection, backend) = match probes.start(selection.backend, &detection, &KernelPlatform) {
        Ok(b) => (selection, b),
        Err(e) => {
            let fallback = match running {
                None => selection.fall_back(request, &candidates),
                Some(_) => None,
            };
            let Some(native) = fallback else {
                pr_err!(
                    "backend {} failed to start ({}); {}\n",
                    selection.backend,
                    e,
                    nothing
                );
                return Err(ENODEV);
            };
            pr_warn!(
                "backend {} failed to start ({}); falling back to native\n",
                selection.backend,
                e
            );
            let b = probes
                .start(BackendId::NATIVE, &detection, &KernelPlatform)
                .map_err(|_| ENODEV)?;
            (native, b)
        }
    };
    let t2 = pvops::arch::rdtsc_ordered();
    Ok(Some(Chosen {
        selection,
        backend,
        detect: t1 - t0,
        select: t2 - t1,
    }))
}

/// The running backend: what a live switch replaces and unloading undoes.
#[derive(Clone, Copy)]
struct Running {
    /// How it was chosen.
    selection: pvops::Selection,
    /// The backend.
    backend: &'static dyn Backend,
    /// Its ops, as installed and patched for.
    ops: BackendOps,
    /// Whether the sites were patched (else they are still the indirect calls).
    patched: bool,
}

impl Running {
    /// The patcher for this module's sites and this backend.
    fn patcher(&self) -> Patcher<'_> {
        // Records were checked at load; they cannot have changed.
        Patcher::new(module_sites(), PV_OPS.addr(), &self.ops).unwrap_or_else(|_| unreachable!())
    }
}

/// Where [`Running`] is kept.
struct Slot(UnsafeCell<Option<Running>>);
// SAFETY: written by init before /sys/kernel/pvops exists, by a live switch (the sysfs write,
// which the shim serialises with the benchmark's lock) and by exit after the files are gone.
unsafe impl Sync for Slot {}
/// The running backend, from init to exit.
static RUNNING: Slot = Slot(UnsafeCell::new(None));

impl Slot {
    /// The running backend.
    ///
    /// # Safety
    ///
    /// No [`Slot::set`] runs at the same time (see the `Sync` impl).
    unsafe fn get(&self) -> Option<Running> {
        // SAFETY: forwarded contract.
        unsafe { *self.0.get() }
    }

    /// Replace the running backend.
    ///
    /// # Safety
    ///
    /// No other access runs at the same time (see the `Sync` impl).
    unsafe fn set(&self, r: Option<Running>) {
        // SAFETY: forwarded contract.
        unsafe { *self.0.get() = r };
    }
}

/// The loaded module. What unloading undoes is in [`RUNNING`], since a live switch
/// (`/sys/kernel/pvops/backend`, [`pvops_switch_backend`]) replaces it while the module lives.
struct PvopsGuest;

impl kernel::Module for PvopsGuest {
    fn init(_module: &'static ThisModule) -> Result<Self> {
        // detect → select
        let request = Request::parse(param(), &BACKENDS).map_err(|_| {
            pr_err!(
                "unknown backend '{}' (auto, or one of: {}); nothing patched\n",
                param(),
                modinfo::NAMES
            );
            EINVAL
        })?;
        faults::arm(true).map_err(|_| EINVAL)?;
        // built in, the backend was started at boot, before apply_alternatives (builtin.rs)
        #[cfg(not(MODULE))]
        let early = builtin::take_early();
        #[cfg(MODULE)]
        let early = None;
        let Chosen {
            selection,
            backend,
            detect: detect_cycles,
            select: select_cycles,
        } = match early {
            Some(c) => c,
            None => choose(request)?,
        };

        // fill
        let ops = backend.ops();
        if let Err(e) = Patcher::new(module_sites(), PV_OPS.addr(), &ops) {
            pr_err!("{}; nothing patched\n", e);
            pvops_backends::stop(selection.backend, &KernelPlatform);
            return Err(ENOEXEC);
        }
        // SAFETY: no op of this module runs yet, and the backend's functions honour the contracts.
        unsafe { PV_OPS.install(&ops.table()) };
        let mut running = Running {
            selection,
            backend,
            ops,
            patched: false,
        };
        // SAFETY: /sys/kernel/pvops does not exist yet. From here on, dropping `guest` (an
        // error below) undoes everything: sites, table, backend, sysfs, debugfs.
        unsafe { RUNNING.set(Some(running)) };
        let guest = PvopsGuest;
        let patcher = running.patcher();

        // patch
        let t3 = pvops::arch::rdtsc_ordered();
        let patch_result = transition(&patcher, false);
        let load = bench::LoadCost {
            detect: detect_cycles,
            select: select_cycles,
            patch: pvops::arch::rdtsc_ordered() - t3,
            sites: patcher.plan().total,
        };
        let (report, patched) = match patch_result {
            Ok(r) => (r, true),
            Err(e) => {
                pr_warn!("patching refused, sites stay indirect: {}\n", e);
                (
                    PatchReport {
                        total: patcher.plan().total,
                        indirect: patcher.plan().total,
                        ..Default::default()
                    },
                    false,
                )
            }
        };
        let verified = !patched || patcher.verify(&ReadOnlyText, true).is_ok();
        running.patched = patched;
        // SAFETY: as above.
        unsafe { RUNNING.set(Some(running)) };
        // built in: the kernel's own sites pvops wrote at boot, read back against the plan
        #[cfg(not(MODULE))]
        builtin::readback();

        // report
        publish(&running, &report, verified)?;
        pr_info!(
            "load: detect {} cycles, select {}, patch {} ({} sites)\n",
            load.detect,
            load.select,
            load.patch,
            load.sites
        );
        // SAFETY: creates the sysfs directory; removed in drop.
        let err = unsafe { shim::pvops_shim_sysfs_create() };
        if err != 0 {
            pr_warn!("/sys/kernel/pvops not created ({})\n", err);
        }
        // SAFETY: the debugfs file that runs the benchmark does not exist yet.
        unsafe { bench::set_state(Some(bench_state(&running, load))) };
        // SAFETY: creates /sys/kernel/debug/pvops; removed in drop.
        unsafe { shim::pvops_shim_debugfs_create() };
        Ok(guest)
    }
}

/// What the benchmark measures: the running backend.
fn bench_state(running: &Running, load: bench::LoadCost) -> bench::State {
    bench::State {
        backend: running.backend,
        ops: running.ops,
        load,
        tsc_khz: KernelPlatform.tsc_khz(),
    }
}

/// Run the self-test on the running backend and publish the report (dmesg, and the files of
/// /sys/kernel/pvops): which backend and why, its hypervisor, the sites as patched (`report`,
/// `verified` once written), the self-test's verdict and checks.
fn publish(running: &Running, report: &PatchReport, verified: bool) -> Result {
    let Running {
        selection,
        backend,
        ops,
        ..
    } = *running;
    if faults::hit(faults::Step::Alloc, "an allocation of the report") {
        return Err(ENOMEM);
    }
    let st = selftest(backend, &ops);
    let hypervisor = match selection.interface {
        Some(i) => CString::try_from_fmt(fmt!(
            "{} base={:#x} max_leaf={:#x}",
            i.signature_str(),
            i.base,
            i.max_leaf
        ))?,
        None => match pvops_backends::vmi::rom_in_use() {
            Some((pa, (major, minor)))
                if selection.backend
                    == <pvops_backends::vmi::Vmi as pvops_backends::Driver>::ID =>
            {
                CString::try_from_fmt(fmt!("VMI ROM at {pa:#x} API {major}.{minor}"))?
            }
            _ => CString::try_from_fmt(fmt!("none"))?,
        },
    };
    let sites = CString::try_from_fmt(fmt!(
        "{}/{} inline={} direct={} indirect={}",
        report.patched(),
        report.total,
        report.inline,
        report.direct,
        report.indirect
    ))?;
    let bytes = if verified { "verified" } else { "MISMATCH" };
    let (hc_nr, hc_ret) = st.hypercall.unwrap_or((0, 0));
    let hc = if st.hypercall.is_some() {
        "hypercall"
    } else {
        "no-hypercall"
    };
    let selftest = if st.failed().next().is_none() && verified {
        CString::try_from_fmt(fmt!(
            "ok bytes={bytes} checks={} n/a={} {hc}={hc_nr}:{hc_ret}",
            st.ran(),
            st.not_applicable()
        ))?
    } else {
        CString::try_from_fmt(fmt!(
            "FAILED bytes={bytes} checks={} n/a={} failed={} {hc}={hc_nr}:{hc_ret}",
            st.ran(),
            st.not_applicable(),
            Failed(&st)
        ))?
    };
    let checks = CString::try_from_fmt(fmt!("{}", Lines(&st)))?;
    let name = CString::try_from_fmt(fmt!("{}", selection.backend))?;
    // SAFETY: five NUL-terminated strings; the shim copies them.
    unsafe {
        shim::pvops_shim_set_report(
            name.as_char_ptr(),
            hypervisor.as_char_ptr(),
            sites.as_char_ptr(),
            selftest.as_char_ptr(),
            checks.as_char_ptr(),
        )
    };
    pr_info!(
        "{} sites={}/{} (inline {}, direct {}) selftest={} {}\n",
        selection,
        report.patched(),
        report.total,
        report.inline,
        report.direct,
        selftest.to_str().unwrap_or("?"),
        backend.describe()
    );
    Ok(())
}

/// A live switch: `echo NAME > /sys/kernel/pvops/backend` (root only). `name` (`len` bytes,
/// from the sysfs write) is parsed as the `backend=` parameter; the new backend is started,
/// every site rewritten from the old backend's bytes to the new one's and the table replaced
/// in one `stop_machine`, the sites verified, the self-test run on the new backend and the
/// report replaced; then the old backend is stopped. The clock handed to callers carries on
/// across it ([`pvops_backends::time::continue_clock`]). Any failure before the write leaves
/// the old backend, its table and every byte as they were, with a message. 0 or -errno.
///
/// # Safety
///
/// `name` points at `len` readable bytes; the caller (shim.c's sysfs write) holds the lock that
/// keeps the benchmark and other switches out, and the module's files exist (init is over,
/// exit has not begun).
#[no_mangle]
pub(crate) unsafe extern "C" fn pvops_switch_backend(name: *const u8, len: usize) -> c_int {
    // SAFETY: forwarded contract.
    let name = unsafe { core::slice::from_raw_parts(name, len) };
    // SAFETY: the caller holds the lock every other switch takes; init and exit do not run.
    match unsafe { switch(name) } {
        Ok(()) => 0,
        Err(e) => e.to_errno(),
    }
}

/// [`pvops_switch_backend`], with the bytes written.
///
/// # Safety
///
/// As for [`pvops_switch_backend`].
unsafe fn switch(name: &[u8]) -> Result {
    let name = core::str::from_utf8(name).unwrap_or("<invalid utf-8>");
    let shown = name.trim_end_matches('\n');
    let request = match Request::parse(name, &BACKENDS) {
        Ok(r) if !name.trim().is_empty() => r,
        _ => {
            pr_err!(
                "switch: unknown backend '{}' (auto, or one of: {}); nothing changed\n",
                shown.get(..64).unwrap_or(shown),
                modinfo::NAMES
            );
            return Err(EINVAL);
        }
    };
    faults::arm(false).map_err(|_| EINVAL)?;
    // SAFETY: the caller excludes every other access.
    let Some(old) = (unsafe { RUNNING.get() }) else {
        return Err(ENODEV);
    };
    if !old.patched {
        pr_err!(
            "switch: the sites stayed indirect at load (patching was refused); nothing changed\n"
        );
        return Err(EPERM);
    }
    let t0 = pvops::arch::rdtsc_ordered();
    let Some(chosen) = choose_for(request, Some(old.selection.backend))? else {
        pr_info!(
            "switch: {} is already the backend; nothing changed\n",
            old.selection.backend
        );
        return Ok(());
    };
    let new = Running {
        selection: chosen.selection,
        backend: chosen.backend,
        ops: chosen.backend.ops(),
        patched: true,
    };
    let refuse = |why: &dyn core::fmt::Display| {
        let released = pvops_backends::stop(new.selection.backend, &KernelPlatform);
        pr_err!(
            "switch to {} refused: {}; {} runs on, every byte as it was ({} {})\n",
            new.selection.backend,
            why,
            old.selection.backend,
            new.selection.backend,
            released
        );
    };
    let Ok(patcher) = Patcher::new(module_sites(), PV_OPS.addr(), &new.ops) else {
        refuse(&"the site records do not fit the new backend");
        return Err(ENOEXEC);
    };
    // built in, the kernel's own sites, pv_ops, clocks and IPIs switch with pvops's own
    // SAFETY: the caller holds the switch's lock and the holder lock; init is over.
    #[cfg(not(MODULE))]
    let mut kernel = match unsafe { builtin::prepare_switch(chosen, new.ops) } {
        Ok(k) => k,
        Err(builtin::NotSwitched(e, why)) => {
            refuse(&why);
            return Err(e);
        }
    };
    #[cfg(not(MODULE))]
    let also = kernel.as_mut().map(|k| k as &mut dyn text::AlsoSwitched);
    #[cfg(MODULE)]
    let also = None;
    let old_patcher = old.patcher();
    let table = new.ops.table();
    let t1 = pvops::arch::rdtsc_ordered();
    let clock = match switch_sites(&patcher, &old_patcher, &table, also) {
        Ok((_, clock)) => clock,
        Err(e) => {
            #[cfg(not(MODULE))]
            if let Some(k) = &kernel {
                k.refusal();
            }
            refuse(&e);
            return Err(EIO);
        }
    };
    let t2 = pvops::arch::rdtsc_ordered();
    let report = patcher.plan();
    let verified = patcher.verify(&ReadOnlyText, true).is_ok();
    // (the kernel's share is finished whatever the module's sites read back)
    // SAFETY: as above, after the stop_machine that wrote the kernel's share.
    #[cfg(not(MODULE))]
    let kernel_mismatches = kernel.map_or(0, |k| unsafe { k.finish() });
    #[cfg(not(MODULE))]
    let verified = verified && kernel_mismatches == 0;
    // SAFETY: the caller excludes every other access.
    unsafe { RUNNING.set(Some(new)) };
    // The old backend's functions are out of the table and of every site, and nothing of this
    // module runs them now (the benchmark waits on the caller's lock).
    let released = pvops_backends::stop(old.selection.backend, &KernelPlatform);
    // the clock through the new table, after the switch: it must not be behind `clock`
    // SAFETY: sched_clock has no precondition.
    let after = unsafe { (PV_OPS.get().timer.sched_clock)() };
    pr_info!(
        "switch: {} -> {}: {} sites rewritten in one stop_machine ({} cycles, {} in all); {} {}; clock {} ns at the switch, {} ns after it\n",
        old.selection.backend,
        new.selection.backend,
        report.total,
        t2 - t1,
        t2 - t0,
        old.selection.backend,
        released,
        clock,
        after
    );
    let load = bench::LoadCost {
        detect: chosen.detect,
        select: chosen.select,
        patch: t2 - t1,
        sites: report.total,
    };
    // SAFETY: the caller holds the benchmark's lock: no benchmark runs.
    unsafe { bench::set_state(Some(bench_state(&new, load))) };
    publish(&new, &report, verified)
}

impl Drop for PvopsGuest {
    fn drop(&mut self) {
        // SAFETY: removes what init created (a no-op if it was not); sysfs removal waits for a
        // running switch, debugfs removal for a running benchmark, after which the state can go.
        unsafe {
            shim::pvops_shim_sysfs_remove();
            shim::pvops_shim_debugfs_remove();
            bench::set_state(None);
        }
        // SAFETY: the files are gone: nothing else reads or writes the slot.
        let Some(running) = (unsafe { RUNNING.get() }) else {
            return;
        };
        let patcher = running.patcher();
        if running.patched {
            match transition(&patcher, true) {
                Ok(r) => match patcher.verify(&ReadOnlyText, false) {
                    Ok(()) => pr_info!("unload: {} sites restored byte-exact\n", r.total),
                    Err(e) => pr_err!("unload: restore did not verify: {}\n", e),
                },
                Err(e) => pr_err!("unload: sites left patched: {}\n", e),
            }
        } else {
            match patcher.verify(&ReadOnlyText, false) {
                Ok(()) => pr_info!(
                    "unload: nothing was patched; {} sites hold their original bytes\n",
                    patcher.plan().total
                ),
                Err(e) => pr_err!("unload: nothing was patched, yet {}\n", e),
            }
        }
        // SAFETY: the module is going away; none of its ops can run any more.
        unsafe { PV_OPS.clear() };
        // SAFETY: as above.
        unsafe { RUNNING.set(None) };
        let released = pvops_backends::stop(running.backend.id(), &KernelPlatform);
        pr_info!(
            "unload: backend {} removed ({})\n",
            running.backend.id(),
            released
        );
    }
}
