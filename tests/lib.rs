//! Shared pieces of the host tests: CPUID tables modelled on real hypervisors (from
//! `shared/docs/abi-*.md`), a [`pvops::Text`] that patches this process's own code with
//! `mprotect`, and an x86 decoder for checking what a site holds.

use std::collections::HashMap;

use iced_x86::{Decoder, DecoderOptions, Formatter, Instruction, IntelFormatter};
use pvops::ops::CpuidResult;

/// A CPU's CPUID answers as a table; absent leaves read as zero.
#[derive(Clone, Debug, Default)]
pub struct CpuidModel {
    leaves: HashMap<u32, CpuidResult>,
    /// Answer unused hypervisor bases with leftover basic-leaf values, as QEMU TCG `-cpu max`
    /// was seen to do.
    pub leftovers: bool,
}

/// EBX, ECX, EDX of a 12-byte signature.
pub fn sig_regs(sig: &[u8; 12]) -> (u32, u32, u32) {
    let w = |i: usize| u32::from_le_bytes(sig[i..i + 4].try_into().unwrap());
    (w(0), w(4), w(8))
}

impl CpuidModel {
    /// A CPU of `vendor` with the hypervisor bit as given.
    pub fn cpu(vendor: &[u8; 12], hypervisor_bit: bool) -> CpuidModel {
        let mut m = CpuidModel::default();
        // leaf 0 spells the vendor in EBX, EDX, ECX
        let (b, d, c) = sig_regs(vendor);
        m.set(
            0,
            CpuidResult {
                eax: 0xd,
                ebx: b,
                ecx: c,
                edx: d,
            },
        );
        m.set(
            1,
            CpuidResult {
                eax: 0x00a2_0f12,
                ebx: 0,
                ecx: if hypervisor_bit { 1 << 31 } else { 0 },
                edx: 0,
            },
        );
        m
    }

    /// Set one leaf.
    pub fn set(&mut self, leaf: u32, r: CpuidResult) -> &mut Self {
        self.leaves.insert(leaf, r);
        self
    }

    /// Set one leaf from its four registers (EAX, EBX, ECX, EDX).
    pub fn leaf(&mut self, leaf: u32, [eax, ebx, ecx, edx]: [u32; 4]) -> &mut Self {
        self.set(leaf, CpuidResult { eax, ebx, ecx, edx })
    }

    /// An interface at `base` with `leaves` leaves after it and this signature.
    pub fn interface(&mut self, base: u32, max_leaf: u32, sig: &[u8; 12]) -> &mut Self {
        let (ebx, ecx, edx) = sig_regs(sig);
        self.set(
            base,
            CpuidResult {
                eax: max_leaf,
                ebx,
                ecx,
                edx,
            },
        )
    }

    /// Answer CPUID.
    pub fn get(&self, leaf: u32, _subleaf: u32) -> CpuidResult {
        if let Some(r) = self.leaves.get(&leaf) {
            return *r;
        }
        if self.leftovers && leaf >= 0x4000_0000 {
            // what the highest basic leaf returned
            return CpuidResult {
                eax: 0x0000_0007,
                ebx: 0x0000_0340,
                ecx: 0x0000_0340,
                edx: 0,
            };
        }
        CpuidResult::default()
    }

    /// A source for [`pvops::detect()`].
    pub fn source(&self) -> impl Fn(u32, u32) -> CpuidResult + '_ {
        move |leaf, sub| self.get(leaf, sub)
    }
}

/// Models of the hypervisors the project meets, with the leaves abi-kvm.md and abi-xen.md give.
pub mod models {
    use super::*;

    /// An AMD CPU (the rigs' TCG `-cpu max` reports AuthenticAMD).
    pub const AMD: &[u8; 12] = b"AuthenticAMD";
    /// An Intel CPU.
    pub const INTEL: &[u8; 12] = b"GenuineIntel";

    /// Bare hardware: no hypervisor bit.
    pub fn bare() -> CpuidModel {
        CpuidModel::cpu(INTEL, false)
    }

    /// KVM under QEMU `-cpu host` on a 6.12-style host.
    pub fn kvm() -> CpuidModel {
        let mut m = CpuidModel::cpu(AMD, true);
        m.interface(0x4000_0000, 0x4000_0001, b"KVMKVMKVM\0\0\0");
        m.leaf(0x4000_0001, [0x0100_7efb, 0, 0, 0]);
        m
    }

