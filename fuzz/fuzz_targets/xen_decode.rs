//! The decoder that finds a Xen PV kernel's `vcpu_info` in two of its own functions, over
//! arbitrary code bytes and addresses: [`gs_rip_target`] and [`vcpu_info_offset`].
//!
//! The input is split into two addresses, an opcode, an instruction length and two code
//! slices. Checks:
//! - `gs_rip_target` answers exactly when the code is `[endbr64] 65 <opcode> 05 <disp32>`, and
//!   then with the RIP-relative target: the instruction's address plus its length plus the
//!   sign-extended displacement (wrapping, as addresses do); bytes after the displacement do
//!   not matter;
//! - `vcpu_info_offset` answers exactly when `irq_disable` decodes as `movb` (c6) and
//!   `save_fl` as `testb` (f6), both 8-byte instructions naming the same byte, which is the
//!   mask byte of a 64-byte-aligned `vcpu_info` below `MAX_PERCPU_OFFSET`; the offset it gives
//!   is that structure's.
#![no_main]

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use pvops_backends::xen::abi::VCPU_INFO_MASK;
use pvops_backends::xen::decode::{gs_rip_target, vcpu_info_offset, MAX_PERCPU_OFFSET};

const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];

/// The target by the definition: where the instruction starts, and its displacement.
fn reference(code: &[u8], addr: u64, opcode: u8, insn_len: u64) -> Option<u64> {
    let (code, at) = match code.strip_prefix(&ENDBR64[..]) {
        Some(rest) => (rest, addr.wrapping_add(4)),
        None => (code, addr),
    };
    let [0x65, op, 0x05, d0, d1, d2, d3, ..] = *code else {
        return None;
    };
    (op == opcode).then(|| {
        let disp = i64::from(i32::from_le_bytes([d0, d1, d2, d3]));
        at.wrapping_add(insn_len).wrapping_add_signed(disp)
    })
}

struct Input<'a> {
    disable: (&'a [u8], u64),
    save_fl: (&'a [u8], u64),
    opcode: u8,
    insn_len: u64,
}

fn input(mut u: Unstructured<'_>) -> Result<Input<'_>> {
    let disable_at = u.arbitrary()?;
    let save_fl_at = u.arbitrary()?;
    let opcode = u.arbitrary()?;
    let insn_len = u.arbitrary()?;
    let split = usize::from(u.arbitrary::<u8>()?);
    let rest = u.take_rest();
    let (a, b) = rest.split_at(split.min(rest.len()));
    Ok(Input {
        disable: (a, disable_at),
        save_fl: (b, save_fl_at),
        opcode,
        insn_len,
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(i) = input(Unstructured::new(data)) else {
        return;
    };
    for (code, addr) in [i.disable, i.save_fl] {
        for (opcode, len) in [(i.opcode, i.insn_len), (0xc6, 8), (0xf6, 8)] {
            let got = gs_rip_target(code, addr, opcode, len);
            assert_eq!(
                got,
                reference(code, addr, opcode, len),
                "{code:02x?} at {addr:#x}"
            );
            // what follows the displacement is not read
            let head = if code.starts_with(&ENDBR64) { 11 } else { 7 };
            if code.len() > head {
                assert_eq!(gs_rip_target(&code[..head], addr, opcode, len), got);
            }
        }
    }

    let a = reference(i.disable.0, i.disable.1, 0xc6, 8);
    let b = reference(i.save_fl.0, i.save_fl.1, 0xf6, 8);
    let want = match (a, b) {
        (Some(a), Some(b)) if a == b => {
            let off = a.wrapping_sub(VCPU_INFO_MASK);
            (off < MAX_PERCPU_OFFSET && off % 64 == 0).then_some(off)
        }
        _ => None,
    };
    assert_eq!(vcpu_info_offset(i.disable, i.save_fl), want);
});
