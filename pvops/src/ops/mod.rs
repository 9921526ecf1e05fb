//! The ops table: four groups of low-level operations a backend fills in.
//!
//! Every op is described once, in the `define_ops!` invocation below: its table slot, its
//! [`Op`] identifier, its C signature, its calling [`Convention`] and the length of its call
//! sites. The call-site wrappers (what kernel code calls) live in one file per group:
//! [`cpu`], [`irq`], [`mmu`], [`lock`], [`timer`].
//!
//! # Differences from Linux 6.12's `pv_ops`
//!
//! - **Timer group.** Linux keeps `sched_clock` and `steal_clock` as static calls outside
//!   `pv_ops` (and hides them from modules). Here they are ordinary ops, with `tsc_khz`,
//!   `wall_clock` and `set_next_event`, so one backend owns all of a guest's time.
//! - **The lock group has no slow path.** The qspinlock slow path is the kernel's own locking
//!   code (native or paravirtual); pvops's group is what a backend changes around it: the
//!   unlock fast path, `wait` and `kick` for a halting waiter, and `vcpu_is_preempted`. A
//!   module cannot take over the kernel's locks; built in, pvops serves the group only where
//!   the kernel's own choice is the same protocol (`guest-kmod/builtin.rs`).
//! - **Page-table notifications** are two ops, `alloc_pt`/`release_pt` with a level argument,
//!   instead of Linux's eight `alloc_*`/`release_*`; plus the lazy-mode pair for batching.
//! - **Cross-CPU TLB flushes** are not an op: the kernel sends its IPIs. `flush_tlb_defer`
//!   says, per CPU, whether the backend takes that CPU's flush over instead (KVM's PV TLB
//!   flush for a preempted vCPU); built in, Linux's `flush_tlb_multi` becomes an adapter that
//!   asks it for each CPU of the mask (`guest-kmod/adapters.rs`).
//! - **`cpu.hypercall`** is an op: each backend's hypercall, so that the instruction is chosen
//!   once (vmcall or vmmcall) and call sites reach it directly after patching. Linux hides
//!   hypercalls behind per-hypervisor inline functions and static calls instead.
//! - **MSR ops** come in a plain and a `_safe` variant, as in Linux, but the safe variant
//!   returns an errno instead of a `bool`/`int` pair.
//! - **Descriptor ops** are the subset a guest needs to bring a CPU up and to check its state:
//!   `load_idt`, `load_gdt`, `store_tr`. LDT, TLS and per-entry GDT/IDT writes stay native in
//!   every backend this project targets except Xen PV, where the kernel itself already owns them.

pub mod cpu;
pub mod irq;
pub mod lock;
pub mod mmu;
pub mod timer;

use core::cell::UnsafeCell;

pub use cpu::{CpuidResult, DescriptorPointer};

bitflags::bitflags! {
    /// A set of general-purpose registers (and the flags register) an instruction sequence may
    /// change. Call sites record what they tolerate; inline replacements declare what they touch.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Clobbers: u16 {
        /// RAX (the result register).
        const RAX = 1 << 0;
        /// RCX.
        const RCX = 1 << 1;
        /// RDX.
        const RDX = 1 << 2;
        /// RSI.
        const RSI = 1 << 3;
        /// RDI.
        const RDI = 1 << 4;
        /// R8.
        const R8 = 1 << 5;
        /// R9.
        const R9 = 1 << 6;
        /// R10.
        const R10 = 1 << 7;
        /// R11.
        const R11 = 1 << 8;
        /// RFLAGS arithmetic flags (not IF: no op may change IF unless that is its purpose).
        const FLAGS = 1 << 9;
    }
}

