//! Hostile and broken peers against the real daemon, while a healthy
//! session uploads beside them: none of them disturbs it, none makes the
//! daemon allocate from a length it was sent, and silent peers are cut off.

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use std::time::{Duration, Instant};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;
use tollgate::client::{Session, Upload};
use tollgate::wire::{self, FrameCodec, Kind};

const MIB: usize = 1 << 20;

async fn fatal_code(d: &Daemon, len: u32, ty: u8, payload: &[u8]) -> (Kind, String) {
    let mut s = d.tls().await;
    write_raw(&mut s, len, ty, payload).await;
    let mut c = Framed::new(s, FrameCodec::new(16 << 20));
    let f = tokio::time::timeout(Duration::from_secs(10), c.next())
        .await
        .expect("an answer")
        .unwrap()
        .unwrap();
    let code = match f.kind {
        Kind::Error => wire::parse::<wire::ErrorBody>(&f.payload).unwrap().code,
        Kind::Reject => wire::parse::<wire::Reject>(&f.payload).unwrap().code,
        other => panic!("unexpected {other:?}"),
    };
    (f.kind, code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_peers_do_not_disturb_a_healthy_session() {
    let dir = TempDir::new().unwrap();
    write_config(
        dir.path(),
        "hello_timeout = \"2s\"",
        &format!(
            "[default_customer]\nauto_add_clients = true\nbackup_location = \"{}/b\"\n",
            dir.path().display()
        ),
    );
    let d = Daemon::start(dir.path());
    let rss_before = d.rss_kib();

    // The healthy session: 40 MiB in 8 files, uploaded while the attacks run.
    let mut files = Vec::new();
    for i in 0..8 {
        let p = dir.path().join(format!("src/{i}.bin"));
        make_file(&p, 5 * MIB, i);
        files.push(Upload {
            local: p,
            remote: format!("f{i}"),
            ..Default::default()
        });
    }
    let opts = d.opts("HEALTHY");
    let healthy = tokio::spawn(async move {
        let mut s = Session::connect(&opts).await.unwrap();
        let r = s.upload(&files, &|_| {}).await.unwrap();
        let listed = s.list(None).await.unwrap();
        s.bye().await.unwrap();
        (r.iter().filter(|r| r.is_ok()).count(), listed.len())
    });

    // Frame-level attacks before HELLO.
    assert_eq!(
        fatal_code(&d, 0, 0x01, b"").await,
        (Kind::Error, "bad_frame".to_string())
    );
    assert_eq!(
        fatal_code(&d, 0xFFFF_FFF0, 0x01, b"").await,
        (Kind::Error, "frame_too_large".to_string())
    );
    assert_eq!(
        fatal_code(&d, 5, 0x66, b"abcd").await,
        (Kind::Error, "protocol_violation".to_string())
    );
    assert_eq!(
        fatal_code(&d, 9, 0x01, b"not json").await,
        (Kind::Reject, "bad_request".to_string())
    );
    assert_eq!(
        fatal_code(&d, 3, 0x20, b"{}").await,
        (Kind::Reject, "bad_request".to_string())
    );

    // Raw bytes that are not TLS: the handshake fails and the socket closes.
    let mut raw = TcpStream::connect(&d.addr).await.unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(5), raw.read(&mut buf))
        .await
        .expect("closed promptly")
        .unwrap_or(0);
    assert!(n < 256, "the server answered plaintext at length");

    // Slowloris: a TCP peer that never starts TLS, and a TLS peer that sends
    // half a frame. Both are cut off at hello_timeout.
    let t0 = Instant::now();
    let mut silent = TcpStream::connect(&d.addr).await.unwrap();
    let mut half = d.tls().await;
    half.write_all(&[0, 0, 0]).await.unwrap();
    half.flush().await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buf))
        .await
        .expect("cut off");
    assert!(matches!(r, Ok(0) | Err(_)), "the silent peer got data");
    let mut c = Framed::new(half, FrameCodec::new(16 << 20));
    let f = tokio::time::timeout(Duration::from_secs(10), c.next())
        .await
        .expect("cut off")
        .unwrap()
        .unwrap();
    assert_eq!(
        wire::parse::<wire::Reject>(&f.payload).unwrap().code,
        "timeout"
    );
    assert!(
        t0.elapsed() >= Duration::from_millis(1500) && t0.elapsed() < Duration::from_secs(9),
        "{:?}",
        t0.elapsed()
    );

    // A garbage frame after WELCOME ends only that session.
    let mut c = d.raw().await;
    c.send(frame(
        Kind::Hello,
        json!({"protocol": 1, "client_id": "NOISY", "schedule": "s"}),
    ))
    .await
    .unwrap();
    assert_eq!(c.next().await.unwrap().unwrap().kind, Kind::Welcome);
    c.send(frame(Kind::Put, json!({"path": "x", "size": "many"})))
        .await
        .unwrap();
    let e: wire::ErrorBody = wire::parse(&c.next().await.unwrap().unwrap().payload).unwrap();
    assert_eq!((e.code.as_str(), e.fatal), ("bad_request", false));
    assert!(e.message.contains("size"), "{}", e.message);

    let (stored, listed) = tokio::time::timeout(Duration::from_secs(120), healthy)
        .await
        .expect("healthy session finished")
        .unwrap();
    assert_eq!((stored, listed), (8, 8));
    let rss_after = d.rss_kib();
    assert!(
        rss_after < rss_before + 200 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
}
