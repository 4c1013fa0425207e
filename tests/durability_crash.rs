//! Durability of the real binary (PROTOCOL §6): `kill -9` loses no change that any client
//! received or had acknowledged, and an unusable data directory stops the binary with a
//! message naming it.

mod common;

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use common::child::ChildServer;
use common::durable::*;
use common::*;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

/// The binary on the embedded store in `dir`, on a free loopback port, once it logged its
/// address.
async fn start_sqlite_child(dir: &Path, fsync: &str) -> (ChildServer, SocketAddr) {
    let dir = dir.to_str().unwrap();
    ChildServer::start(&[
        "--store",
        "sqlite",
        "--data-dir",
        dir,
        "--fsync",
        fsync,
        "--log-level",
        "info",
    ])
    .await
}

// ---------------------------------------------------------------------------------------------
// kill -9 loses nothing any client received
// ---------------------------------------------------------------------------------------------

/// What a client's own items were when it sent a `ping`: once its `pong` arrived, all of it
/// is stored.
#[derive(Debug, Clone, Default)]
struct OwnState {
    live: BTreeMap<String, f64>,
    removed: Vec<String>,
}

/// What one streaming client saw before the server died.
struct Outcome {
    name: String,
    /// Every message received (ack, full state, commands from others, ...), in order.
    received: Vec<Value>,
    /// Its own items as of its last answered ping.
    acked: Option<OwnState>,
    /// How many commands it sent.
    sent: usize,
}

const CRASH_SESSION: &str = "crash";
const LIVE_ITEMS: usize = 3;

/// A client that joined and is ready to stream.
struct Joined {
    name: String,
    ws: Ws,
    received: Vec<Value>,
    own: OwnState,
}

/// Joins the crash session: ack, then everything up to a pong (the full state, if any).
/// The client continues with its own items as the server has them.
async fn join_crash_session(
    addr: SocketAddr,
    name: &str,
    sent_removes: &Mutex<HashSet<String>>,
) -> Joined {
    let url = format!("ws://{addr}/ws/{CRASH_SESSION}/{name}");
    let (mut ws, _) = tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(url))
        .await
        .expect("connects in time")
        .expect("connects");
    let ack = recv_ack(&mut ws, name).await;
    let mut received = vec![ack];
    // As the desktop client does right after the ack.
    send_json(&mut ws, &json!({"type": "sync:request"})).await;
    received.extend(ping_collect(&mut ws).await);
    let mut own = OwnState::default();
    if let Some(full) = received.iter().find(|m| m["type"] == "sync:full_state") {
        let removes = sent_removes.lock().unwrap();
        for (uuid, item) in items_by_uuid(&full["state"]) {
            if uuid.starts_with(&format!("{name}-")) && !removes.contains(&uuid) {
                own.live.insert(uuid, x_of(&item));
            }
        }
    }
    Joined {
        name: name.to_owned(),
        ws,
        received,
        own,
    }
}

/// Streams edits of the client's own items (uuids `{name}-...`, `x_mm` strictly increasing
/// across rounds) until the server dies or `stop` is set, recording what it receives.
async fn stream_until_dead(
    joined: Joined,
    round: usize,
    received_commands: watch::Sender<usize>,
    sent_removes: Arc<Mutex<HashSet<String>>>,
    stop: Arc<AtomicBool>,
) -> Outcome {
    let Joined {
        name,
        ws,
        received,
        own,
    } = joined;
    let (sink, stream) = ws.split();
    let pings: Arc<Mutex<VecDeque<OwnState>>> = Arc::default();
    let (pongs, pongs_seen) = watch::channel(0usize);
    let reader = tokio::spawn(read_until_dead(
        stream,
        received,
        pings.clone(),
        pongs,
        received_commands,
    ));
    let writer = Writer {
        name: &name,
        round,
        pings: &pings,
        pongs: pongs_seen,
        sent_removes: &sent_removes,
        stop: &stop,
    };
    let sent = writer.write_until_dead(sink, own).await;
    let (received, acked) = tokio::time::timeout(PATIENCE, reader)
        .await
        .expect("the connection ends once the server is dead")
        .unwrap();
    Outcome {
        name,
        received,
        acked,
        sent,
    }
}

async fn read_until_dead(
    mut stream: SplitStream<Ws>,
    mut received: Vec<Value>,
    pings: Arc<Mutex<VecDeque<OwnState>>>,
    pongs: watch::Sender<usize>,
    received_commands: watch::Sender<usize>,
) -> (Vec<Value>, Option<OwnState>) {
    let mut acked = None;
    while let Some(Ok(msg)) = stream.next().await {
        let Message::Text(text) = msg else { continue };
        let msg: Value = serde_json::from_str(&text).unwrap();
        if msg["type"] == "pong" {
            acked = pings.lock().unwrap().pop_front();
            pongs.send_modify(|n| *n += 1);
            continue;
        }
        if msg["type"] == "command" {
            received_commands.send_modify(|n| *n += 1);
        }
        received.push(msg);
    }
    (received, acked)
}

