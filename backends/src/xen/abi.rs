//! Xen's guest ABI as the backend uses it, HVM and PV (shared/docs/abi-xen.md): hypercall and
//! command numbers, the structures hypercalls take, and the offsets of `vcpu_info` and
//! `shared_info`.

/// `__HYPERVISOR_xen_version`.
pub const HYPERVISOR_XEN_VERSION: u64 = 17;
/// `__HYPERVISOR_sched_op`.
pub const HYPERVISOR_SCHED_OP: u64 = 29;
/// `__HYPERVISOR_vcpu_op`.
pub const HYPERVISOR_VCPU_OP: u64 = 24;
/// `XENVER_version`: returns `major << 16 | minor`.
pub const XENVER_VERSION: u64 = 0;
/// `XENVER_get_features`.
pub const XENVER_GET_FEATURES: u64 = 6;
/// `XENFEAT_hvm_safe_pvclock`: the pvclock may be used by an HVM guest.
pub const XENFEAT_HVM_SAFE_PVCLOCK: u32 = 1 << 9;
/// `SCHEDOP_yield`.
pub const SCHEDOP_YIELD: u64 = 0;
/// `VCPUOP_get_runstate_info`.
pub const VCPUOP_GET_RUNSTATE_INFO: u64 = 4;
/// `VCPUOP_set_singleshot_timer`.
pub const VCPUOP_SET_SINGLESHOT_TIMER: u64 = 8;
/// `VCPUOP_register_vcpu_time_memory_area`.
pub const VCPUOP_REGISTER_VCPU_TIME_MEMORY_AREA: u64 = 13;

/// `struct vcpu_runstate_info` (48 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VcpuRunstateInfo {
    /// 0 running, 1 runnable, 2 blocked, 3 offline.
    pub state: i32,
    /// Bit 63: update in progress.
    pub state_entry_time: u64,
    /// Time spent in each state.
    pub time: [u64; 4],
}

/// `struct vcpu_set_singleshot_timer` (16 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleshotTimer {
    /// Absolute Xen system time to fire at.
    pub timeout_abs_ns: u64,
    /// Flags (0).
    pub flags: u32,
    /// Padding.
    pub pad: u32,
}

static_assertions::assert_eq_size!(VcpuRunstateInfo, [u8; 48]);
static_assertions::assert_eq_size!(SingleshotTimer, [u8; 16]);

/// `__HYPERVISOR_mmu_update`.
pub const HYPERVISOR_MMU_UPDATE: u64 = 1;
/// `__HYPERVISOR_fpu_taskswitch`.
pub const HYPERVISOR_FPU_TASKSWITCH: u64 = 5;
/// `__HYPERVISOR_update_va_mapping`.
pub const HYPERVISOR_UPDATE_VA_MAPPING: u64 = 14;
/// `__HYPERVISOR_mmuext_op`.
pub const HYPERVISOR_MMUEXT_OP: u64 = 26;
/// `SCHEDOP_block`.
pub const SCHEDOP_BLOCK: u64 = 1;
/// `DOMID_SELF`.
pub const DOMID_SELF: u64 = 0x7ff0;
/// `UVMF_INVLPG` (flush this address on this CPU after the update).
pub const UVMF_INVLPG: u64 = 2;

/// `mmuext_op` commands.
pub mod mmuext {
    /// `MMUEXT_PIN_L1_TABLE`; L2..L4 follow (1..3).
    pub const PIN_L1_TABLE: u32 = 0;
    /// `MMUEXT_UNPIN_TABLE`.
    pub const UNPIN_TABLE: u32 = 4;
    /// `MMUEXT_TLB_FLUSH_LOCAL`.
    pub const TLB_FLUSH_LOCAL: u32 = 6;
    /// `MMUEXT_INVLPG_LOCAL`.
    pub const INVLPG_LOCAL: u32 = 7;
    /// `MMUEXT_FLUSH_CACHE`.
    pub const FLUSH_CACHE: u32 = 12;
}

/// `struct mmuext_op` (24 bytes): a command and up to two arguments.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MmuextOp {
    /// One of [`mmuext`].
    pub cmd: u32,
    /// A machine frame or a linear address.
    pub arg1: u64,
    /// A count, a mask pointer or a source frame.
    pub arg2: u64,
}

/// `struct mmu_update` (16 bytes): `ptr` is the entry's machine address (low bits: the
/// command, 0 = `MMU_NORMAL_PT_UPDATE`), `val` the new entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MmuUpdate {
    /// Machine address of the entry.
    pub ptr: u64,
    /// The new entry.
    pub val: u64,
}

static_assertions::assert_eq_size!(MmuextOp, [u8; 24]);
static_assertions::assert_eq_size!(MmuUpdate, [u8; 16]);

/// `vcpu_info` offsets (abi-xen.md §3.3).
pub const VCPU_INFO_PENDING: u64 = 0;
/// `evtchn_upcall_mask`: the PV interrupt flag (1 = masked).
pub const VCPU_INFO_MASK: u64 = 1;
/// `arch.cr2`.
pub const VCPU_INFO_CR2: u64 = 16;
/// `time`: the vCPU's pvclock record.
pub const VCPU_INFO_TIME: u64 = 32;
/// `shared_info.wc` (the wall clock at system time 0).
pub const SHARED_INFO_WC: usize = 0xc00;
/// `shared_info.wc_sec_hi`.
pub const SHARED_INFO_WC_SEC_HI: usize = 0xc0c;
