// The statements both backends run, written once and compiled twice: as
// `state::lite` over a SQLite connection and as `state::pg` over a
// PostgreSQL one (`state/mod.rs`). Each including module defines `Conn`,
// the connection type, and `CLUSTER`, whether the reservations are rows
// (PostgreSQL) rather than the process's ledger (SQLite).
//
// The dialect is what both accept: `$N` parameters (sqlx numbers them on
// SQLite too), `ON CONFLICT … DO NOTHING` instead of `INSERT OR IGNORE`,
// `declared <> 0` rather than a boolean column, integers bound as i64,
// and `CAST(… AS BIGINT)` around a sum (PostgreSQL sums BIGINT to
// NUMERIC).

use crate::config::{Config, CustomerId, Kind};
use crate::policy::admission::{self, McalState};
use crate::policy::space::Month;
use crate::policy::admission::ClientRecord;
use crate::policy::space::{self, Usage};
use crate::state::ops::{CLIENT_COLUMNS, ClientDb, MoveRefused, SessionEnded, StartRow};
use crate::state::{StateError, customer_key, secs};
use jiff::Timestamp;
use sqlx::Row;

/// On PostgreSQL, takes the admission locks (`postgres::admission`) in
/// their fixed order: the client id, then `customer` (client slots, its
/// MCAL limit), then with `mcal` the global MCAL pool and the customer's
/// reseller's MCAL limit. On SQLite the writer runs one operation at a
/// time, so there is nothing to take.
pub(crate) async fn lock_admission(
    tx: &mut Conn,
    client: &str,
    customer: Option<(&Config, CustomerId)>,
    mcal: bool,
) -> Result<(), StateError> {
    let moves: Vec<(&str, Option<CustomerId>)> = vec![(client, customer.map(|(_, c)| c))];
    match customer {
        Some((cfg, _)) => lock_keys(tx, &admission_keys(cfg, &moves, mcal)).await,
        None => lock_keys(tx, &[admission_key("admit client", client)]).await,
    }
}

fn admission_key(level: &str, name: &str) -> i64 {
    crate::state::postgres::lock_key(level, name)
}

/// The admission locks of several clients moving to customers, in the
/// fixed order: every client id, then every customer, then the MCAL locks
/// (each once). One transaction that moves several clients takes them
/// all first, so it never waits for a lock out of that order.
pub(crate) fn admission_keys(
    cfg: &Config,
    moves: &[(&str, Option<CustomerId>)],
    mcal: bool,
) -> Vec<i64> {
    let mut keys: Vec<i64> = Vec::new();
    let mut add = |k: i64| {
        if !keys.contains(&k) {
            keys.push(k);
        }
    };
    for (client, _) in moves {
        add(admission_key("admit client", client));
    }
    for c in moves.iter().filter_map(|(_, c)| *c) {
        add(admission_key("admit customer", &cfg.customer(c).name));
    }
    if mcal && cfg.server.mcal.is_some() && moves.iter().any(|(_, c)| c.is_some()) {
        add(admission_key("mcal server", ""));
        for c in moves.iter().filter_map(|(_, c)| *c) {
            if let Some(r) = cfg.customer(c).reseller
                && matches!(cfg.reseller(r).mcal_limit, crate::config::McalLimit::Fixed(_))
            {
                add(admission_key("mcal reseller", &cfg.reseller(r).name));
            }
        }
    }
    keys
}

/// The client whose id equals `id` without regard to case (ids are
/// unique that way; PROTOCOL.md Additions, issue 11).
pub(crate) async fn client_db(tx: &mut Conn, id: &str) -> Result<Option<ClientDb>, StateError> {
    Ok(sqlx::query_as::<_, ClientDb>(sqlx::AssertSqlSafe(format!(
        "SELECT {CLIENT_COLUMNS} FROM clients WHERE id = $1 COLLATE NOCASE"
    )))
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?)
}

