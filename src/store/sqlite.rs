//! `--store sqlite` (the default): one embedded SQLite database, `collab.db` in `--data-dir`.
//!
//! The database runs in WAL mode; `--fsync normal` survives a crash of the process,
//! `--fsync always` also a power loss. No SQLite call runs on the async runtime's threads, so
//! a slow, frozen or failing disk stalls only the sessions waiting for their writes:
//!
//! * **The writer thread** owns the write connection. Every write (append, compact, retention)
//!   is sent to it and answered through a oneshot once its transaction has committed (the
//!   session delivers only then: ARCHITECTURE.md, invariant 1). It commits in groups: the
//!   writes of every session that arrived while the previous transaction ran go into the
//!   next one, so busy sessions share a commit (and with `--fsync always`, an fsync). At low
//!   rates a lone update pays two cross-thread wake-ups that an inline commit did not
//!   (BENCHMARKS.md, "Issue 13: the store off the runtime"): the price of a runtime that a
//!   stalled disk cannot hold.
//! * **The reader thread** has a connection of its own (WAL readers never wait for the
//!   writer): loads, lists, flushes and checkpoints. Commits never checkpoint (an automatic
//!   checkpoint copies up to 1000 pages while writers wait); the writer asks the reader thread
//!   every [`CHECKPOINT_AFTER_COMMITS`] transactions or [`CHECKPOINT_AFTER_BYTES`] bytes for a
//!   PASSIVE checkpoint that never makes it wait ([`checkpoint`] bounds the WAL's growth).
//!
//! Before each transaction a thread checks the store's files ([`StoreFiles`]): a database or
//! WAL file removed or replaced under the server would take every later commit with it (the
//! process still holds the old file open), and SQLite maps the WAL index (`collab.db-shm`)
//! into memory: once a file is immutable (`chattr +i`) the kernel answers a write to that
//! mapping with SIGBUS, which kills the process. Such files fail the operation instead, as
//! any SQLite error does (the session closes its clients 1011 and logs it). The check runs
//! before a transaction, not during it: a file made immutable inside a transaction can still
//! raise the signal; only a WAL index in heap memory (`locking_mode=EXCLUSIVE`) avoids that,
//! at the cost of every other process's access, the online backup included (README, "Data and
//! backups").
//!
//! Schema (readable with `sqlite3 data/collab.db .schema`):
//! * `sessions(id, initialized, updated_at)`: one row per stored session (databases written
//!   before the host rule went keep an unused `host` column);
//! * `updates(id, session, kind, data, created_at)`: the session's document as a `snapshot`
//!   followed by the `update`s accepted since, in `id` order. A snapshot's `created_at` is
//!   that of the newest update it replaced, so the newest `created_at` of a session is when
//!   its document last changed (what [`Store::list`] reports). The writer numbers the rows
//!   itself ([`Ledger`]); databases created before that keep an `AUTOINCREMENT` table, which
//!   is read the same way.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;

use collab_core::protocol::json::timestamp;
use rusqlite::config::DbConfig;
use rusqlite::{params, Connection, OptionalExtension};
use rustix::fs::{AtFlags, Mode, OFlags, StatxAttributes, StatxFlags};
use tokio::sync::oneshot;
use tracing::warn;

