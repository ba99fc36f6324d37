//! The configuration file of CONFIG.md: loading, validation and the typed
//! model every other module reads.
//!
//! Loading is two steps. `raw` deserializes the TOML into structs that keep
//! each value's source span; `validate` checks every rule of CONFIG.md,
//! collecting *all* problems with file:line:column, and only then builds a
//! [`Config`]. A `Config` is therefore always valid: callers never re-check.
//! This module does no I/O beyond reading the file it is given.

pub mod customer_file;
pub mod diff;
pub mod include;
pub mod limits;
mod raw;
pub mod units;
mod validate;

pub use limits::{
    Cidr, Cluster, Limits, Overflow, Penalties, Retention, canonical, escape_log, source_of,
};

pub use units::Hours;
pub use validate::{ConfigError, Rule};

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the config is read from when neither `--config` nor
/// `$TOLLGATE_CONFIG` says otherwise (CLI.md).
pub const DEFAULT_CONFIG_PATH: &str = "/etc/tollgate/tollgate.toml";
/// `server.listen` when omitted.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:7443";
/// `server.state` when omitted.
pub const DEFAULT_STATE: &str = "sqlite:///var/lib/tollgate/state.db";
/// `server.max_connections` when omitted.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 10_000;
/// `server.hello_timeout` when omitted (PROTOCOL.md, Session step 1).
pub const DEFAULT_HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// `server.idle_timeout` when omitted (PROTOCOL.md, Session step 5).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// `server.shutdown_grace` when omitted.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// `server.max_frame` when omitted (PROTOCOL.md, Frames).
pub const DEFAULT_MAX_FRAME: u32 = 1 << 20;
/// Smallest `max_frame` accepted: control frames must fit.
pub const MIN_MAX_FRAME: u32 = 4 << 10;
/// Largest `max_frame` accepted: bounds the memory one frame may take.
pub const MAX_MAX_FRAME: u32 = 16 << 20;
/// The reserved name of the built-in customer.
pub const DEFAULT_CUSTOMER_NAME: &str = "Default Customer";

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this was loaded from.
    pub path: PathBuf,
    /// The text it was built from (kept so the daemon can save the copy
    /// it applied; `Debug` hides it, since it holds hashes).
    pub source: Source,
    /// `[server]`.
    pub server: Server,
    /// `[[reseller]]`, in file order.
    pub resellers: Vec<Reseller>,
    /// The Default Customer at index 0, then `[[customer]]` in file order.
    pub customers: Vec<Customer>,
    /// `[[client]]`, in file order.
    pub clients: Vec<ClientDecl>,
    reseller_by_name: HashMap<String, ResellerId>,
    customer_by_name: HashMap<String, CustomerId>,
    client_by_id: HashMap<String, DeclaredClientId>,
    /// The `[[include]]` directories the set was read from (the daemon
    /// watches them for changes).
    pub includes: Vec<include::Include>,
}

/// The text of a config file; its `Debug` shows only its length.
#[derive(Clone)]
pub struct Source(pub std::sync::Arc<str>);

impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Source({} bytes)", self.0.len())
    }
}

/// The file in `state_dir` where the daemon keeps a copy of the
/// configuration it applied last, for `status` and `clients list` to fall
/// back on while the file on disk is broken.
pub const APPLIED_COPY: &str = "applied-config.toml";

/// Index of a reseller in [`Config::resellers`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResellerId(pub u32);
/// Index of a customer in [`Config::customers`]; 0 is the Default Customer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CustomerId(pub u32);
/// Index of a declared client in [`Config::clients`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeclaredClientId(pub u32);

impl CustomerId {
    /// The built-in Default Customer.
    pub const DEFAULT: CustomerId = CustomerId(0);
}

