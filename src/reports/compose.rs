//! Messages from templates: a plain-text part and an HTML part per message
//! (minijinja, which auto-escapes the `.html` templates), wrapped by lettre
//! into an RFC 5322 message ready for the outbox.

use super::MailError;
use crate::config::units::{format_rate, format_size};
use crate::config::{Config, CustomerId};
use crate::state::{ClientPeriod, Outgoing};
use jiff::Timestamp;
use lettre::Message;
use lettre::message::{Mailbox, MultiPart};
use minijinja::{Environment, Value, context};
use std::sync::OnceLock;

/// Errors listed in a session report at most; the rest are counted.
pub const MAX_ERRORS: usize = 20;

fn env() -> &'static Environment<'static> {
    static ENV: OnceLock<Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut e = Environment::new();
        for (name, src) in [
            ("session.txt", include_str!("templates/session.txt")),
            ("session.html", include_str!("templates/session.html")),
            (
                "consolidated.txt",
                include_str!("templates/consolidated.txt"),
            ),
            (
                "consolidated.html",
                include_str!("templates/consolidated.html"),
            ),
            ("alert.txt", include_str!("templates/alert.txt")),
            ("alert.html", include_str!("templates/alert.html")),
            ("refusals.txt", include_str!("templates/refusals.txt")),
            ("refusals.html", include_str!("templates/refusals.html")),
            ("account.txt", include_str!("templates/account.txt")),
            ("account.html", include_str!("templates/account.html")),
        ] {
            // The templates are part of the binary and tested: a broken one
            // is a build defect, caught by the unit tests below.
            e.add_template(name, src).expect("bundled template parses");
        }
        e
    })
}

fn render(name: &str, ctx: &Value) -> Result<String, MailError> {
    env()
        .get_template(name)
        .and_then(|t| t.render(ctx))
        .map_err(|e| MailError::Template(format!("{name}: {e:#}")))
}

/// `2026-11-29 23:59:59 CET` in the server's zone.
pub fn local(cfg: &Config, t: Timestamp) -> String {
    t.to_zoned_datetime(cfg.server.timezone.clone())
        .strftime("%Y-%m-%d %H:%M:%S %Z")
        .to_string()
}

fn zone_name(cfg: &Config) -> String {
    cfg.server
        .timezone
        .iana_name()
        .unwrap_or("the server's zone")
        .to_string()
}

fn server_name() -> String {
    hostname()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "this server".into())
}

/// Wraps the two parts into a message from `server.email.from`.
fn build(
    cfg: &Config,
    kind: &'static str,
    to: &[String],
    subject: String,
    text: String,
    html: String,
    at: Timestamp,
) -> Result<Outgoing, MailError> {
    let email = cfg.server.email.as_ref().ok_or(MailError::NotConfigured)?;
    let from: Mailbox = email
        .from
        .parse()
        .map_err(|e| MailError::Address(format!("{}: {e}", email.from)))?;
    let mut b = Message::builder()
        .from(from)
        .subject(subject.clone())
        .message_id(None)
        .date(
            std::time::SystemTime::UNIX_EPOCH
                + std::time::Duration::from_secs(at.as_second().max(0) as u64),
        )
        .header(lettre::message::header::UserAgent::from(format!(
            "tollgate/{}",
            env!("CARGO_PKG_VERSION")
        )));
    for t in to {
        b = b.to(t
            .parse::<Mailbox>()
            .map_err(|e| MailError::Address(format!("{t}: {e}")))?);
    }
    let m = b
        .multipart(MultiPart::alternative_plain_html(text, html))
        .map_err(|e| MailError::Address(e.to_string()))?;
    Ok(Outgoing {
        kind,
        subject,
        from: email.from.clone(),
        to: to.to_vec(),
        message: m.formatted(),
    })
}

