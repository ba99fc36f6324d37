//! The hello and admit phases (PROTOCOL.md Session 1-2, "Admission"):
//! read HELLO under `hello_timeout` with frames bounded by
//! `hello_max_frame`, then admit or refuse. Every refusal goes through
//! [`refuse`], which logs it, counts it, records it (bounded), adds the
//! source's penalty and answers REJECT.

use super::{Accepted, Conn, codec_error_frame, last_word, penalize, session_id};
use crate::config::Config;
use crate::limits::{self, penalty::Reason};
use crate::policy::Hello;
use crate::policy::admission::{self, Admitted, Registration, RejectCode, Rejection};
use crate::server::{Context, Joined, Notice, Phase};
use crate::state::Decision;
use crate::wire::{self, ErrorCode, Frame, Kind};
use futures_util::StreamExt;
use jiff::Timestamp;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::time::{Instant, timeout_at};
use tracing::{info, warn};

/// `retry_after` of a REJECT `rate_limited` for a client with
/// `max_sessions_per_client` sessions open: its sessions are long, so a
/// minute is a fair first wait.
pub const SESSION_RETRY_AFTER: u64 = 60;
/// Longest refusal message logged or sent; HELLO's values can be echoed
/// in one (a wrong type of a 16 KiB field).
const MAX_MESSAGE: usize = 512;

/// What admission hands the serve phase.
pub(super) struct Admission {
    pub hello: Hello,
    pub adm: Admitted,
    pub session: String,
    pub joined: Joined,
    pub events: mpsc::UnboundedReceiver<Notice>,
    pub cfg: Arc<Config>,
    pub at: Timestamp,
    /// The session's slot of `max_connections`.
    pub permit: OwnedSemaphorePermit,
    /// Its slot of `max_sessions_per_client`.
    pub slot: ClientSlot,
}

/// One of a client's `max_sessions_per_client` slots, held to the end.
pub(super) struct ClientSlot {
    ctx: Arc<Context>,
    key: String,
}

impl ClientSlot {
    /// Takes a slot for `client` (ids without regard to case), or `None`
    /// when all `max` are taken, unless `always`.
    fn take(ctx: &Arc<Context>, client: &str, max: u32, always: bool) -> Option<ClientSlot> {
        let key = client.to_ascii_lowercase();
        let mut open = ctx
            .client_sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let n = open.entry(key.clone()).or_insert(0);
        if *n >= max && !always {
            if *n == 0 {
                open.remove(&key);
            }
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            ctx: ctx.clone(),
            key,
        })
    }
}

impl ClientSlot {
    /// Whether `client` has `max` sessions open.
    fn is_full(ctx: &Context, client: &str, max: u32) -> bool {
        let open = ctx
            .client_sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        open.get(&client.to_ascii_lowercase())
            .is_some_and(|n| *n >= max)
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self
            .ctx
            .client_sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// REJECT `rate_limited` for a client at `max_sessions_per_client`.
fn session_cap(client: &str, max: u32) -> Refusal<'_> {
    Refusal {
        rejection: Rejection {
            code: RejectCode::RateLimited,
            message: format!("client {client:?} already has {max} sessions open; try again later"),
            retry_after: Some(SESSION_RETRY_AFTER),
        },
        client: Some(client),
        customer: None,
        penalty: None,
    }
}

/// A refusal on its way out.
pub(super) struct Refusal<'a> {
    pub rejection: Rejection,
    /// HELLO's client id, if a HELLO was read (stored only if valid).
    pub client: Option<&'a str>,
    /// The customer it concerns, for the record.
    pub customer: Option<&'a str>,
    /// The penalty the source earns.
    pub penalty: Option<Reason>,
}

