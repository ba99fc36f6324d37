//! `tollgate serve`: start-up checks, binding (or systemd's sockets),
//! metrics, live reload on SIGHUP or a changed file, and shutdown on SIGTERM
//! or SIGINT. Start-up order: load the config, open and migrate the state,
//! record declared clients, reconcile interrupted commits, sweep temporary
//! files, prepare backup locations, load or make the TLS pair, bind, serve.

use crate::config::Config;
use crate::server::{self, Context, Phase, reload};
use crate::state::State;
use crate::{storage, tls};
use anyhow::{Context as _, bail};
use sd_notify::NotifyState;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

/// The log line format (`serve --log-format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The zone log times are written in: `server.timezone` once the config
/// is loaded, the system's before.
static LOG_ZONE: std::sync::OnceLock<jiff::tz::TimeZone> = std::sync::OnceLock::new();

/// Log times as RFC 3339 with the offset of the server's zone, to the
/// microsecond (`2026-11-30T10:04:54.282740+01:00`): a line read beside a
/// report or a client's log says which wall clock it means (issue 12).
/// The real clock, never `TOLLGATE_FAKE_NOW`'s shifted one.
struct ZonedTime;

impl tracing_subscriber::fmt::time::FormatTime for ZonedTime {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        let tz = LOG_ZONE
            .get()
            .cloned()
            .unwrap_or_else(jiff::tz::TimeZone::system);
        let now = jiff::Timestamp::now().to_zoned_datetime(tz);
        write!(w, "{}", now.strftime("%Y-%m-%dT%H:%M:%S%.6f%:z"))
    }
}

/// Sets up logging to stderr; `RUST_LOG` overrides the level. Under
/// systemd (JOURNAL_STREAM set) text lines leave the time to the journal;
/// JSON objects always carry theirs, for the log shippers that read them.
pub fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_timer(ZonedTime);
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let _ = match (format, journal) {
        (LogFormat::Json, _) => builder.json().try_init(),
        (LogFormat::Text, true) => builder.without_time().try_init(),
        (LogFormat::Text, false) => builder.try_init(),
    };
}

/// Tells systemd about a state change; failures are logged, never fatal.
fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        warn!(error = %e, "sd_notify failed");
    }
}

/// Runs the daemon on the config at `path` until SIGTERM or SIGINT.
pub fn serve(path: &Path, format: LogFormat) -> anyhow::Result<ExitCode> {
    init_tracing(format);
    let cfg = Arc::new(super::load(path)?);
    let _ = LOG_ZONE.set(cfg.server.timezone.clone());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(run(cfg, path))
}

/// The sockets systemd handed over (socket activation), if any.
fn activated_sockets() -> anyhow::Result<Vec<std::net::TcpListener>> {
    let mut fds = listenfd::ListenFd::from_env();
    let mut out = Vec::new();
    for i in 0..fds.len() {
        if let Some(l) = fds
            .take_tcp_listener(i)
            .with_context(|| format!("socket {i} from systemd is not a TCP listener"))?
        {
            l.set_nonblocking(true)?;
            out.push(l);
        }
    }
    Ok(out)
}

