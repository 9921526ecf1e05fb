//! Site records and text from outside (what a linker or a corrupt module hands the patch
//! engine): random `SiteRecord`s through `SiteTable::from_bounds` and `Patcher::new`, then
//! `plan`, `apply`, `verify` and `revert` on an in-memory text whose sites hold their original
//! bytes or not.
//!
//! Checks:
//! - `Patcher::new` refuses exactly the first record that does not resolve (unknown op, wrong
//!   length, stray clobber bits) or that overlaps a later valid one, naming its index, and
//!   accepts every other set; `span` covers every valid site;
//! - `plan` counts every site once; each site's original bytes are the indirect call to its
//!   slot (`ff 15 <rel32>`, NOP-padded), and its patched bytes are the backend's inline bytes
//!   (only where they fit and clobber nothing the site does not allow, NOP-padded), else a
//!   direct `call rel32` that lands on the slot's function, else the original bytes (only
//!   where the function is out of `rel32` reach);
//! - `apply` succeeds exactly when every site holds its original bytes; a refused apply names
//!   the first site that does not, with what it found and expected, and writes nothing; an
//!   accepted one writes only inside sites, leaves every site holding its patched bytes
//!   (`verify(patched)` agrees), is refused a second time unless it changed nothing, and
//!   `revert` puts back the exact original text.
#![no_main]

use std::cell::UnsafeCell;

use libfuzzer_sys::arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use pvops::ops::{BackendOps, Clobbers, Op, INDIRECT_CALL_LEN};
use pvops::patch::{fill_nops, Action, PatchError, Patcher, ReadText, Text};
use pvops::site::{BadRecord, Site, SiteRecord, SiteTable};

/// The next value of the input (the default once it runs out).
fn take<'a, T: Arbitrary<'a> + Default>(u: &mut Unstructured<'a>) -> T {
    u.arbitrary().unwrap_or_default()
}

const MAX_RECORDS: usize = 48;
/// Sites lie at offsets below this (plus a little: some straddle the text's end).
const TEXT_LEN: usize = 2048;
/// What the text reads as outside its bounds: never the start of an indirect call.
const OUTSIDE: u8 = 0xcc;

/// The records, in a static (in the image, like a real `pvops_sites` section: within `rel32`
/// reach of the backend's functions, so the direct-call path is taken) rather than on the heap.
struct Records(UnsafeCell<[SiteRecord; MAX_RECORDS]>);

// SAFETY: the fuzzer runs one input at a time on one thread; the records are written only
// before a `SiteTable` over them is made, and not while one is alive.
unsafe impl Sync for Records {}

static RECORDS: Records = Records(UnsafeCell::new(
    [SiteRecord {
        rel: 0,
        op: 0,
        len: 0,
        clobbers: 0,
    }; MAX_RECORDS],
));

/// An in-memory text at `base`, every write logged.
struct FakeText {
    base: usize,
    bytes: Vec<u8>,
    writes: Vec<(usize, usize)>,
}

impl FakeText {
    fn at(&self, addr: usize) -> Option<usize> {
        addr.checked_sub(self.base)
            .filter(|&i| i < self.bytes.len())
    }
    fn get(&self, addr: usize, len: usize) -> Vec<u8> {
        let mut out = vec![0; len];
        self.read(addr, &mut out);
        out
    }
}

impl ReadText for FakeText {
    fn read(&self, addr: usize, out: &mut [u8]) {
        for (i, b) in out.iter_mut().enumerate() {
            *b = self.at(addr + i).map_or(OUTSIDE, |j| self.bytes[j]);
        }
    }
}

impl Text for FakeText {
    unsafe fn write(&mut self, addr: usize, bytes: &[u8]) {
        let start = self.at(addr).expect("a write inside the text");
        assert!(
            start + bytes.len() <= self.bytes.len(),
            "a write past the text's end"
        );
        self.bytes[start..start + bytes.len()].copy_from_slice(bytes);
        self.writes.push((addr, bytes.len()));
    }
}

