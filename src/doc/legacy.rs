//! What the Optiverse desktop client sends and what the server remembers about each one.
//!
//! A legacy client sends its *whole* item dict with every command, and that dict may predate
//! changes the server already sent it (a message and a command can cross on the wire). To
//! write only what the client really changed, the server remembers, per connection and item,
//! every version of the item the connection sent or was told since its previous command on
//! it. A field whose value appears in one of those versions is not a change (PROTOCOL §3.3).

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

#[derive(Debug, Default)]
struct ItemMemory {
    versions: VecDeque<Arc<ItemFields>>,
    told_since_command: bool,
}

/// The server's memory of one legacy connection: which items its scene holds and which
/// versions of them it has seen.
#[derive(Debug, Default)]
pub struct PeerView {
    /// The connection was told it is the host, and a host ignores `sync:full_state`.
    pub ignores_full_state: bool,
    items: HashMap<Arc<str>, ItemMemory>,
    told_removed: HashSet<Arc<str>>,
}

impl PeerView {
    pub fn new(ignores_full_state: bool) -> Self {
        PeerView {
            ignores_full_state,
            ..PeerView::default()
        }
    }

    /// Whether the connection's scene holds the item.
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

    /// Whether the server sent the connection anything about the item since the connection's
    /// previous command on it. An item the server never described to it counts as told: the
    /// connection may hold a version the server knows nothing about.
    pub fn told_since_command(&self, uuid: &str) -> bool {
        self.items.get(uuid).is_none_or(|m| m.told_since_command)
    }

    /// Records that the connection was sent `fields` as the item's state.
    pub fn tell(&mut self, uuid: &Arc<str>, fields: &Arc<ItemFields>) {
        self.told_removed.remove(uuid);
        let memory = self.items.entry(uuid.clone()).or_default();
        if memory.versions.len() == VERSIONS_KEPT {
            memory.versions.pop_front();
        }
        memory.versions.push_back(fields.clone());
        memory.told_since_command = true;
    }

    /// Records that the connection's scene no longer holds the item.
    pub fn tell_removed(&mut self, uuid: &Arc<str>) {
        self.items.remove(uuid);
        self.told_removed.insert(uuid.clone());
    }

    /// Starts a new window after a command of the connection on the item: it now holds
    /// `sent`, and nothing has been told since.
    pub fn commanded(&mut self, uuid: &Arc<str>, sent: Arc<ItemFields>) {
        self.told_removed.remove(uuid);
        let memory = self.items.entry(uuid.clone()).or_default();
        memory.versions.clear();
        memory.versions.push_back(sent);
        memory.told_since_command = false;
    }

    /// Replaces the connection's whole scene, as a `sync:full_state` does.
    pub fn reset(&mut self) {
        self.items.clear();
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
        let mut peer = PeerView::new(false);
        assert!(!peer.has("a"));
        assert!(peer.told_since_command("a"));
        peer.tell(&uuid, &fields(json!({"name": "L1", "x_mm": 0.0})));
        peer.tell(&uuid, &fields(json!({"name": "L2", "x_mm": 0.0})));
        assert!(peer.has("a"));
        assert!(peer.knows("a", "name", &json!("L1")));
        assert!(peer.knows("a", "name", &json!("L2")));
        assert!(peer.knows("a", "x_mm", &json!(0)));
        assert!(!peer.knows("a", "name", &json!("L3")));
        peer.commanded(&uuid, fields(json!({"name": "L3"})));
        assert!(!peer.told_since_command("a"));
        assert!(!peer.knows("a", "name", &json!("L1")));
        assert!(peer.knows("a", "name", &json!("L3")));
    }

    #[test]
    fn memory_per_item_is_bounded() {
        let uuid: Arc<str> = "a".into();
        let mut peer = PeerView::new(false);
        for i in 0..(VERSIONS_KEPT + 10) {
            peer.tell(&uuid, &fields(json!({ "x_mm": i })));
        }
        assert!(!peer.knows("a", "x_mm", &json!(0)));
        assert!(peer.knows("a", "x_mm", &json!(VERSIONS_KEPT + 9)));
    }

    #[test]
    fn removal_forgets_the_item() {
        let uuid: Arc<str> = "a".into();
        let mut peer = PeerView::new(false);
        peer.tell(&uuid, &fields(json!({"x_mm": 1})));
        peer.tell_removed(&uuid);
        assert!(!peer.has("a"));
        assert!(peer.was_told_removed("a"));
        peer.tell(&uuid, &fields(json!({"x_mm": 1})));
        assert!(!peer.was_told_removed("a"));
    }

    #[test]
    fn actions_round_trip() {
        for a in [Action::Add, Action::Move, Action::Update, Action::Remove] {
            assert_eq!(Action::parse(a.as_str()), Some(a));
        }
        assert_eq!(Action::parse("explode"), None);
    }
}
