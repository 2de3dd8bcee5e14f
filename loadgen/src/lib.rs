//! loadgen: an open-loop load generator and correctness checker for roomcast.
//!
//! Clients join rooms `lg-<r>` in either wire dialect, the first few of each room send
//! self-describing messages on a fixed schedule, and every receiver checks what it gets
//! (loss, duplicates, order, routing) and how late it is relative to the *scheduled* send time,
//! so a slow server cannot hide its queueing delay by slowing the senders down.
//!
//! Where things are: `config` (what a run is asked to do; the command line is in main.rs),
//! `run` (the run's phases, in the order [`run`] calls them), `client` (one simulated
//! connection), `envelope` (`--envelope`: reading envelopes, room offsets and resumes), `ws`
//! (loadgen's own WebSocket codec, independent of the server's on purpose), `tls` (`wss://`:
//! the shared rustls client configuration and the plain-or-TLS connection halves), `assemble`
//! (measurements to [`Report`]), `report` (the report's data and text), `plot` (the SVG
//! plots), `sys` (/proc readings and OS limits), `progress` (what the terminal shows).

pub mod assemble;
pub mod client;
pub mod config;
pub mod envelope;
pub mod hostile;
pub mod plot;
pub mod progress;
pub mod report;
mod run;
pub mod sys;
pub mod tls;
pub mod token;
pub mod ws;

use tokio::time::Instant;

pub use config::{parse_duration, Config, ConfigError, Dialect, DurationError};
pub use report::Report;

/// Why a run could not start or finish.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Url(#[from] ws::UrlError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("{url}: cannot resolve: {source}")]
    Resolve { url: String, source: std::io::Error },
    #[error("{url}: no address")]
    NoAddress { url: String },
    /// Too many clients for this process's open files or the local port range.
    #[error(transparent)]
    Limit(#[from] sys::LimitError),
    #[error("--server-pid {0}: no such process")]
    NoServerProcess(u32),
    /// Every client failed to connect; `reasons` lists the failures, commonest first.
    #[error("no client could connect to {urls}: {reasons}")]
    NoneConnected { urls: String, reasons: String },
}

/// Why the --json, --plot or --rss-plot file could not be written.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("JSON encoding: {0}")]
    Json(#[from] serde_json::Error),
    #[error("{}: {source}", path.display())]
    Write {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

/// Runs the whole load test: connect, join, confirm readiness, send on schedule, drain,
/// and summarise. Always finishes within roughly connect phase + warm-up + steps + drain.
pub async fn run(cfg: Config) -> Result<Report> {
    cfg.validate()?;
    let started = Instant::now();
    let started_ns = client::now_ns();
    let cpu_at_start = sys::self_cpu_seconds();
    let targets = run::resolve(&cfg).await?;
    run::preflight(&cfg, &targets)?;
    let rss = run::RssSampler::start(&cfg.server_pids, cfg.rss_every, started);
    let threads = tokio::runtime::Handle::current().metrics().num_workers();

    let mut shared = run::new_shared(&cfg, threads);
    shared.tls = targets.tls();
    let mut clients = run::Clients::spawn(&cfg, &targets, shared);
    let mut connect = clients.collect_connects(&cfg).await?;
    let plan = clients.publish_plan(&cfg, &connect.connected_ids);
    connect.not_ready = clients.await_readiness(&cfg, &plan).await;
    let schedule = clients.publish_schedule(&cfg);
    let hostile = (cfg.flooders + cfg.pingers > 0)
        .then(|| hostile::Hostile::start(&cfg, targets.urls(), targets.addrs()));
    let cpu = clients.send(&cfg, &schedule).await;
    let server_rss = cfg
        .server_pids
        .iter()
        .map(|&pid| sys::proc_rss_kb(pid).unwrap_or((0, 0)))
        .collect();
    let drained = clients.drain(&cfg).await;
    let hostile = match hostile {
        Some(h) => Some(h.stop().await),
        None => None,
    };
    let collected = clients.stop().await;

    let since_start = |ns: u64| ns.saturating_sub(started_ns) as f64 / 1e9;
    let measurements = assemble::Measurements {
        threads,
        senders: schedule.total_senders as usize,
        connect,
        recipients: plan.recipients.clone(),
        resume_recipients: plan.resume_recipients.clone(),
        results: collected.results,
        unstopped: collected.unstopped,
        latency: collected.latency,
        lag: collected.lag,
        error_codes: collected.error_codes,
        cpu,
        server_rss,
        rss_samples: rss.map(run::RssSampler::finish).unwrap_or_default(),
        window_s: (
            since_start(schedule.phases[1].start_ns),
            since_start(schedule.end_ns()),
        ),
        drained,
        loadgen_cpu_total_s: sys::self_cpu_seconds() - cpu_at_start,
        elapsed_s: started.elapsed().as_secs_f64(),
    };
    let mut report = Report::assemble(&cfg, measurements);
    report.hostile = hostile;
    report.split_rooms = (cfg.split_rooms > 0).then(|| {
        let [rest, first] = &collected.split;
        report::SplitRooms {
            first_rooms: cfg.split_rooms,
            latency_first: report::Latency::from_hist(first),
            latency_rest: report::Latency::from_hist(rest),
        }
    });
    Ok(report)
}

/// Writes the --json, --plot and --rss-plot files the configuration asks for.
pub fn write_outputs(cfg: &Config, report: &Report) -> std::result::Result<(), OutputError> {
    let write = |path: &std::path::Path, text: String| {
        std::fs::write(path, text).map_err(|source| OutputError::Write {
            path: path.to_path_buf(),
            source,
        })
    };
    if let Some(path) = &cfg.json {
        write(path, serde_json::to_string_pretty(report)? + "\n")?;
    }
    if let Some(path) = &cfg.plot {
        write(path, report.to_svg())?;
    }
    if let (Some(path), Some(svg)) = (&cfg.rss_plot, report.to_rss_svg()) {
        write(path, svg)?;
    }
    Ok(())
}