/// The record's verdict by the rules of `SiteRecord`.
fn resolve(r: &SiteRecord, at: usize) -> Result<Site, BadRecord> {
    let op = *Op::ALL
        .get(usize::from(r.op))
        .ok_or(BadRecord::UnknownOp(r.op))?;
    if r.len != op.site_len() {
        return Err(BadRecord::Length { op, len: r.len });
    }
    if r.clobbers & !Clobbers::all().bits() != 0 {
        return Err(BadRecord::Clobbers(r.clobbers));
    }
    Ok(Site {
        addr: at.wrapping_add_signed(r.rel as isize),
        op,
        len: r.len,
        clobbers: Clobbers::from_bits_truncate(r.clobbers),
    })
}

fn overlap(a: &Site, b: &Site) -> bool {
    a.addr < b.addr + usize::from(b.len) && b.addr < a.addr + usize::from(a.len)
}

/// What `Patcher::new` must say: the first record that is invalid or overlaps a later valid one.
fn expected_new(resolved: &[Result<Site, BadRecord>]) -> Result<(), PatchError> {
    for (index, r) in resolved.iter().enumerate() {
        let site = r.map_err(|why| PatchError::BadRecord { index, why })?;
        for (other, o) in resolved.iter().enumerate().skip(index + 1) {
            if matches!(o, Ok(o) if overlap(&site, o)) {
                return Err(PatchError::Overlap {
                    first: index,
                    second: other,
                });
            }
        }
    }
    Ok(())
}

fn rel32(from: usize, to: usize) -> Option<i32> {
    i32::try_from((to as isize).wrapping_sub(from as isize)).ok()
}

/// The patched bytes of `site`, checked against the rule in the module docs.
fn check_patched(p: &Patcher<'_>, ops: &BackendOps, site: &Site) {
    let (action, bytes) = p.patched(site);
    let b = bytes.as_slice();
    let orig = p.original(site);
    assert_eq!(b.len(), usize::from(site.len));
    let fits = ops
        .inline(site.op)
        .filter(|i| i.bytes.len() <= b.len() && site.clobbers.contains(i.clobbers));
    let reach = rel32(site.addr + 5, ops.target(site.op));
    let mut pad = vec![0u8; b.len()];
    match action {
        Action::Inline => {
            let i = fits.expect("inline only where the bytes fit and clobber nothing more");
            assert_eq!(&b[..i.bytes.len()], i.bytes);
            fill_nops(&mut pad[i.bytes.len()..]);
            assert_eq!(&b[i.bytes.len()..], &pad[i.bytes.len()..]);
        }
        Action::DirectCall => {
            assert!(fits.is_none(), "a direct call where inline bytes fit");
            assert_eq!(b[0], 0xe8);
            let rel = i32::from_le_bytes([b[1], b[2], b[3], b[4]]);
            assert_eq!(Some(rel), reach, "the call lands on the slot's function");
            fill_nops(&mut pad[5..]);
            assert_eq!(&b[5..], &pad[5..]);
        }
        Action::Indirect => {
            assert!(
                fits.is_none() && reach.is_none(),
                "left indirect though patchable"
            );
            assert_eq!(bytes, orig);
        }
    }
}

fn check_original(p: &Patcher<'_>, table_addr: usize, site: &Site) {
    let orig = p.original(site);
    let o = orig.as_slice();
    let n = usize::from(INDIRECT_CALL_LEN);
    assert_eq!(o.len(), usize::from(site.len));
    assert_eq!(&o[..2], &[0xff, 0x15]);
    let rel = i32::from_le_bytes([o[2], o[3], o[4], o[5]]);
    let slot = table_addr + site.op.slot();
    assert_eq!(
        (site.addr + n).wrapping_add_signed(rel as isize) as u32,
        slot as u32,
        "the indirect call goes through the op's slot"
    );
    assert!(o[n..].iter().all(|&b| b == 0x90));
}

