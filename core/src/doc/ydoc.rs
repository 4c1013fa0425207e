//! The session's Yjs document behind a guard.
//!
//! yrs trusts its input: crafted updates of a few dozen bytes make it panic inside
//! `apply_update` (or later, inside every encode of the document) and a huge leading count
//! makes it allocate half a gigabyte. Every entry point here therefore (1) walks untrusted
//! bytes with [`guard`](super::guard) before yrs decodes them, (2) runs yrs under
//! `catch_unwind`, and (3) after a panic throws the document away and rebuilds it from its
//! last good state, so a poisoned document is never kept.
//!
//! The last good state is `base` (an encoded snapshot) plus `log` (every update the document
//! accepted since). The log is folded into a new base once it outgrows the base, so keeping
//! it costs at most about twice the document's encoded size.

use std::borrow::Cow;
use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use yrs::types::{Event, PathSegment};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{
    DeepObservable, Doc, MapRef, ReadTxn, StateVector, Transact, TransactionMut, Update, WriteTxn,
};

use super::guard::{self, CheckedStateVector, CheckedUpdate, GuardError};
use super::order;

/// Name of the root map holding the scene's items (PROTOCOL §2).
pub const ITEMS: &str = "items";

/// The log is folded into the base once it is larger than this and larger than the base.
const MIN_LOG_BYTES_BEFORE_FOLD: usize = 256 * 1024;

/// Bound on the blocks held back for a gap; beyond it they are let go, and peers resend them
/// when they next sync (every y-websocket reconnect does). Every update is merged with what is
/// held, so the bound also caps what a client can make each later update cost; a sound peer's
/// pending blocks are far smaller.
const MAX_HELD_BYTES: usize = 1024 * 1024;

/// Why the document refused some bytes or an operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DocError {
    /// The bytes failed the structural pre-check; yrs never saw them.
    Rejected(GuardError),
    /// yrs decoded or applied the bytes and reported an error.
    Malformed(String),
    /// yrs panicked; the document was rebuilt from its last good state.
    Panicked,
}

impl std::fmt::Display for DocError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DocError::Rejected(e) => write!(f, "invalid Yjs bytes: {e}"),
            DocError::Malformed(e) => write!(f, "invalid Yjs update: {e}"),
            DocError::Panicked => f.write_str("the Yjs update could not be applied"),
        }
    }
}

impl std::error::Error for DocError {}

impl From<GuardError> for DocError {
    fn from(e: GuardError) -> Self {
        DocError::Rejected(e)
    }
}

/// What one transaction changed: its v1 update and the uuids of the items it touched.
#[derive(Debug, Default)]
pub struct Change {
    pub update: Vec<u8>,
    pub touched: Vec<Arc<str>>,
}

/// A yrs document with the root map `items`, guarded against untrusted input.
pub struct GuardedDoc {
    doc: Doc,
    items: MapRef,
    touched: Arc<Mutex<HashSet<Arc<str>>>>,
    base: Vec<u8>,
    log: Vec<Vec<u8>>,
    log_bytes: usize,
    rebuilds: u64,
    /// Blocks that wait for a gap in their client's clocks to be filled (see
    /// [`order`](super::order)), as one v1 update.
    held: Option<Vec<u8>>,
    dropped_held: u64,
}

impl Default for GuardedDoc {
    fn default() -> Self {
        Self::new()
    }
}

impl GuardedDoc {
    pub fn new() -> Self {
        Self::from_parts(fresh_doc())
    }

    /// A document whose own edits carry the client id `id` (a rebuild gives it a fresh one).
    /// The fuzz targets use it to model peers with ids of every width.
    pub fn with_client_id(id: u64) -> Self {
        Self::from_parts(observed(Doc::with_client_id(id)))
    }

    fn from_parts((doc, items, touched): DocParts) -> Self {
        GuardedDoc {
            doc,
            items,
            touched,
            base: Vec::new(),
            log: Vec::new(),
            log_bytes: 0,
            rebuilds: 0,
            held: None,
            dropped_held: 0,
        }
    }

