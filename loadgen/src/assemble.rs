//! From measurements to the report: `Report::assemble` takes what the phases of a run
//! collected and computes every figure of the report. It reads no clock and no /proc, so it
//! is tested with made-up measurements.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::client::{new_hist, ClientResult, Outcome, PhaseCounters, Role};
use crate::envelope::OffsetCounts;
use crate::report::{
    per_delivery_us, ConfigEcho, ConnectReport, Counts, Curves, EnvelopeReport, Lag, Latency,
    ReconnectReport, Report, ResumeReport, RolesReport, RssSample, RssTrend, ServerProc,
    ServerReport, StallReport, StepReport, SUSTAINABLE_P99_US,
};
use crate::{sys, Config, Dialect};

/// CPU seconds used so far by loadgen and by each --server-pid (`None`: unreadable).
#[derive(Debug, Clone, Default)]
pub struct CpuSample {
    pub own: f64,
    pub server: Vec<Option<f64>>,
}

impl CpuSample {
    pub fn now(pids: &[u32]) -> CpuSample {
        CpuSample {
            own: sys::self_cpu_seconds(),
            server: pids.iter().map(|&p| sys::proc_cpu_seconds(p)).collect(),
        }
    }

    /// Server CPU seconds from `self` to `later`, over the pids readable at both.
    fn server_until(&self, later: &CpuSample) -> f64 {
        self.server
            .iter()
            .zip(&later.server)
            .filter_map(|(x, y)| Some(y.as_ref()? - x.as_ref()?))
            .sum()
    }
}

pub fn merge(into: &mut Histogram<u64>, from: &Histogram<u64>) {
    // Both come from new_hist(), so their bounds always match.
    let _ = into.add(from);
}

/// What the connect phase saw.
#[derive(Debug, Clone)]
pub struct ConnectPhase {
    /// Per successful connect: TCP (+ TLS handshake for wss://) + upgrade + join, in µs.
    pub hist: Histogram<u64>,
    /// Failed connects by reason.
    pub failures: BTreeMap<String, u64>,
    pub connected_ids: Vec<u32>,
    /// From the first connect attempt to the last outcome.
    pub total: Duration,
    /// Connected clients whose membership no readiness probe confirmed.
    pub not_ready: u64,
}

impl ConnectPhase {
    pub fn record(&mut self, o: Outcome) {
        match o.result {
            Ok(d) => {
                self.hist.saturating_record((d.as_micros() as u64).max(1));
                self.connected_ids.push(o.id);
            }
            Err(reason) => *self.failures.entry(reason.to_string()).or_insert(0) += 1,
        }
    }

    /// `N x reason` for every failure, commonest first.
    pub fn failure_list(&self) -> String {
        let mut reasons: Vec<_> = self.failures.iter().collect();
        reasons.sort_by(|a, b| b.1.cmp(a.1));
        let list: Vec<String> = reasons.iter().map(|(r, n)| format!("{n} x {r}")).collect();
        list.join("; ")
    }
}

/// Everything a run measured, as the phases hand it over.
pub struct Measurements {
    /// Tokio worker threads the run had.
    pub threads: usize,
    /// Sender slots in the schedule (rooms x senders per room, at most the clients).
    pub senders: usize,
    pub connect: ConnectPhase,
    /// Per room: deliveries one message should cause at the healthy clients.
    pub recipients: Vec<u32>,
    /// Per room: and at the resuming clients (all 0 without --resume).
    pub resume_recipients: Vec<u32>,
    pub results: Vec<ClientResult>,
    pub unstopped: u64,
    /// Per phase (0 is the warm-up): delivery latency and sender lag, in µs.
    pub latency: Vec<Histogram<u64>>,
    pub lag: Vec<Histogram<u64>>,
    pub error_codes: BTreeMap<String, u64>,
    /// At the start of the first measured step, then at the end of every step.
    pub cpu: Vec<CpuSample>,
    /// Per --server-pid at the end of the window: (VmRSS, VmHWM) in KiB.
    pub server_rss: Vec<(u64, u64)>,
    /// The servers' RSS over the run (empty without --server-pid).
    pub rss_samples: Vec<RssSample>,
    /// The measured window, seconds since the run started.
    pub window_s: (f64, f64),
    pub drained: bool,
    pub loadgen_cpu_total_s: f64,
    pub elapsed_s: f64,
}

/// The clients' counters summed up.
struct Tally {
    /// Per phase, healthy clients only.
    counts: Vec<Counts>,
    /// Per phase: delivery frames of any kind that arrived in it.
    arrived: Vec<u64>,
    errors: u64,
    unparseable: u64,
    other: u64,
    disconnects: BTreeMap<String, u64>,
    healthy: usize,
    stall: StallReport,
    recon: ReconnectReport,
    /// With --resume: the resuming clients, all phases together.
    resume: Option<ResumeTally>,
    /// Everyone else's offsets.
    offsets: OffsetCounts,
    /// The join dialect: a sender does not hear its own messages.
    join_dialect: bool,
}

