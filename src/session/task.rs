//! The task that owns one session: its scene, members, awareness and store writes.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;

use base64::Engine as _;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, warn};

use super::awareness::AwarenessStates;
use super::outbox::{CLOSE_GOING_AWAY, CLOSE_INTERNAL, CLOSE_REPLACED};
use super::registry::Registry;
use super::{
    ApiUpdate, ConnKind, Frame, JoinError, JoinRequest, Outbox, SessionHandle, SessionMsg,
    SessionSummary,
};
use crate::doc::scene::PeerMessage;
use crate::doc::{DocError, Effects, GuardedDoc, PeerId, Scene};
use crate::protocol::json::{
    self, ClientMessage, ErrorCode, ProtocolError, UserEntry, YjsAckFields,
};
use crate::protocol::yjs::{self, YjsMessage};
use crate::store::{SessionMeta, StoredSession};
use crate::warn_limit::WarnLimiter;

/// Most messages handled before their effects are written and sent.
const BATCH: usize = 256;
/// Room for messages kept between batches.
const IDLE_BATCH_CAPACITY: usize = 8;
/// How often awareness states are checked for expiry.
const AWARENESS_TICK: std::time::Duration = std::time::Duration::from_secs(5);

/// User id written on changes that arrive through the HTTP API.
const API_USER: &str = "api";
/// User id written on changes from anonymous Yjs connections.
const YJS_USER: &str = "yjs";

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
}

struct Member {
    joined: u64,
    kind: ConnKind,
    user: Option<Arc<str>>,
    connected_at: Arc<str>,
    outbox: Outbox,
}

/// Where the outcome of an HTTP update goes.
type ApplyReply = oneshot::Sender<Result<(), String>>;

/// What a batch produced, sent only after its updates are in the store.
#[derive(Default)]
struct Pending {
    updates: Vec<Vec<u8>>,
    frames: Vec<(PeerId, Frame)>,
    replies: Vec<(ApplyReply, Result<(), String>)>,
}

/// What a fresh y-websocket client (SyncStep1 with an empty state vector) is answered: the
/// whole document as one SyncStep2 frame, encoded once and kept until the document changes.
/// Encoding a 10,000-item scene costs tens of milliseconds; a late joiner of an unchanged
/// scene now costs the session a reference-count increment.
struct StateCache {
    whole: Frame,
    /// The document's rebuild count when `whole` was encoded: a rebuild may change the state.
    rebuilds: u64,
}

/// A v1 state vector with no entries: what a client with an empty document sends.
const EMPTY_STATE_VECTOR: [u8; 1] = [0];

struct SessionTask {
    id: Arc<str>,
    registry: Arc<Registry>,
    handle: SessionHandle,
    scene: Scene,
    members: BTreeMap<PeerId, Member>,
    awareness: AwarenessStates,
    pending: Pending,
    idle_since: Option<Instant>,
    stored: StoredLog,
    /// Join order of members (peer ids are handed out before joins are queued).
    joins: u64,
    state_cache: Option<StateCache>,
    warnings: WarnLimiter,
    /// The store failed; the in-memory document holds changes that are not durable.
    failed: bool,
}

pub(super) fn spawn(
    registry: Arc<Registry>,
    handle: SessionHandle,
    rx: mpsc::Receiver<SessionMsg>,
) {
    registry.task_started();
    tokio::spawn(async move {
        let id = handle.id.clone();
        match load(&registry, &id).await {
            Ok((scene, stored)) => {
                let config = &registry.config;
                let task = SessionTask {
                    awareness: AwarenessStates::new(
                        config.max_awareness_bytes,
                        config.max_awareness_states,
                    ),
                    id,
                    registry: registry.clone(),
                    handle,
                    scene,
                    members: BTreeMap::new(),
                    pending: Pending::default(),
                    idle_since: Some(Instant::now()),
                    stored,
                    joins: 0,
                    state_cache: None,
                    warnings: WarnLimiter::default(),
                    failed: false,
                };
                // Served by a task of its own: what loading needed does not stay with every
                // idle session.
                tokio::spawn(task.run(rx));
            }
            Err(e) => {
                error!(session = %id, error = %e, "session could not be loaded");
                metrics::counter!("collab_session_load_failures_total").increment(1);
                registry.remove(&handle);
                refuse_queued(rx, JoinError::Unavailable(e)).await;
                registry.task_stopped();
            }
        }
    });
}

