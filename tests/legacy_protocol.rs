//! The Optiverse JSON protocol over the wire (PROTOCOL §1, §3, §4, §7): what a socket adds
//! to the session's rules, which `core/tests` check without one (joins, acks, user events,
//! commands, uploads, corrections, replacement, bad input, `?yjs=1`): sessions kept apart,
//! a closed socket leaving its session, the replaced socket's close frame, errors answered by
//! the connection, paths, close codes, binary frames on `?yjs=1`, and the HTTP API that shows
//! the scene the clients built.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use optiverse_collab::store::memory::MemoryStore;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use yrs::sync::{Message as YMessage, SyncMessage};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Sends `add_item` for fixture item `i` and returns (item_type, uuid, data).
async fn add_fixture(ws: &mut Ws, user: &str, i: usize) -> (String, String, Value) {
    let (item_type, uuid, data) = fixture_item(i);
    send_json(
        ws,
        &command("add_item", &item_type, &uuid, data.clone(), user),
    )
    .await;
    (item_type, uuid, data)
}

/// `GET path` as JSON, asserting 200.
async fn get_json(server: &TestServer, path: &str) -> Value {
    let (status, body) = server.get(path).await;
    assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{path} is JSON: {e}"))
}

/// The scene's items keyed by uuid, and its version.
async fn scene_snapshot(server: &TestServer, session: &str) -> (BTreeMap<String, Value>, Value) {
    let state = server.scene(session).await;
    (scene_by_uuid(&state), state["version"].clone())
}