fn run(u: &mut Unstructured<'_>) {
    let n = usize::from(take::<u8>(u)) % (MAX_RECORDS + 1);
    let records = RECORDS.0.get().cast::<SiteRecord>();
    // far: past `rel32` reach of the backend's functions (every site stays indirect)
    let far = take::<u8>(u).is_multiple_of(8);
    let base = records as usize + if far { 0x7ff0_0000 } else { 0x10_0000 };
    for i in 0..n {
        let flags: u8 = take(u);
        let op = Op::ALL[usize::from(take::<u8>(u)) % Op::ALL.len()];
        let offset = usize::from(take::<u16>(u)) % (TEXT_LEN + 32);
        let rec = SiteRecord {
            rel: 0,
            op: if flags & 1 != 0 { take(u) } else { op as u8 },
            len: if flags & 2 != 0 {
                take(u)
            } else {
                op.site_len()
            },
            clobbers: if flags & 4 != 0 {
                take(u)
            } else {
                Clobbers::from_bits_truncate(take(u)).bits()
            },
        };
        // SAFETY: `i < MAX_RECORDS`; no `SiteTable` over the records is alive (single thread,
        // the last one was dropped with the last input).
        unsafe {
            let r = records.add(i);
            let at = core::ptr::addr_of!((*r).rel) as usize;
            r.write(SiteRecord {
                rel: (base + offset).wrapping_sub(at) as i32,
                ..rec
            });
        }
    }
    // SAFETY: the first `n` records of a static array, initialised above and not written while
    // the table is in use (below, within this input).
    let sites = unsafe { SiteTable::from_bounds(records, records.add(n)) };
    // SAFETY: as above; the same records, read only.
    let recs = unsafe { core::slice::from_raw_parts(records, n) };
    let resolved: Vec<_> = recs
        .iter()
        .map(|r| resolve(r, core::ptr::addr_of!(r.rel) as usize))
        .collect();
    assert_eq!(sites.iter().collect::<Vec<_>>(), resolved);
    let valid: Vec<Site> = resolved.iter().flatten().copied().collect();
    let span = valid.iter().fold(None, |acc: Option<(usize, usize)>, s| {
        let (lo, hi) = acc.unwrap_or((usize::MAX, 0));
        Some((lo.min(s.addr), hi.max(s.addr + usize::from(s.len))))
    });
    assert_eq!(sites.span(), span);

    // the backend: native, every inline replacement withheld, or some of them
    let mut ops = pvops_backends::native::OPS;
    match take::<u8>(u) % 3 {
        0 => {}
        1 => ops = ops.calls_only(),
        _ => {
            let mask: u64 = take(u);
            for (i, &op) in Op::ALL.iter().enumerate() {
                if mask >> (i % 64) & 1 != 0 {
                    // SAFETY: the op's own native function, with no inline bytes: the
                    // contract of `set_raw` (native code for this op, that stays in place).
                    unsafe { ops.set_raw(op, ops.target(op), None) };
                }
            }
        }
    }
    let table_addr = pvops::PV_OPS
        .addr()
        .wrapping_add_signed(take::<i32>(u) as isize);

    let patcher = Patcher::new(sites, table_addr, &ops);
    assert_eq!(
        patcher.as_ref().map(|_| ()).map_err(|e| *e),
        expected_new(&resolved)
    );
    let patcher = match patcher {
        Ok(p) => p,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    assert!(patcher.sites().eq(valid.iter().copied()));
    assert_eq!(patcher.span(), span);
    let plan = patcher.plan();
    assert_eq!(plan.total, n);
    assert_eq!(plan.inline + plan.direct + plan.indirect, n);
    for site in &valid {
        check_original(&patcher, table_addr, site);
        check_patched(&patcher, &ops, site);
    }

    // A `Text` must hold every site (its contract: `Patcher::span`); the engine cannot see
    // where a text ends, so a site running past it proves nothing (its bytes read outside the
    // text may even match by chance, as the fuzzer found).
    if span.is_some_and(|(_, hi)| hi > base + TEXT_LEN) {
        return;
    }

    // the text: a filler byte, each site's original bytes unless left out, then a few bytes
    // changed anywhere
    let mut text = FakeText {
        base,
        bytes: vec![take::<u8>(u); TEXT_LEN],
        writes: Vec::new(),
    };
    for site in &valid {
        if !take::<u8>(u).is_multiple_of(8) {
            for (k, &b) in patcher.original(site).as_slice().iter().enumerate() {
                if let Some(j) = text.at(site.addr + k) {
                    text.bytes[j] = b;
                }
            }
        }
    }
    for _ in 0..take::<u8>(u) % 4 {
        let j = usize::from(take::<u16>(u)) % TEXT_LEN;
        text.bytes[j] = take(u);
    }
    let before = text.bytes.clone();
    let first_off = valid
        .iter()
        .enumerate()
        .find(|(_, s)| text.get(s.addr, usize::from(s.len)) != patcher.original(s).as_slice());

    match patcher.apply(&mut text) {
        Ok(report) => {
            assert!(
                first_off.is_none(),
                "applied over a site that is not original"
            );
            assert_eq!(report, plan);
            for &(addr, len) in &text.writes {
                assert!(
                    valid
                        .iter()
                        .any(|s| s.addr == addr && usize::from(s.len) == len),
                    "a write of {len} at {addr:#x} is not a site"
                );
            }
            for site in &valid {
                assert_eq!(
                    text.get(site.addr, usize::from(site.len)),
                    patcher.patched(site).1.as_slice()
                );
            }
            for (j, (&now, &was)) in text.bytes.iter().zip(&before).enumerate() {
                if now != was {
                    let addr = base + j;
                    assert!(valid
                        .iter()
                        .any(|s| s.addr <= addr && addr < s.addr + usize::from(s.len)));
                }
            }
            patcher.verify(&text, true).expect("applied sites verify");

            // a live switch to another backend's set of the same sites (native with every
            // inline withheld, or with them all): straight there and back, byte for byte
            let other_ops = if take::<u8>(u).is_multiple_of(2) {
                pvops_backends::native::OPS.calls_only()
            } else {
                pvops_backends::native::OPS
            };
            let other = Patcher::new(sites, table_addr, &other_ops).expect("same records");
            let applied = text.bytes.clone();
            let writes = text.writes.len();
            other.switch_from(&patcher, &mut text).expect("switch");
            other.verify(&text, true).expect("switched sites verify");
            for &(addr, len) in &text.writes[writes..] {
                assert!(
                    valid
                        .iter()
                        .any(|s| s.addr == addr && usize::from(s.len) == len),
                    "a switch's write of {len} at {addr:#x} is not a site"
                );
            }
            // switching again from the first set is refused (writing nothing) unless the two
            // sets hold the same bytes
            let same = valid.iter().all(|s| patcher.patched(s).1 == other.patched(s).1);
            let writes = text.writes.len();
            match other.switch_from(&patcher, &mut text) {
                Ok(_) => assert!(same, "switched from bytes that are not there"),
                Err(PatchError::Mismatch { .. }) => {
                    assert!(!same);
                    assert_eq!(text.writes.len(), writes, "a refused switch writes nothing");
                }
                Err(e) => panic!("second switch: {e}"),
            }
            patcher.switch_from(&other, &mut text).expect("switch back");
            assert!(text.bytes == applied, "switching back restores every byte");
            let writes = text.writes.len();
            let unchanged = valid
                .iter()
                .all(|s| patcher.patched(s).1 == patcher.original(s));
            match patcher.apply(&mut text) {
                Ok(_) => assert!(unchanged, "applied twice"),
                Err(PatchError::Mismatch { .. }) => {
                    assert!(!unchanged);
                    assert_eq!(text.writes.len(), writes, "a refused apply writes nothing");
                }
                Err(e) => panic!("second apply: {e}"),
            }
            patcher.revert(&mut text).expect("revert");
            assert!(text.bytes == before, "revert restores every byte");
            patcher.verify(&text, false).expect("reverted sites verify");
        }
        Err(PatchError::Mismatch {
            index,
            site,
            found,
            expected,
        }) => {
            let (i, s) = first_off.expect("refused a text whose every site is original");
            assert_eq!((index, site), (i, *s));
            assert_eq!(expected, patcher.original(s));
            assert_eq!(found.as_slice(), text.get(s.addr, usize::from(s.len)));
            assert!(text.writes.is_empty(), "a refused apply writes nothing");
            assert!(text.bytes == before);
            assert!(patcher.verify(&text, false).is_err());
        }
        Err(e) => panic!("apply: {e}"),
    }
}

fuzz_target!(|data: &[u8]| run(&mut Unstructured::new(data)));