async fn run(cfg: Arc<Config>, path: &Path) -> anyhow::Result<ExitCode> {
    // The handlers come first: a SIGTERM that arrives once the daemon has
    // said it listens must stop it cleanly, not kill it by default.
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    // Watch from the start, so a change made while starting is not missed.
    let (file_tx, mut file_rx) = mpsc::unbounded_channel::<()>();
    let _watcher = match reload::watch(path, &cfg.includes, file_tx) {
        Ok(w) => Some(w),
        Err(e) => {
            warn!(error = %e, "cannot watch the config file; reload with SIGHUP");
            None
        }
    };
    for w in cfg.warnings() {
        warn!("{w}");
    }
    if crate::clock::is_shifted() {
        warn!(now = %crate::clock::now(), "the clock is shifted by {}", crate::clock::FAKE_NOW);
    }
    // On PostgreSQL, one daemon per node name on this machine: its lock
    // first, so a second daemon under a serving node's name stops here,
    // before it takes that node's lease (and its holds) over.
    let node_lock = match cfg.server.state {
        crate::config::StateUrl::Postgres(_) => Some(
            State::lock_node(&cfg)
                .context("locking the node")?
                .with_context(|| {
                    format!(
                        "another tollgate daemon runs on this machine as node {:?}; give each node its own name (serve --node, or server.cluster.node)",
                        cfg.server.cluster.node
                    )
                })?,
        ),
        crate::config::StateUrl::Sqlite(_) => None,
    };
    let state = State::open(&cfg)
        .await
        .context("opening the state database")?;
    // One daemon per state: reservations live in its memory, and admin
    // commands hand it their client changes while it holds this lock.
    let _lock = {
        let mut tries = 0;
        loop {
            if let Some(l) = node_lock {
                break l;
            }
            match state.lock_daemon().context("locking the state")? {
                Some(l) => break l,
                // An admin command holds it for a moment; another daemon
                // for good.
                None if tries < 50 => {
                    tries += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
                None => anyhow::bail!(
                    "another tollgate daemon is serving the state database {}, or an admin command has held its lock file {}.lock for 10 s",
                    state.path().display(),
                    state.path().display()
                ),
            }
        }
    };
    reload::apply_declared(&state, &cfg).await?;
    let rec = state
        .reconcile()
        .await
        .context("reconciling interrupted commits")?;
    reload::prepare_locations(&cfg)?;
    reload::save_applied(&cfg);
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
    let activated = activated_sockets()?;
    let socket_activated = !activated.is_empty();
    let mut listeners = Vec::new();
    if socket_activated {
        for l in activated {
            let l = TcpListener::from_std(l)?;
            let a = l.local_addr()?;
            info!(addr = %a, "using a socket from systemd; server.listen is ignored");
            listeners.push((a, l));
        }
    } else {
        for addr in &cfg.server.listen {
            let l = crate::server::bind_listener(*addr, &cfg.server.listen)
                .with_context(|| format!("binding {addr}"))?;
            listeners.push((*addr, l));
        }
    }
    if listeners.is_empty() {
        bail!("no listen address");
    }
    let metrics_listener = match cfg.server.metrics_listen {
        Some(a) => Some(
            TcpListener::bind(a)
                .await
                .with_context(|| format!("binding metrics_listen {a}"))?,
        ),
        None => None,
    };
    let web = match crate::web::bind(&cfg).await.with_context(|| {
        format!(
            "binding server.web.listen {:?}",
            cfg.server.web.as_ref().map(|w| w.listen)
        )
    })? {
        Some(l) => Some((
            l,
            tls::web_tls(&cfg).context("setting up TLS for the web console")?,
        )),
        None => None,
    };
    size_open_files(cfg.server.max_connections, cfg.server.limits.handshakes);
    crate::storage::start_pool().context("starting the writer pool")?;
    let handle = crate::metrics::install();
    // One machine-readable line each, for people and for tests that bind port 0.
    let mut out = std::io::stdout().lock();
    writeln!(out, "tollgate: certificate {}", t.fingerprint)?;
    if let Some(m) = &metrics_listener {
        let a = m.local_addr()?;
        info!(addr = %a, "metrics on http://{a}/metrics");
        writeln!(out, "tollgate: metrics on {a}")?;
    }
    if let Some((l, _)) = &web {
        writeln!(out, "tollgate: console on {}", l.local_addr()?)?;
    }
    for (_, l) in &listeners {
        let a = l.local_addr()?;
        info!(addr = %a, "listening");
        writeln!(out, "tollgate: listening on {a}")?;
    }
    out.flush()?;
    drop(out);

    let (phase_tx, phase_rx) = watch::channel(Phase::Running);
    let ctx = Arc::new(Context::new(cfg.clone(), state.clone(), t.config, phase_rx));
    ctx.listeners
        .socket_activated
        .store(socket_activated, Ordering::SeqCst);
    // Accepting before READY=1 and its STATUS= (which lists these).
    for (configured, l) in listeners {
        ctx.listeners.add(&ctx, configured, l);
    }
    let mut server = tokio::spawn(server::run(ctx.clone()));
    if let Some(m) = metrics_listener {
        tokio::spawn(crate::metrics::serve(m, ctx.clone(), handle));
    }
    if let Some((l, web_tls)) = web {
        tokio::spawn(crate::web::serve(l, ctx.clone(), web_tls));
    }
    // E-mail: queues due reports and alerts, and delivers the outbox.
    match crate::reports::Transport::from_config(&cfg) {
        Ok(Some(crate::reports::Transport::Smtp(_))) => info!("e-mail: delivering through SMTP"),
        Ok(Some(crate::reports::Transport::Spool(d))) => {
            info!(spool = %d.display(), "e-mail: writing .eml files to the spool")
        }
        Ok(None) => info!("e-mail: off (no server.email)"),
        Err(e) => warn!(error = %e, "e-mail: cannot deliver; messages wait in the outbox"),
    }
    {
        let c = ctx.clone();
        tokio::spawn(crate::reports::run(
            state.clone(),
            move || c.cfg.load_full(),
            ctx.mail_wake.clone(),
        ));
    }

    // systemd (sd_notify(3)): ready once listening and reconciled; the
    // watchdog is fed from a task on this runtime, so a stalled runtime stops
    // feeding it; STATUS= shows the sessions and the last reload.
    let last_reload = Arc::new(std::sync::Mutex::new(String::from("no reload yet")));
    let status = {
        let (ctx, last_reload) = (ctx.clone(), last_reload.clone());
        move || {
            let max = ctx.cfg.load().server.max_connections as usize;
            let sessions = max.saturating_sub(ctx.limit.available_permits());
            let addrs: Vec<String> = ctx
                .listeners
                .local()
                .iter()
                .map(|a| a.to_string())
                .collect();
            let last = last_reload
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            format!(
                "serving on {}; {sessions} sessions; {last}",
                addrs.join(", ")
            )
        }
    };
    notify(&[NotifyState::Ready, NotifyState::Status(&status())]);
    if let Some(interval) = sd_notify::watchdog_enabled() {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval / 2);
            loop {
                tick.tick().await;
                notify(&[NotifyState::Watchdog]);
            }
        });
    }
    {
        let status = status.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
            loop {
                tick.tick().await;
                notify(&[NotifyState::Status(&status())]);
            }
        });
    }

    // Reloads: on SIGHUP at once, on changes to the file after they settle.
    let (reload_tx, mut reload_rx) = mpsc::unbounded_channel::<crate::server::ReloadAsk>();
    let _ = ctx.reload_now.set(reload_tx.clone());
    {
        let reload_tx = reload_tx.clone();
        tokio::spawn(async move {
            while file_rx.recv().await.is_some() {
                if !reload::debounce(&mut file_rx).await {
                    return;
                }
                info!("the config file changed; reloading");
                let _ = reload_tx.send(None);
            }
        });
    }
    {
        let (ctx, path, last_reload) = (ctx.clone(), path.to_path_buf(), last_reload.clone());
        tokio::spawn(async move {
            while let Some(reply) = reload_rx.recv().await {
                let mut states = vec![NotifyState::Reloading];
                if let Ok(m) = NotifyState::monotonic_usec_now() {
                    states.push(m);
                }
                notify(&states);
                let result = reload::reload(&ctx, &path).await;
                let record = crate::server::ReloadRecord {
                    at: Some(crate::clock::now()),
                    ok: result.is_ok(),
                    summary: match &result {
                        Ok(s) => s.clone(),
                        Err(e) => e.to_string(),
                    },
                    errors: match &result {
                        Err(reload::ReloadError::Load(crate::config::LoadError::Invalid(
                            errors,
                        ))) => errors.iter().map(|e| e.to_string()).collect(),
                        _ => Vec::new(),
                    },
                };
                *ctx.last_reload.lock().unwrap_or_else(|p| p.into_inner()) = record.clone();
                if let Some(reply) = reply {
                    let _ = reply.send(record);
                }
                // New customers may be owed their account details.
                ctx.mail_wake.notify_one();
                let line = match result {
                    Ok(summary) => {
                        info!("{summary}");
                        metrics::counter!(crate::metrics::RELOADS, "result" => "ok").increment(1);
                        metrics::gauge!(crate::metrics::RELOAD_FAILED).set(0.0);
                        format!("last reload ok at {}", now_local(&ctx))
                    }
                    Err(e) => {
                        error!(error = %e, "reload refused; the running configuration stays in force");
                        metrics::counter!(crate::metrics::RELOADS, "result" => "failed")
                            .increment(1);
                        metrics::gauge!(crate::metrics::RELOAD_FAILED).set(1.0);
                        format!("last reload FAILED at {}: {e}", now_local(&ctx))
                    }
                };
                *last_reload.lock().unwrap_or_else(|p| p.into_inner()) = line;
                notify(&[NotifyState::Ready, NotifyState::Status(&status())]);
            }
        });
    }

    let signal = loop {
        tokio::select! {
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            _ = hup.recv() => { info!("SIGHUP: reloading the configuration"); let _ = reload_tx.send(None); }
            r = &mut server => {
                warn!("the listener ended on its own: {r:?}");
                return Ok(ExitCode::FAILURE);
            }
        }
    };
    // Draining first, then the line: whoever reads the line may rely on
    // every later HELLO being refused with `shutting_down`.
    let _ = phase_tx.send(Phase::Draining);
    info!("{signal}: shutting down");
    notify(&[NotifyState::Stopping, NotifyState::Status("shutting down")]);
    let grace = ctx.cfg.load().server.shutdown_grace;
    if tokio::time::timeout(grace, &mut server).await.is_err() {
        info!(?grace, "grace period over; ending the remaining sessions");
        let _ = phase_tx.send(Phase::Forced);
        let _ = server.await;
    }
    state.close().await;
    info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// Now in the server's zone, to the second, for STATUS=.
