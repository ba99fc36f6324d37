//! The group-commit writer (issue 13): one task owns the write connection
//! and runs every write of this process in batches, one durable commit
//! each.
//!
//! A caller asks over a bounded channel and is lent the connection inside
//! a `SAVEPOINT` of the open `BEGIN IMMEDIATE` transaction ([`Lease`]). It
//! runs its checks and writes there, with its own borrowed inputs, then
//! hands the connection back: kept ([`Lease::commit`]) or undone (dropped,
//! or [`Lease::rollback`]), which fails only that caller. The writer lends
//! the connection to whoever asked next, until the queue is empty, the
//! batch holds [`Limits::max_ops`] operations or it has been open
//! [`Limits::max_span`]; then it commits once (synchronous=FULL) and only
//! then answers every caller that kept its work, or undid it with
//! [`Lease::rollback`] (an answer resting on what earlier operations of
//! the batch wrote: admission's refusals, an MCAL debit found already
//! made). A failed commit fails every one of them: nothing is acknowledged
//! that is not on disk; when SQLite has ended the transaction itself (a
//! full disk, an I/O error), the caller that was next in line opens the
//! next batch instead. An operation that drops its lease instead (an
//! error, or a refusal that can only err on the safe side) is answered by
//! itself, at once.
//!
//! Operations run one after another on one connection, so each sees every
//! earlier operation of its batch: decisions that must be exact (MCAL
//! debits, client slots, reservations) stay exact. Batching only shares
//! the fsync. Under no load a batch is one operation and commits at once.
//!
//! The shape follows corrosion's `handle_changes` (superfly/corrosion,
//! `crates/corro-agent/src/agent/handlers.rs`), with the operation run by
//! its caller on the lent connection instead of being sent as a closure,
//! so operations keep borrowing their inputs (`&Config`, `&Hello`).

use super::StateError;
use sqlx::Executor;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::{ConnectOptions, Connection};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// When a batch commits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Operations in one batch at most.
    pub max_ops: usize,
    /// How long a batch stays open for more operations at most.
    pub max_span: Duration,
    /// Callers queued at most; more wait to be queued.
    pub queue: usize,
}

impl Default for Limits {
    /// A batch closes at once when nobody waits, so the span only matters
    /// under load. There it lets one commit's fsync (5–20 ms on a busy
    /// virtual disk) serve more operations: at 256 and 5 ms, 10,000
    /// uploads ending together waited 1.9 s (p50) from END to STORED; at
    /// 1,024 and 20 ms, 1.5 s (docs/benchmarks.md).
    fn default() -> Limits {
        Limits {
            max_ops: 1024,
            max_span: Duration::from_millis(20),
            queue: 4096,
        }
    }
}

/// What the writer has done, for tests and metrics.
#[derive(Debug, Default)]
pub struct Stats {
    /// Batches committed (or failed).
    pub batches: AtomicU64,
    /// Operations kept in a committed batch.
    pub committed: AtomicU64,
    /// Operations undone (failed or refused).
    pub undone: AtomicU64,
}

/// The outcome of a batch's commit, sent to each caller that kept work.
type Outcome = Result<(), Arc<sqlx::Error>>;

/// The connection coming back from a caller.
struct Returned {
    conn: Option<SqliteConnection>,
    keep: bool,
    waiter: Option<oneshot::Sender<Outcome>>,
}

/// A caller's request: where to lend the connection.
type Ask = oneshot::Sender<Result<Lease, Arc<sqlx::Error>>>;

enum Msg {
    Ask(Ask),
    Close(oneshot::Sender<()>),
}

/// The handle callers hold; cheap to clone.
#[derive(Clone, Debug)]
pub struct Writer {
    tx: mpsc::Sender<Msg>,
    stats: Arc<Stats>,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Msg")
    }
}

