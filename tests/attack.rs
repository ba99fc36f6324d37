//! Who gets in, under attack (PROTOCOL.md and CONFIG.md, Additions of
//! 2026-11-30), against the real daemon: floods of oversized HELLOs and of
//! wrong keys, connection limits per source and before WELCOME, reserved
//! ids of removed clients, peers that stop reading, throttle bypasses and
//! racing uploads of one path. Several sources are loopback addresses
//! 127.0.0.x; `exempt = []` lets 127.0.0.1 be penalized.

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use std::time::{Duration, Instant};
use tempfile::TempDir;
use tokio::io::AsyncWriteExt;
use tollgate::client::{ClientError, Session, Upload};
use tollgate::wire::{self, Frame, Kind};

const MIB: usize = 1 << 20;

/// The tests of this file run one at a time: the flood tests measure
/// latency, and must not share two cores with another test's daemon.
/// (hostile-clock: alone. scripts/hostile-clock runs this binary with
/// nothing beside it.)
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn start(server_extra: &str, tables: &str, body: &str) -> (TempDir, Daemon) {
    let dir = TempDir::new().unwrap();
    let d = dir.path().display();
    write_config(
        dir.path(),
        &format!("metrics_listen = \"127.0.0.1:0\"\n{server_extra}\n{tables}"),
        &format!(
            "[default_customer]\nauto_add_clients = true\nbackup_location = \"{d}/backup/default\"\n\n[[reseller]]\nname = \"r\"\n\n[[customer]]\nname = \"Acme\"\nreseller = \"r\"\nemail = \"it@acme.example\"\nbackup_location = \"{d}/backup/acme\"\nauto_add_clients = true\n{body}"
        ),
    );
    let daemon = Daemon::start(dir.path());
    (dir, daemon)
}

