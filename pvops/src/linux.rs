//! Linux 6.12's own paravirt call sites, as pvops sees them when it is built into the kernel.
//!
//! In 6.12 every pv call site is an alternative: the original bytes are `ff 15 <disp32>`
//! (`call *pv_ops+off(%rip)`), with one `.altinstructions` entry flagged
//! [`ALT_FLAG_DIRECT_CALL`] (and often a second one, at the same address, carrying Linux's
//! inline native code under `ALT_NOT(X86_FEATURE_XENPV)`). This module parses those records
//! ([`AltInstr`]), groups them into sites ([`pv_sites`]), says which Linux member each site
//! calls (through the kernel's own layout, a table of `offsetof`s the caller supplies), which of
//! those members pvops can serve and why not the others ([`served`]), and what each served site
//! becomes ([`plan`]): the backend's inline bytes where they fit and Linux's convention for the
//! member allows, else a direct call into pvops.
//!
//! Nothing here touches memory: records and site bytes come in as slices and a [`ReadText`].

use crate::ops::{BackendOps, Clobbers, Convention, Op};
use crate::patch::{direct_call, nops, plan_site, Action, ReadText};

/// Size of Linux 6.12's `struct alt_instr` (packed): `s32 instr_offset; s32 repl_offset;
/// u32 ft_flags; u8 instrlen; u8 replacementlen`.
pub const ALT_INSTR_LEN: usize = 14;

/// `ALT_FLAG_NOT`: patch when the feature is absent.
pub const ALT_FLAG_NOT: u16 = 1 << 0;
/// `ALT_FLAG_DIRECT_CALL`: the replacement is `call BUG_func`, aimed at the `pv_ops` slot's
/// current function by Linux.
pub const ALT_FLAG_DIRECT_CALL: u16 = 1 << 1;
/// `ALT_FLAG_PVOPS` (kernel/pvops-early.patch): pvops patched the site; `apply_alternatives`
/// skips the entry.
pub const ALT_FLAG_PVOPS: u16 = 1 << 15;

/// The length of a 6.12 pv call site (`alt_replace_call` insists on it).
pub const PV_SITE_LEN: u8 = 6;

/// One `.altinstructions` entry, resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AltInstr {
    /// Address of the original instruction.
    pub instr: usize,
    /// Address of the replacement.
    pub repl: usize,
    /// CPU feature number (word · 32 + bit).
    pub cpuid: u16,
    /// `ALT_FLAG_*`.
    pub flags: u16,
    /// Original length, padding included.
    pub instrlen: u8,
    /// Replacement length.
    pub repllen: u8,
}

impl AltInstr {
    /// The entry stored at address `at` as `bytes`.
    pub fn parse(bytes: &[u8; ALT_INSTR_LEN], at: usize) -> AltInstr {
        let word =
            |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let ft = word(8);
        AltInstr {
            instr: at.wrapping_add_signed(word(0) as i32 as isize),
            repl: (at + 4).wrapping_add_signed(word(4) as i32 as isize),
            cpuid: ft as u16,
            flags: (ft >> 16) as u16,
            instrlen: bytes[12],
            repllen: bytes[13],
        }
    }
}

/// The entries of a `.altinstructions` table stored at `base`, in order.
pub fn alt_instrs(table: &[u8], base: usize) -> impl Iterator<Item = AltInstr> + '_ {
    table
        .chunks_exact(ALT_INSTR_LEN)
        .enumerate()
        .filter_map(move |(i, c)| {
            let c: &[u8; ALT_INSTR_LEN] = c.try_into().ok()?;
            Some(AltInstr::parse(c, base + i * ALT_INSTR_LEN))
        })
}

/// One of Linux's pv call sites.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PvSite {
    /// Address of the site.
    pub addr: usize,
    /// Its length (the longest `instrlen` of its entries).
    pub len: u8,
    /// The `pv_ops` slot it calls, as a byte offset into `pv_ops`.
    pub slot: usize,
    /// Index of its first entry in the table.
    pub first: usize,
    /// Number of consecutive entries for this address.
    pub entries: usize,
    /// Whether Linux also has an inline replacement for it (a second entry).
    pub linux_inline: bool,
}

/// An entry flagged [`ALT_FLAG_DIRECT_CALL`] whose site is not a pv call Linux 6.12 would make.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OddSite {
    /// The length is not [`PV_SITE_LEN`].
    Length {
        /// Site address.
        addr: usize,
        /// Its length.
        len: u8,
    },
    /// The bytes are not `ff 15 <disp32>` into `pv_ops`.
    Bytes {
        /// Site address.
        addr: usize,
        /// What is there.
        found: [u8; PV_SITE_LEN as usize],
    },
}

