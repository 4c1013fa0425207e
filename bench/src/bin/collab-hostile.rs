//! collab-hostile: runs one hostile-network attack (issue 13) against a running optiverse-collab
//! while honest clients work beside it, and prints one Markdown table row (bench/hostile.sh
//! gathers them).
//!
//! The honest clients, started before the attack and kept to the end:
//! * a desktop JSON client (`/ws/{s}/honest-d`): a `ping` every 100 ms (its `pong` latency is
//!   the "ping" column) and an `add_item` every 500 ms;
//! * a Yjs client (`/yjs/{s}?user=honest-y`) in the same session: an item every 500 ms, and an
//!   awareness state of its own;
//! * a quiet desktop client in a session of its own that only pings, so a stall of the whole
//!   server is told apart from one of the honest session.
//!
//! Each honest writer's items must reach the other; "lost" counts the items attempted (a client
//! the server dropped keeps counting attempts) that the other did not hold at the end. The
//! honest session is the attacker's own for the session-level attacks (awareness, bad fields),
//! another one otherwise. `/health` is polled every 200 ms on a fresh connection, like a
//! monitoring probe, and the server's RSS sampled every 100 ms from `/proc`. The honest clients
//! and the probe connect from `--honest-source` (127.0.0.2), the attackers from the default
//! address (127.0.0.1): on a real network they are different machines, and the server's
//! per-address limits tell them apart.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use collab_load::proc_stats;
use collab_load::stats::Latencies;
use collab_load::yjs_client::{self, Ws};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{watch, Notify};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Bytes, Message as WsMessage};
use yrs::sync::awareness::AwarenessUpdateEntry;
use yrs::sync::{AwarenessUpdate, Message, SyncMessage};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{ClientID, Doc, Map as _, MapPrelim, ReadTxn, Transact};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Attack {
    /// 260 TCP sockets that never finish the HTTP request head.
    SlowHeaders,
    /// 30 sockets each sending the first 15 MiB of a WebSocket message, then only pings.
    PartialMessages,
    /// 90 Yjs clients joining an 8 MB document and never reading.
    SlowReaders,
    /// 10 concurrent 15 MB `POST /api/sessions/{s}/update`.
    BigPosts,
    /// One client's 1,024 awareness states of 64 KiB, then a later Yjs joiner.
    AwarenessFlood,
    /// An awareness state that is not JSON.
    AwarenessNotJson,
    /// A client overwriting, then removing, another client's awareness entry.
    AwarenessOverwrite,
    /// `move_item` with `x_mm` "abc", null, [1,2].
    BadFields,
    /// 30,000 GETs of random session names (and 200 WebSocket joins of random names).
    RandomGets,
    /// The store's filesystem frozen for 8 s (`fsfreeze`) while a client writes.
    DiskFreeze,
    /// The store's files made immutable (`chattr +i`) while a client writes.
    ImmutableStore,
    /// `HEAD /yjs/x` with WebSocket upgrade headers.
    HeadUpgrade,
    /// Session `a%41` over WebSocket vs `/api/sessions/a%2541/...`.
    DoubleDecode,
}

impl Attack {
    /// Whether the honest clients share the attacker's session.
    fn same_session(self) -> bool {
        matches!(
            self,
            Attack::AwarenessFlood
                | Attack::AwarenessNotJson
                | Attack::AwarenessOverwrite
                | Attack::BadFields
        )
    }
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "collab-hostile",
    about = "One hostile-network attack against optiverse-collab"
)]
struct Args {
    /// The server's address (host:port).
    #[arg(long)]
    addr: String,
    /// The server's process id (RSS, liveness).
    #[arg(long)]
    server_pid: u32,
    #[arg(long, value_enum)]
    attack: Attack,
    /// Seconds the attack is held (where it is held at all).
    #[arg(long, default_value_t = 20.0)]
    hold: f64,
    /// The server's `--data-dir` (the store files).
    #[arg(long)]
    data_dir: PathBuf,
    /// The mount point of the filesystem holding the data dir (disk attacks).
    #[arg(long)]
    mount: Option<PathBuf>,
    /// The server's memory budget in MiB, if it has one, to report the peak against.
    #[arg(long)]
    budget_mib: Option<u64>,
    /// The local address the honest clients and the `/health` probe connect from (0.0.0.0:
    /// the system's choice, the same as the attackers').
    #[arg(long, default_value = "127.0.0.2")]
    honest_source: IpAddr,
}

impl Args {
    fn honest_source(&self) -> Option<IpAddr> {
        (!self.honest_source.is_unspecified()).then_some(self.honest_source)
    }
}

/// What the attack found, besides the common columns.
type Notes = Vec<String>;

#[tokio::main]
async fn main() {
    let args = Args::parse();
    match run(&args).await {
        Ok(row) => println!("{row}"),
        Err(e) => {
            eprintln!("collab-hostile: {e}");
            std::process::exit(1);
        }
    }
}

fn ws_url(args: &Args, path: &str) -> String {
    format!("ws://{}{path}", args.addr)
}

/// A WebSocket client without tungstenite's own size limits: a browser's y-websocket has
/// none, and the attacks must see what the server sends, however large.
async fn connect_unlimited(url: &str) -> Result<Ws, String> {
    connect_unlimited_from(url, None).await
}

/// [`connect_unlimited`] from the local address `source` (the system's choice if `None`).
async fn connect_unlimited_from(url: &str, source: Option<IpAddr>) -> Result<Ws, String> {
    let config = WebSocketConfig::default()
        .max_message_size(None)
        .max_frame_size(None);
    let host = url
        .strip_prefix("ws://")
        .and_then(|rest| rest.split('/').next())
        .ok_or_else(|| format!("not a ws:// URL: {url}"))?;
    let stream = tcp_connect(host, source)
        .await
        .map_err(|e| format!("connect {url}: {e}"))?;
    let stream = tokio_tungstenite::MaybeTlsStream::Plain(stream);
    let (ws, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(config))
        .await
        .map_err(|e| format!("connect {url}: {e}"))?;
    Ok(ws)
}

/// A TCP connection to `addr` (host:port), from the local address `source` if given.
async fn tcp_connect(addr: &str, source: Option<IpAddr>) -> Result<TcpStream, String> {
    let Some(source) = source else {
        return TcpStream::connect(addr).await.map_err(|e| e.to_string());
    };
    let target = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| e.to_string())?
        .next()
        .ok_or_else(|| format!("{addr} has no address"))?;
    let socket = match target {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|e| e.to_string())?;
    socket
        .bind(SocketAddr::new(source, 0))
        .map_err(|e| format!("bind {source}: {e}"))?;
    socket.connect(target).await.map_err(|e| e.to_string())
}

/// Phases the honest clients follow: 0 running, 1 stop writing (drain), 2 quit.
type Phase = watch::Receiver<u8>;

#[derive(Debug, Default)]
struct DesktopReport {
    attempted: u64,
    seen: HashSet<String>,
    /// (sent at, latency if answered)
    pings: Vec<(Instant, Option<Duration>)>,
    /// Last `data` received per attacker item (ids starting `atk`).
    atk_data: HashMap<String, Value>,
    closed: Option<String>,
}