fn metric(d: &Daemon, name: &str) -> f64 {
    let (_, body) = http_get(d.metrics.as_deref().unwrap(), "/metrics");
    body.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

async fn answer(
    c: &mut tokio_util::codec::Framed<
        impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
        wire::FrameCodec,
    >,
) -> Frame {
    tokio::time::timeout(Duration::from_secs(20), c.next())
        .await
        .expect("an answer in time")
        .expect("a frame")
        .expect("a well-formed frame")
}

fn code_of(f: &Frame) -> String {
    match f.kind {
        Kind::Reject => wire::parse::<wire::Reject>(&f.payload).unwrap().code,
        Kind::Error => wire::parse::<wire::ErrorBody>(&f.payload).unwrap().code,
        Kind::Welcome => "welcome".into(),
        other => format!("{other:?}"),
    }
}

/// The disk-fill attack of issue 11, 2,000 HELLOs: a third with 900 KB ids,
/// each refused on its frame header (the payload is never read, let alone
/// stored); a third that fit under `hello_max_frame` with 15 KB invalid
/// ids, refused as `bad_request` and recorded aggregated with `(invalid)`
/// for the id; a third naming a new made-up customer each, recorded without
/// the name. The database grows by less than 1 MB.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_huge_hellos_leave_the_database_small() {
    let _serial = SERIAL.lock().await;
    let (_dir, d) = start("", "", "");
    // A first session creates the tables' first pages.
    let mut c = d.raw().await;
    c.send(frame(
        Kind::Hello,
        json!({"protocol": 1, "client_id": "WARM", "schedule": "s"}),
    ))
    .await
    .unwrap();
    assert_eq!(answer(&mut c).await.kind, Kind::Welcome);
    drop(c);
    let pool = d.db().await;
    let before = d.db_bytes();
    let rss_before = d.rss_kib();
    let huge_len = json!({"protocol": 1, "client_id": "A".repeat(900_000), "schedule": "s"})
        .to_string()
        .len();
    let invalid =
        json!({"protocol": 1, "client_id": "!".repeat(15_000), "schedule": "s"}).to_string();
    assert!(invalid.len() < 16 << 10);
    let started = Instant::now();
    let mut handles = Vec::new();
    for w in 0..16usize {
        let invalid = invalid.clone();
        let addr = d.addr.clone();
        let pin = d.pin.clone();
        handles.push(tokio::spawn(async move {
            let mut codes = std::collections::BTreeMap::<String, u32>::new();
            for i in 0..125usize {
                let tls = tollgate::tls::client_config(Some(&pin), None).unwrap();
                let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
                let mut s = tokio_rustls::TlsConnector::from(tls)
                    .connect(
                        rustls::pki_types::ServerName::try_from("localhost").unwrap(),
                        tcp,
                    )
                    .await
                    .unwrap();
                let made_up;
                let (kind, body) = if (w + i) % 3 == 0 {
                    // The length and type only: the answer must not wait
                    // for the 900 KB that would follow.
                    (Kind::Hello, None)
                } else if (w + i) % 3 == 1 {
                    (Kind::Hello, Some(invalid.as_bytes()))
                } else {
                    // A valid id under a customer name made up each time.
                    made_up = json!({"protocol": 1, "client_id": "PC", "schedule": "s",
                                     "customer": format!("Nobody-{w}-{i}-{}", "n".repeat(200))})
                    .to_string();
                    (Kind::Hello, Some(made_up.as_bytes()))
                };
                let len = match body {
                    None => huge_len as u32 + 1,
                    Some(b) => b.len() as u32 + 1,
                };
                let mut bytes = len.to_be_bytes().to_vec();
                bytes.push(kind as u8);
                if let Some(b) = body {
                    bytes.extend_from_slice(b);
                }
                s.write_all(&bytes).await.unwrap();
                s.flush().await.unwrap();
                let mut c = tokio_util::codec::Framed::new(s, wire::FrameCodec::new(16 << 20));
                let f = answer(&mut c).await;
                *codes.entry(code_of(&f)).or_default() += 1;
            }
            codes
        }));
    }
    let mut codes = std::collections::BTreeMap::<String, u32>::new();
    for h in handles {
        for (k, n) in h.await.unwrap() {
            *codes.entry(k).or_default() += n;
        }
    }
    println!(
        "2,000 hostile HELLOs answered in {:?}: {codes:?}",
        started.elapsed()
    );
    let n = |c: &str| codes.get(c).copied().unwrap_or(0);
    assert_eq!(
        n("frame_too_large") + n("bad_request") + n("unknown_customer"),
        2000,
        "{codes:?}"
    );
    assert!(
        n("frame_too_large") >= 600 && n("bad_request") >= 600 && n("unknown_customer") >= 600,
        "{codes:?}"
    );
    let want = (n("bad_request") + n("unknown_customer")) as i64;
    let recorded = until(Duration::from_secs(10), async || {
        refusals(&pool, "WHERE code IN ('bad_request', 'unknown_customer')").await >= want
    })
    .await;
    assert!(recorded, "{} refusals recorded", refusals(&pool, "").await);
    let rows: Vec<(String, String, i64)> =
        sqlx::query_as("SELECT client, source, count FROM refusals WHERE code = 'bad_request'")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(
        rows.len() <= 3,
        "one row per minute, not per HELLO: {}",
        rows.len()
    );
    for (client, source, _) in &rows {
        assert_eq!(
            (client.as_str(), source.as_str()),
            ("(invalid)", "127.0.0.1")
        );
    }
    // Made-up customer names are not stored: they would make a row each.
    let made_up: Vec<(String, String)> =
        sqlx::query_as("SELECT customer, client FROM refusals WHERE code = 'unknown_customer'")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(
        made_up.len() <= 3,
        "{} rows for made-up customers",
        made_up.len()
    );
    assert!(
        made_up.iter().all(|(c, id)| c.is_empty() && id == "PC"),
        "{made_up:?}"
    );
    let longest: i64 = sqlx::query_scalar(
        "SELECT MAX(MAX(length(client)), MAX(length(customer)), MAX(length(source))) FROM refusals",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(longest <= 256, "a stored value is {longest} bytes");
    let grown = d.db_bytes().saturating_sub(before);
    println!("the database grew by {grown} bytes");
    assert!(grown < 1_000_000, "the database grew by {grown} bytes");
    let rss = d.rss_kib();
    assert!(
        rss < rss_before + 64 * 1024,
        "RSS grew from {rss_before} KiB to {rss} KiB: a refused frame was buffered"
    );
}

/// Admission latency of one source while four others flood wrong enroll
/// keys and wrong secrets: the argon2 checks run on their own short queue
/// (two a source), outside the state's write lane; a new client with the
/// right key still gets in; each flooding source is closed before TLS once
/// its penalty passes `min` (four failures: 20 s > 15 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_wrong_keys_neither_slows_another_source_nor_goes_unpunished() {
    let _serial = SERIAL.lock().await;
    let key = "tg-enroll-key-0451";
    let (_dir, d) = start(
        "",
        "[server.limits.penalties]\nexempt = []\n",
        &format!("enroll_key = \"{}\"\n", phc(key)),
    );
    let d = std::sync::Arc::new(d);
    // Two registered clients: the steady one measured, and the flood's victim.
    let mut secrets = Vec::new();
    for (id, src) in [("STEADY", "127.0.0.2"), ("VICTIM", "127.0.0.3")] {
        secrets.push(register(&d, id, src, key).await);
    }
    let steady = async |n| steady_admissions(&d, &secrets[0], n).await;
    // Its pace without a flood: each admission waits for a durable
    // commit, whose fsync this machine's disk sometimes stretches.
    let quiet = steady(200).await;

    // Four flooding sources, four connections each: half guess enroll keys
    // for new ids (argon2), half guess the victim's secret.
    const FLOODERS: [&str; 4] = ["127.0.0.1", "127.0.0.4", "127.0.0.5", "127.0.0.6"];
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut flood = Vec::new();
    for w in 0..16u32 {
        let (d, stop) = (d.clone(), stop.clone());
        let src = FLOODERS[w as usize % 4];
        flood.push(tokio::spawn(async move {
            let (mut refused, mut busy, mut closed, mut n) = (0u32, 0u32, 0u32, 0u32);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let Ok(mut c) = d.raw_from(src).await else {
                    // Blocked: closed before TLS. A blocked source guesses
                    // nothing; its retries are kept from starving this
                    // test's own process of the two cores.
                    closed += 1;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    continue;
                };
                let hello = if w % 2 == 0 {
                    json!({"protocol": 1, "client_id": format!("FLOOD-{w}-{n}"), "schedule": "s",
                           "customer": "Acme", "enroll_key": format!("guess-{n}")})
                } else {
                    json!({"protocol": 1, "client_id": "VICTIM", "schedule": "s",
                           "secret": format!("not-the-secret-{n}")})
                };
                if c.send(frame(Kind::Hello, hello)).await.is_err() {
                    closed += 1;
                    continue;
                }
                match c.next().await {
                    Some(Ok(f)) => match code_of(&f).as_str() {
                        "auth_failed" => refused += 1,
                        "busy" => busy += 1,
                        other => panic!("the flood got {other}"),
                    },
                    _ => closed += 1,
                }
            }
            (refused, busy, closed)
        }));
    }

    // A new client enrolls with the right key from another source while
    // the flood runs: the argon2 queue may say busy, never forever.
    let newbie = {
        let d = d.clone();
        tokio::spawn(async move {
            for _ in 0..200 {
                let mut c = d.raw_from("127.0.0.7").await.unwrap();
                c.send(frame(
                    Kind::Hello,
                    json!({"protocol": 1, "client_id": "NEWBIE", "schedule": "s",
                           "customer": "Acme", "enroll_key": "tg-enroll-key-0451"}),
                ))
                .await
                .unwrap();
                let f = answer(&mut c).await;
                match code_of(&f).as_str() {
                    "welcome" => return true,
                    "busy" => tokio::time::sleep(Duration::from_millis(50)).await,
                    other => panic!("the new client got {other}"),
                }
            }
            false
        })
    };

    // The steady source again, 200 times, while the flood runs.
    let took = steady(200).await;
    assert!(newbie.await.unwrap(), "the new client never got in");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut refused, mut busy, mut closed) = (0, 0, 0);
    for f in flood {
        let (r, b, c) = f.await.unwrap();
        refused += r;
        busy += b;
        closed += c;
    }
    let p = percentile;
    let (p50, p99, max) = (p(&took, 50), p(&took, 99), took[took.len() - 1]);
    println!(
        "steady admissions without a flood: p50 {:?}, p99 {:?}; during the flood: p50 {p50:?}, p99 {p99:?}, max {max:?}; the flood got {refused} auth_failed, {busy} busy and {closed} closed connections",
        p(&quiet, 50),
        p(&quiet, 99)
    );
    // The flood's connections, refused or closed before TLS, leave the
    // steady source near its quiet pace. Its median is judged, not a tail:
    // a tail bound (p99 < 50 ms) failed CI twice on a slow fsync, and
    // could not tell argon2 run on the tokio workers from argon2 on its
    // own threads anyway, since this flood makes only about 20 checks
    // before its sources are blocked.
    // `argon2_checks_kept_going_never_stall_a_registered_client` keeps the
    // checks going and is the sharp test of that.
    let bound = Duration::from_millis(10).max(p(&quiet, 50) * 4);
    assert!(p50 < bound, "p50 {p50:?}, bound {bound:?}");
    assert!(max < Duration::from_secs(2), "max {max:?}");
    // Each source blocked after a handful of failures (a few more were in
    // flight when its penalty started).
    assert!(refused < 4 * 15, "{refused} wrong keys were answered");
    assert!(closed > 0);
    assert!(
        metric(
            &d,
            "tollgate_connections_dropped_total{reason=\"penalized\"}"
        ) > 0.0
    );
    assert!(metric(&d, "tollgate_penalized_sources") >= 1.0);
    // Closed before TLS: a new connection from each source gets no handshake.
    let log = d.log();
    for src in FLOODERS {
        assert!(d.tls_from(src).await.is_err(), "{src} is not blocked");
        assert_eq!(
            log.matches(&format!("penalizing source {src} ")).count(),
            1,
            "the start of a penalty is logged once"
        );
    }
    // fail2ban's line, fixed shape, the id escaped: "... for <id> from <ip>".
    let line = log
        .lines()
        .find(|l| l.contains("authentication failure for VICTIM from 127.0.0.4"))
        .expect("the fail2ban line");
    assert!(
        line.trim_end()
            .ends_with("hello: authentication failure for VICTIM from 127.0.0.4"),
        "{line}"
    );
}

