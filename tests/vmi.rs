//! The VMI backend against the project's real ROM (built from `backends/vmi-rom/vmi.S` by
//! `build.rs`): the parser accepts it and refuses each corruption with its own error; the
//! bodies decode to what VMI-64.md says and change no register their mask does not list; and
//! the backend, started on a modelled option-ROM area, copies the routines into its arena in
//! this binary's text, runs them through the table and through this binary's own call sites
//! patched for it (inline and direct), and wipes the arena at teardown.

use std::hint::black_box;

use iced_x86::{FlowControl, InstructionInfoFactory, Mnemonic, OpAccess, Register};
use pvops::ops::{cpu, irq, mmu, timer, Clobbers, Op};
use pvops::patch::Action;
use pvops::{Backend, Patcher, Presence, Request, SiteTable, PV_OPS};
use pvops_backends::vmi::{self, call, ProbeError, RelocType, Rom, RomError};
use pvops_backends::Platform;
use pvops_host_tests::{decode, peek, text as asm_text, MprotectText};

const ROM: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/vmi.bin"));

fn fix_checksum(rom: &mut [u8]) {
    let n = rom.len();
    rom[n - 1] = 0;
    let sum = rom.iter().fold(0u8, |s, b| s.wrapping_add(*b));
    rom[n - 1] = sum.wrapping_neg();
}

/// The real ROM with `f` applied and the checksum made valid again.
fn variant(f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut rom = ROM.to_vec();
    f(&mut rom);
    fix_checksum(&mut rom);
    rom
}

/// Offset of the relocation entry for `c` in the real ROM.
fn reloc_offset(c: u16) -> usize {
    let table = u16::from_le_bytes([ROM[0x80], ROM[0x81]]) as usize;
    let count = u16::from_le_bytes([ROM[0x82], ROM[0x83]]) as usize;
    (0..count)
        .map(|i| table + i * 16)
        .find(|&e| u16::from_le_bytes([ROM[e], ROM[e + 1]]) == c)
        .expect("the ROM has the call")
}

#[test]
fn the_rom_is_a_valid_option_rom_and_vmi_rom() {
    assert_eq!(&ROM[..2], &[0x55, 0xaa]);
    assert_eq!(ROM.len() % 512, 0, "size is a multiple of 512");
    assert_eq!(ROM[2] as usize * 512, ROM.len(), "length byte");
    assert_eq!(ROM[3], 0xcb, "16-bit init vector: lret");
    assert_eq!(
        ROM.iter().fold(0u8, |s, b| s.wrapping_add(*b)),
        0,
        "checksum"
    );
    let rom = Rom::parse(ROM).expect("the shipped ROM is valid");
    assert_eq!(rom.api(), (3, 1));
    assert_eq!(rom.bytes().len(), ROM.len());
    let pcir = u16::from_le_bytes([ROM[0x18], ROM[0x19]]) as usize;
    assert_eq!(&ROM[pcir..pcir + 4], b"PCIR");
    assert_eq!(&ROM[pcir + 4..pcir + 8], &[0xad, 0x15, 0x01, 0x08]);
    // the calls the backend routes, and their types
    for (c, kind) in [
        (call::CPUID, RelocType::Call),
        (call::GET_INTERRUPT_MASK, RelocType::Call),
        (call::FLUSH_TLB, RelocType::Call),
        (call::GET_CYCLE_COUNTER, RelocType::Call),
        (call::ALLOCATE_PAGE, RelocType::Nop),
        (call::SET_LAZY_MODE, RelocType::Nop),
        (call::GET_CYCLE_FREQUENCY, RelocType::None),
        (call::GET_WALLCLOCK_TIME, RelocType::Call),
    ] {
        assert_eq!(rom.reloc(c).map(|r| r.kind), Some(kind), "call {c}");
    }
    assert_eq!(
        decode(rom.init(), 0)
            .iter()
            .map(asm_text)
            .collect::<Vec<_>>(),
        ["xor eax, eax"]
    );
}

