//! Access control end to end (README, "Securing a server"): what each refusal answers, where
//! a token may be carried, that a `view` token changes nothing through any endpoint, that
//! expiry and revocation close live connections, bound user names, origins, and the admin-only
//! endpoints.

mod common;

use std::time::{Duration, SystemTime};

use collab_core::session::Role;
use common::durable::{start_sqlite, stop};
use common::*;
use futures_util::SinkExt;
use optiverse_collab::auth::cli::{revoke, RevokeArgs};
use optiverse_collab::auth::{Keys, MintRequest};
use optiverse_collab::config::{Config, KeyArgs, Secret};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use yrs::sync::{Message, SyncMessage};
use yrs::updates::encoder::Encode;
use yrs::Map as _;

const KEY: &str = "a test key of at least thirty-two bytes";
const SESSION: &str = "lab";

fn key_args() -> KeyArgs {
    KeyArgs {
        auth_key_file: None,
        auth_key: Some(Secret::new(KEY)),
    }
}

/// An authenticated server's config, keeping revocations in `dir`.
fn auth_config(dir: &std::path::Path) -> Config {
    let mut config = test_config();
    config.key = key_args();
    config.data_dir = dir.to_path_buf();
    config
}

async fn auth_server(dir: &std::path::Path) -> TestServer {
    TestServer::start_with(
        auth_config(dir),
        std::sync::Arc::new(optiverse_collab::store::memory::MemoryStore::new()),
    )
    .await
}

fn mint_at(
    key: &str,
    session: &str,
    role: Role,
    user: Option<&str>,
    ttl: Duration,
    at: SystemTime,
) -> String {
    let keys = Keys::new(key.as_bytes()).expect("a long enough key");
    let request = MintRequest {
        session: session.to_owned(),
        role,
        user: user.map(str::to_owned),
        ttl,
    };
    keys.mint(&request, at).expect("minted").0
}

fn mint(session: &str, role: Role, user: Option<&str>) -> String {
    mint_at(
        KEY,
        session,
        role,
        user,
        Duration::from_secs(3600),
        SystemTime::now(),
    )
}

fn admin() -> String {
    mint("*", Role::Admin, None)
}

async fn get_as(server: &TestServer, path: &str, token: &str) -> (u16, Vec<u8>) {
    let bearer = format!("Bearer {token}");
    http_with(server.addr, "GET", path, &[("Authorization", &bearer)], &[]).await
}

async fn post_as(server: &TestServer, path: &str, token: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let bearer = format!("Bearer {token}");
    http_with(
        server.addr,
        "POST",
        path,
        &[("Authorization", &bearer)],
        body,
    )
    .await
}

async fn scene_items(server: &TestServer) -> Value {
    let (status, body) = get_as(server, &format!("/api/sessions/{SESSION}/scene"), &admin()).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    serde_json::from_slice::<Value>(&body).unwrap()["items"].clone()
}

/// A desktop client through the server URL a token makes (`ws://host/t/TOKEN`), with its ack.
async fn desktop(server: &TestServer, token: &str, user: &str) -> Ws {
    let mut ws = server
        .try_connect(&format!("/t/{token}/ws/{SESSION}/{user}"), &[])
        .await
        .expect("the upgrade is accepted");
    recv_ack(&mut ws, user).await;
    ws
}

/// A host that uploaded fixture item 0; returns it and the item.
async fn hosted(server: &TestServer) -> (Ws, Value) {
    let mut host = desktop(server, &mint(SESSION, Role::Edit, Some("host")), "host").await;
    let (_, _, item) = fixture_item(0);
    send_json(&mut host, &upload(&[&item], "host")).await;
    ping_collect(&mut host).await;
    (host, item)
}

