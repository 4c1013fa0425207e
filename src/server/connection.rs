//! One WebSocket connection: a task that reads frames and hands them to the session, and
//! writes what the socket did not take when the session wrote to it (see `session::outbox`).
//!
//! Decoding happens here, in the connection's task, so a session task only ever sees valid
//! messages and bad input costs the session nothing. The loop also owns the connection's
//! timers: the JSON idle timeout on `/ws` (Qt clients must never get protocol pings) and the
//! protocol ping on `/yjs`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tracing::{info, warn};
use tungstenite::protocol::CloseFrame;
use tungstenite::{Message, Utf8Bytes};

use collab_core::doc::PeerId;
use collab_core::protocol::json::{self, ErrorCode, ProtocolError};
use collab_core::protocol::yjs;
use collab_core::session::{
    CloseReason, ConnKind, CLOSE_IDLE, CLOSE_INTERNAL, CLOSE_INVALID_UTF8, CLOSE_PROTOCOL_ERROR,
    CLOSE_TOO_BIG,
};

use super::AppState;
use crate::session::{JoinRequest, SessionHandle, SessionMsg};
use crate::transport::{Frame, Inbox, Next, Outbox, SocketIo};

/// A connection's WebSocket, as tungstenite reads it.
pub type Socket = WebSocketStream<SocketIo>;

/// How long to wait for the peer's answer to our close frame.
const CLOSE_HANDSHAKE: Duration = Duration::from_secs(2);

/// How a connection ends.
enum Ending {
    /// The server closes it: a close frame with this reason is sent.
    Close(CloseReason),
    /// The peer sent a close frame: tungstenite queued the answer (RFC 6455 §5.5.1), which
    /// is flushed before the socket is dropped.
    PeerClosed,
    /// The peer went away without a close frame (1006): nothing more is sent.
    Gone(u16),
}

/// What one turn of a connection's loop leads to.
enum Step {
    Continue,
    Forward(SessionMsg),
    Ping,
    End(Ending),
}

const NORMAL: u16 = 1000;
const ABNORMAL: u16 = 1006;

/// Who is connecting, once the path was validated.
pub struct ConnectionTarget {
    pub session: String,
    pub user: Option<Arc<str>>,
    pub kind: ConnKind,
}

