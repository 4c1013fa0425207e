//! A session and its connections, without a server: [`World`] feeds a
//! [`collab_core::session::Session`] inputs as the server's shell would (one at a time, with a
//! clock the test moves), and decodes every [`Output`] into what each connection received:
//! JSON messages for `/ws`, y-websocket messages for `/yjs`, both for `?yjs=1`.
//!
//! On every step it also checks what holds for any input: a Yjs update sent is one the step
//! asked to store (durable before sent); nothing goes to a connection that left or was
//! closed; `/ws` gets no binary frame and `/yjs` no text frame.
#![allow(dead_code)]

pub mod desktop;
pub mod messages;
pub mod ydoc;

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use collab_core::doc::{CheckedUpdate, GuardedDoc, PeerId, Scene};
use collab_core::protocol::json::parse_client_message;
use collab_core::protocol::yjs;
use collab_core::session::{
    Access, Backlog, CloseReason, ConnKind, Event, Input, Now, Output, PayloadKind, PresenceChange,
    Refused, Session, SessionLimits,
};
use serde_json::{json, Value};
use yrs::sync::{Message, SyncMessage};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::Doc;

// Every suite uses some of these, none uses all.
#[allow(unused_imports)]
pub use {desktop::*, messages::*, ydoc::*};

/// The session id every test world uses.
pub const SESSION: &str = "bench";

/// What a connection received, decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum Received {
    Json(Value),
    Yjs(Message),
}

/// One connection as the world tracks it.
#[derive(Debug)]
pub struct Conn {
    pub kind: ConnKind,
    pub user: Option<String>,
    /// What it received, each with what a catch-up does to it while it waits in the queue.
    inbox: VecDeque<(Received, Backlog)>,
    /// Why the session closed it, if it did.
    pub closed: Option<CloseReason>,
    /// It left (or was closed): nothing may be sent to it any more.
    pub gone: bool,
}

/// A session, its connections, what it stored, and a clock.
pub struct World {
    pub session: Session,
    start: Instant,
    /// Time since `start`.
    elapsed: Duration,
    next_peer: PeerId,
    pub conns: BTreeMap<PeerId, Conn>,
    /// Every update the session asked to store, in order.
    pub persisted: Vec<Vec<u8>>,
    /// Every event the session reported, in order.
    pub events: Vec<Event>,
    /// What the session told the other nodes (`Session::share_presence`), in order.
    pub presence: Vec<PresenceChange>,
}

impl Default for World {
    fn default() -> Self {
        World::new()
    }
}

impl World {
    /// A new session: nothing stored, scene not initialized.
    pub fn new() -> World {
        World::with(Scene::default(), &SessionLimits::default())
    }

    /// A session with awareness bounds of its own.
    pub fn with_limits(limits: &SessionLimits) -> World {
        World::with(Scene::default(), limits)
    }

    /// A session loaded from stored updates (as after a restart or an eviction); they are
    /// what it has persisted so far.
    pub fn loaded(updates: &[Vec<u8>], initialized: bool) -> World {
        let checked: Vec<CheckedUpdate> = updates
            .iter()
            .map(|u| CheckedUpdate::check(u.clone()).expect("a stored update passes the guard"))
            .collect();
        let doc = GuardedDoc::from_updates(&checked).expect("the stored updates load");
        let mut world = World::with(Scene::new(doc, initialized), &SessionLimits::default());
        world.persisted = updates.to_vec();
        world
    }

    pub fn with(scene: Scene, limits: &SessionLimits) -> World {
        World {
            session: Session::new(Arc::from(SESSION), scene, limits),
            start: Instant::now(),
            elapsed: Duration::ZERO,
            next_peer: 1,
            conns: BTreeMap::new(),
            persisted: Vec::new(),
            events: Vec::new(),
            presence: Vec::new(),
        }
    }