/// Registered client `id` (secret `secret`) connects from 127.0.0.2, is
/// admitted and leaves, `n` times; how long each took from connect to
/// WELCOME, sorted.
async fn steady_admissions(d: &Daemon, secret: &str, n: usize) -> Vec<Duration> {
    let mut took = Vec::new();
    for _ in 0..n {
        let t0 = Instant::now();
        let mut c = d.raw_from("127.0.0.2").await.unwrap();
        c.send(frame(
            Kind::Hello,
            json!({"protocol": 1, "client_id": "STEADY", "schedule": "s", "secret": secret}),
        ))
        .await
        .unwrap();
        let f = answer(&mut c).await;
        took.push(t0.elapsed());
        assert_eq!(f.kind, Kind::Welcome, "{}", code_of(&f));
        c.send(frame(Kind::Bye, json!({}))).await.unwrap();
        assert_eq!(answer(&mut c).await.kind, Kind::Bye);
    }
    took.sort();
    took
}

/// The `q`th percentile of sorted `t`.
fn percentile(t: &[Duration], q: usize) -> Duration {
    t[(t.len() * q / 100).max(1) - 1]
}

/// Registers client `id` from `src` with enroll key `key`; returns its
/// secret.
async fn register(d: &Daemon, id: &str, src: &str, key: &str) -> String {
    let mut c = d.raw_from(src).await.unwrap();
    c.send(frame(
        Kind::Hello,
        json!({"protocol": 1, "client_id": id, "schedule": "s", "customer": "Acme", "enroll_key": key}),
    ))
    .await
    .unwrap();
    let f = answer(&mut c).await;
    let w: wire::Welcome = wire::parse(&f.payload).unwrap();
    w.secret.unwrap()
}

