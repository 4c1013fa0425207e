//! Who is in a session (PROTOCOL §3.1, §3.5; README "Choices"): the join order on `/ws`, the
//! ack and its user list, `is_host`, `user:joined`/`user:left` once per user name, replacement
//! of an older `/ws` connection (4000) but never of a `/yjs` one, connections the shell drops
//! (1013), and the heartbeat.

mod common;

use std::time::Duration;

use collab_core::session::{ConnKind, CLOSE_REPLACED, CLOSE_SLOW};
use common::*;
use serde_json::{json, Value};

/// The `connected_at` of `user` in an ack's list.
fn connected_at(ack: &Value, user: &str) -> Value {
    ack["users"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["user_id"] == user)
        .unwrap_or_else(|| panic!("{user} is listed: {ack}"))["connected_at"]
        .clone()
}

#[test]
fn a_joiner_gets_user_joined_naming_itself_then_the_ack_and_nothing_else() {
    let mut world = World::new();
    let peer = world.join(ConnKind::Legacy, Some("alice"));
    let got = world.take_json(peer);
    assert_eq!(got.len(), 2, "{got:#?}");
    let joined = &got[0];
    assert_eq!(
        joined["type"], "user:joined",
        "first, naming itself: {joined}"
    );
    assert_eq!(joined["user_id"], "alice");
    assert_timestamp(&joined["timestamp"]);
    let ack = &got[1];
    assert_eq!(ack["type"], "connection:ack");
    assert_eq!(ack["session_id"], SESSION);
    assert_eq!(ack["user_id"], "alice");
    assert_eq!(ack["is_host"], true, "first user of an empty session");
    assert_eq!(ack["protocol"], "optiverse-collab/1");
    assert_timestamp(&ack["timestamp"]);
    assert_eq!(names(ack), ["alice"]);
    assert_timestamp(&connected_at(ack, "alice"));
    assert!(
        ack.get("snapshot").is_none() && ack.get("state_vector").is_none(),
        "a plain /ws ack carries no Yjs state: {ack}"
    );

    // Into an initialized scene, still no full state is pushed: the client asks for it.
    let (t, u, d) = fixture_item(1);
    world.send(peer, command("add_item", &t, &u, d, "alice"));
    let (bob, ack) = world.legacy("bob");
    assert_eq!(ack["is_host"], false);
    assert!(world.ping(bob).is_empty(), "no full state at join");
}

#[test]
fn is_host_goes_to_the_first_named_json_user_of_an_uninitialized_scene() {
    // First and second.
    let mut world = World::new();
    let (alice, ack) = world.legacy("alice");
    assert_eq!(ack["is_host"], true);
    let (_, ack) = world.legacy("bob");
    assert_eq!(ack["is_host"], false, "the scene has a user");
    // Once everyone left an uninitialized scene, the next joiner is its first user again.
    world.leave(alice);
    let (_, ack) = world.legacy("carol");
    assert_eq!(ack["is_host"], false, "bob is still there");
    let mut world = World::new();
    let (alice, _) = world.legacy("alice");
    world.leave(alice);
    let (_, ack) = world.legacy("bob");
    assert_eq!(ack["is_host"], true, "alone in an uninitialized scene");

    // An anonymous /yjs connection is nobody; a named one is a user.
    let mut world = World::new();
    world.yjs(None);
    let (_, ack) = world.legacy("alice");
    assert_eq!(
        ack["is_host"], true,
        "an anonymous Yjs connection does not count"
    );
    let mut world = World::new();
    world.yjs(Some("ymir"));
    let (_, ack) = world.legacy("alice");
    assert_eq!(ack["is_host"], false, "a named Yjs connection is a user");

    // `?yjs=1` speaks JSON: its ack says whether it is the first user too.
    let mut world = World::new();
    let yuki = world.join(ConnKind::LegacyYjs, Some("yuki"));
    let Received::Json(ack) = &world.take(yuki)[0] else {
        panic!("the ack comes first on ?yjs=1");
    };
    assert_eq!(ack["is_host"], true);

    // Once the scene is initialized nobody hosts, even alone (the flag is stored).
    let mut world = World::new();
    let (alice, _) = world.legacy("alice");
    let (t, u, d) = fixture_item(2);
    world.send(alice, command("add_item", &t, &u, d, "alice"));
    world.leave(alice);
    assert!(world.session.initialized());
    let (_, ack) = world.legacy("latecomer");
    assert_eq!(ack["is_host"], false, "the scene is initialized");
    assert_eq!(names(&ack), ["latecomer"], "the host has left");
    let stored = world.persisted.clone();
    let mut restarted = World::loaded(&stored, true);
    let (_, ack) = restarted.legacy("after-restart");
    assert_eq!(ack["is_host"], false, "initialized as loaded");
    let mut emptied = World::loaded(&[], true);
    let (_, ack) = emptied.legacy("alice");
    assert_eq!(
        ack["is_host"], false,
        "an initialized scene without items stays initialized"
    );
}

