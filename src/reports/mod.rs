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
use crate::policy::space::{self, Debits, Usage};
use crate::state::{Outgoing, State, StateError};
use jiff::Timestamp;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tracing::{info, warn};

pub use compose::SessionFacts;
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

/// The reports of a finished session, one per recipient, for the customer
/// and the reseller that have `email_reports` on. The caller stores them
/// with the session's end, in one transaction (`State::end_session`), so a
/// crash cannot lose a report of a session that was recorded as ended.
pub fn session_mail(
    cfg: &Config,
    f: &SessionFacts,
    now: Timestamp,
) -> Result<Vec<Outgoing>, MailError> {
    if cfg.server.email.is_none() {
        return Ok(Vec::new());
    }
    let cust = cfg.customer(f.customer);
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
    to.iter()
        .map(|addr| compose::session_report(cfg, f, std::slice::from_ref(addr), now))
        .collect()
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
        for p in period::due(rep.frequency, tz, last, now, MAX_CATCH_UP) {
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
    Ok(queued)
}

/// `tollgate report send`: queues the most recent complete period's report
/// for `customer` and delivers it now. It does not count as the scheduled
/// one. If delivery fails, the message stays in the outbox and the daemon
/// retries it; the error is returned with the period and recipients.
pub async fn send_report_now(
    state: &State,
    cfg: &Config,
    customer: CustomerId,
    frequency: Frequency,
    now: Timestamp,
) -> Result<(Period, Vec<String>, Result<(), MailError>), MailError> {
    let c = cfg.customer(customer);
    let p = Period::last_complete(frequency, &cfg.server.timezone, now);
    let to = match &c.consolidated_report {
        Some(r) => r.recipients.clone(),
        None => c.email.iter().cloned().collect(),
    };
    let rows = state.client_periods(&c.name, p.start, p.end).await?;
    let m = compose::consolidated_report(cfg, customer, &p, &rows, &to, now)?;
    let t = Transport::from_config(cfg)?.ok_or(MailError::NotConfigured)?;
    // Leased, so a running daemon does not deliver it at the same time.
    let lease = now + jiff::SignedDuration::from_secs(120);
    let q = state.enqueue_leased(&m, now, lease).await?;
    let sent = match t.send(&q).await {
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
    };
    Ok((p, to, sent))
}

/// One alert to queue: (subject key, recipient, headline, detail, advice).
type AlertSpec = (String, String, String, String, &'static str);

/// The alerts that hold at this snapshot (CONFIG.md "Alerts"): usage at or
/// over 90% of space at any level, and MCAL allotments or the pool with
/// less left than one more month of their clients' costs.
pub fn alerts_for(
    cfg: &Config,
    usage: &HashMap<String, Usage>,
    client_used: &[(String, String, i64, String)],
    customer_debits: &HashMap<String, Debits>,
    reseller_debits: &HashMap<String, Debits>,
    global: Debits,
) -> Vec<AlertSpec> {
    use crate::config::units::format_size;
    let admin = cfg.server.email.as_ref().and_then(|e| e.admin.clone());
    let mut out: Vec<AlertSpec> = Vec::new();
    let over = |used: u64, space: Option<u64>| space.is_some_and(|s| s > 0 && used * 10 >= s * 9);
    let pct = |used: u64, space: u64| used as f64 * 100.0 / space.max(1) as f64;
    let advice_space =
        "free space (delete old files or clients) or raise the space in the configuration";
    let mut reseller_used = vec![0u64; cfg.resellers.len()];
    let mut server_used = 0u64;
    let mut monthly_cost_customer = vec![0u64; cfg.customers.len()];
    let mut monthly_cost_reseller = vec![0u64; cfg.resellers.len()];
    let mut monthly_cost_all = 0u64;
    for (id, customer, used, kind) in client_used {
        let Some(c) = cfg.customer_by_name(customer) else {
            continue;
        };
        let cost = crate::config::Kind::parse(kind).map_or(0, |k| cfg.mcal_cost(k)) as u64;
        monthly_cost_customer[c.0 as usize] += cost;
        if let Some(r) = cfg.customer(c).reseller {
            monthly_cost_reseller[r.0 as usize] += cost;
        }
        monthly_cost_all += cost;
        let cust = cfg.customer(c);
        if let Some(d) = cfg.declared_client(id)
            && let Some(space) = cfg.client(d).space
            && over(*used as u64, Some(space))
            && let Some(to) = &cust.email
        {
            out.push((
                format!("space:client:{id}"),
                to.clone(),
                format!(
                    "client {id} has used {:.0}% of its space",
                    pct(*used as u64, space)
                ),
                format!(
                    "Client {id} of {} stores {} of its {}.",
                    cust.name,
                    format_size(*used as u64),
                    format_size(space)
                ),
                advice_space,
            ));
        }
    }
    for (i, c) in cfg.customers.iter().enumerate() {
        let used = usage.get(&c.name.to_lowercase()).map_or(0, |u| u.used);
        server_used += used;
        if let Some(r) = c.reseller {
            reseller_used[r.0 as usize] += used;
        }
        if over(used, c.space)
            && let Some(to) = &c.email
        {
            let space = c.space.unwrap_or(0);
            out.push((
                format!("space:customer:{}", c.name),
                to.clone(),
                format!("{} has used {:.0}% of its space", c.name, pct(used, space)),
                format!(
                    "Customer {} stores {} of its {}.",
                    c.name,
                    format_size(used),
                    format_size(space)
                ),
                advice_space,
            ));
        }
        if let McalLimit::Fixed(n) = c.mcal_limit {
            let d = customer_debits
                .get(&c.name.to_lowercase())
                .copied()
                .unwrap_or_default();
            let left = n.saturating_sub(d.total);
            let need = monthly_cost_customer[i];
            if need > 0
                && left < need
                && let Some(to) = &c.email
            {
                out.push((
                    format!("mcal:customer:{}", c.name),
                    to.clone(),
                    format!("{} has {left} MCALs left, less than one month of its clients' costs ({need})", c.name),
                    format!("Customer {} may debit {n} MCALs in all and has debited {}. Its clients cost {need} a month; when none is left, backups are refused with mcal_exhausted.", c.name, d.total),
                    "raise the customer's mcal_limit",
                ));
            }
        }
    }
    for (i, r) in cfg.resellers.iter().enumerate() {
        let Some(to) = &r.email else { continue };
        if over(reseller_used[i], r.space) {
            let space = r.space.unwrap_or(0);
            out.push((
                format!("space:reseller:{}", r.name),
                to.clone(),
                format!(
                    "reseller {} has used {:.0}% of its space",
                    r.name,
                    pct(reseller_used[i], space)
                ),
                format!(
                    "Reseller {}'s customers store {} of its {}.",
                    r.name,
                    format_size(reseller_used[i]),
                    format_size(space)
                ),
                advice_space,
            ));
        }
        if let McalLimit::Fixed(n) = r.mcal_limit {
            let d = reseller_debits.get(&r.name).copied().unwrap_or_default();
            let left = n.saturating_sub(d.total);
            let need = monthly_cost_reseller[i];
            if need > 0 && left < need {
                out.push((
                    format!("mcal:reseller:{}", r.name),
                    to.clone(),
                    format!("reseller {} has {left} MCALs left, less than one month of its clients' costs ({need})", r.name),
                    format!("Reseller {} may debit {n} MCALs in all and has debited {}. Its clients cost {need} a month.", r.name, d.total),
                    "raise the reseller's mcal_limit",
                ));
            }
        }
    }
    if let Some(to) = admin {
        if over(server_used, cfg.server.total_space) {
            let space = cfg.server.total_space.unwrap_or(0);
            out.push((
                "space:server".into(),
                to.clone(),
                format!(
                    "the server has used {:.0}% of its space",
                    pct(server_used, space)
                ),
                format!(
                    "All customers together store {} of the server's {}.",
                    format_size(server_used),
                    format_size(space)
                ),
                "add disk space and raise server.total_space, or free space",
            ));
        }
        if let Some(m) = &cfg.server.mcal {
            let left = space::pool_snapshot(m, global).available;
            if monthly_cost_all > 0 && left < monthly_cost_all {
                out.push((
                    "mcal:pool".into(),
                    to,
                    format!("the MCAL pool has {left} left, less than one month of all clients' costs ({monthly_cost_all})"),
                    format!("The pool holds {} MCALs and {} are debited.", m.pool, global.total),
                    "buy more MCALs and raise server.mcal.pool",
                ));
            }
        }
    }
    out
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
    Ok(queued)
}

/// The background mail task: queues due reports and alerts, and delivers
/// the outbox. `cfg` gives the configuration in force; `wake` is notified
/// when a message was queued or a session ended.
pub async fn run(state: State, cfg: impl Fn() -> Arc<Config> + Send + Sync, wake: Arc<Notify>) {
    let mut next_schedule = tokio::time::Instant::now();
    let mut last_alerts: Option<tokio::time::Instant> = None;
    let mut woken = false;
    let mut transport: Option<(Arc<Config>, Option<Transport>)> = None;
    loop {
        let c = cfg();
        let now = crate::clock::now();
        if tokio::time::Instant::now() >= next_schedule {
            if let Err(e) = queue_due_reports(&state, &c, now).await {
                warn!(error = %e, "queuing consolidated reports failed");
            }
            next_schedule = tokio::time::Instant::now() + SCHEDULE_EVERY;
            woken = true;
        }
        if woken && last_alerts.is_none_or(|t| t.elapsed() >= ALERT_MIN_GAP) {
            if let Err(e) = queue_alerts(&state, &c, now).await {
                warn!(error = %e, "checking alerts failed");
            }
            last_alerts = Some(tokio::time::Instant::now());
            woken = false;
        }
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
        // Sleep until the next message is due, the next schedule check, or
        // a wake-up; never longer than the schedule interval.
        let mut sleep = next_schedule.saturating_duration_since(tokio::time::Instant::now());
        if let Ok(Some(due)) = state.next_mail_due().await {
            let secs = (due - crate::clock::now().as_second()).max(0) as u64;
            sleep = sleep.min(Duration::from_secs(secs).max(Duration::from_millis(200)));
        }
        if woken {
            sleep = sleep.min(ALERT_MIN_GAP);
        }
        tokio::select! {
            _ = tokio::time::sleep(sleep) => {}
            _ = wake.notified() => woken = true,
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
            "[server]\nlisten = [\"127.0.0.1:1\"]\nstate = \"sqlite:///tmp/x.db\"\ntimezone = \"UTC\"\ntotal_space = \"100 MiB\"\n\
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

    fn subjects(v: &[(String, String)]) -> Vec<&str> {
        v.iter().map(|(s, _)| s.as_str()).collect()
    }

    #[test]
    fn alerts_fire_at_ninety_percent_and_under_one_month_of_costs() {
        // Quiet: under 90% everywhere; MCALs left ≥ one month (cost 2).
        assert!(run(8 * MIB, 4 * MIB, 0, 0, 0).is_empty());
        // Exactly 90% of the customer's 10 MiB (9 MiB), and of the client's 5 MiB (4.5 MiB).
        let v = run(9 * MIB, 9 * MIB / 2, 0, 0, 0);
        assert_eq!(subjects(&v), ["space:client:PC", "space:customer:A"]);
        assert!(v.iter().all(|(_, to)| to == "a@x.example"));
        // Just under 90%.
        assert!(run(9 * MIB - 1, 9 * MIB / 2 - 1, 0, 0, 0).is_empty());
        // The customer has 3 and debited 2: 1 left < 2 a month.
        let v = run(0, 0, 2, 2, 2);
        assert_eq!(v, [("mcal:customer:A".into(), "a@x.example".into())]);
        // The reseller has 4 and debited 3: 1 left.
        let v = run(0, 0, 1, 3, 3);
        assert_eq!(v, [("mcal:reseller:r".into(), "r@x.example".into())]);
        // The pool has 10 and 9 are debited.
        let v = run(0, 0, 0, 0, 9);
        assert_eq!(v, [("mcal:pool".into(), "noc@x.example".into())]);
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
