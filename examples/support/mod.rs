//! Shared by the tools in `examples/`: start the release daemon on a config
//! and read the address and certificate pin it prints.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// Starts `target/release/tollgate serve --config CONFIG`; returns the
/// process, its listening address and its certificate pin.
pub fn start_release_daemon(config: &Path) -> (Child, String, String) {
    let bin = concat!(env!("CARGO_MANIFEST_DIR"), "/target/release/tollgate");
    let mut daemon = Command::new(bin)
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{bin}: {e} (run `cargo build --release` first)"));
    let mut lines = BufReader::new(daemon.stdout.take().unwrap()).lines();
    let (mut pin, mut addr) = (String::new(), String::new());
    while addr.is_empty() {
        let line = lines.next().expect("the daemon exited").unwrap();
        if let Some(p) = line.strip_prefix("tollgate: certificate ") {
            pin = p.into();
        }
        if let Some(a) = line.strip_prefix("tollgate: listening on ") {
            addr = a.into();
        }
    }
    // Keep draining stdout so the daemon never blocks on it.
    std::thread::spawn(move || for _ in lines {});
    (daemon, addr, pin)
}
