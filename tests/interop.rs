//! Interop with the real Yjs client: the scripts in `tests/interop/` (Node, `yjs` +
//! `y-websocket` providers) run against an in-process server, some of them side by side with an
//! Optiverse JSON client driven from here.
//!
//! Needs Node.js (>= 18) and the packages pinned in `tests/interop/package-lock.json`:
//! `npm ci --prefix tests/interop`. Without them these tests fail; they never skip.

mod common;

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

/// Bound on one script run (each script bounds itself at 120 s and its waits at 20 s).
const SCRIPT_PATIENCE: Duration = Duration::from_secs(180);

/// The values `mixed_session.mjs` writes.
const MIXED_MOVED_X_MM: f64 = 123.25;
const MIXED_NEW_NAME: &str = "Renamed by Yjs";

fn interop_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/interop")
}

/// Fails (never skips) unless the pinned packages are installed.
fn require_node_modules() {
    let dir = interop_dir();
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(dir.join("package.json")).expect("tests/interop/package.json"),
    )
    .expect("tests/interop/package.json is JSON");
    let deps = manifest["dependencies"]
        .as_object()
        .expect("dependencies in tests/interop/package.json");
    for (name, pinned) in deps {
        let installed = dir.join("node_modules").join(name).join("package.json");
        let version = std::fs::read(&installed)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|v| v["version"].as_str().map(str::to_owned));
        match version {
            Some(v) if Some(v.as_str()) == pinned.as_str() => {}
            Some(v) => panic!(
                "tests/interop/node_modules/{name} is {v}, but {pinned} is pinned: \
                 run `npm ci --prefix tests/interop`"
            ),
            None => panic!(
                "the Node packages of the interop tests are not installed \
                 ({} is missing): run `npm ci --prefix tests/interop` (needs Node.js >= 18 and npm)",
                installed.display()
            ),
        }
    }
}

/// A running interop script whose output is collected in the background.
struct Script {
    name: String,
    child: Child,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<String>>,
}

/// What a finished script did.
struct ScriptOutput {
    name: String,
    status: Option<ExitStatus>,
    stdout: String,
    stderr: String,
}

impl ScriptOutput {
    fn report(&self) -> String {
        format!(
            "node {} exited with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.name,
            self.status
                .map_or_else(|| "nothing (killed)".to_owned(), |s| s.to_string()),
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }

    fn assert_success(&self) {
        assert!(
            self.status.is_some_and(|s| s.success()),
            "{}",
            self.report()
        );
        println!("{}", self.report());
    }
}

fn collect(pipe: Option<impl AsyncReadExt + Unpin + Send + 'static>) -> Option<JoinHandle<String>> {
    pipe.map(|mut pipe| {
        tokio::spawn(async move {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes).await;
            String::from_utf8_lossy(&bytes).into_owned()
        })
    })
}

impl Script {
    /// Starts `node NAME SERVER_URL SESSION EXTRA...` in `tests/interop/`.
    fn start(server: &TestServer, name: &str, session: &str, extra: &[String]) -> Script {
        require_node_modules();
        let mut child = Command::new("node")
            .arg(name)
            .arg(format!("ws://{}", server.addr))
            .arg(session)
            .args(extra)
            .current_dir(interop_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run `node` (Node.js >= 18 is required for the interop tests): {e}")
            });
        Script {
            name: name.to_owned(),
            stdout: collect(child.stdout.take()),
            stderr: collect(child.stderr.take()),
            child,
        }
    }

    /// Waits for the script to exit (killing it past SCRIPT_PATIENCE).
    async fn finish(mut self) -> ScriptOutput {
        let status = match tokio::time::timeout(SCRIPT_PATIENCE, self.child.wait()).await {
            Ok(status) => Some(status.expect("waiting for node")),
            Err(_) => {
                let _ = self.child.kill().await;
                None
            }
        };
        self.output(status).await
    }

    /// Kills the script (for a test that failed while it ran) and returns its output.
    async fn kill(mut self) -> ScriptOutput {
        let _ = self.child.kill().await;
        self.output(None).await
    }

    async fn output(&mut self, status: Option<ExitStatus>) -> ScriptOutput {
        let text = |h: Option<JoinHandle<String>>| async move {
            match h {
                Some(h) => h.await.unwrap_or_default(),
                None => String::new(),
            }
        };
        ScriptOutput {
            name: self.name.clone(),
            status,
            stdout: text(self.stdout.take()).await,
            stderr: text(self.stderr.take()).await,
        }
    }
}

