//! The task that owns the Redis connections: connects, subscribes, sends what sessions queue,
//! probes, and reconnects.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{MultiplexedConnection, PubSubSink};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::inbox::{self, Delivery, Inbox};
use super::presence;
use super::{Op, Pending, State};
use crate::frame;
use crate::history::{History, HistoryConfig, Stamp};
use crate::metrics::Metrics;
use crate::outbox::ConnId;
use crate::protocol::{self, ClientError};
use crate::room::{Registry, RoomId};

/// Most publishes sent in one pipeline: one turn of the worker's loop.
const MAX_PIPELINE: usize = 512;
const PROBE_EVERY: Duration = Duration::from_millis(500);
/// A subscriber that has not heard its own probe for this long is deaf and gets replaced.
const PROBE_DEADLINE: Duration = Duration::from_secs(2);
const OP_TIMEOUT: Duration = Duration::from_secs(2);
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_millis(500);
/// While Redis stays unreachable, a warning this often (the retries in between log at debug).
const STILL_DOWN_EVERY: Duration = Duration::from_secs(30);
/// Messages from Redis the inbox channel holds at most; the byte bound is the config's.
const INBOX_CHANNEL_MAX: usize = 1 << 20;

/// Numbers a room's message, keeps it in the room's stream and publishes it, in one step: a
/// script runs alone in Redis, so two nodes publishing into one room never get the same
/// offset or see their messages in two orders. KEYS: the room's offset hash, its stream.
/// ARGV: channel, the relay without its closing brace, the stream's length, the keys' time to
/// live in ms (0: none), an epoch for a room that has none yet (hex: safe inside JSON). The
/// keys expire that long after the room's last message, offsets and epoch with them, so a
/// room quiet for longer starts a new epoch (and resumes from the old one are not recovered).
/// A stream entry's id is its offset (`<offset>-0`), so a range of offsets is one `XRANGE`.
/// A new epoch starts its stream afresh; a stream an id cannot follow (its hash expired or
/// was evicted alone, or ids were chosen another way) is started afresh too: the old entries
/// belong to a history no member can resume from any more.
const SEQUENCE: &str = r#"
if redis.call('HSETNX', KEYS[1], 'epoch', ARGV[5]) == 1 then
  redis.call('DEL', KEYS[2])
end
local epoch = redis.call('HGET', KEYS[1], 'epoch')
local offset = redis.call('HINCRBY', KEYS[1], 'offset', 1)
local payload = ARGV[2] .. ',"offset":' .. offset .. ',"epoch":"' .. epoch .. '"}'
local id = offset .. '-0'
local added = redis.pcall('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], id, 'p', payload)
if type(added) == 'table' and added.err then
  redis.call('DEL', KEYS[2])
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], id, 'p', payload)
end
if tonumber(ARGV[4]) > 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
redis.call('PUBLISH', ARGV[1], payload)
return offset
"#;

/// An XRANGE reply: each entry's id with its fields (`p`: the published payload).
type StreamEntries = Vec<(String, std::collections::HashMap<String, Vec<u8>>)>;

