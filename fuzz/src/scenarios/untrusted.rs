//! `untrusted_update`: arbitrary bytes as what a Yjs client may send, against a session
//! document seeded from the fixture scenes:
//!
//! * a client update (`GuardedDoc::apply_update`, and `Scene::apply_update`),
//! * a SyncStep1 state vector (`GuardedDoc::encode_diff_v1`),
//! * an awareness update (`AwarenessStates::apply`),
//! * a whole y-websocket frame (`protocol::yjs::decode`, then dispatched as the session does).
//!
//! No panic escapes (yrs may panic *inside* the guards: that is what they are for); when the
//! input is rejected the document is unchanged (same encoded state); afterwards the document
//! still encodes, a fresh `Doc` applying that encoding has the same state vector and items,
//! and it still answers SyncStep1. Run the fuzz target with `-rss_limit_mb=512`, which also
//! fails any single allocation above 512 MB.
//!
//! The first input byte selects the mode (see [`check`]).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use collab_core::doc::value::json_to_any;
use collab_core::doc::{CheckedAwareness, DocError, GuardedDoc, Scene};
use collab_core::protocol::yjs::{decode, YjsMessage};
use collab_core::session::awareness::AwarenessStates;
use serde_json::Value;
use yrs::sync::awareness::{AwarenessUpdate, AwarenessUpdateEntry};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{
    Array, ArrayPrelim, ClientID, Doc, Map, MapPrelim, MapRef, Out, ReadTxn, Snapshot, StateVector,
    Text, TextPrelim, Transact, TransactionMut, Update, WriteTxn,
};

use super::util::{
    apply_untrusted, awareness_untrusted, contained, desktop_view, diff_untrusted, doc_json,
    fixture_items, hex, items_json, load_untrusted, mirror_json, scene_apply_untrusted,
};

/// Client ids of the seed document's writers.
pub const SEED_CLIENTS: [u64; 2] = [0x1234, 0x0f_ffff_ffff];

/// The seed document's writers after building it: the first inserted every fixture item,
/// the second edited fields, removed an item and added nested shared types. Both are
/// deterministic (fixed client ids), so crash inputs replay.
pub fn seed_writers() -> (Doc, Doc) {
    let a = Doc::with_client_id(SEED_CLIENTS[0]);
    let items = a.get_or_insert_map("items");
    {
        let mut txn = a.transact_mut();
        for item in fixture_items() {
            let uuid = item["item_uuid"].as_str().unwrap_or("no-uuid").to_owned();
            // Field by field in key order: the clocks do not depend on `HashMap` order.
            let map = items.insert(&mut txn, uuid, MapPrelim::default());
            for (k, v) in item {
                map.insert(&mut txn, k.as_str(), json_to_any(v));
            }
            let kind = item
                .get("_type")
                .cloned()
                .unwrap_or(Value::from("component"));
            map.insert(&mut txn, "item_type", json_to_any(&kind));
        }
    }
    let b = Doc::with_client_id(SEED_CLIENTS[1]);
    let b_items = b.get_or_insert_map("items");
    let state = a
        .transact()
        .encode_state_as_update_v1(&StateVector::default());
    b.transact_mut()
        .apply_update(Update::decode_v1(&state).expect("seed decodes"))
        .expect("seed applies");
    {
        let mut txn = b.transact_mut();
        let mut uuids: Vec<String> = b_items.keys(&txn).map(str::to_owned).collect();
        uuids.sort();
        for (n, uuid) in uuids.iter().enumerate() {
            let Some(Out::YMap(item)) = b_items.get(&txn, uuid) else {
                continue;
            };
            match n % 4 {
                0 => {
                    item.insert(&mut txn, "x_mm", 12.5);
                    item.insert(&mut txn, "name", "renamed é");
                }
                1 => {
                    let text = item.insert(&mut txn, "notes_text", TextPrelim::new("hello wörld"));
                    text.insert(&mut txn, 5, ",");
                    text.remove_range(&mut txn, 0, 1);
                }
                2 => {
                    let meta = item.insert(&mut txn, "meta", MapPrelim::from([("k", 1i64)]));
                    meta.insert(&mut txn, "list", ArrayPrelim::from([1.5, 2.5]));
                    item.remove(&mut txn, "notes");
                }
                _ => {
                    let arr = item.insert(&mut txn, "points", ArrayPrelim::from([0i64, 1, 2]));
                    arr.remove(&mut txn, 1);
                }
            }
        }
        if let Some(last) = uuids.last() {
            b_items.remove(&mut txn, last);
        }
    }
    let state = b
        .transact()
        .encode_state_as_update_v1(&StateVector::default());
    a.transact_mut()
        .apply_update(Update::decode_v1(&state).expect("seed decodes"))
        .expect("seed applies");
    (a, b)
}

