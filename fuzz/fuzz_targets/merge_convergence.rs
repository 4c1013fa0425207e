//! Replicas, the session and the network: see `src/scenarios/merge.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use optiverse_collab_fuzz::scenarios::merge::{run, MergeScript};

fuzz_target!(|script: MergeScript| {
    run(&script);
});
