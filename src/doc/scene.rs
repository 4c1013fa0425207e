//! The scene engine: the session's document, a JSON mirror of its items, and the memory of
//! every legacy connection, with no I/O.
//!
//! Every change, whatever its source, goes through one transaction of [`GuardedDoc`], which
//! reports the items it touched. [`Scene::publish`] compares those items with the mirror and
//! turns each real change into the `command` every *other* legacy connection needs: `add_item`
//! only for a connection whose scene lacks the item (the client would duplicate it
//! otherwise), `remove_item` only for one that has it. After a legacy command the sender gets
//! the item's authoritative state when something about the item crossed its command on the
//! wire (PROTOCOL §3.3, "Convergence").

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde_json::Value;
use yrs::{Any, Map, MapPrelim, MapRef, Out, ReadTxn, TransactionMut};

use super::legacy::{Action, Command, PeerView, UploadedItem, POSITION_FIELDS};
use super::value::{json_equal, json_to_any, out_to_json, ItemFields};
use super::ydoc::{Change, DocError, GuardedDoc};

/// Identifies one connection of a session.
pub type PeerId = u64;

/// Item type given to an item whose document entry carries none (e.g. written by a Yjs client).
pub const DEFAULT_ITEM_TYPE: &str = "component";

/// A `command` for a legacy client: the item's whole current fields.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandMessage {
    pub action: Action,
    pub item_id: Arc<str>,
    pub item_type: Arc<str>,
    pub data: Arc<ItemFields>,
    pub user_id: Arc<str>,
}

/// One message for one legacy connection.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub to: PeerId,
    pub message: Arc<CommandMessage>,
}

/// What an operation produced: the document update to persist and send to Yjs connections,
/// and the commands for legacy connections, in order.
#[derive(Debug, Default)]
pub struct Effects {
    pub update: Option<Vec<u8>>,
    pub messages: Vec<Outgoing>,
}

/// The scene as `sync:full_state` carries it.
#[derive(Debug, Clone)]
pub struct FullState {
    pub items: Vec<(Arc<str>, Arc<ItemFields>)>,
    pub version: u64,
}

/// Who caused a change, for choosing the action and the recipients.
enum Source {
    /// A legacy command: others get its action (adjusted to what each holds).
    Command { from: PeerId, action: Action },
    /// Anything else: the action is derived from what changed; `except` gets nothing.
    Derived { except: Option<PeerId> },
}

/// The session's scene: document, mirror and legacy connections' memory.
pub struct Scene {
    doc: GuardedDoc,
    mirror: HashMap<Arc<str>, Arc<ItemFields>>,
    /// Items changed while no legacy connection was there to be told: their mirror entries
    /// are read back from the document when the mirror is next needed, so a session of Yjs
    /// clients only does not turn whole items into JSON on every update.
    stale: HashSet<Arc<str>>,
    /// The document's rebuild count the mirror follows: after a rebuild every item is read.
    rebuilds: u64,
    peers: HashMap<PeerId, PeerView>,
    initialized: bool,
    version: u64,
}

impl Default for Scene {
    fn default() -> Self {
        Scene::new(GuardedDoc::new(), false)
    }
}

impl Scene {
    /// Wraps a loaded document. `initialized` is the persisted flag; a document holding items
    /// is initialized in any case.
    pub fn new(mut doc: GuardedDoc, initialized: bool) -> Self {
        let (mirror, version) = doc
            .read(|txn, items| {
                let mirror: HashMap<_, _> = items
                    .iter(txn)
                    .filter_map(|(uuid, value)| {
                        read_fields(txn, &value).map(|f| (Arc::<str>::from(uuid), Arc::new(f)))
                    })
                    .collect();
                let version = txn
                    .state_vector()
                    .iter()
                    .map(|(_, clock)| u64::from(*clock))
                    .sum();
                (mirror, version)
            })
            .unwrap_or_default();
        Scene {
            initialized: initialized || !mirror.is_empty(),
            rebuilds: doc.rebuilds(),
            doc,
            mirror,
            stale: HashSet::new(),
            peers: HashMap::new(),
            version,
        }
    }

