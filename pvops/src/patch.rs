//! The patch engine: rewrites every call site for the installed backend, and back.
//!
//! For each site the engine decides, in this order of preference:
//!
//! 1. **inline**: the backend supplies a replacement sequence for the op that fits the site's
//!    length and changes no register the site does not tolerate; it is copied in and the rest
//!    padded with one recommended multi-byte NOP;
//! 2. **direct call**: `e8 <rel32>` to the function the slot holds (when it is within ±2 GiB),
//!    padded with a NOP;
//! 3. **indirect**: the site stays as it was.
//!
//! Writing follows two rules. *Verify, then write*: before the first byte is written, every
//! site's current bytes are compared with what the engine expects there; one mismatch aborts
//! the whole set and nothing is written. *Undo is exact*: a site's original bytes are a pure
//! function of its record (the indirect call to its slot plus padding, checked byte for byte
//! before patching), and its patched bytes a pure function of the record and the
//! [`Patcher`]'s snapshot of the backend; so [`Patcher::revert`] verifies each site still holds
//! exactly what was written and puts back exactly what was there. The undo log is that
//! snapshot: it needs no allocation and cannot drift from what was written.
//!
//! The engine never touches memory itself: reads and writes go through a [`Text`] the caller
//! supplies (`mprotect` in user space, a temporary writable alias under `stop_machine` in the
//! kernel module).

use core::fmt;

use crate::ops::{BackendOps, Clobbers, Op, INDIRECT_CALL_LEN, MAX_SITE_LEN};
use crate::site::{BadRecord, Site, SiteTable};

/// The recommended multi-byte NOPs (Intel SDM vol. 2B, "NOP"), indexed by length.
pub const NOPS: [&[u8]; 10] = [
    &[],
    &[0x90],
    &[0x66, 0x90],
    &[0x0f, 0x1f, 0x00],
    &[0x0f, 0x1f, 0x40, 0x00],
    &[0x0f, 0x1f, 0x44, 0x00, 0x00],
    &[0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00],
    &[0x0f, 0x1f, 0x80, 0x00, 0x00, 0x00, 0x00],
    &[0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
    &[0x66, 0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
];

/// Fill `buf` with as few recommended NOPs as possible.
pub fn fill_nops(buf: &mut [u8]) {
    // Iterators only: no bounds check, so no panic path (the kernel's objtool cannot see that
    // some of core's panic helpers never return).
    let mut done = 0;
    while done < buf.len() {
        let nop = NOPS[(buf.len() - done).min(NOPS.len() - 1)];
        for (d, s) in buf.iter_mut().skip(done).zip(nop) {
            *d = *s;
        }
        done += nop.len();
    }
}

/// The bytes of one site: a fixed-capacity buffer, so the engine never allocates.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SiteBytes {
    buf: [u8; MAX_SITE_LEN],
    len: u8,
}

impl SiteBytes {
    fn new(len: u8) -> SiteBytes {
        SiteBytes {
            buf: [0; MAX_SITE_LEN],
            len,
        }
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.buf[..self.len as usize]
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.buf[..self.len as usize]
    }
}

impl fmt::Debug for SiteBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.as_slice().iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// What a site becomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// The backend's instructions, in place of the call.
    Inline,
    /// A direct call to the slot's function.
    DirectCall,
    /// Left as the indirect call.
    Indirect,
}

/// Counts of what a patch set does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PatchReport {
    /// Sites in the image.
    pub total: usize,
    /// Sites given inline instructions.
    pub inline: usize,
    /// Sites turned into direct calls.
    pub direct: usize,
    /// Sites left indirect.
    pub indirect: usize,
}

impl PatchReport {
    /// Sites whose bytes change (inline or direct).
    pub fn patched(&self) -> usize {
        self.inline + self.direct
    }
}

/// Why a patch set was refused. Nothing was written when one of these is returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchError {
    /// A record describes no valid site.
    BadRecord {
        /// Record index.
        index: usize,
        /// What is wrong.
        why: BadRecord,
    },
    /// Two sites overlap.
    Overlap {
        /// Index of the first record.
        first: usize,
        /// Index of the second record.
        second: usize,
    },
    /// A switch between two patch sets that are not of the same sites and table.
    OtherSites,
    /// A site does not hold the bytes the engine expects there.
    Mismatch {
        /// Record index.
        index: usize,
        /// The site.
        site: Site,
        /// What is there.
        found: SiteBytes,
        /// What the engine expected.
        expected: SiteBytes,
    },
}