    /// Very old KVM: EAX = 0 at the base leaf.
    pub fn old_kvm() -> CpuidModel {
        let mut m = CpuidModel::cpu(INTEL, true);
        m.interface(0x4000_0000, 0, b"KVMKVMKVM\0\0\0");
        m
    }

    /// KVM with Hyper-V enlightenments: Hyper-V at 0x4000_0000, KVM at 0x4000_0100.
    pub fn kvm_with_hyperv() -> CpuidModel {
        let mut m = CpuidModel::cpu(INTEL, true);
        m.interface(0x4000_0000, 0x4000_000b, b"Microsoft Hv");
        m.interface(0x4000_0100, 0x4000_0101, b"KVMKVMKVM\0\0\0");
        m.leaf(0x4000_0101, [0x0100_7efb, 0, 0, 0]);
        m
    }

    /// QEMU's Xen HVM emulation (`xen-version=0x40011`): max leaf base+4.
    pub fn xen_hvm_qemu() -> CpuidModel {
        let mut m = CpuidModel::cpu(AMD, true);
        m.interface(0x4000_0000, 0x4000_0004, b"XenVMMXenVMM");
        m.leaf(0x4000_0001, [0x0004_0011, 0, 0, 0]);
        m.leaf(0x4000_0002, [1, 0x4000_0000, 0, 0]);
        m
    }

    /// Real Xen 4.17 with Viridian: Hyper-V at 0x4000_0000, Xen at 0x4000_0100 (limit 5).
    pub fn xen_with_viridian() -> CpuidModel {
        let mut m = CpuidModel::cpu(INTEL, true);
        m.interface(0x4000_0000, 0x4000_0006, b"Microsoft Hv");
        m.interface(0x4000_0100, 0x4000_0105, b"XenVMMXenVMM");
        m.leaf(0x4000_0101, [0x0004_0011, 0, 0, 0]);
        m.leaf(0x4000_0102, [1, 0x4000_0200, 0, 0]);
        m
    }

    /// QEMU TCG: its own signature, no paravirtual interface; `-cpu max` leftovers above it.
    pub fn tcg() -> CpuidModel {
        let mut m = CpuidModel::cpu(AMD, true);
        m.interface(0x4000_0000, 0x4000_0001, b"TCGTCGTCGTCG");
        m.leftovers = true;
        m
    }

    /// An Intel CPU under a hypervisor with one interface at 0x4000_0000.
    fn single(max_leaf: u32, sig: &[u8; 12]) -> CpuidModel {
        let mut m = CpuidModel::cpu(INTEL, true);
        m.interface(0x4000_0000, max_leaf, sig);
        m
    }

    /// VMware's CPUID interface.
    pub fn vmware() -> CpuidModel {
        single(0x4000_0010, b"VMwareVMware")
    }

    /// bhyve.
    pub fn bhyve() -> CpuidModel {
        single(0x4000_0001, b"bhyve bhyve ")
    }

    /// ACRN.
    pub fn acrn() -> CpuidModel {
        single(0x4000_0001, b"ACRNACRNACRN")
    }

    /// A hypervisor nobody knows.
    pub fn unknown() -> CpuidModel {
        single(0x4000_0003, b"NoSuchHyper\x01")
    }

    /// `kvm=off`: hypervisor bit set, every hypervisor leaf zero.
    pub fn hidden() -> CpuidModel {
        CpuidModel::cpu(AMD, true)
    }
}

/// A platform with nothing to offer (no TSC rate, no boot data, no ROM area): what a probe sees
/// when only CPUID speaks.
pub struct NoPlatform;
impl pvops_backends::Platform for NoPlatform {
    fn tsc_khz(&self) -> u64 {
        0
    }
}

/// Patches this process's text: `mprotect` to RWX around each write, back to RX after.
#[derive(Debug, Default)]
pub struct MprotectText {
    /// Bytes written so far.
    pub written: usize,
}

fn page_range(addr: usize, len: usize) -> (usize, usize) {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    let start = addr & !(page - 1);
    let end = (addr + len).div_ceil(page) * page;
    (start, end - start)
}

