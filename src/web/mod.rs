//! The web console (CONFIG.md Additions of 2026-11-30 `[server.web]`,
//! docs/console.md): an HTTPS site inside the daemon where the admin,
//! resellers and customers each see their own subtree.
//!
//! This module owns the router. [`listen`] accepts TCP, applies the
//! per-source penalties and connection caps the backup listener uses,
//! finishes TLS in a task per connection and serves HTTP/1.1 with header
//! and idle timeouts, every stage bounded. [`auth`]
//! owns logins, sessions and CSRF tokens; [`pages`] renders every page on
//! the server from embedded templates, on the low-priority thread of
//! [`worker`]; [`charts`] draws the SVG charts.
//! Every response carries the security headers in [`secure_headers`].

pub mod auth;
pub mod charts;
pub mod customers;
pub mod listen;
pub mod pages;
pub mod worker;

use crate::server::Context;
use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use minijinja::Environment;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tracing::error;

/// What every handler shares.
pub struct Console {
    /// The daemon's shared state: config, state store, limits.
    pub ctx: Arc<Context>,
    /// Server-side login sessions.
    pub sessions: auth::Sessions,
    /// The page templates.
    pub templates: Environment<'static>,
    /// Pages reading the state at once (see [`PAGE_TURNS`]).
    pub turns: tokio::sync::Semaphore,
    /// When each customer's account details were last sent from here
    /// (see [`ACCOUNT_DETAILS_COOLDOWN`]).
    pub account_sent: std::sync::Mutex<std::collections::HashMap<String, tokio::time::Instant>>,
    /// One customer-file save at a time ([`customers`]).
    pub edits: tokio::sync::Mutex<()>,
    /// Recent saves per web user ([`customers::SAVES_PER_MINUTE`]).
    pub saves: std::sync::Mutex<std::collections::HashMap<String, Vec<tokio::time::Instant>>>,
}

/// Console pages reading the state at once: the backup protocol shares the
/// read pool (`state::POOL_SIZE`), so the console never holds more than
/// this many of its connections, however many pages are asked for.
pub const PAGE_TURNS: usize = 2;

/// The console's "Send account details" sends a customer's mail at most
/// once in this long (a loop of POSTs must not flood an inbox).
pub const ACCOUNT_DETAILS_COOLDOWN: std::time::Duration = std::time::Duration::from_secs(600);

/// The console's error: what the peer sees is a status and a fixed text;
/// the detail goes to the log only (never a path or a database message).
#[derive(Debug, thiserror::Error)]
pub enum WebError {
    /// Not there, or not this login's to see: the same answer for both.
    #[error("not found")]
    NotFound,
    /// A POST without the session's CSRF token.
    #[error("the form's CSRF token is missing or stale")]
    Csrf,
    /// Too many failed logins from this source.
    #[error("too many failed logins from this address")]
    Penalized,
    /// The password checks are all busy.
    #[error("busy")]
    Busy,
    /// The state store failed.
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    /// A template failed.
    #[error("template: {0}")]
    Template(#[from] minijinja::Error),
    /// Mail could not be made or queued.
    #[error(transparent)]
    Mail(#[from] crate::reports::MailError),
}

impl IntoResponse for WebError {
    fn into_response(self) -> Response {
        let (status, text) = match &self {
            WebError::NotFound => (StatusCode::NOT_FOUND, "Not found."),
            WebError::Csrf => (
                StatusCode::FORBIDDEN,
                "The form has expired or did not come from this console. Go back, reload the page and try again.",
            ),
            WebError::Penalized => (
                StatusCode::TOO_MANY_REQUESTS,
                "Too many failed logins from your address. Try again later.",
            ),
            WebError::Busy => (
                StatusCode::SERVICE_UNAVAILABLE,
                "The server is busy checking other logins. Try again in a moment.",
            ),
            WebError::State(_) | WebError::Template(_) | WebError::Mail(_) => {
                error!(error = %self, "web console: a page failed");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "The console could not show this page. The server's log has the details.",
                )
            }
        };
        (status, pages::plain_page(status, text)).into_response()
    }
}

/// Content-Security-Policy: no inline script or style, nothing from
/// elsewhere, no framing; forms post only here.
pub const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Adds the security headers to every response.
pub async fn secure_headers(req: Request, next: Next) -> Response {
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::STRICT_TRANSPORT_SECURITY,
        HeaderValue::from_static("max-age=31536000"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    res
}

/// The console's routes over `console`.
pub fn router(console: Arc<Console>) -> Router {
    Router::new()
        .route("/", get(pages::home))
        .route("/login", get(auth::login_form).post(auth::login))
        .route("/logout", post(auth::logout))
        .route("/static/console.css", get(pages::stylesheet))
        .route("/admin", get(pages::admin))
        .route("/admin/account-details", post(pages::send_account_details))
        .route("/admin/report-now", post(pages::report_now))
        .route("/resellers/{reseller}", get(pages::reseller))
        .route(
            "/resellers/{reseller}/usage.svg",
            get(pages::reseller_chart),
        )
        .route(
            "/resellers/{reseller}/customers/new",
            get(customers::new_form).post(customers::create),
        )
        .route("/customers/{customer}", get(pages::customer))
        .route(
            "/customers/{customer}/edit",
            get(customers::edit_form).post(customers::update),
        )
        .route(
            "/customers/{customer}/activation",
            post(customers::activation),
        )
        .route(
            "/customers/{customer}/usage.svg",
            get(pages::customer_chart),
        )
        .route("/customers/{customer}/connect", get(pages::connect))
        .route("/customers/{customer}/clients/{client}", get(pages::client))
        .route(
            "/customers/{customer}/clients/{client}/download",
            get(pages::download),
        )
        .fallback(|| async { WebError::NotFound })
        .layer(axum::middleware::from_fn(secure_headers))
        .with_state(console)
}

/// Binds `server.web.listen` (before the daemon says it is ready).
pub async fn bind(cfg: &crate::config::Config) -> std::io::Result<Option<TcpListener>> {
    match &cfg.server.web {
        Some(w) => TcpListener::bind(w.listen).await.map(Some),
        None => Ok(None),
    }
}

/// Serves the console on `listener` until the daemon begins to stop.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<Context>,
    tls: Arc<rustls::ServerConfig>,
) -> std::io::Result<()> {
    let local: SocketAddr = listener.local_addr()?;
    let console = Arc::new(Console {
        ctx: ctx.clone(),
        sessions: auth::Sessions::default(),
        templates: pages::templates(),
        turns: tokio::sync::Semaphore::new(PAGE_TURNS),
        account_sent: Default::default(),
        edits: Default::default(),
        saves: Default::default(),
    });
    {
        let console = console.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
            loop {
                tick.tick().await;
                console.sessions.sweep(&console.ctx.cfg.load());
            }
        });
    }
    tracing::info!(addr = %local, "web console on https://{local}/");
    listen::serve(listener, ctx, tls, router(console)).await;
    Ok(())
}