use super::{SessionMeta, Store, StoreError, StoreFuture, StoredSession, StoredSummary};
use crate::config::FsyncMode;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS sessions (
    id          TEXT PRIMARY KEY,
    initialized INTEGER NOT NULL DEFAULT 0,
    updated_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE TABLE IF NOT EXISTS updates (
    id         INTEGER PRIMARY KEY,
    session    TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    kind       TEXT NOT NULL CHECK (kind IN ('snapshot', 'update')),
    data       BLOB NOT NULL,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX IF NOT EXISTS updates_by_session ON updates(session, id);
";

/// Most requests folded into one transaction.
const GROUP_LIMIT: usize = 1024;

/// The writer asks for a checkpoint after this many transactions or bytes of data written,
/// whichever comes first. A small commit adds a few pages to the WAL (the table's leaf, the
/// index's leaf of each session in it), so 256 of them come near SQLite's own default of 1000
/// pages; the byte bound holds when updates are large.
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

/// Work for the writer thread.
enum WriteRequest {
    /// Resolves to the session's last update position.
    Write(Write, Reply<u64>),
    /// Retention: the cutoff as a stored timestamp, the sessions to keep.
    RemoveUntouched(String, Vec<String>, Reply<Vec<String>>),
}

/// Work for the reader thread.
enum ReadRequest {
    Load(String, Reply<Option<StoredSession>>),
    Contains(String, Reply<bool>),
    List(Reply<Vec<StoredSummary>>),
    /// From the writer: enough was written since the last checkpoint.
    Checkpoint,
    Flush(Reply<()>),
}

/// The embedded store. Dropping it stops its threads after the queued requests.
pub struct SqliteStore {
    writes: mpsc::Sender<WriteRequest>,
    reads: mpsc::Sender<ReadRequest>,
}

/// Opens a connection to `path` with the settings every connection of the store shares.
/// `mmap_size=0` (SQLite's default, stated): the database file is read with `pread`, never
/// mapped, so a failing or shrunk file is an error, not a signal.
fn connect(path: &Path, synchronous: &str) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.execute_batch(&format!(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous={synchronous}; PRAGMA foreign_keys=ON;
         PRAGMA busy_timeout=5000; PRAGMA mmap_size=0;"
    ))?;
    Ok(conn)
}

/// A file of the store that can no longer be used.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the store file {} is unusable: {reason}", path.display())]
pub struct UnusableFile {
    path: PathBuf,
    reason: String,
}

/// The store's files as they were when it opened: the database, its WAL and WAL index, each
/// held open by a path-only descriptor, so a check follows the file, not its name, and makes
/// no path lookup.
struct StoreFiles {
    files: Vec<(PathBuf, OwnedFd)>,
}

impl StoreFiles {
    /// Holds the files of the database at `path` (opened, in WAL mode).
    fn of(path: &Path) -> std::io::Result<StoreFiles> {
        let mut files = Vec::new();
        for suffix in ["", "-wal", "-shm"] {
            let mut name = path.as_os_str().to_owned();
            name.push(suffix);
            let file = PathBuf::from(name);
            let fd = rustix::fs::open(&file, OFlags::PATH | OFlags::CLOEXEC, Mode::empty())?;
            files.push((file, fd));
        }
        Ok(StoreFiles { files })
    }

    /// Fails when a file has no name left (removed, or replaced by another under its name:
    /// what is committed to it would be lost with the process), or is immutable or
    /// append-only. A file that still has a name elsewhere (moved, or linked) keeps its
    /// commits there.
    fn check(&self) -> Result<(), UnusableFile> {
        for (path, fd) in &self.files {
            let unusable = |reason: &str| UnusableFile {
                path: path.clone(),
                reason: reason.to_owned(),
            };
            match rustix::fs::statx(fd, "", AtFlags::EMPTY_PATH, StatxFlags::NLINK) {
                Ok(stat) if stat.stx_nlink == 0 => return Err(unusable("removed or replaced")),
                Ok(stat)
                    if stat
                        .stx_attributes
                        .intersects(StatxAttributes::IMMUTABLE | StatxAttributes::APPEND) =>
                {
                    return Err(unusable("immutable or append-only"))
                }
                Ok(_) => {}
                Err(e) => return Err(unusable(&e.to_string())),
            }
        }
        Ok(())
    }
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
        // The reader thread checkpoints.
        conn.execute_batch("PRAGMA wal_autocheckpoint=0;")
            .map_err(|e| fail(&e))?;
        let reader = connect(&path, synchronous).map_err(|e| fail(&e))?;
        let (reads, reads_rx) = mpsc::channel();
        let (writes, writes_rx) = mpsc::channel();
        let ledger = Ledger::open(&conn).map_err(|e| fail(&e))?;
        let writer = Writer {
            conn,
            ledger,
            files: StoreFiles::of(&path).map_err(|e| fail(&e))?,
            reads: reads.clone(),
            commits: 0,
            bytes: 0,
        };
        let reader_files = StoreFiles::of(&path).map_err(|e| fail(&e))?;
        thread::Builder::new()
            .name("sqlite-reader".into())
            .spawn(move || serve_reads(reader, reader_files, reads_rx))
            .map_err(|e| fail(&e))?;
        thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || writer.serve(writes_rx))
            .map_err(|e| fail(&e))?;
        Ok(SqliteStore { writes, reads })
    }

    fn read<T: Send + 'static>(
        &self,
        make: impl FnOnce(Reply<T>) -> ReadRequest,
    ) -> StoreFuture<'_, T> {
        let (reply, rx) = oneshot::channel();
        let sent = self.reads.send(make(reply)).is_ok();
        answer(sent, rx)
    }

    fn write<T: Send + 'static>(
        &self,
        make: impl FnOnce(Reply<T>) -> WriteRequest,
    ) -> StoreFuture<'_, T> {
        let (reply, rx) = oneshot::channel();
        let sent = self.writes.send(make(reply)).is_ok();
        answer(sent, rx)
    }
}

