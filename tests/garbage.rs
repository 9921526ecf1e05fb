//! Outside input nobody planned for: thousands of random and mutated inputs to the parsers that
//! read what a hypervisor, a ROM, a linker or a user hands pvops. Each must end in a verdict (a
//! value or an error), never a panic, and a refused patch set must leave the text as it was.
//!
//! This is a seeded random sweep run on every `cargo test`, not coverage-guided fuzzing: it
//! finds the crashes a few thousand random inputs find, quickly and reproducibly
//! (`PVOPS_GARBAGE_SEED=N` replays another sequence, `PVOPS_GARBAGE_ROUNDS=N` runs longer).

use std::collections::BTreeMap;

use pvops::ops::cpu::CpuidResult;
use pvops::ops::{BackendOps, Clobbers, Op};
use pvops::patch::{PatchError, Patcher, ReadText, Text};
use pvops::site::{SiteRecord, SiteTable};
use pvops::{detect, select, BackendId, Request};
use pvops_backends::vmi::rom::{self, Rom};
use pvops_backends::BACKENDS;
use pvops_host_tests::NoPlatform;

/// The shipped VMI ROM (built by build.rs from backends/vmi-rom).
const ROM: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/vmi.bin"));

/// splitmix64: small, seedable, good enough to spread inputs.
struct Rng(u64);