impl pvops::ReadText for MprotectText {
    fn read(&self, addr: usize, out: &mut [u8]) {
        // SAFETY: the engine only reads call sites, which lie in this process's mapped text.
        unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, out.as_mut_ptr(), out.len()) };
    }
}

impl pvops::Text for MprotectText {
    unsafe fn write(&mut self, addr: usize, bytes: &[u8]) {
        let (start, len) = page_range(addr, bytes.len());
        // SAFETY: `start..start+len` covers mapped text of this process; it stays executable
        // throughout (other code on those pages may be running on this very thread).
        let rc = unsafe {
            libc::mprotect(
                start as *mut _,
                len,
                libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
            )
        };
        assert_eq!(rc, 0, "mprotect RWX: {}", std::io::Error::last_os_error());
        // SAFETY: the caller (the engine) verified the site; the pages are writable now.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), addr as *mut u8, bytes.len()) };
        // SAFETY: as above; restores the original protection of text pages.
        let rc = unsafe { libc::mprotect(start as *mut _, len, libc::PROT_READ | libc::PROT_EXEC) };
        assert_eq!(rc, 0, "mprotect RX: {}", std::io::Error::last_os_error());
        self.written += bytes.len();
    }
}

/// Read `len` bytes of this process's memory.
pub fn peek(addr: usize, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    pvops::ReadText::read(&MprotectText::default(), addr, &mut v);
    v
}

/// Decode `bytes` (located at `ip`) into instructions.
pub fn decode(bytes: &[u8], ip: u64) -> Vec<Instruction> {
    let mut d = Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE);
    let mut out = Vec::new();
    while d.can_decode() {
        out.push(d.decode());
    }
    out
}

/// Intel-syntax text of an instruction (`mov rax, cr0`).
pub fn text(i: &Instruction) -> String {
    let mut f = IntelFormatter::new();
    f.options_mut().set_space_after_operand_separator(true);
    let mut s = String::new();
    f.format(i, &mut s);
    s
}

/// Backend identities, as the registry names them.
pub mod ids {
    use pvops::BackendId;
    use pvops_backends::{kvm, lguest, vmi, xen, Driver};

    /// native.
    pub const NATIVE: BackendId = BackendId::NATIVE;
    /// kvm.
    pub const KVM: BackendId = <kvm::Kvm as Driver>::ID;
    /// xen.
    pub const XEN: BackendId = <xen::Xen as Driver>::ID;
    /// vmi.
    pub const VMI: BackendId = <vmi::Vmi as Driver>::ID;
    /// lguest.
    pub const LGUEST: BackendId = <lguest::Lguest as Driver>::ID;
}

/// Probe every backend and start `id` from what its probe found, as the module does.
pub fn start(
    id: pvops::BackendId,
    detection: &pvops::Detection,
    platform: &dyn pvops_backends::Platform,
) -> Result<&'static dyn pvops::Backend, pvops_backends::StartError> {
    pvops_backends::probe(detection, platform).start(id, detection, platform)
}

/// Checks a backend's [`pvops::BackendOps`] against the ops' conventions by decoding the code
/// itself: every inline replacement changes only what it declares, and what it declares fits
/// its op's convention; every callee-save slot's function (and every function it branches to
/// directly) changes no register but RAX, except registers it saves first, and calls only
/// through a save of every caller-saved register. A C slot may change anything the C ABI lets
/// it. Returns one line per violation (empty: the table keeps every convention).
pub mod conventions {
    use iced_x86::{
        FlowControl, Instruction, InstructionInfoFactory, Mnemonic, OpAccess, Register, RflagsBits,
    };
    use pvops::ops::{BackendOps, Clobbers, Convention, Op, PvOps};

    use super::{decode, peek, text};

    /// The arithmetic flags (IF is what the interrupt ops are for; flags the SDM leaves
    /// undefined, as after MOV to CR, count as unchanged).
    fn arith() -> u32 {
        RflagsBits::OF
            | RflagsBits::SF
            | RflagsBits::ZF
            | RflagsBits::AF
            | RflagsBits::PF
            | RflagsBits::CF
    }

