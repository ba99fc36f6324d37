//! Admission on PostgreSQL (PROTOCOL.md "Admission", steps 3 to 6): the
//! same snapshot, the same `policy::admission` decision and the same
//! registration and MCAL debit as on SQLite (`state::admission`), exact
//! across nodes.
//!
//! Locks, transaction-scoped and always in this order: the client id
//! (two nodes registering one new id must not both issue a secret), the
//! target customer (client slots, registrations per minute, its MCAL
//! limit), then, only when this admission may debit this month's MCAL,
//! the global pool and the reseller's MCAL limit. A client already debited
//! this month takes neither, so the pool's lock is held only by first
//! backups of the month.

use super::{Cluster, LIVE_HOLD, lock_key, retryable};
use crate::config::{Config, CustomerId, McalLimit};
use crate::policy::admission::{
    self, EnrollVerdict, Hello, McalState, REGISTRATION_WINDOW_SECS, Registration, RejectCode,
    Rejection, Snapshot,
};
use crate::policy::space::{LevelUsage, Month};
use crate::state::Decision;
use crate::state::ledger::Held;
use crate::state::ops::record;
use crate::state::pg;
use crate::state::{StateError, new_secret};
use jiff::Timestamp;
use sqlx::{PgConnection, Row};

async fn lock(tx: &mut PgConnection, level: &str, name: &str) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(lock_key(level, name))
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Committed usage beside the live holds, at every level above `client`
/// of `customer`.
pub(crate) async fn level_usage(
    tx: &mut PgConnection,
    cfg: &Config,
    client: &str,
    customer: CustomerId,
) -> Result<LevelUsage, sqlx::Error> {
    let members = super::members(cfg, customer);
    let cust = &cfg.customer(customer).name;
    let r = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT
           COALESCE((SELECT used FROM clients WHERE id = $1), 0),
           COALESCE((SELECT used FROM customer_usage WHERE customer = $2), 0),
           COALESCE((SELECT SUM(used) FROM customer_usage WHERE customer = ANY($3)), 0)::bigint,
           COALESCE((SELECT SUM(used) FROM customer_usage), 0)::bigint,
           COALESCE(SUM(h.size) FILTER (WHERE h.client = $1), 0)::bigint,
           COALESCE(SUM(h.size) FILTER (WHERE h.customer = $2), 0)::bigint,
           COALESCE(SUM(h.size) FILTER (WHERE h.customer = ANY($3)), 0)::bigint,
           COALESCE(SUM(h.size), 0)::bigint
         FROM held h JOIN nodes n ON n.name = h.node AND {LIVE_HOLD}"
    )))
    .bind(client)
    .bind(cust)
    .bind(&members)
    .fetch_one(&mut *tx)
    .await?;
    let n = |i: usize| -> Result<i64, sqlx::Error> { r.try_get::<i64, _>(i) };
    let held = Held {
        client: n(4)?.max(0) as u64,
        customer: n(5)?.max(0) as u64,
        reseller: n(6)?.max(0) as u64,
        server: n(7)?.max(0) as u64,
    };
    let has_reseller = cfg.customer(customer).reseller.is_some();
    Ok(held.with_committed(n(0)?, n(1)?, has_reseller.then_some(n(2)?), n(3)?))
}

impl Cluster {
    /// PROTOCOL.md "Admission", steps 3 to 6, with the enroll key already
    /// verified, as [`crate::state::State::decide`] does on SQLite.
    /// Registers and debits on WELCOME; a refusal changes nothing.
    pub async fn decide(
        &self,
        cfg: &Config,
        hello: &Hello,
        enroll: Option<EnrollVerdict>,
        at: Timestamp,
        connections_full: bool,
        shutting_down: bool,
    ) -> Result<Decision, StateError> {
        let mut tries = 0;
        loop {
            match self
                .try_decide(cfg, hello, enroll, at, connections_full, shutting_down)
                .await
            {
                Err(StateError::Db(e)) if retryable(&e) && tries + 1 < super::ATTEMPTS => {
                    tries += 1
                }
                r => return r,
            }
        }
    }

