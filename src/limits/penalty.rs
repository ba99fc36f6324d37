//! The per-source penalty table (CONFIG.md `[server.limits.penalties]`,
//! PROTOCOL.md Additions "Per-source penalties"), after OpenSSH's
//! `PerSourcePenalties` (srclimit.c): each misbehaviour adds its duration to
//! the source's penalty, which expires on its own; once the penalty left
//! exceeds `min`, the source is blocked until it expires. The table is
//! bounded by `max_sources`.
//!
//! Pure: no clock, no I/O. The caller passes "now" and holds the lock.

use super::Source;
use crate::config::{Overflow, Penalties};
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;
use tokio::time::Instant;

/// How often at most a full table is swept for expired entries when a new
/// source arrives; sweeping is O(sources), and a flood of new sources must
/// not turn every accept into a scan.
pub const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// What a source did to earn a penalty.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// A wrong secret or enroll key.
    AuthFailed,
    /// A HELLO refused as malformed, or naming no known client or customer.
    BadHello,
    /// A connection that ended before a valid HELLO.
    NoHello,
}

impl Reason {
    /// The spelling in logs and metrics (the config key).
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::AuthFailed => "auth_failed",
            Reason::BadHello => "bad_hello",
            Reason::NoHello => "no_hello",
        }
    }

    fn cost(self, p: &Penalties) -> Duration {
        match self {
            Reason::AuthFailed => p.auth_failed,
            Reason::BadHello => p.bad_hello,
            Reason::NoHello => p.no_hello,
        }
    }
}

/// Whether a new connection from a source may go on to TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Go on.
    Allow,
    /// The source is penalized; this much of its penalty is left.
    Blocked(Duration),
    /// The table is full and `overflow = "deny-all"`.
    Overflow,
}

/// What one penalty did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Exempt source, or a zero penalty.
    Ignored,
    /// Added; the source is not blocked (yet).
    Accrued,
    /// Added, and the source is blocked from now on for this long. Logged
    /// once per penalty period.
    Started(Duration),
    /// Added to a source already blocked; the block now lasts this long.
    Extended(Duration),
    /// The table is full: the source is not tracked.
    Untracked,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    expiry: Instant,
    active: bool,
}

/// Sources and their penalties.
#[derive(Debug, Default)]
pub struct Table {
    entries: HashMap<Source, Entry>,
    last_sweep: Option<Instant>,
}

impl Table {
    /// May a new connection from `ip` go on?
    pub fn check(&mut self, p: &Penalties, ip: IpAddr, now: Instant) -> Verdict {
        if p.is_exempt(ip) {
            return Verdict::Allow;
        }
        let src = Source::of(ip);
        match self.entries.get(&src) {
            Some(e) if e.active && e.expiry > now => Verdict::Blocked(e.expiry - now),
            Some(e) if e.expiry <= now => {
                self.entries.remove(&src);
                Verdict::Allow
            }
            Some(_) => Verdict::Allow,
            None => {
                if p.overflow == Overflow::DenyAll && !self.has_room(p, now) {
                    Verdict::Overflow
                } else {
                    Verdict::Allow
                }
            }
        }
    }

    /// Up to `max` sources blocked now, with the time each has left, the
    /// longest first (the console's admin page).
    pub fn blocked_list(&self, now: Instant, max: usize) -> Vec<(Source, Duration)> {
        let mut v: Vec<(Source, Duration)> = self
            .entries
            .iter()
            .filter(|(_, e)| e.active && e.expiry > now)
            .map(|(s, e)| (*s, e.expiry - now))
            .collect();
        v.sort_by_key(|e| std::cmp::Reverse(e.1));
        v.truncate(max);
        v
    }

