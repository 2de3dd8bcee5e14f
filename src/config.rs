//! Every knob of a node as a plain struct: [`Config::default`] is what a node runs with when
//! nothing is set, and [`Config::validate`] refuses values the engine cannot honour.
//!
//! The library reads no flags and no environment: the `roomcast` binary maps its command line
//! (and `ROOMCAST_*` variables) onto this struct, and tests and embedders build it directly, so
//! a variable in a developer's shell cannot change what a test runs.

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::time::Duration;

use crate::admission::AddressLimits;
use crate::auth::{AuthConfig, AuthMode, OriginPattern};
use crate::history::HistoryConfig;
use crate::inbound::InboundLimits;
use crate::outbox::{SlowConsumer, MAX_BYTES, MAX_FRAMES};

/// The largest `max_message_bytes` a node accepts: 16 MiB. A message is held whole while it is
/// decoded and framed once more per delivery format, so one client's message costs about twice
/// this; chat and lobby traffic is far below it.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// How a node behaves; see each field for its meaning and its default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Address to listen on for HTTP and WebSocket. Default `0.0.0.0:8080`.
    pub listen: SocketAddr,
    /// Largest client message (a frame, or a fragmented message in total), in bytes; a larger
    /// one closes the connection with 1009. Default 64 KiB, at most [`MAX_MESSAGE_BYTES`].
    pub max_message_bytes: usize,
    /// Longest room name, in bytes. Default 128.
    pub max_room_name: usize,
    /// Most rooms one connection may hold at once. Default 64.
    pub max_rooms_per_connection: usize,
    /// Most WebSocket connections on this node; upgrades past it get HTTP 503. Default 100,000.
    pub max_connections: usize,
    /// Rooms this node holds at most; a join that would create one more gets a `limit` error.
    /// Default 100,000.
    pub max_rooms: usize,
    /// Members one broadcast serves before it lets other tasks run; 0 never yields. Default
    /// 256 (about 1 ms of a core, the slice's socket writes included), so a room of 100,000
    /// holds a worker for slices of that, not for a third of a second at a time, while rooms of
    /// 200 are served whole (their messages keep coalescing per read).
    pub fanout_slice: usize,
    /// HTTP connections not yet upgraded (or finished) at once; more are answered 503 and
    /// closed. Default 16,384: a connection storm of 10,000 clients fits.
    pub max_handshakes: usize,
    /// Caps per client address, and the proxies trusted to name it. Default: no caps.
    pub addresses: AddressLimits,
    /// Frames a connection may have queued before it counts as a slow consumer. Default 4096.
    pub outbox_frames: u64,
    /// Bytes a connection may have queued before it counts as a slow consumer. Default 1 MiB;
    /// at least one largest message.
    pub outbox_bytes: u64,
    /// What to do with a slow consumer. Default: close it with 1008.
    pub slow_consumer: SlowConsumer,
    /// A publisher writes a frame to an idle recipient's socket itself instead of waking the
    /// recipient's session to do it. Default on; off queues every frame for the session (the
    /// design before direct writes, kept to compare against).
    pub direct_write: bool,
    /// `SO_SNDBUF` for every accepted socket, in bytes; `None` (the default) keeps the
    /// kernel's (auto-tuned) size. A small buffer makes a slow reader's socket fill sooner and
    /// its frames wait in the outbox, where the slow-consumer bound sees them.
    pub send_buffer: Option<usize>,
    /// Ping a connection after this long without hearing from it. Default 30 s.
    pub ping_interval: Duration,
    /// Drop a connection that has not answered a ping within this long. Default 10 s.
    pub ping_timeout: Duration,
    /// What one connection may send; see [`InboundLimits`] for each default.
    pub inbound: InboundLimits,
    /// A frame, or a fragmented message, must be complete this long after its first byte
    /// arrived, or the connection is closed with 1008 "incomplete frame". Default 10 s.
    pub frame_timeout: Duration,
    /// On shutdown, how long sessions get to flush and close before they are dropped.
    /// Default 5 s.
    pub drain_timeout: Duration,
    /// How long a client may take to send its HTTP request headers. Default 10 s.
    pub header_timeout: Duration,
    /// Join a cluster through this Redis (e.g. `redis://127.0.0.1:6379`); `None` (the default)
    /// runs the node alone on its in-process bus.
    pub redis: Option<String>,
    /// Prefix for every room's Redis channel. Default empty, so nodes of the original design
    /// can share the Redis during a migration.
    pub redis_prefix: String,
    /// Bounds on the Redis link's queues; see [`RedisLimits`].
    pub redis_limits: RedisLimits,
    /// Tokens: mode, keys, anonymous grants, auth timeout, per-user cap. Default: off.
    pub auth: AuthConfig,
    /// Origins a browser page may connect from; empty (the default) allows every origin, as
    /// the original servers did. A handshake without `Origin` (not a browser) is always allowed.
    pub allowed_origins: Vec<OriginPattern>,
    /// Keys for the trusted server API (`X-API-Key`); empty (the default) turns the API off.
    pub api_keys: Vec<String>,
    /// Serve an echo WebSocket on `/echo` (for conformance suites). Default off.
    pub echo: bool,
    /// Serve `wss://` and `https://` with this certificate chain and key (PEM files), read
    /// again on SIGHUP. Default none: plaintext.
    pub tls: Option<TlsFiles>,
    /// Serve the probes (`/healthz`, `/livez`, `/readyz`), `/metrics` and the dashboard on
    /// this address (plaintext) instead of the public one. Default none: all on the public
    /// address.
    pub admin_listen: Option<SocketAddr>,
    /// Serve the demo chat page (`/`), `/roomcast.js` and the dashboard (`/dashboard`) to
    /// browsers. Default on.
    pub pages: bool,
    /// Room history for envelope-mode offsets and resume; see [`HistoryConfig`]. Default off.
    pub history: HistoryConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            max_message_bytes: 64 * 1024,
            max_room_name: 128,
            max_rooms_per_connection: 64,
            max_connections: 100_000,
            max_rooms: 100_000,
            fanout_slice: 256,
            max_handshakes: 16_384,
            addresses: AddressLimits::default(),
            outbox_frames: 4096,
            outbox_bytes: 1024 * 1024,
            slow_consumer: SlowConsumer::Close,
            direct_write: true,
            send_buffer: None,
            ping_interval: Duration::from_secs(30),
            ping_timeout: Duration::from_secs(10),
            inbound: InboundLimits::default(),
            frame_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(5),
            header_timeout: Duration::from_secs(10),
            redis: None,
            redis_prefix: String::new(),
            redis_limits: RedisLimits::default(),
            auth: AuthConfig::default(),
            allowed_origins: Vec::new(),
            api_keys: Vec::new(),
            echo: false,
            pages: true,
            tls: None,
            admin_listen: None,
            history: HistoryConfig::default(),
        }
    }
}

