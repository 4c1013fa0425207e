//! A Yjs client's side of the document, with `yrs` alone: apply what the server sends, make
//! edits, read items back as JSON, build awareness updates. The conversions go through yrs'
//! own JSON (not the core's), so they check the core rather than repeat it.
//!
//! Shared by the core's tests (`core/tests/common`) and the socket suites (`tests/common`
//! includes this file), so it depends on nothing but `yrs` and `serde_json`.
#![allow(dead_code)]

use std::collections::HashMap;

use serde_json::Value;
use yrs::sync::awareness::{AwarenessUpdate, AwarenessUpdateEntry};
use yrs::types::ToJson;
use yrs::updates::decoder::Decode;
use yrs::{Any, ClientID, Doc, Map, MapPrelim, MapRef, Out, ReadTxn, Transact, TransactionMut};
use yrs::{StateVector, Update};

/// The document's root map of items.
pub fn items(doc: &Doc) -> MapRef {
    doc.get_or_insert_map("items")
}

/// Applies a v1 update from the server; panics if it does not decode or apply.
pub fn apply_update(doc: &Doc, update: &[u8]) {
    let update = Update::decode_v1(update).expect("the server's update decodes");
    doc.transact_mut()
        .apply_update(update)
        .expect("the server's update applies");
}

/// A fresh document holding `update` (a whole state), which must be self-contained.
pub fn doc_from(update: &[u8]) -> Doc {
    let doc = Doc::new();
    items(&doc);
    apply_update(&doc, update);
    assert!(
        doc.transact().store().pending_update().is_none(),
        "the update is self-contained"
    );
    doc
}

/// The document's state vector.
pub fn state_vector(doc: &Doc) -> StateVector {
    doc.transact().state_vector()
}

/// A yrs value as JSON, through yrs' own JSON encoding.
pub fn any_to_value(any: &Any) -> Value {
    let mut text = String::new();
    any.to_json(&mut text);
    serde_json::from_str(&text).unwrap()
}

/// A JSON value as a yrs `Any`, through yrs' own JSON parser.
pub fn value_to_any(value: &Value) -> Any {
    Any::from_json(&value.to_string()).unwrap()
}

/// An item of the document as JSON fields.
pub fn doc_item(doc: &Doc, uuid: &str) -> Option<Value> {
    let items = items(doc);
    let txn = doc.transact();
    match items.get(&txn, uuid)? {
        Out::YMap(item) => Some(any_to_value(&item.to_json(&txn))),
        other => panic!("items[{uuid}] is not a map: {other:?}"),
    }
}

/// Every item of the document as JSON fields, keyed by uuid.
pub fn doc_items(doc: &Doc) -> std::collections::BTreeMap<String, Value> {
    let items = items(doc);
    let txn = doc.transact();
    let keys: Vec<String> = items.keys(&txn).map(str::to_owned).collect();
    drop(txn);
    keys.into_iter()
        .filter_map(|uuid| doc_item(doc, &uuid).map(|item| (uuid, item)))
        .collect()
}

/// The fields of `data` plus `item_type`, as a yrs map to insert.
pub fn item_prelim(item_type: &str, data: &Value) -> MapPrelim {
    let mut fields: Vec<(String, Any)> = data
        .as_object()
        .expect("item data is an object")
        .iter()
        .map(|(k, v)| (k.clone(), value_to_any(v)))
        .collect();
    fields.push(("item_type".into(), Any::from(item_type)));
    MapPrelim::from_iter(fields)
}

/// Writes `fields` into the item `uuid`.
pub fn set_fields(txn: &mut TransactionMut, items: &MapRef, uuid: &str, fields: &[(&str, Value)]) {
    let Some(Out::YMap(item)) = items.get(txn, uuid) else {
        panic!("no item {uuid} in the yrs document");
    };
    for (field, value) in fields {
        item.insert(txn, *field, value_to_any(value));
    }
}

/// Makes a change in one transaction and returns its v1 update.
pub fn edit(doc: &Doc, f: impl FnOnce(&mut TransactionMut, &MapRef)) -> Vec<u8> {
    let items = items(doc);
    let mut txn = doc.transact_mut();
    f(&mut txn, &items);
    txn.encode_update_v1()
}

/// An awareness update of `(client id, clock, state JSON)` entries.
pub fn awareness_update(entries: &[(u64, u32, &str)]) -> AwarenessUpdate {
    AwarenessUpdate {
        clients: entries
            .iter()
            .map(|(client, clock, json)| {
                (
                    ClientID::new(*client),
                    AwarenessUpdateEntry {
                        clock: *clock,
                        json: (*json).into(),
                    },
                )
            })
            .collect(),
    }
}

/// The entries of an awareness update: client id → (clock, state JSON).
pub fn awareness_entries(update: &AwarenessUpdate) -> HashMap<u64, (u32, String)> {
    update
        .clients
        .iter()
        .map(|(id, e)| (id.get(), (e.clock, e.json.to_string())))
        .collect()
}
