//! Node-wide counters, read by `/healthz` and `/metrics`.
//!
//! Plain relaxed atomics: every counter is bumped once per message, per write or per connection,
//! never once per recipient, so cross-core contention stays off the fan-out loop.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

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
}

impl Metrics {
    /// Takes a connection slot if fewer than `max` are taken, in one atomic step so racing
    /// handshakes cannot both take the last one.
    pub fn try_connection_opened(&self, max: u64) -> bool {
        self.connections
            .fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1))
            .is_ok()
    }
    /// Gives a connection slot back.
    pub fn connection_closed(&self) {
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

    /// Prometheus text exposition, with `rooms` from the registry.
    pub fn prometheus(&self, rooms: usize) -> String {
        let mut out = String::with_capacity(1024);
        let rows: [(&str, &str, u64); 10] = [
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
        ];
        for (name, kind, value) in rows {
            let _ = writeln!(out, "# TYPE {name} {kind}\n{name} {value}");
        }
        out
    }
}
