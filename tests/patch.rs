//! Real patching in user space: this test binary's own call sites are made writable, patched
//! for the native backend, decoded to check each holds exactly the intended instructions,
//! executed where ring 3 allows, and reverted byte for byte.
//!
//! Everything runs in one `#[test]` so no other test thread executes a site while it is being
//! rewritten.

use std::collections::HashMap;
use std::hint::black_box;

use iced_x86::{FlowControl, Mnemonic};
use pvops::ops::{cpu, irq, mmu, timer, Op};
use pvops::patch::{Action, PatchError};
use pvops::{Backend, Patcher, SiteTable, Text, PV_OPS};
use pvops_backends::native::NATIVE;
use pvops_host_tests::{decode, peek, text as asm_text, MprotectText};

/// Instantiates a call site for every op. Only the ops that are legal in ring 3 ever run
/// (`run_privileged` is false at run time, but the compiler cannot know).
#[inline(never)]
fn sites_for_every_op(run_privileged: bool) {
    let _ = black_box(cpu::cpuid(0, 0));
    let _ = black_box(irq::save_fl());
    let _ = black_box(timer::sched_clock());
    let _ = black_box(timer::steal_clock(0));
    let _ = black_box(timer::tsc_khz());
    let _ = black_box(cpu::store_tr);
    if black_box(run_privileged) {
        let mut pte = 0u64;
        let d = pvops::ops::DescriptorPointer::default();
        // SAFETY: never executed (see above); the calls exist to be patched and decoded.
        unsafe {
            cpu::write_cr0(cpu::read_cr0());
            cpu::write_cr4(cpu::read_cr4());
            let _ = cpu::read_msr_safe(0x10).and_then(|v| cpu::write_msr_safe(0x10, v));
            cpu::write_msr(0x10, cpu::read_msr(0x10));
            cpu::wbinvd();
            cpu::load_idt(&d);
            cpu::load_gdt(&d);
            let _ = cpu::store_tr();
            cpu::io_delay();
            irq::restore_fl(irq::save_fl());
            irq::irq_disable();
            irq::irq_enable();
            irq::safe_halt();
            irq::halt();
            mmu::write_cr2(mmu::read_cr2());
            mmu::write_cr3(mmu::read_cr3());
            mmu::flush_tlb_user();
            mmu::flush_tlb_kernel();
            mmu::flush_tlb_one_user(0);
            mmu::set_pte(&mut pte, 1);
            mmu::set_pmd(&mut pte, 2);
            mmu::set_pud(&mut pte, 3);
            mmu::alloc_pt(1, 1);
            mmu::release_pt(1, 1);
            mmu::lazy_mode_enter();
            mmu::lazy_mode_leave();
            let _ = timer::wall_clock();
            let _ = timer::set_next_event(1000);
            let _ = cpu::hypercall(0, 0, 0, 0, 0);
        }
    }
}

/// What each native inline replacement must decode to (independently of the backend's bytes).
fn expected_inline(op: Op) -> Option<&'static [&'static str]> {
    Some(match op {
        Op::ReadCr0 => &["mov rax, cr0"],
        Op::WriteCr0 => &["mov cr0, rdi"],
        Op::ReadCr4 => &["mov rax, cr4"],
        Op::WriteCr4 => &["mov cr4, rdi"],
        Op::Wbinvd => &["wbinvd"],
        Op::LoadIdt => &["lidt [rdi]"],
        Op::LoadGdt => &["lgdt [rdi]"],
        Op::StoreTr => &["str rax"],
        Op::IoDelay => &["out 80h, al"],
        Op::SaveFl => &["pushfq", "pop rax"],
        Op::RestoreFl => &["push rdi", "popfq"],
        Op::IrqDisable => &["cli"],
        Op::IrqEnable => &["sti"],
        Op::SafeHalt => &["sti", "hlt"],
        Op::Halt => &["hlt"],
        Op::ReadCr2 => &["mov rax, cr2"],
        Op::WriteCr2 => &["mov cr2, rdi"],
        Op::ReadCr3 => &["mov rax, cr3"],
        Op::WriteCr3 => &["mov cr3, rdi"],
        Op::FlushTlbUser => &["mov rax, cr3", "mov cr3, rax"],
        Op::FlushTlbOneUser => &["invlpg [rdi]"],
        Op::SetPte | Op::SetPmd | Op::SetPud => &["mov [rdi], rsi"],
        Op::AllocPt | Op::ReleasePt | Op::LazyModeEnter | Op::LazyModeLeave => &[],
        _ => return None,
    })
}

