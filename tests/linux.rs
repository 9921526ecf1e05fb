//! pvops built into Linux 6.12: the plan for the kernel's own pv call sites
//! (`pvops::linux`), with the native backend's real inline bytes.

use pvops::linux::{
    io_delay_choice, plan, served, served_members, Adapter, KernelAction, LinuxConv, LinuxIoDelay,
    PtLevel, Served, Via,
};
use pvops::ops::{Clobbers, Inline};
use pvops::Op;
use pvops_backends::native::OPS;

const SITE: usize = 0xffff_ffff_8100_0000;

#[test]
fn every_served_member_is_inline_on_native() {
    // where Linux's signature is the op's: the native bytes; where an adapter stands between,
    // a direct call to it unless native's op does nothing (then NOPs)
    const ADAPTER: usize = SITE + 0x10_0000;
    for (name, op, conv, via) in served_members() {
        assert_eq!(served(name), Served::Yes { op, conv, via });
        let (action, bytes) = plan(SITE, op, conv, via, ADAPTER, &OPS).unwrap();
        match via {
            Via::Op => {
                assert_eq!(action, KernelAction::Inline, "{name}");
                let inline = OPS.inline(op).unwrap();
                assert_eq!(&bytes[..inline.bytes.len()], inline.bytes, "{name}");
            }
            Via::Adapter(Adapter::AllocPt(_) | Adapter::ReleasePt(_)) => {
                assert_eq!(action, KernelAction::Inline, "{name}");
                assert_eq!(bytes, [0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00], "{name}");
            }
            Via::Adapter(_) => {
                assert_eq!(action, KernelAction::Direct, "{name}");
                let r = (0x10_0000i32 - 5).to_le_bytes();
                assert_eq!(bytes, [0xe8, r[0], r[1], r[2], r[3], 0x90], "{name}");
            }
        }
    }
    // Linux's own native replacements, byte for byte (paravirt.h: "pushf; pop %rax", "cli",
    // "sti", "mov %cr2,%rax", "mov %cr3,%rax", "mov %rdi,%cr3"), padded with one NOP
    let linux: [(Op, LinuxConv, [u8; 6]); 6] = [
        (
            Op::SaveFl,
            LinuxConv::CalleeSave,
            [0x9c, 0x58, 0x0f, 0x1f, 0x40, 0x00],
        ),
        (
            Op::IrqDisable,
            LinuxConv::CalleeSave,
            [0xfa, 0x0f, 0x1f, 0x44, 0x00, 0x00],
        ),
        (
            Op::IrqEnable,
            LinuxConv::CalleeSave,
            [0xfb, 0x0f, 0x1f, 0x44, 0x00, 0x00],
        ),
        (
            Op::ReadCr2,
            LinuxConv::CalleeSave,
            [0x0f, 0x20, 0xd0, 0x0f, 0x1f, 0x00],
        ),
        (
            Op::ReadCr3,
            LinuxConv::C,
            [0x0f, 0x20, 0xd8, 0x0f, 0x1f, 0x00],
        ),
        (
            Op::WriteCr3,
            LinuxConv::C,
            [0x0f, 0x22, 0xdf, 0x0f, 0x1f, 0x00],
        ),
    ];
    for (op, conv, want) in linux {
        assert_eq!(
            plan(SITE, op, conv, Via::Op, 0, &OPS).unwrap().1,
            want,
            "{op:?}"
        );
    }
}

#[test]
fn inline_bytes_outside_the_convention_become_a_direct_call() {
    let mut ops = OPS;
    let target = SITE + 0x1234;
    // an inline sequence that changes RCX: fine at a C site, not at a callee-save one
    let rcx = Inline {
        bytes: &[0x31, 0xc9],
        clobbers: Clobbers::RCX,
    };
    // SAFETY: a test table nothing runs.
    unsafe { ops.set_raw(Op::SaveFl, target, Some(rcx)) };
    let (a, b) = plan(SITE, Op::SaveFl, LinuxConv::CalleeSave, Via::Op, 0, &ops).unwrap();
    assert_eq!(a, KernelAction::Direct);
    let r = 0x1234i32.wrapping_sub(5).to_le_bytes();
    assert_eq!(b, [0xe8, r[0], r[1], r[2], r[3], 0x90]);
    let (a, b) = plan(SITE, Op::SaveFl, LinuxConv::C, Via::Op, 0, &ops).unwrap();
    assert_eq!(
        (a, b),
        (KernelAction::Inline, [0x31, 0xc9, 0x0f, 0x1f, 0x40, 0x00])
    );
    // out of rel32 reach: left to Linux
    // SAFETY: as above.
    unsafe { ops.set_raw(Op::SaveFl, 0x4000_0000_0000, None) };
    assert_eq!(
        plan(SITE, Op::SaveFl, LinuxConv::CalleeSave, Via::Op, 0, &ops),
        None
    );
}

#[test]
fn members_left_to_linux_say_why() {
    for m in [
        "cpu.write_cr0",
        "cpu.write_cr4",
        "irq.safe_halt",
        "mmu.flush_tlb_one_user",
    ] {
        assert!(matches!(served(m), Served::No(w) if !w.is_empty()), "{m}");
    }
}

