//! Backends and the selection policy: which backend serves this machine, and why.
//!
//! The policy is a pure function of three inputs: the [`Request`] (the `backend=` parameter),
//! the CPUID [`Detection`], and one [`Candidate`] per backend saying whether that backend's
//! hypervisor is present (backends that are not announced through CPUID, VMI and lguest, answer
//! through their own platform hooks). The result names the backend and the reason, so the
//! choice is reported, never inferred.

use core::fmt;

use crate::detect::{Detection, HypervisorKind, Interface};
use crate::ops::{BackendOps, Op};

/// A backend's identity: its name, as parameters and reports spell it. pvops knows one backend
/// by name, [`BackendId::NATIVE`] (the real instructions, the policy's fallback); every other
/// comes from the registry of the backends crate that lists them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackendId(&'static str);

impl BackendId {
    /// Bare hardware (or a hypervisor with no paravirtual interface): the real instructions.
    pub const NATIVE: BackendId = BackendId("native");

    /// The backend called `name` (lower case, no spaces: it is a parameter value).
    pub const fn new(name: &'static str) -> BackendId {
        BackendId(name)
    }

    /// The name used in parameters and reports.
    pub const fn name(self) -> &'static str {
        self.0
    }

    /// The backend of `known` with this name.
    pub fn from_name(name: &str, known: &[BackendId]) -> Option<BackendId> {
        known.iter().copied().find(|b| b.0 == name)
    }
}

impl fmt::Display for BackendId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// A backend, ready to be installed: its ops (functions and inline replacements together).
///
/// Bringing a backend up (mapping shared pages, registering clocks) and tearing it down are its
/// lifecycle's business (the backends crate's `Driver`); this trait is what the rest of pvops
/// needs from a live one.
pub trait Backend: Sync {
    /// Which backend this is.
    fn id(&self) -> BackendId;

    /// What to install in [`PV_OPS`](crate::ops::PV_OPS) and what call sites may hold instead.
    fn ops(&self) -> BackendOps;

    /// A hypercall with no side effect and a known answer, for self-tests and benchmarks
    /// (`None`: the backend has no hypervisor to call).
    fn null_hypercall(&self) -> Option<NullHypercall> {
        None
    }

    /// What the backend set up, in a few words for the report (which records it reads, what
    /// it registered).
    fn describe(&self) -> &'static str {
        ""
    }

    /// Whether the backend's `op` may serve the kernel's own pv call sites when pvops is built
    /// into the kernel ([`crate::linux`]), and if not why (the built-in report shows it): it
    /// must not call back into the kernel's paravirt layer (an op that forwards to the kernel's
    /// own accessor would then call itself), must not share state with members the kernel
    /// keeps, and must have been checked against what the kernel's own implementation does.
    /// None by default.
    fn serves_kernel(&self, op: Op) -> Result<(), &'static str> {
        let _ = op;
        Err("this backend's ops are not checked against the kernel's own yet")
    }

    /// Whether `irq.send_ipi` sends IPIs (a hypervisor's PV send-IPI), so that the kernel's APIC
    /// callbacks should call it; false by default (none sent: the local APIC does). Said by the
    /// backend rather than inferred from its table (a function's address is not an identity
    /// across crates).
    fn sends_ipis(&self) -> bool {
        false
    }

    /// What the backend counted of its work since it started (name, count), for the report:
    /// none by default.
    fn counters(&self, each: &mut dyn FnMut(&'static str, u64)) {
        let _ = each;
    }
}

/// A harmless hypercall: `cpu.hypercall(args[0], args[1..])` must return `expect`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NullHypercall {
    /// Number and four arguments.
    pub args: [u64; 5],
    /// The answer.
    pub expect: i64,
}

/// Whether a backend's hypervisor is here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Presence {
    /// Present; `base` is the CPUID base it was found at (`None`: found by a platform hook).
    Present {
        /// CPUID base of the interface, if it was found by the scan.
        base: Option<u32>,
    },
    /// Not present on this machine (or present but refused by its backend).
    Absent,
}

/// One backend's answer to "is your hypervisor here?".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// The backend.
    pub id: BackendId,
    /// The CPUID interface it serves, if it is one the scan finds.
    pub serves: Option<HypervisorKind>,
    /// Its answer.
    pub presence: Presence,
}

/// What the user asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// Pick the best backend for what was detected.
    Auto,
    /// This backend or nothing.
    Backend(BackendId),
}

/// A `backend=` value that names no backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownBackend;

impl Request {
    /// Parse `auto` or the name of one of the `known` backends (surrounding whitespace and a
    /// trailing newline, as sysfs writes carry, are ignored; names are case-sensitive).
    pub fn parse(s: &str, known: &[BackendId]) -> Result<Request, UnknownBackend> {
        match s.trim() {
            "auto" | "" => Ok(Request::Auto),
            name => BackendId::from_name(name, known)
                .map(Request::Backend)
                .ok_or(UnknownBackend),
        }
    }
}

/// Why the backend was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Named in the request.
    Requested,
    /// Its hypervisor was detected.
    Detected,
    /// The CPU says there is no hypervisor.
    NoHypervisor,
    /// The hypervisor bit is set but no interface answered the scan.
    NoInterface,
    /// A hypervisor was found that no present backend serves (TCG, Hyper-V, VMware's CPUID
    /// interface…, or one whose backend refused it).
    Unsupported(HypervisorKind),
    /// The backend for the hypervisor found could not start (see [`Selection::fall_back`]).
    StartFailed(BackendId),
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Requested => f.write_str("requested"),
            Reason::Detected => f.write_str("detected"),
            Reason::NoHypervisor => f.write_str("no hypervisor"),
            Reason::NoInterface => f.write_str("hypervisor without a CPUID interface"),
            Reason::Unsupported(k) => write!(f, "no backend for {}", k.name()),
            Reason::StartFailed(b) => write!(f, "{b} backend failed to start"),
        }
    }
}