/// Per-transaction updates of a second writer continuing the seed document.
pub fn continuing_updates() -> Vec<(&'static str, Vec<u8>)> {
    let (_, b) = seed_writers();
    let items = b.get_or_insert_map("items");
    let mut out = Vec::new();
    let mut tx = |name: &'static str, f: &dyn Fn(&mut TransactionMut)| {
        let mut txn = b.transact_mut();
        f(&mut txn);
        txn.commit();
        out.push((name, txn.encode_update_v1()));
    };
    let first = |txn: &TransactionMut| -> Option<MapRef> {
        let mut uuids: Vec<String> = items.keys(txn).map(str::to_owned).collect();
        uuids.sort();
        match items.get(txn, uuids.first()?) {
            Some(Out::YMap(m)) => Some(m),
            _ => None,
        }
    };
    tx("move", &|txn| {
        if let Some(m) = first(txn) {
            m.insert(txn, "x_mm", 42.25);
            m.insert(txn, "y_mm", -7.5);
            m.insert(txn, "angle_deg", 90.0);
        }
    });
    tx("rename", &|txn| {
        if let Some(m) = first(txn) {
            m.insert(txn, "name", "Lens ✓");
            m.insert(txn, "z_value", 3i64);
        }
    });
    tx("new-item", &|txn| {
        let m = items.insert(txn, "new-item-1", MapPrelim::default());
        m.insert(txn, "item_type", "ruler");
        m.insert(txn, "points", yrs::Any::from(vec![0u8, 1, 2]));
        m.insert(txn, "x_mm", 1.0);
    });
    tx("nested-types", &|txn| {
        if let Some(m) = first(txn) {
            let t = m.insert(txn, "label", TextPrelim::new("héllo"));
            t.insert(txn, 3, "xy"); // a byte offset: after "hé"
            let a = m.insert(txn, "marks", ArrayPrelim::from([1i64, 2, 3]));
            a.remove(txn, 0);
            let inner = m.insert(txn, "meta", MapPrelim::default());
            inner.insert(txn, "k", yrs::Any::Null);
        }
    });
    tx("delete-field", &|txn| {
        if let Some(m) = first(txn) {
            m.remove(txn, "notes");
        }
    });
    tx("delete-item", &|txn| {
        items.remove(txn, "new-item-1");
    });
    tx("other-root", &|txn| {
        let text = txn.get_or_insert_text("text");
        text.insert(txn, 0, "root text 👋");
    });
    out
}

/// The seed: the fixture scenes as one v1 update (with deletions and nested types).
pub fn seed_update() -> &'static [u8] {
    static SEED: OnceLock<Vec<u8>> = OnceLock::new();
    SEED.get_or_init(|| {
        let (a, _) = seed_writers();
        let state = a
            .transact()
            .encode_state_as_update_v1(&StateVector::default());
        state
    })
}

/// A session document holding the seed.
pub fn seeded_doc() -> GuardedDoc {
    load_untrusted(&[seed_update()]).expect("the seed loads")
}

/// An awareness update with one state, applied before the input in awareness mode.
pub fn seed_awareness() -> Vec<u8> {
    AwarenessUpdate {
        clients: [(
            ClientID::new(SEED_CLIENTS[0]),
            AwarenessUpdateEntry {
                clock: 3,
                json: Arc::from(r##"{"user":{"name":"ä","color":"#f00"}}"##),
            },
        )]
        .into_iter()
        .collect(),
    }
    .encode_v1()
}

/// The modes selected by the first byte.
pub const MODES: u8 = 7;
pub const MODE_UPDATE: u8 = 0;
pub const MODE_STATE_VECTOR: u8 = 1;
pub const MODE_AWARENESS: u8 = 2;
pub const MODE_FRAME: u8 = 3;
/// Two updates: the byte after the mode splits the rest.
pub const MODE_TWO_UPDATES: u8 = 4;
/// One update through a `Scene` with a legacy peer: its mirror must follow the document.
pub const MODE_SCENE: u8 = 5;
/// One update on an empty document.
pub const MODE_EMPTY_DOC: u8 = 6;

/// What a document holds: its snapshot (state vector and delete set) and its items. Encoded
/// bytes are no measure: yrs writes `Any` maps in `HashMap` order, which differs between two
/// documents holding the same values.
#[derive(Debug, Clone, PartialEq)]
pub struct State {
    pub snapshot: Snapshot,
    pub items: BTreeMap<String, Value>,
}

/// The state of a `GuardedDoc`, read through its guard.
fn state_of(doc: &mut GuardedDoc) -> State {
    contained("GuardedDoc::read", || {
        doc.read(|txn, items| State {
            snapshot: txn.snapshot(),
            items: items_json(txn, items),
        })
    })
    .expect("the document reads")
}

/// The seed document's state, checked once with [`healthy`].
fn seed_state() -> &'static State {
    static STATE: OnceLock<State> = OnceLock::new();
    STATE.get_or_init(|| healthy(&mut seeded_doc(), None))
}

