//! optiverse-collab: a collaboration server where several people edit one Optiverse
//! optical-bench scene at once. Each session is one Yjs document; Optiverse desktop clients
//! (JSON commands) and standard Yjs clients edit it together. See `ARCHITECTURE.md`.

#![forbid(unsafe_code)]

pub mod admission;
pub mod auth;
pub mod budget;
pub mod config;
pub mod server;
pub mod session;
pub mod store;
pub mod transport;
pub mod warn_limit;

use std::sync::Arc;

use config::{Config, StoreKind};
use store::memory::MemoryStore;
use store::Store;

/// The store `config` asks for: Redis with `--cluster`, else the embedded one.
pub async fn open_configured_store(config: &Config) -> Result<Arc<dyn Store>, store::StoreError> {
    match &config.cluster {
        Some(url) => Ok(Arc::new(
            store::redis::RedisStore::connect_with(url, config.cluster_node_timeout).await?,
        )),
        None => open_store(config),
    }
}

/// The embedded store `config` asks for.
pub fn open_store(config: &Config) -> Result<Arc<dyn Store>, store::StoreError> {
    match config.store {
        StoreKind::Memory => Ok(Arc::new(MemoryStore::new())),
        StoreKind::Sqlite => Ok(Arc::new(store::sqlite::SqliteStore::open(
            &config.data_dir,
            config.fsync,
        )?)),
    }
}
