//! Scale-out on PostgreSQL against one node on SQLite, one run (issue 14,
//! docs/benchmarks.md "Scale-out"): the same two workloads against
//! SQLite with one node, then PostgreSQL with one, two and three nodes on
//! one database (each setup on a fresh database), spread round-robin over
//! the nodes:
//! - admissions: ADMISSIONS new clients connect at once (connect to
//!   WELCOME: TLS, registration, the slot and MCAL checks);
//! - reservation round trips: SESSIONS sessions each store FILES small
//!   files one after another (PUT to STORED: reserve, record the pending
//!   commit, write and fsync, commit the index and usage, end the hold).
//!
//! All nodes run on this one machine, so more nodes add no CPU: the table
//! shows what the shared database costs, not what more machines give.
//!
//! Run through scripts/scale-out, which starts a throwaway PostgreSQL:
//! `scripts/scale-out [ADMISSIONS] [SESSIONS] [FILES]`.

#[path = "support/mod.rs"]
mod support;

use support::{Target, cpu, expect, hello, j};

use futures_util::SinkExt;
use serde_json::json;
use std::path::Path;
use std::process::Child;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::Semaphore;
use tollgate::wire::{Frame, Kind};

/// Connections being opened at once.
const OPENING: usize = 256;
/// Bytes per file of the round-trip workload.
const FILE: usize = 1024;

struct Setup {
    name: String,
    nodes: Vec<Child>,
    targets: Vec<Arc<Target>>,
}

impl Drop for Setup {
    fn drop(&mut self) {
        for c in &mut self.nodes {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[derive(Default)]
struct Row {
    name: String,
    admissions: f64,
    adm_p50: f64,
    adm_p99: f64,
    files: f64,
    file_p50: f64,
    file_p99: f64,
    cpu: f64,
    failed: usize,
}

fn main() {
    let mut args = std::env::args()
        .skip(1)
        .map(|a| a.parse::<usize>().expect("a number"));
    let admissions = args.next().unwrap_or(1000);
    let sessions = args.next().unwrap_or(100);
    let files = args.next().unwrap_or(20);
    let admin = std::env::var("TOLLGATE_TEST_DATABASE_URL")
        .expect("TOLLGATE_TEST_DATABASE_URL: run scripts/scale-out, which starts a PostgreSQL");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        println!(
            "scale-out: {admissions} admissions; {sessions} sessions × {files} files of {FILE} bytes"
        );
        let mut rows = Vec::new();
        for nodes in [0usize, 1, 2, 3] {
            let dir = tempfile::TempDir::new().unwrap();
            let (state, db) = if nodes == 0 {
                ("sqlite://state/state.db".to_string(), None)
            } else {
                let (url, name) = fresh_database(&admin).await;
                (url, Some(name))
            };
            let setup = start(dir.path(), &state, nodes);
            let row = run(&setup, admissions, sessions, files).await;
            rows.push(row);
            drop(setup);
            if let Some(name) = db {
                drop_database(&admin, &name).await;
            }
        }
        println!();
        println!("| state | admissions/s | admission p50 / p99 | files/s (reserve → commit) | file p50 / p99 | daemons' CPU s |");
        println!("|---|---|---|---|---|---|");
        for r in &rows {
            println!(
                "| {} | {:.0} | {:.0} / {:.0} ms | {:.0} | {:.1} / {:.1} ms | {:.1} |",
                r.name, r.admissions, r.adm_p50, r.adm_p99, r.files, r.file_p50, r.file_p99, r.cpu
            );
        }
        let failed: usize = rows.iter().map(|r| r.failed).sum();
        if failed > 0 {
            eprintln!("scale-out: {failed} admissions or files failed");
            std::process::exit(1);
        }
    });
}

/// A fresh database on the server `admin` names: (its URL, its name).
async fn fresh_database(admin: &str) -> (String, String) {
    let name = format!("tg_bench_{}", std::process::id());
    let pool = sqlx::PgPool::connect(admin).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    let mut url = url::Url::parse(admin).unwrap();
    url.set_path(&name);
    (url.to_string(), name)
}

async fn drop_database(admin: &str, name: &str) {
    let pool = sqlx::PgPool::connect(admin).await.unwrap();
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&pool)
    .await;
    pool.close().await;
}

