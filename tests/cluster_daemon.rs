//! Three real daemons on one PostgreSQL database, one config file and one
//! storage directory (issue 14, docs/scale-out.md): admission, space and
//! live changes stay exact across nodes, and a node killed mid-upload
//! gives its reservations back.

mod common;

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};
use tempfile::TempDir;
use tollgate::client::{ClientError, Session, Upload};
use tollgate::wire::{Frame, Kind};

const MIB: u64 = 1 << 20;

/// The measured test runs alone (it takes this for writing); the others
/// share it, so their daemons do not take the CPU it measures with.
static MEASURING: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// Three nodes, `a`, `b` and `c`, serving the config `body` (after
/// `[server]`'s keys) from one file in one directory.
struct Nodes {
    // Dropped in this order: the daemons (which archive their logs from
    // `dir`), the turn, the database, the directory.
    nodes: Vec<Daemon>,
    _turn: Turn,
    pg: PgDb,
    dir: TempDir,
}

/// A test's turn at running nodes, held until they stop.
#[allow(dead_code)] // held, never read
enum Turn {
    Shared(tokio::sync::RwLockReadGuard<'static, ()>),
    Alone(tokio::sync::RwLockWriteGuard<'static, ()>),
}

impl Nodes {
    /// `None` where there is no PostgreSQL (said loudly; CI requires it).
    async fn start(test: &str, server_extra: &str, body: &str) -> Option<Nodes> {
        Nodes::start_turn(test, server_extra, body, false).await
    }

    /// With `alone`, no other test's nodes run meanwhile.
    async fn start_turn(test: &str, server_extra: &str, body: &str, alone: bool) -> Option<Nodes> {
        let turn = if alone {
            Turn::Alone(MEASURING.write().await)
        } else {
            Turn::Shared(MEASURING.read().await)
        };
        let pg = PgDb::create(test).await?;
        let dir = TempDir::new().unwrap();
        std::fs::write(
            dir.path().join("tollgate.toml"),
            config(dir.path(), &pg, server_extra, body),
        )
        .unwrap();
        let nodes = ["a", "b", "c"]
            .iter()
            .map(|n| Daemon::start_node(dir.path(), n, &[]))
            .collect();
        Some(Nodes {
            dir,
            pg,
            nodes,
            _turn: turn,
        })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Client options for `id` on node `i`.
    fn opts(&self, i: usize, id: &str, customer: &str) -> tollgate::client::Options {
        let mut o = self.nodes[i % 3].opts(id);
        o.customer = Some(customer.into());
        o
    }

    async fn scalar(&self, sql: &str) -> i64 {
        let pool = sqlx::PgPool::connect(&self.pg.url).await.unwrap();
        let n: Option<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT CAST(({sql}) AS BIGINT)"
        )))
        .fetch_one(&pool)
        .await
        .unwrap();
        pool.close().await;
        n.unwrap_or(0)
    }

    fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|d| d.log())
            .collect::<Vec<_>>()
            .join("\n---\n")
    }
}

/// The shared config; `{DIR}` in `body` is the test's directory (backup
/// locations are absolute).
fn config(dir: &Path, pg: &PgDb, server_extra: &str, body: &str) -> String {
    format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nstate = \"{}\"\nstate_dir = \"{}/daemon\"\ntimezone = \"UTC\"\n{server_extra}\n[server.cluster]\nnodes = 3\nlease = \"2s\"\n{}",
        pg.url,
        dir.display(),
        body.replace("{DIR}", &dir.display().to_string())
            .replace("[[customer]]\n", "[[customer]]\nreseller = \"r\"\n")
            + "\n[[reseller]]\nname = \"r\"\n"
    )
}

