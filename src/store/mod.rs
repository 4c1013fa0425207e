//! Where session documents live between restarts.
//!
//! A small trait: load a session, append accepted updates (before anyone hears of them),
//! replace the log by a snapshot, list what is stored, delete the sessions nobody touched for
//! long (`--retain-days`). The session task calls it (the dashboard lists); implementations do
//! their blocking work off the async runtime (a stalled disk must stall only the sessions
//! waiting for it).

pub mod memory;
pub mod redis;
pub mod sqlite;

use std::future::Future;
use std::pin::Pin;

use collab_core::session::{Input, PresenceChange};

/// Per-session facts persisted beside the document.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionMeta {
    /// Whether an item or an upload has reached the scene.
    pub initialized: bool,
}

/// A stored session: a snapshot and/or log of v1 updates, in order.
#[derive(Debug, Clone, Default)]
pub struct StoredSession {
    pub updates: Vec<Vec<u8>>,
    pub meta: SessionMeta,
    /// Position of the last stored update (see [`Store::append`]).
    pub last_seq: u64,
}

/// One stored session, as [`Store::list`] reports it, without loading its document.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StoredSummary {
    pub id: String,
    /// Bytes of its stored snapshot and updates: what loading it reads (the document itself,
    /// encoded whole, is at most this).
    pub stored_bytes: u64,
    /// When the newest change it holds was stored (RFC 3339 UTC, as the protocol's
    /// timestamps); `None` when it holds no update (metadata only).
    pub last_change: Option<String>,
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The data directory or the database file cannot be opened or created.
    #[error("cannot open the store at {}: {reason}", path.display())]
    Open {
        path: std::path::PathBuf,
        reason: String,
    },
    /// The database refused an operation.
    #[error("database error: {0}")]
    Database(#[from] rusqlite::Error),
    /// A thread of the store is gone.
    #[error("a store thread has stopped")]
    Stopped,
    /// A file of the store was removed, replaced or made unwritable under the server.
    #[error(transparent)]
    Unusable(#[from] sqlite::UnusableFile),
    /// What is stored cannot be read back as a session document.
    #[error("the stored document is unreadable: {0}")]
    Unreadable(String),
    /// Redis (`--cluster`) failed or answered what this server does not write.
    #[error("cluster store: {0}")]
    Cluster(String),
}

/// What other nodes appended to a followed session, in stream order.
#[derive(Debug)]
pub struct RemoteBatch {
    /// v1 updates (a snapshot first when the follower missed trimmed entries); already
    /// stored: they are applied, never appended again.
    pub updates: Vec<Vec<u8>>,
    /// Position of the last entry read, this node's own included: the follower's document
    /// holds every entry up to it once it applied `updates`.
    pub upto: u64,
}

/// What a followed session's feed hands its task.
#[derive(Debug)]
pub enum Remote {
    /// Other nodes' updates.
    Updates(RemoteBatch),
    /// Other nodes' presence: their connections joining and leaving, their awareness
    /// changes, a node gone (`Input::RemoteJoined`, `RemoteLeft`, `RemoteAwareness`,
    /// `NodeGone`).
    Presence(Vec<Input>),
    /// This node's heartbeat had expired: the other nodes may have let its connections
    /// leave, so the task tells its members again (`Session::presence`).
    Reannounce,
}

/// A session's feed of other nodes' updates and presence, while its task holds it.
pub struct Following {
    pub rx: tokio::sync::mpsc::Receiver<Remote>,
    /// This node's id among the nodes: what its presence is told under.
    pub node: u64,
    /// The other nodes' connections in the session when the feed started, as
    /// `Input::RemoteJoined`s in join order, then their awareness states as
    /// `Input::RemoteAwareness`; the feed goes on from there.
    pub present: Vec<Input>,
    /// Stops the feed when dropped.
    _unfollow: Box<dyn Send + Sync>,
}

pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Durable storage of session documents.
pub trait Store: Send + Sync + 'static {
    /// The session's stored updates, or `None` when it was never stored.
    fn load(&self, session: &str) -> StoreFuture<'_, Option<StoredSession>>;
    /// Whether the session was ever stored (without reading its document).
    fn contains(&self, session: &str) -> StoreFuture<'_, bool>;
    /// Appends updates (durably, per the store's setting) and writes the metadata; returns
    /// the position of the last stored update. Positions only grow.
    fn append(
        &self,
        session: &str,
        updates: Vec<Vec<u8>>,
        meta: SessionMeta,
    ) -> StoreFuture<'_, u64>;
    /// Replaces the session's updates up to position `upto` by one snapshot update. Later
    /// updates (a successor task's, after an eviction) are kept.
    fn compact(
        &self,
        session: &str,
        snapshot: Vec<u8>,
        upto: u64,
        meta: SessionMeta,
    ) -> StoreFuture<'_, ()>;
    /// Every stored session, by id, with its stored size and last change: what the dashboard
    /// shows of sessions not in memory. Loads no document.
    fn list(&self) -> StoreFuture<'_, Vec<StoredSummary>>;
    /// Makes everything appended durable (at shutdown).
    fn flush(&self) -> StoreFuture<'_, ()>;
    /// Deletes the sessions last written before `cutoff`, except those in `keep` (the ones
    /// in memory); returns the names deleted.
    fn remove_untouched(
        &self,
        cutoff: std::time::SystemTime,
        keep: Vec<String>,
    ) -> StoreFuture<'_, Vec<String>>;
    /// For a store other servers append to (`--cluster`): the session's feed of what they
    /// append after position `after`. `None` for a store only this process writes.
    fn follow(&self, _session: &str, _after: u64) -> StoreFuture<'_, Option<Following>> {
        Box::pin(std::future::ready(Ok(None)))
    }
    /// For a store other servers follow (`--cluster`): tells them of this node's presence
    /// changes in the session. Never called without a feed ([`Store::follow`]).
    fn publish_presence(
        &self,
        _session: &str,
        _changes: Vec<PresenceChange>,
    ) -> StoreFuture<'_, ()> {
        Box::pin(std::future::ready(Ok(())))
    }
}
