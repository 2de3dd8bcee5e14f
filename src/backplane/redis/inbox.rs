//! Messages from the subscriber connection to the local rooms, in two stages.
//!
//! `listen` (one task per subscriber connection) only reads: it notes the probe, and moves each
//! message into a bounded queue, or drops it when the queue is full. `deliver` (one task for
//! the worker's whole life, so a reconnect cannot reorder what was queued before it) decodes
//! and fans out. Reading is far cheaper than fan-out, so the first stage keeps up with Redis
//! and Redis's output buffer for this node stays near empty: a node that cannot keep up loses
//! messages here, counted, instead of being cut off by Redis's `client-output-buffer-limit
//! pubsub` (32 MB by default) and losing everything queued there, uncounted. With history, what
//! was lost here is read back from the room's Redis stream before the next message of the room
//! is delivered (`Repair`).

use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use redis::aio::PubSubStream;
use tokio::sync::mpsc;

use super::{Op, State};
use crate::backplane::quota::Quota;
use crate::config::RedisLimits;
use crate::frame;
use crate::history::{Continuity, History, Stamp};
use crate::metrics::Metrics;
use crate::outbox::{ConnId, DeferredWrites};
use crate::protocol;
use crate::room::{Fanout, Registry, Room};
use crate::users::Users;

/// The bounded queue between the two stages.
pub(super) struct Inbox {
    quota: Quota,
    metrics: Arc<Metrics>,
    /// Revoked users' connections are closed from the control channel.
    users: Arc<Users>,
}

impl Inbox {
    pub(super) fn new(limits: &RedisLimits, metrics: Arc<Metrics>, users: Arc<Users>) -> Self {
        Self {
            quota: Quota::new(limits.inbox_messages, limits.inbox_bytes),
            metrics,
            users,
        }
    }

    /// A fleet-wide command: `{"type":"disconnect","user":SUB}` closes that user here. Handled
    /// in the reading stage, ahead of any fan-out backlog, and never dropped.
    fn command(&self, payload: &[u8]) {
        #[derive(serde::Deserialize)]
        struct Command {
            #[serde(rename = "type")]
            kind: String,
            user: String,
        }
        match serde_json::from_slice::<Command>(payload) {
            Ok(cmd) if cmd.kind == "disconnect" => {
                let closed = self.users.revoke(&cmd.user);
                tracing::debug!(closed, "revoked a user's connections");
            }
            _ => tracing::debug!("ignoring an unknown control message"),
        }
    }

    pub(super) fn used(&self) -> (u64, u64) {
        self.quota.used()
    }

    /// The one place a message from Redis is given up on this node. With history, the room's
    /// next message shows the gap and `Repair` fills it from the room's stream (or, when the
    /// stream no longer holds it, the room's envelope members are told `gap`).
    fn drop_message(&self, channel: &str) {
        self.metrics.add_backplane_dropped();
        tracing::debug!(channel, "fan-out is behind: dropped a message from Redis");
    }
}

/// What the fan-out stage needs to deliver a message.
pub(super) struct Delivery {
    pub(super) prefix: Arc<str>,
    pub(super) node: Arc<str>,
    pub(super) registry: Registry,
    pub(super) metrics: Arc<Metrics>,
    /// With history: the node's logs, fed in Redis's order with Redis's offsets.
    pub(super) history: Option<Arc<History>>,
    /// To ask the worker for the messages a gap skipped (weak: the worker stops when the node
    /// drops its bus, whatever this task holds).
    pub(super) repairs: mpsc::WeakUnboundedSender<Op>,
}

/// Stage one: reads one subscriber connection until it ends.
pub(super) async fn listen(
    mut stream: PubSubStream,
    [probe, control]: [String; 2],
    state: Arc<State>,
    inbox: Arc<Inbox>,
    queue: mpsc::Sender<redis::Msg>,
) {
    while let Some(msg) = stream.next().await {
        let channel = msg.get_channel_name();
        if channel == probe {
            state.heard_probe();
            continue;
        }
        if channel == control {
            inbox.command(msg.get_payload_bytes());
            continue;
        }
        let bytes = msg.get_payload_bytes().len() as u64;
        if !inbox.quota.try_take(bytes) {
            inbox.drop_message(channel);
            continue;
        }
        if let Err(mpsc::error::TrySendError::Full(msg) | mpsc::error::TrySendError::Closed(msg)) =
            queue.try_send(msg)
        {
            inbox.quota.give_back(bytes);
            inbox.drop_message(msg.get_channel_name());
        }
    }
}

/// Messages fanned out in one batch of direct writes (see `outbox::DeferredWrites`) when
/// several are waiting: each socket they reach is written once for all of them. 64 messages
/// to a room of 1,000 is 64,000 queue pushes, about 2 ms, before the writes.
const BATCH_MESSAGES: usize = 64;

/// What serving one message from Redis left to do.
enum Served {
    /// Nothing: delivered (or nothing to deliver).
    Done,
    /// A large room: the rest of its broadcast.
    Sliced(Fanout),
    /// Its offset skipped past the room's last one here: repair first.
    Behind(Repair),
}