#[test]
fn bodies_decode_as_documented_and_keep_their_masks() {
    let rom = Rom::parse(ROM).unwrap();
    let expected: &[(u16, &[&str])] = &[
        (call::GET_CR0, &["mov rax, cr0"]),
        (call::SET_CR3, &["mov cr3, rdi"]),
        (call::GET_TR, &["str rax"]),
        (call::GET_INTERRUPT_MASK, &["pushfq", "pop rax"]),
        (call::SET_INTERRUPT_MASK, &["push rdi", "popfq"]),
        (call::DISABLE_INTERRUPTS, &["cli"]),
        (call::ENABLE_INTERRUPTS, &["sti"]),
        (call::HALT, &["sti", "hlt"]),
        (call::SET_PXE, &["mov [rdi], rsi"]),
        (call::INVAL_PAGE, &["invlpg [rdi]"]),
        (call::IO_DELAY, &["out 80h, al"]),
        (call::SET_IDT, &["lidt [rdi]"]),
    ];
    for (c, want) in expected {
        let r = rom.reloc(*c).unwrap();
        let got: Vec<String> = decode(rom.body(&r), 0).iter().map(asm_text).collect();
        assert_eq!(&got, want, "call {c}");
    }
    let mut factory = InstructionInfoFactory::new();
    let mut checked = 0;
    for r in rom.relocs().filter(|r| r.kind == RelocType::Call) {
        let body = rom.body(&r);
        let insns = decode(body, 0x1000);
        assert_eq!(
            insns.iter().map(|i| i.len()).sum::<usize>(),
            body.len(),
            "call {} decodes exactly",
            r.call
        );
        let mut written = Clobbers::empty();
        let mut stack = 0i32;
        for i in &insns {
            assert!(!i.is_invalid(), "call {}: invalid instruction", r.call);
            match i.flow_control() {
                FlowControl::Next | FlowControl::Interrupt => {}
                FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch => {
                    let t = i.near_branch64();
                    assert!(
                        (0x1000..=0x1000 + body.len() as u64).contains(&t),
                        "call {}: branch out of the body",
                        r.call
                    );
                }
                other => panic!("call {}: {other:?} in a body ({})", r.call, asm_text(i)),
            }
            assert!(
                !i.is_ip_rel_memory_operand(),
                "call {}: RIP-relative",
                r.call
            );
            match i.mnemonic() {
                Mnemonic::Push | Mnemonic::Pushfq => stack += 1,
                Mnemonic::Pop | Mnemonic::Popfq => stack -= 1,
                _ => {}
            }
            let (w, other) = pvops_host_tests::conventions::writes(&mut factory, i);
            written |= w;
            // RBX is saved and restored (checked below); no mask can declare the others
            if let Some(r) = other.iter().find(|r| **r != Register::RBX) {
                panic!("a ROM body writes {r:?}, which no mask can declare");
            }
        }
        assert_eq!(stack, 0, "call {}: balanced stack", r.call);
        // RBX (callee-saved) may only change between a save to a register and its restore
        let texts: Vec<String> = insns.iter().map(asm_text).collect();
        let writes_rbx = insns.iter().any(|i| {
            factory.info(i).used_registers().iter().any(|u| {
                u.register().full_register() == Register::RBX
                    && !matches!(u.access(), OpAccess::Read)
            })
        });
        if writes_rbx {
            let save = texts
                .iter()
                .position(|t| t.ends_with(", rbx") && t.starts_with("mov r"));
            let reg = save.map(|i| texts[i][4..texts[i].find(',').unwrap()].to_string());
            assert!(
                save.is_some() && texts.last() == Some(&format!("mov rbx, {}", reg.unwrap())),
                "call {}: RBX not saved and restored: {texts:?}",
                r.call
            );
        }
        assert!(
            r.clobbers.contains(written),
            "call {}: writes {written:?}, declares {:?}",
            r.call,
            r.clobbers
        );
        checked += 1;
    }
    assert!(checked >= 25, "{checked} bodies checked");
}

