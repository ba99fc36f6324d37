//! One connection, from TLS handshake to BYE (PROTOCOL.md Session), in
//! phases: handshake (this file, [`run`]), hello and admission
//! ([`hello`]), then serving requests ([`Session::serve`], with uploads in
//! [`upload`] and LIST, GET and DELETE in [`restore`]).
//!
//! Everything after the handshake is generic over the stream
//! ([`connection`]), so the phases are tested in-process over
//! `tokio::io::duplex` on tokio's paused clock (`tests.rs`).
//!
//! Requests are handled strictly in order, which is what makes pipelining
//! work: a client may send PUT, DATA…, END, PUT … without waiting, and the
//! replies come back in the same order. After an ERROR answering an upload,
//! the rest of that upload's DATA and its END are swallowed, and still paid
//! for at the session's rate.
//!
//! Every send is bounded by `idle_timeout` and races the session's notices
//! and the shutdown phase, so a peer that stops reading can neither hold a
//! session forever nor shield it from deactivation, removal or shutdown.

mod hello;
mod restore;
#[cfg(test)]
mod tests;
mod upload;

use super::{Context, Notice, Phase};
use crate::config::{Config, CustomerId, DeclaredClientId};
use crate::limits::SourceGuard;
use crate::limits::penalty::Reason;
use crate::policy::admission::{Admitted, Intent};
use crate::state::{ClientEvent, SessionEnd, SessionStart, StateError};
use crate::storage::BadPath;
use crate::throttle::{SessionThrottle, TimeBase};
use crate::wire::{self, CodecError, ErrorBody, ErrorCode, Frame, FrameCodec, Kind};
use arc_swap::ArcSwap;
use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, timeout, timeout_at};
use tokio_util::codec::Framed;
use tracing::{Instrument, debug, info, info_span, warn};

pub use hello::SESSION_RETRY_AFTER;

/// A connection speaking frames.
pub(crate) type Conn<S> = Framed<S, FrameCodec>;

/// How long a last word (REJECT, BYE, a fatal ERROR) may take to leave
/// before the connection is closed anyway: a peer that does not read must
/// not hold the end of its own session.
pub const LAST_WORD: Duration = Duration::from_millis(250);

/// What the accept loop hands a connection.
pub struct Accepted {
    /// The peer's address.
    pub peer: SocketAddr,
    /// Its slot among connections not yet answered WELCOME or REJECT;
    /// released when one of them is sent.
    pub handshake: Option<OwnedSemaphorePermit>,
    /// Its place in its source's connection count, held to the end.
    pub source: Option<SourceGuard>,
    /// When the handshake and HELLO must be done (`hello_timeout`).
    pub deadline: Instant,
}

/// A peer-facing failure: one variant per ERROR code. The `Display` text is
/// for the log; [`SessionError::wire`] is what the peer sees.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("bad path: {0}")]
    BadPath(#[from] BadPath),
    #[error("quota exceeded: {0}")]
    Quota(String),
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
            other => crate::state::truncate(&other.to_string(), 512).to_string(),
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

/// Sends a last frame and closes, giving up after [`LAST_WORD`].
async fn last_word<S: AsyncRead + AsyncWrite + Unpin>(conn: &mut Conn<S>, f: Frame) {
    let _ = timeout(LAST_WORD, async {
        conn.send(f).await?;
        conn.close().await
    })
    .await;
}

/// Runs one accepted TCP connection: the TLS handshake under
/// `hello_timeout`, then [`connection`].
pub(super) async fn run(ctx: Arc<Context>, tcp: TcpStream, acc: Accepted) {
    let span = info_span!("session", peer = %acc.peer, client = tracing::field::Empty);
    async move {
        let tls = match timeout_at(acc.deadline, ctx.acceptor().accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                debug!(error = %e, "TLS handshake failed");
                penalize(&ctx, acc.peer, Reason::NoHello);
                return;
            }
            Err(_) => {
                debug!("TLS handshake timed out");
                penalize(&ctx, acc.peer, Reason::NoHello);
                return;
            }
        };
        let cert_names = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| crate::tls::peer_names(c));
        connection(ctx, tls, acc, cert_names).await;
    }
    .instrument(span)
    .await
}

/// Adds a penalty to the peer's source (PROTOCOL.md Additions).
fn penalize(ctx: &Context, peer: SocketAddr, reason: Reason) {
    let cfg = ctx.cfg.load();
    ctx.limits
        .penalize(&cfg.server.limits, peer.ip(), reason, Instant::now());
}

