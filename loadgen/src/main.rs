use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use loadgen::{parse_duration, Config, Dialect};

/// Open-loop WebSocket load generator and correctness checker for roomcast.
///
/// Durations are written as the server writes its own: 250ms, 10s, 2m, or a bare number of
/// seconds.
#[derive(Debug, Parser)]
#[command(name = "loadgen", version, args_override_self = true)]
struct Args {
    /// Server URL, ws://HOST[:PORT][/PATH] or wss://HOST[:PORT][/PATH] (wss:// needs
    /// --tls-ca or --tls-insecure); repeat or comma-separate to spread clients round-robin.
    #[arg(
        long = "url",
        env = "LOADGEN_URL",
        value_delimiter = ',',
        default_value = "ws://127.0.0.1:8080"
    )]
    urls: Vec<String>,

    /// Number of WebSocket connections.
    #[arg(long, default_value_t = 1000)]
    clients: usize,

    /// Number of rooms (`lg-0` ...); client i joins room i % rooms.
    #[arg(long, default_value_t = 10)]
    rooms: usize,

    /// The first N clients of each room send.
    #[arg(long, default_value_t = 2)]
    senders_per_room: usize,

    /// Messages per second per sender (ignored with --ramp).
    #[arg(long, default_value_t = 5.0)]
    rate: f64,

    /// Length of the measured window (of each step with --ramp).
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    duration: Duration,

    /// Sending before measurement starts, at the first step's rate (checked for
    /// correctness, excluded from latency).
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    warmup: Duration,

    /// Bytes of each message string (padded with `x`; never shorter than its header).
    #[arg(long, default_value_t = 64)]
    payload: usize,

    /// Wire dialect used to join and send.
    #[arg(long, value_enum, default_value_t = DialectArg::Subscribe)]
    dialect: DialectArg,

    /// Rooms are named PREFIX0, PREFIX1, ...: two loadgens with different prefixes can share
    /// one server without sharing rooms (tokens then grant PREFIX*).
    #[arg(long, default_value = "lg-")]
    room_prefix: String,

    /// Connection attempts in flight at once.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,

    /// Per-connection limit for TCP connect (+ TLS handshake for wss://) + upgrade + join; the
    /// connect times reported cover the same.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    connect_timeout: Duration,

    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,

    /// Rising per-sender rates, e.g. 5,10,20: one --duration step each on the same
    /// connections; reports each step and the highest sustainable one.
    #[arg(long, value_delimiter = ',')]
    ramp: Vec<f64>,

    /// Server process to measure (CPU over the window, RSS); repeatable.
    #[arg(long = "server-pid", env = "LOADGEN_SERVER_PID", value_delimiter = ',')]
    server_pids: Vec<u32>,

    /// With --server-pid: sample the servers' RSS this often (reported in the JSON).
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    rss_every: Duration,

    /// Write an SVG latency-percentile plot to this file.
    #[arg(long)]
    plot: Option<PathBuf>,

    /// With --server-pid: write an SVG plot of the servers' RSS over time to this file.
    #[arg(long)]
    rss_plot: Option<PathBuf>,

    /// Tokio worker threads [default: number of cores].
    #[arg(long)]
    threads: Option<usize>,

    /// Longest wait for in-flight deliveries after sending stops.
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    drain: Duration,

    /// No progress output.
    #[arg(long, short)]
    quiet: bool,

    /// Pause after all joins are sent before probing readiness.
    #[arg(long, value_parser = parse_duration, default_value = "500ms", hide = true)]
    settle: Duration,

    /// The same pause in milliseconds (the flag's older form).
    #[arg(long, hide = true, conflicts_with = "settle")]
    settle_ms: Option<u64>,

    /// Fraction of the non-sender clients (spread over the rooms) that stop reading their
    /// socket after the readiness probe, so the server should close them as slow consumers.
    /// They are left out of the loss, order and latency figures; how they ended is reported
    /// on its own.
    #[arg(long, default_value_t = 0.0)]
    stall_fraction: f64,

    /// Fraction of the remaining non-sender clients (neither senders nor stalled) that close
    /// cleanly and reconnect and rejoin every --reconnect-every, staggered. They are left out
    /// of the loss, order and latency figures; what they received is reported on its own.
    #[arg(long, default_value_t = 0.0)]
    reconnect_fraction: f64,

    /// Time between reconnects of each reconnecting client.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    reconnect_every: Duration,

    /// How long a reconnecting client stays away between its close and its next connect (a
    /// phone changing networks); with --resume, what was sent meanwhile is replayed.
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    reconnect_away: Duration,

    /// With several --url: each reconnect goes to the next one (with --resume, a resume on
    /// another node).
    #[arg(long)]
    reconnect_elsewhere: bool,

    /// Offer the roomcast.v2 subprotocol (a server that does not select it fails the
    /// connect), read deliveries as envelopes and check that each room's offsets run on by
    /// exactly one within a connection.
    #[arg(long)]
    envelope: bool,

    /// The reconnecting clients rejoin from the last offset and epoch they received and are
    /// checked like the healthy ones across their connections: every message exactly once,
    /// in order (needs a server with --history-size).
    #[arg(long, requires = "envelope")]
    resume: bool,

    /// For a server with `--auth required`: sign one HS256 token per client with this secret
    /// (sub lg-N, subscribe and publish on lg-*) and send it as `Authorization: Bearer`.
    #[arg(long, env = "LOADGEN_TOKEN_SECRET", hide_env_values = true)]
    token_secret: Option<String>,

    /// Hostile clients that join a room of the run and send into it as fast as TCP allows,
    /// reconnecting when closed (reported apart; the healthy figures are unchanged by them).
    #[arg(long, default_value_t = 0)]
    flooders: usize,

    /// Hostile clients that send pings as fast as TCP allows and never read, reconnecting
    /// when closed.
    #[arg(long, default_value_t = 0)]
    pingers: usize,

    /// Bytes of each flooder's message.
    #[arg(long, default_value_t = 1000)]
    flood_payload: usize,

    /// Also report the healthy latency of rooms 0..N and of the others apart (default: the
    /// rooms with a flooder, one per flooder in turn; 0 turns it off).
    #[arg(long)]
    split_rooms: Option<u32>,

    /// For wss:// URLs: PEM file with one or more CA certificates; the servers' certificates
    /// must chain to one of them and name the URL's host (DNS name or IP address). loadgen
    /// has no system roots: a wss:// URL needs this or --tls-insecure.
    #[arg(long, value_name = "PATH", conflicts_with = "tls_insecure")]
    tls_ca: Option<PathBuf>,

    /// For wss:// URLs: accept any server certificate, unchecked (handshake signatures are
    /// still verified). For local benchmarks only: it gives no protection at all.
    #[arg(long)]
    tls_insecure: bool,
}

