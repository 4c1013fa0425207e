//! The simulated clients: y-websocket (a real yrs document per client) and Optiverse JSON.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Map, Value};
use tokio::net::TcpStream;
use tokio::sync::{Barrier, Notify};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use yrs::sync::{Message, SyncMessage};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{Any, Doc, Map as _, MapPrelim, MapRef, Out, ReadTxn, Transact, Update};

use crate::stats::Latencies;

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Time since the run started; every client shares it, so a send time written by one client
/// is meaningful to another.
#[derive(Debug, Clone, Copy)]
pub struct Clock(Instant);

impl Default for Clock {
    /// A clock starting now.
    fn default() -> Clock {
        Clock::new()
    }
}

impl Clock {
    pub fn new() -> Clock {
        Clock(Instant::now())
    }
    pub fn now(&self) -> Duration {
        self.0.elapsed()
    }
}

#[derive(Debug, Default)]
pub struct Counters {
    pub sent: AtomicU64,
    pub delivered: AtomicU64,
    pub sent_in_window: AtomicU64,
    pub delivered_in_window: AtomicU64,
}

pub struct ClientConfig {
    pub url: String,
    pub item_id: String,
    pub rate: f64,
    pub apply: bool,
    pub window: (Duration, Duration),
    pub drain: Duration,
    pub fixture: Map<String, Value>,
}

/// A send-time marker: `@`, 8-digit sender, 20-digit nanoseconds, `#`. It travels as a string
/// field value, whose bytes appear verbatim inside the Yjs update.
fn marker(sender: u32, at: Duration) -> String {
    format!("@{sender:08}{:020}#", at.as_nanos())
}

/// Every marker in `bytes` from a sender other than `me`: (send time).
fn markers(bytes: &[u8], me: u32) -> impl Iterator<Item = Duration> + '_ {
    const LEN: usize = 30;
    bytes.windows(LEN).filter_map(move |w| {
        if w[0] != b'@' || w[LEN - 1] != b'#' || !w[1..LEN - 1].iter().all(u8::is_ascii_digit) {
            return None;
        }
        let digits = std::str::from_utf8(&w[1..LEN - 1]).ok()?;
        let sender: u32 = digits[..8].parse().ok()?;
        let nanos: u64 = digits[8..].parse().ok()?;
        (sender != me).then(|| Duration::from_nanos(nanos))
    })
}

static NEXT_SENDER: AtomicU64 = AtomicU64::new(1);

pub async fn connect(url: &str) -> Result<Ws, String> {
    let (ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .map_err(|e| format!("connect {url}: {e}"))?;
    Ok(ws)
}

pub async fn send_sync(ws: &mut Ws, msg: SyncMessage) -> Result<(), String> {
    let bytes = Message::Sync(msg).encode_v1();
    ws.send(WsMessage::binary(bytes))
        .await
        .map_err(|e| e.to_string())
}

pub fn apply(doc: &Doc, update: &[u8]) -> Result<(), String> {
    let update = Update::decode_v1(update).map_err(|e| e.to_string())?;
    doc.transact_mut()
        .apply_update(update)
        .map_err(|e| e.to_string())
}

/// The y-websocket handshake: answer the server's SyncStep1, send ours, apply its SyncStep2.
/// Returns the size of the SyncStep2 payload.
pub async fn handshake(ws: &mut Ws, doc: &Doc, apply_state: bool) -> Result<usize, String> {
    let sv = doc.transact().state_vector();
    send_sync(ws, SyncMessage::SyncStep1(sv)).await?;
    let (mut answered, mut synced) = (false, None);
    while !(answered && synced.is_some()) {
        let frame = ws
            .next()
            .await
            .ok_or("closed during handshake")?
            .map_err(|e| e.to_string())?;
        let WsMessage::Binary(bytes) = frame else {
            continue;
        };
        match Message::decode_v1(&bytes) {
            Ok(Message::Sync(SyncMessage::SyncStep1(sv))) => {
                let diff = doc.transact().encode_state_as_update_v1(&sv);
                send_sync(ws, SyncMessage::SyncStep2(diff)).await?;
                answered = true;
            }
            Ok(Message::Sync(SyncMessage::SyncStep2(update))) => {
                if apply_state {
                    apply(doc, &update)?;
                }
                synced = Some(update.len());
            }
            Ok(Message::Sync(SyncMessage::Update(update))) if apply_state => apply(doc, &update)?,
            _ => {}
        }
    }
    Ok(synced.unwrap_or(0))
}

fn to_any(v: &Value) -> Any {
    match v {
        Value::Null => Any::Null,
        Value::Bool(b) => Any::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Any::from(i as f64),
            None => Any::from(n.as_f64().unwrap_or(0.0)),
        },
        Value::String(s) => Any::from(s.as_str()),
        Value::Array(a) => Any::Array(a.iter().map(to_any).collect()),
        Value::Object(m) => Any::Map(Arc::new(
            m.iter().map(|(k, v)| (k.clone(), to_any(v))).collect(),
        )),
    }
}

