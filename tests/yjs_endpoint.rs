//! `/yjs/{session}` (PROTOCOL §5) with a `yrs` client over `tokio-tungstenite`, side by side
//! with Optiverse JSON clients: the sync handshake, updates in both directions, awareness,
//! `?user=`, and bad input.
//!
//! Ordering is established with the protocol itself, never with sleeps: a client's SyncStep1
//! is answered with SyncStep2 after everything the session sent it before, and a JSON client's
//! `ping` is answered after everything before it (see `YClient::sync` and `ping_collect`).

mod common;

use collab_core::doc::value::json_equal;

use std::collections::HashMap;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use yrs::sync::awareness::{AwarenessUpdate, AwarenessUpdateEntry};
use yrs::sync::{Awareness, Message, SyncMessage};
use yrs::types::ToJson;
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{
    Any, ClientID, Doc, Map, MapPrelim, MapRef, Out, ReadTxn, Transact, TransactionMut, Update,
};

/// The default `--max-awareness-bytes`.
const MAX_AWARENESS_BYTES: usize = 64 * 1024;

/// A y-websocket client: a yrs document and its connection.
struct YClient {
    ws: Ws,
    doc: Doc,
    items: MapRef,
}

impl YClient {
    /// Opens the connection without any handshake.
    async fn connect_with(server: &TestServer, path: &str, doc: Doc) -> YClient {
        let ws = server.connect(path).await;
        let items = doc.get_or_insert_map("items");
        YClient { ws, doc, items }
    }

    /// Connects and runs the handshake; returns what came besides the sync messages.
    async fn join(server: &TestServer, path: &str) -> (YClient, Vec<Message>) {
        let mut client = YClient::connect_with(server, path, Doc::new()).await;
        let others = client.handshake().await;
        (client, others)
    }

    /// The next frame, decoded; panics on a text frame, a close or an undecodable frame.
    async fn recv(&mut self) -> Message {
        let msg = recv(&mut self.ws).await;
        let WsMessage::Binary(bytes) = msg else {
            panic!("/yjs sent a non-binary frame: {msg:?}");
        };
        Message::decode_v1(&bytes)
            .unwrap_or_else(|e| panic!("undecodable y-websocket frame {bytes:?}: {e}"))
    }

    async fn send(&mut self, msg: Message) {
        self.send_raw(msg.encode_v1()).await;
    }

    async fn send_raw(&mut self, bytes: Vec<u8>) {
        self.ws.send(WsMessage::binary(bytes)).await.unwrap();
    }

    /// The y-websocket handshake as a client does it: the server's SyncStep1 comes first and
    /// is answered with SyncStep2 (what the server lacks), then our SyncStep1 gets the
    /// server's SyncStep2. Returns the other messages that arrived meanwhile.
    async fn handshake(&mut self) -> Vec<Message> {
        let first = self.recv().await;
        let Message::Sync(SyncMessage::SyncStep1(sv)) = first else {
            panic!("the first frame on /yjs must be the server's SyncStep1, got {first:?}");
        };
        let diff = self.doc.transact().encode_state_as_update_v1(&sv);
        self.send(Message::Sync(SyncMessage::SyncStep2(diff))).await;
        self.sync().await
    }

    /// Sends SyncStep1 and applies every update until the server's SyncStep2 (applied too).
    /// Returns the messages that came before the SyncStep2: everything the session had sent
    /// this connection before handling the SyncStep1.
    async fn sync(&mut self) -> Vec<Message> {
        let sv = self.doc.transact().state_vector();
        self.send(Message::Sync(SyncMessage::SyncStep1(sv))).await;
        let mut before = Vec::new();
        loop {
            match self.recv().await {
                Message::Sync(SyncMessage::SyncStep2(update)) => {
                    self.apply(&update);
                    return before;
                }
                Message::Sync(SyncMessage::Update(update)) => {
                    self.apply(&update);
                    before.push(Message::Sync(SyncMessage::Update(update)));
                }
                other => before.push(other),
            }
        }
    }

