//! `session`: whole sessions through the sans-IO core, `collab_core::session::Session`, fed
//! only what the server's shell feeds it (`Session::handle` with `Input`s and a synthetic
//! clock; a `Tick` whenever `next_deadline` passes). Connections: 1–4 Optiverse desktop
//! clients and 0–2 Yjs connections (`/yjs/` anonymous or named, or `/ws/...?yjs=1`), plus the
//! HTTP API. They join, leave, are dropped as slow consumers (1013), reconnect (closing the
//! old socket first, or replacing it: the session closes the old one 4000), edit, ping, and
//! apply what the session sent them whenever the script says. Once the session shares its
//! presence, other nodes' connections join, leave and send awareness states, and nodes go.
//!
//! Each desktop client reads the JSON the session wrote and behaves as the real one does
//! (`../shared/optiverse-client`, README): its role comes from the script; a host keeps its
//! canvas (possibly a fixture bench) across connections and edits it offline, uploads it on
//! every `user:joined` (the session sends the joiner its own before the ack); on the ack the
//! upstream variant sends `sync:request`, the fork host uploads again; a client clears its
//! canvas when it connects and adds nothing before its first full state. `add_item` creates a
//! new object, `update_item` replaces the whole dict, `move_item` sets the position,
//! `remove_item` deletes, `sync:full_state` rebuilds (not on a fork host); an `add_item` or a
//! full state is applied with the placeholder-fix `update_item`s of the same write. A Yjs
//! connection is a yrs replica that syncs as y-websocket does and keeps its document across
//! connections.
//!
//! Asserted: no valid input is refused; no `add_item` reaches a client whose canvas holds the
//! item; **no message makes a client drop an item the session never removed, or replace a
//! field value the session never held** (PROTOCOL §3.3; an edit that crossed the item's
//! removal excepted); and once every connection is back and everything is delivered: every
//! client's canvas equals the session's full state (on the fields its dict has), the full
//! state equals the document, the Yjs replicas equal the document (state vector included),
//! and the updates the session gave to persist, loaded as the server loads its store, give
//! the same document. What the session held is learnt incrementally, from the persisted
//! updates applied to a replica whose observer records each changed field once, so the
//! check costs little per step. With presence shared, after every step: the user list names
//! each name once, exactly the local and remote members' names; the awareness states hold at
//! most their total bound; a remote connection that left (or whose node went) holds no state.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use collab_core::doc::scene::item_type_of;
use collab_core::doc::{
    Action, CheckedAwareness, CheckedStateVector, CheckedUpdate, GuardedDoc, PeerId, Scene,
};
use collab_core::protocol::json::{parse_client_message, ClientMessage};
use collab_core::protocol::yjs::YjsMessage;
use collab_core::session::{
    CloseReason, ConnKind, Event, Input, Now, Output, Payload, PayloadKind, Refused, Session,
    SessionLimits, CLOSE_REPLACED, CLOSE_SLOW,
};
use serde_json::{json, Map, Value};
use yrs::sync::awareness::{AwarenessUpdate, AwarenessUpdateEntry};
use yrs::sync::{Message, SyncMessage};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{ClientID, Doc, ReadTxn, StateVector, Transact, Update};

use super::held::{Held, Persisted};
use super::legacy::{
    change_field, command_text, move_to, new_item, normalize, yjs_edit, Change, YjsClient, YjsOp,
};
use super::util::{fixture_scenes, items_json, scene_difference};

/// `SESSION_TRACE=1` prints every step and what each connection applies (when replaying).
fn tracing() -> bool {
    std::env::var_os("SESSION_TRACE").is_some()
}

/// Most steps of one script: every step runs the real session (JSON in and out, uploads of
/// whole canvases), so a longer script mostly costs time; its end checks are where
/// convergence is asserted.
pub const MAX_SESSION_STEPS: usize = 128;

/// One test script.
#[derive(Debug, Clone)]
pub struct SessionScript {
    /// 1 + `desktops % 4` desktop clients.
    pub desktops: u8,
    /// `yjs % 3` Yjs connections; bits `2 + 2j` and `3 + 2j` give connection `j`'s kind
    /// (anonymous `/yjs/`, named `/yjs/`, `/ws/...?yjs=1`).
    pub yjs: u8,
    /// Bit `i`: desktop client `i` acts as host; bit `i + 4`: it is the fork variant.
    pub roles: u8,
    /// Bits `2i` and `2i + 1`: the bench host `i` starts with: none, the first two items of
    /// fixture scene 0 or 1 (hosts may share items), or the whole of scene 2.
    pub benches: u8,
    /// Bit 0: small awareness bounds, so that awareness updates fill the session and evict
    /// ([`World::limits`]; bits 2 to 7 size them); bit 1: the session shares its presence from
    /// the start (else only after [`SessionOp::SharePresence`]).
    pub limits: u8,
    pub ops: Vec<SessionOp>,
}

#[cfg(not(test))]
impl<'a> arbitrary::Arbitrary<'a> for SessionScript {
    fn arbitrary(u: &mut arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(SessionScript {
            desktops: u.arbitrary()?,
            yjs: u.arbitrary()?,
            roles: u.arbitrary()?,
            benches: u.arbitrary()?,
            limits: u.arbitrary()?,
            ops: super::util::steps_up_to(u, MAX_SESSION_STEPS)?,
        })
    }
}

