//! One WebSocket connection: a single task that reads frames, hands them to the session, and
//! writes what the session queued for it.
//!
//! Decoding happens here, in the connection's task, so a session task only ever sees valid
//! messages and bad input costs the session nothing. The loop also owns the connection's
//! timers: the JSON idle timeout on `/ws` (Qt clients must never get protocol pings) and the
//! protocol ping on `/yjs`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::SinkExt;
use tokio::time::Instant;
use tracing::{info, warn};

use super::{AppState, ConnectionGuard};
use crate::doc::PeerId;
use crate::protocol::json::{self, ErrorCode, ProtocolError};
use crate::protocol::yjs;
use crate::session::outbox::Next;
use crate::session::outbox::{
    CloseReason, CLOSE_GOING_AWAY, CLOSE_IDLE, CLOSE_INTERNAL, CLOSE_TOO_BIG,
};
use crate::session::{
    outbox, ConnKind, Frame, Inbox, JoinRequest, Outbox, SessionHandle, SessionMsg,
};

/// How long to wait for the peer's answer to our close frame.
const CLOSE_HANDSHAKE: Duration = Duration::from_secs(2);

/// Who is connecting, once the path was validated.
pub struct ConnectionTarget {
    pub session: String,
    pub user: Option<Arc<str>>,
    pub kind: ConnKind,
}