    /// What one instruction changes: clobber bits, plus the other general registers by name.
    pub fn writes(f: &mut InstructionInfoFactory, i: &Instruction) -> (Clobbers, Vec<Register>) {
        let mut c = Clobbers::empty();
        let mut other = Vec::new();
        for u in f.info(i).used_registers() {
            if !matches!(
                u.access(),
                OpAccess::Write
                    | OpAccess::ReadWrite
                    | OpAccess::CondWrite
                    | OpAccess::ReadCondWrite
            ) {
                continue;
            }
            match u.register().full_register() {
                Register::RAX => c |= Clobbers::RAX,
                Register::RCX => c |= Clobbers::RCX,
                Register::RDX => c |= Clobbers::RDX,
                Register::RSI => c |= Clobbers::RSI,
                Register::RDI => c |= Clobbers::RDI,
                Register::R8 => c |= Clobbers::R8,
                Register::R9 => c |= Clobbers::R9,
                Register::R10 => c |= Clobbers::R10,
                Register::R11 => c |= Clobbers::R11,
                Register::RSP => {} // pushes and pops, balanced by construction of a function
                r if r.is_gpr64() => other.push(r),
                _ => {} // control, descriptor-table and segment registers: the op's purpose
            }
        }
        if (i.rflags_written() | i.rflags_cleared() | i.rflags_set()) & arith() != 0
            || i.mnemonic() == Mnemonic::Popfq
        {
            c |= Clobbers::FLAGS;
        }
        (c, other)
    }

    /// The clobber bit of a register's 64-bit form (`None`: not a caller-saved register).
    pub fn clobber_bit(r: Register) -> Option<Clobbers> {
        Some(match r.full_register() {
            Register::RAX => Clobbers::RAX,
            Register::RCX => Clobbers::RCX,
            Register::RDX => Clobbers::RDX,
            Register::RSI => Clobbers::RSI,
            Register::RDI => Clobbers::RDI,
            Register::R8 => Clobbers::R8,
            Register::R9 => Clobbers::R9,
            Register::R10 => Clobbers::R10,
            Register::R11 => Clobbers::R11,
            _ => return None,
        })
    }

    /// The registers a function (at `addr`) and the functions it jumps to directly change,
    /// minus those it pushes at entry (a thunk's saves); a `call` inside counts as changing
    /// every caller-saved register. `Err`: code the analysis does not follow (an indirect
    /// branch), with its text.
    fn function_clobbers(addr: usize) -> Result<(Clobbers, Vec<Register>), String> {
        let mut f = InstructionInfoFactory::new();
        let (mut all, mut others) = (Clobbers::empty(), Vec::new());
        let mut work = vec![addr as u64];
        let mut seen = Vec::new();
        while let Some(start) = work.pop() {
            if seen.contains(&start) || seen.len() > 16 {
                continue;
            }
            seen.push(start);
            let insns = decode(&peek(start as usize, 512), start);
            let mut saved = Clobbers::empty();
            let mut prologue = true;
            let (mut mine, mut my_others) = (Clobbers::empty(), Vec::new());
            for i in insns.iter().take(128) {
                if i.mnemonic() == Mnemonic::Endbr64 {
                    continue;
                }
                if prologue
                    && i.mnemonic() == Mnemonic::Push
                    && i.op0_kind() == iced_x86::OpKind::Register
                {
                    if let Some(b) = clobber_bit(i.op0_register()) {
                        saved |= b;
                    }
                    continue;
                }
                prologue = false;
                let (c, o) = writes(&mut f, i);
                mine |= c;
                my_others.extend(o);
                match i.flow_control() {
                    FlowControl::Next | FlowControl::Interrupt => {}
                    FlowControl::Call => {
                        // the callee may change every caller-saved register
                        mine |= Convention::C.clobbers();
                    }
                    FlowControl::ConditionalBranch => work.push(i.near_branch64()),
                    FlowControl::UnconditionalBranch => {
                        let t = i.near_branch64();
                        // a jump to the kernel's return thunk is a return
                        if !(start..start + 512).contains(&t) {
                            work.push(t);
                        }
                        break;
                    }
                    FlowControl::Return | FlowControl::Exception => break,
                    other => return Err(format!("{other:?} at {:#x}: {}", i.ip(), text(i))),
                }
            }
            // pops restore what the prologue pushed (their writes are not changes)
            let pops: Vec<Register> = insns
                .iter()
                .filter(|i| {
                    i.mnemonic() == Mnemonic::Pop && i.op0_kind() == iced_x86::OpKind::Register
                })
                .map(|i| i.op0_register())
                .collect();
            for r in pops {
                if let Some(b) = clobber_bit(r) {
                    if saved.contains(b) {
                        mine.remove(b);
                    }
                }
                my_others.retain(|o| *o != r.full_register());
            }
            mine.remove(saved);
            all |= mine;
            others.extend(my_others);
        }
        Ok((all, others))
    }