thread_local! {
    /// A seeded document that yrs never touched since it was built, for the next input.
    static SPARE: RefCell<Option<GuardedDoc>> = const { RefCell::new(None) };
}

/// A seeded document: the spare one if there is one (building one costs more than most
/// inputs), else a new one.
fn take_seeded() -> GuardedDoc {
    SPARE
        .with(|s| s.borrow_mut().take())
        .unwrap_or_else(seeded_doc)
}

/// Keeps a seeded document for the next input; only for documents whose yrs state the input
/// never reached (the guard refused it, or the input was only a state vector).
fn keep_seeded(doc: GuardedDoc) {
    SPARE.with(|s| *s.borrow_mut() = Some(doc));
}

/// Checks one input.
pub fn check(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let seed = seed_state();
    match mode % MODES {
        MODE_UPDATE => seed_update_input(rest, seed),
        MODE_STATE_VECTOR => seed_state_vector_input(rest, seed),
        MODE_AWARENESS => awareness(rest),
        MODE_FRAME => match decode(rest) {
            Ok(YjsMessage::SyncStep1(sv)) => seed_state_vector_input(sv.bytes(), seed),
            Ok(YjsMessage::SyncStep2(u) | YjsMessage::Update(u)) => {
                seed_update_input(u.bytes(), seed)
            }
            Ok(YjsMessage::Awareness(a)) => awareness(a.bytes()),
            Ok(YjsMessage::QueryAwareness | YjsMessage::Auth) => {}
            Err(e) => assert!(!e.0.is_empty()),
        },
        MODE_TWO_UPDATES => {
            let (first, second) = match rest.split_first() {
                Some((&at, tail)) => tail.split_at(usize::from(at).min(tail.len())),
                None => (rest, &[][..]),
            };
            let mut doc = take_seeded();
            let (middle, untouched) = update(&mut doc, first, seed);
            let (_, untouched_too) = update(&mut doc, second, &middle);
            if untouched && untouched_too {
                keep_seeded(doc);
            }
        }
        MODE_SCENE => scene_update(rest),
        _ => {
            let mut empty = GuardedDoc::new();
            let before = healthy(&mut empty, None);
            update(&mut empty, rest, &before);
        }
    }
}

fn seed_update_input(bytes: &[u8], seed: &State) {
    let mut doc = take_seeded();
    if update(&mut doc, bytes, seed).1 {
        keep_seeded(doc);
    }
}

fn seed_state_vector_input(bytes: &[u8], seed: &State) {
    let mut doc = take_seeded();
    state_vector(&mut doc, bytes, seed);
    keep_seeded(doc);
}

/// Applies `bytes`; a rejection must leave the document at `before`. Returns the state after,
/// and whether the guard refused the bytes (yrs never saw them).
fn update(doc: &mut GuardedDoc, bytes: &[u8], before: &State) -> (State, bool) {
    let result = contained("GuardedDoc::apply_update", || apply_untrusted(doc, bytes));
    let after = healthy(doc, Some(before));
    if let Err(e) = &result {
        assert!(
            after == *before,
            "a rejected update ({e}) changed the document: input {}",
            hex(bytes)
        );
    }
    (after, matches!(result, Err(DocError::Rejected(_))))
}

fn state_vector(doc: &mut GuardedDoc, bytes: &[u8], before: &State) {
    if let Ok(diff) = contained("GuardedDoc::encode_diff_v1", || diff_untrusted(doc, bytes)) {
        let decoded = contained("decoding our SyncStep2", || Update::decode_v1(&diff));
        decoded.unwrap_or_else(|e| panic!("our SyncStep2 does not decode ({e}): {}", hex(&diff)));
    }
    let after = healthy(doc, Some(before));
    assert!(
        after == *before,
        "answering SyncStep1 changed the document: input {}",
        hex(bytes)
    );
}