    async fn try_decide(
        &self,
        cfg: &Config,
        hello: &Hello,
        enroll: Option<EnrollVerdict>,
        at: Timestamp,
        connections_full: bool,
        shutting_down: bool,
    ) -> Result<Decision, StateError> {
        let secret = new_secret()?;
        let mut tx = self.pool.begin().await?;
        lock(&mut tx, "admit client", &hello.client_id).await?;
        let row = pg::client_db(&mut tx, &hello.client_id).await?;
        let rec = match &row {
            Some(r) => match record(cfg, r) {
                Some(rec) => Some(rec),
                None => {
                    return Ok(Decision::Rejected {
                        rejection: Rejection::new(
                            RejectCode::UnknownCustomer,
                            "this client's customer no longer exists; ask the administrator to move it",
                        ),
                        customer: Some(r.customer.clone()),
                    });
                }
            },
            None => None,
        };
        let needed = admission::enroll_key_target(cfg, hello, rec.as_ref()).map(|(c, _)| c);
        if let Some(c) = needed
            && enroll.is_none_or(|v| v.customer != c)
        {
            return Ok(Decision::Verify(c));
        }
        let decision = match admission::target_customer(cfg, hello, rec.as_ref()) {
            Err(r) => Err(r),
            Ok(customer) => {
                let snap = self
                    .snapshot(&mut tx, cfg, hello, customer, rec.clone(), at)
                    .await?;
                admission::admit(
                    cfg,
                    hello,
                    &Snapshot {
                        connections_full,
                        shutting_down,
                        enroll,
                        ..snap
                    },
                    at,
                )
            }
        };
        let adm = match decision {
            Ok(a) => a,
            Err(rejection) => {
                let customer = admission::target_customer(cfg, hello, rec.as_ref())
                    .ok()
                    .map(|c| cfg.customer(c).name.clone());
                return Ok(Decision::Rejected {
                    rejection,
                    customer,
                });
            }
        };
        let secs = at.as_second();
        let issued = match adm.registration {
            Registration::Existing => {
                sqlx::query(
                    "UPDATE clients SET last_seen = $1, hostname = COALESCE($2, hostname) WHERE id = $3",
                )
                .bind(secs)
                .bind(hello.hostname.as_deref())
                .bind(rec.as_ref().map_or(hello.client_id.as_str(), |r| r.id.as_str()))
                .execute(&mut *tx)
                .await?;
                None
            }
            Registration::Readmitted => {
                sqlx::query(
                    "UPDATE clients SET secret_sha256 = $1, removed_at = NULL, readmit_sha256 = NULL,
                       readmit_expires = NULL, registered_at = $2, last_seen = $2,
                       hostname = COALESCE($3, hostname) WHERE id = $4",
                )
                .bind(admission::secret_digest(&secret).to_vec())
                .bind(secs)
                .bind(hello.hostname.as_deref())
                .bind(rec.as_ref().map_or(hello.client_id.as_str(), |r| r.id.as_str()))
                .execute(&mut *tx)
                .await?;
                Some(secret)
            }
            Registration::Declared | Registration::AutoAdded => {
                pg::upsert_registration(
                    &mut tx,
                    cfg,
                    &hello.client_id,
                    adm.customer,
                    adm.kind,
                    &secret,
                    adm.registration == Registration::Declared,
                    hello.hostname.as_deref(),
                    at,
                )
                .await?;
                Some(secret)
            }
        };
        if let Some((month, cost)) = adm.mcal_debit {
            let client = rec
                .as_ref()
                .map_or(hello.client_id.as_str(), |r| r.id.as_str());
            pg::insert_debit(&mut tx, cfg, client, adm.customer, month, cost, at).await?;
        }
        tx.commit().await?;
        Ok(Decision::Admitted {
            admitted: adm,
            secret: issued,
        })
    }

    /// What admission reads, under the customer's lock and, when this
    /// admission may debit, the MCAL locks (module docs).
    async fn snapshot(
        &self,
        tx: &mut PgConnection,
        cfg: &Config,
        hello: &Hello,
        customer: CustomerId,
        rec: Option<admission::ClientRecord>,
        at: Timestamp,
    ) -> Result<Snapshot, StateError> {
        let client = hello.client_id.as_str();
        let cust = cfg.customer(customer);
        lock(&mut *tx, "admit customer", &cust.name).await?;
        let month = Month::of(at, &cfg.server.timezone);
        let client_id = rec.as_ref().map_or(client, |r| r.id.as_str());
        let debited: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM mcal_debits WHERE client = $1 AND month = $2)",
        )
        .bind(client_id)
        .bind(month.to_string())
        .fetch_one(&mut *tx)
        .await?;
        let reseller = cust.reseller.map(|r| cfg.reseller(r));
        // A restore debits nothing (`policy::admission`), so it does not
        // queue behind the month's first backups.
        let restore = matches!(hello.intent.as_deref(), Some("restore"));
        if !debited && !restore && cfg.server.mcal.is_some() {
            lock(&mut *tx, "mcal server", "").await?;
            if let Some(r) = reseller
                && matches!(r.mcal_limit, McalLimit::Fixed(_))
            {
                lock(&mut *tx, "mcal reseller", &r.name).await?;
            }
        }
        let since = at.as_second() - REGISTRATION_WINDOW_SECS;
        let row = sqlx::query(
            "SELECT
               COALESCE((SELECT total FROM mcal_totals WHERE scope = 'customer' AND name = $1), 0),
               COALESCE((SELECT total FROM mcal_totals WHERE scope = 'reseller' AND name = $2), 0),
               COALESCE((SELECT total FROM mcal_totals WHERE scope = 'global' AND name = ''), 0),
               (SELECT COUNT(*) FROM (SELECT 1 FROM clients WHERE customer = $1
                  AND (secret_sha256 IS NOT NULL OR declared <> 0) LIMIT $3) s),
               (SELECT registered_at FROM clients WHERE customer = $1 AND registered_at > $4
                  ORDER BY registered_at DESC LIMIT 1 OFFSET $5)",
        )
        .bind(&cust.name)
        .bind(reseller.map(|r| r.name.as_str()))
        .bind(i64::from(cust.max_clients.unwrap_or(0)))
        .bind(since)
        .bind(crate::policy::admission::nth_registration_offset(cfg))
        .fetch_one(&mut *tx)
        .await?;
        let n =
            |i: usize| -> Result<u64, sqlx::Error> { Ok(row.try_get::<i64, _>(i)?.max(0) as u64) };
        let mcal = McalState {
            client_debited_this_month: debited,
            customer_total: n(0)?,
            reseller_total: n(1)?,
            global_total: n(2)?,
        };
        let customer_clients = n(3)? as u32;
        let nth_recent_registration: Option<i64> = row.try_get(4)?;
        let usage = level_usage(&mut *tx, cfg, client_id, customer).await?;
        Ok(Snapshot {
            client: rec,
            customer_clients,
            mcal,
            usage,
            nth_recent_registration,
            ..Snapshot::default()
        })
    }
}
