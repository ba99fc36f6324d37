//! Bandwidth throttling (CONFIG.md "Throttle resolution", "Aggregate caps"):
//! a GCRA token bucket (governor) per backup session at the resolved rate,
//! plus one shared bucket per server, reseller or customer that has an
//! aggregate cap. The server throttles by not reading the socket: a session
//! pays for each DATA frame before it reads the next, so TCP backpressure
//! slows the client.
//!
//! Buckets count in units of `max(1, rate / 100_000)` bytes, so a cell is
//! never replenished faster than every 10 µs: governor keeps its period in
//! whole nanoseconds, and at 100 MiB/s a byte-sized cell (9.5 ns) would
//! truncate to 9 ns and run 6% fast. A bucket starts empty, so even the first
//! second holds the rate; afterwards, over any interval T, at most
//! `rate × T + burst` bytes pass, with `burst = max(100 ms of rate, 64 KiB)`.
//! A session's own bucket is emptied again at each PUT, so idle time is
//! never banked as a burst.
//!
//! Time comes from tokio, so tests run on its paused clock; the wall-clock
//! instant handed to `policy` is derived from the same clock.

use crate::policy::space::Node;
use crate::policy::throttle::{CapDecision, RateDecision};
use governor::clock::Clock;
use governor::{Quota, RateLimiter};
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

/// Smallest burst, in bytes.
pub const MIN_BURST: u64 = 64 << 10;
/// Cells per second at most, so a cell's period is at least 10 µs.
const MAX_CELLS_PER_SEC: u64 = 100_000;
/// Largest piece a session takes from a shared bucket at once, so that
/// concurrent sessions interleave finely and share fairly.
pub const SHARED_SLICE: u64 = 16 << 10;

/// How often a waiter checks whether its bucket was retired.
const RETIRE_CHECK: Duration = Duration::from_millis(100);

/// A governor clock on tokio's clock (paused in tests).
#[derive(Clone, Copy, Debug)]
pub struct TokioClock {
    base: tokio::time::Instant,
}

