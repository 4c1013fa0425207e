//! Inputs the fuzz targets (`fuzz/`, see FUZZING.md) found, replayed on stable. Each one is
//! kept under `tests/fuzz_regressions/TARGET-NAME.hex` (one hex string) and checked for the
//! property the target asserts.

use std::sync::Arc;
use std::time::Instant;

use collab_core::doc::ydoc::Change;
use collab_core::doc::{CheckedStateVector, CheckedUpdate, DocError, Effects, GuardedDoc, Scene};
use yrs::updates::decoder::Decode;
use yrs::Update;

/// Untrusted bytes as the server takes them: checked by the guard, then applied.
fn apply(doc: &mut GuardedDoc, bytes: &[u8]) -> Result<Option<Change>, DocError> {
    doc.apply_update(&CheckedUpdate::check(bytes.to_vec())?)
}

fn scene_apply(scene: &mut Scene, user: &Arc<str>, bytes: &[u8]) -> Result<Effects, DocError> {
    scene.apply_update(user, &CheckedUpdate::check(bytes.to_vec())?)
}

fn load(bytes: &[u8]) -> Result<GuardedDoc, DocError> {
    GuardedDoc::from_updates(&[CheckedUpdate::check(bytes.to_vec())?])
}

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
    let copy = load(&encoded).expect("the encoding loads");
    let sv = |bytes: Vec<u8>| yrs::StateVector::decode_v1(&bytes).expect("a state vector");
    assert_eq!(sv(copy.state_vector_v1()), sv(doc.state_vector_v1()));
}

/// untrusted_update: a 13-byte update with JSON content (content ref 2). yrs 0.28.1 reads
/// `len + 1` strings for JSON content but writes `len`, so a document holding such content
/// encodes to bytes that do not decode: the session's stored state no longer loads.
#[test]
fn json_content_does_not_poison_the_stored_state() {
    let update = input("untrusted_update-json-content");
    let mut doc = GuardedDoc::new();
    match apply(&mut doc, &update) {
        Ok(_) => assert_encoding_reloads(&mut doc),
        Err(DocError::Rejected(_)) => {}
        Err(other) => panic!("unexpected error {other}"),
    }
    // The same through a scene: what it would persist must load.
    let mut scene = Scene::default();
    if let Ok(effects) = scene_apply(&mut scene, &Arc::from("yjs"), &update) {
        if let Some(persisted) = effects.update {
            load(&persisted).expect("the persisted update loads");
        }
    }
}

/// merge_convergence: a skip block (what yrs, and Yjs since 13.5, write for the pending
/// structs of a peer that received updates out of order) is stored by yrs 0.28.1 as a
/// placeholder. When a block covering the skipped clocks and more arrives, yrs computes
/// `skip.end - block.end`: in release builds that wraps and stores a skip of ~2^32 clocks, and
/// the document's own encoding then fails the guard (its stored state no longer loads); in
/// debug builds it panics. The two updates are what the session received in the minimised
/// run (a yrs peer's state with a pending slice, then the peer's whole update).
#[test]
fn a_skip_then_a_block_over_it_keeps_the_document_loadable() {
    let mut doc = GuardedDoc::new();
    for name in ["merge_convergence-skip-1", "merge_convergence-skip-2"] {
        let _ = apply(&mut doc, &input(name));
    }
    assert_encoding_reloads(&mut doc);
}

/// merge_convergence: the session answers SyncStep1 with its pending structs behind a skip
/// (yrs writes them so); a yrs peer that has only ever talked to the session stores that skip,
/// and then panics on the session's next answer, whose block spans the skipped clocks. The
/// server must not send a yrs peer what crashes it. Inputs: the updates the session received
/// in the minimised run (an item map, a slice of a peer's later update, that peer's update).
#[test]
fn what_the_session_sends_does_not_crash_a_yrs_peer() {
    use yrs::updates::encoder::Encode;
    use yrs::{Doc, ReadTxn, Transact};

    let mut session = GuardedDoc::new();
    let peer = Doc::new();
    let sync = |session: &mut GuardedDoc| {
        let sv = peer.transact().state_vector().encode_v1();
        let sv = CheckedStateVector::check(sv).expect("a state vector");
        let answer = session.encode_diff_v1(&sv).expect("SyncStep2");
        let update = Update::decode_v1(&answer).expect("decodes");
        let applied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            peer.transact_mut().apply_update(update)
        }));
        assert!(
            matches!(applied, Ok(Ok(()))),
            "the peer failed on {answer:02x?}"
        );
    };
    for name in ["pending-1", "pending-2"] {
        apply(&mut session, &input(&format!("merge_convergence-{name}"))).unwrap();
    }
    sync(&mut session);
    apply(&mut session, &input("merge_convergence-pending-3")).unwrap();
    sync(&mut session);
}