/// The messages in a stream read, decoded like the payloads the subscriber receives; a chat
/// message sent through `node` keeps the member it skips.
fn fetched(entries: StreamEntries, node: &str) -> super::Fetched {
    entries
        .into_iter()
        .filter_map(|(_, mut fields)| {
            let mut payload = fields.remove("p")?;
            let relay = protocol::decode_relay(&mut payload)?;
            let stamp = Stamp {
                offset: relay.offset?,
                epoch: Arc::from(relay.epoch?),
            };
            let skip = match (relay.origin, relay.conn) {
                (Some(origin), Some(conn)) if origin == node => Some(ConnId(conn)),
                _ => None,
            };
            let frame = frame::text(relay.message);
            Some(super::Relayed { stamp, frame, skip })
        })
        .collect()
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

/// The task that owns the Redis connections.
pub(crate) struct Worker {
    pub(super) client: redis::Client,
    pub(super) ops: mpsc::UnboundedReceiver<Op>,
    /// For the delivery task's gap repairs; weak, so it cannot keep the worker alive.
    pub(super) repairs: mpsc::WeakUnboundedSender<Op>,
    pub(super) state: Arc<State>,
    pub(super) inbox: Arc<Inbox>,
    pub(super) node: Arc<str>,
    pub(super) prefix: Arc<str>,
    pub(super) metrics: Arc<Metrics>,
    /// With history: its bounds, and the node's logs that the inbox feeds.
    pub(super) history: Option<(HistoryConfig, Arc<History>)>,
    /// The SHA of [`SEQUENCE`], loaded on every connection (a restarted Redis has forgotten it).
    pub(super) script: Option<String>,
    /// The SHAs of the presence scripts (write, read), loaded on every connection.
    pub(super) presence_scripts: Option<(String, String)>,
    /// What this node last wrote of its rooms' member counts.
    pub(super) presence: presence::Book,
    /// When the member counts were last written.
    pub(super) presence_at: Option<Instant>,
}

impl Worker {
    /// The node's own probe channel, in the reserved namespace no room can name.
    fn probe_channel(&self) -> String {
        format!(
            "{}{}:probe:{}",
            self.prefix,
            protocol::RESERVED_PREFIX,
            self.node
        )
    }

    fn channel(&self, room: &RoomId) -> String {
        format!("{}{room}", self.prefix)
    }

    /// A room's key in the reserved namespace behind the prefix: `offsets:` or `history:`.
    fn key(&self, kind: &str, room: &str) -> String {
        format!("{}{}:{kind}:{room}", self.prefix, protocol::RESERVED_PREFIX)
    }

    /// Runs until every sender is gone: connect, serve, and on failure tell the senders of
    /// what was queued, back off and connect again.
    pub(crate) async fn run(mut self, registry: Registry) {
        let (queue, received) = mpsc::channel(INBOX_CHANNEL_MAX);
        let delivery = Delivery {
            prefix: Arc::clone(&self.prefix),
            node: Arc::clone(&self.node),
            registry: registry.clone(),
            metrics: Arc::clone(&self.metrics),
            history: self.history.as_ref().map(|(_, h)| Arc::clone(h)),
            repairs: self.repairs.clone(),
        };
        tokio::spawn(inbox::deliver(received, Arc::clone(&self.inbox), delivery));
        let mut backoff = MIN_BACKOFF;
        let mut warned: Option<Instant> = None;
        loop {
            match self.connected(&registry, &queue).await {
                Ended::Stop => return,
                Ended::Lost { why, connected } => {
                    if connected {
                        backoff = MIN_BACKOFF;
                        warned = Some(Instant::now());
                        tracing::warn!("redis backplane lost: {why}; reconnecting");
                    } else if warned.is_none_or(|at| at.elapsed() >= STILL_DOWN_EVERY) {
                        // A wrong URL or password must show at the default log level, but a
                        // long outage should not log twice a second.
                        warned = Some(Instant::now());
                        tracing::warn!("redis backplane down: {why}; retrying");
                    } else {
                        tracing::debug!("redis backplane still down: {why}");
                    }
                }
            }
            self.state.healthy.store(false, Ordering::Release);
            if self.fail_queued_until(Instant::now() + backoff).await {
                return;
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// While the link is down: every publish that was queued, or arrives, is failed back to
    /// its sender. (Un)subscribes are dropped: the registry is the truth about which rooms to
    /// subscribe, and the next connection subscribes them all. True when the node is gone.
    async fn fail_queued_until(&mut self, until: Instant) -> bool {
        loop {
            tokio::select! {
                op = self.ops.recv() => match op {
                    None => return true,
                    Some(Op::Publish(pending)) => self.fail(pending),
                    Some(_) => {}
                },
                _ = tokio::time::sleep_until(until) => return false,
            }
        }
    }

    /// Tells the sender of `pending` that it never reached Redis, and frees its place.
    fn fail(&self, pending: Pending) {
        self.state.queue.give_back(pending.bytes());
        self.metrics.add_backplane_failed();
        if let Some(from) = &pending.from {
            let room = protocol::capped(&pending.room).to_owned();
            let error = ClientError::BackplaneUnavailable(room);
            from.push(&error.to_frame(), &self.metrics);
        }
    }

    /// One connected period: connect, subscribe everything, serve until something fails.
    async fn connected(&mut self, registry: &Registry, queue: &mpsc::Sender<redis::Msg>) -> Ended {
        let client = &self.client;
        let mut conn = match timed("connect", client.get_multiplexed_async_connection()).await {
            Ok(conn) => conn,
            Err(e) => return lost(e, false),
        };
        let (mut sink, stream) = match timed("connect subscriber", client.get_async_pubsub()).await
        {
            Ok(pubsub) => pubsub.split(),
            Err(e) => return lost(e, false),
        };
        if self.history.is_some() {
            let load = redis::cmd("SCRIPT").arg("LOAD").arg(SEQUENCE).to_owned();
            match timed("load script", load.query_async::<String>(&mut conn)).await {
                Ok(sha) => self.script = Some(sha),
                Err(e) => return lost(e, false),
            }
        }
        match self.load_presence(&mut conn).await {
            Ok(shas) => self.presence_scripts = Some(shas),
            Err(e) => return lost(e, false),
        }
        self.presence.forget();
        let probe = self.probe_channel();
        let control = super::control_channel(&self.prefix);
        if let Err(e) = timed("subscribe probe", sink.subscribe(&[&probe, &control])).await {
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
        let listener = tokio::spawn(inbox::listen(
            stream,
            [probe, control],
            Arc::clone(&self.state),
            Arc::clone(&self.inbox),
            queue.clone(),
        ));
        self.state.healthy.store(true, Ordering::Release);
        self.metrics.add_backplane_connect();
        tracing::info!(rooms = rooms.len(), "redis backplane connected");
        self.serve(registry, &mut conn, &mut sink, listener).await
    }

    /// Loads the presence scripts (write, read).
    async fn load_presence(
        &self,
        conn: &mut MultiplexedConnection,
    ) -> Result<(String, String), LinkError> {
        let load = |script: &str| redis::cmd("SCRIPT").arg("LOAD").arg(script).to_owned();
        let set = timed(
            "load script",
            load(presence::SET).query_async::<String>(conn),
        )
        .await?;
        let get = timed(
            "load script",
            load(presence::GET).query_async::<String>(conn),
        )
        .await?;
        Ok((set, get))
    }

    /// Writes the member counts that changed (every one, every 10 s) in one pipeline; at most
    /// once per [`presence::PUSH_EVERY`].
    async fn write_presence(
        &mut self,
        registry: &Registry,
        conn: &mut MultiplexedConnection,
    ) -> Result<(), LinkError> {
        let now = Instant::now();
        if self
            .presence_at
            .is_some_and(|at| now.saturating_duration_since(at) < presence::PUSH_EVERY)
        {
            return Ok(());
        }
        self.presence_at = Some(now);
        let Some((set, _)) = &self.presence_scripts else {
            return Ok(());
        };
        let due = self.presence.due(registry.room_counts(), now);
        if due.is_empty() {
            return Ok(());
        }
        let ttl_ms = presence::TTL.as_millis() as u64;
        let mut pipe = redis::pipe();
        for (room, count) in &due {
            pipe.cmd("EVALSHA")
                .arg(set)
                .arg(1)
                .arg(self.key("presence", room.as_str()))
                .arg(&*self.node)
                .arg(*count)
                .arg(ttl_ms)
                .ignore();
        }
        timed("write presence", pipe.query_async::<()>(conn)).await
    }

    /// Serves one connection: one operation (or one pipeline of publishes) per turn, and the
    /// probe first whenever it is due, so a publish flood cannot starve it.
    async fn serve(
        &mut self,
        registry: &Registry,
        conn: &mut MultiplexedConnection,
        sink: &mut PubSubSink,
        mut listener: JoinHandle<()>,
    ) -> Ended {
        let mut tick = tokio::time::interval(PROBE_EVERY);
        let mut batch: Vec<Pending> = Vec::new();
        let ended = loop {
            tokio::select! {
                biased;
                _ = tick.tick() => {
                    if let Err(e) = self.probe(conn).await {
                        break lost(e, true);
                    }
                    if let Err(e) = self.write_presence(registry, conn).await {
                        break lost(e, true);
                    }
                }
                _ = &mut listener => break lost(LinkError::SubscriberClosed, true),
                op = self.ops.recv() => {
                    let Some(op) = op else { break Ended::Stop };
                    if let Err(e) = self.apply(op, conn, sink, &mut batch).await {
                        break lost(e, true);
                    }
                }
            }
        };
        listener.abort();
        ended
    }

    /// Declares the subscriber deaf when its probe is overdue, else publishes the next one.
    async fn probe(&self, conn: &mut MultiplexedConnection) -> Result<(), LinkError> {
        if self.state.since_probe() > PROBE_DEADLINE {
            return Err(LinkError::Deaf);
        }
        let mut publish = redis::cmd("PUBLISH");
        publish.arg(self.probe_channel()).arg("probe");
        timed("probe", publish.query_async::<()>(conn)).await
    }

    /// Applies `first`; a publish takes the publishes queued right behind it (up to a pipeline)
    /// and an (un)subscribe found among them is applied after the ones before it.
    async fn apply(
        &mut self,
        first: Op,
        conn: &mut MultiplexedConnection,
        sink: &mut PubSubSink,
        batch: &mut Vec<Pending>,
    ) -> Result<(), LinkError> {
        let mut next = Some(first);
        while let Some(op) = next.take() {
            match op {
                Op::Publish(pending) => {
                    batch.push(pending);
                    if batch.len() < MAX_PIPELINE {
                        next = self.ops.try_recv().ok();
                    }
                }
                Op::Subscribe(room) => {
                    self.flush(conn, batch).await?;
                    timed("subscribe", sink.subscribe(self.channel(&room))).await?;
                }
                Op::Unsubscribe(room) => {
                    self.flush(conn, batch).await?;
                    timed("unsubscribe", sink.unsubscribe(self.channel(&room))).await?;
                }
                Op::Presence(ask) => {
                    self.flush(conn, batch).await?;
                    self.read_presence(conn, ask).await?;
                }
                Op::Fetch(fetch) => {
                    // After the subscribes before it (awaited above): the stream read now
                    // overlaps what this node receives from here on.
                    self.flush(conn, batch).await?;
                    self.read_stream(conn, fetch).await?;
                }
            }
        }
        self.flush(conn, batch).await
    }

    /// Answers a presence question: the room's members on the other nodes.
    async fn read_presence(
        &self,
        conn: &mut MultiplexedConnection,
        ask: super::Presence,
    ) -> Result<(), LinkError> {
        let Some((_, get)) = &self.presence_scripts else {
            return Ok(());
        };
        let read = redis::cmd("EVALSHA")
            .arg(get)
            .arg(1)
            .arg(self.key("presence", ask.room.as_str()))
            .arg(&*self.node)
            .to_owned();
        let others = timed("read presence", read.query_async::<u64>(conn)).await?;
        let _ = ask.reply.send(others);
        Ok(())
    }

    /// Reads the part of a room's stream `fetch` asks for (or its newest entry) and answers
    /// it. At most twice the
    /// history size: `MAXLEN ~` lets a stream run past its size by up to one radix-tree node
    /// (100 entries by default), and a longer read could not be kept anyway.
    async fn read_stream(
        &self,
        conn: &mut MultiplexedConnection,
        fetch: super::Fetch,
    ) -> Result<(), LinkError> {
        let size = self.history.as_ref().map_or(0, |(config, _)| config.size);
        let key = self.key("history", fetch.room.as_str());
        let range = match fetch.first {
            Some(first) => {
                let last = fetch
                    .last
                    .map_or_else(|| "+".to_owned(), |last| format!("{last}-0"));
                redis::cmd("XRANGE")
                    .arg(key)
                    .arg(format!("{}-0", first.max(1)))
                    .arg(last)
                    .arg("COUNT")
                    .arg(2 * size.max(1))
                    .to_owned()
            }
            None => redis::cmd("XREVRANGE")
                .arg(key)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .to_owned(),
        };
        let entries = timed("read history", range.query_async::<StreamEntries>(conn)).await?;
        self.metrics.add_stream_read();
        let _ = fetch.reply.send(fetched(entries, &self.node));
        Ok(())
    }

    /// Sends `batch` as one pipeline. Whatever happens, the batch leaves the queue: sent, or
    /// failed back to each sender.
    async fn flush(
        &self,
        conn: &mut MultiplexedConnection,
        batch: &mut Vec<Pending>,
    ) -> Result<(), LinkError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for pending in batch.iter() {
            match (&self.script, &self.history, pending.sequenced) {
                (Some(sha), Some((config, _)), true) => {
                    let ttl_ms = config.ttl.as_millis() as u64;
                    pipe.cmd("EVALSHA")
                        .arg(sha)
                        .arg(2)
                        .arg(self.key("offsets", &pending.room))
                        .arg(self.key("history", &pending.room))
                        .arg(&pending.channel)
                        .arg(&pending.payload)
                        .arg(config.size)
                        .arg(ttl_ms)
                        // Fresh for every publish (it is used only when the room has no
                        // epoch): a new sequence of offsets must never reuse an old epoch.
                        .arg(super::node_id())
                        .ignore();
                }
                _ => {
                    pipe.publish(&pending.channel, &pending.payload).ignore();
                }
            }
        }
        let result = timed("publish", pipe.query_async::<()>(conn)).await;
        for pending in batch.drain(..) {
            if result.is_err() {
                // Perhaps sent (a timeout may hide a delivery): the sender is told it was not,
                // so a retry can duplicate but nothing is lost unannounced.
                self.fail(pending);
            } else {
                self.state.queue.give_back(pending.bytes());
            }
        }
        result
    }
}