#[tokio::test]
async fn each_refusal_answers_its_code_before_the_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let server = auth_server(dir.path()).await;
    let path = format!("/ws/{SESSION}/ann");
    let wrong_key = mint_at(
        "another key, also thirty-two bytes long",
        SESSION,
        Role::Edit,
        None,
        Duration::from_secs(60),
        SystemTime::now(),
    );
    let expired = mint_at(
        KEY,
        SESSION,
        Role::Edit,
        None,
        Duration::from_secs(60),
        SystemTime::now() - Duration::from_secs(3600),
    );
    let other_session = mint("another", Role::Edit, None);
    let cases = [
        ("no token", path.clone(), 401),
        ("garbage", format!("/t/not-a-token{path}"), 401),
        ("wrong key", format!("/t/{wrong_key}{path}"), 401),
        ("expired", format!("/t/{expired}{path}"), 401),
        ("another session", format!("/t/{other_session}{path}"), 403),
        (
            "another session, /yjs",
            format!("/yjs/{SESSION}?token={other_session}"),
            403,
        ),
    ];
    for (what, path, code) in cases {
        assert_eq!(
            server.try_connect(&path, &[]).await.err(),
            Some(code),
            "{what}"
        );
    }
    // The same over HTTP; /health stays open.
    assert_eq!(
        server
            .get(&format!("/api/sessions/{SESSION}/scene"))
            .await
            .0,
        401
    );
    assert_eq!(
        get_as(&server, "/api/sessions/lab/scene", &wrong_key)
            .await
            .0,
        401
    );
    assert_eq!(
        get_as(&server, "/api/sessions/lab/scene", &other_session)
            .await
            .0,
        403
    );
    assert_eq!(server.get("/").await.0, 401);
    assert_eq!(server.get("/health").await.0, 200);
}

#[tokio::test]
async fn the_token_works_as_a_path_prefix_a_query_parameter_and_a_bearer_header() {
    let dir = tempfile::tempdir().unwrap();
    let server = auth_server(dir.path()).await;
    let edit = mint(SESSION, Role::Edit, None);
    let (mut host, item) = hosted(&server).await;
    // The desktop client's URL, the y-websocket parameter, HTTP's header.
    let mut ann = desktop(&server, &edit, "ann").await;
    send_json(&mut ann, &json!({"type": "sync:request"})).await;
    let got = ping_collect(&mut ann).await;
    assert!(
        got.iter().any(|m| m["type"] == "sync:full_state"),
        "{got:#?}"
    );
    let (yjs, _) = YClient::join(&server, &format!("/yjs/{SESSION}?token={edit}")).await;
    let uuid = item["item_uuid"].as_str().unwrap();
    assert!(yjs.item(uuid).is_some(), "the Yjs client has the scene");
    let (status, body) = get_as(&server, &format!("/api/sessions/{SESSION}/scene"), &edit).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    // The pages and their relative asset URLs behind the prefix.
    assert_eq!(server.get(&format!("/t/{edit}/s/{SESSION}")).await.0, 200);
    assert_eq!(
        server.get(&format!("/t/{edit}/assets/view.js")).await.0,
        200
    );
    ping_collect(&mut host).await;
}

#[tokio::test]
async fn a_view_token_changes_nothing_through_any_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let server = auth_server(dir.path()).await;
    let (mut host, item) = hosted(&server).await;
    let before = scene_items(&server).await;
    let view = mint(SESSION, Role::View, None);

    // /ws: commands and uploads are refused with `forbidden`; reading works.
    let mut viewer = desktop(&server, &view, "viewer").await;
    send_json(&mut viewer, &json!({"type": "sync:request"})).await;
    let got = ping_collect(&mut viewer).await;
    assert!(
        got.iter().any(|m| m["type"] == "sync:full_state"),
        "{got:#?}"
    );
    let item_type = item["_type"].as_str().unwrap_or("component");
    let uuid = item["item_uuid"].as_str().unwrap();
    let mut moved = item.clone();
    moved["x_mm"] = json!(987.0);
    send_json(
        &mut viewer,
        &command("update_item", item_type, uuid, moved, "viewer"),
    )
    .await;
    send_json(
        &mut viewer,
        &command("remove_item", item_type, uuid, json!({}), "viewer"),
    )
    .await;
    send_json(&mut viewer, &upload(&[], "viewer")).await;
    let got = ping_collect(&mut viewer).await;
    assert_eq!(got.len(), 3, "{got:#?}");
    for msg in &got {
        assert_error(msg, "forbidden");
    }

    // ?yjs=1: the update is dropped, the client told.
    let doc_change = |id: u64| {
        let doc = yrs::Doc::with_client_id(id);
        edit(&doc, |txn, items| {
            items.insert(
                txn,
                "from-a-viewer",
                item_prelim("lens", &json!({"x_mm": 1.0})),
            );
        })
    };
    let mut legacy_yjs = server
        .try_connect(&format!("/ws/{SESSION}/viewer2?yjs=1&token={view}"), &[])
        .await
        .expect("upgrade");
    legacy_yjs
        .send(WsMessage::binary(
            Message::Sync(SyncMessage::Update(doc_change(901))).encode_v1(),
        ))
        .await
        .unwrap();
    loop {
        if let WsMessage::Text(text) = recv(&mut legacy_yjs).await {
            let msg: Value = serde_json::from_str(&text).unwrap();
            if msg["type"] == "error" {
                assert_error(&msg, "forbidden");
                break;
            }
        }
    }

    // /yjs: dropped too.
    let (mut yjs, _) = YClient::join(&server, &format!("/yjs/{SESSION}?token={view}")).await;
    yjs.send(Message::Sync(SyncMessage::Update(doc_change(902))))
        .await;
    // The session handled the update before this SyncStep1.
    yjs.sync().await;

    // HTTP: posting an update needs edit.
    let (status, _) = post_as(
        &server,
        &format!("/api/sessions/{SESSION}/update"),
        &view,
        &doc_change(903),
    )
    .await;
    assert_eq!(status, 403);

    assert_eq!(scene_items(&server).await, before, "the scene is unchanged");
    let heard = ping_collect(&mut host).await;
    assert!(
        heard
            .iter()
            .all(|m| m["type"].as_str().is_some_and(|t| t.starts_with("user:"))),
        "the host heard of nothing but presence: {heard:#?}"
    );
    let (_, metrics) = get_as(&server, "/metrics", &admin()).await;
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(
        metrics.contains("collab_view_updates_dropped_total"),
        "dropped updates are counted: {metrics}"
    );
}

