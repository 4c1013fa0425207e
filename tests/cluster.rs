//! `--cluster`: three in-process nodes sharing their sessions through a real `redis-server`
//! (on a free port, AOF on with `appendfsync always`, no RDB snapshots, in a temporary
//! directory). Yjs clients spread over the nodes converge, on every node and in Redis; a
//! desktop client sees a Yjs client's change made on another node as a command, and the other
//! way round; a late joiner on a third node gets the whole state; a node that restarts loads
//! the session from Redis and follows it again. Presence is session-wide: the user list, joins
//! and leaves, replacement (4000) and awareness cross nodes, and a node that stops renewing its
//! heartbeat (killed: the binary as a child process) has its users leave on the others. A
//! node killed (`kill -9`) while clients on every node edit continuously loses nothing its
//! clients had received, and the other nodes' clients go on undisturbed. A session whose feed
//! channel is full holds back neither the node's other sessions nor its heartbeat. Conflicting
//! bursts from desktop and Yjs clients on three nodes, which no two nodes apply in the same
//! order, leave every replica and every desktop canvas showing one document.
//!
//! No sleeps: every wait is for an event (a frame, Redis' "ready" line), bounded by
//! `PATIENCE`.

mod common;

use std::collections::BTreeSet;
use std::process::Stdio;
use std::sync::Arc;

use collab_core::session::{ConnKind, Input, PresenceChange};
use common::child::ChildServer;
use common::durable::close_client;
use common::*;
use futures_util::{FutureExt, SinkExt, StreamExt};
use optiverse_collab::config::Config;
use optiverse_collab::store::redis::RedisStore;
use optiverse_collab::store::{Following, Remote, RemoteBatch, SessionMeta, Store};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use yrs::sync::{Message, SyncMessage};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{Doc, Map, ReadTxn, StateVector, Transact};

/// A `redis-server` of this test's own, stopped when dropped.
struct Redis {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
    url: String,
}

impl Redis {
    /// Starts `redis-server` on a free port in a temporary directory.
    async fn start() -> Redis {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Redis {
            child: spawn_redis(port, dir.path()).await,
            dir,
            port,
            url: format!("redis://127.0.0.1:{port}"),
        }
    }

    /// Kills Redis (SIGKILL: only what its AOF holds survives) and starts it again on the
    /// same port and directory.
    async fn kill_and_restart(&mut self) {
        self.child.kill().await.unwrap();
        self.child = spawn_redis(self.port, self.dir.path()).await;
    }

    /// A node of the cluster, in process.
    async fn node(&self) -> TestServer {
        self.node_with(test_config()).await
    }

    /// A node of the cluster with `config` (its `cluster` set to this Redis).
    async fn node_with(&self, mut config: Config) -> TestServer {
        config.cluster = Some(self.url.clone());
        let store: Arc<dyn Store> = Arc::new(RedisStore::connect(&self.url).await.unwrap());
        TestServer::start_with(config, store).await
    }

    /// A connection of the test's own.
    async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// How many entries the session's stream holds.
    async fn stream_len(&self, session: &str) -> u64 {
        redis::cmd("XLEN")
            .arg(format!("collab:{{{session}}}:updates"))
            .query_async(&mut self.conn().await)
            .await
            .unwrap()
    }

    /// The session's document as Redis holds it (a store of its own reads it).
    async fn stored_doc(&self, session: &str) -> Doc {
        let store = RedisStore::connect(&self.url).await.unwrap();
        let stored = store.load(session).await.unwrap().expect("stored in Redis");
        let doc = Doc::new();
        items(&doc);
        for update in &stored.updates {
            apply_update(&doc, update);
        }
        doc
    }

    /// The session's items as Redis holds them.
    async fn stored_items(&self, session: &str) -> std::collections::BTreeMap<String, Value> {
        doc_items(&self.stored_doc(session).await)
    }
}

/// Runs `redis-server` (the `REDIS_SERVER` binary, else the one on `PATH`) with AOF on and
/// `appendfsync always`, and waits for its "Ready to accept connections".
async fn spawn_redis(port: u16, dir: &std::path::Path) -> Child {
    let binary = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
    let mut child = Command::new(&binary)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args([
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
        ])
        .arg("--dir")
        .arg(dir)
        .args(["--logfile", "", "--daemonize", "no"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run {binary} (Debian package redis-server; .ci/test installs it): {e}")
        });
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    tokio::time::timeout(PATIENCE, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("Ready to accept connections") {
                return;
            }
        }
        panic!("redis-server stopped before it was ready");
    })
    .await
    .expect("redis-server became ready");
    // Keep reading its log, so that it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    child
}

/// Reads Updates until the client's document holds everything `targets` hold.
async fn await_covering(client: &mut YClient, targets: &[StateVector]) {
    let covered = |client: &YClient| {
        let have = state_vector_of(client);
        targets.iter().all(|target| covers(&have, target))
    };
    while !covered(client) {
        if let Message::Sync(SyncMessage::Update(update) | SyncMessage::SyncStep2(update)) =
            client.recv().await
        {
            client.apply(&update);
        }
    }
}

fn state_vector_of(client: &YClient) -> StateVector {
    client.doc.transact().state_vector()
}

/// Reads messages until a `command` comes; returns it.
async fn next_command(ws: &mut Ws) -> Value {
    loop {
        let msg = recv_json(ws).await;
        if msg["type"] == "command" {
            return msg;
        }
    }
}

/// The next batch of updates a feed hands its session (there is no presence in these
/// sessions).
async fn next_batch(following: &mut Following) -> RemoteBatch {
    match tokio::time::timeout(PATIENCE, following.rx.recv())
        .await
        .unwrap()
        .unwrap()
    {
        Remote::Updates(batch) => batch,
        other => panic!("expected updates, got {other:?}"),
    }
}

/// Reads messages until one of type `kind` comes; returns it.
async fn next_of(ws: &mut Ws, kind: &str) -> Value {
    loop {
        let msg = recv_json(ws).await;
        if msg["type"] == kind {
            return msg;
        }
    }
}

fn ruler(uuid: &str, name: &str) -> Value {
    json!({"item_uuid": uuid, "x_mm": 1.5, "y_mm": -2.0, "angle_deg": 0.0, "name": name,
        "points": [[0.0, 0.0], [25.4, 0.0]], "z_value": 2, "locked": false})
}

/// Another node's desktop connection `peer` of `user` joining, as a node publishes it.
fn desktop_join(peer: u64, user: &str) -> PresenceChange {
    PresenceChange::Joined {
        peer,
        kind: ConnKind::Legacy,
        user: Some(user.into()),
        connected_at: "2026-12-05T00:00:00.000Z".into(),
        holds_name: false,
    }
}

#[tokio::test]
async fn yjs_clients_on_three_nodes_converge_on_every_node_and_in_redis() {
    let redis = Redis::start().await;
    let nodes = [redis.node().await, redis.node().await, redis.node().await];
    let session = "cluster-yjs";
    let mut clients = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let (client, _) = YClient::join(node, &format!("/yjs/{session}?user=y{i}")).await;
        clients.push(client);
    }
    // Each adds an item, all at once; then each renames the first client's item, at once.
    let uuids: Vec<String> = (0..3)
        .map(|i| format!("0e7d3c1b-2a49-4f5e-9d8c-7b6a5f4e3d2{i}"))
        .collect();
    for (i, client) in clients.iter_mut().enumerate() {
        let data = ruler(&uuids[i], &format!("ruler {i}"));
        client
            .edit_and_send(|txn, items| {
                items.insert(txn, uuids[i].as_str(), item_prelim("ruler", &data));
            })
            .await;
    }
    let targets: Vec<StateVector> = clients.iter().map(state_vector_of).collect();
    for client in &mut clients {
        await_covering(client, &targets).await;
    }
    for (i, client) in clients.iter_mut().enumerate() {
        client
            .edit_and_send(|txn, items| {
                set_fields(
                    txn,
                    items,
                    &uuids[0],
                    &[("name", json!(format!("renamed by {i}")))],
                );
            })
            .await;
    }
    let targets: Vec<StateVector> = clients.iter().map(state_vector_of).collect();
    for client in &mut clients {
        await_covering(client, &targets).await;
    }

    let expected = doc_items(&clients[0].doc);
    assert_eq!(expected.len(), 3, "{expected:#?}");
    for (i, client) in clients.iter().enumerate() {
        assert_eq!(doc_items(&client.doc), expected, "client on node {i}");
    }
    // Each node's own document: a fresh client's SyncStep2 from every node.
    for (i, node) in nodes.iter().enumerate() {
        let (fresh, _) = YClient::join(node, &format!("/yjs/{session}")).await;
        assert_eq!(doc_items(&fresh.doc), expected, "the document of node {i}");
    }
    assert_eq!(
        redis.stored_items(session).await,
        expected,
        "what Redis holds"
    );
    // One entry per edit: what a node applied from the stream was not appended again.
    assert_eq!(redis.stream_len(session).await, 6);
}

