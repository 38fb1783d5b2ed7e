//! Connections that can be cut from outside, for the end of the drain.
//!
//! tonic's graceful shutdown waits for every call to finish, and runs each
//! connection in its own task that outlives `serve`. A watch stream never
//! finishes, so without this a server whose drain timed out would keep
//! serving its open streams after `serve` returned. Each accepted socket is
//! wrapped so that, once the abort signal fires, its next read or write
//! fails; hyper then drops the connection and its task ends, and the
//! client sees a lost connection (`UNAVAILABLE`) and reconnects elsewhere.

use std::{
    future::Future,
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

use crate::shutdown::Shutdown;

/// An accepted connection that fails all I/O once `abort` fires.
pub(super) struct Abortable<IO> {
    io: IO,
    /// Resolves when the drain deadline has passed. Polled on every read
    /// (hyper always has a read pending on a live HTTP/2 connection), which
    /// registers the connection task's waker with the signal.
    abort: Pin<Box<dyn Future<Output = ()> + Send>>,
    aborted: bool,
}

impl<IO> Abortable<IO> {
    pub(super) fn new(io: IO, abort: Shutdown) -> Abortable<IO> {
        Abortable {
            io,
            abort: Box::pin(async move { abort.wait().await }),
            aborted: false,
        }
    }

    /// `Err` once the abort signal has fired.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if !self.aborted && self.abort.as_mut().poll(cx).is_ready() {
            self.aborted = true;
        }
        if self.aborted {
            Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "server shut down: drain deadline passed",
            ))
        } else {
            Ok(())
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Abortable<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Abortable<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Closing is always allowed: it is what an abort leads to.
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<IO: Connected> Connected for Abortable<IO> {
    type ConnectInfo = IO::ConnectInfo;

    // Keeps the peer address in request extensions, as without the wrapper.
    fn connect_info(&self) -> IO::ConnectInfo {
        self.io.connect_info()
    }
}