/// A raw session of `client` under `customer` on `d`, WELCOMEd.
async fn welcomed(
    d: &Daemon,
    client: &str,
    customer: &str,
) -> tokio_util::codec::Framed<
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    tollgate::wire::FrameCodec,
> {
    let mut s = d.raw().await;
    s.send(frame(
        Kind::Hello,
        json!({"protocol": 1, "client_id": client, "customer": customer, "schedule": "s", "intent": "backup"}),
    ))
    .await
    .unwrap();
    assert_eq!(
        next_frame(&mut s, Duration::from_secs(10)).await.kind,
        Kind::Welcome
    );
    s
}

/// Stores `local` as `remote` in session `s`; the file's result.
async fn store(
    s: &mut Session,
    local: &Path,
    remote: &str,
) -> Result<tollgate::wire::FileInfo, ClientError> {
    let upload = Upload {
        local: local.to_path_buf(),
        remote: remote.into(),
        ..Default::default()
    };
    let mut r = s.upload(&[upload], &|_| {}).await.unwrap();
    r.remove(0)
}

fn code(e: &ClientError) -> &str {
    e.code().unwrap_or("(none)")
}

async fn next_frame(
    c: &mut (impl StreamExt<Item = Result<Frame, tollgate::wire::CodecError>> + Unpin),
    limit: Duration,
) -> Frame {
    tokio::time::timeout(limit, c.next())
        .await
        .expect("a frame in time")
        .expect("the connection stays open")
        .expect("a valid frame")
}

/// 100 first backups spread over the three nodes race for 10 MCALs, then
/// 100 more for 10 client slots: exactly 10 are admitted each time.
#[tokio::test(flavor = "multi_thread")]
async fn a_hundred_first_backups_on_three_nodes_get_exactly_ten_mcals_and_ten_slots() {
    let d = |n: &str| {
        format!(
            "backup_location = \"{{DIR}}/{n}\"\nemail = \"it@x.example\"\nauto_add_clients = true\n"
        )
    };
    let Some(c) = Nodes::start(
        "a_hundred_first_backups_on_three_nodes",
        "",
        &format!(
            "[server.mcal]\npool = 1000\n[[customer]]\nname = \"Lic\"\n{}mcal_limit = 10\n[[customer]]\nname = \"Slots\"\n{}max_clients = 10\n",
            d("lic"),
            d("slots")
        ),
    )
    .await
    else {
        return;
    };
    for (customer, refusal) in [("Lic", "mcal_exhausted"), ("Slots", "client_limit")] {
        let mut tasks = Vec::new();
        for i in 0..100 {
            let o = c.opts(i, &format!("{customer}{i:03}"), customer);
            tasks.push(tokio::spawn(async move { Session::connect(&o).await }));
        }
        let (mut admitted, mut refused) = (0, 0);
        let mut sessions = Vec::new();
        for t in tasks {
            match t.await.unwrap() {
                Ok(s) => {
                    admitted += 1;
                    sessions.push(s);
                }
                Err(e) => {
                    assert_eq!(code(&e), refusal, "{e}");
                    refused += 1;
                }
            }
        }
        assert_eq!((admitted, refused), (10, 90), "{customer}\n{}", c.logs());
        for s in sessions {
            s.bye().await.unwrap();
        }
    }
    assert_eq!(
        c.scalar("SELECT SUM(cost) FROM mcal_debits WHERE customer = 'Lic'")
            .await,
        10
    );
    assert_eq!(
        c.scalar("SELECT COUNT(*) FROM clients WHERE customer = 'Lic'")
            .await,
        10
    );
    assert_eq!(
        c.scalar("SELECT COUNT(*) FROM clients WHERE customer = 'Slots'")
            .await,
        10
    );
}