/// The one way a connection is refused before WELCOME: log, count, record
/// (a refusal that cannot be recorded is logged and counted, never
/// dropped silently), penalize, answer REJECT and close.
pub(super) async fn refuse<S>(ctx: &Context, conn: &mut Conn<S>, acc: &mut Accepted, r: Refusal<'_>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let code = r.rejection.code;
    let message = crate::state::truncate(&r.rejection.message, MAX_MESSAGE);
    // Peer text (a customer name, an echoed value) is escaped in the log.
    let customer = r.customer.map(|c| crate::config::escape_log(c, 64));
    info!(
        code = code.as_str(),
        customer = ?customer,
        "refused: {}",
        crate::config::escape_log(message, MAX_MESSAGE)
    );
    if code == RejectCode::AuthFailed {
        // fail2ban's line, in a fixed shape (docs/security.md).
        info!(
            "{}",
            limits::auth_failure_line(r.client.unwrap_or_default(), acc.peer.ip())
        );
    }
    crate::metrics::admission(code.as_str());
    if let Some(reason) = r.penalty {
        penalize(ctx, acc.peer, reason);
    }
    let noted = ctx.state.note_refusal(
        crate::clock::now(),
        Some(acc.peer.ip()),
        r.client,
        r.customer,
        code.as_str(),
    );
    if !noted {
        warn!(
            code = code.as_str(),
            "a refusal could not be recorded: too many are waiting to be written"
        );
        metrics::counter!(crate::metrics::REFUSALS_UNRECORDED).increment(1);
    }
    let reject = wire::Reject {
        code: code.as_str().into(),
        message: message.into(),
        retry_after: r.rejection.retry_after,
    };
    last_word(conn, Frame::json(Kind::Reject, &reject)).await;
    acc.handshake.take();
}

