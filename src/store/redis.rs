//! `--cluster redis://…`: several server nodes share their sessions through Redis.
//!
//! Each session is a Redis stream, the shared log: a node appends what its session task
//! accepted (before delivering it, as with every store), and every node holding the session
//! follows the stream for what the *other* nodes appended ([`Store::follow`]), which its task
//! applies like an HTTP update. A compaction appends a snapshot entry to the stream, saying up
//! to which entry it covers the document, and trims the entries it covers; loading is the
//! stream read whole (snapshots first). Keys (the session id in braces, a hash tag):
//!
//! - `collab:{s}:updates`: the stream. An update entry is `n` (the node that appended it) and
//!   `u` (a v1 update); a snapshot entry is `n`, `s` (the whole document, v1) and `c` (the
//!   position of the last entry it covers).
//! - `collab:{s}:meta`: a hash, `initialized` (`0`/`1`) and `changed` (milliseconds since the
//!   epoch of the last appended update, for the dashboard and `--retain-days`).
//! - `collab:{s}:lease`: the compaction lease (`SET NX PX`): one node compacts at a time.
//! - `collab:sessions`: the set of stored session ids.
//! - `collab:nodes`: a counter that gives each node its id at start.
//! - `collab:node:{n}:wake`: a one-entry stream a node writes to wake its own feed, which is
//!   blocked reading the streams it follows, when it follows one more or a session it had
//!   stopped reading (its channel was full) has room again.
//! - `collab:{s}:present`: a hash of the session's connections on every node, `{node}:{peer}`
//!   to the join (JSON: `k` the connection kind, `u` the user or `null`, `t` when it joined,
//!   `h` whether its token binds the name): what a node that starts following the session
//!   lists.
//! - `collab:{s}:awareness`: a hash, `{node}:{peer}` to the awareness states that connection
//!   holds (one y-protocols update): what a node that starts following the session shows.
//! - `collab:{s}:presence`: a stream of presence changes (capped): a join `n`, `p`, `j` (as
//!   in the hash), a leave `n`, `p`, `l`, an awareness change `n`, `p`, `a` (the y-protocols
//!   update as applied). Never loaded as document content.
//! - `collab:node:{n}:alive`: set with an expiry ([`NODE_TIMEOUT`]) and renewed by node `n`
//!   while it runs; a node whose key expired is gone, and its connections leave on the others.
//!
//! A stream entry id `ms-seq` is a position `ms << 20 | seq` (Redis gives at most one entry
//! id per sequence number; a million within one millisecond is refused as out of range).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use collab_core::doc::{CheckedAwareness, PeerId};
use collab_core::protocol::json::timestamp;
use collab_core::session::{ConnKind, Input, PresenceChange};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::{StreamId, StreamRangeReply, StreamReadReply};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{
    Following, Remote, RemoteBatch, SessionMeta, Store, StoreError, StoreFuture, StoredSession,
    StoredSummary,
};
use crate::warn_limit::WarnLimiter;

/// Bits of a position that hold the entry id's sequence number.
const SEQ_BITS: u32 = 20;
/// How long a node's feed blocks in one read before it reads again (a bound, so that a
/// connection lost silently is noticed).
const FEED_BLOCK: Duration = Duration::from_secs(5);
/// Most entries the feed reads per stream at once.
const FEED_COUNT: usize = 512;
/// Remote batches waiting for a session task.
const FEED_QUEUE: usize = 16;
/// How long a compaction lease holds: at most one compaction per session and lease time.
const LEASE: Duration = Duration::from_secs(10);
/// A command's answer: appends wait for Redis' own `fsync` (`appendfsync always`).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a node's alive key lasts unless renewed (renewed five times as often): a node
/// that stops has its connections leave on the other nodes within this and one renewal
/// (`--cluster-node-timeout`).
pub const NODE_TIMEOUT: Duration = Duration::from_secs(5);
/// The shortest alive key: renewals (every fifth of it) stay at ten a second at most.
const MIN_NODE_TIMEOUT: Duration = Duration::from_millis(500);
/// Presence changes a session's presence stream keeps (about): a follower further behind
/// misses some.
const PRESENCE_KEPT: usize = 1000;
/// Longest join description read from Redis.
const MAX_JOIN_BYTES: usize = 64 * 1024;

const SESSIONS: &str = "collab:sessions";

fn present_key(session: &str) -> String {
    format!("collab:{{{session}}}:present")
}

fn awareness_key(session: &str) -> String {
    format!("collab:{{{session}}}:awareness")
}

fn presence_key(session: &str) -> String {
    format!("collab:{{{session}}}:presence")
}

fn alive_key(node: u64) -> String {
    format!("collab:node:{node}:alive")
}

fn stream_key(session: &str) -> String {
    format!("collab:{{{session}}}:updates")
}

fn meta_key(session: &str) -> String {
    format!("collab:{{{session}}}:meta")
}

fn lease_key(session: &str) -> String {
    format!("collab:{{{session}}}:lease")
}

fn wake_key(node: u64) -> String {
    format!("collab:node:{node}:wake")
}

/// `ms-seq` as a position.
fn position(id: &str) -> Result<u64, StoreError> {
    let bad = || StoreError::Cluster(format!("unexpected stream entry id {id:?}"));
    let (ms, seq) = id.split_once('-').ok_or_else(bad)?;
    let ms: u64 = ms.parse().map_err(|_| bad())?;
    let seq: u64 = seq.parse().map_err(|_| bad())?;
    if seq >= 1 << SEQ_BITS || ms >= 1 << (64 - SEQ_BITS) {
        return Err(bad());
    }
    Ok(ms << SEQ_BITS | seq)
}