/// Every pv call site of a `.altinstructions` table (stored at `base`), the site bytes read
/// through `text`, for the `pv_ops` table at `pv_ops` of `pv_ops_len` bytes. Entries for one
/// address are consecutive (Linux's `ALTERNATIVE_2` emits them so); a group with a
/// [`ALT_FLAG_DIRECT_CALL`] entry is a pv site.
pub fn pv_sites<'a>(
    table: &'a [u8],
    base: usize,
    pv_ops: usize,
    pv_ops_len: usize,
    text: &'a dyn ReadText,
) -> impl Iterator<Item = Result<PvSite, OddSite>> + 'a {
    let entry = move |i: usize| -> Option<AltInstr> {
        let c: &[u8; ALT_INSTR_LEN] = table
            .get(i * ALT_INSTR_LEN..(i + 1) * ALT_INSTR_LEN)?
            .try_into()
            .ok()?;
        Some(AltInstr::parse(c, base + i * ALT_INSTR_LEN))
    };
    let mut i = 0;
    core::iter::from_fn(move || loop {
        let first = entry(i)?;
        let start = i;
        let (mut len, mut direct, mut count) = (0u8, false, 0usize);
        while let Some(e) = entry(i).filter(|e| e.instr == first.instr) {
            len = len.max(e.instrlen);
            direct |= e.flags & ALT_FLAG_DIRECT_CALL != 0;
            count += 1;
            i += 1;
        }
        if !direct {
            continue;
        }
        if len != PV_SITE_LEN {
            return Some(Err(OddSite::Length {
                addr: first.instr,
                len,
            }));
        }
        let mut b = [0u8; PV_SITE_LEN as usize];
        text.read(first.instr, &mut b);
        let disp = i32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let target = (first.instr + PV_SITE_LEN as usize).wrapping_add_signed(disp as isize);
        let slot = target.wrapping_sub(pv_ops);
        if b[..2] != [0xff, 0x15] || slot >= pv_ops_len || slot & 7 != 0 {
            return Some(Err(OddSite::Bytes {
                addr: first.instr,
                found: b,
            }));
        }
        return Some(Ok(PvSite {
            addr: first.instr,
            len,
            slot,
            first: start,
            entries: count,
            linux_inline: count > 1,
        }));
    })
}

/// How Linux calls a member (`PV_CALLEE_SAVE` or plain C).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinuxConv {
    /// `struct paravirt_callee_save`: every register but RAX is kept.
    CalleeSave,
    /// A plain C function: the caller-saved registers may change.
    C,
}

impl LinuxConv {
    /// What a site of this convention lets its callee change.
    pub const fn clobbers(self) -> Clobbers {
        match self {
            LinuxConv::CalleeSave => Clobbers::RAX.union(Clobbers::FLAGS),
            LinuxConv::C => Clobbers::all(),
        }
    }
}

/// Whether pvops serves a Linux member, and if not, why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Served {
    /// pvops's `op`, called with Linux's convention `conv`, the way `via` says.
    Yes {
        /// The pvops op with Linux's semantics.
        op: Op,
        /// Linux's convention for the member.
        conv: LinuxConv,
        /// Whether the member's signature is the op's, or an adapter stands between.
        via: Via,
    },
    /// Left to Linux, for this reason.
    No(&'static str),
}

/// How a served member's sites reach pvops's op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// Linux's signature is the op's: a site calls the backend's function, or holds its inline
    /// bytes.
    Op,
    /// Linux's signature differs (its MSR values come as two halves, its `cpuid` takes four
    /// pointers, its page-table notifications name the level by member): a site calls an
    /// adapter of the kernel glue with Linux's signature, which calls the op through a call
    /// site of its own (patched like every pvops site). Where the backend's op does nothing
    /// (its inline bytes are empty), the site becomes NOPs instead: nothing is nothing,
    /// whatever the arguments.
    Adapter(Adapter),
}

/// The adapters the kernel glue provides, one per member whose signature differs from its
/// op's. Each does exactly what Linux's native function for the member does around the op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Adapter {
    /// `u64 read_msr(unsigned msr)` over `read_msr_safe`: a fault warns once and reads 0, as
    /// Linux's exception handler for `native_read_msr` does.
    ReadMsr,
    /// `void write_msr(unsigned msr, unsigned low, unsigned high)` over `write_msr_safe`: a
    /// fault warns once and is skipped.
    WriteMsr,
    /// `u64 read_msr_safe(unsigned msr, int *err)`: `*err` = 0 or `-EIO` (then 0 is read).
    ReadMsrSafe,
    /// `int write_msr_safe(unsigned msr, unsigned low, unsigned high)`: 0 or `-EIO`.
    WriteMsrSafe,
    /// `void cpuid(unsigned *eax, unsigned *ebx, unsigned *ecx, unsigned *edx)`: leaf in
    /// `*eax`, subleaf in `*ecx`, the four registers out.
    Cpuid,
    /// `void alloc_pte/pmd/pud/p4d(struct mm_struct *mm, unsigned long pfn)`: `alloc_pt(pfn,
    /// level)`, one adapter per level.
    AllocPt(PtLevel),
    /// `void release_pte/pmd/pud/p4d(unsigned long pfn)`: `release_pt(pfn, level)`.
    ReleasePt(PtLevel),
    /// `void flush_tlb_multi(const struct cpumask *cpus, const struct flush_tlb_info *info)`:
    /// the CPUs whose flush the backend takes over (`flush_tlb_defer`) are taken out of a copy
    /// of the mask, the rest get Linux's `native_flush_tlb_multi` (its IPIs).
    FlushTlbMulti,
}

/// A page-table level as Linux's `alloc_*`/`release_*` members name it; the value is pvops's
/// level number (`alloc_pt(pfn, level)`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum PtLevel {
    /// A page of PTEs.
    Pte = 1,
    /// A PMD page.
    Pmd = 2,
    /// A PUD page.
    Pud = 3,
    /// A P4D page.
    P4d = 4,
}

