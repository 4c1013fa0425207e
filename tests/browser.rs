//! The browser pages in real Chromium: `tests/browser/view.test.mjs` (Node, `playwright-core`
//! driving Debian's `chromium` headless) against an in-process server. It opens every fixture's
//! live view and checks that each item is drawn where the document says, moves an item from a
//! desktop-protocol client and sees the drawing follow, sees joiners and leavers in the people
//! list, drags an item in the page and sees a desktop client get it, checks the dashboard, saves
//! screenshots under `target/screenshots/`, and measures (never asserts) a 1,000-item bench's
//! render time and how smooth drags stay.
//!
//! Needs Chromium (`apt-get install -y chromium`; `CHROMIUM` names another binary), Node.js and
//! the packages pinned in `tests/browser/package-lock.json` (`npm ci --prefix tests/browser`).
//! Without any of them this test fails; it never skips.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::TestServer;
use serde_json::Value;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_view_and_dashboard_in_chromium() {
    let dir = repo().join("tests/browser");
    let chromium = chromium();
    require_node_modules(&dir);
    let fixtures = repo().join("../shared/fixtures");
    assert!(
        fixtures.is_dir(),
        "the scene fixtures are missing: {}",
        fixtures.display()
    );
    let out_dir = repo().join("target/screenshots");

    let mut server = TestServer::start().await;
    let child = Command::new("node")
        .arg(dir.join("view.test.mjs"))
        .current_dir(&dir)
        .env("BASE_URL", format!("http://{}", server.addr))
        .env("FIXTURES", &fixtures)
        .env("OUT_DIR", &out_dir)
        .env("CHROMIUM", &chromium)
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
        stdout.lines().any(|l| l.ends_with(" passed, 0 failed")
            && !l.starts_with("0 passed")),
        "the browser test reported no passed checks"
    );
    for shot in ["mach_zehnder_skeleton.png", "four_f_telescope.png"] {
        assert!(
            out_dir.join(shot).is_file(),
            "screenshot {shot} was not saved"
        );
    }
}
