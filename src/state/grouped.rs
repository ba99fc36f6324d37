//! Grouped writes on SQLite (issue 13): the commits of many uploads that
//! end together run as one operation on the group-commit writer, a few
//! statements for the whole group instead of several round trips each.
//!
//! The writer already shares one fsync among the operations of a batch;
//! what it cannot share is the work of each: every statement is a round
//! trip to sqlx's SQLite thread (tens of µs), and an upload's commit is
//! seven. When 10,000 uploads end at once, those round trips, not the
//! disk, are what each waits behind. A [`Coalescer`] takes every request
//! of its kind queued while its previous group was on the writer and runs
//! them as one group: set-based statements over a JSON array of the
//! group's rows, in one savepoint. A group that the set-based statements
//! cannot take exactly (two commits of one file, a row that fails a
//! check) runs again one request at a time, each in its own savepoint, so
//! one failing request fails only its caller. A caller is answered only
//! after its group's batch is durable.

use super::ledger::Ledger;
use super::ops::{PendingCommit, SessionEnded};
use super::writer::{Lease, Writer};
use super::{StateError, lite};
use std::future::Future;
use std::sync::Arc;
use tokio::sync::{Semaphore, mpsc, oneshot};

/// Requests of one group at most.
const MAX_GROUP: usize = 1024;

/// Groups of one kind in flight at once: one on the writer, one waiting
/// for its batch's fsync, so a group never waits for the previous one's
/// disk write to form.
const IN_FLIGHT: usize = 2;

struct Job<Req, Resp> {
    req: Req,
    reply: oneshot::Sender<Result<Resp, StateError>>,
}

/// Runs requests of one kind in groups; cheap to clone.
pub(crate) struct Coalescer<Req, Resp> {
    tx: mpsc::Sender<Job<Req, Resp>>,
}

impl<Req, Resp> Clone for Coalescer<Req, Resp> {
    fn clone(&self) -> Self {
        Coalescer {
            tx: self.tx.clone(),
        }
    }
}

impl<Req, Resp> std::fmt::Debug for Coalescer<Req, Resp> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Coalescer")
    }
}

impl<Req: Send + 'static, Resp: Send + 'static> Coalescer<Req, Resp> {
    /// Starts the task that groups requests and runs each group with
    /// `run`, which answers every request of it, in order.
    pub(crate) fn start<F, Fut>(run: F) -> Self
    where
        F: Fn(Vec<Req>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<Result<Resp, StateError>>> + Send + 'static,
    {
        let (tx, mut rx) = mpsc::channel::<Job<Req, Resp>>(MAX_GROUP);
        let run = Arc::new(run);
        let slots = Arc::new(Semaphore::new(IN_FLIGHT));
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let mut jobs = vec![first];
                while jobs.len() < MAX_GROUP {
                    match rx.try_recv() {
                        Ok(j) => jobs.push(j),
                        Err(_) => break,
                    }
                }
                // A caller that gave up before its group ran is not run
                // for. Once running, a group finishes whoever waits.
                jobs.retain(|j| !j.reply.is_closed());
                if jobs.is_empty() {
                    continue;
                }
                let (reqs, replies): (Vec<_>, Vec<_>) =
                    jobs.into_iter().map(|j| (j.req, j.reply)).unzip();
                let run = run.clone();
                tokio::spawn(async move {
                    let outs = run(reqs).await;
                    for (reply, out) in replies.into_iter().zip(outs) {
                        let _ = reply.send(out);
                    }
                    drop(slot);
                });
            }
        });
        Coalescer { tx }
    }

    /// Runs `req` with whatever else is queued, and waits for its answer.
    pub(crate) async fn call(&self, req: Req) -> Result<Resp, StateError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Job { req, reply })
            .await
            .map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }
}

fn closed() -> StateError {
    StateError::Inconsistent("the state database is closed".into())
}

/// A failure of the whole group, as each caller's error.
fn errors<T>(e: &StateError, n: usize) -> Vec<Result<T, StateError>> {
    (0..n)
        .map(|_| Err(StateError::Inconsistent(e.to_string())))
        .collect()
}

