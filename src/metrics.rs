//! Prometheus metrics and the health check, served on `metrics_listen`
//! (CONFIG.md `[server]`). Counters are recorded where things happen, via
//! the `metrics` facade. The gauges that come from state and config (space,
//! MCAL pool, outbox) are written fresh at each scrape, so a reseller or
//! customer removed from the config leaves no stale series behind. The
//! standard `process_*` series come from `metrics-process`. Labels are
//! bounded: result codes, throttle levels, reload results and the names of
//! configured resellers and customers — never a client.

use crate::config::Config;
use crate::policy::space::{self, Node, Usage};
use crate::server::Context;
use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::{Arc, OnceLock};
use tokio::net::TcpListener;
use tracing::warn;

/// TCP connections accepted.
pub const CONNECTIONS: &str = "tollgate_connections_total";
/// Admission decisions, by `code` (`welcome` or a REJECT code).
pub const ADMISSIONS: &str = "tollgate_admissions_total";
/// Sessions past WELCOME and not yet ended.
pub const ACTIVE_SESSIONS: &str = "tollgate_active_sessions";
/// Upload payload bytes received.
pub const BYTES_IN: &str = "tollgate_bytes_received_total";
/// Restore payload bytes sent.
pub const BYTES_OUT: &str = "tollgate_bytes_sent_total";
/// Seconds backups waited on throttles, by `level`.
pub const THROTTLE_WAIT: &str = "tollgate_throttle_wait_seconds_total";
/// Failed reads, writes, syncs and renames of stored files.
pub const STORAGE_ERRORS: &str = "tollgate_storage_errors_total";
/// Config reloads, by `result` (`ok`, `failed`).
pub const RELOADS: &str = "tollgate_reloads_total";
/// 1 while the file on disk was refused at the last reload attempt.
pub const RELOAD_FAILED: &str = "tollgate_reload_failed";
/// MCALs left in the global pool (absent when MCALs are not enforced).
pub const MCAL_POOL_AVAILABLE: &str = "tollgate_mcal_pool_available";
/// Messages in the outbox not yet delivered.
pub const MAIL_PENDING: &str = "tollgate_mail_outbox_pending";
/// Bytes committed, by `level` (`server`, `reseller`, `customer`) and the
/// node's name: `{level="server"}` is every customer together.
pub const SPACE_USED: &str = "tollgate_space_used_bytes";
/// Bytes allotted, labelled as [`SPACE_USED`]; absent when unlimited.
pub const SPACE_ALLOTTED: &str = "tollgate_space_allotted_bytes";
/// Connections closed right after accept, before TLS, by `reason`
/// (`penalized`, `per_source`, `overflow`).
pub const CONNECTIONS_DROPPED: &str = "tollgate_connections_dropped_total";
/// Sources blocked by a penalty now.
pub const PENALIZED_SOURCES: &str = "tollgate_penalized_sources";
/// Penalty periods started, by the `reason` that tipped them.
pub const PENALTIES_STARTED: &str = "tollgate_penalties_started_total";
/// Refusals that could not be recorded (too many waiting to be written).
pub const REFUSALS_UNRECORDED: &str = "tollgate_refusals_unrecorded_total";
/// Reservations whose release failed (held until the next start).
pub const RESERVATIONS_LEAKED: &str = "tollgate_reservations_leaked_total";
/// Rows deleted by retention pruning.
pub const PRUNED_ROWS: &str = "tollgate_pruned_rows_total";
/// Uploads holding a reservation now (the in-memory ledger).
pub const UPLOADS_IN_FLIGHT: &str = "tollgate_uploads_in_flight";
/// Gauge: upload temporary files open now (the rest are parked, closed
/// between writes, past the open-file budget).
pub const OPEN_TEMP_FILES: &str = "tollgate_open_temp_files";
/// Bytes reserved by uploads in flight now.
pub const SPACE_RESERVED: &str = "tollgate_reserved_bytes";
/// Heartbeats of this node that did not reach the state database
/// (PostgreSQL).
pub const CLUSTER_HEARTBEAT_FAILED: &str = "tollgate_cluster_heartbeat_failed_total";

/// Histogram: seconds from an upload's END to its STORED: the file's
/// fsync, its pending row, the rename and the index row.
pub const COMMIT_SECONDS: &str = "tollgate_upload_commit_seconds";
/// Buckets of [`COMMIT_SECONDS`] (buckets, not a summary: they add up
/// across the nodes of a cluster). A commit takes milliseconds on an idle
/// disk and can take seconds behind thousands of uploads ending together.
const COMMIT_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
static PROCESS: OnceLock<metrics_process::Collector> = OnceLock::new();

