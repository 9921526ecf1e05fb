// SPDX-License-Identifier: GPL-2.0

//! Fault injection: the `fault=` parameter, a debug knob that makes one step of a load, or of
//! a live switch, fail as the kernel's own would, so that a rig can try every one
//! (scripts/guest-init.sh, check `fault-injection`). Read at the start of each load and switch
//! ([`arm`]); root may change it between them (`/sys/module/pvops_guest/parameters/fault`).
//!
//! | value | what fails | what must follow |
//! |---|---|---|
//! | `platform:N` | the N-th (from 1) fallible call a backend's probe or start makes of the kernel ([`KernelPlatform`]: an MSR that faults, no free page, memory that is not RAM, no writable alias of the text) | the backend starts regardless, or is refused (or, for `auto` at load, replaced by native), with a message |
//! | `alias` | the writable alias of the sites' text cannot be mapped | nothing written: a load keeps the sites indirect, a switch is refused |
//! | `stop-machine` | `stop_machine` fails | the same |
//! | `site` | a site holds other bytes than the engine expects when it comes to write (one byte changed under `stop_machine`, put back after) | the same |
//! | `kernel-site` | built in, a switch only: one of the kernel's sites pvops wrote holds other bytes when the switch checks them (one byte changed under `stop_machine`, put back after) | the switch is refused, nothing written |
//! | `alloc` | an allocation of the report (a load), of the kernel sites' new bytes (a switch, built in) | the load ends with -ENOMEM, everything undone; the switch is refused |
//!
//! Empty (the default): nothing fails. An unknown value refuses the load (-EINVAL) or the switch.
//!
//! [`KernelPlatform`]: crate::platform::KernelPlatform

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};

use kernel::prelude::*;

use crate::shim;

/// A step that can be made to fail.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Step {
    /// Nothing (the knob is empty).
    Nothing = 0,
    /// A backend's N-th fallible platform call.
    Platform,
    /// The text alias.
    Alias,
    /// stop_machine.
    StopMachine,
    /// A site changed under the engine.
    Site,
    /// An allocation of the report, or of a built-in switch's list of new bytes.
    Alloc,
    /// A kernel site changed under a built-in switch.
    KernelSite,
}

/// The armed step.
static STEP: AtomicU8 = AtomicU8::new(Step::Nothing as u8);
/// `platform:N`: N.
static AT: AtomicU32 = AtomicU32::new(0);
/// Fallible platform calls counted since [`arm`], while [`counting`] is on.
static CALLS: AtomicU32 = AtomicU32::new(0);
/// Whether platform calls are counted (a probe or start is running).
static COUNTING: AtomicBool = AtomicBool::new(false);

/// The value of `fault=` is not one of the table's.
pub(crate) struct Unknown;

/// Read `fault=` and arm its step for the load (`load`) or switch about to run.
pub(crate) fn arm(load: bool) -> Result<(), Unknown> {
    let what = if load { "load" } else { "switch" };
    let mut buf = [0u8; 32];
    // SAFETY: the shim copies at most 31 bytes and a NUL into the buffer.
    unsafe { shim::pvops_shim_fault_param(buf.as_mut_ptr().cast(), buf.len()) };
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let value = core::str::from_utf8(&buf[..len]).unwrap_or("?").trim();
    let (step, at) = match value {
        "" => (Step::Nothing, 0),
        "alias" => (Step::Alias, 0),
        "stop-machine" => (Step::StopMachine, 0),
        "site" => (Step::Site, 0),
        "alloc" => (Step::Alloc, 0),
        "kernel-site" => (Step::KernelSite, 0),
        v => match v.strip_prefix("platform:").map(str::parse::<u32>) {
            Some(Ok(n)) if n > 0 => (Step::Platform, n),
            _ => {
                pr_err!(
                    "fault={}: not platform:N (N from 1), alias, stop-machine, site, kernel-site, alloc or empty; {} refused\n",
                    value,
                    what
                );
                return Err(Unknown);
            }
        },
    };
    // (a module's switch allocates nothing that can fail; a load has no kernel sites to switch)
    let applies = match step {
        Step::Alloc => load || cfg!(not(MODULE)),
        Step::KernelSite => !load && cfg!(not(MODULE)),
        _ => true,
    };
    if !applies {
        pr_info!(
            "fault injection: {} does not apply to this {}; nothing armed\n",
            value,
            what
        );
        STEP.store(Step::Nothing as u8, Ordering::Relaxed);
        return Ok(());
    }
    STEP.store(step as u8, Ordering::Relaxed);
    AT.store(at, Ordering::Relaxed);
    CALLS.store(0, Ordering::Relaxed);
    if step != Step::Nothing {
        pr_info!("fault injection: {} armed for this {}\n", value, what);
    }
    Ok(())
}

/// Count the backends' fallible platform calls from now (`true`) or stop (`false`), in a load
/// (`load`) or a switch; stopping says when `platform:N` was never reached, which ends a rig's
/// walk through N.
pub(crate) fn counting(on: bool, load: bool) {
    COUNTING.store(on, Ordering::Relaxed);
    if !on && STEP.load(Ordering::Relaxed) == Step::Platform as u8 {
        let (at, calls) = (AT.load(Ordering::Relaxed), CALLS.load(Ordering::Relaxed));
        let what = if load { "load" } else { "switch" };
        if calls < at {
            pr_info!(
                "fault injection: platform:{} not reached in this {} ({} fallible calls)\n",
                at,
                what,
                calls
            );
        }
        STEP.store(Step::Nothing as u8, Ordering::Relaxed);
    }
}

/// Whether the fallible platform call `what` must fail (`platform:N`, the N-th while counting).
pub(crate) fn platform(what: &str) -> bool {
    if !COUNTING.load(Ordering::Relaxed) || STEP.load(Ordering::Relaxed) != Step::Platform as u8 {
        return false;
    }
    let n = CALLS.fetch_add(1, Ordering::Relaxed) + 1;
    let fail = n == AT.load(Ordering::Relaxed);
    if fail {
        pr_info!(
            "fault injection: fallible platform call {} ({}) fails\n",
            n,
            what
        );
    }
    fail
}

/// Whether `step` must fail now; it fails once per [`arm`].
pub(crate) fn hit(step: Step, what: &str) -> bool {
    let fail = STEP
        .compare_exchange(
            step as u8,
            Step::Nothing as u8,
            Ordering::Relaxed,
            Ordering::Relaxed,
        )
        .is_ok();
    if fail {
        pr_info!("fault injection: {} fails\n", what);
    }
    fail
}
