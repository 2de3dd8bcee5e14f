//! The `roomcast` binary: command line and environment, logging, allocator, runtime; the rest
//! is the library. Every flag maps onto one field of [`roomcast::Config`], whose docs give the
//! meaning; this file only says how each is spelled.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use roomcast::admission::{AddressLimits, Cidr};
use roomcast::auth::{AuthConfig, AuthMode, Grants, Key, OriginPattern};
use roomcast::config::RedisLimits;
use roomcast::history::HistoryConfig;
use roomcast::inbound::{InboundLimits, RatePolicy};
use roomcast::outbox::SlowConsumer;
use roomcast::{Config, Server};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// WebSocket room-broadcast server.
#[derive(Debug, Parser)]
#[command(name = "roomcast", version)]
struct Args {
    /// Address to listen on for HTTP and WebSocket.
    #[arg(long, env = "ROOMCAST_LISTEN", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,

    /// Runtime worker threads; 0 means one per core, 1 runs everything on a single thread.
    #[arg(long, env = "ROOMCAST_THREADS", default_value_t = 0)]
    threads: usize,

    /// Largest client message (a frame, or a fragmented message in total), in bytes; a larger
    /// one closes the connection with 1009. At most 16777216.
    #[arg(long, env = "ROOMCAST_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024)]
    max_message_bytes: usize,

    /// Longest room name, in bytes (at most 1024).
    #[arg(long, env = "ROOMCAST_MAX_ROOM_NAME", default_value_t = 128)]
    max_room_name: usize,

    /// Most rooms one connection may hold at once.
    #[arg(long, env = "ROOMCAST_MAX_ROOMS_PER_CONNECTION", default_value_t = 64)]
    max_rooms_per_connection: usize,

    /// Most WebSocket connections on this node; upgrades past it get HTTP 503.
    #[arg(long, env = "ROOMCAST_MAX_CONNECTIONS", default_value_t = 100_000)]
    max_connections: usize,

    /// Rooms this node holds at most; a join that would create one more gets a `limit` error.
    #[arg(long, env = "ROOMCAST_MAX_ROOMS", default_value_t = 100_000)]
    max_rooms: usize,

    /// Members one broadcast serves before it lets other tasks run (0: never yields).
    #[arg(long, env = "ROOMCAST_FANOUT_SLICE", default_value_t = 256)]
    fanout_slice: usize,

    /// Whether a publisher writes to an idle recipient's socket itself (false: every frame
    /// goes through the recipient's session, the design before direct writes).
    #[arg(long, env = "ROOMCAST_DIRECT_WRITE", default_value_t = true, action = clap::ArgAction::Set)]
    direct_write: bool,

    /// SO_SNDBUF for accepted sockets, in bytes (default: the kernel's auto-tuned size).
    #[arg(long, env = "ROOMCAST_SEND_BUFFER")]
    send_buffer: Option<usize>,

    /// HTTP connections not yet upgraded, at once; more are answered 503 and closed.
    #[arg(long, env = "ROOMCAST_MAX_HANDSHAKES", default_value_t = 16_384)]
    max_handshakes: usize,

    /// Open WebSocket connections per client address (IPv6: per /64), 429 past it; 0 is off.
    /// Recommended on a public port: 100 (a NAT'd office fits, one host cannot take the node).
    #[arg(long, env = "ROOMCAST_MAX_CONNECTIONS_PER_IP", default_value_t = 0)]
    max_connections_per_ip: u32,

    /// Upgrade attempts per second per client address (bursts of twice that), 429 past it;
    /// 0 is off. Recommended on a public port: 20.
    #[arg(long, env = "ROOMCAST_MAX_CONNECT_RATE_PER_IP", default_value_t = 0)]
    max_connect_rate_per_ip: u32,

    /// Proxies (address blocks, comma-separated) whose X-Forwarded-For names the client.
    #[arg(long, env = "ROOMCAST_TRUSTED_PROXIES", value_delimiter = ',')]
    trusted_proxies: Vec<Cidr>,

    /// Frames a connection may have queued before it counts as a slow consumer (at most 2^20).
    #[arg(long, env = "ROOMCAST_OUTBOX_FRAMES", default_value_t = 4096)]
    outbox_frames: u64,

