//! Read-only queries: the file index for LIST, and the figures behind
//! `tollgate status` and `tollgate clients list`.

use super::{State, StateError, secs};
use crate::config::Config;
use crate::policy::space::{Debits, Month, Usage};
use jiff::Timestamp;
use serde::Serialize;
use std::collections::HashMap;

/// One indexed file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct FileEntry {
    /// The client's path.
    pub path: String,
    /// Bytes.
    pub size: i64,
    /// SHA-256, lowercase hex.
    pub sha256: String,
    /// When it was stored (Unix seconds).
    pub modified: i64,
    /// Permission bits the client gave at PUT, if any.
    pub mode: Option<i64>,
    /// Modification time the client gave at PUT (RFC 3339), if any.
    pub mtime: Option<String>,
}

/// A client as `clients list` and `status` show it.
#[derive(Debug, Clone, Default, Serialize, sqlx::FromRow)]
pub struct ClientRow {
    /// Client id.
    pub id: String,
    /// Its customer's name.
    pub customer: String,
    /// desktop, laptop or server.
    pub kind: String,
    /// Declared in the config.
    pub declared: bool,
    /// Holds a secret (false: declared and never connected, or removed).
    pub registered: bool,
    /// Last hostname it reported.
    pub hostname: Option<String>,
    /// Last admission (Unix seconds).
    pub last_seen: Option<i64>,
    /// Bytes committed.
    pub used: i64,
    /// Bytes reserved by uploads in flight.
    pub reserved: i64,
    /// MCALs debited this month.
    pub mcal_this_month: i64,
    /// End of its last successful backup session (Unix seconds).
    pub last_backup: Option<i64>,
    /// Refusals in the last 24 hours.
    pub refusals_24h: i64,
}

/// Everything `status` needs from the database.
#[derive(Debug, Clone, Default)]
pub struct StatusData {
    /// Every client, by customer then id.
    pub clients: Vec<ClientRow>,
    /// Usage per customer (lowercased name).
    pub customers: HashMap<String, Usage>,
    /// MCAL debits per customer (lowercased name).
    pub customer_debits: HashMap<String, Debits>,
    /// MCAL debits per reseller.
    pub reseller_debits: HashMap<String, Debits>,
    /// All debits.
    pub global_debits: Debits,
    /// Refusals in the last 24 hours per customer (lowercased name).
    pub customer_refusals: HashMap<String, u64>,
    /// Messages in the outbox not yet delivered.
    pub mail_pending: u64,
    /// When the oldest of them was queued (Unix s).
    pub mail_oldest: Option<i64>,
    /// The newest delivery error among them.
    pub mail_last_error: Option<String>,
}

