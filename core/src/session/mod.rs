//! One session as a state machine, with no I/O: the scene, the members and their roles, the
//! acks and user events, awareness, and who is sent what.
//!
//! The server's async shell feeds it one [`Input`] at a time with the current time
//! ([`Session::handle`]) and gets back an [`Output`]: the updates to store, then the messages
//! to send and the connections to close. The shell stores first and sends after (nothing is
//! sent before it is durable), and tells the session when a connection leaves or falls behind.
//! Everything the protocol promises about membership and ordering is decided here, so it is
//! tested here, by feeding inputs and reading outputs.

pub mod access;
pub mod awareness;
pub mod rate;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use bytes::Bytes;
use yrs::StateVector;

use crate::doc::scene::PeerMessage;
use crate::doc::{CheckedAwareness, CheckedUpdate, DocError, Effects, PeerId, Scene};
use crate::protocol::json::{
    self, ClientMessage, ErrorCode, ProtocolError, UserEntry, YjsAckFields,
};
use crate::protocol::yjs::{self, YjsMessage};
pub use access::{Access, Role};
pub use awareness::{Applied, AwarenessError, AwarenessStates, Owner, AWARENESS_TIMEOUT};
pub use rate::{Buckets, Cost, Rate, Rates};

/// User id written on changes that arrive through the HTTP API.
pub const API_USER: &str = "api";
/// User id written on changes from anonymous Yjs connections.
pub const YJS_USER: &str = "yjs";

/// How often awareness states are checked for expiry.
const AWARENESS_CHECK: Duration = Duration::from_secs(5);

/// A v1 state vector with no entries: what a client with an empty document sends.
const EMPTY_STATE_VECTOR: [u8; 1] = [0];

/// Which protocol a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnKind {
    /// Optiverse JSON on `/ws/{session}/{user}`.
    Legacy,
    /// `/ws/{session}/{user}?yjs=1`: JSON control messages, Yjs binary for the document.
    LegacyYjs,
    /// y-websocket on `/yjs/{session}`.
    Yjs,
}

impl ConnKind {
    /// Whether the connection gets JSON messages (ack, user events, errors).
    pub fn speaks_json(self) -> bool {
        self != ConnKind::Yjs
    }

    /// Whether the connection gets the document as Yjs updates.
    pub fn speaks_yjs(self) -> bool {
        self != ConnKind::Legacy
    }
}

/// Why a connection is closed (PROTOCOL §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseReason {
    pub code: u16,
    pub reason: &'static str,
}

pub const CLOSE_GOING_AWAY: CloseReason = CloseReason {
    code: 1001,
    reason: "Server shutting down",
};
pub const CLOSE_IDLE: CloseReason = CloseReason {
    code: 1001,
    reason: "Idle timeout",
};
pub const CLOSE_PROTOCOL_ERROR: CloseReason = CloseReason {
    code: 1002,
    reason: "Protocol error",
};
pub const CLOSE_INVALID_UTF8: CloseReason = CloseReason {
    code: 1007,
    reason: "Invalid UTF-8 in a text frame",
};
pub const CLOSE_INVALID_PATH: CloseReason = CloseReason {
    code: 1008,
    reason: "Invalid path",
};
pub const CLOSE_MESSAGE_TIMEOUT: CloseReason = CloseReason {
    code: 1008,
    reason: "Message not finished in time",
};
pub const CLOSE_TOO_BIG: CloseReason = CloseReason {
    code: 1009,
    reason: "Message too big",
};
pub const CLOSE_INTERNAL: CloseReason = CloseReason {
    code: 1011,
    reason: "Session unavailable",
};
pub const CLOSE_SLOW: CloseReason = CloseReason {
    code: 1013,
    reason: "Slow consumer, reconnect",
};
pub const CLOSE_RATE_LIMITED: CloseReason = CloseReason {
    code: 1013,
    reason: "Too many messages, reconnect",
};
/// No room for one more session in memory (`--max-sessions`).
pub const CLOSE_SERVER_FULL: CloseReason = CloseReason {
    code: 1013,
    reason: "Server full, try again later",
};
pub const CLOSE_REPLACED: CloseReason = CloseReason {
    code: 4000,
    reason: "Replaced by a newer connection",
};
/// The user name on the path is not the one the connection's token binds, or a connection
/// that holds the name is present (access control).
pub const CLOSE_NAME_NOT_YOURS: CloseReason = CloseReason {
    code: 1008,
    reason: "User name not allowed",
};
/// The connection's token expired (access control).
pub const CLOSE_TOKEN_EXPIRED: CloseReason = CloseReason {
    code: 4401,
    reason: "token expired",
};
/// The connection's token was revoked (access control).
pub const CLOSE_TOKEN_REVOKED: CloseReason = CloseReason {
    code: 4403,
    reason: "token revoked",
};

/// The time as a session sees it: an instant for its timers, and the wall-clock time that its
/// messages carry (formatted once, when a message first needs it: most steps send none).
#[derive(Debug, Clone)]
pub struct Now {
    pub instant: Instant,
    wall: SystemTime,
    timestamp: OnceLock<Arc<str>>,
}

impl Now {
    pub fn at(instant: Instant, wall: SystemTime) -> Now {
        Now {
            instant,
            wall,
            timestamp: OnceLock::new(),
        }
    }

    /// The wall-clock time as messages carry it ([`json::timestamp`]).
    pub fn timestamp(&self) -> &Arc<str> {
        self.timestamp
            .get_or_init(|| json::timestamp(self.wall).into())
    }

    /// The wall-clock time to the millisecond, as members keep their connection time.
    fn millis(&self) -> UnixMillis {
        UnixMillis::of(self.wall)
    }
}

/// A wall-clock time to the millisecond, as the protocol's timestamps have it: what a member
/// keeps of its connection time (a fifth of the bytes of the text, and no allocation).
#[derive(Debug, Clone, Copy)]
struct UnixMillis(u64);

impl UnixMillis {
    fn of(wall: SystemTime) -> UnixMillis {
        let since = wall
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        UnixMillis(u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
    }

    /// The same text as [`Now::timestamp`] of any time in this millisecond.
    fn timestamp(self) -> Arc<str> {
        let wall = SystemTime::UNIX_EPOCH + Duration::from_millis(self.0);
        json::timestamp(wall).into()
    }
}

/// Whether a payload is a text (JSON) or a binary (y-websocket) message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadKind {
    Text,
    Binary,
}