    /// Builds a document from stored updates (a snapshot and/or a log), checked like any
    /// untrusted input. They are applied in one transaction before the change observer is
    /// attached: loading reports no changes, and that keeps a 10,000-item load cheap.
    pub fn from_updates(updates: &[CheckedUpdate]) -> Result<Self, DocError> {
        let built = catch_unwind(|| {
            let doc = Doc::new();
            apply_all(&doc, updates.iter().map(CheckedUpdate::bytes)).map(|()| doc)
        });
        let mut doc = Self::from_parts(observed(built.map_err(|_| DocError::Panicked)??));
        doc.fold_log()?;
        Ok(doc)
    }

    /// How many times a panic forced a rebuild (exposed for metrics and tests).
    pub fn rebuilds(&self) -> u64 {
        self.rebuilds
    }

    /// Bytes of blocks waiting for a gap to be filled.
    pub fn held_bytes(&self) -> usize {
        self.held.as_ref().map_or(0, Vec::len)
    }

    /// How many times the held blocks outgrew their bound and were let go.
    pub fn dropped_held(&self) -> u64 {
        self.dropped_held
    }

    /// Applies a checked v1 update. `Ok(None)` when it changed nothing (a duplicate, or
    /// blocks held until what they follow arrives: see [`order`](super::order)).
    pub fn apply_update(&mut self, update: &CheckedUpdate) -> Result<Option<Change>, DocError> {
        let held = self.held.take();
        match self.apply_with_held(update, held.as_deref()) {
            Ok((change, still_held)) => {
                self.held = still_held.filter(|h| {
                    // Peers resend what the document lacks whenever they sync.
                    let keep = h.len() <= MAX_HELD_BYTES;
                    self.dropped_held += u64::from(!keep);
                    keep
                });
                Ok(change)
            }
            Err(e) => {
                self.held = held;
                Err(e)
            }
        }
    }

    /// [`apply_update`](Self::apply_update) with the blocks held so far; also returns what is
    /// held afterwards.
    fn apply_with_held(
        &mut self,
        update: &CheckedUpdate,
        held: Option<&[u8]>,
    ) -> Result<(Option<Change>, Option<Vec<u8>>), DocError> {
        let decodes =
            |bytes: &[u8]| Update::decode_v1(bytes).map_err(|e| DocError::Malformed(e.to_string()));
        let bytes = update.bytes();
        let (merged, layout) = match held {
            None => (Cow::Borrowed(bytes), Cow::Borrowed(update.layout())),
            Some(held) => {
                // Bad bytes are refused before they are merged with the held ones.
                decodes(bytes)?;
                // yrs's own encoding of the merge: its layout is read again.
                let merged = merge_v1(held, bytes)?;
                let layout = guard::layout_update_v1(&merged)?;
                (Cow::Owned(merged), Cow::Owned(layout))
            }
        };
        let sv = self.doc.transact().state_vector();
        let split = order::split(&merged, &layout, &sv);
        if held.is_none() && (split.held.is_some() || matches!(split.ready, Cow::Owned(_))) {
            // Only part of the bytes is applied now: all of them must decode, so that nothing
            // yrs refuses is held.
            decodes(bytes)?;
        }
        let update = decodes(&split.ready)?;
        let (result, change) = self.transact(move |txn, _| {
            let result = txn.apply_update(update);
            // What yrs could not integrate (blocks or deletions whose dependencies are
            // missing) joins the held blocks rather than stay in yrs, whose encodings would
            // carry it behind skips.
            (
                result,
                txn.prune_pending().map(|pending| pending.encode_v1()),
            )
        })?;
        match result {
            (Ok(()), pending) => {
                let still_held = match (split.held, pending) {
                    (None, None) => None,
                    (Some(held), None) | (None, Some(held)) => Some(held),
                    // The change is applied: nothing may fail from here on.
                    (Some(held), Some(pending)) => match merge_v1(&held, &pending) {
                        Ok(merged) => Some(merged),
                        Err(_) => {
                            self.dropped_held += 1;
                            Some(held)
                        }
                    },
                };
                Ok((change, still_held))
            }
            (Err(e), _) => {
                // yrs may integrate part of an update before it finds the error: take the
                // part back out, so a rejected update changes nothing.
                if change.is_some() {
                    self.log.pop().inspect(|u| self.log_bytes -= u.len());
                    self.rebuild();
                }
                Err(DocError::Malformed(e.to_string()))
            }
        }
    }

