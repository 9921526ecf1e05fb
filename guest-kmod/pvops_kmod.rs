// SPDX-License-Identifier: GPL-2.0

//! pvops guest module: detect → select → fill the table → patch this module's call sites →
//! report (dmesg and `/sys/kernel/pvops/`); on unload, every site is restored byte for byte.
//!
//! Parameter `backend=` (`auto` or a name of the backend registry, [`pvops_backends::BACKENDS`],
//! which `modinfo` lists): an unknown name is refused with -EINVAL and a backend whose
//! hypervisor is absent with -ENODEV; in both cases nothing is installed or patched.

use core::format_args as fmt;
use kernel::prelude::*;
use kernel::str::CString;
use pvops::{Backend, BackendId, BackendOps, PatchReport, Patcher, Request, PV_OPS};
use pvops_backends::{Platform as _, BACKENDS};

use platform::KernelPlatform;
use selftest::{selftest, Failed, Lines};
use text::{module_sites, transition, ReadOnlyText};

#[cfg(not(MODULE))]
mod adapters;
mod bench;
#[cfg(not(MODULE))]
mod builtin;
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

/// detect → probe → select → start, for `request`; errors are reported here.
pub(crate) fn choose(request: Request) -> Result<Chosen> {
    let t0 = pvops::arch::rdtsc_ordered();
    let detection = pvops::detect(pvops_backends::cpuid_source(&KernelPlatform));
    let t1 = pvops::arch::rdtsc_ordered();
    // every backend probed once; the chosen one starts from what its probe found
    let probes = pvops_backends::probe(&detection, &KernelPlatform);
    for a in probes.absences().filter(|a| a.refused) {
        pr_warn!("{}: {}; the {} backend is absent\n", a.id, a.why, a.id);
    }
    let candidates = probes.candidates();
    let selection = pvops::select(request, &detection, &candidates).map_err(|e| {
        match probes.absences().find(|a| Some(a.id) == e.backend()) {
            Some(a) => pr_err!("{} ({}); nothing patched\n", e, a.why),
            None => pr_err!("{}; nothing patched\n", e),
        }
        ENODEV
    })?;
    let (selection, backend) = match probes.start(selection.backend, &detection, &KernelPlatform) {
        Ok(b) => (selection, b),
        Err(e) => {
            let Some(native) = selection.fall_back(request, &candidates) else {
                pr_err!(
                    "backend {} failed to start ({}); nothing patched\n",
                    selection.backend,
                    e
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
    Ok(Chosen {
        selection,
        backend,
        detect: t1 - t0,
        select: t2 - t1,
    })
}

/// The loaded module: what unloading has to undo.
struct PvopsGuest {
    /// The running backend.
    backend: &'static dyn Backend,
    /// Its ops, as installed and patched for.
    ops: BackendOps,
    /// Whether the sites were patched (else they are still the indirect calls).
    patched: bool,
}

impl PvopsGuest {
    /// The patcher for this module's sites and the running backend.
    fn patcher(&self) -> Patcher<'_> {
        // Records were checked at load; they cannot have changed.
        Patcher::new(module_sites(), PV_OPS.addr(), &self.ops).unwrap_or_else(|_| unreachable!())
    }
}

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
        // From here on, dropping `guest` (an error below) undoes everything: sites, table,
        // backend, sysfs, debugfs.
        let mut guest = PvopsGuest {
            backend,
            ops,
            patched: false,
        };
        let patcher = guest.patcher();

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
                        ..Default::default()
                    },
                    false,
                )
            }
        };
        let verified = !patched || patcher.verify(&ReadOnlyText, true).is_ok();
        guest.patched = patched;
        // built in: the kernel's own sites pvops wrote at boot, read back against the plan
        #[cfg(not(MODULE))]
        builtin::readback();

        // report
        let st = selftest(backend, &guest.ops);
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
        let tsc_khz = KernelPlatform.tsc_khz();
        // SAFETY: the debugfs file that runs the benchmark does not exist yet.
        unsafe {
            bench::set_state(Some(bench::State {
                backend,
                ops: guest.ops,
                load,
                tsc_khz,
            }))
        };
        // SAFETY: creates /sys/kernel/debug/pvops; removed in drop.
        unsafe { shim::pvops_shim_debugfs_create() };
        Ok(guest)
    }
}

impl Drop for PvopsGuest {
    fn drop(&mut self) {
        // SAFETY: removes what init created (a no-op if it was not); debugfs removal waits for
        // a running benchmark, after which the state can go.
        unsafe {
            shim::pvops_shim_sysfs_remove();
            shim::pvops_shim_debugfs_remove();
            bench::set_state(None);
        }
        let patcher = self.patcher();
        if self.patched {
            match transition(&patcher, true) {
                Ok(r) => match patcher.verify(&ReadOnlyText, false) {
                    Ok(()) => pr_info!("unload: {} sites restored byte-exact\n", r.total),
                    Err(e) => pr_err!("unload: restore did not verify: {}\n", e),
                },
                Err(e) => pr_err!("unload: sites left patched: {}\n", e),
            }
        } else {
            pr_info!("unload: nothing was patched\n");
        }
        // SAFETY: the module is going away; none of its ops can run any more.
        unsafe { PV_OPS.clear() };
        let released = pvops_backends::stop(self.backend.id(), &KernelPlatform);
        pr_info!(
            "unload: backend {} removed ({})\n",
            self.backend.id(),
            released
        );
    }
}
