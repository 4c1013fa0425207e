//! The closing handshake (PROTOCOL §7, RFC 6455 §5.5.1, §7.4.1): a client's Close frame is
//! answered with one (the desktop client's "Disconnect" must not end in an error), and a
//! protocol violation or invalid UTF-8 in a text frame is closed with 1002 / 1007.

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

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
    let mut stream = TcpStream::connect(server.addr).await.expect("connects");
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        server.addr
    );
    stream.write_all(request.as_bytes()).await.expect("sent");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let n = tokio::time::timeout(PATIENCE, stream.read(&mut byte))
            .await
            .expect("response in time")
            .expect("reads");
        assert_eq!(n, 1, "the server answers the upgrade");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
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
