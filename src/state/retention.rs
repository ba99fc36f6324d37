//! Pruning old history (CONFIG.md `[server.retention]`): refusals,
//! sessions, client events, and delivered mail with the alert log. The
//! daemon runs it daily. Each batch is its own short transaction, so the
//! write lane is never held for long and admissions slip in between.

use super::{State, StateError, secs};
use crate::config::Retention;
use jiff::Timestamp;

/// Rows deleted per transaction.
pub const PRUNE_BATCH: i64 = 500;

/// Rows deleted by one pruning pass, per table.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    /// `refusals` rows.
    pub refusals: u64,
    /// `sessions` rows.
    pub sessions: u64,
    /// `client_events` rows.
    pub client_events: u64,
    /// Delivered `outbox` messages.
    pub sent_mail: u64,
    /// `alerts_sent` rows.
    pub alerts: u64,
    /// `usage_daily` rows.
    pub usage: u64,
    /// `console_audit` rows.
    pub audit: u64,
}

impl Pruned {
    /// Rows deleted in all.
    pub fn total(&self) -> u64 {
        self.refusals
            + self.sessions
            + self.client_events
            + self.sent_mail
            + self.alerts
            + self.usage
            + self.audit
    }
}

fn cutoff(now: Timestamp, keep: std::time::Duration) -> i64 {
    secs(now).saturating_sub(i64::try_from(keep.as_secs()).unwrap_or(i64::MAX))
}

impl State {
    /// Deletes history older than `r` allows, as of `now`.
    pub async fn prune(&self, r: &Retention, now: Timestamp) -> Result<Pruned, StateError> {
        // (table, its row key, which rows are old, the retention that
        // applies). A table without a key of its own is deleted from by
        // the backend's row address (`sql::ROWID`).
        let plan: [(&str, Option<&str>, &str, std::time::Duration); 7] = [
            ("refusals", None, "at < $1", r.refusals),
            ("sessions", None, "started_at < $1", r.sessions),
            ("client_events", Some("seq"), "at < $1", r.client_events),
            (
                "outbox",
                Some("id"),
                "sent_at IS NOT NULL AND sent_at < $1",
                r.sent_mail,
            ),
            ("alerts_sent", None, "queued_at < $1", r.sent_mail),
            ("usage_daily", None, "at < $1", r.usage),
            ("console_audit", Some("id"), "at < $1", r.audit),
        ];
        let mut counts = [0u64; 7];
        for (i, (table, key, old, keep)) in plan.iter().enumerate() {
            let before = cutoff(now, *keep);
            loop {
                let n = super::in_tx!(self, sql, tx => {
                    let key = key.unwrap_or(sql::ROWID);
                    let stmt = format!(
                        "DELETE FROM {table} WHERE {key} IN (SELECT {key} FROM {table} WHERE {old} LIMIT $2)"
                    );
                    let n = sqlx::query(sqlx::AssertSqlSafe(stmt))
                        .bind(before)
                        .bind(PRUNE_BATCH)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                    tx.commit().await?;
                    Ok(n)
                })?;
                counts[i] += n;
                if (n as i64) < PRUNE_BATCH {
                    break;
                }
                tokio::task::yield_now().await;
            }
        }
        Ok(Pruned {
            refusals: counts[0],
            sessions: counts[1],
            client_events: counts[2],
            sent_mail: counts[3],
            alerts: counts[4],
            usage: counts[5],
            audit: counts[6],
        })
    }
}