    pub fn doc(&self) -> &GuardedDoc {
        &self.doc
    }

    pub fn doc_mut(&mut self) -> &mut GuardedDoc {
        &mut self.doc
    }

    /// Whether any item or host upload has reached the scene.
    pub fn initialized(&self) -> bool {
        self.initialized
    }

    /// Grows with every change of the scene.
    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn item_count(&mut self) -> usize {
        self.refresh_mirror();
        self.mirror.len()
    }

    pub fn item(&mut self, uuid: &str) -> Option<&Arc<ItemFields>> {
        self.refresh_mirror();
        self.mirror.get(uuid)
    }

    /// Registers a legacy connection; a host ignores full states.
    pub fn add_peer(&mut self, peer: PeerId, is_host: bool) {
        self.refresh_mirror();
        self.peers.insert(peer, PeerView::new(is_host));
    }

    pub fn remove_peer(&mut self, peer: PeerId) {
        self.peers.remove(&peer);
    }

    pub fn peer(&self, peer: PeerId) -> Option<&PeerView> {
        self.peers.get(&peer)
    }

    /// The whole scene, sorted by uuid. When `to` is a legacy connection that applies full
    /// states, its memory is replaced by it.
    pub fn full_state(&mut self, to: Option<PeerId>) -> FullState {
        self.refresh_mirror();
        let mut items: Vec<_> = self
            .mirror
            .iter()
            .map(|(uuid, fields)| (uuid.clone(), fields.clone()))
            .collect();
        items.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        if let Some(peer) = to.and_then(|p| self.peers.get_mut(&p)) {
            if !peer.ignores_full_state {
                peer.reset();
                for (uuid, fields) in &items {
                    peer.tell(uuid, fields);
                }
            }
        }
        FullState {
            items,
            version: self.version,
        }
    }

    /// Applies an untrusted Yjs v1 update from a Yjs connection or the HTTP API.
    pub fn apply_update(&mut self, user: &Arc<str>, bytes: &[u8]) -> Result<Effects, DocError> {
        let change = self.doc.apply_update(bytes)?;
        let mut effects = Effects::default();
        self.publish(change, Source::Derived { except: None }, user, &mut effects);
        Ok(effects)
    }

    /// Applies a legacy `command` from connection `from` (PROTOCOL §3.3).
    pub fn apply_command(
        &mut self,
        from: PeerId,
        user: &Arc<str>,
        command: Command,
    ) -> Result<Effects, DocError> {
        self.refresh_mirror();
        let mut effects = Effects::default();
        let uuid = command.item_id.clone();
        let exists = self.mirror.contains_key(&uuid);
        if !exists && command.action != Action::Add {
            self.send_removal(from, &uuid, user, &mut effects);
            return Ok(effects);
        }
        let told = self.crossed(from, &uuid);
        let writes = match command.action {
            Action::Remove => None,
            Action::Add if !exists => Some(all_fields(&command)),
            Action::Move => {
                Some(self.changed_fields(from, &uuid, &command.data, Some(&POSITION_FIELDS)))
            }
            Action::Add | Action::Update => {
                Some(self.changed_fields(from, &uuid, &command.data, None))
            }
        };
        let change = {
            let uuid = uuid.clone();
            let create = command.action == Action::Add && !exists;
            self.doc
                .transact(move |txn, items| match writes {
                    None => {
                        items.remove(txn, &uuid);
                    }
                    Some(writes) if create => {
                        items.insert(txn, uuid.as_ref(), MapPrelim::from_iter(writes));
                    }
                    Some(writes) => write_fields(txn, items, &uuid, writes),
                })?
                .1
        };
        let action = command.action;
        self.publish(change, Source::Command { from, action }, user, &mut effects);
        if action == Action::Remove {
            if told {
                // Something about the item (a re-creation, say) may have crossed the removal:
                // the sender applies it after its own removal, so it is told the removal again.
                self.send_removal(from, &uuid, user, &mut effects);
            } else if let Some(peer) = self.peers.get_mut(&from) {
                peer.tell_removed(&uuid);
            }
            return Ok(effects);
        }
        if let Some(peer) = self.peers.get_mut(&from) {
            peer.commanded(&uuid, Arc::new(command.data));
        }
        if told {
            self.send_current(from, &uuid, user, &mut effects);
        }
        Ok(effects)
    }