/// `[server]`.
#[derive(Debug, Clone)]
pub struct Server {
    /// Addresses to accept backup clients on.
    pub listen: Vec<SocketAddr>,
    /// Directory for the self-signed TLS pair and other daemon files.
    pub state_dir: PathBuf,
    /// Where the state database lives.
    pub state: StateUrl,
    /// The zone for hours, weekends, MCAL months and report periods.
    pub timezone: jiff::tz::TimeZone,
    /// Disk space allotted to the server; `None` = unlimited.
    pub total_space: Option<u64>,
    /// Concurrent connections at most.
    pub max_connections: u32,
    /// Bound on the TLS handshake plus HELLO.
    pub hello_timeout: Duration,
    /// A session silent this long is ended.
    pub idle_timeout: Duration,
    /// How long uploads in flight may finish at shutdown.
    pub shutdown_grace: Duration,
    /// Largest frame payload accepted.
    pub max_frame: u32,
    /// Prometheus `/metrics` and `/healthz` address.
    pub metrics_listen: Option<SocketAddr>,
    /// `[server.tls]`.
    pub tls: Tls,
    /// `[server.mcal]`; `None` = licences not enforced.
    pub mcal: Option<Mcal>,
    /// The server's throttle; `Inherit` here means none.
    pub throttle: ThrottleSetting,
    /// Cap on the sum of all concurrent backups.
    pub aggregate: Option<Aggregate>,
    /// `[server.email]`.
    pub email: Option<Email>,
    /// `[server.limits]`.
    pub limits: Limits,
    /// `[server.retention]`.
    pub retention: Retention,
    /// `[server.cluster]`.
    pub cluster: Cluster,
    /// `[server.web]`: the web console, when configured.
    pub web: Option<Web>,
}

/// `[server.web]` (CONFIG.md Additions of 2026-11-30, docs/console.md).
#[derive(Debug, Clone)]
pub struct Web {
    /// Where the console listens.
    pub listen: SocketAddr,
    /// The console's address as users reach it, for account-details mail.
    pub public_url: Option<String>,
    /// Its own certificate and key; `None` = the daemon's.
    pub cert: Option<PathBuf>,
    /// See `cert`.
    pub key: Option<PathBuf>,
    /// The admin's login.
    pub admin: Option<WebAccess>,
    /// A console session ends after this long without a request.
    pub session_idle: Duration,
}

/// `server.web.session_idle` when omitted.
pub const DEFAULT_SESSION_IDLE: Duration = Duration::from_secs(30 * 60);

/// The state database location (CONFIG.md `server.state`).
#[derive(Clone, PartialEq, Eq)]
pub enum StateUrl {
    /// An embedded SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL URL, kept as written; may hold a password.
    Postgres(String),
}

impl fmt::Debug for StateUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StateUrl::Sqlite(p) => write!(f, "Sqlite({p:?})"),
            StateUrl::Postgres(u) => write!(f, "Postgres({})", redact_url(u)),
        }
    }
}