/// Runs a script to its end and asserts it succeeded.
async fn run_script(server: &TestServer, name: &str, session: &str, extra: &[String]) {
    Script::start(server, name, session, extra)
        .finish()
        .await
        .assert_success();
}

/// The next JSON message, or `None` after PATIENCE (or when the connection ends).
async fn next_json(ws: &mut Ws) -> Option<Value> {
    loop {
        let msg = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .ok()??
            .ok()?;
        match msg {
            Message::Text(text) => return serde_json::from_str(&text).ok(),
            Message::Close(_) => return None,
            _ => continue,
        }
    }
}

/// Runs a script of Yjs providers with an Optiverse JSON client in the session, then checks
/// that the JSON client's canvas, built from what it received, equals the scene.
async fn providers_with_json_observer(script: &str, session: &str) {
    let server = TestServer::start().await;
    let (mut observer, _ack) = server.settled(session, "observer").await;
    run_script(&server, script, session, &[]).await;
    let mut canvas = Canvas::default();
    for msg in ping_collect(&mut observer).await {
        canvas.apply(&msg);
    }
    let scene = server.scene(session).await;
    assert!(
        !scene["items"].as_array().unwrap().is_empty(),
        "the script left no items: {scene}"
    );
    canvas.assert_shows(&scene_by_uuid(&scene), "the JSON client");
}

#[tokio::test]
async fn two_providers_converge() {
    providers_with_json_observer("two_providers.mjs", "interop-two").await;
}

#[tokio::test]
async fn five_providers_random_edits_converge_and_late_joiner_matches() {
    providers_with_json_observer("five_providers_random.mjs", "interop-five").await;
}

