//! What the Optiverse desktop client sends and what the server remembers about each one.
//!
//! A legacy client sends its *whole* item dict with every command, and that dict may predate
//! changes the server already sent it (a message and a command can cross on the wire). To
//! write only what the client really changed, the server remembers, per connection and item,
//! every version of the item the connection sent or was told since its previous command on
//! it. A field whose value appears in one of those versions is not a change (PROTOCOL §3.3).
//!
//! The client never acknowledges what it applied, so any message the server sent about an
//! item may still be on its way when the client commands it, and be applied after. The
//! server remembers the last such message per item: only a command on an item proves that
//! the message that first put it on the canvas was applied.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use serde_json::Value;

use super::value::{json_equal, ItemFields};

/// The fields `move_item` writes.
pub const POSITION_FIELDS: [&str; 3] = ["x_mm", "y_mm", "angle_deg"];

/// How many versions of one item a connection's memory keeps. A client's dict lags the
/// server by the messages in flight, far fewer than this even during a fast drag.
const VERSIONS_KEPT: usize = 64;

/// A scene command's action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Add,
    Move,
    Update,
    Remove,
}

impl Action {
    pub fn parse(s: &str) -> Option<Action> {
        match s {
            "add_item" => Some(Action::Add),
            "move_item" => Some(Action::Move),
            "update_item" => Some(Action::Update),
            "remove_item" => Some(Action::Remove),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Add => "add_item",
            Action::Move => "move_item",
            Action::Update => "update_item",
            Action::Remove => "remove_item",
        }
    }
}

/// A validated scene command from an Optiverse client.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    pub action: Action,
    pub item_type: Option<String>,
    pub item_id: Arc<str>,
    pub data: ItemFields,
}

/// One item as a host upload (`sync:full_state`) carries it.
#[derive(Debug, Clone, PartialEq)]
pub struct UploadedItem {
    pub uuid: Arc<str>,
    pub item_type: Option<String>,
    pub fields: ItemFields,
}

/// What the messages the server sent a connection about an item, and that it may not have
/// applied yet, would leave on its canvas if applied after its command.
#[derive(Debug, Clone, Default)]
pub struct InFlight {
    /// The data of the last message that rebuilds the item from its whole dict (`add_item`,
    /// `update_item`, a full state).
    pub whole: Option<Arc<ItemFields>>,
    /// The data of the last `move_item` after it: the client takes only its position.
    pub position: Option<Arc<ItemFields>>,
}

#[derive(Debug, Default)]
struct ItemMemory {
    versions: VecDeque<Arc<ItemFields>>,
    /// The messages sent about the item that the connection may not have applied yet.
    in_flight: Option<InFlight>,
    /// A message that re-creates the item on a canvas that held an earlier one was sent: it
    /// may be applied after a removal of the earlier one.
    recreation_in_flight: bool,
}

/// Where a legacy connection stands with `sync:full_state` (PROTOCOL §3.4, README "Choices").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncState {
    /// It has neither asked for the scene nor uploaded one.
    #[default]
    Idle,
    /// It asked while the scene was not initialized: it gets the scene as soon as it is.
    Awaiting,
    /// It was sent the scene as a full state.
    Synced,
    /// It uploaded its canvas: it acts as a host, and a full state would replace a canvas the
    /// server has only in part. It gets what it lacks as commands instead.
    Uploader,
}

/// The server's memory of one legacy connection: which items its scene holds and which
/// versions of them it has seen.
#[derive(Debug, Default)]
pub struct PeerView {
    pub sync: SyncState,
    items: HashMap<Arc<str>, ItemMemory>,
    told_removed: HashSet<Arc<str>>,
    /// Items told by `update_item` before the connection uploaded or was sent the scene, that
    /// it was not known to hold: the client ignores an update of an item it lacks, so it holds
    /// them only if it held them already (a host reconnecting with its canvas). Its upload
    /// settles which.
    unconfirmed: HashSet<Arc<str>>,
}

impl PeerView {
    /// Whether the connection's scene holds the item (as far as the server knows: it sent or
    /// was told about it).
    pub fn has(&self, uuid: &str) -> bool {
        self.items.contains_key(uuid)
    }

