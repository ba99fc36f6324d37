//! `[server.limits]`, `[server.limits.penalties]` and `[server.retention]`
//! (CONFIG.md, Additions of 2026-11-30): each value checked, with every
//! error located, and the defaults where a key is absent.

use super::*;
use crate::config::limits::{self as l, Cidr, Cluster, Limits, Overflow, Penalties, Retention};
use crate::config::raw::{RawCluster, RawLimits, RawRetention};

impl V<'_> {
    /// A duration that may be 0 (a penalty of "0s" switches it off).
    pub(super) fn duration_or_zero(
        &mut self,
        v: &Sp<String>,
        key: impl fmt::Display + Copy,
        default: Duration,
    ) -> Duration {
        let Some(v) = v else { return default };
        match units::parse_duration(v.get_ref()) {
            Ok(d) => d,
            Err(e) => {
                self.err(Rule::Duration, v.span(), key, e);
                default
            }
        }
    }

    /// A whole number in `range`, or `default` when absent or wrong.
    fn count_or(
        &mut self,
        v: &Sp<i64>,
        key: impl fmt::Display + Copy,
        range: std::ops::RangeInclusive<i64>,
        default: u32,
    ) -> u32 {
        self.count(v, key, range).map_or(default, |n| n as u32)
    }
}

/// `[server.limits]`; `max_frame` bounds `hello_max_frame`.
pub(super) fn limits(v: &mut V<'_>, raw: &Sp<RawLimits>, max_frame: u32) -> Limits {
    let mut out = Limits::default();
    let Some(raw) = raw else { return out };
    let r = raw.get_ref();
    if let (Some(sp), Some(n)) = (
        &r.hello_max_frame,
        v.size(&r.hello_max_frame, "server.limits.hello_max_frame"),
    ) {
        if n < l::MIN_HELLO_MAX_FRAME as u64 || n > max_frame as u64 {
            v.err(
                Rule::Limits,
                sp.span(),
                "server.limits.hello_max_frame",
                format!(
                    "{} is out of range; use {} up to server.max_frame ({})",
                    units::format_size(n),
                    units::format_size(l::MIN_HELLO_MAX_FRAME as u64),
                    units::format_size(max_frame as u64)
                ),
            );
        } else {
            out.hello_max_frame = n as u32;
        }
    }
    out.handshakes = v.count_or(
        &r.handshakes,
        "server.limits.handshakes",
        1..=1_000_000,
        l::DEFAULT_HANDSHAKES,
    );
    out.per_source_connections = v.count_or(
        &r.per_source_connections,
        "server.limits.per_source_connections",
        1..=1_000_000,
        l::DEFAULT_PER_SOURCE_CONNECTIONS,
    );
    out.max_sessions_per_client = v.count_or(
        &r.max_sessions_per_client,
        "server.limits.max_sessions_per_client",
        1..=10_000,
        l::DEFAULT_MAX_SESSIONS_PER_CLIENT,
    );
    out.registrations_per_minute = v.count_or(
        &r.registrations_per_minute,
        "server.limits.registrations_per_minute",
        1..=1_000_000,
        l::DEFAULT_REGISTRATIONS_PER_MINUTE,
    );
    if let (Some(sp), Some(n)) = (
        &r.max_file_size,
        v.size(&r.max_file_size, "server.limits.max_file_size"),
    ) {
        if n == 0 || n > l::MAX_FILE_SIZE_LIMIT {
            v.err(
                Rule::Limits,
                sp.span(),
                "server.limits.max_file_size",
                "must be more than 0 and at most 2^63 - 1 bytes (8 EiB)",
            );
        } else {
            out.max_file_size = n;
        }
    }
    if let Some(p) = &r.penalties {
        out.penalties = penalties(v, p);
    }
    out
}

