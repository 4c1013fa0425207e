//! Micro-benchmarks of the hot path: loading a session, applying a Yjs update (against the raw
//! yrs floor), translating a legacy command, and fanning one broadcast out to 50 queues.
//!
//! `cargo bench --bench hot_path`; numbers are recorded in BENCHMARKS.md.

use std::hint::black_box;
use std::io::IoSlice;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use collab_core::doc::{Action, CheckedUpdate, Command, GuardedDoc, ItemFields, Scene};
use collab_core::protocol::json::parse_client_message;
use collab_core::protocol::yjs;
use criterion::{criterion_group, criterion_main, Criterion};
use optiverse_collab::budget::Budget;
use optiverse_collab::transport::Wire;
use optiverse_collab::transport::{outbox, Bounds, Frame};
use serde_json::{json, Value};
use yrs::updates::decoder::Decode;
use yrs::{Any, Doc, Map, MapPrelim, Out, ReadTxn, StateVector, Transact, Update};

/// Items of the scene fixtures, or one synthetic lens when they are not beside the project.
fn fixture_items() -> Vec<ItemFields> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures");
    let mut items = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(bytes) = std::fs::read(entry.path()) else {
            continue;
        };
        let Ok(scene) = serde_json::from_slice::<Value>(&bytes) else {
            continue;
        };
        for item in scene["items"].as_array().into_iter().flatten() {
            if let Value::Object(map) = item {
                items.push(map.clone());
            }
        }
    }
    if items.is_empty() {
        items.push(
            json!({"_type": "component", "name": "Lens", "x_mm": 0.0})
                .as_object()
                .cloned()
                .unwrap_or_default(),
        );
    }
    items
}

fn to_any(v: &Value) -> Any {
    collab_core::doc::value::json_to_any(v)
}

/// A peer document holding `n` items, and its state as a snapshot and as one update per item.
fn peer_with_items(n: usize) -> (Doc, Vec<u8>, Vec<Vec<u8>>) {
    let fixtures = fixture_items();
    let doc = Doc::new();
    let items = doc.get_or_insert_map("items");
    let mut log = Vec::with_capacity(n);
    for i in 0..n {
        let mut txn = doc.transact_mut();
        let mut fields = fixtures[i % fixtures.len()].clone();
        fields.insert("item_uuid".into(), json!(format!("item-{i}")));
        fields.insert("x_mm".into(), json!(i as f64));
        let prelim: MapPrelim = fields.iter().map(|(k, v)| (k.clone(), to_any(v))).collect();
        items.insert(&mut txn, format!("item-{i}"), prelim);
        log.push(txn.encode_update_v1());
    }
    let snapshot = doc
        .transact()
        .encode_state_as_update_v1(&StateVector::default());
    (doc, snapshot, log)
}

/// `count` single-field updates (`x_mm` of successive items) made on `peer`.
fn field_updates(peer: &Doc, n_items: usize, count: usize, start: usize) -> Vec<Vec<u8>> {
    let items = peer.get_or_insert_map("items");
    (start..start + count)
        .map(|k| {
            let mut txn = peer.transact_mut();
            if let Some(Out::YMap(item)) = items.get(&txn, &format!("item-{}", k % n_items)) {
                item.insert(&mut txn, "x_mm", k as f64 + 0.5);
            }
            txn.encode_update_v1()
        })
        .collect()
}

/// Stored or received bytes as the server takes them: checked by the guard.
fn checked(bytes: &[u8]) -> CheckedUpdate {
    CheckedUpdate::check(bytes.to_vec()).expect("a valid update")
}

/// Loads stored updates as the session task does: each checked, then applied.
fn load_doc(updates: &[Vec<u8>]) -> GuardedDoc {
    let checked: Vec<CheckedUpdate> = updates.iter().map(|u| checked(u)).collect();
    GuardedDoc::from_updates(&checked).expect("loads")
}

fn load(c: &mut Criterion) {
    let (_, snapshot, log) = peer_with_items(10_000);
    let mut group = c.benchmark_group("load_10k_items");
    group.sample_size(10);
    group.bench_function("from_snapshot", |b| {
        b.iter(|| Scene::new(load_doc(std::slice::from_ref(&snapshot)), true))
    });
    group.bench_function("raw_yrs_apply_snapshot_floor", |b| {
        b.iter(|| {
            let doc = Doc::new();
            doc.transact_mut()
                .apply_update(Update::decode_v1(&snapshot).expect("decodes"))
                .expect("applies");
            doc
        })
    });
    group.bench_function("from_log_of_10k_updates", |b| {
        b.iter(|| Scene::new(load_doc(&log), true))
    });
    group.finish();
}

