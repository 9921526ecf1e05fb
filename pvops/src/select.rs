//! Backends and the selection policy: which backend serves this machine, and why.
//!
//! The policy is a pure function of three inputs: the [`Request`] (the `backend=` parameter),
//! the CPUID [`Detection`], and one [`Candidate`] per backend saying whether that backend's
//! hypervisor is present (backends that are not announced through CPUID, VMI and lguest, answer
//! through their own platform hooks). The result names the backend and the reason, so the
//! choice is reported, never inferred.

use core::fmt;

use crate::detect::{Detection, HypervisorKind, Interface};
use crate::ops::PvOps;
use crate::patch::InlineSource;

/// The backends pvops knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendId {
    /// Bare hardware (or a hypervisor with no paravirtual interface): the real instructions.
    Native,
    /// KVM's paravirtual interface (kvmclock, steal time, hypercalls).
    Kvm,
    /// Xen, as an HVM guest or a PV domain.
    Xen,
    /// VMware's Virtual Machine Interface: a ROM the guest calls into.
    Vmi,
    /// lguest: a hypercall interface announced through boot data.
    Lguest,
}

impl BackendId {
    /// Every backend, in the order the policy lists them.
    pub const ALL: [BackendId; 5] = [
        BackendId::Native,
        BackendId::Kvm,
        BackendId::Xen,
        BackendId::Vmi,
        BackendId::Lguest,
    ];

    /// The name used in parameters and reports.
    pub fn name(self) -> &'static str {
        match self {
            BackendId::Native => "native",
            BackendId::Kvm => "kvm",
            BackendId::Xen => "xen",
            BackendId::Vmi => "vmi",
            BackendId::Lguest => "lguest",
        }
    }

    /// The backend with this name.
    pub fn from_name(name: &str) -> Option<BackendId> {
        Self::ALL.into_iter().find(|b| b.name() == name)
    }

    /// The backend that serves an interface of this kind, if any.
    pub fn for_kind(kind: HypervisorKind) -> Option<BackendId> {
        match kind {
            HypervisorKind::Kvm => Some(BackendId::Kvm),
            HypervisorKind::Xen => Some(BackendId::Xen),
            _ => None,
        }
    }
}

impl fmt::Display for BackendId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A backend, ready to be installed: its table and its inline replacements.
///
/// Bringing a backend up (mapping shared pages, registering clocks) and tearing it down are the
/// backend's own business; this trait is what the rest of pvops needs from a live one.
pub trait Backend: InlineSource + Sync {
    /// Which backend this is.
    fn id(&self) -> BackendId;

    /// The functions to install in [`PV_OPS`](crate::ops::PV_OPS).
    fn ops(&self) -> PvOps;

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
    /// Not present on this machine.
    Absent,
    /// This build does not contain the backend.
    NotBuilt,
}

/// One backend's answer to "is your hypervisor here?".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// The backend.
    pub id: BackendId,
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
    /// Parse `auto` or a backend name (surrounding whitespace and a trailing newline, as sysfs
    /// writes carry, are ignored).
    pub fn parse(s: &str) -> Result<Request, UnknownBackend> {
        match s.trim() {
            "auto" | "" => Ok(Request::Auto),
            name => BackendId::from_name(name)
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
    /// A hypervisor was found that no backend serves (TCG, Hyper-V, VMware's CPUID interface…).
    Unsupported(HypervisorKind),
    /// A hypervisor was found whose backend this build does not contain.
    NotBuilt(BackendId),
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
            Reason::NotBuilt(b) => write!(f, "{b} backend not built"),
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
    /// The requested backend is not part of this build (`-ENODEV`).
    NotBuilt(BackendId),
    /// `auto` found nothing that can run: no backend serves this hypervisor and the native
    /// instructions would fault (a deprivileged kernel, such as a Xen PV domain) (`-ENODEV`).
    NothingRuns,
}

impl fmt::Display for SelectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SelectError::Absent(BackendId::Native) => {
                f.write_str("backend native requested but this kernel runs deprivileged")
            }
            SelectError::Absent(b) => {
                write!(f, "backend {b} requested but its hypervisor is absent")
            }
            SelectError::NothingRuns => f.write_str(
                "no backend can run here: none serves this hypervisor and native would fault",
            ),
            SelectError::NotBuilt(b) => write!(f, "backend {b} requested but not built"),
        }
    }
}

/// A backend's answer; native, unless the platform says otherwise, can always run.
fn presence(candidates: &[Candidate], id: BackendId) -> Presence {
    let default = if id == BackendId::Native {
        Presence::Present { base: None }
    } else {
        Presence::NotBuilt
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
        detection
            .interfaces()
            .filter(|i| BackendId::for_kind(i.kind) == Some(id))
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
            Presence::NotBuilt => Err(SelectError::NotBuilt(id)),
        };
    }

    let present = candidates.iter().filter_map(|c| match c.presence {
        Presence::Present { base } if c.id != BackendId::Native => Some((c.id, base)),
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
        Some(i) => match BackendId::for_kind(i.kind) {
            Some(id) if presence(candidates, id) == Presence::NotBuilt => Reason::NotBuilt(id),
            _ => Reason::Unsupported(i.kind),
        },
    };
    if presence(candidates, BackendId::Native) != (Presence::Present { base: None }) {
        return Err(SelectError::NothingRuns);
    }
    Ok(Selection {
        backend: BackendId::Native,
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
            presence(candidates, BackendId::Native),
            Presence::Present { .. }
        );
        (request == Request::Auto && self.backend != BackendId::Native && native_runs).then_some(
            Selection {
                backend: BackendId::Native,
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