/// One step. Connection `who` counts the desktop clients first, then the Yjs connections. A
/// connection joins at the first step that names it; after it left it stays away (a desktop
/// client edits offline) until it joins or reconnects.
#[cfg_attr(not(test), derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone)]
pub enum SessionOp {
    /// Desktop client `client` applies up to `n % 16 + 1` of the messages that reached it.
    Deliver {
        client: u8,
        n: u8,
    },
    /// Yjs connection `client` reads up to `n % 8 + 1` of its messages.
    YjsDeliver {
        client: u8,
        n: u8,
    },
    Add {
        client: u8,
        template: u8,
        x: i16,
        y: i16,
    },
    Move {
        client: u8,
        pick: u8,
        x: i16,
        y: i16,
        angle: Option<u16>,
        /// A drag step: `move_item` then `update_item`.
        drag: bool,
    },
    Update {
        client: u8,
        pick: u8,
        change: Change,
    },
    Remove {
        client: u8,
        pick: u8,
    },
    /// The desktop client's heartbeat.
    Ping {
        client: u8,
    },
    Join {
        who: u8,
    },
    /// The connection closes.
    Leave {
        who: u8,
    },
    /// The shell drops the connection (its queue overflowed: 1013).
    Drop {
        who: u8,
    },
    /// The connection comes back on a new socket; with `replace`, before the session noticed
    /// that the old one is gone.
    Reconnect {
        who: u8,
        replace: bool,
    },
    /// A Yjs connection edits its replica (sent at once when connected).
    Yjs {
        client: u8,
        op: YjsOp,
    },
    /// A Yjs connection sets (or with `None` removes) its awareness state.
    Awareness {
        client: u8,
        state: Option<u8>,
    },
    /// A script reads the document over HTTP, edits it and posts the update.
    Api {
        op: YjsOp,
    },
    /// Time passes until the session's next deadline (corrections owed, awareness expiry).
    Pause,
    /// The session starts sharing its presence with other nodes (as node [`LOCAL_NODE`]);
    /// before, it ignores the remote inputs below.
    SharePresence,
    /// Another node's connection joins (node `node % 4`: 0 is this node's own id).
    RemoteJoined {
        node: u8,
        peer: u8,
        /// `% 3`: `/ws/` desktop, `/ws/...?yjs=1`, `/yjs/`.
        kind: u8,
        /// An index into [`REMOTE_NAMES`] (local members' names included), `None`: anonymous.
        user: Option<u8>,
        /// `% 4`: now, older or newer than every local join, or a string that is no time.
        connected_at: u8,
        holds_name: bool,
    },
    RemoteLeft {
        node: u8,
        peer: u8,
    },
    /// Another node's connection sends awareness states (client ids of its own).
    RemoteAwareness {
        node: u8,
        peer: u8,
        states: Vec<RemoteState>,
    },
    /// Another node stops without saying.
    NodeGone {
        node: u8,
    },
}

/// One entry of a remote awareness update.
#[cfg_attr(not(test), derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone)]
pub struct RemoteState {
    /// `% 4`: one of the four client ids of the remote connection ([`remote_client_id`]).
    pub client: u8,
    pub clock: u8,
    pub json: RemoteJson,
}

/// An awareness state's JSON.
#[cfg_attr(not(test), derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone)]
pub enum RemoteJson {
    /// A removal.
    Null,
    /// A JSON object of `n % 48 + 10` bytes.
    Object(u8),
    /// Any text (the session refuses what is no JSON object).
    Text(String),
}

/// This node's id once it shares its presence.
const LOCAL_NODE: u64 = 0;

/// Names of remote connections: the local members' (desktops `d*`, Yjs `y*`) and others.
pub const REMOTE_NAMES: [&str; 8] = ["d0", "d1", "d2", "d3", "y0", "y1", "r0", "r1"];

fn remote_node(node: u8) -> u64 {
    u64::from(node % 4)
}

fn remote_peer(peer: u8) -> PeerId {
    // Small ids: the same as local connections' (another node's ids are its own).
    PeerId::from(peer % 4) + 1
}

/// The client ids a remote connection's awareness states use: its own, so that a removed
/// connection's states can be probed for ([`World::assert_no_states_of`]).
fn remote_client_id(node: u64, peer: PeerId, client: u8) -> ClientID {
    ClientID::new(10_000 + node * 100 + peer * 10 + u64::from(client % 4))
}

/// A remote member, as the session should know it.
#[derive(Debug, Clone)]
struct RemoteMember {
    user: Option<Arc<str>>,
    holds_name: bool,
}

/// How a desktop client acts, from its connect dialog (the server cannot tell).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// "Host server": keeps its canvas, uploads it on every `user:joined`; the fork variant
    /// uploads again on the ack and ignores full states.
    Host { fork: bool },
    /// "Connect to server": starts empty, asks for the scene, adds only once it got one.
    Client,
}

/// A desktop client.
struct Desktop {
    name: String,
    role: Role,
    /// Its live connection.
    peer: Option<PeerId>,
    /// The first step that names a connection connects it; later it comes back only when told.
    joined_once: bool,
    /// `initial_sync_complete`: a client sends no `add_item` before a full state.
    synced: bool,
    /// The canvas: a list, so a wrong `add_item` shows up as a duplicate.
    objects: Vec<(String, Map<String, Value>)>,
    /// What reached it and it has not applied yet, with the step (one write) that sent it.
    inbox: VecDeque<(u64, Arc<Value>)>,
    /// Items it created, for their uuids.
    added: usize,
}

impl Desktop {
    fn holds(&self, uuid: &str) -> bool {
        self.objects.iter().any(|(u, _)| u == uuid)
    }

    fn pick(&self, pick: u8) -> Option<(String, Map<String, Value>)> {
        let mut uuids: Vec<&String> = self.objects.iter().map(|(u, _)| u).collect();
        uuids.sort();
        uuids.dedup();
        let uuid = (*uuids.get(usize::from(pick) % uuids.len().max(1))?).clone();
        let fields = self.objects.iter().find(|(u, _)| *u == uuid)?.1.clone();
        Some((uuid, fields))
    }

    fn set_local(&mut self, uuid: &str, fields: &Map<String, Value>) {
        for (_, f) in self.objects.iter_mut().filter(|(u, _)| u == uuid) {
            *f = fields.clone();
        }
    }

    /// Its canvas as an upload (`sync:full_state`), as on `user:joined`.
    fn upload_text(&self, target: Option<&str>) -> String {
        let items: Vec<Value> = self
            .objects
            .iter()
            .map(|(uuid, fields)| {
                let mut item = fields.clone();
                item.insert("item_uuid".into(), json!(uuid));
                item.insert("uuid".into(), json!(uuid));
                Value::Object(item)
            })
            .collect();
        let mut message = json!({"type": "sync:full_state", "state": {"items": items}});
        if let Some(target) = target {
            message["target_user"] = json!(target);
        }
        message.to_string()
    }

