//! A connection's outbound bytes: written straight to its socket when nothing is waiting,
//! queued (bounded in bytes) when the socket is full.
//!
//! The session task never waits on a socket. Sending a frame to a member first tries one
//! non-blocking write: on a connection that keeps up (nearly always) the frame leaves in that
//! system call and the connection's task is not woken at all. Handing every frame to the
//! connection task instead cost more CPU than the write itself (BENCHMARKS.md). What the
//! socket does not take is queued, and the connection task writes it, many frames per system
//! call, when the socket is writable again.
//!
//! A member whose queued bytes would pass the bound is too slow for the session: its queue is
//! dropped (it is, by definition, backed up), it is closed with 1013 and it resyncs when it
//! reconnects. Nothing is dropped silently: frames are dropped only for a connection that
//! is closing or gone. Any other close request is written after the frames already queued.
//!
//! Every frame is a complete WebSocket frame (server frames are unmasked), encoded once and
//! shared by every member it goes to. One lock orders all writes of a connection, the
//! session's and the WebSocket library's own (pongs, pings, close), so frames never
//! interleave; a frame the socket took only part of stays at the front until it is done.
//! Only whole frames enter that order: it takes [`Frame`]s, which cannot hold part of one; the
//! library's bytes pass through a [`Writer`], which makes them `Frame`s once whole.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use collab_core::session::{Backlog, CloseReason, CLOSE_SLOW};
use futures_util::task::AtomicWaker;

use super::frame::wire_len;
use super::Frame;
use crate::budget::{Account, Holder};

/// Where a connection's bytes go: the socket, written without waiting.
pub trait Wire: Send + Sync {
    /// Writes what the socket takes now; `WouldBlock` when it takes nothing.
    fn try_write(&self, buf: &[u8]) -> io::Result<usize>;
    /// The same for several buffers in one system call.
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
    /// Ready once a write may make progress; registers `cx` to be woken otherwise.
    fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

/// The queue is over its byte bound, or the memory budget shed this connection; it is being
/// closed with 1013.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overflow;

/// What became of frames handed to the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// Written: nothing waits for the socket (everything sent so far has left).
    Written,
    /// Some wait for the socket, in order.
    Queued,
    /// The changes waiting passed the catch-up bound: they were dropped with every other
    /// frame a catch-up replaces (not a started one), and so were this call's. The session
    /// must send the connection a catch-up.
    Behind,
}

/// A connection's bounds on what waits for its socket.
#[derive(Debug, Clone)]
pub struct Bounds {
    /// The most bytes queued; past it, 1013.
    pub max_bytes: usize,
    /// For a connection that can be caught up (Yjs): the most bytes of queued changes before
    /// they are replaced by a catch-up.
    pub catch_up_bytes: Option<usize>,
}

/// Most frames handed to one vectored write (the kernel refuses more than `IOV_MAX`, 1024).
const FRAMES_PER_WRITE: usize = 64;
/// Capacity a drained queue keeps; a burst's larger buffer is given back.
const IDLE_QUEUE_CAPACITY: usize = 4;

/// What the lock guards: the socket and what is waiting for it.
struct Queue {
    /// `None` once the connection ended: nothing can be written any more.
    wire: Option<Arc<dyn Wire>>,
    /// Waiting bytes, in order, with what a catch-up does to each; the front may be the
    /// unwritten rest of a started frame.
    frames: VecDeque<(Bytes, Backlog)>,
    /// Whether the front frame was partly written (it must be finished before anything else).
    front_started: bool,
    bytes: usize,
    /// Bytes of the queued [`Backlog::Change`] frames.
    changes: usize,
    close: Option<CloseReason>,
    /// A write failed: the peer is gone.
    failed: bool,
}

/// What both ends share. An idle connection costs a couple of hundred bytes here.
struct Shared {
    queue: Mutex<Queue>,
    /// The connection task: woken when it has bytes to write or a close request.
    waker: AtomicWaker,
    bounds: Bounds,
    /// The connection's bytes in the memory budget: its queue and its incomplete inbound
    /// message.
    account: Account,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let queue = self.queue();
        f.debug_struct("Outbox")
            .field("queued_bytes", &queue.bytes)
            .field("close", &queue.close)
            .finish()
    }
}

