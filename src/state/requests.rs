//! Moves and removals handed from an admin command to the running daemon
//! (issue 13). Reservations of uploads in flight live in the daemon's
//! memory (`ledger`), so only the daemon can tell whether a client has
//! uploads in flight and how much space its customers really have free.
//!
//! The daemon holds an exclusive `flock` on `<state>.lock` for as long as
//! it runs ([`State::lock_daemon`]). A command that changes clients tries
//! the same lock: when it gets it, no daemon runs and nothing is in flight,
//! so it applies the change itself (holding the lock, so a daemon cannot
//! start meanwhile); when it cannot, it records a request
//! ([`State::request`]), the daemon applies it within a tenth of a second
//! and records the outcome, and the command prints it. A request the
//! daemon has not claimed when the command gives up is cancelled, never
//! applied later.

use super::{Removed, State, StateError, secs};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::path::PathBuf;

/// How long a request may wait for the daemon (the command withdraws it
/// after 30 s; this covers a command that was killed before it could).
pub const REQUEST_VALID_SECS: i64 = 60;

/// What a client change asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// `clients move ID --to CUSTOMER`.
    Move {
        /// The client.
        client: String,
        /// The customer it moves to.
        to: String,
    },
    /// `clients remove ID [--purge]`.
    Remove {
        /// The client.
        client: String,
        /// Delete its files and free its space.
        purge: bool,
    },
}

/// How a change ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum Outcome {
    /// The client moved.
    Moved,
    /// The move was refused; the reason, as `MoveRefused` words it.
    Refused {
        /// Why.
        reason: String,
    },
    /// The client was removed.
    Removed {
        /// Its customer.
        customer: String,
        /// Bytes freed (purge).
        freed_bytes: u64,
        /// MCALs of the month refunded.
        freed_mcal: u64,
    },
    /// No such client.
    NoSuchClient,
    /// The change failed; the daemon's log has the details.
    Failed {
        /// What failed.
        error: String,
    },
}

impl From<Removed> for Outcome {
    fn from(r: Removed) -> Outcome {
        Outcome::Removed {
            customer: r.customer,
            freed_bytes: r.freed_bytes,
            freed_mcal: r.freed_mcal,
        }
    }
}

/// A request waiting for the daemon.
#[derive(Debug, Clone)]
pub struct Request {
    /// Its id.
    pub id: i64,
    /// What it asks.
    pub change: Change,
}

/// The daemon's hold on the state (released when dropped, or when the
/// process dies).
#[derive(Debug)]
pub struct DaemonLock {
    _file: File,
    path: PathBuf,
}

impl DaemonLock {
    /// The lock file.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

impl State {
    /// The lock file beside the database.
    fn lock_path(&self) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(".lock");
        PathBuf::from(p)
    }

    /// Takes the state's lock if nobody holds it: `None` while a daemon
    /// (or another command changing clients) holds it.
    pub fn lock_daemon(&self) -> Result<Option<DaemonLock>, StateError> {
        lock_daemon_at(self.lock_path())
    }
}

/// [`State::lock_daemon`] on the lock file at `path`.
pub(crate) fn lock_daemon_at(path: PathBuf) -> Result<Option<DaemonLock>, StateError> {
    {
        use std::os::unix::fs::OpenOptionsExt;
        let io = |e: std::io::Error| StateError::Io {
            context: format!("opening {}", path.display()),
            source: e,
        };
        // Read-only is enough for flock: a lock file an administrator's
        // command created (as root) still serves the daemon's user.
        // Not through a symbolic link: a command run as root must not be
        // led to create a file elsewhere.
        let nofollow = rustix::fs::OFlags::NOFOLLOW.bits() as i32;
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(nofollow)
            .open(&path)
        {
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(nofollow)
                    .open(&path)
                    .map_err(io)?
            }
            r => r.map_err(io)?,
        };
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(Some(DaemonLock { _file: file, path })),
            Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
            Err(e) => Err(io(e.into())),
        }
    }
}