#[derive(Default)]
struct ResumeTally {
    clients: usize,
    reconnects: u64,
    /// `sent` stays 0: resuming clients never send.
    counts: Counts,
    offsets: OffsetCounts,
}

impl ResumeTally {
    fn report(mut self) -> ResumeReport {
        self.counts.finish();
        let (c, o) = (&self.counts, &self.offsets);
        ResumeReport {
            clients: self.clients,
            reconnects: self.reconnects,
            expected: c.expected,
            deliveries: c.received,
            lost: c.lost,
            lost_announced: c.lost_announced,
            lost_silent: c.lost_silent,
            loss_pct: c.loss_pct,
            duplicates: c.duplicates,
            reordered: c.order_violations,
            misrouted: c.misrouted,
            recovered: o.recovered,
            recovered_false: o.recovered_false,
            replayed: o.replayed,
            gap_notices: o.gap_notices,
            offset_gaps: o.gaps,
            offset_repeats: o.repeats,
        }
    }
}

impl Tally {
    fn new(n_phases: usize, cfg: &Config) -> Tally {
        Tally {
            counts: vec![Counts::default(); n_phases],
            arrived: vec![0; n_phases],
            errors: 0,
            unparseable: 0,
            other: 0,
            disconnects: BTreeMap::new(),
            healthy: 0,
            stall: StallReport::default(),
            recon: ReconnectReport {
                every_s: cfg.reconnect_every.as_secs_f64(),
                ..ReconnectReport::default()
            },
            resume: cfg.resume.then(ResumeTally::default),
            offsets: OffsetCounts::default(),
            join_dialect: cfg.dialect == Dialect::Join,
        }
    }

    /// Adds one client; a message it sent is owed to `recipients` healthy and `resuming`
    /// resuming members of its room. `room_owed`: per phase, what each member of its room
    /// is owed (see [`owed_per_room`]).
    fn add(&mut self, r: &ClientResult, (recipients, resuming): (u64, u64), room_owed: &[u64]) {
        self.add_role(r);
        let resumes = matches!(r.role, Role::Reconnecting { .. });
        let join_dialect = self.join_dialect;
        // Only a checked client is owed anything: a healthy one, or one that resumes.
        let checked =
            r.connected && (r.role == Role::Healthy || (resumes && self.resume.is_some()));
        let resume = self.resume.as_mut().filter(|_| resumes);
        // What this client lost, per phase, when the server told it it might have (counted
        // for the whole run: see `announced_loss`).
        let announced = |p: usize, pc: &PhaseCounters| {
            if !(checked && r.offsets.announced_loss()) {
                return 0;
            }
            let mut owed = room_owed.get(p).copied().unwrap_or(0);
            if join_dialect {
                // The join dialect never echoes: a sender is not owed its own messages.
                owed = owed.saturating_sub(not_refused(pc));
            }
            owed.saturating_sub(pc.received)
        };
        let offsets = match resume {
            Some(t) => {
                t.clients += usize::from(r.connected);
                t.reconnects += r.reconnects;
                for (p, pc) in r.phases.iter().enumerate() {
                    add_checks(&mut t.counts, pc);
                    t.counts.lost_announced += announced(p, pc);
                }
                &mut t.offsets
            }
            None => {
                for (p, (c, pc)) in self.counts.iter_mut().zip(&r.phases).enumerate() {
                    add_checks(c, pc);
                    c.lost_announced += announced(p, pc);
                }
                &mut self.offsets
            }
        };
        offsets.add(&r.offsets);
        for (p, pc) in r.phases.iter().enumerate() {
            let c = &mut self.counts[p];
            c.sent += pc.sent;
            c.refused += pc.refused;
            // A refused send went to no one.
            c.expected += not_refused(pc) * recipients;
            if let Some(t) = self.resume.as_mut() {
                t.counts.expected += not_refused(pc) * resuming;
            }
            self.arrived[p] += pc.arrived;
        }
        self.errors += r.errors;
        self.unparseable += r.unparseable;
        self.other += r.other_frames;
        match (&r.disconnect, r.role) {
            (Some(d), Role::Stalled) => {
                self.stall.closed_by_server += 1;
                *self.stall.close_reasons.entry(d.clone()).or_insert(0) += 1;
            }
            (None, Role::Stalled) if r.connected => self.stall.still_open += 1,
            (Some(d), _) => *self.disconnects.entry(d.clone()).or_insert(0) += 1,
            (None, _) => {}
        }
    }