/// Sends a close frame after what is queued, and waits briefly for the peer's answer. The
/// inbox is held until then: without it nothing reaches the socket.
pub async fn close(mut socket: Socket, inbox: Inbox, reason: CloseReason) {
    let frame = CloseFrame {
        code: reason.code.into(),
        reason: Utf8Bytes::from_static(reason.reason),
    };
    let _ = tokio::time::timeout(CLOSE_HANDSHAKE, async {
        if socket.send(Message::Close(Some(frame))).await.is_err() {
            return;
        }
        while let Some(Ok(msg)) = socket.next().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
    drop(inbox);
}

/// Joins the connection's session. On failure the client is told and the socket closed, and
/// `None` is returned.
///
/// Runs in the connection's set-up task: thousands of connections sit idle, and a future is
/// as large as its largest state, so the task that serves them holds none of this.
pub async fn open(
    socket: Socket,
    outbox: Outbox,
    inbox: Inbox,
    state: AppState,
    target: ConnectionTarget,
) -> Option<(Connection, Socket, Inbox)> {
    let peer = state.registry.next_peer_id();
    let request = JoinRequest {
        peer,
        kind: target.kind,
        user: target.user.clone(),
        outbox: outbox.clone(),
    };
    let session = match state.registry.join(&target.session, request).await {
        Ok(handle) => handle,
        Err(e) => {
            warn!(session = %target.session, error = ?e, "join failed");
            if target.kind.speaks_json() {
                let error =
                    ProtocolError::new(ErrorCode::Unavailable, "the session could not be loaded");
                let _ = outbox.send(&Frame::text(&json::encode_error(&error)));
            }
            close(socket, inbox, CLOSE_INTERNAL).await;
            return None;
        }
    };
    let user: Arc<str> = target.user.unwrap_or_else(|| Arc::from("-"));
    info!(session = %target.session, user = %user, peer, kind = ?target.kind, "connection opened");
    let connection = Connection {
        state,
        session,
        peer,
        user,
        kind: target.kind,
        outbox,
    };
    Some((connection, socket, inbox))
}

/// A joined connection.
pub struct Connection {
    state: AppState,
    session: SessionHandle,
    peer: PeerId,
    user: Arc<str>,
    kind: ConnKind,
    outbox: Outbox,
}

impl Connection {
    /// Serves the connection until it closes, then leaves the session.
    ///
    /// One flat loop: every idle connection's task holds this future, and each nested async
    /// call would keep its own copy of the socket. Not an `async fn`: its arguments would be
    /// stored twice (rust-lang/rust#62958); the block uses what it captured in place.
    /// Shutdown arrives through the inbox (the session closes its members with 1001).
    #[allow(clippy::manual_async_fn)] // see above: an `async fn` would be larger
    pub fn serve(self, mut socket: Socket, mut inbox: Inbox) -> impl Future<Output = ()> + Send {
        async move {
            // One timer: the JSON idle timeout on `/ws` (reset by every frame received), the
            // protocol ping on `/yjs` (a peer that has not answered one by the next is dropped).
            let period = match self.kind {
                ConnKind::Yjs => self.state.config.yjs_ping_interval,
                ConnKind::Legacy | ConnKind::LegacyYjs => self.state.config.idle_timeout,
            };
            let timer = tokio::time::sleep(period);
            tokio::pin!(timer);
            let mut pong_due = false;
            let ending = loop {
                // The select only decides; what must be awaited comes after it, so that the
                // select's state and the awaited future do not both stay in the task.
                let step = tokio::select! {
                    biased;
                    // Also writes what the socket could not take from the session at once.
                    next = inbox.next() => match next {
                        Next::Close(reason) => Step::End(Ending::Close(reason)),
                        Next::Failed => Step::End(Ending::Gone(ABNORMAL)),
                    },
                    incoming = socket.next() => {
                        if self.kind != ConnKind::Yjs {
                            timer.as_mut().reset(Instant::now() + period);
                        }
                        self.on_incoming(incoming, &mut pong_due)
                    }
                    _ = &mut timer => {
                        if self.kind != ConnKind::Yjs || pong_due {
                            Step::End(Ending::Close(CLOSE_IDLE))
                        } else {
                            pong_due = true;
                            timer.as_mut().reset(Instant::now() + period);
                            Step::Ping
                        }
                    }
                };
                match step {
                    Step::Continue => {}
                    Step::Forward(msg) => {
                        if let Some(wait) = self.session.send_or_wait(msg) {
                            wait.await;
                        }
                    }
                    // Fed, not flushed: the outbox writes it in order, without waiting here.
                    Step::Ping => {
                        if socket.feed(Message::Ping(Bytes::new())).await.is_err() {
                            break Ending::Gone(ABNORMAL);
                        }
                    }
                    Step::End(ending) => break ending,
                }
            };
            let code = match ending {
                Ending::Close(reason) => {
                    Box::pin(close(socket, inbox, reason)).await;
                    reason.code
                }
                Ending::PeerClosed => {
                    let _ = tokio::time::timeout(CLOSE_HANDSHAKE, socket.flush()).await;
                    drop(inbox);
                    NORMAL
                }
                Ending::Gone(code) => code,
            };
            if let Some(wait) = self.session.send_or_wait(SessionMsg::Leave(self.peer)) {
                wait.await;
            }
            info!(session = %self.session.id, user = %self.user, peer = self.peer, code, "connection closed");
        }
    }

    /// What a frame from the peer (or its absence) leads to.
    fn on_incoming(
        &self,
        incoming: Option<Result<Message, tungstenite::Error>>,
        pong_due: &mut bool,
    ) -> Step {
        let forward = match incoming {
            Some(Ok(Message::Close(_))) => return Step::End(Ending::PeerClosed),
            None => return Step::End(Ending::Gone(ABNORMAL)),
            Some(Err(e)) => return Step::End(ending_for(&e)),
            Some(Ok(Message::Text(text))) => self.on_text(&text),
            Some(Ok(Message::Binary(bytes))) => self.on_binary(&bytes),
            Some(Ok(Message::Pong(_))) => {
                *pong_due = false;
                None
            }
            Some(Ok(Message::Ping(_) | Message::Frame(_))) => None,
        };
        forward.map_or(Step::Continue, Step::Forward)
    }

    /// The session message a text frame asks for, if it is valid.
    fn on_text(&self, text: &str) -> Option<SessionMsg> {
        if self.kind == ConnKind::Yjs {
            self.reject(ProtocolError::new(
                ErrorCode::BadMessage,
                "y-websocket frames are binary",
            ));
            return None;
        }
        match json::parse_client_message(text) {
            Ok(msg) => Some(SessionMsg::Json(self.peer, Box::new(msg))),
            Err(e) => {
                self.reject(e);
                None
            }
        }
    }

    /// The session message a binary frame asks for, if it is valid.
    fn on_binary(&self, bytes: &[u8]) -> Option<SessionMsg> {
        if self.kind == ConnKind::Legacy {
            self.reject(ProtocolError::new(
                ErrorCode::BadMessage,
                "binary frames need a Yjs connection (?yjs=1)",
            ));
            return None;
        }
        match yjs::decode(bytes) {
            Ok(msg) => Some(SessionMsg::Yjs(self.peer, Box::new(msg))),
            Err(e) => {
                self.reject(ProtocolError::new(ErrorCode::BadMessage, e.to_string()));
                None
            }
        }
    }

    fn reject(&self, error: ProtocolError) {
        metrics::counter!("collab_rejected_input_total").increment(1);
        if self.state.rejected_warnings.allow() {
            warn!(session = %self.session.id, peer = self.peer, error = %error, "rejected input");
        }
        if self.kind.speaks_json() {
            let _ = self.outbox.send(&Frame::text(&json::encode_error(&error)));
        }
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
        _ => Ending::Gone(ABNORMAL),
    }
}