/// What a catch-up ([`Input::Behind`]) does with a message still queued for a Yjs member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backlog {
    /// Sent as queued: JSON messages, and the server's SyncStep1 (the client's answer to it
    /// carries the changes it made offline).
    Keep,
    /// A change (a document update, an awareness change): the catch-up carries its effect,
    /// and its bytes count towards falling behind.
    Change,
    /// A state (a SyncStep2, all awareness states): the catch-up holds at least as much.
    State,
}

/// One message, encoded once, however many members it goes to. The transport frames it once
/// too: [`Payload::framed`] keeps what the first framing made.
#[derive(Debug)]
pub struct Payload {
    kind: PayloadKind,
    backlog: Backlog,
    bytes: Bytes,
    framed: OnceLock<Bytes>,
}

impl Payload {
    pub fn text(text: String) -> Arc<Payload> {
        Payload::new(PayloadKind::Text, Backlog::Keep, Bytes::from(text))
    }

    pub fn binary(bytes: impl Into<Bytes>) -> Arc<Payload> {
        Payload::new(PayloadKind::Binary, Backlog::Keep, bytes.into())
    }

    /// A y-websocket change: replaced by a catch-up while it waits for a slow member.
    pub fn yjs_change(bytes: impl Into<Bytes>) -> Arc<Payload> {
        Payload::new(PayloadKind::Binary, Backlog::Change, bytes.into())
    }

    /// A y-websocket state: replaced by a catch-up while it waits for a slow member.
    pub fn yjs_state(bytes: impl Into<Bytes>) -> Arc<Payload> {
        Payload::new(PayloadKind::Binary, Backlog::State, bytes.into())
    }

    fn new(kind: PayloadKind, backlog: Backlog, bytes: Bytes) -> Arc<Payload> {
        Arc::new(Payload {
            kind,
            backlog,
            bytes,
            framed: OnceLock::new(),
        })
    }

    pub fn kind(&self) -> PayloadKind {
        self.kind
    }

    pub fn backlog(&self) -> Backlog {
        self.backlog
    }

    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// The payload as the transport sends it, made by `frame` the first time it is asked.
    pub fn framed(&self, frame: impl FnOnce(PayloadKind, &[u8]) -> Bytes) -> Bytes {
        self.framed
            .get_or_init(|| frame(self.kind, &self.bytes))
            .clone()
    }
}

/// Something the shell logs or counts.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A member's input was refused (a JSON speaker got an `error`); the session is unchanged.
    Rejected {
        peer: PeerId,
        user: Option<Arc<str>>,
        error: ProtocolError,
    },
    /// Blocks waiting for a gap in their client's clocks outgrew their bound and were let go
    /// (not lost for good: peers resend what the session lacks when they sync).
    HeldBlocksDropped { user: Arc<str> },
    /// A `view` member sent a Yjs update: dropped, neither applied nor stored.
    ViewUpdateDropped {
        peer: PeerId,
        user: Option<Arc<str>>,
    },
    /// Another node's awareness update broke this session's awareness rules: not applied.
    RemoteAwarenessRejected {
        node: u64,
        peer: PeerId,
        error: AwarenessError,
    },
}

/// A change of this node's presence in a session that the other nodes are told of
/// (`--cluster`, once [`Session::share_presence`] was called).
#[derive(Debug, Clone, PartialEq)]
pub enum PresenceChange {
    /// A connection joined; `user: None` for an anonymous Yjs connection (not listed, but
    /// its awareness states are its own).
    Joined {
        peer: PeerId,
        kind: ConnKind,
        user: Option<Arc<str>>,
        connected_at: Arc<str>,
        /// Its token binds the name ([`Access::holds_name`]).
        holds_name: bool,
    },
    /// A connection left (or was replaced or closed).
    Left { peer: PeerId },
    /// What a connection's awareness update changed, as this node applied it, and every
    /// state it holds now (`None`: none), for nodes that start following the session later.
    Awareness {
        peer: PeerId,
        update: Vec<u8>,
        states: Option<Vec<u8>>,
    },
}

/// What one step produced, in the order it must take effect: store `persist`, then send
/// `sends` (each member's in order), then close `closes` after what was sent to them.
#[derive(Debug, Default)]
pub struct Output {
    /// The document updates accepted, as v1 updates.
    pub persist: Vec<Vec<u8>>,
    pub sends: Vec<(PeerId, Arc<Payload>)>,
    pub closes: Vec<(PeerId, CloseReason)>,
    pub events: Vec<Event>,
    /// For the other nodes (`--cluster` only): empty unless [`Session::share_presence`].
    pub presence: Vec<PresenceChange>,
}

impl Output {
    pub fn is_empty(&self) -> bool {
        self.persist.is_empty()
            && self.sends.is_empty()
            && self.closes.is_empty()
            && self.events.is_empty()
            && self.presence.is_empty()
    }
}

/// What a session is fed.
#[derive(Debug)]
pub enum Input {
    /// A connection joins; `user: None` is an anonymous Yjs connection (not in the user list).
    Join {
        peer: PeerId,
        kind: ConnKind,
        user: Option<Arc<str>>,
        access: Access,
    },
    /// The connection ended.
    Leave { peer: PeerId },
    /// The shell ends the connection (it fell too far behind): the member leaves, closed with
    /// `reason`.
    Drop { peer: PeerId, reason: CloseReason },
    /// A Yjs member fell behind: the shell dropped the messages queued for it that a catch-up
    /// replaces ([`Backlog`]); it is sent one update against the state it is known to hold
    /// ([`Session::delivered`]) and the current awareness states. Any other member is closed
    /// 1013 (a desktop client may not be sent a full state: README, "Choices").
    Behind { peer: PeerId },
    /// A valid JSON message from a connection that speaks JSON.
    Json {
        peer: PeerId,
        message: ClientMessage,
    },
    /// A valid y-websocket message.
    Yjs { peer: PeerId, message: YjsMessage },
    /// `POST /api/sessions/{s}/update`.
    ApiUpdate(CheckedUpdate),
    /// A deadline ([`Session::next_deadline`]) passed.
    Tick,
    /// Another node's connection is in the session (`--cluster`): listed, and a JSON one
    /// replaces an older JSON connection of the same user here (PROTOCOL §3.5).
    RemoteJoined {
        node: u64,
        peer: PeerId,
        kind: ConnKind,
        user: Option<Arc<str>>,
        connected_at: Arc<str>,
        /// Its token binds the name: a connection here that holds it is replaced only by
        /// one that holds it too, and nobody here may take the name.
        holds_name: bool,
    },
    /// Another node's connection left; its awareness states are removed.
    RemoteLeft { node: u64, peer: PeerId },
    /// Another node's connection changed awareness states: applied under the same rules as
    /// a local connection's (it may change only the client ids it introduced; the bounds).
    RemoteAwareness {
        node: u64,
        peer: PeerId,
        update: CheckedAwareness,
    },
    /// Another node stopped without saying (its heartbeat expired): its connections leave.
    NodeGone { node: u64 },
}

