//! The limiter on tokio's paused clock: exact, fast and never flaky.

use super::*;
use crate::config::{Config, CustomerId};
use crate::policy::throttle;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use tokio::time::Instant;

const MIB: u64 = 1 << 20;

fn fixed(rate: Option<u64>) -> Resolver {
    Arc::new(move |_| {
        (
            RateDecision {
                rate,
                level: None,
                next_change: None,
            },
            [None, None, None],
        )
    })
}

/// Sends `total` bytes in `frame`-sized pieces; returns the elapsed time.
async fn transfer(t: &mut SessionThrottle, total: u64, frame: u64) -> Duration {
    let start = Instant::now();
    let mut sent = 0;
    while sent < total {
        let n = frame.min(total - sent);
        t.consume(n).await;
        sent += n;
    }
    start.elapsed()
}

fn within(got: Duration, want: Duration, tolerance: f64) -> bool {
    (got.as_secs_f64() - want.as_secs_f64()).abs() <= want.as_secs_f64() * tolerance
}

#[tokio::test(start_paused = true)]
async fn ten_mib_at_two_mib_per_second_takes_five_seconds() {
    let mut t = SessionThrottle::new(fixed(Some(2 * MIB)), Arc::default(), TimeBase::now());
    let took = transfer(&mut t, 10 * MIB, MIB).await;
    assert!(within(took, Duration::from_secs(5), 0.01), "{took:?}");
    assert!(within(t.waits.session, Duration::from_secs(5), 0.01));
}

#[tokio::test(start_paused = true)]
async fn idle_time_before_an_upload_is_not_banked() {
    // WELCOME, then 5 s idle (other sessions being opened), then PUT: the
    // 640 KiB still take 10 s at 64 KiB/s, not 9.
    let mut t = SessionThrottle::new(fixed(Some(64 << 10)), Arc::default(), TimeBase::now());
    tokio::time::sleep(Duration::from_secs(5)).await;
    t.start_upload();
    let took = transfer(&mut t, 640 << 10, 64 << 10).await;
    assert!(within(took, Duration::from_secs(10), 0.01), "{took:?}");
}

