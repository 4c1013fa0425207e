//! Shared test support: an in-process server on an ephemeral port, WebSocket clients for
//! both protocols ([`yclient::YClient`] for `/yjs`), a minimal HTTP client, stores with test
//! hooks ([`store`]), and the messages, fixtures and Yjs helpers the core's tests use too.
#![allow(dead_code)]

// One definition of the message builders and checks, and of the yrs-side helpers, for the
// core's tests and the socket suites alike.
pub mod child;
pub mod durable;
#[path = "../../core/tests/common/messages.rs"]
pub mod messages;
pub mod store;
pub mod yclient;
#[path = "../../core/tests/common/ydoc.rs"]
pub mod ydoc;

// Every suite uses some of these, none uses all.
#[allow(unused_imports)]
pub use {messages::*, store::*, yclient::YClient, ydoc::*};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use optiverse_collab::config::{Config, StoreKind};
use optiverse_collab::server::Server;
use optiverse_collab::store::memory::MemoryStore;
use optiverse_collab::store::Store;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Upper bound on waiting for an event that must come; it only keeps a broken test from
/// hanging, it is never what a test asserts.
pub const PATIENCE: Duration = Duration::from_secs(20);

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub struct TestServer {
    pub server: Option<Server>,
    pub addr: SocketAddr,
    pub store: Arc<dyn Store>,
}

/// A config for tests: loopback, ephemeral port, memory store.
pub fn test_config() -> Config {
    let mut config = Config::defaults();
    config.host = "127.0.0.1".parse().unwrap();
    config.port = 0;
    config.store = StoreKind::Memory;
    config
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with(test_config(), Arc::new(MemoryStore::new())).await
    }

    pub async fn start_with(config: Config, store: Arc<dyn Store>) -> TestServer {
        let server = Server::start(config, store.clone())
            .await
            .expect("server starts");
        TestServer {
            addr: server.addr,
            server: Some(server),
            store,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    pub async fn shutdown(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await;
        }
    }

    /// `GET path` → (status, body).
    pub async fn get(&self, path: &str) -> (u16, Vec<u8>) {
        http(self.addr, "GET", path, &[]).await
    }

    pub async fn post(&self, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
        http(self.addr, "POST", path, body).await
    }

    /// The scene's `state` JSON from the HTTP API.
    pub async fn scene(&self, session: &str) -> Value {
        let (status, body) = self.get(&format!("/api/sessions/{session}/scene")).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        serde_json::from_slice(&body).unwrap()
    }

    /// Opens a WebSocket with extra request headers: the socket, or the HTTP status that
    /// refused the upgrade.
    pub async fn try_connect(&self, path: &str, headers: &[(&str, &str)]) -> Result<Ws, u16> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut request = self.url(path).into_client_request().expect("a valid URL");
        for (name, value) in headers {
            request.headers_mut().insert(
                tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes())
                    .expect("a header name"),
                value.parse().expect("a header value"),
            );
        }
        match tokio_tungstenite::connect_async(request).await {
            Ok((ws, _)) => Ok(ws),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                Err(response.status().as_u16())
            }
            Err(e) => panic!("websocket failed without an HTTP answer: {e}"),
        }
    }

    pub async fn connect(&self, path: &str) -> Ws {
        let (ws, _) = tokio_tungstenite::connect_async(self.url(path))
            .await
            .expect("websocket connects");
        ws
    }

    /// Connects a legacy client and returns it with its ack (after the `user:joined` naming
    /// itself that comes first; README, "Choices").
    pub async fn legacy(&self, session: &str, user: &str) -> (Ws, Value) {
        let mut ws = self.connect(&format!("/ws/{session}/{user}")).await;
        let ack = recv_ack(&mut ws, &percent_decode(user)).await;
        (ws, ack)
    }

    /// Connects a legacy client and completes its first exchange as a host with an empty canvas
    /// does (it uploads it), so that it is told of changes as they come (until a desktop
    /// connection uploads or asks, it gets `update_item` only; README "Choices"). Returns it
    /// with its ack, once what its upload brought (the scene's items) has arrived.
    pub async fn settled(&self, session: &str, user: &str) -> (Ws, Value) {
        let (mut ws, ack) = self.legacy(session, user).await;
        let empty = json!({"type": "sync:full_state", "state": {"items": []}});
        send_json(&mut ws, &empty).await;
        ping_collect(&mut ws).await;
        (ws, ack)
    }

    /// Connects a legacy client as the desktop client's "Connect to server" does: after the
    /// ack it sends `sync:request`. Returns it with its ack and, when the scene is
    /// initialized, the full state it got (with the `update_item`s that follow it).
    pub async fn joiner(&self, session: &str, user: &str) -> (Ws, Value, Vec<Value>) {
        let (mut ws, ack) = self.legacy(session, user).await;
        send_json(&mut ws, &json!({"type": "sync:request"})).await;
        let got = ping_collect(&mut ws).await;
        (ws, ack, got)
    }
}

