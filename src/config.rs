//! Every knob of a node, each a flag with an environment variable and a default.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

use crate::outbox::SlowConsumer;

#[derive(Debug, Clone, Parser)]
#[command(name = "roomcast", version, about = "WebSocket room-broadcast server")]
pub struct Config {
    /// Address to listen on for HTTP and WebSocket.
    #[arg(long, env = "ROOMCAST_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// Runtime worker threads; 0 means one per core, 1 runs everything on a single thread.
    #[arg(long, env = "ROOMCAST_THREADS", default_value_t = 0)]
    pub threads: usize,

    /// Largest client message (a frame, or a fragmented message in total), in bytes; a larger
    /// one closes the connection with 1009.
    #[arg(long, env = "ROOMCAST_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024)]
    pub max_message_bytes: usize,

    /// Longest room name, in bytes.
    #[arg(long, env = "ROOMCAST_MAX_ROOM_NAME", default_value_t = 128)]
    pub max_room_name: usize,

    /// Most rooms one connection may hold at once.
    #[arg(long, env = "ROOMCAST_MAX_ROOMS_PER_CONNECTION", default_value_t = 64)]
    pub max_rooms_per_connection: usize,

    /// Most WebSocket connections on this node; upgrades past it get HTTP 503.
    #[arg(long, env = "ROOMCAST_MAX_CONNECTIONS", default_value_t = 100_000)]
    pub max_connections: usize,

    /// Frames a connection may have queued before it counts as a slow consumer.
    #[arg(long, env = "ROOMCAST_OUTBOX_FRAMES", default_value_t = 4096)]
    pub outbox_frames: u64,

    /// Bytes a connection may have queued before it counts as a slow consumer.
    #[arg(long, env = "ROOMCAST_OUTBOX_BYTES", default_value_t = 1024 * 1024)]
    pub outbox_bytes: u64,

    /// What to do with a slow consumer: close it (1008) or drop frames for it.
    #[arg(long, env = "ROOMCAST_SLOW_CONSUMER", value_enum, default_value_t = SlowConsumer::Close)]
    pub slow_consumer: SlowConsumer,

    /// Ping a connection after this long without hearing from it.
    #[arg(long, env = "ROOMCAST_PING_INTERVAL", value_parser = parse_duration, default_value = "30s")]
    pub ping_interval: Duration,

    /// Drop a connection that has not answered a ping within this long.
    #[arg(long, env = "ROOMCAST_PING_TIMEOUT", value_parser = parse_duration, default_value = "10s")]
    pub ping_timeout: Duration,

    /// On shutdown, how long sessions get to flush and close before they are dropped.
    #[arg(long, env = "ROOMCAST_DRAIN_TIMEOUT", value_parser = parse_duration, default_value = "5s")]
    pub drain_timeout: Duration,

    /// How long a client may take to send its HTTP request headers.
    #[arg(long, env = "ROOMCAST_HEADER_TIMEOUT", value_parser = parse_duration, default_value = "10s")]
    pub header_timeout: Duration,

    /// Join a cluster through this Redis (e.g. redis://127.0.0.1:6379); without it the node
    /// runs alone on its in-process bus.
    #[arg(long, env = "ROOMCAST_REDIS")]
    pub redis: Option<String>,

    /// Prefix for every room's Redis channel (none by default, so original nodes can share
    /// the Redis during a migration).
    #[arg(long, env = "ROOMCAST_REDIS_PREFIX", default_value = "")]
    pub redis_prefix: String,

    /// Serve an echo WebSocket on /echo (for conformance suites); off by default.
    #[arg(long, env = "ROOMCAST_ECHO", default_value_t = false)]
    pub echo: bool,

    /// Log level: error, warn, info, debug or trace.
    #[arg(long, env = "ROOMCAST_LOG", default_value = "info")]
    pub log: tracing::Level,
}

impl Config {
    /// The defaults, listening on `addr`: what tests and embedders start from.
    pub fn with_listen(addr: SocketAddr) -> Self {
        let mut config = Self::parse_from(["roomcast"]);
        config.listen = addr;
        config
    }
}

/// Parses `250ms`, `10s`, `2m` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
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

    #[test]
    fn defaults_parse() {
        let c = Config::with_listen("127.0.0.1:0".parse().unwrap());
        assert_eq!(c.max_message_bytes, 65536);
        assert_eq!(c.slow_consumer, SlowConsumer::Close);
    }
}
