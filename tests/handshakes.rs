//! The WebSocket handshakes, over raw TCP where the bytes matter.
//!
//! Opening (RFC 6455 §4.2): the server answers the upgrade itself (it keeps the TCP socket);
//! only a GET over HTTP/1.1 with the §4.2.1 headers is upgraded, a wrong version gets 426
//! naming version 13, anything else a 4xx and never a 101.
//!
//! Closing (PROTOCOL §7, RFC 6455 §5.5.1, §7.4.1): a client's Close frame is answered with one
//! (the desktop client's "Disconnect" must not end in an error), and a protocol violation or
//! invalid UTF-8 in a text frame is closed with 1002 / 1007.

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

/// The RFC 6455 §1.3 sample key, and its answer.
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// A server's answer to a raw request: the status, the head's header lines (names lower-cased)
/// and the body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// An upgrade request for `path` with `method`, `version` and `key` (none if empty), as a
/// browser sends it otherwise; `extra` header lines are added.
fn upgrade_request(method: &str, path: &str, version: &str, key: &str, extra: &str) -> String {
    let key = if key.is_empty() {
        String::new()
    } else {
        format!("Sec-WebSocket-Key: {key}\r\n")
    };
    format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\n{key}Sec-WebSocket-Version: {version}\r\n{extra}\r\n"
    )
}

/// Sends `request` on a new connection and reads the response head, and the body it announces
/// (none for a 101 or an answer to HEAD). Returns the connection, open after the response.
async fn send_raw(server: &TestServer, request: &str) -> (TcpStream, Answer) {
    let mut stream = TcpStream::connect(server.addr).await.expect("connects");
    stream.write_all(request.as_bytes()).await.expect("sent");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let n = tokio::time::timeout(PATIENCE, stream.read(&mut byte))
            .await
            .expect("response in time")
            .expect("reads");
        assert_eq!(n, 1, "the server answers the request");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).expect("an ASCII head");
    let mut lines = head.lines();
    let status_line = lines.next().expect("a status line");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("a status in {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    let mut answer = Answer {
        status,
        headers,
        body: String::new(),
    };
    if status != 101 && !request.starts_with("HEAD ") {
        let len: usize = answer
            .header("content-length")
            .and_then(|len| len.parse().ok())
            .expect("an error answer states its length");
        let mut body = vec![0u8; len];
        tokio::time::timeout(PATIENCE, stream.read_exact(&mut body))
            .await
            .expect("body in time")
            .expect("the body");
        answer.body = String::from_utf8(body).expect("a text body");
    }
    (stream, answer)
}

#[tokio::test]
async fn a_valid_upgrade_gets_the_accept_key_on_both_endpoints() {
    let server = TestServer::start().await;
    for path in [
        "/ws/s/alice",
        "/ws/s/bob?yjs=1",
        "/yjs/s",
        "/yjs/s?user=carol",
    ] {
        // Header tokens are case-insensitive and may be listed.
        let request = upgrade_request("GET", path, "13", KEY, "")
            .replace("Upgrade: websocket", "Upgrade: WebSocket")
            .replace("Connection: Upgrade", "Connection: keep-alive, Upgrade");
        let (_, answer) = send_raw(&server, &request).await;
        assert_eq!(answer.status, 101, "{path}");
        assert_eq!(
            answer.header("sec-websocket-accept"),
            Some(ACCEPT),
            "{path}"
        );
        assert_eq!(answer.header("upgrade"), Some("websocket"), "{path}");
    }
}

#[tokio::test]
async fn only_get_is_upgraded() {
    let server = TestServer::start().await;
    for method in ["HEAD", "POST", "PUT", "DELETE"] {
        for path in ["/ws/s/alice", "/yjs/s"] {
            let request = upgrade_request(method, path, "13", KEY, "Content-Length: 0\r\n");
            let (_, answer) = send_raw(&server, &request).await;
            assert_eq!(answer.status, 405, "{method} {path}");
            assert_eq!(answer.header("allow"), Some("GET"), "{method} {path}");
            assert_eq!(
                answer.header("sec-websocket-accept"),
                None,
                "{method} {path}"
            );
        }
    }
}

#[tokio::test]
async fn another_websocket_version_is_told_to_use_13() {
    let server = TestServer::start().await;
    for version in ["8", "12", "14"] {
        let request = upgrade_request("GET", "/ws/s/alice", version, KEY, "");
        let (_, answer) = send_raw(&server, &request).await;
        assert_eq!(answer.status, 426, "version {version}");
        assert_eq!(answer.header("sec-websocket-version"), Some("13"));
        assert!(
            answer.body.contains("Sec-WebSocket-Version"),
            "{}",
            answer.body
        );
    }
}

#[tokio::test]
async fn a_key_that_is_not_16_bytes_of_base64_is_a_bad_request() {
    let server = TestServer::start().await;
    // Missing, not base64, 15 bytes, 16 bytes without padding.
    for key in [
        "",
        "not a key",
        "AAAAAAAAAAAAAAAAAAAA",
        "AAAAAAAAAAAAAAAAAAAAAA",
    ] {
        let request = upgrade_request("GET", "/yjs/s", "13", key, "");
        let (_, answer) = send_raw(&server, &request).await;
        assert_eq!(answer.status, 400, "key {key:?}");
        assert!(answer.body.contains("Sec-WebSocket-Key"), "{}", answer.body);
    }
}