/// A position as the stream entry id it stands for.
fn entry_id(position: u64) -> String {
    format!(
        "{}-{}",
        position >> SEQ_BITS,
        position & ((1 << SEQ_BITS) - 1)
    )
}

/// The smallest entry id after `position` (for `XTRIM MINID`).
fn id_after(position: u64) -> String {
    format!(
        "{}-{}",
        position >> SEQ_BITS,
        (position & ((1 << SEQ_BITS) - 1)) + 1
    )
}

fn redis_error(e: redis::RedisError) -> StoreError {
    StoreError::Cluster(e.to_string())
}

/// Sends `pipe`, and once more when the connection was lost: the manager reconnects (Redis
/// restarted), and the second try waits for it. An append sent twice (its answer lost)
/// stores its updates twice, which changes no document (Yjs updates are idempotent).
async fn query<T: redis::FromRedisValue>(
    conn: &mut ConnectionManager,
    pipe: &redis::Pipeline,
) -> Result<T, StoreError> {
    match pipe.query_async(conn).await {
        Err(e) if e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error() => {
            debug!(error = %e, "Redis connection lost; trying once more");
            pipe.query_async(conn).await.map_err(redis_error)
        }
        other => other.map_err(redis_error),
    }
}

fn millis(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// One stream entry, read.
enum Entry {
    Update { node: u64, update: Vec<u8> },
    Snapshot { covers: u64, snapshot: Vec<u8> },
}

fn entry(id: &StreamId) -> Result<Entry, StoreError> {
    let bad = || StoreError::Unreadable(format!("stream entry {} has no update", id.id));
    if let Some(snapshot) = id.get::<Vec<u8>>("s") {
        let covers = id.get::<u64>("c").ok_or_else(bad)?;
        return Ok(Entry::Snapshot { covers, snapshot });
    }
    Ok(Entry::Update {
        node: id.get::<u64>("n").ok_or_else(bad)?,
        update: id.get::<Vec<u8>>("u").ok_or_else(bad)?,
    })
}

/// A session this node follows: where its task's feed goes, and how far it has read.
struct Follower {
    /// Tells this follower from a later one of the same session.
    token: u64,
    session: String,
    after: u64,
    /// Position of the last presence entry read.
    presence_after: u64,
    tx: mpsc::Sender<Remote>,
    /// Its channel was full: its streams are left out of the feed's reads until it has room
    /// again, then read on from `after` and `presence_after`.
    stalled: bool,
}

#[derive(Default)]
struct Followers {
    next_token: u64,
    /// By stream key.
    by_key: HashMap<String, Follower>,
    /// Presence stream key to stream key.
    by_presence_key: HashMap<String, String>,
    /// Other nodes whose connections this node heard of: their alive keys are watched (an
    /// entry a gone node wrote before it went, read late, brings it back here until the
    /// next check finds it gone again).
    nodes_seen: HashSet<u64>,
}

struct Shared {
    node: u64,
    node_timeout: Duration,
    followers: Mutex<Followers>,
}

impl Shared {
    fn followers(&self) -> std::sync::MutexGuard<'_, Followers> {
        self.followers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Stops following a session when its task lets go of it.
struct Unfollow {
    shared: Arc<Shared>,
    key: String,
    token: u64,
}

impl Drop for Unfollow {
    fn drop(&mut self) {
        let mut followers = self.shared.followers();
        if followers
            .by_key
            .get(&self.key)
            .is_some_and(|f| f.token == self.token)
        {
            if let Some(f) = followers.by_key.remove(&self.key) {
                followers.by_presence_key.remove(&presence_key(&f.session));
            }
        }
    }
}

/// The sessions of every node, in one Redis.
pub struct RedisStore {
    conn: ConnectionManager,
    shared: Arc<Shared>,
    /// Stops the feed when the store is dropped.
    stop: CancellationToken,
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl RedisStore {
    /// Connects to Redis at `url`, takes a node id, and starts this node's feed and heartbeat
    /// ([`NODE_TIMEOUT`]).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, NODE_TIMEOUT).await
    }

    /// As [`RedisStore::connect`], with this node's alive key lasting `node_timeout` (at
    /// least [`MIN_NODE_TIMEOUT`]).
    pub async fn connect_with(url: &str, node_timeout: Duration) -> Result<Self, StoreError> {
        let node_timeout = node_timeout.max(MIN_NODE_TIMEOUT);
        let client = redis::Client::open(url).map_err(redis_error)?;
        let config = ConnectionManagerConfig::new().set_response_timeout(Some(RESPONSE_TIMEOUT));
        let mut conn = ConnectionManager::new_with_config(client.clone(), config)
            .await
            .map_err(redis_error)?;
        // The feed blocks in its reads: it has a connection of its own.
        let feed_config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(FEED_BLOCK + RESPONSE_TIMEOUT));
        let feed_conn = ConnectionManager::new_with_config(client, feed_config)
            .await
            .map_err(redis_error)?;
        let node: u64 = redis::cmd("INCR")
            .arg("collab:nodes")
            .query_async(&mut conn)
            .await
            .map_err(redis_error)?;
        let wake: String = wake(&mut conn, node).await?;
        let shared = Arc::new(Shared {
            node,
            node_timeout,
            followers: Mutex::default(),
        });
        // A new node id: no key to have been there.
        renew_alive(&mut conn, &shared).await?;
        let stop = CancellationToken::new();
        tokio::spawn(heartbeat(conn.clone(), shared.clone(), stop.clone()));
        tokio::spawn(feed(
            feed_conn,
            conn.clone(),
            shared.clone(),
            position(&wake)?,
            stop.clone(),
        ));
        debug!(node, "joined the cluster");
        Ok(Self { conn, shared, stop })
    }
}

/// Wakes `node`'s feed; returns the wake entry's id.
async fn wake(conn: &mut ConnectionManager, node: u64) -> Result<String, StoreError> {
    let key = wake_key(node);
    let mut pipe = redis::pipe();
    pipe.cmd("XADD")
        .arg(&key)
        .arg("MAXLEN")
        .arg(1)
        .arg("*")
        .arg("w")
        .arg(1)
        .cmd("EXPIRE")
        .arg(&key)
        .arg(3600)
        .ignore();
    let (id,): (String,) = query(conn, &pipe).await?;
    Ok(id)
}

/// Reads every followed stream, and its presence stream, from where its follower stands,
/// and hands each follower what the other nodes appended. A follower whose channel is full
/// is not waited for: it stalls ([`stall`]) and the others go on. Runs until the store is
/// dropped; a failed read is logged and retried (the connection reconnects by itself).
async fn feed(
    mut conn: ConnectionManager,
    wake_conn: ConnectionManager,
    shared: Arc<Shared>,
    mut wake_after: u64,
    stop: CancellationToken,
) {
    let warnings = WarnLimiter::default();
    let wake = wake_key(shared.node);
    loop {
        let (keys, ids): (Vec<String>, Vec<String>) = {
            let followers = shared.followers();
            std::iter::once((wake.clone(), entry_id(wake_after)))
                .chain(
                    followers
                        .by_key
                        .iter()
                        .filter(|(_, f)| !f.stalled)
                        .flat_map(|(key, f)| {
                            [
                                (key.clone(), entry_id(f.after)),
                                (presence_key(&f.session), entry_id(f.presence_after)),
                            ]
                        }),
                )
                .unzip()
        };
        let mut read = redis::cmd("XREAD");
        read.arg("COUNT")
            .arg(FEED_COUNT)
            .arg("BLOCK")
            .arg(u64::try_from(FEED_BLOCK.as_millis()).unwrap_or(u64::MAX))
            .arg("STREAMS")
            .arg(&keys)
            .arg(&ids);
        let reply = tokio::select! {
            reply = read.query_async::<Option<StreamReadReply>>(&mut conn) => reply,
            _ = stop.cancelled() => return,
        };
        let reply = match reply {
            Ok(reply) => reply.unwrap_or_default(),
            Err(e) => {
                if warnings.allow() {
                    warn!(node = shared.node, error = %e, "cluster feed: read failed, retrying");
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    _ = stop.cancelled() => return,
                }
            }
        };
        for stream in reply.keys {
            let Some(last) = stream.ids.last() else {
                continue;
            };
            let Ok(upto) = position(&last.id) else {
                if warnings.allow() {
                    warn!(node = shared.node, id = %last.id, "cluster feed: unexpected entry id");
                }
                continue;
            };
            if stream.key == wake {
                wake_after = upto;
                continue;
            }
            let presence_of = shared.followers().by_presence_key.get(&stream.key).cloned();
            if let Some(key) = presence_of {
                forward_presence(
                    &shared,
                    &wake_conn,
                    &key,
                    &stream.ids,
                    upto,
                    &warnings,
                    &stop,
                );
                continue;
            }
            let (token, after, tx) = {
                let followers = shared.followers();
                let Some(f) = followers.by_key.get(&stream.key) else {
                    continue;
                };
                if f.stalled {
                    continue;
                }
                (f.token, f.after, f.tx.clone())
            };
            let permit = match tx.try_reserve() {
                Ok(permit) => permit,
                Err(mpsc::error::TrySendError::Full(())) => {
                    stall(&shared, &wake_conn, &stream.key, token, tx.clone(), &stop);
                    continue;
                }
                Err(mpsc::error::TrySendError::Closed(())) => continue,
            };
            let batch = match remote_batch(&stream.ids, shared.node, after, upto) {
                Ok(batch) => batch,
                Err(e) => {
                    if warnings.allow() {
                        warn!(node = shared.node, key = %stream.key, error = %e, "cluster feed: unreadable entry skipped");
                    }
                    RemoteBatch {
                        updates: Vec::new(),
                        upto,
                    }
                }
            };
            permit.send(Remote::Updates(batch));
            if let Some(f) = shared.followers().by_key.get_mut(&stream.key) {
                if f.token == token {
                    f.after = upto;
                }
            }
        }
    }
}

/// Leaves the follower of stream `key` out of the feed's reads until its channel has room:
/// what was read for it is not handed over and its positions stay, so it is read again from
/// there. Its task's turn to read gives the room back; then the feed is woken to read it.
fn stall(
    shared: &Arc<Shared>,
    wake_conn: &ConnectionManager,
    key: &str,
    token: u64,
    tx: mpsc::Sender<Remote>,
    stop: &CancellationToken,
) {
    match shared.followers().by_key.get_mut(key) {
        Some(f) if f.token == token && !f.stalled => f.stalled = true,
        _ => return,
    }
    debug!(
        node = shared.node,
        key, "cluster feed: a session's channel is full; read later"
    );
    let (shared, mut conn, key, stop) = (
        shared.clone(),
        wake_conn.clone(),
        key.to_owned(),
        stop.clone(),
    );
    tokio::spawn(async move {
        let room = tokio::select! {
            room = tx.reserve() => room,
            _ = stop.cancelled() => return,
        };
        // Closed: the session let go of its feed, and its follower is gone with it.
        let Ok(permit) = room else {
            return;
        };
        drop(permit);
        if let Some(f) = shared.followers().by_key.get_mut(&key) {
            if f.token == token {
                f.stalled = false;
            }
        }
        // Without the wake the feed reads it anyway once its blocking read ends.
        if let Err(e) = wake(&mut conn, shared.node).await {
            debug!(node = shared.node, error = %e, "could not wake the cluster feed");
        }
    });
}

/// Hands the follower of stream `key` the other nodes' presence entries (of nodes not known
/// gone), and moves it past them; stalls it if its channel is full.
fn forward_presence(
    shared: &Arc<Shared>,
    wake_conn: &ConnectionManager,
    key: &str,
    entries: &[StreamId],
    upto: u64,
    warnings: &WarnLimiter,
    stop: &CancellationToken,
) {
    let (token, tx, inputs) = {
        let mut followers = shared.followers();
        let mut inputs = Vec::new();
        for entry in entries {
            match presence_input(entry) {
                Ok((node, _)) if node == shared.node => {}
                Ok((node, input)) => {
                    followers.nodes_seen.insert(node);
                    inputs.push(input);
                }
                Err(e) => {
                    if warnings.allow() {
                        warn!(node = shared.node, key, error = %e, "cluster feed: unreadable presence entry skipped");
                    }
                }
            }
        }
        let Some(f) = followers.by_key.get(key) else {
            return;
        };
        if f.stalled {
            return;
        }
        (f.token, f.tx.clone(), inputs)
    };
    if !inputs.is_empty() {
        match tx.try_reserve() {
            Ok(permit) => permit.send(Remote::Presence(inputs)),
            Err(mpsc::error::TrySendError::Full(())) => {
                stall(shared, wake_conn, key, token, tx.clone(), stop);
                return;
            }
            Err(mpsc::error::TrySendError::Closed(())) => return,
        }
    }
    if let Some(f) = shared.followers().by_key.get_mut(key) {
        if f.token == token {
            f.presence_after = upto;
        }
    }
}

fn kind_name(kind: ConnKind) -> &'static str {
    match kind {
        ConnKind::Legacy => "legacy",
        ConnKind::LegacyYjs => "legacy-yjs",
        ConnKind::Yjs => "yjs",
    }
}

