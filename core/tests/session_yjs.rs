//! The document as Yjs (PROTOCOL §4, §5): the `?yjs=1` ack and handshake, changes crossing
//! between desktop clients and Yjs speakers, HTTP updates, the whole state a fresh client is
//! answered with, and awareness (who gets it, when it goes).

mod common;

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine as _;
use collab_core::session::{ConnKind, SessionLimits, AWARENESS_TIMEOUT, CLOSE_SLOW};
use common::*;
use serde_json::{json, Value};
use yrs::sync::{Message, SyncMessage};
use yrs::updates::decoder::Decode;
use yrs::{Doc, Map as _, ReadTxn, StateVector, Transact};

/// Splits what a `?yjs=1` connection received into its JSON and its y-websocket messages.
fn split(got: Vec<Received>) -> (Vec<Value>, Vec<Message>) {
    let mut json = Vec::new();
    let mut yjs = Vec::new();
    for received in got {
        match received {
            Received::Json(v) => json.push(v),
            Received::Yjs(m) => yjs.push(m),
        }
    }
    (json, yjs)
}

/// Applies the sync updates among `msgs` to `doc`; panics on anything else.
fn apply_all(doc: &Doc, msgs: &[Message]) {
    for msg in msgs {
        match msg {
            Message::Sync(SyncMessage::Update(u)) | Message::Sync(SyncMessage::SyncStep2(u)) => {
                apply_update(doc, u)
            }
            other => panic!("expected a document update, got {other:?}"),
        }
    }
}

/// The awareness updates among `msgs`, as entries; panics on anything else.
fn awareness_of(msgs: &[Message]) -> Vec<HashMap<u64, (u32, String)>> {
    msgs.iter()
        .map(|m| match m {
            Message::Awareness(update) => awareness_entries(update),
            other => panic!("expected awareness, got {other:?}"),
        })
        .collect()
}

/// A `/yjs` client's handshake: answers the server's SyncStep1 (the first message it got)
/// with what the server lacks, asks with its own state vector, and applies the answer.
/// Returns its document.
fn yjs_client(world: &mut World, peer: u64, first: &[Message], doc: Doc) -> Doc {
    let Some(Message::Sync(SyncMessage::SyncStep1(sv))) = first.first() else {
        panic!("the server's first message is its SyncStep1: {first:?}");
    };
    let lacking = doc.transact().encode_state_as_update_v1(sv);
    world.send_yjs(peer, Message::Sync(SyncMessage::SyncStep2(lacking)));
    let own = state_vector(&doc);
    world.send_yjs(peer, Message::Sync(SyncMessage::SyncStep1(own)));
    let got = world.take_yjs(peer);
    apply_all(&doc, &got);
    assert!(
        matches!(got.last(), Some(Message::Sync(SyncMessage::SyncStep2(_)))),
        "the SyncStep1 is answered with SyncStep2: {got:?}"
    );
    doc
}