fn penalties(v: &mut V<'_>, raw: &Spanned<raw::RawPenalties>) -> Penalties {
    let r = raw.get_ref();
    let d = Penalties::default();
    let key = |k: &str| format!("server.limits.penalties.{k}");
    let mut p = Penalties {
        auth_failed: v.duration_or_zero(&r.auth_failed, &*key("auth_failed"), d.auth_failed),
        bad_hello: v.duration_or_zero(&r.bad_hello, &*key("bad_hello"), d.bad_hello),
        no_hello: v.duration_or_zero(&r.no_hello, &*key("no_hello"), d.no_hello),
        min: v.duration_or_zero(&r.min, &*key("min"), d.min),
        max: v.duration(&r.max, &*key("max"), d.max),
        max_sources: v.count_or(
            &r.max_sources,
            &*key("max_sources"),
            1..=16_777_216,
            l::DEFAULT_MAX_SOURCES,
        ),
        ..d
    };
    if p.min >= p.max {
        let span = r
            .min
            .as_ref()
            .or(r.max.as_ref())
            .map_or(raw.span(), |s| s.span());
        v.err(
            Rule::Limits,
            span,
            key("min"),
            format!(
                "min ({:?}) must be less than max ({:?}), or no source could ever be blocked",
                p.min, p.max
            ),
        );
    }
    if let Some(list) = &r.exempt {
        p.exempt = Vec::new();
        for c in list.get_ref() {
            match c.get_ref().parse::<Cidr>() {
                Ok(net) => p.exempt.push(net),
                Err(e) => v.err(Rule::Cidr, c.span(), key("exempt"), e),
            }
        }
    }
    if let Some(o) = &r.overflow {
        p.overflow = match o.get_ref().as_str() {
            "permissive" => Overflow::Permissive,
            "deny-all" => Overflow::DenyAll,
            other => {
                v.err(
                    Rule::Limits,
                    o.span(),
                    key("overflow"),
                    format!(
                        "{other:?} is not an overflow policy; use \"permissive\" or \"deny-all\""
                    ),
                );
                Overflow::Permissive
            }
        };
    }
    p
}

/// `[server.retention]`.
pub(super) fn retention(v: &mut V<'_>, raw: &Sp<RawRetention>) -> Retention {
    let d = Retention::default();
    let Some(raw) = raw else { return d };
    let r = raw.get_ref();
    Retention {
        refusals: v.duration(&r.refusals, "server.retention.refusals", d.refusals),
        sessions: v.duration(&r.sessions, "server.retention.sessions", d.sessions),
        client_events: v.duration(
            &r.client_events,
            "server.retention.client_events",
            d.client_events,
        ),
        sent_mail: v.duration(&r.sent_mail, "server.retention.sent_mail", d.sent_mail),
        usage: v.duration(&r.usage, "server.retention.usage", d.usage),
        audit: v.duration(&r.audit, "server.retention.audit", d.audit),
    }
}

/// `[server.cluster]`.
pub(super) fn cluster(v: &mut V<'_>, raw: &Sp<RawCluster>) -> Cluster {
    let mut d = Cluster::default();
    if let Some(n) = l::node_override() {
        d.node = n.to_string();
    }
    let Some(raw) = raw else { return d };
    let r = raw.get_ref();
    let node = match &r.node {
        None => d.node,
        Some(n) if l::valid_node_name(n.get_ref()) => n.get_ref().clone(),
        Some(n) => {
            v.err(
                Rule::Identifier,
                n.span(),
                "server.cluster.node",
                format!(
                    "{:?} is not a node name; use 1 to 64 ASCII letters, digits, '-', '_' or '.', not starting with '.'",
                    n.get_ref()
                ),
            );
            d.node
        }
    };
    let nodes = v
        .count(
            &r.nodes,
            "server.cluster.nodes",
            1..=i64::from(l::MAX_NODES),
        )
        .map_or(d.nodes, |n| n as u32);
    let node = l::node_override().map_or(node, str::to_string);
    let lease = v.duration(&r.lease, "server.cluster.lease", d.lease);
    if lease < std::time::Duration::from_secs(2) {
        if let Some(span) = r.lease.as_ref().map(|l| l.span()) {
            v.err(
                Rule::Range,
                span,
                "server.cluster.lease",
                "a lease shorter than 2s would expire between heartbeats; use at least \"2s\"",
            );
        }
    }
    Cluster { node, nodes, lease }
}