/// A join as the hash and the presence stream hold it.
fn join_description(
    kind: ConnKind,
    user: Option<&str>,
    connected_at: &str,
    holds_name: bool,
) -> String {
    serde_json::json!({"k": kind_name(kind), "u": user, "t": connected_at, "h": holds_name})
        .to_string()
}

/// A join read back from Redis, checked: Redis holds what any node wrote.
fn joined_input(node: u64, peer: PeerId, description: &str) -> Result<Input, String> {
    if description.len() > MAX_JOIN_BYTES {
        return Err(format!("a join description over {MAX_JOIN_BYTES} bytes"));
    }
    let bad = || format!("unexpected join description {description:?}");
    let value: serde_json::Value = serde_json::from_str(description).map_err(|_| bad())?;
    let kind = match value["k"].as_str() {
        Some("legacy") => ConnKind::Legacy,
        Some("legacy-yjs") => ConnKind::LegacyYjs,
        Some("yjs") => ConnKind::Yjs,
        _ => return Err(bad()),
    };
    let user = match &value["u"] {
        serde_json::Value::Null => None,
        serde_json::Value::String(user) if !user.is_empty() => Some(Arc::from(user.as_str())),
        _ => return Err(bad()),
    };
    let connected_at = value["t"].as_str().ok_or_else(bad)?;
    let holds_name = value["h"].as_bool().ok_or_else(bad)?;
    Ok(Input::RemoteJoined {
        node,
        peer,
        kind,
        user,
        connected_at: Arc::from(connected_at),
        holds_name,
    })
}

