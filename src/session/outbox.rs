//! A connection's outbound queue, bounded in bytes.
//!
//! The session task never waits on a socket: it pushes frames into each member's outbox and
//! moves on. A member whose queued bytes pass the bound is too slow for the session; it is
//! closed with 1013 through a separate signal (its queue is, by definition, backed up) and
//! resyncs when it reconnects. Nothing is ever dropped silently.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;
use tokio::sync::{mpsc, watch};

/// A frame for one connection. Broadcast frames share their bytes.
#[derive(Debug, Clone)]
pub enum Frame {
    Text(Utf8Bytes),
    Binary(Bytes),
}

impl Frame {
    pub fn len(&self) -> usize {
        match self {
            Frame::Text(t) => t.len(),
            Frame::Binary(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn text(s: String) -> Frame {
        Frame::Text(Utf8Bytes::from(s))
    }
}

/// Why the server closes a connection (PROTOCOL §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseReason {
    pub code: u16,
    pub reason: &'static str,
}

pub const CLOSE_NORMAL: CloseReason = CloseReason {
    code: 1000,
    reason: "",
};
pub const CLOSE_GOING_AWAY: CloseReason = CloseReason {
    code: 1001,
    reason: "Server shutting down",
};
pub const CLOSE_IDLE: CloseReason = CloseReason {
    code: 1001,
    reason: "Idle timeout",
};
pub const CLOSE_INVALID_PATH: CloseReason = CloseReason {
    code: 1008,
    reason: "Invalid path",
};
pub const CLOSE_TOO_BIG: CloseReason = CloseReason {
    code: 1009,
    reason: "Message too big",
};
pub const CLOSE_INTERNAL: CloseReason = CloseReason {
    code: 1011,
    reason: "Session unavailable",
};
pub const CLOSE_SLOW: CloseReason = CloseReason {
    code: 1013,
    reason: "Slow consumer, reconnect",
};
pub const CLOSE_REPLACED: CloseReason = CloseReason {
    code: 4000,
    reason: "Replaced by a newer connection",
};

/// The queue is over its byte bound; the connection is being closed with 1013.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overflow;

/// The session's end of a connection's queue.
#[derive(Debug, Clone)]
pub struct Outbox {
    tx: mpsc::UnboundedSender<Frame>,
    queued: Arc<AtomicUsize>,
    max_bytes: usize,
    close: Arc<watch::Sender<Option<CloseReason>>>,
}

/// The connection's end: frames to write, and the close signal.
#[derive(Debug)]
pub struct Inbox {
    rx: mpsc::UnboundedReceiver<Frame>,
    queued: Arc<AtomicUsize>,
    pub close: watch::Receiver<Option<CloseReason>>,
}

/// A new queue bounded to `max_bytes` queued bytes.
pub fn outbox(max_bytes: usize) -> (Outbox, Inbox) {
    let (tx, rx) = mpsc::unbounded_channel();
    let (close_tx, close_rx) = watch::channel(None);
    let queued = Arc::new(AtomicUsize::new(0));
    (
        Outbox {
            tx,
            queued: queued.clone(),
            max_bytes,
            close: Arc::new(close_tx),
        },
        Inbox {
            rx,
            queued,
            close: close_rx,
        },
    )
}

impl Outbox {
    /// Queues a frame, or closes the connection with 1013 when the queue would pass its bound.
    pub fn send(&self, frame: Frame) -> Result<(), Overflow> {
        let len = frame.len();
        let queued = self.queued.fetch_add(len, Ordering::AcqRel) + len;
        if queued > self.max_bytes {
            self.queued.fetch_sub(len, Ordering::AcqRel);
            self.close(CLOSE_SLOW);
            return Err(Overflow);
        }
        if self.tx.send(frame).is_err() {
            self.queued.fetch_sub(len, Ordering::AcqRel);
        }
        Ok(())
    }

    /// Asks the connection to close with `reason` (the first reason wins).
    pub fn close(&self, reason: CloseReason) {
        self.close.send_if_modified(|current| {
            if current.is_none() {
                *current = Some(reason);
                true
            } else {
                false
            }
        });
    }

    /// Bytes queued and not yet written.
    pub fn queued_bytes(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }
}

impl Inbox {
    /// The next frame to write; `None` once the session dropped the outbox.
    pub async fn recv(&mut self) -> Option<Frame> {
        let frame = self.rx.recv().await?;
        self.queued.fetch_sub(frame.len(), Ordering::AcqRel);
        Some(frame)
    }

    /// A frame that is already queued, without waiting.
    pub fn try_recv(&mut self) -> Option<Frame> {
        let frame = self.rx.try_recv().ok()?;
        self.queued.fetch_sub(frame.len(), Ordering::AcqRel);
        Some(frame)
    }

    /// The close reason, once one was given.
    pub fn close_reason(&self) -> Option<CloseReason> {
        *self.close.borrow()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn overflow_closes_with_1013_and_keeps_what_was_queued() {
        let (out, mut inbox) = outbox(10);
        out.send(Frame::Binary(Bytes::from_static(b"123456")))
            .unwrap();
        assert_eq!(out.queued_bytes(), 6);
        assert_eq!(
            out.send(Frame::Binary(Bytes::from_static(b"123456"))),
            Err(Overflow)
        );
        assert_eq!(inbox.close_reason(), Some(CLOSE_SLOW));
        assert_eq!(inbox.recv().await.unwrap().len(), 6);
        assert_eq!(out.queued_bytes(), 0);
    }

    #[test]
    fn first_close_reason_wins() {
        let (out, inbox) = outbox(10);
        out.close(CLOSE_REPLACED);
        out.close(CLOSE_SLOW);
        assert_eq!(inbox.close_reason(), Some(CLOSE_REPLACED));
    }
}