async fn load(registry: &Registry, id: &str) -> Result<(Scene, StoredLog), String> {
    let stored = registry
        .store
        .load(id)
        .await
        .map_err(|e| e.to_string())?
        .unwrap_or_else(StoredSession::default);
    let doc = GuardedDoc::from_updates(stored.updates.iter().map(Vec::as_slice))
        .map_err(|e| format!("stored document is unreadable: {e}"))?;
    metrics::counter!("collab_sessions_loaded_total").increment(1);
    let log = StoredLog {
        updates: stored.updates.len(),
        bytes: stored.updates.iter().map(Vec::len).sum(),
        last_seq: stored.last_seq,
        meta: stored.meta.clone(),
    };
    let scene = Scene::new(doc, stored.meta.initialized)
        .with_correction_delay(registry.config.correction_delay);
    Ok((scene, log))
}

/// Closes the queue and answers what is still in it: joins get `reason`, other requests see
/// their reply channel dropped and retry.
async fn refuse_queued(mut rx: mpsc::Receiver<SessionMsg>, reason: JoinError) {
    rx.close();
    while let Some(msg) = rx.recv().await {
        if let SessionMsg::Join(_, reply) = msg {
            let _ = reply.send(Err(reason.clone()));
        }
    }
}

impl SessionTask {
    /// Not an `async fn`: its arguments would be stored twice in every session's task
    /// (rust-lang/rust#62958); the block uses what it captured in place.
    #[allow(clippy::manual_async_fn)] // see above: an `async fn` would be larger
    fn run(mut self, mut rx: mpsc::Receiver<SessionMsg>) -> impl Future<Output = ()> + Send {
        async move {
            let mut shutdown = self.registry.shutdown.clone();
            // Grown by `recv_many` as needed and shrunk after a burst: an idle session (there may be
            // thousands) keeps no room for 256 messages.
            let mut batch = Vec::new();
            let mut awareness_tick = tokio::time::interval(AWARENESS_TICK);
            loop {
                let evict_at = self
                    .idle_since
                    .map(|t| tokio::time::Instant::from_std(t + self.registry.config.evict_after));
                let correction_at = self
                    .scene
                    .next_correction_due()
                    .map(tokio::time::Instant::from_std);
                tokio::select! {
                    n = rx.recv_many(&mut batch, BATCH) => {
                        if n == 0 {
                            break;
                        }
                        // Let this turn's other ready connections forward what they read, and
                        // handle it in the same batch: under load, each member then gets one
                        // write for several updates (1 room x 50 clients x 80 edits/s: 2.6 ->
                        // 1.3 us of CPU per delivery). Idle, this costs one extra poll.
                        tokio::task::yield_now().await;
                        while batch.len() < BATCH {
                            let Ok(msg) = rx.try_recv() else { break };
                            batch.push(msg);
                        }
                        let handled = catch_unwind(AssertUnwindSafe(|| {
                            for msg in batch.drain(..) {
                                self.handle(msg);
                            }
                        }));
                        batch.shrink_to(IDLE_BATCH_CAPACITY);
                        if handled.is_err() {
                            // A bug, not bad input (that is rejected before it gets here). The
                            // batch's changes are not durable: drop the session, keep the server.
                            batch.clear();
                            self.fail("internal error while handling a message");
                            break;
                        }
                    }
                    _ = sleep_until_opt(correction_at) => {
                        let sent = catch_unwind(AssertUnwindSafe(|| {
                            let effects = self.scene.send_due_corrections(Instant::now());
                            self.emit(effects, None);
                        }));
                        if sent.is_err() {
                            self.fail("internal error while sending corrections");
                            break;
                        }
                    }
                    _ = sleep_until_opt(evict_at) => {
                        debug!(session = %self.id, "evicting idle session");
                        break;
                    }
                    _ = awareness_tick.tick(), if !self.awareness.is_empty() => {
                        if let Some(removal) = self.awareness.expire(Instant::now()) {
                            self.broadcast_awareness(&removal);
                        }
                    }
                    _ = shutdown.changed() => break,
                }
                if let Err(e) = self.commit().await {
                    self.fail(&e);
                    break;
                }
            }
            self.registry.remove(&self.handle);
            if !self.failed {
                if let Err(e) = self.commit().await {
                    self.fail(&e);
                }
            }
            // Members are left only at shutdown (an idle session has none; a failed one closed
            // them): they get what was queued for them, then 1001.
            for member in self.members.values() {
                member.outbox.close(CLOSE_GOING_AWAY);
            }
            self.compact_on_exit().await;
            refuse_queued(rx, JoinError::Retry).await;
            metrics::counter!("collab_sessions_evicted_total").increment(1);
            self.registry.task_stopped();
        }
    }

