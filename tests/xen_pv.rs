//! The Xen PV half's pure parts: finding the kernel's `vcpu_info` in its own PV irq code (the
//! bytes below are Linux 6.12's `xen_irq_disable_direct` and `xen_save_fl_direct`, as built by
//! `scripts/kernel`, with their addresses) and each way the decoder refuses code, the hypercall
//! structures, that the PV table never keeps a privileged native op, and the PV irq and CR2
//! ops themselves, run on the host against a modelled `vcpu_info` (a user process's GS base is
//! 0, so their `%gs:` accesses reach a buffer at a low address).

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

/// Found by `scripts/fuzz` (target `xen_decode`): code that starts with endbr64 at one of the
/// last four addresses makes `gs_rip_target` compute `addr + 4` (backends/src/xen/decode.rs,
/// line 13), which overflows. That is a panic wherever overflow checks are on (debug builds, the
/// fuzzer, a kernel built with CONFIG_RUST_OVERFLOW_CHECKS), while the rest of the decoder's
/// address arithmetic wraps. Fixed (the skip wraps too); this keeps it fixed.
#[test]
fn endbr_in_the_last_bytes_of_the_address_space() {
    // The fuzzer's minimised input, laid out as the target reads it: irq_disable's address
    // (u64::MAX - 3), save_fl's, an opcode, an instruction length, where the code splits, then
    // the code: irq_disable's is endbr64 alone, save_fl's is empty.
    const INPUT: [u8; 30] = [
        0xfc, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x11, 0xf3, 0x0f, 0x1e, 0xfa, 0x05, 0x45,
        0xff, 0xc6, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x11, 0xf3, 0x0f, 0x1e, 0xfa,
    ];
    let at = u64::from_le_bytes(INPUT[..8].try_into().unwrap());
    let save_fl_at = u64::from_le_bytes(INPUT[8..16].try_into().unwrap());
    let code = &INPUT[26..];
    assert_eq!((at, code), (u64::MAX - 3, &[0xf3, 0x0f, 0x1e, 0xfa][..]));
    // endbr64 with nothing after it is no %gs instruction, wherever it is
    assert_eq!(gs_rip_target(code, at, 0xc6, 8), None);
    assert_eq!(vcpu_info_offset((code, at), (&[], save_fl_at)), None);
    // and a whole instruction there targets what its displacement says, wrapping like the rest
    let mut insn = DISABLE;
    insn[7..11].copy_from_slice(&0x40i32.to_le_bytes());
    for addr in u64::MAX - 3..=u64::MAX {
        let want = addr.wrapping_add(4 + 8 + 0x40);
        let got = gs_rip_target(&insn, addr, 0xc6, 8);
        assert!(got.is_none_or(|t| t == want), "{addr:#x}: {got:x?}");
    }
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
    // the lock ops: a store, nothing, nothing, false; and no flush taken over
    Op::QueuedSpinUnlock,
    Op::LockWait,
    Op::LockKick,
    Op::VcpuIsPreempted,
    Op::FlushTlbDefer,
    // none sent: the kernel's event channels carry a PV domain's IPIs
    Op::SendIpi,
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

/// `[endbr64] 65 <op> 05 <disp32> <imm8>` at `at`, `%gs:`-relative to `target` (RIP-relative:
/// the displacement counts from the end of the 8-byte instruction), then `ret`.
fn gs_insn(op: u8, imm: u8, at: u64, target: u64) -> [u8; 13] {
    let disp = i32::try_from(target as i64 - (at as i64 + 12)).expect("within ±2 GiB");
    let d = disp.to_le_bytes();
    [
        0xf3, 0x0f, 0x1e, 0xfa, 0x65, op, 0x05, d[0], d[1], d[2], d[3], imm, 0xc3,
    ]
}

/// The decoder's refusals, each on its own: the wrong opcode in either function, two targets
/// that disagree, a mask byte that is not at offset 1 of a 64-byte-aligned `vcpu_info`, and
/// a per-CPU offset beyond [`MAX_PERCPU_OFFSET`].
#[test]
fn decoder_refuses_each_wrong_shape() {
    use pvops_backends::xen::decode::MAX_PERCPU_OFFSET;
    let (da, sa) = (0x1000u64, 0x2000u64);
    let ok = |vi: u64| {
        vcpu_info_offset(
            (&gs_insn(0xc6, 1, da, vi + 1), da),
            (&gs_insn(0xf6, 0xff, sa, vi + 1), sa),
        )
    };
    assert_eq!(ok(0x21bc0), Some(0x21bc0));
    assert_eq!(ok(0), Some(0));
    assert_eq!(ok(MAX_PERCPU_OFFSET - 64), Some(MAX_PERCPU_OFFSET - 64));
    // too large: at the bound and beyond
    assert_eq!(ok(MAX_PERCPU_OFFSET), None);
    assert_eq!(ok(MAX_PERCPU_OFFSET + 0x1000), None);
    // unaligned vcpu_info (the mask byte elsewhere than offset 1 of a 64-byte line)
    assert_eq!(ok(0x21bc0 + 8), None);
    assert_eq!(ok(0x21bc0 + 1), None);
    // wrong opcode: `movl $imm32` (c7) for the byte store, `testl` (f7) for the byte test
    for (d_op, s_op) in [(0xc7, 0xf6), (0xc6, 0xf7), (0xf6, 0xc6), (0x88, 0xf6)] {
        assert_eq!(
            vcpu_info_offset(
                (&gs_insn(d_op, 1, da, 0x21bc1), da),
                (&gs_insn(s_op, 0xff, sa, 0x21bc1), sa),
            ),
            None,
            "opcodes {d_op:#x}/{s_op:#x}"
        );
    }
    // different targets, even one aligned line apart
    assert_eq!(
        vcpu_info_offset(
            (&gs_insn(0xc6, 1, da, 0x21bc1), da),
            (&gs_insn(0xf6, 0xff, sa, 0x21c01), sa),
        ),
        None
    );
}

/// The GS base of this thread (`arch_prctl(ARCH_GET_GS)`).
fn gs_base() -> Option<u64> {
    const ARCH_GET_GS: libc::c_long = 0x1004;
    let mut base = 0u64;
    // SAFETY: ARCH_GET_GS writes the base into the u64 we pass.
    let rc = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_GET_GS, &mut base as *mut u64) };
    (rc == 0).then_some(base)
}