/// The command line's names for [`Dialect`] (the library stays free of clap).
#[derive(Debug, Clone, Copy, ValueEnum)]
enum DialectArg {
    /// `{"type":"join",...}` / `chat`: the sender does not hear itself.
    Join,
    /// `{"type":"SUBSCRIBE",...}` / `sendMessage`: every member hears it, the sender too.
    Subscribe,
}

impl From<Args> for Config {
    fn from(a: Args) -> Config {
        Config {
            urls: a.urls,
            clients: a.clients,
            rooms: a.rooms,
            senders_per_room: a.senders_per_room,
            rate: a.rate,
            duration: a.duration,
            warmup: a.warmup,
            payload: a.payload,
            dialect: match a.dialect {
                DialectArg::Join => Dialect::Join,
                DialectArg::Subscribe => Dialect::Subscribe,
            },
            room_prefix: a.room_prefix,
            connect_concurrency: a.connect_concurrency,
            connect_timeout: a.connect_timeout,
            json: a.json,
            ramp: a.ramp,
            server_pids: a.server_pids,
            rss_every: a.rss_every,
            plot: a.plot,
            rss_plot: a.rss_plot,
            threads: a.threads,
            drain: a.drain,
            quiet: a.quiet,
            settle: a.settle_ms.map_or(a.settle, Duration::from_millis),
            stall_fraction: a.stall_fraction,
            reconnect_fraction: a.reconnect_fraction,
            reconnect_every: a.reconnect_every,
            reconnect_away: a.reconnect_away,
            reconnect_elsewhere: a.reconnect_elsewhere,
            envelope: a.envelope,
            resume: a.resume,
            token_secret: a.token_secret,
            flooders: a.flooders,
            split_rooms: a.split_rooms.unwrap_or(a.flooders.min(a.rooms) as u32),
            pingers: a.pingers,
            flood_payload: a.flood_payload,
            tls_ca: a.tls_ca,
            tls_insecure: a.tls_insecure,
        }
    }
}

