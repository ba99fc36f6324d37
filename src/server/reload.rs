//! Live configuration reload (CONFIG.md, first paragraph; "Activation";
//! "Throttle resolution"): read and validate the file, then swap it in
//! atomically and apply it to what is running. A file that does not
//! validate changes nothing.
//!
//! What a reload applies, and when:
//! - activation: sessions of a deactivated customer or reseller end with
//!   BYE `customer_deactivated` (they are told at once, even mid-wait);
//! - throttles and aggregate caps: every session re-resolves at once;
//! - space, MCAL and client limits, timeouts, `max_frame`: the next decision
//!   or session reads the new config;
//! - declared clients: upserted in state (a changed customer moves them);
//! - `listen`: new addresses are bound, removed ones stop accepting; running
//!   sessions stay;
//! - TLS: new handshakes use the reloaded certificate.
//!
//! `state`, `state_dir`, `max_connections`, `limits.handshakes` and
//! `metrics_listen` cannot change live: the log says so and the running
//! value stays. The other limits and penalties apply to the next
//! connection; retention to the next pruning pass.

use super::{Context, Notice};
use crate::config::{Config, LoadError};
use crate::state::State;
use crate::{storage, tls};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

/// How long the file must stay quiet before a change is reloaded: editors
/// write, rename and touch in bursts.
pub const DEBOUNCE: Duration = Duration::from_millis(200);