/// The store alone: a compaction appends a snapshot saying what it covers and trims exactly
/// that; another compaction within the lease is skipped; a follower that had not read the
/// trimmed entries gets the snapshot first, one that had read them gets only its progress.
#[tokio::test]
async fn compaction_trims_what_its_snapshot_covers_and_lagging_followers_get_the_snapshot() {
    let redis = Redis::start().await;
    let writer = RedisStore::connect(&redis.url).await.unwrap();
    let reader = RedisStore::connect(&redis.url).await.unwrap();
    let session = "cluster-compaction";
    let doc = Doc::new();
    let updates: Vec<Vec<u8>> = (0..3)
        .map(|i| {
            let uuid = format!("3e7d3c1b-2a49-4f5e-9d8c-7b6a5f4e3d2{i}");
            let data = ruler(&uuid, "r");
            edit(&doc, |txn, items| {
                items.insert(txn, uuid.as_str(), item_prelim("ruler", &data));
            })
        })
        .collect();
    let meta = SessionMeta { initialized: true };
    let mut positions = Vec::new();
    for update in &updates {
        let position = writer
            .append(session, vec![update.clone()], meta.clone())
            .await
            .unwrap();
        positions.push(position);
    }
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");

    // A snapshot of the first two updates, covering up to the second.
    let snapshot_doc = Doc::new();
    items(&snapshot_doc);
    apply_update(&snapshot_doc, &updates[0]);
    apply_update(&snapshot_doc, &updates[1]);
    let snapshot = snapshot_doc
        .transact()
        .encode_state_as_update_v1(&StateVector::default());
    writer
        .compact(session, snapshot.clone(), positions[1], meta.clone())
        .await
        .unwrap();
    // The first two entries went; the third and the snapshot stay.
    assert_eq!(redis.stream_len(session).await, 2);
    writer
        .compact(session, snapshot.clone(), positions[2], meta.clone())
        .await
        .unwrap();
    assert_eq!(
        redis.stream_len(session).await,
        2,
        "within the lease: skipped"
    );

    let loaded = reader.load(session).await.unwrap().expect("stored");
    assert_eq!(loaded.updates, [snapshot.clone(), updates[2].clone()]);
    assert!(loaded.last_seq > positions[2]);
    assert!(loaded.meta.initialized);

    // A follower that read nothing missed the trimmed entries: the snapshot first, then the
    // update after what it covers (another node's, for this reader).
    let mut lagging = reader.follow(session, 0).await.unwrap().expect("a feed");
    let batch = next_batch(&mut lagging).await;
    assert_eq!(batch.updates, [snapshot.clone(), updates[2].clone()]);
    assert_eq!(batch.upto, loaded.last_seq);
    drop(lagging);
    // A follower that had read up to the third update gets only its progress.
    let mut current = reader
        .follow(session, positions[2])
        .await
        .unwrap()
        .expect("a feed");
    let batch = next_batch(&mut current).await;
    assert!(batch.updates.is_empty(), "{} updates", batch.updates.len());
    assert_eq!(batch.upto, loaded.last_seq);
    // The writer's own entries never come back to it.
    let mut own = writer.follow(session, 0).await.unwrap().expect("a feed");
    let batch = next_batch(&mut own).await;
    assert_eq!(batch.updates, [snapshot], "only the missed snapshot");

    let listed = reader.list().await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].id, session);
    assert!(listed[0].stored_bytes > 0 && listed[0].last_change.is_some());
}

#[tokio::test]
async fn desktop_and_yjs_clients_on_different_nodes_see_each_other_and_late_joiners_get_everything()
{
    let redis = Redis::start().await;
    let (node_a, node_b, node_c) = (redis.node().await, redis.node().await, redis.node().await);
    let session = "cluster-mixed";
    let (mut alice, _) = node_a.settled(session, "alice").await;
    let (mut bob, _) = YClient::join(&node_b, &format!("/yjs/{session}?user=bob")).await;

    // Bob's item, made on node B, reaches alice on node A as a command.
    let uuid_b = "1e7d3c1b-2a49-4f5e-9d8c-7b6a5f4e3d2c";
    let data_b = ruler(uuid_b, "bob's ruler");
    bob.edit_and_send(|txn, items| {
        items.insert(txn, uuid_b, item_prelim("ruler", &data_b));
    })
    .await;
    let add = next_command(&mut alice).await;
    assert_eq!(add["command"]["action"], "add_item", "{add:#?}");
    assert_eq!(add["command"]["item_id"], uuid_b, "{add:#?}");
    assert_same(
        &add["command"]["data"],
        &with_type(&data_b, "ruler"),
        "bob's item as alice got it",
    );

    // Alice's item, made on node A, reaches bob on node B as an Update.
    let (type_a, uuid_a, data_a) = fixture_item(1);
    send_json(
        &mut alice,
        &command("add_item", &type_a, &uuid_a, data_a.clone(), "alice"),
    )
    .await;
    while bob.item(&uuid_a).is_none() {
        if let Message::Sync(SyncMessage::Update(update)) = bob.recv().await {
            bob.apply(&update);
        }
    }
    assert_same(
        &bob.item(&uuid_a).unwrap(),
        &with_type(&data_a, &type_a),
        "alice's item as bob got it",
    );
    // And an edit of bob's item by alice, as the desktop app sends it.
    let mut moved = data_b.clone();
    moved["x_mm"] = json!(42.0);
    send_json(
        &mut alice,
        &command("update_item", "ruler", uuid_b, moved.clone(), "alice"),
    )
    .await;
    while bob
        .item(uuid_b)
        .is_some_and(|item| item["x_mm"].as_f64() != Some(42.0))
    {
        if let Message::Sync(SyncMessage::Update(update)) = bob.recv().await {
            bob.apply(&update);
        }
    }

    // Late joiners on node C: a Yjs client's SyncStep2 and a desktop client's full state
    // hold both items as they are now.
    let (late, _) = YClient::join(&node_c, &format!("/yjs/{session}")).await;
    assert_eq!(doc_items(&late.doc), doc_items(&bob.doc));
    let (_carol, _, got) = node_c.joiner(session, "carol").await;
    let full = got
        .iter()
        .find(|m| m["type"] == "sync:full_state")
        .unwrap_or_else(|| panic!("no full state: {got:#?}"));
    let scene = scene_by_uuid(&full["state"]);
    assert_eq!(scene.len(), 2, "{scene:#?}");
    assert_eq!(scene[uuid_b]["x_mm"].as_f64(), Some(42.0), "{scene:#?}");
    assert_same(
        &normalize(&scene[uuid_a.as_str()]),
        &normalize(&with_type(&data_a, &type_a)),
        "alice's item in carol's full state",
    );
}