/// The argon2 checks of wrong enroll keys, kept going (loopback is exempt
/// from penalties by default), hold at most their own threads: a
/// registered client's admissions, which check a SHA-256 digest, keep
/// their pace. Each check costs tens of ms of CPU, so one made on a tokio
/// worker would hold up every task queued behind it there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn argon2_checks_kept_going_never_stall_a_registered_client() {
    let _serial = SERIAL.lock().await;
    let key = "tg-enroll-key-0451";
    let (_dir, d) = start("", "", &format!("enroll_key = \"{}\"\n", phc(key)));
    let d = std::sync::Arc::new(d);
    let secret = register(&d, "STEADY", "127.0.0.2", key).await;
    let quiet = steady_admissions(&d, &secret, 100).await;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let checked = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let mut flood = Vec::new();
    for w in 0..8u32 {
        let (d, stop, checked) = (d.clone(), stop.clone(), checked.clone());
        let src = ["127.0.0.4", "127.0.0.5", "127.0.0.6", "127.0.0.8"][w as usize % 4];
        flood.push(tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let mut c = d.raw_from(src).await.unwrap();
                c.send(frame(
                    Kind::Hello,
                    json!({"protocol": 1, "client_id": format!("FLOOD-{w}-{n}"), "schedule": "s",
                           "customer": "Acme", "enroll_key": format!("guess-{n}")}),
                ))
                .await
                .unwrap();
                let f = answer(&mut c).await;
                match code_of(&f).as_str() {
                    "auth_failed" => {
                        checked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    "busy" => tokio::time::sleep(Duration::from_millis(1)).await,
                    other => panic!("the flood got {other}"),
                }
            }
        }));
    }
    // The flood is under way before the measuring starts.
    while checked.load(std::sync::atomic::Ordering::Relaxed) < 4 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let before = checked.load(std::sync::atomic::Ordering::Relaxed);
    let t0 = Instant::now();
    let took = steady_admissions(&d, &secret, 300).await;
    let during = checked.load(std::sync::atomic::Ordering::Relaxed) - before;
    let span = t0.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for f in flood {
        f.await.unwrap();
    }
    let (q50, q90) = (percentile(&quiet, 50), percentile(&quiet, 90));
    let (p50, p90) = (percentile(&took, 50), percentile(&took, 90));
    println!(
        "steady admissions without a flood: p50 {q50:?}, p90 {q90:?}; beside {during} argon2 checks in {span:?}: p50 {p50:?}, p90 {p90:?}, max {:?}",
        took[took.len() - 1]
    );
    // The checks ran throughout: at least one for every 100 ms measured.
    assert!(
        u128::from(during) * 100 >= span.as_millis(),
        "only {during} argon2 checks in {span:?}"
    );
    // Here: p50 about 2 ms, and 12–18 ms with the checks unbounded (one
    // thread each, all cores busy). The median, not a tail, so that a
    // slow fsync now and then on a busy CI disk does not decide it.
    let bound = Duration::from_millis(8).max(q50 * 3);
    assert!(p50 < bound, "p50 {p50:?}, bound {bound:?}");
}

