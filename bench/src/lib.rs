//! The clients and measurements shared by `collab-load` (src/main.rs) and `collab-hostile`
//! (src/bin/collab-hostile.rs).

pub mod proc_stats;
pub mod stats;
pub mod yjs_client;
