//! The 64-bit lguest port's ABI (`lguest.md` beside this file): the hypercall numbers, the
//! boot-data announcement and `struct lguest_data`, shared by the guest backend ([`super`])
//! and the host the project ships (`lguest-host/`).

use core::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, AtomicU8};

/// Only traps to the host, which drains the async ring first.
pub const LHCALL_FLUSH_ASYNC: u64 = 0;
/// a1 = guest-physical address of `lguest_data` (0: unregister, a port addition).
pub const LHCALL_LGUEST_INIT: u64 = 1;
/// a1 = guest-physical address of a message (≤ 128 bytes), a2 = [`LGUEST_SHUTDOWN_POWEROFF`]
/// or [`LGUEST_SHUTDOWN_RESTART`].
pub const LHCALL_SHUTDOWN: u64 = 2;
/// a1 = the new CR3 value (top-level table and PCID), already loaded by the guest.
pub const LHCALL_NEW_PGTABLE: u64 = 4;
/// a1 = 0: user mappings; 1: everything, global mappings included.
pub const LHCALL_FLUSH_TLB: u64 = 5;
/// a1 = delta in ns (0: stop): one-shot timer raising virtual IRQ 0.
pub const LHCALL_SET_CLOCKEVENT: u64 = 9;
/// Halt until an interrupt; re-enables the virtual IF.
pub const LHCALL_HALT: u64 = 10;
/// a1 = guest-virtual address of a level-2 entry, a2 = its new value.
pub const LHCALL_SET_PMD: u64 = 13;
/// a1 = guest-virtual address of a level-1 entry, a2 = its new value.
pub const LHCALL_SET_PTE: u64 = 14;
/// a1 = guest-virtual address of a level-3 or level-4 entry, a2 = its new value.
pub const LHCALL_SET_PGD: u64 = 15;
/// Only exits, so the host delivers pending interrupts.
pub const LHCALL_SEND_INTERRUPTS: u64 = 19;

/// `LHCALL_SHUTDOWN` a2: power off.
pub const LGUEST_SHUTDOWN_POWEROFF: u64 = 1;
/// `LHCALL_SHUTDOWN` a2: restart.
pub const LGUEST_SHUTDOWN_RESTART: u64 = 2;

/// Slots in the asynchronous hypercall ring.
pub const LHCALL_RING_SIZE: usize = 64;
/// `hcall_status` of a free (or completed) slot; the host writes it.
pub const HCALL_FREE: u8 = 0xff;
/// `hcall_status` of a slot the host has yet to run; the guest writes it.
pub const HCALL_PENDING: u8 = 0;
/// `irq_enabled` / `irq_pending` value meaning "on" (X86_EFLAGS_IF).
pub const X86_EFLAGS_IF: u32 = 0x200;
/// `LG_CLOCK_MIN_DELTA`: shorter one-shot deltas are refused with `-ETIME`.
pub const LG_CLOCK_MIN_DELTA: u64 = 100;
/// `ETIME`.
pub const ETIME: i32 = 62;

/// `boot_params.hdr.hardware_subarch` of an lguest guest (`X86_SUBARCH_LGUEST`).
pub const X86_SUBARCH_LGUEST: u32 = 1;
/// The upper 48 bits of `hardware_subarch_data`: ASCII "LG64PV", big-endian.
pub const LGUEST_BOOT_MAGIC: u64 = 0x4c47_3634_5056;
/// The version of the port this backend speaks (the low 16 bits of `hardware_subarch_data`).
pub const ABI_VERSION: u16 = 1;

/// The `hardware_subarch_data` a launcher of ABI `version` passes.
pub const fn boot_signature(version: u16) -> u64 {
    (LGUEST_BOOT_MAGIC << 16) | version as u64
}

/// One slot of the asynchronous ring: `{arg0 = call number, arg1 … arg4}` (40 bytes).
#[repr(C)]
#[derive(Debug, Default)]
pub struct HcallArgs {
    /// The `LHCALL_*` number.
    pub arg0: AtomicU64,
    /// First argument.
    pub arg1: AtomicU64,
    /// Second argument.
    pub arg2: AtomicU64,
    /// Third argument.
    pub arg3: AtomicU64,
    /// Fourth argument.
    pub arg4: AtomicU64,
}

