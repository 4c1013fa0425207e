//! collab-load: drives any y-websocket-compatible server (or the Optiverse JSON protocol) with
//! R rooms × C clients and reports throughput, latency, losses and the server's CPU and memory.
//!
//! Scenarios:
//! * `fanout`: every client sends U small edits per second (one field of its own item in
//!   `items`); every receiver measures end-to-end latency (the send time travels inside the
//!   edit); reports sent/s, delivered/s, expected vs lost deliveries and latency percentiles.
//! * `join`: a room preloaded with N items (from the scene fixtures), K fresh clients join one
//!   after another; time to fully synced, bytes, and server CPU per join.
//! * `idle`: R×C synced idle connections; the server's RSS per connection.
//!
//! With `--server-pid` the server's CPU seconds over the measured window (its threads' run
//! time from `/proc/PID/task/*/schedstat`, in nanoseconds) are reported per delivered update.
//! Several nodes of one cluster: `--url` once per node (clients are assigned to them in turn)
//! and `--server-pid` once per node (their CPU is summed: the cluster's per delivery);
//! `--redis-pid` reports the shared Redis' CPU beside it.

use collab_load::{proc_stats, stats, yjs_client};

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use serde_json::{json, Value};

use stats::Latencies;
use yjs_client::{Clock, Counters};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Fanout,
    Join,
    Idle,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Protocol {
    /// y-websocket binary sync.
    Yjs,
    /// Optiverse JSON commands (`move_item`).
    Legacy,
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "collab-load",
    about = "Load generator for y-websocket and Optiverse servers"
)]
pub struct Args {
    /// Server base URL; repeat for several nodes of one cluster (clients are assigned to
    /// them round-robin, in the order given).
    #[arg(long = "url", default_value = "ws://127.0.0.1:8765")]
    urls: Vec<String>,
    /// Path of a room; `{room}` and `{user}` are replaced.
    #[arg(long, default_value = "/yjs/{room}")]
    path_template: String,
    #[arg(long, value_enum, default_value_t = Scenario::Fanout)]
    scenario: Scenario,
    #[arg(long, value_enum, default_value_t = Protocol::Yjs)]
    protocol: Protocol,
    #[arg(long, default_value_t = 1)]
    rooms: usize,
    #[arg(long, default_value_t = 10)]
    clients: usize,
    /// Edits per second per client (fanout).
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// Seconds measured (fanout).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Seconds to wait for late deliveries after the window.
    #[arg(long, default_value_t = 3.0)]
    drain: f64,
    /// Items preloaded into the room (join).
    #[arg(long, default_value_t = 10_000)]
    items: usize,
    /// Clients that join the preloaded room, one after another (join).
    #[arg(long, default_value_t = 20)]
    joiners: usize,
    /// The server's process id, for CPU and RSS figures; repeat for several nodes (summed).
    #[arg(long = "server-pid")]
    server_pids: Vec<u32>,
    /// A Redis shared by the nodes: its CPU over the same window is reported beside theirs
    /// (fanout).
    #[arg(long)]
    redis_pid: Option<u32>,
    /// Receivers do not apply updates to a local document (cheaper; says so in the output).
    #[arg(long)]
    no_apply: bool,
    /// Print one JSON object instead of the human summary.
    #[arg(long)]
    json: bool,
    /// Scene fixtures used for realistic items.
    #[arg(long, default_value = "../shared/fixtures")]
    fixtures: PathBuf,
    /// Prefix of room names (use a fresh one per run against a durable server).
    #[arg(long, default_value = "load")]
    room_prefix: String,
}

impl Args {
    /// The URL of a room for the `client`th client of the run (its node: round-robin).
    fn url_for(&self, room: usize, client: usize, user: &str) -> String {
        let path = self
            .path_template
            .replace("{room}", &format!("{}-{room}", self.room_prefix))
            .replace("{user}", user);
        let base = &self.urls[client % self.urls.len()];
        format!("{}{}", base.trim_end_matches('/'), path)
    }

    /// CPU seconds of every server process, summed (`None` without `--server-pid`).
    fn server_cpu_seconds(&self) -> Option<f64> {
        sum_over(&self.server_pids, proc_stats::cpu_seconds)
    }

    /// Resident memory of every server process, summed, in KiB.
    fn server_rss_kib(&self) -> Option<u64> {
        sum_over(&self.server_pids, proc_stats::rss_kib)
    }
}

