//! The PostgreSQL backend's cluster (issue 14, docs/scale-out.md): what
//! several nodes on one database must agree on beyond the statements both
//! backends share (`state::sql`): the nodes with their leases, the
//! reservations of uploads in flight as rows ([`Cluster`]), admission,
//! work claimed once, path locks and aggregate cap shares.
//!
//! Exactness. A reservation takes, in one READ COMMITTED transaction,
//! a transaction-scoped advisory lock for each level above the client
//! that has a space allotment, always in the order server, reseller,
//! customer, client; then reads committed usage and the live holds, asks
//! `policy::space`, and inserts its row. Two reservations that could
//! overdraw the same level both lock it, so one sees the other's row; the
//! fixed order rules out deadlocks between them. Advisory locks rather
//! than row locks: no row needs to exist per level, and nothing bloats.
//! An operation that still meets a serialization failure or a deadlock
//! (SQLSTATE 40001, 40P01; sqlx does not classify them) is run again.
//!
//! Liveness. Each node has a lease in `nodes`, renewed by its heartbeat.
//! Holds count only while their node's lease runs, so a node that died
//! stops holding space within one lease; [`Cluster::reclaim`] then deletes
//! its rows. A node that starts again under its name drops what it held
//! before, as a single node drops its reservations at start.

pub(crate) mod admission;
mod caps;
mod events;
mod work;

pub use caps::Share;
pub use events::record_event;
pub use work::{PathLock, RunClaim};

use super::StateError;
use super::ops::QuotaExceeded;
use crate::config::{Config, CustomerId};
use sha2::{Digest, Sha256};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Connection, PgConnection};
use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

/// PostgreSQL's own tables, for several nodes (migrations/postgres/0002
/// on): not in the SQLite schema, and not copied by `state migrate`.
pub const CLUSTER_TABLES: &[&str] = &[
    "nodes",
    "held",
    "outbox_claims",
    "cluster_runs",
    "cap_shares",
];

/// How long a node's lease runs after each heartbeat unless configured.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(10);

/// Connections per node for state operations.
pub const POOL_SIZE: u32 = 8;
/// Connections per node for path locks (each holds one while it holds or
/// waits for a lock). A node thus uses at most POOL_SIZE + LOCK_POOL_SIZE
/// + BEAT_POOL_SIZE (26) of the server's `max_connections`.
pub const LOCK_POOL_SIZE: u32 = 16;

/// Connections per node for the heartbeat, reclaim and cap shares.
pub const BEAT_POOL_SIZE: u32 = 2;
/// The longest wait for a lock (PostgreSQL's `lock_timeout`).
const LOCK_TIMEOUT: &str = "30s";

/// Attempts of an operation that meets 40001 or 40P01.
pub(crate) const ATTEMPTS: usize = 5;

/// The database's clock in milliseconds: one clock for every node, read
/// once per statement.
pub(crate) const NOW_MS: &str = "(extract(epoch from statement_timestamp()) * 1000)::bigint";

/// Which holds count, for `held h JOIN nodes n ON n.name = h.node AND …`:
/// those of a live node, and those a pending commit rests on whatever its
/// node's lease (its file may already be in place; that node's reconcile
/// ends it).
pub(crate) const LIVE_HOLD: &str =
    "(n.expires_ms > (extract(epoch from statement_timestamp()) * 1000)::bigint
     OR EXISTS (SELECT 1 FROM pending_commits p WHERE p.reservation = h.id))";

/// Holds that may be deleted when their node's lease is gone: those no
/// pending commit rests on.
pub(crate) const UNCOMMITTED: &str =
    "NOT EXISTS (SELECT 1 FROM pending_commits p WHERE p.reservation = held.id)";

/// Runs `$body` (an expression yielding `Result<_, StateError>`) again
/// when it meets 40001 or 40P01, up to [`ATTEMPTS`] times.
macro_rules! retrying {
    ($body:expr) => {{
        let mut tries = 0;
        loop {
            let r: Result<_, crate::state::StateError> = async { $body }.await;
            match r {
                Err(crate::state::StateError::Db(e))
                    if crate::state::postgres::retryable(&e)
                        && tries + 1 < crate::state::postgres::ATTEMPTS =>
                {
                    tries += 1
                }
                r => break r,
            }
        }
    }};
}
pub(crate) use retrying;

/// Whether `e` is a serialization failure or a deadlock, which PostgreSQL
/// asks the client to retry.
pub fn retryable(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if matches!(d.code().as_deref(), Some("40001" | "40P01")))
}

