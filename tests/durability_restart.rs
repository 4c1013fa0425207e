//! Durability across a restart (PROTOCOL §6): what the server stored is served again, the
//! initialized flag included, and a session whose stored updates are corrupt fails alone.

mod common;

use std::collections::{BTreeSet, HashSet};

use common::durable::*;
use common::*;
use serde_json::{json, Value};
use yrs::Map as _;

/// Reads JSON messages until a `command` for each of `uuids` arrived; returns them.
async fn await_commands(ws: &mut Ws, uuids: &[&str]) -> Vec<Value> {
    let mut missing: BTreeSet<&str> = uuids.iter().copied().collect();
    let mut seen = Vec::new();
    while !missing.is_empty() {
        let msg = recv_json(ws).await;
        if msg["type"] == "command" {
            missing.remove(msg["command"]["item_id"].as_str().unwrap());
            seen.push(msg);
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_serves_the_same_document_and_keeps_the_initialized_flag() {
    let dir = tempfile::tempdir().unwrap();
    let session = "restart";
    let server = start_sqlite(sqlite_config(dir.path())).await;

    // Optiverse clients: add, move, update, remove.
    let (mut alice, ack) = server.legacy(session, "alice").await;
    assert_eq!(ack["is_host"], true, "{ack}");
    let fixtures: Vec<_> = (0..4).map(fixture_item).collect();
    let uuids: HashSet<_> = fixtures.iter().map(|f| f.1.clone()).collect();
    assert_eq!(uuids.len(), 4, "four distinct fixture items");
    for (item_type, uuid, data) in &fixtures {
        send_json(
            &mut alice,
            &command("add_item", item_type, uuid, data.clone(), "alice"),
        )
        .await;
    }
    ping_collect(&mut alice).await;
    let (mut bob, ack, got) = server.joiner(session, "bob").await;
    assert_eq!(ack["is_host"], false, "{ack}");
    assert_eq!(fold_fixes(&got)[0]["type"], "sync:full_state", "{got:#?}");

    let (t0, u0, d0) = &fixtures[0];
    let mut moved = d0.clone();
    moved["x_mm"] = json!(111.25);
    moved["y_mm"] = json!(-7.5);
    moved["angle_deg"] = json!(30.0);
    send_json(&mut alice, &command("move_item", t0, u0, moved, "alice")).await;
    let (t1, u1, d1) = &fixtures[1];
    let mut renamed = d1.clone();
    renamed["name"] = json!("renamed by bob");
    send_json(&mut bob, &command("update_item", t1, u1, renamed, "bob")).await;
    let (t2, u2, _) = &fixtures[2];
    send_json(
        &mut alice,
        &command("remove_item", t2, u2, json!({}), "alice"),
    )
    .await;
    ping_collect(&mut alice).await;
    ping_collect(&mut bob).await;

    // A Yjs client: sync, then one update editing an existing item and adding one.
    let (mut yjs, _) = YClient::join(&server, &format!("/yjs/{session}")).await;
    let (_, u3, _) = &fixtures[3];
    assert!(yjs.item(u3).is_some(), "{u3} synced to the Yjs client");
    let added = json!({"item_uuid": "yjs-item-1", "x_mm": 5.0, "y_mm": 6.0,
                       "text": "written by yrs"});
    yjs.edit_and_send(|txn, items| {
        set_fields(txn, items, u3, &[("x_mm", json!(42.5))]);
        items.insert(txn, "yjs-item-1", item_prelim("text", &added));
    })
    .await;
    // Received by an Optiverse client, so stored (§6).
    let seen = await_commands(&mut alice, &[u3.as_str(), "yjs-item-1"]).await;
    assert!(seen.iter().any(|m| m["command"]["data"]["x_mm"] == 42.5));

    // A second session: items added, then all removed: initialized, but empty.
    let (mut erin, ack) = server.legacy("emptied", "erin").await;
    assert_eq!(ack["is_host"], true);
    send_json(&mut erin, &command("add_item", t0, u0, d0.clone(), "erin")).await;
    send_json(
        &mut erin,
        &command("remove_item", t0, u0, json!({}), "erin"),
    )
    .await;
    ping_collect(&mut erin).await;

    let scene_before = server.scene(session).await;
    let v1_before = v1_state(server.addr, session).await;
    let items_before = items_by_uuid(&scene_before);
    assert_eq!(items_before.len(), 4, "{scene_before}");
    assert_eq!(items_before[u0.as_str()]["x_mm"], 111.25);
    assert_eq!(items_before[u1.as_str()]["name"], "renamed by bob");
    assert!(!items_before.contains_key(u2.as_str()));
    assert_eq!(items_before[u3.as_str()]["x_mm"], 42.5);
    assert_eq!(items_before["yjs-item-1"]["text"], "written by yrs");

    stop(server).await;
    drop((alice, bob, yjs, erin));

    let server = start_sqlite(sqlite_config(dir.path())).await;
    let scene_after = server.scene(session).await;
    assert_eq!(items_by_uuid(&scene_after), items_before);
    assert!(
        scene_after["version"].as_u64().unwrap() >= scene_before["version"].as_u64().unwrap(),
        "version never goes back: {} then {}",
        scene_before["version"],
        scene_after["version"]
    );
    let v1_after = v1_state(server.addr, session).await;
    assert_eq!(v1_after.0, v1_before.0, "state vectors");
    assert_eq!(v1_after.1, v1_before.1, "items as JSON");

    // The initialized flag persisted: a new joiner is not the host and gets the scene.
    let (carol, ack, got) = server.joiner(session, "carol").await;
    assert_eq!(ack["is_host"], false, "{ack}");
    let got = fold_fixes(&got);
    let full = &got[0];
    assert_eq!(full["type"], "sync:full_state", "{full}");
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_eq!(items_by_uuid(&full["state"]), items_before);

    let (dave, ack, got) = server.joiner("emptied", "dave").await;
    assert_eq!(
        ack["is_host"], false,
        "an initialized (emptied) scene stays initialized across a restart: {ack}"
    );
    let full = &got[0];
    assert_eq!(full["type"], "sync:full_state", "{full}");
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_eq!(full["state"]["items"], json!([]));
    drop((carol, dave));
    stop(server).await;
}

/// A host that uploads an empty canvas initializes the scene (§2, §3.4); that must survive a
/// restart like any other initialization.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_initialization_by_an_empty_host_upload_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_sqlite(sqlite_config(dir.path())).await;
    let (mut alice, ack) = server.legacy("blank", "alice").await;
    assert_eq!(ack["is_host"], true);
    send_json(
        &mut alice,
        &json!({"type": "sync:full_state", "state": {"items": []}, "user_id": "alice"}),
    )
    .await;
    ping_collect(&mut alice).await;
    let (bob, ack, got) = server.joiner("blank", "bob").await;
    assert_eq!(ack["is_host"], false, "{ack}");
    let full = &got[0];
    assert_eq!(full["type"], "sync:full_state", "{got:#?}");
    assert_eq!(full["state"]["items"], json!([]));
    drop((alice, bob));
    stop(server).await;

    let server = start_sqlite(sqlite_config(dir.path())).await;
    let (carol, ack, got) = server.joiner("blank", "carol").await;
    assert_eq!(
        ack["is_host"], false,
        "the initialized flag set by an empty host upload was not persisted: {ack}"
    );
    assert_eq!(
        got.first().map(|m| &m["type"]),
        Some(&json!("sync:full_state")),
        "{got:#?}"
    );
    drop(carol);
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_stored_session_fails_alone() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_sqlite(sqlite_config(dir.path())).await;
    // Each session is stored as one update (a host upload), so no compaction runs when it
    // leaves memory: a compaction that lands after `shutdown` returned would replace the
    // rows corrupted below (see `shutdown_waits_for_the_compaction_at_exit`).
    for (i, session) in ["good", "garbage", "truncated"].iter().enumerate() {
        let (mut ws, ack) = server.legacy(session, "alice").await;
        assert_eq!(ack["is_host"], true);
        let items: Vec<Value> = (0..3).map(|j| fixture_item(i * 3 + j).2).collect();
        send_json(
            &mut ws,
            &json!({"type": "sync:full_state", "state": {"items": items}, "user_id": "alice"}),
        )
        .await;
        ping_collect(&mut ws).await;
        assert_eq!(items_by_uuid(&server.scene(session).await).len(), 3);
    }
    let good_before = items_by_uuid(&server.scene("good").await);
    stop(server).await;
    for session in ["garbage", "truncated"] {
        let kinds: Vec<String> = stored_rows(dir.path(), session)
            .into_iter()
            .map(|r| r.0)
            .collect();
        assert_eq!(kinds, ["update"], "{session} is stored as one update");
    }

    {
        let db = open_db(dir.path());
        db.execute(
            "INSERT INTO updates (session, kind, data) VALUES ('garbage', 'update', ?1)",
            [b"\xff\x13\x37 definitely not a yjs update \x00\xff".to_vec()],
        )
        .unwrap();
        let changed = db
            .execute(
                "UPDATE updates SET data = substr(data, 1, length(data) / 2) WHERE session = 'truncated'",
                [],
            )
            .unwrap();
        assert_eq!(changed, 1);
    }

    let server = start_sqlite(sqlite_config(dir.path())).await;
    for session in ["garbage", "truncated", "garbage"] {
        let mut ws = server.connect(&format!("/ws/{session}/bob")).await;
        let msg = recv_json(&mut ws).await;
        assert_eq!(msg["type"], "error", "{session}: {msg}");
        assert!(
            msg["code"].is_string() && msg["message"].is_string(),
            "{msg}"
        );
        assert_eq!(close_code(&mut ws).await, 1011, "{session}");
    }
    let mut yjs = server.connect("/yjs/garbage").await;
    assert_eq!(close_code(&mut yjs).await, 1011);

    // The rest of the server is unaffected.
    let health = health(server.addr).await;
    assert_eq!(health["status"], "ok", "{health}");
    let (mut bob, ack, got) = server.joiner("good", "bob").await;
    assert_eq!(ack["is_host"], false);
    let got = fold_fixes(&got);
    let full = &got[0];
    assert_eq!(full["type"], "sync:full_state", "{got:#?}");
    assert_eq!(items_by_uuid(&full["state"]), good_before);
    let (item_type, uuid, data) = fixture_item(20);
    send_json(
        &mut bob,
        &command("add_item", &item_type, &uuid, data, "bob"),
    )
    .await;
    ping_collect(&mut bob).await;
    assert!(items_by_uuid(&server.scene("good").await).contains_key(&uuid));
    let (status, _) = server.get("/api/sessions/garbage/scene").await;
    assert_ne!(status, 200, "a session that cannot be loaded is not served");
    assert_eq!(server.get("/health").await.0, 200);
    drop(bob);
    stop(server).await;
}