    /// Applies one message as the desktop client does, checking first that it makes the
    /// canvas lose nothing the session never held; returns the frames the client answers
    /// with, and the items it created (whose placeholder fixes come with them).
    fn apply(&mut self, msg: &Value, held: &Held) -> (Vec<String>, Vec<String>) {
        if tracing() {
            eprintln!("  {} applies {msg}", self.name);
        }
        let mut answers = Vec::new();
        let mut created = Vec::new();
        match msg["type"].as_str() {
            Some("user:joined") => {
                if let Role::Host { .. } = self.role {
                    answers.push(self.upload_text(msg["user_id"].as_str()));
                }
            }
            Some("connection:ack") => match self.role {
                Role::Host { fork: true } => answers.push(self.upload_text(None)),
                _ => answers.push(json!({"type": "sync:request"}).to_string()),
            },
            Some("sync:full_state") if self.role != (Role::Host { fork: true }) => {
                let new: Vec<(String, Map<String, Value>)> = msg["state"]["items"]
                    .as_array()
                    .expect("a full state's items")
                    .iter()
                    .map(|item| {
                        let mut fields = item.as_object().expect("an item object").clone();
                        let uuid = fields.remove("uuid").expect("an item's uuid");
                        (uuid.as_str().expect("a string uuid").to_owned(), fields)
                    })
                    .collect();
                for (uuid, old) in &self.objects {
                    match new.iter().find(|(u, _)| u == uuid) {
                        Some((_, replacement)) => {
                            held.check_replace(&self.name, uuid, old, replacement)
                        }
                        None => held.check_drop(&self.name, uuid),
                    }
                }
                created = new.iter().map(|(u, _)| u.clone()).collect();
                self.objects = new;
                self.synced = true;
            }
            Some("command") => created.extend(self.apply_command(&msg["command"], held)),
            _ => {}
        }
        (answers, created)
    }

    /// Applies a `command`; returns the item an `add_item` created.
    fn apply_command(&mut self, command: &Value, held: &Held) -> Option<String> {
        let uuid = command["item_id"].as_str().expect("a command's item_id");
        let action =
            Action::parse(command["action"].as_str().expect("an action")).expect("a known action");
        let mut data = command["data"].as_object().cloned().unwrap_or_default();
        if !data.contains_key("item_type") {
            data.insert("item_type".into(), command["item_type"].clone());
        }
        let current = self.objects.iter().find(|(u, _)| u == uuid).map(|o| &o.1);
        match (action, current) {
            (Action::Remove, Some(_)) => held.check_drop(&self.name, uuid),
            (Action::Update, Some(old)) => held.check_replace(&self.name, uuid, old, &data),
            (Action::Move, Some(old)) => {
                let position: Map<String, Value> = old
                    .iter()
                    .filter(|(k, _)| ["x_mm", "y_mm", "angle_deg"].contains(&k.as_str()))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                held.check_replace(&self.name, uuid, &position, &data);
            }
            _ => {}
        }
        match action {
            Action::Add => {
                assert!(
                    !self.holds(uuid),
                    "{} got add_item for {uuid}, which its canvas holds",
                    self.name
                );
                self.objects.push((uuid.to_owned(), data));
                return Some(uuid.to_owned());
            }
            Action::Move => {
                for (_, fields) in self.objects.iter_mut().filter(|(u, _)| u == uuid) {
                    for key in ["x_mm", "y_mm", "angle_deg"] {
                        if let Some(v) = data.get(key) {
                            fields.insert(key.to_owned(), v.clone());
                        }
                    }
                }
            }
            Action::Update => self.set_local(uuid, &data),
            Action::Remove => self.objects.retain(|(u, _)| u != uuid),
        }
        None
    }

    /// Its canvas by uuid, asserting that it holds no uuid twice.
    fn scene(&self) -> BTreeMap<String, Value> {
        let mut scene = BTreeMap::new();
        for (uuid, fields) in &self.objects {
            let previous = scene.insert(uuid.clone(), normalize(fields));
            assert!(
                previous.is_none(),
                "{} holds two objects for {uuid}",
                self.name
            );
        }
        scene
    }
}

/// A Yjs connection: a yrs replica that keeps its document across connections.
struct YjsConn {
    replica: YjsClient,
    kind: ConnKind,
    user: Option<Arc<str>>,
    peer: Option<PeerId>,
    /// As [`Desktop::joined_once`].
    joined_once: bool,
    inbox: VecDeque<Arc<Payload>>,
    awareness_clock: u32,
}

/// Who a live connection is.
#[derive(Debug, Clone, Copy)]
enum Endpoint {
    Desktop(usize),
    Yjs(usize),
}

/// The wall-clock time the session's timestamps start at.
const WALL_START: Duration = Duration::from_secs(1_764_000_000);

/// Most rounds of delivery and deadlines before the session must be quiet.
const MAX_SETTLE_ROUNDS: usize = 10_000;

struct World {
    session: Session,
    /// The synthetic clock starts here; a step takes a millisecond, a pause jumps to the
    /// session's next deadline.
    start: Instant,
    now: Now,
    desktops: Vec<Desktop>,
    yjs: Vec<YjsConn>,
    /// A script on the HTTP API: it reads the whole document before each edit.
    api: YjsClient,
    /// The live connections; what the session sends any other one is lost with its socket.
    live: HashMap<PeerId, Endpoint>,
    next_peer: PeerId,
    /// Counts the session's steps: messages of one step reach a connection in one write.
    step: u64,
    /// Every update the session gave to persist, applied in order, and what they held.
    replica: Persisted,
    /// The same updates, loaded at the end as the server loads its store.
    persisted: Vec<Vec<u8>>,
    limits: SessionLimits,
    /// `share_presence` was called.
    shared: bool,
    /// The other nodes' connections the session heard join and not leave.
    remote: BTreeMap<(u64, PeerId), RemoteMember>,
    /// The other nodes' connections that sent awareness updates.
    remote_awareness: BTreeSet<(u64, PeerId)>,
    /// While a local connection's awareness update is fed: under small bounds the session
    /// may refuse it when no other connection holds more than it would (awareness.rs).
    awareness_refusable: bool,
}

