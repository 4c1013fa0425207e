//! The HTTP side of access control, one middleware around the whole router (so that it runs
//! before routing): it takes the token from where each client can carry it, strips a
//! `/t/{token}` prefix so that every route (the pages and their relative URLs included) works
//! behind it, refuses a foreign `Origin`, and checks what the endpoint needs.
//!
//! Refusals are HTTP answers, WebSocket upgrades included (before any 101): 401 for a missing,
//! invalid, expired or revoked token, 403 for a token that does not cover the session or role,
//! or a foreign origin. Tokens are never logged: nothing here logs the URI.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use collab_core::session::Role;
use percent_encoding::percent_decode_str;
use serde_json::json;

use super::{normalize_origin, AccessControl, Claims, TokenError};
use crate::server::path::decode_name;

/// The verified claims of the request's token, for the handlers (absent in open mode and on
/// `/health`).
#[derive(Debug, Clone)]
pub struct Grant(pub Arc<Claims>);

/// What an endpoint needs.
#[derive(Debug, PartialEq, Eq)]
enum Need {
    /// `/health`.
    Nothing,
    /// `/metrics`, the API beyond one session's document.
    Admin,
    /// A session's document, pages, connections: a token covering it with this role at least
    /// (the session enforces the role of connections itself).
    Session(String, Role),
    /// Pages and assets that show no session: any valid token.
    AnyToken,
}

fn need(method: &Method, path: &str) -> Need {
    if path == "/health" {
        return Need::Nothing;
    }
    if path == "/metrics" {
        return Need::Admin;
    }
    if let Some(rest) = path.strip_prefix("/api/sessions/") {
        let role = match rest.split_once('/') {
            Some((_, "scene")) => Some(Role::View),
            Some((_, "update")) if method == Method::POST => Some(Role::Edit),
            Some((_, "update")) => Some(Role::View),
            _ => None,
        };
        return match (role, first_segment(rest)) {
            (Some(role), Some(session)) => Need::Session(session, role),
            _ => Need::Admin,
        };
    }
    if path.starts_with("/api/") {
        return Need::Admin;
    }
    for prefix in ["/ws/", "/yjs/", "/s/"] {
        if let Some(session) = path.strip_prefix(prefix).and_then(first_segment) {
            return Need::Session(session, Role::View);
        }
    }
    Need::AnyToken
}

fn first_segment(rest: &str) -> Option<String> {
    decode_name(rest.split('/').next()?)
}

/// Splits a `/t/{token}` prefix off a path: (token, the rest).
fn split_path_token(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix("/t/")?;
    let (token, rest) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    (!token.is_empty()).then_some((token, rest))
}

fn query_token(query: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let value = pair.strip_prefix("token=")?;
        percent_decode_str(value)
            .decode_utf8()
            .ok()
            .map(|v| v.into_owned())
    })
}

fn bearer_token(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_owned())
}

/// Whether a request's `Origin` is the server's own (the authority of the `Host` it was sent
/// to) or listed.
fn origin_allowed(origin: &str, host: Option<&str>, allowed: &[String]) -> bool {
    let origin = normalize_origin(origin);
    let authority = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    let own = matches!((authority, host), (Some(a), Some(h)) if a == h.to_ascii_lowercase());
    own || allowed.contains(&origin)
}

fn refuse(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({"error": message}))).into_response()
}

/// The middleware (`axum::middleware::from_fn_with_state`).
pub async fn guard(
    State(access): State<Arc<AccessControl>>,
    mut request: Request,
    next: Next,
) -> Response {
    let path_token = split_path_token(request.uri().path())
        .map(|(token, rest)| (token.to_owned(), rest.to_owned()));
    let token = match path_token {
        Some((token, rest)) => {
            let path_and_query = match request.uri().query() {
                Some(query) => format!("{rest}?{query}"),
                None => rest,
            };
            match Uri::builder().path_and_query(path_and_query).build() {
                Ok(uri) => *request.uri_mut() = uri,
                Err(_) => return refuse(StatusCode::BAD_REQUEST, "invalid path"),
            }
            Some(token)
        }
        None => request
            .uri()
            .query()
            .and_then(query_token)
            .or_else(|| bearer_token(request.headers())),
    };

    if let Some(origin) = request.headers().get(header::ORIGIN) {
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok());
        let allowed = origin
            .to_str()
            .is_ok_and(|o| origin_allowed(o, host, &access.allowed_origins));
        if !allowed {
            metrics::counter!("collab_refused_requests_total", "reason" => "origin").increment(1);
            return refuse(StatusCode::FORBIDDEN, "origin not allowed");
        }
    }

    if access.enabled() {
        let need = need(request.method(), request.uri().path());
        if need != Need::Nothing {
            match authorize(&access, token.as_deref(), &need) {
                Ok(claims) => {
                    request.extensions_mut().insert(Grant(Arc::new(claims)));
                }
                Err((status, why)) => {
                    metrics::counter!("collab_refused_requests_total", "reason" => why)
                        .increment(1);
                    return refuse(status, why);
                }
            }
        }
    }
    next.run(request).await
}

