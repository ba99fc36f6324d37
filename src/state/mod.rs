//! What tollgate remembers beyond the config file: registered clients and
//! their secrets, the file index and usage, in-flight reservations, MCAL
//! debits, sessions and refusals, behind one interface ([`State`]) over
//! two backends: SQLite through sqlx, embedded, for one node; PostgreSQL
//! for several nodes on one database (`postgres`, docs/scale-out.md).
//! Every SQL statement lives in this module.
//!
//! Each operation that checks and writes reads a snapshot, asks `policy`
//! for the decision and applies it. On SQLite it runs on the one write
//! connection (`writer`): operations run one at a time, in batches that
//! share one durable commit (group commit), so "100 first backups for 10
//! MCALs" admits exactly 10. On PostgreSQL it runs in its own transaction
//! under advisory locks taken in one order, exact across nodes. Reads use
//! their own pool.

mod admission;
pub mod console;
mod grouped;
pub mod ledger;
mod mail;
pub mod migrate;
mod ops;
pub mod postgres;
mod refusals;
pub mod requests;
mod retention;
pub mod status;
mod views;
pub mod writer;

/// The shared statements over SQLite (`sql.rs`).
pub(crate) mod lite {
    /// A SQLite connection.
    pub(crate) type Conn = sqlx::SqliteConnection;
    /// Reservations live in the process's ledger.
    const CLUSTER: bool = false;
    /// A row's address, for tables without a key of their own.
    pub(crate) const ROWID: &str = "rowid";
    include!("sql.rs");

    /// The rows (`value`) of a JSON array of strings bound as `$n`.
    pub(crate) fn json_texts(n: u8) -> String {
        format!("json_each(${n})")
    }

    /// Usage at every level above `client` of `customer`: committed,
    /// beside this process's ledger.
    pub(crate) async fn level_usage(
        tx: &mut Conn,
        ledger: &super::ledger::Ledger,
        cfg: &Config,
        client: &str,
        customer: CustomerId,
    ) -> Result<crate::policy::space::LevelUsage, StateError> {
        super::ops::level_usage(tx, ledger, cfg, client, customer).await
    }

    /// Uploads of `client` in flight.
    pub(crate) async fn in_flight(
        _tx: &mut Conn,
        ledger: &super::ledger::Ledger,
        client: &str,
    ) -> Result<usize, StateError> {
        Ok(ledger.in_flight(client))
    }

    /// Nothing to lock: the writer runs one operation at a time, and the
    /// caller holds the ledger's reserving lock.
    pub(crate) async fn lock_client_row(_tx: &mut Conn, _id: &str) -> Result<(), StateError> {
        Ok(())
    }

    /// Nothing to lock (as [`lock_client_row`]).
    pub(crate) async fn lock_space(
        _tx: &mut Conn,
        _cfg: &Config,
        _customer: CustomerId,
        _client: &str,
    ) -> Result<(), StateError> {
        Ok(())
    }

    /// Nothing to lock (as [`lock_client_row`]).
    pub(crate) async fn lock_keys(_tx: &mut Conn, _keys: &[i64]) -> Result<(), StateError> {
        Ok(())
    }
}

/// The shared statements over PostgreSQL (`sql.rs`).
pub(crate) mod pg {
    /// A PostgreSQL connection.
    pub(crate) type Conn = sqlx::PgConnection;
    /// Reservations are rows of the cluster.
    const CLUSTER: bool = true;
    /// A row's address, for tables without a key of their own.
    pub(crate) const ROWID: &str = "ctid";
    include!("sql.rs");

    /// The rows (`value`) of a JSON array of strings bound as `$n`.
    pub(crate) fn json_texts(n: u8) -> String {
        format!("json_array_elements_text(CAST(${n} AS json))")
    }

    /// Usage at every level above `client` of `customer`: committed,
    /// beside every live node's holds.
    pub(crate) async fn level_usage(
        tx: &mut Conn,
        _ledger: &super::ledger::Ledger,
        cfg: &Config,
        client: &str,
        customer: CustomerId,
    ) -> Result<crate::policy::space::LevelUsage, StateError> {
        Ok(super::postgres::admission::level_usage(tx, cfg, client, customer).await?)
    }

