//! The VMI backend: VMware's Virtual Machine Interface, ported to 64 bits. The host side is an
//! option ROM full of code; the guest finds it in the option-ROM area, validates it, copies the
//! routines it needs into memory it owns and patches its call sites with them. The ABI (what
//! stays as VMI API 3.0 had it, what the 64-bit port changes) is `backends/src/VMI-64.md`; the
//! ROM this project ships is `backends/vmi-rom/vmi.S`, built by `scripts/vmi-rom`. The original
//! 32-bit ABI: shared/docs/abi-vmi.md.
//!
//! - **Detection**: physical 0xC0000–0xDFFFF in 2 KiB steps through the direct map
//!   ([`probe`], [`scan`]); the first image with `55 AA` and `"cVmi"` is the ROM. It is then
//!   validated ([`Rom::parse`]): header length, API version 3.1, the declared length, the byte
//!   checksum (which Linux skipped), the license, the PCI data structure and every relocation
//!   entry. A ROM that fails is refused with the reason and the backend is absent.
//! - **The arena**: ROM memory is never executed (the direct map is NX). [`init`] lays out, in
//!   a 2 KiB arena reserved in this image's own `.text`, one function per routine the ROM
//!   provides: `endbr64`, the ROM's body byte for byte, and this image's own return (a copy of
//!   [`return_template`]'s, as the kernel patched it at load: `ret`, or a jump to the return
//!   thunk), then writes it through
//!   [`Platform::write_code`]. Table slots point into the arena; call sites get the body inline
//!   when the ROM flags it inlinable and it fits, a direct call into the arena otherwise.
//!   [`teardown`] fills the arena with `int3` again.
//! - **Routes**: ops whose signature is the call's own take the arena function directly
//!   (CPUID, CRs, MSRs, descriptor tables, interrupt flag, halt, page-table store, `invlpg`,
//!   `io_delay`, AllocatePage/ReleasePage); ops that pass a fixed argument (FlushTLB flags,
//!   SetLazyMode mode, GetCycleCounter counter) go through small wrappers; a call the ROM marks
//!   NONE keeps the native op, as VMI specified. `read_msr_safe`/`write_msr_safe` (exception
//!   tables), `halt` (VMI has no plain halt), `set_next_event` and `cpu.hypercall` are native.
//! - **Time**: `sched_clock` is GetCycleCounter(AVAILABLE) scaled by the TSC rate; a static ROM
//!   cannot know that rate (GetCycleFrequency is NONE in the project's ROM), so the rate is the
//!   kernel's `tsc_khz`, or calibrated at load, as the native backend does.

use core::cell::UnsafeCell;
use core::fmt;
use core::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, AtomicUsize, Ordering};

use pvops::ops::{Clobbers, Op, PvOps, MAX_SITE_LEN};
use pvops::{Backend, BackendId, Inline, InlineSource};

use crate::{native, Platform};

/// VMI call numbers (API 3.0 numbering, kept by the 64-bit variant; see VMI-64.md for the
/// registers of each).
pub mod call {
    /// CPUID(EDI leaf, ESI subleaf, RDX out).
    pub const CPUID: u16 = 0;
    /// WRMSR(EDI msr, RSI value).
    pub const WRMSR: u16 = 1;
    /// RDMSR(EDI msr) -> RAX.
    pub const RDMSR: u16 = 2;
    /// SetGDT(RDI descriptor pointer).
    pub const SET_GDT: u16 = 3;
    /// SetIDT(RDI descriptor pointer).
    pub const SET_IDT: u16 = 5;
    /// GetTR -> RAX.
    pub const GET_TR: u16 = 10;
    /// SetCR0(RDI).
    pub const SET_CR0: u16 = 15;
    /// SetCR2(RDI).
    pub const SET_CR2: u16 = 16;
    /// SetCR3(RDI).
    pub const SET_CR3: u16 = 17;
    /// SetCR4(RDI).
    pub const SET_CR4: u16 = 18;
    /// GetCR0 -> RAX.
    pub const GET_CR0: u16 = 19;
    /// GetCR2 -> RAX.
    pub const GET_CR2: u16 = 20;
    /// GetCR3 -> RAX.
    pub const GET_CR3: u16 = 21;
    /// GetCR4 -> RAX.
    pub const GET_CR4: u16 = 22;
    /// WBINVD.
    pub const WBINVD: u16 = 23;
    /// RDTSC -> RAX.
    pub const RDTSC: u16 = 27;
    /// CLTS.
    pub const CLTS: u16 = 28;
    /// EnableInterrupts.
    pub const ENABLE_INTERRUPTS: u16 = 29;
    /// DisableInterrupts.
    pub const DISABLE_INTERRUPTS: u16 = 30;
    /// GetInterruptMask -> RAX (bit 9).
    pub const GET_INTERRUPT_MASK: u16 = 31;
    /// SetInterruptMask(RDI: bit 9).
    pub const SET_INTERRUPT_MASK: u16 = 32;
    /// Halt: enable interrupts and halt.
    pub const HALT: u16 = 35;
    /// SetPxE(RDI entry pointer, RSI value).
    pub const SET_PXE: u16 = 38;
    /// AllocatePage(RDI pfn, ESI level).
    pub const ALLOCATE_PAGE: u16 = 44;
    /// ReleasePage(RDI pfn, ESI level).
    pub const RELEASE_PAGE: u16 = 45;
    /// InvalPage(RDI address).
    pub const INVAL_PAGE: u16 = 46;
    /// FlushTLB(EDI flags).
    pub const FLUSH_TLB: u16 = 47;
    /// IODelay.
    pub const IO_DELAY: u16 = 65;
    /// GetCycleFrequency -> RAX cycles per second.
    pub const GET_CYCLE_FREQUENCY: u16 = 66;
    /// GetCycleCounter(EDI counter) -> RAX.
    pub const GET_CYCLE_COUNTER: u16 = 67;
    /// GetWallclockTime -> RAX ns since the epoch.
    pub const GET_WALLCLOCK_TIME: u16 = 70;
    /// SetLazyMode(EDI mode).
    pub const SET_LAZY_MODE: u16 = 73;
    /// One past the highest call number API 3.0 defines.
    pub const COUNT: usize = 74;
}

