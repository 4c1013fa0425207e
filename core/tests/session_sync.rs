//! Whole scenes (PROTOCOL §3.1, §3.4; README "Choices"): `sync:request` answered with the
//! scene once per connection, as soon as the scene is initialized; the full state's shape and
//! its placeholder fixes; uploads merged from whichever connection sends them, reaching the
//! others as commands, and answered to the uploader only with what its canvas lacks.

mod common;

use std::collections::BTreeMap;

use common::*;
use serde_json::{json, Value};

fn request() -> Value {
    json!({"type": "sync:request"})
}

/// The one full state among `got` (with its placeholder fixes folded away).
fn full_state(got: &[Value]) -> Value {
    let folded = fold_fixes(got);
    let full = only(&folded);
    assert_eq!(full["type"], "sync:full_state", "{full}");
    full.clone()
}

#[test]
fn a_sync_request_is_answered_with_the_scene_once() {
    let mut world = World::new();
    let (alice, _) = world.legacy("alice");
    let (t1, u1, d1) = fixture_item(1);
    let (t0, u0, d0) = fixture_item(0);
    world.send(alice, command("add_item", &t1, &u1, d1.clone(), "alice"));
    world.send(alice, command("add_item", &t0, &u0, d0.clone(), "alice"));

    let (carol, got) = world.joiner("carol");
    assert_eq!(
        got.len(),
        3,
        "the full state, then one update_item per placeholder item: {got:#?}"
    );
    let full = full_state(&got);
    assert_eq!(full["from_server"], true);
    assert_timestamp(&full["state"]["timestamp"]);
    let version = full["state"]["version"].as_u64().expect("a version");
    let items = full["state"]["items"].as_array().expect("items");
    assert_eq!(items.len(), 2);
    for item in items {
        assert_eq!(item["uuid"], item["item_uuid"], "{item}");
    }
    assert!(
        items
            .windows(2)
            .all(|w| w[0]["uuid"].as_str() < w[1]["uuid"].as_str()),
        "sorted by uuid"
    );
    let by_uuid = scene_by_uuid(&full["state"]);
    assert_eq!(by_uuid[&u0], expected_item(&d0, &t0));
    assert_eq!(by_uuid[&u1], expected_item(&d1, &t1));
    assert_eq!(by_uuid[&u1]["item_type"], "component");
    assert_eq!(by_uuid[&u0]["item_type"], "source");
    assert_eq!(
        full["state"]["items"],
        world.scene()["items"],
        "the scene the API shows"
    );

    // A second request on the same connection is not answered again; only the requester
    // got one; the others get no full state when someone joins.
    world.send(carol, request());
    assert!(world.ping(carol).is_empty());
    let to_alice = world.ping(alice);
    assert_eq!(summary(&to_alice), [("user:joined".into(), "carol".into())]);

    // The version grows with every change of the scene.
    world.send(alice, command("remove_item", &t0, &u0, json!({}), "alice"));
    assert_eq!(
        summary(&world.ping(carol)),
        [("command".into(), format!("remove_item {u0}"))]
    );
    let (_, got) = world.joiner("dave");
    let again = full_state(&got);
    assert_eq!(scene_by_uuid(&again["state"]).len(), 1);
    assert!(again["state"]["version"].as_u64().unwrap() > version);
}