/// A presence stream entry as the input it stands for, with the node that wrote it.
fn presence_input(entry: &StreamId) -> Result<(u64, Input), String> {
    let bad = || format!("presence entry {} is not one this server writes", entry.id);
    let node = entry.get::<u64>("n").ok_or_else(bad)?;
    let peer = entry.get::<PeerId>("p").ok_or_else(bad)?;
    if let Some(description) = entry.get::<String>("j") {
        return Ok((node, joined_input(node, peer, &description)?));
    }
    if entry.contains_key("l") {
        return Ok((node, Input::RemoteLeft { node, peer }));
    }
    let update = entry.get::<Vec<u8>>("a").ok_or_else(bad)?;
    let update = CheckedAwareness::check(update).map_err(|e| e.to_string())?;
    Ok((node, Input::RemoteAwareness { node, peer, update }))
}

/// Renews this node's alive key; returns whether it was still there (if not, the other
/// nodes may have taken this node for gone).
async fn renew_alive(conn: &mut ConnectionManager, shared: &Shared) -> Result<bool, StoreError> {
    let mut pipe = redis::pipe();
    pipe.cmd("SET")
        .arg(alive_key(shared.node))
        .arg(1)
        .arg("PX")
        .arg(u64::try_from(shared.node_timeout.as_millis()).unwrap_or(u64::MAX))
        .arg("GET");
    let (before,): (Option<String>,) = query(conn, &pipe).await?;
    Ok(before.is_some())
}