/// The Redis link's two queues, each bounded in messages and bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedisLimits {
    /// Accepted publishes not yet sent to Redis; past it senders get `backplane_unavailable`.
    /// Default 100,000.
    pub queue_messages: u64,
    /// Their bytes. Default 64 MiB.
    pub queue_bytes: u64,
    /// Messages from Redis not yet fanned out; past it they are dropped and counted.
    /// Default 100,000.
    pub inbox_messages: u64,
    /// Their bytes. Default 64 MiB.
    pub inbox_bytes: u64,
    /// Reads of rooms' Redis streams queued or in flight for resumes (with history): past it
    /// a resume that needs one is answered `recovered: false` and counted; 0 never reads.
    /// Default 64.
    pub history_reads: u64,
}

impl Default for RedisLimits {
    fn default() -> Self {
        Self {
            queue_messages: 100_000,
            queue_bytes: 64 << 20,
            inbox_messages: 100_000,
            inbox_bytes: 64 << 20,
            history_reads: 64,
        }
    }
}

/// A certificate chain and its private key, PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, leaf first.
    pub cert: std::path::PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: std::path::PathBuf,
}

/// A configuration value the node cannot run with; the message names the setting as its flag.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A number outside the range the engine supports.
    #[error("--{name} is {value}; it must be between {} and {}", .range.start(), .range.end())]
    OutOfRange {
        /// The setting, spelled as its flag.
        name: &'static str,
        /// The value given.
        value: u64,
        /// What is allowed.
        range: RangeInclusive<u64>,
    },
    /// A timeout or interval of zero.
    #[error("--{name} must be longer than zero")]
    ZeroDuration {
        /// The setting, spelled as its flag.
        name: &'static str,
    },
    /// A single largest message would already make every recipient a slow consumer.
    #[error(
        "--outbox-bytes ({outbox}) cannot hold one largest message \
         (--max-message-bytes {message} plus its frame header)"
    )]
    OutboxBelowMessage {
        /// `outbox_bytes` given.
        outbox: u64,
        /// `max_message_bytes` given.
        message: u64,
    },
    /// Tokens are required or optional, but no key was given to check them with.
    #[error("--auth {0} needs --auth-secret or --auth-public-key")]
    AuthWithoutKeys(&'static str),
    /// A largest frame could never be paid for, so its sender would wait forever.
    #[error(
        "--inbound-bytes-burst ({burst}) is below one largest client frame \
         (--max-message-bytes {message} plus a 14-byte header)"
    )]
    BurstBelowMessage {
        /// `inbound.bytes_burst` given.
        burst: u64,
        /// `max_message_bytes` given.
        message: u64,
    },
}

