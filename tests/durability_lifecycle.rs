//! A session's life in memory (PROTOCOL §6): loaded once however many clients arrive
//! together, acks in one join order when joins race the load, and reconnects racing its
//! eviction neither lose an edit nor run two copies of it.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use common::durable::*;
use common::*;
use serde_json::{json, Value};
use tokio::sync::watch;

// ---------------------------------------------------------------------------------------------
// Single-flight loading
// ---------------------------------------------------------------------------------------------

/// Counts loads and holds each one until the gate opens.
struct Gate {
    loads: watch::Sender<usize>,
    gate: watch::Sender<bool>,
}

impl Gate {
    fn new() -> Gate {
        Gate {
            loads: watch::channel(0).0,
            gate: watch::channel(true).0,
        }
    }
}

impl StoreHook for Gate {
    fn before(&self, op: StoreOp) -> Wait {
        if op != StoreOp::Load {
            return Box::pin(std::future::ready(()));
        }
        self.loads.send_modify(|n| *n += 1);
        let mut gate = self.gate.subscribe();
        Box::pin(async move {
            let _ = gate.wait_for(|open| *open).await;
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_clients_arriving_together_load_the_session_once() {
    let store = Arc::new(HookStore::new(Gate::new()));
    let mut config = test_config();
    config.evict_after = Duration::from_millis(50);
    let server = TestServer::start_with(config, store.clone()).await;
    let session = "flight";

    // Store the session, and let it leave memory.
    let (mut alice, _) = server.legacy(session, "alice").await;
    for i in 0..3 {
        let (item_type, uuid, data) = fixture_item(i);
        send_json(
            &mut alice,
            &command("add_item", &item_type, &uuid, data, "alice"),
        )
        .await;
    }
    ping_collect(&mut alice).await;
    close_client(alice).await;
    await_health(server.addr, "sessions", 0).await;
    let loads_before = *store.hook.loads.borrow();
    assert_eq!(loads_before, 1);

    // Twenty clients connect while the load is held.
    store.hook.gate.send_replace(false);
    let names: Vec<String> = (0..20).map(|i| format!("user{i:02}")).collect();
    let connects: Vec<_> = names
        .iter()
        .map(|name| {
            let url = server.url(&format!("/ws/{session}/{name}"));
            tokio::spawn(async move { tokio_tungstenite::connect_async(url).await.unwrap().0 })
        })
        .collect();
    let mut clients = Vec::new();
    for connect in connects {
        clients.push(connect.await.unwrap());
    }
    let mut loads = store.hook.loads.subscribe();
    tokio::time::timeout(PATIENCE, loads.wait_for(|n| *n > loads_before))
        .await
        .expect("the session starts loading")
        .unwrap();
    await_health(server.addr, "connections", 20).await;
    store.hook.gate.send_replace(true);

    // Every client is acked, asks for the scene (as the desktop client does), then adds its
    // own item.
    let mut received: Vec<Vec<Value>> = Vec::new();
    for (ws, name) in clients.iter_mut().zip(&names) {
        let ack = recv_ack(ws, name).await;
        assert_eq!(ack["is_host"], false, "{ack}");
        send_json(ws, &json!({"type": "sync:request"})).await;
        // (Their order is `acks_list_users_in_join_order_when_joins_race`'s business.)
        let users = ack["users"].as_array().unwrap();
        assert!(users.iter().any(|u| u["user_id"] == name.as_str()), "{ack}");
        received.push(vec![ack]);
    }
    for (ws, name) in clients.iter_mut().zip(&names) {
        let uuid = format!("{name}-item");
        let data = json!({"x_mm": 1.0, "y_mm": 2.0, "angle_deg": 0.0, "item_uuid": uuid,
                          "_type": "text", "text": name});
        send_json(ws, &command("add_item", "text", &uuid, data, name)).await;
    }
    // Two pings each: after everyone's first pong every add was applied and queued to every
    // client before the second pong.
    for _ in 0..2 {
        for (ws, seen) in clients.iter_mut().zip(received.iter_mut()) {
            seen.extend(ping_collect(ws).await);
        }
    }
    assert_eq!(
        *store.hook.loads.borrow(),
        loads_before + 1,
        "loaded exactly once"
    );

    let scene = scene_by_uuid(&server.scene(session).await);
    assert_eq!(scene.len(), 23);
    let everyone: BTreeSet<&str> = names.iter().map(String::as_str).collect();
    for (name, seen) in names.iter().zip(&received) {
        let mut users: BTreeSet<&str> = seen[0]["users"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["user_id"].as_str().unwrap())
            .collect();
        let mut canvas = Canvas::default();
        for msg in &seen[1..] {
            if msg["type"] == "user:joined" {
                users.insert(msg["user_id"].as_str().unwrap());
            }
            canvas.apply(msg);
        }
        assert!(canvas.synced, "{name} got the scene");
        assert_eq!(users, everyone, "{name} knows everyone");
        // The client's own add is not echoed (it has that item locally): compare the rest.
        let own = format!("{name}-item");
        let mut expected = scene.clone();
        expected.remove(&own);
        canvas.assert_shows(&expected, name);
    }
    drop(clients);
}

/// PROTOCOL §3.1: `users` lists everyone "in join order", the joiner included, so when many
/// clients join at once (queued behind the load) every ack's list is a prefix of one order
/// and ends with the joiner.
#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn acks_list_users_in_join_order_when_joins_race() {
    let store = Arc::new(HookStore::new(Gate::new()));
    let server = TestServer::start_with(test_config(), store.clone()).await;
    for round in 0..20 {
        let session = format!("order-{round}");
        store.hook.gate.send_replace(false);
        let names: Vec<String> = (0..30).map(|i| format!("user{i:02}")).collect();
        let connects: Vec<_> = names
            .iter()
            .map(|name| {
                let url = server.url(&format!("/ws/{session}/{name}"));
                tokio::spawn(async move { tokio_tungstenite::connect_async(url).await.unwrap().0 })
            })
            .collect();
        let mut clients = Vec::new();
        for connect in connects {
            clients.push(connect.await.unwrap());
        }
        await_health(server.addr, "connections", 30).await;
        store.hook.gate.send_replace(true);
        let mut acks = Vec::new();
        for (ws, name) in clients.iter_mut().zip(&names) {
            let ack = recv_ack(ws, name).await;
            let users: Vec<String> = ack["users"]
                .as_array()
                .unwrap()
                .iter()
                .map(|u| u["user_id"].as_str().unwrap().to_owned())
                .collect();
            acks.push((ack["user_id"].as_str().unwrap().to_owned(), users));
        }
        let order = acks
            .iter()
            .map(|(_, users)| users)
            .max_by_key(|u| u.len())
            .unwrap()
            .clone();
        for (joiner, users) in &acks {
            assert_eq!(
                users.last(),
                Some(joiner),
                "round {round}: {joiner}'s ack does not end with the joiner: {users:?}"
            );
            assert_eq!(
                users[..],
                order[..users.len()],
                "round {round}: {joiner}'s ack is not a prefix of the join order {order:?}"
            );
        }
        for ws in clients {
            close_client(ws).await;
        }
        await_health(server.addr, "connections", 0).await;
    }
}

/// The user names a client knows of: its ack's list plus later `user:joined`.
fn known_users(ack: &Value, later: &[Value]) -> BTreeSet<String> {
    ack["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["user_id"].as_str().unwrap().to_owned())
        .chain(
            later
                .iter()
                .filter(|m| m["type"] == "user:joined")
                .map(|m| m["user_id"].as_str().unwrap().to_owned()),
        )
        .collect()
}

/// The `x_mm` of `uuid` as the last message about it among `msgs` (a command, or a full
/// state holding it) set it.
fn last_x(msgs: &[Value], uuid: &str) -> Option<f64> {
    msgs.iter().rev().find_map(|m| match m["type"].as_str() {
        Some("command") if m["command"]["item_id"] == uuid => Some(x_of(&m["command"]["data"])),
        Some("sync:full_state") => items_by_uuid(&m["state"]).get(uuid).map(x_of),
        _ => None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_racing_eviction_lose_nothing_and_never_split_the_session() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = sqlite_config(dir.path());
    config.evict_after = Duration::from_millis(50);
    let server = start_sqlite(config).await;
    let session = "race";
    let mut expected: BTreeMap<String, f64> = BTreeMap::new();
    let item = |uuid: &str, x: f64| {
        json!({"x_mm": x, "y_mm": 0.0, "angle_deg": 0.0, "item_uuid": uuid, "_type": "text",
               "text": uuid})
    };
    for i in 0..40usize {
        let ((mut a, ack_a), (mut b, ack_b)) =
            tokio::join!(server.legacy(session, "a"), server.legacy(session, "b"));
        // Both ask for the scene, as the desktop client does after the ack (into the
        // uninitialized scene of the first iteration: answered once it is initialized).
        send_json(&mut a, &json!({"type": "sync:request"})).await;
        send_json(&mut b, &json!({"type": "sync:request"})).await;
        let mut seen_a = ping_collect(&mut a).await;
        let mut seen_b = ping_collect(&mut b).await;
        // Nothing was lost: each joiner's full state has every edit made so far.
        for seen in [&seen_a, &seen_b] {
            let state = seen.iter().find(|m| m["type"] == "sync:full_state");
            let stored: BTreeMap<String, f64> = state
                .map(|s| items_by_uuid(&s["state"]))
                .unwrap_or_default()
                .iter()
                .map(|(uuid, item)| (uuid.clone(), x_of(item)))
                .collect();
            assert_eq!(stored, expected, "iteration {i}: the scene a joiner got");
        }

        // Both edit: a moves its item and replaces its extra item; b updates its item.
        let x = i as f64;
        let action = if i == 0 { "add_item" } else { "move_item" };
        send_json(
            &mut a,
            &command(action, "text", "a-item", item("a-item", x), "a"),
        )
        .await;
        let extra = format!("a-extra-{i}");
        send_json(
            &mut a,
            &command("add_item", "text", &extra, item(&extra, x), "a"),
        )
        .await;
        if i > 0 {
            let previous = format!("a-extra-{}", i - 1);
            send_json(
                &mut a,
                &command("remove_item", "text", &previous, json!({}), "a"),
            )
            .await;
            expected.remove(&previous);
        }
        let action = if i == 0 { "add_item" } else { "update_item" };
        send_json(
            &mut b,
            &command(action, "text", "b-item", item("b-item", x), "b"),
        )
        .await;
        expected.insert("a-item".into(), x);
        expected.insert(extra, x);
        expected.insert("b-item".into(), x);
        for _ in 0..2 {
            seen_a.extend(ping_collect(&mut a).await);
            seen_b.extend(ping_collect(&mut b).await);
        }
        // One live session: each saw the other, and the other's edit.
        assert!(
            known_users(&ack_a, &seen_a).contains("b"),
            "iteration {i}: a never heard of b"
        );
        assert!(
            known_users(&ack_b, &seen_b).contains("a"),
            "iteration {i}: b never heard of a"
        );
        assert_eq!(
            last_x(&seen_a, "b-item"),
            Some(x),
            "iteration {i}: a saw b's edit"
        );
        assert_eq!(
            last_x(&seen_b, "a-item"),
            Some(x),
            "iteration {i}: b saw a's edit"
        );

        tokio::join!(close_client(a), close_client(b));
        // Vary when the next pair arrives relative to the 50 ms eviction deadline: this
        // pause is the point of the test, not a wait for an event.
        tokio::time::sleep(Duration::from_millis((i as u64 * 13) % 80)).await;
    }

    // Once idle, the session leaves memory; what comes back is everything.
    await_health(server.addr, "sessions", 0).await;
    let scene = server.scene(session).await;
    let stored: BTreeMap<String, f64> = items_by_uuid(&scene)
        .iter()
        .map(|(uuid, item)| (uuid.clone(), x_of(item)))
        .collect();
    assert_eq!(stored, expected);
    await_health(server.addr, "sessions", 0).await;
    stop(server).await;
}
