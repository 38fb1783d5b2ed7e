//! Fewer, fuller writes: the frames that are ready together on one
//! connection leave in one write.
//!
//! A change fanned out to the 100 watch streams of a connection makes 100
//! small DATA frames, each sent by its stream's own task. Left alone, they
//! left in 100 writes (`strace`: one `writev` per delivery): h2 writes a
//! payload over 256 bytes as a write of its own when the socket takes
//! vectored writes, and tokio runs the connection's task right after the
//! stream task that woke it, before the other streams have queued theirs.
//! This wrapper changes both, for every accepted connection:
//!
//! - it says it takes no vectored writes, so h2 copies payloads of up to
//!   1 KiB into its 16 KiB write buffer (a copy of a few hundred bytes,
//!   instead of a system call);
//! - the first write of each flush round yields once (the task wakes
//!   itself and goes to the back of the run queue), so the stream tasks
//!   woken by the same change queue their frames first, and the round
//!   writes them together.
//!
//! A lone frame waits one pass of the scheduler, microseconds; TCP_NODELAY
//! stays on, so nothing waits for a timer.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// A connection whose writes are coalesced (see the module docs).
pub(super) struct Coalescing<IO> {
    io: IO,
    /// This flush round has yielded once already.
    yielded: bool,
}

impl<IO> Coalescing<IO> {
    pub(super) fn new(io: IO) -> Coalescing<IO> {
        Coalescing { io, yielded: false }
    }

    /// `Pending` (after waking itself) the first time in a flush round.
    fn defer(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.yielded {
            Poll::Ready(())
        } else {
            self.yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Coalescing<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Coalescing<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        std::task::ready!(self.defer(cx));
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        std::task::ready!(self.defer(cx));
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    /// No: h2 then buffers small payloads instead of writing each apart.
    fn is_write_vectored(&self) -> bool {
        false
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let flushed = Pin::new(&mut self.io).poll_flush(cx);
        if flushed.is_ready() {
            // The round is over: the next write starts another.
            self.yielded = false;
        }
        flushed
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<IO: Connected> Connected for Coalescing<IO> {
    type ConnectInfo = IO::ConnectInfo;

    // Keeps the peer address (and TLS identity) in request extensions.
    fn connect_info(&self) -> IO::ConnectInfo {
        self.io.connect_info()
    }
}