    fn handle(&mut self, msg: SessionMsg) {
        match msg {
            SessionMsg::Join(request, reply) => {
                let result = self.join(*request);
                let _ = reply.send(result);
            }
            SessionMsg::Leave(peer) => self.leave(peer),
            SessionMsg::Legacy(peer, msg) => self.legacy(peer, *msg),
            SessionMsg::Yjs(peer, msg) => self.yjs(peer, *msg),
            SessionMsg::ApplyUpdate(request) => {
                let ApiUpdate { bytes, reply } = *request;
                let user: Arc<str> = Arc::from(API_USER);
                let result = match self.apply_update(&user, &bytes) {
                    Ok(effects) => {
                        self.emit(effects, None);
                        Ok(())
                    }
                    Err(e) => Err(e.to_string()),
                };
                self.pending.replies.push((reply, result));
            }
            SessionMsg::Scene(reply) => {
                let _ = reply.send(json::encode_scene(&self.scene.full_state()));
            }
            SessionMsg::EncodeState(reply) => {
                let _ = reply.send(self.encode_state());
            }
            SessionMsg::Summary(reply) => {
                let _ = reply.send(SessionSummary {
                    id: self.id.to_string(),
                    users: self
                        .users()
                        .into_iter()
                        .map(|u| u.user_id.to_string())
                        .collect(),
                    connections: self.members.len(),
                    item_count: self.scene.item_count(),
                    document_bytes: self.encode_state().map_or(0, |b| b.len()),
                });
            }
        }
    }

    fn encode_state(&mut self) -> Result<Vec<u8>, String> {
        let doc = self.scene.doc_mut();
        doc.encode_state_v1()
            .or_else(|_| doc.encode_state_v1())
            .map_err(|e| e.to_string())
    }

    /// The user list: each name once, in the order of its first connection.
    fn users(&self) -> Vec<UserEntry> {
        let mut members: Vec<&Member> = self.members.values().collect();
        members.sort_unstable_by_key(|m| m.joined);
        let mut users: Vec<UserEntry> = Vec::new();
        for member in members {
            if let Some(name) = &member.user {
                if !users.iter().any(|u| &u.user_id == name) {
                    users.push(UserEntry {
                        user_id: name.clone(),
                        connected_at: member.connected_at.clone(),
                    });
                }
            }
        }
        users
    }

    fn has_user(&self, name: &str) -> bool {
        self.members
            .values()
            .any(|m| m.user.as_deref() == Some(name))
    }

    fn join(&mut self, request: JoinRequest) -> Result<(), JoinError> {
        let JoinRequest {
            peer,
            kind,
            user,
            outbox,
        } = request;
        // A newer Optiverse connection replaces an older one of the same user (PROTOCOL
        // §3.5). Yjs connections are never replaced: a user may have several (browser tabs),
        // and y-websocket would reconnect after a close, replacing the other in turn.
        let replaced = user.as_ref().filter(|_| kind.speaks_json()).and_then(|u| {
            self.members
                .iter()
                .find(|(_, m)| m.kind.speaks_json() && m.user.as_ref() == Some(u))
                .map(|(id, _)| *id)
        });
        if let Some(old) = replaced {
            self.remove_member(old, Some(CLOSE_REPLACED));
        }
        let already_present =
            replaced.is_some() || user.as_deref().is_some_and(|u| self.has_user(u));
        let is_host = kind.speaks_json()
            && user.is_some()
            && !self.scene.initialized()
            && !self.members.values().any(|m| m.user.is_some());
        let yjs_ack = if kind == ConnKind::LegacyYjs {
            let snapshot = self.encode_state().map_err(JoinError::Unavailable)?;
            let b64 = base64::engine::general_purpose::STANDARD;
            Some(YjsAckFields {
                snapshot: b64.encode(snapshot),
                state_vector: b64.encode(self.scene.doc().state_vector_v1()),
            })
        } else {
            None
        };
        self.members.insert(
            peer,
            Member {
                joined: self.joins,
                kind,
                user: user.clone(),
                connected_at: json::timestamp().into(),
                outbox,
            },
        );
        self.joins += 1;
        self.idle_since = None;
        if let (ConnKind::Legacy, Some(name)) = (kind, &user) {
            self.scene.add_peer(peer);
            // Before the ack: a desktop client acting as host answers `user:joined` by
            // uploading its canvas, so its upload reaches the session before the
            // `sync:request` it sends on the ack, and the session knows not to answer that
            // with a full state that would replace its canvas. A client acting as client only
            // logs it. No full state here: both clients ask for it (README, "Choices").
            self.send(peer, Frame::text(json::encode_user_event(true, name)));
        }
        if let (true, Some(name)) = (kind.speaks_json(), &user) {
            let ack = json::encode_ack(&self.id, name, is_host, &self.users(), yjs_ack.as_ref());
            self.send(peer, Frame::text(ack));
        }
        if kind.speaks_yjs() {
            self.send(
                peer,
                Frame::binary(&yjs::sync_step1(&self.scene.doc().state_vector_v1())),
            );
            if let Some(states) = self.awareness.encode_all() {
                self.send(peer, Frame::binary(&yjs::awareness(&states)));
            }
        }
        if let (false, Some(name)) = (already_present, &user) {
            let joined = Frame::text(json::encode_user_event(true, name));
            self.send_to_json_members(joined, Some(peer));
        }
        metrics::gauge!("collab_connections").increment(1.0);
        Ok(())
    }

