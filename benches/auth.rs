//! What access control costs a connection: checking its token (signature, expiry, claims),
//! once per connect or HTTP request; nothing is checked per update.
//!
//! `cargo bench --bench auth`; numbers are recorded in BENCHMARKS.md ("Issue 14").

use std::hint::black_box;
use std::time::{Duration, SystemTime};

use collab_core::session::Role;
use criterion::{criterion_group, criterion_main, Criterion};
use optiverse_collab::auth::{Keys, MintRequest};

const KEY: &[u8] = b"a benchmark key of at least thirty-two bytes";

fn token(keys: &Keys) -> String {
    let request = MintRequest {
        session: "lab-3".into(),
        role: Role::Edit,
        user: Some("ada".into()),
        ttl: Duration::from_secs(7 * 86_400),
    };
    keys.mint(&request, SystemTime::now()).expect("minted").0
}

fn verify(c: &mut Criterion) {
    let keys = Keys::new(KEY).expect("a long enough key");
    let valid = token(&keys);
    let other = token(&Keys::new(b"another benchmark key, 32 bytes long").expect("key"));
    c.bench_function("token_verify", |b| {
        b.iter(|| keys.verify(black_box(&valid)).expect("valid"))
    });
    c.bench_function("token_verify_wrong_key", |b| {
        b.iter(|| keys.verify(black_box(&other)).expect_err("refused"))
    });
    c.bench_function("token_mint", |b| b.iter(|| token(black_box(&keys))));
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3));
    targets = verify
}
criterion_main!(benches);
