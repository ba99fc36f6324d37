//! "May this client in?" — PROTOCOL.md "Admission", steps 1 to 6 in order,
//! as one pure function of the config, the HELLO, a snapshot of what state
//! knows, and the instant. `state` takes the snapshot and applies the
//! outcome (registration, MCAL debit) in the same transaction, so the
//! decision and the write cannot be raced.

pub use super::space::LevelUsage;
use super::space::{Month, space_left};
use super::throttle::{self, RateDecision};
use crate::config::{
    Config, CustomerId, DeclaredClientId, Kind, McalLimit, ResellerId, is_valid_identifier,
};
use jiff::Timestamp;
use sha2::{Digest, Sha256};
use std::fmt;
use subtle::ConstantTimeEq;

/// The protocol version this daemon speaks (PROTOCOL.md HELLO `protocol`).
pub const PROTOCOL_VERSION: i64 = 1;
/// Longest hostname accepted in HELLO, in bytes.
pub const MAX_HOSTNAME: usize = 255;

/// A REJECT code (PROTOCOL.md "REJECT"). Codes never change meaning.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RejectCode {
    /// `protocol` is not 1.
    UnsupportedProtocol,
    /// A malformed HELLO, or something other than HELLO first.
    BadRequest,
    /// Wrong secret or enrollment key.
    AuthFailed,
    /// Unknown client and its customer does not auto-add.
    UnknownClient,
    /// HELLO names a customer that does not exist.
    UnknownCustomer,
    /// The customer or its reseller is deactivated.
    CustomerDeactivated,
    /// The customer's `max_clients` is reached.
    ClientLimit,
    /// No MCAL room for this month's debit.
    McalExhausted,
    /// No space left at some level.
    QuotaExceeded,
    /// Connections are full.
    Busy,
    /// The daemon is shutting down.
    ShuttingDown,
    /// No HELLO within `hello_timeout`.
    Timeout,
    /// Too many new registrations for the customer, or too many sessions of
    /// the client (PROTOCOL.md Additions); REJECT carries `retry_after`.
    RateLimited,
}

impl RejectCode {
    /// Every code, for tests that must reach each one.
    pub const ALL: [RejectCode; 13] = [
        RejectCode::UnsupportedProtocol,
        RejectCode::BadRequest,
        RejectCode::AuthFailed,
        RejectCode::UnknownClient,
        RejectCode::UnknownCustomer,
        RejectCode::CustomerDeactivated,
        RejectCode::ClientLimit,
        RejectCode::McalExhausted,
        RejectCode::QuotaExceeded,
        RejectCode::Busy,
        RejectCode::ShuttingDown,
        RejectCode::Timeout,
        RejectCode::RateLimited,
    ];

    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectCode::UnsupportedProtocol => "unsupported_protocol",
            RejectCode::BadRequest => "bad_request",
            RejectCode::AuthFailed => "auth_failed",
            RejectCode::UnknownClient => "unknown_client",
            RejectCode::UnknownCustomer => "unknown_customer",
            RejectCode::CustomerDeactivated => "customer_deactivated",
            RejectCode::ClientLimit => "client_limit",
            RejectCode::McalExhausted => "mcal_exhausted",
            RejectCode::QuotaExceeded => "quota_exceeded",
            RejectCode::Busy => "busy",
            RejectCode::ShuttingDown => "shutting_down",
            RejectCode::Timeout => "timeout",
            RejectCode::RateLimited => "rate_limited",
        }
    }
}

impl fmt::Display for RejectCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refusal: the code for programs, the message for people. The message
/// never holds a secret, a hash or a server path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// The code.
    pub code: RejectCode,
    /// What happened, for a person.
    pub message: String,
    /// Seconds after which trying again may succeed (`rate_limited`).
    pub retry_after: Option<u64>,
}

impl Rejection {
    /// A refusal without `retry_after`.
    pub fn new(code: RejectCode, message: impl Into<String>) -> Rejection {
        Rejection {
            code,
            message: message.into(),
            retry_after: None,
        }
    }
}

