//! The browser pages: `GET /` (the sessions dashboard) and `GET /s/{session}` (the live bench),
//! with their scripts and styles from `web/`, embedded at compile time: no build step, no CDN,
//! and a binary that serves them offline on a lab network.
//!
//! The pages use only what the server already speaks (ARCHITECTURE.md, "The browser pages"):
//! the bench view joins `/ws/{session}/{viewer name}` as a desktop-protocol client, the dashboard
//! polls `/api/sessions`, `/health`, `/metrics` and `/api/process`. Every URL a page builds is
//! relative to where it was loaded from, so a `/t/{token}` prefix (PROTOCOL §8) carries over
//! without a change here.

use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use super::path::parse_segments;
use super::AppState;

/// One embedded file of `web/`.
struct Asset {
    name: &'static str,
    mime: &'static str,
    body: &'static str,
}

macro_rules! asset {
    ($name:literal, $mime:expr) => {
        Asset {
            name: $name,
            mime: $mime,
            body: include_str!(concat!("../../web/", $name)),
        }
    };
}

const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const HTML: &str = "text/html; charset=utf-8";

/// Everything under `/assets/`. The two pages themselves are served by their own routes.
const ASSETS: &[Asset] = &[
    asset!("style.css", CSS),
    asset!("base.js", JS),
    asset!("desktop-link.js", JS),
    asset!("scene.js", JS),
    asset!("geometry.js", JS),
    asset!("draw.js", JS),
    asset!("raytrace.js", JS),
    asset!("ray-layer.js", JS),
    asset!("viewport.js", JS),
    asset!("drag.js", JS),
    asset!("people.js", JS),
    asset!("view.js", JS),
    asset!("dashboard.js", JS),
    asset!("favicon.svg", "image/svg+xml"),
];

const DASHBOARD_HTML: &str = include_str!("../../web/dashboard.html");
const VIEW_HTML: &str = include_str!("../../web/view.html");

/// Scripts may only come from this server, and connect back to it (the WebSocket and the API).
const CSP: &str = "default-src 'self'; connect-src 'self' ws: wss:; \
                   style-src 'self' 'unsafe-inline'; img-src 'self' data:";

/// The routes of the pages, merged into the server's router.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(dashboard))
        .route("/s/{session}", get(view))
        .route("/assets/{file}", get(asset))
        .route("/api/process", get(process))
}

fn page(body: &'static str) -> Response {
    let mut response = ([(header::CONTENT_TYPE, HTML)], body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    // The pages are tiny and change with the binary: always revalidate.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// `GET /`
async fn dashboard() -> Response {
    page(DASHBOARD_HTML)
}

/// `GET /s/{session}`: one page for every session; the script reads the session from its URL.
async fn view(uri: Uri) -> Response {
    if parse_segments(uri.path(), "/s/", 1).is_none() {
        return (StatusCode::BAD_REQUEST, "invalid session id").into_response();
    }
    page(VIEW_HTML)
}

/// `GET /assets/{file}`
async fn asset(Path(file): Path<String>) -> Response {
    match ASSETS.iter().find(|a| a.name == file) {
        Some(a) => (
            [
                (header::CONTENT_TYPE, a.mime),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            a.body,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no such asset").into_response(),
    }
}

/// `GET /api/process`: what the dashboard shows of the process beyond `/health` and
/// `/metrics`: its resident memory (Linux; `null` elsewhere) and the memory budget's use.
async fn process(State(state): State<AppState>) -> Response {
    Json(json!({ "rss_bytes": rss_bytes(), "budget": state.budget.usage() })).into_response()
}

/// `VmRSS` of `/proc/self/status`, in bytes.
fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_the_pages_name_is_embedded() {
        // A page or module (`from './x.js'`) naming a file not in ASSETS would 404 in the
        // browser only.
        let sources = ASSETS
            .iter()
            .map(|a| a.body)
            .chain([DASHBOARD_HTML, VIEW_HTML]);
        for source in sources {
            let references = source
                .match_indices("assets/")
                .map(|(i, m)| i + m.len())
                .chain(source.match_indices("from './").map(|(i, m)| i + m.len()));
            for start in references {
                let rest = &source[start..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
                    .collect();
                assert!(
                    ASSETS.iter().any(|a| a.name == name),
                    "assets/{name} is referenced but not embedded"
                );
            }
        }
        for a in ASSETS {
            assert!(!a.body.is_empty(), "{} is empty", a.name);
        }
    }

    #[test]
    fn mime_types() {
        for a in ASSETS {
            let want = match a.name.rsplit('.').next() {
                Some("js") => JS,
                Some("css") => CSS,
                Some("svg") => "image/svg+xml",
                other => panic!("unexpected asset type {other:?}"),
            };
            assert_eq!(a.mime, want, "{}", a.name);
        }
    }

    #[test]
    fn rss_is_read_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(rss_bytes().unwrap() > 0);
        }
    }
}