impl Holder for Shared {
    fn account(&self) -> &Account {
        &self.account
    }

    fn wake(&self) {
        self.waker.wake();
    }
}

impl Shared {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes `frames` now (one system call) if nothing is waiting, and queues what the socket
    /// does not take. `control` bytes (the WebSocket library's pings, pongs and close) still go
    /// out once a close was requested; frames from the session do not.
    fn push(&self, frames: &[&Frame], control: bool) -> Result<Sent, Overflow> {
        let mut queue = self.queue();
        if queue.failed || (!control && (queue.close.is_some() || self.account.is_shed())) {
            return Ok(Sent::Queued);
        }
        let mut sent = Sent::Written;
        let kept: Vec<&Frame>;
        let mut frames = frames;
        if let Some(bound) = self.bounds.catch_up_bytes {
            let changes: usize = frames
                .iter()
                .filter(|f| f.backlog() == Backlog::Change)
                .map(|f| f.len())
                .sum();
            if changes > 0 && queue.changes + changes > bound {
                let freed = queue.drop_replaceable();
                self.account.shrink(freed);
                kept = frames
                    .iter()
                    .copied()
                    .filter(|f| f.backlog() == Backlog::Keep)
                    .collect();
                frames = &kept;
                sent = Sent::Behind;
            }
        }
        let len: usize = frames.iter().map(|f| f.len()).sum();
        if queue.bytes + len > self.bounds.max_bytes {
            drop(queue);
            self.shed();
            return Err(Overflow);
        }
        let written = match &queue.wire {
            None => return Ok(Sent::Queued),
            Some(wire) if queue.frames.is_empty() => match frames {
                [] => Ok(0),
                [frame] => wire.try_write(frame.as_bytes()),
                _ => {
                    // What is left after the first writes waits for the connection task.
                    let slices: Vec<IoSlice<'_>> = frames
                        .iter()
                        .take(FRAMES_PER_WRITE)
                        .map(|f| IoSlice::new(f.as_bytes()))
                        .collect();
                    wire.try_write_vectored(&slices)
                }
            },
            Some(_) => Ok(0),
        };
        let mut skip = match written {
            Ok(n) if n == len => {
                return Ok(match (sent, queue.frames.is_empty()) {
                    (Sent::Behind, _) => Sent::Behind,
                    (_, true) => Sent::Written,
                    (_, false) => Sent::Queued,
                })
            }
            Ok(n) => n,
            Err(e) if is_retry(&e) => 0,
            Err(_) => {
                queue.failed = true;
                drop(queue);
                self.waker.wake();
                return Ok(Sent::Queued);
            }
        };
        let mut queued = 0;
        for frame in frames {
            if skip >= frame.len() {
                skip -= frame.len();
                continue;
            }
            let mut rest = frame.bytes().clone();
            if skip > 0 {
                // Only the first frame queued can have been started: the queue was empty.
                rest.advance(skip);
                queue.front_started = true;
                skip = 0;
            }
            queued += rest.len();
            if frame.backlog() == Backlog::Change {
                queue.changes += rest.len();
            }
            queue.frames.push_back((rest, frame.backlog()));
        }
        queue.bytes += queued;
        self.account.budget().note_queue(queue.bytes);
        // The library's frames (a close frame above all) go out even from a shed connection.
        let over = self.account.grow(queued).is_err() && !control;
        drop(queue);
        if over {
            self.shed();
            return Err(Overflow);
        }
        self.waker.wake();
        Ok(match sent {
            Sent::Behind => Sent::Behind,
            _ => Sent::Queued,
        })
    }

    /// The connection is too slow or too costly: what waits is dropped (it is, by
    /// definition, backed up) and it is closed 1013. The close frame follows at most the rest
    /// of a frame already started.
    fn shed(&self) {
        let mut queue = self.queue();
        let keep = usize::from(queue.front_started);
        queue.frames.truncate(keep);
        let bytes = queue.frames.iter().map(|(b, _)| b.len()).sum();
        self.account.shrink(queue.bytes - bytes);
        queue.bytes = bytes;
        queue.changes = 0;
        drop(queue);
        self.close(CLOSE_SLOW);
    }