/// Sends a close frame and waits briefly for the peer's answer.
pub async fn close(mut socket: WebSocket, reason: CloseReason) {
    let frame = CloseFrame {
        code: reason.code,
        reason: Utf8Bytes::from_static(reason.reason),
    };
    if socket.send(Message::Close(Some(frame))).await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(CLOSE_HANDSHAKE, async {
        while let Some(Ok(msg)) = socket.recv().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

/// Joins the connection's session. On failure the client is told and the socket closed, and
/// `None` is returned.
///
/// Thousands of connections sit idle in their tasks, and a future is as large as its largest
/// state: the caller awaits this one in its own allocation, freed once joined, so that the
/// task keeps only what serving needs.
pub async fn open(
    mut socket: WebSocket,
    state: AppState,
    target: ConnectionTarget,
) -> Option<(Connection, WebSocket, Inbox)> {
    let guard = state.connections.enter();
    let peer = state.registry.next_peer_id();
    let (outbox, inbox) = outbox(state.config.max_queue_bytes);
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
            drop(inbox);
            if target.kind.speaks_json() {
                let error =
                    ProtocolError::new(ErrorCode::Unavailable, "the session could not be loaded");
                let text = Utf8Bytes::from(json::encode_error(&error));
                let _ = socket.send(Message::Text(text)).await;
            }
            Box::pin(close(socket, CLOSE_INTERNAL)).await;
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
        _guard: guard,
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
    _guard: ConnectionGuard,
}

impl Connection {
    /// Serves the connection until it closes, then leaves the session.
    pub async fn serve(mut self, socket: WebSocket, inbox: Inbox) {
        let reason = self.run(socket, inbox).await;
        let _ = self.session.send(SessionMsg::Leave(self.peer)).await;
        info!(session = %self.session.id, user = %self.user, peer = self.peer, code = reason.code, "connection closed");
    }

    async fn run(&mut self, mut socket: WebSocket, mut inbox: Inbox) -> CloseReason {
        let mut shutdown = self.state.shutdown.clone();
        // Created once, not per loop turn: every turn (one per frame written) would otherwise
        // register a new waiter and a new timer.
        let shutdown = shutdown.changed();
        tokio::pin!(shutdown);
        let idle_timeout = self.state.config.idle_timeout;
        let idle = tokio::time::sleep(idle_timeout);
        tokio::pin!(idle);
        // Protocol pings on `/yjs`: a peer that has not answered one by the next is dropped.
        let ping_interval = self.state.config.yjs_ping_interval;
        let mut ping = tokio::time::interval_at(Instant::now() + ping_interval, ping_interval);
        let mut pong_due = false;
        let reason = loop {
            tokio::select! {
                biased;
                next = inbox.next() => match next {
                    Next::Close(reason) => break reason,
                    Next::Ended => break CLOSE_INTERNAL,
                    Next::Write(frame) => {
                        if write_queued(&mut socket, frame, &mut inbox).await.is_err() {
                            return CLOSE_GOING_AWAY;
                        }
                    }
                },
                _ = &mut shutdown => break CLOSE_GOING_AWAY,
                incoming = socket.recv() => {
                    if self.kind != ConnKind::Yjs {
                        idle.as_mut().reset(Instant::now() + idle_timeout);
                    }
                    match incoming {
                        None | Some(Ok(Message::Close(_))) => return CloseReason { code: 1000, reason: "" },
                        Some(Err(e)) => {
                            if is_too_big(&e) {
                                break CLOSE_TOO_BIG;
                            }
                            return CloseReason { code: 1006, reason: "" };
                        }
                        Some(Ok(Message::Text(text))) => self.on_text(&text).await,
                        Some(Ok(Message::Binary(bytes))) => self.on_binary(&bytes).await,
                        Some(Ok(Message::Pong(_))) => pong_due = false,
                        Some(Ok(Message::Ping(_))) => {}
                    }
                }
                _ = &mut idle, if self.kind != ConnKind::Yjs => break CLOSE_IDLE,
                _ = ping.tick(), if self.kind == ConnKind::Yjs => {
                    if pong_due {
                        break CLOSE_IDLE;
                    }
                    pong_due = true;
                    if socket.send(Message::Ping(Default::default())).await.is_err() {
                        return CLOSE_GOING_AWAY;
                    }
                }
            }
        };
        Box::pin(close(socket, reason)).await;
        reason
    }

    async fn on_text(&mut self, text: &str) {
        if self.kind == ConnKind::Yjs {
            self.reject(ProtocolError::new(
                ErrorCode::BadMessage,
                "y-websocket frames are binary",
            ));
            return;
        }
        match json::parse_client_message(text) {
            Ok(msg) => {
                let _ = self.session.send(SessionMsg::Legacy(self.peer, msg)).await;
            }
            Err(e) => self.reject(e),
        }
    }

    async fn on_binary(&mut self, bytes: &[u8]) {
        if self.kind == ConnKind::Legacy {
            self.reject(ProtocolError::new(
                ErrorCode::BadMessage,
                "binary frames need a Yjs connection (?yjs=1)",
            ));
            return;
        }
        match yjs::decode(bytes) {
            Ok(msg) => {
                let _ = self.session.send(SessionMsg::Yjs(self.peer, msg)).await;
            }
            Err(e) => self.reject(ProtocolError::new(ErrorCode::BadMessage, e.to_string())),
        }
    }

    fn reject(&self, error: ProtocolError) {
        metrics::counter!("collab_rejected_input_total").increment(1);
        if self.state.rejected_warnings.allow() {
            warn!(session = %self.session.id, peer = self.peer, error = %error, "rejected input");
        }
        if self.kind.speaks_json() {
            let _ = self.outbox.send(Frame::text(json::encode_error(&error)));
        }
    }
}

/// Most frames written per flush.
const FRAMES_PER_FLUSH: usize = 64;

/// Writes `first` and whatever else is already queued, then flushes once: a burst of
/// broadcasts costs one write system call, not one per frame.
async fn write_queued(
    socket: &mut WebSocket,
    first: Frame,
    inbox: &mut Inbox,
) -> Result<(), axum::Error> {
    socket.feed(into_message(first)).await?;
    for _ in 1..FRAMES_PER_FLUSH {
        let Some(frame) = inbox.try_recv() else { break };
        socket.feed(into_message(frame)).await?;
    }
    socket.flush().await
}

fn into_message(frame: Frame) -> Message {
    match frame {
        Frame::Text(t) => Message::Text(t),
        Frame::Binary(b) => Message::Binary(b),
    }
}

/// Whether a receive error is tungstenite's "message/frame larger than the limit".
fn is_too_big(error: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(tungstenite::Error::Capacity(_)) = e.downcast_ref::<tungstenite::Error>() {
            return true;
        }
        source = e.source();
    }
    false
}
