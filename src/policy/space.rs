//! Space and MCAL arithmetic (CONFIG.md, Semantics: Space and MCALs): what is
//! allotted where, what is left, and the snapshots that `check-config`,
//! `status` and the reports print. Pure functions over the config and
//! figures that `state` supplies.

use crate::config::{Config, CustomerId, Mcal, McalLimit, ResellerId};
use jiff::Timestamp;
use jiff::tz::TimeZone;
use serde::Serialize;
use std::fmt;

/// A node of the hierarchy that can hold space, MCALs or an aggregate cap.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Node {
    /// The whole server.
    Server,
    /// One reseller.
    Reseller(ResellerId),
    /// One customer (including the Default Customer).
    Customer(CustomerId),
}

/// Space its children are allotted together: for the server, the resellers
/// plus the Default Customer; for a reseller, its customers; for a customer,
/// its declared clients. Sums saturate: sizes come from the file and may be
/// absurd, and an overflow must not wrap into a small number.
pub fn allotted_to_children(cfg: &Config, node: Node) -> u64 {
    let sum = |it: &mut dyn Iterator<Item = u64>| it.fold(0u64, u64::saturating_add);
    match node {
        Node::Server => sum(&mut cfg
            .resellers
            .iter()
            .filter_map(|r| r.space)
            .chain(cfg.customer(CustomerId::DEFAULT).space)),
        Node::Reseller(r) => sum(&mut cfg
            .reseller(r)
            .customers
            .iter()
            .filter_map(|&c| cfg.customer(c).space)),
        Node::Customer(c) => sum(&mut cfg
            .customer(c)
            .clients
            .iter()
            .filter_map(|&d| cfg.client(d).space)),
    }
}

/// The space a node is allotted; `None` = unlimited at that level.
pub fn allotted(cfg: &Config, node: Node) -> Option<u64> {
    match node {
        Node::Server => cfg.server.total_space,
        Node::Reseller(r) => cfg.reseller(r).space,
        Node::Customer(c) => cfg.customer(c).space,
    }
}

/// Bytes committed and bytes reserved by uploads in flight.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// Sum of committed file sizes.
    pub used: u64,
    /// Sum of in-flight reservations.
    pub reserved: u64,
}

impl Usage {
    /// What counts against a limit: committed plus reserved.
    pub fn taken(self) -> u64 {
        self.used.saturating_add(self.reserved)
    }
}

/// Usage plus reservations at every level above a client.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LevelUsage {
    /// The client itself.
    pub client: Usage,
    /// Its customer.
    pub customer: Usage,
    /// Its reseller (zero for the Default Customer).
    pub reseller: Usage,
    /// The whole server.
    pub server: Usage,
}

/// The (limit, usage) pairs that bound a client of `customer`: its own
/// space when declared with one, then customer, reseller and server.
pub fn levels(
    cfg: &Config,
    customer: CustomerId,
    declared: Option<crate::config::DeclaredClientId>,
    u: &LevelUsage,
) -> [(Option<u64>, Usage); 4] {
    let cust = cfg.customer(customer);
    [
        (declared.and_then(|d| cfg.client(d).space), u.client),
        (cust.space, u.customer),
        (
            cust.reseller.and_then(|r| cfg.reseller(r).space),
            u.reseller,
        ),
        (cfg.server.total_space, u.server),
    ]
}

/// Bytes left under one limit; `None` = unlimited.
pub fn left(limit: Option<u64>, usage: Usage) -> Option<u64> {
    limit.map(|l| l.saturating_sub(usage.taken()))
}

/// Bytes a client may still store: the minimum over all levels that have a
/// limit (PROTOCOL.md WELCOME `space_left`); `None` = unlimited everywhere.
pub fn space_left(levels: &[(Option<u64>, Usage)]) -> Option<u64> {
    levels.iter().filter_map(|&(l, u)| left(l, u)).min()
}

/// Whether `size` more bytes fit under every level.
pub fn fits(levels: &[(Option<u64>, Usage)], size: u64) -> bool {
    space_left(levels).is_none_or(|l| size <= l)
}

/// The names of [`levels`]' entries, in order.
pub const LEVEL_NAMES: [&str; 4] = ["client", "customer", "reseller", "server"];

