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
    let _ = black_box(value_ops(black_box(0x1234_5067)));
    let _ = black_box(lock_ops());
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
            let _ = irq::send_ipi(&0, 1, 0xfd);
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
        op if op.is_page_table_value() => &["mov rax, rdi"],
        Op::QueuedSpinUnlock => &["mov byte ptr [rdi], 0"],
        Op::LockWait | Op::LockKick => &[],
        Op::VcpuIsPreempted | Op::FlushTlbDefer | Op::SendIpi => &["xor eax, eax"],
        _ => return None,
    })
}

/// Every byte of every site, read from memory.
fn snapshot(p: &Patcher) -> Vec<(usize, Vec<u8>)> {
    p.sites()
        .map(|s| (s.addr, peek(s.addr, s.len as usize)))
        .collect()
}

/// Every page-table value op (legal anywhere: pure), each level's pair applied to `v`.
#[inline(never)]
fn value_ops(v: u64) -> [u64; 5] {
    [
        mmu::make_pte(mmu::pte_val(v)),
        mmu::make_pmd(mmu::pmd_val(v)),
        mmu::make_pud(mmu::pud_val(v)),
        mmu::make_p4d(mmu::p4d_val(v)),
        mmu::make_pgd(mmu::pgd_val(v)),
    ]
}

/// The lock ops on a lock of our own (native's are legal in ring 3: a store, nothing, nothing,
/// false): the locked byte after the unlock, and whether CPU 0 was preempted.
#[inline(never)]
fn lock_ops() -> (u8, bool) {
    let mut locked = 1u8;
    // SAFETY: our own "lock", held; native's wait and kick do nothing.
    unsafe {
        pvops::ops::lock::queued_spin_unlock(&mut locked);
        pvops::ops::lock::wait(&mut locked, 1);
        pvops::ops::lock::kick(0);
    }
    (black_box(locked), pvops::ops::lock::vcpu_is_preempted(0))
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
    let entry = 0x8000_0001_2345_6067;
    assert_eq!(
        value_ops(entry),
        [entry; 5],
        "an entry is its value on hardware"
    );
    assert_eq!(
        lock_ops(),
        (0, false),
        "unlocked, and nothing preempted on hardware"
    );
    // the TSC was calibrated against this clock: the rigs' rule (2% + 200 µs)
    pvops_host_tests::clock::check_over("native sched_clock", 20, timer::sched_clock);

    // SAFETY: on the native backend these are no-ops (NOPs once patched, empty functions before).
    unsafe {
        mmu::lazy_mode_enter();
        mmu::alloc_pt(1, 1);
        mmu::release_pt(1, 1);
        mmu::lazy_mode_leave();
    }
    // SAFETY: a query on native (no flush is taken over: `xor eax, eax`).
    let taken = unsafe { mmu::flush_tlb_defer(1) };
    assert!(!taken, "hardware takes no flush over");
}

