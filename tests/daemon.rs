//! The real daemon over real TLS, spoken to as a client would: registration
//! and secrets, pipelined uploads and restores, LIST paging, replace and
//! delete, every REJECT and ERROR code, and races over concurrent sessions.

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use std::time::Duration;
use tempfile::TempDir;
use tollgate::client::{ClientError, Session, Upload};
use tollgate::wire::{self, ErrorBody, Frame, Kind};

const MIB: u64 = 1 << 20;

fn base_body(dir: &std::path::Path) -> String {
    format!(
        r#"
[server.mcal]
pool = 1000

[default_customer]
auto_add_clients = true
backup_location = "{d}/backup/default"

[[reseller]]
name = "north"

[[customer]]
name = "Open"
reseller = "north"
email = "o@x.example"
backup_location = "{d}/backup/open"
auto_add_clients = true
space = "1 MiB"
max_clients = 1

[[customer]]
name = "Closed"
reseller = "north"
email = "c@x.example"
backup_location = "{d}/backup/closed"

[[customer]]
name = "Asleep"
reseller = "north"
email = "a@x.example"
backup_location = "{d}/backup/asleep"
auto_add_clients = true
activated = false

[[customer]]
name = "Broke"
reseller = "north"
email = "b@x.example"
backup_location = "{d}/backup/broke"
auto_add_clients = true
mcal_limit = 0

[[customer]]
name = "Full"
reseller = "north"
email = "f@x.example"
backup_location = "{d}/backup/full"
auto_add_clients = true
space = "0 B"
"#,
        d = dir.display()
    )
}

fn start(server_extra: &str) -> (TempDir, Daemon) {
    let dir = TempDir::new().unwrap();
    write_config(dir.path(), server_extra, &base_body(dir.path()));
    let d = Daemon::start(dir.path());
    (dir, d)
}

async fn used(d: &Daemon, client: &str) -> i64 {
    let pool = d.db().await;
    let n = sqlx::query_scalar("SELECT used FROM clients WHERE id = ?")
        .bind(client)
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    n
}

async fn reject_code(d: &Daemon, hello: serde_json::Value) -> (String, String) {
    let mut c = d.raw().await;
    c.send(frame(Kind::Hello, hello)).await.unwrap();
    let f = c.next().await.unwrap().unwrap();
    assert_eq!(
        f.kind,
        Kind::Reject,
        "expected REJECT, got {:?}: {}",
        f.kind,
        String::from_utf8_lossy(&f.payload)
    );
    let r: wire::Reject = wire::parse(&f.payload).unwrap();
    assert!(
        !matches!(c.next().await, Some(Ok(_))),
        "the server closes after REJECT"
    );
    (r.code, r.message)
}

fn code(e: &ClientError) -> &str {
    e.code().unwrap_or("(none)")
}

#[tokio::test(flavor = "multi_thread")]
async fn registration_secrets_and_reconnection() {
    let (_t, d) = start("");
    let o = d.opts("LAPTOP-1");
    let s = Session::connect(&o).await.unwrap();
    assert!(s.welcome.registered);
    assert_eq!(
        (s.welcome.customer.as_str(), s.welcome.reseller.as_deref()),
        ("Default Customer", None)
    );
    let secret = s
        .welcome
        .secret
        .clone()
        .expect("a secret is issued at registration");
    assert_eq!(secret.len(), 43);
    s.bye().await.unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&o.secret_file)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "the secret file is private");

    // Right secret: admitted, nothing issued.
    let s = Session::connect(&o).await.unwrap();
    assert!(!s.welcome.registered && s.welcome.secret.is_none());
    s.bye().await.unwrap();
    // Wrong secret.
    std::fs::write(&o.secret_file, "not-the-secret").unwrap();
    assert_eq!(
        code(&Session::connect(&o).await.err().unwrap()),
        "auth_failed"
    );
    // Missing secret.
    std::fs::remove_file(&o.secret_file).unwrap();
    assert_eq!(
        code(&Session::connect(&o).await.err().unwrap()),
        "auth_failed"
    );
    assert!(!d.log().contains(&secret), "the secret reached the log");
}

