//! The admin endpoints of access control: `POST /api/tokens` (mint) and
//! `POST /api/sessions/{session}/revoke`; and the connection strings a token is handed out
//! with, shared with the `token` command.

use std::time::{Duration, SystemTime};

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use collab_core::protocol::json::timestamp;
use collab_core::session::Role;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{MintRequest, ALL_SESSIONS};
use crate::server::path::{api_session, normalize_name};
use crate::server::AppState;

/// Default time to live of a minted token.
pub const DEFAULT_TTL: Duration = Duration::from_secs(7 * 86_400);

/// Longest time to live the API mints (ten years).
const MAX_TTL_SECONDS: u64 = 10 * 365 * 86_400;

/// A minted token and the ways to use it.
#[derive(Debug, Clone, Serialize)]
pub struct Minted {
    pub token: String,
    pub session: String,
    pub role: Role,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    pub expires_at: String,
    /// The server URL to type into the desktop app (it appends `/ws/{session}/{user}`).
    pub desktop_url: String,
    /// A y-websocket URL (`WebsocketProvider(serverUrl, room, doc, {params: {token}})`).
    pub yjs_url: String,
    /// The bench in a browser (the dashboard for a token of every session).
    pub browser_url: String,
    /// The scene over HTTP, as a curl command.
    pub curl: String,
}

impl Minted {
    /// The connection strings of `token` on the server at `base` (`http[s]://host:port`).
    pub fn new(base: &str, token: String, claims: &super::Claims) -> Minted {
        let base = base.trim_end_matches('/');
        let ws_base = if let Some(rest) = base.strip_prefix("https://") {
            format!("wss://{rest}")
        } else {
            format!("ws://{}", base.strip_prefix("http://").unwrap_or(base))
        };
        let all = claims.session == ALL_SESSIONS;
        let session = utf8_percent_encode(&claims.session, NON_ALPHANUMERIC).to_string();
        let (yjs_url, browser_url, curl_path) = if all {
            (
                format!("{ws_base}/yjs/SESSION?token={token}"),
                format!("{base}/t/{token}/"),
                "/api/sessions".to_owned(),
            )
        } else {
            (
                format!("{ws_base}/yjs/{session}?token={token}"),
                format!("{base}/t/{token}/s/{session}"),
                format!("/api/sessions/{session}/scene"),
            )
        };
        Minted {
            desktop_url: format!("{ws_base}/t/{token}"),
            yjs_url,
            browser_url,
            curl: format!("curl -H 'Authorization: Bearer {token}' {base}{curl_path}"),
            session: claims.session.clone(),
            role: claims.role,
            user: claims.user.clone(),
            expires_at: timestamp(claims.expires_at()),
            token,
        }
    }
}

/// What `POST /api/tokens` takes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    pub session: String,
    pub role: Role,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub ttl_seconds: Option<u64>,
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": message.into()}))).into_response()
}

fn not_enabled() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "the server runs without --auth-key: there are no tokens",
    )
}

/// The server's own base URL as the request reached it (a proxy's `X-Forwarded-Proto`
/// counts).
fn base_url(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    let scheme = headers
        .get("x-forwarded-proto")
        .and_then(|h| h.to_str().ok())
        .filter(|p| *p == "https")
        .unwrap_or("http");
    format!("{scheme}://{host}")
}

/// A session claim: one valid session name, or `*`.
pub fn session_claim(session: &str) -> Option<String> {
    if session == ALL_SESSIONS {
        Some(session.to_owned())
    } else {
        normalize_name(session)
    }
}

/// `POST /api/tokens` (admin).
pub async fn mint(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let Some(keys) = &state.access.keys else {
        return not_enabled();
    };
    let request: TokenRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid request: {e}")),
    };
    let Some(session) = session_claim(&request.session) else {
        return error(StatusCode::BAD_REQUEST, "invalid session id");
    };
    let user = match request.user.as_deref().map(normalize_name) {
        Some(None) => return error(StatusCode::BAD_REQUEST, "invalid user name"),
        Some(Some(user)) => Some(user),
        None => None,
    };
    let ttl = match request.ttl_seconds {
        Some(0) => return error(StatusCode::BAD_REQUEST, "ttl_seconds must be more than 0"),
        Some(s) if s > MAX_TTL_SECONDS => {
            return error(StatusCode::BAD_REQUEST, "ttl_seconds is over ten years")
        }
        Some(s) => Duration::from_secs(s),
        None => DEFAULT_TTL,
    };
    let mint = MintRequest {
        session,
        role: request.role,
        user,
        ttl,
    };
    match keys.mint(&mint, SystemTime::now()) {
        Ok((token, claims)) => {
            Json(Minted::new(&base_url(&headers), token, &claims)).into_response()
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// `POST /api/sessions/{session}/revoke` (admin): every token of the session issued before
/// now is refused from now on, and its connections are closed (4403).
pub async fn revoke(State(state): State<AppState>, uri: Uri) -> Response {
    let Some(revocations) = &state.access.revocations else {
        return not_enabled();
    };
    let Some(session) = api_session(uri.path()) else {
        return error(StatusCode::BAD_REQUEST, "invalid session id");
    };
    let now = SystemTime::now();
    match revocations.revoke(&session, now).await {
        Ok(revoked_before) => {
            tracing::info!(session = %session, "tokens revoked");
            Json(json!({"session": session, "revoked_before": timestamp(revoked_before)}))
                .into_response()
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}