#[test]
fn which_backends_serve_the_kernel() {
    use pvops::Backend;
    use pvops_backends::{kvm::KVM, lguest::LGUEST, native::NATIVE, vmi::VMI, xen::Xen};
    // Every member pvops serves, on native (the bare instructions), on KVM and on Xen outside a
    // PV domain (HVM, as on the host here: their CPU, IRQ and MMU ops are native's), on VMI
    // (what VMI was for: the ROM's routines at the kernel's own sites) and on lguest (the
    // hardware flag reported, the page-table writes notified synchronously)
    let all: [(&str, &dyn Backend); 5] = [
        ("native", &NATIVE),
        ("kvm", &KVM),
        ("xen hvm", &Xen),
        ("vmi", &VMI),
        ("lguest", &LGUEST),
    ];
    for (backend, b) in all {
        for (name, op, ..) in served_members() {
            assert_eq!(b.serves_kernel(op), Ok(()), "{backend} {name}");
        }
    }
    // never the hypercall, and the time ops only where the kernel reads the same records:
    // KVM's steal clock (the kernel's own steal-time records) and sched_clock (below)
    assert!(KVM.serves_kernel(pvops::Op::Hypercall).is_err());
    assert_eq!(KVM.serves_kernel(pvops::Op::StealClock), Ok(()));
    for op in [
        pvops::Op::StealClock,
        pvops::Op::Hypercall,
        pvops::Op::SchedClock,
    ] {
        for (backend, b) in [("xen hvm", &Xen as &dyn Backend), ("lguest", &LGUEST)] {
            assert!(
                matches!(b.serves_kernel(op), Err(w) if !w.is_empty()),
                "{backend} {op:?}"
            );
        }
    }
    assert!(VMI.serves_kernel(pvops::Op::SchedClock).is_err());
    // not started here, so no record of its own: the kernel's clock and KVM's are one
    assert!(!pvops_backends::kvm::owns_clock());
    assert_eq!(KVM.serves_kernel(pvops::Op::SchedClock), Ok(()));
    // (Xen PV's subset, the interrupt flag and CR2, is checked on the xen-pv built-in rig)
}

#[test]
fn io_delay_is_served_where_linux_s_is_the_backend_s() {
    let mut ops = OPS;
    let port80 = Inline {
        bytes: &[0xe6, 0x80],
        clobbers: pvops::ops::Clobbers::empty(),
    };
    let target = ops.target(Op::IoDelay);
    for (inline, linux, ok) in [
        (Some(port80), LinuxIoDelay::Port80, true),
        (Some(port80), LinuxIoDelay::Nothing, false),
        (Some(port80), LinuxIoDelay::Other, false),
        (Some(Inline::NOTHING), LinuxIoDelay::Nothing, true),
        (Some(Inline::NOTHING), LinuxIoDelay::Port80, false),
        (None, LinuxIoDelay::Port80, false),
    ] {
        // SAFETY: a test table nothing runs.
        unsafe { ops.set_raw(Op::IoDelay, target, inline) };
        let r = io_delay_choice(Op::IoDelay, &ops, linux);
        assert_eq!(r.is_ok(), ok, "{inline:?} {linux:?}: {r:?}");
        assert_eq!(io_delay_choice(Op::ReadCr0, &ops, linux), Ok(()));
    }
}

#[test]
fn adapted_members_call_the_adapter_or_become_nops() {
    let mut ops = OPS;
    let (site, adapter) = (0xffff_ffff_8100_0000usize, 0xffff_ffff_8100_1000usize);
    let via = Via::Adapter(Adapter::AllocPt(PtLevel::Pte));
    let target = ops.target(Op::AllocPt);
    // SAFETY: a test table nothing runs.
    unsafe { ops.set_raw(Op::AllocPt, target, None) };
    let (a, b) = plan(site, Op::AllocPt, LinuxConv::C, via, adapter, &ops).unwrap();
    let r = (0x1000i32 - 5).to_le_bytes();
    assert_eq!(
        (a, b),
        (KernelAction::Direct, [0xe8, r[0], r[1], r[2], r[3], 0x90])
    );
    // a backend whose op does nothing: the site does nothing, whatever its arguments
    // SAFETY: a test table nothing runs.
    unsafe { ops.set_raw(Op::AllocPt, target, Some(Inline::NOTHING)) };
    let (a, b) = plan(site, Op::AllocPt, LinuxConv::C, via, adapter, &ops).unwrap();
    assert_eq!(a, KernelAction::Inline);
    assert_eq!(b, [0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00]);
    // other inline bytes are the op's registers, not Linux's: the adapter
    let rdi = Inline {
        bytes: &[0x90],
        clobbers: pvops::ops::Clobbers::empty(),
    };
    // SAFETY: as above.
    unsafe { ops.set_raw(Op::AllocPt, target, Some(rdi)) };
    let (a, _) = plan(site, Op::AllocPt, LinuxConv::C, via, adapter, &ops).unwrap();
    assert_eq!(a, KernelAction::Direct);
    // out of reach
    assert_eq!(
        plan(site, Op::AllocPt, LinuxConv::C, via, 0x4000_0000, &ops),
        None
    );
}
