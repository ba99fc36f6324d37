//! What a peer may cost before it has proved anything (CONFIG.md
//! `[server.limits]`, PROTOCOL.md Additions of 2026-11-30): the per-source
//! penalty table, concurrent connections per source, and the small pool
//! of blocking threads that verify argon2 hashes.
//!
//! The decisions are pure ([`penalty::Table`]); this module is the shell
//! around them: the locks, the clock, the log lines and the metrics. Every
//! lock here is a `std::sync::Mutex`, not a tokio one, because no await
//! happens while it is held, and each holds for a hash-map operation.

pub mod penalty;

use crate::config::{self, PhcHash};
use penalty::{Outcome, Reason, Table, Verdict};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tracing::{info, warn};

/// Concurrent argon2 verifications (enroll keys, later web passwords). Each
/// takes ~20-50 ms of one core and 19 MiB; a flood of guesses queues here,
/// on its own, and never in the state's write lane or on the runtime.
pub fn argon2_permits() -> usize {
    std::thread::available_parallelism()
        .map(|n| (n.get() / 2).max(1))
        .unwrap_or(1)
}

/// A source address as the limits count it: an IPv4 address, or the /64 of
/// an IPv6 one (one host usually holds a whole /64). IPv4-mapped IPv6
/// addresses count as IPv4.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Source(IpAddr);

impl Source {
    /// The source `ip` belongs to.
    pub fn of(ip: IpAddr) -> Source {
        match config::canonical(ip) {
            IpAddr::V6(v6) => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                Source(IpAddr::V6(Ipv6Addr::from(bits)))
            }
            v4 => Source(v4),
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V4(a) => write!(f, "{a}"),
            IpAddr::V6(a) => write!(f, "{a}/64"),
        }
    }
}

/// Why a connection was closed right after accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dropped {
    /// Its source is penalized.
    Penalized,
    /// Its source has `per_source_connections` open already.
    PerSource,
    /// The penalty table is full and `overflow = "deny-all"`.
    Overflow,
}

impl Dropped {
    /// The `reason` label of `tollgate_connections_dropped_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Dropped::Penalized => "penalized",
            Dropped::PerSource => "per_source",
            Dropped::Overflow => "overflow",
        }
    }
}

/// The shared limits of one daemon.
#[derive(Debug)]
pub struct Limits {
    penalties: Mutex<Table>,
    open: Mutex<HashMap<Source, u32>>,
    argon2: Semaphore,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            penalties: Mutex::default(),
            open: Mutex::default(),
            argon2: Semaphore::new(argon2_permits()),
        }
    }
}

/// One open connection of a source, counted until dropped.
#[derive(Debug)]
pub struct SourceGuard {
    limits: Arc<Limits>,
    source: Source,
}

impl Drop for SourceGuard {
    fn drop(&mut self) {
        let mut open = self.limits.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.source);
            }
        }
    }
}

impl Limits {
    /// Right after accept, before any TLS work: may this connection go on?
    /// Penalized sources and sources over `per_source_connections` are
    /// refused; the caller closes the socket.
    pub fn accept(
        self: &Arc<Self>,
        cfg: &config::Limits,
        ip: IpAddr,
        now: Instant,
    ) -> Result<SourceGuard, Dropped> {
        let verdict = self
            .penalties
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .check(&cfg.penalties, ip, now);
        let dropped = match verdict {
            Verdict::Allow => None,
            Verdict::Blocked(_) => Some(Dropped::Penalized),
            Verdict::Overflow => Some(Dropped::Overflow),
        };
        let result = match dropped {
            Some(d) => Err(d),
            None => {
                let source = Source::of(ip);
                let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
                let n = open.entry(source).or_insert(0);
                if *n >= cfg.per_source_connections {
                    Err(Dropped::PerSource)
                } else {
                    *n += 1;
                    Ok(SourceGuard {
                        limits: self.clone(),
                        source,
                    })
                }
            }
        };
        if let Err(d) = result {
            metrics::counter!(crate::metrics::CONNECTIONS_DROPPED, "reason" => d.as_str())
                .increment(1);
        }
        result
    }

    /// Connections open now from `ip`'s source.
    pub fn open_from(&self, ip: IpAddr) -> u32 {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.get(&Source::of(ip)).copied().unwrap_or(0)
    }

    /// Adds a penalty to `ip`'s source; the start of a block is logged once,
    /// with the source, the reason and the duration.
    pub fn penalize(&self, cfg: &config::Limits, ip: IpAddr, reason: Reason, now: Instant) {
        let mut table = self.penalties.lock().unwrap_or_else(|p| p.into_inner());
        let outcome = table.penalize(&cfg.penalties, ip, reason, now);
        let blocked = table.blocked(now);
        drop(table);
        match outcome {
            Outcome::Started(d) => {
                warn!(
                    source = %Source::of(ip),
                    reason = reason.as_str(),
                    duration_s = d.as_secs(),
                    "penalizing source {} for {}s ({}): its new connections are closed before TLS",
                    Source::of(ip),
                    d.as_secs(),
                    reason.as_str()
                );
                metrics::counter!(crate::metrics::PENALTIES_STARTED, "reason" => reason.as_str())
                    .increment(1);
            }
            Outcome::Untracked => {
                info!(source = %Source::of(ip), "the penalty table is full; source not tracked");
            }
            _ => {}
        }
        metrics::gauge!(crate::metrics::PENALIZED_SOURCES).set(blocked as f64);
    }

