//! Scenario logic shared by the fuzz targets and by `tests/properties.rs` (which includes
//! `src/scenarios/mod.rs` with `#[path]`, so it must not depend on anything but the main
//! crate's dependencies when compiled under `cfg(test)`). The crate depends on `collab-core`
//! (the network-free core) only, never on the server crate.

pub mod scenarios;