#[tokio::test]
async fn a_connection_is_closed_when_its_token_expires() {
    let dir = tempfile::tempdir().unwrap();
    let server = auth_server(dir.path()).await;
    let short = mint_at(
        KEY,
        SESSION,
        Role::Edit,
        None,
        Duration::from_secs(2),
        SystemTime::now(),
    );
    let mut ws = server
        .try_connect(&format!("/t/{short}/ws/{SESSION}/ann"), &[])
        .await
        .expect("valid for now");
    assert_eq!(
        close_frame(&mut ws).await,
        (4401, "token expired".to_owned())
    );
    let mut yjs = server
        .try_connect(
            &format!(
                "/yjs/{SESSION}?token={}",
                mint_at(
                    KEY,
                    SESSION,
                    Role::View,
                    None,
                    Duration::from_secs(2),
                    SystemTime::now()
                )
            ),
            &[],
        )
        .await
        .expect("valid for now");
    assert_eq!(close_code(&mut yjs).await, 4401);
}

#[tokio::test]
async fn revocation_closes_the_sessions_connections_and_refuses_its_tokens_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = auth_config(dir.path());
    config.store = optiverse_collab::config::StoreKind::Sqlite;
    let server = start_sqlite(config.clone()).await;
    let edit = mint(SESSION, Role::Edit, Some("ann"));
    let elsewhere = mint("elsewhere", Role::Edit, None);
    let mut ann = desktop(&server, &edit, "ann").await;
    let mut yjs = server
        .try_connect(&format!("/yjs/{SESSION}?token={edit}"), &[])
        .await
        .expect("upgrade");
    let mut other = server
        .try_connect(&format!("/t/{elsewhere}/ws/elsewhere/bob"), &[])
        .await
        .expect("upgrade");
    recv_ack(&mut other, "bob").await;

    // The CLI asks the running server, with an admin token of the key.
    let answer = revoke(&RevokeArgs {
        session: SESSION.to_owned(),
        url: format!("http://{}", server.addr),
        key: key_args(),
    })
    .await
    .expect("revoked");
    assert!(answer.contains("revoked_before"), "{answer}");
    assert_eq!(
        close_frame(&mut ann).await,
        (4403, "token revoked".to_owned())
    );
    assert_eq!(close_code(&mut yjs).await, 4403);
    assert!(
        ping_collect(&mut other).await.is_empty(),
        "another session's connection lives on"
    );

    let path = format!("/t/{edit}/ws/{SESSION}/ann");
    assert_eq!(server.try_connect(&path, &[]).await.err(), Some(401));
    // A token minted after the revocation works.
    desktop(&server, &mint(SESSION, Role::Edit, Some("ann")), "ann").await;

    stop(server).await;
    let server = start_sqlite(config).await;
    assert_eq!(
        server.try_connect(&path, &[]).await.err(),
        Some(401),
        "after a restart"
    );
    desktop(&server, &mint(SESSION, Role::Edit, Some("ann")), "ann").await;
}