/// Asked before the scene is initialized, the full state is sent as soon as it is (a desktop
/// client sends no `add_item` before it got one); until then the connection gets no commands
/// (the full state will carry them), and an empty full state is never sent (it would wipe a
/// host's canvas).
#[test]
fn a_request_before_the_scene_exists_is_answered_as_soon_as_it_does() {
    let mut world = World::new();
    let (host, ack) = world.legacy("host");
    assert_eq!(ack["is_host"], true);
    let (guest, _) = world.legacy("guest");
    // A connection that has neither asked nor uploaded may be a host whose upload is on its
    // way, holding any item: it is told of changes by update_item only (README "Choices").
    let (silent, _) = world.legacy("silent");
    world.ping(host);
    world.ping(guest);
    world.send(guest, request());
    assert!(world.ping(guest).is_empty(), "no empty full state");

    // The first add initializes the scene: the full state is the scene as it was then, and
    // the second add follows it as a command.
    let (t, u, d) = fixture_item(4);
    world.send(host, command("add_item", &t, &u, d.clone(), "host"));
    let (t2, u2, d2) = fixture_item(5);
    world.send(host, command("add_item", &t2, &u2, d2, "host"));
    assert!(world.ping(host).is_empty(), "no echo");
    let got = fold_fixes(&world.ping(guest));
    assert_eq!(got.len(), 2, "full state, then the second add: {got:#?}");
    let full = &got[0];
    assert_eq!(full["type"], "sync:full_state", "{full}");
    assert_eq!(full["from_server"], true);
    assert_eq!(
        scene_by_uuid(&full["state"]),
        [(u.clone(), expected_item(&d, &t))].into()
    );
    assert_eq!(got[1]["command"]["action"], "add_item");
    assert_eq!(got[1]["command"]["item_id"], json!(u2));
    let relayed = fold_fixes(&world.ping(silent));
    assert_eq!(
        commands(&relayed),
        [
            ("update_item".into(), u.clone(), "host".into()),
            ("update_item".into(), u2.clone(), "host".into())
        ]
    );

    // Answered once: a second request costs nothing.
    world.send(guest, request());
    assert!(world.ping(guest).is_empty());
    assert!(world.ping(host).is_empty(), "only the requester gets it");

    // From then on the guest gets commands.
    let mut moved = d.clone();
    moved["x_mm"] = json!(3.5);
    world.send(host, command("move_item", &t, &u, moved, "host"));
    let to_guest = world.ping(guest);
    let msg = only(&to_guest);
    assert_eq!(msg["command"]["action"], "update_item");
    assert_eq!(msg["command"]["data"]["x_mm"], json!(3.5));
}

#[test]
fn a_late_joiner_after_the_host_left_gets_the_scene() {
    let mut world = World::new();
    let (host, _) = world.legacy("host");
    let added: Vec<_> = [12, 13, 14].into_iter().map(fixture_item).collect();
    for (t, u, d) in &added {
        world.send(host, command("add_item", t, u, d.clone(), "host"));
    }
    world.leave(host);
    let (_, got) = world.joiner("latecomer");
    let full = full_state(&got);
    let expected: BTreeMap<String, Value> = added
        .iter()
        .map(|(t, u, d)| (u.clone(), expected_item(d, t)))
        .collect();
    assert_eq!(scene_by_uuid(&full["state"]), expected);
}

