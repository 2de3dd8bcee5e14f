//! Node-wide counters, read by `/healthz` and `/metrics`.
//!
//! Plain relaxed atomics: every counter is bumped once per message, per write or per connection,
//! never once per recipient, so cross-core contention stays off the fan-out loop.

mod histogram;
mod process;

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

pub use self::histogram::{Histogram, HistogramSnapshot};
pub use self::process::Process;

/// The node's counters; one per node, shared by every task.
#[derive(Debug, Default)]
pub struct Metrics {
    connections: AtomicU64,
    messages_in: AtomicU64,
    deliveries: AtomicU64,
    dropped: AtomicU64,
    slow_closed: AtomicU64,
    frames_out: AtomicU64,
    bytes_out: AtomicU64,
    writes: AtomicU64,
    refused_by: [AtomicU64; Refusal::COUNT],
    throttled: AtomicU64,
    rate_limited: AtomicU64,
    rate_limit_closed: AtomicU64,
    incomplete_closed: AtomicU64,
    pongs_replaced: AtomicU64,
    outbox_peak_bytes: AtomicU64,
    pass_peak_bytes: AtomicU64,
    backplane_refused: AtomicU64,
    backplane_failed: AtomicU64,
    backplane_dropped: AtomicU64,
    backplane_connects: AtomicU64,
    fanout_yields: AtomicU64,
    resumes_recovered: AtomicU64,
    resumes_lost: AtomicU64,
    stream_reads: AtomicU64,
    stream_reads_refused: AtomicU64,
    history_repaired: AtomicU64,
    presence_refused: AtomicU64,
    /// Time to serve one message to a room's local members (every slice, the direct writes
    /// included), µs: observed once per message.
    pub fanout_us: Histogram,
    /// Frames each socket write carried: how deep the outbox was when it was written.
    /// Publishers' direct writes are added per broadcast, as single-frame writes.
    pub write_frames: Histogram,
    /// From accepting the connection to the session starting, µs (refusals not included).
    pub handshake_us: Histogram,
}

/// Why a connection was refused before it became a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The node is at `--max-connections` (503).
    MaxConnections,
    /// The address is at `--max-connections-per-ip` (429).
    PerIp,
    /// The address is over `--max-connect-rate-per-ip` (429).
    RatePerIp,
    /// Too many handshakes in progress (503).
    Handshakes,
    /// The node is draining (503).
    Draining,
    /// A browser page from an origin not on the allow-list (403).
    Origin,
    /// A handshake token that is malformed, badly signed or expired (401).
    Unauthorized,
    /// The token's user is at `--max-connections-per-user` (429).
    PerUser,
}

impl Refusal {
    /// How many reasons there are.
    pub const COUNT: usize = 8;
    /// Every reason, in label order.
    pub const ALL: [Refusal; Refusal::COUNT] = [
        Refusal::MaxConnections,
        Refusal::PerIp,
        Refusal::RatePerIp,
        Refusal::Handshakes,
        Refusal::Draining,
        Refusal::Origin,
        Refusal::Unauthorized,
        Refusal::PerUser,
    ];

    /// The `reason` label in `/metrics`.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::MaxConnections => "max_connections",
            Refusal::PerIp => "per_ip",
            Refusal::RatePerIp => "rate_per_ip",
            Refusal::Handshakes => "handshakes",
            Refusal::Draining => "draining",
            Refusal::Origin => "origin",
            Refusal::Unauthorized => "unauthorized",
            Refusal::PerUser => "per_user",
        }
    }
}

