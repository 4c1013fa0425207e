//! Access control in the session: what a `view` member may not do (and may), who may join
//! under a user name a token binds, and whose name others see on a change.

mod common;

use collab_core::session::{Access, ConnKind, Event, Refused, Role, CLOSE_REPLACED};
use common::*;
use serde_json::json;
use yrs::sync::{Message, SyncMessage};
use yrs::{Doc, Map as _};

const VIEW: Access = Access {
    role: Role::View,
    holds_name: false,
};
const EDIT: Access = Access {
    role: Role::Edit,
    holds_name: false,
};
const BOUND_EDIT: Access = Access {
    role: Role::Edit,
    holds_name: true,
};

/// A session whose host uploaded fixture item 0; returns the world, the host and the item.
fn hosted() -> (World, u64, String) {
    let mut world = World::new();
    let (host, _) = world.legacy("host");
    let (_, uuid, item) = fixture_item(0);
    world.send(host, upload(&[&item], "host"));
    world.ping(host);
    (world, host, uuid)
}

fn view_member(world: &mut World, kind: ConnKind, user: Option<&str>) -> u64 {
    world
        .try_join_as(kind, user, VIEW)
        .expect("a view member joins")
}

#[test]
fn a_view_member_reads_the_scene_but_its_commands_and_uploads_are_forbidden() {
    let (mut world, host, uuid) = hosted();
    let stored = world.persisted.len();
    let before = world.items();
    let viewer = view_member(&mut world, ConnKind::Legacy, Some("watcher"));
    world.take(viewer);
    // sync:request is reading: answered with the scene.
    world.send(
        viewer,
        json!({"type": "sync:request", "user_id": "watcher"}),
    );
    let got = world.take_json(viewer);
    let full = got
        .iter()
        .find(|m| m["type"] == "sync:full_state")
        .unwrap_or_else(|| panic!("a view member gets the scene: {got:#?}"));
    assert!(scene_by_uuid(&full["state"]).contains_key(&uuid));
    world.take_json(host);

    let (item_type, _, mut data) = fixture_item(0);
    data["x_mm"] = json!(999.0);
    world.send(
        viewer,
        command("update_item", &item_type, &uuid, data.clone(), "watcher"),
    );
    world.send(
        viewer,
        command("remove_item", &item_type, &uuid, json!({}), "watcher"),
    );
    world.send(viewer, upload(&[], "watcher"));
    let got = world.ping(viewer);
    assert_eq!(got.len(), 3, "one error per change: {got:#?}");
    for msg in &got {
        assert_error(msg, "forbidden");
    }
    assert_eq!(world.items(), before, "the scene is unchanged");
    assert_eq!(world.persisted.len(), stored, "nothing stored");
    assert!(world.ping(host).is_empty(), "the others heard nothing");
}