impl World {
    fn new(script: &SessionScript) -> World {
        let scenes = fixture_scenes();
        let desktops = (0..1 + usize::from(script.desktops % 4))
            .map(|i| {
                let role = if script.roles & (1 << i) != 0 {
                    Role::Host {
                        fork: script.roles & (1 << (i + 4)) != 0,
                    }
                } else {
                    Role::Client
                };
                let bench = usize::from((script.benches >> (2 * i)) & 3);
                let objects = match role {
                    // Small benches mostly: each one is uploaded on every join.
                    Role::Host { .. } if bench > 0 => scenes[bench - 1]
                        .iter()
                        .take(if bench == 3 { usize::MAX } else { 2 })
                        .filter_map(|item| {
                            let mut fields = item.as_object()?.clone();
                            let uuid = fields.get("item_uuid")?.as_str()?.to_owned();
                            let kind = fields.get("_type").cloned().unwrap_or(json!("component"));
                            fields.insert("item_type".into(), kind);
                            Some((uuid, fields))
                        })
                        .collect(),
                    _ => Vec::new(),
                };
                Desktop {
                    name: format!("d{i}"),
                    synced: role != Role::Client,
                    role,
                    peer: None,
                    joined_once: false,
                    objects,
                    inbox: VecDeque::new(),
                    added: 0,
                }
            })
            .collect();
        let yjs = (0..usize::from(script.yjs % 3))
            .map(|j| {
                let name = format!("y{j}");
                let (kind, user) = match (script.yjs >> (2 + 2 * j)) & 3 {
                    0 => (ConnKind::Yjs, None),
                    1 => (ConnKind::Yjs, Some(Arc::from(name.as_str()))),
                    _ => (ConnKind::LegacyYjs, Some(Arc::from(name.as_str()))),
                };
                YjsConn {
                    replica: YjsClient::new(1000 + j as u64, &name),
                    kind,
                    user,
                    peer: None,
                    joined_once: false,
                    inbox: VecDeque::new(),
                    awareness_clock: 0,
                }
            })
            .collect();
        let start = Instant::now();
        let limits = World::limits(script.limits);
        World {
            session: Session::new(Arc::from("fuzz"), Scene::default(), &limits),
            start,
            now: Now::at(start, SystemTime::UNIX_EPOCH + WALL_START),
            desktops,
            yjs,
            api: YjsClient::new(2000, "api"),
            live: HashMap::new(),
            next_peer: 1,
            step: 0,
            replica: Persisted::default(),
            persisted: Vec::new(),
            limits,
            shared: false,
            remote: BTreeMap::new(),
            remote_awareness: BTreeSet::new(),
            awareness_refusable: false,
        }
    }

    /// The default bounds, or (bit 0) awareness bounds a few states reach: up to 4 states,
    /// 64 to 184 bytes in all, 96 bytes each (a local Yjs state takes about 30).
    fn limits(bits: u8) -> SessionLimits {
        let defaults = SessionLimits::default();
        if bits & 1 == 0 {
            return defaults;
        }
        SessionLimits {
            max_awareness_bytes: 96,
            max_awareness_states: 1 + usize::from((bits >> 2) % 4),
            max_awareness_total_bytes: 64 + 8 * usize::from(bits >> 4),
            ..defaults
        }
    }

    /// Time moves to `at`; every deadline that passed gets its `Tick`, as the shell does.
    fn advance_to(&mut self, at: Instant) {
        let wall = SystemTime::UNIX_EPOCH + WALL_START + (at - self.start);
        self.now = Now::at(at, wall);
        while self.session.next_deadline().is_some_and(|d| d <= at) {
            self.input(Input::Tick);
        }
    }

    /// Feeds the session one input and takes in what it produced, in the shell's order:
    /// persist, then close, then send (a connection closed in this step loses what it was
    /// sent in it). Returns the connections it closed.
    fn input(&mut self, input: Input) -> Vec<(PeerId, CloseReason)> {
        let mut out = Output::default();
        if let Err(e) = self.session.handle(input, &self.now, &mut out) {
            panic!("the session refused a valid input: {e}");
        }
        self.step += 1;
        for update in &out.persist {
            self.replica.apply(update);
        }
        self.persisted.extend(out.persist);
        for event in &out.events {
            let expected = match event {
                // Remote updates come from the script: any may break the awareness rules.
                Event::RemoteAwarenessRejected { .. } => true,
                Event::Rejected { .. } => self.awareness_refusable,
                _ => false,
            };
            assert!(expected, "the session reported {event:?} for valid input");
        }
        assert!(
            self.session.awareness_bytes() <= self.limits.max_awareness_total_bytes,
            "awareness states hold {} bytes, over the bound {}",
            self.session.awareness_bytes(),
            self.limits.max_awareness_total_bytes
        );
        for (peer, reason) in &out.closes {
            if tracing() {
                eprintln!("  closes {peer}: {} {}", reason.code, reason.reason);
            }
            if let Some(endpoint) = self.live.get(peer).copied() {
                self.disconnected(endpoint);
            }
        }
        // A broadcast is one payload: it is parsed once.
        let mut parsed: HashMap<*const Payload, Arc<Value>> = HashMap::new();
        for (peer, payload) in out.sends {
            match self.live.get(&peer) {
                Some(Endpoint::Desktop(i)) => {
                    assert_eq!(payload.kind(), PayloadKind::Text, "binary to a desktop");
                    let value = parsed
                        .entry(Arc::as_ptr(&payload))
                        .or_insert_with(|| {
                            Arc::new(serde_json::from_slice(payload.bytes()).expect("JSON"))
                        })
                        .clone();
                    self.desktops[*i].inbox.push_back((self.step, value));
                }
                Some(Endpoint::Yjs(j)) => self.yjs[*j].inbox.push_back(payload),
                None => assert!(peer < self.next_peer, "a message for {peer}, never joined"),
            }
        }
        out.closes
    }

    fn disconnected(&mut self, endpoint: Endpoint) {
        let peer = match endpoint {
            Endpoint::Desktop(i) => {
                let d = &mut self.desktops[i];
                d.inbox.clear();
                d.peer.take()
            }
            Endpoint::Yjs(j) => {
                let y = &mut self.yjs[j];
                y.inbox.clear();
                y.peer.take()
            }
        };
        if let Some(peer) = peer {
            self.live.remove(&peer);
        }
    }

    fn peer_of(&self, endpoint: Endpoint) -> Option<PeerId> {
        match endpoint {
            Endpoint::Desktop(i) => self.desktops[i].peer,
            Endpoint::Yjs(j) => self.yjs[j].peer,
        }
    }

