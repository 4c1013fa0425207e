//! Convergence when clients edit from canvases that are behind (PROTOCOL §3.3 "Convergence",
//! README "Choices"): [`Desktop`] clients send whole dicts from what they hold, messages
//! reach them only when the test lets them read, and every case ends with each canvas showing
//! the document. (Random concurrent edits over real sockets: `tests/convergence.rs`.)

mod common;

use common::*;
use serde_json::json;

/// Host `a` and client `b`, both holding item `u1` (name L1, z_value 0), all settled.
fn two_clients_with_one_item() -> (World, Desktop, Desktop) {
    let mut world = World::new();
    let mut a = Desktop::connect(&mut world, "a", true, Canvas::default());
    let data = json!({"_type": "component", "item_uuid": "u1", "name": "L1", "z_value": 0,
                      "x_mm": 0.0, "y_mm": 0.0, "angle_deg": 0.0});
    a.edit(
        &mut world,
        "add_item",
        "u1",
        &expected_item(&data, "component"),
    );
    a.settle(&mut world);
    let mut b = Desktop::connect(&mut world, "b", false, Canvas::default());
    assert!(b.canvas.synced, "b got the full state");
    assert_eq!(b.canvas.objects.keys().collect::<Vec<_>>(), ["u1"]);
    // a hears that b joined and uploads its canvas: the document already holds it.
    a.settle(&mut world);
    assert!(
        b.settle(&mut world).is_empty(),
        "a's canvas is the document"
    );
    (world, a, b)
}

/// `field = value` on `who`'s copy of u1, sent as `action` from what `who` holds.
fn set(world: &mut World, who: &mut Desktop, action: &str, field: &str, value: serde_json::Value) {
    let mut fields = who.canvas.objects["u1"].clone();
    fields[field] = value;
    who.edit(world, action, "u1", &fields);
}

#[test]
fn a_stale_dict_does_not_revert_a_concurrent_rename() {
    let (mut world, mut a, mut b) = two_clients_with_one_item();
    // a renames; b has not read that yet and sends its whole dict with the old name.
    set(&mut world, &mut a, "update_item", "name", json!("L2"));
    a.settle(&mut world);
    set(&mut world, &mut b, "update_item", "z_value", json!(5));
    assert_converged(&mut world, &mut [&mut a, &mut b]);
    let item = &world.items()["u1"];
    assert_eq!(item["name"], "L2");
    assert_eq!(item["z_value"], 5);
}

#[test]
fn a_stale_dict_does_not_revert_a_change_it_arrives_after() {
    let (mut world, mut a, mut b) = two_clients_with_one_item();
    // b changes z_value first; a's rename, from a dict that predates it, arrives after.
    set(&mut world, &mut b, "update_item", "z_value", json!(5));
    b.settle(&mut world);
    assert_eq!(a.canvas.objects["u1"]["z_value"], 0, "a has not read it");
    set(&mut world, &mut a, "update_item", "name", json!("L2"));
    assert_converged(&mut world, &mut [&mut a, &mut b]);
    let item = &world.items()["u1"];
    assert_eq!(item["name"], "L2");
    assert_eq!(item["z_value"], 5);
}

#[test]
fn edits_back_to_back_while_a_correction_is_on_its_way_converge() {
    let (mut world, mut a, mut b) = two_clients_with_one_item();
    set(&mut world, &mut a, "update_item", "name", json!("L2"));
    a.settle(&mut world);
    // b edits three times without reading: the first edit earns a correction that is still
    // unread when the others are sent.
    set(&mut world, &mut b, "update_item", "z_value", json!(5));
    set(&mut world, &mut b, "move_item", "x_mm", json!(42.5));
    set(&mut world, &mut b, "update_item", "locked", json!(true));
    assert_converged(&mut world, &mut [&mut a, &mut b]);
    let item = &world.items()["u1"];
    assert_eq!(item["name"], "L2");
    assert_eq!(item["z_value"], 5);
    assert_eq!(item["x_mm"], 42.5);
    assert_eq!(item["locked"], true);
}

/// A command that crossed the removal of its item is ignored without an answer: the removal
/// on its way to the sender deletes the sender's copy.
#[test]
fn an_edit_crossing_a_removal_is_ignored_and_the_item_stays_removed() {
    let (mut world, mut a, mut b) = two_clients_with_one_item();
    a.remove(&mut world, "u1");
    a.settle(&mut world);
    set(&mut world, &mut b, "move_item", "x_mm", json!(10.0));
    let got = b.receive(&mut world);
    assert_eq!(
        summary(&got),
        [("command".into(), "remove_item u1".into())],
        "b gets a's removal and nothing about its move"
    );
    assert!(
        a.settle(&mut world).is_empty(),
        "a hears nothing of b's move"
    );
    assert_converged(&mut world, &mut [&mut a, &mut b]);
    assert!(world.items().is_empty(), "the removed item stays removed");
}