    /// Every violation of `ops` (empty: none).
    pub fn check(ops: &BackendOps) -> Vec<String> {
        let mut bad = Vec::new();
        let unfilled = PvOps::UNFILLED;
        let mut f = InstructionInfoFactory::new();
        for &op in Op::ALL {
            let allowed = op.convention().clobbers();
            let target = ops.target(op);
            if target == unfilled.target(op) || target == 0 {
                bad.push(format!("{}: slot not filled", op.name()));
                continue;
            }
            if let Some(inline) = ops.inline(op) {
                if !allowed.contains(inline.clobbers) {
                    bad.push(format!(
                        "{}: inline declares {:?}, the convention allows {allowed:?}",
                        op.name(),
                        inline.clobbers
                    ));
                }
                let insns = decode(inline.bytes, 0x1000);
                let mut written = Clobbers::empty();
                for i in &insns {
                    if i.is_invalid()
                        || i.is_ip_rel_memory_operand()
                        || !matches!(i.flow_control(), FlowControl::Next | FlowControl::Interrupt)
                    {
                        bad.push(format!(
                            "{}: inline {} is not position-independent straight-line code",
                            op.name(),
                            text(i)
                        ));
                    }
                    let (c, o) = writes(&mut f, i);
                    written |= c;
                    if !o.is_empty() {
                        bad.push(format!("{}: inline {} writes {o:?}", op.name(), text(i)));
                    }
                }
                if !inline.clobbers.contains(written) {
                    bad.push(format!(
                        "{}: inline changes {written:?}, declares {:?}",
                        op.name(),
                        inline.clobbers
                    ));
                }
            }
            if op.convention() == Convention::CalleeSave {
                match function_clobbers(target) {
                    Ok((c, o)) => {
                        if !allowed.contains(c) || !o.is_empty() {
                            bad.push(format!(
                                "{}: the function at {target:#x} changes {:?} {o:?}, the convention allows {allowed:?}",
                                op.name(),
                                c.difference(allowed)
                            ));
                        }
                    }
                    Err(e) => bad.push(format!("{}: {e}", op.name())),
                }
            }
        }
        bad
    }
}

/// Clock comparisons with the rigs' rule (guest-kmod/selftest.rs): a backend's clock over an
/// interval agrees with the reference clock when it is within 2% + 200 µs of it, each reading
/// taken between two reference reads ([`pvops::arch::bracketed`]) so that a preemption between
/// them is thrown away rather than counted.
pub mod clock {
    use std::sync::OnceLock;
    use std::time::Instant;

    /// The rigs' tolerance on an interval of `reference_ns`: 2% + 200 µs.
    pub fn tolerance(reference_ns: u64) -> u64 {
        reference_ns / 50 + 200_000
    }

    /// Whether `measured_ns` agrees with `reference_ns` within [`tolerance`].
    pub fn agrees(measured_ns: u64, reference_ns: u64) -> bool {
        measured_ns.abs_diff(reference_ns) <= tolerance(reference_ns)
    }

    /// This process's monotonic clock in ns (since its first use).
    pub fn monotonic_ns() -> u64 {
        static ORIGIN: OnceLock<Instant> = OnceLock::new();
        ORIGIN.get_or_init(Instant::now).elapsed().as_nanos() as u64
    }

    /// `sample()` and the monotonic clock at (nearly) the same instant: (reference ns, value).
    pub fn pair(mut sample: impl FnMut() -> u64) -> (u64, u64) {
        pvops::arch::bracketed(&mut || Some(monotonic_ns()), &mut sample, 20_000)
            .expect("the monotonic clock always reads")
    }

    /// The TSC rate measured against [`monotonic_ns`], as the native backend calibrates it.
    pub fn tsc_khz() -> u64 {
        pvops_backends::native::calibrate_tsc_khz(&|| Some(monotonic_ns()))
    }

