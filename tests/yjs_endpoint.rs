//! `/yjs/{session}` (PROTOCOL §5) with a `yrs` client over `tokio-tungstenite`, side by side
//! with Optiverse JSON clients: the sync handshake and updates in both directions end to end,
//! `?user=`, bad frames, pings and a paused reader (the upgrade handshake is in
//! `handshakes.rs`). What the session decides (fan-out, awareness, the whole state a fresh
//! client gets) is tested without a socket in `core/tests/session_yjs.rs`.
//!
//! Ordering is established with the protocol itself, never with sleeps: a client's SyncStep1
//! is answered with SyncStep2 after everything the session sent it before, and a JSON client's
//! `ping` is answered after everything before it (see `YClient::sync` and `ping_collect`).

mod common;

use std::sync::Arc;

use common::*;
use futures_util::SinkExt;
use optiverse_collab::store::memory::MemoryStore;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use yrs::sync::{Message, SyncMessage};
use yrs::{Doc, Map, ReadTxn, Transact};

#[tokio::test]
async fn sync_handshake_and_updates_both_ways() {
    let session = "yjs-sync";
    let server = TestServer::start().await;
    let (mut alice, _) = server.settled(session, "alice").await;
    let (type1, uuid1, data1) = fixture_item(1);
    send_json(
        &mut alice,
        &command("add_item", &type1, &uuid1, data1.clone(), "alice"),
    )
    .await;
    assert_eq!(ping_collect(&mut alice).await, Vec::<Value>::new());

    // An edit made before connecting travels in the client's SyncStep2.
    let (type0, uuid0, data0) = fixture_item(0);
    let doc = Doc::new();
    let offline = doc.get_or_insert_map("items");
    offline.insert(
        &mut doc.transact_mut(),
        uuid0.as_str(),
        item_prelim(&type0, &data0),
    );
    let mut bob = YClient::connect_with(&server, &format!("/yjs/{session}?user=bob"), doc).await;
    let others = bob.handshake().await;
    assert!(others.is_empty(), "unexpected before SyncStep2: {others:?}");

    // The server's SyncStep2 carried alice's item, every field of it.
    let item1 = bob
        .item(&uuid1)
        .expect("alice's item reached the yrs client");
    assert_same(
        &item1,
        &with_type(&data1, &type1),
        "alice's item in the yrs document",
    );

    // Alice hears bob join, then gets bob's offline item as add_item (followed, as a
    // "source", by the placeholder update_item with the same data).
    let received = ping_collect(&mut alice).await;
    assert_eq!(received[0]["type"], "user:joined", "{received:#?}");
    assert_eq!(received[0]["user_id"], "bob");
    assert_eq!(
        commands(&received),
        [
            ("add_item".to_owned(), uuid0.clone(), "bob".to_owned()),
            ("update_item".to_owned(), uuid0.clone(), "bob".to_owned())
        ],
        "{received:#?}"
    );
    assert_eq!(fold_fixes(&received).len(), 2, "{received:#?}");
    let add = &received[1]["command"];
    assert_eq!(add["item_type"], json!(type0));
    assert_same(
        &add["data"],
        &with_type(&data0, &type0),
        "add_item data of bob's offline item",
    );

    // A live edit: a new item, then a move of it, then a change of another field, then one
    // edit of alice's item. Each is one Update; alice gets one command for each.
    let uuid2 = "0e7d3c1b-2a49-4f5e-9d8c-7b6a5f4e3d2c";
    let data2 = json!({"item_uuid": uuid2, "x_mm": 10.5, "y_mm": -2.0, "angle_deg": 0.0,
        "name": "Ruler", "points": [[0.0, 0.0], [25.4, 0.0]], "z_value": 2, "locked": false});
    bob.edit_and_send(|txn, items| {
        items.insert(txn, uuid2, item_prelim("ruler", &data2));
    })
    .await;
    bob.edit_and_send(|txn, items| {
        set_fields(
            txn,
            items,
            uuid2,
            &[
                ("x_mm", json!(50.25)),
                ("y_mm", json!(7.5)),
                ("angle_deg", json!(90.0)),
            ],
        );
    })
    .await;
    bob.edit_and_send(|txn, items| {
        set_fields(
            txn,
            items,
            uuid2,
            &[("name", json!("Ruler 2")), ("locked", json!(true))],
        );
    })
    .await;
    bob.edit_and_send(|txn, items| {
        set_fields(txn, items, &uuid1, &[("x_mm", json!(-33.0))]);
    })
    .await;
    // Once bob's SyncStep1 is answered, his updates were handled; the sender gets no echo.
    let echoed = bob.sync().await;
    assert!(echoed.is_empty(), "the sender got back: {echoed:?}");
    let received = ping_collect(&mut alice).await;
    let user = "bob".to_owned();
    assert_eq!(
        commands(&received),
        [
            ("add_item".to_owned(), uuid2.to_owned(), user.clone()),
            ("update_item".to_owned(), uuid2.to_owned(), user.clone()),
            ("update_item".to_owned(), uuid2.to_owned(), user.clone()),
            ("update_item".to_owned(), uuid1.clone(), user.clone()),
        ],
        "{received:#?}"
    );
    let mut expected2 = with_type(&data2, "ruler");
    assert_eq!(received[0]["command"]["item_type"], "ruler");
    assert_same(&received[0]["command"]["data"], &expected2, "add_item data");
    expected2["x_mm"] = json!(50.25);
    expected2["y_mm"] = json!(7.5);
    expected2["angle_deg"] = json!(90.0);
    assert_same(
        &received[1]["command"]["data"],
        &expected2,
        "move_item data",
    );
    expected2["name"] = json!("Ruler 2");
    expected2["locked"] = json!(true);
    assert_same(
        &received[2]["command"]["data"],
        &expected2,
        "update_item data",
    );
    let mut expected1 = with_type(&data1, &type1);
    expected1["x_mm"] = json!(-33.0);
    assert_same(
        &received[3]["command"]["data"],
        &expected1,
        "move_item data of alice's item",
    );

    // JSON to Yjs: alice moves and edits her item, then removes bob's ruler.
    let mut moved1 = data1.clone();
    moved1["x_mm"] = json!(1.5);
    moved1["angle_deg"] = json!(45.0);
    send_json(
        &mut alice,
        &command("move_item", &type1, &uuid1, moved1.clone(), "alice"),
    )
    .await;
    let mut renamed1 = moved1.clone();
    renamed1["name"] = json!("Renamed by alice");
    send_json(
        &mut alice,
        &command("update_item", &type1, &uuid1, renamed1.clone(), "alice"),
    )
    .await;
    send_json(
        &mut alice,
        &command("remove_item", "ruler", uuid2, json!({}), "alice"),
    )
    .await;
    // Alice is owed her item's authoritative state (bob's move of it may still be on its way
    // to her): one correction once her commands pause (here: with the pong), and no echo of
    // her removal.
    let back = ping_collect(&mut alice).await;
    let correction = only(&back);
    assert_eq!(correction["command"]["action"], "update_item", "{back:#?}");
    assert_eq!(correction["command"]["item_id"], json!(uuid1), "{back:#?}");
    assert_same(
        &correction["command"]["data"],
        &with_type(&renamed1, &type1),
        "the correction is alice's item as the session holds it",
    );
    let updates = bob.sync().await;
    assert_eq!(updates.len(), 3, "one Update per command, got {updates:?}");
    assert!(updates
        .iter()
        .all(|m| matches!(m, Message::Sync(SyncMessage::Update(_)))));
    assert_same(
        &bob.item(&uuid1).unwrap(),
        &with_type(&renamed1, &type1),
        "alice's item after her move and update",
    );
    assert_eq!(bob.item(uuid2), None, "alice removed the ruler");

    // A second yrs client syncs to the same document, the server's.
    let (carol, _) = YClient::join(&server, &format!("/yjs/{session}")).await;
    assert_eq!(
        carol.doc.transact().state_vector(),
        bob.doc.transact().state_vector()
    );
    for uuid in [&uuid0, &uuid1] {
        assert_eq!(carol.item(uuid), bob.item(uuid), "{uuid}");
    }
    let (status, body) = server.get(&format!("/api/sessions/{session}/update")).await;
    assert_eq!(status, 200);
    assert_eq!(state_vector(&doc_from(&body)), state_vector(&bob.doc));
}