    /// Nothing more can be written (the stream of frames would be corrupt).
    fn fail(&self) {
        self.queue().failed = true;
        self.waker.wake();
    }

    fn close(&self, reason: CloseReason) {
        let mut queue = self.queue();
        if queue.close.is_none() {
            queue.close = Some(reason);
            drop(queue);
            self.waker.wake();
        }
    }

    /// Writes what is queued. `Pending` (woken when the socket is writable) while some is
    /// left; an error once a write failed.
    fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let mut queue = self.queue();
            if queue.failed {
                return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
            }
            if queue.frames.is_empty() {
                if queue.frames.capacity() > IDLE_QUEUE_CAPACITY {
                    queue.frames.shrink_to(IDLE_QUEUE_CAPACITY);
                }
                return Poll::Ready(Ok(()));
            }
            let Some(wire) = &queue.wire else {
                return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
            };
            let written = if queue.frames.len() == 1 {
                wire.try_write(&queue.frames[0].0)
            } else {
                let slices: Vec<IoSlice<'_>> = queue
                    .frames
                    .iter()
                    .take(FRAMES_PER_WRITE)
                    .map(|(b, _)| IoSlice::new(b))
                    .collect();
                wire.try_write_vectored(&slices)
            };
            match written {
                Ok(0) => {
                    queue.failed = true;
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                Ok(n) => {
                    queue.consume(n);
                    self.account.shrink(n);
                }
                Err(e) if is_retry(&e) => {
                    // Still under the lock: the session cannot write in between.
                    if let Err(e) = std::task::ready!(wire.poll_writable(cx)) {
                        queue.failed = true;
                        return Poll::Ready(Err(e));
                    }
                }
                Err(e) => {
                    queue.failed = true;
                    return Poll::Ready(Err(e));
                }
            }
        }
    }
}

impl Queue {
    /// Removes `n` written bytes from the front.
    fn consume(&mut self, mut n: usize) {
        self.bytes -= n;
        while n > 0 {
            let Some((front, backlog)) = self.frames.front_mut() else {
                return;
            };
            let change = *backlog == Backlog::Change;
            if n < front.len() {
                front.advance(n);
                if change {
                    self.changes -= n;
                }
                self.front_started = true;
                return;
            }
            n -= front.len();
            if change {
                self.changes -= front.len();
            }
            self.frames.pop_front();
            self.front_started = false;
        }
    }

    /// Drops the frames a catch-up replaces (not a started one); returns the bytes freed.
    fn drop_replaceable(&mut self) -> usize {
        let before = self.bytes;
        let mut index = 0;
        let started = self.front_started;
        self.frames.retain(|(_, backlog)| {
            let keep = *backlog == Backlog::Keep || (started && index == 0);
            index += 1;
            keep
        });
        self.bytes = self.frames.iter().map(|(b, _)| b.len()).sum();
        self.changes = match self.frames.front() {
            Some((front, Backlog::Change)) if started => front.len(),
            _ => 0,
        };
        before - self.bytes
    }
}

fn is_retry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// The session's end of a connection: sends frames, asks for a close.
#[derive(Debug, Clone)]
pub struct Outbox {
    shared: Arc<Shared>,
}

/// The connection's end: drives the queue and learns of a close request.
#[derive(Debug)]
pub struct Inbox {
    shared: Arc<Shared>,
}

/// Writes bytes in the connection's order on behalf of the WebSocket library, whole frames
/// only: the start of a frame waits here until the rest of it is written, so nothing the
/// session sends meanwhile can land inside it. One per connection (it holds that start).
#[derive(Debug)]
pub struct Writer {
    shared: Arc<Shared>,
    /// The start of a frame whose rest has not been written yet; empty (no allocation) between
    /// frames.
    partial: Vec<u8>,
}

/// What the connection should do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// The session asked for the connection to close.
    Close(CloseReason),
    /// Writing to the socket failed: the peer is gone.
    Failed,
}

/// A new connection to `wire`, within `bounds`, its bytes counted in `account`.
pub fn outbox(bounds: Bounds, account: Account, wire: Arc<dyn Wire>) -> (Outbox, Inbox) {
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue {
            wire: Some(wire),
            frames: VecDeque::new(),
            front_started: false,
            bytes: 0,
            changes: 0,
            close: None,
            failed: false,
        }),
        waker: AtomicWaker::new(),
        bounds,
        account,
    });
    let holder: Arc<dyn Holder> = shared.clone();
    shared.account.budget().register(&holder);
    (
        Outbox {
            shared: shared.clone(),
        },
        Inbox { shared },
    )
}