    /// Connection `who`, joined if it never was.
    fn endpoint(&mut self, who: u8) -> Endpoint {
        let n = self.desktops.len() + self.yjs.len();
        let k = usize::from(who) % n;
        let endpoint = if k < self.desktops.len() {
            Endpoint::Desktop(k)
        } else {
            Endpoint::Yjs(k - self.desktops.len())
        };
        let joined_once = match endpoint {
            Endpoint::Desktop(i) => self.desktops[i].joined_once,
            Endpoint::Yjs(j) => self.yjs[j].joined_once,
        };
        if !joined_once {
            self.connect(endpoint);
        }
        endpoint
    }

    fn desktop(&mut self, client: u8) -> usize {
        match self.endpoint(client % self.desktops.len() as u8) {
            Endpoint::Desktop(i) => i,
            Endpoint::Yjs(_) => unreachable!("desktop clients come first"),
        }
    }

    fn yjs_conn(&mut self, client: u8) -> Option<usize> {
        if self.yjs.is_empty() {
            return None;
        }
        let k = self.desktops.len() + usize::from(client) % self.yjs.len();
        match self.endpoint(k as u8) {
            Endpoint::Yjs(j) => Some(j),
            Endpoint::Desktop(_) => unreachable!("Yjs connections come after"),
        }
    }

    /// Opens a new connection for `endpoint` (its old one, if any, stays a member: the
    /// session replaces it or a `Leave` follows).
    /// A connection another node's connection holds the name of is refused, changing nothing
    /// (PROTOCOL §3.5; local connections here hold no name).
    fn connect(&mut self, endpoint: Endpoint) -> Vec<(PeerId, CloseReason)> {
        let peer = self.next_peer;
        self.next_peer += 1;
        let (kind, user) = match endpoint {
            Endpoint::Desktop(i) => (
                ConnKind::Legacy,
                Some(Arc::from(self.desktops[i].name.as_str())),
            ),
            Endpoint::Yjs(j) => (self.yjs[j].kind, self.yjs[j].user.clone()),
        };
        if self
            .remote
            .values()
            .any(|m| m.holds_name && m.user.is_some() && m.user == user)
        {
            let join = Input::Join {
                peer,
                kind,
                user,
                access: collab_core::session::Access::OPEN,
            };
            let mut out = Output::default();
            let refused = self.session.handle(join, &self.now, &mut out);
            assert_eq!(
                refused,
                Err(Refused::NameHeld),
                "a join of a name another node's connection holds"
            );
            assert!(out.is_empty(), "a refused join changed something: {out:?}");
            return Vec::new();
        }
        self.live.insert(peer, endpoint);
        match endpoint {
            Endpoint::Desktop(i) => {
                let d = &mut self.desktops[i];
                if let Some(old) = d.peer.replace(peer) {
                    self.live.remove(&old);
                }
                d.joined_once = true;
                d.inbox.clear();
                if d.role == Role::Client {
                    // "Connect to server" starts from the server's scene.
                    d.objects.clear();
                    d.synced = false;
                }
                let user = Some(Arc::from(d.name.as_str()));
                // A host uploads when it reads its own `user:joined`, like any other message:
                // other inputs may reach the session first.
                self.input(Input::Join {
                    peer,
                    kind: ConnKind::Legacy,
                    user,
                    access: collab_core::session::Access::OPEN,
                })
            }
            Endpoint::Yjs(j) => {
                let y = &mut self.yjs[j];
                if let Some(old) = y.peer.replace(peer) {
                    self.live.remove(&old);
                }
                y.joined_once = true;
                y.inbox.clear();
                let (kind, user) = (y.kind, y.user.clone());
                let sv = y.replica.doc.transact().state_vector().encode_v1();
                let closes = self.input(Input::Join {
                    peer,
                    kind,
                    user,
                    access: collab_core::session::Access::OPEN,
                });
                // y-websocket sends its SyncStep1 on open.
                let sv = CheckedStateVector::check(sv).expect("a replica's state vector");
                self.yjs_send(j, YjsMessage::SyncStep1(sv));
                closes
            }
        }
    }

    fn leave(&mut self, endpoint: Endpoint) {
        if let Some(peer) = self.peer_of(endpoint) {
            self.disconnected(endpoint);
            self.input(Input::Leave { peer });
        }
    }

    fn reconnect(&mut self, endpoint: Endpoint, replace: bool) {
        let Some(old) = self.peer_of(endpoint).filter(|_| replace) else {
            self.leave(endpoint);
            self.connect(endpoint);
            return;
        };
        let closes = self.connect(endpoint);
        if self.peer_of(endpoint) == Some(old) {
            // Refused: the name is another node's.
            return;
        }
        let speaks_json = match endpoint {
            Endpoint::Desktop(_) => true,
            Endpoint::Yjs(j) => self.yjs[j].kind.speaks_json(),
        };
        if speaks_json {
            assert!(
                closes.contains(&(old, CLOSE_REPLACED)),
                "the replaced connection {old} was not closed 4000: {closes:?}"
            );
        } else {
            // Yjs connections are never replaced: the shell notices the old socket is gone.
            self.input(Input::Leave { peer: old });
        }
    }

    /// Sends a frame from desktop client `i`, if it is connected.
    fn send_json(&mut self, i: usize, text: String) {
        let Some(peer) = self.desktops[i].peer else {
            return;
        };
        if tracing() {
            eprintln!("  {} sends {text}", self.desktops[i].name);
        }
        let message = parse_client_message(&text)
            .unwrap_or_else(|e| panic!("a valid client frame was refused ({e}): {text}"));
        if let ClientMessage::Command(command) = &message {
            let mut held = self.replica.held();
            // An edit of an item the session removed meanwhile is dropped: a removal wins.
            if command.action != Action::Add && !held.current.contains(command.item_id.as_ref()) {
                held.discard(&command.item_id, &command.data);
            }
        }
        self.input(Input::Json { peer, message });
    }

    fn yjs_send(&mut self, j: usize, message: YjsMessage) {
        if let Some(peer) = self.yjs[j].peer {
            self.input(Input::Yjs { peer, message });
        }
    }

