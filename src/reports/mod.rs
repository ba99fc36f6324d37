//! E-mail (CONFIG.md "Email reports", "Alerts"): per-session reports,
//! consolidated customer reports and alerts.
//!
//! Every message is composed ([`compose`]) and written to the persistent
//! outbox in state first; a background task ([`run`]) delivers it
//! ([`deliver`]) with exponential backoff, and a restart picks up whatever
//! is left. A session's report is stored with the session's end, after
//! its BYE, so mail can never block, slow or fail a backup, and a crash
//! cannot lose it.
//!
//! Consolidated reports are queued together with a record of their period
//! in one transaction: after downtime the missed periods are sent, and no
//! period is ever sent twice. Alerts are recorded per subject and local day.

pub mod compose;
pub mod deliver;

use crate::config::{Config, CustomerId, Frequency, McalLimit};
use crate::policy::period::{self, Period};
use crate::policy::space::{self, Debits, Node, Usage};
use crate::state::{PendingReport, State, StateError};
use jiff::Timestamp;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

pub use compose::{Outcome, SessionFacts};
pub use deliver::Transport;

/// Why a message could not be made or delivered.
#[derive(Debug, thiserror::Error)]
pub enum MailError {
    /// `server.email` is missing (or has neither `smtp` nor `spool`).
    #[error("e-mail is not configured (server.email)")]
    NotConfigured,
    /// An address does not parse.
    #[error("bad address: {0}")]
    Address(String),
    /// A template failed to render.
    #[error("template: {0}")]
    Template(String),
    /// The relay or the spool refused it.
    #[error("delivery: {0}")]
    Transport(String),
    /// The outbox failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// A report cannot cover the span asked for.
    #[error(transparent)]
    Span(SpanError),
}

/// How often reports and alerts are looked for.
pub const SCHEDULE_EVERY: Duration = Duration::from_secs(60);
/// Alerts are checked at most this often, however many sessions end.
pub const ALERT_MIN_GAP: Duration = Duration::from_secs(5);
/// Missed periods sent at most per customer after a long outage.
pub const MAX_CATCH_UP: usize = 62;

/// `daily`, `weekly` or `monthly`.
pub fn frequency_name(f: Frequency) -> &'static str {
    match f {
        Frequency::Daily => "daily",
        Frequency::Weekly => "weekly",
        Frequency::Monthly => "monthly",
    }
}

/// The reports of a finished session, one per recipient (the customer and
/// the reseller that have `email_reports` on), waiting for their digest.
/// None for a session that did nothing to report (it only listed). The
/// caller stores them with the session's end, in one transaction
/// (`State::end_session`), so a crash cannot lose a report of a session
/// that was recorded as ended.
pub fn session_reports(cfg: &Config, customer: CustomerId, f: &SessionFacts) -> Vec<PendingReport> {
    if cfg.server.email.is_none() || f.activities().is_empty() {
        return Vec::new();
    }
    let cust = cfg.customer(customer);
    let mut to: Vec<String> = Vec::new();
    if cust.email_reports
        && let Some(e) = &cust.email
    {
        to.push(e.clone());
    }
    if let Some(r) = cust.reseller.map(|r| cfg.reseller(r))
        && r.email_reports
        && let Some(e) = &r.email
        && !to.contains(e)
    {
        to.push(e.clone());
    }
    // One message per recipient: a customer should not see its reseller's
    // address, nor the reseller the customer's.
    let facts = serde_json::to_string(f).unwrap_or_default();
    to.into_iter()
        .map(|recipient| PendingReport {
            recipient,
            client: f.client.clone(),
            facts: facts.clone(),
        })
        .collect()
}

/// Queues the session digests that are due: for each (recipient, client)
/// with waiting reports and no mail within `report_interval`, one message
/// listing every session since. Returns how many.
pub async fn queue_digests(
    state: &State,
    cfg: &Config,
    now: Timestamp,
) -> Result<usize, MailError> {
    let Some(email) = &cfg.server.email else {
        return Ok(0);
    };
    let mut queued = 0;
    for d in state.due_digests(now, email.report_interval).await? {
        let sessions: Vec<SessionFacts> = d
            .reports
            .iter()
            .filter_map(|(_, json)| serde_json::from_str(json).ok())
            .collect();
        if sessions.is_empty() {
            continue;
        }
        let m = compose::session_digest(cfg, &d.recipient, &sessions, now)?;
        if state.enqueue_digest(&d, &m, now).await?.is_none() {
            // Another node queued it first.
            continue;
        }
        debug!(to = %d.recipient, client = %d.client, sessions = sessions.len(), "session report queued");
        queued += 1;
    }
    Ok(queued)
}

/// What a consolidated report covers: `[start, end)`, with the figures as
/// of `end`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportSpan {
    /// `daily`, `weekly`, `monthly`; `weekly (so far)` for the period in
    /// progress; `custom` for dates given.
    pub name: String,
    /// For people: "2026-11-23 – 2026-11-29".
    pub label: String,
    /// The first instant covered.
    pub start: Timestamp,
    /// The first instant after; the figures are as of this.
    pub end: Timestamp,
}

