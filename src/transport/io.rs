//! The upgraded TCP stream, shared by the two parties that use it.
//!
//! The session task writes broadcast frames straight into the stream (see
//! [`super::outbox`]); the connection task reads it through tungstenite. So the
//! stream is shared (`Arc<Tcp>`: tokio's readiness-based `try_read`/`try_write` take
//! `&self`), and every write, tungstenite's included, goes through the connection's outbox,
//! which keeps frames whole and in order.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::outbox::{Wire, Writer};
use crate::admission::Slot;

/// The upgraded TCP stream, with the admission slot it holds until it closes (in the same
/// allocation: every connection has one).
pub struct Tcp {
    stream: TcpStream,
    _slot: Slot,
}

impl Tcp {
    pub(super) fn new(stream: TcpStream, slot: Slot) -> Tcp {
        Tcp {
            stream,
            _slot: slot,
        }
    }
}

impl Wire for Tcp {
    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        // `send`, not `writev`: a socket call skips the file-position lock.
        self.stream.try_write(buf)
    }

    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.stream.try_write_vectored(bufs)
    }

    fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream.poll_write_ready(cx)
    }
}

/// What tungstenite reads from and writes to: reads come from the socket, writes go through
/// the outbox. Reads are followed frame by frame ([`Inbound`]).
pub struct SocketIo {
    stream: Arc<Tcp>,
    writer: Writer,
    /// Its unfinished message's bytes are what the connection's budget account holds for it.
    inbound: Inbound,
}

impl SocketIo {
    pub(super) fn new(stream: Arc<Tcp>, writer: Writer) -> SocketIo {
        SocketIo {
            stream,
            writer,
            inbound: Inbound::default(),
        }
    }

    /// Since when the peer's current message (or frame) has been incomplete.
    pub(super) fn incomplete_since(&self) -> Option<Instant> {
        self.inbound.since
    }

    /// Follows `bytes` just read, and counts the unfinished message in the budget (a shed
    /// connection is closed by its task, which the budget wakes).
    fn follow(&mut self, bytes: &[u8]) {
        let before = held_cost(self.inbound.held);
        self.inbound.feed(bytes, Instant::now());
        let after = held_cost(self.inbound.held);
        let account = self.writer.account();
        if after > before {
            let _ = account.grow(after - before);
        } else {
            account.shrink(before - after);
        }
    }
}

/// What `held` payload bytes of an unfinished message cost: tungstenite keeps them twice, in
/// its read buffer (which grows by doubling) and in the message it assembles from fragments.
fn held_cost(held: u64) -> usize {
    usize::try_from(held).map_or(usize::MAX, |held| held.saturating_mul(2))
}

impl Drop for SocketIo {
    fn drop(&mut self) {
        self.writer.account().shrink(held_cost(self.inbound.held));
    }
}

/// The peer's frames as they are read (RFC 6455 §5.2), followed without keeping them
/// (tungstenite decodes them): whether a message or frame is incomplete, since when, and how
/// many payload bytes of the data message in progress tungstenite holds.
#[derive(Debug, Default)]
pub(super) struct Inbound {
    header: [u8; MAX_HEADER],
    header_len: u8,
    /// Whether the current frame's header was read: its payload is what comes next.
    in_payload: bool,
    /// Payload bytes of the current frame still to come (while `in_payload`).
    remaining: u64,
    frame_is_data: bool,
    frame_fin: bool,
    /// A data frame without FIN was read: its message is in progress.
    fragmented: bool,
    /// Payload bytes of the data message in progress.
    pub(super) held: u64,
    /// When the current incomplete message (or frame) started; `None` between messages.
    pub(super) since: Option<Instant>,
}

/// A client frame's longest header: 2 bytes, an 8-byte length, a 4-byte mask key.
const MAX_HEADER: usize = 14;