#[tokio::test]
async fn a_restarted_node_loads_the_session_from_redis_and_follows_it_again() {
    let redis = Redis::start().await;
    let mut node_a = redis.node().await;
    let node_b = redis.node().await;
    let session = "cluster-restart";
    let (mut on_a, _) = YClient::join(&node_a, &format!("/yjs/{session}?user=a")).await;
    let (mut on_b, _) = YClient::join(&node_b, &format!("/yjs/{session}?user=b")).await;
    for i in 0..5 {
        let uuid = format!("2e7d3c1b-2a49-4f5e-9d8c-7b6a5f4e3d2{i}");
        let data = ruler(&uuid, &format!("ruler {i}"));
        on_a.edit_and_send(|txn, items| {
            items.insert(txn, uuid.as_str(), item_prelim("ruler", &data));
        })
        .await;
    }
    let target = [state_vector_of(&on_a)];
    await_covering(&mut on_b, &target).await;
    drop(on_a);
    // Shut down: node A's session writes what it has and compacts (it holds the lease).
    node_a.shutdown().await;
    drop(node_a);

    let node_a = redis.node().await;
    let (mut again, _) = YClient::join(&node_a, &format!("/yjs/{session}?user=a")).await;
    assert_eq!(doc_items(&again.doc), doc_items(&on_b.doc));
    assert_eq!(doc_items(&again.doc).len(), 5);
    // The restarted node follows the session: an edit on B reaches its client, and one made
    // on it reaches B.
    on_b.edit_and_send(|txn, items| {
        set_fields(
            txn,
            items,
            "2e7d3c1b-2a49-4f5e-9d8c-7b6a5f4e3d20",
            &[("name", json!("from b"))],
        );
    })
    .await;
    await_covering(&mut again, &[state_vector_of(&on_b)]).await;
    again
        .edit_and_send(|txn, items| {
            set_fields(
                txn,
                items,
                "2e7d3c1b-2a49-4f5e-9d8c-7b6a5f4e3d21",
                &[("name", json!("from a"))],
            );
        })
        .await;
    await_covering(&mut on_b, &[state_vector_of(&again)]).await;
    assert_eq!(doc_items(&again.doc), doc_items(&on_b.doc));
    assert_eq!(redis.stored_items(session).await, doc_items(&on_b.doc));
}

/// A client whose earlier change reaches a node only through the stream (it reconnected
/// there first): the node holds its new blocks back until the earlier change comes from the
/// feed, and then stores them, so the other nodes get them too.
#[tokio::test]
async fn blocks_a_node_held_back_for_a_change_from_the_stream_are_stored_once_let_in() {
    let redis = Redis::start().await;
    let (node_b, node_c) = (redis.node().await, redis.node().await);
    let session = "cluster-held";
    let (mut watcher, _) = YClient::join(&node_c, &format!("/yjs/{session}")).await;

    let writer = Doc::new();
    let uuid = "4e7d3c1b-2a49-4f5e-9d8c-7b6a5f4e3d2c";
    let data = ruler(uuid, "first");
    let earlier = edit(&writer, |txn, items| {
        items.insert(txn, uuid, item_prelim("ruler", &data));
    });
    let later = edit(&writer, |txn, items| {
        set_fields(txn, items, uuid, &[("name", json!("second"))]);
    });
    // The later change reaches node B first; once B answered a SyncStep1 sent after it, B
    // has handled it (and held it back: what it follows is missing).
    let mut reconnected =
        YClient::connect_with(&node_b, &format!("/yjs/{session}?user=w"), Doc::new()).await;
    reconnected.handshake().await;
    reconnected
        .send(Message::Sync(SyncMessage::Update(later)))
        .await;
    reconnected.sync().await;
    // The earlier change, as another node stored it.
    let other_node = RedisStore::connect(&redis.url).await.unwrap();
    other_node
        .append(session, vec![earlier], SessionMeta { initialized: true })
        .await
        .unwrap();
    // Node C's client gets both: the earlier from the other node's entry, the later from
    // what node B stored once it let it in.
    await_covering(&mut watcher, &[writer.transact().state_vector()]).await;
    assert_eq!(watcher.item(uuid).unwrap()["name"], "second");
    assert_eq!(redis.stored_items(session).await[uuid]["name"], "second");
}

/// Redis killed and started again: what clients on other nodes had received is still there,
/// and the nodes reconnect (their appends and feeds) and go on, their clients still connected.
#[tokio::test]
async fn nodes_resume_after_redis_is_killed_and_restarted_and_keep_what_was_acknowledged() {
    let mut redis = Redis::start().await;
    let (node_a, node_b) = (redis.node().await, redis.node().await);
    let session = "cluster-redis-restart";
    let (mut on_a, _) = YClient::join(&node_a, &format!("/yjs/{session}?user=a")).await;
    let (mut on_b, _) = YClient::join(&node_b, &format!("/yjs/{session}?user=b")).await;
    let add = |i: usize| {
        let uuid = format!("5e7d3c1b-2a49-4f5e-9d8c-7b6a5f4e3d2{i}");
        let data = ruler(&uuid, &format!("ruler {i}"));
        move |txn: &mut yrs::TransactionMut, items: &yrs::MapRef| {
            items.insert(txn, uuid.as_str(), item_prelim("ruler", &data));
        }
    };
    for i in 0..3 {
        on_a.edit_and_send(add(i)).await;
    }
    // Acknowledged: a client of another node has it, so it went through Redis.
    await_covering(&mut on_b, &[state_vector_of(&on_a)]).await;
    let acknowledged = doc_items(&on_b.doc);

    redis.kill_and_restart().await;
    assert_eq!(redis.stored_items(session).await, acknowledged);

    // Both ways again, on the same connections.
    on_a.edit_and_send(add(3)).await;
    await_covering(&mut on_b, &[state_vector_of(&on_a)]).await;
    on_b.edit_and_send(add(4)).await;
    await_covering(&mut on_a, &[state_vector_of(&on_b)]).await;
    assert_eq!(doc_items(&on_a.doc), doc_items(&on_b.doc));
    assert_eq!(doc_items(&on_a.doc).len(), 5);
    assert_eq!(redis.stored_items(session).await, doc_items(&on_a.doc));
}

#[tokio::test]
async fn a_late_joiner_on_any_node_is_told_the_users_of_every_node() {
    let redis = Redis::start().await;
    let (node_a, node_b, node_c) = (redis.node().await, redis.node().await, redis.node().await);
    let session = "cluster-users";
    let (_alice, ack) = node_a.legacy(session, "alice").await;
    assert_eq!(listed(&ack), ["alice"]);
    let (_bob, ack) = node_b.legacy(session, "bob").await;
    assert_eq!(listed(&ack), ["alice", "bob"]);
    let (_yjs, _) = YClient::join(&node_b, &format!("/yjs/{session}?user=yvonne")).await;
    let (_carol, ack) = node_c.legacy(session, "carol").await;
    assert_eq!(listed(&ack), ["alice", "bob", "yvonne", "carol"], "{ack}");
    assert_eq!(ack["is_host"], false, "alice was first: {ack}");
}

#[tokio::test]
async fn joins_and_leaves_on_one_node_reach_the_users_of_the_others() {
    let redis = Redis::start().await;
    let (node_a, node_b) = (redis.node().await, redis.node().await);
    let session = "cluster-join-leave";
    let (mut alice, _) = node_a.legacy(session, "alice").await;
    let (bob, _) = node_b.legacy(session, "bob").await;
    let joined = next_of(&mut alice, "user:joined").await;
    assert_eq!(joined["user_id"], "bob", "{joined}");
    assert_timestamp(&joined["timestamp"]);

    // A second connection of bob's, on node A (a Yjs one: not a replacement), then bob's
    // desktop connection on B closes: bob is still there, nobody is told he left.
    let (bob_yjs, _) = YClient::join(&node_a, &format!("/yjs/{session}?user=bob")).await;
    close_client(bob).await;
    assert_eq!(
        ping_collect(&mut alice).await,
        Vec::<Value>::new(),
        "bob is still connected, on node A"
    );
    // Closing his last one (on node A) is his leave; then one on B.
    bob_yjs.close().await;
    let left = next_of(&mut alice, "user:left").await;
    assert_eq!(left["user_id"], "bob", "{left}");
    let (dave, _) = node_b.legacy(session, "dave").await;
    assert_eq!(next_of(&mut alice, "user:joined").await["user_id"], "dave");
    close_client(dave).await;
    let left = next_of(&mut alice, "user:left").await;
    assert_eq!(left["user_id"], "dave", "{left}");
}

