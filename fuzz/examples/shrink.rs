//! Shrinks a failing `merge_convergence`, `legacy_convergence` or `session` input at the level of its
//! script (removes steps while the failure message still contains NEEDLE) and prints the
//! smallest script as Rust `Debug`:
//! `cargo run --release --manifest-path fuzz/Cargo.toml --example shrink -- TARGET FILE NEEDLE`
//! (`SHRINK_TRACE=1` then replays the smallest script with its trace on stderr).

use arbitrary::{Arbitrary, Unstructured};
use optiverse_collab_fuzz::scenarios::{legacy, merge, session, util};

fn fails<T>(run: &dyn Fn(&T), script: &T, needle: &str) -> bool {
    match util::quiet(|| run(script)) {
        Ok(()) => false,
        Err(message) => message.contains(needle),
    }
}

fn shrink<T: Clone, O: Clone>(
    script: T,
    ops: impl Fn(&T) -> Vec<O>,
    with: impl Fn(&T, Vec<O>) -> T,
    failing: impl Fn(&T) -> bool,
) -> T {
    assert!(failing(&script), "the input does not fail that way");
    let mut best = script;
    let mut chunk = ops(&best).len() / 2;
    while chunk >= 1 {
        let mut i = 0;
        let mut progress = false;
        while i < ops(&best).len() {
            let mut candidate = ops(&best);
            candidate.drain(i..(i + chunk).min(candidate.len()));
            let t = with(&best, candidate);
            if failing(&t) {
                best = t;
                progress = true;
            } else {
                i += chunk;
            }
        }
        if !progress {
            chunk /= 2;
        }
    }
    best
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [target, file, needle] = &args[..] else {
        panic!("usage: shrink TARGET FILE NEEDLE")
    };
    let data = std::fs::read(file).unwrap();
    util::install_quiet_panic_hook();
    match target.as_str() {
        "merge_convergence" => {
            let script = merge::MergeScript::arbitrary(&mut Unstructured::new(&data)).unwrap();
            let best = shrink(
                script,
                |s| s.ops.clone(),
                |s, ops| merge::MergeScript { ops, ..s.clone() },
                |s| fails(&merge::run, s, needle),
            );
            println!("{best:#?}");
            if std::env::var_os("SHRINK_TRACE").is_some() {
                std::env::set_var("MERGE_TRACE", "1");
                let _ = util::quiet(|| merge::run(&best));
            }
        }
        "legacy_convergence" => {
            let script = legacy::LegacyScript::arbitrary(&mut Unstructured::new(&data)).unwrap();
            let best = shrink(
                script,
                |s| s.ops.clone(),
                |s, ops| legacy::LegacyScript { ops, ..s.clone() },
                |s| fails(&legacy::run, s, needle),
            );
            println!("{best:#?}");
            if std::env::var_os("SHRINK_TRACE").is_some() {
                std::env::set_var("LEGACY_TRACE", "1");
                if let Err(message) = util::quiet(|| legacy::run(&best)) {
                    eprintln!("{message}");
                }
            }
        }
        "session" => {
            let script = session::SessionScript::arbitrary(&mut Unstructured::new(&data)).unwrap();
            let best = shrink(
                script,
                |s| s.ops.clone(),
                |s, ops| session::SessionScript { ops, ..s.clone() },
                |s| fails(&session::run, s, needle),
            );
            println!("{best:#?}");
            if std::env::var_os("SHRINK_TRACE").is_some() {
                std::env::set_var("SESSION_TRACE", "1");
                if let Err(message) = util::quiet(|| session::run(&best)) {
                    eprintln!("{message}");
                }
            }
        }
        other => panic!("unknown target {other}"),
    }
}
