//! What a run is asked to do: a plain struct with defaults and range checks. The command line
//! (and its environment variables) live in the binary, so nothing here reads the environment
//! and a test's configuration is exactly what it builds.

use std::path::PathBuf;
use std::time::Duration;

use crate::{tls, ws};

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
    /// `--url`: servers (`ws://` or `wss://`); clients are spread over them round-robin.
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
    /// `--connect-timeout`: per-connection limit for TCP connect (+ TLS handshake for
    /// `wss://`) + upgrade + join.
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
    /// `--tls-ca`: PEM file of the CA certificates `wss://` servers are checked against.
    pub tls_ca: Option<PathBuf>,
    /// `--tls-insecure`: accept any certificate from a `wss://` server (local benchmarks).
    pub tls_insecure: bool,
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
            tls_ca: None,
            tls_insecure: false,
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
    /// A `wss://` URL and nothing to check its server's certificate against.
    #[error(
        "{0}: wss:// needs --tls-ca PATH (PEM file of the CA that signed the server's \
         certificate) or --tls-insecure (no certificate check; local benchmarks only): \
         loadgen has no system roots"
    )]
    NoTrust(String),
    #[error("--tls-ca and --tls-insecure cannot be used together")]
    TwoTrusts,
    /// The hostile clients speak plain `ws://` only.
    #[error(
        "{0}: --flooders and --pingers speak ws:// only; run hostile clients against ws:// URLs"
    )]
    HostileTls(String),
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

    /// What `wss://` servers' certificates are checked against, if anything.
    pub fn tls_trust(&self) -> Option<tls::Trust> {
        match (&self.tls_ca, self.tls_insecure) {
            (Some(ca), false) => Some(tls::Trust::Ca(ca.clone())),
            (None, true) => Some(tls::Trust::Insecure),
            _ => None,
        }
    }

    /// Checks every range `run` relies on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.urls.is_empty() {
            return Err(ConfigError::NoUrl);
        }
        if self.tls_ca.is_some() && self.tls_insecure {
            return Err(ConfigError::TwoTrusts);
        }
        if let Some(wss) = self.urls.iter().find(|u| ws::WsUrl::is_tls(u)) {
            if self.tls_trust().is_none() {
                return Err(ConfigError::NoTrust(wss.clone()));
            }
            if self.flooders + self.pingers > 0 {
                return Err(ConfigError::HostileTls(wss.clone()));
            }
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

    /// A wss:// URL needs something to check the server's certificate against, and no
    /// hostile clients; ws:// runs need neither.
    #[test]
    fn wss_needs_a_trust_and_no_hostile_clients() {
        let wss = |f: fn(&mut Config)| {
            let mut c = Config {
                urls: vec!["ws://a:1".into(), "wss://127.0.0.1:8443/".into()],
                ..Config::default()
            };
            f(&mut c);
            c.validate().map_err(|e| e.to_string())
        };
        let err = wss(|_| {}).unwrap_err();
        assert!(
            err.starts_with("wss://127.0.0.1:8443/: wss:// needs --tls-ca PATH")
                && err.contains("--tls-insecure")
                && err.ends_with("loadgen has no system roots"),
            "{err}"
        );
        assert_eq!(wss(|c| c.tls_ca = Some("ca.pem".into())), Ok(()));
        assert_eq!(wss(|c| c.tls_insecure = true), Ok(()));
        assert_eq!(
            wss(|c| {
                c.tls_insecure = true;
                c.tls_ca = Some("ca.pem".into());
            }),
            Err("--tls-ca and --tls-insecure cannot be used together".into())
        );
        let err = wss(|c| {
            c.tls_insecure = true;
            c.pingers = 1;
        })
        .unwrap_err();
        assert!(
            err.contains("--flooders and --pingers speak ws:// only"),
            "{err}"
        );
        let plain = Config {
            flooders: 2,
            ..Config::default()
        };
        assert_eq!(plain.validate(), Ok(()));
        assert_eq!(plain.tls_trust(), None);
    }
}