    /// The session's current time: a wall clock starting at 2026-11-25T19:22:01.000Z that
    /// moves with [`World::advance`].
    pub fn now(&self) -> Now {
        let wall = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_634_521_000);
        Now::at(self.start + self.elapsed, wall + self.elapsed)
    }

    /// The session's instant clock now.
    pub fn instant(&self) -> Instant {
        self.start + self.elapsed
    }

    /// Moves the clock (no input: the shell would only send a `Tick` at a deadline).
    pub fn advance(&mut self, by: Duration) {
        self.elapsed += by;
    }

    /// Feeds one input and delivers its output.
    pub fn step(&mut self, input: Input) -> Result<(), Refused> {
        let now = self.now();
        let mut out = Output::default();
        let result = self.session.handle(input, &now, &mut out);
        if result.is_err() {
            assert!(
                out.is_empty(),
                "a refused input changes nothing and sends nothing: {out:?}"
            );
        }
        self.deliver(out);
        result
    }

    fn deliver(&mut self, out: Output) {
        let Output {
            persist,
            sends,
            closes,
            events,
            presence,
        } = out;
        self.presence.extend(presence);
        let closed_now: Vec<PeerId> = closes.iter().map(|(peer, _)| *peer).collect();
        for (peer, payload) in sends {
            let conn = self
                .conns
                .get_mut(&peer)
                .unwrap_or_else(|| panic!("a message for unknown connection {peer}"));
            assert!(
                !conn.gone && !closed_now.contains(&peer),
                "a message for connection {peer} ({:?}) after it left or was closed",
                conn.user
            );
            let received = match payload.kind() {
                PayloadKind::Text => {
                    assert!(
                        conn.kind.speaks_json(),
                        "a text frame to a /yjs connection: {:?}",
                        payload.bytes()
                    );
                    Received::Json(
                        serde_json::from_slice(payload.bytes()).expect("a text frame is JSON"),
                    )
                }
                PayloadKind::Binary => {
                    assert!(
                        conn.kind.speaks_yjs(),
                        "a binary frame to a /ws connection: {:?}",
                        payload.bytes()
                    );
                    let message = Message::decode_v1(payload.bytes())
                        .expect("a binary frame is a y-websocket message");
                    if let Message::Sync(SyncMessage::Update(update)) = &message {
                        assert!(
                            persist.contains(update),
                            "a Yjs update was sent that the same step did not store"
                        );
                    }
                    Received::Yjs(message)
                }
            };
            conn.inbox.push_back((received, payload.backlog()));
        }
        for (peer, reason) in closes {
            let conn = self
                .conns
                .get_mut(&peer)
                .unwrap_or_else(|| panic!("a close for unknown connection {peer}"));
            assert!(!conn.gone, "connection {peer} closed twice");
            conn.closed = Some(reason);
            conn.gone = true;
        }
        self.persisted.extend(persist);
        self.events.extend(events);
    }

    // -----------------------------------------------------------------------------------------
    // Connections
    // -----------------------------------------------------------------------------------------

    /// A connection joins; returns its id. Panics if the session refuses it.
    pub fn join(&mut self, kind: ConnKind, user: Option<&str>) -> PeerId {
        self.try_join(kind, user)
            .expect("the session takes the join")
    }

    pub fn try_join(&mut self, kind: ConnKind, user: Option<&str>) -> Result<PeerId, Refused> {
        self.try_join_as(kind, user, Access::OPEN)
    }

    /// A connection joins with what its token granted.
    pub fn try_join_as(
        &mut self,
        kind: ConnKind,
        user: Option<&str>,
        access: Access,
    ) -> Result<PeerId, Refused> {
        let peer = self.next_peer;
        self.next_peer += 1;
        self.conns.insert(
            peer,
            Conn {
                kind,
                user: user.map(str::to_owned),
                inbox: VecDeque::new(),
                closed: None,
                gone: false,
            },
        );
        let input = Input::Join {
            peer,
            kind,
            user: user.map(Arc::from),
            access,
        };
        match self.step(input) {
            Ok(()) => Ok(peer),
            Err(e) => {
                self.conns.get_mut(&peer).unwrap().gone = true;
                Err(e)
            }
        }
    }

    /// A `/ws` connection of `user` joins; returns it with its ack, having checked that the
    /// `user:joined` naming itself came first and nothing came after the ack.
    pub fn legacy(&mut self, user: &str) -> (PeerId, Value) {
        let peer = self.join(ConnKind::Legacy, Some(user));
        let got = self.take_json(peer);
        assert_eq!(got.len(), 2, "user:joined, then the ack: {got:#?}");
        assert_eq!(got[0]["type"], "user:joined", "{got:#?}");
        assert_eq!(got[0]["user_id"], user, "{got:#?}");
        assert_eq!(got[1]["type"], "connection:ack", "{got:#?}");
        (peer, got[1].clone())
    }

    /// A desktop client one round trip after joining, as every real client is: on a session
    /// whose scene does not exist yet it uploads its empty canvas (as a host does), else it asks
    /// for the scene. Until then the session cannot know its canvas, and tells it of changes
    /// by `update_item` only (README "Choices"). Returns it with what that brought.
    pub fn settled(&mut self, user: &str) -> (PeerId, Vec<Value>) {
        if self.session.initialized() {
            return self.joiner(user);
        }
        let (peer, _) = self.legacy(user);
        self.send(peer, upload(&[], user));
        let got = self.take_json(peer);
        (peer, got)
    }

    /// A desktop client's "Connect to server": joins and, on the ack, sends `sync:request`.
    /// Returns it with what that brought (the full state and its placeholder fixes, once the
    /// scene is initialized).
    pub fn joiner(&mut self, user: &str) -> (PeerId, Vec<Value>) {
        let (peer, _) = self.legacy(user);
        self.send(peer, json!({"type": "sync:request", "user_id": user}));
        let got = self.take_json(peer);
        (peer, got)
    }

    /// A `/yjs` connection (`?user=` if named) joins; returns it with what it got first.
    pub fn yjs(&mut self, user: Option<&str>) -> (PeerId, Vec<Message>) {
        let peer = self.join(ConnKind::Yjs, user);
        let got = self.take_yjs(peer);
        (peer, got)
    }

    /// The connection ended (the shell tells the session whatever the reason).
    pub fn leave(&mut self, peer: PeerId) {
        self.step(Input::Leave { peer }).expect("a leave is taken");
        if let Some(conn) = self.conns.get_mut(&peer) {
            conn.gone = true;
        }
    }

    /// The shell drops a connection that fell behind.
    pub fn drop_conn(&mut self, peer: PeerId, reason: CloseReason) {
        self.step(Input::Drop { peer, reason })
            .expect("a drop is taken");
    }

    /// A deadline passed: the shell sends a `Tick`.
    pub fn tick(&mut self) {
        self.step(Input::Tick).expect("a tick is taken");
    }

    /// Moves the clock to the session's next deadline and ticks; panics if it has none.
    pub fn tick_at_deadline(&mut self) {
        let due = self
            .session
            .next_deadline()
            .expect("the session has a deadline");
        if due > self.instant() {
            self.elapsed = due - self.start;
        }
        self.tick();
    }

    // -----------------------------------------------------------------------------------------
    // Messages in
    // -----------------------------------------------------------------------------------------

    /// A JSON message from a connection, validated as the connection task does.
    pub fn send(&mut self, peer: PeerId, message: Value) {
        let message = parse_client_message(&message.to_string())
            .unwrap_or_else(|e| panic!("a valid client message: {e}: {message}"));
        self.step(Input::Json { peer, message })
            .expect("a JSON message is taken");
    }

    /// A y-websocket message from a connection, decoded and guarded as the connection task
    /// does.
    pub fn send_yjs(&mut self, peer: PeerId, message: Message) {
        self.send_frame(peer, &message.encode_v1());
    }

    /// A binary frame from a connection; panics if the connection task would refuse it.
    pub fn send_frame(&mut self, peer: PeerId, frame: &[u8]) {
        let message = yjs::decode(frame).unwrap_or_else(|e| panic!("a valid frame: {e}"));
        self.step(Input::Yjs { peer, message })
            .expect("a Yjs message is taken");
    }

    /// `POST /api/sessions/{s}/update`.
    pub fn api_update(&mut self, update: &[u8]) -> Result<(), Refused> {
        let update = CheckedUpdate::check(update.to_vec()).expect("the update passes the guard");
        self.step(Input::ApiUpdate(update))
    }

    // -----------------------------------------------------------------------------------------
    // Messages out
    // -----------------------------------------------------------------------------------------

    fn conn(&self, peer: PeerId) -> &Conn {
        self.conns
            .get(&peer)
            .unwrap_or_else(|| panic!("no connection {peer}"))
    }

    /// Everything a connection received since last asked.
    pub fn take(&mut self, peer: PeerId) -> Vec<Received> {
        self.conns
            .get_mut(&peer)
            .unwrap_or_else(|| panic!("no connection {peer}"))
            .inbox
            .drain(..)
            .map(|(received, _)| received)
            .collect()
    }

    /// The connection fell behind, as the shell sees it: what it has not read yet and a
    /// catch-up replaces is dropped (what it keeps stays unread), then the session is told.
    /// Returns what was dropped.
    pub fn fall_behind(&mut self, peer: PeerId) -> Vec<Received> {
        let conn = self
            .conns
            .get_mut(&peer)
            .unwrap_or_else(|| panic!("no connection {peer}"));
        let (kept, dropped): (VecDeque<_>, VecDeque<_>) = conn
            .inbox
            .drain(..)
            .partition(|(_, backlog)| *backlog == Backlog::Keep);
        conn.inbox = kept;
        self.step(Input::Behind { peer })
            .expect("a catch-up is never refused");
        dropped.into_iter().map(|(received, _)| received).collect()
    }

    /// The shell confirms that everything sent to `peer` so far reached its socket.
    pub fn confirm(&mut self, peer: PeerId) -> bool {
        self.session.delivered(peer)
    }

    /// The JSON messages a connection received since last asked; panics on a binary one.
    pub fn take_json(&mut self, peer: PeerId) -> Vec<Value> {
        self.take(peer)
            .into_iter()
            .map(|r| match r {
                Received::Json(v) => v,
                Received::Yjs(m) => panic!("connection {peer} got a binary message {m:?}"),
            })
            .collect()
    }

    /// The y-websocket messages a connection received since last asked; panics on JSON.
    pub fn take_yjs(&mut self, peer: PeerId) -> Vec<Message> {
        self.take(peer)
            .into_iter()
            .map(|r| match r {
                Received::Yjs(m) => m,
                Received::Json(v) => panic!("connection {peer} got a JSON message {v}"),
            })
            .collect()
    }

    /// What a JSON connection received since last asked, after sending `ping`: asserts the
    /// `pong` came last (it is a barrier) and returns what came before it.
    pub fn ping(&mut self, peer: PeerId) -> Vec<Value> {
        let before = self.take(peer);
        assert!(
            before.iter().all(|r| matches!(r, Received::Json(_))),
            "ping() is for /ws connections; use take() on ?yjs=1: {before:?}"
        );
        self.send(peer, json!({"type": "ping"}));
        let mut got = self.take_json(peer);
        let pong = got.pop().expect("a pong");
        assert_eq!(
            pong["type"], "pong",
            "the pong comes last: {got:#?} then {pong}"
        );
        assert_timestamp(&pong["timestamp"]);
        assert!(
            got.iter().all(|m| m["type"] != "pong"),
            "one pong per ping: {got:#?}"
        );
        before
            .into_iter()
            .map(|r| match r {
                Received::Json(v) => v,
                Received::Yjs(_) => unreachable!(),
            })
            .chain(got)
            .collect()
    }

    /// Whether, and why, the session closed a connection.
    pub fn closed(&self, peer: PeerId) -> Option<CloseReason> {
        self.conn(peer).closed
    }

    /// Asserts that no connection has anything unread.
    pub fn assert_quiet(&self) {
        for (peer, conn) in &self.conns {
            assert!(
                conn.inbox.is_empty(),
                "connection {peer} ({:?}) has unread messages: {:#?}",
                conn.user,
                conn.inbox
            );
        }
    }

    // -----------------------------------------------------------------------------------------
    // The document
    // -----------------------------------------------------------------------------------------

    /// The scene as `GET /api/sessions/{s}/scene` shows it.
    pub fn scene(&mut self) -> Value {
        let now = self.now();
        serde_json::from_str(&self.session.scene_json(&now)).expect("the scene is JSON")
    }

    /// The scene's items keyed by uuid, [`normalize`]d.
    pub fn items(&mut self) -> BTreeMap<String, Value> {
        scene_by_uuid(&self.scene())
    }

    /// The scene's version.
    pub fn version(&mut self) -> u64 {
        self.scene()["version"].as_u64().expect("a version")
    }

    /// The whole document as `GET /api/sessions/{s}/update` serves it, in a fresh yrs doc.
    pub fn doc(&mut self) -> Doc {
        doc_from(&self.session.encode_state().expect("the document encodes"))
    }

    /// What the store would hold: every persisted update, applied in order.
    pub fn stored_doc(&self) -> Doc {
        let doc = Doc::new();
        items(&doc);
        for update in &self.persisted {
            apply_update(&doc, update);
        }
        doc
    }
}

/// The `user_id`s of an ack's user list, in order.
pub fn names(ack: &Value) -> Vec<String> {
    ack["users"]
        .as_array()
        .unwrap_or_else(|| panic!("users is a list: {ack}"))
        .iter()
        .map(|u| u["user_id"].as_str().unwrap().to_owned())
        .collect()
}
