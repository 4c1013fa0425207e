//! The thin network layer: axum routes, the WebSocket endpoints, the HTTP API, and the
//! server's life cycle (start, graceful shutdown).

mod api;
pub mod connection;
pub mod path;
mod socket;
mod ws;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::get;
use axum::serve::ListenerExt;
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::sync::{watch, Notify};
use tracing::info;

use crate::config::Config;
use crate::session::registry::SessionConfig;
use crate::session::Registry;
use crate::store::Store;
use crate::warn_limit::WarnLimiter;

/// How long shutdown waits for connections to close before it gives up on them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(4);

/// Counts open connections so shutdown can wait for them.
#[derive(Debug, Default)]
pub struct ConnectionCounter {
    active: AtomicUsize,
    idle: Notify,
}

/// Decrements the counter when a connection ends.
pub struct ConnectionGuard(Arc<ConnectionCounter>);

impl ConnectionCounter {
    pub fn enter(self: &Arc<Self>) -> ConnectionGuard {
        self.active.fetch_add(1, Ordering::AcqRel);
        ConnectionGuard(self.clone())
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    async fn wait_idle(&self) {
        loop {
            let idle = self.idle.notified();
            if self.active() == 0 {
                return;
            }
            idle.await;
        }
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub registry: Arc<Registry>,
    pub shutdown: watch::Receiver<bool>,
    pub connections: Arc<ConnectionCounter>,
    pub metrics: Option<PrometheusHandle>,
    pub rejected_warnings: Arc<WarnLimiter>,
}

/// The Prometheus recorder is process-global: installed once, shared by every server.
fn metrics_handle() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok().map(|()| handle)
        })
        .clone()
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(api::health))
        .route("/metrics", get(api::metrics))
        .route("/api/sessions", get(api::sessions))
        .route("/api/sessions/{session}/scene", get(api::scene))
        .route(
            "/api/sessions/{session}/update",
            get(api::get_update).post(api::post_update),
        )
        .route("/ws", get(ws::legacy))
        .route("/ws/", get(ws::legacy))
        .route("/ws/{*rest}", get(ws::legacy))
        .route("/yjs", get(ws::yjs))
        .route("/yjs/", get(ws::yjs))
        .route("/yjs/{*rest}", get(ws::yjs))
        .layer(DefaultBodyLimit::max(state.config.max_message_bytes))
        .with_state(state)
}

/// A running server.
pub struct Server {
    pub addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Binds, and serves in the background until [`Server::shutdown`].
    pub async fn start(config: Config, store: Arc<dyn Store>) -> std::io::Result<Server> {
        let listener = tokio::net::TcpListener::bind((config.host, config.port)).await?;
        let addr = listener.local_addr()?;
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let session_config = SessionConfig {
            evict_after: config.evict_after,
            correction_delay: config.correction_delay,
            max_awareness_bytes: config.max_awareness_bytes,
            max_awareness_states: config.max_awareness_states,
            ..SessionConfig::default()
        };
        let registry = Registry::new(store.clone(), session_config, shutdown_rx.clone());
        let state = AppState {
            config: Arc::new(config),
            registry,
            shutdown: shutdown_rx.clone(),
            connections: Arc::default(),
            metrics: metrics_handle(),
            rejected_warnings: Arc::default(),
        };
        let connections = state.connections.clone();
        let registry = state.registry.clone();
        let app = router(state);
        let mut stop = shutdown_rx;
        let task = tokio::spawn(async move {
            // Small frames must leave at once: with Nagle's algorithm on, a frame written
            // while the previous one is unacknowledged waits for the peer's delayed ACK (40 ms).
            let listener = listener.tap_io(|stream| {
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::debug!(error = %e, "could not set TCP_NODELAY");
                }
            });
            let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                let _ = stop.wait_for(|s| *s).await;
            });
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "server error");
            }
            let drained = async {
                connections.wait_idle().await;
                registry.wait_stopped().await;
            };
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, drained).await;
            if let Err(e) = store.flush().await {
                tracing::error!(error = %e, "store flush at shutdown failed");
            }
        });
        info!(%addr, "listening");
        Ok(Server {
            addr,
            shutdown: shutdown_tx,
            task,
        })
    }

    /// Stops accepting, closes every socket with 1001, waits for sessions and the store.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }
}
