//! The thin network layer: axum routes, the WebSocket endpoints, the HTTP API, and the
//! server's life cycle (start, graceful shutdown).

mod api;
pub mod connection;
pub mod path;
mod retention;
mod web;
mod ws;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::{any, get};
use axum::serve::ListenerExt;
use axum::Router;
use collab_core::session::{Rate, Rates, SessionLimits};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use crate::budget::Budget;
use crate::config::Config;
use crate::session::registry::SessionConfig;
use crate::session::Registry;
use crate::store::Store;
use crate::warn_limit::WarnLimiter;

/// How long shutdown waits for connections to close before it gives up on them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(4);

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub registry: Arc<Registry>,
    /// Every connection's tasks: counted for `/health`, awaited at shutdown.
    pub connections: TaskTracker,
    pub metrics: Option<PrometheusHandle>,
    pub rejected_warnings: Arc<WarnLimiter>,
    /// What peers make the server hold (`--max-memory`).
    pub budget: Arc<Budget>,
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
        .route("/api/store/sessions", get(api::stored_sessions))
        .route("/api/sessions/{session}/scene", get(api::scene))
        .route(
            "/api/sessions/{session}/update",
            get(api::get_update).post(api::post_update),
        )
        .route("/ws", any(ws::legacy))
        .route("/ws/", any(ws::legacy))
        .route("/ws/{*rest}", any(ws::legacy))
        .route("/yjs", any(ws::yjs))
        .route("/yjs/", any(ws::yjs))
        .route("/yjs/{*rest}", any(ws::yjs))
        .merge(web::routes())
        .layer(DefaultBodyLimit::max(state.config.max_message_bytes))
        .with_state(state)
}

/// A running server.
pub struct Server {
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Binds, and serves in the background until [`Server::shutdown`].
    pub async fn start(config: Config, store: Arc<dyn Store>) -> std::io::Result<Server> {
        let listener = tokio::net::TcpListener::bind((config.host, config.port)).await?;
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let budget = Budget::new(config.max_memory);
        let session_config = SessionConfig {
            evict_after: config.evict_after,
            correction_delay: config.correction_delay,
            limits: SessionLimits {
                max_awareness_bytes: config.max_awareness_bytes,
                max_awareness_states: config.max_awareness_states,
                max_awareness_total_bytes: config.max_awareness_total_bytes,
                rates: Rates {
                    update: Rate {
                        per_second: config.update_rate,
                        burst: config.update_burst,
                    },
                    request: Rate {
                        per_second: config.request_rate,
                        burst: config.request_burst,
                    },
                },
            },
            budget: budget.clone(),
            ..SessionConfig::default()
        };
        let registry = Registry::new(store.clone(), session_config, shutdown.clone());
        if let Some(retain) = config.retain_days {
            tokio::spawn(retention::run(registry.clone(), retain, shutdown.clone()));
        }
        let state = AppState {
            config: Arc::new(config),
            registry,
            connections: TaskTracker::new(),
            metrics: metrics_handle(),
            rejected_warnings: Arc::default(),
            budget,
        };
        let connections = state.connections.clone();
        let registry = state.registry.clone();
        let app = router(state);
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            // Small frames must leave at once: with Nagle's algorithm on, a frame written
            // while the previous one is unacknowledged waits for the peer's delayed ACK (40 ms).
            let listener = listener.tap_io(|stream| {
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::debug!(error = %e, "could not set TCP_NODELAY");
                }
            });
            // Each connection shares the one router: serving `Router` itself would rebuild its
            // route table for every connection and keep it for the connection's life.
            let serve = axum::serve(listener, app.into_make_service())
                .with_graceful_shutdown(stop.cancelled_owned());
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "server error");
            }
            // Sessions close their members (1001) as they stop.
            connections.close();
            let drained = async {
                connections.wait().await;
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
            shutdown,
            task,
        })
    }

    /// Stops accepting, closes every socket with 1001, waits for sessions and the store.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}