/// How a table slot is called.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Convention {
    /// The SysV C ABI: arguments in RDI, RSI, RDX, RCX; result in RAX; every caller-saved
    /// register (RAX, RCX, RDX, RSI, RDI, R8–R11) and the flags may be changed.
    C,
    /// Linux's `PV_CALLEE_SAVE` convention for hot ops: arguments in RDI, RSI; result in RAX;
    /// only RAX and the flags may be changed. A Rust implementation is reached through a
    /// register-saving thunk ([`callee_save_thunk!`](crate::callee_save_thunk)); an inline
    /// replacement only has to leave the other registers alone.
    CalleeSave,
}

impl Convention {
    /// The registers a call through this convention may change.
    pub const fn clobbers(self) -> Clobbers {
        match self {
            Convention::C => Clobbers::all(),
            Convention::CalleeSave => Clobbers::RAX.union(Clobbers::FLAGS),
        }
    }
}

/// The function a [`Convention::CalleeSave`] slot holds: code that changes no register but RAX
/// and the arithmetic flags. Two things make one: [`callee_save_thunk!`](crate::callee_save_thunk),
/// which wraps an ordinary Rust function in a thunk that saves every other register, and
/// [`CalleeSave::declare`], for assembly whose author vouches for the registers it touches (the
/// native backend's instructions, a hypervisor's PV sequences). A plain `extern "C"` function
/// does not fit the slot's type.
#[repr(transparent)]
#[derive(Clone, Copy)]
pub struct CalleeSave<F>(F);

impl<F> CalleeSave<F> {
    /// A callee-save slot value from `f`.
    ///
    /// # Safety
    ///
    /// `f` changes no register but RAX and the arithmetic flags (RFLAGS.IF only where that is
    /// the op's purpose), or never returns.
    pub const unsafe fn declare(f: F) -> CalleeSave<F> {
        CalleeSave(f)
    }
}

impl<F: Copy> CalleeSave<F> {
    /// The function.
    pub const fn get(self) -> F {
        self.0
    }
}

/// A backend's inline replacement for one op.
///
/// The bytes must be position-independent (no RIP-relative operand, no relative branch out of
/// the sequence), take their arguments and leave their result in the op's registers, and
/// change nothing outside `clobbers`. An empty sequence turns the site into NOPs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Inline {
    /// The instruction bytes.
    pub bytes: &'static [u8],
    /// The registers they change.
    pub clobbers: Clobbers,
}

impl Inline {
    /// No instruction at all: the site becomes NOPs (an op with nothing to do).
    pub const NOTHING: Inline = Inline {
        bytes: &[],
        clobbers: Clobbers::empty(),
    };
}

/// One op as a backend implements it: the function its slot holds (`S`, the slot's type), and
/// the bytes a call site may hold instead of a call to it (`None`: sites call the function).
#[derive(Clone, Copy)]
pub struct Impl<S> {
    /// What the slot holds.
    pub func: S,
    /// What a call site may hold instead.
    pub inline: Option<Inline>,
}

impl<S> Impl<S> {
    /// Reached by a call (a direct one, once patched).
    pub const fn call(func: S) -> Impl<S> {
        Impl { func, inline: None }
    }

    /// The function, or `inline` in place of a call: the two must do the same (the native
    /// backend makes both from one byte sequence).
    pub const fn inline(func: S, inline: Inline) -> Impl<S> {
        Impl {
            func,
            inline: Some(inline),
        }
    }
}

/// The five op groups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Group {
    /// Privileged CPU instructions: CPUID, control registers, MSRs, descriptor tables.
    Cpu,
    /// The interrupt flag, halting and IPIs.
    Irq,
    /// Page faults' CR2, page-table roots, TLB flushes and page-table writes.
    Mmu,
    /// Around the kernel's spinlocks: the unlock fast path, a waiter's halt and kick.
    Lock,
    /// Clocks and the one-shot timer.
    Timer,
}

/// Length in bytes of the indirect call every call site starts as: `ff 15 <rel32>`.
pub const INDIRECT_CALL_LEN: u8 = 6;

