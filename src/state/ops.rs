//! The atomic operations: each checks and writes in one `BEGIN IMMEDIATE`
//! transaction, with the decision taken by `policy`.
//!
//! Crash-safe commits (docs/state.md): the storage layer writes and fsyncs a
//! temporary file, then [`State::begin_commit`] durably records a pending
//! commit, then the file is renamed into place and its directory fsynced,
//! then [`State::commit_file`] updates the index and usage and deletes the
//! pending record in one transaction. [`State::reconcile`] resolves whatever
//! a crash left: a pending record whose temporary file still exists was not
//! renamed (the old file stands; drop the temporary), one whose temporary is
//! gone was renamed (apply the index update). Reservations never survive a
//! restart.

use super::ledger::{Held, Ledger};
use super::{State, StateError, customer_key, secs};
use crate::config::{Config, CustomerId, Kind};
use crate::policy::admission::{self, ClientRecord, McalState, RejectCode, Rejection};
use crate::policy::space::{self, LevelUsage, Month, Usage};
use jiff::Timestamp;
use sqlx::Row;
use std::path::{Path, PathBuf};

/// The write connection, lent by the group-commit writer for one operation.
pub(super) type Tx = super::writer::Lease;
/// A connection, inside a lent write or a read transaction.
pub(super) type Conn = sqlx::SqliteConnection;

/// A reservation that does not fit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaExceeded {
    /// Bytes that were still free at the tightest level.
    pub left: u64,
    /// That level: `client`, `customer`, `reseller` or `server`.
    pub level: &'static str,
    /// Its allotment.
    pub allotted: u64,
    /// Bytes taken there, uploads in flight included.
    pub taken: u64,
}

impl QuotaExceeded {
    /// Whether `size` more bytes fit at every level above `client` of
    /// `customer` given `usage` (both backends' reservations ask this).
    pub(super) fn check(
        cfg: &Config,
        customer: CustomerId,
        client: &str,
        usage: &LevelUsage,
        size: u64,
    ) -> Result<(), QuotaExceeded> {
        let levels = space::levels(cfg, customer, cfg.declared_client(client), usage);
        match space::full_level(&levels, size) {
            None => Ok(()),
            Some((level, allotted, taken)) => Err(QuotaExceeded {
                left: space::space_left(&levels).unwrap_or(0),
                level,
                allotted,
                taken,
            }),
        }
    }
}

/// Parses `client_events` rows, skipping kinds this version does not know
/// (both backends' `events_after`).
pub(super) fn event_rows(rows: Vec<(i64, String, String, Option<String>)>) -> Vec<EventRow> {
    rows.into_iter()
        .filter_map(|(seq, client, kind, customer)| {
            let event = ClientEvent::parse(&kind, customer)?;
            Some(EventRow {
                seq,
                client,
                kind,
                event,
            })
        })
        .collect()
}

impl std::fmt::Display for QuotaExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::config::units::format_size;
        write!(
            f,
            "the {}'s space is full: {} of {} used, {} left",
            self.level,
            format_size(self.taken),
            format_size(self.allotted),
            format_size(self.left)
        )
    }
}

/// A commit about to rename its temporary file into place.
#[derive(Debug, Clone, Default)]
pub struct PendingCommit {
    /// Client id.
    pub client: String,
    /// The client's path (PROTOCOL.md `path`).
    pub path: String,
    /// The fsynced temporary file.
    pub temp_path: PathBuf,
    /// Where it is renamed to.
    pub final_path: PathBuf,
    /// Its size.
    pub size: u64,
    /// Its SHA-256, lowercase hex.
    pub sha256: String,
    /// When it was stored.
    pub modified: Timestamp,
    /// The reservation it consumes.
    pub reservation: Option<i64>,
    /// Permission bits from PUT, if any.
    pub mode: Option<u32>,
    /// Modification time from PUT (RFC 3339), if any.
    pub mtime: Option<String>,
}

/// What `reconcile` did at startup.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Pending commits whose rename never happened (old file kept).
    pub rolled_back: u64,
    /// Pending commits whose rename happened (index updated).
    pub rolled_forward: u64,
    /// Stale reservations dropped.
    pub reservations_dropped: u64,
}

/// Why a move was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoveRefused {
    /// No such client.
    #[error("no client {0:?} is registered")]
    UnknownClient(String),
    /// No such customer.
    #[error("no customer is named {0:?}")]
    UnknownCustomer(String),
    /// Declared clients move by editing the config.
    #[error("client {0:?} is declared in the config; change its `customer` there instead")]
    Declared(String),
    /// Already there.
    #[error("client {0:?} already belongs to customer {1:?}")]
    SameCustomer(String, String),
    /// Uploads are in flight.
    #[error("client {0:?} has uploads in flight; try again when its session ends")]
    Busy(String),
    /// The target lacks space.
    #[error(
        "customer {customer:?} lacks space: the client stores {needed} bytes, {left} are free there"
    )]
    Space {
        /// Target customer.
        customer: String,
        /// Bytes the client stores.
        needed: u64,
        /// Bytes free at the tightest level of the target.
        left: u64,
    },
    /// The target has no client slot.
    #[error("customer {0:?} has no free client slot (max_clients reached)")]
    Slots(String),
    /// The target has no MCAL room for the next monthly debit.
    #[error("{0}")]
    Mcal(String),
    /// Moving the data directory failed; nothing was changed.
    #[error("moving the client's files failed: {0}")]
    Data(String),
}

/// What `remove_client` freed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed {
    /// The client's customer.
    pub customer: String,
    /// Bytes whose usage was released (0 without purge).
    pub freed_bytes: u64,
    /// MCALs of the current month refunded.
    pub freed_mcal: u64,
}

#[derive(sqlx::FromRow)]
pub(super) struct ClientDb {
    pub(super) id: String,
    pub(super) customer: String,
    pub(super) kind: String,
    pub(super) secret_sha256: Option<Vec<u8>>,
    pub(super) declared: bool,
    pub(super) used: i64,
    pub(super) removed_at: Option<i64>,
    pub(super) readmit_sha256: Option<Vec<u8>>,
    pub(super) readmit_expires: Option<i64>,
}

/// The columns of [`ClientDb`].
pub(super) const CLIENT_COLUMNS: &str = "id, customer, kind, secret_sha256, declared, used, removed_at, readmit_sha256, readmit_expires";

