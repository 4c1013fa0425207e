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

use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use yrs::types::{Event, PathSegment};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{DeepObservable, Doc, MapRef, ReadTxn, StateVector, Transact, TransactionMut, Update};

use super::guard::{self, GuardError};

/// Name of the root map holding the scene's items (PROTOCOL §2).
pub const ITEMS: &str = "items";

/// The log is folded into the base once it is larger than this and larger than the base.
const MIN_LOG_BYTES_BEFORE_FOLD: usize = 256 * 1024;

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

    fn from_parts((doc, items, touched): DocParts) -> Self {
        GuardedDoc {
            doc,
            items,
            touched,
            base: Vec::new(),
            log: Vec::new(),
            log_bytes: 0,
            rebuilds: 0,
        }
    }

    /// Builds a document from stored updates (a snapshot and/or a log), checked like any
    /// untrusted input. They are applied in one transaction before the change observer is
    /// attached: loading reports no changes, and that keeps a 10,000-item load cheap.
    pub fn from_updates<'a>(updates: impl IntoIterator<Item = &'a [u8]>) -> Result<Self, DocError> {
        let updates: Vec<&[u8]> = updates.into_iter().filter(|u| !u.is_empty()).collect();
        for update in &updates {
            guard::check_update_v1(update)?;
        }
        let built = catch_unwind(|| {
            let doc = Doc::new();
            apply_all(&doc, updates.iter().copied()).map(|()| doc)
        });
        let mut doc = Self::from_parts(observed(built.map_err(|_| DocError::Panicked)??));
        doc.fold_log()?;
        Ok(doc)
    }

    /// How many times a panic forced a rebuild (exposed for metrics and tests).
    pub fn rebuilds(&self) -> u64 {
        self.rebuilds
    }

    /// Applies an untrusted v1 update. `Ok(None)` when it changed nothing.
    pub fn apply_update(&mut self, bytes: &[u8]) -> Result<Option<Change>, DocError> {
        guard::check_update_v1(bytes)?;
        let update = Update::decode_v1(bytes).map_err(|e| DocError::Malformed(e.to_string()))?;
        let (result, change) = match self.transact(move |txn, _| txn.apply_update(update)) {
            // yrs 0.28.1 panics integrating some valid updates (merged ones whose skip ranges
            // overlap what the document already holds). The document was rebuilt; retry once
            // with only what it lacks.
            Err(DocError::Panicked) => {
                let sv = self.state_vector_v1();
                let missing = catch_unwind(|| yrs::diff_updates_v1(bytes, &sv))
                    .map_err(|_| DocError::Panicked)?
                    .map_err(|e| DocError::Malformed(e.to_string()))?;
                guard::check_update_v1(&missing)?;
                let update =
                    Update::decode_v1(&missing).map_err(|e| DocError::Malformed(e.to_string()))?;
                self.transact(move |txn, _| txn.apply_update(update))?
            }
            other => other?,
        };
        match result {
            Ok(()) => Ok(change),
            Err(e) => {
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
                txn.encode_update_v1()
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

    /// The whole document as one v1 update.
    pub fn encode_state_v1(&mut self) -> Result<Vec<u8>, DocError> {
        self.encode_diff(&StateVector::default())
    }

    /// What a peer with the (untrusted) v1 state vector `sv` lacks, as one v1 update.
    pub fn encode_diff_v1(&mut self, sv: &[u8]) -> Result<Vec<u8>, DocError> {
        guard::check_state_vector_v1(sv)?;
        let sv = StateVector::decode_v1(sv).map_err(|e| DocError::Malformed(e.to_string()))?;
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
        let change = doc.apply_update(&update).unwrap().unwrap();
        assert_eq!(change.touched, vec![Arc::<str>::from("u1")]);
        assert!(
            doc.apply_update(&update).unwrap().is_none(),
            "a duplicate changes nothing"
        );
        let copy = GuardedDoc::from_updates([doc.encode_state_v1().unwrap().as_slice()]).unwrap();
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
            assert!(doc.apply_update(bad).is_err());
        }
        assert!(doc
            .encode_diff_v1(&[0xff, 0xff, 0xff, 0xff, 0x0f, 0, 0, 0])
            .is_err());
        assert_eq!(doc.encode_state_v1().unwrap(), before);
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
