//! `tollgate state migrate --to URL` (CLI.md; issue 14): copies every row
//! of one state database into an empty one of the other kind, SQLite to
//! PostgreSQL or back, and verifies the copy.
//!
//! The source is read in one snapshot (SQLite's read transaction,
//! PostgreSQL's REPEATABLE READ), and the target is written in one
//! transaction, so a failed copy leaves the target's tables empty. Then
//! the target is read back: per table, the row count, the sum of every
//! integer column and a digest of the rows' content must equal the
//! source's. Identity counters (SQLite's `sqlite_sequence`, PostgreSQL's
//! sequences) are carried too, so ids a daemon handed out are never
//! handed out again.
//!
//! Both schemas hold the same tables and columns ([`TABLES`];
//! migrations/postgres/0001_state.sql says how they are kept in step).

use super::{BUSY_TIMEOUT, StateError};
use futures_util::TryStreamExt;
use sha2::{Digest, Sha256};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqlitePool, SqlitePoolOptions};
// Every dynamic statement here is built from the names in TABLES, never
// from input.
use sqlx::{AssertSqlSafe, ColumnIndex, Decode, Row, Type};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// How a column is read and written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Int,
    Text,
    Blob,
}
use Kind::{Blob, Int, Text};

/// One table of the state.
#[derive(Debug)]
struct Table {
    name: &'static str,
    /// The column an identity counter feeds, if any.
    counter: Option<&'static str>,
    columns: &'static [(&'static str, Kind)],
}

