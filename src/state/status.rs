//! The status document: the "Disk Space & Client Management" tree that
//! `tollgate status` prints and the web console's pages show, built from
//! the configuration and one read of the state ([`StatusData`]) at a time.

use super::{ClientRow, StatusData};
use crate::config::{Config, CustomerId, McalLimit, ResellerId};
use crate::policy::space::{self, Debits, McalSnapshot, Node, SpaceSnapshot, Usage};
use crate::policy::throttle;
use jiff::Timestamp;
use serde::Serialize;

/// Adds the clients declared in the config that the daemon has not yet
/// recorded (it records them at start and reload), as never connected.
pub fn with_declared(cfg: &Config, mut rows: Vec<ClientRow>) -> Vec<ClientRow> {
    let known: std::collections::HashSet<String> =
        rows.iter().map(|r| r.id.to_ascii_lowercase()).collect();
    for c in &cfg.clients {
        if !known.contains(&c.id.to_ascii_lowercase()) {
            rows.push(ClientRow {
                id: c.id.clone(),
                customer: cfg.customer(c.customer).name.clone(),
                kind: c.kind.as_str().into(),
                declared: true,
                ..ClientRow::default()
            });
        }
    }
    rows
}

/// A Unix time in the server's zone, minutes precision, or "never".
pub fn when(cfg: &Config, secs: Option<i64>) -> String {
    when_in(&cfg.server.timezone, secs)
}

/// [`when`] in zone `tz`.
pub fn when_in(tz: &jiff::tz::TimeZone, secs: Option<i64>) -> String {
    match secs.and_then(|s| Timestamp::from_second(s).ok()) {
        None => "never".into(),
        Some(t) => tz.to_datetime(t).strftime("%Y-%m-%d %H:%M").to_string(),
    }
}

/// The status document (`--json`) and the source of the text view.
#[derive(Serialize)]
pub struct Status {
    /// When, in the server's zone.
    pub at: String,
    /// The server's zone.
    pub timezone: String,
    /// The server's level.
    pub server: NodeStatus,
    /// The Default Customer.
    pub default_customer: CustomerStatus,
    /// Every reseller with its customers.
    pub resellers: Vec<ResellerStatus>,
    /// Clients whose customer the config no longer has.
    pub orphans: Vec<ClientStatus>,
    /// The e-mail outbox; absent without `server.email`.
    pub mail: Option<MailStatus>,
}

/// The outbox.
#[derive(Serialize)]
pub struct MailStatus {
    /// Messages not yet delivered.
    pub pending: u64,
    /// When the oldest of them was queued, local time.
    pub oldest_pending: Option<String>,
    /// The newest delivery error among them.
    pub last_error: Option<String>,
}

/// One level's space, licences and refusals.
#[derive(Serialize)]
pub struct NodeStatus {
    /// Space.
    pub space: SpaceSnapshot,
    /// MCALs; None when not enforced.
    pub mcal: Option<McalSnapshot>,
    /// Refusals in the last 24 hours.
    pub refusals_24h: u64,
}

/// A reseller.
#[derive(Serialize)]
pub struct ResellerStatus {
    /// Its name.
    pub name: String,
    /// Whether activated.
    pub activated: bool,
    /// Its level.
    #[serde(flatten)]
    pub node: NodeStatus,
    /// Its customers.
    pub customers: Vec<CustomerStatus>,
}

/// A customer.
#[derive(Serialize)]
pub struct CustomerStatus {
    /// Its name.
    pub name: String,
    /// Whether activated.
    pub activated: bool,
    /// Clients registered or declared.
    pub clients_registered: u64,
    /// Its client limit.
    pub max_clients: Option<u32>,
    /// Its level.
    #[serde(flatten)]
    pub node: NodeStatus,
    /// Its clients.
    pub clients: Vec<ClientStatus>,
}

/// A client.
#[derive(Serialize)]
pub struct ClientStatus {
    /// Its figures.
    #[serde(flatten)]
    pub row: ClientRow,
    /// Its own space cap.
    pub space: Option<u64>,
    /// Its last backup, local time.
    pub last_backup_local: String,
    /// Its last admission, local time.
    pub last_seen_local: String,
    /// Upload rate in force now per schedule ("*" = any other schedule).
    pub throttle_now: Vec<ScheduleRate>,
    /// A declared client the config puts under another customer than the
    /// state does: the customer it moves to when the daemon applies the
    /// config (its files move then, not before).
    pub moves_to: Option<String>,
}

/// The upload rate in force for one schedule.
#[derive(Serialize)]
pub struct ScheduleRate {
    /// The schedule ("*" = any other).
    pub schedule: String,
    /// Bytes per second; None = unthrottled.
    pub rate: Option<u64>,
    /// When it next changes, local time.
    pub until: Option<String>,
}

