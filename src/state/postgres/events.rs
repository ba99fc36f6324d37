//! Moves, removals and readmits seen by every node (issue 14 item 2):
//! the `client_events` table, polled by each node as on SQLite (the
//! daemon looks every 500 ms, so live sessions on every node follow
//! within a second).
//!
//! Polling "rows after the last seq I saw" is only sound if rows become
//! visible in seq order. On PostgreSQL a seq is drawn at insert time and
//! the row appears at commit, so a later seq could commit first and a
//! poller would step over the earlier one for good. Recording an event
//! therefore takes a transaction-scoped lock that serializes event
//! writers until they commit: seq order is commit order.

use super::{Cluster, lock_key};
use crate::state::ops::event_rows;
use crate::state::{EventRow, StateError};
use sqlx::PgConnection;

/// Records `kind` (`moved`, `moved-by-config`, `removed`, `purged`,
/// `readmitted`) for `client` at `at` (Unix seconds) in the caller's open
/// transaction, which must commit soon: other event writers wait for it.
pub async fn record_event(
    tx: &mut PgConnection,
    client: &str,
    kind: &str,
    customer: Option<&str>,
    at: i64,
) -> Result<i64, StateError> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(lock_key("events", ""))
        .execute(&mut *tx)
        .await?;
    Ok(sqlx::query_scalar(
        "INSERT INTO client_events (at, client, kind, customer) VALUES ($1, $2, $3, $4) RETURNING seq",
    )
    .bind(at)
    .bind(client)
    .bind(kind)
    .bind(customer)
    .fetch_one(&mut *tx)
    .await?)
}

impl Cluster {
    /// The newest event's seq (0 when none).
    pub async fn last_event(&self) -> Result<i64, StateError> {
        Ok(
            sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0)::bigint FROM client_events")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// Events after `seq`, oldest first; kinds this version does not know
    /// are skipped, as on SQLite.
    pub async fn events_after(&self, seq: i64) -> Result<Vec<EventRow>, StateError> {
        let rows: Vec<(i64, String, String, Option<String>)> = sqlx::query_as(
            "SELECT seq, client, kind, customer FROM client_events WHERE seq > $1 ORDER BY seq",
        )
        .bind(seq)
        .fetch_all(&self.pool)
        .await?;
        Ok(event_rows(rows))
    }
}
