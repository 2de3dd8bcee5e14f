//! The Redis Pub/Sub bus: one channel per room, one subscriber connection per node, publishes
//! pipelined over one multiplexed connection.
//!
//! One worker task owns both connections and applies every operation in the order sessions
//! issued it: a `SUBSCRIBE` is confirmed before any later `PUBLISH` goes out, so a client that
//! subscribes and then sends hears its own message. Consecutive publishes are sent as one
//! pipeline ("smart batching"). Redis Pub/Sub is at-most-once, so the worker treats failure as
//! normal: it notices (connection errors, and a probe it publishes to itself every second that
//! must come back), reconnects with backoff, re-subscribes every room with local members, and
//! only then reports healthy again. While unhealthy, publishes fail fast with
//! `backplane_unavailable` instead of vanishing.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{MultiplexedConnection, PubSubSink, PubSubStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::BackplaneError;
use crate::frame;
use crate::metrics::Metrics;
use crate::outbox::ConnId;
use crate::protocol;
use crate::room::{Registry, RoomId, RoomWatcher};

/// Problems with the Redis configuration itself (runtime failures are retried, not returned).
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    /// The URL does not parse or names an unsupported scheme.
    #[error("invalid Redis URL: {0}")]
    Url(#[source] redis::RedisError),
}

/// Publishes queued for Redis beyond which senders get `backplane_unavailable`: Redis is not
/// keeping up, and an unbounded queue would only turn that into memory growth.
const MAX_QUEUED: usize = 100_000;
/// Most publishes sent in one pipeline.
const MAX_PIPELINE: usize = 512;
const PROBE_EVERY: Duration = Duration::from_millis(500);
/// A subscriber that has not heard its own probe for this long is deaf and gets replaced.
const PROBE_DEADLINE: Duration = Duration::from_secs(2);
const OP_TIMEOUT: Duration = Duration::from_secs(2);
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_millis(500);

enum Op {
    Subscribe(RoomId),
    Unsubscribe(RoomId),
    Publish { channel: String, payload: Vec<u8> },
}

/// State shared by the sessions' handle, the worker and the subscriber's listener.
struct State {
    healthy: AtomicBool,
    queued: AtomicUsize,
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

/// The sessions' side of the bus; cheap to clone.
#[derive(Clone)]
pub struct Bus {
    ops: mpsc::UnboundedSender<Op>,
    state: Arc<State>,
    node: Arc<str>,
    prefix: Arc<str>,
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

/// The task that owns the Redis connections.
pub struct Worker {
    client: redis::Client,
    ops: mpsc::UnboundedReceiver<Op>,
    state: Arc<State>,
    node: Arc<str>,
    prefix: Arc<str>,
}

impl Bus {
    pub fn new(url: &str, prefix: &str) -> Result<(Self, Watcher, Worker), RedisError> {
        let client = redis::Client::open(url).map_err(RedisError::Url)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let state = Arc::new(State {
            healthy: AtomicBool::new(false),
            queued: AtomicUsize::new(0),
            born: Instant::now(),
            probe_heard: AtomicU64::new(0),
        });
        let node: Arc<str> = Arc::from(node_id());
        let prefix: Arc<str> = Arc::from(prefix);
        let watcher = Watcher {
            ops: tx.downgrade(),
        };
        let worker = Worker {
            client,
            ops: rx,
            state: Arc::clone(&state),
            node: Arc::clone(&node),
            prefix: Arc::clone(&prefix),
        };
        let bus = Self {
            ops: tx,
            state,
            node,
            prefix,
        };
        Ok((bus, watcher, worker))
    }

    pub fn is_healthy(&self) -> bool {
        self.state.healthy.load(Ordering::Acquire)
    }