#[test]
fn acks_list_users_in_join_order_with_the_joiner_last() {
    let mut world = World::new();
    let (_, ack_a) = world.legacy("alice");
    world.advance(Duration::from_secs(2));
    let (_, ack_b) = world.legacy("bob");
    world.advance(Duration::from_secs(3));
    world.yjs(Some("bob yjs"));
    world.yjs(None);
    world.advance(Duration::from_secs(1));
    let (_, ack_c) = world.legacy("carol");
    assert_eq!(names(&ack_a), ["alice"]);
    assert_eq!(names(&ack_b), ["alice", "bob"]);
    assert_eq!(
        names(&ack_c),
        ["alice", "bob", "bob yjs", "carol"],
        "join order, every endpoint, anonymous connections left out"
    );
    // Each user's `connected_at` is when it joined, the same in every later ack.
    assert_eq!(connected_at(&ack_c, "alice"), connected_at(&ack_a, "alice"));
    assert_eq!(connected_at(&ack_c, "bob"), connected_at(&ack_b, "bob"));
    assert_eq!(
        connected_at(&ack_a, "alice"),
        json!("2026-11-25T19:22:01.000Z")
    );
    assert_eq!(
        connected_at(&ack_b, "bob"),
        json!("2026-11-25T19:22:03.000Z")
    );
    assert_eq!(
        connected_at(&ack_c, "carol"),
        json!("2026-11-25T19:22:07.000Z")
    );
    assert_eq!(ack_c["timestamp"], json!("2026-11-25T19:22:07.000Z"));
    let summary = world.session.summary();
    assert_eq!(summary.users, ["alice", "bob", "bob yjs", "carol"]);
    assert_eq!(summary.connections, 5);
}

#[test]
fn the_others_hear_user_joined_and_user_left() {
    let mut world = World::new();
    let (alice, _) = world.legacy("alice");
    let yuki = world.join(ConnKind::LegacyYjs, Some("yuki"));
    world.take(yuki);
    let (watcher, _) = world.yjs(None);
    let (bob, _) = world.legacy("bob");
    let to_alice = world.ping(alice);
    assert_eq!(
        summary(&to_alice),
        [
            ("user:joined".to_owned(), "yuki".to_owned()),
            ("user:joined".to_owned(), "bob".to_owned())
        ]
    );
    assert_timestamp(&to_alice[1]["timestamp"]);
    let to_yuki: Vec<Value> = world
        .take(yuki)
        .into_iter()
        .filter_map(|r| match r {
            Received::Json(v) => Some(v),
            Received::Yjs(_) => None,
        })
        .collect();
    assert_eq!(
        summary(&to_yuki),
        [("user:joined".to_owned(), "bob".to_owned())],
        "?yjs=1 hears user events"
    );
    assert!(
        world.ping(bob).is_empty(),
        "bob heard of himself only before his ack"
    );
    assert!(
        world.take(watcher).is_empty(),
        "user events are JSON: a /yjs connection gets none"
    );

    world.leave(bob);
    let left = world.ping(alice);
    let left = only(&left);
    assert_eq!(left["type"], "user:left");
    assert_eq!(left["user_id"], "bob");
    assert_timestamp(&left["timestamp"]);
    assert!(world.take(watcher).is_empty());
    assert!(!world.session.is_member(bob));
    // A second leave of the same connection (the shell may report it twice) changes nothing.
    world.leave(bob);
    assert!(world.ping(alice).is_empty());
}