fn main() -> ExitCode {
    let cfg = Config::from(Args::parse());
    let threads = cfg.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadgen: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(loadgen::run(cfg.clone()));
    // Clients were already told to stop; do not let a stuck socket hold the exit.
    rt.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(report) => {
            print!("{}", report.to_text());
            if let Err(e) = loadgen::write_outputs(&cfg, &report) {
                eprintln!("loadgen: {e}");
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Config {
        let mut argv = vec!["loadgen"];
        argv.extend_from_slice(args);
        Config::from(Args::try_parse_from(argv).unwrap())
    }

    /// Every flag form the scripts and RESULTS.md use still parses, bare numbers as seconds.
    #[test]
    fn flags_the_scripts_use() {
        let c = parse(&[
            "--url",
            "ws://127.0.0.1:18081",
            "--url",
            "ws://127.0.0.1:18082",
            "--clients",
            "10000",
            "--rooms",
            "50",
            "--senders-per-room",
            "2",
            "--payload",
            "64",
            "--rate",
            "1.5",
            "--duration",
            "10",
            "--warmup",
            "2",
            "--dialect",
            "join",
            "--threads",
            "1",
            "--connect-concurrency",
            "128",
            "--server-pid",
            "1",
            "--server-pid",
            "2",
            "--json",
            "r.json",
            "-q",
            "--stall-fraction",
            "0.1",
            "--reconnect-fraction",
            "0.05",
            "--reconnect-every",
            "5",
            "--plot",
            "p.svg",
            "--ramp",
            "5,10",
            "--drain",
            "0.5",
            "--settle-ms",
            "100",
            "--envelope",
            "--resume",
        ]);
        assert_eq!(c.urls.len(), 2);
        assert_eq!(c.duration, Duration::from_secs(10));
        assert_eq!(c.warmup, Duration::from_secs(2));
        assert_eq!(c.drain, Duration::from_millis(500));
        assert_eq!(c.settle, Duration::from_millis(100));
        assert_eq!(c.reconnect_every, Duration::from_secs(5));
        assert_eq!(c.dialect, Dialect::Join);
        assert_eq!(c.server_pids, [1, 2]);
        assert_eq!(c.ramp, [5.0, 10.0]);
        assert!(c.quiet && c.envelope && c.resume);
        assert_eq!(c.validate(), Ok(()));
    }

    /// Offsets come only in envelopes, so --resume alone is refused by the parser itself.
    #[test]
    fn resume_needs_envelope() {
        let err = Args::try_parse_from(["loadgen", "--resume"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        assert!(err.to_string().contains("--envelope"), "{err}");
        let c = parse(&["--envelope"]);
        assert!(c.envelope && !c.resume);
        assert!(parse(&["--resume", "--envelope"]).resume);
    }

    #[test]
    fn tls_flags() {
        let c = parse(&["--url", "wss://127.0.0.1:8443", "--tls-ca", "ca.pem"]);
        assert_eq!(c.urls, ["wss://127.0.0.1:8443"]);
        assert_eq!(c.tls_ca, Some(PathBuf::from("ca.pem")));
        assert!(!c.tls_insecure);
        assert_eq!(c.validate(), Ok(()));
        let c = parse(&["--url", "wss://h,ws://g", "--tls-insecure"]);
        assert!(c.tls_insecure && c.tls_ca.is_none());
        assert_eq!(c.validate(), Ok(()));
        let err = Args::try_parse_from(["loadgen", "--tls-ca", "a", "--tls-insecure"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
        let c = parse(&["--url", "wss://127.0.0.1:8443"]);
        assert!(matches!(
            c.validate(),
            Err(loadgen::ConfigError::NoTrust(u)) if u == "wss://127.0.0.1:8443"
        ));
    }

    #[test]
    fn durations_take_units_and_defaults_match_the_library() {
        let c = parse(&["--duration", "2m", "--warmup", "250ms", "--settle", "1s"]);
        assert_eq!(c.duration, Duration::from_secs(120));
        assert_eq!(c.warmup, Duration::from_millis(250));
        assert_eq!(c.settle, Duration::from_secs(1));
        assert!(Args::try_parse_from(["loadgen", "--duration", "10h"]).is_err());
        assert!(Args::try_parse_from(["loadgen", "--settle", "1s", "--settle-ms", "5"]).is_err());
        // The command line's defaults and Config::default() must not drift apart (but for
        // what a variable in the shell running the test sets).
        let (mut cli, lib) = (parse(&[]), Config::default());
        if std::env::var_os("LOADGEN_URL").is_some() {
            cli.urls.clone_from(&lib.urls);
        }
        if std::env::var_os("LOADGEN_SERVER_PID").is_some() {
            cli.server_pids.clone_from(&lib.server_pids);
        }
        assert_eq!(format!("{cli:?}"), format!("{lib:?}"));
    }
}
