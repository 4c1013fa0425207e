//! The HTTP API: health, metrics, session listings (in memory; in the store), the scene as
//! JSON, and the document as one Yjs update (read and write).

use std::sync::Arc;
use std::time::SystemTime;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use serde_json::json;

use super::path::api_session;
use super::AppState;
use collab_core::doc::CheckedUpdate;
use collab_core::protocol::json::timestamp;
use collab_core::session::Summary;

use crate::budget::Account;
use crate::session::{ApiUpdate, SessionMsg};

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": message.into()}))).into_response()
}

fn invalid_session() -> Response {
    error(StatusCode::BAD_REQUEST, "invalid session id")
}

/// 503: the session failed, or there is no room for it in memory (`--max-sessions`).
fn unavailable() -> Response {
    let mut response = error(StatusCode::SERVICE_UNAVAILABLE, "session unavailable");
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "no such session")
}

/// `GET /health`
pub async fn health(State(state): State<AppState>) -> Response {
    Json(json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "sessions": state.registry.loaded(),
        "connections": state.connections.len(),
        "memory_budget": state.budget.usage(),
    }))
    .into_response()
}

/// `GET /metrics`
pub async fn metrics(State(state): State<AppState>) -> Response {
    let body = state
        .metrics
        .as_ref()
        .map(|h| h.render())
        .unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

/// `GET /api/sessions`: the sessions in memory.
pub async fn sessions(State(state): State<AppState>) -> Response {
    let mut list: Vec<Summary> = Vec::new();
    for handle in state.registry.handles() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if handle.send(SessionMsg::Summary(tx)).await.is_ok() {
            if let Ok(summary) = rx.await {
                list.push(summary);
            }
        }
    }
    list.sort_by(|a, b| a.id.cmp(&b.id));
    Json(list).into_response()
}

/// `GET /api/store/sessions`: every stored session, in memory or not, with its stored size and
/// last change, beside the server's clock (`now`) to read those against. Loads no document.
pub async fn stored_sessions(State(state): State<AppState>) -> Response {
    match state.registry.store().list().await {
        Ok(sessions) => Json(json!({
            "now": timestamp(SystemTime::now()),
            "sessions": sessions,
        }))
        .into_response(),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the store cannot list its sessions: {e}"),
        ),
    }
}

/// `GET /api/sessions/{session}/scene` (404 for a session neither in memory nor stored)
pub async fn scene(State(state): State<AppState>, uri: Uri) -> Response {
    let Some(id) = api_session(uri.path()) else {
        return invalid_session();
    };
    match state
        .registry
        .request_existing(&id, SessionMsg::Scene)
        .await
    {
        Ok(Some(scene)) => ([(header::CONTENT_TYPE, "application/json")], scene).into_response(),
        Ok(None) => not_found(),
        Err(_) => unavailable(),
    }
}

/// `GET /api/sessions/{session}/update` (404 for a session neither in memory nor stored)
pub async fn get_update(State(state): State<AppState>, uri: Uri) -> Response {
    let Some(id) = api_session(uri.path()) else {
        return invalid_session();
    };
    match state
        .registry
        .request_existing(&id, SessionMsg::EncodeState)
        .await
    {
        Ok(Some(Ok(update))) => {
            ([(header::CONTENT_TYPE, "application/octet-stream")], update).into_response()
        }
        Ok(Some(Err(e))) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        Ok(None) => not_found(),
        Err(_) => unavailable(),
    }
}

/// Reads a request body of at most `max` bytes within `--http-body-timeout` (else 408, and the
/// connection closes), counted in the memory budget while it is read and held: 413 past `max`,
/// 503 when the budget sheds it (it holds the most).
async fn read_body(
    state: &AppState,
    body: Body,
    max: usize,
) -> Result<(Vec<u8>, Arc<Account>), Response> {
    let account = state.budget.standalone_account();
    let read = async {
        let mut bytes = Vec::new();
        let mut chunks = body.into_data_stream();
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map_err(|e| error(StatusCode::BAD_REQUEST, e.to_string()))?;
            if bytes.len() + chunk.len() > max {
                return Err(error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("the body is larger than {max} bytes"),
                ));
            }
            if account.grow(chunk.len()).is_err() {
                metrics::counter!("collab_bodies_shed_total").increment(1);
                return Err(error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the server's memory budget is spent; retry later",
                ));
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes)
    };
    let outcome = tokio::time::timeout(state.config.http_body_timeout, read).await;
    match outcome {
        Ok(Ok(bytes)) => Ok((bytes, account)),
        Ok(Err(response)) => Err(response),
        Err(_) => {
            if state.rejected_warnings.allow() {
                tracing::warn!("request body not received in time: 408");
            }
            let mut response = error(
                StatusCode::REQUEST_TIMEOUT,
                "the request body did not arrive in time",
            );
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            Err(response)
        }
    }
}

/// `POST /api/sessions/{session}/update`: applies a v1 update like any client's.
pub async fn post_update(State(state): State<AppState>, uri: Uri, body: Body) -> Response {
    let Some(id) = api_session(uri.path()) else {
        return invalid_session();
    };
    // Held (and counted) until the session answered.
    let (body, _held) = match read_body(&state, body, state.config.max_message_bytes).await {
        Ok(read) => read,
        Err(response) => return response,
    };
    let update = match CheckedUpdate::check(body) {
        Ok(update) => update,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid Yjs bytes: {e}")),
    };
    match state
        .registry
        .request(&id, |reply| {
            SessionMsg::ApplyUpdate(Box::new(ApiUpdate {
                update: update.clone(),
                reply,
            }))
        })
        .await
    {
        Some(Ok(())) => Json(json!({"status": "applied"})).into_response(),
        Some(Err(e)) => error(StatusCode::BAD_REQUEST, e),
        None => unavailable(),
    }
}
