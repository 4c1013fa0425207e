//! Convergence of legacy Optiverse clients (PROTOCOL §3.3): clients modelled exactly as the
//! desktop client behaves (`add_item` always creates a new object, `update_item` replaces
//! all fields, `move_item` sets the position, `sync:full_state` clears and rebuilds except on
//! a fork host; the role comes from the client's dialog: a host uploads its canvas on every
//! `user:joined`, a client asks for the scene and adds nothing before it got it; the
//! `update_item`s of the placeholder compensation are applied with what they follow) must
//! end, once quiet, with scenes equal to the server's document and without duplicate
//! objects, whatever the interleaving of their concurrent commands. (Chosen cases, without a
//! socket: `core/tests/session_convergence.rs`.)

mod common;
/// The fuzz scenarios' helpers (only `scene_difference` is used here).
#[allow(dead_code)]
#[path = "../fuzz/src/scenarios/util.rs"]
mod util;

use std::collections::BTreeMap;

use common::*;
use futures_util::stream::{SplitSink, StreamExt};
use futures_util::SinkExt;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

/// A small deterministic PRNG (xorshift64*), so a failing seed can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next() % 10_000) as f64 / 10_000.0 < p
    }
    fn coordinate(&mut self) -> f64 {
        (self.below(2000) as f64) / 4.0 - 250.0
    }
}

/// How a desktop client acts: its role comes from its connect dialog, not from the server
/// (`../shared/optiverse-client/README.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// "Host server": keeps its canvas and uploads it on every `user:joined` (its own, which
    /// comes before the ack, included); on the ack the upstream variant sends `sync:request`,
    /// the fork uploads again. The fork ignores full states.
    Host { fork: bool },
    /// "Connect to server": starts empty, sends `sync:request` on the ack, and sends no
    /// `add_item` before it got a full state.
    Client,
}

/// An Optiverse desktop client as it really behaves (PROTOCOL §3.3 and the summary in
/// `../shared/optiverse-client/README.md`), with its incoming messages held in a queue it
/// applies whenever the test decides (imitating network delay). The `update_item`s that
/// follow an `add_item` or a full state in the same write (the placeholder compensation)
/// are applied with it, as the client applies the frames of one read back to back.
struct ModelClient {
    name: String,
    sink: SplitSink<Ws, Message>,
    inbox: mpsc::UnboundedReceiver<Value>,
    role: Role,
    /// `initial_sync_complete`: set by a full state (a host starts with it).
    synced: bool,
    /// The canvas: a list, so a wrongly sent `add_item` shows up as a duplicate.
    objects: Vec<(String, Map<String, Value>)>,
    added: usize,
}

