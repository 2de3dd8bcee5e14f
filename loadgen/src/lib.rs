//! loadgen: an open-loop load generator and correctness checker for roomcast.
//!
//! Clients join rooms `lg-<r>` in either wire dialect, the first few of each room send
//! self-describing messages on a fixed schedule, and every receiver checks what it gets
//! (loss, duplicates, order, routing) and how late it is relative to the *scheduled* send time,
//! so a slow server cannot hide its queueing delay by slowing the senders down.

pub mod client;
pub mod config;
pub mod progress;
pub mod report;
pub mod sys;
pub mod ws;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::{sleep, sleep_until, Instant};

use client::{
    assign_roles, client_task, instant_at, new_hist, now_ns, ClientArgs, ClientResult, Ctl, Hists,
    PhaseSpec, Plan, Role, Schedule, Shared,
};
pub use config::{parse_duration, Config, ConfigError, Dialect, DurationError};
use progress::Progress;
pub use report::Report;
use report::{
    per_delivery_us, ConfigEcho, ConnectReport, Counts, Curves, Lag, Latency, ReconnectReport,
    RolesReport, ServerProc, ServerReport, StallReport, StepReport, SUSTAINABLE_P99_US,
};

/// Why a run could not start or finish.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Url(#[from] ws::UrlError),
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

/// Readiness probes are resent this often until every member has seen one.
const PROBE_EVERY: Duration = Duration::from_millis(250);
/// Gap between publishing the schedule and its first slot, so every client has it.
const SCHEDULE_LEAD: Duration = Duration::from_millis(200);
/// How long stopped clients get to finish and hand in their counts.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

struct CpuSample {
    own: f64,
    server: Vec<Option<f64>>,
}

fn sample_cpu(pids: &[u32]) -> CpuSample {
    CpuSample {
        own: sys::self_cpu_seconds(),
        server: pids.iter().map(|&p| sys::proc_cpu_seconds(p)).collect(),
    }
}

fn server_delta(a: &CpuSample, b: &CpuSample) -> f64 {
    a.server
        .iter()
        .zip(&b.server)
        .filter_map(|(x, y)| Some(y.as_ref()? - x.as_ref()?))
        .sum()
}

fn merge(into: &mut Histogram<u64>, from: &Histogram<u64>) {
    // Both come from new_hist(), so their bounds always match.
    let _ = into.add(from);
}