impl Outbox {
    /// Sends a frame, or closes the connection with 1013 when the queue would pass its bound.
    pub fn send(&self, frame: &Frame) -> Result<Sent, Overflow> {
        self.shared.push(&[frame], false)
    }

    /// Sends frames in order, in one system call when the socket takes them all.
    pub fn send_all(&self, frames: &[&Frame]) -> Result<Sent, Overflow> {
        self.shared.push(frames, false)
    }

    /// Asks the connection to close with `reason` (the first reason wins).
    pub fn close(&self, reason: CloseReason) {
        self.shared.close(reason);
    }

    /// Bytes queued and not yet written.
    #[cfg(test)]
    fn queued_bytes(&self) -> usize {
        self.shared.queue().bytes
    }
}

impl Inbox {
    /// Writes what is queued; ready with what the connection must do next.
    pub(super) fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Next> {
        // Registered before looking: a push or close after the look wakes this task.
        // The budget wakes it too, when it sheds the connection ([`Holder`]).
        self.shared.waker.register(cx.waker());
        if self.shared.account.is_shed() {
            // The memory budget shed it: its queue goes now, the close after.
            self.shared.shed();
        }
        if let Some(reason) = self.shared.queue().close {
            return Poll::Ready(Next::Close(reason));
        }
        match self.shared.poll_flush(cx) {
            Poll::Ready(Err(_)) => Poll::Ready(Next::Failed),
            _ => Poll::Pending,
        }
    }

    /// Writes what is queued; `Pending` until the socket took it.
    pub(super) fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.shared.poll_flush(cx)
    }

    /// Stops the session's frames (the connection is closing): none sent from now on is
    /// written, so none follows a close frame. The first reason given stays.
    pub(super) fn close(&self, reason: CloseReason) {
        self.shared.close(reason);
    }

    /// The WebSocket library's way to the socket, in the same order as the session's frames.
    pub(super) fn writer(&self) -> Writer {
        Writer {
            shared: self.shared.clone(),
            partial: Vec::new(),
        }
    }
}

impl Drop for Inbox {
    /// The connection ended: later frames have nowhere to go, and the socket closes once
    /// the connection drops its own handle.
    fn drop(&mut self) {
        let mut queue = self.shared.queue();
        queue.wire = None;
        queue.frames.clear();
        self.shared.account.shrink(queue.bytes);
        queue.bytes = 0;
        queue.changes = 0;
    }
}

