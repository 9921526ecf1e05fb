//! # pvops: paravirt_ops for Rust
//!
//! One kernel binary, many hypervisors: a table of low-level operations ([`ops::PvOps`]: CPU,
//! IRQ, MMU and timer groups) is filled in at load time by the backend that matches the
//! machine, and every call site is then patched so that the native case costs nothing.
//!
//! The path, in the order it runs:
//!
//! 1. **detect** — [`detect::detect`] scans CPUID (the hypervisor bit, then every base from
//!    0x4000_0000 to 0x4000_FF00) and reports every interface it saw;
//! 2. **select** — [`select::select`] turns the request (`auto` or a backend name), the
//!    detection and each backend's presence answer into a [`select::Selection`]: the backend
//!    and the reason;
//! 3. **fill** — the chosen [`select::Backend`]'s table is installed into [`ops::PV_OPS`];
//! 4. **patch** — [`patch::Patcher`] rewrites every call site recorded in the image's
//!    `pvops_sites` section ([`site::SiteTable`]): inline instructions, a direct call, or the
//!    indirect call left as it is; verified first, all or nothing, and exactly reversible;
//! 5. **report** — the selection and the [`patch::PatchReport`] are values the caller prints
//!    (`Display` gives the dmesg line), never something inferred from function pointers.
//!
//! Callers use the wrappers in [`ops::cpu`], [`ops::irq`], [`ops::mmu`] and [`ops::timer`];
//! each inlines one call site.
//!
//! The crate is `no_std`, allocates nothing, uses no floating point and no 128-bit division:
//! it is compiled into a Linux kernel module with the kernel's own flags.
#![cfg_attr(not(test), no_std)]

pub mod arch;
pub mod detect;
pub mod linux;
pub mod ops;
pub mod patch;
pub mod select;
pub mod site;

pub use detect::{detect, Detection, HypervisorKind, Interface};
pub use ops::{BackendOps, CalleeSave, Impl, Inline, Op, PvOps, PV_OPS};
pub use patch::{PatchError, PatchReport, Patcher, ReadText, Text};
pub use select::{
    select, Backend, BackendId, Candidate, NullHypercall, Presence, Reason, Request, Selection,
};
pub use site::SiteTable;