/// A URL fit to show: its password, in the user part or a `password`
/// query parameter (which sqlx honours), replaced with `***`. Parsed as
/// URLs are (the `url` crate, WHATWG rules: the user part ends at the last
/// `@`); one that does not parse is not shown at all.
pub fn redact_url(u: &str) -> String {
    let Ok(mut p) = url::Url::parse(u) else {
        return "(a URL that does not parse; not shown)".into();
    };
    if p.password().is_some() {
        let _ = p.set_password(Some("***"));
    }
    if p.query().is_some() {
        let pairs: Vec<(String, String)> = p
            .query_pairs()
            .map(|(k, v)| {
                let v = if k.eq_ignore_ascii_case("password") {
                    "***".to_string()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        p.query_pairs_mut().clear().extend_pairs(pairs);
    }
    p.to_string()
}

#[cfg(test)]
mod redact_tests {
    use super::redact_url;

    #[test]
    fn no_password_is_shown() {
        for (url, shown) in [
            ("postgres://u:hunter2@db/x", "postgres://u:***@db/x"),
            ("postgres://u:p@ss@db/x", "postgres://u:***@db/x"),
            (
                "postgres://u@db/x?password=hunter2&sslmode=require",
                "postgres://u@db/x?password=***&sslmode=require",
            ),
            (
                "postgres://u@db/x?PASSWORD=hunter2",
                "postgres://u@db/x?PASSWORD=***",
            ),
            (
                "smtp://mailer:hunter2@mail.example:587",
                "smtp://mailer:***@mail.example:587",
            ),
            ("postgres://u@db/x", "postgres://u@db/x"),
            (
                "not a url hunter2",
                "(a URL that does not parse; not shown)",
            ),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
            assert!(!redact_url(url).contains("hunter2"));
        }
    }
}

/// `[server.tls]`.
#[derive(Debug, Clone, Default)]
pub struct Tls {
    /// PEM certificate chain; `None` with `key` = make a self-signed pair.
    pub cert: Option<PathBuf>,
    /// PEM private key.
    pub key: Option<PathBuf>,
    /// CA that signs client certificates, for mutual TLS.
    pub client_ca: Option<PathBuf>,
    /// Refuse clients that present no certificate.
    pub require_client_cert: bool,
}

/// `[server.mcal]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mcal {
    /// MCALs purchased for this server.
    pub pool: u64,
    /// Monthly cost per client kind.
    pub cost: Costs,
}

/// MCALs one client of each kind uses per month.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Costs {
    /// Cost of a desktop.
    pub desktop: u32,
    /// Cost of a laptop.
    pub laptop: u32,
    /// Cost of a server.
    pub server: u32,
}

impl Default for Costs {
    fn default() -> Self {
        Costs {
            desktop: 1,
            laptop: 1,
            server: 2,
        }
    }
}

impl Costs {
    /// The monthly cost of a client of `kind`.
    pub fn of(&self, kind: Kind) -> u32 {
        match kind {
            Kind::Desktop => self.desktop,
            Kind::Laptop => self.laptop,
            Kind::Server => self.server,
        }
    }
}

/// A client's kind (PROTOCOL.md HELLO `kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Kind {
    /// The default.
    #[default]
    Desktop,
    /// A laptop.
    Laptop,
    /// A server.
    Server,
}

impl Kind {
    /// Parses the wire and config spelling.
    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "desktop" => Some(Kind::Desktop),
            "laptop" => Some(Kind::Laptop),
            "server" => Some(Kind::Server),
            _ => None,
        }
    }

    /// The wire and config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Desktop => "desktop",
            Kind::Laptop => "laptop",
            Kind::Server => "server",
        }
    }
}

/// A throttle field: look further up, or an explicit setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ThrottleSetting {
    /// `"inherit"` or absent.
    #[default]
    Inherit,
    /// A table.
    Explicit(Throttle),
}

/// An explicit throttle (CONFIG.md `[server.throttle]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttle {
    /// `false` = unthrottled, and stop looking further up.
    pub enabled: bool,
    /// Bytes per second; always set when `enabled`.
    pub rate: Option<u64>,
    /// When the limit applies.
    pub hours: Hours,
    /// No limit on Saturday and Sunday.
    pub weekends_unthrottled: bool,
}

/// An aggregate cap (CONFIG.md "Aggregate caps").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Aggregate {
    /// Bytes per second for the sum of all sessions below.
    pub rate: u64,
    /// When the cap applies.
    pub hours: Hours,
    /// No cap on Saturday and Sunday.
    pub weekends_unthrottled: bool,
}

/// `[server.email]`.
#[derive(Debug, Clone)]
pub struct Email {
    /// Sender address.
    pub from: String,
    /// Where server-level alerts go.
    pub admin: Option<String>,
    /// SMTP URL; `None` = write to `spool`.
    pub smtp: Option<SmtpUrl>,
    /// Spool directory for `.eml` files.
    pub spool: Option<PathBuf>,
    /// At most one session mail per client per recipient this often; the
    /// sessions between are listed in the next one (0 = one per session).
    pub report_interval: Duration,
}

/// `server.email.report_interval` when omitted.
pub const DEFAULT_REPORT_INTERVAL: Duration = Duration::from_secs(3600);

/// An SMTP URL; its `Debug` hides the password.
#[derive(Clone, PartialEq, Eq)]
pub struct SmtpUrl(pub String);

impl fmt::Debug for SmtpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SmtpUrl({})", redact_url(&self.0))
    }
}

