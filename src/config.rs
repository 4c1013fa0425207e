//! Command-line flags, each also read from an environment variable.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, ValueEnum};

/// Which store keeps session documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    /// Embedded SQLite database under `--data-dir` (durable).
    Sqlite,
    /// Process memory only: nothing survives a restart.
    Memory,
}

/// When SQLite waits for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FsyncMode {
    /// Durable against a crash of the process (WAL, synchronous=NORMAL).
    Normal,
    /// Durable against power loss too (WAL, synchronous=FULL).
    Always,
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "optiverse-collab",
    version,
    about = "Collaboration server for Optiverse scenes"
)]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "COLLAB_HOST", default_value = "0.0.0.0")]
    pub host: IpAddr,

    /// Port to listen on (0 picks a free one).
    #[arg(long, env = "COLLAB_PORT", default_value_t = 8765)]
    pub port: u16,

    /// Seconds without any frame after which a `/ws` connection is closed (1001).
    #[arg(long, env = "COLLAB_IDLE_TIMEOUT", default_value = "90", value_parser = parse_positive_seconds)]
    pub idle_timeout: Duration,

    /// Seconds between WebSocket protocol pings on `/yjs`; a peer that has not answered one
    /// by the next is dropped. (`/ws` never gets protocol pings.)
    #[arg(long, env = "COLLAB_YJS_PING_INTERVAL", default_value = "30", value_parser = parse_positive_seconds)]
    pub yjs_ping_interval: Duration,

    /// Largest WebSocket message accepted; larger ones close the connection (1009).
    #[arg(long, env = "COLLAB_MAX_MESSAGE_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_message_bytes: usize,

    /// Bytes a connection's outbound queue may hold before it is closed as too slow (1013).
    /// One document state (a joiner's, a catch-up) must fit.
    #[arg(long, env = "COLLAB_MAX_QUEUE_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_queue_bytes: usize,

    /// Bytes of document and awareness changes that may wait for a Yjs connection that does
    /// not keep up; past it they are replaced by one update against what it holds (a
    /// catch-up). A desktop connection is closed 1013 at `--max-queue-bytes` instead.
    #[arg(long, env = "COLLAB_CATCH_UP_BYTES", default_value_t = 1024 * 1024)]
    pub catch_up_bytes: usize,

    /// Seconds a WebSocket message the peer started (its first byte read) has to finish;
    /// past it the connection is closed 1008. Pings do not extend it.
    #[arg(long, env = "COLLAB_MESSAGE_TIMEOUT", default_value = "30", value_parser = parse_positive_seconds)]
    pub message_timeout: Duration,

    /// Memory budget for what peers make the server hold (queued frames, incomplete
    /// messages, request bodies, awareness), in bytes or with a KiB/MiB/GiB suffix. Past it,
    /// the costliest connections are closed 1013 and bodies answered 503.
    #[arg(long, env = "COLLAB_MAX_MEMORY", default_value = "1GiB", value_parser = parse_bytes)]
    pub max_memory: usize,

    /// Log filter (tracing `EnvFilter` syntax), e.g. `info` or `optiverse_collab=debug`.
    #[arg(long, env = "COLLAB_LOG", default_value = "info")]
    pub log_level: String,

    /// Where session documents are kept.
    #[arg(long, env = "COLLAB_STORE", value_enum, default_value_t = StoreKind::Sqlite)]
    pub store: StoreKind,

    /// Directory of the embedded store.
    #[arg(long, env = "COLLAB_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// Durability of the embedded store.
    #[arg(long, env = "COLLAB_FSYNC", value_enum, default_value_t = FsyncMode::Normal)]
    pub fsync: FsyncMode,

    /// Share sessions with other nodes through this Redis (`redis://HOST:PORT`): sessions
    /// are kept there instead of the embedded store, and every node serves every session.
    #[arg(long, env = "COLLAB_CLUSTER", value_name = "REDIS_URL", value_parser = parse_redis_url)]
    pub cluster: Option<String>,

    /// With `--cluster`: seconds a node's heartbeat key lasts in Redis. A node that stops
    /// (killed, cut off) has its users leave on the other nodes within this and a fifth of it.
    #[arg(long, env = "COLLAB_CLUSTER_NODE_TIMEOUT", default_value = "5", value_parser = parse_positive_seconds)]
    pub cluster_node_timeout: Duration,

    /// Seconds a session stays in memory without connections.
    #[arg(long, env = "COLLAB_EVICT_AFTER", default_value = "60", value_parser = parse_seconds)]
    pub evict_after: Duration,

    /// Seconds a desktop client's commands on an item must pause before it is sent a
    /// correction it is owed (README, "Choices").
    #[arg(long, env = "COLLAB_CORRECTION_DELAY", default_value = "0.25", value_parser = parse_seconds)]
    pub correction_delay: Duration,

    /// Largest awareness state of one Yjs client.
    #[arg(long, env = "COLLAB_MAX_AWARENESS_BYTES", default_value_t = 64 * 1024)]
    pub max_awareness_bytes: usize,

    /// Most awareness states one session holds.
    #[arg(long, env = "COLLAB_MAX_AWARENESS_STATES", default_value_t = 1024)]
    pub max_awareness_states: usize,

    /// Most bytes of awareness states one session holds (bounds the frame a Yjs joiner gets).
    #[arg(long, env = "COLLAB_MAX_AWARENESS_TOTAL_BYTES", default_value_t = 1024 * 1024)]
    pub max_awareness_total_bytes: usize,

    /// Delete stored sessions nobody wrote to for this many days (checked at start and
    /// hourly; sessions in memory are kept). Off when not given.
    #[arg(long, env = "COLLAB_RETAIN_DAYS", value_parser = parse_days)]
    pub retain_days: Option<Duration>,

    /// Document changes (commands, uploads, Yjs updates, awareness) per second one connection
    /// may send, sustained. Over it, `/ws` answers `rate_limited`, `/yjs` closes 1013.
    #[arg(long, env = "COLLAB_UPDATE_RATE", default_value_t = 500.0, value_parser = parse_rate)]
    pub update_rate: f64,

    /// Changes one connection may send at once above `--update-rate`.
    #[arg(long, env = "COLLAB_UPDATE_BURST", default_value_t = 1000.0, value_parser = parse_rate)]
    pub update_burst: f64,

    /// Whole-state requests (`sync:request`, a Yjs state vector, an awareness query) per
    /// second one connection may send, sustained.
    #[arg(long, env = "COLLAB_REQUEST_RATE", default_value_t = 2.0, value_parser = parse_rate)]
    pub request_rate: f64,

    /// Whole-state requests one connection may send at once above `--request-rate`.
    #[arg(long, env = "COLLAB_REQUEST_BURST", default_value_t = 20.0, value_parser = parse_rate)]
    pub request_burst: f64,

    /// Threads running connections and sessions (0: one per CPU). One session is served by
    /// one task at a time whatever this is; fewer threads wake each other less.
    #[arg(long, env = "COLLAB_WORKERS", default_value_t = 0)]
    pub workers: usize,

    /// Seconds a client has to send a request head, from its connection's start and between
    /// requests on a kept-alive connection; then the connection is closed.
    #[arg(long, env = "COLLAB_HTTP_HEADER_TIMEOUT", default_value = "10", value_parser = parse_positive_seconds)]
    pub http_header_timeout: Duration,

    /// Seconds a client has to send a whole request body (`POST .../update`); then it is
    /// answered 408 and the connection is closed.
    #[arg(long, env = "COLLAB_HTTP_BODY_TIMEOUT", default_value = "30", value_parser = parse_positive_seconds)]
    pub http_body_timeout: Duration,

    /// Seconds a response may wait for the client to read it (a write blocked that long in a
    /// row); then the connection is closed.
    #[arg(long, env = "COLLAB_HTTP_WRITE_TIMEOUT", default_value = "30", value_parser = parse_positive_seconds)]
    pub http_write_timeout: Duration,

    /// Open TCP connections (HTTP and WebSocket), in total; at most the process's file
    /// descriptor limit less 96. Over it, a new connection is answered 503 and closed.
    #[arg(long, env = "COLLAB_MAX_CONNECTIONS", default_value_t = 10_000, value_parser = parse_count)]
    pub max_connections: usize,

    /// Open TCP connections from one client address (IPv4 address, IPv6 /64); at most half
    /// of `--max-connections`. Over it, a new connection is answered 503 and closed.
    #[arg(long, env = "COLLAB_MAX_CONNECTIONS_PER_IP", default_value_t = 256, value_parser = parse_count)]
    pub max_connections_per_ip: usize,

    /// Sessions in memory. A session that would be one more replaces the one idle longest
    /// (no members); when none is idle it is refused (503, or 1013 on a WebSocket).
    #[arg(long, env = "COLLAB_MAX_SESSIONS", default_value_t = 1000, value_parser = parse_count)]
    pub max_sessions: usize,

    /// HTTP API (`/api/...`) requests per second from one client address, sustained. Over it,
    /// 429 with `Retry-After`.
    #[arg(long, env = "COLLAB_API_RATE", default_value_t = 50.0, value_parser = parse_rate)]
    pub api_rate: f64,

    /// HTTP API requests one client address may send at once above `--api-rate`.
    #[arg(long, env = "COLLAB_API_BURST", default_value_t = 100.0, value_parser = parse_rate)]
    pub api_burst: f64,
    /// The signing key: with one, every endpoint but `/health` needs a token (README,
    /// "Securing a server"); without, the server is open.
    #[command(flatten)]
    pub key: KeyArgs,

    /// Origins (`scheme://host[:port]`) besides the server's own whose pages may connect; a
    /// request with any other `Origin` header is refused (403). Repeat, or separate with commas.
    #[arg(
        long = "allowed-origin",
        env = "COLLAB_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    pub allowed_origins: Vec<String>,
}