/// The answer to a request, once its thread sent it.
fn answer<T: Send + 'static>(
    sent: bool,
    rx: oneshot::Receiver<Result<T, StoreError>>,
) -> StoreFuture<'static, T> {
    Box::pin(async move {
        if !sent {
            return Err(StoreError::Stopped);
        }
        rx.await.map_err(|_| StoreError::Stopped)?
    })
}

impl Store for SqliteStore {
    fn load(&self, session: &str) -> StoreFuture<'_, Option<StoredSession>> {
        let session = session.to_owned();
        self.read(|r| ReadRequest::Load(session, r))
    }

    fn contains(&self, session: &str) -> StoreFuture<'_, bool> {
        let session = session.to_owned();
        self.read(|r| ReadRequest::Contains(session, r))
    }

    fn append(
        &self,
        session: &str,
        updates: Vec<Vec<u8>>,
        meta: SessionMeta,
    ) -> StoreFuture<'_, u64> {
        let write = Write::Append(session.to_owned(), updates, meta);
        self.write(|r| WriteRequest::Write(write, r))
    }

    fn compact(
        &self,
        session: &str,
        snapshot: Vec<u8>,
        upto: u64,
        meta: SessionMeta,
    ) -> StoreFuture<'_, ()> {
        let write = Write::Compact(session.to_owned(), snapshot, upto, meta);
        let done = self.write(|r| WriteRequest::Write(write, r));
        Box::pin(async move { done.await.map(|_| ()) })
    }

    fn list(&self) -> StoreFuture<'_, Vec<StoredSummary>> {
        self.read(ReadRequest::List)
    }

    fn flush(&self) -> StoreFuture<'_, ()> {
        self.read(ReadRequest::Flush)
    }

    fn remove_untouched(
        &self,
        cutoff: std::time::SystemTime,
        keep: Vec<String>,
    ) -> StoreFuture<'_, Vec<String>> {
        let cutoff = timestamp(cutoff);
        self.write(|r| WriteRequest::RemoveUntouched(cutoff, keep, r))
    }
}

/// The writer thread's connection and what its commits owe.
struct Writer {
    conn: Connection,
    ledger: Ledger,
    files: StoreFiles,
    /// To the reader thread, for checkpoints.
    reads: mpsc::Sender<ReadRequest>,
    /// Transactions and bytes since the reader thread was last asked to checkpoint.
    commits: u32,
    bytes: usize,
}

impl Writer {
    /// Takes what is queued, up to [`GROUP_LIMIT`] requests, and commits its writes in one
    /// transaction; a retention sweep runs in order, after the writes queued before it.
    fn serve(mut self, rx: mpsc::Receiver<WriteRequest>) {
        let mut writes = Vec::new();
        let mut replies = Vec::new();
        while let Ok(first) = rx.recv() {
            for request in std::iter::once(first).chain(rx.try_iter().take(GROUP_LIMIT - 1)) {
                match request {
                    WriteRequest::Write(write, reply) => {
                        writes.push(write);
                        replies.push(reply);
                    }
                    WriteRequest::RemoveUntouched(cutoff, keep, reply) => {
                        self.commit(&mut writes, &mut replies);
                        let removed = checked(&self.files, || {
                            remove_untouched(&mut self.conn, &cutoff, &keep, &mut self.ledger)
                        });
                        let _ = reply.send(removed);
                    }
                }
            }
            self.commit(&mut writes, &mut replies);
        }
        close(self.conn, &self.files);
    }