impl Default for TokioClock {
    fn default() -> Self {
        TokioClock {
            base: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    type Instant = Duration;
    fn now(&self) -> Duration {
        tokio::time::Instant::now().saturating_duration_since(self.base)
    }
}

/// Maps tokio's clock to wall-clock instants for `policy`.
#[derive(Clone, Copy, Debug)]
pub struct TimeBase {
    instant: tokio::time::Instant,
    at: jiff::Timestamp,
}

impl TimeBase {
    /// Now is now.
    pub fn now() -> TimeBase {
        TimeBase {
            instant: tokio::time::Instant::now(),
            at: crate::clock::now(),
        }
    }

    /// Now is `at` (tests start the paused clock at a chosen instant).
    pub fn starting_at(at: jiff::Timestamp) -> TimeBase {
        TimeBase {
            instant: tokio::time::Instant::now(),
            at,
        }
    }

    /// The wall-clock instant for tokio's now.
    pub fn timestamp(&self) -> jiff::Timestamp {
        let d = tokio::time::Instant::now().saturating_duration_since(self.instant);
        self.at + jiff::SignedDuration::try_from(d).unwrap_or(jiff::SignedDuration::ZERO)
    }

    /// The tokio instant for a wall-clock instant (now if it is past).
    pub fn instant(&self, t: jiff::Timestamp) -> tokio::time::Instant {
        let ahead = t.duration_since(self.timestamp());
        let now = tokio::time::Instant::now();
        match Duration::try_from(ahead) {
            Ok(d) => now + d,
            Err(_) => now,
        }
    }
}

/// A token bucket of bytes.
pub struct Bucket {
    limiter: RateLimiter<
        governor::state::NotKeyed,
        governor::state::InMemoryState,
        TokioClock,
        governor::middleware::NoOpMiddleware<Duration>,
    >,
    clock: TokioClock,
    rate: u64,
    unit: u64,
    burst_cells: u32,
    /// Sessions sharing the bucket take turns: tokio's mutex queues
    /// waiters in order, so each gets a slice in turn (a bare GCRA
    /// favours whoever happens to ask first after a refill).
    turn: tokio::sync::Mutex<()>,
    /// Replaced by a bucket at another rate (a clustered cap's share
    /// changed): waiters stop waiting here and move on.
    retired: std::sync::atomic::AtomicBool,
    /// Whether waiters look for `retired` (only a clustered cap's bucket
    /// can be retired; others sleep once per wait).
    retirable: bool,
}

impl Bucket {
    /// A bucket for `rate` bytes per second, starting empty.
    pub fn new(rate: u64) -> Bucket {
        let rate = rate.max(1);
        let unit = rate.div_ceil(MAX_CELLS_PER_SEC).max(1);
        let burst_bytes = (rate / 10).max(MIN_BURST);
        let burst_cells = u32::try_from((burst_bytes / unit).max(1)).unwrap_or(u32::MAX);
        let period_ns = (1_000_000_000u128 * unit as u128 / rate as u128).max(1) as u64;
        let quota = Quota::with_period(Duration::from_nanos(period_ns))
            .expect("the period is positive")
            .allow_burst(NonZeroU32::new(burst_cells).expect("burst is at least 1"));
        let clock = TokioClock::default();
        let limiter = RateLimiter::direct_with_clock(quota, clock);
        // Start empty: drain the initial burst.
        let _ = limiter.check_n(NonZeroU32::new(burst_cells).expect("burst is at least 1"));
        Bucket {
            limiter,
            clock,
            rate,
            unit,
            burst_cells,
            turn: tokio::sync::Mutex::new(()),
            retired: std::sync::atomic::AtomicBool::new(false),
            retirable: false,
        }
    }

    /// A bucket whose waiters move on when it is retired.
    fn retirable(rate: u64) -> Bucket {
        Bucket {
            retirable: true,
            ..Bucket::new(rate)
        }
    }

    /// Bytes per second.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Bytes per cell.
    pub fn unit(&self) -> u64 {
        self.unit
    }

    /// Waits until `cells` (≤ burst) may pass.
    async fn take_cells(&self, cells: u32) -> Duration {
        let Some(n) = NonZeroU32::new(cells.min(self.burst_cells)) else {
            return Duration::ZERO;
        };
        let start = tokio::time::Instant::now();
        let _turn = self.turn.lock().await;
        loop {
            if self.retired.load(Ordering::SeqCst) {
                // At most this piece passes unpaid; the session pays the
                // bucket that replaced this one from the next piece on.
                return start.elapsed();
            }
            match self.limiter.check_n(n) {
                Ok(Ok(())) => return start.elapsed(),
                Ok(Err(not_until)) => {
                    let wait = not_until.wait_time_from(self.clock.now());
                    // In steps where a retirement must be noticed.
                    let wait = if self.retirable {
                        wait.min(RETIRE_CHECK)
                    } else {
                        wait
                    };
                    tokio::time::sleep(wait).await
                }
                Err(_) => unreachable!("cells are capped at the burst"),
            }
        }
    }
}

/// A session's debt to one bucket, carried in bytes between frames.
struct Lane {
    bucket: Arc<Bucket>,
    carry: u64,
    slice: u64,
}

impl Lane {
    fn new(bucket: Arc<Bucket>, slice: u64) -> Lane {
        Lane {
            bucket,
            carry: 0,
            slice,
        }
    }

    /// Pays for `n` bytes, in pieces of at most the burst (so a frame larger
    /// than the burst still passes, spread out) and at most `slice`.
    async fn pay(&mut self, n: u64) -> Duration {
        self.carry += n;
        let unit = self.bucket.unit;
        let most = (self.bucket.burst_cells as u64).min((self.slice / unit).max(1));
        let mut waited = Duration::ZERO;
        while self.carry >= unit {
            let cells = (self.carry / unit).min(most);
            waited += self.bucket.take_cells(cells as u32).await;
            self.carry -= cells * unit;
        }
        waited
    }
}

/// A live shared bucket: the cap's configured rate, and the bucket (at
/// this node's share of it when clustered).
struct Shared {
    configured: u64,
    bucket: Weak<Bucket>,
}

/// The shared buckets of aggregate caps, created when a session under a
/// node first needs one and dropped with the last session using it.
///
/// Clustered (issue 14, [`Registry::cluster`]), a cap holds across every
/// node: each bucket runs at this node's granted share of the cap
/// ([`Registry::set_share`]), or at the cap ÷ the node count until a
/// share is granted or when the database cannot be reached.
#[derive(Default)]
pub struct Registry {
    shared: Mutex<HashMap<Node, Shared>>,
    generation: AtomicU64,
    /// Nodes in the cluster (0: not clustered).
    nodes: std::sync::atomic::AtomicU32,
    /// This node's granted share per cap, bytes per second.
    shares: Mutex<HashMap<Node, u64>>,
}

impl Registry {
    /// Makes this a node of a cluster of `nodes`: caps are shared.
    pub fn cluster(&self, nodes: u32) {
        self.nodes.store(nodes.max(1), Ordering::SeqCst);
    }

    /// The rate a shared bucket for `node` configured at `rate` runs at.
    fn effective(&self, node: Node, rate: u64) -> u64 {
        let nodes = self.nodes.load(Ordering::SeqCst);
        if nodes == 0 {
            return rate;
        }
        let shares = self.shares.lock().unwrap_or_else(|p| p.into_inner());
        match shares.get(&node) {
            Some(&s) => s.min(rate),
            None => crate::policy::shares::fallback(rate, nodes),
        }
    }

    /// The live bucket for `node` at `rate`, shared with other sessions.
    pub fn bucket(&self, node: Node, rate: u64) -> Arc<Bucket> {
        let effective = self.effective(node, rate);
        // A std mutex: no await happens while it is held.
        let mut map = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(sh) = map.get(&node)
            && sh.configured == rate
            && let Some(b) = sh.bucket.upgrade()
            && b.rate() == effective.max(1)
            && !b.retired.load(Ordering::SeqCst)
        {
            return b;
        }
        let b = Arc::new(if self.nodes.load(Ordering::SeqCst) > 0 {
            Bucket::retirable(effective)
        } else {
            Bucket::new(effective)
        });
        map.insert(
            node,
            Shared {
                configured: rate,
                bucket: Arc::downgrade(&b),
            },
        );
        map.retain(|_, sh| sh.bucket.strong_count() > 0);
        b
    }

    /// Shared buckets alive now.
    pub fn live(&self) -> usize {
        let map = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        map.values()
            .filter(|sh| sh.bucket.strong_count() > 0)
            .count()
    }

    /// The caps with sessions on this node now, with their configured
    /// rates: what a clustered node asks shares of.
    pub fn live_caps(&self) -> Vec<(Node, u64)> {
        let map = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        map.iter()
            .filter(|(_, sh)| sh.bucket.strong_count() > 0)
            .map(|(n, sh)| (*n, sh.configured))
            .collect()
    }

    /// Sets (or with `None` forgets, falling back to cap ÷ nodes) this
    /// node's share of `node`'s cap. A change retires the bucket in use,
    /// so its sessions move to one at the new rate within a slice.
    pub fn set_share(&self, node: Node, share: Option<u64>) {
        {
            let mut shares = self.shares.lock().unwrap_or_else(|p| p.into_inner());
            match share {
                Some(s) => shares.insert(node, s),
                None => shares.remove(&node),
            };
        }
        // Only a bucket whose rate is no longer right is retired: the
        // same rate (a grant equal to the fallback) keeps it.
        let map = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        let Some((configured, b)) = map
            .get(&node)
            .and_then(|sh| Some((sh.configured, sh.bucket.upgrade()?)))
        else {
            return;
        };
        drop(map);
        if b.rate() == self.effective(node, configured).max(1) {
            return;
        }
        b.retired.store(true, Ordering::SeqCst);
        self.config_changed();
    }

    /// Makes every session re-resolve its rates before its next frame
    /// (a config reload, a moved client).
    pub fn config_changed(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }
}

/// Where a session's throttle settings come from: `policy` over the
/// current config, asked again at every change.
pub type Resolver =
    Arc<dyn Fn(jiff::Timestamp) -> (RateDecision, [Option<CapDecision>; 3]) + Send + Sync>;

/// Time a session spent waiting, per level.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Waits {
    /// On its own bucket.
    pub session: Duration,
    /// On the server's aggregate.
    pub server: Duration,
    /// On its reseller's aggregate.
    pub reseller: Duration,
    /// On its customer's aggregate.
    pub customer: Duration,
}

/// One backup session's throttle.
pub struct SessionThrottle {
    resolve: Resolver,
    registry: Arc<Registry>,
    time: TimeBase,
    own: Option<Lane>,
    caps: Vec<(Node, Lane)>,
    rate: Option<u64>,
    next_change: Option<tokio::time::Instant>,
    generation: u64,
    /// Time spent waiting so far.
    pub waits: Waits,
}

impl SessionThrottle {
    /// Resolves the settings now and builds the buckets.
    pub fn new(resolve: Resolver, registry: Arc<Registry>, time: TimeBase) -> SessionThrottle {
        let mut t = SessionThrottle {
            resolve,
            generation: registry.generation(),
            registry,
            time,
            own: None,
            caps: Vec::new(),
            rate: None,
            next_change: None,
            waits: Waits::default(),
        };
        t.refresh();
        t
    }