/// Every table of the state, in both schemas (SQLite version 9, PostgreSQL
/// version 1). A test checks that this list names every table and column
/// of both.
const TABLES: &[Table] = &[
    Table {
        name: "clients",
        counter: None,
        columns: &[
            ("id", Text),
            ("customer", Text),
            ("kind", Text),
            ("secret_sha256", Blob),
            ("declared", Int),
            ("hostname", Text),
            ("registered_at", Int),
            ("last_seen", Int),
            ("used", Int),
            ("removed_at", Int),
            ("readmit_sha256", Blob),
            ("readmit_expires", Int),
        ],
    },
    Table {
        name: "customer_usage",
        counter: None,
        columns: &[("customer", Text), ("used", Int)],
    },
    Table {
        name: "files",
        counter: None,
        columns: &[
            ("client", Text),
            ("path", Text),
            ("size", Int),
            ("sha256", Text),
            ("modified", Int),
            ("mode", Int),
            ("mtime", Text),
        ],
    },
    Table {
        name: "reservations",
        counter: Some("id"),
        columns: &[
            ("id", Int),
            ("client", Text),
            ("customer", Text),
            ("size", Int),
            ("created_at", Int),
        ],
    },
    Table {
        name: "pending_commits",
        counter: Some("id"),
        columns: &[
            ("id", Int),
            ("client", Text),
            ("path", Text),
            ("temp_path", Text),
            ("final_path", Text),
            ("size", Int),
            ("sha256", Text),
            ("modified", Int),
            ("reservation", Int),
            ("created_at", Int),
            ("mode", Int),
            ("mtime", Text),
        ],
    },
    Table {
        name: "mcal_debits",
        counter: None,
        columns: &[
            ("client", Text),
            ("month", Text),
            ("cost", Int),
            ("customer", Text),
            ("reseller", Text),
            ("debited_at", Int),
        ],
    },
    // Kept by triggers on mcal_debits: the copied debits rebuild it in the
    // target, and then it is replaced by the source's rows, which may hold
    // totals the debits no longer explain (a refund leaves a 0 row).
    Table {
        name: "mcal_totals",
        counter: None,
        columns: &[("scope", Text), ("name", Text), ("total", Int)],
    },
    Table {
        name: "sessions",
        counter: None,
        columns: &[
            ("id", Text),
            ("client", Text),
            ("customer", Text),
            ("schedule", Text),
            ("intent", Text),
            ("peer", Text),
            ("started_at", Int),
            ("ended_at", Int),
            ("bytes_in", Int),
            ("bytes_out", Int),
            ("files_ok", Int),
            ("files_failed", Int),
            ("result", Text),
            ("stored_after", Int),
        ],
    },
    Table {
        name: "refusals",
        counter: None,
        columns: &[
            ("at", Int),
            ("source", Text),
            ("code", Text),
            ("customer", Text),
            ("client", Text),
            ("count", Int),
        ],
    },
    Table {
        name: "client_events",
        counter: Some("seq"),
        columns: &[
            ("seq", Int),
            ("at", Int),
            ("client", Text),
            ("kind", Text),
            ("customer", Text),
        ],
    },
    Table {
        name: "outbox",
        counter: Some("id"),
        columns: &[
            ("id", Int),
            ("created_at", Int),
            ("kind", Text),
            ("subject", Text),
            ("mail_from", Text),
            ("recipients", Text),
            ("message", Blob),
            ("attempts", Int),
            ("next_attempt_at", Int),
            ("last_error", Text),
            ("sent_at", Int),
        ],
    },
    Table {
        name: "reports_sent",
        counter: None,
        columns: &[
            ("customer", Text),
            ("frequency", Text),
            ("period", Text),
            ("outbox_id", Int),
            ("queued_at", Int),
        ],
    },
    Table {
        name: "alerts_sent",
        counter: None,
        columns: &[
            ("subject", Text),
            ("day", Text),
            ("outbox_id", Int),
            ("queued_at", Int),
        ],
    },
    Table {
        name: "session_reports",
        counter: Some("id"),
        columns: &[
            ("id", Int),
            ("recipient", Text),
            ("client", Text),
            ("facts", Text),
            ("ended_at", Int),
        ],
    },
    Table {
        name: "session_digests",
        counter: None,
        columns: &[("recipient", Text), ("client", Text), ("sent_at", Int)],
    },
    Table {
        name: "customers_seen",
        counter: None,
        columns: &[("name", Text), ("first_seen", Int)],
    },
    Table {
        name: "account_details_sent",
        counter: None,
        columns: &[("customer", Text), ("outbox_id", Int), ("queued_at", Int)],
    },
    Table {
        name: "console_audit",
        counter: Some("id"),
        columns: &[
            ("id", Int),
            ("at", Int),
            ("login", Text),
            ("username", Text),
            ("action", Text),
            ("customer", Text),
            ("file", Text),
            ("detail", Text),
        ],
    },
    Table {
        name: "usage_daily",
        counter: None,
        columns: &[
            ("day", Text),
            ("customer", Text),
            ("used", Int),
            ("at", Int),
        ],
    },
    Table {
        name: "admin_requests",
        counter: Some("id"),
        columns: &[
            ("id", Int),
            ("kind", Text),
            ("client", Text),
            ("customer", Text),
            ("purge", Int),
            ("requested_at", Int),
            ("claimed_at", Int),
            ("done_at", Int),
            ("outcome", Text),
        ],
    },
];

/// One value of a row.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Value {
    Null,
    Int(i64),
    Text(String),
    Blob(Vec<u8>),
}

/// A database to copy from or to.
#[derive(Debug, Clone)]
pub enum Db {
    /// A SQLite file.
    Sqlite(SqlitePool, PathBuf),
    /// A PostgreSQL database.
    Postgres(PgPool),
}

/// What one table's copy was checked against.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TableCheck {
    /// The table.
    pub table: &'static str,
    /// Rows.
    pub rows: u64,
    /// The sum of each integer column.
    pub sums: Vec<(&'static str, i128)>,
    /// An order-free digest of the rows' content (hex).
    pub digest: String,
    /// The identity counter's high-water mark, where the table has one.
    pub counter: Option<i64>,
}

/// The outcome of a migration: every table's figures, equal on both sides.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Migrated {
    /// Per table, in [`TABLES`] order.
    pub tables: Vec<TableCheck>,
}