impl Writer {
    /// Opens the write connection and starts its task on the current
    /// runtime.
    pub async fn start(opts: SqliteConnectOptions, limits: Limits) -> Result<Writer, StateError> {
        let conn = opts.connect().await?;
        let (tx, rx) = mpsc::channel(limits.queue.max(1));
        let stats = Arc::new(Stats::default());
        tokio::spawn(run(conn, opts, rx, limits, stats.clone()));
        Ok(Writer { tx, stats })
    }

    /// Waits for the connection, inside a fresh savepoint of the open
    /// batch.
    pub async fn lease(&self) -> Result<Lease, StateError> {
        let (ask, lent) = oneshot::channel();
        self.tx.send(Msg::Ask(ask)).await.map_err(|_| closed())?;
        match lent.await {
            Ok(Ok(lease)) => Ok(lease),
            Ok(Err(e)) => Err(shared(&e)),
            Err(_) => Err(closed()),
        }
    }

    /// The writer's counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Commits what is open and closes the connection; later leases fail.
    pub async fn close(&self) {
        let (done, closed) = oneshot::channel();
        if self.tx.send(Msg::Close(done)).await.is_ok() {
            let _ = closed.await;
        }
    }
}

fn closed() -> StateError {
    StateError::Inconsistent("the state database is closed".into())
}

/// A batch-wide failure, as each caller's error.
fn shared(e: &sqlx::Error) -> StateError {
    StateError::Inconsistent(format!("state database: {e}"))
}

/// The write connection, lent to one caller inside its savepoint. It
/// derefs to the connection; dropping it undoes the caller's work.
pub struct Lease {
    conn: Option<SqliteConnection>,
    back: Option<oneshot::Sender<Returned>>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Lease")
    }
}

impl Lease {
    fn give_back(&mut self, keep: bool, waiter: Option<oneshot::Sender<Outcome>>) {
        if let Some(back) = self.back.take() {
            let _ = back.send(Returned {
                conn: self.conn.take(),
                keep,
                waiter,
            });
        }
    }

    /// Keeps this caller's work and waits until its batch is durable.
    pub async fn commit(mut self) -> Result<(), StateError> {
        let (waiter, outcome) = oneshot::channel();
        self.give_back(true, Some(waiter));
        match outcome.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(shared(&e)),
            Err(_) => Err(closed()),
        }
    }

    /// Undoes this caller's work, and waits for its batch to end: a
    /// refusal is not answered before the work it saw is committed.
    pub async fn rollback(mut self) -> Result<(), StateError> {
        let (waiter, outcome) = oneshot::channel();
        self.give_back(false, Some(waiter));
        let _ = outcome.await;
        Ok(())
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.give_back(false, None);
    }
}

impl std::ops::Deref for Lease {
    type Target = SqliteConnection;
    fn deref(&self) -> &SqliteConnection {
        self.conn
            .as_ref()
            .expect("a lease holds the connection until it ends")
    }
}

impl std::ops::DerefMut for Lease {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        self.conn
            .as_mut()
            .expect("a lease holds the connection until it ends")
    }
}

/// The writer task: batches until every handle is gone or it is closed.
async fn run(
    conn: SqliteConnection,
    opts: SqliteConnectOptions,
    mut rx: mpsc::Receiver<Msg>,
    limits: Limits,
    stats: Arc<Stats>,
) {
    let mut conn = Some(conn);
    let mut closing = None;
    // A caller that was next when SQLite ended a batch's transaction
    // starts the next batch instead of failing with it.
    let mut carried: Option<Ask> = None;
    loop {
        let first = match carried.take() {
            Some(a) => a,
            None => match rx.recv().await {
                Some(Msg::Ask(a)) => a,
                Some(Msg::Close(done)) => {
                    closing = Some(done);
                    break;
                }
                None => break,
            },
        };
        // A connection lost with a caller (a leaked lease) is replaced; its
        // transaction died with it.
        let c = match conn.take() {
            Some(c) => c,
            None => match opts.connect().await {
                Ok(c) => c,
                Err(e) => {
                    let _ = first.send(Err(Arc::new(e)));
                    continue;
                }
            },
        };
        let Ended {
            conn: c,
            stop,
            next,
        } = batch(c, first, &mut rx, &limits, &stats).await;
        conn = c;
        carried = next;
        if let Some(done) = stop {
            closing = Some(done);
            break;
        }
    }
    if let Some(c) = conn {
        let _ = c.close().await;
    }
    if let Some(done) = closing {
        let _ = done.send(());
    }
}

