//! Throttle accuracy against the real daemon (`target/release/tollgate`):
//! 1. one session at 1, 10 and 100 MiB/s for about 10 s each: error against
//!    the configured rate;
//! 2. 1,000 concurrent sessions at 64 KiB/s: each session's error, the
//!    daemon's CPU and its RSS per session;
//! 3. 20 sessions under a 50 MiB/s aggregate: the aggregate's error and
//!    Jain's fairness index.
//!
//! Rates are measured from the client: bytes from PUT to STORED.
//! Run: `cargo build --release && cargo run --release --example throttle_accuracy -- [SESSIONS] [SECONDS]`

#[path = "support/mod.rs"]
mod support;

use support::{Conn, Target, connect, j};

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use std::sync::Arc;
use std::time::Instant;
use tollgate::wire::Kind;

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;

async fn open(t: &Target, id: &str, customer: &str) -> Conn {
    let mut c = connect(t).await;
    c.send(j(
        Kind::Hello,
        json!({"protocol": 1, "client_id": id, "customer": customer, "schedule": "bench"}),
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
    c
}

/// Uploads `size` bytes in 64 KiB frames; returns bytes per second.
async fn measure(c: Conn, size: u64) -> f64 {
    support::upload(c, size).await.unwrap()
}

#[tokio::main]
async fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let many = args.first().copied().unwrap_or(1000);
    let secs = args.get(1).copied().unwrap_or(10);
    let dir = tempfile::TempDir::new().unwrap();
    let mut cfg = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nstate = \"sqlite://state/state.db\"\ntimezone = \"UTC\"\nmax_connections = 20000\n[server.limits]\nhandshakes = 10000\nper_source_connections = 100000\nregistrations_per_minute = 1000000\n[default_customer]\nbackup_location = \"{}/d\"\n[[reseller]]\nname = \"r\"\n",
        dir.path().display()
    );
    for (name, extra) in [
        ("R1", "throttle = { rate = \"1 MiB/s\" }"),
        ("R10", "throttle = { rate = \"10 MiB/s\" }"),
        ("R100", "throttle = { rate = \"100 MiB/s\" }"),
        ("Small", "throttle = { rate = \"64 KiB/s\" }"),
        ("Agg", "aggregate = { rate = \"50 MiB/s\" }"),
    ] {
        cfg += &format!(
            "[[customer]]\nname = \"{name}\"\nreseller = \"r\"\nemail = \"x@y.example\"\nbackup_location = \"{}/{name}\"\nauto_add_clients = true\n{extra}\n",
            dir.path().display()
        );
    }
    std::fs::write(dir.path().join("tollgate.toml"), cfg).unwrap();
    let (mut daemon, addr, pin) = support::start_release_daemon(&dir.path().join("tollgate.toml"));
    let pid = daemon.id();
    let t = Arc::new(Target {
        addr,
        tls: tollgate::tls::client_config(Some(&pin), None).unwrap(),
    });

    println!("1. single session, {secs} s each");
    for (customer, rate) in [("R1", MIB), ("R10", 10 * MIB), ("R100", 100 * MIB)] {
        let c = open(&t, &format!("single-{customer}"), customer).await;
        let got = measure(c, rate * secs).await;
        println!(
            "   {:>4} MiB/s configured: measured {:.3} MiB/s, error {:+.2}%",
            rate / MIB,
            got / MIB as f64,
            100.0 * (got - rate as f64) / rate as f64
        );
    }

    println!("2. {many} sessions at 64 KiB/s, {secs} s");
    let rss0 = support::rss_kib(&[pid]);
    let mut conns = Vec::new();
    for i in 0..many {
        conns.push(open(&t, &format!("small-{i}"), "Small").await);
    }
    let rss1 = support::rss_kib(&[pid]);
    let cpu0 = support::cpu(&[pid]);
    let w0 = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|c| tokio::spawn(measure(c, 64 * KIB * secs)))
        .collect();
    let mut errs = Vec::new();
    for task in tasks {
        let r = task.await.unwrap();
        errs.push(100.0 * (r - (64 * KIB) as f64) / (64 * KIB) as f64);
    }
    let wall = w0.elapsed().as_secs_f64();
    let cpu = (support::cpu(&[pid]) - cpu0) / wall;
    errs.sort_by(f64::total_cmp);
    let worst = errs.iter().map(|e| e.abs()).fold(0.0, f64::max);
    println!(
        "   per-session error: median {:+.2}%, min {:+.2}%, max {:+.2}%, worst |error| {:.2}%",
        errs[errs.len() / 2],
        errs[0],
        errs[errs.len() - 1],
        worst
    );
    println!(
        "   daemon CPU {:.1}% of one core over {wall:.1} s; RSS {} MiB with {many} sessions open ({:.1} KiB per session)",
        cpu * 100.0,
        rss1 / 1024,
        (rss1.saturating_sub(rss0)) as f64 / many as f64
    );

    println!("3. 20 sessions under a 50 MiB/s aggregate, {secs} s");
    let mut conns = Vec::new();
    for i in 0..20 {
        conns.push(open(&t, &format!("agg-{i}"), "Agg").await);
    }
    let per = 50 * MIB * secs / 20;
    let w0 = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|c| tokio::spawn(measure(c, per)))
        .collect();
    let mut rates = Vec::new();
    for task in tasks {
        rates.push(task.await.unwrap());
    }
    let total = (per * 20) as f64 / w0.elapsed().as_secs_f64();
    let sum: f64 = rates.iter().sum();
    let jain = sum * sum / (rates.len() as f64 * rates.iter().map(|r| r * r).sum::<f64>());
    println!(
        "   aggregate {:.2} MiB/s, error {:+.2}%; Jain's index {jain:.4}",
        total / MIB as f64,
        100.0 * (total - 50.0 * MIB as f64) / (50.0 * MIB as f64)
    );
    let _ = daemon.kill();
    let _ = daemon.wait();
}