/// The Linux members pvops serves, by `group.member` name, checked against Linux 6.12's
/// `paravirt_types.h` one by one (signature, convention, and what Linux's native function does
/// beyond the instruction); every other member is left to Linux by [`served`].
const SERVED: &[(&str, Op, LinuxConv, Via)] = &[
    // PV_CALLEE_SAVE in Linux, callee-save in pvops
    ("irq.save_fl", Op::SaveFl, LinuxConv::CalleeSave, Via::Op),
    (
        "irq.irq_disable",
        Op::IrqDisable,
        LinuxConv::CalleeSave,
        Via::Op,
    ),
    (
        "irq.irq_enable",
        Op::IrqEnable,
        LinuxConv::CalleeSave,
        Via::Op,
    ),
    ("mmu.read_cr2", Op::ReadCr2, LinuxConv::CalleeSave, Via::Op),
    // plain C in Linux; pvops's callee-save functions are valid C functions of the same type
    ("mmu.write_cr2", Op::WriteCr2, LinuxConv::C, Via::Op),
    ("mmu.read_cr3", Op::ReadCr3, LinuxConv::C, Via::Op),
    ("mmu.write_cr3", Op::WriteCr3, LinuxConv::C, Via::Op),
    ("cpu.read_cr0", Op::ReadCr0, LinuxConv::C, Via::Op),
    ("cpu.wbinvd", Op::Wbinvd, LinuxConv::C, Via::Op),
    ("cpu.store_tr", Op::StoreTr, LinuxConv::C, Via::Op),
    // pte_t/pmd_t/pud_t are one u64 passed by value: the same registers as pvops's u64
    ("mmu.set_pte", Op::SetPte, LinuxConv::C, Via::Op),
    ("mmu.set_pmd", Op::SetPmd, LinuxConv::C, Via::Op),
    ("mmu.set_pud", Op::SetPud, LinuxConv::C, Via::Op),
    // void (*)(void). Linux's own are no-ops outside Xen PV (paravirt_nop: it tracks no lazy
    // mode then); a backend that batches page-table writes (lguest's ring) needs both ends.
    // `lazy_mode.flush` stays Linux's: a batch is still sent when its section ends.
    (
        "mmu.lazy_mode.enter",
        Op::LazyModeEnter,
        LinuxConv::C,
        Via::Op,
    ),
    (
        "mmu.lazy_mode.leave",
        Op::LazyModeLeave,
        LinuxConv::C,
        Via::Op,
    ),
    // PV_CALLEE_SAVE, one u64 in and out (pteval_t and the pte_t/pmd_t/... wrappers of one)
    ("mmu.pte_val", Op::PteVal, LinuxConv::CalleeSave, Via::Op),
    ("mmu.make_pte", Op::MakePte, LinuxConv::CalleeSave, Via::Op),
    ("mmu.pmd_val", Op::PmdVal, LinuxConv::CalleeSave, Via::Op),
    ("mmu.make_pmd", Op::MakePmd, LinuxConv::CalleeSave, Via::Op),
    ("mmu.pud_val", Op::PudVal, LinuxConv::CalleeSave, Via::Op),
    ("mmu.make_pud", Op::MakePud, LinuxConv::CalleeSave, Via::Op),
    ("mmu.p4d_val", Op::P4dVal, LinuxConv::CalleeSave, Via::Op),
    ("mmu.make_p4d", Op::MakeP4d, LinuxConv::CalleeSave, Via::Op),
    ("mmu.pgd_val", Op::PgdVal, LinuxConv::CalleeSave, Via::Op),
    ("mmu.make_pgd", Op::MakePgd, LinuxConv::CalleeSave, Via::Op),
    // around the kernel's qspinlock slow path, which stays Linux's; only where Linux's own
    // choice is native too (see `lock_choice`)
    (
        "lock.queued_spin_unlock",
        Op::QueuedSpinUnlock,
        LinuxConv::CalleeSave,
        Via::Op,
    ),
    ("lock.wait", Op::LockWait, LinuxConv::C, Via::Op),
    ("lock.kick", Op::LockKick, LinuxConv::C, Via::Op),
    (
        "lock.vcpu_is_preempted",
        Op::VcpuIsPreempted,
        LinuxConv::CalleeSave,
        Via::Op,
    ),
    // the same as Linux's native function wherever Linux's own io_delay is one of the two a
    // backend can have (see `io_delay_choice`)
    ("cpu.io_delay", Op::IoDelay, LinuxConv::C, Via::Op),
    ("cpu.load_idt", Op::LoadIdt, LinuxConv::C, Via::Op),
    ("cpu.load_gdt", Op::LoadGdt, LinuxConv::C, Via::Op),
    // Linux's signatures, through the kernel glue's adapters (see `Adapter`)
    (
        "cpu.read_msr",
        Op::ReadMsrSafe,
        LinuxConv::C,
        Via::Adapter(Adapter::ReadMsr),
    ),
    (
        "cpu.write_msr",
        Op::WriteMsrSafe,
        LinuxConv::C,
        Via::Adapter(Adapter::WriteMsr),
    ),
    (
        "cpu.read_msr_safe",
        Op::ReadMsrSafe,
        LinuxConv::C,
        Via::Adapter(Adapter::ReadMsrSafe),
    ),
    (
        "cpu.write_msr_safe",
        Op::WriteMsrSafe,
        LinuxConv::C,
        Via::Adapter(Adapter::WriteMsrSafe),
    ),
    (
        "cpu.cpuid",
        Op::Cpuid,
        LinuxConv::C,
        Via::Adapter(Adapter::Cpuid),
    ),
    (
        "mmu.alloc_pte",
        Op::AllocPt,
        LinuxConv::C,
        Via::Adapter(Adapter::AllocPt(PtLevel::Pte)),
    ),
    (
        "mmu.alloc_pmd",
        Op::AllocPt,
        LinuxConv::C,
        Via::Adapter(Adapter::AllocPt(PtLevel::Pmd)),
    ),
    (
        "mmu.alloc_pud",
        Op::AllocPt,
        LinuxConv::C,
        Via::Adapter(Adapter::AllocPt(PtLevel::Pud)),
    ),
    (
        "mmu.alloc_p4d",
        Op::AllocPt,
        LinuxConv::C,
        Via::Adapter(Adapter::AllocPt(PtLevel::P4d)),
    ),
    (
        "mmu.release_pte",
        Op::ReleasePt,
        LinuxConv::C,
        Via::Adapter(Adapter::ReleasePt(PtLevel::Pte)),
    ),
    (
        "mmu.release_pmd",
        Op::ReleasePt,
        LinuxConv::C,
        Via::Adapter(Adapter::ReleasePt(PtLevel::Pmd)),
    ),
    (
        "mmu.release_pud",
        Op::ReleasePt,
        LinuxConv::C,
        Via::Adapter(Adapter::ReleasePt(PtLevel::Pud)),
    ),
    (
        "mmu.release_p4d",
        Op::ReleasePt,
        LinuxConv::C,
        Via::Adapter(Adapter::ReleasePt(PtLevel::P4d)),
    ),
    // where Linux's is the native one or the same hypervisor's (see `flush_choice`)
    (
        "mmu.flush_tlb_multi",
        Op::FlushTlbDefer,
        LinuxConv::C,
        Via::Adapter(Adapter::FlushTlbMulti),
    ),
];

