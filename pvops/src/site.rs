//! Call sites: the macro that emits them and the record each one leaves behind.
//!
//! A call site starts life as an indirect call through its op's slot in
//! [`PV_OPS`](crate::ops::PV_OPS), padded to the op's [`site_len`](crate::ops::Op::site_len):
//!
//! ```text
//! 771: ff 15 <rel32 to PV_OPS + slot>    call *slot(%rip)
//!      90 ...                            (site_len - 6) one-byte NOPs
//! ```
//!
//! and records `{where, op, length, clobbers}` as a [`SiteRecord`] in the `pvops_sites`
//! section (`.parainstructions` in kernel builds, see `__sites_section!`). The [patch engine](crate::patch) later rewrites the site for the installed backend.
//! Every site is emitted inside a `#[inline(always)]` wrapper of this crate, so each place that
//! calls an op gets a site of its own.

use crate::ops::{Clobbers, Op};

/// One call site, as recorded in the `pvops_sites` section (8 bytes, 4-aligned).
///
/// The address is relative to the record itself (like Linux's `alt_instr`), so records need no
/// load-time relocation in a PIE executable or a kernel module.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SiteRecord {
    /// Site address minus the address of this field.
    pub rel: i32,
    /// The op, as `Op as u8`.
    pub op: u8,
    /// Site length in bytes, padding included.
    pub len: u8,
    /// What the site tolerates being changed ([`Clobbers`] bits).
    pub clobbers: u16,
}

static_assertions::assert_eq_size!(SiteRecord, [u8; 8]);
static_assertions::const_assert_eq!(core::mem::align_of::<SiteRecord>(), 4);

/// A record resolved into something the patch engine can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Site {
    /// Address of the site's first byte.
    pub addr: usize,
    /// The op called there.
    pub op: Op,
    /// Site length in bytes.
    pub len: u8,
    /// What the site tolerates being changed.
    pub clobbers: Clobbers,
}

/// A record that does not describe a site this crate could have emitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadRecord {
    /// The op byte names no op.
    UnknownOp(u8),
    /// The length differs from the op's site length.
    Length {
        /// The op.
        op: Op,
        /// The recorded length.
        len: u8,
    },
    /// Clobber bits outside [`Clobbers::all`].
    Clobbers(u16),
}

impl SiteRecord {
    /// Resolve the record, given the address it is stored at.
    pub fn resolve(&self, record_addr: usize) -> Result<Site, BadRecord> {
        let op = Op::from_u8(self.op).ok_or(BadRecord::UnknownOp(self.op))?;
        if self.len != op.site_len() {
            return Err(BadRecord::Length { op, len: self.len });
        }
        let clobbers =
            Clobbers::from_bits(self.clobbers).ok_or(BadRecord::Clobbers(self.clobbers))?;
        Ok(Site {
            addr: record_addr.wrapping_add_signed(self.rel as isize),
            op,
            len: self.len,
            clobbers,
        })
    }
}

/// The call sites of one image (an executable or a kernel module).
#[derive(Clone, Copy, Debug)]
pub struct SiteTable {
    records: &'static [SiteRecord],
}

impl SiteTable {
    /// The sites between two bounds of a `pvops_sites` section.
    ///
    /// # Safety
    ///
    /// `start..end` must be the (4-aligned) bounds of a section holding only [`SiteRecord`]s
    /// emitted by [`pv_site!`](crate::pv_site), valid for `'static`, and `start <= end`.
    pub unsafe fn from_bounds(start: *const SiteRecord, end: *const SiteRecord) -> SiteTable {
        // SAFETY: the caller guarantees both bounds belong to the same section.
        let n = unsafe { end.offset_from(start) } as usize;
        // SAFETY: the caller guarantees the range holds `n` initialised, immutable records.
        let records = unsafe { core::slice::from_raw_parts(start, n) };
        SiteTable { records }
    }

    /// The sites of the executable this code is linked into, found through the
    /// `__start_pvops_sites`/`__stop_pvops_sites` symbols the (user-space) linker defines.
    /// Kernel modules have no such symbols: they pass marker objects to
    /// [`SiteTable::from_bounds`] instead.
    #[cfg(not(pvops_kernel))]
    pub fn of_executable() -> SiteTable {
        extern "C" {
            static __start_pvops_sites: SiteRecord;
            static __stop_pvops_sites: SiteRecord;
        }
        // SAFETY: the linker defines both symbols as the bounds of the `pvops_sites` output
        // section, which only `pv_site!` writes to.
        unsafe {
            SiteTable::from_bounds(
                core::ptr::addr_of!(__start_pvops_sites),
                core::ptr::addr_of!(__stop_pvops_sites),
            )
        }
    }

