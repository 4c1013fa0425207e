//! Legacy Optiverse clients, Yjs clients and the scene: see `src/scenarios/legacy.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use optiverse_collab_fuzz::scenarios::legacy::{run, LegacyScript};

fuzz_target!(|script: LegacyScript| {
    run(&script);
});