#[test]
fn patch_this_process() {
    let khz = pvops_host_tests::clock::tsc_khz();
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
    switching(&p, khz);

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

/// A live switch between two patch sets of the same sites (here native's, and native's with
/// every inline withheld, so every site changes): straight from one set's bytes to the other's
/// and back, refused with nothing written where a site holds neither or the sets are of other
/// sites. `p` is applied on entry and on return.
fn switching(p: &Patcher, khz: u64) {
    let calls = NATIVE.ops().calls_only();
    let q = Patcher::new(SiteTable::of_executable(), PV_OPS.addr(), &calls).unwrap();
    let patched = snapshot(p);
    let mut text = MprotectText::default();
    let report = q.switch_from(p, &mut text).expect("switch succeeds");
    assert_eq!((report.inline, report.indirect), (0, 0), "{report:?}");
    q.verify(&text, true)
        .expect("sites hold the other set's bytes");
    assert!(p.verify(&text, true).is_err(), "no longer the first set's");
    run_user_ops(khz);

    // Switching again from `p` is refused: the sites hold `q`'s bytes.
    let mut t = MprotectText::default();
    assert!(matches!(
        q.switch_from(p, &mut t),
        Err(PatchError::Mismatch { .. })
    ));
    assert_eq!(t.written, 0);

    // A set for another table is refused before any site is read.
    let other = Patcher::new(SiteTable::of_executable(), PV_OPS.addr() + 8, &calls).unwrap();
    assert_eq!(
        other.switch_from(&q, &mut t).err(),
        Some(PatchError::OtherSites)
    );
    assert_eq!(t.written, 0);

    // And back, byte for byte.
    p.switch_from(&q, &mut text).expect("switch back succeeds");
    assert_eq!(
        snapshot(p),
        patched,
        "switching back restores the first set's bytes"
    );
    run_user_ops(khz);
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

/// The engine's choice on this binary's real site records, for a backend whose ops are given:
/// plan and bytes only (nothing is read from or written to the sites, so this may run beside
/// `patch_this_process`).
fn first_site(op: Op) -> pvops::site::Site {
    // The records are in the binary whether or not `sites_for_every_op` ever runs (it must
    // not run here: `patch_this_process` may be rewriting its sites).
    let sites = SiteTable::of_executable();
    let p = Patcher::new(sites, PV_OPS.addr(), &NATIVE_OPS).expect("records are valid");
    let site = p.sites().find(|s| s.op == op);
    site.expect("a site of the op exists")
}

static NATIVE_OPS: pvops::ops::BackendOps = pvops_backends::native::OPS;

#[test]
fn an_inline_that_changes_a_register_the_site_forbids_is_not_inlined() {
    use pvops::ops::{Clobbers, Convention, Inline};
    let site = first_site(Op::SaveFl);
    assert_eq!(
        site.clobbers,
        Convention::CalleeSave.clobbers(),
        "a callee-save op's sites tolerate RAX and the flags only"
    );
    // `xor ecx, ecx` declared as changing RCX (and the flags): honest, but not for this site.
    let rcx = Inline {
        bytes: &[0x31, 0xc9],
        clobbers: Clobbers::RCX.union(Clobbers::FLAGS),
    };
    let mut ops = pvops_backends::native::OPS;
    ops.irq.save_fl.inline = Some(rcx);
    let p = Patcher::new(SiteTable::of_executable(), PV_OPS.addr(), &ops).unwrap();
    let (action, bytes) = p.patched(&site);
    assert_eq!(
        action,
        Action::DirectCall,
        "an inline changing RCX at a callee-save site must not be inlined: [{bytes:?}]"
    );
    assert_eq!(bytes.as_slice()[0], 0xe8, "a direct call instead");
    let plan = p.plan();
    assert_eq!(
        plan.inline,
        p.sites()
            .filter(|s| s.op != Op::SaveFl && ops.inline(s.op).is_some())
            .count(),
        "no save_fl site is inlined: {plan:?}"
    );

    // The same bytes declared within the site's tolerance are inlined (the check, not the
    // bytes, decided above).
    ops.irq.save_fl.inline = Some(Inline {
        bytes: &[0x31, 0xc0], // xor eax, eax
        clobbers: Clobbers::RAX.union(Clobbers::FLAGS),
    });
    let p = Patcher::new(SiteTable::of_executable(), PV_OPS.addr(), &ops).unwrap();
    let (action, bytes) = p.patched(&site);
    assert_eq!(action, Action::Inline);
    assert_eq!(&bytes.as_slice()[..2], &[0x31, 0xc0]);
}

#[test]
fn a_direct_call_that_does_not_reach_stays_indirect() {
    let site = first_site(Op::Cpuid);
    let next = site.addr + 5; // the end of `e8 <rel32>`
    let cases: [(i64, Action); 6] = [
        (0x1000, Action::DirectCall),
        (i64::from(i32::MAX), Action::DirectCall),
        (i64::from(i32::MIN), Action::DirectCall),
        (i64::from(i32::MAX) + 1, Action::Indirect),
        (i64::from(i32::MIN) - 1, Action::Indirect),
        (3 << 30, Action::Indirect), // 3 GiB away
    ];
    for (distance, want) in cases {
        let target = next.wrapping_add_signed(distance as isize);
        let mut ops = pvops_backends::native::OPS;
        // SAFETY: the table is never installed and nothing is called: the engine only computes
        // the bytes a site would get (plan/patched), so `target` need not be code.
        unsafe { ops.set_raw(Op::Cpuid, target, None) };
        let p = Patcher::new(SiteTable::of_executable(), PV_OPS.addr(), &ops).unwrap();
        let (action, bytes) = p.patched(&site);
        assert_eq!(
            action, want,
            "target {distance:#x} past the call: [{bytes:?}]"
        );
        match want {
            Action::DirectCall => {
                let insns = decode(bytes.as_slice(), site.addr as u64);
                assert_eq!(insns[0].near_branch64() as usize, target, "{distance:#x}");
            }
            _ => assert_eq!(
                bytes,
                p.original(&site),
                "indirect: the site is left as it was"
            ),
        }
        let plan = p.plan();
        let cpuid_sites = p.sites().filter(|s| s.op == Op::Cpuid).count();
        if want == Action::Indirect {
            assert!(
                plan.indirect >= 1 && plan.indirect <= cpuid_sites,
                "{plan:?}"
            );
        }
    }
}