/// Everything after the TLS handshake, over any stream: HELLO, admission,
/// the requests, and the session's record and report. `cert_names` are the
/// names of a verified client certificate (mutual TLS). Returns the
/// session's result code, or `None` when it was never admitted.
pub async fn connection<S>(
    ctx: Arc<Context>,
    stream: S,
    mut acc: Accepted,
    cert_names: Option<Vec<String>>,
) -> Option<String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let hello_max_frame = ctx.cfg.load().server.limits.hello_max_frame;
    let mut conn = Framed::new(stream, FrameCodec::new(hello_max_frame));
    let a = hello::admit(&ctx, &mut conn, &mut acc, cert_names).await?;
    let cfg = a.cfg.clone();
    // PROTOCOL.md Additions: `max_frame` applies only after WELCOME.
    conn.codec_mut().set_max_frame(cfg.server.max_frame);
    let cust = cfg.customer(a.adm.customer);
    let intent = if a.adm.intent == Intent::Backup {
        "backup"
    } else {
        "restore"
    };
    let row = SessionStart {
        id: &a.session,
        client: &a.hello.client_id,
        customer: &cust.name,
        schedule: &a.hello.schedule,
        intent,
        peer: Some(&acc.peer.to_string()),
        at: a.at,
    };
    ctx.state.note_session_start(&row);
    // The customer and config can change under a live session (`clients
    // move`, a reload); the resolver reads them together. Restore sessions
    // have a throttle too: the DATA they discard is paid for like uploads.
    let view = Arc::new(ArcSwap::from_pointee(View {
        cfg: cfg.clone(),
        customer: a.adm.customer,
        declared: a.adm.declared,
    }));
    let throttle = {
        let (cell, schedule) = (view.clone(), a.hello.schedule.clone());
        let resolve: crate::throttle::Resolver = Arc::new(move |at| {
            let v = cell.load();
            (
                crate::policy::throttle::resolve(&v.cfg, v.customer, v.declared, &schedule, at),
                crate::policy::throttle::caps(&v.cfg, v.customer, at),
            )
        });
        SessionThrottle::new(resolve, ctx.throttles.clone(), TimeBase::now())
    };
    let started_at = Instant::now();
    let mut s = Session {
        conn,
        events: a.events,
        pending: None,
        bind: Binding {
            ctx: ctx.clone(),
            cfg,
            view,
            adm: a.adm,
            client: a.hello.client_id.clone(),
            peer: acc.peer.ip(),
            throttle,
        },
        upload: None,
        discarding: false,
        closed: false,
        stats: Stats::default(),
    };
    let active = metrics::gauge!(crate::metrics::ACTIVE_SESSIONS);
    active.increment(1.0);
    let result = s.serve().await;
    active.decrement(1.0);
    drop(a.joined);
    drop(a.slot);
    s.drop_in_flight().await;
    if !s.closed {
        let _ = timeout(LAST_WORD, s.conn.close()).await;
    }
    drop(a.permit);
    s.finish(&a.session, &a.hello, a.at, &result, started_at)
        .await;
    Some(result)
}

/// A session's totals.
#[derive(Default)]
struct Stats {
    bytes_in: u64,
    bytes_out: u64,
    files_ok: u64,
    files_failed: u64,
    restored: u64,
    restore_failed: u64,
    files_deleted: u64,
    delete_failed: u64,
    /// What the client was told went wrong, for the e-mail report.
    errors: Vec<String>,
    errors_more: u64,
}

/// What a session's throttle resolves against.
struct View {
    cfg: Arc<Config>,
    customer: CustomerId,
    declared: Option<DeclaredClientId>,
}

/// Where the session stands: its config, customer and throttle. Kept apart
/// from the connection so a notice can be applied while a send to the
/// connection is in flight.
struct Binding {
    ctx: Arc<Context>,
    /// The session's config snapshot; `adm`'s ids index into it.
    cfg: Arc<Config>,
    view: Arc<ArcSwap<View>>,
    adm: Admitted,
    client: String,
    /// The peer's address, for the refusals a PUT records.
    peer: std::net::IpAddr,
    throttle: SessionThrottle,
}

impl Binding {
    /// Applies a move or removal made by an admin command, or a reload;
    /// returns the BYE reason when the session must end (PROTOCOL.md
    /// Session 4, CONFIG.md "Activation").
    fn notice(&mut self, n: Notice) -> Option<&'static str> {
        let cfg = self.ctx.cfg.load_full();
        let customer = match n {
            Notice::Client(ClientEvent::Removed) => return Some("client_removed"),
            // A new secret is on its way; this session proved the old one.
            Notice::Client(ClientEvent::Readmitted) => return None,
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
        self.throttle.invalidate();
        None
    }

    fn customer(&self) -> CustomerId {
        self.adm.customer
    }
}

/// An admitted session.
struct Session<S> {
    conn: Conn<S>,
    events: tokio::sync::mpsc::UnboundedReceiver<Notice>,
    /// A notice that arrived during a throttle wait, handled next.
    pending: Option<Notice>,
    bind: Binding,
    upload: Option<upload::Upload>,
    /// The failed upload's DATA and END are being swallowed.
    discarding: bool,
    /// The last word was said (or given up on): the connection is closed.
    closed: bool,
    stats: Stats,
}

