//! Presence across nodes (`--cluster`), decided by the session: what it tells the other nodes
//! of its members, and what it makes of theirs (`Input::RemoteJoined`, `RemoteLeft`,
//! `RemoteAwareness`, `NodeGone`): the user list, `user:joined`/`user:left`, replacement of
//! the older connection of a user, and awareness under the same rules as local connections'.
//! And the order of updates: nodes that apply their own clients' changes at once and the
//! others' as the stream brings them end with one document, and every desktop canvas shows it.

mod common;

use collab_core::doc::CheckedAwareness;
use collab_core::session::{
    Access, ConnKind, Event, Input, PresenceChange, Refused, Role, AWARENESS_TIMEOUT,
    CLOSE_REPLACED,
};
use common::*;
use proptest::prelude::*;
use serde_json::json;
use yrs::sync::Message;
use yrs::updates::encoder::Encode;
use yrs::Doc;

/// This node's id in these tests.
const NODE: u64 = 1;
/// Another node's.
const OTHER: u64 = 2;

fn clustered() -> World {
    let mut world = World::new();
    world.session.share_presence(NODE);
    world
}

fn remote_join(world: &mut World, peer: u64, user: &str, connected_at: &str) {
    remote_join_holding(world, peer, user, connected_at, false);
}

fn remote_join_holding(
    world: &mut World,
    peer: u64,
    user: &str,
    connected_at: &str,
    holds_name: bool,
) {
    world
        .step(Input::RemoteJoined {
            node: OTHER,
            peer,
            kind: ConnKind::Legacy,
            user: Some(user.into()),
            connected_at: connected_at.into(),
            holds_name,
        })
        .unwrap();
}

