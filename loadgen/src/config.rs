//! What a run is asked to do: a plain struct with defaults and range checks. The command line
//! (and its environment variables) live in the binary, so nothing here reads the environment
//! and a test's configuration is exactly what it builds.

use std::path::PathBuf;
use std::time::Duration;

use crate::ws;

/// Wire dialect used to join and send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// `{"type":"join",...}` / `chat`: the sender does not hear itself.
    Join,
    /// `{"type":"SUBSCRIBE",...}` / `sendMessage`: every member hears it, the sender too.
    Subscribe,
}

impl Dialect {
    /// The name the command line and the report use.
    pub fn name(self) -> &'static str {
        match self {
            Dialect::Join => "join",
            Dialect::Subscribe => "subscribe",
        }
    }
}

/// One load test. The field docs name the command-line flag that sets each.
#[derive(Debug, Clone)]
pub struct Config {
    /// `--url`: servers (ws:// only); clients are spread over them round-robin.
    pub urls: Vec<String>,
    /// `--clients`: number of WebSocket connections.
    pub clients: usize,
    /// `--rooms`: number of rooms (`lg-0` ...); client i joins room i % rooms.
    pub rooms: usize,
    /// `--senders-per-room`: the first N clients of each room send; 0 makes a run that only
    /// connects, joins and closes (what membership alone costs the server).
    pub senders_per_room: usize,
    /// `--rate`: messages per second per sender (ignored when `ramp` is not empty).
    pub rate: f64,
    /// `--duration`: length of the measured window (of each step with a ramp).
    pub duration: Duration,
    /// `--warmup`: sending before measurement starts, at the first step's rate (checked for
    /// correctness, excluded from latency).
    pub warmup: Duration,
    /// `--payload`: bytes of each message string (never shorter than its header).
    pub payload: usize,
    /// `--dialect`.
    pub dialect: Dialect,
    /// `--room-prefix`: rooms are named `<prefix><n>`; two loadgens with different prefixes
    /// can share one server without sharing rooms.
    pub room_prefix: String,
    /// `--connect-concurrency`: connection attempts in flight at once.
    pub connect_concurrency: usize,
    /// `--connect-timeout`: per-connection limit for TCP connect + upgrade + join.
    pub connect_timeout: Duration,
    /// `--json`: also write the report as JSON to this file.
    pub json: Option<PathBuf>,
    /// `--ramp`: rising per-sender rates, one `duration` step each on the same connections.
    pub ramp: Vec<f64>,
    /// `--server-pid`: server processes to measure (CPU over the window, RSS).
    pub server_pids: Vec<u32>,
    /// `--rss-every`: how often the servers' RSS is sampled while the run lasts.
    pub rss_every: Duration,
    /// `--plot`: write an SVG latency-percentile plot to this file.
    pub plot: Option<PathBuf>,
    /// `--rss-plot`: write an SVG plot of the servers' RSS over time to this file.
    pub rss_plot: Option<PathBuf>,
    /// `--threads`: tokio worker threads (the binary builds the runtime; `None`: one per core).
    pub threads: Option<usize>,
    /// `--drain`: longest wait for in-flight deliveries after sending stops.
    pub drain: Duration,
    /// `--quiet`: no progress output.
    pub quiet: bool,
    /// `--settle`: pause after all joins are sent before probing readiness.
    pub settle: Duration,
    /// `--stall-fraction`: fraction of the non-sender clients that stop reading after the
    /// readiness probe (left out of the loss, order and latency figures).
    pub stall_fraction: f64,
    /// `--reconnect-fraction`: fraction of the remaining non-senders that close, reconnect
    /// and rejoin every `reconnect_every`, staggered (left out of those figures too).
    pub reconnect_fraction: f64,
    /// `--reconnect-every`.
    pub reconnect_every: Duration,
    /// `--reconnect-away`: how long a reconnecting client stays away between its close and
    /// its next connect (a phone changing networks), so a resume has something to replay.
    pub reconnect_away: Duration,
    /// `--reconnect-elsewhere`: a reconnecting client goes to the next --url each time.
    pub reconnect_elsewhere: bool,
    /// `--envelope`: offer the `roomcast.v2` subprotocol (and refuse a server that does not
    /// select it), read every delivery as an envelope and check its room offsets.
    pub envelope: bool,
    /// `--resume` (needs `envelope`): the reconnecting clients rejoin from the last offset they
    /// received and are checked like the healthy ones, across their connections.
    pub resume: bool,
    /// `--token-secret`: for a server with `--auth required`, sign one HS256 token per client
    /// with this secret and send it as `Authorization: Bearer`.
    pub token_secret: Option<String>,
    /// `--flooders`: hostile clients that join a room and send into it as fast as TCP allows.
    pub flooders: usize,
    /// `--pingers`: hostile clients that send pings as fast as TCP allows and never read.
    pub pingers: usize,
    /// `--flood-payload`: bytes of each flood message.
    pub flood_payload: usize,
    /// `--split-rooms`: report the latency of rooms `0..split_rooms` and of the rest apart
    /// (flooders go to rooms 0, 1, ...); 0 is off.
    pub split_rooms: u32,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            urls: vec!["ws://127.0.0.1:8080".to_string()],
            clients: 1000,
            rooms: 10,
            senders_per_room: 2,
            rate: 5.0,
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(2),
            payload: 64,
            dialect: Dialect::Subscribe,
            room_prefix: "lg-".to_string(),
            connect_concurrency: 256,
            connect_timeout: Duration::from_secs(10),
            json: None,
            ramp: Vec::new(),
            server_pids: Vec::new(),
            rss_every: Duration::from_secs(10),
            plot: None,
            rss_plot: None,
            threads: None,
            drain: Duration::from_secs(2),
            quiet: false,
            settle: Duration::from_millis(500),
            stall_fraction: 0.0,
            reconnect_fraction: 0.0,
            reconnect_every: Duration::from_secs(5),
            reconnect_away: Duration::ZERO,
            reconnect_elsewhere: false,
            envelope: false,
            resume: false,
            token_secret: None,
            flooders: 0,
            pingers: 0,
            flood_payload: 1000,
            split_rooms: 0,
        }
    }
}

