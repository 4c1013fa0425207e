//! The TCP stream while it speaks HTTP, before any upgrade: a write that stays blocked longer
//! than the write timeout fails, so a peer that stops reading its responses loses its
//! connection instead of holding it (and its admission slot) for ever. tokio-io-timeout does
//! this too, but its stream cannot be unpinned to hand the bare `TcpStream` to an upgrade.

use std::future::Future;
use std::io::{self, IoSlice};
use std::net::IpAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

use crate::admission::Slot;

/// A TCP stream whose writes may be blocked at most `write_timeout` in a row, with the
/// connection's admission slot.
pub struct HttpStream {
    stream: TcpStream,
    write_timeout: Duration,
    /// Armed while a write is blocked; boxed, so the stream stays `Unpin` and an idle
    /// connection holds no timer.
    blocked: Option<Pin<Box<Sleep>>>,
    slot: Slot,
}

impl HttpStream {
    pub fn new(stream: TcpStream, write_timeout: Duration, slot: Slot) -> HttpStream {
        HttpStream {
            stream,
            write_timeout,
            blocked: None,
            slot,
        }
    }

    /// The client the connection counts against.
    pub fn client(&self) -> IpAddr {
        self.slot.client()
    }

    /// The bare stream and its slot, for an upgraded connection (which has limits of its own).
    pub fn into_parts(self) -> (TcpStream, Slot) {
        (self.stream, self.slot)
    }

    /// After a write operation answered `result`: a blocked one waits for the deadline too,
    /// and fails once it passed; any other ends the blockage.
    fn deadline<T>(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if result.is_ready() {
            self.blocked = None;
            return result;
        }
        let timeout = self.write_timeout;
        let blocked = self
            .blocked
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match blocked.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the peer did not read the response in time",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for HttpStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for HttpStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.deadline(cx, result)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.deadline(cx, result)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.stream).poll_flush(cx);
        this.deadline(cx, result)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.stream).poll_shutdown(cx);
        this.deadline(cx, result)
    }
}