#[tokio::test(flavor = "multi_thread")]
async fn pipelined_uploads_and_byte_exact_restore() {
    let (t, d) = start("");
    let src = t.path().join("src");
    for i in 0..200 {
        make_file(
            &src.join(format!("small/f{i:03}.txt")),
            (i * 37) % 5000,
            i as u64,
        );
    }
    make_file(&src.join("big/disk.img"), 100 * MIB as usize, 7);
    let files = tollgate::client::collect(std::slice::from_ref(&src)).unwrap();
    assert_eq!(files.len(), 201);
    let mut s = Session::connect(&d.opts("PC")).await.unwrap();
    let results = s.upload(&files, &|_| {}).await.unwrap();
    assert!(
        results.iter().all(|r| r.is_ok()),
        "{:?}",
        results.iter().find(|r| r.is_err())
    );
    // Stored under their full paths, as tar names them.
    let prefix = tollgate::client::remote_name(&src).unwrap() + "/";
    assert!(
        !prefix.starts_with('/') && prefix.ends_with("/src/"),
        "{prefix}"
    );
    let listed = s.list(Some(&prefix)).await.unwrap();
    assert_eq!(listed.len(), 201);
    let dest = t.path().join("restored");
    for e in &listed {
        s.get(&e.path, &dest.join(&e.path)).await.unwrap();
    }
    s.bye().await.unwrap();
    for f in &files {
        let a = std::fs::read(&f.local).unwrap();
        let b = std::fs::read(dest.join(&f.remote)).unwrap();
        assert!(a == b, "{} differs after restore", f.remote);
    }
    let total: u64 = files
        .iter()
        .map(|f| std::fs::metadata(&f.local).unwrap().len())
        .sum();
    assert_eq!(used(&d, "PC").await as u64, total);
}