#[tokio::test]
async fn a_user_joining_on_another_node_replaces_the_older_connection_with_4000() {
    let redis = Redis::start().await;
    let (node_a, node_b) = (redis.node().await, redis.node().await);
    let session = "cluster-replace";
    let (mut old, _) = node_a.legacy(session, "alice").await;
    let (mut bob, _) = node_a.legacy(session, "bob").await;
    let (eve, _) = node_a.legacy(session, "eve").await;
    let (mut carol, _) = node_b.legacy(session, "carol").await;
    let (new, ack) = node_b.legacy(session, "alice").await;
    assert_eq!(listed(&ack), ["alice", "bob", "eve", "carol"], "{ack}");
    let (code, reason) = close_frame(&mut old).await;
    assert_eq!(code, 4000, "{reason}");
    // The swap is no leave and no join, on either node: bob's ping is answered after node A
    // handled the swap; carol hears eve leave after whatever node A told node B of the swap.
    let seen = ping_collect(&mut bob).await;
    assert!(!seen.iter().any(|m| m["user_id"] == "alice"), "{seen:#?}");
    close_client(eve).await;
    let mut seen = Vec::new();
    loop {
        let msg = recv_json(&mut carol).await;
        if msg["type"] == "user:left" && msg["user_id"] == "eve" {
            break;
        }
        seen.push(msg);
    }
    assert!(!seen.iter().any(|m| m["user_id"] == "alice"), "{seen:#?}");
    assert_eq!(next_of(&mut bob, "user:left").await["user_id"], "eve");
    // A replacement within node B is no leave or join on node A either (bob hears dave join
    // after whatever node B told of the swap).
    let (mut newer, _) = node_b.legacy(session, "alice").await;
    let mut new = new;
    assert_eq!(close_code(&mut new).await, 4000);
    let (_dave, _) = node_b.legacy(session, "dave").await;
    let mut seen = Vec::new();
    loop {
        let msg = recv_json(&mut bob).await;
        if msg["type"] == "user:joined" && msg["user_id"] == "dave" {
            break;
        }
        seen.push(msg);
    }
    assert!(!seen.iter().any(|m| m["user_id"] == "alice"), "{seen:#?}");
    // A later leave of the newest connection is alice's leave, on node A too.
    let _ = newer.close(None).await;
    let left = next_of(&mut bob, "user:left").await;
    assert_eq!(left["user_id"], "alice", "{left}");
}

#[tokio::test]
async fn awareness_reaches_the_yjs_clients_of_other_nodes_and_goes_when_its_connection_does() {
    let redis = Redis::start().await;
    let (node_a, node_b, node_c) = (redis.node().await, redis.node().await, redis.node().await);
    let session = "cluster-awareness";
    let (mut watcher, _) = YClient::join(&node_b, &format!("/yjs/{session}?user=w")).await;
    let (mut setter, _) = YClient::join(&node_a, &format!("/yjs/{session}?user=s")).await;
    let id = setter.doc.client_id().get();
    setter
        .send(Message::Awareness(awareness_update(&[(
            id,
            1,
            "{\"cursor\":1}",
        )])))
        .await;
    let seen = watcher.next_awareness().await;
    assert_eq!(
        awareness_entries(&seen)[&id],
        (1, "{\"cursor\":1}".to_owned())
    );
    // The setter hears its own state back (PROTOCOL §5).
    assert_eq!(
        awareness_entries(&setter.next_awareness().await)[&id].1,
        "{\"cursor\":1}"
    );
    // A joiner on B is sent the state; it cannot change it (a connection on A introduced
    // it): refused on B.
    let (mut intruder, got) = YClient::join(&node_b, &format!("/yjs/{session}")).await;
    assert!(
        got.iter().any(|m| matches!(m, Message::Awareness(update)
            if awareness_entries(update).get(&id).is_some_and(|e| e.1 == "{\"cursor\":1}"))),
        "{got:?}"
    );
    intruder
        .send(Message::Awareness(awareness_update(&[(
            id,
            5,
            "{\"cursor\":9}",
        )])))
        .await;
    intruder.sync().await;
    // A later state of the setter's, then its close: the watcher sees exactly these.
    setter
        .send(Message::Awareness(awareness_update(&[(
            id,
            2,
            "{\"cursor\":2}",
        )])))
        .await;
    let seen = watcher.next_awareness().await;
    assert_eq!(
        awareness_entries(&seen)[&id],
        (2, "{\"cursor\":2}".to_owned())
    );
    // A node that starts following the session now shows the state to its first joiner.
    let (_late, got) = YClient::join(&node_c, &format!("/yjs/{session}")).await;
    assert!(
        got.iter().any(|m| matches!(m, Message::Awareness(update)
            if awareness_entries(update).get(&id) == Some(&(2, "{\"cursor\":2}".to_owned())))),
        "{got:?}"
    );
    setter.close().await;
    let removal = watcher.next_awareness().await;
    assert_eq!(awareness_entries(&removal)[&id], (2, "null".to_owned()));
}