/// What a finished session did (CONFIG.md "Email reports"). Kept as JSON
/// until its digest goes out, so names, not config ids.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SessionFacts {
    /// Session id.
    pub session: String,
    /// Client id.
    pub client: String,
    /// Its customer's name.
    pub customer: String,
    /// That customer's reseller, if any.
    pub reseller: Option<String>,
    /// Schedule name.
    pub schedule: String,
    /// When it was admitted (Unix seconds).
    pub started: i64,
    /// When it ended (Unix seconds).
    pub ended: i64,
    /// Its result code (`ok`, `disconnected`, `idle_timeout`, …).
    pub result: String,
    /// Files stored.
    pub files_ok: u64,
    /// Uploads refused or failed (a refused PUT counts).
    pub files_failed: u64,
    /// Files restored (GET answered in full).
    pub restored: u64,
    /// Downloads that failed.
    pub restore_failed: u64,
    /// Files deleted.
    pub files_deleted: u64,
    /// Deletes that failed.
    pub delete_failed: u64,
    /// Bytes uploaded.
    pub bytes_in: u64,
    /// Bytes restored.
    pub bytes_out: u64,
    /// Rate in force at the end (bytes/s); `None` = unthrottled.
    pub configured_rate: Option<u64>,
    /// What went wrong, as the client was told (no internals).
    pub errors: Vec<String>,
    /// Errors beyond [`MAX_ERRORS`].
    pub errors_more: u64,
}

/// A session's outcome, as its report names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Everything it tried worked, and it ended normally.
    Ok,
    /// Some of it worked, some did not (or it was cut short).
    Partial,
    /// Nothing it tried worked.
    Failed,
}

impl Outcome {
    /// `OK`, `PARTIAL` or `FAILED`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "OK",
            Outcome::Partial => "PARTIAL",
            Outcome::Failed => "FAILED",
        }
    }
}

impl SessionFacts {
    /// What it did: `backup` (PUTs), `restore` (GETs), `delete`. A session
    /// that only listed did nothing to report.
    pub fn activities(&self) -> Vec<&'static str> {
        let mut a = Vec::new();
        if self.files_ok + self.files_failed > 0 {
            a.push("backup");
        }
        if self.restored + self.restore_failed > 0 {
            a.push("restore");
        }
        if self.files_deleted + self.delete_failed > 0 {
            a.push("delete");
        }
        a
    }

    /// OK, PARTIAL or FAILED. A session the server ended early (idle,
    /// deactivated, removed, shut down, a protocol error) is not OK even if
    /// what it finished worked; a client that closes without BYE after its
    /// work is done ended normally.
    pub fn outcome(&self) -> Outcome {
        let done = self.files_ok + self.restored + self.files_deleted;
        let failed = self.files_failed + self.restore_failed + self.delete_failed;
        let normal = matches!(self.result.as_str(), "ok" | "disconnected");
        if failed == 0 && normal {
            Outcome::Ok
        } else if done > 0 {
            Outcome::Partial
        } else {
            Outcome::Failed
        }
    }

    /// What it did, in words: "backup", "restore and delete".
    pub fn did(&self) -> String {
        let a = self.activities();
        match a.as_slice() {
            [] => "session".into(),
            [one] => (*one).into(),
            [init @ .., last] => format!("{} and {last}", init.join(", ")),
        }
    }

    fn result_text(&self) -> String {
        let mut parts = Vec::new();
        let mut count = |ok: u64, failed: u64, what: &str| {
            if ok + failed > 0 {
                parts.push(if failed == 0 {
                    format!("{ok} file(s) {what}")
                } else {
                    format!("{ok} of {} file(s) {what}, {failed} failed", ok + failed)
                });
            }
        };
        count(self.files_ok, self.files_failed, "stored");
        count(self.restored, self.restore_failed, "restored");
        count(self.files_deleted, self.delete_failed, "deleted");
        let mut text = match self.outcome() {
            Outcome::Ok => "Completed successfully".to_string(),
            Outcome::Partial => "Completed in part".to_string(),
            Outcome::Failed => "Failed".to_string(),
        };
        if !parts.is_empty() {
            text = format!("{text}: {}", parts.join("; "));
        }
        if !matches!(self.result.as_str(), "ok" | "disconnected") {
            text = format!(
                "{text}; the server ended the session ({})",
                self.result.replace('_', " ")
            );
        }
        text
    }
}