/// `per_source_connections` and `handshakes` hold, and an admitted session
/// keeps working meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connection_limits_hold_while_admitted_sessions_work() {
    let _serial = SERIAL.lock().await;
    let (_dir, d) = start(
        "hello_timeout = \"30s\"",
        "[server.limits]\nhandshakes = 6\nper_source_connections = 3\n",
        "",
    );
    let mut working = d.raw_from("127.0.0.9").await.unwrap();
    working
        .send(frame(
            Kind::Hello,
            json!({"protocol": 1, "client_id": "WORKER", "schedule": "s"}),
        ))
        .await
        .unwrap();
    assert_eq!(answer(&mut working).await.kind, Kind::Welcome);
    let list = async |c: &mut tokio_util::codec::Framed<_, _>| {
        c.send(frame(Kind::List, json!({}))).await.unwrap();
        assert_eq!(answer(c).await.kind, Kind::Listing);
    };

    // Three silent TLS connections from one source: the fourth is closed
    // at accept.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(d.tls_from("127.0.0.1").await.unwrap());
    }
    assert!(
        d.tls_from("127.0.0.1").await.is_err(),
        "a fourth from one source"
    );
    list(&mut working).await;
    // Three more from another source fill the six handshake slots; a
    // seventh connection waits in the backlog, unanswered.
    for _ in 0..3 {
        held.push(d.tls_from("127.0.0.2").await.unwrap());
    }
    let waiting = tokio::time::timeout(Duration::from_secs(1), d.tls_from("127.0.0.3")).await;
    assert!(waiting.is_err(), "a seventh handshake went ahead");
    list(&mut working).await;
    assert!(
        metric(
            &d,
            "tollgate_connections_dropped_total{reason=\"per_source\"}"
        ) >= 1.0
    );
    // A slot frees when a silent connection goes; the next one gets in.
    drop(held.pop());
    let next = tokio::time::timeout(Duration::from_secs(10), d.raw_from("127.0.0.3"))
        .await
        .expect("a freed handshake slot serves the next connection");
    let mut next = next.unwrap();
    next.send(frame(
        Kind::Hello,
        json!({"protocol": 1, "client_id": "LATE", "schedule": "s"}),
    ))
    .await
    .unwrap();
    assert_eq!(answer(&mut next).await.kind, Kind::Welcome);
    list(&mut working).await;
}