/// The grouped writes of one SQLite store.
#[derive(Clone, Debug)]
pub(crate) struct Groups {
    /// `State::begin_commit`: the pending row, before the rename.
    pub(crate) begin: Coalescer<PendingCommit, i64>,
    /// `State::commit_file`: the index and usage, after the rename.
    pub(crate) commit: Coalescer<i64, i64>,
    /// `State::end_session`: a session's row completed.
    pub(crate) end: Coalescer<SessionEnded, ()>,
}

impl Groups {
    /// Starts the groups' tasks on the current runtime.
    pub(crate) fn start(writer: &Writer, ledger: &Arc<Ledger>) -> Groups {
        let w = writer.clone();
        let begin = Coalescer::start(move |reqs: Vec<PendingCommit>| {
            let w = w.clone();
            async move { begin_commits(&w, &reqs).await }
        });
        let (w, ledger) = (writer.clone(), ledger.clone());
        let commit = Coalescer::start(move |ids: Vec<i64>| {
            let (w, ledger) = (w.clone(), ledger.clone());
            async move { commit_files(&w, &ledger, &ids).await }
        });
        let w = writer.clone();
        let end = Coalescer::start(move |reqs: Vec<SessionEnded>| {
            let w = w.clone();
            async move { end_sessions(&w, &reqs).await }
        });
        Groups { begin, commit, end }
    }
}

/// Runs `set` (the whole group) in a savepoint; when it fails, rolls it
/// back and runs `one` for each request in a savepoint of its own. Then
/// waits for the batch to be durable. The results are in request order.
async fn grouped<Req, Resp, S, O>(
    w: &Writer,
    reqs: &[Req],
    set: S,
    one: O,
) -> Vec<Result<Resp, StateError>>
where
    S: AsyncFnOnce(&mut Lease, &[Req]) -> Result<Option<Vec<Resp>>, StateError>,
    O: AsyncFn(&mut Lease, &Req) -> Result<Resp, StateError>,
{
    let mut lease = match w.lease().await {
        Ok(l) => l,
        Err(e) => return errors(&e, reqs.len()),
    };
    // A lone request runs as itself: the set-based statements pay off
    // only when shared. A savepoint that cannot be ended means SQLite
    // ended the whole transaction (a full disk, an I/O error): going on
    // would run the rest outside it, each committing by itself, so the
    // group fails as a whole and the writer's batch with it.
    let set_outs = if reqs.len() > 1 {
        match in_savepoint(&mut lease, async |l| set(l, reqs).await).await {
            Ok(r) => r,
            Err(e) => return errors(&e, reqs.len()),
        }
    } else {
        Ok(None)
    };
    let outs = match set_outs {
        Ok(Some(outs)) if outs.len() == reqs.len() => outs.into_iter().map(Ok).collect(),
        // Not for the set-based statements: one at a time.
        _ => {
            let mut outs = Vec::with_capacity(reqs.len());
            for r in reqs {
                match in_savepoint(&mut lease, async |l| one(l, r).await.map(Some)).await {
                    Ok(o) => outs.push(o.and_then(|o| o.ok_or_else(closed))),
                    Err(e) => return errors(&e, reqs.len()),
                }
            }
            outs
        }
    };
    match lease.commit().await {
        Ok(()) => outs,
        Err(e) => errors(&e, reqs.len()),
    }
}

/// Runs `f` in a savepoint of the lease: kept when it returns `Some`,
/// undone when it returns `None` or fails. The outer error is the
/// savepoint's own: it could not be made or ended.
async fn in_savepoint<T>(
    lease: &mut Lease,
    f: impl AsyncFnOnce(&mut Lease) -> Result<Option<T>, StateError>,
) -> Result<Result<Option<T>, StateError>, StateError> {
    sqlx::raw_sql("SAVEPOINT grouped")
        .execute(&mut **lease)
        .await?;
    let r = f(lease).await;
    let end = match r {
        Ok(Some(_)) => "RELEASE grouped",
        _ => "ROLLBACK TO grouped; RELEASE grouped",
    };
    sqlx::raw_sql(end).execute(&mut **lease).await?;
    Ok(r)
}