/// The honest desktop client (`write`: send `add_item`s named `hd-N`; otherwise only ping).
async fn honest_desktop(
    url: String,
    source: Option<IpAddr>,
    write: bool,
    mut phase: Phase,
    shared: Arc<Mutex<DesktopReport>>,
) -> Result<(), String> {
    let ws = connect_unlimited_from(&url, source).await?;
    let (mut sink, mut stream) = ws.split();
    let mut ping = tokio::time::interval(Duration::from_millis(100));
    let mut cmd = tokio::time::interval(Duration::from_millis(500));
    let mut alive = true;
    let mut unanswered = std::collections::VecDeque::new();
    let mut n = 0u64;
    loop {
        let p = *phase.borrow();
        if p >= 2 {
            break;
        }
        tokio::select! {
            _ = phase.changed() => {}
            _ = ping.tick(), if p == 0 => {
                let at = Instant::now();
                let i = {
                    let mut r = shared.lock().unwrap();
                    r.pings.push((at, None));
                    r.pings.len() - 1
                };
                if alive {
                    unanswered.push_back(i);
                    if sink.send(WsMessage::text(r#"{"type":"ping"}"#)).await.is_err() {
                        alive = false;
                    }
                }
            }
            _ = cmd.tick(), if p == 0 && write => {
                n += 1;
                shared.lock().unwrap().attempted += 1;
                if alive {
                    let add = json!({"type": "command", "command": {"action": "add_item", "item_type": "component",
                        "item_id": format!("hd-{n}"), "data": {"item_uuid": format!("hd-{n}"), "name": "honest", "x_mm": n as f64, "y_mm": 0.0, "angle_deg": 0.0}}});
                    if sink.send(WsMessage::text(add.to_string())).await.is_err() {
                        alive = false;
                    }
                }
            }
            frame = stream.next(), if alive => {
                let text = match &frame {
                    Some(Ok(WsMessage::Text(t))) => t,
                    Some(Ok(WsMessage::Close(_)) | Err(_)) | None => {
                        record_end(&mut shared.lock().unwrap().closed, frame);
                        alive = false;
                        continue;
                    }
                    Some(Ok(_)) => continue,
                };
                let Ok(msg) = serde_json::from_str::<Value>(text) else { continue };
                let mut r = shared.lock().unwrap();
                match msg["type"].as_str() {
                    Some("pong") => {
                        if let Some(i) = unanswered.pop_front() {
                            let at = r.pings[i].0;
                            r.pings[i].1 = Some(at.elapsed());
                        }
                    }
                    Some("command") => {
                        let c = &msg["command"];
                        if let Some(id) = c["item_id"].as_str() {
                            if id.starts_with("hy-") {
                                r.seen.insert(id.to_owned());
                            } else if id.starts_with("atk") {
                                r.atk_data.insert(id.to_owned(), c["data"].clone());
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    let _ = sink.close().await;
    Ok(())
}

#[derive(Debug, Default)]
struct YjsReport {
    attempted: u64,
    client_id: u64,
    /// Awareness entries received: client id -> (clock, the state, truncated to 200 bytes).
    awareness: HashMap<u64, (u32, String)>,
    awareness_bytes: u64,
    closed: Option<String>,
    doc: Option<Doc>,
}

fn awareness_message(entries: impl IntoIterator<Item = (u64, u32, String)>) -> Vec<u8> {
    let clients = entries
        .into_iter()
        .map(|(id, clock, json)| {
            (
                ClientID::new(id),
                AwarenessUpdateEntry {
                    clock,
                    json: json.into(),
                },
            )
        })
        .collect();
    Message::Awareness(AwarenessUpdate { clients }).encode_v1()
}

fn record_awareness(map: &mut HashMap<u64, (u32, String)>, update: &AwarenessUpdate) {
    for (id, e) in &update.clients {
        let mut s: String = e.json.chars().take(200).collect();
        if e.json.len() > 200 {
            s.push('…');
        }
        map.insert(id.get(), (e.clock, s));
    }
}

/// The honest Yjs client: items named `hy-N`, and an awareness state of its own.
/// `announce`: when given, the awareness state is sent only once it is notified (after the
/// attack), otherwise at once.
async fn honest_yjs(
    url: String,
    source: Option<IpAddr>,
    mut phase: Phase,
    shared: Arc<Mutex<YjsReport>>,
    announce: Option<Arc<Notify>>,
) -> Result<(), String> {
    let mut ws = connect_unlimited_from(&url, source).await?;
    let doc = Doc::new();
    let items = doc.get_or_insert_map("items");
    yjs_client::handshake(&mut ws, &doc, true).await?;
    let me = doc.client_id().get();
    shared.lock().unwrap().client_id = me;
    let (mut sink, mut stream) = ws.split();
    let hello = awareness_message([(me, 1, r#"{"user":{"name":"honest-y"}}"#.to_owned())]);
    let announced = async {
        if let Some(n) = announce {
            n.notified().await
        }
    };
    tokio::pin!(announced);
    let mut hello = Some(hello);
    let mut cmd = tokio::time::interval(Duration::from_millis(500));
    let mut alive = true;
    let mut n = 0u64;
    loop {
        let p = *phase.borrow();
        if p >= 2 {
            break;
        }
        tokio::select! {
            _ = phase.changed() => {}
            _ = &mut announced, if hello.is_some() => {
                if let Some(bytes) = hello.take() {
                    if sink.send(WsMessage::binary(bytes)).await.is_err() {
                        alive = false;
                    }
                }
            }
            _ = cmd.tick(), if p == 0 => {
                n += 1;
                shared.lock().unwrap().attempted += 1;
                let update = {
                    let mut txn = doc.transact_mut();
                    let id = format!("hy-{n}");
                    let fields: MapPrelim = [("item_type".to_owned(), yrs::Any::from("component")), ("name".to_owned(), yrs::Any::from("honest")), ("x_mm".to_owned(), yrs::Any::from(n as f64))].into_iter().collect();
                    items.insert(&mut txn, id, fields);
                    txn.encode_update_v1()
                };
                if alive {
                    let bytes = Message::Sync(SyncMessage::Update(update)).encode_v1();
                    if sink.send(WsMessage::binary(bytes)).await.is_err() {
                        alive = false;
                    }
                }
            }
            frame = stream.next(), if alive => {
                let bytes = match &frame {
                    Some(Ok(WsMessage::Binary(b))) => b,
                    Some(Ok(WsMessage::Close(_)) | Err(_)) | None => {
                        record_end(&mut shared.lock().unwrap().closed, frame);
                        alive = false;
                        continue;
                    }
                    Some(Ok(_)) => continue,
                };
                match Message::decode_v1(bytes) {
                    Ok(Message::Sync(SyncMessage::Update(u) | SyncMessage::SyncStep2(u))) => {
                        yjs_client::apply(&doc, &u)?;
                    }
                    Ok(Message::Sync(SyncMessage::SyncStep1(sv))) => {
                        let diff = doc.transact().encode_state_as_update_v1(&sv);
                        let bytes = Message::Sync(SyncMessage::SyncStep2(diff)).encode_v1();
                        let _ = sink.send(WsMessage::binary(bytes)).await;
                    }
                    Ok(Message::Awareness(update)) => {
                        let mut r = shared.lock().unwrap();
                        r.awareness_bytes += bytes.len() as u64;
                        record_awareness(&mut r.awareness, &update);
                    }
                    _ => {}
                }
            }
        }
    }
    let _ = sink.close().await;
    shared.lock().unwrap().doc = Some(doc);
    Ok(())
}

/// One raw HTTP/1.1 exchange on a fresh connection: the status code and the body.
async fn http_once(
    addr: &str,
    head: &str,
    body: &[u8],
    limit: Duration,
) -> Result<(u16, Vec<u8>), String> {
    http_once_from(None, addr, head, body, limit).await
}

/// [`http_once`] from the local address `source` (the system's choice if `None`).
async fn http_once_from(
    source: Option<IpAddr>,
    addr: &str,
    head: &str,
    body: &[u8],
    limit: Duration,
) -> Result<(u16, Vec<u8>), String> {
    let exchange = async {
        let mut s = tcp_connect(addr, source).await?;
        s.write_all(head.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        s.write_all(body).await.map_err(|e| e.to_string())?;
        let mut reader = BufReader::new(s);
        let mut status = String::new();
        reader
            .read_line(&mut status)
            .await
            .map_err(|e| e.to_string())?;
        let code = status
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("no status line ({status:?})"))?;
        let mut rest = Vec::new();
        // A 101 answer, or an answer to HEAD (no body, the connection kept alive), ends at its
        // head: the status is all that is wanted then.
        if code != 101 && !head.starts_with("HEAD ") {
            let _ = reader.read_to_end(&mut rest).await;
        }
        Ok::<_, String>((code, rest))
    };
    tokio::time::timeout(limit, exchange)
        .await
        .map_err(|_| format!("no answer within {limit:?}"))?
}

fn get_head(addr: &str, path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
}

/// A keep-alive HTTP/1.1 connection for many small GETs (answers with a Content-Length).
struct KeepAlive {
    reader: BufReader<TcpStream>,
}

impl KeepAlive {
    async fn open(addr: &str) -> Result<KeepAlive, String> {
        let s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        Ok(KeepAlive {
            reader: BufReader::new(s),
        })
    }

    async fn get(&mut self, addr: &str, path: &str) -> Result<u16, String> {
        let head = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
        self.reader
            .get_mut()
            .write_all(head.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        self.reader
            .read_line(&mut line)
            .await
            .map_err(|e| e.to_string())?;
        let code: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or("no status line")?;
        let mut length = None;
        loop {
            line.clear();
            self.reader
                .read_line(&mut line)
                .await
                .map_err(|e| e.to_string())?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse::<usize>().ok();
                }
            }
        }
        let length = length.ok_or("an answer without Content-Length")?;
        let mut body = vec![0u8; length];
        self.reader
            .read_exact(&mut body)
            .await
            .map_err(|e| e.to_string())?;
        Ok(code)
    }
}

/// A small xorshift generator: random session names need no crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    nanos | 1
}

/// Samples the server's RSS every 100 ms until told to stop; (time, KiB) per sample.
fn spawn_rss_sampler(pid: u32, mut phase: Phase) -> tokio::task::JoinHandle<Vec<(Instant, u64)>> {
    tokio::spawn(async move {
        let mut samples = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Some(kib) = proc_stats::rss_kib(pid) {
                        samples.push((Instant::now(), kib));
                    }
                }
                _ = phase.changed() => if *phase.borrow() >= 2 { break },
            }
        }
        samples
    })
}

/// Polls `/health` every 200 ms (2 s limit each), from `source`, until told to stop.
fn spawn_health_poller(
    addr: String,
    source: Option<IpAddr>,
    mut phase: Phase,
) -> tokio::task::JoinHandle<Vec<(Instant, Result<Duration, String>)>> {
    tokio::spawn(async move {
        let mut samples = Vec::new();
        loop {
            if *phase.borrow() >= 2 {
                break;
            }
            let at = Instant::now();
            let result = match http_once_from(
                source,
                &addr,
                &get_head(&addr, "/health"),
                b"",
                Duration::from_secs(2),
            )
            .await
            {
                Ok((200, _)) => Ok(at.elapsed()),
                Ok((code, _)) => Err(format!("status {code}")),
                Err(e) => Err(e),
            };
            samples.push((at, result));
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = phase.changed() => {}
            }
        }
        samples
    })
}

fn server_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let after = s.get(s.rfind(')')? + 2..)?;
            after.split_whitespace().next().map(|state| state != "Z")
        })
        .unwrap_or(false)
}

fn p99_ms(samples: impl IntoIterator<Item = Duration>) -> Option<f64> {
    let mut l = Latencies::default();
    for d in samples {
        l.record(d);
    }
    l.summary_ms()["p99"].as_f64()
}

fn mib(kib: u64) -> String {
    format!("{:.0}", kib as f64 / 1024.0)
}

async fn run(args: &Args) -> Result<String, String> {
    let tag = seed() % 1_000_000;
    let honest_session = if args.attack.same_session() {
        format!("atk-{tag}")
    } else {
        format!("honest-{tag}")
    };
    let (phase_tx, phase) = watch::channel(0u8);
    let rss = spawn_rss_sampler(args.server_pid, phase.clone());
    let honest = args.honest_source();
    let health = spawn_health_poller(args.addr.clone(), honest, phase.clone());
    let desktop = Arc::new(Mutex::new(DesktopReport::default()));
    let quiet = Arc::new(Mutex::new(DesktopReport::default()));
    let yjs = Arc::new(Mutex::new(YjsReport::default()));
    // In the awareness flood the honest state comes after the attacker's, as in the issue.
    let announce = (args.attack == Attack::AwarenessFlood).then(|| Arc::new(Notify::new()));
    let clients = [
        tokio::spawn(honest_desktop(
            ws_url(args, &format!("/ws/{honest_session}/honest-d")),
            honest,
            true,
            phase.clone(),
            desktop.clone(),
        )),
        tokio::spawn(honest_desktop(
            ws_url(args, &format!("/ws/quiet-{tag}/quiet")),
            honest,
            false,
            phase.clone(),
            quiet.clone(),
        )),
        tokio::spawn(honest_yjs(
            ws_url(args, &format!("/yjs/{honest_session}?user=honest-y")),
            honest,
            phase.clone(),
            yjs.clone(),
            announce.clone(),
        )),
    ];
    // Warm up: the honest clients joined and exchanging before the attack starts.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_before = proc_stats::rss_kib(args.server_pid).unwrap_or(0);
    let start = Instant::now();
    let hold = Duration::from_secs_f64(args.hold);
    let ctx = Ctx {
        args,
        session: honest_session.clone(),
        tag,
        yjs: yjs.clone(),
        desktop: desktop.clone(),
        announce,
    };
    // Every attack ends by itself; this bound is for one that hangs on a dead server.
    let notes = match tokio::time::timeout(hold + Duration::from_secs(90), attack(&ctx)).await {
        Ok(Ok(notes)) => notes,
        Ok(Err(e)) => vec![format!("attack failed: {e}")],
        Err(_) => vec!["attack did not end in time".into()],
    };
    // A short attack still gets a few seconds of measurement around it.
    tokio::time::sleep_until((start + Duration::from_secs(3)).into()).await;
    let end = Instant::now();
    let rss_end = proc_stats::rss_kib(args.server_pid);
    // Drain: honest writes stop, late deliveries arrive.
    let _ = phase_tx.send(1);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let _ = phase_tx.send(2);
    let mut notes = notes;
    for (name, c) in ["honest desktop", "quiet desktop", "honest Yjs"]
        .iter()
        .zip(clients)
    {
        match tokio::time::timeout(Duration::from_secs(5), c).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => notes.push(format!("{name} failed: {e}")),
            _ => notes.push(format!("{name} did not stop")),
        }
    }
    let rss = rss.await.unwrap_or_default();
    let health = health.await.unwrap_or_default();
    let in_window = |at: Instant| at >= start && at <= end;

    let peak = rss.iter().map(|(_, k)| *k).max().unwrap_or(0);
    let hwm = vm_hwm_kib(args.server_pid);
    let mut rss_col = format!(
        "{} → **{}** → {}",
        mib(rss_before),
        mib(peak),
        rss_end.map_or("gone".into(), mib)
    );
    if let Some(hwm) = hwm {
        rss_col.push_str(&format!(" (VmHWM {})", mib(hwm)));
    }
    rss_col.push_str(&match args.budget_mib {
        Some(b) => format!(" / budget {b}"),
        None => " / no budget".into(),
    });

    let window_health: Vec<_> = health.iter().filter(|(at, _)| in_window(*at)).collect();
    let health_failures = window_health.iter().filter(|(_, r)| r.is_err()).count();
    let health_p99 = p99_ms(
        window_health
            .iter()
            .filter_map(|(_, r)| r.as_ref().ok().copied()),
    );
    let health_col = format!(
        "{} ({}/{} failed)",
        fmt_ms(health_p99),
        health_failures,
        window_health.len()
    );

    let ping_col = |r: &Mutex<DesktopReport>| {
        let r = r.lock().unwrap();
        let window: Vec<_> = r.pings.iter().filter(|(at, _)| in_window(*at)).collect();
        let unanswered = window.iter().filter(|(_, d)| d.is_none()).count();
        let p99 = p99_ms(window.iter().filter_map(|(_, d)| *d));
        format!("{} ({unanswered}/{} unanswered)", fmt_ms(p99), window.len())
    };
    let ping_honest = ping_col(&desktop);
    let ping_quiet = ping_col(&quiet);

    let (d, y) = (desktop.lock().unwrap(), yjs.lock().unwrap());
    let yjs_seen: HashSet<String> = y.doc.as_ref().map_or_else(HashSet::new, |doc| {
        let items = doc.get_or_insert_map("items");
        let txn = doc.transact();
        items
            .keys(&txn)
            .filter(|k| k.starts_with("hd-"))
            .map(str::to_owned)
            .collect()
    });
    let lost_d = d.attempted.saturating_sub(yjs_seen.len() as u64);
    let lost_y = y.attempted.saturating_sub(d.seen.len() as u64);
    let lost_col = format!("{} (of {})", lost_d + lost_y, d.attempted + y.attempted);
    for (name, closed) in [
        ("honest desktop", &d.closed),
        ("honest Yjs", &y.closed),
        ("quiet desktop", &quiet.lock().unwrap().closed),
    ] {
        if let Some(c) = closed {
            notes.push(format!("{name}: {c}"));
        }
    }
    if !server_alive(args.server_pid) {
        notes.push("**the server process died**".into());
    }
    Ok(format!(
        "| {} | {rss_col} | {health_col} | {ping_honest} / {ping_quiet} | {lost_col} | {} |",
        args.attack
            .to_possible_value()
            .map_or_else(String::new, |v| v.get_name().to_owned()),
        notes.join("; ").replace('|', "\\|")
    ))
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{v:.1} ms"))
}

fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

struct Ctx<'a> {
    args: &'a Args,
    /// The honest clients' session (the attacker's too for session-level attacks).
    session: String,
    tag: u64,
    yjs: Arc<Mutex<YjsReport>>,
    desktop: Arc<Mutex<DesktopReport>>,
    /// Tells the honest Yjs client to send its awareness state (awareness flood only).
    announce: Option<Arc<Notify>>,
}