/// FlushTLB flag: this CPU's non-global translations.
pub const VMI_FLUSH_TLB: u64 = 1;
/// FlushTLB flag: global translations too.
pub const VMI_FLUSH_GLOBAL: u64 = 2;
/// GetCycleCounter counters.
pub const VMI_CYCLES_AVAILABLE: u64 = 1;
/// The per-vCPU stolen-time counter.
pub const VMI_CYCLES_STOLEN: u64 = 2;
/// SetLazyMode modes.
pub const VMI_LAZY_NONE: u64 = 0;
/// Lazy MMU mode.
pub const VMI_LAZY_MMU: u64 = 1;

/// Where the ROM is looked for: physical [start, end), in [`ROM_STEP`] steps.
pub const ROM_AREA: (u64, u64) = (0xC_0000, 0xE_0000);
/// Option ROMs start on 2 KiB boundaries.
pub const ROM_STEP: usize = 2048;
/// The header: API 3.0's 0x80 bytes plus the 64-bit variant's table header.
pub const HEADER_LEN: usize = 0x90;
/// "cVmi" at offset 8.
pub const VROM_SIGNATURE: [u8; 4] = *b"cVmi";
/// The API this backend implements: 3.1 (3.0 numbering, 64-bit relocation table).
pub const API_MAJOR: u8 = 3;
/// The first 64-bit minor version.
pub const API_MINOR_64: u8 = 1;
/// Bytes per relocation entry.
pub const RELOC_ENTRY_LEN: usize = 16;
/// The longest routine body the backend copies.
pub const MAX_BODY: usize = 512;
/// PCI_VENDOR_ID_VMWARE, PCI_DEVICE_ID_VMWARE_VMI.
pub const PCI_IDS: (u16, u16) = (0x15AD, 0x0801);

/// How a call is reached (API 3.0's relocation types).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelocType {
    /// Not provided: the guest keeps its native op.
    None,
    /// A routine the guest calls (or copies inline when flagged so).
    Call,
    /// A routine that never returns, reached by a jump (IRET, SYSEXIT): no op here uses one.
    Jump,
    /// Nothing to do: the site becomes NOPs, the slot an empty function.
    Nop,
}

/// Relocation entry flag: the body may be copied into a call site.
pub const FLAG_INLINE: u8 = 1;

/// One relocation entry, as the ROM's table gives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reloc {
    /// The call number.
    pub call: u16,
    /// How it is reached.
    pub kind: RelocType,
    /// [`FLAG_INLINE`].
    pub flags: u8,
    /// ROM-relative offset of the body.
    pub offset: u32,
    /// Body length in bytes.
    pub len: u16,
    /// The registers the body changes.
    pub clobbers: Clobbers,
}

/// Why an image is not a usable VMI ROM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RomError {
    /// No `55 AA` at offset 0.
    NotOptionRom,
    /// The header does not fit in the image (or in the length the ROM declares).
    TruncatedHeader {
        /// Bytes available.
        len: usize,
    },
    /// No "cVmi" at offset 8.
    BadSignature,
    /// Not API 3.x with x ≥ 1 (3.0 is the 32-bit ROM, whose 0x80 holds 32-bit code).
    UnsupportedApi {
        /// Major version.
        major: u8,
        /// Minor version.
        minor: u8,
    },
    /// The ROM declares more bytes than there are.
    Truncated {
        /// `rom_length × 512`.
        declared: usize,
        /// Bytes there.
        available: usize,
    },
    /// The bytes do not sum to 0 mod 256.
    BadChecksum {
        /// Their sum mod 256.
        sum: u8,
    },
    /// The license string is not "GPL" or "GPL v2".
    License,
    /// No PCI data structure ("PCIR") inside the ROM.
    NoPciHeader,
    /// The PCI data structure names another device than VMware's VMI.
    PciIds {
        /// Vendor ID.
        vendor: u16,
        /// Device ID.
        device: u16,
    },
    /// The relocation table is not inside the ROM (or has the wrong entry size).
    RelocTableOutside,
    /// A relocation entry's body lies outside the ROM.
    RelocOutside {
        /// The call.
        call: u16,
    },
    /// A relocation entry has an unknown type.
    BadRelocType {
        /// The call.
        call: u16,
        /// The type byte.
        kind: u8,
    },
    /// A relocation entry is invalid: body longer than [`MAX_BODY`], clobber mask with unknown
    /// bits, call number repeated or beyond API 3.0's.
    BadReloc {
        /// The call.
        call: u16,
    },
    /// The VMI_Init body lies outside the ROM.
    InitOutside,
}

impl fmt::Display for RomError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            RomError::NotOptionRom => f.write_str("no option-ROM signature 55 AA"),
            RomError::TruncatedHeader { len } => {
                write!(f, "truncated header: {len} bytes, {HEADER_LEN} needed")
            }
            RomError::BadSignature => f.write_str("no \"cVmi\" signature"),
            RomError::UnsupportedApi { major, minor } => {
                write!(
                    f,
                    "unsupported API version {major}.{minor} (3.1 or later 3.x needed)"
                )
            }
            RomError::Truncated {
                declared,
                available,
            } => write!(
                f,
                "truncated: declares {declared} bytes, {available} present"
            ),
            RomError::BadChecksum { sum } => write!(f, "bad checksum (bytes sum to {sum:#04x})"),
            RomError::License => f.write_str("license is not GPL"),
            RomError::NoPciHeader => f.write_str("no PCI data structure"),
            RomError::PciIds { vendor, device } => {
                write!(f, "PCI ids {vendor:04x}:{device:04x} are not VMware's VMI")
            }
            RomError::RelocTableOutside => f.write_str("relocation table outside the ROM"),
            RomError::RelocOutside { call } => {
                write!(f, "relocation of call {call} points outside the ROM")
            }
            RomError::BadRelocType { call, kind } => {
                write!(f, "relocation of call {call} has unknown type {kind}")
            }
            RomError::BadReloc { call } => write!(f, "relocation of call {call} is invalid"),
            RomError::InitOutside => f.write_str("VMI_Init outside the ROM"),
        }
    }
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    match b.get(off..off.checked_add(2)?)? {
        [lo, hi] => Some(u16::from_le_bytes([*lo, *hi])),
        _ => None,
    }
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    match b.get(off..off.checked_add(4)?)? {
        [a, b, c, d] => Some(u32::from_le_bytes([*a, *b, *c, *d])),
        _ => None,
    }
}

