//! `legacy_convergence`: 2–4 Optiverse desktop clients (legacy connections registered with
//! `Scene::add_peer`) and 0–2 Yjs clients edit one `Scene` in any interleaving. Each legacy
//! client is modelled as the real desktop client behaves (`../shared/optiverse-client`): it
//! edits its canvas first and then sends its whole dict as a JSON `command` (parsed by
//! `parse_client_message`), and applies what the server sent it whenever the script says,
//! possibly much later: `add_item` always creates a new object, `move_item` sets
//! `x_mm`/`y_mm`/`angle_deg`, `update_item` replaces the whole dict, `remove_item` deletes,
//! `sync:full_state` clears and rebuilds (except on a fork host). Its role comes from the
//! script, not from the server: a host keeps its canvas across connections, uploads it when it
//! connects (the session's `user:joined` before the ack) and, as upstream, then sends
//! `sync:request`; a client starts empty, sends `sync:request`, and sends no `add_item`
//! before it got a full state. Once everything is delivered, every client's canvas equals the
//! document (`Scene::full_state`) on the fields it models (those its dict has); no `add_item`
//! ever reached a client that held the item; no message ever made a client delete an item
//! the session never removed or replace a field value that the session never held (PROTOCOL
//! §3.3; learnt incrementally from the scene's updates, `held.rs`); and the scene's updates,
//! replayed in order, give its document.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use collab_core::doc::scene::{item_type_of, CORRECTION_DELAY};
use collab_core::doc::value::json_to_any;
use collab_core::doc::{
    Action, CheckedStateVector, CheckedUpdate, CommandMessage, Effects, ItemFields, PeerId,
    PeerMessage, Scene,
};
use collab_core::protocol::json::{parse_client_message, ClientMessage};
use serde_json::{json, Map, Value};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{
    Any, Doc, Map as _, MapPrelim, MapRef, Out, ReadTxn, StateVector, Transact, TransactionMut,
    Update,
};

use super::held::{Held, Persisted};
use super::util::{
    desktop_view, doc_json, fixture_items, items_json, mirror_json, scene_difference,
};

/// `LEGACY_TRACE=1` prints every step, frame and delivery (when replaying an input).
fn tracing() -> bool {
    std::env::var_os("LEGACY_TRACE").is_some()
}

/// One test script.
#[derive(Debug, Clone)]
pub struct LegacyScript {
    /// 2 + `clients % 3` legacy clients.
    pub clients: u8,
    /// `yjs % 3` Yjs clients.
    pub yjs: u8,
    /// Bit `i`: legacy client `i` acts as host; bit `i + 4`: it is the fork variant.
    pub roles: u8,
    pub ops: Vec<LegacyOp>,
}

#[cfg(not(test))]
impl<'a> arbitrary::Arbitrary<'a> for LegacyScript {
    fn arbitrary(u: &mut arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(LegacyScript {
            clients: u.arbitrary()?,
            yjs: u.arbitrary()?,
            roles: u.arbitrary()?,
            ops: super::util::steps(u)?,
        })
    }
}

/// One step. A legacy client connects at its first step.
#[cfg_attr(not(test), derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone)]
pub enum LegacyOp {
    /// The client applies up to `n % 16 + 1` of the messages that reached it.
    Apply {
        client: u8,
        n: u8,
    },
    Add {
        client: u8,
        template: u8,
        x: i16,
        y: i16,
    },
    Move {
        client: u8,
        pick: u8,
        x: i16,
        y: i16,
        angle: Option<u16>,
        /// A drag step: `move_item` then `update_item`.
        drag: bool,
    },
    Update {
        client: u8,
        pick: u8,
        change: Change,
    },
    Remove {
        client: u8,
        pick: u8,
    },
    /// A host uploads its canvas (`sync:full_state`), as on `user:joined`.
    Upload {
        client: u8,
    },
    /// `sync:request` (a reconnecting client sends it twice).
    SyncRequest {
        client: u8,
    },
    /// The socket drops and the client reconnects (undelivered messages are lost).
    Reconnect {
        client: u8,
    },
    /// A Yjs client edits its copy and sends the update.
    Yjs {
        client: u8,
        op: YjsOp,
    },
    /// A Yjs client catches up (SyncStep1 → SyncStep2).
    YjsPull {
        client: u8,
    },
    /// Commands pause long enough for the corrections owed to be sent.
    Pause,
}