impl From<&Period> for ReportSpan {
    fn from(p: &Period) -> ReportSpan {
        ReportSpan {
            name: frequency_name(p.frequency).into(),
            label: p.label(),
            start: p.start,
            end: p.end,
        }
    }
}

/// What `tollgate report send` is asked to cover.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReportAsk {
    /// The most recent complete period.
    LastComplete(Frequency),
    /// The period in progress, up to now.
    Current(Frequency),
    /// Local days `from` to `to`, both included (up to now if `to` is today).
    Days(jiff::civil::Date, jiff::civil::Date),
}

/// Why a report cannot cover what was asked.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpanError {
    /// `--from` after `--to`, or a span that has not begun.
    #[error("{0}")]
    Invalid(String),
    /// The span begins before the customer first appeared in state.
    #[error(
        "customer {customer} first appeared in state at {first_seen}; a report may not cover time before that ({what} begins at {start}){hint}"
    )]
    BeforeFirstSeen {
        /// The customer.
        customer: String,
        /// When it first appeared (local, RFC 3339).
        first_seen: String,
        /// The span's start (local).
        start: String,
        /// "the weekly period 2026-11-23 – 2026-11-29".
        what: String,
        /// A way out.
        hint: String,
    },
}

/// The span `ask` names at `now`, in `tz` (a pure function).
pub fn span_for(
    ask: &ReportAsk,
    tz: &jiff::tz::TimeZone,
    now: Timestamp,
) -> Result<ReportSpan, SpanError> {
    match ask {
        ReportAsk::LastComplete(f) => Ok((&Period::last_complete(*f, tz, now)).into()),
        ReportAsk::Current(f) => {
            let p = Period::containing(*f, tz, now);
            Ok(ReportSpan {
                name: format!("{} (so far)", frequency_name(*f)),
                label: format!("{} (so far)", p.label()),
                start: p.start,
                end: now,
            })
        }
        ReportAsk::Days(from, to) => {
            if from > to {
                return Err(SpanError::Invalid(format!(
                    "--from {from} is after --to {to}"
                )));
            }
            let midnight = |d: jiff::civil::Date| {
                tz.to_timestamp(jiff::civil::DateTime::from(d))
                    .map_err(|e| SpanError::Invalid(format!("{d}: {e}")))
            };
            let start = midnight(*from)?;
            let after = to
                .tomorrow()
                .map_err(|e| SpanError::Invalid(format!("{to}: {e}")))?;
            let end = midnight(after)?.min(now);
            if start >= now {
                return Err(SpanError::Invalid(format!(
                    "--from {from} has not begun yet"
                )));
            }
            let label = if from == to {
                from.to_string()
            } else {
                format!("{from} – {to}")
            };
            Ok(ReportSpan {
                name: "custom".into(),
                label,
                start,
                end,
            })
        }
    }
}

/// Refuses a span that begins before the customer first appeared in
/// state (`first_seen`; None = not yet: it appears now).
pub fn check_span(
    cfg: &Config,
    customer: &str,
    span: &ReportSpan,
    first_seen: Option<Timestamp>,
    now: Timestamp,
) -> Result<(), SpanError> {
    let first = first_seen.unwrap_or(now);
    if span.start >= first {
        return Ok(());
    }
    let local = |t: Timestamp| compose::local(cfg, t);
    let next_day = cfg
        .server
        .timezone
        .to_datetime(first)
        .date()
        .tomorrow()
        .ok();
    let hint = match next_day {
        Some(d) if d <= cfg.server.timezone.to_datetime(now).date() => {
            format!("; try --from {d}")
        }
        _ => String::new(),
    };
    Err(SpanError::BeforeFirstSeen {
        customer: customer.to_string(),
        first_seen: local(first),
        start: local(span.start),
        what: format!("the {} report {}", span.name, span.label),
        hint,
    })
}

/// Queues every consolidated report that is due at `now`. Returns how many.
pub async fn queue_due_reports(
    state: &State,
    cfg: &Config,
    now: Timestamp,
) -> Result<usize, MailError> {
    if cfg.server.email.is_none() {
        return Ok(0);
    }
    let tz = &cfg.server.timezone;
    let names: Vec<&str> = cfg.customers.iter().map(|c| c.name.as_str()).collect();
    state.note_customers(&names, now).await?;
    let mut queued = 0;
    for (i, c) in cfg.customers.iter().enumerate() {
        let Some(rep) = &c.consolidated_report else {
            continue;
        };
        let freq = frequency_name(rep.frequency);
        let last = state
            .last_report(&c.name, freq)
            .await?
            .and_then(|d| d.parse().ok());
        // Never a period that began before the customer was in state.
        let first_seen = state.customer_first_seen(&c.name).await?.unwrap_or(now);
        for p in period::due(rep.frequency, tz, last, now, MAX_CATCH_UP) {
            if p.start < first_seen {
                continue;
            }
            let rows = state.client_periods(&c.name, p.start, p.end).await?;
            let m = compose::consolidated_report(
                cfg,
                CustomerId(i as u32),
                &p,
                &rows,
                &rep.recipients,
                now,
            )?;
            if state
                .enqueue_report(&c.name, freq, &p.key(), &m, now)
                .await?
            {
                info!(customer = %c.name, frequency = freq, period = %p.label(), "consolidated report queued");
                queued += 1;
            }
        }
    }
    debug!(queued, "consolidated reports checked");
    Ok(queued)
}

