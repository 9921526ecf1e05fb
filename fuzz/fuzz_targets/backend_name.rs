//! `backend=` values and sysfs writes from a user: [`Request::parse`] over arbitrary strings.
//!
//! Checks: the empty string and `auto` (surrounding whitespace, a trailing newline included,
//! ignored) are `Auto`; a registered backend's exact name is that backend; everything else is
//! `UnknownBackend` (names are case-sensitive). A name the fuzzer did not produce itself is
//! tried too, wrapped in the input's whitespace-trimmed bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pvops::select::UnknownBackend;
use pvops::{BackendId, Request};
use pvops_backends::BACKENDS;

fn want(s: &str) -> Result<Request, UnknownBackend> {
    match s.trim() {
        "" | "auto" => Ok(Request::Auto),
        t => BACKENDS
            .iter()
            .find(|id| id.name() == t)
            .map(|id| Request::Backend(*id))
            .ok_or(UnknownBackend),
    }
}

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    let got = Request::parse(&s, &BACKENDS);
    assert_eq!(got, want(&s), "{s:?}");
    if let Ok(Request::Backend(id)) = got {
        assert_eq!(BackendId::from_name(id.name(), &BACKENDS), Some(id));
    }
    // a known name between whatever whitespace the input starts and ends with
    if let Some(first) = data.first() {
        let id = BACKENDS[usize::from(*first) % BACKENDS.len()];
        let lead = s.len() - s.trim_start().len();
        let trail = s.len() - s.trim_end().len();
        let wrapped = format!("{}{}{}", &s[..lead], id.name(), &s[s.len() - trail..]);
        assert_eq!(
            Request::parse(&wrapped, &BACKENDS),
            Ok(Request::Backend(id)),
            "{wrapped:?}"
        );
    }
});