/// How a batch ended.
struct Ended {
    /// The connection, unless a caller lost it.
    conn: Option<SqliteConnection>,
    /// A close request that arrived meanwhile.
    stop: Option<oneshot::Sender<()>>,
    /// The caller taken for the batch when SQLite ended its transaction:
    /// it had done nothing in it, so it goes first in the next batch.
    next: Option<Ask>,
}

/// One batch: `BEGIN IMMEDIATE`, a savepoint per caller, one `COMMIT`.
///
/// Each step between two callers is one round trip to SQLite (the end of
/// one savepoint and the start of the next, or the commit): a round trip
/// costs about as much as a small statement.
async fn batch(
    mut conn: SqliteConnection,
    first: Ask,
    rx: &mut mpsc::Receiver<Msg>,
    limits: &Limits,
    stats: &Stats,
) -> Ended {
    if let Err(e) = sqlx::raw_sql("BEGIN IMMEDIATE; SAVEPOINT op")
        .execute(&mut conn)
        .await
    {
        // Nothing began, or the savepoint failed inside a fresh transaction.
        let _ = conn.execute("ROLLBACK").await;
        let _ = first.send(Err(Arc::new(e)));
        return Ended {
            conn: Some(conn),
            stop: None,
            next: None,
        };
    }
    let opened = Instant::now();
    let mut waiters: Vec<oneshot::Sender<Outcome>> = Vec::new();
    let (mut ops, mut kept) = (0usize, 0u64);
    let mut ask = first;
    let mut stop = None;
    let mut carried = None;
    let outcome = loop {
        let (back, returned) = oneshot::channel();
        // A caller that gave up waiting drops the lease unsent, which
        // gives the connection straight back.
        let _ = ask.send(Ok(Lease {
            conn: Some(conn),
            back: Some(back),
        }));
        let Ok(Returned {
            conn: Some(c),
            keep,
            waiter,
        }) = returned.await
        else {
            // The caller lost the connection; its transaction goes with it.
            fail(waiters, "the write connection was lost mid-batch");
            return Ended {
                conn: None,
                stop,
                next: None,
            };
        };
        conn = c;
        ops += 1;
        if keep {
            kept += 1;
        } else {
            stats.undone.fetch_add(1, Ordering::Relaxed);
        }
        // A refusal is answered with its batch too, so it never outruns
        // the work it saw.
        waiters.extend(waiter);
        let end = if keep {
            "RELEASE op"
        } else {
            "ROLLBACK TO op; RELEASE op"
        };
        let next = if ops < limits.max_ops && opened.elapsed() < limits.max_span {
            match rx.try_recv() {
                Ok(Msg::Ask(a)) => Some(a),
                Ok(Msg::Close(done)) => {
                    stop = Some(done);
                    None
                }
                Err(_) => None,
            }
        } else {
            None
        };
        let Some(a) = next else {
            let sql = format!("{end}; COMMIT");
            break sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&mut conn)
                .await
                .map(|_| ())
                .map_err(Arc::new);
        };
        let sql = format!("{end}; SAVEPOINT op");
        if let Err(e) = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut conn)
            .await
        {
            // SQLite ended the transaction itself (an I/O error, a full
            // disk): the batch is gone. The next caller is not lent a
            // connection outside a savepoint; it opens the next batch.
            carried = Some(a);
            break Err(Arc::new(e));
        }
        ask = a;
    };
    stats.batches.fetch_add(1, Ordering::Relaxed);
    match outcome {
        Ok(()) => {
            stats.committed.fetch_add(kept, Ordering::Relaxed);
            for w in waiters {
                let _ = w.send(Ok(()));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "state database: a batch of writes failed to commit; each of its callers is told");
            let _ = conn.execute("ROLLBACK").await;
            for w in waiters {
                let _ = w.send(Err(e.clone()));
            }
        }
    }
    Ended {
        conn: Some(conn),
        stop,
        next: carried,
    }
}