/// One node's view of the cluster's shared state.
#[derive(Debug, Clone)]
pub struct Cluster {
    pool: PgPool,
    /// Connections that hold or wait for path locks ([`PathLock`]): apart,
    /// so waiters cannot take every connection the holder needs.
    locks: PgPool,
    /// The heartbeat's, reclaim's and cap shares' own connections: state
    /// operations queued on locks must not starve the lease.
    beat: PgPool,
    node: String,
    /// Drawn at [`Cluster::open`]: tells this process from another that
    /// took over its node name.
    incarnation: i64,
    lease: Duration,
}

impl Cluster {
    /// Connects, brings the schema up to date, drops what this node held
    /// in an earlier run and takes its lease.
    pub async fn open(url: &str, node: &str, lease: Duration) -> Result<Cluster, StateError> {
        let c = Cluster::connect(url, node, lease, true).await?;
        c.take_lease().await?;
        Ok(c)
    }

    /// Connects for an admin command: the schema brought up to date, but
    /// no node and no lease (it reserves nothing, and must not take over
    /// a running node's name).
    pub async fn tool(url: &str) -> Result<Cluster, StateError> {
        Cluster::connect(url, "", DEFAULT_LEASE, true).await
    }

    /// Connects for a command that only reads: nothing is created or
    /// migrated. Refused when the schema is older than this binary's.
    pub async fn reader(url: &str) -> Result<Cluster, StateError> {
        let c = Cluster::connect(url, "", DEFAULT_LEASE, false).await?;
        let applied: Option<i64> =
            sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success")
                .fetch_one(&c.pool)
                .await
                .unwrap_or(None);
        let newest = sqlx::migrate!("./migrations/postgres")
            .iter()
            .map(|m| m.version)
            .max()
            .unwrap_or(0);
        if applied.unwrap_or(0) < newest {
            c.close().await;
            return Err(StateError::Inconsistent(format!(
                "the PostgreSQL state is older than this tollgate (schema {} of {newest}) or empty: start a daemon once to bring it up to date",
                applied.unwrap_or(0)
            )));
        }
        Ok(c)
    }

