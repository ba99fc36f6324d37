//! What tollgate remembers beyond the config file: registered clients and
//! their secrets, the file index and usage, in-flight reservations, MCAL
//! debits, sessions and refusals. SQLite through sqlx is the embedded
//! backend; every SQL statement lives in this module (and `ops`, `views`),
//! so a PostgreSQL backend can be added behind the same methods.
//!
//! Each operation that checks and writes reads a snapshot, asks `policy`
//! for the decision and applies it on the one write connection (`writer`):
//! operations run one at a time, in batches that share one durable commit
//! (group commit), so "100 first backups for 10 MCALs" admits exactly 10.
//! Reads use their own pool.

mod admission;
pub mod ledger;
mod mail;
pub mod migrate;
mod ops;
pub mod postgres;
mod refusals;
pub mod requests;
mod retention;
mod views;
pub mod writer;

pub use admission::{AdmitOutcome, Decision, READMIT_VALID_SECS, Readmit};
pub use mail::{
    ClientPeriod, DIGEST_CODES, DueDigest, Outgoing, PendingReport, Queued, RefusalCount,
};
pub use ops::{
    ClientEvent, EventRow, MoveRefused, PendingCommit, QuotaExceeded, ReconcileReport, Removed,
    SessionEnd, SessionStart,
};
pub use refusals::{INVALID_ID, MAX_STORED, truncate};
pub use retention::Pruned;
pub use views::{ClientRow, FileEntry, StatusData};

use crate::config::{Config, CustomerId, StateUrl};
use base64::Engine;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a statement waits for another writer before failing.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections in the pool. SQLite has one writer at a time; a few readers
/// beside it keep `status` and LIST from queueing behind uploads.
pub const POOL_SIZE: u32 = 8;
/// Bytes of randomness in an issued secret (PROTOCOL.md WELCOME `secret`).
pub const SECRET_BYTES: usize = 32;

/// A state-store failure. Its text is for logs and administrators; the
/// daemon answers peers with a generic `internal` instead.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The configured backend does not exist yet.
    #[error("{0}")]
    Unsupported(String),
    /// The database failed.
    #[error("state database: {0}")]
    Db(#[from] sqlx::Error),
    /// A migration failed.
    #[error("state database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A file operation around the database failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being attempted.
        context: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The database holds something the config cannot place.
    #[error("{0}")]
    Inconsistent(String),
}

/// The state store.
#[derive(Clone, Debug)]
pub struct State {
    /// Readers.
    pool: SqlitePool,
    path: PathBuf,
    /// Every write of this process; `None` when opened read-only.
    writer: Option<writer::Writer>,
    /// Refusals noted since the last flush (`refusals`).
    refusals: std::sync::Arc<std::sync::Mutex<refusals::Pending>>,
    /// Session starts noted since the last flush (`ops`).
    starts: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, ops::StartRow>>>,
    /// Reservations of uploads in flight, in memory (`ledger`).
    ledger: std::sync::Arc<ledger::Ledger>,
}

impl State {
    /// Opens the store the config names, creating and migrating it.
    pub async fn open(cfg: &Config) -> Result<State, StateError> {
        match &cfg.server.state {
            StateUrl::Sqlite(path) => State::open_sqlite(path).await,
            StateUrl::Postgres(_) => Err(StateError::Unsupported(
                "server.state: PostgreSQL is not supported yet; use an embedded SQLite file such as \"sqlite:///var/lib/tollgate/state.db\"".into(),
            )),
        }
    }

    /// Opens (creating if needed) the SQLite file at `path`.
    pub async fn open_sqlite(path: &Path) -> Result<State, StateError> {
        let opts = create_sqlite_file(path)?;
        let pool = SqlitePoolOptions::new()
            .max_connections(POOL_SIZE)
            .acquire_timeout(BUSY_TIMEOUT)
            .connect_with(opts.clone())
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        let writer = writer::Writer::start(opts, writer::Limits::default()).await?;
        Ok(State {
            pool,
            path: path.to_path_buf(),
            writer: Some(writer),
            refusals: Default::default(),
            starts: Default::default(),
            ledger: Default::default(),
        })
    }