    /// Drops expired penalties and refreshes the gauge; run every second
    /// or so.
    pub fn sweep(&self, now: Instant) {
        let mut table = self.penalties.lock().unwrap_or_else(|p| p.into_inner());
        table.sweep(now);
        metrics::gauge!(crate::metrics::PENALIZED_SOURCES).set(table.blocked(now) as f64);
    }

    /// Sources blocked now.
    pub fn penalized(&self, now: Instant) -> usize {
        let table = self.penalties.lock().unwrap_or_else(|p| p.into_inner());
        table.blocked(now)
    }

    /// Verifies `candidate` against an argon2 PHC hash on a blocking thread,
    /// at most [`argon2_permits`] at a time. Never call this while holding
    /// a state transaction.
    pub async fn verify(&self, hash: &PhcHash, candidate: &str) -> bool {
        let Ok(_permit) = self.argon2.acquire().await else {
            return false;
        };
        let (hash, candidate) = (hash.clone(), candidate.to_string());
        tokio::task::spawn_blocking(move || hash.verify(&candidate))
            .await
            .unwrap_or(false)
    }
}

/// The fail2ban-friendly line for a failed authentication, in a fixed
/// shape: `authentication failure for <id> from <ip>`. The id is escaped
/// (control characters and spaces cannot forge another line or field).
pub fn auth_failure_line(id: &str, ip: IpAddr) -> String {
    let mut esc = String::with_capacity(id.len());
    for c in id.chars().take(64) {
        match c {
            '\\' => esc.push_str("\\\\"),
            c if c.is_ascii_graphic() => esc.push(c),
            c if c.is_ascii() => esc.push_str(&format!("\\x{:02x}", c as u32)),
            c => esc.push_str(&format!("\\u{{{:x}}}", c as u32)),
        }
    }
    if esc.is_empty() {
        esc.push_str("(none)");
    }
    format!(
        "authentication failure for {esc} from {}",
        config::canonical(ip)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources() {
        let s = |a: &str| Source::of(a.parse().unwrap()).to_string();
        assert_eq!(s("192.0.2.1"), "192.0.2.1");
        assert_eq!(s("::ffff:192.0.2.1"), "192.0.2.1");
        assert_eq!(s("2001:db8:1:2:3:4:5:6"), "2001:db8:1:2::/64");
    }

    #[test]
    fn the_auth_failure_line_is_fixed_and_escaped() {
        let ip: IpAddr = "203.0.113.5".parse().unwrap();
        assert_eq!(
            auth_failure_line("PC-1", ip),
            "authentication failure for PC-1 from 203.0.113.5"
        );
        assert_eq!(
            auth_failure_line("a b\nforged from 1.2.3.4", ip),
            "authentication failure for a\\x20b\\x0aforged\\x20from\\x201.2.3.4 from 203.0.113.5"
        );
        assert_eq!(
            auth_failure_line("é\\", ip),
            "authentication failure for \\u{e9}\\\\ from 203.0.113.5"
        );
        assert_eq!(
            auth_failure_line("", "::ffff:10.0.0.1".parse().unwrap()),
            "authentication failure for (none) from 10.0.0.1"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn per_source_connections_are_counted_until_dropped() {
        let limits = Arc::new(Limits::default());
        let cfg = config::Limits {
            per_source_connections: 2,
            ..config::Limits::default()
        };
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let now = Instant::now();
        let a = limits.accept(&cfg, ip, now).unwrap();
        let b = limits.accept(&cfg, ip, now).unwrap();
        assert_eq!(
            limits.accept(&cfg, ip, now).unwrap_err(),
            Dropped::PerSource
        );
        assert!(
            limits
                .accept(&cfg, "127.0.0.2".parse().unwrap(), now)
                .is_ok(),
            "another source"
        );
        drop(a);
        let c = limits.accept(&cfg, ip, now).unwrap();
        assert_eq!(limits.open_from(ip), 2);
        drop((b, c));
        assert_eq!(limits.open_from(ip), 0);
        assert!(
            limits.open.lock().unwrap().is_empty(),
            "no entry is left behind"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_penalized_source_is_dropped_at_accept() {
        let limits = Arc::new(Limits::default());
        let cfg = config::Limits {
            penalties: config::Penalties {
                exempt: vec![],
                ..config::Penalties::default()
            },
            ..config::Limits::default()
        };
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let now = Instant::now();
        for _ in 0..4 {
            assert!(limits.accept(&cfg, ip, now).is_ok());
            limits.penalize(&cfg, ip, Reason::AuthFailed, now);
        }
        assert_eq!(
            limits.accept(&cfg, ip, now).unwrap_err(),
            Dropped::Penalized
        );
        assert_eq!(limits.penalized(now), 1);
        let later = now + std::time::Duration::from_secs(21);
        assert!(
            limits.accept(&cfg, ip, later).is_ok(),
            "the penalty expired"
        );
    }
}