#[tokio::test]
async fn user_param_puts_the_connection_in_the_user_list() {
    let session = "yjs-users";
    let server = TestServer::start().await;
    let (mut alice, _) = server.settled(session, "alice").await;

    let (named, _) = YClient::join(&server, &format!("/yjs/{session}?user=bob%20yjs")).await;
    let received = ping_collect(&mut alice).await;
    assert_eq!(received.len(), 1, "{received:#?}");
    assert_eq!(received[0]["type"], "user:joined");
    assert_eq!(received[0]["user_id"], "bob yjs");

    let (_carol, ack) = server.legacy(session, "carol").await;
    assert_eq!(listed(&ack), ["alice", "bob yjs", "carol"], "{ack}");
    assert_eq!(ack["is_host"], false);
    assert_eq!(recv_json(&mut alice).await["type"], "user:joined");

    named.close().await;
    let left = recv_json(&mut alice).await;
    assert_eq!(left["type"], "user:left", "{left}");
    assert_eq!(left["user_id"], "bob yjs");

    // Without ?user= the connection is nobody: no user:joined, no user:left. An awareness
    // state it sets is removed when it closes; once a watcher sees that removal, the session
    // has handled the close.
    let (mut watcher, _) = YClient::join(&server, &format!("/yjs/{session}")).await;
    let (mut anonymous, _) = YClient::join(&server, &format!("/yjs/{session}")).await;
    let anon_id = anonymous.doc.client_id().get();
    anonymous
        .send(Message::Awareness(awareness_update(&[(
            anon_id,
            1,
            "{\"x\":1}",
        )])))
        .await;
    let seen = watcher.next_awareness().await;
    assert_eq!(awareness_entries(&seen)[&anon_id].1, "{\"x\":1}");
    assert_eq!(
        ping_collect(&mut alice).await,
        Vec::<Value>::new(),
        "no user:joined"
    );
    anonymous.close().await;
    let removal = watcher.next_awareness().await;
    assert_eq!(awareness_entries(&removal)[&anon_id].1, "null");
    assert_eq!(
        ping_collect(&mut alice).await,
        Vec::<Value>::new(),
        "no user:left"
    );
    let (status, body) = server.get("/api/sessions").await;
    assert_eq!(status, 200);
    let sessions: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        sessions[0]["users"],
        json!(["alice", "carol"]),
        "{sessions}"
    );
}