/// 50 uploads on three nodes race for the last MiB: never over by a byte.
#[tokio::test(flavor = "multi_thread")]
async fn fifty_uploads_on_three_nodes_never_overrun_the_last_mib() {
    let Some(c) = Nodes::start(
        "fifty_uploads_on_three_nodes",
        "",
        "[[customer]]\nname = \"C\"\nemail = \"it@x.example\"\nbackup_location = \"{DIR}/c\"\nauto_add_clients = true\nspace = \"11 MiB\"\n",
    )
    .await
    else {
        return;
    };
    // 10 MiB committed first, so 1 MiB is left.
    let fill = c.path().join("fill");
    make_file(&fill, 10 * MIB as usize, 1);
    let mut s = Session::connect(&c.opts(0, "FILL", "C")).await.unwrap();
    let r = store(&mut s, &fill, "fill").await;
    assert!(r.is_ok(), "{r:?}");
    s.bye().await.unwrap();

    // 50 racers of 89 KiB each: 11 fit in 1 MiB (979 KiB), 12 do not.
    let src = c.path().join("racer");
    make_file(&src, 89 * 1024, 2);
    let mut tasks = Vec::new();
    for i in 0..50 {
        let o = c.opts(i, &format!("R{i:02}"), "C");
        let src = src.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = Session::connect(&o).await.unwrap();
            let r = store(&mut s, &src, "racer").await;
            let _ = s.bye().await;
            r
        }));
    }
    let (mut stored, mut refused) = (0u64, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => stored += 1,
            Err(e) => {
                assert_eq!(code(&e), "quota_exceeded", "{e}");
                refused += 1;
            }
        }
    }
    let used = c
        .scalar("SELECT used FROM customer_usage WHERE customer = 'C'")
        .await as u64;
    assert!(used <= 11 * MIB, "{used} bytes used of 11 MiB");
    assert_eq!(used, 10 * MIB + stored * 89 * 1024, "usage is exact");
    assert_eq!(stored + refused, 50);
    assert_eq!(stored, 11, "11 racers fit in the last MiB\n{}", c.logs());
    assert_eq!(
        c.scalar("SELECT COUNT(*) FROM held").await,
        0,
        "every reservation ended"
    );
}

/// A deactivation written to the shared config file ends the customer's
/// sessions on all three nodes within a second of each node's reload.
#[tokio::test(flavor = "multi_thread")]
async fn a_deactivation_ends_sessions_on_every_node_within_a_second() {
    let customer = |active: bool| {
        format!(
            "[[customer]]\nname = \"Acme\"\nemail = \"it@x.example\"\nbackup_location = \"{{DIR}}/acme\"\nauto_add_clients = true\nactivated = {active}\n"
        )
    };
    let Some(c) = Nodes::start("a_deactivation_ends_sessions", "", &customer(true)).await else {
        return;
    };
    let mut idle = Vec::new();
    for (i, d) in c.nodes.iter().enumerate() {
        idle.push(welcomed(d, &format!("PC{i}"), "Acme").await);
    }
    let t0 = Instant::now();
    replace_config(c.path(), &config(c.path(), &c.pg, "", &customer(false)));
    let mut took = Vec::new();
    for s in &mut idle {
        let f = next_frame(s, Duration::from_secs(5)).await;
        assert_eq!(f.kind, Kind::Bye);
        let body: serde_json::Value = serde_json::from_slice(&f.payload).unwrap();
        assert_eq!(body["reason"], "customer_deactivated");
        took.push(t0.elapsed());
    }
    eprintln!("BYE on the three nodes after {took:?}");
    // Each node reloads on its own after the file settles (DEBOUNCE);
    // then its sessions are told at once.
    for t in &took {
        assert!(
            *t < Duration::from_secs(1),
            "a node took {t:?}:\n{}",
            c.logs()
        );
    }
}