/// A validated VMI ROM.
#[derive(Clone, Copy, Debug)]
pub struct Rom<'a> {
    bytes: &'a [u8],
}

impl<'a> Rom<'a> {
    /// Validate `image` (the bytes from the ROM's first byte on; it may run past the ROM's end)
    /// as a 64-bit VMI ROM. Checks, in order: option-ROM signature, header length, "cVmi", API
    /// version, declared length, checksum, license, PCI data structure, relocation table, each
    /// entry, VMI_Init.
    pub fn parse(image: &'a [u8]) -> Result<Rom<'a>, RomError> {
        if image.get(..2) != Some(&[0x55, 0xAA][..]) {
            return Err(RomError::NotOptionRom);
        }
        if image.len() < HEADER_LEN {
            return Err(RomError::TruncatedHeader { len: image.len() });
        }
        if image.get(8..12) != Some(&VROM_SIGNATURE[..]) {
            return Err(RomError::BadSignature);
        }
        let (minor, major) = (image[0x0c], image[0x0d]);
        if major != API_MAJOR || minor < API_MINOR_64 {
            return Err(RomError::UnsupportedApi { major, minor });
        }
        let declared = usize::from(image[2]) * 512;
        if declared < HEADER_LEN {
            return Err(RomError::TruncatedHeader { len: declared });
        }
        let Some(bytes) = image.get(..declared) else {
            return Err(RomError::Truncated {
                declared,
                available: image.len(),
            });
        };
        let sum = bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b));
        if sum != 0 {
            return Err(RomError::BadChecksum { sum });
        }
        let rom = Rom { bytes };
        rom.check_license()?;
        rom.check_pci()?;
        let mut seen = [false; call::COUNT];
        for i in 0..rom.reloc_count()? {
            let r = rom.reloc_at(i)?;
            let Some(s) = seen.get_mut(usize::from(r.call)) else {
                return Err(RomError::BadReloc { call: r.call });
            };
            if *s {
                return Err(RomError::BadReloc { call: r.call });
            }
            *s = true;
        }
        rom.init_range()?;
        Ok(rom)
    }

    fn check_license(&self) -> Result<(), RomError> {
        let off = usize::from(u16_at(self.bytes, 0x16).unwrap_or(0));
        let tail = self.bytes.get(off..).ok_or(RomError::License)?;
        let s = tail.split(|b| *b == 0).next().unwrap_or(&[]);
        if off == 0 || s.len() == tail.len() || (s != b"GPL" && s != b"GPL v2") {
            return Err(RomError::License);
        }
        Ok(())
    }

    fn check_pci(&self) -> Result<(), RomError> {
        let off = usize::from(u16_at(self.bytes, 0x18).unwrap_or(0));
        let pcir = off
            .checked_add(24)
            .and_then(|end| self.bytes.get(off..end))
            .filter(|p| off != 0 && p.get(..4) == Some(&b"PCIR"[..]))
            .ok_or(RomError::NoPciHeader)?;
        let (vendor, device) = (u16_at(pcir, 4).unwrap_or(0), u16_at(pcir, 6).unwrap_or(0));
        if (vendor, device) != PCI_IDS {
            return Err(RomError::PciIds { vendor, device });
        }
        Ok(())
    }

    /// Number of relocation entries (the table checked to lie inside the ROM).
    fn reloc_count(&self) -> Result<usize, RomError> {
        let off = usize::from(u16_at(self.bytes, 0x80).unwrap_or(0));
        let count = usize::from(u16_at(self.bytes, 0x82).unwrap_or(0));
        let size = usize::from(u16_at(self.bytes, 0x84).unwrap_or(0));
        let end = off + count * RELOC_ENTRY_LEN;
        if size != RELOC_ENTRY_LEN || off < HEADER_LEN || end > self.bytes.len() {
            return Err(RomError::RelocTableOutside);
        }
        Ok(count)
    }

    fn reloc_at(&self, i: usize) -> Result<Reloc, RomError> {
        let base = usize::from(u16_at(self.bytes, 0x80).unwrap_or(0)) + i * RELOC_ENTRY_LEN;
        let e = self
            .bytes
            .get(base..base + RELOC_ENTRY_LEN)
            .ok_or(RomError::RelocTableOutside)?;
        let call = u16_at(e, 0).unwrap_or(0);
        let kind = match e[2] {
            0 => RelocType::None,
            1 => RelocType::Call,
            2 => RelocType::Jump,
            3 => RelocType::Nop,
            kind => return Err(RomError::BadRelocType { call, kind }),
        };
        let offset = u32_at(e, 4).unwrap_or(0);
        let len = u16_at(e, 8).unwrap_or(0);
        let clobbers =
            Clobbers::from_bits(u16_at(e, 10).unwrap_or(0)).ok_or(RomError::BadReloc { call })?;
        if matches!(kind, RelocType::Call | RelocType::Jump) {
            let start = offset as usize;
            if start < HEADER_LEN || start + usize::from(len) > self.bytes.len() {
                return Err(RomError::RelocOutside { call });
            }
            if usize::from(len) > MAX_BODY {
                return Err(RomError::BadReloc { call });
            }
        }
        Ok(Reloc {
            call,
            kind,
            flags: e[3],
            offset,
            len,
            clobbers,
        })
    }

    fn init_range(&self) -> Result<(usize, usize), RomError> {
        let off = usize::from(u16_at(self.bytes, 0x86).unwrap_or(0));
        let len = usize::from(u16_at(self.bytes, 0x88).unwrap_or(0));
        if len == 0 {
            return Ok((0, 0));
        }
        if off < HEADER_LEN || off + len > self.bytes.len() || len > MAX_BODY {
            return Err(RomError::InitOutside);
        }
        Ok((off, len))
    }

    /// The ROM's bytes (its declared length).
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The API version (major, minor).
    pub fn api(&self) -> (u8, u8) {
        (self.bytes[0x0d], self.bytes[0x0c])
    }

    /// Every relocation entry (validated by [`Rom::parse`]).
    pub fn relocs(&self) -> impl Iterator<Item = Reloc> + '_ {
        (0..self.reloc_count().unwrap_or(0)).filter_map(|i| self.reloc_at(i).ok())
    }

    /// The entry for `call`, if the table has one.
    pub fn reloc(&self, call: u16) -> Option<Reloc> {
        self.relocs().find(|r| r.call == call)
    }

    /// The body of a CALL or JUMP entry (empty for the others).
    pub fn body(&self, r: &Reloc) -> &'a [u8] {
        let start = r.offset as usize;
        match r.kind {
            RelocType::Call | RelocType::Jump => self
                .bytes
                .get(start..start + usize::from(r.len))
                .unwrap_or(&[]),
            _ => &[],
        }
    }

    /// The VMI_Init body (empty: none).
    pub fn init(&self) -> &'a [u8] {
        let (off, len) = self.init_range().unwrap_or((0, 0));
        self.bytes.get(off..off + len).unwrap_or(&[])
    }
}