async fn attack(ctx: &Ctx<'_>) -> Result<Notes, String> {
    let args = ctx.args;
    let hold = Duration::from_secs_f64(args.hold);
    match args.attack {
        Attack::SlowHeaders => slow_headers(args, 260, hold).await,
        Attack::PartialMessages => partial_messages(ctx, 30, 15 << 20, hold).await,
        Attack::SlowReaders => slow_readers(ctx, 90, 8_000_000, hold).await,
        Attack::BigPosts => big_posts(ctx, 10, 15_000_000, hold).await,
        Attack::AwarenessFlood => awareness_flood(ctx).await,
        Attack::AwarenessNotJson => awareness_not_json(ctx).await,
        Attack::AwarenessOverwrite => awareness_overwrite(ctx).await,
        Attack::BadFields => bad_fields(ctx).await,
        Attack::RandomGets => random_gets(ctx, 30_000, 200, hold).await,
        Attack::DiskFreeze => disk_freeze(ctx).await,
        Attack::ImmutableStore => immutable_store(ctx).await,
        Attack::HeadUpgrade => head_upgrade(args).await,
        Attack::DoubleDecode => double_decode(ctx).await,
    }
}

async fn slow_headers(args: &Args, n: usize, hold: Duration) -> Result<Notes, String> {
    let mut sockets = Vec::with_capacity(n);
    let mut failed = 0;
    for _ in 0..n {
        match TcpStream::connect(&args.addr).await {
            Ok(mut s) => {
                let partial = format!("GET /health HTTP/1.1\r\nHost: {}\r\n", args.addr);
                let _ = s.write_all(partial.as_bytes()).await;
                sockets.push(s);
            }
            Err(_) => failed += 1,
        }
    }
    tokio::time::sleep(hold).await;
    let (mut open, mut closed, mut answered) = (0, 0, 0);
    for s in &mut sockets {
        let mut buf = [0u8; 64];
        match tokio::time::timeout(Duration::from_millis(5), s.read(&mut buf)).await {
            Err(_) => open += 1,
            Ok(Ok(0)) | Ok(Err(_)) => closed += 1,
            Ok(Ok(_)) => answered += 1,
        }
    }
    Ok(vec![format!(
        "{} sockets opened ({failed} refused); after {:.0} s: {open} still open, {closed} closed by the server, {answered} answered",
        sockets.len(),
        hold.as_secs_f64()
    )])
}

