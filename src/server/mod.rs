//! The thin network layer: axum routes, the WebSocket endpoints, the HTTP API, and the
//! server's life cycle (start, graceful shutdown).

mod api;
mod api_rate;
pub mod connection;
pub mod listener;
pub mod path;
mod retention;
mod web;
mod ws;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::middleware;
use axum::routing::{any, get, post};
use axum::Router;
use collab_core::session::{Rate, Rates, SessionLimits};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::auth::AccessControl;
use api_rate::ApiRate;
use listener::ListenerLimits;

use crate::budget::Budget;
use crate::config::Config;
use crate::session::registry::SessionConfig;
use crate::session::Registry;
use crate::store::Store;
use crate::warn_limit::WarnLimiter;

/// How long shutdown waits for connections to close before it gives up on them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(4);

/// File descriptors kept for what is not a connection: the listener, the store's files,
/// refused sockets being answered, standard streams.
const RESERVED_FDS: u64 = 96;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub registry: Arc<Registry>,
    /// Every connection's tasks: counted for `/health`, awaited at shutdown.
    pub connections: TaskTracker,
    pub metrics: Option<PrometheusHandle>,
    pub rejected_warnings: Arc<WarnLimiter>,
    /// Tokens, revocations and origins (`crate::auth`).
    pub access: Arc<AccessControl>,
    /// `/api` requests per client address.
    pub api_rate: Arc<ApiRate>,
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
    let api = Router::new()
        .route("/api/sessions", get(api::sessions))
        .route("/api/store/sessions", get(api::stored_sessions))
        .route("/api/sessions/{session}/scene", get(api::scene))
        .route(
            "/api/sessions/{session}/update",
            get(api::get_update).post(api::post_update),
        )
        .route("/api/tokens", post(crate::auth::api::mint))
        .route(
            "/api/sessions/{session}/revoke",
            post(crate::auth::api::revoke),
        )
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            api_rate::limit,
        ));
    Router::new()
        .route("/health", get(api::health))
        .route("/metrics", get(api::metrics))
        .merge(api)
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

/// The accept loop's limits: as configured, within what the process's file descriptor limit
/// allows (total), and at most half of the total per client, so that one address cannot take
/// every connection.
fn listener_limits(config: &Config) -> ListenerLimits {
    let fds = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(u64::MAX, |(soft, _)| soft);
    let by_fds = usize::try_from(fds.saturating_sub(RESERVED_FDS)).unwrap_or(usize::MAX);
    let max_connections = config.max_connections.min(by_fds).max(1);
    ListenerLimits {
        max_connections,
        max_connections_per_client: config
            .max_connections_per_ip
            .min(max_connections / 2)
            .max(1),
        header_timeout: config.http_header_timeout,
        write_timeout: config.http_write_timeout,
    }
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
        let access = Arc::new(AccessControl::from_config(&config).map_err(std::io::Error::other)?);
        if !access.enabled() && !config.host.is_loopback() {
            warn!(host = %config.host, "no --auth-key: anyone who can reach this address can read and change every session (README, \"Securing a server\")");
        }
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
            max_sessions: config.max_sessions,
            budget: budget.clone(),
            ..SessionConfig::default()
        };
        let registry = Registry::new(store.clone(), session_config, shutdown.clone());
        if let Some(retain) = config.retain_days {
            tokio::spawn(retention::run(registry.clone(), retain, shutdown.clone()));
        }
        let state = AppState {
            registry,
            connections: TaskTracker::new(),
            metrics: metrics_handle(),
            rejected_warnings: Arc::default(),
            access: access.clone(),
            api_rate: Arc::new(ApiRate::new(Rate {
                per_second: config.api_rate,
                burst: config.api_burst,
            })),
            config: Arc::new(config),
            budget,
        };
        let limits = listener_limits(&state.config);
        info!(
            max_connections = limits.max_connections,
            per_client = limits.max_connections_per_client,
            "connection limits"
        );
        let connections = state.connections.clone();
        let registry = state.registry.clone();
        // Each connection shares the one router (a clone shares its route table). Access
        // control wraps it whole (its routes are the fallback), so that it runs before routing:
        // the `/t/{token}` prefix is stripped first.
        let app =
            Router::new()
                .fallback_service(router(state))
                .layer(middleware::from_fn_with_state(
                    access,
                    crate::auth::http::guard,
                ));
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            let http = TaskTracker::new();
            listener::serve(listener, app, limits, stop, http.clone()).await;
            // Sessions close their members (1001) as they stop.
            http.close();
            connections.close();
            let drained = async {
                http.wait().await;
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
