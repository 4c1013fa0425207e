//! `merge_convergence`: 2–5 yrs replicas edit the root map `items` (item maps, fields, moves,
//! deletions, nested values and nested shared types). Their updates reach the session
//! (`Scene::apply_update`, the server's path) and each other in any order, duplicated, split
//! (`diff_updates_v1` at arbitrary clocks), merged (`merge_updates_v1`), or lost behind a
//! partition; endpoints also run state-vector syncs (`GuardedDoc::encode_diff_v1` on the
//! session side). The session's own re-encoded updates (what the server broadcasts) travel
//! too. After a final heal every replica and the session have equal state vectors and equal
//! scene JSON, and the session's mirror equals its document. Replicas apply what they receive
//! through `GuardedDoc`, as the session does (plain yrs mishandles out-of-order blocks); a plain
//! yrs observer receives only what the session writes and must end equal too.

use std::sync::Arc;

use collab_core::doc::{GuardedDoc, Scene};
use yrs::any::Number;
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{
    Any, Array, ArrayPrelim, ArrayRef, Doc, GetString, Map, MapPrelim, MapRef, Out, ReadTxn,
    StateVector, Text, TextPrelim, Transact, TransactionMut, Update,
};

use super::util::{
    apply_untrusted, contained, desktop_view, diff_untrusted, doc_json, hex, items_json,
    mirror_json, quiet, scene_apply_untrusted,
};

/// Field names the scripts write (the real ones, plus a few odd ones).
pub const FIELDS: [&str; 10] = [
    "x_mm",
    "y_mm",
    "angle_deg",
    "name",
    "z_value",
    "locked",
    "interfaces",
    "notes",
    "item_type",
    "points",
];

/// Strings for values (any Unicode: these are atomic `Any` values).
const STRINGS: [&str; 8] = [
    "",
    "L1",
    "Lens é",
    "👋 mirror",
    "component",
    "source",
    "a\"b\\c",
    "\u{0}ctl\u{7f}",
];

/// Text for nested `Y.Text` values.
const TEXTS: [&str; 4] = ["", "ab", "héllo", "👋x"];

/// One test script.
#[derive(Debug, Clone)]
pub struct MergeScript {
    /// 2 + `replicas % 4` replicas.
    pub replicas: u8,
    /// Replica client ids are `client_base + i` (varied widths of var-ints).
    pub client_base: u32,
    pub finish: Finish,
    pub ops: Vec<MergeOp>,
}

#[cfg(not(test))]
impl<'a> arbitrary::Arbitrary<'a> for MergeScript {
    fn arbitrary(u: &mut arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(MergeScript {
            replicas: u.arbitrary()?,
            client_base: u.arbitrary()?,
            finish: u.arbitrary()?,
            ops: super::util::steps(u)?,
        })
    }
}

/// How the partitions heal at the end.
#[cfg_attr(not(test), derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone, Copy)]
pub enum Finish {
    /// Two rounds of SyncStep1/SyncStep2 between every replica and the session (y-websocket).
    ThroughSession,
    /// Every update ever produced, in order, to every endpoint.
    RedeliverAll,
    /// All updates merged into one, to every endpoint.
    MergedOnce,
}

/// One step. Indices are taken modulo what exists; endpoint `replicas` is the session.
#[cfg_attr(not(test), derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone)]
pub enum MergeOp {
    AddItem {
        replica: u8,
        item: u8,
        fields: Vec<(u8, Val)>,
    },
    SetField {
        replica: u8,
        item: u8,
        field: u8,
        value: Val,
    },
    Move {
        replica: u8,
        item: u8,
        x: i16,
        y: i16,
        angle: i16,
    },
    DeleteItem {
        replica: u8,
        item: u8,
    },
    DeleteField {
        replica: u8,
        item: u8,
        field: u8,
    },
    /// Edits inside a nested shared type (array/map/text) held in a field, creating one if
    /// the field holds none.
    Nested {
        replica: u8,
        item: u8,
        field: u8,
        at: u8,
        value: Val,
        remove: bool,
    },
    /// One produced update to one endpoint, maybe twice.
    Deliver {
        update: u16,
        to: u8,
        twice: bool,
    },
    /// `merge_updates_v1` of consecutive produced updates, to one endpoint.
    DeliverMerged {
        first: u16,
        count: u8,
        to: u8,
    },
    /// The part of an update above a state vector cut at `cut/255` of each client's clock.
    DeliverSplit {
        update: u16,
        to: u8,
        cut: u8,
    },
    /// Cuts an endpoint off (or reconnects it): deliveries to and from it are lost.
    Partition {
        endpoint: u8,
    },
    /// State-vector sync between two connected endpoints, both ways.
    Sync {
        a: u8,
        b: u8,
    },
}

