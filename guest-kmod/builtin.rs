// SPDX-License-Identifier: GPL-2.0

//! Built into the kernel: pvops as the kernel's own paravirt layer.
//!
//! `alternative_instructions()` calls [`pvops_kernel_early`] (kernel/pvops-early.patch) before
//! `apply_alternatives()`. There, with only the boot CPU running and kernel text still
//! writable, pvops detects, selects and starts its backend and installs its table.
//!
//! What is not available that early is deferred to the initcall (`PvopsGuest::init`, which
//! takes the started backend with [`take_early`]): the other CPUs (not up yet: a backend's
//! per-CPU registrations are read for CPU 0 only), sysfs, the self-test, and the patching of
//! pvops's own call sites (under `stop_machine`, as in the module).

use core::cell::UnsafeCell;

use kernel::prelude::*;
use pvops::{Request, PV_OPS};

use crate::{choose, param, shim, Chosen};

/// What boot did.
struct Early {
    /// The backend started at boot, until the initcall takes it.
    chosen: Option<Chosen>,
}

/// Written once by [`pvops_kernel_early`] (boot CPU alone) and read afterwards.
struct Slot(UnsafeCell<Early>);

// SAFETY: written only by pvops_kernel_early, which runs once on the boot CPU before any other
// CPU or thread exists; after it only the initcall (one thread, once) reads it and takes the
// backend out of it.
unsafe impl Sync for Slot {}

static EARLY: Slot = Slot(UnsafeCell::new(Early { chosen: None }));

/// What boot did.
///
/// # Safety
///
/// As for [`Slot`]: the boot CPU alone in [`pvops_kernel_early`], the initcall afterwards; no
/// two references are live at once.
unsafe fn early() -> &'static mut Early {
    // SAFETY: the caller's contract.
    unsafe { &mut *EARLY.0.get() }
}

/// The backend started at boot, for the initcall (once).
pub(crate) fn take_early() -> Option<Chosen> {
    // SAFETY: the initcall, after boot; the reference ends here.
    unsafe { early() }.chosen.take()
}

/// Called by `alternative_instructions()` before `apply_alternatives()` (the kernel patch).
///
/// # Safety
///
/// `start..end` is vmlinux's `.altinstructions`; only the boot CPU runs.
#[no_mangle]
pub(crate) unsafe extern "C" fn pvops_kernel_early(_start: *mut u8, _end: *mut u8) {
    // SAFETY: reads a flag set by early_param.
    if unsafe { shim::pvops_shim_kernel_param() } == 0 {
        pr_info!("kernel: pvops.kernel=off: Linux's paravirt layer left untouched\n");
        return;
    }
    let Ok(request) = Request::parse(param(), &pvops_backends::BACKENDS) else {
        // the initcall reports it
        return;
    };
    let Ok(chosen) = choose(request) else {
        return;
    };
    pr_info!(
        "kernel: {} started at boot (before apply_alternatives)\n",
        chosen.selection
    );
    // SAFETY: nothing calls pvops yet (its own sites are patched by the initcall); the
    // backend's functions honour the ops' contracts.
    unsafe { PV_OPS.install(&chosen.backend.ops().table()) };
    // SAFETY: the boot CPU alone runs, once (see `Slot`).
    unsafe { early() }.chosen = Some(chosen);
}
