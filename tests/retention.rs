//! `--retain-days`: the server deletes stored sessions nobody wrote to for that long.
//! (Which sessions a sweep deletes is tested on each store; here, that the server sweeps.)

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{test_config, HookStore, StoreHook, StoreOp, TestServer};
use optiverse_collab::store::{SessionMeta, Store};
use tokio::sync::mpsc;

/// Reports each finished retention sweep.
struct Sweeps(mpsc::UnboundedSender<()>);

impl StoreHook for Sweeps {
    fn after(&self, op: StoreOp) {
        if op == StoreOp::RemoveUntouched {
            let _ = self.0.send(());
        }
    }
}

#[tokio::test]
async fn the_server_sweeps_at_start_and_a_deleted_session_reads_as_missing() {
    let (tx, mut sweeps) = mpsc::unbounded_channel();
    let store = Arc::new(HookStore::new(Sweeps(tx)));
    store
        .append("abandoned", vec![vec![0, 0]], SessionMeta::default())
        .await
        .unwrap();
    let mut config = test_config();
    // Zero days: every stored session not in memory is past it.
    config.retain_days = Some(Duration::ZERO);
    let server = TestServer::start_with(config, store.clone()).await;
    tokio::time::timeout(common::PATIENCE, sweeps.recv())
        .await
        .expect("a sweep at start")
        .expect("the hook reports it");
    assert!(!store.contains("abandoned").await.unwrap());
    let (status, _) = server.get("/api/sessions/abandoned/scene").await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn without_the_flag_nothing_is_swept() {
    let (tx, mut sweeps) = mpsc::unbounded_channel();
    let store = Arc::new(HookStore::new(Sweeps(tx)));
    store
        .append("kept", vec![vec![0, 0]], SessionMeta::default())
        .await
        .unwrap();
    let server = TestServer::start_with(test_config(), store.clone()).await;
    // A request through the server proves it started; no sweep has run by then or after.
    let (status, _) = server.get("/api/sessions/kept/scene").await;
    assert_eq!(status, 200);
    assert!(sweeps.try_recv().is_err());
    assert!(store.contains("kept").await.unwrap());
}
