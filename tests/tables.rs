//! Every backend's table keeps the ops' conventions, checked on the code itself
//! ([`pvops_host_tests::conventions`]): the backends whose table needs no running hypervisor
//! here; KVM, lguest and VMI are checked where their tests start them on a model.

use pvops::Backend;
use pvops_host_tests::conventions;

#[test]
fn native_table_keeps_every_convention() {
    assert_eq!(
        conventions::check(&pvops_backends::native::OPS),
        Vec::<String>::new()
    );
}

#[test]
fn xen_pv_table_keeps_every_convention() {
    let bad = conventions::check(&pvops_backends::xen::pv::ops());
    assert_eq!(bad, Vec::<String>::new());
    // and inlines no instruction (a native one would trap in ring 3): at most an op that
    // does nothing becomes NOPs (lazy mode, as natively)
    for &op in pvops::Op::ALL {
        let inline = pvops_backends::xen::pv::ops().inline(op);
        assert!(
            inline.is_none_or(|i| i.bytes.is_empty()),
            "{}: {inline:?}",
            op.name()
        );
    }
}

#[test]
fn xen_hvm_table_keeps_every_convention() {
    // unstarted, the backend serves HVM: native ops, Xen's time and hypercall
    assert_eq!(
        conventions::check(&pvops_backends::xen::XEN.ops()),
        Vec::<String>::new()
    );
}

/// The checker itself can fail: a thunk that forgets a register, an inline sequence that
/// changes more than it declares, and a declared "callee-save" function that is plain C code.
#[test]
fn the_checker_catches_broken_conventions() {
    use pvops::ops::{CalleeSave, Clobbers, Impl, Inline};
    let mut ops = pvops_backends::native::OPS;
    // `mov rax, cr0` declared as changing nothing
    ops.cpu.read_cr0.inline = Some(Inline {
        bytes: &[0x0f, 0x20, 0xc0],
        clobbers: Clobbers::empty(),
    });
    // `xor ecx, ecx` inline for a callee-save op
    ops.irq.irq_disable.inline = Some(Inline {
        bytes: &[0x31, 0xc9],
        clobbers: Clobbers::RCX,
    });
    // a C function (it uses scratch registers) declared callee-save
    extern "C" fn busy() -> u64 {
        let mut acc = std::hint::black_box(3u64);
        for i in 0..64u64 {
            acc = acc.rotate_left(7) ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
        std::hint::black_box(acc)
    }
    // SAFETY: never called; the point is that the checker rejects it.
    ops.irq.save_fl =
        Impl::call(unsafe { CalleeSave::declare(busy as unsafe extern "C" fn() -> u64) });
    let bad = conventions::check(&ops);
    let names: Vec<&str> = bad.iter().map(|l| l.split(':').next().unwrap()).collect();
    assert!(names.contains(&"cpu.read_cr0"), "{bad:#?}");
    assert!(names.contains(&"irq.irq_disable"), "{bad:#?}");
    assert!(names.contains(&"irq.save_fl"), "{bad:#?}");
}
