//! Durability (PROTOCOL §6): what the server stored survives a restart and a `kill -9`, a
//! session is loaded once however many clients arrive together, eviction never loses an edit
//! nor runs two copies of a session, the stored log is compacted, a corrupt stored session
//! fails alone, and an unusable data directory stops the binary with a message naming it.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use optiverse_collab::config::{Config, StoreKind};
use optiverse_collab::store::memory::MemoryStore;
use optiverse_collab::store::{SessionMeta, Store, StoreFuture, StoredSession};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;
use yrs::sync::{Message as YMessage, SyncMessage};
use yrs::types::ToJson;
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{Any, Doc, In, Map as _, MapPrelim, Out, ReadTxn, StateVector, Transact, Update};

// ---------------------------------------------------------------------------------------------
// Support
// ---------------------------------------------------------------------------------------------

/// The in-process test config with the embedded store in `dir`.
fn sqlite_config(dir: &Path) -> Config {
    let mut config = test_config();
    config.store = StoreKind::Sqlite;
    config.data_dir = dir.to_path_buf();
    config
}

/// An in-process server on the store `config` names (the embedded one in its data dir).
async fn start_sqlite(config: Config) -> TestServer {
    let store = optiverse_collab::open_store(&config).expect("the store opens");
    TestServer::start_with(config, store).await
}

/// Shuts the server down gracefully and drops it with its store.
async fn stop(mut server: TestServer) {
    server.shutdown().await;
}

/// The database file of the embedded store, opened beside the server.
fn open_db(dir: &Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(dir.join("collab.db")).expect("collab.db opens");
    conn.busy_timeout(PATIENCE).unwrap();
    conn
}

/// Rows stored for a session: (kind, byte length), in log order.
fn stored_rows(dir: &Path, session: &str) -> Vec<(String, usize)> {
    let conn = open_db(dir);
    let mut query = conn
        .prepare("SELECT kind, length(data) FROM updates WHERE session = ?1 ORDER BY id")
        .unwrap();
    let rows = query
        .query_map([session], |row| Ok((row.get(0)?, row.get(1)?)))
        .unwrap()
        .collect::<rusqlite::Result<Vec<(String, usize)>>>()
        .unwrap();
    rows
}

/// A scene's items keyed by uuid, whole (as a client rebuilds them from a full state).
fn items_by_uuid(state: &Value) -> BTreeMap<String, Value> {
    state["items"]
        .as_array()
        .unwrap_or_else(|| panic!("a scene with items: {state}"))
        .iter()
        .map(|item| (item["uuid"].as_str().unwrap().to_owned(), item.clone()))
        .collect()
}

/// `x_mm` of an item as a number.
fn x_of(item: &Value) -> f64 {
    item["x_mm"]
        .as_f64()
        .unwrap_or_else(|| panic!("an x_mm: {item}"))
}

/// The document served by `GET /api/sessions/{s}/update`, applied to a fresh yrs document:
/// its state vector and its `items` as JSON.
async fn v1_state(addr: SocketAddr, session: &str) -> (StateVector, Any) {
    let (status, body) = http(addr, "GET", &format!("/api/sessions/{session}/update"), &[]).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let doc = Doc::new();
    let items = doc.get_or_insert_map("items");
    doc.transact_mut()
        .apply_update(Update::decode_v1(&body).expect("a v1 update"))
        .expect("the update applies");
    let txn = doc.transact();
    assert!(
        txn.store().pending_update().is_none(),
        "the served update is self-contained"
    );
    (txn.state_vector(), items.to_json(&txn))
}

/// The scene JSON from `GET /api/sessions/{s}/scene` on any address.
async fn scene_at(addr: SocketAddr, session: &str) -> Value {
    let (status, body) = http(addr, "GET", &format!("/api/sessions/{session}/scene"), &[]).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).unwrap()
}

/// `GET /health` as JSON (asserting 200).
async fn health(addr: SocketAddr) -> Value {
    let (status, body) = http(addr, "GET", "/health", &[]).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).unwrap()
}

