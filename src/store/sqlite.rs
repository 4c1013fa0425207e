//! `--store sqlite` (the default): one embedded SQLite database, `collab.db` in `--data-dir`.
//!
//! A dedicated thread owns the connection, so no SQLite call ever blocks the async runtime.
//! It commits in groups: every request that arrived while the previous transaction ran goes
//! into the next one, so many busy sessions cost one commit (and one fsync) between them.
//! The database runs in WAL mode; `--fsync normal` survives a crash of the process,
//! `--fsync always` also a power loss.
//!
//! Schema (readable with `sqlite3 data/collab.db .schema`):
//! * `sessions(id, initialized, host, updated_at)`: one row per stored session;
//! * `updates(id, session, kind, data, created_at)`: the session's document as a `snapshot`
//!   followed by the `update`s accepted since, in `id` order.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;

use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::oneshot;

use super::{SessionMeta, Store, StoreError, StoreFuture, StoredSession};
use crate::config::FsyncMode;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS sessions (
    id          TEXT PRIMARY KEY,
    initialized INTEGER NOT NULL DEFAULT 0,
    host        TEXT,
    updated_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE TABLE IF NOT EXISTS updates (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    session    TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    kind       TEXT NOT NULL CHECK (kind IN ('snapshot', 'update')),
    data       BLOB NOT NULL,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX IF NOT EXISTS updates_by_session ON updates(session, id);
";

/// Most requests folded into one transaction.
const GROUP_LIMIT: usize = 1024;

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

enum Request {
    Load(String, Reply<Option<StoredSession>>),
    Append(String, Vec<Vec<u8>>, SessionMeta, Reply<u64>),
    Compact(String, Vec<u8>, u64, SessionMeta, Reply<()>),
    List(Reply<Vec<String>>),
    Delete(String, Reply<()>),
    Flush(Reply<()>),
}

/// The embedded store. Dropping it stops its thread after the queued requests.
pub struct SqliteStore {
    tx: mpsc::Sender<Request>,
    path: PathBuf,
}

impl SqliteStore {
    /// Opens (creating if needed) `collab.db` in `dir`.
    pub fn open(dir: &Path, fsync: FsyncMode) -> Result<SqliteStore, StoreError> {
        let path = dir.join("collab.db");
        let fail =
            |e: &dyn std::fmt::Display| StoreError(format!("cannot open {}: {e}", path.display()));
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError(format!(
                "cannot create the data directory {}: {e}",
                dir.display()
            ))
        })?;
        let conn = Connection::open(&path).map_err(|e| fail(&e))?;
        let synchronous = match fsync {
            FsyncMode::Normal => "NORMAL",
            FsyncMode::Always => "FULL",
        };
        conn.execute_batch(&format!(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous={synchronous}; PRAGMA foreign_keys=ON; PRAGMA busy_timeout=5000;"
        ))
        .map_err(|e| fail(&e))?;
        conn.execute_batch(SCHEMA).map_err(|e| fail(&e))?;
        let (tx, rx) = mpsc::channel();
        thread::Builder::new()
            .name("sqlite-store".into())
            .spawn(move || writer(conn, rx))
            .map_err(|e| fail(&e))?;
        Ok(SqliteStore { tx, path })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn call<T: Send + 'static>(
        &self,
        make: impl FnOnce(Reply<T>) -> Request,
    ) -> StoreFuture<'_, T> {
        let (reply, rx) = oneshot::channel();
        let sent = self.tx.send(make(reply));
        Box::pin(async move {
            sent.map_err(|_| StoreError("the store thread has stopped".into()))?;
            rx.await
                .map_err(|_| StoreError("the store thread has stopped".into()))?
        })
    }
}

impl Store for SqliteStore {
    fn load(&self, session: &str) -> StoreFuture<'_, Option<StoredSession>> {
        let session = session.to_owned();
        self.call(|r| Request::Load(session, r))
    }

    fn append(
        &self,
        session: &str,
        updates: Vec<Vec<u8>>,
        meta: SessionMeta,
    ) -> StoreFuture<'_, u64> {
        let session = session.to_owned();
        self.call(|r| Request::Append(session, updates, meta, r))
    }

    fn compact(
        &self,
        session: &str,
        snapshot: Vec<u8>,
        upto: u64,
        meta: SessionMeta,
    ) -> StoreFuture<'_, ()> {
        let session = session.to_owned();
        self.call(|r| Request::Compact(session, snapshot, upto, meta, r))
    }

    fn list(&self) -> StoreFuture<'_, Vec<String>> {
        self.call(Request::List)
    }

    fn delete(&self, session: &str) -> StoreFuture<'_, ()> {
        let session = session.to_owned();
        self.call(|r| Request::Delete(session, r))
    }

    fn flush(&self) -> StoreFuture<'_, ()> {
        self.call(Request::Flush)
    }
}