/// A local edit of one field by a legacy client.
#[cfg_attr(not(test), derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone)]
pub enum Change {
    Name(u16),
    ZValue(u8),
    Locked(bool),
    Notes(u16),
    /// Changes the nested `interfaces` list.
    Interface {
        index: u8,
        efl: i16,
    },
}

/// An edit by a Yjs client on its copy of the document.
#[cfg_attr(not(test), derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone)]
pub enum YjsOp {
    Set {
        pick: u8,
        field: u8,
        value: i16,
    },
    Move {
        pick: u8,
        x: i16,
        y: i16,
    },
    Remove {
        pick: u8,
    },
    /// A new item; `typed` gives it `item_type` and `item_uuid` fields.
    Add {
        template: u8,
        x: i16,
        typed: bool,
    },
    /// A new item map under an existing uuid (the old map is deleted).
    Replace {
        pick: u8,
        template: u8,
    },
    /// Writes inside a nested `Y.Map` field `meta`.
    Nested {
        pick: u8,
        key: u8,
        value: i16,
    },
    DeleteField {
        pick: u8,
        field: u8,
    },
}

/// Fields a Yjs client sets (never `item_type`: a non-string type is not a real case).
const YJS_FIELDS: [&str; 7] = [
    "name",
    "z_value",
    "locked",
    "notes",
    "x_mm",
    "y_mm",
    "angle_deg",
];

pub(super) fn coordinate(v: i16) -> Value {
    json!(f64::from(v) / 4.0)
}

/// A message on its way to a legacy client.
enum Msg {
    Command(Arc<CommandMessage>),
    FullState(Vec<(Arc<str>, Arc<ItemFields>)>),
}

/// How a client acts, from its connect dialog (the server cannot tell).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// "Host server": keeps its canvas, uploads it on `user:joined`; the fork variant ignores
    /// full states and never asks for one.
    Host { fork: bool },
    /// "Connect to server": starts empty, asks for the scene, adds only once it got one.
    Client,
}