/// The reports of one client's sessions to one recipient, in one message
/// (CONFIG.md "Email reports": at most one per client per
/// `report_interval`); a single session reads as a plain session report.
pub fn session_digest(
    cfg: &Config,
    to: &str,
    sessions: &[SessionFacts],
    at: Timestamp,
) -> Result<Outgoing, MailError> {
    let Some(last) = sessions.last() else {
        return Err(MailError::Template("a digest of no session".into()));
    };
    let when = |secs: i64| {
        Timestamp::from_second(secs)
            .map(|t| local(cfg, t))
            .unwrap_or_default()
    };
    let items: Vec<Value> = sessions
        .iter()
        .map(|f| {
            let secs = (f.ended - f.started).max(1) as f64;
            let moved = f.bytes_in.max(f.bytes_out);
            context! {
                session => f.session,
                schedule => f.schedule,
                did => f.did(),
                started => when(f.started),
                ended => when(f.ended),
                duration => format!("{:.0} s", secs),
                outcome => f.outcome().as_str(),
                result_class => f.outcome().as_str().to_lowercase(),
                result_text => f.result_text(),
                files_ok => f.files_ok,
                files_failed => f.files_failed,
                restored => f.restored,
                restore_failed => f.restore_failed,
                files_deleted => f.files_deleted,
                delete_failed => f.delete_failed,
                bytes_in => format_size(f.bytes_in),
                bytes_out => format_size(f.bytes_out),
                average_rate => format_rate((moved as f64 / secs) as u64),
                configured_rate => f.configured_rate.map(format_rate).unwrap_or_else(|| "unthrottled".into()),
                errors => f.errors,
                errors_more => f.errors_more,
            }
        })
        .collect();
    let ctx = context! {
        client => last.client,
        customer => last.customer,
        reseller => last.reseller,
        count => sessions.len(),
        sessions => items,
        server => server_name(),
        timezone => zone_name(cfg),
    };
    let subject = if let [f] = sessions {
        format!(
            "[tollgate] {} {} of {} ({}): {}",
            f.outcome().as_str(),
            f.did(),
            f.client,
            f.customer,
            when(f.ended)
        )
    } else {
        let mut tally = Vec::new();
        for o in [Outcome::Ok, Outcome::Partial, Outcome::Failed] {
            let n = sessions.iter().filter(|f| f.outcome() == o).count();
            if n > 0 {
                tally.push(format!("{n} {}", o.as_str()));
            }
        }
        format!(
            "[tollgate] {} sessions of {} ({}): {}; last {}",
            sessions.len(),
            last.client,
            last.customer,
            tally.join(", "),
            when(last.ended)
        )
    };
    build(
        cfg,
        "session_report",
        &[to.to_string()],
        subject,
        render("session.txt", &ctx)?,
        render("session.html", &ctx)?,
        at,
    )
}

