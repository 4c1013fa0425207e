//! `protocol_frames`: arbitrary WebSocket frames. Text frames go through
//! `parse_client_message` (a typed `bad_json`/`bad_message`/`unknown_type` error, never a
//! panic; what parses is applied to a `Scene` as the session would, and everything the scene
//! then sends encodes). Binary frames go through `protocol::yjs::decode` (a `FrameError` or a
//! message whose payload yrs then decodes without panicking or failing: the guard and yrs's
//! decoder agree, except that the guard does not parse embed/format JSON). The first byte's low bit selects text (0) or binary (1).

use std::sync::Arc;
use std::time::Instant;

use collab_core::doc::{PeerMessage, Scene};
use collab_core::protocol::json::{
    encode_command, encode_error, encode_full_state, parse_client_message, ClientMessage, ErrorCode,
};
use collab_core::protocol::yjs::{decode, YjsMessage};
use serde_json::Value;
use yrs::encoding::read::Error as ReadError;
use yrs::sync::awareness::AwarenessUpdate;
use yrs::updates::decoder::Decode;
use yrs::{StateVector, Update};

use super::util::{desktop_view, doc_json, hex, mirror_json};

/// Checks one input.
pub fn check(data: &[u8]) {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    if kind & 1 == 0 {
        text(&String::from_utf8_lossy(rest));
    } else {
        binary(rest);
    }
}

fn json(text: &str) -> Value {
    serde_json::from_str(text)
        .unwrap_or_else(|e| panic!("the server wrote invalid JSON ({e}): {text}"))
}

/// One text frame.
pub fn text(frame: &str) {
    let message = match parse_client_message(frame) {
        Ok(message) => message,
        Err(e) => {
            assert!(
                matches!(
                    e.code,
                    ErrorCode::BadJson | ErrorCode::BadMessage | ErrorCode::UnknownType
                ),
                "unexpected error code {:?} for {frame:?}",
                e.code
            );
            assert_eq!(json(&encode_error(&e))["type"], "error");
            return;
        }
    };
    let mut scene = Scene::default();
    let user: Arc<str> = Arc::from("fuzz");
    scene.add_peer(1);
    scene.add_peer(2);
    scene.request_sync(2, &user);
    let effects = match message {
        ClientMessage::Command(command) => scene.apply_command(1, &user, command, Instant::now()),
        ClientMessage::FullState(items) => scene.apply_upload(1, &user, items, Instant::now()),
        ClientMessage::SyncRequest => Ok(scene.request_sync(1, &user)),
        ClientMessage::Ping => return,
    }
    .unwrap_or_else(|e| panic!("the scene failed on a parsed frame ({e}): {frame:?}"));
    for out in &effects.messages {
        assert!(out.to == 1 || out.to == 2, "a message for an unknown peer");
        match &*out.message {
            PeerMessage::Command(command) => {
                assert_eq!(json(&encode_command("t", command))["type"], "command");
            }
            PeerMessage::FullState(state) => {
                assert_eq!(
                    json(&encode_full_state("t", state))["type"],
                    "sync:full_state"
                );
            }
        }
    }
    if let Some(update) = &effects.update {
        Update::decode_v1(update).expect("the scene's update decodes");
    }
    let full = json(&encode_full_state("t", &scene.full_state()));
    assert_eq!(full["type"], "sync:full_state");
    assert_eq!(
        mirror_json(&mut scene),
        desktop_view(&doc_json(&mut scene)),
        "mirror and document differ"
    );
}

/// One binary frame.
pub fn binary(frame: &[u8]) {
    match decode(frame) {
        Err(e) => assert!(!e.0.is_empty(), "an empty frame error"),
        Ok(YjsMessage::SyncStep1(sv)) => {
            if let Err(e) = StateVector::decode_v1(sv.bytes()) {
                panic!(
                    "the guard accepted a state vector yrs refuses ({e}): {}",
                    hex(sv.bytes())
                );
            }
        }
        Ok(YjsMessage::SyncStep2(update) | YjsMessage::Update(update)) => {
            match Update::decode_v1(update.bytes()) {
                // Known, harmless gap: the guard checks that embed (content ref 5) and format
                // (ref 6) values are UTF-8 strings, yrs also parses them as JSON. The session
                // then answers `DocError::Malformed`, a typed error (see FUZZING.md).
                Ok(_) | Err(ReadError::InvalidJSON(_)) => {}
                Err(e) => panic!(
                    "the guard accepted an update yrs refuses ({e}): {}",
                    hex(update.bytes())
                ),
            }
        }
        Ok(YjsMessage::Awareness(bytes)) => {
            if let Err(e) = AwarenessUpdate::decode_v1(bytes.bytes()) {
                panic!(
                    "the guard accepted an awareness update yrs refuses ({e}): {}",
                    hex(bytes.bytes())
                );
            }
        }
        Ok(YjsMessage::QueryAwareness | YjsMessage::Auth) => {}
    }
}
