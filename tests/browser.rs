//! The browser pages in real Chromium: `tests/browser/view.test.mjs` (Node, `playwright-core`
//! driving Debian's `chromium` headless) against an in-process server. It opens every fixture's
//! live view and checks that each item is drawn where the document says, moves an item from a
//! desktop-protocol client and sees the drawing follow, sees joiners and leavers in the people
//! list, drags an item in the page and sees a desktop client get it, checks the dashboard (with a
//! session that is only in the store, listed without being loaded), saves screenshots under
//! `target/screenshots/`, and measures (never asserts) a 1,000-item bench's render time and how
//! smooth drags stay.
//!
//! Needs Chromium (`apt-get install -y chromium`; `CHROMIUM` names another binary), Node.js and
//! the packages pinned in `tests/browser/package-lock.json` (`npm ci --prefix tests/browser`).
//! Without any of them this test fails; it never skips.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use common::{ping_collect, send_json, test_config, TestServer};
use optiverse_collab::config::Config;
use optiverse_collab::store::memory::MemoryStore;
use optiverse_collab::store::Store;
use serde_json::{json, Value};
use tokio::process::Command;

/// Bound on the whole browser run (it takes ~20 s; each of its waits is bounded at 20 s).
const RUN_PATIENCE: Duration = Duration::from_secs(300);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn chromium() -> PathBuf {
    let path = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        path.is_file(),
        "Chromium is required for the browser tests and {} does not exist: \
         `apt-get install -y chromium` (Debian), or set CHROMIUM to the browser binary",
        path.display()
    );
    path
}

/// Fails unless the pinned packages are installed (as tests/interop.rs does).
fn require_node_modules(dir: &Path) {
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(dir.join("package.json")).expect("tests/browser/package.json"),
    )
    .expect("tests/browser/package.json is JSON");
    for (name, pinned) in manifest["dependencies"].as_object().expect("dependencies") {
        let installed = dir.join("node_modules").join(name).join("package.json");
        let version = std::fs::read(&installed)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|v| v["version"].as_str().map(str::to_owned));
        assert_eq!(
            version.as_deref(),
            pinned.as_str(),
            "tests/browser/node_modules/{name} is not the pinned version: \
             run `npm ci --prefix tests/browser` (needs Node.js >= 18 and npm)"
        );
    }
}

/// The session the browser test expects in the store but not in memory, and its fixture.
const STORED_ONLY: &str = "stored-only-bench";
const STORED_ONLY_FIXTURE: &str = "two_mirror_steering";

