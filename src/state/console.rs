//! Read-side queries for the web console (issue 15), and the two records
//! it keeps: daily usage snapshots for its charts, and which customers'
//! account-details mail was queued. Each query is bounded by a `LIMIT`:
//! a page never loads a table whole.

use super::mail::Outgoing;
use super::{State, StateError, secs};
use jiff::Timestamp;
use serde::Serialize;

/// One backup or restore session of a client.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct SessionRow {
    /// Session id.
    pub id: String,
    /// Schedule name the client gave.
    pub schedule: String,
    /// `backup` or `restore`.
    pub intent: String,
    /// Unix seconds.
    pub started_at: i64,
    /// Unix seconds; None while live (or after a crash).
    pub ended_at: Option<i64>,
    /// Payload bytes received.
    pub bytes_in: i64,
    /// Payload bytes sent.
    pub bytes_out: i64,
    /// Files stored or restored.
    pub files_ok: i64,
    /// Files that failed.
    pub files_failed: i64,
    /// `ok`, an error code, or None while live.
    pub result: Option<String>,
}

/// Refusals of one (minute, source, code, customer).
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct RefusalRow {
    /// The minute's start, Unix seconds.
    pub at: i64,
    /// The peer's address.
    pub source: String,
    /// The REJECT code.
    pub code: String,
    /// The customer named, or '' when none.
    pub customer: String,
    /// The client id, or `(invalid)`.
    pub client: String,
    /// How many in that minute.
    pub count: i64,
}

/// A message in the outbox.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct MailRow {
    /// Outbox id.
    pub id: i64,
    /// Unix seconds.
    pub created_at: i64,
    /// Its kind.
    pub kind: String,
    /// Its subject.
    pub subject: String,
    /// JSON array of recipients.
    pub recipients: String,
    /// Delivery attempts so far.
    pub attempts: i64,
    /// The last delivery error.
    pub last_error: Option<String>,
    /// When it went out, Unix seconds.
    pub sent_at: Option<i64>,
}

/// One customer's committed bytes at the end of one day.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct UsagePoint {
    /// `YYYY-MM-DD` in the server's zone.
    pub day: String,
    /// The customer.
    pub customer: String,
    /// Bytes.
    pub used: i64,
}

/// A customer's clients, counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientCounts {
    /// Rows in state.
    pub total: i64,
    /// Registered or declared.
    pub registered: i64,
    /// The newest admission among them (Unix seconds).
    pub last_seen: Option<i64>,
}

/// What refusals to list.
#[derive(Debug, Clone, Default)]
pub struct RefusalFilter {
    /// Only this REJECT code.
    pub code: Option<String>,
    /// Only these customers (None = all).
    pub customers: Option<Vec<String>>,
    /// Only this client.
    pub client: Option<String>,
}

impl State {
    /// Each customer's clients counted (lowercased names), so the pages
    /// over the whole tree never read every client row.
    pub async fn client_counts(
        &self,
    ) -> Result<std::collections::HashMap<String, ClientCounts>, StateError> {
        let rows: Vec<(String, i64, i64, Option<i64>)> = super::on_pool!(self, pool => {
            sqlx::query_as(
                "SELECT customer, CAST(COUNT(*) AS BIGINT),
                        CAST(SUM(CASE WHEN declared <> 0 OR secret_sha256 IS NOT NULL THEN 1 ELSE 0 END) AS BIGINT),
                        MAX(last_seen)
                 FROM clients GROUP BY customer",
            )
            .fetch_all(pool)
            .await?
        });
        let mut out: std::collections::HashMap<String, ClientCounts> = Default::default();
        for (customer, total, registered, last_seen) in rows {
            // Names differing in case are one customer.
            let e = out.entry(customer.to_lowercase()).or_default();
            e.total += total;
            e.registered += registered;
            e.last_seen = e.last_seen.max(last_seen);
        }
        Ok(out)
    }

