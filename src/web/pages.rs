//! The console's pages, rendered on the server from the templates in
//! `web/templates/` (minijinja, auto-escaped HTML; no script at all).
//!
//! Isolation (issue 15): every handler resolves the names in its URL
//! against what the login may see ([`customer_for`], [`reseller_for`],
//! [`client_of`]) before it reads anything, and answers 404 both for a
//! name that does not exist and for one that is not the login's, so the
//! answer never tells which.

use super::auth::{Authed, Login};
use super::{Console, WebError, charts};
use crate::config::units::format_size;
use crate::config::{Config, CustomerId, ResellerId};
use crate::state::console::{ClientCounts, RefusalFilter, SessionRow};
use crate::state::status::{ClientStatus, CustomerStatus, ResellerStatus, Status, status_doc};
use axum::Form;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use jiff::Timestamp;
use minijinja::{Environment, Value, context};
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use tracing::info;

/// Clients listed per page of a customer's clients.
pub const CLIENTS_PAGE: usize = 500;
/// Files listed per page of a client's files.
pub const FILES_PAGE: u32 = 200;
/// Sessions listed on a client's page.
pub const SESSIONS_SHOWN: u32 = 100;
/// Refusals listed on a page.
pub const REFUSALS_SHOWN: u32 = 100;
/// Console changes listed on the admin's page.
pub const AUDIT_SHOWN: u32 = 100;
/// Outbox messages listed on the admin's page.
pub const MAIL_SHOWN: u32 = 50;
/// Days a usage chart covers.
pub const CHART_DAYS: i64 = 90;

/// `name` as one URL path segment.
pub fn seg(name: &str) -> String {
    utf8_percent_encode(name, NON_ALPHANUMERIC).to_string()
}

/// The page templates, with the filters they use.
pub fn templates() -> Environment<'static> {
    let mut e = Environment::new();
    for (name, src) in [
        ("base.html", include_str!("templates/base.html")),
        ("macros.html", include_str!("templates/macros.html")),
        ("login.html", include_str!("templates/login.html")),
        ("message.html", include_str!("templates/message.html")),
        ("admin.html", include_str!("templates/admin.html")),
        ("reseller.html", include_str!("templates/reseller.html")),
        ("customer.html", include_str!("templates/customer.html")),
        ("client.html", include_str!("templates/client.html")),
        ("connect.html", include_str!("templates/connect.html")),
        (
            "customer_form.html",
            include_str!("templates/customer_form.html"),
        ),
    ] {
        // Part of the binary and covered by the tests: a broken one is a
        // build defect.
        e.add_template(name, src).expect("bundled template parses");
    }
    e.add_filter("size", |v: Option<u64>| {
        v.map(format_size).unwrap_or_default()
    });
    e.add_filter("rate", |v: Option<u64>| match v {
        Some(r) => format!("{}/s", format_size(r)),
        None => "unthrottled".into(),
    });
    e.add_filter("pct", |used: u64, of: u64| {
        if of == 0 {
            "—".to_string()
        } else {
            format!("{:.1}%", used as f64 * 100.0 / of as f64)
        }
    });
    e.add_filter("seg", |s: String| seg(&s));
    e
}

/// Renders `name` on the console's own low-priority thread
/// ([`super::worker`]); the caller's context is merged over the common one.
pub async fn render(
    console: &Arc<Console>,
    name: &'static str,
    ctx: Value,
) -> Result<Html<String>, WebError> {
    let console = console.clone();
    super::worker::run(move || render_now(&console, name, ctx)).await?
}

pub(super) fn render_now(
    console: &Console,
    name: &str,
    ctx: Value,
) -> Result<Html<String>, WebError> {
    let cfg = console.ctx.cfg.load();
    Ok(Html(render_page(&console.templates, &cfg, name, ctx)?))
}

/// Renders page `name` of `templates` with `ctx` (public for the bench).
pub fn render_page(
    templates: &Environment<'static>,
    cfg: &Config,
    name: &str,
    ctx: Value,
) -> Result<String, minijinja::Error> {
    let tz = cfg.server.timezone.clone();
    let when = move |secs: Option<i64>| crate::state::status::when_in(&tz, secs);
    let mut env = templates.clone();
    env.add_filter("when", when);
    let common = context! {
        version => env!("CARGO_PKG_VERSION"),
        now => crate::state::status::when(cfg, Some(crate::clock::now().as_second())),
    };
    env.get_template(name)?.render(context! { ..ctx, ..common })
}