#[test]
fn a_ws_yjs_joiner_gets_the_ack_with_the_document_then_sync_step1() {
    let mut world = World::new();
    let (jay, _) = world.settled("jay");
    let (t1, u1, d1) = fixture_item(1);
    let (t0, u0, d0) = fixture_item(0);
    world.send(jay, command("add_item", &t1, &u1, d1.clone(), "jay"));
    world.send(jay, command("add_item", &t0, &u0, d0.clone(), "jay"));

    let yuki = world.join(ConnKind::LegacyYjs, Some("yuki"));
    let (json, yjs) = split(world.take(yuki));
    // No `user:joined` naming itself: that is for the desktop client's host logic on /ws.
    let ack = only(&json);
    assert_eq!(ack["type"], "connection:ack");
    assert_eq!(ack["user_id"], "yuki");
    assert_eq!(ack["is_host"], false);
    let b64 = base64::engine::general_purpose::STANDARD;
    let snapshot = ack["snapshot"].as_str().expect("a snapshot");
    assert_eq!(snapshot.len() % 4, 0, "padded base64");
    let doc = doc_from(&b64.decode(snapshot).expect("standard base64"));
    // (yrs writes a whole float without its `.0`: compared as numbers.)
    let item =
        |uuid: &str| doc_item(&doc, uuid).unwrap_or_else(|| panic!("{uuid} in the snapshot"));
    assert_same(
        &item(&u1),
        &with_type(&d1, &t1),
        "the snapshot's first item",
    );
    assert_same(
        &item(&u0),
        &with_type(&d0, &t0),
        "the snapshot's second item",
    );
    let sv = b64
        .decode(ack["state_vector"].as_str().expect("a state vector"))
        .expect("standard base64");
    let sv = StateVector::decode_v1(&sv).expect("a v1 state vector");
    assert_eq!(sv, state_vector(&doc), "the snapshot's state vector");
    // The first binary message is the server's SyncStep1, with the same state vector.
    match yjs.as_slice() {
        [Message::Sync(SyncMessage::SyncStep1(server_sv))] => assert_eq!(*server_sv, sv),
        other => panic!("expected one SyncStep1 after the ack, got {other:?}"),
    }
    assert_eq!(
        summary(&world.ping(jay)),
        [("user:joined".into(), "yuki".into())]
    );

    // A /yjs connection gets the SyncStep1 alone: no JSON.
    let (_, first) = world.yjs(None);
    assert!(
        matches!(first.as_slice(), [Message::Sync(SyncMessage::SyncStep1(s))] if *s == sv),
        "{first:?}"
    );
}

/// PROTOCOL §4: a `?yjs=1` connection gets the document as Yjs only: no `sync:full_state`
/// (asked for or not) and no commands.
#[test]
fn a_json_change_reaches_yjs_speakers_as_one_update_and_never_as_json() {
    let mut world = World::new();
    let (jay, _) = world.settled("jay");
    let (t3, u3, d3) = fixture_item(3);
    world.send(jay, command("add_item", &t3, &u3, d3, "jay"));
    let yuki = world.join(ConnKind::LegacyYjs, Some("yuki"));
    let (_, first) = split(world.take(yuki));
    let yuki_doc = yjs_client(&mut world, yuki, &first, Doc::new());
    let (anon, first) = world.yjs(None);
    let anon_doc = yjs_client(&mut world, anon, &first, Doc::new());
    world.send(yuki, json!({"type": "sync:request", "user_id": "yuki"}));
    world.ping(jay);

    let (t2, u2, d2) = fixture_item(2);
    world.send(jay, command("add_item", &t2, &u2, d2.clone(), "jay"));
    let (json, yjs) = split(world.take(yuki));
    assert!(
        json.is_empty(),
        "no full state, no command on ?yjs=1: {json:#?}"
    );
    assert!(
        matches!(yjs.as_slice(), [Message::Sync(SyncMessage::Update(_))]),
        "one Update per change: {yjs:?}"
    );
    apply_all(&yuki_doc, &yjs);
    assert_same(
        &doc_item(&yuki_doc, &u2).expect("the new item"),
        &with_type(&d2, &t2),
        "the item as the Update carries it",
    );
    let to_anon = world.take_yjs(anon);
    assert_eq!(to_anon, yjs, "the same Update to every Yjs speaker");
    apply_all(&anon_doc, &to_anon);
    assert_eq!(doc_items(&anon_doc), doc_items(&world.doc()));
    assert!(world.ping(jay).is_empty(), "no echo to the desktop client");
}