/// The longest call site any op has; bounds every byte buffer of the patch engine.
pub const MAX_SITE_LEN: usize = 16;

/// The type of a slot: a plain C function, or a [`CalleeSave`] one.
macro_rules! slot_type {
    (C, fn($($ty:ty),*) $(-> $ret:ty)?) => { unsafe extern "C" fn($($ty),*) $(-> $ret)? };
    (CalleeSave, fn($($ty:ty),*) $(-> $ret:ty)?) => {
        CalleeSave<unsafe extern "C" fn($($ty),*) $(-> $ret)?>
    };
}

/// A slot's address (the function the slot holds).
macro_rules! slot_addr {
    (C, $f:expr) => {
        $f as usize
    };
    (CalleeSave, $f:expr) => {
        $f.get() as usize
    };
}

/// The "unfilled" stub as a slot value.
macro_rules! slot_unfilled {
    (C, $f:expr) => {
        $f
    };
    (CalleeSave, $f:expr) => {
        // SAFETY: an unfilled stub never returns (it panics), so it cannot hand back a register
        // changed against the convention.
        unsafe { CalleeSave::declare($f) }
    };
}

/// Defines the ops table from one list: the group structs, [`PvOps`], [`Op`] with its metadata,
/// the per-op implementation table [`BackendOps`] and the "unfilled" stubs a fresh table holds.
macro_rules! define_ops {
    ($(
        $(#[$gdoc:meta])*
        $group:ident : $Group:ident, $Impls:ident => $GroupTag:ident {
            $(
                $(#[$doc:meta])*
                $op:ident => $Variant:ident : fn($($arg:ident : $ty:ty),*) $(-> $ret:ty)?,
                    $conv:ident, site $len:literal;
            )*
        }
    )*) => {
        $(
            $(#[$gdoc])*
            #[repr(C)]
            #[derive(Clone, Copy)]
            pub struct $Group {
                $(
                    $(#[$doc])*
                    pub $op: slot_type!($conv, fn($($ty),*) $(-> $ret)?),
                )*
            }

            $(#[$gdoc])*
            ///
            /// A backend's implementation of the group: each op's function with the inline
            /// bytes (if any) call sites may hold instead.
            #[derive(Clone, Copy)]
            pub struct $Impls {
                $(
                    $(#[$doc])*
                    pub $op: Impl<slot_type!($conv, fn($($ty),*) $(-> $ret)?)>,
                )*
            }
        )*

        /// The whole table: one slot per op, grouped as in Linux's `pv_ops`.
        #[repr(C)]
        #[derive(Clone, Copy)]
        pub struct PvOps {
            $(
                $(#[$gdoc])*
                pub $group: $Group,
            )*
        }

        /// A backend's whole implementation: what [`PvOps`] is filled from, and what the patch
        /// engine copies into call sites. Each op's function and inline bytes sit in one
        /// [`Impl`], so replacing an op replaces both: the installed table and the offered
        /// inline code cannot disagree.
        #[derive(Clone, Copy)]
        pub struct BackendOps {
            $(
                $(#[$gdoc])*
                pub $group: $Impls,
            )*
        }

        /// Names one op of the table. Stored as a byte in every call-site record.
        #[repr(u8)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Op {
            $($(
                $(#[$doc])*
                $Variant,
            )*)*
        }

        impl Op {
            /// Every op, in table order.
            pub const ALL: &'static [Op] = &[$($(Op::$Variant,)*)*];

            /// `group.op`, as in Linux (`irq.save_fl`).
            pub const fn name(self) -> &'static str {
                match self { $($(Op::$Variant => concat!(stringify!($group), ".", stringify!($op)),)*)* }
            }

            /// The group the op belongs to.
            pub const fn group(self) -> Group {
                match self { $($(Op::$Variant => Group::$GroupTag,)*)* }
            }

            /// How the op's slot is called (the slot's type says it too: [`CalleeSave`]).
            pub const fn convention(self) -> Convention {
                match self { $($(Op::$Variant => Convention::$conv,)*)* }
            }

            /// Length of the op's call sites: the indirect call plus room for the longest
            /// inline replacement a backend ships.
            pub const fn site_len(self) -> u8 {
                match self { $($(Op::$Variant => $len,)*)* }
            }

            /// Byte offset of the op's slot in [`PvOps`].
            pub const fn slot(self) -> usize {
                match self { $($(Op::$Variant => core::mem::offset_of!(PvOps, $group.$op),)*)* }
            }

            /// The op with this record byte, if any.
            pub const fn from_u8(n: u8) -> Option<Op> {
                if (n as usize) < Op::ALL.len() { Some(Op::ALL[n as usize]) } else { None }
            }
        }

        impl PvOps {
            /// The address a slot holds: where an indirect call through it lands.
            pub fn target(&self, op: Op) -> usize {
                match op { $($(Op::$Variant => slot_addr!($conv, self.$group.$op),)*)* }
            }

            /// A table whose every slot stops the machine with the op's name: what
            /// [`PV_OPS`] holds until a backend is installed.
            pub const UNFILLED: PvOps = PvOps {
                $($group: $Group { $($op: slot_unfilled!($conv, unfilled::$group::$op),)* },)*
            };
        }

        impl BackendOps {
            /// The table to install.
            pub fn table(&self) -> PvOps {
                PvOps { $($group: $Group { $($op: self.$group.$op.func,)* },)* }
            }

            /// The inline replacement offered for `op`, if any.
            pub fn inline(&self, op: Op) -> Option<Inline> {
                match op { $($(Op::$Variant => self.$group.$op.inline,)*)* }
            }

            /// The same functions with every inline replacement withheld: patched for this, every
            /// site becomes a direct call (the benchmark's "direct" path).
            pub fn calls_only(&self) -> BackendOps {
                BackendOps {
                    $($group: $Impls { $($op: Impl::call(self.$group.$op.func),)* },)*
                }
            }

            /// The address of the function `op`'s slot will hold.
            pub fn target(&self, op: Op) -> usize {
                match op { $($(Op::$Variant => slot_addr!($conv, self.$group.$op.func),)*)* }
            }

            /// Point `op` at `addr`, code that implements it, with the inline bytes `inline`:
            /// for implementations only known at run time (the VMI backend's copies of its
            /// ROM's routines).
            ///
            /// # Safety
            ///
            /// `addr` is executable code that stays in place while the table is installed,
            /// honours `op`'s contract and signature, and changes no register outside
            /// `op.convention().clobbers()`; `inline`, if any, likewise.
            pub unsafe fn set_raw(&mut self, op: Op, addr: usize, inline: Option<Inline>) {
                match op {
                    $($(Op::$Variant => {
                        // SAFETY: the caller vouches that `addr` is code of this op's type and
                        // convention (a slot of either kind is one code pointer).
                        let func = unsafe {
                            core::mem::transmute::<usize, slot_type!($conv, fn($($ty),*) $(-> $ret)?)>(addr)
                        };
                        self.$group.$op = Impl { func, inline };
                    })*)*
                }
            }
        }

        mod unfilled {
            $(
                pub(super) mod $group {
                    use super::super::*;
                    $(
                        /// The slot's value before a backend is installed: stops the machine.
                        ///
                        /// # Safety
                        ///
                        /// None: it never returns (`unsafe` only to fit the slot's type).
                        #[allow(unused_variables)]
                        pub(in crate::ops) unsafe extern "C" fn $op($($arg: $ty),*) $(-> $ret)? {
                            super::unfilled(Op::$Variant)
                        }
                    )*
                }
            )*

            /// Calling an op before a backend is installed is a bug in the caller.
            #[cold]
            pub(super) fn unfilled(op: super::Op) -> ! {
                panic!("pvops: {} called before a backend filled the table", op.name())
            }
        }
    };
}

define_ops! {
    /// CPU ops. Context: any, unless noted; none of them sleeps.
    cpu: CpuOps, CpuImpls => Cpu {
        /// `cpuid(leaf, subleaf, out)`: execute CPUID for `leaf`/`subleaf` and store EAX–EDX in
        /// `*out`. Exits to the hypervisor in every VM; backends may filter leaves.
        cpuid => Cpuid: fn(leaf: u32, subleaf: u32, out: *mut CpuidResult), C, site 6;
        /// `read_cr0() -> cr0`. Ring 0.
        read_cr0 => ReadCr0: fn() -> u64, CalleeSave, site 6;
        /// `write_cr0(value)`. Ring 0.
        write_cr0 => WriteCr0: fn(value: u64), CalleeSave, site 6;
        /// `read_cr4() -> cr4`. Ring 0.
        read_cr4 => ReadCr4: fn() -> u64, CalleeSave, site 6;
        /// `write_cr4(value)`. Ring 0; interrupts off when PGE or PCIDE change.
        write_cr4 => WriteCr4: fn(value: u64), CalleeSave, site 6;
        /// `read_msr(msr) -> value`. Ring 0; an MSR that does not exist faults (#GP): use
        /// `read_msr_safe` for anything not architecturally guaranteed.
        read_msr => ReadMsr: fn(msr: u32) -> u64, C, site 6;
        /// `write_msr(msr, value)`. Ring 0; faults like `read_msr`.
        write_msr => WriteMsr: fn(msr: u32, value: u64), C, site 6;
        /// `read_msr_safe(msr, out) -> 0 | -EIO`: a fault is caught (kernel builds) and reported
        /// as `-EIO`, leaving `*out` untouched.
        read_msr_safe => ReadMsrSafe: fn(msr: u32, out: *mut u64) -> i32, C, site 6;
        /// `write_msr_safe(msr, value) -> 0 | -EIO`.
        write_msr_safe => WriteMsrSafe: fn(msr: u32, value: u64) -> i32, C, site 6;
        /// `wbinvd()`: write back and invalidate caches. Ring 0; slow (microseconds).
        wbinvd => Wbinvd: fn(), CalleeSave, site 6;
        /// `load_idt(desc)`: load the IDT register from `*desc`. Ring 0, interrupts off.
        load_idt => LoadIdt: fn(desc: *const DescriptorPointer), CalleeSave, site 6;
        /// `load_gdt(desc)`: load the GDT register from `*desc`. Ring 0, interrupts off.
        load_gdt => LoadGdt: fn(desc: *const DescriptorPointer), CalleeSave, site 6;
        /// `store_tr() -> selector`: the task register's selector.
        store_tr => StoreTr: fn() -> u64, CalleeSave, site 6;
        /// `io_delay()`: the short delay legacy port I/O needs (native: a write to port 0x80).
        io_delay => IoDelay: fn(), CalleeSave, site 6;
        /// `hypercall(nr, a0, a1, a2, a3) -> result`: the backend's hypercall, in its own
        /// numbering (`KVM_HC_*`, `__HYPERVISOR_*`, `LHCALL_*`), its result as the hypervisor
        /// returns it; `-ENOSYS` where there is none (native). The backend picks the
        /// instruction (vmcall, vmmcall, syscall, …) once, and patching makes each site call that
        /// choice directly. Ring 0 (a hypervisor refuses calls from user mode).
        hypercall => Hypercall: fn(nr: u64, a0: u64, a1: u64, a2: u64, a3: u64) -> i64, C, site 6;
    }
    /// Interrupt ops: the flag and halting, all callee-save (they sit on the hottest paths),
    /// and sending IPIs. Context: any.
    irq: IrqOps, IrqImpls => Irq {
        /// `save_fl() -> flags`: the current RFLAGS; only bit 9 (IF) is meaningful.
        save_fl => SaveFl: fn() -> u64, CalleeSave, site 6;
        /// `restore_fl(flags)`: set IF from bit 9 of `flags` (a value `save_fl` returned).
        restore_fl => RestoreFl: fn(flags: u64), CalleeSave, site 6;
        /// `irq_disable()`: clear IF.
        irq_disable => IrqDisable: fn(), CalleeSave, site 6;
        /// `irq_enable()`: set IF; a pending interrupt may be delivered before it returns.
        irq_enable => IrqEnable: fn(), CalleeSave, site 6;
        /// `safe_halt()`: enable interrupts and halt, atomically (no wake-up can be lost).
        safe_halt => SafeHalt: fn(), CalleeSave, site 6;
        /// `halt()`: halt with the interrupt flag as it is.
        halt => Halt: fn(), CalleeSave, site 6;
        /// `send_ipi(mask, nbits, vector) -> sent`: send `vector` to every CPU whose bit is set
        /// in the bitmap `mask` (`nbits` bits, little-endian u64 words: Linux's cpumask), with
        /// one hypercall per cluster of APIC IDs where the backend can (KVM's PV send-IPI), and
        /// say so (1). 0: nothing was sent, the caller sends them through the local APIC
        /// (native). `vector` 2 is an NMI. Interrupts off.
        send_ipi => SendIpi: fn(mask: *const u64, nbits: u32, vector: u32) -> u64, C, site 6;
    }
    /// MMU ops. Ring 0; TLB and CR3 ops with preemption off.
    mmu: MmuOps, MmuImpls => Mmu {
        /// `read_cr2() -> address`: the last page-fault address.
        read_cr2 => ReadCr2: fn() -> u64, CalleeSave, site 6;
        /// `write_cr2(address)`.
        write_cr2 => WriteCr2: fn(value: u64), CalleeSave, site 6;
        /// `read_cr3() -> cr3`: the page-table root (and PCID).
        read_cr3 => ReadCr3: fn() -> u64, CalleeSave, site 6;
        /// `write_cr3(cr3)`: switch page tables; flushes non-global TLB entries.
        write_cr3 => WriteCr3: fn(value: u64), CalleeSave, site 6;
        /// `flush_tlb_user()`: flush this CPU's non-global TLB entries.
        flush_tlb_user => FlushTlbUser: fn(), CalleeSave, site 6;
        /// `flush_tlb_kernel()`: flush this CPU's TLB including global entries.
        flush_tlb_kernel => FlushTlbKernel: fn(), C, site 6;
        /// `flush_tlb_one_user(address)`: flush one page's translation on this CPU.
        flush_tlb_one_user => FlushTlbOneUser: fn(address: u64), CalleeSave, site 6;
        /// `set_pte(ptep, value)`: store a level-1 entry (one 8-byte store; a shadow-paging
        /// backend also tells the hypervisor).
        set_pte => SetPte: fn(ptep: *mut u64, value: u64), CalleeSave, site 6;
        /// `set_pmd(pmdp, value)`: store a level-2 entry.
        set_pmd => SetPmd: fn(pmdp: *mut u64, value: u64), CalleeSave, site 6;
        /// `set_pud(pudp, value)`: store a level-3 entry.
        set_pud => SetPud: fn(pudp: *mut u64, value: u64), CalleeSave, site 6;
        /// `alloc_pt(pfn, level)`: page `pfn` is about to become a page table of `level`
        /// (1 = PTE … 4 = PGD). Shadow-paging hosts (VMI, lguest) pin or track it; native: nothing.
        alloc_pt => AllocPt: fn(pfn: u64, level: u32), C, site 6;
        /// `release_pt(pfn, level)`: page `pfn` stops being a page table.
        release_pt => ReleasePt: fn(pfn: u64, level: u32), C, site 6;
        /// `lazy_mode_enter()`: page-table updates until `lazy_mode_leave` may be batched.
        lazy_mode_enter => LazyModeEnter: fn(), C, site 6;
        /// `lazy_mode_leave()`: flush any batched updates; they are all visible on return.
        lazy_mode_leave => LazyModeLeave: fn(), C, site 6;
        /// `pte_val(entry) -> value`: a level-1 entry as the kernel reads it (native: the entry
        /// itself; Xen PV: its machine frame number turned into the kernel's pseudo-physical
        /// one).
        pte_val => PteVal: fn(entry: u64) -> u64, CalleeSave, site 6;
        /// `make_pte(value) -> entry`: the inverse of `pte_val`, the entry to store.
        make_pte => MakePte: fn(value: u64) -> u64, CalleeSave, site 6;
        /// `pmd_val(entry) -> value`: as `pte_val`, level 2.
        pmd_val => PmdVal: fn(entry: u64) -> u64, CalleeSave, site 6;
        /// `make_pmd(value) -> entry`: as `make_pte`, level 2.
        make_pmd => MakePmd: fn(value: u64) -> u64, CalleeSave, site 6;
        /// `pud_val(entry) -> value`: as `pte_val`, level 3.
        pud_val => PudVal: fn(entry: u64) -> u64, CalleeSave, site 6;
        /// `make_pud(value) -> entry`: as `make_pte`, level 3.
        make_pud => MakePud: fn(value: u64) -> u64, CalleeSave, site 6;
        /// `p4d_val(entry) -> value`: as `pte_val`, level 4.
        p4d_val => P4dVal: fn(entry: u64) -> u64, CalleeSave, site 6;
        /// `make_p4d(value) -> entry`: as `make_pte`, level 4.
        make_p4d => MakeP4d: fn(value: u64) -> u64, CalleeSave, site 6;
        /// `pgd_val(entry) -> value`: as `pte_val`, the top level.
        pgd_val => PgdVal: fn(entry: u64) -> u64, CalleeSave, site 6;
        /// `make_pgd(value) -> entry`: as `make_pte`, the top level.
        make_pgd => MakePgd: fn(value: u64) -> u64, CalleeSave, site 6;
        /// `flush_tlb_defer(cpu) -> taken`: whether the backend takes over flushing `cpu`'s TLB
        /// for a cross-CPU flush, which then need not interrupt it (1), or the caller must (0,
        /// native). KVM's PV TLB flush takes a preempted vCPU's: it asks the host, through the
        /// vCPU's steal-time record, to flush before the vCPU runs again. Preemption off.
        flush_tlb_defer => FlushTlbDefer: fn(cpu: u32) -> u64, C, site 6;
    }
    /// Lock ops, around the kernel's queued spinlocks (their slow path is the kernel's).
    /// Context: any, with preemption off.
    lock: LockOps, LockImpls => Lock {
        /// `queued_spin_unlock(lock)`: release a queued spinlock held by this CPU (native: store 0
        /// in its locked byte; a paravirtual one also wakes a halted waiter).
        queued_spin_unlock => QueuedSpinUnlock: fn(lock: *mut u8), CalleeSave, site 6;
        /// `wait(ptr, val)`: a waiter that spun long enough halts until `*ptr != val` or a
        /// `kick` (native: returns at once, the caller spins on).
        wait => LockWait: fn(ptr: *mut u8, val: u8), C, site 6;
        /// `kick(cpu)`: wake `cpu`, halted in `wait` (native: nothing).
        kick => LockKick: fn(cpu: u32), C, site 6;
        /// `vcpu_is_preempted(cpu) -> bool`: whether the host preempted `cpu`'s vCPU (native:
        /// never), so a spinning waiter can stop spinning on a holder that is not running.
        vcpu_is_preempted => VcpuIsPreempted: fn(cpu: u64) -> u64, CalleeSave, site 6;
    }
    /// Time ops. Context: any, including NMI for `sched_clock`.
    timer: TimerOps, TimerImpls => Timer {
        /// `sched_clock() -> ns`: a per-CPU monotonic nanosecond clock, fast and cheap.
        sched_clock => SchedClock: fn() -> u64, C, site 6;
        /// `steal_clock(cpu) -> ns`: time `cpu` was runnable but the host ran something else.
        steal_clock => StealClock: fn(cpu: u32) -> u64, C, site 6;
        /// `tsc_khz() -> kHz`: the TSC frequency, 0 when unknown.
        tsc_khz => TscKhz: fn() -> u64, C, site 6;
        /// `wall_clock() -> ns`: nanoseconds since the Unix epoch, 0 when unknown.
        wall_clock => WallClock: fn() -> u64, C, site 6;
        /// `set_next_event(delta_ns) -> 0 | -errno`: program this CPU's one-shot timer to fire
        /// `delta_ns` from now. Only the clock-event device that owns the CPU's timer may call it.
        set_next_event => SetNextEvent: fn(delta_ns: u64) -> i32, C, site 6;
    }
}

impl Op {
    /// The page-table value ops: each level's `*_val` and `make_*` (one u64 in, one out).
    pub const fn is_page_table_value(self) -> bool {
        matches!(
            self,
            Op::PteVal
                | Op::MakePte
                | Op::PmdVal
                | Op::MakePmd
                | Op::PudVal
                | Op::MakePud
                | Op::P4dVal
                | Op::MakeP4d
                | Op::PgdVal
                | Op::MakePgd
        )
    }
}

// The record format stores an op in a byte and every slot is one pointer wide.
const _: () = assert!(Op::ALL.len() <= 256);
static_assertions::const_assert_eq!(
    core::mem::size_of::<PvOps>(),
    Op::ALL.len() * core::mem::size_of::<usize>()
);
const _: () = {
    let mut i = 0;
    while i < Op::ALL.len() {
        let op = Op::ALL[i];
        assert!(op as usize == i);
        assert!(op.slot() == i * core::mem::size_of::<usize>());
        assert!(op.site_len() >= INDIRECT_CALL_LEN && op.site_len() as usize <= MAX_SITE_LEN);
        i += 1;
    }
};

/// The table every call site calls through: a `static` so that sites can address their slot
/// RIP-relative (`call *PV_OPS+slot(%rip)`).
#[repr(transparent)]
pub struct Table(UnsafeCell<PvOps>);

// SAFETY: the table is written only by `install`, whose contract makes the caller exclude
// concurrent callers of ops; every other access is a read of a pointer-sized slot.
unsafe impl Sync for Table {}

/// The live ops table.
pub static PV_OPS: Table = Table(UnsafeCell::new(PvOps::UNFILLED));

impl Table {
    /// Replace the whole table.
    ///
    /// # Safety
    ///
    /// No op may be running or called concurrently (on any CPU) while the table is written, and
    /// every function in `ops` must honour its op's contract and convention for as long as it is
    /// installed.
    pub unsafe fn install(&self, ops: &PvOps) {
        // SAFETY: the caller excludes concurrent readers and writers (see above).
        unsafe { self.0.get().write_volatile(*ops) }
    }

    /// A copy of the current table.
    pub fn get(&self) -> PvOps {
        // SAFETY: slots are pointer-sized and only written under `install`'s exclusion rule.
        unsafe { self.0.get().read_volatile() }
    }

    /// Address of the table, as call sites see it.
    pub fn addr(&self) -> usize {
        self.0.get() as usize
    }

    /// Put the unfilled stubs back (after a backend was torn down).
    ///
    /// # Safety
    ///
    /// As for [`Table::install`].
    pub unsafe fn clear(&self) {
        // SAFETY: forwarded contract.
        unsafe { self.install(&PvOps::UNFILLED) }
    }
}
