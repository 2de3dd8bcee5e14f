//! The report: its data (serialised for --json) and its text form. The SVG plots are in plot.rs.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Sustainable means no loss and p99 below this (µs).
pub const SUSTAINABLE_P99_US: u64 = 100_000;

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub config: ConfigEcho,
    pub connect: ConnectReport,
    /// Everything sent, warm-up included: the correctness verdict.
    pub totals: Counts,
    pub warmup: Counts,
    /// All measured steps together (equal to the only step without --ramp).
    pub measured: StepReport,
    /// One entry per rate step (a single one without --ramp).
    pub steps: Vec<StepReport>,
    /// With --ramp: the highest per-sender rate with no loss and p99 < 100 ms.
    pub highest_sustainable_rate: Option<f64>,
    pub server_errors: u64,
    pub server_error_codes: BTreeMap<String, u64>,
    /// Text frames that were neither a loadgen message nor JSON.
    pub unparseable_frames: u64,
    /// Binary frames and JSON frames that are not errors.
    pub other_frames: u64,
    /// Connections that ended before loadgen stopped them, by reason.
    pub disconnects: BTreeMap<String, u64>,
    /// Client tasks that did not finish within the stop timeout (their counts are missing).
    pub unstopped_clients: u64,
    /// With --stall-fraction or --reconnect-fraction: which clients `totals`, `warmup`,
    /// `measured` and `steps` cover (loss, duplicates, order, routing, latency: the healthy
    /// ones only) and what the others saw.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub roles: Option<RolesReport>,
    /// With --envelope: how the room offsets ran at every client but the resuming ones.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub envelope: Option<EnvelopeReport>,
    /// With --resume: the reconnecting clients, checked across their connections.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume: Option<ResumeReport>,
    pub loadgen_cpu_total_s: f64,
    pub server: Option<ServerReport>,
    /// Whether every expected delivery arrived before the drain time ran out.
    pub drained: bool,
    /// With --flooders or --pingers: what the hostile clients did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostile: Option<crate::hostile::HostileReport>,
    /// With --split-rooms: the measured latency of the first rooms and of the rest apart.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub split_rooms: Option<SplitRooms>,
    pub elapsed_s: f64,
    /// Start and end of the measured window (all steps), seconds since the run started: the
    /// time base of `server.rss_samples`.
    pub measured_window_s: (f64, f64),
    #[serde(skip)]
    pub curves: Curves,
}

/// Latency histograms per step, kept for the plot.
#[derive(Clone, Default)]
pub struct Curves(pub Vec<(String, Histogram<u64>)>);

impl std::fmt::Debug for Curves {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(name, h)| (name, h.len())))
            .finish()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ConfigEcho {
    pub urls: Vec<String>,
    pub clients: usize,
    pub rooms: usize,
    pub senders_per_room: usize,
    pub senders: usize,
    pub dialect: String,
    pub envelope: bool,
    pub resume: bool,
    pub rates: Vec<f64>,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub drain_s: f64,
    pub payload_bytes: usize,
    pub connect_concurrency: usize,
    pub threads: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConnectReport {
    pub attempted: usize,
    pub connected: usize,
    pub failed: usize,
    pub failures: BTreeMap<String, u64>,
    pub total_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Connected clients whose membership no readiness probe confirmed before sending began.
    pub not_ready: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RolesReport {
    /// Connected clients that are neither stalled nor reconnecting: the only ones whose
    /// deliveries are checked (senders included).
    pub healthy_clients: usize,
    pub stall_fraction: f64,
    pub reconnect_fraction: f64,
    pub stalled: StallReport,
    pub reconnecting: ReconnectReport,
}

/// Clients that stopped reading after the readiness probe.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StallReport {
    /// Connected stalled clients.
    pub clients: usize,
    /// Connections the server ended, by what they saw last ("close 1008", or how the
    /// connection went without a close frame).
    pub closed_by_server: u64,
    pub close_reasons: BTreeMap<String, u64>,
    /// Still open when the run ended.
    pub still_open: u64,
    /// Deliveries read before the stall began (normally 0: it begins before sending).
    pub received: u64,
}

/// Clients that closed cleanly and reconnected on a timer.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReconnectReport {
    /// Connected (at first) reconnecting clients.
    pub clients: usize,
    pub every_s: f64,
    pub reconnects: u64,
    pub failed: u64,
    pub failures: BTreeMap<String, u64>,
    /// Distinct deliveries received while joined (not checked: they miss what is sent while
    /// they are away). 0 with --resume: they are checked then, see `Report::resume`.
    pub received: u64,
}