/// Why the debug-register members are left to Linux.
const NOINSTR: &str = "no pvops op: Linux's is called from noinstr entry code (#DB, NMI), which \
                       pvops's instrumentable functions must not be";
/// Why the descriptor-entry writes are left to Linux.
const DESCRIPTOR_COPY: &str = "no pvops op: a copy into the kernel's own descriptor table \
                               (pvops's descriptor ops are load_idt, load_gdt, store_tr)";
/// Why the hooks that do nothing natively are left to Linux.
const XEN_PV_HOOK: &str = "natively nothing (paravirt_nop): a hook only Xen PV's own code fills";

/// Members left to Linux on purpose, with the reason (the rest: "no pvops op").
const LEFT: &[(&str, &str)] = &[
    (
        "lock.queued_spin_lock_slowpath",
        "the kernel's own qspinlock slow path (pvops's lock group is what a backend changes \
         around it)",
    ),
    ("cpu.write_cr0", "Linux's native_write_cr0 pins CR0.WP"),
    ("cpu.write_cr4", "Linux's native_write_cr4 pins CR4 bits"),
    (
        "irq.safe_halt",
        "Linux's native_safe_halt clears CPU buffers (MDS) before hlt",
    ),
    (
        "irq.halt",
        "Linux's native_halt clears CPU buffers (MDS) before hlt",
    ),
    (
        "mmu.flush_tlb_user",
        "Linux's flush handles PCID and PTI user ASIDs",
    ),
    (
        "mmu.flush_tlb_kernel",
        "Linux's flush handles PCID and PTI user ASIDs",
    ),
    (
        "mmu.flush_tlb_one_user",
        "Linux's flush handles PCID and PTI user ASIDs",
    ),
    (
        "cpu.get_debugreg",
        NOINSTR,
    ),
    (
        "cpu.set_debugreg",
        NOINSTR,
    ),
    (
        "cpu.load_tr_desc",
        "Linux's native_load_tr_desc swaps to the writable GDT around ltr (the busy bit)",
    ),
    (
        "cpu.set_ldt",
        "Linux's native_set_ldt writes the LDT descriptor into this CPU's GDT (the kernel's layout)",
    ),
    (
        "cpu.load_tls",
        "Linux's native_load_tls copies the task's TLS entries into this CPU's GDT (the kernel's \
         layout)",
    ),
    (
        "cpu.load_gs_index",
        "Linux's native_load_gs_index loads GS between two swapgs, with the kernel's exception \
         fixup for a bad selector",
    ),
    (
        "cpu.load_sp0",
        "Linux's native_load_sp0 writes this CPU's TSS, a per-CPU variable of the kernel's layout",
    ),
    (
        "cpu.write_gdt_entry",
        DESCRIPTOR_COPY,
    ),
    (
        "cpu.write_idt_entry",
        DESCRIPTOR_COPY,
    ),
    (
        "cpu.write_ldt_entry",
        DESCRIPTOR_COPY,
    ),
    ("cpu.read_pmc", "no pvops op (native: rdpmc)"),
    (
        "cpu.start_context_switch",
        XEN_PV_HOOK,
    ),
    (
        "cpu.end_context_switch",
        XEN_PV_HOOK,
    ),
    (
        "mmu.enter_mmap",
        XEN_PV_HOOK,
    ),
    (
        "mmu.exit_mmap",
        XEN_PV_HOOK,
    ),
    (
        "mmu.pgd_free",
        XEN_PV_HOOK,
    ),
    (
        "mmu.pgd_alloc",
        "natively 0 (__paravirt_pgd_alloc): a hook only Xen PV's own code fills",
    ),
    (
        "mmu.tlb_remove_table",
        "the kernel's page-table freeing (its mmu_gather batch and RCU), not a hypervisor's",
    ),
    (
        "mmu.ptep_modify_prot_start",
        "Linux's read-modify-write of a PTE through its mm (ptep_get_and_clear)",
    ),
    (
        "mmu.ptep_modify_prot_commit",
        "Linux's read-modify-write of a PTE through its mm (set_pte_at)",
    ),
    (
        "mmu.set_p4d",
        "Linux's native_set_p4d mirrors the entry into PTI's user page tables",
    ),
    (
        "mmu.set_pgd",
        "Linux's native_set_pgd mirrors the entry into PTI's user page tables",
    ),
];