    /// The per-session rate in force (bytes/s); `None` = unthrottled.
    pub fn rate(&self) -> Option<u64> {
        self.rate
    }

    /// The aggregate caps in force, per node.
    pub fn caps(&self) -> Vec<(Node, u64)> {
        self.caps
            .iter()
            .map(|(n, l)| (*n, l.bucket.rate()))
            .collect()
    }

    fn refresh(&mut self) {
        let (decision, caps) = (self.resolve)(self.time.timestamp());
        if decision.rate != self.rate || self.own.is_none() != decision.rate.is_none() {
            self.own = decision
                .rate
                .map(|r| Lane::new(Arc::new(Bucket::new(r)), u64::MAX));
        }
        self.rate = decision.rate;
        let mut next = decision.next_change;
        let mut lanes = Vec::new();
        for cap in caps.into_iter().flatten() {
            next = match (next, cap.next_change) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            if let Some(rate) = cap.rate {
                // Keep the carried debt when the bucket stays the same.
                let bucket = self.registry.bucket(cap.node, rate);
                let kept = self
                    .caps
                    .iter()
                    .position(|(n, l)| *n == cap.node && Arc::ptr_eq(&l.bucket, &bucket));
                match kept {
                    Some(i) => lanes.push(self.caps.swap_remove(i)),
                    None => lanes.push((cap.node, Lane::new(bucket, SHARED_SLICE))),
                }
            }
        }
        self.caps = lanes;
        self.next_change = next.map(|t| self.time.instant(t));
        self.generation = self.registry.generation();
    }