/// A field value: JSON-like `Any` values and nested shared types.
#[cfg_attr(not(test), derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone)]
pub enum Val {
    Null,
    Bool(bool),
    /// An integer; lib0 encodes integers beyond ±(2^31 − 1) as floats, so a replica's own
    /// view of a bigger one differs from everyone else's by design (see FUZZING.md).
    Int(i32),
    /// A coordinate, `n / 4`.
    Quarter(i16),
    Float(f64),
    Str(u8),
    List(Vec<Val>),
    Obj(Vec<(u8, Val)>),
    YMap(Vec<(u8, Val)>),
    YArray(Vec<Val>),
    YText(u8),
}

/// Deepest nesting a script value gets (deeper parts become `null`).
const MAX_DEPTH: usize = 4;

impl Val {
    fn to_any(&self, depth: usize) -> Any {
        if depth > MAX_DEPTH {
            return Any::Null;
        }
        match self {
            Val::Null => Any::Null,
            Val::Bool(b) => Any::Bool(*b),
            Val::Int(i) => Any::Number(Number::Int(i64::from(*i).max(-0x7FFF_FFFF))),
            Val::Quarter(q) => Any::Number(Number::Float(f64::from(*q) / 4.0)),
            Val::Float(f) => Any::Number(Number::Float(*f)),
            Val::Str(s) => Any::from(STRINGS[*s as usize % STRINGS.len()]),
            Val::List(items) | Val::YArray(items) => {
                Any::Array(items.iter().map(|v| v.to_any(depth + 1)).collect())
            }
            Val::Obj(fields) | Val::YMap(fields) => Any::Map(Arc::new(
                fields
                    .iter()
                    .map(|(k, v)| (key(*k).to_owned(), v.to_any(depth + 1)))
                    .collect(),
            )),
            Val::YText(t) => Any::from(TEXTS[*t as usize % TEXTS.len()]),
        }
    }
}

/// Writes `value` under `field` of `map`. Shared types are created empty and filled in order,
/// so which clock each write gets does not depend on `HashMap` order: inputs replay exactly.
fn put(txn: &mut TransactionMut, map: &MapRef, field: &str, value: &Val, depth: usize) {
    match value {
        Val::YMap(fields) if depth <= MAX_DEPTH => {
            let inner = map.insert(txn, field, MapPrelim::default());
            for (k, v) in fields {
                put(txn, &inner, key(*k), v, depth + 1);
            }
        }
        Val::YArray(items) if depth <= MAX_DEPTH => {
            let inner = map.insert(txn, field, ArrayPrelim::default());
            for (i, v) in items.iter().enumerate() {
                insert_at(txn, &inner, i as u32, v, depth + 1);
            }
        }
        Val::YText(t) => {
            map.insert(
                txn,
                field,
                TextPrelim::new(TEXTS[*t as usize % TEXTS.len()]),
            );
        }
        other => {
            map.insert(txn, field, other.to_any(depth));
        }
    }
}

/// Inserts `value` at `index` of `array`, like [`put`].
fn insert_at(txn: &mut TransactionMut, array: &ArrayRef, index: u32, value: &Val, depth: usize) {
    match value {
        Val::YMap(fields) if depth <= MAX_DEPTH => {
            let inner = array.insert(txn, index, MapPrelim::default());
            for (k, v) in fields {
                put(txn, &inner, key(*k), v, depth + 1);
            }
        }
        Val::YArray(items) if depth <= MAX_DEPTH => {
            let inner = array.insert(txn, index, ArrayPrelim::default());
            for (i, v) in items.iter().enumerate() {
                insert_at(txn, &inner, i as u32, v, depth + 1);
            }
        }
        Val::YText(t) => {
            array.insert(
                txn,
                index,
                TextPrelim::new(TEXTS[*t as usize % TEXTS.len()]),
            );
        }
        other => {
            array.insert(txn, index, other.to_any(depth));
        }
    }
}

fn key(k: u8) -> &'static str {
    FIELDS[k as usize % FIELDS.len()]
}

fn item_key(item: u8) -> String {
    format!("item-{}", item % 8)
}

fn item_map<T: ReadTxn>(txn: &T, items: &MapRef, key: &str) -> Option<MapRef> {
    match items.get(txn, key) {
        Some(Out::YMap(map)) => Some(map),
        _ => None,
    }
}