/// `tollgate report send`: queues the report `ask` names for `customer`
/// and delivers it now. It does not count as the scheduled one. A span
/// that begins before the customer first appeared in state is refused. If
/// delivery fails, the message stays in the outbox and the daemon retries
/// it; the error is returned with the span and recipients.
pub async fn send_report_now(
    state: &State,
    cfg: &Config,
    customer: CustomerId,
    ask: &ReportAsk,
    now: Timestamp,
) -> Result<(ReportSpan, Vec<String>, Result<(), MailError>), MailError> {
    let c = cfg.customer(customer);
    let p = span_for(ask, &cfg.server.timezone, now).map_err(MailError::Span)?;
    state.note_customers(&[c.name.as_str()], now).await?;
    let first_seen = state.customer_first_seen(&c.name).await?;
    check_span(cfg, &c.name, &p, first_seen, now).map_err(MailError::Span)?;
    let to = match &c.consolidated_report {
        Some(r) => r.recipients.clone(),
        None => c.email.iter().cloned().collect(),
    };
    let rows = state.client_periods(&c.name, p.start, p.end).await?;
    let m = compose::consolidated_report(cfg, customer, p.clone(), &rows, &to, now)?;
    let sent = deliver_now(state, cfg, &m, now).await?;
    Ok((p, to, sent))
}

/// Queues `m` and delivers it from this process at once (for a command):
/// the outer error is the outbox's, the inner one the delivery's (the
/// message then stays queued, and the daemon retries it).
async fn deliver_now(
    state: &State,
    cfg: &Config,
    m: &crate::state::Outgoing,
    now: Timestamp,
) -> Result<Result<(), MailError>, MailError> {
    let t = Transport::from_config(cfg)?.ok_or(MailError::NotConfigured)?;
    // Leased, so a running daemon does not deliver it at the same time.
    let lease = now + jiff::SignedDuration::from_secs(120);
    let q = state.enqueue_leased(m, now, lease).await?;
    Ok(match t.send(&q).await {
        Ok(()) => {
            state.mail_sent(q.id, crate::clock::now()).await?;
            Ok(())
        }
        Err(e) => {
            state
                .mail_failed(q.id, &e.to_string(), crate::clock::now())
                .await?;
            Err(e)
        }
    })
}

/// Queues the account-details mail of every customer that has
/// `send_account_details = true` and an `email` and has not had it yet
/// (CONFIG.md Semantics: account details). The record and the message are
/// one transaction, so it goes out once, from one node, even across
/// restarts. Returns how many were queued.
pub async fn queue_account_details(
    state: &State,
    cfg: &Config,
    now: Timestamp,
) -> Result<usize, MailError> {
    if cfg.server.email.is_none() {
        return Ok(0);
    }
    let wanted: Vec<CustomerId> = (0..cfg.customers.len())
        .map(|i| CustomerId(i as u32))
        .filter(|&c| cfg.customer(c).send_account_details && cfg.customer(c).email.is_some())
        .collect();
    if wanted.is_empty() {
        return Ok(0);
    }
    let sent: std::collections::HashSet<String> = state
        .account_details_sent()
        .await?
        .into_iter()
        .map(|n| n.to_lowercase())
        .collect();
    let mut queued = 0;
    let mut fingerprint = None;
    for c in wanted {
        let name = &cfg.customer(c).name;
        if sent.contains(&name.to_lowercase()) {
            continue;
        }
        let fp = match &fingerprint {
            Some(fp) => fp,
            None => fingerprint.insert(
                crate::tls::server_fingerprint(cfg)
                    .map_err(|e| MailError::Template(format!("certificate: {e}")))?,
            ),
        };
        let m = compose::account_details(cfg, c, fp, now)?;
        if state.enqueue_account_details(name, &m, now).await? {
            info!(customer = %name, to = ?m.to, "queued the account-details mail");
            queued += 1;
        }
    }
    Ok(queued)
}

/// `customer`'s account-details mail, made now (for `tollgate account
/// send` and the console's button, which may send it again).
pub fn account_details_mail(
    cfg: &Config,
    customer: CustomerId,
    now: Timestamp,
) -> Result<crate::state::Outgoing, MailError> {
    if cfg.server.email.is_none() {
        return Err(MailError::NotConfigured);
    }
    let fp = crate::tls::server_fingerprint(cfg)
        .map_err(|e| MailError::Template(format!("certificate: {e}")))?;
    compose::account_details(cfg, customer, &fp, now)
}

/// `tollgate account send`: makes the mail, queues it and delivers it now.
pub async fn send_account_details_now(
    state: &State,
    cfg: &Config,
    customer: CustomerId,
    now: Timestamp,
) -> Result<(Vec<String>, Result<(), MailError>), MailError> {
    let m = account_details_mail(cfg, customer, now)?;
    let sent = deliver_now(state, cfg, &m, now).await?;
    Ok((m.to, sent))
}