    /// A client's newest `limit` sessions under `customer` (an id freed
    /// by a purge and registered again elsewhere does not inherit the old
    /// owner's history).
    pub async fn client_sessions(
        &self,
        client: &str,
        customer: &str,
        limit: u32,
    ) -> Result<Vec<SessionRow>, StateError> {
        Ok(super::on_pool!(self, pool => {
            sqlx::query_as::<_, SessionRow>(
                "SELECT id, schedule, intent, started_at, ended_at, bytes_in, bytes_out,
                        files_ok, files_failed, result
                 FROM sessions WHERE client = $1 AND customer = $3
                 ORDER BY started_at DESC, id LIMIT $2",
            )
            .bind(client)
            .bind(limit as i64)
            .bind(customer)
            .fetch_all(pool)
            .await?
        }))
    }

    /// The result of each client's newest finished session, by lowercased
    /// client id, for `customer`'s clients.
    pub async fn last_results(
        &self,
        customer: &str,
    ) -> Result<std::collections::HashMap<String, String>, StateError> {
        let rows: Vec<(String, Option<String>)> = super::on_pool!(self, pool => {
            sqlx::query_as(
                "SELECT s.client, s.result FROM sessions s
                 JOIN (SELECT client, MAX(started_at) AS m FROM sessions
                       WHERE customer = $1 AND ended_at IS NOT NULL GROUP BY client) t
                   ON s.client = t.client AND s.started_at = t.m
                 WHERE s.ended_at IS NOT NULL",
            )
            .bind(customer)
            .fetch_all(pool)
            .await?
        });
        Ok(rows
            .into_iter()
            .filter_map(|(c, r)| Some((c.to_lowercase(), r?)))
            .collect())
    }

    /// The newest `limit` refusal rows that `f` lets through.
    pub async fn refusals(
        &self,
        f: &RefusalFilter,
        limit: u32,
    ) -> Result<Vec<RefusalRow>, StateError> {
        // The customer list is bound as one JSON array and unpacked by the
        // database, so the statement stays the same whatever its length.
        let customers = f
            .customers
            .as_ref()
            .map(|c| serde_json::to_string(c).unwrap_or_else(|_| "[]".into()));
        Ok(super::on_pool!(self, sql, pool => {
            sqlx::query_as::<_, RefusalRow>(sqlx::AssertSqlSafe(format!(
                "SELECT at, source, code, customer, client, count FROM refusals
                 WHERE ($1 IS NULL OR code = $1)
                   AND ($2 IS NULL OR client = $2)
                   AND ($3 IS NULL OR customer IN (SELECT value FROM {}))
                 ORDER BY at DESC LIMIT $4",
                sql::json_texts(3)
            )))
            .bind(f.code.as_deref())
            .bind(f.client.as_deref())
            .bind(customers)
            .bind(limit as i64)
            .fetch_all(pool)
            .await?
        }))
    }

    /// The newest `limit` messages of the outbox, undelivered first.
    pub async fn outbox(&self, limit: u32) -> Result<Vec<MailRow>, StateError> {
        Ok(super::on_pool!(self, pool => {
            sqlx::query_as::<_, MailRow>(
                "SELECT id, created_at, kind, subject, recipients, attempts, last_error, sent_at
                 FROM outbox ORDER BY (sent_at IS NULL) DESC, id DESC LIMIT $1",
            )
            .bind(limit as i64)
            .fetch_all(pool)
            .await?
        }))
    }

    /// Records each customer's committed bytes for `day`, as of `at` (a
    /// later snapshot of the same day replaces an earlier one, so the day
    /// keeps its last figure).
    pub async fn snapshot_usage(&self, day: &str, at: Timestamp) -> Result<u64, StateError> {
        super::in_tx!(self, sql, tx => {
            let n = sqlx::query(
                "INSERT INTO usage_daily (day, customer, used, at)
                 SELECT $1, customer, used, $2 FROM customer_usage WHERE true
                 ON CONFLICT (day, customer) DO UPDATE SET used = excluded.used, at = excluded.at",
            )
            .bind(day)
            .bind(secs(at))
            .execute(&mut *tx)
            .await?
            .rows_affected();
            tx.commit().await?;
            Ok(n)
        })
    }

