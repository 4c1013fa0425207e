//! The registry of loaded sessions: single-flight loading and eviction.
//!
//! Looking a session up either finds its running task or starts one in the same map entry,
//! so however many clients connect at the same moment the session is loaded once. The task
//! loads the document before it reads its first message, so nothing is served before the
//! load. A task that evicts itself first leaves the map, then refuses what is still queued
//! with [`JoinError::Retry`]; callers then look the session up again and get a fresh task,
//! never two live ones.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use collab_core::doc::PeerId;
use collab_core::session::SessionLimits;
use dashmap::mapref::entry::Entry;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::task::{self, TaskContext};
use super::{
    JoinError, JoinRequest, PendingJoin, SessionHandle, SessionMsg, SessionStatus, SessionTable,
};
use crate::budget::Budget;
use crate::store::Store;

/// Bound of a session's inbound queue; senders wait when it is full (backpressure).
const SESSION_QUEUE: usize = 1024;

/// How often a request is retried against a session that is being evicted.
const RETRIES: usize = 16;

/// How long a new session waits for the idle one evicted to make room for it (its last
/// batch and compaction are written first).
const EVICTION_WAIT: Duration = Duration::from_secs(5);

/// Limits and timings every session applies.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub evict_after: Duration,
    /// See `collab_core::doc::Scene::with_correction_delay`.
    pub correction_delay: Duration,
    pub limits: SessionLimits,
    /// Compact the stored log after this many appended updates...
    pub compact_after_updates: usize,
    /// ...or once it holds this many bytes more than the last snapshot.
    pub compact_after_bytes: usize,
    /// Sessions in memory at once (each task holds a slot until it has stopped).
    pub max_sessions: usize,
    /// The memory budget each session's awareness states count in.
    pub budget: Arc<Budget>,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            evict_after: Duration::from_secs(60),
            correction_delay: collab_core::doc::scene::CORRECTION_DELAY,
            limits: SessionLimits::default(),
            compact_after_updates: 1000,
            compact_after_bytes: 4 * 1024 * 1024,
            max_sessions: 1000,
            budget: Budget::unlimited(),
        }
    }
}

/// Every loaded session.
pub struct Registry {
    context: Arc<TaskContext>,
    next_peer: AtomicU64,
    /// Session tasks still running (loaded, or writing their last batch after eviction).
    tasks: TaskTracker,
    /// One permit per session task (`max_sessions`).
    slots: Arc<Semaphore>,
}

/// The session could not be reached (its store failed, or it kept closing).
#[derive(Debug)]
pub struct Unavailable;

impl Registry {
    pub fn new(
        store: Arc<dyn Store>,
        config: SessionConfig,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let slots = Arc::new(Semaphore::new(
            config.max_sessions.clamp(1, Semaphore::MAX_PERMITS),
        ));
        Arc::new(Registry {
            context: Arc::new(TaskContext {
                sessions: SessionTable::default(),
                store,
                config,
                shutdown,
                epoch: Instant::now(),
            }),
            next_peer: AtomicU64::new(1),
            tasks: TaskTracker::new(),
            slots,
        })
    }

    /// A new connection id; ids grow, so sorting by id is sorting by join order.
    pub fn next_peer_id(&self) -> PeerId {
        self.next_peer.fetch_add(1, Ordering::Relaxed)
    }

    /// Number of sessions in memory.
    pub fn loaded(&self) -> usize {
        self.context.sessions.0.len()
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.context.store
    }

    /// Handles of every loaded session.
    pub fn handles(&self) -> Vec<SessionHandle> {
        self.context
            .sessions
            .0
            .iter()
            .map(|e| e.value().clone())
            .collect()
    }

    /// The session's task, started (and loading) if it was not running. A task that died
    /// (its queue is closed) is replaced. A session that would be one too many replaces the
    /// one idle longest, or is refused ([`JoinError::Full`]).
    async fn get_or_start(&self, id: &str) -> Result<SessionHandle, JoinError> {
        let sessions = &self.context.sessions.0;
        if let Some(handle) = sessions.get(id) {
            if !handle.tx.is_closed() {
                return Ok(handle.clone());
            }
        }
        let slot = self.session_slot().await.ok_or(JoinError::Full)?;
        let handle = match sessions.entry(Arc::from(id)) {
            // Started meanwhile by another caller: its slot is the one used.
            Entry::Occupied(entry) if !entry.get().tx.is_closed() => entry.get().clone(),
            Entry::Occupied(mut entry) => {
                entry.insert(self.start(id, slot));
                entry.get().clone()
            }
            Entry::Vacant(entry) => entry.insert(self.start(id, slot)).clone(),
        };
        Ok(handle)
    }