    fn add_role(&mut self, r: &ClientResult) {
        if r.connected {
            match r.role {
                Role::Healthy => self.healthy += 1,
                Role::Stalled => {
                    self.stall.clients += 1;
                    self.stall.received += r.side_received;
                }
                Role::Reconnecting { .. } => {
                    self.recon.clients += 1;
                    self.recon.received += r.side_received;
                }
            }
        }
        self.recon.reconnects += r.reconnects;
        self.recon.failed += r.reconnect_failures.len() as u64;
        for f in &r.reconnect_failures {
            *self.recon.failures.entry(f.clone()).or_insert(0) += 1;
        }
    }
}

/// A sender's messages of one phase that the server did not refuse.
fn not_refused(pc: &PhaseCounters) -> u64 {
    pc.sent.saturating_sub(pc.refused)
}

/// Per room, per phase: the messages its senders sent that the server did not refuse, which
/// every checked member of the room is owed (in the join dialect, a sender all but its own).
/// Summed over a room's checked members this is exactly `expected` (`recipients` counts
/// them), which is what lets loss be told apart per client.
fn owed_per_room(results: &[ClientResult], rooms: u32, n_phases: usize) -> Vec<Vec<u64>> {
    let mut owed = vec![vec![0u64; n_phases]; rooms as usize];
    for r in results {
        let room = &mut owed[(r.id % rooms) as usize];
        for (o, pc) in room.iter_mut().zip(&r.phases) {
            *o += not_refused(pc);
        }
    }
    owed
}

/// What a checked client saw of the messages of one phase.
fn add_checks(c: &mut Counts, pc: &PhaseCounters) {
    c.received += pc.received;
    c.duplicates += pc.duplicates;
    c.order_violations += pc.order_violations;
    c.misrouted += pc.misrouted;
}

/// One measured stretch (a step, or all steps together) before it becomes a StepReport.
struct Window<'a> {
    counts: Counts,
    rate: f64,
    duration_s: f64,
    arrived: u64,
    latency: &'a Histogram<u64>,
    lag: &'a Histogram<u64>,
    cpu: (&'a CpuSample, &'a CpuSample),
}

/// What every step report needs to know of the run as a whole.
struct StepContext {
    active_senders: f64,
    with_server: bool,
}

impl StepContext {
    fn report(&self, w: Window<'_>) -> StepReport {
        let (a, b) = w.cpu;
        let own = b.own - a.own;
        let server = a.server_until(b);
        let latency = Latency::from_hist(w.latency);
        let sustainable =
            w.counts.lost == 0 && latency.samples > 0 && latency.p99_us < SUSTAINABLE_P99_US;
        StepReport {
            rate_per_sender: w.rate,
            offered_msgs_per_s: w.rate * self.active_senders,
            duration_s: w.duration_s,
            counts: w.counts,
            deliveries_in_window: w.arrived,
            deliveries_per_s: w.arrived as f64 / w.duration_s,
            latency,
            sender_lag: Lag {
                p99_us: w.lag.value_at_quantile(0.99),
                max_us: w.lag.max(),
            },
            loadgen_cpu_s: own,
            loadgen_cpu_us_per_delivery: per_delivery_us(own, w.arrived),
            server_cpu_s: self.with_server.then_some(server),
            server_cpu_us_per_delivery: self
                .with_server
                .then(|| per_delivery_us(server, w.arrived)),
            sustainable,
        }
    }
}