impl ModelClient {
    async fn join(server: &TestServer, session: &str, name: &str, role: Role) -> ModelClient {
        let ws = server.connect(&format!("/ws/{session}/{name}")).await;
        let (sink, mut stream) = ws.split();
        let (tx, inbox) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(Ok(msg)) = stream.next().await {
                if let Message::Text(text) = msg {
                    if tx
                        .send(serde_json::from_str::<Value>(&text).unwrap())
                        .is_err()
                    {
                        break;
                    }
                }
            }
        });
        let mut client = ModelClient {
            name: name.to_owned(),
            sink,
            inbox,
            role,
            synced: role != Role::Client,
            objects: Vec::new(),
            added: 0,
        };
        // `user:joined` naming itself comes first: a host uploads its canvas on it.
        let joined = client.next().await;
        assert_eq!(joined["type"], "user:joined", "{joined}");
        assert_eq!(joined["user_id"], name, "{joined}");
        if matches!(role, Role::Host { .. }) {
            client.upload().await;
        }
        let ack = client.next().await;
        assert_eq!(ack["type"], "connection:ack", "{ack}");
        match role {
            Role::Host { fork: true } => client.upload().await,
            _ => client.send(json!({"type": "sync:request"})).await,
        }
        client
    }

    async fn next(&mut self) -> Value {
        tokio::time::timeout(PATIENCE, self.inbox.recv())
            .await
            .expect("a message in time")
            .expect("connection open")
    }

    /// The host's `sync:full_state` upload of its whole canvas.
    async fn upload(&mut self) {
        let items: Vec<Value> = self
            .objects
            .iter()
            .map(|(uuid, fields)| {
                let mut item = fields.clone();
                item.insert("item_uuid".into(), json!(uuid));
                item.insert("uuid".into(), json!(uuid));
                Value::Object(item)
            })
            .collect();
        let name = self.name.clone();
        self.send(json!({"type": "sync:full_state", "state": {"items": items},
                         "target_user": "someone", "user_id": name}))
            .await;
    }

    /// Applies one `command` the way the desktop client does.
    fn apply_command(&mut self, msg: &Value) {
        let command = &msg["command"];
        let uuid = command["item_id"].as_str().unwrap().to_owned();
        let data = command["data"].as_object().cloned().unwrap_or_default();
        match command["action"].as_str().unwrap() {
            "add_item" => self.objects.push((uuid, data)),
            "move_item" => {
                for (_, fields) in self.objects.iter_mut().filter(|(u, _)| *u == uuid) {
                    for key in ["x_mm", "y_mm", "angle_deg"] {
                        if let Some(v) = data.get(key) {
                            fields.insert(key.to_owned(), v.clone());
                        }
                    }
                }
            }
            "update_item" => {
                for (_, fields) in self.objects.iter_mut().filter(|(u, _)| *u == uuid) {
                    *fields = data.clone();
                }
            }
            "remove_item" => self.objects.retain(|(u, _)| *u != uuid),
            other => panic!("unknown action {other}"),
        }
    }

    /// Reads the `update_item`s that must follow `msg` in the same write (the placeholder
    /// compensation), checking them; returns them.
    async fn fixes_after(&mut self, msg: &Value) -> Vec<Value> {
        let due = match msg["type"].as_str() {
            Some("command") => usize::from(
                msg["command"]["action"] == "add_item"
                    && is_placeholder(&msg["command"]["item_type"]),
            ),
            Some("sync:full_state") => msg["state"]["items"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|item| is_placeholder(&item["item_type"]))
                .count(),
            _ => 0,
        };
        let mut batch = vec![msg.clone()];
        for _ in 0..due {
            batch.push(self.next().await);
        }
        assert_eq!(fold_fixes(&batch).len(), 1, "{}: {batch:#?}", self.name);
        batch.split_off(1)
    }

    /// Applies one received message (and what comes with it) the way the desktop client
    /// does.
    async fn apply(&mut self, msg: Value) {
        match msg["type"].as_str() {
            Some("command") => {
                let fixes = self.fixes_after(&msg).await;
                self.apply_command(&msg);
                for fix in &fixes {
                    self.apply_command(fix);
                }
            }
            Some("sync:full_state") => {
                let fixes = self.fixes_after(&msg).await;
                if self.role != (Role::Host { fork: true }) {
                    self.objects = msg["state"]["items"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|item| {
                            let mut fields = item.as_object().unwrap().clone();
                            let uuid = fields.remove("uuid").unwrap().as_str().unwrap().to_owned();
                            (uuid, fields)
                        })
                        .collect();
                    self.synced = true;
                }
                for fix in &fixes {
                    self.apply_command(fix);
                }
            }
            Some("user:joined") if matches!(self.role, Role::Host { .. }) => {
                self.upload().await;
            }
            Some("error") => panic!("{} got an error: {msg}", self.name),
            _ => {}
        }
    }

    /// Applies up to `n` of the messages that already arrived.
    async fn apply_arrived(&mut self, n: usize) {
        for _ in 0..n {
            match self.inbox.try_recv() {
                Ok(msg) => self.apply(msg).await,
                Err(_) => return,
            }
        }
    }

    /// Sends `ping` and applies everything up to its `pong`: once it returns, the server has
    /// applied everything this client sent before the ping.
    async fn barrier(&mut self) {
        self.send(json!({"type": "ping"})).await;
        loop {
            let msg = self.next().await;
            if msg["type"] == "pong" {
                return;
            }
            self.apply(msg).await;
        }
    }

    async fn send(&mut self, msg: Value) {
        self.sink
            .send(Message::text(msg.to_string()))
            .await
            .unwrap();
    }

    async fn send_command(&mut self, action: &str, uuid: &str, data: Value) {
        let item_type = data
            .get("item_type")
            .and_then(Value::as_str)
            .unwrap_or("component")
            .to_owned();
        let name = self.name.clone();
        self.send(command(action, &item_type, uuid, data, &name))
            .await;
    }

    fn uuids(&self) -> Vec<String> {
        let mut uuids: Vec<String> = self.objects.iter().map(|(u, _)| u.clone()).collect();
        uuids.sort();
        uuids.dedup();
        uuids
    }

    fn fields_of(&self, uuid: &str) -> Option<Map<String, Value>> {
        self.objects
            .iter()
            .find(|(u, _)| u == uuid)
            .map(|(_, f)| f.clone())
    }

    /// One random local edit, applied locally first and then sent, as the desktop does.
    async fn random_edit(&mut self, rng: &mut Rng) {
        let uuids = self.uuids();
        let roll = rng.below(100);
        if uuids.is_empty() || roll < 20 {
            if !self.synced {
                // The desktop client would keep it local and never send it.
                return;
            }
            let (item_type, _, mut data) = fixture_item(rng.below(64));
            self.added += 1;
            let uuid = format!("{}-{}", self.name, self.added);
            data["item_uuid"] = json!(uuid);
            data["x_mm"] = json!(rng.coordinate());
            data["y_mm"] = json!(rng.coordinate());
            let mut local = data.as_object().unwrap().clone();
            local.insert("item_type".into(), json!(item_type));
            self.objects.push((uuid.clone(), local));
            self.send(command(
                "add_item",
                &item_type,
                &uuid,
                data,
                &self.name.clone(),
            ))
            .await;
            return;
        }
        let uuid = uuids[rng.below(uuids.len())].clone();
        let mut fields = self.fields_of(&uuid).unwrap();
        match roll {
            20..=54 => {
                fields.insert("x_mm".into(), json!(rng.coordinate()));
                fields.insert("y_mm".into(), json!(rng.coordinate()));
                if rng.chance(0.3) {
                    fields.insert("angle_deg".into(), json!(rng.below(360) as f64));
                }
                self.set_local(&uuid, &fields);
                let drag = rng.chance(0.5);
                self.send_command("move_item", &uuid, Value::Object(fields.clone()))
                    .await;
                if drag {
                    self.send_command("update_item", &uuid, Value::Object(fields))
                        .await;
                }
            }
            55..=89 => {
                match rng.below(4) {
                    0 => fields.insert(
                        "name".into(),
                        json!(format!("{} {}", self.name, rng.below(1000))),
                    ),
                    1 => fields.insert("z_value".into(), json!(rng.below(20))),
                    2 => fields.insert("locked".into(), json!(rng.chance(0.5))),
                    _ => fields.insert("notes".into(), json!(format!("note {}", rng.below(1000)))),
                };
                self.set_local(&uuid, &fields);
                self.send_command("update_item", &uuid, Value::Object(fields))
                    .await;
            }
            _ => {
                self.objects.retain(|(u, _)| *u != uuid);
                let item_type = fields
                    .get("item_type")
                    .cloned()
                    .unwrap_or(json!("component"));
                let name = self.name.clone();
                self.send(command(
                    "remove_item",
                    item_type.as_str().unwrap(),
                    &uuid,
                    json!({}),
                    &name,
                ))
                .await;
            }
        }
    }

    fn set_local(&mut self, uuid: &str, fields: &Map<String, Value>) {
        for (_, f) in self.objects.iter_mut().filter(|(u, _)| u == uuid) {
            *f = fields.clone();
        }
    }

    /// The client's scene, normalised like [`scene_by_uuid`], asserting no duplicates.
    fn scene(&self) -> BTreeMap<String, Value> {
        let mut scene = BTreeMap::new();
        for (uuid, fields) in &self.objects {
            let previous = scene.insert(uuid.clone(), normalize(&Value::Object(fields.clone())));
            assert!(
                previous.is_none(),
                "{} holds two objects for {uuid}",
                self.name
            );
        }
        scene
    }
}

