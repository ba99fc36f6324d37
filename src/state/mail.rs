//! The outbox and the records that keep reports and alerts from being sent
//! twice (migration 0003), plus the figures a consolidated report needs.

use super::ops::immediate;
use super::{State, StateError, secs};
use jiff::Timestamp;

/// A message ready to queue.
#[derive(Clone, Debug)]
pub struct Outgoing {
    /// `session_report`, `consolidated_report` or `alert`.
    pub kind: &'static str,
    /// Its subject (for the log and `status`).
    pub subject: String,
    /// The envelope sender.
    pub from: String,
    /// The envelope recipients.
    pub to: Vec<String>,
    /// The whole RFC 5322 message.
    pub message: Vec<u8>,
}

/// A queued message.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct Queued {
    /// Outbox id.
    pub id: i64,
    /// Subject.
    pub subject: String,
    /// Envelope sender.
    pub mail_from: String,
    /// JSON array of recipients.
    pub recipients: String,
    /// The RFC 5322 message.
    pub message: Vec<u8>,
    /// Delivery attempts so far.
    pub attempts: i64,
}

impl Queued {
    /// The envelope recipients.
    pub fn to(&self) -> Vec<String> {
        serde_json::from_str(&self.recipients).unwrap_or_default()
    }
}

/// One client's line in a consolidated report.
#[derive(Clone, Debug, sqlx::FromRow, serde::Serialize)]
pub struct ClientPeriod {
    /// Client id.
    pub id: String,
    /// Its kind.
    pub kind: String,
    /// Bytes stored as of the period's end: after the last session that
    /// ended before it, or now when none has ended since. None when that
    /// session predates the record (a database older than issue 12).
    pub used: Option<i64>,
    /// End of its last successful backup before the period's end (Unix s).
    pub last_backup: Option<i64>,
    /// Backup sessions in the period that ended `ok` with no failed file.
    pub sessions_ok: i64,
    /// Other sessions in the period.
    pub sessions_failed: i64,
    /// Bytes uploaded in the period.
    pub bytes_in: i64,
    /// Bytes restored in the period.
    pub bytes_out: i64,
    /// MCALs debited in the period.
    pub mcal: i64,
}

/// A finished session's report for one recipient, waiting for its digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingReport {
    /// Who gets it.
    pub recipient: String,
    /// The client it is about.
    pub client: String,
    /// The session's facts, JSON.
    pub facts: String,
}

/// The session reports of one (recipient, client) that are due.
#[derive(Clone, Debug)]
pub struct DueDigest {
    /// Who gets it.
    pub recipient: String,
    /// The client it is about.
    pub client: String,
    /// (row id, facts JSON), oldest first.
    pub reports: Vec<(i64, String)>,
}

/// How long a node may take to deliver the messages it claimed
/// (PostgreSQL) before another node may take them over.
pub const MAIL_CLAIM: std::time::Duration = std::time::Duration::from_secs(300);

/// Refusals of one code for one customer over a span (the daily digest).
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct RefusalCount {
    /// The configured customer.
    pub customer: String,
    /// The REJECT or ERROR code.
    pub code: String,
    /// The last client refused (a valid id), or empty.
    pub client: String,
    /// How many times.
    pub count: i64,
}

/// The refusals only a reseller or the admin can fix (docs/email.md
/// "Refusal digest").
pub const DIGEST_CODES: [&str; 4] = [
    "mcal_exhausted",
    "client_limit",
    "quota_exceeded",
    "customer_deactivated",
];