fn reject<T>(code: RejectCode, message: impl Into<String>) -> Result<T, Rejection> {
    Err(Rejection::new(code, message))
}

/// How long a new registration window lasts (`registrations_per_minute`).
pub const REGISTRATION_WINDOW_SECS: i64 = 60;

/// The OFFSET, newest first, of the one registration the state reads for
/// [`Snapshot::nth_recent_registration`]: the `registrations_per_minute`-th.
pub fn nth_registration_offset(cfg: &Config) -> i64 {
    i64::from(cfg.server.limits.registrations_per_minute.max(1)) - 1
}

/// Session intent (PROTOCOL.md HELLO `intent`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Intent {
    /// Upload; needs MCAL and space.
    #[default]
    Backup,
    /// List, get, delete only.
    Restore,
}

/// The HELLO fields (PROTOCOL.md HELLO). The wire layer decodes them from
/// JSON (types checked there, unknown fields ignored); values are checked here.
#[derive(Clone, Default, serde::Deserialize)]
pub struct Hello {
    /// Protocol version.
    pub protocol: i64,
    /// Client id.
    pub client_id: String,
    /// The issued secret, for registered clients.
    pub secret: Option<String>,
    /// Customer to register under.
    pub customer: Option<String>,
    /// The customer's enrollment key.
    pub enroll_key: Option<String>,
    /// `desktop`, `laptop` or `server`.
    pub kind: Option<String>,
    /// Informational.
    pub hostname: Option<String>,
    /// Schedule name.
    pub schedule: String,
    /// `backup` or `restore`.
    pub intent: Option<String>,
}

impl fmt::Debug for Hello {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mask = |o: &Option<String>| o.as_ref().map(|_| "<redacted>");
        f.debug_struct("Hello")
            .field("protocol", &self.protocol)
            .field("client_id", &self.client_id)
            .field("secret", &mask(&self.secret))
            .field("customer", &self.customer)
            .field("enroll_key", &mask(&self.enroll_key))
            .field("kind", &self.kind)
            .field("hostname", &self.hostname)
            .field("schedule", &self.schedule)
            .field("intent", &self.intent)
            .finish()
    }
}

/// What state knows about a registered client.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ClientRecord {
    /// The id as registered; ids compare without regard to case, so this
    /// may differ from HELLO's in case only.
    pub id: String,
    /// The customer it is registered under.
    pub customer: CustomerId,
    /// Its kind, recorded at registration.
    pub kind: Kind,
    /// SHA-256 of its secret; `None` = declared but never connected, or
    /// removed.
    pub secret_sha256: Option<[u8; 32]>,
    /// Removed by `clients remove` with its files kept: the id is reserved
    /// until an administrator readmits it (PROTOCOL.md Additions).
    pub removed: bool,
    /// A one-time readmit key (`clients readmit`): its SHA-256 and expiry.
    pub readmit: Option<([u8; 32], Timestamp)>,
}

/// The result of checking HELLO's `enroll_key` against a customer's
/// argon2 hash, done by the caller off the state's write lane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EnrollVerdict {
    /// The customer whose key was checked.
    pub customer: CustomerId,
    /// Whether the key matched.
    pub ok: bool,
}

/// MCAL debits relevant to one admission.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct McalState {
    /// Whether this client is already debited for the current month.
    pub client_debited_this_month: bool,
    /// All debits made by the customer's clients while under it.
    pub customer_total: u64,
    /// All debits made under the reseller.
    pub reseller_total: u64,
    /// All debits from the global pool.
    pub global_total: u64,
}

