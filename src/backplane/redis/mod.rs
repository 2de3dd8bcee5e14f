//! The Redis Pub/Sub bus: one channel per room, one subscriber connection per node, publishes
//! pipelined over one multiplexed connection.
//!
//! One worker task (`worker`) owns both connections and applies every operation in the order
//! sessions issued it: a `SUBSCRIBE` is confirmed before any later `PUBLISH` goes out, so a
//! client that subscribes and then sends hears its own message. Consecutive publishes are sent
//! as one pipeline ("smart batching"), one pipeline per turn, so the probe timer always gets
//! its turn however hard clients publish. Redis Pub/Sub is at-most-once, so the worker treats
//! failure as normal: it notices (connection errors, and a probe it publishes to itself every
//! 500 ms that must come back within 2 s), reconnects with backoff, re-subscribes every room
//! with local members, and only then reports healthy again.
//!
//! What must stay true for senders: a publish is either refused at once (`Err`, while the link
//! is down or the queue is full) or accepted; an accepted publish is either sent to Redis or
//! its sender gets a `backplane_unavailable` error naming the room. Nothing vanishes silently.
//!
//! The receiving side (`inbox`) is two stages so that Redis never backs up on this node: one
//! task only reads the subscriber connection into a bounded queue, another fans out. When
//! fan-out falls behind, the queue fills and further messages are dropped and counted in one
//! place, rather than growing memory here or Redis's output buffer until Redis cuts the
//! connection.

mod inbox;
mod presence;
mod worker;

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use self::inbox::Inbox;
pub(crate) use self::worker::Worker;
use super::quota::Quota;
use super::BackplaneError;
use crate::config::RedisLimits;
use crate::history::{History, HistoryConfig, Stamp};
use crate::metrics::Metrics;
use crate::outbox::{ConnId, Outbox};
use crate::protocol;
use crate::room::{RoomId, RoomWatcher};
use crate::users::Users;

/// Problems with the Redis configuration itself (runtime failures are retried, not returned).
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    /// The URL does not parse or names an unsupported scheme.
    #[error("invalid Redis URL: {0}")]
    Url(#[source] redis::RedisError),
}

enum Op {
    Subscribe(RoomId),
    Unsubscribe(RoomId),
    Publish(Pending),
    Fetch(Fetch),
    Presence(Presence),
}

/// A presence question: how many members room `room` has on the other nodes.
struct Presence {
    room: RoomId,
    reply: oneshot::Sender<u64>,
    /// Its place among the questions the node has queued ([`MAX_PRESENCE_QUESTIONS`]).
    _slot: Slot,
}

/// Presence questions a node has queued for Redis at most; past it a question is answered
/// with this node's count alone (`"complete":false`), counted. Each is one small script run;
/// a session asks at the rate its inbound limit allows.
const MAX_PRESENCE_QUESTIONS: u64 = 256;

/// A read of part of a room's Redis stream (history across nodes). The answer goes to
/// `reply`; a dropped `reply` (the link went down first) means it could not be read.
struct Fetch {
    room: RoomId,
    /// The first offset wanted; `None`: only the newest entry.
    first: Option<u64>,
    /// The last one (`None`: to the end of the stream).
    last: Option<u64>,
    reply: oneshot::Sender<Fetched>,
    /// A resume's place among the node's stream reads (`--redis-history-reads`), freed when
    /// the read is answered or dropped. `None` for a gap repair: the delivery task waits for
    /// its own, so there is one at a time by construction.
    _slot: Option<Slot>,
}

/// A place taken in one of the State's bounded queues of questions, given back on drop (the
/// question answered, or dropped with the connection).
struct Slot(Arc<State>, fn(&State) -> &Quota);

impl Drop for Slot {
    fn drop(&mut self) {
        (self.1)(&self.0).give_back(0);
    }
}

/// One message read from a room's Redis stream: its stamp, its bare frame, and the member it
/// skips on this node (a chat message's sender, when it was sent here).
pub struct Relayed {
    pub stamp: Stamp,
    pub frame: Bytes,
    pub skip: Option<ConnId>,
}

/// What part of a room's Redis stream holds, oldest first.
pub type Fetched = Vec<Relayed>;

/// An accepted publish on its way to Redis. It keeps its sender's outbox so that, if it never
/// gets there, the sender is told.
struct Pending {
    channel: String,
    /// With history (`sequenced`), the relay without its closing brace: the script that
    /// numbers the message appends the offset and epoch.
    payload: Vec<u8>,
    /// Numbered, kept and published by one script in Redis, not just published.
    sequenced: bool,
    room: Box<str>,
    from: Option<Arc<Outbox>>,
}