/// Makes the usage row of customer `name` if it has none.
pub(crate) async fn customer_usage_row(tx: &mut Conn, name: &str) -> Result<(), StateError> {
    sqlx::query("INSERT INTO customer_usage (customer, used) VALUES ($1, 0) ON CONFLICT DO NOTHING")
        .bind(name)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Adds `delta` bytes to a client's usage and its customer's.
pub(crate) async fn add_usage(tx: &mut Conn, client: &str, delta: i64) -> Result<(), StateError> {
    if delta == 0 {
        return Ok(());
    }
    sqlx::query("UPDATE clients SET used = used + $1 WHERE id = $2")
        .bind(delta)
        .bind(client)
        .execute(&mut *tx)
        .await?;
    sqlx::query("UPDATE customer_usage SET used = used + $1 WHERE customer = (SELECT customer FROM clients WHERE id = $2)")
        .bind(delta)
        .bind(client)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Ends reservation `id` inside the caller's transaction when it is a row
/// (PostgreSQL): with the usage it becomes, so no reader counts it twice
/// or not at all. SQLite's ledger is released by the caller after commit.
pub(crate) async fn end_hold(tx: &mut Conn, id: Option<i64>) -> Result<(), StateError> {
    if CLUSTER && let Some(id) = id {
        sqlx::query("DELETE FROM held WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
    }
    Ok(())
}

/// Fails when reservation `id` is a row (PostgreSQL) that is gone: its
/// node's lease ran out and the space may be given away, so the upload
/// must not commit on it. Locks the row until the caller commits.
pub(crate) async fn check_hold(tx: &mut Conn, id: Option<i64>) -> Result<(), StateError> {
    if CLUSTER && let Some(id) = id {
        // Its node's lease must still run: the other nodes stop counting a
        // hold when it runs out. Once the pending commit is recorded, the
        // hold counts whatever the lease (`postgres::LIVE_HOLD`).
        let found: Option<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT h.id FROM held h JOIN nodes n ON n.name = h.node
              WHERE h.id = $1 AND n.expires_ms > {}
              FOR UPDATE OF h",
            crate::state::postgres::NOW_MS
        )))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        if found.is_none() {
            return Err(StateError::Inconsistent(
                "this upload's reservation was given back (this node's lease ran out while it was in flight); it is not stored".into(),
            ));
        }
    }
    Ok(())
}

/// Ends every reservation of `client` when they are rows (PostgreSQL);
/// SQLite's ledger is released by the caller after commit.
pub(crate) async fn drop_holds(tx: &mut Conn, client: &str) -> Result<(), StateError> {
    if CLUSTER {
        sqlx::query("DELETE FROM held WHERE client = $1")
            .bind(client)
            .execute(&mut *tx)
            .await?;
    }
    Ok(())
}

/// Records a pending commit (`State::begin_commit`); returns its id.
pub(crate) async fn insert_pending(
    tx: &mut Conn,
    p: &crate::state::PendingCommit,
) -> Result<i64, StateError> {
    let modified = secs(p.modified);
    Ok(sqlx::query_scalar(
        "INSERT INTO pending_commits (client, path, temp_path, final_path, size, sha256, modified, reservation, created_at, mode, mtime)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) RETURNING id",
    )
    .bind(&p.client)
    .bind(&p.path)
    .bind(p.temp_path.to_string_lossy().as_ref())
    .bind(p.final_path.to_string_lossy().as_ref())
    .bind(p.size as i64)
    .bind(&p.sha256)
    .bind(modified)
    .bind(p.reservation)
    .bind(modified)
    .bind(p.mode.map(i64::from))
    .bind(p.mtime.as_deref())
    .fetch_one(&mut *tx)
    .await?)
}