/// Where the signing key comes from (the server and the `token`/`revoke` commands).
#[derive(Debug, Clone, Default, Args)]
pub struct KeyArgs {
    /// File holding the key (at least 32 bytes; a trailing line end is ignored).
    #[arg(long, env = "COLLAB_AUTH_KEY_FILE")]
    pub auth_key_file: Option<PathBuf>,

    /// The key itself (at least 32 bytes). Prefer the file or the environment: a flag shows
    /// in the process list.
    #[arg(long, env = "COLLAB_AUTH_KEY", hide_env_values = true)]
    pub auth_key: Option<Secret>,
}

/// A secret string that debug output does not show.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(secret: impl Into<String>) -> Secret {
        Secret(secret.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Secret, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

impl Config {
    /// The defaults, as `cargo run` would use them with no flags and no environment.
    pub fn defaults() -> Self {
        Config::parse_from(["optiverse-collab"])
    }
}

fn parse_redis_url(s: &str) -> Result<String, String> {
    if s.starts_with("redis://") {
        Ok(s.to_owned())
    } else {
        Err("must be a redis://HOST:PORT URL".to_owned())
    }
}

fn parse_bytes(s: &str) -> Result<usize, String> {
    let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => s.split_at(at),
        None => (s, ""),
    };
    let scale: usize = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return Err(format!("{s:?}: give bytes, or KiB, MiB or GiB")),
    };
    digits
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{s:?} is not a positive size"))
}

