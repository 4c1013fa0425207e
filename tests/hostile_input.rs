//! Input a hostile peer controls, end to end: field types in commands, names in paths.
//! (The awareness rules are unit tests of `collab_core::session::awareness`.)

mod common;

use common::{close_code, command, ping_collect, send_json, TestServer};
use serde_json::json;

#[tokio::test]
async fn ill_typed_positions_are_refused_and_change_nothing() {
    let server = TestServer::start().await;
    let (mut alice, _) = server.settled("typed", "alice").await;
    let (mut bob, _) = server.settled("typed", "bob").await;
    ping_collect(&mut alice).await;
    let lens = json!({"x_mm": 1.5, "y_mm": 2.0, "angle_deg": 0.0, "name": "L1"});
    send_json(
        &mut alice,
        &command("add_item", "component", "l1", lens, "alice"),
    )
    .await;
    assert_eq!(
        ping_collect(&mut bob).await.len(),
        2,
        "add_item and its fix"
    );

    for bad in [json!("abc"), json!(null), json!([1, 2])] {
        let data = json!({"x_mm": bad, "y_mm": 2.0, "angle_deg": 0.0, "name": "L1"});
        for action in ["move_item", "update_item", "add_item"] {
            send_json(
                &mut alice,
                &command(action, "component", "l1", data.clone(), "alice"),
            )
            .await;
            let answer = ping_collect(&mut alice).await;
            assert_eq!(answer.len(), 1, "{answer:?}");
            assert_eq!(answer[0]["type"], "error");
            assert_eq!(answer[0]["code"], "bad_message");
            assert!(
                answer[0]["message"].as_str().unwrap().contains("x_mm"),
                "{answer:?}"
            );
        }
    }
    let upload = json!({"type": "sync:full_state", "state": {"items": [
        {"item_uuid": "l2", "_type": "component", "x_mm": 0.0, "locked": "yes"}
    ]}});
    send_json(&mut alice, &upload).await;
    assert_eq!(ping_collect(&mut alice).await[0]["code"], "bad_message");

    assert!(
        ping_collect(&mut bob).await.is_empty(),
        "nothing reached bob"
    );
    let items = server.scene("typed").await["items"].clone();
    assert_eq!(items.as_array().map(Vec::len), Some(1));
    assert_eq!(items[0]["x_mm"], json!(1.5));
}

/// Joins `path_segment` as alice and adds one source; returns alice's connection.
async fn session_with_a_source(server: &TestServer, path_segment: &str) -> common::Ws {
    let (mut alice, _) = server.legacy(path_segment, "alice").await;
    let item = json!({"x_mm": 1.0, "y_mm": 2.0, "angle_deg": 0.0});
    send_json(
        &mut alice,
        &command("add_item", "source", "s1", item, "alice"),
    )
    .await;
    ping_collect(&mut alice).await;
    alice
}

#[tokio::test]
async fn every_endpoint_decodes_a_session_name_once() {
    let server = TestServer::start().await;
    // The WebSocket path `a%2541` names the session `a%41`.
    let _alice = session_with_a_source(&server, "a%2541").await;

    let same = server.scene("a%2541").await;
    assert_eq!(same["items"].as_array().map(Vec::len), Some(1));
    let (status, _) = server.get("/api/sessions/aA/scene").await;
    assert_eq!(status, 404, "`aA` is another session, which does not exist");
}

#[tokio::test]
async fn names_are_nfc_and_format_characters_are_refused() {
    let server = TestServer::start().await;
    let _alice = session_with_a_source(&server, "caf%C3%A9").await;
    // "café" with a combining accent is the same session.
    let decomposed = server.scene("cafe%CC%81").await;
    assert_eq!(decomposed["items"].as_array().map(Vec::len), Some(1));
    // A right-to-left override in a session name.
    let (status, _) = server.get("/api/sessions/caf%E2%80%AE%C3%A9/scene").await;
    assert_eq!(status, 400);
    // A zero-width space in a user name: the connection is closed 1008 without joining.
    let mut refused = server.connect("/ws/lab/ev%E2%80%8Bil").await;
    assert_eq!(close_code(&mut refused).await, 1008);
}

#[tokio::test]
async fn reading_a_session_that_does_not_exist_creates_nothing() {
    let store = std::sync::Arc::new(optiverse_collab::store::memory::MemoryStore::new());
    let server = TestServer::start_with(common::test_config(), store.clone()).await;
    for path in ["/api/sessions/ghost/scene", "/api/sessions/ghost/update"] {
        let (status, body) = server.get(path).await;
        assert_eq!(status, 404, "{path}: {}", String::from_utf8_lossy(&body));
    }
    let (_, health) = server.get("/health").await;
    let health: serde_json::Value = serde_json::from_slice(&health).unwrap();
    assert_eq!(health["sessions"], 0, "no live session was started");

    // Joining and leaving without an edit stores nothing either.
    let (mut alice, _) = server.legacy("quiet", "alice").await;
    ping_collect(&mut alice).await;
    use optiverse_collab::store::Store;
    assert!(!store.contains("quiet").await.unwrap());
    assert!(!store.contains("ghost").await.unwrap());
    // A live session with nothing in it reads as empty (it exists while someone is in it).
    assert_eq!(server.scene("quiet").await["items"], serde_json::json!([]));
    let item = json!({"x_mm": 1.0, "y_mm": 2.0, "angle_deg": 0.0});
    send_json(
        &mut alice,
        &command("add_item", "source", "s1", item, "alice"),
    )
    .await;
    ping_collect(&mut alice).await;
    assert!(store.contains("quiet").await.unwrap());
}