    /// Runs `f` in one transaction. A panic inside yrs rebuilds the document and reports
    /// [`DocError::Panicked`]; the caller's change is then not applied.
    pub fn transact<R>(
        &mut self,
        f: impl FnOnce(&mut TransactionMut, &MapRef) -> R,
    ) -> Result<(R, Option<Change>), DocError> {
        // Folding happens before a transaction, not after: a caller may still take the last
        // entry back out (see `apply_update`).
        self.fold_log_if_large()?;
        let doc = &self.doc;
        let items = &self.items;
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let mut txn = doc.transact_mut();
            let result = f(&mut txn, items);
            txn.commit();
            let update = if txn.before_state() == txn.after_state() && txn.delete_set().is_empty() {
                Vec::new()
            } else {
                // yrs's encoder starts at 1 KiB; the update is kept (log, store queue).
                let mut update = txn.encode_update_v1();
                update.shrink_to_fit();
                update
            };
            (result, update)
        }));
        let touched: Vec<Arc<str>> = {
            let mut set = self.touched.lock().unwrap_or_else(|p| p.into_inner());
            set.drain().collect()
        };
        match outcome {
            Ok((result, update)) => {
                if update.is_empty() {
                    return Ok((result, None));
                }
                self.log_bytes += update.len();
                self.log.push(update.clone());
                Ok((result, Some(Change { update, touched })))
            }
            Err(_) => {
                self.rebuild();
                Err(DocError::Panicked)
            }
        }
    }

    /// Reads the document. Should yrs panic reading it (a document poisoned by a crafted
    /// update), the document is rebuilt and read once more.
    pub fn read<R>(&mut self, f: impl Fn(&yrs::Transaction, &MapRef) -> R) -> Result<R, DocError> {
        for _ in 0..2 {
            let (doc, items) = (&self.doc, &self.items);
            match catch_unwind(AssertUnwindSafe(|| f(&doc.transact(), items))) {
                Ok(result) => return Ok(result),
                Err(_) => self.rebuild(),
            }
        }
        Err(DocError::Panicked)
    }

    /// The document's v1 state vector.
    pub fn state_vector_v1(&self) -> Vec<u8> {
        self.doc.transact().state_vector().encode_v1()
    }

    /// The document's state vector, to encode later what was added since
    /// ([`GuardedDoc::encode_since`]).
    pub fn state_vector(&self) -> StateVector {
        self.doc.transact().state_vector()
    }

    /// What was added since the document had the state vector `sv` (one it produced with
    /// [`GuardedDoc::state_vector`]: no untrusted bytes), as one v1 update.
    pub fn encode_since(&mut self, sv: &StateVector) -> Result<Vec<u8>, DocError> {
        self.encode_diff(sv)
    }

    /// The whole document as one v1 update.
    pub fn encode_state_v1(&mut self) -> Result<Vec<u8>, DocError> {
        self.encode_diff(&StateVector::default())
    }

    /// What a peer with the state vector `sv` lacks, as one v1 update.
    pub fn encode_diff_v1(&mut self, sv: &CheckedStateVector) -> Result<Vec<u8>, DocError> {
        let sv =
            StateVector::decode_v1(sv.bytes()).map_err(|e| DocError::Malformed(e.to_string()))?;
        self.encode_diff(&sv)
    }

    fn encode_diff(&mut self, sv: &StateVector) -> Result<Vec<u8>, DocError> {
        let doc = &self.doc;
        match catch_unwind(AssertUnwindSafe(|| {
            doc.transact().encode_state_as_update_v1(sv)
        })) {
            Ok(bytes) => Ok(bytes),
            Err(_) => {
                self.rebuild();
                Err(DocError::Panicked)
            }
        }
    }

    fn fold_log_if_large(&mut self) -> Result<(), DocError> {
        if self.log_bytes > MIN_LOG_BYTES_BEFORE_FOLD.max(self.base.len()) {
            self.fold_log()?;
        }
        Ok(())
    }

    fn fold_log(&mut self) -> Result<(), DocError> {
        self.base = self.encode_state_v1()?;
        self.base.shrink_to_fit();
        self.log.clear();
        self.log_bytes = 0;
        Ok(())
    }

    /// Replaces the document with `base` + `log`, leaving out every entry that makes yrs panic
    /// while applying it or while encoding the result.
    fn rebuild(&mut self) {
        self.rebuilds += 1;
        let entries = std::mem::take(&mut self.log);
        let mut kept: Vec<Vec<u8>> = Vec::with_capacity(entries.len());
        for entry in entries {
            kept.push(entry);
            if build_doc(&self.base, &kept).is_none() {
                kept.pop();
            }
        }
        let (doc, items, touched) = build_doc(&self.base, &kept)
            .or_else(|| build_doc(&self.base, &[]))
            .unwrap_or_else(fresh_doc);
        self.doc = doc;
        self.items = items;
        self.touched = touched;
        self.log_bytes = kept.iter().map(Vec::len).sum();
        self.log = kept;
    }
}

