//! The real desktop clients' flows (issue 11, README "Choices"), as the session sees them,
//! with [`Desktop`] clients: every flow ends with each canvas showing the document, no item
//! lost and none duplicated. `tests/realclient` runs the same flows with the real clients.

mod common;

use std::collections::BTreeMap;

use common::*;
use serde_json::{json, Value};

/// Issue 11 #1: the host drags items of its canvas before the session has its upload; the
/// commands create the items (the session never answers `remove_item` for an item it never
/// had), and the colleague who joins later gets the host's whole canvas.
#[test]
fn a_host_that_edits_before_its_upload_keeps_its_items() {
    let mut world = World::new();
    let items = bench(0..3);
    let (peer, ack) = world.legacy("host");
    assert_eq!(ack["is_host"], true);
    let mut host = Desktop {
        name: "host".into(),
        peer,
        host: true,
        canvas: canvas_of(&items),
    };
    let dragged = items.keys().nth(1).unwrap().clone();
    for x in [10.0, 20.0, 30.0] {
        host.drag(&mut world, &dragged, x);
    }
    let back = host.settle(&mut world);
    assert!(
        back.is_empty(),
        "nothing about items the session never had: {back:#?}"
    );
    assert_eq!(host.canvas.objects.len(), 3, "the host lost no item");
    assert_eq!(world.items()[&dragged]["x_mm"], json!(30.0));

    let mut colleague = Desktop::connect(&mut world, "colleague", false, Canvas::default());
    assert_converged(&mut world, &mut [&mut host, &mut colleague]);
    assert_eq!(world.items().len(), 3);
    assert!(colleague.canvas.synced, "the colleague got a full state");
}

/// Issue 11 #2 and #3: a colleague connects before the host (and is told `is_host`, which no
/// client reads). Its request is answered as soon as the host's upload initializes the scene,
/// with a full state, so it then sends its own new items (it sends none before one).
#[test]
fn a_colleague_who_connects_before_the_host_gets_the_hosts_canvas_and_its_adds_count() {
    let mut world = World::new();
    let mut colleague = Desktop::connect(&mut world, "colleague", false, Canvas::default());
    assert!(
        !colleague.canvas.synced,
        "no full state of an uninitialized scene"
    );
    let items = bench(3..6);
    let mut host = Desktop::connect(&mut world, "host", true, canvas_of(&items));
    assert!(host.canvas.objects.len() == 3 && host.canvas.duplicates.is_empty());
    colleague.settle(&mut world);
    assert!(
        colleague.canvas.synced,
        "the full state came once the scene existed"
    );
    colleague.canvas.assert_shows(&items, "colleague");

    // The colleague's own new item, and the host's drag, reach the other.
    let (t, u, d) = fixture_item(7);
    colleague.canvas.set(&u, &expected_item(&d, &t));
    world.send(colleague.peer, command("add_item", &t, &u, d, "colleague"));
    let dragged = items.keys().next().unwrap().clone();
    host.drag(&mut world, &dragged, -12.5);
    assert_converged(&mut world, &mut [&mut host, &mut colleague]);
    assert_eq!(world.items().len(), 4);
    assert_eq!(colleague.canvas.objects[&dragged]["x_mm"], json!(-12.5));
}