    /// Adds the penalty for `reason` to `ip`'s source.
    pub fn penalize(&mut self, p: &Penalties, ip: IpAddr, reason: Reason, now: Instant) -> Outcome {
        let cost = reason.cost(p);
        if cost.is_zero() || p.is_exempt(ip) {
            return Outcome::Ignored;
        }
        let src = Source::of(ip);
        if !self.entries.contains_key(&src) && !self.has_room(p, now) {
            return Outcome::Untracked;
        }
        let e = self.entries.entry(src).or_insert(Entry {
            expiry: now,
            active: false,
        });
        if e.expiry <= now {
            *e = Entry {
                expiry: now,
                active: false,
            };
        }
        e.expiry = (e.expiry + cost).min(now + p.max);
        let left = e.expiry - now;
        if e.active {
            Outcome::Extended(left)
        } else if left > p.min {
            e.active = true;
            Outcome::Started(left)
        } else {
            Outcome::Accrued
        }
    }

    /// Drops expired entries.
    pub fn sweep(&mut self, now: Instant) {
        self.entries.retain(|_, e| e.expiry > now);
        self.last_sweep = Some(now);
    }

    /// Sources blocked now.
    pub fn blocked(&self, now: Instant) -> usize {
        self.entries
            .values()
            .filter(|e| e.active && e.expiry > now)
            .count()
    }