#[tokio::test(flavor = "multi_thread")]
async fn list_pages_past_one_frame() {
    let (t, d) = start("max_frame = \"4 KiB\"");
    let mut files = Vec::new();
    for i in 0..120 {
        let p = t.path().join(format!("l/{i}"));
        make_file(&p, 10, i);
        files.push(Upload {
            local: p,
            remote: format!("some/rather/long/directory/name/for/paging/file-{i:04}.dat"),
            ..Default::default()
        });
    }
    let mut s = Session::connect(&d.opts("LISTER")).await.unwrap();
    assert!(
        s.upload(&files, &|_| {})
            .await
            .unwrap()
            .iter()
            .all(|r| r.is_ok())
    );
    s.bye().await.unwrap();

    let mut c = d.raw().await;
    let secret = std::fs::read_to_string(d.opts("LISTER").secret_file).unwrap();
    c.send(frame(Kind::Hello, json!({"protocol": 1, "client_id": "LISTER", "secret": secret, "schedule": "s", "intent": "restore"}))).await.unwrap();
    assert_eq!(c.next().await.unwrap().unwrap().kind, Kind::Welcome);
    c.send(frame(Kind::List, json!({}))).await.unwrap();
    let mut pages = 0;
    let mut paths = Vec::new();
    loop {
        let f = c.next().await.unwrap().unwrap();
        assert_eq!(f.kind, Kind::Listing);
        assert!(
            f.payload.len() <= 4096,
            "a LISTING of {} bytes exceeds max_frame",
            f.payload.len()
        );
        let l: wire::Listing = wire::parse(&f.payload).unwrap();
        pages += 1;
        paths.extend(l.entries.into_iter().map(|e| e.path));
        if !l.more {
            break;
        }
    }
    assert!(pages > 1, "one page held everything");
    assert_eq!(paths.len(), 120);
    assert!(
        paths.windows(2).all(|w| w[0] < w[1]),
        "pages are in order without repeats"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn replace_and_delete_keep_usage_exact() {
    let (t, d) = start("");
    let a = t.path().join("a");
    let mut s = Session::connect(&d.opts("R")).await.unwrap();
    for size in [1000usize, 300, 5000] {
        make_file(&a, size, size as u64);
        let r = s
            .upload(
                &[Upload {
                    local: a.clone(),
                    remote: "doc".into(),
                    ..Default::default()
                }],
                &|_| {},
            )
            .await
            .unwrap();
        assert!(r[0].is_ok());
        assert_eq!(
            used(&d, "R").await,
            size as i64,
            "usage after replacing with {size} bytes"
        );
    }
    assert_eq!(s.delete("doc").await.unwrap(), 5000);
    assert_eq!(used(&d, "R").await, 0);
    assert_eq!(code(&s.delete("doc").await.err().unwrap()), "not_found");
    assert!(s.list(None).await.unwrap().is_empty());
    s.bye().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn every_reject_code() {
    let (_t, d) = start("hello_timeout = \"1s\"\nmax_connections = 8");
    let h = |extra: serde_json::Value| {
        let mut v = json!({"protocol": 1, "client_id": "X1", "schedule": "nightly"});
        for (k, val) in extra.as_object().unwrap() {
            v[k] = val.clone();
        }
        v
    };
    let cases = [
        (h(json!({"protocol": 2})), "unsupported_protocol"),
        (json!({"protocol": 1, "client_id": "X"}), "bad_request"),
        (h(json!({"client_id": ".hidden"})), "bad_request"),
        (h(json!({"customer": "Nobody"})), "unknown_customer"),
        (h(json!({"customer": "Closed"})), "unknown_client"),
        (h(json!({"customer": "Asleep"})), "customer_deactivated"),
        (h(json!({"customer": "Broke"})), "mcal_exhausted"),
        (
            h(json!({"customer": "Full", "client_id": "F1"})),
            "quota_exceeded",
        ),
    ];
    for (hello, want) in cases {
        let (code, message) = reject_code(&d, hello.clone()).await;
        assert_eq!(code, want, "{hello}: {message}");
    }
    let (_, msg) = reject_code(&d, json!({"protocol": 1, "client_id": "X"})).await;
    assert!(
        msg.contains("schedule"),
        "the message names the missing field: {msg}"
    );
    // client_limit: Open allows one client.
    Session::connect(&{
        let mut o = d.opts("OPEN-1");
        o.customer = Some("Open".into());
        o
    })
    .await
    .unwrap();
    let (code, _) = reject_code(&d, h(json!({"customer": "Open", "client_id": "OPEN-2"}))).await;
    assert_eq!(code, "client_limit");
    // auth_failed: a registered client without its secret.
    let (code, _) = reject_code(&d, h(json!({"client_id": "OPEN-1"}))).await;
    assert_eq!(code, "auth_failed");
    // Anything but HELLO first.
    let mut c = d.raw().await;
    c.send(frame(Kind::List, json!({}))).await.unwrap();
    let f = c.next().await.unwrap().unwrap();
    assert_eq!(
        (
            f.kind,
            wire::parse::<wire::Reject>(&f.payload)
                .unwrap()
                .code
                .as_str()
        ),
        (Kind::Reject, "bad_request")
    );
    // timeout: a silent peer after the handshake.
    let mut c = d.raw().await;
    let f = tokio::time::timeout(Duration::from_secs(10), c.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            f.kind,
            wire::parse::<wire::Reject>(&f.payload)
                .unwrap()
                .code
                .as_str()
        ),
        (Kind::Reject, "timeout")
    );
    // Refused first HELLOs registered nothing.
    let pool = d.db().await;
    let n: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM clients WHERE id IN ('X1', 'F1', 'OPEN-2')")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(n, 0);
    // Every refusal is recorded; the daemon writes them once a second.
    let recorded = until(Duration::from_secs(10), async || {
        refusals(&pool, "").await >= 12
    })
    .await;
    assert!(recorded, "{} refusals recorded", refusals(&pool, "").await);
}

#[tokio::test(flavor = "multi_thread")]
async fn busy_when_connections_are_full() {
    let (_t, d) = start("max_connections = 2");
    let a = Session::connect(&d.opts("A")).await.unwrap();
    let b = Session::connect(&d.opts("B")).await.unwrap();
    let (code, _) = reject_code(
        &d,
        json!({"protocol": 1, "client_id": "C", "schedule": "s"}),
    )
    .await;
    assert_eq!(code, "busy");
    a.bye().await.unwrap();
    // The slot frees when A's session has ended on the daemon's side.
    let mut c = None;
    let freed = until(Duration::from_secs(10), async || {
        c = Session::connect(&d.opts("C")).await.ok();
        c.is_some()
    })
    .await;
    assert!(freed, "a slot is free again");
    c.unwrap().bye().await.unwrap();
    b.bye().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn shutting_down_rejects_a_late_hello() {
    let (_t, mut d) = start("shutdown_grace = \"5s\"\nhello_timeout = \"5s\"");
    // A connection made before SIGTERM that says HELLO after it.
    let mut c = d.raw().await;
    d.signal("TERM");
    assert!(
        wait_until(Duration::from_secs(10), || d
            .log()
            .contains("SIGTERM: shutting down")),
        "the daemon heard SIGTERM"
    );
    c.send(frame(
        Kind::Hello,
        json!({"protocol": 1, "client_id": "LATE", "schedule": "s"}),
    ))
    .await
    .unwrap();
    let f = c.next().await.unwrap().unwrap();
    assert_eq!(
        (
            f.kind,
            wire::parse::<wire::Reject>(&f.payload)
                .unwrap()
                .code
                .as_str()
        ),
        (Kind::Reject, "shutting_down")
    );
    assert_eq!(d.wait(Duration::from_secs(10)), Some(0));
}

/// Sends `frames` after a WELCOME and returns the first reply.
async fn first_reply(d: &Daemon, id: &str, intent: &str, frames: Vec<Frame>) -> Frame {
    let mut c = d.raw().await;
    c.send(frame(
        Kind::Hello,
        json!({"protocol": 1, "client_id": id, "schedule": "s", "intent": intent}),
    ))
    .await
    .unwrap();
    assert_eq!(c.next().await.unwrap().unwrap().kind, Kind::Welcome);
    for f in frames {
        c.send(f).await.unwrap();
    }
    c.next().await.unwrap().unwrap()
}

fn error_of(f: &Frame) -> ErrorBody {
    assert_eq!(
        f.kind,
        Kind::Error,
        "expected ERROR, got {:?}: {}",
        f.kind,
        String::from_utf8_lossy(&f.payload)
    );
    wire::parse(&f.payload).unwrap()
}

fn data(b: &[u8]) -> Frame {
    Frame {
        kind: Kind::Data,
        payload: bytes::Bytes::copy_from_slice(b),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_error_code() {
    let (t, d) = start("");
    let put = |p: &str, n: u64| frame(Kind::Put, json!({"path": p, "size": n}));
    let end = |b: &[u8]| frame(Kind::End, json!({"sha256": sha256_hex(b)}));
    let cases: Vec<(&str, &str, Vec<Frame>, &str, bool)> = vec![
        (
            "E1",
            "backup",
            vec![frame(Kind::Put, json!({"path": "a"}))],
            "bad_request",
            false,
        ),
        (
            "E2",
            "restore",
            vec![put("a", 1), data(b"x"), end(b"x")],
            "bad_request",
            false,
        ),
        (
            "E3",
            "backup",
            vec![put("../etc/passwd", 1)],
            "bad_path",
            false,
        ),
        (
            "E4",
            "backup",
            vec![put("a", 3), data(b"abcd")],
            "size_mismatch",
            false,
        ),
        (
            "E5",
            "backup",
            vec![put("a", 3), data(b"ab"), end(b"ab")],
            "size_mismatch",
            false,
        ),
        (
            "E6",
            "backup",
            vec![put("a", 2), data(b"ab"), end(b"zz")],
            "checksum_mismatch",
            false,
        ),
        (
            "E7",
            "backup",
            vec![frame(Kind::Get, json!({"path": "missing"}))],
            "not_found",
            false,
        ),
        (
            "E8",
            "backup",
            vec![frame(Kind::Delete, json!({"path": "missing"}))],
            "not_found",
            false,
        ),
        (
            "E9",
            "backup",
            vec![data(b"stray")],
            "protocol_violation",
            true,
        ),
        (
            "E10",
            "backup",
            vec![Frame {
                kind: Kind::Welcome,
                payload: "{}".into(),
            }],
            "protocol_violation",
            true,
        ),
    ];
    for (id, intent, frames, want, fatal) in cases {
        let e = error_of(&first_reply(&d, id, intent, frames).await);
        assert_eq!(
            (e.code.as_str(), e.fatal),
            (want, fatal),
            "{id}: {}",
            e.message
        );
    }
    // quota_exceeded: Open has 1 MiB.
    let mut c = d.raw().await;
    c.send(frame(
        Kind::Hello,
        json!({"protocol": 1, "client_id": "Q", "customer": "Open", "schedule": "s"}),
    ))
    .await
    .unwrap();
    assert_eq!(c.next().await.unwrap().unwrap().kind, Kind::Welcome);
    c.send(put("big", 2 * MIB)).await.unwrap();
    assert_eq!(
        error_of(&c.next().await.unwrap().unwrap()).code,
        "quota_exceeded"
    );
    // After an ERROR answering PUT, its DATA and END pass silently; the
    // next request is answered normally.
    c.send(data(b"ignored")).await.unwrap();
    c.send(end(b"ignored")).await.unwrap();
    c.send(put("ok", 2)).await.unwrap();
    c.send(data(b"ok")).await.unwrap();
    c.send(end(b"ok")).await.unwrap();
    let f = c.next().await.unwrap().unwrap();
    assert_eq!(
        f.kind,
        Kind::Stored,
        "{}",
        String::from_utf8_lossy(&f.payload)
    );

    // storage_error: the client's directory cannot be created (a file is in the way).
    std::fs::create_dir_all(t.path().join("backup/default")).unwrap();
    std::fs::write(t.path().join("backup/default/BLOCKED"), b"in the way").unwrap();
    let e = error_of(
        &first_reply(
            &d,
            "BLOCKED",
            "backup",
            vec![put("a", 1), data(b"x"), end(b"x")],
        )
        .await,
    );
    assert_eq!(e.code, "storage_error");
    assert!(
        !e.message.contains(&t.path().display().to_string()),
        "a server path reached the peer: {}",
        e.message
    );

    // frame_too_large, bad_frame, protocol_violation (unknown type): fatal.
    for (len, ty, want) in [
        (MIB as u32 + 2, 0x11u8, "frame_too_large"),
        (0, 0x11, "bad_frame"),
        (1, 0x55, "protocol_violation"),
    ] {
        let mut s = d.tls().await;
        write_raw(&mut s, len, ty, b"").await;
        let mut c = tokio_util::codec::Framed::new(s, tollgate::wire::FrameCodec::new(16 << 20));
        let e = error_of(&c.next().await.unwrap().unwrap());
        assert_eq!((e.code.as_str(), e.fatal), (want, true));
        assert!(
            !matches!(c.next().await, Some(Ok(_))),
            "closed after a fatal ERROR"
        );
    }

    // internal: the index says the client holds more than its usage (a
    // damaged database); the delete's usage update violates a CHECK.
    let mut s = Session::connect(&d.opts("DAMAGED")).await.unwrap();
    let f = t.path().join("dmg");
    make_file(&f, 100, 1);
    assert!(
        s.upload(
            &[Upload {
                local: f,
                remote: "x".into(),
                ..Default::default()
            }],
            &|_| {}
        )
        .await
        .unwrap()[0]
            .is_ok()
    );
    let pool = d.db().await;
    sqlx::query("UPDATE clients SET used = 0 WHERE id = 'DAMAGED'")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    let e = s.delete("x").await.err().unwrap();
    assert_eq!(code(&e), "internal");
    s.bye().await.unwrap();
    for c in tollgate::wire::ErrorCode::ALL {
        // Every code above has been seen (this list guards the test itself).
        assert!(
            [
                "bad_request",
                "bad_path",
                "quota_exceeded",
                "size_mismatch",
                "checksum_mismatch",
                "not_found",
                "storage_error",
                "frame_too_large",
                "bad_frame",
                "protocol_violation",
                "internal"
            ]
            .contains(&c.as_str())
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn each_bad_path_is_refused() {
    let (_t, d) = start("");
    let long_component = "c".repeat(256);
    let long_path = format!("{}/{}", "a".repeat(600), "b".repeat(600));
    let bad = [
        "",
        "/abs",
        "a//b",
        "a/",
        "./a",
        "a/./b",
        "..",
        "a/../b",
        "a\\b",
        "a\u{0}b",
        long_component.as_str(),
        long_path.as_str(),
    ];
    let mut c = d.raw().await;
    c.send(frame(
        Kind::Hello,
        json!({"protocol": 1, "client_id": "PATHS", "schedule": "s"}),
    ))
    .await
    .unwrap();
    assert_eq!(c.next().await.unwrap().unwrap().kind, Kind::Welcome);
    for p in bad {
        c.send(frame(Kind::Put, json!({"path": p, "size": 0})))
            .await
            .unwrap();
        c.send(frame(Kind::End, json!({"sha256": sha256_hex(b"")})))
            .await
            .unwrap();
        let e = error_of(&c.next().await.unwrap().unwrap());
        assert_eq!(e.code, "bad_path", "{p:?}");
        c.send(frame(Kind::Get, json!({"path": p}))).await.unwrap();
        assert_eq!(
            error_of(&c.next().await.unwrap().unwrap()).code,
            "bad_path",
            "GET {p:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_sessions_never_overrun_quota_or_licences() {
    let dir = TempDir::new().unwrap();
    let body = format!(
        "[server.mcal]\npool = 5\n[default_customer]\nauto_add_clients = true\nbackup_location = \"{}/b\"\nspace = \"1 MiB\"\n",
        dir.path().display()
    );
    write_config(dir.path(), "", &body);
    let d = Daemon::start(dir.path());
    // 20 first backups for 5 MCALs.
    let mut tasks = Vec::new();
    for i in 0..20 {
        let o = d.opts(&format!("M{i}"));
        tasks.push(tokio::spawn(async move { Session::connect(&o).await }));
    }
    let mut sessions = Vec::new();
    let mut exhausted = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(s) => sessions.push(s),
            Err(e) => {
                assert_eq!(code(&e), "mcal_exhausted");
                exhausted += 1;
            }
        }
    }
    assert_eq!((sessions.len(), exhausted), (5, 15));
    // The 5 admitted race 100 KiB uploads (4 each) against 1 MiB.
    let src = dir.path().join("chunk");
    make_file(&src, 100 * 1024, 3);
    let mut tasks = Vec::new();
    for (i, mut s) in sessions.into_iter().enumerate() {
        let src = src.clone();
        tasks.push(tokio::spawn(async move {
            let files: Vec<Upload> = (0..4)
                .map(|k| Upload {
                    local: src.clone(),
                    remote: format!("c{i}-{k}"),
                    ..Default::default()
                })
                .collect();
            let r = s.upload(&files, &|_| {}).await.unwrap();
            s.bye().await.unwrap();
            r.into_iter().filter(|r| r.is_ok()).count()
        }));
    }
    let mut stored = 0;
    for t in tasks {
        stored += t.await.unwrap();
    }
    assert_eq!(stored, 10, "1 MiB holds exactly ten 100 KiB files");
    let pool = d.db().await;
    let used: i64 = sqlx::query_scalar("SELECT SUM(used) FROM clients")
        .fetch_one(&pool)
        .await
        .unwrap();
    let clients: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM clients")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(used as u64 <= MIB);
    assert_eq!(used, 10 * 100 * 1024);
    assert_eq!(clients, 5, "refused first HELLOs registered nothing");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_reference_client_reports_refusals_and_exits_non_zero() {
    let (t, d) = start("");
    let file = t.path().join("x.txt");
    make_file(&file, 10, 1);
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["client"])
            .args(args)
            .args(["--server", &d.addr, "--pin", &d.pin, "--secret-file"])
            .arg(t.path().join("cli.secret"))
            .output()
            .unwrap()
    };
    let out = run(&[
        "backup",
        "--id",
        "CLI-1",
        "--customer",
        "Closed",
        file.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown_client"), "{err}");
    let out = run(&["backup", "--id", "CLI-1", file.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("stored 1 of 1 file(s)"));
    // Issue 12, item 10: a wrong pin says so, with both fingerprints.
    let wrong = format!("sha256:{}", "0".repeat(64));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args([
            "client",
            "list",
            "--id",
            "CLI-1",
            "--server",
            &d.addr,
            "--pin",
            &wrong,
            "--secret-file",
        ])
        .arg(t.path().join("cli.secret"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("does not match the pin")
            && err.contains(&d.pin)
            && err.contains(&wrong)
            && !err.contains("unexpected error"),
        "{err}"
    );
    let out = run(&["delete", "--id", "CLI-1", "nope.txt"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not_found"));
    let out = run(&["list", "--id", "CLI-1", "--json"]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        doc["entries"][0]["path"],
        tollgate::client::remote_name(&file).unwrap().as_str()
    );
}