/// What state knows, read in the admission's transaction.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The record for HELLO's `client_id`, if any.
    pub client: Option<ClientRecord>,
    /// Clients registered under the target customer.
    pub customer_clients: u32,
    /// MCAL debits.
    pub mcal: McalState,
    /// Usage per level for the target client.
    pub usage: LevelUsage,
    /// All connection permits are taken.
    pub connections_full: bool,
    /// Shutdown has begun.
    pub shutting_down: bool,
    /// HELLO's enroll key, checked against the hash of the customer
    /// [`enroll_key_target`] names.
    pub enroll: Option<EnrollVerdict>,
    /// The registration time (Unix seconds) of the target customer's
    /// `registrations_per_minute`-th newest client, if it has that many
    /// registered within the last [`REGISTRATION_WINDOW_SECS`]. Only that
    /// one is read: reading them all made each admission cost as many
    /// rows as the customer took in the last minute (quadratic in a
    /// mass enrolment under a raised limit).
    pub nth_recent_registration: Option<i64>,
}

/// What admission decided about identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Registration {
    /// A registered client proved its secret.
    Existing,
    /// A declared client connects for the first time: issue a secret.
    Declared,
    /// An unknown client is auto-added: create it and issue a secret.
    AutoAdded,
    /// A removed client, or one that lost its secret, presents its readmit
    /// key: issue a new secret; its customer, files and MCAL history stay.
    Readmitted,
}

/// An admitted session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Admitted {
    /// The client's customer.
    pub customer: CustomerId,
    /// That customer's reseller.
    pub reseller: Option<ResellerId>,
    /// The config declaration, for declared clients.
    pub declared: Option<DeclaredClientId>,
    /// Its kind (declared, recorded, or from this HELLO when registering).
    pub kind: Kind,
    /// Session intent.
    pub intent: Intent,
    /// Identity outcome.
    pub registration: Registration,
    /// MCALs to debit for `month`, when this is its first backup that month.
    pub mcal_debit: Option<(Month, u32)>,
    /// The upload rate in force now.
    pub rate: RateDecision,
    /// Bytes it may still store; `None` = unlimited.
    pub space_left: Option<u64>,
}

impl Admitted {
    /// Whether a secret must be issued (WELCOME `secret`).
    pub fn issues_secret(&self) -> bool {
        self.registration != Registration::Existing
    }
}

/// PROTOCOL.md Admission step 1: value checks on the decoded HELLO.
pub fn check_syntax(h: &Hello) -> Result<(Intent, Option<Kind>), Rejection> {
    if h.protocol != PROTOCOL_VERSION {
        return reject(
            RejectCode::UnsupportedProtocol,
            format!(
                "protocol {} is not supported; this server speaks protocol {PROTOCOL_VERSION}",
                h.protocol
            ),
        );
    }
    if !is_valid_identifier(&h.client_id) {
        return reject(
            RejectCode::BadRequest,
            "client_id must be 1-64 of A-Z a-z 0-9 . _ -, not starting with '.'",
        );
    }
    if !is_valid_identifier(&h.schedule) {
        return reject(
            RejectCode::BadRequest,
            "schedule must be 1-64 of A-Z a-z 0-9 . _ -, not starting with '.'",
        );
    }
    if h.hostname.as_ref().is_some_and(|n| n.len() > MAX_HOSTNAME) {
        return reject(RejectCode::BadRequest, "hostname is longer than 255 bytes");
    }
    // PROTOCOL.md is silent on its characters (docs/protocol.md says
    // this): a hostname is shown in `status` and the console and stored
    // in state, where a control character would reach an administrator's
    // terminal as an escape sequence, and PostgreSQL cannot store NUL.
    if h.hostname
        .as_ref()
        .is_some_and(|n| n.chars().any(char::is_control))
    {
        return reject(RejectCode::BadRequest, "hostname holds a control character");
    }
    let kind = match h.kind.as_deref() {
        None => None,
        Some(k) => match Kind::parse(k) {
            Some(k) => Some(k),
            None => {
                return reject(
                    RejectCode::BadRequest,
                    "kind must be desktop, laptop or server",
                );
            }
        },
    };
    let intent = match h.intent.as_deref() {
        None | Some("backup") => Intent::Backup,
        Some("restore") => Intent::Restore,
        Some(_) => return reject(RejectCode::BadRequest, "intent must be backup or restore"),
    };
    Ok((intent, kind))
}