#[test]
fn a_newer_ws_connection_of_a_user_replaces_the_older_with_4000_and_no_user_events() {
    let mut world = World::new();
    let (old, _) = world.legacy("dana");
    let (walt, _) = world.settled("walt");
    world.ping(old);
    world.advance(Duration::from_secs(5));
    let (new, ack) = world.legacy("dana");
    assert_eq!(world.closed(old), Some(CLOSE_REPLACED));
    assert_eq!(CLOSE_REPLACED.code, 4000);
    assert_eq!(CLOSE_REPLACED.reason, "Replaced by a newer connection");
    assert_eq!(world.closed(new), None);
    assert_eq!(
        names(&ack),
        ["walt", "dana"],
        "listed once, as the newer connection"
    );
    assert_eq!(
        connected_at(&ack, "dana"),
        json!("2026-11-25T19:22:06.000Z")
    );
    assert!(
        world.ping(walt).is_empty(),
        "no user:left / user:joined for a swap"
    );
    // The old connection's task ends and tells the session: still nothing for anyone.
    world.leave(old);
    assert!(world.ping(walt).is_empty());
    assert!(world.ping(new).is_empty());

    // The new connection works; the session counts it once.
    let (t, u, d) = fixture_item(2);
    world.send(new, command("add_item", &t, &u, d.clone(), "dana"));
    let to_walt = fold_fixes(&world.ping(walt));
    let add = only(&to_walt);
    assert_eq!(add["command"]["action"], "add_item");
    assert_eq!(add["user_id"], "dana");
    assert_eq!(normalize(&add["command"]["data"]), expected_item(&d, &t));
    let summary = world.session.summary();
    assert_eq!(summary.users, ["walt", "dana"]);
    assert_eq!(summary.connections, 2);
    assert_eq!(summary.item_count, 1);

    // When it leaves, dana has no connection left: the others hear it once.
    world.leave(new);
    let left = world.ping(walt);
    assert_eq!(summary_of(&left), [("user:left", "dana")]);
}

/// `summary` with `&str`s, for short assertions.
fn summary_of(messages: &[Value]) -> Vec<(&str, &str)> {
    messages
        .iter()
        .map(|m| {
            (
                m["type"].as_str().unwrap(),
                m["user_id"].as_str().unwrap_or(""),
            )
        })
        .collect()
}

#[test]
fn replacement_spans_ws_and_ws_yjs_but_never_touches_yjs() {
    // /ws then ?yjs=1, and the reverse: both speak JSON, the newer replaces the older.
    for (first, second) in [
        (ConnKind::Legacy, ConnKind::LegacyYjs),
        (ConnKind::LegacyYjs, ConnKind::Legacy),
    ] {
        let mut world = World::new();
        let older = world.join(first, Some("dana"));
        let newer = world.join(second, Some("dana"));
        assert_eq!(
            world.closed(older),
            Some(CLOSE_REPLACED),
            "{first:?} by {second:?}"
        );
        assert_eq!(world.closed(newer), None);
    }

    // A /yjs connection with the same ?user= neither replaces nor is replaced (README
    // "Choices": y-websocket would reconnect and replace the other in turn).
    for (first, second) in [
        (ConnKind::Legacy, ConnKind::Yjs),
        (ConnKind::Yjs, ConnKind::Legacy),
    ] {
        let mut world = World::new();
        let (walt, _) = world.legacy("walt");
        let one = world.join(first, Some("dana"));
        let other = world.join(second, Some("dana"));
        assert_eq!(world.closed(one), None, "{first:?} then {second:?}");
        assert_eq!(world.closed(other), None, "{first:?} then {second:?}");
        assert_eq!(world.session.summary().users, ["walt", "dana"]);
        assert_eq!(
            summary_of(&world.ping(walt)),
            [("user:joined", "dana")],
            "dana joined once"
        );
        // The first connection leaves: dana is still there.
        world.leave(one);
        assert!(world.ping(walt).is_empty(), "{first:?} then {second:?}");
        world.leave(other);
        assert_eq!(summary_of(&world.ping(walt)), [("user:left", "dana")]);
    }
}

