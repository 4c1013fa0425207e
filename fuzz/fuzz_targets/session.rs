//! Whole sessions through the sans-IO core: see `src/scenarios/session.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use optiverse_collab_fuzz::scenarios::session::{run, SessionScript};

fuzz_target!(|script: SessionScript| {
    run(&script);
});