/// Queues `customer`'s consolidated report of the period in progress, so
/// far (the console's "send report now"); the daemon delivers it.
pub async fn queue_report_now(
    state: &State,
    cfg: &Config,
    customer: CustomerId,
    now: Timestamp,
) -> Result<ReportSpan, MailError> {
    let c = cfg.customer(customer);
    let frequency = c
        .consolidated_report
        .as_ref()
        .map_or(Frequency::Monthly, |r| r.frequency);
    let mut p = span_for(&ReportAsk::Current(frequency), &cfg.server.timezone, now)
        .map_err(MailError::Span)?;
    state.note_customers(&[c.name.as_str()], now).await?;
    // A customer newer than the period reports from its first sight on.
    if let Some(first) = state.customer_first_seen(&c.name).await?
        && first > p.start
    {
        p.start = first;
    }
    let to = match &c.consolidated_report {
        Some(r) => r.recipients.clone(),
        None => c.email.iter().cloned().collect(),
    };
    if to.is_empty() {
        return Err(MailError::Address(format!(
            "customer {:?} has no email or report recipients",
            c.name
        )));
    }
    let rows = state.client_periods(&c.name, p.start, p.end).await?;
    let m = compose::consolidated_report(cfg, customer, p.clone(), &rows, &to, now)?;
    state.enqueue(&m, now).await?;
    Ok(p)
}

/// One alert to queue: (subject key, recipient, headline, detail, advice).
type AlertSpec = (String, String, String, String, &'static str);

/// The alerts that hold at this snapshot (CONFIG.md "Alerts"): usage at or
/// over 90% of space at any level, and MCAL allotments or the pool with
/// less left than one more month of their clients' costs. Client and
/// customer alerts go to the customer's `email`; customer alerts also go
/// to its reseller's `email` (or `server.email.admin` for a customer
/// directly under the server), who can raise the allotment. Reseller
/// alerts go to the reseller's, server and pool alerts to the admin.
pub fn alerts_for(
    cfg: &Config,
    usage: &HashMap<String, Usage>,
    client_used: &[(String, String, i64, String)],
    customer_debits: &HashMap<String, Debits>,
    reseller_debits: &HashMap<String, Debits>,
    global: Debits,
) -> Vec<AlertSpec> {
    use crate::config::units::format_size;
    let mut out: Vec<AlertSpec> = Vec::new();
    let space_alert = |out: &mut Vec<AlertSpec>,
                       key: String,
                       to: &str,
                       short: &str,
                       long: &str,
                       used: u64,
                       space: Option<u64>| {
        let Some(space) = space.filter(|s| *s > 0 && used * 10 >= s * 9) else {
            return;
        };
        out.push((
            format!("space:{key}"),
            to.to_string(),
            format!(
                "{short} has used {:.0}% of its space",
                used as f64 * 100.0 / space as f64
            ),
            format!(
                "{long} stores {} of its {}.",
                format_size(used),
                format_size(space)
            ),
            "free space (delete old files or clients) or raise the space in the configuration",
        ));
    };
    let mcal_alert = |out: &mut Vec<AlertSpec>,
                      key: &str,
                      to: &str,
                      what: &str,
                      left: u64,
                      need: u64,
                      advice: &'static str| {
        if need > 0 && left < need {
            out.push((
                format!("mcal:{key}"),
                to.to_string(),
                format!("{what} has {left} left, less than one month of its clients' costs ({need})"),
                format!("{what} has {left} MCALs left and its clients cost {need} a month; when none is left, backups are refused with mcal_exhausted."),
                advice,
            ));
        }
    };
    // Bytes used and monthly MCAL cost per node.
    let mut used = PerNode::new(cfg);
    let mut cost = PerNode::new(cfg);
    for (i, c) in cfg.customers.iter().enumerate() {
        let u = usage.get(&c.name.to_lowercase()).map_or(0, |u| u.used);
        used.add(CustomerId(i as u32), c.reseller, u);
    }
    for (id, customer, client_used, kind) in client_used {
        let Some(c) = cfg.customer_by_name(customer) else {
            continue;
        };
        let cust = cfg.customer(c);
        let k = crate::config::Kind::parse(kind).map_or(0, |k| cfg.mcal_cost(k)) as u64;
        cost.add(c, cust.reseller, k);
        if let (Some(d), Some(to)) = (cfg.declared_client(id), &cust.email) {
            let who = format!("client {id}");
            let long = format!("Client {id} of {}", cust.name);
            space_alert(
                &mut out,
                format!("client:{id}"),
                to,
                &who,
                &long,
                (*client_used).max(0) as u64,
                cfg.client(d).space,
            );
        }
    }
    let at = |m: &PerNode, n: Node| m.get(n);
    let admin = cfg.server.email.as_ref().and_then(|e| e.admin.as_deref());
    for (i, c) in cfg.customers.iter().enumerate() {
        let n = Node::Customer(CustomerId(i as u32));
        // A customer cannot raise its own allotment: who can (its reseller,
        // or the admin for customers directly under the server) gets a
        // copy, under its own subject key so each is sent once a day.
        let up: Option<(&str, &str)> = match c.reseller.map(|r| cfg.reseller(r)) {
            Some(r) => r.email.as_deref().map(|e| (e, "reseller")),
            None => admin.map(|e| (e, "admin")),
        };
        let recipients: Vec<(String, &str)> = c
            .email
            .iter()
            .map(|e| (String::new(), e.as_str()))
            // One copy to an address that is both the customer's and the
            // one above it.
            .chain(
                up.filter(|(e, _)| c.email.as_deref() != Some(*e))
                    .map(|(e, who)| (format!(":to-{who}"), e)),
            )
            .collect();
        let long = format!("Customer {}", c.name);
        for (suffix, to) in &recipients {
            space_alert(
                &mut out,
                format!("customer:{}{suffix}", c.name),
                to,
                &c.name,
                &long,
                at(&used, n),
                c.space,
            );
        }
        if let McalLimit::Fixed(_) = c.mcal_limit {
            let d = customer_debits
                .get(&c.name.to_lowercase())
                .copied()
                .unwrap_or_default();
            let left = space::allotment_snapshot(c.mcal_limit, d, u64::MAX).available;
            let what = format!("{}'s MCAL allotment", c.name);
            for (suffix, to) in &recipients {
                mcal_alert(
                    &mut out,
                    &format!("customer:{}{suffix}", c.name),
                    to,
                    &what,
                    left,
                    at(&cost, n),
                    "raise the customer's mcal_limit",
                );
            }
        }
    }
    for (i, r) in cfg.resellers.iter().enumerate() {
        let (n, Some(to)) = (
            Node::Reseller(crate::config::ResellerId(i as u32)),
            &r.email,
        ) else {
            continue;
        };
        let (short, long) = (
            format!("reseller {}", r.name),
            format!("Reseller {}'s customers", r.name),
        );
        space_alert(
            &mut out,
            format!("reseller:{}", r.name),
            to,
            &short,
            &long,
            at(&used, n),
            r.space,
        );
        if let McalLimit::Fixed(_) = r.mcal_limit {
            let d = reseller_debits.get(&r.name).copied().unwrap_or_default();
            let left = space::allotment_snapshot(r.mcal_limit, d, u64::MAX).available;
            let what = format!("reseller {}'s MCAL allotment", r.name);
            mcal_alert(
                &mut out,
                &format!("reseller:{}", r.name),
                to,
                &what,
                left,
                at(&cost, n),
                "raise the reseller's mcal_limit",
            );
        }
    }
    if let Some(to) = admin {
        let n = Node::Server;
        space_alert(
            &mut out,
            "server".into(),
            to,
            "the server",
            "All customers together",
            at(&used, n),
            cfg.server.total_space,
        );
        if let Some(m) = &cfg.server.mcal {
            let left = space::pool_snapshot(m, global).available;
            mcal_alert(
                &mut out,
                "pool",
                to,
                "the MCAL pool",
                left,
                at(&cost, n),
                "buy more MCALs and raise server.mcal.pool",
            );
        }
    }
    out
}