/// An item of a full state as the client receives it (`protocol::json::SceneItem`), without
/// the `uuid` key the client uses as the object's id.
fn full_state_item(uuid: &str, fields: &ItemFields) -> Map<String, Value> {
    let mut item: Map<String, Value> = fields
        .iter()
        .filter(|(k, _)| !["uuid", "item_uuid", "item_type"].contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    item.insert("item_uuid".into(), json!(uuid));
    item.insert("item_type".into(), json!(item_type_of(fields)));
    item
}

/// An item's fields as legacy clients compare them (like `tests/common::normalize`).
pub(super) fn normalize(fields: &Map<String, Value>) -> Value {
    let mut fields = fields.clone();
    fields.remove("uuid");
    fields.remove("item_uuid");
    Value::Object(fields)
}

/// An Optiverse desktop client.
struct Client {
    name: String,
    peer: Option<PeerId>,
    role: Role,
    /// `initial_sync_complete`: a client sends no `add_item` before a full state.
    synced: bool,
    /// The canvas: a list, so a wrong `add_item` shows up as a duplicate.
    objects: Vec<(String, Map<String, Value>)>,
    inbox: VecDeque<Msg>,
    added: usize,
}

impl Client {
    fn holds(&self, uuid: &str) -> bool {
        self.objects.iter().any(|(u, _)| u == uuid)
    }

    fn uuids(&self) -> Vec<String> {
        let mut uuids: Vec<String> = self.objects.iter().map(|(u, _)| u.clone()).collect();
        uuids.sort();
        uuids.dedup();
        uuids
    }

    fn pick(&self, pick: u8) -> Option<(String, Map<String, Value>)> {
        let uuids = self.uuids();
        let uuid = uuids.get(usize::from(pick) % uuids.len().max(1))?.clone();
        let fields = self.objects.iter().find(|(u, _)| *u == uuid)?.1.clone();
        Some((uuid, fields))
    }

    fn set_local(&mut self, uuid: &str, fields: &Map<String, Value>) {
        for (_, f) in self.objects.iter_mut().filter(|(u, _)| u == uuid) {
            *f = fields.clone();
        }
    }

    /// Applies one received message the way the desktop client does, checking first that it
    /// makes the canvas lose nothing the session never held.
    fn apply(&mut self, msg: Msg, held: &Held) {
        if tracing() {
            match &msg {
                Msg::Command(m) => eprintln!(
                    "  {} applies {} {} {}",
                    self.name,
                    m.action.as_str(),
                    m.item_id,
                    serde_json::Value::Object((*m.data).clone())
                ),
                Msg::FullState(items) => eprintln!(
                    "  {} applies a full state of {:?}",
                    self.name,
                    items.iter().map(|(u, _)| u.to_string()).collect::<Vec<_>>()
                ),
            }
        }
        match msg {
            Msg::Command(m) => {
                let uuid = m.item_id.to_string();
                let mut data = (*m.data).clone();
                if !data.contains_key("item_type") {
                    data.insert("item_type".into(), json!(m.item_type.as_ref()));
                }
                let current = self.objects.iter().find(|(u, _)| *u == uuid).map(|o| &o.1);
                match (m.action, current) {
                    (Action::Remove, Some(_)) => held.check_drop(&self.name, &uuid),
                    (Action::Update, Some(old)) => {
                        held.check_replace(&self.name, &uuid, old, &data)
                    }
                    (Action::Move, Some(old)) => {
                        let position: Map<String, Value> = old
                            .iter()
                            .filter(|(k, _)| ["x_mm", "y_mm", "angle_deg"].contains(&k.as_str()))
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect();
                        held.check_replace(&self.name, &uuid, &position, &m.data);
                    }
                    _ => {}
                }
                match m.action {
                    Action::Add => {
                        assert!(
                            !self.holds(&uuid),
                            "{} got add_item for {uuid}, which its canvas holds",
                            self.name
                        );
                        self.objects.push((uuid, data));
                    }
                    Action::Move => {
                        for (_, fields) in self.objects.iter_mut().filter(|(u, _)| *u == uuid) {
                            for key in ["x_mm", "y_mm", "angle_deg"] {
                                if let Some(v) = m.data.get(key) {
                                    fields.insert(key.to_owned(), v.clone());
                                }
                            }
                        }
                    }
                    Action::Update => self.set_local(&uuid, &data),
                    Action::Remove => self.objects.retain(|(u, _)| *u != uuid),
                }
            }
            Msg::FullState(items) => {
                if self.role == (Role::Host { fork: true }) {
                    return;
                }
                let new: Vec<(String, Map<String, Value>)> = items
                    .iter()
                    .map(|(uuid, fields)| (uuid.to_string(), full_state_item(uuid, fields)))
                    .collect();
                for (uuid, old) in &self.objects {
                    match new.iter().find(|(u, _)| u == uuid) {
                        Some((_, replacement)) => {
                            held.check_replace(&self.name, uuid, old, replacement)
                        }
                        None => held.check_drop(&self.name, uuid),
                    }
                }
                self.objects = new;
                self.synced = true;
            }
        }
    }

    /// Applies the next message that reached the client; an `add_item` or full state comes
    /// with the `update_item`s that follow it with the same data (the upstream client's
    /// placeholder fix: one write, applied back to back). Returns false when none is left.
    fn apply_next(&mut self, held: &Held) -> bool {
        let Some(msg) = self.inbox.pop_front() else {
            return false;
        };
        let created: Vec<(Arc<str>, Arc<ItemFields>)> = match &msg {
            Msg::Command(m) if m.action == Action::Add => vec![(m.item_id.clone(), m.data.clone())],
            Msg::FullState(items) => items.clone(),
            Msg::Command(_) => Vec::new(),
        };
        self.apply(msg, held);
        while let Some(Msg::Command(fix)) = self.inbox.front() {
            let is_fix = fix.action == Action::Update
                && created
                    .iter()
                    .any(|(uuid, data)| *uuid == fix.item_id && Arc::ptr_eq(data, &fix.data));
            if !is_fix {
                break;
            }
            if let Some(fix) = self.inbox.pop_front() {
                self.apply(fix, held);
            }
        }
        true
    }

    fn apply_all(&mut self, held: &Held) {
        while self.apply_next(held) {}
    }

    /// The JSON text the client sends for a command on `uuid` with its dict `fields`.
    fn command_text(&self, action: &str, uuid: &str, fields: &Map<String, Value>) -> String {
        command_text(&self.name, action, uuid, fields)
    }

    /// Its canvas, asserting that it holds no uuid twice.
    fn scene(&self) -> BTreeMap<String, Value> {
        let mut scene = BTreeMap::new();
        for (uuid, fields) in &self.objects {
            let previous = scene.insert(uuid.clone(), normalize(fields));
            assert!(
                previous.is_none(),
                "{} holds two objects for {uuid}",
                self.name
            );
        }
        scene
    }
}

/// A desktop client's new item `uuid`, from fixture item `template`, at (`x`, `y`).
pub(super) fn new_item(uuid: &str, template_index: u8, x: i16, y: i16) -> Map<String, Value> {
    let mut item = template(template_index);
    item.insert("item_uuid".into(), json!(uuid));
    item.insert("x_mm".into(), coordinate(x));
    item.insert("y_mm".into(), coordinate(y));
    let kind = item.get("_type").cloned().unwrap_or(json!("component"));
    item.insert("item_type".into(), kind);
    item
}

/// A desktop client drags an item of its dict `fields` to (`x`, `y`), maybe rotating it.
pub(super) fn move_to(fields: &mut Map<String, Value>, x: i16, y: i16, angle: Option<u16>) {
    fields.insert("x_mm".into(), coordinate(x));
    fields.insert("y_mm".into(), coordinate(y));
    if let Some(a) = angle {
        fields.insert("angle_deg".into(), json!(f64::from(a % 360)));
    }
}

/// A desktop client named `name` edits one field of its dict `fields`.
pub(super) fn change_field(fields: &mut Map<String, Value>, name: &str, change: &Change) {
    match change {
        Change::Name(n) => drop(fields.insert("name".into(), json!(format!("{name} {n}")))),
        Change::ZValue(z) => drop(fields.insert("z_value".into(), json!(z % 20))),
        Change::Locked(l) => drop(fields.insert("locked".into(), json!(l))),
        Change::Notes(n) => drop(fields.insert("notes".into(), json!(format!("note {n}")))),
        Change::Interface { index, efl } => {
            let mut list = fields
                .get("interfaces")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let at = usize::from(*index) % list.len().max(1);
            match list.get_mut(at) {
                Some(Value::Object(interface)) if index % 2 == 0 => {
                    interface.insert("efl_mm".into(), coordinate(*efl));
                }
                _ => list.push(json!({"element_type": "mirror", "x1_mm": coordinate(*efl)})),
            }
            fields.insert("interfaces".into(), Value::Array(list));
        }
    }
}

/// The JSON text a desktop client named `user` sends for a command on `uuid` with its dict
/// `fields`.
pub(super) fn command_text(
    user: &str,
    action: &str,
    uuid: &str,
    fields: &Map<String, Value>,
) -> String {
    let mut data = fields.clone();
    let item_type = data
        .get("item_type")
        .and_then(Value::as_str)
        .unwrap_or("component")
        .to_owned();
    if action == "remove_item" {
        data.clear();
    } else {
        data.insert("item_uuid".into(), json!(uuid));
    }
    json!({
        "type": "command",
        "command": {"action": action, "item_type": item_type, "item_id": uuid, "data": data},
        "timestamp": "2026-11-25T19:22:01.123Z",
        "user_id": user,
    })
    .to_string()
}

/// A Yjs client: a yrs replica syncing with the session.
pub(super) struct YjsClient {
    pub(super) doc: Doc,
    pub(super) items: MapRef,
    pub(super) user: Arc<str>,
    added: usize,
}

impl YjsClient {
    pub(super) fn new(client_id: u64, user: &str) -> YjsClient {
        let doc = Doc::with_client_id(client_id);
        let items = doc.get_or_insert_map("items");
        YjsClient {
            doc,
            items,
            user: Arc::from(user),
            added: 0,
        }
    }
}

pub(super) fn template(i: u8) -> Map<String, Value> {
    let items = fixture_items();
    items[usize::from(i) % items.len()].clone()
}

/// Applies `op` to a Yjs client's copy; returns the update it made (`[0, 0]` when none).
pub(super) fn yjs_edit(y: &mut YjsClient, op: &YjsOp) -> Vec<u8> {
    let mut txn = y.doc.transact_mut();
    let item = |txn: &yrs::TransactionMut, uuid: &str| match y.items.get(txn, uuid) {
        Some(Out::YMap(m)) => Some(m),
        _ => None,
    };
    let uuids: Vec<String> = {
        let mut u: Vec<String> = y.items.keys(&txn).map(str::to_owned).collect();
        u.sort();
        u
    };
    let pick = |p: u8| uuids.get(usize::from(p) % uuids.len().max(1)).cloned();
    match op {
        YjsOp::Set {
            pick: p,
            field,
            value,
        } => {
            if let Some(m) = pick(*p).and_then(|u| item(&txn, &u)) {
                let field = YJS_FIELDS[usize::from(*field) % YJS_FIELDS.len()];
                let v = i64::from(*value);
                let any = match field {
                    "name" | "notes" => Any::from(format!("{field} {v}")),
                    "z_value" => Any::Number(yrs::Number::Int(v % 20)),
                    "locked" => Any::Bool(v % 2 == 0),
                    _ => Any::Number(yrs::Number::Float(v as f64 / 4.0)),
                };
                m.insert(&mut txn, field, any);
            }
        }
        YjsOp::Move { pick: p, x, y: yy } => {
            if let Some(m) = pick(*p).and_then(|u| item(&txn, &u)) {
                m.insert(&mut txn, "x_mm", f64::from(*x) / 4.0);
                m.insert(&mut txn, "y_mm", f64::from(*yy) / 4.0);
            }
        }
        YjsOp::Remove { pick: p } => {
            if let Some(u) = pick(*p) {
                y.items.remove(&mut txn, &u);
            }
        }
        YjsOp::Add {
            template: t,
            x,
            typed,
        } => {
            y.added += 1;
            let uuid = format!("{}-{}", y.user, y.added);
            let mut fields = template(*t);
            fields.insert("x_mm".into(), coordinate(*x));
            if *typed {
                let kind = fields.get("_type").cloned().unwrap_or(json!("component"));
                fields.insert("item_type".into(), kind);
                fields.insert("item_uuid".into(), json!(uuid));
            } else {
                fields.remove("item_uuid");
            }
            put_item(&mut txn, &y.items, &uuid, &fields);
        }
        YjsOp::Replace {
            pick: p,
            template: t,
        } => {
            if let Some(u) = pick(*p) {
                let mut fields = template(*t);
                fields.insert("item_uuid".into(), json!(u));
                put_item(&mut txn, &y.items, &u, &fields);
            }
        }
        YjsOp::Nested {
            pick: p,
            key,
            value,
        } => {
            if let Some(m) = pick(*p).and_then(|u| item(&txn, &u)) {
                let k = format!("k{}", key % 4);
                match m.get(&txn, "meta") {
                    Some(Out::YMap(meta)) => {
                        meta.insert(&mut txn, k, i64::from(*value));
                    }
                    _ => {
                        m.insert(&mut txn, "meta", MapPrelim::from([(k, i64::from(*value))]));
                    }
                }
            }
        }
        YjsOp::DeleteField { pick: p, field } => {
            if let Some(m) = pick(*p).and_then(|u| item(&txn, &u)) {
                m.remove(&mut txn, YJS_FIELDS[usize::from(*field) % YJS_FIELDS.len()]);
            }
        }
    }
    txn.commit();
    txn.encode_update_v1()
}

/// Writes a new item map under `uuid`, field by field in key order (so which clock each
/// field gets does not depend on `HashMap` order).
fn put_item(txn: &mut TransactionMut, items: &MapRef, uuid: &str, fields: &Map<String, Value>) {
    let map = items.insert(txn, uuid, MapPrelim::default());
    for (k, v) in fields {
        map.insert(txn, k.as_str(), json_to_any(v));
    }
}

struct World {
    scene: Scene,
    /// The session's clock: a step takes a millisecond, a pause the correction delay.
    now: Instant,
    clients: Vec<Client>,
    yjs: Vec<YjsClient>,
    next_peer: PeerId,
    /// The updates the scene gave to persist, applied in order, and what they held.
    replica: Persisted,
}

impl World {
    fn new(script: &LegacyScript) -> World {
        let clients = (0..2 + usize::from(script.clients % 3))
            .map(|i| {
                let role = if script.roles & (1 << i) != 0 {
                    Role::Host {
                        fork: script.roles & (1 << (i + 4)) != 0,
                    }
                } else {
                    Role::Client
                };
                Client {
                    name: format!("c{i}"),
                    peer: None,
                    synced: role != Role::Client,
                    role,
                    objects: Vec::new(),
                    inbox: VecDeque::new(),
                    added: 0,
                }
            })
            .collect();
        let yjs = (0..usize::from(script.yjs % 3))
            .map(|j| YjsClient::new(1000 + j as u64, &format!("y{j}")))
            .collect();
        World {
            scene: Scene::default(),
            now: Instant::now(),
            clients,
            yjs,
            next_peer: 1,
            replica: Persisted::default(),
        }
    }

    /// Learns what the scene's update held, and delivers each message to its connection's
    /// inbox, in order.
    fn route(&mut self, effects: Effects) {
        if let Some(update) = &effects.update {
            self.replica.apply(update);
        }
        for out in effects.messages {
            let client = self
                .clients
                .iter_mut()
                .find(|c| c.peer == Some(out.to))
                .unwrap_or_else(|| panic!("a message for peer {} which is not connected", out.to));
            let msg = match &*out.message {
                PeerMessage::Command(m) => Msg::Command(Arc::new(m.clone())),
                PeerMessage::FullState(state) => Msg::FullState(state.items.clone()),
            };
            if tracing() {
                match &msg {
                    Msg::Command(m) => eprintln!(
                        "  -> {} queued {} {}",
                        client.name,
                        m.action.as_str(),
                        m.item_id
                    ),
                    Msg::FullState(items) => {
                        eprintln!(
                            "  -> {} queued a full state of {}",
                            client.name,
                            items.len()
                        )
                    }
                }
            }
            client.inbox.push_back(msg);
        }
    }

    /// Connects client `i` as the desktop client does with `session/task.rs`: the session
    /// sends `user:joined` (a host uploads its canvas) and the ack (upstream, and every
    /// client, then sends `sync:request`).
    fn connect(&mut self, i: usize) {
        let peer = self.next_peer;
        self.next_peer += 1;
        self.scene.add_peer(peer);
        let client = &mut self.clients[i];
        client.peer = Some(peer);
        match client.role {
            Role::Host { fork } => {
                self.upload(i);
                if !fork {
                    self.sync_request(i);
                }
            }
            Role::Client => {
                client.objects.clear();
                client.synced = false;
                self.sync_request(i);
            }
        }
    }

    fn upload(&mut self, i: usize) {
        let items: Vec<Value> = self.clients[i]
            .objects
            .iter()
            .map(|(uuid, fields)| {
                let mut item = fields.clone();
                item.insert("item_uuid".into(), json!(uuid));
                item.insert("uuid".into(), json!(uuid));
                Value::Object(item)
            })
            .collect();
        let text = json!({"type": "sync:full_state", "state": {"items": items}}).to_string();
        self.send(i, text);
    }

    fn sync_request(&mut self, i: usize) {
        self.send(i, json!({"type": "sync:request"}).to_string());
    }

    fn client(&mut self, c: u8) -> usize {
        let i = usize::from(c) % self.clients.len();
        if self.clients[i].peer.is_none() {
            self.connect(i);
        }
        i
    }

    /// Sends a JSON text frame from client `i` through the parser to the scene.
    fn send(&mut self, i: usize, text: String) {
        if tracing() {
            eprintln!("  c{i} sends {text}");
        }
        let peer = self.clients[i].peer.expect("connected");
        let user: Arc<str> = Arc::from(self.clients[i].name.as_str());
        let message = parse_client_message(&text)
            .unwrap_or_else(|e| panic!("a valid client frame was refused ({e}): {text}"));
        let effects = match message {
            ClientMessage::Command(command) => {
                // An edit of an item the session removed meanwhile is dropped: a removal wins.
                if command.action != Action::Add && self.scene.item(&command.item_id).is_none() {
                    self.replica.held().discard(&command.item_id, &command.data);
                }
                self.scene.apply_command(peer, &user, command, self.now)
            }
            ClientMessage::FullState(items) => {
                self.scene.apply_upload(peer, &user, items, self.now)
            }
            ClientMessage::SyncRequest => Ok(self.scene.request_sync(peer, &user)),
            other => panic!("unexpected parse of {text}: {other:?}"),
        }
        .unwrap_or_else(|e| panic!("the scene refused {text}: {e}"));
        self.route(effects);
    }

    fn yjs_edit(&mut self, j: usize, op: &YjsOp) {
        let update = yjs_edit(&mut self.yjs[j], op);
        if update == [0, 0] {
            return;
        }
        let user = self.yjs[j].user.clone();
        let effects = self
            .scene
            .apply_update(
                &user,
                &CheckedUpdate::check(update).expect("a replica's update"),
            )
            .unwrap_or_else(|e| panic!("the scene refused a Yjs client's update: {e}"));
        self.route(effects);
    }

    fn yjs_pull(&mut self, j: usize) {
        let y = &self.yjs[j];
        let sv = y.doc.transact().state_vector().encode_v1();
        let diff = self
            .scene
            .doc_mut()
            .encode_diff_v1(&CheckedStateVector::check(sv).expect("a replica's state vector"))
            .expect("the session answers SyncStep1");
        let update = Update::decode_v1(&diff).expect("the session's diff decodes");
        y.doc
            .transact_mut()
            .apply_update(update)
            .expect("the session's diff applies");
    }

    /// Lets the corrections owed become due, and sends them.
    fn pause(&mut self) {
        self.now += CORRECTION_DELAY;
        let effects = self.scene.send_due_corrections(self.now);
        self.route(effects);
    }

    fn step(&mut self, op: &LegacyOp) {
        if tracing() {
            eprintln!("{op:?}");
        }
        self.now += Duration::from_millis(1);
        match op {
            LegacyOp::Pause => self.pause(),
            LegacyOp::Apply { client, n } => {
                let i = self.client(*client);
                for _ in 0..=n % 16 {
                    if !self.clients[i].apply_next(&self.replica.held()) {
                        break;
                    }
                }
            }
            LegacyOp::Add {
                client,
                template: t,
                x,
                y,
            } => {
                let i = self.client(*client);
                let c = &mut self.clients[i];
                if !c.synced {
                    // The desktop client would keep it local and never send it.
                    return;
                }
                c.added += 1;
                let uuid = format!("{}-{}", c.name, c.added);
                let local = new_item(&uuid, *t, *x, *y);
                c.objects.push((uuid.clone(), local.clone()));
                let text = c.command_text("add_item", &uuid, &local);
                self.send(i, text);
            }
            LegacyOp::Move {
                client,
                pick,
                x,
                y,
                angle,
                drag,
            } => {
                let i = self.client(*client);
                let Some((uuid, mut fields)) = self.clients[i].pick(*pick) else {
                    return;
                };
                move_to(&mut fields, *x, *y, *angle);
                self.clients[i].set_local(&uuid, &fields);
                let text = self.clients[i].command_text("move_item", &uuid, &fields);
                self.send(i, text);
                if *drag {
                    let text = self.clients[i].command_text("update_item", &uuid, &fields);
                    self.send(i, text);
                }
            }
            LegacyOp::Update {
                client,
                pick,
                change,
            } => {
                let i = self.client(*client);
                let Some((uuid, mut fields)) = self.clients[i].pick(*pick) else {
                    return;
                };
                change_field(&mut fields, &self.clients[i].name, change);
                self.clients[i].set_local(&uuid, &fields);
                let text = self.clients[i].command_text("update_item", &uuid, &fields);
                self.send(i, text);
            }
            LegacyOp::Remove { client, pick } => {
                let i = self.client(*client);
                let Some((uuid, fields)) = self.clients[i].pick(*pick) else {
                    return;
                };
                self.clients[i].objects.retain(|(u, _)| *u != uuid);
                let text = self.clients[i].command_text("remove_item", &uuid, &fields);
                self.send(i, text);
            }
            LegacyOp::Upload { client } => {
                let i = self.client(*client);
                if matches!(self.clients[i].role, Role::Host { .. }) {
                    self.upload(i);
                }
            }
            LegacyOp::SyncRequest { client } => {
                let i = self.client(*client);
                if self.clients[i].role != (Role::Host { fork: true }) {
                    self.sync_request(i);
                }
            }
            LegacyOp::Reconnect { client } => {
                let i = self.client(*client);
                if let Some(old) = self.clients[i].peer.take() {
                    self.scene.remove_peer(old);
                }
                self.clients[i].inbox.clear();
                self.connect(i);
            }
            LegacyOp::Yjs { client, op } => {
                if !self.yjs.is_empty() {
                    let j = usize::from(*client) % self.yjs.len();
                    self.yjs_edit(j, op);
                }
            }
            LegacyOp::YjsPull { client } => {
                if !self.yjs.is_empty() {
                    let j = usize::from(*client) % self.yjs.len();
                    self.yjs_pull(j);
                }
            }
        }
    }

    fn check(&mut self) {
        self.pause();
        for j in 0..self.yjs.len() {
            self.yjs_pull(j);
        }
        let held = self.replica.held();
        for client in &mut self.clients {
            client.apply_all(&held);
        }
        drop(held);
        let doc = doc_json(&mut self.scene);
        assert_eq!(
            self.replica.items(),
            doc,
            "the persisted updates give another document"
        );
        assert_eq!(
            mirror_json(&mut self.scene),
            desktop_view(&doc),
            "the scene's mirror differs from its document"
        );
        let expected: BTreeMap<String, Value> = self
            .scene
            .full_state()
            .items
            .iter()
            .map(|(uuid, fields)| (uuid.to_string(), normalize(&full_state_item(uuid, fields))))
            .collect();
        for client in self.clients.iter().filter(|c| c.peer.is_some()) {
            let scene = client.scene();
            // A field a client's dict lacks is one it does not model (the desktop clients
            // serialise a fixed set per item type): it is compared on the fields it has.
            let modelled: BTreeMap<String, Value> = expected
                .iter()
                .map(|(uuid, fields)| {
                    let fields = match (scene.get(uuid), fields) {
                        (Some(Value::Object(own)), Value::Object(doc)) => Value::Object(
                            doc.iter()
                                .filter(|(k, _)| own.contains_key(*k))
                                .map(|(k, v)| (k.clone(), v.clone()))
                                .collect(),
                        ),
                        _ => fields.clone(),
                    };
                    (uuid.clone(), fields)
                })
                .collect();
            if scene != modelled {
                panic!(
                    "{} diverged; {}",
                    client.name,
                    scene_difference(&scene, &modelled)
                );
            }
        }
        for (j, y) in self.yjs.iter().enumerate() {
            let txn = y.doc.transact();
            assert_eq!(items_json(&txn, &y.items), doc, "Yjs client {j} diverged");
            let sv = StateVector::decode_v1(&self.scene.doc().state_vector_v1()).unwrap();
            assert_eq!(txn.state_vector(), sv, "Yjs client {j}'s state vector");
        }
    }
}

/// Runs a script and asserts convergence.
pub fn run(script: &LegacyScript) {
    let mut world = World::new(script);
    for op in &script.ops {
        world.step(op);
    }
    world.check();
}