impl fmt::Display for PatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PatchError::BadRecord { index, why } => {
                write!(f, "site record {index} is invalid: {why:?}")
            }
            PatchError::Overlap { first, second } => {
                write!(f, "sites {first} and {second} overlap")
            }
            PatchError::OtherSites => {
                f.write_str("the two patch sets are not of the same sites and table")
            }
            PatchError::Mismatch {
                index,
                site,
                found,
                expected,
            } => write!(
                f,
                "site {index} ({} at {:#x}) holds [{found:?}], expected [{expected:?}]",
                site.op.name(),
                site.addr
            ),
        }
    }
}

/// What the engine writes at a site of `len` bytes at `addr` that calls `op` and tolerates
/// `clobbers` being changed: the backend's inline bytes where they fit and change nothing else,
/// padded with NOPs; else a direct `call rel32` to the slot's function where it reaches, padded;
/// `None`: neither (the site stays the indirect call). The one rule for every site, pvops's own
/// ([`Patcher`]) and the kernel's ([`crate::linux::plan`]).
pub fn plan_site(
    addr: usize,
    len: u8,
    clobbers: Clobbers,
    op: Op,
    ops: &BackendOps,
) -> Option<(Action, SiteBytes)> {
    let mut b = SiteBytes::new(len);
    let s = b.as_mut_slice();
    if let Some(inline) = ops.inline(op) {
        if inline.bytes.len() <= s.len() && clobbers.contains(inline.clobbers) {
            s[..inline.bytes.len()].copy_from_slice(inline.bytes);
            fill_nops(&mut s[inline.bytes.len()..]);
            return Some((Action::Inline, b));
        }
    }
    Some((Action::DirectCall, direct_call(addr, len, ops.target(op))?))
}

/// A site of `len` bytes at `addr` as `call rel32` to `target`, padded with NOPs; `None` where
/// `target` is out of `rel32` reach.
pub fn direct_call(addr: usize, len: u8, target: usize) -> Option<SiteBytes> {
    let mut b = SiteBytes::new(len);
    let s = b.as_mut_slice();
    let rel = i32::try_from((target as isize).wrapping_sub((addr + 5) as isize)).ok()?;
    s[0] = 0xe8;
    s[1..5].copy_from_slice(&rel.to_le_bytes());
    fill_nops(&mut s[5..]);
    Some(b)
}

/// A site of `len` bytes turned into NOPs.
pub fn nops(len: u8) -> SiteBytes {
    let mut b = SiteBytes::new(len);
    fill_nops(b.as_mut_slice());
    b
}

/// Reading the text the sites live in (all that verifying needs).
pub trait ReadText {
    /// Copy `out.len()` bytes at `addr` into `out`.
    fn read(&self, addr: usize, out: &mut [u8]);
}

/// Reading and writing the text the sites live in.
pub trait Text: ReadText {
    /// Write `bytes` at `addr`.
    ///
    /// # Safety
    ///
    /// `addr..addr + bytes.len()` is a call site the engine verified, and no CPU executes it
    /// while it is written (the caller's serialisation: a single thread in user space,
    /// `stop_machine` in the kernel).
    unsafe fn write(&mut self, addr: usize, bytes: &[u8]);
}

/// The two states a site can be in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Original,
    Patched,
}

/// A patch set: the sites of one image and a snapshot of the backend they are patched for.
pub struct Patcher<'a> {
    sites: SiteTable,
    table_addr: usize,
    ops: &'a BackendOps,
}

