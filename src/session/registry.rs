//! The registry of loaded sessions: single-flight loading and eviction.
//!
//! Looking a session up either finds its running task or starts one in the same map entry,
//! so however many clients connect at the same moment the session is loaded once. The task
//! loads the document before it reads its first message, so nothing is served before the
//! load. A task that evicts itself first leaves the map, then refuses what is still queued
//! with [`JoinError::Retry`]; callers then look the session up again and get a fresh task,
//! never two live ones.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::{mpsc, oneshot, watch, Notify};

use super::{task, JoinError, JoinRequest, SessionHandle, SessionMsg};
use crate::doc::PeerId;
use crate::store::Store;

/// Bound of a session's inbound queue; senders wait when it is full (backpressure).
const SESSION_QUEUE: usize = 1024;

/// How often a request is retried against a session that is being evicted.
const RETRIES: usize = 16;

/// Limits and timings every session applies.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub evict_after: Duration,
    /// See [`crate::doc::Scene::with_correction_delay`].
    pub correction_delay: Duration,
    pub max_awareness_bytes: usize,
    pub max_awareness_states: usize,
    /// Compact the stored log after this many appended updates...
    pub compact_after_updates: usize,
    /// ...or once it holds this many bytes more than the last snapshot.
    pub compact_after_bytes: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            evict_after: Duration::from_secs(60),
            correction_delay: Duration::from_millis(250),
            max_awareness_bytes: 64 * 1024,
            max_awareness_states: 1024,
            compact_after_updates: 1000,
            compact_after_bytes: 4 * 1024 * 1024,
        }
    }
}

/// Every loaded session.
pub struct Registry {
    sessions: DashMap<Arc<str>, SessionHandle>,
    pub(super) store: Arc<dyn Store>,
    pub(super) config: SessionConfig,
    pub(super) shutdown: watch::Receiver<bool>,
    next_peer: AtomicU64,
    /// Session tasks still running (loaded, or writing their last batch after eviction).
    live_tasks: AtomicUsize,
    all_stopped: Notify,
}

impl Registry {
    pub fn new(
        store: Arc<dyn Store>,
        config: SessionConfig,
        shutdown: watch::Receiver<bool>,
    ) -> Arc<Self> {
        Arc::new(Registry {
            sessions: DashMap::new(),
            store,
            config,
            shutdown,
            next_peer: AtomicU64::new(1),
            live_tasks: AtomicUsize::new(0),
            all_stopped: Notify::new(),
        })
    }

    /// A new connection id; ids grow, so sorting by id is sorting by join order.
    pub fn next_peer_id(&self) -> PeerId {
        self.next_peer.fetch_add(1, Ordering::Relaxed)
    }

    /// Number of sessions in memory.
    pub fn loaded(&self) -> usize {
        self.sessions.len()
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Handles of every loaded session.
    pub fn handles(&self) -> Vec<SessionHandle> {
        self.sessions.iter().map(|e| e.value().clone()).collect()
    }

    /// The session's task, started (and loading) if it was not running. A task that died
    /// (its queue is closed) is replaced.
    pub fn get_or_start(self: &Arc<Self>, id: &str) -> SessionHandle {
        if let Some(handle) = self.sessions.get(id) {
            if !handle.tx.is_closed() {
                return handle.clone();
            }
        }
        let mut entry = self
            .sessions
            .entry(Arc::from(id))
            .or_insert_with(|| self.start(id));
        if entry.tx.is_closed() {
            *entry = self.start(id);
        }
        entry.clone()
    }

    fn start(self: &Arc<Self>, id: &str) -> SessionHandle {
        let (tx, rx) = mpsc::channel(SESSION_QUEUE);
        let handle = SessionHandle {
            id: Arc::from(id),
            tx,
        };
        task::spawn(self.clone(), handle.clone(), rx);
        handle
    }

    /// Removes `handle` from the map if it is still the session's current task.
    pub(super) fn remove(&self, handle: &SessionHandle) {
        self.sessions
            .remove_if(&handle.id, |_, current| current.same_task(handle));
    }

    pub(super) fn task_started(&self) {
        self.live_tasks.fetch_add(1, Ordering::AcqRel);
    }

    pub(super) fn task_stopped(&self) {
        if self.live_tasks.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.all_stopped.notify_waiters();
        }
    }

    /// Waits until every session task has stopped (at shutdown: each wrote its last batch
    /// and its compaction).
    pub async fn wait_stopped(&self) {
        loop {
            let stopped = self.all_stopped.notified();
            if self.live_tasks.load(Ordering::Acquire) == 0 {
                return;
            }
            stopped.await;
        }
    }

    /// Joins a session, retrying while it is being evicted.
    pub async fn join(
        self: &Arc<Self>,
        id: &str,
        request: JoinRequest,
    ) -> Result<SessionHandle, JoinError> {
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

    /// Asks a session something, retrying while it is being evicted.
    pub async fn request<T>(
        self: &Arc<Self>,
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
