//! Accepted TLS connections as a stream (for tonic) and as an axum
//! `Listener`, handshakes running concurrently.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{net::TcpListener, task::JoinSet, time::Sleep};
use tokio_stream::{Stream, StreamExt as _};

use crate::{ServerTls, TlsConn, TlsConnectInfo};

/// How many handshakes may be in progress at once by default. Past that the
/// listener is not polled (new clients wait in the kernel's backlog) until
/// one finishes or times out: slow or silent clients cannot pile up tasks.
pub const DEFAULT_MAX_HANDSHAKES: usize = 256;

/// How long to stop accepting after an error that is not one connection's
/// (e.g. out of file descriptors), instead of spinning on it.
const ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

impl ServerTls {
    /// Turns a bound listener into a stream of TLS connections, for tonic's
    /// `serve_with_incoming_shutdown` or, as an axum `Listener`, for
    /// `axum::serve`. Sets `TCP_NODELAY` on each socket.
    pub fn incoming(&self, listener: TcpListener) -> TlsIncoming {
        TlsIncoming {
            listener,
            tls: self.clone(),
            handshakes: JoinSet::new(),
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            backoff: None,
        }
    }
}

/// TLS connections accepted from a [`TcpListener`].
///
/// Each handshake runs in its own task, so one slow client never holds up
/// the next; at most [`TlsIncoming::max_handshakes`] run at once. A failed
/// or timed-out handshake is logged at debug and skipped: the stream yields
/// only connections that completed their handshake, and never ends (its
/// `Err` case is not produced today; it keeps the shape of tonic's
/// `TcpIncoming`). Dropping it closes the listener and cuts the handshakes
/// still in progress.
#[derive(Debug)]
pub struct TlsIncoming {
    listener: TcpListener,
    tls: ServerTls,
    /// The handshakes in progress; owned here, so they end with the stream.
    handshakes: JoinSet<(SocketAddr, io::Result<TlsConn>)>,
    max_handshakes: usize,
    /// Set after an accept error that is not one connection's; accepting
    /// resumes when it fires.
    backoff: Option<Pin<Box<Sleep>>>,
}

impl TlsIncoming {
    /// Sets how many handshakes may be in progress at once (default
    /// [`DEFAULT_MAX_HANDSHAKES`]; at least 1).
    pub fn max_handshakes(mut self, max: usize) -> TlsIncoming {
        self.max_handshakes = max.max(1);
        self
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts sockets while there is room, starting a handshake for each.
    fn poll_accept(&mut self, cx: &mut Context<'_>) {
        if let Some(backoff) = &mut self.backoff {
            if backoff.as_mut().poll(cx).is_pending() {
                return;
            }
            self.backoff = None;
        }
        while self.handshakes.len() < self.max_handshakes {
            match self.listener.poll_accept(cx) {
                Poll::Ready(Ok((tcp, addr))) => {
                    if let Err(err) = tcp.set_nodelay(true) {
                        tracing::debug!(%addr, error = %err, "cannot set TCP_NODELAY");
                    }
                    let handshake = self.tls.accept_conn(tcp);
                    self.handshakes.spawn(async move { (addr, handshake.await) });
                }
                // One connection's trouble (it went away before we took it).
                Poll::Ready(Err(err)) if is_connection_error(&err) => {}
                Poll::Ready(Err(err)) => {
                    tracing::warn!(error = %err, "cannot accept connections; trying again in 1 s");
                    let mut backoff = Box::pin(tokio::time::sleep(ACCEPT_BACKOFF));
                    // Registers the waker, so that this stream is polled again.
                    if backoff.as_mut().poll(cx).is_pending() {
                        self.backoff = Some(backoff);
                    }
                    return;
                }
                Poll::Pending => return,
            }
        }
    }
}

/// Errors that concern one connection, not the listener (as hyper and axum
/// classify them).
fn is_connection_error(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

impl Stream for TlsIncoming {
    type Item = io::Result<TlsConn>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        // Accept first, then look for finished handshakes: `JoinSet` only
        // registers for wake-ups while it holds tasks, so it must be polled
        // after this round's spawns.
        this.poll_accept(cx);
        loop {
            match this.handshakes.poll_join_next(cx) {
                Poll::Ready(Some(Ok((_, Ok(conn))))) => return Poll::Ready(Some(Ok(conn))),
                Poll::Ready(Some(Ok((addr, Err(err))))) => {
                    tracing::debug!(%addr, error = %err, "TLS handshake failed");
                }
                Poll::Ready(Some(Err(err))) => {
                    tracing::warn!(error = %err, "TLS handshake task failed");
                }
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl axum::serve::Listener for TlsIncoming {
    type Io = TlsConn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TlsConn, SocketAddr) {
        loop {
            match self.next().await {
                Some(Ok(conn)) => {
                    let addr = conn.connect_info().remote_addr();
                    return (conn, addr);
                }
                Some(Err(err)) => tracing::debug!(error = %err, "TLS accept failed"),
                // The stream never ends; if it did, wait rather than spin.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        TlsIncoming::local_addr(self)
    }
}

/// `router.into_make_service_with_connect_info::<TlsConnectInfo>()` over a
/// [`TlsIncoming`]: handlers take `ConnectInfo<TlsConnectInfo>`.
impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsIncoming>> for TlsConnectInfo {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsIncoming>) -> TlsConnectInfo {
        stream.io().connect_info().clone()
    }
}