impl Config {
    /// The defaults, listening on `addr`: what tests and embedders start from.
    pub fn with_listen(addr: SocketAddr) -> Self {
        Self {
            listen: addr,
            ..Self::default()
        }
    }

    /// Checks every bound; [`Server::bind`](crate::Server::bind) refuses a config that fails.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let max_message = MAX_MESSAGE_BYTES as u64;
        in_range("max-message-bytes", self.max_message_bytes, 1..=max_message)?;
        // Longer names would only let clients grow the registry's keys and the error replies
        // that echo them; a Redis channel name is this plus the prefix.
        in_range("max-room-name", self.max_room_name, 1..=1024)?;
        in_range(
            "max-rooms-per-connection",
            self.max_rooms_per_connection,
            1..=65_536,
        )?;
        in_range("max-connections", self.max_connections, 1..=10_000_000)?;
        in_range("max-rooms", self.max_rooms, 1..=10_000_000)?;
        in_range("max-handshakes", self.max_handshakes, 1..=1_000_000)?;
        in_range("outbox-frames", self.outbox_frames, 1..=MAX_FRAMES)?;
        in_range("outbox-bytes", self.outbox_bytes, 1..=MAX_BYTES)?;
        if let Some(size) = self.send_buffer {
            // The kernel doubles the value and clamps it to its own bounds; past 1 GiB is a typo.
            in_range("send-buffer", size, 1..=1 << 30)?;
        }
        let largest = self.max_message_bytes as u64 + crate::frame::MAX_HEADER as u64;
        if self.outbox_bytes < largest {
            return Err(ConfigError::OutboxBelowMessage {
                outbox: self.outbox_bytes,
                message: self.max_message_bytes as u64,
            });
        }
        self.validate_inbound()?;
        self.validate_history()?;
        let mode = match self.auth.mode {
            AuthMode::Off => None,
            AuthMode::Optional => Some("optional"),
            AuthMode::Required => Some("required"),
        };
        if let Some(mode) = mode {
            if self.auth.secrets.is_empty() && self.auth.public_keys.is_empty() {
                return Err(ConfigError::AuthWithoutKeys(mode));
            }
        }
        let redis = &self.redis_limits;
        in_range("redis-queue-messages", redis.queue_messages, 1..=10_000_000)?;
        in_range("redis-queue-bytes", redis.queue_bytes, 1..=1 << 34)?;
        // The inbox channel is allocated for at most 2^20 messages (worker.rs).
        in_range("redis-inbox-messages", redis.inbox_messages, 1..=1 << 20)?;
        in_range("redis-inbox-bytes", redis.inbox_bytes, 1..=1 << 34)?;
        in_range("redis-history-reads", redis.history_reads, 0..=1 << 16)?;
        for (name, value) in [
            ("ping-interval", self.ping_interval),
            ("ping-timeout", self.ping_timeout),
            ("header-timeout", self.header_timeout),
            ("frame-timeout", self.frame_timeout),
        ] {
            if value.is_zero() {
                return Err(ConfigError::ZeroDuration { name });
            }
        }
        Ok(())
    }
}