fn insert_item(
    txn: &mut yrs::TransactionMut,
    items: &MapRef,
    id: &str,
    fields: &Map<String, Value>,
) {
    let prelim: MapPrelim = fields.iter().map(|(k, v)| (k.clone(), to_any(v))).collect();
    items.insert(txn, id, prelim);
}

/// A y-websocket client that edits its own item `rate` times a second and measures how long
/// the others' edits take to reach it.
pub async fn run_fanout(
    config: ClientConfig,
    clock: Clock,
    counters: Arc<Counters>,
    ready: Arc<Barrier>,
) -> Result<Latencies, String> {
    let me = NEXT_SENDER.fetch_add(1, Ordering::Relaxed) as u32;
    let setup = async {
        let mut ws = connect(&config.url).await?;
        let doc = Doc::new();
        let items = doc.get_or_insert_map("items");
        handshake(&mut ws, &doc, config.apply).await?;
        let update = {
            let mut txn = doc.transact_mut();
            let mut fields = config.fixture.clone();
            fields.insert("item_uuid".into(), json!(config.item_id));
            fields.insert("t".into(), json!(marker(me, clock.now())));
            insert_item(&mut txn, &items, &config.item_id, &fields);
            txn.encode_update_v1()
        };
        send_sync(&mut ws, SyncMessage::Update(update)).await?;
        Ok::<_, String>((ws, doc, items))
    };
    let setup = setup.await;
    ready.wait().await;
    let (ws, doc, items) = setup?;
    let (mut sink, mut stream) = ws.split();
    let mut latencies = Latencies::default();
    let period = Duration::from_secs_f64(1.0 / config.rate);
    let offset = Duration::from_nanos(u64::from(me) * 7_919_993 % period.as_nanos().max(1) as u64);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
    let end_send = config.window.1;
    let end = config.window.1 + config.drain;
    let mut x = 0.0f64;
    loop {
        let now = clock.now();
        if now >= end {
            break;
        }
        tokio::select! {
            _ = tick.tick(), if now < end_send => {
                let at = clock.now();
                x += 1.0;
                let update = {
                    let mut txn = doc.transact_mut();
                    if let Some(Out::YMap(item)) = items.get(&txn, &config.item_id) {
                        item.insert(&mut txn, "x_mm", x);
                        item.insert(&mut txn, "t", marker(me, at));
                    }
                    txn.encode_update_v1()
                };
                let bytes = Message::Sync(SyncMessage::Update(update)).encode_v1();
                sink.send(WsMessage::binary(bytes)).await.map_err(|e| e.to_string())?;
                counters.sent.fetch_add(1, Ordering::Relaxed);
                if at >= config.window.0 && at < config.window.1 {
                    counters.sent_in_window.fetch_add(1, Ordering::Relaxed);
                }
            }
            frame = stream.next() => {
                let Some(frame) = frame else { return Err("server closed the connection".into()) };
                let WsMessage::Binary(bytes) = frame.map_err(|e| e.to_string())? else { continue };
                if config.apply {
                    if let Ok(Message::Sync(SyncMessage::Update(u) | SyncMessage::SyncStep2(u))) = Message::decode_v1(&bytes) {
                        apply(&doc, &u)?;
                    }
                }
                let received = clock.now();
                for at in markers(&bytes, me) {
                    counters.delivered.fetch_add(1, Ordering::Relaxed);
                    if at >= config.window.0 && at < config.window.1 {
                        counters.delivered_in_window.fetch_add(1, Ordering::Relaxed);
                        latencies.record(received.saturating_sub(at));
                    }
                }
            }
            _ = tokio::time::sleep(end.saturating_sub(now)) => break,
        }
    }
    let _ = sink.close().await;
    Ok(latencies)
}

