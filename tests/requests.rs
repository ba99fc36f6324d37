//! `tollgate clients move` and `clients remove` while the daemon runs
//! (issue 13): reservations of uploads in flight live in the daemon's
//! memory, so the command hands its change to the daemon, which refuses a
//! client with uploads in flight and counts the target's reservations.

mod common;

use bytes::Bytes;
use common::*;
use futures_util::SinkExt;
use serde_json::json;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use tempfile::TempDir;
use tollgate::wire::{Frame, Kind};

const KIB: u64 = 1024;

fn body(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "[[reseller]]\nname = \"r\"\n\
         [[customer]]\nname = \"Slow\"\nreseller = \"r\"\nemail = \"s@x.example\"\nbackup_location = \"{d}/slow\"\nauto_add_clients = true\nthrottle = {{ rate = \"16 KiB/s\" }}\n\
         [[customer]]\nname = \"Fast\"\nreseller = \"r\"\nemail = \"f@x.example\"\nbackup_location = \"{d}/fast\"\nauto_add_clients = true\n\
         [[customer]]\nname = \"Small\"\nreseller = \"r\"\nemail = \"m@x.example\"\nbackup_location = \"{d}/small\"\nauto_add_clients = true\nspace = \"1 MiB\"\nthrottle = {{ rate = \"16 KiB/s\" }}\n"
    )
}

/// Runs `tollgate ARGS` and returns (exit code, stdout, stderr).
fn admin(config: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env("TOLLGATE_FAKE_NOW", "2026-06-10T10:00:00Z")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A session of `id` under `customer` that has PUT `size` bytes and sent
/// the first 16 KiB: an upload in flight, held by the throttle.
async fn in_flight(
    d: &Daemon,
    id: &str,
    customer: &str,
    size: u64,
) -> tokio_util::codec::Framed<
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    tollgate::wire::FrameCodec,
> {
    let mut c = d.raw().await;
    c.send(frame(
        Kind::Hello,
        json!({"protocol": 1, "client_id": id, "customer": customer, "schedule": "s"}),
    ))
    .await
    .unwrap();
    let w = futures_util::StreamExt::next(&mut c)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        w.kind,
        Kind::Welcome,
        "{}",
        String::from_utf8_lossy(&w.payload)
    );
    c.send(frame(Kind::Put, json!({"path": "big.bin", "size": size})))
        .await
        .unwrap();
    c.send(Frame {
        kind: Kind::Data,
        payload: Bytes::from(vec![3u8; 16 * KIB as usize]),
    })
    .await
    .unwrap();
    c
}

fn in_flight_now(d: &Daemon) -> f64 {
    let text = http_get(d.metrics.as_deref().unwrap(), "/metrics").1;
    text.lines()
        .find_map(|l| l.strip_prefix("tollgate_uploads_in_flight "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(-1.0)
}

#[tokio::test]
async fn a_running_daemon_applies_moves_beside_its_uploads_in_flight() {
    let dir = TempDir::new().unwrap();
    let config = write_config(
        dir.path(),
        "metrics_listen = \"127.0.0.1:0\"\n",
        &body(dir.path()),
    );
    let d = Daemon::start(dir.path());

    // MOVER-2 stores 300 KiB under Fast.
    let mut o = d.opts("MOVER-2");
    o.customer = Some("Fast".into());
    let mut s = tollgate::client::Session::connect(&o).await.unwrap();
    let local = dir.path().join("f.bin");
    std::fs::write(&local, vec![9u8; 300 * KIB as usize]).unwrap();
    let stored = s
        .upload(
            &[tollgate::client::Upload {
                local,
                remote: "f.bin".into(),
                ..Default::default()
            }],
            &|_| {},
        )
        .await
        .unwrap();
    assert!(stored[0].is_ok(), "{stored:?}");
    s.bye().await.unwrap();

    // MOVER has an upload in flight under Slow; FILLER has 900 KiB of
    // Small's 1 MiB reserved by one.
    let mover = in_flight(&d, "MOVER", "Slow", 512 * KIB).await;
    let filler = in_flight(&d, "FILLER", "Small", 900 * KIB).await;
    assert!(
        wait_until(Duration::from_secs(10), || in_flight_now(&d) == 2.0),
        "two uploads in flight"
    );

    // The command's own process sees no reservation: the daemon must.
    let (code, _, err) = admin(&config, &["clients", "move", "MOVER", "--to", "Fast"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("has uploads in flight"), "{err}");
    let (code, _, err) = admin(&config, &["clients", "move", "MOVER-2", "--to", "Small"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("customer \"Small\" lacks space"),
        "300 KiB do not fit beside 900 KiB in flight: {err}"
    );

    // The uploads end; both moves go through.
    drop(mover);
    drop(filler);
    assert!(
        wait_until(Duration::from_secs(10), || in_flight_now(&d) == 0.0),
        "the abandoned uploads released their reservations"
    );
    let out = admin_ok(&config, &["clients", "move", "MOVER", "--to", "Fast"], &[]);
    assert!(out.contains("moved client MOVER to customer Fast"), "{out}");
    admin_ok(
        &config,
        &["clients", "move", "MOVER-2", "--to", "Small"],
        &[],
    );
    assert!(dir.path().join("small/MOVER-2/f.bin").exists());
    let out = admin_ok(&config, &["clients", "remove", "MOVER-2", "--purge"], &[]);
    assert!(
        out.contains("300 KiB freed") || out.contains("freed"),
        "{out}"
    );
    assert!(!dir.path().join("small/MOVER-2").exists());
    assert!(
        wait_until(Duration::from_secs(5), || d
            .log()
            .contains("applied an admin command's change")),
        "{}",
        d.log()
    );

    // A second daemon on the same state is refused.
    let second = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_ne!(second.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("another tollgate daemon is serving"),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
}