/// The placeholder fix (README "Choices") follows a full state for up to 100 items of
/// placeholder types; a larger scene gets none (it froze the fork client).
#[test]
fn a_full_state_of_more_than_100_placeholder_items_gets_no_fixes() {
    for (count, fixes) in [(100, 100), (101, 0)] {
        let mut world = World::new();
        let (host, _) = world.legacy("host");
        let items: Vec<Value> = (0..count)
            .map(|i| {
                json!({"item_uuid": format!("item-{i:03}"), "item_type": "lens",
                       "x_mm": f64::from(i), "y_mm": 0.0, "angle_deg": 0.0})
            })
            .collect();
        let refs: Vec<&Value> = items.iter().collect();
        world.send(host, upload(&refs, "host"));
        let (_, got) = world.joiner("guest");
        assert_eq!(got[0]["type"], "sync:full_state");
        assert_eq!(got.len(), 1 + fixes, "{count} items");
        if fixes > 0 {
            assert_eq!(fold_fixes(&got).len(), 1);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Uploads
// ---------------------------------------------------------------------------------------------

#[test]
fn a_host_upload_becomes_the_scene_and_reaches_the_others_as_commands() {
    let mut world = World::new();
    let (host, _) = world.legacy("host");
    let (guest, _) = world.legacy("guest");
    world.ping(host);
    let items: Vec<(String, String, Value)> = [3, 4, 5].into_iter().map(fixture_item).collect();
    let refs: Vec<&Value> = items.iter().map(|(_, _, d)| d).collect();
    world.send(host, upload(&refs, "host"));
    assert!(
        world.ping(host).is_empty(),
        "the host already holds what it uploaded: no echo"
    );
    let expected: BTreeMap<String, Value> = items
        .iter()
        .map(|(t, u, d)| (u.clone(), expected_item(d, t)))
        .collect();
    assert_eq!(world.items(), expected, "the upload became the scene");
    assert!(world.session.initialized());
    assert_eq!(world.persisted.len(), 1, "one update for the whole upload");

    let to_guest = world.ping(guest);
    assert!(
        to_guest.iter().all(|m| m["type"] == "command"),
        "the upload is not relayed verbatim: {to_guest:?}"
    );
    // The guest has neither asked nor uploaded: it may hold these items, so it is told
    // by update_item (README "Choices"); it gets them whole when it asks.
    assert_eq!(to_guest.len(), 3, "one update_item per item");
    let added: BTreeMap<String, Value> = to_guest
        .iter()
        .map(|m| {
            assert_eq!(m["command"]["action"], "update_item", "{m}");
            assert_eq!(m["user_id"], "host");
            assert_eq!(m["command"]["item_type"], m["command"]["data"]["item_type"]);
            (
                m["command"]["item_id"].as_str().unwrap().to_owned(),
                normalize(&m["command"]["data"]),
            )
        })
        .collect();
    assert_eq!(added, expected);

    // A joiner now gets the uploaded scene as its full state.
    let (_, got) = world.joiner("late");
    assert_eq!(scene_by_uuid(&full_state(&got)["state"]), expected);
}

/// Uploads count from whichever connection sends them (the desktop client takes its role
/// from its own dialog, README "Choices"): merged as PROTOCOL §3.4 says, and the uploader
/// gets back only what its canvas lacks or shows differently. `target_user` is ignored.
#[test]
fn an_upload_from_any_connection_is_merged() {
    let mut world = World::new();
    let (first, _) = world.legacy("first");
    let (host, ack) = world.legacy("host");
    assert_eq!(ack["is_host"], false, "advisory only: the scene has a user");
    world.ping(first);

    // The second connection uploads into the uninitialized scene: it becomes the scene. The
    // desktop client adds `uuid` beside `item_uuid`: it names the key, it is not a field.
    let (t6, u6, d6) = fixture_item(6);
    let mut uploaded6 = d6.clone();
    uploaded6["uuid"] = json!(u6);
    let mut frame = upload(&[&uploaded6], "host");
    frame["target_user"] = json!("first");
    world.send(host, frame);
    assert!(
        world.ping(host).is_empty(),
        "the uploader holds what it uploaded"
    );
    let to_first = fold_fixes(&world.ping(first));
    let msg = only(&to_first);
    assert_eq!(
        msg["type"], "command",
        "target_user gets commands, not the upload"
    );
    // `first` has neither asked nor uploaded (README "Choices").
    assert_eq!(msg["command"]["action"], "update_item");
    assert_eq!(msg["command"]["item_id"], json!(u6));
    assert_eq!(msg["user_id"], "host");
    assert!(
        msg["command"]["data"].get("uuid").is_none(),
        "the uploaded `uuid` key is not stored as a field: {msg}"
    );
    assert_eq!(
        world.items(),
        [(u6.clone(), expected_item(&d6, &t6))].into()
    );
    // An uploader never gets a full state (it would replace a canvas the server holds only
    // in part); its canvas lacks nothing, so its request costs nothing.
    world.send(host, request());
    assert!(world.ping(host).is_empty());

    // Once the scene is initialized: `first` adds an item, the uploader renames it in its
    // next upload; the rename is merged and reaches `first`.
    let (t7, u7, d7) = fixture_item(7);
    world.send(first, command("add_item", &t7, &u7, d7.clone(), "first"));
    assert!(world.ping(first).is_empty());
    let to_host = fold_fixes(&world.ping(host));
    assert_eq!(only(&to_host)["command"]["action"], "add_item");
    let mut renamed = d7.clone();
    renamed["name"] = json!("renamed in an upload");
    world.send(host, upload(&[&renamed, &d6], "host"));
    assert!(world.ping(host).is_empty());
    let to_first = world.ping(first);
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
    // lacks as add_item. Before it uploads or asks, it may hold any item that existed (a
    // host reconnecting): it is told of changes by update_item.
    let (third, _) = world.legacy("third");
    world.ping(first);
    world.ping(host);
    let mut named = d6.clone();
    for name in ["N2", "N3"] {
        named["name"] = json!(name);
        world.send(
            first,
            command("update_item", &t6, &u6, named.clone(), "first"),
        );
    }
    world.ping(first);
    let told = fold_fixes(&world.ping(third));
    let told: Vec<(&Value, &Value)> = told
        .iter()
        .map(|m| (&m["command"]["action"], &m["command"]["data"]["name"]))
        .collect();
    assert_eq!(
        told,
        [
            (&json!("update_item"), &json!("N2")),
            (&json!("update_item"), &json!("N3"))
        ]
    );
    world.ping(host);
    let before = world.items();
    let version = world.version();
    let mut stale = d6.clone();
    stale["name"] = json!("N2");
    world.send(third, upload(&[&stale], "third"));
    let back = world.ping(third);
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
    assert!(world.ping(first).is_empty());
    assert!(world.ping(host).is_empty());
    assert_eq!(world.items(), before, "the stale upload changed nothing");
    assert_eq!(world.version(), version);

    // Its canvas now equals the document: the same upload again costs no message.
    let mut current6 = before[&u6].clone();
    current6["item_uuid"] = json!(u6);
    let mut current7 = before[&u7].clone();
    current7["item_uuid"] = json!(u7);
    let stored = world.persisted.len();
    world.send(third, upload(&[&current6, &current7], "third"));
    assert!(world.ping(third).is_empty());
    assert!(world.ping(first).is_empty());
    assert_eq!(
        world.items(),
        before,
        "an upload equal to the document changes nothing"
    );
    assert_eq!(world.persisted.len(), stored, "and stores nothing");
}

#[test]
fn a_stale_upload_neither_resurrects_nor_deletes() {
    let mut world = World::new();
    let (host, _) = world.legacy("host");
    let (guest, _) = world.legacy("guest");
    world.ping(host);
    let items: Vec<(String, String, Value)> = [8, 9, 10].into_iter().map(fixture_item).collect();
    let all: Vec<&Value> = items.iter().map(|(_, _, d)| d).collect();
    world.send(host, upload(&all, "host"));
    world.ping(host);
    assert_eq!(fold_fixes(&world.ping(guest)).len(), 3);

    // The guest removes the first item; the host is told.
    let (t0, u0, _) = &items[0];
    world.send(guest, command("remove_item", t0, u0, json!({}), "guest"));
    world.ping(guest);
    let to_host = world.ping(host);
    assert_eq!(
        summary(&to_host),
        [("command".into(), format!("remove_item {u0}"))]
    );

    // A stale upload that still holds the removed item, lacks the third one, and renames the
    // second one.
    let mut renamed = items[1].2.clone();
    renamed["name"] = json!("Beam splitter BS2 (renamed by the host)");
    world.send(host, upload(&[&items[0].2, &renamed], "host"));
    assert!(
        world.ping(host).is_empty(),
        "the host's canvas lacks nothing the document holds"
    );
    let mut expected: BTreeMap<String, Value> = items[1..]
        .iter()
        .map(|(t, u, d)| (u.clone(), expected_item(d, t)))
        .collect();
    let (t1, u1, _) = &items[1];
    expected.insert(u1.clone(), expected_item(&renamed, t1));
    assert_eq!(
        world.items(),
        expected,
        "the removed item stays removed, the missing one stays, the edit is applied"
    );
    let to_guest = world.ping(guest);
    let msg = only(&to_guest);
    assert_eq!(msg["type"], "command", "not relayed verbatim: {msg}");
    assert_eq!(msg["command"]["action"], "update_item");
    assert_eq!(msg["command"]["item_id"], json!(u1));
    assert_eq!(normalize(&msg["command"]["data"]), expected[u1]);
}

/// An empty upload initializes the scene (PROTOCOL §2): a waiting requester gets the empty
/// scene, and nobody hosts any more.
#[test]
fn an_empty_upload_initializes_the_scene() {
    let mut world = World::new();
    let (guest, _) = world.legacy("guest");
    world.send(guest, request());
    let (host, _) = world.legacy("host");
    world.ping(guest);
    world.send(host, upload(&[], "host"));
    assert!(world.session.initialized());
    let got = world.ping(guest);
    let full = full_state(&got);
    assert_eq!(full["state"]["items"], json!([]));
    assert!(world.ping(host).is_empty());
    let (_, ack) = world.legacy("late");
    assert_eq!(ack["is_host"], false);
}