    fn leave(&mut self, peer: PeerId) {
        let user = self.remove_member(peer, None);
        if let Some(user) = user.filter(|u| !self.has_user(u)) {
            let left = Frame::text(json::encode_user_event(false, &user));
            self.send_to_json_members(left, None);
        }
    }

    /// Removes a member (closing it with `close` if given); returns its user name.
    fn remove_member(
        &mut self,
        peer: PeerId,
        close: Option<super::CloseReason>,
    ) -> Option<Arc<str>> {
        let member = self.members.remove(&peer)?;
        metrics::gauge!("collab_connections").decrement(1.0);
        if let Some(reason) = close {
            member.outbox.close(reason);
        }
        self.scene.remove_peer(peer);
        if let Some(removal) = self.awareness.remove_owner(peer) {
            self.broadcast_awareness(&removal);
        }
        if self.members.is_empty() {
            self.idle_since = Some(Instant::now());
        }
        member.user
    }

    fn user_of(&self, peer: PeerId) -> Arc<str> {
        self.members
            .get(&peer)
            .and_then(|m| m.user.clone())
            .unwrap_or_else(|| Arc::from(YJS_USER))
    }

    fn legacy(&mut self, peer: PeerId, msg: ClientMessage) {
        if !self.members.contains_key(&peer) {
            return;
        }
        let user = self.user_of(peer);
        match msg {
            // The pong is a barrier: the corrections owed to the connection go out before it.
            ClientMessage::Ping => {
                let effects = self.scene.send_corrections_owed_to(peer);
                self.emit(effects, None);
                self.send(peer, Frame::text(json::encode_pong()));
            }
            // Only plain legacy connections take full states (PROTOCOL §4).
            ClientMessage::SyncRequest => {
                let effects = self.scene.request_sync(peer, &user);
                self.emit(effects, Some(peer));
            }
            ClientMessage::Command(command) => {
                match self
                    .scene
                    .apply_command(peer, &user, command, Instant::now())
                {
                    Ok(effects) => self.emit(effects, Some(peer)),
                    Err(e) => self.reject(
                        peer,
                        ProtocolError::new(ErrorCode::BadMessage, e.to_string()),
                    ),
                }
            }
            ClientMessage::FullState(items) => {
                match self.scene.apply_upload(peer, &user, items, Instant::now()) {
                    Ok(effects) => self.emit(effects, Some(peer)),
                    Err(e) => self.reject(
                        peer,
                        ProtocolError::new(ErrorCode::BadMessage, e.to_string()),
                    ),
                }
            }
        }
    }