    fn apply(&self, update: &[u8]) {
        let update = Update::decode_v1(update).expect("the server's update decodes");
        self.doc
            .transact_mut()
            .apply_update(update)
            .expect("the server's update applies");
    }

    /// Makes a change in one transaction and returns its update.
    fn edit(&self, f: impl FnOnce(&mut TransactionMut, &MapRef)) -> Vec<u8> {
        let mut txn = self.doc.transact_mut();
        f(&mut txn, &self.items);
        txn.encode_update_v1()
    }

    /// Makes a change and sends it as a sync Update.
    async fn edit_and_send(&mut self, f: impl FnOnce(&mut TransactionMut, &MapRef)) {
        let update = self.edit(f);
        self.send(Message::Sync(SyncMessage::Update(update))).await;
    }

    /// The next awareness update (sync updates on the way are applied).
    async fn next_awareness(&mut self) -> AwarenessUpdate {
        loop {
            match self.recv().await {
                Message::Awareness(update) => return update,
                Message::Sync(SyncMessage::Update(update)) => self.apply(&update),
                other => panic!("expected an awareness update, got {other:?}"),
            }
        }
    }

    /// An item of the document as JSON.
    fn item(&self, uuid: &str) -> Option<Value> {
        let txn = self.doc.transact();
        match self.items.get(&txn, uuid)? {
            Out::YMap(item) => Some(any_to_value(&item.to_json(&txn))),
            other => panic!("items[{uuid}] is not a map: {other:?}"),
        }
    }

    /// Closes the connection and waits for the server's close frame.
    async fn close(mut self) {
        self.ws.close(None).await.unwrap();
        while let Ok(Some(Ok(_))) = tokio::time::timeout(PATIENCE, self.ws.next()).await {}
    }
}

fn any_to_value(any: &Any) -> Value {
    let mut text = String::new();
    any.to_json(&mut text);
    serde_json::from_str(&text).unwrap()
}

fn value_to_any(value: &Value) -> Any {
    Any::from_json(&value.to_string()).unwrap()
}

/// The fields of `data` as a yrs map to insert.
fn item_prelim(item_type: &str, data: &Value) -> MapPrelim {
    let mut fields: Vec<(String, Any)> = data
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), value_to_any(v)))
        .collect();
    fields.push(("item_type".into(), Any::from(item_type)));
    MapPrelim::from_iter(fields)
}

fn set_fields(txn: &mut TransactionMut, items: &MapRef, uuid: &str, fields: &[(&str, Value)]) {
    let Some(Out::YMap(item)) = items.get(txn, uuid) else {
        panic!("no item {uuid} in the yrs document");
    };
    for (field, value) in fields {
        item.insert(txn, *field, value_to_any(value));
    }
}

fn assert_same(actual: &Value, expected: &Value, context: &str) {
    assert!(
        json_equal(actual, expected),
        "{context}:\n  got      {actual}\n  expected {expected}"
    );
}

/// `data` plus its `item_type`, as the document holds an item added by `add_item`.
fn with_type(data: &Value, item_type: &str) -> Value {
    let mut data = data.clone();
    data["item_type"] = json!(item_type);
    data
}