/// A configuration value out of its range; the message names the flag that sets it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("at least one --url is needed")]
    NoUrl,
    #[error("--resume needs --envelope (offsets come only in envelopes)")]
    ResumeWithoutEnvelope,
    #[error("{flag} must be {range}")]
    OutOfRange {
        flag: &'static str,
        range: &'static str,
    },
}

fn check(ok: bool, flag: &'static str, range: &'static str) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError::OutOfRange { flag, range })
    }
}

impl Config {
    /// Per-sender rate of each measured step.
    pub fn rates(&self) -> Vec<f64> {
        if self.ramp.is_empty() {
            vec![self.rate]
        } else {
            self.ramp.clone()
        }
    }

    /// Checks every range `run` relies on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.urls.is_empty() {
            return Err(ConfigError::NoUrl);
        }
        if self.resume && !self.envelope {
            return Err(ConfigError::ResumeWithoutEnvelope);
        }
        // Client ids are u32 and sender ids are spread over rooms by arithmetic on them.
        let clients_ok = (1..=u32::MAX as usize / 2).contains(&self.clients);
        check(clients_ok, "--clients", "between 1 and 2^31")?;
        check(self.rooms >= 1, "--rooms", "at least 1")?;
        let rates_ok = self.rates().iter().all(|r| r.is_finite() && *r > 0.0);
        check(rates_ok, "--rate and --ramp values", "positive")?;
        check(!self.duration.is_zero(), "--duration", "positive")?;
        check(
            !self.connect_timeout.is_zero(),
            "--connect-timeout",
            "positive",
        )?;
        for (v, flag) in [
            (self.stall_fraction, "--stall-fraction"),
            (self.reconnect_fraction, "--reconnect-fraction"),
        ] {
            check((0.0..=1.0).contains(&v), flag, "between 0 and 1")?;
        }
        check(
            !self.reconnect_every.is_zero(),
            "--reconnect-every",
            "positive",
        )?;
        check(
            self.reconnect_away < self.reconnect_every,
            "--reconnect-away",
            "shorter than --reconnect-every",
        )?;
        check(!self.rss_every.is_zero(), "--rss-every", "positive")?;
        check(
            self.connect_concurrency >= 1,
            "--connect-concurrency",
            "at least 1",
        )?;
        check(self.threads != Some(0), "--threads", "at least 1")?;
        check(
            self.payload <= ws::MAX_FRAME / 2,
            "--payload",
            "at most 8 MiB",
        )?;
        Ok(())
    }
}

/// A duration that is not written like `250ms`, `10s`, `2m` or a bare number of seconds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a duration like 250ms, 10s, 2m or 1.5 (seconds)")]
pub struct DurationError(String);

/// Parses a duration the way the roomcast server writes its own: `250ms`, `10s`, `2m`, or a
/// bare number meaning seconds (fractions allowed: `0.3`, `1.5m`).
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let t = text.trim();
    let (number, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else {
        (t, 1.0)
    };
    let bad = || DurationError(text.to_string());
    // f64 parsing alone would accept `inf`, `NaN` and `-1`; a duration is digits and a dot.
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(bad());
    }
    let value: f64 = number.parse().map_err(|_| bad())?;
    Duration::try_from_secs_f64(value * scale).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_the_servers_form() {
        let ok = |s: &str| parse_duration(s).unwrap();
        assert_eq!(ok("250ms"), Duration::from_millis(250));
        assert_eq!(ok("10s"), Duration::from_secs(10));
        assert_eq!(ok("2m"), Duration::from_secs(120));
        assert_eq!(ok("10"), Duration::from_secs(10));
        assert_eq!(ok("0.3"), Duration::from_millis(300));
        assert_eq!(ok("1.5m"), Duration::from_secs(90));
        assert_eq!(ok("0"), Duration::ZERO);
        for bad in [
            "", "ms", "fast", "3h", "-1", "inf", "NaN", "1e3", "1 s", "1.2.3",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn default_is_valid_and_ranges_are_checked() {
        assert_eq!(Config::default().validate(), Ok(()));
        let with = |f: fn(&mut Config)| {
            let mut c = Config::default();
            f(&mut c);
            c.validate().unwrap_err().to_string()
        };
        assert_eq!(with(|c| c.urls.clear()), "at least one --url is needed");
        assert_eq!(
            with(|c| c.resume = true),
            "--resume needs --envelope (offsets come only in envelopes)"
        );
        assert_eq!(
            with(|c| c.clients = 0),
            "--clients must be between 1 and 2^31"
        );
        assert_eq!(
            with(|c| c.duration = Duration::ZERO),
            "--duration must be positive"
        );
        assert_eq!(
            with(|c| c.ramp = vec![5.0, f64::NAN]),
            "--rate and --ramp values must be positive"
        );
        assert_eq!(
            with(|c| c.stall_fraction = 1.5),
            "--stall-fraction must be between 0 and 1"
        );
        assert_eq!(
            with(|c| c.threads = Some(0)),
            "--threads must be at least 1"
        );
    }
}
