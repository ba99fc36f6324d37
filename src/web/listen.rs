//! The console's accept loop: TCP, then the same per-source penalties and
//! connection caps as the backup listener (a source blocked for failed
//! logins is blocked on both), then TLS in a task of its own under
//! [`HANDSHAKES`] and [`HANDSHAKE_TIMEOUT`], so no peer can hold the loop.

use crate::limits::SourceGuard;
use crate::server::Context;
use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::debug;

/// TLS handshakes in progress at most.
pub const HANDSHAKES: usize = 64;
/// A handshake not finished by then is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A console connection: the TLS stream and its count against its source.
pub struct Conn {
    tls: TlsStream<TcpStream>,
    _source: SourceGuard,
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }
}

/// Connections that finished TLS, for `axum::serve`.
pub struct TlsIncoming {
    rx: mpsc::Receiver<(Conn, SocketAddr)>,
    local: SocketAddr,
}

/// The peer's address, for handlers (`ConnectInfo<Peer>`).
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub SocketAddr);

impl Connected<IncomingStream<'_, TlsIncoming>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TlsIncoming>) -> Peer {
        Peer(*stream.remote_addr())
    }
}

impl TlsIncoming {
    /// Starts accepting on `listener`.
    pub fn start(
        listener: TcpListener,
        ctx: Arc<Context>,
        tls: Arc<rustls::ServerConfig>,
    ) -> TlsIncoming {
        let local = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let (tx, rx) = mpsc::channel(HANDSHAKES);
        tokio::spawn(accept_loop(listener, ctx, TlsAcceptor::from(tls), tx));
        TlsIncoming { rx, local }
    }
}

async fn accept_loop(
    listener: TcpListener,
    ctx: Arc<Context>,
    acceptor: TlsAcceptor,
    tx: mpsc::Sender<(Conn, SocketAddr)>,
) {
    let handshakes = Arc::new(Semaphore::new(HANDSHAKES));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and the like: back off rather than spin.
                debug!(error = %e, "web console: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let cfg = ctx.cfg.load();
        let guard =
            match ctx
                .limits
                .accept(&cfg.server.limits, peer.ip(), tokio::time::Instant::now())
            {
                Ok(g) => g,
                Err(why) => {
                    debug!(peer = %peer, reason = why.as_str(), "web console: connection dropped");
                    continue;
                }
            };
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            debug!(peer = %peer, "web console: too many handshakes; connection dropped");
            continue;
        };
        let (acceptor, tx) = (acceptor.clone(), tx.clone());
        tokio::spawn(async move {
            let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
            drop(permit);
            match tls {
                Ok(Ok(tls)) => {
                    let _ = tx
                        .send((
                            Conn {
                                tls,
                                _source: guard,
                            },
                            peer,
                        ))
                        .await;
                }
                Ok(Err(e)) => debug!(peer = %peer, error = %e, "web console: TLS failed"),
                Err(_) => debug!(peer = %peer, "web console: TLS handshake timed out"),
            }
        });
    }
}

impl axum::serve::Listener for TlsIncoming {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Conn, SocketAddr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accept loop is gone (the runtime is stopping).
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}
