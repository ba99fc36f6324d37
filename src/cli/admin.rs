//! The admin commands that read and change the state database (CLI.md):
//! `status` (the "Disk Space & Client Management" tree) and `clients
//! list|move|remove`. They open the same SQLite file as the running daemon;
//! SQLite's locking makes that safe, and the daemon sees a move or removal
//! at that client's next admission.

use crate::config::Config;
use crate::config::units::{format_rate, format_size};
use crate::policy::space::McalSnapshot;
use crate::state::requests::{Change, Outcome};
use crate::state::status::{CustomerStatus, NodeStatus, Status, status_doc, when, with_declared};
use crate::state::{Readmit, State};
use anyhow::Context;
use std::io::Write;
use std::process::ExitCode;

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Opens the state for a command that only reads it: nothing is written,
/// so it works for a user who may only read the database.
async fn open_read(cfg: &Config) -> anyhow::Result<State> {
    State::open_readonly(cfg)
        .await
        .context("opening the state database for reading")
}

/// Opens the state for a command that changes it. Declared clients are the
/// daemon's to record and move (at start and reload), never a command's.
async fn open(cfg: &Config) -> anyhow::Result<State> {
    State::open_tool(cfg)
        .await
        .context("opening the state database")
}

fn of(used: u64, allotted: Option<u64>) -> String {
    match allotted {
        Some(a) => format!("{} of {}", format_size(used), format_size(a)),
        None => format!("{} (no limit)", format_size(used)),
    }
}

fn mcal_text(m: &Option<McalSnapshot>) -> String {
    match m {
        None => "MCAL not enforced".into(),
        Some(m) => format!(
            "MCAL {}: {} debited, {} this month, {} available",
            m.allotted.map_or("auto".to_string(), |a| a.to_string()),
            m.debited,
            m.debited_this_month,
            m.available
        ),
    }
}

fn render(s: &Status) -> String {
    let mut out = format!(
        "Disk space & client management at {} ({})\n\n",
        s.at, s.timezone
    );
    let node = |n: &NodeStatus| {
        format!(
            "{} used{}; {}; {} refused in 24 h",
            of(n.space.used, n.space.allotted),
            if n.space.reserved > 0 {
                format!(" (+{} in flight)", format_size(n.space.reserved))
            } else {
                String::new()
            },
            mcal_text(&n.mcal),
            n.refusals_24h
        )
    };
    let active = |a: bool| if a { "" } else { " [DEACTIVATED]" };
    let customer = |out: &mut String, c: &CustomerStatus, indent: &str| {
        let max = c.max_clients.map_or(String::new(), |m| format!(" of {m}"));
        *out += &format!(
            "{indent}customer {}{}: {}; {} client(s){max}\n",
            c.name,
            active(c.activated),
            node(&c.node),
            c.clients_registered
        );
        for cl in &c.clients {
            let n = cl.throttle_now.len();
            let rates: Vec<String> = cl
                .throttle_now
                .iter()
                .map(|r| {
                    let rate = r.rate.map_or("unthrottled".to_string(), format_rate);
                    let until = r
                        .until
                        .as_ref()
                        .map_or(String::new(), |u| format!(" until {u}"));
                    let name = match (r.schedule.as_str(), n) {
                        ("*", 1) => "all schedules",
                        ("*", _) => "other schedules",
                        (s, _) => s,
                    };
                    format!("{name}: {rate}{until}")
                })
                .collect();
            let stored = match cl.space {
                Some(_) => of(cl.row.used.max(0) as u64, cl.space),
                None => format_size(cl.row.used.max(0) as u64),
            };
            *out += &format!(
                "{indent}  {} ({}{}): {} stored; last backup {}; last seen {}; MCAL this month {}; throttle now {}\n",
                cl.row.id,
                cl.row.kind,
                if cl.row.registered {
                    ""
                } else if cl.row.declared {
                    ", not yet connected"
                } else {
                    ", removed"
                },
                stored,
                cl.last_backup_local,
                cl.last_seen_local,
                cl.row.mcal_this_month,
                rates.join(", ")
            );
            if let Some(to) = &cl.moves_to {
                *out += &format!(
                    "{indent}    moves to customer {to} when the daemon applies the configuration (its files move then)\n"
                );
            }
        }
    };
    out += &format!("server: {}\n", node(&s.server));
    customer(&mut out, &s.default_customer, "  ");
    for r in &s.resellers {
        out += &format!(
            "  reseller {}{}: {}; {} allotted to customers\n",
            r.name,
            active(r.activated),
            node(&r.node),
            format_size(r.node.space.allotted_to_children)
        );
        for c in &r.customers {
            customer(&mut out, c, "    ");
        }
    }
    if !s.orphans.is_empty() {
        out += "clients whose customer is no longer in the config:\n";
        for o in &s.orphans {
            out += &format!(
                "  {} (customer {:?}): {} stored\n",
                o.row.id,
                o.row.customer,
                format_size(o.row.used.max(0) as u64)
            );
        }
    }
    if let Some(m) = &s.mail {
        out += &match (m.pending, &m.oldest_pending) {
            (0, _) => "mail: the outbox is empty\n".to_string(),
            (n, since) => format!(
                "mail: {n} message(s) waiting in the outbox since {}{}\n",
                since.as_deref().unwrap_or("?"),
                m.last_error
                    .as_ref()
                    .map_or(String::new(), |e| format!("; last error: {e}"))
            ),
        };
    }
    out
}