impl Report {
    /// Computes the report from what a run measured.
    pub fn assemble(cfg: &Config, m: Measurements) -> Report {
        let rooms = cfg.rooms as u32;
        let mut t = Tally::new(m.latency.len(), cfg);
        let room_owed = owed_per_room(&m.results, rooms, m.latency.len());
        for r in &m.results {
            let room = (r.id % rooms) as usize;
            let owed = |v: &[u32]| u64::from(v.get(room).copied().unwrap_or(0));
            let members = (owed(&m.recipients), owed(&m.resume_recipients));
            t.add(r, members, &room_owed[room]);
        }
        t.counts.iter_mut().for_each(Counts::finish);
        let active_senders = m
            .connect
            .connected_ids
            .iter()
            .filter(|&&id| id / rooms < cfg.senders_per_room as u32)
            .count() as f64;
        let ctx = StepContext {
            active_senders,
            with_server: !cfg.server_pids.is_empty(),
        };
        let (steps, curves) = step_reports(cfg, &m, &t, &ctx);
        let measured = measured_report(cfg, &m, &t, &ctx);
        let highest_sustainable_rate = (!cfg.ramp.is_empty())
            .then(|| {
                let ok = steps.iter().filter(|s| s.sustainable);
                ok.map(|s| s.rate_per_sender).reduce(f64::max)
            })
            .flatten();
        let mut totals = Counts::default();
        t.counts.iter().for_each(|c| totals.add(c));
        // Roles are handed out exactly when one of the fractions is above 0.
        let roles =
            (cfg.stall_fraction > 0.0 || cfg.reconnect_fraction > 0.0).then(|| RolesReport {
                healthy_clients: t.healthy,
                stall_fraction: cfg.stall_fraction,
                reconnect_fraction: cfg.reconnect_fraction,
                stalled: t.stall.clone(),
                reconnecting: t.recon.clone(),
            });
        let server = server_report(cfg, &m, measured.deliveries_in_window);
        let envelope = cfg.envelope.then_some(EnvelopeReport {
            stamped_deliveries: t.offsets.stamped,
            gap_notices: t.offsets.gap_notices,
            offset_gaps: t.offsets.gaps,
            offset_repeats: t.offsets.repeats,
        });
        Report {
            config: config_echo(cfg, m.threads, m.senders),
            connect: connect_report(&m.connect, cfg.clients),
            totals,
            warmup: t.counts[0].clone(),
            server,
            measured,
            steps,
            highest_sustainable_rate,
            server_errors: t.errors,
            server_error_codes: m.error_codes,
            unparseable_frames: t.unparseable,
            other_frames: t.other,
            disconnects: t.disconnects,
            unstopped_clients: m.unstopped,
            roles,
            envelope,
            resume: t.resume.map(ResumeTally::report),
            loadgen_cpu_total_s: m.loadgen_cpu_total_s,
            drained: m.drained,
            hostile: None,
            split_rooms: None,
            elapsed_s: m.elapsed_s,
            measured_window_s: m.window_s,
            curves: Curves(curves),
        }
    }
}

/// One report per rate step, and its latency histogram for the plot.
fn step_reports(
    cfg: &Config,
    m: &Measurements,
    t: &Tally,
    ctx: &StepContext,
) -> (Vec<StepReport>, Vec<(String, Histogram<u64>)>) {
    let rates = cfg.rates();
    let mut steps = Vec::new();
    let mut curves = Vec::new();
    for (i, &rate) in rates.iter().enumerate() {
        let p = i + 1;
        steps.push(ctx.report(Window {
            counts: t.counts[p].clone(),
            rate,
            duration_s: cfg.duration.as_secs_f64(),
            arrived: t.arrived[p],
            latency: &m.latency[p],
            lag: &m.lag[p],
            cpu: (&m.cpu[i], &m.cpu[i + 1]),
        }));
        let name = if rates.len() == 1 {
            "measured".to_string()
        } else {
            format!("{rate}/s per sender")
        };
        curves.push((name, m.latency[p].clone()));
    }
    (steps, curves)
}

/// All measured steps together.
fn measured_report(cfg: &Config, m: &Measurements, t: &Tally, ctx: &StepContext) -> StepReport {
    let rates = cfg.rates();
    let mut counts = Counts::default();
    let (mut latency, mut lag) = (new_hist(), new_hist());
    for p in 1..t.counts.len() {
        counts.add(&t.counts[p]);
        merge(&mut latency, &m.latency[p]);
        merge(&mut lag, &m.lag[p]);
    }
    let mut measured = ctx.report(Window {
        counts,
        rate: rates[0],
        duration_s: cfg.duration.as_secs_f64() * rates.len() as f64,
        arrived: t.arrived[1..].iter().sum(),
        latency: &latency,
        lag: &lag,
        cpu: (&m.cpu[0], &m.cpu[m.cpu.len() - 1]),
    });
    if rates.len() > 1 {
        // A ramp has no single rate; the offered load is the time-weighted mean.
        let mean_rate = rates.iter().sum::<f64>() / rates.len() as f64;
        measured.rate_per_sender = mean_rate;
        measured.offered_msgs_per_s = mean_rate * ctx.active_senders;
    }
    measured
}

fn server_report(cfg: &Config, m: &Measurements, measured_arrived: u64) -> Option<ServerReport> {
    if cfg.server_pids.is_empty() {
        return None;
    }
    let (first, last) = (&m.cpu[0], &m.cpu[m.cpu.len() - 1]);
    let pids: Vec<ServerProc> = cfg
        .server_pids
        .iter()
        .enumerate()
        .map(|(i, &pid)| {
            let (rss_kb, peak_rss_kb) = m.server_rss.get(i).copied().unwrap_or((0, 0));
            ServerProc {
                pid,
                cpu_s: match (first.server.get(i), last.server.get(i)) {
                    (Some(Some(a)), Some(Some(b))) => b - a,
                    _ => 0.0,
                },
                rss_kb,
                peak_rss_kb,
            }
        })
        .collect();
    let cpu_s = pids.iter().map(|p| p.cpu_s).sum();
    Some(ServerReport {
        cpu_s,
        cpu_us_per_delivery: per_delivery_us(cpu_s, measured_arrived),
        rss_kb: pids.iter().map(|p| p.rss_kb).sum(),
        peak_rss_kb: pids.iter().map(|p| p.peak_rss_kb).sum(),
        pids,
        rss_every_s: cfg.rss_every.as_secs_f64(),
        rss_trend: RssTrend::over(&m.rss_samples, m.window_s),
        rss_samples: m.rss_samples.clone(),
    })
}

