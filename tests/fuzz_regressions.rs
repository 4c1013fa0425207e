//! Inputs the fuzz targets (`fuzz/`, see FUZZING.md) found, replayed on stable. Each one is
//! kept under `tests/fuzz_regressions/TARGET-NAME.hex` (one hex string) and checked for the
//! property the target asserts.

use std::sync::Arc;

use optiverse_collab::doc::{DocError, GuardedDoc, Scene};
use yrs::updates::decoder::Decode;
use yrs::Update;

fn input(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/tests/fuzz_regressions/{name}.hex",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let text: String = text.split_whitespace().collect();
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex"))
        .collect()
}

/// After accepting an update, the document's own encoding must load again (it is what the
/// store keeps, what `GuardedDoc::from_updates` reads back and what SyncStep2 sends).
fn assert_encoding_reloads(doc: &mut GuardedDoc) {
    let encoded = doc.encode_state_v1().expect("the document encodes");
    Update::decode_v1(&encoded).expect("the document's encoding decodes");
    let copy = GuardedDoc::from_updates([encoded.as_slice()]).expect("the encoding loads");
    assert_eq!(copy.state_vector_v1(), doc.state_vector_v1());
}

/// untrusted_update: a 13-byte update with JSON content (content ref 2). yrs 0.28.1 reads
/// `len + 1` strings for JSON content but writes `len`, so a document holding such content
/// encodes to bytes that do not decode: the session's stored state no longer loads.
#[test]
fn json_content_does_not_poison_the_stored_state() {
    let update = input("untrusted_update-json-content");
    let mut doc = GuardedDoc::new();
    match doc.apply_update(&update) {
        Ok(_) => assert_encoding_reloads(&mut doc),
        Err(DocError::Rejected(_)) => {}
        Err(other) => panic!("unexpected error {other}"),
    }
    // The same through a scene: what it would persist must load.
    let mut scene = Scene::default();
    if let Ok(effects) = scene.apply_update(&Arc::from("yjs"), &update) {
        if let Some(persisted) = effects.update {
            GuardedDoc::from_updates([persisted.as_slice()]).expect("the persisted update loads");
        }
    }
}