/// Why a reload was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file could not be read or has problems (each one logged).
    #[error("{0}")]
    Load(#[from] LoadError),
    /// A backup location or declared client could not be set up.
    #[error("{0}")]
    Setup(#[from] SetupError),
}

/// Loads `path` and, when it is valid, makes it the running config.
/// Returns a one-line summary for the log and systemd's STATUS=.
pub async fn reload(ctx: &Arc<Context>, path: &Path) -> Result<String, ReloadError> {
    let p = path.to_path_buf();
    // A big file takes a while to validate: keep it off the runtime threads.
    let loaded = tokio::task::spawn_blocking(move || Config::load(&p))
        .await
        .unwrap_or_else(|e| {
            Err(LoadError::Read {
                path: path.to_path_buf(),
                source: std::io::Error::other(e.to_string()),
            })
        });
    let mut new = match loaded {
        Ok(c) => c,
        Err(e) => {
            if let LoadError::Invalid(errors) = &e {
                for err in errors {
                    error!("{err}");
                }
            }
            return Err(e.into());
        }
    };
    let old = ctx.cfg.load_full();
    keep_fixed(&old, &mut new);
    for w in new.warnings() {
        warn!("{w}");
    }
    let tls = match tls::server_tls(&new) {
        Ok(t) => Some(t),
        Err(e) => {
            warn!(error = %e, "the TLS settings cannot be loaded; new handshakes keep the old certificate");
            new.server.tls = old.server.tls.clone();
            None
        }
    };
    prepare_locations(&new)?;
    apply_declared(&ctx.state, &new).await?;
    save_applied(&new);

    let changes = crate::config::diff::diff(&old, &new);
    let new = Arc::new(new);
    ctx.cfg.store(new.clone());
    // What changed, by name, one line each: the audit trail of live edits.
    for c in &changes {
        info!(what = c.what, name = %c.name, "reload: {c}");
    }
    if let Some(t) = tls {
        ctx.tls.store(t.config);
        info!(fingerprint = %t.fingerprint, "new handshakes use this certificate");
    }
    ctx.throttles.config_changed();
    let told = ctx.notify_all(Notice::Reloaded);
    apply_listen(ctx, &old.server.listen, &new.server.listen).await;
    let summary = format!(
        "reloaded {}: {} resellers, {} customers, {} declared clients; {} change(s); {told} sessions told",
        path.display(),
        new.resellers.len(),
        new.customers.len() - 1,
        new.clients.len(),
        if changes.is_empty() {
            "no".to_string()
        } else {
            changes.len().to_string()
        },
    );
    Ok(summary)
}

/// Settings that only a restart changes: warn and keep the running value.
fn keep_fixed(old: &Config, new: &mut Config) {
    let (o, n) = (&old.server, &mut new.server);
    if o.state != n.state {
        warn!("server.state cannot change live; restart to apply it");
        n.state = o.state.clone();
    }
    if o.state_dir != n.state_dir {
        warn!("server.state_dir cannot change live; restart to apply it");
        n.state_dir = o.state_dir.clone();
    }
    if o.max_connections != n.max_connections {
        warn!(
            running = o.max_connections,
            "server.max_connections cannot change live; restart to apply it"
        );
        n.max_connections = o.max_connections;
    }
    if o.limits.handshakes != n.limits.handshakes {
        warn!(
            running = o.limits.handshakes,
            "server.limits.handshakes cannot change live; restart to apply it"
        );
        n.limits.handshakes = o.limits.handshakes;
    }
    if o.cluster.node != n.cluster.node || o.cluster.lease != n.cluster.lease {
        warn!("server.cluster.node and .lease cannot change live; restart to apply them");
        n.cluster.node = o.cluster.node.clone();
        n.cluster.lease = o.cluster.lease;
    }
    let bound = |w: &Option<crate::config::Web>| {
        w.as_ref()
            .map(|w| (w.listen, w.cert.clone(), w.key.clone()))
    };
    if bound(&o.web) != bound(&n.web) {
        warn!("server.web.listen, .cert and .key cannot change live; restart to apply them");
        match (&mut n.web, &o.web) {
            (Some(nw), Some(ow)) => {
                nw.listen = ow.listen;
                nw.cert = ow.cert.clone();
                nw.key = ow.key.clone();
            }
            (nw, ow) => *nw = ow.clone(),
        }
    }
    if o.metrics_listen != n.metrics_listen {
        warn!("server.metrics_listen cannot change live; restart to apply it");
        n.metrics_listen = o.metrics_listen;
    }
}

/// Binds addresses added to `listen` and stops those removed.
async fn apply_listen(ctx: &Arc<Context>, old: &[SocketAddr], new: &[SocketAddr]) {
    if old == new {
        return;
    }
    if ctx
        .listeners
        .socket_activated
        .load(std::sync::atomic::Ordering::SeqCst)
    {
        warn!(
            "server.listen changed, but systemd hands over the sockets; change tollgate.socket instead"
        );
        return;
    }
    let serving = ctx.listeners.configured();
    // Whether a kept `[::]` also takes IPv4 was fixed when it was bound
    // (`bind_listener`); a change needs a restart.
    let ipv4_beside = |list: &[SocketAddr], a: &SocketAddr| super::ipv4_on_port(list, a.port());
    for a in new.iter().filter(|a| {
        serving.contains(a)
            && a.ip() == std::net::IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
            && ipv4_beside(old, a) != ipv4_beside(new, a)
    }) {
        warn!(addr = %a, "whether this address also takes IPv4 changes only at a restart; it keeps its current setting");
    }
    for a in new.iter().filter(|a| !serving.contains(a)) {
        match super::bind_listener(*a, new) {
            Ok(l) => {
                info!(addr = %l.local_addr().unwrap_or(*a), "listening (added by reload)");
                ctx.listeners.add(ctx, *a, l);
            }
            Err(e) => {
                error!(addr = %a, error = %e, "cannot bind a new listen address; it is not served")
            }
        }
    }
    for a in serving.iter().filter(|a| !new.contains(a)) {
        info!(addr = %a, "no longer accepting (removed by reload); its sessions go on");
        ctx.listeners.remove(*a);
    }
}

/// Why the backup locations or declared clients could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A backup location cannot be created or written.
    #[error("customer {customer:?}: {what} {}: {source}", path.display())]
    Location {
        /// The customer.
        customer: String,
        /// What failed.
        what: &'static str,
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The state store failed.
    #[error("recording the declared clients: {0}")]
    State(#[from] crate::state::StateError),
    /// A declared client's new `customer` cannot take it (nothing moved).
    #[error("a declared client's move in the config is refused: {0}")]
    Move(#[from] crate::state::MoveRefused),
}

/// The mode of `dir` when its group or others have any access to it.
fn open_to_others(dir: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir).ok()?.permissions().mode() & 0o7777;
    (mode & 0o077 != 0).then_some(mode)
}

/// Creates every customer's backup location (mode 0700) and proves it is
/// writable (CONFIG.md: else the daemon refuses to start, or the reload).
pub fn prepare_locations(cfg: &Config) -> Result<(), SetupError> {
    use std::os::unix::fs::DirBuilderExt;
    for (i, c) in cfg.customers.iter().enumerate() {
        let fail = |what, path: &Path| {
            let customer = c.name.clone();
            let path = path.to_path_buf();
            move |source| SetupError::Location {
                customer,
                what,
                path,
                source,
            }
        };
        let dir = &c.backup_location;
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(fail("cannot create backup_location", dir))?;
        } else if let Some(mode) = open_to_others(dir) {
            // Made by hand with the admin's umask: say so, but serve on.
            warn!(
                customer = %c.name,
                path = %dir.display(),
                mode = %format!("{mode:04o}"),
                "backup_location is open to other users (group or others have access); its clients' files may be read by them. Run: chmod 700 {}",
                dir.display()
            );
        }
        let tmp = storage::temp_dir(cfg, crate::config::CustomerId(i as u32));
        storage::create_private_dirs(&tmp).map_err(fail("cannot create", &tmp))?;
        let probe = tmp.join(".write-probe");
        std::fs::write(&probe, b"").map_err(fail("backup_location is not writable:", dir))?;
        let _ = std::fs::remove_file(probe);
    }
    Ok(())
}

/// Upserts the clients declared in `cfg`; those whose customer changed in
/// the file move, files included (CONFIG.md "Moving a client"), or the
/// whole configuration is refused with the reason.
pub async fn apply_declared(state: &State, cfg: &Config) -> Result<(), SetupError> {
    let moves = state
        .sync_declared(cfg, crate::clock::now(), |id, from, to| {
            storage::move_dir(
                &storage::client_dir(cfg, from, id),
                &storage::client_dir(cfg, to, id),
            )
        })
        .await??;
    for (id, from, to) in moves {
        info!(client = %id, %from, %to, "declared client moved by the config, with its files");
    }
    Ok(())
}

/// Saves the configuration just applied in `state_dir`, for `status` to
/// show the state against while the file on disk is broken. A failure is
/// logged: it costs the fallback, not the daemon.
pub fn save_applied(cfg: &Config) {
    let path = cfg.applied_copy();
    // 0600 like every file the daemon makes (CONFIG.md Additions); it
    // holds hashes, like the config file itself, never a plaintext secret.
    // `state_dir` need not hold the SQLite file, so on a first start it
    // may not exist yet.
    let saved = storage::create_private_dirs(&cfg.server.state_dir)
        .and_then(|()| storage::write_durably(&path, cfg.source.0.as_bytes(), 0o600));
    if let Err(e) = saved {
        warn!(error = %e, path = %path.display(), "saving the applied configuration failed");
    }
}

/// Watches the config file's directory (so saves by rename are seen) and
/// the directories of its `[[include]]` entries, and sends one message per
/// burst of changes to the file or to a file an include's pattern matches.
/// (An include added by a reload is watched from the next start; SIGHUP
/// reloads it meanwhile.)
pub fn watch(
    path: &Path,
    includes: &[crate::config::include::Include],
    tx: mpsc::UnboundedSender<()>,
) -> notify::Result<notify::RecommendedWatcher> {
    use notify::{EventKind, RecursiveMode, Watcher};
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().map(|n| n.to_os_string());
    let watched = includes.to_vec();
    let included = move |p: &Path| {
        let (Some(parent), Some(file)) = (p.parent(), p.file_name().and_then(|f| f.to_str()))
        else {
            return false;
        };
        watched.iter().any(|i| i.dir == parent && i.takes(file))
    };
    let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let Ok(ev) = res else { return };
        if matches!(ev.kind, EventKind::Access(_)) {
            return;
        }
        if ev
            .paths
            .iter()
            .any(|p| p.file_name().map(|n| n.to_os_string()) == name || included(p))
        {
            let _ = tx.send(());
        }
    })?;
    w.watch(&dir, RecursiveMode::NonRecursive)?;
    for inc in includes {
        if let Err(e) = w.watch(&inc.dir, RecursiveMode::NonRecursive) {
            warn!(dir = %inc.dir.display(), error = %e, "cannot watch an include directory; reload with SIGHUP after changing its files");
        }
    }
    Ok(w)
}

/// Waits until `rx` has been quiet for [`DEBOUNCE`]; false when it closed.
pub async fn debounce(rx: &mut mpsc::UnboundedReceiver<()>) -> bool {
    loop {
        match tokio::time::timeout(DEBOUNCE, rx.recv()).await {
            Ok(Some(())) => continue,
            Ok(None) => return false,
            Err(_) => return true,
        }
    }
}
