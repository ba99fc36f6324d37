//! The listener (PROTOCOL.md Transport and Session): accept loops, one task
//! per connection, the connection limits and shutdown.
//!
//! Two semaphores bound connections (CONFIG.md `[server.limits]`). A permit
//! of `handshakes` is taken before `accept()` and moved into the session
//! task, which gives it back once WELCOME or REJECT is sent: connections
//! still in TLS or HELLO can never be more than `handshakes`, and never
//! starve admitted sessions. A permit of `max_connections` is taken at
//! admission (REJECT `busy` when none is left). Right after accept, before
//! any TLS work, a penalized source or one over `per_source_connections` is
//! closed (`limits`). The TLS handshake runs inside the task under
//! `hello_timeout`, never in the accept loop. Shutdown is a `watch` of
//! [`Phase`]: `Draining` stops the accept loops and lets uploads in flight
//! finish; `Forced` (after `shutdown_grace`) ends every session.

mod cluster;
mod maintenance;
pub mod reload;
mod requests;
pub mod session;

pub use requests::apply_change;

use crate::config::Config;
use crate::state::ClientEvent;
use crate::state::State;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// Binds one `server.listen` address. The IPv6 wildcard `[::]` takes IPv4
/// too (IPV6_V6ONLY off, whatever the host's `bindv6only`), so one
/// `"[::]:7443"` serves both families; when `all` also lists an IPv4
/// address on the same port, `[::]` takes IPv6 only, so both binds succeed
/// instead of "Address already in use" (issue 12 item 12).
pub fn bind_listener(addr: SocketAddr, all: &[SocketAddr]) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let ipv4_too = ipv4_on_port(all, addr.port());
    let socket = match Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)) {
        // A host booted with IPv6 off (ipv6.disable=1): the wildcard still
        // serves IPv4, rather than the daemon not starting.
        Err(e)
            if addr.ip() == std::net::IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
                && !ipv4_too
                && e.raw_os_error() == Some(rustix::io::Errno::AFNOSUPPORT.raw_os_error()) =>
        {
            let v4 = SocketAddr::from(([0, 0, 0, 0], addr.port()));
            warn!(%addr, instead = %v4, "IPv6 is not available on this host; listening on IPv4 only");
            return bind_listener(v4, &[]);
        }
        r => r?,
    };
    if let SocketAddr::V6(v6) = addr {
        socket.set_only_v6(!v6.ip().is_unspecified() || ipv4_too)?;
    }
    // As tokio's TcpListener::bind: a restart may rebind at once.
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// Whether `list` has an IPv4 address on `port` (then `[::]` on that port
/// takes IPv6 only).
pub(crate) fn ipv4_on_port(list: &[SocketAddr], port: u16) -> bool {
    list.iter().any(|a| a.is_ipv4() && a.port() == port)
}

/// Longest pause of an accept loop after an accept error (EMFILE …).
pub const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Where shutdown stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Serving.
    Running,
    /// No new connections; uploads in flight may finish.
    Draining,
    /// The grace period is over: every session ends now.
    Forced,
}

/// What a live session is told from outside.
#[derive(Clone, Debug)]
pub enum Notice {
    /// An admin command moved or removed its client.
    Client(ClientEvent),
    /// The configuration was reloaded: look again at customer and limits.
    Reloaded,
}

/// Live sessions by client id: (session key, where its notices go).
pub type LiveSessions = HashMap<String, Vec<(u64, mpsc::UnboundedSender<Notice>)>>;