/// Byte offsets of the char boundaries of `s` (yrs documents use byte offsets by default).
fn boundaries(s: &str) -> Vec<u32> {
    let mut b: Vec<u32> = s.char_indices().map(|(i, _)| i as u32).collect();
    b.push(s.len() as u32);
    b
}

/// Edits a nested shared type held in `field` of `item`.
fn nested_edit(
    txn: &mut TransactionMut,
    item: &MapRef,
    field: &str,
    at: u8,
    value: &Val,
    remove: bool,
) {
    match item.get(txn, field) {
        Some(Out::YArray(array)) => {
            let len = array.len(txn);
            if remove && len > 0 {
                array.remove(txn, u32::from(at) % len);
            } else {
                insert_at(txn, &array, u32::from(at) % (len + 1), value, 1);
            }
        }
        Some(Out::YMap(map)) => {
            let k = key(at);
            if remove {
                map.remove(txn, k);
            } else {
                put(txn, &map, k, value, 1);
            }
        }
        Some(Out::YText(text)) => {
            let s = text.get_string(txn);
            let b = boundaries(&s);
            let i = usize::from(at) % b.len();
            if remove && i + 1 < b.len() {
                text.remove_range(txn, b[i], b[i + 1] - b[i]);
            } else {
                text.insert(txn, b[i], TEXTS[usize::from(at) % TEXTS.len()]);
            }
        }
        _ => {
            let array = item.insert(txn, field, ArrayPrelim::default());
            insert_at(txn, &array, 0, value, 1);
        }
    }
}

/// The replicas, the session and the updates in flight.
struct Net {
    replicas: Vec<GuardedDoc>,
    scene: Scene,
    user: Arc<str>,
    /// A plain yrs document that receives only what the session writes, in order, as a
    /// y-websocket client of this server does.
    observer: (Doc, MapRef),
    /// Every update produced, with the endpoint that produced it.
    log: Vec<(usize, Vec<u8>)>,
    cut: Vec<bool>,
}

impl Net {
    fn new(script: &MergeScript) -> Net {
        let n = 2 + usize::from(script.replicas % 4);
        let replicas = (0..n)
            .map(|i| GuardedDoc::with_client_id(u64::from(script.client_base) + i as u64 + 1))
            .collect();
        let observer = Doc::with_client_id(u64::from(script.client_base) + n as u64 + 1);
        let items = observer.get_or_insert_map("items");
        Net {
            replicas,
            scene: Scene::default(),
            user: Arc::from("yjs"),
            observer: (observer, items),
            log: Vec::new(),
            cut: vec![false; n + 1],
        }
    }

    fn session(&self) -> usize {
        self.replicas.len()
    }

    fn endpoints(&self) -> usize {
        self.replicas.len() + 1
    }

    /// Runs one local transaction on replica `r` and records its update.
    fn edit(&mut self, r: u8, f: impl FnOnce(&mut TransactionMut, &MapRef)) {
        let r = usize::from(r) % self.replicas.len();
        let doc = &mut self.replicas[r];
        let (_, change) = contained("GuardedDoc::transact", || doc.transact(f))
            .unwrap_or_else(|e| panic!("replica {r} could not edit: {e}"));
        if let Some(change) = change {
            if std::env::var_os("MERGE_TRACE").is_some() {
                eprintln!("edit by {r}: {}", hex(&change.update));
            }
            self.log.push((r, change.update));
        }
    }

    /// Delivers `bytes` to endpoint `to`. Replicas, like the session, apply what they receive
    /// through `GuardedDoc` (plain yrs mishandles blocks that arrive out of order: it panics,
    /// corrupts its state, or reads freed memory); every endpoint must accept every update.
    fn deliver(&mut self, to: usize, bytes: &[u8]) {
        if std::env::var_os("MERGE_TRACE").is_some() {
            eprintln!(
                "deliver to {to} (session = {}): {}",
                self.session(),
                hex(bytes)
            );
        }
        if to == self.session() {
            let (scene, user) = (&mut self.scene, &self.user);
            let effects = contained("Scene::apply_update", || {
                scene_apply_untrusted(scene, user, bytes)
            })
            .unwrap_or_else(|e| panic!("the session refused a valid update ({e}): {}", hex(bytes)));
            if let Some(update) = effects.update {
                self.observe(&update);
                self.log.push((to, update));
            }
            return;
        }
        let doc = &mut self.replicas[to];
        contained("GuardedDoc::apply_update", || apply_untrusted(doc, bytes)).unwrap_or_else(|e| {
            panic!("replica {to} refused a valid update ({e}): {}", hex(bytes))
        });
    }