    /// Whether the connection was told of the item's removal (or removed it itself).
    pub fn was_told_removed(&self, uuid: &str) -> bool {
        self.told_removed.contains(uuid)
    }

    /// Whether the connection sent or was told `value` for `field` since its last command on
    /// the item.
    pub fn knows(&self, uuid: &str, field: &str, value: &Value) -> bool {
        self.items.get(uuid).is_some_and(|memory| {
            memory
                .versions
                .iter()
                .any(|v| v.get(field).is_some_and(|known| json_equal(known, value)))
        })
    }

    /// What messages sent about the item that the connection may not have applied yet (they
    /// may be applied after the command the server is handling) would leave.
    pub fn in_flight(&self, uuid: &str) -> Option<&InFlight> {
        self.items.get(uuid)?.in_flight.as_ref()
    }

    /// Whether a message that re-creates the item on the connection's canvas may arrive
    /// after the connection removed its earlier copy.
    pub fn recreation_in_flight(&self, uuid: &str) -> bool {
        self.items.get(uuid).is_some_and(|m| m.recreation_in_flight)
    }

    /// Records that the connection was sent `fields` as the item's state by a message with
    /// `action`. A message that first puts an item on the canvas is applied before any
    /// command about the item (which proves it), unless the canvas held an earlier item of
    /// that uuid, which a command may still be about.
    pub fn tell(&mut self, uuid: &Arc<str>, fields: &Arc<ItemFields>, action: Action) {
        if action == Action::Add {
            self.unconfirmed.remove(uuid);
        }
        let held_before = self.told_removed.remove(uuid);
        let fresh = !self.items.contains_key(uuid) && !held_before;
        let memory = self.items.entry(uuid.clone()).or_default();
        if !fresh {
            let in_flight = memory.in_flight.get_or_insert_with(InFlight::default);
            if action == Action::Move {
                in_flight.position = Some(fields.clone());
            } else {
                in_flight.whole = Some(fields.clone());
                in_flight.position = None;
            }
            memory.recreation_in_flight |= action == Action::Add;
        }
        if memory.versions.len() == VERSIONS_KEPT {
            memory.versions.pop_front();
        }
        memory.versions.push_back(fields.clone());
    }

    /// Records that the connection was sent `fields` by an `update_item` about an item it was
    /// not known to hold (it has neither uploaded nor been sent the scene): it holds the item
    /// only if it held it already.
    pub fn tell_unconfirmed(&mut self, uuid: &Arc<str>, fields: &Arc<ItemFields>) {
        if !self.has(uuid) {
            self.unconfirmed.insert(uuid.clone());
        }
        self.tell(uuid, fields, Action::Update);
        // Unlike a message that first puts an item on the canvas, it may be applied after a
        // command or an upload of the item.
        if let Some(memory) = self.items.get_mut(uuid) {
            memory.in_flight = Some(InFlight {
                whole: Some(fields.clone()),
                position: None,
            });
        }
    }

