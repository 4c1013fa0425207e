//! The end of a connection: the close handshake (RFC 6455 §5.5.1, §7.1).
//!
//! Whoever closes, the session's frames stop first: none sent after that point is written,
//! so none can follow a close frame. A close frame from the peer is always answered (by
//! tungstenite, with the peer's code). A close the server starts is sent after what is queued,
//! and the peer gets a short while to answer before the socket is dropped.

use std::future::poll_fn;
use std::time::Duration;

use collab_core::session::CloseReason;
use futures_util::{SinkExt, StreamExt};
use tungstenite::protocol::CloseFrame;
use tungstenite::{Message, Utf8Bytes};

use super::{Ending, Socket};

/// How long the peer has to answer a close frame, or to take the answer to its own.
const CLOSE_HANDSHAKE: Duration = Duration::from_secs(2);

/// What stops the session's frames once the peer closed (never sent: the answer is
/// tungstenite's echo of the peer's frame).
const PEER_CLOSED: CloseReason = CloseReason {
    code: 1000,
    reason: "Closed by the peer",
};

const ABNORMAL: u16 = 1006;

impl Socket {
    /// Ends the connection as `ending` says. Returns the close code, for the log.
    pub async fn end(self, ending: Ending) -> u16 {
        match ending {
            Ending::Close(reason) => {
                self.close(reason).await;
                reason.code
            }
            Ending::PeerClosed => {
                self.answer_close().await;
                PEER_CLOSED.code
            }
            Ending::Gone => ABNORMAL,
        }
    }

    /// Sends a close frame after what is queued, and waits briefly for the peer's answer.
    pub async fn close(mut self, reason: CloseReason) {
        self.inbox.close(reason);
        let frame = CloseFrame {
            code: reason.code.into(),
            reason: Utf8Bytes::from_static(reason.reason),
        };
        let _ = tokio::time::timeout(CLOSE_HANDSHAKE, async {
            if self.ws.send(Message::Close(Some(frame))).await.is_err() {
                return;
            }
            while let Some(Ok(msg)) = self.ws.next().await {
                if matches!(msg, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }

    /// Writes tungstenite's answer to the peer's close frame (after what is queued).
    async fn answer_close(mut self) {
        self.inbox.close(PEER_CLOSED);
        let _ = tokio::time::timeout(CLOSE_HANDSHAKE, async {
            // Hands the answer to the outbox; tungstenite's flush stops there (it considers
            // the connection closed), so the outbox's queue is flushed after it.
            let _ = self.ws.flush().await;
            let _ = poll_fn(|cx| self.inbox.poll_flush(cx)).await;
        })
        .await;
    }
}
