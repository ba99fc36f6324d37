//! One connection, from TLS handshake to BYE (PROTOCOL.md Session).
//!
//! Requests are handled strictly in order, which is what makes pipelining
//! work: a client may send PUT, DATA…, END, PUT … without waiting, and the
//! replies come back in the same order. After an ERROR answering an upload,
//! the rest of that upload's DATA and its END are swallowed silently.

use super::{Context, Notice, Phase};
use crate::config::{Config, CustomerId, DeclaredClientId};
use crate::policy::admission::{Admitted, Intent, RejectCode};
use crate::state::{AdmitOutcome, ClientEvent, SessionEnd, SessionStart, StateError};
use crate::storage::{self, BadPath, PipedTemp};
use crate::throttle::{SessionThrottle, TimeBase};
use crate::wire::{self, CodecError, ErrorBody, ErrorCode, Frame, FrameCodec, Kind};
use arc_swap::ArcSwap;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout, timeout_at};
use tokio_rustls::server::TlsStream;
use tokio_util::codec::Framed;
use tracing::{Instrument, debug, info, info_span, warn};

type Conn = Framed<TlsStream<TcpStream>, FrameCodec>;

/// Bytes of JSON a LISTING may hold at most, below `max_frame`.
const LISTING_MARGIN: usize = 64;
/// Index rows read per query while listing.
const LIST_BATCH: u32 = 1000;

/// A peer-facing failure: one variant per ERROR code. The `Display` text is
/// for the log; [`SessionError::wire`] is what the peer sees.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("bad path: {0}")]
    BadPath(#[from] BadPath),
    #[error("quota exceeded: {0} bytes left")]
    Quota(u64),
    #[error("size mismatch: {0}")]
    SizeMismatch(String),
    #[error("checksum mismatch: computed {computed}, client sent {sent}")]
    Checksum { computed: String, sent: String },
    #[error("not found: {0}")]
    NotFound(String),
    #[error("storage: {0}")]
    Storage(std::io::Error),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("internal: {0}")]
    Internal(#[from] StateError),
}

impl SessionError {
    fn code(&self) -> ErrorCode {
        match self {
            SessionError::BadRequest(_) => ErrorCode::BadRequest,
            SessionError::BadPath(_) => ErrorCode::BadPath,
            SessionError::Quota(_) => ErrorCode::QuotaExceeded,
            SessionError::SizeMismatch(_) => ErrorCode::SizeMismatch,
            SessionError::Checksum { .. } => ErrorCode::ChecksumMismatch,
            SessionError::NotFound(_) => ErrorCode::NotFound,
            SessionError::Storage(_) => ErrorCode::StorageError,
            SessionError::Protocol(_) => ErrorCode::ProtocolViolation,
            SessionError::Internal(_) => ErrorCode::Internal,
        }
    }

    fn fatal(&self) -> bool {
        matches!(self, SessionError::Protocol(_))
    }

    /// Safe for the peer: no paths, no internals.
    fn wire(&self) -> ErrorBody {
        let message = match self {
            SessionError::Storage(_) => {
                "the server could not store or read the file; the upload was discarded".to_string()
            }
            SessionError::Internal(_) => {
                "an internal error occurred; the request was not carried out".to_string()
            }
            SessionError::Checksum { .. } => {
                "the SHA-256 of the received bytes differs from END's; the upload was discarded"
                    .to_string()
            }
            other => other.to_string(),
        };
        ErrorBody {
            code: self.code().as_str().into(),
            message,
            fatal: self.fatal(),
        }
    }
}

fn error_frame(code: ErrorCode, message: &str, fatal: bool) -> Frame {
    Frame::json(
        Kind::Error,
        &ErrorBody {
            code: code.as_str().into(),
            message: message.into(),
            fatal,
        },
    )
}

fn reject_frame(code: RejectCode, message: &str) -> Frame {
    Frame::json(
        Kind::Reject,
        &wire::Reject {
            code: code.as_str().into(),
            message: message.into(),
        },
    )
}

fn bye(reason: Option<&str>) -> Frame {
    Frame::json(
        Kind::Bye,
        &wire::Bye {
            reason: reason.map(str::to_string),
        },
    )
}