/// Why a migration did not happen or did not verify.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The target is not a URL this command can write to.
    #[error("{0}")]
    Target(String),
    /// The target already holds state.
    #[error(
        "the target database is not empty: table {table} has rows; migrate into an empty database"
    )]
    NotEmpty {
        /// The first table found with rows.
        table: &'static str,
    },
    /// The source is older than this binary.
    #[error(
        "the source state is at schema {have} of {want}: start the daemon on it once to bring it up to date, then migrate"
    )]
    SourceSchema {
        /// Its newest applied migration.
        have: i64,
        /// This binary's newest.
        want: i64,
    },
    /// The copy read back differs.
    #[error(
        "the copy does not verify: table {table}: source {source_figures}, target {target_figures}"
    )]
    Mismatch {
        /// The table.
        table: &'static str,
        /// What the source held.
        source_figures: String,
        /// What the target holds.
        target_figures: String,
    },
    /// A database failed.
    #[error(transparent)]
    State(#[from] StateError),
}

impl From<sqlx::Error> for MigrateError {
    fn from(e: sqlx::Error) -> MigrateError {
        MigrateError::State(StateError::Db(e))
    }
}

impl From<sqlx::migrate::MigrateError> for MigrateError {
    fn from(e: sqlx::migrate::MigrateError) -> MigrateError {
        MigrateError::State(StateError::Migrate(e))
    }
}

/// The newest SQLite schema version this binary has.
fn sqlite_newest() -> i64 {
    sqlx::migrate!("./migrations")
        .iter()
        .map(|m| m.version)
        .max()
        .unwrap_or(0)
}

/// The newest PostgreSQL schema version this binary has.
fn postgres_newest() -> i64 {
    sqlx::migrate!("./migrations/postgres")
        .iter()
        .map(|m| m.version)
        .max()
        .unwrap_or(0)
}

/// Connects to a PostgreSQL URL (a few connections: this is a tool).
pub async fn connect_postgres(url: &str) -> Result<PgPool, sqlx::Error> {
    let opts = PgConnectOptions::from_str(url)?;
    // One connection first: a pool retries a refused connection until its
    // acquire timeout, and a mistyped URL should fail at once.
    sqlx::Connection::close(<sqlx::PgConnection as sqlx::Connection>::connect_with(&opts).await?)
        .await?;
    PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(BUSY_TIMEOUT)
        .connect_with(opts)
        .await
}

/// Creates (or opens) a SQLite state file at `path`, 0600, migrated.
async fn create_sqlite(path: &Path) -> Result<SqlitePool, StateError> {
    let opts = super::create_sqlite_file(path)?;
    let pool = SqlitePoolOptions::new()
        .max_connections(2)
        .acquire_timeout(BUSY_TIMEOUT)
        .connect_with(opts)
        .await?;
    sqlx::migrate!("./migrations").run(&pool).await?;
    Ok(pool)
}

impl Db {
    /// Opens the target named by `url`, creating and migrating its schema.
    /// `sqlite:///path` or `postgres://…`.
    /// Refused before anything is made when it is `source`'s kind.
    pub async fn open_target(url: &str, source: &Db) -> Result<Db, MigrateError> {
        let to_pg = url.starts_with("postgres://") || url.starts_with("postgresql://");
        let to_sqlite = url.starts_with("sqlite:");
        if (to_pg && matches!(source, Db::Postgres(_)))
            || (to_sqlite && matches!(source, Db::Sqlite(..)))
        {
            return Err(same_kind());
        }
        if let Some(p) = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
        {
            let p = p.split('?').next().unwrap_or_default();
            if p.is_empty() || p == ":memory:" {
                return Err(MigrateError::Target(
                    "--to: the SQLite target must be a file, e.g. sqlite:///var/lib/tollgate/state.db".into(),
                ));
            }
            let path = PathBuf::from(p);
            // Absolute, and not through a symbolic link: run as root, the
            // command must not be led to write the state elsewhere.
            if !path.is_absolute() {
                return Err(MigrateError::Target(format!(
                    "--to: give the SQLite target as an absolute path (sqlite:///…), not {}",
                    path.display()
                )));
            }
            match std::fs::symlink_metadata(&path) {
                Ok(m) if !m.file_type().is_file() => {
                    return Err(MigrateError::Target(format!(
                        "--to: {} exists and is not a regular file",
                        path.display()
                    )));
                }
                _ => {}
            }
            Ok(Db::Sqlite(create_sqlite(&path).await?, path))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let pool = connect_postgres(url).await?;
            sqlx::migrate!("./migrations/postgres").run(&pool).await?;
            Ok(Db::Postgres(pool))
        } else {
            Err(MigrateError::Target(
                "--to: use sqlite:///path/to/state.db or postgres://user@host/db".into(),
            ))
        }
    }

