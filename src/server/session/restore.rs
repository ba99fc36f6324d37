//! LIST, GET and DELETE (PROTOCOL.md "LIST → LISTING", "Download",
//! "DELETE → DELETED"). Every frame goes out through [`Session::send`], so a
//! long listing or download still ends on deactivation, removal, shutdown,
//! or a peer that stops reading.

use super::{Flow, Session, SessionError};
use crate::storage;
use crate::wire::{self, Frame, Kind};
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tracing::warn;

/// Bytes of JSON a LISTING may hold at most, below `max_frame`.
const LISTING_MARGIN: usize = 64;
/// Index rows read per query while listing.
const LIST_BATCH: u32 = 1000;

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    pub(super) async fn list(&mut self, payload: &[u8]) -> Result<Flow, SessionError> {
        let req: wire::List = wire::parse(payload).map_err(SessionError::BadRequest)?;
        let prefix = req.prefix.unwrap_or_default();
        let budget = self.bind.cfg.server.max_frame as usize - LISTING_MARGIN;
        let mut after: Option<String> = None;
        let mut page: Vec<wire::Entry> = Vec::new();
        let mut used = 0;
        loop {
            let rows = self
                .bind
                .ctx
                .state
                .list_files(&self.bind.client, &prefix, after.as_deref(), LIST_BATCH)
                .await?;
            let last_batch = rows.len() < LIST_BATCH as usize;
            after = rows.last().map(|r| r.path.clone());
            for r in rows {
                let e = wire::Entry {
                    path: r.path,
                    size: r.size.max(0) as u64,
                    sha256: r.sha256,
                    modified: wire::rfc3339(r.modified),
                    mode: r.mode.and_then(|m| u32::try_from(m).ok()),
                    mtime: r.mtime,
                };
                let len = serde_json::to_vec(&e).map(|v| v.len() + 1).unwrap_or(0);
                if used + len > budget && !page.is_empty() {
                    let full = std::mem::take(&mut page);
                    let listing = wire::Listing {
                        entries: full,
                        more: true,
                    };
                    match self.send(Frame::json(Kind::Listing, &listing)).await? {
                        Flow::Continue => {}
                        other => return Ok(other),
                    }
                    used = 0;
                }
                used += len;
                page.push(e);
            }
            if last_batch {
                break;
            }
        }
        self.send(Frame::json(
            Kind::Listing,
            &wire::Listing {
                entries: page,
                more: false,
            },
        ))
        .await
    }

    pub(super) async fn get(&mut self, payload: &[u8]) -> Result<Flow, SessionError> {
        let req: wire::PathOnly = wire::parse(payload).map_err(SessionError::BadRequest)?;
        storage::validate_path(&req.path)?;
        let ctx = self.bind.ctx.clone();
        let Some(entry) = ctx.state.file(&self.bind.client, &req.path).await? else {
            return Err(SessionError::NotFound(req.path));
        };
        let path = storage::client_dir(&self.bind.cfg, self.bind.customer(), &self.bind.client)
            .join(&req.path);
        let mut file = tokio::fs::File::open(&path)
            .await
            .map_err(SessionError::Storage)?;
        let len = file.metadata().await.map_err(SessionError::Storage)?.len();
        if len != entry.size as u64 {
            return Err(SessionError::Storage(std::io::Error::other(format!(
                "{} is {len} bytes, the index says {}",
                path.display(),
                entry.size
            ))));
        }
        let info = wire::FileInfo {
            path: req.path,
            size: len,
            sha256: entry.sha256,
            mode: entry.mode.and_then(|m| u32::try_from(m).ok()),
            mtime: entry.mtime,
        };
        match self.send(Frame::json(Kind::File, &info)).await? {
            Flow::Continue => {}
            other => return Ok(other),
        }
        use sha2::Digest;
        let mut hasher = sha2::Sha256::new();
        let chunk = self.bind.cfg.server.max_frame as usize;
        let mut sent = 0u64;
        while sent < len {
            let want = chunk.min((len - sent) as usize);
            let mut buf = vec![0u8; want];
            // A read failure mid-file cannot be reported in band (FILE is
            // out): end the connection so the client sees a short transfer.
            if let Err(e) = file.read_exact(&mut buf).await {
                warn!(error = %e, "reading a stored file failed mid-transfer");
                return Ok(Flow::Closed);
            }
            hasher.update(&buf);
            sent += want as u64;
            self.stats.bytes_out += want as u64;
            metrics::counter!(crate::metrics::BYTES_OUT).increment(want as u64);
            let data = Frame {
                kind: Kind::Data,
                payload: Bytes::from(buf),
            };
            match self.send(data).await? {
                Flow::Continue => {}
                other => return Ok(other),
            }
        }
        let digest: String = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        self.send(Frame::json(Kind::End, &wire::End { sha256: digest }))
            .await
    }

    pub(super) async fn delete(&mut self, payload: &[u8]) -> Result<Flow, SessionError> {
        let req: wire::PathOnly = wire::parse(payload).map_err(SessionError::BadRequest)?;
        storage::validate_path(&req.path)?;
        let ctx = self.bind.ctx.clone();
        let root = storage::client_dir(&self.bind.cfg, self.bind.customer(), &self.bind.client);
        let path = root.join(&req.path);
        let freed = {
            // A commit of the same path finishes first, so the index and the
            // disk agree whichever comes second.
            let _lock = ctx.path_locks.lock(&self.bind.client, &req.path).await;
            // And across the nodes of a cluster (on an early return, the
            // lock's connection is closed, which releases it).
            let across = match ctx.state.cluster() {
                Some(c) => Some(c.lock_path(&self.bind.client, &req.path).await?),
                None => None,
            };
            let Some(freed) = ctx.state.delete_file(&self.bind.client, &req.path).await? else {
                return Err(SessionError::NotFound(req.path));
            };
            let p = path.clone();
            let removed = tokio::task::spawn_blocking(move || {
                let r = std::fs::remove_file(&p);
                storage::remove_empty_parents(&p, &root);
                r
            })
            .await
            .map_err(|e| std::io::Error::other(e.to_string()));
            match removed {
                Ok(Err(e)) | Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    warn!(error = %e, "removing a deleted file failed");
                }
                _ => {}
            }
            if let Some(l) = across
                && let Err(e) = l.unlock().await
            {
                warn!(error = %e, "releasing a path's cluster lock failed; its connection is closed instead");
            }
            freed
        };
        self.send(Frame::json(
            Kind::Deleted,
            &wire::Deleted {
                path: req.path,
                freed,
            },
        ))
        .await
    }
}
