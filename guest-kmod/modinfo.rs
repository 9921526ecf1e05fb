// SPDX-License-Identifier: GPL-2.0

//! The module's `modinfo` entries that name the backends, written at compile time from the
//! backend registry ([`pvops_backends::BACKENDS`]), so that no list of names is kept by hand:
//! `parm=backend:…` (the parameter's description, as `MODULE_PARM_DESC` would write it) and
//! `backends=native kvm …`, which `modinfo -F backends pvops_guest.ko` prints and the rigs read.

use pvops::BackendId;
use pvops_backends::BACKENDS;

/// The backend names, separated by `sep`, after `prefix`, then `end` bytes of NUL (1 for a
/// `.modinfo` entry). `N` must be [`entry_len`] of the same arguments.
const fn entry<const N: usize>(
    prefix: &[u8],
    sep: &[u8],
    names: &[BackendId],
    end: usize,
) -> [u8; N] {
    let mut out = [0u8; N];
    let mut at = 0;
    let mut i = 0;
    while i < prefix.len() {
        out[at] = prefix[i];
        at += 1;
        i += 1;
    }
    let mut n = 0;
    while n < names.len() {
        if n > 0 {
            let mut j = 0;
            while j < sep.len() {
                out[at] = sep[j];
                at += 1;
                j += 1;
            }
        }
        let name = names[n].name().as_bytes();
        let mut j = 0;
        while j < name.len() {
            out[at] = name[j];
            at += 1;
            j += 1;
        }
        n += 1;
    }
    assert!(at + end == N, "entry_len and entry disagree");
    out
}

/// The length of [`entry`]'s result, the terminating NULs included.
const fn entry_len(prefix: &[u8], sep: &[u8], names: &[BackendId], end: usize) -> usize {
    let mut len = prefix.len() + end;
    let mut n = 0;
    while n < names.len() {
        if n > 0 {
            len += sep.len();
        }
        len += names[n].name().len();
        n += 1;
    }
    len
}

/// Built into the kernel, entries carry the module's name (`pvops_guest.parm=…`), as
/// `__MODULE_INFO` writes them.
#[cfg(MODULE)]
macro_rules! prefixed {
    ($s:literal) => {
        $s
    };
}
#[cfg(not(MODULE))]
macro_rules! prefixed {
    ($s:literal) => {
        concat!("pvops_guest.", $s)
    };
}

// Each entry starts with a NUL too (an empty entry, which the kernel and kmod skip): a reader
// that scans the file for `\0backends=` (busybox's modinfo, which the rigs' guests use) then
// finds it wherever the linker put the entry.
const PARM: &[u8] = concat!("\0", prefixed!("parm=backend:auto (default), or one of: ")).as_bytes();
const LIST: &[u8] = concat!("\0", prefixed!("backends=")).as_bytes();
const PARM_LEN: usize = entry_len(PARM, b", ", &BACKENDS, 1);
const LIST_LEN: usize = entry_len(LIST, b" ", &BACKENDS, 1);

/// `parm=backend:…`: what `modinfo` shows for the parameter.
#[link_section = ".modinfo"]
#[used(compiler)]
static PARM_DESC: [u8; PARM_LEN] = entry(PARM, b", ", &BACKENDS, 1);

/// `backends=…`: the names, space-separated.
#[link_section = ".modinfo"]
#[used(compiler)]
static BACKEND_LIST: [u8; LIST_LEN] = entry(LIST, b" ", &BACKENDS, 1);

/// The names, comma-separated, for messages (`native, kvm, …`).
pub(crate) const NAMES: &str = {
    const LEN: usize = entry_len(b"", b", ", &BACKENDS, 0);
    const BYTES: [u8; LEN] = entry(b"", b", ", &BACKENDS, 0);
    match core::str::from_utf8(&BYTES) {
        Ok(s) => s,
        Err(_) => panic!("backend names are ASCII"),
    }
};