/// Waits for one of the console's turns at the state ([`super::PAGE_TURNS`]).
pub(super) async fn turn(console: &Console) -> Result<tokio::sync::SemaphorePermit<'_>, WebError> {
    console.turns.acquire().await.map_err(|_| WebError::Busy)
}

/// A bare page for errors (no login needed, no template that can fail).
pub fn plain_page(status: StatusCode, text: &str) -> Html<String> {
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    };
    Html(format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{} · tollgate</title><link rel=\"stylesheet\" href=\"/static/console.css\"></head><body><main><h1>{}</h1><p>{}</p><p><a href=\"/\">Home</a></p></main><footer>tollgate</footer></body></html>\n",
        status.as_u16(),
        esc(status.canonical_reason().unwrap_or("Error")),
        esc(text)
    ))
}

/// A page with a title and one paragraph, for a logged-in user.
pub(super) async fn message(
    console: &Arc<Console>,
    authed: &Authed,
    status: &str,
    text: &str,
) -> Result<Html<String>, WebError> {
    render(
        console,
        "message.html",
        context! { who => who(authed), status => status, text => text },
    )
    .await
}

/// `/static/console.css`.
pub async fn stylesheet() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        include_str!("static/console.css"),
    )
        .into_response()
}

/// `/`: the login's home, or the login page.
pub async fn home(authed: Option<Authed>) -> Redirect {
    match authed {
        Some(a) => Redirect::to(&a.login.home()),
        None => Redirect::to("/login"),
    }
}

/// What the header shows of the login.
pub(super) fn who(a: &Authed) -> Value {
    let kind = match &a.login {
        Login::Admin => "admin",
        Login::Reseller(_) => "reseller",
        Login::Customer(_) => "customer",
    };
    context! { user => a.user, kind => kind, csrf => a.csrf }
}

/// The customer `name` names, if `login` may see it.
pub fn customer_for(cfg: &Config, login: &Login, name: &str) -> Result<CustomerId, WebError> {
    let id = cfg.customer_by_name(name).ok_or(WebError::NotFound)?;
    let c = cfg.customer(id);
    let mine = match login {
        Login::Admin => true,
        Login::Reseller(r) => c.reseller.is_some() && c.reseller == cfg.reseller_by_name(r),
        Login::Customer(n) => c.name.to_lowercase() == n.to_lowercase(),
    };
    if mine {
        Ok(id)
    } else {
        Err(WebError::NotFound)
    }
}

/// The reseller `name` names, if `login` may see it.
pub fn reseller_for(cfg: &Config, login: &Login, name: &str) -> Result<ResellerId, WebError> {
    let id = cfg.reseller_by_name(name).ok_or(WebError::NotFound)?;
    match login {
        Login::Admin => Ok(id),
        Login::Reseller(r) if r == name => Ok(id),
        _ => Err(WebError::NotFound),
    }
}

/// Which client rows a page reads: never all of them (at 10,000 clients
/// the rows alone cost tens of milliseconds), so the tree's per-customer
/// client counts come from [`State::client_counts`].
///
/// [`State::client_counts`]: crate::state::State::client_counts
enum Rows<'a> {
    /// None: the whole tree's pages list customers, not clients.
    None,
    /// One page of a customer's clients.
    Page {
        customer: &'a str,
        offset: usize,
        limit: usize,
    },
    /// One client of a customer.
    One { customer: &'a str, client: &'a str },
}