/// The consolidated report of `customer` for `period`.
pub fn consolidated_report(
    cfg: &Config,
    customer: CustomerId,
    period: impl Into<super::ReportSpan>,
    rows: &[ClientPeriod],
    to: &[String],
    at: Timestamp,
) -> Result<Outgoing, MailError> {
    let period: super::ReportSpan = period.into();
    let cust = cfg.customer(customer);
    let space_of = |id: &str| {
        cfg.declared_client(id)
            .and_then(|d| cfg.client(d).space)
            .or(cust.space)
            .map(format_size)
            .unwrap_or_else(|| "unlimited".into())
    };
    let clients: Vec<Value> = rows
        .iter()
        .map(|r| {
            let idle = r.sessions_ok == 0;
            context! {
                id => r.id,
                idle => idle,
                last_backup => r.last_backup
                    .and_then(|s| Timestamp::from_second(s).ok())
                    .map(|t| local(cfg, t))
                    .unwrap_or_else(|| "never".into()),
                sessions_ok => r.sessions_ok,
                sessions_failed => r.sessions_failed,
                bytes_in => format_size(r.bytes_in.max(0) as u64),
                used => r.used.map_or_else(|| "unknown".into(), |u| format_size(u.max(0) as u64)),
                space => space_of(&r.id),
                mcal => r.mcal,
            }
        })
        .collect();
    // Clients with no successful backup in the period go on top.
    let idle: Vec<Value> = clients
        .iter()
        .filter(|c| c.get_attr("idle").map(|v| v.is_true()).unwrap_or(false))
        .cloned()
        .collect();
    let used: i64 = rows.iter().filter_map(|r| r.used).map(|u| u.max(0)).sum();
    let unknown = rows.iter().any(|r| r.used.is_none());
    let freq = period.name.as_str();
    let ctx = context! {
        customer => cust.name,
        frequency => freq,
        period => period.label,
        start => local(cfg, period.start),
        end => local(cfg, period.end),
        timezone => zone_name(cfg),
        clients => clients,
        idle => idle,
        total_ok => rows.iter().map(|r| r.sessions_ok).sum::<i64>(),
        total_failed => rows.iter().map(|r| r.sessions_failed).sum::<i64>(),
        total_in => format_size(rows.iter().map(|r| r.bytes_in.max(0) as u64).sum()),
        space_used => if unknown { format!("at least {}", format_size(used as u64)) } else { format_size(used as u64) },
        space_allotted => cust.space.map(format_size).unwrap_or_else(|| "unlimited".into()),
        server => server_name(),
    };
    let subject = format!(
        "[tollgate] {} report for {}: {}{}",
        freq,
        cust.name,
        period.label,
        if idle.is_empty() {
            String::new()
        } else {
            format!(" ({} without backup)", idle.len())
        }
    );
    build(
        cfg,
        "consolidated_report",
        to,
        subject,
        render("consolidated.txt", &ctx)?,
        render("consolidated.html", &ctx)?,
        at,
    )
}

/// An alert.
pub fn alert(
    cfg: &Config,
    to: &[String],
    headline: &str,
    detail: &str,
    advice: &str,
    at: Timestamp,
) -> Result<Outgoing, MailError> {
    let ctx = context! {
        headline => headline,
        detail => detail,
        advice => advice,
        server => server_name(),
        at => local(cfg, at),
    };
    build(
        cfg,
        "alert",
        to,
        format!("[tollgate] ALERT: {headline}"),
        render("alert.txt", &ctx)?,
        render("alert.html", &ctx)?,
        at,
    )
}

/// The backup server's address as clients dial it: the host of
/// `server.web.public_url` (the name users know the server by) with the
/// first `listen` port, else the first `listen` address itself.
pub fn server_address(cfg: &Config) -> String {
    server_address_bound(cfg, None)
}

/// [`server_address`], with the port the first listener really bound when
/// the config asks for any (`:0`) and the caller knows it.
pub fn server_address_bound(cfg: &Config, bound: Option<std::net::SocketAddr>) -> String {
    let first = match (cfg.server.listen.first().copied(), bound) {
        (Some(a), Some(b)) if a.port() == 0 => Some(std::net::SocketAddr::new(a.ip(), b.port())),
        (a, _) => a,
    };
    let host = cfg
        .server
        .web
        .as_ref()
        .and_then(|w| w.public_url.as_deref())
        .and_then(|u| url::Url::parse(u).ok())
        .and_then(|u| u.host_str().map(str::to_string));
    match (host, first) {
        (Some(h), Some(a)) => format!("{h}:{}", a.port()),
        (None, Some(a)) => a.to_string(),
        (Some(h), None) => h,
        (None, None) => "(no listen address)".into(),
    }
}

