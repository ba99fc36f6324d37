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
use std::net::IpAddr;
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
        Source(config::source_of(ip))
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
    argon2_queue: Semaphore,
    argon2_sources: Mutex<HashMap<Source, u32>>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            penalties: Mutex::default(),
            open: Mutex::default(),
            argon2: Semaphore::new(argon2_permits()),
            argon2_queue: Semaphore::new(ARGON2_QUEUE),
            argon2_sources: Mutex::default(),
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

    /// Whether `ip`'s source is blocked now (for requests on a connection
    /// opened before its penalty began).
    pub fn is_blocked(&self, cfg: &config::Limits, ip: IpAddr, now: Instant) -> bool {
        let verdict = self
            .penalties
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .check(&cfg.penalties, ip, now);
        matches!(verdict, Verdict::Blocked(_))
    }

    /// Up to `max` sources blocked now, with the time each has left.
    pub fn blocked_list(&self, now: Instant, max: usize) -> Vec<(Source, std::time::Duration)> {
        let table = self.penalties.lock().unwrap_or_else(|p| p.into_inner());
        table.blocked_list(now, max)
    }

    /// Sources blocked now.
    pub fn penalized(&self, now: Instant) -> usize {
        let table = self.penalties.lock().unwrap_or_else(|p| p.into_inner());
        table.blocked(now)
    }

    /// Verifies `candidate` against an argon2 PHC hash on a blocking thread,
    /// at most [`argon2_permits`] at a time, for a connection from `ip`
    /// that must be answered by `deadline`. `None` when it cannot be done
    /// now: [`ARGON2_QUEUE`] checks are already waiting or running, `ip`'s
    /// source has [`ARGON2_PER_SOURCE`] of them, or the deadline passes in
    /// the queue. Each waiting check holds a handshake slot, so the queue
    /// must stay short. Never call this while holding a state transaction.
    pub async fn verify(
        &self,
        ip: IpAddr,
        hash: &PhcHash,
        candidate: &str,
        deadline: Instant,
    ) -> Option<bool> {
        let _queued = self.argon2_queue.try_acquire().ok()?;
        let source = Source::of(ip);
        {
            let mut n = self
                .argon2_sources
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let k = n.entry(source).or_insert(0);
            if *k >= ARGON2_PER_SOURCE {
                return None;
            }
            *k += 1;
        }
        let _source = ArgonSlot {
            limits: self,
            source,
        };
        let _permit = tokio::time::timeout_at(deadline, self.argon2.acquire())
            .await
            .ok()?
            .ok()?;
        let (hash, candidate) = (hash.clone(), candidate.to_string());
        tokio::task::spawn_blocking(move || hash.verify(&candidate))
            .await
            .ok()
    }
}

impl Limits {
    /// Hashes `secret` for a config file (the console's form) on the same
    /// bounded argon2 pool the checks use, so a burst of saves cannot take
    /// the CPU from logins and HELLOs. None when the pool stays busy past
    /// `deadline` or hashing fails.
    pub async fn hash(&self, secret: &str, deadline: Instant) -> Option<PhcHash> {
        let _queued = self.argon2_queue.try_acquire().ok()?;
        let _permit = tokio::time::timeout_at(deadline, self.argon2.acquire())
            .await
            .ok()?
            .ok()?;
        let secret = secret.to_string();
        tokio::task::spawn_blocking(move || PhcHash::hash(&secret).ok())
            .await
            .ok()
            .flatten()
    }
}

/// Checks waiting for or running on the argon2 pool, at most.
pub const ARGON2_QUEUE: usize = 32;
/// Of them, from one source at most.
pub const ARGON2_PER_SOURCE: u32 = 2;

struct ArgonSlot<'a> {
    limits: &'a Limits,
    source: Source,
}

impl Drop for ArgonSlot<'_> {
    fn drop(&mut self) {
        let mut n = self
            .limits
            .argon2_sources
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(k) = n.get_mut(&self.source) {
            *k -= 1;
            if *k == 0 {
                n.remove(&self.source);
            }
        }
    }
}

