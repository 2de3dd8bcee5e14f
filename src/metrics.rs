//! Node-wide counters, read by `/healthz` and `/metrics`.
//!
//! Plain relaxed atomics: every counter is bumped once per message, per write or per connection,
//! never once per recipient, so cross-core contention stays off the fan-out loop.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

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
    refused: AtomicU64,
    throttled: AtomicU64,
    rate_limited: AtomicU64,
    rate_limit_closed: AtomicU64,
    incomplete_closed: AtomicU64,
    pongs_replaced: AtomicU64,
    outbox_peak_bytes: AtomicU64,
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
    /// Upgrades refused at the connection limit.
    pub refused: u64,
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
}

impl Metrics {
    /// Takes a connection slot if fewer than `max` are taken, in one atomic step so racing
    /// handshakes cannot both take the last one. The slot is given back when the returned
    /// guard drops, however its holder ends (a panicking session included).
    pub fn try_connection_slot(self: &Arc<Self>, max: u64) -> Option<ConnectionSlot> {
        self.connections
            .fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| ConnectionSlot(Arc::clone(self)))
    }
    /// One client message received.
    pub fn add_message_in(&self) {
        self.messages_in.fetch_add(1, Relaxed);
    }
    /// `n` frames queued by one fan-out.
    pub fn add_deliveries(&self, n: u64) {
        self.deliveries.fetch_add(n, Relaxed);
    }
    /// `n` frames dropped for slow consumers.
    pub fn add_dropped(&self, n: u64) {
        self.dropped.fetch_add(n, Relaxed);
    }
    /// One connection marked as a slow consumer.
    pub fn add_slow_closed(&self) {
        self.slow_closed.fetch_add(1, Relaxed);
    }
    /// One upgrade refused.
    pub fn add_refused(&self) {
        self.refused.fetch_add(1, Relaxed);
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
    /// Records `bytes` waiting on one connection when it is the most seen yet. The plain load
    /// first keeps the shared line read-only in the common case (not a new peak), so sessions
    /// on different cores do not bounce it on every flush.
    pub fn observe_outbox_bytes(&self, bytes: u64) {
        if bytes > self.outbox_peak_bytes.load(Relaxed) {
            self.outbox_peak_bytes.fetch_max(bytes, Relaxed);
        }
    }
    /// One socket write that carried `frames` whole or partial frames and `bytes` bytes.
    pub fn add_write(&self, frames: u64, bytes: u64) {
        self.writes.fetch_add(1, Relaxed);
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
            refused: self.refused.load(Relaxed),
            throttled: self.throttled.load(Relaxed),
            rate_limited: self.rate_limited.load(Relaxed),
            rate_limit_closed: self.rate_limit_closed.load(Relaxed),
            incomplete_closed: self.incomplete_closed.load(Relaxed),
            pongs_replaced: self.pongs_replaced.load(Relaxed),
            outbox_peak_bytes: self.outbox_peak_bytes.load(Relaxed),
        }
    }
}

/// One taken connection slot (see [`Metrics::try_connection_slot`]).
#[derive(Debug)]
pub struct ConnectionSlot(Arc<Metrics>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Relaxed);
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

    /// Prometheus text exposition, with `rooms` from the registry.
    pub fn prometheus(&self, rooms: usize) -> String {
        let mut out = String::with_capacity(1024);
        let rows: [(&str, &str, u64); 16] = [
            ("roomcast_connections", "gauge", self.connections),
            ("roomcast_rooms", "gauge", rooms as u64),
            ("roomcast_messages_in_total", "counter", self.messages_in),
            ("roomcast_deliveries_total", "counter", self.deliveries),
            ("roomcast_dropped_total", "counter", self.dropped),
            (
                "roomcast_slow_consumers_closed_total",
                "counter",
                self.slow_closed,
            ),
            ("roomcast_frames_out_total", "counter", self.frames_out),
            ("roomcast_bytes_out_total", "counter", self.bytes_out),
            ("roomcast_socket_writes_total", "counter", self.writes),
            (
                "roomcast_connections_refused_total",
                "counter",
                self.refused,
            ),
            (
                "roomcast_inbound_throttled_total",
                "counter",
                self.throttled,
            ),
            ("roomcast_rate_limited_total", "counter", self.rate_limited),
            (
                "roomcast_rate_limit_closed_total",
                "counter",
                self.rate_limit_closed,
            ),
            (
                "roomcast_incomplete_frame_closed_total",
                "counter",
                self.incomplete_closed,
            ),
            (
                "roomcast_pongs_replaced_total",
                "counter",
                self.pongs_replaced,
            ),
            (
                "roomcast_outbox_peak_bytes",
                "gauge",
                self.outbox_peak_bytes,
            ),
        ];
        for (name, kind, value) in rows {
            let _ = writeln!(out, "# TYPE {name} {kind}\n{name} {value}");
        }
        out
    }
}
