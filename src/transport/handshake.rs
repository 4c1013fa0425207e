//! The opening handshake (RFC 6455 §4.2), answered by this server itself rather than by
//! axum's `WebSocketUpgrade`: it keeps the TCP stream, which session tasks write to directly.
//!
//! A request that is no upgrade at all is answered 426 (RFC 9110 §15.5.22: with `Upgrade`);
//! one that asks for a WebSocket but gets the handshake wrong, 400; an unknown WebSocket
//! version, 426 with the version this server speaks (RFC 6455 §4.4); any method but GET, 405.

use axum::extract::FromRequestParts;
use axum::http::header::{
    ALLOW, CONNECTION, HOST, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION,
    UPGRADE,
};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tracing::error;

use super::{HttpStream, Outbox, Socket, SocketConfig};

/// A valid WebSocket upgrade request (RFC 6455 §4.2.1).
pub struct Upgrade {
    on_upgrade: OnUpgrade,
    accept: HeaderValue,
}

/// Why a request is not upgraded: its status and a short text for the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    pub status: StatusCode,
    pub reason: &'static str,
}

impl Rejection {
    fn bad(reason: &'static str) -> Rejection {
        Rejection {
            status: StatusCode::BAD_REQUEST,
            reason,
        }
    }

    fn upgrade_required(reason: &'static str) -> Rejection {
        Rejection {
            status: StatusCode::UPGRADE_REQUIRED,
            reason,
        }
    }
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        let mut response = (self.status, self.reason).into_response();
        let headers = response.headers_mut();
        match self.status {
            // RFC 9110 §15.5.6: a 405 names the allowed methods.
            StatusCode::METHOD_NOT_ALLOWED => {
                headers.insert(ALLOW, HeaderValue::from_static("GET"));
            }
            // RFC 9110 §15.5.22: a 426 names the protocol to upgrade to; RFC 6455 §4.4: and
            // the WebSocket version this server speaks.
            StatusCode::UPGRADE_REQUIRED => {
                headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
                headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
                headers.insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
            }
            _ => {}
        }
        response
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = Rejection;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Rejection> {
        let accept = check(&parts.method, parts.version, &parts.headers)?;
        // Present on every HTTP/1.1 connection hyper serves with upgrades enabled.
        let on_upgrade =
            parts
                .extensions
                .remove::<OnUpgrade>()
                .ok_or(Rejection::upgrade_required(
                    "this connection cannot be upgraded",
                ))?;
        Ok(Upgrade { on_upgrade, accept })
    }
}

/// Checks an upgrade request against RFC 6455 §4.2.1; on success, the
/// `Sec-WebSocket-Accept` value that answers it.
fn check(method: &Method, version: Version, headers: &HeaderMap) -> Result<HeaderValue, Rejection> {
    if method != Method::GET {
        return Err(Rejection {
            status: StatusCode::METHOD_NOT_ALLOWED,
            reason: "a WebSocket is opened with GET",
        });
    }
    // HTTP/2 has its own way (RFC 8441), which this server does not offer.
    if version != Version::HTTP_11 {
        return Err(Rejection::bad("a WebSocket is opened over HTTP/1.1"));
    }
    if !has_token(headers, UPGRADE, "websocket") {
        return Err(Rejection::upgrade_required("this endpoint is a WebSocket"));
    }
    if !has_token(headers, CONNECTION, "upgrade") {
        return Err(Rejection::bad(
            "`Connection` header does not include `upgrade`",
        ));
    }
    if !headers.contains_key(HOST) {
        return Err(Rejection::bad("`Host` header is missing"));
    }
    // Before the key: other versions' handshakes differ, so the version decides how to read
    // the rest.
    if single(headers, SEC_WEBSOCKET_VERSION).map(HeaderValue::as_bytes) != Some(b"13") {
        return Err(Rejection::upgrade_required(
            "`Sec-WebSocket-Version` is not `13`",
        ));
    }
    let key = single(headers, SEC_WEBSOCKET_KEY)
        .filter(|key| is_nonce(key.as_bytes()))
        .ok_or(Rejection::bad(
            "`Sec-WebSocket-Key` is not the base64 of 16 bytes",
        ))?;
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    // Base64 is always a valid header value.
    HeaderValue::from_str(&accept).map_err(|_| Rejection::bad("`Sec-WebSocket-Key` is invalid"))
}