/// A figure per node, added up from customers to their reseller and the
/// server.
struct PerNode {
    customer: Vec<u64>,
    reseller: Vec<u64>,
    server: u64,
}

impl PerNode {
    fn new(cfg: &Config) -> PerNode {
        PerNode {
            customer: vec![0; cfg.customers.len()],
            reseller: vec![0; cfg.resellers.len()],
            server: 0,
        }
    }

    fn add(&mut self, c: CustomerId, r: Option<crate::config::ResellerId>, v: u64) {
        self.customer[c.0 as usize] += v;
        if let Some(r) = r {
            self.reseller[r.0 as usize] += v;
        }
        self.server += v;
    }

    fn get(&self, n: Node) -> u64 {
        match n {
            Node::Customer(c) => self.customer[c.0 as usize],
            Node::Reseller(r) => self.reseller[r.0 as usize],
            Node::Server => self.server,
        }
    }
}

/// Queues the alerts that hold now, at most one per subject per local day.
pub async fn queue_alerts(state: &State, cfg: &Config, now: Timestamp) -> Result<usize, MailError> {
    if cfg.server.email.is_none() {
        return Ok(0);
    }
    let totals = state.totals(cfg, now).await?;
    let clients = state.client_usage().await?;
    let specs = alerts_for(
        cfg,
        &totals.customers,
        &clients,
        &totals.customer_debits,
        &totals.reseller_debits,
        totals.global_debits,
    );
    let day = cfg.server.timezone.to_datetime(now).date().to_string();
    let mut queued = 0;
    for (subject, to, headline, detail, advice) in specs {
        let m = compose::alert(cfg, &[to], &headline, &detail, advice, now)?;
        if state.enqueue_alert(&subject, &day, &m, now).await? {
            info!(subject = %subject, "alert queued");
            queued += 1;
        }
    }
    debug!(queued, "alerts checked");
    Ok(queued)
}

/// Queues the refusal digests of the last complete local day, and of the
/// days before it a stopped daemon missed, up to a week (docs/email.md
/// "Refusal digest"): per reseller, the refusals of its customers that only
/// it can fix; to `server.email.admin`, those of customers directly under
/// the server (or of a reseller without an `email`). Once per recipient per
/// day, and only when there was a refusal. Returns how many.
pub async fn queue_refusal_digests(
    state: &State,
    cfg: &Config,
    now: Timestamp,
) -> Result<usize, MailError> {
    let Some(email) = &cfg.server.email else {
        return Ok(0);
    };
    // What was noted in memory in the last second counts too.
    state.flush_refusals().await?;
    let tz = &cfg.server.timezone;
    let mut queued = 0;
    let mut day = Period::last_complete(Frequency::Daily, tz, now);
    // The last complete day and the ones before it that a stopped daemon
    // missed, up to a week back; each recipient's day is sent once.
    for _ in 0..REFUSAL_DIGEST_DAYS {
        queued += refusal_digest_for(state, cfg, email, &day, now).await?;
        day = Period::containing(
            Frequency::Daily,
            tz,
            day.start - jiff::SignedDuration::from_secs(1),
        );
    }
    Ok(queued)
}

