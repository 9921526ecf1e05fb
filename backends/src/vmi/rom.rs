//! The 64-bit VMI ROM (`VMI-64.md` beside this file): call numbers, the header, the relocation
//! table, validation ([`Rom::parse`]) and the scan of the option-ROM area ([`scan`],
//! [`rom_area`]). Pure parsing of outside input: nothing here runs ROM code.

use core::fmt;

use pvops::ops::Clobbers;

use crate::Platform;

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

impl ProbeError {
    /// A ROM was there and was refused (rather than none found).
    pub fn refused(&self) -> bool {
        matches!(self, ProbeError::Refused { .. })
    }
}