/// Like `ping_collect`, for a connection that also gets binary frames: the JSON messages and
/// the binary frames that arrived before the `pong`.
async fn ping_collect_frames(ws: &mut Ws) -> (Vec<Value>, Vec<Vec<u8>>) {
    send_json(ws, &json!({"type": "ping"})).await;
    let (mut texts, mut binaries) = (Vec::new(), Vec::new());
    loop {
        match recv(ws).await {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(&t).expect("text frames are JSON");
                if v["type"] == "pong" {
                    return (texts, binaries);
                }
                texts.push(v);
            }
            Message::Binary(b) => binaries.push(b.to_vec()),
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

/// Reads raw frames (protocol pings included) until the close frame; returns the close code
/// and how many protocol pings arrived before it.
async fn close_code_counting_pings(ws: &mut Ws) -> (u16, usize) {
    let mut pings = 0;
    loop {
        let msg = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("close in time");
        match msg {
            Some(Ok(Message::Close(Some(frame)))) => return (u16::from(frame.code), pings),
            Some(Ok(Message::Close(None))) => return (1005, pings),
            Some(Ok(Message::Ping(_))) => pings += 1,
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("connection failed without a close frame: {e}"),
            None => panic!("connection ended without a close frame"),
        }
    }
}

/// The close code, after which the client reads on until the connection ends (which sends
/// its answer to the close frame).
async fn close_code_then_end(ws: &mut Ws) -> u16 {
    let code = close_code(ws).await;
    tokio::time::timeout(PATIENCE, async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await
    .expect("the connection ends after the close handshake");
    code
}

/// A y-websocket `Sync(Update)` frame.
fn yjs_update_frame(update: Vec<u8>) -> Message {
    Message::binary(YMessage::Sync(SyncMessage::Update(update)).encode_v1())
}

// ---------------------------------------------------------------------------------------------
// Sessions and connections
// ---------------------------------------------------------------------------------------------

/// The shell tells the session when a socket ends: the others hear `user:left` (the rule
/// itself: `core/tests/session_membership.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_connection_is_announced_with_user_left() {
    let server = TestServer::start().await;
    let (mut a, _) = server.legacy("hb", "a").await;
    let (mut b, _) = server.legacy("hb", "b").await;
    assert_eq!(
        only(&ping_collect(&mut a).await)["type"],
        "user:joined",
        "a heard b join"
    );
    b.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    }))
    .await
    .expect("b closes");
    let left = recv_json(&mut a).await;
    assert_eq!(left["type"], "user:left", "{left}");
    assert_eq!(left["user_id"], "b");
    assert_timestamp(&left["timestamp"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_isolated() {
    let server = TestServer::start().await;
    let (mut a, _) = server.legacy("room-a", "ann").await;
    let (mut a2, _) = server.legacy("room-a", "art").await;
    let (mut b, _) = server.legacy("room-b", "ben").await;
    ping_collect(&mut a).await;

    let (_, uuid, _) = add_fixture(&mut a, "ann", 7).await;
    ping_collect(&mut a).await;
    let in_a = ping_collect_folded(&mut a2).await;
    assert_eq!(only(&in_a)["command"]["item_id"], json!(uuid), "control");

    assert!(
        ping_collect(&mut b).await.is_empty(),
        "session B hears nothing"
    );
    let state_b = server.scene("room-b").await;
    assert_eq!(state_b["items"], json!([]), "B's scene stays empty");
    assert_eq!(scene_by_uuid(&server.scene("room-a").await).len(), 1);

    send_json(&mut b, &json!({"type": "sync:request"})).await;
    assert!(
        ping_collect(&mut b).await.is_empty(),
        "B is not initialized"
    );
}

/// The replaced socket gets its close frame (4000) and nothing after it; its task's end
/// tells the session nothing the others hear (the rule: `core/tests/session_membership.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_connection_is_closed_4000_and_nobody_hears_of_it() {
    let server = TestServer::start().await;
    let (mut old, _) = server.legacy("dup", "dana").await;
    let (mut watcher, _) = server.legacy("dup", "walt").await;
    ping_collect(&mut old).await;
    assert!(ping_collect(&mut watcher).await.is_empty());

    let (mut new, ack) = server.legacy("dup", "dana").await;
    assert_eq!(ack["user_id"], "dana");
    let closed = loop {
        let msg = tokio::time::timeout(PATIENCE, old.next())
            .await
            .expect("close in time");
        match msg {
            Some(Ok(Message::Close(Some(frame)))) => break frame,
            Some(Ok(Message::Text(t))) => panic!("old connection got {t} after replacement"),
            Some(Ok(_)) => continue,
            other => panic!("no close frame: {other:?}"),
        }
    };
    assert_eq!(u16::from(closed.code), 4000);
    assert_eq!(closed.reason.as_str(), "Replaced by a newer connection");
    // Its connection has ended and told the session it left before the count drops.
    tokio::time::timeout(PATIENCE, async {
        while let Some(Ok(_)) = old.next().await {}
    })
    .await
    .expect("the old connection ends");
    // A connection's task tells its session that it left before it stops counting: once
    // the count drops, the session has handled the leave.
    await_health(server.addr, "connections", 2).await;
    let to_watcher = ping_collect(&mut watcher).await;
    assert!(
        to_watcher.is_empty(),
        "no user:left / user:joined for a swap: {to_watcher:?}"
    );
    assert!(ping_collect(&mut new).await.is_empty());
}

// ---------------------------------------------------------------------------------------------
// §3.6 Bad input
// ---------------------------------------------------------------------------------------------

/// The connection answers what it cannot parse with an `error` and keeps going; nothing
/// reaches the session (every case of bad input: `core/tests/bad_input.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_answered_by_its_connection_and_changes_nothing() {
    let server = TestServer::start().await;
    let (mut a, _) = server.legacy("bad", "a").await;
    let (mut b, _) = server.legacy("bad", "b").await;
    ping_collect(&mut a).await;
    let (t, uuid, data) = add_fixture(&mut a, "a", 13).await;
    ping_collect(&mut a).await;
    ping_collect(&mut b).await;
    let before = scene_snapshot(&server, "bad").await;

    let bad_move = json!({"type": "command", "user_id": "a",
        "command": {"action": "teleport_item", "item_type": t, "item_id": uuid, "data": {}}});
    let cases = [
        (Message::text("{\"type\": \"command\", "), "bad_json"),
        (
            Message::text(json!({"type": "scene:explode"}).to_string()),
            "unknown_type",
        ),
        (Message::text(bad_move.to_string()), "bad_message"),
        // A binary frame on a JSON connection.
        (Message::binary(vec![0u8, 2, 1, 0]), "bad_message"),
    ];
    for (frame, code) in cases {
        a.send(frame).await.expect("sent while open");
        let replies = ping_collect(&mut a).await;
        assert_error(only(&replies), code);
    }
    assert!(
        ping_collect(&mut b).await.is_empty(),
        "nobody else hears of bad input"
    );
    assert_eq!(
        scene_snapshot(&server, "bad").await,
        before,
        "the document is untouched"
    );

    // The connection is still fully usable.
    let mut moved = data.clone();
    moved["x_mm"] = json!(5.0);
    send_json(&mut a, &command("move_item", &t, &uuid, moved, "a")).await;
    ping_collect(&mut a).await;
    let to_b = ping_collect(&mut b).await;
    assert_eq!(only(&to_b)["command"]["data"]["x_mm"], json!(5.0));
}