/// A PHC hash string (argon2) for an enroll key or web password. Its
/// `Debug` never shows the hash.
#[derive(Clone, PartialEq, Eq)]
pub struct PhcHash(String);

impl PhcHash {
    /// Wraps a string already checked to be an argon2 PHC string.
    pub(crate) fn new(s: String) -> Self {
        PhcHash(s)
    }

    /// The argon2id PHC string of `secret`, with argon2's default
    /// parameters and a fresh random salt (`tollgate hash-secret`, the
    /// console's form). CPU-heavy: keep it off the async workers.
    pub fn hash(secret: &str) -> Result<PhcHash, argon2::password_hash::Error> {
        use argon2::{Argon2, PasswordHasher};
        Argon2::default()
            .hash_password(secret.as_bytes())
            .map(|h| PhcHash(h.to_string()))
    }

    /// The PHC string, for writing into a config file.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `candidate` hashes to this PHC string.
    pub fn verify(&self, candidate: &str) -> bool {
        use argon2::{Argon2, PasswordVerifier};
        Argon2::default()
            .verify_password(candidate.as_bytes(), self.0.as_str())
            .is_ok()
    }
}

impl fmt::Debug for PhcHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PhcHash(<redacted>)")
    }
}

/// An MCAL allotment (CONFIG.md `mcal_limit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum McalLimit {
    /// Draw from the global pool alone.
    #[default]
    Auto,
    /// At most this many MCALs in total.
    Fixed(u64),
}

/// `[[reseller]]`.
#[derive(Debug, Clone)]
pub struct Reseller {
    /// Unique name.
    pub name: String,
    /// Where its reports and alerts go.
    pub email: Option<String>,
    /// Disk space allotted; `None` = bounded only by the server.
    pub space: Option<u64>,
    /// Deactivated resellers' clients are turned away.
    pub activated: bool,
    /// Per-session reports for all its customers.
    pub email_reports: bool,
    /// MCALs all its customers may debit together.
    pub mcal_limit: McalLimit,
    /// Its throttle.
    pub throttle: ThrottleSetting,
    /// Cap on the sum of its customers' backups.
    pub aggregate: Option<Aggregate>,
    /// Web console login.
    pub web_access: Option<WebAccess>,
    /// Its customers, in file order.
    pub customers: Vec<CustomerId>,
}

/// `[[customer]]`, or the Default Customer.
#[derive(Debug, Clone)]
pub struct Customer {
    /// Unique name, as written.
    pub name: String,
    /// Its reseller; `None` for the Default Customer.
    pub reseller: Option<ResellerId>,
    /// Where its reports and alerts go.
    pub email: Option<String>,
    /// Optional records: address, city, phone, fax, notes.
    pub records: Records,
    /// Where its clients' files are stored (absolute).
    pub backup_location: PathBuf,
    /// Space for all its clients; `None` = bounded by the levels above.
    pub space: Option<u64>,
    /// Register unknown clients on first connection.
    pub auto_add_clients: bool,
    /// Hash of the key a registering client must present.
    pub enroll_key: Option<PhcHash>,
    /// Per-session reports to `email`.
    pub email_reports: bool,
    /// Web console login (kept for the console; hash only).
    pub web_access: Option<WebAccess>,
    /// Its MCAL allotment.
    pub mcal_limit: McalLimit,
    /// Deactivated customers' clients are turned away.
    pub activated: bool,
    /// Clients it may have at most.
    pub max_clients: Option<u32>,
    /// Its throttle.
    pub throttle: ThrottleSetting,
    /// Cap on the sum of its clients' backups.
    pub aggregate: Option<Aggregate>,
    /// Periodic report across its clients.
    pub consolidated_report: Option<ConsolidatedReport>,
    /// Its declared clients, in file order.
    pub clients: Vec<DeclaredClientId>,
    /// Mail its account details when it first appears (CONFIG.md
    /// Semantics: account details).
    pub send_account_details: bool,
}

