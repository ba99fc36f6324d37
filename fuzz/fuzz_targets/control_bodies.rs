//! Every JSON control body of PROTOCOL.md, decoded from arbitrary bytes as
//! the server and the reference client decode them, then HELLO's values
//! checked as admission step 1 checks them: no input panics, and an error
//! always names what is wrong in bounded text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::policy::admission;
use tollgate::wire::{self, parse};

fn check<T: serde::de::DeserializeOwned>(data: &[u8]) -> Option<T> {
    match parse::<T>(data) {
        Ok(v) => Some(v),
        Err(msg) => {
            assert!(!msg.is_empty());
            None
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Some(h) = check::<wire::Hello>(data) {
        let _ = admission::check_syntax(&h);
        let _ = format!("{h:?}");
    }
    if let Some(p) = check::<wire::Put>(data) {
        let _ = tollgate::storage::validate_path(&p.path);
    }
    let _ = check::<wire::End>(data);
    let _ = check::<wire::List>(data);
    let _ = check::<wire::PathOnly>(data);
    let _ = check::<wire::Bye>(data);
    let _ = check::<wire::Welcome>(data);
    let _ = check::<wire::Reject>(data);
    let _ = check::<wire::ErrorBody>(data);
    let _ = check::<wire::FileInfo>(data);
    let _ = check::<wire::Listing>(data);
    let _ = check::<wire::Deleted>(data);
});