    fn yjs(&mut self, peer: PeerId, msg: YjsMessage) {
        if !self.members.contains_key(&peer) {
            return;
        }
        match msg {
            YjsMessage::SyncStep1(sv) if sv == EMPTY_STATE_VECTOR => self.send_whole_state(peer),
            YjsMessage::SyncStep1(sv) => match self.scene.doc_mut().encode_diff_v1(&sv) {
                Ok(diff) => self.send(peer, Frame::binary(&yjs::sync_step2(&diff))),
                Err(e) => self.reject(
                    peer,
                    ProtocolError::new(ErrorCode::BadMessage, e.to_string()),
                ),
            },
            YjsMessage::SyncStep2(update) | YjsMessage::Update(update) => {
                let user = self.user_of(peer);
                match self.apply_update(&user, &update) {
                    Ok(effects) => self.emit(effects, Some(peer)),
                    Err(e) => self.reject(
                        peer,
                        ProtocolError::new(ErrorCode::BadMessage, e.to_string()),
                    ),
                }
            }
            YjsMessage::Awareness(bytes) => {
                match self.awareness.apply(peer, &bytes, Instant::now()) {
                    Ok(Some(changed)) => self.broadcast_awareness(&changed),
                    Ok(None) => {}
                    Err(e) => self.reject(
                        peer,
                        ProtocolError::new(ErrorCode::BadMessage, e.to_string()),
                    ),
                }
            }
            YjsMessage::QueryAwareness => {
                if let Some(states) = self.awareness.encode_all() {
                    self.send(peer, Frame::binary(&yjs::awareness(&states)));
                }
            }
            YjsMessage::Auth => {}
        }
    }

    /// Applies a Yjs update (from a client or the HTTP API) to the scene, and reports held
    /// blocks that outgrew their bound.
    fn apply_update(&mut self, user: &Arc<str>, bytes: &[u8]) -> Result<Effects, DocError> {
        let dropped = self.scene.doc().dropped_held();
        let result = self.scene.apply_update(user, bytes);
        if self.scene.doc().dropped_held() != dropped {
            // Not lost for good: clients resend what the session lacks when they sync.
            metrics::counter!("collab_held_updates_dropped_total").increment(1);
            warn!(session = %self.id, user = %user, "blocks waiting for a gap outgrew their bound and were let go");
        }
        result
    }

    /// Answers a SyncStep1 from an empty document from the [`StateCache`], filling it first.
    fn send_whole_state(&mut self, peer: PeerId) {
        let rebuilds = self.scene.doc().rebuilds();
        if self
            .state_cache
            .as_ref()
            .is_none_or(|c| c.rebuilds != rebuilds)
        {
            self.state_cache = match self.encode_state() {
                Ok(whole) => Some(StateCache {
                    whole: Frame::binary(&yjs::sync_step2(&whole)),
                    rebuilds,
                }),
                Err(e) => {
                    self.reject(peer, ProtocolError::new(ErrorCode::Unavailable, e));
                    return;
                }
            };
        }
        if let Some(cache) = &self.state_cache {
            self.pending.frames.push((peer, cache.whole.clone()));
        }
    }

    /// Reports rejected input: an `error` message to JSON-speaking connections, a
    /// (rate-limited) warning in the log.
    fn reject(&mut self, peer: PeerId, error: ProtocolError) {
        metrics::counter!("collab_rejected_input_total").increment(1);
        let Some(member) = self.members.get(&peer) else {
            return;
        };
        let (kind, user) = (member.kind, member.user.clone());
        if self.warnings.allow() {
            warn!(session = %self.id, user = user.as_deref().unwrap_or("-"), error = %error, "rejected input");
        }
        if kind.speaks_json() {
            self.send(peer, Frame::text(json::encode_error(&error)));
        }
    }

    /// Queues the effects of one change: the update for the store and Yjs connections (all but
    /// `origin`), the commands for legacy connections (each encoded once).
    fn emit(&mut self, effects: Effects, origin: Option<PeerId>) {
        if let Some(update) = effects.update {
            metrics::counter!("collab_updates_applied_total").increment(1);
            let frame = Frame::binary(&yjs::sync_update(&update));
            self.pending.updates.push(update);
            self.state_cache = None;
            let targets: Vec<PeerId> = self
                .members
                .iter()
                .filter(|(id, m)| m.kind.speaks_yjs() && Some(**id) != origin)
                .map(|(id, _)| *id)
                .collect();
            for id in targets {
                self.pending.frames.push((id, frame.clone()));
            }
        }
        let mut encoded: HashMap<*const PeerMessage, Frame> = HashMap::new();
        for out in effects.messages {
            let frame = encoded
                .entry(Arc::as_ptr(&out.message))
                .or_insert_with(|| {
                    Frame::text(match &*out.message {
                        PeerMessage::Command(command) => json::encode_command(command),
                        PeerMessage::FullState(state) => json::encode_full_state(state),
                    })
                })
                .clone();
            self.pending.frames.push((out.to, frame));
        }
    }

