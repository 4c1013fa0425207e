//! A stalled or failing disk under the embedded store (issue 13): the sessions that write wait
//! for it or are closed 1011, and the rest of the server (`/health`, other sessions) is
//! unaffected. Each test runs the server on a single runtime thread, so a store call that
//! blocked that thread would stall everything the test then asks for.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::durable::*;
use common::*;
use serde_json::Value;

/// Connects alice and bob to `session` and carol to a session of her own, on `server`.
async fn clients(server: &TestServer, session: &str) -> (Ws, Ws, Ws) {
    let (alice, _) = server.legacy(session, "alice").await;
    let (bob, _) = server.legacy(session, "bob").await;
    let (carol, _) = server.legacy(&format!("{session}-quiet"), "carol").await;
    (alice, bob, carol)
}

/// Has alice add fixture item `i`; returns its uuid.
async fn add_item(alice: &mut Ws, i: usize) -> String {
    let (item_type, uuid, data) = fixture_item(i);
    send_json(
        alice,
        &command("add_item", &item_type, &uuid, data, "alice"),
    )
    .await;
    uuid
}

/// The next `command` that `ws` receives.
async fn next_command(ws: &mut Ws) -> Value {
    loop {
        let msg = recv_json(ws).await;
        if msg["type"] == "command" {
            return msg;
        }
    }
}

/// What must keep working while a session's store write waits or fails: `/health`, a ping in
/// another session, and a new member joining a session in memory.
async fn the_rest_is_served(server: &TestServer, carol: &mut Ws, quiet: &str) {
    assert_eq!(health(server.addr).await["status"], "ok");
    ping_collect(carol).await;
    let (mut dave, ack) = server.legacy(quiet, "dave").await;
    assert_eq!(ack["type"], "connection:ack");
    ping_collect(&mut dave).await;
}

/// Alice's next change cannot be stored: she and Bob (her session) are closed 1011, and Carol
/// in another session is served on.
async fn the_next_write_fails(
    server: &TestServer,
    (alice, bob, carol): (&mut Ws, &mut Ws, &mut Ws),
) {
    add_item(alice, 1).await;
    assert_eq!(close_code(alice).await, 1011);
    assert_eq!(close_code(bob).await, 1011);
    the_rest_is_served(server, carol, "busy-quiet").await;
}

fn updates_stored(dir: &Path, session: &str) -> usize {
    stored_rows(dir, session).len()
}

#[tokio::test(flavor = "current_thread")]
async fn a_stalled_disk_stalls_only_the_session_that_writes() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_sqlite(sqlite_config(dir.path())).await;
    let (mut alice, mut bob, mut carol) = clients(&server, "busy").await;
    // Another connection holds the database's write lock: the store's commit waits (SQLite's
    // busy timeout) as it would on a disk that does not answer.
    let side = open_db(dir.path());
    side.execute_batch("BEGIN IMMEDIATE").unwrap();
    let uuid = add_item(&mut alice, 0).await;

    the_rest_is_served(&server, &mut carol, "busy-quiet").await;
    assert_eq!(updates_stored(dir.path(), "busy"), 0, "the commit waits");

    side.execute_batch("COMMIT").unwrap();
    let delivered = next_command(&mut bob).await;
    assert_eq!(delivered["command"]["item_id"], uuid.as_str());
    assert_eq!(
        updates_stored(dir.path(), "busy"),
        1,
        "stored before it was delivered"
    );
    ping_collect(&mut alice).await;
    stop(server).await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_store_removed_under_the_server_closes_the_writers_1011() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_sqlite(sqlite_config(dir.path())).await;
    let (mut alice, mut bob, mut carol) = clients(&server, "busy").await;
    add_item(&mut alice, 0).await;
    ping_collect(&mut alice).await;
    // As an operator clearing the data directory of a running server would.
    for file in ["collab.db", "collab.db-wal", "collab.db-shm"] {
        std::fs::remove_file(dir.path().join(file)).unwrap();
    }

    the_next_write_fails(&server, (&mut alice, &mut bob, &mut carol)).await;
    // Joining the failed session again needs its stored state, which is gone: refused too.
    let mut again = server.connect("/ws/busy/alice").await;
    assert_eq!(close_code(&mut again).await, 1011);
    stop(server).await;
}

/// Clears the immutable flag of the files it names, whatever the test's outcome (the temporary
/// directory cannot be removed otherwise).
struct Immutable(Vec<PathBuf>);

impl Immutable {
    fn set(files: Vec<PathBuf>) -> Immutable {
        let set = Immutable(files);
        set.chattr("+i");
        set
    }

    fn chattr(&self, flag: &str) {
        let status = Command::new("chattr")
            .arg(flag)
            .args(&self.0)
            .status()
            .expect("chattr runs (e2fsprogs)");
        assert!(
            status.success(),
            "chattr {flag} failed: this test needs root and a file system with the immutable flag"
        );
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        self.chattr("-i");
    }
}

#[tokio::test(flavor = "current_thread")]
async fn immutable_store_files_close_the_writers_1011_without_a_signal() {
    // On the project's disk (a temporary directory may be on tmpfs, whose pages the kernel
    // never writes back).
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let server = start_sqlite(sqlite_config(dir.path())).await;
    let (mut alice, mut bob, mut carol) = clients(&server, "busy").await;
    add_item(&mut alice, 0).await;
    ping_collect(&mut alice).await;
    let files: Vec<PathBuf> = ["collab.db", "collab.db-wal", "collab.db-shm"]
        .iter()
        .map(|f| dir.path().join(f))
        .collect();
    // The kernel's writeback cleans the mapped WAL index's pages; the next write to a clean page
    // of an immutable file is a SIGBUS. Written back now, as it would be within half a minute.
    for file in &files {
        std::fs::File::open(file).unwrap().sync_all().unwrap();
    }
    let immutable = Immutable::set(files);

    the_next_write_fails(&server, (&mut alice, &mut bob, &mut carol)).await;
    // Loading the failed session reads the database through the WAL index: refused too.
    let mut again = server.connect("/ws/busy/alice").await;
    assert_eq!(close_code(&mut again).await, 1011);
    // The shutdown's checkpoint writes the WAL index: it fails, and the server stops cleanly.
    stop(server).await;
    drop(immutable);
}

/// A small tmpfs mounted for a test, unmounted whatever its outcome.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(at: &Path, size: &str) -> SmallDisk {
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .expect("mount runs");
        assert!(
            status.success(),
            "mounting a tmpfs failed: this test needs root"
        );
        SmallDisk(at.to_path_buf())
    }

    /// Writes a file until the file system is full.
    fn fill(&self) {
        use std::io::Write as _;
        let mut filler = std::fs::File::create(self.0.join("filler")).unwrap();
        let chunk = vec![0u8; 4096];
        while filler.write_all(&chunk).is_ok() {}
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // Lazily: the store's files may still be open when a failing test unwinds.
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_full_disk_closes_the_writers_1011() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let disk = SmallDisk::mount(dir.path(), "4m");
    let data = dir.path().join("data");
    let server = start_sqlite(sqlite_config(&data)).await;
    let (mut alice, mut bob, mut carol) = clients(&server, "busy").await;
    add_item(&mut alice, 0).await;
    ping_collect(&mut alice).await;
    disk.fill();

    the_next_write_fails(&server, (&mut alice, &mut bob, &mut carol)).await;
    stop(server).await;
    drop(disk);
}
