//! The web console's page work for a customer with 10,000 clients (issue
//! 15), as the console's page thread runs it: the status tree over every
//! client (what `tollgate status` builds) beside the tree over one page
//! of 500 (what the console builds), and the customer page's template for
//! one page of 500 clients beside all 10,000 (why the console pages).
//!
//! Run: `cargo bench --bench console`. Figures go in docs/benchmarks.md.

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use std::path::Path;
use tollgate::config::Config;
use tollgate::state::status::status_doc;
use tollgate::state::{ClientRow, StatusData};

const CLIENTS: usize = 10_000;

fn config() -> Config {
    let s = "[server]\nlisten = [\"127.0.0.1:1\"]\nstate = \"sqlite:///tmp/b.db\"\ntimezone = \"Europe/Berlin\"\n\
         [server.mcal]\npool = 100000\n\
         [server.throttle]\nrate = \"10 MiB/s\"\nhours = \"08:00-18:00\"\n\
         [[reseller]]\nname = \"r\"\n\
         [[customer]]\nname = \"Big\"\nreseller = \"r\"\nemail = \"it@big.example\"\nbackup_location = \"/srv/big\"\n\
         [[customer]]\nname = \"Small\"\nreseller = \"r\"\nemail = \"it@small.example\"\nbackup_location = \"/srv/small\"\n";
    Config::from_str(s, Path::new("/etc/tollgate/bench.toml")).unwrap()
}

fn data() -> StatusData {
    let clients = (0..CLIENTS)
        .map(|i| ClientRow {
            id: format!("BIG-{i:05}"),
            customer: "Big".into(),
            kind: "desktop".into(),
            registered: true,
            hostname: Some(format!("host-{i}")),
            last_seen: Some(1_800_000_000 + i as i64),
            used: 1 << 30,
            last_backup: Some(1_800_000_000),
            ..ClientRow::default()
        })
        .collect();
    StatusData {
        clients,
        ..StatusData::default()
    }
}

fn benches(c: &mut Criterion) {
    let cfg = config();
    let at = jiff::Timestamp::from_second(1_800_000_000).unwrap();
    let d = data();
    c.bench_function("status tree, 10,000 clients", |b| {
        b.iter(|| black_box(status_doc(&cfg, black_box(&d), at)))
    });
    let page = StatusData {
        clients: d.clients[..500].to_vec(),
        ..StatusData::default()
    };
    c.bench_function("status tree, one page of 500 clients", |b| {
        b.iter(|| black_box(status_doc(&cfg, black_box(&page), at)))
    });
    let env = tollgate::web::pages::templates();
    for (label, rows) in [("500 clients", &page), ("10,000 clients", &d)] {
        let doc = status_doc(&cfg, rows, at);
        let big = doc
            .resellers
            .into_iter()
            .next()
            .unwrap()
            .customers
            .into_iter()
            .next()
            .unwrap();
        let ctx = minijinja::context! {
            who => minijinja::context! { user => "admin", kind => "admin", csrf => "x" },
            base => "/customers/Big",
            active => true,
            can_send => true,
            results => std::collections::HashMap::<String, String>::new(),
            paging => minijinja::context! { page => 1, pages => 20, first => 1, last => 500, total => 10_000 },
            c => big,
        };
        let html =
            tollgate::web::pages::render_page(&env, &cfg, "customer.html", ctx.clone()).unwrap();
        eprintln!("customer page, {label}: {} bytes", html.len());
        c.bench_function(&format!("customer page template, {label}"), |b| {
            b.iter(|| {
                black_box(
                    tollgate::web::pages::render_page(&env, &cfg, "customer.html", ctx.clone())
                        .unwrap(),
                )
            })
        });
    }
}

criterion_group! {
    name = console;
    config = Criterion::default().sample_size(10).measurement_time(std::time::Duration::from_secs(5));
    targets = benches
}
criterion_main!(console);
