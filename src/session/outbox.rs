//! A connection's outbound queue, bounded in bytes.
//!
//! The session task never waits on a socket: it pushes frames into each member's outbox and
//! moves on. A member whose queued bytes pass the bound is too slow for the session; it is
//! closed with 1013 by a close request that the connection sees before any queued frame (its
//! queue is, by definition, backed up) and resyncs when it reconnects. Nothing is ever dropped
//! silently.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;
use futures_util::task::AtomicWaker;
use std::task::{Context, Poll};

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

/// What both ends share. A plain deque behind a mutex (held for a push or a pop, never across
/// an await) and the connection task's waker: an idle connection costs a couple of hundred
/// bytes here, where a tokio channel plus a watch channel cost about two kilobytes, and
/// thousands of connections sit idle.
#[derive(Debug)]
struct Shared {
    frames: Mutex<VecDeque<Frame>>,
    queued: AtomicUsize,
    /// Live `Outbox` handles; the queue ends when the last one is dropped.
    senders: AtomicUsize,
    close: Mutex<Option<CloseReason>>,
    /// Woken on every push, on a close request and when the last sender goes.
    waker: AtomicWaker,
    max_bytes: usize,
}

impl Shared {
    fn frames(&self) -> std::sync::MutexGuard<'_, VecDeque<Frame>> {
        self.frames.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn close_reason(&self) -> Option<CloseReason> {
        *self.close.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The session's end of a connection's queue.
#[derive(Debug)]
pub struct Outbox {
    shared: Arc<Shared>,
}

/// The connection's end: frames to write, and the close request.
#[derive(Debug)]
pub struct Inbox {
    shared: Arc<Shared>,
}

/// What the connection should do next.
#[derive(Debug)]
pub enum Next {
    Write(Frame),
    /// The session asked for the connection to close.
    Close(CloseReason),
    /// The session dropped every handle of the queue.
    Ended,
}

/// A new queue bounded to `max_bytes` queued bytes.
pub fn outbox(max_bytes: usize) -> (Outbox, Inbox) {
    let shared = Arc::new(Shared {
        frames: Mutex::new(VecDeque::new()),
        queued: AtomicUsize::new(0),
        senders: AtomicUsize::new(1),
        close: Mutex::new(None),
        waker: AtomicWaker::new(),
        max_bytes,
    });
    (
        Outbox {
            shared: shared.clone(),
        },
        Inbox { shared },
    )
}

impl Clone for Outbox {
    fn clone(&self) -> Self {
        self.shared.senders.fetch_add(1, Ordering::AcqRel);
        Outbox {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        if self.shared.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.waker.wake();
        }
    }
}

impl Outbox {
    /// Queues a frame, or closes the connection with 1013 when the queue would pass its bound.
    pub fn send(&self, frame: Frame) -> Result<(), Overflow> {
        let len = frame.len();
        let queued = self.shared.queued.fetch_add(len, Ordering::AcqRel) + len;
        if queued > self.shared.max_bytes {
            self.shared.queued.fetch_sub(len, Ordering::AcqRel);
            self.close(CLOSE_SLOW);
            return Err(Overflow);
        }
        self.shared.frames().push_back(frame);
        self.shared.waker.wake();
        Ok(())
    }

    /// Asks the connection to close with `reason` (the first reason wins).
    pub fn close(&self, reason: CloseReason) {
        let mut close = self.shared.close.lock().unwrap_or_else(|p| p.into_inner());
        if close.is_none() {
            *close = Some(reason);
            drop(close);
            self.shared.waker.wake();
        }
    }

    /// Bytes queued and not yet written.
    pub fn queued_bytes(&self) -> usize {
        self.shared.queued.load(Ordering::Acquire)
    }
}

/// Capacity a drained queue keeps; a burst's larger buffer is given back.
const IDLE_QUEUE_CAPACITY: usize = 16;

impl Inbox {
    /// Waits for what to do next. A close request comes before frames still queued.
    pub async fn next(&mut self) -> Next {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Next> {
        if let Some(next) = self.ready() {
            return Poll::Ready(next);
        }
        // Checked again after registering: a push in between is not missed.
        self.shared.waker.register(cx.waker());
        self.ready().map_or(Poll::Pending, Poll::Ready)
    }

    fn ready(&mut self) -> Option<Next> {
        if let Some(reason) = self.shared.close_reason() {
            return Some(Next::Close(reason));
        }
        if let Some(frame) = self.try_recv() {
            return Some(Next::Write(frame));
        }
        (self.shared.senders.load(Ordering::Acquire) == 0).then_some(Next::Ended)
    }

    /// A frame that is already queued, without waiting.
    pub fn try_recv(&mut self) -> Option<Frame> {
        let mut frames = self.shared.frames();
        let frame = frames.pop_front();
        if frames.is_empty() && frames.capacity() > IDLE_QUEUE_CAPACITY {
            frames.shrink_to(IDLE_QUEUE_CAPACITY);
        }
        drop(frames);
        let frame = frame?;
        self.shared.queued.fetch_sub(frame.len(), Ordering::AcqRel);
        Some(frame)
    }

    /// The close reason, once one was given.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.shared.close_reason()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(bytes: &'static [u8]) -> Frame {
        Frame::Binary(Bytes::from_static(bytes))
    }

    #[tokio::test]
    async fn overflow_closes_with_1013_and_the_close_comes_first() {
        let (out, mut inbox) = outbox(10);
        out.send(frame(b"123456")).unwrap();
        assert_eq!(out.queued_bytes(), 6);
        assert_eq!(out.send(frame(b"123456")), Err(Overflow));
        assert_eq!(inbox.close_reason(), Some(CLOSE_SLOW));
        assert!(matches!(inbox.next().await, Next::Close(CLOSE_SLOW)));
        assert_eq!(inbox.try_recv().unwrap().len(), 6);
        assert_eq!(out.queued_bytes(), 0);
    }

    #[test]
    fn first_close_reason_wins() {
        let (out, inbox) = outbox(10);
        out.close(CLOSE_REPLACED);
        out.close(CLOSE_SLOW);
        assert_eq!(inbox.close_reason(), Some(CLOSE_REPLACED));
    }

    #[tokio::test]
    async fn frames_come_in_order_and_the_queue_ends_with_its_last_sender() {
        let (out, mut inbox) = outbox(100);
        let second = out.clone();
        let waiter = tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                match inbox.next().await {
                    Next::Write(frame) => got.push(frame.len()),
                    Next::Ended => return got,
                    Next::Close(reason) => panic!("unexpected close {reason:?}"),
                }
            }
        });
        out.send(frame(b"1")).unwrap();
        second.send(frame(b"22")).unwrap();
        drop(out);
        second.send(frame(b"333")).unwrap();
        drop(second);
        assert_eq!(waiter.await.unwrap(), vec![1, 2, 3]);
    }
}
