//! State-store throughput on a real SQLite file (WAL, synchronous=FULL):
//! registrations, reservation cycles and file commits per second at 1, 16
//! and 256 concurrent callers, each caller waiting for its operation to be durable
//! as the daemon's sessions do.
//!
//! Run: `cargo bench --bench state`. Figures go in docs/benchmarks.md.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tollgate::config::{Config, CustomerId, Kind};
use tollgate::state::{PendingCommit, State};

/// Concurrent callers measured.
const CALLERS: [u64; 3] = [1, 16, 256];

fn setup(rt: &tokio::runtime::Runtime, dir: &std::path::Path) -> (Arc<Config>, State) {
    let src = format!(
        "[server]\ntimezone = \"UTC\"\nstate = \"sqlite://{}/state.db\"\ntotal_space = \"1000 TiB\"\n[default_customer]\nspace = \"1000 TiB\"\nauto_add_clients = true\n",
        dir.display()
    );
    let cfg = Arc::new(Config::from_str(&src, &dir.join("t.toml")).unwrap());
    let st = rt.block_on(async {
        let st = State::open(&cfg).await.unwrap();
        for i in 0..CALLERS[2] {
            st.register_client(
                &cfg,
                &format!("C{i}"),
                CustomerId::DEFAULT,
                Kind::Desktop,
                None,
                jiff::Timestamp::now(),
            )
            .await
            .unwrap()
            .unwrap();
        }
        st
    });
    (cfg, st)
}

/// Runs `n` operations spread over `callers` tasks; `op(k)` is caller
/// `k`'s next operation.
async fn spread<F, Fut>(n: u64, callers: u64, op: F) -> Duration
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..callers)
        .map(|k| {
            let op = op.clone();
            let share = n / callers + u64::from(k < n % callers);
            tokio::spawn(async move {
                for _ in 0..share {
                    op(k).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    t0.elapsed()
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::TempDir::new().unwrap();
    let (cfg, st) = setup(&rt, dir.path());
    let next = Arc::new(AtomicU64::new(0));

    let mut g = c.benchmark_group("state");
    g.throughput(Throughput::Elements(1))
        .measurement_time(Duration::from_secs(8))
        .sample_size(10);
    for callers in CALLERS {
        g.bench_with_input(
            BenchmarkId::new("register_client", callers),
            &callers,
            |b, &callers| {
                b.iter_custom(|n| {
                    let (st, cfg, next) = (st.clone(), cfg.clone(), next.clone());
                    rt.block_on(spread(n, callers, move |_| {
                        let (st, cfg) = (st.clone(), cfg.clone());
                        let id = format!("N{}", next.fetch_add(1, Ordering::Relaxed));
                        async move {
                            st.register_client(
                                &cfg,
                                &id,
                                CustomerId::DEFAULT,
                                Kind::Laptop,
                                None,
                                jiff::Timestamp::now(),
                            )
                            .await
                            .unwrap()
                            .unwrap();
                        }
                    }))
                })
            },
        );
        g.bench_with_input(
            BenchmarkId::new("reserve_and_release", callers),
            &callers,
            |b, &callers| {
                b.iter_custom(|n| {
                    let (st, cfg) = (st.clone(), cfg.clone());
                    rt.block_on(spread(n, callers, move |k| {
                        let (st, cfg) = (st.clone(), cfg.clone());
                        async move {
                            let id = st
                                .reserve_space(&cfg, &format!("C{k}"), 4096, jiff::Timestamp::now())
                                .await
                                .unwrap()
                                .unwrap();
                            st.release_reservation(id).await.unwrap();
                        }
                    }))
                })
            },
        );
        // An upload's END on the state side: reserve, the pending row,
        // the index and usage (`storage::commit` without its files).
        g.bench_with_input(
            BenchmarkId::new("commit_file", callers),
            &callers,
            |b, &callers| {
                b.iter_custom(|n| {
                    let (st, cfg, next) = (st.clone(), cfg.clone(), next.clone());
                    rt.block_on(spread(n, callers, move |k| {
                        let (st, cfg) = (st.clone(), cfg.clone());
                        let f = next.fetch_add(1, Ordering::Relaxed);
                        async move {
                            let client = format!("C{k}");
                            let now = jiff::Timestamp::now();
                            let r = st
                                .reserve_space(&cfg, &client, 4096, now)
                                .await
                                .unwrap()
                                .unwrap();
                            let id = st
                                .begin_commit(&PendingCommit {
                                    client,
                                    path: format!("f{}", f % 64),
                                    temp_path: format!("/nonexistent/t{f}").into(),
                                    final_path: "/nonexistent/f".into(),
                                    size: 4096,
                                    sha256: "0".repeat(64),
                                    modified: now,
                                    reservation: Some(r),
                                    ..Default::default()
                                })
                                .await
                                .unwrap();
                            st.commit_file(id).await.unwrap();
                        }
                    }))
                })
            },
        );
    }
    g.finish();
}

criterion_group!(state, benches);
criterion_main!(state);
