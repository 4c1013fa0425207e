//! The Optiverse JSON protocol as a legacy desktop client observes it (PROTOCOL §1, §3, §4,
//! §7): joining, heartbeat, relaying commands, host uploads, bad input, paths, close codes,
//! the `?yjs=1` opt-in, and the HTTP API that shows the scene the clients built.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use common::*;
use futures_util::{SinkExt, StreamExt};
use optiverse_collab::store::memory::MemoryStore;
use serde_json::{json, Map, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use yrs::sync::{Message as YMessage, SyncMessage};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{Any, Doc, Map as _, Out, ReadTxn, StateVector, Transact, Update};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Asserts `t` is an RFC 3339 UTC timestamp with milliseconds: `2026-11-25T19:22:01.123Z`.
fn assert_timestamp(t: &Value) {
    let s = t
        .as_str()
        .unwrap_or_else(|| panic!("timestamp is a string: {t}"));
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| r.into_iter().all(|i| b[i].is_ascii_digit());
    let ok = b.len() == 24
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && b[19] == b'.'
        && digits(20..23)
        && b[23] == b'Z';
    assert!(ok, "not an RFC 3339 UTC timestamp with milliseconds: {s:?}");
}

/// An item added with `data` as a full state or the HTTP scene shows it, `normalize`d (no
/// `uuid`/`item_uuid`): every field of `data` plus `item_type`.
fn expected_item(data: &Value, item_type: &str) -> Value {
    let mut item = normalize(data);
    item["item_type"] = json!(item_type);
    item
}

/// What the Yjs document holds for an item added with `data`: every field of `data` (its
/// `item_uuid` included) plus `item_type`.
fn expected_doc_item(data: &Value, item_type: &str) -> Value {
    let mut item = data.clone();
    item["item_type"] = json!(item_type);
    item
}

/// Asserts that what the sender of a command got back is nothing but corrections
/// (PROTOCOL §3.3 "Convergence"): `update_item`s of `uuid` carrying its authoritative state.
fn assert_corrections_only(msgs: &[Value], uuid: &str, authoritative: &Value) {
    for msg in msgs {
        assert_eq!(msg["type"], "command", "{msg}");
        assert_eq!(
            msg["command"]["action"], "update_item",
            "only corrections: {msg}"
        );
        assert_eq!(msg["command"]["item_id"], uuid, "{msg}");
        assert_eq!(normalize(&msg["command"]["data"]), *authoritative, "{msg}");
    }
}

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

/// Waits until `/health` reports `n` open connections. A connection's task tells its session
/// that it left *before* it stops counting, so after this a message to the session is
/// handled after every such leave.
async fn wait_for_connections(server: &TestServer, n: u64) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let health = get_json(server, "/health").await;
        if health["connections"] == json!(n) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "connections never dropped to {n}: {health}"
        );
        tokio::task::yield_now().await;
    }
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