    /// An upload starts with the session's own bucket empty: time spent
    /// idle (between WELCOME and PUT, between files) is not banked as a
    /// burst, so a file takes its size ÷ the rate from PUT to STORED
    /// (issue 13: sessions opened one by one and started together ran up
    /// to 11% fast). Shared aggregate buckets are left as they are.
    pub fn start_upload(&mut self) {
        if let Some(own) = self.own.as_mut() {
            own.bucket = Arc::new(Bucket::new(own.bucket.rate()));
        }
    }

    /// Re-resolves before the next payment (the client moved).
    pub fn invalidate(&mut self) {
        self.generation = u64::MAX;
    }

    /// Pays for `n` bytes just read; returns when the next frame may be read.
    pub async fn consume(&mut self, n: u64) {
        let mut left = n;
        while left > 0 {
            if self
                .next_change
                .is_some_and(|t| tokio::time::Instant::now() >= t)
                || self.generation != self.registry.generation()
            {
                self.refresh();
            }
            // Pay in pieces no larger than 64 KiB, so a change (a window
            // edge, a reload) applies within the frame being paid for.
            let piece = left.min(MIN_BURST);
            left -= piece;
            if let Some(own) = self.own.as_mut() {
                self.waits.session += own.pay(piece).await;
            }
            for (node, lane) in self.caps.iter_mut() {
                let w = lane.pay(piece).await;
                match node {
                    Node::Server => self.waits.server += w,
                    Node::Reseller(_) => self.waits.reseller += w,
                    Node::Customer(_) => self.waits.customer += w,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