type DocParts = (Doc, MapRef, Arc<Mutex<HashSet<Arc<str>>>>);

fn fresh_doc() -> DocParts {
    observed(Doc::new())
}

/// Attaches the observer that records which items each transaction touched.
fn observed(doc: Doc) -> DocParts {
    let items = doc.get_or_insert_map(ITEMS);
    let touched: Arc<Mutex<HashSet<Arc<str>>>> = Arc::default();
    let sink = touched.clone();
    items.observe_deep("touched-items", move |txn, events| {
        let mut set = sink.lock().unwrap_or_else(|p| p.into_inner());
        for event in events.iter() {
            match event.path().front() {
                Some(PathSegment::Key(uuid)) => {
                    set.insert(uuid.clone());
                }
                Some(PathSegment::Index(_)) => {}
                None => {
                    if let Event::Map(map_event) = event {
                        set.extend(map_event.keys(txn).keys().cloned());
                    }
                }
            }
        }
    });
    (doc, items, touched)
}

/// Applies updates to `doc` in one transaction.
fn apply_all<'a>(doc: &Doc, updates: impl Iterator<Item = &'a [u8]>) -> Result<(), DocError> {
    let mut txn = doc.transact_mut();
    for bytes in updates.filter(|b| !b.is_empty()) {
        let update = Update::decode_v1(bytes).map_err(|e| DocError::Malformed(e.to_string()))?;
        txn.apply_update(update)
            .map_err(|e| DocError::Malformed(e.to_string()))?;
    }
    Ok(())
}

/// Two v1 updates merged into one. yrs merges under `catch_unwind` like every other call on
/// bytes a client wrote.
fn merge_v1(a: &[u8], b: &[u8]) -> Result<Vec<u8>, DocError> {
    catch_unwind(|| yrs::merge_updates_v1([a, b]))
        .map_err(|_| DocError::Panicked)?
        .map_err(|e| DocError::Malformed(e.to_string()))
}