impl State {
    /// Records `change` for the daemon; returns the request's id.
    pub async fn request(&self, change: &Change) -> Result<i64, StateError> {
        let (kind, client, customer, purge) = match change {
            Change::Move { client, to } => ("move", client, Some(to.as_str()), false),
            Change::Remove { client, purge } => ("remove", client, None, *purge),
        };
        super::in_tx!(self, sql, tx => {
            let id: i64 = sqlx::query_scalar(
                "INSERT INTO admin_requests (kind, client, customer, purge, requested_at) VALUES ($1, $2, $3, $4, $5) RETURNING id",
            )
            .bind(kind)
            .bind(client)
            .bind(customer)
            .bind(i64::from(purge))
            // The real clock, as the daemon's expiry reads it: a shifted clock
            // (TOLLGATE_FAKE_NOW) moves with each process's start.
            .bind(secs(Timestamp::now()))
            .fetch_one(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(id)
        })
    }

    /// The request's outcome once the daemon has recorded it.
    pub async fn outcome(&self, id: i64) -> Result<Option<Outcome>, StateError> {
        let row: Option<Option<String>> = super::on_pool!(self, pool => {
            sqlx::query_scalar(
                "SELECT outcome FROM admin_requests WHERE id = $1 AND done_at IS NOT NULL",
            )
            .bind(id)
            .fetch_optional(pool)
            .await?
        });
        Ok(row.flatten().and_then(|j| serde_json::from_str(&j).ok()))
    }

    /// Withdraws a request the daemon has not claimed; false when it has
    /// (it is being applied, or done).
    pub async fn cancel_request(&self, id: i64, at: Timestamp) -> Result<bool, StateError> {
        super::in_tx!(self, sql, tx => {
            let n = sqlx::query(
                "UPDATE admin_requests SET done_at = $1, outcome = NULL WHERE id = $2 AND claimed_at IS NULL AND done_at IS NULL",
            )
            .bind(secs(at))
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            tx.commit().await?;
            Ok(n == 1)
        })
    }

    /// Claims the oldest unclaimed request, if any (the daemon). Requests
    /// older than [`REQUEST_VALID_SECS`] are never applied: the command
    /// that made them has given up (or was killed), and a change applied
    /// days later (a purge) would surprise everyone; they are closed with
    /// a `Failed` outcome instead.
    pub async fn claim_request(&self, at: Timestamp) -> Result<Option<Request>, StateError> {
        // A read first: the daemon asks ten times a second, and a write
        // (with its fsync) is only needed when there is something.
        let waiting: Option<i64> = super::on_pool!(self, pool => {
            sqlx::query_scalar(
                "SELECT id FROM admin_requests WHERE done_at IS NULL AND claimed_at IS NULL ORDER BY id LIMIT 1",
            )
            .fetch_optional(pool)
            .await?
        });
        if waiting.is_none() {
            return Ok(None);
        }
        let expired = serde_json::to_string(&Outcome::Failed {
            error: "the request expired before the daemon took it".into(),
        })
        .unwrap_or_default();
        let row: Option<(i64, String, String, Option<String>, bool)> = super::in_tx!(self, sql, tx => {
            sqlx::query(
                "UPDATE admin_requests SET done_at = $1, outcome = $2
                  WHERE done_at IS NULL AND claimed_at IS NULL AND requested_at < $3",
            )
            .bind(secs(at))
            .bind(&expired)
            .bind(secs(Timestamp::now()) - REQUEST_VALID_SECS)
            .execute(&mut *tx)
            .await?;
            // `claimed_at IS NULL` again outside the subquery: on
            // PostgreSQL a node that waited for another's claim of the same
            // row rechecks it, and finds it taken.
            let row = sqlx::query_as(
                "UPDATE admin_requests SET claimed_at = $1
                  WHERE id = (SELECT id FROM admin_requests WHERE done_at IS NULL AND claimed_at IS NULL ORDER BY id LIMIT 1)
                    AND claimed_at IS NULL
                  RETURNING id, kind, client, customer, purge <> 0",
            )
            .bind(secs(at))
            .fetch_optional(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(row)
        })?;
        let Some((id, kind, client, customer, purge)) = row else {
            return Ok(None);
        };
        let change = match (kind.as_str(), customer) {
            ("move", Some(to)) => Change::Move { client, to },
            ("remove", _) => Change::Remove { client, purge },
            _ => {
                // A newer version's request: say so rather than guess.
                self.finish_request(
                    id,
                    &Outcome::Failed {
                        error: format!("this daemon does not know requests of kind {kind:?}"),
                    },
                    at,
                )
                .await?;
                return Ok(None);
            }
        };
        Ok(Some(Request { id, change }))
    }

    /// Records a claimed request's outcome.
    pub async fn finish_request(
        &self,
        id: i64,
        outcome: &Outcome,
        at: Timestamp,
    ) -> Result<(), StateError> {
        let json = serde_json::to_string(outcome).unwrap_or_else(|_| "{}".into());
        super::in_tx!(self, sql, tx => {
            sqlx::query("UPDATE admin_requests SET done_at = $1, outcome = $2 WHERE id = $3")
                .bind(secs(at))
                .bind(&json)
                .bind(id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(())
        })
    }
}
