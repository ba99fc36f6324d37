//! Work done once across the nodes (issue 14 item 4): outbox messages
//! claimed by one node at a time, periodic runs (consolidated reports,
//! alerts, pruning, reconcile) claimed once per period, and the
//! per-(client, path) lock that orders commits of one path cluster-wide.

use super::{Cluster, NOW_MS, retrying};
use crate::state::StateError;
use sha2::{Digest, Sha256};
use sqlx::pool::PoolConnection;
use sqlx::{Postgres, Row};
use std::time::Duration;

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 4)
}

/// A held cluster-wide lock on one (client, path); give it back with
/// [`PathLock::unlock`]. Dropped without that, its connection is closed
/// instead of going back to the pool, which releases the lock too.
pub struct PathLock {
    conn: Option<PoolConnection<Postgres>>,
    key: i64,
}

impl PathLock {
    /// Releases the lock.
    pub async fn unlock(mut self) -> Result<(), StateError> {
        if let Some(mut c) = self.conn.take() {
            let released: bool = sqlx::query_scalar("SELECT pg_advisory_unlock($1)")
                .bind(self.key)
                .fetch_one(&mut *c)
                .await?;
            if !released {
                // Not ours any more: this connection cannot be trusted.
                drop(c.detach());
            }
        }
        Ok(())
    }
}

impl Drop for PathLock {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take() {
            // Closing the session releases its advisory locks; a pooled
            // connection still holding one would block that path forever.
            drop(c.detach());
        }
    }
}

/// The advisory key of one (client, path): the client without regard to
/// case (ids are unique that way), the path exactly.
fn path_key(client: &str, path: &str) -> i64 {
    let mut h = Sha256::new();
    h.update(b"tollgate path\0");
    h.update(client.to_ascii_lowercase().as_bytes());
    h.update(b"\0");
    h.update(path.as_bytes());
    let d = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    i64::from_le_bytes(b)
}

impl Cluster {
    /// Waits for `path` of `client` across the cluster (a session-level
    /// advisory lock on a connection of its own, held only around a commit
    /// or a delete): a node that dies holding it loses its connection, and
    /// with it the lock.
    pub async fn lock_path(&self, client: &str, path: &str) -> Result<PathLock, StateError> {
        let key = path_key(client, path);
        // The guard first: if this future is dropped while it waits (a
        // session cut off), the guard closes the connection, and the lock
        // it may be granted a moment later goes with it. A connection back
        // in the pool would hold it for good.
        let mut lock = PathLock {
            conn: Some(self.locks.acquire().await?),
            key,
        };
        if let Some(c) = lock.conn.as_mut() {
            sqlx::query("SELECT pg_advisory_lock($1)")
                .bind(key)
                .execute(&mut **c)
                .await?;
        }
        Ok(lock)
    }

