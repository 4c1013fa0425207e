//! The fuzz targets' properties (see FUZZING.md) as proptests, small enough for stable
//! `cargo test --test properties` in seconds. The scenarios themselves are the fuzz crate's
//! (`fuzz/src/scenarios/`), mounted here with `#[path]`; only the input strategies are here.

#[allow(dead_code)]
#[path = "../fuzz/src/scenarios/mod.rs"]
mod scenarios;

use proptest::collection::vec;
use proptest::prelude::*;
use scenarios::legacy::{Change, LegacyOp, LegacyScript, YjsOp};
use scenarios::merge::{Finish, MergeOp, MergeScript, Val};
use scenarios::session::{RemoteJson, RemoteState, SessionOp, SessionScript};
use scenarios::untrusted;

fn val() -> impl Strategy<Value = Val> {
    let leaf = prop_oneof![
        Just(Val::Null),
        any::<bool>().prop_map(Val::Bool),
        any::<i32>().prop_map(Val::Int),
        any::<i16>().prop_map(Val::Quarter),
        any::<f64>().prop_map(Val::Float),
        any::<u8>().prop_map(Val::Str),
        any::<u8>().prop_map(Val::YText),
    ];
    leaf.prop_recursive(3, 12, 3, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..3).prop_map(Val::List),
            vec((any::<u8>(), inner.clone()), 0..3).prop_map(Val::Obj),
            vec((any::<u8>(), inner.clone()), 0..3).prop_map(Val::YMap),
            vec(inner, 0..3).prop_map(Val::YArray),
        ]
    })
}

fn merge_op() -> impl Strategy<Value = MergeOp> {
    let (r, i, f) = (any::<u8>, || 0..4u8, any::<u8>);
    prop_oneof![
        (r(), i(), vec((f(), val()), 0..4)).prop_map(|(replica, item, fields)| MergeOp::AddItem {
            replica,
            item,
            fields
        }),
        (r(), i(), f(), val()).prop_map(|(replica, item, field, value)| MergeOp::SetField {
            replica,
            item,
            field,
            value
        }),
        (r(), i(), any::<(i16, i16, i16)>()).prop_map(|(replica, item, (x, y, angle))| {
            MergeOp::Move {
                replica,
                item,
                x,
                y,
                angle,
            }
        }),
        (r(), i()).prop_map(|(replica, item)| MergeOp::DeleteItem { replica, item }),
        (r(), i(), f()).prop_map(|(replica, item, field)| MergeOp::DeleteField {
            replica,
            item,
            field
        }),
        (r(), i(), f(), any::<u8>(), val(), any::<bool>()).prop_map(
            |(replica, item, field, at, value, remove)| MergeOp::Nested {
                replica,
                item,
                field,
                at,
                value,
                remove
            }
        ),
        (any::<u16>(), r(), any::<bool>()).prop_map(|(update, to, twice)| MergeOp::Deliver {
            update,
            to,
            twice
        }),
        (any::<u16>(), any::<u8>(), r()).prop_map(|(first, count, to)| MergeOp::DeliverMerged {
            first,
            count,
            to
        }),
        (any::<u16>(), r(), any::<u8>()).prop_map(|(update, to, cut)| MergeOp::DeliverSplit {
            update,
            to,
            cut
        }),
        r().prop_map(|endpoint| MergeOp::Partition { endpoint }),
        (r(), r()).prop_map(|(a, b)| MergeOp::Sync { a, b }),
    ]
}

fn merge_script() -> impl Strategy<Value = MergeScript> {
    let finish = prop_oneof![
        Just(Finish::ThroughSession),
        Just(Finish::RedeliverAll),
        Just(Finish::MergedOnce)
    ];
    (any::<u8>(), any::<u32>(), finish, vec(merge_op(), 0..40)).prop_map(
        |(replicas, client_base, finish, ops)| MergeScript {
            replicas,
            client_base,
            finish,
            ops,
        },
    )
}

fn yjs_op() -> impl Strategy<Value = YjsOp> {
    let p = any::<u8>;
    prop_oneof![
        (p(), p(), any::<i16>()).prop_map(|(pick, field, value)| YjsOp::Set { pick, field, value }),
        (p(), any::<i16>(), any::<i16>()).prop_map(|(pick, x, y)| YjsOp::Move { pick, x, y }),
        p().prop_map(|pick| YjsOp::Remove { pick }),
        (p(), any::<i16>(), any::<bool>()).prop_map(|(template, x, typed)| YjsOp::Add {
            template,
            x,
            typed
        }),
        (p(), p()).prop_map(|(pick, template)| YjsOp::Replace { pick, template }),
        (p(), p(), any::<i16>()).prop_map(|(pick, key, value)| YjsOp::Nested { pick, key, value }),
        (p(), p()).prop_map(|(pick, field)| YjsOp::DeleteField { pick, field }),
    ]
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        any::<u16>().prop_map(Change::Name),
        any::<u8>().prop_map(Change::ZValue),
        any::<bool>().prop_map(Change::Locked),
        any::<u16>().prop_map(Change::Notes),
        (any::<u8>(), any::<i16>()).prop_map(|(index, efl)| Change::Interface { index, efl }),
    ]
}