impl State {
    /// Refusals of [`DIGEST_CODES`] in `[start, end)`, per customer and
    /// code, with the last client refused.
    pub async fn refusal_counts(
        &self,
        start: Timestamp,
        end: Timestamp,
    ) -> Result<Vec<RefusalCount>, StateError> {
        Ok(super::on_pool!(self, pool => {
            sqlx::query_as::<_, RefusalCount>(
                "SELECT r.customer, r.code,
                        COALESCE((SELECT l.client FROM refusals l WHERE l.customer = r.customer AND l.code = r.code
                          AND l.at >= $1 AND l.at < $2 AND l.client <> '(invalid)'
                          ORDER BY l.at DESC LIMIT 1), '') AS client,
                        CAST(SUM(r.count) AS BIGINT) AS count
                   FROM refusals r
                  WHERE r.at >= $1 AND r.at < $2 AND r.customer <> ''
                    AND r.code IN ($3, $4, $5, $6)
                  GROUP BY r.customer, r.code
                  ORDER BY r.customer, r.code",
            )
            .bind(secs(start))
            .bind(secs(end))
            .bind(DIGEST_CODES[0])
            .bind(DIGEST_CODES[1])
            .bind(DIGEST_CODES[2])
            .bind(DIGEST_CODES[3])
            .fetch_all(pool)
            .await?
        }))
    }