/// Waits for the write connection (`writer`): the operation runs in a
/// savepoint of the open batch, and its `commit` returns once the batch
/// is durable.
pub(super) async fn immediate(state: &State) -> Result<Tx, StateError> {
    match &state.writer {
        Some(w) => w.lease().await,
        None => Err(StateError::Inconsistent(
            "the state database was opened read-only".into(),
        )),
    }
}

/// The client whose id equals `id` without regard to case (ids are
/// unique that way; PROTOCOL.md Additions, issue 11).
pub(super) async fn client_db(tx: &mut Conn, id: &str) -> Result<Option<ClientDb>, StateError> {
    Ok(sqlx::query_as::<_, ClientDb>(sqlx::AssertSqlSafe(format!(
        "SELECT {CLIENT_COLUMNS} FROM clients WHERE id = ? COLLATE NOCASE"
    )))
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?)
}

/// The record of a client that must exist under a customer the config has.
async fn known_client(
    tx: &mut Conn,
    cfg: &Config,
    client: &str,
) -> Result<ClientRecord, StateError> {
    let row = client_db(tx, client).await?;
    row.as_ref().and_then(|r| record(cfg, r)).ok_or_else(|| {
        StateError::Inconsistent(format!(
            "client {client:?} is not registered under a known customer"
        ))
    })
}

pub(super) fn record(cfg: &Config, row: &ClientDb) -> Option<ClientRecord> {
    let digest = |b: &Option<Vec<u8>>| b.as_deref().and_then(|s| <[u8; 32]>::try_from(s).ok());
    Some(ClientRecord {
        id: row.id.clone(),
        customer: cfg.customer_by_name(&row.customer)?,
        kind: Kind::parse(&row.kind).unwrap_or_default(),
        secret_sha256: digest(&row.secret_sha256),
        removed: row.removed_at.is_some(),
        readmit: digest(&row.readmit_sha256).zip(
            row.readmit_expires
                .and_then(|t| Timestamp::from_second(t).ok()),
        ),
    })
}

/// Usage and reservations at every level above `client` of `customer`.
/// The ledger is read before the committed usage (`ledger`), so a commit
/// in between is counted twice, never not at all.
pub(super) async fn level_usage(
    tx: &mut Conn,
    ledger: &Ledger,
    cfg: &Config,
    client: &str,
    customer: CustomerId,
) -> Result<LevelUsage, StateError> {
    let held = held_for(ledger, cfg, client, customer);
    Ok(level_committed(tx, cfg, client, customer)
        .await?
        .beside(held))
}

/// What the ledger holds at every level above `client` of `customer`.
fn held_for(ledger: &Ledger, cfg: &Config, client: &str, customer: CustomerId) -> Held {
    ledger.held(
        client,
        customer_key(cfg, customer),
        &reseller_members(cfg, customer),
    )
}

/// Committed bytes at every level above `client` of `customer`.
pub(super) struct Committed {
    client: i64,
    customer: i64,
    /// `None` for a customer without a reseller.
    reseller: Option<i64>,
    server: i64,
}

async fn level_committed(
    tx: &mut Conn,
    cfg: &Config,
    client: &str,
    customer: CustomerId,
) -> Result<Committed, StateError> {
    let members = reseller_members(cfg, customer);
    let sql = format!("SELECT {}", committed_columns(members.len(), 3));
    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(client)
        .bind(customer_key(cfg, customer));
    for m in &members {
        q = q.bind(*m);
    }
    let row = q.fetch_one(&mut *tx).await?;
    Ok(committed_of(&row, !members.is_empty()))
}

/// The four committed-usage columns both usage reads start with: the
/// client (`?1`), its customer (`?2`), the server, and the reseller's
/// customers, bound from `?first` on (0 without a reseller).
fn committed_columns(members: usize, first: usize) -> String {
    let reseller = if members == 0 {
        "0".to_string()
    } else {
        let marks: Vec<String> = (0..members).map(|i| format!("?{}", first + i)).collect();
        format!(
            "COALESCE((SELECT SUM(used) FROM customer_usage WHERE customer IN ({})), 0)",
            marks.join(",")
        )
    };
    format!(
        "COALESCE((SELECT used FROM clients WHERE id = ?1), 0),
         COALESCE((SELECT used FROM customer_usage WHERE customer = ?2), 0),
         COALESCE((SELECT SUM(used) FROM customer_usage), 0),
         {reseller}"
    )
}

impl Committed {
    /// The usage at every level: these bytes beside the ledger's holds.
    fn beside(self, held: Held) -> LevelUsage {
        held.with_committed(self.client, self.customer, self.reseller, self.server)
    }
}

/// The columns [`committed_columns`] made.
fn committed_of(row: &sqlx::sqlite::SqliteRow, has_reseller: bool) -> Committed {
    Committed {
        client: row.get(0),
        customer: row.get(1),
        reseller: has_reseller.then(|| row.get(3)),
        server: row.get(2),
    }
}

/// The customers sharing `customer`'s reseller (none without one).
fn reseller_members(cfg: &Config, customer: CustomerId) -> Vec<&str> {
    match cfg.customer(customer).reseller {
        None => Vec::new(),
        Some(r) => cfg
            .reseller(r)
            .customers
            .iter()
            .map(|&c| customer_key(cfg, c))
            .collect(),
    }
}