fn fail(waiters: Vec<oneshot::Sender<Outcome>>, why: &str) {
    tracing::error!("state database: {why}; each caller of the batch is told");
    let e = Arc::new(sqlx::Error::Protocol(why.into()));
    for w in waiters {
        let _ = w.send(Err(e.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};

    async fn writer(dir: &std::path::Path, schema: &'static str) -> Writer {
        let opts = SqliteConnectOptions::new()
            .filename(dir.join("w.db"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true);
        let mut c = opts.connect().await.unwrap();
        sqlx::raw_sql(schema).execute(&mut c).await.unwrap();
        c.close().await.unwrap();
        let limits = Limits {
            max_ops: 10_000,
            max_span: Duration::from_secs(600),
            queue: 1_000,
        };
        Writer::start(opts, limits).await.unwrap()
    }

    /// Waits until `n` callers are queued behind the current lease.
    async fn queued(w: &Writer, n: usize) {
        while w.tx.max_capacity() - w.tx.capacity() < n {
            tokio::task::yield_now().await;
        }
    }

    async fn count(w: &Writer, sql: &str) -> i64 {
        let mut l = w.lease().await.unwrap();
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
            .fetch_one(&mut *l)
            .await
            .unwrap();
        l.rollback().await.unwrap();
        n
    }

    /// Spawns one caller per value, each running `sqls` with it and
    /// committing.
    fn callers(
        w: &Writer,
        sqls: &'static [&'static str],
        values: Vec<i64>,
    ) -> Vec<tokio::task::JoinHandle<Result<(), StateError>>> {
        values
            .into_iter()
            .map(|v| {
                let w = w.clone();
                tokio::spawn(async move {
                    let mut l = w.lease().await?;
                    for sql in sqls {
                        sqlx::query(*sql).bind(v).execute(&mut *l).await?;
                    }
                    l.commit().await
                })
            })
            .collect()
    }

    fn inserters(
        w: &Writer,
        sql: &'static str,
        values: Vec<i64>,
    ) -> Vec<tokio::task::JoinHandle<Result<(), StateError>>> {
        callers(w, Box::leak(Box::new([sql])), values)
    }

    #[tokio::test]
    async fn one_failing_operation_fails_only_its_caller() {
        let dir = tempfile::TempDir::new().unwrap();
        let w = writer(
            dir.path(),
            "CREATE TABLE t (x INTEGER NOT NULL CHECK (x >= 0))",
        )
        .await;
        // The first caller holds the connection while 50 more queue, so all
        // 51 share one batch.
        let mut first = w.lease().await.unwrap();
        // Each caller writes two rows; the failing one's first write must
        // be undone with its savepoint.
        let values: Vec<i64> = (0..50).map(|i| if i == 13 { -1 } else { i }).collect();
        let tasks = callers(
            &w,
            &[
                "INSERT INTO t (x) VALUES (abs(?))",
                "INSERT INTO t (x) VALUES (?)",
            ],
            values,
        );
        queued(&w, 50).await;
        sqlx::query("INSERT INTO t (x) VALUES (100)")
            .execute(&mut *first)
            .await
            .unwrap();
        first.commit().await.unwrap();
        let mut failed = 0;
        for t in tasks {
            if let Err(e) = t.await.unwrap() {
                assert!(e.to_string().contains("CHECK"), "{e}");
                failed += 1;
            }
        }
        assert_eq!(failed, 1);
        assert_eq!(w.stats().batches.load(Ordering::Relaxed), 1);
        assert_eq!(w.stats().committed.load(Ordering::Relaxed), 50);
        assert_eq!(count(&w, "SELECT COUNT(*) FROM t").await, 1 + 49 * 2);
        assert_eq!(count(&w, "SELECT COUNT(*) FROM t WHERE x < 0").await, 0);
    }

    #[tokio::test]
    async fn a_failed_commit_fails_every_caller_and_the_next_batch_works() {
        let dir = tempfile::TempDir::new().unwrap();
        let w = writer(
            dir.path(),
            "CREATE TABLE parent (id INTEGER PRIMARY KEY);
             CREATE TABLE child (p INTEGER REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED);",
        )
        .await;
        let mut first = w.lease().await.unwrap();
        let tasks = inserters(&w, "INSERT INTO parent (id) VALUES (?)", (1..=10).collect());
        queued(&w, 10).await;
        // A deferred foreign key is only checked at COMMIT: the batch's
        // commit fails, so no caller of it may be told its work is kept.
        sqlx::query("INSERT INTO child (p) VALUES (999)")
            .execute(&mut *first)
            .await
            .unwrap();
        assert!(first.commit().await.is_err());
        for t in tasks {
            assert!(t.await.unwrap().is_err());
        }
        assert_eq!(count(&w, "SELECT COUNT(*) FROM parent").await, 0);
        for t in inserters(&w, "INSERT INTO parent (id) VALUES (?)", vec![7]) {
            t.await.unwrap().unwrap();
        }
        assert_eq!(count(&w, "SELECT COUNT(*) FROM parent").await, 1);
    }

    #[tokio::test]
    async fn a_lost_transaction_fails_its_batch_but_not_the_caller_next_in_line() {
        let dir = tempfile::TempDir::new().unwrap();
        let w = writer(dir.path(), "CREATE TABLE t (x INTEGER)").await;
        let mut first = w.lease().await.unwrap();
        // Queued in this order behind `first`: one that loses the
        // transaction, as SQLite does itself on a full disk, then one that
        // only writes.
        let w2 = w.clone();
        let loser = tokio::spawn(async move {
            let mut l = w2.lease().await?;
            sqlx::query("INSERT INTO t (x) VALUES (2)")
                .execute(&mut *l)
                .await?;
            sqlx::raw_sql("ROLLBACK").execute(&mut *l).await?;
            l.commit().await
        });
        queued(&w, 1).await;
        let next = inserters(&w, "INSERT INTO t (x) VALUES (?)", vec![3]);
        queued(&w, 2).await;
        sqlx::query("INSERT INTO t (x) VALUES (1)")
            .execute(&mut *first)
            .await
            .unwrap();
        // The batch is gone with its transaction: neither caller in it may
        // be told its work is kept.
        assert!(first.commit().await.is_err());
        assert!(loser.await.unwrap().is_err());
        // The caller next in line had not run in it, and opens a batch of
        // its own.
        for t in next {
            t.await.unwrap().unwrap();
        }
        assert_eq!(count(&w, "SELECT COUNT(*) FROM t").await, 1);
        assert_eq!(count(&w, "SELECT COUNT(*) FROM t WHERE x = 3").await, 1);
    }

    #[tokio::test]
    async fn a_caller_cancelled_mid_operation_leaves_nothing_and_blocks_no_one() {
        let dir = tempfile::TempDir::new().unwrap();
        let w = writer(dir.path(), "CREATE TABLE t (x INTEGER)").await;
        let (held, hold) = oneshot::channel::<()>();
        let w2 = w.clone();
        let doomed = tokio::spawn(async move {
            let mut l = w2.lease().await.unwrap();
            sqlx::query("INSERT INTO t (x) VALUES (1)")
                .execute(&mut *l)
                .await
                .unwrap();
            let _ = held.send(());
            std::future::pending::<()>().await;
            drop(l);
        });
        hold.await.unwrap();
        let others = inserters(&w, "INSERT INTO t (x) VALUES (?)", vec![2, 3]);
        queued(&w, 2).await;
        doomed.abort();
        for t in others {
            t.await.unwrap().unwrap();
        }
        assert_eq!(count(&w, "SELECT COUNT(*) FROM t WHERE x = 1").await, 0);
        assert_eq!(count(&w, "SELECT COUNT(*) FROM t").await, 2);
    }
}
