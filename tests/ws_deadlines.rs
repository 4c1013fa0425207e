//! Time limits on what a WebSocket peer controls: a message it started must finish within
//! `--message-timeout` (pings do not extend it; its bytes count in the memory budget and are
//! given back), and on `/ws` only data messages keep a connection from its idle timeout.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use optiverse_collab::store::memory::MemoryStore;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

async fn budget_used(server: &TestServer) -> u64 {
    let (_, body) = server.get("/api/process").await;
    let process: Value = serde_json::from_slice(&body).unwrap();
    process["budget"]["used_bytes"].as_u64().unwrap()
}

/// Polls the budget until `done` holds for what it uses; bounded by PATIENCE.
async fn await_budget(server: &TestServer, done: impl Fn(u64) -> bool) -> u64 {
    tokio::time::timeout(PATIENCE, async {
        loop {
            let used = budget_used(server).await;
            if done(used) {
                return used;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the budget reached the expected use")
}

/// A peer that sends the first fragment of a message and then only pings is closed 1008 at
/// the message deadline; while it held the fragment, its bytes were in the budget twice (what
/// tungstenite holds), and they are given back.
#[tokio::test]
async fn a_message_never_finished_is_closed_at_its_deadline_whatever_the_pings() {
    let mut config = test_config();
    config.message_timeout = Duration::from_millis(500);
    let server = TestServer::start_with(config, Arc::new(MemoryStore::new())).await;
    let mut ws = server.connect("/yjs/partial").await;
    let fragment = Frame::message(
        Bytes::from(vec![0u8; 200 * 1024]),
        OpCode::Data(Data::Binary),
        false,
    );
    ws.send(Message::Frame(fragment)).await.unwrap();
    let held = await_budget(&server, |used| used >= 2 * 200 * 1024).await;
    assert!(held < 2 * 250 * 1024, "{held}");
    let (sink, mut stream) = ws.split();
    let pinger = keep_pinging(sink);
    assert_eq!(close_code_of(&mut stream).await, 1008);
    pinger.abort();
    await_budget(&server, |used| used == 0).await;
}

/// Sends a WebSocket ping every 100 ms until the connection fails.
fn keep_pinging(mut sink: SplitSink<Ws, Message>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if sink.send(Message::Ping(Bytes::new())).await.is_err() {
                return;
            }
        }
    })
}

/// The code of the close frame read from `stream` (skipping what comes before it).
async fn close_code_of(stream: &mut SplitStream<Ws>) -> u16 {
    let close = async {
        loop {
            match stream.next().await {
                Some(Ok(Message::Close(Some(frame)))) => return u16::from(frame.code),
                Some(Ok(_)) => continue,
                other => panic!("no close frame: {other:?}"),
            }
        }
    };
    tokio::time::timeout(PATIENCE, close)
        .await
        .expect("a close frame in time")
}

/// On `/ws`, WebSocket pings alone do not keep a connection past its idle timeout; the
/// desktop client's JSON `ping` does.
#[tokio::test]
async fn on_ws_pings_alone_do_not_hold_a_connection_and_json_pings_do() {
    let mut config = test_config();
    config.idle_timeout = Duration::from_millis(600);
    let server = TestServer::start_with(config, Arc::new(MemoryStore::new())).await;
    let (pinging, _) = server.legacy("idle", "ws-pings").await;
    let (mut talking, _) = server.legacy("idle", "json-pings").await;
    let (sink, mut stream) = pinging.split();
    let pinger = keep_pinging(sink);
    let done = Arc::new(AtomicBool::new(false));
    let json_pinger = tokio::spawn({
        let done = done.clone();
        async move {
            while !done.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(100)).await;
                send_json(&mut talking, &json!({"type": "ping"})).await;
                while recv_json(&mut talking).await["type"] != "pong" {}
            }
            talking
        }
    });
    assert_eq!(close_code_of(&mut stream).await, 1001);
    pinger.abort();
    done.store(true, Ordering::Relaxed);
    let mut talking = json_pinger.await.unwrap();
    // The other connection, which sent JSON pings all along, is open and answered.
    ping_collect(&mut talking).await;
}
