//! # pvops backends
//!
//! One file per backend, each filling the [`pvops`] table for its hypervisor:
//!
//! | backend | file | status |
//! |---|---|---|
//! | native | [`native`] | built |
//! | KVM | `kvm.rs` | not built yet (reported as such) |
//! | Xen HVM and PV | `xen.rs` | not built yet |
//! | VMI | `vmi.rs` | not built yet |
//! | lguest | `lguest.rs` | not built yet |
//!
//! [`candidates`] asks each backend whether its hypervisor is here; [`pvops::select`] picks one;
//! [`backend`] hands out the chosen backend, ready to install. A backend that is not part of
//! this build answers [`Presence::NotBuilt`], so a KVM guest reports "kvm backend not built"
//! rather than silently running native.
//!
//! ## Adding a backend
//!
//! 1. Write `src/<name>.rs` with a type implementing [`pvops::Backend`] (its table and its inline
//!    replacements) and a presence probe.
//! 2. Answer for it in [`candidates`] and return it from [`backend`].
//! 3. Add a rig (`scripts/rig <name>`) and host tests with a modelled hypervisor.
#![cfg_attr(not(test), no_std)]

pub mod kvm;
pub mod native;

use pvops::{BackendId, Candidate, Detection, Presence};

/// What the environment tells backends that CPUID cannot: hooks for detection and the facts the
/// kernel (or a test) already knows.
pub trait Platform {
    /// The TSC frequency in kHz, 0 when unknown.
    fn tsc_khz(&self) -> u64;
}

/// Each backend's answer to "is your hypervisor here?".
pub fn candidates(_detection: &Detection, _platform: &dyn Platform) -> [Candidate; 5] {
    BackendId::ALL.map(|id| Candidate {
        id,
        presence: match id {
            BackendId::Native => Presence::Present { base: None },
            BackendId::Kvm | BackendId::Xen | BackendId::Vmi | BackendId::Lguest => {
                Presence::NotBuilt
            }
        },
    })
}

/// Bring the selected backend up and hand it out, ready to install.
pub fn backend(id: BackendId, platform: &dyn Platform) -> Option<&'static dyn pvops::Backend> {
    match id {
        BackendId::Native => {
            native::init(platform.tsc_khz());
            Some(&native::NATIVE)
        }
        BackendId::Kvm | BackendId::Xen | BackendId::Vmi | BackendId::Lguest => None,
    }
}