/// The frame that answers a codec error before the connection closes.
fn codec_error_frame(e: &CodecError) -> Option<Frame> {
    match e {
        CodecError::Empty => Some(error_frame(
            ErrorCode::BadFrame,
            "a frame of length 0",
            true,
        )),
        CodecError::TooLarge(n) => Some(error_frame(
            ErrorCode::FrameTooLarge,
            &format!("a frame of length {n} is over the limit"),
            true,
        )),
        CodecError::UnknownType(t) => Some(error_frame(
            ErrorCode::ProtocolViolation,
            &format!("unknown frame type 0x{t:02x}"),
            true,
        )),
        CodecError::Io(_) => None,
    }
}

async fn handshake(ctx: &Context, tcp: TcpStream, deadline: Instant) -> Option<Conn> {
    match timeout_at(deadline, ctx.acceptor().accept(tcp)).await {
        Ok(Ok(tls)) => Some(Framed::new(
            tls,
            FrameCodec::new(ctx.cfg.load().server.max_frame),
        )),
        Ok(Err(e)) => {
            debug!(error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            debug!("TLS handshake timed out");
            None
        }
    }
}

/// Answers one connection beyond the limit with REJECT `busy`.
pub(super) async fn refuse_busy(ctx: &Context, tcp: TcpStream, peer: SocketAddr) {
    let deadline = Instant::now() + ctx.cfg.load().server.hello_timeout;
    let Some(mut conn) = handshake(ctx, tcp, deadline).await else {
        return;
    };
    let client = match timeout_at(deadline, conn.next()).await {
        Ok(Some(Ok(f))) if f.kind == Kind::Hello => wire::parse::<wire::Hello>(&f.payload)
            .map(|h| h.client_id)
            .unwrap_or_default(),
        _ => String::new(),
    };
    let _ = conn
        .send(reject_frame(
            RejectCode::Busy,
            "the server has no free connection slots; try again later",
        ))
        .await;
    let _ = ctx
        .state
        .record_refusal(
            crate::clock::now(),
            &client,
            None,
            RejectCode::Busy,
            Some(&peer.to_string()),
        )
        .await;
}

/// Runs one session to its end.
pub(super) async fn run(
    ctx: Arc<Context>,
    tcp: TcpStream,
    peer: SocketAddr,
    _permit: tokio::sync::OwnedSemaphorePermit,
) {
    let span = info_span!("session", %peer, client = tracing::field::Empty);
    async move {
        let deadline = Instant::now() + ctx.cfg.load().server.hello_timeout;
        let Some(mut conn) = handshake(&ctx, tcp, deadline).await else { return };
        let cert_names = conn.get_ref().get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| crate::tls::peer_names(c));
        let hello = match timeout_at(deadline, conn.next()).await {
            Err(_) => {
                info!(code = "timeout", "refused: no HELLO in time");
                crate::metrics::admission("timeout");
                let _ = conn.send(reject_frame(RejectCode::Timeout, "no HELLO within hello_timeout")).await;
                let _ = ctx.state.record_refusal(crate::clock::now(), "", None, RejectCode::Timeout, Some(&peer.to_string())).await;
                return;
            }
            Ok(None) => return,
            Ok(Some(Err(e))) => {
                if let Some(f) = codec_error_frame(&e) {
                    let _ = conn.send(f).await;
                }
                return;
            }
            Ok(Some(Ok(f))) => f,
        };
        let peer_s = peer.to_string();
        async fn bad(conn: &mut Conn, msg: String) {
            info!(code = "bad_request", reason = %msg, "refused");
            crate::metrics::admission("bad_request");
            let _ = conn.send(reject_frame(RejectCode::BadRequest, &msg)).await;
            let _ = conn.close().await;
        }
        if hello.kind != Kind::Hello {
            bad(&mut conn, format!("expected HELLO first, got {:?}", hello.kind)).await;
            let _ = ctx.state.record_refusal(crate::clock::now(), "", None, RejectCode::BadRequest, Some(&peer_s)).await;
            return;
        }
        let h: crate::policy::Hello = match wire::parse::<wire::Hello>(&hello.payload) {
            Ok(h) => h,
            Err(msg) => {
                bad(&mut conn, msg).await;
                let _ = ctx.state.record_refusal(crate::clock::now(), "", None, RejectCode::BadRequest, Some(&peer_s)).await;
                return;
            }
        };
        tracing::Span::current().record("client", h.client_id.as_str());
        if let Some(names) = &cert_names
            && !names.iter().any(|n| n == &h.client_id)
        {
            info!(code = "auth_failed", "refused: the client certificate does not name this client id");
            crate::metrics::admission("auth_failed");
            let _ = conn.send(reject_frame(RejectCode::AuthFailed, "the client certificate does not name this client id")).await;
            let _ = conn.close().await;
            let _ = ctx.state.record_refusal(crate::clock::now(), &h.client_id, h.customer.as_deref(), RejectCode::AuthFailed, Some(&peer_s)).await;
            return;
        }
        // Join the live set before admission and only then take the config
        // the session runs on: a reload or a move/removal from here on is
        // queued for this session, so none falls between admission and
        // serving.
        let (joined, events) = Context::join(&ctx, &h.client_id);
        let cfg = ctx.cfg.load_full();
        let draining = *ctx.phase.borrow() != Phase::Running;
        let now = crate::clock::now();
        let (adm, secret) = match ctx.state.admit(&cfg, &h, Some(&peer_s), now, false, draining).await {
            Ok(AdmitOutcome::Admitted { admitted, secret }) => (admitted, secret),
            Ok(AdmitOutcome::Rejected(r)) => {
                info!(customer = ?h.customer, code = r.code.as_str(), "refused: {}", r.message);
                crate::metrics::admission(r.code.as_str());
                let _ = conn.send(reject_frame(r.code, &r.message)).await;
                let _ = conn.close().await;
                return;
            }
            Err(e) => {
                warn!(error = %e, "admission failed");
                let _ = conn.send(error_frame(ErrorCode::Internal, "an internal error occurred", true)).await;
                return;
            }
        };
        let cust = cfg.customer(adm.customer);
        let id = session_id();
        info!(customer = %cust.name, code = "welcome", session = %id, registered = adm.issues_secret(), "admitted");
        crate::metrics::admission("welcome");
        let welcome = wire::Welcome {
            session: id.clone(),
            client_id: h.client_id.clone(),
            customer: cust.name.clone(),
            reseller: cust.reseller.map(|r| cfg.reseller(r).name.clone()),
            registered: adm.issues_secret(),
            secret,
            rate: adm.rate.rate,
            space_left: adm.space_left,
            max_frame: cfg.server.max_frame,
        };
        let intent = if adm.intent == Intent::Backup { "backup" } else { "restore" };
        let row = SessionStart {
            id: &id,
            client: &h.client_id,
            customer: &cust.name,
            schedule: &h.schedule,
            intent,
            peer: Some(&peer_s),
            at: now,
        };
        if let Err(e) = ctx.state.start_session(&row).await {
            warn!(error = %e, "recording the session failed");
        }
        if conn.send(Frame::json(Kind::Welcome, &welcome)).await.is_err() {
            return;
        }
        // The customer and config can change under a live session (`clients
        // move`, a reload); the resolver reads them together.
        let view = Arc::new(ArcSwap::from_pointee(View { cfg: cfg.clone(), customer: adm.customer, declared: adm.declared }));
        let throttle = (adm.intent == Intent::Backup).then(|| {
            let (cell, schedule) = (view.clone(), h.schedule.clone());
            let resolve: crate::throttle::Resolver = Arc::new(move |at| {
                let v = cell.load();
                (
                    crate::policy::throttle::resolve(&v.cfg, v.customer, v.declared, &schedule, at),
                    crate::policy::throttle::caps(&v.cfg, v.customer, at),
                )
            });
            SessionThrottle::new(resolve, ctx.throttles.clone(), TimeBase::now())
        });
        let started_at = Instant::now();
        let mut s = Session {
            events,
            pending: None,
            cfg,
            view,
            throttle,
            ctx: ctx.clone(),
            conn,
            client: h.client_id.clone(),
            adm,
            upload: None,
            discarding: false,
            stats: Stats::default(),
        };
        let active = metrics::gauge!(crate::metrics::ACTIVE_SESSIONS);
        active.increment(1.0);
        let result = s.serve().await;
        active.decrement(1.0);
        drop(joined);
        s.abandon_upload().await;
        let _ = s.conn.close().await;
        let end = SessionEnd {
            at: crate::clock::now(),
            bytes_in: s.stats.bytes_in,
            bytes_out: s.stats.bytes_out,
            files_ok: s.stats.files_ok,
            files_failed: s.stats.files_failed,
            result: &result,
        };
        let secs = started_at.elapsed().as_secs_f64().max(1e-3);
        let waits = s.throttle.as_ref().map(|t| t.waits).unwrap_or_default();
        crate::metrics::throttle_waits(&waits);
        info!(
            result = %result,
            bytes_in = end.bytes_in,
            files_ok = end.files_ok,
            files_failed = end.files_failed,
            average_rate = (end.bytes_in as f64 / secs) as u64,
            configured_rate = ?s.throttle.as_ref().and_then(|t| t.rate()),
            wait_session_ms = waits.session.as_millis() as u64,
            wait_customer_ms = waits.customer.as_millis() as u64,
            wait_reseller_ms = waits.reseller.as_millis() as u64,
            wait_server_ms = waits.server.as_millis() as u64,
            "session ended"
        );
        // CONFIG.md "Email reports": composed after the BYE and stored with
        // the session's end, so mail never holds a client up and a crash
        // cannot lose a report.
        let facts = crate::reports::SessionFacts {
            client: h.client_id.clone(),
            customer: s.customer(),
            schedule: h.schedule.clone(),
            intent: intent.to_string(),
            started: Some(now),
            ended: Some(end.at),
            result: result.clone(),
            files_ok: end.files_ok,
            files_failed: end.files_failed,
            files_deleted: s.stats.files_deleted,
            bytes_in: end.bytes_in,
            bytes_out: end.bytes_out,
            configured_rate: s.throttle.as_ref().and_then(|t| t.rate()),
            errors: std::mem::take(&mut s.stats.errors),
            errors_more: s.stats.errors_more,
        };
        let mail = crate::reports::session_mail(&s.cfg, &facts, end.at).unwrap_or_else(|e| {
            warn!(error = %e, "composing the session report failed");
            Vec::new()
        });
        if let Err(e) = ctx.state.end_session(&id, &end, &mail).await {
            warn!(error = %e, "recording the session end failed");
        }
        if !mail.is_empty() {
            debug!(reports = mail.len(), "session report queued");
        }
        // Deliver the report, and look at the alerts.
        ctx.mail_wake.notify_one();
    }
    .instrument(span)
    .await
}