/// Free-form customer records.
#[derive(Debug, Clone, Default)]
pub struct Records {
    /// Street address.
    pub address: Option<String>,
    /// City.
    pub city: Option<String>,
    /// Phone number.
    pub phone: Option<String>,
    /// Fax number.
    pub fax: Option<String>,
    /// Notes.
    pub notes: Option<String>,
}

/// `web_access = { username, password }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebAccess {
    /// Login name.
    pub username: String,
    /// PHC hash of the password.
    pub password: PhcHash,
}

/// `consolidated_report`.
#[derive(Debug, Clone)]
pub struct ConsolidatedReport {
    /// Who receives it.
    pub recipients: Vec<String>,
    /// How often.
    pub frequency: Frequency,
}

/// Report period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frequency {
    /// Each local day.
    Daily,
    /// Each Monday-to-Sunday week.
    Weekly,
    /// Each calendar month.
    Monthly,
}

/// `[[client]]`: a client declared ahead of its first connection.
#[derive(Debug, Clone)]
pub struct ClientDecl {
    /// Client id.
    pub id: String,
    /// Its customer.
    pub customer: CustomerId,
    /// Its kind, which sets its MCAL cost.
    pub kind: Kind,
    /// Optional cap inside the customer's space.
    pub space: Option<u64>,
    /// Its throttle.
    pub throttle: ThrottleSetting,
    /// Per-schedule throttle overrides.
    pub schedules: BTreeMap<String, ThrottleSetting>,
}

impl Config {
    /// Reads and validates the file at `path` with the files its
    /// `[[include]]` entries name, as one config.
    pub fn load(path: &Path) -> Result<Config, LoadError> {
        let src = std::fs::read_to_string(path).map_err(|e| LoadError::Read {
            path: path.to_path_buf(),
            source: e,
        })?;
        Config::from_file_text(&src, path).map_err(LoadError::Invalid)
    }

    /// Validates `src`, read from `path`, with its included files. The
    /// config's `source` is the whole set as one text (what the daemon
    /// saves as the applied copy, which reads back without the includes).
    pub fn from_file_text(src: &str, path: &Path) -> Result<Config, Vec<ConfigError>> {
        let (text, segments, includes, errors) = include::assemble(src, path);
        validate::validate_assembled(&text, path, segments, includes, errors)
    }

    /// Validates the config at `path` as it would be with the included
    /// file `file` holding `text` (whether or not it exists yet): the
    /// console's form checks a customer file this way before writing it.
    pub fn check_with(path: &Path, file: &Path, text: &str) -> Result<Config, LoadError> {
        let src = std::fs::read_to_string(path).map_err(|e| LoadError::Read {
            path: path.to_path_buf(),
            source: e,
        })?;
        let (all, segments, includes, errors) =
            include::assemble_with(&src, path, Some((file, text)));
        // A file no include takes would be checked without its text.
        if !segments.iter().any(|s| s.file == file) {
            return Err(LoadError::Read {
                path: file.to_path_buf(),
                source: std::io::Error::other(
                    "no [[include]] of the configuration takes this file",
                ),
            });
        }
        validate::validate_assembled(&all, path, segments, includes, errors)
            .map_err(LoadError::Invalid)
    }

    /// Loads `path` for a command that only reads the state. When the file
    /// is broken, the configuration the daemon last applied (its copy in
    /// `state_dir`, with relative paths resolving as in `path`) stands in;
    /// the file's errors come back beside it for a warning.
    pub fn load_for_reading(path: &Path) -> Result<(Config, Vec<ConfigError>), LoadError> {
        let src = std::fs::read_to_string(path).map_err(|e| LoadError::Read {
            path: path.to_path_buf(),
            source: e,
        })?;
        match Config::from_file_text(&src, path) {
            Ok(c) => Ok((c, Vec::new())),
            Err(errors) => {
                let copy = state_dir_hint(&src, path).join(APPLIED_COPY);
                match std::fs::read_to_string(&copy)
                    .ok()
                    .and_then(|text| Config::from_str(&text, path).ok())
                {
                    Some(applied) => Ok((applied, errors)),
                    None => Err(LoadError::Invalid(errors)),
                }
            }
        }
    }