#[test]
fn each_bad_rom_is_refused_with_its_reason() {
    let cpuid = reloc_offset(call::CPUID);
    let cases: Vec<(&str, Vec<u8>, RomError)> = vec![
        ("no 55 AA", variant(|r| r[0] = 0), RomError::NotOptionRom),
        (
            "wrong signature",
            variant(|r| r[8] = b'X'),
            RomError::BadSignature,
        ),
        (
            "bad checksum",
            {
                let mut r = ROM.to_vec();
                r[0x8b] ^= 1;
                r
            },
            RomError::BadChecksum { sum: 1 },
        ),
        (
            "API 4.1",
            variant(|r| r[0x0d] = 4),
            RomError::UnsupportedApi { major: 4, minor: 1 },
        ),
        (
            "API 3.0 (the 32-bit ROM)",
            variant(|r| r[0x0c] = 0),
            RomError::UnsupportedApi { major: 3, minor: 0 },
        ),
        (
            "header cut off",
            ROM[..0x40].to_vec(),
            RomError::TruncatedHeader { len: 0x40 },
        ),
        (
            "length byte 0",
            variant(|r| r[2] = 0),
            RomError::TruncatedHeader { len: 0 },
        ),
        (
            "image shorter than declared",
            ROM[..512].to_vec(),
            RomError::Truncated {
                declared: ROM.len(),
                available: 512,
            },
        ),
        (
            "relocation beyond the ROM",
            variant(|r| r[cpuid + 4..cpuid + 8].copy_from_slice(&0x1_0000u32.to_le_bytes())),
            RomError::RelocOutside { call: call::CPUID },
        ),
        (
            "relocation running past the end",
            variant(|r| r[cpuid + 8..cpuid + 10].copy_from_slice(&0x0400u16.to_le_bytes())),
            RomError::RelocOutside { call: call::CPUID },
        ),
        (
            "relocation into the header",
            variant(|r| r[cpuid + 4..cpuid + 8].copy_from_slice(&0x10u32.to_le_bytes())),
            RomError::RelocOutside { call: call::CPUID },
        ),
        (
            "relocation table beyond the ROM",
            variant(|r| r[0x82] = 0xff),
            RomError::RelocTableOutside,
        ),
        (
            "unknown relocation type",
            variant(|r| r[cpuid + 2] = 9),
            RomError::BadRelocType {
                call: call::CPUID,
                kind: 9,
            },
        ),
        ("license", variant(|r| r[0x92] = b'X'), RomError::License),
        (
            "PCI ids",
            variant(|r| {
                let p = u16::from_le_bytes([r[0x18], r[0x19]]) as usize;
                r[p + 6] = 0x02;
            }),
            RomError::PciIds {
                vendor: 0x15ad,
                device: 0x0802,
            },
        ),
    ];
    for (what, image, want) in &cases {
        assert_eq!(Rom::parse(image).err(), Some(*want), "{what}");
        // In an option-ROM area after another ROM: the same refusal, with the address.
        // (a cut-off image is only cut off where nothing follows it)
        if image.len() == ROM.len() && image[..2] == [0x55, 0xaa] && &image[8..12] == b"cVmi" {
            let area = area_with(image);
            assert_eq!(
                vmi::rom::scan(&area, 0xc0000).err(),
                Some(ProbeError::Refused {
                    pa: 0xc9800,
                    why: *want
                }),
                "{what} in the ROM area"
            );
        }
    }
    // a wrong "cVmi" is another vendor's option ROM: skipped, not found
    assert_eq!(
        vmi::rom::scan(&area_with(&cases[1].1), 0xc0000).err(),
        Some(ProbeError::NotFound)
    );
    assert_eq!(
        vmi::rom::scan(&[0u8; 0x20000], 0xc0000).err(),
        Some(ProbeError::NotFound)
    );
}

