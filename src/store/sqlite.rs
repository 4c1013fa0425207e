//! `--store sqlite` (the default): one embedded SQLite database, `collab.db` in `--data-dir`.
//!
//! The database runs in WAL mode; `--fsync normal` survives a crash of the process,
//! `--fsync always` also a power loss. Where writes run depends on that setting:
//!
//! * `--fsync normal` (`synchronous=NORMAL`: a commit appends to the WAL, no fsync): each write
//!   (append, compact) runs inline on the calling task's thread, under a mutex, as its own
//!   transaction; the returned future is already complete. Handing each append to a store
//!   thread cost several times the commit itself at low rates (BENCHMARKS.md, "Where the CPU
//!   goes"). These commits never checkpoint (an automatic checkpoint fsyncs and copies up to
//!   1000 pages: milliseconds on the runtime thread): the store thread does, asked every
//!   [`CHECKPOINT_AFTER_COMMITS`] commits or [`CHECKPOINT_AFTER_BYTES`] bytes, with a PASSIVE
//!   checkpoint that never makes writers wait ([`checkpoint`] bounds the WAL's growth).
//! * `--fsync always` (`synchronous=FULL`, an fsync per commit): a dedicated thread commits in
//!   groups: every write that arrived while the previous transaction ran goes into the next
//!   one, so many busy sessions share one fsync, and no fsync blocks the runtime.
//!
//! Reads and flushes always run on the store thread, which with `--fsync normal`
//! has a connection of its own (WAL readers do not block the writer): reading a whole session
//! never blocks the runtime.
//!
//! Schema (readable with `sqlite3 data/collab.db .schema`):
//! * `sessions(id, initialized, updated_at)`: one row per stored session (databases written
//!   before the host rule went keep an unused `host` column);
//! * `updates(id, session, kind, data, created_at)`: the session's document as a `snapshot`
//!   followed by the `update`s accepted since, in `id` order.

use std::path::Path;
use std::sync::{mpsc, Mutex, MutexGuard};
use std::thread;

use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::oneshot;
use tracing::warn;

use super::{SessionMeta, Store, StoreError, StoreFuture, StoredSession};
use crate::config::FsyncMode;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS sessions (
    id          TEXT PRIMARY KEY,
    initialized INTEGER NOT NULL DEFAULT 0,
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

/// With `--fsync normal`, the store thread checkpoints after this many inline commits or
/// bytes of data written, whichever comes first. A small commit adds about three pages to the
/// WAL (the table's leaf, the index's leaf, `sqlite_sequence`), so 256 of them come near
/// SQLite's own default of 1000 pages; the byte bound holds when updates are large.
const CHECKPOINT_AFTER_COMMITS: u32 = 256;
const CHECKPOINT_AFTER_BYTES: usize = 4 << 20;

/// Pages the WAL may hold, not wholly checkpointed, before a checkpoint makes writers wait
/// (see [`checkpoint`]): 32 MiB with 4 KiB pages, several times what the triggers above let
/// accumulate.
const WAL_LIMIT_PAGES: i64 = 8192;

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// A change to the stored sessions.
enum Write {
    Append(String, Vec<Vec<u8>>, SessionMeta),
    Compact(String, Vec<u8>, u64, SessionMeta),
}

impl Write {
    /// Bytes of documents it stores.
    fn data_bytes(&self) -> usize {
        match self {
            Write::Append(_, updates, _) => updates.iter().map(Vec::len).sum(),
            Write::Compact(_, snapshot, ..) => snapshot.len(),
        }
    }
}

/// Work for the store thread.
enum Request {
    Load(String, Reply<Option<StoredSession>>),
    /// Only with `--fsync always`; otherwise writes run inline. Resolves to the position.
    Write(Write, Reply<u64>),
    /// Only with `--fsync normal`: enough was written inline since the last checkpoint.
    Checkpoint,
    Flush(Reply<()>),
}

/// The embedded store. Dropping it stops its thread after the queued requests.
pub struct SqliteStore {
    /// To the store thread.
    tx: mpsc::Sender<Request>,
    /// With `--fsync normal`: the write connection, used on the caller's thread.
    inline: Option<Mutex<InlineWriter>>,
}

/// The write connection with `--fsync normal`, and what its commits still owe.
struct InlineWriter {
    conn: Connection,
    written: WrittenMeta,
    /// Commits and bytes since the store thread was last asked to checkpoint.
    commits: u32,
    bytes: usize,
}

impl InlineWriter {
    /// Commits `write` alone; returns its outcome and whether a checkpoint is now due.
    fn commit(&mut self, write: &Write) -> (Result<u64, StoreError>, bool) {
        let outcome = commit_one(&mut self.conn, write, &mut self.written);
        self.commits += 1;
        self.bytes += write.data_bytes();
        let checkpoint_due =
            self.commits >= CHECKPOINT_AFTER_COMMITS || self.bytes >= CHECKPOINT_AFTER_BYTES;
        if checkpoint_due {
            self.commits = 0;
            self.bytes = 0;
        }
        (outcome, checkpoint_due)
    }
}

/// Locks the write connection. A panic while it was held left its transaction open, which the
/// next [`in_transaction`] rolls back, so only the metadata cache can be wrong: it is
/// cleared, and the lock usable again.
fn lock(inline: &Mutex<InlineWriter>) -> MutexGuard<'_, InlineWriter> {
    inline.lock().unwrap_or_else(|poisoned| {
        let mut writer = poisoned.into_inner();
        writer.written.clear();
        inline.clear_poison();
        writer
    })
}