/// A choice of lock protocol: what Linux chose for its lock group at boot, before
/// `apply_alternatives()` (its hypervisor code may install paravirt spinlocks, and a reader of
/// the vCPUs' preempted flags), or what a backend's lock ops are ([`LinuxLocks::of`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinuxLocks {
    /// The native qspinlock protocol (`pv_is_native_spin_unlock()`): no halting waiters.
    pub native_unlock: bool,
    /// `pv_is_native_vcpu_is_preempted()`: no vCPU is ever reported preempted.
    pub native_vcpu_is_preempted: bool,
}

impl LinuxLocks {
    /// The protocol a backend's `ops` run: native where its unlock (its preempted query) is
    /// the native backend's (`native`, see [`is_native`]).
    pub fn of(ops: &BackendOps, native: &BackendOps) -> LinuxLocks {
        LinuxLocks {
            native_unlock: is_native(ops, native, Op::QueuedSpinUnlock),
            native_vcpu_is_preempted: is_native(ops, native, Op::VcpuIsPreempted),
        }
    }
}

/// Whether `ops` implement `op` as the native backend (`native`) does: by its inline bytes,
/// which native's ops all have and which say what the op does. Not by the function's address:
/// rustc may copy a small function into each crate that uses it, so one function can have
/// two addresses.
pub fn is_native(ops: &BackendOps, native: &BackendOps, op: Op) -> bool {
    let bytes = |o: &BackendOps| o.inline(op).map(|i| i.bytes);
    bytes(native).is_some() && bytes(ops) == bytes(native)
}

/// Whether pvops may serve lock member `op` with its backend's lock ops, which run the
/// protocol `backend`, given Linux's choice `linux`. The unlock, `wait` and `kick` are one
/// protocol with the kernel's slow path, which stays Linux's: taken only where the backend's
/// is the same one (native with native, paravirt with paravirt), else left whole to Linux;
/// `vcpu_is_preempted` likewise. Other groups' ops are not its business (`Ok`).
pub fn lock_choice(op: Op, linux: LinuxLocks, backend: LinuxLocks) -> Result<(), &'static str> {
    match op {
        Op::QueuedSpinUnlock | Op::LockWait | Op::LockKick
            if linux.native_unlock != backend.native_unlock =>
        {
            Err(if backend.native_unlock {
                "Linux runs paravirt spinlocks here (its hypervisor code chose them), the \
                 backend native ones: the lock group is left whole to Linux"
            } else {
                "Linux runs native spinlocks here (its gating, or nopvspin), the backend \
                 paravirt ones: the lock group is left whole to Linux"
            })
        }
        Op::VcpuIsPreempted
            if linux.native_vcpu_is_preempted != backend.native_vcpu_is_preempted =>
        {
            Err(if backend.native_vcpu_is_preempted {
                "Linux reads the vCPUs' preempted flags itself (its hypervisor code chose to); \
                 the backend has none to read"
            } else {
                "Linux never reports a vCPU preempted here; the backend reads flags it does not"
            })
        }
        _ => Ok(()),
    }
}

/// Whether pvops may serve `mmu.flush_tlb_multi` with its backend's `flush_tlb_defer`, given
/// whether Linux's is `native_flush_tlb_multi` (`linux_native`) and the backend's
/// `flush_tlb_defer` native's (`backend_native`): only where both send every CPU its IPI, or
/// both leave preempted vCPUs to the hypervisor (KVM's PV TLB flush, with the same gating).
/// Other ops: `Ok`.
pub fn flush_choice(op: Op, linux_native: bool, backend_native: bool) -> Result<(), &'static str> {
    match (op, linux_native, backend_native) {
        (Op::FlushTlbDefer, true, false) => Err(
            "Linux interrupts every CPU it flushes here; the backend would leave preempted \
             vCPUs to the host",
        ),
        (Op::FlushTlbDefer, false, true) => Err(
            "Linux's hypervisor code flushes other CPUs its own way here (a PV flush); the \
             backend's is the IPI",
        ),
        _ => Ok(()),
    }
}

/// What Linux's `cpu.io_delay` does on this boot (its `pv_ops` slot, and `io_delay=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinuxIoDelay {
    /// `native_io_delay` with `io_delay=0x80` (the default): a write to port 0x80.
    Port80,
    /// `native_io_delay` with `io_delay=0xed` or `udelay`.
    Other,
    /// Nothing: `io_delay=none`, or its hypervisor code's no-op (KVM's with
    /// `KVM_FEATURE_NOP_IO_DELAY`, Xen PV's).
    Nothing,
}

/// Whether pvops may serve `cpu.io_delay` with the backend's `io_delay`, given what Linux's
/// does here: only where the two are the same delay (the backend's inline bytes say which:
/// `out %al,$0x80`, or none). Other ops: `Ok`.
pub fn io_delay_choice(op: Op, ops: &BackendOps, linux: LinuxIoDelay) -> Result<(), &'static str> {
    const PORT80: &[u8] = &[0xe6, 0x80];
    if op != Op::IoDelay {
        return Ok(());
    }
    let backend = match ops.inline(Op::IoDelay).map(|i| i.bytes) {
        Some([]) => LinuxIoDelay::Nothing,
        Some(PORT80) => LinuxIoDelay::Port80,
        _ => return Err("the backend's io_delay is neither a write to port 0x80 nor nothing"),
    };
    match (linux, backend) {
        (l, b) if l == b => Ok(()),
        (LinuxIoDelay::Other, _) => {
            Err("Linux's io_delay follows io_delay= (0xed or udelay on this boot)")
        }
        (LinuxIoDelay::Port80, _) => {
            Err("Linux's io_delay writes port 0x80 here; the backend's does nothing")
        }
        (LinuxIoDelay::Nothing, _) => Err(
            "Linux's io_delay does nothing here (io_delay=none, or its hypervisor code's); the \
             backend's writes port 0x80",
        ),
    }
}

