//! The admin's story, end to end (issue 12 "Done means"), on the real
//! daemon with the reference client binary: declare a client, back it up,
//! move it to another customer by editing the config, restore it byte for
//! byte with its modes and times, and read reports that tell the truth.

mod common;

use common::*;
use mail_parser::MessageParser;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};
use tempfile::TempDir;

fn config(d: &Path, customer: &str) -> String {
    format!(
        r#"[server]
listen = ["127.0.0.1:0"]
state = "sqlite://state/state.db"
timezone = "Europe/Berlin"

[server.email]
from = "tollgate@backup.example"
admin = "noc@backup.example"
spool = "{d}/spool"
report_interval = "0s"

[default_customer]
backup_location = "{d}/backup/default"

[[reseller]]
name = "north"
email = "ops@north.example"
email_reports = true

[[customer]]
name = "Alpha"
reseller = "north"
email = "it@alpha.example"
email_reports = true
backup_location = "{d}/backup/alpha"
space = "1 GiB"

[[customer]]
name = "Beta"
reseller = "north"
email = "it@beta.example"
email_reports = true
backup_location = "{d}/backup/beta"
space = "1 GiB"

[[client]]
id = "LAPTOP-7"
customer = "{customer}"
kind = "laptop"
"#,
        d = d.display()
    )
}

/// (recipient, subject, text) of every message in the spool.
fn spool(dir: &Path) -> Vec<(String, String, String)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<_> = rd
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".eml"))
        .map(|e| {
            let raw = std::fs::read(e.path()).unwrap();
            let m = MessageParser::default().parse(&raw[..]).unwrap();
            let to = m
                .to()
                .and_then(|a| a.first())
                .and_then(|a| a.address())
                .unwrap_or_default()
                .to_string();
            (
                to,
                m.subject().unwrap_or_default().to_string(),
                m.body_text(0).map(|t| t.to_string()).unwrap_or_default(),
            )
        })
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn declare_back_up_move_restore_and_read_the_truth() {
    let dir = TempDir::new().unwrap();
    let d0 = dir.path();
    std::fs::write(d0.join("tollgate.toml"), config(d0, "Alpha")).unwrap();
    let d = Daemon::start(d0);

    // The laptop's files: a private document with an old time, a photo.
    let work = d0.join("laptop");
    let old = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let files = [
        ("Documents/plan.odt", 300_000, 0o600),
        ("Photos/cat.jpg", 1_500_000, 0o644),
    ];
    for (i, (rel, size, mode)) in files.iter().enumerate() {
        let p = work.join(rel);
        make_file(&p, *size, i as u64 + 7);
        set_mode_and_mtime(&p, *mode, old);
    }
    let client = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .current_dir(&work)
            .arg("client")
            .args(args)
            .args(["--server", &d.addr, "--pin", &d.pin, "--id", "LAPTOP-7"])
            .arg("--secret-file")
            .arg(d0.join("laptop.secret"))
            .envs(pinned(&[]))
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(0), "{args:?}: {text}");
        text
    };

    // 1. The declared client backs up, into Alpha.
    let out = client(&["backup", "Documents", "Photos"]);
    assert!(out.contains("stored 2 of 2 file(s)"), "{out}");
    assert!(d0.join("backup/alpha/LAPTOP-7/Documents/plan.odt").exists());

    // 2. The admin moves it to Beta by editing the config.
    replace_config(d0, &config(d0, "Beta"));
    assert!(
        wait_until(Duration::from_secs(10), || moved_and_reloaded(&d.log())),
        "{}",
        d.log()
    );
    assert!(
        !d0.join("backup/alpha/LAPTOP-7").exists(),
        "nothing stranded"
    );
    let list = admin_ok(&d.config, &["clients", "list", "--json"], &[]);
    let doc: serde_json::Value = serde_json::from_str(&list).unwrap();
    let row = doc["clients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "LAPTOP-7")
        .unwrap_or_else(|| panic!("{list}"))
        .clone();
    assert_eq!(row["customer"], "Beta", "{row}");
    assert_eq!(row["used"], 1_800_000, "usage moved, exact: {row}");

    // 3. It restores everything, byte for byte, with modes and times.
    let dest = d0.join("restored");
    let out = client(&["restore", dest.to_str().unwrap()]);
    assert!(out.contains("restored 2 file(s)"), "{out}");
    for (rel, _, mode) in files {
        let (a, b) = (work.join(rel), dest.join(rel));
        assert_eq!(
            sha256_hex(&std::fs::read(&a).unwrap()),
            sha256_hex(&std::fs::read(&b).unwrap()),
            "{rel}"
        );
        let m = std::fs::metadata(&b).unwrap();
        assert_eq!(m.permissions().mode() & 0o7777, mode, "{rel}");
        assert_eq!(m.modified().unwrap(), old, "{rel}");
    }

    // 4. The reports say what happened, to whom it concerns: the backup to
    // Alpha (and its reseller), the restore to Beta (and its reseller).
    let spool_dir = d0.join("spool");
    assert!(
        wait_until(Duration::from_secs(20), || spool(&spool_dir).len() >= 4),
        "{:#?}\n{}",
        spool(&spool_dir),
        d.log()
    );
    let mails = spool(&spool_dir);
    let find = |to: &str, needle: &str| {
        mails
            .iter()
            .find(|(t, s, _)| t == to && s.contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?} to {to}: {mails:#?}"))
    };
    for to in ["it@alpha.example", "ops@north.example"] {
        let (_, _, text) = find(to, "OK backup of LAPTOP-7 (Alpha)");
        assert!(text.contains("Files stored: 2   failed: 0"), "{text}");
        assert!(text.contains("1.7 MiB"), "{text}");
    }
    for to in ["it@beta.example", "ops@north.example"] {
        let (_, _, text) = find(to, "OK restore of LAPTOP-7 (Beta)");
        assert!(text.contains("Restored:    2 file(s)"), "{text}");
    }
    assert!(
        !mails
            .iter()
            .any(|(t, s, _)| t == "it@alpha.example" && s.contains("restore")),
        "Alpha is not told about Beta's client: {mails:#?}"
    );
    assert!(
        !mails.iter().any(|(_, s, _)| s.contains("list")),
        "listing is not reported: {mails:#?}"
    );
}