/// Opens a connection to `path` with the settings every connection of the store shares.
fn connect(path: &Path, synchronous: &str) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.execute_batch(&format!(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous={synchronous}; PRAGMA foreign_keys=ON; PRAGMA busy_timeout=5000;"
    ))?;
    Ok(conn)
}

impl SqliteStore {
    /// Opens (creating if needed) `collab.db` in `dir`.
    pub fn open(dir: &Path, fsync: FsyncMode) -> Result<SqliteStore, StoreError> {
        let path = dir.join("collab.db");
        let fail = |e: &dyn std::fmt::Display| StoreError::Open {
            path: path.clone(),
            reason: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(|e| fail(&e))?;
        let synchronous = match fsync {
            FsyncMode::Normal => "NORMAL",
            FsyncMode::Always => "FULL",
        };
        let conn = connect(&path, synchronous).map_err(|e| fail(&e))?;
        conn.execute_batch(SCHEMA).map_err(|e| fail(&e))?;
        let (thread_conn, inline) = match fsync {
            FsyncMode::Always => (conn, None),
            FsyncMode::Normal => {
                // The store thread checkpoints, on a connection of its own.
                conn.execute_batch("PRAGMA wal_autocheckpoint=0;")
                    .map_err(|e| fail(&e))?;
                let writer = InlineWriter {
                    conn,
                    written: WrittenMeta::new(),
                    commits: 0,
                    bytes: 0,
                };
                let reader = connect(&path, synchronous).map_err(|e| fail(&e))?;
                (reader, Some(Mutex::new(writer)))
            }
        };
        let (tx, rx) = mpsc::channel();
        thread::Builder::new()
            .name("sqlite-store".into())
            .spawn(move || serve(thread_conn, rx))
            .map_err(|e| fail(&e))?;
        Ok(SqliteStore { tx, inline })
    }

    fn call<T: Send + 'static>(
        &self,
        make: impl FnOnce(Reply<T>) -> Request,
    ) -> StoreFuture<'_, T> {
        let (reply, rx) = oneshot::channel();
        let sent = self.tx.send(make(reply));
        Box::pin(async move {
            sent.map_err(|_| StoreError::Stopped)?;
            rx.await.map_err(|_| StoreError::Stopped)?
        })
    }

    /// Runs a write: inline with `--fsync normal` (the future is then complete), else on the
    /// store thread. Resolves to the session's last update position afterwards.
    fn write(&self, write: Write) -> StoreFuture<'_, u64> {
        let Some(inline) = &self.inline else {
            return self.call(|reply| Request::Write(write, reply));
        };
        let (outcome, checkpoint_due) = lock(inline).commit(&write);
        if checkpoint_due {
            // Fails only if the thread died, which every load and flush then reports.
            let _ = self.tx.send(Request::Checkpoint);
        }
        Box::pin(std::future::ready(outcome))
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
        self.write(Write::Append(session.to_owned(), updates, meta))
    }

    fn compact(
        &self,
        session: &str,
        snapshot: Vec<u8>,
        upto: u64,
        meta: SessionMeta,
    ) -> StoreFuture<'_, ()> {
        let done = self.write(Write::Compact(session.to_owned(), snapshot, upto, meta));
        Box::pin(async move { done.await.map(|_| ()) })
    }

    fn flush(&self) -> StoreFuture<'_, ()> {
        self.call(Request::Flush)
    }
}