/// What every session shares.
pub struct Context {
    /// The configuration in force; a reload swaps it (sessions keep a
    /// snapshot and take the new one when told [`Notice::Reloaded`]).
    pub cfg: ArcSwap<Config>,
    /// The state store.
    pub state: State,
    /// TLS for new handshakes; a reload may swap it.
    pub tls: ArcSwap<rustls::ServerConfig>,
    /// One permit per admitted session (`max_connections`).
    pub limit: Arc<Semaphore>,
    /// One permit per connection not yet answered WELCOME or REJECT
    /// (`limits.handshakes`).
    pub handshakes: Arc<Semaphore>,
    /// Per-source penalties and connection counts, the argon2 pool.
    pub limits: Arc<crate::limits::Limits>,
    /// Open sessions per client id (lowercase), for
    /// `max_sessions_per_client`.
    pub client_sessions: std::sync::Mutex<HashMap<String, u32>>,
    /// Per-(client, path) locks around commits and deletes.
    pub path_locks: crate::storage::PathLocks,
    /// Shutdown phase.
    pub phase: watch::Receiver<Phase>,
    /// Shared aggregate buckets, and the trigger for live rate changes.
    pub throttles: Arc<crate::throttle::Registry>,
    /// Live sessions per client id, to hand them moves and removals.
    pub live: std::sync::Mutex<LiveSessions>,
    /// The accept loops.
    pub listeners: Listeners,
    /// Wakes the mail task (a report was queued, a session ended).
    pub mail_wake: Arc<tokio::sync::Notify>,
    /// The last reload's outcome (the console's admin page).
    pub last_reload: std::sync::Mutex<ReloadRecord>,
    /// Asks the daemon's reload task for a reload now; it answers with
    /// the outcome (the console, after writing a customer file). Set by
    /// `serve`; unset where no reload task runs.
    pub reload_now: std::sync::OnceLock<mpsc::UnboundedSender<ReloadAsk>>,
}

/// A reload request: where to send its outcome, if anyone waits.
pub type ReloadAsk = Option<tokio::sync::oneshot::Sender<ReloadRecord>>;

/// What the last reload did.
#[derive(Debug, Clone, Default)]
pub struct ReloadRecord {
    /// When; None = no reload since start.
    pub at: Option<jiff::Timestamp>,
    /// Whether it was applied.
    pub ok: bool,
    /// Its one-line summary, or why it was refused.
    pub summary: String,
    /// Each problem in the file, located.
    pub errors: Vec<String>,
}

impl Context {
    /// Builds the context for `cfg`.
    pub fn new(
        cfg: Arc<Config>,
        state: State,
        tls: Arc<rustls::ServerConfig>,
        phase: watch::Receiver<Phase>,
    ) -> Context {
        Context {
            limit: Arc::new(Semaphore::new(cfg.server.max_connections as usize)),
            handshakes: Arc::new(Semaphore::new(cfg.server.limits.handshakes as usize)),
            limits: Arc::default(),
            client_sessions: Default::default(),
            path_locks: Default::default(),
            cfg: ArcSwap::new(cfg),
            state,
            tls: ArcSwap::new(tls),
            phase,
            throttles: Arc::default(),
            live: Default::default(),
            listeners: Listeners::default(),
            mail_wake: Arc::default(),
            last_reload: Default::default(),
            reload_now: Default::default(),
        }
    }
}

/// How often the daemon looks for moves and removals made by the admin
/// commands (another process), so live sessions follow within a second.
pub const EVENT_POLL: Duration = Duration::from_millis(500);

/// Hands moves and removals recorded by `tollgate clients …` to the live
/// sessions of those clients.
async fn watch_client_events(ctx: Arc<Context>) {
    let mut seen = match ctx.state.last_event().await {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot read client events; moves and removals apply at the next admission");
            return;
        }
    };
    loop {
        tokio::time::sleep(EVENT_POLL).await;
        let events = match ctx.state.events_after(seen).await {
            Ok(e) => e,
            Err(e) => {
                warn!(error = %e, "reading client events failed");
                continue;
            }
        };
        for row in events {
            seen = row.seq;
            let live = ctx.live.lock().unwrap_or_else(|p| p.into_inner());
            let sessions = live.get(&row.client).map_or(0, Vec::len);
            for (_, tx) in live.get(&row.client).into_iter().flatten() {
                let _ = tx.send(Notice::Client(row.event.clone()));
            }
            drop(live);
            log_event(&row, sessions);
        }
    }
}