/// A fixture's items.
fn fixture(name: &str) -> Vec<Value> {
    let path = repo().join(format!("../shared/fixtures/{name}.scene.json"));
    let scene: Value = serde_json::from_slice(
        &std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .expect("a fixture is JSON");
    scene["items"]
        .as_array()
        .cloned()
        .expect("a fixture's items")
}

/// Stores `session` with a fixture's items through a server of its own, which then stops: a
/// server started on `store` afterwards has the session in its store and not in memory.
async fn store_session(store: &Arc<dyn Store>, session: &str, fixture_name: &str) {
    let mut writer = TestServer::start_with(test_config(), store.clone()).await;
    let (mut host, _ack) = writer.legacy(session, "host").await;
    let items = fixture(fixture_name);
    send_json(
        &mut host,
        &json!({"type": "sync:full_state", "state": {"items": items}}),
    )
    .await;
    ping_collect(&mut host).await; // applied, hence stored
    writer.shutdown().await;
}

async fn get_json(server: &TestServer, path: &str) -> Value {
    let (status, body) = server.get(path).await;
    assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn ids(list: &Value) -> Vec<&str> {
    list.as_array()
        .expect("a list")
        .iter()
        .filter_map(|s| s["id"].as_str())
        .collect()
}

#[tokio::test]
async fn the_store_listing_shows_stored_sessions_without_loading_them() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    store_session(&store, "kept", "single_lens_focus").await;
    let mut server = TestServer::start_with(test_config(), store).await;

    let listed = get_json(&server, "/api/store/sessions").await;
    assert_eq!(ids(&listed["sessions"]), ["kept"]);
    let kept = &listed["sessions"][0];
    assert!(kept["stored_bytes"].as_u64().unwrap() > 100, "{kept}");
    let changed = kept["last_change"].as_str().expect("a last change");
    let now = listed["now"].as_str().expect("the server's clock");
    assert!(changed <= now, "{changed} is after {now}");
    // Listing loaded nothing.
    assert!(ids(&get_json(&server, "/api/sessions").await).is_empty());
    assert_eq!(get_json(&server, "/health").await["sessions"], 0);

    // Once opened it is in memory too, with the same stored facts until it changes.
    let (_joiner, _ack, _state) = server.joiner("kept", "ada").await;
    assert_eq!(ids(&get_json(&server, "/api/sessions").await), ["kept"]);
    let again = get_json(&server, "/api/store/sessions").await;
    assert_eq!(again["sessions"][0]["last_change"], kept["last_change"]);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_view_and_dashboard_in_chromium() {
    run_view_test(test_config(), "", "target/screenshots").await;
}

/// The same pages and checks on a server that needs tokens, every URL (the pages', their
/// assets', the WebSockets', the API's) behind an admin token's `/t/{token}` prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_view_and_dashboard_in_chromium_behind_a_token_prefix() {
    use collab_core::session::Role;
    use optiverse_collab::auth::{Keys, MintRequest};
    const KEY: &str = "the browser test's key, thirty-two bytes or more";
    let mut config = test_config();
    config.key.auth_key = Some(optiverse_collab::config::Secret::new(KEY));
    let data = tempfile::tempdir().unwrap();
    config.data_dir = data.path().to_path_buf();
    let request = MintRequest {
        session: "*".into(),
        role: Role::Admin,
        user: None,
        ttl: Duration::from_secs(3600),
    };
    let keys = Keys::new(KEY.as_bytes()).unwrap();
    let token = keys.mint(&request, std::time::SystemTime::now()).unwrap().0;
    run_view_test(
        config,
        &format!("/t/{token}"),
        "target/screenshots/behind-token",
    )
    .await;
}

/// Runs `tests/browser/view.test.mjs` against a server with `config`, its base URL ending in
/// `prefix`; screenshots go to `out_dir` (under the repository).
async fn run_view_test(config: Config, prefix: &str, out_dir: &str) {
    let dir = repo().join("tests/browser");
    let chromium = chromium();
    require_node_modules(&dir);
    let fixtures = repo().join("../shared/fixtures");
    assert!(
        fixtures.is_dir(),
        "the scene fixtures are missing: {}",
        fixtures.display()
    );
    let out_dir = repo().join(out_dir);

    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    store_session(&store, STORED_ONLY, STORED_ONLY_FIXTURE).await;
    let mut server = TestServer::start_with(config, store).await;
    let child = Command::new("node")
        .arg(dir.join("view.test.mjs"))
        .current_dir(&dir)
        .env("BASE_URL", format!("http://{}{prefix}", server.addr))
        .env("FIXTURES", &fixtures)
        .env("OUT_DIR", &out_dir)
        .env("CHROMIUM", &chromium)
        .env("STORED_ONLY", STORED_ONLY)
        .env(
            "STORED_ONLY_ITEMS",
            fixture(STORED_ONLY_FIXTURE).len().to_string(),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node runs (Node.js is required for the browser tests)");
    let output = tokio::time::timeout(RUN_PATIENCE, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("the browser test did not finish within {RUN_PATIENCE:?}"))
        .expect("node's output");
    server.shutdown().await;

    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(
        output.status.success(),
        "the browser test failed ({}); its report is above",
        output.status
    );
    // The script prints its own "N passed, 0 failed": a run that checked nothing is a failure.
    assert!(
        stdout
            .lines()
            .any(|l| l.ends_with(" passed, 0 failed") && !l.starts_with("0 passed")),
        "the browser test reported no passed checks"
    );
    for shot in ["mach_zehnder_skeleton.png", "four_f_telescope.png"] {
        assert!(
            out_dir.join(shot).is_file(),
            "screenshot {shot} was not saved"
        );
    }
}