    /// Applies a host's `sync:full_state` upload (PROTOCOL §3.4): each item is updated as by
    /// `update_item` or added, unless the host was told of its removal; nothing is deleted.
    pub fn apply_upload(
        &mut self,
        from: PeerId,
        user: &Arc<str>,
        upload: Vec<UploadedItem>,
    ) -> Result<Effects, DocError> {
        self.refresh_mirror();
        let mut effects = Effects::default();
        let mut plan = Vec::with_capacity(upload.len());
        for item in &upload {
            let exists = self.mirror.contains_key(&item.uuid);
            let told_removed = self
                .peers
                .get(&from)
                .is_some_and(|p| p.was_told_removed(&item.uuid));
            if exists {
                let writes = self.changed_fields(from, &item.uuid, &item.fields, None);
                plan.push((item.uuid.clone(), false, writes));
            } else if !told_removed {
                let command = Command {
                    action: Action::Add,
                    item_type: item.item_type.clone(),
                    item_id: item.uuid.clone(),
                    data: item.fields.clone(),
                };
                plan.push((item.uuid.clone(), true, all_fields(&command)));
            }
        }
        let told: Vec<bool> = upload
            .iter()
            .map(|item| self.crossed(from, &item.uuid))
            .collect();
        let (_, change) = self.doc.transact(move |txn, items| {
            for (uuid, create, writes) in plan {
                if create {
                    items.insert(txn, uuid.as_ref(), MapPrelim::from_iter(writes));
                } else {
                    write_fields(txn, items, &uuid, writes);
                }
            }
        })?;
        self.initialized = true;
        self.publish(
            change,
            Source::Derived { except: Some(from) },
            user,
            &mut effects,
        );
        for (item, told) in upload.into_iter().zip(told) {
            if !self.mirror.contains_key(&item.uuid) {
                continue;
            }
            if let Some(peer) = self.peers.get_mut(&from) {
                peer.commanded(&item.uuid, Arc::new(item.fields));
            }
            if told {
                self.send_current(from, &item.uuid, user, &mut effects);
            }
        }
        let missing: Vec<Arc<str>> = match self.peers.get(&from) {
            Some(peer) => {
                let mut missing: Vec<_> = self
                    .mirror
                    .keys()
                    .filter(|u| !peer.has(u))
                    .cloned()
                    .collect();
                missing.sort_unstable();
                missing
            }
            None => Vec::new(),
        };
        for uuid in missing {
            self.send_current(from, &uuid, user, &mut effects);
        }
        Ok(effects)
    }

    /// Brings the mirror up to date with the document: the stale items, or every item after
    /// the document was rebuilt.
    fn refresh_mirror(&mut self) {
        if self.stale.is_empty() && self.rebuilds == self.doc.rebuilds() {
            return;
        }
        let stale: Vec<Arc<str>> = self.stale.drain().collect();
        let current = if self.rebuilds == self.doc.rebuilds() {
            self.read_items(&stale)
        } else {
            self.read_all_items()
        };
        self.rebuilds = self.doc.rebuilds();
        for (uuid, fields) in current {
            match fields {
                Some(fields) => self.mirror.insert(uuid, Arc::new(fields)),
                None => self.mirror.remove(&uuid),
            };
        }
    }