impl RssTrend {
    /// Compares the largest RSS sample of the measured window's last third with that of its
    /// middle third. The first third is left out: queues fill up (and stalled clients are
    /// closed) in it. `None` unless both thirds hold a sample.
    pub fn over(samples: &[RssSample], (start, end): (f64, f64)) -> Option<RssTrend> {
        let (a, b) = (
            start + (end - start) / 3.0,
            start + (end - start) * 2.0 / 3.0,
        );
        let max_where = |keep: &dyn Fn(f64) -> bool| {
            let inside = samples.iter().filter(|s| keep(s.t_s));
            inside.map(|s| s.rss_kb).max()
        };
        // A sample exactly on the boundary belongs to the later third.
        let middle = max_where(&|t| a <= t && t < b)?;
        let last = max_where(&|t| b <= t && t <= end)?;
        Some(RssTrend {
            middle_third_max_kb: middle,
            last_third_max_kb: last,
            growth_pct: (last as f64 / middle.max(1) as f64 - 1.0) * 100.0,
        })
    }
}

fn connect_report(c: &ConnectPhase, attempted: usize) -> ConnectReport {
    let ms = |us: u64| us as f64 / 1000.0;
    ConnectReport {
        attempted,
        connected: c.connected_ids.len(),
        failed: attempted - c.connected_ids.len(),
        failures: c.failures.clone(),
        total_s: c.total.as_secs_f64(),
        p50_ms: ms(c.hist.value_at_quantile(0.5)),
        p99_ms: ms(c.hist.value_at_quantile(0.99)),
        max_ms: ms(c.hist.max()),
        not_ready: c.not_ready,
    }
}

