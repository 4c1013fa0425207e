//! The two WebSocket endpoints: `/ws/{session}/{user}` (Optiverse JSON, or Yjs with `?yjs=1`)
//! and `/yjs/{session}` (y-websocket, `?user=NAME` to appear in the user list).
//!
//! An invalid path still completes the upgrade and is then closed with 1008 "Invalid path":
//! that is what Optiverse clients already handle.
//!
//! The handshake is answered here rather than by axum's `WebSocketUpgrade`, because the server
//! keeps the upgraded TCP socket itself: session tasks write to it directly.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{FromRequestParts, Query, State};
use axum::http::header::{
    CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION, UPGRADE,
};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tracing::error;
use tungstenite::protocol::{Role, WebSocketConfig};

use collab_core::session::{ConnKind, CLOSE_INVALID_PATH};

use super::connection::{self, ConnectionTarget, Socket};
use super::path::{normalize_name, parse_segments};
use super::AppState;
use crate::transport::{outbox, Inbox, Outbox, SocketIo};

/// A connection's read buffer, which is also the most read per call: every idle connection
/// keeps it, and a y-websocket update or awareness frame is a few hundred bytes. Larger
/// messages are read in several calls.
const READ_BUFFER_BYTES: usize = 512;

fn flag(params: &HashMap<String, String>, name: &str) -> bool {
    params
        .get(name)
        .is_some_and(|v| matches!(v.as_str(), "1" | "true" | "yes"))
}

/// `GET /ws/...`
pub async fn legacy(
    ws: WsUpgrade,
    uri: Uri,
    Query(params): Query<HashMap<String, String>>,
    State(state): State<AppState>,
) -> Response {
    let kind = if flag(&params, "yjs") {
        ConnKind::LegacyYjs
    } else {
        ConnKind::Legacy
    };
    let target = parse_segments(uri.path(), "/ws/", 2).map(|mut segments| {
        let user = segments.pop().map(Arc::from);
        ConnectionTarget {
            session: segments.pop().unwrap_or_default(),
            user,
            kind,
        }
    });
    upgrade(ws, state, target)
}

/// `GET /yjs/...`
pub async fn yjs(
    ws: WsUpgrade,
    uri: Uri,
    Query(params): Query<HashMap<String, String>>,
    State(state): State<AppState>,
) -> Response {
    let user = match params.get("user") {
        None => Ok(None),
        // `Query` already percent-decoded the value.
        Some(name) => normalize_name(name).map(|n| Some(Arc::from(n))).ok_or(()),
    };
    let target = match (parse_segments(uri.path(), "/yjs/", 1), user) {
        (Some(mut segments), Ok(user)) => Some(ConnectionTarget {
            session: segments.pop().unwrap_or_default(),
            user,
            kind: ConnKind::Yjs,
        }),
        _ => None,
    };
    upgrade(ws, state, target)
}

/// A valid WebSocket upgrade request (RFC 6455 §4.2.1), answered by this server itself: it
/// keeps the TCP socket, which the session task writes to directly (see `socket`).
pub struct WsUpgrade {
    on_upgrade: OnUpgrade,
    accept: HeaderValue,
}

impl<S: Send + Sync> FromRequestParts<S> for WsUpgrade {
    type Rejection = (StatusCode, &'static str);

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let bad = |why| Err((StatusCode::BAD_REQUEST, why));
        if !has_token(&parts.headers, CONNECTION, "upgrade") {
            return bad("`Connection` header did not include `upgrade`");
        }
        if !has_token(&parts.headers, UPGRADE, "websocket") {
            return bad("`Upgrade` header did not include `websocket`");
        }
        if parts
            .headers
            .get(SEC_WEBSOCKET_VERSION)
            .map(HeaderValue::as_bytes)
            != Some(b"13")
        {
            return bad("`Sec-WebSocket-Version` header is not `13`");
        }
        let Some(key) = parts.headers.get(SEC_WEBSOCKET_KEY) else {
            return bad("`Sec-WebSocket-Key` header is missing");
        };
        let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
        let Ok(accept) = HeaderValue::from_str(&accept) else {
            return bad("`Sec-WebSocket-Key` header is invalid");
        };
        let Some(on_upgrade) = parts.extensions.remove::<OnUpgrade>() else {
            return Err((
                StatusCode::UPGRADE_REQUIRED,
                "the connection cannot be upgraded",
            ));
        };
        Ok(WsUpgrade { on_upgrade, accept })
    }
}

/// Whether a comma-separated header holds `token` (case-insensitive).
fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|value| {
        value.to_str().is_ok_and(|value| {
            value
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case(token))
        })
    })
}

fn upgrade(ws: WsUpgrade, state: AppState, target: Option<ConnectionTarget>) -> Response {
    let WsUpgrade { on_upgrade, accept } = ws;
    // Two tasks: the set-up's futures are large and done with once joined, and thousands of
    // connections sit idle in the second task, which holds only what serving needs.
    let connections = state.connections.clone();
    let tracker = connections.clone();
    tracker.spawn(async move {
        if let Some((connection, socket, inbox)) = join(on_upgrade, state, target).await {
            connections.spawn(connection.serve(socket, inbox));
        }
    });
    (
        StatusCode::SWITCHING_PROTOCOLS,
        [
            (CONNECTION, HeaderValue::from_static("upgrade")),
            (UPGRADE, HeaderValue::from_static("websocket")),
            (SEC_WEBSOCKET_ACCEPT, accept),
        ],
    )
        .into_response()
}

/// Completes the upgrade and joins the session; an invalid path is closed with 1008.
async fn join(
    on_upgrade: OnUpgrade,
    state: AppState,
    target: Option<ConnectionTarget>,
) -> Option<(connection::Connection, Socket, Inbox)> {
    let (socket, outbox, inbox) = accept_socket(on_upgrade, &state).await?;
    match target {
        Some(target) => connection::open(socket, outbox, inbox, state, target).await,
        None => {
            connection::close(socket, inbox, CLOSE_INVALID_PATH).await;
            None
        }
    }
}

/// Waits for the upgrade and wraps the TCP socket: the outbox writes to it, tungstenite
/// reads from it (starting with what hyper already read past the request).
async fn accept_socket(on_upgrade: OnUpgrade, state: &AppState) -> Option<(Socket, Outbox, Inbox)> {
    let upgraded = on_upgrade.await.ok()?;
    let parts =
        match hyper_util::server::conn::auto::upgrade::downcast::<TokioIo<TcpStream>>(upgraded) {
            Ok(parts) => parts,
            Err(_) => {
                error!("an upgraded connection is not a TCP socket");
                return None;
            }
        };
    let stream = Arc::new(parts.io.into_inner());
    let (outbox, inbox) = outbox(state.config.max_queue_bytes, stream.clone());
    let limit = state.config.max_message_bytes;
    let config = WebSocketConfig::default()
        .max_message_size(Some(limit))
        .max_frame_size(Some(limit))
        // tungstenite zero-fills its whole read buffer before every read attempt; the
        // default 128 KiB made that memset the server's hottest code and every idle
        // connection's largest allocation. Larger messages still grow the buffer.
        .read_buffer_size(READ_BUFFER_BYTES)
        // Nothing to gather: tungstenite only writes pings, pongs and close frames, and
        // hands each straight to the outbox.
        .write_buffer_size(0);
    let socket = WebSocketStream::from_partially_read(
        SocketIo::new(stream, inbox.writer()),
        parts.read_buf.to_vec(),
        Role::Server,
        Some(config),
    )
    .await;
    Some((socket, outbox, inbox))
}