/// Why no ROM is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeError {
    /// No image with both signatures in the option-ROM area.
    NotFound,
    /// The option-ROM area is not mapped (no direct map of it).
    NoMap,
    /// A VMI ROM is there but was refused.
    Refused {
        /// Its physical address.
        pa: u64,
        /// Why.
        why: RomError,
    },
}

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeError::NotFound => f.write_str("no VMI ROM in the option-ROM area"),
            ProbeError::NoMap => f.write_str("the option-ROM area is not mapped"),
            ProbeError::Refused { pa, why } => write!(f, "ROM at {pa:#x} refused: {why}"),
        }
    }
}

/// Find the VMI ROM in `area`, the bytes of physical [`ROM_AREA`] (`area[0]` is at `base`):
/// every [`ROM_STEP`] boundary holding `55 AA` and "cVmi" is a candidate, the first one is
/// validated; images without "cVmi" (the VGA BIOS, other option ROMs) are skipped.
pub fn scan(area: &[u8], base: u64) -> Result<(u64, Rom<'_>), ProbeError> {
    let mut off = 0;
    while let Some(image) = area.get(off..) {
        if image.get(..2) == Some(&[0x55, 0xAA][..])
            && image.get(8..12) == Some(&VROM_SIGNATURE[..])
        {
            let pa = base + off as u64;
            return Rom::parse(image)
                .map(|rom| (pa, rom))
                .map_err(|why| ProbeError::Refused { pa, why });
        }
        off += ROM_STEP;
    }
    Err(ProbeError::NotFound)
}

/// The option-ROM area through the platform's direct map, if every page of it is mapped
/// contiguously (and the kernel is not a Xen PV domain).
pub fn rom_area(platform: &dyn Platform) -> Option<&'static [u8]> {
    // A Xen PV domain has no option-ROM area of its own (its low memory is pseudo-physical),
    // and a ROM of native routines could not run deprivileged anyway: nothing is read there.
    if platform.xen_pv() {
        return None;
    }
    let (start, end) = ROM_AREA;
    let va = platform.phys_to_virt(start)?;
    let mut pa = start;
    while pa < end {
        if platform.phys_to_virt(pa)? != va + (pa - start) as usize {
            return None;
        }
        pa += 4096;
    }
    // SAFETY: every page of [start, end) is mapped at va + offset (checked above) by the
    // platform's direct map, which maps firmware memory for as long as the kernel runs; the
    // option-ROM area is only read here.
    Some(unsafe { core::slice::from_raw_parts(va as *const u8, (end - start) as usize) })
}

/// Look for a valid VMI ROM through the platform's direct map.
pub fn probe(platform: &dyn Platform) -> Result<(u64, Rom<'static>), ProbeError> {
    let area = rom_area(platform).ok_or(ProbeError::NoMap)?;
    scan(area, ROM_AREA.0)
}

/// Why the backend did not start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmiError {
    /// No usable ROM.
    Probe(ProbeError),
    /// The routines do not fit the arena.
    ArenaFull,
    /// The platform cannot write this image's text.
    NoWriter,
    /// VMI_Init returned non-zero.
    InitFailed(u64),
    /// The ROM says a call this backend uses must be reached by a jump.
    Jump(u16),
    /// A routine changes registers its op's convention must keep.
    Clobbers(u16),
}

impl fmt::Display for VmiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmiError::Probe(e) => write!(f, "{e}"),
            VmiError::ArenaFull => f.write_str("the ROM's routines do not fit the arena"),
            VmiError::NoWriter => f.write_str("cannot write the arena"),
            VmiError::InitFailed(rc) => write!(f, "VMI_Init returned {rc:#x}"),
            VmiError::Jump(c) => write!(f, "call {c} is JUMP-relocated, not callable"),
            VmiError::Clobbers(c) => {
                write!(f, "call {c} changes registers its op must keep")
            }
        }
    }
}

/// Size of the arena in this image's text.
pub const ARENA_LEN: usize = 2048;
/// The arena's first bytes (its own `endbr64`, then `int3`) are never rewritten.
const ARENA_START: usize = 16;
const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];
const INT3: u8 = 0xcc;

