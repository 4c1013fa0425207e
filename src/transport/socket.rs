//! One upgraded WebSocket as its connection task sees it: what the peer sends, the session's
//! close requests, pings. How it ends (the close handshake) is in `close.rs`.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use collab_core::session::{
    CloseReason, CLOSE_INVALID_UTF8, CLOSE_MESSAGE_TIMEOUT, CLOSE_PROTOCOL_ERROR, CLOSE_TOO_BIG,
};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::time::Sleep;
use tokio_tungstenite::WebSocketStream;
use tungstenite::protocol::{Role, WebSocketConfig};
use tungstenite::{Message, Utf8Bytes};

use super::io::{SocketIo, Tcp};
use super::outbox::{outbox, Bounds, Inbox, Next, Outbox};
use crate::admission::Slot;
use crate::budget::Budget;

/// A connection's read buffer, which is also the most read per call: every idle connection
/// keeps it, and a y-websocket update or awareness frame is a few hundred bytes. Larger
/// messages are read in several calls.
const READ_BUFFER_BYTES: usize = 512;

/// A connection's limits.
#[derive(Debug, Clone)]
pub struct SocketConfig {
    /// The largest message (and frame) read; a larger one is closed with 1009.
    pub max_message_bytes: usize,
    /// What may wait for a socket that does not keep up.
    pub bounds: Bounds,
    /// The memory budget the connection's queue and incomplete message count in.
    pub budget: Arc<Budget>,
}

/// One WebSocket connection: reads through tungstenite, writes through the outbox it shares
/// with the session (which holds the [`Outbox`] end).
pub struct Socket {
    pub(super) ws: WebSocketStream<SocketIo>,
    pub(super) inbox: Inbox,
    /// The deadline of the peer's incomplete message; only while there is one.
    message_deadline: Option<Pin<Box<Sleep>>>,
}

/// What happened on a connection.
#[derive(Debug)]
pub enum Event {
    /// A text message (tungstenite checked that it is UTF-8).
    Text(Utf8Bytes),
    Binary(Bytes),
    /// A ping (tungstenite answers it).
    Ping,
    Pong,
    /// The connection is over; [`Socket::end`] does what is left.
    End(Ending),
}

/// How a connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The server closes it with this reason: the session asked, or the peer broke the
    /// protocol (1002), sent invalid UTF-8 (1007) or too large a message (1009).
    Close(CloseReason),
    /// The peer sent a close frame, which is answered.
    PeerClosed,
    /// The peer went away without a close frame (1006): nothing more is sent.
    Gone,
}

impl Socket {
    /// Wraps an upgraded TCP stream, which keeps its admission slot; `read` is what the HTTP
    /// server already read past the upgrade request. The [`Outbox`] is the session's way to
    /// the socket.
    pub(super) async fn new(
        stream: TcpStream,
        slot: Slot,
        read: Vec<u8>,
        config: SocketConfig,
    ) -> (Socket, Outbox) {
        let stream = Arc::new(Tcp::new(stream, slot));
        let (outbox, inbox) = outbox(config.bounds, config.budget.account(), stream.clone());
        let limit = config.max_message_bytes;
        let ws_config = WebSocketConfig::default()
            .max_message_size(Some(limit))
            .max_frame_size(Some(limit))
            // tungstenite zero-fills its whole read buffer before every read attempt, and
            // every idle connection keeps it: small, both stay cheap (BENCHMARKS.md). Larger
            // messages still grow the buffer.
            .read_buffer_size(READ_BUFFER_BYTES)
            // Nothing to gather: tungstenite only writes pings, pongs and close frames, and
            // hands each straight to the outbox.
            .write_buffer_size(0);
        let ws = WebSocketStream::from_partially_read(
            SocketIo::new(stream, inbox.writer()),
            read,
            Role::Server,
            Some(ws_config),
        )
        .await;
        let socket = Socket {
            ws,
            inbox,
            message_deadline: None,
        };
        (socket, outbox)
    }

    /// The next event. While waiting, writes what the socket could not take from the session
    /// at once. A message the peer started must finish within `message_timeout` (passed in
    /// rather than kept: every idle connection would keep it).
    pub fn next_event<'a>(
        &'a mut self,
        message_timeout: &'a Duration,
    ) -> impl Future<Output = Event> + Send + 'a {
        // A plain poll function: an idle connection's task holds this future, and it keeps
        // nothing but the two borrows.
        poll_fn(move |cx| self.poll_event(cx, *message_timeout))
    }

    fn poll_event(&mut self, cx: &mut Context<'_>, message_timeout: Duration) -> Poll<Event> {
        // The session's close request first: nothing read after it matters.
        if let Poll::Ready(next) = self.inbox.poll_next(cx) {
            return Poll::Ready(Event::End(match next {
                Next::Close(reason) => Ending::Close(reason),
                Next::Failed => Ending::Gone,
            }));
        }
        loop {
            let next = match self.ws.poll_next_unpin(cx) {
                Poll::Ready(next) => next,
                Poll::Pending => return self.poll_message_deadline(cx, message_timeout),
            };
            let event = match next {
                Some(Ok(Message::Text(text))) => Event::Text(text),
                Some(Ok(Message::Binary(bytes))) => Event::Binary(bytes),
                Some(Ok(Message::Ping(_))) => Event::Ping,
                Some(Ok(Message::Pong(_))) => Event::Pong,
                Some(Ok(Message::Close(_))) => Event::End(Ending::PeerClosed),
                // Raw frames are only ever written.
                Some(Ok(Message::Frame(_))) => continue,
                Some(Err(e)) => Event::End(ending_for(&e)),
                None => Event::End(Ending::Gone),
            };
            return Poll::Ready(event);
        }
    }

    /// Ready with the end of the connection once the peer's incomplete message is past its
    /// deadline. Pings and pongs do not extend it: only finishing the message does.
    fn poll_message_deadline(
        &mut self,
        cx: &mut Context<'_>,
        message_timeout: Duration,
    ) -> Poll<Event> {
        let Some(since) = self.ws.get_ref().incomplete_since() else {
            self.message_deadline = None;
            return Poll::Pending;
        };
        let deadline = since + message_timeout;
        let timer = self
            .message_deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        ready!(timer.as_mut().poll(cx));
        self.message_deadline = None;
        Poll::Ready(Event::End(Ending::Close(CLOSE_MESSAGE_TIMEOUT)))
    }

    /// Sends a ping after what is queued, without waiting for the socket.
    pub async fn ping(&mut self) -> Result<(), Ending> {
        // Fed, not flushed: the outbox writes it in order.
        self.ws
            .feed(Message::Ping(Bytes::new()))
            .await
            .map_err(|_| Ending::Gone)
    }
}

/// How a read error ends the connection: a frame over the size limit (1009), a protocol
/// violation (1002) or invalid UTF-8 in a text frame (1007) is answered with a close frame;
/// a transport failure leaves nothing to answer.
fn ending_for(error: &tungstenite::Error) -> Ending {
    match error {
        tungstenite::Error::Capacity(_) => Ending::Close(CLOSE_TOO_BIG),
        tungstenite::Error::Protocol(_) => Ending::Close(CLOSE_PROTOCOL_ERROR),
        tungstenite::Error::Utf8(_) => Ending::Close(CLOSE_INVALID_UTF8),
        _ => Ending::Gone,
    }
}