/// The header's value when it is given exactly once.
fn single(headers: &HeaderMap, name: HeaderName) -> Option<&HeaderValue> {
    let mut values = headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (Some(value), None) => Some(value),
        _ => None,
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

/// Whether `key` is the base64 of 16 bytes (RFC 6455 §4.1, item 7).
fn is_nonce(key: &[u8]) -> bool {
    // Room for what 24 base64 characters may hold: a longer key does not fit and is refused.
    let mut nonce = [0u8; 18];
    base64::engine::general_purpose::STANDARD.decode_slice(key, &mut nonce) == Ok(16)
}

/// An upgrade that was answered with 101: the socket follows.
pub struct Upgrading {
    on_upgrade: OnUpgrade,
}

impl Upgrade {
    /// The `101 Switching Protocols` response, and the socket to come once it was sent.
    pub fn accept(self) -> (Response, Upgrading) {
        let response = (
            StatusCode::SWITCHING_PROTOCOLS,
            [
                (CONNECTION, HeaderValue::from_static("upgrade")),
                (UPGRADE, HeaderValue::from_static("websocket")),
                (SEC_WEBSOCKET_ACCEPT, self.accept),
            ],
        )
            .into_response();
        let upgrading = Upgrading {
            on_upgrade: self.on_upgrade,
        };
        (response, upgrading)
    }
}

impl Upgrading {
    /// Waits for the upgrade and opens the socket; `None` if the connection went away first.
    pub async fn open(self, config: SocketConfig) -> Option<(Socket, Outbox)> {
        let upgraded = self.on_upgrade.await.ok()?;
        let parts = match hyper_util::server::conn::auto::upgrade::downcast::<TokioIo<HttpStream>>(
            upgraded,
        ) {
            Ok(parts) => parts,
            Err(_) => {
                error!("an upgraded connection is not a TCP stream");
                return None;
            }
        };
        // tungstenite starts with what hyper already read past the request.
        let read = parts.read_buf.to_vec();
        let (stream, slot) = parts.io.into_inner().into_parts();
        Some(Socket::new(stream, slot, read, config).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The RFC 6455 §1.3 example, as a browser sends it, without the headers named in
    /// `without`, then with `extra` added.
    fn headers(extra: &[(&'static str, &'static str)], without: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let all = [
            ("host", "server.example.com"),
            ("upgrade", "websocket"),
            ("connection", "Upgrade"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("sec-websocket-version", "13"),
        ];
        for (name, value) in all.iter().filter(|(name, _)| !without.contains(name)) {
            headers.append(*name, HeaderValue::from_static(value));
        }
        for (name, value) in extra {
            headers.append(*name, HeaderValue::from_static(value));
        }
        headers
    }

    fn get(headers: &HeaderMap) -> Result<HeaderValue, Rejection> {
        check(&Method::GET, Version::HTTP_11, headers)
    }

    fn status(result: Result<HeaderValue, Rejection>) -> StatusCode {
        match result {
            Ok(_) => StatusCode::SWITCHING_PROTOCOLS,
            Err(rejection) => rejection.status,
        }
    }

    #[test]
    fn the_rfc_example_is_accepted_with_its_accept_key() {
        assert_eq!(
            get(&headers(&[], &[])).unwrap(),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn tokens_are_case_insensitive_and_may_be_listed() {
        let mut listed = headers(&[], &["upgrade", "connection"]);
        listed.append("upgrade", HeaderValue::from_static("h2c, WebSocket"));
        listed.append("connection", HeaderValue::from_static("keep-alive"));
        listed.append("connection", HeaderValue::from_static("x, UPGRADE"));
        assert!(get(&listed).is_ok());
    }

    #[test]
    fn only_get_is_upgraded() {
        for method in [Method::HEAD, Method::POST, Method::PUT, Method::CONNECT] {
            let rejected = check(&method, Version::HTTP_11, &headers(&[], &[]));
            assert_eq!(status(rejected), StatusCode::METHOD_NOT_ALLOWED, "{method}");
        }
    }

    #[test]
    fn only_http_1_1_is_upgraded() {
        for version in [Version::HTTP_10, Version::HTTP_2] {
            let rejected = check(&Method::GET, version, &headers(&[], &[]));
            assert_eq!(status(rejected), StatusCode::BAD_REQUEST, "{version:?}");
        }
    }

    #[test]
    fn a_request_that_asks_for_no_websocket_is_told_to_upgrade() {
        let plain = headers(&[], &["upgrade", "connection"]);
        assert_eq!(status(get(&plain)), StatusCode::UPGRADE_REQUIRED);
        let other = headers(&[("upgrade", "h2c")], &["upgrade"]);
        assert_eq!(status(get(&other)), StatusCode::UPGRADE_REQUIRED);
    }

    #[test]
    fn a_wrong_handshake_is_a_bad_request() {
        for missing in ["connection", "host", "sec-websocket-key"] {
            let rejected = get(&headers(&[], &[missing]));
            assert_eq!(status(rejected), StatusCode::BAD_REQUEST, "{missing}");
        }
        let keep_alive = headers(&[("connection", "keep-alive")], &["connection"]);
        assert_eq!(status(get(&keep_alive)), StatusCode::BAD_REQUEST);
        let twice = headers(&[("sec-websocket-key", "AAAAAAAAAAAAAAAAAAAAAA==")], &[]);
        assert_eq!(status(get(&twice)), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn the_key_is_the_base64_of_16_bytes() {
        for (key, ok) in [
            ("AAAAAAAAAAAAAAAAAAAAAA==", true),
            // 15 and 17 bytes.
            ("AAAAAAAAAAAAAAAAAAAA", false),
            ("AAAAAAAAAAAAAAAAAAAAAAA=", false),
            // 16 bytes without padding, in the URL-safe alphabet, with a stray character.
            ("AAAAAAAAAAAAAAAAAAAAAA", false),
            ("-_AAAAAAAAAAAAAAAAAAAA==", false),
            ("AAAAAAAAAAAAAAAAAAAAAA=!", false),
            ("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", false),
            ("", false),
        ] {
            let with_key = headers(&[("sec-websocket-key", key)], &["sec-websocket-key"]);
            assert_eq!(get(&with_key).is_ok(), ok, "{key:?}");
        }
    }

    #[test]
    fn another_version_is_told_which_one_to_use() {
        for version in [Some("12"), Some("8"), Some("13, 8"), Some(""), None] {
            let with_version = match version {
                Some(v) => headers(&[("sec-websocket-version", v)], &["sec-websocket-version"]),
                None => headers(&[], &["sec-websocket-version"]),
            };
            let rejected = get(&with_version);
            assert_eq!(
                status(rejected.clone()),
                StatusCode::UPGRADE_REQUIRED,
                "{version:?}"
            );
            let response = rejected.unwrap_err().into_response();
            assert_eq!(response.headers()[SEC_WEBSOCKET_VERSION], "13");
            assert_eq!(response.headers()[UPGRADE], "websocket");
        }
    }

    #[test]
    fn a_405_names_get() {
        let rejected = check(&Method::HEAD, Version::HTTP_11, &headers(&[], &[]));
        let response = rejected.unwrap_err().into_response();
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(response.headers()[ALLOW], "GET");
    }
}
