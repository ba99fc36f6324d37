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
pub(super) use super::lite::{client_db, insert_debit, upsert_registration};
use super::{State, StateError, customer_key, secs};
use crate::config::{Config, CustomerId, Kind};
use crate::policy::admission::{self, ClientRecord, McalState, RejectCode, Rejection};
use crate::policy::space::{self, LevelUsage, Month};
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
pub(crate) struct ClientDb {
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
pub(crate) const CLIENT_COLUMNS: &str = "id, customer, kind, secret_sha256, declared <> 0 AS declared, used, removed_at, readmit_sha256, readmit_expires";

/// Waits for the write connection (`writer`): the operation runs in a
/// savepoint of the open batch, and its `commit` returns once the batch
/// is durable.
pub(super) async fn immediate(state: &State) -> Result<Tx, StateError> {
    match &state.db {
        super::Db::Sqlite {
            writer: Some(w), ..
        } => w.lease().await,
        super::Db::Postgres(_) => Err(StateError::Unsupported(
            "the SQLite writer was asked for on PostgreSQL".into(),
        )),
        super::Db::Sqlite { writer: None, .. } => Err(StateError::Inconsistent(
            "the state database was opened read-only".into(),
        )),
    }
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
/// [`slot_count`]) and the time of the customer's
/// `registrations_per_minute`-th newest registration after `since`
/// ([`crate::policy::admission::Snapshot::nth_recent_registration`]).
pub(super) async fn admission_reads(
    tx: &mut Conn,
    ledger: &Ledger,
    cfg: &Config,
    client: &str,
    customer: CustomerId,
    month: Month,
    since: i64,
) -> Result<(LevelUsage, McalState, u32, Option<i64>), StateError> {
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
           (SELECT registered_at FROM clients WHERE customer = ?2 AND registered_at > ?5
              ORDER BY registered_at DESC LIMIT 1 OFFSET ?7)",
        committed_columns(members.len(), 8)
    );
    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(client)
        .bind(customer_key(cfg, customer))
        .bind(month.to_string())
        .bind(reseller.map(|r| r.name.as_str()))
        .bind(since)
        .bind(i64::from(cust.max_clients.unwrap_or(0)))
        .bind(crate::policy::admission::nth_registration_offset(cfg));
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
    Ok((usage, mcal, slots, row.get::<Option<i64>, _>(9)))
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
        super::in_tx!(self, sql, tx => {
            // The record first, for its customer; then the locks; then the
            // record again under them (a move may have run in between).
            let first = sql::client_db(&mut tx, client).await?;
            let customer = first.as_ref().and_then(|r| record(cfg, r)).map(|r| r.customer);
            if let Some(c) = customer {
                sql::lock_admission(&mut tx, client, Some((cfg, c)), true).await?;
            }
            let row = sql::client_db(&mut tx, client).await?;
            let Some(rec) = row.as_ref().and_then(|r| record(cfg, r)).filter(|r| Some(r.customer) == customer) else {
                return Err(StateError::Inconsistent(format!(
                    "client {client:?} is not registered under a known customer"
                )));
            };
            let month = Month::of(at, &cfg.server.timezone);
            let m = sql::mcal_state(&mut tx, cfg, &rec.id, rec.customer, month).await?;
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
            sql::insert_debit(&mut tx, cfg, &rec.id, rec.customer, month, cost, at).await?;
            tx.commit().await?;
            Ok(Ok(cost))
        })
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
        if let Some(c) = self.cluster() {
            return c.reserve_space(cfg, client, size, at).await;
        }
        // Nothing is written, so neither the writer nor an fsync is needed
        // (`ledger`). The committed usage is read first, beside other
        // reservations' reads; the decision is taken one at a time. If
        // committed usage changed meanwhile (a commit, a move), it is read
        // again under the lock, after the ledger.
        let seen = self.ledger.usage_gen();
        let (rec, committed) = {
            // Given back before waiting for the lock: a long move holds it,
            // and waiting reservations must not hold every reader.
            let mut conn = self.lite()?.acquire().await?;
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
            let mut conn = self.lite()?.acquire().await?;
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
        if let Some(c) = self.cluster() {
            return c.reserved_total().await;
        }
        Ok(self.ledger.total())
    }

    /// Releases a reservation whose upload failed or was abandoned.
    pub async fn release_reservation(&self, id: i64) -> Result<(), StateError> {
        if let Some(c) = self.cluster() {
            return c.release_reservation(id).await.map(|_| ());
        }
        self.ledger.release(id);
        Ok(())
    }

    /// Durably records a commit before its rename; returns its id.
    pub async fn begin_commit(&self, p: &PendingCommit) -> Result<i64, StateError> {
        if let Some(g) = self.groups() {
            return g.begin.call(p.clone()).await;
        }
        super::in_tx!(self, sql, tx => {
            sql::check_hold(&mut tx, p.reservation).await?;
            let id = sql::insert_pending(&mut tx, p).await?;
            tx.commit().await?;
            Ok(id)
        })
    }

    /// Drops a pending commit whose rename did not happen, with its reservation.
    pub async fn abort_commit(&self, pending: i64) -> Result<(), StateError> {
        let reservation = super::in_tx!(self, sql, tx => {
            let reservation: Option<i64> = sqlx::query_scalar(
                "DELETE FROM pending_commits WHERE id = $1 RETURNING reservation",
            )
            .bind(pending)
            .fetch_optional(&mut *tx)
            .await?
            .flatten();
            sql::end_hold(&mut tx, reservation).await?;
            tx.commit().await?;
            Ok(reservation)
        })?;
        if let Some(r) = reservation {
            self.ledger.release(r);
        }
        Ok(())
    }

    /// After the rename: updates the index and usage (replace semantics:
    /// usage changes by the size difference), consumes the reservation and
    /// deletes the pending record, atomically. Returns the usage change.
    pub async fn commit_file(&self, pending: i64) -> Result<i64, StateError> {
        if let Some(g) = self.groups() {
            // The ledger's side is the group's (`grouped`).
            return g.commit.call(pending).await;
        }
        let (delta, reservation) = super::in_tx!(self, sql, tx => {
            let r = sql::apply_pending(&mut tx, pending, None).await?;
            tx.commit().await?;
            Ok(r)
        })?;
        // Only once the usage is committed, and in this order (`ledger`;
        // on PostgreSQL the hold ended in the same transaction).
        self.ledger.usage_changed();
        if let Some(r) = reservation {
            self.ledger.release(r);
        }
        Ok(delta)
    }

    /// Removes `path` of `client` from the index; returns the bytes freed,
    /// or `None` when it is not there.
    pub async fn delete_file(&self, client: &str, path: &str) -> Result<Option<u64>, StateError> {
        let size = super::in_tx!(self, sql, tx => {
            // In the order commits take them (`sql::apply_pending`).
            sql::lock_client_row(&mut tx, client).await?;
            let size: Option<i64> =
                sqlx::query_scalar("DELETE FROM files WHERE client = $1 AND path = $2 RETURNING size")
                    .bind(client)
                    .bind(path)
                    .fetch_optional(&mut *tx)
                    .await?;
            let Some(size) = size else { return Ok(None) };
            sql::add_usage(&mut tx, client, -size).await?;
            tx.commit().await?;
            Ok(Some(size))
        })?;
        if size.is_some() {
            self.ledger.usage_changed();
        }
        Ok(size.map(|s| s as u64))
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
        let pending: Vec<(i64, String, String, i64, String)> = super::on_pool!(self, pool => {
            sqlx::query_as(
                "SELECT id, temp_path, final_path, size, sha256 FROM pending_commits ORDER BY id",
            )
            .fetch_all(pool)
            .await?
        });
        // On PostgreSQL, only this node's: another node's may be in
        // flight. Its temporary files are in a directory named after it
        // (`storage::temp_dir`).
        let node = self.cluster().map(|c| c.node().to_string());
        let ours = |temp: &Path| match &node {
            None => true,
            Some(n) => {
                let dir = temp.parent();
                dir.and_then(Path::file_name) == Some(std::ffi::OsStr::new(n))
                    && dir.and_then(Path::parent).and_then(Path::file_name)
                        == Some(std::ffi::OsStr::new(crate::storage::TEMP_DIR))
            }
        };
        for (id, temp, fin, size, sha) in pending {
            if !ours(Path::new(&temp)) {
                continue;
            }
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
            super::in_tx!(self, sql, tx => {
                match &verdict {
                    Verdict::RollBack => {
                        let r: Option<Option<i64>> = sqlx::query_scalar(
                            "DELETE FROM pending_commits WHERE id = $1 RETURNING reservation",
                        )
                        .bind(id)
                        .fetch_optional(&mut *tx)
                        .await?;
                        // On PostgreSQL the hold outlived the crash with it.
                        sql::end_hold(&mut tx, r.flatten()).await?;
                    }
                    Verdict::Forward(found) => {
                        // A reservation of the process that crashed: not held
                        // here (on PostgreSQL, dropped when this node opened).
                        sql::apply_pending(&mut tx, id, found.clone()).await?;
                    }
                }
                tx.commit().await?;
                Ok(())
            })?;
            match verdict {
                Verdict::RollBack => report.rolled_back += 1,
                Verdict::Forward(_) => report.rolled_forward += 1,
            }
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
        if self.cluster().is_none() {
            let mut tx = immediate(self).await?;
            report.reservations_dropped = sqlx::query("DELETE FROM reservations")
                .execute(&mut *tx)
                .await?
                .rows_affected();
            tx.commit().await?;
        }
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
        super::in_tx!(once self, sql, tx => {
            // The record first, for the locks (client, then customers in
            // admission's order); then again under them.
            let Some(first) = sql::client_db(&mut tx, id).await? else {
                return Ok(Err(MoveRefused::UnknownClient(id.into())));
            };
            sql::lock_admission(&mut tx, &first.id, Some((cfg, target)), true).await?;
            let Some(row) = sql::client_db(&mut tx, id).await? else {
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
            if let Err(why) = sql::move_in(
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
        })
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
        let removed = super::in_tx!(once self, sql, tx => {
            sql::lock_admission(&mut tx, id, None, false).await?;
            let Some(row) = sql::client_db(&mut tx, id).await? else {
                return Ok(None);
            };
            sql::lock_client_row(&mut tx, &row.id).await?;
            // Read again under the row's lock: a commit on another node
            // may have changed its usage meanwhile.
            let Some(row) = sql::client_db(&mut tx, &row.id).await? else {
                return Ok(None);
            };
            let id = row.id.as_str();
            let month = Month::of(at, &cfg.server.timezone).to_string();
            let freed_mcal: Option<i64> = sqlx::query_scalar(
                "DELETE FROM mcal_debits WHERE client = $1 AND month = $2 RETURNING cost",
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
                sql::add_usage(&mut tx, id, -row.used).await?;
                sqlx::query("DELETE FROM files WHERE client = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
            }
            let kind = if purge { "purged" } else { "removed" };
            sql::record_event(&mut tx, at, id, kind, None).await?;
            if purge && !row.declared {
                sqlx::query("DELETE FROM clients WHERE id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
            } else {
                // Files kept: the id stays reserved for its owner until
                // `clients readmit` (PROTOCOL.md Additions). Purged declared
                // clients enroll again like new ones.
                sqlx::query(
                    "UPDATE clients SET secret_sha256 = NULL, registered_at = NULL,
                       removed_at = CASE WHEN $2 THEN NULL ELSE $3 END,
                       readmit_sha256 = NULL, readmit_expires = NULL
                     WHERE id = $1",
                )
                .bind(id)
                .bind(purge)
                .bind(secs(at))
                .execute(&mut *tx)
                .await?;
            }
            // Its uploads in flight end with its sessions (the event tells
            // them); their space is free now.
            sql::drop_holds(&mut tx, id).await?;
            tx.commit().await?;
            Ok(Some(Removed {
                customer: row.customer.clone(),
                freed_bytes,
                freed_mcal: freed_mcal.unwrap_or(0).max(0) as u64,
            }))
        })?;
        if removed.is_some() {
            self.ledger.usage_changed();
            // The id as registered (the ledger compares without case).
            self.ledger.release_client(id);
        }
        Ok(removed)
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
        let r = super::in_tx!(once self, sql, tx => {
            // Every node syncs at its start and reload: one at a time.
            sql::lock_admission(&mut tx, "(declared clients)", None, false).await?;
            // The locks of every move below first, in admission's order
            // (ids, then customers, then MCAL): the moves then take none
            // out of that order.
            let mut moving: Vec<(String, CustomerId)> = Vec::new();
            for c in &cfg.clients {
                if let Some(row) = sql::client_db(&mut tx, &c.id).await?
                    && !row.customer.eq_ignore_ascii_case(customer_key(cfg, c.customer))
                {
                    moving.push((row.id, c.customer));
                }
            }
            let moves: Vec<(&str, Option<CustomerId>)> =
                moving.iter().map(|(id, c)| (id.as_str(), Some(*c))).collect();
            sql::lock_keys(&mut tx, &sql::admission_keys(cfg, &moves, true)).await?;
            let mut moved = Vec::new();
            for c in &cfg.clients {
                let name = customer_key(cfg, c.customer);
                let row = sql::client_db(&mut tx, &c.id).await?;
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
                    sql::lock_admission(&mut tx, &row.id, Some((cfg, c.customer)), true).await?;
                    let refused = sql::move_in(
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
                    "INSERT INTO clients (id, customer, kind, declared) VALUES ($1, $2, $3, 1)
                     ON CONFLICT (id) DO UPDATE SET customer = $2, kind = $3, declared = 1",
                )
                .bind(&c.id)
                .bind(name)
                .bind(c.kind.as_str())
                .execute(&mut *tx)
                .await?;
                sql::customer_usage_row(&mut tx, name).await?;
            }
            // No longer declared: never connected and holding nothing = forgotten;
            // otherwise they stay as ordinary registered clients.
            type Declared = (String, Option<Vec<u8>>, i64, Option<i64>);
            let rows: Vec<Declared> = sqlx::query_as(
                "SELECT id, secret_sha256, used, removed_at FROM clients WHERE declared <> 0",
            )
            .fetch_all(&mut *tx)
            .await?;
            for (id, secret, used, removed) in rows {
                if cfg.declared_client(&id).is_some() {
                    continue;
                }
                // A removed client's id stays reserved, whatever it holds.
                if secret.is_none() && used == 0 && removed.is_none() {
                    sqlx::query("DELETE FROM files WHERE client = $1")
                        .bind(&id)
                        .execute(&mut *tx)
                        .await?;
                    sqlx::query("DELETE FROM clients WHERE id = $1")
                        .bind(&id)
                        .execute(&mut *tx)
                        .await?;
                } else {
                    sqlx::query("UPDATE clients SET declared = 0 WHERE id = $1")
                        .bind(&id)
                        .execute(&mut *tx)
                        .await?;
                }
            }
            tx.commit().await?;
            Ok(Ok(moved))
        })?;
        self.ledger.usage_changed();
        Ok(r)
    }

    /// Records the start of an admitted session.
    pub async fn start_session(&self, s: &SessionStart<'_>) -> Result<(), StateError> {
        super::in_tx!(self, sql, tx => {
            sqlx::query("INSERT INTO sessions (id, client, customer, schedule, intent, peer, started_at) VALUES ($1, $2, $3, $4, $5, $6, $7)")
                .bind(s.id)
                .bind(s.client)
                .bind(s.customer)
                .bind(s.schedule)
                .bind(s.intent)
                .bind(s.peer)
                .bind(secs(s.at))
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(())
        })
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
        super::in_tx!(self, sql, tx => {
            sql::insert_starts(&mut tx, &rows).await?;
            tx.commit().await?;
            Ok(())
        })?;
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
        let ended = SessionEnded {
            id: id.to_string(),
            // A short session's start may still be only noted.
            start: self
                .starts
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(id)
                .cloned(),
            at: secs(e.at),
            bytes_in: e.bytes_in as i64,
            bytes_out: e.bytes_out as i64,
            files_ok: e.files_ok as i64,
            files_failed: e.files_failed as i64,
            result: e.result.to_string(),
            reports: reports.to_vec(),
        };
        let noted = ended.start.is_some();
        if let Some(g) = self.groups() {
            // Sessions end in crowds (every upload of a run ends at once):
            // grouped, so they do not queue one by one on the writer
            // before the commits of uploads still ending (`grouped`).
            g.end.call(ended).await?;
        } else {
            super::in_tx!(self, sql, tx => {
                sql::end_session(&mut tx, &ended).await?;
                tx.commit().await?;
                Ok(())
            })?;
        }
        if noted {
            self.starts
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(id);
        }
        Ok(())
    }
}

/// A session's end as the state writes it ([`State::end_session`]).
#[derive(Debug, Clone)]
pub(crate) struct SessionEnded {
    pub(crate) id: String,
    /// Its start, when it is still only noted.
    pub(crate) start: Option<StartRow>,
    pub(crate) at: i64,
    pub(crate) bytes_in: i64,
    pub(crate) bytes_out: i64,
    pub(crate) files_ok: i64,
    pub(crate) files_failed: i64,
    pub(crate) result: String,
    pub(crate) reports: Vec<super::PendingReport>,
}

/// Session starts written per statement (7 parameters each; SQLite allows
/// 32,766).
pub(crate) const STARTS_PER_STATEMENT: usize = 200;

/// A noted session start ([`State::note_session_start`]).
#[derive(Debug, Clone)]
pub(crate) struct StartRow {
    pub(crate) id: String,
    pub(crate) client: String,
    pub(crate) customer: String,
    pub(crate) schedule: String,
    pub(crate) intent: String,
    pub(crate) peer: Option<String>,
    pub(crate) at: i64,
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
        Ok(super::on_pool!(self, pool => {
            sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM client_events")
                .fetch_one(pool)
                .await?
        }))
    }

    /// Events after `seq`, oldest first.
    pub async fn events_after(&self, seq: i64) -> Result<Vec<EventRow>, StateError> {
        let rows: Vec<(i64, String, String, Option<String>)> = super::on_pool!(self, pool => {
            sqlx::query_as(
                "SELECT seq, client, kind, customer FROM client_events WHERE seq > $1 ORDER BY seq",
            )
            .bind(seq)
            .fetch_all(pool)
            .await?
        });
        Ok(event_rows(rows))
    }
}