    /// Bytes a connection may have queued before it counts as a slow consumer; at least one
    /// largest message.
    #[arg(long, env = "ROOMCAST_OUTBOX_BYTES", default_value_t = 1024 * 1024)]
    outbox_bytes: u64,

    /// What to do with a slow consumer: close it (1008) or drop frames for it.
    #[arg(long, env = "ROOMCAST_SLOW_CONSUMER", value_enum, default_value_t = SlowPolicy::Close)]
    slow_consumer: SlowPolicy,

    /// Ping a connection after this long without hearing from it.
    #[arg(long, env = "ROOMCAST_PING_INTERVAL", value_parser = parse_duration, default_value = "30s")]
    ping_interval: Duration,

    /// Drop a connection that has not answered a ping within this long.
    #[arg(long, env = "ROOMCAST_PING_TIMEOUT", value_parser = parse_duration, default_value = "10s")]
    ping_timeout: Duration,

    /// Frames (messages, fragments, pings, pongs) one connection may send per second,
    /// sustained; 0 turns the limit off.
    #[arg(long, env = "ROOMCAST_INBOUND_FRAMES_PER_SEC", default_value_t = 100)]
    inbound_frames_per_sec: u32,

    /// Frames one connection may send at once after a quiet spell.
    #[arg(long, env = "ROOMCAST_INBOUND_FRAMES_BURST", default_value_t = 200)]
    inbound_frames_burst: u32,

    /// Bytes (frame headers included) one connection may send per second, sustained; 0 turns
    /// the limit off.
    #[arg(long, env = "ROOMCAST_INBOUND_BYTES_PER_SEC", default_value_t = 256 * 1024)]
    inbound_bytes_per_sec: u64,

    /// Bytes one connection may send at once; at least one largest frame.
    #[arg(long, env = "ROOMCAST_INBOUND_BYTES_BURST", default_value_t = 512 * 1024)]
    inbound_bytes_burst: u64,

    /// Over the inbound limit: `throttle` stops reading until tokens refill (nothing is lost);
    /// `reject` refuses with `rate_limited` and closes with 4008 past the refusal limit.
    #[arg(long, env = "ROOMCAST_INBOUND_POLICY", value_enum, default_value_t = InboundPolicy::Throttle)]
    inbound_policy: InboundPolicy,