/// Executable memory for copies of ROM routines, in `.text`: `endbr64`, then `int3` until
/// [`init`] writes routines into it (and again after [`teardown`]). Never called as itself.
///
/// # Safety
///
/// Not to be called.
#[unsafe(naked)]
// rustc gives each naked function a section of its own (`.text.<symbol>`), which the
// kernel's vmlinux linker script does not place: keep it in `.text`.
#[link_section = ".text"]
pub unsafe extern "C" fn arena() {
    // (ends in ud2: objtool wants every function to end in a dead end, and int3 is not one)
    core::arch::naked_asm!("endbr64", ".fill {n}, 1, 0xcc", "ud2", n = const ARENA_LEN - 6)
}

/// The return this image uses (`ret`, or `jmp __x86_return_thunk` in rethunk kernels, which
/// the kernel may rewrite at module load into `ret` or a jump to another thunk, as it does
/// every return site): the arena's functions end with a copy of it, read at [`init`].
///
/// # Safety
///
/// None beyond the call itself; never called, only read.
#[unsafe(naked)]
#[link_section = ".text"]
pub unsafe extern "C" fn return_template() {
    core::arch::naked_asm!("endbr64", pvops::__asm_ret!())
}

/// The return sequence for code at `at`: a copy of [`return_template`]'s, with its jump (if
/// any) retargeted. Returns the bytes and their length.
fn return_sequence(at: usize) -> ([u8; 5], usize) {
    let t = fn_addr(return_template) + ENDBR64.len();
    let mut b = [0u8; 5];
    // SAFETY: return_template is 9 bytes of this image's text at most (endbr64 + jmp rel32),
    // and at least 5 (endbr64 + ret); reading 5 bytes after its endbr64 stays inside it or in
    // the padding that follows a function.
    unsafe { core::ptr::copy_nonoverlapping(t as *const u8, b.as_mut_ptr(), 5) };
    if b[0] == 0xe9 {
        let target = (t + 5).wrapping_add(i32::from_le_bytes([b[1], b[2], b[3], b[4]]) as usize);
        let rel = (target as isize).wrapping_sub(at as isize + 5) as i32;
        let r = rel.to_le_bytes();
        ([0xe9, r[0], r[1], r[2], r[3]], 5)
    } else {
        ([0xc3, 0, 0, 0, 0], 1)
    }
}

/// The address of a naked function of this file, opaque to the optimiser: an address
/// constant-folded to `function + n` would be a relocation into the middle of a function,
/// which objtool flags under IBT ("relocation to !ENDBR").
fn fn_addr(f: unsafe extern "C" fn()) -> usize {
    core::hint::black_box(f as *const () as usize)
}

/// How the backend serves an op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    /// The arena function of the call is the op.
    Direct(u16),
    /// A wrapper calls the arena function (a fixed argument, or time scaling).
    Wrapped(u16),
    /// The native op.
    Native,
}

fn route(op: Op) -> Route {
    use call::*;
    match op {
        Op::Cpuid => Route::Direct(CPUID),
        Op::ReadCr0 => Route::Direct(GET_CR0),
        Op::WriteCr0 => Route::Direct(SET_CR0),
        Op::ReadCr4 => Route::Direct(GET_CR4),
        Op::WriteCr4 => Route::Direct(SET_CR4),
        Op::ReadMsr => Route::Direct(RDMSR),
        Op::WriteMsr => Route::Direct(WRMSR),
        Op::Wbinvd => Route::Direct(WBINVD),
        Op::LoadIdt => Route::Direct(SET_IDT),
        Op::LoadGdt => Route::Direct(SET_GDT),
        Op::StoreTr => Route::Direct(GET_TR),
        Op::IoDelay => Route::Direct(IO_DELAY),
        Op::SaveFl => Route::Direct(GET_INTERRUPT_MASK),
        Op::RestoreFl => Route::Direct(SET_INTERRUPT_MASK),
        Op::IrqDisable => Route::Direct(DISABLE_INTERRUPTS),
        Op::IrqEnable => Route::Direct(ENABLE_INTERRUPTS),
        Op::SafeHalt => Route::Direct(HALT),
        Op::ReadCr2 => Route::Direct(GET_CR2),
        Op::WriteCr2 => Route::Direct(SET_CR2),
        Op::ReadCr3 => Route::Direct(GET_CR3),
        Op::WriteCr3 => Route::Direct(SET_CR3),
        Op::FlushTlbOneUser => Route::Direct(INVAL_PAGE),
        Op::SetPte | Op::SetPmd | Op::SetPud => Route::Direct(SET_PXE),
        Op::AllocPt => Route::Direct(ALLOCATE_PAGE),
        Op::ReleasePt => Route::Direct(RELEASE_PAGE),
        Op::FlushTlbUser | Op::FlushTlbKernel => Route::Wrapped(FLUSH_TLB),
        Op::LazyModeEnter | Op::LazyModeLeave => Route::Wrapped(SET_LAZY_MODE),
        Op::SchedClock | Op::StealClock => Route::Wrapped(GET_CYCLE_COUNTER),
        Op::TscKhz => Route::Wrapped(GET_CYCLE_FREQUENCY),
        Op::WallClock => Route::Wrapped(GET_WALLCLOCK_TIME),
        Op::ReadMsrSafe | Op::WriteMsrSafe | Op::Halt | Op::SetNextEvent | Op::Hypercall => {
            Route::Native
        }
    }
}

/// The wrapped ops that return nothing (a NOP call can stand for them).
fn returns_nothing(op: Op) -> bool {
    matches!(
        op,
        Op::FlushTlbUser | Op::FlushTlbKernel | Op::LazyModeEnter | Op::LazyModeLeave
    )
}

/// What the backend copied from the ROM, per call number. Written by [`init`] and
/// [`teardown`] only, while no op of the backend is installed.
struct Calls {
    /// Arena address of the call's function (0: NONE, or not copied).
    entry: [AtomicUsize; call::COUNT],
    kind: [AtomicU8; call::COUNT],
    flags: [AtomicU8; call::COUNT],
    len: [AtomicU16; call::COUNT],
    clobbers: [AtomicU16; call::COUNT],
}