/// Polls `/health` until `field` equals `value`. Used where the server offers no event to
/// await (a session leaving memory, connections being registered); bounded by PATIENCE.
async fn await_health(addr: SocketAddr, field: &str, value: u64) {
    let result = tokio::time::timeout(PATIENCE, async {
        loop {
            if health(addr).await[field] == value {
                return;
            }
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let last = health(addr).await;
    assert!(
        result.is_ok(),
        "/health {field} never reached {value}: {last}"
    );
}

/// Closes a client connection and reads until the server has closed it too.
async fn close_client(mut ws: Ws) {
    let _ = ws.close(None).await;
    let _ = tokio::time::timeout(PATIENCE, async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

/// A y-websocket frame.
fn y_frame(msg: YMessage) -> Message {
    Message::binary(msg.encode_v1())
}

/// The next sync message on a Yjs connection (awareness and others skipped).
async fn recv_sync(ws: &mut Ws) -> SyncMessage {
    loop {
        let bytes = recv_binary(ws).await;
        if let YMessage::Sync(sync) = YMessage::decode_v1(&bytes).expect("a y-websocket message") {
            return sync;
        }
    }
}

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

// ---------------------------------------------------------------------------------------------
// 1. Restart
// ---------------------------------------------------------------------------------------------

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
    let mut yjs = server.connect(&format!("/yjs/{session}")).await;
    let ydoc = Doc::new();
    let yitems = ydoc.get_or_insert_map("items");
    let SyncMessage::SyncStep1(server_sv) = recv_sync(&mut yjs).await else {
        panic!("the server starts with SyncStep1");
    };
    let lacking = ydoc.transact().encode_state_as_update_v1(&server_sv);
    yjs.send(y_frame(YMessage::Sync(SyncMessage::SyncStep2(lacking))))
        .await
        .unwrap();
    let own_sv = ydoc.transact().state_vector();
    yjs.send(y_frame(YMessage::Sync(SyncMessage::SyncStep1(own_sv))))
        .await
        .unwrap();
    loop {
        if let SyncMessage::SyncStep2(update) = recv_sync(&mut yjs).await {
            ydoc.transact_mut()
                .apply_update(Update::decode_v1(&update).unwrap())
                .unwrap();
            break;
        }
    }
    let (_, u3, _) = &fixtures[3];
    let before = ydoc.transact().state_vector();
    {
        let mut txn = ydoc.transact_mut();
        let Some(Out::YMap(item)) = yitems.get(&txn, u3) else {
            panic!("{u3} synced to the Yjs client");
        };
        item.insert(&mut txn, "x_mm", 42.5);
        yitems.insert(
            &mut txn,
            "yjs-item-1",
            MapPrelim::from([
                ("item_type", In::from("text")),
                ("item_uuid", In::from("yjs-item-1")),
                ("x_mm", In::from(5.0)),
                ("y_mm", In::from(6.0)),
                ("text", In::from("written by yrs")),
            ]),
        );
    }
    let update = ydoc.transact().encode_state_as_update_v1(&before);
    yjs.send(y_frame(YMessage::Sync(SyncMessage::Update(update))))
        .await
        .unwrap();
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

// ---------------------------------------------------------------------------------------------
// The real binary as a child process
// ---------------------------------------------------------------------------------------------

enum ChildEvent {
    Listening(SocketAddr),
    Eof,
}

/// The server binary running as a child process; killed (SIGKILL) when dropped.
struct ChildServer {
    child: Child,
    /// Everything it wrote on stdout and stderr.
    output: Arc<Mutex<String>>,
    events: mpsc::UnboundedReceiver<ChildEvent>,
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Removes ANSI escape sequences (the log may be coloured).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The address of a `listening addr=...` log line.
fn listening_addr(line: &str) -> Option<SocketAddr> {
    let line = strip_ansi(line);
    if !line.contains("listening") {
        return None;
    }
    let rest = &line[line.find("addr=")? + "addr=".len()..];
    rest.split_whitespace().next()?.parse().ok()
}

fn forward_output(
    stream: impl Read + Send + 'static,
    output: Arc<Mutex<String>>,
    events: mpsc::UnboundedSender<ChildEvent>,
) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut line = Vec::new();
        while reader.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
            let text = String::from_utf8_lossy(&line).into_owned();
            output.lock().unwrap().push_str(&text);
            if let Some(addr) = listening_addr(&text) {
                let _ = events.send(ChildEvent::Listening(addr));
            }
            line.clear();
        }
        let _ = events.send(ChildEvent::Eof);
    });
}

impl ChildServer {
    /// Starts the binary with `args` (stdout and stderr captured).
    fn spawn(args: &[&str]) -> ChildServer {
        let mut child = Command::new(env!("CARGO_BIN_EXE_optiverse-collab"))
            .args(args)
            .env("NO_COLOR", "1")
            .env_remove("COLLAB_LOG")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the server binary starts");
        let output = Arc::new(Mutex::new(String::new()));
        let (tx, events) = mpsc::unbounded_channel();
        forward_output(child.stdout.take().unwrap(), output.clone(), tx.clone());
        forward_output(child.stderr.take().unwrap(), output.clone(), tx);
        ChildServer {
            child,
            output,
            events,
        }
    }

    /// Starts the server on the embedded store in `dir`, on a free loopback port, and
    /// returns it once it logged its address.
    async fn start(dir: &Path, fsync: &str) -> (ChildServer, SocketAddr) {
        let dir = dir.to_str().unwrap();
        let mut server = ChildServer::spawn(&[
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--store",
            "sqlite",
            "--data-dir",
            dir,
            "--fsync",
            fsync,
            "--log-level",
            "info",
        ]);
        // The first event is the address, or the end of an output stream (it exited).
        let addr = match tokio::time::timeout(PATIENCE, server.events.recv()).await {
            Ok(Some(ChildEvent::Listening(addr))) => Some(addr),
            _ => None,
        };
        let addr = addr.unwrap_or_else(|| {
            panic!(
                "the server never logged `listening addr=`; its output:\n{}",
                server.output.lock().unwrap()
            )
        });
        (server, addr)
    }

    /// Waits until the process closed both output streams (it exited), then its status.
    async fn exit_status(&mut self) -> ExitStatus {
        let mut eofs = 0;
        let ended = tokio::time::timeout(PATIENCE, async {
            while eofs < 2 {
                match self.events.recv().await {
                    Some(ChildEvent::Eof) | None => eofs += 1,
                    Some(ChildEvent::Listening(_)) => {}
                }
            }
        })
        .await;
        assert!(
            ended.is_ok(),
            "the server did not exit; its output:\n{}",
            self.output.lock().unwrap()
        );
        self.child.wait().unwrap()
    }

    /// SIGKILL, and reap it.
    fn kill(&mut self) {
        self.child.kill().expect("kill -9");
        self.child.wait().unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// 2. kill -9 loses nothing any client received
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
    let (mut server, mut addr) = ChildServer::start(dir.path(), "normal").await;
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
        let (next, next_addr) = ChildServer::start(dir.path(), fsync).await;
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
// 3. Single-flight loading
// ---------------------------------------------------------------------------------------------

/// A memory store that counts loads and holds every load until the gate opens.
struct GatedStore {
    inner: MemoryStore,
    loads: watch::Sender<usize>,
    gate: watch::Sender<bool>,
}

impl GatedStore {
    fn new() -> GatedStore {
        GatedStore {
            inner: MemoryStore::new(),
            loads: watch::channel(0).0,
            gate: watch::channel(true).0,
        }
    }
}

impl Store for GatedStore {
    fn load(&self, session: &str) -> StoreFuture<'_, Option<StoredSession>> {
        self.loads.send_modify(|n| *n += 1);
        let mut gate = self.gate.subscribe();
        let session = session.to_owned();
        Box::pin(async move {
            let _ = gate.wait_for(|open| *open).await;
            self.inner.load(&session).await
        })
    }

    fn append(
        &self,
        session: &str,
        updates: Vec<Vec<u8>>,
        meta: SessionMeta,
    ) -> StoreFuture<'_, u64> {
        self.inner.append(session, updates, meta)
    }

    fn compact(
        &self,
        session: &str,
        snapshot: Vec<u8>,
        upto: u64,
        meta: SessionMeta,
    ) -> StoreFuture<'_, ()> {
        self.inner.compact(session, snapshot, upto, meta)
    }

    fn flush(&self) -> StoreFuture<'_, ()> {
        self.inner.flush()
    }
}