    async fn connect(
        url: &str,
        node: &str,
        lease: Duration,
        migrate: bool,
    ) -> Result<Cluster, StateError> {
        // No wait for a lock (admission, space, a path) longer than this:
        // the operation fails (`internal`) instead of queueing for ever.
        let opts = PgConnectOptions::from_str(url)?.options([("lock_timeout", LOCK_TIMEOUT)]);
        // One connection first: a pool retries a refused connection until
        // its acquire timeout.
        PgConnection::connect_with(&opts).await?.close().await?;
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .acquire_timeout(super::BUSY_TIMEOUT)
            .connect_with(opts.clone())
            .await?;
        let locks = PgPoolOptions::new()
            .max_connections(LOCK_POOL_SIZE)
            .min_connections(0)
            .acquire_timeout(super::BUSY_TIMEOUT)
            .connect_lazy_with(opts.clone());
        let beat = PgPoolOptions::new()
            .max_connections(BEAT_POOL_SIZE)
            .min_connections(0)
            .acquire_timeout(super::BUSY_TIMEOUT)
            .connect_lazy_with(opts);
        if migrate {
            sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        }
        let mut rnd = [0u8; 8];
        getrandom::fill(&mut rnd).map_err(|e| StateError::Io {
            context: "drawing a node incarnation".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let c = Cluster {
            pool,
            locks,
            beat,
            node: node.to_string(),
            incarnation: i64::from_le_bytes(rnd),
            lease,
        };
        Ok(c)
    }

    /// Drops what this node held in an earlier run and takes its lease.
    async fn take_lease(&self) -> Result<(), StateError> {
        let c = self;
        let node = self.node.as_str();
        let mut tx = c.pool.begin().await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM held WHERE node = $1 AND {UNCOMMITTED}"
        )))
        .bind(node)
        .execute(&mut *tx)
        .await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO nodes (name, started_ms, expires_ms, incarnation) VALUES ($1, {NOW_MS}, {NOW_MS} + $2, $3)
             ON CONFLICT (name) DO UPDATE SET started_ms = excluded.started_ms,
               expires_ms = excluded.expires_ms, incarnation = excluded.incarnation"
        )))
        .bind(node)
        .bind(c.lease_ms())
        .bind(c.incarnation)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    fn lease_ms(&self) -> i64 {
        i64::try_from(self.lease.as_millis()).unwrap_or(i64::MAX / 4)
    }

    /// How long this node's lease runs after each heartbeat.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The pool, for the operations still being built on it.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// A lease this close to its end is not renewed but counted as run
    /// out: a renewal committing after another node read the lease as
    /// expired would bring this node's holds back after that node gave
    /// their space away.
    fn margin_ms(&self) -> i64 {
        self.lease_ms() / 4
    }

    /// Renews this node's lease; run it several times per lease (at most
    /// every quarter lease). Returns false when the lease had run out (or
    /// was within a quarter lease of it): this node's holds are then
    /// dropped in the same transaction, since the other nodes may already
    /// have given their space away, and its uploads in flight must
    /// reserve again or stop.
    pub async fn heartbeat(&self) -> Result<bool, StateError> {
        let mut tx = self.beat.begin().await?;
        let row: Option<(bool, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT expires_ms > {NOW_MS} + $2, incarnation FROM nodes WHERE name = $1 FOR UPDATE"
        )))
        .bind(&self.node)
        .bind(self.margin_ms())
        .fetch_optional(&mut *tx)
        .await?;
        if let Some((_, other)) = row
            && other != self.incarnation
        {
            return Err(self.taken_over());
        }
        let alive = row.is_some_and(|(a, _)| a);
        if !alive {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DELETE FROM held WHERE node = $1 AND {UNCOMMITTED}"
            )))
            .bind(&self.node)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO nodes (name, started_ms, expires_ms, incarnation) VALUES ($1, {NOW_MS}, {NOW_MS} + $2, $3)
             ON CONFLICT (name) DO UPDATE SET expires_ms = excluded.expires_ms"
        )))
        .bind(&self.node)
        .bind(self.lease_ms())
        .bind(self.incarnation)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(alive)
    }

    /// Deletes the holds of nodes whose lease has run out (they stopped
    /// counting when it did); returns how many. Any node may run it. The
    /// expired nodes' rows are locked first, so a heartbeat in flight is
    /// waited for and seen.
    pub async fn reclaim(&self) -> Result<u64, StateError> {
        Ok(sqlx::query(sqlx::AssertSqlSafe(format!(
            "WITH dead AS (SELECT name FROM nodes WHERE expires_ms <= {NOW_MS} FOR UPDATE)
             DELETE FROM held USING dead WHERE held.node = dead.name AND {UNCOMMITTED}"
        )))
        .execute(&self.beat)
        .await?
        .rows_affected())
    }

    /// Reserves `size` bytes for an upload by `client` at every level
    /// (PROTOCOL.md Upload), exactly across nodes; returns the hold's id.
    pub async fn reserve_space(
        &self,
        cfg: &Config,
        client: &str,
        size: u64,
        at: jiff::Timestamp,
    ) -> Result<Result<i64, QuotaExceeded>, StateError> {
        let mut tries = 0;
        loop {
            match self.try_reserve(cfg, client, size, at).await {
                Err(StateError::Db(e)) if retryable(&e) && tries + 1 < ATTEMPTS => tries += 1,
                r => return r,
            }
        }
    }

    async fn try_reserve(
        &self,
        cfg: &Config,
        client: &str,
        size: u64,
        at: jiff::Timestamp,
    ) -> Result<Result<i64, QuotaExceeded>, StateError> {
        let mut tx = self.pool.begin().await?;
        let row: Option<(String, String)> =
            // FOR SHARE: a move or removal of this client (which locks its
            // row FOR UPDATE) waits for this hold, or this for it.
            sqlx::query_as("SELECT id, customer FROM clients WHERE id = $1 COLLATE nocase FOR SHARE")
                .bind(client)
                .fetch_optional(&mut *tx)
                .await?;
        let Some((id, customer)) = row.and_then(|(id, c)| Some((id, cfg.customer_by_name(&c)?)))
        else {
            return Err(StateError::Inconsistent(format!(
                "client {client:?} is not registered under a known customer"
            )));
        };
        let declared = cfg.declared_client(&id);
        for key in lock_keys(cfg, customer, &id, declared) {
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(key)
                .execute(&mut *tx)
                .await?;
        }
        // After the waits: the lease must still run when the hold is made.
        self.check_lease(&mut tx).await?;
        let cust = &cfg.customer(customer).name;
        let usage = admission::level_usage(&mut tx, cfg, &id, customer).await?;
        if let Err(q) = QuotaExceeded::check(cfg, customer, &id, &usage, size) {
            return Ok(Err(q));
        }
        let hold: i64 = sqlx::query_scalar(
            "INSERT INTO held (node, client, customer, size, created_at) VALUES ($1, $2, $3, $4, $5) RETURNING id",
        )
        .bind(&self.node)
        .bind(&id)
        .bind(cust)
        .bind(i64::try_from(size).unwrap_or(i64::MAX))
        .bind(at.as_second())
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Ok(hold))
    }

    /// Fails unless this node's lease runs for more than the margin: a
    /// hold made by a node the others count as dead would be invisible to
    /// them, and space could be given twice.
    pub(super) async fn check_lease(&self, tx: &mut PgConnection) -> Result<(), StateError> {
        let row: Option<(bool, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT expires_ms > {NOW_MS} + $2, incarnation FROM nodes WHERE name = $1"
        )))
        .bind(&self.node)
        .bind(self.margin_ms())
        .fetch_optional(&mut *tx)
        .await?;
        if let Some((_, other)) = row
            && other != self.incarnation
        {
            return Err(self.taken_over());
        }
        if !row.is_some_and(|(a, _)| a) {
            return Err(StateError::Inconsistent(format!(
                "this node's lease ({}) has run out or is about to: its heartbeat has not reached the database",
                self.node
            )));
        }
        Ok(())
    }

    fn taken_over(&self) -> StateError {
        StateError::Inconsistent(format!(
            "another process has started as node {:?}: this one must stop (two processes may not share a node name)",
            self.node
        ))
    }

    /// Releases this node's hold `id` (an upload failed or was abandoned);
    /// false when it was not this node's or is gone.
    pub async fn release_reservation(&self, id: i64) -> Result<bool, StateError> {
        Ok(sqlx::query("DELETE FROM held WHERE id = $1 AND node = $2")
            .bind(id)
            .bind(&self.node)
            .execute(&self.pool)
            .await?
            .rows_affected()
            == 1)
    }

    /// Bytes held by every node's live reservations, per client and per
    /// customer, keyed by lowercased name.
    pub async fn holds(&self) -> Result<(HashMap<String, u64>, HashMap<String, u64>), StateError> {
        let rows: Vec<(String, String, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT h.client, h.customer, SUM(h.size)::bigint FROM held h
               JOIN nodes n ON n.name = h.node AND {LIVE_HOLD}
             GROUP BY h.client, h.customer"
        )))
        .fetch_all(&self.pool)
        .await?;
        let mut by_client: HashMap<String, u64> = HashMap::new();
        let mut by_customer: HashMap<String, u64> = HashMap::new();
        for (client, customer, size) in rows {
            let size = size.max(0) as u64;
            *by_client.entry(client.to_lowercase()).or_default() += size;
            *by_customer.entry(customer.to_lowercase()).or_default() += size;
        }
        Ok((by_client, by_customer))
    }

    /// Bytes held now by live nodes, over every client.
    pub async fn reserved_total(&self) -> Result<u64, StateError> {
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT COALESCE(SUM(h.size), 0)::bigint FROM held h
               JOIN nodes n ON n.name = h.node AND {LIVE_HOLD}"
        )))
        .fetch_one(&self.pool)
        .await?;
        Ok(n.max(0) as u64)
    }

    /// Closes the pools (the lease runs out by itself).
    pub async fn close(&self) {
        self.locks.close().await;
        self.beat.close().await;
        self.pool.close().await;
    }
}

