//! The two WebSocket endpoints: `/ws/{session}/{user}` (Optiverse JSON, or Yjs with `?yjs=1`)
//! and `/yjs/{session}` (y-websocket, `?user=NAME` to appear in the user list): their paths,
//! and joining the session. The handshake and the socket are the transport's.
//!
//! An invalid path still completes the upgrade and is then closed with 1008 "Invalid path":
//! that is what Optiverse clients already handle.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::Uri;
use axum::response::Response;
use tracing::{info, warn};

use collab_core::protocol::json::{self, ErrorCode, ProtocolError};
use collab_core::session::{ConnKind, CLOSE_INTERNAL, CLOSE_INVALID_PATH};

use super::connection::{Connection, ConnectionTarget};
use super::path::{normalize_name, parse_segments};
use super::AppState;
use crate::session::JoinRequest;
use crate::transport::{Bounds, Frame, Socket, SocketConfig, Upgrade, Upgrading};

fn flag(params: &HashMap<String, String>, name: &str) -> bool {
    params
        .get(name)
        .is_some_and(|v| matches!(v.as_str(), "1" | "true" | "yes"))
}

/// `/ws/...` (any method reaches the handshake, which answers all but GET with 405)
pub async fn legacy(
    ws: Upgrade,
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

/// `/yjs/...` (as `/ws/...`)
pub async fn yjs(
    ws: Upgrade,
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

/// Answers the upgrade (101) and, in a set-up task, opens the socket and joins the session.
fn upgrade(upgrade: Upgrade, state: AppState, target: Option<ConnectionTarget>) -> Response {
    let (response, upgrading) = upgrade.accept();
    // Two tasks: the set-up's futures are large and done with once joined, and thousands of
    // connections sit idle in the second task, which holds only what serving needs.
    let connections = state.connections.clone();
    let tracker = connections.clone();
    tracker.spawn(async move {
        if let Some((connection, socket)) = join(upgrading, state, target).await {
            connections.spawn(connection.serve(socket));
        }
    });
    response
}

/// Opens the socket and joins the session. An invalid path is closed with 1008; a session
/// that cannot be joined, with 1011 (JSON clients are told why first).
async fn join(
    upgrading: Upgrading,
    state: AppState,
    target: Option<ConnectionTarget>,
) -> Option<(Connection, Socket)> {
    // Yjs connections are caught up when they fall behind; desktop ones are not (README).
    let catch_up = target.as_ref().is_some_and(|t| t.kind.speaks_yjs());
    let config = SocketConfig {
        max_message_bytes: state.config.max_message_bytes,
        bounds: Bounds {
            max_bytes: state.config.max_queue_bytes,
            catch_up_bytes: catch_up.then_some(state.config.catch_up_bytes),
        },
        budget: state.budget.clone(),
    };
    let (socket, outbox) = upgrading.open(config).await?;
    let Some(target) = target else {
        socket.close(CLOSE_INVALID_PATH).await;
        return None;
    };
    let peer = state.registry.next_peer_id();
    let request = JoinRequest {
        peer,
        kind: target.kind,
        user: target.user.clone(),
        outbox: outbox.clone(),
    };
    let session = match state.registry.join(&target.session, request).await {
        Ok(handle) => handle,
        Err(e) => {
            warn!(session = %target.session, error = ?e, "join failed");
            if target.kind.speaks_json() {
                let error =
                    ProtocolError::new(ErrorCode::Unavailable, "the session could not be loaded");
                let _ = outbox.send(&Frame::text(&json::encode_error(&error)));
            }
            socket.close(CLOSE_INTERNAL).await;
            return None;
        }
    };
    let user: Arc<str> = target.user.unwrap_or_else(|| Arc::from("-"));
    info!(session = %target.session, user = %user, peer, kind = ?target.kind, "connection opened");
    let connection = Connection {
        state,
        session,
        peer,
        user,
        kind: target.kind,
        outbox,
    };
    Some((connection, socket))
}