    /// Commits `writes` together and answers each (draining both).
    fn commit(&mut self, writes: &mut Vec<Write>, replies: &mut Vec<Reply<u64>>) {
        if writes.is_empty() {
            return;
        }
        let outcomes = match self.files.check() {
            Ok(()) => commit_group(&mut self.conn, writes, &mut self.ledger),
            Err(e) => writes.iter().map(|_| Err(e.clone().into())).collect(),
        };
        self.commits += 1;
        self.bytes += writes.iter().map(Write::data_bytes).sum::<usize>();
        if self.commits >= CHECKPOINT_AFTER_COMMITS || self.bytes >= CHECKPOINT_AFTER_BYTES {
            self.commits = 0;
            self.bytes = 0;
            // Fails only if the reader thread died, which every load and flush then reports.
            let _ = self.reads.send(ReadRequest::Checkpoint);
        }
        writes.clear();
        for (reply, outcome) in replies.drain(..).zip(outcomes) {
            let _ = reply.send(outcome);
        }
    }
}

/// The reader thread: answers reads and flushes in order; the checkpoints asked for meanwhile
/// run once, after them.
fn serve_reads(conn: Connection, files: StoreFiles, rx: mpsc::Receiver<ReadRequest>) {
    while let Ok(first) = rx.recv() {
        let mut checkpoint_due = false;
        for request in std::iter::once(first).chain(rx.try_iter().take(GROUP_LIMIT - 1)) {
            match request {
                ReadRequest::Load(session, reply) => {
                    let _ = reply.send(checked(&files, || load(&conn, &session)));
                }
                ReadRequest::Contains(session, reply) => {
                    let _ = reply.send(checked(&files, || contains(&conn, &session)));
                }
                ReadRequest::List(reply) => {
                    let _ = reply.send(checked(&files, || list(&conn)));
                }
                ReadRequest::Flush(reply) => {
                    let _ = reply.send(checked(&files, || checkpoint(&conn, WAL_LIMIT_PAGES)));
                }
                ReadRequest::Checkpoint => checkpoint_due = true,
            }
        }
        if checkpoint_due {
            if let Err(e) = checked(&files, || checkpoint(&conn, WAL_LIMIT_PAGES)) {
                warn!(error = %e, "WAL checkpoint failed");
            }
        }
    }
    close(conn, &files);
}

/// Closes a store connection. The last one to close checkpoints, through the WAL index's
/// mapping: not when the files are unusable (the module's comment); the WAL keeps its commits.
fn close(conn: Connection, files: &StoreFiles) {
    if let Err(unusable) = files.check() {
        warn!(error = %unusable, "closing the store without a checkpoint");
        if let Err(e) = conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true) {
            warn!(error = %e, "the store's connection would checkpoint on close");
        }
    }
    if let Err((_, e)) = conn.close() {
        warn!(error = %e, "closing the store's connection failed");
    }
}

/// Runs `operation` if the store's files are still usable.
fn checked<T>(
    files: &StoreFiles,
    operation: impl FnOnce() -> rusqlite::Result<T>,
) -> Result<T, StoreError> {
    files.check()?;
    Ok(operation()?)
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

/// What the write connection keeps of what it wrote, so that it writes less.
struct Ledger {
    /// The metadata it last wrote per session. Sessions append with every batch and their
    /// metadata rarely changes: rewriting its row each time would add a page to every
    /// commit. Forgotten when a transaction fails (its writes were rolled back).
    meta: std::collections::HashMap<String, SessionMeta>,
    /// The `id` the next row takes. Numbered here, not by SQLite: a plain rowid could go back
    /// once the newest rows are deleted (a compaction), and `AUTOINCREMENT` rewrites
    /// `sqlite_sequence` in every transaction (a page and a statement; BENCHMARKS.md). Never
    /// goes back, not even when a transaction fails.
    next_id: i64,
}

impl Ledger {
    /// Starts after every `id` the database holds or, for a database created with an
    /// `AUTOINCREMENT` table, ever handed out.
    fn open(conn: &Connection) -> rusqlite::Result<Ledger> {
        let highest: i64 =
            conn.query_row("SELECT COALESCE(MAX(id), 0) FROM updates", [], |row| {
                row.get(0)
            })?;
        let has_sequence = conn
            .prepare("SELECT 1 FROM sqlite_master WHERE name = 'sqlite_sequence'")?
            .exists([])?;
        let handed_out: i64 = if has_sequence {
            conn.query_row(
                "SELECT COALESCE(MAX(seq), 0) FROM sqlite_sequence WHERE name = 'updates'",
                [],
                |row| row.get(0),
            )?
        } else {
            0
        };
        Ok(Ledger {
            meta: std::collections::HashMap::new(),
            next_id: highest.max(handed_out) + 1,
        })
    }

    fn take_id(&mut self) -> i64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }
}

