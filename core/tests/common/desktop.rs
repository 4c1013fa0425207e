//! A desktop client as both real variants act (README "Choices",
//! `shared/optiverse-client/README.md`), driving a [`World`]: a host uploads its canvas
//! whenever it hears `user:joined` (its own included), every client asks for the scene on its
//! ack, and what it receives is applied as the client applies it ([`Canvas`]), when the test
//! says (holding messages back imitates the network's delay).

use std::collections::BTreeMap;

use collab_core::doc::PeerId;
use serde_json::{json, Value};

use super::{command, doc_items, expected_item, fixture_item, upload, Canvas, World};

/// One desktop client: its connection, its canvas, and its role (from its connect dialog;
/// the server cannot tell it).
pub struct Desktop {
    pub name: String,
    pub peer: PeerId,
    pub host: bool,
    pub canvas: Canvas,
}

impl Desktop {
    /// "Connect to server" with `canvas` on screen. A host answers the `user:joined` naming
    /// itself by uploading its canvas, then both roles send `sync:request` on the ack.
    pub fn connect(world: &mut World, name: &str, host: bool, canvas: Canvas) -> Desktop {
        let (peer, _) = world.legacy(name);
        let mut desktop = Desktop {
            name: name.to_owned(),
            peer,
            host,
            canvas,
        };
        desktop.answer_join(world);
        desktop.receive(world);
        desktop
    }

    /// Connects again with the canvas it has, up to the ack: the round trip before its
    /// answer (a host's upload, a `sync:request`) reaches the session. [`Desktop::answer_join`]
    /// sends that answer.
    pub fn reconnect(&mut self, world: &mut World) {
        let (peer, _) = world.legacy(&self.name);
        self.peer = peer;
    }

    /// What the client sends once it has read its own `user:joined` and the ack: a host
    /// uploads its canvas, and both roles send `sync:request`.
    pub fn answer_join(&self, world: &mut World) {
        if self.host {
            self.upload(world);
        }
        world.send(
            self.peer,
            json!({"type": "sync:request", "user_id": self.name}),
        );
    }

    /// The whole canvas as `sync:full_state`.
    pub fn upload(&self, world: &mut World) {
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
    pub fn receive(&mut self, world: &mut World) -> Vec<Value> {
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
    pub fn settle(&mut self, world: &mut World) -> Vec<Value> {
        let mut got = self.receive(world);
        world.send(self.peer, json!({"type": "ping"}));
        got.extend(self.receive(world));
        assert_eq!(got.pop().map(|p| p["type"].clone()), Some(json!("pong")));
        got
    }

    /// A local edit of the whole item (a drag or a property change), sent as `action`.
    pub fn edit(&mut self, world: &mut World, action: &str, uuid: &str, fields: &Value) {
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
    pub fn drag(&mut self, world: &mut World, uuid: &str, x_mm: f64) {
        let mut fields = self.canvas.objects[uuid].clone();
        fields["x_mm"] = json!(x_mm);
        self.edit(world, "move_item", uuid, &fields);
    }

    pub fn remove(&mut self, world: &mut World, uuid: &str) {
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
pub fn bench(indices: impl IntoIterator<Item = usize>) -> BTreeMap<String, Value> {
    indices
        .into_iter()
        .map(fixture_item)
        .map(|(t, u, d)| (u, expected_item(&d, &t)))
        .collect()
}

pub fn canvas_of(items: &BTreeMap<String, Value>) -> Canvas {
    let entries: Vec<(&str, &Value)> = items.iter().map(|(u, f)| (u.as_str(), f)).collect();
    Canvas::holding(&entries)
}

/// Settles every desktop, then asserts each canvas shows the document.
pub fn assert_converged(world: &mut World, desktops: &mut [&mut Desktop]) {
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
