//! E-mail composition speed: a consolidated report for a customer with
//! 1,000 clients (templates, HTML escaping, MIME encoding), a session
//! report, and the alert thresholds over 10,000 customers.
//!
//! Run: `cargo bench --bench reports`. Figures go in docs/benchmarks.md.

use criterion::{Criterion, criterion_group, criterion_main};
use std::collections::HashMap;
use std::fmt::Write;
use std::hint::black_box;
use std::path::Path;
use tollgate::config::{Config, CustomerId, Frequency};
use tollgate::policy::period::Period;
use tollgate::policy::space::{Debits, Usage};
use tollgate::reports::{self, SessionFacts, compose};
use tollgate::state::ClientPeriod;

const CUSTOMERS: usize = 10_000;

fn config() -> Config {
    let mut s = String::from(
        "[server]\nlisten = [\"127.0.0.1:1\"]\nstate = \"sqlite:///tmp/b.db\"\ntimezone = \"Europe/Berlin\"\n\
         [server.mcal]\npool = 100000\n\
         [server.email]\nfrom = \"tollgate@example.com\"\nadmin = \"noc@example.com\"\nspool = \"/tmp/spool\"\n\
         [[reseller]]\nname = \"r\"\nemail = \"r@example.com\"\nemail_reports = true\n",
    );
    for n in 0..CUSTOMERS {
        writeln!(
            s,
            "[[customer]]\nname = \"c{n}\"\nreseller = \"r\"\nemail = \"it@c{n}.example\"\nbackup_location = \"/srv/c{n}\"\nspace = \"1 TiB\"\nmcal_limit = 100\nemail_reports = true"
        )
        .unwrap();
    }
    Config::from_str(&s, Path::new("/etc/tollgate/bench.toml")).unwrap()
}

fn benches(c: &mut Criterion) {
    let cfg = config();
    let at = jiff::Timestamp::from_second(1_800_000_000).unwrap();
    let period = Period::last_complete(Frequency::Weekly, &cfg.server.timezone, at);
    let rows: Vec<ClientPeriod> = (0..1000)
        .map(|i| ClientPeriod {
            id: format!("CLIENT-{i:04}"),
            kind: "desktop".into(),
            used: Some(i * 1_000_000),
            last_backup: Some(1_799_990_000),
            sessions_ok: i % 8,
            sessions_failed: i % 3,
            bytes_in: i * 7_000_000,
            bytes_out: 0,
            mcal: 1,
        })
        .collect();
    let to = vec!["it@c1.example".to_string()];
    c.bench_function("consolidated report, 1,000 clients", |b| {
        b.iter(|| {
            compose::consolidated_report(&cfg, CustomerId(1), &period, black_box(&rows), &to, at)
                .unwrap()
        })
    });
    let facts = SessionFacts {
        client: "PC-1".into(),
        customer: cfg.customer(CustomerId(1)).name.clone(),
        schedule: "nightly".into(),
        result: "ok".into(),
        files_ok: 1200,
        bytes_in: 5 << 30,
        ..Default::default()
    };
    c.bench_function("session report (one session)", |b| {
        b.iter(|| {
            compose::session_digest(
                &cfg,
                "it@c1.example",
                std::slice::from_ref(black_box(&facts)),
                at,
            )
            .unwrap()
        })
    });
    let day: Vec<SessionFacts> = (0..24).map(|_| facts.clone()).collect();
    c.bench_function("session digest (24 sessions)", |b| {
        b.iter(|| compose::session_digest(&cfg, "it@c1.example", black_box(&day), at).unwrap())
    });
    let usage: HashMap<String, Usage> = (0..CUSTOMERS)
        .map(|n| {
            (
                format!("c{n}"),
                Usage {
                    used: (n as u64) << 30,
                    reserved: 0,
                },
            )
        })
        .collect();
    let clients: Vec<(String, String, i64, String)> = (0..CUSTOMERS * 10)
        .map(|i| (format!("C{i}"), format!("c{}", i / 10), 0, "desktop".into()))
        .collect();
    let debits: HashMap<String, Debits> = HashMap::new();
    c.bench_function(
        "alert thresholds, 10,000 customers / 100,000 clients",
        |b| {
            b.iter(|| {
                reports::alerts_for(
                    &cfg,
                    black_box(&usage),
                    &clients,
                    &debits,
                    &debits,
                    Debits::default(),
                )
            })
        },
    );
}

criterion_group!(reports_bench, benches);
criterion_main!(reports_bench);