static CALLS: Calls = Calls {
    entry: [const { AtomicUsize::new(0) }; call::COUNT],
    kind: [const { AtomicU8::new(0) }; call::COUNT],
    flags: [const { AtomicU8::new(0) }; call::COUNT],
    len: [const { AtomicU16::new(0) }; call::COUNT],
    clobbers: [const { AtomicU16::new(0) }; call::COUNT],
};

/// Where the ROM was and what the TSC runs at.
static ROM_PA: AtomicU64 = AtomicU64::new(0);
static API: AtomicU16 = AtomicU16::new(0);
static TSC_KHZ: AtomicU64 = AtomicU64::new(0);
static TSC_MULT: AtomicU64 = AtomicU64::new(0);
static COPIED: AtomicUsize = AtomicUsize::new(0);
static INLINABLE: AtomicUsize = AtomicUsize::new(0);
static ARENA_USED: AtomicUsize = AtomicUsize::new(0);

/// The arena's contents, assembled before being written in one go.
struct Staging(UnsafeCell<[u8; ARENA_LEN]>);
// SAFETY: only `init` and `teardown` touch it, and the backend's contract (see `init`) makes
// them exclusive.
unsafe impl Sync for Staging {}
static STAGING: Staging = Staging(UnsafeCell::new([INT3; ARENA_LEN]));

/// The report text (`describe`), formatted at init.
struct Describe(UnsafeCell<([u8; 128], usize)>);
// SAFETY: written only by `init` (exclusive, before the backend is handed out), read after.
unsafe impl Sync for Describe {}
static DESCRIBE: Describe = Describe(UnsafeCell::new(([0; 128], 0)));

struct BufWriter<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl fmt::Write for BufWriter<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            let Some(d) = self.buf.get_mut(self.len) else {
                return Err(fmt::Error);
            };
            *d = b;
            self.len += 1;
        }
        Ok(())
    }
}

fn kind_of(c: u16) -> RelocType {
    match CALLS
        .kind
        .get(usize::from(c))
        .map(|k| k.load(Ordering::Relaxed))
    {
        Some(1) => RelocType::Call,
        Some(2) => RelocType::Jump,
        Some(3) => RelocType::Nop,
        _ => RelocType::None,
    }
}

fn entry_of(c: u16) -> usize {
    CALLS
        .entry
        .get(usize::from(c))
        .map_or(0, |e| e.load(Ordering::Relaxed))
}

/// Whether the backend has a function for `c` (CALL or NOP, copied).
fn provided(c: u16) -> bool {
    entry_of(c) != 0
}

/// Call the arena function of `c` with one argument (C convention); 0 if there is none.
fn call1(c: u16, arg: u64) -> u64 {
    let e = entry_of(c);
    if e == 0 {
        return 0;
    }
    // SAFETY: `e` is the arena copy of the ROM's routine for `c`, framed by `init` as a
    // function (endbr64, body, return); the 64-bit VMI ABI makes each such routine callable
    // with the C convention, one argument in RDI and its result in RAX (VMI-64.md).
    let f: unsafe extern "C" fn(u64) -> u64 = unsafe { core::mem::transmute(e) };
    // SAFETY: the routine's own contract; the wrappers below only pass what VMI-64.md lists.
    unsafe { f(arg) }
}

extern "C" fn flush_tlb_user_c() {
    call1(call::FLUSH_TLB, VMI_FLUSH_TLB);
}
pvops::callee_save_thunk!(fn flush_tlb_user() => flush_tlb_user_c);
extern "C" fn flush_tlb_kernel() {
    call1(call::FLUSH_TLB, VMI_FLUSH_TLB | VMI_FLUSH_GLOBAL);
}
extern "C" fn lazy_mode_enter() {
    call1(call::SET_LAZY_MODE, VMI_LAZY_MMU);
}
extern "C" fn lazy_mode_leave() {
    call1(call::SET_LAZY_MODE, VMI_LAZY_NONE);
}

/// ns from VMI cycles.
fn cycles_to_ns(cycles: u64) -> u64 {
    ((u128::from(cycles) * u128::from(TSC_MULT.load(Ordering::Relaxed))) >> 32) as u64
}

/// `sched_clock`: GetCycleCounter(AVAILABLE) in ns.
pub extern "C" fn sched_clock() -> u64 {
    cycles_to_ns(call1(call::GET_CYCLE_COUNTER, VMI_CYCLES_AVAILABLE))
}

/// `steal_clock`: GetCycleCounter(STOLEN) of the calling vCPU in ns (VMI reads no other
/// vCPU's counter).
extern "C" fn steal_clock(_cpu: u32) -> u64 {
    cycles_to_ns(call1(call::GET_CYCLE_COUNTER, VMI_CYCLES_STOLEN))
}

extern "C" fn tsc_khz() -> u64 {
    TSC_KHZ.load(Ordering::Relaxed)
}

extern "C" fn wall_clock() -> u64 {
    call1(call::GET_WALLCLOCK_TIME, 0)
}

/// Write `v` into `ops`' slot for `op`.
fn set_slot(ops: &mut PvOps, op: Op, v: usize) {
    // SAFETY: PvOps is repr(C), one function pointer per op at `op.slot()` (asserted in
    // pvops::ops); `v` is non-null code implementing the op (the callers' choice).
    unsafe {
        (ops as *mut PvOps)
            .cast::<u8>()
            .add(op.slot())
            .cast::<usize>()
            .write(v)
    }
}