/// The names of the customers sharing `customer`'s reseller (none without).
fn members(cfg: &Config, customer: CustomerId) -> Vec<String> {
    match cfg.customer(customer).reseller {
        None => Vec::new(),
        Some(r) => cfg
            .reseller(r)
            .customers
            .iter()
            .map(|&c| cfg.customer(c).name.clone())
            .collect(),
    }
}

/// The advisory lock keys of the levels above `client` that have a space
/// allotment, in the one order every node takes them: server, reseller,
/// customer, client. A level without an allotment decides nothing, so
/// reservations there need not wait for each other.
pub(crate) fn lock_keys(
    cfg: &Config,
    customer: CustomerId,
    client: &str,
    declared: Option<crate::config::DeclaredClientId>,
) -> Vec<i64> {
    let cust = cfg.customer(customer);
    let mut keys = Vec::new();
    if cfg.server.total_space.is_some() {
        keys.push(lock_key("server", ""));
    }
    if let Some(r) = cust.reseller
        && cfg.reseller(r).space.is_some()
    {
        keys.push(lock_key("reseller", &cfg.reseller(r).name));
    }
    if cust.space.is_some() {
        keys.push(lock_key("customer", &cust.name));
    }
    if declared.and_then(|d| cfg.client(d).space).is_some() {
        keys.push(lock_key("client", client));
    }
    keys
}

/// A 64-bit advisory lock key for one level. Names compare without regard
/// to case, as the database compares them. A collision between two keys
/// only makes unrelated reservations wait for each other.
pub(crate) fn lock_key(level: &str, name: &str) -> i64 {
    let mut h = Sha256::new();
    h.update(b"tollgate space\0");
    h.update(level.as_bytes());
    h.update(b"\0");
    h.update(name.to_lowercase().as_bytes());
    let d = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    i64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_keys_ignore_case_and_tell_levels_apart() {
        assert_eq!(lock_key("customer", "Acme"), lock_key("customer", "ACME"));
        assert_ne!(lock_key("customer", "acme"), lock_key("reseller", "acme"));
        assert_ne!(lock_key("customer", "a"), lock_key("customer", "b"));
    }
}