/// PROTOCOL.md Additions: a client removed with its files kept cannot be
/// registered again by anyone; `clients readmit` gives it back to its
/// owner with its files intact, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_removed_id_cannot_be_taken_over_and_readmit_gives_it_back() {
    let _serial = SERIAL.lock().await;
    let (dir, d) = start("", "", "");
    let owner = d.opts("PC-7");
    let mut files = Vec::new();
    for i in 0..2u64 {
        let p = dir.path().join(format!("src/{i}.bin"));
        make_file(&p, 300_000 + i as usize, i);
        files.push(Upload {
            local: p,
            remote: format!("docs/{i}.bin"),
            ..Default::default()
        });
    }
    let mut s = Session::connect(&owner).await.unwrap();
    assert!(
        s.upload(&files, &|_| {})
            .await
            .unwrap()
            .iter()
            .all(|r| r.is_ok())
    );
    s.bye().await.unwrap();
    admin_ok(&d.config, &["clients", "remove", "PC-7"], &[]);

    let refused = |r: Result<Session, ClientError>| match r {
        Err(e) => e.code().unwrap_or_default().to_string(),
        Ok(_) => "welcome".into(),
    };
    let mut stranger = owner.clone();
    stranger.secret_file = dir.path().join("stranger.secret");
    assert_eq!(
        refused(Session::connect(&stranger).await),
        "auth_failed",
        "no secret"
    );
    stranger.id = "pc-7".into();
    assert_eq!(
        refused(Session::connect(&stranger).await),
        "auth_failed",
        "other case"
    );
    assert_eq!(
        refused(Session::connect(&owner).await),
        "auth_failed",
        "the old secret"
    );

    let out = admin_ok(&d.config, &["clients", "readmit", "PC-7"], &[]);
    let key = out.lines().nth(1).unwrap().trim().to_string();
    assert!(key.len() >= 40, "{out}");
    // Kept beside the secrets, so CI checks it never reaches the log.
    std::fs::write(dir.path().join("readmit.secret"), &key).unwrap();
    stranger.id = "PC-7".into();
    stranger.enroll_key = Some("a-guess-at-the-key".into());
    assert_eq!(
        refused(Session::connect(&stranger).await),
        "auth_failed",
        "a wrong key"
    );

    let mut back = owner.clone();
    back.enroll_key = Some(key.clone());
    let mut s = Session::connect(&back).await.unwrap();
    assert!(s.welcome.registered && s.welcome.secret.is_some());
    let listed = s.list(None).await.unwrap();
    assert_eq!(listed.len(), 2);
    for (i, f) in files.iter().enumerate() {
        let dest = dir.path().join(format!("restored/{i}.bin"));
        s.get(&f.remote, &dest).await.unwrap();
        assert_eq!(
            std::fs::read(&dest).unwrap(),
            std::fs::read(&f.local).unwrap()
        );
    }
    s.bye().await.unwrap();
    // The key was for one use; the new secret works.
    stranger.enroll_key = Some(key);
    assert_eq!(
        refused(Session::connect(&stranger).await),
        "auth_failed",
        "the key again"
    );
    let s = Session::connect(&owner).await.unwrap();
    assert!(!s.welcome.registered);
    s.bye().await.unwrap();
}

/// Uploads `size` bytes as `big.bin` for `id`, then GETs it, reads FILE
/// and stops reading. Returns the connection (kept open).
async fn stall_a_download(
    d: &Daemon,
    dir: &std::path::Path,
    id: &str,
    size: usize,
) -> tokio_util::codec::Framed<impl tokio::io::AsyncRead + tokio::io::AsyncWrite, wire::FrameCodec>
{
    let src = dir.join(format!("{id}.bin"));
    make_file(&src, size, 7);
    let mut o = d.opts(id);
    o.customer = Some("Acme".into());
    let mut s = Session::connect(&o).await.unwrap();
    let r = s
        .upload(
            &[Upload {
                local: src,
                remote: "big.bin".into(),
                ..Default::default()
            }],
            &|_| {},
        )
        .await
        .unwrap();
    assert!(r[0].is_ok());
    s.bye().await.unwrap();
    let secret = std::fs::read_to_string(&o.secret_file).unwrap();
    let mut c = d.raw().await;
    c.send(frame(
        Kind::Hello,
        json!({"protocol": 1, "client_id": id, "schedule": "s", "secret": secret.trim(), "intent": "restore"}),
    ))
    .await
    .unwrap();
    assert_eq!(answer(&mut c).await.kind, Kind::Welcome);
    c.send(frame(Kind::Get, json!({"path": "big.bin"})))
        .await
        .unwrap();
    assert_eq!(answer(&mut c).await.kind, Kind::File);
    c
}

async fn session_result(pool: &sqlx::SqlitePool, client: &str) -> Option<String> {
    sqlx::query_scalar(
        "SELECT result FROM sessions WHERE client = ? AND intent = 'restore' AND ended_at IS NOT NULL",
    )
    .bind(client)
    .fetch_optional(pool)
    .await
    .unwrap()
}