    /// Desktop client `i` applies its next message, with the placeholder fixes of the same
    /// write that follow it, and answers. Returns false when nothing is left.
    fn deliver_desktop(&mut self, i: usize) -> bool {
        let Some((step, msg)) = self.desktops[i].inbox.pop_front() else {
            return false;
        };
        let (mut answers, created) = self.desktops[i].apply(&msg, &self.replica.held());
        let d = &mut self.desktops[i];
        while let Some((fix_step, fix)) = d.inbox.front() {
            let is_fix = *fix_step == step
                && fix["command"]["action"] == "update_item"
                && created.iter().any(|u| fix["command"]["item_id"] == **u);
            if !is_fix {
                break;
            }
            let fix = fix.clone();
            d.inbox.pop_front();
            answers.extend(d.apply(&fix, &self.replica.held()).0);
        }
        for text in answers {
            self.send_json(i, text);
        }
        true
    }

    /// Yjs connection `j` reads its next message. Returns false when nothing is left.
    fn deliver_yjs(&mut self, j: usize) -> bool {
        let Some(payload) = self.yjs[j].inbox.pop_front() else {
            return false;
        };
        let y = &mut self.yjs[j];
        if payload.kind() == PayloadKind::Text {
            // `/ws/...?yjs=1`: the ack carries the whole document.
            let msg: Value = serde_json::from_slice(payload.bytes()).expect("JSON");
            if let Some(snapshot) = msg["snapshot"].as_str() {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(snapshot)
                    .expect("the snapshot is base64");
                apply_to(&y.replica.doc, &bytes);
            }
            return true;
        }
        match Message::decode_v1(payload.bytes()).expect("the session's frame decodes") {
            Message::Sync(SyncMessage::SyncStep1(sv)) => {
                let diff = y.replica.doc.transact().encode_diff_v1(&sv);
                let diff = CheckedUpdate::check(diff).expect("a replica's update");
                self.yjs_send(j, YjsMessage::SyncStep2(diff));
            }
            Message::Sync(SyncMessage::SyncStep2(u) | SyncMessage::Update(u)) => {
                apply_to(&y.replica.doc, &u)
            }
            _ => {}
        }
        true
    }

    fn yjs_edit(&mut self, j: usize, op: &YjsOp) {
        let update = yjs_edit(&mut self.yjs[j].replica, op);
        if update != [0, 0] {
            let update = CheckedUpdate::check(update).expect("a replica's update");
            self.yjs_send(j, YjsMessage::Update(update));
        }
    }

    fn awareness(&mut self, j: usize, state: Option<u8>) {
        let y = &mut self.yjs[j];
        y.awareness_clock += 1;
        let json = match state {
            Some(v) => json!({"user": {"name": y.replica.user.as_ref()}, "v": v}).to_string(),
            None => "null".to_owned(),
        };
        let entry = AwarenessUpdateEntry {
            clock: y.awareness_clock,
            json: json.into(),
        };
        let update = AwarenessUpdate {
            clients: HashMap::from([(y.replica.doc.client_id(), entry)]),
        };
        let checked = CheckedAwareness::check(update.encode_v1()).expect("an awareness update");
        self.awareness_refusable = self.limits.max_awareness_total_bytes
            < SessionLimits::default().max_awareness_total_bytes;
        self.yjs_send(j, YjsMessage::Awareness(checked));
        self.awareness_refusable = false;
    }

    fn remote_joined(
        &mut self,
        node: u64,
        peer: PeerId,
        join: (ConnKind, Option<Arc<str>>, Arc<str>, bool),
    ) {
        let (kind, user, connected_at, holds_name) = join;
        self.input(Input::RemoteJoined {
            node,
            peer,
            kind,
            user: user.clone(),
            connected_at,
            holds_name,
        });
        if self.shared && node != LOCAL_NODE {
            self.remote
                .insert((node, peer), RemoteMember { user, holds_name });
        }
    }

    /// Another node's connection leaves: its awareness states go with it.
    fn remote_left(&mut self, node: u64, peer: PeerId) {
        self.input(Input::RemoteLeft { node, peer });
        if self.shared {
            self.remote.remove(&(node, peer));
            self.assert_no_states_of(node, Some(peer));
        }
    }

    /// Another node is gone: its connections leave, their awareness states with them.
    fn node_gone(&mut self, node: u64) {
        self.input(Input::NodeGone { node });
        if self.shared {
            self.remote.retain(|(n, _), _| *n != node);
            self.assert_no_states_of(node, None);
        }
    }

    fn remote_awareness(&mut self, node: u64, peer: PeerId, states: &[RemoteState]) {
        let clients = states
            .iter()
            .map(|state| {
                let json = match &state.json {
                    RemoteJson::Null => "null".to_owned(),
                    // Within the small bound on one state (96 bytes): a few fill the session.
                    RemoteJson::Object(n) => {
                        json!({"pad": "x".repeat(usize::from(*n % 48))}).to_string()
                    }
                    RemoteJson::Text(text) => text.clone(),
                };
                let entry = AwarenessUpdateEntry {
                    clock: u32::from(state.clock),
                    json: json.into(),
                };
                (remote_client_id(node, peer, state.client), entry)
            })
            .collect();
        let bytes = AwarenessUpdate { clients }.encode_v1();
        let Ok(update) = CheckedAwareness::check(bytes) else {
            return;
        };
        self.input(Input::RemoteAwareness { node, peer, update });
        self.remote_awareness.insert((node, peer));
    }

    /// Asserts that the session holds no awareness state of `node`'s connection `peer`, or of
    /// any of its connections: a probe removes each of their client ids, as another remote
    /// connection. Only the owner of a state may remove it, so the probe is refused while
    /// one is held, and it changes nothing when none is (a removal of an unknown client).
    fn assert_no_states_of(&mut self, node: u64, peer: Option<PeerId>) {
        let probe = (node % 3) + 1;
        let clients: HashMap<ClientID, AwarenessUpdateEntry> = self
            .remote_awareness
            .iter()
            .filter(|(n, p)| *n == node && peer.is_none_or(|peer| *p == peer))
            .flat_map(|(n, p)| (0..4).map(|c| remote_client_id(*n, *p, c)))
            .map(|client| {
                let entry = AwarenessUpdateEntry {
                    clock: 0,
                    json: "null".into(),
                };
                (client, entry)
            })
            .collect();
        if clients.is_empty() {
            return;
        }
        let update = AwarenessUpdate { clients }.encode_v1();
        let update = CheckedAwareness::check(update).expect("a removal passes the guard");
        let mut out = Output::default();
        let input = Input::RemoteAwareness {
            node: probe,
            peer: PeerId::MAX,
            update,
        };
        self.session
            .handle(input, &self.now, &mut out)
            .expect("an awareness update is never refused as a whole");
        assert!(
            out.is_empty(),
            "node {node}'s connection {peer:?} left, yet its awareness states remain: {:?}",
            out.events
        );
    }

