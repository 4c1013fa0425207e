//! TLS on the wire (README, "Securing a server"): real nginx, run with the configuration the
//! README gives (its placeholders filled in), terminates TLS for an authenticated server; Yjs
//! clients and a desktop-protocol client connect over `wss://` with a self-signed certificate
//! they trust, and a request without a token is refused through the proxy.
//!
//! Needs nginx (`.ci/test` installs Debian's; `NGINX` names another binary): fails without it.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use collab_core::session::Role;
use common::*;
use optiverse_collab::auth::{Keys, MintRequest};
use optiverse_collab::config::Secret;
use serde_json::json;
use tokio::process::{Child, Command};
use tokio_tungstenite::{connect_async_tls_with_config, Connector};
use yrs::Map as _;

const KEY: &str = "the TLS proxy test's key, 32 bytes or more";

fn token(role: Role) -> String {
    let keys = Keys::new(KEY.as_bytes()).unwrap();
    let request = MintRequest {
        session: "lab".into(),
        role,
        user: None,
        ttl: Duration::from_secs(600),
    };
    keys.mint(&request, SystemTime::now()).unwrap().0
}

/// The nginx configuration block of the README, as written there.
fn readme_config() -> String {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let marker = readme
        .find("<!-- nginx-config")
        .expect("the README marks its nginx configuration");
    let start = readme[marker..].find("```nginx\n").expect("an nginx block") + marker + 9;
    let end = readme[start..].find("```").expect("the block ends") + start;
    readme[start..end].to_owned()
}

fn nginx_binary() -> PathBuf {
    let path = std::env::var_os("NGINX")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/nginx"));
    assert!(
        path.exists(),
        "nginx is required ({}: missing; .ci/test installs Debian's, NGINX names another)",
        path.display()
    );
    path
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts nginx in the foreground with the README's server block; returns it once it accepts.
async fn start_nginx(dir: &Path, port: u16, upstream: &str) -> Child {
    let server = readme_config()
        .replace("LISTEN_PORT", &port.to_string())
        .replace("CERT_PATH", &dir.join("cert.pem").display().to_string())
        .replace("KEY_PATH", &dir.join("key.pem").display().to_string())
        .replace("UPSTREAM", upstream);
    std::fs::write(dir.join("server.conf"), server).unwrap();
    let d = dir.display();
    // What Debian's /etc/nginx/nginx.conf provides around conf.d, in the test's directory.
    let main = format!(
        "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  \
         fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  \
         include {d}/server.conf;\n}}\n"
    );
    std::fs::write(dir.join("nginx.conf"), main).unwrap();
    let mut child = Command::new(nginx_binary())
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .arg("-e")
        .arg(dir.join("error.log"))
        .kill_on_drop(true)
        .spawn()
        .expect("nginx starts");
    // Readiness: nginx tells nothing when it listens, so its port is tried until it answers.
    let ready = async {
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let log = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
                panic!("nginx exited ({status}): {log}");
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(PATIENCE, ready)
        .await
        .expect("nginx listens");
    child
}

/// A client configuration that trusts only `cert`.
fn trusting(cert: &rcgen::Certificate) -> Connector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    // The process's provider: ring, the only one the features enable.
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Connector::Rustls(Arc::new(config))
}

async fn wss(url: &str, connector: &Connector) -> Result<Ws, u16> {
    match connect_async_tls_with_config(url, None, false, Some(connector.clone())).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Err(response.status().as_u16())
        }
        Err(e) => panic!("wss connection failed: {e}"),
    }
}

async fn yjs_over_tls(url: &str, connector: &Connector) -> YClient {
    let ws = wss(url, connector).await.expect("the upgrade is accepted");
    YClient::over(ws).await
}

#[tokio::test]
async fn yjs_and_desktop_clients_sync_over_wss_through_the_readme_nginx_config() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config();
    config.key.auth_key = Some(Secret::new(KEY));
    config.data_dir = dir.path().join("data");
    let server = TestServer::start_with(
        config,
        Arc::new(optiverse_collab::store::memory::MemoryStore::new()),
    )
    .await;
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(dir.path().join("cert.pem"), certified.cert.pem()).unwrap();
    std::fs::write(
        dir.path().join("key.pem"),
        certified.key_pair.serialize_pem(),
    )
    .unwrap();
    let port = free_port();
    let mut nginx = start_nginx(dir.path(), port, &server.addr.to_string()).await;
    let connector = trusting(&certified.cert);
    let base = format!("wss://localhost:{port}");
    let edit = token(Role::Edit);

    // Refusals come through the proxy as the server answered them.
    assert_eq!(
        wss(&format!("{base}/yjs/lab"), &connector).await.err(),
        Some(401)
    );

    // A Yjs client writes over TLS; another one, and a desktop-protocol client through the
    // `/t/TOKEN` server URL, get it.
    let mut writer = yjs_over_tls(&format!("{base}/yjs/lab?token={edit}"), &connector).await;
    writer
        .edit_and_send(|txn, items| {
            items.insert(txn, "over-tls", item_prelim("lens", &json!({"x_mm": 12.5})));
        })
        .await;
    writer.sync().await;
    let reader = yjs_over_tls(
        &format!("{base}/yjs/lab?token={}", token(Role::View)),
        &connector,
    )
    .await;
    let item = reader.item("over-tls").expect("the reader has the item");
    assert_eq!(item["x_mm"], json!(12.5));
    let mut desktop = wss(&format!("{base}/t/{edit}/ws/lab/ann"), &connector)
        .await
        .expect("the upgrade is accepted");
    recv_ack(&mut desktop, "ann").await;
    send_json(&mut desktop, &json!({"type": "sync:request"})).await;
    let got = ping_collect(&mut desktop).await;
    let full = got
        .iter()
        .find(|m| m["type"] == "sync:full_state")
        .unwrap_or_else(|| panic!("the desktop client gets the scene: {got:#?}"));
    assert!(scene_by_uuid(&full["state"]).contains_key("over-tls"));

    nginx.kill().await.unwrap();
}