/// The document encodes (after at most one rebuild), a fresh `Doc` applying the encoding holds
/// the same state, and the document answers SyncStep1. Returns its state. When that equals
/// `checked` (a state that passed these checks already) the fresh `Doc` is not built again.
fn healthy(doc: &mut GuardedDoc, checked: Option<&State>) -> State {
    let encoded = match contained("GuardedDoc::encode_state_v1", || doc.encode_state_v1()) {
        Ok(bytes) => bytes,
        Err(DocError::Panicked) => contained("GuardedDoc::encode_state_v1 after a rebuild", || {
            doc.encode_state_v1()
        })
        .unwrap_or_else(|e| panic!("the document does not encode after a rebuild: {e}")),
        Err(e) => panic!("the document does not encode: {e}"),
    };
    let state = state_of(doc);
    if checked == Some(&state) {
        return state;
    }
    let fresh = Doc::new();
    let items = fresh.get_or_insert_map("items");
    let update = contained("decoding our own encoding", || Update::decode_v1(&encoded))
        .unwrap_or_else(|e| panic!("our own encoding does not decode ({e}): {}", hex(&encoded)));
    contained("a fresh Doc applying our encoding", || {
        fresh.transact_mut().apply_update(update)
    })
    .unwrap_or_else(|e| panic!("a fresh Doc refuses our encoding ({e}): {}", hex(&encoded)));
    let txn = fresh.transact();
    // The delete sets may differ: a crafted block that reuses ids the document holds for
    // other content, under another parent, has its unseen tail integrated by yrs under the
    // declared parent, while the encoding (which gives the tail an origin instead) puts it
    // under the origin's parent. What peers see (state vector and scene) must agree.
    assert_eq!(
        (txn.state_vector(), items_json(&txn, &items)),
        (state.snapshot.state_map.clone(), state.items.clone()),
        "a fresh Doc from our encoding differs: {}",
        hex(&encoded)
    );
    contained("GuardedDoc::encode_diff_v1 of our own state vector", || {
        diff_untrusted(doc, &doc.state_vector_v1())
    })
    .expect("the document answers SyncStep1");
    state
}

fn awareness_map(bytes: Option<Vec<u8>>) -> BTreeMap<u64, (u32, String)> {
    let Some(bytes) = bytes else {
        return BTreeMap::new();
    };
    let update = AwarenessUpdate::decode_v1(&bytes).expect("our awareness encoding decodes");
    update
        .clients
        .into_iter()
        .map(|(id, e)| (id.get(), (e.clock, e.json.to_string())))
        .collect()
}

fn awareness(bytes: &[u8]) {
    let now = Instant::now();
    let mut states = AwarenessStates::new(64 * 1024, 1024, 1024 * 1024);
    states
        .apply(
            1,
            &CheckedAwareness::check(seed_awareness()).expect("checks"),
            now,
        )
        .expect("the seed awareness update applies");
    let before = awareness_map(states.encode_all());
    match contained("AwarenessStates::apply", || {
        awareness_untrusted(&mut states, 2, bytes, now)
    }) {
        Err(_) => assert_eq!(
            awareness_map(states.encode_all()),
            before,
            "a rejected awareness update changed the states: {}",
            hex(bytes)
        ),
        Ok(changed) => drop(awareness_map(changed)),
    }
    awareness_map(states.encode_all());
    awareness_map(states.remove_owner(2));
    awareness_map(states.remove_owner(1));
    assert!(states.is_empty(), "states remain after both owners left");
}

/// The update through a `Scene` with a legacy peer: on success the mirror equals the document
/// and the messages describe it; on rejection nothing changed and nothing was sent.
fn scene_update(bytes: &[u8]) {
    let mut scene = Scene::new(seeded_doc(), true);
    scene.add_peer(1);
    scene.request_sync(1, &Arc::from("legacy"));
    let before_doc = doc_json(&mut scene);
    let user: Arc<str> = Arc::from("yjs");
    let result = contained("Scene::apply_update", || {
        scene_apply_untrusted(&mut scene, &user, bytes)
    });
    let doc = doc_json(&mut scene);
    let mirror = mirror_json(&mut scene);
    match result {
        Ok(_) => assert_eq!(
            mirror,
            desktop_view(&doc),
            "the mirror differs from the document after {}",
            hex(bytes)
        ),
        Err(e) => {
            assert_eq!(
                doc,
                before_doc,
                "a rejected update ({e}) changed the document: {}",
                hex(bytes)
            );
            assert_eq!(
                mirror,
                desktop_view(&doc),
                "a rejected update ({e}) changed the mirror: {}",
                hex(bytes)
            );
        }
    }
    healthy(scene.doc_mut(), Some(seed_state()));
}
