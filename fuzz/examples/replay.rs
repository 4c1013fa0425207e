//! Replays fuzz inputs outside libFuzzer (any toolchain, debug or release):
//! `cargo run --manifest-path fuzz/Cargo.toml --example replay -- TARGET FILE...`
//! Prints each file's outcome; exits 1 if any failed.

use std::panic::{catch_unwind, AssertUnwindSafe};

use arbitrary::{Arbitrary, Unstructured};
use optiverse_collab_fuzz::scenarios::{frames, legacy, merge, session, untrusted, util};

fn run(target: &str, data: &[u8]) {
    match target {
        "merge_convergence" => {
            let script = merge::MergeScript::arbitrary(&mut Unstructured::new(data)).unwrap();
            merge::run(&script);
        }
        "legacy_convergence" => {
            let script = legacy::LegacyScript::arbitrary(&mut Unstructured::new(data)).unwrap();
            legacy::run(&script);
        }
        "session" => {
            let script = session::SessionScript::arbitrary(&mut Unstructured::new(data)).unwrap();
            session::run(&script);
        }
        "untrusted_update" => untrusted::check(data),
        "protocol_frames" => frames::check(data),
        other => panic!("unknown target {other}"),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (target, files) = args.split_first().expect("usage: replay TARGET FILE...");
    util::install_quiet_panic_hook();
    let mut failed = 0;
    for file in files {
        let data = std::fs::read(file).unwrap();
        match catch_unwind(AssertUnwindSafe(|| run(target, &data))) {
            Ok(()) => println!("ok     {file}"),
            Err(_) => {
                failed += 1;
                println!("FAILED {file}");
            }
        }
    }
    std::process::exit(i32::from(failed > 0));
}