/// The fail2ban-friendly line for a failed authentication, in a fixed
/// shape: `authentication failure for <id> from <ip>`. The id is escaped
/// (control characters and spaces cannot forge another line or field).
pub fn auth_failure_line(id: &str, ip: IpAddr) -> String {
    // No space either: the id is one field of the line.
    let mut esc = config::escape_log(id, 64).replace(' ', "\\x20");
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

    /// An argon2id hash of `password` costing `m_kib` KiB and `passes`.
    fn argon2_of(password: &str, m_kib: u32, passes: u32) -> PhcHash {
        use argon2::PasswordHasher;
        let phc = argon2::Argon2::new(
            argon2::Algorithm::Argon2id,
            argon2::Version::V0x13,
            argon2::Params::new(m_kib, passes, 1, None).unwrap(),
        )
        .hash_password(password.as_bytes())
        .unwrap()
        .to_string();
        PhcHash::new(phc)
    }

    /// The argon2 queue is short and shared fairly: a source gets at most
    /// two checks at once, everyone at most 32, and a check that cannot
    /// start before its connection's deadline is not made.
    #[tokio::test]
    async fn argon2_checks_are_bounded_per_source_and_in_all() {
        let hash = argon2_of("right", 64, 1);
        let limits = Arc::new(Limits::default());
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let later = Instant::now() + std::time::Duration::from_secs(5);
        assert_eq!(limits.verify(a, &hash, "right", later).await, Some(true));
        assert_eq!(limits.verify(a, &hash, "wrong", later).await, Some(false));
        // Two of a source's checks held open: a third is turned away.
        let held: Vec<_> = (0..2)
            .map(|_| limits.argon2_queue.try_acquire().unwrap())
            .collect();
        {
            let mut n = limits.argon2_sources.lock().unwrap();
            n.insert(Source::of(a), ARGON2_PER_SOURCE);
        }
        assert_eq!(limits.verify(a, &hash, "right", later).await, None);
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert_eq!(
            limits.verify(b, &hash, "right", later).await,
            Some(true),
            "another source"
        );
        limits.argon2_sources.lock().unwrap().clear();
        drop(held);
        // The whole queue full: everyone is turned away.
        let all: Vec<_> = (0..ARGON2_QUEUE)
            .map(|_| limits.argon2_queue.try_acquire().unwrap())
            .collect();
        assert_eq!(limits.verify(b, &hash, "right", later).await, None);
        drop(all);
        // The pool busy past the deadline: not made.
        let pool: Vec<_> = (0..argon2_permits())
            .map(|_| limits.argon2.try_acquire().unwrap())
            .collect();
        let soon = Instant::now() + std::time::Duration::from_millis(50);
        assert_eq!(limits.verify(b, &hash, "right", soon).await, None);
        drop(pool);
        assert!(
            limits.argon2_sources.lock().unwrap().is_empty(),
            "slots are given back"
        );
    }

    /// A check runs off the runtime's threads: on a one-thread runtime,
    /// a task ticking every millisecond keeps ticking while a check that
    /// costs tens of milliseconds runs. Made inline, the check would hold
    /// the only thread and the ticker would not move until it ended.
    #[tokio::test(flavor = "current_thread")]
    async fn an_argon2_check_never_holds_a_runtime_thread() {
        // 32 MiB and three passes: tens of ms even optimized.
        let hash = argon2_of("right", 32 * 1024, 3);
        let limits = Arc::new(Limits::default());
        let ticks = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let ticker = tokio::spawn({
            let ticks = ticks.clone();
            async move {
                loop {
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                    ticks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        });
        // Let the ticker start before the check.
        while ticks.load(std::sync::atomic::Ordering::Relaxed) == 0 {
            tokio::task::yield_now().await;
        }
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let later = Instant::now() + std::time::Duration::from_secs(60);
        let before = ticks.load(std::sync::atomic::Ordering::Relaxed);
        let t0 = std::time::Instant::now();
        assert_eq!(limits.verify(ip, &hash, "wrong", later).await, Some(false));
        let took = t0.elapsed();
        let during = ticks.load(std::sync::atomic::Ordering::Relaxed) - before;
        ticker.abort();
        assert!(
            took >= std::time::Duration::from_millis(20),
            "the check must take long enough to tell: {took:?}"
        );
        // A tick takes at least 1 ms; a generous floor for a busy machine.
        assert!(
            during >= 5,
            "the runtime's thread ticked {during} times during a {took:?} check"
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