/// kill -9 of a node mid-upload: its reservation stops counting within
/// one lease and is reclaimed; the other nodes serve on throughout.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_killed_mid_upload_gives_its_reservation_back() {
    let Some(mut c) = Nodes::start(
        "a_node_killed_mid_upload",
        "",
        "[[customer]]\nname = \"C\"\nemail = \"it@x.example\"\nbackup_location = \"{DIR}/c\"\nauto_add_clients = true\nspace = \"1 MiB\"\nthrottle = { enabled = true, rate = \"64 KiB/s\" }\n",
    )
    .await
    else {
        return;
    };
    // On node a: a 700 KiB upload, throttled, so it is in flight a while.
    let (mut tx, _rx) = welcomed(&c.nodes[0], "VICTIM", "C").await.split();
    tx.send(frame(Kind::Put, json!({"path": "big", "size": 700 * 1024})))
        .await
        .unwrap();
    let writer = tokio::spawn(async move {
        let chunk = Bytes::from(vec![1u8; 16 << 10]);
        loop {
            if tx
                .send(Frame {
                    kind: Kind::Data,
                    payload: chunk.clone(),
                })
                .await
                .is_err()
            {
                return;
            }
        }
    });
    assert!(
        until(Duration::from_secs(10), async || c
            .scalar("SELECT COUNT(*) FROM held")
            .await
            == 1)
        .await,
        "the upload holds its reservation"
    );

    // A session on node c, which must serve on throughout.
    let mut other = Session::connect(&c.opts(2, "OTHER", "C")).await.unwrap();
    let small = c.path().join("small");
    make_file(&small, 100 * 1024, 3);
    // 700 KiB held + 100 KiB: a 400 KiB upload does not fit beside it.
    let r = store(&mut other, &small, "before").await;
    assert!(r.is_ok(), "{r:?}");
    let mid = c.path().join("mid");
    make_file(&mid, 400 * 1024, 4);
    let r = store(&mut other, &mid, "mid").await;
    assert_eq!(r.as_ref().err().map(code), Some("quota_exceeded"), "{r:?}");

    let t0 = Instant::now();
    c.nodes[0].kill9();
    writer.abort();
    // Within one lease (2 s) and a heartbeat, the hold stops counting and
    // node b or c reclaims it.
    assert!(
        until(Duration::from_secs(10), async || c
            .scalar("SELECT COUNT(*) FROM held")
            .await
            == 0)
        .await,
        "the dead node's reservation was reclaimed\n{}",
        c.logs()
    );
    let reclaimed = t0.elapsed();
    eprintln!("reclaimed {reclaimed:?} after the kill");
    assert!(
        reclaimed < Duration::from_secs(6),
        "reclaimed only after {reclaimed:?}"
    );
    // The space is free again, on the session that never stopped.
    let r = store(&mut other, &mid, "mid").await;
    assert!(r.is_ok(), "{r:?}");
    other.bye().await.unwrap();
    assert_eq!(
        c.scalar("SELECT used FROM customer_usage WHERE customer = 'C'")
            .await,
        500 * 1024,
        "only committed files count"
    );
    assert!(c.nodes[1].log().contains("reclaimed") || c.nodes[2].log().contains("reclaimed"));
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// An aggregate cap of 30 MiB/s holds across three nodes together: their
/// shares are granted from one table, and the bytes all three take in
/// sum to the cap within 3%.
#[tokio::test(flavor = "multi_thread")]
async fn an_aggregate_cap_holds_across_three_nodes() {
    let Some(c) = Nodes::start_turn(
        "an_aggregate_cap_holds_across_three_nodes",
        "metrics_listen = \"127.0.0.1:0\"\naggregate = { rate = \"30 MiB/s\" }",
        "[[customer]]\nname = \"C\"\nemail = \"it@x.example\"\nbackup_location = \"{DIR}/c\"\nauto_add_clients = true\n",
        true,
    )
    .await
    else {
        return;
    };
    // Two sessions per node, each sending as fast as it is read.
    let mut writers = Vec::new();
    for i in 0..6 {
        let (mut tx, rx) = welcomed(&c.nodes[i % 3], &format!("PC{i}"), "C")
            .await
            .split();
        tx.send(frame(Kind::Put, json!({"path": "big", "size": 4u64 << 30})))
            .await
            .unwrap();
        writers.push(tokio::spawn(async move {
            let _rx = rx;
            let chunk = Bytes::from(vec![5u8; 64 << 10]);
            loop {
                if tx
                    .send(Frame {
                        kind: Kind::Data,
                        payload: chunk.clone(),
                    })
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }));
    }
    let received = || -> f64 {
        c.nodes
            .iter()
            .map(|d| {
                metric(
                    &http_get(d.metrics.as_ref().unwrap(), "/metrics").1,
                    "tollgate_bytes_received_total",
                )
            })
            .sum()
    };
    // Shares settle within two asks (one a second) of the demand.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (b0, t0) = (received(), Instant::now());
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (b1, t1) = (received(), Instant::now());
    for w in writers {
        w.abort();
    }
    let rate = (b1 - b0) / (t1 - t0).as_secs_f64();
    let cap = 30.0 * MIB as f64;
    eprintln!(
        "three nodes took {:.2} MiB/s together against a cap of 30 MiB/s ({:+.2}%)",
        rate / MIB as f64,
        (rate / cap - 1.0) * 100.0
    );
    assert!(
        (rate / cap - 1.0).abs() <= 0.03,
        "{:.2} MiB/s against 30 MiB/s\n{}",
        rate / MIB as f64,
        c.logs()
    );
    let granted = c
        .scalar("SELECT SUM(granted) FROM cap_shares WHERE cap = 'server' AND expires_ms > (extract(epoch from statement_timestamp()) * 1000)::bigint")
        .await;
    assert!(granted as u64 <= 30 * MIB, "grants sum to {granted}");
}

/// One client storing one path from two nodes at once, over and over:
/// the path's lock holds across nodes, so the index, the usage and the
/// file on disk agree at the end.
#[tokio::test(flavor = "multi_thread")]
async fn one_path_stored_from_two_nodes_at_once_stays_exact() {
    let Some(c) = Nodes::start(
        "one_path_stored_from_two_nodes",
        "",
        "[[customer]]\nname = \"C\"\nemail = \"it@x.example\"\nbackup_location = \"{DIR}/c\"\nauto_add_clients = true\n",
    )
    .await
    else {
        return;
    };
    // Registered on node a; the secret file serves node b as well.
    Session::connect(&c.opts(0, "TWIN", "C"))
        .await
        .unwrap()
        .bye()
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for (node, size) in [(0usize, 10 * 1024usize), (1, 20 * 1024)] {
        let src = c.path().join(format!("src{node}"));
        make_file(&src, size, node as u64 + 7);
        let o = c.opts(node, "TWIN", "C");
        tasks.push(tokio::spawn(async move {
            let mut s = Session::connect(&o).await.unwrap();
            for _ in 0..25 {
                let r = store(&mut s, &src, "same.bin").await;
                assert!(r.is_ok(), "{r:?}");
            }
            s.bye().await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let indexed = c
        .scalar("SELECT size FROM files WHERE client = 'TWIN' AND path = 'same.bin'")
        .await;
    let used = c.scalar("SELECT used FROM clients WHERE id = 'TWIN'").await;
    let customer = c
        .scalar("SELECT used FROM customer_usage WHERE customer = 'C'")
        .await;
    let on_disk = std::fs::metadata(c.path().join("c/TWIN/same.bin"))
        .unwrap()
        .len() as i64;
    assert!(indexed == 10 * 1024 || indexed == 20 * 1024, "{indexed}");
    assert_eq!(
        (used, customer, on_disk),
        (indexed, indexed, indexed),
        "{}",
        c.logs()
    );
}

/// A second daemon started on the same machine under a serving node's
/// name stops before it touches that node's lease: the first serves on,
/// its reservation intact.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_daemon_under_a_serving_name_stops_first() {
    let Some(c) = Nodes::start(
        "a_second_daemon_under_a_serving_name",
        "",
        "[[customer]]\nname = \"C\"\nemail = \"it@x.example\"\nbackup_location = \"{DIR}/c\"\nauto_add_clients = true\nthrottle = { enabled = true, rate = \"64 KiB/s\" }\n",
    )
    .await
    else {
        return;
    };
    // An upload in flight on node a holds a reservation.
    let (mut tx, _rx) = welcomed(&c.nodes[0], "PC", "C").await.split();
    tx.send(frame(Kind::Put, json!({"path": "big", "size": 4 << 20})))
        .await
        .unwrap();
    tx.send(Frame {
        kind: Kind::Data,
        payload: Bytes::from(vec![1u8; 16 << 10]),
    })
    .await
    .unwrap();
    assert!(
        until(Duration::from_secs(10), async || c
            .scalar("SELECT COUNT(*) FROM held")
            .await
            == 1)
        .await,
        "the upload holds its reservation"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["serve", "--node", "a", "--config"])
        .arg(c.path().join("tollgate.toml"))
        .env("TOLLGATE_FAKE_NOW", PINNED_NOW)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("another tollgate daemon runs on this machine as node \"a\""),
        "{err}"
    );
    // Node a still holds its lease and its reservation, and serves.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        c.scalar("SELECT COUNT(*) FROM held").await,
        1,
        "{}",
        c.logs()
    );
    let s = tokio::time::timeout(
        Duration::from_secs(10),
        Session::connect(&c.opts(0, "OTHER", "C")),
    )
    .await
    .expect("node a answers")
    .unwrap();
    s.bye().await.unwrap();
    assert!(
        !c.nodes[0].log().contains("stopping"),
        "{}",
        c.nodes[0].log()
    );
}

/// Session mails from sessions on three nodes, through one real SMTP
/// server: every node delivers from the one outbox as soon as a message is
/// due, and each message goes out once (the outbox claims; without them
/// 13 and 15 mails went out for 12 sessions).
#[tokio::test(flavor = "multi_thread")]
async fn session_mails_from_three_nodes_go_out_once_each() {
    let mail = TempDir::new().unwrap();
    let smtp = Smtp::start(&mail.path().join("maildir"), free_port());
    let Some(c) = Nodes::start(
        "session_mails_from_three_nodes",
        &format!(
            "[server.email]\nfrom = \"tollgate@backup.example\"\nsmtp = \"smtp://127.0.0.1:{}\"\nreport_interval = \"0s\"\n",
            smtp.port
        ),
        "[[customer]]\nname = \"C\"\nemail = \"it@c.example\"\nbackup_location = \"{DIR}/c\"\nauto_add_clients = true\nemail_reports = true\n",
    )
    .await
    else {
        return;
    };
    let src = c.path().join("f");
    make_file(&src, 4096, 1);
    for i in 0..12 {
        let mut s = Session::connect(&c.opts(i, &format!("MAIL-{i:02}"), "C"))
            .await
            .unwrap();
        let r = store(&mut s, &src, "f").await;
        assert!(r.is_ok(), "{r:?}");
        s.bye().await.unwrap();
    }
    let got = smtp.wait_for(12, Duration::from_secs(30));
    assert_eq!(got.len(), 12, "{}", c.logs());
    // And no more: every node had its chance to send one again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let got = smtp.messages();
    let mut per_client = std::collections::HashMap::new();
    for m in &got {
        let text = String::from_utf8_lossy(m);
        let id = (0..12)
            .map(|i| format!("MAIL-{i:02}"))
            .find(|id| text.contains(id.as_str()))
            .unwrap_or_else(|| panic!("a mail about none of the clients:\n{text}"));
        *per_client.entry(id).or_insert(0) += 1;
    }
    assert_eq!(got.len(), 12, "{per_client:?}");
    assert!(per_client.values().all(|&n| n == 1), "{per_client:?}");
    assert_eq!(
        c.scalar("SELECT COUNT(*) FROM outbox WHERE sent_at IS NULL")
            .await,
        0
    );
    assert_eq!(c.scalar("SELECT COUNT(*) FROM outbox").await, 12);
}