/// Days back the refusal digest catches up after downtime.
pub const REFUSAL_DIGEST_DAYS: usize = 7;

async fn refusal_digest_for(
    state: &State,
    cfg: &Config,
    email: &crate::config::Email,
    day: &Period,
    now: Timestamp,
) -> Result<usize, MailError> {
    let rows = state.refusal_counts(day.start, day.end).await?;
    let mut by_recipient: Vec<(String, Vec<crate::state::RefusalCount>)> = Vec::new();
    for r in rows {
        let Some(c) = cfg.customer_by_name(&r.customer) else {
            continue;
        };
        let to = match cfg.customer(c).reseller.map(|x| cfg.reseller(x)) {
            Some(res) if res.email.is_some() => res.email.clone(),
            _ => email.admin.clone(),
        };
        let Some(to) = to else { continue };
        match by_recipient.iter_mut().find(|(t, _)| *t == to) {
            Some((_, v)) => v.push(r),
            None => by_recipient.push((to, vec![r])),
        }
    }
    let mut queued = 0;
    for (to, rows) in by_recipient {
        let m = compose::refusal_digest(cfg, std::slice::from_ref(&to), &day.label(), &rows, now)?;
        if state
            .enqueue_alert(&format!("refusals:{to}"), &day.key(), &m, now)
            .await?
        {
            info!(to = %to, day = %day.label(), "refusal digest queued");
            queued += 1;
        }
    }
    Ok(queued)
}

/// The background mail tasks: one queues what is due (session digests,
/// consolidated reports, alerts), the other delivers the outbox, so a relay
/// that hangs never holds up the queuing. `cfg` gives the configuration in
/// force; `wake` is notified when a message was queued or a session ended.
pub async fn run(
    state: State,
    cfg: impl Fn() -> Arc<Config> + Send + Sync + Clone + 'static,
    wake: Arc<Notify>,
) {
    let outbox = Arc::new(Notify::new());
    let deliverer = tokio::spawn(deliver_loop(state.clone(), cfg.clone(), outbox.clone()));
    schedule_loop(state, cfg, wake, outbox).await;
    deliverer.abort();
}

/// Queues session digests, consolidated reports and alerts when due.
async fn schedule_loop(
    state: State,
    cfg: impl Fn() -> Arc<Config> + Send + Sync,
    wake: Arc<Notify>,
    outbox: Arc<Notify>,
) {
    let mut next_schedule = tokio::time::Instant::now();
    let mut last_alerts: Option<tokio::time::Instant> = None;
    let mut woken = false;
    loop {
        let c = cfg();
        let now = crate::clock::now();
        let mut queued = 0;
        match queue_account_details(&state, &c, now).await {
            Ok(n) => queued += n,
            Err(e) => warn!(error = %e, "queuing account-details mail failed"),
        }
        match queue_digests(&state, &c, now).await {
            Ok(n) => queued += n,
            Err(e) => warn!(error = %e, "queuing session reports failed"),
        }
        if tokio::time::Instant::now() >= next_schedule {
            match queue_due_reports(&state, &c, now).await {
                Ok(n) => queued += n,
                Err(e) => warn!(error = %e, "queuing consolidated reports failed"),
            }
            match queue_refusal_digests(&state, &c, now).await {
                Ok(n) => queued += n,
                Err(e) => warn!(error = %e, "queuing refusal digests failed"),
            }
            next_schedule = tokio::time::Instant::now() + SCHEDULE_EVERY;
            woken = true;
        }
        if woken && last_alerts.is_none_or(|t| t.elapsed() >= ALERT_MIN_GAP) {
            match queue_alerts(&state, &c, now).await {
                Ok(n) => queued += n,
                Err(e) => warn!(error = %e, "checking alerts failed"),
            }
            last_alerts = Some(tokio::time::Instant::now());
            woken = false;
        }
        if queued > 0 {
            outbox.notify_one();
        }
        // Sleep until the next digest is due, the next schedule check, or a
        // wake-up; never longer than the schedule interval.
        let mut sleep = next_schedule.saturating_duration_since(tokio::time::Instant::now());
        if let Some(email) = &c.server.email
            && let Ok(Some(due)) = state.next_digest_due(email.report_interval).await
        {
            let secs = (due - crate::clock::now().as_second()).max(0) as u64;
            sleep = sleep.min(Duration::from_secs(secs).max(Duration::from_millis(200)));
        }
        if woken {
            sleep = sleep.min(ALERT_MIN_GAP);
        }
        tokio::select! {
            _ = tokio::time::sleep(sleep) => {}
            _ = wake.notified() => {
                woken = true;
                // Whoever woke us may have queued a message itself (the
                // console's buttons): the deliverer looks at once.
                outbox.notify_one();
            }
        }
    }
}

