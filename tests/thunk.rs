//! `callee_save_thunk!`: a Rust function behind a thunk changes no register but RAX, as the
//! callee-save convention promises to every call site.

use std::sync::atomic::{AtomicU64, Ordering};

static SEEN: AtomicU64 = AtomicU64::new(0);

/// An ordinary C-ABI function, free to use every caller-saved register, and made to: it
/// writes garbage into each of them (RCX, RDX, RSI, RDI, R8–R11, declared as clobbers, so the
/// compiler keeps `arg` elsewhere), so that a thunk that forgets to save any one of them shows.
extern "C" fn busy(arg: u64) -> u64 {
    SEEN.store(arg, Ordering::Relaxed);
    // SAFETY: writes only the registers it declares as clobbered; no memory, no stack.
    unsafe {
        core::arch::asm!(
            "mov rcx, {g}",
            "mov rdx, {g}",
            "mov rsi, {g}",
            "mov rdi, {g}",
            "mov r8, {g}",
            "mov r9, {g}",
            "mov r10, {g}",
            "mov r11, {g}",
            g = const 0xdead_beef_dead_beef_u64 as i64,
            out("rcx") _,
            out("rdx") _,
            out("rsi") _,
            out("rdi") _,
            out("r8") _,
            out("r9") _,
            out("r10") _,
            out("r11") _,
            options(nomem, nostack, preserves_flags),
        )
    };
    arg + 1
}

pvops::callee_save_thunk!(
    /// `busy` behind a callee-save thunk.
    fn busy_thunk(arg: u64) -> u64 => busy
);

#[test]
fn thunk_preserves_every_register_but_rax() {
    // SAFETY: the thunk has the callee-save convention (argument in RDI) and `busy`'s
    // contract is only to be called.
    let (rax, [rcx, rdx, rsi, rdi, r8, r9, r10, r11]) =
        unsafe { pvops_host_tests::call_callee_save(busy_thunk.get() as usize, 41) };
    assert_eq!(rax, 42, "result in RAX");
    assert_eq!(SEEN.load(Ordering::Relaxed), 41, "argument passed in RDI");
    assert_eq!(rdi, 41, "RDI preserved");
    assert_eq!(
        [rcx, rdx, rsi, r8, r9, r10, r11],
        [0, 1, 2, 4, 5, 6, 7].map(|i| pvops_host_tests::SENTINELS[i])
    );
}