/// The sum of `read` over `pids`; `None` when there are none or one cannot be read.
fn sum_over<T: std::iter::Sum>(pids: &[u32], read: impl Fn(u32) -> Option<T>) -> Option<T> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|&pid| read(pid)).sum()
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let result = match args.scenario {
        Scenario::Fanout => fanout(&args).await,
        Scenario::Join => join(&args).await,
        Scenario::Idle => idle(&args).await,
    };
    match result {
        Ok(report) => {
            if args.json {
                println!("{report}");
            } else {
                print_human(&report);
            }
        }
        Err(e) => {
            eprintln!("collab-load: {e}");
            std::process::exit(1);
        }
    }
}

fn print_human(report: &Value) {
    if let Value::Object(map) = report {
        for (k, v) in map {
            println!("{k:>28}: {v}");
        }
    }
}

/// Realistic item fields from the fixtures (falls back to a small lens when absent).
fn fixture_items(args: &Args) -> Vec<serde_json::Map<String, Value>> {
    let mut items = Vec::new();
    if let Ok(dir) = std::fs::read_dir(&args.fixtures) {
        let mut paths: Vec<_> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for path in paths {
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            let Ok(scene) = serde_json::from_slice::<Value>(&bytes) else {
                continue;
            };
            for item in scene["items"].as_array().into_iter().flatten() {
                if let Value::Object(map) = item {
                    items.push(map.clone());
                }
            }
        }
    }
    if items.is_empty() {
        let lens = json!({"_type": "component", "name": "Lens", "x_mm": 0.0, "y_mm": 0.0, "angle_deg": 0.0});
        items.push(lens.as_object().cloned().unwrap_or_default());
    }
    items
}

async fn fanout(args: &Args) -> Result<Value, String> {
    let clock = Clock::new();
    let counters = Arc::new(Counters::default());
    let fixtures = Arc::new(fixture_items(args));
    let total = args.rooms * args.clients;
    let ready = Arc::new(tokio::sync::Barrier::new(total + 1));
    let window = (
        Duration::from_secs_f64(args.warmup),
        Duration::from_secs_f64(args.warmup + args.duration),
    );
    let mut tasks = Vec::with_capacity(total);
    for room in 0..args.rooms {
        for client in 0..args.clients {
            let config = yjs_client::ClientConfig {
                url: args.url_for(room, room * args.clients + client, &format!("u{client}")),
                item_id: format!("{}-r{room}-c{client}", args.room_prefix),
                rate: args.rate,
                apply: !args.no_apply,
                window,
                drain: Duration::from_secs_f64(args.drain),
                fixture: fixtures[(room * args.clients + client) % fixtures.len()].clone(),
            };
            let (counters, ready) = (counters.clone(), ready.clone());
            let protocol = args.protocol;
            tasks.push(tokio::spawn(async move {
                match protocol {
                    Protocol::Yjs => yjs_client::run_fanout(config, clock, counters, ready).await,
                    Protocol::Legacy => {
                        yjs_client::run_legacy_fanout(config, clock, counters, ready).await
                    }
                }
            }));
        }
    }
    ready.wait().await;
    let start = clock.now();
    let progress = {
        let counters = counters.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                eprintln!(
                    "  t={:>5.1}s sent={} delivered={}",
                    (clock.now() - start).as_secs_f64(),
                    counters.sent.load(Ordering::Relaxed),
                    counters.delivered.load(Ordering::Relaxed)
                );
            }
        })
    };
    tokio::time::sleep(window.0).await;
    let cpu_start = args.server_cpu_seconds();
    let redis_start = args.redis_pid.and_then(proc_stats::cpu_seconds);
    tokio::time::sleep(window.1 - window.0).await;
    let cpu_end = args.server_cpu_seconds();
    let redis_end = args.redis_pid.and_then(proc_stats::cpu_seconds);
    let mut latencies = Latencies::default();
    let mut failures = Vec::new();
    for task in tasks {
        match task.await {
            Ok(Ok(l)) => latencies.merge(l),
            Ok(Err(e)) => failures.push(e),
            Err(e) => failures.push(e.to_string()),
        }
    }
    progress.abort();
    let sent = counters.sent_in_window.load(Ordering::Relaxed);
    let delivered = counters.delivered_in_window.load(Ordering::Relaxed);
    let expected = sent * (args.clients as u64 - 1);
    let secs = args.duration;
    let cpu = cpu_start.zip(cpu_end).map(|(a, b)| b - a);
    let mut report = json!({
        "scenario": "fanout",
        "protocol": format!("{:?}", args.protocol).to_lowercase(),
        "rooms": args.rooms,
        "clients_per_room": args.clients,
        "rate_per_client": args.rate,
        "receivers_apply_updates": !args.no_apply,
        "sent_per_s": sent as f64 / secs,
        "delivered_per_s": delivered as f64 / secs,
        "expected_deliveries": expected,
        "delivered": delivered,
        "lost": expected.saturating_sub(delivered),
        "latency_ms": latencies.summary_ms(),
        "client_failures": failures.len(),
        "nodes": args.urls.len(),
    });
    if let Some(redis) = redis_start.zip(redis_end).map(|(a, b)| b - a) {
        report["redis_cpu_s"] = json!(redis);
        if delivered > 0 {
            report["redis_cpu_us_per_delivery"] = json!(redis * 1e6 / delivered as f64);
        }
    }
    if let Some(cpu) = cpu {
        report["server_cpu_s"] = json!(cpu);
        if delivered > 0 {
            report["server_cpu_us_per_delivery"] = json!(cpu * 1e6 / delivered as f64);
        }
    }
    if let Some(first) = failures.first() {
        report["first_failure"] = json!(first);
    }
    Ok(report)
}

