//! The daemon's life: `kill -9` during a large upload and a restart, and
//! SIGTERM with an upload that finishes within the grace period and one
//! that does not.

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use std::time::Duration;
use tempfile::TempDir;
use tollgate::client::{Session, Upload};
use tollgate::wire::{self, Frame, Kind};

const MIB: usize = 1 << 20;

fn setup(grace: &str) -> (TempDir, Daemon) {
    let dir = TempDir::new().unwrap();
    write_config(
        dir.path(),
        &format!("shutdown_grace = \"{grace}\""),
        &format!(
            "[default_customer]\nauto_add_clients = true\nbackup_location = \"{}/b\"\n",
            dir.path().display()
        ),
    );
    let d = Daemon::start(dir.path());
    (dir, d)
}

fn temp_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir.join("b/.tollgate-tmp"))
        .map(|d| d.count())
        .unwrap_or(0)
}

async fn used(d: &Daemon, id: &str) -> i64 {
    let pool = d.db().await;
    let n: i64 = sqlx::query_scalar("SELECT COALESCE(SUM(used), 0) FROM clients WHERE id = ?")
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    n
}

/// Opens a session and starts an upload of `size` bytes, sending only
/// `sent` of them. Returns the connection.
async fn partial_upload(
    d: &Daemon,
    id: &str,
    path: &str,
    size: usize,
    sent: usize,
) -> tokio_util::codec::Framed<
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    tollgate::wire::FrameCodec,
> {
    let mut c = d.raw().await;
    c.send(frame(
        Kind::Hello,
        json!({"protocol": 1, "client_id": id, "schedule": "s"}),
    ))
    .await
    .unwrap();
    assert_eq!(c.next().await.unwrap().unwrap().kind, Kind::Welcome);
    c.send(frame(Kind::Put, json!({"path": path, "size": size})))
        .await
        .unwrap();
    let chunk = vec![7u8; MIB];
    let mut n = 0;
    while n < sent {
        let k = MIB.min(sent - n);
        c.send(Frame {
            kind: Kind::Data,
            payload: bytes::Bytes::copy_from_slice(&chunk[..k]),
        })
        .await
        .unwrap();
        n += k;
    }
    c
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_during_a_large_upload_then_restart() {
    let (dir, mut d) = setup("30s");
    // Two complete files first.
    let mut s = Session::connect(&d.opts("PC")).await.unwrap();
    let mut done = Vec::new();
    for i in 0..2 {
        let p = dir.path().join(format!("done{i}"));
        make_file(&p, 3 * MIB + i, i as u64);
        done.push(Upload {
            local: p,
            remote: format!("done{i}"),
            ..Default::default()
        });
    }
    assert!(
        s.upload(&done, &|_| {})
            .await
            .unwrap()
            .iter()
            .all(|r| r.is_ok())
    );
    s.bye().await.unwrap();
    let committed = used(&d, "PC").await;

    // Half of a 100 MiB upload, then SIGKILL.
    let secret = std::fs::read_to_string(d.opts("PC").secret_file).unwrap();
    let mut c = d.raw().await;
    c.send(frame(
        Kind::Hello,
        json!({"protocol": 1, "client_id": "PC", "secret": secret, "schedule": "s"}),
    ))
    .await
    .unwrap();
    assert_eq!(c.next().await.unwrap().unwrap().kind, Kind::Welcome);
    c.send(frame(
        Kind::Put,
        json!({"path": "huge.img", "size": 100 * MIB}),
    ))
    .await
    .unwrap();
    let chunk = bytes::Bytes::from(vec![1u8; MIB]);
    for _ in 0..50 {
        c.send(Frame {
            kind: Kind::Data,
            payload: chunk.clone(),
        })
        .await
        .unwrap();
    }
    // Wait until the daemon has written part of it.
    for _ in 0..100 {
        if temp_files(dir.path()) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(temp_files(dir.path()), 1, "the upload is in progress");
    d.kill9();
    drop(c);

    let first_pin = d.pin.clone();
    let d = Daemon::start(dir.path());
    assert_eq!(
        d.pin, first_pin,
        "the self-signed pair is reused across restarts"
    );
    let mut s = Session::connect(&d.opts("PC")).await.unwrap();
    let listed: Vec<String> = s
        .list(None)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.path)
        .collect();
    assert_eq!(
        listed,
        vec!["done0", "done1"],
        "only complete files are listed"
    );
    s.bye().await.unwrap();
    assert_eq!(temp_files(dir.path()), 0, "no temporary file remains");
    assert_eq!(
        used(&d, "PC").await,
        committed,
        "usage equals the committed bytes"
    );
    // Reservations live in memory and end with the killed process
    // (issue 13); the space they held is free (usage equals the committed
    // bytes above).
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_an_upload_finish_within_the_grace_period() {
    let (dir, mut d) = setup("20s");
    let mut c = partial_upload(&d, "PC", "late.bin", 8 * MIB, 4 * MIB).await;
    assert!(
        wait_until(Duration::from_secs(10), || temp_files(dir.path()) == 1),
        "the upload is in progress"
    );
    d.signal("TERM");
    assert!(
        wait_until(Duration::from_secs(10), || d
            .log()
            .contains("SIGTERM: shutting down")),
        "the daemon heard SIGTERM"
    );
    // Finish it: 4 more MiB and END.
    let chunk = bytes::Bytes::from(vec![7u8; MIB]);
    for _ in 0..4 {
        c.send(Frame {
            kind: Kind::Data,
            payload: chunk.clone(),
        })
        .await
        .unwrap();
    }
    c.send(frame(
        Kind::End,
        json!({"sha256": sha256_hex(&vec![7u8; 8 * MIB])}),
    ))
    .await
    .unwrap();
    let f = c.next().await.unwrap().unwrap();
    assert_eq!(
        f.kind,
        Kind::Stored,
        "{}",
        String::from_utf8_lossy(&f.payload)
    );
    let f = c.next().await.unwrap().unwrap();
    assert_eq!(f.kind, Kind::Bye);
    assert_eq!(
        wire::parse::<wire::Bye>(&f.payload)
            .unwrap()
            .reason
            .as_deref(),
        Some("shutting_down")
    );
    assert_eq!(d.wait(Duration::from_secs(15)), Some(0));
    assert_eq!(
        std::fs::metadata(dir.path().join("b/PC/late.bin"))
            .unwrap()
            .len(),
        8 * MIB as u64
    );
    assert_eq!(temp_files(dir.path()), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_past_the_grace_period_leaves_nothing_partial() {
    let (dir, mut d) = setup("1s");
    let mut c = partial_upload(&d, "PC", "never.bin", 8 * MIB, 2 * MIB).await;
    assert!(
        wait_until(Duration::from_secs(10), || temp_files(dir.path()) == 1),
        "the upload is in progress"
    );
    d.signal("TERM");
    // The client stalls; after the grace the server says BYE and exits.
    let f = tokio::time::timeout(Duration::from_secs(10), c.next())
        .await
        .expect("BYE after the grace")
        .unwrap()
        .unwrap();
    assert_eq!(f.kind, Kind::Bye);
    assert_eq!(
        wire::parse::<wire::Bye>(&f.payload)
            .unwrap()
            .reason
            .as_deref(),
        Some("shutting_down")
    );
    assert_eq!(d.wait(Duration::from_secs(10)), Some(0));
    assert!(!dir.path().join("b/PC/never.bin").exists());
    assert_eq!(temp_files(dir.path()), 0, "no partial file remains");
    let d = Daemon::start(dir.path());
    assert_eq!(used(&d, "PC").await, 0);
    let mut s = Session::connect(&d.opts("PC-2")).await.unwrap();
    assert!(s.list(None).await.unwrap().is_empty());
    s.bye().await.unwrap();
}