    /// Uploads of `client` in flight on any live node.
    pub(crate) async fn in_flight(
        tx: &mut Conn,
        _ledger: &super::ledger::Ledger,
        client: &str,
    ) -> Result<usize, StateError> {
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT COUNT(*) FROM held h JOIN nodes n ON n.name = h.node AND n.expires_ms > {}
             WHERE h.client = $1",
            super::postgres::NOW_MS
        )))
        .bind(client)
        .fetch_one(&mut *tx)
        .await?;
        Ok(n.max(0) as usize)
    }

    /// Locks client `id`'s row until commit: reservations for it read the
    /// row FOR SHARE, so none is decided under its old record meanwhile.
    pub(crate) async fn lock_client_row(tx: &mut Conn, id: &str) -> Result<(), StateError> {
        sqlx::query("SELECT 1 FROM clients WHERE id = $1 FOR UPDATE")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        Ok(())
    }

    /// The space locks a reservation for `client` of `customer` takes, in
    /// the same order (`postgres::lock_keys`).
    pub(crate) async fn lock_space(
        tx: &mut Conn,
        cfg: &Config,
        customer: CustomerId,
        client: &str,
    ) -> Result<(), StateError> {
        let keys = super::postgres::lock_keys(cfg, customer, client, cfg.declared_client(client));
        lock_keys(tx, &keys).await
    }

    /// Transaction-scoped advisory locks on `keys`, in that order.
    pub(crate) async fn lock_keys(tx: &mut Conn, keys: &[i64]) -> Result<(), StateError> {
        for k in keys {
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(k)
                .execute(&mut *tx)
                .await?;
        }
        Ok(())
    }
}

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
    db: Db,
    path: PathBuf,
    /// Refusals noted since the last flush (`refusals`).
    refusals: std::sync::Arc<std::sync::Mutex<refusals::Pending>>,
    /// Session starts noted since the last flush (`ops`).
    starts: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, ops::StartRow>>>,
    /// Reservations of uploads in flight, in memory (`ledger`).
    ledger: std::sync::Arc<ledger::Ledger>,
}

/// The backend under a [`State`].
#[derive(Clone, Debug)]
enum Db {
    /// Embedded: readers, and every write of this process through the
    /// group-commit writer (`None` when opened read-only).
    Sqlite {
        pool: SqlitePool,
        writer: Option<writer::Writer>,
        /// The writes run in groups (`grouped`), with the writer.
        groups: Option<grouped::Groups>,
    },
    /// Shared by several nodes (`postgres`).
    Postgres(postgres::Cluster),
}

/// Runs `$body` with `$pool` bound to the backend's pool of readers. The
/// body is compiled once per backend, so its SQL must be what both
/// accept: `$N` parameters, `CAST(… AS BIGINT)` around sums, no
/// SQLite-only functions.
macro_rules! on_pool {
    ($state:expr, $sql:ident, $pool:ident => $body:expr) => {
        match &$state.db {
            $crate::state::Db::Sqlite { pool: $pool, .. } => {
                use $crate::state::lite as $sql;
                $body
            }
            $crate::state::Db::Postgres(c) => {
                use $crate::state::pg as $sql;
                let $pool = c.pool();
                $body
            }
        }
    };
    ($state:expr, $pool:ident => $body:expr) => {
        match &$state.db {
            $crate::state::Db::Sqlite { pool: $pool, .. } => $body,
            $crate::state::Db::Postgres(c) => {
                let $pool = c.pool();
                $body
            }
        }
    };
}
pub(crate) use on_pool;

/// Runs `$body` with `$tx` bound to a write transaction: on SQLite a
/// savepoint lent by the group-commit writer, on PostgreSQL a READ
/// COMMITTED transaction of its own, run again on 40001/40P01. `$sql` names
/// the backend's shared statements (`lite` or `pg`, both made from
/// `sql.rs`). The body commits or rolls back itself, as the writer asks
/// (`writer`); on PostgreSQL, a transaction dropped is rolled back. The
/// body is an async block's: `?` and `return` end the transaction, not
/// the calling function.
macro_rules! in_tx {
    // Not run again: for a body with effects outside the database (moving
    // a client's files), which must not happen twice.
    (once $state:expr, $sql:ident, $tx:ident => $body:expr) => {
        match &$state.db {
            $crate::state::Db::Sqlite { .. } => {
                #[allow(unused_imports)]
                use $crate::state::lite as $sql;
                let r: Result<_, $crate::state::StateError> = async {
                    let mut $tx = $crate::state::ops::immediate($state).await?;
                    $body
                }
                .await;
                r
            }
            $crate::state::Db::Postgres(c) => {
                #[allow(unused_imports)]
                use $crate::state::pg as $sql;
                let r: Result<_, $crate::state::StateError> = async {
                    let mut $tx = c.pool().begin().await?;
                    $body
                }
                .await;
                r
            }
        }
    };
    ($state:expr, $sql:ident, $tx:ident => $body:expr) => {
        match &$state.db {
            $crate::state::Db::Sqlite { .. } => {
                #[allow(unused_imports)]
                use $crate::state::lite as $sql;
                let r: Result<_, $crate::state::StateError> = async {
                    let mut $tx = $crate::state::ops::immediate($state).await?;
                    $body
                }
                .await;
                r
            }
            $crate::state::Db::Postgres(c) => {
                #[allow(unused_imports)]
                use $crate::state::pg as $sql;
                $crate::state::postgres::retrying!({
                    let mut $tx = c.pool().begin().await?;
                    $body
                })
            }
        }
    };
}
pub(crate) use in_tx;