/// Lay the ROM's routines out in the staging buffer, as they will sit at `arena_base`.
/// Returns the VMI_Init function's offset (if any).
fn lay_out(
    rom: &Rom<'_>,
    stage: &mut [u8; ARENA_LEN],
    arena_base: usize,
) -> Result<Option<usize>, VmiError> {
    let mut pos = ARENA_START;
    let mut place = |body: &[u8]| -> Result<usize, VmiError> {
        let at = pos;
        let (ret, ret_len) = return_sequence(arena_base + at + ENDBR64.len() + body.len());
        let end = at + ENDBR64.len() + body.len() + ret_len;
        let slot = stage.get_mut(at..end).ok_or(VmiError::ArenaFull)?;
        for (d, s) in slot
            .iter_mut()
            .zip(ENDBR64.iter().chain(body).chain(ret.iter().take(ret_len)))
        {
            *d = *s;
        }
        pos = (end + 15) & !15;
        Ok(at)
    };
    let init = rom.init();
    let init_at = if init.is_empty() {
        None
    } else {
        Some(place(init)?)
    };
    for r in rom.relocs() {
        let i = usize::from(r.call);
        let kind = match r.kind {
            RelocType::None => 0,
            RelocType::Call => 1,
            RelocType::Jump => 2,
            RelocType::Nop => 3,
        };
        CALLS.kind[i].store(kind, Ordering::Relaxed);
        CALLS.flags[i].store(r.flags, Ordering::Relaxed);
        CALLS.len[i].store(r.len, Ordering::Relaxed);
        CALLS.clobbers[i].store(r.clobbers.bits(), Ordering::Relaxed);
        if matches!(r.kind, RelocType::Call | RelocType::Nop) {
            let at = place(rom.body(&r))?;
            CALLS.entry[i].store(arena_base + at, Ordering::Relaxed);
        }
    }
    ARENA_USED.store(pos, Ordering::Relaxed);
    Ok(init_at)
}