    /// Room for one more session task: a free slot, or the one of the session idle longest,
    /// once it has stopped. `None` when every session has members.
    async fn session_slot(&self) -> Option<OwnedSemaphorePermit> {
        if let Ok(slot) = self.slots.clone().try_acquire_owned() {
            return Some(slot);
        }
        if !self.evict_idlest().await {
            return None;
        }
        tokio::time::timeout(EVICTION_WAIT, self.slots.clone().acquire_owned())
            .await
            .ok()?
            .ok()
    }

    /// Asks the session idle longest to leave memory; false when none is idle.
    async fn evict_idlest(&self) -> bool {
        loop {
            let idlest = self
                .context
                .sessions
                .0
                .iter()
                .filter_map(|entry| {
                    let since = entry.status.idle_since();
                    (since != SessionStatus::BUSY).then(|| (since, entry.value().clone()))
                })
                .min_by_key(|(since, _)| *since);
            let Some((since, handle)) = idlest else {
                return false;
            };
            // Another caller may have picked the same one: one caller per eviction.
            if handle.status.claim_eviction(since) {
                // A session that stopped meanwhile has given its slot back.
                let _ = handle.send(SessionMsg::Evict).await;
                return true;
            }
        }
    }

    fn start(&self, id: &str, slot: OwnedSemaphorePermit) -> SessionHandle {
        let (tx, rx) = mpsc::channel(SESSION_QUEUE);
        let handle = SessionHandle {
            id: Arc::from(id),
            tx,
            status: Arc::default(),
        };
        self.tasks.spawn(task::run(
            self.context.clone(),
            handle.clone(),
            rx,
            self.tasks.clone(),
            slot,
        ));
        handle
    }

    /// Waits until every session task has stopped (at shutdown: each wrote its last batch
    /// and its compaction).
    pub async fn wait_stopped(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Joins a session, retrying while it is being evicted.
    pub async fn join(&self, id: &str, request: JoinRequest) -> Result<SessionHandle, JoinError> {
        for _ in 0..RETRIES {
            let handle = self.get_or_start(id).await?;
            let (tx, rx) = oneshot::channel();
            let msg = SessionMsg::Join(Box::new(PendingJoin {
                request: JoinRequest {
                    peer: request.peer,
                    kind: request.kind,
                    user: request.user.clone(),
                    access: request.access,
                    outbox: request.outbox.clone(),
                },
                reply: tx,
            }));
            if handle.send(msg).await.is_err() {
                continue;
            }
            match rx.await {
                Ok(Ok(())) => return Ok(handle),
                Ok(Err(JoinError::Retry)) | Err(_) => continue,
                Ok(Err(e)) => return Err(e),
            }
        }
        Err(JoinError::Unavailable("session kept closing".into()))
    }

    /// Asks a session that exists (in memory or in the store) something; `Ok(None)` when it
    /// does not, and then nothing is loaded or created.
    pub async fn request_existing<T>(
        &self,
        id: &str,
        make: impl Fn(oneshot::Sender<T>) -> SessionMsg,
    ) -> Result<Option<T>, Unavailable> {
        let live = self
            .context
            .sessions
            .0
            .get(id)
            .is_some_and(|handle| !handle.tx.is_closed());
        if !live
            && !self
                .context
                .store
                .contains(id)
                .await
                .map_err(|_| Unavailable)?
        {
            return Ok(None);
        }
        self.request(id, make).await.map(Some).ok_or(Unavailable)
    }

    /// Asks a session something, retrying while it is being evicted.
    pub async fn request<T>(
        &self,
        id: &str,
        make: impl Fn(oneshot::Sender<T>) -> SessionMsg,
    ) -> Option<T> {
        for _ in 0..RETRIES {
            let handle = self.get_or_start(id).await.ok()?;
            let (tx, rx) = oneshot::channel();
            if handle.send(make(tx)).await.is_err() {
                continue;
            }
            if let Ok(answer) = rx.await {
                return Some(answer);
            }
        }
        None
    }
}