fn err(e: rusqlite::Error) -> StoreError {
    StoreError(e.to_string())
}

/// The store thread: reads run at once; writes that arrive together share one transaction.
fn writer(mut conn: Connection, rx: mpsc::Receiver<Request>) {
    let mut written = WrittenMeta::new();
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        while group.len() < GROUP_LIMIT {
            match rx.try_recv() {
                Ok(next) => group.push(next),
                Err(_) => break,
            }
        }
        let mut writes = Vec::new();
        for request in group {
            match request {
                Request::Load(session, reply) => {
                    let _ = reply.send(load(&conn, &session).map_err(err));
                }
                Request::List(reply) => {
                    let _ = reply.send(list(&conn).map_err(err));
                }
                Request::Flush(reply) => {
                    let _ = reply.send(
                        conn.execute_batch("PRAGMA wal_checkpoint(PASSIVE);")
                            .map_err(err),
                    );
                }
                write => writes.push(write),
            }
        }
        if !writes.is_empty() {
            commit_group(&mut conn, writes, &mut written);
        }
    }
}

/// The metadata this thread last wrote per session. Sessions append with every batch and
/// their metadata rarely changes: rewriting its row each time would add a page to every
/// commit. Cleared when a transaction fails (its writes were rolled back).
type WrittenMeta = std::collections::HashMap<String, SessionMeta>;

/// Runs a group of writes in one transaction. If the transaction fails as a whole, each
/// write is retried alone, so one bad request cannot fail the others.
fn commit_group(conn: &mut Connection, writes: Vec<Request>, written: &mut WrittenMeta) {
    let result = (|| {
        let txn = conn.transaction()?;
        let positions = writes
            .iter()
            .map(|write| apply_write(&txn, write, written))
            .collect::<rusqlite::Result<Vec<u64>>>()?;
        txn.commit()?;
        Ok(positions)
    })();
    if result.is_err() {
        written.clear();
    }
    match result {
        Ok(positions) => {
            for (write, position) in writes.into_iter().zip(positions) {
                reply_write(write, Ok(position));
            }
        }
        Err(_) if writes.len() > 1 => {
            for write in writes {
                commit_group(conn, vec![write], written);
            }
        }
        Err(e) => {
            let error = err(e);
            for write in writes {
                reply_write(write, Err(error.clone()));
            }
        }
    }
}

/// Answers a write; `position` is the last update's row id for an append.
fn reply_write(write: Request, position: Result<u64, StoreError>) {
    match write {
        Request::Append(.., reply) => {
            let _ = reply.send(position);
        }
        Request::Compact(.., reply) | Request::Delete(_, reply) => {
            let _ = reply.send(position.map(|_| ()));
        }
        Request::Load(..) | Request::List(..) | Request::Flush(..) => {}
    }
}

fn upsert_meta(conn: &Connection, session: &str, meta: &SessionMeta) -> rusqlite::Result<()> {
    // Cached statements: compiling SQL costs more than running these small statements.
    conn.prepare_cached(
        "INSERT INTO sessions (id, initialized, host) VALUES (?1, ?2, ?3)
         ON CONFLICT(id) DO UPDATE SET initialized = excluded.initialized, host = excluded.host,
             updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')",
    )?
    .execute(params![session, meta.initialized, meta.host])?;
    Ok(())
}