    /// What the session wrote reaches the plain yrs observer, which must never fail on it.
    fn observe(&self, update: &[u8]) {
        let update = Update::decode_v1(update).expect("the session's update decodes");
        let doc = &self.observer.0;
        match quiet(|| doc.transact_mut().apply_update(update)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("a plain yrs peer refused what the session sent: {e}"),
            Err(message) => panic!("what the session sent crashed a plain yrs peer: {message}"),
        }
    }

    fn state_vector(&self, e: usize) -> Vec<u8> {
        if e == self.session() {
            self.scene.doc().state_vector_v1()
        } else {
            self.replicas[e].state_vector_v1()
        }
    }

    /// What endpoint `from` sends in answer to a SyncStep1 carrying `sv`.
    fn diff(&mut self, from: usize, sv: &[u8]) -> Vec<u8> {
        let doc = if from == self.session() {
            self.scene.doc_mut()
        } else {
            &mut self.replicas[from]
        };
        contained("GuardedDoc::encode_diff_v1", || diff_untrusted(doc, sv)).unwrap_or_else(|e| {
            panic!(
                "endpoint {from} could not answer SyncStep1 {}: {e}",
                hex(sv)
            )
        })
    }

    /// SyncStep1/SyncStep2 both ways between `a` and `b`.
    fn sync(&mut self, a: usize, b: usize) {
        for (from, to) in [(a, b), (b, a)] {
            let sv = self.state_vector(to);
            let diff = self.diff(from, &sv);
            if from == self.session() {
                self.observe(&diff);
            }
            self.deliver(to, &diff);
        }
    }

    fn step(&mut self, op: &MergeOp) {
        let e = self.endpoints();
        match op {
            MergeOp::AddItem {
                replica,
                item,
                fields,
            } => self.edit(*replica, |txn, items| {
                let map = items.insert(txn, item_key(*item), MapPrelim::default());
                for (k, v) in fields {
                    put(txn, &map, key(*k), v, 1);
                }
            }),
            MergeOp::SetField {
                replica,
                item,
                field,
                value,
            } => self.edit(*replica, |txn, items| {
                if let Some(map) = item_map(txn, items, &item_key(*item)) {
                    put(txn, &map, key(*field), value, 1);
                }
            }),
            MergeOp::Move {
                replica,
                item,
                x,
                y,
                angle,
            } => self.edit(*replica, |txn, items| {
                if let Some(map) = item_map(txn, items, &item_key(*item)) {
                    map.insert(txn, "x_mm", f64::from(*x) / 4.0);
                    map.insert(txn, "y_mm", f64::from(*y) / 4.0);
                    map.insert(txn, "angle_deg", f64::from(*angle % 360));
                }
            }),
            MergeOp::DeleteItem { replica, item } => self.edit(*replica, |txn, items| {
                items.remove(txn, &item_key(*item));
            }),
            MergeOp::DeleteField {
                replica,
                item,
                field,
            } => self.edit(*replica, |txn, items| {
                if let Some(map) = item_map(txn, items, &item_key(*item)) {
                    map.remove(txn, key(*field));
                }
            }),
            MergeOp::Nested {
                replica,
                item,
                field,
                at,
                value,
                remove,
            } => self.edit(*replica, |txn, items| {
                if let Some(map) = item_map(txn, items, &item_key(*item)) {
                    nested_edit(txn, &map, key(*field), *at, value, *remove);
                }
            }),
            MergeOp::Deliver { update, to, twice } => {
                let Some((from, bytes)) = self.pick(*update) else {
                    return;
                };
                let to = usize::from(*to) % e;
                if !self.cut[to] && !self.cut[from] {
                    self.deliver(to, &bytes);
                    if *twice {
                        self.deliver(to, &bytes);
                    }
                }
            }
            MergeOp::DeliverMerged { first, count, to } => {
                let to = usize::from(*to) % e;
                if self.log.is_empty() || self.cut[to] {
                    return;
                }
                let first = usize::from(*first) % self.log.len();
                let last = (first + 1 + usize::from(*count % 8)).min(self.log.len());
                let parts: Vec<&[u8]> = self.log[first..last]
                    .iter()
                    .filter(|(from, _)| !self.cut[*from])
                    .map(|(_, bytes)| bytes.as_slice())
                    .collect();
                let merged = yrs::merge_updates_v1(&parts).expect("produced updates merge");
                self.deliver(to, &merged);
            }
            MergeOp::DeliverSplit { update, to, cut } => {
                let Some((from, bytes)) = self.pick(*update) else {
                    return;
                };
                let to = usize::from(*to) % e;
                if self.cut[to] || self.cut[from] {
                    return;
                }
                let update = Update::decode_v1(&bytes).expect("a produced update decodes");
                let mut sv = StateVector::default();
                for (client, clock) in update.state_vector().iter() {
                    sv.set_max(*client, (u64::from(*clock) * u64::from(*cut) / 255) as u32);
                }
                let piece =
                    yrs::diff_updates_v1(&bytes, &sv.encode_v1()).expect("diff of an update");
                self.deliver(to, &piece); // a piece the harness cut
            }
            MergeOp::Partition { endpoint } => {
                let i = usize::from(*endpoint) % e;
                self.cut[i] = !self.cut[i];
            }
            MergeOp::Sync { a, b } => {
                let (a, b) = (usize::from(*a) % e, usize::from(*b) % e);
                if a != b && !self.cut[a] && !self.cut[b] {
                    self.sync(a, b);
                }
            }
        }
    }