    /// The given items' fields in the document (`None`: not there).
    fn read_items(&mut self, uuids: &[Arc<str>]) -> Vec<(Arc<str>, Option<ItemFields>)> {
        let read = |txn: &yrs::Transaction, items: &MapRef| {
            uuids
                .iter()
                .map(|uuid| {
                    let fields = items.get(txn, uuid).and_then(|v| read_fields(txn, &v));
                    (uuid.clone(), fields)
                })
                .collect()
        };
        match self.doc.read(read) {
            Ok(current) => current,
            // yrs could not read the document and rebuilt it: compare every item.
            Err(_) => self.read_all_items(),
        }
    }

    /// Every item of the mirror and of the document, with its fields in the document.
    fn read_all_items(&mut self) -> Vec<(Arc<str>, Option<ItemFields>)> {
        let in_doc: HashMap<Arc<str>, ItemFields> = self
            .doc
            .read(|txn, items| {
                items
                    .iter(txn)
                    .filter_map(|(uuid, v)| read_fields(txn, &v).map(|f| (Arc::from(uuid), f)))
                    .collect()
            })
            .unwrap_or_default();
        let mut all: Vec<Arc<str>> = self.mirror.keys().chain(in_doc.keys()).cloned().collect();
        all.sort_unstable();
        all.dedup();
        all.into_iter()
            .map(|uuid| {
                let fields = in_doc.get(&uuid).cloned();
                (uuid, fields)
            })
            .collect()
    }

    /// Whether something the server sent `from` about an existing item may have crossed the
    /// command `from` is sending about it, so that it needs the item's state afterwards. An
    /// item that does not exist yet has nothing to cross.
    fn crossed(&self, from: PeerId, uuid: &str) -> bool {
        self.mirror.contains_key(uuid)
            && self
                .peers
                .get(&from)
                .is_some_and(|p| p.told_since_command(uuid))
    }

    /// The fields of `data` (limited to `only`) that connection `from` really changed: not a
    /// value it sent or was told since its last command, and not already the document's.
    fn changed_fields(
        &self,
        from: PeerId,
        uuid: &str,
        data: &ItemFields,
        only: Option<&[&str]>,
    ) -> Vec<(String, Any)> {
        let current = self.mirror.get(uuid);
        let peer = self.peers.get(&from);
        data.iter()
            .filter(|(field, _)| only.is_none_or(|o| o.contains(&field.as_str())))
            .filter(|(field, value)| {
                let known = peer.is_some_and(|p| p.knows(uuid, field, value));
                let same = current
                    .and_then(|c| c.get(field.as_str()))
                    .is_some_and(|cur| json_equal(cur, value));
                !known && !same
            })
            .map(|(field, value)| (field.clone(), json_to_any(value)))
            .collect()
    }

    /// Sends connection `to` the item's current state as a correction (`update_item`, or
    /// `add_item` if its scene lacks the item, or `remove_item` if the item is gone).
    fn send_current(
        &mut self,
        to: PeerId,
        uuid: &Arc<str>,
        user: &Arc<str>,
        effects: &mut Effects,
    ) {
        let Some(fields) = self.mirror.get(uuid).cloned() else {
            self.send_removal(to, uuid, user, effects);
            return;
        };
        let Some(peer) = self.peers.get_mut(&to) else {
            return;
        };
        let action = if peer.has(uuid) {
            Action::Update
        } else {
            Action::Add
        };
        peer.tell(uuid, &fields);
        effects.messages.push(Outgoing {
            to,
            message: Arc::new(command_message(action, uuid, &fields, user)),
        });
    }

    fn send_removal(
        &mut self,
        to: PeerId,
        uuid: &Arc<str>,
        user: &Arc<str>,
        effects: &mut Effects,
    ) {
        if let Some(peer) = self.peers.get_mut(&to) {
            peer.tell_removed(uuid);
            effects.messages.push(Outgoing {
                to,
                message: Arc::new(command_message(Action::Remove, uuid, &Arc::default(), user)),
            });
        }
    }