/// The status tree now with the client rows `rows` asks for, built on the
/// console's own low-priority thread ([`super::worker`]), with `counts`
/// (from [`State::client_counts`]) as each customer's client count.
///
/// [`State::client_counts`]: crate::state::State::client_counts
async fn status(
    console: &Console,
    cfg: &Arc<Config>,
    at: Timestamp,
    rows: Rows<'_>,
    counts: HashMap<String, ClientCounts>,
) -> Result<(Status, HashMap<String, ClientCounts>), WebError> {
    let st = &console.ctx.state;
    let mut data = st.totals(cfg, at).await?;
    data.clients = match rows {
        Rows::None => Vec::new(),
        Rows::Page {
            customer,
            offset,
            limit,
        } => {
            st.clients_of(cfg, at, Some(customer), None, offset as i64, limit as i64)
                .await?
        }
        Rows::One { customer, client } => {
            st.clients_of(cfg, at, Some(customer), Some(client), 0, 1)
                .await?
        }
    };
    let cfg = cfg.clone();
    super::worker::run(move || {
        let mut doc = status_doc(&cfg, &data, at);
        // The counts of all clients, not of the rows read.
        let fix = |c: &mut CustomerStatus| {
            if let Some(n) = counts.get(&c.name.to_lowercase()) {
                c.clients_registered = n.registered.max(0) as u64;
            }
        };
        fix(&mut doc.default_customer);
        doc.resellers
            .iter_mut()
            .flat_map(|r| r.customers.iter_mut())
            .for_each(fix);
        (doc, counts)
    })
    .await
}

fn customer_in(s: Status, name: &str) -> Option<CustomerStatus> {
    let lower = name.to_lowercase();
    std::iter::once(s.default_customer)
        .chain(s.resellers.into_iter().flat_map(|r| r.customers))
        .find(|c| c.name.to_lowercase() == lower)
}

/// Client `client` of customer `customer` (names from a URL), if `login`
/// may see that customer and the state puts the client under it (the
/// state, not the config, says where a client and its files are).
async fn client_of(
    console: &Console,
    cfg: &Arc<Config>,
    login: &Login,
    customer: &str,
    client: &str,
) -> Result<(CustomerId, ClientStatus), WebError> {
    let id = customer_for(cfg, login, customer)?;
    let name = cfg.customer(id).name.clone();
    let rows = Rows::One {
        customer: &name,
        client,
    };
    let (s, _) = status(console, cfg, crate::clock::now(), rows, HashMap::new()).await?;
    let cl = customer_in(s, &name)
        .and_then(|c| {
            c.clients
                .into_iter()
                .find(|cl| cl.row.id.eq_ignore_ascii_case(client))
        })
        .ok_or(WebError::NotFound)?;
    Ok((id, cl))
}

/// The customers that have an `email` (their account details can be sent).
fn mailable(cfg: &Config) -> Vec<String> {
    cfg.customers
        .iter()
        .filter(|c| c.email.is_some())
        .map(|c| c.name.clone())
        .collect()
}

/// Whether a customer and its reseller are both activated.
fn active(cfg: &Config, c: CustomerId) -> bool {
    let cust = cfg.customer(c);
    cust.activated && cust.reseller.is_none_or(|r| cfg.reseller(r).activated)
}

fn crumbs(cfg: &Config, login: &Login, c: Option<CustomerId>) -> Vec<Value> {
    let mut v = Vec::new();
    if *login == Login::Admin {
        v.push(context! { href => "/admin", name => "Server" });
    }
    if let Some(c) = c {
        let cust = cfg.customer(c);
        if let (Some(r), false) = (cust.reseller, matches!(login, Login::Customer(_))) {
            let name = &cfg.reseller(r).name;
            v.push(context! { href => format!("/resellers/{}", seg(name)), name => name });
        }
    }
    v
}

/// `GET /customers/{customer}`.
pub async fn customer(
    State(console): State<Arc<Console>>,
    authed: Authed,
    Path(name): Path<String>,
    Query(q): Query<Notice>,
) -> Result<Html<String>, WebError> {
    let _turn = turn(&console).await?;
    let cfg = console.ctx.cfg.load_full();
    let id = customer_for(&cfg, &authed.login, &name)?;
    let cust_name = cfg.customer(id).name.clone();
    let at = crate::clock::now();
    // The clients table is paged, in id order.
    let counts = console.ctx.state.client_counts().await?;
    let total = counts
        .get(&cust_name.to_lowercase())
        .map_or(0, |n| n.total.max(0) as usize);
    let pages = total.div_ceil(CLIENTS_PAGE).max(1);
    let page = q.page.unwrap_or(1).clamp(1, pages);
    let rows = Rows::Page {
        customer: &cust_name,
        offset: (page - 1) * CLIENTS_PAGE,
        limit: CLIENTS_PAGE,
    };
    let (s, _) = status(&console, &cfg, at, rows, counts).await?;
    let c = customer_in(s, &cust_name).ok_or(WebError::NotFound)?;
    let results = console.ctx.state.last_results(&cust_name).await?;
    render(
        &console,
        "customer.html",
        context! {
            who => who(&authed),
            crumbs => crumbs(&cfg, &authed.login, Some(id)),
            notice => q.text(&cfg, &authed.login),
            base => format!("/customers/{}", seg(&cust_name)),
            active => active(&cfg, id),
            can_send => authed.login != Login::Customer(cust_name.clone()) && cfg.customer(id).email.is_some(),
            results => results,
            paging => context! {
                page => page,
                pages => pages,
                first => ((page - 1) * CLIENTS_PAGE + 1).min(total),
                last => (page * CLIENTS_PAGE).min(total),
                total => total,
            },
            c => c,
        },
    )
    .await
}