    /// Same kind of database as `other`.
    fn same_kind(&self, other: &Db) -> bool {
        matches!(
            (self, other),
            (Db::Sqlite(..), Db::Sqlite(..)) | (Db::Postgres(_), Db::Postgres(_))
        )
    }

    /// Fails unless the schema is this binary's newest.
    pub async fn check_schema(&self) -> Result<(), MigrateError> {
        let (have, want): (Option<i64>, i64) = match self {
            Db::Sqlite(p, _) => (
                sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success")
                    .fetch_one(p)
                    .await?,
                sqlite_newest(),
            ),
            Db::Postgres(p) => (
                sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success")
                    .fetch_one(p)
                    .await?,
                postgres_newest(),
            ),
        };
        let have = have.unwrap_or(0);
        // A newer schema may hold tables and columns this binary would
        // not copy.
        if have != want {
            return Err(MigrateError::SourceSchema { have, want });
        }
        Ok(())
    }

    /// Closes the connections.
    pub async fn close(&self) {
        match self {
            Db::Sqlite(p, _) => p.close().await,
            Db::Postgres(p) => p.close().await,
        }
    }
}

/// The configured state, opened to be copied: a SQLite file read-only,
/// with the daemon's lock held so no daemon starts on it meanwhile
/// (reservations of uploads in flight live only in a daemon's memory).
pub struct Source {
    /// The database.
    pub db: Db,
    _lock: Option<super::requests::DaemonLock>,
}

impl Source {
    /// Opens `cfg`'s state for copying.
    pub async fn open(cfg: &crate::config::Config) -> Result<Source, MigrateError> {
        match &cfg.server.state {
            crate::config::StateUrl::Sqlite(path) => {
                if !path.exists() {
                    return Err(MigrateError::Target(format!(
                        "there is no state database at {} yet",
                        path.display()
                    )));
                }
                let mut lock_path = path.clone().into_os_string();
                lock_path.push(".lock");
                let Some(lock) = super::requests::lock_daemon_at(lock_path.into())? else {
                    return Err(MigrateError::Target(format!(
                        "a tollgate daemon is serving {} (it holds {}.lock): stop it first, so that nothing changes during the copy",
                        path.display(),
                        path.display()
                    )));
                };
                // Read-write, not read-only: committed transactions still
                // in the -wal file must be read (an immutable reader skips
                // them), and the copy holds the write lock throughout.
                let opts = sqlx::sqlite::SqliteConnectOptions::new()
                    .filename(path)
                    .create_if_missing(false)
                    .busy_timeout(BUSY_TIMEOUT);
                let pool = SqlitePoolOptions::new()
                    .max_connections(2)
                    .acquire_timeout(BUSY_TIMEOUT)
                    .connect_with(opts)
                    .await?;
                Ok(Source {
                    db: Db::Sqlite(pool, path.clone()),
                    _lock: Some(lock),
                })
            }
            crate::config::StateUrl::Postgres(url) => Ok(Source {
                db: Db::Postgres(connect_postgres(url).await?),
                _lock: None,
            }),
        }
    }
}

fn same_kind() -> MigrateError {
    MigrateError::Target(
        "--to: the target must be the other kind of database (SQLite to PostgreSQL, or back)"
            .into(),
    )
}

/// The columns of `t` as a select list.
fn select_sql(t: &Table) -> String {
    let cols: Vec<&str> = t.columns.iter().map(|(c, _)| *c).collect();
    format!("SELECT {} FROM {}", cols.join(", "), t.name)
}