/// Asserts the message is `{"type":"error","code":code,"message":...}`.
fn assert_error(msg: &Value, code: &str) {
    assert_eq!(msg["type"], "error", "{msg}");
    assert_eq!(msg["code"], code, "{msg}");
    assert!(
        msg["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error carries a message: {msg}"
    );
}

/// A Yjs `Any` as JSON (integers stay integers, floats stay floats).
fn any_json(any: &Any) -> Value {
    match any {
        Any::Null | Any::Undefined => Value::Null,
        Any::Bool(b) => json!(b),
        Any::Number(yrs::any::Number::Int(i)) => json!(i),
        Any::Number(yrs::any::Number::Float(f)) => json!(f),
        Any::String(s) => json!(s.as_ref()),
        Any::Buffer(b) => json!(b.as_ref()),
        Any::Array(items) => Value::Array(items.iter().map(any_json).collect()),
        Any::Map(map) => Value::Object(map.iter().map(|(k, v)| (k.clone(), any_json(v))).collect()),
    }
}

/// An item of a yrs document's `items` map as JSON fields.
fn doc_item(doc: &Doc, uuid: &str) -> Option<Value> {
    let items = doc.get_or_insert_map("items");
    let txn = doc.transact();
    match items.get(&txn, uuid)? {
        Out::YMap(item) => Some(Value::Object(
            item.iter(&txn)
                .map(|(k, v)| match v {
                    Out::Any(any) => (k.to_owned(), any_json(&any)),
                    other => panic!("field {k} is not a plain value: {other:?}"),
                })
                .collect::<Map<String, Value>>(),
        )),
        _ => None,
    }
}

/// Applies a v1 update to a yrs document.
fn apply(doc: &Doc, update: &[u8]) {
    let update = Update::decode_v1(update).expect("a v1 update");
    doc.transact_mut().apply_update(update).expect("applies");
}

/// Writes `field = value` into an item of `doc` and returns the v1 update of that change.
fn set_field(doc: &Doc, uuid: &str, field: &str, value: impl Into<Any>) -> Vec<u8> {
    let items = doc.get_or_insert_map("items");
    let before = doc.transact().state_vector();
    {
        let mut txn = doc.transact_mut();
        let Some(Out::YMap(item)) = items.get(&txn, uuid) else {
            panic!("{uuid} is an item map in the document");
        };
        item.insert(&mut txn, field.to_owned(), value.into());
    }
    let update = doc.transact().encode_state_as_update_v1(&before);
    update
}

/// A y-websocket `Sync(Update)` frame.
fn yjs_update_frame(update: Vec<u8>) -> Vec<u8> {
    YMessage::Sync(SyncMessage::Update(update)).encode_v1()
}

// ---------------------------------------------------------------------------------------------
// §3.1 Joining
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_shape_host_flag_and_join_order() {
    let server = TestServer::start().await;

    let (mut alice, ack_a) = server.legacy("bench", "alice").await;
    assert_eq!(ack_a["type"], "connection:ack");
    assert_eq!(ack_a["session_id"], "bench");
    assert_eq!(ack_a["user_id"], "alice");
    assert_eq!(
        ack_a["is_host"], true,
        "first user of an empty session hosts"
    );
    assert_eq!(ack_a["protocol"], "optiverse-collab/1");
    assert_timestamp(&ack_a["timestamp"]);
    let users = ack_a["users"].as_array().expect("users is a list");
    assert_eq!(users.len(), 1, "{ack_a}");
    assert_eq!(users[0]["user_id"], "alice");
    assert_timestamp(&users[0]["connected_at"]);

    let (mut bob, ack_b) = server.legacy("bench", "bob").await;
    assert_eq!(ack_b["session_id"], "bench");
    assert_eq!(ack_b["user_id"], "bob");
    assert_eq!(ack_b["is_host"], false, "second user is not the host");
    assert_eq!(ack_b["protocol"], "optiverse-collab/1");
    assert_timestamp(&ack_b["timestamp"]);
    let users = ack_b["users"].as_array().expect("users is a list");
    let names: Vec<&Value> = users.iter().map(|u| &u["user_id"]).collect();
    assert_eq!(names, [&json!("alice"), &json!("bob")], "join order");
    assert_eq!(
        users[0]["connected_at"], ack_a["users"][0]["connected_at"],
        "alice's connected_at is stable"
    );
    users
        .iter()
        .for_each(|u| assert_timestamp(&u["connected_at"]));

    // Scene not initialized: bob got no full state; alice heard that bob joined.
    assert!(
        ping_collect(&mut bob).await.is_empty(),
        "no full state into an uninitialized scene"
    );
    let to_alice = ping_collect(&mut alice).await;
    let joined = only(&to_alice);
    assert_eq!(joined["type"], "user:joined");
    assert_eq!(joined["user_id"], "bob");
    assert_timestamp(&joined["timestamp"]);

    // A sync:request into the uninitialized scene is answered with nothing yet (an empty
    // full state would wipe a host's canvas)...
    send_json(&mut bob, &json!({"type": "sync:request", "user_id": "bob"})).await;
    assert!(ping_collect(&mut bob).await.is_empty());

    // ...but with the full state as soon as the scene is initialized (by alice's first add);
    // alice's second add then reaches bob as a command.
    let (t1, u1, d1) = add_fixture(&mut alice, "alice", 1).await;
    let (t0, u0, d0) = add_fixture(&mut alice, "alice", 0).await;
    assert!(ping_collect(&mut alice).await.is_empty(), "no echo");
    let to_bob = ping_collect_folded(&mut bob).await;
    assert_eq!(to_bob.len(), 2, "{to_bob:#?}");
    assert_eq!(to_bob[0]["type"], "sync:full_state", "{to_bob:#?}");
    let first_scene = scene_by_uuid(&to_bob[0]["state"]);
    assert_eq!(
        first_scene.keys().collect::<Vec<_>>(),
        [&u1],
        "the scene as it was initialized"
    );
    assert_eq!(first_scene[&u1], expected_item(&d1, &t1));
    assert_eq!(to_bob[1]["command"]["action"], "add_item", "{to_bob:#?}");
    assert_eq!(to_bob[1]["command"]["item_id"], json!(u0));

    // A later joiner gets `user:joined` naming itself, then the ack, and nothing more until
    // it asks (as both desktop clients do right after the ack).
    let mut carol = server.connect("/ws/bench/carol").await;
    let self_joined = recv_json(&mut carol).await;
    assert_eq!(self_joined["type"], "user:joined", "{self_joined}");
    assert_eq!(self_joined["user_id"], "carol");
    assert_timestamp(&self_joined["timestamp"]);
    let ack_c = recv_json(&mut carol).await;
    assert_eq!(ack_c["type"], "connection:ack", "the ack comes next");
    assert_eq!(ack_c["is_host"], false);
    let names: Vec<&Value> = ack_c["users"]
        .as_array()
        .expect("users")
        .iter()
        .map(|u| &u["user_id"])
        .collect();
    assert_eq!(
        names,
        [&json!("alice"), &json!("bob"), &json!("carol")],
        "join order, joiner included"
    );
    assert!(
        ping_collect(&mut carol).await.is_empty(),
        "no full state is pushed at join"
    );
    send_json(
        &mut carol,
        &json!({"type": "sync:request", "user_id": "carol"}),
    )
    .await;
    let got = ping_collect(&mut carol).await;
    assert_eq!(
        got.len(),
        3,
        "the full state, then one update_item per placeholder item: {got:#?}"
    );
    let folded = fold_fixes(&got);
    let full = only(&folded).clone();
    assert_eq!(full["type"], "sync:full_state", "{full}");
    assert_eq!(full["from_server"], true);
    assert!(full["state"]["version"].is_u64(), "{full}");
    assert_timestamp(&full["state"]["timestamp"]);
    let items = full["state"]["items"].as_array().expect("items");
    assert_eq!(items.len(), 2);
    for item in items {
        assert_eq!(item["uuid"], item["item_uuid"], "{item}");
    }
    let by_uuid = scene_by_uuid(&full["state"]);
    assert_eq!(by_uuid[&u0], expected_item(&d0, &t0));
    assert_eq!(by_uuid[&u1], expected_item(&d1, &t1));
    assert_eq!(by_uuid[&u1]["item_type"], "component");
    assert_eq!(by_uuid[&u0]["item_type"], "source");
    // A second request on the same connection is not answered again.
    send_json(
        &mut carol,
        &json!({"type": "sync:request", "user_id": "carol"}),
    )
    .await;
    assert!(ping_collect(&mut carol).await.is_empty());

    for (ws, name) in [(&mut alice, "alice"), (&mut bob, "bob")] {
        let msgs = ping_collect(ws).await;
        let joined = msgs
            .iter()
            .find(|m| m["type"] == "user:joined")
            .unwrap_or_else(|| panic!("{name} hears of carol: {msgs:?}"));
        assert_eq!(joined["user_id"], "carol");
        assert!(
            msgs.iter().all(|m| m["type"] != "sync:full_state"),
            "{name} gets no full state when someone joins: {msgs:?}"
        );
    }

    // The version grows with every change of the scene.
    send_json(
        &mut alice,
        &command("remove_item", &t0, &u0, json!({}), "alice"),
    )
    .await;
    assert!(
        ping_collect(&mut alice).await.is_empty(),
        "no echo of a removal"
    );
    let removed = ping_collect(&mut carol).await;
    assert_eq!(only(&removed)["command"]["action"], "remove_item");
    let (_dave, _, got) = server.joiner("bench", "dave").await;
    let got = fold_fixes(&got);
    let again = only(&got);
    assert_eq!(again["type"], "sync:full_state");
    assert_eq!(scene_by_uuid(&again["state"]).len(), 1);
    assert!(
        again["state"]["version"].as_u64() > full["state"]["version"].as_u64(),
        "version grows: {} then {}",
        full["state"]["version"],
        again["state"]["version"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_pong_and_user_left() {
    let server = TestServer::start().await;
    let (mut a, _) = server.legacy("hb", "a").await;
    let (mut b, _) = server.legacy("hb", "b").await;
    send_json(&mut a, &json!({"type": "ping", "user_id": "a"})).await;
    let pong = loop {
        let msg = recv_json(&mut a).await;
        if msg["type"] == "pong" {
            break msg;
        }
        assert_eq!(msg["type"], "user:joined", "{msg}");
    };
    assert_timestamp(&pong["timestamp"]);
    assert!(
        ping_collect(&mut b).await.is_empty(),
        "b gets no pong of a's"
    );

    b.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    }))
    .await
    .expect("b closes");
    // The server answers the Close frame (RFC 6455 §5.5.1): the handshake completes.
    let answer = tokio::time::timeout(PATIENCE, async {
        loop {
            match b.next().await {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => continue,
                other => panic!("the connection ended without a Close answer: {other:?}"),
            }
        }
    })
    .await
    .expect("the Close frame is answered");
    assert_eq!(
        answer.map(|f| u16::from(f.code)),
        Some(1000),
        "normal close"
    );
    let left = recv_json(&mut a).await;
    assert_eq!(left["type"], "user:left", "{left}");
    assert_eq!(left["user_id"], "b");
    assert_timestamp(&left["timestamp"]);
}

/// `sync:request` (PROTOCOL §3.4, README "Choices"): answered with the full state once per
/// connection; into an uninitialized scene, as soon as the scene is initialized, and until
/// then the connection gets no commands (its full state will carry them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_request_is_answered_once_as_soon_as_the_scene_is_initialized() {
    let server = TestServer::start().await;
    let (mut host, ack) = server.legacy("req", "host").await;
    assert_eq!(ack["is_host"], true);
    let (mut guest, _) = server.legacy("req", "guest").await;
    // A connection that never asks gets commands as they come.
    let (mut silent, _) = server.legacy("req", "silent").await;
    ping_collect(&mut host).await;
    ping_collect(&mut guest).await;

    send_json(
        &mut guest,
        &json!({"type": "sync:request", "user_id": "guest"}),
    )
    .await;
    assert!(
        ping_collect(&mut guest).await.is_empty(),
        "an empty full state would wipe a canvas"
    );

    let (t, u, d) = add_fixture(&mut host, "host", 4).await;
    assert!(ping_collect(&mut host).await.is_empty(), "no echo");
    let got = ping_collect(&mut guest).await;
    assert_eq!(
        got.len(),
        2,
        "full state, then its placeholder fix: {got:#?}"
    );
    let folded = fold_fixes(&got);
    let full = only(&folded);
    assert_eq!(full["type"], "sync:full_state", "not a command: {full}");
    assert_eq!(full["from_server"], true);
    assert!(full["state"]["version"].is_u64());
    let items = scene_by_uuid(&full["state"]);
    assert_eq!(items.len(), 1);
    assert_eq!(items[&u], expected_item(&d, &t));
    let relayed = ping_collect_folded(&mut silent).await;
    assert_eq!(only(&relayed)["command"]["action"], "add_item");

    // Answered once: a second request costs nothing.
    send_json(
        &mut guest,
        &json!({"type": "sync:request", "user_id": "guest"}),
    )
    .await;
    assert!(ping_collect(&mut guest).await.is_empty());
    assert!(
        ping_collect(&mut host).await.is_empty(),
        "only the requester gets it"
    );

    // From then on the guest gets commands.
    let mut moved = d.clone();
    moved["x_mm"] = json!(3.5);
    send_json(&mut host, &command("move_item", &t, &u, moved, "host")).await;
    assert!(ping_collect(&mut host).await.is_empty());
    let to_guest = ping_collect(&mut guest).await;
    let msg = only(&to_guest);
    // Relayed as update_item (README "Choices": the upstream client mirrors a move_item).
    assert_eq!(msg["command"]["action"], "update_item");
    assert_eq!(msg["command"]["data"]["x_mm"], json!(3.5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_joiner_after_host_left_gets_full_state() {
    let server = TestServer::start().await;
    let (mut host, ack) = server.legacy("late", "host").await;
    assert_eq!(ack["is_host"], true);
    let added: Vec<_> = {
        let mut added = Vec::new();
        for i in [12, 13, 14] {
            added.push(add_fixture(&mut host, "host", i).await);
        }
        added
    };
    ping_collect(&mut host).await;
    host.close(None).await.expect("host closes");
    wait_for_connections(&server, 0).await;

    let (_late, ack, got) = server.joiner("late", "latecomer").await;
    assert_eq!(
        ack["is_host"], false,
        "the scene is initialized: nobody hosts"
    );
    let names: Vec<&Value> = ack["users"]
        .as_array()
        .expect("users")
        .iter()
        .map(|u| &u["user_id"])
        .collect();
    assert_eq!(names, [&json!("latecomer")], "the host has left");
    let got = fold_fixes(&got);
    let full = only(&got);
    assert_eq!(full["type"], "sync:full_state");
    assert_eq!(full["from_server"], true);
    let items = scene_by_uuid(&full["state"]);
    let expected: BTreeMap<String, Value> = added
        .iter()
        .map(|(t, u, d)| (u.clone(), expected_item(d, t)))
        .collect();
    assert_eq!(items, expected);
}

// ---------------------------------------------------------------------------------------------
// §3.3 Scene commands
// ---------------------------------------------------------------------------------------------

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_item_relays_whole_data_without_echo() {
    let server = TestServer::start().await;
    let (mut a, _) = server.legacy("relay", "a").await;
    let (mut b, _) = server.legacy("relay", "b").await;
    ping_collect(&mut a).await;

    let (item_type, uuid, data) = add_fixture(&mut a, "a", 1).await;
    let after_add = ping_collect(&mut a).await;

    let to_b = ping_collect(&mut b).await;
    assert_eq!(
        to_b.len(),
        2,
        "add_item, then the placeholder update_item: {to_b:#?}"
    );
    let to_b = fold_fixes(&to_b);
    let msg = only(&to_b);
    assert_eq!(msg["type"], "command");
    assert_eq!(msg["user_id"], "a");
    assert_timestamp(&msg["timestamp"]);
    let cmd = &msg["command"];
    assert_eq!(cmd["action"], "add_item");
    assert_eq!(cmd["item_id"], json!(uuid));
    assert_eq!(cmd["item_type"], json!(item_type));
    assert_eq!(
        normalize(&cmd["data"]),
        expected_item(&data, &item_type),
        "whole data plus item_type"
    );
    assert_eq!(cmd["data"]["item_uuid"], json!(uuid));
    let (items, _) = scene_snapshot(&server, "relay").await;
    assert_eq!(items[&uuid], expected_item(&data, &item_type));

    // Nobody has changed the item but its creator, so nothing about it was ever sent to the
    // creator: its adds, moves and edits are answered with nothing but the pong.
    let mut moved = data.clone();
    moved["x_mm"] = json!(20.0);
    send_json(
        &mut a,
        &command("move_item", &item_type, &uuid, moved.clone(), "a"),
    )
    .await;
    let after_move = ping_collect(&mut a).await;
    let mut edited = moved;
    edited["name"] = json!("L1");
    send_json(
        &mut a,
        &command("update_item", &item_type, &uuid, edited, "a"),
    )
    .await;
    let after_update = ping_collect(&mut a).await;
    let to_b = ping_collect(&mut b).await;
    let actions: Vec<&Value> = to_b.iter().map(|m| &m["command"]["action"]).collect();
    assert_eq!(actions, [&json!("update_item"), &json!("update_item")]);
    assert!(
        after_add.is_empty() && after_move.is_empty() && after_update.is_empty(),
        "the sender gets no echo (PROTOCOL §3.3):\n after add_item: {after_add:?}\n \
         after move_item: {after_move:?}\n after update_item: {after_update:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn move_update_remove_and_unknown_items() {
    let server = TestServer::start().await;
    let (mut a, _) = server.legacy("edit", "a").await;
    let (mut b, _) = server.legacy("edit", "b").await;
    ping_collect(&mut a).await;
    let (item_type, uuid, data) = add_fixture(&mut b, "b", 11).await;
    ping_collect(&mut b).await;
    let added = ping_collect_folded(&mut a).await;
    assert_eq!(only(&added)["command"]["action"], "add_item");

    // move_item writes only x_mm, y_mm and angle_deg, whatever else its data says.
    let mut moved = data.clone();
    moved["x_mm"] = json!(142.5);
    moved["y_mm"] = json!(-37.25);
    moved["angle_deg"] = json!(30.0);
    moved["name"] = json!("renamed by a move");
    moved["object_height_mm"] = json!(1.0);
    send_json(&mut a, &command("move_item", &item_type, &uuid, moved, "a")).await;
    let mut expected = expected_item(&data, &item_type);
    expected["x_mm"] = json!(142.5);
    expected["y_mm"] = json!(-37.25);
    expected["angle_deg"] = json!(30.0);
    let (items, _) = scene_snapshot(&server, "edit").await;
    assert_eq!(items[&uuid], expected, "a move writes the position only");
    assert_eq!(items[&uuid]["name"], data["name"]);
    assert_eq!(items[&uuid]["object_height_mm"], data["object_height_mm"]);
    // A's position is the document's, and all A was told of the item is the add that put it
    // on its canvas (which its command proves applied): no correction (PROTOCOL §3.3,
    // README "Choices").
    let to_a = ping_collect(&mut a).await;
    assert!(to_a.is_empty(), "no correction needed: {to_a:#?}");
    let to_b = ping_collect(&mut b).await;
    let msg = only(&to_b);
    assert_eq!(msg["user_id"], "a");
    assert_eq!(msg["command"]["action"], "update_item");
    assert_eq!(msg["command"]["item_id"], json!(uuid));
    assert_eq!(msg["command"]["item_type"], json!(item_type));
    assert_eq!(
        normalize(&msg["command"]["data"]),
        expected,
        "the item's whole current fields"
    );

    // update_item: B edits the name from what it was told; A hears it with the whole data.
    // A's move reached B as an update_item with the old name, which B may apply after its
    // edit: B is owed the authoritative state once its commands pause (here: the pong).
    let mut edited = msg["command"]["data"].clone();
    edited["name"] = json!("Lens L1 (f = 100 mm)");
    send_json(
        &mut b,
        &command("update_item", &item_type, &uuid, edited, "b"),
    )
    .await;
    expected["name"] = json!("Lens L1 (f = 100 mm)");
    let to_b = ping_collect(&mut b).await;
    let correction = only(&to_b);
    assert_eq!(correction["command"]["action"], "update_item");
    assert_eq!(normalize(&correction["command"]["data"]), expected);
    let to_a = ping_collect(&mut a).await;
    let msg = only(&to_a);
    assert_eq!(msg["user_id"], "b");
    assert_eq!(msg["command"]["action"], "update_item");
    assert_eq!(msg["command"]["item_type"], json!(item_type));
    assert_eq!(normalize(&msg["command"]["data"]), expected);
    let (items, _) = scene_snapshot(&server, "edit").await;
    assert_eq!(items[&uuid], expected);

    // remove_item reaches the other client; the remover gets no echo.
    send_json(
        &mut a,
        &command("remove_item", &item_type, &uuid, json!({}), "a"),
    )
    .await;
    let to_a = ping_collect(&mut a).await;
    assert!(to_a.is_empty(), "no echo of a removal: {to_a:#?}");
    let to_b = ping_collect(&mut b).await;
    let msg = only(&to_b);
    assert_eq!(msg["command"]["action"], "remove_item");
    assert_eq!(msg["command"]["item_id"], json!(uuid));
    assert_eq!(msg["user_id"], "a");
    let (items, version) = scene_snapshot(&server, "edit").await;
    assert!(items.is_empty(), "{items:?}");

    // A command that crossed the removal (its sender removed the item, or was told so) is
    // ignored without an answer: the removal deletes the sender's copy.
    let mut stale = data.clone();
    stale["x_mm"] = json!(1.0);
    send_json(
        &mut a,
        &command("move_item", &item_type, &uuid, stale.clone(), "a"),
    )
    .await;
    assert!(ping_collect(&mut a).await.is_empty());
    send_json(
        &mut b,
        &command("update_item", &item_type, &uuid, stale, "b"),
    )
    .await;
    assert!(ping_collect(&mut b).await.is_empty());
    assert!(ping_collect(&mut a).await.is_empty());
    // So is a removal of an item the document lacks.
    send_json(
        &mut b,
        &command("remove_item", &item_type, &uuid, json!({}), "b"),
    )
    .await;
    assert!(ping_collect(&mut b).await.is_empty());
    assert!(ping_collect(&mut a).await.is_empty());
    assert_eq!(
        scene_snapshot(&server, "edit").await,
        (BTreeMap::new(), version.clone()),
        "commands on a removed item change nothing"
    );

    // A move of an item the document never had creates it from the whole dict it carries
    // (a host's canvas before its upload); the others get it as add_item.
    let ghost = "00000000-0000-4000-8000-00000000dead";
    let mut ghost_data = data.clone();
    ghost_data["item_uuid"] = json!(ghost);
    ghost_data["x_mm"] = json!(7.25);
    send_json(
        &mut b,
        &command("move_item", &item_type, ghost, ghost_data.clone(), "b"),
    )
    .await;
    assert!(
        ping_collect(&mut b).await.is_empty(),
        "the sender holds what it sent"
    );
    let to_a = ping_collect_folded(&mut a).await;
    let msg = only(&to_a);
    assert_eq!(msg["command"]["action"], "add_item");
    assert_eq!(msg["command"]["item_id"], ghost);
    assert_eq!(msg["user_id"], "b");
    let ghost_item = expected_item(&ghost_data, &item_type);
    assert_eq!(normalize(&msg["command"]["data"]), ghost_item);
    let (items, after) = scene_snapshot(&server, "edit").await;
    assert_eq!(
        items,
        BTreeMap::from([(ghost.to_owned(), ghost_item)]),
        "every field of the dict, not only the position"
    );
    assert!(after.as_u64() > version.as_u64());
}

/// Corrections (PROTOCOL §3.3 "Convergence", README "Choices"): after a command, the sender
/// gets the item's authoritative state only when its canvas may differ from the document:
/// its dict differs on the fields the command writes, or a message about the item that it
/// may not have applied yet would leave something else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_is_corrected_only_when_the_senders_canvas_may_differ() {
    let server = TestServer::start().await;
    let (mut a, _) = server.legacy("fix", "a").await;
    let (mut b, _) = server.legacy("fix", "b").await;
    ping_collect(&mut a).await;
    let (t, u, data) = add_fixture(&mut a, "a", 13).await;
    assert!(ping_collect(&mut a).await.is_empty());
    let told = ping_collect_folded(&mut b).await;
    assert_eq!(only(&told)["command"]["action"], "add_item");

    // B renames; A has not applied that yet and sends a whole dict with the old name and a
    // new z_value. The old name is one A knew, so it does not revert B's rename; A's dict
    // now differs from the document on `name`: it gets the authoritative state.
    let mut renamed = data.clone();
    renamed["name"] = json!("renamed by b");
    send_json(&mut b, &command("update_item", &t, &u, renamed, "b")).await;
    assert!(
        ping_collect(&mut b).await.is_empty(),
        "b's dict is the document"
    );
    let mut stale = data.clone();
    stale["z_value"] = json!(7);
    send_json(&mut a, &command("update_item", &t, &u, stale, "a")).await;
    let mut expected = expected_item(&data, &t);
    expected["name"] = json!("renamed by b");
    expected["z_value"] = json!(7);
    let to_a = ping_collect(&mut a).await;
    assert_eq!(to_a.len(), 2, "b's rename, then one correction: {to_a:#?}");
    assert_eq!(to_a[0]["user_id"], "b", "{to_a:#?}");
    assert_eq!(to_a[0]["command"]["action"], "update_item");
    assert_corrections_only(&to_a[1..], &u, &expected);
    assert_eq!(scene_snapshot(&server, "fix").await.0[&u], expected);
    let to_b = ping_collect(&mut b).await;
    assert_eq!(only(&to_b)["command"]["data"]["z_value"], json!(7));

    // A move is compared on the position only: a dict whose other fields differ from the
    // document's (they are not what a move writes) earns no correction when nothing about
    // the item is in flight to its sender.
    let (t2, u2, d2) = add_fixture(&mut b, "b", 14).await;
    assert!(ping_collect(&mut b).await.is_empty());
    assert_eq!(ping_collect_folded(&mut a).await.len(), 1);
    let mut moved2 = d2.clone();
    moved2["x_mm"] = json!(99.0);
    moved2["name"] = json!("only on a's canvas");
    send_json(&mut a, &command("move_item", &t2, &u2, moved2, "a")).await;
    let to_a = ping_collect(&mut a).await;
    assert!(to_a.is_empty(), "no correction: {to_a:#?}");
    let item2 = &scene_snapshot(&server, "fix").await.0[&u2];
    assert_eq!(item2["x_mm"], json!(99.0));
    assert_eq!(item2["name"], d2["name"]);
}

// ---------------------------------------------------------------------------------------------
// §3.4 Host uploads
// ---------------------------------------------------------------------------------------------

fn upload(items: &[&Value], user: &str) -> Value {
    json!({
        "type": "sync:full_state",
        "state": {"items": items, "version": 1, "timestamp": "2026-11-25T19:22:01.123Z"},
        "user_id": user,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_upload_becomes_the_scene_and_reaches_others_as_commands() {
    let server = TestServer::start().await;
    let (mut host, ack) = server.legacy("upload", "host").await;
    assert_eq!(ack["is_host"], true);
    let (mut guest, ack) = server.legacy("upload", "guest").await;
    assert_eq!(ack["is_host"], false);
    ping_collect(&mut host).await;

    let items: Vec<(String, String, Value)> = [3, 4, 5].into_iter().map(fixture_item).collect();
    let refs: Vec<&Value> = items.iter().map(|(_, _, d)| d).collect();
    send_json(&mut host, &upload(&refs, "host")).await;
    ping_collect(&mut host).await;

    let expected: BTreeMap<String, Value> = items
        .iter()
        .map(|(t, u, d)| (u.clone(), expected_item(d, t)))
        .collect();
    let (scene, _) = scene_snapshot(&server, "upload").await;
    assert_eq!(scene, expected, "the upload became the scene");

    let to_guest = ping_collect(&mut guest).await;
    assert!(
        to_guest.iter().all(|m| m["type"] == "command"),
        "the upload is not relayed verbatim: {to_guest:?}"
    );
    assert_eq!(
        to_guest.len(),
        6,
        "add_item and its placeholder update_item per item: {to_guest:#?}"
    );
    let to_guest = fold_fixes(&to_guest);
    let added: BTreeMap<String, Value> = to_guest
        .iter()
        .map(|m| {
            assert_eq!(m["command"]["action"], "add_item", "{m}");
            assert_eq!(m["user_id"], "host");
            assert_eq!(m["command"]["item_type"], m["command"]["data"]["item_type"]);
            (
                m["command"]["item_id"]
                    .as_str()
                    .expect("item_id")
                    .to_owned(),
                normalize(&m["command"]["data"]),
            )
        })
        .collect();
    assert_eq!(to_guest.len(), 3, "one add_item per item");
    assert_eq!(added, expected);

    // A joiner now gets the uploaded scene as its full state.
    let (_late, ack, got) = server.joiner("upload", "late").await;
    assert_eq!(ack["is_host"], false);
    let got = fold_fixes(&got);
    let full = only(&got);
    assert_eq!(full["type"], "sync:full_state");
    assert_eq!(scene_by_uuid(&full["state"]), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_upload_sends_the_host_no_echo() {
    let server = TestServer::start().await;
    let (mut host, ack) = server.legacy("upload-echo", "host").await;
    assert_eq!(ack["is_host"], true);
    let refs_owned: Vec<Value> = [0, 1].into_iter().map(|i| fixture_item(i).2).collect();
    let refs: Vec<&Value> = refs_owned.iter().collect();
    send_json(&mut host, &upload(&refs, "host")).await;
    let to_host = ping_collect(&mut host).await;
    assert!(
        to_host.is_empty(),
        "the host already holds what it uploaded; nothing was sent to it about these items \
         since, so it gets no echo: {to_host:?}"
    );
    assert_eq!(scene_snapshot(&server, "upload-echo").await.0.len(), 2);
}

/// Uploads count from whichever connection sends them (the desktop client takes its role
/// from its own dialog, README "Choices"): merged as PROTOCOL §3.4 says, and the uploader
/// gets back only what its canvas lacks or shows differently. `target_user` is ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_from_any_connection_is_merged() {
    let server = TestServer::start().await;
    let (mut first, _) = server.legacy("merge", "first").await;
    let (mut host, ack) = server.legacy("merge", "host").await;
    assert_eq!(ack["is_host"], false, "advisory only: the scene has a user");
    ping_collect(&mut first).await;

    // The second connection uploads into the uninitialized scene: it becomes the scene. The
    // desktop client adds `uuid` beside `item_uuid`: it names the key, it is not a field.
    let (t6, u6, d6) = fixture_item(6);
    let mut uploaded6 = d6.clone();
    uploaded6["uuid"] = json!(u6);
    let mut frame = upload(&[&uploaded6], "host");
    frame["target_user"] = json!("first");
    send_json(&mut host, &frame).await;
    assert!(
        ping_collect(&mut host).await.is_empty(),
        "the uploader holds what it uploaded"
    );
    let to_first = ping_collect_folded(&mut first).await;
    let msg = only(&to_first);
    assert_eq!(
        msg["type"], "command",
        "target_user gets commands, not the upload: {msg}"
    );
    assert_eq!(msg["command"]["action"], "add_item");
    assert_eq!(msg["command"]["item_id"], json!(u6));
    assert_eq!(msg["user_id"], "host");
    assert!(
        msg["command"]["data"].get("uuid").is_none(),
        "the uploaded `uuid` key is not stored as a field: {msg}"
    );
    let (scene, _) = scene_snapshot(&server, "merge").await;
    assert_eq!(
        scene,
        BTreeMap::from([(u6.clone(), expected_item(&d6, &t6))])
    );
    // An uploader never gets a full state (it would replace a canvas the server holds only
    // in part); its canvas lacks nothing, so its request costs nothing.
    send_json(&mut host, &json!({"type": "sync:request"})).await;
    assert!(ping_collect(&mut host).await.is_empty());

    // Once the scene is initialized: `first` adds an item, the uploader renames it in its
    // next upload; the rename is merged and reaches `first`.
    let (t7, u7, d7) = add_fixture(&mut first, "first", 7).await;
    assert!(ping_collect(&mut first).await.is_empty());
    let to_host = ping_collect_folded(&mut host).await;
    assert_eq!(only(&to_host)["command"]["action"], "add_item");
    let mut renamed = d7.clone();
    renamed["name"] = json!("renamed in an upload");
    send_json(&mut host, &upload(&[&renamed, &d6], "host")).await;
    assert!(ping_collect(&mut host).await.is_empty());
    let to_first = ping_collect(&mut first).await;
    let msg = only(&to_first);
    assert_eq!(msg["command"]["action"], "update_item");
    assert_eq!(msg["command"]["item_id"], json!(u7));
    assert_eq!(
        normalize(&msg["command"]["data"]),
        expected_item(&renamed, &t7)
    );

    // A third connection, told the item's name twice, uploads a canvas holding the older
    // name and lacking the other item: the stale name is not written (it is a value this
    // connection was told), so it gets the document's state of that item, and the item it
    // lacks as add_item.
    let (mut third, _) = server.legacy("merge", "third").await;
    ping_collect(&mut first).await;
    ping_collect(&mut host).await;
    let mut named = d6.clone();
    for name in ["N2", "N3"] {
        named["name"] = json!(name);
        send_json(
            &mut first,
            &command("update_item", &t6, &u6, named.clone(), "first"),
        )
        .await;
    }
    ping_collect(&mut first).await;
    let told = ping_collect_folded(&mut third).await;
    let told: Vec<(&Value, &Value)> = told
        .iter()
        .map(|m| (&m["command"]["action"], &m["command"]["data"]["name"]))
        .collect();
    assert_eq!(
        told,
        [
            (&json!("add_item"), &json!("N2")),
            (&json!("update_item"), &json!("N3"))
        ]
    );
    ping_collect(&mut host).await;
    let (before, version) = scene_snapshot(&server, "merge").await;
    let mut stale = d6.clone();
    stale["name"] = json!("N2");
    send_json(&mut third, &upload(&[&stale], "third")).await;
    let back = ping_collect(&mut third).await;
    assert_eq!(back.len(), 3, "{back:#?}");
    let back = fold_fixes(&back);
    let actions: Vec<(&Value, &Value)> = back
        .iter()
        .map(|m| (&m["command"]["action"], &m["command"]["item_id"]))
        .collect();
    // What its canvas lacks goes out at once; the correction once its commands pause (here:
    // with the pong).
    assert_eq!(
        actions,
        [
            (&json!("add_item"), &json!(u7)),
            (&json!("update_item"), &json!(u6))
        ]
    );
    assert_eq!(normalize(&back[1]["command"]["data"]), before[&u6]);
    assert_eq!(back[1]["command"]["data"]["name"], "N3");
    assert_eq!(normalize(&back[0]["command"]["data"]), before[&u7]);
    assert!(ping_collect(&mut first).await.is_empty());
    assert!(ping_collect(&mut host).await.is_empty());
    assert_eq!(
        scene_snapshot(&server, "merge").await,
        (before.clone(), version.clone()),
        "the stale upload changed nothing"
    );

    // Its canvas now equals the document: the same upload again costs no message.
    let mut current6 = before[&u6].clone();
    current6["item_uuid"] = json!(u6);
    let mut current7 = before[&u7].clone();
    current7["item_uuid"] = json!(u7);
    send_json(&mut third, &upload(&[&current6, &current7], "third")).await;
    assert!(ping_collect(&mut third).await.is_empty());
    assert!(ping_collect(&mut first).await.is_empty());
    assert_eq!(
        scene_snapshot(&server, "merge").await,
        (before, version),
        "an upload equal to the document changes nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_upload_neither_resurrects_nor_deletes() {
    let server = TestServer::start().await;
    let (mut host, ack) = server.legacy("stale", "host").await;
    assert_eq!(ack["is_host"], true);
    let (mut guest, _) = server.legacy("stale", "guest").await;
    ping_collect(&mut host).await;

    let items: Vec<(String, String, Value)> = [8, 9, 10].into_iter().map(fixture_item).collect();
    let all: Vec<&Value> = items.iter().map(|(_, _, d)| d).collect();
    send_json(&mut host, &upload(&all, "host")).await;
    ping_collect(&mut host).await;
    assert_eq!(ping_collect_folded(&mut guest).await.len(), 3);

    // The guest removes the first item; the host is told.
    let (t0, u0, _) = &items[0];
    send_json(
        &mut guest,
        &command("remove_item", t0, u0, json!({}), "guest"),
    )
    .await;
    ping_collect(&mut guest).await;
    let to_host = ping_collect(&mut host).await;
    let msg = only(&to_host);
    assert_eq!(msg["command"]["action"], "remove_item");
    assert_eq!(msg["command"]["item_id"], json!(u0));

    // A stale upload that still holds the removed item, lacks the third one, and renames the
    // second one.
    let mut renamed = items[1].2.clone();
    renamed["name"] = json!("Beam splitter BS2 (renamed by the host)");
    let stale: Vec<&Value> = vec![&items[0].2, &renamed];
    send_json(&mut host, &upload(&stale, "host")).await;
    let to_host = ping_collect(&mut host).await;
    assert!(
        to_host.is_empty(),
        "the host's canvas lacks nothing the document holds: {to_host:#?}"
    );

    let (scene, _) = scene_snapshot(&server, "stale").await;
    let mut expected: BTreeMap<String, Value> = items[1..]
        .iter()
        .map(|(t, u, d)| (u.clone(), expected_item(d, t)))
        .collect();
    let (t1, u1, _) = &items[1];
    expected.insert(u1.clone(), expected_item(&renamed, t1));
    assert_eq!(
        scene, expected,
        "the removed item stays removed, the missing one stays, the edit is applied"
    );
    let to_guest = ping_collect(&mut guest).await;
    let msg = only(&to_guest);
    assert_eq!(msg["type"], "command", "not relayed verbatim: {msg}");
    assert_eq!(msg["command"]["action"], "update_item");
    assert_eq!(msg["command"]["item_id"], json!(u1));
    assert_eq!(normalize(&msg["command"]["data"]), expected[u1]);
}

// ---------------------------------------------------------------------------------------------
// §3.5 Replacement
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_user_name_replaces_old_connection() {
    let server = TestServer::start().await;
    let (mut old, _) = server.legacy("dup", "dana").await;
    let (mut watcher, _) = server.legacy("dup", "walt").await;
    ping_collect(&mut old).await;
    assert!(ping_collect(&mut watcher).await.is_empty());

    let (mut new, ack) = server.legacy("dup", "dana").await;
    assert_eq!(ack["user_id"], "dana");
    let names: Vec<&Value> = ack["users"]
        .as_array()
        .expect("users")
        .iter()
        .map(|u| &u["user_id"])
        .collect();
    assert_eq!(
        names,
        [&json!("walt"), &json!("dana")],
        "dana is listed once"
    );

    // The old socket is closed with 4000.
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
    wait_for_connections(&server, 2).await;

    let to_watcher = ping_collect(&mut watcher).await;
    assert!(
        to_watcher.is_empty(),
        "no user:left / user:joined for a swap: {to_watcher:?}"
    );

    // The new connection works.
    let (t, _, d) = add_fixture(&mut new, "dana", 2).await;
    ping_collect(&mut new).await;
    let to_watcher = ping_collect_folded(&mut watcher).await;
    let msg = only(&to_watcher);
    assert_eq!(msg["command"]["action"], "add_item");
    assert_eq!(msg["user_id"], "dana");
    assert_eq!(normalize(&msg["command"]["data"]), expected_item(&d, &t));
    let list = get_json(&server, "/api/sessions").await;
    let session = list
        .as_array()
        .expect("list")
        .iter()
        .find(|s| s["id"] == "dup")
        .expect("dup listed");
    let mut users: Vec<&str> = session["users"]
        .as_array()
        .expect("users")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    users.sort_unstable();
    assert_eq!(users, ["dana", "walt"]);
    assert_eq!(scene_snapshot(&server, "dup").await.0.len(), 1);
}

// ---------------------------------------------------------------------------------------------
// §3.6 Bad input
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_error_and_changes_nothing() {
    let server = TestServer::start().await;
    let (mut a, _) = server.legacy("bad", "a").await;
    let (mut b, _) = server.legacy("bad", "b").await;
    ping_collect(&mut a).await;
    let (t, uuid, data) = add_fixture(&mut a, "a", 13).await;
    ping_collect(&mut a).await;
    ping_collect(&mut b).await;
    let before = scene_snapshot(&server, "bad").await;
    assert_eq!(before.0[&uuid], expected_item(&data, &t));

    let moved = json!({"x_mm": 999.0, "y_mm": 999.0, "angle_deg": 90.0, "name": "broken"});
    let bad_command = |command: Value| {
        json!({"type": "command", "command": command, "user_id": "a",
               "timestamp": "2026-11-25T19:22:01.123Z"})
        .to_string()
    };
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "not JSON",
            "{\"type\": \"command\", ".to_owned(),
            "bad_json",
        ),
        ("plain text", "hello server".to_owned(), "bad_json"),
        (
            "array",
            json!([{"type": "ping"}]).to_string(),
            "bad_message",
        ),
        ("string", json!("ping").to_string(), "bad_message"),
        ("number", "42".to_owned(), "bad_message"),
        (
            "missing type",
            json!({"user_id": "a", "command": {}}).to_string(),
            "bad_message",
        ),
        (
            "non-string type",
            json!({"type": 7}).to_string(),
            "bad_message",
        ),
        (
            "unknown type",
            json!({"type": "scene:explode", "user_id": "a"}).to_string(),
            "unknown_type",
        ),
        (
            "command without command",
            json!({"type": "command", "user_id": "a"}).to_string(),
            "bad_message",
        ),
        (
            "command not an object",
            json!({"type": "command", "command": "move_item"}).to_string(),
            "bad_message",
        ),
        (
            "bad action",
            bad_command(
                json!({"action": "teleport_item", "item_type": t, "item_id": uuid, "data": moved}),
            ),
            "bad_message",
        ),
        (
            "missing action",
            bad_command(json!({"item_type": t, "item_id": uuid, "data": moved})),
            "bad_message",
        ),
        (
            "missing item_id",
            bad_command(json!({"action": "move_item", "item_type": t, "data": moved})),
            "bad_message",
        ),
        (
            "empty item_id",
            bad_command(
                json!({"action": "move_item", "item_type": t, "item_id": "", "data": moved}),
            ),
            "bad_message",
        ),
        (
            "data not an object",
            bad_command(
                json!({"action": "update_item", "item_type": t, "item_id": uuid, "data": [1, 2]}),
            ),
            "bad_message",
        ),
        (
            "data missing",
            bad_command(json!({"action": "move_item", "item_type": t, "item_id": uuid})),
            "bad_message",
        ),
    ];
    for (what, frame, code) in &cases {
        a.send(Message::text(frame.clone()))
            .await
            .expect("sent while open");
        let replies = ping_collect(&mut a).await;
        assert_eq!(replies.len(), 1, "{what}: {replies:?}");
        assert_error(&replies[0], code);
    }

    // A binary frame on a JSON connection.
    a.send(Message::binary(vec![0u8, 2, 1, 0]))
        .await
        .expect("sent while open");
    let replies = ping_collect(&mut a).await;
    assert_error(only(&replies), "bad_message");

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
    let mut moved_ok = data.clone();
    moved_ok["x_mm"] = json!(5.0);
    send_json(&mut a, &command("move_item", &t, &uuid, moved_ok, "a")).await;
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
    let health = get_json(&server, "/health").await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn yjs_opt_in_on_ws() {
    let server = TestServer::start().await;
    let (mut json_client, _) = server.legacy("hybrid", "jay").await;
    let (t1, u1, d1) = add_fixture(&mut json_client, "jay", 1).await;
    let (t0, u0, d0) = add_fixture(&mut json_client, "jay", 0).await;
    ping_collect(&mut json_client).await;

    let mut y = server.connect("/ws/hybrid/yuki?yjs=1").await;
    let ack = recv_json(&mut y).await;
    assert_eq!(ack["type"], "connection:ack");
    assert_eq!(ack["user_id"], "yuki");
    assert_eq!(ack["is_host"], false);
    let b64 = base64::engine::general_purpose::STANDARD;
    let snapshot_b64 = ack["snapshot"].as_str().expect("snapshot");
    assert_eq!(snapshot_b64.len() % 4, 0, "padded base64");
    let snapshot = b64.decode(snapshot_b64).expect("standard base64");
    let sv_bytes = b64
        .decode(ack["state_vector"].as_str().expect("state_vector"))
        .expect("standard base64");

    let doc = Doc::new();
    apply(&doc, &snapshot);
    assert_eq!(doc_item(&doc, &u1), Some(expected_doc_item(&d1, &t1)));
    assert_eq!(doc_item(&doc, &u0), Some(expected_doc_item(&d0, &t0)));
    assert_eq!(
        doc_item(&doc, &u1).expect("item")["name"],
        d1["name"],
        "fields readable as in a browser"
    );
    let sv = StateVector::decode_v1(&sv_bytes).expect("a v1 state vector");
    assert_eq!(
        sv,
        doc.transact().state_vector(),
        "state vector of the snapshot"
    );

    // The first binary frame is the server's SyncStep1; no full state comes before it.
    let first = match recv(&mut y).await {
        Message::Binary(b) => b.to_vec(),
        other => panic!("expected SyncStep1 right after the ack, got {other:?}"),
    };
    assert_eq!(&first[..2], &[0, 0], "y-websocket SyncStep1");
    match YMessage::decode_v1(&first).expect("a y-websocket message") {
        YMessage::Sync(SyncMessage::SyncStep1(server_sv)) => assert_eq!(server_sv, sv),
        other => panic!("not SyncStep1: {other:?}"),
    }
    let joined = ping_collect(&mut json_client).await;
    assert_eq!(only(&joined)["type"], "user:joined");

    // A JSON client's change reaches the Yjs connection as an update, not a command.
    let (t2, u2, d2) = add_fixture(&mut json_client, "jay", 2).await;
    ping_collect(&mut json_client).await;
    let (texts, binaries) = ping_collect_frames(&mut y).await;
    assert!(
        texts.is_empty(),
        "no command / full state JSON on ?yjs=1: {texts:?}"
    );
    assert!(!binaries.is_empty(), "the add arrives as Yjs");
    for frame in &binaries {
        match YMessage::decode_v1(frame).expect("a y-websocket message") {
            YMessage::Sync(SyncMessage::Update(u)) | YMessage::Sync(SyncMessage::SyncStep2(u)) => {
                apply(&doc, &u)
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(doc_item(&doc, &u2), Some(expected_doc_item(&d2, &t2)));

    // A Yjs update of x_mm reaches JSON clients as move_item...
    let update = set_field(&doc, &u1, "x_mm", 77.5);
    y.send(Message::binary(yjs_update_frame(update)))
        .await
        .expect("sent");
    let (texts, _) = ping_collect_frames(&mut y).await;
    assert!(texts.is_empty(), "no echo, no error: {texts:?}");
    let to_json = ping_collect(&mut json_client).await;
    let msg = only(&to_json);
    assert_eq!(msg["command"]["action"], "update_item");
    assert_eq!(msg["command"]["item_id"], json!(u1));
    assert_eq!(msg["user_id"], "yuki");
    let mut expected = expected_item(&d1, &t1);
    expected["x_mm"] = json!(77.5);
    assert_eq!(normalize(&msg["command"]["data"]), expected);

    // ...and an update of another field as update_item.
    let update = set_field(&doc, &u1, "name", "Lens (from Yjs)");
    y.send(Message::binary(yjs_update_frame(update)))
        .await
        .expect("sent");
    ping_collect_frames(&mut y).await;
    let to_json = ping_collect(&mut json_client).await;
    let msg = only(&to_json);
    assert_eq!(msg["command"]["action"], "update_item");
    expected["name"] = json!("Lens (from Yjs)");
    assert_eq!(normalize(&msg["command"]["data"]), expected);
    let (scene, version) = scene_snapshot(&server, "hybrid").await;
    assert_eq!(scene[&u1], expected);

    // Malformed Yjs updates: a JSON error each, nothing changes, the connection stays open.
    let real = set_field(&doc, &u0, "x_mm", -500.0);
    let truncated = real[..real.len() / 2].to_vec();
    let bad_frames = vec![
        vec![0u8, 2, 4, 0xff, 0xff, 0xff, 0x0f],
        yjs_update_frame(truncated),
    ];
    for frame in bad_frames {
        y.send(Message::binary(frame.clone())).await.expect("sent");
        let (texts, binaries) = ping_collect_frames(&mut y).await;
        assert_error(only(&texts), "bad_message");
        assert!(binaries.is_empty(), "{frame:?}");
    }
    assert!(ping_collect(&mut json_client).await.is_empty());
    assert_eq!(
        scene_snapshot(&server, "hybrid").await,
        (scene, version),
        "a malformed update changes nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn yjs_opt_in_never_gets_full_state() {
    let server = TestServer::start().await;
    let (mut json_client, _) = server.legacy("hybrid2", "jay").await;
    add_fixture(&mut json_client, "jay", 3).await;
    ping_collect(&mut json_client).await;

    let mut y = server.connect("/ws/hybrid2/yuki?yjs=1").await;
    let ack = recv_json(&mut y).await;
    assert_eq!(ack["type"], "connection:ack");
    send_json(&mut y, &json!({"type": "sync:request", "user_id": "yuki"})).await;
    let (texts, _) = ping_collect_frames(&mut y).await;
    assert!(
        texts.iter().all(|m| m["type"] != "sync:full_state"),
        "PROTOCOL §4: no sync:full_state is sent to a ?yjs=1 connection: {texts:?}"
    );
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

    let health = get_json(&server, "/health").await;
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
    let doc = Doc::new();
    apply(&doc, &body);
    let mut doc_a = expected_doc_item(&da, &ta);
    doc_a["x_mm"] = json!(12.0);
    assert_eq!(doc_item(&doc, &ua), Some(doc_a));
    assert_eq!(doc_item(&doc, &ub), Some(expected_doc_item(&db, &tb)));
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
    let doc = Doc::new();
    apply(&doc, &body);
    let update = set_field(&doc, &u, "y_mm", 3.25);
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
