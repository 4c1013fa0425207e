//! Where session documents live between restarts.
//!
//! A small trait: load a session, append accepted updates (before anyone hears of them),
//! replace the log by a snapshot, list, delete. The session task calls it; implementations
//! do their blocking work off the async runtime.

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
    /// The store's thread is gone.
    #[error("the store thread has stopped")]
    Stopped,
    /// What is stored cannot be read back as a session document.
    #[error("the stored document is unreadable: {0}")]
    Unreadable(String),
}

pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Durable storage of session documents.
pub trait Store: Send + Sync + 'static {
    /// The session's stored updates, or `None` when it was never stored.
    fn load(&self, session: &str) -> StoreFuture<'_, Option<StoredSession>>;
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
    /// Makes everything appended durable (at shutdown).
    fn flush(&self) -> StoreFuture<'_, ()>;
}