#[test]
fn yjs_tabs_of_one_user_are_listed_once_and_never_replaced() {
    let mut world = World::new();
    let (alice, _) = world.legacy("alice");
    let (tab1, _) = world.yjs(Some("bob"));
    let (tab2, _) = world.yjs(Some("bob"));
    let (tab3, _) = world.yjs(Some("bob"));
    assert!([tab1, tab2, tab3]
        .iter()
        .all(|t| world.closed(*t).is_none()));
    assert_eq!(summary_of(&world.ping(alice)), [("user:joined", "bob")]);
    let (_, ack) = world.legacy("carol");
    assert_eq!(names(&ack), ["alice", "bob", "carol"]);
    world.ping(alice);
    world.leave(tab2);
    world.leave(tab1);
    assert!(world.ping(alice).is_empty(), "bob has a tab open");
    world.leave(tab3);
    assert_eq!(summary_of(&world.ping(alice)), [("user:left", "bob")]);
}

#[test]
fn anonymous_yjs_connections_are_nobody() {
    let mut world = World::new();
    let (alice, _) = world.legacy("alice");
    let (anonymous, _) = world.yjs(None);
    assert!(world.ping(alice).is_empty(), "no user:joined");
    let (_, ack) = world.legacy("carol");
    assert_eq!(names(&ack), ["alice", "carol"]);
    world.ping(alice);
    let summary = world.session.summary();
    assert_eq!(summary.users, ["alice", "carol"]);
    assert_eq!(summary.connections, 3);
    world.leave(anonymous);
    assert!(world.ping(alice).is_empty(), "no user:left");
    assert_eq!(world.session.summary().connections, 2);
}

/// The shell drops a connection that fell behind (1013): it is closed with that reason and
/// the others hear `user:left`, as for any leave.
#[test]
fn a_dropped_connection_is_closed_with_its_reason_and_the_others_hear_user_left() {
    let mut world = World::new();
    let (alice, _) = world.legacy("alice");
    let (slow, _) = world.legacy("slow");
    world.ping(alice);
    world.drop_conn(slow, CLOSE_SLOW);
    assert_eq!(world.closed(slow), Some(CLOSE_SLOW));
    assert_eq!(CLOSE_SLOW.code, 1013);
    assert_eq!(summary_of(&world.ping(alice)), [("user:left", "slow")]);
    // Its task then reports the end of the connection: nothing more.
    world.leave(slow);
    assert!(world.ping(alice).is_empty());
    // The session lives on: the same user reconnects.
    let (back, ack) = world.legacy("slow");
    assert_eq!(names(&ack), ["alice", "slow"]);
    assert_eq!(summary_of(&world.ping(alice)), [("user:joined", "slow")]);
    assert!(world.ping(back).is_empty());
}

#[test]
fn a_ping_is_answered_to_its_sender_only() {
    let mut world = World::new();
    let (a, _) = world.legacy("a");
    let (b, _) = world.legacy("b");
    world.ping(a);
    world.send(a, json!({"type": "ping", "user_id": "a"}));
    let pong = world.take_json(a);
    let pong = only(&pong);
    assert_eq!(pong["type"], "pong");
    assert_timestamp(&pong["timestamp"]);
    assert!(world.ping(b).is_empty(), "b gets no pong of a's");
    // ?yjs=1 pings in JSON too.
    let y = world.join(ConnKind::LegacyYjs, Some("y"));
    world.take(y);
    world.send(y, json!({"type": "ping"}));
    let got = world.take(y);
    assert!(
        matches!(got.as_slice(), [Received::Json(p)] if p["type"] == "pong"),
        "{got:?}"
    );
}

#[test]
fn input_from_a_connection_that_left_is_ignored() {
    let mut world = World::new();
    let (a, _) = world.legacy("a");
    let (b, _) = world.legacy("b");
    world.ping(a);
    world.leave(b);
    world.ping(a);
    let version = world.version();
    let (t, u, d) = fixture_item(3);
    world.send(b, command("add_item", &t, &u, d, "b"));
    world.send(b, json!({"type": "sync:request"}));
    world.send(b, json!({"type": "ping"}));
    assert!(world.items().is_empty(), "nothing applied");
    assert_eq!(world.version(), version);
    assert!(world.persisted.is_empty());
    assert!(world.ping(a).is_empty());
    // A leave of a connection the session never had changes nothing either.
    world.leave(99);
    assert!(world.ping(a).is_empty());
    assert!(world.session.is_member(a) && !world.session.is_member(b));
    world.leave(a);
    assert!(world.session.is_empty());
}