    pub fn publish(
        &self,
        room: &str,
        message: &str,
        skip: Option<ConnId>,
    ) -> Result<(), BackplaneError> {
        if !self.is_healthy() || self.state.queued.load(Ordering::Relaxed) >= MAX_QUEUED {
            return Err(BackplaneError::Unavailable);
        }
        let payload = protocol::encode_relay(room, message, &self.node, skip.map(|c| c.0));
        let channel = format!("{}{room}", self.prefix);
        self.state.queued.fetch_add(1, Ordering::Relaxed);
        self.ops
            .send(Op::Publish { channel, payload })
            .map_err(|_| BackplaneError::Unavailable)
    }
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

/// Why a connected period ended.
enum Ended {
    /// The node is gone (every sender dropped): stop for good.
    Stop,
    /// Redis failed us; reconnect. `connected` says whether we got as far as serving.
    Lost { why: LinkError, connected: bool },
}

/// Why the worker gave up a connection to Redis; logged, then it reconnects.
#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error("{step}: {source}")]
    Redis {
        step: &'static str,
        #[source]
        source: redis::RedisError,
    },
    #[error("{step}: no answer within {OP_TIMEOUT:?}")]
    Timeout { step: &'static str },
    #[error("subscriber is deaf: our own probe did not come back")]
    Deaf,
    #[error("subscriber connection closed")]
    SubscriberClosed,
}

fn lost(why: LinkError, connected: bool) -> Ended {
    Ended::Lost { why, connected }
}

/// Runs `fut`, the worker's `step`, with the operation timeout; a timeout counts as a failure
/// like any other.
async fn timed<T>(
    step: &'static str,
    fut: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, LinkError> {
    match tokio::time::timeout(OP_TIMEOUT, fut).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => Err(LinkError::Redis { step, source }),
        Err(_) => Err(LinkError::Timeout { step }),
    }
}

impl Worker {
    fn probe_channel(&self) -> String {
        format!("{}__roomcast_probe__{}", self.prefix, self.node)
    }

    fn channel(&self, room: &RoomId) -> String {
        format!("{}{room}", self.prefix)
    }