fn config_echo(cfg: &Config, threads: usize, senders: usize) -> ConfigEcho {
    ConfigEcho {
        urls: cfg.urls.clone(),
        clients: cfg.clients,
        rooms: cfg.rooms,
        senders_per_room: cfg.senders_per_room,
        senders,
        dialect: cfg.dialect.name().to_string(),
        envelope: cfg.envelope,
        resume: cfg.resume,
        rates: cfg.rates(),
        duration_s: cfg.duration.as_secs_f64(),
        warmup_s: cfg.warmup.as_secs_f64(),
        drain_s: cfg.drain.as_secs_f64(),
        payload_bytes: cfg.payload,
        connect_concurrency: cfg.connect_concurrency,
        threads,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters(sent: u64, received: u64) -> PhaseCounters {
        PhaseCounters {
            sent,
            received,
            arrived: received,
            ..PhaseCounters::default()
        }
    }

    fn client(id: u32, phases: Vec<PhaseCounters>) -> ClientResult {
        ClientResult {
            id,
            connected: true,
            ready: true,
            phases,
            errors: 0,
            unparseable: 0,
            other_frames: 0,
            disconnect: None,
            role: Role::Healthy,
            side_received: 0,
            offsets: OffsetCounts::default(),
            reconnects: 0,
            reconnect_failures: Vec::new(),
        }
    }

    fn hist(values: impl IntoIterator<Item = u64>) -> Histogram<u64> {
        let mut h = new_hist();
        values.into_iter().for_each(|v| h.saturating_record(v));
        h
    }

    fn cpu(own: f64, server: &[f64]) -> CpuSample {
        CpuSample {
            own,
            server: server.iter().map(|&s| Some(s)).collect(),
        }
    }

    /// 4 clients in 2 rooms, client 0 and 1 send: each message should reach 2 members.
    fn config() -> Config {
        Config {
            clients: 4,
            rooms: 2,
            senders_per_room: 1,
            rate: 10.0,
            duration: Duration::from_secs(2),
            ..Config::default()
        }
    }

    fn measurements(cfg: &Config, results: Vec<ClientResult>, cpu: Vec<CpuSample>) -> Measurements {
        let n_phases = 1 + cfg.rates().len();
        let connect = ConnectPhase {
            hist: hist([2_000, 3_000]),
            failures: BTreeMap::new(),
            connected_ids: results.iter().map(|r| r.id).collect(),
            total: Duration::from_millis(40),
            not_ready: 0,
        };
        Measurements {
            threads: 2,
            senders: 2,
            connect,
            recipients: vec![2, 2],
            resume_recipients: vec![0, 0],
            results,
            unstopped: 0,
            latency: (0..n_phases).map(|_| hist(1_000..=2_000)).collect(),
            lag: (0..n_phases).map(|_| hist([5, 50])).collect(),
            error_codes: BTreeMap::new(),
            cpu,
            server_rss: vec![(20_480, 30_720)],
            rss_samples: Vec::new(),
            window_s: (3.0, 5.0),
            drained: false,
            loadgen_cpu_total_s: 2.0,
            elapsed_s: 6.0,
        }
    }

    #[test]
    fn one_step_counts_loss_throughput_and_cpu() {
        let cfg = config();
        let sender = |id| client(id, vec![counters(10, 10), counters(20, 20)]);
        let results = vec![
            sender(0),
            sender(1),
            client(2, vec![counters(0, 10), counters(0, 20)]),
            client(3, vec![counters(0, 10), counters(0, 19)]),
        ];
        let r = Report::assemble(
            &cfg,
            measurements(&cfg, results, vec![cpu(1.0, &[]), cpu(1.5, &[])]),
        );
        assert_eq!(
            (r.totals.sent, r.totals.expected, r.totals.lost),
            (60, 120, 1)
        );
        assert_eq!((r.warmup.sent, r.warmup.lost), (20, 0));
        let m = &r.measured;
        assert_eq!(
            (m.counts.expected, m.counts.received, m.counts.lost),
            (80, 79, 1)
        );
        assert!((m.counts.loss_pct - 1.25).abs() < 1e-9);
        assert_eq!(m.deliveries_in_window, 79);
        assert_eq!(m.deliveries_per_s, 39.5);
        assert_eq!(m.offered_msgs_per_s, 20.0);
        assert!((m.loadgen_cpu_s - 0.5).abs() < 1e-9);
        assert!((m.loadgen_cpu_us_per_delivery - 0.5e6 / 79.0).abs() < 1e-6);
        assert_eq!((m.server_cpu_s, m.server_cpu_us_per_delivery), (None, None));
        assert!(m.latency.samples > 0 && m.latency.p99_us < SUSTAINABLE_P99_US);
        assert!(
            !m.sustainable,
            "a lost message makes the step unsustainable"
        );
        assert_eq!(r.steps.len(), 1);
        assert_eq!(r.curves.0[0].0, "measured");
        assert_eq!(r.highest_sustainable_rate, None);
        assert!(r.roles.is_none() && r.server.is_none());
        assert_eq!((r.connect.connected, r.connect.failed), (4, 0));
        assert_eq!(r.connect.p50_ms, 2.0);
        assert_eq!(r.measured_window_s, (3.0, 5.0));
        assert!(!r.clean());
    }

    #[test]
    fn ramp_steps_server_cpu_and_the_highest_sustainable_rate() {
        let cfg = Config {
            ramp: vec![5.0, 10.0],
            server_pids: vec![42],
            ..config()
        };
        let sender = |id| client(id, vec![counters(5, 5), counters(10, 10), counters(20, 20)]);
        let receiver = |id| client(id, vec![counters(0, 5), counters(0, 10), counters(0, 20)]);
        let results = vec![sender(0), sender(1), receiver(2), receiver(3)];
        let samples = vec![cpu(1.0, &[10.0]), cpu(1.2, &[10.5]), cpu(1.6, &[11.5])];
        let mut m = measurements(&cfg, results, samples);
        m.rss_samples = (0..=8u32)
            .map(|i| RssSample {
                t_s: f64::from(i),
                rss_kb: 1000 + u64::from(i),
            })
            .collect();
        m.window_s = (2.0, 8.0);
        let r = Report::assemble(&cfg, m);
        let per_step: Vec<_> = r
            .steps
            .iter()
            .map(|s| (s.rate_per_sender, s.counts.sent))
            .collect();
        assert_eq!(per_step, [(5.0, 20), (10.0, 40)]);
        assert_eq!(r.steps[1].server_cpu_s, Some(1.0));
        assert!(r.steps.iter().all(|s| s.sustainable));
        assert_eq!(r.highest_sustainable_rate, Some(10.0));
        // The whole measured stretch: both steps, the mean rate, four seconds.
        assert_eq!((r.measured.counts.sent, r.measured.duration_s), (60, 4.0));
        assert_eq!(r.measured.rate_per_sender, 7.5);
        assert_eq!(r.curves.0[1].0, "10/s per sender");
        let s = r.server.as_ref().unwrap();
        assert_eq!(s.cpu_s, 1.5);
        assert_eq!(s.cpu_us_per_delivery, 1.5e6 / 120.0);
        assert_eq!((s.rss_kb, s.peak_rss_kb), (20_480, 30_720));
        // Thirds of 2..8 s: middle 4..6 (max at 5 s), last 6..8 (max at 8 s).
        let t = s.rss_trend.as_ref().unwrap();
        assert_eq!((t.middle_third_max_kb, t.last_third_max_kb), (1005, 1008));
        assert_eq!(r.totals.lost, 0);
    }

    #[test]
    fn stalled_and_reconnecting_clients_are_reported_apart() {
        let cfg = Config {
            stall_fraction: 0.5,
            reconnect_fraction: 0.5,
            ..config()
        };
        let mut stalled = client(2, vec![counters(0, 0), counters(0, 0)]);
        stalled.role = Role::Stalled;
        stalled.disconnect = Some("close 1008".into());
        let mut recon = client(3, vec![counters(0, 0), counters(0, 0)]);
        recon.role = Role::Reconnecting { slot: 0 };
        recon.side_received = 7;
        recon.reconnects = 3;
        recon.reconnect_failures = vec!["connect: refused".into()];
        let sender = |id| client(id, vec![counters(1, 1), counters(2, 2)]);
        let results = vec![sender(0), sender(1), stalled, recon];
        let mut m = measurements(&cfg, results, vec![cpu(0.0, &[]), cpu(0.1, &[])]);
        m.recipients = vec![1, 1];
        let r = Report::assemble(&cfg, m);
        let roles = r.roles.as_ref().unwrap();
        assert_eq!(roles.healthy_clients, 2);
        assert_eq!(
            (roles.stalled.clients, roles.stalled.closed_by_server),
            (1, 1)
        );
        assert_eq!(roles.stalled.close_reasons["close 1008"], 1);
        let rc = &roles.reconnecting;
        assert_eq!(
            (rc.clients, rc.reconnects, rc.failed, rc.received),
            (1, 3, 1, 7)
        );
        assert_eq!(rc.every_s, 5.0);
        assert!(
            r.disconnects.is_empty(),
            "a stalled client's close is not a disconnect"
        );
        assert_eq!(r.totals.lost, 0);
        assert!(!r.clean(), "a failed reconnect is a fault");
    }

    /// Clients 2 and 3 resume (one per room): every message of their room is owed to them
    /// too, warm-up included, and what they miss or get twice spoils the verdict.
    #[test]
    fn resuming_clients_are_checked_apart() {
        let cfg = Config {
            reconnect_fraction: 1.0,
            envelope: true,
            resume: true,
            ..config()
        };
        let sender = |id| {
            let mut c = client(id, vec![counters(10, 10), counters(20, 20)]);
            c.offsets.stamped = 30;
            c
        };
        let resuming = |id, received: [u64; 2]| {
            let mut c = client(id, vec![counters(0, received[0]), counters(0, received[1])]);
            c.role = Role::Reconnecting { slot: id - 2 };
            c.reconnects = 4;
            c.offsets = OffsetCounts {
                stamped: received[0] + received[1],
                recovered: 4,
                ..OffsetCounts::default()
            };
            c
        };
        let mut m = measurements(
            &cfg,
            vec![
                sender(0),
                sender(1),
                resuming(2, [10, 20]),
                resuming(3, [10, 20]),
            ],
            vec![cpu(0.0, &[]), cpu(0.1, &[])],
        );
        // Each room: its sender hears itself (healthy), the resuming member is owed it too.
        m.recipients = vec![1, 1];
        m.resume_recipients = vec![1, 1];
        let clean = Report::assemble(&cfg, m);
        let r = clean.resume.as_ref().expect("resume reported");
        assert_eq!((r.clients, r.reconnects, r.recovered), (2, 8, 8));
        assert_eq!((r.expected, r.deliveries, r.lost), (60, 60, 0));
        assert_eq!((r.lost_announced, r.lost_silent, r.gap_notices), (0, 0, 0));
        // The healthy figures are the senders' alone.
        assert_eq!((clean.totals.expected, clean.totals.received), (60, 60));
        let e = clean.envelope.as_ref().expect("envelope reported");
        assert_eq!((e.stamped_deliveries, e.offset_gaps), (60, 0));
        assert!(clean.clean(), "{}", clean.to_text());
        assert!(clean
            .to_text()
            .contains("they resume: checked apart, below"));

        // One resuming client missed a warm-up message and got a measured one twice; one
        // resume was not recovered.
        let mut short = resuming(3, [9, 20]);
        short.phases[1].duplicates = 1;
        short.offsets.recovered_false = 1;
        let mut m = measurements(
            &cfg,
            vec![sender(0), sender(1), resuming(2, [10, 20]), short],
            vec![cpu(0.0, &[]), cpu(0.1, &[])],
        );
        m.recipients = vec![1, 1];
        m.resume_recipients = vec![1, 1];
        let faulty = Report::assemble(&cfg, m);
        let r = faulty.resume.as_ref().unwrap();
        assert_eq!((r.lost, r.duplicates, r.recovered_false), (1, 1, 1));
        // The client that lost one was answered recovered:false: its loss was announced.
        assert_eq!((r.lost_announced, r.lost_silent), (1, 0));
        assert_eq!(
            faulty.totals.faults(),
            0,
            "the healthy clients saw everything"
        );
        assert!(!faulty.clean(), "resume loss is a fault like healthy loss");
        let v = serde_json::to_value(&faulty).unwrap();
        assert_eq!(v["resume"]["lost"], 1);
        assert_eq!(v["resume"]["recovered_false"], 1);
        assert_eq!(v["envelope"]["offset_gaps"], 0);
        assert_eq!(v["config"]["resume"], true);
    }

    /// Room 0 (sender 0, client 2): 4 of the sender's 20 measured sends were refused.
    /// Room 1 (sender 1, client 3): the sender missed one of its own messages, client 3
    /// missed three and was told of a gap.
    #[test]
    fn refused_sends_are_not_expected_and_loss_is_split_per_client() {
        let cfg = Config {
            clients: 5,
            envelope: true,
            ..config()
        };
        let refused = PhaseCounters {
            sent: 20,
            refused: 4,
            received: 16,
            arrived: 16,
            ..PhaseCounters::default()
        };
        let mut told = client(3, vec![counters(0, 10), counters(0, 17)]);
        told.offsets.gap_notices = 1;
        // Reconnecting without --resume: told of a gap, but owed nothing (not checked).
        let mut unchecked = client(4, vec![counters(0, 0), counters(0, 0)]);
        unchecked.role = Role::Reconnecting { slot: 0 };
        unchecked.offsets.gap_notices = 1;
        let results = vec![
            client(0, vec![counters(10, 10), refused]),
            client(1, vec![counters(10, 10), counters(20, 19)]),
            client(2, vec![counters(0, 10), counters(0, 16)]),
            told,
            unchecked,
        ];
        let r = Report::assemble(
            &cfg,
            measurements(&cfg, results, vec![cpu(0.0, &[]), cpu(0.1, &[])]),
        );
        let m = &r.measured.counts;
        // Owed: room 0 the 16 sends that went out, room 1 all 20; two members each.
        assert_eq!((m.sent, m.refused, m.expected), (40, 4, 72));
        assert_eq!((m.received, m.lost), (68, 4));
        // Client 3's three are announced; sender 1's one is not (a room-wide split would
        // call all four announced).
        assert_eq!((m.lost_announced, m.lost_silent), (3, 1));
        let t = &r.totals;
        assert_eq!((t.sent, t.refused, t.expected), (60, 4, 112));
        assert_eq!((t.lost, t.lost_announced, t.lost_silent), (4, 3, 1));
        assert_eq!((r.warmup.refused, r.warmup.lost_announced), (0, 0));
        assert_eq!(r.envelope.as_ref().unwrap().gap_notices, 2);
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["measured"]["refused"], 4);
        assert_eq!(v["totals"]["lost_announced"], 3);
        assert_eq!(v["totals"]["lost_silent"], 1);
        assert_eq!(v["envelope"]["gap_notices"], 2);
        let text = r.to_text();
        assert!(text.contains("3 announced"), "{text}");
        assert!(text.contains("1 silent"), "{text}");

        // The join dialect: a sender is owed all but its own messages. Sender 0 was told of
        // a gap but lost nothing it was owed; client 2, not told, lost one.
        let cfg = Config {
            dialect: Dialect::Join,
            ..cfg
        };
        let mut sender = client(0, vec![counters(10, 0), counters(20, 0)]);
        sender.offsets.gap_notices = 1;
        let results = vec![
            sender,
            client(1, vec![counters(10, 0), counters(20, 0)]),
            client(2, vec![counters(0, 10), counters(0, 19)]),
            client(3, vec![counters(0, 10), counters(0, 20)]),
        ];
        let mut m = measurements(&cfg, results, vec![cpu(0.0, &[]), cpu(0.1, &[])]);
        m.recipients = vec![1, 1];
        let r = Report::assemble(&cfg, m);
        let m = &r.measured.counts;
        assert_eq!((m.expected, m.lost), (40, 1));
        assert_eq!((m.lost_announced, m.lost_silent), (0, 1));
    }

    #[test]
    fn rss_trend_needs_both_thirds() {
        let at = |t_s, rss_kb| RssSample { t_s, rss_kb };
        assert_eq!(RssTrend::over(&[at(1.0, 5), at(9.0, 5)], (0.0, 9.0)), None);
        let t = RssTrend::over(&[at(3.0, 100), at(6.0, 110), at(9.0, 90)], (0.0, 9.0)).unwrap();
        assert_eq!((t.middle_third_max_kb, t.last_third_max_kb), (100, 110));
        assert!((t.growth_pct - 10.0).abs() < 1e-9);
    }
}