/// A point-in-time copy of [`Metrics`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// WebSocket connections open (slots taken, upgrades in progress included).
    pub connections: u64,
    /// Client messages received.
    pub messages_in: u64,
    /// Frames queued for recipients.
    pub deliveries: u64,
    /// Frames dropped for slow consumers under policy `drop`.
    pub dropped: u64,
    /// Connections closed as slow consumers.
    pub slow_closed: u64,
    /// Frames written to sockets (a frame split over two writes counts twice).
    pub frames_out: u64,
    /// Bytes written to sockets.
    pub bytes_out: u64,
    /// Socket writes.
    pub writes: u64,
    /// Upgrades and connections refused, all reasons.
    pub refused: u64,
    /// The same by [`Refusal`], indexed by `Refusal as usize`.
    pub refused_by: [u64; Refusal::COUNT],
    /// Times a session stopped reading because its sender was over the inbound limit.
    pub throttled: u64,
    /// Messages refused with `rate_limited` (policy `reject`).
    pub rate_limited: u64,
    /// Connections closed with 4008 for too many refusals.
    pub rate_limit_closed: u64,
    /// Connections closed with 1008 because a frame or fragmented message did not complete.
    pub incomplete_closed: u64,
    /// Pongs replaced by a newer one before they were written (at most one is ever pending).
    pub pongs_replaced: u64,
    /// The most bytes one connection has had waiting to be written (its outbox and its pending
    /// pong), as seen by its session before each flush: the figure that shows outbound memory
    /// stays bounded per connection.
    pub outbox_peak_bytes: u64,
    /// The most bytes one worker's pass has held copied for the sockets it claimed (frames
    /// appended behind a claim, each claim within its connection's outbound bound): the
    /// figure that shows the pass's buffers stay bounded.
    pub pass_peak_bytes: u64,
    /// Publishes refused at once because the queue to Redis was full.
    pub backplane_refused: u64,
    /// Accepted publishes that never reached Redis; each sender got `backplane_unavailable`.
    pub backplane_failed: u64,
    /// Messages from Redis dropped because this node's fan-out was behind.
    pub backplane_dropped: u64,
    /// Times the Redis link was (re)established; more than one means a reconnect.
    pub backplane_connects: u64,
    /// Times a broadcast to a large room let other tasks run between two slices.
    pub fanout_yields: u64,
    /// Resumes that replayed everything the member missed.
    pub resumes_recovered: u64,
    /// Resumes answered `recovered: false` (history gone, or another epoch).
    pub resumes_lost: u64,
    /// Reads of a room's Redis stream (resumes and gap repairs).
    pub stream_reads: u64,
    /// Resumes not served from the Redis stream because `--redis-history-reads` reads were
    /// already queued: answered `recovered: false`.
    pub stream_reads_refused: u64,
    /// Messages read from a room's Redis stream to fill a gap in live traffic.
    pub history_repaired: u64,
    /// Presence questions answered with this node's count alone: too many were queued.
    pub presence_refused: u64,
    /// See [`Metrics::fanout_us`].
    pub fanout_us: HistogramSnapshot,
    /// See [`Metrics::write_frames`].
    pub write_frames: HistogramSnapshot,
    /// See [`Metrics::handshake_us`].
    pub handshake_us: HistogramSnapshot,
}