/// Two pages at a fixed low address (a per-CPU offset must be below 16 MiB): the first is the
/// modelled `vcpu_info` (with the GS base 0, `%gs:x` is address `x`), the second holds the
/// crafted "kernel" irq code.
fn low_pages() -> Option<usize> {
    for addr in [0x0020_0000usize, 0x0050_0000, 0x0090_0000, 0x00d0_0000] {
        // SAFETY: a fresh anonymous mapping at an address nothing uses (NOREPLACE refuses
        // otherwise); the test unmaps it.
        let p = unsafe {
            libc::mmap(
                addr as *mut _,
                8192,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        if p as usize == addr {
            return Some(addr);
        }
        if p != libc::MAP_FAILED {
            // SAFETY: what mmap just returned (an older kernel took the hint elsewhere).
            unsafe { libc::munmap(p, 8192) };
        }
    }
    None
}

/// Whether `rax` is what a Linux system call returns (0 or -errno): the mark that
/// `check_events` ran (its `syscall`, in user space Linux's pread64(0, NULL, …), harmless).
fn syscall_result(rax: u64) -> bool {
    (rax as i64) <= 0 && (rax as i64) > -4096
}

/// The PV irq and CR2 ops, run for real on the host: in a Linux process the GS base is 0, so
/// their `%gs:`-relative accesses reach a buffer at a low address, which `pv::start` locates
/// as the `vcpu_info` from crafted code (the kernel's two irq instructions aimed at it).
#[test]
fn pv_irq_ops_run_against_a_modelled_vcpu_info() {
    use pvops_backends::xen::pv::{self, XenPvKernel};
    match gs_base() {
        Some(0) => {}
        other => {
            eprintln!("skipped: the GS base of this thread is {other:x?}, not 0");
            return;
        }
    }
    let Some(low) = low_pages() else {
        eprintln!("skipped: no low address could be mapped for the vcpu_info");
        return;
    };
    let vcpu_info = low + 0x40; // 64-byte aligned, not 0
    let code = low + 4096;
    let (disable_at, save_fl_at) = (code, code + 64);
    let disable = gs_insn(0xc6, 1, disable_at as u64, vcpu_info as u64 + 1);
    let save_fl = gs_insn(0xf6, 0xff, save_fl_at as u64, vcpu_info as u64 + 1);
    // SAFETY: the mapping is ours and writable; nothing else uses it.
    unsafe {
        std::ptr::copy_nonoverlapping(disable.as_ptr(), disable_at as *mut u8, disable.len());
        std::ptr::copy_nonoverlapping(save_fl.as_ptr(), save_fl_at as *mut u8, save_fl.len());
    }
    extern "C" fn zero() -> u64 {
        0
    }
    extern "C" fn nothing(_: u64) {}
    extern "C" fn no_ma(_: usize) -> u64 {
        0
    }
    extern "C" fn no_pte(_: usize) -> usize {
        0
    }
    /// The kernel's conversions over a modelled p2m: machine frame = pseudo-physical + 0x100.
    extern "C" fn model_value(op: pvops::Op, value: u64) -> u64 {
        use pvops::Op::*;
        const MACHINE: u64 = 0x100 << 12;
        if [PteVal, PmdVal, PudVal, P4dVal, PgdVal].contains(&op) {
            value - MACHINE
        } else {
            value + MACHINE
        }
    }
    let k = XenPvKernel {
        irq_disable: disable_at,
        save_fl: save_fl_at,
        percpu_base0: 0,
        shared_info: 0,
        cr0: 0x8005_003b,
        read_cr3: zero,
        write_cr3: nothing,
        read_cr4: zero,
        virt_to_machine: no_ma,
        pte_of: no_pte,
        value: model_value,
    };
    let rec = pv::start(k).expect("the crafted code locates the buffer");
    assert_eq!(
        rec as usize,
        vcpu_info + 32,
        "vCPU 0's time record is vcpu_info.time"
    );

    let pending = vcpu_info as *mut u8;
    let mask = (vcpu_info + 1) as *mut u8;
    let cr2 = (vcpu_info + 16) as *mut u64;
    // SAFETY: the buffer is ours (likewise every access below).
    let byte = |p: *mut u8| unsafe { p.read_volatile() };
    // SAFETY: as above.
    let set = |p: *mut u8, v: u8| unsafe { p.write_volatile(v) };
    let ops = pv::ops();
    let op = |o: pvops::Op| ops.target(o);
    // SAFETY: the PV ops on the located vcpu_info, each called with the callee-save
    // convention; check_events' syscall is pread64(0, NULL, …) here, harmless.
    unsafe {
        let call = |o: pvops::Op, arg: u64| {
            let (rax, regs) = pvops_host_tests::call_callee_save(op(o), arg);
            let mut want = pvops_host_tests::SENTINELS;
            want[3] = arg;
            assert_eq!(regs, want, "{}: every register but RAX kept", o.name());
            rax
        };
        use pvops::Op::*;
        // the value ops are the kernel's conversions, the frame translated both ways
        let entry = 0x8000_0000_0012_3067u64;
        for (val, make) in [
            (PteVal, MakePte),
            (PmdVal, MakePmd),
            (PudVal, MakePud),
            (P4dVal, MakeP4d),
            (PgdVal, MakePgd),
        ] {
            assert_eq!(call(val, entry), entry - (0x100 << 12), "{}", val.name());
            assert_eq!(call(make, entry - (0x100 << 12)), entry, "{}", make.name());
        }
        set(pending, 0);
        set(mask, 0);
        assert_eq!(call(SaveFl, 0), 0x200, "unmasked: IF on");
        call(IrqDisable, 0);
        assert_eq!(byte(mask), 1, "irq_disable masks events");
        assert_eq!(byte(pending), 0, "and leaves the pending byte alone");
        assert_eq!(call(SaveFl, 0), 0, "masked: IF off");
        // enable with nothing pending: unmask, no hypercall
        let rax = call(IrqEnable, 0);
        assert_eq!(byte(mask), 0);
        assert!(
            !syscall_result(rax),
            "no check_events without an event ({rax:#x})"
        );
        // restore_fl from bit 9
        call(RestoreFl, 0);
        assert_eq!(byte(mask), 1);
        assert_eq!(call(SaveFl, 0), 0);
        let rax = call(RestoreFl, 0x200);
        assert_eq!(byte(mask), 0);
        assert!(!syscall_result(rax));
        assert_eq!(call(SaveFl, 0), 0x200);
        // an event pending while masked: enabling makes the hypercall (check_events)
        call(IrqDisable, 0);
        set(pending, 1);
        let rax = call(IrqEnable, 0);
        assert_eq!(byte(mask), 0);
        assert!(
            syscall_result(rax),
            "check_events ran its syscall ({rax:#x})"
        );
        call(IrqDisable, 0);
        let rax = call(RestoreFl, 0x200);
        assert!(
            syscall_result(rax),
            "restore_fl enables through check_events"
        );
        assert_eq!(byte(mask), 0);
        set(pending, 0);
        // CR2 is vcpu_info.arch.cr2
        call(WriteCr2, 0xdead_b000);
        assert_eq!(cr2.read_volatile(), 0xdead_b000);
        cr2.write_volatile(0x1234_5678_9000);
        assert_eq!(call(ReadCr2, 0), 0x1234_5678_9000);
    }
    pv::stop();
    // SAFETY: the mapping made above; nothing refers to it any more.
    unsafe { libc::munmap(low as *mut _, 8192) };
}