/// The index half of a commit; `actual` overrides the recorded size and
/// digest when reconcile found a different file in place. Returns the
/// usage change and the reservation.
pub(crate) async fn apply_pending(
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
        "SELECT client, path, size, sha256, modified, reservation, mode, mtime FROM pending_commits WHERE id = $1",
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
    // PostgreSQL: commits of one file in parallel transactions would each
    // read the same old size and count the difference twice. The client's
    // row is locked first, as every write of its files does.
    lock_client_row(tx, &client).await?;
    let old: Option<i64> =
        sqlx::query_scalar("SELECT size FROM files WHERE client = $1 AND path = $2")
            .bind(&client)
            .bind(&path)
            .fetch_optional(&mut *tx)
            .await?;
    sqlx::query(
        "INSERT INTO files (client, path, size, sha256, modified, mode, mtime) VALUES ($1, $2, $3, $4, $5, $6, $7)
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
    sqlx::query("DELETE FROM pending_commits WHERE id = $1")
        .bind(pending)
        .execute(&mut *tx)
        .await?;
    end_hold(tx, reservation).await?;
    Ok((delta, reservation))
}

/// Records a move, removal or readmit for the running daemons, which log
/// it and tell the client's live sessions. `kind` is one of
/// `ClientEvent::parse`'s.
pub(crate) async fn record_event(
    tx: &mut Conn,
    at: Timestamp,
    client: &str,
    kind: &str,
    customer: Option<&str>,
) -> Result<(), StateError> {
    if CLUSTER {
        // Events are read by sequence number on every node: one writer at
        // a time, so no reader passes a number still uncommitted.
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(crate::state::postgres::lock_key("events", ""))
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query("INSERT INTO client_events (at, client, kind, customer) VALUES ($1, $2, $3, $4)")
        .bind(secs(at))
        .bind(client)
        .bind(kind)
        .bind(customer)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Completes a session's row (and writes its start first, when it was
/// only noted) and stores its e-mail reports.
pub(crate) async fn end_session(tx: &mut Conn, e: &SessionEnded) -> Result<(), StateError> {
    if let Some(row) = &e.start {
        insert_starts(tx, std::slice::from_ref(row)).await?;
    }
    sqlx::query("UPDATE sessions SET ended_at = $1, bytes_in = $2, bytes_out = $3, files_ok = $4, files_failed = $5, result = $6, stored_after = (SELECT used FROM clients c WHERE c.id = sessions.client) WHERE id = $7")
        .bind(e.at)
        .bind(e.bytes_in)
        .bind(e.bytes_out)
        .bind(e.files_ok)
        .bind(e.files_failed)
        .bind(&e.result)
        .bind(&e.id)
        .execute(&mut *tx)
        .await?;
    for r in &e.reports {
        sqlx::query(
            "INSERT INTO session_reports (recipient, client, facts, ended_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(&r.recipient)
        .bind(&r.client)
        .bind(&r.facts)
        .bind(e.at)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

/// Inserts session start rows, many per statement (each statement is a
/// round trip); a row already there is left alone.
pub(crate) async fn insert_starts(tx: &mut Conn, rows: &[StartRow]) -> Result<(), StateError> {
    for chunk in rows.chunks(crate::state::ops::STARTS_PER_STATEMENT) {
        let values: Vec<String> = (0..chunk.len())
            .map(|i| {
                let n = i * 7;
                format!(
                    "(${}, ${}, ${}, ${}, ${}, ${}, ${})",
                    n + 1,
                    n + 2,
                    n + 3,
                    n + 4,
                    n + 5,
                    n + 6,
                    n + 7
                )
            })
            .collect();
        let sql = format!(
            "INSERT INTO sessions (id, client, customer, schedule, intent, peer, started_at) VALUES {} ON CONFLICT DO NOTHING",
            values.join(", ")
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

/// Debits that bear on one more debit for `client` under `customer`.
pub(crate) async fn mcal_state(
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
           EXISTS(SELECT 1 FROM mcal_debits WHERE client = $1 AND month = $2),
           COALESCE((SELECT total FROM mcal_totals WHERE scope = 'customer' AND name = $3), 0),
           COALESCE((SELECT total FROM mcal_totals WHERE scope = 'reseller' AND name = $4), 0),
           COALESCE((SELECT total FROM mcal_totals WHERE scope = 'global' AND name = ''), 0)",
    )
    .bind(client)
    .bind(month.to_string())
    .bind(customer_key(cfg, customer))
    .bind(reseller)
    .fetch_one(&mut *tx)
    .await?;
    Ok(McalState {
        client_debited_this_month: row.try_get::<bool, _>(0)?,
        customer_total: row.try_get::<i64, _>(1)?.max(0) as u64,
        reseller_total: row.try_get::<i64, _>(2)?.max(0) as u64,
        global_total: row.try_get::<i64, _>(3)?.max(0) as u64,
    })
}

/// Clients holding a slot of `customer` (registered ones and declared
/// ones), counted up to its `max_clients`: the only use of the count is
/// that comparison, and a customer without a limit is not counted at all
/// (an admission must not scan every client, issue 13).
pub(crate) async fn slot_count(
    tx: &mut Conn,
    cfg: &Config,
    customer: CustomerId,
) -> Result<u32, StateError> {
    let Some(max) = cfg.customer(customer).max_clients else {
        return Ok(0);
    };
    let n: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM (SELECT 1 FROM clients WHERE customer = $1 AND (secret_sha256 IS NOT NULL OR declared <> 0) LIMIT $2) s",
    )
    .bind(customer_key(cfg, customer))
    .bind(i64::from(max))
    .fetch_one(&mut *tx)
    .await?;
    Ok(n as u32)
}

/// Debits `cost` MCALs of `month` for `client` of `customer`.
pub(crate) async fn insert_debit(
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
    sqlx::query("INSERT INTO mcal_debits (client, month, cost, customer, reseller, debited_at) VALUES ($1, $2, $3, $4, $5, $6)")
        .bind(client)
        .bind(month.to_string())
        .bind(i64::from(cost))
        .bind(customer_key(cfg, customer))
        .bind(reseller)
        .bind(secs(at))
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Registers `id` under `customer` with `secret`, or gives an existing
/// record (a declared client's, a purged one's) its registration.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn upsert_registration(
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
         VALUES ($1, $2, $3, $4, $5, $6, $7, $7)
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
    .bind(i64::from(declared))
    .bind(hostname)
    .bind(secs(at))
    .execute(&mut *tx)
    .await?;
    customer_usage_row(tx, name).await
}

/// Queues message `m`, due at `due`; returns its outbox id.
pub(crate) async fn insert_outbox(
    tx: &mut Conn,
    m: &crate::state::Outgoing,
    at: Timestamp,
    due: Timestamp,
) -> Result<i64, StateError> {
    Ok(sqlx::query_scalar(
        "INSERT INTO outbox (created_at, kind, subject, mail_from, recipients, message, next_attempt_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
    )
    .bind(secs(at))
    .bind(m.kind)
    .bind(&m.subject)
    .bind(&m.from)
    .bind(serde_json::to_string(&m.to).unwrap_or_else(|_| "[]".into()))
    .bind(&m.message)
    .bind(secs(due))
    .fetch_one(&mut *tx)
    .await?)
}

/// Moves `row`'s client to `target` inside the caller's transaction
/// (CONFIG.md "Moving a client"): refused with the reason when uploads are
/// in flight or the target lacks space, a client slot or MCAL room for the
/// next monthly debit; otherwise `move_data` moves the files (while the
/// write lock is held), then the usage follows and an event tells the
/// daemon's live sessions. Debits already made stay where they were made.
#[allow(clippy::too_many_arguments)] // one transaction's inputs; a struct would only rename them
pub(crate) async fn move_in(
    tx: &mut Conn,
    ledger: &crate::state::ledger::Ledger,
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
    // No upload reserves under the old customer meanwhile: on SQLite the
    // caller holds the ledger's reserving lock until it commits, on
    // PostgreSQL the client's row is locked.
    lock_client_row(tx, id).await?;
    // The target's space locks (after the client's row, in the order a
    // reservation takes them), so no reservation there is decided
    // beside this move on another node.
    lock_space(tx, cfg, target, id).await?;
    if in_flight(tx, ledger, id).await? > 0 {
        return Ok(Err(MoveRefused::Busy(id.into())));
    }
    // Read again under the row's lock: a commit on another node may have
    // changed its usage since the caller read it.
    let used = client_db(tx, id).await?.map_or(row.used, |r| r.used);
    let needed = used.max(0) as u64;
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
    sqlx::query("UPDATE clients SET customer = $1 WHERE id = $2")
        .bind(&tname)
        .bind(id)
        .execute(&mut *tx)
        .await?;
    customer_usage_row(tx, &tname).await?;
    add_usage(tx, id, needed as i64).await?;
    record_event(tx, at, id, kind, Some(&tname)).await?;
    Ok(Ok(()))
}