    pub async fn run(mut self, registry: Registry, metrics: Arc<Metrics>) {
        let mut backoff = MIN_BACKOFF;
        loop {
            match self.connected(&registry, &metrics).await {
                Ended::Stop => return,
                Ended::Lost { why, connected } => {
                    if connected {
                        backoff = MIN_BACKOFF;
                        tracing::warn!("redis backplane lost: {why}; reconnecting");
                    } else {
                        tracing::debug!("redis backplane still down: {why}");
                    }
                }
            }
            self.state.healthy.store(false, Ordering::Release);
            // Fail what was queued and what arrives while we wait: the registry is the truth
            // about which rooms to subscribe, so dropping (un)subscribe ops here is safe.
            let until = Instant::now() + backoff;
            loop {
                tokio::select! {
                    op = self.ops.recv() => match op {
                        None => return,
                        Some(Op::Publish { .. }) => {
                            self.state.queued.fetch_sub(1, Ordering::Relaxed);
                        }
                        Some(_) => {}
                    },
                    _ = tokio::time::sleep_until(until) => break,
                }
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// One connected period: connect, subscribe everything, serve until something fails.
    async fn connected(&mut self, registry: &Registry, metrics: &Arc<Metrics>) -> Ended {
        let mut conn = match timed("connect", self.client.get_multiplexed_async_connection()).await
        {
            Ok(conn) => conn,
            Err(e) => return lost(e, false),
        };
        let (mut sink, stream) =
            match timed("connect subscriber", self.client.get_async_pubsub()).await {
                Ok(pubsub) => pubsub.split(),
                Err(e) => return lost(e, false),
            };
        let probe = self.probe_channel();
        if let Err(e) = timed("subscribe probe", sink.subscribe(&probe)).await {
            return lost(e, false);
        }
        let rooms: Vec<String> = registry
            .room_ids()
            .iter()
            .map(|r| self.channel(r))
            .collect();
        for chunk in rooms.chunks(256) {
            if let Err(e) = timed("re-subscribe", sink.subscribe(chunk)).await {
                return lost(e, false);
            }
        }
        self.state.heard_probe();
        let listener = tokio::spawn(listen(
            stream,
            Listener {
                probe,
                prefix: Arc::clone(&self.prefix),
                node: Arc::clone(&self.node),
                registry: registry.clone(),
                metrics: Arc::clone(metrics),
                state: Arc::clone(&self.state),
            },
        ));
        self.state.healthy.store(true, Ordering::Release);
        tracing::info!(rooms = rooms.len(), "redis backplane connected");
        let ended = self.serve(&mut conn, &mut sink, listener).await;
        ended
    }

    /// Applies `first` and every operation already queued behind it, in order. Consecutive
    /// publishes go out as one pipeline; an (un)subscribe first flushes the publishes before it.
    async fn apply(
        &mut self,
        first: Op,
        conn: &mut MultiplexedConnection,
        sink: &mut PubSubSink,
        batch: &mut Vec<(String, Vec<u8>)>,
    ) -> Result<(), LinkError> {
        let mut pending = Some(first);
        while let Some(op) = pending.take() {
            match op {
                Op::Publish { channel, payload } => {
                    batch.push((channel, payload));
                    if batch.len() < MAX_PIPELINE {
                        if let Ok(more) = self.ops.try_recv() {
                            pending = Some(more);
                            continue;
                        }
                    }
                    self.flush(conn, batch).await?;
                    pending = self.ops.try_recv().ok();
                }
                Op::Subscribe(room) => {
                    self.flush(conn, batch).await?;
                    timed("subscribe", sink.subscribe(self.channel(&room))).await?;
                }
                Op::Unsubscribe(room) => {
                    self.flush(conn, batch).await?;
                    timed("unsubscribe", sink.unsubscribe(self.channel(&room))).await?;
                }
            }
        }
        self.flush(conn, batch).await
    }

    async fn flush(
        &self,
        conn: &mut MultiplexedConnection,
        batch: &mut Vec<(String, Vec<u8>)>,
    ) -> Result<(), LinkError> {
        if batch.is_empty() {
            return Ok(());
        }
        let sent = batch.len();
        let mut pipe = redis::pipe();
        for (channel, payload) in batch.drain(..) {
            pipe.publish(channel, payload).ignore();
        }
        let result = timed("publish", pipe.query_async::<()>(conn)).await;
        self.state.queued.fetch_sub(sent, Ordering::Relaxed);
        result
    }

    async fn serve(
        &mut self,
        conn: &mut MultiplexedConnection,
        sink: &mut PubSubSink,
        mut listener: JoinHandle<()>,
    ) -> Ended {
        let probe = self.probe_channel();
        let mut tick = tokio::time::interval(PROBE_EVERY);
        let mut batch: Vec<(String, Vec<u8>)> = Vec::new();
        let ended = loop {
            tokio::select! {
                op = self.ops.recv() => {
                    let Some(op) = op else { break Ended::Stop };
                    if let Err(e) = self.apply(op, conn, sink, &mut batch).await {
                        break lost(e, true);
                    }
                }
                _ = tick.tick() => {
                    if self.state.since_probe() > PROBE_DEADLINE {
                        break lost(LinkError::Deaf, true);
                    }
                    let mut publish = redis::cmd("PUBLISH");
                    publish.arg(&probe).arg("probe");
                    if let Err(e) = timed("probe", publish.query_async::<()>(conn)).await {
                        break lost(e, true);
                    }
                }
                _ = &mut listener => break lost(LinkError::SubscriberClosed, true),
            }
        };
        listener.abort();
        ended
    }
}

struct Listener {
    probe: String,
    prefix: Arc<str>,
    node: Arc<str>,
    registry: Registry,
    metrics: Arc<Metrics>,
    state: Arc<State>,
}

/// Delivers every message of the subscriber connection to the local room; returns when the
/// connection ends.
async fn listen(mut stream: PubSubStream, ctx: Listener) {
    while let Some(msg) = stream.next().await {
        let channel = msg.get_channel_name();
        if channel == ctx.probe {
            ctx.state.heard_probe();
            continue;
        }
        let Some(room) = channel
            .strip_prefix(&*ctx.prefix)
            .and_then(|name| ctx.registry.get(name))
        else {
            continue;
        };
        let mut payload = msg.get_payload_bytes().to_vec();
        let Some(relay) = protocol::decode_relay(&mut payload) else {
            tracing::debug!(channel, "ignoring a payload without a string `message`");
            continue;
        };
        let skip = match (relay.origin, relay.conn) {
            (Some(origin), Some(conn)) if origin == &*ctx.node => Some(ConnId(conn)),
            _ => None,
        };
        room.broadcast(&frame::text(relay.message), skip, &ctx.metrics);
    }
}
