//! The text a backend's [`describe`](pvops::Backend::describe) returns when it depends on what
//! the backend found at start (a ROM's address, a registered page): formatted once, at start,
//! into a fixed buffer (no allocation), read afterwards.

use core::cell::UnsafeCell;
use core::fmt;

/// Bytes a description may hold; longer text is cut at a character boundary.
pub const DESCRIBE_LEN: usize = 160;

/// A description, written by the backend's start and read by `describe`.
pub struct Describe(UnsafeCell<([u8; DESCRIBE_LEN], usize)>);

// SAFETY: written only by `set`, whose contract makes it exclusive with every reader.
unsafe impl Sync for Describe {}

impl Describe {
    /// An empty description.
    pub const fn new() -> Describe {
        Describe(UnsafeCell::new(([0; DESCRIBE_LEN], 0)))
    }

    /// Format `args` into the description.
    ///
    /// # Safety
    ///
    /// Nothing reads the description meanwhile: the backend's start calls this before the
    /// backend is handed out (start and stop are exclusive, and `describe` is only asked of a
    /// started backend).
    pub unsafe fn set(&self, args: fmt::Arguments<'_>) {
        // SAFETY: exclusive (the caller's contract).
        let (buf, len) = unsafe { &mut *self.0.get() };
        let mut w = Writer::new(buf);
        let _ = fmt::Write::write_fmt(&mut w, args);
        *len = w.written();
    }

    /// The description (empty before `set`).
    pub fn get(&self) -> &str {
        // SAFETY: `set` is not running (its contract); the bytes up to `len` are UTF-8 written
        // by `Writer`, which only stores whole characters.
        let (buf, len) = unsafe { &*self.0.get() };
        core::str::from_utf8(buf.get(..*len).unwrap_or(&[])).unwrap_or("")
    }
}

impl Default for Describe {
    fn default() -> Describe {
        Describe::new()
    }
}

/// Writes into a byte buffer, dropping whatever does not fit (whole characters only): text
/// made where nothing may be allocated (a description, a sysfs file of the kernel glue).
pub struct Writer<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl<'a> Writer<'a> {
    /// A writer that fills `buf` from its start.
    pub fn new(buf: &'a mut [u8]) -> Writer<'a> {
        Writer { buf, len: 0 }
    }

    /// How many bytes are written.
    pub fn written(&self) -> usize {
        self.len
    }
}

impl fmt::Write for Writer<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            let mut utf8 = [0u8; 4];
            let bytes = c.encode_utf8(&mut utf8).as_bytes();
            let Some(dst) = self.buf.get_mut(self.len..self.len + bytes.len()) else {
                return Err(fmt::Error);
            };
            dst.copy_from_slice(bytes);
            self.len += bytes.len();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_cuts_at_a_character() {
        let d = Describe::new();
        assert_eq!(d.get(), "");
        // SAFETY: single-threaded test.
        unsafe { d.set(format_args!("ROM at {:#x}", 0xcb000)) };
        assert_eq!(d.get(), "ROM at 0xcb000");
        let long = "é".repeat(DESCRIBE_LEN);
        // SAFETY: as above.
        unsafe { d.set(format_args!("{long}")) };
        assert_eq!(
            d.get().len(),
            DESCRIBE_LEN,
            "80 two-byte characters fit exactly"
        );
        assert!(d.get().chars().all(|c| c == 'é'));
    }
}
