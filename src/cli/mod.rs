//! The `tollgate` command line (CLI.md): argument parsing and the
//! subcommands that exist so far. Output for people is aligned text; with
//! `--json` exactly one JSON document goes to stdout. Exit status: 0 done,
//! 1 the thing asked for failed, 2 wrong usage (clap's own).

mod admin;
mod client;
mod disk;
mod serve;

use crate::config::units::format_size;
use crate::config::{Config, CustomerId, DEFAULT_CONFIG_PATH, LoadError, ResellerId};
use crate::policy::space::{self, Debits, McalSnapshot, Node, SpaceSnapshot, Usage};
use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use serde::Serialize;
use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

/// Tollgate: admission, licences, space and bandwidth for a backup server.
#[derive(Debug, Parser)]
#[command(name = "tollgate", version, about, long_about = None)]
pub struct Cli {
    /// The configuration file.
    #[arg(long, global = true, env = "TOLLGATE_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate the configuration like `nginx -t`: print every error with
    /// file:line:column, or the space and MCAL snapshots.
    CheckConfig {
        /// Print one JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Read a secret from stdin (or a no-echo prompt on a terminal) and print
    /// its argon2id PHC hash, for `enroll_key` or `web_access.password`.
    HashSecret,
    /// Show the tree server → resellers → customers → clients with usage
    /// against space, MCALs, client counts, activation, last backups,
    /// refusals and the throttle in force now.
    Status {
        /// Print one JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run the daemon (systemd Type=notify; a plain foreground process elsewhere).
    Serve {
        /// Log line format.
        #[arg(long, value_enum, default_value_t = serve::LogFormat::Text)]
        log_format: serve::LogFormat,
        /// This node's name in a cluster on PostgreSQL, over
        /// `server.cluster.node` (several nodes can then share one config
        /// file).
        #[arg(long, value_name = "NAME")]
        node: Option<String>,
    },
    /// The reference backup client.
    Client {
        /// What to do.
        #[command(subcommand)]
        action: client::ClientAction,
    },
    /// E-mail reports.
    Report {
        /// What to do.
        #[command(subcommand)]
        action: ReportAction,
    },
    /// Customers' account details.
    Account {
        /// What to do.
        #[command(subcommand)]
        action: AccountAction,
    },
    /// List, move, remove or readmit clients.
    Clients {
        /// What to do.
        #[command(subcommand)]
        action: ClientsAction,
    },
    /// The state database.
    State {
        /// What to do.
        #[command(subcommand)]
        action: StateAction,
    },
}

/// `tollgate state …`.
#[derive(Debug, Subcommand)]
pub enum StateAction {
    /// Copy the whole state from the configured database into an empty
    /// database at URL (SQLite to PostgreSQL, or back) and verify the copy:
    /// every table's rows, integer sums and content. Stop the daemon (every
    /// node) first.
    Migrate {
        /// The target: sqlite:///path/to/state.db or postgres://user@host/db.
        #[arg(long = "to", value_name = "URL")]
        to: String,
    },
}

/// `tollgate account …`.
#[derive(Debug, Subcommand)]
pub enum AccountAction {
    /// Queue and send the customer's account-details mail now, to its
    /// email: the web console's address and user name (never a password),
    /// the backup server's address and certificate fingerprint, and how to
    /// register a client.
    Send {
        /// The customer.
        #[arg(long)]
        customer: String,
    },
}

/// `tollgate report …`.
#[derive(Debug, Subcommand)]
pub enum ReportAction {
    /// Queue and send a consolidated report now, to the customer's report
    /// recipients (else its email): of the most recent complete period,
    /// the period in progress (--current), or local days --from to --to.
    /// A report may not cover time before the customer first appeared in
    /// state.
    Send {
        /// The customer.
        #[arg(long)]
        customer: String,
        /// daily, weekly or monthly.
        #[arg(long, value_enum, required_unless_present = "from", conflicts_with_all = ["from", "to"])]
        period: Option<admin::PeriodArg>,
        /// With --period: the period in progress, up to now.
        #[arg(long, requires = "period")]
        current: bool,
        /// The first local day (YYYY-MM-DD, server.timezone).
        #[arg(long, requires = "to")]
        from: Option<jiff::civil::Date>,
        /// The last local day, included (up to now if it is today).
        #[arg(long, requires = "from")]
        to: Option<jiff::civil::Date>,
    },
}

/// `tollgate clients …`.
#[derive(Debug, Subcommand)]
pub enum ClientsAction {
    /// One line per client: id, customer, kind, MCAL this month, usage, last seen.
    List {
        /// Print one JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Move a client (its usage, files and future licences) to another customer.
    Move {
        /// The client id.
        id: String,
        /// The customer to move it to.
        #[arg(long = "to")]
        to: String,
    },
    /// Print a one-time enroll key (valid 7 days) that gives a removed
    /// client, or one that lost its secret, a new secret.
    Readmit {
        /// The client id.
        id: String,
    },
    /// Unregister a client and refund this month's licence; without
    /// --purge its id stays reserved until `clients readmit`.
    Remove {
        /// The client id.
        id: String,
        /// Also delete its files and free their space.
        #[arg(long)]
        purge: bool,
    },
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if !matches!(cli.command, Command::Client { .. }) {
        // Everything the daemon and the admin commands create is the
        // service user's alone (CONFIG.md Additions: files 0600,
        // directories 0700), whatever mode each call site asks for.
        crate::storage::private_umask();
    }
    match cli.command {
        Command::CheckConfig { json } => check_config(&cli.config, json),
        Command::HashSecret => hash_secret(),
        Command::Serve { log_format, node } => {
            if let Some(n) = node
                && !crate::config::limits::set_node_override(&n)
            {
                anyhow::bail!(
                    "--node {n:?} is not a node name; use 1 to 64 ASCII letters, digits, '-', '_' or '.', not starting with '.'"
                );
            }
            serve::serve(&cli.config, log_format)
        }
        Command::Client { action } => client::run(action),
        Command::Status { json } => admin::status(&load_for_reading(&cli.config)?, json),
        Command::Report {
            action:
                ReportAction::Send {
                    customer,
                    period,
                    current,
                    from,
                    to,
                },
        } => {
            use crate::reports::ReportAsk;
            let ask = match (period, from, to) {
                (Some(p), _, _) if current => ReportAsk::Current(p.frequency()),
                (Some(p), _, _) => ReportAsk::LastComplete(p.frequency()),
                (None, Some(f), Some(t)) => ReportAsk::Days(f, t),
                _ => anyhow::bail!("give --period, or --from and --to"),
            };
            admin::report_send(&load(&cli.config)?, &customer, ask)
        }
        Command::Account {
            action: AccountAction::Send { customer },
        } => admin::account_send(&load(&cli.config)?, &customer),
        Command::Clients { action } => {
            let cfg = || load(&cli.config);
            match action {
                ClientsAction::List { json } => {
                    admin::clients_list(&load_for_reading(&cli.config)?, json)
                }
                ClientsAction::Move { id, to } => admin::clients_move(&cfg()?, &id, &to),
                ClientsAction::Remove { id, purge } => admin::clients_remove(&cfg()?, &id, purge),
                ClientsAction::Readmit { id } => admin::clients_readmit(&cfg()?, &id),
            }
        }
        Command::State {
            action: StateAction::Migrate { to },
        } => admin::state_migrate(&load(&cli.config)?, &to),
    }
}

/// Loads the config for a command that only reads the state: when the file
/// is broken, its errors are shown as a warning and the configuration the
/// daemon last applied stands in (CLI.md `status`; issue 12).
fn load_for_reading(path: &std::path::Path) -> anyhow::Result<Config> {
    match Config::load_for_reading(path) {
        Ok((cfg, errors)) => {
            if !errors.is_empty() {
                for e in &errors {
                    eprintln!("{e}");
                }
                eprintln!(
                    "warning: {} has {} problem(s) and is not in force; showing the state against the configuration the daemon last applied ({})",
                    path.display(),
                    errors.len(),
                    cfg.applied_copy().display()
                );
            }
            Ok(cfg)
        }
        Err(LoadError::Invalid(errors)) => {
            for e in &errors {
                eprintln!("{e}");
            }
            anyhow::bail!(
                "{} has {} problem(s), and there is no copy of a configuration the daemon applied to show the state with; run `tollgate check-config`",
                path.display(),
                errors.len()
            )
        }
        Err(e) => Err(e.into()),
    }
}

/// Loads the config for a command that needs a valid one.
fn load(path: &std::path::Path) -> anyhow::Result<Config> {
    match Config::load(path) {
        Ok(c) => Ok(c),
        Err(LoadError::Invalid(errors)) => {
            for e in &errors {
                eprintln!("{e}");
            }
            anyhow::bail!(
                "{} has {} problem(s); run `tollgate check-config`",
                path.display(),
                errors.len()
            )
        }
        Err(e) => Err(e.into()),
    }
}

fn check_config(path: &std::path::Path, json: bool) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    match Config::load(path) {
        Ok(cfg) => {
            let report = Report::new(&cfg);
            for w in &report.warnings {
                eprintln!("{}: warning: {w}", path.display());
            }
            // The file is valid; what it names must also be usable.
            let disk = disk::problems(&cfg);
            if !disk.is_empty() {
                if json {
                    let doc = serde_json::json!({
                        "ok": false,
                        "file": path,
                        "errors": disk.iter().map(|(k, m)| serde_json::json!({
                            "rule": "disk",
                            "file": path,
                            "key": k,
                            "message": m,
                        })).collect::<Vec<_>>(),
                    });
                    serde_json::to_writer_pretty(&mut out, &doc)?;
                    writeln!(out)?;
                } else {
                    let mut err = std::io::stderr().lock();
                    for (k, m) in &disk {
                        writeln!(err, "{}: {k}: {m}", path.display())?;
                    }
                    writeln!(
                        err,
                        "{}: {} problem{} found on disk; the daemon would not start or could not store backups",
                        path.display(),
                        disk.len(),
                        if disk.len() == 1 { "" } else { "s" }
                    )?;
                }
                return Ok(ExitCode::FAILURE);
            }
            if json {
                serde_json::to_writer_pretty(&mut out, &report)?;
                writeln!(out)?;
            } else {
                write!(out, "{}", report.human(&cfg))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(LoadError::Invalid(errors)) => {
            if json {
                let doc = serde_json::json!({
                    "ok": false,
                    "file": path,
                    "errors": errors.iter().map(|e| serde_json::json!({
                        "rule": e.rule.name(),
                        "file": e.file,
                        "line": e.line,
                        "column": e.column,
                        "key": e.key,
                        "message": e.message,
                    })).collect::<Vec<_>>(),
                });
                serde_json::to_writer_pretty(&mut out, &doc)?;
                writeln!(out)?;
            } else {
                let mut err = std::io::stderr().lock();
                for e in &errors {
                    writeln!(err, "{e}")?;
                }
                writeln!(
                    err,
                    "{}: {} problem{} found; the configuration is refused",
                    path.display(),
                    errors.len(),
                    if errors.len() == 1 { "" } else { "s" }
                )?;
            }
            Ok(ExitCode::FAILURE)
        }
        Err(e @ LoadError::Read { .. }) => Err(e).context("checking the configuration"),
    }
}

/// The snapshots `check-config` prints. The config alone knows no usage or
/// debits, so those figures are 0 here; `tollgate status` shows live ones.
#[derive(Serialize)]
struct Report {
    ok: bool,
    file: PathBuf,
    timezone: String,
    server: NodeReport,
    default_customer: NodeReport,
    resellers: Vec<ResellerReport>,
    warnings: Vec<String>,
}

#[derive(Serialize)]
struct NodeReport {
    name: String,
    space: SpaceSnapshot,
    mcal: Option<McalSnapshot>,
}

#[derive(Serialize)]
struct ResellerReport {
    #[serde(flatten)]
    node: NodeReport,
    customers: Vec<NodeReport>,
}

impl Report {
    fn new(cfg: &Config) -> Report {
        let none = Debits::default();
        let pool = cfg.server.mcal.map(|m| space::pool_snapshot(&m, none));
        let pool_left = pool.map_or(0, |p| p.available);
        let node = |name: String, n: Node, mcal: Option<McalSnapshot>| NodeReport {
            name,
            space: space::space_snapshot(cfg, n, Usage::default()),
            mcal,
        };
        let customer = |c: CustomerId, ceiling: u64| {
            let cust = cfg.customer(c);
            let m = pool.map(|_| space::allotment_snapshot(cust.mcal_limit, none, ceiling));
            node(cust.name.clone(), Node::Customer(c), m)
        };
        let resellers = cfg
            .resellers
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let rm = pool.map(|_| space::allotment_snapshot(r.mcal_limit, none, pool_left));
                let ceiling = rm.map_or(0, |m| m.available);
                ResellerReport {
                    node: node(r.name.clone(), Node::Reseller(ResellerId(i as u32)), rm),
                    customers: r.customers.iter().map(|&c| customer(c, ceiling)).collect(),
                }
            })
            .collect();
        Report {
            ok: true,
            file: cfg.path.clone(),
            timezone: cfg
                .server
                .timezone
                .iana_name()
                .unwrap_or("system")
                .to_string(),
            server: node("server".into(), Node::Server, pool),
            warnings: cfg.warnings(),
            default_customer: customer(CustomerId::DEFAULT, pool_left),
            resellers,
        }
    }

    fn human(&self, cfg: &Config) -> String {
        let mut rows: Vec<[String; 3]> = Vec::new();
        let children = |n: &Node| match n {
            Node::Server => "resellers + Default Customer",
            Node::Reseller(_) => "customers",
            Node::Customer(_) => "clients",
        };
        let space = |s: &SpaceSnapshot, n: Node| match s.allotted {
            Some(a) => format!(
                "{} allotted / {} allotted to {} / {} free",
                format_size(a),
                format_size(s.allotted_to_children),
                children(&n),
                format_size(s.free.unwrap_or(0))
            ),
            None => format!(
                "unlimited / {} allotted to {}",
                format_size(s.allotted_to_children),
                children(&n)
            ),
        };
        let mcal = |m: &Option<McalSnapshot>| match m {
            None => "not enforced".to_string(),
            Some(m) => format!(
                "{} / {} debited / {} this month / {} available",
                m.allotted
                    .map_or("auto (draws on the pool)".to_string(), |a| format!(
                        "{a} allotted"
                    )),
                m.debited,
                m.debited_this_month,
                m.available
            ),
        };
        rows.push([
            "server".into(),
            space(&self.server.space, Node::Server),
            mcal(&self.server.mcal),
        ]);
        rows.push([
            "Default Customer".into(),
            space(
                &self.default_customer.space,
                Node::Customer(CustomerId::DEFAULT),
            ),
            mcal(&self.default_customer.mcal),
        ]);
        for (i, r) in self.resellers.iter().enumerate() {
            rows.push([
                format!("reseller {}", r.node.name),
                space(&r.node.space, Node::Reseller(ResellerId(i as u32))),
                mcal(&r.node.mcal),
            ]);
            let rs = &cfg.resellers[i];
            for (c, &cid) in r.customers.iter().zip(&rs.customers) {
                rows.push([
                    format!("  customer {}", c.name),
                    space(&c.space, Node::Customer(cid)),
                    mcal(&c.mcal),
                ]);
            }
        }
        let w0 = rows.iter().map(|r| r[0].chars().count()).max().unwrap_or(0);
        let mut s = format!(
            "{}: configuration OK ({} reseller{}, {} customer{}, {} declared client{}; zone {})\n\nSpace\n",
            self.file.display(),
            cfg.resellers.len(),
            plural(cfg.resellers.len()),
            cfg.customers.len() - 1,
            plural(cfg.customers.len() - 1),
            cfg.clients.len(),
            plural(cfg.clients.len()),
            self.timezone,
        );
        for r in &rows {
            s += &format!("  {:<w0$}  {}\n", r[0], r[1]);
        }
        s += "\nMCALs (allotted / debited / this month / available; the config alone knows no debits)\n";
        for r in &rows {
            s += &format!("  {:<w0$}  {}\n", r[0], r[2]);
        }
        s
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

fn hash_secret() -> anyhow::Result<ExitCode> {
    let secret = if std::io::stdin().is_terminal() {
        let a = rpassword::prompt_password("Secret: ").context("reading the secret")?;
        let b = rpassword::prompt_password("Again: ").context("reading the secret")?;
        if a != b {
            bail!("the two entries differ; nothing was hashed");
        }
        a
    } else {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading the secret from stdin")?;
        // One trailing newline is the shell's, not the secret's.
        let trimmed = s.strip_suffix('\n').unwrap_or(&s);
        trimmed.strip_suffix('\r').unwrap_or(trimmed).to_string()
    };
    if secret.is_empty() {
        bail!("the secret is empty; nothing was hashed");
    }
    println!("{}", hash(&secret)?);
    Ok(ExitCode::SUCCESS)
}

/// The argon2id PHC string of `secret` ([`crate::config::PhcHash::hash`]).
pub fn hash(secret: &str) -> anyhow::Result<String> {
    crate::config::PhcHash::hash(secret)
        .map(|h| h.as_str().to_string())
        .map_err(|e| anyhow::anyhow!("hashing failed: {e}"))
}
