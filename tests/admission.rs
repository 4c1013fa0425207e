//! The accept loop's limits and the HTTP time limits (issue 13): a request head and body must
//! arrive in time, connections are bounded in total and per client address (a WebSocket
//! counts for its life), sessions in memory are bounded, and the HTTP API is rate-limited
//! per client address. Clients on other loopback addresses (127.0.0.2, ...) stand for other
//! machines.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use optiverse_collab::config::Config;
use optiverse_collab::store::memory::MemoryStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ATTACKER: &str = "127.0.0.1";
const OTHER: &str = "127.0.0.2";
const THIRD: &str = "127.0.0.3";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

async fn start(configure: impl FnOnce(&mut Config)) -> TestServer {
    let mut config = test_config();
    configure(&mut config);
    TestServer::start_with(config, Arc::new(MemoryStore::new())).await
}

/// Reads until the server closes the connection; what it sent before.
async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("the server closes the connection");
    got
}

fn status_of(response: &[u8]) -> Option<u16> {
    let text = String::from_utf8_lossy(response);
    text.split(' ').nth(1)?.parse().ok()
}

/// Polls `GET path` from `source` until it answers `status` (for a slot or a token that
/// frees up without an event to await); bounded by PATIENCE.
async fn await_status(source: &str, addr: SocketAddr, path: &str, status: u16) {
    let polled = tokio::time::timeout(PATIENCE, async {
        loop {
            if http_from(ip(source), addr, "GET", path, &[]).await.0 == status {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(polled.is_ok(), "GET {path} never answered {status}");
}

#[tokio::test]
async fn a_silent_socket_is_closed_at_the_header_deadline() {
    let server = start(|c| c.http_header_timeout = Duration::from_millis(300)).await;
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    let mut partial = TcpStream::connect(server.addr).await.unwrap();
    partial
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    assert!(read_until_closed(&mut silent).await.is_empty());
    assert!(read_until_closed(&mut partial).await.is_empty());
}

#[tokio::test]
async fn an_idle_kept_alive_connection_is_closed_at_the_header_deadline() {
    let server = start(|c| c.http_header_timeout = Duration::from_millis(300)).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let answered = read_until_closed(&mut stream).await;
    assert_eq!(status_of(&answered), Some(200));
}

#[tokio::test]
async fn a_slow_body_is_answered_408_and_closed() {
    let server = start(|c| c.http_body_timeout = Duration::from_millis(300)).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(
            b"POST /api/sessions/slow/update HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n\x01\x00",
        )
        .await
        .unwrap();
    let answered = read_until_closed(&mut stream).await;
    assert_eq!(
        status_of(&answered),
        Some(408),
        "{}",
        String::from_utf8_lossy(&answered)
    );
}

#[tokio::test]
async fn a_body_over_the_message_limit_is_413() {
    let server = start(|c| c.max_message_bytes = 100).await;
    let (status, body) = server.post("/api/sessions/big/update", &[0u8; 101]).await;
    assert_eq!(status, 413, "{}", String::from_utf8_lossy(&body));
}

#[tokio::test]
async fn connections_over_the_total_are_refused_until_one_closes() {
    // Per client at most half the total: two clients fill it.
    let server = start(|c| c.max_connections = 4).await;
    let mut held = Vec::new();
    for source in [ATTACKER, ATTACKER, THIRD, THIRD] {
        held.push(connect_from(ip(source), server.addr).await);
    }
    let (status, body) = http_from(ip(OTHER), server.addr, "GET", "/health", &[]).await;
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    held.pop();
    await_status(OTHER, server.addr, "/health", 200).await;
}

#[tokio::test]
async fn connections_over_the_per_client_limit_are_refused_while_others_are_served() {
    let server = start(|c| c.max_connections_per_ip = 2).await;
    // Two WebSockets: each keeps its connection's slot after the upgrade.
    let mut sockets = Vec::new();
    for user in ["a", "b"] {
        let stream = connect_from(ip(ATTACKER), server.addr).await;
        let url = server.url(&format!("/ws/crowd/{user}"));
        let stream = tokio_tungstenite::MaybeTlsStream::Plain(stream);
        let (mut ws, _) = tokio_tungstenite::client_async(url, stream).await.unwrap();
        recv_ack(&mut ws, user).await;
        sockets.push(ws);
    }
    let (status, body) = http_from(ip(ATTACKER), server.addr, "GET", "/health", &[]).await;
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    let (status, _) = http_from(ip(OTHER), server.addr, "GET", "/health", &[]).await;
    assert_eq!(status, 200);
    // A closed WebSocket gives its slot back.
    let mut ws = sockets.pop().unwrap();
    ws.close(None).await.unwrap();
    close_code(&mut ws).await;
    await_status(ATTACKER, server.addr, "/health", 200).await;
}

#[tokio::test]
async fn a_session_over_the_limit_is_refused_until_an_idle_one_makes_room() {
    let server = start(|c| {
        c.max_sessions = 1;
        c.api_rate = 10_000.0;
        c.api_burst = 10_000.0;
    })
    .await;
    let (mut first, _) = server.legacy("first", "alice").await;
    // The only session has a member: no room for another.
    let mut second = server.connect("/ws/second/bob").await;
    let error = recv_json(&mut second).await;
    assert_eq!(error["type"], "error", "{error}");
    assert_eq!(error["code"], "unavailable", "{error}");
    assert_eq!(close_code(&mut second).await, 1013);
    let (status, _) = server.post("/api/sessions/third/update", &[0, 0]).await;
    assert_eq!(status, 503);
    // Once the first session is idle it is evicted to make room.
    first.close(None).await.unwrap();
    close_code(&mut first).await;
    let idle = tokio::time::timeout(PATIENCE, async {
        loop {
            let (_, body) = server.get("/api/sessions").await;
            let sessions: serde_json::Value = serde_json::from_slice(&body).unwrap();
            if sessions[0]["users"].as_array().is_some_and(Vec::is_empty) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(idle.is_ok(), "the first session never became idle");
    let (_, ack) = server.legacy("second", "bob").await;
    assert_eq!(ack["session_id"], "second", "{ack}");
    let (_, body) = server.get("/api/sessions").await;
    let sessions: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(sessions.as_array().map(Vec::len), Some(1), "{sessions}");
    assert_eq!(sessions[0]["id"], "second", "{sessions}");
}

#[tokio::test]
async fn the_api_rate_is_per_client_and_recovers() {
    let server = start(|c| {
        c.api_rate = 1.0;
        c.api_burst = 3.0;
    })
    .await;
    let get = |source| http_from(ip(source), server.addr, "GET", "/api/sessions", &[]);
    for _ in 0..3 {
        assert_eq!(get(ATTACKER).await.0, 200);
    }
    let mut stream = connect_from(ip(ATTACKER), server.addr).await;
    stream
        .write_all(b"GET /api/sessions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let refused = String::from_utf8_lossy(&read_until_closed(&mut stream).await).to_string();
    assert_eq!(status_of(refused.as_bytes()), Some(429), "{refused}");
    assert!(
        refused.to_ascii_lowercase().contains("retry-after: 1"),
        "{refused}"
    );
    // Another client is served; /health is not part of the API.
    assert_eq!(get(OTHER).await.0, 200);
    assert_eq!(
        http_from(ip(ATTACKER), server.addr, "GET", "/health", &[])
            .await
            .0,
        200
    );
    await_status(ATTACKER, server.addr, "/api/sessions", 200).await;
}

#[tokio::test]
async fn an_http2_connection_is_closed_after_its_first_request() {
    let server = start(|c| c.http_header_timeout = Duration::from_millis(300)).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let mut h2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    // An empty SETTINGS frame, then HEADERS (END_STREAM | END_HEADERS) on stream 1 for
    // `GET http://x/` in HPACK: :method GET, :scheme http, :path /, :authority "x".
    h2.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    h2.extend_from_slice(&[0, 0, 6, 1, 5, 0, 0, 0, 1, 0x82, 0x86, 0x84, 0x41, 1, b'x']);
    stream.write_all(&h2).await.unwrap();
    // Served by hyper's HTTP/2 with no head timer, it would stay open.
    let answered = read_until_closed(&mut stream).await;
    assert!(!answered.is_empty());
}

/// A client that sends requests and never reads the responses loses its connection once a
/// write has been blocked for the write timeout, and with it the connection's slot.
#[tokio::test]
async fn a_client_that_does_not_read_its_responses_is_closed_at_the_write_deadline() {
    let server = start(|c| {
        c.max_connections_per_ip = 1;
        c.http_header_timeout = Duration::from_secs(600);
        c.http_write_timeout = Duration::from_millis(300);
    })
    .await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(ip(ATTACKER), 0)).unwrap();
    // A small window: the server's writes block once a few responses wait in the buffers.
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(server.addr).await.unwrap();
    let requests = "GET /assets/draw.js HTTP/1.1\r\nHost: x\r\n\r\n".repeat(400);
    stream.write_all(requests.as_bytes()).await.unwrap();
    // Its slot is taken while it is open.
    let (status, _) = http_from(ip(ATTACKER), server.addr, "GET", "/health", &[]).await;
    assert_eq!(status, 503);
    await_status(ATTACKER, server.addr, "/health", 200).await;
    drop(stream);
}
