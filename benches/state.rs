//! State-store throughput on a real SQLite file: reservations and
//! registrations per second, each one a durable BEGIN IMMEDIATE transaction
//! (WAL, synchronous=FULL), from one task and from 16 concurrent tasks.
//!
//! Run: `cargo bench --bench state`. Figures go in docs/benchmarks.md.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tollgate::config::{Config, CustomerId, Kind};
use tollgate::state::State;

fn setup(rt: &tokio::runtime::Runtime, dir: &std::path::Path) -> (Arc<Config>, State) {
    let src = format!(
        "[server]\ntimezone = \"UTC\"\nstate = \"sqlite://{}/state.db\"\ntotal_space = \"1000 TiB\"\n[default_customer]\nspace = \"1000 TiB\"\nauto_add_clients = true\n",
        dir.display()
    );
    let cfg = Arc::new(Config::from_str(&src, &dir.join("t.toml")).unwrap());
    let st = rt.block_on(async {
        let st = State::open(&cfg).await.unwrap();
        for i in 0..16 {
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
        .measurement_time(Duration::from_secs(10))
        .sample_size(20);
    g.bench_function("reserve_and_release_1_task", |b| {
        b.iter_custom(|n| {
            rt.block_on(async {
                let t0 = Instant::now();
                for _ in 0..n {
                    st.reserve_space(&cfg, "C0", 4096, jiff::Timestamp::now())
                        .await
                        .unwrap()
                        .unwrap();
                }
                t0.elapsed()
            })
        })
    });
    g.bench_function("reserve_and_release_16_tasks", |b| {
        b.iter_custom(|n| {
            rt.block_on(async {
                let t0 = Instant::now();
                let tasks: Vec<_> = (0..16u64)
                    .map(|k| {
                        let (st, cfg) = (st.clone(), cfg.clone());
                        let share = n / 16 + u64::from(k < n % 16);
                        tokio::spawn(async move {
                            for _ in 0..share {
                                st.reserve_space(
                                    &cfg,
                                    &format!("C{k}"),
                                    4096,
                                    jiff::Timestamp::now(),
                                )
                                .await
                                .unwrap()
                                .unwrap();
                            }
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.unwrap();
                }
                t0.elapsed()
            })
        })
    });
    g.bench_function("register_client_16_tasks", |b| {
        b.iter_custom(|n| {
            rt.block_on(async {
                let t0 = Instant::now();
                let tasks: Vec<_> = (0..16u64)
                    .map(|k| {
                        let (st, cfg, next) = (st.clone(), cfg.clone(), next.clone());
                        let share = n / 16 + u64::from(k < n % 16);
                        tokio::spawn(async move {
                            for _ in 0..share {
                                let id = format!("N{}", next.fetch_add(1, Ordering::Relaxed));
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
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.unwrap();
                }
                t0.elapsed()
            })
        })
    });
    g.finish();
}

criterion_group!(state, benches);
criterion_main!(state);