/// The store thread: reads and flushes run at once; writes that arrive together share one
/// transaction; the checkpoints asked for meanwhile run once, after them.
fn serve(mut conn: Connection, rx: mpsc::Receiver<Request>) {
    let mut written = WrittenMeta::new();
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        group.extend(rx.try_iter().take(GROUP_LIMIT - 1));
        let mut writes = Vec::new();
        let mut replies = Vec::new();
        let mut checkpoint_due = false;
        for request in group {
            match request {
                Request::Load(session, reply) => {
                    let _ = reply.send(load(&conn, &session).map_err(StoreError::from));
                }
                Request::Flush(reply) => {
                    let _ =
                        reply.send(checkpoint(&conn, WAL_LIMIT_PAGES).map_err(StoreError::from));
                }
                Request::Checkpoint => checkpoint_due = true,
                Request::Write(write, reply) => {
                    writes.push(write);
                    replies.push(reply);
                }
            }
        }
        if !writes.is_empty() {
            let outcomes = commit_group(&mut conn, &writes, &mut written);
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(outcome);
            }
        }
        if checkpoint_due {
            if let Err(e) = checkpoint(&conn, WAL_LIMIT_PAGES) {
                warn!(error = %e, "WAL checkpoint failed");
            }
        }
    }
}

/// Copies the WAL into the database file. A PASSIVE checkpoint never makes a writer wait, but
/// the WAL only starts over from its beginning when a writer finds it wholly copied: if every
/// checkpoint saw writes arrive meanwhile, it would grow without bound. So past `limit` pages
/// not wholly copied, a RESTART checkpoint makes writers wait (their busy timeout) until it has
/// copied everything, and the next write starts the WAL over.
fn checkpoint(conn: &Connection, limit: i64) -> rusqlite::Result<()> {
    let (pages, copied): (i64, i64) =
        conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
            Ok((row.get(1)?, row.get(2)?))
        })?;
    if pages > limit && copied < pages {
        conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |_| Ok(()))?;
    }
    Ok(())
}

/// The metadata the write connection last wrote per session. Sessions append with every
/// batch and their metadata rarely changes: rewriting its row each time would add a page to
/// every commit. Cleared when a transaction fails (its writes were rolled back).
type WrittenMeta = std::collections::HashMap<String, SessionMeta>;

/// Runs `body` in a transaction and commits it, or rolls it back.
///
/// `BEGIN` and `COMMIT` are cached statements: `Connection::transaction` compiles them for
/// every commit (BENCHMARKS.md, "Where the CPU goes").
fn in_transaction<T>(
    conn: &mut Connection,
    written: &mut WrittenMeta,
    body: impl FnOnce(&Connection, &mut WrittenMeta) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    if !conn.is_autocommit() {
        // A panic inside an earlier `body` left its transaction open.
        conn.execute_batch("ROLLBACK")?;
    }
    conn.prepare_cached("BEGIN")?.execute([])?;
    let result = body(conn, written).and_then(|value| {
        conn.prepare_cached("COMMIT")?.execute([])?;
        Ok(value)
    });
    if result.is_err() {
        written.clear();
        if !conn.is_autocommit() {
            // What failed was rolled back by SQLite or is rolled back here; a failing
            // ROLLBACK leaves the transaction to the check above.
            let _ = conn.execute_batch("ROLLBACK");
        }
    }
    result
}

/// Runs one write in a transaction of its own.
fn commit_one(
    conn: &mut Connection,
    write: &Write,
    written: &mut WrittenMeta,
) -> Result<u64, StoreError> {
    in_transaction(conn, written, |txn, written| {
        apply_write(txn, write, written)
    })
    .map_err(StoreError::from)
}

/// Runs a group of writes in one transaction; returns each one's outcome. If the transaction
/// fails as a whole, each write is retried alone, so one bad write cannot fail the others.
fn commit_group(
    conn: &mut Connection,
    writes: &[Write],
    written: &mut WrittenMeta,
) -> Vec<Result<u64, StoreError>> {
    let group = in_transaction(conn, written, |txn, written| {
        writes
            .iter()
            .map(|write| apply_write(txn, write, written))
            .collect::<rusqlite::Result<Vec<u64>>>()
    });
    match group {
        Ok(positions) => positions.into_iter().map(Ok).collect(),
        Err(e) if writes.len() == 1 => vec![Err(StoreError::from(e))],
        Err(_) => writes
            .iter()
            .map(|write| commit_one(conn, write, written))
            .collect(),
    }
}

fn upsert_meta(conn: &Connection, session: &str, meta: &SessionMeta) -> rusqlite::Result<()> {
    // Cached statements: compiling SQL costs more than running these small statements.
    conn.prepare_cached(
        "INSERT INTO sessions (id, initialized) VALUES (?1, ?2)
         ON CONFLICT(id) DO UPDATE SET initialized = excluded.initialized,
             updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')",
    )?
    .execute(params![session, meta.initialized])?;
    Ok(())
}

