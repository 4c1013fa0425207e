//! The stored log's compaction (PROTOCOL §6): a compacted log reloads identically, shutdown
//! waits for the compaction a session makes as it leaves memory, and an evicted session's
//! compaction never erases what its successor stored.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::durable::*;
use common::*;
use serde_json::json;
use tokio::sync::watch;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stored_log_is_compacted_and_reloads_identically() {
    let dir = tempfile::tempdir().unwrap();
    let session = "compact";
    let server = start_sqlite(sqlite_config(dir.path())).await;
    let (mut alice, _) = server.legacy(session, "alice").await;
    let (item_type, uuid, data) = fixture_item(0);
    send_json(
        &mut alice,
        &command("add_item", &item_type, &uuid, data.clone(), "alice"),
    )
    .await;
    const MOVES: usize = 1200;
    for step in 1..=MOVES {
        let mut moved = data.clone();
        moved["x_mm"] = json!(step as f64 * 0.5);
        send_json(
            &mut alice,
            &command("move_item", &item_type, &uuid, moved, "alice"),
        )
        .await;
    }
    ping_collect(&mut alice).await;

    let rows = stored_rows(dir.path(), session);
    assert!(
        rows.len() < 1000,
        "{} rows stored after {} updates: the log was not compacted",
        rows.len(),
        MOVES + 1
    );
    assert_eq!(rows[0].0, "snapshot", "the log starts with a snapshot");
    assert_eq!(
        rows.iter().filter(|(kind, _)| kind == "snapshot").count(),
        1
    );

    let scene_before = server.scene(session).await;
    assert_eq!(
        items_by_uuid(&scene_before)[&uuid]["x_mm"],
        json!(MOVES as f64 * 0.5)
    );
    let v1_before = v1_state(server.addr, session).await;
    drop(alice);
    stop(server).await;
    // (Whether the compaction at exit already landed is the business of
    // `shutdown_waits_for_the_compaction_at_exit`.)
    let rows = stored_rows(dir.path(), session);
    assert!(rows.len() < 1000 && rows[0].0 == "snapshot", "{rows:?}");

    let server = start_sqlite(sqlite_config(dir.path())).await;
    let scene_after = server.scene(session).await;
    assert_eq!(items_by_uuid(&scene_after), items_by_uuid(&scene_before));
    assert!(scene_after["version"].as_u64() >= scene_before["version"].as_u64());
    let v1_after = v1_state(server.addr, session).await;
    assert_eq!(v1_after, v1_before);
    stop(server).await;
}

/// Compactions that take a while (a slow disk), counted as they start and finish.
#[derive(Default)]
struct SlowCompaction {
    started: AtomicUsize,
    finished: watch::Sender<usize>,
}

impl StoreHook for SlowCompaction {
    fn before(&self, op: StoreOp) -> Wait {
        if op != StoreOp::Compact {
            return Box::pin(std::future::ready(()));
        }
        self.started.fetch_add(1, Ordering::SeqCst);
        // The store's own latency, not a wait for anything in the test.
        Box::pin(tokio::time::sleep(Duration::from_millis(300)))
    }

    fn after(&self, op: StoreOp) {
        if op == StoreOp::Compact {
            self.finished.send_modify(|n| *n += 1);
        }
    }
}

/// Adds fixture item 0 as `user`, moves it `moves` times, and waits until all is applied;
/// returns the item's uuid.
async fn add_then_move(ws: &mut Ws, user: &str, moves: usize) -> String {
    let (item_type, uuid, data) = fixture_item(0);
    send_json(
        ws,
        &command("add_item", &item_type, &uuid, data.clone(), user),
    )
    .await;
    for step in 0..moves {
        let mut moved = data.clone();
        moved["x_mm"] = json!(step as f64 + 0.5);
        send_json(ws, &command("move_item", &item_type, &uuid, moved, user)).await;
    }
    ping_collect(ws).await;
    uuid
}

/// `Server::shutdown` "waits for sessions and the store": a session's last write (its
/// compaction as it leaves memory) is done when it returns, so the next server on the same
/// data never races it (and the process does not exit in the middle of it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_the_compaction_at_exit() {
    let store = Arc::new(HookStore::new(SlowCompaction::default()));
    let mut server = TestServer::start_with(test_config(), store.clone()).await;
    let (mut alice, _) = server.legacy("slow", "alice").await;
    add_then_move(&mut alice, "alice", 5).await;
    close_client(alice).await;
    server.shutdown().await;
    let started = store.hook.started.load(Ordering::SeqCst);
    let finished = *store.hook.finished.borrow();
    assert!(
        started >= 1,
        "the session compacted its log as it left memory"
    );
    assert_eq!(
        finished, started,
        "Server::shutdown returned while a session's compaction was still running"
    );
}

/// A session that leaves memory compacts its log; a client arriving meanwhile gets a new
/// session task that loads the log and appends to it. The old task's compaction must not
/// replace what its successor stored (here the store is slow to apply the compaction, as
/// it is when the old task takes a while to encode a large document after leaving the
/// registry and before calling `compact`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicted_sessions_compaction_never_erases_what_its_successor_stored() {
    let store = Arc::new(HookStore::new(SlowCompaction::default()));
    let mut config = test_config();
    config.evict_after = Duration::from_millis(50);
    let server = TestServer::start_with(config, store.clone()).await;
    let (mut alice, _) = server.legacy("succession", "alice").await;
    let uuid = add_then_move(&mut alice, "alice", 5).await;
    close_client(alice).await;
    // The session left memory; its compaction is under way.
    await_health(server.addr, "sessions", 0).await;

    let (mut bob, _) = server.legacy("succession", "bob").await;
    let (item_type, bobs, data) = fixture_item(1);
    send_json(
        &mut bob,
        &command("add_item", &item_type, &bobs, data, "bob"),
    )
    .await;
    ping_collect(&mut bob).await;
    close_client(bob).await;

    // Once every compaction finished and the session left memory, reload it.
    let mut finished = store.hook.finished.subscribe();
    let all_done = tokio::time::timeout(
        PATIENCE,
        finished.wait_for(|n| *n >= store.hook.started.load(Ordering::SeqCst)),
    )
    .await
    .is_ok();
    assert!(all_done, "compactions finish");
    await_health(server.addr, "sessions", 0).await;
    let scene = items_by_uuid(&server.scene("succession").await);
    assert!(scene.contains_key(&uuid), "{scene:?}");
    assert!(
        scene.contains_key(&bobs),
        "bob's item (acknowledged by a pong, so stored) was erased by the previous session's \
         compaction: {:?}",
        scene.keys()
    );
}