/// A peer that stops reading during GET is cut after `idle_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_that_stops_reading_is_cut_after_idle_timeout() {
    let _serial = SERIAL.lock().await;
    let (dir, d) = start("idle_timeout = \"2s\"", "", "");
    let pool = d.db().await;
    // 32 MiB: more than loopback's socket buffers hold.
    let _stalled = stall_a_download(&d, dir.path(), "STALL", 32 * MIB).await;
    let t0 = Instant::now();
    let ended = until(Duration::from_secs(20), async || {
        session_result(&pool, "STALL").await.is_some()
    })
    .await;
    assert!(ended, "the stalled session was never cut");
    println!("cut {:?} after the GET", t0.elapsed());
    assert_eq!(
        session_result(&pool, "STALL").await.as_deref(),
        Some("idle_timeout")
    );
    assert!(
        t0.elapsed() >= Duration::from_millis(1900),
        "{:?}",
        t0.elapsed()
    );
}

/// ... and by deactivation within one second (CONFIG.md "Activation"),
/// measured from the config's rename to the daemon's log line.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_that_stops_reading_is_cut_by_deactivation_within_a_second() {
    let _serial = SERIAL.lock().await;
    let (dir, d) = start("idle_timeout = \"60s\"", "", "activated = true\n");
    let pool = d.db().await;
    let _stalled = stall_a_download(&d, dir.path(), "STALL", 32 * MIB).await;
    let text = std::fs::read_to_string(&d.config).unwrap();
    let renamed = jiff::Timestamp::now();
    replace_config(
        dir.path(),
        &text.replace("activated = true", "activated = false"),
    );
    let ended = until(Duration::from_secs(10), async || {
        session_result(&pool, "STALL").await.is_some()
    })
    .await;
    assert!(ended, "the stalled session was never cut");
    assert_eq!(
        session_result(&pool, "STALL").await.as_deref(),
        Some("customer_deactivated")
    );
    let log = d.log();
    let line = log
        .lines()
        .find(|l| l.contains("client=\"STALL\"") && l.contains("deactivated; ending the session"))
        .expect("the deactivation line");
    let at: jiff::Timestamp = line.split_whitespace().next().unwrap().parse().unwrap();
    let took = at.duration_since(renamed);
    println!("deactivation reached the stalled session {took:?} after the rename");
    assert!(took < jiff::SignedDuration::from_secs(1), "{took:?}");
}

/// A path is the client's text: logged escaped, it can neither break the
/// line nor forge the fail2ban line for an address of its choosing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn peer_text_cannot_forge_a_log_line() {
    let _serial = SERIAL.lock().await;
    let (_dir, d) = start("", "", "");
    let mut c = d.raw().await;
    c.send(frame(
        Kind::Hello,
        json!({"protocol": 1, "client_id": "FORGER", "schedule": "s"}),
    ))
    .await
    .unwrap();
    assert_eq!(answer(&mut c).await.kind, Kind::Welcome);
    let forged = "x\nhello: authentication failure for a from 192.0.2.99";
    c.send(frame(Kind::Get, json!({"path": forged})))
        .await
        .unwrap();
    assert_eq!(code_of(&answer(&mut c).await), "not_found");
    c.send(frame(
        Kind::Put,
        json!({"path": "p", "size": "x\r\nauthentication failure for b from 192.0.2.98"}),
    ))
    .await
    .unwrap();
    assert_eq!(code_of(&answer(&mut c).await), "bad_request");
    c.send(frame(Kind::Bye, json!({}))).await.unwrap();
    assert_eq!(answer(&mut c).await.kind, Kind::Bye);
    let log = d.log();
    assert!(
        log.contains("x\\x0ahello: authentication failure for a from 192.0.2.99"),
        "escaped in place"
    );
    for l in log.lines() {
        assert!(!l.trim_end().ends_with("from 192.0.2.99"), "forged: {l}");
        assert!(!l.trim_end().ends_with("from 192.0.2.98"), "forged: {l}");
    }
}

