//! `/metrics` and `/healthz` on the real daemon: the exposition parses as
//! Prometheus text (a strict line-by-line check, then Prometheus's own
//! `promtool check metrics`), counts the admissions this test made, gives
//! each label set one meaning, carries the `process_*` series and no
//! per-client series.

mod common;

use common::*;
use std::collections::HashMap;
use std::time::Duration;
use tempfile::TempDir;
use tollgate::client::{Session, Upload};

/// One sample: name, labels, value.
type Sample = (String, Vec<(String, String)>, f64);

fn is_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || x == ':')
}

/// Parses the text exposition format (version 0.0.4) strictly: every line
/// is a HELP, a TYPE, or a sample; labels are quoted with valid escapes;
/// values are floats; every sample's family has a TYPE.
fn parse(text: &str) -> Result<Vec<Sample>, String> {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let bad = |why: &str| format!("line {}: {why}: {line:?}", n + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("HELP"), Some(name), Some(_)) if is_name(name) => {}
                (Some("TYPE"), Some(name), Some(t))
                    if is_name(name)
                        && ["counter", "gauge", "histogram", "summary", "untyped"].contains(&t) =>
                {
                    if types.insert(name.into(), t.into()).is_some() {
                        return Err(bad("a second TYPE"));
                    }
                }
                _ => return Err(bad("a comment that is neither HELP nor TYPE")),
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').ok_or_else(|| bad("no value"))?;
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v.parse().map_err(|_| bad("value is not a float"))?,
        };
        let (name, labels) = match series.split_once('{') {
            None => (series, Vec::new()),
            Some((name, rest)) => {
                let inner = rest
                    .strip_suffix('}')
                    .ok_or_else(|| bad("unclosed labels"))?;
                let mut labels = Vec::new();
                let mut chars = inner.chars().peekable();
                while chars.peek().is_some() {
                    let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
                    if !is_name(&key) || chars.next() != Some('"') {
                        return Err(bad("bad label"));
                    }
                    let mut val = String::new();
                    loop {
                        match chars.next() {
                            Some('"') => break,
                            Some('\\') => match chars.next() {
                                Some('\\') => val.push('\\'),
                                Some('"') => val.push('"'),
                                Some('n') => val.push('\n'),
                                _ => return Err(bad("bad escape")),
                            },
                            Some(c) => val.push(c),
                            None => return Err(bad("unterminated label value")),
                        }
                    }
                    labels.push((key, val));
                    match chars.next() {
                        Some(',') | None => {}
                        _ => return Err(bad("labels not separated by ','")),
                    }
                }
                (name, labels)
            }
        };
        if !is_name(name) {
            return Err(bad("bad metric name"));
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|f| types.contains_key(*f))
            .unwrap_or(name);
        if !types.contains_key(family) {
            return Err(bad("a sample without a TYPE"));
        }
        out.push((name.to_string(), labels, value));
    }
    Ok(out)
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|(n, l, _)| {
            n == name
                && l.len() == labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| l.iter().any(|(a, b)| a == k && b == v))
        })
        .map(|s| s.2)
}