/// Reads HELLO and decides. Returns the admission, or `None` when the
/// connection was refused or ended (all answered and recorded here).
pub(super) async fn admit<S>(
    ctx: &Arc<Context>,
    conn: &mut Conn<S>,
    acc: &mut Accepted,
    cert_names: Option<Vec<String>>,
) -> Option<Admission>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let refusal = |code, message: String, penalty| Refusal {
        rejection: Rejection::new(code, message),
        client: None,
        customer: None,
        penalty,
    };
    let frame = match timeout_at(acc.deadline, conn.next()).await {
        Err(_) => {
            let r = refusal(
                RejectCode::Timeout,
                "no HELLO within hello_timeout".into(),
                Some(Reason::NoHello),
            );
            refuse(ctx, conn, acc, r).await;
            return None;
        }
        Ok(None) => {
            penalize(ctx, acc.peer, Reason::NoHello);
            return None;
        }
        Ok(Some(Err(e))) => {
            // Garbage before HELLO: answered (fatal) when it is a frame
            // error, never stored.
            info!(error = %e, "refused: no valid frame before HELLO");
            if let Some(f) = codec_error_frame(&e) {
                last_word(conn, f).await;
            }
            penalize(ctx, acc.peer, Reason::NoHello);
            return None;
        }
        Ok(Some(Ok(f))) => f,
    };
    if frame.kind != Kind::Hello {
        let msg = format!("expected HELLO first, got {:?}", frame.kind);
        refuse(
            ctx,
            conn,
            acc,
            refusal(RejectCode::BadRequest, msg, Some(Reason::BadHello)),
        )
        .await;
        return None;
    }
    let h: Hello = match wire::parse::<wire::Hello>(&frame.payload) {
        Ok(h) => h,
        Err(msg) => {
            refuse(
                ctx,
                conn,
                acc,
                refusal(RejectCode::BadRequest, msg, Some(Reason::BadHello)),
            )
            .await;
            return None;
        }
    };
    drop(frame);
    // Step 1: syntax.
    if let Err(rejection) = admission::check_syntax(&h) {
        let r = Refusal {
            rejection,
            client: Some(&h.client_id),
            customer: None,
            penalty: Some(Reason::BadHello),
        };
        refuse(ctx, conn, acc, r).await;
        return None;
    }
    tracing::Span::current().record("client", h.client_id.as_str());
    let with = |code, message: &str, penalty| Refusal {
        rejection: Rejection::new(code, message),
        client: Some(&h.client_id),
        customer: None,
        penalty,
    };
    // PROTOCOL.md Transport: a verified client certificate names the client.
    if let Some(names) = &cert_names
        && !names.iter().any(|n| n == &h.client_id)
    {
        let msg = "the client certificate does not name this client id";
        refuse(
            ctx,
            conn,
            acc,
            with(RejectCode::AuthFailed, msg, Some(Reason::AuthFailed)),
        )
        .await;
        return None;
    }
    // Step 2: shutdown, then connection limits (shutdown first: a client
    // told `busy` would retry at once).
    let draining = *ctx.phase.borrow() != Phase::Running;
    if draining {
        let msg = "the server is shutting down; try again shortly";
        refuse(ctx, conn, acc, with(RejectCode::ShuttingDown, msg, None)).await;
        return None;
    }
    let Ok(permit) = ctx.limit.clone().try_acquire_owned() else {
        let msg = "the server has no free connection slots; try again later";
        refuse(ctx, conn, acc, with(RejectCode::Busy, msg, None)).await;
        return None;
    };
    // A proven client already at its session cap is refused before the
    // admission's write: its secret is checked against the record read
    // outside any transaction, so looping HELLOs cost no fsync. Anyone
    // else goes on, to be refused for what it is.
    let max = ctx.cfg.load().server.limits.max_sessions_per_client;
    if ClientSlot::is_full(ctx, &h.client_id, max) {
        let cfg = ctx.cfg.load_full();
        if let Ok(Some(rec)) = ctx.state.client_record(&cfg, &h.client_id).await
            && rec.id == h.client_id
            && rec
                .secret_sha256
                .is_some_and(|d| admission::secret_matches(&d, h.secret.as_deref()))
        {
            refuse(ctx, conn, acc, session_cap(&h.client_id, max)).await;
            return None;
        }
    }
    // Join the live set before admission and only then take the config
    // the session runs on: a reload or a move/removal from here on is
    // queued for this session, so none falls between admission and
    // serving.
    let (joined, events) = Context::join(ctx, &h.client_id);
    let cfg = ctx.cfg.load_full();
    let at = crate::clock::now();
    let limits = ctx.limits.clone();
    let (ip, deadline) = (acc.peer.ip(), acc.deadline);
    // Steps 3-6. The enroll key is verified here, on the limits' short
    // queue of blocking threads, never inside the state's transaction.
    let decision = ctx
        .state
        .admit_verified(&cfg, &h, at, false, false, |hash, key| {
            let limits = limits.clone();
            async move { limits.verify(ip, &hash, &key, deadline).await }
        })
        .await;
    let (adm, secret) = match decision {
        Ok(Decision::Admitted { admitted, secret }) => (admitted, secret),
        Ok(Decision::Rejected {
            rejection,
            customer,
        }) => {
            let penalty = match rejection.code {
                RejectCode::AuthFailed => Some(Reason::AuthFailed),
                RejectCode::BadRequest
                | RejectCode::UnknownClient
                | RejectCode::UnknownCustomer => Some(Reason::BadHello),
                _ => None,
            };
            let r = Refusal {
                rejection,
                client: Some(&h.client_id),
                customer: customer.as_deref(),
                penalty,
            };
            refuse(ctx, conn, acc, r).await;
            return None;
        }
        other => {
            match other {
                Err(e) => warn!(error = %e, "admission failed"),
                Ok(_) => warn!("admission failed: the enroll key was never verified"),
            }
            let f = super::error_frame(ErrorCode::Internal, "an internal error occurred", true);
            last_word(conn, f).await;
            return None;
        }
    };
    // `max_sessions_per_client` once the client has proved itself, so a
    // stranger's HELLOs for its id cannot lock it out. A HELLO that was
    // issued a secret always gets its slot: refusing it now would lose the
    // secret, and a new or readmitted client has no sessions to speak of.
    let max = cfg.server.limits.max_sessions_per_client;
    let existing = adm.registration == Registration::Existing;
    let Some(slot) = ClientSlot::take(ctx, &h.client_id, max, !existing) else {
        refuse(ctx, conn, acc, session_cap(&h.client_id, max)).await;
        return None;
    };
    let cust = cfg.customer(adm.customer);
    let session = session_id();
    info!(customer = %cust.name, code = "welcome", session = %session, registered = adm.issues_secret(), "admitted");
    crate::metrics::admission("welcome");
    let welcome = wire::Welcome {
        session: session.clone(),
        client_id: h.client_id.clone(),
        customer: cust.name.clone(),
        reseller: cust.reseller.map(|r| cfg.reseller(r).name.clone()),
        registered: adm.issues_secret(),
        secret,
        rate: adm.rate.rate,
        space_left: adm.space_left,
        max_frame: cfg.server.max_frame,
    };
    // WELCOME must leave within what is left of hello_timeout, like HELLO
    // had to arrive within it.
    let sent = timeout_at(
        acc.deadline.max(Instant::now() + super::LAST_WORD),
        futures_util::SinkExt::send(conn, Frame::json(Kind::Welcome, &welcome)),
    )
    .await;
    acc.handshake.take();
    if !matches!(sent, Ok(Ok(()))) {
        info!("the client went away before WELCOME reached it");
        return None;
    }
    Some(Admission {
        hello: h,
        adm,
        session,
        joined,
        events,
        cfg,
        at,
        permit,
        slot,
    })
}