    /// Updates the mirror from a transaction's touched items and tells every other legacy
    /// connection about each real change.
    fn publish(
        &mut self,
        change: Option<Change>,
        source: Source,
        user: &Arc<str>,
        effects: &mut Effects,
    ) {
        let Some(change) = change else {
            return;
        };
        self.version += 1;
        if self.peers.is_empty() {
            self.initialized |= !change.touched.is_empty();
            self.stale.extend(change.touched);
            effects.update = Some(change.update);
            return;
        }
        // Compare what the change touched (and anything still stale) with the mirror; after a
        // rebuild, every item.
        let mut touched = change.touched;
        touched.extend(self.stale.drain());
        touched.sort_unstable();
        touched.dedup();
        let current = if self.rebuilds == self.doc.rebuilds() {
            self.read_items(&touched)
        } else {
            self.rebuilds = self.doc.rebuilds();
            self.read_all_items()
        };
        for (uuid, fields) in current {
            let old = self.mirror.get(&uuid).cloned();
            let (action, data) = match (old, fields) {
                (None, None) => continue,
                (Some(_), None) => {
                    self.mirror.remove(&uuid);
                    (Action::Remove, Arc::default())
                }
                (old, Some(new)) => {
                    if old.as_deref().is_some_and(|o| fields_equal(o, &new)) {
                        continue;
                    }
                    let action = match (&source, &old) {
                        (Source::Command { action, .. }, _) => *action,
                        (_, None) => Action::Add,
                        (_, Some(old)) if only_position_changed(old, &new) => Action::Move,
                        _ => Action::Update,
                    };
                    let new = Arc::new(new);
                    self.mirror.insert(uuid.clone(), new.clone());
                    (action, new)
                }
            };
            self.initialized = true;
            let except = match source {
                Source::Command { from, .. } => Some(from),
                Source::Derived { except } => except,
            };
            let mut shared: HashMap<Action, Arc<CommandMessage>> = HashMap::new();
            let mut recipients: Vec<_> = self
                .peers
                .iter_mut()
                .filter(|(id, _)| Some(**id) != except)
                .collect();
            recipients.sort_unstable_by_key(|(id, _)| **id);
            for (id, peer) in recipients {
                let action = if action == Action::Remove {
                    if !peer.has(&uuid) {
                        continue;
                    }
                    peer.tell_removed(&uuid);
                    Action::Remove
                } else {
                    let to_send = match (peer.has(&uuid), action) {
                        (false, _) => Action::Add,
                        (true, Action::Add) => Action::Update,
                        (true, a) => a,
                    };
                    peer.tell(&uuid, &data);
                    to_send
                };
                let message = shared
                    .entry(action)
                    .or_insert_with(|| Arc::new(command_message(action, &uuid, &data, user)))
                    .clone();
                effects.messages.push(Outgoing { to: *id, message });
            }
        }
        effects.update = Some(change.update);
    }
}

fn command_message(
    action: Action,
    uuid: &Arc<str>,
    data: &Arc<ItemFields>,
    user: &Arc<str>,
) -> CommandMessage {
    CommandMessage {
        action,
        item_id: uuid.clone(),
        item_type: item_type_of(data).into(),
        data: data.clone(),
        user_id: user.clone(),
    }
}

/// The item's type as the legacy protocol names it.
pub fn item_type_of(fields: &ItemFields) -> &str {
    fields
        .get("item_type")
        .and_then(Value::as_str)
        .or_else(|| fields.get("_type").and_then(Value::as_str))
        .unwrap_or(DEFAULT_ITEM_TYPE)
}