#[test]
fn the_parser_refuses_what_prometheus_would() {
    assert!(parse("# TYPE a counter\na 1\n").is_ok());
    assert!(parse("a 1\n").is_err(), "no TYPE");
    assert!(parse("# TYPE a counter\na{x=\"1} 1\n").is_err());
    assert!(parse("# TYPE a counter\na{x=1} 1\n").is_err());
    assert!(parse("# TYPE a counter\na one\n").is_err());
    assert!(parse("# TYPE a counter\n# whatever\n").is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_parse_and_count_admissions() {
    let dir = TempDir::new().unwrap();
    let key_hash = tollgate::cli::hash("tg-enroll-key-0451").unwrap();
    write_config(
        dir.path(),
        "metrics_listen = \"127.0.0.1:0\"\ntotal_space = \"1 GiB\"\n[server.mcal]\npool = 10\n",
        &format!(
            "[default_customer]\nbackup_location = \"{d}/default\"\nspace = \"0 B\"\n[[reseller]]\nname = \"north\"\nspace = \"100 MiB\"\n[[customer]]\nname = \"Acme\"\nreseller = \"north\"\nemail = \"a@x.example\"\nbackup_location = \"{d}/acme\"\nspace = \"50 MiB\"\nauto_add_clients = true\n\
             [[customer]]\nname = \"Keyed\"\nreseller = \"north\"\nemail = \"k@x.example\"\nbackup_location = \"{d}/keyed\"\nspace = \"50 MiB\"\nauto_add_clients = true\nenroll_key = \"{key_hash}\"\n",
            d = dir.path().display()
        ),
    );
    let d = Daemon::start(dir.path());
    let m = d.metrics.clone().expect("metrics_listen is printed");

    let (code, body) = http_get(&m, "/healthz");
    assert_eq!((code, body.trim()), (200, "ok"));

    // Two admissions, one upload, and one refusal (a wrong secret).
    let file = dir.path().join("f.bin");
    make_file(&file, 300_000, 1);
    for id in ["M-ONE", "M-TWO"] {
        let mut o = d.opts(id);
        o.customer = Some("Acme".into());
        let mut s = Session::connect(&o).await.unwrap();
        if id == "M-ONE" {
            let r = s
                .upload(
                    &[Upload {
                        local: file.clone(),
                        remote: "f.bin".into(),
                        ..Default::default()
                    }],
                    &|_| {},
                )
                .await
                .unwrap();
            assert!(r[0].is_ok());
        }
        s.bye().await.unwrap();
    }
    let o = d.opts("M-ONE");
    std::fs::write(&o.secret_file, "not-the-secret").unwrap();
    let err = Session::connect(&o).await.err().unwrap();
    assert_eq!(err.code(), Some("auth_failed"));

    // An enrollment key: wrong, then right.
    let mut o = d.opts("M-KEYED");
    o.customer = Some("Keyed".into());
    o.enroll_key = Some("not-the-secret".into());
    let err = Session::connect(&o).await.err().unwrap();
    assert_eq!(err.code(), Some("auth_failed"));
    o.enroll_key = Some("tg-enroll-key-0451".into());
    Session::connect(&o).await.unwrap().bye().await.unwrap();

    let (code, text) = http_get(&m, "/metrics");
    assert_eq!(code, 200);
    let samples = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let v = |n: &str, l: &[(&str, &str)]| value(&samples, n, l);
    assert_eq!(
        v("tollgate_admissions_total", &[("code", "welcome")]),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        v("tollgate_admissions_total", &[("code", "auth_failed")]),
        Some(2.0)
    );
    assert_eq!(v("tollgate_connections_total", &[]), Some(5.0));
    // The one upload's END to STORED, in the commit histogram's buckets.
    assert_eq!(v("tollgate_upload_commit_seconds_count", &[]), Some(1.0));
    assert_eq!(
        v("tollgate_upload_commit_seconds_bucket", &[("le", "+Inf")]),
        Some(1.0),
        "{text}"
    );
    assert!(
        v("tollgate_upload_commit_seconds_sum", &[]).is_some_and(|s| s > 0.0),
        "{text}"
    );
    assert_eq!(v("tollgate_bytes_received_total", &[]), Some(300_000.0));
    assert_eq!(
        v("tollgate_mcal_pool_available", &[]),
        Some(7.0),
        "three desktops' first backups debited one MCAL each"
    );
    // Each label set means one node of the tree: the server's figures are
    // the whole server's, used beside allotted.
    let used = |l: &[(&str, &str)]| v("tollgate_space_used_bytes", l);
    let allotted = |l: &[(&str, &str)]| v("tollgate_space_allotted_bytes", l);
    assert_eq!(used(&[("level", "server")]), Some(300_000.0), "{text}");
    assert_eq!(allotted(&[("level", "server")]), Some((1u64 << 30) as f64));
    let north = [("level", "reseller"), ("reseller", "north")];
    assert_eq!(used(&north), Some(300_000.0));
    assert_eq!(allotted(&north), Some((100u64 << 20) as f64));
    let acme = [("level", "customer"), ("customer", "Acme")];
    assert_eq!(used(&acme), Some(300_000.0));
    assert_eq!(allotted(&acme), Some((50u64 << 20) as f64));
    let default = [("level", "customer"), ("customer", "Default Customer")];
    assert_eq!((used(&default), allotted(&default)), (Some(0.0), Some(0.0)));
    for s in &samples {
        if s.0.starts_with("tollgate_space_") {
            let level = s.1.iter().find(|(k, _)| k == "level").map(|l| &l.1);
            assert!(level.is_some(), "a space series without a level: {s:?}");
        }
    }
    // The standard process series.
    for name in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
    ] {
        let got = v(name, &[]).unwrap_or_else(|| panic!("no {name}:\n{text}"));
        assert!(got >= 0.0);
    }
    assert!(v("process_resident_memory_bytes", &[]).unwrap() > 1e6);
    assert!(v("process_open_fds", &[]).unwrap() >= 3.0);
    promtool_check(&text);
    // Sessions have ended (the gauge falls back once the daemon logs it).
    assert!(wait_until(Duration::from_secs(5), || {
        let t = http_get(&m, "/metrics").1;
        value(&parse(&t).unwrap(), "tollgate_active_sessions", &[]) == Some(0.0)
    }));
    assert_eq!(v("tollgate_mail_outbox_pending", &[]), Some(0.0));
    // Bounded cardinality: no client id appears anywhere.
    assert!(!text.contains("M-ONE") && !text.contains("M-TWO"));
}

/// Prometheus's own linter. scripts/test provides it (TOLLGATE_PROMTOOL,
/// or unpacked under target/tools); a run without it fails rather than
/// skipping the check.
fn promtool_check(text: &str) {
    use std::io::Write;
    let unpacked = concat!(env!("CARGO_MANIFEST_DIR"), "/target/tools/usr/bin/promtool");
    let tool = std::env::var("TOLLGATE_PROMTOOL").unwrap_or_else(|_| {
        if std::path::Path::new(unpacked).exists() {
            unpacked.into()
        } else {
            "promtool".into()
        }
    });
    let mut child = std::process::Command::new(&tool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run {tool} ({e}): run the tests with scripts/test, which provides it")
        });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics: {said}\n{text}"
    );
}

#[test]
fn promtool_finds_what_it_should() {
    // The check can fail: a counter without `_total` is a lint problem.
    let r = std::panic::catch_unwind(|| {
        promtool_check("# HELP bad_counter x\n# TYPE bad_counter counter\nbad_counter 1\n")
    });
    assert!(r.is_err());
}