/// merge_convergence: the fourth update makes yrs panic (an out-of-order block it stored
/// behind a skip placeholder, then a block spanning it); `GuardedDoc` rebuilds the document
/// and retries with what it lacks. The change it then reports does not cover everything the
/// rebuild and retry changed (here the replaced item `item-1`), so the scene's mirror (what
/// legacy clients are told, and `full_state`) kept an item the document no longer has.
#[test]
fn the_mirror_follows_the_document_through_a_rebuild() {
    let mut scene = Scene::default();
    let user: Arc<str> = Arc::from("yjs");
    for i in 1..=4 {
        let update = input(&format!("merge_convergence-rebuild-{i}"));
        let _ = scene_apply(&mut scene, &user, &update);
        let mirror: Vec<(String, serde_json::Value)> = scene
            .full_state()
            .items
            .iter()
            .map(|(uuid, fields)| {
                (
                    uuid.to_string(),
                    serde_json::Value::Object((**fields).clone()),
                )
            })
            .collect();
        let doc: Vec<(String, serde_json::Value)> = scene
            .doc_mut()
            .read(|txn, items| {
                use yrs::Map;
                let mut all: Vec<(String, serde_json::Value)> = items
                    .iter(txn)
                    .filter_map(|(uuid, value)| match value {
                        yrs::Out::YMap(item) => Some((
                            uuid.to_owned(),
                            serde_json::Value::Object(
                                item.iter(txn)
                                    .map(|(k, v)| {
                                        (
                                            k.to_owned(),
                                            collab_core::doc::value::out_to_json(txn, &v),
                                        )
                                    })
                                    // As desktop clients are sent it (README "Choices").
                                    .filter(|(k, v)| collab_core::doc::schema::well_typed(k, v))
                                    .collect(),
                            ),
                        )),
                        _ => None,
                    })
                    .collect();
                all.sort_by(|a, b| a.0.cmp(&b.0));
                all
            })
            .unwrap();
        assert_eq!(mirror, doc, "after update {i}");
    }
    assert_encoding_reloads(scene.doc_mut());
}

/// legacy_convergence (shrunk from a 4-client, 2-Yjs-client run): B holds item X; A removes
/// it; a Yjs client whose copy still has X writes a new item map under X (which survives the
/// concurrent removal); B, before it reads any of this, removes X itself. B then applies
/// `remove_item X`, `add_item X` — and holds X, which the document no longer has. After a
/// removal that crossed a re-creation of the item, the server must tell the sender the
/// removal once more (PROTOCOL §3.3, "Convergence"; otherwise the remover gets no echo).
#[test]
fn a_removal_crossing_a_re_creation_is_repeated_to_the_sender() {
    use collab_core::doc::scene::PeerMessage;
    use collab_core::doc::{Action, Command, Effects};
    use yrs::{Doc, Map, MapPrelim, Transact};

    let (a, b, user): (u64, u64, Arc<str>) = (1, 2, Arc::from("u"));
    let mut scene = Scene::default();
    scene.add_peer(a);
    scene.add_peer(b);
    // Both past their first exchange: they uploaded their (empty) canvases.
    for peer in [a, b] {
        scene
            .apply_upload(peer, &user, Vec::new(), Instant::now())
            .unwrap();
    }
    let mut b_inbox = Vec::new();
    let deliver = |effects: Effects, inbox: &mut Vec<(Action, String)>| {
        for out in effects.messages.iter().filter(|o| o.to == b) {
            if let PeerMessage::Command(m) = &*out.message {
                inbox.push((m.action, m.item_id.to_string()));
            }
        }
    };
    let command = |action, data: serde_json::Value| Command {
        action,
        item_type: Some("component".into()),
        item_id: Arc::from("X"),
        data: data.as_object().cloned().unwrap_or_default(),
    };
    let added = scene
        .apply_command(
            a,
            &user,
            command(Action::Add, serde_json::json!({"x_mm": 1.0})),
            Instant::now(),
        )
        .unwrap();
    deliver(added, &mut b_inbox);
    // B reads the add (and the `update_item` that follows an add of a placeholder type such
    // as "component"): its canvas holds X.
    let mut b_canvas: Vec<String> = Vec::new();
    let read = std::mem::take(&mut b_inbox);
    assert_eq!(
        read,
        [
            (Action::Add, "X".to_owned()),
            (Action::Update, "X".to_owned())
        ]
    );
    b_canvas.push("X".to_owned());
    // A Yjs client copies the document now.
    let yjs = Doc::new();
    let snapshot = scene.doc_mut().encode_state_v1().unwrap();
    yjs.transact_mut()
        .apply_update(Update::decode_v1(&snapshot).unwrap())
        .unwrap();
    let removed = scene.apply_command(
        a,
        &user,
        command(Action::Remove, serde_json::json!({})),
        Instant::now(),
    );
    deliver(removed.unwrap(), &mut b_inbox);
    let replaced = {
        let items = yjs.get_or_insert_map("items");
        let mut txn = yjs.transact_mut();
        let item = items.insert(&mut txn, "X", MapPrelim::default());
        item.insert(&mut txn, "x_mm", 2.0);
        txn.commit();
        txn.encode_update_v1()
    };
    deliver(
        scene_apply(&mut scene, &Arc::from("yjs"), &replaced).unwrap(),
        &mut b_inbox,
    );
    // B removes X, unaware of both messages.
    b_canvas.retain(|u| u != "X");
    let removed = scene.apply_command(
        b,
        &user,
        command(Action::Remove, serde_json::json!({})),
        Instant::now(),
    );
    deliver(removed.unwrap(), &mut b_inbox);
    assert_eq!(
        b_inbox.last(),
        Some(&(Action::Remove, "X".to_owned())),
        "B's removal crossed a re-creation: it is repeated to B"
    );
    // B applies everything, as the desktop client does.
    for (action, uuid) in b_inbox {
        match action {
            Action::Add => b_canvas.push(uuid),
            Action::Remove => b_canvas.retain(|u| *u != uuid),
            Action::Move | Action::Update => {}
        }
    }
    let document: Vec<String> = scene
        .full_state()
        .items
        .iter()
        .map(|(uuid, _)| uuid.to_string())
        .collect();
    assert_eq!(b_canvas, document, "B's canvas");
}