impl Pending {
    /// What it holds against the queue's byte bound.
    fn bytes(&self) -> u64 {
        (self.channel.len() + self.payload.len() + self.room.len()) as u64
    }
}

/// State shared by the sessions' handle, the worker and the subscriber's listener.
struct State {
    healthy: AtomicBool,
    /// Accepted publishes not yet sent (or failed).
    queue: Quota,
    /// Stream reads for resumes queued or in flight (the byte side is unused): a storm of
    /// resumes costs Redis at most this many reads at a time, the rest are not recovered.
    reads: Quota,
    /// Presence questions queued or in flight (the byte side is unused).
    questions: Quota,
    born: Instant,
    /// Milliseconds since `born` when this node last heard its own probe.
    probe_heard: AtomicU64,
}

impl State {
    fn heard_probe(&self) {
        let ms = self.born.elapsed().as_millis() as u64;
        self.probe_heard.store(ms, Ordering::Relaxed);
    }

    fn since_probe(&self) -> Duration {
        let heard = Duration::from_millis(self.probe_heard.load(Ordering::Relaxed));
        self.born.elapsed().saturating_sub(heard)
    }
}

/// What the bus holds right now, for `/metrics`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Queues {
    /// Accepted publishes waiting for Redis: messages and bytes.
    pub outgoing: (u64, u64),
    /// Messages from Redis waiting for fan-out: messages and bytes.
    pub incoming: (u64, u64),
}

/// The sessions' side of the bus; cheap to clone.
#[derive(Clone)]
pub struct Bus {
    /// Unbounded as a channel, bounded by `State::queue`: publishes are counted there before
    /// they are sent, and (un)subscribes are at most two per room.
    ops: mpsc::UnboundedSender<Op>,
    state: Arc<State>,
    inbox: Arc<Inbox>,
    node: Arc<str>,
    prefix: Arc<str>,
    /// History is on: room publishes are numbered in Redis.
    sequenced: bool,
    metrics: Arc<Metrics>,
}

/// Tells the worker when rooms gain their first or lose their last local member. It holds a
/// weak sender so that the registry (which the listener keeps) cannot keep the worker alive
/// after the node is gone.
pub struct Watcher {
    ops: mpsc::WeakUnboundedSender<Op>,
}

impl RoomWatcher for Watcher {
    fn opened(&self, room: &RoomId) {
        if let Some(ops) = self.ops.upgrade() {
            let _ = ops.send(Op::Subscribe(room.clone()));
        }
    }

    fn closed(&self, room: &RoomId) {
        if let Some(ops) = self.ops.upgrade() {
            let _ = ops.send(Op::Unsubscribe(room.clone()));
        }
    }
}

impl Bus {
    /// The bus, the registry's watcher and the worker to spawn; nothing connects until the
    /// worker runs.
    pub fn new(
        url: &str,
        prefix: &str,
        limits: &RedisLimits,
        metrics: Arc<Metrics>,
        users: Arc<Users>,
        history: Option<(HistoryConfig, Arc<History>)>,
    ) -> Result<(Self, Watcher, Worker), RedisError> {
        let client = redis::Client::open(url).map_err(RedisError::Url)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let state = Arc::new(State {
            healthy: AtomicBool::new(false),
            queue: Quota::new(limits.queue_messages, limits.queue_bytes),
            reads: Quota::new(limits.history_reads, u64::MAX),
            questions: Quota::new(MAX_PRESENCE_QUESTIONS, u64::MAX),
            born: Instant::now(),
            probe_heard: AtomicU64::new(0),
        });
        let node: Arc<str> = Arc::from(node_id());
        let prefix: Arc<str> = Arc::from(prefix);
        let inbox = Arc::new(Inbox::new(limits, Arc::clone(&metrics), users));
        let watcher = Watcher {
            ops: tx.downgrade(),
        };
        let worker = Worker {
            client,
            ops: rx,
            repairs: tx.downgrade(),
            state: Arc::clone(&state),
            inbox: Arc::clone(&inbox),
            node: Arc::clone(&node),
            prefix: Arc::clone(&prefix),
            metrics: Arc::clone(&metrics),
            script: None,
            presence_scripts: None,
            presence: presence::Book::default(),
            presence_at: None,
            history: history.clone(),
        };
        let bus = Self {
            ops: tx,
            state,
            inbox,
            node,
            prefix,
            sequenced: history.is_some(),
            metrics,
        };
        Ok((bus, watcher, worker))
    }

