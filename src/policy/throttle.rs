//! "What rate now?" (CONFIG.md, Semantics: Throttle resolution and Aggregate
//! caps). The answer comes with the next instant at which it can change, so
//! a running session can switch exactly on a window or weekend edge.

use super::space::Node;
use super::window;
use crate::config::{Aggregate, Config, CustomerId, DeclaredClientId, ThrottleSetting};
use jiff::Timestamp;
use serde::Serialize;

/// Where the throttle in force was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    /// The client's per-schedule override.
    Schedule,
    /// The declared client.
    Client,
    /// The customer.
    Customer,
    /// The customer's reseller.
    Reseller,
    /// `[server.throttle]`.
    Server,
}

/// The throttle decision for one backup session at one instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateDecision {
    /// Bytes per second in force; `None` = unthrottled.
    pub rate: Option<u64>,
    /// The level whose setting decided; `None` when no level has one.
    pub level: Option<Level>,
    /// When the answer can next change without a config change; `None` =
    /// not before the config changes.
    pub next_change: Option<Timestamp>,
}

/// The first explicit throttle among schedule, client, customer, reseller,
/// server.
pub fn explicit_setting(
    cfg: &Config,
    customer: CustomerId,
    client: Option<DeclaredClientId>,
    schedule: &str,
) -> Option<(Level, crate::config::Throttle)> {
    let decl = client.map(|d| cfg.client(d));
    let cust = cfg.customer(customer);
    let chain = [
        (
            Level::Schedule,
            decl.and_then(|d| d.schedules.get(schedule).copied()),
        ),
        (Level::Client, decl.map(|d| d.throttle)),
        (Level::Customer, Some(cust.throttle)),
        (
            Level::Reseller,
            cust.reseller.map(|r| cfg.reseller(r).throttle),
        ),
        (Level::Server, Some(cfg.server.throttle)),
    ];
    chain.into_iter().find_map(|(level, s)| match s {
        Some(ThrottleSetting::Explicit(t)) => Some((level, t)),
        _ => None,
    })
}

/// The per-session rate for a backup of `client` (declared, or registered
/// under `customer`) on `schedule` at `at`.
pub fn resolve(
    cfg: &Config,
    customer: CustomerId,
    client: Option<DeclaredClientId>,
    schedule: &str,
    at: Timestamp,
) -> RateDecision {
    let Some((level, t)) = explicit_setting(cfg, customer, client, schedule) else {
        return RateDecision {
            rate: None,
            level: None,
            next_change: None,
        };
    };
    if !t.enabled {
        return RateDecision {
            rate: None,
            level: Some(level),
            next_change: None,
        };
    }
    let tz = &cfg.server.timezone;
    let on = window::active(t.hours, t.weekends_unthrottled, tz, at);
    RateDecision {
        rate: if on { t.rate } else { None },
        level: Some(level),
        next_change: window::next_change(t.hours, t.weekends_unthrottled, tz, at),
    }
}

/// One aggregate cap and whether it is in force.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapDecision {
    /// The node the cap belongs to.
    pub node: Node,
    /// Bytes per second for all sessions under `node`; `None` = not in force now.
    pub rate: Option<u64>,
    /// When that can next change.
    pub next_change: Option<Timestamp>,
}

/// The cap of one aggregate at `at`.
pub fn cap(cfg: &Config, node: Node, agg: &Aggregate, at: Timestamp) -> CapDecision {
    let tz = &cfg.server.timezone;
    let on = window::active(agg.hours, agg.weekends_unthrottled, tz, at);
    CapDecision {
        node,
        rate: on.then_some(agg.rate),
        next_change: window::next_change(agg.hours, agg.weekends_unthrottled, tz, at),
    }
}