/// Why a join or an HTTP update was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refused {
    /// The session could not produce what the connection needs (its document failed).
    #[error("the session is unavailable: {0}")]
    Unavailable(DocError),
    /// The update was refused; the document is unchanged.
    #[error(transparent)]
    BadUpdate(DocError),
    /// A member that holds the user name is present, and the joiner does not hold it.
    #[error("the user name is held by another connection")]
    NameHeld,
}

/// One line of `GET /api/sessions`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Summary {
    pub id: String,
    pub users: Vec<String>,
    pub connections: usize,
    pub item_count: usize,
    pub document_bytes: usize,
}

/// Bounds a session applies.
#[derive(Debug, Clone)]
pub struct SessionLimits {
    pub max_awareness_bytes: usize,
    pub max_awareness_states: usize,
    pub max_awareness_total_bytes: usize,
    /// What each connection may send (see [`Rates`]).
    pub rates: Rates,
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits {
            max_awareness_bytes: 64 * 1024,
            max_awareness_states: 1024,
            max_awareness_total_bytes: 1024 * 1024,
            rates: Rates {
                update: Rate {
                    per_second: 500.0,
                    burst: 1000.0,
                },
                request: Rate {
                    per_second: 2.0,
                    burst: 20.0,
                },
            },
        }
    }
}

/// Another node's connection, as this node knows it.
#[derive(Debug)]
struct RemoteMember {
    /// In this session's join order, counted when this node heard of it.
    joined: u64,
    user: Option<Arc<str>>,
    connected_at: Arc<str>,
    holds_name: bool,
}

/// Another node's join, as [`Input::RemoteJoined`] carries it.
struct RemoteJoin {
    kind: ConnKind,
    user: Option<Arc<str>>,
    connected_at: Arc<str>,
    holds_name: bool,
}

/// The session's presence on the other nodes (`--cluster`).
#[derive(Debug)]
struct Cluster {
    /// This node's id: breaks ties between two connections of one user that joined on two
    /// nodes in the same millisecond.
    node: u64,
    members: BTreeMap<(u64, PeerId), RemoteMember>,
}

#[derive(Debug)]
struct Member {
    /// Join order (ids are handed out before joins are queued, so they may arrive out of order).
    joined: u64,
    kind: ConnKind,
    user: Option<Arc<str>>,
    connected_at: UnixMillis,
    buckets: Buckets,
    access: Access,
    /// A Yjs member was sent the document (a SyncStep2 or a catch-up): once the shell confirms
    /// delivery, it holds the document as it was then.
    synced: bool,
    /// The document's state vector when the shell last confirmed that everything sent to this
    /// member reached its socket after it was synced: a lower bound of what it holds. Shared
    /// with the members confirmed at the same state ([`Session::shared_state_vector`]).
    holds: Option<Arc<StateVector>>,
    /// A `?yjs=1` member sent a JSON change: the document's blocks for it are not sent back to
    /// it, so the document's state is no lower bound of its own; it catches up from the whole
    /// document.
    changed_by_json: bool,
}

/// The whole document as one SyncStep2 message, kept until the document changes: a fresh
/// y-websocket joiner (an empty state vector) then costs a reference count.
#[derive(Debug)]
struct WholeState {
    message: Arc<Payload>,
    /// The document's rebuild count when it was encoded: a rebuild may change the state.
    rebuilds: u64,
}

/// One session.
pub struct Session {
    id: Arc<str>,
    scene: Scene,
    members: BTreeMap<PeerId, Member>,
    joins: u64,
    awareness: AwarenessStates,
    /// When awareness states are next checked for expiry (while there are any).
    awareness_check: Option<Instant>,
    whole_state: Option<WholeState>,
    /// The document's state vector and its rebuild count, kept until the document changes.
    state_vector: Option<(u64, Arc<StateVector>)>,
    rates: Rates,
    /// Set once the session shares its presence with other nodes (boxed: every session holds
    /// the room, few share).
    cluster: Option<Box<Cluster>>,
}

impl Session {
    pub fn new(id: Arc<str>, scene: Scene, limits: &SessionLimits) -> Session {
        Session {
            id,
            scene,
            members: BTreeMap::new(),
            joins: 0,
            awareness: AwarenessStates::new(
                limits.max_awareness_bytes,
                limits.max_awareness_states,
                limits.max_awareness_total_bytes,
            ),
            awareness_check: None,
            whole_state: None,
            state_vector: None,
            rates: limits.rates,
            cluster: None,
        }
    }

    /// From now on the session tells other nodes (as `node`) of its members' joins, leaves
    /// and awareness changes ([`Output::presence`]), and takes theirs as inputs.
    pub fn share_presence(&mut self, node: u64) {
        self.cluster.get_or_insert_with(|| {
            Box::new(Cluster {
                node,
                members: BTreeMap::new(),
            })
        });
    }

    /// Whether the session tells other nodes of its presence ([`Session::share_presence`]).
    pub fn shares_presence(&self) -> bool {
        self.cluster.is_some()
    }

    pub fn id(&self) -> &Arc<str> {
        &self.id
    }