/// Keeps this node alive in Redis, and watches the nodes whose connections it heard of: the
/// connections of one whose alive key expired leave every session this node follows.
async fn heartbeat(mut conn: ConnectionManager, shared: Arc<Shared>, stop: CancellationToken) {
    let warnings = WarnLimiter::default();
    let every = shared.node_timeout / 5;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
        match renew_alive(&mut conn, &shared).await {
            Ok(true) => {}
            Ok(false) => {
                // Renewals failed for longer than the key lasts (Redis unreachable): the
                // other nodes may have let this node's connections leave.
                warn!(
                    node = shared.node,
                    "this node's heartbeat had expired; telling its presence again"
                );
                let followers: Vec<mpsc::Sender<Remote>> = shared
                    .followers()
                    .by_key
                    .values()
                    .map(|f| f.tx.clone())
                    .collect();
                for tx in followers {
                    hand_over(tx, Remote::Reannounce);
                }
            }
            Err(e) => {
                if warnings.allow() {
                    warn!(node = shared.node, error = %e, "cluster heartbeat failed");
                }
                continue;
            }
        }
        let seen: Vec<u64> = shared.followers().nodes_seen.iter().copied().collect();
        if seen.is_empty() {
            continue;
        }
        let mut pipe = redis::pipe();
        for node in &seen {
            pipe.cmd("EXISTS").arg(alive_key(*node));
        }
        let alive: Vec<bool> = match query(&mut conn, &pipe).await {
            Ok(alive) => alive,
            Err(e) => {
                if warnings.allow() {
                    warn!(node = shared.node, error = %e, "cluster heartbeat: cannot check the other nodes");
                }
                continue;
            }
        };
        for (gone, _) in seen.into_iter().zip(alive).filter(|(_, alive)| !alive) {
            info!(
                node = shared.node,
                gone, "a node is gone (its heartbeat expired); its connections leave"
            );
            node_gone(&mut conn, &shared, gone).await;
        }
    }
}

/// Hands a session's task what the heartbeat found, without waiting for a full channel (the
/// heartbeat must go on renewing this node's key whatever one session does): then a task of
/// its own waits for room.
fn hand_over(tx: mpsc::Sender<Remote>, remote: Remote) {
    if let Err(mpsc::error::TrySendError::Full(remote)) = tx.try_send(remote) {
        tokio::spawn(async move {
            let _ = tx.send(remote).await;
        });
    }
}

/// Node `gone` stopped without its connections leaving: every followed session hears so,
/// and its entries leave the sessions' presence hashes.
async fn node_gone(conn: &mut ConnectionManager, shared: &Shared, gone: u64) {
    let followers: Vec<(String, mpsc::Sender<Remote>)> = {
        let mut followers = shared.followers();
        followers.nodes_seen.remove(&gone);
        followers
            .by_key
            .values()
            .map(|f| (f.session.clone(), f.tx.clone()))
            .collect()
    };
    for (session, tx) in followers {
        hand_over(tx, Remote::Presence(vec![Input::NodeGone { node: gone }]));
        if let Err(e) = forget_node(conn, &session, gone).await {
            debug!(session = %session, gone, error = %e, "could not clear a gone node's presence");
        }
    }
}

/// Removes node `gone`'s entries from the session's presence and awareness hashes.
async fn forget_node(
    conn: &mut ConnectionManager,
    session: &str,
    gone: u64,
) -> Result<(), StoreError> {
    let prefix = format!("{gone}:");
    for key in [present_key(session), awareness_key(session)] {
        let fields: Vec<String> = query(conn, redis::pipe().cmd("HKEYS").arg(&key))
            .await
            .map(|(fields,): (Vec<String>,)| fields)?;
        let doomed: Vec<&String> = fields.iter().filter(|f| f.starts_with(&prefix)).collect();
        if !doomed.is_empty() {
            query::<()>(
                conn,
                redis::pipe().cmd("HDEL").arg(&key).arg(doomed).ignore(),
            )
            .await?;
        }
    }
    Ok(())
}

/// A presence hash field `{node}:{peer}`.
fn node_and_peer(field: &str) -> Option<(u64, PeerId)> {
    let (node, peer) = field.split_once(':')?;
    Some((node.parse().ok()?, peer.parse().ok()?))
}

/// What a follower that has read up to `after` takes of these entries: the other nodes'
/// updates, and a snapshot only when it covers entries the follower never read (trimmed
/// before it read them), first.
fn remote_batch(
    ids: &[StreamId],
    node: u64,
    after: u64,
    upto: u64,
) -> Result<RemoteBatch, StoreError> {
    let mut updates = Vec::new();
    for id in ids {
        match entry(id)? {
            Entry::Update { node: from, update } if from != node => updates.push(update),
            Entry::Update { .. } => {}
            Entry::Snapshot { covers, snapshot } if covers > after => {
                updates.insert(0, snapshot);
            }
            Entry::Snapshot { .. } => {}
        }
    }
    Ok(RemoteBatch { updates, upto })
}

