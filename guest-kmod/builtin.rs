// SPDX-License-Identifier: GPL-2.0

//! Built into the kernel: pvops as the kernel's own paravirt layer.
//!
//! `alternative_instructions()` calls [`pvops_kernel_early`] (kernel/pvops-early.patch) before
//! `apply_alternatives()`, with vmlinux's `.altinstructions`. There, with only the boot CPU
//! running and kernel text still writable, pvops detects, selects and starts its backend, takes
//! a census of the kernel's pv call sites ([`pvops::linux`]), and, for the members it serves,
//! writes each site itself (the backend's inline bytes or a direct call into pvops), flags the
//! site's entries `ALT_FLAG_PVOPS` so that `apply_alternatives()` leaves them alone, and points
//! those `pv_ops` members at pvops's functions (so modules loaded later call pvops).
//!
//! What is not available that early is deferred to the initcall (`PvopsGuest::init`, which
//! takes the started backend with [`take_early`]): the other CPUs (not up yet: a backend's
//! per-CPU registrations are read for CPU 0 only), sysfs (`/sys/kernel/pvops/kernel` is written
//! there), the self-test, the patching of pvops's own call sites (under `stop_machine`, as in
//! the module), and the read-back of every kernel site pvops wrote ([`readback`]).
//!
//! Each backend says which of its ops may serve the kernel ([`pvops::Backend::serves_kernel`]):
//! an op that forwards to the kernel's own accessor (Xen PV's CR3, for one) would call itself.
//! Native serves every member pvops serves, Xen PV the interrupt flag and CR2, the others none
//! so far; the rest is left to Linux, with the reason.

use core::cell::UnsafeCell;
use core::fmt;

use kernel::prelude::*;
use kernel::str::CString;
use pvops::linux::{self, KernelAction, OddSite, Served, ALT_FLAG_PVOPS};
use pvops::{BackendOps, ReadText, Request, PV_OPS};

use crate::text::ReadOnlyText;
use crate::{choose, param, shim, Chosen};

/// At most this many `pv_ops` members (6.12 with every option has about 90).
const MAX_MEMBERS: usize = 128;
/// At most this many 8-byte slots in `pv_ops`.
const MAX_SLOTS: usize = 256;
/// No member at this slot.
const NO_MEMBER: u8 = u8::MAX;
/// Why a member pvops serves is left to Linux under a backend ([`pvops::Backend::serves_kernel`]).
const BACKEND_LEAVES_IT: &str =
    "this backend's op does not serve the kernel (it forwards to the kernel's own, or is unchecked)";

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
    /// Every site pvops wrote: its address and member index (for the read-back).
    written: KVec<(usize, u8)>,
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

// SAFETY: written only by pvops_kernel_early, which runs once on the boot CPU before any other
// CPU or thread exists; after it only the initcall (one thread, once) reads it and takes the
// backend out of it.
unsafe impl Sync for Slot {}

/// A member not filled in yet.
const NO_SUCH_MEMBER: Member = Member {
    name: "",
    offset: 0,
    served: Served::No(""),
    sites: 0,
    inline: 0,
    direct: 0,
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
}));

/// The census.
///
/// # Safety
///
/// As for [`Slot`]: the boot CPU alone in [`pvops_kernel_early`], the initcall afterwards; no
/// two references are live at once.
unsafe fn census() -> &'static mut Census {
    // SAFETY: the caller's contract.
    unsafe { &mut *CENSUS.0.get() }
}

/// The backend started at boot, for the initcall (once).
pub(crate) fn take_early() -> Option<Chosen> {
    // SAFETY: the initcall, after boot; the reference ends here.
    unsafe { census() }.chosen.take()
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
        // the members pvops serves, as far as this backend's ops may serve the kernel
        let n = c.n;
        for m in c.members[..n].iter_mut() {
            if let Served::Yes { op, .. } = m.served {
                if !ch.backend.serves_kernel(op) {
                    m.served = Served::No(BACKEND_LEAVES_IT);
                }
            }
        }
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
        if let (Served::Yes { op, conv }, Some(ops)) = (c.members[m].served, c.ops.as_ref()) {
            if linux::plan(s.addr, op, conv, ops).is_some() {
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
            let Served::Yes { op, conv } = c.members[m].served else {
                continue;
            };
            let Some((action, bytes)) = linux::plan(s.addr, op, conv, &ops) else {
                continue;
            };
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
            let _ = c.written.push((s.addr, m as u8), GFP_KERNEL);
        }
        // pv_ops for the members pvops serves: what modules loaded later are patched with
        for m in c.members() {
            if let Served::Yes { op, .. } = m.served {
                // SAFETY: writes one pointer of pv_ops, a function of the member's type and
                // convention (linux::served checked each); only the boot CPU runs.
                unsafe { shim::pvops_shim_set_pv_op(m.offset, ops.target(op) as _) };
            }
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

/// The census as text: the totals, then one line per member with sites.
struct Report<'a>(&'a Census, u32);

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = self.0;
        let (t, i, d) = c.totals();
        writeln!(
            f,
            "total sites={t} patched={} inline={i} direct={d} linux={} odd={} readback-mismatch={}",
            i + d,
            t - i - d,
            c.odd,
            self.1
        )?;
        for m in c.members().iter().filter(|m| m.sites > 0) {
            let linux = m.sites - m.inline - m.direct;
            write!(
                f,
                "{} sites={} inline={} direct={} linux={}",
                m.name, m.sites, m.inline, m.direct, linux
            )?;
            if linux > 0 {
                let why = match (c.refused, m.served) {
                    (Some(why), _) => why,
                    (None, Served::No(why)) => why,
                    (None, Served::Yes { .. }) => "out of reach",
                };
                write!(f, " why=\"{why}\"")?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

/// After boot (the initcall): read every site pvops wrote back and compare it with the plan,
/// check the `pv_ops` members, and publish the census in `/sys/kernel/pvops/kernel`. Returns
/// the number of sites that do not hold what was planned.
pub(crate) fn readback() -> u32 {
    // SAFETY: the initcall, after boot; the only reference while it runs.
    let c = unsafe { census() };
    if !c.taken {
        return 0;
    }
    let mut bad = 0u32;
    if let Some(ops) = c.ops {
        for &(addr, m) in c.written.iter() {
            let Served::Yes { op, conv } = c.members[m as usize].served else {
                continue;
            };
            let want = linux::plan(addr, op, conv, &ops).map(|p| p.1);
            let mut found = [0u8; linux::PV_SITE_LEN as usize];
            ReadOnlyText.read(addr, &mut found);
            if want != Some(found) {
                if bad == 0 {
                    pr_err!(
                        "kernel: site {:#x} ({}) holds {:02x?}, planned {:02x?}\n",
                        addr,
                        c.members[m as usize].name,
                        found,
                        want
                    );
                }
                bad += 1;
            }
        }
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
    bad
}