/// A client's session with its rates.
#[derive(Serialize)]
struct SessionView {
    #[serde(flatten)]
    row: SessionRow,
    /// Bytes per second over the session.
    avg: Option<u64>,
    /// The rate configured for its schedule when it started.
    configured: Option<u64>,
}

/// `?after=` on a client's page.
#[derive(Deserialize, Default)]
pub struct FilesPage {
    after: Option<String>,
}

/// `GET /customers/{customer}/clients/{client}`.
pub async fn client(
    State(console): State<Arc<Console>>,
    authed: Authed,
    Path((name, client)): Path<(String, String)>,
    Query(page): Query<FilesPage>,
) -> Result<Html<String>, WebError> {
    let _turn = turn(&console).await?;
    let cfg = console.ctx.cfg.load_full();
    let (id, cl) = client_of(&console, &cfg, &authed.login, &name, &client).await?;
    let cust_name = cfg.customer(id).name.clone();
    let st = &console.ctx.state;
    let declared = cfg.declared_client(&cl.row.id);
    let sessions: Vec<SessionView> = st
        .client_sessions(&cl.row.id, &cust_name, SESSIONS_SHOWN)
        .await?
        .into_iter()
        .map(|row| {
            let secs = row.ended_at.map(|e| (e - row.started_at).max(1) as u64);
            let bytes = (row.bytes_in + row.bytes_out).max(0) as u64;
            let avg = secs.map(|s| bytes / s);
            let configured = Timestamp::from_second(row.started_at).ok().and_then(|t| {
                crate::policy::throttle::resolve(&cfg, id, declared, &row.schedule, t).rate
            });
            SessionView {
                row,
                avg,
                configured,
            }
        })
        .collect();
    let refusals = st
        .refusals(
            &RefusalFilter {
                client: Some(cl.row.id.clone()),
                customers: Some(vec![cust_name.clone()]),
                ..Default::default()
            },
            REFUSALS_SHOWN,
        )
        .await?;
    let after = page
        .after
        .filter(|a| !a.is_empty() && a.len() <= crate::storage::MAX_PATH);
    let files = st
        .list_files(&cl.row.id, "", after.as_deref(), FILES_PAGE)
        .await?;
    let next_after = (files.len() as u32 == FILES_PAGE)
        .then(|| files.last().map(|f| f.path.clone()))
        .flatten();
    let mut crumbs = crumbs(&cfg, &authed.login, Some(id));
    crumbs.push(context! { href => format!("/customers/{}", seg(&cust_name)), name => cust_name });
    render(
        &console,
        "client.html",
        context! {
            who => who(&authed),
            crumbs => crumbs,
            base => format!("/customers/{}/clients/{}", seg(&cust_name), seg(&cl.row.id)),
            sessions => sessions,
            refusals => refusals,
            files => files,
            next_after => next_after,
            page => FILES_PAGE,
            cl => cl,
        },
    )
    .await
}

/// `?path=` of a download.
#[derive(Deserialize)]
pub struct DownloadQuery {
    path: String,
}