fn now_local(ctx: &Context) -> String {
    let tz = ctx.cfg.load().server.timezone.clone();
    crate::clock::now()
        .to_zoned_datetime(tz)
        .strftime("%Y-%m-%d %H:%M:%S %Z")
        .to_string()
}

/// Descriptors kept for everything but sessions' sockets and temporary
/// files: the database, listeners, logs.
const SPARE_FILES: u64 = 1024;

/// Raises the soft open-file limit to the hard one (as nginx's
/// `worker_rlimit_nofile` and Go's runtime do), then sizes the temporary
/// files' budget: each session and each handshake holds a socket, and
/// uploads past the budget close their file between writes instead of
/// failing with EMFILE. A restore's file is not parked: below one socket
/// and one file per session, the start warns.
fn size_open_files(max_connections: u32, handshakes: u32) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut lim = getrlimit(Resource::Nofile);
    // None is "unlimited".
    let below_hard = match (lim.current, lim.maximum) {
        (Some(c), Some(m)) => c < m,
        (Some(_), None) => true,
        (None, _) => false,
    };
    if below_hard {
        let raised = rustix::process::Rlimit {
            current: lim.maximum,
            maximum: lim.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => lim = raised,
            Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
        }
    }
    let soft = lim.current.unwrap_or(u64::MAX);
    let sockets = u64::from(max_connections) + u64::from(handshakes);
    let budget = soft.saturating_sub(sockets + SPARE_FILES);
    if soft < sockets + u64::from(max_connections) + SPARE_FILES {
        tracing::warn!(
            open_files = soft,
            max_connections,
            "the open-file limit is below one socket and one file per session \
             (uploads past it reopen their files; restores may fail to open theirs); \
             raise LimitNOFILE or lower max_connections"
        );
    }
    let budget = usize::try_from(budget.max(64)).unwrap_or(usize::MAX);
    info!(
        open_files = lim
            .current
            .map_or_else(|| "unlimited".to_string(), |n| n.to_string()),
        temp_file_budget = budget,
        "open-file limit"
    );
    crate::storage::set_open_temp_budget(budget);
}