#[tokio::test(start_paused = true)]
async fn accuracy_across_rates_and_frame_sizes() {
    for rate in [64 << 10, MIB, 10 * MIB, 100 * MIB, 12_500_000] {
        for frame in [1024, 64 << 10, MIB] {
            let mut t = SessionThrottle::new(fixed(Some(rate)), Arc::default(), TimeBase::now());
            let took = transfer(&mut t, rate * 4, frame).await;
            assert!(
                within(took, Duration::from_secs(4), 0.01),
                "rate {rate} frame {frame}: {took:?}"
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn never_more_than_rate_times_t_plus_burst() {
    let rate = 3 * MIB;
    let burst = (rate / 10).max(MIN_BURST);
    let mut t = SessionThrottle::new(fixed(Some(rate)), Arc::default(), TimeBase::now());
    // Let the bucket fill up for a while, then push as hard as possible.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < 6 * rate {
        t.consume(MIB).await;
        sent += MIB;
        let allowed = rate as f64 * start.elapsed().as_secs_f64() + burst as f64 + MIB as f64;
        assert!(
            (sent as f64) <= allowed,
            "{sent} bytes after {:?}",
            start.elapsed()
        );
    }
}

#[tokio::test(start_paused = true)]
async fn unthrottled_costs_no_time() {
    let mut t = SessionThrottle::new(fixed(None), Arc::default(), TimeBase::now());
    assert_eq!(transfer(&mut t, 100 * MIB, MIB).await, Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn a_window_edge_changes_the_rate_mid_transfer() {
    // 1 MiB/s until the edge two seconds in, 4 MiB/s after it.
    let base: jiff::Timestamp = "2026-11-25T21:59:58Z".parse().unwrap();
    let edge: jiff::Timestamp = "2026-11-25T22:00:00Z".parse().unwrap();
    let resolve: Resolver = Arc::new(move |at| {
        let (rate, next) = if at < edge {
            (MIB, Some(edge))
        } else {
            (4 * MIB, None)
        };
        (
            RateDecision {
                rate: Some(rate),
                level: None,
                next_change: next,
            },
            [None, None, None],
        )
    });
    let mut t = SessionThrottle::new(resolve, Arc::default(), TimeBase::starting_at(base));
    let start = Instant::now();
    let mut sent = 0;
    let mut at_edge = None;
    while sent < 6 * MIB {
        t.consume(64 << 10).await;
        sent += 64 << 10;
        if at_edge.is_none() && start.elapsed() >= Duration::from_secs(2) {
            at_edge = Some(sent);
        }
    }
    let took = start.elapsed();
    // 2 MiB in the first two seconds, then 4 MiB in one more.
    assert!(within(took, Duration::from_secs(3), 0.02), "{took:?}");
    let at_edge = at_edge.unwrap();
    assert!(
        at_edge.abs_diff(2 * MIB) <= 128 << 10,
        "{at_edge} bytes by the edge"
    );
    assert_eq!(t.rate(), Some(4 * MIB));
}

fn night_config(tz: &str) -> Arc<Config> {
    let src = format!(
        "[server]\ntimezone = \"{tz}\"\nthrottle = {{ enabled = true, rate = \"1 MiB/s\", hours = \"22:00-06:00\", weekends_unthrottled = true }}\n"
    );
    Arc::new(Config::from_str(&src, Path::new("/t.toml")).unwrap())
}

fn policy_resolver(cfg: Arc<Config>) -> Resolver {
    Arc::new(move |at| {
        (
            throttle::resolve(&cfg, CustomerId::DEFAULT, None, "nightly", at),
            throttle::caps(&cfg, CustomerId::DEFAULT, at),
        )
    })
}

#[tokio::test(start_paused = true)]
async fn the_night_window_holds_across_midnight() {
    // Wednesday 23:59:50 in Berlin: throttled on both sides of midnight.
    let cfg = night_config("Europe/Berlin");
    let start_at: jiff::Timestamp = "2026-11-25T22:59:50Z".parse().unwrap();
    let mut t = SessionThrottle::new(
        policy_resolver(cfg),
        Arc::default(),
        TimeBase::starting_at(start_at),
    );
    let took = transfer(&mut t, 20 * MIB, MIB).await;
    assert!(within(took, Duration::from_secs(20), 0.01), "{took:?}");
}

#[tokio::test(start_paused = true)]
async fn the_weekend_rule_switches_at_saturday_midnight() {
    // Friday 23:59:50 in Berlin: 10 s at 1 MiB/s, then the weekend lifts it.
    let cfg = night_config("Europe/Berlin");
    let start_at: jiff::Timestamp = "2026-11-27T22:59:50Z".parse().unwrap();
    let mut t = SessionThrottle::new(
        policy_resolver(cfg),
        Arc::default(),
        TimeBase::starting_at(start_at),
    );
    let took = transfer(&mut t, 20 * MIB, 64 << 10).await;
    assert!(within(took, Duration::from_secs(10), 0.01), "{took:?}");
    assert_eq!(t.rate(), None);
}

#[tokio::test(start_paused = true)]
async fn an_aggregate_is_shared_fairly() {
    // 10 MiB/s over 5 sessions that are otherwise unthrottled.
    let registry: Arc<Registry> = Arc::default();
    let node = Node::Customer(CustomerId(1));
    let cap = CapDecision {
        node,
        rate: Some(10 * MIB),
        next_change: None,
    };
    let resolve: Resolver = Arc::new(move |_| {
        (
            RateDecision {
                rate: None,
                level: None,
                next_change: None,
            },
            [None, None, Some(cap)],
        )
    });
    let mut tasks = Vec::new();
    for _ in 0..5 {
        let mut t = SessionThrottle::new(resolve.clone(), registry.clone(), TimeBase::now());
        tasks.push(tokio::spawn(async move {
            let start = Instant::now();
            let mut sent = 0u64;
            while start.elapsed() < Duration::from_secs(20) {
                t.consume(MIB).await;
                sent += MIB;
            }
            sent as f64 / start.elapsed().as_secs_f64()
        }));
    }
    assert_eq!(registry.live(), 1, "one shared bucket for the node");
    let mut rates = Vec::new();
    for t in tasks {
        rates.push(t.await.unwrap());
    }
    for r in &rates {
        let err = (r - 2.0 * MIB as f64).abs() / (2.0 * MIB as f64);
        assert!(err <= 0.02, "a session got {r:.0} B/s: {rates:?}");
    }
    let sum: f64 = rates.iter().sum();
    let jain = sum * sum / (rates.len() as f64 * rates.iter().map(|r| r * r).sum::<f64>());
    assert!(jain >= 0.99, "Jain's index {jain}");
    assert_eq!(registry.live(), 0, "the bucket goes with its last session");
}

#[tokio::test(start_paused = true)]
async fn a_live_change_takes_effect() {
    let rate = Arc::new(AtomicU64::new(MIB));
    let r = rate.clone();
    let resolve: Resolver = Arc::new(move |_| {
        (
            RateDecision {
                rate: Some(r.load(Ordering::SeqCst)),
                level: None,
                next_change: None,
            },
            [None, None, None],
        )
    });
    let registry: Arc<Registry> = Arc::default();
    let mut t = SessionThrottle::new(resolve, registry.clone(), TimeBase::now());
    let first = transfer(&mut t, 2 * MIB, 256 << 10).await;
    assert!(within(first, Duration::from_secs(2), 0.01), "{first:?}");
    rate.store(8 * MIB, Ordering::SeqCst);
    registry.config_changed();
    let second = transfer(&mut t, 8 * MIB, 256 << 10).await;
    assert!(within(second, Duration::from_secs(1), 0.02), "{second:?}");
}

/// A clustered cap runs at cap ÷ nodes until this node's share is
/// granted, then at the share; a waiter on a zero share moves to the new
/// bucket once a share is granted, instead of waiting out the old one.
#[tokio::test(start_paused = true)]
async fn a_clustered_cap_runs_at_its_share() {
    let reg = Registry::default();
    assert_eq!(reg.bucket(Node::Server, 30 * MIB).rate(), 30 * MIB);
    let reg = Arc::new(Registry::default());
    reg.cluster(3);
    let b = reg.bucket(Node::Server, 30 * MIB);
    assert_eq!(b.rate(), 10 * MIB, "the fallback: cap ÷ nodes");
    assert_eq!(reg.live_caps(), vec![(Node::Server, 30 * MIB)]);
    reg.set_share(Node::Server, Some(0));
    let paused = reg.bucket(Node::Server, 30 * MIB);
    assert_eq!(paused.rate(), 1, "a zero share pauses");
    assert!(
        b.retired.load(Ordering::SeqCst),
        "the old bucket is retired"
    );
    // A waiter on the paused bucket returns once it is retired.
    let waiter = {
        let paused = paused.clone();
        tokio::spawn(async move { paused.take_cells(1000).await })
    };
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!waiter.is_finished(), "nothing passes at a zero share");
    reg.set_share(Node::Server, Some(12 * MIB));
    let waited = waiter.await.unwrap();
    assert!(waited < Duration::from_secs(6), "moved on after {waited:?}");
    assert_eq!(reg.bucket(Node::Server, 30 * MIB).rate(), 12 * MIB);
    // Never above the configured cap, whatever is granted.
    reg.set_share(Node::Server, Some(40 * MIB));
    assert_eq!(reg.bucket(Node::Server, 30 * MIB).rate(), 30 * MIB);
    reg.set_share(Node::Server, None);
    let fallback = reg.bucket(Node::Server, 30 * MIB);
    assert_eq!(fallback.rate(), 10 * MIB);
    // A grant equal to the fallback keeps the bucket; one that is retired
    // is never handed out again.
    reg.set_share(Node::Server, Some(10 * MIB));
    assert!(!fallback.retired.load(Ordering::SeqCst));
    assert!(Arc::ptr_eq(&fallback, &reg.bucket(Node::Server, 30 * MIB)));
    fallback.retired.store(true, Ordering::SeqCst);
    let fresh = reg.bucket(Node::Server, 30 * MIB);
    assert!(!Arc::ptr_eq(&fallback, &fresh));
    assert!(!fresh.retired.load(Ordering::SeqCst));
}
