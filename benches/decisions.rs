//! Config load and decision speed at scale: a synthetic config with 1,000
//! resellers, 10,000 customers and 100,000 declared clients.
//!
//! Run: `cargo bench --bench decisions`. Figures go in docs/benchmarks.md.

use criterion::{Criterion, criterion_group, criterion_main};
use std::fmt::Write;
use std::hint::black_box;
use std::path::Path;
use std::time::Duration;
use tollgate::config::Config;
use tollgate::policy::admission::{self, ClientRecord, Hello, LevelUsage, McalState, Snapshot};
use tollgate::policy::{space::Usage, throttle};

const RESELLERS: usize = 1_000;
const CUSTOMERS_PER_RESELLER: usize = 10;
const CLIENTS_PER_CUSTOMER: usize = 10;

/// The synthetic config as TOML text.
fn synthetic() -> String {
    let mut s = String::with_capacity(16 << 20);
    s += "[server]\ntimezone = \"Europe/Berlin\"\ntotal_space = \"100000 TiB\"\n";
    s += "throttle = { enabled = true, rate = \"100 Mbit/s\" }\n";
    s += "aggregate = { rate = \"10 Gbit/s\", hours = \"08:00-18:00\", weekends_unthrottled = true }\n";
    s += "[server.mcal]\npool = 1000000\n";
    s += "[default_customer]\nauto_add_clients = true\nbackup_location = \"/srv/d\"\nspace = \"1 TiB\"\n";
    for r in 0..RESELLERS {
        writeln!(
            s,
            "[[reseller]]\nname = \"r{r}\"\nemail = \"r{r}@example.com\"\nspace = \"50 TiB\"\nmcal_limit = 5000\naggregate = {{ rate = \"1 Gbit/s\" }}"
        )
        .unwrap();
        for c in 0..CUSTOMERS_PER_RESELLER {
            let n = r * CUSTOMERS_PER_RESELLER + c;
            writeln!(
                s,
                "[[customer]]\nname = \"c{n}\"\nreseller = \"r{r}\"\nemail = \"it@c{n}.example\"\nbackup_location = \"/srv/c{n}\"\nspace = \"2 TiB\"\nmcal_limit = 100\nmax_clients = 50\nauto_add_clients = true\nthrottle = {{ enabled = true, rate = \"30 MiB/s\", hours = \"22:00-06:00\", weekends_unthrottled = true }}"
            )
            .unwrap();
        }
    }
    for n in 0..RESELLERS * CUSTOMERS_PER_RESELLER {
        for k in 0..CLIENTS_PER_CUSTOMER {
            writeln!(
                s,
                "[[client]]\nid = \"C{n}-PC{k}\"\ncustomer = \"c{n}\"\nkind = \"desktop\"\nspace = \"100 GiB\"\nschedules = {{ nightly = {{ throttle = {{ enabled = true, rate = \"20 MiB/s\", hours = \"20:00-06:00\" }} }} }}"
            )
            .unwrap();
        }
    }
    s
}

fn benches(c: &mut Criterion) {
    let src = synthetic();
    let path = Path::new("/etc/tollgate/synthetic.toml");
    eprintln!(
        "synthetic config: {:.1} MiB of TOML",
        src.len() as f64 / (1 << 20) as f64
    );

    let mut g = c.benchmark_group("config");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    g.bench_function(
        "load_validate_1k_resellers_10k_customers_100k_clients",
        |b| b.iter(|| Config::from_str(black_box(&src), path).expect("valid")),
    );
    g.finish();

    let cfg = Config::from_str(&src, path).expect("valid");
    assert_eq!(cfg.clients.len(), 100_000);
    let customer = cfg.customer_by_name("c5555").unwrap();
    let client = cfg.declared_client("C5555-PC3");
    let at: jiff::Timestamp = "2026-11-25T21:30:00Z".parse().unwrap();

    let mut g = c.benchmark_group("decision");
    g.bench_function("throttle_resolve_schedule_window", |b| {
        b.iter(|| {
            throttle::resolve(
                &cfg,
                black_box(customer),
                black_box(client),
                "nightly",
                black_box(at),
            )
        })
    });
    g.bench_function("throttle_resolve_inherited_customer_window", |b| {
        b.iter(|| {
            throttle::resolve(
                &cfg,
                black_box(customer),
                black_box(client),
                "manual",
                black_box(at),
            )
        })
    });
    g.bench_function("aggregate_caps", |b| {
        b.iter(|| throttle::caps(&cfg, black_box(customer), black_box(at)))
    });

    let hello = Hello {
        protocol: 1,
        client_id: "C5555-PC3".into(),
        secret: Some("dGhpcyBpcyBhIDMyIGJ5dGUgc2VjcmV0IGZvciB0ZXN0".into()),
        schedule: "nightly".into(),
        ..Hello::default()
    };
    let snap = Snapshot {
        client: Some(ClientRecord {
            id: hello.client_id.clone(),
            customer,
            kind: tollgate::config::Kind::Desktop,
            secret_sha256: Some(admission::secret_digest(hello.secret.as_deref().unwrap())),
            ..ClientRecord::default()
        }),
        customer_clients: 10,
        mcal: McalState {
            client_debited_this_month: false,
            customer_total: 50,
            reseller_total: 400,
            global_total: 90_000,
        },
        usage: LevelUsage {
            client: Usage {
                used: 10 << 30,
                reserved: 0,
            },
            customer: Usage {
                used: 100 << 30,
                reserved: 1 << 30,
            },
            reseller: Usage {
                used: 1 << 40,
                reserved: 0,
            },
            server: Usage {
                used: 100 << 40,
                reserved: 0,
            },
        },
        ..Snapshot::default()
    };
    assert!(admission::admit(&cfg, &hello, &snap, at).is_ok());
    g.bench_function("admission_registered_client_backup", |b| {
        b.iter(|| admission::admit(&cfg, black_box(&hello), black_box(&snap), black_box(at)))
    });
    let new = Hello {
        client_id: "NEW-PC".into(),
        customer: Some("c5555".into()),
        secret: None,
        ..hello.clone()
    };
    let fresh = Snapshot {
        client: None,
        ..snap.clone()
    };
    assert!(admission::admit(&cfg, &new, &fresh, at).is_ok());
    g.bench_function("admission_auto_add", |b| {
        b.iter(|| admission::admit(&cfg, black_box(&new), black_box(&fresh), black_box(at)))
    });
    g.finish();
}

criterion_group!(decisions, benches);
criterion_main!(decisions);
