//! Aggregate caps shared by the nodes (issue 14 item 3): each node
//! refreshes its share of a cap every few seconds, from the same table,
//! under that cap's lock (`policy::shares` decides). No leader: every
//! refresh sees every other node's demand and grant.
//!
//! Convergence: a node whose fair share grows gets at most what the
//! others' grants leave free; they shrink at their own next refresh, and
//! it gets the rest at its next. So shares settle within two refresh
//! intervals of a change in demand, and within one grant lease of a node's
//! death.

use super::{Cluster, NOW_MS, lock_key, retrying};
use crate::policy::shares;
use crate::state::StateError;
use sqlx::Row;
use std::time::Duration;

/// A node's share of a cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    /// Bytes per second this node may use.
    pub granted: u64,
    /// For how long, unless refreshed, counted from before the refresh
    /// was sent: the database stamps the grant's expiry a little later,
    /// so a node that stops at this deadline never uses a grant the
    /// others already count as free.
    pub valid_for: Duration,
}

impl Cluster {
    /// Reports that this node's sessions under `cap` (a name such as
    /// `server`, `reseller:NAME`, `customer:NAME`) want `wants` bytes per
    /// second of `capacity`, and takes this node's share, valid for
    /// `lease`. Refresh well within the lease.
    pub async fn refresh_share(
        &self,
        cap: &str,
        capacity: u64,
        wants: u64,
        lease: Duration,
    ) -> Result<Share, StateError> {
        retrying!(self.try_refresh_share(cap, capacity, wants, lease).await)
    }

    async fn try_refresh_share(
        &self,
        cap: &str,
        capacity: u64,
        wants: u64,
        lease: Duration,
    ) -> Result<Share, StateError> {
        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX / 4);
        let mut tx = self.beat.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(lock_key("cap", cap))
            .execute(&mut *tx)
            .await?;
        // Everyone under this cap whose grant still runs, this node
        // included with its new demand.
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT node, wants, granted FROM cap_shares
              WHERE cap = $1 AND node <> $2 AND expires_ms > {NOW_MS}
              ORDER BY node"
        )))
        .bind(cap)
        .bind(&self.node)
        .fetch_all(&mut *tx)
        .await?;
        // In node-name order, this node included, so every node splits
        // the odd bytes alike.
        let mut all: Vec<(String, u64)> = Vec::with_capacity(rows.len() + 1);
        let mut others_granted: u64 = 0;
        for r in &rows {
            all.push((r.try_get(0)?, r.try_get::<i64, _>(1)?.max(0) as u64));
            others_granted = others_granted.saturating_add(r.try_get::<i64, _>(2)?.max(0) as u64);
        }
        all.push((self.node.clone(), wants));
        all.sort();
        let me = all.iter().position(|(n, _)| *n == self.node).unwrap_or(0);
        let wants_all: Vec<u64> = all.iter().map(|(_, w)| *w).collect();
        let fair = shares::fair_shares(capacity, &wants_all)[me];
        let granted = shares::grant(capacity, fair, others_granted);
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO cap_shares (cap, node, wants, granted, expires_ms)
             VALUES ($1, $2, $3, $4, {NOW_MS} + $5)
             ON CONFLICT (cap, node) DO UPDATE SET wants = excluded.wants,
               granted = excluded.granted, expires_ms = excluded.expires_ms"
        )))
        .bind(cap)
        .bind(&self.node)
        .bind(clamp(wants))
        .bind(clamp(granted))
        .bind(lease_ms)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Share {
            granted,
            valid_for: lease,
        })
    }

    /// The sum of the grants of `cap` in force now (for checks and
    /// metrics).
    pub async fn granted_total(&self, cap: &str) -> Result<u64, StateError> {
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT COALESCE(SUM(granted), 0)::bigint FROM cap_shares
              WHERE cap = $1 AND expires_ms > {NOW_MS}"
        )))
        .bind(cap)
        .fetch_one(&self.pool)
        .await?;
        Ok(n.max(0) as u64)
    }
}