impl State {
    /// Up to `limit` files of `client` whose path starts with `prefix`,
    /// after `after` in path order (for LISTING pages).
    pub async fn list_files(
        &self,
        client: &str,
        prefix: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<FileEntry>, StateError> {
        Ok(super::on_pool!(self, pool => {
            sqlx::query_as::<_, FileEntry>(
                "SELECT path, size, sha256, modified, mode, mtime FROM files
                 WHERE client = $1 AND substr(path, 1, length($2)) = $2 AND ($3 IS NULL OR path > $3)
                 ORDER BY path LIMIT $4",
            )
            .bind(client)
            .bind(prefix)
            .bind(after)
            .bind(limit as i64)
            .fetch_all(pool)
            .await?
        }))
    }

    /// One file of `client`, if indexed.
    pub async fn file(&self, client: &str, path: &str) -> Result<Option<FileEntry>, StateError> {
        Ok(super::on_pool!(self, pool => {
            sqlx::query_as::<_, FileEntry>(
                "SELECT path, size, sha256, modified, mode, mtime FROM files WHERE client = $1 AND path = $2",
            )
            .bind(client)
            .bind(path)
            .fetch_optional(pool)
            .await?
        }))
    }

    /// Bytes held by uploads in flight, per client and per customer
    /// (lowercased names): this process's ledger, or on PostgreSQL the live
    /// holds of every node.
    async fn holds(&self) -> Result<(HashMap<String, u64>, HashMap<String, u64>), StateError> {
        match self.cluster() {
            Some(c) => c.holds().await,
            None => Ok(self.ledger.by_client_and_customer()),
        }
    }

    /// Every client with its figures.
    pub async fn clients(&self, cfg: &Config, at: Timestamp) -> Result<Vec<ClientRow>, StateError> {
        self.clients_of(cfg, at, None, None, 0, i64::MAX).await
    }

    /// [`State::clients`] of one customer only (by name), or of all, and
    /// only client `id` when given; the `limit` rows after the first
    /// `offset`, in id order.
    pub async fn clients_of(
        &self,
        cfg: &Config,
        at: Timestamp,
        customer: Option<&str>,
        id: Option<&str>,
        offset: i64,
        limit: i64,
    ) -> Result<Vec<ClientRow>, StateError> {
        let month = Month::of(at, &cfg.server.timezone).to_string();
        let rows: Vec<ClientRow> = super::on_pool!(self, pool => {
            sqlx::query_as::<_, ClientRow>(
                "SELECT c.id, c.customer, c.kind, c.declared <> 0 AS declared, c.secret_sha256 IS NOT NULL AS registered,
                        c.hostname, c.last_seen, c.used,
                        CAST(0 AS BIGINT) AS reserved,
                        CAST(COALESCE((SELECT SUM(cost) FROM mcal_debits d WHERE d.client = c.id AND d.month = $1), 0) AS BIGINT) AS mcal_this_month,
                        (SELECT MAX(ended_at) FROM sessions s WHERE s.client = c.id AND s.intent = 'backup' AND s.result = 'ok') AS last_backup,
                        CAST((SELECT COALESCE(SUM(f.count), 0) FROM refusals f WHERE f.client = c.id AND f.at >= $2) AS BIGINT) AS refusals_24h
                 FROM clients c WHERE ($3 IS NULL OR c.customer = $3) AND ($6 IS NULL OR c.id = $6)
                 ORDER BY c.customer COLLATE NOCASE, c.id LIMIT $4 OFFSET $5",
            )
            .bind(month)
            .bind(secs(at) - 86_400)
            .bind(customer)
            .bind(limit)
            .bind(offset)
            .bind(id)
            .fetch_all(pool)
            .await?
        });
        let (by_client, _) = self.holds().await?;
        Ok(rows
            .into_iter()
            .map(|mut r| {
                r.reserved = by_client
                    .get(&r.id.to_lowercase())
                    .copied()
                    .unwrap_or(0)
                    .min(i64::MAX as u64) as i64;
                r
            })
            .collect())
    }

    /// The figures `status` shows.
    pub async fn status_data(&self, cfg: &Config, at: Timestamp) -> Result<StatusData, StateError> {
        let mut d = self.totals(cfg, at).await?;
        d.clients = self.clients(cfg, at).await?;
        Ok(d)
    }

    /// [`State::status_data`] without the per-client rows (for metrics).
    pub async fn totals(&self, cfg: &Config, at: Timestamp) -> Result<StatusData, StateError> {
        let month = Month::of(at, &cfg.server.timezone).to_string();
        let mut d = StatusData::default();
        type Debit = (String, Option<String>, i64, i64);
        type Mail = (i64, Option<i64>, Option<String>);
        type Rows = (
            Vec<(String, i64)>,
            Vec<Debit>,
            Vec<(Option<String>, i64)>,
            Mail,
        );
        let (usage, debits, refusals, mail): Rows = super::on_pool!(self, pool => {
            let usage = sqlx::query_as("SELECT customer, used FROM customer_usage")
                .fetch_all(pool)
                .await?;
            let debits = sqlx::query_as(
                "SELECT customer, reseller, CAST(SUM(cost) AS BIGINT),
                            CAST(SUM(CASE WHEN month = $1 THEN cost ELSE 0 END) AS BIGINT)
                     FROM mcal_debits GROUP BY customer, reseller",
            )
            .bind(&month)
            .fetch_all(pool)
            .await?;
            let refusals = sqlx::query_as(
                "SELECT NULLIF(customer, ''), CAST(SUM(count) AS BIGINT) FROM refusals WHERE at >= $1 GROUP BY customer",
            )
            .bind(secs(at) - 86_400)
            .fetch_all(pool)
            .await?;
            let mail = sqlx::query_as(
                "SELECT COUNT(*), MIN(created_at),
                            (SELECT last_error FROM outbox WHERE sent_at IS NULL AND last_error IS NOT NULL ORDER BY id DESC LIMIT 1)
                     FROM outbox WHERE sent_at IS NULL",
            )
            .fetch_one(pool)
            .await?;
            (usage, debits, refusals, mail)
        });
        let (_, held) = self.holds().await?;
        for (c, used) in usage {
            let key = c.to_lowercase();
            let reserved = held.get(&key).copied().unwrap_or(0);
            d.customers.insert(
                key,
                Usage {
                    used: used.max(0) as u64,
                    reserved,
                },
            );
        }
        for (customer, reseller, total, this_month) in debits {
            let add = |e: &mut Debits| {
                e.total += total.max(0) as u64;
                e.this_month += this_month.max(0) as u64;
            };
            add(d
                .customer_debits
                .entry(customer.to_lowercase())
                .or_default());
            if let Some(r) = reseller {
                add(d.reseller_debits.entry(r).or_default());
            }
            add(&mut d.global_debits);
        }
        let (pending, oldest, last_error) = mail;
        d.mail_pending = pending.max(0) as u64;
        d.mail_oldest = oldest;
        d.mail_last_error = last_error;
        for (c, n) in refusals {
            *d.customer_refusals
                .entry(c.unwrap_or_default().to_lowercase())
                .or_default() += n as u64;
        }
        Ok(d)
    }
}
