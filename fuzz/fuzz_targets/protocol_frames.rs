//! Text and binary WebSocket frames through the parsers: see `src/scenarios/frames.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use optiverse_collab_fuzz::scenarios::frames;

fuzz_target!(|data: &[u8]| {
    frames::check(data);
});