impl Rng {
    fn from_env() -> Rng {
        let seed = std::env::var("PVOPS_GARBAGE_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x0005_eed0_f9a7_ba9e);
        Rng(seed)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
}

fn rounds(default: usize) -> usize {
    std::env::var("PVOPS_GARBAGE_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Mutated VMI ROMs (flipped bytes, overwritten words in the header and the relocation table,
/// cut or grown images), alone and in an option-ROM area: parsing ends in `Ok` or a `RomError`,
/// and every accessor of an accepted ROM stays inside the image.
#[test]
fn mutated_vmi_roms() {
    let mut rng = Rng::from_env();
    let (mut accepted, mut refused) = (0, 0);
    for _ in 0..rounds(20_000) {
        let mut image = ROM.to_vec();
        for _ in 0..1 + rng.below(4) {
            if image.len() < 2 {
                break;
            }
            match rng.below(4) {
                // a byte anywhere
                0 => {
                    let i = rng.below(image.len());
                    image[i] = rng.next() as u8;
                }
                // a byte in the header, where the offsets and sizes are
                1 => {
                    let i = rng.below(0x100.min(image.len()));
                    image[i] ^= 1 << rng.below(8);
                }
                // a 16-bit word set to an extreme
                2 => {
                    let i = rng.below(image.len() - 1);
                    let v: u16 = [0, 0xffff, 0x8000, 0x7fff, rng.next() as u16][rng.below(5)];
                    image[i..i + 2].copy_from_slice(&v.to_le_bytes());
                }
                // cut off, or grown with garbage
                _ => {
                    if rng.chance(2) {
                        image.truncate(rng.below(image.len() + 1));
                    } else {
                        image.extend((0..rng.below(4096)).map(|_| rng.next() as u8));
                    }
                }
            }
        }
        // most mutations break the checksum; mend it half the time so the sweep gets past it
        let declared = usize::from(image.get(2).copied().unwrap_or(0)) * 512;
        if rng.chance(2) && declared > 0 && declared <= image.len() {
            let sum = image[..declared]
                .iter()
                .fold(0u8, |s, b| s.wrapping_add(*b));
            image[declared - 1] = image[declared - 1].wrapping_sub(sum);
        }
        match Rom::parse(&image) {
            Ok(r) => {
                accepted += 1;
                assert!(r.bytes().len() <= image.len());
                let _ = r.api();
                let _ = r.init();
                for reloc in r.relocs() {
                    assert!(r.body(&reloc).len() <= image.len());
                    let _ = r.reloc(reloc.call);
                }
            }
            Err(_) => refused += 1,
        }
        // the same image where the ROM scan finds it: after a 0x800-byte ROM without "cVmi"
        let mut area = vec![0u8; 0x20000];
        area[..2].copy_from_slice(&[0x55, 0xaa]);
        area[2] = 4;
        let n = image.len().min(area.len() - 0x800);
        area[0x800..0x800 + n].copy_from_slice(&image[..n]);
        let _ = rom::scan(&area, 0xc0000);
    }
    println!("VMI ROMs: {accepted} accepted, {refused} refused");
    assert!(
        refused > 0,
        "no mutation was refused: the sweep tests nothing"
    );
}

/// Random CPUID tables, including hypervisor leaves with random signatures and maximum leaves:
/// detection, every backend's probe and selection finish, and `auto` always selects a backend
/// (native at worst).
#[test]
fn random_cpuid_tables() {
    let mut rng = Rng::from_env();
    let known = [
        *b"KVMKVMKVM\0\0\0",
        *b"XenVMMXenVMM",
        *b"Microsoft Hv",
        *b"TCGTCGTCGTCG",
        *b"VMwareVMware",
        *b"LinuxGuest\0\0",
    ];
    let mut natives = 0;
    for _ in 0..rounds(5_000) {
        let mut leaves = BTreeMap::new();
        let reg = |rng: &mut Rng| CpuidResult {
            eax: rng.next() as u32,
            ebx: rng.next() as u32,
            ecx: rng.next() as u32,
            edx: rng.next() as u32,
        };
        let mut leaf1 = reg(&mut rng);
        if rng.chance(4) {
            leaf1.ecx |= 1 << 31;
        }
        leaves.insert(0, reg(&mut rng));
        leaves.insert(1, leaf1);
        for _ in 0..rng.below(6) {
            let base = 0x4000_0000 + 0x100 * rng.below(0x101) as u32;
            let mut r = reg(&mut rng);
            if rng.chance(2) {
                let sig = known[rng.below(known.len())];
                let w = |i: usize| u32::from_le_bytes(sig[i..i + 4].try_into().unwrap());
                (r.ebx, r.ecx, r.edx) = (w(0), w(4), w(8));
            }
            if rng.chance(2) {
                r.eax = base + rng.below(0x100) as u32;
            }
            leaves.insert(base, r);
            for l in 1..rng.below(0x20) as u32 {
                leaves.insert(base + l, reg(&mut rng));
            }
        }
        let cpu = |leaf: u32, _sub: u32| leaves.get(&leaf).copied().unwrap_or_default();
        let d = detect(&cpu);
        let candidates = pvops_backends::probe(&d, &NoPlatform).candidates();
        let s = select(Request::Auto, &d, &candidates).expect("auto always selects");
        natives += usize::from(s.backend == BackendId::NATIVE);
        for id in BACKENDS {
            let _ = select(Request::Backend(id), &d, &candidates);
        }
    }
    println!("CPUID tables: native selected on {natives}");
}

/// Random `backend=` values (and sysfs writes): only `auto`, the empty string and a known name
/// (surrounding whitespace ignored) are accepted; everything else is `UnknownBackend`.
#[test]
fn random_backend_names() {
    let mut rng = Rng::from_env();
    let known = BACKENDS;
    let names: Vec<&str> = known.iter().map(|id| id.name()).collect();
    let alphabet = b"autonativekvmxenvmilguest AUTO\n\t-_=,.\0\xc3\xa9";
    for _ in 0..rounds(20_000) {
        let mut s: Vec<u8> = Vec::new();
        if rng.chance(2) {
            s.extend_from_slice(names[rng.below(names.len())].as_bytes());
        }
        let extra = if rng.chance(50) { 5000 } else { 8 };
        for _ in 0..rng.below(extra) {
            let b = alphabet[rng.below(alphabet.len())];
            if rng.chance(2) {
                s.push(b);
            } else {
                s.insert(0, b);
            }
        }
        let s = String::from_utf8_lossy(&s).into_owned();
        let want = match s.trim() {
            "" | "auto" => Some(Request::Auto),
            t => known
                .iter()
                .find(|id| id.name() == t)
                .map(|id| Request::Backend(*id)),
        };
        assert_eq!(Request::parse(&s, &known).ok(), want, "{s:?}");
    }
}

/// A text at `base`, with its writes counted.
struct FakeText {
    base: usize,
    bytes: Vec<u8>,
    writes: usize,
}

impl ReadText for FakeText {
    fn read(&self, addr: usize, out: &mut [u8]) {
        let at = addr - self.base;
        out.copy_from_slice(&self.bytes[at..at + out.len()]);
    }
}

impl Text for FakeText {
    unsafe fn write(&mut self, addr: usize, bytes: &[u8]) {
        let at = addr - self.base;
        self.bytes[at..at + bytes.len()].copy_from_slice(bytes);
        self.writes += 1;
    }
}

static NATIVE_OPS: BackendOps = pvops_backends::native::OPS;

/// Random site records (unknown ops, wrong lengths, stray clobber bits, overlaps) over a text
/// whose sites hold their expected bytes or not: the patch set is refused with the record's
/// index, or applied all-or-nothing — a refused apply writes no byte, an accepted one reverts to
/// the exact original text.
#[test]
fn random_site_records() {
    let mut rng = Rng::from_env();
    let (mut refused_records, mut refused_bytes, mut applied) = (0, 0, 0);
    for _ in 0..rounds(3_000) {
        let n = rng.below(24);
        // records live in a leaked array; the sites they point at, in a 4 KiB text after it
        let records: &'static mut [SiteRecord] = Vec::leak(vec![
            SiteRecord {
                rel: 0,
                op: 0,
                len: 0,
                clobbers: 0
            };
            n
        ]);
        let text_len = 4096;
        let base = records.as_ptr() as usize + 0x10_0000;
        let mut text = FakeText {
            base,
            bytes: (0..text_len).map(|_| rng.next() as u8).collect(),
            writes: 0,
        };
        for (i, r) in records.iter_mut().enumerate() {
            let op = Op::ALL[rng.below(Op::ALL.len())];
            let offset = 32 * i + if rng.chance(20) { rng.below(40) } else { 0 };
            let at = std::ptr::addr_of!(r.rel) as usize;
            *r = SiteRecord {
                rel: (base + offset.min(text_len - 32)) as i32 - at as i32,
                op: if rng.chance(40) {
                    rng.next() as u8
                } else {
                    op as u8
                },
                len: if rng.chance(40) {
                    rng.next() as u8
                } else {
                    op.site_len()
                },
                clobbers: if rng.chance(40) {
                    rng.next() as u16
                } else {
                    Clobbers::from_bits_truncate(rng.next() as u16).bits()
                },
            };
        }
        let range = records.as_ptr_range();
        // SAFETY: the bounds of one leaked, initialised array of records, live for 'static.
        let sites = unsafe { SiteTable::from_bounds(range.start, range.end) };
        let patcher = match Patcher::new(sites, 0x1000, &NATIVE_OPS) {
            Ok(p) => p,
            Err(PatchError::BadRecord { index, .. } | PatchError::Overlap { first: index, .. }) => {
                assert!(index < n);
                refused_records += 1;
                continue;
            }
            Err(e) => panic!("new: {e}"),
        };
        let plan = patcher.plan();
        assert_eq!(plan.total, n);
        // most sites hold what the engine expects, now and then one does not
        let all_expected = !rng.chance(3);
        for (i, site) in patcher.sites().enumerate() {
            if all_expected || i % 2 == 0 {
                let at = site.addr - base;
                let orig = patcher.original(&site);
                text.bytes[at..at + orig.as_slice().len()].copy_from_slice(orig.as_slice());
            }
        }
        let before = text.bytes.clone();
        match patcher.apply(&mut text) {
            Ok(report) => {
                applied += 1;
                assert_eq!(report.total, n);
                patcher.verify(&text, true).expect("applied sites verify");
                patcher.revert(&mut text).expect("revert");
                assert!(text.bytes == before, "revert restores every byte");
            }
            Err(PatchError::Mismatch { index, .. }) => {
                refused_bytes += 1;
                assert!(index < n);
                assert_eq!(text.writes, 0, "a refused patch set writes nothing");
                assert!(text.bytes == before);
            }
            Err(e) => panic!("apply: {e}"),
        }
    }
    println!(
        "site records: {refused_records} sets refused at a record, {refused_bytes} at the text, \
         {applied} applied and reverted"
    );
    assert!(refused_records > 0 && refused_bytes > 0 && applied > 0);
}

/// pvclock arithmetic on any multiplier and shift a record can carry: no overflow panic, and a
/// zero multiplier means no clock.
#[test]
fn random_pvclock_scales() {
    use pvops_backends::pvclock::{scale_delta, tsc_khz};
    let mut rng = Rng::from_env();
    for _ in 0..rounds(100_000) {
        let (delta, mul, shift) = (rng.next(), rng.next() as u32, rng.next() as i8);
        let _ = scale_delta(delta, mul, shift);
        let khz = tsc_khz(mul, shift);
        if mul == 0 {
            assert_eq!(khz, 0, "a zero multiplier is no clock");
        }
        assert_eq!(scale_delta(delta, 0, shift), 0);
    }
}
