//! The task that serves one session: it feeds the sans-IO [`Session`] a batch of messages,
//! stores what the session accepted, then delivers what it produced ([`SessionTask::commit`]:
//! nothing is sent before it is durable). It also owns what needs I/O or a clock: the store's
//! log and compaction, the members' outboxes, eviction, and the session's timers.

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use collab_core::doc::{CheckedUpdate, GuardedDoc, PeerMap, PeerSet, Scene};
use collab_core::session::{
    Event, Input, Now, Output, PresenceChange, Refused, Session, CLOSE_GOING_AWAY, CLOSE_INTERNAL,
    CLOSE_SLOW,
};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, warn};

use super::registry::SessionConfig;
use super::{
    ApiUpdate, FromPeer, JoinError, JoinRequest, PendingJoin, SessionHandle, SessionMsg,
    SessionTable,
};
use crate::budget::Account;
use crate::store::{Following, Remote, RemoteBatch, SessionMeta, Store, StoreError, StoredSession};
use crate::transport::{Frame, Outbox, Overflow, Sent};
use crate::warn_limit::WarnLimiter;

/// Most messages handled before their effects are stored and sent.
const BATCH: usize = 256;
/// Room for messages kept between batches.
const IDLE_BATCH_CAPACITY: usize = 8;

/// What every session task shares.
pub struct TaskContext {
    pub(super) sessions: SessionTable,
    pub(super) store: Arc<dyn Store>,
    pub(super) config: SessionConfig,
    pub(super) shutdown: CancellationToken,
    /// What sessions' idle times are counted from ([`super::SessionStatus`]).
    pub(super) epoch: Instant,
}

/// What the store holds for this session, as far as this task knows.
#[derive(Debug, Default)]
struct StoredLog {
    /// Updates and bytes since the last snapshot.
    updates: usize,
    bytes: usize,
    /// Position of the last stored update: a compaction covers everything up to it.
    last_seq: u64,
    /// The metadata last written.
    meta: SessionMeta,
    /// In a cluster: the position up to which the document holds every stream entry (the
    /// feed's, this node's own included); a compaction covers only that far, not up to
    /// `last_seq`, since other nodes' entries before it may still be on their way.
    covered_by_feed: Option<u64>,
}

/// Where the outcome of an HTTP update goes.
type ApplyReply = oneshot::Sender<Result<(), String>>;

struct SessionTask {
    session: Session,
    context: Arc<TaskContext>,
    handle: SessionHandle,
    outboxes: PeerMap<Outbox>,
    /// Members with frames sent that are not known to have reached their socket while the
    /// session may want to know ([`Session::delivered`]: what a catch-up is computed against).
    unconfirmed: PeerSet,
    /// What the session produced and the batch has not delivered yet.
    out: Output,
    /// Presence changes for the other nodes (`--cluster`), written before each delivery.
    presence_due: Vec<PresenceChange>,
    /// HTTP updates, answered once what they changed is stored.
    replies: Vec<(ApplyReply, Result<(), String>)>,
    idle_since: Option<Instant>,
    stored: StoredLog,
    warnings: WarnLimiter,
    /// The store failed; the in-memory document holds changes that are not durable.
    failed: bool,
    /// The registry asked it to leave memory ([`SessionMsg::Evict`]): it does once the
    /// batch is handled, unless a member joined meanwhile.
    evict_requested: bool,
    /// This session's place among those in memory, given back when the task ends.
    _slot: OwnedSemaphorePermit,
    /// The session's awareness states in the memory budget.
    awareness_held: Account,
}