/// The pending rows of a group, in one statement.
async fn begin_commits(w: &Writer, reqs: &[PendingCommit]) -> Vec<Result<i64, StateError>> {
    grouped(
        w,
        reqs,
        async |l, reqs: &[PendingCommit]| {
            let rows: Vec<serde_json::Value> = reqs
                .iter()
                .map(|p| {
                    serde_json::json!({
                        "client": p.client,
                        "path": p.path,
                        "temp": p.temp_path.to_string_lossy(),
                        "final": p.final_path.to_string_lossy(),
                        "size": p.size as i64,
                        "sha256": p.sha256,
                        "modified": super::secs(p.modified),
                        "reservation": p.reservation,
                        "mode": p.mode,
                        "mtime": p.mtime,
                    })
                })
                .collect();
            let ids: Vec<(i64, String)> = sqlx::query_as(
                "INSERT INTO pending_commits (client, path, temp_path, final_path, size, sha256, modified, reservation, created_at, mode, mtime)
                 SELECT json_extract(value, '$.client'), json_extract(value, '$.path'),
                        json_extract(value, '$.temp'), json_extract(value, '$.final'),
                        json_extract(value, '$.size'), json_extract(value, '$.sha256'),
                        json_extract(value, '$.modified'), json_extract(value, '$.reservation'),
                        json_extract(value, '$.modified'), json_extract(value, '$.mode'),
                        json_extract(value, '$.mtime')
                   FROM json_each($1) ORDER BY key
                 RETURNING id, temp_path",
            )
            .bind(serde_json::Value::Array(rows).to_string())
            .fetch_all(&mut **l)
            .await?;
            // RETURNING's order is not defined: each id is found by its
            // temporary file, which is the upload's own.
            let by_temp: std::collections::HashMap<String, i64> =
                ids.into_iter().map(|(id, t)| (t, id)).collect();
            let found: Option<Vec<i64>> = reqs
                .iter()
                .map(|p| by_temp.get(p.temp_path.to_string_lossy().as_ref()).copied())
                .collect();
            Ok(found.filter(|f| by_temp.len() == f.len()))
        },
        async |l, p: &PendingCommit| lite::insert_pending(l, p).await,
    )
    .await
}

/// The index halves of a group's commits. Then, once durable, the
/// ledger's side (`State::commit_file`), here so that it happens even
/// when a caller gave up meanwhile.
async fn commit_files(w: &Writer, ledger: &Ledger, ids: &[i64]) -> Vec<Result<i64, StateError>> {
    let outs = grouped(
        w,
        ids,
        async |l, ids: &[i64]| {
            let json = serde_json::to_string(ids).expect("integers serialize");
            // Set-based only when every commit is there and no two are of
            // one file: a file's second commit's usage change depends on
            // its first.
            let (rows, files): (i64, i64) = sqlx::query_as(
                "SELECT COUNT(*), (SELECT COUNT(*) FROM (SELECT DISTINCT client, path FROM pending_commits WHERE id IN (SELECT value FROM json_each($1))))
                   FROM pending_commits WHERE id IN (SELECT value FROM json_each($1))",
            )
            .bind(&json)
            .fetch_one(&mut **l)
            .await?;
            if rows != ids.len() as i64 || files != rows {
                return Ok(None);
            }
            // One round trip: usage first (from the sizes before the
            // upsert), then the changes each caller is answered with, then
            // the index, then the pending rows go.
            let changes: Vec<(i64, i64, Option<i64>)> = sqlx::query_as(
                "UPDATE clients SET used = used + d.total
                   FROM (SELECT p.client, SUM(p.size - COALESCE(f.size, 0)) AS total
                           FROM pending_commits p LEFT JOIN files f ON f.client = p.client AND f.path = p.path
                          WHERE p.id IN (SELECT value FROM json_each($1)) GROUP BY p.client) AS d
                  WHERE clients.id = d.client AND d.total <> 0;
                 UPDATE customer_usage SET used = used + d.total
                   FROM (SELECT c.customer, SUM(p.size - COALESCE(f.size, 0)) AS total
                           FROM pending_commits p JOIN clients c ON c.id = p.client
                           LEFT JOIN files f ON f.client = p.client AND f.path = p.path
                          WHERE p.id IN (SELECT value FROM json_each($1)) GROUP BY c.customer) AS d
                  WHERE customer_usage.customer = d.customer AND d.total <> 0;
                 SELECT p.id, p.size - COALESCE(f.size, 0), p.reservation
                   FROM pending_commits p LEFT JOIN files f ON f.client = p.client AND f.path = p.path
                  WHERE p.id IN (SELECT value FROM json_each($1));
                 INSERT INTO files (client, path, size, sha256, modified, mode, mtime)
                 SELECT client, path, size, sha256, modified, mode, mtime FROM pending_commits
                  WHERE id IN (SELECT value FROM json_each($1))
                 ON CONFLICT (client, path) DO UPDATE SET size = excluded.size, sha256 = excluded.sha256,
                   modified = excluded.modified, mode = excluded.mode, mtime = excluded.mtime;
                 DELETE FROM pending_commits WHERE id IN (SELECT value FROM json_each($1));",
            )
            .bind(&json)
            .fetch_all(&mut **l)
            .await?;
            let by_id: std::collections::HashMap<i64, (i64, Option<i64>)> = changes
                .into_iter()
                .map(|(id, delta, r)| (id, (delta, r)))
                .collect();
            Ok(ids.iter().map(|id| by_id.get(id).copied()).collect())
        },
        async |l, id: &i64| lite::apply_pending(l, *id, None).await,
    )
    .await;
    // Only once the usage is committed, and in this order (`ledger`).
    ledger.usage_changed();
    outs.into_iter()
        .map(|r| {
            r.map(|(delta, reservation)| {
                if let Some(r) = reservation {
                    ledger.release(r);
                }
                delta
            })
        })
        .collect()
}