fn legacy_op() -> impl Strategy<Value = LegacyOp> {
    let (c, p) = (any::<u8>, any::<u8>);
    prop_oneof![
        3 => (c(), any::<u8>()).prop_map(|(client, n)| LegacyOp::Apply { client, n }),
        2 => (c(), p(), any::<i16>(), any::<i16>())
            .prop_map(|(client, template, x, y)| LegacyOp::Add { client, template, x, y }),
        3 => (c(), p(), any::<(i16, i16)>(), any::<Option<u16>>(), any::<bool>()).prop_map(
            |(client, pick, (x, y), angle, drag)| LegacyOp::Move { client, pick, x, y, angle, drag }
        ),
        3 => (c(), p(), change()).prop_map(|(client, pick, change)| LegacyOp::Update {
            client,
            pick,
            change
        }),
        1 => (c(), p()).prop_map(|(client, pick)| LegacyOp::Remove { client, pick }),
        1 => c().prop_map(|client| LegacyOp::Upload { client }),
        1 => c().prop_map(|client| LegacyOp::SyncRequest { client }),
        1 => c().prop_map(|client| LegacyOp::Reconnect { client }),
        3 => (c(), yjs_op()).prop_map(|(client, op)| LegacyOp::Yjs { client, op }),
        1 => c().prop_map(|client| LegacyOp::YjsPull { client }),
        2 => Just(LegacyOp::Pause),
    ]
}

fn legacy_script() -> impl Strategy<Value = LegacyScript> {
    (
        any::<u8>(),
        any::<u8>(),
        any::<u8>(),
        vec(legacy_op(), 0..60),
    )
        .prop_map(|(clients, yjs, roles, ops)| LegacyScript {
            clients,
            yjs,
            roles,
            ops,
        })
}

fn session_op() -> impl Strategy<Value = SessionOp> {
    let (c, p) = (any::<u8>, any::<u8>);
    prop_oneof![
        4 => (c(), any::<u8>()).prop_map(|(client, n)| SessionOp::Deliver { client, n }),
        2 => (c(), any::<u8>()).prop_map(|(client, n)| SessionOp::YjsDeliver { client, n }),
        2 => (c(), p(), any::<i16>(), any::<i16>())
            .prop_map(|(client, template, x, y)| SessionOp::Add { client, template, x, y }),
        3 => (c(), p(), any::<(i16, i16)>(), any::<Option<u16>>(), any::<bool>()).prop_map(
            |(client, pick, (x, y), angle, drag)| SessionOp::Move { client, pick, x, y, angle, drag }
        ),
        3 => (c(), p(), change()).prop_map(|(client, pick, change)| SessionOp::Update {
            client,
            pick,
            change
        }),
        1 => (c(), p()).prop_map(|(client, pick)| SessionOp::Remove { client, pick }),
        1 => c().prop_map(|client| SessionOp::Ping { client }),
        1 => c().prop_map(|who| SessionOp::Join { who }),
        1 => c().prop_map(|who| SessionOp::Leave { who }),
        1 => c().prop_map(|who| SessionOp::Drop { who }),
        1 => (c(), any::<bool>()).prop_map(|(who, replace)| SessionOp::Reconnect { who, replace }),
        2 => (c(), yjs_op()).prop_map(|(client, op)| SessionOp::Yjs { client, op }),
        1 => (c(), any::<Option<u8>>()).prop_map(|(client, state)| SessionOp::Awareness { client, state }),
        1 => yjs_op().prop_map(|op| SessionOp::Api { op }),
        2 => Just(SessionOp::Pause),
        2 => Just(SessionOp::SharePresence),
        2 => (p(), p(), p(), any::<Option<u8>>(), p(), any::<bool>()).prop_map(
            |(node, peer, kind, user, connected_at, holds_name)| SessionOp::RemoteJoined {
                node,
                peer,
                kind,
                user,
                connected_at,
                holds_name,
            }
        ),
        1 => (p(), p()).prop_map(|(node, peer)| SessionOp::RemoteLeft { node, peer }),
        4 => (p(), p(), vec(remote_state(), 1..5))
            .prop_map(|(node, peer, states)| SessionOp::RemoteAwareness { node, peer, states }),
        1 => p().prop_map(|node| SessionOp::NodeGone { node }),
    ]
}

