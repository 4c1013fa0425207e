//! Slow consumers and the memory budget over real sockets: a Yjs reader that stops reading is
//! caught up (its queue stays bounded, it converges), and past `--max-memory` the costliest
//! peer is shed (1013, or 503 for an HTTP body) while the others are served.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use common::*;
use optiverse_collab::config::Config;
use optiverse_collab::store::memory::MemoryStore;
use serde_json::{json, Value};
use yrs::sync::{Message, SyncMessage};
use yrs::{Map, ReadTxn, Transact};

/// The server's memory budget figures (`/api/process`).
async fn budget(server: &TestServer) -> Value {
    budget_at(server.addr).await
}

async fn budget_at(addr: SocketAddr) -> Value {
    let (status, body) = http(addr, "GET", "/api/process", &[]).await;
    assert_eq!(status, 200);
    let process: Value = serde_json::from_slice(&body).unwrap();
    process["budget"].clone()
}

/// A config whose rate limits let one writer send a burst of updates.
fn burst_config() -> Config {
    let mut config = test_config();
    config.update_rate = 100_000.0;
    config.update_burst = 100_000.0;
    config
}

/// Reads until the client's document has `key` (a catch-up or an update brings it).
async fn read_until(client: &mut YClient, key: &str) {
    tokio::time::timeout(PATIENCE, async {
        while client.item(key).is_none() {
            match client.recv().await {
                Message::Sync(SyncMessage::Update(u) | SyncMessage::SyncStep2(u)) => {
                    client.apply(&u)
                }
                Message::Awareness(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{key} never arrived"));
}

/// A reader that stops reading while a writer sends far more than socket buffers hold gets,
/// when it reads again, what it lacks: its queue never passed the catch-up bound by more than
/// a few frames, and its document ends equal to the writer's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_yjs_reader_that_stops_reading_is_caught_up_with_a_bounded_queue() {
    const CATCH_UP: usize = 64 * 1024;
    const FIELD: usize = 32 * 1024;
    let mut config = burst_config();
    config.catch_up_bytes = CATCH_UP;
    let server = TestServer::start_with(config, Arc::new(MemoryStore::new())).await;
    let (mut writer, _) = YClient::join(&server, "/yjs/slow").await;
    let (mut slow, _) = YClient::join(&server, "/yjs/slow").await;

    // 32 MiB of traffic on one item (the document stays one field's size), not read.
    writer
        .edit_and_send(|txn, items| {
            items.insert(txn, "hot", item_prelim("ruler", &json!({"name": ""})));
        })
        .await;
    let filler = "x".repeat(FIELD);
    for round in 0..1024 {
        writer
            .edit_and_send(|txn, items| {
                set_fields(
                    txn,
                    items,
                    "hot",
                    &[("name", json!(format!("{round}:{filler}")))],
                );
            })
            .await;
    }
    writer
        .edit_and_send(|txn, items| {
            items.insert(txn, "last", item_prelim("ruler", &json!({"name": ""})));
        })
        .await;
    // Its SyncStep2 comes once the session handled every update before it.
    writer.sync().await;

    let largest = budget(&server).await["largest_queue_bytes"]
        .as_u64()
        .unwrap();
    // Changes up to the bound, then at most the frame that passed it, a started frame and
    // the catch-up (each about one field).
    let bound = CATCH_UP + 4 * (FIELD + 1024);
    assert!(
        largest <= bound as u64,
        "a queue held {largest} bytes, more than {bound}"
    );

    read_until(&mut slow, "last").await;
    assert_eq!(doc_items(&slow.doc), doc_items(&writer.doc));
    assert_eq!(
        slow.doc.transact().state_vector(),
        writer.doc.transact().state_vector()
    );
    // Still a member: a change reaches it.
    writer
        .edit_and_send(|txn, items| {
            items.insert(txn, "after", item_prelim("ruler", &json!({"name": ""})));
        })
        .await;
    read_until(&mut slow, "after").await;
}

/// Past the memory budget, the peer holding the most is closed 1013 and only it: a reader of
/// a quieter session that also stopped reading, and a reader that keeps up, are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_budget_the_costliest_reader_is_closed_first_and_the_others_served() {
    let mut config = burst_config();
    config.max_memory = 4 << 20;
    // No catch-up: the readers' queues grow until the budget acts.
    config.catch_up_bytes = config.max_queue_bytes;
    let server = TestServer::start_with(config, Arc::new(MemoryStore::new())).await;
    let (mut loud_writer, _) = YClient::join(&server, "/yjs/loud").await;
    let (mut quiet_writer, _) = YClient::join(&server, "/yjs/quiet").await;
    let (mut costly, _) = YClient::join(&server, "/yjs/loud").await;
    let (mut quiet, _) = YClient::join(&server, "/yjs/quiet").await;
    let (mut keeping_up, _) = YClient::join(&server, "/yjs/loud").await;

    // The quiet session's reader stops reading with some of its traffic unread.
    for (writer, key) in [(&mut quiet_writer, "q"), (&mut loud_writer, "l")] {
        writer
            .edit_and_send(|txn, items| {
                items.insert(txn, key, item_prelim("ruler", &json!({"name": ""})));
            })
            .await;
    }
    let small = "q".repeat(4 * 1024);
    for round in 0..50 {
        quiet_writer
            .edit_and_send(|txn, items| {
                set_fields(
                    txn,
                    items,
                    "q",
                    &[("name", json!(format!("{round}:{small}")))],
                );
            })
            .await;
    }
    quiet_writer.sync().await;

    // The costly reader reads again once the server shed it (it would not get its close
    // frame through a full socket otherwise).
    let addr = server.addr;
    let shed = tokio::spawn(async move {
        tokio::time::timeout(PATIENCE, async {
            while budget_at(addr).await["shed"] == 0 {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the budget shed a connection");
        close_code(&mut costly.ws).await
    });
    // The loud session: far more than the budget, read by one reader only.
    let reader = tokio::spawn(async move {
        read_until(&mut keeping_up, "loud-last").await;
        keeping_up
    });
    let big = "l".repeat(256 * 1024);
    for round in 0..128 {
        loud_writer
            .edit_and_send(|txn, items| {
                set_fields(
                    txn,
                    items,
                    "l",
                    &[("name", json!(format!("{round}:{big}")))],
                );
            })
            .await;
    }
    loud_writer
        .edit_and_send(|txn, items| {
            items.insert(txn, "loud-last", item_prelim("ruler", &json!({"name": ""})));
        })
        .await;
    loud_writer.sync().await;

    assert_eq!(shed.await.unwrap(), 1013);
    let keeping_up = reader.await.unwrap();
    assert_eq!(doc_items(&keeping_up.doc), doc_items(&loud_writer.doc));
    let used = budget(&server).await;
    assert_eq!(used["shed"], 1, "only the costliest was shed: {used}");
    read_until(&mut quiet, "q").await;
    quiet.sync().await;
    assert_eq!(doc_items(&quiet.doc), doc_items(&quiet_writer.doc));
}

/// An HTTP update whose body would pass what is left of the budget is answered 503 and
/// changes nothing; one that fits is applied.
#[tokio::test]
async fn an_http_body_over_the_budget_is_answered_503() {
    let mut config = test_config();
    config.max_memory = 1 << 20;
    let server = TestServer::start_with(config, Arc::new(MemoryStore::new())).await;
    let (mut client, _) = YClient::join(&server, "/yjs/posted").await;
    client
        .edit_and_send(|txn, items| {
            items.insert(txn, "a", item_prelim("ruler", &json!({"name": ""})));
        })
        .await;
    client.sync().await;

    let huge = edit(&yrs::Doc::new(), |txn, items| {
        items.insert(
            txn,
            "huge",
            item_prelim("ruler", &json!({"name": "h".repeat(2 << 20)})),
        );
    });
    let (status, _) = server.post("/api/sessions/posted/update", &huge).await;
    assert_eq!(status, 503);
    assert!(!scene_by_uuid(&server.scene("posted").await).contains_key("huge"));

    let small = edit(&yrs::Doc::new(), |txn, items| {
        items.insert(txn, "small", item_prelim("ruler", &json!({"name": ""})));
    });
    let (status, body) = server.post("/api/sessions/posted/update", &small).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    read_until(&mut client, "small").await;
    assert_eq!(
        budget(&server).await["used_bytes"],
        0,
        "the bodies were given back"
    );
}