#[tokio::test]
async fn awareness_between_providers() {
    let server = TestServer::start().await;
    let (mut observer, _ack) = server.legacy("interop-awareness", "observer").await;
    run_script(&server, "awareness.mjs", "interop-awareness", &[]).await;
    // The providers connected with ?user=, so the JSON client saw them come and go.
    let events: Vec<(String, String)> = ping_collect(&mut observer)
        .await
        .iter()
        .filter(|m| m["type"] == "user:joined" || m["type"] == "user:left")
        .map(|m| {
            (
                m["type"].as_str().unwrap().to_owned(),
                m["user_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for user in ["alice", "bob", "carol"] {
        for kind in ["user:joined", "user:left"] {
            assert!(
                events.contains(&(kind.to_owned(), user.to_owned())),
                "no {kind} for {user}: {events:?}"
            );
        }
    }
}

/// `{"uuid":U,"item_type":T,"data":{...}}` as `mixed_session.mjs` takes it.
fn item_arg(item_type: &str, uuid: &str, data: &Value) -> String {
    json!({"uuid": uuid, "item_type": item_type, "data": data}).to_string()
}

#[tokio::test]
async fn mixed_session_json_client_and_yjs_providers() {
    let session = "interop-mixed";
    let server = TestServer::start().await;
    let (mut alice, _ack) = server.settled(session, "alice").await;
    let (type1, uuid1, data1) = fixture_item(1);
    let (type2, uuid2, data2) = fixture_item(0);
    assert_ne!(uuid1, uuid2);
    send_json(
        &mut alice,
        &command("add_item", &type1, &uuid1, data1.clone(), "alice"),
    )
    .await;
    assert_eq!(ping_collect(&mut alice).await, Vec::<Value>::new());

    let mut moved2 = data2.clone();
    moved2["x_mm"] = json!(777.5);
    moved2["y_mm"] = json!(-1.5);
    moved2["angle_deg"] = json!(30.0);
    let script = Script::start(
        &server,
        "mixed_session.mjs",
        session,
        &[
            item_arg(&type1, &uuid1, &data1),
            item_arg(&type2, &uuid2, &moved2),
        ],
    );

    // What alice receives while the Yjs client edits, up to the removal.
    let mut received = Vec::new();
    loop {
        let Some(msg) = next_json(&mut alice).await else {
            let output = script.kill().await;
            panic!(
                "alice got no remove_item for {uuid1}; she received: {received:#?}\n{}",
                output.report()
            );
        };
        let done = msg["type"] == "command" && msg["command"]["action"] == "remove_item";
        received.push(msg);
        if done {
            break;
        }
    }
    // Alice adds item 2 and drags it; the script waits for both to reach its document.
    send_json(
        &mut alice,
        &command("add_item", &type2, &uuid2, data2.clone(), "alice"),
    )
    .await;
    send_json(
        &mut alice,
        &command("move_item", &type2, &uuid2, moved2.clone(), "alice"),
    )
    .await;
    script.finish().await.assert_success();

    // Joined, then one command per change, each with the item's whole current fields.
    let kinds: Vec<String> = received
        .iter()
        .map(|m| match m["type"].as_str().unwrap() {
            "command" => m["command"]["action"].as_str().unwrap().to_owned(),
            other => format!("{other} {}", m["user_id"].as_str().unwrap_or("")),
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "user:joined yjs-editor",
            "update_item",
            "update_item",
            "remove_item"
        ],
        "{received:#?}"
    );
    let mut expected = data1.as_object().unwrap().clone();
    expected.insert("item_type".into(), json!(type1));
    for (i, msg) in received[1..].iter().enumerate() {
        assert_eq!(msg["user_id"], "yjs-editor", "{msg}");
        let cmd = &msg["command"];
        assert_eq!(cmd["item_id"], json!(uuid1), "{msg}");
        assert_eq!(cmd["item_type"], json!(type1), "{msg}");
        match i {
            0 => expected.insert("x_mm".into(), json!(MIXED_MOVED_X_MM)),
            1 => expected.insert("name".into(), json!(MIXED_NEW_NAME)),
            _ => {
                assert_eq!(cmd["data"], json!({}), "{msg}");
                continue;
            }
        };
        assert_same(
            &cmd["data"],
            &Value::Object(expected.clone()),
            &msg.to_string(),
        );
    }

    // The providers are gone: alice hears the named one leave, and nothing else.
    let after = ping_collect(&mut alice).await;
    assert_eq!(
        after
            .iter()
            .map(|m| (m["type"].as_str().unwrap(), m["user_id"].as_str()))
            .collect::<Vec<_>>(),
        [("user:left", Some("yjs-editor"))],
        "{after:#?}"
    );
    let scene = scene_by_uuid(&server.scene(session).await);
    assert_eq!(scene.keys().collect::<Vec<_>>(), [&uuid2]);
    let mut expected2 = normalize(&moved2);
    expected2["item_type"] = json!(type2);
    assert_same(&scene[&uuid2], &expected2, "scene");
}

#[tokio::test]
async fn http_update_with_yjs_client() {
    let session = "interop-http";
    let posted = "9c4f1e2a-5b6d-4e7f-8a9b-0c1d2e3f4a5b";
    let server = TestServer::start().await;
    let (mut alice, _ack) = server.settled(session, "alice").await;
    for i in 0..4 {
        let (item_type, uuid, data) = fixture_item(i);
        send_json(
            &mut alice,
            &command("add_item", &item_type, &uuid, data, "alice"),
        )
        .await;
    }
    assert_eq!(ping_collect(&mut alice).await, Vec::<Value>::new());

    run_script(&server, "http_update.mjs", session, &[posted.to_owned()]).await;

    // Alice heard of both POSTs as changes by "api": the new item, then its move.
    let received = ping_collect(&mut alice).await;
    let commands: Vec<(&str, &str, &str)> = received
        .iter()
        .filter(|m| m["type"] == "command")
        .map(|m| {
            (
                m["command"]["action"].as_str().unwrap(),
                m["command"]["item_id"].as_str().unwrap(),
                m["user_id"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        commands,
        [
            ("add_item", posted, "api"),
            // A "source" is built on a placeholder by the upstream client: its add_item is
            // followed by an update_item with the same data.
            ("update_item", posted, "api"),
            ("update_item", posted, "api")
        ],
        "{received:#?}"
    );
    assert_eq!(
        fold_fixes(&received).len(),
        received.len() - 1,
        "{received:#?}"
    );
    let moved = &received.iter().rfind(|m| m["type"] == "command").unwrap()["command"];
    assert_eq!(moved["item_type"], "source");
    assert_eq!(moved["data"]["x_mm"].as_f64(), Some(75.125));
    assert_eq!(moved["data"]["name"], "Posted source");
    assert_eq!(
        server.scene(session).await["items"]
            .as_array()
            .unwrap()
            .len(),
        5
    );
}