    /// Sample `clock` over `ms` milliseconds of the reference and check the rigs' rule; returns
    /// the (clock, reference) intervals.
    pub fn check_over(what: &str, ms: u64, mut clock: impl FnMut() -> u64) -> (u64, u64) {
        let (r0, c0) = pair(&mut clock);
        std::thread::sleep(std::time::Duration::from_millis(ms));
        let (r1, c1) = pair(&mut clock);
        assert!(c1 > c0, "{what}: advances ({c0} -> {c1})");
        let (dc, dr) = (c1 - c0, r1 - r0);
        assert!(
            agrees(dc, dr),
            "{what}: {dc} ns against {dr} ns of the reference (allowed: ±{} ns)",
            tolerance(dr)
        );
        (dc, dr)
    }
}

/// Call a callee-save op at `f` with `rdi` as its argument, every other caller-saved register
/// holding a sentinel; returns RAX and the registers after the call, in the order RCX, RDX,
/// RSI, RDI, R8, R9, R10, R11.
///
/// # Safety
///
/// `f` is a callee-save op whose contract holds here.
pub unsafe fn call_callee_save(f: usize, rdi: u64) -> (u64, [u64; 8]) {
    let (rax, rcx, rdx, rsi, rdi_out, r8, r9, r10, r11);
    // SAFETY: forwarded; every register the callee may touch is declared.
    unsafe {
        core::arch::asm!(
            "call {f}",
            f = in(reg) f,
            inout("rdi") rdi => rdi_out,
            inout("rcx") SENTINELS[0] => rcx,
            inout("rdx") SENTINELS[1] => rdx,
            inout("rsi") SENTINELS[2] => rsi,
            inout("r8") SENTINELS[4] => r8,
            inout("r9") SENTINELS[5] => r9,
            inout("r10") SENTINELS[6] => r10,
            inout("r11") SENTINELS[7] => r11,
            out("rax") rax,
        )
    };
    (rax, [rcx, rdx, rsi, rdi_out, r8, r9, r10, r11])
}

/// What [`call_callee_save`] puts in RCX, RDX, RSI, (RDI: the argument), R8, R9, R10, R11.
pub const SENTINELS: [u64; 8] = [
    0x1111, 0x2222, 0x3333, 0x4444, 0x8888, 0x9999, 0xaaaa, 0xbbbb,
];

/// Pages a modelled platform hands out (zeroed, page-aligned) and takes back, remembered so a
/// test can check that every page was freed, or kept.
#[derive(Default)]
pub struct Pages {
    /// Every page handed out, in order.
    pub given: std::sync::Mutex<Vec<usize>>,
    /// Every page taken back, in order.
    pub freed: std::sync::Mutex<Vec<usize>>,
}

const PAGE: std::alloc::Layout = match std::alloc::Layout::from_size_align(4096, 4096) {
    Ok(l) => l,
    Err(_) => panic!("a page layout"),
};

impl Pages {
    /// A zeroed page (`Platform::alloc_page`).
    pub fn alloc(&self) -> Option<usize> {
        // SAFETY: a non-zero-sized layout.
        let p = unsafe { std::alloc::alloc_zeroed(PAGE) } as usize;
        self.given.lock().unwrap().push(p);
        Some(p)
    }

    /// Take a page back (`Platform::free_page`).
    pub fn free(&self, va: usize) {
        self.freed.lock().unwrap().push(va);
        // SAFETY: allocated by `alloc` with the same layout.
        unsafe { std::alloc::dealloc(va as *mut u8, PAGE) };
    }
}

/// Fault injection for backends' start paths: passes every call to `inner`, except that the
/// `fail_at`-th fallible one (counting from 0: `rdmsr`, `wrmsr`, `rdmsr_on_cpu`,
/// `phys_to_virt`, `virt_to_phys`, `alloc_page`, `write_code`) fails, as the kernel's would (an
/// MSR that faults, memory that is not RAM, no free page, no writable alias of the text). [`Faulty::disarm`] stops failing (for the
/// teardown after a start that survived its fault).
pub struct Faulty<'a> {
    inner: &'a dyn pvops_backends::Platform,
    fail_at: usize,
    calls: std::cell::Cell<usize>,
    armed: std::cell::Cell<bool>,
    failed: std::cell::Cell<Option<&'static str>>,
}