/// Applies one write inside the group's transaction; returns the session's last update
/// position afterwards (meaningful for appends).
fn apply_write(
    conn: &Connection,
    write: &Request,
    written: &mut WrittenMeta,
) -> rusqlite::Result<u64> {
    match write {
        Request::Append(session, updates, meta, _) => {
            if written.get(session) != Some(meta) {
                upsert_meta(conn, session, meta)?;
                written.insert(session.clone(), meta.clone());
            }
            let mut insert = conn.prepare_cached(
                "INSERT INTO updates (session, kind, data) VALUES (?1, 'update', ?2)",
            )?;
            for update in updates {
                insert.execute(params![session, update])?;
            }
            if updates.is_empty() {
                last_position(conn, session)
            } else {
                Ok(conn.last_insert_rowid() as u64)
            }
        }
        Request::Compact(session, snapshot, upto, meta, _) => {
            upsert_meta(conn, session, meta)?;
            written.insert(session.clone(), meta.clone());
            conn.execute(
                "DELETE FROM updates WHERE session = ?1 AND id <= ?2",
                params![session, upto],
            )?;
            conn.execute(
                "INSERT INTO updates (session, kind, data) VALUES (?1, 'snapshot', ?2)",
                params![session, snapshot],
            )?;
            Ok(0)
        }
        Request::Delete(session, _) => {
            written.remove(session);
            conn.execute("DELETE FROM updates WHERE session = ?1", params![session])?;
            conn.execute("DELETE FROM sessions WHERE id = ?1", params![session])?;
            Ok(0)
        }
        Request::Load(..) | Request::List(..) | Request::Flush(..) => Ok(0),
    }
}

fn last_position(conn: &Connection, session: &str) -> rusqlite::Result<u64> {
    conn.prepare_cached("SELECT COALESCE(MAX(id), 0) FROM updates WHERE session = ?1")?
        .query_row(params![session], |row| row.get(0))
}

fn load(conn: &Connection, session: &str) -> rusqlite::Result<Option<StoredSession>> {
    let meta = conn
        .query_row(
            "SELECT initialized, host FROM sessions WHERE id = ?1",
            params![session],
            |row| {
                Ok(SessionMeta {
                    initialized: row.get(0)?,
                    host: row.get(1)?,
                })
            },
        )
        .optional()?;
    let Some(meta) = meta else {
        return Ok(None);
    };
    let mut query =
        conn.prepare_cached("SELECT data FROM updates WHERE session = ?1 ORDER BY id")?;
    let updates = query
        .query_map(params![session], |row| row.get::<_, Vec<u8>>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let last_seq = last_position(conn, session)?;
    Ok(Some(StoredSession {
        updates,
        meta,
        last_seq,
    }))
}

fn list(conn: &Connection) -> rusqlite::Result<Vec<String>> {
    let mut query = conn.prepare_cached("SELECT id FROM sessions ORDER BY id")?;
    let ids = query.query_map([], |row| row.get(0))?.collect();
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn appends_compacts_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), FsyncMode::Normal).unwrap();
        assert!(store.load("s").await.unwrap().is_none());
        let meta = SessionMeta {
            initialized: true,
            host: Some("alice".into()),
        };
        let first = store
            .append("s", vec![vec![1], vec![2]], meta.clone())
            .await
            .unwrap();
        let second = store
            .append("s", vec![vec![3]], meta.clone())
            .await
            .unwrap();
        assert!(second > first);
        let loaded = store.load("s").await.unwrap().unwrap();
        assert_eq!(loaded.updates, vec![vec![1], vec![2], vec![3]]);
        assert_eq!(loaded.meta, meta);
        assert_eq!(loaded.last_seq, second);
        // A compaction covering the first append keeps what came after it.
        store
            .compact("s", vec![9, 9], first, meta.clone())
            .await
            .unwrap();
        assert_eq!(
            store.load("s").await.unwrap().unwrap().updates,
            vec![vec![3], vec![9, 9]]
        );
        let all = store.load("s").await.unwrap().unwrap().last_seq;
        store
            .compact("s", vec![8], all, meta.clone())
            .await
            .unwrap();
        assert_eq!(
            store.load("s").await.unwrap().unwrap().updates,
            vec![vec![8]]
        );
        // An append of metadata alone keeps the position.
        let meta_only = store
            .append("s", Vec::new(), SessionMeta::default())
            .await
            .unwrap();
        assert_eq!(meta_only, store.load("s").await.unwrap().unwrap().last_seq);
        assert_eq!(store.list().await.unwrap(), vec!["s".to_owned()]);
        drop(store);
        let reopened = SqliteStore::open(dir.path(), FsyncMode::Always).unwrap();
        let reloaded = reopened.load("s").await.unwrap().unwrap();
        assert_eq!(reloaded.updates, vec![vec![8]]);
        assert_eq!(reloaded.meta, SessionMeta::default());
        reopened.delete("s").await.unwrap();
        assert!(reopened.load("s").await.unwrap().is_none());
    }

    #[test]
    fn an_unopenable_path_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        let e = SqliteStore::open(&file, FsyncMode::Normal).err().unwrap();
        assert!(e.0.contains("not-a-dir"), "{e}");
    }
}