/// Commands a client sends between pings; it waits for the pong of the ping before the
/// last, so at most two windows are in flight and the server is never far behind.
const PING_EVERY: usize = 10;

/// The sending half of a streaming client.
struct Writer<'a> {
    name: &'a str,
    round: usize,
    pings: &'a Mutex<VecDeque<OwnState>>,
    pongs: watch::Receiver<usize>,
    sent_removes: &'a Mutex<HashSet<String>>,
    stop: &'a AtomicBool,
}

impl Writer<'_> {
    async fn write_until_dead(
        mut self,
        mut sink: SplitSink<Ws, Message>,
        mut own: OwnState,
    ) -> usize {
        let name = self.name;
        let round = self.round;
        let base = (round as f64 + 1.0) * 1_000_000.0;
        let mut step = 0usize;
        let mut pings_sent = 0usize;
        while !self.stop.load(Ordering::SeqCst) {
            let x = base + step as f64;
            let keys: Vec<String> = own.live.keys().cloned().collect();
            let message = if own.live.len() < LIVE_ITEMS {
                let uuid = format!("{name}-r{round}-{step}");
                own.live.insert(uuid.clone(), x);
                let data = json!({"x_mm": x, "y_mm": 1.5, "angle_deg": 0.0, "name": uuid,
                                  "item_uuid": uuid, "_type": "text", "text": name});
                command("add_item", "text", &uuid, data, name)
            } else if step % 40 == 39 {
                let uuid = keys[step % keys.len()].clone();
                own.live.remove(&uuid);
                own.removed.push(uuid.clone());
                self.sent_removes.lock().unwrap().insert(uuid.clone());
                command("remove_item", "text", &uuid, json!({}), name)
            } else {
                let uuid = keys[step % keys.len()].clone();
                own.live.insert(uuid.clone(), x);
                let action = if step.is_multiple_of(7) {
                    "update_item"
                } else {
                    "move_item"
                };
                let data = json!({"x_mm": x, "y_mm": 1.5, "angle_deg": (step % 360) as f64,
                                  "name": format!("{uuid} @{step}"), "item_uuid": uuid,
                                  "_type": "text", "text": name});
                command(action, "text", &uuid, data, name)
            };
            if sink.send(Message::text(message.to_string())).await.is_err() {
                break;
            }
            step += 1;
            if step.is_multiple_of(PING_EVERY) {
                self.pings.lock().unwrap().push_back(own.clone());
                if sink
                    .send(Message::text(json!({"type": "ping"}).to_string()))
                    .await
                    .is_err()
                {
                    break;
                }
                pings_sent += 1;
                // Fails once the reader is gone (the server died).
                if self.pongs.wait_for(|n| *n + 1 >= pings_sent).await.is_err() {
                    break;
                }
            }
        }
        step
    }
}

