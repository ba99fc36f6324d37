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
    let lease = Duration::from_millis(1500);
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

    // `living` renews its lease; `dying` stops. Within one lease (and a
    // generous margin), dying's half MiB is free again; living's quarter
    // is still held.
    let t0 = std::time::Instant::now();
    let mut freed = false;
    while t0.elapsed() < Duration::from_secs(20) {
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
        t0.elapsed() >= Duration::from_millis(1000),
        "freed before the lease ran out"
    );
    assert_eq!(living.reserved_total().await.unwrap(), MIB / 4 + MIB / 2);
    assert_eq!(living.reclaim().await.unwrap(), 1);
    // The dead node learns on its next heartbeat that its lease ran out.
    assert!(!dying.heartbeat().await.unwrap());
    assert!(living.release_reservation(kept).await.unwrap());

    // A node that starts again under its name drops what it held before.
    let again = Cluster::open(&pg.url, "living", lease).await.unwrap();
    assert_eq!(again.reserved_total().await.unwrap(), 0);
}