/// Desktop client `jay` has added fixture item 1; `yuki` (`?yjs=1`) has synced it into its
/// document. Returns them with the item (type, uuid, data).
fn desktop_and_yjs_on_an_item() -> (World, u64, u64, Doc, (String, String, Value)) {
    let mut world = World::new();
    let (jay, _) = world.settled("jay");
    let (t1, u1, d1) = fixture_item(1);
    world.send(jay, command("add_item", &t1, &u1, d1.clone(), "jay"));
    let yuki = world.join(ConnKind::LegacyYjs, Some("yuki"));
    let (_, first) = split(world.take(yuki));
    let doc = yjs_client(&mut world, yuki, &first, Doc::new());
    (world, jay, yuki, doc, (t1, u1, d1))
}

#[test]
fn a_yjs_update_reaches_desktop_clients_as_commands_and_other_yjs_speakers_as_itself() {
    let (mut world, jay, yuki, doc, (t1, u1, d1)) = desktop_and_yjs_on_an_item();
    let (watcher, first) = world.yjs(None);
    let watcher_doc = yjs_client(&mut world, watcher, &first, Doc::new());
    let (anon, first) = world.yjs(None);
    let anon_doc = yjs_client(&mut world, anon, &first, Doc::new());
    world.ping(jay);

    // A change of x_mm and one of another field: an update_item each, with the whole data,
    // under the connection's user name.
    let mut expected = with_type(&d1, &t1);
    for (field, value) in [("x_mm", json!(77.5)), ("name", json!("Lens (from Yjs)"))] {
        let update = edit(&doc, |txn, items| {
            set_fields(txn, items, &u1, &[(field, value.clone())])
        });
        world.send_yjs(yuki, Message::Sync(SyncMessage::Update(update)));
        expected[field] = value;
        let to_jay = world.ping(jay);
        let msg = only(&to_jay);
        assert_eq!(msg["command"]["action"], "update_item", "{field}: {msg}");
        assert_eq!(msg["command"]["item_id"], json!(u1));
        assert_eq!(msg["user_id"], "yuki");
        assert_same(
            &msg["command"]["data"],
            &expected,
            &format!("the whole item after the change of {field}"),
        );
        assert!(
            world.take(yuki).is_empty(),
            "no echo, no error to the sender"
        );
        apply_all(&watcher_doc, &world.take_yjs(watcher));
        apply_all(&anon_doc, &world.take_yjs(anon));
    }
    assert_eq!(doc_items(&watcher_doc), doc_items(&doc));

    // A new item from an anonymous connection: add_item (and its placeholder fix) as "yjs".
    let data = json!({"item_uuid": "from-yjs", "x_mm": 5.0, "y_mm": 6.0, "angle_deg": 0.0});
    let update = edit(&anon_doc, |txn, items| {
        items.insert(txn, "from-yjs", item_prelim("source", &data));
    });
    world.send_yjs(anon, Message::Sync(SyncMessage::Update(update)));
    let to_jay = world.ping(jay);
    assert_eq!(
        commands(&to_jay),
        [
            ("add_item".into(), "from-yjs".into(), "yjs".into()),
            ("update_item".into(), "from-yjs".into(), "yjs".into()),
        ]
    );
    assert_same(
        &to_jay[0]["command"]["data"],
        &with_type(&data, "source"),
        "the new item's data",
    );
    assert_eq!(fold_fixes(&to_jay).len(), 1);
    assert!(world.take(anon).is_empty(), "no echo to the sender");
    apply_all(&doc, &world.take_yjs(yuki));
    apply_all(&watcher_doc, &world.take_yjs(watcher));
    assert_eq!(doc_items(&doc), doc_items(&world.stored_doc()));
    assert_eq!(doc_items(&watcher_doc), doc_items(&world.stored_doc()));
}