/// The ends of a group's sessions: their noted starts, their rows and
/// their reports, a statement each. `stored_after` (the client's usage
/// after the session) is read when the group runs, as it is when one
/// session ends alone.
async fn end_sessions(w: &Writer, reqs: &[SessionEnded]) -> Vec<Result<(), StateError>> {
    end_sessions_set(w, reqs).await.0
}

/// [`end_sessions`], and whether its set-based statements ran to the end
/// (for tests).
async fn end_sessions_set(
    w: &Writer,
    reqs: &[SessionEnded],
) -> (Vec<Result<(), StateError>>, bool) {
    let set_based = std::sync::atomic::AtomicBool::new(false);
    let outs = grouped(
        w,
        reqs,
        async |l, reqs: &[SessionEnded]| {
            let ids: std::collections::HashSet<&str> = reqs.iter().map(|r| r.id.as_str()).collect();
            if ids.len() != reqs.len() {
                // One session ended twice: in order, one by one.
                return Ok(None);
            }
            let starts: Vec<_> = reqs.iter().filter_map(|r| r.start.clone()).collect();
            lite::insert_starts(l, &starts).await?;
            let rows: Vec<serde_json::Value> = reqs
                .iter()
                .map(|r| {
                    serde_json::json!({
                        "id": r.id,
                        "at": r.at,
                        "in": r.bytes_in,
                        "out": r.bytes_out,
                        "ok": r.files_ok,
                        "failed": r.files_failed,
                        "result": r.result,
                    })
                })
                .collect();
            sqlx::query(
                "UPDATE sessions SET ended_at = json_extract(j.value, '$.at'),
                        bytes_in = json_extract(j.value, '$.in'), bytes_out = json_extract(j.value, '$.out'),
                        files_ok = json_extract(j.value, '$.ok'), files_failed = json_extract(j.value, '$.failed'),
                        result = json_extract(j.value, '$.result'),
                        stored_after = (SELECT used FROM clients c WHERE c.id = sessions.client)
                   FROM json_each($1) AS j WHERE sessions.id = json_extract(j.value, '$.id')",
            )
            .bind(serde_json::Value::Array(rows).to_string())
            .execute(&mut **l)
            .await?;
            let reports: Vec<serde_json::Value> = reqs
                .iter()
                .flat_map(|r| {
                    r.reports.iter().map(|p| {
                        serde_json::json!({
                            "recipient": p.recipient,
                            "client": p.client,
                            "facts": p.facts,
                            "at": r.at,
                        })
                    })
                })
                .collect();
            if !reports.is_empty() {
                sqlx::query(
                    "INSERT INTO session_reports (recipient, client, facts, ended_at)
                     SELECT json_extract(value, '$.recipient'), json_extract(value, '$.client'),
                            json_extract(value, '$.facts'), json_extract(value, '$.at')
                       FROM json_each($1) ORDER BY key",
                )
                .bind(serde_json::Value::Array(reports).to_string())
                .execute(&mut **l)
                .await?;
            }
            set_based.store(true, std::sync::atomic::Ordering::Relaxed);
            Ok(Some(vec![(); reqs.len()]))
        },
        async |l, r: &SessionEnded| lite::end_session(l, r).await,
    )
    .await;
    (outs, set_based.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::State;
    use std::path::Path;

    async fn store(dir: &std::path::Path) -> (State, Writer) {
        let st = State::open_sqlite(&dir.join("s.db")).await.unwrap();
        let w = match &st.db {
            crate::state::Db::Sqlite {
                writer: Some(w), ..
            } => w.clone(),
            _ => unreachable!("opened on SQLite with a writer"),
        };
        let mut l = w.lease().await.unwrap();
        sqlx::raw_sql(
            "INSERT INTO clients (id, customer, kind) VALUES ('a', 'C', 'desktop'), ('b', 'C', 'desktop');
             INSERT INTO customer_usage (customer, used) VALUES ('C', 0);",
        )
        .execute(&mut *l)
        .await
        .unwrap();
        l.commit().await.unwrap();
        (st, w)
    }

    fn pending(client: &str, path: &str, size: u64, n: usize) -> PendingCommit {
        PendingCommit {
            client: client.into(),
            path: path.into(),
            temp_path: format!("/t/{n}").into(),
            final_path: format!("/f/{client}/{path}").into(),
            size,
            sha256: format!("{n:064x}"),
            modified: "2026-12-01T00:00:00Z".parse().unwrap(),
            ..Default::default()
        }
    }

    async fn used(st: &State, sql: &str) -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
            .fetch_one(st.lite().unwrap())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_group_is_set_based_and_exact() {
        let dir = tempfile::TempDir::new().unwrap();
        let (st, w) = store(dir.path()).await;
        let reqs: Vec<_> = (0..100)
            .map(|n| pending(["a", "b"][n % 2], &format!("f{n}"), n as u64 * 10, n))
            .collect();
        let ids: Vec<i64> = begin_commits(&w, &reqs)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        // Each caller gets its own row's id, whatever RETURNING's order.
        for (id, p) in ids.iter().zip(&reqs) {
            let temp: String =
                sqlx::query_scalar("SELECT temp_path FROM pending_commits WHERE id = $1")
                    .bind(id)
                    .fetch_one(st.lite().unwrap())
                    .await
                    .unwrap();
            assert_eq!(Path::new(&temp), p.temp_path);
        }
        let ops = w
            .stats()
            .committed
            .load(std::sync::atomic::Ordering::Relaxed);
        let deltas = commit_files(&w, st.ledger(), &ids).await;
        let deltas: Vec<i64> = deltas.into_iter().map(Result::unwrap).collect();
        assert_eq!(deltas, (0..100).map(|n| n * 10).collect::<Vec<i64>>());
        // One operation on the writer for the hundred.
        let after = w
            .stats()
            .committed
            .load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(after - ops, 1);
        assert_eq!(
            used(&st, "SELECT used FROM clients WHERE id = 'a'").await,
            24_500
        );
        assert_eq!(
            used(&st, "SELECT used FROM clients WHERE id = 'b'").await,
            25_000
        );
        assert_eq!(used(&st, "SELECT used FROM customer_usage").await, 49_500);
        assert_eq!(used(&st, "SELECT COUNT(*) FROM pending_commits").await, 0);
        assert_eq!(used(&st, "SELECT SUM(size) FROM files").await, 49_500);
    }

    /// A report's facts: JSON text, with characters JSON must escape.
    fn facts(n: usize, k: usize) -> String {
        format!("{{\"n\": {n}, \"k\": {k}, \"s\": \"é\\\\ \u{1}\"}}")
    }

    fn ended(n: usize, noted: bool) -> SessionEnded {
        SessionEnded {
            id: format!("s{n}"),
            start: noted.then(|| crate::state::ops::StartRow {
                id: format!("s{n}"),
                client: ["a", "b"][n % 2].into(),
                customer: "C".into(),
                schedule: "default".into(),
                intent: "backup".into(),
                peer: None,
                at: 1_000,
            }),
            at: 2_000 + n as i64,
            bytes_in: n as i64 * 3,
            bytes_out: n as i64,
            files_ok: n as i64 % 5,
            files_failed: 1,
            result: if n % 3 == 0 {
                "ok".into()
            } else {
                "idle_timeout".into()
            },
            reports: (0..n % 3)
                .map(|k| crate::state::PendingReport {
                    recipient: format!("r{k}@example.com"),
                    client: ["a", "b"][n % 2].into(),
                    facts: facts(n, k),
                })
                .collect(),
        }
    }

    /// What the sessions and reports tables hold, in a fixed order.
    async fn sessions_and_reports(st: &State) -> (Vec<String>, Vec<String>) {
        let sessions = sqlx::query_scalar(
            "SELECT quote(id) || ' ' || quote(client) || ' ' || quote(started_at) || ' ' || quote(ended_at) || ' ' || quote(bytes_in) || ' ' || quote(bytes_out) || ' ' || quote(files_ok) || ' ' || quote(files_failed) || ' ' || quote(result) || ' ' || quote(stored_after)
               FROM sessions ORDER BY id",
        )
        .fetch_all(st.lite().unwrap())
        .await
        .unwrap();
        let reports = sqlx::query_scalar(
            "SELECT quote(recipient) || ' ' || quote(client) || ' ' || quote(facts) || ' ' || quote(ended_at) FROM session_reports ORDER BY rowid",
        )
        .fetch_all(st.lite().unwrap())
        .await
        .unwrap();
        (sessions, reports)
    }

    #[tokio::test]
    async fn session_ends_are_set_based_and_match_one_by_one() {
        let mut ends: Vec<_> = (0..60).map(|n| ended(n, n % 2 == 0)).collect();
        // A session with no row (its start was never noted): nothing to end.
        ends.push(ended(1_001, false));
        let mut seen = Vec::new();
        for grouped in [true, false] {
            let dir = tempfile::TempDir::new().unwrap();
            let (st, w) = store(dir.path()).await;
            let mut l = w.lease().await.unwrap();
            // Half the sessions' starts are already written, half only noted.
            let written: Vec<_> = (0..60)
                .filter(|n| n % 2 == 1)
                .map(|n| {
                    let mut e = ended(n, true);
                    e.start.take().unwrap()
                })
                .collect();
            lite::insert_starts(&mut l, &written).await.unwrap();
            sqlx::raw_sql("UPDATE clients SET used = 777 WHERE id = 'b'")
                .execute(&mut *l)
                .await
                .unwrap();
            l.commit().await.unwrap();
            let ops = w
                .stats()
                .committed
                .load(std::sync::atomic::Ordering::Relaxed);
            if grouped {
                let (outs, set_based) = end_sessions_set(&w, &ends).await;
                for r in outs {
                    r.unwrap();
                }
                assert!(set_based, "the set-based statements took the group");
                let after = w
                    .stats()
                    .committed
                    .load(std::sync::atomic::Ordering::Relaxed);
                assert_eq!(after - ops, 1, "one operation on the writer for the sixty");
            } else {
                for e in &ends {
                    let mut l = w.lease().await.unwrap();
                    lite::end_session(&mut l, e).await.unwrap();
                    l.commit().await.unwrap();
                }
            }
            seen.push(sessions_and_reports(&st).await);
        }
        let (sessions, reports) = &seen[0];
        assert_eq!(sessions.len(), 60);
        assert_eq!(sessions[0], "'s0' 'a' 1000 2000 0 0 0 1 'ok' 0");
        assert_eq!(sessions[1], "'s1' 'b' 1000 2001 3 1 1 1 'idle_timeout' 777");
        // 1 + 2 + 0 reports for every three sessions, and two for the one
        // with no row (stored, as one by one).
        assert_eq!(reports.len(), 60 + 2);
        assert_eq!(
            reports[0],
            format!("'r0@example.com' 'b' '{}' 2001", facts(1, 0))
        );
        assert_eq!(
            seen[0], seen[1],
            "grouped ends write what single ends write"
        );
    }

    #[tokio::test]
    async fn a_session_ending_twice_in_a_group_runs_one_by_one() {
        let dir = tempfile::TempDir::new().unwrap();
        let (st, w) = store(dir.path()).await;
        let mut again = ended(4, false);
        again.result = "shutdown".into();
        let ends = vec![ended(4, true), ended(5, true), again];
        let (outs, set_based) = end_sessions_set(&w, &ends).await;
        for r in outs {
            r.unwrap();
        }
        // SQLite leaves which match of an `UPDATE … FROM` applies
        // undefined, so such a group does not take the set-based
        // statements; one by one, the later end wins.
        assert!(!set_based);
        let (sessions, reports) = sessions_and_reports(&st).await;
        assert_eq!(
            sessions,
            [
                "'s4' 'a' 1000 2004 12 4 4 1 'shutdown' 0",
                "'s5' 'b' 1000 2005 15 5 0 1 'idle_timeout' 0"
            ]
        );
        assert_eq!(reports.len(), 1 + 2 + 1);
    }

    #[tokio::test]
    async fn a_transaction_lost_mid_group_fails_the_whole_group() {
        let dir = tempfile::TempDir::new().unwrap();
        let (st, w) = store(dir.path()).await;
        let outs = grouped(
            &w,
            &[1i64, 2, 3],
            async |l, _: &[i64]| {
                // What SQLite does itself on a full disk or an I/O error.
                sqlx::raw_sql("ROLLBACK").execute(&mut **l).await?;
                Err(StateError::Inconsistent("the transaction is gone".into()))
            },
            async |l, n: &i64| {
                sqlx::query("INSERT INTO customer_usage (customer, used) VALUES ($1, 0)")
                    .bind(format!("X{n}"))
                    .execute(&mut **l)
                    .await?;
                Ok(*n)
            },
        )
        .await;
        assert!(outs.iter().all(Result::is_err), "{outs:?}");
        // Nothing ran outside the transaction, committing by itself.
        assert_eq!(
            used(
                &st,
                "SELECT COUNT(*) FROM customer_usage WHERE customer LIKE 'X%'"
            )
            .await,
            0
        );
        // The writer goes on, in a new transaction.
        let ids = begin_commits(&w, &[pending("a", "f0", 1, 0)]).await;
        assert!(
            ids[0].is_ok(),
            "the writer stopped after a lost transaction"
        );
    }

    #[tokio::test]
    async fn two_commits_of_one_file_and_a_failing_one_run_one_by_one() {
        let dir = tempfile::TempDir::new().unwrap();
        let (st, w) = store(dir.path()).await;
        let reqs = [
            pending("a", "same", 100, 1),
            pending("a", "other", 7, 2),
            pending("a", "same", 30, 3),
        ];
        let mut ids: Vec<i64> = begin_commits(&w, &reqs)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        // A commit that is not there fails alone.
        ids.insert(1, 999_999);
        let out = commit_files(&w, st.ledger(), &ids).await;
        assert!(
            out[1]
                .as_ref()
                .is_err_and(|e| e.to_string().contains("no pending commit")),
            "{:?}",
            out[1]
        );
        let deltas: Vec<i64> = [0, 2, 3].map(|i| *out[i].as_ref().unwrap()).to_vec();
        // The second commit of `same` replaces the first: 30 - 100.
        assert_eq!(deltas, [100, 7, -70]);
        assert_eq!(
            used(&st, "SELECT used FROM clients WHERE id = 'a'").await,
            37
        );
        assert_eq!(used(&st, "SELECT used FROM customer_usage").await, 37);
        assert_eq!(used(&st, "SELECT COUNT(*) FROM pending_commits").await, 0);
    }

    #[tokio::test]
    async fn a_row_failing_a_check_fails_only_its_caller() {
        let dir = tempfile::TempDir::new().unwrap();
        let (st, w) = store(dir.path()).await;
        let reqs = [pending("a", "x", 5, 1), pending("b", "y", 9, 2)];
        let ids: Vec<i64> = begin_commits(&w, &reqs)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        // A negative size breaks `files`' CHECK: the set-based statements
        // fail as a whole, and only that commit fails one by one.
        let mut l = w.lease().await.unwrap();
        sqlx::query("UPDATE pending_commits SET size = -1 WHERE id = $1")
            .bind(ids[0])
            .execute(&mut *l)
            .await
            .unwrap();
        l.commit().await.unwrap();
        let out = commit_files(&w, st.ledger(), &ids).await;
        assert!(out[0].is_err());
        assert_eq!(*out[1].as_ref().unwrap(), 9);
        assert_eq!(used(&st, "SELECT used FROM customer_usage").await, 9);
        assert_eq!(used(&st, "SELECT COUNT(*) FROM files").await, 1);
        assert_eq!(used(&st, "SELECT COUNT(*) FROM pending_commits").await, 1);
    }
}