/// An Optiverse JSON client that drags its own item (`move_item`) `rate` times a second; the
/// send time travels as `x_mm` (nanoseconds since the run started).
pub async fn run_legacy_fanout(
    config: ClientConfig,
    clock: Clock,
    counters: Arc<Counters>,
    ready: Arc<Barrier>,
) -> Result<Latencies, String> {
    let setup = async {
        let mut ws = connect(&config.url).await?;
        let mut fields = config.fixture.clone();
        fields.insert("item_uuid".into(), json!(config.item_id));
        let item_type = fields.get("_type").cloned().unwrap_or(json!("component"));
        let add = json!({"type": "command", "command": {"action": "add_item", "item_type": item_type, "item_id": config.item_id, "data": fields}});
        ws.send(WsMessage::text(add.to_string()))
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>((ws, fields, item_type))
    };
    let setup = setup.await;
    ready.wait().await;
    let (ws, mut fields, item_type) = setup?;
    let (mut sink, mut stream) = ws.split();
    let mut latencies = Latencies::default();
    let period = Duration::from_secs_f64(1.0 / config.rate);
    let mut tick = tokio::time::interval(period);
    let end_send = config.window.1;
    let end = config.window.1 + config.drain;
    loop {
        let now = clock.now();
        if now >= end {
            break;
        }
        tokio::select! {
            _ = tick.tick(), if now < end_send => {
                let at = clock.now();
                fields.insert("x_mm".into(), json!(at.as_nanos() as f64));
                let cmd = json!({"type": "command", "command": {"action": "move_item", "item_type": item_type, "item_id": config.item_id, "data": fields}});
                sink.send(WsMessage::text(cmd.to_string())).await.map_err(|e| e.to_string())?;
                counters.sent.fetch_add(1, Ordering::Relaxed);
                if at >= config.window.0 && at < config.window.1 {
                    counters.sent_in_window.fetch_add(1, Ordering::Relaxed);
                }
            }
            frame = stream.next() => {
                let Some(frame) = frame else { return Err("server closed the connection".into()) };
                let WsMessage::Text(text) = frame.map_err(|e| e.to_string())? else { continue };
                let Ok(msg) = serde_json::from_str::<Value>(&text) else { continue };
                let command = &msg["command"];
                if msg["type"] != "command" || command["action"] != "move_item" || command["item_id"] == config.item_id.as_str() {
                    continue;
                }
                let Some(nanos) = command["data"]["x_mm"].as_f64() else { continue };
                let at = Duration::from_nanos(nanos as u64);
                let received = clock.now();
                counters.delivered.fetch_add(1, Ordering::Relaxed);
                if at >= config.window.0 && at < config.window.1 {
                    counters.delivered_in_window.fetch_add(1, Ordering::Relaxed);
                    latencies.record(received.saturating_sub(at));
                }
            }
            _ = tokio::time::sleep(end.saturating_sub(now)) => break,
        }
    }
    let _ = sink.close().await;
    Ok(latencies)
}