fn session_id() -> String {
    let mut b = [0u8; 12];
    let _ = getrandom::fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[derive(Default)]
struct Stats {
    bytes_in: u64,
    bytes_out: u64,
    files_ok: u64,
    files_failed: u64,
    files_deleted: u64,
    /// What the client was told went wrong, for the e-mail report.
    errors: Vec<String>,
    errors_more: u64,
}

struct Upload {
    path: String,
    size: u64,
    temp: PipedTemp,
    reservation: i64,
}

/// What a session's throttle resolves against.
struct View {
    cfg: Arc<Config>,
    customer: CustomerId,
    declared: Option<DeclaredClientId>,
}

struct Session {
    events: tokio::sync::mpsc::UnboundedReceiver<Notice>,
    /// A notice that arrived during a throttle wait, handled next.
    pending: Option<Notice>,
    /// The session's config snapshot; `adm`'s ids index into it.
    cfg: Arc<Config>,
    view: Arc<ArcSwap<View>>,
    throttle: Option<SessionThrottle>,
    ctx: Arc<Context>,
    conn: Conn,
    client: String,
    adm: Admitted,
    upload: Option<Upload>,
    discarding: bool,
    stats: Stats,
}

impl Session {
    fn customer(&self) -> CustomerId {
        self.adm.customer
    }

    /// The request loop; returns the session's result code.
    async fn serve(&mut self) -> String {
        let mut phase = self.ctx.phase.clone();
        loop {
            let idle = self.cfg.server.idle_timeout;
            if let Some(n) = self.pending.take()
                && let Some(reason) = self.notice(n)
            {
                self.abandon_upload().await;
                let _ = self.conn.send(bye(Some(reason))).await;
                return reason.into();
            }
            let current = *phase.borrow_and_update();
            if current == Phase::Forced
                || (current == Phase::Draining && self.upload.is_none() && !self.discarding)
            {
                let _ = self.conn.send(bye(Some("shutting_down"))).await;
                return "shutting_down".into();
            }
            let next = tokio::select! {
                r = timeout(idle, self.conn.next()) => r,
                _ = phase.changed() => continue,
                Some(n) = self.events.recv() => {
                    if let Some(reason) = self.notice(n) {
                        self.abandon_upload().await;
                        let _ = self.conn.send(bye(Some(reason))).await;
                        return reason.into();
                    }
                    continue;
                }
            };
            let frame = match next {
                Err(_) => {
                    let _ = self.conn.send(bye(Some("idle_timeout"))).await;
                    return "idle_timeout".into();
                }
                Ok(None) => return "disconnected".into(),
                Ok(Some(Err(e))) => {
                    if let Some(f) = codec_error_frame(&e) {
                        warn!(error = %e, "fatal frame error");
                        let _ = self.conn.send(f).await;
                        return "protocol_error".into();
                    }
                    return "disconnected".into();
                }
                Ok(Some(Ok(f))) => f,
            };
            match self.handle(frame).await {
                Ok(Flow::Continue) => {}
                Ok(Flow::Bye) => {
                    let _ = self.conn.send(bye(None)).await;
                    return "ok".into();
                }
                Ok(Flow::Closed) => return "disconnected".into(),
                Err(e) => {
                    let fatal = e.fatal();
                    let w = e.wire();
                    if self.stats.errors.len() < crate::reports::compose::MAX_ERRORS {
                        self.stats.errors.push(format!("{}: {}", w.code, w.message));
                    } else {
                        self.stats.errors_more += 1;
                    }
                    if matches!(e, SessionError::Storage(_)) {
                        metrics::counter!(crate::metrics::STORAGE_ERRORS).increment(1);
                    }
                    if matches!(e, SessionError::Storage(_) | SessionError::Internal(_)) {
                        warn!(error = %e, "request failed");
                    } else {
                        info!(code = e.code().as_str(), "{e}");
                    }
                    if self
                        .conn
                        .send(Frame::json(Kind::Error, &e.wire()))
                        .await
                        .is_err()
                    {
                        return "disconnected".into();
                    }
                    if fatal {
                        return e.code().as_str().into();
                    }
                }
            }
        }
    }

    /// Applies a move or removal made by an admin command, or a reload;
    /// returns the BYE reason when the session must end (PROTOCOL.md
    /// Session 4, CONFIG.md "Activation").
    fn notice(&mut self, n: Notice) -> Option<&'static str> {
        let cfg = self.ctx.cfg.load_full();
        let customer = match n {
            Notice::Client(ClientEvent::Removed) => return Some("client_removed"),
            Notice::Client(ClientEvent::Moved(name)) => {
                info!(customer = %name, "client moved; following it");
                cfg.customer_by_name(&name)
            }
            Notice::Reloaded => match cfg.declared_client(&self.client) {
                Some(d) => Some(cfg.client(d).customer),
                None => cfg.customer_by_name(&self.cfg.customer(self.adm.customer).name),
            },
        };
        let Some(c) = customer else {
            info!("the client's customer is gone from the configuration");
            return Some("customer_deactivated");
        };
        let cust = cfg.customer(c);
        if !cust.activated || cust.reseller.is_some_and(|r| !cfg.reseller(r).activated) {
            info!(customer = %cust.name, "customer or reseller deactivated; ending the session");
            return Some("customer_deactivated");
        }
        self.adm.customer = c;
        self.adm.reseller = cust.reseller;
        self.adm.declared = cfg.declared_client(&self.client);
        self.view.store(Arc::new(View {
            cfg: cfg.clone(),
            customer: c,
            declared: self.adm.declared,
        }));
        self.cfg = cfg;
        if let Some(t) = self.throttle.as_mut() {
            t.invalidate();
        }
        None
    }

    async fn handle(&mut self, f: Frame) -> Result<Flow, SessionError> {
        match f.kind {
            Kind::Data => self.data(f.payload).await,
            Kind::End => self.end(&f.payload).await,
            _ if self.discarding => {
                // The client moved on without finishing the failed upload.
                self.discarding = false;
                Box::pin(self.handle(f)).await
            }
            _ if self.upload.is_some() => {
                self.abandon_upload().await;
                Err(SessionError::Protocol(format!(
                    "{:?} in the middle of an upload",
                    f.kind
                )))
            }
            Kind::Put => self.put(&f.payload).await,
            Kind::List => self.list(&f.payload).await,
            Kind::Get => self.get(&f.payload).await,
            Kind::Delete => self.delete(&f.payload).await,
            Kind::Bye => Ok(Flow::Bye),
            Kind::Hello => Err(SessionError::BadRequest(
                "HELLO was already answered".into(),
            )),
            other => Err(SessionError::Protocol(format!(
                "a client does not send {other:?}"
            ))),
        }
    }

    async fn put(&mut self, payload: &[u8]) -> Result<Flow, SessionError> {
        // Until this PUT is accepted, its DATA and END are to be swallowed.
        self.discarding = true;
        let put: wire::Put = wire::parse(payload).map_err(SessionError::BadRequest)?;
        if self.adm.intent == Intent::Restore {
            return Err(SessionError::BadRequest(
                "a restore session cannot upload".into(),
            ));
        }
        storage::validate_path(&put.path)?;
        let cfg = &self.cfg;
        let res = self
            .ctx
            .state
            .reserve_space(cfg, &self.client, put.size, crate::clock::now())
            .await?;
        let reservation = res.map_err(|q| SessionError::Quota(q.left))?;
        let temp = match PipedTemp::create(&storage::temp_dir(cfg, self.customer())) {
            Ok(t) => t,
            Err(e) => {
                let _ = self.ctx.state.release_reservation(reservation).await;
                return Err(SessionError::Storage(e));
            }
        };
        self.discarding = false;
        self.upload = Some(Upload {
            path: put.path,
            size: put.size,
            temp,
            reservation,
        });
        Ok(Flow::Continue)
    }

    async fn data(&mut self, payload: Bytes) -> Result<Flow, SessionError> {
        self.stats.bytes_in += payload.len() as u64;
        metrics::counter!(crate::metrics::BYTES_IN).increment(payload.len() as u64);
        if self.discarding {
            return Ok(Flow::Continue);
        }
        let Some(up) = self.upload.as_mut() else {
            return Err(SessionError::Protocol("DATA outside an upload".into()));
        };
        if up.temp.size() + payload.len() as u64 > up.size {
            let size = up.size;
            self.fail_upload(true).await;
            return Err(SessionError::SizeMismatch(format!(
                "more than the {size} bytes PUT announced"
            )));
        }
        let payload_len = payload.len() as u64;
        if let Err(e) = up.temp.write(payload).await {
            self.fail_upload(true).await;
            return Err(SessionError::Storage(e));
        }
        // PROTOCOL.md Upload: the next frame is not read before these bytes
        // are paid for, so TCP backpressure slows the client. This wait is
        // not idle time: the idle timer only runs while awaiting a frame.
        // A notice (deactivation, removal, reload) must not wait for a slow
        // payment: it interrupts it and is handled before the next frame. An
        // interrupted payment is not resumed; the rates are resolved anew.
        if let Some(t) = self.throttle.as_mut() {
            tokio::select! {
                _ = t.consume(payload_len) => {}
                Some(n) = self.events.recv() => self.pending = Some(n),
            }
        }
        Ok(Flow::Continue)
    }

    async fn end(&mut self, payload: &[u8]) -> Result<Flow, SessionError> {
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
        let state = self.ctx.state.clone();
        let reservation = up.reservation;
        let synced = match up.temp.sync().await {
            Ok(s) => s,
            Err(e) => {
                let _ = state.release_reservation(reservation).await;
                self.stats.files_failed += 1;
                return Err(SessionError::Storage(e));
            }
        };
        if !synced.sha256.eq_ignore_ascii_case(&end.sha256) {
            let _ = std::fs::remove_file(&synced.path);
            let _ = state.release_reservation(reservation).await;
            self.stats.files_failed += 1;
            return Err(SessionError::Checksum {
                computed: synced.sha256,
                sent: end.sha256,
            });
        }
        let info = wire::FileInfo {
            path: up.path.clone(),
            size: synced.size,
            sha256: synced.sha256.clone(),
        };
        let r = storage::commit(
            &state,
            &self.cfg,
            self.customer(),
            &self.client,
            &up.path,
            synced,
            Some(reservation),
            crate::clock::now(),
            &mut |_| {},
        )
        .await;
        match r {
            Ok(_) => {
                self.stats.files_ok += 1;
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

    async fn list(&mut self, payload: &[u8]) -> Result<Flow, SessionError> {
        let req: wire::List = wire::parse(payload).map_err(SessionError::BadRequest)?;
        let prefix = req.prefix.unwrap_or_default();
        let budget = self.cfg.server.max_frame as usize - LISTING_MARGIN;
        let mut after: Option<String> = None;
        let mut page: Vec<wire::Entry> = Vec::new();
        let mut used = 0;
        loop {
            let rows = self
                .ctx
                .state
                .list_files(&self.client, &prefix, after.as_deref(), LIST_BATCH)
                .await?;
            let last_batch = rows.len() < LIST_BATCH as usize;
            after = rows.last().map(|r| r.path.clone());
            for r in rows {
                let e = wire::Entry {
                    path: r.path,
                    size: r.size.max(0) as u64,
                    sha256: r.sha256,
                    modified: wire::rfc3339(r.modified),
                };
                let len = serde_json::to_vec(&e).map(|v| v.len() + 1).unwrap_or(0);
                if used + len > budget && !page.is_empty() {
                    let full = std::mem::take(&mut page);
                    if let Flow::Closed = self
                        .send(Frame::json(
                            Kind::Listing,
                            &wire::Listing {
                                entries: full,
                                more: true,
                            },
                        ))
                        .await?
                    {
                        return Ok(Flow::Closed);
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

    async fn get(&mut self, payload: &[u8]) -> Result<Flow, SessionError> {
        let req: wire::PathOnly = wire::parse(payload).map_err(SessionError::BadRequest)?;
        storage::validate_path(&req.path)?;
        let Some(entry) = self.ctx.state.file(&self.client, &req.path).await? else {
            return Err(SessionError::NotFound(req.path));
        };
        let path = storage::client_dir(&self.cfg, self.customer(), &self.client).join(&req.path);
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
        };
        if let Flow::Closed = self.send(Frame::json(Kind::File, &info)).await? {
            return Ok(Flow::Closed);
        }
        use sha2::Digest;
        let mut hasher = sha2::Sha256::new();
        let chunk = self.cfg.server.max_frame as usize;
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
            if let Flow::Closed = self
                .send(Frame {
                    kind: Kind::Data,
                    payload: Bytes::from(buf),
                })
                .await?
            {
                return Ok(Flow::Closed);
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

    async fn delete(&mut self, payload: &[u8]) -> Result<Flow, SessionError> {
        let req: wire::PathOnly = wire::parse(payload).map_err(SessionError::BadRequest)?;
        storage::validate_path(&req.path)?;
        let Some(freed) = self.ctx.state.delete_file(&self.client, &req.path).await? else {
            return Err(SessionError::NotFound(req.path));
        };
        self.stats.files_deleted += 1;
        let path = storage::client_dir(&self.cfg, self.customer(), &self.client).join(&req.path);
        if let Err(e) = std::fs::remove_file(&path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            warn!(error = %e, "removing a deleted file failed");
        }
        self.send(Frame::json(
            Kind::Deleted,
            &wire::Deleted {
                path: req.path,
                freed,
            },
        ))
        .await
    }

    async fn send(&mut self, f: Frame) -> Result<Flow, SessionError> {
        match self.conn.send(f).await {
            Ok(()) => Ok(Flow::Continue),
            Err(_) => Ok(Flow::Closed),
        }
    }

    /// Discards the upload in flight after an error. Before its END the
    /// rest of its DATA and its END are then swallowed.
    async fn fail_upload(&mut self, before_end: bool) {
        self.abandon_upload().await;
        self.stats.files_failed += 1;
        self.discarding = before_end;
    }

    /// Discards the upload in flight, if any: temp file and reservation.
    async fn abandon_upload(&mut self) {
        if let Some(up) = self.upload.take() {
            up.temp.discard().await;
            if let Err(e) = self.ctx.state.release_reservation(up.reservation).await {
                warn!(error = %e, "releasing a reservation failed");
            }
        }
    }
}

enum Flow {
    Continue,
    Bye,
    Closed,
}