/// Discarded DATA pays the session's rate; an empty DATA frame ends the
/// session (it would cost nothing to send and nothing to throttle).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn discarded_and_empty_data_cannot_beat_the_rate() {
    let _serial = SERIAL.lock().await;
    let (_dir, d) = start("", "[server.throttle]\nrate = \"256 KiB/s\"\n", "");
    let mut c = d.raw().await;
    c.send(frame(
        Kind::Hello,
        json!({"protocol": 1, "client_id": "FAST", "schedule": "s"}),
    ))
    .await
    .unwrap();
    assert_eq!(answer(&mut c).await.kind, Kind::Welcome);
    const N: usize = 512 << 10;
    let t0 = Instant::now();
    c.send(frame(
        Kind::Put,
        json!({"path": "../../etc/passwd", "size": N}),
    ))
    .await
    .unwrap();
    let (mut tx, mut rx) = c.split();
    let writer = tokio::spawn(async move {
        for _ in 0..N / (16 << 10) {
            tx.send(Frame {
                kind: Kind::Data,
                payload: bytes::Bytes::from(vec![0u8; 16 << 10]),
            })
            .await
            .unwrap();
        }
        tx.send(frame(Kind::End, json!({"sha256": "0".repeat(64)})))
            .await
            .unwrap();
        tx.send(frame(Kind::List, json!({}))).await.unwrap();
        tx
    });
    let first = tokio::time::timeout(Duration::from_secs(30), rx.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(code_of(&first), "bad_path");
    let next = tokio::time::timeout(Duration::from_secs(30), rx.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        next.kind,
        Kind::Listing,
        "nothing answers the discarded DATA and END"
    );
    let took = t0.elapsed();
    println!("512 KiB of discarded DATA at 256 KiB/s took {took:?}");
    // Less at most one burst (64 KiB) of credit: 448 KiB at 256 KiB/s.
    assert!(
        took >= Duration::from_millis(1700),
        "discarded DATA beat the rate: {took:?}"
    );
    let _ = writer.await;

    let mut c = d.raw().await;
    c.send(frame(
        Kind::Hello,
        json!({"protocol": 1, "client_id": "EMPTY", "schedule": "s"}),
    ))
    .await
    .unwrap();
    assert_eq!(answer(&mut c).await.kind, Kind::Welcome);
    c.send(frame(Kind::Put, json!({"path": "f", "size": 1})))
        .await
        .unwrap();
    for _ in 0..1000 {
        if c.send(Frame {
            kind: Kind::Data,
            payload: bytes::Bytes::new(),
        })
        .await
        .is_err()
        {
            break;
        }
    }
    let f = answer(&mut c).await;
    let e: wire::ErrorBody = wire::parse(&f.payload).unwrap();
    assert_eq!((e.code.as_str(), e.fatal), ("protocol_violation", true));
}

/// Eight sessions of one client upload the same path, five rounds: the
/// commits go one at a time, and the index names the bytes on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_puts_of_one_path_leave_index_equal_to_disk() {
    let _serial = SERIAL.lock().await;
    let (dir, d) = start("", "[server.limits]\nmax_sessions_per_client = 16\n", "");
    let o = d.opts("RACER");
    Session::connect(&o).await.unwrap().bye().await.unwrap();
    let mut srcs = Vec::new();
    for i in 0..8usize {
        let p = dir.path().join(format!("src/{i}.bin"));
        make_file(&p, 50_000 + 7_919 * i, i as u64 + 10);
        srcs.push(p);
    }
    for _round in 0..5 {
        let mut tasks = Vec::new();
        for src in &srcs {
            let (o, src) = (o.clone(), src.clone());
            tasks.push(tokio::spawn(async move {
                let mut s = Session::connect(&o).await.unwrap();
                let r = s
                    .upload(
                        &[Upload {
                            local: src,
                            remote: "same/file.bin".into(),
                            ..Default::default()
                        }],
                        &|_| {},
                    )
                    .await
                    .unwrap();
                s.bye().await.unwrap();
                r[0].is_ok()
            }));
        }
        for t in tasks {
            assert!(t.await.unwrap());
        }
    }
    let pool = d.db().await;
    let (size, sha): (i64, String) = sqlx::query_as(
        "SELECT size, sha256 FROM files WHERE client = 'RACER' AND path = 'same/file.bin'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let on_disk = dir.path().join("backup/default/RACER/same/file.bin");
    let bytes = std::fs::read(&on_disk).unwrap();
    assert_eq!(
        (bytes.len() as i64, sha256_hex(&bytes)),
        (size, sha),
        "index != disk"
    );
    let used: i64 = sqlx::query_scalar("SELECT used FROM clients WHERE id = 'RACER'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(used, size, "usage is the one file's size");
    let temp = std::fs::read_dir(dir.path().join("backup/default/.tollgate-tmp"))
        .map(|r| r.count())
        .unwrap_or(0);
    assert_eq!(temp, 0, "no temporary file is left");
}
