//! `tollgate serve`: start-up checks, binding, and shutdown on SIGTERM or
//! SIGINT. Start-up order: load the config, open and migrate the state,
//! record declared clients, reconcile interrupted commits, sweep temporary
//! files, prepare backup locations, load or make the TLS pair, bind, serve.

use crate::config::{Config, CustomerId};
use crate::server::{self, Context, Phase};
use crate::state::State;
use crate::{storage, tls};
use anyhow::{Context as _, bail};
use sd_notify::NotifyState;
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tracing::{info, warn};

/// Sets up logging to stderr; `RUST_LOG` overrides the level. Under
/// systemd (JOURNAL_STREAM set) the journal adds its own timestamps.
pub fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false);
    let _ = if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.without_time().try_init()
    } else {
        builder.try_init()
    };
}

/// Creates every customer's backup location (mode 0700) and proves it is
/// writable (CONFIG.md: else the daemon refuses to start).
fn prepare_locations(cfg: &Config) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    for (i, c) in cfg.customers.iter().enumerate() {
        let dir = &c.backup_location;
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| {
                    format!(
                        "customer {:?}: cannot create backup_location {}",
                        c.name,
                        dir.display()
                    )
                })?;
        }
        let tmp = storage::temp_dir(cfg, CustomerId(i as u32));
        std::fs::create_dir_all(&tmp)
            .with_context(|| format!("customer {:?}: cannot create {}", c.name, tmp.display()))?;
        let probe = tmp.join(".write-probe");
        std::fs::write(&probe, b"").with_context(|| {
            format!(
                "customer {:?}: backup_location {} is not writable",
                c.name,
                dir.display()
            )
        })?;
        let _ = std::fs::remove_file(probe);
    }
    Ok(())
}

/// Tells systemd about a state change; failures are logged, never fatal.
fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        warn!(error = %e, "sd_notify failed");
    }
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn serve(cfg: Config) -> anyhow::Result<ExitCode> {
    init_tracing();
    let cfg = Arc::new(cfg);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(run(cfg))
}

async fn run(cfg: Arc<Config>) -> anyhow::Result<ExitCode> {
    let state = State::open(&cfg)
        .await
        .context("opening the state database")?;
    for (id, from, to) in state
        .sync_declared(&cfg)
        .await
        .context("recording the declared clients")?
    {
        let (Some(f), Some(t)) = (cfg.customer_by_name(&from), cfg.customer_by_name(&to)) else {
            continue;
        };
        storage::move_dir(
            &storage::client_dir(&cfg, f, &id),
            &storage::client_dir(&cfg, t, &id),
        )
        .with_context(|| format!("moving the files of declared client {id} from {from} to {to}"))?;
        info!(client = %id, %from, %to, "declared client moved by the config");
    }
    let rec = state
        .reconcile()
        .await
        .context("reconciling interrupted commits")?;
    prepare_locations(&cfg)?;
    let swept = storage::sweep_temp(&cfg).context("removing temporary files")?;
    info!(
        rolled_back = rec.rolled_back,
        rolled_forward = rec.rolled_forward,
        reservations_dropped = rec.reservations_dropped,
        temp_files_removed = swept,
        "state reconciled"
    );

    let t = tls::server_tls(&cfg).context("setting up TLS")?;
    if t.self_signed {
        info!(fingerprint = %t.fingerprint, dir = %cfg.server.state_dir.display(), "using the self-signed certificate; clients pin it with --pin");
    }
    let mut listeners = Vec::new();
    for addr in &cfg.server.listen {
        listeners.push(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {addr}"))?,
        );
    }
    if listeners.is_empty() {
        bail!("no listen address");
    }
    // One machine-readable line each, for people and for tests that bind port 0.
    let mut out = std::io::stdout().lock();
    writeln!(out, "tollgate: certificate {}", t.fingerprint)?;
    for l in &listeners {
        let a = l.local_addr()?;
        info!(addr = %a, "listening");
        writeln!(out, "tollgate: listening on {a}")?;
    }
    out.flush()?;
    drop(out);

    let (phase_tx, phase_rx) = watch::channel(Phase::Running);
    let ctx = Arc::new(Context::new(cfg.clone(), state.clone(), t.config, phase_rx));
    let addrs: Vec<String> = listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .map(|a| a.to_string())
        .collect();
    let mut server = tokio::spawn(server::run(listeners, ctx.clone()));

    // systemd (sd_notify(3)): ready once listening and reconciled; the
    // watchdog is fed from a task on this runtime, so a stalled runtime stops
    // feeding it; STATUS= shows the sessions. No-ops outside systemd.
    notify(&[
        NotifyState::Ready,
        NotifyState::Status(&format!("serving on {}; 0 sessions", addrs.join(", "))),
    ]);
    if let Some(interval) = sd_notify::watchdog_enabled() {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval / 2);
            loop {
                tick.tick().await;
                notify(&[NotifyState::Watchdog]);
            }
        });
    }
    let status_ctx = ctx.clone();
    tokio::spawn(async move {
        let max = status_ctx.cfg.server.max_connections as usize;
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tick.tick().await;
            let sessions = max.saturating_sub(status_ctx.limit.available_permits());
            notify(&[NotifyState::Status(&format!(
                "serving on {}; {sessions} sessions",
                addrs.join(", ")
            ))]);
        }
    });

    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    // Live reload is not built yet; SIGHUP must not kill the daemon meanwhile.
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = int.recv() => { info!("SIGINT: shutting down"); break; }
            _ = hup.recv() => warn!("SIGHUP: live reload is not implemented yet; restart the daemon to apply configuration changes"),
            r = &mut server => {
                warn!("the listener ended on its own: {r:?}");
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    notify(&[NotifyState::Stopping, NotifyState::Status("shutting down")]);
    let _ = phase_tx.send(Phase::Draining);
    let grace = cfg.server.shutdown_grace;
    if tokio::time::timeout(grace, &mut server).await.is_err() {
        info!(?grace, "grace period over; ending the remaining sessions");
        let _ = phase_tx.send(Phase::Forced);
        let _ = server.await;
    }
    state.close().await;
    info!("stopped");
    Ok(ExitCode::SUCCESS)
}