/// The whole tree at `at`.
pub fn status_doc(cfg: &Config, d: &StatusData, at: Timestamp) -> Status {
    let key = |c: CustomerId| cfg.customer(c).name.to_lowercase();
    let cust_usage = |c: CustomerId| d.customers.get(&key(c)).copied().unwrap_or_default();
    let sum = |cs: &mut dyn Iterator<Item = CustomerId>| {
        cs.fold(Usage::default(), |a, c| {
            let u = cust_usage(c);
            Usage {
                used: a.used + u.used,
                reserved: a.reserved + u.reserved,
            }
        })
    };
    let all = sum(&mut (0..cfg.customers.len()).map(|i| CustomerId(i as u32)));
    let pool = cfg
        .server
        .mcal
        .map(|m| space::pool_snapshot(&m, d.global_debits));
    let pool_left = pool.map_or(0, |p| p.available);
    let mcal = |limit: McalLimit, debits: Debits, ceiling: u64| {
        pool.map(|_| space::allotment_snapshot(limit, debits, ceiling))
    };
    let client_status = |row: &ClientRow| {
        let customer = cfg.customer_by_name(&row.customer);
        let declared = cfg.declared_client(&row.id);
        let mut schedules: Vec<String> = declared
            .map(|dc| cfg.client(dc).schedules.keys().cloned().collect())
            .unwrap_or_default();
        schedules.push("*".into());
        let throttle_now = match customer {
            None => Vec::new(),
            Some(c) => schedules
                .into_iter()
                .map(|s| {
                    let r = throttle::resolve(cfg, c, declared, &s, at);
                    ScheduleRate {
                        schedule: s,
                        rate: r.rate,
                        until: r.next_change.map(|t| {
                            cfg.server
                                .timezone
                                .to_datetime(t)
                                .strftime("%Y-%m-%d %H:%M")
                                .to_string()
                        }),
                    }
                })
                .collect(),
        };
        let moves_to = declared
            .map(|dc| &cfg.customer(cfg.client(dc).customer).name)
            .filter(|to| !to.eq_ignore_ascii_case(&row.customer))
            .cloned();
        ClientStatus {
            row: row.clone(),
            moves_to,
            space: declared.and_then(|dc| cfg.client(dc).space),
            last_backup_local: when(cfg, row.last_backup),
            last_seen_local: when(cfg, row.last_seen),
            throttle_now,
        }
    };
    let customer_status = |c: CustomerId, ceiling: u64| {
        let cust = cfg.customer(c);
        let rows: Vec<&ClientRow> = d
            .clients
            .iter()
            .filter(|r| r.customer.to_lowercase() == key(c))
            .collect();
        let debits = d.customer_debits.get(&key(c)).copied().unwrap_or_default();
        CustomerStatus {
            name: cust.name.clone(),
            activated: cust.activated,
            clients_registered: rows.iter().filter(|r| r.registered || r.declared).count() as u64,
            max_clients: cust.max_clients,
            node: NodeStatus {
                space: space::space_snapshot(cfg, Node::Customer(c), cust_usage(c)),
                mcal: mcal(cust.mcal_limit, debits, ceiling),
                refusals_24h: d.customer_refusals.get(&key(c)).copied().unwrap_or(0),
            },
            clients: rows.into_iter().map(client_status).collect(),
        }
    };
    let resellers = cfg
        .resellers
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let debits = d.reseller_debits.get(&r.name).copied().unwrap_or_default();
            let rm = mcal(r.mcal_limit, debits, pool_left);
            let ceiling = rm.map_or(0, |m| m.available);
            ResellerStatus {
                name: r.name.clone(),
                activated: r.activated,
                node: NodeStatus {
                    space: space::space_snapshot(
                        cfg,
                        Node::Reseller(ResellerId(i as u32)),
                        sum(&mut r.customers.iter().copied()),
                    ),
                    mcal: rm,
                    refusals_24h: r
                        .customers
                        .iter()
                        .map(|&c| d.customer_refusals.get(&key(c)).copied().unwrap_or(0))
                        .sum(),
                },
                customers: r
                    .customers
                    .iter()
                    .map(|&c| customer_status(c, ceiling))
                    .collect(),
            }
        })
        .collect();
    Status {
        at: cfg
            .server
            .timezone
            .to_datetime(at)
            .strftime("%Y-%m-%d %H:%M")
            .to_string(),
        timezone: cfg
            .server
            .timezone
            .iana_name()
            .unwrap_or("system")
            .to_string(),
        server: NodeStatus {
            space: space::space_snapshot(cfg, Node::Server, all),
            mcal: pool,
            refusals_24h: d.customer_refusals.values().sum(),
        },
        default_customer: customer_status(CustomerId::DEFAULT, pool_left),
        resellers,
        orphans: d
            .clients
            .iter()
            .filter(|r| cfg.customer_by_name(&r.customer).is_none())
            .map(client_status)
            .collect(),
        mail: cfg.server.email.as_ref().map(|_| MailStatus {
            pending: d.mail_pending,
            oldest_pending: d.mail_oldest.map(|t| when(cfg, Some(t))),
            last_error: d.mail_last_error.clone(),
        }),
    }
}
