//! The durability suites' support: servers on the embedded store, what it stored, and the
//! document and scene a server serves.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use futures_util::StreamExt;
use optiverse_collab::config::{Config, StoreKind};
use serde_json::Value;
use yrs::types::ToJson;
use yrs::{Any, ReadTxn, StateVector, Transact};

use super::{doc_from, http, items, test_config, TestServer, Ws, PATIENCE};

/// The in-process test config with the embedded store in `dir`.
pub fn sqlite_config(dir: &Path) -> Config {
    let mut config = test_config();
    config.store = StoreKind::Sqlite;
    config.data_dir = dir.to_path_buf();
    config
}

/// An in-process server on the store `config` names (the embedded one in its data dir).
pub async fn start_sqlite(config: Config) -> TestServer {
    let store = optiverse_collab::open_store(&config).expect("the store opens");
    TestServer::start_with(config, store).await
}

/// Shuts the server down gracefully and drops it with its store.
pub async fn stop(mut server: TestServer) {
    server.shutdown().await;
}

/// The database file of the embedded store, opened beside the server.
pub fn open_db(dir: &Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(dir.join("collab.db")).expect("collab.db opens");
    conn.busy_timeout(PATIENCE).unwrap();
    conn
}

/// Rows stored for a session: (kind, byte length), in log order.
pub fn stored_rows(dir: &Path, session: &str) -> Vec<(String, usize)> {
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
pub fn items_by_uuid(state: &Value) -> BTreeMap<String, Value> {
    state["items"]
        .as_array()
        .unwrap_or_else(|| panic!("a scene with items: {state}"))
        .iter()
        .map(|item| (item["uuid"].as_str().unwrap().to_owned(), item.clone()))
        .collect()
}

/// `x_mm` of an item as a number.
pub fn x_of(item: &Value) -> f64 {
    item["x_mm"]
        .as_f64()
        .unwrap_or_else(|| panic!("an x_mm: {item}"))
}

/// The document served by `GET /api/sessions/{s}/update`, applied to a fresh yrs document:
/// its state vector and its `items` as JSON.
pub async fn v1_state(addr: SocketAddr, session: &str) -> (StateVector, Any) {
    let (status, body) = http(addr, "GET", &format!("/api/sessions/{session}/update"), &[]).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    // `doc_from` asserts the served update is self-contained.
    let doc = doc_from(&body);
    let items = items(&doc);
    let txn = doc.transact();
    (txn.state_vector(), items.to_json(&txn))
}

/// The scene JSON from `GET /api/sessions/{s}/scene` on any address.
pub async fn scene_at(addr: SocketAddr, session: &str) -> Value {
    let (status, body) = http(addr, "GET", &format!("/api/sessions/{session}/scene"), &[]).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).unwrap()
}

/// Closes a client connection and reads until the server has closed it too.
pub async fn close_client(mut ws: Ws) {
    let _ = ws.close(None).await;
    let _ = tokio::time::timeout(PATIENCE, async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}
