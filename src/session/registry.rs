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
use std::time::Duration;

use collab_core::doc::PeerId;
use collab_core::session::SessionLimits;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::task::{self, TaskContext};
use super::{JoinError, JoinRequest, SessionHandle, SessionMsg, SessionTable};
use crate::budget::Budget;
use crate::store::Store;

/// Bound of a session's inbound queue; senders wait when it is full (backpressure).
const SESSION_QUEUE: usize = 1024;

/// How often a request is retried against a session that is being evicted.
const RETRIES: usize = 16;

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
        Arc::new(Registry {
            context: Arc::new(TaskContext {
                sessions: SessionTable::default(),
                store,
                config,
                shutdown,
            }),
            next_peer: AtomicU64::new(1),
            tasks: TaskTracker::new(),
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
    /// (its queue is closed) is replaced.
    pub fn get_or_start(&self, id: &str) -> SessionHandle {
        let sessions = &self.context.sessions.0;
        if let Some(handle) = sessions.get(id) {
            if !handle.tx.is_closed() {
                return handle.clone();
            }
        }
        let mut entry = sessions
            .entry(Arc::from(id))
            .or_insert_with(|| self.start(id));
        if entry.tx.is_closed() {
            *entry = self.start(id);
        }
        entry.clone()
    }

    fn start(&self, id: &str) -> SessionHandle {
        let (tx, rx) = mpsc::channel(SESSION_QUEUE);
        let handle = SessionHandle {
            id: Arc::from(id),
            tx,
        };
        self.tasks.spawn(task::run(
            self.context.clone(),
            handle.clone(),
            rx,
            self.tasks.clone(),
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
            let handle = self.get_or_start(id);
            let (tx, rx) = oneshot::channel();
            let msg = SessionMsg::Join(
                Box::new(JoinRequest {
                    peer: request.peer,
                    kind: request.kind,
                    user: request.user.clone(),
                    outbox: request.outbox.clone(),
                }),
                tx,
            );
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
            let handle = self.get_or_start(id);
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
