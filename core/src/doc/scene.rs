//! The scene engine: the session's document, a JSON mirror of its items, and the memory of
//! every legacy connection, with no I/O.
//!
//! Every change, whatever its source, goes through one transaction of [`GuardedDoc`], which
//! reports the items it touched. [`Scene::publish`] compares those items with the mirror and
//! turns each real change into the `command` every *other* legacy connection needs: `add_item`
//! only for a connection whose scene lacks the item (the client would duplicate it
//! otherwise), `remove_item` only for one that has it. After a legacy command or upload the
//! sender gets the item's authoritative state when what its canvas will show differs from
//! the document (PROTOCOL §3.3, "Convergence").
//!
//! The rule above all (PROTOCOL §3.3): no message makes a client delete or reset what the
//! server does not hold. So a command about an item the document lacks creates it (unless the
//! connection was told of its removal), and a connection that uploaded its canvas is never
//! sent a full state (README, "Choices").

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::BuildHasherDefault;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use yrs::{Any, Map, MapPrelim, MapRef, Out, ReadTxn, TransactionMut};

use super::guard::CheckedUpdate;
use super::legacy::{
    Action, Command, InFlight, PeerView, SyncState, UploadedItem, POSITION_FIELDS,
};
use super::schema;
use super::value::{json_equal, json_to_any, out_to_json, ItemFields};
use super::ydoc::{Change, DocError, GuardedDoc};

/// Identifies one connection of a session.
pub type PeerId = u64;

/// A map by connection id. Ids are the server's own counter, never a peer's choice, so
/// a fixed hasher is safe, and the map is 16 bytes smaller than with a random one: every
/// session holds a few of them.
pub type PeerMap<V> = HashMap<PeerId, V, BuildHasherDefault<DefaultHasher>>;
/// A set of connection ids (see [`PeerMap`]).
pub type PeerSet = HashSet<PeerId, BuildHasherDefault<DefaultHasher>>;

/// Item type given to an item whose document entry carries none (e.g. written by a Yjs client).
pub const DEFAULT_ITEM_TYPE: &str = "component";

/// How long a connection's commands on an item pause, by default, before it is sent a
/// correction it is owed (see [`Scene::with_correction_delay`]).
pub const CORRECTION_DELAY: Duration = Duration::from_millis(250);

/// Most placeholder fixes sent after one full state; a larger scene gets none. The fork
/// client re-traces every ray after each command it receives, so fixing N items costs it N
/// traces of an N-item bench (BENCHMARKS.md: seconds at 100 items, minutes at 300, long
/// enough for its heartbeat to miss the idle timeout).
const MAX_FULL_STATE_FIXES: usize = 100;

/// Item types the upstream desktop client builds on a placeholder when it receives them in an
/// `add_item` or a full state (it drops the parsed data); its `update_item` handler reads the
/// data. So every such item sent that way is followed by an `update_item` with the same data.
pub const PLACEHOLDER_TYPES: [&str; 8] = [
    "component",
    "lens",
    "mirror",
    "beamsplitter",
    "dichroic",
    "waveplate",
    "slm",
    "source",
];

/// A `command` for a legacy client: the item's whole current fields.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandMessage {
    pub action: Action,
    pub item_id: Arc<str>,
    pub item_type: Arc<str>,
    pub data: Arc<ItemFields>,
    pub user_id: Arc<str>,
}

/// What a legacy connection is sent about the scene.
#[derive(Debug)]
pub enum PeerMessage {
    Command(CommandMessage),
    FullState(FullState),
}

/// One message for one legacy connection.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub to: PeerId,
    pub message: Arc<PeerMessage>,
}