fn parse_days(s: &str) -> Result<Duration, String> {
    let days: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of days"))?;
    Duration::try_from_secs_f64(days * 86_400.0).map_err(|e| e.to_string())
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate >= 1.0 => Ok(rate),
        _ => Err(format!("{s:?} is not a number of at least 1")),
    }
}

fn parse_count(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("{s:?} is not a whole number of at least 1")),
    }
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    Duration::try_from_secs_f64(secs).map_err(|e| e.to_string())
}

fn parse_positive_seconds(s: &str) -> Result<Duration, String> {
    parse_seconds(s).and_then(|d| {
        if d.is_zero() {
            Err("must be more than 0 seconds".to_owned())
        } else {
            Ok(d)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_protocol() {
        let c = Config::parse_from(["optiverse-collab"]);
        assert_eq!(c.port, 8765);
        assert_eq!(c.host.to_string(), "0.0.0.0");
        assert_eq!(c.idle_timeout, Duration::from_secs(90));
        assert_eq!(c.max_message_bytes, 16 * 1024 * 1024);
        assert_eq!(c.store, StoreKind::Sqlite);
        assert_eq!(c.evict_after, Duration::from_secs(60));
        assert_eq!(c.yjs_ping_interval, Duration::from_secs(30));
        assert_eq!(c.correction_delay, Duration::from_millis(250));
        assert_eq!(c.max_memory, 1 << 30);
        assert_eq!(c.catch_up_bytes, 1 << 20);
        assert_eq!(c.message_timeout, Duration::from_secs(30));
        assert_eq!(c.cluster, None, "single-node unless asked");
        assert_eq!(c.cluster_node_timeout, Duration::from_secs(5));
    }

    #[test]
    fn cluster_takes_a_redis_url() {
        let c = Config::parse_from(["x", "--cluster", "redis://127.0.0.1:6379"]);
        assert_eq!(c.cluster.as_deref(), Some("redis://127.0.0.1:6379"));
        assert!(Config::try_parse_from(["x", "--cluster", "127.0.0.1:6379"]).is_err());
    }

    #[test]
    fn sizes_parse_with_binary_units() {
        let size = |s: &str| Config::try_parse_from(["x", "--max-memory", s]).map(|c| c.max_memory);
        assert_eq!(size("256MiB").unwrap(), 256 << 20);
        assert_eq!(size("4096").unwrap(), 4096);
        assert_eq!(size("2GiB").unwrap(), 2 << 30);
        assert!(size("0").is_err());
        assert!(size("12MB").is_err());
        assert!(size("lots").is_err());
    }

    #[test]
    fn flags_parse_fractional_seconds() {
        let c = Config::parse_from([
            "x",
            "--idle-timeout",
            "0.5",
            "--port",
            "0",
            "--store",
            "memory",
        ]);
        assert_eq!(c.idle_timeout, Duration::from_millis(500));
        assert_eq!(c.store, StoreKind::Memory);
        assert!(Config::try_parse_from(["x", "--idle-timeout", "soon"]).is_err());
        assert!(Config::try_parse_from(["x", "--yjs-ping-interval", "0"]).is_err());
    }
}