    fn broadcast_awareness(&mut self, update: &[u8]) {
        let frame = Frame::binary(&yjs::awareness(update));
        let targets: Vec<PeerId> = self
            .members
            .iter()
            .filter(|(_, m)| m.kind.speaks_yjs())
            .map(|(id, _)| *id)
            .collect();
        for id in targets {
            self.pending.frames.push((id, frame.clone()));
        }
    }

    fn send(&mut self, peer: PeerId, frame: Frame) {
        self.pending.frames.push((peer, frame));
    }

    fn send_to_json_members(&mut self, frame: Frame, except: Option<PeerId>) {
        let targets: Vec<PeerId> = self
            .members
            .iter()
            .filter(|(id, m)| m.kind.speaks_json() && Some(**id) != except)
            .map(|(id, _)| *id)
            .collect();
        for id in targets {
            self.pending.frames.push((id, frame.clone()));
        }
    }

    fn meta(&self) -> SessionMeta {
        SessionMeta {
            initialized: self.scene.initialized(),
        }
    }

    /// Writes the batch's updates to the store, then sends its frames and replies. Members
    /// whose queue overflows are removed (their connection closes with 1013).
    async fn commit(&mut self) -> Result<(), String> {
        let meta = self.meta();
        if !self.pending.updates.is_empty() || meta != self.stored.meta {
            let updates = std::mem::take(&mut self.pending.updates);
            self.stored.updates += updates.len();
            self.stored.bytes += updates.iter().map(Vec::len).sum::<usize>();
            self.stored.last_seq = self
                .registry
                .store
                .append(&self.id, updates, meta.clone())
                .await
                .map_err(|e| e.to_string())?;
            self.stored.meta = meta;
            self.compact_if_due().await?;
        }
        loop {
            let mut frames = std::mem::take(&mut self.pending.frames);
            if frames.is_empty() {
                break;
            }
            // Each member gets the batch's frames in one write: a busy session sends a burst
            // per socket, not a system call per frame. The sort is stable: each member's
            // frames keep their order.
            frames.sort_by_key(|(peer, _)| *peer);
            let mut overflowed = Vec::new();
            for run in frames.chunk_by(|a, b| a.0 == b.0) {
                let peer = run[0].0;
                let Some(member) = self.members.get(&peer) else {
                    continue;
                };
                let sent = match run {
                    [(_, frame)] => member.outbox.send(frame),
                    _ => member
                        .outbox
                        .send_all(&run.iter().map(|(_, frame)| frame).collect::<Vec<_>>()),
                };
                if sent.is_err() {
                    overflowed.push(peer);
                }
            }
            for peer in overflowed {
                if self.members.contains_key(&peer) {
                    metrics::counter!("collab_slow_consumers_total").increment(1);
                    warn!(session = %self.id, peer, "slow consumer disconnected (1013)");
                    self.leave(peer);
                }
            }
        }
        for (reply, result) in self.pending.replies.drain(..) {
            let _ = reply.send(result);
        }
        Ok(())
    }

    async fn compact_if_due(&mut self) -> Result<(), String> {
        let config = &self.registry.config;
        if self.stored.updates < config.compact_after_updates
            && self.stored.bytes < config.compact_after_bytes
        {
            return Ok(());
        }
        self.compact().await
    }

    /// Replaces the stored log by a snapshot of the document, which holds everything stored
    /// up to `last_seq`.
    async fn compact(&mut self) -> Result<(), String> {
        let snapshot = self.encode_state()?;
        self.registry
            .store
            .compact(&self.id, snapshot, self.stored.last_seq, self.meta())
            .await
            .map_err(|e| e.to_string())?;
        self.stored.updates = 0;
        self.stored.bytes = 0;
        metrics::counter!("collab_compactions_total").increment(1);
        Ok(())
    }

    async fn compact_on_exit(&mut self) {
        if !self.failed && self.stored.updates > 1 {
            if let Err(e) = self.compact().await {
                error!(session = %self.id, error = %e, "compaction at eviction failed");
            }
        }
    }

    /// The store failed: what this batch changed is not durable, so nobody may hear of it.
    /// Every member is closed (1011) and the session leaves memory; reconnecting clients get
    /// the stored state.
    fn fail(&mut self, error: &str) {
        error!(session = %self.id, error, "store failure; closing the session");
        self.failed = true;
        self.pending = Pending::default();
        for (_, member) in std::mem::take(&mut self.members) {
            member.outbox.close(CLOSE_INTERNAL);
            metrics::gauge!("collab_connections").decrement(1.0);
        }
    }
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