    /// Records the connection's upload of its canvas: an item it was told of only by an
    /// `update_item` it may have ignored, and that its upload lacks, is not on its canvas.
    pub fn uploaded<'a>(&mut self, uuids: impl IntoIterator<Item = &'a Arc<str>>) {
        let uploaded: HashSet<&Arc<str>> = uuids.into_iter().collect();
        for uuid in std::mem::take(&mut self.unconfirmed) {
            if !uploaded.contains(&uuid) {
                self.items.remove(&uuid);
            }
        }
    }

    /// Records that the connection's scene no longer holds the item.
    pub fn tell_removed(&mut self, uuid: &Arc<str>) {
        self.unconfirmed.remove(uuid);
        self.items.remove(uuid);
        self.told_removed.insert(uuid.clone());
    }

    /// Starts a new window after a command of the connection on the item: it now holds
    /// `sent`. What is in flight stays so.
    pub fn commanded(&mut self, uuid: &Arc<str>, sent: Arc<ItemFields>) {
        self.told_removed.remove(uuid);
        self.unconfirmed.remove(uuid);
        let memory = self.items.entry(uuid.clone()).or_default();
        memory.versions.clear();
        memory.versions.push_back(sent);
    }

    /// Records a move of the item by the connection: it holds `position`, and what it was told
    /// or sent before stays known until its next whole-dict command.
    pub fn moved(&mut self, uuid: &Arc<str>, position: Arc<ItemFields>) {
        self.told_removed.remove(uuid);
        self.unconfirmed.remove(uuid);
        let memory = self.items.entry(uuid.clone()).or_default();
        if memory.versions.len() == VERSIONS_KEPT {
            memory.versions.pop_front();
        }
        memory.versions.push_back(position);
    }

    /// Records that the connection's canvas was replaced by a full state of `items`.
    pub fn replace_all(&mut self, items: &[(Arc<str>, Arc<ItemFields>)]) {
        self.unconfirmed.clear();
        let kept: HashSet<&str> = items.iter().map(|(uuid, _)| uuid.as_ref()).collect();
        self.items.retain(|uuid, _| kept.contains(uuid.as_ref()));
        for (uuid, fields) in items {
            self.tell(uuid, fields, Action::Add);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(v: Value) -> Arc<ItemFields> {
        match v {
            Value::Object(map) => Arc::new(map),
            _ => unreachable!("test helper takes objects"),
        }
    }

    #[test]
    fn knows_values_told_and_sent_until_the_next_command() {
        let uuid: Arc<str> = "a".into();
        let mut peer = PeerView::default();
        assert!(!peer.has("a"));
        assert!(peer.in_flight("a").is_none());
        peer.tell(
            &uuid,
            &fields(json!({"name": "L1", "x_mm": 0.0})),
            Action::Add,
        );
        assert!(
            peer.in_flight("a").is_none(),
            "a command on `a` proves the add was applied"
        );
        peer.tell(
            &uuid,
            &fields(json!({"name": "L2", "x_mm": 0.0})),
            Action::Update,
        );
        assert_eq!(
            peer.in_flight("a").unwrap().whole.as_ref().unwrap()["name"],
            json!("L2")
        );
        assert!(peer.has("a"));
        assert!(peer.knows("a", "name", &json!("L1")));
        assert!(peer.knows("a", "name", &json!("L2")));
        assert!(peer.knows("a", "x_mm", &json!(0)));
        assert!(!peer.knows("a", "name", &json!("L3")));
        peer.commanded(&uuid, fields(json!({"name": "L3"})));
        assert!(
            peer.in_flight("a").is_some(),
            "a command proves nothing about later messages"
        );
        assert!(!peer.knows("a", "name", &json!("L1")));
        assert!(peer.knows("a", "name", &json!("L3")));
    }

    #[test]
    fn memory_per_item_is_bounded() {
        let uuid: Arc<str> = "a".into();
        let mut peer = PeerView::default();
        for i in 0..(VERSIONS_KEPT + 10) {
            peer.tell(&uuid, &fields(json!({ "x_mm": i })), Action::Update);
        }
        assert!(!peer.knows("a", "x_mm", &json!(0)));
        assert!(peer.knows("a", "x_mm", &json!(VERSIONS_KEPT + 9)));
    }

    #[test]
    fn removal_forgets_the_item() {
        let uuid: Arc<str> = "a".into();
        let mut peer = PeerView::default();
        peer.tell(&uuid, &fields(json!({"x_mm": 1})), Action::Add);
        peer.tell_removed(&uuid);
        assert!(!peer.has("a"));
        assert!(peer.was_told_removed("a"));
        peer.tell(&uuid, &fields(json!({"x_mm": 1})), Action::Add);
        assert!(!peer.was_told_removed("a"));
        assert!(
            peer.in_flight("a").is_some(),
            "a command may be about the earlier item"
        );
    }

    #[test]
    fn actions_round_trip() {
        for a in [Action::Add, Action::Move, Action::Update, Action::Remove] {
            assert_eq!(Action::parse(a.as_str()), Some(a));
        }
        assert_eq!(Action::parse("explode"), None);
    }
}