/// Decodes one row by the table's column kinds.
fn decode<'r, R>(row: &'r R, t: &Table) -> Result<Vec<Value>, sqlx::Error>
where
    R: Row,
    usize: ColumnIndex<R>,
    Option<i64>: Decode<'r, R::Database> + Type<R::Database>,
    Option<String>: Decode<'r, R::Database> + Type<R::Database>,
    Option<Vec<u8>>: Decode<'r, R::Database> + Type<R::Database>,
{
    t.columns
        .iter()
        .enumerate()
        .map(|(i, (_, k))| {
            Ok(match k {
                Int => row.try_get::<Option<i64>, _>(i)?.map(Value::Int),
                Text => row.try_get::<Option<String>, _>(i)?.map(Value::Text),
                Blob => row.try_get::<Option<Vec<u8>>, _>(i)?.map(Value::Blob),
            }
            .unwrap_or(Value::Null))
        })
        .collect()
}

/// Running figures of one table: count, integer sums, content digest.
#[derive(Debug)]
struct Figures {
    rows: u64,
    sums: Vec<i128>,
    /// The wrapping sum of each row's digest: equal for equal multisets of
    /// rows, whatever order they are read in.
    digest: u128,
    /// The largest value of the counter column.
    max_counter: i64,
}

impl Figures {
    fn new(t: &Table) -> Figures {
        Figures {
            rows: 0,
            sums: vec![0; t.columns.len()],
            digest: 0,
            max_counter: 0,
        }
    }

    fn add(&mut self, t: &Table, row: &[Value]) {
        self.rows += 1;
        let mut h = Sha256::new();
        for (i, v) in row.iter().enumerate() {
            // Tagged and length-prefixed, so no two rows encode alike.
            match v {
                Value::Null => h.update([0u8]),
                Value::Int(n) => {
                    h.update([1u8]);
                    h.update(n.to_le_bytes());
                    self.sums[i] += i128::from(*n);
                    if t.counter == Some(t.columns[i].0) {
                        self.max_counter = self.max_counter.max(*n);
                    }
                }
                Value::Text(s) => {
                    h.update([2u8]);
                    h.update((s.len() as u64).to_le_bytes());
                    h.update(s.as_bytes());
                }
                Value::Blob(b) => {
                    h.update([3u8]);
                    h.update((b.len() as u64).to_le_bytes());
                    h.update(b);
                }
            }
        }
        let d = h.finalize();
        let mut first = [0u8; 16];
        first.copy_from_slice(&d[..16]);
        self.digest = self.digest.wrapping_add(u128::from_le_bytes(first));
    }

    fn check(&self, t: &'static Table, counter: Option<i64>) -> TableCheck {
        TableCheck {
            table: t.name,
            rows: self.rows,
            sums: t
                .columns
                .iter()
                .zip(&self.sums)
                .filter(|((_, k), _)| *k == Int)
                .map(|((c, _), s)| (*c, *s))
                .collect(),
            digest: format!("{:032x}", self.digest),
            counter,
        }
    }
}

/// Rows inserted per statement: within both databases' parameter limits.
const BATCH_PARAMS: usize = 8000;

