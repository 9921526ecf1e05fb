//! Locating the kernel's per-CPU `vcpu_info` from its own PV irq code: a pure decoder of a few
//! bytes of kernel text (outside input to the backend), kept apart so that it can be tested and
//! fuzzed on its own.

use super::abi::VCPU_INFO_MASK;

/// Decode the `%gs`-relative address one instruction of the kernel's PV irq code touches:
/// `[endbr64] 65 <op> 05 <disp32> ...` at `addr`, where `op` is `opcode` (c6 for `movb $imm`, f6
/// for `testb $imm`), and the effective address is RIP-relative (the per-CPU symbol's offset).
/// `insn_len` is the whole instruction's length (the immediate follows the displacement).
pub fn gs_rip_target(code: &[u8], addr: u64, opcode: u8, insn_len: u64) -> Option<u64> {
    let (code, addr) = match code {
        [0xf3, 0x0f, 0x1e, 0xfa, rest @ ..] => (rest, addr.wrapping_add(4)),
        _ => (code, addr),
    };
    match code {
        [0x65, op, 0x05, d0, d1, d2, d3, ..] if *op == opcode => {
            let disp = i32::from_le_bytes([*d0, *d1, *d2, *d3]);
            Some(addr.wrapping_add(insn_len).wrapping_add(disp as i64 as u64))
        }
        _ => None,
    }
}

/// The largest per-CPU offset accepted (per-CPU sections are far smaller).
pub const MAX_PERCPU_OFFSET: u64 = 1 << 24;

/// The per-CPU offset of the kernel's `vcpu_info`, from the first instruction of its PV
/// `irq_disable` (`movb $1, %gs:vcpu_info+1(%rip)`, 8 bytes) and of its `save_fl`
/// (`testb $0xff, %gs:vcpu_info+1(%rip)`, 8 bytes): both must name the same mask byte.
pub fn vcpu_info_offset(disable: (&[u8], u64), save_fl: (&[u8], u64)) -> Option<u64> {
    let a = gs_rip_target(disable.0, disable.1, 0xc6, 8)?;
    let b = gs_rip_target(save_fl.0, save_fl.1, 0xf6, 8)?;
    let offset = a.wrapping_sub(VCPU_INFO_MASK);
    (a == b && offset < MAX_PERCPU_OFFSET && offset % 64 == 0).then_some(offset)
}
