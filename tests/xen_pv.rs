//! The Xen PV half's pure parts: finding the kernel's `vcpu_info` in its own PV irq code (the
//! bytes below are Linux 6.12's `xen_irq_disable_direct` and `xen_save_fl_direct`, as built by
//! `scripts/kernel`, with their addresses), the hypercall structures, and that the PV table
//! never keeps a privileged native op.

use pvops::ops::Op;
use pvops_backends::xen::abi::{MmuUpdate, MmuextOp};
use pvops_backends::xen::decode::{gs_rip_target, vcpu_info_offset};

const DISABLE_AT: u64 = 0xffff_ffff_8159_2370;
/// endbr64; movb $0x1, %gs:0x7ea8f845(%rip); jmp __x86_return_thunk
const DISABLE: [u8; 17] = [
    0xf3, 0x0f, 0x1e, 0xfa, 0x65, 0xc6, 0x05, 0x45, 0xf8, 0xa8, 0x7e, 0x01, 0xe9, 0xef, 0xf4, 0x00,
    0x00,
];
const SAVE_FL_AT: u64 = 0xffff_ffff_8159_2410;
/// endbr64; testb $0xff, %gs:0x7ea8f7a5(%rip); sete %ah; add %ah, %ah
const SAVE_FL: [u8; 17] = [
    0xf3, 0x0f, 0x1e, 0xfa, 0x65, 0xf6, 0x05, 0xa5, 0xf7, 0xa8, 0x7e, 0xff, 0x0f, 0x94, 0xc4, 0x00,
    0xe4,
];
/// `xen_vcpu_info` in that kernel's System.map.
const XEN_VCPU_INFO: u64 = 0x21bc0;

#[test]
fn finds_the_kernels_vcpu_info() {
    assert_eq!(
        gs_rip_target(&DISABLE, DISABLE_AT, 0xc6, 8),
        Some(XEN_VCPU_INFO + 1)
    );
    assert_eq!(
        vcpu_info_offset((&DISABLE, DISABLE_AT), (&SAVE_FL, SAVE_FL_AT)),
        Some(XEN_VCPU_INFO)
    );
}

#[test]
fn works_without_endbr() {
    assert_eq!(
        vcpu_info_offset(
            (&DISABLE[4..], DISABLE_AT + 4),
            (&SAVE_FL[4..], SAVE_FL_AT + 4)
        ),
        Some(XEN_VCPU_INFO)
    );
}

#[test]
fn refuses_code_it_does_not_know() {
    // swapped functions: the opcodes do not match
    assert_eq!(
        vcpu_info_offset((&SAVE_FL, SAVE_FL_AT), (&DISABLE, DISABLE_AT)),
        None
    );
    // a wrong address for one of them: the two targets disagree
    assert_eq!(
        vcpu_info_offset((&DISABLE, DISABLE_AT + 16), (&SAVE_FL, SAVE_FL_AT)),
        None
    );
    // not %gs-relative (no 65 prefix), e.g. an unpatched native `cli; ret` or another kernel
    let mut no_gs = DISABLE;
    no_gs[4] = 0x90;
    assert_eq!(
        vcpu_info_offset((&no_gs, DISABLE_AT), (&SAVE_FL, SAVE_FL_AT)),
        None
    );
    assert_eq!(
        vcpu_info_offset(
            (&[0xfa, 0xc3], DISABLE_AT),
            (&[0x9c, 0x58, 0xc3], SAVE_FL_AT)
        ),
        None
    );
    // truncated
    assert_eq!(
        vcpu_info_offset((&DISABLE[..8], DISABLE_AT), (&SAVE_FL, SAVE_FL_AT)),
        None
    );
    // the mask byte must be vcpu_info's second byte of a 64-byte-aligned structure
    let mut odd = DISABLE;
    let mut odd_save = SAVE_FL;
    odd[7] = odd[7].wrapping_add(1);
    odd_save[7] = odd_save[7].wrapping_add(1);
    assert_eq!(
        vcpu_info_offset((&odd, DISABLE_AT), (&odd_save, SAVE_FL_AT)),
        None
    );
}

#[test]
fn hypercall_structures_have_xens_layout() {
    assert_eq!(core::mem::size_of::<MmuextOp>(), 24);
    assert_eq!(core::mem::offset_of!(MmuextOp, arg1), 8);
    assert_eq!(core::mem::offset_of!(MmuextOp, arg2), 16);
    assert_eq!(core::mem::size_of::<MmuUpdate>(), 16);
    assert_eq!(pvops_backends::xen::abi::VCPU_INFO_CR2, 16);
    assert_eq!(pvops_backends::xen::abi::VCPU_INFO_TIME, 32);
    assert_eq!(pvops_backends::xen::abi::SHARED_INFO_WC, 0xc00);
}

/// Native ops a PV table may keep: none of them executes a privileged instruction, or (MSRs)
/// the PV ABI itself has Xen emulate it.
const KEPT: &[Op] = &[
    Op::ReadMsr,
    Op::WriteMsr,
    Op::ReadMsrSafe,
    Op::WriteMsrSafe,
    Op::LazyModeEnter,
    Op::LazyModeLeave,
    // the time ops and the hypercall are the Xen backend's own (set by `Xen::ops`)
    Op::SchedClock,
    Op::StealClock,
    Op::TscKhz,
    Op::WallClock,
    Op::SetNextEvent,
    Op::Hypercall,
];

#[test]
fn pv_table_replaces_every_privileged_native_op() {
    let pv = pvops_backends::xen::pv::ops();
    let native = pvops_backends::native::OPS;
    for &op in Op::ALL {
        let replaced = pv.target(op) != native.target(op);
        assert_eq!(replaced, !KEPT.contains(&op), "{}", op.name());
    }
}