/// The policy's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Selection {
    /// The backend to install.
    pub backend: BackendId,
    /// Why.
    pub reason: Reason,
    /// The interface that decided it (or, for native, the hypervisor seen), if any.
    pub interface: Option<Interface>,
}

/// Why a request cannot be met. Nothing is installed or patched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SelectError {
    /// The requested backend's hypervisor is not here (`-ENODEV`).
    Absent(BackendId),
    /// `auto` found nothing that can run: no backend serves this hypervisor and the native
    /// instructions would fault (a deprivileged kernel, such as a Xen PV domain) (`-ENODEV`).
    NothingRuns,
}

impl SelectError {
    /// The backend the request named, if the error is about one.
    pub fn backend(&self) -> Option<BackendId> {
        match self {
            SelectError::Absent(id) => Some(*id),
            SelectError::NothingRuns => None,
        }
    }
}

impl fmt::Display for SelectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SelectError::Absent(BackendId::NATIVE) => {
                f.write_str("backend native requested but this kernel runs deprivileged")
            }
            SelectError::Absent(b) => {
                write!(f, "backend {b} requested but its hypervisor is absent")
            }
            SelectError::NothingRuns => f.write_str(
                "no backend can run here: none serves this hypervisor and native would fault",
            ),
        }
    }
}

/// A backend's answer: the candidate's, or absent if there is none; native, unless its
/// candidate says otherwise, can always run.
fn presence(candidates: &[Candidate], id: BackendId) -> Presence {
    let default = if id == BackendId::NATIVE {
        Presence::Present { base: None }
    } else {
        Presence::Absent
    };
    candidates
        .iter()
        .find(|c| c.id == id)
        .map_or(default, |c| c.presence)
}

/// Choose a backend.
///
/// - A named backend is chosen if its hypervisor is present, and refused otherwise. Native is
///   present unless its candidate says otherwise (a deprivileged kernel, where the real
///   instructions fault).
/// - `auto` prefers a backend found by a platform hook (VMI, lguest: they are exclusive), then
///   the CPUID interface at the highest base whose backend is present; otherwise native, with the
///   reason; and if native cannot run either, nothing ([`SelectError::NothingRuns`]).
pub fn select(
    request: Request,
    detection: &Detection,
    candidates: &[Candidate],
) -> Result<Selection, SelectError> {
    let interface_of = |id: BackendId| {
        let kind = candidates.iter().find(|c| c.id == id)?.serves?;
        detection
            .interfaces()
            .filter(|i| i.kind == kind)
            .last()
            .copied()
    };
    if let Request::Backend(id) = request {
        return match presence(candidates, id) {
            Presence::Present { .. } => Ok(Selection {
                backend: id,
                reason: Reason::Requested,
                interface: interface_of(id).or(detection.primary().copied()),
            }),
            Presence::Absent => Err(SelectError::Absent(id)),
        };
    }

    let present = candidates.iter().filter_map(|c| match c.presence {
        Presence::Present { base } if c.id != BackendId::NATIVE => Some((c.id, base)),
        _ => None,
    });
    // `None` (a platform hook) sorts above every CPUID base.
    if let Some((id, _)) = present.max_by_key(|&(_, base)| base.map_or(u64::MAX, u64::from)) {
        return Ok(Selection {
            backend: id,
            reason: Reason::Detected,
            interface: interface_of(id),
        });
    }

    let primary = detection.primary().copied();
    let reason = match primary {
        _ if !detection.hypervisor_bit => Reason::NoHypervisor,
        None => Reason::NoInterface,
        Some(i) => Reason::Unsupported(i.kind),
    };
    if presence(candidates, BackendId::NATIVE) != (Presence::Present { base: None }) {
        return Err(SelectError::NothingRuns);
    }
    Ok(Selection {
        backend: BackendId::NATIVE,
        reason,
        interface: primary,
    })
}

impl Selection {
    /// The selection to use when the selected backend failed to start: native, saying which
    /// backend failed, for an `auto` request where native can run; `None` when the backend was
    /// asked for by name (the request is refused instead), native itself failed, or native
    /// cannot run here.
    pub fn fall_back(&self, request: Request, candidates: &[Candidate]) -> Option<Selection> {
        let native_runs = matches!(
            presence(candidates, BackendId::NATIVE),
            Presence::Present { .. }
        );
        (request == Request::Auto && self.backend != BackendId::NATIVE && native_runs).then_some(
            Selection {
                backend: BackendId::NATIVE,
                reason: Reason::StartFailed(self.backend),
                interface: self.interface,
            },
        )
    }
}

impl fmt::Display for Selection {
    /// `backend=kvm reason=detected hypervisor=KVMKVMKVM@0x40000000`, the report's first half.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "backend={} reason=\"{}\" hypervisor=",
            self.backend, self.reason
        )?;
        match &self.interface {
            Some(i) => write!(f, "{}@{:#x}", i.signature_str(), i.base),
            None => f.write_str("none"),
        }
    }
}