/// The option-ROM area: a VGA-BIOS-like ROM (no "cVmi") at 0xC0000, `rom` at 0xC9800.
fn area_with(rom: &[u8]) -> Vec<u8> {
    let mut area = vec![0u8; 0x20000];
    area[0] = 0x55;
    area[1] = 0xaa;
    area[2] = 0x4c; // 38 KiB, as SeaBIOS's VGA BIOS
    area[8..12].copy_from_slice(b"VGA ");
    area[0x9800..0x9800 + rom.len()].copy_from_slice(rom);
    area
}

/// A machine with `rom` in its option-ROM area and the TSC rate known.
struct Machine {
    area: &'static [u8],
    khz: u64,
    t0: std::time::Instant,
}

impl Machine {
    fn new(rom: &[u8], khz: u64) -> Machine {
        Machine {
            area: Box::leak(area_with(rom).into_boxed_slice()),
            khz,
            t0: std::time::Instant::now(),
        }
    }
}

impl Platform for Machine {
    fn tsc_khz(&self) -> u64 {
        self.khz
    }

    fn clock_ns(&self) -> Option<u64> {
        Some(self.t0.elapsed().as_nanos() as u64)
    }

    fn phys_to_virt(&self, pa: u64) -> Option<usize> {
        let (start, end) = vmi::rom::ROM_AREA;
        (start..end)
            .contains(&pa)
            .then(|| self.area.as_ptr() as usize + (pa - start) as usize)
    }

    fn write_code(&self, addr: usize, bytes: &[u8]) -> bool {
        // SAFETY: the backend writes only its arena in this binary's text, which no thread
        // executes while it is written (the test is single-threaded around it).
        unsafe { pvops::Text::write(&mut MprotectText::default(), addr, bytes) };
        true
    }
}

/// Sites for the ops the test runs (ring-3 safe) and for the ones it only decodes.
#[inline(never)]
fn sites(run_privileged: bool) {
    let _ = black_box(cpu::cpuid(0, 0));
    let _ = black_box(irq::save_fl());
    let _ = black_box(timer::sched_clock());
    let _ = black_box(timer::steal_clock(0));
    let _ = black_box(timer::tsc_khz());
    if black_box(run_privileged) {
        let mut pte = 0u64;
        // SAFETY: never executed; the sites exist to be patched and decoded.
        unsafe {
            irq::restore_fl(irq::save_fl());
            irq::irq_disable();
            irq::irq_enable();
            cpu::write_cr0(cpu::read_cr0());
            mmu::write_cr3(mmu::read_cr3());
            mmu::flush_tlb_user();
            mmu::flush_tlb_one_user(0);
            mmu::set_pte(&mut pte, 1);
            mmu::alloc_pt(1, 1);
            let _ = cpu::read_msr(0x10);
            let _ = cpu::read_msr_safe(0x10);
            irq::halt();
            let _ = timer::wall_clock();
        }
    }
}

fn run_user_ops(khz: u64) {
    assert_eq!(
        cpu::cpuid(0, 0),
        pvops::arch::raw_cpuid(0, 0),
        "CPUID via the ROM"
    );
    assert_eq!(
        cpu::cpuid(7, 0),
        pvops::arch::raw_cpuid(7, 0),
        "CPUID subleaf"
    );
    let flags = irq::save_fl();
    assert_ne!(
        flags & irq::X86_EFLAGS_IF,
        0,
        "GetInterruptMask: IF set in user space"
    );
    // SAFETY: restores the flags just read (POPF in ring 3 cannot change IF).
    unsafe { irq::restore_fl(flags) };
    assert_eq!(timer::tsc_khz(), khz);
    assert_eq!(timer::steal_clock(0), 0, "nothing stolen on hardware");
    pvops_host_tests::clock::check_over("vmi sched_clock", 20, timer::sched_clock);
    // SAFETY: the ROM's SetLazyMode and AllocatePage are NOPs on hardware.
    unsafe {
        mmu::lazy_mode_enter();
        mmu::alloc_pt(1, 1);
        mmu::lazy_mode_leave();
    }
}

fn arena_bytes() -> Vec<u8> {
    peek(
        vmi::arena::arena as *const () as usize,
        vmi::arena::ARENA_LEN,
    )
}