/// Check every op the backend routes to the ROM against the entry's type and clobbers.
fn check_routes() -> Result<(), VmiError> {
    for &op in Op::ALL {
        let (Route::Direct(c) | Route::Wrapped(c)) = route(op) else {
            continue;
        };
        match kind_of(c) {
            RelocType::Jump => return Err(VmiError::Jump(c)),
            RelocType::Call if matches!(route(op), Route::Direct(_)) => {
                let clob = Clobbers::from_bits_truncate(
                    CALLS.clobbers[usize::from(c)].load(Ordering::Relaxed),
                );
                if !op.convention().clobbers().contains(clob) {
                    return Err(VmiError::Clobbers(c));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn forget() {
    for i in 0..call::COUNT {
        CALLS.entry[i].store(0, Ordering::Relaxed);
        CALLS.kind[i].store(0, Ordering::Relaxed);
        CALLS.flags[i].store(0, Ordering::Relaxed);
        CALLS.len[i].store(0, Ordering::Relaxed);
        CALLS.clobbers[i].store(0, Ordering::Relaxed);
    }
    COPIED.store(0, Ordering::Relaxed);
    INLINABLE.store(0, Ordering::Relaxed);
}

/// Write the arena back to `int3` (after `endbr64`).
fn wipe_arena(platform: &dyn Platform) -> bool {
    const FILL: [u8; 256] = [INT3; 256];
    let base = fn_addr(arena);
    let used = ARENA_USED.load(Ordering::Relaxed).min(ARENA_LEN);
    let mut at = ARENA_START;
    while at < used {
        let n = (used - at).min(FILL.len());
        if !platform.write_code(base + at, &FILL[..n]) {
            return false;
        }
        at += n;
    }
    ARENA_USED.store(0, Ordering::Relaxed);
    true
}

/// Find and validate the ROM, copy its routines into the arena, run VMI_Init, and hand out
/// the backend.
///
/// Must not run concurrently with itself, [`teardown`] or any op of this backend (the module
/// calls it at load, before installing the table).
pub fn init(platform: &dyn Platform) -> Result<&'static Vmi, VmiError> {
    let (pa, rom) = probe(platform).map_err(VmiError::Probe)?;
    forget();
    let base = fn_addr(arena);
    // SAFETY: init and teardown are exclusive (contract above); nothing else uses STAGING.
    let stage = unsafe { &mut *STAGING.0.get() };
    stage.fill(INT3);
    let init_at = lay_out(&rom, stage, base);
    let init_at = match init_at.and_then(|i| check_routes().map(|()| i)) {
        Ok(i) => i,
        Err(e) => {
            // nothing was written
            ARENA_USED.store(0, Ordering::Relaxed);
            forget();
            return Err(e);
        }
    };
    let used = ARENA_USED.load(Ordering::Relaxed);
    if !platform.write_code(base + ARENA_START, &stage[ARENA_START..used]) {
        ARENA_USED.store(0, Ordering::Relaxed);
        forget();
        return Err(VmiError::NoWriter);
    }
    if let Some(at) = init_at {
        // SAFETY: the arena now holds VMI_Init framed as a function (written just above);
        // VMI_Init takes nothing and returns 0 in RAX when the ROM is ready (VMI-64.md).
        let f: unsafe extern "C" fn() -> u64 = unsafe { core::mem::transmute(base + at) };
        // SAFETY: as above.
        let rc = unsafe { f() };
        if rc != 0 {
            wipe_arena(platform);
            forget();
            return Err(VmiError::InitFailed(rc));
        }
    }

    // Time: GetCycleFrequency if the ROM has it, else the platform's TSC rate (native's way).
    let mut khz = if provided(call::GET_CYCLE_FREQUENCY) {
        call1(call::GET_CYCLE_FREQUENCY, 0) / 1000
    } else {
        0
    };
    let khz_source = if khz != 0 {
        "GetCycleFrequency"
    } else {
        khz = platform.tsc_khz();
        if khz != 0 {
            "the kernel's tsc_khz"
        } else {
            khz = native::calibrate_tsc_khz(&|| platform.clock_ns());
            "calibrated at load"
        }
    };
    native::init(khz);
    TSC_KHZ.store(khz, Ordering::Relaxed);
    TSC_MULT.store(
        (1_000_000u64 << 32).checked_div(khz).unwrap_or(0),
        Ordering::Relaxed,
    );
    ROM_PA.store(pa, Ordering::Relaxed);
    let (maj, min) = rom.api();
    API.store(u16::from(maj) << 8 | u16::from(min), Ordering::Relaxed);
    let copied = (0..call::COUNT as u16).filter(|c| provided(*c)).count();
    let inlinable = (0..call::COUNT as u16)
        .filter(|c| CALLS.flags[usize::from(*c)].load(Ordering::Relaxed) & FLAG_INLINE != 0)
        .count();
    COPIED.store(copied, Ordering::Relaxed);
    INLINABLE.store(inlinable, Ordering::Relaxed);

    // SAFETY: exclusive (contract above); `describe` reads it only after init returned.
    let (buf, len) = unsafe { &mut *DESCRIBE.0.get() };
    let mut w = BufWriter { buf, len: 0 };
    let _ = fmt::Write::write_fmt(
        &mut w,
        format_args!(
            "ROM at {pa:#x} API {maj}.{min} ({} bytes): {copied} calls in the arena ({inlinable} inlinable, {used} bytes, returning by {}); TSC: {khz_source}",
            rom.bytes().len(),
            if return_sequence(0).1 == 1 { "ret" } else { "the return thunk" }
        ),
    );
    *len = w.len;
    Ok(&VMI)
}

/// Release what [`init`] set up: the arena back to `int3`, the copied state forgotten. Same
/// exclusion as [`init`]; the table must no longer hold the backend's functions.
pub fn teardown(platform: &dyn Platform) -> &'static str {
    let wiped = wipe_arena(platform);
    forget();
    if wiped {
        "ROM routines removed from the arena"
    } else {
        "arena NOT wiped (text not writable)"
    }
}

/// The VMI backend.
#[derive(Debug)]
pub struct Vmi;

/// The one instance.
pub static VMI: Vmi = Vmi;

impl InlineSource for Vmi {
    fn inline(&self, op: Op) -> Option<Inline> {
        match route(op) {
            Route::Native => native::inline(op),
            Route::Wrapped(c) => match kind_of(c) {
                RelocType::None | RelocType::Jump => native::inline(op),
                // "does nothing here": the site becomes NOPs (ops without a result only)
                RelocType::Nop if returns_nothing(op) => Some(Inline {
                    bytes: &[],
                    clobbers: Clobbers::empty(),
                }),
                _ => None,
            },
            Route::Direct(c) => match kind_of(c) {
                RelocType::None | RelocType::Jump => native::inline(op),
                RelocType::Nop => Some(Inline {
                    bytes: &[],
                    clobbers: Clobbers::empty(),
                }),
                RelocType::Call => {
                    let i = usize::from(c);
                    let len = usize::from(CALLS.len[i].load(Ordering::Relaxed));
                    let entry = entry_of(c);
                    if CALLS.flags[i].load(Ordering::Relaxed) & FLAG_INLINE == 0
                        || len > MAX_SITE_LEN
                        || entry == 0
                    {
                        return None;
                    }
                    // SAFETY: the arena is this image's text ('static); `entry` + 4 is the
                    // body `init` copied there, `len` bytes, unchanged until teardown, which
                    // runs after every site was reverted.
                    let bytes = unsafe {
                        core::slice::from_raw_parts((entry + ENDBR64.len()) as *const u8, len)
                    };
                    Some(Inline {
                        bytes,
                        clobbers: Clobbers::from_bits_truncate(
                            CALLS.clobbers[i].load(Ordering::Relaxed),
                        ),
                    })
                }
            },
        }
    }
}

impl Backend for Vmi {
    fn id(&self) -> BackendId {
        BackendId::Vmi
    }

    fn describe(&self) -> &'static str {
        // SAFETY: written by `init` before the backend was handed out, not after.
        let (buf, len) = unsafe { &*DESCRIBE.0.get() };
        core::str::from_utf8(buf.get(..*len).unwrap_or(&[])).unwrap_or("")
    }

    fn ops(&self) -> PvOps {
        let mut ops = native::NATIVE.ops();
        for &op in Op::ALL {
            match route(op) {
                Route::Direct(c) if provided(c) => set_slot(&mut ops, op, entry_of(c)),
                Route::Wrapped(c) if kind_of(c) == RelocType::Nop && returns_nothing(op) => {
                    set_slot(&mut ops, op, entry_of(c))
                }
                Route::Wrapped(c) if provided(c) => {
                    let f = match op {
                        Op::FlushTlbUser => flush_tlb_user as *const () as usize,
                        Op::FlushTlbKernel => flush_tlb_kernel as *const () as usize,
                        Op::LazyModeEnter => lazy_mode_enter as *const () as usize,
                        Op::LazyModeLeave => lazy_mode_leave as *const () as usize,
                        Op::SchedClock => sched_clock as *const () as usize,
                        Op::StealClock => steal_clock as *const () as usize,
                        Op::WallClock => wall_clock as *const () as usize,
                        _ => continue,
                    };
                    set_slot(&mut ops, op, f);
                }
                _ => {}
            }
        }
        // tsc_khz: GetCycleFrequency's answer or the platform's, read once at init
        ops.timer.tsc_khz = tsc_khz;
        ops
    }
}

/// The ROM in use: physical address and API version (major, minor); `None` before [`init`].
pub fn rom_in_use() -> Option<(u64, (u8, u8))> {
    let pa = ROM_PA.load(Ordering::Relaxed);
    let api = API.load(Ordering::Relaxed);
    (pa != 0).then_some((pa, ((api >> 8) as u8, api as u8)))
}

/// Whether `op` is served by a copy of a ROM routine (directly or through a wrapper).
pub fn from_rom(op: Op) -> bool {
    match route(op) {
        Route::Direct(c) | Route::Wrapped(c) => provided(c),
        Route::Native => false,
    }
}

/// The arena address of `c`'s function (0: none), for tests and the report.
pub fn entry(c: u16) -> usize {
    entry_of(c)
}

const _: () = assert!(ARENA_START >= ENDBR64.len());