/// Logs an admin command's change to a client when the daemon sees it
/// (issue 12): the command ran in another process, so this is the
/// daemon's own record of what it now acts on.
fn log_event(row: &crate::state::EventRow, sessions: usize) {
    let client = crate::config::escape_log(&row.client, 64);
    match (row.kind.as_str(), &row.event) {
        // The reload that applied it has logged it already.
        ("moved-by-config", _) => {}
        (_, ClientEvent::Moved(to)) => info!(
            %client, to = %to, live_sessions = sessions,
            "`tollgate clients move` moved the client and its files; live sessions follow it"
        ),
        ("purged", _) => info!(
            %client, live_sessions = sessions,
            "`tollgate clients remove --purge` removed the client and deleted its files; live sessions end"
        ),
        (_, ClientEvent::Removed) => info!(
            %client, live_sessions = sessions,
            "`tollgate clients remove` removed the client (its files are kept); live sessions end"
        ),
        (_, ClientEvent::Readmitted) => info!(
            %client,
            "`tollgate clients readmit` gave the client a one-time readmit key"
        ),
    }
}

/// A session's entry in [`Context::live`], removed when dropped.
pub struct Joined {
    ctx: Arc<Context>,
    client: String,
    key: u64,
}

impl Drop for Joined {
    fn drop(&mut self) {
        let mut live = self.ctx.live.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = live.get_mut(&self.client) {
            v.retain(|(k, _)| *k != self.key);
            if v.is_empty() {
                live.remove(&self.client);
            }
        }
    }
}

impl Context {
    /// Enters a session of `client` in the live set; its notices arrive on
    /// the returned receiver until the [`Joined`] is dropped.
    pub fn join(ctx: &Arc<Context>, client: &str) -> (Joined, mpsc::UnboundedReceiver<Notice>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let key = getrandom::u64().unwrap_or_default();
        let mut live = ctx.live.lock().unwrap_or_else(|p| p.into_inner());
        live.entry(client.to_string()).or_default().push((key, tx));
        let joined = Joined {
            ctx: ctx.clone(),
            client: client.to_string(),
            key,
        };
        (joined, rx)
    }

    /// Tells every live session that the configuration changed.
    pub fn notify_all(&self, n: Notice) -> usize {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let mut told = 0;
        for tx in live.values().flatten().map(|(_, tx)| tx) {
            if tx.send(n.clone()).is_ok() {
                told += 1;
            }
        }
        told
    }

    /// A TLS acceptor with the certificate in force now.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.tls.load_full())
    }
}

/// The accept loops, one per listening socket. A reload adds and stops
/// loops; sessions run in `sessions` and outlive the loop that accepted them.
#[derive(Default)]
pub struct Listeners {
    loops: std::sync::Mutex<Vec<Loop>>,
    accepting: TaskTracker,
    sessions: TaskTracker,
    /// The sockets came from systemd (`LISTEN_FDS`): `listen` is not ours.
    pub socket_activated: std::sync::atomic::AtomicBool,
}

struct Loop {
    /// The configured address (`listen`), or the bound one when activated.
    configured: SocketAddr,
    local: SocketAddr,
    stop: CancellationToken,
}

impl Listeners {
    /// Starts accepting on `listener`, bound for `configured`.
    pub fn add(&self, ctx: &Arc<Context>, configured: SocketAddr, listener: TcpListener) {
        let local = listener.local_addr().unwrap_or(configured);
        let stop = CancellationToken::new();
        self.accepting.spawn(accept_loop(
            listener,
            ctx.clone(),
            self.sessions.clone(),
            stop.clone(),
        ));
        let mut loops = self.loops.lock().unwrap_or_else(|p| p.into_inner());
        loops.push(Loop {
            configured,
            local,
            stop,
        });
    }

