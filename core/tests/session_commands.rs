//! Scene commands from desktop clients (PROTOCOL §3.3; README "Choices"): what the others are
//! sent, what the sender is not sent (no echo), what a command writes, commands about items
//! the document lacks, and corrections: when the sender is owed the authoritative state, and
//! when it gets it (after a pause, or at once before a `pong`).

mod common;

use std::time::Duration;

use collab_core::doc::scene::CORRECTION_DELAY;
use common::*;
use serde_json::{json, Value};

/// A session with desktop clients `a` and `b`, both past their first exchange.
fn two_clients() -> (World, u64, u64) {
    let mut world = World::new();
    let (a, _) = world.settled("a");
    let (b, _) = world.settled("b");
    world.ping(a);
    (world, a, b)
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

#[test]
fn add_item_reaches_the_others_with_its_whole_data_and_the_sender_gets_no_echo() {
    let (mut world, a, b) = two_clients();
    let (item_type, uuid, data) = fixture_item(1);
    world.send(a, command("add_item", &item_type, &uuid, data.clone(), "a"));
    let after_add = world.ping(a);

    let to_b = world.ping(b);
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
    assert_eq!(world.items()[&uuid], expected_item(&data, &item_type));
    assert_eq!(world.persisted.len(), 1, "one stored update per change");

    // Nobody has changed the item but its creator, so nothing about it was ever sent to the
    // creator: its moves and edits are answered with nothing but the pong.
    let mut moved = data.clone();
    moved["x_mm"] = json!(20.0);
    world.send(
        a,
        command("move_item", &item_type, &uuid, moved.clone(), "a"),
    );
    let after_move = world.ping(a);
    let mut edited = moved;
    edited["name"] = json!("L1");
    world.send(
        a,
        command("update_item", &item_type, &uuid, edited.clone(), "a"),
    );
    let after_update = world.ping(a);
    assert!(
        after_add.is_empty() && after_move.is_empty() && after_update.is_empty(),
        "the sender gets no echo (PROTOCOL §3.3):\n after add_item: {after_add:?}\n \
         after move_item: {after_move:?}\n after update_item: {after_update:?}"
    );
    // No move_item is sent (README "Choices": the upstream client mirrors it): both reach
    // b as update_item with the whole data.
    let to_b = world.ping(b);
    let actions: Vec<&Value> = to_b.iter().map(|m| &m["command"]["action"]).collect();
    assert_eq!(actions, [&json!("update_item"), &json!("update_item")]);
    assert_eq!(to_b[0]["command"]["data"]["x_mm"], json!(20.0));
    assert_eq!(
        normalize(&to_b[1]["command"]["data"]),
        expected_item(&edited, &item_type)
    );
    assert_eq!(world.persisted.len(), 3);
    assert_eq!(doc_items(&world.stored_doc()), doc_items(&world.doc()));
}

#[test]
fn numbers_come_back_as_sent() {
    let (mut world, a, b) = two_clients();
    let data = json!({"x_mm": 100.0, "y_mm": 31.257510898320334, "angle_deg": 0.1,
                      "z_value": 7, "item_uuid": "r1", "points": [[0, 0.5], [25.4, -1]]});
    world.send(a, command("add_item", "ruler", "r1", data.clone(), "a"));
    let to_b = world.ping(b);
    let relayed = &only(&to_b)["command"]["data"];
    for field in ["x_mm", "y_mm", "angle_deg", "z_value", "points"] {
        assert_eq!(relayed[field], data[field], "{field}");
    }
    assert!(relayed["z_value"].is_u64(), "an integer stays an integer");
    assert!(relayed["x_mm"].is_f64(), "100.0 stays a float");
    assert_eq!(
        relayed["y_mm"].as_f64().unwrap().to_bits(),
        31.257510898320334f64.to_bits(),
        "bit-identical"
    );
}

#[test]
fn a_move_writes_the_position_only_an_update_the_fields_and_a_removal_deletes() {
    let (mut world, a, b) = two_clients();
    let (item_type, uuid, data) = fixture_item(11);
    world.send(b, command("add_item", &item_type, &uuid, data.clone(), "b"));
    assert!(world.ping(b).is_empty());
    let added = fold_fixes(&world.ping(a));
    assert_eq!(only(&added)["command"]["action"], "add_item");

    // move_item writes only x_mm, y_mm and angle_deg, whatever else its data says.
    let mut moved = data.clone();
    moved["x_mm"] = json!(142.5);
    moved["y_mm"] = json!(-37.25);
    moved["angle_deg"] = json!(30.0);
    moved["name"] = json!("renamed by a move");
    moved["object_height_mm"] = json!(1.0);
    world.send(a, command("move_item", &item_type, &uuid, moved, "a"));
    let mut expected = expected_item(&data, &item_type);
    expected["x_mm"] = json!(142.5);
    expected["y_mm"] = json!(-37.25);
    expected["angle_deg"] = json!(30.0);
    assert_eq!(
        world.items()[&uuid],
        expected,
        "a move writes the position only"
    );
    // a's position is the document's, and all a was told of the item is the add that put it
    // on its canvas (which its command proves applied): no correction.
    let to_a = world.ping(a);
    assert!(to_a.is_empty(), "no correction needed: {to_a:#?}");
    let to_b = world.ping(b);
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

    // update_item: b edits the name from what it was told; a hears it with the whole data.
    // a's move reached b as an update_item with the old name, which b may apply after its
    // edit: b is owed the authoritative state, which its ping flushes.
    let mut edited = msg["command"]["data"].clone();
    edited["name"] = json!("Lens L1 (f = 100 mm)");
    world.send(b, command("update_item", &item_type, &uuid, edited, "b"));
    expected["name"] = json!("Lens L1 (f = 100 mm)");
    let to_b = world.ping(b);
    assert_corrections_only(&to_b, &uuid, &expected);
    assert_eq!(to_b.len(), 1);
    let to_a = world.ping(a);
    let msg = only(&to_a);
    assert_eq!(msg["user_id"], "b");
    assert_eq!(msg["command"]["action"], "update_item");
    assert_eq!(normalize(&msg["command"]["data"]), expected);
    assert_eq!(world.items()[&uuid], expected);

    // remove_item reaches the other client; the remover gets no echo.
    world.send(a, command("remove_item", &item_type, &uuid, json!({}), "a"));
    assert!(world.ping(a).is_empty(), "no echo of a removal");
    let to_b = world.ping(b);
    let msg = only(&to_b);
    assert_eq!(msg["command"]["action"], "remove_item");
    assert_eq!(msg["command"]["item_id"], json!(uuid));
    assert_eq!(msg["user_id"], "a");
    assert!(world.items().is_empty());
    assert!(
        doc_items(&world.stored_doc()).is_empty(),
        "the removal is stored"
    );
}

/// A command that crossed the removal of its item (its sender removed the item, or was told
/// so) is ignored without an answer: the removal deletes the sender's copy. So is a removal
/// of an item the document lacks.
#[test]
fn commands_on_a_removed_item_change_nothing_and_are_not_answered() {
    let (mut world, a, b) = two_clients();
    let (item_type, uuid, data) = fixture_item(11);
    world.send(b, command("add_item", &item_type, &uuid, data.clone(), "b"));
    world.ping(a);
    world.send(a, command("remove_item", &item_type, &uuid, json!({}), "a"));
    world.ping(a);
    assert_eq!(summary(&world.ping(b))[0].1, format!("remove_item {uuid}"));
    let version = world.version();
    let stored = world.persisted.len();

    let mut stale = data.clone();
    stale["x_mm"] = json!(1.0);
    world.send(
        a,
        command("move_item", &item_type, &uuid, stale.clone(), "a"),
    );
    world.send(
        b,
        command("update_item", &item_type, &uuid, stale.clone(), "b"),
    );
    world.send(b, command("move_item", &item_type, &uuid, stale, "b"));
    world.send(b, command("remove_item", &item_type, &uuid, json!({}), "b"));
    assert!(world.ping(a).is_empty());
    assert!(world.ping(b).is_empty());
    assert!(world.items().is_empty(), "the removed item stays removed");
    assert_eq!(world.version(), version);
    assert_eq!(world.persisted.len(), stored, "nothing to store");
    assert_eq!(
        world.session.next_deadline(),
        None,
        "and no correction owed"
    );
}

/// A command about an item the document never had creates it from the whole dict it carries
/// (the upstream host drags items of its canvas before it first uploads them; README
/// "Choices"); the others get it as `add_item`.
#[test]
fn a_command_for_an_item_the_document_never_had_creates_it() {
    for action in ["move_item", "update_item", "add_item"] {
        let (mut world, a, b) = two_clients();
        let (item_type, _, data) = fixture_item(11);
        let ghost = "00000000-0000-4000-8000-00000000dead";
        let mut ghost_data = data.clone();
        ghost_data["item_uuid"] = json!(ghost);
        ghost_data["x_mm"] = json!(7.25);
        world.send(
            b,
            command(action, &item_type, ghost, ghost_data.clone(), "b"),
        );
        assert!(
            world.ping(b).is_empty(),
            "{action}: the sender holds what it sent"
        );
        let to_a = fold_fixes(&world.ping(a));
        let msg = only(&to_a);
        assert_eq!(msg["command"]["action"], "add_item", "{action}");
        assert_eq!(msg["command"]["item_id"], ghost);
        assert_eq!(msg["user_id"], "b");
        let ghost_item = expected_item(&ghost_data, &item_type);
        assert_eq!(normalize(&msg["command"]["data"]), ghost_item);
        assert_eq!(
            world.items(),
            [(ghost.to_owned(), ghost_item)].into(),
            "{action}: every field of the dict, not only the position"
        );
        assert!(world.session.initialized(), "an item initializes the scene");
    }
}

/// Corrections (PROTOCOL §3.3 "Convergence", README "Choices"): after a command, the sender
/// gets the item's authoritative state only when its canvas may differ from the document:
/// its dict differs on the fields the command writes, or a message about the item that it
/// may not have applied yet would leave something else.
#[test]
fn a_command_is_corrected_only_when_the_senders_canvas_may_differ() {
    let (mut world, a, b) = two_clients();
    let (t, u, data) = fixture_item(13);
    world.send(a, command("add_item", &t, &u, data.clone(), "a"));
    assert!(world.ping(a).is_empty());
    let told = fold_fixes(&world.ping(b));
    assert_eq!(only(&told)["command"]["action"], "add_item");

    // b renames; a has not applied that yet and sends a whole dict with the old name and a
    // new z_value. The old name is one a knew, so it does not revert b's rename; a's dict
    // now differs from the document on `name`: it gets the authoritative state.
    let mut renamed = data.clone();
    renamed["name"] = json!("renamed by b");
    world.send(b, command("update_item", &t, &u, renamed, "b"));
    assert!(world.ping(b).is_empty(), "b's dict is the document");
    let mut stale = data.clone();
    stale["z_value"] = json!(7);
    world.send(a, command("update_item", &t, &u, stale, "a"));
    let mut expected = expected_item(&data, &t);
    expected["name"] = json!("renamed by b");
    expected["z_value"] = json!(7);
    let to_a = world.ping(a);
    assert_eq!(to_a.len(), 2, "b's rename, then one correction: {to_a:#?}");
    assert_eq!(to_a[0]["user_id"], "b", "{to_a:#?}");
    assert_eq!(to_a[0]["command"]["action"], "update_item");
    assert_corrections_only(&to_a[1..], &u, &expected);
    assert_eq!(
        to_a[1]["user_id"], "a",
        "a correction answers a's own command"
    );
    assert_eq!(world.items()[&u], expected);
    let to_b = world.ping(b);
    assert_eq!(only(&to_b)["command"]["data"]["z_value"], json!(7));

    // A move is compared on the position only: a dict whose other fields differ from the
    // document's (they are not what a move writes) earns no correction when nothing about
    // the item is in flight to its sender.
    let (t2, u2, d2) = fixture_item(14);
    world.send(b, command("add_item", &t2, &u2, d2.clone(), "b"));
    assert!(world.ping(b).is_empty());
    assert_eq!(fold_fixes(&world.ping(a)).len(), 1);
    let mut moved2 = d2.clone();
    moved2["x_mm"] = json!(99.0);
    moved2["name"] = json!("only on a's canvas");
    world.send(a, command("move_item", &t2, &u2, moved2, "a"));
    assert!(world.ping(a).is_empty(), "no correction");
    let item2 = &world.items()[&u2];
    assert_eq!(item2["x_mm"], json!(99.0));
    assert_eq!(item2["name"], d2["name"]);
}

/// A correction waits until the sender's commands on the item pause ([`CORRECTION_DELAY`]):
/// the shell ticks at the session's deadline. A drag that crossed a change costs one
/// correction at its end, not one per step.
#[test]
fn a_correction_is_sent_once_the_senders_commands_pause() {
    let (mut world, a, b) = two_clients();
    let data = json!({"item_uuid": "r1", "name": "L1", "x_mm": 0.0, "y_mm": 0.0,
                      "angle_deg": 0.0, "z_value": 0});
    world.send(a, command("add_item", "ruler", "r1", data.clone(), "a"));
    world.ping(b);
    let mut renamed = data.clone();
    renamed["name"] = json!("L2");
    world.send(a, command("update_item", "ruler", "r1", renamed, "a"));
    // b drags from its old dict, two commands per mouse move, while the rename is on its way.
    let mut dict = data.clone();
    for step in 0..10 {
        world.advance(Duration::from_millis(16));
        dict["x_mm"] = json!(f64::from(step));
        for action in ["move_item", "update_item"] {
            world.send(b, command(action, "ruler", "r1", dict.clone(), "b"));
        }
        world.tick();
        let got = world.take_json(b);
        let expected_rename = usize::from(step == 0);
        assert_eq!(
            got.len(),
            expected_rename,
            "step {step}: only a's rename: {got:#?}"
        );
    }
    // a sees each step that changed the item: the update_item after each move writes
    // nothing new (and the first step moved nothing).
    let to_a = world.ping(a);
    assert_eq!(to_a.len(), 9, "{to_a:#?}");
    assert_eq!(to_a[8]["command"]["data"]["x_mm"], json!(9.0));
    let due = world.session.next_deadline().expect("a correction is owed");
    assert_eq!(due, world.instant() + CORRECTION_DELAY);
    world.advance(CORRECTION_DELAY - Duration::from_millis(1));
    world.tick();
    assert!(world.take_json(b).is_empty(), "not before it is due");
    world.tick_at_deadline();
    let got = world.take_json(b);
    let correction = only(&got);
    assert_eq!(correction["command"]["action"], "update_item");
    assert_eq!(correction["command"]["data"]["x_mm"], json!(9.0));
    assert_eq!(correction["command"]["data"]["name"], json!("L2"));
    assert_eq!(world.session.next_deadline(), None);
    assert!(
        world.take_json(a).is_empty(),
        "corrections go to their sender only"
    );
}

/// A `ping` is a barrier: everything its connection sent before was applied, and the
/// corrections owed to it go out before the `pong`, due or not.
#[test]
fn a_ping_flushes_the_corrections_owed_to_its_sender_before_the_pong() {
    let (mut world, a, b) = two_clients();
    let data = json!({"item_uuid": "r1", "name": "L1", "x_mm": 0.0, "y_mm": 0.0,
                      "angle_deg": 0.0});
    world.send(a, command("add_item", "ruler", "r1", data.clone(), "a"));
    world.ping(b);
    let mut renamed = data.clone();
    renamed["name"] = json!("L2");
    world.send(a, command("update_item", "ruler", "r1", renamed, "a"));
    let mut stale = data.clone();
    stale["x_mm"] = json!(5.0);
    world.send(b, command("move_item", "ruler", "r1", stale, "b"));
    assert_eq!(
        summary(&world.take_json(b)),
        [("command".into(), "update_item r1".into())]
    );
    // a owes nothing and its ping flushes nothing of b's.
    assert!(world.ping(a).iter().all(|m| m["user_id"] == "b"));
    assert!(world.session.next_deadline().is_some());
    world.send(b, json!({"type": "ping"}));
    let got = world.take_json(b);
    assert_eq!(got.len(), 2, "{got:#?}");
    assert_eq!(got[0]["command"]["action"], "update_item");
    assert_eq!(got[0]["command"]["data"]["name"], "L2");
    assert_eq!(got[0]["command"]["data"]["x_mm"], json!(5.0));
    assert_eq!(
        got[1]["type"], "pong",
        "the correction comes before the pong"
    );
    assert_eq!(world.session.next_deadline(), None, "nothing owed any more");
    world.advance(CORRECTION_DELAY * 2);
    world.tick();
    assert!(world.take_json(b).is_empty(), "sent once");
}

#[test]
fn a_correction_owed_to_a_connection_that_left_is_forgotten() {
    let (mut world, a, b) = two_clients();
    let data = json!({"item_uuid": "r1", "name": "L1", "x_mm": 0.0, "y_mm": 0.0,
                      "angle_deg": 0.0});
    world.send(a, command("add_item", "ruler", "r1", data.clone(), "a"));
    let mut renamed = data.clone();
    renamed["name"] = json!("L2");
    world.send(a, command("update_item", "ruler", "r1", renamed, "a"));
    world.send(b, command("update_item", "ruler", "r1", data, "b"));
    assert!(world.session.next_deadline().is_some());
    world.leave(b);
    assert_eq!(world.session.next_deadline(), None);
    world.advance(CORRECTION_DELAY);
    world.tick();
    world.ping(a);
}

/// Deleting an item someone else changed sends the deleter nothing (issue 11, #6); a removal
/// is echoed to the remover only when a re-creation of the item may still be on its way to it
/// (README "Choices").
#[test]
fn a_removal_is_echoed_only_when_a_re_creation_may_cross_it() {
    let (mut world, a, b) = two_clients();
    let data = json!({"item_uuid": "r1", "name": "L1", "x_mm": 0.0, "y_mm": 0.0,
                      "angle_deg": 0.0});
    world.send(a, command("add_item", "ruler", "r1", data.clone(), "a"));
    world.ping(b);
    let mut moved = data.clone();
    moved["x_mm"] = json!(3.0);
    world.send(b, command("move_item", "ruler", "r1", moved, "b"));
    world.send(a, command("remove_item", "ruler", "r1", json!({}), "a"));
    assert_eq!(
        summary(&world.ping(a)),
        [("command".into(), "update_item r1".into())],
        "b's move, and no echo of a's removal"
    );
    assert_eq!(
        summary(&world.ping(b)),
        [("command".into(), "remove_item r1".into())]
    );

    // b undoes the removal (remove, add) while a removes the item again before it applied
    // either: a's removal deletes the re-created item, and the add_item on its way to a
    // would bring it back on a's canvas, so a gets the removal too.
    world.send(b, command("add_item", "ruler", "r1", data.clone(), "b"));
    world.ping(b);
    world.ping(a);
    world.send(b, command("remove_item", "ruler", "r1", json!({}), "b"));
    world.send(b, command("add_item", "ruler", "r1", data, "b"));
    world.send(a, command("remove_item", "ruler", "r1", json!({}), "a"));
    assert!(world.items().is_empty());
    let to_a = world.ping(a);
    assert_eq!(
        summary(&to_a),
        [
            ("command".into(), "remove_item r1".into()),
            ("command".into(), "add_item r1".into()),
            ("command".into(), "remove_item r1".into()),
        ],
        "{to_a:#?}"
    );
    let mut canvas = Canvas::default();
    canvas.apply_all(&to_a);
    assert!(canvas.objects.is_empty(), "a's canvas ends without it");
}