/// PROTOCOL.md Admission step 2. Shutdown is reported before a full
/// house: a client told `busy` would retry at once.
pub fn check_capacity(connections_full: bool, shutting_down: bool) -> Result<(), Rejection> {
    if shutting_down {
        return reject(
            RejectCode::ShuttingDown,
            "the server is shutting down; try again shortly",
        );
    }
    if connections_full {
        return reject(
            RejectCode::Busy,
            "the server has no free connection slots; try again later",
        );
    }
    Ok(())
}

/// The SHA-256 of a secret, as stored by `state`.
pub fn secret_digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Whether `presented` is the secret whose SHA-256 is `stored`, compared in
/// constant time.
pub fn secret_matches(stored: &[u8; 32], presented: Option<&str>) -> bool {
    let Some(p) = presented else { return false };
    bool::from(secret_digest(p).ct_eq(stored))
}

/// The customer a HELLO lands under, before any other check: the recorded
/// or declared one for known clients, else HELLO's `customer`, else the
/// Default Customer. `state` uses it to count the right things.
pub fn target_customer(
    cfg: &Config,
    h: &Hello,
    record: Option<&ClientRecord>,
) -> Result<CustomerId, Rejection> {
    if let Some(d) = cfg.declared_client(&h.client_id) {
        return Ok(cfg.client(d).customer);
    }
    // A record without a secret is a client removed without --purge: its
    // files stay under its customer, so it can only come back there.
    if let Some(r) = record {
        return Ok(r.customer);
    }
    match &h.customer {
        None => Ok(CustomerId::DEFAULT),
        Some(name) => cfg.customer_by_name(name).ok_or_else(|| {
            Rejection::new(
                RejectCode::UnknownCustomer,
                format!("no customer is named {name:?}"),
            )
        }),
    }
}

/// The customer whose `enroll_key` HELLO's key must be checked against,
/// with its hash, when HELLO presents a key and admission would look at it
/// (a declared client's first connection, or an auto-added client). The
/// caller verifies it off the state's write lane and passes the verdict in
/// [`Snapshot::enroll`]; argon2 never runs inside a transaction.
pub fn enroll_key_target<'c>(
    cfg: &'c Config,
    h: &Hello,
    record: Option<&ClientRecord>,
) -> Option<(CustomerId, &'c crate::config::PhcHash)> {
    h.enroll_key.as_ref()?;
    if record.is_some_and(|r| r.secret_sha256.is_some() || r.removed) {
        return None;
    }
    let customer = target_customer(cfg, h, record).ok()?;
    let cust = cfg.customer(customer);
    // Argon2 only where the key decides: an unknown client of a customer
    // that does not auto-add is refused before its key is looked at.
    let declared = cfg.declared_client(&h.client_id).is_some();
    if !declared && !cust.auto_add_clients {
        return None;
    }
    cust.enroll_key.as_ref().map(|hash| (customer, hash))
}

/// Whether HELLO's `enroll_key` is the client's valid readmit key.
fn readmit_matches(record: &ClientRecord, h: &Hello, at: Timestamp) -> bool {
    match (&record.readmit, h.enroll_key.as_deref()) {
        (Some((digest, expires)), Some(key)) => {
            at < *expires && bool::from(secret_digest(key).ct_eq(digest))
        }
        _ => false,
    }
}

/// The `rate_limited` refusal when the customer already took `per_minute`
/// new clients within the window at `at`: `nth_newest` is the time of the
/// `per_minute`-th newest registration, if there are that many
/// ([`Snapshot::nth_recent_registration`]).
pub fn registration_rate(
    per_minute: u32,
    nth_newest: Option<i64>,
    at: Timestamp,
    customer: &str,
) -> Result<(), Rejection> {
    let now = at.as_second();
    let Some(oldest) = nth_newest.filter(|t| now - t < REGISTRATION_WINDOW_SECS) else {
        return Ok(());
    };
    // The slot frees when the registration `per_minute` back leaves the window.
    let retry = (oldest + REGISTRATION_WINDOW_SECS - now).max(1) as u64;
    Err(Rejection {
        code: RejectCode::RateLimited,
        message: format!(
            "customer {customer:?} takes at most {per_minute} new clients a minute; try again in {retry} s"
        ),
        retry_after: Some(retry),
    })
}