/// Installs the process-wide recorder (once; later calls are no-ops).
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = || {
                PrometheusBuilder::new()
                    .set_buckets_for_metric(Matcher::Full(COMMIT_SECONDS.into()), COMMIT_BUCKETS)
                    .expect("the commit buckets are not empty")
            };
            let h = builder()
                .install_recorder()
                .unwrap_or_else(|_| builder().build_recorder().handle());
            describe();
            zero();
            PROCESS
                .get_or_init(metrics_process::Collector::default)
                .describe();
            h
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(CONNECTIONS, "TCP connections accepted");
    describe_counter!(ADMISSIONS, "Admission decisions by result code");
    describe_gauge!(ACTIVE_SESSIONS, "Sessions admitted and not yet ended");
    describe_counter!(BYTES_IN, "Upload payload bytes received");
    describe_counter!(BYTES_OUT, "Restore payload bytes sent");
    describe_counter!(THROTTLE_WAIT, "Seconds backups waited on throttles");
    describe_counter!(STORAGE_ERRORS, "Storage I/O failures");
    describe_counter!(RELOADS, "Configuration reloads by result");
    describe_gauge!(RELOAD_FAILED, "1 if the last reload attempt was refused");
    describe_counter!(
        CONNECTIONS_DROPPED,
        "Connections closed right after accept, before TLS, by reason"
    );
    describe_gauge!(PENALIZED_SOURCES, "Sources blocked by a penalty now");
    describe_counter!(PENALTIES_STARTED, "Penalty periods started, by reason");
    describe_counter!(REFUSALS_UNRECORDED, "Refusals that could not be recorded");
    describe_counter!(RESERVATIONS_LEAKED, "Reservations whose release failed");
    describe_counter!(PRUNED_ROWS, "Rows deleted by retention pruning");
    describe_gauge!(UPLOADS_IN_FLIGHT, "Uploads holding a space reservation now");
    describe_gauge!(
        OPEN_TEMP_FILES,
        "Upload temporary files open now (past the open-file budget they are closed between writes)"
    );
    describe_gauge!(SPACE_RESERVED, "Bytes reserved by uploads in flight now");
    describe_histogram!(
        COMMIT_SECONDS,
        metrics::Unit::Seconds,
        "Seconds from an upload's END to its STORED"
    );
    describe_counter!(
        CLUSTER_HEARTBEAT_FAILED,
        "Heartbeats of this node that did not reach the PostgreSQL state"
    );
}

/// Makes the series exist from the start, so a fresh daemon's scrape
/// shows zeros rather than nothing.
fn zero() {
    for m in [
        CONNECTIONS,
        BYTES_IN,
        BYTES_OUT,
        STORAGE_ERRORS,
        REFUSALS_UNRECORDED,
        RESERVATIONS_LEAKED,
        PRUNED_ROWS,
    ] {
        metrics::counter!(m).increment(0);
    }
    for r in ["penalized", "per_source", "overflow"] {
        metrics::counter!(CONNECTIONS_DROPPED, "reason" => r).increment(0);
    }
    metrics::gauge!(PENALIZED_SOURCES).set(0.0);
    metrics::counter!(ADMISSIONS, "code" => "welcome").increment(0);
    for r in ["ok", "failed"] {
        metrics::counter!(RELOADS, "result" => r).increment(0);
    }
    metrics::gauge!(RELOAD_FAILED).set(0.0);
    metrics::gauge!(ACTIVE_SESSIONS).set(0.0);
    metrics::gauge!(UPLOADS_IN_FLIGHT).set(0.0);
    // Counted from start by the files themselves: only made visible here.
    metrics::gauge!(OPEN_TEMP_FILES).increment(0.0);
    metrics::gauge!(SPACE_RESERVED).set(0.0);
    throttle_waits(&crate::throttle::Waits::default());
}

/// Counts one admission decision.
pub fn admission(code: &'static str) {
    metrics::counter!(ADMISSIONS, "code" => code).increment(1);
}

/// Counts the throttle waits of a finished session.
pub fn throttle_waits(w: &crate::throttle::Waits) {
    for (i, (level, d)) in [
        ("session", w.session),
        ("customer", w.customer),
        ("reseller", w.reseller),
        ("server", w.server),
    ]
    .into_iter()
    .enumerate()
    {
        add_seconds(i, level, d);
    }
}

/// `metrics` counters are integral: whole seconds are counted and the
/// sub-second rest is carried per level, so nothing is lost over many
/// sessions.
fn add_seconds(i: usize, level: &'static str, d: std::time::Duration) {
    use std::sync::Mutex;
    static REST: Mutex<[u128; 4]> = Mutex::new([0; 4]);
    let mut rest = REST.lock().unwrap_or_else(|p| p.into_inner());
    rest[i] += d.as_micros();
    let whole = rest[i] / 1_000_000;
    rest[i] %= 1_000_000;
    // Touch the series so every level shows up, even at 0.
    metrics::counter!(THROTTLE_WAIT, "level" => level).increment(whole as u64);
}