/// A desktop client's scene built from what it received (PROTOCOL §3.3).
fn apply_to_model(model: &mut BTreeMap<String, Value>, msg: &Value) {
    match msg["type"].as_str().unwrap() {
        "sync:full_state" => *model = items_by_uuid(&msg["state"]),
        "command" => {
            let command = &msg["command"];
            let uuid = command["item_id"].as_str().unwrap().to_owned();
            match command["action"].as_str().unwrap() {
                "remove_item" => {
                    model.remove(&uuid);
                }
                "move_item" => {
                    if let Some(item) = model.get_mut(&uuid) {
                        for key in ["x_mm", "y_mm", "angle_deg"] {
                            item[key] = command["data"][key].clone();
                        }
                    }
                }
                _ => {
                    model.insert(uuid, command["data"].clone());
                }
            }
        }
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_clients_arriving_together_load_the_session_once() {
    let store = Arc::new(GatedStore::new());
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
    let loads_before = *store.loads.borrow();
    assert_eq!(loads_before, 1);

    // Twenty clients connect while the load is held.
    store.gate.send_replace(false);
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
    let mut loads = store.loads.subscribe();
    tokio::time::timeout(PATIENCE, loads.wait_for(|n| *n > loads_before))
        .await
        .expect("the session starts loading")
        .unwrap();
    await_health(server.addr, "connections", 20).await;
    store.gate.send_replace(true);

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
        *store.loads.borrow(),
        loads_before + 1,
        "loaded exactly once"
    );

    let scene = items_by_uuid(&server.scene(session).await);
    assert_eq!(scene.len(), 23);
    let everyone: BTreeSet<&str> = names.iter().map(String::as_str).collect();
    for (name, seen) in names.iter().zip(&received) {
        let mut users: BTreeSet<&str> = seen[0]["users"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["user_id"].as_str().unwrap())
            .collect();
        assert!(
            seen.iter().any(|m| m["type"] == "sync:full_state"),
            "{name} got the scene"
        );
        let mut model = BTreeMap::new();
        let folded = fold_fixes(&seen[1..]);
        for msg in &folded {
            if msg["type"] == "user:joined" {
                users.insert(msg["user_id"].as_str().unwrap());
            }
            apply_to_model(&mut model, msg);
        }
        assert_eq!(users, everyone, "{name} knows everyone");
        // The client's own add is not echoed (it has that item locally): compare the rest.
        let own = format!("{name}-item");
        let model: BTreeMap<_, _> = model.iter().map(|(k, v)| (k, normalize(v))).collect();
        let expected: BTreeMap<_, _> = scene
            .iter()
            .filter(|(k, _)| **k != own)
            .map(|(k, v)| (k, normalize(v)))
            .collect();
        assert_eq!(model, expected, "{name}'s scene equals the server's");
    }
    drop(clients);
}

/// PROTOCOL §3.1: `users` lists everyone "in join order", the joiner included, so when many
/// clients join at once (queued behind the load) every ack's list is a prefix of one order
/// and ends with the joiner.
#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn acks_list_users_in_join_order_when_joins_race() {
    let store = Arc::new(GatedStore::new());
    let server = TestServer::start_with(test_config(), store.clone()).await;
    for round in 0..20 {
        let session = format!("order-{round}");
        store.gate.send_replace(false);
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
        store.gate.send_replace(true);
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

// ---------------------------------------------------------------------------------------------
// 4. Eviction racing reconnects
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// 5. Compaction
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stored_log_is_compacted_and_reloads_identically() {
    let dir = tempfile::tempdir().unwrap();
    let session = "compact";
    let server = start_sqlite(sqlite_config(dir.path())).await;
    let (mut alice, _) = server.legacy(session, "alice").await;
    let (item_type, uuid, data) = fixture_item(0);
    send_json(
        &mut alice,
        &command("add_item", &item_type, &uuid, data.clone(), "alice"),
    )
    .await;
    const MOVES: usize = 1200;
    for step in 1..=MOVES {
        let mut moved = data.clone();
        moved["x_mm"] = json!(step as f64 * 0.5);
        send_json(
            &mut alice,
            &command("move_item", &item_type, &uuid, moved, "alice"),
        )
        .await;
    }
    ping_collect(&mut alice).await;

    let rows = stored_rows(dir.path(), session);
    assert!(
        rows.len() < 1000,
        "{} rows stored after {} updates: the log was not compacted",
        rows.len(),
        MOVES + 1
    );
    assert_eq!(rows[0].0, "snapshot", "the log starts with a snapshot");
    assert_eq!(
        rows.iter().filter(|(kind, _)| kind == "snapshot").count(),
        1
    );

    let scene_before = server.scene(session).await;
    assert_eq!(
        items_by_uuid(&scene_before)[&uuid]["x_mm"],
        json!(MOVES as f64 * 0.5)
    );
    let v1_before = v1_state(server.addr, session).await;
    drop(alice);
    stop(server).await;
    // (Whether the compaction at exit already landed is the business of
    // `shutdown_waits_for_the_compaction_at_exit`.)
    let rows = stored_rows(dir.path(), session);
    assert!(rows.len() < 1000 && rows[0].0 == "snapshot", "{rows:?}");

    let server = start_sqlite(sqlite_config(dir.path())).await;
    let scene_after = server.scene(session).await;
    assert_eq!(items_by_uuid(&scene_after), items_by_uuid(&scene_before));
    assert!(scene_after["version"].as_u64() >= scene_before["version"].as_u64());
    let v1_after = v1_state(server.addr, session).await;
    assert_eq!(v1_after, v1_before);
    stop(server).await;
}

/// A memory store whose compactions take a while (a slow disk), counting them.
#[derive(Default)]
struct SlowCompactionStore {
    inner: MemoryStore,
    started: std::sync::atomic::AtomicUsize,
    finished: watch::Sender<usize>,
}

impl Store for SlowCompactionStore {
    fn load(&self, session: &str) -> StoreFuture<'_, Option<StoredSession>> {
        self.inner.load(session)
    }

    fn append(
        &self,
        session: &str,
        updates: Vec<Vec<u8>>,
        meta: SessionMeta,
    ) -> StoreFuture<'_, u64> {
        self.inner.append(session, updates, meta)
    }

    fn compact(
        &self,
        session: &str,
        snapshot: Vec<u8>,
        upto: u64,
        meta: SessionMeta,
    ) -> StoreFuture<'_, ()> {
        self.started.fetch_add(1, Ordering::SeqCst);
        let session = session.to_owned();
        Box::pin(async move {
            // The store's own latency, not a wait for anything in the test.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let result = self.inner.compact(&session, snapshot, upto, meta).await;
            self.finished.send_modify(|n| *n += 1);
            result
        })
    }

    fn flush(&self) -> StoreFuture<'_, ()> {
        self.inner.flush()
    }
}

