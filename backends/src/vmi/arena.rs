//! The code arena: executable memory in this image's own `.text` that holds copies of the ROM's
//! routines, each framed as a function (`endbr64`, the body byte for byte, this image's own
//! return). ROM memory itself is never executed (the direct map is NX, and Linux 6.12 exports
//! no way to make fresh memory executable); the arena is written through
//! [`Platform::write_code`], the same text alias the call sites are patched through.
//!
//! A layout is assembled in a staging buffer ([`Layout`]), written in one go ([`Layout::write`])
//! and wiped back to `int3` at teardown ([`wipe`]). Only the backend's start and stop use it,
//! and they are exclusive (the backend's contract).

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicUsize, Ordering};

use crate::Platform;

/// Size of the arena in this image's text.
pub const ARENA_LEN: usize = 2048;
/// The arena's first bytes (its own `endbr64`, then `int3`) are never rewritten.
pub const ARENA_START: usize = 16;
/// The first instruction of every function laid out in the arena.
pub const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];
const INT3: u8 = 0xcc;

/// Executable memory for copies of ROM routines, in `.text`: `endbr64`, then `int3` until a
/// layout is written into it (and again after [`wipe`]). Never called as itself.
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
/// every return site): the arena's functions end with a copy of it, read when laid out.
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

/// Whether functions in the arena return through the kernel's return thunk (else `ret`).
pub fn returns_by_thunk() -> bool {
    return_sequence(0).1 != 1
}

/// The address of a naked function of this file, opaque to the optimiser: an address
/// constant-folded to `function + n` would be a relocation into the middle of a function,
/// which objtool flags under IBT ("relocation to !ENDBR").
fn fn_addr(f: unsafe extern "C" fn()) -> usize {
    core::hint::black_box(f as *const () as usize)
}

/// The arena's address.
pub fn base() -> usize {
    fn_addr(arena)
}

/// Bytes of the arena in use (written by the last layout and not wiped yet).
static USED: AtomicUsize = AtomicUsize::new(0);

/// The arena's contents, assembled before being written in one go.
struct Staging(UnsafeCell<[u8; ARENA_LEN]>);
// SAFETY: only a `Layout` touches it, and layouts are made by the backend's start, which is
// exclusive with itself and with stop (the backend's contract).
unsafe impl Sync for Staging {}
static STAGING: Staging = Staging(UnsafeCell::new([INT3; ARENA_LEN]));

/// The routines do not fit the arena.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArenaFull;

/// Functions being laid out in the staging buffer, as they will sit in the arena.
pub struct Layout {
    stage: &'static mut [u8; ARENA_LEN],
    pos: usize,
    base: usize,
}

impl Layout {
    /// Start a layout.
    ///
    /// # Safety
    ///
    /// No other `Layout` exists, and nothing calls into the arena while this one is written
    /// (the backend's start and stop are exclusive, and its ops are not installed).
    pub unsafe fn new() -> Layout {
        // SAFETY: exclusive (the caller's contract).
        let stage = unsafe { &mut *STAGING.0.get() };
        stage.fill(INT3);
        Layout {
            stage,
            pos: ARENA_START,
            base: base(),
        }
    }

    /// Frame `body` as a function (endbr64, body, return) at the next 16-byte boundary;
    /// returns the address it will have in the arena.
    pub fn place(&mut self, body: &[u8]) -> Result<usize, ArenaFull> {
        let at = self.pos;
        let (ret, ret_len) = return_sequence(self.base + at + ENDBR64.len() + body.len());
        let end = at + ENDBR64.len() + body.len() + ret_len;
        let slot = self.stage.get_mut(at..end).ok_or(ArenaFull)?;
        for (d, s) in slot
            .iter_mut()
            .zip(ENDBR64.iter().chain(body).chain(ret.iter().take(ret_len)))
        {
            *d = *s;
        }
        self.pos = (end + 15) & !15;
        Ok(self.base + at)
    }

    /// Bytes laid out so far (from the arena's start).
    pub fn used(&self) -> usize {
        self.pos
    }

    /// Write the layout into the arena; `false`: the platform cannot write this image's text
    /// (nothing was written).
    pub fn write(self, platform: &dyn Platform) -> bool {
        let ok = platform.write_code(self.base + ARENA_START, &self.stage[ARENA_START..self.pos]);
        if ok {
            USED.store(self.pos, Ordering::Relaxed);
        }
        ok
    }
}

/// Write the arena back to `int3` (after its `endbr64`); `false`: the text could not be
/// written. Same exclusion as [`Layout::new`].
pub fn wipe(platform: &dyn Platform) -> bool {
    const FILL: [u8; 256] = [INT3; 256];
    let base = base();
    let used = USED.load(Ordering::Relaxed).min(ARENA_LEN);
    let mut at = ARENA_START;
    while at < used {
        let n = (used - at).min(FILL.len());
        if !platform.write_code(base + at, &FILL[..n]) {
            return false;
        }
        at += n;
    }
    USED.store(0, Ordering::Relaxed);
    true
}

/// Bytes of the arena in use.
pub fn used() -> usize {
    USED.load(Ordering::Relaxed)
}

const _: () = assert!(ARENA_START >= ENDBR64.len());