/// `--envelope`: within each connection, a room's offsets must run on by exactly one from one
/// delivery to the next (from the join's answer on). Every client but the resuming ones (a
/// sender in the join dialect, which never hears its own messages, is not checked).
#[derive(Debug, Clone, Default, Serialize)]
pub struct EnvelopeReport {
    /// Deliveries that carried an offset (0: the server keeps no history).
    pub stamped_deliveries: u64,
    /// `gap` notices for the client's own room: the server announced that messages of it may
    /// have been lost at that client (the delivery after one is not checked for a gap).
    pub gap_notices: u64,
    pub offset_gaps: u64,
    pub offset_repeats: u64,
}

/// `--resume`: the reconnecting clients rejoin from the last offset they received and are
/// owed every message of the run (warm-up included) exactly once, in order per sender, over
/// all their connections; their offsets must run on by one across a resume too.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ResumeReport {
    /// Connected (at first) resuming clients.
    pub clients: usize,
    pub reconnects: u64,
    pub expected: u64,
    /// Distinct deliveries.
    pub deliveries: u64,
    pub lost: u64,
    /// Of `lost`, like `Counts::lost_announced`: at clients told of a possible loss.
    pub lost_announced: u64,
    pub lost_silent: u64,
    pub loss_pct: f64,
    pub duplicates: u64,
    pub reordered: u64,
    pub misrouted: u64,
    /// Resumes answered `recovered: true` and `recovered: false` (expected 0; always so from
    /// a server without history).
    pub recovered: u64,
    pub recovered_false: u64,
    /// Deliveries that came as a resume's replay (before its answer), counted in `deliveries`.
    pub replayed: u64,
    /// `gap` notices for their room (see `EnvelopeReport::gap_notices`).
    pub gap_notices: u64,
    pub offset_gaps: u64,
    pub offset_repeats: u64,
}