/// Adds fixture item 0 as `user`, moves it `moves` times, and waits until all is applied;
/// returns the item's uuid.
async fn add_then_move(ws: &mut Ws, user: &str, moves: usize) -> String {
    let (item_type, uuid, data) = fixture_item(0);
    send_json(
        ws,
        &command("add_item", &item_type, &uuid, data.clone(), user),
    )
    .await;
    for step in 0..moves {
        let mut moved = data.clone();
        moved["x_mm"] = json!(step as f64 + 0.5);
        send_json(ws, &command("move_item", &item_type, &uuid, moved, user)).await;
    }
    ping_collect(ws).await;
    uuid
}

/// `Server::shutdown` "waits for sessions and the store": a session's last write (its
/// compaction as it leaves memory) is done when it returns, so the next server on the same
/// data never races it (and the process does not exit in the middle of it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_the_compaction_at_exit() {
    let store = Arc::new(SlowCompactionStore::default());
    let mut server = TestServer::start_with(test_config(), store.clone()).await;
    let (mut alice, _) = server.legacy("slow", "alice").await;
    add_then_move(&mut alice, "alice", 5).await;
    close_client(alice).await;
    server.shutdown().await;
    let started = store.started.load(Ordering::SeqCst);
    let finished = *store.finished.borrow();
    assert!(
        started >= 1,
        "the session compacted its log as it left memory"
    );
    assert_eq!(
        finished, started,
        "Server::shutdown returned while a session's compaction was still running"
    );
}