/// The commands among `messages`, as (action, item id, user).
fn commands(messages: &[Value]) -> Vec<(String, String, String)> {
    messages
        .iter()
        .filter(|m| m["type"] == "command")
        .map(|m| {
            (
                m["command"]["action"].as_str().unwrap().to_owned(),
                m["command"]["item_id"].as_str().unwrap().to_owned(),
                m["user_id"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

fn awareness_update(entries: &[(u64, u32, &str)]) -> AwarenessUpdate {
    AwarenessUpdate {
        clients: entries
            .iter()
            .map(|(client, clock, json)| {
                (
                    ClientID::new(*client),
                    AwarenessUpdateEntry {
                        clock: *clock,
                        json: (*json).into(),
                    },
                )
            })
            .collect(),
    }
}

/// The entries of an awareness update, keyed by client id.
fn entries(update: &AwarenessUpdate) -> HashMap<u64, (u32, String)> {
    update
        .clients
        .iter()
        .map(|(id, e)| (id.get(), (e.clock, e.json.to_string())))
        .collect()
}

#[tokio::test]
async fn sync_handshake_and_updates_both_ways() {
    let session = "yjs-sync";
    let server = TestServer::start().await;
    let (mut alice, _) = server.legacy(session, "alice").await;
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
    let served = Doc::new();
    served
        .transact_mut()
        .apply_update(Update::decode_v1(&body).unwrap())
        .unwrap();
    assert_eq!(
        served.transact().state_vector(),
        bob.doc.transact().state_vector()
    );
}

#[tokio::test]
async fn updates_from_one_yrs_client_reach_the_others() {
    let session = "yjs-fanout";
    let server = TestServer::start().await;
    let (mut a, _) = YClient::join(&server, &format!("/yjs/{session}")).await;
    let (mut b, _) = YClient::join(&server, &format!("/yjs/{session}")).await;
    let mut json_yjs = server
        .connect(&format!("/ws/{session}/opted-in?yjs=1"))
        .await;
    assert_eq!(recv_json(&mut json_yjs).await["type"], "connection:ack");
    let data = json!({"x_mm": 1.0, "y_mm": 2.0, "angle_deg": 0.0, "name": "M1"});
    a.edit_and_send(|txn, items| {
        items.insert(txn, "m1", item_prelim("component", &data));
    })
    .await;
    // Once a's SyncStep1 is answered, its update was handled and relayed to b.
    assert!(a.sync().await.is_empty(), "no echo to the sender");
    let got = b.sync().await;
    assert!(
        matches!(got.as_slice(), [Message::Sync(SyncMessage::Update(_))]),
        "{got:?}"
    );
    assert_same(
        &b.item("m1").unwrap(),
        &with_type(&data, "component"),
        "b's copy",
    );
    // A `/ws?yjs=1` connection gets the Update as a binary frame too.
    let update = loop {
        match recv(&mut json_yjs).await {
            WsMessage::Binary(bytes) => match Message::decode_v1(&bytes).unwrap() {
                Message::Sync(SyncMessage::Update(update)) => break update,
                _ => continue,
            },
            _ => continue,
        }
    };
    let copy = Doc::new();
    let items = copy.get_or_insert_map("items");
    copy.transact_mut()
        .apply_update(Update::decode_v1(&update).unwrap())
        .unwrap();
    assert!(items.get(&copy.transact(), "m1").is_some());
}

#[tokio::test]
async fn awareness_reaches_everyone_and_leaves_with_the_connection() {
    let session = "yjs-awareness";
    let server = TestServer::start().await;
    let (mut alice_json, _) = server.legacy(session, "alice").await;
    let (mut a, _) = YClient::join(&server, &format!("/yjs/{session}")).await;
    let (mut b, _) = YClient::join(&server, &format!("/yjs/{session}")).await;

    // A's state, made with yrs' Awareness, reaches B and comes back to A itself.
    let mut a_awareness = Awareness::new(a.doc.clone());
    a_awareness
        .set_local_state(
            json!({"user": {"name": "a", "color": "#DC143C"}, "cursor": {"x_mm": 1.5}}),
        )
        .unwrap();
    let a_id = a.doc.client_id().get();
    a.send(Message::Awareness(a_awareness.update().unwrap()))
        .await;
    let mut b_awareness = Awareness::new(b.doc.clone());
    let at_b = b.next_awareness().await;
    assert_eq!(entries(&at_b).keys().collect::<Vec<_>>(), [&a_id]);
    b_awareness.apply_update(at_b).unwrap();
    let state: Value = b_awareness.state(ClientID::new(a_id)).unwrap();
    assert_eq!(state["user"]["name"], "a");
    assert_eq!(state["cursor"]["x_mm"], 1.5);
    let echo = a.next_awareness().await;
    assert_eq!(
        entries(&echo),
        entries(&a_awareness.update().unwrap()),
        "the sender gets its own update"
    );

    // A third client gets the states on connect, right after the server's SyncStep1.
    let mut c = YClient::connect_with(&server, &format!("/yjs/{session}"), Doc::new()).await;
    let others = c.handshake().await;
    let initial: Vec<_> = others
        .iter()
        .map(|m| match m {
            Message::Awareness(update) => entries(update),
            other => panic!("expected awareness states, got {other:?}"),
        })
        .collect();
    assert_eq!(initial, [entries(&a_awareness.update().unwrap())]);

    // Query awareness is answered with all states.
    b.send(Message::AwarenessQuery).await;
    let answer = b.next_awareness().await;
    assert_eq!(entries(&answer), entries(&a_awareness.update().unwrap()));

    // Awareness is for Yjs connections only.
    assert_eq!(ping_collect(&mut alice_json).await, Vec::<Value>::new());

    // A closes: B and C get its removal ("null" at its clock, as y-protocols removes states).
    let clock = a_awareness.meta(ClientID::new(a_id)).unwrap().0;
    a.close().await;
    for client in [&mut b, &mut c] {
        let removal = client.next_awareness().await;
        let entries = entries(&removal);
        assert_eq!(entries.len(), 1, "{entries:?}");
        let (removed_clock, json) = &entries[&a_id];
        assert_eq!(json, "null");
        assert_eq!(*removed_clock, clock);
    }
    b.send(Message::AwarenessQuery).await;
    assert!(
        b.sync().await.is_empty(),
        "no states left, so a query gets no answer"
    );
}

#[tokio::test]
async fn user_param_puts_the_connection_in_the_user_list() {
    let session = "yjs-users";
    let server = TestServer::start().await;
    let (mut alice, _) = server.legacy(session, "alice").await;

    let (named, _) = YClient::join(&server, &format!("/yjs/{session}?user=bob%20yjs")).await;
    let received = ping_collect(&mut alice).await;
    assert_eq!(received.len(), 1, "{received:#?}");
    assert_eq!(received[0]["type"], "user:joined");
    assert_eq!(received[0]["user_id"], "bob yjs");

    let (_carol, ack) = server.legacy(session, "carol").await;
    let users: Vec<&str> = ack["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["user_id"].as_str().unwrap())
        .collect();
    assert_eq!(users, ["alice", "bob yjs", "carol"], "{ack}");
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
    assert_eq!(entries(&seen)[&anon_id].1, "{\"x\":1}");
    assert_eq!(
        ping_collect(&mut alice).await,
        Vec::<Value>::new(),
        "no user:joined"
    );
    anonymous.close().await;
    let removal = watcher.next_awareness().await;
    assert_eq!(entries(&removal)[&anon_id].1, "null");
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
    let (mut alice, _) = server.legacy(session, "alice").await;
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

    // A real update, cut short.
    let probe = Doc::new();
    let probe_items = probe.get_or_insert_map("items");
    let truncated = {
        let mut txn = probe.transact_mut();
        probe_items.insert(
            &mut txn,
            "truncated",
            MapPrelim::from([("x_mm", Any::from(1.0))]),
        );
        let update = txn.encode_update_v1();
        let mut frame = Message::Sync(SyncMessage::Update(update.clone())).encode_v1();
        frame.truncate(frame.len() - 3);
        frame
    };
    let frames: Vec<Vec<u8>> = vec![
        vec![],
        vec![9],
        vec![0],
        vec![0, 7, 0],
        vec![0, 2, 4, 0xff, 0xff, 0xff, 0x0f],
        vec![0, 2, 10, 1],
        vec![0, 1, 3, 0xff, 0xff, 0xff],
        vec![0, 0, 8, 0xff, 0xff, 0xff, 0xff, 0x0f, 0, 0, 0],
        vec![1, 5, 0xff, 0xff, 0xff, 0xff, 0x0f],
        vec![0xff; 11],
        truncated,
    ];
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
async fn oversize_awareness_state_is_rejected_and_not_broadcast() {
    let session = "yjs-awareness-size";
    let server = TestServer::start().await;
    let (mut a, _) = YClient::join(&server, &format!("/yjs/{session}")).await;
    let (mut b, _) = YClient::join(&server, &format!("/yjs/{session}")).await;
    let id = a.doc.client_id().get();
    let state = |len: usize| {
        let json = format!("{{\"b\":\"{}\"}}", "x".repeat(len - 8));
        assert_eq!(json.len(), len);
        json
    };

    // One byte over the limit: refused, sent to nobody, the connection stays.
    let too_big = state(MAX_AWARENESS_BYTES + 1);
    a.send(Message::Awareness(awareness_update(&[(
        id,
        1,
        too_big.as_str(),
    )])))
    .await;
    // Exactly at the limit: accepted and broadcast to both.
    let at_limit = state(MAX_AWARENESS_BYTES);
    a.send(Message::Awareness(awareness_update(&[(
        id,
        2,
        at_limit.as_str(),
    )])))
    .await;
    for client in [&mut b, &mut a] {
        let got = entries(&client.next_awareness().await);
        assert_eq!(got.len(), 1);
        let (clock, json) = &got[&id];
        assert_eq!(
            *clock, 2,
            "the oversize state (clock 1) must not be broadcast"
        );
        assert_eq!(json.len(), MAX_AWARENESS_BYTES);
    }
    // An oversize state next to a valid one refuses the whole update.
    let small = "{\"ok\":true}";
    a.send(Message::Awareness(awareness_update(&[
        (id, 3, too_big.as_str()),
        (id + 1, 1, small),
    ])))
    .await;
    a.send(Message::Awareness(awareness_update(&[(id, 4, small)])))
        .await;
    let got = entries(&b.next_awareness().await);
    assert_eq!(got, HashMap::from([(id, (4, small.to_owned()))]));
    b.send(Message::AwarenessQuery).await;
    let all = entries(&b.next_awareness().await);
    assert_eq!(all, HashMap::from([(id, (4, small.to_owned()))]));
    // The sender got back only the update that was accepted.
    let echoes: Vec<_> = a
        .sync()
        .await
        .iter()
        .map(|m| match m {
            Message::Awareness(update) => entries(update),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(echoes, [HashMap::from([(id, (4, small.to_owned()))])]);
}

#[tokio::test]
async fn user_param_is_percent_decoded_exactly_once() {
    // y-websocket encodes query values with encodeURIComponent: the name "ben%41" travels as
    // `ben%2541` and must arrive as "ben%41", not "benA"; "x%FF" must not be refused.
    let session = "yjs-user-decoding";
    let server = TestServer::start().await;
    let (mut alice, _) = server.legacy(session, "alice").await;
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

/// Fresh clients are answered from a cached encoding of the whole document; a change in
/// between must reach the next fresh client all the same.
#[tokio::test]
async fn fresh_clients_get_the_current_state_before_and_after_a_change() {
    let session = "yjs-state-cache";
    let path = format!("/yjs/{session}");
    let server = TestServer::start().await;
    let (mut a, _) = YClient::join(&server, &path).await;
    let first = json!({"x_mm": 1.0, "y_mm": 2.0, "angle_deg": 0.0});
    a.edit_and_send(|txn, items| {
        items.insert(txn, "m1", item_prelim("component", &first));
    })
    .await;
    a.sync().await;
    for round in 0..2 {
        let (b, _) = YClient::join(&server, &path).await;
        let (c, _) = YClient::join(&server, &path).await;
        for (name, joiner) in [("b", &b), ("c", &c)] {
            assert_eq!(
                joiner.doc.transact().state_vector(),
                a.doc.transact().state_vector(),
                "round {round}: {name}'s state"
            );
            assert_same(
                &joiner.item("m1").unwrap(),
                &a.item("m1").unwrap(),
                &format!("round {round}: {name}'s m1"),
            );
        }
        a.edit_and_send(|txn, items| {
            set_fields(txn, items, "m1", &[("x_mm", json!(10.0 + round as f64))]);
        })
        .await;
        a.sync().await;
    }
}

/// A client that stops reading for a while gets everything, whole and in order, once it reads
/// again. The session writes straight into sockets; what a full socket does not take waits in
/// the outbox (a frame cut short is finished before the next one), below the 1013 bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_reader_gets_every_frame_whole_and_in_order() {
    let server = TestServer::start().await;
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
