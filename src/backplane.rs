//! The bus a published message travels on before fan-out. In-process by default: the message is
//! framed once and broadcast to the local room. With `--redis`, every message goes through the
//! room's Redis channel, to this node too, so all members on every node see one order.
//! Sessions only call [`Backplane::publish`]; they never know which bus runs. With history on,
//! in-process publishes are numbered and fanned out under the room's log
//! ([`History::publish`]); with Redis, numbered by a script there and kept on arrival (the
//! `redis` inbox, [`History::append`]).

mod quota;
mod redis;

use std::sync::Arc;

use crate::config::Config;
use crate::frame;
use crate::history::{History, Offsets, Stamp};
use crate::metrics::Metrics;
use crate::outbox::{ConnId, Outbox};
use crate::room::{Bounds, Fanout, Registry, Room, RoomWatcher};
use crate::users::Users;

pub use self::redis::{Fetched, Queues, RedisError};

/// Members of a room on the other nodes, for a presence answer.
pub enum Others {
    /// There are no other nodes (in-process bus).
    None,
    /// Redis will answer with their count.
    Asked(tokio::sync::oneshot::Receiver<u64>),
    /// They cannot be asked now (Redis down, or too many questions waiting).
    Unknown,
}

/// Why a message could not be handed to the bus.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackplaneError {
    /// The link to Redis is down.
    #[error("backplane unavailable")]
    Unavailable,
    /// The queue to Redis is at its bound: Redis is not keeping up.
    #[error("backplane queue full")]
    Full,
}

/// A message to publish: where it goes and whom it skips.
#[derive(Clone, Copy)]
pub struct Publish<'a> {
    /// The room handle when the sender holds the room: spares a registry lookup.
    pub held: Option<&'a Arc<Room>>,
    pub room: &'a str,
    pub message: &'a str,
    /// The sending connection, skipped at delivery (dialect 1's `chat`).
    pub skip: Option<ConnId>,
    /// The sender's outbox, told `backplane_unavailable` if an accepted publish never gets
    /// out; `None` for the server API, whose caller has its answer already.
    pub from: Option<&'a Arc<Outbox>>,
}

/// What a publish did on this node.
#[derive(Default)]
pub struct Published {
    /// The message's place in the room's history, when history is on.
    pub stamp: Option<Stamp>,
    /// Deliveries on this node: exact in-process when `rest` is `None`, else the room's local
    /// members (what the sender's fan-out budget is charged).
    pub deliveries: usize,
    /// In-process, the part of the broadcast to a large room still to serve: the caller
    /// finishes it, yielding between slices, before it publishes again.
    pub rest: Option<Box<Fanout>>,
}

fn bounds(config: &Config) -> Bounds {
    Bounds {
        max_rooms: config.max_rooms,
        fanout_slice: match config.fanout_slice {
            0 => usize::MAX,
            n => n,
        },
    }
}

/// Cheap-to-clone handle to the node's bus.
#[derive(Clone)]
pub struct Backplane {
    registry: Registry,
    metrics: Arc<Metrics>,
    users: Arc<Users>,
    redis: Option<redis::Bus>,
    /// Room history (in-process only, `--history-size`): it also orders each room's
    /// publishes.
    history: Option<Arc<History>>,
}

impl Backplane {
    /// Builds the node's registry and the bus that feeds it, as `config` asks.
    pub fn start(
        config: &Config,
        metrics: Arc<Metrics>,
        users: Arc<Users>,
    ) -> Result<(Registry, Self), RedisError> {
        let Some(url) = &config.redis else {
            let registry = Registry::bounded(None, bounds(config));
            let history = History::new(config.history, Offsets::Local).map(Arc::new);
            if let Some(history) = &history {
                tokio::spawn(expire_every_second(Arc::downgrade(history)));
            }
            let bus = Self {
                registry: registry.clone(),
                metrics,
                users,
                redis: None,
                history,
            };
            return Ok((registry, bus));
        };
        // Across nodes, offsets are decided in Redis; this node keeps what arrives.
        let history = History::new(config.history, Offsets::Decided).map(Arc::new);
        if let Some(history) = &history {
            tokio::spawn(expire_every_second(Arc::downgrade(history)));
        }
        let (bus, watcher, worker) = redis::Bus::new(
            url,
            &config.redis_prefix,
            &config.redis_limits,
            Arc::clone(&metrics),
            Arc::clone(&users),
            history.as_ref().map(|h| (config.history, Arc::clone(h))),
        )?;
        let watcher = Arc::new(watcher) as Arc<dyn RoomWatcher>;
        let registry = Registry::bounded(Some(watcher), bounds(config));
        tokio::spawn(worker.run(registry.clone()));
        Ok((
            registry.clone(),
            Self {
                registry,
                metrics,
                users,
                redis: Some(bus),
                history,
            },
        ))
    }