/// `GET /customers/{customer}/clients/{client}/download?path=`: one
/// stored file, streamed.
pub async fn download(
    State(console): State<Arc<Console>>,
    authed: Authed,
    Path((name, client)): Path<(String, String)>,
    Query(q): Query<DownloadQuery>,
) -> Result<Response, WebError> {
    let _turn = turn(&console).await?;
    let cfg = console.ctx.cfg.load_full();
    crate::storage::validate_path(&q.path).map_err(|_| WebError::NotFound)?;
    let (id, cl) = client_of(&console, &cfg, &authed.login, &name, &client).await?;
    let st = &console.ctx.state;
    let entry = st
        .file(&cl.row.id, &q.path)
        .await?
        .ok_or(WebError::NotFound)?;
    let path = crate::storage::client_dir(&cfg, id, &cl.row.id).join(&q.path);
    let file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(error = %e, client = %cl.row.id, "web console: a stored file cannot be opened");
            return Err(WebError::NotFound);
        }
    };
    let len = file.metadata().await.map(|m| m.len()).unwrap_or(u64::MAX);
    if len != entry.size as u64 {
        tracing::warn!(client = %cl.row.id, "web console: a stored file's size differs from the index");
        return Err(WebError::NotFound);
    }
    info!(
        user = %crate::config::escape_log(&authed.user, 64),
        client = %cl.row.id,
        bytes = len,
        "web console: file downloaded"
    );
    let base = q.path.rsplit('/').next().unwrap_or("file");
    let ascii: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let disposition = format!(
        "attachment; filename=\"{ascii}\"; filename*=UTF-8''{}",
        seg(base)
    );
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(file));
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, len.to_string()),
            (header::CONTENT_DISPOSITION, disposition),
            (
                header::HeaderName::from_static("x-content-sha256"),
                entry.sha256,
            ),
        ],
        body,
    )
        .into_response())
}

/// `GET /customers/{customer}/connect`.
pub async fn connect(
    State(console): State<Arc<Console>>,
    authed: Authed,
    Path(name): Path<String>,
) -> Result<Html<String>, WebError> {
    let cfg = console.ctx.cfg.load_full();
    let id = customer_for(&cfg, &authed.login, &name)?;
    let c = cfg.customer(id);
    let fingerprint =
        crate::tls::server_fingerprint(&cfg).unwrap_or_else(|_| "(see the daemon's log)".into());
    let mut crumbs = crumbs(&cfg, &authed.login, Some(id));
    crumbs.push(context! { href => format!("/customers/{}", seg(&c.name)), name => c.name });
    render(
        &console,
        "connect.html",
        context! {
            who => who(&authed),
            crumbs => crumbs,
            customer => c.name,
            address => crate::reports::compose::server_address_bound(
                &cfg,
                console.ctx.listeners.local().first().copied(),
            ),
            fingerprint => fingerprint,
            auto_add => c.auto_add_clients,
            enroll => c.enroll_key.is_some(),
        },
    )
    .await
}

fn reseller_in(s: Status, name: &str) -> Option<ResellerStatus> {
    s.resellers.into_iter().find(|r| r.name == name)
}

/// `GET /resellers/{reseller}`.
pub async fn reseller(
    State(console): State<Arc<Console>>,
    authed: Authed,
    Path(name): Path<String>,
    Query(q): Query<Notice>,
) -> Result<Html<String>, WebError> {
    let _turn = turn(&console).await?;
    let cfg = console.ctx.cfg.load_full();
    reseller_for(&cfg, &authed.login, &name)?;
    let at = crate::clock::now();
    let counts = console.ctx.state.client_counts().await?;
    let (s, counts) = status(&console, &cfg, at, Rows::None, counts).await?;
    let r = reseller_in(s, &name).ok_or(WebError::NotFound)?;
    let activity: HashMap<String, String> = r
        .customers
        .iter()
        .map(|c| {
            let last = counts.get(&c.name.to_lowercase()).and_then(|n| n.last_seen);
            (c.name.clone(), crate::state::status::when(&cfg, last))
        })
        .collect();
    render(
        &console,
        "reseller.html",
        context! {
            who => who(&authed),
            crumbs => crumbs(&cfg, &authed.login, None),
            notice => q.text(&cfg, &authed.login),
            activity => activity,
            mailable => mailable(&cfg),
            r => r,
        },
    )
    .await
}

/// `?code=&customer=` on the admin's page, and the notice after an action.
#[derive(Deserialize, Default)]
pub struct AdminQuery {
    code: Option<String>,
    customer: Option<String>,
    #[serde(flatten)]
    notice: Notice,
}

