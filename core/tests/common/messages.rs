//! Optiverse JSON messages as tests build and check them: commands and uploads as the desktop
//! client sends them, the fixture items, and checks of what the server sends (placeholder
//! fixes, timestamps, errors, scenes).
//!
//! Shared by the core's tests (`core/tests/common`) and the socket suites (`tests/common`
//! includes this file), so it depends on nothing but `serde_json` and `collab_core`.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use collab_core::doc::value::json_equal;
use serde_json::{json, Value};

/// A `command` message as the Optiverse client sends it.
pub fn command(action: &str, item_type: &str, item_id: &str, data: Value, user: &str) -> Value {
    json!({
        "type": "command",
        "command": {"action": action, "item_type": item_type, "item_id": item_id, "data": data},
        "timestamp": "2026-11-25T19:22:01.123Z",
        "user_id": user,
    })
}

/// A `sync:full_state` upload of `items` (whole dicts) as the desktop client sends it.
pub fn upload(items: &[&Value], user: &str) -> Value {
    json!({
        "type": "sync:full_state",
        "state": {"items": items, "version": 1, "timestamp": "2026-11-25T19:22:01.123Z"},
        "user_id": user,
    })
}

/// Where the fixture scenes live (`shared/fixtures` beside the project).
fn fixtures_dir() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .map(|dir| dir.join("shared/fixtures"))
        .find(|dir| dir.is_dir())
        .unwrap_or_else(|| panic!("no shared/fixtures above {}", manifest.display()))
}