fn remote_state() -> impl Strategy<Value = RemoteState> {
    let json = prop_oneof![
        1 => Just(RemoteJson::Null),
        4 => any::<u8>().prop_map(RemoteJson::Object),
        1 => any::<String>().prop_map(RemoteJson::Text),
    ];
    (any::<u8>(), any::<u8>(), json).prop_map(|(client, clock, json)| RemoteState {
        client,
        clock,
        json,
    })
}

fn session_script() -> impl Strategy<Value = SessionScript> {
    (any::<[u8; 5]>(), vec(session_op(), 0..60)).prop_map(
        |([desktops, yjs, roles, benches, limits], ops)| SessionScript {
            desktops,
            yjs,
            roles,
            benches,
            limits,
            ops,
        },
    )
}

/// Real inputs of every kind `untrusted::check` takes (mode byte first), to be mutated.
fn untrusted_bases() -> Vec<Vec<u8>> {
    use yrs::updates::encoder::Encode;
    use yrs::{ReadTxn, Transact};
    let (a, _) = untrusted::seed_writers();
    let mut bases = vec![
        [
            &[untrusted::MODE_STATE_VECTOR][..],
            &a.transact().state_vector().encode_v1(),
        ]
        .concat(),
        [
            &[untrusted::MODE_AWARENESS][..],
            &untrusted::seed_awareness(),
        ]
        .concat(),
    ];
    for (_, update) in untrusted::continuing_updates() {
        for mode in [
            untrusted::MODE_UPDATE,
            untrusted::MODE_SCENE,
            untrusted::MODE_EMPTY_DOC,
        ] {
            bases.push([&[mode][..], &update].concat());
        }
    }
    bases
}

/// A real input with a few bytes flipped, replaced, dropped or inserted.
fn untrusted_input() -> impl Strategy<Value = Vec<u8>> {
    let bases = untrusted_bases();
    let edits = vec((any::<usize>(), any::<u8>(), 0..4u8), 0..4);
    (0..bases.len(), edits).prop_map(move |(i, edits)| {
        let mut input = bases[i].clone();
        for (at, byte, kind) in edits {
            let at = 1 + at % input.len().max(2).saturating_sub(1);
            match (kind, at < input.len()) {
                (0, true) => input[at] = byte,
                (1, true) => input[at] ^= 1 << (byte % 8),
                (2, true) => drop(input.remove(at)),
                _ => input.insert(at.min(input.len()), byte),
            }
        }
        input
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// merge_convergence: replicas and the session converge whatever the delivery.
    #[test]
    fn replicas_and_session_converge(script in merge_script()) {
        scenarios::merge::run(&script);
    }

    /// legacy_convergence: legacy clients' canvases equal the document once quiet.
    #[test]
    fn legacy_clients_converge(script in legacy_script()) {
        scenarios::legacy::run(&script);
    }

    /// session: whole sessions through the sans-IO core lose no client's work and converge.
    #[test]
    fn whole_sessions_converge(script in session_script()) {
        scenarios::session::run(&script);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 600, ..ProptestConfig::default() })]

    /// untrusted_update: no escaping panic, a rejected input changes nothing, the document
    /// still encodes and syncs.
    #[test]
    fn untrusted_bytes_are_contained(input in untrusted_input()) {
        untrusted::check(&input);
    }

    /// protocol_frames on arbitrary text and bytes.
    #[test]
    fn frames_get_typed_errors(kind in 0..2u8, text in ".{0,64}", bytes in vec(any::<u8>(), 0..64)) {
        scenarios::frames::check(&[&[kind][..], if kind == 0 { text.as_bytes() } else { &bytes }].concat());
    }
}

/// Every seed input of the byte-level targets (`fuzz/corpus/`) passes on stable too.
#[test]
fn seed_corpora_pass() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    type Check = fn(&[u8]);
    let targets: [(&str, Check); 2] = [
        ("untrusted_update", untrusted::check),
        ("protocol_frames", scenarios::frames::check),
    ];
    for (target, check) in targets {
        let dir = root.join(target);
        let mut count = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let outcome = std::panic::catch_unwind(|| check(&data));
            assert!(outcome.is_ok(), "{} fails", path.display());
            count += 1;
        }
        assert!(count > 10, "{target}: only {count} seed inputs");
    }
}