/// What a request did to the session.
#[derive(Debug)]
enum Flow {
    /// Go on.
    Continue,
    /// The client said BYE.
    Bye,
    /// The connection is gone.
    Closed,
    /// The session must end: a notice, the shutdown, or a peer that does
    /// not read; BYE (best effort) carries the reason.
    End(&'static str),
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// The request loop; returns the session's result code.
    async fn serve(&mut self) -> String {
        let mut phase = self.bind.ctx.phase.clone();
        loop {
            let idle = self.bind.cfg.server.idle_timeout;
            if let Some(n) = self.pending.take()
                && let Some(reason) = self.bind.notice(n)
            {
                return self.end(reason).await;
            }
            let current = *phase.borrow_and_update();
            if current == Phase::Forced
                || (current == Phase::Draining && self.upload.is_none() && !self.discarding)
            {
                return self.end("shutting_down").await;
            }
            let next = tokio::select! {
                r = timeout(idle, self.conn.next()) => r,
                _ = phase.changed() => continue,
                Some(n) = self.events.recv() => {
                    if let Some(reason) = self.bind.notice(n) {
                        return self.end(reason).await;
                    }
                    continue;
                }
            };
            let frame = match next {
                Err(_) => return self.end("idle_timeout").await,
                Ok(None) => return "disconnected".into(),
                Ok(Some(Err(e))) => {
                    if let Some(f) = codec_error_frame(&e) {
                        warn!(error = %e, "fatal frame error");
                        self.last_word(f).await;
                        return "protocol_error".into();
                    }
                    return "disconnected".into();
                }
                Ok(Some(Ok(f))) => f,
            };
            match self.handle(frame).await {
                Ok(Flow::Continue) => {}
                Ok(Flow::Bye) => {
                    self.last_word(bye(None)).await;
                    return "ok".into();
                }
                Ok(Flow::Closed) => return "disconnected".into(),
                Ok(Flow::End(reason)) => return self.end(reason).await,
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
                        // Peer text (paths, digests) escaped: it must not
                        // break the line or forge another (fail2ban reads it).
                        info!(
                            code = e.code().as_str(),
                            "{}",
                            crate::config::escape_log(&e.to_string(), 512)
                        );
                    }
                    if fatal {
                        self.last_word(Frame::json(Kind::Error, &w)).await;
                        return e.code().as_str().into();
                    }
                    match self.send(Frame::json(Kind::Error, &w)).await {
                        Ok(Flow::Continue) => {}
                        Ok(Flow::End(reason)) => return self.end(reason).await,
                        _ => return "disconnected".into(),
                    }
                }
            }
        }
    }

    /// Ends the session on the server's initiative: the upload in flight is
    /// discarded and BYE says why (PROTOCOL.md Session 4). Returns the
    /// result code, which is the reason.
    async fn end(&mut self, reason: &'static str) -> String {
        self.drop_in_flight().await;
        self.last_word(bye(Some(reason))).await;
        reason.into()
    }

    /// Sends a last frame and closes, within [`LAST_WORD`].
    async fn last_word(&mut self, f: Frame) {
        last_word(&mut self.conn, f).await;
        self.closed = true;
    }

    async fn handle(&mut self, f: Frame) -> Result<Flow, SessionError> {
        match f.kind {
            // PROTOCOL.md Additions: an empty DATA frame costs nothing to
            // send and would slip past the throttle.
            Kind::Data if f.payload.is_empty() => {
                self.abandon_upload().await;
                Err(SessionError::Protocol("an empty DATA frame".into()))
            }
            Kind::Data => self.data(f.payload).await,
            Kind::End => self.end_upload(&f.payload).await,
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
            // What a request did, for the session's report (issue 12):
            // a refused PUT is a failed file like a failed upload.
            Kind::Put => {
                let r = self.put(&f.payload).await;
                if r.is_err() {
                    self.stats.files_failed += 1;
                }
                r
            }
            Kind::List => self.list(&f.payload).await,
            Kind::Get => {
                let r = self.get(&f.payload).await;
                match r {
                    Ok(Flow::Continue) => self.stats.restored += 1,
                    _ => self.stats.restore_failed += 1,
                }
                r
            }
            Kind::Delete => {
                let r = self.delete(&f.payload).await;
                match r {
                    Err(_) => self.stats.delete_failed += 1,
                    _ => self.stats.files_deleted += 1,
                }
                r
            }
            Kind::Bye => Ok(Flow::Bye),
            Kind::Hello => Err(SessionError::BadRequest(
                "HELLO was already answered".into(),
            )),
            other => Err(SessionError::Protocol(format!(
                "a client does not send {other:?}"
            ))),
        }
    }

    /// Sends a frame, bounded by `idle_timeout` (a peer that stops reading
    /// is cut off), while the session's notices and the shutdown phase are
    /// still heard: a notice that ends the session, or a forced shutdown,
    /// abandons the send.
    async fn send(&mut self, f: Frame) -> Result<Flow, SessionError> {
        let Session {
            conn, events, bind, ..
        } = self;
        let mut phase = bind.ctx.phase.clone();
        let send = conn.send(f);
        tokio::pin!(send);
        let stalled = tokio::time::sleep(bind.cfg.server.idle_timeout);
        tokio::pin!(stalled);
        loop {
            tokio::select! {
                r = &mut send => return Ok(if r.is_ok() { Flow::Continue } else { Flow::Closed }),
                _ = &mut stalled => {
                    info!("the peer has not read for idle_timeout; ending the session");
                    return Ok(Flow::End("idle_timeout"));
                }
                Some(n) = events.recv() => {
                    if let Some(reason) = bind.notice(n) {
                        return Ok(Flow::End(reason));
                    }
                }
                _ = phase.wait_for(|p| *p == Phase::Forced) => return Ok(Flow::End("shutting_down")),
            }
        }
    }

    /// Records the session's end with its totals and queues its report.
    async fn finish(
        &mut self,
        id: &str,
        h: &crate::policy::Hello,
        started: jiff::Timestamp,
        result: &str,
        started_at: Instant,
    ) {
        let ctx = self.bind.ctx.clone();
        let end = SessionEnd {
            at: crate::clock::now(),
            bytes_in: self.stats.bytes_in,
            bytes_out: self.stats.bytes_out,
            files_ok: self.stats.files_ok,
            files_failed: self.stats.files_failed,
            result,
        };
        let secs = started_at.elapsed().as_secs_f64().max(1e-3);
        let waits = self.bind.throttle.waits;
        crate::metrics::throttle_waits(&waits);
        let configured_rate = if self.bind.adm.intent == Intent::Backup {
            self.bind.throttle.rate()
        } else {
            None
        };
        info!(
            result = %result,
            outcome = outcome_of(&self.stats, result),
            bytes_in = end.bytes_in,
            files_ok = end.files_ok,
            files_failed = end.files_failed,
            average_rate = (end.bytes_in as f64 / secs) as u64,
            configured_rate = ?configured_rate,
            wait_session_ms = waits.session.as_millis() as u64,
            wait_customer_ms = waits.customer.as_millis() as u64,
            wait_reseller_ms = waits.reseller.as_millis() as u64,
            wait_server_ms = waits.server.as_millis() as u64,
            "session ended"
        );
        // CONFIG.md "Email reports": composed after the BYE and stored with
        // the session's end, so mail never holds a client up and a crash
        // cannot lose a report.
        let cfg = &self.bind.cfg;
        let cust = cfg.customer(self.bind.customer());
        let facts = crate::reports::SessionFacts {
            session: id.to_string(),
            client: h.client_id.clone(),
            customer: cust.name.clone(),
            reseller: cust.reseller.map(|r| cfg.reseller(r).name.clone()),
            schedule: h.schedule.clone(),
            started: started.as_second(),
            ended: end.at.as_second(),
            result: result.to_string(),
            files_ok: end.files_ok,
            files_failed: end.files_failed,
            restored: self.stats.restored,
            restore_failed: self.stats.restore_failed,
            files_deleted: self.stats.files_deleted,
            delete_failed: self.stats.delete_failed,
            bytes_in: end.bytes_in,
            bytes_out: end.bytes_out,
            configured_rate,
            errors: std::mem::take(&mut self.stats.errors),
            errors_more: self.stats.errors_more,
        };
        let reports = crate::reports::session_reports(cfg, self.bind.customer(), &facts);
        if let Err(e) = ctx.state.end_session(id, &end, &reports).await {
            warn!(error = %e, "recording the session end failed");
        }
        if !reports.is_empty() {
            debug!(
                reports = reports.len(),
                "session report waiting for its digest"
            );
        }
        // Deliver the report, and look at the alerts.
        ctx.mail_wake.notify_one();
    }
}

/// OK, PARTIAL or FAILED, as the report will say (issue 12: the log said
/// `result=ok` for a session whose one file was refused).
fn outcome_of(s: &Stats, result: &str) -> &'static str {
    crate::reports::SessionFacts {
        result: result.into(),
        files_ok: s.files_ok,
        files_failed: s.files_failed,
        restored: s.restored,
        restore_failed: s.restore_failed,
        files_deleted: s.files_deleted,
        delete_failed: s.delete_failed,
        ..Default::default()
    }
    .outcome()
    .as_str()
}

/// A fresh session id: 12 random bytes, hex.
fn session_id() -> String {
    let mut b = [0u8; 12];
    let _ = getrandom::fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}