/// Runs the whole load test: connect, join, confirm readiness, send on schedule, drain,
/// and summarise. Always finishes within roughly connect phase + warm-up + steps + drain.
pub async fn run(cfg: Config) -> Result<Report> {
    cfg.validate()?;
    let run_started = Instant::now();
    client::base();
    let cpu_at_start = sys::self_cpu_seconds();
    let rates = cfg.rates();
    let n_phases = 1 + rates.len();
    let clients = cfg.clients;
    let rooms = cfg.rooms as u32;

    let mut urls = Vec::new();
    let mut addrs: Vec<SocketAddr> = Vec::new();
    for u in &cfg.urls {
        let url = ws::WsUrl::parse(u)?;
        let addr = tokio::net::lookup_host(url.socket_addr_string())
            .await
            .map_err(|source| Error::Resolve {
                url: u.clone(),
                source,
            })?
            .next()
            .ok_or_else(|| Error::NoAddress { url: u.clone() })?;
        urls.push(Arc::new(url));
        addrs.push(addr);
    }
    let mut per_dest: BTreeMap<SocketAddr, usize> = BTreeMap::new();
    for (i, a) in addrs.iter().enumerate() {
        let n = clients / addrs.len() + usize::from(i < clients % addrs.len());
        *per_dest.entry(*a).or_insert(0) += n;
    }
    sys::check_port_range(per_dest.values().copied().max().unwrap_or(0))?;
    sys::raise_nofile(clients)?;
    for &pid in &cfg.server_pids {
        if !sys::process_exists(pid) {
            return Err(Error::NoServerProcess(pid));
        }
    }

    let threads = tokio::runtime::Handle::current().metrics().num_workers();
    // Big reads keep syscalls per delivery low, but 10k clients x 64 KiB would be 640 MiB,
    // so the buffer shrinks as the client count grows (frames larger than it still fit:
    // the buffer grows for them).
    let read_buf = ((256usize << 20) / clients).clamp(4 << 10, 64 << 10);
    let connect_timeout = cfg.connect_timeout;
    // The connect phase as a whole is bounded too: twice the per-connection limit plus a
    // second per 500 clients.
    let connect_deadline =
        Instant::now() + connect_timeout * 2 + Duration::from_secs_f64(clients as f64 / 500.0);
    let (roles, reconnect_slots) = assign_roles(
        clients,
        rooms,
        cfg.senders_per_room as u32,
        cfg.stall_fraction,
        cfg.reconnect_fraction,
    );
    let shared = Arc::new(Shared {
        rooms,
        senders_per_room: cfg.senders_per_room as u32,
        dialect: cfg.dialect,
        payload: cfg.payload,
        n_phases,
        read_buf,
        connect_timeout,
        connect_deadline,
        room_ready: (0..rooms).map(|_| AtomicU32::new(0)).collect(),
        shards: (0..(threads * 4).max(4))
            .map(|_| Mutex::new(Hists::new(n_phases)))
            .collect(),
        sent: AtomicU64::new(0),
        expected: AtomicU64::new(0),
        received: AtomicU64::new(0),
        error_codes: Mutex::new(BTreeMap::new()),
        roles,
        reconnect_slots,
        reconnect_every: cfg.reconnect_every,
    });

    let (ctl_tx, ctl_rx) = watch::channel(Ctl::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let (outcome_tx, mut outcome_rx) = mpsc::unbounded_channel();
    let permits = Arc::new(Semaphore::new(cfg.connect_concurrency));
    let mut progress = Progress::new(cfg.quiet);

    // ---- connect -------------------------------------------------------------------------
    progress.stage("connect", clients as u64, "clients");
    let connect_started = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|i| {
            tokio::spawn(client_task(ClientArgs {
                id: i as u32,
                addr: addrs[i % addrs.len()],
                url: Arc::clone(&urls[i % urls.len()]),
                shared: Arc::clone(&shared),
                connect_permits: Arc::clone(&permits),
                outcomes: outcome_tx.clone(),
                ctl: ctl_rx.clone(),
                stop: stop_rx.clone(),
            }))
        })
        .collect();
    drop(outcome_tx);

    let mut connect_hist = new_hist();
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    let mut connected_ids: Vec<u32> = Vec::with_capacity(clients);
    let mut outcomes = 0usize;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let collect_deadline = connect_deadline + Duration::from_secs(2);
    while outcomes < clients {
        tokio::select! {
            o = outcome_rx.recv() => {
                let Some(o) = o else { break };
                outcomes += 1;
                match o.result {
                    Ok(d) => {
                        connect_hist.saturating_record((d.as_micros() as u64).max(1));
                        connected_ids.push(o.id);
                    }
                    Err(reason) => *failures.entry(reason.to_string()).or_insert(0) += 1,
                }
            }
            _ = tick.tick() => {}
            () = sleep_until(collect_deadline) => break,
        }
        let (ok, failed) = (connected_ids.len(), outcomes - connected_ids.len());
        progress.update(outcomes as u64, || format!("ok {ok}, failed {failed}"));
    }
    if outcomes < clients {
        *failures
            .entry("connect: no outcome by the connect phase deadline".into())
            .or_insert(0) += (clients - outcomes) as u64;
    }
    let connect_total = connect_started.elapsed();
    if connected_ids.is_empty() {
        let _ = stop_tx.send(true);
        let mut reasons: Vec<_> = failures.iter().collect();
        reasons.sort_by(|a, b| b.1.cmp(a.1));
        let list: Vec<String> = reasons.iter().map(|(r, n)| format!("{n} x {r}")).collect();
        return Err(Error::NoneConnected {
            urls: cfg.urls.join(", "),
            reasons: list.join("; "),
        });
    }

    // ---- plan and readiness ----------------------------------------------------------------
    let mut members = vec![0u32; rooms as usize];
    // Members whose deliveries are checked: not stalled, not reconnecting.
    let mut healthy = vec![0u32; rooms as usize];
    let mut prober = vec![u32::MAX; rooms as usize];
    for &id in &connected_ids {
        let r = (id % rooms) as usize;
        members[r] += 1;
        if shared.role(id) == Role::Healthy {
            healthy[r] += 1;
        }
        prober[r] = prober[r].min(id);
    }
    // The join dialect never echoes to the sender, so a room's sender cannot confirm its
    // own probe nor receive its own messages.
    let others = |m: u32| match cfg.dialect {
        Dialect::Subscribe => m,
        Dialect::Join => m.saturating_sub(1),
    };
    let required: Vec<u32> = members.iter().map(|&m| others(m)).collect();
    // Senders are always healthy, so the join dialect's "not the sender" applies as is.
    let recipients: Vec<u32> = healthy.iter().map(|&m| others(m)).collect();
    let plan = Arc::new(Plan {
        prober,
        required: required.clone(),
        recipients,
    });
    ctl_tx.send_modify(|c| c.plan = Some(Arc::clone(&plan)));
    sleep(cfg.settle).await;

    let total_required: u64 = required.iter().map(|&r| u64::from(r)).sum();
    let count_ready = || -> u64 {
        shared
            .room_ready
            .iter()
            .zip(&required)
            .map(|(r, &req)| u64::from(r.load(Ordering::Relaxed).min(req)))
            .sum()
    };
    progress.stage("ready", total_required, "clients");
    let probe_deadline =
        Instant::now() + Duration::from_secs(5) + Duration::from_secs_f64(clients as f64 / 2000.0);
    let mut round = 0u32;
    let mut next_probe = Instant::now();
    loop {
        let ready = count_ready();
        progress.update(ready, String::new);
        if ready >= total_required || Instant::now() >= probe_deadline {
            break;
        }
        if Instant::now() >= next_probe {
            round += 1;
            ctl_tx.send_modify(|c| c.probe_round = round);
            next_probe = Instant::now() + PROBE_EVERY;
        }
        sleep(Duration::from_millis(20)).await;
    }
    let not_ready = total_required - count_ready();
    if not_ready > 0 {
        progress.note(&format!(
            "warning: {not_ready} clients never confirmed their room membership; sending anyway"
        ));
    }

    // ---- open-loop sending -----------------------------------------------------------------
    let t0 = now_ns() + SCHEDULE_LEAD.as_nanos() as u64;
    let warm_ns = cfg.warmup.as_nanos() as u64;
    let step_ns = cfg.duration.as_nanos() as u64;
    let mut phases = vec![PhaseSpec {
        start_ns: t0,
        end_ns: t0 + warm_ns,
        rate: rates[0],
    }];
    for (i, &rate) in rates.iter().enumerate() {
        let start = t0 + warm_ns + i as u64 * step_ns;
        phases.push(PhaseSpec {
            start_ns: start,
            end_ns: start + step_ns,
            rate,
        });
    }
    let total_senders = (rooms as usize * cfg.senders_per_room).min(clients) as u32;
    let schedule = Arc::new(Schedule {
        phases: phases.clone(),
        total_senders,
    });
    ctl_tx.send_modify(|c| c.schedule = Some(Arc::clone(&schedule)));

    let run_len = schedule.end_ns() - t0;
    progress.stage("run", run_len / 1_000_000_000, "s");
    let mut samples: Vec<CpuSample> = Vec::with_capacity(n_phases);
    let mut rss: Vec<(u64, u64)> = Vec::new();
    for (i, ph) in phases.iter().enumerate().skip(1) {
        // Sample at the start of the first measured step, and at the end of every step.
        let marks = if i == 1 {
            vec![ph.start_ns, ph.end_ns]
        } else {
            vec![ph.end_ns]
        };
        for mark in marks {
            loop {
                let now = now_ns();
                if now >= mark {
                    break;
                }
                let sent = shared.sent.load(Ordering::Relaxed);
                let got = shared.received.load(Ordering::Relaxed);
                let exp = shared.expected.load(Ordering::Relaxed);
                let step = schedule.phase_of(now).unwrap_or(0);
                progress.update(now.saturating_sub(t0) / 1_000_000_000, || {
                    let what = if step == 0 {
                        "warm-up".to_string()
                    } else {
                        format!("{}/s", schedule.phases[step].rate)
                    };
                    format!("{what} sent {sent} delivered {got}/{exp}")
                });
                sleep_until(instant_at(mark.min(now + 1_000_000_000))).await;
            }
            samples.push(sample_cpu(&cfg.server_pids));
        }
    }
    for &pid in &cfg.server_pids {
        rss.push(sys::proc_rss_kb(pid).unwrap_or((0, 0)));
    }

    // ---- drain -------------------------------------------------------------------------------
    let drain_started = Instant::now();
    let drain_deadline = drain_started + cfg.drain;
    progress.stage("drain", cfg.drain.as_millis() as u64, "ms");
    let drained = loop {
        let got = shared.received.load(Ordering::Relaxed);
        let exp = shared.expected.load(Ordering::Relaxed);
        if got >= exp {
            break true;
        }
        if Instant::now() >= drain_deadline {
            break false;
        }
        let waited = drain_started.elapsed().as_millis() as u64;
        progress.update(waited, || format!("waiting for {} deliveries", exp - got));
        sleep(Duration::from_millis(10)).await;
    };

    // ---- stop and collect ----------------------------------------------------------------
    let _ = stop_tx.send(true);
    progress.finish();
    let stop_deadline = Instant::now() + STOP_TIMEOUT;
    let mut results: Vec<ClientResult> = Vec::with_capacity(clients);
    let mut unstopped = 0u64;
    for h in handles {
        let abort = h.abort_handle();
        match tokio::time::timeout_at(stop_deadline, h).await {
            Ok(Ok(r)) => results.push(r),
            Ok(Err(_)) => unstopped += 1,
            Err(_) => {
                abort.abort();
                unstopped += 1;
            }
        }
    }
    progress.finish();

    // ---- summarise -----------------------------------------------------------------------
    let mut counts = vec![Counts::default(); n_phases];
    let mut arrived = vec![0u64; n_phases];
    let (mut errors, mut unparseable, mut other) = (0u64, 0u64, 0u64);
    let mut disconnects: BTreeMap<String, u64> = BTreeMap::new();
    let with_roles = !shared.roles.is_empty();
    let mut stall = StallReport::default();
    let mut recon = ReconnectReport {
        every_s: cfg.reconnect_every.as_secs_f64(),
        ..ReconnectReport::default()
    };
    let mut healthy_clients = 0usize;
    for r in &results {
        if r.connected {
            match r.role {
                Role::Healthy => healthy_clients += 1,
                Role::Stalled => {
                    stall.clients += 1;
                    stall.received += r.side_received;
                }
                Role::Reconnecting { .. } => {
                    recon.clients += 1;
                    recon.received += r.side_received;
                }
            }
        }
        recon.reconnects += r.reconnects;
        recon.failed += r.reconnect_failures.len() as u64;
        for f in &r.reconnect_failures {
            *recon.failures.entry(f.clone()).or_insert(0) += 1;
        }
        let recipients = u64::from(plan.recipients[(r.id % rooms) as usize]);
        for (p, pc) in r.phases.iter().enumerate() {
            let c = &mut counts[p];
            c.sent += pc.sent;
            c.expected += pc.sent * recipients;
            c.received += pc.received;
            c.duplicates += pc.duplicates;
            c.order_violations += pc.order_violations;
            c.misrouted += pc.misrouted;
            arrived[p] += pc.arrived;
        }
        errors += r.errors;
        unparseable += r.unparseable;
        other += r.other_frames;
        match (&r.disconnect, r.role) {
            (Some(d), Role::Stalled) => {
                stall.closed_by_server += 1;
                *stall.close_reasons.entry(d.clone()).or_insert(0) += 1;
            }
            (None, Role::Stalled) if r.connected => stall.still_open += 1,
            (Some(d), _) => *disconnects.entry(d.clone()).or_insert(0) += 1,
            (None, _) => {}
        }
    }
    let roles = with_roles.then_some(RolesReport {
        healthy_clients,
        stall_fraction: cfg.stall_fraction,
        reconnect_fraction: cfg.reconnect_fraction,
        stalled: stall,
        reconnecting: recon,
    });
    counts.iter_mut().for_each(Counts::finish);
    let mut lat: Vec<Histogram<u64>> = (0..n_phases).map(|_| new_hist()).collect();
    let mut lag: Vec<Histogram<u64>> = (0..n_phases).map(|_| new_hist()).collect();
    for shard in &shared.shards {
        let h = shard.lock().unwrap_or_else(|e| e.into_inner());
        for p in 0..n_phases {
            merge(&mut lat[p], &h.latency[p]);
            merge(&mut lag[p], &h.lag[p]);
        }
    }
    let active_senders = connected_ids
        .iter()
        .filter(|&&id| id / rooms < cfg.senders_per_room as u32)
        .count() as f64;
    let with_server = !cfg.server_pids.is_empty();

    let step_report = |counts: Counts,
                       rate: f64,
                       dur: f64,
                       arrived: u64,
                       lat: &Histogram<u64>,
                       lag: &Histogram<u64>,
                       a: &CpuSample,
                       b: &CpuSample| {
        let own = b.own - a.own;
        let server = server_delta(a, b);
        let latency = Latency::from_hist(lat);
        let sustainable =
            counts.lost == 0 && latency.samples > 0 && latency.p99_us < SUSTAINABLE_P99_US;
        StepReport {
            rate_per_sender: rate,
            offered_msgs_per_s: rate * active_senders,
            duration_s: dur,
            counts,
            deliveries_in_window: arrived,
            deliveries_per_s: arrived as f64 / dur,
            latency,
            sender_lag: Lag {
                p99_us: lag.value_at_quantile(0.99),
                max_us: lag.max(),
            },
            loadgen_cpu_s: own,
            loadgen_cpu_us_per_delivery: per_delivery_us(own, arrived),
            server_cpu_s: with_server.then_some(server),
            server_cpu_us_per_delivery: with_server.then(|| per_delivery_us(server, arrived)),
            sustainable,
        }
    };

    let mut steps = Vec::new();
    let mut curves = Vec::new();
    for (i, &rate) in rates.iter().enumerate() {
        let p = i + 1;
        steps.push(step_report(
            counts[p].clone(),
            rate,
            cfg.duration.as_secs_f64(),
            arrived[p],
            &lat[p],
            &lag[p],
            &samples[i],
            &samples[i + 1],
        ));
        let name = if rates.len() == 1 {
            "measured".to_string()
        } else {
            format!("{rate}/s per sender")
        };
        curves.push((name, lat[p].clone()));
    }
    let mut all = Counts::default();
    let mut all_lat = new_hist();
    let mut all_lag = new_hist();
    for p in 1..n_phases {
        all.add(&counts[p]);
        merge(&mut all_lat, &lat[p]);
        merge(&mut all_lag, &lag[p]);
    }
    let measured_arrived: u64 = arrived[1..].iter().sum();
    let first = &samples[0];
    let last = &samples[samples.len() - 1];
    let mut measured = step_report(
        all,
        rates[0],
        cfg.duration.as_secs_f64() * rates.len() as f64,
        measured_arrived,
        &all_lat,
        &all_lag,
        first,
        last,
    );
    if rates.len() > 1 {
        // A ramp has no single rate; the offered load is the time-weighted mean.
        let mean_rate = rates.iter().sum::<f64>() / rates.len() as f64;
        measured.rate_per_sender = mean_rate;
        measured.offered_msgs_per_s = mean_rate * active_senders;
    }
    let highest_sustainable_rate = if cfg.ramp.is_empty() {
        None
    } else {
        steps
            .iter()
            .filter(|s| s.sustainable)
            .map(|s| s.rate_per_sender)
            .reduce(f64::max)
    };
    let mut totals = Counts::default();
    for c in &counts {
        totals.add(c);
    }

    let server = with_server.then(|| {
        let pids: Vec<ServerProc> = cfg
            .server_pids
            .iter()
            .enumerate()
            .map(|(i, &pid)| ServerProc {
                pid,
                cpu_s: match (first.server[i], last.server[i]) {
                    (Some(a), Some(b)) => b - a,
                    _ => 0.0,
                },
                rss_kb: rss[i].0,
                peak_rss_kb: rss[i].1,
            })
            .collect();
        let cpu_s = pids.iter().map(|p| p.cpu_s).sum();
        ServerReport {
            cpu_s,
            cpu_us_per_delivery: per_delivery_us(cpu_s, measured_arrived),
            rss_kb: pids.iter().map(|p| p.rss_kb).sum(),
            peak_rss_kb: pids.iter().map(|p| p.peak_rss_kb).sum(),
            pids,
        }
    });

    let error_codes = shared
        .error_codes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let ms = |us: u64| us as f64 / 1000.0;
    Ok(Report {
        config: ConfigEcho {
            urls: cfg.urls.clone(),
            clients,
            rooms: cfg.rooms,
            senders_per_room: cfg.senders_per_room,
            senders: total_senders as usize,
            dialect: cfg.dialect.name().to_string(),
            rates: rates.clone(),
            duration_s: cfg.duration.as_secs_f64(),
            warmup_s: cfg.warmup.as_secs_f64(),
            drain_s: cfg.drain.as_secs_f64(),
            payload_bytes: cfg.payload,
            connect_concurrency: cfg.connect_concurrency,
            threads,
        },
        connect: ConnectReport {
            attempted: clients,
            connected: connected_ids.len(),
            failed: clients - connected_ids.len(),
            failures,
            total_s: connect_total.as_secs_f64(),
            p50_ms: ms(connect_hist.value_at_quantile(0.5)),
            p99_ms: ms(connect_hist.value_at_quantile(0.99)),
            max_ms: ms(connect_hist.max()),
            not_ready,
        },
        totals,
        warmup: counts[0].clone(),
        measured,
        steps,
        highest_sustainable_rate,
        server_errors: errors,
        server_error_codes: error_codes,
        unparseable_frames: unparseable,
        other_frames: other,
        disconnects,
        unstopped_clients: unstopped,
        roles,
        loadgen_cpu_total_s: sys::self_cpu_seconds() - cpu_at_start,
        server,
        drained,
        elapsed_s: run_started.elapsed().as_secs_f64(),
        curves: Curves(curves),
    })
}

/// Writes the --json and --plot files the configuration asks for.
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
    Ok(())
}