/// `nodes` daemons on `state` (0: one on SQLite) sharing one config.
fn start(dir: &Path, state: &str, nodes: usize) -> Setup {
    let cfg = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nstate = \"{state}\"\nstate_dir = \"{d}/daemon\"\ntimezone = \"UTC\"\nmax_connections = 4000\n[server.limits]\nhandshakes = 4000\nper_source_connections = 100000\nregistrations_per_minute = 1000000\n[server.cluster]\nnodes = {n}\n[default_customer]\nbackup_location = \"{d}/d\"\n[[reseller]]\nname = \"r\"\n[[customer]]\nname = \"A\"\nreseller = \"r\"\nemail = \"x@y.example\"\nbackup_location = \"{d}/a\"\nauto_add_clients = true\n[[customer]]\nname = \"F\"\nreseller = \"r\"\nemail = \"x@y.example\"\nbackup_location = \"{d}/f\"\nauto_add_clients = true\nspace = \"100 GiB\"\n",
        d = dir.display(),
        n = nodes.max(1)
    );
    let path = dir.join("tollgate.toml");
    std::fs::write(&path, cfg).unwrap();
    let mut children = Vec::new();
    let mut targets = Vec::new();
    for i in 0..nodes.max(1) {
        let node = format!("n{i}");
        let (child, addr, pin) = support::start_release_daemon_with(&path, &["--node", &node]);
        children.push(child);
        targets.push(Arc::new(Target {
            addr,
            tls: tollgate::tls::client_config(Some(&pin), None).unwrap(),
        }));
    }
    Setup {
        name: match nodes {
            0 => "SQLite, 1 node".into(),
            1 => "PostgreSQL, 1 node".into(),
            n => format!("PostgreSQL, {n} nodes"),
        },
        nodes: children,
        targets,
    }
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0.0)
}

async fn run(s: &Setup, admissions: usize, sessions: usize, files: usize) -> Row {
    let pids: Vec<u32> = s.nodes.iter().map(Child::id).collect();
    let cpu0 = cpu(&pids);
    let mut row = Row {
        name: s.name.clone(),
        ..Row::default()
    };

    // Admissions: every new client at once, round-robin over the nodes.
    let gate = Arc::new(Semaphore::new(OPENING));
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..admissions)
        .map(|i| {
            let (t, gate) = (s.targets[i % s.targets.len()].clone(), gate.clone());
            tokio::spawn(async move {
                let _p = gate.acquire_owned().await.unwrap();
                let start = Instant::now();
                let c = hello(&t, &format!("adm-{i}"), "A").await;
                let took = start.elapsed().as_secs_f64() * 1000.0;
                drop(c);
                took
            })
        })
        .collect();
    let mut lat = Vec::new();
    for t in tasks {
        lat.push(t.await.unwrap());
    }
    row.admissions = admissions as f64 / t0.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    row.adm_p50 = pct(&lat, 0.5);
    row.adm_p99 = pct(&lat, 0.99);

    // Round trips: each session stores its files one after another.
    let data = bytes::Bytes::from(vec![0x5Au8; FILE]);
    let sha = {
        use sha2::Digest;
        sha2::Sha256::digest(&data)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let mut conns = Vec::new();
    for i in 0..sessions {
        match hello(&s.targets[i % s.targets.len()], &format!("rt-{i}"), "F").await {
            Ok(c) => conns.push(c),
            Err(e) => {
                eprintln!("scale-out: {e}");
                row.failed += 1;
            }
        }
    }
    let t0 = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut c| {
            let (data, sha) = (data.clone(), sha.clone());
            tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut failed = 0;
                for k in 0..files {
                    let start = Instant::now();
                    let sent = async {
                        c.send(j(Kind::Put, json!({"path": format!("f{k}"), "size": FILE})))
                            .await?;
                        c.send(Frame {
                            kind: Kind::Data,
                            payload: data.clone(),
                        })
                        .await?;
                        c.send(j(Kind::End, json!({"sha256": sha}))).await
                    }
                    .await;
                    let ok = sent.is_ok() && expect(&mut c, Kind::Stored).await.is_ok();
                    if ok {
                        lat.push(start.elapsed().as_secs_f64() * 1000.0);
                    } else {
                        failed += 1;
                    }
                }
                let _ = c.send(j(Kind::Bye, json!({}))).await;
                (lat, failed)
            })
        })
        .collect();
    let mut lat = Vec::new();
    for t in tasks {
        let (l, f) = t.await.unwrap();
        lat.extend(l);
        row.failed += f;
    }
    row.files = lat.len() as f64 / t0.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    row.file_p50 = pct(&lat, 0.5);
    row.file_p99 = pct(&lat, 0.99);
    row.cpu = cpu(&pids) - cpu0;
    row.failed += lat.is_empty() as usize;
    println!(
        "   {}: {:.0} admissions/s (p50 {:.0} ms, p99 {:.0} ms); {:.0} files/s (p50 {:.1} ms, p99 {:.1} ms)",
        row.name, row.admissions, row.adm_p50, row.adm_p99, row.files, row.file_p50, row.file_p99
    );
    row
}