/// A session that leaves memory compacts its log; a client arriving meanwhile gets a new
/// session task that loads the log and appends to it. The old task's compaction must not
/// replace what its successor stored (here the store is slow to apply the compaction, as
/// it is when the old task takes a while to encode a large document after leaving the
/// registry and before calling `compact`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicted_sessions_compaction_never_erases_what_its_successor_stored() {
    let store = Arc::new(SlowCompactionStore::default());
    let mut config = test_config();
    config.evict_after = Duration::from_millis(50);
    let server = TestServer::start_with(config, store.clone()).await;
    let (mut alice, _) = server.legacy("succession", "alice").await;
    let uuid = add_then_move(&mut alice, "alice", 5).await;
    close_client(alice).await;
    // The session left memory; its compaction is under way.
    await_health(server.addr, "sessions", 0).await;

    let (mut bob, _) = server.legacy("succession", "bob").await;
    let (item_type, bobs, data) = fixture_item(1);
    send_json(
        &mut bob,
        &command("add_item", &item_type, &bobs, data, "bob"),
    )
    .await;
    ping_collect(&mut bob).await;
    close_client(bob).await;

    // Once every compaction finished and the session left memory, reload it.
    let mut finished = store.finished.subscribe();
    let all_done = tokio::time::timeout(
        PATIENCE,
        finished.wait_for(|n| *n >= store.started.load(Ordering::SeqCst)),
    )
    .await
    .is_ok();
    assert!(all_done, "compactions finish");
    await_health(server.addr, "sessions", 0).await;
    let scene = items_by_uuid(&server.scene("succession").await);
    assert!(scene.contains_key(&uuid), "{scene:?}");
    assert!(
        scene.contains_key(&bobs),
        "bob's item (acknowledged by a pong, so stored) was erased by the previous session's \
         compaction: {:?}",
        scene.keys()
    );
}

// ---------------------------------------------------------------------------------------------
// 6. A corrupt stored session
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// 7. An unusable data directory
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