    fn pick(&self, i: u16) -> Option<(usize, Vec<u8>)> {
        if self.log.is_empty() {
            return None;
        }
        Some(self.log[usize::from(i) % self.log.len()].clone())
    }

    fn finish(&mut self, finish: Finish) {
        self.cut.iter_mut().for_each(|c| *c = false);
        let session = self.session();
        match finish {
            Finish::ThroughSession => {
                for _ in 0..2 {
                    for r in 0..self.replicas.len() {
                        self.sync(r, session);
                    }
                }
            }
            Finish::RedeliverAll => {
                let all: Vec<(usize, Vec<u8>)> = self.log.clone();
                for to in 0..self.endpoints() {
                    for (_, bytes) in &all {
                        self.deliver(to, bytes);
                    }
                }
            }
            Finish::MergedOnce => {
                let all: Vec<&[u8]> = self.log.iter().map(|(_, b)| b.as_slice()).collect();
                let merged = yrs::merge_updates_v1(&all).expect("produced updates merge");
                for to in 0..self.endpoints() {
                    self.deliver(to, &merged);
                }
            }
        }
        // The observer catches up the way a reconnecting y-websocket client does.
        let sv = self.observer.0.transact().state_vector().encode_v1();
        let diff = self.diff(session, &sv);
        self.observe(&diff);
    }

    /// The reference: a fresh yrs document applying every update the replicas produced, in
    /// the order they produced them (so never out of order).
    fn truth(
        &self,
    ) -> (
        StateVector,
        std::collections::BTreeMap<String, serde_json::Value>,
    ) {
        let doc = Doc::new();
        let items = doc.get_or_insert_map("items");
        for (from, bytes) in &self.log {
            if *from != self.session() {
                let update = Update::decode_v1(bytes).expect("a produced update decodes");
                doc.transact_mut()
                    .apply_update(update)
                    .expect("the reference applies it");
            }
        }
        let txn = doc.transact();
        (txn.state_vector(), items_json(&txn, &items))
    }

    fn check(&mut self) {
        let session_sv = StateVector::decode_v1(&self.scene.doc().state_vector_v1()).unwrap();
        let doc = doc_json(&mut self.scene);
        let mirror = mirror_json(&mut self.scene);
        assert_eq!(
            mirror,
            desktop_view(&doc),
            "the scene's mirror differs from its document"
        );
        let (truth_sv, truth) = self.truth();
        assert_eq!(session_sv, truth_sv, "the session's state vector");
        assert_eq!(doc, truth, "the session's scene");
        for (i, replica) in self.replicas.iter_mut().enumerate() {
            let sv = StateVector::decode_v1(&replica.state_vector_v1()).unwrap();
            assert_eq!(sv, session_sv, "replica {i}'s state vector");
            let scene = replica.read(|txn, items| items_json(txn, items)).unwrap();
            assert_eq!(scene, doc, "replica {i}'s scene");
        }
        let (observer, items) = &self.observer;
        let txn = observer.transact();
        assert_eq!(
            txn.state_vector(),
            session_sv,
            "the observer's state vector"
        );
        assert_eq!(items_json(&txn, items), doc, "the observer's scene");
    }
}

/// Runs a script and asserts convergence.
pub fn run(script: &MergeScript) {
    let mut net = Net::new(script);
    for op in &script.ops {
        net.step(op);
    }
    net.finish(script.finish);
    net.check();
}
