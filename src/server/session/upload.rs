//! Uploads (PROTOCOL.md "Upload: PUT, DATA…, END → STORED or ERROR"): the
//! reservation at PUT, the throttled DATA (discarded DATA included), and
//! the durable commit at END under the path's lock, so racing PUTs of one
//! path commit in order and the index names the file on disk.

use super::{Flow, Session, SessionError};
use crate::policy::admission::Intent;
use crate::storage::{self, PipedTemp};
use crate::wire::{self, Frame, Kind};
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::warn;

/// An upload in flight.
pub(super) struct Upload {
    path: String,
    size: u64,
    meta: storage::FileMeta,
    temp: PipedTemp,
    reservation: i64,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    pub(super) async fn put(&mut self, payload: &[u8]) -> Result<Flow, SessionError> {
        // Until this PUT is accepted, its DATA and END are to be swallowed.
        self.discarding = true;
        self.bind.throttle.start_upload();
        let put: wire::Put = wire::parse(payload).map_err(SessionError::BadRequest)?;
        if self.bind.adm.intent == Intent::Restore {
            return Err(SessionError::BadRequest(
                "a restore session cannot upload".into(),
            ));
        }
        // PROTOCOL.md Additions, "File size".
        if put.size > crate::config::limits::MAX_FILE_SIZE_LIMIT {
            return Err(SessionError::BadRequest(
                "field `size`: must be an integer from 0 to 2^63 - 1".into(),
            ));
        }
        let max = self.bind.cfg.server.limits.max_file_size;
        if put.size > max {
            self.note_quota_refusal();
            return Err(SessionError::Quota(format!(
                "a file of {} bytes is larger than the {max} bytes a file may have",
                put.size
            )));
        }
        storage::validate_path(&put.path)?;
        let (mode, mtime) = put.checked_meta().map_err(SessionError::BadRequest)?;
        let cfg = &self.bind.cfg;
        let res = self
            .bind
            .ctx
            .state
            .reserve_space(cfg, &self.bind.client, put.size, crate::clock::now())
            .await?;
        if res.is_err() {
            self.note_quota_refusal();
        }
        let reservation = res.map_err(|q| {
            SessionError::Quota(format!(
                "{q}; this file needs {}",
                crate::config::units::format_size(put.size)
            ))
        })?;
        let temp = match PipedTemp::create(&storage::temp_dir(cfg, self.bind.customer())).await {
            Ok(t) => t,
            Err(e) => {
                self.release(reservation).await;
                return Err(SessionError::Storage(e));
            }
        };
        self.discarding = false;
        self.upload = Some(Upload {
            path: put.path,
            size: put.size,
            meta: storage::FileMeta { mode, mtime },
            temp,
            reservation,
        });
        Ok(Flow::Continue)
    }

    pub(super) async fn data(&mut self, payload: Bytes) -> Result<Flow, SessionError> {
        let n = payload.len() as u64;
        self.stats.bytes_in += n;
        metrics::counter!(crate::metrics::BYTES_IN).increment(n);
        if !self.discarding {
            let Some(up) = self.upload.as_mut() else {
                return Err(SessionError::Protocol("DATA outside an upload".into()));
            };
            if up.temp.size().saturating_add(n) > up.size {
                let size = up.size;
                self.fail_upload(true).await;
                self.pay(n).await;
                return Err(SessionError::SizeMismatch(format!(
                    "more than the {size} bytes PUT announced"
                )));
            }
            if let Err(e) = up.temp.write(payload).await {
                self.fail_upload(true).await;
                self.pay(n).await;
                return Err(SessionError::Storage(e));
            }
        }
        // PROTOCOL.md Upload: the next frame is not read before these bytes
        // are paid for, so TCP backpressure slows the client. Discarded
        // DATA pays too (PROTOCOL.md Additions): an upload that failed on
        // purpose must not be a way around the rate.
        self.pay(n).await;
        Ok(Flow::Continue)
    }

    /// Pays for `n` bytes read. This wait is not idle time: the idle timer
    /// only runs while awaiting a frame. A notice (deactivation, removal,
    /// reload) must not wait for a slow payment: it interrupts it and is
    /// handled before the next frame; an interrupted payment is not
    /// resumed, the rates are resolved anew.
    async fn pay(&mut self, n: u64) {
        let Session {
            bind,
            events,
            pending,
            ..
        } = self;
        tokio::select! {
            _ = bind.throttle.consume(n) => {}
            Some(notice) = events.recv() => *pending = Some(notice),
        }
    }