impl Inbound {
    /// Follows `bytes` read at `now`.
    pub(super) fn feed(&mut self, mut bytes: &[u8], now: Instant) {
        while !bytes.is_empty() {
            if self.in_payload {
                let remaining = self.remaining;
                let take = remaining.min(bytes.len() as u64);
                bytes = &bytes[take as usize..];
                if self.frame_is_data {
                    self.held += take;
                }
                self.remaining = remaining - take;
                if remaining == take {
                    self.end_frame(now);
                }
                continue;
            }
            self.since.get_or_insert(now);
            let have = usize::from(self.header_len);
            let want = header_len(&self.header[..have]).unwrap_or(2);
            let take = (want - have).min(bytes.len());
            self.header[have..have + take].copy_from_slice(&bytes[..take]);
            let have = have + take;
            // At most `MAX_HEADER`.
            self.header_len = have as u8;
            bytes = &bytes[take..];
            if header_len(&self.header[..have]) == Some(have) {
                let first = self.header[0];
                self.frame_fin = first & 0x80 != 0;
                // Continuation, text, binary (and the reserved data codes tungstenite refuses).
                self.frame_is_data = first & 0x08 == 0;
                let payload = payload_len(&self.header[..have]);
                self.header_len = 0;
                self.in_payload = true;
                self.remaining = payload;
                if payload == 0 {
                    self.end_frame(now);
                }
            }
        }
    }

    fn end_frame(&mut self, now: Instant) {
        self.in_payload = false;
        if self.frame_is_data {
            self.fragmented = !self.frame_fin;
            if self.frame_fin {
                self.held = 0;
                // The next message has a deadline of its own.
                self.since = None;
            }
        }
        if !self.fragmented {
            self.since = None;
        } else {
            self.since.get_or_insert(now);
        }
    }
}

/// The length of the header that starts `header`, once its first two bytes are there.
fn header_len(header: &[u8]) -> Option<usize> {
    let second = *header.get(1)?;
    let extended = match second & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if second & 0x80 != 0 { 4 } else { 0 };
    Some(2 + extended + mask)
}

/// The payload length of a whole header.
fn payload_len(header: &[u8]) -> u64 {
    match header[1] & 0x7f {
        126 => u64::from(u16::from_be_bytes([header[2], header[3]])),
        127 => {
            let mut len = [0; 8];
            len.copy_from_slice(&header[2..10]);
            u64::from_be_bytes(len)
        }
        n => u64::from(n),
    }
}

impl AsyncRead for SocketIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            ready!(self.stream.stream.poll_read_ready(cx))?;
            match self.stream.stream.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    self.get_mut()
                        .follow(&buf.initialized()[buf.filled().len()..][..n]);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
    use tungstenite::protocol::frame::Frame as WsFrame;

    /// A client frame (masked) as tungstenite writes it.
    fn client_frame(opcode: OpCode, len: usize, fin: bool) -> Vec<u8> {
        let mut frame = match opcode {
            OpCode::Data(_) => WsFrame::message(vec![7u8; len], opcode, fin),
            OpCode::Control(_) => WsFrame::ping(vec![7u8; len]),
        };
        frame.header_mut().mask = Some([1, 2, 3, 4]);
        let mut wire = Vec::new();
        frame.format(&mut wire).expect("a Vec takes every write");
        wire
    }

    #[test]
    fn a_message_is_incomplete_from_its_first_byte_to_its_last_fragment_whatever_pings_come() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(5);
        let binary = OpCode::Data(Data::Binary);
        let mut inbound = Inbound::default();
        // Whole messages of every header size, fed a byte at a time: nothing stays open.
        for len in [0, 5, 300, 70_000] {
            for byte in client_frame(binary, len, true) {
                inbound.feed(&[byte], t0);
            }
            assert_eq!((inbound.since, inbound.held), (None, 0), "{len}");
        }
        // A first fragment, then a ping, then the rest of a second fragment, then the end.
        inbound.feed(&client_frame(binary, 1000, false), t0);
        assert_eq!((inbound.since, inbound.held), (Some(t0), 1000));
        inbound.feed(
            &client_frame(OpCode::Control(Control::Ping), 4, true),
            later,
        );
        assert_eq!(
            inbound.since,
            Some(t0),
            "a ping does not restart the deadline"
        );
        let second = client_frame(OpCode::Data(Data::Continue), 500, false);
        inbound.feed(&second[..100], later);
        assert_eq!(inbound.since, Some(t0));
        inbound.feed(&second[100..], later);
        assert_eq!(inbound.held, 1500);
        inbound.feed(&client_frame(OpCode::Data(Data::Continue), 10, true), later);
        assert_eq!((inbound.since, inbound.held), (None, 0));
        // A partial ping alone is incomplete too; finished, it is not.
        let ping = client_frame(OpCode::Control(Control::Ping), 4, true);
        inbound.feed(&ping[..3], later);
        assert_eq!(inbound.since, Some(later));
        inbound.feed(&ping[3..], later);
        assert_eq!(inbound.since, None);
    }
}
