//! The real desktop clients' flows (issue 11, README "Choices"), as the session sees them: a
//! [`Desktop`] acts as both variants do (a host uploads its canvas whenever it hears
//! `user:joined`, every client asks for the scene on its ack, a received message is applied as
//! the client applies it), and every flow ends with each canvas showing the document, no item
//! lost and none duplicated. `tests/realclient` runs the same flows with the real clients.

mod common;

use std::collections::BTreeMap;

use collab_core::doc::PeerId;
use common::*;
use serde_json::{json, Value};

/// One desktop client: its connection, its canvas, and its role (from its connect dialog;
/// the server cannot tell it).
struct Desktop {
    name: String,
    peer: PeerId,
    host: bool,
    canvas: Canvas,
}

impl Desktop {
    /// "Connect to server" with `canvas` on screen. A host answers the `user:joined` naming
    /// itself by uploading its canvas, then both roles send `sync:request` on the ack.
    fn connect(world: &mut World, name: &str, host: bool, canvas: Canvas) -> Desktop {
        let (peer, _) = world.legacy(name);
        let mut desktop = Desktop {
            name: name.to_owned(),
            peer,
            host,
            canvas,
        };
        if host {
            desktop.upload(world);
        }
        world.send(peer, json!({"type": "sync:request", "user_id": name}));
        desktop.receive(world);
        desktop
    }

    /// The whole canvas as `sync:full_state`.
    fn upload(&self, world: &mut World) {
        let items: Vec<Value> = self
            .canvas
            .objects
            .iter()
            .map(|(uuid, fields)| {
                let mut item = fields.clone();
                item["item_uuid"] = json!(uuid);
                item
            })
            .collect();
        let refs: Vec<&Value> = items.iter().collect();
        world.send(self.peer, upload(&refs, &self.name));
    }

    /// Applies what arrived; a host uploads its canvas on each `user:joined`.
    fn receive(&mut self, world: &mut World) -> Vec<Value> {
        let got = world.take_json(self.peer);
        for msg in &got {
            self.canvas.apply(msg);
            if self.host && msg["type"] == "user:joined" && msg["user_id"] != self.name.as_str() {
                self.upload(world);
            }
        }
        got
    }

    /// Sends `ping` and applies everything up to the `pong`: all the session owes this
    /// client (corrections included) has arrived.
    fn settle(&mut self, world: &mut World) -> Vec<Value> {
        let mut got = self.receive(world);
        world.send(self.peer, json!({"type": "ping"}));
        got.extend(self.receive(world));
        assert_eq!(got.pop().map(|p| p["type"].clone()), Some(json!("pong")));
        got
    }

    /// A local edit of the whole item (a drag or a property change), sent as `action`.
    fn edit(&mut self, world: &mut World, action: &str, uuid: &str, fields: &Value) {
        self.canvas.set(uuid, fields);
        let mut data = fields.clone();
        data["item_uuid"] = json!(uuid);
        let item_type = fields["item_type"]
            .as_str()
            .expect("an item_type")
            .to_owned();
        world.send(
            self.peer,
            command(action, &item_type, uuid, data, &self.name),
        );
    }

    /// A drag: `x_mm` changes, `move_item` is sent.
    fn drag(&mut self, world: &mut World, uuid: &str, x_mm: f64) {
        let mut fields = self.canvas.objects[uuid].clone();
        fields["x_mm"] = json!(x_mm);
        self.edit(world, "move_item", uuid, &fields);
    }

    fn remove(&mut self, world: &mut World, uuid: &str) {
        let item_type = self.canvas.objects[uuid]["item_type"].clone();
        self.canvas.remove(uuid);
        let item_type = item_type.as_str().unwrap().to_owned();
        world.send(
            self.peer,
            command("remove_item", &item_type, uuid, json!({}), &self.name),
        );
    }
}

/// Fixture items `indices` as a canvas shows them: uuid → fields (with `item_type`).
fn bench(indices: impl IntoIterator<Item = usize>) -> BTreeMap<String, Value> {
    indices
        .into_iter()
        .map(fixture_item)
        .map(|(t, u, d)| (u, expected_item(&d, &t)))
        .collect()
}

fn canvas_of(items: &BTreeMap<String, Value>) -> Canvas {
    let entries: Vec<(&str, &Value)> = items.iter().map(|(u, f)| (u.as_str(), f)).collect();
    Canvas::holding(&entries)
}

/// Settles every desktop, then asserts each canvas shows the document.
fn assert_converged(world: &mut World, desktops: &mut [&mut Desktop]) {
    // Twice: what one client's settling sent (an upload) reaches the others on the second.
    for _ in 0..2 {
        for desktop in desktops.iter_mut() {
            desktop.settle(world);
        }
    }
    let document = world.items();
    for desktop in desktops.iter() {
        desktop.canvas.assert_shows(&document, &desktop.name);
    }
    assert_eq!(
        doc_items(&world.stored_doc()),
        doc_items(&world.doc()),
        "all stored"
    );
}

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
