//! Reservations shared by several nodes on one PostgreSQL (issue 14):
//! three nodes, each with its own connection pool, race for the last space
//! of a customer and never overdraw it; a node that stops renewing its
//! lease stops holding space within one lease, and its rows are reclaimed.
//! Against a real PostgreSQL (scripts/test provides one).

mod common;

use common::*;
use std::time::Duration;
use tempfile::TempDir;
use tollgate::config::Config;
use tollgate::state::postgres::Cluster;

const MIB: u64 = 1 << 20;

fn config(dir: &std::path::Path) -> Config {
    let d = dir.display();
    let path = write_config(
        dir,
        "",
        &format!(
            "[[reseller]]\nname = \"r\"\nspace = \"100 MiB\"\n\
             [[customer]]\nname = \"Acme\"\nreseller = \"r\"\nemail = \"a@x.example\"\nbackup_location = \"{d}/acme\"\nauto_add_clients = true\nspace = \"10 MiB\"\n\
             [[customer]]\nname = \"Other\"\nreseller = \"r\"\nemail = \"o@x.example\"\nbackup_location = \"{d}/other\"\nauto_add_clients = true\nspace = \"10 MiB\"\n"
        ),
    );
    Config::load(&path).unwrap()
}

/// Clients C0..C9 of Acme with 9 MiB committed among them, and O1 of Other.
async fn seed(c: &Cluster) {
    for i in 0..10 {
        let used = if i == 0 { 9 * MIB as i64 } else { 0 };
        sqlx::query(
            "INSERT INTO clients (id, customer, kind, used) VALUES ($1, 'Acme', 'desktop', $2)",
        )
        .bind(format!("C{i}"))
        .bind(used)
        .execute(c.pool())
        .await
        .unwrap();
    }
    sqlx::query(
        "INSERT INTO clients (id, customer, kind, used) VALUES ('O1', 'Other', 'desktop', 0)",
    )
    .execute(c.pool())
    .await
    .unwrap();
    sqlx::query("INSERT INTO customer_usage (customer, used) VALUES ('Acme', $1), ('Other', 0)")
        .bind(9 * MIB as i64)
        .execute(c.pool())
        .await
        .unwrap();
}