    /// True while connected, subscribed and hearing our own probe.
    pub fn is_healthy(&self) -> bool {
        self.state.healthy.load(Ordering::Acquire)
    }

    /// What both queues hold now.
    pub fn queues(&self) -> Queues {
        Queues {
            outgoing: self.state.queue.used(),
            incoming: self.inbox.used(),
        }
    }

    /// Accepts a publish for the worker, or refuses it at once while the link is down or the
    /// queue is at its bound (in messages or bytes).
    pub fn publish(
        &self,
        room: &str,
        message: &str,
        skip: Option<ConnId>,
        from: Option<&Arc<Outbox>>,
    ) -> Result<(), BackplaneError> {
        if !self.is_healthy() {
            return Err(BackplaneError::Unavailable);
        }
        let mut payload = protocol::encode_relay(room, message, &self.node, skip.map(|c| c.0));
        if self.sequenced {
            // The script closes it, after the offset and epoch.
            payload.pop();
        }
        let pending = Pending {
            channel: format!("{}{room}", self.prefix),
            payload,
            sequenced: self.sequenced,
            room: room.into(),
            from: from.cloned(),
        };
        self.enqueue(pending)
    }

    /// Asks for what room `room`'s Redis stream holds from offset `first` on (`None`: its
    /// newest entry only), read after every
    /// subscribe queued before this call has taken effect. `None` while the link is down, or
    /// when `--redis-history-reads` reads are already queued (counted).
    pub fn fetch(&self, room: &str, first: Option<u64>) -> Option<oneshot::Receiver<Fetched>> {
        if !self.is_healthy() || !self.sequenced {
            return None;
        }
        if !self.state.reads.try_take(0) {
            self.metrics.add_stream_read_refused();
            return None;
        }
        let slot = Slot(Arc::clone(&self.state), |s| &s.reads);
        let (reply, answer) = oneshot::channel();
        let fetch = Fetch {
            room: RoomId::new(room),
            first,
            last: None,
            reply,
            _slot: Some(slot),
        };
        self.ops.send(Op::Fetch(fetch)).ok()?;
        Some(answer)
    }

    /// Asks how many members room `room` has on the other nodes; `None` while the link is
    /// down or [`MAX_PRESENCE_QUESTIONS`] are queued (counted).
    pub fn presence(&self, room: &str) -> Option<oneshot::Receiver<u64>> {
        if !self.is_healthy() {
            return None;
        }
        if !self.state.questions.try_take(0) {
            self.metrics.add_presence_refused();
            return None;
        }
        let (reply, answer) = oneshot::channel();
        let ask = Presence {
            room: RoomId::new(room),
            reply,
            _slot: Slot(Arc::clone(&self.state), |s| &s.questions),
        };
        self.ops.send(Op::Presence(ask)).ok()?;
        Some(answer)
    }

    /// Tells every node (this one too, through Redis) to close `user`'s connections.
    pub fn disconnect(&self, user: &str) -> Result<(), BackplaneError> {
        if !self.is_healthy() {
            return Err(BackplaneError::Unavailable);
        }
        self.enqueue(Pending {
            channel: control_channel(&self.prefix),
            payload: serde_json::json!({"type": "disconnect", "user": user})
                .to_string()
                .into_bytes(),
            sequenced: false,
            room: protocol::RESERVED_PREFIX.into(),
            from: None,
        })
    }

    fn enqueue(&self, pending: Pending) -> Result<(), BackplaneError> {
        let bytes = pending.bytes();
        if !self.state.queue.try_take(bytes) {
            return Err(BackplaneError::Full);
        }
        self.ops.send(Op::Publish(pending)).map_err(|_| {
            self.state.queue.give_back(bytes);
            BackplaneError::Unavailable
        })
    }
}

/// The channel every node listens on for fleet-wide commands (revocations).
fn control_channel(prefix: &str) -> String {
    format!("{prefix}{}:control", protocol::RESERVED_PREFIX)
}

/// A node id unique enough to tell this process's publications from every other node's.
fn node_id() -> String {
    let seed = (
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    format!(
        "{:016x}",
        std::collections::hash_map::RandomState::new().hash_one(seed)
    )
}