    /// Where the daemon keeps its copy of the applied configuration.
    pub fn applied_copy(&self) -> PathBuf {
        self.server.state_dir.join(APPLIED_COPY)
    }

    /// Validates `src` as if read from `path` (relative paths inside resolve
    /// against `path`'s directory).
    pub fn from_str(src: &str, path: &Path) -> Result<Config, Vec<ConfigError>> {
        validate::validate(src, path)
    }

    /// The reseller called `name`.
    pub fn reseller_by_name(&self, name: &str) -> Option<ResellerId> {
        self.reseller_by_name.get(name).copied()
    }

    /// The customer called `name` (case-insensitive; "Default Customer" is
    /// the built-in one).
    pub fn customer_by_name(&self, name: &str) -> Option<CustomerId> {
        self.customer_by_name.get(&name.to_lowercase()).copied()
    }

    /// The declared client with this id.
    pub fn declared_client(&self, id: &str) -> Option<DeclaredClientId> {
        self.client_by_id.get(id).copied()
    }

    /// The reseller with this id.
    pub fn reseller(&self, id: ResellerId) -> &Reseller {
        &self.resellers[id.0 as usize]
    }

    /// The customer with this id.
    pub fn customer(&self, id: CustomerId) -> &Customer {
        &self.customers[id.0 as usize]
    }

    /// The declared client with this id.
    pub fn client(&self, id: DeclaredClientId) -> &ClientDecl {
        &self.clients[id.0 as usize]
    }

    /// The MCAL cost of a client of `kind`, or 0 when MCALs are not enforced.
    pub fn mcal_cost(&self, kind: Kind) -> u32 {
        self.server.mcal.map_or(0, |m| m.cost.of(kind))
    }

    /// What is valid but probably unwise (CONFIG.md Additions): a customer
    /// that auto-adds clients without an `enroll_key` while the server
    /// listens beyond loopback lets anyone spend its MCALs and space.
    pub fn warnings(&self) -> Vec<String> {
        let public = self.server.listen.iter().any(|a| !a.ip().is_loopback());
        if !public {
            return Vec::new();
        }
        self.customers
            .iter()
            .filter(|c| c.auto_add_clients && c.enroll_key.is_none() && c.activated)
            .map(|c| {
                format!(
                    "customer {:?} adds unknown clients automatically without an enroll_key while the server listens beyond loopback: anyone who can reach it can register clients and spend its licences and space; set enroll_key (tollgate hash-secret) or auto_add_clients = false",
                    c.name
                )
            })
            .collect()
    }
}

/// Where a possibly broken file puts `state_dir`, as far as it can be read:
/// `server.state_dir`, else the SQLite file's directory, else the default,
/// resolved like the validator resolves them.
pub fn state_dir_hint(src: &str, path: &Path) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let dir = abs.parent().map(Path::to_path_buf).unwrap_or_default();
    let table: Option<toml::Table> = toml::from_str(src).ok();
    let server = table
        .as_ref()
        .and_then(|t| t.get("server"))
        .and_then(|s| s.as_table());
    let get = |k: &str| server.and_then(|s| s.get(k)).and_then(|v| v.as_str());
    if let Some(d) = get("state_dir") {
        return dir.join(d);
    }
    let state = get("state").unwrap_or(DEFAULT_STATE);
    if let Some(p) = state
        .strip_prefix("sqlite://")
        .or_else(|| state.strip_prefix("sqlite:"))
    {
        let file = dir.join(p.split('?').next().unwrap_or_default());
        if let Some(parent) = file.parent() {
            return parent.to_path_buf();
        }
    }
    PathBuf::from("/var/lib/tollgate")
}

/// Why a config file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file has problems; every one is listed.
    #[error("{} problem(s) in the configuration", .0.len())]
    Invalid(Vec<ConfigError>),
}

/// Checks a client id or schedule name: 1–64 chars of `A-Z a-z 0-9 . _ -`,
/// not starting with `.` (PROTOCOL.md, HELLO).
pub fn is_valid_identifier(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}