impl Metrics {
    /// Takes a connection slot if fewer than `max` are taken, in one atomic step so racing
    /// handshakes cannot both take the last one. The slot is given back when the returned
    /// guard drops, however its holder ends (a panicking session included).
    pub fn try_connection_slot(self: &Arc<Self>, max: u64) -> Option<ConnectionSlot> {
        self.connections
            .fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| ConnectionSlot(Some(Arc::clone(self))))
    }
    /// Gives back a connection slot taken with [`try_connection_slot`](Self::try_connection_slot)
    /// and handed over.
    pub(crate) fn release_connection(&self) {
        self.connections.fetch_sub(1, Relaxed);
    }
    /// One client message received.
    pub fn add_message_in(&self) {
        self.messages_in.fetch_add(1, Relaxed);
    }
    /// `n` frames queued by one fan-out.
    pub fn add_deliveries(&self, n: u64) {
        self.deliveries.fetch_add(n, Relaxed);
    }
    /// A broadcast to a large room let other tasks run between two slices.
    pub fn add_fanout_yield(&self) {
        self.fanout_yields.fetch_add(1, Relaxed);
    }
    /// A resume finished, replaying everything (`recovered`) or nothing.
    pub fn add_resume(&self, recovered: bool) {
        let counter = if recovered {
            &self.resumes_recovered
        } else {
            &self.resumes_lost
        };
        counter.fetch_add(1, Relaxed);
    }
    /// One read of a room's Redis stream.
    pub fn add_stream_read(&self) {
        self.stream_reads.fetch_add(1, Relaxed);
    }
    /// A resume's stream read refused: too many queued.
    pub fn add_stream_read_refused(&self) {
        self.stream_reads_refused.fetch_add(1, Relaxed);
    }
    /// A presence question not sent to Redis: too many queued.
    pub fn add_presence_refused(&self) {
        self.presence_refused.fetch_add(1, Relaxed);
    }
    /// A message filled into a gap from the room's Redis stream.
    pub fn add_history_repaired(&self) {
        self.history_repaired.fetch_add(1, Relaxed);
    }
    /// `n` frames dropped for slow consumers.
    pub fn add_dropped(&self, n: u64) {
        self.dropped.fetch_add(n, Relaxed);
    }
    /// One connection marked as a slow consumer.
    pub fn add_slow_closed(&self) {
        self.slow_closed.fetch_add(1, Relaxed);
    }
    /// One upgrade or connection refused, for `why`.
    pub fn add_refused(&self, why: Refusal) {
        self.refused_by[why as usize].fetch_add(1, Relaxed);
    }
    /// A session stopped reading to throttle its sender.
    pub fn add_throttled(&self) {
        self.throttled.fetch_add(1, Relaxed);
    }
    /// A message refused with `rate_limited`.
    pub fn add_rate_limited(&self) {
        self.rate_limited.fetch_add(1, Relaxed);
    }
    /// A connection closed with 4008.
    pub fn add_rate_limit_closed(&self) {
        self.rate_limit_closed.fetch_add(1, Relaxed);
    }
    /// A connection closed with 1008 "incomplete frame".
    pub fn add_incomplete_closed(&self) {
        self.incomplete_closed.fetch_add(1, Relaxed);
    }
    /// A pending pong was replaced by a newer one.
    pub fn add_pong_replaced(&self) {
        self.pongs_replaced.fetch_add(1, Relaxed);
    }
    /// Records `bytes` waiting on one connection when it is the most seen yet (every flush).
    pub fn observe_outbox_bytes(&self, bytes: u64) {
        raise(&self.outbox_peak_bytes, bytes);
    }
    /// Records `bytes` copied behind one pass's claims when it is the most seen yet (once per
    /// pass).
    pub fn observe_pass_bytes(&self, bytes: u64) {
        raise(&self.pass_peak_bytes, bytes);
    }
    /// A publish refused because the queue to Redis was full.
    pub fn add_backplane_refused(&self) {
        self.backplane_refused.fetch_add(1, Relaxed);
    }
    /// An accepted publish failed back to its sender.
    pub fn add_backplane_failed(&self) {
        self.backplane_failed.fetch_add(1, Relaxed);
    }
    /// A message from Redis dropped before fan-out.
    pub fn add_backplane_dropped(&self) {
        self.backplane_dropped.fetch_add(1, Relaxed);
    }
    /// The Redis link came up.
    pub fn add_backplane_connect(&self) {
        self.backplane_connects.fetch_add(1, Relaxed);
    }
    /// One socket write that carried `frames` whole or partial frames and `bytes` bytes.
    pub fn add_write(&self, frames: u64, bytes: u64) {
        self.write_frames.observe(frames);
        self.add_writes(1, frames, bytes, 0);
    }

    /// `writes` socket writes carrying `frames` whole frames and `bytes` bytes in all, of which
    /// `single` carried at most one frame each and are not yet in the frames-per-write
    /// histogram (publishers add the rest to it as they write).
    pub fn add_writes(&self, writes: u64, frames: u64, bytes: u64, single: u64) {
        self.write_frames.observe_n(1, single);
        self.writes.fetch_add(writes, Relaxed);
        self.frames_out.fetch_add(frames, Relaxed);
        self.bytes_out.fetch_add(bytes, Relaxed);
    }

    /// Every counter, each read once (not one atomic cut across them).
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            connections: self.connections.load(Relaxed),
            messages_in: self.messages_in.load(Relaxed),
            deliveries: self.deliveries.load(Relaxed),
            dropped: self.dropped.load(Relaxed),
            slow_closed: self.slow_closed.load(Relaxed),
            frames_out: self.frames_out.load(Relaxed),
            bytes_out: self.bytes_out.load(Relaxed),
            writes: self.writes.load(Relaxed),
            refused: self.refused_by.iter().map(|c| c.load(Relaxed)).sum(),
            refused_by: std::array::from_fn(|i| self.refused_by[i].load(Relaxed)),
            throttled: self.throttled.load(Relaxed),
            rate_limited: self.rate_limited.load(Relaxed),
            rate_limit_closed: self.rate_limit_closed.load(Relaxed),
            incomplete_closed: self.incomplete_closed.load(Relaxed),
            pongs_replaced: self.pongs_replaced.load(Relaxed),
            outbox_peak_bytes: self.outbox_peak_bytes.load(Relaxed),
            pass_peak_bytes: self.pass_peak_bytes.load(Relaxed),
            backplane_refused: self.backplane_refused.load(Relaxed),
            backplane_failed: self.backplane_failed.load(Relaxed),
            backplane_dropped: self.backplane_dropped.load(Relaxed),
            backplane_connects: self.backplane_connects.load(Relaxed),
            fanout_yields: self.fanout_yields.load(Relaxed),
            resumes_recovered: self.resumes_recovered.load(Relaxed),
            resumes_lost: self.resumes_lost.load(Relaxed),
            stream_reads: self.stream_reads.load(Relaxed),
            stream_reads_refused: self.stream_reads_refused.load(Relaxed),
            history_repaired: self.history_repaired.load(Relaxed),
            presence_refused: self.presence_refused.load(Relaxed),
            fanout_us: self.fanout_us.snapshot(),
            write_frames: self.write_frames.snapshot(),
            handshake_us: self.handshake_us.snapshot(),
        }
    }
}