    /// Under `reject`: refusals within 10 s past which the connection is closed with 4008.
    #[arg(
        long,
        env = "ROOMCAST_INBOUND_REJECT_CLOSE_AFTER",
        default_value_t = 20
    )]
    inbound_reject_close_after: u32,

    /// Deliveries per second one connection's messages may cause on this node (a message to a
    /// room of 200 costs 200); past it the server stops reading from it for a while. 0 is off.
    #[arg(long, env = "ROOMCAST_INBOUND_FANOUT_PER_SEC", default_value_t = 2_000)]
    inbound_fanout_per_sec: u64,

    /// Deliveries one connection's messages may cause at once.
    #[arg(long, env = "ROOMCAST_INBOUND_FANOUT_BURST", default_value_t = 10_000)]
    inbound_fanout_burst: u64,

    /// A frame or fragmented message must be complete this long after it began, or the
    /// connection is closed with 1008 "incomplete frame" (time spent throttled not counted).
    #[arg(long, env = "ROOMCAST_FRAME_TIMEOUT", value_parser = parse_duration, default_value = "10s")]
    frame_timeout: Duration,

    /// On shutdown, how long sessions get to flush and close before they are dropped.
    #[arg(long, env = "ROOMCAST_DRAIN_TIMEOUT", value_parser = parse_duration, default_value = "5s")]
    drain_timeout: Duration,

    /// Messages of history kept per room, for offsets and resume in envelope mode; 0 keeps
    /// none (the default).
    #[arg(long, env = "ROOMCAST_HISTORY_SIZE", default_value_t = 0)]
    history_size: usize,

    /// A message of history older than this is dropped; 0 keeps it until --history-size or
    /// --history-max-bytes push it out.
    #[arg(long, env = "ROOMCAST_HISTORY_TTL", value_parser = parse_duration, default_value = "10m")]
    history_ttl: Duration,

    /// Bytes all rooms' history may hold on this node; past it the rooms whose last message is
    /// oldest lose their history first.
    #[arg(long, env = "ROOMCAST_HISTORY_MAX_BYTES", default_value_t = 64 << 20)]
    history_max_bytes: u64,

    /// How long a client may take to send its HTTP request headers.
    #[arg(long, env = "ROOMCAST_HEADER_TIMEOUT", value_parser = parse_duration, default_value = "10s")]
    header_timeout: Duration,

    /// Join a cluster through this Redis (e.g. redis://127.0.0.1:6379); without it the node
    /// runs alone on its in-process bus.
    #[arg(long, env = "ROOMCAST_REDIS")]
    redis: Option<String>,

    /// Prefix for every room's Redis channel (none by default, so original nodes can share
    /// the Redis during a migration).
    #[arg(long, env = "ROOMCAST_REDIS_PREFIX", default_value = "")]
    redis_prefix: String,

    /// Accepted publishes waiting for Redis at most; past it senders get backplane_unavailable.
    #[arg(long, env = "ROOMCAST_REDIS_QUEUE_MESSAGES", default_value_t = 100_000)]
    redis_queue_messages: u64,

    /// Bytes of accepted publishes waiting for Redis at most.
    #[arg(long, env = "ROOMCAST_REDIS_QUEUE_BYTES", default_value_t = 64 << 20)]
    redis_queue_bytes: u64,

    /// Messages from Redis waiting for fan-out at most (at most 2^20); past it they are
    /// dropped and counted.
    #[arg(long, env = "ROOMCAST_REDIS_INBOX_MESSAGES", default_value_t = 100_000)]
    redis_inbox_messages: u64,

    /// Bytes of messages from Redis waiting for fan-out at most.
    #[arg(long, env = "ROOMCAST_REDIS_INBOX_BYTES", default_value_t = 64 << 20)]
    redis_inbox_bytes: u64,

    /// Reads of rooms' Redis streams for resumes queued at most (with history, at most
    /// 65536); past it such a resume is answered `recovered: false`. 0: never read.
    #[arg(long, env = "ROOMCAST_REDIS_HISTORY_READS", default_value_t = 64)]
    redis_history_reads: u64,

    /// Connection tokens: `off` (anyone may do anything), `optional` (no token: the anonymous
    /// grants) or `required`.
    #[arg(long = "auth", env = "ROOMCAST_AUTH", value_enum, default_value_t = AuthArg::Off)]
    auth_mode: AuthArg,

    /// HS256 secret as `[KID=]SECRET`; repeat for rotation (every one is tried, or the one the
    /// token's `kid` names).
    #[arg(long, env = "ROOMCAST_AUTH_SECRET", hide_env_values = true)]
    auth_secret: Vec<String>,

    /// RS256 or ES256 public key file (PEM) as `[KID=]PATH`; repeatable.
    #[arg(long, env = "ROOMCAST_AUTH_PUBLIC_KEY")]
    auth_public_key: Vec<String>,

    /// The `aud` claim tokens must carry.
    #[arg(long, env = "ROOMCAST_AUTH_AUDIENCE")]
    auth_audience: Option<String>,

    /// The `iss` claim tokens must carry.
    #[arg(long, env = "ROOMCAST_AUTH_ISSUER")]
    auth_issuer: Option<String>,

    /// Under `--auth optional`, what a connection without a token may do: the `rooms` claim's
    /// JSON, e.g. '{"public:*":"subscribe"}'.
    #[arg(long, env = "ROOMCAST_ANONYMOUS_GRANTS", default_value = "{}")]
    anonymous_grants: String,

    /// Time a connection without a handshake token has to send `{"type":"auth",...}` first.
    #[arg(long, env = "ROOMCAST_AUTH_TIMEOUT", value_parser = parse_duration, default_value = "5s")]
    auth_timeout: Duration,

    /// Open connections per user (the token's `sub`) on this node; 0 is no limit.
    #[arg(long, env = "ROOMCAST_MAX_CONNECTIONS_PER_USER", default_value_t = 0)]
    max_connections_per_user: u32,

    /// Origins browser pages may connect from (comma-separated: exact origins such as
    /// https://app.example.com, or *.example.com); none given allows every origin.
    #[arg(long, env = "ROOMCAST_ALLOWED_ORIGINS", value_delimiter = ',')]
    allowed_origins: Vec<String>,

    /// Key for the trusted server API (`X-API-Key`); repeatable. None given turns the API off.
    #[arg(long, env = "ROOMCAST_API_KEY", hide_env_values = true)]
    api_key: Vec<String>,

    /// Serve an echo WebSocket on /echo (for conformance suites); off by default.
    #[arg(long, env = "ROOMCAST_ECHO", default_value_t = false)]
    echo: bool,

    /// Certificate chain (PEM) to serve wss:// and https:// with; needs --tls-key. Read again
    /// on SIGHUP.
    #[arg(long, env = "ROOMCAST_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,

    /// Private key (PEM) for --tls-cert.
    #[arg(long, env = "ROOMCAST_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,

    /// Serve /healthz, /livez, /readyz, /metrics and the dashboard on this address (plaintext)
    /// instead of the public one.
    #[arg(long, env = "ROOMCAST_ADMIN_LISTEN")]
    admin_listen: Option<SocketAddr>,

    /// Do not serve the demo chat page (/), /roomcast.js or the dashboard (/dashboard).
    #[arg(long, env = "ROOMCAST_NO_PAGES", default_value_t = false)]
    no_pages: bool,

    /// Log level: error, warn, info, debug or trace.
    #[arg(long, env = "ROOMCAST_LOG", default_value = "info")]
    log: tracing::Level,
}