/// The harness's main scenario: host, joiner and late joiner; adds by each, concurrent drags
/// of one item (each sends before it applied the other's), removes of items others touched.
#[test]
fn host_joiner_and_late_joiner_with_adds_concurrent_drags_and_removes_converge() {
    let mut world = World::new();
    let mut host = Desktop::connect(&mut world, "host", true, canvas_of(&bench(0..4)));
    let mut joiner = Desktop::connect(&mut world, "joiner", false, Canvas::default());
    host.settle(&mut world);
    joiner.settle(&mut world);
    assert!(joiner.canvas.synced);

    let (t, joiners_item, d) = fixture_item(8);
    joiner.canvas.set(&joiners_item, &expected_item(&d, &t));
    world.send(
        joiner.peer,
        command("add_item", &t, &joiners_item, d, "joiner"),
    );
    let mut late = Desktop::connect(&mut world, "late", false, Canvas::default());
    assert!(late.canvas.synced);

    // Host and joiner drag the same item at once, each from its own canvas.
    let contested = host.canvas.objects.keys().next().unwrap().clone();
    for step in 0..5 {
        host.drag(&mut world, &contested, f64::from(step));
        joiner.drag(&mut world, &contested, 100.0 + f64::from(step));
    }
    host.receive(&mut world);
    joiner.receive(&mut world);
    // The late joiner renames an item the host then removes; the joiner removes its own
    // item, which the host has moved.
    let renamed = host.canvas.objects.keys().nth(1).unwrap().clone();
    let mut fields = late.canvas.objects[&renamed].clone();
    fields["name"] = json!("renamed late");
    late.edit(&mut world, "update_item", &renamed, &fields);
    host.receive(&mut world);
    host.remove(&mut world, &renamed);
    host.drag(&mut world, &joiners_item, 55.0);
    joiner.remove(&mut world, &joiners_item);
    assert_converged(&mut world, &mut [&mut host, &mut joiner, &mut late]);
    let document = world.items();
    assert!(!document.contains_key(&renamed) && !document.contains_key(&joiners_item));
    assert_eq!(document.len(), 3);
}

/// Issue 11 #4: a host that reconnects with its unchanged 300-item bench uploads it again;
/// that costs no message, and nothing is stored.
#[test]
fn a_host_reconnecting_with_an_unchanged_bench_costs_nothing() {
    let mut world = World::new();
    let items: BTreeMap<String, Value> = (0..300)
        .map(|i| {
            let uuid = format!("item-{i:03}");
            (
                uuid,
                json!({"item_type": "lens", "x_mm": f64::from(i), "y_mm": 0.0,
                       "angle_deg": 0.0, "name": format!("L{i}")}),
            )
        })
        .collect();
    let host = Desktop::connect(&mut world, "host", true, canvas_of(&items));
    let mut guest = Desktop::connect(&mut world, "guest", false, Canvas::default());
    guest.settle(&mut world);
    guest.canvas.assert_shows(&items, "guest");
    let stored = world.persisted.len();

    let canvas = host.canvas.clone();
    world.leave(host.peer);
    let mut host = Desktop::connect(&mut world, "host", true, canvas);
    let back = host.settle(&mut world);
    assert!(
        back.is_empty(),
        "the reconnecting host is sent nothing: {back:#?}"
    );
    let to_guest = guest.settle(&mut world);
    assert_eq!(
        summary(&to_guest),
        [
            ("user:left".into(), "host".into()),
            ("user:joined".into(), "host".into())
        ]
    );
    assert_eq!(
        world.persisted.len(),
        stored,
        "an unchanged upload stores nothing"
    );
    assert_converged(&mut world, &mut [&mut host, &mut guest]);
}

/// The server restarts on the same data; both clients reconnect with what their canvases
/// hold, edits made while it was down included, and lose none of it.
#[test]
fn after_a_restart_both_clients_reconnect_and_keep_their_work() {
    let mut world = World::new();
    let mut host = Desktop::connect(&mut world, "host", true, canvas_of(&bench(9..12)));
    let mut guest = Desktop::connect(&mut world, "guest", false, Canvas::default());
    assert_converged(&mut world, &mut [&mut host, &mut guest]);

    let mut restarted = World::loaded(&world.persisted, world.session.initialized());
    let offline = host.canvas.objects.keys().next().unwrap().clone();
    let mut fields = host.canvas.objects[&offline].clone();
    fields["x_mm"] = json!(-1.25);
    host.canvas.set(&offline, &fields);
    let mut host = Desktop::connect(&mut restarted, "host", true, host.canvas);
    let mut guest = Desktop::connect(&mut restarted, "guest", false, guest.canvas);
    assert_converged(&mut restarted, &mut [&mut host, &mut guest]);
    assert_eq!(restarted.items()[&offline]["x_mm"], json!(-1.25));
    assert_eq!(restarted.items().len(), 3);
}

/// A host with two items and a guest, converged; then the host's connection ends.
fn host_away_from_guest() -> (World, BTreeMap<String, Value>, Desktop, Desktop) {
    let mut world = World::new();
    let items = bench(0..2);
    let mut host = Desktop::connect(&mut world, "host", true, canvas_of(&items));
    let mut guest = Desktop::connect(&mut world, "guest", false, Canvas::default());
    assert_converged(&mut world, &mut [&mut host, &mut guest]);
    world.leave(host.peer);
    (world, items, host, guest)
}

