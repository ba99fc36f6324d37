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
}

impl RejectCode {
    /// Every code, for tests that must reach each one.
    pub const ALL: [RejectCode; 12] = [
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
}

fn reject<T>(code: RejectCode, message: impl Into<String>) -> Result<T, Rejection> {
    Err(Rejection {
        code,
        message: message.into(),
    })
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
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientRecord {
    /// The customer it is registered under.
    pub customer: CustomerId,
    /// Its kind, recorded at registration.
    pub kind: Kind,
    /// SHA-256 of its secret; `None` = declared but never connected.
    pub secret_sha256: Option<[u8; 32]>,
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

fn secret_matches(stored: &[u8; 32], presented: Option<&str>) -> bool {
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
        Some(name) => cfg.customer_by_name(name).ok_or_else(|| Rejection {
            code: RejectCode::UnknownCustomer,
            message: format!("no customer is named {name:?}"),
        }),
    }
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
    // Step 3: identity.
    let declared = cfg.declared_client(&h.client_id);
    let record = snap.client.as_ref();
    let customer = target_customer(cfg, h, record)?;
    let cust = cfg.customer(customer);
    let (registration, kind) = match (record.and_then(|r| r.secret_sha256.as_ref()), declared) {
        (Some(stored), _) => {
            if !secret_matches(stored, h.secret.as_deref()) {
                return reject(
                    RejectCode::AuthFailed,
                    "the secret does not match this client id",
                );
            }
            let recorded = record.map_or(Kind::Desktop, |r| r.kind);
            (
                Registration::Existing,
                declared.map_or(recorded, |d| cfg.client(d).kind),
            )
        }
        (None, Some(d)) => {
            check_enroll_key(cust, h)?;
            (Registration::Declared, cfg.client(d).kind)
        }
        (None, None) => {
            if !cust.auto_add_clients {
                return reject(
                    RejectCode::UnknownClient,
                    format!(
                        "client {:?} is not registered and customer {:?} does not add clients automatically",
                        h.client_id, cust.name
                    ),
                );
            }
            check_enroll_key(cust, h)?;
            if cust
                .max_clients
                .is_some_and(|max| snap.customer_clients >= max)
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
    let left = space_left(&super::space::levels(cfg, customer, declared, &snap.usage));
    if intent == Intent::Backup && left == Some(0) {
        return reject(
            RejectCode::QuotaExceeded,
            "no backup space is left for this client",
        );
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

fn check_enroll_key(cust: &crate::config::Customer, h: &Hello) -> Result<(), Rejection> {
    match (&cust.enroll_key, h.enroll_key.as_deref()) {
        (None, _) => Ok(()),
        (Some(hash), Some(k)) if hash.verify(k) => Ok(()),
        (Some(_), None) => reject(
            RejectCode::AuthFailed,
            format!("customer {:?} requires an enrollment key", cust.name),
        ),
        (Some(_), Some(_)) => reject(RejectCode::AuthFailed, "the enrollment key is wrong"),
    }
}

#[cfg(test)]
mod tests;
