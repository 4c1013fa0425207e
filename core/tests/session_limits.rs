//! The per-connection rates a session enforces, fed inputs with a synthetic clock.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use collab_core::doc::{CheckedStateVector, CheckedUpdate, Scene};
use collab_core::protocol::json::parse_client_message;
use collab_core::protocol::yjs::YjsMessage;
use collab_core::session::{
    ConnKind, Input, Now, Output, PayloadKind, Rate, Rates, Session, SessionLimits,
    CLOSE_RATE_LIMITED,
};
use serde_json::Value;
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{Doc, Map, ReadTxn, Transact, Update};

const RATE: Rate = Rate {
    per_second: 10.0,
    burst: 4.0,
};

fn session() -> Session {
    let limits = SessionLimits {
        rates: Rates {
            update: RATE,
            request: RATE,
        },
        ..SessionLimits::default()
    };
    Session::new(Arc::from("limits"), Scene::default(), &limits)
}

fn now(at: Instant) -> Now {
    Now::at(at, SystemTime::UNIX_EPOCH)
}

/// A session with desktop client `alice` (peer 1) joined at `start`.
fn session_with_alice(start: Instant) -> Session {
    let mut s = session();
    let join = Input::Join {
        peer: 1,
        kind: ConnKind::Legacy,
        user: Some(Arc::from("alice")),
        access: collab_core::session::Access::OPEN,
    };
    step(&mut s, join, start);
    s
}

fn step(session: &mut Session, input: Input, at: Instant) -> Output {
    let mut out = Output::default();
    session
        .handle(input, &now(at), &mut out)
        .expect("the input is taken");
    out
}

fn json_to(out: &Output, peer: u64) -> Vec<Value> {
    out.sends
        .iter()
        .filter(|(to, p)| *to == peer && p.kind() == PayloadKind::Text)
        .map(|(_, p)| serde_json::from_slice(p.bytes()).expect("JSON"))
        .collect()
}

fn drag(step: usize) -> Input {
    let text = format!(
        r#"{{"type":"command","command":{{"action":"update_item","item_type":"source","item_id":"s1","data":{{"x_mm":{step}.5,"y_mm":0.0,"angle_deg":0.0}}}}}}"#
    );
    Input::Json {
        peer: 1,
        message: parse_client_message(&text).expect("a command"),
    }
}

#[test]
fn a_desktop_client_over_its_rate_gets_rate_limited_and_changes_nothing() {
    let start = Instant::now();
    let mut s = session_with_alice(start);
    let mut applied = 0;
    let mut limited = 0;
    for i in 0..6 {
        let out = step(&mut s, drag(i), start);
        applied += usize::from(!out.persist.is_empty());
        let errors: Vec<Value> = json_to(&out, 1)
            .into_iter()
            .filter(|m| m["type"] == "error")
            .collect();
        if let [error] = errors.as_slice() {
            assert_eq!(error["code"], "rate_limited");
            assert!(out.persist.is_empty(), "a limited command is not applied");
            limited += 1;
        }
    }
    assert_eq!((applied, limited), (4, 2), "the burst, then refusals");
    assert!(s.is_member(1), "the connection lives on");
    // A tenth of a second later one more token has come.
    let later = start + Duration::from_millis(100);
    assert!(!step(&mut s, drag(7), later).persist.is_empty());
    // Pings are never limited: the desktop client's heartbeat must always get through.
    let ping = || Input::Json {
        peer: 1,
        message: parse_client_message(r#"{"type":"ping"}"#).expect("a ping"),
    };
    for _ in 0..20 {
        assert_eq!(json_to(&step(&mut s, ping(), later), 1)[0]["type"], "pong");
    }
    let scene: Value = serde_json::from_str(&s.scene_json(&now(later))).unwrap();
    assert_eq!(scene["items"][0]["x_mm"], 7.5);
}

#[test]
fn full_state_requests_have_their_own_rate() {
    let start = Instant::now();
    let mut s = session_with_alice(start);
    let request = || Input::Json {
        peer: 1,
        message: parse_client_message(r#"{"type":"sync:request"}"#).expect("a request"),
    };
    let codes: Vec<Value> = (0..6)
        .flat_map(|_| json_to(&step(&mut s, request(), start), 1))
        .filter(|m| m["type"] == "error")
        .map(|m| m["code"].clone())
        .collect();
    assert_eq!(codes, ["rate_limited", "rate_limited"]);
    // Changes still have their whole burst.
    assert!(!step(&mut s, drag(1), start).persist.is_empty());
}

#[test]
fn a_yjs_client_over_its_rate_is_closed_and_its_update_not_applied() {
    let start = Instant::now();
    let mut s = session();
    step(
        &mut s,
        Input::Join {
            peer: 2,
            kind: ConnKind::Yjs,
            user: None,
            access: collab_core::session::Access::OPEN,
        },
        start,
    );
    let doc = Doc::new();
    let items = doc.get_or_insert_map("items");
    let mut applied = 0;
    for i in 0..5 {
        let before = doc.transact().state_vector();
        items.insert(&mut doc.transact_mut(), format!("k{i}"), i);
        let update = doc.transact().encode_state_as_update_v1(&before);
        Update::decode_v1(&update).expect("a valid update");
        let message = YjsMessage::Update(CheckedUpdate::check(update).expect("guarded"));
        let out = step(&mut s, Input::Yjs { peer: 2, message }, start);
        if out.persist.is_empty() {
            assert_eq!(out.closes, [(2, CLOSE_RATE_LIMITED)]);
        } else {
            applied += 1;
        }
    }
    assert_eq!(applied, 4);
    assert!(
        !s.is_member(2),
        "closed: its provider reconnects and syncs what it has"
    );
    // A state-vector request from a new connection is measured on its own buckets.
    step(
        &mut s,
        Input::Join {
            peer: 3,
            kind: ConnKind::Yjs,
            user: None,
            access: collab_core::session::Access::OPEN,
        },
        start,
    );
    let sv = CheckedStateVector::check(doc.transact().state_vector().encode_v1()).expect("sv");
    let out = step(
        &mut s,
        Input::Yjs {
            peer: 3,
            message: YjsMessage::SyncStep1(sv),
        },
        start,
    );
    assert!(out.closes.is_empty());
}