/// `struct timespec` (LP64).
#[repr(C)]
#[derive(Debug, Default)]
pub struct Timespec {
    /// Seconds since the epoch.
    pub tv_sec: AtomicU64,
    /// Nanoseconds.
    pub tv_nsec: AtomicU64,
}

/// `struct lguest_data`: the 4.x structure compiled LP64 (abi-lguest.md §6.3, offsets kept),
/// then the port's three time fields. Shared with the host: every field is an atomic of the
/// ABI's width (same layout), written by the side the comments name.
#[repr(C)]
#[derive(Debug)]
pub struct LguestData {
    /// Guest (host at delivery): the virtual IF, [`X86_EFLAGS_IF`] or 0.
    pub irq_enabled: AtomicU32,
    /// Guest: per-IRQ mask (bit n blocks virtual IRQ n).
    pub blocked_interrupts: [AtomicU64; 1],
    /// Host: fault address of a page fault it reflected (unused with nested paging).
    pub cr2: AtomicU64,
    /// Host: CLOCK_REALTIME at `time_tsc`.
    pub time: Timespec,
    /// Host: [`X86_EFLAGS_IF`] when an interrupt waits for the guest to enable its IF.
    pub irq_pending: AtomicI32,
    /// Both: ring slot status ([`HCALL_FREE`] / [`HCALL_PENDING`]).
    pub hcall_status: [AtomicU8; LHCALL_RING_SIZE],
    /// Guest: ring slots.
    pub hcalls: [HcallArgs; LHCALL_RING_SIZE],
    /// Host: size of the top-of-address-space area the guest must avoid (0 here).
    pub reserve_mem: AtomicU64,
    /// Host: TSC frequency in kHz (0: the TSC must not be used).
    pub tsc_khz: AtomicU32,
    /// Guest: the one `iret` where no interrupt may be injected (0: none, hardware IF rules).
    pub noirq_iret: AtomicU64,
    /// Guest: where kernel mappings start (`__START_KERNEL_map`-style; informational).
    pub kernel_address: AtomicU64,
    /// Guest: the software-interrupt syscall vector (0: none, long mode uses SYSCALL).
    pub syscall_vec: AtomicU32,
    /// Host (port addition): the guest TSC at which `time` was taken.
    pub time_tsc: AtomicU64,
    /// Host (port addition): odd while the host rewrites `time`, `time_tsc`.
    pub time_version: AtomicU32,
}

// The layout of abi-lguest.md §6.3, then the port's fields.
static_assertions::const_assert_eq!(core::mem::offset_of!(LguestData, irq_enabled), 0);
static_assertions::const_assert_eq!(core::mem::offset_of!(LguestData, blocked_interrupts), 8);
static_assertions::const_assert_eq!(core::mem::offset_of!(LguestData, cr2), 16);
static_assertions::const_assert_eq!(core::mem::offset_of!(LguestData, time), 24);
static_assertions::const_assert_eq!(core::mem::offset_of!(LguestData, irq_pending), 40);
static_assertions::const_assert_eq!(core::mem::offset_of!(LguestData, hcall_status), 44);
static_assertions::const_assert_eq!(core::mem::offset_of!(LguestData, hcalls), 112);
static_assertions::const_assert_eq!(core::mem::offset_of!(LguestData, reserve_mem), 2672);
static_assertions::const_assert_eq!(core::mem::offset_of!(LguestData, tsc_khz), 2680);
static_assertions::const_assert_eq!(core::mem::offset_of!(LguestData, noirq_iret), 2688);
static_assertions::const_assert_eq!(core::mem::offset_of!(LguestData, kernel_address), 2696);
static_assertions::const_assert_eq!(core::mem::offset_of!(LguestData, syscall_vec), 2704);
static_assertions::const_assert_eq!(core::mem::offset_of!(LguestData, time_tsc), 2712);
static_assertions::const_assert_eq!(core::mem::offset_of!(LguestData, time_version), 2720);
static_assertions::assert_eq_size!(LguestData, [u8; 2728]);
static_assertions::assert_eq_size!(HcallArgs, [u8; 40]);
static_assertions::const_assert!(core::mem::size_of::<LguestData>() <= 4096);

/// A hypercall entry: the instruction's, or a modelled host's in host tests.
pub use crate::hypercall::HypercallFn;