    /// Sources tracked.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no source is tracked.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether one more source fits, sweeping a full table at most once
    /// per [`SWEEP_EVERY`].
    fn has_room(&mut self, p: &Penalties, now: Instant) -> bool {
        let max = p.max_sources as usize;
        if self.entries.len() < max {
            return true;
        }
        if self
            .last_sweep
            .is_none_or(|t| now.saturating_duration_since(t) >= SWEEP_EVERY)
        {
            self.sweep(now);
        }
        self.entries.len() < max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn penalties() -> Penalties {
        Penalties {
            exempt: vec!["10.9.0.0/16".parse().unwrap()],
            ..Penalties::default()
        }
    }

    const S: Duration = Duration::from_secs(1);

    /// Defaults: auth_failed 5 s, min 15 s. Failures in quick succession
    /// block on the fourth (20 s > 15 s), not the third (15 s is not more
    /// than min); the block lasts until the whole penalty has expired.
    #[tokio::test(start_paused = true)]
    async fn auth_failures_block_on_the_fourth_until_expiry() {
        let p = penalties();
        let mut t = Table::default();
        let a = ip("192.0.2.1");
        let t0 = Instant::now();
        let steps = [
            (Reason::AuthFailed, Outcome::Accrued),
            (Reason::AuthFailed, Outcome::Accrued),
            (Reason::AuthFailed, Outcome::Accrued),
            (Reason::AuthFailed, Outcome::Started(20 * S)),
            (Reason::AuthFailed, Outcome::Extended(25 * S)),
        ];
        for (i, (reason, want)) in steps.into_iter().enumerate() {
            assert_eq!(
                t.check(&p, a, t0),
                if i < 4 {
                    Verdict::Allow
                } else {
                    Verdict::Blocked(20 * S)
                },
                "step {i}"
            );
            assert_eq!(t.penalize(&p, a, reason, t0), want, "step {i}");
        }
        assert_eq!(t.check(&p, a, t0 + 24 * S), Verdict::Blocked(S));
        assert_eq!(t.check(&p, a, t0 + 25 * S), Verdict::Allow, "expired");
        assert!(t.is_empty(), "an expired entry is dropped when seen");
        assert_eq!(t.blocked(t0), 0);
    }

    /// Penalties decay: one failure every 5 s never accumulates past 5 s.
    #[tokio::test(start_paused = true)]
    async fn slow_failures_never_block() {
        let p = penalties();
        let mut t = Table::default();
        let a = ip("192.0.2.1");
        let t0 = Instant::now();
        for i in 0..20 {
            let now = t0 + 5 * S * i;
            assert_eq!(t.check(&p, a, now), Verdict::Allow);
            assert_eq!(t.penalize(&p, a, Reason::AuthFailed, now), Outcome::Accrued);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_penalty_is_capped_at_max() {
        let p = penalties();
        let mut t = Table::default();
        let a = ip("192.0.2.1");
        let now = Instant::now();
        let mut last = Outcome::Ignored;
        for _ in 0..1000 {
            last = t.penalize(&p, a, Reason::AuthFailed, now);
        }
        assert_eq!(last, Outcome::Extended(p.max));
        assert_eq!(t.check(&p, a, now), Verdict::Blocked(p.max));
    }

    /// Table of reasons: each adds its own duration (defaults 5 s, 2 s, 1 s).
    #[tokio::test(start_paused = true)]
    async fn each_reason_costs_its_duration() {
        let p = penalties();
        let now = Instant::now();
        for (reason, n_to_block) in [
            (Reason::AuthFailed, 4),
            (Reason::BadHello, 8),
            (Reason::NoHello, 16),
        ] {
            let mut t = Table::default();
            let a = ip("198.51.100.3");
            for i in 1..=n_to_block {
                let o = t.penalize(&p, a, reason, now);
                assert_eq!(
                    matches!(o, Outcome::Started(_)),
                    i == n_to_block,
                    "{reason:?} #{i}: {o:?}"
                );
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn exempt_sources_and_zero_penalties_are_ignored() {
        let mut p = penalties();
        let mut t = Table::default();
        let now = Instant::now();
        for _ in 0..10 {
            assert_eq!(
                t.penalize(&p, ip("10.9.3.4"), Reason::AuthFailed, now),
                Outcome::Ignored
            );
        }
        assert_eq!(t.check(&p, ip("10.9.3.4"), now), Verdict::Allow);
        p.no_hello = Duration::ZERO;
        assert_eq!(
            t.penalize(&p, ip("192.0.2.9"), Reason::NoHello, now),
            Outcome::Ignored
        );
        assert!(t.is_empty());
    }

    /// IPv6 sources are /64s: an attacker cannot rotate through its prefix.
    #[tokio::test(start_paused = true)]
    async fn ipv6_addresses_share_their_64() {
        let p = penalties();
        let mut t = Table::default();
        let now = Instant::now();
        for i in 1..=4 {
            t.penalize(
                &p,
                ip(&format!("2001:db8:1:2::{i}")),
                Reason::AuthFailed,
                now,
            );
        }
        assert!(matches!(
            t.check(&p, ip("2001:db8:1:2:ffff::9"), now),
            Verdict::Blocked(_)
        ));
        assert_eq!(t.check(&p, ip("2001:db8:1:3::1"), now), Verdict::Allow);
        assert_eq!(t.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_table_follows_overflow() {
        let mut p = penalties();
        p.max_sources = 2;
        let mut t = Table::default();
        let now = Instant::now();
        assert_eq!(
            t.penalize(&p, ip("192.0.2.1"), Reason::NoHello, now),
            Outcome::Accrued
        );
        assert_eq!(
            t.penalize(&p, ip("192.0.2.2"), Reason::NoHello, now),
            Outcome::Accrued
        );
        assert_eq!(
            t.penalize(&p, ip("192.0.2.3"), Reason::NoHello, now),
            Outcome::Untracked
        );
        assert_eq!(t.len(), 2, "bounded");
        assert_eq!(
            t.check(&p, ip("192.0.2.3"), now),
            Verdict::Allow,
            "permissive"
        );
        p.overflow = Overflow::DenyAll;
        assert_eq!(t.check(&p, ip("192.0.2.3"), now), Verdict::Overflow);
        assert_eq!(
            t.check(&p, ip("192.0.2.1"), now),
            Verdict::Allow,
            "tracked sources go on"
        );
        assert_eq!(
            t.check(&p, ip("10.9.0.1"), now),
            Verdict::Allow,
            "exempt sources go on"
        );
        // Once entries expire (a sweep runs at most once a second) there is room again.
        let later = now + 2 * S;
        assert_eq!(t.check(&p, ip("192.0.2.3"), later), Verdict::Allow);
        assert_eq!(
            t.penalize(&p, ip("192.0.2.3"), Reason::NoHello, later),
            Outcome::Accrued
        );
        assert_eq!(t.len(), 1);
    }
}