#[tokio::test]
async fn malformed_frames_leave_the_connection_usable_and_the_document_unchanged() {
    let session = "yjs-malformed";
    let server = TestServer::start().await;
    let (mut alice, _) = server.settled(session, "alice").await;
    let (item_type, uuid, data) = fixture_item(2);
    send_json(
        &mut alice,
        &command("add_item", &item_type, &uuid, data, "alice"),
    )
    .await;
    assert_eq!(ping_collect(&mut alice).await, Vec::<Value>::new());
    let (mut bob, _) = YClient::join(&server, &format!("/yjs/{session}")).await;
    let before = server.get(&format!("/api/sessions/{session}/update")).await;
    let scene_before = scene_by_uuid(&server.scene(session).await);

    // A few of the frames the core's decoder refuses (all of them: `core/tests/bad_input.rs`):
    // empty, an unknown message type, an update with an impossible length.
    let frames: Vec<Vec<u8>> = vec![vec![], vec![9], vec![0, 2, 4, 0xff, 0xff, 0xff, 0x0f]];
    for frame in frames {
        bob.send_raw(frame).await;
    }
    bob.ws
        .send(WsMessage::text("not y-websocket"))
        .await
        .unwrap();

    // Still open and in sync; nothing was broadcast to anyone; the document is unchanged.
    let got = bob.sync().await;
    assert!(got.is_empty(), "{got:?}");
    assert_eq!(ping_collect(&mut alice).await, Vec::<Value>::new());
    assert_eq!(
        server.get(&format!("/api/sessions/{session}/update")).await,
        before
    );
    assert_eq!(scene_by_uuid(&server.scene(session).await), scene_before);

    // And it still works.
    let fields = json!({"x_mm": 3.0, "y_mm": 4.0, "angle_deg": 0.0, "text": "still here"});
    bob.edit_and_send(|txn, items| {
        items.insert(txn, "after-garbage", item_prelim("text", &fields));
    })
    .await;
    assert!(bob.sync().await.is_empty());
    let received = ping_collect(&mut alice).await;
    assert_eq!(
        commands(&received),
        [(
            "add_item".to_owned(),
            "after-garbage".to_owned(),
            "yjs".to_owned()
        )],
        "{received:#?}"
    );
}

#[tokio::test]
async fn user_param_is_percent_decoded_exactly_once() {
    // y-websocket encodes query values with encodeURIComponent: the name "ben%41" travels as
    // `ben%2541` and must arrive as "ben%41", not "benA"; "x%FF" must not be refused.
    let session = "yjs-user-decoding";
    let server = TestServer::start().await;
    let (mut alice, _) = server.settled(session, "alice").await;
    for (encoded, name) in [
        ("ben%2541", "ben%41"),
        ("x%25FF", "x%FF"),
        ("J%C3%BCrgen", "Jürgen"),
    ] {
        let (client, _) = YClient::join(&server, &format!("/yjs/{session}?user={encoded}")).await;
        let joined = recv_json(&mut alice).await;
        assert_eq!(joined["type"], "user:joined", "{joined}");
        assert_eq!(joined["user_id"], name, "?user={encoded}");
        client.close().await;
        let left = recv_json(&mut alice).await;
        assert_eq!(left["type"], "user:left", "{left}");
    }
}

/// Sends a raw HTTP request; returns the socket, what was read, and where the response head
/// ends in it (what follows are the first WebSocket frames, if upgraded).
async fn raw_request(
    addr: std::net::SocketAddr,
    request: &str,
) -> (tokio::net::TcpStream, Vec<u8>, usize) {
    use tokio::io::AsyncWriteExt;
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return (tcp, buf, i + 4);
        }
        read_more(&mut tcp, &mut buf, "the response head").await;
    }
}

