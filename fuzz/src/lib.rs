//! Scenario logic shared by the fuzz targets and by `tests/properties.rs` (which includes
//! `src/scenarios/mod.rs` with `#[path]`, so it must not depend on anything but the main
//! crate's dependencies when compiled under `cfg(test)`).

pub mod scenarios;