/// `GET /admin`.
pub async fn admin(
    State(console): State<Arc<Console>>,
    authed: Authed,
    Query(q): Query<AdminQuery>,
) -> Result<Html<String>, WebError> {
    if authed.login != Login::Admin {
        return Err(WebError::NotFound);
    }
    let _turn = turn(&console).await?;
    let cfg = console.ctx.cfg.load_full();
    let at = crate::clock::now();
    let counts = console.ctx.state.client_counts().await?;
    let (s, _) = status(&console, &cfg, at, Rows::None, counts).await?;
    let code = q.code.filter(|c| {
        crate::policy::admission::RejectCode::ALL
            .iter()
            .any(|k| k.as_str() == c)
    });
    let customer = q.customer.filter(|c| !c.is_empty() && c.len() <= 200);
    let st = &console.ctx.state;
    let refusals = st
        .refusals(
            &RefusalFilter {
                code: code.clone(),
                customers: customer.clone().map(|c| vec![c]),
                client: None,
            },
            REFUSALS_SHOWN,
        )
        .await?;
    let mail: Vec<Value> = st
        .outbox(MAIL_SHOWN)
        .await?
        .into_iter()
        .map(|m| {
            let to: Vec<String> = serde_json::from_str(&m.recipients).unwrap_or_default();
            context! { to => to.join(", "), ..Value::from_serialize(&m) }
        })
        .collect();
    let audit = st.audit_log(AUDIT_SHOWN).await?;
    let penalties: Vec<Value> = console
        .ctx
        .limits
        .blocked_list(tokio::time::Instant::now(), 100)
        .into_iter()
        .map(|(src, left)| context! { source => src.to_string(), left => left.as_secs() })
        .collect();
    let reload = console
        .ctx
        .last_reload
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let codes: Vec<&str> = crate::policy::admission::RejectCode::ALL
        .iter()
        .map(|c| c.as_str())
        .collect();
    render(
        &console,
        "admin.html",
        context! {
            who => who(&authed),
            notice => q.notice.text(&cfg, &authed.login),
            s => s,
            refusals => refusals,
            filter => context! { code => code, customer => customer },
            codes => codes,
            mailable => mailable(&cfg),
            mail => mail,
            penalties => penalties,
            audit => audit,
            reload => context! {
                at => reload.at.map(|t| crate::state::status::when(&cfg, Some(t.as_second()))),
                ok => reload.ok,
                summary => reload.summary,
                errors => reload.errors,
            },
        },
    )
    .await
}

/// The note shown after an action (a fixed text per kind; the customer
/// name is escaped like any other value).
#[derive(Deserialize, Default)]
pub struct Notice {
    done: Option<String>,
    to: Option<String>,
    /// The page of a list.
    page: Option<usize>,
}

impl Notice {
    /// The note, naming the customer only when `login` may see it (a link
    /// cannot put other words on the page).
    fn text(&self, cfg: &Config, login: &Login) -> Option<String> {
        let to = self
            .to
            .as_deref()
            .and_then(|n| customer_for(cfg, login, n).ok())
            .map_or("the customer", |c| cfg.customer(c).name.as_str());
        match self.done.as_deref()? {
            "account-details" => Some(format!("Account details queued for {to}.")),
            "account-details-recent" => Some(format!(
                "Account details were sent to {to} less than {} minutes ago; not sent again.",
                super::ACCOUNT_DETAILS_COOLDOWN.as_secs() / 60
            )),
            "report" => Some(format!("Report queued for {to}.")),
            "saved" => Some(format!(
                "Saved {to}: its file is written and the daemon has reloaded."
            )),
            "saved-pending" => Some(format!(
                "Saved {to}: its file is written; the daemon applies it when its reload finishes (the admin's page shows the last reload)."
            )),
            _ => None,
        }
    }
}

/// A form naming a customer.
#[derive(Deserialize)]
pub struct CustomerAction {
    #[serde(default)]
    csrf: String,
    customer: String,
}

/// Where to go back to after an action on `c`.
fn back(login: &Login, cfg: &Config, c: CustomerId, done: &str) -> String {
    let name = &cfg.customer(c).name;
    let page = match login {
        Login::Admin => "/admin".to_string(),
        Login::Reseller(r) => format!("/resellers/{}", seg(r)),
        Login::Customer(_) => format!("/customers/{}", seg(name)),
    };
    format!("{page}?done={done}&to={}", seg(name))
}