fn at() -> jiff::Timestamp {
    PINNED_NOW.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_reservations_on_three_nodes_never_overdraw_the_last_mib() {
    let Some(pg) = PgDb::create("fifty_reservations_on_three_nodes").await else {
        return;
    };
    let dir = TempDir::new().unwrap();
    let cfg = std::sync::Arc::new(config(dir.path()));
    let lease = Duration::from_secs(60);
    let mut nodes = Vec::new();
    for n in ["n1", "n2", "n3"] {
        nodes.push(Cluster::open(&pg.url, n, lease).await.unwrap());
    }
    seed(&nodes[0]).await;

    // 50 uploads of 100,000 bytes, spread over the nodes and clients, all
    // at once: 1 MiB left fits exactly 10 of them.
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(50));
    let mut tasks = Vec::new();
    for i in 0..50 {
        let (node, cfg, start) = (nodes[i % 3].clone(), cfg.clone(), start.clone());
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            node.reserve_space(&cfg, &format!("c{}", i % 10), 100_000, at())
                .await
                .unwrap()
        }));
    }
    let mut granted = 0;
    let mut refused = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => granted += 1,
            Err(q) => refused.push(q),
        }
    }
    assert_eq!(granted, 10, "{refused:?}");
    assert!(
        refused
            .iter()
            .all(|q| q.level == "customer" && q.left == MIB - 1_000_000)
    );
    assert_eq!(nodes[1].reserved_total().await.unwrap(), 1_000_000);

    // Another customer of the same reseller is not held up by Acme's.
    assert!(
        nodes[2]
            .reserve_space(&cfg, "O1", 5 * MIB, at())
            .await
            .unwrap()
            .is_ok()
    );
    // A client id unknown to the state is an error, not a grant.
    assert!(nodes[0].reserve_space(&cfg, "NOPE", 1, at()).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_node_stops_holding_space_within_its_lease() {
    let Some(pg) = PgDb::create("a_dead_node_stops_holding_space").await else {
        return;
    };
    let dir = TempDir::new().unwrap();
    let cfg = config(dir.path());
    let lease = Duration::from_secs(4);
    let dying = Cluster::open(&pg.url, "dying", lease).await.unwrap();
    let living = Cluster::open(&pg.url, "living", lease).await.unwrap();
    seed(&living).await;

    let h = dying
        .reserve_space(&cfg, "C1", MIB / 2, at())
        .await
        .unwrap()
        .unwrap();
    let kept = living
        .reserve_space(&cfg, "C2", MIB / 4, at())
        .await
        .unwrap()
        .unwrap();
    // A node releases only its own holds.
    assert!(!living.release_reservation(h).await.unwrap());
    assert!(
        living
            .reserve_space(&cfg, "C3", MIB / 2, at())
            .await
            .unwrap()
            .is_err()
    );

    // `dying` renews once more, then stops; `living` keeps renewing. One
    // lease after that last renewal (and not much before), dying's half
    // MiB is free again; living's quarter is still held.
    assert!(dying.heartbeat().await.unwrap());
    let t0 = std::time::Instant::now();
    let mut freed = false;
    while t0.elapsed() < Duration::from_secs(30) {
        assert!(living.heartbeat().await.unwrap());
        if living
            .reserve_space(&cfg, "C3", MIB / 2, at())
            .await
            .unwrap()
            .is_ok()
        {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(freed, "dying's hold was never freed");
    assert!(
        t0.elapsed() >= Duration::from_secs(3),
        "freed before the lease ran out"
    );
    assert_eq!(living.reserved_total().await.unwrap(), MIB / 4 + MIB / 2);

    // The dead node may not reserve: its holds would be invisible.
    assert!(dying.reserve_space(&cfg, "C4", 1, at()).await.is_err());
    // Its next heartbeat says it was dead and drops what it held, so the
    // half MiB living took cannot be counted twice.
    assert!(!dying.heartbeat().await.unwrap());
    assert_eq!(
        count(&pg.url, "SELECT COUNT(*) FROM held WHERE node = 'dying'").await,
        0
    );
    assert_eq!(living.reclaim().await.unwrap(), 0);
    assert_eq!(living.reserved_total().await.unwrap(), MIB / 4 + MIB / 2);
    // Alive again, it reserves within what is left.
    assert!(
        dying
            .reserve_space(&cfg, "C4", MIB / 4, at())
            .await
            .unwrap()
            .is_ok()
    );
    assert!(
        dying
            .reserve_space(&cfg, "C4", 1, at())
            .await
            .unwrap()
            .is_err()
    );
    assert!(living.release_reservation(kept).await.unwrap());

    // A node that starts again under its name drops what it held before.
    let again = Cluster::open(&pg.url, "living", lease).await.unwrap();
    assert_eq!(again.reserved_total().await.unwrap(), MIB / 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_nodes_holds_are_reclaimed_by_the_others() {
    let Some(pg) = PgDb::create("dead_nodes_holds_reclaimed").await else {
        return;
    };
    let dir = TempDir::new().unwrap();
    let cfg = config(dir.path());
    let dying = Cluster::open(&pg.url, "dying", Duration::from_secs(1))
        .await
        .unwrap();
    let living = Cluster::open(&pg.url, "living", Duration::from_secs(60))
        .await
        .unwrap();
    seed(&living).await;
    dying
        .reserve_space(&cfg, "C1", MIB / 2, at())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        living.reclaim().await.unwrap(),
        0,
        "a live node's holds are kept"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(living.reclaim().await.unwrap(), 1);
    assert_eq!(count(&pg.url, "SELECT COUNT(*) FROM held").await, 0);
}

/// A config of one customer (no reseller) with `extra` keys, and `server`
/// keys (e.g. an MCAL pool).
fn admission_config(dir: &std::path::Path, server: &str, extra: &str) -> Config {
    let d = dir.display();
    let path = write_config(
        dir,
        "",
        &format!(
            "{server}\n[[reseller]]\nname = \"r\"\n\
             [[customer]]\nname = \"Acme\"\nreseller = \"r\"\nemail = \"a@x.example\"\nbackup_location = \"{d}/acme\"\nauto_add_clients = true\n{extra}\n"
        ),
    );
    Config::load(&path).unwrap()
}

/// 100 first backups, new clients C0..C99, spread over three nodes, all at
/// once; the codes of the refusals, and how many were admitted.
async fn race_first_backups(url: &str, cfg: Config) -> (usize, Vec<&'static str>) {
    let cfg = std::sync::Arc::new(cfg);
    let mut nodes = Vec::new();
    for n in ["n1", "n2", "n3"] {
        nodes.push(
            Cluster::open(url, n, Duration::from_secs(60))
                .await
                .unwrap(),
        );
    }
    // Every pool's connections open before the race, so the admissions run
    // side by side instead of one per new connection.
    for node in &nodes {
        let mut held = Vec::new();
        for _ in 0..8 {
            held.push(node.pool().acquire().await.unwrap());
        }
    }
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(100));
    let mut tasks = Vec::new();
    for i in 0..100 {
        let (node, cfg, start) = (nodes[i % 3].clone(), cfg.clone(), start.clone());
        tasks.push(tokio::spawn(async move {
            let hello: tollgate::policy::admission::Hello = serde_json::from_value(
                serde_json::json!({"protocol": 1, "client_id": format!("C{i}"), "customer": "Acme",
                                   "schedule": "nightly", "kind": "desktop"}),
            )
            .unwrap();
            start.wait().await;
            node.decide(&cfg, &hello, None, at(), false, false)
                .await
                .unwrap()
        }));
    }
    let (mut admitted, mut codes) = (0, Vec::new());
    for t in tasks {
        match t.await.unwrap() {
            tollgate::state::Decision::Admitted { secret, .. } => {
                assert!(secret.is_some(), "a new client is issued a secret");
                admitted += 1;
            }
            tollgate::state::Decision::Rejected { rejection, .. } => {
                codes.push(rejection.code.as_str())
            }
            tollgate::state::Decision::Verify(_) => panic!("no enroll key is configured"),
        }
    }
    (admitted, codes)
}

async fn count(url: &str, sql: &str) -> i64 {
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_first_backups_on_three_nodes_get_exactly_ten_mcals() {
    let Some(pg) = PgDb::create("a_hundred_first_backups_ten_mcals").await else {
        return;
    };
    let dir = TempDir::new().unwrap();
    let cfg = admission_config(dir.path(), "[server.mcal]\npool = 10", "");
    let (admitted, codes) = race_first_backups(&pg.url, cfg).await;
    assert_eq!(admitted, 10, "{codes:?}");
    assert!(codes.iter().all(|c| *c == "mcal_exhausted"), "{codes:?}");
    assert_eq!(
        count(
            &pg.url,
            "SELECT total FROM mcal_totals WHERE scope = 'global'"
        )
        .await,
        10
    );
    assert_eq!(count(&pg.url, "SELECT COUNT(*) FROM mcal_debits").await, 10);
    // A refusal registers nobody.
    assert_eq!(count(&pg.url, "SELECT COUNT(*) FROM clients").await, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_first_backups_on_three_nodes_get_exactly_ten_client_slots() {
    let Some(pg) = PgDb::create("a_hundred_first_backups_ten_slots").await else {
        return;
    };
    let dir = TempDir::new().unwrap();
    let cfg = admission_config(dir.path(), "", "max_clients = 10");
    let (admitted, codes) = race_first_backups(&pg.url, cfg).await;
    assert_eq!(admitted, 10, "{codes:?}");
    assert!(codes.iter().all(|c| *c == "client_limit"), "{codes:?}");
    assert_eq!(count(&pg.url, "SELECT COUNT(*) FROM clients").await, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_new_id_on_three_nodes_at_once_is_issued_one_secret() {
    let Some(pg) = PgDb::create("one_new_id_one_secret").await else {
        return;
    };
    let dir = TempDir::new().unwrap();
    let cfg = std::sync::Arc::new(admission_config(dir.path(), "", ""));
    let mut tasks = Vec::new();
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(3));
    for n in ["n1", "n2", "n3"] {
        let node = Cluster::open(&pg.url, n, Duration::from_secs(60))
            .await
            .unwrap();
        let (cfg, start) = (cfg.clone(), start.clone());
        tasks.push(tokio::spawn(async move {
            let hello: tollgate::policy::admission::Hello = serde_json::from_value(
                serde_json::json!({"protocol": 1, "client_id": "SAME", "customer": "Acme", "schedule": "s"}),
            )
            .unwrap();
            start.wait().await;
            node.decide(&cfg, &hello, None, at(), false, false).await.unwrap()
        }));
    }
    let mut secrets = 0;
    for t in tasks {
        match t.await.unwrap() {
            tollgate::state::Decision::Admitted { secret, .. } => {
                secrets += usize::from(secret.is_some())
            }
            tollgate::state::Decision::Rejected { rejection, .. } => {
                assert_eq!(rejection.code.as_str(), "auth_failed")
            }
            tollgate::state::Decision::Verify(_) => panic!("no enroll key"),
        }
    }
    assert_eq!(secrets, 1);
}

/// Three nodes on a fresh database, each with a 60 s lease.
async fn three_nodes(url: &str) -> Vec<Cluster> {
    let mut nodes = Vec::new();
    for n in ["n1", "n2", "n3"] {
        nodes.push(
            Cluster::open(url, n, Duration::from_secs(60))
                .await
                .unwrap(),
        );
    }
    nodes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outbox_messages_are_claimed_by_one_node_each() {
    let Some(pg) = PgDb::create("outbox_messages_claimed_once").await else {
        return;
    };
    let nodes = three_nodes(&pg.url).await;
    sqlx::query(
        "INSERT INTO outbox (created_at, kind, subject, mail_from, recipients, message, next_attempt_at)
         SELECT 0, 'alert', 's' || g, 'f@x.example', '[]', '\\x00', 0 FROM generate_series(1, 300) g",
    )
    .execute(nodes[0].pool())
    .await
    .unwrap();
    // Every node claims batches of 7 at once until nothing is left.
    let mut tasks = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        for _ in 0..4 {
            let node = node.clone();
            tasks.push(tokio::spawn(async move {
                let mut mine = Vec::new();
                loop {
                    let got = node
                        .claim_mail(10, 7, Duration::from_secs(60))
                        .await
                        .unwrap();
                    if got.is_empty() {
                        return (i, mine);
                    }
                    mine.extend(got);
                }
            }));
        }
    }
    let mut all = Vec::new();
    for t in tasks {
        let (_, mine) = t.await.unwrap();
        all.extend(mine);
    }
    all.sort_unstable();
    let n = all.len();
    all.dedup();
    assert_eq!(n, 300, "a message was claimed twice");
    assert_eq!(all.len(), 300);

    // Sent by its claimer; a claim that expired is taken over, and the
    // late claimer learns it lost the message.
    assert!(
        nodes[0].mail_sent(all[0], 20).await.unwrap()
            || nodes[1].mail_sent(all[0], 20).await.unwrap()
            || nodes[2].mail_sent(all[0], 20).await.unwrap()
    );
    let slow = Cluster::open(&pg.url, "slow", Duration::from_secs(60))
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO outbox (created_at, kind, subject, mail_from, recipients, message, next_attempt_at)
         VALUES (0, 'alert', 'late', 'f@x.example', '[]', '\\x00', 0)",
    )
    .execute(slow.pool())
    .await
    .unwrap();
    let late = slow
        .claim_mail(10, 10, Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(late.len(), 1);
    assert!(
        nodes[0]
            .claim_mail(10, 10, Duration::from_secs(60))
            .await
            .unwrap()
            .is_empty()
    );
    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert_eq!(
        nodes[0]
            .claim_mail(10, 10, Duration::from_secs(60))
            .await
            .unwrap(),
        late
    );
    assert!(nodes[0].mail_sent(late[0], 30).await.unwrap());
    assert!(!slow.mail_sent(late[0], 31).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_periodic_run_is_claimed_once_per_period() {
    let Some(pg) = PgDb::create("periodic_run_once").await else {
        return;
    };
    let nodes = three_nodes(&pg.url).await;
    let mut tasks = Vec::new();
    for node in &nodes {
        for _ in 0..10 {
            let node = node.clone();
            tasks.push(tokio::spawn(async move {
                node.claim_run("prune", "2026-06-10", Duration::from_secs(60))
                    .await
                    .unwrap()
            }));
        }
    }
    let mut winners = Vec::new();
    for t in tasks {
        winners.extend(t.await.unwrap());
    }
    assert_eq!(winners.len(), 1);
    // Its claim can be renewed while it runs.
    assert!(
        nodes[0]
            .renew_run(&winners[0], Duration::from_secs(60))
            .await
            .unwrap()
    );

    // Another period is another run. A claim whose node stalled past its
    // lease is taken over; the stalled run can neither renew nor finish
    // (its last writes roll back), and a run done is never claimed again.
    let stalled = nodes[1]
        .claim_run("prune", "2026-06-11", Duration::from_secs(1))
        .await
        .unwrap()
        .expect("a new period is free");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let taken = nodes[1]
        .claim_run("prune", "2026-06-11", Duration::from_secs(60))
        .await
        .unwrap()
        .expect("an expired claim is taken over, even by the same node");
    assert!(
        !nodes[1]
            .renew_run(&stalled, Duration::from_secs(60))
            .await
            .unwrap()
    );
    let mut tx = nodes[1].pool().begin().await.unwrap();
    assert!(!Cluster::finish_run(&mut tx, &stalled).await.unwrap());
    tx.rollback().await.unwrap();
    let mut tx = nodes[1].pool().begin().await.unwrap();
    assert!(Cluster::finish_run(&mut tx, &taken).await.unwrap());
    tx.commit().await.unwrap();
    for node in &nodes {
        assert!(
            node.claim_run("prune", "2026-06-11", Duration::from_millis(1))
                .await
                .unwrap()
                .is_none()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_path_is_committed_by_one_node_at_a_time() {
    let Some(pg) = PgDb::create("one_path_one_node").await else {
        return;
    };
    let nodes = three_nodes(&pg.url).await;
    for q in [
        "CREATE TABLE counter (n BIGINT NOT NULL)",
        "INSERT INTO counter VALUES (0)",
    ] {
        sqlx::query(q).execute(nodes[0].pool()).await.unwrap();
    }
    // A read-modify-write of a shared value under the path lock: without
    // mutual exclusion across nodes, increments are lost.
    let mut tasks = Vec::new();
    for i in 0..30 {
        let node = nodes[i % 3].clone();
        tasks.push(tokio::spawn(async move {
            let client = if i % 2 == 0 { "PC-1" } else { "pc-1" };
            let l = node.lock_path(client, "docs/a.txt").await.unwrap();
            let n: i64 = sqlx::query_scalar("SELECT n FROM counter")
                .fetch_one(node.pool())
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
            sqlx::query("UPDATE counter SET n = $1")
                .bind(n + 1)
                .execute(node.pool())
                .await
                .unwrap();
            l.unlock().await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let n: i64 = sqlx::query_scalar("SELECT n FROM counter")
        .fetch_one(nodes[0].pool())
        .await
        .unwrap();
    assert_eq!(n, 30);
    // Another path is not held up.
    let a = nodes[0].lock_path("PC-1", "docs/a.txt").await.unwrap();
    let b = tokio::time::timeout(
        Duration::from_secs(5),
        nodes[1].lock_path("PC-1", "docs/b.txt"),
    )
    .await
    .expect("another path is free")
    .unwrap();
    // A holder that goes away without unlocking (a panic, a node's death)
    // releases the path with its connection.
    drop(a);
    let again = tokio::time::timeout(
        Duration::from_secs(10),
        nodes[2].lock_path("pc-1", "docs/a.txt"),
    )
    .await
    .expect("the dropped lock was released")
    .unwrap();
    again.unlock().await.unwrap();
    b.unlock().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shares_of_an_aggregate_cap_never_sum_past_it_and_settle_fairly() {
    let Some(pg) = PgDb::create("shares_of_an_aggregate_cap").await else {
        return;
    };
    let nodes = three_nodes(&pg.url).await;
    const CAP: u64 = 30 * MIB;
    let lease = Duration::from_secs(60);
    // n1 and n2 want all of it, n3 a little. Refreshes in a shuffled
    // order, concurrently; after every round the grants in force must
    // still fit the cap.
    let wants = [CAP, CAP, 5 * MIB];
    let mut order = [0usize, 1, 2];
    for round in 0..6 {
        order.rotate_left(round % 3);
        let mut tasks = Vec::new();
        for &i in &order {
            let node = nodes[i].clone();
            tasks.push(tokio::spawn(async move {
                node.refresh_share("customer:Acme", CAP, wants[i], lease)
                    .await
                    .unwrap()
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert!(nodes[0].granted_total("customer:Acme").await.unwrap() <= CAP);
    }
    let mut got = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        got.push(
            node.refresh_share("customer:Acme", CAP, wants[i], lease)
                .await
                .unwrap()
                .granted,
        );
    }
    assert_eq!(got, tollgate::policy::shares::fair_shares(CAP, &wants));
    assert_eq!(got.iter().sum::<u64>(), CAP);

    // n3 dies (a short grant it never renews); once it expires, n1 and n2
    // share the whole cap.
    nodes[2]
        .refresh_share("customer:Acme", CAP, 5 * MIB, Duration::from_secs(1))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for _ in 0..2 {
        for node in &nodes[..2] {
            node.refresh_share("customer:Acme", CAP, CAP, lease)
                .await
                .unwrap();
        }
    }
    let a = nodes[0]
        .refresh_share("customer:Acme", CAP, CAP, lease)
        .await
        .unwrap()
        .granted;
    let b = nodes[1]
        .refresh_share("customer:Acme", CAP, CAP, lease)
        .await
        .unwrap()
        .granted;
    assert_eq!(a + b, CAP);
    assert!(a.abs_diff(b) <= 1, "{a} {b}");
    // Another cap is another table of shares.
    assert_eq!(
        nodes[0]
            .refresh_share("server", 10, 100, lease)
            .await
            .unwrap()
            .granted,
        10
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_node_sees_every_client_event_in_order() {
    let Some(pg) = PgDb::create("every_node_sees_every_event").await else {
        return;
    };
    let nodes = three_nodes(&pg.url).await;
    let reader = nodes[0].clone();
    let start = reader.last_event().await.unwrap();
    // Writers on every node record events inside transactions that stay
    // open a little after the insert (as a move's does), while a reader
    // polls for rows after the last seq it saw.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = {
        let (reader, done) = (reader.clone(), done.clone());
        tokio::spawn(async move {
            let (mut seen, mut got) = (start, Vec::new());
            loop {
                let finished = done.load(std::sync::atomic::Ordering::SeqCst);
                for row in reader.events_after(seen).await.unwrap() {
                    seen = row.seq;
                    got.push(row.seq);
                }
                if finished {
                    return got;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let mut writers = Vec::new();
    for i in 0..60 {
        let node = nodes[i % 3].clone();
        writers.push(tokio::spawn(async move {
            let mut tx = node.pool().begin().await.unwrap();
            tollgate::state::postgres::record_event(
                &mut tx,
                &format!("PC-{i}"),
                "removed",
                None,
                0,
            )
            .await
            .unwrap();
            // Uneven, so that without the writers' lock a later seq
            // would often commit before an earlier one.
            tokio::time::sleep(Duration::from_millis((i * 7 % 11) as u64)).await;
            tx.commit().await.unwrap();
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let got = poller.await.unwrap();
    let all: Vec<i64> = reader
        .events_after(start)
        .await
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect();
    assert_eq!(all.len(), 60);
    assert_eq!(got, all, "the poller stepped over an event");
    // Every node reads the same rows, and a kind it does not know is
    // skipped rather than guessed.
    let mut tx = nodes[1].pool().begin().await.unwrap();
    tollgate::state::postgres::record_event(&mut tx, "PC-X", "from-the-future", None, 0)
        .await
        .unwrap();
    tollgate::state::postgres::record_event(&mut tx, "PC-Y", "moved", Some("Other"), 0)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let last = nodes[2].events_after(*all.last().unwrap()).await.unwrap();
    assert_eq!(last.len(), 1);
    assert_eq!(
        last[0].event,
        tollgate::state::ClientEvent::Moved("Other".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_path_lock_given_up_while_waiting_does_not_stay_taken() {
    let Some(pg) = PgDb::create("path_lock_cancelled").await else {
        return;
    };
    let nodes = three_nodes(&pg.url).await;
    let held = nodes[0].lock_path("PC-1", "a").await.unwrap();
    // A waiter on another node gives up (its session was cut off) while
    // the lock is still held...
    let gave_up =
        tokio::time::timeout(Duration::from_millis(300), nodes[1].lock_path("PC-1", "a")).await;
    assert!(gave_up.is_err(), "the path was held");
    held.unlock().await.unwrap();
    // ...so nobody holds the path now: a third node gets it.
    let third = tokio::time::timeout(Duration::from_secs(10), nodes[2].lock_path("PC-1", "a"))
        .await
        .expect("a waiter that gave up must not keep the path")
        .unwrap();
    third.unlock().await.unwrap();
    // And node 1's pool still serves the path.
    let again = tokio::time::timeout(Duration::from_secs(10), nodes[1].lock_path("PC-1", "a"))
        .await
        .expect("node 1 can take the path")
        .unwrap();
    again.unlock().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_under_one_node_name_takes_it_over() {
    let Some(pg) = PgDb::create("node_name_taken_over").await else {
        return;
    };
    let dir = TempDir::new().unwrap();
    let cfg = config(dir.path());
    let first = Cluster::open(&pg.url, "n1", Duration::from_secs(60))
        .await
        .unwrap();
    seed(&first).await;
    first
        .reserve_space(&cfg, "C1", MIB / 2, at())
        .await
        .unwrap()
        .unwrap();
    // Started again (or twice by mistake) while the first still runs: the
    // new process drops the old holds and the old one is told to stop,
    // rather than both sharing one lease.
    let second = Cluster::open(&pg.url, "n1", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(second.reserved_total().await.unwrap(), 0);
    let e = first.reserve_space(&cfg, "C1", 1, at()).await.unwrap_err();
    assert!(
        e.to_string()
            .contains("another process has started as node"),
        "{e}"
    );
    assert!(first.heartbeat().await.is_err());
    assert!(second.heartbeat().await.unwrap());
    assert!(
        second
            .reserve_space(&cfg, "C1", MIB, at())
            .await
            .unwrap()
            .is_ok()
    );
}