/// Appends one gauge family in the text format (version 0.0.4).
struct Family<'a> {
    out: &'a mut String,
}

impl<'a> Family<'a> {
    fn new(out: &'a mut String, name: &str, help: &str) -> Self {
        use std::fmt::Write;
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        Family { out }
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], v: u64) {
        use std::fmt::Write;
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape(val));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {v}");
    }
}

/// Label values are names from the config file: escape what the format
/// reserves.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The gauges that come from state and config, as of now.
async fn state_text(ctx: &Context) -> String {
    let cfg: Arc<Config> = ctx.cfg.load_full();
    let mut out = String::new();
    if let Ok(n) = ctx.state.mail_pending().await {
        Family::new(&mut out, MAIL_PENDING, "Messages waiting in the outbox").sample(
            MAIL_PENDING,
            &[],
            n.max(0) as u64,
        );
    }
    let d = match ctx.state.totals(&cfg, crate::clock::now()).await {
        Ok(d) => d,
        Err(e) => {
            warn!(error = %e, "metrics: reading usage failed");
            return out;
        }
    };
    if let Some(m) = &cfg.server.mcal {
        let p = space::pool_snapshot(m, d.global_debits);
        Family::new(
            &mut out,
            MCAL_POOL_AVAILABLE,
            "MCALs left in the global pool",
        )
        .sample(MCAL_POOL_AVAILABLE, &[], p.available);
    }
    let customer_used: Vec<u64> = cfg
        .customers
        .iter()
        .map(|c| {
            d.customers
                .get(&c.name.to_lowercase())
                .copied()
                .unwrap_or(Usage::default())
                .used
        })
        .collect();
    let reseller_used = |r: usize| -> u64 {
        cfg.customers
            .iter()
            .zip(&customer_used)
            .filter(|(c, _)| c.reseller.is_some_and(|x| x.0 as usize == r))
            .map(|(_, u)| *u)
            .sum()
    };
    // One meaning per label set (issue 12 item 7): `level` says which node
    // of the tree the figure is for.
    let mut f = Family::new(
        &mut out,
        SPACE_USED,
        "Bytes committed, by level of the allotment tree",
    );
    f.sample(
        SPACE_USED,
        &[("level", "server")],
        customer_used.iter().sum(),
    );
    for (i, r) in cfg.resellers.iter().enumerate() {
        f.sample(
            SPACE_USED,
            &[("level", "reseller"), ("reseller", &r.name)],
            reseller_used(i),
        );
    }
    for (c, u) in cfg.customers.iter().zip(&customer_used) {
        f.sample(
            SPACE_USED,
            &[("level", "customer"), ("customer", &c.name)],
            *u,
        );
    }
    let mut f = Family::new(
        &mut out,
        SPACE_ALLOTTED,
        "Bytes allotted, by level of the allotment tree (absent when unlimited)",
    );
    if let Some(a) = space::allotted(&cfg, Node::Server) {
        f.sample(SPACE_ALLOTTED, &[("level", "server")], a);
    }
    for r in &cfg.resellers {
        if let Some(a) = r.space {
            f.sample(
                SPACE_ALLOTTED,
                &[("level", "reseller"), ("reseller", &r.name)],
                a,
            );
        }
    }
    for c in &cfg.customers {
        if let Some(a) = c.space {
            f.sample(
                SPACE_ALLOTTED,
                &[("level", "customer"), ("customer", &c.name)],
                a,
            );
        }
    }
    out
}

/// The whole exposition: the recorder's series, the process's, and the
/// state gauges.
async fn render(ctx: &Context, handle: &PrometheusHandle) -> String {
    if let Some(p) = PROCESS.get() {
        p.collect();
    }
    let mut text = handle.render();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&state_text(ctx).await);
    text
}

/// Serves `/metrics` and `/healthz` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, ctx: Arc<Context>, handle: PrometheusHandle) {
    let app = Router::new()
        .route(
            "/metrics",
            get({
                let ctx = ctx.clone();
                move || async move {
                    (
                        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                        render(&ctx, &handle).await,
                    )
                }
            }),
        )
        .route(
            "/healthz",
            get(move || async move { health(&ctx).await.into_response() }),
        );
    if let Err(e) = axum::serve(listener, app).await {
        warn!(error = %e, "the metrics listener failed");
    }
}

/// Healthy = serving and the state database answers.
async fn health(ctx: &Context) -> (StatusCode, &'static str) {
    if *ctx.phase.borrow() != crate::server::Phase::Running {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
    }
    match ctx.state.ping().await {
        Ok(()) => (StatusCode::OK, "ok\n"),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "state database unavailable\n",
        ),
    }
}