/// A path segment as the server decodes it (`%XX` escapes, as UTF-8).
pub fn percent_decode(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(out).expect("a UTF-8 path segment")
}

/// `GET /health` as JSON (asserting 200).
pub async fn health(addr: SocketAddr) -> Value {
    let (status, body) = http(addr, "GET", "/health", &[]).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).unwrap()
}

/// Polls `/health` until `field` equals `value`. Used where the server offers no event to
/// await (a session leaving memory, connections being registered); bounded by PATIENCE.
pub async fn await_health(addr: SocketAddr, field: &str, value: u64) {
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

/// Reads what a `/ws` connection of `user` gets first: `user:joined` naming itself, then the
/// ack, which is returned.
pub async fn recv_ack(ws: &mut Ws, user: &str) -> Value {
    let joined = recv_json(ws).await;
    assert_eq!(joined["type"], "user:joined", "{joined}");
    assert_eq!(joined["user_id"], user, "{joined}");
    let ack = recv_json(ws).await;
    assert_eq!(ack["type"], "connection:ack", "{ack}");
    ack
}

/// A tiny HTTP/1.1 client (the project has no HTTP client dependency).
pub async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> (u16, Vec<u8>) {
    http_with(addr, method, path, &[], body).await
}

/// [`http`] with extra request headers.
pub async fn http_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<u8>) {
    let stream = TcpStream::connect(addr).await.unwrap();
    http_on(stream, addr, method, path, headers, body).await
}

/// A TCP connection to `addr` from the loopback address `source` (any of 127.0.0.0/8), so
/// that the server sees distinct clients.
pub async fn connect_from(source: std::net::IpAddr, addr: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    socket.connect(addr).await.unwrap()
}

/// [`http`] from the loopback address `source`.
pub async fn http_from(
    source: std::net::IpAddr,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> (u16, Vec<u8>) {
    let stream = connect_from(source, addr).await;
    http_on(stream, addr, method, path, &[], body).await
}

/// One request on `stream`, read to the end of the connection.
pub async fn http_on(
    mut stream: TcpStream,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<u8>) {
    let extra: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{extra}Content-Length: {}\r\nContent-Type: application/octet-stream\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut response))
        .await
        .expect("http response in time")
        .unwrap();
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("http head");
    let head = String::from_utf8_lossy(&response[..split]).to_string();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let mut body = response[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    (status, body)
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&data[..line_end]).unwrap().trim(), 16)
                .unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[line_end + 2..line_end + 2 + size]);
        data = &data[line_end + 2 + size + 2..];
    }
}

/// The next message, whatever it is; panics on close.
pub async fn recv(ws: &mut Ws) -> Message {
    loop {
        let msg = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("a message in time")
            .expect("connection open")
            .expect("valid frame");
        match msg {
            Message::Ping(_) | Message::Pong(_) => continue,
            other => return other,
        }
    }
}

/// The next text message as JSON.
pub async fn recv_json(ws: &mut Ws) -> Value {
    match recv(ws).await {
        Message::Text(t) => serde_json::from_str(&t).unwrap(),
        other => panic!("expected text, got {other:?}"),
    }
}

pub async fn send_json(ws: &mut Ws, value: &Value) {
    ws.send(Message::text(value.to_string())).await.unwrap();
}

/// Sends `ping` and returns every message received before the `pong`. Pings go through the
/// session, so everything sent before was applied by then.
pub async fn ping_collect(ws: &mut Ws) -> Vec<Value> {
    send_json(ws, &json!({"type": "ping"})).await;
    let mut before = Vec::new();
    loop {
        let msg = recv_json(ws).await;
        if msg["type"] == "pong" {
            return before;
        }
        before.push(msg);
    }
}

/// Waits for the close frame and returns its code (skipping whatever came before it).
pub async fn close_code(ws: &mut Ws) -> u16 {
    close_frame(ws).await.0
}

/// Waits for the close frame and returns its code and reason (skipping what came before it).
pub async fn close_frame(ws: &mut Ws) -> (u16, String) {
    loop {
        let msg = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("close in time");
        match msg {
            Some(Ok(Message::Close(Some(frame)))) => {
                return (u16::from(frame.code), frame.reason.to_string())
            }
            Some(Ok(Message::Close(None))) => return (u16::from(CloseCode::Status), String::new()),
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("connection failed without a close frame: {e}"),
            None => panic!("connection ended without a close frame"),
        }
    }
}

/// [`ping_collect`], then [`fold_fixes`].
pub async fn ping_collect_folded(ws: &mut Ws) -> Vec<Value> {
    fold_fixes(&ping_collect(ws).await)
}

/// The `user_id`s of an ack's user list, in order.
pub fn listed(ack: &Value) -> Vec<&str> {
    ack["users"]
        .as_array()
        .unwrap_or_else(|| panic!("no users: {ack}"))
        .iter()
        .map(|u| u["user_id"].as_str().unwrap())
        .collect()
}