    /// The session's user list: each name once, exactly the names of the connections in the
    /// session on this node and on the others.
    fn assert_users(&mut self) {
        let users = self.session.summary().users;
        let listed: BTreeSet<&str> = users.iter().map(String::as_str).collect();
        assert_eq!(listed.len(), users.len(), "a name listed twice: {users:?}");
        let local_desktops = self
            .desktops
            .iter()
            .filter(|d| d.peer.is_some())
            .map(|d| d.name.as_str());
        let local_yjs = self
            .yjs
            .iter()
            .filter(|y| y.peer.is_some())
            .filter_map(|y| y.user.as_deref());
        let remote = self.remote.values().filter_map(|m| m.user.as_deref());
        let expected: BTreeSet<&str> = local_desktops.chain(local_yjs).chain(remote).collect();
        assert_eq!(listed, expected, "the user list");
    }

    fn api(&mut self, op: &YjsOp) {
        let state = self.session.encode_state().expect("the session encodes");
        apply_to(&self.api.doc, &state);
        let update = yjs_edit(&mut self.api, op);
        if update != [0, 0] {
            let update = CheckedUpdate::check(update).expect("the API client's update");
            self.input(Input::ApiUpdate(update));
        }
    }

    fn step(&mut self, op: &SessionOp) {
        if tracing() {
            eprintln!("{op:?}");
        }
        self.advance_to(self.now.instant + Duration::from_millis(1));
        match op {
            SessionOp::Deliver { client, n } => {
                let i = self.desktop(*client);
                for _ in 0..=n % 16 {
                    if !self.deliver_desktop(i) {
                        break;
                    }
                }
            }
            SessionOp::YjsDeliver { client, n } => {
                if let Some(j) = self.yjs_conn(*client) {
                    for _ in 0..=n % 8 {
                        if !self.deliver_yjs(j) {
                            break;
                        }
                    }
                }
            }
            SessionOp::Add {
                client,
                template,
                x,
                y,
            } => {
                let i = self.desktop(*client);
                let d = &mut self.desktops[i];
                if !d.synced {
                    // The desktop client would keep it local and never send it.
                    return;
                }
                d.added += 1;
                let uuid = format!("{}-{}", d.name, d.added);
                let item = new_item(&uuid, *template, *x, *y);
                d.objects.push((uuid.clone(), item.clone()));
                let text = command_text(&d.name, "add_item", &uuid, &item);
                self.send_json(i, text);
            }
            SessionOp::Move {
                client,
                pick,
                x,
                y,
                angle,
                drag,
            } => {
                let i = self.desktop(*client);
                let Some((uuid, mut fields)) = self.desktops[i].pick(*pick) else {
                    return;
                };
                move_to(&mut fields, *x, *y, *angle);
                self.desktops[i].set_local(&uuid, &fields);
                let name = self.desktops[i].name.clone();
                self.send_json(i, command_text(&name, "move_item", &uuid, &fields));
                if *drag {
                    self.send_json(i, command_text(&name, "update_item", &uuid, &fields));
                }
            }
            SessionOp::Update {
                client,
                pick,
                change,
            } => {
                let i = self.desktop(*client);
                let Some((uuid, mut fields)) = self.desktops[i].pick(*pick) else {
                    return;
                };
                let name = self.desktops[i].name.clone();
                change_field(&mut fields, &name, change);
                self.desktops[i].set_local(&uuid, &fields);
                self.send_json(i, command_text(&name, "update_item", &uuid, &fields));
            }
            SessionOp::Remove { client, pick } => {
                let i = self.desktop(*client);
                let Some((uuid, fields)) = self.desktops[i].pick(*pick) else {
                    return;
                };
                self.desktops[i].objects.retain(|(u, _)| *u != uuid);
                let name = self.desktops[i].name.clone();
                self.send_json(i, command_text(&name, "remove_item", &uuid, &fields));
            }
            SessionOp::Ping { client } => {
                let i = self.desktop(*client);
                self.send_json(i, json!({"type": "ping"}).to_string());
            }
            SessionOp::Join { who } => {
                let endpoint = self.endpoint(*who);
                if self.peer_of(endpoint).is_none() {
                    self.connect(endpoint);
                }
            }
            SessionOp::Leave { who } => {
                let endpoint = self.endpoint(*who);
                self.leave(endpoint);
            }
            SessionOp::Drop { who } => {
                let endpoint = self.endpoint(*who);
                if let Some(peer) = self.peer_of(endpoint) {
                    let closes = self.input(Input::Drop {
                        peer,
                        reason: CLOSE_SLOW,
                    });
                    assert!(
                        closes.contains(&(peer, CLOSE_SLOW)),
                        "a dropped connection was not closed 1013: {closes:?}"
                    );
                }
            }
            SessionOp::Reconnect { who, replace } => {
                let endpoint = self.endpoint(*who);
                self.reconnect(endpoint, *replace);
            }
            SessionOp::Yjs { client, op } => {
                if let Some(j) = self.yjs_conn(*client) {
                    self.yjs_edit(j, op);
                }
            }
            SessionOp::Awareness { client, state } => {
                if let Some(j) = self.yjs_conn(*client) {
                    self.awareness(j, *state);
                }
            }
            SessionOp::Api { op } => self.api(op),
            SessionOp::Pause => {
                if let Some(at) = self.session.next_deadline() {
                    self.advance_to(at.max(self.now.instant));
                }
            }
            SessionOp::SharePresence => {
                self.session.share_presence(LOCAL_NODE);
                self.shared = true;
            }
            SessionOp::RemoteJoined {
                node,
                peer,
                kind,
                user,
                connected_at,
                holds_name,
            } => {
                let kind =
                    [ConnKind::Legacy, ConnKind::LegacyYjs, ConnKind::Yjs][usize::from(kind % 3)];
                let user =
                    user.map(|u| Arc::from(REMOTE_NAMES[usize::from(u) % REMOTE_NAMES.len()]));
                let connected_at: Arc<str> = match connected_at % 4 {
                    0 => self.now.timestamp().clone(),
                    1 => Arc::from("2000-01-01T00:00:00.000Z"),
                    2 => Arc::from("2100-01-01T00:00:00.000Z"),
                    _ => Arc::from(format!("not a time {connected_at}")),
                };
                let join = (kind, user, connected_at, *holds_name);
                self.remote_joined(remote_node(*node), remote_peer(*peer), join);
            }
            SessionOp::RemoteLeft { node, peer } => {
                self.remote_left(remote_node(*node), remote_peer(*peer))
            }
            SessionOp::RemoteAwareness { node, peer, states } => {
                self.remote_awareness(remote_node(*node), remote_peer(*peer), states)
            }
            SessionOp::NodeGone { node } => self.node_gone(remote_node(*node)),
        }
        self.assert_users();
    }