/// Inserts `rows` into `t` on the target's open transaction.
macro_rules! insert_batch {
    ($conn:expr, $t:expr, $rows:expr, $placeholder:expr) => {{
        let t: &Table = $t;
        let rows: &[Vec<Value>] = $rows;
        if !rows.is_empty() {
            let cols: Vec<&str> = t.columns.iter().map(|(c, _)| *c).collect();
            let mut n = 0usize;
            let groups: Vec<String> = rows
                .iter()
                .map(|_| {
                    let ps: Vec<String> = (0..cols.len())
                        .map(|_| {
                            n += 1;
                            ($placeholder)(n)
                        })
                        .collect();
                    format!("({})", ps.join(", "))
                })
                .collect();
            let sql = format!(
                "INSERT INTO {} ({}) VALUES {}",
                t.name,
                cols.join(", "),
                groups.join(", ")
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for row in rows {
                for (v, (_, k)) in row.iter().zip(t.columns) {
                    q = match (v, k) {
                        (Value::Int(x), _) => q.bind(*x),
                        (Value::Text(s), _) => q.bind(s.as_str()),
                        (Value::Blob(b), _) => q.bind(b.as_slice()),
                        (Value::Null, Int) => q.bind(None::<i64>),
                        (Value::Null, Text) => q.bind(None::<String>),
                        (Value::Null, Blob) => q.bind(None::<Vec<u8>>),
                    };
                }
            }
            q.execute(&mut *$conn).await?;
        }
    }};
}

/// Streams every row of `t` from the source transaction through `each`.
macro_rules! each_row {
    ($conn:expr, $t:expr, |$row:ident| $body:block) => {{
        let sql = select_sql($t);
        let mut rows = sqlx::query(AssertSqlSafe(sql)).fetch(&mut *$conn);
        while let Some(r) = rows.try_next().await? {
            let $row: Vec<Value> = decode(&r, $t)?;
            $body
        }
    }};
}

/// The identity counter's high-water mark on `db`'s connection.
macro_rules! counter_of {
    (sqlite, $conn:expr, $t:expr, $max:expr) => {{
        let seq: Option<i64> = sqlx::query_scalar("SELECT seq FROM sqlite_sequence WHERE name = ?")
            .bind($t.name)
            .fetch_optional(&mut *$conn)
            .await?;
        seq.unwrap_or(0).max($max)
    }};
    (postgres, $conn:expr, $t:expr, $max:expr) => {{
        let seq: Option<i64> = sqlx::query_scalar(
            "SELECT pg_sequence_last_value(pg_get_serial_sequence($1, $2)::regclass)",
        )
        .bind($t.name)
        .bind($t.counter.unwrap_or_default())
        .fetch_one(&mut *$conn)
        .await?;
        seq.unwrap_or(0).max($max)
    }};
}

/// Every table's figures on an open transaction, as it sees them now.
macro_rules! figures_on {
    ($kind:tt, $conn:expr) => {{
        let mut out = Vec::new();
        for t in TABLES {
            let mut f = Figures::new(t);
            each_row!($conn, t, |row| {
                f.add(t, &row);
            });
            let counter = match t.counter {
                Some(_) => Some(counter_of!($kind, $conn, t, f.max_counter)),
                None => None,
            };
            out.push(f.check(t, counter));
        }
        out
    }};
}

/// Copies every table from `$src` to `$dst` (open transactions), setting
/// the target's counters; the source's figures, in TABLES order.
macro_rules! copy_tables {
    ($skind:tt, $src:expr, $dkind:tt, $dst:expr, $ph:expr, $progress:expr) => {{
        let mut out = Vec::new();
        for t in TABLES {
            let mut f = Figures::new(t);
            let mut batch: Vec<Vec<Value>> = Vec::new();
            let per = (BATCH_PARAMS / t.columns.len()).max(1);
            if t.name == "mcal_totals" {
                sqlx::query("DELETE FROM mcal_totals")
                    .execute(&mut *$dst)
                    .await?;
            }
            each_row!($src, t, |row| {
                f.add(t, &row);
                batch.push(row);
                if batch.len() >= per {
                    insert_batch!($dst, t, &batch, $ph);
                    batch.clear();
                }
            });
            insert_batch!($dst, t, &batch, $ph);
            let counter = match t.counter {
                Some(_) => {
                    let hw = counter_of!($skind, $src, t, f.max_counter);
                    set_counter!($dkind, $dst, t, hw);
                    Some(hw)
                }
                None => None,
            };
            let c = f.check(t, counter);
            $progress(&c);
            out.push(c);
        }
        out
    }};
}

/// Sets the target's counter of `t` to exactly `hw` (a failed earlier
/// attempt may have moved it: sequences are not transactional).
macro_rules! set_counter {
    (postgres, $conn:expr, $t:expr, $hw:expr) => {{
        let (value, called) = if $hw > 0 { ($hw, true) } else { (1, false) };
        sqlx::query("SELECT setval(pg_get_serial_sequence($1, $2)::regclass, $3, $4)")
            .bind($t.name)
            .bind($t.counter.unwrap_or_default())
            .bind(value)
            .bind(called)
            .execute(&mut *$conn)
            .await?;
    }};
    (sqlite, $conn:expr, $t:expr, $hw:expr) => {{
        // admin_requests has no AUTOINCREMENT (no row in sqlite_sequence):
        // its next id is max + 1.
        if sqlite_autoincrement($t.name) {
            sqlx::query("DELETE FROM sqlite_sequence WHERE name = ?")
                .bind($t.name)
                .execute(&mut *$conn)
                .await?;
            if $hw > 0 {
                sqlx::query("INSERT INTO sqlite_sequence (name, seq) VALUES (?1, ?2)")
                    .bind($t.name)
                    .bind($hw)
                    .execute(&mut *$conn)
                    .await?;
            }
        }
    }};
}

/// Fails with the first table of the open target transaction that holds a row.
macro_rules! must_be_empty {
    ($conn:expr) => {{
        for t in TABLES {
            let q = format!("SELECT EXISTS (SELECT 1 FROM {})", t.name);
            let any: bool = sqlx::query_scalar(AssertSqlSafe(q))
                .fetch_one(&mut *$conn)
                .await?;
            if any {
                return Err(MigrateError::NotEmpty { table: t.name });
            }
        }
    }};
}

/// Copies `source` into the empty `target` and verifies the copy.
/// `progress` hears each table as it is copied.
///
/// Both sides stay in one transaction throughout: the source's is a
/// snapshot that also keeps SQLite's other writers (`report send`,
/// `clients readmit`) waiting; the target's holds its write lock from the
/// emptiness check to the commit. The target is read back inside its own
/// transaction, and committed only when every figure matches, so a copy
/// that does not verify leaves nothing behind.
pub async fn migrate(
    source: &Db,
    target: &Db,
    mut progress: impl FnMut(&TableCheck),
) -> Result<Migrated, MigrateError> {
    if source.same_kind(target) {
        return Err(same_kind());
    }
    source.check_schema().await?;
    let (copied, read_back) = match (source, target) {
        (Db::Sqlite(s, _), Db::Postgres(d)) => {
            let mut src = s.begin_with("BEGIN IMMEDIATE").await?;
            let mut dst = d.begin().await?;
            let names: Vec<&str> = TABLES.iter().map(|t| t.name).collect();
            sqlx::query(AssertSqlSafe(format!(
                "LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
                names.join(", ")
            )))
            .execute(&mut *dst)
            .await?;
            must_be_empty!(dst);
            let copied = copy_tables!(sqlite, src, postgres, dst, |n| format!("${n}"), progress);
            let read_back = figures_on!(postgres, dst);
            if let Some(e) = mismatch(&copied, &read_back) {
                return Err(e);
            }
            dst.commit().await?;
            src.rollback().await?;
            (copied, read_back)
        }
        (Db::Postgres(s), Db::Sqlite(d, _)) => {
            let mut src = s.begin().await?;
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                .execute(&mut *src)
                .await?;
            let mut dst = d.begin_with("BEGIN IMMEDIATE").await?;
            must_be_empty!(dst);
            let copied = copy_tables!(postgres, src, sqlite, dst, |n| format!("?{n}"), progress);
            let read_back = figures_on!(sqlite, dst);
            if let Some(e) = mismatch(&copied, &read_back) {
                return Err(e);
            }
            dst.commit().await?;
            src.rollback().await?;
            (copied, read_back)
        }
        _ => return Err(same_kind()),
    };
    let _ = read_back;
    Ok(Migrated { tables: copied })
}

/// The first table whose figures differ between the source and the copy.
fn mismatch(copied: &[TableCheck], read_back: &[TableCheck]) -> Option<MigrateError> {
    for (a, b) in copied.iter().zip(read_back) {
        // admin_requests' counter is max(id) on SQLite, however far the
        // PostgreSQL sequence went: compared where both keep one.
        let strip = |c: &TableCheck| TableCheck {
            counter: if sqlite_autoincrement(c.table) {
                c.counter
            } else {
                None
            },
            ..c.clone()
        };
        if strip(a) != strip(b) {
            return Some(MigrateError::Mismatch {
                table: a.table,
                source_figures: describe(a),
                target_figures: describe(b),
            });
        }
    }
    None
}

/// Whether SQLite keeps `table`'s counter in `sqlite_sequence`.
fn sqlite_autoincrement(table: &str) -> bool {
    table != "admin_requests"
        && TABLES
            .iter()
            .any(|t| t.name == table && t.counter.is_some())
}

/// One line of a table's figures, for an error.
fn describe(c: &TableCheck) -> String {
    let sums: Vec<String> = c.sums.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!(
        "{} rows, sums [{}], digest {}, counter {:?}",
        c.rows,
        sums.join(" "),
        c.digest,
        c.counter
    )
}

/// Every table's figures as `db` holds them now (one snapshot).
pub async fn figures(db: &Db) -> Result<Vec<TableCheck>, MigrateError> {
    Ok(match db {
        Db::Sqlite(p, _) => {
            let mut c = p.begin().await?;
            let out = figures_on!(sqlite, c);
            c.rollback().await?;
            out
        }
        Db::Postgres(p) => {
            let mut c = p.begin().await?;
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                .execute(&mut *c)
                .await?;
            let out = figures_on!(postgres, c);
            c.rollback().await?;
            out
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// TABLES names every table and column of the SQLite schema, in the
    /// order the schema has them (the PostgreSQL side is checked by
    /// tests/state_migrate.rs against a real server).
    #[tokio::test]
    async fn tables_cover_the_sqlite_schema() {
        let dir = tempfile::tempdir().unwrap();
        let pool = create_sqlite(&dir.path().join("s.db")).await.unwrap();
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM sqlite_master WHERE type = 'table'
               AND name NOT IN ('sqlite_sequence', '_sqlx_migrations') ORDER BY name",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        let mut ours: Vec<&str> = TABLES.iter().map(|t| t.name).collect();
        ours.sort();
        assert_eq!(names, ours);
        for t in TABLES {
            let cols: Vec<(String, String)> =
                sqlx::query_as("SELECT name, type FROM pragma_table_info(?) ORDER BY cid")
                    .bind(t.name)
                    .fetch_all(&pool)
                    .await
                    .unwrap();
            let want: Vec<(String, String)> = t
                .columns
                .iter()
                .map(|(c, k)| {
                    let ty = match k {
                        Int => "INTEGER",
                        Text => "TEXT",
                        Blob => "BLOB",
                    };
                    (c.to_string(), ty.to_string())
                })
                .collect();
            assert_eq!(cols, want, "table {}", t.name);
        }
    }

    #[test]
    fn the_digest_ignores_order_and_sees_every_value() {
        let t = &TABLES[1];
        let a = vec![Value::Text("x".into()), Value::Int(1)];
        let b = vec![Value::Text("y".into()), Value::Int(2)];
        let mut f1 = Figures::new(t);
        f1.add(t, &a);
        f1.add(t, &b);
        let mut f2 = Figures::new(t);
        f2.add(t, &b);
        f2.add(t, &a);
        assert_eq!(f1.check(t, None), f2.check(t, None));
        // The same sums, other content.
        let mut f3 = Figures::new(t);
        f3.add(t, &[Value::Text("x".into()), Value::Int(2)]);
        f3.add(t, &[Value::Text("y".into()), Value::Int(1)]);
        assert_eq!(f1.check(t, None).sums, f3.check(t, None).sums);
        assert_ne!(f1.check(t, None).digest, f3.check(t, None).digest);
        // NULL is not the empty string.
        let mut f4 = Figures::new(t);
        f4.add(t, &[Value::Null, Value::Int(1)]);
        let mut f5 = Figures::new(t);
        f5.add(t, &[Value::Text(String::new()), Value::Int(1)]);
        assert_ne!(f4.check(t, None).digest, f5.check(t, None).digest);
    }
}