/// What a Yjs client held before it connected reaches the session in its SyncStep2, and the
/// desktop clients as commands.
#[test]
fn an_offline_edit_travels_in_the_clients_sync_step2() {
    let mut world = World::new();
    let (alice, _) = world.settled("alice");
    let (t0, u0, d0) = fixture_item(0);
    let offline = Doc::new();
    items(&offline).insert(
        &mut offline.transact_mut(),
        u0.as_str(),
        item_prelim(&t0, &d0),
    );
    let (bob, first) = world.yjs(Some("bob"));
    yjs_client(&mut world, bob, &first, offline);
    let to_alice = world.ping(alice);
    assert_eq!(summary(&to_alice)[0], ("user:joined".into(), "bob".into()));
    let to_alice = fold_fixes(&to_alice[1..]);
    let add = only(&to_alice);
    assert_eq!(add["command"]["action"], "add_item");
    assert_eq!(add["user_id"], "bob");
    assert_same(
        &add["command"]["data"],
        &with_type(&d0, &t0),
        "the offline item",
    );
    assert!(world.session.initialized());
}

#[test]
fn an_http_update_reaches_every_client_as_its_own_kind_of_message() {
    let mut world = World::new();
    let (a, _) = world.legacy("a");
    let (t, u, d) = fixture_item(9);
    world.send(a, command("add_item", &t, &u, d.clone(), "a"));
    let (y, first) = world.yjs(None);
    let ydoc = yjs_client(&mut world, y, &first, Doc::new());
    world.ping(a);

    let served = world.doc();
    let update = edit(&served, |txn, items| {
        set_fields(txn, items, &u, &[("y_mm", json!(3.25))])
    });
    world.api_update(&update).expect("the update is taken");
    let to_a = world.ping(a);
    let msg = only(&to_a);
    assert_eq!(msg["command"]["action"], "update_item");
    assert_eq!(msg["user_id"], "api");
    let mut expected = expected_item(&d, &t);
    expected["y_mm"] = json!(3.25);
    assert_eq!(normalize(&msg["command"]["data"]), expected);
    apply_all(&ydoc, &world.take_yjs(y));
    assert_eq!(doc_item(&ydoc, &u).unwrap()["y_mm"], json!(3.25));
    assert_eq!(world.items()[&u], expected);
    assert_eq!(doc_items(&world.stored_doc()), doc_items(&world.doc()));

    // An update that changes nothing stores and sends nothing.
    let stored = world.persisted.len();
    world
        .api_update(&update)
        .expect("a repeated update is taken");
    assert_eq!(world.persisted.len(), stored);
    world.assert_quiet();
}