    /// Claims up to `limit` outbox messages due at `now` (Unix seconds)
    /// for this node, for `lease`; returns their ids. Rows another node is
    /// claiming are skipped (`FOR UPDATE SKIP LOCKED`), and a claim is
    /// only taken over once it has expired, so no two live claims name
    /// one message.
    pub async fn claim_mail(
        &self,
        now: i64,
        limit: u32,
        lease: Duration,
    ) -> Result<Vec<i64>, StateError> {
        let rows = retrying!(
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "WITH due AS (
               SELECT o.id FROM outbox o
                WHERE o.sent_at IS NULL AND o.next_attempt_at <= $1
                  AND NOT EXISTS (SELECT 1 FROM outbox_claims c
                                   WHERE c.id = o.id AND c.expires_ms > {NOW_MS})
                ORDER BY o.next_attempt_at, o.id
                LIMIT $2
                FOR UPDATE OF o SKIP LOCKED)
             INSERT INTO outbox_claims (id, node, expires_ms)
             SELECT id, $3, {NOW_MS} + $4 FROM due
             ON CONFLICT (id) DO UPDATE SET node = excluded.node, expires_ms = excluded.expires_ms
               WHERE outbox_claims.expires_ms <= {NOW_MS}
             RETURNING id"
            )))
            .bind(now)
            .bind(i64::from(limit))
            .bind(&self.node)
            .bind(ms(lease))
            .fetch_all(&self.pool)
            .await
            .map_err(StateError::from)
        )?;
        let mut ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        ids.sort_unstable();
        Ok(ids)
    }

    /// Marks claimed message `id` sent at `at` and drops the claim; false
    /// when this node's claim was gone (it expired and another node took
    /// the message: delivery is at least once). The outbox row is locked
    /// before the claim, in the order [`Cluster::claim_mail`] takes them.
    pub async fn mail_sent(&self, id: i64, at: i64) -> Result<bool, StateError> {
        retrying!({
            let mut tx = self.pool.begin().await?;
            sqlx::query(
                "UPDATE outbox SET sent_at = $2, attempts = attempts + 1, last_error = NULL
                 WHERE id = $1 AND sent_at IS NULL",
            )
            .bind(id)
            .bind(at)
            .execute(&mut *tx)
            .await?;
            let ours = sqlx::query("DELETE FROM outbox_claims WHERE id = $1 AND node = $2")
                .bind(id)
                .bind(&self.node)
                .execute(&mut *tx)
                .await?
                .rows_affected()
                == 1;
            tx.commit().await?;
            Ok(ours)
        })
    }

    /// Drops this node's claim of message `id` after a failed attempt, so
    /// its retry is anyone's.
    pub async fn drop_mail_claim(&self, id: i64) -> Result<(), StateError> {
        sqlx::query("DELETE FROM outbox_claims WHERE id = $1 AND node = $2")
            .bind(id)
            .bind(&self.node)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Claims `job`'s run for `period` for this node, for `lease`: a claim
    /// when this node is to run it. A run already done, or claimed by a
    /// live claim, is not claimed again; a claim whose lease ran out
    /// without the run finishing is taken over. A run that may outlast its
    /// lease renews it ([`Cluster::renew_run`]) and stops when that fails.
    pub async fn claim_run(
        &self,
        job: &str,
        period: &str,
        lease: Duration,
    ) -> Result<Option<RunClaim>, StateError> {
        let mut rnd = [0u8; 8];
        getrandom::fill(&mut rnd).map_err(|e| StateError::Io {
            context: "drawing a run claim's token".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let token = i64::from_le_bytes(rnd);
        let got: Option<i32> = retrying!(sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "INSERT INTO cluster_runs (job, period, node, token, expires_ms) VALUES ($1, $2, $3, $4, {NOW_MS} + $5)
             ON CONFLICT (job, period) DO UPDATE SET node = excluded.node, token = excluded.token,
               expires_ms = excluded.expires_ms
               WHERE cluster_runs.done_ms IS NULL AND cluster_runs.expires_ms <= {NOW_MS}
             RETURNING 1"
        )))
        .bind(job)
        .bind(period)
        .bind(&self.node)
        .bind(token)
        .bind(ms(lease))
        .fetch_optional(&self.pool)
        .await
        .map_err(StateError::from))?;
        Ok(got.map(|_| RunClaim {
            job: job.to_string(),
            period: period.to_string(),
            token,
        }))
    }

    /// Extends a run's claim by `lease`; false when it was lost (expired
    /// and taken over): the run must stop.
    pub async fn renew_run(&self, claim: &RunClaim, lease: Duration) -> Result<bool, StateError> {
        Ok(sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE cluster_runs SET expires_ms = {NOW_MS} + $4
              WHERE job = $1 AND period = $2 AND token = $3 AND done_ms IS NULL
                AND expires_ms > {NOW_MS}"
        )))
        .bind(&claim.job)
        .bind(&claim.period)
        .bind(claim.token)
        .bind(ms(lease))
        .execute(&self.pool)
        .await?
        .rows_affected()
            == 1)
    }

    /// Records a claimed run as done, for a run whose writes are already
    /// committed (each pruning batch commits by itself).
    pub async fn finish_run_now(&self, claim: &RunClaim) -> Result<bool, StateError> {
        let mut tx = self.pool.begin().await?;
        let done = Cluster::finish_run(&mut tx, claim).await?;
        tx.commit().await?;
        Ok(done)
    }

    /// Records a claimed run as done, in the caller's transaction that
    /// makes the run's last writes, so they commit only while the claim
    /// is still this run's; false (and the caller rolls back) when it was
    /// lost meanwhile.
    pub async fn finish_run(
        tx: &mut sqlx::PgConnection,
        claim: &RunClaim,
    ) -> Result<bool, StateError> {
        Ok(sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE cluster_runs SET done_ms = {NOW_MS}
              WHERE job = $1 AND period = $2 AND token = $3 AND done_ms IS NULL
                AND expires_ms > {NOW_MS}"
        )))
        .bind(&claim.job)
        .bind(&claim.period)
        .bind(claim.token)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1)
    }
}

/// One claim of a periodic run (the token tells this claim from a later
/// one by the same node).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunClaim {
    job: String,
    period: String,
    token: i64,
}