/// The account-details mail (CONFIG.md Semantics: account details): the
/// console's address and user name, the server's address and certificate
/// fingerprint, and how to register a client. It has no password: the
/// config holds only hashes, and a password does not belong in mail.
pub fn account_details(
    cfg: &Config,
    customer: CustomerId,
    fingerprint: &str,
    at: Timestamp,
) -> Result<Outgoing, MailError> {
    let c = cfg.customer(customer);
    let to: Vec<String> = c.email.iter().cloned().collect();
    if to.is_empty() {
        return Err(MailError::Address(format!(
            "customer {:?} has no email",
            c.name
        )));
    }
    let console = cfg.server.web.as_ref().and_then(|w| {
        w.public_url
            .clone()
            .or_else(|| Some(format!("https://{}", w.listen)))
    });
    let user = c.web_access.as_ref().map(|w| w.username.clone());
    let ctx = context! {
        customer => c.name,
        console => console.filter(|_| user.is_some()),
        user => user,
        server_address => server_address(cfg),
        fingerprint => fingerprint,
        enroll => c.enroll_key.is_some(),
        auto_add => c.auto_add_clients,
        server => server_name(),
        at => local(cfg, at),
    };
    build(
        cfg,
        "account_details",
        &to,
        format!("[tollgate] Your backup account: {}", c.name),
        render("account.txt", &ctx)?,
        render("account.html", &ctx)?,
        at,
    )
}

/// What to do about a refusal the digest lists.
fn refusal_advice(code: &str) -> &'static str {
    match code {
        "mcal_exhausted" => "raise the customer's or reseller's mcal_limit, or server.mcal.pool",
        "client_limit" => "raise the customer's max_clients, or remove clients it no longer has",
        "quota_exceeded" => "raise the space of the level that is full, or free space",
        "customer_deactivated" => {
            "set the customer's activated = true if its clients should back up"
        }
        _ => "see docs/email.md",
    }
}