/// A document from trusted parts, or `None` when yrs panics applying or encoding them.
fn build_doc(base: &[u8], log: &[Vec<u8>]) -> Option<DocParts> {
    catch_unwind(|| {
        let doc = Doc::new();
        apply_all(
            &doc,
            std::iter::once(base).chain(log.iter().map(Vec::as_slice)),
        )
        .ok()?;
        doc.transact()
            .encode_state_as_update_v1(&StateVector::default());
        Some(observed(doc))
    })
    .ok()
    .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use yrs::{Any, Map, MapPrelim};

    /// Checks `bytes` and applies them: the path every untrusted update takes.
    fn apply(doc: &mut GuardedDoc, bytes: &[u8]) -> Result<Option<Change>, DocError> {
        doc.apply_update(&CheckedUpdate::check(bytes.to_vec())?)
    }

    fn checked(bytes: Vec<u8>) -> CheckedUpdate {
        CheckedUpdate::check(bytes).expect("a valid update")
    }

    fn peer_update(f: impl FnOnce(&mut TransactionMut, &MapRef)) -> Vec<u8> {
        let doc = Doc::new();
        let items = doc.get_or_insert_map(ITEMS);
        let mut txn = doc.transact_mut();
        f(&mut txn, &items);
        txn.encode_update_v1()
    }

    #[test]
    fn reports_touched_items_for_new_items_and_nested_fields() {
        let mut doc = GuardedDoc::new();
        let (_, change) = doc
            .transact(|txn, items| {
                items.insert(txn, "a", MapPrelim::from([("x_mm", Any::from(1.0))]));
            })
            .unwrap();
        assert_eq!(change.unwrap().touched, vec![Arc::<str>::from("a")]);
        let (_, change) = doc
            .transact(|txn, items| {
                if let Some(yrs::Out::YMap(item)) = items.get(txn, "a") {
                    item.insert(txn, "y_mm", 2.0);
                }
            })
            .unwrap();
        assert_eq!(change.unwrap().touched, vec![Arc::<str>::from("a")]);
        let (_, change) = doc.transact(|_, _| ()).unwrap();
        assert!(change.is_none(), "an empty transaction reports no change");
    }

    #[test]
    fn applies_a_peer_update_and_reencodes_it() {
        let update = peer_update(|txn, items| {
            items.insert(txn, "u1", MapPrelim::from([("name", Any::from("L1"))]));
        });
        let mut doc = GuardedDoc::new();
        let change = apply(&mut doc, &update).unwrap().unwrap();
        assert_eq!(change.touched, vec![Arc::<str>::from("u1")]);
        assert!(
            apply(&mut doc, &update).unwrap().is_none(),
            "a duplicate changes nothing"
        );
        let copy = GuardedDoc::from_updates(&[checked(doc.encode_state_v1().unwrap())]).unwrap();
        assert_eq!(copy.state_vector_v1(), doc.state_vector_v1());
    }

    #[test]
    fn rejects_garbage_and_keeps_the_document() {
        let mut doc = GuardedDoc::new();
        doc.transact(|txn, items| {
            items.insert(txn, "a", MapPrelim::from([("x_mm", Any::from(1.0))]));
        })
        .unwrap();
        let before = doc.encode_state_v1().unwrap();
        for bad in [&[0xff, 0xff, 0xff, 0x0f][..], &[1, 2, 3], &[0, 0, 1]] {
            assert!(apply(&mut doc, bad).is_err());
        }
        assert!(CheckedStateVector::check(vec![0xff, 0xff, 0xff, 0xff, 0x0f, 0, 0, 0]).is_err());
        assert_eq!(doc.encode_state_v1().unwrap(), before);
    }

    #[test]
    fn out_of_order_updates_wait_for_what_they_follow() {
        let peer = Doc::with_client_id(9);
        let items = peer.get_or_insert_map(ITEMS);
        let edits: Vec<Vec<u8>> = (0..3)
            .map(|i| {
                let mut txn = peer.transact_mut();
                items.insert(&mut txn, format!("k{i}"), i as f64);
                txn.encode_update_v1()
            })
            .collect();
        let mut doc = GuardedDoc::new();
        assert!(apply(&mut doc, &edits[2]).unwrap().is_none());
        assert!(apply(&mut doc, &edits[1]).unwrap().is_none());
        assert!(doc.held_bytes() > 0);
        let before = doc.encode_state_v1().unwrap();
        for bad in [&[0xff, 0xff, 0xff, 0x0f][..], &[1, 1, 9, 0, 4, 1]] {
            assert!(apply(&mut doc, bad).is_err());
        }
        assert_eq!(
            doc.encode_state_v1().unwrap(),
            before,
            "refused bytes change nothing"
        );
        let change = apply(&mut doc, &edits[0]).unwrap().expect("a change");
        assert_eq!(
            change.touched.len(),
            3,
            "the held edits are applied with the missing one"
        );
        assert_eq!(doc.held_bytes(), 0);
        assert_eq!(
            StateVector::decode_v1(&doc.state_vector_v1()).unwrap(),
            peer.transact().state_vector()
        );
    }

    #[test]
    fn rebuild_keeps_every_accepted_change() {
        let mut doc = GuardedDoc::new();
        for i in 0..20 {
            doc.transact(|txn, items| {
                items.insert(
                    txn,
                    format!("item-{i}"),
                    MapPrelim::from([("i", Any::from(i as f64))]),
                );
            })
            .unwrap();
        }
        let before = doc.encode_state_v1().unwrap();
        doc.rebuild();
        assert_eq!(doc.encode_state_v1().unwrap(), before);
        assert_eq!(doc.read(|txn, items| items.len(txn)).unwrap(), 20);
    }
}
