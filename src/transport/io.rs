//! The upgraded TCP stream, shared by the two parties that use it.
//!
//! The session task writes broadcast frames straight into the stream (see
//! [`super::outbox`]); the connection task reads it through tungstenite. So the
//! stream is shared (`Arc<TcpStream>`: tokio's readiness-based `try_read`/`try_write` take
//! `&self`), and every write, tungstenite's included, goes through the connection's outbox,
//! which keeps frames whole and in order.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::outbox::{Wire, Writer};

impl Wire for TcpStream {
    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        // `send`, not `writev`: a socket call skips the file-position lock.
        TcpStream::try_write(self, buf)
    }

    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        TcpStream::try_write_vectored(self, bufs)
    }

    fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_write_ready(cx)
    }
}

/// What tungstenite reads from and writes to: reads come from the socket, writes go through
/// the outbox.
pub struct SocketIo {
    stream: Arc<TcpStream>,
    writer: Writer,
}

impl SocketIo {
    pub(super) fn new(stream: Arc<TcpStream>, writer: Writer) -> SocketIo {
        SocketIo { stream, writer }
    }
}

impl AsyncRead for SocketIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            ready!(self.stream.poll_read_ready(cx))?;
            match self.stream.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                // The readiness was stale; `try_read` cleared it, so the next poll waits.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for SocketIo {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(self.get_mut().writer.write(buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.writer.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The socket closes when its last handle is dropped; what is queued goes first.
        self.writer.poll_flush(cx)
    }
}