/// The daily refusal digest to a reseller or the admin: `rows` are
/// (customer, code, last client, count), for local day `day`.
pub fn refusal_digest(
    cfg: &Config,
    to: &[String],
    day: &str,
    rows: &[crate::state::RefusalCount],
    at: Timestamp,
) -> Result<Outgoing, MailError> {
    let mut customers: Vec<(String, Vec<Value>)> = Vec::new();
    for r in rows {
        let row = context! {
            code => r.code,
            count => r.count,
            client => r.client,
            advice => refusal_advice(&r.code),
        };
        match customers.iter_mut().find(|(n, _)| *n == r.customer) {
            Some((_, v)) => v.push(row),
            None => customers.push((r.customer.clone(), vec![row])),
        }
    }
    let total: i64 = rows.iter().map(|r| r.count).sum();
    let ctx = context! {
        day => day,
        timezone => zone_name(cfg),
        total => total,
        customers => customers
            .into_iter()
            .map(|(name, rows)| context! { name => name, rows => rows })
            .collect::<Vec<_>>(),
        server => server_name(),
        at => local(cfg, at),
    };
    build(
        cfg,
        "refusal_digest",
        to,
        format!("[tollgate] {total} refusal(s) on {day}: clients turned away"),
        render("refusals.txt", &ctx)?,
        render("refusals.html", &ctx)?,
        at,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn cfg() -> Config {
        Config::from_str(
            "[server]\nlisten = [\"127.0.0.1:1\"]\nstate = \"sqlite:///tmp/tollgate-unit/x.db\"\ntimezone = \"Europe/Berlin\"\n\
             [server.email]\nfrom = \"tollgate@example.com\"\nspool = \"/tmp/spool\"\n\
             [[reseller]]\nname = \"r\"\n\
             [[customer]]\nname = \"A<b>&co\"\nreseller = \"r\"\nemail = \"a@example.com\"\nbackup_location = \"/tmp/a\"\n",
            Path::new("/etc/tollgate/t.toml"),
        )
        .unwrap()
    }

    /// Issue 12: what a report calls a session, by what it did.
    #[test]
    fn outcomes_and_activities() {
        let f = |ok, failed, restored, deleted, del_failed, result: &str| SessionFacts {
            files_ok: ok,
            files_failed: failed,
            restored,
            files_deleted: deleted,
            delete_failed: del_failed,
            result: result.into(),
            ..Default::default()
        };
        let cases = [
            (f(3, 0, 0, 0, 0, "ok"), "OK", "backup"),
            (f(0, 1, 0, 0, 0, "ok"), "FAILED", "backup"),
            (f(2, 1, 0, 0, 0, "ok"), "PARTIAL", "backup"),
            (f(2, 0, 0, 0, 0, "idle_timeout"), "PARTIAL", "backup"),
            (
                f(0, 0, 0, 0, 0, "customer_deactivated"),
                "FAILED",
                "session",
            ),
            (f(0, 0, 4, 0, 0, "disconnected"), "OK", "restore"),
            (f(0, 0, 0, 0, 1, "ok"), "FAILED", "delete"),
            (f(1, 0, 1, 1, 0, "ok"), "OK", "backup, restore and delete"),
        ];
        for (facts, outcome, did) in cases {
            assert_eq!(
                (facts.outcome().as_str(), facts.did().as_str()),
                (outcome, did),
                "{facts:?}"
            );
        }
        assert!(
            f(0, 0, 0, 0, 0, "ok").activities().is_empty(),
            "a LIST-only session"
        );
        assert_eq!(
            f(2, 1, 0, 0, 0, "ok").result_text(),
            "Completed in part: 2 of 3 file(s) stored, 1 failed"
        );
        assert_eq!(
            f(0, 0, 0, 0, 0, "shutting_down").result_text(),
            "Failed; the server ended the session (shutting down)"
        );
    }

    #[test]
    fn every_template_renders_and_html_is_escaped() {
        let cfg = cfg();
        let c = cfg.customer_by_name("A<b>&co").unwrap();
        let f = SessionFacts {
            client: "PC-1".into(),
            customer: "A<b>&co".into(),
            schedule: "nightly".into(),
            result: "ok".into(),
            files_failed: 1,
            errors: vec!["bad_path: <script>".into()],
            ..Default::default()
        };
        let at = Timestamp::from_second(1_800_000_000).unwrap();
        let m = session_digest(&cfg, "a@example.com", std::slice::from_ref(&f), at).unwrap();
        let text = String::from_utf8_lossy(&m.message).to_string();
        assert!(m.subject.contains("FAILED backup of PC-1"), "{}", m.subject);
        assert!(text.contains("multipart/alternative"), "{text}");
        assert!(text.contains("&lt;script&gt;"), "HTML part escapes: {text}");
        assert!(!text.contains("<li><script>"), "{text}");
        let ok = SessionFacts {
            files_ok: 2,
            files_failed: 0,
            ..f.clone()
        };
        let m = session_digest(&cfg, "a@example.com", &[f, ok], at).unwrap();
        assert!(
            m.subject
                .contains("2 sessions of PC-1 (A<b>&co): 1 OK, 1 FAILED"),
            "{}",
            m.subject
        );
        let p = crate::policy::period::Period::last_complete(
            crate::config::Frequency::Weekly,
            &cfg.server.timezone,
            at,
        );
        let rows = vec![ClientPeriod {
            id: "PC-1".into(),
            kind: "desktop".into(),
            used: Some(10),
            last_backup: None,
            sessions_ok: 0,
            sessions_failed: 1,
            bytes_in: 0,
            bytes_out: 0,
            mcal: 1,
        }];
        let m = consolidated_report(&cfg, c, &p, &rows, &["a@example.com".into()], at).unwrap();
        assert!(m.subject.contains("(1 without backup)"), "{}", m.subject);
        alert(&cfg, &["a@example.com".into()], "h", "d", "a", at).unwrap();
    }
}