impl Store for RedisStore {
    fn load(&self, session: &str) -> StoreFuture<'_, Option<StoredSession>> {
        let session = session.to_owned();
        let mut conn = self.conn.clone();
        Box::pin(async move {
            let mut pipe = redis::pipe();
            pipe.cmd("XRANGE")
                .arg(stream_key(&session))
                .arg("-")
                .arg("+")
                .cmd("HGETALL")
                .arg(meta_key(&session));
            let (range, meta): (StreamRangeReply, HashMap<String, String>) =
                query(&mut conn, &pipe).await?;
            if range.ids.is_empty() && meta.is_empty() {
                return Ok(None);
            }
            let mut snapshots = Vec::new();
            let mut updates = Vec::new();
            for id in &range.ids {
                match entry(id)? {
                    Entry::Update { update, .. } => updates.push(update),
                    Entry::Snapshot { snapshot, .. } => snapshots.push(snapshot),
                }
            }
            let last_seq = match range.ids.last() {
                Some(last) => position(&last.id)?,
                None => 0,
            };
            // Snapshots first, the newest first: an update's blocks then continue what the
            // document holds.
            snapshots.reverse();
            snapshots.extend(updates);
            Ok(Some(StoredSession {
                updates: snapshots,
                meta: SessionMeta {
                    initialized: meta.get("initialized").is_some_and(|v| v == "1"),
                },
                last_seq,
            }))
        })
    }

    fn contains(&self, session: &str) -> StoreFuture<'_, bool> {
        let session = session.to_owned();
        let mut conn = self.conn.clone();
        Box::pin(async move {
            redis::cmd("SISMEMBER")
                .arg(SESSIONS)
                .arg(&session)
                .query_async(&mut conn)
                .await
                .map_err(redis_error)
        })
    }

    fn append(
        &self,
        session: &str,
        updates: Vec<Vec<u8>>,
        meta: SessionMeta,
    ) -> StoreFuture<'_, u64> {
        let session = session.to_owned();
        let mut conn = self.conn.clone();
        let node = self.shared.node;
        Box::pin(async move {
            let key = stream_key(&session);
            let mut pipe = redis::pipe();
            pipe.atomic();
            for update in &updates {
                pipe.cmd("XADD")
                    .arg(&key)
                    .arg("*")
                    .arg("n")
                    .arg(node)
                    .arg("u")
                    .arg(update.as_slice());
            }
            pipe.cmd("HSET")
                .arg(meta_key(&session))
                .arg("initialized")
                .arg(u8::from(meta.initialized))
                .ignore();
            if updates.is_empty() {
                // Only the metadata changed: the position is the stream's last entry.
                pipe.cmd("XREVRANGE")
                    .arg(&key)
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(1);
            } else {
                pipe.cmd("HSET")
                    .arg(meta_key(&session))
                    .arg("changed")
                    .arg(millis(SystemTime::now()))
                    .ignore();
            }
            pipe.cmd("SADD").arg(SESSIONS).arg(&session).ignore();
            if updates.is_empty() {
                let (last,): (StreamRangeReply,) = query(&mut conn, &pipe).await?;
                return last.ids.first().map_or(Ok(0), |id| position(&id.id));
            }
            let ids: Vec<String> = query(&mut conn, &pipe).await?;
            ids.last().map_or(Ok(0), |id| position(id))
        })
    }

    fn compact(
        &self,
        session: &str,
        snapshot: Vec<u8>,
        upto: u64,
        meta: SessionMeta,
    ) -> StoreFuture<'_, ()> {
        let session = session.to_owned();
        let mut conn = self.conn.clone();
        let node = self.shared.node;
        Box::pin(async move {
            let leased: Option<String> = redis::cmd("SET")
                .arg(lease_key(&session))
                .arg(node)
                .arg("NX")
                .arg("PX")
                .arg(u64::try_from(LEASE.as_millis()).unwrap_or(u64::MAX))
                .query_async(&mut conn)
                .await
                .map_err(redis_error)?;
            if leased.is_none() {
                debug!(session = %session, node, "another node holds the compaction lease");
                return Ok(());
            }
            let key = stream_key(&session);
            redis::pipe()
                .atomic()
                .cmd("XADD")
                .arg(&key)
                .arg("*")
                .arg("n")
                .arg(node)
                .arg("c")
                .arg(upto)
                .arg("s")
                .arg(snapshot)
                .ignore()
                .cmd("XTRIM")
                .arg(&key)
                .arg("MINID")
                .arg(id_after(upto))
                .ignore()
                .cmd("HSET")
                .arg(meta_key(&session))
                .arg("initialized")
                .arg(u8::from(meta.initialized))
                .ignore()
                .query_async::<()>(&mut conn)
                .await
                .map_err(redis_error)
        })
    }

    fn list(&self) -> StoreFuture<'_, Vec<StoredSummary>> {
        let mut conn = self.conn.clone();
        Box::pin(async move {
            let mut ids: Vec<String> = redis::cmd("SMEMBERS")
                .arg(SESSIONS)
                .query_async(&mut conn)
                .await
                .map_err(redis_error)?;
            ids.sort_unstable();
            if ids.is_empty() {
                return Ok(Vec::new());
            }
            let mut pipe = redis::pipe();
            for id in &ids {
                pipe.cmd("MEMORY")
                    .arg("USAGE")
                    .arg(stream_key(id))
                    .arg("SAMPLES")
                    .arg(0)
                    .cmd("HGET")
                    .arg(meta_key(id))
                    .arg("changed");
            }
            let facts: Vec<(Option<u64>, Option<u64>)> =
                pipe.query_async(&mut conn).await.map_err(redis_error)?;
            Ok(ids
                .into_iter()
                .zip(facts)
                .map(|(id, (bytes, changed))| StoredSummary {
                    id,
                    stored_bytes: bytes.unwrap_or(0),
                    last_change: changed
                        .map(|ms| timestamp(UNIX_EPOCH + Duration::from_millis(ms))),
                })
                .collect())
        })
    }

    /// Redis persists by its own settings (`appendfsync`): an append is as durable as Redis
    /// made it when it answered.
    fn flush(&self) -> StoreFuture<'_, ()> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn remove_untouched(
        &self,
        cutoff: SystemTime,
        keep: Vec<String>,
    ) -> StoreFuture<'_, Vec<String>> {
        let mut conn = self.conn.clone();
        Box::pin(async move {
            let ids: Vec<String> = redis::cmd("SMEMBERS")
                .arg(SESSIONS)
                .query_async(&mut conn)
                .await
                .map_err(redis_error)?;
            let cutoff = millis(cutoff);
            let mut removed = Vec::new();
            for id in ids.into_iter().filter(|id| !keep.contains(id)) {
                let changed: Option<u64> = redis::cmd("HGET")
                    .arg(meta_key(&id))
                    .arg("changed")
                    .query_async(&mut conn)
                    .await
                    .map_err(redis_error)?;
                if changed.is_some_and(|ms| ms >= cutoff) {
                    continue;
                }
                redis::pipe()
                    .atomic()
                    .cmd("DEL")
                    .arg(stream_key(&id))
                    .arg(meta_key(&id))
                    .arg(lease_key(&id))
                    .arg(present_key(&id))
                    .arg(awareness_key(&id))
                    .arg(presence_key(&id))
                    .ignore()
                    .cmd("SREM")
                    .arg(SESSIONS)
                    .arg(&id)
                    .ignore()
                    .query_async::<()>(&mut conn)
                    .await
                    .map_err(redis_error)?;
                removed.push(id);
            }
            Ok(removed)
        })
    }

    fn follow(&self, session: &str, after: u64) -> StoreFuture<'_, Option<Following>> {
        let session = session.to_owned();
        let key = stream_key(&session);
        let mut conn = self.conn.clone();
        Box::pin(async move {
            let (present, presence_after) = self.present(&mut conn, &session).await?;
            let (tx, rx) = mpsc::channel(FEED_QUEUE);
            let token = {
                let mut followers = self.shared.followers();
                followers.next_token += 1;
                let token = followers.next_token;
                followers
                    .by_presence_key
                    .insert(presence_key(&session), key.clone());
                followers.by_key.insert(
                    key.clone(),
                    Follower {
                        token,
                        session,
                        after,
                        presence_after,
                        tx,
                        stalled: false,
                    },
                );
                token
            };
            let unfollow = Unfollow {
                shared: self.shared.clone(),
                key,
                token,
            };
            wake(&mut conn, self.shared.node).await?;
            Ok(Some(Following {
                rx,
                node: self.shared.node,
                present,
                _unfollow: Box::new(unfollow),
            }))
        })
    }

    fn publish_presence(&self, session: &str, changes: Vec<PresenceChange>) -> StoreFuture<'_, ()> {
        let present = present_key(session);
        let awareness = awareness_key(session);
        let presence = presence_key(session);
        let mut conn = self.conn.clone();
        let node = self.shared.node;
        Box::pin(async move {
            let mut pipe = redis::pipe();
            pipe.atomic();
            for change in changes {
                let peer = match &change {
                    PresenceChange::Joined { peer, .. }
                    | PresenceChange::Left { peer }
                    | PresenceChange::Awareness { peer, .. } => *peer,
                };
                let field = format!("{node}:{peer}");
                match change {
                    PresenceChange::Joined {
                        kind,
                        user,
                        connected_at,
                        holds_name,
                        ..
                    } => {
                        let description =
                            join_description(kind, user.as_deref(), &connected_at, holds_name);
                        pipe.cmd("HSET")
                            .arg(&present)
                            .arg(&field)
                            .arg(&description)
                            .ignore();
                        add_presence(
                            &mut pipe,
                            &presence,
                            node,
                            peer,
                            "j",
                            description.as_bytes(),
                        );
                    }
                    PresenceChange::Left { .. } => {
                        pipe.cmd("HDEL").arg(&present).arg(&field).ignore();
                        pipe.cmd("HDEL").arg(&awareness).arg(&field).ignore();
                        add_presence(&mut pipe, &presence, node, peer, "l", b"1");
                    }
                    PresenceChange::Awareness { update, states, .. } => {
                        match states {
                            Some(states) => {
                                pipe.cmd("HSET").arg(&awareness).arg(&field).arg(states)
                            }
                            None => pipe.cmd("HDEL").arg(&awareness).arg(&field),
                        }
                        .ignore();
                        add_presence(&mut pipe, &presence, node, peer, "a", &update);
                    }
                }
            }
            query(&mut conn, &pipe).await
        })
    }
}

