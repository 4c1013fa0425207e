//! The two WebSocket endpoints: `/ws/{session}/{user}` (Optiverse JSON, or Yjs with `?yjs=1`)
//! and `/yjs/{session}` (y-websocket, `?user=NAME` to appear in the user list).
//!
//! An invalid path still completes the upgrade and is then closed with 1008 "Invalid path":
//! that is what Optiverse clients already handle.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Query, State};
use axum::http::Uri;
use axum::response::Response;

use super::connection::{self, ConnectionTarget};
use super::path::{parse_segments, valid_name};
use super::AppState;
use crate::session::outbox::CLOSE_INVALID_PATH;
use crate::session::ConnKind;

/// A connection's read buffer, which is also the most read per call: every idle connection
/// keeps it, and a y-websocket update or awareness frame is a few hundred bytes. Larger
/// messages are read in several calls.
const READ_BUFFER_BYTES: usize = 512;
/// Frames are written once this many bytes are buffered, or when the outbox is drained.
const WRITE_BUFFER_BYTES: usize = 16 * 1024;

fn flag(params: &HashMap<String, String>, name: &str) -> bool {
    params
        .get(name)
        .is_some_and(|v| matches!(v.as_str(), "1" | "true" | "yes"))
}

/// `GET /ws/...`
pub async fn legacy(
    ws: WebSocketUpgrade,
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
    ws: WebSocketUpgrade,
    uri: Uri,
    Query(params): Query<HashMap<String, String>>,
    State(state): State<AppState>,
) -> Response {
    let user = match params.get("user") {
        None => Ok(None),
        // `Query` already percent-decoded the value.
        Some(name) if valid_name(name) => Ok(Some(Arc::from(name.as_str()))),
        Some(_) => Err(()),
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

fn upgrade(ws: WebSocketUpgrade, state: AppState, target: Option<ConnectionTarget>) -> Response {
    let limit = state.config.max_message_bytes;
    ws.max_message_size(limit)
        .max_frame_size(limit)
        // tungstenite zero-fills its whole read buffer before every read attempt; the
        // default 128 KiB made that memset the server's hottest code and every idle
        // connection's largest allocation. Larger messages still grow the buffer.
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES)
        .on_upgrade(move |socket| async move {
            match target {
                Some(target) => {
                    let opened = Box::pin(connection::open(socket, state, target)).await;
                    if let Some((connection, socket, inbox)) = opened {
                        connection.serve(socket, inbox).await;
                    }
                }
                None => Box::pin(connection::close(socket, CLOSE_INVALID_PATH)).await,
            }
        })
}