    /// Whether `other` is this very table (the same records, not equal ones: records hold
    /// addresses relative to themselves).
    pub fn same(&self, other: &SiteTable) -> bool {
        core::ptr::eq(self.records, other.records)
    }

    /// The number of records.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether there is no record.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Every site, resolved, in record order.
    pub fn iter(&self) -> impl Iterator<Item = Result<Site, BadRecord>> + '_ {
        self.records
            .iter()
            .map(|r| r.resolve(core::ptr::addr_of!(r.rel) as usize))
    }

    /// The lowest and one-past-highest site address: the text a writer must make writable.
    pub fn span(&self) -> Option<(usize, usize)> {
        self.iter().flatten().fold(None, |acc, s| {
            let (lo, hi) = acc.unwrap_or((usize::MAX, 0));
            Some((lo.min(s.addr), hi.max(s.addr + s.len as usize)))
        })
    }
}

// The section exists in every image that links pvops, even one without a site, so the linker
// always defines its bounds.
#[cfg(not(pvops_kernel))]
core::arch::global_asm!(crate::__sites_section!(), ".balign 4", ".popsection");

/// The section records go to. In user space it is marked `R` (SHF_GNU_RETAIN): linkers that
/// garbage-collect sections (lld with its default `-z start-stop-gc`) would otherwise drop
/// records nothing but `__start_pvops_sites` refers to. A module is linked with `ld -r`,
/// which keeps every section.
#[cfg(not(pvops_kernel))]
#[doc(hidden)]
#[macro_export]
macro_rules! __sites_section {
    () => {
        ".pushsection pvops_sites, \"aR\""
    };
}

/// The section records go to in a kernel build: `.parainstructions`, the name Linux gave its
/// own paravirt call-site records until 6.8. Nothing in 6.12 reads a section of that name, and
/// objtool still knows it as a table of code addresses (with IBT on, any other name draws a
/// "data relocation to !ENDBR" warning per site). A module is linked with `ld -r`, which keeps
/// every section, so no retain flag is needed.
#[cfg(pvops_kernel)]
#[doc(hidden)]
#[macro_export]
macro_rules! __sites_section {
    () => {
        ".pushsection .parainstructions, \"a\""
    };
}

/// The kernel's objtool must be told that a site's indirect call is patched before it matters
/// (it is the same annotation Linux's own pv sites carry).
#[cfg(pvops_kernel)]
#[doc(hidden)]
#[macro_export]
macro_rules! __retpoline_safe {
    () => {
        ".pushsection .discard.retpoline_safe\n.long 771b\n.popsection"
    };
}

/// No annotation outside the kernel.
#[cfg(not(pvops_kernel))]
#[doc(hidden)]
#[macro_export]
macro_rules! __retpoline_safe {
    () => {
        ""
    };
}

/// Emit a call site for `$op` (an [`Op`](crate::ops::Op) constant) with the given register
/// operands, and record it in `pvops_sites`.
///
/// The operands must match the op's convention: arguments in RDI, RSI, RDX, RCX, the result in
/// RAX, and for [`Convention::C`](crate::ops::Convention::C) ops `clobber_abi("C")`; for
/// callee-save ops only RAX may be declared changed. The group modules
/// ([`ops::irq`](crate::ops::irq) and friends) are the intended users.
///
/// # Safety
///
/// Expands to an `asm!` block and must be used inside `unsafe`; the caller vouches that the
/// op's contract (context, arguments) holds.
#[macro_export]
macro_rules! pv_site {
    ($op:expr; $($operands:tt)*) => {
        core::arch::asm!(
            "771:",
            "call qword ptr [rip + {ops} + {slot}]",
            ".skip {pad}, 0x90",
            $crate::__retpoline_safe!(),
            $crate::__sites_section!(),
            ".balign 4",
            ".long 771b - .",
            ".byte {op}, {len}",
            ".short {clobbers}",
            ".popsection",
            ops = sym $crate::ops::PV_OPS,
            slot = const $op.slot(),
            pad = const $op.site_len() - $crate::ops::INDIRECT_CALL_LEN,
            op = const $op as u8,
            len = const $op.site_len(),
            clobbers = const $op.convention().clobbers().bits(),
            $($operands)*
        )
    };
}