/// Loads the session, then serves it until it is evicted, fails or the server stops.
pub(super) async fn run(
    context: Arc<TaskContext>,
    handle: SessionHandle,
    rx: mpsc::Receiver<SessionMsg>,
    tasks: TaskTracker,
    slot: OwnedSemaphorePermit,
) {
    let loaded = match load(&context, &handle.id).await {
        Ok((session, mut stored)) => {
            match context.store.follow(&handle.id, stored.last_seq).await {
                Ok(following) => {
                    stored.covered_by_feed = following.as_ref().map(|_| stored.last_seq);
                    Ok((session, stored, following))
                }
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    };
    match loaded {
        Ok((mut session, stored, mut following)) => {
            if let Some(following) = &mut following {
                session.share_presence(following.node);
                // Before any join is handled: a joiner is told who is on the other nodes.
                let now = now();
                let mut out = Output::default();
                for input in std::mem::take(&mut following.present) {
                    // Nobody is here to be told: the output is empty.
                    let _ = session.handle(input, &now, &mut out);
                }
            }
            // Never registered: counted, never shed.
            let awareness_held = context.config.budget.account();
            let task = SessionTask {
                session,
                context,
                handle,
                outboxes: PeerMap::default(),
                unconfirmed: PeerSet::default(),
                out: Output::default(),
                presence_due: Vec::new(),
                replies: Vec::new(),
                idle_since: Some(Instant::now()),
                stored,
                warnings: WarnLimiter::default(),
                failed: false,
                evict_requested: false,
                _slot: slot,
                awareness_held,
            };
            task.publish_idle();
            // Served by a task of its own: a task keeps its future's whole size for its life,
            // and what loading needed must not stay with every idle session.
            // Boxed: only a cluster's sessions have one, and every idle task would hold its room.
            tasks.spawn(task.serve(rx, following.map(Box::new)));
        }
        Err(e) => {
            error!(session = %handle.id, error = %e, "session could not be loaded");
            metrics::counter!("collab_session_load_failures_total").increment(1);
            context.sessions.remove(&handle);
            refuse_queued(rx, JoinError::Unavailable(e.to_string())).await;
        }
    }
}

async fn load(context: &TaskContext, id: &str) -> Result<(Session, StoredLog), StoreError> {
    let stored = context
        .store
        .load(id)
        .await?
        .unwrap_or_else(StoredSession::default);
    let unreadable = |e: &dyn std::fmt::Display| StoreError::Unreadable(e.to_string());
    let updates = stored
        .updates
        .iter()
        .filter(|u| !u.is_empty())
        .map(|u| CheckedUpdate::check(u.clone()).map_err(|e| unreadable(&e)))
        .collect::<Result<Vec<_>, _>>()?;
    let doc = GuardedDoc::from_updates(&updates).map_err(|e| unreadable(&e))?;
    metrics::counter!("collab_sessions_loaded_total").increment(1);
    let log = StoredLog {
        updates: stored.updates.len(),
        bytes: stored.updates.iter().map(Vec::len).sum(),
        last_seq: stored.last_seq,
        meta: stored.meta.clone(),
        covered_by_feed: None,
    };
    let config = &context.config;
    let scene =
        Scene::new(doc, stored.meta.initialized).with_correction_delay(config.correction_delay);
    Ok((Session::new(Arc::from(id), scene, &config.limits), log))
}

/// Closes the queue and answers what is still in it: joins get `reason`, other requests see
/// their reply channel dropped and retry.
async fn refuse_queued(mut rx: mpsc::Receiver<SessionMsg>, reason: JoinError) {
    rx.close();
    while let Some(msg) = rx.recv().await {
        if let SessionMsg::Join(join) = msg {
            let _ = join.reply.send(Err(reason.clone()));
        }
    }
}

fn now() -> Now {
    Now::at(Instant::now(), SystemTime::now())
}

impl SessionTask {
    /// Not an `async fn`: its arguments would be stored twice in every session's task
    /// (rust-lang/rust#62958); the block uses what it captured in place.
    #[allow(clippy::manual_async_fn)] // see above: an `async fn` would be larger
    fn serve(
        mut self,
        mut rx: mpsc::Receiver<SessionMsg>,
        mut following: Option<Box<Following>>,
    ) -> impl Future<Output = ()> + Send {
        async move {
            let context = self.context.clone();
            // Grown by `recv_many` as needed and shrunk after a burst: an idle session (there
            // may be thousands) keeps no room for 256 messages.
            let mut batch = Vec::new();
            loop {
                if std::mem::take(&mut self.evict_requested) && self.idle_since.is_some() {
                    debug!(session = %self.handle.id, "evicting idle session to make room");
                    break;
                }
                let evict_at = self
                    .idle_since
                    .map(|t| tokio::time::Instant::from_std(t + context.config.evict_after));
                let deadline = self
                    .session
                    .next_deadline()
                    .map(tokio::time::Instant::from_std);
                // One timer for both: each would stay in every idle session's task.
                let wake_at = match (deadline, evict_at) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                let handled = tokio::select! {
                    n = rx.recv_many(&mut batch, BATCH) => {
                        if n == 0 {
                            break;
                        }
                        // Let this turn's other ready connections forward what they read, and
                        // handle it in the same batch: under load, each member then gets one
                        // write for several updates (BENCHMARKS.md). Idle, this costs one
                        // extra poll.
                        tokio::task::yield_now().await;
                        while batch.len() < BATCH {
                            let Ok(msg) = rx.try_recv() else { break };
                            batch.push(msg);
                        }
                        let now = now();
                        let handled = catch_unwind(AssertUnwindSafe(|| {
                            for msg in batch.drain(..) {
                                self.handle(msg, &now);
                            }
                        }));
                        batch.clear();
                        batch.shrink_to(IDLE_BATCH_CAPACITY);
                        handled
                    }
                    Some(remote) = recv_remote(&mut following) => {
                        let now = now();
                        catch_unwind(AssertUnwindSafe(|| match remote {
                            Remote::Updates(batch) => self.remote(batch, &now),
                            Remote::Presence(inputs) => {
                                for input in inputs {
                                    self.input(input, &now);
                                }
                            }
                            Remote::Reannounce => {
                                self.presence_due.extend(self.session.presence());
                            }
                        }))
                    }
                    _ = sleep_until_opt(wake_at) => {
                        if evict_at.is_some_and(|at| at <= tokio::time::Instant::now()) {
                            debug!(session = %self.handle.id, "evicting idle session");
                            break;
                        }
                        let now = now();
                        catch_unwind(AssertUnwindSafe(|| self.input(Input::Tick, &now)))
                    }
                    _ = context.shutdown.cancelled() => break,
                };
                if handled.is_err() {
                    // A bug, not bad input (that is refused before it gets here). The batch's
                    // changes are not durable: drop the session, keep the server.
                    self.fail("internal error while handling a message");
                    break;
                }
                if let Err(e) = self.commit().await {
                    self.fail(&e.to_string());
                    break;
                }
            }
            context.sessions.remove(&self.handle);
            if !self.failed {
                if let Err(e) = self.commit().await {
                    self.fail(&e.to_string());
                }
            }
            // Members are left only at shutdown (an idle session has none; a failed one
            // closed them): they get what was queued for them, then 1001.
            let shared = self.session.shares_presence();
            for (peer, outbox) in &self.outboxes {
                outbox.close(CLOSE_GOING_AWAY);
                if shared {
                    self.presence_due.push(PresenceChange::Left { peer: *peer });
                }
            }
            // Other nodes (`--cluster`) hear that these connections, and a failed session's,
            // are gone.
            self.publish_presence().await;
            self.compact_on_exit().await;
            refuse_queued(rx, JoinError::Retry).await;
            metrics::counter!("collab_sessions_evicted_total").increment(1);
        }
    }

    fn handle(&mut self, msg: SessionMsg, now: &Now) {
        match msg {
            SessionMsg::Join(join) => {
                let PendingJoin { request, reply } = *join;
                let JoinRequest {
                    peer,
                    kind,
                    user,
                    access,
                    outbox,
                } = request;
                let input = Input::Join {
                    peer,
                    kind,
                    user,
                    access,
                };
                let result = self
                    .session
                    .handle(input, now, &mut self.out)
                    .map_err(|e| match e {
                        Refused::NameHeld => JoinError::NameHeld,
                        e => JoinError::Unavailable(e.to_string()),
                    });
                if result.is_ok() {
                    self.outboxes.insert(peer, outbox);
                    self.unconfirmed.insert(peer);
                    metrics::gauge!("collab_connections").increment(1.0);
                    self.idle_since = None;
                    self.publish_idle();
                }
                let _ = reply.send(result);
            }
            SessionMsg::Leave(peer) => self.input(Input::Leave { peer }, now),
            SessionMsg::Evict => self.evict_requested = true,
            SessionMsg::Json(json) => {
                let FromPeer { peer, message } = *json;
                self.input(Input::Json { peer, message }, now);
            }
            SessionMsg::Yjs(yjs) => {
                let FromPeer { peer, message } = *yjs;
                self.input(Input::Yjs { peer, message }, now);
            }
            SessionMsg::ApplyUpdate(request) => {
                let ApiUpdate { update, reply } = *request;
                let result = self
                    .session
                    .handle(Input::ApiUpdate(update), now, &mut self.out)
                    .map_err(|e| e.to_string());
                self.replies.push((reply, result));
            }
            SessionMsg::Scene(reply) => {
                let _ = reply.send(self.session.scene_json(now));
            }
            SessionMsg::EncodeState(reply) => {
                let _ = reply.send(self.session.encode_state().map_err(|e| e.to_string()));
            }
            SessionMsg::Summary(reply) => {
                let _ = reply.send(self.session.summary());
            }
        }
    }

    /// Applies what other nodes stored (`--cluster`) like HTTP updates: through the guard, to
    /// this node's members as Yjs updates and derived commands. They are in the stream
    /// already, so what they change here is not appended again, unless this node's document
    /// held blocks of its own clients back (a client that reconnected here before its earlier
    /// changes did): what an update lets in is then stored with it, repeating it.
    fn remote(&mut self, batch: RemoteBatch, now: &Now) {
        metrics::counter!("collab_remote_updates_total").increment(batch.updates.len() as u64);
        for update in batch.updates {
            let stored_before = self.out.persist.len();
            let held_own = self.session.held_bytes() > 0;
            let applied = CheckedUpdate::check(update)
                .map_err(|e| e.to_string())
                .and_then(|update| {
                    self.session
                        .handle(Input::ApiUpdate(update), now, &mut self.out)
                        .map_err(|e| e.to_string())
                });
            if let Err(e) = applied {
                metrics::counter!("collab_rejected_input_total").increment(1);
                if self.warnings.allow() {
                    warn!(session = %self.handle.id, error = %e, "an update from another node was refused");
                }
            }
            if !held_own {
                self.out.persist.truncate(stored_before);
            }
        }
        self.stored.covered_by_feed = Some(batch.upto);
    }

    /// Feeds the session an input whose only refusals go to clients (in `out`).
    fn input(&mut self, input: Input, now: &Now) {
        if let Err(e) = self.session.handle(input, now, &mut self.out) {
            error!(session = %self.handle.id, error = %e, "a session refused an input it never refuses");
        }
        if self.session.is_empty() && self.idle_since.is_none() {
            self.idle_since = Some(Instant::now());
            self.publish_idle();
        }
    }

    /// Tells the registry whether, and since when, the session is idle.
    fn publish_idle(&self) {
        let epoch = self.context.epoch;
        let millis = self.idle_since.map(|t| {
            u64::try_from(t.saturating_duration_since(epoch).as_millis()).unwrap_or(u64::MAX)
        });
        self.handle.status.set_idle_since(millis);
    }

    /// Lets go of the outboxes of connections that are no longer members (after what was
    /// delivered to them, their close included).
    fn forget_departed(&mut self) {
        let session = &self.session;
        let before = self.outboxes.len();
        self.outboxes.retain(|peer, _| session.is_member(*peer));
        self.unconfirmed.retain(|peer| session.is_member(*peer));
        let gone = before - self.outboxes.len();
        metrics::gauge!("collab_connections").decrement(gone as f64);
    }

    /// Stores what the session accepted, then delivers what it produced: nothing is sent
    /// before it is durable (PROTOCOL §6).
    async fn commit(&mut self) -> Result<(), StoreError> {
        let meta = SessionMeta {
            initialized: self.session.initialized(),
        };
        if !self.out.persist.is_empty() || meta != self.stored.meta {
            let updates = std::mem::take(&mut self.out.persist);
            metrics::counter!("collab_updates_applied_total").increment(updates.len() as u64);
            self.stored.updates += updates.len();
            self.stored.bytes += updates.iter().map(Vec::len).sum::<usize>();
            self.stored.last_seq = self
                .context
                .store
                .append(&self.handle.id, updates, meta.clone())
                .await?;
            self.stored.meta = meta;
            self.compact_if_due().await?;
        }
        // Presence before the sends: a joiner's ack goes out once every node can list it.
        self.presence_due.append(&mut self.out.presence);
        self.publish_presence().await;
        self.deliver();
        // What delivering produced (a member dropped).
        self.publish_presence().await;
        // Never shed itself; past the limit, the costliest connections are.
        let _ = self.awareness_held.set(self.session.awareness_bytes());
        for (reply, result) in self.replies.drain(..) {
            let _ = reply.send(result);
        }
        Ok(())
    }

    /// Sends what the session produced (each member's frames in one write when the socket
    /// takes them) and closes whom it closed. A member whose queue overflows is dropped, one
    /// that fell behind is caught up, and what that produces (a `user:left`, a catch-up) is
    /// delivered in turn.
    fn deliver(&mut self) {
        loop {
            let out = std::mem::take(&mut self.out);
            debug_assert!(out.persist.is_empty(), "only a leave can follow a delivery");
            self.presence_due.extend(out.presence);
            if out.sends.is_empty() && out.closes.is_empty() && out.events.is_empty() {
                self.forget_departed();
                return;
            }
            self.report(&out.events);
            let mut sends = out.sends;
            // The sort is stable: each member's frames keep their order.
            sends.sort_by_key(|(peer, _)| *peer);
            let mut overflowed = Vec::new();
            let mut behind = Vec::new();
            for run in sends.chunk_by(|a, b| a.0 == b.0) {
                let peer = run[0].0;
                let Some(outbox) = self.outboxes.get(&peer) else {
                    continue;
                };
                let sent = match run {
                    [(_, message)] => outbox.send(&Frame::of(message)),
                    _ => {
                        let frames: Vec<Frame> = run.iter().map(|(_, m)| Frame::of(m)).collect();
                        outbox.send_all(&frames.iter().collect::<Vec<_>>())
                    }
                };
                match sent {
                    Ok(Sent::Written) => {
                        // Only for a member the session still wants to hear about, and once
                        // after each time it fell behind: rarely on the hot path.
                        if self.unconfirmed.contains(&peer) && self.session.delivered(peer) {
                            self.unconfirmed.remove(&peer);
                        }
                    }
                    Ok(Sent::Queued) => {}
                    Ok(Sent::Behind) => behind.push(peer),
                    Err(Overflow) => overflowed.push(peer),
                }
            }
            for (peer, reason) in out.closes {
                if let Some(outbox) = self.outboxes.get(&peer) {
                    outbox.close(reason);
                }
            }
            let now = now();
            for peer in behind {
                metrics::counter!("collab_catch_ups_total").increment(1);
                debug!(session = %self.handle.id, peer, "a member fell behind: caught up");
                self.unconfirmed.insert(peer);
                self.input(Input::Behind { peer }, &now);
            }
            for peer in overflowed {
                metrics::counter!("collab_slow_consumers_total").increment(1);
                warn!(session = %self.handle.id, peer, "slow consumer disconnected (1013)");
                self.input(
                    Input::Drop {
                        peer,
                        reason: CLOSE_SLOW,
                    },
                    &now,
                );
            }
        }
    }

    /// Tells the other nodes (`--cluster`) of this node's presence changes. A failure is
    /// logged, not fatal: the document is not at stake, and the nodes' views of who is
    /// present mend as connections come and go.
    async fn publish_presence(&mut self) {
        if self.presence_due.is_empty() {
            return;
        }
        let changes = std::mem::take(&mut self.presence_due);
        if let Err(e) = self
            .context
            .store
            .publish_presence(&self.handle.id, changes)
            .await
        {
            if self.warnings.allow() {
                warn!(session = %self.handle.id, error = %e, "presence could not be told to the other nodes");
            }
        }
    }

    /// Logs and counts the session's events.
    fn report(&self, events: &[Event]) {
        for event in events {
            match event {
                Event::Rejected { peer, user, error } => {
                    metrics::counter!("collab_rejected_input_total").increment(1);
                    if self.warnings.allow() {
                        warn!(session = %self.handle.id, user = user.as_deref().unwrap_or("-"), peer, error = %error, "rejected input");
                    }
                }
                Event::ViewUpdateDropped { peer, user } => {
                    metrics::counter!("collab_view_updates_dropped_total").increment(1);
                    if self.warnings.allow() {
                        warn!(session = %self.handle.id, user = user.as_deref().unwrap_or("-"), peer, "a view member's Yjs update was dropped");
                    }
                }
                Event::RemoteAwarenessRejected { node, peer, error } => {
                    metrics::counter!("collab_rejected_input_total").increment(1);
                    if self.warnings.allow() {
                        warn!(session = %self.handle.id, node, peer, error = %error, "another node's awareness update was refused");
                    }
                }
                Event::HeldBlocksDropped { user } => {
                    metrics::counter!("collab_held_updates_dropped_total").increment(1);
                    warn!(session = %self.handle.id, user = %user, "blocks waiting for a gap outgrew their bound and were let go");
                }
            }
        }
    }

    async fn compact_if_due(&mut self) -> Result<(), StoreError> {
        let config = &self.context.config;
        if self.stored.updates < config.compact_after_updates
            && self.stored.bytes < config.compact_after_bytes
        {
            return Ok(());
        }
        self.compact().await
    }

    /// Replaces the stored log by a snapshot of the document, which holds everything stored
    /// up to `last_seq`.
    async fn compact(&mut self) -> Result<(), StoreError> {
        let snapshot = self
            .session
            .encode_state()
            .map_err(|e| StoreError::Unreadable(e.to_string()))?;
        let meta = SessionMeta {
            initialized: self.session.initialized(),
        };
        let upto = self.stored.covered_by_feed.unwrap_or(self.stored.last_seq);
        self.context
            .store
            .compact(&self.handle.id, snapshot, upto, meta)
            .await?;
        self.stored.updates = 0;
        self.stored.bytes = 0;
        metrics::counter!("collab_compactions_total").increment(1);
        Ok(())
    }

    async fn compact_on_exit(&mut self) {
        if !self.failed && self.stored.updates > 1 {
            if let Err(e) = self.compact().await {
                error!(session = %self.handle.id, error = %e, "compaction at eviction failed");
            }
        }
    }

    /// The store failed: what this batch changed is not durable, so nobody may hear of it.
    /// Every member is closed (1011) and the session leaves memory; reconnecting clients get
    /// the stored state.
    fn fail(&mut self, error: &str) {
        error!(session = %self.handle.id, error, "closing the session");
        self.failed = true;
        self.out = Output::default();
        for (reply, _) in self.replies.drain(..) {
            let _ = reply.send(Err("the session failed".to_owned()));
        }
        self.presence_due.clear();
        let shared = self.session.shares_presence();
        for (peer, outbox) in std::mem::take(&mut self.outboxes) {
            if shared {
                self.presence_due.push(PresenceChange::Left { peer });
            }
            outbox.close(CLOSE_INTERNAL);
            metrics::gauge!("collab_connections").decrement(1.0);
        }
    }
}

/// The next of other nodes' updates or presence; never, without a feed.
async fn recv_remote(following: &mut Option<Box<Following>>) -> Option<Remote> {
    match following {
        Some(following) => following.rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