/// PROTOCOL.md "Admission", steps 1-6, in order.
pub fn admit(
    cfg: &Config,
    h: &Hello,
    snap: &Snapshot,
    at: Timestamp,
) -> Result<Admitted, Rejection> {
    // Step 1.
    let (intent, hello_kind) = check_syntax(h)?;
    // Step 2.
    if snap.shutting_down {
        return reject(
            RejectCode::ShuttingDown,
            "the server is shutting down; try again shortly",
        );
    }
    if snap.connections_full {
        return reject(
            RejectCode::Busy,
            "the server has no free connection slots; try again later",
        );
    }
    // Step 3: identity. Ids compare without regard to case (PC-1 and pc-1
    // would share a directory on a case-insensitive filesystem), so a
    // record may come back for an id spelled otherwise: that is not this
    // client.
    let declared = cfg.declared_client(&h.client_id);
    let record = snap.client.as_ref();
    if let Some(r) = record
        && r.id != h.client_id
    {
        return reject(
            RejectCode::AuthFailed,
            format!(
                "client id {:?} is taken: it differs only in letter case from a registered client",
                h.client_id
            ),
        );
    }
    let customer = target_customer(cfg, h, record)?;
    let cust = cfg.customer(customer);
    let readmit = record.is_some_and(|r| readmit_matches(r, h, at));
    let (registration, kind) = match (record, declared) {
        (Some(r), _) if r.secret_sha256.is_some() || r.removed => {
            let recorded = declared.map_or(r.kind, |d| cfg.client(d).kind);
            match &r.secret_sha256 {
                Some(stored) if secret_matches(stored, h.secret.as_deref()) => {
                    (Registration::Existing, recorded)
                }
                _ if readmit => {
                    // A removed client takes a slot again; a declared one
                    // still holds its slot (declared clients count).
                    if r.removed
                        && declared.is_none()
                        && client_limit_reached(cust, snap.customer_clients)
                    {
                        return reject(
                            RejectCode::ClientLimit,
                            format!(
                                "customer {:?} has reached its limit of {} clients",
                                cust.name,
                                cust.max_clients.unwrap_or(0)
                            ),
                        );
                    }
                    (Registration::Readmitted, recorded)
                }
                None => {
                    return reject(
                        RejectCode::AuthFailed,
                        format!(
                            "client {:?} was removed and its id is reserved; the administrator can readmit it",
                            h.client_id
                        ),
                    );
                }
                Some(_) => {
                    return reject(
                        RejectCode::AuthFailed,
                        "the secret does not match this client id",
                    );
                }
            }
        }
        (_, Some(d)) => {
            check_enroll_key(customer, cust, h, snap.enroll)?;
            registration_rate(
                cfg.server.limits.registrations_per_minute,
                snap.nth_recent_registration,
                at,
                &cust.name,
            )?;
            (Registration::Declared, cfg.client(d).kind)
        }
        (_, None) => {
            if !cust.auto_add_clients {
                return reject(
                    RejectCode::UnknownClient,
                    format!(
                        "client {:?} is not registered and customer {:?} does not add clients automatically",
                        h.client_id, cust.name
                    ),
                );
            }
            check_enroll_key(customer, cust, h, snap.enroll)?;
            if client_limit_reached(cust, snap.customer_clients) {
                return reject(
                    RejectCode::ClientLimit,
                    format!(
                        "customer {:?} has reached its limit of {} clients",
                        cust.name,
                        cust.max_clients.unwrap_or(0)
                    ),
                );
            }
            registration_rate(
                cfg.server.limits.registrations_per_minute,
                snap.nth_recent_registration,
                at,
                &cust.name,
            )?;
            (Registration::AutoAdded, hello_kind.unwrap_or_default())
        }
    };
    // Step 4: activation.
    let reseller = cust.reseller;
    if !cust.activated {
        return reject(
            RejectCode::CustomerDeactivated,
            format!("customer {:?} is deactivated", cust.name),
        );
    }
    if let Some(r) = reseller
        && !cfg.reseller(r).activated
    {
        return reject(
            RejectCode::CustomerDeactivated,
            format!("the reseller of customer {:?} is deactivated", cust.name),
        );
    }
    // Step 5: MCAL, backups only.
    let mut mcal_debit = None;
    if let (Intent::Backup, Some(mcal)) = (intent, cfg.server.mcal)
        && !snap.mcal.client_debited_this_month
    {
        let cost = mcal.cost.of(kind);
        if let Some(why) = mcal_shortfall(cfg, customer, kind, &snap.mcal) {
            return reject(RejectCode::McalExhausted, why);
        }
        if cost > 0 {
            mcal_debit = Some((Month::of(at, &cfg.server.timezone), cost));
        }
    }
    // Step 6: space, backups only.
    let levels = super::space::levels(cfg, customer, declared, &snap.usage);
    let left = space_left(&levels);
    if intent == Intent::Backup && left == Some(0) {
        let why = match super::space::full_level(&levels, 1) {
            Some((level, limit, taken)) => format!(
                "no backup space is left: the {level}'s space is full ({} of {} used)",
                crate::config::units::format_size(taken),
                crate::config::units::format_size(limit)
            ),
            None => "no backup space is left for this client".into(),
        };
        return reject(RejectCode::QuotaExceeded, why);
    }
    Ok(Admitted {
        customer,
        reseller,
        declared,
        kind,
        intent,
        registration,
        mcal_debit,
        rate: throttle::resolve(cfg, customer, declared, &h.schedule, at),
        space_left: left,
    })
}

