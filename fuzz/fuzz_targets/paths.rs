//! Path validation (PROTOCOL.md Upload `path`, Additions "Path depth"):
//! whatever it accepts, joined under a client's directory, stays inside it,
//! names no `.` or `..`, and has at most 64 components.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::{Component, Path};
use tollgate::storage::{MAX_DEPTH, MAX_PATH, validate_path};

fuzz_target!(|data: &[u8]| {
    let Ok(p) = std::str::from_utf8(data) else {
        return;
    };
    if validate_path(p).is_err() {
        return;
    }
    assert!(!p.is_empty() && p.len() <= MAX_PATH);
    let root = Path::new("/srv/backup/acme/PC-1");
    let joined = root.join(p);
    assert!(joined.starts_with(root), "{p:?} escapes");
    let rel = joined.strip_prefix(root).unwrap();
    let mut n = 0;
    for c in rel.components() {
        assert!(matches!(c, Component::Normal(_)), "{p:?} has {c:?}");
        n += 1;
    }
    assert!(n >= 1 && n <= MAX_DEPTH, "{p:?} has {n} components");
});