#[tokio::test]
async fn a_bound_user_name_is_neither_impersonated_nor_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let server = auth_server(dir.path()).await;
    let anns = mint(SESSION, Role::Edit, Some("ann"));
    let unbound = mint(SESSION, Role::Edit, None);

    // Ann's token names nobody else.
    let mut as_bob = server
        .try_connect(&format!("/t/{anns}/ws/{SESSION}/bob"), &[])
        .await
        .expect("upgrade");
    assert_eq!(close_code(&mut as_bob).await, 1008);
    let mut ann = desktop(&server, &anns, "ann").await;
    // An unbound token cannot take or replace her name, on either endpoint.
    for path in [
        format!("/t/{unbound}/ws/{SESSION}/ann"),
        format!("/yjs/{SESSION}?user=ann&token={unbound}"),
    ] {
        let mut impostor = server.try_connect(&path, &[]).await.expect("upgrade");
        assert_eq!(close_code(&mut impostor).await, 1008, "{path}");
    }
    assert!(
        ping_collect(&mut ann).await.is_empty(),
        "ann is still connected"
    );
    // Her own new connection replaces the old one, as the desktop client expects.
    let mut again = desktop(&server, &anns, "ann").await;
    assert_eq!(close_code(&mut ann).await, 4000);
    // What others receive carries the connection's name, whatever the message says.
    let mut bob = desktop(&server, &unbound, "bob").await;
    ping_collect(&mut again).await;
    let (_, uuid, item) = fixture_item(1);
    let item_type = item["_type"].as_str().unwrap_or("component").to_owned();
    send_json(
        &mut bob,
        &command("add_item", &item_type, &uuid, item, "ann"),
    )
    .await;
    ping_collect(&mut bob).await;
    let got = ping_collect(&mut again).await;
    assert!(!got.is_empty());
    assert!(got.iter().all(|m| m["user_id"] == "bob"), "{got:#?}");
}

#[tokio::test]
async fn a_page_of_another_origin_is_refused_in_both_modes() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config();
    config.allowed_origins = vec!["https://lab.example".to_owned()];
    let open = TestServer::start_with(
        config,
        std::sync::Arc::new(optiverse_collab::store::memory::MemoryStore::new()),
    )
    .await;
    let mut config = auth_config(dir.path());
    config.allowed_origins = vec!["https://lab.example".to_owned()];
    let authed = TestServer::start_with(
        config,
        std::sync::Arc::new(optiverse_collab::store::memory::MemoryStore::new()),
    )
    .await;
    let edit = mint(SESSION, Role::Edit, None);
    for server in [&open, &authed] {
        let path = format!("/ws/{SESSION}/ann?token={edit}");
        let evil = [("Origin", "http://evil.example")];
        assert_eq!(server.try_connect(&path, &evil).await.err(), Some(403));
        let (status, _) = http_with(server.addr, "GET", "/health", &evil, &[]).await;
        assert_eq!(status, 403);
        let own = format!("http://{}", server.addr);
        let mut ws = server
            .try_connect(&path, &[("Origin", own.as_str())])
            .await
            .expect("the server's own pages connect");
        recv_ack(&mut ws, "ann").await;
        let listed = server
            .try_connect(
                &format!("/ws/{SESSION}/bob?token={edit}"),
                &[("Origin", "https://lab.example")],
            )
            .await;
        assert!(listed.is_ok(), "a listed origin connects");
    }
}

#[tokio::test]
async fn metrics_and_the_api_need_an_admin_token() {
    let dir = tempfile::tempdir().unwrap();
    let server = auth_server(dir.path()).await;
    let edit = mint(SESSION, Role::Edit, None);
    for path in [
        "/metrics",
        "/api/sessions",
        "/api/store/sessions",
        "/api/process",
    ] {
        assert_eq!(server.get(path).await.0, 401, "{path}");
        assert_eq!(get_as(&server, path, &edit).await.0, 403, "{path}");
        assert_eq!(get_as(&server, path, &admin()).await.0, 200, "{path}");
    }
    let request = json!({"session": SESSION, "role": "view", "user": "vic", "ttl_seconds": 60});
    let body = serde_json::to_vec(&request).unwrap();
    assert_eq!(post_as(&server, "/api/tokens", &edit, &body).await.0, 403);
    let (status, minted) = post_as(&server, "/api/tokens", &admin(), &body).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&minted));
    let minted: Value = serde_json::from_slice(&minted).unwrap();
    let desktop_url = minted["desktop_url"].as_str().unwrap();
    let prefix = desktop_url.split_once("/t/").unwrap().1;
    assert_eq!(prefix, minted["token"].as_str().unwrap());
    desktop(&server, prefix, "vic").await;
    assert_eq!(
        post_as(&server, "/api/sessions/lab/revoke", &edit, &[])
            .await
            .0,
        403
    );
}