fn user_events(messages: &[serde_json::Value]) -> Vec<(String, String)> {
    messages
        .iter()
        .filter(|m| m["type"] == "user:joined" || m["type"] == "user:left")
        .map(|m| {
            (
                m["type"].as_str().unwrap().to_owned(),
                m["user_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn awareness_bytes(entries: &[(u64, u32, &str)]) -> Vec<u8> {
    awareness_update(entries).encode_v1()
}

#[test]
fn members_are_told_to_the_other_nodes_only_once_presence_is_shared() {
    let mut single = World::new();
    let (peer, _) = single.yjs(Some("y"));
    single.send_yjs(peer, Message::Awareness(awareness_update(&[(5, 1, "{}")])));
    assert!(single.session.presence().is_empty());
    single.leave(peer);
    assert!(single.presence.is_empty(), "{:?}", single.presence);

    let mut world = clustered();
    let (peer, _) = world.yjs(Some("y"));
    let (anonymous, _) = world.yjs(None);
    assert!(
        matches!(&world.presence[..], [
            PresenceChange::Joined { peer: p1, kind: ConnKind::Yjs, user: Some(user), .. },
            PresenceChange::Joined { peer: p2, kind: ConnKind::Yjs, user: None, .. },
        ] if *p1 == peer && *p2 == anonymous && &**user == "y"),
        "{:?}",
        world.presence
    );
    // What a node tells again when its heartbeat had expired: every member, as they joined.
    assert_eq!(world.session.presence(), world.presence);
    world.presence.clear();
    world.send_yjs(peer, Message::Awareness(awareness_update(&[(5, 1, "{}")])));
    world.leave(peer);
    assert!(
        matches!(&world.presence[..], [
            PresenceChange::Awareness { peer: p1, update, states: Some(states) },
            PresenceChange::Left { peer: p2 },
        ] if *p1 == peer && *p2 == peer && *update == awareness_bytes(&[(5, 1, "{}")])
            && *states == *update),
        "{:?}",
        world.presence
    );

    // A state that expires here is removed on the other nodes too, and from what a node
    // that starts following is told.
    world.presence.clear();
    let (peer, _) = world.yjs(Some("z"));
    world.send_yjs(peer, Message::Awareness(awareness_update(&[(6, 1, "{}")])));
    world.presence.clear();
    world.advance(AWARENESS_TIMEOUT);
    world.tick();
    assert!(
        matches!(&world.presence[..], [
            PresenceChange::Awareness { peer: p1, update, states: None },
        ] if *p1 == peer && *update == awareness_bytes(&[(6, 1, "null")])),
        "{:?}",
        world.presence
    );
}

#[test]
fn users_of_other_nodes_are_listed_joined_and_left() {
    let mut world = clustered();
    let (alice, _) = world.legacy("alice");
    remote_join(&mut world, 7, "bob", "2026-11-25T19:22:01.500Z");
    assert_eq!(
        user_events(&world.take_json(alice)),
        [("user:joined".to_owned(), "bob".to_owned())]
    );
    world.advance(std::time::Duration::from_secs(1));
    let (carol, ack) = world.legacy("carol");
    assert_eq!(
        names(&ack),
        ["alice", "bob", "carol"],
        "in the order they joined"
    );
    assert_eq!(ack["is_host"], false);
    // bob's connection on this node too: his leave on the other node is no leave.
    let (bob_here, _) = world.yjs(Some("bob"));
    world.take_json(alice);
    world
        .step(Input::RemoteLeft {
            node: OTHER,
            peer: 7,
        })
        .unwrap();
    assert!(user_events(&world.take_json(alice)).is_empty());
    world.leave(bob_here);
    assert_eq!(
        user_events(&world.take_json(carol)),
        [("user:left".to_owned(), "bob".to_owned())]
    );
    // Our own node's entries (a loop back through Redis) change nothing.
    world.take_json(alice);
    world
        .step(Input::RemoteJoined {
            node: NODE,
            peer: 99,
            kind: ConnKind::Legacy,
            user: Some("ghost".into()),
            connected_at: "2026-11-25T19:22:09.000Z".into(),
            holds_name: false,
        })
        .unwrap();
    assert!(world.take_json(alice).is_empty());
}

#[test]
fn a_newer_connection_on_another_node_replaces_and_an_older_one_does_not() {
    let mut world = clustered();
    let (alice, _) = world.legacy("alice");
    let (bob, _) = world.legacy("bob");
    // An older alice elsewhere (its node closes that one when it hears of ours).
    remote_join(&mut world, 3, "alice", "2026-11-25T19:22:00.000Z");
    assert_eq!(world.conns[&alice].closed, None);
    // A newer one replaces ours: closed 4000, told to the other nodes, no leave or join.
    remote_join(&mut world, 4, "alice", "2026-11-25T19:23:00.000Z");
    assert_eq!(world.conns[&alice].closed, Some(CLOSE_REPLACED));
    assert!(world
        .presence
        .contains(&PresenceChange::Left { peer: alice }));
    assert!(user_events(&world.take_json(bob)).is_empty());
}

#[test]
fn a_replacement_on_this_node_is_told_as_the_join_then_the_leave() {
    let mut world = clustered();
    let (old, _) = world.legacy("alice");
    world.presence.clear();
    let (new, _) = world.legacy("alice");
    assert_eq!(world.conns[&old].closed, Some(CLOSE_REPLACED));
    // In this order another node never finds alice gone in between.
    assert!(
        matches!(&world.presence[..], [
            PresenceChange::Joined { peer: p1, .. },
            PresenceChange::Left { peer: p2 },
        ] if *p1 == new && *p2 == old),
        "{:?}",
        world.presence
    );
}

#[test]
fn a_name_a_token_binds_on_one_node_is_held_on_every_node() {
    let holding = Access {
        role: Role::Edit,
        holds_name: true,
    };
    let mut world = clustered();
    let alice = world
        .try_join_as(ConnKind::Legacy, Some("alice"), holding)
        .unwrap();
    // A newer alice elsewhere without the name's token does not replace her; one with it does.
    remote_join(&mut world, 3, "alice", "2026-11-25T19:23:00.000Z");
    assert_eq!(world.conns[&alice].closed, None);
    remote_join_holding(&mut world, 4, "alice", "2026-11-25T19:23:00.000Z", true);
    assert_eq!(world.conns[&alice].closed, Some(CLOSE_REPLACED));
    // While a connection elsewhere holds bob, nobody here takes the name without the token.
    remote_join_holding(&mut world, 5, "bob", "2026-11-25T19:23:00.000Z", true);
    assert_eq!(
        world.try_join(ConnKind::Legacy, Some("bob")),
        Err(Refused::NameHeld)
    );
    assert!(world
        .try_join_as(ConnKind::Legacy, Some("bob"), holding)
        .is_ok());
}

#[test]
fn awareness_of_other_nodes_follows_the_same_rules_and_goes_with_its_node() {
    let mut world = clustered();
    let (watcher, _) = world.yjs(None);
    world.send_yjs(
        watcher,
        Message::Awareness(awareness_update(&[(5, 1, "{}")])),
    );
    world.take_yjs(watcher);
    let (alice, _) = world.legacy("alice");
    remote_join(&mut world, 7, "bob", "2026-11-25T19:22:01.500Z");
    world.take_json(alice);
    let remote = |entries: &[(u64, u32, &str)]| Input::RemoteAwareness {
        node: OTHER,
        peer: 7,
        update: CheckedAwareness::check(awareness_bytes(entries)).unwrap(),
    };
    // A client id a local connection introduced: refused, nothing sent.
    world.step(remote(&[(5, 2, "{\"x\":1}")])).unwrap();
    assert!(world.take_yjs(watcher).is_empty());
    assert!(matches!(
        world.events.last(),
        Some(Event::RemoteAwarenessRejected {
            node: OTHER,
            peer: 7,
            ..
        })
    ));
    // Not a JSON object: refused.
    world.step(remote(&[(8, 1, "[1]")])).unwrap();
    assert!(world.take_yjs(watcher).is_empty());
    // Its own: relayed to this node's Yjs members, and not told back to the other nodes.
    let told = world.presence.len();
    world.step(remote(&[(8, 1, "{\"x\":2}")])).unwrap();
    let got = world.take_yjs(watcher);
    assert!(
        matches!(&got[..], [Message::Awareness(u)] if awareness_entries(u)[&8] == (1, "{\"x\":2}".to_owned())),
        "{got:?}"
    );
    assert_eq!(world.presence.len(), told);
    // A local connection cannot take it over.
    world.send_yjs(
        watcher,
        Message::Awareness(awareness_update(&[(8, 2, "{}")])),
    );
    assert!(world
        .take_yjs(watcher)
        .iter()
        .all(|m| !matches!(m, Message::Awareness(_))));
    // The node is gone: bob leaves, his state goes.
    world.step(Input::NodeGone { node: OTHER }).unwrap();
    assert_eq!(
        user_events(&world.take_json(alice)),
        [("user:left".to_owned(), "bob".to_owned())]
    );
    let got = world.take_yjs(watcher);
    assert!(
        matches!(&got[..], [Message::Awareness(u)] if awareness_entries(u)[&8] == (1, "null".to_owned())),
        "{got:?}"
    );
}

// -------------------------------------------------------------------------------------------
// The order of updates (ARCHITECTURE "Cluster", "Order")
// -------------------------------------------------------------------------------------------

/// One node of a modelled cluster: its session, its desktop client, a Yjs client (its
/// document, and how much of what the node applied it has received), how far its feed has
/// read the stream, and how much of what it stored it has appended.
struct Node {
    world: World,
    desktop: Desktop,
    yjs: Doc,
    yjs_received: usize,
    read: usize,
    appended: usize,
}

/// Nodes sharing one stream, as `--cluster` nodes share a Redis stream: each entry is the
/// node that appended it and the update.
struct Cluster {
    stream: Vec<(usize, Vec<u8>)>,
    nodes: Vec<Node>,
}

impl Cluster {
    /// Node 0's desktop client (a host) adds two items; nodes 1 and 2 load them from the
    /// stream, and a desktop client connects to each ("Connect to server").
    fn of_three() -> Cluster {
        let mut world = World::new();
        let mut host = Desktop::connect(&mut world, "d0", true, Canvas::default());
        for (i, uuid) in ["u1", "u2"].into_iter().enumerate() {
            let data = json!({"_type": "component", "item_uuid": uuid, "name": format!("L{i}"),
                              "z_value": 0, "x_mm": 0.0, "y_mm": 0.0, "angle_deg": 0.0});
            host.edit(
                &mut world,
                "add_item",
                uuid,
                &expected_item(&data, "component"),
            );
        }
        host.settle(&mut world);
        let stream: Vec<(usize, Vec<u8>)> =
            world.persisted.iter().map(|u| (0, u.clone())).collect();
        let loaded = world.persisted.clone();
        let mut nodes = vec![Node {
            appended: world.persisted.len(),
            read: stream.len(),
            yjs: Doc::new(),
            yjs_received: 0,
            world,
            desktop: host,
        }];
        for name in ["d1", "d2"] {
            let mut world = World::loaded(&loaded, true);
            let desktop = Desktop::connect(&mut world, name, false, Canvas::default());
            assert_eq!(desktop.canvas.objects.len(), 2, "{name} got the scene");
            nodes.push(Node {
                appended: world.persisted.len(),
                read: stream.len(),
                yjs: Doc::new(),
                yjs_received: 0,
                world,
                desktop,
            });
        }
        let mut cluster = Cluster { stream, nodes };
        for n in 0..3 {
            cluster.yjs_receive(n);
        }
        cluster
    }

    /// Appends what node `n` stored since its last append: its own clients' changes, which
    /// it applied before appending them.
    fn append(&mut self, n: usize) {
        let node = &mut self.nodes[n];
        for update in &node.world.persisted[node.appended..] {
            self.stream.push((n, update.clone()));
        }
        node.appended = node.world.persisted.len();
    }

    /// Node `n`'s feed hands it the next entry another node appended (as an HTTP update;
    /// what that stores is dropped: it is in the stream). False at the end of the stream.
    fn feed(&mut self, n: usize) -> bool {
        let node = &mut self.nodes[n];
        while self
            .stream
            .get(node.read)
            .is_some_and(|(from, _)| *from == n)
        {
            node.read += 1;
        }
        let Some((_, update)) = self.stream.get(node.read) else {
            return false;
        };
        node.read += 1;
        node.world
            .api_update(update)
            .expect("another node's update is taken");
        node.appended = node.world.persisted.len();
        true
    }

    /// Node `n`'s Yjs client receives what its node applied since it last did (what the
    /// node stored: its own clients' changes and the other nodes').
    fn yjs_receive(&mut self, n: usize) {
        let node = &mut self.nodes[n];
        for update in &node.world.persisted[node.yjs_received..] {
            apply_update(&node.yjs, update);
        }
        node.yjs_received = node.world.persisted.len();
    }

    /// Node `n`'s desktop client reads what arrived; none of it is an error.
    fn read(&mut self, n: usize) {
        let node = &mut self.nodes[n];
        let got = node.desktop.receive(&mut node.world);
        assert!(got.iter().all(|m| m["type"] != "error"), "{got:#?}");
    }
}

/// One step of a run: a desktop client's edit of a field of an item from what its canvas
/// shows (a drag sends `move_item` then `update_item`, as the app does); a desktop client
/// reading what arrived; a Yjs client's edit of `x_mm` or `name` on its document (which may
/// be behind its node's), and its receiving; a node's feed handing it the next entry; a
/// node's correction timer. Values come from a small set, so that clients often send a value
/// they were told.
#[derive(Debug, Clone)]
enum Step {
    Edit {
        node: usize,
        item: usize,
        field: usize,
        value: u8,
    },
    Read(usize),
    YjsEdit {
        node: usize,
        item: usize,
        field: usize,
        value: u8,
    },
    YjsReceive(usize),
    Feed(usize),
    Tick(usize),
}

fn any_step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0..3usize, 0..2usize, 0..3usize, 0..4u8).prop_map(|(node, item, field, value)| {
            Step::Edit { node, item, field, value }
        }),
        2 => (0..3usize).prop_map(Step::Read),
        1 => (0..3usize, 0..2usize, 0..2usize, 0..4u8).prop_map(|(node, item, field, value)| {
            Step::YjsEdit { node, item, field, value }
        }),
        1 => (0..3usize).prop_map(Step::YjsReceive),
        3 => (0..3usize).prop_map(Step::Feed),
        1 => (0..3usize).prop_map(Step::Tick),
    ]
}

fn run(cluster: &mut Cluster, step: &Step) {
    match *step {
        Step::Edit {
            node,
            item,
            field,
            value,
        } => {
            let uuid = ["u1", "u2"][item];
            let Node { world, desktop, .. } = &mut cluster.nodes[node];
            let mut fields = desktop.canvas.objects[uuid].clone();
            match field {
                0 => {
                    fields["x_mm"] = json!(f64::from(value) + 0.5);
                    desktop.edit(world, "move_item", uuid, &fields);
                    desktop.edit(world, "update_item", uuid, &fields);
                }
                1 => {
                    fields["name"] = json!(format!("N{value}"));
                    desktop.edit(world, "update_item", uuid, &fields);
                }
                _ => {
                    fields["z_value"] = json!(value);
                    desktop.edit(world, "update_item", uuid, &fields);
                }
            }
            cluster.append(node);
        }
        Step::Read(node) => cluster.read(node),
        Step::YjsEdit {
            node,
            item,
            field,
            value,
        } => {
            let uuid = ["u1", "u2"][item];
            let write = match field {
                0 => ("x_mm", json!(f64::from(value) + 0.5)),
                _ => ("name", json!(format!("N{value}"))),
            };
            let Node { world, yjs, .. } = &mut cluster.nodes[node];
            let update = edit(yjs, |txn, items| set_fields(txn, items, uuid, &[write]));
            world
                .api_update(&update)
                .expect("a Yjs client's update is taken");
            cluster.append(node);
        }
        Step::YjsReceive(node) => cluster.yjs_receive(node),
        Step::Feed(node) => {
            cluster.feed(node);
        }
        Step::Tick(node) => {
            let world = &mut cluster.nodes[node].world;
            if world.session.next_deadline().is_some() {
                world.tick_at_deadline();
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Three nodes, each applying its own clients' changes (a desktop client's, a Yjs
    /// client's) at once and the others' when its feed hands them, in any interleaving of
    /// edits, reads, feed steps and correction timers: once every feed has read the stream
    /// and every client has pinged or received, every node's document and every Yjs client's
    /// is the stream's, every canvas shows it, and nothing more is owed.
    #[test]
    fn nodes_applying_the_stream_in_their_own_orders_agree_and_so_do_their_canvases(
        steps in prop::collection::vec(any_step(), 1..60)
    ) {
        let mut cluster = Cluster::of_three();
        for step in &steps {
            run(&mut cluster, step);
        }
        for n in 0..3 {
            while cluster.feed(n) {}
        }
        for node in &mut cluster.nodes {
            node.desktop.settle(&mut node.world);
            let more = node.desktop.settle(&mut node.world);
            prop_assert!(more.is_empty(), "{} was sent more: {more:#?}", node.desktop.name);
        }
        let stored = Doc::new();
        items(&stored);
        for (_, update) in &cluster.stream {
            apply_update(&stored, update);
        }
        let expected = doc_items(&stored);
        for n in 0..3 {
            cluster.yjs_receive(n);
        }
        for node in &mut cluster.nodes {
            prop_assert_eq!(&doc_items(&node.world.doc()), &expected, "{}'s node", node.desktop.name);
            prop_assert_eq!(&doc_items(&node.yjs), &expected, "the Yjs client of {}'s node", node.desktop.name);
            let shown = node.world.items();
            node.desktop.canvas.assert_shows(&shown, &node.desktop.name);
        }
    }
}