/// Runs `clients` model clients making `edits` random edits each; `hold_back` is the chance
/// that a client defers applying what arrived before its next edit. The first client hosts
/// (the fork variant for odd seeds), the others connect as clients; a late joiner comes in
/// halfway (and the host uploads its canvas, as it is, when it hears of it).
async fn converge(seed: u64, clients: usize, edits: usize, hold_back: f64) {
    let server = TestServer::start().await;
    let session = format!("converge-{seed}");
    let mut models = Vec::new();
    for i in 0..clients {
        let role = if i == 0 {
            Role::Host {
                fork: seed % 2 == 1,
            }
        } else {
            Role::Client
        };
        models.push(ModelClient::join(&server, &session, &format!("c{i}"), role).await);
    }
    let run = |mut model: ModelClient, seed: u64, edits: usize| async move {
        let mut rng = Rng(seed | 1);
        for _ in 0..edits {
            if !rng.chance(hold_back) {
                let n = rng.below(8);
                model.apply_arrived(n).await;
            }
            model.random_edit(&mut rng).await;
            if rng.chance(0.3) {
                tokio::task::yield_now().await;
            }
        }
        model
    };
    let mut tasks: Vec<_> = models
        .drain(..)
        .enumerate()
        .map(|(i, m)| tokio::spawn(run(m, seed * 31 + i as u64, edits / 2)))
        .collect();
    // The desktop client rebuilds its canvas from the full state it asked for before its user
    // can edit anything; a full state applied after local adds would wipe them, on the real
    // client too.
    let mut late = ModelClient::join(&server, &session, "late", Role::Client).await;
    late.barrier().await;
    assert!(late.synced, "the late joiner got the scene");
    tasks.push(tokio::spawn(run(late, seed * 131, edits / 2)));
    let mut second_half = Vec::new();
    for (i, task) in tasks.into_iter().enumerate() {
        second_half.push(tokio::spawn(run(
            task.await.unwrap(),
            seed * 17 + i as u64,
            edits / 2,
        )));
    }
    let mut models = Vec::new();
    for task in second_half {
        models.push(task.await.unwrap());
    }
    // Two barrier rounds: after the first, the server applied every command; after the
    // second, every client received everything those commands caused (an upload a host sends
    // on applying a `user:joined` in the first round is applied before its second ping).
    for _ in 0..2 {
        for model in &mut models {
            model.barrier().await;
        }
    }
    let expected = scene_by_uuid(&server.scene(&session).await);
    assert!(!expected.is_empty());
    for model in &models {
        let scene = model.scene();
        if scene != expected {
            panic!(
                "seed {seed}: {} diverged; {}",
                model.name,
                util::scene_difference(&scene, &expected)
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_clients_converge_on_random_concurrent_edits() {
    for seed in 1..=3 {
        converge(seed, 3, 200, 0.0).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_converge_with_messages_held_back() {
    for seed in 10..=12 {
        converge(seed, 3, 200, 0.8).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_clients_converge_with_long_delays() {
    converge(99, 4, 300, 0.95).await;
}

/// A longer soak: `CONVERGENCE_SEEDS=200 cargo test --release --test convergence -- --ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak run, minutes long"]
async fn soak_many_seeds() {
    let extra: u64 = std::env::var("CONVERGENCE_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    for seed in 1000..1000 + extra {
        let hold_back = [0.0, 0.5, 0.9, 0.99][(seed % 4) as usize];
        converge(seed, 2 + (seed % 4) as usize, 200, hold_back).await;
    }
}