impl Writer {
    /// Takes all of `bytes`: the whole frames among them are written (or queued) now, and the
    /// start of a frame they end with waits for its rest.
    pub fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let frames = if self.partial.is_empty() {
            // The usual case: the library hands over whole frames.
            let frames = Frame::whole_prefix(bytes);
            self.partial
                .extend_from_slice(&bytes[frames.as_ref().map_or(0, Frame::len)..]);
            frames
        } else {
            self.partial.extend_from_slice(bytes);
            let frames = Frame::whole_prefix(&self.partial);
            self.partial.drain(..frames.as_ref().map_or(0, Frame::len));
            frames
        };
        if self.partial.is_empty() {
            self.partial = Vec::new();
        } else if wire_len(&self.partial)
            .is_some_and(|len| len > self.shared.bounds.max_bytes as u64)
        {
            // It could never be queued; what follows it would be read as its payload.
            self.shared.fail();
            return Err(io::Error::other(
                "a frame larger than the connection's queue",
            ));
        }
        if let Some(frames) = frames {
            if self.shared.push(&[&frames], true) == Err(Overflow) {
                return Err(io::Error::other("the connection's queue is full"));
            }
        }
        Ok(bytes.len())
    }

    /// Writes everything queued; `Pending` until the socket took it.
    pub fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.shared.poll_flush(cx)
    }

    /// The connection's bytes in the memory budget (its incomplete inbound message too).
    pub fn account(&self) -> &Account {
        &self.shared.account
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use std::task::Waker;

    /// A socket that takes `room` bytes and then blocks until given more (or, broken, fails).
    #[derive(Default)]
    struct FakeWire {
        state: Mutex<(usize, Vec<u8>, Option<Waker>, bool)>,
    }

    impl FakeWire {
        fn with_room(room: usize) -> Arc<FakeWire> {
            let wire = FakeWire::default();
            wire.state.lock().unwrap().0 = room;
            Arc::new(wire)
        }

        fn grant(&self, more: usize) {
            let mut state = self.state.lock().unwrap();
            state.0 += more;
            if let Some(waker) = state.2.take() {
                waker.wake();
            }
        }

        fn written(&self) -> Vec<u8> {
            self.state.lock().unwrap().1.clone()
        }
    }

    impl Wire for FakeWire {
        fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
            self.try_write_vectored(&[IoSlice::new(buf)])
        }

        fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            let mut state = self.state.lock().unwrap();
            if state.3 {
                return Err(io::ErrorKind::BrokenPipe.into());
            }
            if state.0 == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let mut n = 0;
            for buf in bufs {
                let take = buf.len().min(state.0);
                state.1.extend_from_slice(&buf[..take]);
                state.0 -= take;
                n += take;
                if state.0 == 0 {
                    break;
                }
            }
            Ok(n)
        }

        fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            let mut state = self.state.lock().unwrap();
            if state.0 > 0 {
                return Poll::Ready(Ok(()));
            }
            state.2 = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    /// An outbox bounded to `max_bytes`, that catches nothing up, in a budget without limit.
    fn test_outbox(max_bytes: usize, wire: Arc<FakeWire>) -> (Outbox, Inbox) {
        let bounds = Bounds {
            max_bytes,
            catch_up_bytes: None,
        };
        outbox(bounds, crate::budget::Budget::unlimited().account(), wire)
    }

    fn frame(payload: &[u8]) -> Frame {
        Frame::binary(payload)
    }

    /// A frame of a session's message with what a catch-up does to it.
    fn session_frame(payload: &[u8], backlog: Backlog) -> Frame {
        let payload = match backlog {
            Backlog::Keep => collab_core::session::Payload::binary(payload.to_vec()),
            Backlog::Change => collab_core::session::Payload::yjs_change(payload.to_vec()),
            Backlog::State => collab_core::session::Payload::yjs_state(payload.to_vec()),
        };
        Frame::of(&payload)
    }

    #[tokio::test]
    async fn changes_past_the_catch_up_bound_are_dropped_with_what_a_catch_up_replaces() {
        let wire = FakeWire::with_room(3);
        let bounds = Bounds {
            max_bytes: 1000,
            catch_up_bytes: Some(20),
        };
        let budget = crate::budget::Budget::unlimited();
        let (out, inbox) = outbox(bounds, budget.account(), wire.clone());
        // Started (3 of its 6 bytes written): it stays whatever it is.
        let started = session_frame(b"1234", Backlog::Change);
        let kept = session_frame(b"k", Backlog::Keep);
        let state = session_frame(b"s", Backlog::State);
        let change = session_frame(&[9; 10], Backlog::Change);
        assert_eq!(out.send(&started), Ok(Sent::Queued));
        assert_eq!(out.send_all(&[&kept, &state, &change]), Ok(Sent::Queued));
        assert_eq!(out.queued_bytes(), 3 + 3 + 3 + 12);
        assert_eq!(budget.usage().used_bytes, out.queued_bytes());
        // 3 + 12 + 12 bytes of changes pass 20: the changes and the state go, with this call's.
        let late_keep = session_frame(b"l", Backlog::Keep);
        assert_eq!(out.send_all(&[&change, &late_keep]), Ok(Sent::Behind));
        assert_eq!(out.queued_bytes(), 3 + 3 + 3);
        assert_eq!(budget.usage().used_bytes, out.queued_bytes());
        // The catch-up (a state) is queued after them, whatever its size.
        let catch_up = session_frame(&[5; 30], Backlog::State);
        assert_eq!(out.send(&catch_up), Ok(Sent::Queued));
        wire.grant(1000);
        flush_now(&inbox);
        let expected: Vec<u8> = [&started, &kept, &late_keep, &catch_up]
            .iter()
            .flat_map(|f| f.as_bytes().to_vec())
            .collect();
        assert_eq!(wire.written(), expected);
        assert_eq!(budget.usage().used_bytes, 0);
        // Everything sent has left: the next frame written at once says so.
        assert_eq!(out.send(&change), Ok(Sent::Written));
    }

    #[tokio::test]
    async fn a_connection_the_budget_sheds_is_closed_1013_and_its_queue_given_back() {
        let budget = crate::budget::Budget::new(100);
        let bounds = Bounds {
            max_bytes: 1000,
            catch_up_bytes: None,
        };
        let (costly, mut costly_inbox) =
            outbox(bounds.clone(), budget.account(), FakeWire::with_room(0));
        let (cheap, _cheap_inbox) = outbox(bounds, budget.account(), FakeWire::with_room(0));
        costly.send(&frame(&[1; 70])).unwrap();
        cheap.send(&frame(&[1; 20])).unwrap();
        // The cheap one passes the limit; the costly one is shed.
        assert_eq!(cheap.send(&frame(&[1; 20])), Ok(Sent::Queued));
        assert_eq!(next(&mut costly_inbox).await, Next::Close(CLOSE_SLOW));
        assert_eq!(costly.queued_bytes(), 0);
        assert_eq!(budget.usage().used_bytes, cheap.queued_bytes());
        // The costliest growing past the limit is refused.
        assert_eq!(cheap.send(&frame(&[1; 200])), Err(Overflow));
    }

    async fn next(inbox: &mut Inbox) -> Next {
        poll_fn(|cx| inbox.poll_next(cx)).await
    }

    /// Writes what is queued; the socket must take it all now.
    fn flush_now(inbox: &Inbox) {
        let flushed = inbox.poll_flush(&mut Context::from_waker(Waker::noop()));
        assert!(matches!(flushed, Poll::Ready(Ok(()))), "{flushed:?}");
    }

    #[test]
    fn frames_are_complete_server_frames() {
        assert_eq!(frame(b"ab").as_bytes(), &[0x82, 2, b'a', b'b']);
        assert_eq!(Frame::text("hi").as_bytes(), &[0x81, 2, b'h', b'i']);
        let long = Frame::binary(&[7; 300]);
        assert_eq!(&long.as_bytes()[..4], &[0x82, 126, 1, 44]);
        assert_eq!(long.len(), 304);
    }

    #[test]
    fn a_socket_with_room_gets_the_frame_at_once() {
        let wire = FakeWire::with_room(1000);
        let (out, _inbox) = test_outbox(100, wire.clone());
        out.send(&frame(b"123")).unwrap();
        assert_eq!(wire.written(), frame(b"123").as_bytes());
        assert_eq!(out.queued_bytes(), 0);
    }

    #[tokio::test]
    async fn a_full_socket_queues_in_order_and_the_connection_writes_the_rest() {
        // The first frame is cut after 3 of its 5 bytes; the rest waits with the second.
        let wire = FakeWire::with_room(3);
        let (out, inbox) = test_outbox(100, wire.clone());
        out.send(&frame(b"123")).unwrap();
        out.send(&frame(b"45")).unwrap();
        assert_eq!(out.queued_bytes(), 2 + 4);
        let writer = inbox.writer();
        let flushed = tokio::spawn(async move { poll_fn(|cx| writer.poll_flush(cx)).await });
        wire.grant(100);
        flushed.await.unwrap().unwrap();
        let mut expected = frame(b"123").as_bytes().to_vec();
        expected.extend_from_slice(frame(b"45").as_bytes());
        assert_eq!(wire.written(), expected);
        assert_eq!(out.queued_bytes(), 0);
    }

    #[tokio::test]
    async fn a_burst_goes_out_in_one_write_and_its_rest_waits_in_order() {
        let wire = FakeWire::with_room(7);
        let (out, inbox) = test_outbox(100, wire.clone());
        let (a, b, c) = (frame(b"123"), frame(b"45"), frame(b"6"));
        out.send_all(&[&a, &b, &c]).unwrap();
        // `a` (5 bytes) went out whole, `b` (4) cut after 2; `b`'s rest and `c` wait.
        assert_eq!(out.queued_bytes(), 2 + 3);
        let writer = inbox.writer();
        let flushed = tokio::spawn(async move { poll_fn(|cx| writer.poll_flush(cx)).await });
        wire.grant(100);
        flushed.await.unwrap().unwrap();
        let expected: Vec<u8> = [a, b, c]
            .iter()
            .flat_map(|f| f.as_bytes().to_vec())
            .collect();
        assert_eq!(wire.written(), expected);
    }

    #[test]
    fn a_burst_longer_than_one_vectored_write_is_queued_past_it() {
        let wire = FakeWire::with_room(usize::MAX);
        let (out, _inbox) = test_outbox(usize::MAX, wire.clone());
        let burst: Vec<Frame> = (0..FRAMES_PER_WRITE + 3).map(|_| frame(b"1")).collect();
        out.send_all(&burst.iter().collect::<Vec<_>>()).unwrap();
        assert_eq!(wire.written().len(), FRAMES_PER_WRITE * 3);
        assert_eq!(out.queued_bytes(), 3 * 3);
    }

    #[tokio::test]
    async fn overflow_drops_the_queue_and_closes_with_1013() {
        let wire = FakeWire::with_room(0);
        let (out, mut inbox) = test_outbox(10, wire.clone());
        out.send(&frame(b"123456")).unwrap();
        assert_eq!(out.queued_bytes(), 8);
        assert_eq!(out.send(&frame(b"123456")), Err(Overflow));
        assert_eq!(out.queued_bytes(), 0);
        assert_eq!(next(&mut inbox).await, Next::Close(CLOSE_SLOW));
        // Frames after the close request are not sent; the close frame (control bytes) is.
        out.send(&frame(b"1")).unwrap();
        assert_eq!(out.queued_bytes(), 0);
        wire.grant(100);
        inbox.writer().write(&[0x88, 0]).unwrap();
        assert_eq!(wire.written(), vec![0x88, 0]);
    }

    #[test]
    fn a_started_frame_is_finished_before_the_close_frame() {
        let wire = FakeWire::with_room(2);
        let (out, inbox) = test_outbox(10, wire.clone());
        out.send(&frame(b"1234")).unwrap();
        out.send(&frame(b"5")).unwrap();
        assert_eq!(out.queued_bytes(), 4 + 3);
        assert_eq!(out.send(&frame(b"678")), Err(Overflow));
        assert_eq!(out.queued_bytes(), 4);
        wire.grant(100);
        inbox.writer().write(&[0x88, 0]).unwrap();
        flush_now(&inbox);
        let mut expected = frame(b"1234").as_bytes().to_vec();
        expected.extend_from_slice(&[0x88, 0]);
        assert_eq!(wire.written(), expected);
    }

    #[tokio::test]
    async fn a_close_request_is_written_after_the_queued_frames() {
        let wire = FakeWire::with_room(0);
        let (out, mut inbox) = test_outbox(100, wire.clone());
        out.send(&frame(b"12")).unwrap();
        out.close(collab_core::session::CLOSE_GOING_AWAY);
        assert_eq!(
            next(&mut inbox).await,
            Next::Close(collab_core::session::CLOSE_GOING_AWAY)
        );
        inbox.writer().write(&[0x88, 0]).unwrap();
        wire.grant(100);
        let writer = inbox.writer();
        poll_fn(|cx| writer.poll_flush(cx)).await.unwrap();
        let mut expected = frame(b"12").as_bytes().to_vec();
        expected.extend_from_slice(&[0x88, 0]);
        assert_eq!(wire.written(), expected);
    }

    #[tokio::test]
    async fn a_failed_write_ends_the_connection() {
        let wire = FakeWire::with_room(0);
        wire.state.lock().unwrap().3 = true;
        let (out, mut inbox) = test_outbox(100, wire);
        out.send(&frame(b"1")).unwrap();
        assert_eq!(next(&mut inbox).await, Next::Failed);
    }

    #[test]
    fn first_close_reason_wins() {
        let (out, inbox) = test_outbox(10, FakeWire::with_room(0));
        out.close(collab_core::session::CLOSE_REPLACED);
        out.close(CLOSE_SLOW);
        assert_eq!(
            inbox.shared.queue().close,
            Some(collab_core::session::CLOSE_REPLACED)
        );
    }

    #[test]
    fn nothing_is_written_after_the_connection_ended() {
        let wire = FakeWire::with_room(100);
        let (out, inbox) = test_outbox(10, wire.clone());
        drop(inbox);
        out.send(&frame(b"1")).unwrap();
        assert!(wire.written().is_empty());
    }

    /// Frames as tungstenite writes them (pings, pongs, close), one of each header size.
    fn library_frames() -> Vec<Vec<u8>> {
        let mut pong = vec![0x8a, 125];
        pong.extend_from_slice(&[5; 125]);
        let mut close = vec![0x88, 12, 0x03, 0xe8];
        close.extend_from_slice(b"Disconnect");
        vec![
            vec![0x89, 0],
            pong,
            close,
            Frame::binary(&[6; 200]).as_bytes().to_vec(),
        ]
    }

    /// Where each frame of `frames` starts in their concatenation, and where the last ends.
    fn boundaries(frames: &[Vec<u8>]) -> Vec<usize> {
        let mut at = vec![0];
        for frame in frames {
            at.push(at[at.len() - 1] + frame.len());
        }
        at
    }

    /// The last frame boundary at or before `cut`.
    fn boundary_before(boundaries: &[usize], cut: usize) -> usize {
        boundaries
            .iter()
            .copied()
            .filter(|&b| b <= cut)
            .max()
            .unwrap_or(0)
    }

    #[test]
    fn a_frame_written_in_two_parts_never_has_a_session_frame_inside_it() {
        let frames = library_frames();
        let stream = frames.concat();
        let boundaries = boundaries(&frames);
        let session = frame(b"from the session");
        // Queued behind a full socket, and written at once.
        for queued in [true, false] {
            for cut in 0..=stream.len() {
                let wire = FakeWire::with_room(if queued { 0 } else { usize::MAX });
                let (out, inbox) = test_outbox(1 << 20, wire.clone());
                let mut writer = inbox.writer();
                assert_eq!(writer.write(&stream[..cut]).unwrap(), cut);
                out.send(&session).unwrap();
                let rest = &stream[cut..];
                assert_eq!(writer.write(rest).unwrap(), rest.len());
                if queued {
                    wire.grant(1 << 20);
                    flush_now(&inbox);
                }
                // The session's frame lands between the library's frames, never inside one.
                let at = boundary_before(&boundaries, cut);
                let mut expected = stream[..at].to_vec();
                expected.extend_from_slice(session.as_bytes());
                expected.extend_from_slice(&stream[at..]);
                assert_eq!(wire.written(), expected, "cut at {cut}, queued: {queued}");
                assert_eq!(writer.partial.capacity(), 0, "nothing held between frames");
            }
        }
    }

    #[test]
    fn frames_written_a_byte_at_a_time_go_out_whole() {
        let frames = library_frames();
        let stream = frames.concat();
        let boundaries = boundaries(&frames);
        let session = frame(b"s");
        for queued in [true, false] {
            let wire = FakeWire::with_room(if queued { 0 } else { usize::MAX });
            let (out, inbox) = test_outbox(1 << 20, wire.clone());
            let mut writer = inbox.writer();
            let mut expected = Vec::new();
            let mut sent = 0;
            for cut in 1..=stream.len() {
                assert_eq!(writer.write(&stream[cut - 1..cut]).unwrap(), 1);
                out.send(&session).unwrap();
                let at = boundary_before(&boundaries, cut);
                expected.extend_from_slice(&stream[sent..at]);
                expected.extend_from_slice(session.as_bytes());
                sent = at;
            }
            if queued {
                wire.grant(1 << 20);
                flush_now(&inbox);
            }
            assert_eq!(sent, stream.len());
            assert_eq!(wire.written(), expected, "queued: {queued}");
        }
    }

    #[tokio::test]
    async fn a_frame_larger_than_the_queue_ends_the_connection() {
        let wire = FakeWire::with_room(100);
        let (_out, mut inbox) = test_outbox(100, wire.clone());
        let mut writer = inbox.writer();
        // A header announcing 200 bytes: they could never be queued.
        assert!(writer.write(&[0x82, 126, 0, 200, 1]).is_err());
        assert!(wire.written().is_empty());
        assert_eq!(next(&mut inbox).await, Next::Failed);
    }
}