/// What Linux chose at boot, before `apply_alternatives()`, that a backend serving the kernel
/// must have chosen too: the lock protocol, the I/O delay, and how other CPUs' TLBs are flushed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinuxChoices {
    /// Its lock protocol.
    pub locks: LinuxLocks,
    /// Its `cpu.io_delay`.
    pub io_delay: LinuxIoDelay,
    /// Whether its `mmu.flush_tlb_multi` is `native_flush_tlb_multi`.
    pub native_flush_tlb_multi: bool,
}

impl LinuxChoices {
    /// Whether the backend's `ops` chose the same where `op` is concerned ([`lock_choice`],
    /// [`io_delay_choice`], [`flush_choice`]; `native`: the native backend's ops, which say
    /// what native is).
    pub fn agree(&self, op: Op, ops: &BackendOps, native: &BackendOps) -> Result<(), &'static str> {
        lock_choice(op, self.locks, LinuxLocks::of(ops, native))?;
        io_delay_choice(op, ops, self.io_delay)?;
        let backend_flush = is_native(ops, native, Op::FlushTlbDefer);
        flush_choice(op, self.native_flush_tlb_multi, backend_flush)
    }
}

/// Whether pvops serves the Linux member `name` (`group.member`, as in `paravirt_types.h`).
pub fn served(name: &str) -> Served {
    if let Some(&(_, op, conv, via)) = SERVED.iter().find(|(n, ..)| *n == name) {
        return Served::Yes { op, conv, via };
    }
    match LEFT.iter().find(|(n, _)| *n == name) {
        Some(&(_, why)) => Served::No(why),
        None => Served::No("no pvops op"),
    }
}

/// The Linux members pvops serves (name, op, Linux's convention, how sites reach the op).
pub fn served_members() -> impl Iterator<Item = (&'static str, Op, LinuxConv, Via)> {
    SERVED.iter().copied()
}

/// What one served site becomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelAction {
    /// The backend's inline bytes.
    Inline,
    /// A direct call into pvops.
    Direct,
}

/// The bytes pvops writes at a served site (of length [`PV_SITE_LEN`]), and which action.
///
/// [`Via::Op`]: inline when the backend offers bytes for `op` that fit and change nothing
/// Linux's convention for the member forbids; else `call rel32` to the backend's function plus
/// one NOP. [`Via::Adapter`]: NOPs where the backend's op does nothing (empty inline bytes),
/// else a direct call to `adapter`, the kernel glue's function for it. `None` when the target
/// is out of `rel32` reach (the site is then left to Linux).
pub fn plan(
    addr: usize,
    op: Op,
    conv: LinuxConv,
    via: Via,
    adapter: usize,
    ops: &BackendOps,
) -> Option<(KernelAction, [u8; PV_SITE_LEN as usize])> {
    if let Via::Adapter(_) = via {
        let (action, bytes) = if ops.inline(op).is_some_and(|i| i.bytes.is_empty()) {
            (KernelAction::Inline, nops(PV_SITE_LEN))
        } else {
            (
                KernelAction::Direct,
                direct_call(addr, PV_SITE_LEN, adapter)?,
            )
        };
        return Some((action, bytes.as_slice().try_into().ok()?));
    }
    let (action, bytes) = plan_site(addr, PV_SITE_LEN, conv.clobbers(), op, ops)?;
    let action = match action {
        Action::Inline => KernelAction::Inline,
        _ => KernelAction::Direct,
    };
    Some((action, bytes.as_slice().try_into().ok()?))
}

// pvops may serve a Linux callee-save member only with a callee-save op of its own.
const _: () = {
    let mut i = 0;
    while i < SERVED.len() {
        let (_, op, conv, _) = SERVED[i];
        assert!(
            !matches!(conv, LinuxConv::CalleeSave)
                || matches!(op.convention(), Convention::CalleeSave)
        );
        i += 1;
    }
};

#[cfg(test)]
mod tests {
    use super::*;