// ---------------------------------------------------------------------------------------------
// §1 Paths
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_paths_upgrade_then_close_1008() {
    let server = TestServer::start().await;
    let long = "x".repeat(129);
    let paths = vec![
        "/ws".to_owned(),
        "/ws/".to_owned(),
        "/ws/onlysession".to_owned(),
        "/ws/s/".to_owned(),
        "/ws//u".to_owned(),
        "/ws/s/u/extra".to_owned(),
        "/ws/s/a%0Ab".to_owned(),
        "/ws/s%0A/u".to_owned(),
        "/ws/s/%7F".to_owned(),
        "/ws/s/%FF".to_owned(),
        format!("/ws/{long}/u"),
        format!("/ws/s/{long}"),
        format!("/ws/s/{}", "%C3%BC".repeat(129)),
    ];
    for path in &paths {
        let mut ws = server.connect(path).await;
        let frame = loop {
            match tokio::time::timeout(PATIENCE, ws.next())
                .await
                .expect("close in time")
            {
                Some(Ok(Message::Close(Some(frame)))) => break frame,
                Some(Ok(Message::Text(t))) => panic!("{path}: got {t} instead of a close"),
                Some(Ok(_)) => continue,
                other => panic!("{path}: no close frame: {other:?}"),
            }
        };
        assert_eq!(u16::from(frame.code), 1008, "{path}");
        assert_eq!(frame.reason.as_str(), "Invalid path", "{path}");
    }
    let health = health(server.addr).await;
    assert_eq!(health["sessions"], 0, "no session was created: {health}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_segments_are_percent_decoded() {
    let server = TestServer::start().await;
    let mut ws = server.connect("/ws/lab%201/J%C3%BCrgen").await;
    let ack = recv_ack(&mut ws, "Jürgen").await;
    assert_eq!(ack["session_id"], "lab 1");
    assert_eq!(ack["user_id"], "Jürgen");
    assert_eq!(ack["users"][0]["user_id"], "Jürgen");

    // Same session under its decoded name, from a second client.
    let (mut other, ack) = server.legacy("lab%201", "Zo%C3%AB").await;
    assert_eq!(ack["session_id"], "lab 1");
    assert_eq!(ack["user_id"], "Zoë");
    let joined = recv_json(&mut ws).await;
    assert_eq!(joined["type"], "user:joined");
    assert_eq!(joined["user_id"], "Zoë");
    let (t, u, d) = add_fixture(&mut other, "Zoë", 5).await;
    assert!(ping_collect(&mut other).await.is_empty());
    let relayed = ping_collect_folded(&mut ws).await;
    assert_eq!(only(&relayed)["command"]["item_id"], json!(u));
    let (scene, _) = scene_snapshot(&server, "lab%201").await;
    assert_eq!(scene[&u], expected_item(&d, &t));

    // The longest valid names: 128 characters (not bytes).
    let name = "ü".repeat(128);
    let encoded = "%C3%BC".repeat(128);
    let (_, ack) = server.legacy(&encoded, &encoded).await;
    assert_eq!(ack["session_id"], json!(name));
    assert_eq!(ack["user_id"], json!(name));
}

// ---------------------------------------------------------------------------------------------
// §7 Close codes
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_message_closes_1009() {
    let mut config = test_config();
    config.max_message_bytes = 4096;
    let server = TestServer::start_with(config, Arc::new(MemoryStore::new())).await;
    let (mut ws, _) = server.legacy("big", "a").await;
    let (mut other, _) = server.legacy("big", "b").await;
    ping_collect(&mut ws).await;

    // Under the bound is fine.
    send_json(&mut ws, &json!({"type": "ping", "pad": "p".repeat(3000)})).await;
    let pong = recv_json(&mut ws).await;
    assert_eq!(pong["type"], "pong");

    let (t, u, mut data) = fixture_item(1);
    data["notes"] = json!("n".repeat(8192));
    send_json(&mut ws, &command("add_item", &t, &u, data, "a")).await;
    assert_eq!(close_code(&mut ws).await, 1009);

    // Nothing of the oversized frame was applied; the session lives on.
    let msgs = ping_collect(&mut other).await;
    assert!(
        msgs.iter().all(|m| m["type"] != "command"),
        "nothing relayed: {msgs:?}"
    );
    assert_eq!(server.scene("big").await["items"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_closes_1013_and_session_lives_on() {
    let mut config = test_config();
    config.max_queue_bytes = 64 * 1024;
    let server = TestServer::start_with(config, Arc::new(MemoryStore::new())).await;
    let (mut flooder, _) = server.legacy("flood", "flooder").await;
    let (mut slow, _) = server.legacy("flood", "slow").await;
    ping_collect(&mut flooder).await;
    let (t, uuid, mut data) = add_fixture(&mut flooder, "flooder", 1).await;
    ping_collect(&mut flooder).await;

    // The slow client reads nothing while the flooder edits a large field over and over.
    // Rounds stay well under the queue bound, so only a client that does not read can pass it.
    let big = "lorem ipsum ".repeat(340); // ~4 KiB
    let mut round = 0;
    loop {
        for k in 0..8 {
            data["notes"] = json!(format!("{round}/{k} {big}"));
            send_json(
                &mut flooder,
                &command("update_item", &t, &uuid, data.clone(), "flooder"),
            )
            .await;
        }
        let msgs = ping_collect(&mut flooder).await;
        if msgs
            .iter()
            .any(|m| m["type"] == "user:left" && m["user_id"] == "slow")
        {
            break;
        }
        round += 1;
        assert!(
            round < 10_000,
            "the slow client was never dropped (~{} MiB sent to it)",
            round * 32 / 1024
        );
    }
    assert_eq!(
        close_code(&mut slow).await,
        1013,
        "the slow consumer is closed with 1013"
    );

    // The session lives on.
    let msgs = ping_collect(&mut flooder).await;
    assert!(
        msgs.iter().all(|m| m["type"] == "command"),
        "the flooder is still served: {msgs:?}"
    );
    let (_fresh, _, got) = server.joiner("flood", "slow").await;
    let got = fold_fixes(&got);
    let full = only(&got);
    assert_eq!(full["type"], "sync:full_state");
    assert_eq!(
        scene_by_uuid(&full["state"])[&uuid],
        expected_item(&data, &t),
        "the reconnecting client resyncs to the last edit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connection_closes_1001_without_protocol_pings() {
    let mut config = test_config();
    config.idle_timeout = Duration::from_millis(300);
    let server = TestServer::start_with(config, Arc::new(MemoryStore::new())).await;
    let mut ws = server.connect("/ws/idle/sleepy").await;
    recv_ack(&mut ws, "sleepy").await;
    let (code, pings) = close_code_counting_pings(&mut ws).await;
    assert_eq!(code, 1001, "idle timeout");
    assert_eq!(pings, 0, "no WebSocket protocol pings on /ws");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_sockets_1001() {
    let mut server = TestServer::start().await;
    let (mut a, _) = server.legacy("bye", "a").await;
    let mut y = server.connect("/ws/bye/y?yjs=1").await;
    let ack = recv_json(&mut y).await;
    assert_eq!(ack["type"], "connection:ack");
    let addr = server.addr;
    // Each client answers the close (by reading on) so shutdown need not wait for it.
    let ((), code_a, code_y) = tokio::join!(
        server.shutdown(),
        close_code_then_end(&mut a),
        close_code_then_end(&mut y)
    );
    assert_eq!(code_a, 1001);
    assert_eq!(code_y, 1001);
    assert!(
        tokio_tungstenite::connect_async(format!("ws://{addr}/ws/bye/late"))
            .await
            .is_err(),
        "a stopped server accepts nothing"
    );
}

// ---------------------------------------------------------------------------------------------
// §4 Yjs on /ws (?yjs=1)
// ---------------------------------------------------------------------------------------------

/// One socket carries both: JSON text frames (the ack, errors) and y-websocket binary frames
/// (the document). What the session sends it: `core/tests/session_yjs.rs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn yjs_opt_in_on_ws_carries_json_and_binary_frames() {
    let server = TestServer::start().await;
    let (mut json_client, _) = server.legacy("hybrid", "jay").await;
    let (t1, u1, d1) = add_fixture(&mut json_client, "jay", 1).await;
    ping_collect(&mut json_client).await;

    let mut y = server.connect("/ws/hybrid/yuki?yjs=1").await;
    let ack = recv_json(&mut y).await;
    assert_eq!(ack["type"], "connection:ack");
    assert!(
        ack["snapshot"].is_string() && ack["state_vector"].is_string(),
        "{ack}"
    );
    // The first binary frame is the server's SyncStep1.
    let first = match recv(&mut y).await {
        Message::Binary(b) => b.to_vec(),
        other => panic!("expected SyncStep1 right after the ack, got {other:?}"),
    };
    assert!(
        matches!(
            YMessage::decode_v1(&first),
            Ok(YMessage::Sync(SyncMessage::SyncStep1(_)))
        ),
        "{first:?}"
    );
    let doc = doc_from(
        &base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            ack["snapshot"].as_str().unwrap(),
        )
        .expect("standard base64"),
    );
    let joined = ping_collect(&mut json_client).await;
    assert_eq!(only(&joined)["type"], "user:joined");

    // A JSON client's change arrives as binary frames only.
    add_fixture(&mut json_client, "jay", 2).await;
    ping_collect(&mut json_client).await;
    let (texts, binaries) = ping_collect_frames(&mut y).await;
    assert!(texts.is_empty(), "no command JSON on ?yjs=1: {texts:?}");
    assert!(!binaries.is_empty(), "the add arrives as Yjs");

    // A binary update from it reaches the JSON client as a command.
    let update = edit(&doc, |txn, items| {
        set_fields(txn, items, &u1, &[("x_mm", json!(77.5))])
    });
    y.send(yjs_update_frame(update)).await.expect("sent");
    let (texts, _) = ping_collect_frames(&mut y).await;
    assert!(texts.is_empty(), "no echo, no error: {texts:?}");
    let to_json = ping_collect(&mut json_client).await;
    let msg = only(&to_json);
    assert_eq!(msg["command"]["action"], "update_item");
    assert_eq!(msg["user_id"], "yuki");
    let mut expected = expected_item(&d1, &t1);
    expected["x_mm"] = json!(77.5);
    assert_eq!(normalize(&msg["command"]["data"]), expected);

    // A malformed binary frame is answered with a JSON error; nothing changes.
    let before = scene_snapshot(&server, "hybrid").await;
    y.send(Message::binary(vec![0u8, 2, 4, 0xff, 0xff, 0xff, 0x0f]))
        .await
        .expect("sent");
    let (texts, binaries) = ping_collect_frames(&mut y).await;
    assert_error(only(&texts), "bad_message");
    assert!(binaries.is_empty());
    assert!(ping_collect(&mut json_client).await.is_empty());
    assert_eq!(scene_snapshot(&server, "hybrid").await, before);
}

// ---------------------------------------------------------------------------------------------
// §1 HTTP API
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_api_shows_what_clients_built() {
    let server = TestServer::start().await;
    let (mut a, _) = server.legacy("api-room", "a").await;
    let (mut b, _) = server.legacy("api-room", "b").await;
    ping_collect(&mut a).await;
    let (ta, ua, mut da) = add_fixture(&mut a, "a", 6).await;
    let (tb, ub, db) = add_fixture(&mut b, "b", 7).await;
    let (tc, uc, _) = add_fixture(&mut a, "a", 8).await;
    ping_collect(&mut a).await;
    ping_collect(&mut b).await;
    da["x_mm"] = json!(12.0);
    send_json(&mut b, &command("move_item", &ta, &ua, da.clone(), "b")).await;
    send_json(&mut a, &command("remove_item", &tc, &uc, json!({}), "a")).await;
    ping_collect(&mut a).await;
    ping_collect(&mut b).await;

    let health = health(server.addr).await;
    assert_eq!(health["status"], "ok");
    assert_eq!(health["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(health["sessions"], 1);
    assert_eq!(health["connections"], 2);

    let list = get_json(&server, "/api/sessions").await;
    let list = list.as_array().expect("a list");
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["id"], "api-room");
    assert_eq!(list[0]["users"], json!(["a", "b"]));
    assert_eq!(list[0]["item_count"], 2);
    assert!(list[0]["document_bytes"].as_u64().is_some_and(|n| n > 0));

    let mut expected_a = expected_item(&da, &ta);
    expected_a["x_mm"] = json!(12.0);
    let expected: BTreeMap<String, Value> = [
        (ua.clone(), expected_a),
        (ub.clone(), expected_item(&db, &tb)),
    ]
    .into_iter()
    .collect();
    let state = server.scene("api-room").await;
    assert!(state["version"].is_u64());
    assert_timestamp(&state["timestamp"]);
    assert_eq!(scene_by_uuid(&state), expected);

    // The same as a joiner's full state.
    let (_c, _, got) = server.joiner("api-room", "c").await;
    let got = fold_fixes(&got);
    let full = only(&got);
    assert_eq!(full["type"], "sync:full_state");
    assert_eq!(scene_by_uuid(&full["state"]), expected);
    assert_eq!(full["state"]["items"], state["items"]);

    // The document as one Yjs update holds the same items.
    let (status, body) = server.get("/api/sessions/api-room/update").await;
    assert_eq!(status, 200);
    let doc = doc_from(&body);
    let mut doc_a = with_type(&da, &ta);
    doc_a["x_mm"] = json!(12.0);
    assert_same(&doc_item(&doc, &ua).expect("a's item"), &doc_a, "a's item");
    assert_same(
        &doc_item(&doc, &ub).expect("b's item"),
        &with_type(&db, &tb),
        "b's item",
    );
    assert_eq!(doc_item(&doc, &uc), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_update_reaches_legacy_clients_as_commands() {
    let server = TestServer::start().await;
    let (mut a, _) = server.legacy("api-post", "a").await;
    let (t, u, d) = add_fixture(&mut a, "a", 9).await;
    ping_collect(&mut a).await;

    let (status, body) = server.get("/api/sessions/api-post/update").await;
    assert_eq!(status, 200);
    let update = edit(&doc_from(&body), |txn, items| {
        set_fields(txn, items, &u, &[("y_mm", json!(3.25))])
    });
    let (status, body) = server.post("/api/sessions/api-post/update", &update).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let to_a = ping_collect(&mut a).await;
    let msg = only(&to_a);
    assert_eq!(msg["command"]["action"], "update_item");
    let mut expected = expected_item(&d, &t);
    expected["y_mm"] = json!(3.25);
    assert_eq!(normalize(&msg["command"]["data"]), expected);

    let (status, _) = server
        .post("/api/sessions/api-post/update", &[0xff, 0xff, 0xff, 0x0f])
        .await;
    assert_eq!(status, 400, "a malformed update is refused");
    assert!(ping_collect(&mut a).await.is_empty());
    assert_eq!(scene_snapshot(&server, "api-post").await.0[&u], expected);
}
