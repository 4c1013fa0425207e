//! One WebSocket connection's serving task: it reads messages from the socket, decodes them
//! and hands them to the session. What the session sends goes through the connection's
//! outbox, straight into the socket (see `transport`).
//!
//! Decoding happens here, in the connection's task, so a session task only ever sees valid
//! messages and bad input costs the session nothing. The loop also owns the connection's
//! timers: the JSON idle timeout on `/ws` (Qt clients must never get protocol pings) and the
//! protocol ping on `/yjs`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::time::Instant;
use tracing::{info, warn};

use collab_core::doc::PeerId;
use collab_core::protocol::json::{self, ErrorCode, ProtocolError};
use collab_core::protocol::yjs;
use collab_core::session::{CloseReason, ConnKind, CLOSE_IDLE};

use crate::auth::LiveGrant;
use crate::config::Config;
use crate::session::{FromPeer, SessionHandle, SessionMsg};
use crate::transport::{Ending, Event, Frame, Outbox, Socket};
use crate::warn_limit::WarnLimiter;

/// What one turn of a connection's loop leads to.
enum Step {
    Continue,
    Forward(SessionMsg),
    Ping,
    End(Ending),
}

/// Who is connecting, once the path was validated.
pub struct ConnectionTarget {
    pub session: String,
    pub user: Option<Arc<str>>,
    pub kind: ConnKind,
}

/// A joined connection.
pub struct Connection {
    /// Only what the loop reads, not the whole `AppState`: every idle connection's task
    /// holds these.
    pub(super) config: Arc<Config>,
    pub(super) rejected_warnings: Arc<WarnLimiter>,
    pub(super) session: SessionHandle,
    pub(super) peer: PeerId,
    pub(super) user: Arc<str>,
    pub(super) kind: ConnKind,
    pub(super) outbox: Outbox,
    /// The token's expiry and revocation, in authenticated mode.
    pub(super) live: Option<Box<LiveGrant>>,
}

impl Connection {
    /// Serves the connection until it closes, then leaves the session.
    ///
    /// One flat loop: every idle connection's task holds this future, and each nested async
    /// call would keep its own copy of the socket. Not an `async fn`: its arguments would be
    /// stored twice (rust-lang/rust#62958); the block uses what it captured in place.
    /// Shutdown arrives as a socket event (the session closes its members with 1001).
    #[allow(clippy::manual_async_fn)] // see above: an `async fn` would be larger
    pub fn serve(mut self, mut socket: Socket) -> impl Future<Output = ()> + Send {
        async move {
            // One timer: the JSON idle timeout on `/ws` (reset by every data message received:
            // the desktop client's JSON ping is one), the protocol ping on `/yjs` (a peer that
            // has not answered one by the next is dropped; a silent viewer answers them).
            let period = match self.kind {
                ConnKind::Yjs => self.config.yjs_ping_interval,
                ConnKind::Legacy | ConnKind::LegacyYjs => self.config.idle_timeout,
            };
            let timer = tokio::time::sleep(period);
            tokio::pin!(timer);
            let mut pong_due = false;
            // Made once and boxed: an unauthenticated connection's task holds none of it.
            let mut token_end: Option<TokenEnd> = self
                .live
                .take()
                .map(|live| Box::pin(live.ended()) as TokenEnd);
            let ending = loop {
                // The select only decides; what must be awaited comes after it, so that the
                // select's state and the awaited future do not both stay in the task.
                let step = tokio::select! {
                    biased;
                    // Also writes what the socket could not take from the session at once.
                    event = socket.next_event(&self.config.message_timeout) => {
                        // Only a whole data message shows the peer is there: its pings, or a
                        // message it started and never finishes, cannot hold it open.
                        let data = matches!(event, Event::Text(_) | Event::Binary(_));
                        if self.kind != ConnKind::Yjs && data {
                            timer.as_mut().reset(Instant::now() + period);
                        }
                        self.on_event(event, &mut pong_due)
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
                    reason = token_ended(&mut token_end), if token_end.is_some() => Step::End(Ending::Close(reason)),
                };
                match step {
                    Step::Continue => {}
                    Step::Forward(msg) => {
                        if let Some(wait) = self.session.send_or_wait(msg) {
                            wait.await;
                        }
                    }
                    Step::Ping => {
                        if let Err(ending) = socket.ping().await {
                            break ending;
                        }
                    }
                    Step::End(ending) => break ending,
                }
            };
            // Boxed: the close handshake's state would otherwise be part of every idle task.
            let code = Box::pin(socket.end(ending)).await;
            if let Some(wait) = self.session.send_or_wait(SessionMsg::Leave(self.peer)) {
                wait.await;
            }
            info!(session = %self.session.id, user = %self.user, peer = self.peer, code, "connection closed");
        }
    }

    /// What an event on the socket leads to.
    fn on_event(&self, event: Event, pong_due: &mut bool) -> Step {
        let forward = match event {
            Event::Text(text) => self.on_text(&text),
            Event::Binary(bytes) => self.on_binary(&bytes),
            Event::Pong => {
                *pong_due = false;
                None
            }
            Event::Ping => None,
            Event::End(ending) => return Step::End(ending),
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
            Ok(message) => Some(SessionMsg::Json(Box::new(FromPeer {
                peer: self.peer,
                message,
            }))),
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
            Ok(message) => Some(SessionMsg::Yjs(Box::new(FromPeer {
                peer: self.peer,
                message,
            }))),
            Err(e) => {
                self.reject(ProtocolError::new(ErrorCode::BadMessage, e.to_string()));
                None
            }
        }
    }

    fn reject(&self, error: ProtocolError) {
        metrics::counter!("collab_rejected_input_total").increment(1);
        if self.rejected_warnings.allow() {
            warn!(session = %self.session.id, peer = self.peer, error = %error, "rejected input");
        }
        if self.kind.speaks_json() {
            let _ = self.outbox.send(&Frame::text(&json::encode_error(&error)));
        }
    }
}

/// The end of a connection's token: its expiry or revocation.
type TokenEnd = Pin<Box<dyn Future<Output = CloseReason> + Send>>;

/// Waits for the connection's token to end (never, without one).
async fn token_ended(end: &mut Option<TokenEnd>) -> CloseReason {
    match end {
        Some(end) => end.as_mut().await,
        None => std::future::pending().await,
    }
}
