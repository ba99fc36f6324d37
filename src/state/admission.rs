//! Admission in the database (PROTOCOL.md "Admission"): the snapshot, the
//! decision by `policy`, and registration and the MCAL debit, in one
//! transaction. Argon2 never runs inside it: the enroll key is verified
//! before the transaction opens ([`State::admit_verified`]), so a flood of
//! guesses cannot hold the write lane every admission waits for.
//!
//! Also the registration side of the reserved ids of removed clients:
//! `clients readmit` and its one-time key (PROTOCOL.md Additions).

use super::ops::{
    admission_reads, client_db, immediate, insert_debit, record, upsert_registration,
};
use super::{State, StateError, new_secret, secs};
use crate::config::{Config, CustomerId, Kind, PhcHash};
use crate::policy::admission::{
    self, Admitted, ClientRecord, EnrollVerdict, Hello, REGISTRATION_WINDOW_SECS, Registration,
    RejectCode, Rejection, Snapshot,
};
use crate::policy::space::Month;
use jiff::Timestamp;
use std::future::Future;
use std::net::IpAddr;

/// How long a readmit key is valid (CLI.md Additions: 7 days).
pub const READMIT_VALID_SECS: i64 = 7 * 86_400;
/// Rounds of "verify the enroll key, then decide" when the client's record
/// changes between the two (a concurrent registration or removal).
const VERIFY_ROUNDS: usize = 3;

/// What admission decided, with the secret when one was issued.
#[derive(Debug)]
pub enum AdmitOutcome {
    /// WELCOME.
    Admitted {
        /// The decision.
        admitted: Admitted,
        /// The issued secret (plaintext, shown to the client once).
        secret: Option<String>,
    },
    /// REJECT; recorded as a refusal.
    Rejected(Rejection),
}

/// One admission transaction's result.
#[derive(Debug)]
pub enum Decision {
    /// WELCOME.
    Admitted {
        /// The decision.
        admitted: Admitted,
        /// The issued secret (plaintext, shown to the client once).
        secret: Option<String>,
    },
    /// REJECT. `customer` is the configured customer the refusal concerns,
    /// for the record; `None` when HELLO named none that exists.
    Rejected {
        /// Code and message.
        rejection: Rejection,
        /// For the refusal's record.
        customer: Option<String>,
    },
    /// HELLO's enroll key must first be verified against this customer's
    /// hash (the record changed since it was verified).
    Verify(CustomerId),
}

impl State {
    /// The record of `id` (without regard to case), read outside any
    /// transaction: to know whose enroll key to verify before deciding.
    pub async fn client_record(
        &self,
        cfg: &Config,
        id: &str,
    ) -> Result<Option<ClientRecord>, StateError> {
        let row = super::on_pool!(self, sql, pool => {
            let mut conn = pool.acquire().await?;
            sql::client_db(&mut conn, id).await?
        });
        Ok(row.as_ref().and_then(|r| record(cfg, r)))
    }

