//! The request hash and its canonical encoding: two requests parsed from JSON hash alike exactly
//! when they are the same request (the execution id aside), whatever the key order or spacing of
//! the text they came from.
#![no_main]

use aex_core::{AdmitRequest, wire};
use libfuzzer_sys::fuzz_target;

fn without_id(mut r: AdmitRequest) -> AdmitRequest {
    r.execution_id = None;
    r
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // Two requests, separated by the first NUL (or the same text twice).
    let (a, b) = text.split_once('\0').unwrap_or((text, text));
    let (Ok(ra), Ok(rb)) = (wire::admit_request(a), wire::admit_request(b)) else { return };
    let same = without_id(ra.clone()) == without_id(rb.clone());
    assert_eq!(ra.hash() == rb.hash(), same, "hash equality must follow request equality: {ra:?} / {rb:?}");
    // Re-reading the same text gives the same hash.
    assert_eq!(wire::admit_request(a).unwrap().hash(), ra.hash());
});
