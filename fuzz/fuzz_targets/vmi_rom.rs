//! VMI ROM images from outside: [`Rom::parse`] over the input, then [`rom::scan`] over an
//! option-ROM area holding it. The input's first byte says whether to mend the image's checksum
//! first (bit 0), so that mutations get past it; the rest is the image.
//!
//! Checks that parsing ends in a verdict, never a panic, and that an accepted ROM keeps what
//! `parse` promises:
//! - its bytes are the input's first `rom_length × 512` bytes, starting `55 AA`, carrying
//!   "cVmi", API 3.x with x ≥ 1, and summing to 0;
//! - `api`, `init`, `relocs`, `body` and `reloc` stay inside those bytes: every CALL/JUMP body
//!   and the VMI_Init body lie past the header and within [`MAX_BODY`], other entries have no
//!   body, call numbers are below API 3.0's count and unique, and `reloc(call)` finds exactly
//!   the entry `relocs` lists (and nothing for a call the table lacks);
//! - every entry the header counts is listed;
//! - the verdict depends only on those bytes (parsing them alone gives the same ROM);
//! - `NotOptionRom` is given exactly when the input does not start `55 AA`.
//!
//! The scan is checked against its definition: it validates the first 2 KiB boundary holding
//! both signatures (skipping option ROMs without "cVmi") and reports what `parse` says there,
//! or `NotFound` when no boundary holds both.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pvops_backends::vmi::rom::{
    self, call, ProbeError, RelocType, Rom, HEADER_LEN, MAX_BODY, ROM_STEP, VROM_SIGNATURE,
};

/// The size of the real option-ROM area (0xC0000..0xE0000).
const AREA_LEN: usize = 0x2_0000;
/// Where the area starts, physically.
const AREA_BASE: u64 = 0xC_0000;

/// Whether `inner` lies inside `outer` (same allocation, by address).
fn within(outer: &[u8], inner: &[u8]) -> bool {
    let o = outer.as_ptr_range();
    let i = inner.as_ptr_range();
    inner.is_empty() || (o.start <= i.start && i.end <= o.end)
}

/// The offset of `inner` in `outer` (which holds it).
fn offset_in(outer: &[u8], inner: &[u8]) -> usize {
    inner.as_ptr() as usize - outer.as_ptr() as usize
}

fn check_accepted(image: &[u8], r: &Rom<'_>) {
    let declared = usize::from(image[2]) * 512;
    let bytes = r.bytes();
    assert_eq!(bytes.len(), declared, "a ROM is its declared length");
    assert_eq!(
        bytes.as_ptr(),
        image.as_ptr(),
        "a ROM starts at the image's first byte"
    );
    assert!(bytes.len() >= HEADER_LEN);
    assert_eq!(&bytes[..2], &[0x55, 0xaa]);
    assert_eq!(&bytes[8..12], &VROM_SIGNATURE[..]);
    assert_eq!(
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b)),
        0,
        "checksum"
    );
    let (major, minor) = r.api();
    assert!(major == 3 && minor >= 1, "API {major}.{minor} accepted");

    let init = r.init();
    assert!(within(bytes, init), "VMI_Init inside the ROM");
    assert!(init.len() <= MAX_BODY);
    if !init.is_empty() {
        assert!(
            offset_in(bytes, init) >= HEADER_LEN,
            "VMI_Init past the header"
        );
    }

    // every entry the header counts is listed (none dropped as invalid after acceptance)
    let count = u16::from_le_bytes([bytes[0x82], bytes[0x83]]);
    assert_eq!(r.relocs().count(), usize::from(count));
    let mut seen = [false; call::COUNT];
    for reloc in r.relocs() {
        let n = usize::from(reloc.call);
        assert!(n < call::COUNT, "call {n} beyond API 3.0's");
        assert!(!seen[n], "call {n} listed twice");
        seen[n] = true;
        let body = r.body(&reloc);
        assert!(within(bytes, body), "body of call {n} inside the ROM");
        match reloc.kind {
            RelocType::Call | RelocType::Jump => {
                assert_eq!(body.len(), usize::from(reloc.len));
                assert!(body.len() <= MAX_BODY);
                assert!(reloc.offset as usize >= HEADER_LEN);
                if !body.is_empty() {
                    assert_eq!(offset_in(bytes, body), reloc.offset as usize);
                }
            }
            RelocType::None | RelocType::Nop => assert!(body.is_empty()),
        }
        assert_eq!(
            r.reloc(reloc.call),
            Some(reloc),
            "reloc({n}) is the listed entry"
        );
    }
    for n in 0..=u16::try_from(call::COUNT).unwrap() {
        if !seen.get(usize::from(n)).copied().unwrap_or(false) {
            assert_eq!(r.reloc(n), None, "call {n} is not in the table");
        }
    }
    // the verdict is the ROM's own: its bytes alone parse to the same ROM
    let again = Rom::parse(bytes).expect("a ROM's own bytes parse");
    assert_eq!(again.bytes(), bytes);
}

fn check_scan(area: &[u8]) {
    let want = (0..area.len())
        .step_by(ROM_STEP)
        .find(|&off| {
            let image = &area[off..];
            image.get(..2) == Some(&[0x55, 0xaa][..])
                && image.get(8..12) == Some(&VROM_SIGNATURE[..])
        })
        .map(|off| (off, Rom::parse(&area[off..])));
    match (rom::scan(area, AREA_BASE), want) {
        (Ok((pa, r)), Some((off, Ok(p)))) => {
            assert_eq!(pa, AREA_BASE + off as u64);
            assert_eq!(r.bytes().as_ptr(), p.bytes().as_ptr());
            assert_eq!(r.bytes().len(), p.bytes().len());
        }
        (Err(ProbeError::Refused { pa, why }), Some((off, Err(e)))) => {
            assert_eq!(pa, AREA_BASE + off as u64);
            assert_eq!(why, e);
        }
        (Err(ProbeError::NotFound), None) => {}
        (got, want) => panic!(
            "scan gave {:?}, the first candidate is {:?}",
            got.map(|(pa, _)| pa),
            want.map(|(off, r)| (off, r.map(|_| ())))
        ),
    }
}

fuzz_target!(|data: &[u8]| {
    // The first byte says whether to mend the checksum (most mutations break it, and the fuzzer
    // cannot solve a sum by itself: mended, it gets to the license, PCI and relocation checks);
    // the rest is the image.
    let Some((&mend, image)) = data.split_first() else {
        return;
    };
    let mut image = image.to_vec();
    let declared = usize::from(image.get(2).copied().unwrap_or(0)) * 512;
    if mend & 1 != 0 && declared > 0 && declared <= image.len() {
        let sum = image[..declared]
            .iter()
            .fold(0u8, |s, b| s.wrapping_add(*b));
        image[declared - 1] = image[declared - 1].wrapping_sub(sum);
    }
    let image = &image[..];

    match Rom::parse(image) {
        Ok(r) => check_accepted(image, &r),
        Err(e) => {
            assert_eq!(
                e == rom::RomError::NotOptionRom,
                image.get(..2) != Some(&[0x55, 0xaa][..]),
                "{e:?}"
            );
            let _ = e.to_string();
        }
    }

    // The image in an option-ROM area, after a 2 KiB option ROM without "cVmi" (a VGA BIOS);
    // whatever does not fit is cut off.
    let mut area = vec![0u8; AREA_LEN];
    area[..3].copy_from_slice(&[0x55, 0xaa, 4]);
    let n = image.len().min(AREA_LEN - ROM_STEP);
    area[ROM_STEP..ROM_STEP + n].copy_from_slice(&image[..n]);
    check_scan(&area);
});