    pub(super) async fn end_upload(&mut self, payload: &[u8]) -> Result<Flow, SessionError> {
        if self.discarding {
            self.discarding = false;
            return Ok(Flow::Continue);
        }
        let Some(up) = self.upload.take() else {
            return Err(SessionError::Protocol("END outside an upload".into()));
        };
        let end: wire::End = match wire::parse(payload) {
            Ok(e) => e,
            Err(msg) => {
                self.upload = Some(up);
                self.fail_upload(false).await;
                return Err(SessionError::BadRequest(msg));
            }
        };
        if up.temp.size() != up.size {
            let (got, want) = (up.temp.size(), up.size);
            self.upload = Some(up);
            self.fail_upload(false).await;
            return Err(SessionError::SizeMismatch(format!(
                "END after {got} of the {want} bytes PUT announced"
            )));
        }
        let reservation = up.reservation;
        let ended = std::time::Instant::now();
        let synced = match up.temp.sync().await {
            Ok(s) => s,
            Err(e) => {
                self.release(reservation).await;
                self.stats.files_failed += 1;
                return Err(SessionError::Storage(e));
            }
        };
        if !synced.sha256.eq_ignore_ascii_case(&end.sha256) {
            let _ = std::fs::remove_file(&synced.path);
            self.release(reservation).await;
            self.stats.files_failed += 1;
            return Err(SessionError::Checksum {
                computed: synced.sha256,
                sent: crate::state::truncate(&end.sha256, 64).to_string(),
            });
        }
        let info = wire::FileInfo {
            path: up.path.clone(),
            size: synced.size,
            sha256: synced.sha256.clone(),
            mode: up.meta.mode,
            mtime: up.meta.mtime.clone(),
        };
        let ctx = self.bind.ctx.clone();
        let r = {
            let _path = ctx.path_locks.lock(&self.bind.client, &up.path).await;
            // And across the nodes of a cluster (after this node's own, so
            // one session per path per node waits on the database).
            let across = match ctx.state.cluster() {
                Some(c) => match c.lock_path(&self.bind.client, &up.path).await {
                    Ok(l) => Some(l),
                    Err(e) => {
                        self.release(reservation).await;
                        self.stats.files_failed += 1;
                        return Err(SessionError::Internal(e));
                    }
                },
                None => None,
            };
            let r = storage::commit(
                &ctx.state,
                &self.bind.cfg,
                self.bind.customer(),
                &self.bind.client,
                &up.path,
                synced,
                Some(reservation),
                up.meta.clone(),
                crate::clock::now(),
                &mut |_| {},
            )
            .await;
            if let Some(l) = across
                && let Err(e) = l.unlock().await
            {
                warn!(error = %e, "releasing a path's cluster lock failed; its connection is closed instead");
            }
            r
        };
        match r {
            Ok(_) => {
                self.stats.files_ok += 1;
                metrics::histogram!(crate::metrics::COMMIT_SECONDS)
                    .record(ended.elapsed().as_secs_f64());
                self.send(Frame::json(Kind::Stored, &info)).await
            }
            Err(storage::CommitError::Io(e)) => {
                self.stats.files_failed += 1;
                Err(SessionError::Storage(e))
            }
            Err(storage::CommitError::State(e)) => {
                self.stats.files_failed += 1;
                Err(SessionError::Internal(e))
            }
        }
    }

    /// Discards the upload in flight after an error. Before its END the
    /// rest of its DATA and its END are then swallowed.
    async fn fail_upload(&mut self, before_end: bool) {
        self.abandon_upload().await;
        self.stats.files_failed += 1;
        self.discarding = before_end;
    }

    /// Discards an upload cut short by the session's end (a BYE, a closed
    /// connection, a notice): it counts as a failed file.
    pub(super) async fn drop_in_flight(&mut self) {
        if self.upload.is_some() {
            self.stats.files_failed += 1;
            self.abandon_upload().await;
        }
    }

    /// Records a PUT refused with `quota_exceeded` with the refused HELLOs,
    /// for the daily digest to the reseller or admin (docs/email.md
    /// "Refusal digest").
    fn note_quota_refusal(&self) {
        let name = &self.bind.cfg.customer(self.bind.customer()).name;
        if !self.bind.ctx.state.note_refusal(
            crate::clock::now(),
            Some(self.bind.peer),
            Some(&self.bind.client),
            Some(name),
            crate::wire::ErrorCode::QuotaExceeded.as_str(),
        ) {
            metrics::counter!(crate::metrics::REFUSALS_UNRECORDED).increment(1);
        }
    }

    /// Discards the upload in flight, if any: temp file and reservation.
    pub(super) async fn abandon_upload(&mut self) {
        if let Some(up) = self.upload.take() {
            // Not awaited: the pool removes the file when it gets to it,
            // and a slow disk must not hold the session (dropping queues
            // the discard).
            drop(up.temp);
            self.release(up.reservation).await;
        }
    }

    /// Releases a reservation; a failure is logged and counted (the space
    /// stays held until the next start, which drops every reservation).
    async fn release(&self, reservation: i64) {
        if let Err(e) = self.bind.ctx.state.release_reservation(reservation).await {
            warn!(error = %e, reservation, "releasing a reservation failed");
            metrics::counter!(crate::metrics::RESERVATIONS_LEAKED).increment(1);
        }
    }
}