#[tokio::test]
async fn a_request_that_is_no_websocket_upgrade_is_refused() {
    let server = TestServer::start().await;
    // Asks for no upgrade, or another protocol: told which one this endpoint speaks.
    let (status, _) = server.get("/ws/s/alice").await;
    assert_eq!(status, 426, "a plain GET");
    let h2c = upgrade_request("GET", "/yjs/s", "13", KEY, "").replace("websocket", "h2c");
    let (_, answer) = send_raw(&server, &h2c).await;
    assert_eq!(answer.status, 426);
    assert_eq!(answer.header("upgrade"), Some("websocket"));
    // Asks for a WebSocket, but not as RFC 6455 says.
    let no_connection = upgrade_request("GET", "/yjs/s", "13", KEY, "")
        .replace("Connection: Upgrade", "Connection: keep-alive");
    let old_http = upgrade_request("GET", "/yjs/s", "13", KEY, "").replace("HTTP/1.1", "HTTP/1.0");
    for request in [no_connection, old_http] {
        let (_, answer) = send_raw(&server, &request).await;
        assert_eq!(answer.status, 400, "{request}");
    }
}

#[tokio::test]
async fn a_close_frame_is_answered_on_both_endpoints() {
    let server = TestServer::start().await;
    for path in ["/ws/s/alice", "/yjs/s", "/ws/s/bob?yjs=1"] {
        let mut ws = server.connect(path).await;
        ws.send(Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "Disconnect".into(),
        })))
        .await
        .expect("close sent");
        // Whatever the server had queued may come first; then its answer, then the end.
        let answer = loop {
            match tokio::time::timeout(PATIENCE, ws.next()).await {
                Ok(Some(Ok(Message::Close(frame)))) => break frame,
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(e))) => panic!("{path}: the handshake failed: {e}"),
                Ok(None) => panic!("{path}: the connection ended without an answer"),
                Err(_) => panic!("{path}: no answer to the close frame"),
            }
        };
        let code = answer.map(|f| f.code);
        assert_eq!(code, Some(CloseCode::Normal), "{path}");
        assert!(ws.next().await.is_none(), "{path}: the connection ends");
    }
}

/// Upgrades a raw TCP connection on `path` and returns it after the 101 response.
async fn raw_upgrade(server: &TestServer, path: &str) -> TcpStream {
    let (stream, answer) = send_raw(server, &upgrade_request("GET", path, "13", KEY, "")).await;
    assert_eq!(answer.status, 101, "{path}: {}", answer.body);
    stream
}

/// Reads server frames until a Close frame and returns its status code.
async fn close_code_raw(stream: &mut TcpStream) -> u16 {
    loop {
        let mut header = [0u8; 2];
        tokio::time::timeout(PATIENCE, stream.read_exact(&mut header))
            .await
            .expect("a frame in time")
            .expect("a frame before the end");
        let opcode = header[0] & 0x0f;
        let len = match header[1] & 0x7f {
            126 => {
                let mut ext = [0u8; 2];
                stream.read_exact(&mut ext).await.expect("length");
                usize::from(u16::from_be_bytes(ext))
            }
            127 => {
                let mut ext = [0u8; 8];
                stream.read_exact(&mut ext).await.expect("length");
                usize::try_from(u64::from_be_bytes(ext)).expect("fits")
            }
            n => usize::from(n),
        };
        let mut payload = vec![0u8; len];
        stream.read_exact(&mut payload).await.expect("payload");
        if opcode == 0x8 {
            assert!(payload.len() >= 2, "a close frame with a status code");
            return u16::from_be_bytes([payload[0], payload[1]]);
        }
    }
}

/// A masked client frame.
fn masked(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x12, 0x34, 0x56, 0x78];
    let mut frame = vec![
        0x80 | opcode,
        0x80 | u8::try_from(payload.len()).expect("short"),
    ];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

#[tokio::test]
async fn an_unmasked_client_frame_is_closed_1002() {
    let server = TestServer::start().await;
    let mut stream = raw_upgrade(&server, "/ws/s/mallory").await;
    // Client frames must be masked (RFC 6455 §5.1).
    stream
        .write_all(&[0x81, 0x02, b'h', b'i'])
        .await
        .expect("sent");
    assert_eq!(close_code_raw(&mut stream).await, 1002);
}

#[tokio::test]
async fn invalid_utf8_in_a_text_frame_is_closed_1007() {
    let server = TestServer::start().await;
    let mut stream = raw_upgrade(&server, "/ws/s/mallory").await;
    stream
        .write_all(&masked(0x1, &[0x7b, 0xff, 0xfe, 0x7d]))
        .await
        .expect("sent");
    assert_eq!(close_code_raw(&mut stream).await, 1007);
}

#[tokio::test]
async fn the_session_lives_on_after_a_protocol_error() {
    let server = TestServer::start().await;
    let (mut alice, _) = server.legacy("s", "alice").await;
    let mut stream = raw_upgrade(&server, "/ws/s/mallory").await;
    stream
        .write_all(&[0x81, 0x02, b'h', b'i'])
        .await
        .expect("sent");
    assert_eq!(close_code_raw(&mut stream).await, 1002);
    drop(stream);
    loop {
        let msg = recv_json(&mut alice).await;
        if msg["type"] == "user:left" {
            assert_eq!(msg["user_id"], "mallory", "{msg}");
            break;
        }
    }
    send_json(&mut alice, &serde_json::json!({"type": "ping"})).await;
    assert_eq!(recv_json(&mut alice).await["type"], "pong");
}