fn authorize(
    access: &AccessControl,
    token: Option<&str>,
    need: &Need,
) -> Result<Claims, (StatusCode, &'static str)> {
    let unauthorized = |e: TokenError| {
        let why = match e {
            TokenError::Missing => "no token",
            TokenError::Invalid => "invalid token",
            TokenError::Expired => "token expired",
            TokenError::Revoked => "token revoked",
        };
        (StatusCode::UNAUTHORIZED, why)
    };
    let token = token.ok_or(unauthorized(TokenError::Missing))?;
    let session = match need {
        Need::Session(session, _) => Some(session.as_str()),
        _ => None,
    };
    let claims = access.verify(token, session).map_err(unauthorized)?;
    let covered = match need {
        Need::Nothing | Need::AnyToken => true,
        Need::Admin => claims.role == Role::Admin,
        Need::Session(session, role) => {
            claims.role == Role::Admin || (claims.covers(session) && claims.role >= *role)
        }
    };
    if covered {
        Ok(claims)
    } else {
        Err((StatusCode::FORBIDDEN, "the token does not allow this"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_need_what_they_show() {
        let get = Method::GET;
        assert_eq!(need(&get, "/health"), Need::Nothing);
        assert_eq!(need(&get, "/metrics"), Need::Admin);
        assert_eq!(need(&get, "/api/sessions"), Need::Admin);
        assert_eq!(need(&get, "/api/process"), Need::Admin);
        assert_eq!(need(&Method::POST, "/api/tokens"), Need::Admin);
        assert_eq!(need(&Method::POST, "/api/sessions/a/revoke"), Need::Admin);
        assert_eq!(
            need(&get, "/api/sessions/a%20b/scene"),
            Need::Session("a b".into(), Role::View)
        );
        assert_eq!(
            need(&Method::POST, "/api/sessions/a/update"),
            Need::Session("a".into(), Role::Edit)
        );
        assert_eq!(
            need(&get, "/ws/lab/ann"),
            Need::Session("lab".into(), Role::View)
        );
        assert_eq!(
            need(&get, "/yjs/lab"),
            Need::Session("lab".into(), Role::View)
        );
        assert_eq!(
            need(&get, "/s/lab"),
            Need::Session("lab".into(), Role::View)
        );
        assert_eq!(need(&get, "/"), Need::AnyToken);
        assert_eq!(need(&get, "/assets/view.js"), Need::AnyToken);
    }

    #[test]
    fn the_path_token_is_split_off() {
        assert_eq!(split_path_token("/t/abc/ws/s/u"), Some(("abc", "/ws/s/u")));
        assert_eq!(split_path_token("/t/abc"), Some(("abc", "/")));
        assert_eq!(split_path_token("/t/abc/"), Some(("abc", "/")));
        assert_eq!(split_path_token("/t//ws"), None);
        assert_eq!(split_path_token("/ws/t/abc"), None);
        assert_eq!(query_token("yjs=1&token=a.b%2Ec"), Some("a.b.c".into()));
    }

    #[test]
    fn own_and_listed_origins_are_allowed() {
        let listed = vec!["https://lab.example".to_owned()];
        assert!(origin_allowed(
            "http://127.0.0.1:8765",
            Some("127.0.0.1:8765"),
            &[]
        ));
        assert!(origin_allowed("https://Lab.Example", Some("x:1"), &listed));
        assert!(!origin_allowed(
            "http://evil.example",
            Some("127.0.0.1:8765"),
            &listed
        ));
        assert!(!origin_allowed("null", Some("127.0.0.1:8765"), &listed));
        assert!(!origin_allowed(
            "http://127.0.0.1:9999",
            Some("127.0.0.1:8765"),
            &[]
        ));
    }
}