/// `--slow-consumer`, spelled for the command line.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum SlowPolicy {
    /// Close the connection with 1008 "slow consumer".
    Close,
    /// Drop the frame for that recipient and count it.
    Drop,
}

/// `--auth`, spelled for the command line.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum AuthArg {
    /// No tokens.
    Off,
    /// Tokens are optional.
    Optional,
    /// Tokens are required.
    Required,
}

/// `--inbound-policy`, spelled for the command line.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum InboundPolicy {
    /// Stop reading until the buckets refill.
    Throttle,
    /// Refuse with `rate_limited`; close with 4008 past the refusal limit.
    Reject,
}

impl Args {
    fn auth(&self) -> anyhow::Result<AuthConfig> {
        let mut public_keys = Vec::new();
        for entry in &self.auth_public_key {
            let key = Key::parse(entry);
            let pem = std::fs::read_to_string(&key.material)
                .with_context(|| format!("reading --auth-public-key {}", key.material))?;
            public_keys.push(Key {
                material: pem,
                ..key
            });
        }
        Ok(AuthConfig {
            mode: match self.auth_mode {
                AuthArg::Off => AuthMode::Off,
                AuthArg::Optional => AuthMode::Optional,
                AuthArg::Required => AuthMode::Required,
            },
            secrets: self.auth_secret.iter().map(|s| Key::parse(s)).collect(),
            public_keys,
            audience: self.auth_audience.clone(),
            issuer: self.auth_issuer.clone(),
            anonymous_grants: Grants::parse(&self.anonymous_grants)
                .context("--anonymous-grants")?,
            timeout: self.auth_timeout,
            max_connections_per_user: self.max_connections_per_user,
        })
    }