impl<'a> Patcher<'a> {
    /// A patch set for `sites`, which call through the table at `table_addr`, patched for the
    /// backend's `ops` (the functions the table will hold, and their inline replacements).
    /// Every record is checked here.
    pub fn new(
        sites: SiteTable,
        table_addr: usize,
        ops: &'a BackendOps,
    ) -> Result<Patcher<'a>, PatchError> {
        for (index, site) in sites.iter().enumerate() {
            let site = site.map_err(|why| PatchError::BadRecord { index, why })?;
            // Quadratic, but only over the few hundred sites of one image, once per load.
            for (other, o) in sites.iter().enumerate().skip(index + 1) {
                let Ok(o) = o else { continue };
                if site.addr < o.addr + o.len as usize && o.addr < site.addr + site.len as usize {
                    return Err(PatchError::Overlap {
                        first: index,
                        second: other,
                    });
                }
            }
        }
        Ok(Patcher {
            sites,
            table_addr,
            ops,
        })
    }

    /// What each site will become, without touching anything.
    pub fn plan(&self) -> PatchReport {
        let mut report = PatchReport::default();
        for site in self.sites() {
            report.total += 1;
            match self.decide(&site).0 {
                Action::Inline => report.inline += 1,
                Action::DirectCall => report.direct += 1,
                Action::Indirect => report.indirect += 1,
            }
        }
        report
    }

    /// Rewrite every site from its original bytes to the backend's; all or nothing.
    pub fn apply(&self, text: &mut dyn Text) -> Result<PatchReport, PatchError> {
        self.transition(State::Original, State::Patched, text)?;
        Ok(self.plan())
    }

    /// Put every site's original bytes back; all or nothing.
    pub fn revert(&self, text: &mut dyn Text) -> Result<PatchReport, PatchError> {
        self.transition(State::Patched, State::Original, text)?;
        Ok(self.plan())
    }

    /// Rewrite every site from what `from` (another backend's patch set of the same sites and
    /// table) wrote there to this set's bytes, without passing through the original bytes: a
    /// live switch of backend. All or nothing, as [`Patcher::apply`]; undone by switching
    /// back (`from.switch_from(self, ..)`) or by [`Patcher::revert`] on this set.
    pub fn switch_from(
        &self,
        from: &Patcher<'_>,
        text: &mut dyn Text,
    ) -> Result<PatchReport, PatchError> {
        if !self.sites.same(&from.sites) || self.table_addr != from.table_addr {
            return Err(PatchError::OtherSites);
        }
        from.check(State::Patched, text)?;
        for site in self.sites() {
            let (old, new) = (from.decide(&site).1, self.decide(&site).1);
            if new != old {
                // SAFETY: `check` verified this site holds exactly the bytes `from` wrote (or
                // left) there; the caller's `Text` serialises execution.
                unsafe { text.write(site.addr, new.as_slice()) };
            }
        }
        Ok(self.plan())
    }

    /// Check that every site holds its original bytes (`patched == false`) or the patched ones.
    pub fn verify(&self, text: &dyn ReadText, patched: bool) -> Result<(), PatchError> {
        self.check(
            if patched {
                State::Patched
            } else {
                State::Original
            },
            text,
        )
    }

    /// The sites, resolved (`new` checked every record).
    pub fn sites(&self) -> impl Iterator<Item = Site> + '_ {
        self.sites.iter().flatten()
    }

    /// The text the sites occupy (lowest address, one past the highest): what a [`Text`] must
    /// be able to write.
    pub fn span(&self) -> Option<(usize, usize)> {
        self.sites.span()
    }

    /// The bytes a site holds before patching: `ff 15 <rel32 to its slot>` and NOP padding.
    pub fn original(&self, site: &Site) -> SiteBytes {
        let mut b = SiteBytes::new(site.len);
        let slot = self.table_addr + site.op.slot();
        let next = site.addr + INDIRECT_CALL_LEN as usize;
        let rel = (slot as isize).wrapping_sub(next as isize) as i32;
        let s = b.as_mut_slice();
        s[..2].copy_from_slice(&[0xff, 0x15]);
        s[2..6].copy_from_slice(&rel.to_le_bytes());
        // The call-site macro pads with one-byte NOPs (`.skip n, 0x90`).
        s[6..].fill(0x90);
        b
    }

    /// The bytes a site holds after patching, and which action produced them.
    pub fn patched(&self, site: &Site) -> (Action, SiteBytes) {
        self.decide(site)
    }

    fn decide(&self, site: &Site) -> (Action, SiteBytes) {
        plan_site(site.addr, site.len, site.clobbers, site.op, self.ops)
            .unwrap_or_else(|| (Action::Indirect, self.original(site)))
    }

    fn expected(&self, site: &Site, state: State) -> SiteBytes {
        match state {
            State::Original => self.original(site),
            State::Patched => self.decide(site).1,
        }
    }

    fn check(&self, state: State, text: &dyn ReadText) -> Result<(), PatchError> {
        for (index, site) in self.sites().enumerate() {
            let expected = self.expected(&site, state);
            let mut found = SiteBytes::new(site.len);
            text.read(site.addr, found.as_mut_slice());
            if found != expected {
                return Err(PatchError::Mismatch {
                    index,
                    site,
                    found,
                    expected,
                });
            }
        }
        Ok(())
    }

    fn transition(&self, from: State, to: State, text: &mut dyn Text) -> Result<(), PatchError> {
        self.check(from, text)?;
        for site in self.sites() {
            let bytes = self.expected(&site, to);
            if bytes != self.expected(&site, from) {
                // SAFETY: `check` verified this site holds exactly the bytes the engine put
                // (or found) there; the caller's `Text` serialises execution.
                unsafe { text.write(site.addr, bytes.as_slice()) };
            }
        }
        Ok(())
    }
}