/// Raises `peak` to `value` when it is the most seen yet. The plain load first keeps the
/// shared line read-only in the common case (not a new peak), so threads on different cores
/// do not bounce it on every observation.
fn raise(peak: &AtomicU64, value: u64) {
    if value > peak.load(Relaxed) {
        peak.fetch_max(value, Relaxed);
    }
}

/// One taken connection slot (see [`Metrics::try_connection_slot`]).
#[derive(Debug)]
pub struct ConnectionSlot(Option<Arc<Metrics>>);

impl ConnectionSlot {
    /// Ends this guard without giving the slot back: its new holder does, with
    /// [`Metrics::release_connection`].
    pub(crate) fn hand_over(mut self) {
        self.0 = None;
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        if let Some(metrics) = self.0.take() {
            metrics.release_connection();
        }
    }
}

impl Snapshot {
    /// Frames carried per socket write since start: the coalescing the writer achieved.
    pub fn frames_per_write(&self) -> f64 {
        if self.writes == 0 {
            0.0
        } else {
            self.frames_out as f64 / self.writes as f64
        }
    }

    /// Prometheus text exposition; `gauges` are the figures read elsewhere (rooms from the
    /// registry, the backplane's queues), as (name, help, value).
    pub fn prometheus(&self, gauges: &[(&str, &str, u64)]) -> String {
        let mut out = String::with_capacity(4096);
        let mut row = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        row(
            "roomcast_connections",
            "gauge",
            "WebSocket connections open",
            self.connections,
        );
        for &(name, help, value) in gauges {
            row(name, "gauge", help, value);
        }
        for (name, help, value) in self.counters().into_iter().chain(self.backplane_counters()) {
            row(name, "counter", help, value);
        }
        row(
            "roomcast_outbox_peak_bytes",
            "gauge",
            "most bytes one connection has had waiting to be written",
            self.outbox_peak_bytes,
        );
        row(
            "roomcast_pass_peak_bytes",
            "gauge",
            "most bytes one worker's pass has held copied for the sockets it claimed",
            self.pass_peak_bytes,
        );
        let name = "roomcast_connections_refused_total";
        let _ = writeln!(
            out,
            "# HELP {name} upgrades and connections refused, by reason"
        );
        let _ = writeln!(out, "# TYPE {name} counter");
        for refusal in Refusal::ALL {
            let value = self.refused_by[refusal as usize];
            let _ = writeln!(out, "{name}{{reason=\"{}\"}} {value}", refusal.label());
        }
        self.fanout_us.prometheus(
            &mut out,
            "roomcast_fanout_seconds",
            "time to serve one message to its room's local members",
            1e-6,
        );
        self.write_frames.prometheus(
            &mut out,
            "roomcast_write_frames",
            "frames each socket write carried (the outbox depth it took)",
            1.0,
        );
        self.handshake_us.prometheus(
            &mut out,
            "roomcast_handshake_seconds",
            "from accepting a connection to its session starting",
            1e-6,
        );
        Process::read().prometheus(&mut out);
        out
    }

