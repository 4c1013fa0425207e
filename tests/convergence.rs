//! Convergence of legacy Optiverse clients (PROTOCOL §3.3): clients modelled exactly as the
//! desktop client applies messages (`add_item` always creates a new object, `update_item`
//! replaces all fields, `move_item` sets the position, `sync:full_state` clears and rebuilds
//! except on the host) must end, once quiet, with scenes equal to the server's document and
//! without duplicate objects, whatever the interleaving of their concurrent commands.

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

/// An Optiverse client as PROTOCOL §3.3 describes it, with its incoming messages held in a
/// queue it applies whenever the test decides (imitating network delay).
struct ModelClient {
    name: String,
    sink: SplitSink<Ws, Message>,
    inbox: mpsc::UnboundedReceiver<Value>,
    is_host: bool,
    /// The canvas: a list, so a wrongly sent `add_item` shows up as a duplicate.
    objects: Vec<(String, Map<String, Value>)>,
    added: usize,
}

impl ModelClient {
    async fn join(server: &TestServer, session: &str, name: &str) -> ModelClient {
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
            is_host: false,
            objects: Vec::new(),
            added: 0,
        };
        let ack = client.next().await;
        assert_eq!(ack["type"], "connection:ack");
        client.is_host = ack["is_host"].as_bool().unwrap();
        client
    }

    async fn next(&mut self) -> Value {
        tokio::time::timeout(PATIENCE, self.inbox.recv())
            .await
            .expect("a message in time")
            .expect("connection open")
    }

    /// Applies one received message the way the desktop client does.
    fn apply(&mut self, msg: &Value) {
        match msg["type"].as_str() {
            Some("command") => {
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
            Some("sync:full_state") if !self.is_host => {
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
            }
            Some("error") => panic!("{} got an error: {msg}", self.name),
            _ => {}
        }
    }

    /// Applies up to `n` of the messages that already arrived.
    fn apply_arrived(&mut self, n: usize) {
        for _ in 0..n {
            match self.inbox.try_recv() {
                Ok(msg) => self.apply(&msg),
                Err(_) => return,
            }
        }
    }

    /// Sends `ping` and applies everything up to its `pong`: once it returns, the server has
    /// applied everything this client sent.
    async fn barrier(&mut self) {
        self.send(json!({"type": "ping"})).await;
        loop {
            let msg = self.next().await;
            if msg["type"] == "pong" {
                return;
            }
            self.apply(&msg);
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
/// that a client defers applying what arrived before its next edit. A late joiner comes in
/// halfway.
async fn converge(seed: u64, clients: usize, edits: usize, hold_back: f64) {
    let server = TestServer::start().await;
    let session = format!("converge-{seed}");
    let mut models = Vec::new();
    for i in 0..clients {
        models.push(ModelClient::join(&server, &session, &format!("c{i}")).await);
    }
    assert!(models[0].is_host);
    let run = |mut model: ModelClient, seed: u64, edits: usize| async move {
        let mut rng = Rng(seed | 1);
        for _ in 0..edits {
            if !rng.chance(hold_back) {
                let n = rng.below(8);
                model.apply_arrived(n);
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
    // The desktop client rebuilds its canvas from the full state that follows the ack before
    // its user can edit anything; a full state applied after local adds would wipe them, on
    // the real client too.
    let mut late = ModelClient::join(&server, &session, "late").await;
    late.barrier().await;
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
    // second, every client received everything those commands caused.
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

/// Sets up a session where A and B both hold item `u1` (name L1, z_value 0).
async fn two_clients_with_one_item(
    server: &TestServer,
    session: &str,
) -> (ModelClient, ModelClient, Value) {
    let mut a = ModelClient::join(server, session, "A").await;
    let data = json!({"_type": "component", "item_uuid": "u1", "name": "L1", "z_value": 0, "x_mm": 0.0, "y_mm": 0.0, "angle_deg": 0.0});
    let mut local = data.as_object().unwrap().clone();
    local.insert("item_type".into(), json!("component"));
    a.objects.push(("u1".into(), local));
    a.send(command("add_item", "component", "u1", data.clone(), "A"))
        .await;
    a.barrier().await;
    let mut b = ModelClient::join(server, session, "B").await;
    b.barrier().await;
    assert_eq!(b.uuids(), vec!["u1".to_owned()], "B got the full state");
    a.barrier().await;
    (a, b, data)
}

async fn assert_all_converged(
    server: &TestServer,
    session: &str,
    models: &mut [&mut ModelClient],
) -> BTreeMap<String, Value> {
    for _ in 0..2 {
        for model in models.iter_mut() {
            model.barrier().await;
        }
    }
    let expected = scene_by_uuid(&server.scene(session).await);
    for model in models.iter() {
        assert_eq!(model.scene(), expected, "{} diverged", model.name);
    }
    expected
}

#[tokio::test]
async fn stale_dict_does_not_revert_a_concurrent_rename() {
    let server = TestServer::start().await;
    let (mut a, mut b, _) = two_clients_with_one_item(&server, "stale-1").await;
    // A renames; the server applies it and sends it to B, which has not read it yet.
    let mut renamed = a.fields_of("u1").unwrap();
    renamed.insert("name".into(), json!("L2"));
    a.set_local("u1", &renamed);
    a.send_command("update_item", "u1", Value::Object(renamed))
        .await;
    a.barrier().await;
    // B's whole dict still says L1 and changes z_value.
    let mut stale = b.fields_of("u1").unwrap();
    stale.insert("z_value".into(), json!(5));
    b.set_local("u1", &stale);
    b.send_command("update_item", "u1", Value::Object(stale))
        .await;
    let scene = assert_all_converged(&server, "stale-1", &mut [&mut a, &mut b]).await;
    assert_eq!(scene["u1"]["name"], "L2");
    assert_eq!(scene["u1"]["z_value"], 5);
}

#[tokio::test]
async fn stale_dict_does_not_revert_a_rename_that_arrives_later() {
    let server = TestServer::start().await;
    let (mut a, mut b, _) = two_clients_with_one_item(&server, "stale-2").await;
    // B changes z_value first; A's rename, from a dict that predates it, arrives after.
    let mut b_dict = b.fields_of("u1").unwrap();
    b_dict.insert("z_value".into(), json!(5));
    b.set_local("u1", &b_dict);
    b.send_command("update_item", "u1", Value::Object(b_dict))
        .await;
    b.barrier().await;
    let mut a_dict = a.fields_of("u1").unwrap();
    assert_eq!(a_dict["z_value"], 0, "A has not applied B's change yet");
    a_dict.insert("name".into(), json!("L2"));
    a.set_local("u1", &a_dict);
    a.send_command("update_item", "u1", Value::Object(a_dict))
        .await;
    let scene = assert_all_converged(&server, "stale-2", &mut [&mut a, &mut b]).await;
    assert_eq!(scene["u1"]["name"], "L2");
    assert_eq!(scene["u1"]["z_value"], 5);
}

#[tokio::test]
async fn two_edits_back_to_back_while_a_correction_is_in_flight() {
    let server = TestServer::start().await;
    let (mut a, mut b, _) = two_clients_with_one_item(&server, "in-flight").await;
    let mut renamed = a.fields_of("u1").unwrap();
    renamed.insert("name".into(), json!("L2"));
    a.set_local("u1", &renamed);
    a.send_command("update_item", "u1", Value::Object(renamed))
        .await;
    a.barrier().await;
    // B edits twice without reading: the first edit earns a correction that is still in
    // flight when the second is sent.
    let mut dict = b.fields_of("u1").unwrap();
    dict.insert("z_value".into(), json!(5));
    b.set_local("u1", &dict);
    b.send_command("update_item", "u1", Value::Object(dict.clone()))
        .await;
    dict.insert("x_mm".into(), json!(42.5));
    b.set_local("u1", &dict);
    b.send_command("move_item", "u1", Value::Object(dict.clone()))
        .await;
    dict.insert("locked".into(), json!(true));
    b.set_local("u1", &dict);
    b.send_command("update_item", "u1", Value::Object(dict))
        .await;
    let scene = assert_all_converged(&server, "in-flight", &mut [&mut a, &mut b]).await;
    assert_eq!(scene["u1"]["name"], "L2");
    assert_eq!(scene["u1"]["z_value"], 5);
    assert_eq!(scene["u1"]["x_mm"], 42.5);
    assert_eq!(scene["u1"]["locked"], true);
}

#[tokio::test]
async fn an_edit_crossing_a_removal_is_answered_with_remove_item() {
    let server = TestServer::start().await;
    let (mut a, mut b, _) = two_clients_with_one_item(&server, "crossing-remove").await;
    a.objects.clear();
    a.send_command("remove_item", "u1", json!({})).await;
    a.barrier().await;
    let mut dict = b.fields_of("u1").unwrap();
    dict.insert("x_mm".into(), json!(10.0));
    b.set_local("u1", &dict);
    b.send_command("move_item", "u1", Value::Object(dict)).await;
    let scene = assert_all_converged(&server, "crossing-remove", &mut [&mut a, &mut b]).await;
    assert!(
        scene.is_empty(),
        "the removed item stays removed: {scene:?}"
    );
}