async fn join(args: &Args) -> Result<Value, String> {
    let fixtures = fixture_items(args);
    let url = args.url_for(0, 0, "loader");
    let preload_bytes = yjs_client::preload(&url, &fixtures, args.items).await?;
    let cpu_start = args.server_cpu_seconds();
    let mut latencies = Latencies::default();
    let mut bytes = 0usize;
    let started = Instant::now();
    for k in 0..args.joiners {
        let t = Instant::now();
        let received = yjs_client::join_and_sync(
            &args.url_for(0, k + 1, &format!("j{k}")),
            args.items,
            !args.no_apply,
        )
        .await?;
        latencies.record(t.elapsed());
        bytes = received;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_end = args.server_cpu_seconds();
    let mut report = json!({
        "scenario": "join",
        "items": args.items,
        "joiners": args.joiners,
        "preload_update_bytes": preload_bytes,
        "sync_bytes_per_join": bytes,
        "joiners_apply_state": !args.no_apply,
        "time_to_synced_ms": latencies.summary_ms(),
        "wall_s": elapsed,
    });
    if let Some((a, b)) = cpu_start.zip(cpu_end) {
        report["server_cpu_ms_per_join"] = json!((b - a) * 1e3 / args.joiners as f64);
    }
    Ok(report)
}

async fn idle(args: &Args) -> Result<Value, String> {
    let rss_before = args.server_rss_kib();
    let total = args.rooms * args.clients;
    let connected = Arc::new(AtomicU64::new(0));
    let hold = Arc::new(tokio::sync::Notify::new());
    let ready = Arc::new(tokio::sync::Barrier::new(total + 1));
    let mut tasks = Vec::with_capacity(total);
    for room in 0..args.rooms {
        for client in 0..args.clients {
            let url = args.url_for(room, room * args.clients + client, &format!("u{client}"));
            let (connected, hold, ready) = (connected.clone(), hold.clone(), ready.clone());
            tasks.push(tokio::spawn(async move {
                yjs_client::hold_idle(&url, connected, ready, hold).await
            }));
        }
        if room % 50 == 49 {
            eprintln!("  connected {}", connected.load(Ordering::Relaxed));
        }
    }
    ready.wait().await;
    tokio::time::sleep(Duration::from_secs_f64(args.warmup)).await;
    let rss_after = args.server_rss_kib();
    hold.notify_waiters();
    let mut failures = 0;
    for task in tasks {
        if !matches!(task.await, Ok(Ok(()))) {
            failures += 1;
        }
    }
    let mut report = json!({
        "scenario": "idle",
        "rooms": args.rooms,
        "connections": total,
        "synced": connected.load(Ordering::Relaxed),
        "client_failures": failures,
    });
    if let Some((a, b)) = rss_before.zip(rss_after) {
        report["server_rss_kib_before"] = json!(a);
        report["server_rss_kib_after"] = json!(b);
        report["server_rss_kib_per_connection"] = json!((b as f64 - a as f64) / total as f64);
    }
    Ok(report)
}