/// What admission reads for `client` under `customer`, in one statement
/// (each statement is a round trip to SQLite's thread, and admissions run
/// one at a time on the writer, issue 13): usage at every level, the MCAL
/// debits, the client slots taken (counted up to `max_clients`, as
/// [`slot_count`]) and the customer's registration times since `since`,
/// oldest first.
pub(super) async fn admission_reads(
    tx: &mut Conn,
    ledger: &Ledger,
    cfg: &Config,
    client: &str,
    customer: CustomerId,
    month: Month,
    since: i64,
) -> Result<(LevelUsage, McalState, u32, Vec<i64>), StateError> {
    let cust = cfg.customer(customer);
    let reseller = cust.reseller.map(|r| cfg.reseller(r));
    let members = reseller_members(cfg, customer);
    // Before the committed usage (`ledger`).
    let held = held_for(ledger, cfg, client, customer);
    let sql = format!(
        "SELECT {},
           EXISTS(SELECT 1 FROM mcal_debits WHERE client = ?1 AND month = ?3),
           COALESCE((SELECT total FROM mcal_totals WHERE scope = 'customer' AND name = ?2), 0),
           COALESCE((SELECT total FROM mcal_totals WHERE scope = 'reseller' AND name = ?4), 0),
           COALESCE((SELECT total FROM mcal_totals WHERE scope = 'global' AND name = ''), 0),
           (SELECT COUNT(*) FROM (SELECT 1 FROM clients WHERE customer = ?2
              AND (secret_sha256 IS NOT NULL OR declared = 1) LIMIT ?6)),
           COALESCE((SELECT group_concat(registered_at) FROM (SELECT registered_at FROM clients
              WHERE customer = ?2 AND registered_at > ?5 ORDER BY registered_at)), '')",
        committed_columns(members.len(), 7)
    );
    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(client)
        .bind(customer_key(cfg, customer))
        .bind(month.to_string())
        .bind(reseller.map(|r| r.name.as_str()))
        .bind(since)
        .bind(i64::from(cust.max_clients.unwrap_or(0)));
    for m in &members {
        q = q.bind(*m);
    }
    let row = q.fetch_one(&mut *tx).await?;
    let usage = committed_of(&row, !members.is_empty()).beside(held);
    let n = |i: usize| row.get::<i64, _>(i).max(0) as u64;
    let mcal = McalState {
        client_debited_this_month: row.get::<bool, _>(4),
        customer_total: n(5),
        reseller_total: n(6),
        global_total: n(7),
    };
    let slots = n(8) as u32;
    let recent = row
        .get::<String, _>(9)
        .split(',')
        .filter_map(|t| t.parse().ok())
        .collect();
    Ok((usage, mcal, slots, recent))
}

/// Debits that bear on one more debit for `client` under `customer`.
pub(super) async fn mcal_state(
    tx: &mut Conn,
    cfg: &Config,
    client: &str,
    customer: CustomerId,
    month: Month,
) -> Result<McalState, StateError> {
    let reseller = cfg
        .customer(customer)
        .reseller
        .map(|r| cfg.reseller(r).name.as_str());
    let row = sqlx::query(
        "SELECT
           EXISTS(SELECT 1 FROM mcal_debits WHERE client = ?1 AND month = ?2),
           COALESCE((SELECT total FROM mcal_totals WHERE scope = 'customer' AND name = ?3), 0),
           COALESCE((SELECT total FROM mcal_totals WHERE scope = 'reseller' AND name = ?4), 0),
           COALESCE((SELECT total FROM mcal_totals WHERE scope = 'global' AND name = ''), 0)",
    )
    .bind(client)
    .bind(month.to_string())
    .bind(customer_key(cfg, customer))
    .bind(reseller)
    .fetch_one(&mut *tx)
    .await?;
    Ok(McalState {
        client_debited_this_month: row.get::<bool, _>(0),
        customer_total: row.get::<i64, _>(1).max(0) as u64,
        reseller_total: row.get::<i64, _>(2).max(0) as u64,
        global_total: row.get::<i64, _>(3).max(0) as u64,
    })
}

/// Clients holding a slot of `customer` (registered ones and declared
/// ones), counted up to its `max_clients`: the only use of the count is
/// that comparison, and a customer without a limit is not counted at all
/// (an admission must not scan every client, issue 13).
pub(super) async fn slot_count(
    tx: &mut Conn,
    cfg: &Config,
    customer: CustomerId,
) -> Result<u32, StateError> {
    let Some(max) = cfg.customer(customer).max_clients else {
        return Ok(0);
    };
    let n: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM (SELECT 1 FROM clients WHERE customer = ? AND (secret_sha256 IS NOT NULL OR declared = 1) LIMIT ?)",
    )
    .bind(customer_key(cfg, customer))
    .bind(i64::from(max))
    .fetch_one(&mut *tx)
    .await?;
    Ok(n as u32)
}