/// Appends what `tcp` reads next to `buf`; panics if it ends first (waiting for `what`).
async fn read_more(tcp: &mut tokio::net::TcpStream, buf: &mut Vec<u8>, what: &str) {
    use tokio::io::AsyncReadExt;
    let mut chunk = [0u8; 4096];
    let n = tokio::time::timeout(PATIENCE, tcp.read(&mut chunk))
        .await
        .unwrap()
        .unwrap();
    assert!(n > 0, "the connection ended before {what}");
    buf.extend_from_slice(&chunk[..n]);
}

/// A raw WebSocket client that completes the handshake and then never writes (so it never
/// answers a ping): the server must ping it on `/yjs` and drop it.
#[tokio::test]
async fn a_peer_that_stops_answering_pings_is_dropped() {
    let mut config = test_config();
    config.yjs_ping_interval = std::time::Duration::from_millis(200);
    let server = TestServer::start_with(
        config,
        std::sync::Arc::new(optiverse_collab::store::memory::MemoryStore::new()),
    )
    .await;
    let request = format!(
        "GET /yjs/silent HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        server.addr
    );
    let (mut tcp, buf, head_end) = raw_request(server.addr, &request).await;
    assert!(String::from_utf8_lossy(&buf[..head_end]).starts_with("HTTP/1.1 101"));
    let mut frames = buf[head_end..].to_vec();
    // Read server frames (unmasked) until the close frame; never answer anything.
    let mut pings = 0;
    let close_code = loop {
        let mut parsed = None;
        if frames.len() >= 2 {
            let opcode = frames[0] & 0x0f;
            let (len, start) = match frames[1] & 0x7f {
                126 if frames.len() >= 4 => {
                    (u16::from_be_bytes([frames[2], frames[3]]) as usize, 4)
                }
                127 if frames.len() >= 10 => (
                    u64::from_be_bytes(frames[2..10].try_into().unwrap()) as usize,
                    10,
                ),
                n if n < 126 => (n as usize, 2),
                _ => (usize::MAX, 0),
            };
            if len != usize::MAX && frames.len() >= start + len {
                parsed = Some((opcode, frames[start..start + len].to_vec()));
                frames.drain(..start + len);
            }
        }
        match parsed {
            Some((0x9, _)) => pings += 1,
            Some((0x8, payload)) => break u16::from_be_bytes([payload[0], payload[1]]),
            Some(_) => {}
            None => read_more(&mut tcp, &mut frames, "a close frame").await,
        }
    };
    assert!(pings >= 1, "the server pinged before dropping the peer");
    assert_eq!(close_code, 1001);
}

/// A client that stops reading for a while gets everything, whole and in order, once it reads
/// again. The session writes straight into sockets; what a full socket does not take waits in
/// the outbox (a frame cut short is finished before the next one), below the 1013 bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_reader_gets_every_frame_whole_and_in_order() {
    // No catch-up (tests/slow_consumers.rs): every frame is queued and must arrive.
    let mut config = test_config();
    config.catch_up_bytes = config.max_queue_bytes;
    let server = TestServer::start_with(config, Arc::new(MemoryStore::new())).await;
    let (mut writer, _) = YClient::join(&server, "/yjs/paused").await;
    let (mut paused, _) = YClient::join(&server, "/yjs/paused").await;
    writer
        .edit_and_send(|txn, items| {
            items.insert(txn, "note-1", item_prelim("ruler", &json!({"name": ""})));
        })
        .await;
    let Message::Sync(SyncMessage::Update(first)) = paused.recv().await else {
        panic!("expected the new item");
    };
    paused.apply(&first);
    // 24 MiB while `paused` reads nothing: more than loopback socket buffers hold.
    const ROUNDS: usize = 24;
    let filler = "x".repeat(1 << 20);
    for round in 0..ROUNDS {
        writer
            .edit_and_send(|txn, items| {
                set_fields(
                    txn,
                    items,
                    "note-1",
                    &[("name", json!(format!("{round}:{filler}")))],
                );
            })
            .await;
    }
    // A cheap way to know the session handled them all: its answer to writer's SyncStep1.
    writer.sync().await;
    for round in 0..ROUNDS {
        let Message::Sync(SyncMessage::Update(update)) = paused.recv().await else {
            panic!("expected update {round}");
        };
        paused.apply(&update);
        let name = paused.item("note-1").unwrap()["name"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(
            name.starts_with(&format!("{round}:"))
                && name.len() == filler.len() + format!("{round}:").len(),
            "update {round} arrived out of order or cut: {}",
            &name[..name.len().min(20)]
        );
    }
}
