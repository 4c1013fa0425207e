//! Hostile Yjs bytes against the guarded document: see `src/scenarios/untrusted.rs`.
//! Run with `-rss_limit_mb=512` (also the single-allocation limit).
#![no_main]

use libfuzzer_sys::fuzz_target;
use optiverse_collab_fuzz::scenarios::{untrusted, util};

fuzz_target!(
    init: {
        // yrs panics the project catches stay quiet; one that escapes still aborts.
        util::install_quiet_panic_hook();
        untrusted::seed_update();
    },
    |data: &[u8]| {
        untrusted::check(data);
    }
);