/// `--period` of `tollgate report send`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum PeriodArg {
    /// The last complete day.
    Daily,
    /// The last complete Monday-to-Sunday week.
    Weekly,
    /// The last complete calendar month.
    Monthly,
}

impl PeriodArg {
    /// The configured frequency it names.
    pub fn frequency(self) -> crate::config::Frequency {
        use crate::config::Frequency;
        match self {
            PeriodArg::Daily => Frequency::Daily,
            PeriodArg::Weekly => Frequency::Weekly,
            PeriodArg::Monthly => Frequency::Monthly,
        }
    }
}

/// `tollgate report send --customer NAME (--period P [--current] | --from D --to D)`.
pub fn report_send(
    cfg: &Config,
    customer: &str,
    ask: crate::reports::ReportAsk,
) -> anyhow::Result<ExitCode> {
    let Some(c) = cfg.customer_by_name(customer) else {
        anyhow::bail!("no customer {customer:?} in the configuration");
    };
    let at = crate::clock::now();
    let (p, to, sent) = runtime()?.block_on(async {
        let st = open(cfg).await?;
        let r = crate::reports::send_report_now(&st, cfg, c, &ask, at).await;
        st.close().await;
        match r {
            Err(crate::reports::MailError::Span(e)) => Err(anyhow::anyhow!("{e}")),
            r => r.context("making the report"),
        }
    })?;
    let name = &cfg.customer(c).name;
    match sent {
        Ok(()) => {
            println!(
                "sent the {} report of {name} for {} to {}",
                p.name,
                p.label,
                to.join(", ")
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!(
                "tollgate: the {} report of {name} for {} is queued, but delivery failed: {e}; the daemon will retry it",
                p.name, p.label
            );
            Ok(ExitCode::from(1))
        }
    }
}

/// `tollgate account send --customer NAME`.
pub fn account_send(cfg: &Config, customer: &str) -> anyhow::Result<ExitCode> {
    let Some(c) = cfg.customer_by_name(customer) else {
        anyhow::bail!("no customer {customer:?} in the configuration");
    };
    let name = &cfg.customer(c).name;
    if cfg.customer(c).email.is_none() {
        anyhow::bail!("customer {name:?} has no email to send its account details to");
    }
    let at = crate::clock::now();
    let (to, sent) = runtime()?.block_on(async {
        let st = open(cfg).await?;
        let r = crate::reports::send_account_details_now(&st, cfg, c, at).await;
        st.close().await;
        r.context("making the account-details mail")
    })?;
    match sent {
        Ok(()) => {
            println!("sent the account details of {name} to {}", to.join(", "));
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!(
                "tollgate: the account details of {name} are queued, but delivery failed: {e}; the daemon will retry them"
            );
            Ok(ExitCode::from(1))
        }
    }
}

/// `tollgate status [--json]`.
pub fn status(cfg: &Config, json: bool) -> anyhow::Result<ExitCode> {
    let at = crate::clock::now();
    let mut data = runtime()?.block_on(async {
        let st = open_read(cfg).await?;
        let d = st
            .status_data(cfg, at)
            .await
            .context("reading the state database")?;
        st.close().await;
        anyhow::Ok(d)
    })?;
    data.clients = with_declared(cfg, std::mem::take(&mut data.clients));
    let doc = status_doc(cfg, &data, at);
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &doc)?;
        writeln!(out)?;
    } else {
        write!(out, "{}", render(&doc))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `tollgate clients list [--json]`.
pub fn clients_list(cfg: &Config, json: bool) -> anyhow::Result<ExitCode> {
    let at = crate::clock::now();
    let rows = runtime()?.block_on(async {
        let st = open_read(cfg).await?;
        let rows = st
            .clients(cfg, at)
            .await
            .context("reading the state database")?;
        st.close().await;
        anyhow::Ok(with_declared(cfg, rows))
    })?;
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &serde_json::json!({ "clients": rows }))?;
        writeln!(out)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut table = vec![[
        "ID".to_string(),
        "CUSTOMER".into(),
        "KIND".into(),
        "MCAL".into(),
        "USAGE".into(),
        "LAST SEEN".into(),
    ]];
    for r in &rows {
        table.push([
            r.id.clone(),
            r.customer.clone(),
            r.kind.clone(),
            r.mcal_this_month.to_string(),
            format_size(r.used.max(0) as u64),
            when(cfg, r.last_seen),
        ]);
    }
    let widths: Vec<usize> = (0..6)
        .map(|i| {
            table
                .iter()
                .map(|r| r[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in &table {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        writeln!(out, "{}", line.join("  ").trim_end())?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `tollgate clients move ID --to CUSTOMER`.
pub fn clients_move(cfg: &Config, id: &str, to: &str) -> anyhow::Result<ExitCode> {
    let change = Change::Move {
        client: id.into(),
        to: to.into(),
    };
    match change_clients(cfg, &change)? {
        Outcome::Moved => {
            println!(
                "moved client {id} to customer {to}: its usage and files moved; this month's licence stays where it was debited"
            );
            Ok(ExitCode::SUCCESS)
        }
        Outcome::Refused { reason } => {
            eprintln!("tollgate: refused: {reason}");
            Ok(ExitCode::FAILURE)
        }
        other => unexpected(other),
    }
}

/// Applies a move or removal: itself when no daemon runs, else through the
/// daemon, which alone sees the uploads in flight (`state::requests`).
fn change_clients(cfg: &Config, change: &Change) -> anyhow::Result<Outcome> {
    let at = crate::clock::now();
    runtime()?.block_on(async {
        let st = open(cfg).await?;
        // On PostgreSQL every node applies changes under the database's
        // locks, so a command applies its own; on SQLite the daemon does
        // while it runs (its reservations are in its memory).
        let lock = match st.cluster() {
            Some(_) => Some(None),
            None => st.lock_daemon().context("locking the state")?.map(Some),
        };
        let outcome = match lock {
            Some(_lock) => crate::server::apply_change(&st, cfg, change, at)
                .await
                .context("changing the client")?,
            None => through_daemon(&st, change).await?,
        };
        st.close().await;
        anyhow::Ok(outcome)
    })
}

/// How long a command waits for the daemon to take its request, and then
/// for the change (moving files can take a while).
const DAEMON_TAKES: std::time::Duration = std::time::Duration::from_secs(30);
const DAEMON_APPLIES: std::time::Duration = std::time::Duration::from_secs(600);

async fn through_daemon(st: &State, change: &Change) -> anyhow::Result<Outcome> {
    let id = st
        .request(change)
        .await
        .context("handing the change to the running daemon")?;
    let start = std::time::Instant::now();
    let mut cancelled_tried = false;
    loop {
        if let Some(o) = st.outcome(id).await? {
            return Ok(o);
        }
        let waited = start.elapsed();
        if waited > DAEMON_TAKES && !cancelled_tried {
            cancelled_tried = true;
            if st.cancel_request(id, crate::clock::now()).await? {
                anyhow::bail!(
                    "the running daemon did not take the change within {} s; nothing was changed (is it stuck? see its log)",
                    DAEMON_TAKES.as_secs()
                );
            }
        }
        if waited > DAEMON_APPLIES {
            anyhow::bail!(
                "the running daemon took the change but has not finished it after {} s; see its log",
                DAEMON_APPLIES.as_secs()
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

fn unexpected(o: Outcome) -> anyhow::Result<ExitCode> {
    match o {
        Outcome::Failed { error } => anyhow::bail!("{error}"),
        other => anyhow::bail!("unexpected outcome {other:?}"),
    }
}

/// `tollgate clients readmit ID` (CLI.md Additions).
pub fn clients_readmit(cfg: &Config, id: &str) -> anyhow::Result<ExitCode> {
    let at = crate::clock::now();
    let r = runtime()?.block_on(async {
        let st = open(cfg).await?;
        let r = st.readmit(id, at).await.context("readmitting the client")?;
        st.close().await;
        anyhow::Ok(r)
    })?;
    match r {
        Readmit::Key { id, key, expires } => {
            let until = expires
                .to_zoned_datetime(cfg.server.timezone.clone())
                .strftime("%Y-%m-%d %H:%M %Z");
            println!("one-time enroll key for client {id}, valid until {until}:");
            println!("{key}");
            println!(
                "The client's next connection presents it as its enroll key (reference client: --enroll-key) and receives a new secret; it keeps its customer, its files and its licence history."
            );
            Ok(ExitCode::SUCCESS)
        }
        Readmit::NoSuchClient => {
            eprintln!("tollgate: no client {id:?} is registered or removed with its files kept");
            Ok(ExitCode::FAILURE)
        }
        Readmit::NeverConnected(id) => {
            eprintln!(
                "tollgate: client {id:?} is declared but has never connected; it enrolls with its customer's enroll key"
            );
            Ok(ExitCode::FAILURE)
        }
    }
}

/// `tollgate clients remove ID [--purge]`.
pub fn clients_remove(cfg: &Config, id: &str, purge: bool) -> anyhow::Result<ExitCode> {
    let change = Change::Remove {
        client: id.into(),
        purge,
    };
    let removed = match change_clients(cfg, &change)? {
        Outcome::NoSuchClient => None,
        Outcome::Removed {
            customer,
            freed_bytes,
            freed_mcal,
        } => Some(crate::state::Removed {
            customer,
            freed_bytes,
            freed_mcal,
        }),
        other => return unexpected(other),
    };
    match removed {
        None => {
            eprintln!("tollgate: no client {id:?} is registered");
            Ok(ExitCode::FAILURE)
        }
        Some(r) => {
            let files = if purge {
                format!(
                    "its files are deleted ({} freed)",
                    format_size(r.freed_bytes)
                )
            } else {
                format!(
                    "its files are kept (use --purge to delete them) and its id stays reserved: `tollgate clients readmit {id}` gives it back to its owner"
                )
            };
            println!(
                "removed client {id} of customer {}: {} MCAL of this month refunded; {files}",
                r.customer, r.freed_mcal
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `tollgate state migrate --to URL` (CLI.md; `state::migrate`).
pub fn state_migrate(cfg: &Config, to: &str) -> anyhow::Result<ExitCode> {
    use crate::state::migrate::{self, Db, Source};
    let from = match &cfg.server.state {
        crate::config::StateUrl::Sqlite(p) => format!("sqlite://{}", p.display()),
        crate::config::StateUrl::Postgres(u) => crate::config::redact_url(u),
    };
    let to_shown = crate::config::redact_url(to);
    println!("copying the state from {from} to {to_shown}");
    let done = runtime()?.block_on(async {
        let source = Source::open(cfg)
            .await
            .with_context(|| format!("opening the source {from}"))?;
        // Before the target is touched.
        source.db.check_schema().await?;
        let target = Db::open_target(to, &source.db)
            .await
            .with_context(|| format!("opening the target {to_shown}"))?;
        let r = migrate::migrate(&source.db, &target, |t| {
            println!("  {:<20} {:>10} rows", t.table, t.rows);
        })
        .await;
        target.close().await;
        source.db.close().await;
        anyhow::Ok(r?)
    });
    match done {
        Ok(m) => {
            let rows: u64 = m.tables.iter().map(|t| t.rows).sum();
            println!(
                "verified: {} tables, {rows} rows; every table's row count, integer sums and content digest read back from {to_shown} equal the source's",
                m.tables.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            // Each cause once: sqlx's errors repeat their source's text.
            let mut msg = String::new();
            for c in e.chain() {
                let c = c.to_string();
                if !msg.contains(&c) {
                    if !msg.is_empty() {
                        msg.push_str(": ");
                    }
                    msg.push_str(&c);
                }
            }
            eprintln!("tollgate state migrate: {msg}");
            Ok(ExitCode::FAILURE)
        }
    }
}
