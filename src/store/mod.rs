//! Where session documents live between restarts.
//!
//! A small trait: load a session, append accepted updates (before anyone hears of them),
//! replace the log by a snapshot, list what is stored, delete the sessions nobody touched for
//! long (`--retain-days`). The session task calls it (the dashboard lists); implementations do
//! their blocking work off the async runtime (a stalled disk must stall only the sessions
//! waiting for it).

pub mod memory;
pub mod sqlite;

use std::future::Future;
use std::pin::Pin;

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
}