    fn config(&self) -> anyhow::Result<Config> {
        Ok(Config {
            listen: self.listen,
            max_message_bytes: self.max_message_bytes,
            max_room_name: self.max_room_name,
            max_rooms_per_connection: self.max_rooms_per_connection,
            max_connections: self.max_connections,
            max_rooms: self.max_rooms,
            fanout_slice: self.fanout_slice,
            direct_write: self.direct_write,
            send_buffer: self.send_buffer,
            max_handshakes: self.max_handshakes,
            addresses: AddressLimits {
                max_connections_per_ip: self.max_connections_per_ip,
                max_connect_rate_per_ip: self.max_connect_rate_per_ip,
                trusted_proxies: self.trusted_proxies.clone(),
            },
            outbox_frames: self.outbox_frames,
            outbox_bytes: self.outbox_bytes,
            slow_consumer: match self.slow_consumer {
                SlowPolicy::Close => SlowConsumer::Close,
                SlowPolicy::Drop => SlowConsumer::Drop,
            },
            ping_interval: self.ping_interval,
            ping_timeout: self.ping_timeout,
            inbound: InboundLimits {
                frames_per_sec: self.inbound_frames_per_sec,
                frames_burst: self.inbound_frames_burst,
                bytes_per_sec: self.inbound_bytes_per_sec,
                bytes_burst: self.inbound_bytes_burst,
                policy: match self.inbound_policy {
                    InboundPolicy::Throttle => RatePolicy::Throttle,
                    InboundPolicy::Reject => RatePolicy::Reject,
                },
                reject_close_after: self.inbound_reject_close_after,
                fanout_per_sec: self.inbound_fanout_per_sec,
                fanout_burst: self.inbound_fanout_burst,
            },
            frame_timeout: self.frame_timeout,
            drain_timeout: self.drain_timeout,
            header_timeout: self.header_timeout,
            redis: self.redis.clone(),
            redis_prefix: self.redis_prefix.clone(),
            redis_limits: RedisLimits {
                queue_messages: self.redis_queue_messages,
                queue_bytes: self.redis_queue_bytes,
                inbox_messages: self.redis_inbox_messages,
                inbox_bytes: self.redis_inbox_bytes,
                history_reads: self.redis_history_reads,
            },
            auth: self.auth()?,
            allowed_origins: self
                .allowed_origins
                .iter()
                .map(|o| OriginPattern::parse(o))
                .collect(),
            api_keys: self.api_key.clone(),
            echo: self.echo,
            pages: !self.no_pages,
            tls: match (&self.tls_cert, &self.tls_key) {
                (Some(cert), Some(key)) => Some(roomcast::config::TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                }),
                _ => None,
            },
            admin_listen: self.admin_listen,
            history: HistoryConfig {
                size: self.history_size,
                ttl: self.history_ttl,
                max_bytes: self.history_max_bytes,
            },
        })
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = args.config()?;
    tracing_subscriber::fmt()
        .with_max_level(args.log)
        .with_target(false)
        .init();
    let runtime = roomcast::runtime(args.threads).context("starting the runtime")?;
    runtime.block_on(async {
        warn_if_open(&config);
        let server = Server::bind(config).await?;
        tracing::info!("roomcast listening on {}", server.local_addr());
        server.run(shutdown_signal()).await;
        Ok(())
    })
}

/// An open node (no tokens) beyond loopback lets anyone who reaches the port read and write
/// every room: allowed, because the quick start and existing clients need it, but said loudly.
fn warn_if_open(config: &Config) {
    if config.auth.mode == AuthMode::Off && !config.listen.ip().is_loopback() {
        tracing::warn!(
            "no --auth: anyone who reaches {} may read and write every room (see README, Security)",
            config.listen
        );
    }
    if config.allowed_origins.is_empty() && config.auth.mode == AuthMode::Off {
        tracing::info!("no --allowed-origins: pages from any site may open connections");
    }
}

/// Parses `250ms`, `10s`, `2m` or a bare number of seconds (loadgen reads durations the same
/// way).
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like 250ms, 10s or 2m"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        _ => {
            return Err(format!(
                "unknown unit `{unit}` in `{text}` (use ms, s or m)"
            ))
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| e.to_string())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!("cannot listen for SIGINT: {e}");
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(e) => {
                tracing::error!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("3h").is_err());
    }

    /// The command line's defaults are the library's: one table, not two that drift apart.
    #[test]
    fn flag_defaults_are_the_library_defaults() {
        for (name, _) in std::env::vars().filter(|(k, _)| k.starts_with("ROOMCAST_")) {
            // Each test runs in its own process under nextest: nothing else reads the env here.
            std::env::remove_var(name);
        }
        let args = Args::try_parse_from(["roomcast"]).expect("defaults parse");
        assert_eq!(args.config().expect("default config"), Config::default());
    }
}