pub(super) async fn insert_debit(
    tx: &mut Conn,
    cfg: &Config,
    client: &str,
    customer: CustomerId,
    month: Month,
    cost: u32,
    at: Timestamp,
) -> Result<(), StateError> {
    let reseller = cfg
        .customer(customer)
        .reseller
        .map(|r| cfg.reseller(r).name.clone());
    sqlx::query("INSERT INTO mcal_debits (client, month, cost, customer, reseller, debited_at) VALUES (?, ?, ?, ?, ?, ?)")
        .bind(client)
        .bind(month.to_string())
        .bind(cost as i64)
        .bind(customer_key(cfg, customer))
        .bind(reseller)
        .bind(secs(at))
        .execute(&mut *tx)
        .await?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn upsert_registration(
    tx: &mut Conn,
    cfg: &Config,
    id: &str,
    customer: CustomerId,
    kind: Kind,
    secret: &str,
    declared: bool,
    hostname: Option<&str>,
    at: Timestamp,
) -> Result<(), StateError> {
    let name = customer_key(cfg, customer);
    sqlx::query(
        "INSERT INTO clients (id, customer, kind, secret_sha256, declared, hostname, registered_at, last_seen)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7)
         ON CONFLICT (id) DO UPDATE SET customer = excluded.customer, kind = excluded.kind,
           secret_sha256 = excluded.secret_sha256, declared = excluded.declared,
           hostname = COALESCE(excluded.hostname, clients.hostname),
           registered_at = excluded.registered_at, last_seen = excluded.last_seen,
           removed_at = NULL, readmit_sha256 = NULL, readmit_expires = NULL",
    )
    .bind(id)
    .bind(name)
    .bind(kind.as_str())
    .bind(admission::secret_digest(secret).to_vec())
    .bind(declared)
    .bind(hostname)
    .bind(secs(at))
    .execute(&mut *tx)
    .await?;
    sqlx::query("INSERT OR IGNORE INTO customer_usage (customer, used) VALUES (?, 0)")
        .bind(name)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

impl State {
    /// Debits this month's MCALs for `client` unless already debited;
    /// returns the cost debited (0 when it already was, or costs nothing).
    pub async fn debit_mcal_for_month(
        &self,
        cfg: &Config,
        client: &str,
        at: Timestamp,
    ) -> Result<Result<u32, Rejection>, StateError> {
        let mut tx = immediate(self).await?;
        let rec = known_client(&mut tx, cfg, client).await?;
        let month = Month::of(at, &cfg.server.timezone);
        let m = mcal_state(&mut tx, cfg, client, rec.customer, month).await?;
        let cost = cfg.mcal_cost(rec.kind);
        // Answers that rest on what this batch's earlier operations wrote
        // wait for it to be durable (`writer`).
        if m.client_debited_this_month || cost == 0 {
            tx.rollback().await?;
            return Ok(Ok(0));
        }
        if let Some(why) = admission::mcal_shortfall(cfg, rec.customer, rec.kind, &m) {
            tx.rollback().await?;
            return Ok(Err(Rejection::new(RejectCode::McalExhausted, why)));
        }
        insert_debit(&mut tx, cfg, client, rec.customer, month, cost, at).await?;
        tx.commit().await?;
        Ok(Ok(cost))
    }

    /// Reserves `size` bytes for an upload by `client` at every level
    /// (PROTOCOL.md Upload); returns the reservation id.
    pub async fn reserve_space(
        &self,
        cfg: &Config,
        client: &str,
        size: u64,
        at: Timestamp,
    ) -> Result<Result<i64, QuotaExceeded>, StateError> {
        let _ = at;
        // Nothing is written, so neither the writer nor an fsync is needed
        // (`ledger`). The committed usage is read first, beside other
        // reservations' reads; the decision is taken one at a time. If
        // committed usage changed meanwhile (a commit, a move), it is read
        // again under the lock, after the ledger.
        let seen = self.ledger.usage_gen();
        let (rec, committed) = {
            // Given back before waiting for the lock: a long move holds it,
            // and waiting reservations must not hold every reader.
            let mut conn = self.pool.acquire().await?;
            let rec = known_client(&mut conn, cfg, client).await?;
            let c = level_committed(&mut conn, cfg, &rec.id, rec.customer).await?;
            (rec, c)
        };
        let _deciding = self.ledger.reserving().await;
        // The ledger before the generation check: a commit that lands after
        // the read above bumps the generation before it releases its hold,
        // so either the check sees the bump or this read sees the hold.
        let held = held_for(&self.ledger, cfg, &rec.id, rec.customer);
        let (rec, held, c) = if self.ledger.usage_gen() == seen {
            (rec, held, committed)
        } else {
            let mut conn = self.pool.acquire().await?;
            let rec = known_client(&mut conn, cfg, client).await?;
            let held = held_for(&self.ledger, cfg, &rec.id, rec.customer);
            let c = level_committed(&mut conn, cfg, &rec.id, rec.customer).await?;
            (rec, held, c)
        };
        let usage = c.beside(held);
        if let Err(q) = QuotaExceeded::check(cfg, rec.customer, client, &usage, size) {
            return Ok(Err(q));
        }
        Ok(Ok(self.ledger.insert(
            &rec.id,
            customer_key(cfg, rec.customer),
            size,
        )))
    }

    /// Bytes held by reservations now, over every client.
    pub async fn reserved_total(&self) -> Result<u64, StateError> {
        Ok(self.ledger.total())
    }

    /// Releases a reservation whose upload failed or was abandoned.
    pub async fn release_reservation(&self, id: i64) -> Result<(), StateError> {
        self.ledger.release(id);
        Ok(())
    }

    /// Durably records a commit before its rename; returns its id.
    pub async fn begin_commit(&self, p: &PendingCommit) -> Result<i64, StateError> {
        let mut tx = immediate(self).await?;
        let id = sqlx::query_scalar(
            "INSERT INTO pending_commits (client, path, temp_path, final_path, size, sha256, modified, reservation, created_at, mode, mtime)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
        )
        .bind(&p.client)
        .bind(&p.path)
        .bind(p.temp_path.to_string_lossy().as_ref())
        .bind(p.final_path.to_string_lossy().as_ref())
        .bind(p.size as i64)
        .bind(&p.sha256)
        .bind(secs(p.modified))
        .bind(p.reservation)
        .bind(secs(p.modified))
        .bind(p.mode.map(i64::from))
        .bind(p.mtime.as_deref())
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(id)
    }

    /// Drops a pending commit whose rename did not happen, with its reservation.
    pub async fn abort_commit(&self, pending: i64) -> Result<(), StateError> {
        let mut tx = immediate(self).await?;
        let reservation: Option<i64> =
            sqlx::query_scalar("DELETE FROM pending_commits WHERE id = ? RETURNING reservation")
                .bind(pending)
                .fetch_optional(&mut *tx)
                .await?
                .flatten();
        tx.commit().await?;
        if let Some(r) = reservation {
            self.ledger.release(r);
        }
        Ok(())
    }

    /// After the rename: updates the index and usage (replace semantics:
    /// usage changes by the size difference), consumes the reservation and
    /// deletes the pending record, atomically. Returns the usage change.
    pub async fn commit_file(&self, pending: i64) -> Result<i64, StateError> {
        let mut tx = immediate(self).await?;
        let (delta, reservation) = apply_pending(&mut tx, pending, None).await?;
        tx.commit().await?;
        // Only once the usage is committed, and in this order (`ledger`).
        self.ledger.usage_changed();
        if let Some(r) = reservation {
            self.ledger.release(r);
        }
        Ok(delta)
    }

    /// Removes `path` of `client` from the index; returns the bytes freed,
    /// or `None` when it is not there.
    pub async fn delete_file(&self, client: &str, path: &str) -> Result<Option<u64>, StateError> {
        let mut tx = immediate(self).await?;
        let size: Option<i64> =
            sqlx::query_scalar("DELETE FROM files WHERE client = ? AND path = ? RETURNING size")
                .bind(client)
                .bind(path)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(size) = size else { return Ok(None) };
        add_usage(&mut tx, client, -size).await?;
        tx.commit().await?;
        self.ledger.usage_changed();
        Ok(Some(size as u64))
    }

    /// Resolves pending commits left by a crash and drops stale
    /// reservations. Run at startup, before serving.
    pub async fn reconcile(&self) -> Result<ReconcileReport, StateError> {
        /// What a pending commit's files say happened.
        enum Verdict {
            /// Not renamed.
            RollBack,
            /// Renamed; with the size and digest found when they differ.
            Forward(Option<(i64, String)>),
        }
        let mut report = ReconcileReport::default();
        let pending: Vec<(i64, String, String, i64, String)> = sqlx::query_as(
            "SELECT id, temp_path, final_path, size, sha256 FROM pending_commits ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        for (id, temp, fin, size, sha) in pending {
            let temp = PathBuf::from(temp);
            let probe = temp.clone();
            // What the disk says, found before the transaction (hashing can
            // take long; the write lane waits for no file work, issue 13).
            // The final file is judged by its digest, not its size: an old
            // file of the same size is not the new one.
            let verdict = tokio::task::spawn_blocking(move || -> Result<Verdict, StateError> {
                let digest = |p: &Path| {
                    crate::storage::sha256_file(p).map_err(|e| StateError::Io {
                        context: format!("hashing {}", p.display()),
                        source: e,
                    })
                };
                let fin = Path::new(&fin);
                let Ok(m) = std::fs::metadata(fin) else {
                    return Ok(Verdict::RollBack);
                };
                let found = digest(fin)?;
                if probe.exists() {
                    // Not renamed, unless the new file is in place and only
                    // the temp's removal was cut short (cross-device).
                    if m.len() as i64 == size && found == sha {
                        return Ok(Verdict::Forward(None));
                    }
                    return Ok(Verdict::RollBack);
                }
                if m.len() as i64 == size && found == sha {
                    Ok(Verdict::Forward(None))
                } else {
                    // Renamed, then changed by hand: index what is there.
                    Ok(Verdict::Forward(Some((m.len() as i64, found))))
                }
            })
            .await
            .map_err(|e| StateError::Io {
                context: "reconcile".into(),
                source: std::io::Error::other(e.to_string()),
            })??;
            let mut tx = immediate(self).await?;
            match &verdict {
                Verdict::RollBack => {
                    sqlx::query("DELETE FROM pending_commits WHERE id = ?")
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                    report.rolled_back += 1;
                }
                Verdict::Forward(found) => {
                    // A reservation of the process that crashed: not held here.
                    apply_pending(&mut tx, id, found.clone()).await?;
                    report.rolled_forward += 1;
                }
            }
            tx.commit().await?;
            self.ledger.usage_changed();
            // The temporary file goes only after its row: a crash between
            // the two leaves it to the temp sweep, never a row whose temp is
            // gone. A failure here is the sweep's to finish.
            if temp.exists()
                && let Err(e) = std::fs::remove_file(&temp)
            {
                tracing::warn!(file = %temp.display(), error = %e, "reconcile: removing a temporary file failed; the sweep retries");
            }
        }
        let mut tx = immediate(self).await?;
        report.reservations_dropped = sqlx::query("DELETE FROM reservations")
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(report)
    }

    /// Moves a registered (not declared) client to customer `to`: checks
    /// the target's space, client slots and MCAL room for the next monthly
    /// debit, then runs `move_data` (which moves the files of the client,
    /// named by its registered id, between the two customers) and moves the
    /// usage, all while holding the write lock. Debits already made stay.
    pub async fn move_client(
        &self,
        cfg: &Config,
        id: &str,
        to: &str,
        at: Timestamp,
        move_data: impl FnOnce(&str, CustomerId, CustomerId) -> std::io::Result<()>,
    ) -> Result<Result<(), MoveRefused>, StateError> {
        let Some(target) = cfg.customer_by_name(to) else {
            return Ok(Err(MoveRefused::UnknownCustomer(to.into())));
        };
        if cfg.declared_client(id).is_some() {
            return Ok(Err(MoveRefused::Declared(id.into())));
        }
        // No reservation is decided until the move is committed.
        let _deciding = self.ledger.reserving().await;
        let mut tx = immediate(self).await?;
        let Some(row) = client_db(&mut tx, id).await? else {
            return Ok(Err(MoveRefused::UnknownClient(id.into())));
        };
        let id = row.id.as_str();
        let Some(rec) = record(cfg, &row) else {
            return Err(StateError::Inconsistent(format!(
                "client {id:?} belongs to customer {:?}, which the config lacks",
                row.customer
            )));
        };
        if rec.customer == target {
            let tname = cfg.customer(target).name.clone();
            return Ok(Err(MoveRefused::SameCustomer(id.into(), tname)));
        }
        if let Err(why) = move_in(
            &mut tx,
            &self.ledger,
            cfg,
            &row,
            &rec,
            target,
            at,
            "moved",
            move_data,
        )
        .await?
        {
            return Ok(Err(why));
        }
        tx.commit().await?;
        // Before the reserving lock is let go (`ledger`).
        self.ledger.usage_changed();
        Ok(Ok(()))
    }

    /// Unregisters `id` and refunds its current month's MCAL debit. Without
    /// `purge` its files and usage stay and its id stays reserved: nobody
    /// can register it until `readmit` gives its owner a key. With `purge`,
    /// `purge_data` deletes the files, the usage is released and the id is
    /// free (a declared client keeps its config entry and enrolls again).
    /// Returns `None` when there is no such client.
    pub async fn remove_client(
        &self,
        cfg: &Config,
        id: &str,
        purge: bool,
        at: Timestamp,
        purge_data: impl FnOnce(&str, &str) -> std::io::Result<()>,
    ) -> Result<Option<Removed>, StateError> {
        let _deciding = self.ledger.reserving().await;
        let mut tx = immediate(self).await?;
        let Some(row) = client_db(&mut tx, id).await? else {
            return Ok(None);
        };
        let id = row.id.as_str();
        let month = Month::of(at, &cfg.server.timezone).to_string();
        let freed_mcal: Option<i64> = sqlx::query_scalar(
            "DELETE FROM mcal_debits WHERE client = ? AND month = ? RETURNING cost",
        )
        .bind(id)
        .bind(&month)
        .fetch_optional(&mut *tx)
        .await?;
        let mut freed_bytes = 0;
        if purge {
            purge_data(id, &row.customer).map_err(|e| StateError::Io {
                context: format!("deleting the files of client {id:?}"),
                source: e,
            })?;
            freed_bytes = row.used.max(0) as u64;
            add_usage(&mut tx, id, -row.used).await?;
            sqlx::query("DELETE FROM files WHERE client = ?")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        let kind = if purge { "purged" } else { "removed" };
        record_event(&mut tx, at, id, kind, None).await?;
        if purge && !row.declared {
            sqlx::query("DELETE FROM clients WHERE id = ?")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        } else {
            // Files kept: the id stays reserved for its owner until
            // `clients readmit` (PROTOCOL.md Additions). Purged declared
            // clients enroll again like new ones.
            sqlx::query(
                "UPDATE clients SET secret_sha256 = NULL, registered_at = NULL,
                   removed_at = CASE WHEN ?2 THEN NULL ELSE ?3 END,
                   readmit_sha256 = NULL, readmit_expires = NULL
                 WHERE id = ?1",
            )
            .bind(id)
            .bind(purge)
            .bind(secs(at))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        self.ledger.usage_changed();
        // Its uploads in flight end with its sessions (the event tells
        // them); their space is free now.
        self.ledger.release_client(id);
        Ok(Some(Removed {
            customer: row.customer,
            freed_bytes,
            freed_mcal: freed_mcal.unwrap_or(0).max(0) as u64,
        }))
    }

    /// Upserts the clients declared in the config (a declared client keeps
    /// its secret across reloads; its kind follows the config). A declared
    /// client whose `customer` changed in the config moves like `clients
    /// move` moves one (CONFIG.md "Moving a client"): `move_data` moves its
    /// files, and the move is refused with the reason (nothing applied) when
    /// the target lacks room, uploads are in flight or the old customer is
    /// gone. Only the daemon calls this, at start and reload. Returns the
    /// moves made: (id, from, to).
    pub async fn sync_declared(
        &self,
        cfg: &Config,
        at: Timestamp,
        mut move_data: impl FnMut(&str, CustomerId, CustomerId) -> std::io::Result<()>,
    ) -> Result<Result<Vec<(String, String, String)>, MoveRefused>, StateError> {
        let _deciding = self.ledger.reserving().await;
        let mut tx = immediate(self).await?;
        let mut moved = Vec::new();
        for c in &cfg.clients {
            let name = customer_key(cfg, c.customer);
            let row = client_db(&mut tx, &c.id).await?;
            if let Some(row) = &row
                && row.id != c.id
            {
                return Err(StateError::Inconsistent(format!(
                    "client {:?} is declared in the config, but client {:?} is registered; ids ignore letter case, so rename the declaration or remove the registered client",
                    c.id, row.id
                )));
            }
            if let Some(row) = row
                && !row.customer.eq_ignore_ascii_case(name)
            {
                let Some(rec) = record(cfg, &row) else {
                    return Ok(Err(MoveRefused::Data(format!(
                        "client {:?} is declared under customer {name:?} now, but its files are under customer {:?}, which the config no longer has; keep that customer until the client has moved",
                        c.id, row.customer
                    ))));
                };
                let refused = move_in(
                    &mut tx,
                    &self.ledger,
                    cfg,
                    &row,
                    &rec,
                    c.customer,
                    at,
                    "moved-by-config",
                    |id, f, t| move_data(id, f, t),
                )
                .await?;
                if let Err(why) = refused {
                    return Ok(Err(why));
                }
                moved.push((c.id.clone(), row.customer.clone(), name.to_string()));
            }
            sqlx::query(
                "INSERT INTO clients (id, customer, kind, declared) VALUES (?1, ?2, ?3, 1)
                 ON CONFLICT (id) DO UPDATE SET customer = ?2, kind = ?3, declared = 1",
            )
            .bind(&c.id)
            .bind(name)
            .bind(c.kind.as_str())
            .execute(&mut *tx)
            .await?;
            sqlx::query("INSERT OR IGNORE INTO customer_usage (customer, used) VALUES (?, 0)")
                .bind(name)
                .execute(&mut *tx)
                .await?;
        }
        // No longer declared: never connected and holding nothing = forgotten;
        // otherwise they stay as ordinary registered clients.
        type Declared = (String, Option<Vec<u8>>, i64, Option<i64>);
        let rows: Vec<Declared> = sqlx::query_as(
            "SELECT id, secret_sha256, used, removed_at FROM clients WHERE declared = 1",
        )
        .fetch_all(&mut *tx)
        .await?;
        for (id, secret, used, removed) in rows {
            if cfg.declared_client(&id).is_some() {
                continue;
            }
            // A removed client's id stays reserved, whatever it holds.
            if secret.is_none() && used == 0 && removed.is_none() {
                sqlx::query("DELETE FROM files WHERE client = ?")
                    .bind(&id)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("DELETE FROM clients WHERE id = ?")
                    .bind(&id)
                    .execute(&mut *tx)
                    .await?;
            } else {
                sqlx::query("UPDATE clients SET declared = 0 WHERE id = ?")
                    .bind(&id)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
        self.ledger.usage_changed();
        Ok(Ok(moved))
    }

    /// Records the start of an admitted session.
    pub async fn start_session(&self, s: &SessionStart<'_>) -> Result<(), StateError> {
        let mut tx = immediate(self).await?;
        sqlx::query("INSERT INTO sessions (id, client, customer, schedule, intent, peer, started_at) VALUES (?, ?, ?, ?, ?, ?, ?)")
            .bind(s.id)
            .bind(s.client)
            .bind(s.customer)
            .bind(s.schedule)
            .bind(s.intent)
            .bind(s.peer)
            .bind(secs(s.at))
            .execute(&mut *tx)
            .await?;
        tx.commit().await
    }

    /// Notes the start of an admitted session, to be written with others
    /// by [`State::flush_session_starts`] (the daemon runs it ten times a
    /// second; a session's end writes its own start if it is still noted):
    /// admissions do not each wait for a row of their own on the writer
    /// (issue 13). A crash loses at most the starts noted since the last
    /// flush. Noted starts are bounded by the live sessions: each is
    /// dropped once written or once its session ended.
    pub fn note_session_start(&self, s: &SessionStart<'_>) {
        let row = StartRow {
            id: s.id.to_string(),
            client: s.client.to_string(),
            customer: s.customer.to_string(),
            schedule: s.schedule.to_string(),
            intent: s.intent.to_string(),
            peer: s.peer.map(str::to_string),
            at: secs(s.at),
        };
        self.starts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(row.id.clone(), row);
    }

    /// Writes the noted session starts in one operation; returns how many.
    /// They stay noted until written (a failure is tried again), and a
    /// session that ends meanwhile writes its own: both insert the same
    /// row at most once, so the end never precedes its start.
    pub async fn flush_session_starts(&self) -> Result<u64, StateError> {
        let rows: Vec<StartRow> = self
            .starts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        if rows.is_empty() {
            return Ok(0);
        }
        let mut tx = immediate(self).await?;
        insert_starts(&mut tx, &rows).await?;
        tx.commit().await?;
        let mut noted = self.starts.lock().unwrap_or_else(|p| p.into_inner());
        for r in &rows {
            noted.remove(&r.id);
        }
        Ok(rows.len() as u64)
    }

    /// Records the end of a session with its totals and result code.
    /// `reports` (its e-mail reports, waiting for their digest) are stored
    /// in the same transaction.
    pub async fn end_session(
        &self,
        id: &str,
        e: &SessionEnd<'_>,
        reports: &[super::PendingReport],
    ) -> Result<(), StateError> {
        // A short session's start may still be only noted.
        let start = self
            .starts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned();
        let mut tx = immediate(self).await?;
        if let Some(row) = &start {
            insert_starts(&mut tx, std::slice::from_ref(row)).await?;
        }
        sqlx::query("UPDATE sessions SET ended_at = ?, bytes_in = ?, bytes_out = ?, files_ok = ?, files_failed = ?, result = ?, stored_after = (SELECT used FROM clients c WHERE c.id = sessions.client) WHERE id = ?")
            .bind(secs(e.at))
            .bind(e.bytes_in as i64)
            .bind(e.bytes_out as i64)
            .bind(e.files_ok as i64)
            .bind(e.files_failed as i64)
            .bind(e.result)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        for r in reports {
            sqlx::query(
                "INSERT INTO session_reports (recipient, client, facts, ended_at) VALUES (?, ?, ?, ?)",
            )
            .bind(&r.recipient)
            .bind(&r.client)
            .bind(&r.facts)
            .bind(secs(e.at))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        if start.is_some() {
            self.starts
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(id);
        }
        Ok(())
    }
}

/// Inserts session start rows, many per statement (each statement is a
/// round trip); a row already there is left alone.
async fn insert_starts(tx: &mut Conn, rows: &[StartRow]) -> Result<(), StateError> {
    for chunk in rows.chunks(STARTS_PER_STATEMENT) {
        let values = vec!["(?, ?, ?, ?, ?, ?, ?)"; chunk.len()].join(", ");
        let sql = format!(
            "INSERT OR IGNORE INTO sessions (id, client, customer, schedule, intent, peer, started_at) VALUES {values}"
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for r in chunk {
            q = q
                .bind(&r.id)
                .bind(&r.client)
                .bind(&r.customer)
                .bind(&r.schedule)
                .bind(&r.intent)
                .bind(&r.peer)
                .bind(r.at);
        }
        q.execute(&mut *tx).await?;
    }
    Ok(())
}

/// Session starts written per statement (7 parameters each; SQLite allows
/// 32,766).
const STARTS_PER_STATEMENT: usize = 200;

/// A noted session start ([`State::note_session_start`]).
#[derive(Debug, Clone)]
pub(super) struct StartRow {
    id: String,
    client: String,
    customer: String,
    schedule: String,
    intent: String,
    peer: Option<String>,
    at: i64,
}

/// A session row at its start.
#[derive(Debug, Clone)]
pub struct SessionStart<'a> {
    /// Session id.
    pub id: &'a str,
    /// Client id.
    pub client: &'a str,
    /// Customer name.
    pub customer: &'a str,
    /// Schedule name.
    pub schedule: &'a str,
    /// "backup" or "restore".
    pub intent: &'a str,
    /// Peer address.
    pub peer: Option<&'a str>,
    /// Start time.
    pub at: Timestamp,
}

/// A session's totals at its end.
#[derive(Debug, Clone)]
pub struct SessionEnd<'a> {
    /// End time.
    pub at: Timestamp,
    /// Bytes received.
    pub bytes_in: u64,
    /// Bytes sent.
    pub bytes_out: u64,
    /// Files stored.
    pub files_ok: u64,
    /// Uploads that failed.
    pub files_failed: u64,
    /// "ok" or the code that ended it.
    pub result: &'a str,
}

/// Moves `row`'s client to `target` inside the caller's transaction
/// (CONFIG.md "Moving a client"): refused with the reason when uploads are
/// in flight or the target lacks space, a client slot or MCAL room for the
/// next monthly debit; otherwise `move_data` moves the files (while the
/// write lock is held), then the usage follows and an event tells the
/// daemon's live sessions. Debits already made stay where they were made.
#[allow(clippy::too_many_arguments)] // one transaction's inputs; a struct would only rename them
pub(super) async fn move_in(
    tx: &mut Conn,
    ledger: &Ledger,
    cfg: &Config,
    row: &ClientDb,
    rec: &ClientRecord,
    target: CustomerId,
    at: Timestamp,
    kind: &str,
    move_data: impl FnOnce(&str, CustomerId, CustomerId) -> std::io::Result<()>,
) -> Result<Result<(), MoveRefused>, StateError> {
    let id = row.id.as_str();
    let tname = cfg.customer(target).name.clone();
    // The caller holds the ledger's reserving lock until it commits, so no
    // upload reserves under the old customer meanwhile.
    if ledger.in_flight(id) > 0 {
        return Ok(Err(MoveRefused::Busy(id.into())));
    }
    let needed = row.used.max(0) as u64;
    let mut usage = level_usage(tx, ledger, cfg, "", target).await?;
    // The server level is unchanged by a move; so is a shared reseller.
    usage.server = Usage::default();
    if cfg.customer(target).reseller == cfg.customer(rec.customer).reseller {
        usage.reseller = Usage::default();
    }
    let levels = space::levels(cfg, target, None, &usage);
    if !space::fits(&levels, needed) {
        let left = space::space_left(&levels).unwrap_or(0);
        return Ok(Err(MoveRefused::Space {
            customer: tname,
            needed,
            left,
        }));
    }
    if admission::client_limit_reached(cfg.customer(target), slot_count(tx, cfg, target).await?) {
        return Ok(Err(MoveRefused::Slots(tname)));
    }
    let mut m = mcal_state(tx, cfg, id, target, Month::of(at, &cfg.server.timezone)).await?;
    m.client_debited_this_month = false;
    if let Some(why) = admission::mcal_shortfall(cfg, target, rec.kind, &m) {
        return Ok(Err(MoveRefused::Mcal(format!(
            "customer {tname:?} has no MCAL room for the client's next monthly debit: {why}"
        ))));
    }
    if let Err(e) = move_data(id, rec.customer, target) {
        return Ok(Err(MoveRefused::Data(e.to_string())));
    }
    add_usage(tx, id, -(needed as i64)).await?;
    sqlx::query("UPDATE clients SET customer = ? WHERE id = ?")
        .bind(&tname)
        .bind(id)
        .execute(&mut *tx)
        .await?;
    sqlx::query("INSERT OR IGNORE INTO customer_usage (customer, used) VALUES (?, 0)")
        .bind(&tname)
        .execute(&mut *tx)
        .await?;
    add_usage(tx, id, needed as i64).await?;
    record_event(tx, at, id, kind, Some(&tname)).await?;
    Ok(Ok(()))
}

/// Records a move, removal or readmit for the running daemon, which logs
/// it and tells the client's live sessions. `kind` is one of
/// [`ClientEvent::parse`]'s.
pub(super) async fn record_event(
    tx: &mut Conn,
    at: Timestamp,
    client: &str,
    kind: &str,
    customer: Option<&str>,
) -> Result<(), StateError> {
    sqlx::query("INSERT INTO client_events (at, client, kind, customer) VALUES (?, ?, ?, ?)")
        .bind(secs(at))
        .bind(client)
        .bind(kind)
        .bind(customer)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// A move, removal or readmit, made by an admin command or (a move) by
/// the daemon applying the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// The client now belongs to this customer.
    Moved(String),
    /// The client was unregistered.
    Removed,
    /// The client was given a readmit key.
    Readmitted,
}

/// One row of `client_events`, as the daemon sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRow {
    /// Its sequence number.
    pub seq: i64,
    /// The client id.
    pub client: String,
    /// How it was recorded: `moved`, `moved-by-config`, `removed`,
    /// `purged` or `readmitted`.
    pub kind: String,
    /// What the client's live sessions must follow.
    pub event: ClientEvent,
}

impl ClientEvent {
    /// The event a stored `kind` stands for; `None` for a kind this
    /// version does not know (a newer node's), which is then ignored
    /// rather than guessed.
    pub fn parse(kind: &str, customer: Option<String>) -> Option<ClientEvent> {
        match (kind, customer) {
            ("moved" | "moved-by-config", Some(c)) => Some(ClientEvent::Moved(c)),
            ("removed" | "purged", _) => Some(ClientEvent::Removed),
            ("readmitted", _) => Some(ClientEvent::Readmitted),
            _ => None,
        }
    }
}

impl State {
    /// The newest event's sequence number (0 when there is none).
    pub async fn last_event(&self) -> Result<i64, StateError> {
        Ok(
            sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM client_events")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// Events after `seq`, oldest first.
    pub async fn events_after(&self, seq: i64) -> Result<Vec<EventRow>, StateError> {
        let rows: Vec<(i64, String, String, Option<String>)> = sqlx::query_as(
            "SELECT seq, client, kind, customer FROM client_events WHERE seq > ? ORDER BY seq",
        )
        .bind(seq)
        .fetch_all(&self.pool)
        .await?;
        Ok(event_rows(rows))
    }
}

/// Adds `delta` bytes to a client's usage and its customer's.
pub(super) async fn add_usage(tx: &mut Conn, client: &str, delta: i64) -> Result<(), StateError> {
    if delta == 0 {
        return Ok(());
    }
    sqlx::query("UPDATE clients SET used = used + ? WHERE id = ?")
        .bind(delta)
        .bind(client)
        .execute(&mut *tx)
        .await?;
    sqlx::query("UPDATE customer_usage SET used = used + ? WHERE customer = (SELECT customer FROM clients WHERE id = ?)")
        .bind(delta)
        .bind(client)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// The index half of a commit; `actual` overrides the recorded size and
/// digest when reconcile found a different file in place. Returns the
/// usage change and the reservation, which the caller releases once this
/// is committed.
async fn apply_pending(
    tx: &mut Conn,
    pending: i64,
    actual: Option<(i64, String)>,
) -> Result<(i64, Option<i64>), StateError> {
    #[derive(sqlx::FromRow)]
    struct Pending {
        client: String,
        path: String,
        size: i64,
        sha256: String,
        modified: i64,
        reservation: Option<i64>,
        mode: Option<i64>,
        mtime: Option<String>,
    }
    let p: Pending = sqlx::query_as(
        "SELECT client, path, size, sha256, modified, reservation, mode, mtime FROM pending_commits WHERE id = ?",
    )
    .bind(pending)
    .fetch_optional(&mut *tx)
    .await?
    .ok_or_else(|| StateError::Inconsistent(format!("no pending commit {pending}")))?;
    let Pending {
        client,
        path,
        size,
        sha256: sha,
        modified,
        reservation,
        mode,
        mtime,
    } = p;
    let (size, sha) = actual.unwrap_or((size, sha));
    let old: Option<i64> =
        sqlx::query_scalar("SELECT size FROM files WHERE client = ? AND path = ?")
            .bind(&client)
            .bind(&path)
            .fetch_optional(&mut *tx)
            .await?;
    sqlx::query(
        "INSERT INTO files (client, path, size, sha256, modified, mode, mtime) VALUES (?, ?, ?, ?, ?, ?, ?)
         ON CONFLICT (client, path) DO UPDATE SET size = excluded.size, sha256 = excluded.sha256,
           modified = excluded.modified, mode = excluded.mode, mtime = excluded.mtime",
    )
    .bind(&client)
    .bind(&path)
    .bind(size)
    .bind(&sha)
    .bind(modified)
    .bind(mode)
    .bind(mtime)
    .execute(&mut *tx)
    .await?;
    let delta = size - old.unwrap_or(0);
    add_usage(tx, &client, delta).await?;
    sqlx::query("DELETE FROM pending_commits WHERE id = ?")
        .bind(pending)
        .execute(&mut *tx)
        .await?;
    Ok((delta, reservation))
}