impl<'a> Faulty<'a> {
    /// `inner` with its `fail_at`-th fallible call failing.
    pub fn new(inner: &'a dyn pvops_backends::Platform, fail_at: usize) -> Self {
        Faulty {
            inner,
            fail_at,
            calls: Default::default(),
            armed: std::cell::Cell::new(true),
            failed: Default::default(),
        }
    }

    /// Which call failed (`None`: the start made fewer than `fail_at + 1` fallible calls).
    pub fn failed(&self) -> Option<&'static str> {
        self.failed.get()
    }

    /// Fail nothing from now on.
    pub fn disarm(&self) {
        self.armed.set(false);
    }

    fn fails(&self, what: &'static str) -> bool {
        let n = self.calls.get();
        self.calls.set(n + 1);
        let fail = self.armed.get() && n == self.fail_at;
        if fail {
            self.failed.set(Some(what));
        }
        fail
    }
}

impl pvops_backends::Platform for Faulty<'_> {
    fn tsc_khz(&self) -> u64 {
        self.inner.tsc_khz()
    }
    fn clock_ns(&self) -> Option<u64> {
        self.inner.clock_ns()
    }
    fn cpuid(&self, leaf: u32, subleaf: u32) -> pvops::ops::CpuidResult {
        self.inner.cpuid(leaf, subleaf)
    }
    fn rdmsr(&self, msr: u32) -> Option<u64> {
        if self.fails("rdmsr") {
            return None;
        }
        self.inner.rdmsr(msr)
    }
    fn wrmsr(&self, msr: u32, value: u64) -> bool {
        !self.fails("wrmsr") && self.inner.wrmsr(msr, value)
    }
    fn rdmsr_on_cpu(&self, cpu: u32, msr: u32) -> Option<u64> {
        if self.fails("rdmsr_on_cpu") {
            return None;
        }
        self.inner.rdmsr_on_cpu(cpu, msr)
    }
    fn wrmsr_on_cpu(&self, cpu: u32, msr: u32, value: u64) -> bool {
        !self.fails("wrmsr_on_cpu") && self.inner.wrmsr_on_cpu(cpu, msr, value)
    }
    fn kernel_kvmclock(&self) -> Option<bool> {
        self.inner.kernel_kvmclock()
    }
    fn kernel_pvclock_cpu0(&self) -> Option<usize> {
        self.inner.kernel_pvclock_cpu0()
    }
    fn xen_pv(&self) -> bool {
        self.inner.xen_pv()
    }
    fn xen_pv_kernel(&self) -> Option<pvops_backends::xen::pv::XenPvKernel> {
        self.inner.xen_pv_kernel()
    }
    fn kvm_kernel(&self) -> Option<pvops_backends::kvm::KvmKernel> {
        self.inner.kvm_kernel()
    }
    fn boot_subarch(&self) -> Option<(u32, u64)> {
        self.inner.boot_subarch()
    }
    fn hypercall_model(&self) -> Option<pvops_backends::hypercall::HypercallFn> {
        self.inner.hypercall_model()
    }
    fn privileged(&self) -> bool {
        self.inner.privileged()
    }
    fn xen_vcpu_id(&self, cpu: u32) -> Option<u32> {
        self.inner.xen_vcpu_id(cpu)
    }
    fn alloc_page(&self) -> Option<usize> {
        if self.fails("alloc_page") {
            return None;
        }
        self.inner.alloc_page()
    }
    fn free_page(&self, va: usize) {
        self.inner.free_page(va)
    }
    fn nr_cpus(&self) -> u32 {
        self.inner.nr_cpus()
    }
    fn phys_to_virt(&self, pa: u64) -> Option<usize> {
        if self.fails("phys_to_virt") {
            return None;
        }
        self.inner.phys_to_virt(pa)
    }
    fn virt_to_phys(&self, va: usize) -> Option<u64> {
        if self.fails("virt_to_phys") {
            return None;
        }
        self.inner.virt_to_phys(va)
    }
    fn write_code(&self, addr: usize, bytes: &[u8]) -> bool {
        !self.fails("write_code") && self.inner.write_code(addr, bytes)
    }
}