/// Runs `body` in a transaction and commits it, or rolls it back.
///
/// `BEGIN` and `COMMIT` are cached statements: `Connection::transaction` compiles them for
/// every commit (BENCHMARKS.md, "Where the CPU goes").
fn in_transaction<T>(
    conn: &mut Connection,
    ledger: &mut Ledger,
    body: impl FnOnce(&Connection, &mut Ledger) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    if !conn.is_autocommit() {
        // A panic inside an earlier `body` left its transaction open.
        conn.execute_batch("ROLLBACK")?;
    }
    conn.prepare_cached("BEGIN")?.execute([])?;
    let result = body(conn, ledger).and_then(|value| {
        conn.prepare_cached("COMMIT")?.execute([])?;
        Ok(value)
    });
    if result.is_err() {
        ledger.meta.clear();
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
    ledger: &mut Ledger,
) -> Result<u64, StoreError> {
    in_transaction(conn, ledger, |txn, ledger| apply_write(txn, write, ledger))
        .map_err(StoreError::from)
}

/// Runs a group of writes in one transaction; returns each one's outcome. If the transaction
/// fails as a whole, each write is retried alone, so one bad write cannot fail the others.
fn commit_group(
    conn: &mut Connection,
    writes: &[Write],
    ledger: &mut Ledger,
) -> Vec<Result<u64, StoreError>> {
    let group = in_transaction(conn, ledger, |txn, ledger| {
        writes
            .iter()
            .map(|write| apply_write(txn, write, ledger))
            .collect::<rusqlite::Result<Vec<u64>>>()
    });
    match group {
        Ok(positions) => positions.into_iter().map(Ok).collect(),
        Err(e) if writes.len() == 1 => vec![Err(StoreError::from(e))],
        Err(_) => writes
            .iter()
            .map(|write| commit_one(conn, write, ledger))
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
fn apply_write(conn: &Connection, write: &Write, ledger: &mut Ledger) -> rusqlite::Result<u64> {
    match write {
        Write::Append(session, updates, meta) => {
            if ledger.meta.get(session) != Some(meta) {
                upsert_meta(conn, session, meta)?;
                ledger.meta.insert(session.clone(), meta.clone());
            }
            // The time in the same text as SQLite's `strftime` default, made once here rather
            // than by SQLite for every row.
            let created_at = timestamp(std::time::SystemTime::now());
            let mut insert = conn.prepare_cached(
                "INSERT INTO updates (id, session, kind, data, created_at)
                 VALUES (?1, ?2, 'update', ?3, ?4)",
            )?;
            let mut last = None;
            for update in updates {
                let id = ledger.take_id();
                insert.execute(params![id, session, update, created_at])?;
                last = Some(id);
            }
            match last {
                Some(id) => Ok(id as u64),
                None => last_position(conn, session),
            }
        }
        Write::Compact(session, snapshot, upto, meta) => {
            upsert_meta(conn, session, meta)?;
            ledger.meta.insert(session.clone(), meta.clone());
            // The snapshot changes nothing in the document: it keeps the time of the newest
            // change it holds (the session's last change, for `list`).
            let newest: Option<String> = conn.query_row(
                "SELECT MAX(created_at) FROM updates WHERE session = ?1 AND id <= ?2",
                params![session, upto],
                |row| row.get(0),
            )?;
            conn.execute(
                "DELETE FROM updates WHERE session = ?1 AND id <= ?2",
                params![session, upto],
            )?;
            conn.execute(
                "INSERT INTO updates (id, session, kind, data, created_at) VALUES (?1, ?2,
                     'snapshot', ?3, COALESCE(?4, strftime('%Y-%m-%dT%H:%M:%fZ', 'now')))",
                params![ledger.take_id(), session, snapshot, newest],
            )?;
            Ok(0)
        }
    }
}

fn last_position(conn: &Connection, session: &str) -> rusqlite::Result<u64> {
    conn.prepare_cached("SELECT COALESCE(MAX(id), 0) FROM updates WHERE session = ?1")?
        .query_row(params![session], |row| row.get(0))
}

/// Deletes (with their updates) the sessions whose last write is older than `cutoff` (a
/// stored timestamp: they compare as text), except `keep`.
fn remove_untouched(
    conn: &mut Connection,
    cutoff: &str,
    keep: &[String],
    ledger: &mut Ledger,
) -> rusqlite::Result<Vec<String>> {
    let keep = serde_json::to_string(keep).unwrap_or_else(|_| "[]".to_owned());
    let txn = conn.transaction()?;
    let removed = txn
        .prepare(
            "DELETE FROM sessions WHERE id IN (
                 SELECT s.id FROM sessions s
                 WHERE COALESCE(
                         (SELECT u.created_at FROM updates u WHERE u.session = s.id
                          ORDER BY u.id DESC LIMIT 1),
                         s.updated_at) < ?1
                   AND s.id NOT IN (SELECT value FROM json_each(?2)))
             RETURNING id",
        )?
        .query_map(params![cutoff, keep], |row| row.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    txn.commit()?;
    for id in &removed {
        ledger.meta.remove(id);
    }
    Ok(removed)
}

fn contains(conn: &Connection, session: &str) -> rusqlite::Result<bool> {
    conn.prepare_cached("SELECT 1 FROM sessions WHERE id = ?1")?
        .exists(params![session])
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

/// Every stored session with the bytes of its rows and its newest row's time. `length()` of a
/// blob reads no blob content, and a session holds at most a snapshot and the updates since
/// (compacted every 1000), so this walks small ranges of the `updates_by_session` index.
fn list(conn: &Connection) -> rusqlite::Result<Vec<StoredSummary>> {
    let mut query = conn.prepare_cached(
        "SELECT s.id, COALESCE(SUM(length(u.data)), 0), MAX(u.created_at)
         FROM sessions s LEFT JOIN updates u ON u.session = s.id
         GROUP BY s.id ORDER BY s.id",
    )?;
    let rows = query.query_map([], |row| {
        Ok(StoredSummary {
            id: row.get(0)?,
            stored_bytes: row.get(1)?,
            last_change: row.get(2)?,
        })
    })?;
    rows.collect()
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
        let mut ledger = Ledger::open(&conn).unwrap();
        let append = |session: &str| Write::Append(session.into(), vec![vec![1]], meta());
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            in_transaction(
                &mut conn,
                &mut ledger,
                |txn, ledger| -> rusqlite::Result<()> {
                    apply_write(txn, &append("lost"), ledger)?;
                    panic!("inside the transaction");
                },
            )
        }));
        assert!(panicked.is_err());
        assert!(!conn.is_autocommit(), "the panic left the transaction open");
        commit_one(&mut conn, &append("kept"), &mut ledger).unwrap();
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
    async fn positions_keep_growing_after_the_newest_rows_are_compacted_away() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), FsyncMode::Normal).unwrap();
        let last = store
            .append("s", vec![vec![1], vec![2], vec![3]], meta())
            .await
            .unwrap();
        // The session's rows are the newest: its compaction deletes every one of them.
        store.compact("s", vec![9], last, meta()).await.unwrap();
        let snapshot = store.load("s").await.unwrap().unwrap().last_seq;
        assert!(snapshot > last, "the snapshot takes a new position");
        let after = store.append("s", vec![vec![4]], meta()).await.unwrap();
        assert!(after > snapshot);
        store.compact("s", vec![8], after, meta()).await.unwrap();
        drop(store);
        let reopened = SqliteStore::open(dir.path(), FsyncMode::Normal).unwrap();
        let last_seq = reopened.load("s").await.unwrap().unwrap().last_seq;
        let reopened_after = reopened.append("s", vec![vec![5]], meta()).await.unwrap();
        assert!(reopened_after > last_seq && last_seq > after);
        assert_eq!(
            reopened.load("s").await.unwrap().unwrap().updates,
            vec![vec![8], vec![5]]
        );
    }

    #[tokio::test]
    async fn a_database_numbered_by_autoincrement_goes_on_after_every_id_it_handed_out() {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join("collab.db")).unwrap();
        conn.execute_batch(&SCHEMA.replace(
            "id         INTEGER PRIMARY KEY,",
            "id         INTEGER PRIMARY KEY AUTOINCREMENT,",
        ))
        .unwrap();
        conn.execute_batch(
            "INSERT INTO sessions (id) VALUES ('s');
             INSERT INTO updates (session, kind, data) VALUES ('s', 'update', x'01');
             INSERT INTO updates (session, kind, data) VALUES ('s', 'update', x'02');
             INSERT INTO updates (session, kind, data) VALUES ('s', 'update', x'03');
             DELETE FROM updates WHERE id > 1;",
        )
        .unwrap();
        drop(conn);
        let store = SqliteStore::open(dir.path(), FsyncMode::Normal).unwrap();
        assert_eq!(store.load("s").await.unwrap().unwrap().last_seq, 1);
        let position = store.append("s", vec![vec![4]], meta()).await.unwrap();
        assert_eq!(position, 4, "ids 2 and 3 were handed out before");
        assert_eq!(
            store.load("s").await.unwrap().unwrap().updates,
            vec![vec![1], vec![4]]
        );
    }

    /// Retention deletes what was last written before the cutoff, with its updates, except
    /// the sessions kept; a deleted session can be written again (its row comes back).
    async fn retention(fsync: FsyncMode) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), fsync).unwrap();
        for session in ["old", "old-but-live", "fresh"] {
            store.append(session, vec![vec![1]], meta()).await.unwrap();
        }
        // Age two of them by ten days, as the database records it.
        let conn = connect(&dir.path().join("collab.db"), "NORMAL").unwrap();
        for table in ["sessions SET updated_at", "updates SET created_at"] {
            let column = if table.starts_with("sessions") {
                "id"
            } else {
                "session"
            };
            conn.execute(
                &format!(
                    "UPDATE {table} = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-10 days')
                     WHERE {column} IN ('old', 'old-but-live')"
                ),
                [],
            )
            .unwrap();
        }
        let week_ago = std::time::SystemTime::now() - Duration::from_secs(7 * 86_400);
        let removed = store
            .remove_untouched(week_ago, vec!["old-but-live".into()])
            .await
            .unwrap();
        assert_eq!(removed, ["old"]);
        assert!(!store.contains("old").await.unwrap());
        let orphans: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM updates WHERE session = 'old'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(orphans, 0, "its updates went with it");
        assert!(store.contains("old-but-live").await.unwrap());
        assert!(store.load("fresh").await.unwrap().is_some());
        // Written again after the sweep: the row is recreated, the update kept.
        store.append("old", vec![vec![2]], meta()).await.unwrap();
        assert_eq!(store.load("old").await.unwrap().unwrap().updates, [vec![2]]);
    }

    #[tokio::test]
    async fn sessions_untouched_past_the_cutoff_are_deleted() {
        retention(FsyncMode::Normal).await;
        retention(FsyncMode::Always).await;
    }

    #[tokio::test]
    async fn appends_compacts_and_reloads() {
        round_trip(FsyncMode::Normal, FsyncMode::Always).await;
        round_trip(FsyncMode::Always, FsyncMode::Normal).await;
    }

    #[tokio::test]
    async fn a_write_answers_once_committed_and_reads_go_on_while_it_waits() {
        for fsync in [FsyncMode::Normal, FsyncMode::Always] {
            let dir = tempfile::tempdir().unwrap();
            let store = SqliteStore::open(dir.path(), fsync).unwrap();
            store.append("s", vec![vec![1]], meta()).await.unwrap();
            // Another connection holds the write lock: the writer waits (its busy timeout),
            // as on a disk that does not answer.
            let side = connect(&dir.path().join("collab.db"), "NORMAL").unwrap();
            side.execute_batch("BEGIN IMMEDIATE").unwrap();
            let mut waiting = store.append("s", vec![vec![2]], meta());
            let loaded = store.load("s").await.unwrap().unwrap();
            assert_eq!(loaded.updates, vec![vec![1]], "{fsync:?}");
            assert!(store.contains("s").await.unwrap());
            assert!(
                (&mut waiting).now_or_never().is_none(),
                "{fsync:?}: answered before its commit"
            );
            side.execute_batch("COMMIT").unwrap();
            waiting.await.unwrap();
            let loaded = store.load("s").await.unwrap().unwrap();
            assert_eq!(loaded.updates, vec![vec![1], vec![2]], "{fsync:?}");
        }
    }

    #[tokio::test]
    async fn a_database_removed_under_the_store_fails_its_operations() {
        for fsync in [FsyncMode::Normal, FsyncMode::Always] {
            let dir = tempfile::tempdir().unwrap();
            let store = SqliteStore::open(dir.path(), fsync).unwrap();
            store.append("s", vec![vec![1]], meta()).await.unwrap();
            std::fs::remove_file(dir.path().join("collab.db")).unwrap();
            let error = store
                .append("s", vec![vec![2]], meta())
                .await
                .expect_err("a commit into a removed file would be lost");
            assert!(
                matches!(error, StoreError::Unusable(_)) && error.to_string().contains("collab.db"),
                "{fsync:?}: {error}"
            );
            assert!(store.load("s").await.is_err(), "{fsync:?}");
            // A new database in its place is not the one the store opened either.
            Connection::open(dir.path().join("collab.db")).unwrap();
            assert!(store.append("s", vec![vec![3]], meta()).await.is_err());
        }
    }

    #[tokio::test]
    async fn lists_sessions_with_their_size_and_last_change_without_loading_them() {
        for fsync in [FsyncMode::Normal, FsyncMode::Always] {
            let dir = tempfile::tempdir().unwrap();
            let store = SqliteStore::open(dir.path(), fsync).unwrap();
            assert!(store.list().await.unwrap().is_empty());
            store.append("s", vec![vec![1; 10]], meta()).await.unwrap();
            let upto = store.append("s", vec![vec![2; 5]], meta()).await.unwrap();
            store.append("t", Vec::new(), meta()).await.unwrap();
            let list = store.list().await.unwrap();
            let ids: Vec<&str> = list.iter().map(|s| s.id.as_str()).collect();
            assert_eq!(ids, ["s", "t"], "{fsync:?}");
            assert_eq!(list[0].stored_bytes, 15);
            let changed = list[0].last_change.clone().expect("s has updates");
            assert!(changed.ends_with('Z') && changed.len() == 24, "{changed}");
            assert_eq!(
                (list[1].stored_bytes, list[1].last_change.as_deref()),
                (0, None)
            );

            // Make the stored updates old, so that a compaction stamping its own time (the
            // bug this checks for) would show.
            let old = "2020-01-02T03:04:05.678Z";
            Connection::open(dir.path().join("collab.db"))
                .unwrap()
                .execute("UPDATE updates SET created_at = ?1", params![old])
                .unwrap();
            store.compact("s", vec![3; 7], upto, meta()).await.unwrap();
            let list = store.list().await.unwrap();
            assert_eq!(list[0].stored_bytes, 7, "{fsync:?}");
            assert_eq!(list[0].last_change.as_deref(), Some(old), "{fsync:?}");
            // A later update is the last change, and everything survives a reopen.
            store.append("s", vec![vec![4; 2]], meta()).await.unwrap();
            drop(store);
            let reopened = SqliteStore::open(dir.path(), fsync).unwrap();
            let list = reopened.list().await.unwrap();
            assert_eq!(list[0].stored_bytes, 9);
            let newest = list[0].last_change.as_deref().unwrap();
            assert!(newest > old, "{newest} after {old}");
        }
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

    /// Bytes in the database file itself, where only checkpoints write.
    fn db_file_len(dir: &Path) -> u64 {
        std::fs::metadata(dir.join("collab.db")).unwrap().len()
    }

    #[tokio::test]
    async fn the_reader_thread_checkpoints_what_the_writer_commits() {
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
        // Each awaited append is a transaction of its own: this one makes the checkpoint due.
        store.append("s", updates.clone(), meta()).await.unwrap();
        let written = u64::from(CHECKPOINT_AFTER_COMMITS) * 6000;
        let deadline = Instant::now() + Duration::from_secs(10);
        while db_file_len(dir.path()) < before + written {
            assert!(
                Instant::now() < deadline,
                "the reader thread did not checkpoint"
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