/// Every item of every fixture scene in `shared/fixtures`.
pub fn fixture_items() -> Vec<Value> {
    let dir = fixtures_dir();
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("fixtures at {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".scene.json"))
        .collect();
    paths.sort();
    paths
        .iter()
        .flat_map(|p| {
            let scene: Value = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
            scene["items"].as_array().cloned().unwrap_or_default()
        })
        .collect()
}

/// A fixture item (by index) as an `add_item` command payload: (item_type, uuid, data).
pub fn fixture_item(i: usize) -> (String, String, Value) {
    let items = fixture_items();
    let item = items[i % items.len()].clone();
    let item_type = item["_type"].as_str().unwrap_or("component").to_owned();
    let uuid = item["item_uuid"].as_str().unwrap().to_owned();
    (item_type, uuid, item)
}

/// An item's fields without the keys the server adds (`uuid`, `item_uuid`).
pub fn normalize(item: &Value) -> Value {
    let mut item = item.clone();
    if let Some(map) = item.as_object_mut() {
        map.remove("uuid");
        map.remove("item_uuid");
    }
    item
}

/// An item added with `data`, as a full state, a command or the HTTP scene shows it after
/// [`normalize`]: every field of `data` plus `item_type`.
pub fn expected_item(data: &Value, item_type: &str) -> Value {
    let mut item = normalize(data);
    item["item_type"] = json!(item_type);
    item
}

/// `data` plus its `item_type`, as the document holds an item added by `add_item` (its
/// `item_uuid` included).
pub fn with_type(data: &Value, item_type: &str) -> Value {
    let mut data = data.clone();
    data["item_type"] = json!(item_type);
    data
}

/// Items of a scene (`state` of `sync:full_state`) keyed by uuid, [`normalize`]d.
pub fn scene_by_uuid(state: &Value) -> BTreeMap<String, Value> {
    state["items"]
        .as_array()
        .unwrap_or_else(|| panic!("a scene with items: {state}"))
        .iter()
        .map(|item| (item["uuid"].as_str().unwrap().to_owned(), normalize(item)))
        .collect()
}

/// The only message of `msgs`, asserting there is exactly one.
pub fn only(msgs: &[Value]) -> &Value {
    assert_eq!(msgs.len(), 1, "expected exactly one message, got {msgs:#?}");
    &msgs[0]
}

/// The commands among `messages`, as (action, item id, user).
pub fn commands(messages: &[Value]) -> Vec<(String, String, String)> {
    messages
        .iter()
        .filter(|m| m["type"] == "command")
        .map(|m| {
            (
                m["command"]["action"].as_str().unwrap().to_owned(),
                m["command"]["item_id"].as_str().unwrap().to_owned(),
                m["user_id"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

/// Each message as `(type, what it is about)`: a command's action and item, a user event's
/// user, a full state's item count.
pub fn summary(messages: &[Value]) -> Vec<(String, String)> {
    messages
        .iter()
        .map(|m| {
            let kind = m["type"].as_str().unwrap_or("?").to_owned();
            let about = match kind.as_str() {
                "command" => format!("{} {}", m["command"]["action"], m["command"]["item_id"])
                    .replace('"', ""),
                "user:joined" | "user:left" => m["user_id"].as_str().unwrap_or("").to_owned(),
                "sync:full_state" => format!(
                    "{} items",
                    m["state"]["items"].as_array().map_or(0, Vec::len)
                ),
                _ => String::new(),
            };
            (kind, about)
        })
        .collect()
}

/// Asserts two JSON values are equal as a person reads them (`1` equals `1.0`).
pub fn assert_same(actual: &Value, expected: &Value, context: &str) {
    assert!(
        json_equal(actual, expected),
        "{context}:\n  got      {actual}\n  expected {expected}"
    );
}

/// Asserts `t` is an RFC 3339 UTC timestamp with milliseconds: `2026-11-25T19:22:01.123Z`.
pub fn assert_timestamp(t: &Value) {
    let s = t
        .as_str()
        .unwrap_or_else(|| panic!("timestamp is a string: {t}"));
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| r.into_iter().all(|i| b[i].is_ascii_digit());
    let ok = b.len() == 24
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && b[19] == b'.'
        && digits(20..23)
        && b[23] == b'Z';
    assert!(ok, "not an RFC 3339 UTC timestamp with milliseconds: {s:?}");
}

/// Asserts the message is `{"type":"error","code":code,"message":...}`.
pub fn assert_error(msg: &Value, code: &str) {
    assert_eq!(msg["type"], "error", "{msg}");
    assert_eq!(msg["code"], code, "{msg}");
    assert!(
        msg["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error carries a message: {msg}"
    );
}

/// Whether an item of this type (a JSON string) gets the placeholder compensation.
pub fn is_placeholder(item_type: &Value) -> bool {
    item_type
        .as_str()
        .is_some_and(|t| collab_core::doc::scene::PLACEHOLDER_TYPES.contains(&t))
}

/// The `update_item`s (uuid, normalised data) that must follow `msg` to the same client.
fn placeholder_fixes_due(msg: &Value) -> Vec<(String, Value)> {
    match msg["type"].as_str() {
        Some("command")
            if msg["command"]["action"] == "add_item"
                && is_placeholder(&msg["command"]["item_type"]) =>
        {
            let uuid = msg["command"]["item_id"].as_str().unwrap().to_owned();
            vec![(uuid, normalize(&msg["command"]["data"]))]
        }
        Some("sync:full_state") => msg["state"]["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|item| is_placeholder(&item["item_type"]))
            .map(|item| (item["uuid"].as_str().unwrap().to_owned(), normalize(item)))
            .collect(),
        _ => Vec::new(),
    }
}

/// Asserts that every `add_item` of a placeholder type and every `sync:full_state` among
/// `msgs` is followed at once by its compensating `update_item`s (one per such item, same
/// data, in order), and returns `msgs` without them.
pub fn fold_fixes(msgs: &[Value]) -> Vec<Value> {
    let mut folded = Vec::new();
    let mut rest = msgs.iter();
    while let Some(msg) = rest.next() {
        folded.push(msg.clone());
        for (uuid, data) in placeholder_fixes_due(msg) {
            let fix = rest.next().unwrap_or_else(|| {
                panic!("no update_item for placeholder item {uuid} after {msg}; got {msgs:#?}")
            });
            assert_eq!(fix["type"], "command", "placeholder fix for {uuid}: {fix}");
            let command = &fix["command"];
            assert_eq!(command["action"], "update_item", "placeholder fix: {fix}");
            assert_eq!(command["item_id"], uuid.as_str(), "placeholder fix: {fix}");
            let mut fixed = normalize(&command["data"]);
            if fixed.get("item_type").is_none() {
                fixed["item_type"] = command["item_type"].clone();
            }
            let mut expected = data;
            if expected.get("item_type").is_none() {
                expected["item_type"] = command["item_type"].clone();
            }
            assert_eq!(
                fixed, expected,
                "placeholder fix carries the same data: {fix}"
            );
        }
    }
    folded
}

/// A desktop client's canvas, built from what it received as the client applies it (README
/// "Choices", `shared/optiverse-client/README.md`): `add_item` always creates a new object
/// (a second one for a uuid it has is a duplicate), `update_item` rebuilds an object from the
/// whole data, `move_item` sets the position, `remove_item` deletes, commands for an unknown
/// uuid are ignored; `sync:full_state` clears and rebuilds, except on a fork host.
#[derive(Debug, Default, Clone)]
pub struct Canvas {
    /// Each object's fields (normalized), by uuid.
    pub objects: BTreeMap<String, Value>,
    /// Uuids that were added while the canvas held them.
    pub duplicates: Vec<String>,
    /// A fork host ignores full states.
    pub ignores_full_state: bool,
    /// Whether a full state arrived (the client sends its own adds only after one).
    pub synced: bool,
}

impl Canvas {
    /// A canvas holding `items` (uuid, fields) already.
    pub fn holding(items: &[(&str, &Value)]) -> Canvas {
        let mut canvas = Canvas::default();
        for (uuid, fields) in items {
            canvas.set(uuid, fields);
        }
        canvas
    }

    /// A local edit: the object now has these fields.
    pub fn set(&mut self, uuid: &str, fields: &Value) {
        self.objects.insert(uuid.to_owned(), normalize(fields));
    }

    /// A local deletion.
    pub fn remove(&mut self, uuid: &str) {
        self.objects.remove(uuid);
    }

    pub fn apply(&mut self, msg: &Value) {
        match msg["type"].as_str() {
            Some("sync:full_state") => {
                self.synced = true;
                if !self.ignores_full_state {
                    self.objects = scene_by_uuid(&msg["state"]);
                }
            }
            Some("command") => {
                let command = &msg["command"];
                let uuid = command["item_id"].as_str().expect("an item id").to_owned();
                let data = normalize(&command["data"]);
                match command["action"].as_str() {
                    Some("add_item") => {
                        if self.objects.insert(uuid.clone(), data).is_some() {
                            self.duplicates.push(uuid);
                        }
                    }
                    Some("update_item") => {
                        if let Some(object) = self.objects.get_mut(&uuid) {
                            *object = data;
                        }
                    }
                    Some("move_item") => {
                        if let Some(object) = self.objects.get_mut(&uuid) {
                            for key in ["x_mm", "y_mm", "angle_deg"] {
                                object[key] = data[key].clone();
                            }
                        }
                    }
                    Some("remove_item") => {
                        self.objects.remove(&uuid);
                    }
                    other => panic!("unknown action {other:?}: {msg}"),
                }
            }
            _ => {}
        }
    }

    pub fn apply_all(&mut self, msgs: &[Value]) {
        for msg in msgs {
            self.apply(msg);
        }
    }

    /// Asserts the canvas shows exactly `items` (a scene's items by uuid) and no duplicate.
    pub fn assert_shows(&self, items: &BTreeMap<String, Value>, who: &str) {
        assert!(
            self.duplicates.is_empty(),
            "{who} got add_item for objects it had: {:?}",
            self.duplicates
        );
        let uuids: Vec<&String> = self.objects.keys().collect();
        let expected: Vec<&String> = items.keys().collect();
        assert_eq!(uuids, expected, "{who}'s canvas holds other items");
        for (uuid, fields) in items {
            assert_same(&self.objects[uuid], fields, &format!("{who}'s {uuid}"));
        }
    }
}