/// Checks that the restarted server's scene holds everything a client received or had
/// acknowledged: items only move forward (`x_mm` grows), and a uuid is never reused.
fn assert_nothing_received_was_lost(
    outcomes: &[Outcome],
    scene: &Value,
    sent_removes: &HashSet<String>,
    round: usize,
) {
    let stored = items_by_uuid(scene);
    let present = |uuid: &str, x: f64, what: &str| {
        if sent_removes.contains(uuid) {
            // Its owner removed it; whether that removal was stored is checked where
            // someone received it.
            return;
        }
        let item = stored.get(uuid).unwrap_or_else(|| {
            panic!("round {round}: {uuid} ({what}, x_mm {x}) is missing after kill -9")
        });
        assert!(
            x_of(item) >= x,
            "round {round}: {uuid} ({what}) went back from x_mm {x} to {} after kill -9",
            x_of(item)
        );
    };
    let absent = |uuid: &str, what: &str| {
        assert!(
            !stored.contains_key(uuid),
            "round {round}: {uuid} was removed ({what}) but is back after kill -9"
        );
    };
    for outcome in outcomes {
        let who = &outcome.name;
        for msg in &outcome.received {
            match msg["type"].as_str().unwrap() {
                "sync:full_state" => {
                    for (uuid, item) in items_by_uuid(&msg["state"]) {
                        present(&uuid, x_of(&item), &format!("in {who}'s full state"));
                    }
                }
                "command" => {
                    let command = &msg["command"];
                    let uuid = command["item_id"].as_str().unwrap();
                    let what = format!("{} received by {who}", command["action"]);
                    if command["action"] == "remove_item" {
                        absent(uuid, &what);
                    } else {
                        present(uuid, x_of(&command["data"]), &what);
                    }
                }
                "connection:ack" | "user:joined" | "user:left" => {}
                other => panic!("{who} received an unexpected {other}: {msg}"),
            }
        }
        if let Some(acked) = &outcome.acked {
            for (uuid, x) in &acked.live {
                present(uuid, *x, &format!("acknowledged to {who} by a pong"));
            }
            for uuid in &acked.removed {
                absent(uuid, &format!("acknowledged to {who} by a pong"));
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_change_that_any_client_received() {
    let dir = tempfile::tempdir().unwrap();
    let names: Vec<String> = ["ann", "ben", "cho"].map(String::from).to_vec();
    let sent_removes: Arc<Mutex<HashSet<String>>> = Arc::default();
    // Kill after this many commands were received in the round: a different moment each
    // time, one past the compaction threshold of 1000 updates. Rounds alternate the fsync
    // mode: both must survive kill -9, and the slower one leaves more time in which a
    // broadcast sent before its update is stored could be caught.
    let rounds = [
        (5usize, "normal"),
        (300, "always"),
        (2600, "normal"),
        (20, "always"),
        (150, "normal"),
        (8, "normal"),
    ];
    let (mut server, mut addr) = start_sqlite_child(dir.path(), "normal").await;
    for (round, &(threshold, _)) in rounds.iter().enumerate() {
        let (counter, mut count) = watch::channel(0usize);
        let stop = Arc::new(AtomicBool::new(false));
        let mut joined = Vec::new();
        for name in &names {
            joined.push(join_crash_session(addr, name, &sent_removes).await);
        }
        let clients: Vec<_> = joined
            .into_iter()
            .map(|client| {
                tokio::spawn(stream_until_dead(
                    client,
                    round,
                    counter.clone(),
                    sent_removes.clone(),
                    stop.clone(),
                ))
            })
            .collect();
        // (The `Ref` that `wait_for` returns holds the channel's lock: drop it at once.)
        let reached = matches!(
            tokio::time::timeout(PATIENCE, count.wait_for(|n| *n >= threshold)).await,
            Ok(Ok(_))
        );
        assert!(
            reached,
            "round {round}: {threshold} commands never arrived; server output:\n{}",
            server.output.lock().unwrap()
        );
        server.kill();
        stop.store(true, Ordering::SeqCst);
        let mut outcomes = Vec::new();
        for client in clients {
            let outcome = tokio::time::timeout(PATIENCE, client)
                .await
                .expect("every client stops once the server is dead");
            outcomes.push(outcome.unwrap());
        }
        let received: usize = outcomes.iter().map(|o| o.received.len()).sum();
        let sent: usize = outcomes.iter().map(|o| o.sent).sum();
        assert!(received >= threshold, "round {round}: {received} received");

        let fsync = rounds.get(round + 1).map_or("normal", |r| r.1);
        let (next, next_addr) = start_sqlite_child(dir.path(), fsync).await;
        server = next;
        addr = next_addr;
        let scene = scene_at(addr, CRASH_SESSION).await;
        let removes = sent_removes.lock().unwrap().clone();
        assert_nothing_received_was_lost(&outcomes, &scene, &removes, round);
        eprintln!(
            "round {round}: {sent} commands sent, {received} messages received, {} items stored",
            items_by_uuid(&scene).len()
        );
    }
    // The restarted server still works: a new client joins and edits.
    let url = format!("ws://{addr}/ws/{CRASH_SESSION}/late");
    let (mut late, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let ack = recv_ack(&mut late, "late").await;
    assert_eq!(ack["is_host"], false, "{ack}");
    let (item_type, uuid, data) = fixture_item(0);
    send_json(
        &mut late,
        &command("add_item", &item_type, &uuid, data, "late"),
    )
    .await;
    ping_collect(&mut late).await;
    assert!(items_by_uuid(&scene_at(addr, CRASH_SESSION).await).contains_key(&uuid));
    drop(late);
    drop(server);
}

// ---------------------------------------------------------------------------------------------
// An unusable data directory
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unopenable_data_dir_stops_the_binary_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("regular-file-not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let path = file.to_str().unwrap();
    let mut server = ChildServer::spawn(&[
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--store",
        "sqlite",
        "--data-dir",
        path,
    ]);
    let status = server.exit_status().await;
    let output = server.output.lock().unwrap().clone();
    assert!(!status.success(), "exit status {status}; output:\n{output}");
    assert!(output.contains(path), "the output names {path}:\n{output}");
    assert!(
        !output.contains("listening"),
        "it never listened:\n{output}"
    );
}