fn apply(c: &mut Criterion) {
    const N: usize = 1000;
    let (peer, snapshot, _) = peer_with_items(N);
    let mut group = c.benchmark_group("apply_field_update_1k_items");
    let mut scene = Scene::new(load_doc(std::slice::from_ref(&snapshot)), true);
    let user: Arc<str> = Arc::from("bench");
    let mut next = 0;
    group.bench_function("scene_apply_update", |b| {
        b.iter_custom(|iters| {
            let updates = field_updates(&peer, N, iters as usize, next);
            next += iters as usize;
            let start = Instant::now();
            for u in &updates {
                // The guard's walk is part of the cost: every received update takes it.
                let update = checked(u);
                black_box(scene.apply_update(&user, &update).expect("applies"));
            }
            start.elapsed()
        })
    });
    // The floor: a plain yrs document applying the same kind of updates (from a second peer
    // that shares the snapshot, so no update waits for a missing one).
    let from_snapshot = || {
        let doc = Doc::new();
        doc.transact_mut()
            .apply_update(Update::decode_v1(&snapshot).expect("decodes"))
            .expect("applies");
        doc
    };
    let (raw, raw_peer) = (from_snapshot(), from_snapshot());
    let mut raw_next = 0;
    group.bench_function("raw_yrs_apply_floor", |b| {
        b.iter_custom(|iters| {
            let updates = field_updates(&raw_peer, N, iters as usize, raw_next);
            raw_next += iters as usize;
            let start = Instant::now();
            for u in &updates {
                let update = Update::decode_v1(u).expect("decodes");
                raw.transact_mut().apply_update(update).expect("applies");
            }
            start.elapsed()
        })
    });
    group.finish();
}

fn legacy(c: &mut Criterion) {
    const N: usize = 1000;
    let (_, snapshot, _) = peer_with_items(N);
    let mut scene = Scene::new(load_doc(std::slice::from_ref(&snapshot)), true);
    for peer in 1..=3 {
        scene.add_peer(peer);
        scene.request_sync(peer, &Arc::from("p"));
    }
    let user: Arc<str> = Arc::from("p1");
    let template = scene
        .item("item-7")
        .map(|f| (**f).clone())
        .unwrap_or_default();
    let mut x = 0.0;
    c.bench_function("legacy_move_command_3_peers", |b| {
        b.iter(|| {
            x += 1.0;
            let mut data = template.clone();
            data.insert("x_mm".into(), json!(x));
            let command = Command {
                action: Action::Move,
                item_type: Some("component".into()),
                item_id: Arc::from("item-7"),
                data,
            };
            black_box(
                scene
                    .apply_command(1, &user, command, Instant::now())
                    .expect("applies"),
            )
        })
    });
}

/// Parsing a desktop client's drag step (`update_item` with a fixture lens's whole dict):
/// the JSON the session's legacy path reads most, floats correctly rounded.
fn parse(c: &mut Criterion) {
    let lens = fixture_items()
        .into_iter()
        .find(|f| f.get("_type").and_then(Value::as_str) == Some("component"))
        .expect("a fixture component");
    let frame = json!({
        "type": "command",
        "command": {"action": "update_item", "item_type": "component", "item_id": "item-7",
                    "data": lens},
        "timestamp": "2026-11-25T19:22:01.123456",
        "user_id": "alice",
    })
    .to_string();
    c.bench_function("parse_desktop_update_item", |b| {
        b.iter(|| black_box(parse_client_message(black_box(&frame)).expect("parses")))
    });
}

/// A socket that takes everything at once: the fan-out cost without the kernel's.
struct NullWire;

impl Wire for NullWire {
    fn try_write(&self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }

    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
        Ok(bufs.iter().map(|b| b.len()).sum())
    }

    fn poll_writable(&self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fn fanout(c: &mut Criterion) {
    let budget = Budget::unlimited();
    let bounds = Bounds {
        max_bytes: usize::MAX,
        catch_up_bytes: Some(1 << 20),
    };
    let queues: Vec<_> = (0..50)
        .map(|_| outbox(bounds.clone(), budget.account(), Arc::new(NullWire)))
        .collect();
    let update = vec![7u8; 60];
    c.bench_function("encode_once_fanout_to_50_sockets", |b| {
        b.iter(|| {
            let frame = Frame::binary(&yjs::sync_update(&update));
            for (out, _) in &queues {
                out.send(&frame).expect("the socket takes everything");
            }
        })
    });
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! { name = benches; config = config(); targets = load, apply, legacy, parse, fanout }
criterion_main!(benches);