    /// The configured addresses being served.
    pub fn configured(&self) -> Vec<SocketAddr> {
        let loops = self.loops.lock().unwrap_or_else(|p| p.into_inner());
        loops.iter().map(|l| l.configured).collect()
    }

    /// The bound addresses.
    pub fn local(&self) -> Vec<SocketAddr> {
        let loops = self.loops.lock().unwrap_or_else(|p| p.into_inner());
        loops.iter().map(|l| l.local).collect()
    }

    /// Stops accepting on `configured`; its sessions go on.
    pub fn remove(&self, configured: SocketAddr) {
        let mut loops = self.loops.lock().unwrap_or_else(|p| p.into_inner());
        loops.retain(|l| {
            if l.configured == configured {
                l.stop.cancel();
                false
            } else {
                true
            }
        });
    }
}

/// Runs the server's background tasks until the phase leaves `Running`,
/// then waits for the accept loops and sessions to end (they follow the
/// phase). The caller binds and adds the listeners (`Listeners::add`)
/// before, so tests can bind port 0, systemd can hand sockets over, and
/// READY=1 is sent only once they accept.
pub async fn run(ctx: Arc<Context>) {
    let watcher = tokio::spawn(watch_client_events(ctx.clone()));
    let upkeep = tokio::spawn(maintenance::run(ctx.clone()));
    let heartbeat = tokio::spawn(cluster::run(ctx.clone()));
    let mut phase = ctx.phase.clone();
    let _ = phase.wait_for(|p| *p != Phase::Running).await;
    ctx.listeners.accepting.close();
    ctx.listeners.accepting.wait().await;
    ctx.listeners.sessions.close();
    ctx.listeners.sessions.wait().await;
    watcher.abort();
    upkeep.abort();
    heartbeat.abort();
    if let Err(e) = ctx.state.flush_session_starts().await {
        warn!(error = %e, "recording the last session starts failed");
    }
    // The last second of refusals.
    if let Err(e) = ctx.state.flush_refusals().await {
        warn!(error = %e, "writing the last refusals failed");
    }
}

async fn accept_loop(
    listener: TcpListener,
    ctx: Arc<Context>,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    let mut phase = ctx.phase.clone();
    let mut backoff = Duration::from_millis(5);
    let mut permit = None;
    loop {
        // A handshake slot first: past `handshakes`, new connections wait
        // in the kernel's backlog instead of costing TLS work.
        let hs = match permit.take() {
            Some(p) => p,
            None => tokio::select! {
                p = ctx.handshakes.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
                _ = phase.wait_for(|p| *p != Phase::Running) => return,
                _ = stop.cancelled() => return,
            },
        };
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = phase.wait_for(|p| *p != Phase::Running) => return,
            _ = stop.cancelled() => return,
        };
        match accepted {
            Ok((tcp, peer)) => {
                backoff = Duration::from_millis(5);
                metrics::counter!(crate::metrics::CONNECTIONS).increment(1);
                let cfg = ctx.cfg.load();
                let now = tokio::time::Instant::now();
                match ctx.limits.accept(&cfg.server.limits, peer.ip(), now) {
                    Ok(source) => {
                        let _ = tcp.set_nodelay(true);
                        let acc = session::Accepted {
                            peer,
                            handshake: Some(hs),
                            source: Some(source),
                            deadline: now + cfg.server.hello_timeout,
                        };
                        tracker.spawn(session::run(ctx.clone(), tcp, acc));
                    }
                    Err(why) => {
                        // Closed before any TLS work; the slot serves the next.
                        debug!(%peer, reason = why.as_str(), "connection closed at accept");
                        drop(tcp);
                        permit = Some(hs);
                    }
                }
            }
            Err(e) => {
                // EMFILE and friends: wait and retry, never give up serving.
                permit = Some(hs);
                warn!(error = %e, "accept failed; retrying in {:?}", backoff);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
            }
        }
    }
}
