//! The console's connections: TCP, then the same per-source penalties and
//! connection caps as the backup listener (a source blocked for failed
//! logins is blocked on both), then TLS in a task of its own, then HTTP/1.1
//! served by hyper with a timer. Every stage is bounded, so no peer can
//! hold the loop or another peer's turn:
//! - at most [`CONNECTIONS`] console connections, [`HANDSHAKES`] TLS
//!   handshakes at a time and [`HANDSHAKES_PER_SOURCE`] from one source;
//! - a handshake that fails or takes longer than [`HANDSHAKE_TIMEOUT`]
//!   costs the source the `no_hello` penalty;
//! - a request's head must arrive within [`HEADER_TIMEOUT`], and a
//!   connection that moves no byte for [`IDLE_TIMEOUT`] is closed.

use crate::limits::penalty::Reason;
use crate::limits::{Source, SourceGuard};
use crate::server::{Context, Phase};
use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tower::ServiceExt;
use tracing::debug;

/// Console connections open at most (each holds a socket and a TLS state).
pub const CONNECTIONS: usize = 1024;
/// TLS handshakes in progress at most.
pub const HANDSHAKES: usize = 64;
/// Of them, from one source at most.
pub const HANDSHAKES_PER_SOURCE: u32 = 8;
/// A handshake not finished by then is dropped and penalized.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A request's head must arrive within this.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection that moves no byte for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The peer's address, for handlers (`ConnectInfo<Peer>`).
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub SocketAddr);

/// A console connection: the TLS stream, its count against its source and
/// the console's cap, and its idle deadline.
struct Conn {
    tls: TlsStream<TcpStream>,
    idle: Pin<Box<Sleep>>,
    _source: SourceGuard,
    _slot: OwnedSemaphorePermit,
}

impl Conn {
    /// A byte moved: the idle clock starts again.
    fn moved(&mut self) {
        self.idle.as_mut().reset(Instant::now() + IDLE_TIMEOUT);
    }

    /// Pending I/O past the idle deadline fails the connection.
    fn check_idle(&mut self, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        match self.idle.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::ErrorKind::TimedOut.into())),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.tls).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.moved();
                }
                Poll::Ready(r)
            }
            Poll::Pending => self.check_idle(cx),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match Pin::new(&mut self.tls).poll_write(cx, buf) {
            Poll::Ready(r) => {
                if matches!(r, Ok(n) if n > 0) {
                    self.moved();
                }
                Poll::Ready(r)
            }
            Poll::Pending => self.check_idle(cx).map(|r| r.map(|()| 0)),
        }
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        match Pin::new(&mut self.tls).poll_flush(cx) {
            Poll::Pending => self.check_idle(cx),
            ready => ready,
        }
    }
    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }
}

/// Handshakes in progress per source.
type InFlight = Arc<Mutex<HashMap<Source, u32>>>;

/// Counts one handshake of a source until dropped.
struct HandshakeSlot {
    in_flight: InFlight,
    source: Source,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut m = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.source);
            }
        }
    }
}

/// Accepts and serves console connections with `app` until the daemon
/// begins to stop.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<Context>,
    tls: Arc<rustls::ServerConfig>,
    app: Router,
) {
    let acceptor = TlsAcceptor::from(tls);
    let connections = Arc::new(Semaphore::new(CONNECTIONS));
    let handshakes = Arc::new(Semaphore::new(HANDSHAKES));
    let in_flight: InFlight = Arc::default();
    let mut phase = ctx.phase.clone();
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and the like: back off rather than spin.
                    debug!(error = %e, "web console: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = phase.changed() => {
                if *phase.borrow() != Phase::Running {
                    return;
                }
                continue;
            }
        };
        let cfg = ctx.cfg.load();
        let now = Instant::now();
        let source = match ctx.limits.accept(&cfg.server.limits, peer.ip(), now) {
            Ok(g) => g,
            Err(why) => {
                debug!(peer = %peer, reason = why.as_str(), "web console: connection dropped");
                continue;
            }
        };
        let Ok(slot) = connections.clone().try_acquire_owned() else {
            debug!(peer = %peer, "web console: at its connection cap; connection dropped");
            continue;
        };
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            debug!(peer = %peer, "web console: too many handshakes; connection dropped");
            continue;
        };
        let src = Source::of(peer.ip());
        {
            let mut m = in_flight.lock().unwrap_or_else(|p| p.into_inner());
            let n = m.entry(src).or_insert(0);
            if *n >= HANDSHAKES_PER_SOURCE {
                debug!(peer = %peer, "web console: too many handshakes from one source; connection dropped");
                continue;
            }
            *n += 1;
        }
        let mine = HandshakeSlot {
            in_flight: in_flight.clone(),
            source: src,
        };
        let (acceptor, ctx, app) = (acceptor.clone(), ctx.clone(), app.clone());
        tokio::spawn(async move {
            let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
            drop((permit, mine));
            let tls = match tls {
                Ok(Ok(tls)) => tls,
                failed => {
                    match failed {
                        Ok(Err(e)) => debug!(peer = %peer, error = %e, "web console: TLS failed"),
                        _ => debug!(peer = %peer, "web console: TLS handshake timed out"),
                    }
                    let cfg = ctx.cfg.load();
                    ctx.limits.penalize(
                        &cfg.server.limits,
                        peer.ip(),
                        Reason::NoHello,
                        Instant::now(),
                    );
                    return;
                }
            };
            let conn = Conn {
                tls,
                idle: Box::pin(tokio::time::sleep(IDLE_TIMEOUT)),
                _source: source,
                _slot: slot,
            };
            let svc = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(ConnectInfo(Peer(peer)));
                    app.clone().oneshot(req)
                },
            );
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(64 << 10)
                .serve_connection(TokioIo::new(conn), svc)
                .await;
            if let Err(e) = served {
                debug!(peer = %peer, error = %e, "web console: connection ended");
            }
        });
    }
}