/// A fresh client (an empty state vector) is answered with the whole document, encoded once
/// and kept until the document changes: a change in between reaches the next fresh client.
#[test]
fn fresh_clients_get_the_current_state_before_and_after_a_change() {
    let mut world = World::new();
    let (writer, first) = world.yjs(None);
    let writer_doc = yjs_client(&mut world, writer, &first, Doc::new());
    let first_item = json!({"x_mm": 1.0, "y_mm": 2.0, "angle_deg": 0.0});
    let update = edit(&writer_doc, |txn, items| {
        items.insert(txn, "m1", item_prelim("component", &first_item));
    });
    world.send_yjs(writer, Message::Sync(SyncMessage::Update(update)));
    for round in 0..2 {
        for _ in 0..2 {
            let (fresh, first) = world.yjs(None);
            let doc = yjs_client(&mut world, fresh, &first, Doc::new());
            assert_eq!(
                state_vector(&doc),
                state_vector(&writer_doc),
                "round {round}"
            );
            assert_eq!(doc_items(&doc), doc_items(&writer_doc), "round {round}");
        }
        let update = edit(&writer_doc, |txn, items| {
            set_fields(
                txn,
                items,
                "m1",
                &[("x_mm", json!(10.0 + f64::from(round)))],
            );
        });
        world.send_yjs(writer, Message::Sync(SyncMessage::Update(update)));
        for peer in world.conns.keys().copied().collect::<Vec<_>>() {
            world.take(peer);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Awareness
// ---------------------------------------------------------------------------------------------

fn awareness(entries: &[(u64, u32, &str)]) -> Message {
    Message::Awareness(awareness_update(entries))
}

#[test]
fn awareness_reaches_every_yjs_speaker_and_leaves_with_its_connection() {
    let mut world = World::new();
    let (alice, _) = world.legacy("alice");
    let (a, _) = world.yjs(None);
    let (b, _) = world.yjs(None);
    let yuki = world.join(ConnKind::LegacyYjs, Some("yuki"));
    world.take(yuki);
    world.ping(alice);

    let state = r#"{"user":{"name":"a"},"cursor":{"x_mm":1.5}}"#;
    world.send_yjs(a, awareness(&[(11, 1, state)]));
    let expected = HashMap::from([(11, (1, state.to_owned()))]);
    // Everyone speaking Yjs gets it, the sender included (y-protocols expects its echo).
    for peer in [a, b, yuki] {
        let got = split(world.take(peer)).1;
        assert_eq!(
            awareness_of(&got),
            std::slice::from_ref(&expected),
            "connection {peer}"
        );
    }
    assert!(
        world.ping(alice).is_empty(),
        "awareness is for Yjs speakers only"
    );

    // A later joiner gets the states right after the server's SyncStep1; a query is
    // answered with them.
    let (c, first) = world.yjs(None);
    assert!(matches!(first[0], Message::Sync(SyncMessage::SyncStep1(_))));
    assert_eq!(awareness_of(&first[1..]), std::slice::from_ref(&expected));
    world.send_yjs(b, Message::AwarenessQuery);
    assert_eq!(awareness_of(&world.take_yjs(b)), [expected]);

    // An update with an older clock changes nothing and is sent to nobody.
    world.send_yjs(a, awareness(&[(11, 0, r#"{"stale":true}"#)]));
    world.assert_quiet();

    // a leaves: the others get its removal ("null" at its clock, as y-protocols removes).
    world.leave(a);
    for peer in [b, c, yuki] {
        let got = split(world.take(peer)).1;
        assert_eq!(
            awareness_of(&got),
            [HashMap::from([(11, (1, "null".to_owned()))])],
            "connection {peer}"
        );
    }
    world.send_yjs(b, Message::AwarenessQuery);
    assert!(
        world.take(b).is_empty(),
        "no states left: a query gets no answer"
    );
    assert_eq!(
        world.session.next_deadline(),
        None,
        "nothing left to expire"
    );
}

/// A state not renewed within [`AWARENESS_TIMEOUT`] is removed at a tick; a renewed one stays.
#[test]
fn an_awareness_state_not_renewed_expires() {
    let mut world = World::new();
    let (a, _) = world.yjs(None);
    let (b, _) = world.yjs(None);
    world.send_yjs(a, awareness(&[(1, 1, "{}")]));
    world.send_yjs(b, awareness(&[(2, 1, "{}")]));
    for peer in [a, b] {
        world.take(peer);
    }
    let start = world.instant();
    // b renews its state well within the timeout; a does not.
    world.advance(AWARENESS_TIMEOUT / 2);
    world.send_yjs(b, awareness(&[(2, 2, "{}")]));
    for peer in [a, b] {
        world.take(peer);
    }
    let mut removals = Vec::new();
    while removals.is_empty() {
        world.tick_at_deadline();
        assert!(
            world.instant() - start <= AWARENESS_TIMEOUT + Duration::from_secs(5),
            "a's state outlived the timeout"
        );
        removals = world.take_yjs(b);
        if !removals.is_empty() {
            assert!(
                world.instant() - start >= AWARENESS_TIMEOUT,
                "expired early"
            );
        }
        world.take(a);
    }
    assert_eq!(
        awareness_of(&removals),
        [HashMap::from([(1, (1, "null".to_owned()))])],
        "a's state, not b's renewed one"
    );
    world.send_yjs(a, Message::AwarenessQuery);
    let left = world.take_yjs(a);
    assert_eq!(
        awareness_of(&left),
        [HashMap::from([(2, (2, "{}".to_owned()))])]
    );
}

/// `SessionLimits::max_awareness_bytes` (`--max-awareness-bytes`): a state one byte over is
/// refused with the whole update it came in, and sent to nobody; one at the bound is taken.
#[test]
fn an_oversize_awareness_state_is_refused_and_not_broadcast() {
    let limits = SessionLimits::default();
    let max = limits.max_awareness_bytes;
    let mut world = World::with_limits(&limits);
    let (a, _) = world.yjs(None);
    let (b, _) = world.yjs(None);
    let state = |len: usize| {
        let json = format!("{{\"b\":\"{}\"}}", "x".repeat(len - 8));
        assert_eq!(json.len(), len);
        json
    };
    let too_big = state(max + 1);
    world.send_yjs(a, awareness(&[(7, 1, &too_big)]));
    world.assert_quiet();
    assert!(
        world
            .events
            .iter()
            .any(|e| matches!(e, collab_core::session::Event::Rejected { .. })),
        "the refusal is reported: {:?}",
        world.events
    );
    let at_limit = state(max);
    world.send_yjs(a, awareness(&[(7, 2, &at_limit)]));
    for peer in [a, b] {
        let got = awareness_of(&world.take_yjs(peer));
        assert_eq!(got.len(), 1);
        assert_eq!(
            got[0][&7].0, 2,
            "the oversize state (clock 1) was never sent"
        );
        assert_eq!(got[0][&7].1.len(), max);
    }
    // An oversize state beside a valid one refuses the whole update.
    let small = r#"{"ok":true}"#;
    world.send_yjs(a, awareness(&[(7, 3, &too_big), (8, 1, small)]));
    world.assert_quiet();
    world.send_yjs(b, Message::AwarenessQuery);
    let all = awareness_of(&world.take_yjs(b));
    assert_eq!(all.len(), 1);
    assert_eq!(
        all[0].len(),
        1,
        "only a's state at the bound: {:?}",
        all[0].keys()
    );
}

/// An update that carries a stale entry (an older clock, skipped) smaller than the state it
/// names must not make room it does not free: the session's states stay within their total
/// bound (found by the `session` fuzz scenario).
#[test]
fn a_stale_smaller_entry_makes_no_room_for_the_rest_of_its_update() {
    let limits = SessionLimits {
        max_awareness_total_bytes: 96,
        ..SessionLimits::default()
    };
    let mut world = World::with_limits(&limits);
    let (a, _) = world.yjs(None);
    let state = |len: usize| format!("{{\"pad\":\"{}\"}}", "x".repeat(len - 10));
    world.send_yjs(a, awareness(&[(3, 9, &state(25)), (2, 0, &state(30))]));
    assert_eq!(world.session.awareness_bytes(), 55);
    // Clock 0 < 9: state 3 keeps its 25 bytes, so 42 new bytes do not fit in 96.
    world.send_yjs(
        a,
        awareness(&[(3, 0, &state(10)), (1, 0, &state(22)), (0, 0, &state(20))]),
    );
    assert!(
        world.session.awareness_bytes() <= limits.max_awareness_total_bytes,
        "awareness states hold {} bytes, over the bound",
        world.session.awareness_bytes()
    );
}

/// A Yjs client may write anything into a field the desktop client reads as a number or a
/// boolean; desktop clients are not sent such a value (it would raise in their handler and lose
/// the item there): the field is left out of what they get, and they show its default. The
/// document keeps what the Yjs client wrote, and Yjs clients get it.
#[test]
fn an_ill_typed_field_written_by_yjs_is_left_out_for_desktop_clients() {
    let (mut world, jay, yuki, doc, (_, u1, d1)) = desktop_and_yjs_on_an_item();
    world.ping(jay);

    let update = edit(&doc, |txn, items| {
        set_fields(
            txn,
            items,
            &u1,
            &[("x_mm", json!("abc")), ("name", json!("renamed"))],
        )
    });
    world.send_yjs(yuki, Message::Sync(SyncMessage::Update(update)));
    let to_jay = world.ping(jay);
    let msg = only(&to_jay);
    assert_eq!(msg["command"]["action"], "update_item", "{msg}");
    let data = &msg["command"]["data"];
    assert_eq!(data["name"], "renamed");
    assert!(data.get("x_mm").is_none(), "x_mm left out: {data}");
    assert_eq!(data["y_mm"], d1["y_mm"], "the other fields are sent");

    let (_, got) = world.joiner("late");
    let full = fold_fixes(&got);
    let state = scene_by_uuid(&full[0]["state"]);
    assert!(state[&u1].get("x_mm").is_none(), "nor in a full state");
    assert_eq!(doc_items(&world.doc())[&u1]["x_mm"], json!("abc"));
}

// ---------------------------------------------------------------------------------------------
// Falling behind
// ---------------------------------------------------------------------------------------------

/// The bytes of a y-websocket message as the server encodes it.
fn wire_len(msg: &Message) -> usize {
    use yrs::updates::encoder::Encode;
    msg.encode_v1().len()
}

/// A Yjs member that fell behind gets, in place of the changes dropped from its queue, one
/// update against the state it was confirmed to hold: the size of what changed since, not of
/// the traffic; applied, it has the document.
#[test]
fn a_yjs_member_behind_gets_one_update_against_what_it_was_confirmed_to_hold() {
    let mut world = World::new();
    let (writer, first) = world.yjs(None);
    let writer_doc = yjs_client(&mut world, writer, &first, Doc::new());
    // Content the slow member will hold before it falls behind.
    let old = json!({"note": "o".repeat(20_000)});
    let update = edit(&writer_doc, |txn, items| {
        items.insert(txn, "old", item_prelim("component", &old));
    });
    world.send_yjs(writer, Message::Sync(SyncMessage::Update(update)));
    let (slow, first) = world.yjs(None);
    let slow_doc = yjs_client(&mut world, slow, &first, Doc::new());
    assert!(world.confirm(slow), "a synced member's delivery is taken");

    // Traffic: one item rewritten many times (the document stays small).
    for i in 0..50 {
        let fields = json!({"note": format!("{i}-{}", "n".repeat(2_000))});
        let update = edit(&writer_doc, |txn, items| {
            items.insert(txn, "hot", item_prelim("component", &fields));
        });
        world.send_yjs(writer, Message::Sync(SyncMessage::Update(update)));
    }
    let dropped = world.fall_behind(slow);
    assert_eq!(dropped.len(), 50, "every queued change was dropped");
    let traffic: usize = dropped
        .iter()
        .map(|r| match r {
            Received::Yjs(m @ Message::Sync(SyncMessage::Update(_))) => wire_len(m),
            other => panic!("only changes are dropped: {other:?}"),
        })
        .sum();
    let got = world.take_yjs(slow);
    let [catch_up @ Message::Sync(SyncMessage::SyncStep2(_))] = got.as_slice() else {
        panic!("one SyncStep2 replaces the backlog: {got:?}");
    };
    assert!(
        wire_len(catch_up) * 10 < traffic,
        "the catch-up ({} bytes) costs what changed, not the traffic ({traffic} bytes)",
        wire_len(catch_up)
    );
    assert!(
        wire_len(catch_up) < 20_000,
        "what the member was confirmed to hold is not sent again ({} bytes)",
        wire_len(catch_up)
    );
    apply_all(&slow_doc, &got);
    assert_eq!(doc_items(&slow_doc), doc_items(&world.doc()));
    assert_eq!(state_vector(&slow_doc), state_vector(&world.doc()));
}

/// Before any delivery was confirmed the catch-up is the whole document; messages a catch-up
/// does not replace stay queued in order; the current awareness states follow the update.
#[test]
fn an_unconfirmed_member_catches_up_from_the_whole_document_and_keeps_its_json() {
    let mut world = World::new();
    let (alice, _) = world.legacy("alice");
    let (t, u, d) = fixture_item(1);
    world.send(alice, command("add_item", &t, &u, d, "alice"));
    let (writer, first) = world.yjs(None);
    let writer_doc = yjs_client(&mut world, writer, &first, Doc::new());
    let yuki = world.join(ConnKind::LegacyYjs, Some("yuki"));
    let (_, first) = split(world.take(yuki));
    let yuki_doc = yjs_client(&mut world, yuki, &first, Doc::new());
    world.send_yjs(writer, awareness(&[(7, 1, r#"{"user":{"name":"w"}}"#)]));
    let update = edit(&writer_doc, |txn, items| {
        set_fields(txn, items, &u, &[("x_mm", json!(42.5))]);
    });
    world.send_yjs(writer, Message::Sync(SyncMessage::Update(update)));
    let _bob = world.legacy("bob");

    let dropped = world.fall_behind(yuki);
    assert_eq!(
        dropped.len(),
        2,
        "the awareness change and the update: {dropped:?}"
    );
    let (json, yjs) = split(world.take(yuki));
    assert_eq!(
        summary(&json),
        [("user:joined".into(), "bob".into())],
        "JSON is kept"
    );
    let [Message::Sync(SyncMessage::SyncStep2(whole)), Message::Awareness(states)] = yjs.as_slice()
    else {
        panic!("the document, then the awareness states: {yjs:?}");
    };
    assert_eq!(
        doc_items(&doc_from(whole)),
        doc_items(&world.doc()),
        "nothing confirmed: the whole document"
    );
    assert_eq!(
        awareness_entries(states),
        HashMap::from([(7, (1, r#"{"user":{"name":"w"}}"#.to_owned()))])
    );
    apply_update(&yuki_doc, whole);
    assert_eq!(doc_items(&yuki_doc)[&u]["x_mm"], json!(42.5));
}

/// A member not yet sent the document has no delivery to confirm; a desktop client that falls
/// behind is closed 1013 (a full state could delete what it made and the server lacks).
#[test]
fn a_desktop_member_behind_is_closed_and_an_unsynced_yjs_member_is_not_confirmed() {
    let mut world = World::new();
    let (fresh, _) = world.yjs(None);
    assert!(!world.confirm(fresh), "not sent the document yet");
    let (alice, _) = world.legacy("alice");
    assert!(
        world.confirm(alice),
        "nothing to confirm for a desktop client"
    );
    let (bob, _) = world.legacy("bob");
    world.take(alice);
    world.fall_behind(bob);
    assert_eq!(world.closed(bob), Some(CLOSE_SLOW));
    assert_eq!(
        summary(&world.take_json(alice)),
        [("user:left".into(), "bob".into())]
    );
}

/// A `?yjs=1` member's JSON command is not sent back to it as Yjs, so the document's state is
/// no lower bound of what it holds: it catches up from the whole document.
#[test]
fn a_ws_yjs_member_that_sent_a_json_change_catches_up_from_the_whole_document() {
    let mut world = World::new();
    let yuki = world.join(ConnKind::LegacyYjs, Some("yuki"));
    let (_, first) = split(world.take(yuki));
    let yuki_doc = yjs_client(&mut world, yuki, &first, Doc::new());
    assert!(world.confirm(yuki));
    let (t, u, d) = fixture_item(2);
    world.send(yuki, command("add_item", &t, &u, d, "yuki"));
    world.take(yuki);
    assert!(world.confirm(yuki));
    world.fall_behind(yuki);
    let (_, yjs) = split(world.take(yuki));
    let [Message::Sync(SyncMessage::SyncStep2(whole))] = yjs.as_slice() else {
        panic!("one SyncStep2: {yjs:?}");
    };
    apply_update(&yuki_doc, whole);
    assert_eq!(doc_items(&yuki_doc), doc_items(&world.doc()));
}
