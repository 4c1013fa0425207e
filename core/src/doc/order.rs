//! Giving yrs only blocks that continue what the document holds.
//!
//! yrs 0.28.1 integrates a block that arrives ahead of its client's earlier blocks (when it
//! has no other missing dependency) behind a placeholder for the gap, and stores the skip
//! blocks of an update (Yjs ≥ 13.5 and yrs write them for a peer's pending structs) the same
//! way. When a block spanning such a placeholder arrives later, yrs computes
//! `placeholder.end - block.end` in u32: a panic in debug builds, a gap of four billion clocks
//! in release, and a document whose encoding no longer loads. Its encodings also carry those
//! pending structs behind skips, which crash yrs peers.
//!
//! So the document is only ever given, per client, the blocks that continue the clocks it
//! already holds; blocks behind a gap wait (as Yjs keeps its pending structs) and are retried,
//! merged with the next update, until the gap is filled.

use std::borrow::Cow;

use yrs::encoding::write::Write;
use yrs::{ClientID, StateVector};

use super::guard::{BlockSpan, UpdateLayout};

/// An update cut in two by what a document holds.
#[derive(Debug, PartialEq, Eq)]
pub struct Split<'a> {
    /// Blocks that continue the document's clocks, and the whole delete set.
    pub ready: Cow<'a, [u8]>,
    /// Blocks behind a gap, as a v1 update; `None` when there are none.
    pub held: Option<Vec<u8>>,
}

/// Splits the checked v1 update `bytes` (laid out as `layout`) against the state vector `sv`
/// of the document it is for. Blocks the document already holds entirely are left out.
pub fn split<'a>(bytes: &'a [u8], layout: &UpdateLayout, sv: &StateVector) -> Split<'a> {
    let mut ready: Vec<(u64, &[BlockSpan])> = Vec::new();
    let mut held: Vec<(u64, &[BlockSpan])> = Vec::new();
    let mut changed = false;
    for (client, spans) in &layout.clients {
        let (now, later) = cut(spans, sv.get(&ClientID::new(*client)));
        changed |= now.len() != spans.len();
        if !now.is_empty() {
            ready.push((*client, now));
        }
        if !later.is_empty() {
            held.push((*client, later));
        }
    }
    let ready = if changed {
        Cow::Owned(encode(bytes, &ready, &bytes[layout.delete_set.clone()]))
    } else {
        Cow::Borrowed(bytes)
    };
    let held = (!held.is_empty()).then(|| encode(bytes, &held, &[0]));
    Split { ready, held }
}

/// One client's blocks: those that continue clock `have`, then those behind a gap (starting
/// at a real block, never at a skip).
fn cut(spans: &[BlockSpan], mut have: u32) -> (&[BlockSpan], &[BlockSpan]) {
    let mut first = None;
    for (i, span) in spans.iter().enumerate() {
        if first.is_none() && span.end() <= have {
            continue; // held already
        }
        if span.skip || span.clock > have {
            let later = spans[i..]
                .iter()
                .position(|s| !s.skip)
                .map_or(&[][..], |j| &spans[i + j..]);
            let now = first.map_or(&[][..], |f| &spans[f..i]);
            return (now, later);
        }
        first.get_or_insert(i);
        have = span.end();
    }
    (first.map_or(&[][..], |f| &spans[f..]), &[])
}

/// A v1 update made of the given runs of blocks (copied from `bytes`) and a delete set.
fn encode(bytes: &[u8], clients: &[(u64, &[BlockSpan])], delete_set: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    out.write_var(clients.len() as u64);
    for (client, spans) in clients {
        out.write_var(spans.len() as u64);
        out.write_var(*client);
        out.write_var(spans[0].clock);
        for span in *spans {
            out.write_all(&bytes[span.bytes.clone()]);
        }
    }
    out.write_all(delete_set);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doc::guard::layout_update_v1;
    use yrs::updates::decoder::Decode;
    use yrs::{Doc, Map, ReadTxn, Transact, Update};

    /// Three single-block updates of client 1 (clocks 0, 1, 2), each setting a key of `items`.
    fn three_edits() -> Vec<Vec<u8>> {
        let doc = Doc::with_client_id(1);
        let items = doc.get_or_insert_map("items");
        (0..3)
            .map(|i| {
                let mut txn = doc.transact_mut();
                items.insert(&mut txn, format!("k{i}"), i as f64);
                txn.encode_update_v1()
            })
            .collect()
    }

    fn apply(doc: &Doc, update: &[u8]) {
        doc.transact_mut()
            .apply_update(Update::decode_v1(update).unwrap())
            .unwrap();
    }

    fn sv_of(doc: &Doc) -> StateVector {
        doc.transact().state_vector()
    }

    fn split_for(bytes: &[u8], sv: &StateVector) -> Split<'static> {
        let layout = layout_update_v1(bytes).unwrap();
        let s = split(bytes, &layout, sv);
        Split {
            ready: Cow::Owned(s.ready.into_owned()),
            held: s.held,
        }
    }

    #[test]
    fn an_update_that_continues_the_document_passes_unchanged() {
        let edits = three_edits();
        let s = split_for(&edits[0], &StateVector::default());
        assert_eq!(&*s.ready, edits[0].as_slice());
        assert_eq!(s.held, None);
    }

    #[test]
    fn blocks_behind_a_gap_are_held_until_it_is_filled() {
        let edits = three_edits();
        let doc = Doc::new();
        // Clocks 1..3 merged behind a skip of clock 0: nothing is ready, both blocks wait.
        let late = yrs::merge_updates_v1([&edits[1], &edits[2]]).unwrap();
        let s = split_for(&late, &sv_of(&doc));
        let held = s.held.expect("held");
        assert_eq!(
            Update::decode_v1(&held)
                .unwrap()
                .state_vector_lower()
                .get(&ClientID::new(1)),
            1
        );
        let ready = Update::decode_v1(&s.ready).unwrap();
        assert!(ready.state_vector().is_empty());
        // With clock 0 merged in, everything is ready.
        let all = yrs::merge_updates_v1([held.as_slice(), &edits[0]]).unwrap();
        let s = split_for(&all, &sv_of(&doc));
        assert_eq!(s.held, None);
        apply(&doc, &s.ready);
        assert_eq!(sv_of(&doc).get(&ClientID::new(1)), 3);
    }

    #[test]
    fn a_skip_over_clocks_the_document_holds_is_passed_over() {
        let edits = three_edits();
        let doc = Doc::new();
        for edit in &edits[..2] {
            apply(&doc, edit);
        }
        // clock 0, a skip over clock 1 (held by the document), clock 2.
        let gappy = yrs::merge_updates_v1([&edits[0], &edits[2]]).unwrap();
        let s = split_for(&gappy, &sv_of(&doc));
        assert_eq!(s.held, None);
        apply(&doc, &s.ready);
        assert_eq!(sv_of(&doc).get(&ClientID::new(1)), 3);
        assert_eq!(doc.get_or_insert_map("items").len(&doc.transact()), 3);
    }
}