impl State {
    /// Opens the store the config names, creating and migrating it.
    pub async fn open(cfg: &Config) -> Result<State, StateError> {
        match &cfg.server.state {
            StateUrl::Sqlite(path) => State::open_sqlite(path).await,
            StateUrl::Postgres(url) => {
                // The daemon's files (its TLS pair, its node's lock file).
                make_private_dir(&cfg.server.state_dir)?;
                let node = &cfg.server.cluster.node;
                let c = postgres::Cluster::open(url, node, cfg.server.cluster.lease).await?;
                Ok(State::on_postgres(cfg, c))
            }
        }
    }

    /// Opens the store for an admin command that changes it: as
    /// [`State::open`], but on PostgreSQL as no node (a command must not
    /// take over the name of a node that is serving).
    pub async fn open_tool(cfg: &Config) -> Result<State, StateError> {
        match &cfg.server.state {
            StateUrl::Sqlite(path) => State::open_sqlite(path).await,
            StateUrl::Postgres(url) => {
                Ok(State::on_postgres(cfg, postgres::Cluster::tool(url).await?))
            }
        }
    }

    /// On PostgreSQL, this node's lock file (`state_dir/node-NAME.lock`),
    /// taken before [`State::open`] takes the node's lease: a second daemon
    /// started under a serving node's name must stop before it touches the
    /// lease. `None` while another process holds it.
    pub fn lock_node(cfg: &Config) -> Result<Option<requests::DaemonLock>, StateError> {
        make_private_dir(&cfg.server.state_dir)?;
        let mut p = Self::node_path(cfg).into_os_string();
        p.push(".lock");
        requests::lock_daemon_at(PathBuf::from(p))
    }

    /// `state_dir/node-NAME`: what the node's lock file is named after.
    fn node_path(cfg: &Config) -> PathBuf {
        cfg.server
            .state_dir
            .join(format!("node-{}", cfg.server.cluster.node))
    }

    fn on_postgres(cfg: &Config, c: postgres::Cluster) -> State {
        State {
            path: Self::node_path(cfg),
            db: Db::Postgres(c),
            refusals: Default::default(),
            starts: Default::default(),
            ledger: Default::default(),
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
        let ledger: std::sync::Arc<ledger::Ledger> = Default::default();
        Ok(State {
            db: Db::Sqlite {
                pool,
                groups: Some(grouped::Groups::start(&writer, &ledger)),
                writer: Some(writer),
            },
            path: path.to_path_buf(),
            refusals: Default::default(),
            starts: Default::default(),
            ledger,
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
            StateUrl::Postgres(url) => {
                return Ok(State::on_postgres(
                    cfg,
                    postgres::Cluster::reader(url).await?,
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
            db: Db::Sqlite {
                pool,
                writer: None,
                groups: None,
            },
            path,
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
        on_pool!(self, pool => {
            sqlx::query("SELECT 1").execute(pool).await?;
        });
        Ok(())
    }

    /// Commits what is queued, then closes the writer and the readers.
    pub async fn close(&self) {
        match &self.db {
            Db::Sqlite { pool, writer, .. } => {
                if let Some(w) = writer {
                    w.close().await;
                }
                pool.close().await;
            }
            Db::Postgres(c) => c.close().await,
        }
    }

    /// The SQLite readers, for what PostgreSQL does not do yet.
    fn lite(&self) -> Result<&SqlitePool, StateError> {
        match &self.db {
            Db::Sqlite { pool, .. } => Ok(pool),
            Db::Postgres(_) => Err(StateError::Unsupported(
                "this operation is not available on PostgreSQL yet".into(),
            )),
        }
    }

    /// The cluster, when the state is on PostgreSQL.
    pub fn cluster(&self) -> Option<&postgres::Cluster> {
        match &self.db {
            Db::Postgres(c) => Some(c),
            Db::Sqlite { .. } => None,
        }
    }

    /// The grouped writes, on SQLite with a writer.
    fn groups(&self) -> Option<&grouped::Groups> {
        match &self.db {
            Db::Sqlite { groups, .. } => groups.as_ref(),
            Db::Postgres(_) => None,
        }
    }

    /// This process's reservations.
    pub fn ledger(&self) -> &ledger::Ledger {
        &self.ledger
    }

    /// The group-commit writer's counters (`None` when read-only).
    pub fn writer_stats(&self) -> Option<&writer::Stats> {
        match &self.db {
            Db::Sqlite { writer, .. } => writer.as_ref().map(|w| w.stats()),
            Db::Postgres(_) => None,
        }
    }
}

/// Makes `dir` (0700) and its parents unless they exist.
fn make_private_dir(dir: &Path) -> Result<(), StateError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| StateError::Io {
            context: format!("creating {}", dir.display()),
            source: e,
        })
}

/// Creates the SQLite file at `path` (0600, in a 0700 directory made if
/// missing) unless it exists; the options every writer opens it with.
pub(crate) fn create_sqlite_file(path: &Path) -> Result<SqliteConnectOptions, StateError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        make_private_dir(dir)?;
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
