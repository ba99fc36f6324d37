//! Load tool against the real daemon (`target/release/tollgate serve`).
//!
//! It starts the daemon in a temporary directory (unthrottled, SQLite,
//! self-signed TLS) and measures:
//! - N concurrent sessions: TLS handshakes plus admissions per second, and
//!   p50/p99 admission latency (connect to WELCOME);
//! - single-stream and multi-stream upload throughput (PUT/DATA/END to
//!   STORED, so it includes hashing, writing and the durable commit);
//! - the same frames sent to a bare rustls echo-sink in this process, which
//!   only reads and discards them: the TLS ceiling of this machine.
//!
//! Run: `cargo build --release && cargo run --release --example load -- [SESSIONS] [MIB] [STREAMS]`

#[path = "support/mod.rs"]
mod support;

use support::{Target, connect, j};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use std::sync::Arc;
use std::time::Instant;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::codec::Framed;
use tollgate::wire::{Frame, FrameCodec, Kind};

const CHUNK: usize = 1 << 20;

/// Uploads `mib` MiB as one file; returns seconds from PUT to the reply.
async fn upload(t: &Target, id: &str, mib: usize, hello: bool) -> f64 {
    let mut c = connect(t).await;
    if hello {
        c.send(j(
            Kind::Hello,
            json!({"protocol": 1, "client_id": id, "schedule": "load"}),
        ))
        .await
        .unwrap();
        let w = c.next().await.unwrap().unwrap();
        assert_eq!(
            w.kind,
            Kind::Welcome,
            "{}",
            String::from_utf8_lossy(&w.payload)
        );
    }
    let chunk = Bytes::from(vec![0x5Au8; CHUNK]);
    let digest = {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        for _ in 0..mib {
            h.update(&chunk);
        }
        h.finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let t0 = Instant::now();
    c.feed(j(
        Kind::Put,
        json!({"path": format!("{id}.bin"), "size": mib * CHUNK}),
    ))
    .await
    .unwrap();
    for _ in 0..mib {
        c.feed(Frame {
            kind: Kind::Data,
            payload: chunk.clone(),
        })
        .await
        .unwrap();
    }
    c.send(j(Kind::End, json!({"sha256": digest})))
        .await
        .unwrap();
    let r = c.next().await.unwrap().unwrap();
    let secs = t0.elapsed().as_secs_f64();
    assert!(
        matches!(r.kind, Kind::Stored | Kind::End),
        "{:?}: {}",
        r.kind,
        String::from_utf8_lossy(&r.payload)
    );
    secs
}

/// A bare rustls server that reads frames and discards them, answering each
/// END with an END: the TLS-only ceiling.
async fn echo_sink(cfg: Arc<rustls::ServerConfig>) -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let acceptor = TlsAcceptor::from(cfg);
    tokio::spawn(async move {
        loop {
            let (tcp, _) = l.accept().await.unwrap();
            tcp.set_nodelay(true).unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(s) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut c = Framed::new(s, FrameCodec::new(16 << 20));
                while let Some(Ok(f)) = c.next().await {
                    if f.kind == Kind::End && c.send(j(Kind::End, json!({}))).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sessions = args.first().copied().unwrap_or(500);
    let mib = args.get(1).copied().unwrap_or(256);
    let streams = args.get(2).copied().unwrap_or(4);

    let dir = tempfile::TempDir::new().unwrap();
    std::fs::write(
        dir.path().join("tollgate.toml"),
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\nstate = \"sqlite://state/state.db\"\ntimezone = \"UTC\"\nmax_connections = 100000\n[server.limits]\nhandshakes = 10000\nper_source_connections = 100000\nregistrations_per_minute = 1000000\n[default_customer]\nauto_add_clients = true\nbackup_location = \"{}/backup\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let (mut daemon, addr, pin) = support::start_release_daemon(&dir.path().join("tollgate.toml"));
    let target = Arc::new(Target {
        addr,
        tls: tollgate::tls::client_config(Some(&pin), None).unwrap(),
    });

    // Admissions: N sessions at once, each registering a new client.
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..sessions {
        let t = target.clone();
        tasks.push(tokio::spawn(async move {
            let s0 = Instant::now();
            let mut c = connect(&t).await;
            c.send(j(
                Kind::Hello,
                json!({"protocol": 1, "client_id": format!("L{i}"), "schedule": "load"}),
            ))
            .await
            .unwrap();
            let w = c.next().await.unwrap().unwrap();
            assert_eq!(w.kind, Kind::Welcome);
            let lat = s0.elapsed().as_secs_f64();
            (lat, c)
        }));
    }
    let mut lat = Vec::new();
    let mut held = Vec::new();
    for t in tasks {
        let (l, c) = t.await.unwrap();
        lat.push(l * 1000.0);
        held.push(c);
    }
    let wall = t0.elapsed().as_secs_f64();
    drop(held);
    lat.sort_by(f64::total_cmp);

    // Uploads against the daemon.
    let single = upload(&target, "S1", mib, true).await;
    let t0 = Instant::now();
    let per = mib / streams;
    let mut tasks = Vec::new();
    for k in 0..streams {
        let t = target.clone();
        tasks.push(tokio::spawn(async move {
            upload(&t, &format!("M{k}"), per, true).await
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let multi = t0.elapsed().as_secs_f64();

    // The same frames into a bare rustls echo-sink.
    // The daemon's self-signed pair, in its state directory.
    let cert = dir
        .path()
        .join("state")
        .join(tollgate::tls::SELF_SIGNED_CERT);
    let key = dir
        .path()
        .join("state")
        .join(tollgate::tls::SELF_SIGNED_KEY);
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_file_iter(&cert)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&key).unwrap();
    let scfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let sink = Arc::new(Target {
        addr: echo_sink(Arc::new(scfg)).await,
        tls: target.tls.clone(),
    });
    let base_single = upload(&sink, "B1", mib, false).await;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for k in 0..streams {
        let t = sink.clone();
        tasks.push(tokio::spawn(async move {
            upload(&t, &format!("BM{k}"), per, false).await
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let base_multi = t0.elapsed().as_secs_f64();
    let _ = daemon.kill();
    let _ = daemon.wait();

    let mbs = |mib: usize, s: f64| mib as f64 * 1.048576 / s;
    println!(
        "sessions: {sessions} concurrent, {:.0} handshakes+admissions/s (wall {:.2} s)",
        sessions as f64 / wall,
        wall
    );
    println!(
        "admission latency: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        lat[lat.len() - 1]
    );
    let (s, bs) = (mbs(mib, single), mbs(mib, base_single));
    let (m, bm) = (mbs(per * streams, multi), mbs(per * streams, base_multi));
    println!(
        "upload, 1 stream of {mib} MiB:   daemon {s:.0} MB/s, echo-sink {bs:.0} MB/s ({:.0}% of baseline)",
        100.0 * s / bs
    );
    println!(
        "upload, {streams} streams of {per} MiB: daemon {m:.0} MB/s, echo-sink {bm:.0} MB/s ({:.0}% of baseline)",
        100.0 * m / bm
    );
}