/// Whether `cust` has no free client slot with `registered` clients.
pub fn client_limit_reached(cust: &crate::config::Customer, registered: u32) -> bool {
    cust.max_clients.is_some_and(|max| registered >= max)
}

/// Why one more monthly debit for a client of `kind` under `customer` does
/// not fit (customer allotment, reseller allotment, global pool, in that
/// order), or `None` when it fits or MCALs are not enforced.
pub fn mcal_shortfall(
    cfg: &Config,
    customer: CustomerId,
    kind: Kind,
    m: &McalState,
) -> Option<String> {
    let mcal = cfg.server.mcal?;
    let cost = mcal.cost.of(kind) as u64;
    let cust = cfg.customer(customer);
    let over =
        |limit: McalLimit, total: u64| matches!(limit, McalLimit::Fixed(n) if total + cost > n);
    let why = if over(cust.mcal_limit, m.customer_total) {
        format!("customer {:?} has used its MCAL allotment", cust.name)
    } else if cust
        .reseller
        .is_some_and(|r| over(cfg.reseller(r).mcal_limit, m.reseller_total))
    {
        format!(
            "the reseller of customer {:?} has used its MCAL allotment",
            cust.name
        )
    } else if m.global_total + cost > mcal.pool {
        "the server's MCAL pool is used up".to_string()
    } else {
        return None;
    };
    Some(format!(
        "{why}: a month's licence for a {} ({cost} MCAL) does not fit; restores still work",
        kind.as_str()
    ))
}

/// The enroll-key check, from the verdict the caller reached off the
/// write lane; a verdict about another customer counts as no match (the
/// caller compares [`enroll_key_target`] first and retries on a change).
fn check_enroll_key(
    id: CustomerId,
    cust: &crate::config::Customer,
    h: &Hello,
    verdict: Option<EnrollVerdict>,
) -> Result<(), Rejection> {
    match (&cust.enroll_key, h.enroll_key.as_deref(), verdict) {
        (None, _, _) => Ok(()),
        (Some(_), None, _) => reject(
            RejectCode::AuthFailed,
            format!("customer {:?} requires an enrollment key", cust.name),
        ),
        (Some(_), Some(_), Some(v)) if v.customer == id && v.ok => Ok(()),
        (Some(_), Some(_), _) => reject(RejectCode::AuthFailed, "the enrollment key is wrong"),
    }
}

#[cfg(test)]
mod tests;