/// `POST /admin/account-details`: the admin's or a reseller's button.
pub async fn send_account_details(
    State(console): State<Arc<Console>>,
    authed: Authed,
    Form(form): Form<CustomerAction>,
) -> Result<Redirect, WebError> {
    authed.check_csrf(&form.csrf)?;
    if matches!(authed.login, Login::Customer(_)) {
        return Err(WebError::NotFound);
    }
    let _turn = turn(&console).await?;
    let cfg = console.ctx.cfg.load_full();
    let id = customer_for(&cfg, &authed.login, &form.customer)?;
    let key = cfg.customer(id).name.to_lowercase();
    {
        let mut sent = console
            .account_sent
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let t = tokio::time::Instant::now();
        sent.retain(|_, at| t.duration_since(*at) < super::ACCOUNT_DETAILS_COOLDOWN);
        if sent.contains_key(&key) {
            return Ok(Redirect::to(&back(
                &authed.login,
                &cfg,
                id,
                "account-details-recent",
            )));
        }
        sent.insert(key, t);
    }
    let now = crate::clock::now();
    let m = crate::reports::account_details_mail(&cfg, id, now)?;
    console.ctx.state.enqueue(&m, now).await?;
    console.ctx.mail_wake.notify_one();
    info!(
        user = %crate::config::escape_log(&authed.user, 64),
        customer = %cfg.customer(id).name,
        "web console: account details queued"
    );
    Ok(Redirect::to(&back(
        &authed.login,
        &cfg,
        id,
        "account-details",
    )))
}

/// `POST /admin/report-now`: the admin's button; the consolidated report
/// of the period in progress, so far.
pub async fn report_now(
    State(console): State<Arc<Console>>,
    authed: Authed,
    Form(form): Form<CustomerAction>,
) -> Result<Redirect, WebError> {
    authed.check_csrf(&form.csrf)?;
    if authed.login != Login::Admin {
        return Err(WebError::NotFound);
    }
    let _turn = turn(&console).await?;
    let cfg = console.ctx.cfg.load_full();
    let id = customer_for(&cfg, &authed.login, &form.customer)?;
    let now = crate::clock::now();
    crate::reports::queue_report_now(&console.ctx.state, &cfg, id, now).await?;
    console.ctx.mail_wake.notify_one();
    info!(customer = %cfg.customer(id).name, "web console: consolidated report queued");
    Ok(Redirect::to(&back(&authed.login, &cfg, id, "report")))
}

/// The first day a chart covers, `YYYY-MM-DD`.
fn chart_start(cfg: &Config, now: Timestamp) -> String {
    let today = cfg.server.timezone.to_datetime(now).date();
    today
        .checked_sub(jiff::Span::new().days(CHART_DAYS - 1))
        .unwrap_or(today)
        .to_string()
}

/// The chart's days: the snapshots, with today's point live.
async fn usage_series(
    console: &Console,
    cfg: &Config,
    names: &[String],
    now: Timestamp,
) -> Result<Vec<(String, Option<u64>)>, WebError> {
    let st = &console.ctx.state;
    let start = chart_start(cfg, now);
    let points = st.usage_history(names, &start).await?;
    let mut series = charts::daily(&points, start, CHART_DAYS);
    if let Some(today) = series.last_mut() {
        today.1 = Some(st.usage_now(names).await?.max(0) as u64);
    }
    Ok(series)
}

/// The usage chart of `names` together, drawn on the page thread.
async fn chart(
    console: &Console,
    cfg: &Config,
    names: &[String],
    title: String,
    space: Option<u64>,
) -> Result<Response, WebError> {
    let series = usage_series(console, cfg, names, crate::clock::now()).await?;
    let body = super::worker::run(move || charts::usage_svg(&title, &series, space)).await?;
    Ok((
        [
            (header::CONTENT_TYPE, "image/svg+xml"),
            (header::CACHE_CONTROL, "private, max-age=60"),
        ],
        body,
    )
        .into_response())
}