/// Appends a presence entry (`n`, `p`, then `field`) to the capped presence stream.
fn add_presence(
    pipe: &mut redis::Pipeline,
    key: &str,
    node: u64,
    peer: PeerId,
    field: &str,
    value: &[u8],
) {
    pipe.cmd("XADD")
        .arg(key)
        .arg("MAXLEN")
        .arg("~")
        .arg(PRESENCE_KEPT)
        .arg("*")
        .arg("n")
        .arg(node)
        .arg("p")
        .arg(peer)
        .arg(field)
        .arg(value)
        .ignore();
}

impl RedisStore {
    /// The connections of other live nodes in the session, as joins in the order they
    /// joined, then their awareness states, and the position of the presence stream they are
    /// current to. Entries of gone nodes, and this node's own (a former task's, whose leaves
    /// were not written), are removed.
    async fn present(
        &self,
        conn: &mut ConnectionManager,
        session: &str,
    ) -> Result<(Vec<Input>, u64), StoreError> {
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("HGETALL")
            .arg(present_key(session))
            .cmd("HGETALL")
            .arg(awareness_key(session))
            .cmd("XREVRANGE")
            .arg(presence_key(session))
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1);
        let (entries, states, last): (
            HashMap<String, String>,
            HashMap<String, Vec<u8>>,
            StreamRangeReply,
        ) = query(conn, &pipe).await?;
        let presence_after = match last.ids.first() {
            Some(id) => position(&id.id)?,
            None => 0,
        };
        let own = self.shared.node;
        let mut joins = Vec::new();
        let mut stale = Vec::new();
        // One warning per follow, however many entries are unreadable.
        let mut unreadable = Vec::new();
        for (field, description) in &entries {
            match node_and_peer(field)
                .map(|(node, peer)| (node, joined_input(node, peer, description)))
            {
                Some((node, _)) if node == own => stale.push(field),
                Some((node, Ok(input))) => joins.push((node, input)),
                Some((_, Err(e))) => unreadable.push(e),
                None => unreadable.push(format!("unexpected presence field {field:?}")),
            }
        }
        let mut awareness = Vec::new();
        let mut stale_states = Vec::new();
        for (field, update) in states {
            let checked = CheckedAwareness::check(update).map_err(|e| e.to_string());
            match (node_and_peer(&field), checked) {
                (Some((node, _)), _) if node == own => stale_states.push(field),
                (Some((node, peer)), Ok(update)) => {
                    awareness.push((node, Input::RemoteAwareness { node, peer, update }))
                }
                (_, Err(e)) => unreadable.push(e),
                (None, _) => unreadable.push(format!("unexpected awareness field {field:?}")),
            }
        }
        if let Some(first) = unreadable.first() {
            warn!(session, node = own, count = unreadable.len(), first = %first, "unreadable presence entries ignored");
        }
        if !stale.is_empty() || !stale_states.is_empty() {
            let mut pipe = redis::pipe();
            if !stale.is_empty() {
                pipe.cmd("HDEL")
                    .arg(present_key(session))
                    .arg(&stale)
                    .ignore();
            }
            if !stale_states.is_empty() {
                pipe.cmd("HDEL")
                    .arg(awareness_key(session))
                    .arg(&stale_states)
                    .ignore();
            }
            query::<()>(conn, &pipe).await?;
        }
        let mut nodes: Vec<u64> = joins
            .iter()
            .chain(&awareness)
            .map(|(node, _)| *node)
            .collect();
        nodes.sort_unstable();
        nodes.dedup();
        if !nodes.is_empty() {
            let mut pipe = redis::pipe();
            for node in &nodes {
                pipe.cmd("EXISTS").arg(alive_key(*node));
            }
            let alive: Vec<bool> = query(conn, &pipe).await?;
            let gone: HashSet<u64> = nodes
                .iter()
                .zip(alive)
                .filter(|(_, alive)| !alive)
                .map(|(node, _)| *node)
                .collect();
            for node in &gone {
                forget_node(conn, session, *node).await?;
            }
            joins.retain(|(node, _)| !gone.contains(node));
            awareness.retain(|(node, _)| !gone.contains(node));
            self.shared
                .followers()
                .nodes_seen
                .extend(joins.iter().chain(&awareness).map(|(node, _)| *node));
        }
        // In the order they joined: by time, then (within a millisecond) by node and peer.
        joins.sort_by_cached_key(|(_, input)| match input {
            Input::RemoteJoined {
                node,
                peer,
                connected_at,
                ..
            } => (connected_at.clone(), *node, *peer),
            _ => (Arc::from(""), 0, 0),
        });
        Ok((
            joins
                .into_iter()
                .chain(awareness)
                .map(|(_, input)| input)
                .collect(),
            presence_after,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_keep_the_order_of_entry_ids() {
        let ids = ["0-0", "0-1", "1-0", "1733356800000-7", "1733356800001-0"];
        let positions: Vec<u64> = ids.iter().map(|id| position(id).unwrap()).collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
        for (id, p) in ids.iter().zip(&positions) {
            assert_eq!(entry_id(*p), *id);
        }
        assert_eq!(id_after(position("5-9").unwrap()), "5-10");
        assert!(
            position("1-1048576").is_err(),
            "a sequence number out of range"
        );
        assert!(position("12").is_err());
    }
}