    /// Opens the store the config names for reading only, for the commands
    /// that only look (`status`, `clients list`): nothing is created,
    /// migrated or written, so they work for a user who may only read the
    /// database. Refused with the reason when there is no database yet or
    /// when it is older than this binary (the daemon migrates it).
    pub async fn open_readonly(cfg: &Config) -> Result<State, StateError> {
        let path = match &cfg.server.state {
            StateUrl::Sqlite(p) => p.clone(),
            StateUrl::Postgres(_) => {
                return Err(StateError::Unsupported(
                    "server.state: PostgreSQL is not supported yet".into(),
                ));
            }
        };
        if !path.exists() {
            return Err(StateError::Inconsistent(format!(
                "there is no state database at {} yet: the daemon creates it when it first starts",
                path.display()
            )));
        }
        let connect = |immutable: bool| {
            let opts = SqliteConnectOptions::new()
                .filename(&path)
                .read_only(true)
                .immutable(immutable)
                .create_if_missing(false)
                .busy_timeout(BUSY_TIMEOUT);
            async move {
                let pool = SqlitePoolOptions::new()
                    .max_connections(2)
                    .acquire_timeout(BUSY_TIMEOUT)
                    .connect_with(opts)
                    .await?;
                let applied: Option<i64> =
                    sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success")
                        .fetch_one(&pool)
                        .await?;
                Ok::<_, sqlx::Error>((pool, applied))
            }
        };
        // A reader of a WAL database needs its -shm file; when the daemon is
        // stopped that file is gone, and a user who may only read cannot
        // make it. Nothing changes the file then, so it is read as
        // immutable (without locks) instead.
        let (pool, applied) = match connect(false).await {
            Ok(x) => x,
            Err(_) => connect(true).await?,
        };
        let newest = sqlx::migrate!("./migrations")
            .iter()
            .map(|m| m.version)
            .max()
            .unwrap_or(0);
        if applied.unwrap_or(0) < newest {
            pool.close().await;
            return Err(StateError::Inconsistent(format!(
                "the state database at {} is older than this tollgate (schema {} of {newest}): start the daemon once to bring it up to date",
                path.display(),
                applied.unwrap_or(0)
            )));
        }
        Ok(State {
            pool,
            path,
            writer: None,
            refusals: Default::default(),
            starts: Default::default(),
            ledger: Default::default(),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Proves the database answers (the health check).
    pub async fn ping(&self) -> Result<(), StateError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Commits what is queued, then closes the writer and the readers.
    pub async fn close(&self) {
        if let Some(w) = &self.writer {
            w.close().await;
        }
        self.pool.close().await;
    }

    /// This process's reservations.
    pub fn ledger(&self) -> &ledger::Ledger {
        &self.ledger
    }

    /// The group-commit writer's counters (`None` when read-only).
    pub fn writer_stats(&self) -> Option<&writer::Stats> {
        self.writer.as_ref().map(|w| w.stats())
    }
}

/// Creates the SQLite file at `path` (0600, in a 0700 directory made if
/// missing) unless it exists; the options every writer opens it with.
pub(crate) fn create_sqlite_file(path: &Path) -> Result<SqliteConnectOptions, StateError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| StateError::Io {
                context: format!("creating {}", dir.display()),
                source: e,
            })?;
    }
    // Created 0600 here rather than by SQLite (which follows the
    // umask); its -wal and -shm files copy the database's mode.
    {
        use std::os::unix::fs::OpenOptionsExt;
        let made = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path);
        match made {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(StateError::Io {
                    context: format!("creating {}", path.display()),
                    source: e,
                });
            }
        }
    }
    // WAL lets readers run beside the writer; synchronous=FULL makes every
    // commit durable before it returns, which STORED relies on.
    Ok(SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(BUSY_TIMEOUT)
        .foreign_keys(true))
}

/// A fresh secret: 32 random bytes, base64url without padding.
pub fn new_secret() -> Result<String, StateError> {
    let mut bytes = [0u8; SECRET_BYTES];
    getrandom::fill(&mut bytes).map_err(|e| StateError::Io {
        context: "drawing random bytes for a secret".into(),
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// The name stored for a customer: its config name.
fn customer_key(cfg: &Config, c: CustomerId) -> &str {
    &cfg.customer(c).name
}

/// Unix seconds of an instant.
fn secs(t: jiff::Timestamp) -> i64 {
    t.as_second()
}