/// A node killed (`kill -9`, the real binary as a child process, with a short
/// `--cluster-node-timeout`): once its heartbeat key expires, the other nodes' users hear its
/// users leave and its awareness states go, and a late joiner is not told of them.
#[tokio::test]
async fn the_users_of_a_killed_node_leave_on_the_others() {
    let redis = Redis::start().await;
    let node_a = redis.node().await;
    let session = "cluster-node-killed";
    let (mut alice, _) = node_a.legacy(session, "alice").await;
    let (mut watcher, _) = YClient::join(&node_a, &format!("/yjs/{session}")).await;

    let (mut doomed, addr) = ChildServer::start(&[
        "--cluster",
        &redis.url,
        "--cluster-node-timeout",
        "1",
        "--log-level",
        "info",
    ])
    .await;
    let (mut dora, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws/{session}/dora"))
        .await
        .expect("the child node takes a connection");
    recv_ack(&mut dora, "dora").await;
    let (mut yjs, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/yjs/{session}"))
        .await
        .expect("the child node takes a Yjs connection");
    let awareness = awareness_update(&[(77, 1, "{\"cursor\":3}")]);
    yjs.send(tokio_tungstenite::tungstenite::Message::Binary(
        Message::Awareness(awareness).encode_v1().into(),
    ))
    .await
    .unwrap();
    assert_eq!(next_of(&mut alice, "user:joined").await["user_id"], "dora");
    assert_eq!(
        awareness_entries(&watcher.next_awareness().await)[&77].1,
        "{\"cursor\":3}"
    );

    doomed.kill();
    let left = next_of(&mut alice, "user:left").await;
    assert_eq!(left["user_id"], "dora", "{left}");
    assert_eq!(
        awareness_entries(&watcher.next_awareness().await)[&77].1,
        "null"
    );
    // A late joiner is not told of dora.
    let (_late, ack) = node_a.legacy(session, "erin").await;
    assert_eq!(listed(&ack), ["alice", "erin"], "{ack}");
}

/// What Redis holds is checked like client input: presence entries and hash fields no node
/// writes are skipped, and the session goes on.
#[tokio::test]
async fn presence_in_redis_that_no_node_wrote_is_skipped() {
    let redis = Redis::start().await;
    let node_a = redis.node().await;
    let session = "cluster-bad-presence";
    let mut conn = redis.conn().await;
    let present = format!("collab:{{{session}}}:present");
    let stream = format!("collab:{{{session}}}:presence");
    // Node 98 looks alive: its entries are read, not dropped as a gone node's.
    redis::pipe()
        .cmd("SET")
        .arg("collab:node:98:alive")
        .arg(1)
        .arg("PX")
        .arg(60_000)
        .ignore()
        .cmd("HSET")
        .arg(&present)
        .arg("junk")
        .arg("{}")
        .arg("98:1")
        .arg("{not json")
        .arg("98:2")
        .arg(r#"{"k":"telnet","u":"x","t":"2026-12-05T00:00:00.000Z","h":false}"#)
        .ignore()
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let (mut alice, ack) = node_a.legacy(session, "alice").await;
    assert_eq!(listed(&ack), ["alice"], "{ack}");

    for fields in [
        vec![
            ("n", b"98".to_vec()),
            ("p", b"3".to_vec()),
            ("j", b"{".to_vec()),
        ],
        vec![
            ("n", b"98".to_vec()),
            ("p", b"4".to_vec()),
            ("a", vec![0xff; 9]),
        ],
        vec![("x", b"1".to_vec())],
    ] {
        let mut xadd = redis::cmd("XADD");
        xadd.arg(&stream).arg("*");
        for (field, value) in fields {
            xadd.arg(field).arg(value);
        }
        xadd.query_async::<String>(&mut conn).await.unwrap();
    }
    // Then what a node writes: alice hears of it, and of nothing before it.
    let other = RedisStore::connect(&redis.url).await.unwrap();
    other
        .publish_presence(session, vec![desktop_join(1, "valid")])
        .await
        .unwrap();
    let joined = recv_json(&mut alice).await;
    assert_eq!(joined["type"], "user:joined", "{joined}");
    assert_eq!(joined["user_id"], "valid", "{joined}");
    let (_bob, ack) = node_a.legacy(session, "bob").await;
    assert_eq!(listed(&ack), ["valid", "alice", "bob"], "{ack}");
}

/// Whether `have` holds everything `want` names.
fn covers(have: &StateVector, want: &StateVector) -> bool {
    want.iter().all(|(id, clock)| have.get(id) >= *clock)
}

/// A Yjs client of the load, with what it received from its node alone (its own edits are
/// not in `received`: what it had received is what a node delivered, so what went through
/// Redis first).
struct Loaded {
    client: YClient,
    received: Doc,
    /// How it stopped: `None` when told to, else what its socket did.
    ended: Option<String>,
}

/// A new ruler's uuid: the `n`th of client `client`.
fn load_uuid(client: usize, n: u32) -> String {
    format!("{client:08x}-2a49-4f5e-9d8c-{n:012x}")
}

/// Edits continuously (a new ruler every `pace`) and applies what comes, until `stop` or
/// until its socket ends (a close, an error, the end). Each received update is counted on
/// `progress`.
async fn yjs_load(
    client: YClient,
    received: Doc,
    index: usize,
    mut stop: watch::Receiver<bool>,
    progress: mpsc::UnboundedSender<usize>,
) -> Loaded {
    let mut loaded = Loaded {
        client,
        received,
        ended: None,
    };
    let mut pace = tokio::time::interval(std::time::Duration::from_millis(5));
    let mut n = state_vector_of(&loaded.client).get(&loaded.client.doc.client_id());
    loop {
        tokio::select! {
            _ = stop.changed() => return loaded,
            _ = pace.tick() => {
                let uuid = load_uuid(index, n);
                n += 1;
                let data = ruler(&uuid, &format!("load {index}"));
                let update = edit(&loaded.client.doc, |txn, items| {
                    items.insert(txn, uuid.as_str(), item_prelim("ruler", &data));
                });
                let frame = Message::Sync(SyncMessage::Update(update)).encode_v1();
                if let Err(e) = loaded.client.ws.send(WsMessage::binary(frame)).await {
                    loaded.ended = Some(format!("send: {e}"));
                    return loaded;
                }
            }
            frame = loaded.client.ws.next() => match frame {
                Some(Ok(WsMessage::Binary(bytes))) => {
                    let decoded = Message::decode_v1(&bytes).expect("a y-websocket frame");
                    if let Message::Sync(SyncMessage::Update(update) | SyncMessage::SyncStep2(update)) = decoded {
                        loaded.client.apply(&update);
                        apply_update(&loaded.received, &update);
                        let _ = progress.send(index);
                    }
                }
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => {}
                other => {
                    loaded.ended = Some(format!("{other:?}"));
                    return loaded;
                }
            }
        }
    }
}

/// A desktop client of the load.
struct Desktop {
    ws: Ws,
    uuid: String,
    /// Where its ruler is (its `x_mm`).
    x: f64,
    /// The items it was told of (its own included).
    told: BTreeSet<String>,
    /// How it stopped: `None` when told to, else what its socket did.
    ended: Option<String>,
}

impl Desktop {
    /// Reads commands until it was told of exactly `items`.
    async fn await_told(&mut self, items: &BTreeSet<String>) {
        while &self.told != items {
            let msg = next_command(&mut self.ws).await;
            self.note(&msg);
        }
    }

    fn note(&mut self, command: &Value) {
        if command["command"]["action"] == "add_item" {
            let uuid = command["command"]["item_id"].as_str().unwrap();
            self.told.insert(uuid.to_owned());
        }
    }
}

/// Moves the desktop client's ruler continuously (`update_item`, the whole item, as the app
/// sends it) and notes the commands it gets (each counted on `progress`), until `stop` or
/// until its socket ends.
async fn desktop_load(
    mut desk: Desktop,
    index: usize,
    mut stop: watch::Receiver<bool>,
    progress: mpsc::UnboundedSender<usize>,
) -> Desktop {
    let mut pace = tokio::time::interval(std::time::Duration::from_millis(10));
    loop {
        tokio::select! {
            _ = stop.changed() => return desk,
            _ = pace.tick() => {
                desk.x += 1.0;
                let mut data = ruler(&desk.uuid, "desktop");
                data["x_mm"] = json!(desk.x);
                let msg = command("update_item", "ruler", &desk.uuid, data, "desk");
                if let Err(e) = desk.ws.send(WsMessage::text(msg.to_string())).await {
                    desk.ended = Some(format!("send: {e}"));
                    return desk;
                }
            }
            frame = desk.ws.next() => match frame {
                Some(Ok(WsMessage::Text(text))) => {
                    let msg: Value = serde_json::from_str(&text).unwrap();
                    if msg["type"] == "command" {
                        desk.note(&msg);
                        let _ = progress.send(index);
                    }
                }
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => {}
                other => {
                    desk.ended = Some(format!("{other:?}"));
                    return desk;
                }
            }
        }
    }
}

/// A desktop client that uploaded an empty canvas (so it is told of every change as a
/// command) and added its ruler.
async fn desktop_on(mut ws: Ws, uuid: &str) -> Desktop {
    send_json(
        &mut ws,
        &json!({"type": "sync:full_state", "state": {"items": []}}),
    )
    .await;
    ping_collect(&mut ws).await;
    send_json(
        &mut ws,
        &command("add_item", "ruler", uuid, ruler(uuid, "desktop"), "desk"),
    )
    .await;
    Desktop {
        ws,
        uuid: uuid.to_owned(),
        x: 0.0,
        told: BTreeSet::from([uuid.to_owned()]),
        ended: None,
    }
}

/// The items a desktop client is told of on joining `node` as the app does (`sync:request`
/// after the ack): the full state's and the `add_item`s that came after it; with its socket.
async fn desktop_rejoin(node: &TestServer, session: &str, user: &str) -> (Ws, BTreeSet<String>) {
    let (ws, _, got) = node.joiner(session, user).await;
    let at = got
        .iter()
        .position(|m| m["type"] == "sync:full_state")
        .unwrap_or_else(|| panic!("no full state: {got:#?}"));
    let mut told: BTreeSet<String> = scene_by_uuid(&got[at]["state"]).into_keys().collect();
    for msg in &got[at + 1..] {
        if msg["type"] == "command" && msg["command"]["action"] == "add_item" {
            told.insert(msg["command"]["item_id"].as_str().unwrap().to_owned());
        }
    }
    (ws, told)
}

/// Waits until each of `indices` has received at least `more` updates (or commands) counted
/// from now.
async fn await_progress(
    progress: &mut mpsc::UnboundedReceiver<usize>,
    indices: &[usize],
    more: usize,
) {
    let mut counts = std::collections::HashMap::new();
    tokio::time::timeout(PATIENCE, async {
        while !indices
            .iter()
            .all(|i| counts.get(i).copied().unwrap_or(0) >= more)
        {
            let index = progress.recv().await.expect("the load runs");
            *counts.entry(index).or_insert(0) += 1;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no progress: {counts:?}"));
}

/// A Yjs client of the child node (`addr`), the handshake done.
async fn child_yjs(addr: std::net::SocketAddr, path: &str) -> YClient {
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}{path}"))
        .await
        .expect("the child node takes a Yjs connection");
    YClient::over(ws).await
}

/// `kill -9` of one of three nodes (the real binary, as a child process) while Yjs clients on
/// all three and desktop clients on two edit one session continuously. What the killed
/// node's clients had received is in Redis (it was appended before it was delivered); they
/// reconnect to the other nodes (the desktop one gets a scene with every item it had been
/// told of) and go on. The other nodes' clients are never disconnected and keep
/// receiving; every update any client received is in every surviving node's document and in
/// Redis, and all surviving clients converge.
#[tokio::test]
async fn killing_a_node_under_load_loses_nothing_its_clients_had_and_disturbs_no_other_node() {
    let redis = Redis::start().await;
    let (node_a, node_b) = (redis.node().await, redis.node().await);
    let (mut victim, victim_addr) = ChildServer::start(&["--cluster", &redis.url]).await;
    let session = "cluster-kill-under-load";
    let (stop_tx, stop) = watch::channel(false);
    let (progress_tx, mut progress) = mpsc::unbounded_channel();

    // Clients 0 and 1 on node A, 2 on node B, 3 and 4 on the victim; desktop clients on node
    // B (5) and on the victim (6), first, so that they are told of every item as a command.
    let desk = desktop_on(
        node_b.legacy(session, "desk").await.0,
        "6e7d3c1b-2a49-4f5e-9d8c-7b6a5f4e3d2c",
    )
    .await;
    let desktop = tokio::spawn(desktop_load(desk, 5, stop.clone(), progress_tx.clone()));
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{victim_addr}/ws/{session}/victim-desk"))
            .await
            .expect("the child node takes a desktop connection");
    recv_ack(&mut ws, "victim-desk").await;
    let desk = desktop_on(ws, "6e7d3c1b-2a49-4f5e-9d8c-7b6a5f4e3d2d").await;
    let victim_desktop = tokio::spawn(desktop_load(desk, 6, stop.clone(), progress_tx.clone()));

    let mut survivors = Vec::new();
    for (index, node) in [(0, &node_a), (1, &node_a), (2, &node_b)] {
        let (client, _) = YClient::join(node, &format!("/yjs/{session}?user=y{index}")).await;
        survivors.push(tokio::spawn(yjs_load(
            client,
            Doc::new(),
            index,
            stop.clone(),
            progress_tx.clone(),
        )));
    }
    let mut on_victim = Vec::new();
    for index in [3, 4] {
        let client = child_yjs(victim_addr, &format!("/yjs/{session}?user=y{index}")).await;
        on_victim.push(tokio::spawn(yjs_load(
            client,
            Doc::new(),
            index,
            stop.clone(),
            progress_tx.clone(),
        )));
    }
    // Mid-load: every client has received from the others.
    await_progress(&mut progress, &[0, 1, 2, 3, 4, 5, 6], 30).await;
    victim.kill();
    let mut had = Vec::new();
    for task in on_victim {
        let loaded = tokio::time::timeout(PATIENCE, task)
            .await
            .expect("the killed node's clients see their socket end")
            .unwrap();
        assert!(
            loaded.ended.is_some(),
            "client {} was not cut",
            had.len() + 3
        );
        had.push(loaded);
    }
    // (a) Everything they had received is in Redis: the killed node appended it before it
    // delivered it.
    let stored = redis.stored_doc(session).await.transact().state_vector();
    for (i, loaded) in had.iter().enumerate() {
        let received = loaded.received.transact().state_vector();
        assert!(
            covers(&stored, &received),
            "client {} had received what Redis lacks: {received:?} vs {stored:?}",
            i + 3
        );
    }
    // The killed node's desktop client reconnects to node A as the app does: the scene it
    // gets holds every item it had been told of.
    let mut cut = tokio::time::timeout(PATIENCE, victim_desktop)
        .await
        .expect("the killed node's desktop client sees its socket end")
        .unwrap();
    assert!(cut.ended.is_some(), "the desktop client was not cut");
    let (ws, scene) = desktop_rejoin(&node_a, session, "victim-desk").await;
    assert!(
        scene.is_superset(&cut.told),
        "items it had been told of are missing: {:?}",
        cut.told.difference(&scene).collect::<Vec<_>>()
    );
    cut.ws = ws;
    cut.told = scene;
    cut.ended = None;
    let victim_desktop = tokio::spawn(desktop_load(cut, 6, stop.clone(), progress_tx.clone()));
    // The Yjs ones reconnect, one to each surviving node, and go on editing.
    let mut reconnected = Vec::new();
    for (loaded, node) in had.into_iter().zip([&node_a, &node_b]) {
        let index = reconnected.len() + 3;
        let mut client = YClient::connect_with(
            node,
            &format!("/yjs/{session}?user=y{index}"),
            loaded.client.doc,
        )
        .await;
        client.handshake().await;
        assert!(covers(
            &state_vector_of(&client),
            &loaded.received.transact().state_vector()
        ));
        reconnected.push(tokio::spawn(yjs_load(
            client,
            loaded.received,
            index,
            stop.clone(),
            progress_tx.clone(),
        )));
    }
    // (c) The other nodes' clients keep receiving, the reconnected ones too.
    await_progress(&mut progress, &[0, 1, 2, 3, 4, 5, 6], 30).await;
    stop_tx.send(true).unwrap();

    let mut clients = Vec::new();
    for task in survivors.into_iter().chain(reconnected) {
        let loaded = task.await.unwrap();
        assert_eq!(
            loaded.ended, None,
            "a client of a surviving node was disturbed"
        );
        clients.push(loaded);
    }
    let mut desktops = Vec::new();
    for task in [desktop, victim_desktop] {
        let desk = task.await.unwrap();
        assert_eq!(desk.ended, None, "a desktop client was disturbed");
        desktops.push(desk);
    }

    // (d) Convergence: each client gets everything every other one has, and what the
    // desktop clients' nodes made of their commands (a ping's answer comes after them).
    for desk in &mut desktops {
        for msg in ping_collect(&mut desk.ws).await {
            if msg["type"] == "command" {
                desk.note(&msg);
            }
        }
    }
    let mut targets: Vec<StateVector> =
        clients.iter().map(|l| state_vector_of(&l.client)).collect();
    for node in [&node_a, &node_b] {
        let (fresh, _) = YClient::join(node, &format!("/yjs/{session}")).await;
        targets.push(state_vector_of(&fresh));
    }
    for loaded in &mut clients {
        await_covering(&mut loaded.client, &targets).await;
    }
    let expected = doc_items(&clients[0].client.doc);
    for (i, loaded) in clients.iter().enumerate() {
        assert_eq!(doc_items(&loaded.client.doc), expected, "client {i}");
    }
    // The desktop clients are told of every item (what is still on its way is read), and
    // their rulers are where they last put them.
    let expected_uuids: BTreeSet<String> = expected.keys().cloned().collect();
    for desk in &mut desktops {
        desk.await_told(&expected_uuids).await;
        assert_eq!(expected[&desk.uuid]["x_mm"].as_f64(), Some(desk.x));
    }
    // A desktop client joining on node B gets the same scene.
    let (_late, scene) = desktop_rejoin(&node_b, session, "late").await;
    assert_eq!(scene, expected_uuids);
    // (b) Every update any client received (so acknowledged: it went through Redis) is in
    // each surviving node's document and in Redis.
    let received: Vec<StateVector> = clients
        .iter()
        .map(|l| l.received.transact().state_vector())
        .collect();
    for (name, node) in [("A", &node_a), ("B", &node_b)] {
        let (fresh, _) = YClient::join(node, &format!("/yjs/{session}")).await;
        let have = state_vector_of(&fresh);
        for (i, want) in received.iter().enumerate() {
            assert!(
                covers(&have, want),
                "node {name} lacks what client {i} received"
            );
        }
        assert_eq!(
            doc_items(&fresh.doc),
            expected,
            "the document of node {name}"
        );
    }
    let stored = redis.stored_doc(session).await;
    for (i, want) in received.iter().enumerate() {
        assert!(
            covers(&stored.transact().state_vector(), want),
            "Redis lacks what client {i} received"
        );
    }
    assert_eq!(doc_items(&stored), expected, "what Redis holds");
}

/// One node's feed with two followed sessions, one of which never takes what it is handed
/// (its channel fills): the other's remote updates still come, each as it is appended; and
/// once the stalled one reads, it gets every update it was not handed, in order.
#[tokio::test]
async fn a_session_whose_channel_is_full_does_not_hold_back_another_sessions_feed() {
    let redis = Redis::start().await;
    let writer = RedisStore::connect(&redis.url).await.unwrap();
    let reader = RedisStore::connect(&redis.url).await.unwrap();
    let (stalled, live) = ("cluster-stalled", "cluster-live");
    let meta = SessionMeta { initialized: true };
    let mut held = reader.follow(stalled, 0).await.unwrap().expect("a feed");
    let mut following = reader.follow(live, 0).await.unwrap().expect("a feed");

    // Each round appends to the held session, then to the live one, and awaits the live
    // one's batch: its read came after the held session's entry, so each round hands (or
    // tries to hand) the held session one more batch, many more than its channel holds.
    let doc = Doc::new();
    let mut appended = Vec::new();
    for i in 0..60 {
        let uuid = format!("7e7d3c1b-2a49-4f5e-9d8c-{i:012x}");
        let data = ruler(&uuid, "r");
        let update = edit(&doc, |txn, items| {
            items.insert(txn, uuid.as_str(), item_prelim("ruler", &data));
        });
        writer
            .append(stalled, vec![update.clone()], meta.clone())
            .await
            .unwrap();
        writer
            .append(live, vec![update.clone()], meta.clone())
            .await
            .unwrap();
        let batch = next_batch(&mut following).await;
        assert_eq!(batch.updates, std::slice::from_ref(&update), "round {i}");
        appended.push(update);
    }
    // The held session reads at last: every update, once, in order.
    let mut got = Vec::new();
    while got.len() < appended.len() {
        got.extend(next_batch(&mut held).await.updates);
    }
    assert_eq!(got, appended);
}

/// The heartbeat does not wait for a session whose channel is full: when a node is found
/// gone, the node's other sessions hear of it (and the heartbeat goes on renewing).
#[tokio::test]
async fn a_gone_node_reaches_every_session_though_some_channels_are_full() {
    let redis = Redis::start().await;
    let writer = RedisStore::connect(&redis.url).await.unwrap();
    let reader = RedisStore::connect_with(&redis.url, std::time::Duration::from_millis(500))
        .await
        .unwrap();
    let held_sessions: Vec<String> = (0..4).map(|i| format!("cluster-full-{i}")).collect();
    let live = "cluster-hears-gone";
    let meta = SessionMeta { initialized: true };
    let mut held = Vec::new();
    for session in &held_sessions {
        held.push(reader.follow(session, 0).await.unwrap().expect("a feed"));
    }
    let mut following = reader.follow(live, 0).await.unwrap().expect("a feed");
    // Fill the held sessions' channels (as in the test above: one batch each per round).
    let doc = Doc::new();
    for i in 0..40 {
        let uuid = format!("8e7d3c1b-2a49-4f5e-9d8c-{i:012x}");
        let data = ruler(&uuid, "r");
        let update = edit(&doc, |txn, items| {
            items.insert(txn, uuid.as_str(), item_prelim("ruler", &data));
        });
        for session in &held_sessions {
            writer
                .append(session, vec![update.clone()], meta.clone())
                .await
                .unwrap();
        }
        writer
            .append(live, vec![update.clone()], meta.clone())
            .await
            .unwrap();
        next_batch(&mut following).await;
    }
    // The reader hears of a connection of the writer's, so it watches the writer's node.
    let writer_node = writer
        .follow("cluster-writer-id", 0)
        .await
        .unwrap()
        .expect("a feed")
        .node;
    writer
        .publish_presence(live, vec![desktop_join(1, "w")])
        .await
        .unwrap();
    // The writer stops and its alive key goes: the reader's heartbeat finds it gone.
    drop(writer);
    redis::cmd("DEL")
        .arg(format!("collab:node:{writer_node}:alive"))
        .query_async::<()>(&mut redis.conn().await)
        .await
        .unwrap();
    loop {
        let remote = tokio::time::timeout(PATIENCE, following.rx.recv())
            .await
            .expect("the live session hears the writer's node is gone")
            .unwrap();
        if let Remote::Presence(inputs) = remote {
            if inputs
                .iter()
                .any(|input| matches!(input, Input::NodeGone { node } if *node == writer_node))
            {
                break;
            }
        }
    }
    drop(held);
}

/// How many sessions [`conflicting_edits_on_three_nodes_leave_every_replica_and_canvas_alike`]
/// runs, each with its own interleaving.
const CONFLICT_ROUNDS: usize = 10;

/// Each node applies its own clients' changes at once and other nodes' as its feed brings
/// them, so no two nodes apply one session's updates in the same order (ARCHITECTURE
/// "Cluster", "Order"). Desktop clients on three nodes and a Yjs client each send, without
/// waiting, a burst of moves and renames of the same two items (every one a different value),
/// reading what comes meanwhile and building each command from their canvas, as the app does.
/// Once every node holds every update, each node's document, Redis' and the Yjs client's are
/// the same; every desktop client's canvas (its own edits, then what it received, applied as
/// the client applies it) shows that document, with nothing more owed to it (PROTOCOL §3.3);
/// and no command was refused. Corrections fall due during the bursts too (a short
/// `--correction-delay`), not only at the pings that end them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_edits_on_three_nodes_leave_every_replica_and_canvas_alike() {
    let redis = Redis::start().await;
    let mut config = test_config();
    config.correction_delay = std::time::Duration::from_millis(2);
    let nodes = [
        redis.node_with(config.clone()).await,
        redis.node_with(config.clone()).await,
        redis.node_with(config).await,
    ];
    for round in 0..CONFLICT_ROUNDS {
        conflicting_round(&redis, &nodes, round).await;
    }
}

/// A desktop client of the conflict test: its socket and its canvas.
struct Editor {
    name: String,
    ws: Ws,
    canvas: Canvas,
    /// The `error` frames it got (none is expected).
    errors: Vec<Value>,
}

impl Editor {
    fn receive(&mut self, msg: &Value) {
        if msg["type"] == "error" {
            self.errors.push(msg.clone());
        }
        self.canvas.apply(msg);
    }

    /// Applies whatever has arrived, without waiting.
    fn receive_arrived(&mut self) {
        while let Some(frame) = self.ws.next().now_or_never() {
            match frame {
                Some(Ok(WsMessage::Text(text))) => {
                    let msg: Value = serde_json::from_str(&text).unwrap();
                    self.receive(&msg);
                }
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => {}
                other => panic!("{}'s socket: {other:?}", self.name),
            }
        }
    }

    /// Applies what arrives until its canvas holds every one of `uuids`.
    async fn await_items(&mut self, uuids: &[String]) {
        while !uuids.iter().all(|u| self.canvas.objects.contains_key(u)) {
            let msg = recv_json(&mut self.ws).await;
            self.receive(&msg);
        }
    }

    /// Sends `ping` and applies everything before the `pong`: its commands were applied (and
    /// stored), and the corrections owed to it have arrived.
    async fn settle(&mut self) {
        for msg in ping_collect(&mut self.ws).await {
            self.receive(&msg);
        }
    }

    /// A local edit: the canvas shows `fields`, and each of `actions` carries the whole dict.
    async fn edit(&mut self, uuid: &str, fields: Value, actions: &[&str]) {
        self.canvas.set(uuid, &fields);
        let mut data = fields;
        data["item_uuid"] = json!(uuid);
        let item_type = data["item_type"].as_str().expect("an item_type").to_owned();
        for action in actions {
            let msg = command(action, &item_type, uuid, data.clone(), &self.name);
            send_json(&mut self.ws, &msg).await;
        }
    }
}

/// Editor `index`'s burst: each step reads what arrived, then drags one of the two items
/// (`move_item` then `update_item`, as every drag step of the app) or renames it, starting
/// from what its canvas shows.
async fn conflicting_desktop_burst(
    mut editor: Editor,
    index: usize,
    uuids: [String; 2],
    steps: usize,
) -> Editor {
    for step in 0..steps {
        editor.receive_arrived();
        let uuid = &uuids[(step + index) % 2];
        let mut fields = editor.canvas.objects[uuid].clone();
        if step % 3 == 2 {
            fields["name"] = json!(format!("{} rename {step}", editor.name));
            editor.edit(uuid, fields, &["update_item"]).await;
        } else {
            let x = (1000 * (index + 1) + step) as f64 + 0.5;
            fields["x_mm"] = json!(x);
            fields["y_mm"] = json!(-x);
            fields["angle_deg"] = json!((step * 15 % 360) as f64);
            editor
                .edit(uuid, fields, &["move_item", "update_item"])
                .await;
        }
        tokio::task::yield_now().await;
    }
    editor
}

/// The Yjs client's burst: each step applies what arrived, then sets `x_mm` and `name` of one
/// of the two items.
async fn conflicting_yjs_burst(mut client: YClient, uuids: [String; 2], steps: usize) -> YClient {
    for step in 0..steps {
        while let Some(frame) = client.ws.next().now_or_never() {
            match frame {
                Some(Ok(WsMessage::Binary(bytes))) => {
                    let decoded = Message::decode_v1(&bytes).expect("a y-websocket frame");
                    if let Message::Sync(
                        SyncMessage::Update(update) | SyncMessage::SyncStep2(update),
                    ) = decoded
                    {
                        client.apply(&update);
                    }
                }
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => {}
                other => panic!("the Yjs client's socket: {other:?}"),
            }
        }
        let uuid = uuids[step % 2].clone();
        let x = -(step as f64) - 0.25;
        client
            .edit_and_send(|txn, items| {
                set_fields(
                    txn,
                    items,
                    &uuid,
                    &[("x_mm", json!(x)), ("name", json!(format!("yjs {step}")))],
                );
            })
            .await;
        tokio::task::yield_now().await;
    }
    client
}

async fn conflicting_round(redis: &Redis, nodes: &[TestServer; 3], round: usize) {
    let session = format!("cluster-conflict-{round}");
    let fixtures = [fixture_item(1), fixture_item(2)];
    let uuids = [fixtures[0].1.clone(), fixtures[1].1.clone()];
    // A watcher on each node: what it has received is what its node applied.
    let mut watchers = Vec::new();
    for node in nodes {
        watchers.push(YClient::join(node, &format!("/yjs/{session}")).await.0);
    }
    // d0 hosts (it uploads its empty canvas) and adds both items; d1 and d2 connect as the
    // app's "Connect to server" does.
    let (ws, _) = nodes[0].settled(&session, "d0").await;
    let mut host = Editor {
        name: "d0".into(),
        ws,
        canvas: Canvas::default(),
        errors: Vec::new(),
    };
    for (item_type, uuid, data) in &fixtures {
        host.edit(uuid, expected_item(data, item_type), &["add_item"])
            .await;
    }
    let mut editors = vec![host];
    for (index, node) in nodes.iter().enumerate().skip(1) {
        let name = format!("d{index}");
        let (ws, _, got) = node.joiner(&session, &name).await;
        let mut editor = Editor {
            name,
            ws,
            canvas: Canvas::default(),
            errors: Vec::new(),
        };
        for msg in &got {
            editor.receive(msg);
        }
        editors.push(editor);
    }
    for editor in &mut editors {
        editor.await_items(&uuids).await;
    }
    // The Yjs client, on a different node each round.
    let (mut yjs, _) = YClient::join(&nodes[round % 3], &format!("/yjs/{session}?user=y")).await;
    while !uuids.iter().all(|u| yjs.item(u).is_some()) {
        if let Message::Sync(SyncMessage::Update(update)) = yjs.recv().await {
            yjs.apply(&update);
        }
    }

    // All at once.
    let steps = 12 + round;
    let desktop_bursts: Vec<_> = editors
        .into_iter()
        .enumerate()
        .map(|(index, editor)| {
            tokio::spawn(conflicting_desktop_burst(
                editor,
                index,
                uuids.clone(),
                steps,
            ))
        })
        .collect();
    let yjs_burst = tokio::spawn(conflicting_yjs_burst(yjs, uuids.clone(), steps));
    let mut editors = Vec::new();
    for burst in desktop_bursts {
        editors.push(burst.await.unwrap());
    }
    let mut yjs = yjs_burst.await.unwrap();

    // Settle. Once each client's barrier is answered, its changes are in Redis; once each
    // watcher holds what Redis holds, its node has applied every update; then each desktop
    // client's ping brings what it is owed, and a second one finds nothing more.
    for editor in &mut editors {
        editor.settle().await;
    }
    yjs.sync().await;
    let stored = redis.stored_doc(&session).await;
    let everything = [stored.transact().state_vector()];
    for watcher in &mut watchers {
        await_covering(watcher, &everything).await;
    }
    await_covering(&mut yjs, &everything).await;
    for editor in &mut editors {
        editor.settle().await;
    }
    for editor in &mut editors {
        assert_eq!(
            ping_collect(&mut editor.ws).await,
            Vec::<Value>::new(),
            "round {round}: {} was sent more after settling",
            editor.name
        );
    }

    // (a) The replicas: Redis, every node's document (a fresh client's SyncStep2), what each
    // watcher was sent.
    let expected = doc_items(&stored);
    assert_eq!(expected.len(), 2, "{expected:#?}");
    for (i, node) in nodes.iter().enumerate() {
        let (fresh, _) = YClient::join(node, &format!("/yjs/{session}")).await;
        assert_eq!(
            doc_items(&fresh.doc),
            expected,
            "round {round}: the document of node {i}"
        );
    }
    for (i, watcher) in watchers.iter().enumerate() {
        assert_eq!(
            doc_items(&watcher.doc),
            expected,
            "round {round}: what node {i} sent its watcher"
        );
    }
    // (c) The Yjs client.
    assert_eq!(
        doc_items(&yjs.doc),
        expected,
        "round {round}: the Yjs client"
    );
    // (b) Every desktop canvas shows the document.
    let shown: std::collections::BTreeMap<String, Value> = expected
        .iter()
        .map(|(uuid, fields)| (uuid.clone(), normalize(fields)))
        .collect();
    for editor in &editors {
        assert_eq!(
            editor.errors,
            Vec::<Value>::new(),
            "round {round}: {} was refused",
            editor.name
        );
        editor
            .canvas
            .assert_shows(&shown, &format!("round {round}: {}", editor.name));
    }
}