/// Every field of an added item, with `item_type` from the command.
fn all_fields(command: &Command) -> Vec<(String, Any)> {
    let mut fields: Vec<(String, Any)> = command
        .data
        .iter()
        .filter(|(k, _)| k.as_str() != "item_type")
        .map(|(k, v)| (k.clone(), json_to_any(v)))
        .collect();
    let item_type = command
        .item_type
        .clone()
        .or_else(|| {
            command
                .data
                .get("item_type")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .unwrap_or_else(|| DEFAULT_ITEM_TYPE.to_owned());
    fields.push(("item_type".to_owned(), Any::from(item_type)));
    fields
}

fn write_fields(txn: &mut TransactionMut, items: &MapRef, uuid: &str, writes: Vec<(String, Any)>) {
    if writes.is_empty() {
        return;
    }
    if let Some(Out::YMap(item)) = items.get(txn, uuid) {
        for (field, value) in writes {
            item.insert(txn, field, value);
        }
    }
}

/// An item's fields, or `None` when the document entry is not a map.
fn read_fields<T: ReadTxn>(txn: &T, value: &Out) -> Option<ItemFields> {
    match value {
        Out::YMap(item) => Some(
            item.iter(txn)
                .map(|(k, v)| (k.to_owned(), out_to_json(txn, &v)))
                .collect(),
        ),
        _ => None,
    }
}

fn fields_equal(a: &ItemFields, b: &ItemFields) -> bool {
    a.len() == b.len()
        && a.iter()
            .all(|(k, v)| b.get(k).is_some_and(|w| json_equal(v, w)))
}

fn only_position_changed(old: &ItemFields, new: &ItemFields) -> bool {
    let differs = |k: &String, v: &Value| old.get(k).is_none_or(|o| !json_equal(o, v));
    old.keys().all(|k| new.contains_key(k))
        && new
            .iter()
            .filter(|(k, v)| differs(k, v))
            .all(|(k, _)| POSITION_FIELDS.contains(&k.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use yrs::updates::decoder::Decode;
    use yrs::{Doc, Transact};

    fn fields(v: Value) -> ItemFields {
        match v {
            Value::Object(map) => map,
            _ => unreachable!("test helper takes objects"),
        }
    }

    fn cmd(action: Action, uuid: &str, data: Value) -> Command {
        Command {
            action,
            item_type: Some("component".into()),
            item_id: uuid.into(),
            data: fields(data),
        }
    }

    fn user(name: &str) -> Arc<str> {
        Arc::from(name)
    }

    /// Messages for `to`, as (action, uuid, data).
    fn to(effects: &Effects, to: PeerId) -> Vec<(Action, String, Value)> {
        effects
            .messages
            .iter()
            .filter(|o| o.to == to)
            .map(|o| {
                let m = &o.message;
                (
                    m.action,
                    m.item_id.to_string(),
                    Value::Object((*m.data).clone()),
                )
            })
            .collect()
    }

    /// A scene with legacy peers 1 and 2 that both hold item `a`.
    fn scene_with_item() -> Scene {
        let mut scene = Scene::default();
        scene.add_peer(1, true);
        scene.add_peer(2, false);
        let lens = json!({"name": "L1", "x_mm": 0.0, "y_mm": 0.0, "angle_deg": 0.0, "z_value": 0});
        let effects = scene
            .apply_command(1, &user("p1"), cmd(Action::Add, "a", lens))
            .unwrap();
        assert_eq!(to(&effects, 2)[0].0, Action::Add);
        scene
    }

    #[test]
    fn add_reaches_others_with_item_type_and_sends_no_echo() {
        let mut scene = Scene::default();
        scene.add_peer(1, true);
        scene.add_peer(2, false);
        assert!(!scene.initialized());
        let effects = scene
            .apply_command(
                1,
                &user("p1"),
                cmd(Action::Add, "a", json!({"x_mm": 1.5, "n_rays": 7})),
            )
            .unwrap();
        assert!(effects.update.is_some());
        assert!(to(&effects, 1).is_empty(), "no echo: {:?}", to(&effects, 1));
        let sent = to(&effects, 2);
        assert_eq!(sent.len(), 1);
        assert_eq!(
            sent[0].2,
            json!({"x_mm": 1.5, "n_rays": 7, "item_type": "component"})
        );
        assert!(scene.initialized());
        assert_eq!(scene.item_count(), 1);
    }

    #[test]
    fn move_writes_only_the_position() {
        let mut scene = scene_with_item();
        let data = json!({"name": "renamed by a move", "x_mm": 5.0, "y_mm": 6.0, "angle_deg": 90.0, "z_value": 0});
        let effects = scene
            .apply_command(2, &user("p2"), cmd(Action::Move, "a", data))
            .unwrap();
        let item = scene.item("a").unwrap();
        assert_eq!(item["x_mm"], json!(5.0));
        assert_eq!(item["angle_deg"], json!(90.0));
        assert_eq!(item["name"], json!("L1"));
        assert_eq!(to(&effects, 1)[0].0, Action::Move);
    }

    #[test]
    fn a_stale_dict_does_not_revert_a_concurrent_change() {
        let mut scene = scene_with_item();
        let renamed =
            json!({"name": "L2", "x_mm": 0.0, "y_mm": 0.0, "angle_deg": 0.0, "z_value": 0});
        let effects = scene
            .apply_command(1, &user("p1"), cmd(Action::Update, "a", renamed))
            .unwrap();
        assert_eq!(to(&effects, 2)[0].0, Action::Update);
        // Peer 2 had not seen the rename: its whole dict still says L1.
        let stale = json!({"name": "L1", "x_mm": 0.0, "y_mm": 0.0, "angle_deg": 0.0, "z_value": 5});
        let effects = scene
            .apply_command(2, &user("p2"), cmd(Action::Update, "a", stale))
            .unwrap();
        let item = scene.item("a").unwrap();
        assert_eq!(item["name"], json!("L2"));
        assert_eq!(item["z_value"], json!(5));
        // The rename crossed peer 2's command: it gets the authoritative state.
        let correction = to(&effects, 2);
        assert_eq!(correction.len(), 1);
        assert_eq!(correction[0].0, Action::Update);
        assert_eq!(correction[0].2["name"], json!("L2"));
        assert_eq!(correction[0].2["z_value"], json!(5));
        assert_eq!(to(&effects, 1)[0].2["z_value"], json!(5));
    }

    #[test]
    fn a_command_on_a_removed_item_is_answered_with_remove_item() {
        let mut scene = scene_with_item();
        let effects = scene
            .apply_command(1, &user("p1"), cmd(Action::Remove, "a", json!({})))
            .unwrap();
        assert_eq!(
            to(&effects, 2),
            vec![(Action::Remove, "a".to_owned(), json!({}))]
        );
        let version = scene.version();
        let effects = scene
            .apply_command(2, &user("p2"), cmd(Action::Move, "a", json!({"x_mm": 1.0})))
            .unwrap();
        assert!(effects.update.is_none());
        assert_eq!(
            to(&effects, 2),
            vec![(Action::Remove, "a".to_owned(), json!({}))]
        );
        assert!(to(&effects, 1).is_empty());
        assert_eq!(scene.version(), version);
        assert!(scene.item("a").is_none());
    }

    #[test]
    fn upload_adds_and_updates_but_never_resurrects_or_deletes() {
        let mut scene = scene_with_item();
        scene
            .apply_command(2, &user("p2"), cmd(Action::Add, "b", json!({"x_mm": 1.0})))
            .unwrap();
        scene
            .apply_command(2, &user("p2"), cmd(Action::Remove, "b", json!({})))
            .unwrap();
        let upload = vec![
            UploadedItem {
                uuid: "b".into(),
                item_type: None,
                fields: fields(json!({"x_mm": 1.0})),
            },
            UploadedItem {
                uuid: "c".into(),
                item_type: Some("ruler".into()),
                fields: fields(json!({"x_mm": 2.0})),
            },
        ];
        let effects = scene.apply_upload(1, &user("p1"), upload).unwrap();
        assert!(
            scene.item("b").is_none(),
            "the host was told of b's removal"
        );
        assert_eq!(scene.item("c").unwrap()["item_type"], json!("ruler"));
        assert!(scene.item("a").is_some(), "an upload deletes nothing");
        assert_eq!(
            to(&effects, 2),
            vec![(
                Action::Add,
                "c".to_owned(),
                json!({"x_mm": 2.0, "item_type": "ruler"})
            )]
        );
    }

    #[test]
    fn yjs_changes_reach_legacy_peers_as_derived_commands() {
        let mut scene = scene_with_item();
        let peer = Doc::new();
        let snapshot = scene.doc_mut().encode_state_v1().unwrap();
        peer.transact_mut()
            .apply_update(yrs::Update::decode_v1(&snapshot).unwrap())
            .unwrap();
        let items = peer.get_or_insert_map("items");
        let edit = |f: &dyn Fn(&mut yrs::TransactionMut, &MapRef)| {
            let mut txn = peer.transact_mut();
            f(&mut txn, &items);
            txn.encode_update_v1()
        };
        let moved = edit(&|txn, items| {
            if let Some(Out::YMap(item)) = items.get(txn, "a") {
                item.insert(txn, "x_mm", 9.0);
            }
        });
        let renamed = edit(&|txn, items| {
            if let Some(Out::YMap(item)) = items.get(txn, "a") {
                item.insert(txn, "name", "from yjs");
            }
        });
        let removed = edit(&|txn, items| {
            items.remove(txn, "a");
        });
        let yjs = user("yjs");
        for (update, action) in [
            (moved, Action::Move),
            (renamed, Action::Update),
            (removed, Action::Remove),
        ] {
            let effects = scene.apply_update(&yjs, &update).unwrap();
            assert_eq!(to(&effects, 1)[0].0, action);
            assert_eq!(to(&effects, 2)[0].0, action);
        }
    }

    #[test]
    fn without_legacy_peers_the_mirror_catches_up_when_needed() {
        let peer = Doc::new();
        let items = peer.get_or_insert_map("items");
        let edit = |f: &dyn Fn(&mut yrs::TransactionMut, &MapRef)| {
            let mut txn = peer.transact_mut();
            f(&mut txn, &items);
            txn.encode_update_v1()
        };
        let mut scene = Scene::default();
        let yjs = user("yjs");
        let added = edit(&|txn, items| {
            items.insert(txn, "a", MapPrelim::from([("x_mm", Any::from(1.0))]));
            items.insert(txn, "b", MapPrelim::from([("x_mm", Any::from(2.0))]));
        });
        assert!(scene
            .apply_update(&yjs, &added)
            .unwrap()
            .messages
            .is_empty());
        assert!(scene.initialized());
        assert_eq!(scene.item_count(), 2);
        let moved = edit(&|txn, items| {
            if let Some(Out::YMap(item)) = items.get(txn, "a") {
                item.insert(txn, "x_mm", 5.0);
            }
            items.remove(txn, "b");
        });
        scene.apply_update(&yjs, &moved).unwrap();
        scene.add_peer(1, false);
        let state = scene.full_state(Some(1));
        assert_eq!(state.items.len(), 1);
        assert_eq!(state.items[0].1["x_mm"], json!(5.0));
        let renamed = edit(&|txn, items| {
            if let Some(Out::YMap(item)) = items.get(txn, "a") {
                item.insert(txn, "name", "L1");
            }
        });
        let effects = scene.apply_update(&yjs, &renamed).unwrap();
        assert_eq!(to(&effects, 1)[0].0, Action::Update);
    }

    #[test]
    fn full_state_is_sorted_and_versions_grow() {
        let mut scene = scene_with_item();
        let v1 = scene.version();
        scene
            .apply_command(1, &user("p1"), cmd(Action::Add, "0", json!({"x_mm": 1.0})))
            .unwrap();
        let state = scene.full_state(Some(2));
        assert!(state.version > v1);
        let uuids: Vec<&str> = state.items.iter().map(|(u, _)| u.as_ref()).collect();
        assert_eq!(uuids, vec!["0", "a"]);
        assert!(scene.peer(2).unwrap().has("0"));
    }
}