/// Fills a room with `n` items built from the fixtures; returns once the server has them.
/// Returns the size of the update.
pub async fn preload(
    url: &str,
    fixtures: &[Map<String, Value>],
    n: usize,
) -> Result<usize, String> {
    let mut ws = connect(url).await?;
    let doc = Doc::new();
    let items = doc.get_or_insert_map("items");
    handshake(&mut ws, &doc, true).await?;
    let update = {
        let mut txn = doc.transact_mut();
        for i in 0..n {
            let mut fields = fixtures[i % fixtures.len()].clone();
            let id = format!("preload-{i:06}");
            fields.insert("item_uuid".into(), json!(id));
            let x = fields.get("x_mm").and_then(Value::as_f64).unwrap_or(0.0);
            fields.insert("x_mm".into(), json!(x + (i / fixtures.len()) as f64 * 10.0));
            insert_item(&mut txn, &items, &id, &fields);
        }
        txn.encode_update_v1()
    };
    let size = update.len();
    send_sync(&mut ws, SyncMessage::Update(update)).await?;
    // A SyncStep1 is answered after the update before it was applied: an empty answer
    // means the server has everything.
    let sv = doc.transact().state_vector();
    send_sync(&mut ws, SyncMessage::SyncStep1(sv)).await?;
    loop {
        let frame = ws
            .next()
            .await
            .ok_or("closed during preload")?
            .map_err(|e| e.to_string())?;
        if let WsMessage::Binary(bytes) = frame {
            if let Ok(Message::Sync(SyncMessage::SyncStep2(_))) = Message::decode_v1(&bytes) {
                break;
            }
        }
    }
    let _ = ws.close(None).await;
    Ok(size)
}

/// Joins a room and syncs; checks the item count when applying. Returns the synced bytes.
pub async fn join_and_sync(
    url: &str,
    expected_items: usize,
    apply_state: bool,
) -> Result<usize, String> {
    let mut ws = connect(url).await?;
    let doc = Doc::new();
    let items = doc.get_or_insert_map("items");
    let bytes = handshake(&mut ws, &doc, apply_state).await?;
    if apply_state {
        let n = items.len(&doc.transact()) as usize;
        if n < expected_items {
            return Err(format!("synced {n} items, expected {expected_items}"));
        }
    }
    let _ = ws.close(None).await;
    Ok(bytes)
}

/// A synced connection that stays idle (answering pings) until `hold` is notified.
pub async fn hold_idle(
    url: &str,
    connected: Arc<AtomicU64>,
    ready: Arc<Barrier>,
    hold: Arc<Notify>,
) -> Result<(), String> {
    let setup = async {
        let mut ws = connect(url).await?;
        let doc = Doc::new();
        handshake(&mut ws, &doc, true).await?;
        Ok::<_, String>(ws)
    };
    let setup = setup.await;
    if setup.is_ok() {
        connected.fetch_add(1, Ordering::Relaxed);
    }
    let released = hold.notified();
    ready.wait().await;
    let mut ws = setup?;
    tokio::pin!(released);
    loop {
        tokio::select! {
            _ = &mut released => break,
            frame = ws.next() => if frame.is_none() { return Err("closed while idle".into()) },
        }
    }
    let _ = ws.close(None).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_are_found_in_updates_and_own_ones_skipped() {
        let doc = Doc::new();
        let items = doc.get_or_insert_map("items");
        let update = {
            let mut txn = doc.transact_mut();
            items.insert(&mut txn, "a", marker(3, Duration::from_nanos(123_456)));
            items.insert(&mut txn, "b", marker(4, Duration::from_nanos(7)));
            txn.encode_update_v1()
        };
        let mut found: Vec<_> = markers(&update, 4).collect();
        found.sort();
        assert_eq!(found, vec![Duration::from_nanos(123_456)]);
    }
}
