//! The async shell around the sans-IO sessions of `collab_core`: one task per loaded session
//! ([`task`]) and the registry that starts, finds and evicts them ([`registry`]).
//!
//! Everything that touches a session goes through its task as a [`SessionMsg`], so a session
//! needs no lock and every member sees changes in one order. The task works in batches: it
//! has the session handle every message waiting, appends what the session accepted to the
//! store in one call, and only then delivers (PROTOCOL §6).

pub mod registry;
mod task;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use collab_core::doc::{CheckedUpdate, PeerId};
use collab_core::protocol::json::ClientMessage;
use collab_core::protocol::yjs::YjsMessage;
use collab_core::session::{Access, ConnKind, Summary};
use dashmap::DashMap;
use tokio::sync::{mpsc, oneshot};

use crate::transport::Outbox;
pub use registry::Registry;

/// A connection asking to join.
#[derive(Debug)]
pub struct JoinRequest {
    pub peer: PeerId,
    pub kind: ConnKind,
    /// The user name (`None`: an anonymous Yjs connection, not in the user list).
    pub user: Option<Arc<str>>,
    /// What the connection's token grants ([`Access::OPEN`] without a key).
    pub access: Access,
    pub outbox: Outbox,
}

/// Why a join failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    /// The session was being evicted; look it up again.
    #[error("the session is closing")]
    Retry,
    /// The session could not be loaded or served.
    #[error("the session is unavailable: {0}")]
    Unavailable(String),
    /// A member holding the user name is present, and the joiner does not hold it.
    #[error("the user name is held by another connection")]
    NameHeld,
    /// The session is not in memory, and there is no room for it (`--max-sessions`, every
    /// session has members).
    #[error("the server holds as many sessions as it may")]
    Full,
}

/// What a session's task can be asked.
///
/// Every payload is one pointer (the sender of a message goes in its box): every session's
/// queue allocates room for 32 messages at once, and thousands of sessions sit idle.
#[derive(Debug)]
pub enum SessionMsg {
    Join(Box<PendingJoin>),
    Leave(PeerId),
    /// A valid JSON message. `ping` goes through the session too, so a `pong` tells the
    /// client that everything it sent before was applied.
    Json(Box<FromPeer<ClientMessage>>),
    /// A valid y-websocket message.
    Yjs(Box<FromPeer<YjsMessage>>),
    /// `POST /api/sessions/{s}/update`.
    ApplyUpdate(Box<ApiUpdate>),
    /// `GET /api/sessions/{s}/scene`: the scene's `state` JSON.
    Scene(oneshot::Sender<String>),
    /// `GET /api/sessions/{s}/update`: the whole document as one v1 update.
    EncodeState(oneshot::Sender<Result<Vec<u8>, String>>),
    /// `GET /api/sessions`.
    Summary(oneshot::Sender<Summary>),
    /// The registry needs room for another session (`--max-sessions`): leave memory if
    /// still idle.
    Evict,
}

const _: () = assert!(std::mem::size_of::<SessionMsg>() <= 16);

/// A message and the connection it came from.
#[derive(Debug)]
pub struct FromPeer<T> {
    pub peer: PeerId,
    pub message: T,
}

/// A join and where its outcome goes.
#[derive(Debug)]
pub struct PendingJoin {
    pub request: JoinRequest,
    pub reply: oneshot::Sender<Result<(), JoinError>>,
}

/// An update posted to the HTTP API, and where its outcome goes once it is stored.
#[derive(Debug)]
pub struct ApiUpdate {
    pub update: CheckedUpdate,
    pub reply: oneshot::Sender<Result<(), String>>,
}

/// A cheap handle to a running session task.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    pub id: Arc<str>,
    tx: mpsc::Sender<SessionMsg>,
    status: Arc<SessionStatus>,
}

/// What the registry reads of a session without asking its task: since when it has been idle
/// (no members), to pick the one to evict when memory is full.
#[derive(Debug, Default)]
pub struct SessionStatus {
    /// Milliseconds from the registry's epoch at which the session became idle, plus one;
    /// [`SessionStatus::BUSY`] while it has members or has been asked to leave.
    idle_since: AtomicU64,
}

impl SessionStatus {
    const BUSY: u64 = 0;

    fn idle_since(&self) -> u64 {
        self.idle_since.load(Ordering::Relaxed)
    }

    /// Set by the session's task.
    fn set_idle_since(&self, millis: Option<u64>) {
        let value = millis.map_or(Self::BUSY, |m| m.saturating_add(1));
        self.idle_since.store(value, Ordering::Relaxed);
    }

    /// Claims the eviction of an idle session, if it is still idle since `since` and no one
    /// else claimed it; true when this call did (it then asks: [`SessionMsg::Evict`]).
    fn claim_eviction(&self, since: u64) -> bool {
        self.idle_since
            .compare_exchange(since, Self::BUSY, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }
}

impl SessionHandle {
    /// Sends a message; `Err` when the session task has stopped (look it up again).
    pub async fn send(&self, msg: SessionMsg) -> Result<(), SessionMsg> {
        self.tx.send(msg).await.map_err(|e| e.0)
    }

    /// Sends a message that needs no answer. Only when the session is busy is there
    /// something to await: the wait for room, in its own allocation, so that it does not
    /// enlarge every idle connection's task (see `server::connection`).
    pub fn send_or_wait(
        &self,
        msg: SessionMsg,
    ) -> Option<Pin<Box<dyn Future<Output = ()> + Send + '_>>> {
        use tokio::sync::mpsc::error::TrySendError;
        match self.tx.try_send(msg) {
            Ok(()) | Err(TrySendError::Closed(_)) => None,
            Err(TrySendError::Full(msg)) => Some(Box::pin(async move {
                let _ = self.tx.send(msg).await;
            })),
        }
    }

    fn same_task(&self, other: &SessionHandle) -> bool {
        self.tx.same_channel(&other.tx)
    }
}

/// The loaded sessions by id: the registry adds, a task removes itself when it stops.
#[derive(Debug, Default)]
pub struct SessionTable(DashMap<Arc<str>, SessionHandle>);

impl SessionTable {
    /// Removes `handle` if it is still the session's current task.
    fn remove(&self, handle: &SessionHandle) {
        self.0
            .remove_if(&handle.id, |_, current| current.same_task(handle));
    }
}
