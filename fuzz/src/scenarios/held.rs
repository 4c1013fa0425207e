//! What a session's document ever held, learnt incrementally: the updates the session gives
//! to persist are applied in order to a replica whose deep observer records, per transaction,
//! only the fields that changed. Checking that a message makes a client lose nothing the
//! session never held (PROTOCOL §3.3) then costs a few set lookups, not a read of the whole
//! document per step. The replica is also what replaying the persisted updates gives.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use collab_core::doc::value::out_to_json;
use serde_json::{Map, Value};
use yrs::types::{EntryChange, Event, Events, PathSegment};
use yrs::updates::decoder::Decode;
use yrs::{DeepObservable, Doc, Map as _, MapRef, Out, ReadTxn, Transact, TransactionMut, Update};

use super::util::items_json;

/// The persisted updates, applied in order, and what they taught.
pub struct Persisted {
    doc: Doc,
    held: Arc<Mutex<Held>>,
}

impl Default for Persisted {
    fn default() -> Self {
        let held = Arc::new(Mutex::new(Held::default()));
        let doc = Doc::new();
        let items = doc.get_or_insert_map("items");
        let (learner, root) = (held.clone(), items.clone());
        items.observe_deep("held", move |txn, events| {
            lock(&learner).learn(txn, &root, events);
        });
        Persisted { doc, held }
    }
}

impl Persisted {
    /// Applies one update the session gave to persist.
    pub fn apply(&self, update: &[u8]) {
        let decoded = Update::decode_v1(update).expect("a persisted update decodes");
        self.doc
            .transact_mut()
            .apply_update(decoded)
            .expect("a persisted update applies");
    }

    /// What the document held so far.
    pub fn held(&self) -> MutexGuard<'_, Held> {
        lock(&self.held)
    }

    /// The replica's items.
    pub fn items(&self) -> BTreeMap<String, Value> {
        let items = self.doc.get_or_insert_map("items");
        items_json(&self.doc.transact(), &items)
    }
}

/// What the session document held, learnt from the updates it gave to persist.
#[derive(Default)]
pub struct Held {
    /// Every `(item, field, value as JSON text)` the document ever held.
    values: HashSet<(String, String, String)>,
    /// The items the document holds now.
    pub current: HashSet<String>,
    /// The items the document ever deleted.
    removed: HashSet<String>,
    /// Values of edits sent on items the document lacked at the time (a removal wins).
    discarded: HashSet<(String, String, String)>,
}

impl Held {
    fn record_item<T: ReadTxn>(&mut self, txn: &T, uuid: &str, item: &MapRef) {
        for (field, value) in item.iter(txn) {
            self.record(uuid, field, &out_to_json(txn, &value));
        }
    }

    fn record(&mut self, uuid: &str, field: &str, value: &Value) {
        self.values
            .insert((uuid.to_owned(), field.to_owned(), value.to_string()));
    }

    /// Learns what one transaction of the persisted-updates replica changed under `items`.
    fn learn(&mut self, txn: &TransactionMut, items: &MapRef, events: &Events) {
        for event in events.iter() {
            let path = event.path();
            match (path.front(), path.get(1), event) {
                (None, _, Event::Map(e)) => {
                    for (uuid, change) in e.keys(txn) {
                        match change {
                            EntryChange::Inserted(Out::YMap(item))
                            | EntryChange::Updated(_, Out::YMap(item)) => {
                                self.current.insert(uuid.to_string());
                                self.record_item(txn, uuid, item);
                            }
                            // Not an item map: the scene does not show it.
                            EntryChange::Inserted(_) | EntryChange::Updated(..) => {}
                            EntryChange::Removed(_) => {
                                self.current.remove(uuid.as_ref());
                                self.removed.insert(uuid.to_string());
                            }
                        }
                    }
                }
                (Some(PathSegment::Key(uuid)), None, Event::Map(e)) => {
                    for (field, change) in e.keys(txn) {
                        if let EntryChange::Inserted(v) | EntryChange::Updated(_, v) = change {
                            self.record(uuid, field, &out_to_json(txn, v));
                        }
                    }
                }
                // Inside a nested shared type: the field's whole value changed.
                (Some(PathSegment::Key(uuid)), Some(PathSegment::Key(field)), _) => {
                    if let Some(Out::YMap(item)) = items.get(txn, uuid) {
                        if let Some(value) = item.get(txn, field) {
                            self.record(uuid, field, &out_to_json(txn, &value));
                        }
                    }
                }
                _ => {}
            }
        }
    }

    pub fn discard(&mut self, uuid: &str, fields: &Map<String, Value>) {
        for (field, value) in fields {
            self.discarded
                .insert((uuid.to_owned(), field.clone(), value.to_string()));
        }
    }

    /// Asserts that `client` may drop `uuid`: the session deleted it.
    pub fn check_drop(&self, client: &str, uuid: &str) {
        assert!(
            self.removed.contains(uuid),
            "{client} was made to drop {uuid}, which the session never removed"
        );
    }

    /// Asserts that `client` loses nothing the session never held when the fields of `uuid`
    /// that differ in `replacement` are replaced.
    pub fn check_replace(
        &self,
        client: &str,
        uuid: &str,
        fields: &Map<String, Value>,
        replacement: &Map<String, Value>,
    ) {
        if !self.current.contains(uuid) {
            // Gone from the session: its values are moot, the item's removal is what counts.
            return self.check_drop(client, uuid);
        }
        for (field, value) in fields {
            // The type and the uuid fields name the item; the client fills them in itself.
            let identity = ["item_type", "item_uuid", "uuid"].contains(&field.as_str());
            if identity || replacement.get(field) == Some(value) {
                continue;
            }
            let key = (uuid.to_owned(), field.clone(), value.to_string());
            assert!(
                self.values.contains(&key) || self.discarded.contains(&key),
                "{client} was made to lose {uuid}.{field} = {value}, which the session never held"
            );
        }
    }
}

fn lock(held: &Mutex<Held>) -> MutexGuard<'_, Held> {
    // A failed check panics with the lock held; the run is over then.
    held.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
