//! Bad input (PROTOCOL §3.6): every malformed JSON message is refused with its error code and
//! every malformed y-websocket frame is refused, by the core's decoders, before anything
//! reaches a session (the connection task answers the refusal; `tests/legacy_protocol.rs`
//! checks that over a socket). What a session itself refuses leaves it unchanged.

mod common;

use collab_core::protocol::json::{encode_error, parse_client_message};
use collab_core::protocol::yjs;
use common::*;
use serde_json::{json, Value};
use yrs::sync::{Message, SyncMessage};
use yrs::updates::encoder::Encode;
use yrs::{Any, Doc, Map as _, MapPrelim};

/// Parses `text` as the connection task does; returns the `error` it would answer with.
fn refusal(text: &str) -> Value {
    let error = match parse_client_message(text) {
        Ok(message) => panic!("{text:?} was taken as {message:?}"),
        Err(error) => error,
    };
    serde_json::from_str(&encode_error(&error)).expect("the error is JSON")
}

#[test]
fn every_malformed_json_message_is_refused_with_its_code() {
    let (t, uuid, _) = fixture_item(13);
    let moved = json!({"x_mm": 999.0, "y_mm": 999.0, "angle_deg": 90.0, "name": "broken"});
    let bad_command = |command: Value| {
        json!({"type": "command", "command": command, "user_id": "a",
               "timestamp": "2026-11-25T19:22:01.123Z"})
        .to_string()
    };
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "not JSON",
            "{\"type\": \"command\", ".to_owned(),
            "bad_json",
        ),
        ("plain text", "hello server".to_owned(), "bad_json"),
        (
            "array",
            json!([{"type": "ping"}]).to_string(),
            "bad_message",
        ),
        ("string", json!("ping").to_string(), "bad_message"),
        ("number", "42".to_owned(), "bad_message"),
        (
            "missing type",
            json!({"user_id": "a", "command": {}}).to_string(),
            "bad_message",
        ),
        (
            "non-string type",
            json!({"type": 7}).to_string(),
            "bad_message",
        ),
        (
            "unknown type",
            json!({"type": "scene:explode", "user_id": "a"}).to_string(),
            "unknown_type",
        ),
        (
            "command without command",
            json!({"type": "command", "user_id": "a"}).to_string(),
            "bad_message",
        ),
        (
            "command not an object",
            json!({"type": "command", "command": "move_item"}).to_string(),
            "bad_message",
        ),
        (
            "bad action",
            bad_command(
                json!({"action": "teleport_item", "item_type": t, "item_id": uuid, "data": moved}),
            ),
            "bad_message",
        ),
        (
            "missing action",
            bad_command(json!({"item_type": t, "item_id": uuid, "data": moved})),
            "bad_message",
        ),
        (
            "missing item_id",
            bad_command(json!({"action": "move_item", "item_type": t, "data": moved})),
            "bad_message",
        ),
        (
            "empty item_id",
            bad_command(
                json!({"action": "move_item", "item_type": t, "item_id": "", "data": moved}),
            ),
            "bad_message",
        ),
        (
            "data not an object",
            bad_command(
                json!({"action": "update_item", "item_type": t, "item_id": uuid, "data": [1, 2]}),
            ),
            "bad_message",
        ),
        (
            "data missing",
            bad_command(json!({"action": "move_item", "item_type": t, "item_id": uuid})),
            "bad_message",
        ),
    ];
    for (what, text, code) in &cases {
        let error = refusal(text);
        assert_error(&error, code);
        assert!(
            error.get("user_id").is_none() && error.get("timestamp").is_none(),
            "{what}: an error is code and message only: {error}"
        );
    }
}

#[test]
fn every_malformed_yjs_frame_is_refused() {
    // A real update, cut short.
    let truncated = {
        let update = edit(&Doc::new(), |txn, items| {
            items.insert(
                txn,
                "truncated",
                MapPrelim::from([("x_mm", Any::from(1.0))]),
            );
        });
        let mut frame = Message::Sync(SyncMessage::Update(update)).encode_v1();
        frame.truncate(frame.len() - 3);
        frame
    };
    let frames: Vec<Vec<u8>> = vec![
        vec![],
        vec![9],
        vec![0],
        vec![0, 7, 0],
        vec![0, 2, 4, 0xff, 0xff, 0xff, 0x0f],
        vec![0, 2, 10, 1],
        vec![0, 1, 3, 0xff, 0xff, 0xff],
        vec![0, 0, 8, 0xff, 0xff, 0xff, 0xff, 0x0f, 0, 0, 0],
        vec![1, 5, 0xff, 0xff, 0xff, 0xff, 0x0f],
        vec![0xff; 11],
        truncated,
    ];
    for frame in &frames {
        assert!(yjs::decode(frame).is_err(), "{frame:?} was taken");
    }
}

/// A session refuses what its document cannot hold (here an awareness update from a
/// connection over its bounds): the sender hears why if it speaks JSON, nothing changes and
/// nobody else hears of it.
#[test]
fn what_a_session_refuses_is_answered_to_its_sender_only() {
    let limits = collab_core::session::SessionLimits {
        max_awareness_bytes: 16,
        ..Default::default()
    };
    let mut world = World::with_limits(&limits);
    let (alice, _) = world.legacy("alice");
    let yuki = world.join(collab_core::session::ConnKind::LegacyYjs, Some("yuki"));
    world.take(yuki);
    let (watcher, _) = world.yjs(None);
    world.ping(alice);
    let state = format!("{{\"b\":\"{}\"}}", "x".repeat(32));
    world.send_yjs(
        yuki,
        Message::Awareness(awareness_update(&[(5, 1, state.as_str())])),
    );
    let got = world.take_json(yuki);
    assert_error(only(&got), "bad_message");
    world.send_yjs(watcher, Message::AwarenessQuery);
    world.assert_quiet();
    assert!(world.ping(alice).is_empty(), "nobody else hears of it");
    assert!(world.persisted.is_empty());
}
