//! A float a client sends comes back bit-identical on every path (PROTOCOL §3.3): desktop
//! JSON in, and out through another desktop client, the Yjs document and the HTTP scene; Yjs
//! (HTTP update) in, and out to a desktop client. Random bit patterns, as a property.

mod common;

use common::*;
use proptest::prelude::*;
use serde_json::{json, Map, Value};
use yrs::{Any, Doc, Map as _, MapPrelim, Out, Transact};

/// Finite floats from random bits: every exponent, subnormals, both zeros.
fn finite() -> impl Strategy<Value = f64> {
    any::<u64>()
        .prop_map(f64::from_bits)
        .prop_filter("finite", |f| f.is_finite())
}

/// The item's fields `v0`, `v1`, ... as f64 bit patterns, from JSON.
fn json_bits(data: &Value, n: usize) -> Vec<u64> {
    (0..n)
        .map(|i| {
            data[format!("v{i}")]
                .as_f64()
                .unwrap_or_else(|| panic!("v{i} is a number: {data}"))
                .to_bits()
        })
        .collect()
}

/// The item's fields `v0`, `v1`, ... as f64 bit patterns, from a Yjs document.
fn doc_bits(doc: &Doc, uuid: &str, n: usize) -> Vec<u64> {
    let items = items(doc);
    let txn = doc.transact();
    let Some(Out::YMap(item)) = items.get(&txn, uuid) else {
        panic!("{uuid} is in the document");
    };
    (0..n)
        .map(|i| match item.get(&txn, &format!("v{i}")) {
            Some(Out::Any(Any::Number(yrs::any::Number::Float(f)))) => f.to_bits(),
            other => panic!("v{i} is a float in the document: {other:?}"),
        })
        .collect()
}

async fn desktop_to_everywhere(server: &TestServer, session: &str, values: &[f64]) {
    let (mut sender, _) = server.settled(session, "sender").await;
    let (mut receiver, _) = server.settled(session, "receiver").await;
    let mut data = Map::new();
    for (i, v) in values.iter().enumerate() {
        data.insert(format!("v{i}"), json!(v));
    }
    data.insert("x_mm".into(), json!(values[0]));
    let uuid = "floats";
    send_json(
        &mut sender,
        &command("add_item", "ruler", uuid, Value::Object(data), "sender"),
    )
    .await;
    ping_collect(&mut sender).await;
    let want: Vec<u64> = values.iter().map(|v| v.to_bits()).collect();
    let got = ping_collect(&mut receiver).await;
    let add = got
        .iter()
        .find(|m| m["command"]["action"] == "add_item")
        .unwrap_or_else(|| panic!("the receiver got the add: {got:?}"));
    assert_eq!(
        json_bits(&add["command"]["data"], values.len()),
        want,
        "desktop -> desktop"
    );
    let scene = server.scene(session).await;
    let item = scene["items"]
        .as_array()
        .and_then(|items| items.iter().find(|i| i["uuid"] == uuid))
        .unwrap_or_else(|| panic!("the scene has the item: {scene}"));
    assert_eq!(json_bits(item, values.len()), want, "desktop -> HTTP scene");
    let (status, update) = server.get(&format!("/api/sessions/{session}/update")).await;
    assert_eq!(status, 200);
    let doc = doc_from(&update);
    assert_eq!(doc_bits(&doc, uuid, values.len()), want, "desktop -> Yjs");
}

async fn yjs_to_desktop(server: &TestServer, session: &str, values: &[f64]) {
    let (mut receiver, _) = server.settled(session, "receiver").await;
    let fields: Vec<(String, Any)> = values
        .iter()
        .enumerate()
        .map(|(i, v)| (format!("v{i}"), Any::from(*v)))
        .collect();
    let update = edit(&Doc::new(), |txn, items| {
        items.insert(txn, "from-yjs", MapPrelim::from_iter(fields));
    });
    let (status, body) = server
        .post(&format!("/api/sessions/{session}/update"), &update)
        .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let got = ping_collect(&mut receiver).await;
    let add = got
        .iter()
        .find(|m| m["command"]["action"] == "add_item")
        .unwrap_or_else(|| panic!("the receiver got the add: {got:?}"));
    let want: Vec<u64> = values.iter().map(|v| v.to_bits()).collect();
    assert_eq!(
        json_bits(&add["command"]["data"], values.len()),
        want,
        "Yjs -> desktop"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn floats_come_back_bit_identical_on_every_path(
        values in proptest::collection::vec(finite(), 1..64),
        case in any::<u64>(),
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let server = TestServer::start().await;
            desktop_to_everywhere(&server, &format!("desktop-{case}"), &values).await;
            yjs_to_desktop(&server, &format!("yjs-{case}"), &values).await;
        });
    }
}

/// The value from the issue that drifted by one ulp with the default JSON number parser.
#[tokio::test]
async fn a_value_that_used_to_drift_comes_back_exact() {
    let server = TestServer::start().await;
    desktop_to_everywhere(&server, "drift", &[31.257510898320334, 0.1, 1e-310, -0.0]).await;
}