    /// Asks Redis for room `room`'s stream from offset `first` on (`None`: its newest entry
    /// only) (history across nodes);
    /// `None` without Redis or history, while the link is down, or past
    /// `--redis-history-reads`.
    pub fn fetch(
        &self,
        room: &str,
        first: Option<u64>,
    ) -> Option<tokio::sync::oneshot::Receiver<Fetched>> {
        self.redis.as_ref()?.fetch(room, first)
    }

    /// How many members `room` has on the other nodes (see [`Others`]).
    pub fn presence(&self, room: &str) -> Others {
        match &self.redis {
            None => Others::None,
            Some(bus) => bus.presence(room).map_or(Others::Unknown, Others::Asked),
        }
    }

    /// The node's room history, when it keeps one.
    pub fn history(&self) -> Option<&Arc<History>> {
        self.history.as_ref()
    }

    /// True while messages can flow; `/healthz` reports "degraded" otherwise.
    pub fn is_healthy(&self) -> bool {
        self.redis.as_ref().is_none_or(redis::Bus::is_healthy)
    }

    /// What the Redis queues hold now (all zero in-process).
    pub fn queues(&self) -> Queues {
        self.redis
            .as_ref()
            .map(redis::Bus::queues)
            .unwrap_or_default()
    }

    /// Hands `msg` to the bus. In-process, it is framed once and queued for every local member
    /// before this returns. With Redis, it is queued for the worker in the order sessions call
    /// this, and delivered (to this node too) when the room's channel echoes it; `Ok` means
    /// queued, not delivered. `Err(Unavailable)` while the link is down or the queue is full:
    /// the sender is told, nothing is sent.
    /// Closes every connection of `user` (4003), on this node at once and, with Redis, on
    /// every node through the reserved control channel. Returns how many were on this node.
    pub fn disconnect(&self, user: &str) -> Result<usize, BackplaneError> {
        if let Some(bus) = &self.redis {
            bus.disconnect(user)?;
        }
        Ok(self.users.revoke(user))
    }

    ///
    /// Returns what it did on this node ([`Published`]). In-process, the first slice of the
    /// broadcast is served before this returns, and the rest (a room larger than one slice)
    /// is handed back.
    pub fn publish(&self, msg: Publish<'_>) -> Result<Published, BackplaneError> {
        let local = || match msg.held {
            Some(room) => Some(Arc::clone(room)),
            None => self.registry.get(msg.room),
        };
        if let Some(bus) = &self.redis {
            bus.publish(msg.room, msg.message, msg.skip, msg.from)?;
            let deliveries = local().map_or(0, |room| room.len());
            return Ok(Published {
                deliveries,
                ..Published::default()
            });
        }
        if let Some(history) = &self.history {
            // Offset and fan-out under the room's log: served whole, never sliced, so the
            // next message of the room cannot overtake this one at any member.
            let frame = frame::text(msg.message);
            let (stamp, deliveries) = history.publish(msg.room, &frame, |stamp| {
                local().map_or(0, |room| {
                    let mut fanout = room.fanout(frame.clone(), msg.skip);
                    fanout.stamp(stamp.clone());
                    fanout.finish_now(&self.metrics);
                    fanout.queued()
                })
            });
            return Ok(Published {
                stamp: Some(stamp),
                deliveries,
                rest: None,
            });
        }
        let Some(room) = local() else {
            return Ok(Published::default());
        };
        let mut fanout = room.fanout(frame::text(msg.message), msg.skip);
        if fanout.step(&self.metrics) {
            return Ok(Published {
                deliveries: fanout.queued(),
                ..Published::default()
            });
        }
        Ok(Published {
            deliveries: room.len(),
            rest: Some(Box::new(fanout)),
            stamp: None,
        })
    }
}

/// Drops expired history every second, for as long as the node's history exists.
async fn expire_every_second(history: std::sync::Weak<History>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(history) = history.upgrade() else {
            return;
        };
        history.expire();
    }
}