    /// PROTOCOL.md "Admission", steps 3 to 6, in one transaction, with the
    /// enroll key already verified (`enroll`). Registers and debits on
    /// WELCOME; a refusal changes nothing (and is not recorded here).
    pub async fn decide(
        &self,
        cfg: &Config,
        hello: &Hello,
        enroll: Option<EnrollVerdict>,
        at: Timestamp,
        connections_full: bool,
        shutting_down: bool,
    ) -> Result<Decision, StateError> {
        if let Some(c) = self.cluster() {
            return c
                .decide(cfg, hello, enroll, at, connections_full, shutting_down)
                .await;
        }
        let secret = new_secret()?;
        let mut tx = immediate(self).await?;
        let row = client_db(&mut tx, &hello.client_id).await?;
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
                let month = Month::of(at, &cfg.server.timezone);
                let since = secs(at) - REGISTRATION_WINDOW_SECS;
                let (usage, mcal, customer_clients, nth_recent_registration) = admission_reads(
                    &mut tx,
                    &self.ledger,
                    cfg,
                    &hello.client_id,
                    customer,
                    month,
                    since,
                )
                .await?;
                let snap = Snapshot {
                    client: rec.clone(),
                    customer_clients,
                    mcal,
                    usage,
                    connections_full,
                    shutting_down,
                    enroll,
                    nth_recent_registration,
                };
                admission::admit(cfg, hello, &snap, at)
            }
        };
        let adm = match decision {
            Ok(a) => a,
            Err(rejection) => {
                tx.rollback().await?;
                // Only a configured customer is recorded: a name a peer made
                // up would make a row of its own each time (the log has it).
                let customer = admission::target_customer(cfg, hello, rec.as_ref())
                    .ok()
                    .map(|c| cfg.customer(c).name.clone());
                return Ok(Decision::Rejected {
                    rejection,
                    customer,
                });
            }
        };
        let issued = match adm.registration {
            Registration::Existing => {
                sqlx::query("UPDATE clients SET last_seen = ?, hostname = COALESCE(?, hostname) WHERE id = ?")
                    .bind(secs(at))
                    .bind(hello.hostname.as_deref())
                    .bind(&hello.client_id)
                    .execute(&mut *tx)
                    .await?;
                None
            }
            Registration::Readmitted => {
                sqlx::query(
                    // sqlx numbers a bare `?` by its own count: never mix
                    // it with `?N` in one statement.
                    "UPDATE clients SET secret_sha256 = ?1, removed_at = NULL, readmit_sha256 = NULL,
                       readmit_expires = NULL, registered_at = ?2, last_seen = ?2,
                       hostname = COALESCE(?3, hostname) WHERE id = ?4",
                )
                .bind(admission::secret_digest(&secret).to_vec())
                .bind(secs(at))
                .bind(hello.hostname.as_deref())
                .bind(&hello.client_id)
                .execute(&mut *tx)
                .await?;
                Some(secret)
            }
            Registration::Declared | Registration::AutoAdded => {
                let declared = adm.registration == Registration::Declared;
                upsert_registration(
                    &mut tx,
                    cfg,
                    &hello.client_id,
                    adm.customer,
                    adm.kind,
                    &secret,
                    declared,
                    hello.hostname.as_deref(),
                    at,
                )
                .await?;
                Some(secret)
            }
        };
        if let Some((month, cost)) = adm.mcal_debit {
            insert_debit(
                &mut tx,
                cfg,
                &hello.client_id,
                adm.customer,
                month,
                cost,
                at,
            )
            .await?;
        }
        tx.commit().await?;
        Ok(Decision::Admitted {
            admitted: adm,
            secret: issued,
        })
    }

    /// Admission with the enroll key verified first by `verify` (the
    /// daemon's small pool of blocking threads), outside the transaction;
    /// verified again if the record changed in between.
    pub async fn admit_verified<F, Fut>(
        &self,
        cfg: &Config,
        hello: &Hello,
        at: Timestamp,
        connections_full: bool,
        shutting_down: bool,
        verify: F,
    ) -> Result<Decision, StateError>
    where
        F: Fn(PhcHash, String) -> Fut,
        Fut: Future<Output = Option<bool>>,
    {
        let busy = || Decision::Rejected {
            rejection: Rejection::new(
                RejectCode::Busy,
                "too many enrollments are being checked right now; try again shortly",
            ),
            customer: None,
        };
        let check = |customer: CustomerId| {
            let hash = cfg.customer(customer).enroll_key.clone();
            let key = hello.enroll_key.clone().unwrap_or_default();
            let fut = hash.map(|h| verify(h, key));
            async move {
                let ok = match fut {
                    Some(f) => f.await?,
                    None => true,
                };
                Some(EnrollVerdict { customer, ok })
            }
        };
        let rec = self.client_record(cfg, &hello.client_id).await?;
        let mut enroll = match admission::enroll_key_target(cfg, hello, rec.as_ref()) {
            Some((c, _)) => match check(c).await {
                Some(v) => Some(v),
                None => return Ok(busy()),
            },
            None => None,
        };
        for _ in 0..VERIFY_ROUNDS {
            match self
                .decide(cfg, hello, enroll, at, connections_full, shutting_down)
                .await?
            {
                Decision::Verify(c) => match check(c).await {
                    Some(v) => enroll = Some(v),
                    None => return Ok(busy()),
                },
                d => return Ok(d),
            }
        }
        Ok(Decision::Rejected {
            rejection: Rejection::new(
                RejectCode::Busy,
                "this client's registration kept changing; try again",
            ),
            customer: None,
        })
    }

    /// PROTOCOL.md "Admission" as one call: verifies the enroll key on a
    /// blocking thread, decides, and records a refusal at once. For tests
    /// and tools; the daemon uses [`State::admit_verified`] and records
    /// refusals through its own refusal path.
    pub async fn admit(
        &self,
        cfg: &Config,
        hello: &Hello,
        peer: Option<IpAddr>,
        at: Timestamp,
        connections_full: bool,
        shutting_down: bool,
    ) -> Result<AdmitOutcome, StateError> {
        if let Err(r) = admission::check_syntax(hello)
            .and_then(|_| admission::check_capacity(connections_full, shutting_down))
        {
            let customer = hello
                .customer
                .as_deref()
                .filter(|n| cfg.customer_by_name(n).is_some());
            self.record_refusal(at, &hello.client_id, customer, r.code, peer)
                .await?;
            return Ok(AdmitOutcome::Rejected(r));
        }
        let d = self
            .admit_verified(
                cfg,
                hello,
                at,
                connections_full,
                shutting_down,
                |hash, key| async move {
                    tokio::task::spawn_blocking(move || hash.verify(&key))
                        .await
                        .ok()
                },
            )
            .await?;
        match d {
            Decision::Admitted { admitted, secret } => {
                Ok(AdmitOutcome::Admitted { admitted, secret })
            }
            Decision::Rejected {
                rejection,
                customer,
            } => {
                self.record_refusal(
                    at,
                    &hello.client_id,
                    customer.as_deref(),
                    rejection.code,
                    peer,
                )
                .await?;
                Ok(AdmitOutcome::Rejected(rejection))
            }
            Decision::Verify(_) => Err(StateError::Inconsistent(
                "admission asked for an enroll key that was already verified".into(),
            )),
        }
    }

    /// Registers `id` under `customer` if a client slot is free, returning
    /// the issued secret.
    pub async fn register_client(
        &self,
        cfg: &Config,
        id: &str,
        customer: CustomerId,
        kind: Kind,
        hostname: Option<&str>,
        at: Timestamp,
    ) -> Result<Result<String, Rejection>, StateError> {
        let secret = new_secret()?;
        super::in_tx!(self, sql, tx => {
            sql::lock_admission(&mut tx, id, Some((cfg, customer)), false).await?;
            if let Some(row) = sql::client_db(&mut tx, id).await?
                && (row.secret_sha256.is_some() || row.id != id)
            {
                return Ok(Err(Rejection::new(
                    RejectCode::BadRequest,
                    format!("client {:?} is already registered", row.id),
                )));
            }
            let cust = cfg.customer(customer);
            if admission::client_limit_reached(cust, sql::slot_count(&mut tx, cfg, customer).await?) {
                return Ok(Err(Rejection::new(
                    RejectCode::ClientLimit,
                    format!("customer {:?} has reached its limit of clients", cust.name),
                )));
            }
            let declared = cfg.declared_client(id).is_some();
            sql::upsert_registration(
                &mut tx, cfg, id, customer, kind, &secret, declared, hostname, at,
            )
            .await?;
            tx.commit().await?;
            Ok(Ok(secret.clone()))
        })
    }

    /// `tollgate clients readmit ID`: gives `id` a one-time readmit key,
    /// valid for [`READMIT_VALID_SECS`]; its next HELLO presents it as
    /// `enroll_key` and gets a new secret, keeping its customer, files and
    /// MCAL history. Serves a removed client (files kept) and one that lost
    /// its secret. A new key replaces an unused one.
    pub async fn readmit(&self, id: &str, at: Timestamp) -> Result<Readmit, StateError> {
        let key = new_secret()?;
        super::in_tx!(self, sql, tx => {
            sql::lock_admission(&mut tx, id, None, false).await?;
            let Some(row) = sql::client_db(&mut tx, id).await? else {
                return Ok(Readmit::NoSuchClient);
            };
            if row.secret_sha256.is_none() && row.removed_at.is_none() {
                return Ok(Readmit::NeverConnected(row.id));
            }
            sqlx::query("UPDATE clients SET readmit_sha256 = $1, readmit_expires = $2 WHERE id = $3")
                .bind(admission::secret_digest(&key).to_vec())
                .bind(secs(at) + READMIT_VALID_SECS)
                .bind(&row.id)
                .execute(&mut *tx)
                .await?;
            sql::record_event(&mut tx, at, &row.id, "readmitted", None).await?;
            tx.commit().await?;
            Ok(Readmit::Key {
                id: row.id,
                key: key.clone(),
                expires: Timestamp::from_second(secs(at) + READMIT_VALID_SECS).unwrap_or(at),
            })
        })
    }
}

/// What `clients readmit` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readmit {
    /// The one-time key, shown once.
    Key {
        /// The client id as registered.
        id: String,
        /// The key, for HELLO's `enroll_key`.
        key: String,
        /// When it stops working.
        expires: Timestamp,
    },
    /// No client has that id.
    NoSuchClient,
    /// A declared client that never connected: it enrolls with its
    /// customer's enroll key instead.
    NeverConnected(String),
}