/// Every byte of every site, read from memory.
fn snapshot(p: &Patcher) -> Vec<(usize, Vec<u8>)> {
    p.sites()
        .map(|s| (s.addr, peek(s.addr, s.len as usize)))
        .collect()
}

/// The ops that are legal in ring 3, run through whatever the sites hold now.
fn run_user_ops(tsc_khz: u64) {
    let raw = pvops::arch::raw_cpuid(0, 0);
    assert_eq!(cpu::cpuid(0, 0), raw, "cpuid through the site");
    let leaf1 = cpu::cpuid(1, 0);
    assert_eq!(leaf1.eax, pvops::arch::raw_cpuid(1, 0).eax);

    let flags = irq::save_fl();
    assert_ne!(flags & irq::X86_EFLAGS_IF, 0, "user space runs with IF set");
    assert_ne!(flags & 2, 0, "RFLAGS bit 1 always reads 1");
    // SAFETY: restoring the flags just read (POPF in ring 3 cannot change IF or IOPL).
    unsafe { irq::restore_fl(flags) };

    assert_eq!(timer::tsc_khz(), tsc_khz);
    assert_eq!(timer::steal_clock(0), 0);
    let t0 = timer::sched_clock();
    let wall0 = std::time::Instant::now();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let t1 = timer::sched_clock();
    let dt = wall0.elapsed().as_nanos() as u64;
    assert!(t1 > t0, "sched_clock is monotonic");
    // the TSC was calibrated against this clock: within 10%
    let d = t1 - t0;
    assert!(
        d > dt * 9 / 10 && d < dt * 11 / 10,
        "sched_clock {d} ns vs Instant {dt} ns"
    );

    // SAFETY: on the native backend these are no-ops (NOPs once patched, empty functions before).
    unsafe {
        mmu::lazy_mode_enter();
        mmu::alloc_pt(1, 1);
        mmu::release_pt(1, 1);
        mmu::lazy_mode_leave();
    }
}

fn calibrate_tsc_khz() -> u64 {
    let c0 = pvops::arch::rdtsc_ordered();
    let t0 = std::time::Instant::now();
    std::thread::sleep(std::time::Duration::from_millis(50));
    let c1 = pvops::arch::rdtsc_ordered();
    let ns = t0.elapsed().as_nanos() as u64;
    (c1 - c0) * 1_000_000 / ns
}

