//! Sessions: one task per session owns its scene, its members and their outboxes.
//!
//! Everything that touches a session's document goes through its task as a [`SessionMsg`],
//! so the document needs no lock and every member sees changes in one order. The task works
//! in batches: it takes every message waiting, applies them, appends the resulting updates to
//! the store in one call, and only then sends anything, so nothing is broadcast before it is
//! durable (PROTOCOL §6) and a burst costs one store write.

pub mod awareness;
pub mod outbox;
pub mod registry;
mod task;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::doc::PeerId;
use crate::protocol::json::ClientMessage;
use crate::protocol::yjs::YjsMessage;

pub use outbox::{outbox, CloseReason, Frame, Inbox, Outbox};
pub use registry::Registry;

/// Which protocol a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnKind {
    /// Optiverse JSON on `/ws/{session}/{user}`.
    Legacy,
    /// `/ws/{session}/{user}?yjs=1`: JSON control messages, Yjs binary for the document.
    LegacyYjs,
    /// y-websocket on `/yjs/{session}`.
    Yjs,
}

impl ConnKind {
    /// Whether the connection gets JSON messages (ack, user events, errors).
    pub fn speaks_json(self) -> bool {
        self != ConnKind::Yjs
    }

    /// Whether the connection gets the document as Yjs updates.
    pub fn speaks_yjs(self) -> bool {
        self != ConnKind::Legacy
    }
}

/// A connection asking to join.
#[derive(Debug)]
pub struct JoinRequest {
    pub peer: PeerId,
    pub kind: ConnKind,
    /// The user name (`None`: an anonymous Yjs connection, not in the user list).
    pub user: Option<Arc<str>>,
    pub outbox: Outbox,
}

/// Why a join failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinError {
    /// The session was being evicted; look it up again.
    Retry,
    /// The session could not be loaded.
    Unavailable(String),
}

/// What a session's task can be asked.
///
/// Payloads are boxed down to 16 bytes: every session's queue allocates room for 32 of its
/// largest message, and thousands of sessions sit idle.
#[derive(Debug)]
pub enum SessionMsg {
    Join(Box<JoinRequest>, oneshot::Sender<Result<(), JoinError>>),
    Leave(PeerId),
    /// A valid JSON message from a legacy connection. `ping` goes through the session too,
    /// so a `pong` tells the client that everything it sent before was applied.
    Legacy(PeerId, Box<ClientMessage>),
    /// A valid y-websocket message.
    Yjs(PeerId, Box<YjsMessage>),
    /// `POST /api/sessions/{s}/update`.
    ApplyUpdate(Box<ApiUpdate>),
    /// `GET /api/sessions/{s}/scene`: the scene's `state` JSON.
    Scene(oneshot::Sender<String>),
    /// `GET /api/sessions/{s}/update`: the whole document as one v1 update.
    EncodeState(oneshot::Sender<Result<Vec<u8>, String>>),
    /// `GET /api/sessions`.
    Summary(oneshot::Sender<SessionSummary>),
}

/// An update posted to the HTTP API, and where its outcome goes.
#[derive(Debug)]
pub struct ApiUpdate {
    pub bytes: Vec<u8>,
    pub reply: oneshot::Sender<Result<(), String>>,
}

/// One line of `GET /api/sessions`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SessionSummary {
    pub id: String,
    pub users: Vec<String>,
    pub connections: usize,
    pub item_count: usize,
    pub document_bytes: usize,
}

/// A cheap handle to a running session task.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    pub id: Arc<str>,
    tx: mpsc::Sender<SessionMsg>,
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

const _: () = assert!(std::mem::size_of::<SessionMsg>() <= 24);