    /// Daily usage of `customers` from `since` (a `YYYY-MM-DD` day) on, by
    /// day.
    pub async fn usage_history(
        &self,
        customers: &[String],
        since: &str,
    ) -> Result<Vec<UsagePoint>, StateError> {
        let list = serde_json::to_string(customers).unwrap_or_else(|_| "[]".into());
        Ok(super::on_pool!(self, sql, pool => {
            sqlx::query_as::<_, UsagePoint>(sqlx::AssertSqlSafe(format!(
                "SELECT day, customer, used FROM usage_daily
                 WHERE day >= $1 AND customer IN (SELECT value FROM {})
                 ORDER BY day, customer",
                sql::json_texts(2)
            )))
            .bind(since)
            .bind(list)
            .fetch_all(pool)
            .await?
        }))
    }

    /// Bytes committed now by `customers` together.
    pub async fn usage_now(&self, customers: &[String]) -> Result<i64, StateError> {
        let list = serde_json::to_string(customers).unwrap_or_else(|_| "[]".into());
        let n: Option<i64> = super::on_pool!(self, sql, pool => {
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT CAST(SUM(used) AS BIGINT) FROM customer_usage
                 WHERE customer IN (SELECT value FROM {})",
                sql::json_texts(1)
            )))
            .bind(list)
            .fetch_one(pool)
            .await?
        });
        Ok(n.unwrap_or(0))
    }

    /// Customers whose account-details mail was queued at first sight.
    pub async fn account_details_sent(&self) -> Result<Vec<String>, StateError> {
        Ok(super::on_pool!(self, pool => {
            sqlx::query_scalar("SELECT customer FROM account_details_sent")
                .fetch_all(pool)
                .await?
        }))
    }

    /// Queues `customer`'s account-details mail unless it was queued at
    /// first sight before (on any node). Returns whether it was queued.
    pub async fn enqueue_account_details(
        &self,
        customer: &str,
        m: &Outgoing,
        at: Timestamp,
    ) -> Result<bool, StateError> {
        self.enqueue_once("account_details_sent", &[("customer", customer)], m, at)
            .await
    }

    /// Records a change made through the console (issue 16).
    pub async fn record_audit(&self, e: &AuditEntry) -> Result<(), StateError> {
        super::in_tx!(self, sql, tx => {
            sqlx::query(
                "INSERT INTO console_audit (at, login, username, action, customer, file, detail)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(e.at)
            .bind(&e.login)
            .bind(&e.username)
            .bind(&e.action)
            .bind(&e.customer)
            .bind(&e.file)
            .bind(&e.detail)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// The newest `limit` changes made through the console.
    pub async fn audit_log(&self, limit: u32) -> Result<Vec<AuditEntry>, StateError> {
        Ok(super::on_pool!(self, pool => {
            sqlx::query_as::<_, AuditEntry>(
                "SELECT at, login, username, action, customer, file, detail
                 FROM console_audit ORDER BY id DESC LIMIT $1",
            )
            .bind(limit as i64)
            .fetch_all(pool)
            .await?
        }))
    }
}

/// One change made through the console: who, what and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct AuditEntry {
    /// Unix seconds.
    pub at: i64,
    /// The kind of login: `admin`, or `reseller NAME`.
    pub login: String,
    /// The web user name.
    pub username: String,
    /// `add`, `edit`, `deactivate` or `activate`.
    pub action: String,
    /// The customer changed.
    pub customer: String,
    /// The file written.
    pub file: String,
    /// What changed, in a line.
    pub detail: String,
}
