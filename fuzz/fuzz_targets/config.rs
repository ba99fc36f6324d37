//! Config load and validation (CONFIG.md) on arbitrary text: TOML in,
//! never a panic; either a valid `Config` whose derived figures can be
//! computed, or errors that each carry a position inside the file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;
use tollgate::config::Config;
use tollgate::policy::space::{self, Node};

fuzz_target!(|data: &[u8]| {
    let Ok(src) = std::str::from_utf8(data) else {
        return;
    };
    match Config::from_str(src, Path::new("/etc/tollgate/fuzz.toml")) {
        Ok(cfg) => {
            let _ = cfg.warnings();
            let _ = space::allotted_to_children(&cfg, Node::Server);
            for (i, _) in cfg.resellers.iter().enumerate() {
                let _ = space::allotted_to_children(&cfg, Node::Reseller(tollgate::config::ResellerId(i as u32)));
            }
        }
        Err(errors) => {
            assert!(!errors.is_empty());
            let lines = src.lines().count().max(1);
            for e in &errors {
                assert!(e.line >= 1 && e.line <= lines + 1, "{e} (the file has {lines} lines)");
                assert!(!e.message.is_empty());
            }
        }
    }
});