impl Config {
    fn validate_history(&self) -> Result<(), ConfigError> {
        let history = &self.history;
        if history.size == 0 {
            return Ok(());
        }
        in_range("history-size", history.size, 0..=1_000_000)?;
        in_range("history-max-bytes", history.max_bytes, 1 << 20..=1 << 36)?;
        Ok(())
    }

    fn validate_inbound(&self) -> Result<(), ConfigError> {
        let inbound = &self.inbound;
        if inbound.frames_per_sec > 0 {
            in_range("inbound-frames-burst", inbound.frames_burst, 1..=1_000_000)?;
        }
        if inbound.fanout_per_sec > 0 {
            in_range("inbound-fanout-burst", inbound.fanout_burst, 1..=1 << 32)?;
        }
        // A client frame's header is at most 14 bytes (2 + 8 of length + 4 of mask).
        let largest = self.max_message_bytes as u64 + 14;
        if inbound.bytes_per_sec > 0 && inbound.bytes_burst < largest {
            return Err(ConfigError::BurstBelowMessage {
                burst: inbound.bytes_burst,
                message: self.max_message_bytes as u64,
            });
        }
        Ok(())
    }
}

fn in_range(
    name: &'static str,
    value: impl TryInto<u64>,
    range: RangeInclusive<u64>,
) -> Result<(), ConfigError> {
    let value = value.try_into().unwrap_or(u64::MAX);
    if range.contains(&value) {
        Ok(())
    } else {
        Err(ConfigError::OutOfRange { name, value, range })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let c = Config::with_listen("127.0.0.1:0".parse().unwrap());
        assert_eq!(c.max_message_bytes, 65536);
        assert_eq!(c.slow_consumer, SlowConsumer::Close);
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn out_of_range_values_are_refused_by_name() {
        let refused = |tweak: fn(&mut Config)| {
            let mut c = Config::default();
            tweak(&mut c);
            c.validate().unwrap_err().to_string()
        };
        let e = refused(|c| c.max_message_bytes = MAX_MESSAGE_BYTES + 1);
        assert!(e.starts_with("--max-message-bytes is 16777217"), "{e}");
        // The outbox packs its frame count into 24 bits: a larger bound would overflow it.
        let e = refused(|c| c.outbox_frames = 1 << 24);
        assert!(e.starts_with("--outbox-frames"), "{e}");
        let e = refused(|c| c.outbox_bytes = 1000);
        assert!(e.starts_with("--outbox-bytes (1000)"), "{e}");
        let e = refused(|c| c.ping_timeout = Duration::ZERO);
        assert_eq!(e, "--ping-timeout must be longer than zero");
        let e = refused(|c| c.max_connections = 0);
        assert!(e.starts_with("--max-connections is 0"), "{e}");
        let e = refused(|c| c.inbound.bytes_burst = 64 * 1024);
        assert!(e.starts_with("--inbound-bytes-burst (65536)"), "{e}");
        let e = refused(|c| c.inbound.frames_burst = 0);
        assert!(e.starts_with("--inbound-frames-burst is 0"), "{e}");
        let e = refused(|c| {
            c.history.size = 100;
            c.history.max_bytes = 1000;
        });
        assert!(e.starts_with("--history-max-bytes is 1000"), "{e}");
    }
}
