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
use axum::Extension;
use tracing::{info, warn};

use collab_core::protocol::json::{self, ErrorCode, ProtocolError};
use collab_core::session::{
    Access, ConnKind, CLOSE_INTERNAL, CLOSE_INVALID_PATH, CLOSE_NAME_NOT_YOURS, CLOSE_SERVER_FULL,
    CLOSE_TOKEN_REVOKED,
};

use super::connection::{Connection, ConnectionTarget};
use super::path::{normalize_name, parse_segments};
use super::AppState;
use crate::auth::http::Grant;
use crate::auth::LiveGrant;
use crate::session::{JoinError, JoinRequest};
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
    grant: Option<Extension<Grant>>,
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
    upgrade(ws, state, target, grant)
}

/// `/yjs/...` (as `/ws/...`)
pub async fn yjs(
    ws: Upgrade,
    uri: Uri,
    Query(params): Query<HashMap<String, String>>,
    State(state): State<AppState>,
    grant: Option<Extension<Grant>>,
) -> Response {
    // A token that binds a name names an unnamed connection.
    let bound = grant.as_ref().and_then(|g| g.0 .0.user.as_deref());
    let user = match (params.get("user"), bound) {
        (None, None) => Ok(None),
        (None, Some(bound)) => Ok(Some(Arc::from(bound))),
        // `Query` already percent-decoded the value.
        (Some(name), _) => normalize_name(name).map(|n| Some(Arc::from(n))).ok_or(()),
    };
    let target = match (parse_segments(uri.path(), "/yjs/", 1), user) {
        (Some(mut segments), Ok(user)) => Some(ConnectionTarget {
            session: segments.pop().unwrap_or_default(),
            user,
            kind: ConnKind::Yjs,
        }),
        _ => None,
    };
    upgrade(ws, state, target, grant)
}

/// Answers the upgrade (101) and, in a set-up task, opens the socket and joins the session.
/// The connection's admission slot goes with the socket: the WebSocket counts as an open
/// connection until it closes.
fn upgrade(
    upgrade: Upgrade,
    state: AppState,
    target: Option<ConnectionTarget>,
    grant: Option<Extension<Grant>>,
) -> Response {
    let grant = grant.map(|Extension(Grant(claims))| claims);
    let (response, upgrading) = upgrade.accept();
    // Two tasks: the set-up's futures are large and done with once joined, and thousands of
    // connections sit idle in the second task, which holds only what serving needs.
    let connections = state.connections.clone();
    let tracker = connections.clone();
    tracker.spawn(async move {
        if let Some((connection, socket)) = join(upgrading, state, target, grant).await {
            // A combinator, not an `async` block: that would store the serving future twice
            // (rust-lang/rust#62958), in every idle connection's task.
            connections.spawn(connection.serve(socket));
        }
    });
    response
}

/// Opens the socket and joins the session. An invalid path is closed with 1008; a session
/// that cannot be joined, with 1011, or 1013 when there is no room for it in memory (JSON
/// clients are told why first).
async fn join(
    upgrading: Upgrading,
    state: AppState,
    target: Option<ConnectionTarget>,
    grant: Option<Arc<crate::auth::Claims>>,
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
    // A token that binds a name allows no other (the middleware checked the session).
    let (access, mut live) = match (&grant, &state.access.revocations) {
        (Some(claims), Some(revocations)) => {
            if claims
                .user
                .as_deref()
                .is_some_and(|bound| target.user.as_deref() != Some(bound))
            {
                socket.close(CLOSE_NAME_NOT_YOURS).await;
                return None;
            }
            let live = LiveGrant::new(&target.session, claims, revocations);
            (claims.access(), Some(Box::new(live)))
        }
        _ => (Access::OPEN, None),
    };
    // Revoked between the middleware's check and this connection's watch.
    if live.as_mut().is_some_and(|live| live.is_revoked()) {
        socket.close(CLOSE_TOKEN_REVOKED).await;
        return None;
    }
    let peer = state.registry.next_peer_id();
    let request = JoinRequest {
        peer,
        kind: target.kind,
        user: target.user.clone(),
        access,
        outbox: outbox.clone(),
    };
    let session = match state.registry.join(&target.session, request).await {
        Ok(handle) => handle,
        Err(JoinError::NameHeld) => {
            if state.rejected_warnings.allow() {
                warn!(session = %target.session, user = target.user.as_deref().unwrap_or("-"), "refused: the user name is held by another connection");
            }
            socket.close(CLOSE_NAME_NOT_YOURS).await;
            return None;
        }
        Err(e) => {
            if state.rejected_warnings.allow() {
                warn!(session = %target.session, error = ?e, "join failed");
            }
            let (message, close) = match e {
                JoinError::Full => (
                    "the server holds as many sessions as it may; try again later",
                    CLOSE_SERVER_FULL,
                ),
                _ => ("the session could not be loaded", CLOSE_INTERNAL),
            };
            if target.kind.speaks_json() {
                let error = ProtocolError::new(ErrorCode::Unavailable, message);
                let _ = outbox.send(&Frame::text(&json::encode_error(&error)));
            }
            socket.close(close).await;
            return None;
        }
    };
    let user: Arc<str> = target.user.unwrap_or_else(|| Arc::from("-"));
    info!(session = %target.session, user = %user, peer, kind = ?target.kind, "connection opened");
    let connection = Connection {
        config: state.config.clone(),
        rejected_warnings: state.rejected_warnings.clone(),
        session,
        peer,
        user,
        kind: target.kind,
        outbox,
        live,
    };
    Some((connection, socket))
}