    /// Records every name in `customers` not seen before as first seen at
    /// `at` (the daemon calls it with the configured customers).
    pub async fn note_customers(
        &self,
        customers: &[&str],
        at: Timestamp,
    ) -> Result<(), StateError> {
        // A read first: the scheduler calls this every minute, and a write
        // (with its fsync) is only needed when a name is new.
        let seen: Vec<String> = super::on_pool!(self, pool => {
            sqlx::query_scalar("SELECT name FROM customers_seen")
                .fetch_all(pool)
                .await?
        });
        let new: Vec<&str> = customers
            .iter()
            .copied()
            .filter(|n| !seen.iter().any(|s| s.eq_ignore_ascii_case(n)))
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        super::in_tx!(self, sql, tx => {
            for name in &new {
                sqlx::query("INSERT INTO customers_seen (name, first_seen) VALUES ($1, $2) ON CONFLICT DO NOTHING")
                    .bind(*name)
                    .bind(secs(at))
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    /// When `customer` first appeared in state, if it has.
    pub async fn customer_first_seen(
        &self,
        customer: &str,
    ) -> Result<Option<Timestamp>, StateError> {
        let s: Option<i64> = super::on_pool!(self, pool => {
            sqlx::query_scalar("SELECT first_seen FROM customers_seen WHERE name = $1")
                .bind(customer)
                .fetch_optional(pool)
                .await?
        });
        Ok(s.and_then(|s| Timestamp::from_second(s).ok()))
    }

    /// The (recipient, client) pairs whose waiting session reports may go
    /// out at `now`: none went to that pair within `interval`.
    pub async fn due_digests(
        &self,
        now: Timestamp,
        interval: std::time::Duration,
    ) -> Result<Vec<DueDigest>, StateError> {
        let cutoff = secs(now) - interval.as_secs() as i64;
        let rows: Vec<(String, String, i64, String)> = super::on_pool!(self, pool => {
            sqlx::query_as(
                "SELECT r.recipient, r.client, r.id, r.facts FROM session_reports r
                 LEFT JOIN session_digests d ON d.recipient = r.recipient AND d.client = r.client
                 WHERE d.sent_at IS NULL OR d.sent_at <= $1
                 ORDER BY r.recipient, r.client, r.id",
            )
            .bind(cutoff)
            .fetch_all(pool)
            .await?
        });
        let mut out: Vec<DueDigest> = Vec::new();
        for (recipient, client, id, facts) in rows {
            match out.last_mut() {
                Some(d) if d.recipient == recipient && d.client == client => {
                    d.reports.push((id, facts))
                }
                _ => out.push(DueDigest {
                    recipient,
                    client,
                    reports: vec![(id, facts)],
                }),
            }
        }
        Ok(out)
    }

    /// When the next waiting session report may go out (Unix seconds).
    pub async fn next_digest_due(
        &self,
        interval: std::time::Duration,
    ) -> Result<Option<i64>, StateError> {
        Ok(super::on_pool!(self, pool => {
            sqlx::query_scalar(
                "SELECT MIN(COALESCE(d.sent_at + $1, 0)) FROM session_reports r
                 LEFT JOIN session_digests d ON d.recipient = r.recipient AND d.client = r.client",
            )
            .bind(interval.as_secs() as i64)
            .fetch_one(pool)
            .await?
        }))
    }

    /// Queues a digest and retires the session reports it covers, in one
    /// transaction: nothing is sent twice, nothing lost. `None` when
    /// another node queued it first (its reports are gone).
    pub async fn enqueue_digest(
        &self,
        d: &DueDigest,
        m: &Outgoing,
        at: Timestamp,
    ) -> Result<Option<i64>, StateError> {
        super::in_tx!(self, sql, tx => {
            // Retired first: on several nodes, the one that deletes them
            // all queues the digest; the others find them gone.
            for (row, _) in &d.reports {
                let gone = sqlx::query("DELETE FROM session_reports WHERE id = $1")
                    .bind(row)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if gone == 0 {
                    tx.rollback().await?;
                    return Ok(None);
                }
            }
            let id = sql::insert_outbox(&mut tx, m, at, at).await?;
            sqlx::query(
                "INSERT INTO session_digests (recipient, client, sent_at) VALUES ($1, $2, $3)
                 ON CONFLICT (recipient, client) DO UPDATE SET sent_at = excluded.sent_at",
            )
            .bind(&d.recipient)
            .bind(&d.client)
            .bind(secs(at))
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(Some(id))
        })
    }

    /// Queues a message; returns its outbox id.
    pub async fn enqueue(&self, m: &Outgoing, at: Timestamp) -> Result<i64, StateError> {
        super::in_tx!(self, sql, tx => {
            let id = sql::insert_outbox(&mut tx, m, at, at).await?;
            tx.commit().await?;
            Ok(id)
        })
    }

    /// Queues a message that the caller delivers itself: the daemon leaves
    /// it alone until `lease_until` (then it is retried like any other).
    pub async fn enqueue_leased(
        &self,
        m: &Outgoing,
        at: Timestamp,
        lease_until: Timestamp,
    ) -> Result<Queued, StateError> {
        let id = super::in_tx!(self, sql, tx => {
            let id = sql::insert_outbox(&mut tx, m, at, lease_until).await?;
            tx.commit().await?;
            Ok(id)
        })?;
        Ok(Queued {
            id,
            subject: m.subject.clone(),
            mail_from: m.from.clone(),
            recipients: serde_json::to_string(&m.to).unwrap_or_else(|_| "[]".into()),
            message: m.message.clone(),
            attempts: 0,
        })
    }

    /// Queues a message unless `table` already records one for `keys`; the
    /// record and the message are one transaction, so a crash can neither
    /// lose the message nor let it be sent twice. Returns whether it was
    /// queued.
    pub(super) async fn enqueue_once(
        &self,
        table: &'static str,
        keys: &[(&'static str, &str)],
        m: &Outgoing,
        at: Timestamp,
    ) -> Result<bool, StateError> {
        let names: Vec<&str> = keys.iter().map(|(k, _)| *k).collect();
        let n = keys.len();
        // The record goes in first, and only if it is new: on several
        // nodes, the one whose insert lands queues the message.
        let record = format!(
            "INSERT INTO {table} ({}, outbox_id, queued_at) VALUES ({}, ${}, ${}) ON CONFLICT DO NOTHING",
            names.join(", "),
            (1..=n)
                .map(|i| format!("${i}"))
                .collect::<Vec<_>>()
                .join(", "),
            n + 1,
            n + 2
        );
        let link = format!(
            "UPDATE {table} SET outbox_id = $1 WHERE {}",
            names
                .iter()
                .enumerate()
                .map(|(i, k)| format!("{k} = ${}", i + 2))
                .collect::<Vec<_>>()
                .join(" AND ")
        );
        // Only the static table and column names above are spliced in; every
        // value is bound.
        super::in_tx!(self, sql, tx => {
            let mut q = sqlx::query(sqlx::AssertSqlSafe(record.clone()));
            for (_, v) in keys {
                q = q.bind(*v);
            }
            let added = q.bind(0i64).bind(secs(at)).execute(&mut *tx).await?.rows_affected();
            if added == 0 {
                tx.rollback().await?;
                return Ok(false);
            }
            let id = sql::insert_outbox(&mut tx, m, at, at).await?;
            let mut q = sqlx::query(sqlx::AssertSqlSafe(link.clone())).bind(id);
            for (_, v) in keys {
                q = q.bind(*v);
            }
            q.execute(&mut *tx).await?;
            tx.commit().await?;
            Ok(true)
        })
    }

    /// Queues a consolidated report unless that period was queued before.
    pub async fn enqueue_report(
        &self,
        customer: &str,
        frequency: &str,
        period: &str,
        m: &Outgoing,
        at: Timestamp,
    ) -> Result<bool, StateError> {
        let keys = [
            ("customer", customer),
            ("frequency", frequency),
            ("period", period),
        ];
        self.enqueue_once("reports_sent", &keys, m, at).await
    }

    /// The first day of the newest period queued for this customer.
    pub async fn last_report(
        &self,
        customer: &str,
        frequency: &str,
    ) -> Result<Option<String>, StateError> {
        Ok(super::on_pool!(self, pool => {
            sqlx::query_scalar(
                "SELECT MAX(period) FROM reports_sent WHERE customer = $1 AND frequency = $2",
            )
            .bind(customer)
            .bind(frequency)
            .fetch_one(pool)
            .await?
        }))
    }

    /// Queues an alert unless one with this subject was queued on `day`.
    pub async fn enqueue_alert(
        &self,
        subject: &str,
        day: &str,
        m: &Outgoing,
        at: Timestamp,
    ) -> Result<bool, StateError> {
        let keys = [("subject", subject), ("day", day)];
        self.enqueue_once("alerts_sent", &keys, m, at).await
    }

    /// Messages due for a delivery attempt at `now`, oldest first. On
    /// PostgreSQL each is claimed for this node for a lease first
    /// (`FOR UPDATE SKIP LOCKED`), so one message goes out from one node.
    pub async fn due_mail(&self, now: Timestamp, limit: u32) -> Result<Vec<Queued>, StateError> {
        if let Some(c) = self.cluster() {
            let ids = c.claim_mail(secs(now), limit, MAIL_CLAIM).await?;
            return Ok(sqlx::query_as::<_, Queued>(
                "SELECT id, subject, mail_from, recipients, message, attempts FROM outbox
                 WHERE id = ANY($1) ORDER BY id",
            )
            .bind(ids)
            .fetch_all(c.pool())
            .await?);
        }
        Ok(sqlx::query_as::<_, Queued>(
            "SELECT id, subject, mail_from, recipients, message, attempts FROM outbox
             WHERE sent_at IS NULL AND next_attempt_at <= $1 ORDER BY id LIMIT $2",
        )
        .bind(secs(now))
        .bind(i64::from(limit))
        .fetch_all(self.lite()?)
        .await?)
    }

    /// When the next undelivered message is due (Unix s).
    pub async fn next_mail_due(&self) -> Result<Option<i64>, StateError> {
        Ok(super::on_pool!(self, pool => {
            sqlx::query_scalar("SELECT MIN(next_attempt_at) FROM outbox WHERE sent_at IS NULL")
                .fetch_one(pool)
                .await?
        }))
    }

    /// Undelivered messages.
    pub async fn mail_pending(&self) -> Result<i64, StateError> {
        Ok(super::on_pool!(self, pool => {
            sqlx::query_scalar("SELECT COUNT(*) FROM outbox WHERE sent_at IS NULL")
                .fetch_one(pool)
                .await?
        }))
    }

    /// Marks a message delivered.
    pub async fn mail_sent(&self, id: i64, at: Timestamp) -> Result<(), StateError> {
        if let Some(c) = self.cluster() {
            c.mail_sent(id, secs(at)).await?;
            return Ok(());
        }
        let mut tx = immediate(self).await?;
        sqlx::query("UPDATE outbox SET sent_at = $1, attempts = attempts + 1, last_error = NULL WHERE id = $2")
            .bind(secs(at))
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records a failed attempt and when to try again.
    pub async fn mail_failed(
        &self,
        id: i64,
        error: &str,
        retry_at: Timestamp,
    ) -> Result<(), StateError> {
        super::in_tx!(self, sql, tx => {
            sqlx::query(
                "UPDATE outbox SET attempts = attempts + 1, last_error = $1, next_attempt_at = $2 WHERE id = $3",
            )
            .bind(error)
            .bind(secs(retry_at))
            .bind(id)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(())
        })?;
        if let Some(c) = self.cluster() {
            c.drop_mail_claim(id).await?;
        }
        Ok(())
    }

    /// Every client as (id, customer, bytes used, kind): what alerts need,
    /// without the per-client subqueries of [`State::clients`].
    pub async fn client_usage(&self) -> Result<Vec<(String, String, i64, String)>, StateError> {
        Ok(super::on_pool!(self, pool => {
            sqlx::query_as("SELECT id, customer, used, kind FROM clients")
                .fetch_all(pool)
                .await?
        }))
    }

    /// Each client of `customer` that was registered before `end`, with
    /// its figures for `[start, end)` as of `end`.
    pub async fn client_periods(
        &self,
        customer: &str,
        start: Timestamp,
        end: Timestamp,
    ) -> Result<Vec<ClientPeriod>, StateError> {
        Ok(super::on_pool!(self, pool => {
            sqlx::query_as::<_, ClientPeriod>(
                "SELECT c.id, c.kind,
                    CASE WHEN NOT EXISTS (SELECT 1 FROM sessions s WHERE s.client = c.id AND s.ended_at >= $2)
                         THEN c.used
                         ELSE (SELECT s.stored_after FROM sessions s WHERE s.client = c.id AND s.ended_at < $2
                                ORDER BY s.ended_at DESC LIMIT 1)
                    END AS used,
                    (SELECT MAX(ended_at) FROM sessions s WHERE s.client = c.id AND s.customer = $3 AND s.intent = 'backup'
                        AND s.result = 'ok' AND s.files_failed = 0 AND s.ended_at < $2) AS last_backup,
                    (SELECT COUNT(*) FROM sessions s WHERE s.client = c.id AND s.customer = $3 AND s.started_at >= $1 AND s.started_at < $2
                        AND s.result = 'ok' AND s.files_failed = 0) AS sessions_ok,
                    (SELECT COUNT(*) FROM sessions s WHERE s.client = c.id AND s.customer = $3 AND s.started_at >= $1 AND s.started_at < $2
                        AND s.result IS NOT NULL AND (s.result <> 'ok' OR s.files_failed > 0)) AS sessions_failed,
                    CAST(COALESCE((SELECT SUM(bytes_in) FROM sessions s WHERE s.client = c.id AND s.customer = $3 AND s.started_at >= $1 AND s.started_at < $2), 0) AS BIGINT) AS bytes_in,
                    CAST(COALESCE((SELECT SUM(bytes_out) FROM sessions s WHERE s.client = c.id AND s.customer = $3 AND s.started_at >= $1 AND s.started_at < $2), 0) AS BIGINT) AS bytes_out,
                    CAST(COALESCE((SELECT SUM(cost) FROM mcal_debits d WHERE d.client = c.id AND d.customer = $3 AND d.debited_at >= $1 AND d.debited_at < $2), 0) AS BIGINT) AS mcal
                 FROM clients c WHERE c.customer = $3 AND COALESCE(c.registered_at, 0) < $2 ORDER BY c.id",
            )
            .bind(secs(start))
            .bind(secs(end))
            .bind(customer)
            .fetch_all(pool)
            .await?
        }))
    }
}