/// merge_convergence (30-minute run, `MergedOnce` finish): a replica that yrs corrupted wrote
/// fields whose parent is, in every other document, a plain value (`item_type`); the harness
/// merged its updates with everyone's into one. yrs refuses that (`InvalidParent`) after
/// integrating part of it: the session must refuse it whole, stay unchanged and keep working.
#[test]
fn an_update_naming_a_plain_value_as_parent_is_refused_whole() {
    let mut doc = GuardedDoc::new();
    let update = input("merge_convergence-corrupt-parent");
    assert!(matches!(
        apply(&mut doc, &update),
        Err(collab_core::doc::DocError::Malformed(_))
    ));
    assert_eq!(doc.read(|txn, items| yrs::Map::len(items, txn)).unwrap(), 0);
    assert_eq!(doc.held_bytes(), 0);
    assert_encoding_reloads(&mut doc);
}

/// session (shrunk: a host reconnects while another client drags an item it holds). The
/// session cannot know a desktop client's canvas before the client uploads or is sent a full
/// state. A host keeps its canvas across connections and uploads it when it gets its own
/// `user:joined`, one round trip after it joined; a change made in that round trip to an item
/// the host holds reached the host as an `add_item`, and the desktop client built a second
/// object for it (PROTOCOL §3.3). A connection that has neither uploaded nor asked is now sent
/// `update_item` for an item that existed before the change.
#[test]
fn a_host_is_not_sent_add_item_for_an_item_it_holds_before_its_upload() {
    use collab_core::protocol::json::parse_client_message;
    use collab_core::session::{ConnKind, Input, Now, Output, Session, SessionLimits};
    use std::time::SystemTime;

    let now = Now::at(Instant::now(), SystemTime::now());
    let mut session = Session::new(Arc::from("s"), Scene::default(), &SessionLimits::default());
    let mut handle = |input: Input| {
        let mut out = Output::default();
        session.handle(input, &now, &mut out).expect("accepted");
        out
    };
    let json = |peer: u64, text: &str| Input::Json {
        peer,
        message: parse_client_message(text).expect("a valid frame"),
    };
    let item = r#"{"item_uuid":"x","item_type":"lens","x_mm":0.0,"y_mm":0.0,"angle_deg":0.0}"#;
    let join = |peer: u64, user: &str| Input::Join {
        peer,
        kind: ConnKind::Legacy,
        user: Some(Arc::from(user)),
        access: collab_core::session::Access::OPEN,
    };
    // The host joins and uploads its bench; a client joins and is sent the scene.
    handle(join(1, "host"));
    handle(json(
        1,
        &format!(r#"{{"type":"sync:full_state","state":{{"items":[{item}]}}}}"#),
    ));
    handle(join(2, "guest"));
    handle(json(2, r#"{"type":"sync:request"}"#));
    // The host's socket dies; it connects again, still holding `x`. Before its upload
    // arrives, the guest drags `x`.
    handle(join(3, "host"));
    let moved = item.replace(r#""x_mm":0.0"#, r#""x_mm":5.0"#);
    let out = handle(json(
        2,
        &format!(
            r#"{{"type":"command","command":{{"action":"move_item","item_type":"lens","item_id":"x","data":{moved}}}}}"#
        ),
    ));
    for (peer, payload) in &out.sends {
        let text = std::str::from_utf8(payload.bytes()).expect("text");
        assert!(
            !(*peer == 3 && text.contains(r#""action":"add_item""#)),
            "the host's new connection was sent {text}"
        );
    }
}