/// What the selection hears of the VMI backend on `m`, and why starting it there fails.
fn refused_start(m: &Machine) -> (Presence, pvops_backends::StartError) {
    let detection = pvops::detect(&pvops::arch::NativeCpuid);
    let c = pvops_backends::probe(&detection, m).candidates();
    assert_eq!(c[3].id, pvops_host_tests::ids::VMI);
    let e = pvops_host_tests::start(pvops_host_tests::ids::VMI, &detection, m)
        .err()
        .expect("refused");
    (c[3].presence, e)
}

/// Everything that writes the arena, the table or this binary's sites, in one thread.
#[test]
fn backend_runs_the_rom_copied_into_its_arena() {
    let pristine = arena_bytes();
    assert_eq!(&pristine[..4], &[0xf3, 0x0f, 0x1e, 0xfa]);
    let n = pristine.len();
    assert!(
        pristine[4..n - 2].iter().all(|b| *b == 0xcc),
        "arena is int3"
    );
    assert_eq!(&pristine[n - 2..], &[0x0f, 0x0b], "then ud2");

    // Bad ROMs: absent to the selection, refused by init, arena untouched.
    for bad in [variant(|r| r[0x0d] = 2), {
        let mut r = ROM.to_vec();
        r[0x100] ^= 0x40;
        r
    }] {
        let (presence, e) = refused_start(&Machine::new(&bad, 1_000_000));
        assert_eq!(presence, Presence::Absent);
        assert_eq!(
            e,
            pvops_backends::StartError::Absent(pvops_host_tests::ids::VMI)
        );
        let probed = pvops_backends::probe(
            &pvops::detect(&pvops::arch::NativeCpuid),
            &Machine::new(&bad, 1_000_000),
        );
        let why: Vec<_> = probed
            .absences()
            .filter(|a| a.refused)
            .map(|a| (a.id, a.why.to_string()))
            .collect();
        assert_eq!(why.len(), 1, "one refusal: {:?}", why);
        assert_eq!(why[0].0, pvops_host_tests::ids::VMI);
        assert!(
            why[0].1.starts_with("ROM at 0xc9800 refused: "),
            "{}",
            why[0].1
        );
        assert_eq!(arena_bytes(), pristine);
    }
    // Valid ROMs the backend still cannot use: a routine that changes more than its op's
    // convention allows (GetInterruptMask declaring RCX, for the callee-save save_fl), and a
    // VMI_Init that does not return 0. Present, but start refuses; the arena stays as it was.
    let get_if = reloc_offset(call::GET_INTERRUPT_MASK);
    let init = u16::from_le_bytes([ROM[0x86], ROM[0x87]]) as usize;
    for (bad, want) in [
        (
            variant(|r| r[get_if + 10] |= 0x02),
            vmi::VmiError::Clobbers(call::GET_INTERRUPT_MASK),
        ),
        (
            variant(|r| r[init..init + 2].copy_from_slice(&[0xb0, 0x01])), // mov al, 1
            vmi::VmiError::InitFailed(0),
        ),
    ] {
        let (presence, e) = refused_start(&Machine::new(&bad, 1_000_000));
        assert_eq!(presence, Presence::Present { base: None });
        match (e, want) {
            (
                pvops_backends::StartError::Vmi(vmi::VmiError::InitFailed(rc)),
                vmi::VmiError::InitFailed(_),
            ) => {
                assert_eq!(rc & 0xff, 1, "VMI_Init's answer")
            }
            (pvops_backends::StartError::Vmi(got), want) => assert_eq!(got, want),
            other => panic!("{other:?}"),
        }
        assert_eq!(arena_bytes(), pristine, "arena untouched or wiped");
        assert_eq!(vmi::entry(call::CPUID), 0, "nothing kept");
    }

    // A Xen PV domain: the area is not even read.
    struct Pv(Machine);
    impl Platform for Pv {
        fn tsc_khz(&self) -> u64 {
            self.0.khz
        }
        fn xen_pv(&self) -> bool {
            true
        }
        fn phys_to_virt(&self, pa: u64) -> Option<usize> {
            self.0.phys_to_virt(pa)
        }
    }
    assert_eq!(
        vmi::rom::probe(&Pv(Machine::new(ROM, 1_000_000))).err(),
        Some(ProbeError::NoMap)
    );

    // No ROM at all (the machine of the tcg rig): absent.
    let none = Machine::new(&[], 1_000_000);
    assert_eq!(
        pvops_backends::probe(&pvops::detect(&pvops::arch::NativeCpuid), &none).candidates()[3]
            .presence,
        Presence::Absent
    );

    // The real ROM: auto selects vmi (a platform hook outranks every CPUID interface).
    let khz = pvops_host_tests::clock::tsc_khz();
    let m = Machine::new(ROM, khz);
    let detection = pvops::detect(&pvops::arch::NativeCpuid);
    let cands = pvops_backends::probe(&detection, &m).candidates();
    let sel = pvops::select(Request::Auto, &detection, &cands).unwrap();
    assert_eq!(sel.backend, pvops_host_tests::ids::VMI);
    let backend =
        pvops_host_tests::start(pvops_host_tests::ids::VMI, &detection, &m).expect("vmi starts");
    assert_eq!(backend.id(), pvops_host_tests::ids::VMI);
    assert_eq!(vmi::rom_in_use(), Some((0xc9800, (3, 1))));
    let d = backend.describe();
    assert!(
        d.starts_with(&format!("ROM at 0xc9800 API 3.1 ({} bytes)", ROM.len())),
        "{d}"
    );

    // The arena holds endbr64 + the ROM's body + a return, per routine.
    let rom = Rom::parse(ROM).unwrap();
    for c in [
        call::CPUID,
        call::GET_INTERRUPT_MASK,
        call::GET_CYCLE_COUNTER,
        call::RDTSC,
    ] {
        let e = vmi::entry(c);
        let body = rom.body(&rom.reloc(c).unwrap());
        let got = peek(e, 4 + body.len() + 1);
        assert_eq!(&got[..4], &[0xf3, 0x0f, 0x1e, 0xfa], "call {c}: endbr64");
        assert_eq!(&got[4..4 + body.len()], body, "call {c}: the ROM's body");
        assert_eq!(got[4 + body.len()], 0xc3, "call {c}: ret");
    }
    assert_eq!(
        vmi::entry(call::GET_CYCLE_FREQUENCY),
        0,
        "NONE is not copied"
    );
    let nop = vmi::entry(call::SET_LAZY_MODE);
    assert_eq!(
        peek(nop, 5),
        [0xf3, 0x0f, 0x1e, 0xfa, 0xc3],
        "NOP: an empty function"
    );
    // RDTSC, executed from the arena
    // SAFETY: the arena copy of RDTSC: C convention, no argument, result in RAX.
    let rdtsc: extern "C" fn() -> u64 = unsafe { std::mem::transmute(vmi::entry(call::RDTSC)) };
    let (a, b) = (rdtsc(), rdtsc());
    assert!(b > a && a > 0, "RDTSC from the arena: {a} then {b}");

    // The table: ROM copies where the ROM has the call, native where it says NONE.
    let ops = backend.ops();
    assert_eq!(
        pvops_host_tests::conventions::check(&ops),
        Vec::<String>::new()
    );
    assert_eq!(ops.target(Op::Cpuid), vmi::entry(call::CPUID));
    assert_eq!(ops.target(Op::SaveFl), vmi::entry(call::GET_INTERRUPT_MASK));
    assert_eq!(ops.target(Op::SetPud), vmi::entry(call::SET_PXE));
    assert_eq!(ops.target(Op::AllocPt), vmi::entry(call::ALLOCATE_PAGE));
    let native = pvops_backends::native::NATIVE.ops();
    for op in [Op::ReadMsrSafe, Op::Halt, Op::Hypercall, Op::SetNextEvent] {
        assert_eq!(
            ops.target(op),
            native.target(op),
            "{} stays native",
            op.name()
        );
        assert!(!vmi::from_rom(op));
    }
    // SAFETY: single test thread; nothing runs ops while the table is written.
    unsafe { PV_OPS.install(&ops.table()) };
    sites(false);
    run_user_ops(khz); // indirect calls into the arena

    // Patch this binary's sites for VMI.
    let p = Patcher::new(SiteTable::of_executable(), PV_OPS.addr(), &ops).unwrap();
    let mut text = MprotectText::default();
    let report = p.apply(&mut text).expect("patching succeeds");
    assert_eq!(report.indirect, 0);
    assert!(report.inline > 0 && report.direct > 0, "{report:?}");
    let mut seen = Vec::new();
    for s in p.sites() {
        let insns = decode(&peek(s.addr, s.len as usize), s.addr as u64);
        let (action, _) = p.patched(&s);
        seen.push((s.op, action));
        match (s.op, action) {
            (Op::SaveFl, Action::Inline) => {
                let t: Vec<_> = insns[..2].iter().map(asm_text).collect();
                assert_eq!(
                    t,
                    ["pushfq", "pop rax"],
                    "the ROM's GetInterruptMask, inline"
                );
            }
            (Op::AllocPt, Action::Inline) => {
                assert!(
                    insns.iter().all(|i| i.mnemonic() == Mnemonic::Nop),
                    "NOP call"
                );
            }
            (_, Action::DirectCall) => {
                assert_eq!(insns[0].near_branch64() as usize, ops.target(s.op));
            }
            (Op::ReadMsrSafe | Op::Halt | Op::TscKhz, _) => {}
            (op, Action::Inline) if vmi::from_rom(op) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(seen.contains(&(Op::SaveFl, Action::Inline)));
    assert!(seen.contains(&(Op::Cpuid, Action::DirectCall)));
    assert!(seen.contains(&(Op::FlushTlbUser, Action::DirectCall)));
    assert!(
        seen.contains(&(Op::LazyModeEnter, Action::Inline)),
        "SetLazyMode is NOP: the site becomes NOPs"
    );
    run_user_ops(khz); // inline ROM bodies and direct calls into the arena
    p.revert(&mut text).expect("revert succeeds");
    p.verify(&text, false).unwrap();

    // Teardown: the arena is int3 again.
    // SAFETY: as above.
    unsafe { PV_OPS.clear() };
    assert_eq!(
        pvops_backends::stop(pvops_host_tests::ids::VMI, &m),
        "ROM routines removed from the arena"
    );
    assert_eq!(arena_bytes(), pristine, "arena wiped");
    assert_eq!(vmi::entry(call::CPUID), 0);

    // Fault injection: each fallible platform call of the start fails in turn (the option-ROM
    // area's translation, each write into the arena): refused with a message, or running;
    // once refused or stopped, the arena is int3 again and no ROM routine is known.
    let detection = pvops::detect(&pvops::arch::NativeCpuid);
    let mut seen = Vec::new();
    for n in 0.. {
        let f = pvops_host_tests::Faulty::new(&m, n);
        let started = pvops_host_tests::start(pvops_host_tests::ids::VMI, &detection, &f);
        f.disarm();
        let Some(what) = f.failed() else {
            started.expect("vmi starts when nothing fails");
            pvops_backends::stop(pvops_host_tests::ids::VMI, &m);
            break;
        };
        match started {
            Err(e) => seen.push(format!("{n} ({what}): refused: {e}")),
            Ok(_) => {
                seen.push(format!("{n} ({what}): survived"));
                pvops_backends::stop(pvops_host_tests::ids::VMI, &m);
            }
        }
        assert_eq!(
            arena_bytes(),
            pristine,
            "{n} ({what}): the arena is not wiped"
        );
        assert_eq!(
            vmi::entry(call::CPUID),
            0,
            "{n} ({what}): a routine is still known"
        );
    }
    assert!(seen.iter().any(|s| s.contains("write_code")), "{seen:?}");
    println!("{seen:#?}");
}