    /// Text made of (address, bytes) pieces.
    struct Pieces<'a>(&'a [(usize, &'a [u8])]);

    impl ReadText for Pieces<'_> {
        fn read(&self, addr: usize, out: &mut [u8]) {
            for (i, o) in out.iter_mut().enumerate() {
                let a = addr + i;
                *o = self
                    .0
                    .iter()
                    .find(|(at, b)| a >= *at && a < at + b.len())
                    .map_or(0xcc, |(at, b)| b[a - at]);
            }
        }
    }

    /// An alt_instr as Linux's ALTERNATIVE macros lay it out, stored at `at`.
    fn entry(
        at: usize,
        instr: usize,
        repl: usize,
        cpuid: u16,
        flags: u16,
        len: u8,
        rlen: u8,
    ) -> [u8; 14] {
        let mut e = [0u8; 14];
        e[0..4].copy_from_slice(&((instr as isize - at as isize) as i32).to_le_bytes());
        e[4..8].copy_from_slice(&((repl as isize - (at + 4) as isize) as i32).to_le_bytes());
        e[8..12].copy_from_slice(&(u32::from(cpuid) | u32::from(flags) << 16).to_le_bytes());
        e[12] = len;
        e[13] = rlen;
        e
    }

    const BASE: usize = 0x10_0000;
    const PV_OPS: usize = 0x20_0000;
    const SITE: usize = 0x30_0000;
    /// X86_FEATURE_ALWAYS, X86_FEATURE_XENPV
    const ALWAYS: u16 = 3 * 32 + 21;
    const XENPV: u16 = 8 * 32 + 16;

    /// `call *pv_ops+slot(%rip)` at `site`.
    fn pv_call(site: usize, slot: usize) -> [u8; 6] {
        let disp = (PV_OPS + slot) as isize - (site + 6) as isize;
        let d = (disp as i32).to_le_bytes();
        [0xff, 0x15, d[0], d[1], d[2], d[3]]
    }

    #[test]
    fn parses_the_field_layout_of_alt_instr() {
        // a real 6.12 record (irq.save_fl site): instr_offset, repl_offset, ALT_CALL_ALWAYS
        let e = entry(BASE, SITE, SITE + 0x100, ALWAYS, ALT_FLAG_DIRECT_CALL, 6, 5);
        let a = AltInstr::parse(&e, BASE);
        assert_eq!(a.instr, SITE);
        assert_eq!(a.repl, SITE + 0x100);
        assert_eq!((a.cpuid, a.flags, a.instrlen, a.repllen), (ALWAYS, 2, 6, 5));
    }

    #[test]
    fn groups_entries_of_one_site_and_finds_the_slot() {
        let mut t = [0u8; 14 * 4];
        // site 1: ALTERNATIVE_2(call *pv_ops+0x58, call BUG_func, ALWAYS|DIRECT_CALL, pushf; pop, NOT XENPV)
        t[0..14].copy_from_slice(&entry(BASE, SITE, 0, ALWAYS, ALT_FLAG_DIRECT_CALL, 6, 5));
        t[14..28].copy_from_slice(&entry(BASE + 14, SITE, 0, XENPV, ALT_FLAG_NOT, 6, 2));
        // an ordinary alternative (not a pv call)
        t[28..42].copy_from_slice(&entry(BASE + 28, SITE + 0x40, 0, 100, 0, 3, 3));
        // site 2: a direct-call-only site (cpu.io_delay at slot 0)
        t[42..56].copy_from_slice(&entry(
            BASE + 42,
            SITE + 0x80,
            0,
            ALWAYS,
            ALT_FLAG_DIRECT_CALL,
            6,
            5,
        ));
        let b1 = pv_call(SITE, 0x58);
        let b2 = pv_call(SITE + 0x80, 0);
        let text = Pieces(&[(SITE, &b1), (SITE + 0x80, &b2)]);
        let sites: Vec<_> = pv_sites(&t, BASE, PV_OPS, 0x400, &text).collect();
        assert_eq!(
            sites,
            [
                Ok(PvSite {
                    addr: SITE,
                    len: 6,
                    slot: 0x58,
                    first: 0,
                    entries: 2,
                    linux_inline: true
                }),
                Ok(PvSite {
                    addr: SITE + 0x80,
                    len: 6,
                    slot: 0,
                    first: 3,
                    entries: 1,
                    linux_inline: false
                }),
            ]
        );
    }

    #[test]
    fn a_direct_call_entry_whose_site_is_not_a_pv_call_is_odd() {
        let t = entry(BASE, SITE, 0, ALWAYS, ALT_FLAG_DIRECT_CALL, 6, 5);
        // already a direct call (e8): not the bytes a site holds before apply_alternatives
        let b = [0xe8, 1, 2, 3, 4, 0x90];
        let text = Pieces(&[(SITE, &b)]);
        let s: Vec<_> = pv_sites(&t, BASE, PV_OPS, 0x400, &text).collect();
        assert_eq!(
            s,
            [Err(OddSite::Bytes {
                addr: SITE,
                found: b
            })]
        );
        // a call through another table
        let b = pv_call(SITE, 0x1000);
        let text = Pieces(&[(SITE, &b)]);
        assert!(matches!(
            pv_sites(&t, BASE, PV_OPS, 0x400, &text).next(),
            Some(Err(OddSite::Bytes { .. }))
        ));
        let t = entry(BASE, SITE, 0, ALWAYS, ALT_FLAG_DIRECT_CALL, 7, 5);
        assert_eq!(
            pv_sites(&t, BASE, PV_OPS, 0x400, &text).next(),
            Some(Err(OddSite::Length { addr: SITE, len: 7 }))
        );
    }

    #[test]
    fn served_members_keep_linux_semantics() {
        assert_eq!(
            served("irq.save_fl"),
            Served::Yes {
                op: Op::SaveFl,
                conv: LinuxConv::CalleeSave,
                via: Via::Op
            }
        );
        // Linux's signatures differ: through the glue's adapters, over the ops with Linux's
        // fault semantics (a faulting MSR access is caught)
        assert_eq!(
            served("cpu.write_msr"),
            Served::Yes {
                op: Op::WriteMsrSafe,
                conv: LinuxConv::C,
                via: Via::Adapter(Adapter::WriteMsr)
            }
        );
        assert!(matches!(
            served("cpu.cpuid"),
            Served::Yes {
                op: Op::Cpuid,
                via: Via::Adapter(Adapter::Cpuid),
                ..
            }
        ));
        assert!(matches!(
            served("mmu.release_pud"),
            Served::Yes {
                op: Op::ReleasePt,
                via: Via::Adapter(Adapter::ReleasePt(PtLevel::Pud)),
                ..
            }
        ));
        assert!(matches!(served("cpu.write_cr4"), Served::No(w) if w.contains("pins")));
        assert_eq!(served("lock.nonesuch"), Served::No("no pvops op"));
        assert!(matches!(
            served("lock.queued_spin_lock_slowpath"),
            Served::No(w) if w.contains("slow path")
        ));
    }

    #[test]
    fn the_lock_group_follows_linux_s_choice() {
        let locks = |native_unlock, native_vcpu_is_preempted| LinuxLocks {
            native_unlock,
            native_vcpu_is_preempted,
        };
        let group = [
            Op::QueuedSpinUnlock,
            Op::LockWait,
            Op::LockKick,
            Op::VcpuIsPreempted,
        ];
        // the same protocol on both sides: served (native everywhere; KVM's paravirt
        // spinlocks and steal-time preempted flags on both sides)
        for p in [locks(true, true), locks(false, false), locks(true, false)] {
            for op in group {
                assert_eq!(lock_choice(op, p, p), Ok(()), "{op:?} {p:?}");
            }
        }
        // Linux paravirt, the backend native (Xen's code chose paravirt spinlocks): left whole
        for op in group {
            assert!(
                lock_choice(op, locks(false, false), locks(true, true)).is_err(),
                "{op:?}"
            );
            assert!(
                lock_choice(op, locks(true, true), locks(false, false)).is_err(),
                "{op:?}"
            );
        }
        // nopvspin on KVM: native spinlocks, KVM's preempted flags on both sides
        let (linux, backend) = (locks(true, false), locks(false, false));
        assert!(lock_choice(Op::QueuedSpinUnlock, linux, backend).is_err());
        assert_eq!(lock_choice(Op::VcpuIsPreempted, linux, backend), Ok(()));
        assert_eq!(
            lock_choice(Op::SetPte, locks(false, false), locks(true, true)),
            Ok(())
        );
    }

    #[test]
    fn flush_tlb_multi_follows_linux_s_choice() {
        for (linux, backend, ok) in [
            (true, true, true),
            (false, false, true),
            (true, false, false),
            (false, true, false),
        ] {
            assert_eq!(flush_choice(Op::FlushTlbDefer, linux, backend).is_ok(), ok);
            assert_eq!(flush_choice(Op::SetPte, linux, backend), Ok(()));
        }
    }

    /// Six consecutive entries of a real Linux 6.12.118 `.altinstructions` (this project's
    /// built-in kernel, at 0xffffffff820696b8), with the bytes of the pv sites they name, read
    /// from its vmlinux: an ordinary alternative (two entries, no pv call), two direct-call-only
    /// pv sites (slots 0xb8 and 0xc0: cpu.read_msr_safe and cpu.write_msr_safe in that
    /// kernel's layout) and `irq.save_fl` (slot 0xe0) with Linux's inline `pushf; pop %rax`
    /// under ALT_NOT(X86_FEATURE_XENPV).
    #[test]
    fn real_records_of_linux_6_12() {
        const TABLE: &str = "2016fdfe9e1002007500000005051216fdfe95100200680000000500a317fdfe\
            87100200750002000605b617fdfe7e1002007500020006059b22fdfe751002007500020006058d22fdfe\
            6c100200100101000602";
        let hex = |s: &str| -> Vec<u8> {
            let s: Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
            s.chunks(2)
                .map(|c| u8::from_str_radix(core::str::from_utf8(c).unwrap(), 16).unwrap())
                .collect()
        };
        let table = hex(TABLE);
        assert_eq!(table.len(), 6 * ALT_INSTR_LEN);
        let base = 0xffff_ffff_8206_96b8;
        let pv_ops = 0xffff_ffff_81c3_7f80;
        let (s1, s2, s3) = (
            0xffff_ffff_8103_ae77usize,
            0xffff_ffff_8103_ae98usize,
            0xffff_ffff_8103_b98busize,
        );
        let (b1, b2, b3) = (
            hex("ff15bbd1bf00"),
            hex("ff15a2d1bf00"),
            hex("ff15cfc6bf00"),
        );
        let text = Pieces(&[(s1, &b1), (s2, &b2), (s3, &b3)]);
        let e: Vec<_> = alt_instrs(&table, base).collect();
        assert_eq!(
            (e[0].instr, e[0].cpuid, e[0].flags),
            (0xffff_ffff_8103_acd8, ALWAYS, 0)
        );
        assert_eq!(
            (e[5].cpuid, e[5].flags, e[5].repllen),
            (XENPV, ALT_FLAG_NOT, 2)
        );
        assert_eq!(e[4].flags, ALT_FLAG_DIRECT_CALL);
        let sites: Vec<_> = pv_sites(&table, base, pv_ops, 648, &text).collect();
        let site = |addr, slot, first, entries| {
            Ok(PvSite {
                addr,
                len: 6,
                slot,
                first,
                entries,
                linux_inline: entries > 1,
            })
        };
        assert_eq!(
            sites,
            [
                site(s1, 0xb8, 2, 1),
                site(s2, 0xc0, 3, 1),
                site(s3, 0xe0, 4, 2)
            ]
        );
        // a pv_ops of another size: the slots fall outside it and the sites are odd
        assert!(pv_sites(&table, base, pv_ops, 0xb8, &text).all(|s| s.is_err()));
    }
}