/// A host reconnects while a colleague edits. Between its join and its upload (one round
/// trip) the session cannot know the host's canvas: an item it holds is told to it by
/// `update_item`, never `add_item` (a duplicate on its canvas); an item made while it was
/// away, whose update it ignores for lacking it, reaches it in answer to its upload.
#[test]
fn a_host_reconnecting_while_a_colleague_edits_gets_no_duplicate_and_no_gap() {
    let (mut world, items, mut host, mut guest) = host_away_from_guest();
    let (t, made_away, d) = fixture_item(2);
    guest.edit(&mut world, "add_item", &made_away, &expected_item(&d, &t));
    guest.settle(&mut world);

    host.reconnect(&mut world);
    let held = items.keys().next().expect("a held item").clone();
    guest.drag(&mut world, &held, 12.5);
    guest.drag(&mut world, &made_away, -3.0);
    let told = host.receive(&mut world);
    assert!(
        told.iter().all(|m| m["command"]["action"] != "add_item"),
        "nothing reaches the host as add_item before its upload: {told:#?}"
    );
    assert_eq!(host.canvas.objects[&held]["x_mm"], json!(12.5));
    assert!(!host.canvas.objects.contains_key(&made_away));

    host.answer_join(&mut world);
    assert_converged(&mut world, &mut [&mut host, &mut guest]);
    assert_eq!(world.items()[&made_away]["x_mm"], json!(-3.0));
    assert_eq!(world.items().len(), 3);
}

/// A host renamed an item while away, reconnects and drags it before its upload reaches the
/// session. The move writes only the position; the rename its dict carries still counts as
/// the host's edit when the upload arrives (a move is not a whole-dict command), so it is
/// written, and the host is not corrected back to the old name.
#[test]
fn a_drag_before_the_upload_does_not_hide_an_offline_rename() {
    let (mut world, items, mut host, mut guest) = host_away_from_guest();
    let renamed = items.keys().next().expect("an item").clone();
    let mut fields = host.canvas.objects[&renamed].clone();
    fields["name"] = json!("renamed offline");
    host.canvas.set(&renamed, &fields);

    host.reconnect(&mut world);
    host.drag(&mut world, &renamed, 7.5);
    host.answer_join(&mut world);
    assert_converged(&mut world, &mut [&mut host, &mut guest]);
    assert_eq!(world.items()[&renamed]["name"], json!("renamed offline"));
    assert_eq!(world.items()[&renamed]["x_mm"], json!(7.5));
}

/// Two hosts open the same bench file. The second one's upload is on its way when the first
/// drags an item (the second is told by `update_item`: it holds the item), a guest removes it
/// (`remove_item`), and the first adds it back (an undo). Once the second has applied the
/// removal its canvas lacks the item, so the re-creation reaches it as `add_item`: an
/// `update_item` would be ignored and leave it without the item.
#[test]
fn a_second_host_is_sent_a_re_creation_after_a_removal_as_add_item() {
    let mut world = World::new();
    let items = bench(0..2);
    let mut first = Desktop::connect(&mut world, "first", true, canvas_of(&items));
    let mut guest = Desktop::connect(&mut world, "guest", false, Canvas::default());
    assert_converged(&mut world, &mut [&mut first, &mut guest]);

    let (peer, _) = world.legacy("second");
    let mut second = Desktop {
        name: "second".into(),
        peer,
        host: true,
        canvas: canvas_of(&items),
    };
    let uuid = items.keys().next().expect("an item").clone();
    first.drag(&mut world, &uuid, 4.0);
    guest.receive(&mut world);
    guest.remove(&mut world, &uuid);
    first.receive(&mut world);
    let fields = second.canvas.objects[&uuid].clone();
    first.edit(&mut world, "add_item", &uuid, &fields);

    second.answer_join(&mut world);
    second.receive(&mut world);
    assert_converged(&mut world, &mut [&mut first, &mut guest, &mut second]);
    assert!(world.items().contains_key(&uuid));
}