/// Delivers the outbox, with retries, as messages come due.
async fn deliver_loop(
    state: State,
    cfg: impl Fn() -> Arc<Config> + Send + Sync,
    outbox: Arc<Notify>,
) {
    let mut transport: Option<(Arc<Config>, Option<Transport>)> = None;
    loop {
        let c = cfg();
        // The transport (and its SMTP connection pool) lives until a reload
        // changes the config; a bad setting is reported once per config.
        if !transport
            .as_ref()
            .is_some_and(|(for_cfg, _)| Arc::ptr_eq(for_cfg, &c))
        {
            let t = Transport::from_config(&c).unwrap_or_else(|e| {
                warn!(error = %e, "cannot deliver mail; it waits in the outbox");
                None
            });
            transport = Some((c.clone(), t));
        }
        if let Some((_, Some(t))) = &transport
            && let Err(e) = deliver::deliver_due(&state, t).await
        {
            warn!(error = %e, "delivering mail failed");
        }
        let mut sleep = SCHEDULE_EVERY;
        if let Ok(Some(due)) = state.next_mail_due().await {
            let secs = (due - crate::clock::now().as_second()).max(0) as u64;
            sleep = sleep.min(Duration::from_secs(secs).max(Duration::from_millis(200)));
        }
        tokio::select! {
            _ = tokio::time::sleep(sleep) => {}
            _ = outbox.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const MIB: i64 = 1 << 20;

    fn cfg() -> Config {
        Config::from_str(
            "[server]\nlisten = [\"127.0.0.1:1\"]\nstate = \"sqlite:///tmp/tollgate-unit/x.db\"\ntimezone = \"UTC\"\ntotal_space = \"100 MiB\"\n\
             [server.mcal]\npool = 10\n\
             [server.email]\nfrom = \"t@x.example\"\nadmin = \"noc@x.example\"\nspool = \"/tmp/s\"\n\
             [default_customer]\nspace = \"0 B\"\n\
             [[reseller]]\nname = \"r\"\nemail = \"r@x.example\"\nspace = \"50 MiB\"\nmcal_limit = 4\n\
             [[customer]]\nname = \"A\"\nreseller = \"r\"\nemail = \"a@x.example\"\nbackup_location = \"/tmp/a\"\nspace = \"10 MiB\"\nmcal_limit = 3\n\
             [[client]]\nid = \"PC\"\ncustomer = \"A\"\nkind = \"server\"\nspace = \"5 MiB\"\n",
            Path::new("/etc/tollgate/t.toml"),
        )
        .unwrap_or_else(|e| panic!("{e:?}"))
    }

    /// (customer usage, client usage, customer debits, reseller debits,
    /// global debits) → the alert subjects and their recipients.
    fn run(
        a_used: i64,
        pc_used: i64,
        a_deb: u64,
        r_deb: u64,
        all_deb: u64,
    ) -> Vec<(String, String)> {
        let c = cfg();
        let usage = HashMap::from([(
            "a".to_string(),
            Usage {
                used: a_used as u64,
                reserved: 0,
            },
        )]);
        let clients = vec![(
            "PC".to_string(),
            "A".to_string(),
            pc_used,
            "server".to_string(),
        )];
        let d = |n| Debits {
            total: n,
            this_month: 0,
        };
        let mut v: Vec<(String, String)> = alerts_for(
            &c,
            &usage,
            &clients,
            &HashMap::from([("a".to_string(), d(a_deb))]),
            &HashMap::from([("r".to_string(), d(r_deb))]),
            d(all_deb),
        )
        .into_iter()
        .map(|(s, to, ..)| (s, to))
        .collect();
        v.sort();
        v
    }

    #[test]
    fn alerts_fire_at_ninety_percent_and_under_one_month_of_costs() {
        // Quiet: under 90% everywhere; MCALs left ≥ one month (cost 2).
        assert!(run(8 * MIB, 4 * MIB, 0, 0, 0).is_empty());
        // Exactly 90% of the customer's 10 MiB (9 MiB), and of the client's 5 MiB (4.5 MiB).
        // The customer's alert also goes to its reseller, who can raise
        // the allotment; the client's does not.
        let v = run(9 * MIB, 9 * MIB / 2, 0, 0, 0);
        assert_eq!(
            v,
            [
                ("space:client:PC".into(), "a@x.example".into()),
                ("space:customer:A".into(), "a@x.example".into()),
                ("space:customer:A:to-reseller".into(), "r@x.example".into()),
            ]
        );
        // Just under 90%.
        assert!(run(9 * MIB - 1, 9 * MIB / 2 - 1, 0, 0, 0).is_empty());
        // The customer has 3 and debited 2: 1 left < 2 a month.
        let v = run(0, 0, 2, 2, 2);
        assert_eq!(
            v,
            [
                ("mcal:customer:A".into(), "a@x.example".into()),
                ("mcal:customer:A:to-reseller".into(), "r@x.example".into()),
            ]
        );
        // The reseller has 4 and debited 3: 1 left.
        let v = run(0, 0, 1, 3, 3);
        assert_eq!(v, [("mcal:reseller:r".into(), "r@x.example".into())]);
        // The pool has 10 and 9 are debited.
        let v = run(0, 0, 0, 0, 9);
        assert_eq!(v, [("mcal:pool".into(), "noc@x.example".into())]);
    }

    #[test]
    fn report_spans_are_real_time() {
        let tz = jiff::tz::TimeZone::get("Europe/Berlin").unwrap();
        let now: Timestamp = "2026-12-16T12:00:00Z".parse().unwrap();
        let d = |s: &str| s.parse::<jiff::civil::Date>().unwrap();
        let t = |s: &str| s.parse::<Timestamp>().unwrap();
        // (ask, Ok((start, end, label)) or the error's start)
        type Want = Result<(&'static str, &'static str, &'static str), &'static str>;
        let cases: Vec<(ReportAsk, Want)> = vec![
            (
                ReportAsk::LastComplete(Frequency::Weekly),
                Ok((
                    "2026-12-06T23:00:00Z",
                    "2026-12-13T23:00:00Z",
                    "2026-12-07 – 2026-12-13",
                )),
            ),
            (
                ReportAsk::Current(Frequency::Monthly),
                Ok((
                    "2026-11-30T23:00:00Z",
                    "2026-12-16T12:00:00Z",
                    "2026-12-01 – 2026-12-31 (so far)",
                )),
            ),
            (
                ReportAsk::Days(d("2026-12-01"), d("2026-12-01")),
                Ok(("2026-11-30T23:00:00Z", "2026-12-01T23:00:00Z", "2026-12-01")),
            ),
            // To today: up to now.
            (
                ReportAsk::Days(d("2026-12-10"), d("2026-12-16")),
                Ok((
                    "2026-12-09T23:00:00Z",
                    "2026-12-16T12:00:00Z",
                    "2026-12-10 – 2026-12-16",
                )),
            ),
            (
                ReportAsk::Days(d("2026-12-05"), d("2026-12-01")),
                Err("is after"),
            ),
            (
                ReportAsk::Days(d("2026-12-17"), d("2026-12-18")),
                Err("has not begun"),
            ),
        ];
        for (ask, want) in cases {
            match (span_for(&ask, &tz, now), want) {
                (Ok(s), Ok((a, b, l))) => {
                    assert_eq!(
                        (s.start, s.end, s.label.as_str()),
                        (t(a), t(b), l),
                        "{ask:?}"
                    )
                }
                (Err(e), Err(w)) => assert!(e.to_string().contains(w), "{ask:?}: {e}"),
                (got, want) => panic!("{ask:?}: {got:?}, wanted {want:?}"),
            }
        }
        // A span that began before the customer first appeared is refused.
        let c = cfg();
        let span = span_for(&ReportAsk::LastComplete(Frequency::Weekly), &tz, now).unwrap();
        assert!(check_span(&c, "A", &span, Some(span.start), now).is_ok());
        let later = span.start + jiff::SignedDuration::from_secs(1);
        let e = check_span(&c, "A", &span, Some(later), now).unwrap_err();
        assert!(e.to_string().contains("first appeared in state"), "{e}");
        // Not in state yet: it appears now, so any past span is refused.
        assert!(check_span(&c, "A", &span, None, now).is_err());
    }

    #[test]
    fn one_copy_to_an_address_that_is_both_customer_and_reseller() {
        let text = "[server]\nlisten = [\"127.0.0.1:1\"]\nstate = \"sqlite:///tmp/tollgate-unit/x.db\"\ntimezone = \"UTC\"\n\
             [server.email]\nfrom = \"t@x.example\"\nspool = \"/tmp/s\"\n\
             [[reseller]]\nname = \"r\"\nemail = \"same@x.example\"\n\
             [[customer]]\nname = \"A\"\nreseller = \"r\"\nemail = \"same@x.example\"\nbackup_location = \"/tmp/a\"\nspace = \"10 MiB\"\n";
        let c = Config::from_str(text, Path::new("/etc/tollgate/t.toml")).unwrap();
        let usage = HashMap::from([(
            "a".to_string(),
            Usage {
                used: 10 * MIB as u64,
                reserved: 0,
            },
        )]);
        let v: Vec<(String, String)> = alerts_for(
            &c,
            &usage,
            &[],
            &HashMap::new(),
            &HashMap::new(),
            Debits::default(),
        )
        .into_iter()
        .map(|(s, to, ..)| (s, to))
        .collect();
        assert_eq!(
            v,
            [("space:customer:A".to_string(), "same@x.example".to_string())]
        );
    }

    #[test]
    fn reseller_and_server_space_alerts_go_up_the_tree() {
        // 45 MiB of the reseller's 50 MiB is 90%: the customer (10 MiB) is
        // also over, the server (100 MiB) is not.
        let v = run(45 * MIB, 0, 0, 0, 0);
        assert_eq!(
            v,
            [
                ("space:customer:A".into(), "a@x.example".into()),
                ("space:customer:A:to-reseller".into(), "r@x.example".into()),
                ("space:reseller:r".into(), "r@x.example".into()),
            ]
        );
        let v = run(90 * MIB, 0, 0, 0, 0);
        assert!(
            v.contains(&("space:server".into(), "noc@x.example".into())),
            "{v:?}"
        );
    }
}