/// The aggregate caps above a session of `customer`, from the server down,
/// for every node that has an `aggregate` (in force or not).
pub fn caps(cfg: &Config, customer: CustomerId, at: Timestamp) -> [Option<CapDecision>; 3] {
    let cust = cfg.customer(customer);
    let server = cfg.server.aggregate.map(|a| cap(cfg, Node::Server, &a, at));
    let reseller = cust.reseller.and_then(|r| {
        cfg.reseller(r)
            .aggregate
            .map(|a| cap(cfg, Node::Reseller(r), &a, at))
    });
    let customer = cust
        .aggregate
        .map(|a| cap(cfg, Node::Customer(customer), &a, at));
    [server, reseller, customer]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const MIB: u64 = 1 << 20;

    const CFG: &str = r#"
        [server]
        timezone = "Europe/Berlin"
        throttle = { enabled = true, rate = "100 Mbit/s" }
        aggregate = { rate = "1 Gbit/s", hours = "08:00-18:00", weekends_unthrottled = true }

        [[reseller]]
        name = "north"
        throttle = { rate = "40 MiB/s" }
        aggregate = { rate = "500 Mbit/s" }

        [[reseller]]
        name = "south"

        [[customer]]
        name = "Contoso"
        reseller = "north"
        email = "it@contoso.example"
        backup_location = "/srv/c"
        throttle = { enabled = true, rate = "30 MiB/s", hours = "22:00-06:00", weekends_unthrottled = true }
        aggregate = { rate = "50 MiB/s", hours = "08:00-18:00" }

        [[customer]]
        name = "Inheritor"
        reseller = "north"
        email = "it@i.example"
        backup_location = "/srv/i"

        [[customer]]
        name = "Southern"
        reseller = "south"
        email = "it@s.example"
        backup_location = "/srv/s"

        [[customer]]
        name = "Free"
        reseller = "north"
        email = "it@f.example"
        backup_location = "/srv/f"
        throttle = { enabled = false }

        [[client]]
        id = "FS01"
        customer = "Contoso"
        throttle = { enabled = true, rate = "20 MiB/s", hours = "20:00-06:00" }
        schedules = { nightly = { throttle = { enabled = false } }, hourly = { throttle = { rate = "1 MiB/s" } }, daily = { throttle = "inherit" } }

        [[client]]
        id = "PLAIN"
        customer = "Contoso"
    "#;

    fn cfg() -> Config {
        Config::from_str(CFG, Path::new("/t.toml")).unwrap_or_else(|e| panic!("{e:?}"))
    }

    fn ts(local: &str) -> Timestamp {
        let tz = jiff::tz::TimeZone::get("Europe/Berlin").unwrap();
        tz.to_ambiguous_timestamp(local.parse().unwrap())
            .compatible()
            .unwrap()
    }

    #[test]
    fn resolution_table() {
        let c = cfg();
        let contoso = c.customer_by_name("contoso").unwrap();
        let fs01 = c.declared_client("FS01");
        let plain = c.declared_client("PLAIN");
        let inh = c.customer_by_name("Inheritor").unwrap();
        let south = c.customer_by_name("Southern").unwrap();
        let free = c.customer_by_name("Free").unwrap();
        let dflt = CustomerId::DEFAULT;
        // Wednesday 2026-11-25 and Saturday 2026-11-28, Berlin time.
        type Case = (
            CustomerId,
            Option<DeclaredClientId>,
            &'static str,
            &'static str,
            Option<u64>,
            Option<Level>,
        );
        let cases: &[Case] = &[
            (
                contoso,
                fs01,
                "nightly",
                "2026-11-25T23:00",
                None,
                Some(Level::Schedule),
            ),
            (
                contoso,
                fs01,
                "hourly",
                "2026-11-25T12:00",
                Some(MIB),
                Some(Level::Schedule),
            ),
            (
                contoso,
                fs01,
                "daily",
                "2026-11-25T23:00",
                Some(20 * MIB),
                Some(Level::Client),
            ),
            (
                contoso,
                fs01,
                "daily",
                "2026-11-25T12:00",
                None,
                Some(Level::Client),
            ),
            (
                contoso,
                fs01,
                "manual",
                "2026-11-25T20:00",
                Some(20 * MIB),
                Some(Level::Client),
            ),
            (
                contoso,
                fs01,
                "manual",
                "2026-11-26T05:59",
                Some(20 * MIB),
                Some(Level::Client),
            ),
            (
                contoso,
                fs01,
                "manual",
                "2026-11-26T06:00",
                None,
                Some(Level::Client),
            ),
            (
                contoso,
                plain,
                "daily",
                "2026-11-25T23:59",
                Some(30 * MIB),
                Some(Level::Customer),
            ),
            (
                contoso,
                None,
                "daily",
                "2026-11-26T00:00",
                Some(30 * MIB),
                Some(Level::Customer),
            ),
            (
                contoso,
                None,
                "daily",
                "2026-11-26T05:59",
                Some(30 * MIB),
                Some(Level::Customer),
            ),
            (
                contoso,
                None,
                "daily",
                "2026-11-26T06:00",
                None,
                Some(Level::Customer),
            ),
            (
                contoso,
                None,
                "daily",
                "2026-11-27T23:59",
                Some(30 * MIB),
                Some(Level::Customer),
            ),
            (
                contoso,
                None,
                "daily",
                "2026-11-28T00:00",
                None,
                Some(Level::Customer),
            ),
            (
                contoso,
                None,
                "daily",
                "2026-11-28T23:00",
                None,
                Some(Level::Customer),
            ),
            (
                inh,
                None,
                "daily",
                "2026-11-28T12:00",
                Some(40 * MIB),
                Some(Level::Reseller),
            ),
            (
                south,
                None,
                "daily",
                "2026-11-28T12:00",
                Some(12_500_000),
                Some(Level::Server),
            ),
            (
                dflt,
                None,
                "manual",
                "2026-11-25T12:00",
                Some(12_500_000),
                Some(Level::Server),
            ),
            (
                free,
                None,
                "daily",
                "2026-11-25T12:00",
                None,
                Some(Level::Customer),
            ),
        ];
        for (cust, client, sched, at, rate, level) in cases {
            let d = resolve(&c, *cust, *client, sched, ts(at));
            assert_eq!(
                (d.rate, d.level),
                (*rate, *level),
                "{:?} {client:?} {sched} {at}",
                c.customer(*cust).name
            );
        }
    }

    #[test]
    fn nothing_configured_is_unthrottled_forever() {
        let c = Config::from_str("[server]\ntimezone = \"UTC\"\n", Path::new("/t.toml")).unwrap();
        let d = resolve(
            &c,
            CustomerId::DEFAULT,
            None,
            "manual",
            Timestamp::UNIX_EPOCH,
        );
        assert_eq!(
            d,
            RateDecision {
                rate: None,
                level: None,
                next_change: None
            }
        );
    }

    #[test]
    fn next_change_comes_with_the_decision() {
        let c = cfg();
        let contoso = c.customer_by_name("contoso").unwrap();
        let cases = [
            ("2026-11-25T12:00", Some("2026-11-25T22:00")),
            ("2026-11-25T23:00", Some("2026-11-26T06:00")),
            ("2026-11-27T23:00", Some("2026-11-28T00:00")),
            ("2026-11-28T12:00", Some("2026-11-30T00:00")),
        ];
        for (at, want) in cases {
            let d = resolve(&c, contoso, None, "daily", ts(at));
            assert_eq!(d.next_change, want.map(ts), "{at}");
        }
        let free = c.customer_by_name("Free").unwrap();
        assert_eq!(
            resolve(&c, free, None, "daily", ts("2026-11-25T12:00")).next_change,
            None
        );
        let south = c.customer_by_name("Southern").unwrap();
        assert_eq!(
            resolve(&c, south, None, "daily", ts("2026-11-25T12:00")).next_change,
            None
        );
    }

    #[test]
    fn aggregate_caps_per_node() {
        let c = cfg();
        let contoso = c.customer_by_name("contoso").unwrap();
        let north = c.reseller_by_name("north").unwrap();
        let weekday = caps(&c, contoso, ts("2026-11-25T12:00"));
        assert_eq!(
            weekday[0].map(|x| (x.node, x.rate)),
            Some((Node::Server, Some(125_000_000)))
        );
        assert_eq!(
            weekday[0].unwrap().next_change,
            Some(ts("2026-11-25T18:00"))
        );
        assert_eq!(
            weekday[1].map(|x| (x.node, x.rate, x.next_change)),
            Some((Node::Reseller(north), Some(62_500_000), None))
        );
        assert_eq!(
            weekday[2].map(|x| (x.node, x.rate)),
            Some((Node::Customer(contoso), Some(50 * MIB)))
        );
        let night = caps(&c, contoso, ts("2026-11-25T20:00"));
        assert_eq!(
            night.map(|x| x.and_then(|x| x.rate)),
            [None, Some(62_500_000), None]
        );
        let weekend = caps(&c, contoso, ts("2026-11-28T12:00"));
        assert_eq!(
            weekend.map(|x| x.and_then(|x| x.rate)),
            [None, Some(62_500_000), Some(50 * MIB)]
        );
        let south = c.customer_by_name("Southern").unwrap();
        let s = caps(&c, south, ts("2026-11-25T12:00"));
        assert!(s[1].is_none() && s[2].is_none() && s[0].is_some());
    }
}