    fn counters(&self) -> [(&'static str, &'static str, u64); 12] {
        [
            (
                "roomcast_messages_in_total",
                "client messages received",
                self.messages_in,
            ),
            (
                "roomcast_deliveries_total",
                "frames queued for recipients",
                self.deliveries,
            ),
            (
                "roomcast_dropped_total",
                "frames dropped for slow consumers",
                self.dropped,
            ),
            (
                "roomcast_slow_consumers_closed_total",
                "connections closed 1008 slow consumer",
                self.slow_closed,
            ),
            (
                "roomcast_frames_out_total",
                "frames written to sockets",
                self.frames_out,
            ),
            (
                "roomcast_bytes_out_total",
                "bytes written to sockets",
                self.bytes_out,
            ),
            ("roomcast_socket_writes_total", "socket writes", self.writes),
            (
                "roomcast_inbound_throttled_total",
                "times a sender was throttled",
                self.throttled,
            ),
            (
                "roomcast_rate_limited_total",
                "frames refused rate_limited",
                self.rate_limited,
            ),
            (
                "roomcast_rate_limit_closed_total",
                "connections closed 4008",
                self.rate_limit_closed,
            ),
            (
                "roomcast_incomplete_frame_closed_total",
                "connections closed 1008 incomplete frame",
                self.incomplete_closed,
            ),
            (
                "roomcast_pongs_replaced_total",
                "pongs replaced by a newer one",
                self.pongs_replaced,
            ),
        ]
    }

    fn backplane_counters(&self) -> [(&'static str, &'static str, u64); 11] {
        [
            (
                "roomcast_presence_incomplete_total",
                "presence questions answered with this node's count alone: too many queued",
                self.presence_refused,
            ),
            (
                "roomcast_history_stream_reads_total",
                "reads of a room's Redis stream for resumes and gap repairs",
                self.stream_reads,
            ),
            (
                "roomcast_history_stream_reads_refused_total",
                "resumes not read from Redis: --redis-history-reads reads already queued",
                self.stream_reads_refused,
            ),
            (
                "roomcast_history_repaired_total",
                "messages read from a room's Redis stream to fill a gap",
                self.history_repaired,
            ),
            (
                "roomcast_resumes_recovered_total",
                "resumes that replayed everything missed",
                self.resumes_recovered,
            ),
            (
                "roomcast_resumes_lost_total",
                "resumes answered recovered false",
                self.resumes_lost,
            ),
            (
                "roomcast_backplane_refused_total",
                "publishes refused: queue to Redis full",
                self.backplane_refused,
            ),
            (
                "roomcast_backplane_failed_total",
                "accepted publishes failed back to their sender",
                self.backplane_failed,
            ),
            (
                "roomcast_backplane_dropped_total",
                "messages from Redis dropped: fan-out behind",
                self.backplane_dropped,
            ),
            (
                "roomcast_backplane_connects_total",
                "times the Redis link came up",
                self.backplane_connects,
            ),
            (
                "roomcast_fanout_yields_total",
                "broadcasts to large rooms yielding between slices",
                self.fanout_yields,
            ),
        ]
    }
}