/// `GET /customers/{customer}/usage.svg`.
pub async fn customer_chart(
    State(console): State<Arc<Console>>,
    authed: Authed,
    Path(name): Path<String>,
) -> Result<Response, WebError> {
    let _turn = turn(&console).await?;
    let cfg = console.ctx.cfg.load_full();
    let id = customer_for(&cfg, &authed.login, &name)?;
    let c = cfg.customer(id);
    let title = format!("Storage used by {}", c.name);
    chart(
        &console,
        &cfg,
        std::slice::from_ref(&c.name),
        title,
        c.space,
    )
    .await
}

/// `GET /resellers/{reseller}/usage.svg`: the sum of its customers.
pub async fn reseller_chart(
    State(console): State<Arc<Console>>,
    authed: Authed,
    Path(name): Path<String>,
) -> Result<Response, WebError> {
    let _turn = turn(&console).await?;
    let cfg = console.ctx.cfg.load_full();
    let rid = reseller_for(&cfg, &authed.login, &name)?;
    let r = cfg.reseller(rid);
    let names: Vec<String> = r
        .customers
        .iter()
        .map(|&c| cfg.customer(c).name.clone())
        .collect();
    let title = format!("Storage used by the customers of {}", r.name);
    chart(&console, &cfg, &names, title, r.space).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        let phc = "$argon2id$v=19$m=19456,t=2,p=1$dZZ3ob0YSGTwo6umRpK5sA$SQCrzyZK5ExW4JIEsSNKKTiL8p2MX+QKZixCvXOsetA";
        Config::from_str(
            &format!(
                r#"
[server]
state_dir = "/tmp/tollgate-web-test"
[default_customer]
backup_location = "/srv/b/default"
[[reseller]]
name = "acme"
web_access = {{ user = "acme", password = "{phc}" }}
[[reseller]]
name = "globex"
[[customer]]
name = "Contoso Ltd"
reseller = "acme"
email = "a@contoso.example"
backup_location = "/srv/b/contoso"
[[customer]]
name = "Fabrikam"
reseller = "acme"
email = "a@fabrikam.example"
backup_location = "/srv/b/fabrikam"
[[customer]]
name = "Initech"
reseller = "globex"
email = "a@initech.example"
backup_location = "/srv/b/initech"
"#
            ),
            std::path::Path::new("/etc/tollgate/tollgate.toml"),
        )
        .unwrap()
    }

    #[test]
    fn each_login_reaches_only_its_own_subtree() {
        let cfg = cfg();
        let admin = Login::Admin;
        let acme = Login::Reseller("acme".into());
        let contoso = Login::Customer("Contoso Ltd".into());
        // (login, customer in the URL, allowed)
        let cases: &[(&Login, &str, bool)] = &[
            (&admin, "Contoso Ltd", true),
            (&admin, "Initech", true),
            (&admin, "Default Customer", true),
            (&admin, "No Such", false),
            (&acme, "Contoso Ltd", true),
            (&acme, "fabrikam", true),
            (&acme, "Initech", false),
            (&acme, "Default Customer", false),
            (&contoso, "Contoso Ltd", true),
            (&contoso, "CONTOSO LTD", true),
            (&contoso, "Fabrikam", false),
            (&contoso, "Default Customer", false),
            (&contoso, "No Such", false),
        ];
        for (login, name, allowed) in cases {
            let got = customer_for(&cfg, login, name);
            assert_eq!(got.is_ok(), *allowed, "{login:?} → {name}");
            if !allowed {
                // Not the login's and not there look the same.
                assert!(matches!(got, Err(WebError::NotFound)), "{login:?} → {name}");
            }
        }
        let resellers: &[(&Login, &str, bool)] = &[
            (&admin, "acme", true),
            (&admin, "globex", true),
            (&acme, "acme", true),
            (&acme, "globex", false),
            (&acme, "ACME", false),
            (&contoso, "acme", false),
        ];
        for (login, name, allowed) in resellers {
            assert_eq!(
                reseller_for(&cfg, login, name).is_ok(),
                *allowed,
                "{login:?} → {name}"
            );
        }
    }

    #[test]
    fn names_become_one_path_segment() {
        assert_eq!(seg("Contoso Ltd"), "Contoso%20Ltd");
        assert_eq!(seg("a/../b"), "a%2F%2E%2E%2Fb");
        assert_eq!(seg("x?y#z"), "x%3Fy%23z");
    }
}