#[test]
fn a_view_members_yjs_updates_are_dropped_unapplied_and_unstored_but_its_awareness_works() {
    let (mut world, host, uuid) = hosted();
    let stored = world.persisted.len();
    let before = world.items();
    let watcher = world.join(ConnKind::Yjs, None);
    world.take(watcher);
    let viewer = view_member(&mut world, ConnKind::Yjs, Some("viewer"));
    let legacy_yjs = view_member(&mut world, ConnKind::LegacyYjs, Some("viewer2"));
    world.take(viewer);
    world.take(legacy_yjs);
    world.take(host);

    let doc = Doc::with_client_id(77);
    let change = edit(&doc, |txn, items| {
        items.insert(txn, "yjs-item", item_prelim("lens", &json!({"x_mm": 1.0})));
    });
    world.send_yjs(viewer, Message::Sync(SyncMessage::Update(change.clone())));
    world.send_yjs(legacy_yjs, Message::Sync(SyncMessage::SyncStep2(change)));

    assert_eq!(world.persisted.len(), stored, "nothing stored");
    assert_eq!(world.items(), before, "nothing applied");
    assert!(world.items().contains_key(&uuid));
    let dropped = world
        .events
        .iter()
        .filter(|e| matches!(e, Event::ViewUpdateDropped { .. }))
        .count();
    assert_eq!(
        dropped, 2,
        "each dropped update is reported: {:?}",
        world.events
    );
    assert!(world.take(watcher).is_empty(), "nothing reached the others");
    assert!(world.ping(host).is_empty());
    let told = world.take(legacy_yjs);
    assert!(
        told.iter().any(
            |r| matches!(r, Received::Json(m) if m["type"] == "error" && m["code"] == "forbidden")
        ),
        "a ?yjs=1 viewer is told: {told:?}"
    );

    // Presence still works: the viewer's awareness reaches the other Yjs members.
    world.send_yjs(
        viewer,
        Message::Awareness(awareness_update(&[(77, 1, r#"{"user":"viewer"}"#)])),
    );
    let got = world.take(watcher);
    assert!(
        got.iter()
            .any(|r| matches!(r, Received::Yjs(Message::Awareness(_)))),
        "the viewer's awareness is broadcast: {got:?}"
    );
    assert_eq!(world.closed(viewer), None, "the viewer stays connected");
}

#[test]
fn an_edit_member_changes_the_scene_through_the_same_paths() {
    let (mut world, host, _) = hosted();
    let stored = world.persisted.len();
    let editor = world
        .try_join_as(ConnKind::Yjs, Some("editor"), EDIT)
        .expect("joins");
    world.take(editor);
    let doc = Doc::with_client_id(78);
    let change = edit(&doc, |txn, items| {
        items.insert(txn, "yjs-item", item_prelim("lens", &json!({"x_mm": 1.0})));
    });
    world.send_yjs(editor, Message::Sync(SyncMessage::Update(change)));
    assert_eq!(world.persisted.len(), stored + 1);
    assert!(world.items().contains_key("yjs-item"));
    assert!(!world.ping(host).is_empty(), "the host hears of it");
}

#[test]
fn a_name_a_token_binds_is_neither_taken_nor_replaced_by_a_connection_without_it() {
    let mut world = World::new();
    let alice = world
        .try_join_as(ConnKind::Legacy, Some("alice"), BOUND_EDIT)
        .expect("the bound alice joins");
    world.take(alice);
    for kind in [ConnKind::Legacy, ConnKind::LegacyYjs, ConnKind::Yjs] {
        for access in [EDIT, VIEW] {
            assert_eq!(
                world.try_join_as(kind, Some("alice"), access),
                Err(Refused::NameHeld),
                "{kind:?} {access:?}"
            );
        }
    }
    assert_eq!(world.closed(alice), None, "the holder was not replaced");
    // Another connection holding the name (the same person's new connection) replaces it.
    let again = world
        .try_join_as(ConnKind::Legacy, Some("alice"), BOUND_EDIT)
        .expect("the holder's new connection joins");
    assert_eq!(world.closed(alice), Some(CLOSE_REPLACED));
    world.take(again);
    // Without a holder, names are as the client says (and replaced as before).
    let (bob, _) = world.legacy("bob");
    let bob2 = world
        .try_join_as(ConnKind::Legacy, Some("bob"), EDIT)
        .expect("an unheld name is replaced");
    assert_eq!(world.closed(bob), Some(CLOSE_REPLACED));
    assert_eq!(world.closed(bob2), None);
}

#[test]
fn others_see_the_connections_user_whatever_the_message_says() {
    let (mut world, host, uuid) = hosted();
    let (bob, _) = world.joiner("bob");
    world.ping(host);
    let (item_type, _, mut data) = fixture_item(0);
    data["x_mm"] = json!(12.5);
    world.send(bob, command("update_item", &item_type, &uuid, data, "host"));
    let got = world.ping(host);
    let msg = only(&got);
    assert_eq!(msg["type"], "command");
    assert_eq!(
        msg["user_id"], "bob",
        "the sender's connection, not the message's user_id"
    );
}
