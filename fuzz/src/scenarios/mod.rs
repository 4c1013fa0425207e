//! Scenarios shared by the fuzz targets (`fuzz/fuzz_targets/`) and the property tests
//! (`tests/properties.rs`, which mounts this directory with `#[path]`).
//!
//! Under `cfg(test)` (the property tests) the script types derive nothing; the fuzz crate
//! derives `arbitrary::Arbitrary` for them. Everything here uses only the main crate's own
//! dependencies (`yrs`, `serde_json`), so both crates can compile it.

pub mod frames;
pub mod held;
pub mod legacy;
pub mod merge;
pub mod session;
pub mod untrusted;
pub mod util;