/// The level that `size` more bytes do not fit under, the tightest first
/// when several are full: (its name, its allotment, bytes taken there
/// counting uploads in flight). `None` when they fit everywhere.
pub fn full_level(levels: &[(Option<u64>, Usage)], size: u64) -> Option<(&'static str, u64, u64)> {
    levels
        .iter()
        .zip(LEVEL_NAMES)
        .filter_map(|(&(limit, usage), name)| {
            let limit = limit?;
            let left = limit.saturating_sub(usage.taken());
            (size > left).then_some((left, name, limit, usage.taken()))
        })
        .min_by_key(|&(left, ..)| left)
        .map(|(_, name, limit, taken)| (name, limit, taken))
}

/// The "Space Utilization Snapshot" of one node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SpaceSnapshot {
    /// Space allotted to the node; `None` = unlimited.
    pub allotted: Option<u64>,
    /// Space allotted to its children together.
    pub allotted_to_children: u64,
    /// `allotted − allotted_to_children`; `None` when unlimited.
    pub free: Option<u64>,
    /// Bytes committed under it.
    pub used: u64,
    /// Bytes reserved by uploads in flight under it.
    pub reserved: u64,
}

/// The snapshot of `node`, with the usage `state` reports for it.
pub fn space_snapshot(cfg: &Config, node: Node, usage: Usage) -> SpaceSnapshot {
    let allotted = allotted(cfg, node);
    let children = allotted_to_children(cfg, node);
    SpaceSnapshot {
        allotted,
        allotted_to_children: children,
        free: allotted.map(|a| a.saturating_sub(children)),
        used: usage.used,
        reserved: usage.reserved,
    }
}

/// A calendar month in `server.timezone`, the unit of MCAL debits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Month {
    /// Year.
    pub year: i16,
    /// Month, 1..=12.
    pub month: i8,
}

impl Month {
    /// The month containing instant `t` in zone `tz`.
    pub fn of(t: Timestamp, tz: &TimeZone) -> Month {
        let d = tz.to_datetime(t);
        Month {
            year: d.year(),
            month: d.month(),
        }
    }

    /// The month after this one.
    pub fn next(self) -> Month {
        if self.month == 12 {
            Month {
                year: self.year + 1,
                month: 1,
            }
        } else {
            Month {
                year: self.year,
                month: self.month + 1,
            }
        }
    }
}

impl fmt::Display for Month {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

/// MCAL debits recorded for a node, as `state` counts them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Debits {
    /// All debits ever made.
    pub total: u64,
    /// Debits made in the current month.
    pub this_month: u64,
}

/// An MCAL snapshot: allotted, used, used this month, available.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct McalSnapshot {
    /// The pool or the fixed allotment; `None` = "auto" (draws on the pool).
    pub allotted: Option<u64>,
    /// MCALs debited so far.
    pub debited: u64,
    /// MCALs debited in the current month.
    pub debited_this_month: u64,
    /// MCALs that can still be debited here, counting the pool's limit.
    pub available: u64,
}

/// The global pool's snapshot.
pub fn pool_snapshot(mcal: &Mcal, debits: Debits) -> McalSnapshot {
    McalSnapshot {
        allotted: Some(mcal.pool),
        debited: debits.total,
        debited_this_month: debits.this_month,
        available: mcal.pool.saturating_sub(debits.total),
    }
}