/// What an operation produced: the document update to persist and send to Yjs connections,
/// and the messages for legacy connections, in order.
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
    peers: PeerMap<PeerView>,
    /// Corrections owed, by connection and item: when they are due, and whose command they
    /// answer.
    corrections: BTreeMap<(PeerId, Arc<str>), (Instant, Arc<str>)>,
    correction_delay: Duration,
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
            peers: PeerMap::default(),
            corrections: BTreeMap::new(),
            correction_delay: CORRECTION_DELAY,
            version,
        }
    }

    /// How long a connection's commands on an item must pause before it is sent a
    /// correction it is owed. Any message sent to a client may be applied after its next
    /// command (nothing is acknowledged), a correction included: sent at every step of a
    /// drag, each would be owed another. Deferred, a drag (two commands per mouse move) costs
    /// one at its end. A `ping` gets those owed to its connection at once (a barrier).
    pub fn with_correction_delay(mut self, delay: Duration) -> Self {
        self.correction_delay = delay;
        self
    }

    pub fn doc(&self) -> &GuardedDoc {
        &self.doc
    }

    pub fn doc_mut(&mut self) -> &mut GuardedDoc {
        &mut self.doc
    }

    /// Whether any item or upload has reached the scene.
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

    /// Registers a legacy connection.
    pub fn add_peer(&mut self, peer: PeerId) {
        self.refresh_mirror();
        self.peers.insert(peer, PeerView::default());
    }

    /// A connection that has asked for the scene and holds it (most tests start there).
    #[cfg(test)]
    fn add_synced_peer(&mut self, peer: PeerId) {
        self.refresh_mirror();
        let mut view = PeerView::default();
        view.sync = SyncState::Synced;
        self.peers.insert(peer, view);
    }

    pub fn remove_peer(&mut self, peer: PeerId) {
        self.peers.remove(&peer);
        self.corrections.retain(|(to, _), _| *to != peer);
    }

    /// When the next owed correction is due.
    pub fn next_correction_due(&self) -> Option<Instant> {
        self.corrections.values().map(|(due, _)| *due).min()
    }

    /// Sends the corrections due at `now`: each item's authoritative state (PROTOCOL §3.3,
    /// "Convergence"; README, "Choices").
    pub fn send_due_corrections(&mut self, now: Instant) -> Effects {
        self.send_corrections(|_, due| due <= now)
    }

    /// Sends every correction owed to `peer`, due or not: its `ping` asks for a barrier.
    pub fn send_corrections_owed_to(&mut self, peer: PeerId) -> Effects {
        self.send_corrections(|to, _| to == peer)
    }

    fn send_corrections(&mut self, which: impl Fn(PeerId, Instant) -> bool) -> Effects {
        self.refresh_mirror();
        let mut effects = Effects::default();
        let due: Vec<(PeerId, Arc<str>, Arc<str>)> = self
            .corrections
            .iter()
            .filter(|((to, _), (at, _))| which(*to, *at))
            .map(|((to, uuid), (_, user))| (*to, uuid.clone(), user.clone()))
            .collect();
        for (to, uuid, user) in due {
            self.corrections.remove(&(to, uuid.clone()));
            // An item removed meanwhile reached the connection as a removal already.
            if self.mirror.contains_key(&uuid) {
                self.send_current(to, &uuid, &user, &mut effects);
            }
        }
        effects
    }

    pub fn peer(&self, peer: PeerId) -> Option<&PeerView> {
        self.peers.get(&peer)
    }

    /// The whole scene, sorted by uuid.
    pub fn full_state(&mut self) -> FullState {
        self.refresh_mirror();
        let mut items: Vec<_> = self
            .mirror
            .iter()
            .map(|(uuid, fields)| (uuid.clone(), fields.clone()))
            .collect();
        items.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        FullState {
            items,
            version: self.version,
        }
    }

    /// Answers a legacy connection's `sync:request` (PROTOCOL §3.4, README "Choices"): the
    /// scene as a full state, once per connection, to a connection that has not uploaded its
    /// own; if the scene is not initialized yet, as soon as it is. A connection that uploaded
    /// gets the items it lacks as commands.
    pub fn request_sync(&mut self, from: PeerId, user: &Arc<str>) -> Effects {
        self.refresh_mirror();
        let mut effects = Effects::default();
        let Some(peer) = self.peers.get_mut(&from) else {
            return effects;
        };
        match peer.sync {
            SyncState::Synced | SyncState::Awaiting => {}
            SyncState::Uploader => self.send_missing(from, user, &mut effects),
            SyncState::Idle if self.initialized => {
                let state = Arc::new(PeerMessage::FullState(self.full_state()));
                self.send_full_state(from, &state, user, &mut effects);
            }
            SyncState::Idle => peer.sync = SyncState::Awaiting,
        }
        effects
    }

    /// Applies a Yjs v1 update from a Yjs connection or the HTTP API.
    pub fn apply_update(
        &mut self,
        user: &Arc<str>,
        update: &CheckedUpdate,
    ) -> Result<Effects, DocError> {
        let change = self.doc.apply_update(update)?;
        let mut effects = Effects::default();
        self.publish(change, Source::Derived { except: None }, user, &mut effects);
        self.answer_awaiting(user, &mut effects);
        Ok(effects)
    }

    /// Applies a legacy `command` from connection `from` (PROTOCOL §3.3).
    pub fn apply_command(
        &mut self,
        from: PeerId,
        user: &Arc<str>,
        command: Command,
        now: Instant,
    ) -> Result<Effects, DocError> {
        self.refresh_mirror();
        let mut effects = Effects::default();
        let uuid = command.item_id.clone();
        let exists = self.mirror.contains_key(&uuid);
        let action = command.action;
        if !exists {
            let told_removed = self
                .peers
                .get(&from)
                .is_some_and(|p| p.was_told_removed(&uuid));
            match action {
                // Nothing to remove, and nothing to tell: the sender's canvas lacks it now.
                Action::Remove => {
                    if let Some(peer) = self.peers.get_mut(&from) {
                        peer.tell_removed(&uuid);
                    }
                    return Ok(effects);
                }
                // The removal this command crossed reaches the sender and deletes its copy.
                Action::Move | Action::Update if told_removed => return Ok(effects),
                // An item the server never had (a host's canvas before its upload): the
                // command carries the whole dict, so it creates the item.
                _ => {}
            }
        }
        let peer = self.peers.get(&from);
        let in_flight = peer.and_then(|p| p.in_flight(&uuid)).cloned();
        let recreation_in_flight = peer.is_some_and(|p| p.recreation_in_flight(&uuid));
        let writes = match (action, exists) {
            (Action::Remove, _) => None,
            (_, false) => Some(all_fields(&command)),
            (Action::Move, true) => {
                Some(self.changed_fields(from, &uuid, &command.data, Some(&POSITION_FIELDS)))
            }
            (Action::Add | Action::Update, true) => {
                Some(self.changed_fields(from, &uuid, &command.data, None))
            }
        };
        let change = {
            let uuid = uuid.clone();
            self.doc
                .transact(move |txn, items| match writes {
                    None => {
                        items.remove(txn, &uuid);
                    }
                    Some(writes) if !exists => {
                        items.insert(txn, uuid.as_ref(), MapPrelim::from_iter(writes));
                    }
                    Some(writes) => write_fields(txn, items, &uuid, writes),
                })?
                .1
        };
        self.publish(change, Source::Command { from, action }, user, &mut effects);
        if action == Action::Remove {
            if recreation_in_flight {
                // A re-creation may cross the removal: the sender would hold the item again.
                self.send_removal(from, &uuid, user, &mut effects);
            } else if let Some(peer) = self.peers.get_mut(&from) {
                peer.tell_removed(&uuid);
            }
        } else {
            let only = (action == Action::Move).then_some(&POSITION_FIELDS[..]);
            self.settle(from, &uuid, command.data, only, in_flight, user, now);
        }
        self.answer_awaiting(user, &mut effects);
        Ok(effects)
    }

    /// Applies a `sync:full_state` upload (PROTOCOL §3.4), from whichever connection sends
    /// it: each item is updated as by `update_item` or added, unless the uploader was told of
    /// its removal; nothing is deleted. The uploader then gets what its canvas lacks or shows
    /// differently; an upload equal to the document costs no message.
    pub fn apply_upload(
        &mut self,
        from: PeerId,
        user: &Arc<str>,
        upload: Vec<UploadedItem>,
        now: Instant,
    ) -> Result<Effects, DocError> {
        self.refresh_mirror();
        let mut effects = Effects::default();
        if let Some(peer) = self.peers.get_mut(&from) {
            peer.sync = SyncState::Uploader;
            peer.uploaded(upload.iter().map(|item| &item.uuid));
        }
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
        let in_flight: Vec<Option<InFlight>> = upload
            .iter()
            .map(|item| {
                self.peers
                    .get(&from)
                    .and_then(|p| p.in_flight(&item.uuid))
                    .cloned()
            })
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
        for (item, in_flight) in upload.into_iter().zip(in_flight) {
            if self.mirror.contains_key(&item.uuid) {
                self.settle(from, &item.uuid, item.fields, None, in_flight, user, now);
            }
        }
        self.send_missing(from, user, &mut effects);
        self.answer_awaiting(user, &mut effects);
        Ok(effects)
    }

    /// After connection `from` sent `sent` for an existing item (its whole dict; compared on
    /// `only` when given), starts its new window on the item, and owes it the item's
    /// authoritative state when its canvas may end up showing something else: what it sent
    /// differs from the document (on the fields it sent: a field its dict lacks is one it
    /// does not model), or a message still in flight to it would, applied after its command,
    /// leave something else. The correction is due once its commands on the item pause
    /// ([`Scene::with_correction_delay`]); a later command postpones it.
    #[allow(clippy::too_many_arguments)]
    fn settle(
        &mut self,
        from: PeerId,
        uuid: &Arc<str>,
        sent: ItemFields,
        only: Option<&[&str]>,
        in_flight: Option<InFlight>,
        user: &Arc<str>,
        now: Instant,
    ) {
        let Some(current) = self.mirror.get(uuid) else {
            return;
        };
        let differs = !agrees(&sent, current, only)
            || in_flight.is_some_and(|in_flight| !leaves(&in_flight, current));
        if let Some(peer) = self.peers.get_mut(&from) {
            match only {
                // A move writes only the position: the rest of its dict may hold edits the
                // client has not sent yet (an offline rename in the upload that follows), so
                // it neither starts a new window nor counts as sent.
                Some(only) => peer.moved(uuid, position_of(&sent, only)),
                None => peer.commanded(uuid, Arc::new(sent)),
            }
        }
        let key = (from, uuid.clone());
        if differs || self.corrections.contains_key(&key) {
            self.corrections
                .insert(key, (now + self.correction_delay, user.clone()));
        }
    }

    /// Sends connection `to` every item of the scene its canvas lacks.
    fn send_missing(&mut self, to: PeerId, user: &Arc<str>, effects: &mut Effects) {
        let Some(peer) = self.peers.get(&to) else {
            return;
        };
        let mut missing: Vec<Arc<str>> = self
            .mirror
            .keys()
            .filter(|u| !peer.has(u))
            .cloned()
            .collect();
        missing.sort_unstable();
        for uuid in missing {
            self.send_current(to, &uuid, user, effects);
        }
    }

    /// Sends the scene to every connection waiting for it, once it is initialized.
    fn answer_awaiting(&mut self, user: &Arc<str>, effects: &mut Effects) {
        if !self.initialized {
            return;
        }
        let mut waiting: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.sync == SyncState::Awaiting)
            .map(|(id, _)| *id)
            .collect();
        if waiting.is_empty() {
            return;
        }
        waiting.sort_unstable();
        let state = Arc::new(PeerMessage::FullState(self.full_state()));
        for peer in waiting {
            self.send_full_state(peer, &state, user, effects);
        }
    }

    /// Sends `state` (a [`PeerMessage::FullState`]) to connection `to`, whose canvas it
    /// replaces, followed by the placeholder compensation.
    fn send_full_state(
        &mut self,
        to: PeerId,
        state: &Arc<PeerMessage>,
        user: &Arc<str>,
        effects: &mut Effects,
    ) {
        let (Some(peer), PeerMessage::FullState(full)) = (self.peers.get_mut(&to), &**state) else {
            return;
        };
        peer.replace_all(&full.items);
        peer.sync = SyncState::Synced;
        effects.messages.push(Outgoing {
            to,
            message: state.clone(),
        });
        let fixes: Vec<_> = full
            .items
            .iter()
            .filter(|(_, fields)| needs_placeholder_fix(fields))
            .collect();
        if fixes.len() <= MAX_FULL_STATE_FIXES {
            for (uuid, fields) in fixes {
                tell_placeholder_fix(effects, to, uuid, fields, user);
            }
        }
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
        let message = Arc::new(PeerMessage::Command(command_message(
            action, uuid, &fields, user,
        )));
        tell_command(effects, to, peer, &message, user);
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
            let removal = command_message(Action::Remove, uuid, &Arc::default(), user);
            effects.messages.push(Outgoing {
                to,
                message: Arc::new(PeerMessage::Command(removal)),
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
                    // Never `move_item`: the upstream client applies its `angle_deg` in the
                    // wrong sense (mirroring the item); its `update_item` handler is right.
                    let action = match (&source, &old) {
                        (Source::Command { action, .. }, _) if *action != Action::Move => *action,
                        (_, None) => Action::Add,
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
            let mut shared: HashMap<Action, Arc<PeerMessage>> = HashMap::new();
            // A connection waiting for the scene gets it whole, once it is initialized.
            let mut recipients: Vec<_> = self
                .peers
                .iter_mut()
                .filter(|(id, p)| Some(**id) != except && p.sync != SyncState::Awaiting)
                .collect();
            recipients.sort_unstable_by_key(|(id, _)| **id);
            for (id, peer) in recipients {
                let action = match (action, peer.has(&uuid)) {
                    (Action::Remove, false) => continue,
                    (Action::Remove, true) => Action::Remove,
                    // A connection that has neither uploaded nor asked for the scene may hold
                    // the item (a host reconnecting with its canvas, or opening the same bench
                    // file): an `add_item` would duplicate it. If it lacks the item, the client
                    // ignores the update and gets the item with the full state it asks for, or
                    // in answer to its upload. Not after a removal sent to it: once applied,
                    // its canvas lacks the item.
                    (_, false) if peer.sync == SyncState::Idle && !peer.was_told_removed(&uuid) => {
                        let message = command_message(Action::Update, &uuid, &data, user);
                        peer.tell_unconfirmed(&uuid, &data);
                        effects.messages.push(Outgoing {
                            to: *id,
                            message: Arc::new(PeerMessage::Command(message)),
                        });
                        continue;
                    }
                    (_, false) => Action::Add,
                    (Action::Add, true) => Action::Update,
                    (a, true) => a,
                };
                let message = shared
                    .entry(action)
                    .or_insert_with(|| {
                        Arc::new(PeerMessage::Command(command_message(
                            action, &uuid, &data, user,
                        )))
                    })
                    .clone();
                tell_command(effects, *id, peer, &message, user);
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

/// Queues the command `message` for connection `to` and records in its view what that
/// tells it. An `add_item` of a type the upstream client builds on a placeholder is followed by
/// an `update_item` with the same data (a message of its own, which may cross a command).
fn tell_command(
    effects: &mut Effects,
    to: PeerId,
    peer: &mut PeerView,
    message: &Arc<PeerMessage>,
    user: &Arc<str>,
) {
    let PeerMessage::Command(command) = &**message else {
        return;
    };
    let uuid = &command.item_id;
    if command.action == Action::Remove {
        peer.tell_removed(uuid);
    } else {
        peer.tell(uuid, &command.data, command.action);
    }
    effects.messages.push(Outgoing {
        to,
        message: message.clone(),
    });
    if command.action == Action::Add && needs_placeholder_fix(&command.data) {
        tell_placeholder_fix(effects, to, uuid, &command.data, user);
    }
}

/// The `update_item` that follows an item the upstream client built on a placeholder. It goes
/// out in the same write as the message that created the item, and the client applies the
/// frames of one read back to back, so it is not a message of its own in the peer's memory.
fn tell_placeholder_fix(
    effects: &mut Effects,
    to: PeerId,
    uuid: &Arc<str>,
    data: &Arc<ItemFields>,
    user: &Arc<str>,
) {
    let update = command_message(Action::Update, uuid, data, user);
    effects.messages.push(Outgoing {
        to,
        message: Arc::new(PeerMessage::Command(update)),
    });
}

/// Whether the upstream client builds an item of this kind on a placeholder.
fn needs_placeholder_fix(fields: &ItemFields) -> bool {
    PLACEHOLDER_TYPES.contains(&item_type_of(fields))
}

/// Whether messages in flight, applied after a command, leave `current` on the canvas: the
/// client rebuilds the item from a whole dict, and takes only the position from a move.
fn leaves(in_flight: &InFlight, current: &ItemFields) -> bool {
    let position_agrees = in_flight
        .position
        .as_ref()
        .is_none_or(|moved| agrees(moved, current, Some(&POSITION_FIELDS)));
    let whole_agrees = in_flight.whole.as_ref().is_none_or(|whole| {
        let differs = |(k, v): (&String, &Value)| {
            let position = POSITION_FIELDS.contains(&k.as_str()) && in_flight.position.is_some();
            !position && current.get(k).is_none_or(|c| !json_equal(c, v))
        };
        whole.len() == current.len() && !whole.iter().any(differs)
    });
    position_agrees && whole_agrees
}

/// The fields of `sent` named in `only`.
fn position_of(sent: &ItemFields, only: &[&str]) -> Arc<ItemFields> {
    Arc::new(
        sent.iter()
            .filter(|(field, _)| only.contains(&field.as_str()))
            .map(|(field, value)| (field.clone(), value.clone()))
            .collect(),
    )
}

/// Whether every field of `sent` (limited to `only`) has the same value in `current`.
fn agrees(sent: &ItemFields, current: &ItemFields, only: Option<&[&str]>) -> bool {
    sent.iter()
        .filter(|(field, _)| only.is_none_or(|o| o.contains(&field.as_str())))
        .all(|(field, value)| current.get(field).is_some_and(|cur| json_equal(cur, value)))
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

/// An item's fields as desktop clients get them (a listed field of the wrong type, which only
/// a Yjs client can write, is left out: the client then shows its default), or `None` when the
/// document entry is not a map.
fn read_fields<T: ReadTxn>(txn: &T, value: &Out) -> Option<ItemFields> {
    match value {
        Out::YMap(item) => Some(
            item.iter(txn)
                .map(|(k, v)| (k.to_owned(), out_to_json(txn, &v)))
                .filter(|(k, v)| schema::well_typed(k, v))
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

    /// A command on an item of a type every client builds from its data (no placeholder fix).
    fn cmd(action: Action, uuid: &str, data: Value) -> Command {
        typed_cmd(action, "ruler", uuid, data)
    }

    fn typed_cmd(action: Action, item_type: &str, uuid: &str, data: Value) -> Command {
        Command {
            action,
            item_type: Some(item_type.into()),
            item_id: uuid.into(),
            data: fields(data),
        }
    }

    fn upload(items: &[(&str, Value)]) -> Vec<UploadedItem> {
        items
            .iter()
            .map(|(uuid, data)| UploadedItem {
                uuid: (*uuid).into(),
                item_type: data["item_type"].as_str().map(str::to_owned),
                fields: fields(data.clone()),
            })
            .collect()
    }

    fn checked(bytes: &[u8]) -> CheckedUpdate {
        CheckedUpdate::check(bytes.to_vec()).expect("a valid update")
    }

    fn user(name: &str) -> Arc<str> {
        Arc::from(name)
    }

    /// The tests' clock: commands happen at `t0()`; corrections are due a delay later.
    fn t0() -> Instant {
        static T0: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *T0.get_or_init(Instant::now)
    }

    /// The corrections owed once commands paused.
    fn corrections(scene: &mut Scene) -> Effects {
        scene.send_due_corrections(t0() + CORRECTION_DELAY)
    }

    /// A message as a test compares it: a command as (action, uuid, data); a full state as
    /// `("full_state", its uuids)`.
    #[derive(Debug, PartialEq)]
    enum Seen {
        Command(Action, String, Value),
        FullState(Vec<String>),
    }

    fn seen(effects: &Effects, to: PeerId) -> Vec<Seen> {
        effects
            .messages
            .iter()
            .filter(|o| o.to == to)
            .map(|o| match &*o.message {
                PeerMessage::Command(m) => Seen::Command(
                    m.action,
                    m.item_id.to_string(),
                    Value::Object((*m.data).clone()),
                ),
                PeerMessage::FullState(state) => {
                    Seen::FullState(state.items.iter().map(|(u, _)| u.to_string()).collect())
                }
            })
            .collect()
    }

    /// Commands for `to`, as (action, uuid, data).
    fn to(effects: &Effects, to: PeerId) -> Vec<(Action, String, Value)> {
        seen(effects, to)
            .into_iter()
            .map(|s| match s {
                Seen::Command(a, u, d) => (a, u, d),
                Seen::FullState(items) => panic!("a full state of {items:?}, not a command"),
            })
            .collect()
    }

    fn actions(effects: &Effects, peer: PeerId) -> Vec<(Action, String)> {
        to(effects, peer)
            .into_iter()
            .map(|(a, u, _)| (a, u))
            .collect()
    }

    const LENS: &str =
        r#"{"name": "L1", "x_mm": 0.0, "y_mm": 0.0, "angle_deg": 0.0, "z_value": 0}"#;

    fn lens() -> Value {
        serde_json::from_str(LENS).unwrap()
    }

    /// A scene with legacy peers 1 and 2 that both hold item `a`.
    fn scene_with_item() -> Scene {
        let mut scene = Scene::default();
        scene.add_synced_peer(1);
        scene.add_synced_peer(2);
        let effects = scene
            .apply_command(1, &user("p1"), cmd(Action::Add, "a", lens()), t0())
            .unwrap();
        assert_eq!(to(&effects, 2)[0].0, Action::Add);
        scene
    }

    /// Peer 1 renames `a` to L2 (peer 2 is told); returns the renamed dict.
    fn rename_a(scene: &mut Scene) -> Value {
        let mut renamed = lens();
        renamed["name"] = json!("L2");
        scene
            .apply_command(
                1,
                &user("p1"),
                cmd(Action::Update, "a", renamed.clone()),
                t0(),
            )
            .unwrap();
        renamed
    }

    #[test]
    fn add_reaches_others_with_item_type_and_sends_no_echo() {
        let mut scene = Scene::default();
        scene.add_synced_peer(1);
        scene.add_synced_peer(2);
        assert!(!scene.initialized());
        let effects = scene
            .apply_command(
                1,
                &user("p1"),
                cmd(Action::Add, "a", json!({"x_mm": 1.5, "n_rays": 7})),
                t0(),
            )
            .unwrap();
        assert!(effects.update.is_some());
        assert!(to(&effects, 1).is_empty(), "no echo: {:?}", to(&effects, 1));
        let sent = to(&effects, 2);
        assert_eq!(sent.len(), 1);
        assert_eq!(
            sent[0].2,
            json!({"x_mm": 1.5, "n_rays": 7, "item_type": "ruler"})
        );
        assert!(scene.initialized());
        assert_eq!(scene.item_count(), 1);
    }

    #[test]
    fn a_component_or_source_added_is_followed_by_update_item() {
        let mut scene = Scene::default();
        scene.add_synced_peer(1);
        scene.add_synced_peer(2);
        for (uuid, kind) in [("c", "component"), ("s", "source"), ("t", "text")] {
            let effects = scene
                .apply_command(
                    1,
                    &user("p1"),
                    typed_cmd(Action::Add, kind, uuid, lens()),
                    t0(),
                )
                .unwrap();
            let sent = to(&effects, 2);
            if kind == "text" {
                assert_eq!(actions(&effects, 2), vec![(Action::Add, uuid.into())]);
            } else {
                assert_eq!(
                    actions(&effects, 2),
                    vec![(Action::Add, uuid.into()), (Action::Update, uuid.into())]
                );
                assert_eq!(sent[0].2, sent[1].2, "the update carries the same data");
            }
        }
    }

    #[test]
    fn move_writes_only_the_position() {
        let mut scene = scene_with_item();
        let data = json!({"name": "renamed by a move", "x_mm": 5.0, "y_mm": 6.0, "angle_deg": 90.0, "z_value": 0});
        let effects = scene
            .apply_command(2, &user("p2"), cmd(Action::Move, "a", data), t0())
            .unwrap();
        let item = scene.item("a").unwrap();
        assert_eq!(item["x_mm"], json!(5.0));
        assert_eq!(item["angle_deg"], json!(90.0));
        assert_eq!(item["name"], json!("L1"));
        // Relayed as update_item: the upstream client mirrors a move_item's angle.
        assert_eq!(to(&effects, 1)[0].0, Action::Update);
        assert!(to(&effects, 2).is_empty(), "{:?}", to(&effects, 2));
    }

    #[test]
    fn a_stale_dict_does_not_revert_a_concurrent_change() {
        let mut scene = scene_with_item();
        let renamed =
            json!({"name": "L2", "x_mm": 0.0, "y_mm": 0.0, "angle_deg": 0.0, "z_value": 0});
        let effects = scene
            .apply_command(1, &user("p1"), cmd(Action::Update, "a", renamed), t0())
            .unwrap();
        assert_eq!(to(&effects, 2)[0].0, Action::Update);
        // Peer 2 had not seen the rename: its whole dict still says L1.
        let stale = json!({"name": "L1", "x_mm": 0.0, "y_mm": 0.0, "angle_deg": 0.0, "z_value": 5});
        let effects = scene
            .apply_command(2, &user("p2"), cmd(Action::Update, "a", stale), t0())
            .unwrap();
        let item = scene.item("a").unwrap();
        assert_eq!(item["name"], json!("L2"));
        assert_eq!(item["z_value"], json!(5));
        assert_eq!(to(&effects, 1)[0].2["z_value"], json!(5));
        assert!(
            to(&effects, 2).is_empty(),
            "the correction waits for a pause"
        );
        assert_eq!(scene.next_correction_due(), Some(t0() + CORRECTION_DELAY));
        assert!(scene.send_due_corrections(t0()).messages.is_empty());
        // The rename crossed peer 2's command: it gets the authoritative state.
        let effects = corrections(&mut scene);
        let correction = to(&effects, 2);
        assert_eq!(correction.len(), 1);
        assert_eq!(correction[0].0, Action::Update);
        assert_eq!(correction[0].2["name"], json!("L2"));
        assert_eq!(correction[0].2["z_value"], json!(5));
        assert!(to(&effects, 1).is_empty());
        assert_eq!(scene.next_correction_due(), None);
    }

    #[test]
    fn a_ping_gets_the_corrections_owed_before_they_are_due() {
        let mut scene = scene_with_item();
        rename_a(&mut scene);
        scene
            .apply_command(2, &user("p2"), cmd(Action::Update, "a", lens()), t0())
            .unwrap();
        assert!(scene.send_corrections_owed_to(1).messages.is_empty());
        let effects = scene.send_corrections_owed_to(2);
        assert_eq!(actions(&effects, 2), vec![(Action::Update, "a".into())]);
        assert_eq!(scene.next_correction_due(), None);
    }

    #[test]
    fn a_drag_after_a_crossing_owes_one_correction_at_its_end() {
        let mut scene = scene_with_item();
        let renamed = rename_a(&mut scene);
        // Peer 2 drags `a` ten steps (move_item and update_item each) while the rename may
        // still be on its way: no echo during the drag, one correction once it paused.
        let mut step = t0();
        for i in 0..10 {
            step += std::time::Duration::from_millis(16);
            let mut data = renamed.clone();
            data["x_mm"] = json!(f64::from(i));
            for action in [Action::Move, Action::Update] {
                let effects = scene
                    .apply_command(2, &user("p2"), cmd(action, "a", data.clone()), step)
                    .unwrap();
                assert!(
                    to(&effects, 2).is_empty(),
                    "step {i}: {:?}",
                    to(&effects, 2)
                );
                assert!(scene.send_due_corrections(step).messages.is_empty());
            }
        }
        assert_eq!(scene.next_correction_due(), Some(step + CORRECTION_DELAY));
        let effects = scene.send_due_corrections(step + CORRECTION_DELAY);
        let correction = to(&effects, 2);
        assert_eq!(correction.len(), 1, "{correction:?}");
        assert_eq!(correction[0].2["x_mm"], json!(9.0));
        assert_eq!(correction[0].2["name"], json!("L2"));
    }

    #[test]
    fn a_correction_owed_to_a_connection_that_left_is_forgotten() {
        let mut scene = scene_with_item();
        rename_a(&mut scene);
        let mut moved = lens();
        moved["x_mm"] = json!(3.0);
        scene
            .apply_command(2, &user("p2"), cmd(Action::Move, "a", moved), t0())
            .unwrap();
        assert!(scene.next_correction_due().is_some());
        scene.remove_peer(2);
        assert_eq!(scene.next_correction_due(), None);
        assert!(corrections(&mut scene).messages.is_empty());
    }

    #[test]
    fn a_command_for_an_item_the_server_never_had_creates_it() {
        // The upstream host drags an item of its canvas before anyone joined (so before it
        // uploaded): the drag's dict creates the item instead of being answered remove_item.
        let mut scene = Scene::default();
        scene.add_synced_peer(1);
        scene.add_synced_peer(2);
        let mut data = lens();
        data["x_mm"] = json!(12.5);
        let effects = scene
            .apply_command(
                1,
                &user("host"),
                typed_cmd(Action::Move, "source", "a", data),
                t0(),
            )
            .unwrap();
        assert!(effects.update.is_some());
        assert!(to(&effects, 1).is_empty(), "{:?}", to(&effects, 1));
        assert_eq!(
            actions(&effects, 2),
            vec![(Action::Add, "a".into()), (Action::Update, "a".into())]
        );
        let item = scene.item("a").unwrap();
        assert_eq!(item["x_mm"], json!(12.5));
        assert_eq!(item["name"], json!("L1"));
        assert_eq!(item["item_type"], json!("source"));
        // A remove of an item the server never had changes nothing and answers nothing.
        let effects = scene
            .apply_command(
                1,
                &user("host"),
                cmd(Action::Remove, "zzz", json!({})),
                t0(),
            )
            .unwrap();
        assert!(effects.update.is_none() && effects.messages.is_empty());
    }

    #[test]
    fn a_command_that_crossed_a_removal_is_ignored_without_an_answer() {
        let mut scene = scene_with_item();
        let effects = scene
            .apply_command(1, &user("p1"), cmd(Action::Remove, "a", json!({})), t0())
            .unwrap();
        assert_eq!(
            to(&effects, 2),
            vec![(Action::Remove, "a".to_owned(), json!({}))]
        );
        assert!(to(&effects, 1).is_empty(), "the remover gets no echo");
        let version = scene.version();
        // Peer 2 dragged the item before it applied the removal it was sent.
        let effects = scene
            .apply_command(
                2,
                &user("p2"),
                cmd(Action::Move, "a", json!({"x_mm": 1.0})),
                t0(),
            )
            .unwrap();
        assert!(effects.update.is_none());
        assert!(effects.messages.is_empty(), "{:?}", seen(&effects, 2));
        assert_eq!(scene.version(), version);
        assert!(scene.item("a").is_none());
    }

    #[test]
    fn removing_an_item_someone_else_moved_sends_the_remover_nothing() {
        let mut scene = scene_with_item();
        let moved = json!({"name": "L1", "x_mm": 3.0, "y_mm": 0.0, "angle_deg": 0.0, "z_value": 0});
        scene
            .apply_command(2, &user("p2"), cmd(Action::Move, "a", moved), t0())
            .unwrap();
        let effects = scene
            .apply_command(1, &user("p1"), cmd(Action::Remove, "a", json!({})), t0())
            .unwrap();
        assert!(to(&effects, 1).is_empty(), "{:?}", to(&effects, 1));
        assert_eq!(actions(&effects, 2), vec![(Action::Remove, "a".into())]);
    }

    #[test]
    fn a_removal_crossed_by_a_re_creation_is_repeated_to_the_remover() {
        let mut scene = scene_with_item();
        // Peer 2 removes and re-adds `a` (an undo); peer 1 gets remove_item then add_item.
        scene
            .apply_command(2, &user("p2"), cmd(Action::Remove, "a", json!({})), t0())
            .unwrap();
        scene
            .apply_command(2, &user("p2"), cmd(Action::Add, "a", lens()), t0())
            .unwrap();
        // Peer 1 had removed `a` before it applied either: its removal deletes the re-created
        // item, and the add_item it is about to apply would bring it back on its canvas.
        let effects = scene
            .apply_command(1, &user("p1"), cmd(Action::Remove, "a", json!({})), t0())
            .unwrap();
        assert!(scene.item("a").is_none());
        assert_eq!(actions(&effects, 1), vec![(Action::Remove, "a".into())]);
    }

    #[test]
    fn an_upload_equal_to_the_document_costs_no_message() {
        let mut scene = Scene::default();
        scene.add_synced_peer(1);
        let items: Vec<(String, Value)> = (0..300)
            .map(|i| {
                let mut item = lens();
                item["x_mm"] = json!(f64::from(i) + 0.25);
                item["item_type"] = json!("component");
                (format!("item-{i:03}"), item)
            })
            .collect();
        let as_refs: Vec<(&str, Value)> =
            items.iter().map(|(u, v)| (u.as_str(), v.clone())).collect();
        scene
            .apply_upload(1, &user("host"), upload(&as_refs), t0())
            .unwrap();
        scene.add_synced_peer(2);
        // The host reconnects (a new connection) and uploads the same canvas.
        scene.remove_peer(1);
        scene.add_synced_peer(3);
        let effects = scene
            .apply_upload(3, &user("host"), upload(&as_refs), t0())
            .unwrap();
        assert!(effects.update.is_none());
        assert!(effects.messages.is_empty(), "{:?}", seen(&effects, 3));
        // Its sync:request then costs nothing either.
        assert!(scene.request_sync(3, &user("host")).messages.is_empty());
    }

    #[test]
    fn an_uploader_gets_what_its_canvas_lacks_or_shows_differently() {
        let mut scene = scene_with_item();
        scene.add_synced_peer(3);
        let mut stale = lens();
        stale["name"] = json!("L0");
        stale["item_type"] = json!("ruler");
        let b = json!({"x_mm": 1.0, "item_type": "ruler"});
        let effects = scene
            .apply_upload(
                3,
                &user("h"),
                upload(&[("a", stale), ("b", b.clone())]),
                t0(),
            )
            .unwrap();
        // `a`'s name is a change this connection made (it was never told L1): it wins.
        assert_eq!(scene.item("a").unwrap()["name"], json!("L0"));
        assert!(to(&effects, 3).is_empty(), "{:?}", to(&effects, 3));
        assert_eq!(
            actions(&effects, 1),
            vec![(Action::Update, "a".into()), (Action::Add, "b".into())]
        );
        // Another connection adds `c`; the uploader's next upload lacks it: it gets add_item.
        scene
            .apply_command(1, &user("p1"), cmd(Action::Add, "c", lens()), t0())
            .unwrap();
        let effects = scene
            .apply_upload(3, &user("h"), upload(&[("b", b)]), t0())
            .unwrap();
        assert!(effects.update.is_none());
        assert!(to(&effects, 3).is_empty(), "c was sent already");
        assert!(scene.item("a").is_some(), "an upload deletes nothing");
    }

    #[test]
    fn upload_never_resurrects_what_the_uploader_was_told_removed() {
        let mut scene = scene_with_item();
        scene
            .apply_command(
                2,
                &user("p2"),
                cmd(Action::Add, "b", json!({"x_mm": 1.0})),
                t0(),
            )
            .unwrap();
        scene
            .apply_command(2, &user("p2"), cmd(Action::Remove, "b", json!({})), t0())
            .unwrap();
        let c = json!({"x_mm": 2.0, "item_type": "ruler"});
        let effects = scene
            .apply_upload(
                1,
                &user("p1"),
                upload(&[("b", json!({"x_mm": 1.0})), ("c", c)]),
                t0(),
            )
            .unwrap();
        assert!(scene.item("b").is_none(), "p1 was told of b's removal");
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
    fn a_sync_request_is_answered_with_the_scene_once() {
        let mut scene = scene_with_item();
        scene.add_peer(3);
        let effects = scene.request_sync(3, &user("late"));
        assert_eq!(seen(&effects, 3), vec![Seen::FullState(vec!["a".into()])]);
        assert!(scene.peer(3).unwrap().has("a"));
        // A reconnecting client sends two requests: the second costs nothing.
        assert!(scene.request_sync(3, &user("late")).messages.is_empty());
    }

    #[test]
    fn a_command_crossing_a_full_state_is_corrected() {
        let mut scene = scene_with_item();
        scene.add_peer(3);
        // Peer 3 got `a` by add_item before its sync:request was answered; it drags `a`
        // while the full state is on its way, and applies the full state after its drag.
        scene
            .apply_command(1, &user("p1"), cmd(Action::Add, "b", lens()), t0())
            .unwrap();
        assert!(scene.peer(3).unwrap().has("b"));
        scene.request_sync(3, &user("p3"));
        let mut moved = lens();
        moved["x_mm"] = json!(4.0);
        scene
            .apply_command(3, &user("p3"), cmd(Action::Move, "b", moved), t0())
            .unwrap();
        let effects = corrections(&mut scene);
        assert_eq!(actions(&effects, 3), vec![(Action::Update, "b".into())]);
        assert_eq!(to(&effects, 3)[0].2["x_mm"], json!(4.0));
    }

    #[test]
    fn a_full_state_is_followed_by_an_update_per_placeholder_item() {
        let mut scene = Scene::default();
        scene.add_peer(1);
        for (uuid, kind) in [("c", "component"), ("r", "ruler"), ("s", "source")] {
            scene
                .apply_command(
                    1,
                    &user("p1"),
                    typed_cmd(Action::Add, kind, uuid, lens()),
                    t0(),
                )
                .unwrap();
        }
        scene.add_peer(2);
        let effects = scene.request_sync(2, &user("p2"));
        let sent = seen(&effects, 2);
        assert_eq!(
            sent[0],
            Seen::FullState(vec!["c".into(), "r".into(), "s".into()])
        );
        let fixes: Vec<(Action, String)> = sent[1..]
            .iter()
            .map(|s| match s {
                Seen::Command(a, u, _) => (*a, u.clone()),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            fixes,
            vec![(Action::Update, "c".into()), (Action::Update, "s".into())]
        );
    }

    #[test]
    fn a_full_state_of_a_large_scene_gets_no_placeholder_fix() {
        let mut scene = Scene::default();
        scene.add_peer(1);
        let items: Vec<(String, Value)> = (0..=MAX_FULL_STATE_FIXES)
            .map(|i| {
                let mut item = lens();
                item["item_type"] = json!("component");
                (format!("item-{i:03}"), item)
            })
            .collect();
        let refs: Vec<(&str, Value)> = items.iter().map(|(u, v)| (u.as_str(), v.clone())).collect();
        scene
            .apply_upload(1, &user("host"), upload(&refs), t0())
            .unwrap();
        scene.add_peer(2);
        let effects = scene.request_sync(2, &user("joiner"));
        assert_eq!(effects.messages.len(), 1, "the full state alone");
        assert!(
            matches!(&*effects.messages[0].message, PeerMessage::FullState(s) if s.items.len() == items.len())
        );
        // One item fewer is fixed item by item.
        let mut scene = Scene::default();
        scene.add_peer(1);
        scene
            .apply_upload(1, &user("host"), upload(&refs[1..]), t0())
            .unwrap();
        scene.add_peer(2);
        let effects = scene.request_sync(2, &user("joiner"));
        assert_eq!(effects.messages.len(), 1 + MAX_FULL_STATE_FIXES);
    }

    #[test]
    fn a_request_before_the_scene_exists_is_answered_when_it_does() {
        // A colleague connects first; the host's upload then initializes the scene.
        let mut scene = Scene::default();
        scene.add_peer(1);
        assert!(scene
            .request_sync(1, &user("colleague"))
            .messages
            .is_empty());
        scene.add_peer(2);
        let mut a = lens();
        a["item_type"] = json!("ruler");
        let effects = scene
            .apply_upload(2, &user("host"), upload(&[("a", a)]), t0())
            .unwrap();
        assert_eq!(seen(&effects, 1), vec![Seen::FullState(vec!["a".into()])]);
        assert!(to(&effects, 2).is_empty());
        // The host's own request (the upstream client sends one) gets no full state: it would
        // replace a canvas the server holds only in part.
        assert!(scene.request_sync(2, &user("host")).messages.is_empty());
        // From then on the colleague gets commands.
        let effects = scene
            .apply_command(2, &user("host"), cmd(Action::Add, "b", lens()), t0())
            .unwrap();
        assert_eq!(actions(&effects, 1), vec![(Action::Add, "b".into())]);
    }

    #[test]
    fn an_empty_upload_initializes_the_scene_for_waiting_clients() {
        let mut scene = Scene::default();
        scene.add_peer(1);
        scene.request_sync(1, &user("colleague"));
        scene.add_peer(2);
        let effects = scene
            .apply_upload(2, &user("host"), Vec::new(), t0())
            .unwrap();
        assert!(scene.initialized());
        assert_eq!(seen(&effects, 1), vec![Seen::FullState(vec![])]);
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
            (moved, Action::Update),
            (renamed, Action::Update),
            (removed, Action::Remove),
        ] {
            let effects = scene.apply_update(&yjs, &checked(&update)).unwrap();
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
            .apply_update(&yjs, &checked(&added))
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
        scene.apply_update(&yjs, &checked(&moved)).unwrap();
        scene.add_peer(1);
        let state = scene.full_state();
        assert_eq!(state.items.len(), 1);
        assert_eq!(state.items[0].1["x_mm"], json!(5.0));
        scene.request_sync(1, &yjs);
        let renamed = edit(&|txn, items| {
            if let Some(Out::YMap(item)) = items.get(txn, "a") {
                item.insert(txn, "name", "L1");
            }
        });
        let effects = scene.apply_update(&yjs, &checked(&renamed)).unwrap();
        assert_eq!(to(&effects, 1)[0].0, Action::Update);
    }

    #[test]
    fn full_state_is_sorted_and_versions_grow() {
        let mut scene = scene_with_item();
        let v1 = scene.version();
        scene
            .apply_command(
                1,
                &user("p1"),
                cmd(Action::Add, "0", json!({"x_mm": 1.0})),
                t0(),
            )
            .unwrap();
        let state = scene.full_state();
        assert!(state.version > v1);
        let uuids: Vec<&str> = state.items.iter().map(|(u, _)| u.as_ref()).collect();
        assert_eq!(uuids, vec!["0", "a"]);
    }
}