async fn partial_messages(
    ctx: &Ctx<'_>,
    n: usize,
    bytes: usize,
    hold: Duration,
) -> Result<Notes, String> {
    let payload = Bytes::from(vec![0u8; bytes]);
    let codes = Arc::new(Mutex::new(BTreeMap::<String, usize>::new()));
    let sent = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..n {
        let url = ws_url(ctx.args, &format!("/yjs/atk-p{}-{i}", ctx.tag));
        let (payload, codes, sent) = (payload.clone(), codes.clone(), sent.clone());
        tasks.push(tokio::spawn(async move {
            let ws = match connect_unlimited(&url).await {
                Ok(ws) => ws,
                Err(e) => {
                    *codes
                        .lock()
                        .unwrap()
                        .entry(format!("connect failed: {e}"))
                        .or_default() += 1;
                    return;
                }
            };
            let (mut sink, mut stream) = ws.split();
            let reader = {
                let codes = codes.clone();
                tokio::spawn(async move {
                    while let Some(frame) = stream.next().await {
                        match frame {
                            Ok(WsMessage::Close(c)) => {
                                let code = c.map_or("close".into(), |c| {
                                    format!("close {}", u16::from(c.code))
                                });
                                *codes.lock().unwrap().entry(code).or_default() += 1;
                                return;
                            }
                            Ok(_) => {}
                            Err(_) => break,
                        }
                    }
                    *codes.lock().unwrap().entry("dropped".into()).or_default() += 1;
                })
            };
            // The first fragment of a binary message that never gets its final one.
            let frame = Frame::message(payload, OpCode::Data(Data::Binary), false);
            if sink.send(WsMessage::Frame(frame)).await.is_ok() {
                sent.fetch_add(1, Ordering::Relaxed);
            }
            let until = Instant::now() + hold;
            while Instant::now() < until {
                tokio::time::sleep(Duration::from_secs(5).min(until - Instant::now())).await;
                if sink.send(WsMessage::Ping(Bytes::new())).await.is_err() {
                    break;
                }
            }
            reader.abort();
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let codes = codes.lock().unwrap();
    Ok(vec![format!(
        "{n} connections, {} sent their {} MiB fragment; held {:.0} s with pings; server closed: {}",
        sent.load(Ordering::Relaxed),
        bytes >> 20,
        hold.as_secs_f64(),
        summary(&codes)
    )])
}

fn summary(counts: &BTreeMap<String, usize>) -> String {
    if counts.is_empty() {
        return "none".into();
    }
    counts
        .iter()
        .map(|(k, v)| format!("{v}× {k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A Yjs update that fills `items` with `target` bytes of strings (in 8,000-byte fields).
fn big_update(target: usize, prefix: &str) -> Vec<u8> {
    let doc = Doc::new();
    let items = doc.get_or_insert_map("items");
    let mut rng = Rng(seed());
    let mut txn = doc.transact_mut();
    let field = 8_000;
    for i in 0..target.div_ceil(field) {
        // Printable noise: a document of repeated bytes would flatter any compression.
        let blob: String = (0..field)
            .map(|_| char::from(b'a' + (rng.next() % 26) as u8))
            .collect();
        let fields: MapPrelim = [
            ("item_type".to_owned(), yrs::Any::from("component")),
            ("blob".to_owned(), yrs::Any::from(blob)),
        ]
        .into_iter()
        .collect();
        items.insert(&mut txn, format!("{prefix}-{i}"), fields);
    }
    txn.encode_update_v1()
}

async fn slow_readers(
    ctx: &Ctx<'_>,
    n: usize,
    doc_bytes: usize,
    hold: Duration,
) -> Result<Notes, String> {
    let url = ws_url(ctx.args, &format!("/yjs/atk-big-{}", ctx.tag));
    let update = big_update(doc_bytes, "atk-blob");
    let size = update.len();
    // Preload, then a SyncStep1 whose answer comes after the update was applied.
    let mut loader = connect_unlimited(&url).await?;
    let doc = Doc::new();
    yjs_client::handshake(&mut loader, &doc, false).await?;
    yjs_client::send_sync(&mut loader, SyncMessage::Update(update)).await?;
    yjs_client::send_sync(
        &mut loader,
        SyncMessage::SyncStep1(doc.transact().state_vector()),
    )
    .await?;
    loop {
        match loader.next().await {
            Some(Ok(WsMessage::Binary(b))) => {
                if let Ok(Message::Sync(SyncMessage::SyncStep2(_))) = Message::decode_v1(&b) {
                    break;
                }
            }
            Some(Ok(_)) => {}
            _ => return Err("the loader was closed during preload".into()),
        }
    }
    let _ = loader.close(None).await;
    let mut readers = Vec::new();
    let mut failed = 0;
    let empty = Message::Sync(SyncMessage::SyncStep1(yrs::StateVector::default())).encode_v1();
    for _ in 0..n {
        match connect_unlimited(&url).await {
            Ok(mut ws) => {
                // Asks for the whole document, then never reads.
                let _ = ws.send(WsMessage::binary(empty.clone())).await;
                readers.push(ws);
            }
            Err(_) => failed += 1,
        }
    }
    // Traffic on the document while they do not read: what their queues must hold.
    let writer = spawn_writer(url, Instant::now() + hold);
    tokio::time::sleep(hold).await;
    let written = writer.await.map_err(|e| e.to_string())?;
    drop(readers);
    Ok(vec![format!(
        "{:.1} MB document; {} readers joined ({failed} failed), asked for the whole state, never read; held {:.0} s while a writer sent 20 small updates/s ({})",
        size as f64 / 1e6,
        n - failed,
        hold.as_secs_f64(),
        match written {
            Ok(n) => format!("{n} sent"),
            Err(e) => format!("writer: {e}"),
        }
    )])
}

async fn big_posts(ctx: &Ctx<'_>, n: usize, bytes: usize, hold: Duration) -> Result<Notes, String> {
    let addr = ctx.args.addr.clone();
    let mut tasks = Vec::new();
    for i in 0..n {
        let body = big_update(bytes, &format!("atk-post-{i}"));
        let addr = addr.clone();
        let path = format!("/api/sessions/atk-post-{}-{i}/update", ctx.tag);
        tasks.push(tokio::spawn(async move {
            let head = format!(
                "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            match http_once(&addr, &head, &body, Duration::from_secs(60)).await {
                Ok((code, _)) => format!("{code}"),
                Err(e) => e,
            }
        }));
    }
    let mut results = BTreeMap::<String, usize>::new();
    let started = Instant::now();
    for t in tasks {
        *results
            .entry(t.await.unwrap_or_else(|e| e.to_string()))
            .or_default() += 1;
    }
    let took = started.elapsed();
    // RSS is still sampled while nothing else happens: what the server keeps afterwards.
    tokio::time::sleep(hold.saturating_sub(took)).await;
    Ok(vec![format!(
        "{n} × {:.0} MB POSTs in {:.1} s: {}; RSS \"end\" is {:.0} s later",
        bytes as f64 / 1e6,
        took.as_secs_f64(),
        summary(&results),
        hold.saturating_sub(took).as_secs_f64()
    )])
}

/// Joins a session as a Yjs client and watches for `watch`: whether it synced (or how it was
/// closed, after how many bytes) and the awareness entries it received.
async fn observe(url: &str, watch: Duration) -> (String, HashMap<u64, (u32, String)>) {
    let mut awareness = HashMap::new();
    let mut ws = match connect_unlimited(url).await {
        Ok(ws) => ws,
        Err(e) => return (format!("could not connect: {e}"), awareness),
    };
    let started = Instant::now();
    let sv = Doc::new().transact().state_vector();
    if ws
        .send(WsMessage::binary(
            Message::Sync(SyncMessage::SyncStep1(sv)).encode_v1(),
        ))
        .await
        .is_err()
    {
        return ("could not send its SyncStep1".into(), awareness);
    }
    let mut bytes = 0usize;
    let mut synced = None;
    let until = tokio::time::Instant::now() + watch;
    let outcome = loop {
        let frame = match tokio::time::timeout_at(until, ws.next()).await {
            Err(_) => {
                break match synced {
                    Some(t) => format!("synced after {:.0} ms", t * 1e3),
                    None => format!(
                        "not synced after {:.0} s ({bytes} bytes)",
                        watch.as_secs_f64()
                    ),
                }
            }
            Ok(f) => f,
        };
        match frame {
            Some(Ok(WsMessage::Binary(b))) => {
                bytes += b.len();
                match Message::decode_v1(&b) {
                    Ok(Message::Sync(SyncMessage::SyncStep2(_))) => {
                        synced.get_or_insert(started.elapsed().as_secs_f64());
                    }
                    Ok(Message::Awareness(u)) => record_awareness(&mut awareness, &u),
                    _ => {}
                }
            }
            Some(Ok(WsMessage::Close(c))) => {
                break format!(
                    "closed {} after {bytes} bytes{}",
                    c.map_or("without code".into(), |c| u16::from(c.code).to_string()),
                    if synced.is_some() {
                        " (had synced)"
                    } else {
                        ", never synced"
                    }
                )
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => break format!("error after {bytes} bytes: {e}"),
            None => break format!("dropped after {bytes} bytes"),
        }
    };
    let _ = ws.close(None).await;
    (outcome, awareness)
}

async fn awareness_flood(ctx: &Ctx<'_>) -> Result<Notes, String> {
    let url = ws_url(ctx.args, &format!("/yjs/{}?user=atk", ctx.session));
    let mut ws = connect_unlimited(&url).await?;
    yjs_client::handshake(&mut ws, &Doc::new(), false).await?;
    // Each state exactly at the per-state bound (64 KiB of JSON).
    let state = |id: u64| {
        let head = format!(r#"{{"user":{{"name":"atk-{id}","pad":""#);
        format!("{head}{}\"}}}}", "x".repeat(64 * 1024 - head.len() - 3))
    };
    let mut refused = None;
    // Batches of 16 states, then single ones: a batch that would pass the session's count
    // bound may be refused whole, and the attacker fills the session up to it.
    let ids: Vec<u64> = (1_000_000..1_001_024).collect();
    let batches = ids[..1008].chunks(16).chain(ids[1008..].chunks(1));
    for batch in batches {
        let entries = batch.iter().map(|&id| (id, 1, state(id)));
        if let Err(e) = ws.send(WsMessage::binary(awareness_message(entries))).await {
            refused = Some(e.to_string());
            break;
        }
    }
    // Reads what the server says back (an error or a close) for a moment.
    let mut closed = None;
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        while let Some(frame) = ws.next().await {
            if let Ok(WsMessage::Close(c)) = frame {
                closed = Some(c.map_or("close".into(), |c| format!("close {}", u16::from(c.code))));
                break;
            }
        }
    })
    .await;
    if let Some(n) = &ctx.announce {
        n.notify_one();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let joiner = ws_url(ctx.args, &format!("/yjs/{}?user=late", ctx.session));
    let (outcome, seen) = observe(&joiner, Duration::from_secs(15)).await;
    let (honest_bytes, honest_id) = {
        let y = ctx.yjs.lock().unwrap();
        (y.awareness_bytes, y.client_id)
    };
    let attackers = seen
        .keys()
        .filter(|id| (1_000_000..1_001_024).contains(*id))
        .count();
    Ok(vec![
        format!(
            "1,024 states × 64 KiB sent{}; attacker: {}",
            refused.map_or(String::new(), |e| format!(" (send failed: {e})")),
            closed.unwrap_or_else(|| "kept".into())
        ),
        format!(
            "later Yjs joiner: {outcome}, {} awareness states received ({attackers} of the attacker's; the honest client's announced after the flood: {})",
            seen.len(),
            if seen.contains_key(&honest_id) { "present" } else { "**absent**" }
        ),
        format!(
            "honest Yjs client received {:.1} MB of awareness",
            honest_bytes as f64 / 1e6
        ),
    ])
}

async fn awareness_not_json(ctx: &Ctx<'_>) -> Result<Notes, String> {
    let url = ws_url(ctx.args, &format!("/yjs/{}?user=atk", ctx.session));
    let mut ws = connect_unlimited(&url).await?;
    yjs_client::handshake(&mut ws, &Doc::new(), false).await?;
    let id = 2_000_001u64;
    let bad = "not json {".to_owned();
    ws.send(WsMessage::binary(awareness_message([(id, 1, bad.clone())])))
        .await
        .map_err(|e| e.to_string())?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let relayed = ctx.yjs.lock().unwrap().awareness.get(&id).cloned();
    let joiner = ws_url(ctx.args, &format!("/yjs/{}?user=late", ctx.session));
    let (outcome, seen) = observe(&joiner, Duration::from_secs(3)).await;
    let _ = ws.close(None).await;
    Ok(vec![
        format!(
            "state {bad:?}: relayed to the honest Yjs client: {}",
            match relayed {
                Some((_, s)) => format!("**yes** ({s:?})"),
                None => "no".into(),
            }
        ),
        format!(
            "in a later joiner's awareness: {} (joiner {outcome})",
            if seen.contains_key(&id) {
                "**yes**"
            } else {
                "no"
            }
        ),
    ])
}

async fn awareness_overwrite(ctx: &Ctx<'_>) -> Result<Notes, String> {
    let victim = ctx.yjs.lock().unwrap().client_id;
    if victim == 0 {
        return Err("the honest Yjs client has not joined".into());
    }
    let url = ws_url(ctx.args, &format!("/yjs/{}?user=atk", ctx.session));
    let mut ws = connect_unlimited(&url).await?;
    yjs_client::handshake(&mut ws, &Doc::new(), false).await?;
    let joiner = ws_url(ctx.args, &format!("/yjs/{}?user=late", ctx.session));
    let (_, before) = observe(&joiner, Duration::from_secs(2)).await;
    let evil = r#"{"user":{"name":"evil"}}"#.to_owned();
    ws.send(WsMessage::binary(awareness_message([(victim, 100, evil)])))
        .await
        .map_err(|e| e.to_string())?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (_, after) = observe(&joiner, Duration::from_secs(2)).await;
    ws.send(WsMessage::binary(awareness_message([(
        victim,
        101,
        "null".to_owned(),
    )])))
    .await
    .map_err(|e| e.to_string())?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (_, removed) = observe(&joiner, Duration::from_secs(2)).await;
    let _ = ws.close(None).await;
    let show = |m: &HashMap<u64, (u32, String)>| {
        m.get(&victim)
            .map_or("absent".into(), |(clock, s)| format!("clock {clock} {s}"))
    };
    let overwritten = after.get(&victim).is_some_and(|(_, s)| s.contains("evil"));
    let gone = removed.get(&victim).is_none_or(|(_, s)| s == "null");
    Ok(vec![
        format!("honest entry before: {}", show(&before)),
        format!(
            "after another client overwrote it: {} ({})",
            if overwritten {
                "**overwritten**"
            } else {
                "kept"
            },
            show(&after)
        ),
        format!(
            "after it removed it: {} ({})",
            if gone { "**removed**" } else { "kept" },
            show(&removed)
        ),
    ])
}

/// Sends one desktop message and waits for the `pong` of a ping sent after it: the session has
/// handled the message then. Returns the error codes received meanwhile.
async fn send_and_settle(ws: &mut Ws, msg: &Value) -> Result<Vec<String>, String> {
    ws.send(WsMessage::text(msg.to_string()))
        .await
        .map_err(|e| e.to_string())?;
    ws.send(WsMessage::text(r#"{"type":"ping"}"#))
        .await
        .map_err(|e| e.to_string())?;
    let mut errors = Vec::new();
    let wait = async {
        while let Some(frame) = ws.next().await {
            let Ok(WsMessage::Text(t)) = frame else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<Value>(&t) else {
                continue;
            };
            match v["type"].as_str() {
                Some("pong") => return Ok(()),
                Some("error") => errors.push(v["code"].as_str().unwrap_or("?").to_owned()),
                _ => {}
            }
        }
        Err("closed".to_owned())
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .map_err(|_| "no pong within 10 s".to_owned())??;
    Ok(errors)
}

async fn scene_field(ctx: &Ctx<'_>, session: &str, item: &str, field: &str) -> String {
    let addr = &ctx.args.addr;
    match http_once(
        addr,
        &get_head(addr, &format!("/api/sessions/{session}/scene")),
        b"",
        Duration::from_secs(10),
    )
    .await
    {
        Ok((200, body)) => {
            let v: Value = serde_json::from_slice(http_body(&body)).unwrap_or(Value::Null);
            let items = v["items"].as_array().cloned().unwrap_or_default();
            items
                .iter()
                .find(|i| i["item_uuid"] == item || i["item_id"] == item || i["id"] == item)
                .map_or("item absent".into(), |i| {
                    let data = if i["data"].is_object() { &i["data"] } else { i };
                    data[field].to_string()
                })
        }
        Ok((code, _)) => format!("status {code}"),
        Err(e) => e,
    }
}

/// The body of a raw HTTP answer read whole (after the blank line ending the head).
fn http_body(raw: &[u8]) -> &[u8] {
    raw.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(raw, |i| &raw[i + 4..])
}

async fn bad_fields(ctx: &Ctx<'_>) -> Result<Notes, String> {
    let url = ws_url(ctx.args, &format!("/ws/{}/atk-d", ctx.session));
    let mut ws = connect_unlimited(&url).await?;
    let item = format!("atk-item-{}", ctx.tag);
    let data = |x: Value| json!({"item_uuid": item, "name": "victim", "x_mm": x, "y_mm": 0.0, "angle_deg": 0.0});
    let add = json!({"type": "command", "command": {"action": "add_item", "item_type": "component", "item_id": item, "data": data(json!(1.0))}});
    send_and_settle(&mut ws, &add).await?;
    let mut notes = Vec::new();
    for x in [json!("abc"), Value::Null, json!([1, 2])] {
        let mv = json!({"type": "command", "command": {"action": "move_item", "item_type": "component", "item_id": item, "data": data(x.clone())}});
        let errors = send_and_settle(&mut ws, &mv).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let desktop = ctx
            .desktop
            .lock()
            .unwrap()
            .atk_data
            .get(&item)
            .map_or("nothing".into(), |d| d["x_mm"].to_string());
        let stored = scene_field(ctx, &ctx.session, &item, "x_mm").await;
        notes.push(format!(
            "x_mm {x}: sender got {}; scene holds {stored}; honest desktop last got {desktop}",
            if errors.is_empty() {
                "no error".into()
            } else {
                errors.join(",")
            },
        ));
    }
    let _ = ws.close(None).await;
    Ok(notes)
}

fn count_rows(db: &Path) -> String {
    match std::process::Command::new("sqlite3")
        .arg(db)
        .arg("SELECT count(*) FROM sessions")
        .output()
    {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        Ok(out) => format!("? ({})", String::from_utf8_lossy(&out.stderr).trim()),
        Err(e) => format!("? (sqlite3: {e})"),
    }
}

async fn random_gets(
    ctx: &Ctx<'_>,
    gets: usize,
    joins: usize,
    hold: Duration,
) -> Result<Notes, String> {
    let db = ctx.args.data_dir.join("collab.db");
    let rows_before = count_rows(&db);
    let done = Arc::new(AtomicU64::new(0));
    let statuses = Arc::new(Mutex::new(BTreeMap::<String, usize>::new()));
    let started = Instant::now();
    let until = started + hold;
    let workers = 16;
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (addr, done, statuses) = (ctx.args.addr.clone(), done.clone(), statuses.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(seed() ^ ((w as u64 + 1) * 0x9E37_79B9_7F4A_7C15));
            let mut conn: Option<KeepAlive> = None;
            while Instant::now() < until {
                if done.fetch_add(1, Ordering::Relaxed) >= gets as u64 {
                    done.fetch_sub(1, Ordering::Relaxed);
                    break;
                }
                if conn.is_none() {
                    conn = KeepAlive::open(&addr).await.ok();
                }
                let path = format!("/api/sessions/rnd-{:016x}/update", rng.next());
                let result = match conn.as_mut() {
                    Some(c) => {
                        match tokio::time::timeout(Duration::from_secs(5), c.get(&addr, &path))
                            .await
                        {
                            Ok(r) => r,
                            Err(_) => Err("timeout".into()),
                        }
                    }
                    None => Err("connect failed".into()),
                };
                let key = match result {
                    Ok(code) => code.to_string(),
                    Err(e) => {
                        conn = None;
                        e
                    }
                };
                *statuses.lock().unwrap().entry(key).or_default() += 1;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let took = started.elapsed();
    let mut rng = Rng(seed());
    let mut joined = 0;
    for _ in 0..joins {
        let url = ws_url(ctx.args, &format!("/ws/rnd-ws-{:016x}/u", rng.next()));
        if let Ok(mut ws) = connect_unlimited(&url).await {
            joined += 1;
            let _ = ws.close(None).await;
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Read as an observer would, not as the attacker (whose API rate is spent).
    let in_memory = match http_once_from(
        ctx.args.honest_source(),
        &ctx.args.addr,
        &get_head(&ctx.args.addr, "/api/sessions"),
        b"",
        Duration::from_secs(10),
    )
    .await
    {
        Ok((200, body)) => serde_json::from_slice::<Value>(http_body(&body))
            .ok()
            .and_then(|v| {
                v.as_array()
                    .map(Vec::len)
                    .or_else(|| v["sessions"].as_array().map(Vec::len))
            })
            .map_or("?".into(), |n| n.to_string()),
        _ => "?".into(),
    };
    Ok(vec![
        format!(
            "{} GETs of random sessions' /update in {:.1} s: {}",
            done.load(Ordering::Relaxed),
            took.as_secs_f64(),
            summary(&statuses.lock().unwrap())
        ),
        format!(
            "then {joined} WS joins of random sessions; rows in `sessions`: {rows_before} → {} (live); sessions in memory: {in_memory}",
            count_rows(&db)
        ),
    ])
}

/// A Yjs client writing small updates to its own session until `stop` (for the disk attacks:
/// a session that writes, while the honest ones are measured).
fn spawn_writer(url: String, stop: Instant) -> tokio::task::JoinHandle<Result<u64, String>> {
    tokio::spawn(async move {
        let mut ws = connect_unlimited(&url).await?;
        let doc = Doc::new();
        let items = doc.get_or_insert_map("items");
        yjs_client::handshake(&mut ws, &doc, false).await?;
        let (mut sink, mut stream) = ws.split();
        let drain = tokio::spawn(async move { while stream.next().await.is_some() {} });
        let mut n = 0u64;
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        while Instant::now() < stop {
            tick.tick().await;
            n += 1;
            let update = {
                let mut txn = doc.transact_mut();
                items.insert(&mut txn, format!("w-{}", n % 50), n as f64);
                txn.encode_update_v1()
            };
            let bytes = Message::Sync(SyncMessage::Update(update)).encode_v1();
            if sink.send(WsMessage::binary(bytes)).await.is_err() {
                break;
            }
        }
        drain.abort();
        Ok(n)
    })
}

fn run_tool(program: &str, args: &[&str]) -> String {
    match std::process::Command::new(program).args(args).output() {
        Ok(out) if out.status.success() => "ok".into(),
        Ok(out) => format!(
            "failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .trim()
                .replace('\n', " ")
        ),
        Err(e) => format!("failed: {e}"),
    }
}

async fn disk_freeze(ctx: &Ctx<'_>) -> Result<Notes, String> {
    let mount = ctx
        .args
        .mount
        .as_ref()
        .ok_or("--mount is required")?
        .to_string_lossy()
        .into_owned();
    let frozen_for = Duration::from_secs(8);
    let writer = spawn_writer(
        ws_url(ctx.args, &format!("/yjs/atk-w-{}", ctx.tag)),
        Instant::now() + Duration::from_secs(3) + frozen_for + Duration::from_secs(4),
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    // fsfreeze blocks while it flushes: off the runtime so the honest clients keep measuring.
    let m = mount.clone();
    let freeze = tokio::task::spawn_blocking(move || run_tool("fsfreeze", &["-f", &m]))
        .await
        .unwrap_or_else(|e| e.to_string());
    tokio::time::sleep(frozen_for).await;
    let m = mount.clone();
    let thaw = tokio::task::spawn_blocking(move || run_tool("fsfreeze", &["-u", &m]))
        .await
        .unwrap_or_else(|e| e.to_string());
    let written = writer.await.map_err(|e| e.to_string())?;
    Ok(vec![format!(
        "ext4 loop mount frozen {:.0} s (freeze {freeze}, thaw {thaw}) while another session wrote 20 updates/s ({})",
        frozen_for.as_secs_f64(),
        match written {
            Ok(n) => format!("{n} sent"),
            Err(e) => format!("writer: {e}"),
        }
    )])
}

async fn immutable_store(ctx: &Ctx<'_>) -> Result<Notes, String> {
    let dir = ctx.args.data_dir.clone();
    let until = Instant::now() + Duration::from_secs(15);
    let writer = spawn_writer(ws_url(ctx.args, &format!("/yjs/atk-w-{}", ctx.tag)), until);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let files: Vec<String> = std::fs::read_dir(&dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path().to_string_lossy().into_owned())
        .filter(|p| p.contains("collab.db"))
        .collect();
    let mut chattr_args = vec!["+i"];
    chattr_args.extend(files.iter().map(String::as_str));
    let set = run_tool("chattr", &chattr_args);
    let written = writer.await.map_err(|e| e.to_string())?;
    // The writer may have been closed early: the honest clients are still measured to the end.
    tokio::time::sleep_until(until.into()).await;
    let alive = server_alive(ctx.args.server_pid);
    chattr_args[0] = "-i";
    let unset = run_tool("chattr", &chattr_args);
    let names: Vec<_> = files
        .iter()
        .filter_map(|f| {
            Path::new(f)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .collect();
    Ok(vec![format!(
        "chattr +i {} ({set}; -i afterwards {unset}) while another session wrote 20 updates/s ({}); server alive after: {}",
        names.join(" "),
        match written {
            Ok(n) => format!("{n} sent"),
            Err(e) => format!("writer: {e}"),
        },
        if alive { "yes" } else { "**no**" }
    )])
}

async fn head_upgrade(args: &Args) -> Result<Notes, String> {
    let head = format!(
        "HEAD /yjs/x HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        args.addr
    );
    let status = match http_once(&args.addr, &head, b"", Duration::from_secs(5)).await {
        Ok((code, _)) => code.to_string(),
        Err(e) => e,
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(vec![format!(
        "`HEAD /yjs/x` with upgrade headers → {status}"
    )])
}

async fn double_decode(ctx: &Ctx<'_>) -> Result<Notes, String> {
    // The session named `a%41`-{tag}: `%25` is the escaped `%`.
    let raw = format!("a%2541-{}", ctx.tag);
    let mut ws = connect_unlimited(&ws_url(ctx.args, &format!("/ws/{raw}/atk"))).await?;
    let item = format!("dd-{}", ctx.tag);
    let add = json!({"type": "command", "command": {"action": "add_item", "item_type": "component", "item_id": item,
        "data": {"item_uuid": item, "name": "marker", "x_mm": 1.0, "y_mm": 0.0, "angle_deg": 0.0}}});
    send_and_settle(&mut ws, &add).await?;
    let seen = scene_field(ctx, &raw, &item, "x_mm").await;
    let _ = ws.close(None).await;
    let same = !seen.contains("absent") && !seen.starts_with("status");
    Ok(vec![format!(
        "item added over `/ws/{raw}/…` (session `a%41-{}`); `GET /api/sessions/{raw}/scene`: {} ({seen})",
        ctx.tag,
        if same { "same session" } else { "**another session**" }
    )])
}

/// Records why an honest client's stream ended: a close frame's code wins over an error or the
/// end of the stream that follows it.
fn record_end(
    closed: &mut Option<String>,
    frame: Option<Result<WsMessage, tokio_tungstenite::tungstenite::Error>>,
) {
    match frame {
        Some(Ok(WsMessage::Close(c))) => {
            *closed = Some(c.map_or("close without code".into(), |c| {
                format!("close {}", u16::from(c.code))
            }));
        }
        Some(Err(e)) => {
            closed.get_or_insert(format!("error: {e}"));
        }
        _ => {
            closed.get_or_insert("closed".into());
        }
    }
}