/// A reseller's or customer's snapshot. `ceiling` is what is available at
/// the levels above (the pool, and the reseller's allotment for a customer):
/// a fixed allotment cannot hand out more than that.
pub fn allotment_snapshot(limit: McalLimit, debits: Debits, ceiling: u64) -> McalSnapshot {
    let (allotted, own) = match limit {
        McalLimit::Auto => (None, u64::MAX),
        McalLimit::Fixed(n) => (Some(n), n.saturating_sub(debits.total)),
    };
    McalSnapshot {
        allotted,
        debited: debits.total,
        debited_this_month: debits.this_month,
        available: own.min(ceiling),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    const GIB: u64 = 1 << 30;

    fn cfg(src: &str) -> Config {
        Config::from_str(src, Path::new("/etc/tollgate/t.toml")).unwrap_or_else(|e| {
            panic!(
                "{}",
                e.iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        })
    }

    const NESTED: &str = r#"
        [server]
        total_space = "10 GiB"
        timezone = "UTC"
        [default_customer]
        backup_location = "/srv/d"
        space = "1 GiB"
        [[reseller]]
        name = "r"
        space = "6 GiB"
        [[customer]]
        name = "a"
        reseller = "r"
        email = "a@x.example"
        backup_location = "/srv/a"
        space = "2 GiB"
        [[customer]]
        name = "b"
        reseller = "r"
        email = "b@x.example"
        backup_location = "/srv/b"
        space = "3 GiB"
        [[client]]
        id = "a1"
        customer = "a"
        space = "1.5 GiB"
    "#;

    #[test]
    fn snapshots() {
        let c = cfg(NESTED);
        let r = c.reseller_by_name("r").unwrap();
        let a = c.customer_by_name("A").unwrap();
        let cases = [
            (Node::Server, Some(10 * GIB), 7 * GIB, Some(3 * GIB)),
            (Node::Reseller(r), Some(6 * GIB), 5 * GIB, Some(GIB)),
            (Node::Customer(a), Some(2 * GIB), 3 * GIB / 2, Some(GIB / 2)),
            (Node::Customer(CustomerId::DEFAULT), Some(GIB), 0, Some(GIB)),
        ];
        for (node, allotted, children, free) in cases {
            let s = space_snapshot(
                &c,
                node,
                Usage {
                    used: 5,
                    reserved: 1,
                },
            );
            assert_eq!(
                (
                    s.allotted,
                    s.allotted_to_children,
                    s.free,
                    s.used,
                    s.reserved
                ),
                (allotted, children, free, 5, 1),
                "{node:?}"
            );
        }
    }

    #[test]
    fn space_left_is_the_minimum_over_levels() {
        let u = |used, reserved| Usage { used, reserved };
        type Levels<'a> = &'a [(Option<u64>, Usage)];
        let cases: &[(Levels, Option<u64>)] = &[
            (&[], None),
            (&[(None, u(5, 0)), (None, u(9, 9))], None),
            (&[(Some(100), u(10, 5)), (None, u(0, 0))], Some(85)),
            (
                &[
                    (Some(100), u(10, 5)),
                    (Some(50), u(40, 0)),
                    (Some(1000), u(0, 0)),
                ],
                Some(10),
            ),
            (&[(Some(100), u(90, 20))], Some(0)),
        ];
        for (levels, want) in cases {
            assert_eq!(space_left(levels), *want, "{levels:?}");
        }
        assert!(fits(&[(Some(10), u(5, 0))], 5));
        assert!(!fits(&[(Some(10), u(5, 1))], 5));
        assert!(fits(&[(None, u(5, 1))], u64::MAX));
    }

    #[test]
    fn mcal_snapshots() {
        let pool = Mcal {
            pool: 100,
            cost: Default::default(),
        };
        let p = pool_snapshot(
            &pool,
            Debits {
                total: 30,
                this_month: 4,
            },
        );
        assert_eq!(
            (p.allotted, p.debited, p.debited_this_month, p.available),
            (Some(100), 30, 4, 70)
        );
        let fixed = allotment_snapshot(
            McalLimit::Fixed(25),
            Debits {
                total: 20,
                this_month: 2,
            },
            70,
        );
        assert_eq!((fixed.allotted, fixed.available), (Some(25), 5));
        let squeezed = allotment_snapshot(
            McalLimit::Fixed(25),
            Debits {
                total: 0,
                this_month: 0,
            },
            3,
        );
        assert_eq!(squeezed.available, 3);
        let auto = allotment_snapshot(
            McalLimit::Auto,
            Debits {
                total: 9,
                this_month: 9,
            },
            70,
        );
        assert_eq!((auto.allotted, auto.available), (None, 70));
    }

    #[test]
    fn month_boundaries_follow_the_server_zone() {
        let cases = [
            ("Europe/Berlin", "2026-11-30T22:59:59Z", "2026-11"),
            ("Europe/Berlin", "2026-11-30T23:00:00Z", "2026-12"),
            ("America/New_York", "2027-01-01T04:59:59Z", "2026-12"),
            ("America/New_York", "2027-01-01T05:00:00Z", "2027-01"),
            ("UTC", "2026-12-31T23:59:59Z", "2026-12"),
        ];
        for (zone, ts, want) in cases {
            let tz = TimeZone::get(zone).unwrap();
            let t: Timestamp = ts.parse().unwrap();
            assert_eq!(Month::of(t, &tz).to_string(), want, "{zone} {ts}");
        }
        assert_eq!(
            Month {
                year: 2026,
                month: 12
            }
            .next()
            .to_string(),
            "2027-01"
        );
    }
}