/// Stage two: fans every queued message out to its local room, for as long as any listener
/// can still queue. What is waiting is taken in batches, so a burst from Redis coalesces into
/// one write per socket instead of one write per delivery.
pub(super) async fn deliver(
    mut queue: mpsc::Receiver<redis::Msg>,
    inbox: Arc<Inbox>,
    ctx: Delivery,
) {
    while let Some(first) = queue.recv().await {
        let batch = DeferredWrites::begin();
        let mut next = Some(first);
        let mut rest = Served::Done;
        for taken in 1.. {
            let Some(msg) = next.take() else { break };
            match serve(&msg, &inbox, &ctx) {
                Served::Done => {}
                Served::Sliced(mut fanout) => {
                    if !fanout.step(&ctx.metrics) {
                        // Served a slice at a time below, yielding between slices.
                        rest = Served::Sliced(fanout);
                        break;
                    }
                }
                behind @ Served::Behind(_) => {
                    rest = behind;
                    break;
                }
            }
            if taken < BATCH_MESSAGES {
                next = queue.try_recv().ok();
            }
        }
        batch.finish();
        // The next message waits until this one is served, so the order holds.
        match rest {
            Served::Done => {}
            Served::Sliced(fanout) => {
                ctx.metrics.add_fanout_yield();
                crate::outbox::write_claims();
                tokio::task::yield_now().await;
                fanout.finish(&ctx.metrics).await;
            }
            Served::Behind(repair) => repair.run(&ctx).await,
        }
    }
}

/// A message from Redis, decoded for its local room.
struct Arrived {
    room: Arc<Room>,
    frame: Bytes,
    skip: Option<ConnId>,
}

/// Serves a message from Redis to its local room, if it has members here and its payload
/// holds a message.
fn serve(msg: &redis::Msg, inbox: &Inbox, ctx: &Delivery) -> Served {
    let mut payload = msg.get_payload_bytes().to_vec();
    inbox.quota.give_back(payload.len() as u64);
    let channel = msg.get_channel_name();
    let Some(room) = channel
        .strip_prefix(&*ctx.prefix)
        .and_then(|name| ctx.registry.get(name))
    else {
        return Served::Done;
    };
    let Some(relay) = protocol::decode_relay(&mut payload) else {
        tracing::debug!(channel, "ignoring a payload without a string `message`");
        return Served::Done;
    };
    let skip = match (relay.origin, relay.conn) {
        (Some(origin), Some(conn)) if origin == &*ctx.node => Some(ConnId(conn)),
        _ => None,
    };
    let arrived = Arrived {
        room,
        frame: frame::text(relay.message),
        skip,
    };
    let (Some(history), Some(offset), Some(epoch)) = (&ctx.history, relay.offset, relay.epoch)
    else {
        // No history here, or a message from a node without it: delivered without an offset.
        return Served::Sliced(arrived.room.fanout(arrived.frame, arrived.skip));
    };
    let stamp = Stamp {
        offset,
        epoch: Arc::from(epoch),
    };
    let opening = (arrived.room.id().as_str(), arrived.room.opening());
    match history.missing(opening, &stamp) {
        Some(missing) => Served::Behind(Repair {
            arrived,
            stamp,
            missing,
        }),
        None => {
            append(history, &arrived, &stamp, &ctx.metrics);
            Served::Done
        }
    }
}

/// Keeps a message from Redis in its room's log and serves it whole under the log, like an
/// in-process publish with history: a member resuming on this node joins between two
/// messages, never inside one. What does not follow the log is announced, never skipped.
fn append(history: &History, arrived: &Arrived, stamp: &Stamp, metrics: &Metrics) {
    let room = &arrived.room;
    history.append(
        (room.id().as_str(), room.opening()),
        &arrived.frame,
        stamp,
        |continuity| {
            if continuity == Continuity::Stale {
                return;
            }
            if continuity == Continuity::Gap {
                // Offsets were skipped and could not be filled in: envelope members are told,
                // not left to find a hole.
                let gap = protocol::room_reply("gap", room.id().as_str(), None, None);
                room.tell_envelopes(&gap, metrics);
            }
            let mut fanout = room.fanout(arrived.frame.clone(), arrived.skip);
            fanout.stamp(stamp.clone());
            fanout.finish_now(metrics);
        },
    );
}

/// A message that arrived after a gap in its room's offsets (messages from Redis dropped on
/// the way here, or lost while the subscriber reconnected), waiting for the missing ones.
struct Repair {
    arrived: Arrived,
    stamp: Stamp,
    /// The offsets the log lacks, first and last.
    missing: (u64, u64),
}

impl Repair {
    /// Reads the missing messages from the room's stream and serves them, then the message
    /// that revealed the gap. What the stream no longer holds (or a read that fails) shows as
    /// a gap when the next message is appended, and is announced there. Later messages wait
    /// in the inbox meanwhile (bounded like any backlog), so the order holds.
    async fn run(self, ctx: &Delivery) {
        let Some(history) = &ctx.history else { return };
        let (first, last) = self.missing;
        let size = history.config().size as u64;
        // A gap longer than the history could not be kept whole anyway: the newest part.
        let first = first.max(last.saturating_sub(size) + 1);
        let (reply, answer) = tokio::sync::oneshot::channel();
        let fetch = super::Fetch {
            room: self.arrived.room.id().clone(),
            first: Some(first),
            last: Some(last),
            reply,
            _slot: None,
        };
        let sent = ctx
            .repairs
            .upgrade()
            .is_some_and(|ops| ops.send(Op::Fetch(fetch)).is_ok());
        let fetched = if sent { answer.await.ok() } else { None };
        let batch = DeferredWrites::begin();
        for relayed in fetched.unwrap_or_default() {
            let filled = Arrived {
                room: Arc::clone(&self.arrived.room),
                frame: relayed.frame,
                skip: relayed.skip,
            };
            append(history, &filled, &relayed.stamp, &ctx.metrics);
            ctx.metrics.add_history_repaired();
        }
        append(history, &self.arrived, &self.stamp, &ctx.metrics);
        batch.finish();
    }
}