impl ResumeReport {
    pub fn faults(&self) -> u64 {
        self.lost
            + self.duplicates
            + self.reordered
            + self.misrouted
            + self.recovered_false
            + self.offset_gaps
            + self.offset_repeats
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Counts {
    pub sent: u64,
    /// Of `sent`: sends the server answered with an error (any code, e.g.
    /// `backplane_unavailable` or `limit`). They went to no one, so no delivery of them is
    /// in `expected`.
    pub refused: u64,
    pub expected: u64,
    pub received: u64,
    pub lost: u64,
    pub loss_pct: f64,
    /// Of `lost`: deliveries lost at clients the server told, at some point in the run, that
    /// they may have lost messages of their room (a `gap` notice, or a resume answered
    /// `recovered: false`). Per client (what it was owed less what it received), counted
    /// for the whole run, not per notice: one notice makes all of that client's loss
    /// announced, whenever it happened.
    pub lost_announced: u64,
    /// The rest of `lost`: at clients nothing told.
    pub lost_silent: u64,
    pub duplicates: u64,
    pub order_violations: u64,
    pub misrouted: u64,
}

impl Counts {
    pub fn add(&mut self, o: &Counts) {
        self.sent += o.sent;
        self.refused += o.refused;
        self.expected += o.expected;
        self.lost_announced += o.lost_announced;
        self.received += o.received;
        self.duplicates += o.duplicates;
        self.order_violations += o.order_violations;
        self.misrouted += o.misrouted;
        self.finish();
    }

    /// Derives loss from expected and received, and splits it: `lost_announced` holds the
    /// announced clients' loss summed, at most `lost` (it can only exceed it when a client
    /// received more than it was owed), and `lost_silent` is the rest.
    pub fn finish(&mut self) {
        self.lost = self.expected.saturating_sub(self.received);
        self.lost_announced = self.lost_announced.min(self.lost);
        self.lost_silent = self.lost - self.lost_announced;
        self.loss_pct = if self.expected == 0 {
            0.0
        } else {
            self.lost as f64 * 100.0 / self.expected as f64
        };
    }

    pub fn faults(&self) -> u64 {
        self.lost + self.duplicates + self.order_violations + self.misrouted
    }
}

/// `--split-rooms N`: the healthy clients' measured latency in rooms `0..N` and in the rest.
#[derive(Debug, Clone, Serialize)]
pub struct SplitRooms {
    pub first_rooms: u32,
    pub latency_first: Latency,
    pub latency_rest: Latency,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub samples: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
}

impl Latency {
    pub fn from_hist(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            samples: h.len(),
            p50_us: h.value_at_quantile(0.5),
            p90_us: h.value_at_quantile(0.9),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            mean_us: h.mean(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Lag {
    pub p99_us: u64,
    pub max_us: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct StepReport {
    pub rate_per_sender: f64,
    pub offered_msgs_per_s: f64,
    pub duration_s: f64,
    #[serde(flatten)]
    pub counts: Counts,
    /// Delivery frames that arrived inside the step's window.
    pub deliveries_in_window: u64,
    pub deliveries_per_s: f64,
    pub latency: Latency,
    pub sender_lag: Lag,
    pub loadgen_cpu_s: f64,
    pub loadgen_cpu_us_per_delivery: f64,
    pub server_cpu_s: Option<f64>,
    pub server_cpu_us_per_delivery: Option<f64>,
    pub sustainable: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServerProc {
    pub pid: u32,
    pub cpu_s: f64,
    pub rss_kb: u64,
    pub peak_rss_kb: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServerReport {
    pub pids: Vec<ServerProc>,
    /// Over the measured window, all pids together.
    pub cpu_s: f64,
    pub cpu_us_per_delivery: f64,
    pub rss_kb: u64,
    pub peak_rss_kb: u64,
    /// --rss-every.
    pub rss_every_s: f64,
    /// The servers' RSS (all pids together) every --rss-every from the run's start, and once
    /// more at its end.
    pub rss_samples: Vec<RssSample>,
    /// Whether RSS was still growing late in the window; `None` when the window holds too
    /// few samples (it must span about three --rss-every).
    pub rss_trend: Option<RssTrend>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RssSample {
    /// Seconds since the run started.
    pub t_s: f64,
    pub rss_kb: u64,
}

/// Largest RSS sample in the last third of the measured window against the middle third's.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RssTrend {
    pub middle_third_max_kb: u64,
    pub last_third_max_kb: u64,
    pub growth_pct: f64,
}

pub fn per_delivery_us(cpu_s: f64, deliveries: u64) -> f64 {
    if deliveries == 0 {
        0.0
    } else {
        cpu_s * 1e6 / deliveries as f64
    }
}

fn ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

fn grouped(out: &mut String, label: &str, m: &BTreeMap<String, u64>) {
    if m.is_empty() {
        let _ = writeln!(out, "  {label:<20}none");
        return;
    }
    let _ = writeln!(out, "  {label}:");
    let mut v: Vec<_> = m.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    for (reason, n) in v {
        let _ = writeln!(out, "    {n:>8}  {reason}");
    }
}

fn counts_lines(out: &mut String, c: &Counts, sent_note: &str) {
    let _ = writeln!(out, "  {:<20}{}{sent_note}", "messages sent", c.sent);
    let _ = writeln!(
        out,
        "  {:<20}{} (answered with an error: delivered to no one, not expected)",
        "refused", c.refused
    );
    let _ = writeln!(out, "  {:<20}{}", "deliveries expected", c.expected);
    let _ = writeln!(out, "  {:<20}{}", "received", c.received);
    lost_line(out, (c.lost, c.loss_pct), c.lost_announced, c.lost_silent);
    let _ = writeln!(out, "  {:<20}{}", "duplicates", c.duplicates);
    let _ = writeln!(out, "  {:<20}{}", "order violations", c.order_violations);
    let _ = writeln!(out, "  {:<20}{}", "misrouted", c.misrouted);
}

/// `lost N (x%)`, then how much of it the server announced: lost at a client that was told,
/// at any time in the run, of a gap in its room or a resume not recovered.
fn lost_line(out: &mut String, (lost, pct): (u64, f64), announced: u64, silent: u64) {
    let _ = writeln!(
        out,
        "  {:<20}{lost} ({pct:.3}%): {announced} announced (client told of a gap or \
         recovered:false during the run), {silent} silent",
        "lost"
    );
}

fn envelope_lines(o: &mut String, e: &EnvelopeReport) {
    if e.stamped_deliveries == 0 {
        let _ = writeln!(
            o,
            "  {:<20}none in deliveries (a server without --history-size)",
            "offsets"
        );
    } else {
        let _ = writeln!(
            o,
            "  {:<20}{} gaps, {} repeats in {} deliveries (each connection, from its join's \
             answer; resuming clients below)",
            "offsets", e.offset_gaps, e.offset_repeats, e.stamped_deliveries
        );
    }
    let _ = writeln!(
        o,
        "  {:<20}{} (the server announced possible loss in the client's room)",
        "gap notices", e.gap_notices
    );
}

fn resume_lines(o: &mut String, r: &ResumeReport) {
    let _ = writeln!(
        o,
        "resuming clients (--resume: every message, warm-up included, over all their connections)"
    );
    let _ = writeln!(
        o,
        "  {:<20}{}, {} reconnects: {} recovered, {} recovered:false",
        "clients", r.clients, r.reconnects, r.recovered, r.recovered_false
    );
    let _ = writeln!(o, "  {:<20}{}", "deliveries expected", r.expected);
    let _ = writeln!(
        o,
        "  {:<20}{} ({} of them replayed on resuming)",
        "received", r.deliveries, r.replayed
    );
    lost_line(o, (r.lost, r.loss_pct), r.lost_announced, r.lost_silent);
    let _ = writeln!(o, "  {:<20}{}", "duplicates", r.duplicates);
    let _ = writeln!(o, "  {:<20}{}", "order violations", r.reordered);
    let _ = writeln!(o, "  {:<20}{}", "misrouted", r.misrouted);
    let _ = writeln!(
        o,
        "  {:<20}{} gaps, {} repeats (across resumes too); {} gap notices",
        "offsets", r.offset_gaps, r.offset_repeats, r.gap_notices
    );
}

fn roles_lines(out: &mut String, r: &RolesReport, connected: usize, resume: bool) {
    let s = &r.stalled;
    let c = &r.reconnecting;
    let _ = writeln!(out, "clients");
    let _ = writeln!(
        out,
        "  {:<20}{} of {connected} connected: neither stalled nor reconnecting; the loss, \
         order, routing and latency figures below cover only these",
        "healthy", r.healthy_clients
    );
    let _ = writeln!(
        out,
        "  {:<20}{} (--stall-fraction {}): stopped reading after the readiness probe",
        "stalled", s.clients, r.stall_fraction
    );
    let reasons: Vec<String> = s
        .close_reasons
        .iter()
        .map(|(k, n)| format!("{k} x {n}"))
        .collect();
    let _ = writeln!(
        out,
        "  stalled clients closed by server: {} ({}); still open at the end: {}",
        s.closed_by_server,
        if reasons.is_empty() {
            "none".to_string()
        } else {
            reasons.join(", ")
        },
        s.still_open
    );
    let checked = if resume {
        "they resume: checked apart, below".to_string()
    } else {
        format!(
            "{} deliveries received (not checked for loss or order)",
            c.received
        )
    };
    let _ = writeln!(
        out,
        "  {:<20}{} (--reconnect-fraction {}, every {} s): {} reconnects, {} failed; {checked}",
        "reconnecting", c.clients, r.reconnect_fraction, c.every_s, c.reconnects, c.failed,
    );
    if !c.failures.is_empty() {
        grouped(out, "reconnect failures", &c.failures);
    }
}

impl Report {
    /// True when nothing was lost, duplicated, reordered or misrouted (at the healthy clients
    /// and the resuming ones), no offset skipped or repeated, every resume was recovered and
    /// no errors came back.
    pub fn clean(&self) -> bool {
        self.totals.faults() == 0
            && self.server_errors == 0
            && self.connect.failed == 0
            // A client that connected but never got ready (say, closed 4001 by a server that
            // wants a token) checked nothing: a run with one is not clean.
            && self.connect.not_ready == 0
            && self
                .roles
                .as_ref()
                .is_none_or(|r| r.reconnecting.failed == 0)
            && self
                .envelope
                .as_ref()
                .is_none_or(|e| e.offset_gaps + e.offset_repeats == 0)
            && self.resume.as_ref().is_none_or(|r| r.faults() == 0)
    }

    pub fn to_text(&self) -> String {
        let mut o = String::new();
        self.setup_lines(&mut o);
        self.connect_lines(&mut o);
        self.correctness_lines(&mut o);
        self.measured_lines(&mut o);
        if let Some(s) = &self.server {
            server_lines(&mut o, s);
        }
        if self.steps.len() > 1 {
            self.ramp_lines(&mut o);
        }
        if let Some(h) = &self.hostile {
            hostile_lines(&mut o, h);
        }
        if let Some(s) = &self.split_rooms {
            let n = s.first_rooms;
            for (name, l) in [
                (format!("rooms 0..{n}"), &s.latency_first),
                (format!("rooms {n}.."), &s.latency_rest),
            ] {
                let _ = writeln!(
                    o,
                    "latency in {name:<14}p50 {} p99 {} ms ({} samples)",
                    ms(l.p50_us),
                    ms(l.p99_us),
                    l.samples
                );
            }
        }
        let _ = writeln!(
            o,
            "verdict: {}",
            if self.clean() {
                "clean (no loss, duplicates, reordering, misrouting, offset faults or errors)"
            } else {
                "FAULTS (see above)"
            }
        );
        o
    }

    fn setup_lines(&self, o: &mut String) {
        let c = &self.config;
        let _ = writeln!(o, "loadgen report");
        let mode = match (c.envelope, c.resume) {
            (false, _) => "",
            (true, false) => ", envelopes",
            (true, true) => ", envelopes, resume",
        };
        let _ = writeln!(
            o,
            "  {:<20}{} (dialect {}{mode})",
            "target",
            c.urls.join(", "),
            c.dialect
        );
        let _ = writeln!(
            o,
            "  {:<20}{} clients in {} rooms, {} senders ({}/room), payload {} B, {} threads",
            "load", c.clients, c.rooms, c.senders, c.senders_per_room, c.payload_bytes, c.threads
        );
        let rates: Vec<String> = c.rates.iter().map(|r| format!("{r}")).collect();
        let _ = writeln!(
            o,
            "  {:<20}warm-up {:.1} s, {} step(s) of {:.1} s at {}/s per sender, drain <= {:.1} s",
            "schedule",
            c.warmup_s,
            c.rates.len(),
            c.duration_s,
            rates.join(","),
            c.drain_s
        );
    }

    fn connect_lines(&self, o: &mut String) {
        let k = &self.connect;
        let _ = writeln!(o, "connect");
        let _ = writeln!(
            o,
            "  {:<20}{}/{} in {:.2} s (per connect p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms)",
            "connected", k.connected, k.attempted, k.total_s, k.p50_ms, k.p99_ms, k.max_ms
        );
        if k.max_ms >= 900.0 {
            // Linux retransmits a dropped SYN after 1 s (then 3 s, 7 s ...): connects that
            // took that long almost always hit a full listen queue on the server.
            let _ = writeln!(
                o,
                "  {:<20}connects of ~1 s are SYN retransmits: the server's listen queue \
                 overflowed (check `ss -ltn` Send-Q, nstat TcpExtListenOverflows); a lower \
                 --connect-concurrency avoids it",
                "note"
            );
        }
        grouped(o, "failures", &k.failures);
        let _ = writeln!(o, "  {:<20}{}", "not ready", k.not_ready);
    }

    fn correctness_lines(&self, o: &mut String) {
        if let Some(r) = &self.roles {
            roles_lines(o, r, self.connect.connected, self.resume.is_some());
            let _ = writeln!(
                o,
                "correctness (every message, warm-up included; the {} healthy clients only)",
                r.healthy_clients
            );
        } else {
            let _ = writeln!(o, "correctness (every message, warm-up included)");
        }
        counts_lines(o, &self.totals, &format!(" (warm-up {})", self.warmup.sent));
        if let Some(e) = &self.envelope {
            envelope_lines(o, e);
        }
        let _ = writeln!(o, "  {:<20}{}", "server errors", self.server_errors);
        for (code, n) in &self.server_error_codes {
            let _ = writeln!(o, "    {n:>8}  {code}");
        }
        if self.unparseable_frames + self.other_frames > 0 {
            let _ = writeln!(
                o,
                "  {:<20}{} unparseable, {} other (binary / non-error JSON)",
                "stray frames", self.unparseable_frames, self.other_frames
            );
        }
        grouped(o, "disconnects", &self.disconnects);
        if self.unstopped_clients > 0 {
            let _ = writeln!(
                o,
                "  {:<20}{} (their counts are missing)",
                "clients not stopped", self.unstopped_clients
            );
        }
        let drained = if self.drained {
            "yes"
        } else {
            "no (drain time ran out)"
        };
        let _ = writeln!(o, "  {:<20}{drained}", "drained");
        if let Some(r) = &self.resume {
            resume_lines(o, r);
        }
    }

    fn measured_lines(&self, o: &mut String) {
        let m = &self.measured;
        let _ = writeln!(
            o,
            "measured window ({:.1} s{})",
            m.duration_s,
            if self.roles.is_some() {
                "; latency of the healthy clients only"
            } else {
                ""
            }
        );
        let _ = writeln!(
            o,
            "  {:<20}{:.0} msg/s offered, {:.0} deliveries/s",
            "throughput", m.offered_msgs_per_s, m.deliveries_per_s
        );
        let l = &m.latency;
        let _ = writeln!(
            o,
            "  {:<20}p50 {} / p90 {} / p99 {} / p99.9 {} / max {} ms ({} samples)",
            "latency",
            ms(l.p50_us),
            ms(l.p90_us),
            ms(l.p99_us),
            ms(l.p999_us),
            ms(l.max_us),
            l.samples
        );
        let _ = writeln!(
            o,
            "  {:<20}p99 {} / max {} ms",
            "sender lag",
            ms(m.sender_lag.p99_us),
            ms(m.sender_lag.max_us)
        );
        let _ = writeln!(
            o,
            "  {:<20}{:.2} s in window ({:.2} us/delivery), {:.2} s total",
            "loadgen CPU", m.loadgen_cpu_s, m.loadgen_cpu_us_per_delivery, self.loadgen_cpu_total_s
        );
    }

    fn ramp_lines(&self, o: &mut String) {
        let _ = writeln!(o, "ramp ({:.1} s per step)", self.config.duration_s);
        let _ = writeln!(
            o,
            "  {:>8} {:>10} {:>11} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}  ok",
            "rate/s",
            "offered/s",
            "deliv/s",
            "loss%",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms",
            "lag p99",
            "srv us/d"
        );
        for s in &self.steps {
            let _ = writeln!(
                o,
                "  {:>8} {:>10.0} {:>11.0} {:>9.3} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}  {}",
                s.rate_per_sender,
                s.offered_msgs_per_s,
                s.deliveries_per_s,
                s.counts.loss_pct,
                ms(s.latency.p50_us),
                ms(s.latency.p99_us),
                ms(s.latency.p999_us),
                ms(s.latency.max_us),
                ms(s.sender_lag.p99_us),
                s.server_cpu_us_per_delivery
                    .map_or_else(|| "-".to_string(), |v| format!("{v:.2}")),
                if s.sustainable { "yes" } else { "no" }
            );
        }
        let _ = match self.highest_sustainable_rate {
            Some(r) => writeln!(
                o,
                "  highest sustainable step: {r}/s per sender (no loss, p99 < 100 ms)"
            ),
            None => writeln!(o, "  no step was sustainable (no loss, p99 < 100 ms)"),
        };
    }

    /// Latency percentile curves, one per step, as a self-contained SVG.
    pub fn to_svg(&self) -> String {
        crate::plot::latency_percentiles(&self.curves.0)
    }

    /// The servers' RSS over the run, as a self-contained SVG (`None` without --server-pid).
    pub fn to_rss_svg(&self) -> Option<String> {
        let s = self.server.as_ref()?;
        Some(crate::plot::rss_over_time(
            &s.rss_samples,
            self.measured_window_s,
            self.config.warmup_s,
        ))
    }
}

fn mib(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

fn server_lines(o: &mut String, s: &ServerReport) {
    let _ = writeln!(
        o,
        "  {:<20}{:.2} s in window ({:.2} us/delivery), RSS {:.1} MiB, peak {:.1} MiB",
        "server CPU",
        s.cpu_s,
        s.cpu_us_per_delivery,
        mib(s.rss_kb),
        mib(s.peak_rss_kb)
    );
    if s.pids.len() > 1 {
        for p in &s.pids {
            let _ = writeln!(
                o,
                "    pid {:<8} {:.2} s, RSS {:.1} MiB, peak {:.1} MiB",
                p.pid,
                p.cpu_s,
                mib(p.rss_kb),
                mib(p.peak_rss_kb)
            );
        }
    }
    let (Some(first), Some(last)) = (s.rss_samples.first(), s.rss_samples.last()) else {
        return;
    };
    let peak = s.rss_samples.iter().map(|x| x.rss_kb).max().unwrap_or(0);
    let _ = write!(
        o,
        "  {:<20}{} samples every {} s: {:.1} MiB at start, peak {:.1}, {:.1} at the end",
        "server RSS",
        s.rss_samples.len(),
        s.rss_every_s,
        mib(first.rss_kb),
        mib(peak),
        mib(last.rss_kb)
    );
    match &s.rss_trend {
        Some(t) => {
            let _ = writeln!(
                o,
                "; last third of the window vs middle third {:+.1}%",
                t.growth_pct
            );
        }
        None => o.push('\n'),
    }
}

/// What the hostile clients did; the figures above are the healthy clients' alone.
fn hostile_lines(o: &mut String, h: &crate::hostile::HostileReport) {
    let _ = writeln!(o, "hostile clients (not in the figures above)");
    for (name, k, unit) in [
        ("flooders", &h.flooders, "messages"),
        ("pingers", &h.pingers, "pings"),
    ] {
        if k.clients > 0 {
            let _ = writeln!(
                o,
                "  {name:<20}{} clients, {} connections, {} {unit} written",
                k.clients, k.connects, k.written
            );
        }
    }
}