    /// Every connection comes back, everything is delivered and every deadline passes.
    fn settle(&mut self) {
        for i in 0..self.desktops.len() {
            if self.desktops[i].peer.is_none() {
                self.connect(Endpoint::Desktop(i));
            }
        }
        for j in 0..self.yjs.len() {
            if self.yjs[j].peer.is_none() {
                self.connect(Endpoint::Yjs(j));
            }
        }
        for round in 0.. {
            assert!(round < MAX_SETTLE_ROUNDS, "the session never went quiet");
            let mut busy = false;
            for i in 0..self.desktops.len() {
                while self.deliver_desktop(i) {
                    busy = true;
                }
            }
            for j in 0..self.yjs.len() {
                while self.deliver_yjs(j) {
                    busy = true;
                }
            }
            if !busy {
                match self.session.next_deadline() {
                    Some(at) => self.advance_to(at.max(self.now.instant)),
                    None => break,
                }
            }
        }
    }

    fn check(&mut self) {
        // Every other node goes: only this node's members are listed.
        for node in 1..4 {
            self.node_gone(node);
        }
        self.assert_users();
        self.settle();
        // The document, as the session encodes it and as its persisted updates load.
        let encoded = self.session.encode_state().expect("the session encodes");
        let doc = Doc::new();
        apply_to(&doc, &encoded);
        let items = doc.get_or_insert_map("items");
        let (document, sv) = {
            let txn = doc.transact();
            (items_json(&txn, &items), txn.state_vector())
        };
        let checked: Vec<CheckedUpdate> = self
            .persisted
            .iter()
            .map(|u| CheckedUpdate::check(u.clone()).expect("a persisted update passes the guard"))
            .collect();
        let mut loaded = GuardedDoc::from_updates(&checked).expect("the persisted updates load");
        let reloaded = loaded
            .read(|txn, items| items_json(txn, items))
            .expect("the loaded document reads");
        assert_eq!(
            reloaded, document,
            "the persisted updates load another document"
        );
        assert_eq!(
            StateVector::decode_v1(&loaded.state_vector_v1()).expect("a state vector"),
            sv,
            "the persisted updates load another state vector"
        );
        assert_eq!(self.replica.items(), document, "persisted in order");
        // The session's full state (what desktop clients are sent) equals the document.
        let scene: Value =
            serde_json::from_str(&self.session.scene_json(&self.now)).expect("scene JSON");
        let full_state: BTreeMap<String, Value> = scene["items"]
            .as_array()
            .expect("the scene's items")
            .iter()
            .map(|item| {
                let fields = item.as_object().expect("an item object");
                let uuid = fields["uuid"].as_str().expect("a uuid").to_owned();
                (uuid, normalize(fields))
            })
            .collect();
        let expected: BTreeMap<String, Value> = document
            .iter()
            .map(|(uuid, fields)| {
                let mut fields = fields.as_object().cloned().unwrap_or_default();
                let kind = item_type_of(&fields).to_owned();
                fields.insert("item_type".into(), json!(kind));
                (uuid.clone(), normalize(&fields))
            })
            .collect();
        if full_state != expected {
            panic!(
                "the session's full state differs from its document; {}",
                scene_difference(&full_state, &expected)
            );
        }
        for d in &self.desktops {
            let canvas = d.scene();
            // A field a client's dict lacks is one it does not model (the desktop clients
            // serialise a fixed set per item type): it is compared on the fields it has.
            let modelled: BTreeMap<String, Value> = full_state
                .iter()
                .map(|(uuid, fields)| {
                    let fields = match (canvas.get(uuid), fields) {
                        (Some(Value::Object(own)), Value::Object(doc)) => Value::Object(
                            doc.iter()
                                .filter(|(k, _)| own.contains_key(*k))
                                .map(|(k, v)| (k.clone(), v.clone()))
                                .collect(),
                        ),
                        _ => fields.clone(),
                    };
                    (uuid.clone(), fields)
                })
                .collect();
            if canvas != modelled {
                panic!(
                    "{} diverged; {}",
                    d.name,
                    scene_difference(&canvas, &modelled)
                );
            }
        }
        for y in &self.yjs {
            let txn = y.replica.doc.transact();
            assert_eq!(
                items_json(&txn, &y.replica.items),
                document,
                "{} diverged",
                y.replica.user
            );
            assert_eq!(txn.state_vector(), sv, "{}'s state vector", y.replica.user);
        }
    }
}

/// Applies an update the session sent to a plain yrs replica (the server sends in order).
fn apply_to(doc: &Doc, update: &[u8]) {
    let update = Update::decode_v1(update).expect("the session's update decodes");
    doc.transact_mut()
        .apply_update(update)
        .expect("the session's update applies");
}

/// Runs a script and asserts the invariants along the way and convergence at the end.
pub fn run(script: &SessionScript) {
    let mut world = World::new(script);
    if script.limits & 2 != 0 {
        world.step(&SessionOp::SharePresence);
    }
    for op in &script.ops {
        world.step(op);
    }
    world.check();
}