    /// Whether no connection is a member.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    pub fn is_member(&self, peer: PeerId) -> bool {
        self.members.contains_key(&peer)
    }

    /// Bytes of the awareness states the session holds.
    pub fn awareness_bytes(&self) -> usize {
        self.awareness.total_bytes()
    }

    /// Whether any item or upload has reached the scene (persisted with the document).
    pub fn initialized(&self) -> bool {
        self.scene.initialized()
    }

    /// When the session next needs a [`Input::Tick`]: a correction due, or awareness expiry.
    pub fn next_deadline(&self) -> Option<Instant> {
        match (self.scene.next_correction_due(), self.awareness_check) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Handles one input. `Err` only for a join or an HTTP update that was refused (nothing
    /// else changed); every other outcome, errors to clients included, is in `out`.
    pub fn handle(&mut self, input: Input, now: &Now, out: &mut Output) -> Result<(), Refused> {
        match input {
            Input::Join {
                peer,
                kind,
                user,
                access,
            } => return self.join(peer, kind, user, access, now, out),
            Input::Leave { peer } => self.leave(peer, None, now, out),
            Input::Drop { peer, reason } => self.leave(peer, Some(reason), now, out),
            Input::Behind { peer } => self.catch_up(peer, now, out),
            Input::Json { peer, message } => self.json(peer, message, now, out),
            Input::Yjs { peer, message } => self.yjs(peer, message, now, out),
            Input::ApiUpdate(update) => {
                let user: Arc<str> = Arc::from(API_USER);
                let effects = self
                    .apply_update(&user, &update, out)
                    .map_err(Refused::BadUpdate)?;
                self.emit(effects, None, now, out);
            }
            Input::Tick => self.tick(now, out),
            Input::RemoteJoined {
                node,
                peer,
                kind,
                user,
                connected_at,
                holds_name,
            } => {
                let joined = RemoteJoin {
                    kind,
                    user,
                    connected_at,
                    holds_name,
                };
                self.remote_joined(node, peer, joined, now, out)
            }
            Input::RemoteLeft { node, peer } => self.remote_left(node, peer, now, out),
            Input::RemoteAwareness { node, peer, update } => {
                self.remote_awareness(node, peer, &update, now, out)
            }
            Input::NodeGone { node } => self.node_gone(node, now, out),
        }
        Ok(())
    }

    /// The scene as the `state` of `sync:full_state` (`GET /api/sessions/{s}/scene`).
    pub fn scene_json(&mut self, now: &Now) -> String {
        json::encode_scene(now.timestamp(), &self.scene.full_state())
    }

    /// The whole document as one v1 update.
    pub fn encode_state(&mut self) -> Result<Vec<u8>, DocError> {
        let doc = self.scene.doc_mut();
        // A failed encode rebuilds the document; the rebuilt one is tried once more.
        doc.encode_state_v1().or_else(|_| doc.encode_state_v1())
    }

    /// Bytes of blocks the document holds back until what they follow arrives (they are
    /// stored with the change that lets them in).
    pub fn held_bytes(&self) -> usize {
        self.scene.doc().held_bytes()
    }

    pub fn summary(&mut self) -> Summary {
        Summary {
            id: self.id.to_string(),
            users: self
                .users()
                .into_iter()
                .map(|u| u.user_id.to_string())
                .collect(),
            connections: self.members.len(),
            item_count: self.scene.item_count(),
            document_bytes: self.encode_state().map_or(0, |b| b.len()),
        }
    }

    /// The user list: each name once, in the order of its first connection (on any node).
    fn users(&self) -> Vec<UserEntry> {
        // Anonymous connections are never listed: their times are not formatted.
        let local = self.members.values().filter_map(|m| {
            let name = m.user.as_ref()?;
            Some((m.joined, name, m.connected_at.timestamp()))
        });
        let remote = self
            .cluster
            .iter()
            .flat_map(|c| c.members.values())
            .filter_map(|m| Some((m.joined, m.user.as_ref()?, m.connected_at.clone())));
        let mut members: Vec<_> = local.chain(remote).collect();
        if self.cluster.is_some() {
            // Nodes hear of each other's joins late: the time of each join orders them.
            members.sort_unstable_by(|a, b| (&a.2, a.0).cmp(&(&b.2, b.0)));
        } else {
            members.sort_unstable_by_key(|(joined, _, _)| *joined);
        }
        let mut users: Vec<UserEntry> = Vec::new();
        for (_, name, connected_at) in members {
            if !users.iter().any(|u| &u.user_id == name) {
                users.push(UserEntry {
                    user_id: name.clone(),
                    connected_at,
                });
            }
        }
        users
    }

    /// Whether a connection of this user is in the session, on this node or another.
    fn has_user(&self, name: &str) -> bool {
        self.members
            .values()
            .any(|m| m.user.as_deref() == Some(name))
            || self
                .cluster
                .as_ref()
                .is_some_and(|c| c.members.values().any(|m| m.user.as_deref() == Some(name)))
    }

    fn join(
        &mut self,
        peer: PeerId,
        kind: ConnKind,
        user: Option<Arc<str>>,
        access: Access,
        now: &Now,
        out: &mut Output,
    ) -> Result<(), Refused> {
        // Nobody takes, or replaces, a name a present member holds unless it holds it too.
        if let Some(name) = &user {
            let held = self
                .members
                .values()
                .any(|m| m.user.as_ref() == Some(name) && m.access.holds_name)
                || self.cluster.as_ref().is_some_and(|c| {
                    c.members
                        .values()
                        .any(|m| m.user.as_ref() == Some(name) && m.holds_name)
                });
            if held && !access.holds_name {
                return Err(Refused::NameHeld);
            }
        }
        let yjs_ack = if kind == ConnKind::LegacyYjs {
            let snapshot = self.encode_state().map_err(Refused::Unavailable)?;
            let b64 = base64::engine::general_purpose::STANDARD;
            Some(YjsAckFields {
                snapshot: b64.encode(snapshot),
                state_vector: b64.encode(self.scene.doc().state_vector_v1()),
            })
        } else {
            None
        };
        // A newer Optiverse connection replaces an older one of the same user (PROTOCOL
        // §3.5). Yjs connections are never replaced: a user may have several (browser tabs),
        // and y-websocket would reconnect after a close, replacing the other in turn.
        let replaced = user.as_ref().filter(|_| kind.speaks_json()).and_then(|u| {
            self.members
                .iter()
                .find(|(_, m)| m.kind.speaks_json() && m.user.as_ref() == Some(u))
                .map(|(id, _)| *id)
        });
        // The other nodes hear of the joiner before the leave of what it replaces, so they see
        // no leave and no join either.
        let joined_at = out.presence.len();
        if let Some(old) = replaced {
            self.remove_member(old, Some(CLOSE_REPLACED), out);
        }
        let already_present =
            replaced.is_some() || user.as_deref().is_some_and(|u| self.has_user(u));
        let is_host = kind.speaks_json()
            && user.is_some()
            && !self.scene.initialized()
            && !self.members.values().any(|m| m.user.is_some())
            && !self
                .cluster
                .as_ref()
                .is_some_and(|c| c.members.values().any(|m| m.user.is_some()));
        self.members.insert(
            peer,
            Member {
                joined: self.joins,
                kind,
                user: user.clone(),
                connected_at: now.millis(),
                buckets: Buckets::new(&self.rates, now.instant),
                access,
                synced: false,
                holds: None,
                changed_by_json: false,
            },
        );
        self.joins += 1;
        if self.cluster.is_some() {
            let joined = PresenceChange::Joined {
                peer,
                kind,
                user: user.clone(),
                connected_at: now.timestamp().clone(),
                holds_name: access.holds_name,
            };
            out.presence.insert(joined_at, joined);
        }
        if let (ConnKind::Legacy, Some(name)) = (kind, &user) {
            self.scene.add_peer(peer);
            // Before the ack: a desktop client acting as host answers `user:joined` by
            // uploading its canvas, so its upload reaches the session before the
            // `sync:request` it sends on the ack, and the session knows not to answer that
            // with a full state that would replace its canvas. A client acting as client only
            // logs it. No full state here: both clients ask for it (README, "Choices").
            let joined = json::encode_user_event(now.timestamp(), true, name);
            out.sends.push((peer, Payload::text(joined)));
        }
        if let (true, Some(name)) = (kind.speaks_json(), &user) {
            let ack = json::encode_ack(
                now.timestamp(),
                &self.id,
                name,
                is_host,
                &self.users(),
                yjs_ack.as_ref(),
            );
            out.sends.push((peer, Payload::text(ack)));
        }
        if kind.speaks_yjs() {
            let step1 = yjs::sync_step1(&self.scene.doc().state_vector_v1());
            out.sends.push((peer, Payload::binary(step1)));
            if let Some(states) = self.awareness.encode_all() {
                out.sends
                    .push((peer, Payload::yjs_state(yjs::awareness(&states))));
            }
        }
        if let (false, Some(name)) = (already_present, &user) {
            let joined = Payload::text(json::encode_user_event(now.timestamp(), true, name));
            self.send_to_json_members(&joined, Some(peer), out);
        }
        Ok(())
    }

    /// A member leaves (closed with `close` if given); the others hear `user:left` once its
    /// name has no connection left.
    fn leave(&mut self, peer: PeerId, close: Option<CloseReason>, now: &Now, out: &mut Output) {
        let user = self.remove_member(peer, close, out);
        if let Some(user) = user.filter(|u| !self.has_user(u)) {
            let left = Payload::text(json::encode_user_event(now.timestamp(), false, &user));
            self.send_to_json_members(&left, None, out);
        }
    }

    /// Every member as a join, for the other nodes that may have forgotten them
    /// (`--cluster`: this node's heartbeat had expired). Empty unless presence is shared.
    pub fn presence(&self) -> Vec<PresenceChange> {
        if self.cluster.is_none() {
            return Vec::new();
        }
        let mut members: Vec<(&PeerId, &Member)> = self.members.iter().collect();
        members.sort_unstable_by_key(|(_, m)| m.joined);
        members
            .into_iter()
            .map(|(peer, m)| PresenceChange::Joined {
                peer: *peer,
                kind: m.kind,
                user: m.user.clone(),
                connected_at: m.connected_at.timestamp(),
                holds_name: m.access.holds_name,
            })
            .collect()
    }

    /// Another node's connection joined. The others here hear `user:joined` when its name is
    /// new to the session. A JSON connection replaces this node's JSON connection of the same
    /// user when it is the newer one (connection time, then node id), and holds the name if
    /// that one does: both nodes decide alike, so exactly the older one is closed 4000.
    fn remote_joined(
        &mut self,
        node: u64,
        peer: PeerId,
        join: RemoteJoin,
        now: &Now,
        out: &mut Output,
    ) {
        let Some(own_node) = self.cluster.as_ref().map(|c| c.node) else {
            return;
        };
        if node == own_node {
            return;
        }
        let RemoteJoin {
            kind,
            user,
            connected_at,
            holds_name,
        } = join;
        let already_present = user.as_deref().is_some_and(|u| self.has_user(u));
        if let (true, Some(name)) = (kind.speaks_json(), &user) {
            let replaced: Vec<PeerId> = self
                .members
                .iter()
                .filter(|(_, m)| {
                    m.kind.speaks_json()
                        && m.user.as_ref() == Some(name)
                        && (holds_name || !m.access.holds_name)
                        && (&m.connected_at.timestamp(), own_node) < (&connected_at, node)
                })
                .map(|(id, _)| *id)
                .collect();
            for old in replaced {
                self.remove_member(old, Some(CLOSE_REPLACED), out);
            }
        }
        let joined = self.joins;
        self.joins += 1;
        if let Some(cluster) = &mut self.cluster {
            cluster.members.insert(
                (node, peer),
                RemoteMember {
                    joined,
                    user: user.clone(),
                    connected_at,
                    holds_name,
                },
            );
        }
        if let (false, Some(name)) = (already_present, &user) {
            let joined = Payload::text(json::encode_user_event(now.timestamp(), true, name));
            self.send_to_json_members(&joined, None, out);
        }
    }

    /// Another node's connection left: its awareness states go, and the others here hear
    /// `user:left` once its name has no connection left on any node.
    fn remote_left(&mut self, node: u64, peer: PeerId, now: &Now, out: &mut Output) {
        let Some(cluster) = &mut self.cluster else {
            return;
        };
        let gone = cluster.members.remove(&(node, peer));
        if let Some(removal) = self.awareness.remove_owner(Owner::Remote { node, peer }) {
            self.broadcast_awareness(&removal, out);
        }
        if self.awareness.is_empty() {
            self.awareness_check = None;
        }
        if let Some(user) = gone.and_then(|m| m.user).filter(|u| !self.has_user(u)) {
            let left = Payload::text(json::encode_user_event(now.timestamp(), false, &user));
            self.send_to_json_members(&left, None, out);
        }
    }

    /// A node stopped without its connections leaving: they leave here.
    fn node_gone(&mut self, node: u64, now: &Now, out: &mut Output) {
        let Some(cluster) = &self.cluster else {
            return;
        };
        let peers: Vec<PeerId> = cluster
            .members
            .keys()
            .filter(|(n, _)| *n == node)
            .map(|(_, peer)| *peer)
            .collect();
        for peer in peers {
            self.remote_left(node, peer, now, out);
        }
        // States of connections this node never heard join (they joined before it followed).
        if let Some(removal) = self.awareness.remove_node(node) {
            self.broadcast_awareness(&removal, out);
        }
        if self.awareness.is_empty() {
            self.awareness_check = None;
        }
    }

    /// Another node's awareness change: applied and sent to this node's Yjs members, under
    /// the rules a local connection's change meets (Redis holds what any node wrote).
    fn remote_awareness(
        &mut self,
        node: u64,
        peer: PeerId,
        update: &CheckedAwareness,
        now: &Now,
        out: &mut Output,
    ) {
        if self.cluster.as_ref().is_none_or(|c| c.node == node) {
            return;
        }
        match self
            .awareness
            .apply(Owner::Remote { node, peer }, update, now.instant)
        {
            Ok(applied) => self.awareness_applied(applied, None, now, out),
            Err(error) => out
                .events
                .push(Event::RemoteAwarenessRejected { node, peer, error }),
        }
    }

    /// Removes a member (closing it with `close` if given); returns its user name.
    fn remove_member(
        &mut self,
        peer: PeerId,
        close: Option<CloseReason>,
        out: &mut Output,
    ) -> Option<Arc<str>> {
        let member = self.members.remove(&peer)?;
        if let Some(reason) = close {
            out.closes.push((peer, reason));
        }
        if self.cluster.is_some() {
            out.presence.push(PresenceChange::Left { peer });
        }
        self.scene.remove_peer(peer);
        if let Some(removal) = self.awareness.remove_owner(peer) {
            self.broadcast_awareness(&removal, out);
        }
        if self.awareness.is_empty() {
            self.awareness_check = None;
        }
        member.user
    }

    fn user_of(&self, peer: PeerId) -> Arc<str> {
        self.members
            .get(&peer)
            .and_then(|m| m.user.clone())
            .unwrap_or_else(|| Arc::from(YJS_USER))
    }

    /// Takes what `cost` asks from the member's buckets; `false` (and the client told) when
    /// it is over its rate. A JSON message is answered `rate_limited` and not applied (the
    /// next whole-dict command on the item carries the change again). A Yjs message closes
    /// the connection 1013 (`close_when_over`): a provider that reconnects syncs what it has,
    /// where a dropped update would be lost to everyone else.
    fn admit(
        &mut self,
        peer: PeerId,
        cost: Cost,
        close_when_over: bool,
        now: &Now,
        out: &mut Output,
    ) -> bool {
        let Some(member) = self.members.get_mut(&peer) else {
            return false;
        };
        if member.buckets.take(cost, &self.rates, now.instant) {
            return true;
        }
        let (what, rate) = match cost {
            Cost::Request => ("state requests", self.rates.request),
            Cost::Update | Cost::Free => ("changes", self.rates.update),
        };
        let message = format!(
            "more than {} {what} per second (bursts of {})",
            rate.per_second, rate.burst
        );
        self.reject(peer, ErrorCode::RateLimited, message, out);
        if close_when_over {
            self.leave(peer, Some(CLOSE_RATE_LIMITED), now, out);
        }
        false
    }

    fn json(&mut self, peer: PeerId, message: ClientMessage, now: &Now, out: &mut Output) {
        let cost = match message {
            ClientMessage::Ping => Cost::Free,
            ClientMessage::SyncRequest => Cost::Request,
            ClientMessage::Command(_) | ClientMessage::FullState(_) => Cost::Update,
        };
        if !self.admit(peer, cost, false, now, out) {
            return;
        }
        if cost == Cost::Update && !self.may_edit(peer) {
            let message = "a view token cannot change the scene";
            self.reject(peer, ErrorCode::Forbidden, message.to_owned(), out);
            return;
        }
        let user = self.user_of(peer);
        if matches!(
            message,
            ClientMessage::Command(_) | ClientMessage::FullState(_)
        ) {
            if let Some(member) = self.members.get_mut(&peer) {
                if member.kind.speaks_yjs() {
                    member.changed_by_json = true;
                    member.holds = None;
                }
            }
        }
        match message {
            // The pong is a barrier: everything the connection sent before was applied, and
            // the corrections owed to it go out before it.
            ClientMessage::Ping => {
                let effects = self.scene.send_corrections_owed_to(peer);
                self.emit(effects, None, now, out);
                out.sends
                    .push((peer, Payload::text(json::encode_pong(now.timestamp()))));
            }
            // Only plain legacy connections take full states (PROTOCOL §4).
            ClientMessage::SyncRequest => {
                let effects = self.scene.request_sync(peer, &user);
                self.emit(effects, Some(peer), now, out);
            }
            ClientMessage::Command(command) => {
                match self.scene.apply_command(peer, &user, command, now.instant) {
                    Ok(effects) => self.emit(effects, Some(peer), now, out),
                    Err(e) => self.reject(peer, ErrorCode::BadMessage, e.to_string(), out),
                }
            }
            ClientMessage::FullState(items) => {
                match self.scene.apply_upload(peer, &user, items, now.instant) {
                    Ok(effects) => self.emit(effects, Some(peer), now, out),
                    Err(e) => self.reject(peer, ErrorCode::BadMessage, e.to_string(), out),
                }
            }
        }
    }

    fn yjs(&mut self, peer: PeerId, message: YjsMessage, now: &Now, out: &mut Output) {
        let cost = match message {
            YjsMessage::SyncStep1(_) | YjsMessage::QueryAwareness => Cost::Request,
            YjsMessage::SyncStep2(_) | YjsMessage::Update(_) | YjsMessage::Awareness(_) => {
                Cost::Update
            }
            YjsMessage::Auth => Cost::Free,
        };
        if !self.admit(peer, cost, true, now, out) {
            return;
        }
        match message {
            YjsMessage::SyncStep1(sv) if sv.bytes() == EMPTY_STATE_VECTOR => {
                self.send_whole_state(peer, out);
            }
            YjsMessage::SyncStep1(sv) => match self.scene.doc_mut().encode_diff_v1(&sv) {
                Ok(diff) => {
                    out.sends
                        .push((peer, Payload::yjs_state(yjs::sync_step2(&diff))));
                    self.mark_synced(peer);
                }
                Err(e) => self.reject(peer, ErrorCode::BadMessage, e.to_string(), out),
            },
            YjsMessage::SyncStep2(_) | YjsMessage::Update(_) if !self.may_edit(peer) => {
                self.drop_view_update(peer, out)
            }
            YjsMessage::SyncStep2(update) | YjsMessage::Update(update) => {
                let user = self.user_of(peer);
                match self.apply_update(&user, &update, out) {
                    Ok(effects) => self.emit(effects, Some(peer), now, out),
                    Err(e) => self.reject(peer, ErrorCode::BadMessage, e.to_string(), out),
                }
            }
            YjsMessage::Awareness(update) => {
                match self.awareness.apply(peer, &update, now.instant) {
                    Ok(applied) => self.awareness_applied(applied, Some(peer), now, out),
                    Err(e) => self.reject(peer, ErrorCode::BadMessage, e.to_string(), out),
                }
            }
            YjsMessage::QueryAwareness => {
                if let Some(states) = self.awareness.encode_all() {
                    out.sends
                        .push((peer, Payload::yjs_state(yjs::awareness(&states))));
                }
            }
            YjsMessage::Auth => {}
        }
    }

    /// Sends what an awareness update changed to the Yjs members. The other nodes are told
    /// of the changes of this node's connections: `from`'s update, and the states of this
    /// node's connections removed to make room for it (another node's, removed here only, are
    /// its node's to keep or expire).
    fn awareness_applied(
        &mut self,
        applied: Applied,
        from: Option<PeerId>,
        now: &Now,
        out: &mut Output,
    ) {
        let Some(changed) = applied.changed else {
            return;
        };
        self.awareness_check
            .get_or_insert(now.instant + AWARENESS_CHECK);
        self.broadcast_awareness(&changed, out);
        if self.cluster.is_none() {
            return;
        }
        let evicted = applied
            .evicted
            .into_iter()
            .filter_map(|(owner, removal)| match owner {
                Owner::Local(peer) => Some((peer, removal)),
                Owner::Remote { .. } => None,
            });
        let own = from.map(|peer| (peer, changed));
        for (peer, update) in evicted.chain(own) {
            out.presence.push(PresenceChange::Awareness {
                peer,
                update,
                states: self.awareness.encode_owner(peer),
            });
        }
    }

    fn may_edit(&self, peer: PeerId) -> bool {
        self.members
            .get(&peer)
            .is_some_and(|m| m.access.role.may_edit())
    }

    /// A `view` member's Yjs update: not applied, not stored, reported (and a JSON speaker
    /// told). The connection stays: its provider sends its state on every sync.
    fn drop_view_update(&mut self, peer: PeerId, out: &mut Output) {
        let Some(member) = self.members.get(&peer) else {
            return;
        };
        if member.kind.speaks_json() {
            let error = ProtocolError::new(
                ErrorCode::Forbidden,
                "a view token cannot change the scene; the update was dropped",
            );
            out.sends
                .push((peer, Payload::text(json::encode_error(&error))));
        }
        out.events.push(Event::ViewUpdateDropped {
            peer,
            user: member.user.clone(),
        });
    }

    /// The corrections due and the awareness states expired by now.
    fn tick(&mut self, now: &Now, out: &mut Output) {
        let effects = self.scene.send_due_corrections(now.instant);
        self.emit(effects, None, now, out);
        if self.awareness_check.is_some_and(|at| at <= now.instant) {
            if self.cluster.is_some() {
                // One removal per connection: the other nodes apply each under its owner,
                // and hold the connection's remaining states.
                for (owner, removal) in self.awareness.expire_by_owner(now.instant) {
                    self.broadcast_awareness(&removal, out);
                    if let Owner::Local(peer) = owner {
                        out.presence.push(PresenceChange::Awareness {
                            peer,
                            update: removal,
                            states: self.awareness.encode_owner(peer),
                        });
                    }
                }
            } else if let Some(removal) = self.awareness.expire(now.instant) {
                self.broadcast_awareness(&removal, out);
            }
            self.awareness_check =
                (!self.awareness.is_empty()).then(|| now.instant + AWARENESS_CHECK);
        }
    }

    /// Applies a Yjs update (from a client or the HTTP API) to the scene, and reports held
    /// blocks that outgrew their bound.
    fn apply_update(
        &mut self,
        user: &Arc<str>,
        update: &CheckedUpdate,
        out: &mut Output,
    ) -> Result<Effects, DocError> {
        let dropped = self.scene.doc().dropped_held();
        let result = self.scene.apply_update(user, update);
        if self.scene.doc().dropped_held() != dropped {
            out.events
                .push(Event::HeldBlocksDropped { user: user.clone() });
        }
        result
    }

    /// Answers a SyncStep1 from an empty document with the whole document, encoded once and
    /// kept until it changes. `false` (the client told) when it could not be encoded.
    fn send_whole_state(&mut self, peer: PeerId, out: &mut Output) -> bool {
        let rebuilds = self.scene.doc().rebuilds();
        if self
            .whole_state
            .as_ref()
            .is_none_or(|c| c.rebuilds != rebuilds)
        {
            match self.encode_state() {
                Ok(whole) => {
                    self.whole_state = Some(WholeState {
                        message: Payload::yjs_state(yjs::sync_step2(&whole)),
                        rebuilds,
                    })
                }
                Err(e) => {
                    self.reject(peer, ErrorCode::Unavailable, e.to_string(), out);
                    return false;
                }
            }
        }
        let Some(whole) = &self.whole_state else {
            return false;
        };
        out.sends.push((peer, whole.message.clone()));
        self.mark_synced(peer);
        true
    }

    fn mark_synced(&mut self, peer: PeerId) {
        if let Some(member) = self.members.get_mut(&peer) {
            member.synced = true;
        }
    }

    /// The shell says everything sent to `peer` so far reached its socket. Returns whether
    /// that is all the session needed to know: `false` while a Yjs member has not been sent
    /// the document yet (a later confirmation is then useful).
    pub fn delivered(&mut self, peer: PeerId) -> bool {
        let Some(member) = self.members.get(&peer) else {
            return true;
        };
        if !member.kind.speaks_yjs() {
            return true;
        }
        if !member.synced {
            return false;
        }
        if member.changed_by_json {
            return true;
        }
        let holds = self.shared_state_vector();
        if let Some(member) = self.members.get_mut(&peer) {
            member.holds = Some(holds);
        }
        true
    }

    /// The document's state vector, computed once per change of the document: every idle
    /// member confirmed since holds the same one.
    fn shared_state_vector(&mut self) -> Arc<StateVector> {
        let rebuilds = self.scene.doc().rebuilds();
        if let Some((at, sv)) = &self.state_vector {
            if *at == rebuilds {
                return sv.clone();
            }
        }
        let sv = Arc::new(self.scene.doc().state_vector());
        self.state_vector = Some((rebuilds, sv.clone()));
        sv
    }

    /// One update that brings a Yjs member that fell behind from what it is known to hold to
    /// the document, then the awareness states as they are. Awareness removals that were
    /// dropped are not repeated: the client expires a state it no longer hears of
    /// (y-protocols' 30 s timeout).
    fn catch_up(&mut self, peer: PeerId, now: &Now, out: &mut Output) {
        let Some(member) = self.members.get(&peer) else {
            return;
        };
        if !member.kind.speaks_yjs() {
            self.leave(peer, Some(CLOSE_SLOW), now, out);
            return;
        }
        let sent = match member.holds.clone() {
            // Nothing confirmed: the whole document, encoded once for every such member.
            None => self.send_whole_state(peer, out),
            Some(holds) => match self.scene.doc_mut().encode_since(&holds) {
                Ok(diff) => {
                    out.sends
                        .push((peer, Payload::yjs_state(yjs::sync_step2(&diff))));
                    self.mark_synced(peer);
                    true
                }
                Err(_) => false,
            },
        };
        if !sent {
            // The document could not be encoded: the client resyncs when it reconnects.
            self.leave(peer, Some(CLOSE_SLOW), now, out);
            return;
        }
        if let Some(states) = self.awareness.encode_all() {
            out.sends
                .push((peer, Payload::yjs_state(yjs::awareness(&states))));
        }
    }

    /// Refused input: an `error` to a JSON-speaking member, an event for the log.
    fn reject(&mut self, peer: PeerId, code: ErrorCode, message: String, out: &mut Output) {
        let Some(member) = self.members.get(&peer) else {
            return;
        };
        let error = ProtocolError::new(code, message);
        if member.kind.speaks_json() {
            out.sends
                .push((peer, Payload::text(json::encode_error(&error))));
        }
        out.events.push(Event::Rejected {
            peer,
            user: member.user.clone(),
            error,
        });
    }

    /// Queues the effects of one change: the update to store and to send to Yjs speakers
    /// (all but `origin`), and the legacy messages (each encoded once).
    fn emit(&mut self, effects: Effects, origin: Option<PeerId>, now: &Now, out: &mut Output) {
        if let Some(update) = effects.update {
            let message = Payload::yjs_change(yjs::sync_update(&update));
            out.persist.push(update);
            self.whole_state = None;
            self.state_vector = None;
            for (id, member) in &self.members {
                if member.kind.speaks_yjs() && Some(*id) != origin {
                    out.sends.push((*id, message.clone()));
                }
            }
        }
        let mut encoded: HashMap<*const PeerMessage, Arc<Payload>> = HashMap::new();
        for outgoing in effects.messages {
            let message = encoded
                .entry(Arc::as_ptr(&outgoing.message))
                .or_insert_with(|| {
                    Payload::text(match &*outgoing.message {
                        PeerMessage::Command(command) => {
                            json::encode_command(now.timestamp(), command)
                        }
                        PeerMessage::FullState(state) => {
                            json::encode_full_state(now.timestamp(), state)
                        }
                    })
                })
                .clone();
            out.sends.push((outgoing.to, message));
        }
    }

    fn broadcast_awareness(&self, update: &[u8], out: &mut Output) {
        let message = Payload::yjs_change(yjs::awareness(update));
        for (id, member) in &self.members {
            if member.kind.speaks_yjs() {
                out.sends.push((*id, message.clone()));
            }
        }
    }

    fn send_to_json_members(
        &self,
        message: &Arc<Payload>,
        except: Option<PeerId>,
        out: &mut Output,
    ) {
        for (id, member) in &self.members {
            if member.kind.speaks_json() && Some(*id) != except {
                out.sends.push((*id, message.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_connection_time_reads_as_the_timestamp_of_its_step() {
        // Just under a millisecond boundary, where rounding instead of truncating would differ.
        let walls = [
            Duration::from_nanos(1_795_634_521_123_999_999),
            Duration::from_millis(1_795_634_521_000),
            Duration::from_nanos(999_999),
        ];
        for since_epoch in walls {
            let now = Now::at(Instant::now(), SystemTime::UNIX_EPOCH + since_epoch);
            assert_eq!(now.millis().timestamp(), *now.timestamp());
        }
        let late = Now::at(Instant::now(), SystemTime::UNIX_EPOCH + walls[0]);
        assert_eq!(&**late.timestamp(), "2026-11-25T19:22:01.123Z");
    }
}