/// Applies one write inside a transaction; returns the session's last update position
/// afterwards (meaningful for appends).
fn apply_write(
    conn: &Connection,
    write: &Write,
    written: &mut WrittenMeta,
) -> rusqlite::Result<u64> {
    match write {
        Write::Append(session, updates, meta) => {
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
        Write::Compact(session, snapshot, upto, meta) => {
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
    }
}

fn last_position(conn: &Connection, session: &str) -> rusqlite::Result<u64> {
    conn.prepare_cached("SELECT COALESCE(MAX(id), 0) FROM updates WHERE session = ?1")?
        .query_row(params![session], |row| row.get(0))
}

fn load(conn: &Connection, session: &str) -> rusqlite::Result<Option<StoredSession>> {
    let meta = conn
        .query_row(
            "SELECT initialized FROM sessions WHERE id = ?1",
            params![session],
            |row| {
                Ok(SessionMeta {
                    initialized: row.get(0)?,
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

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use futures_util::FutureExt;

    use super::*;

    fn meta() -> SessionMeta {
        SessionMeta { initialized: true }
    }

    #[test]
    fn a_transaction_left_open_by_a_panic_is_rolled_back_by_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = connect(&dir.path().join("collab.db"), "NORMAL").unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        let mut written = WrittenMeta::new();
        let append = |session: &str| Write::Append(session.into(), vec![vec![1]], meta());
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            in_transaction(
                &mut conn,
                &mut written,
                |txn, written| -> rusqlite::Result<()> {
                    apply_write(txn, &append("lost"), written)?;
                    panic!("inside the transaction");
                },
            )
        }));
        assert!(panicked.is_err());
        assert!(!conn.is_autocommit(), "the panic left the transaction open");
        commit_one(&mut conn, &append("kept"), &mut written).unwrap();
        let sessions: Vec<String> = conn
            .prepare("SELECT DISTINCT session FROM updates")
            .unwrap()
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(sessions, vec!["kept".to_owned()]);
    }

    /// Appends, compacts and reloads with `fsync`, then reopens the database with `reopen`.
    async fn round_trip(fsync: FsyncMode, reopen: FsyncMode) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), fsync).unwrap();
        assert!(store.load("s").await.unwrap().is_none());
        let meta = meta();
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
        drop(store);
        let reopened = SqliteStore::open(dir.path(), reopen).unwrap();
        let reloaded = reopened.load("s").await.unwrap().unwrap();
        assert_eq!(reloaded.updates, vec![vec![8]]);
        assert_eq!(reloaded.meta, SessionMeta::default());
        assert_eq!(reloaded.last_seq, meta_only);
    }

    #[tokio::test]
    async fn appends_compacts_and_reloads() {
        round_trip(FsyncMode::Normal, FsyncMode::Always).await;
        round_trip(FsyncMode::Always, FsyncMode::Normal).await;
    }

    #[tokio::test]
    async fn writes_are_complete_when_called_with_fsync_normal() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), FsyncMode::Normal).unwrap();
        let position = store
            .append("s", vec![vec![1]], meta())
            .now_or_never()
            .expect("an inline append is complete")
            .unwrap();
        store
            .compact("s", vec![9], position, meta())
            .now_or_never()
            .expect("an inline compaction is complete")
            .unwrap();
        assert_eq!(
            store.load("s").await.unwrap().unwrap().updates,
            vec![vec![9]]
        );
    }

    /// Makes every insert of the update `[0xff]` fail, from a connection beside the store's.
    fn reject_ff(dir: &Path) {
        Connection::open(dir.join("collab.db"))
            .unwrap()
            .execute_batch(
                "CREATE TRIGGER reject_ff BEFORE INSERT ON updates WHEN NEW.data = x'ff'
                 BEGIN SELECT RAISE(ABORT, 'rejected'); END;",
            )
            .unwrap();
    }

    #[tokio::test]
    async fn a_failing_write_fails_alone_and_its_metadata_is_written_again() {
        for fsync in [FsyncMode::Normal, FsyncMode::Always] {
            let dir = tempfile::tempdir().unwrap();
            let store = SqliteStore::open(dir.path(), fsync).unwrap();
            store.append("s", vec![vec![1]], meta()).await.unwrap();
            reject_ff(dir.path());
            // Queued together, so the store thread may fold them into one transaction.
            let (good, bad, other) = tokio::join!(
                store.append("s", vec![vec![2]], meta()),
                store.append("s", vec![vec![0xff]], meta()),
                store.append("t", vec![vec![3]], meta()),
            );
            assert!(
                good.is_ok() && other.is_ok(),
                "{fsync:?}: {good:?} {other:?}"
            );
            let error = bad.expect_err("the rejected update fails");
            assert!(error.to_string().contains("rejected"), "{fsync:?}: {error}");
            // The failed append's metadata was rolled back with it: the next append with the
            // same metadata must write it, not skip it as already written.
            store.append("s", vec![vec![4]], meta()).await.unwrap();
            let stored = store.load("s").await.unwrap().unwrap();
            assert_eq!(stored.updates, vec![vec![1], vec![2], vec![4]], "{fsync:?}");
            assert_eq!(stored.meta, meta(), "{fsync:?}");
            let other = store.load("t").await.unwrap().unwrap();
            assert_eq!(other.updates, vec![vec![3]], "{fsync:?}");
        }
    }

    /// Bytes in the database file itself, where only checkpoints write with `--fsync normal`.
    fn db_file_len(dir: &Path) -> u64 {
        std::fs::metadata(dir.join("collab.db")).unwrap().len()
    }

    #[tokio::test]
    async fn the_store_thread_checkpoints_what_is_written_inline() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), FsyncMode::Normal).unwrap();
        let before = db_file_len(dir.path());
        // Two updates of a page each: about five pages per commit, so SQLite's automatic
        // checkpoint (after 1000 pages) would run before the last commit below.
        let updates = vec![vec![7; 3000], vec![8; 3000]];
        for _ in 1..CHECKPOINT_AFTER_COMMITS {
            store.append("s", updates.clone(), meta()).await.unwrap();
        }
        assert_eq!(db_file_len(dir.path()), before, "no commit checkpoints");
        store.append("s", updates.clone(), meta()).await.unwrap();
        let written = u64::from(CHECKPOINT_AFTER_COMMITS) * 6000;
        let deadline = Instant::now() + Duration::from_secs(10);
        while db_file_len(dir.path()) < before + written {
            assert!(
                Instant::now() < deadline,
                "the store thread did not checkpoint"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let stored = store.load("s").await.unwrap().unwrap();
        assert_eq!(stored.updates.len(), 2 * CHECKPOINT_AFTER_COMMITS as usize);
    }

    #[tokio::test]
    async fn a_flush_checkpoints_with_fsync_normal() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), FsyncMode::Normal).unwrap();
        let before = db_file_len(dir.path());
        store
            .append("s", vec![vec![5; 64 * 1024]], meta())
            .await
            .unwrap();
        assert_eq!(db_file_len(dir.path()), before);
        store.flush().await.unwrap();
        assert!(db_file_len(dir.path()) >= before + 64 * 1024);
    }

    /// Pages in the WAL (checkpointing what it can).
    fn wal_pages(conn: &Connection) -> i64 {
        conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| row.get(1))
            .unwrap()
    }

    #[tokio::test]
    async fn a_wal_that_a_checkpoint_cannot_finish_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), FsyncMode::Normal).unwrap();
        let path = dir.path().join("collab.db");
        store.append("s", vec![vec![1]], meta()).await.unwrap();
        // A reader on this snapshot keeps a PASSIVE checkpoint from copying what follows, as
        // writes during every checkpoint would.
        let reader = connect(&path, "NORMAL").unwrap();
        reader
            .execute_batch("BEGIN; SELECT count(*) FROM updates;")
            .unwrap();
        for _ in 0..20 {
            store.append("s", vec![vec![2; 100]], meta()).await.unwrap();
        }
        let checkpointer = connect(&path, "NORMAL").unwrap();
        let grown = wal_pages(&checkpointer);
        assert!(grown > 20, "{grown} pages");
        let done_reading = thread::spawn(move || {
            thread::sleep(Duration::from_millis(200));
            reader.execute_batch("COMMIT;").unwrap();
        });
        checkpoint(&checkpointer, 10).unwrap();
        done_reading.join().unwrap();
        store.append("s", vec![vec![3]], meta()).await.unwrap();
        let pages = wal_pages(&checkpointer);
        assert!(pages < 10, "the WAL did not start over: {pages} pages");
        assert_eq!(store.load("s").await.unwrap().unwrap().updates.len(), 22);
    }

    #[test]
    fn an_unopenable_path_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        let e = SqliteStore::open(&file, FsyncMode::Normal).err().unwrap();
        assert!(e.to_string().contains("not-a-dir"), "{e}");
    }
}