#[test]
fn patch_this_process() {
    let khz = calibrate_tsc_khz();
    pvops_backends::native::set_tsc_rate(khz);
    let ops = NATIVE.ops();
    // SAFETY: single test thread; nothing runs ops while the table is written.
    unsafe { PV_OPS.install(&ops.table()) };
    sites_for_every_op(false);

    let sites = SiteTable::of_executable();
    assert!(!sites.is_empty(), "the test binary has call sites");
    let p = Patcher::new(sites, PV_OPS.addr(), &ops).expect("records are valid");

    // every op has at least one site, every site has its op's length
    let mut per_op: HashMap<Op, usize> = HashMap::new();
    for s in p.sites() {
        assert_eq!(s.len, s.op.site_len());
        assert_eq!(s.clobbers, s.op.convention().clobbers());
        *per_op.entry(s.op).or_default() += 1;
    }
    for op in Op::ALL {
        assert!(per_op.contains_key(op), "no call site for {}", op.name());
    }

    // Unpatched: every site is the indirect call through its slot, as emitted.
    p.verify(&MprotectText::default(), false)
        .expect("sites hold their original bytes");
    for s in p.sites() {
        let insns = decode(&peek(s.addr, s.len as usize), s.addr as u64);
        assert_eq!(insns[0].mnemonic(), Mnemonic::Call);
        assert_eq!(insns[0].flow_control(), FlowControl::IndirectCall);
        assert_eq!(
            insns[0].memory_displacement64() as usize,
            PV_OPS.addr() + s.op.slot()
        );
    }
    run_user_ops(khz);
    let before = snapshot(&p);

    // Patch.
    let plan = p.plan();
    let mut text = MprotectText::default();
    let report = p.apply(&mut text).expect("patching succeeds");
    assert_eq!(report, plan);
    assert_eq!(report.total, p.sites().count());
    assert_eq!(
        report.indirect, 0,
        "every native target is within reach of a direct call"
    );
    eprintln!("patched {report:?}, {} bytes written", text.written);
    p.verify(&text, true).expect("sites hold the patched bytes");

    // Decode every patched site.
    for s in p.sites() {
        let bytes = peek(s.addr, s.len as usize);
        let insns = decode(&bytes, s.addr as u64);
        let (action, _) = p.patched(&s);
        let body = match (action, expected_inline(s.op)) {
            (Action::Inline, Some(expected)) => {
                let got: Vec<String> = insns[..expected.len()].iter().map(asm_text).collect();
                assert_eq!(got, expected, "{} inline at {:#x}", s.op.name(), s.addr);
                expected.len()
            }
            (Action::DirectCall, None) => {
                let call = &insns[0];
                assert_eq!(call.mnemonic(), Mnemonic::Call);
                assert_eq!(call.flow_control(), FlowControl::Call, "direct call");
                assert_eq!(
                    call.near_branch64() as usize,
                    ops.target(s.op),
                    "{} target",
                    s.op.name()
                );
                1
            }
            other => panic!("{}: unexpected action {other:?}", s.op.name()),
        };
        // the rest of the site is at most one NOP
        let rest = &insns[body..];
        assert!(
            rest.len() <= 1,
            "{}: one padding NOP at most, got {rest:?}",
            s.op.name()
        );
        assert!(rest.iter().all(|i| i.mnemonic() == Mnemonic::Nop));
        assert_eq!(insns.iter().map(|i| i.len()).sum::<usize>(), s.len as usize);
    }

    // Run the patched sites.
    run_user_ops(khz);

    // A second apply is refused (sites no longer hold their original bytes) and writes nothing.
    let mut text2 = MprotectText::default();
    assert!(matches!(
        p.apply(&mut text2),
        Err(PatchError::Mismatch { .. })
    ));
    assert_eq!(text2.written, 0);

    // Revert: byte for byte what was there.
    p.revert(&mut text).expect("revert succeeds");
    assert_eq!(
        snapshot(&p),
        before,
        "revert restores every site byte for byte"
    );
    run_user_ops(khz);

    refusals(&p);
}

/// A site changed behind the engine's back makes the whole set fail with nothing written.
fn refusals(p: &Patcher) {
    let victim = p.sites().nth(p.sites().count() / 2).unwrap();
    let mut text = MprotectText::default();
    let original = peek(victim.addr + 5, 1)[0];
    // change the padding / last displacement byte of one site
    // SAFETY: the byte lies inside a call site of this binary; no thread is running it.
    unsafe { text.write(victim.addr + 5, &[original ^ 0xff]) };
    let tampered = snapshot(p);

    let mut t = MprotectText::default();
    match p.apply(&mut t) {
        Err(PatchError::Mismatch { site, .. }) => assert_eq!(site.addr, victim.addr),
        other => panic!("tampered site accepted: {other:?}"),
    }
    assert_eq!(t.written, 0, "nothing written");
    assert_eq!(snapshot(p), tampered, "no site changed");

    // Same on the way back: patch cleanly, tamper, and revert must refuse.
    // SAFETY: as above.
    unsafe { text.write(victim.addr + 5, &[original]) };
    p.apply(&mut text).unwrap();
    let patched = snapshot(p);
    let b = peek(victim.addr, 1)[0];
    // SAFETY: as above.
    unsafe { text.write(victim.addr, &[b ^ 0x01]) };
    let mut t = MprotectText::default();
    assert!(matches!(p.revert(&mut t), Err(PatchError::Mismatch { .. })));
    assert_eq!(t.written, 0);
    // SAFETY: as above.
    unsafe { text.write(victim.addr, &[b]) };
    assert_eq!(snapshot(p), patched);
    p.revert(&mut text).unwrap();
    p.verify(&text, false).unwrap();
}
