//! Room history: each room's recent messages with their offsets, kept on this node for
//! envelope-mode offsets, resume and `GET /api/history`. Off by default (`--history-size 0`);
//! with it off nothing here runs.
//!
//! A room's log is kept apart from the room: a room lives while it has members here, its
//! history must outlive them (a client that dropped may come back to an empty room and resume).
//! Each log's mutex also sequences the room's publishes: a message's offset is assigned and its
//! fan-out queued under it, so every member sees the room's messages in offset order, and a
//! member that joins or resumes is added under it between two messages, so what it replays and
//! what it then gets live meet without a gap or a duplicate. The mutex is the right primitive:
//! every holder does a bounded amount of work (one message's fan-out, or one chunk of a replay)
//! and never awaits.
//!
//! Bounds: `size` messages per room, `ttl` per message, and `max_bytes` for the whole node
//! (frames plus a fixed cost per entry and per room); past it the rooms whose last message is
//! oldest lose their history first, and are counted.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use crate::room::RoomId;

const SHARDS: usize = 64;
/// What one kept message costs besides its frame: the entry and its share of the deque.
const ENTRY_COST: u64 = 48;
/// What one room's log costs besides its messages: the log, its name, its map entry.
const LOG_COST: u64 = 256;
/// Eviction brings the node down to this share of `max_bytes`, so it runs once per many
/// appends, not on every one once the bound is reached.
const EVICT_TO_PERCENT: u64 = 90;

/// What [`History::attach`] does when the node's log cannot serve a resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    /// With offsets decided in Redis: answer [`Attach::Behind`], so the caller reads the
    /// room's stream first.
    Cluster,
    /// Join with nothing replayed, `recovered: false` (the stream was read already, or there
    /// is none).
    Nobody,
}

/// Who numbers a room's messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offsets {
    /// This node, under the room's log ([`History::publish`]): the in-process bus.
    Local,
    /// Redis, in the step that publishes (the cluster's bus): the node keeps what arrives,
    /// in the order and with the offsets Redis gave ([`History::append`]), and learns a room's
    /// epoch from its first message.
    Decided,
}

/// How a message from Redis follows the room's last one on this node ([`History::append`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Continuity {
    /// The offset after the last one.
    Next,
    /// The first this node has seen of the room (or of its history after a restart of it):
    /// nothing before it is kept here.
    First,
    /// Offsets were skipped (messages dropped on the way), or the epoch changed (Redis lost
    /// the room's history): what is kept here no longer joins up, and is dropped.
    Gap,
    /// At or before the last offset: already delivered; not kept or delivered again.
    Stale,
}

/// How much history a node keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryConfig {
    /// Messages kept per room; 0 (the default) turns history off.
    pub size: usize,
    /// A message older than this is dropped; zero keeps messages until `size` or `max_bytes`
    /// push them out. Default 10 minutes.
    pub ttl: Duration,
    /// Bytes all rooms' history may hold on this node. Default 64 MiB.
    pub max_bytes: u64,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        Self {
            size: 0,
            ttl: Duration::from_secs(600),
            max_bytes: 64 << 20,
        }
    }
}

/// Where a message sits in its room's history: its offset (the first message is 1, so 0 is
/// "nothing yet") within the history's epoch (a random string chosen when the room's history
/// began; a new epoch means the offsets started again).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp {
    /// The message's offset.
    pub offset: u64,
    /// The history it belongs to.
    pub epoch: Arc<str>,
}

/// One kept message.
#[derive(Debug, Clone)]
pub struct Kept {
    /// Its offset.
    pub offset: u64,
    /// The message as version 1 delivers it (the bare string, framed): the same `Bytes` its
    /// fan-out sent.
    pub frame: Bytes,
    at: Instant,
}

/// What a member attaching to a room with history gets ([`History::attach`]).
pub enum Attach<R> {
    /// Messages after the member's position, one chunk, with more to come: the member is not
    /// in the room yet, so nothing live can come between them.
    More(Vec<Kept>),
    /// The member was added: what `join` returned.
    Joined(R),
    /// Offsets decided in Redis, and this node's log cannot tell (it does not reach back to
    /// the member's position, or has not seen the room yet): read the room's Redis stream,
    /// [`History::seed`] the log with it, and attach again. Nothing was joined.
    Behind,
}

/// What `join` is handed, under the room's log: the messages still to replay and where the
/// room is. Whatever `join` queues for the member goes before every later message of the room.
pub struct Joining {
    /// The last messages the member missed (none when it had them all, or gave no position).
    pub replay: Vec<Kept>,
    /// The room's latest offset (0 before its first message) and its epoch; `None` while the
    /// node has not yet seen a message of the room from Redis (it does not know the epoch).
    pub latest: Option<Stamp>,
    /// For a member that gave a position: whether it gets everything after it (false when the
    /// history no longer reaches back, or is another epoch: nothing is replayed then).
    pub recovered: Option<bool>,
}

/// How much one chunk of a replay may hold: it is queued whole, so it must fit in the
/// member's outbox with room to spare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Messages.
    pub frames: usize,
    /// Their frames' bytes; the first message is taken whatever its size.
    pub bytes: usize,
}

/// Where an attaching member is: the epoch it knows and the last offset it has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// The epoch of `offset`.
    pub epoch: Arc<str>,
    /// The last offset the member received.
    pub offset: u64,
}

/// The node's history, by room name.
pub struct History {
    config: HistoryConfig,
    offsets: Offsets,
    shards: Vec<Mutex<HashMap<RoomId, Arc<Log>>>>,
    hasher: RandomState,
    /// Logs started so far: makes two epochs started in the same nanosecond differ.
    started: AtomicU64,
    bytes: AtomicU64,
    rooms: AtomicU64,
    evicted: AtomicU64,
    gaps: AtomicU64,
}

/// One room's history, and the lock that orders its publishes.
struct Log {
    state: Mutex<State>,
}

struct State {
    /// The history's epoch; `None` under [`Offsets::Decided`] until the first message.
    epoch: Option<Arc<str>>,
    /// Under [`Offsets::Decided`]: the opening of the room ([`crate::room::Room::opening`])
    /// whose subscription fed this log. Only for that opening is the log complete from its
    /// first message on: a room closed here missed what was published meanwhile.
    fed_by: Option<u64>,
    /// The offset the next message gets.
    next: u64,
    kept: VecDeque<Kept>,
    /// What `kept` costs, as counted against `max_bytes`.
    bytes: u64,
    /// The last message (or the log's start): eviction takes the oldest first.
    last: Instant,
    /// Evicted: still orders the publishes of whoever holds it, but keeps nothing.
    detached: bool,
}

/// What `/healthz` and `/metrics` report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HistoryStats {
    /// Bytes held, as counted against `max_bytes`.
    pub bytes: u64,
    /// Rooms with a log.
    pub rooms: u64,
    /// Rooms whose history was evicted to stay under `max_bytes`.
    pub evicted: u64,
    /// Messages from Redis that did not follow their room's last one here (see
    /// [`Continuity::Gap`]).
    pub gaps: u64,
}

impl History {
    /// The node's history store; `None` when `config.size` is 0 (history off).
    pub fn new(config: HistoryConfig, offsets: Offsets) -> Option<Self> {
        (config.size > 0).then(|| Self {
            config,
            offsets,
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            started: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            rooms: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            gaps: AtomicU64::new(0),
        })
    }

    /// The bounds it was made with.
    pub fn config(&self) -> HistoryConfig {
        self.config
    }

    /// Keeps `frame` as `room`'s next message and runs `deliver` with its stamp while the
    /// room's log is held: deliveries of one room never interleave, so every member sees its
    /// messages in offset order.
    pub fn publish<R>(
        &self,
        room: &str,
        frame: &Bytes,
        deliver: impl FnOnce(&Stamp) -> R,
    ) -> (Stamp, R) {
        let log = self.log(room);
        let now = Instant::now();
        let mut state = lock(&log.state);
        let epoch = state
            .epoch
            .get_or_insert_with(|| new_epoch(&self.hasher, self.started.fetch_add(1, Relaxed)));
        let epoch = Arc::clone(epoch);
        let stamp = Stamp {
            offset: state.next,
            epoch,
        };
        self.keep(&mut state, stamp.offset, frame, now);
        let delivered = deliver(&stamp);
        drop(state);
        if self.bytes.load(Relaxed) > self.config.max_bytes {
            self.evict();
        }
        (stamp, delivered)
    }

    /// Keeps `frame`, a message from Redis with the offset and epoch Redis gave it, as
    /// `room`'s next message, and runs `deliver` with how it follows the last one while the
    /// room's log is held (see [`Continuity`]; a `Stale` message is neither kept nor meant to
    /// be delivered).
    pub fn append<R>(
        &self,
        (room, opening): (&str, u64),
        frame: &Bytes,
        stamp: &Stamp,
        deliver: impl FnOnce(Continuity) -> R,
    ) -> R {
        let log = self.log(room);
        let now = Instant::now();
        let mut state = lock(&log.state);
        let continuity = match &state.epoch {
            // Kept by an earlier opening of the room: it does not join up with this one.
            _ if state.fed_by != Some(opening) => Continuity::First,
            None => Continuity::First,
            Some(epoch) if **epoch != *stamp.epoch => Continuity::Gap,
            Some(_) if stamp.offset < state.next => Continuity::Stale,
            Some(_) if stamp.offset > state.next => Continuity::Gap,
            Some(_) => Continuity::Next,
        };
        match continuity {
            Continuity::Stale => return deliver(continuity),
            Continuity::First | Continuity::Gap => {
                if continuity == Continuity::Gap {
                    self.gaps.fetch_add(1, Relaxed);
                }
                // What is kept must run on by one: start again from this message.
                self.restart(&mut state, &stamp.epoch, opening);
            }
            Continuity::Next => {}
        }
        self.keep(&mut state, stamp.offset, frame, now);
        deliver(continuity)
    }

    /// The offsets `room`'s log lacks before `stamp`: some, when the log follows room opening
    /// `opening` in `stamp`'s epoch and `stamp` skips past its next offset (messages from Redis
    /// were dropped on the way). A gap repair reads them from the room's stream before
    /// appending `stamp`'s message; [`append`](Self::append) still decides, so a log that
    /// moved meanwhile is not harmed.
    pub fn missing(&self, (room, opening): (&str, u64), stamp: &Stamp) -> Option<(u64, u64)> {
        let log = self.existing(room)?;
        let state = lock(&log.state);
        let follows =
            state.fed_by == Some(opening) && state.epoch.as_deref() == Some(&*stamp.epoch);
        (follows && stamp.offset > state.next).then(|| (state.next, stamp.offset - 1))
    }

    /// Marks `room`'s log as following room opening `opening` with nothing kept: its Redis
    /// stream was read after this node subscribed and was empty, so the room has no history
    /// yet and the next plain join need not read it again. The first message to arrive starts
    /// the log ([`Continuity::First`]).
    pub fn follow(&self, (room, opening): (&str, u64)) {
        let log = self.log(room);
        let mut state = lock(&log.state);
        if state.fed_by != Some(opening) {
            self.bytes.fetch_sub(state.bytes, Relaxed);
            state.kept.clear();
            state.bytes = 0;
            state.epoch = None;
            state.fed_by = Some(opening);
        }
    }

    /// Empties the log to start again in `epoch`, fed by room opening `opening`.
    fn restart(&self, state: &mut State, epoch: &Arc<str>, opening: u64) {
        self.bytes.fetch_sub(state.bytes, Relaxed);
        state.kept.clear();
        state.bytes = 0;
        state.epoch = Some(Arc::clone(epoch));
        state.fed_by = Some(opening);
    }

    /// Keeps `frame` at `offset` (the next one) and trims.
    fn keep(&self, state: &mut State, offset: u64, frame: &Bytes, now: Instant) {
        state.next = offset + 1;
        state.last = now;
        if state.detached {
            return;
        }
        let cost = frame.len() as u64 + ENTRY_COST;
        state.kept.push_back(Kept {
            offset,
            frame: frame.clone(),
            at: now,
        });
        state.bytes += cost;
        self.bytes.fetch_add(cost, Relaxed);
        self.trim(state, now);
    }

    /// Adds a member to `room` under its log: `join` runs there, so what it queues goes
    /// before every later message of the room, and the member gets all of those live.
    /// Without `from` it joins at once. With a position the history still holds, it gets the
    /// messages after it a chunk at a time (`More`) until the chunk that reaches the latest,
    /// which goes to `join`. When the history no longer reaches back (or is another epoch) it
    /// joins with nothing to replay and `recovered: Some(false)`.
    pub fn attach<R>(
        &self,
        room: &str,
        from: Option<&Position>,
        budget: Budget,
        (ask, opening): (Ask, Option<u64>),
        join: impl FnOnce(Joining) -> R,
    ) -> Attach<R> {
        let log = self.log(room);
        let mut state = lock(&log.state);
        self.trim(&mut state, Instant::now());
        // Offsets decided in Redis: the log says where the room is only if it follows the
        // room's current opening here (`opening`: `None` when the room is not open).
        let following =
            self.offsets == Offsets::Local || state.fed_by.is_some() && state.fed_by == opening;
        let latest = if following { state.latest() } else { None };
        let Some(from) = from else {
            if ask == Ask::Cluster && self.offsets == Offsets::Decided && !following {
                // A plain join where this node's log does not say where the room is: the
                // caller reads the stream's newest entry first.
                return Attach::Behind;
            }
            return Attach::Joined(join(Joining {
                replay: Vec::new(),
                latest,
                recovered: None,
            }));
        };
        let first = state.kept.front().map_or(state.next, |kept| kept.offset);
        let reaches = from.offset + 1 >= first && from.offset < state.next;
        let same_epoch = following && state.epoch.as_deref() == Some(&*from.epoch);
        if ask == Ask::Cluster
            && self.offsets == Offsets::Decided
            && (!following || same_epoch && !reaches)
        {
            return Attach::Behind;
        }
        if !same_epoch || !reaches {
            return Attach::Joined(join(Joining {
                replay: Vec::new(),
                latest,
                recovered: Some(false),
            }));
        }
        // Offsets in `kept` are consecutive, so the one after the member's is at `skip`.
        let skip = (from.offset + 1 - first) as usize;
        let mut bytes = 0;
        let replay: Vec<Kept> = state
            .kept
            .iter()
            .skip(skip)
            .take(budget.frames.max(1))
            .take_while(|kept| {
                bytes += kept.frame.len();
                bytes <= budget.bytes || bytes == kept.frame.len()
            })
            .cloned()
            .collect();
        if skip + replay.len() < state.kept.len() {
            return Attach::More(replay);
        }
        Attach::Joined(join(Joining {
            replay,
            latest,
            recovered: Some(true),
        }))
    }

    /// Fills `room`'s log from what its Redis stream held (`fetched`, oldest first), read
    /// while this node was subscribed to the room, so the two overlap or meet: the part the
    /// log lacks before its first message is put in front of it, or, for a log that has seen
    /// nothing yet, the stream becomes the log. False when the stream does not help a member
    /// at `from` (another epoch, or it does not reach back to the message after `from`): the
    /// member is then not recovered.
    pub fn seed(
        &self,
        (room, opening): (&str, u64),
        from: &Position,
        fetched: &[(Stamp, Bytes)],
    ) -> bool {
        let log = self.log(room);
        let now = Instant::now();
        let mut state = lock(&log.state);
        if state.fed_by != Some(opening) {
            // Nothing received in this opening yet: what is kept is from an earlier one.
            self.restart(&mut state, &from.epoch, opening);
            state.epoch = None;
        }
        // Only the stream's last run counts, and only in the member's epoch: a newest entry of
        // another epoch means the room's history started again since.
        if fetched
            .last()
            .is_some_and(|(stamp, _)| *stamp.epoch != *from.epoch)
        {
            return false;
        }
        let start = fetched
            .iter()
            .rposition(|(stamp, _)| *stamp.epoch != *from.epoch)
            .map_or(0, |at| at + 1);
        let run = &fetched[start..];
        let Some((last, _)) = run.last() else {
            return false;
        };
        let stream_first = run[0].0.offset;
        if stream_first > from.offset + 1 || last.offset < from.offset {
            return false;
        }
        match state.epoch.clone() {
            None => {
                state.epoch = Some(Arc::clone(&from.epoch));
                state.fed_by = Some(opening);
                for (stamp, frame) in run {
                    self.keep(&mut state, stamp.offset, frame, now);
                }
                true
            }
            Some(epoch) if *epoch == *from.epoch => {
                let first = state.kept.front().map_or(state.next, |kept| kept.offset);
                if last.offset + 1 < first {
                    // The stream ends before what this node received begins.
                    return false;
                }
                for (stamp, frame) in run.iter().rev().filter(|(s, _)| s.offset < first) {
                    let cost = frame.len() as u64 + ENTRY_COST;
                    state.kept.push_front(Kept {
                        offset: stamp.offset,
                        frame: frame.clone(),
                        at: now,
                    });
                    state.bytes += cost;
                    self.bytes.fetch_add(cost, Relaxed);
                }
                self.trim(&mut state, now);
                true
            }
            Some(_) => false,
        }
    }

    /// The room's latest offset and epoch; starts the room's history when it has none, so the
    /// epoch a joining member is told is the one its later messages carry.
    pub fn latest(&self, room: &str) -> Option<Stamp> {
        let log = self.log(room);
        let state = lock(&log.state);
        state.latest()
    }

    /// Up to `limit` messages of `room` after `after`, oldest first, with the room's latest
    /// stamp; `None` when the room has no history.
    pub fn read(&self, room: &str, after: u64, limit: usize) -> Option<(Stamp, Vec<Kept>)> {
        let log = self.existing(room)?;
        let mut state = lock(&log.state);
        self.trim(&mut state, Instant::now());
        let latest = state.latest()?;
        let kept = state
            .kept
            .iter()
            .filter(|kept| kept.offset > after)
            .take(limit)
            .cloned()
            .collect();
        Some((latest, kept))
    }

    /// Drops what is past `ttl` in every room, and the logs of rooms left with nothing whose
    /// last message is older than `ttl` (the node's timer runs this every second).
    pub fn expire(&self) {
        if self.config.ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        for shard in &self.shards {
            lock(shard).retain(|_, log| {
                let mut state = lock(&log.state);
                self.trim(&mut state, now);
                let idle = now.saturating_duration_since(state.last) > self.config.ttl;
                let keep = !(state.kept.is_empty() && idle);
                if !keep {
                    self.forget(&mut state);
                }
                keep
            });
        }
    }

    /// The figures `/healthz` and `/metrics` report.
    pub fn stats(&self) -> HistoryStats {
        HistoryStats {
            bytes: self.bytes.load(Relaxed),
            rooms: self.rooms.load(Relaxed),
            evicted: self.evicted.load(Relaxed),
            gaps: self.gaps.load(Relaxed),
        }
    }

    /// The room's log, started (with a fresh epoch) when it has none.
    fn log(&self, room: &str) -> Arc<Log> {
        let mut shard = self.shard(room);
        if let Some(log) = shard.get(room) {
            return Arc::clone(log);
        }
        let epoch = match self.offsets {
            Offsets::Local => Some(new_epoch(&self.hasher, self.started.fetch_add(1, Relaxed))),
            Offsets::Decided => None,
        };
        let log = Arc::new(Log {
            state: Mutex::new(State {
                epoch,
                fed_by: None,
                next: 1,
                kept: VecDeque::new(),
                bytes: 0,
                last: Instant::now(),
                detached: false,
            }),
        });
        shard.insert(RoomId::new(room), Arc::clone(&log));
        self.rooms.fetch_add(1, Relaxed);
        self.bytes.fetch_add(LOG_COST, Relaxed);
        log
    }

    fn existing(&self, room: &str) -> Option<Arc<Log>> {
        self.shard(room).get(room).cloned()
    }

    /// Drops messages past `size` and past `ttl`, oldest first.
    fn trim(&self, state: &mut State, now: Instant) {
        let ttl = self.config.ttl;
        while let Some(oldest) = state.kept.front() {
            let expired = !ttl.is_zero() && now.saturating_duration_since(oldest.at) > ttl;
            if state.kept.len() <= self.config.size && !expired {
                break;
            }
            let cost = oldest.frame.len() as u64 + ENTRY_COST;
            state.kept.pop_front();
            state.bytes -= cost;
            self.bytes.fetch_sub(cost, Relaxed);
        }
    }

    /// Takes a log out of the count as it leaves its shard's map: it keeps nothing from now on.
    fn forget(&self, state: &mut State) {
        self.bytes.fetch_sub(state.bytes + LOG_COST, Relaxed);
        self.rooms.fetch_sub(1, Relaxed);
        state.kept = VecDeque::new();
        state.bytes = 0;
        state.detached = true;
    }

    /// Over `max_bytes`: removes whole rooms' history, the oldest last message first, until
    /// the node holds at most [`EVICT_TO_PERCENT`] of the bound. One scan of every log's
    /// last-message time, so it runs once per many appends.
    fn evict(&self) {
        let target = self.config.max_bytes / 100 * EVICT_TO_PERCENT;
        let mut ages: Vec<(Instant, usize, RoomId)> = Vec::new();
        for (at, shard) in self.shards.iter().enumerate() {
            for (room, log) in lock(shard).iter() {
                ages.push((lock(&log.state).last, at, room.clone()));
            }
        }
        ages.sort_unstable_by_key(|(last, ..)| *last);
        for (_, at, room) in ages {
            if self.bytes.load(Relaxed) <= target {
                break;
            }
            let mut shard = lock(&self.shards[at]);
            if let Some(log) = shard.remove(&room) {
                self.forget(&mut lock(&log.state));
                self.evicted.fetch_add(1, Relaxed);
            }
        }
    }

    fn shard(&self, room: &str) -> MutexGuard<'_, HashMap<RoomId, Arc<Log>>> {
        let at = (self.hasher.hash_one(room) % SHARDS as u64) as usize;
        lock(&self.shards[at])
    }
}

impl State {
    /// The latest offset (0 before any message) with the epoch, when the epoch is known.
    fn latest(&self) -> Option<Stamp> {
        Some(Stamp {
            offset: self.next - 1,
            epoch: Arc::clone(self.epoch.as_ref()?),
        })
    }
}

/// A fresh epoch: 64 bits from the process's random hash keys, the clock and a sequence
/// number, as 16 hex digits. It only has to differ from the room's earlier epochs, on this
/// node and across its restarts.
fn new_epoch(hasher: &RandomState, sequence: u64) -> Arc<str> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let bits = hasher.hash_one((nanos, sequence));
    Arc::from(format!("{bits:016x}"))
}

/// A panic elsewhere cannot leave a log half-updated (each change is one push, pop or swap).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn history(size: usize) -> History {
        History::new(
            HistoryConfig {
                size,
                ttl: Duration::ZERO,
                max_bytes: 64 << 20,
            },
            Offsets::Local,
        )
        .expect("history on")
    }

    fn latest(history: &History) -> Stamp {
        history.latest("r").expect("a local epoch")
    }

    fn frame(n: u64) -> Bytes {
        crate::frame::text(&n.to_string())
    }

    /// A small deterministic generator (xorshift), so a failure replays exactly.
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// Members as a test sees them: what each received, whether it is live, where it
    /// resumed from, and (told `recovered: false`) how much it had then and the latest offset.
    #[derive(Default)]
    struct Members {
        got: Vec<Vec<u64>>,
        live: Vec<bool>,
        start: Vec<u64>,
        lost: Vec<Option<(usize, u64)>>,
        resuming: Vec<(usize, Position)>,
    }

    impl Members {
        fn publish(&mut self, history: &History) {
            let n = latest(history).offset + 1;
            history.publish("r", &frame(n), |stamp| {
                for (member, on) in self.live.iter().enumerate() {
                    if *on {
                        self.got[member].push(stamp.offset);
                    }
                }
            });
        }

        /// A new member resumes from a position `back` before the latest (maybe beyond what
        /// the history keeps).
        fn arrive(&mut self, history: &History, back: u64) {
            let latest = latest(history);
            let back = back.min(latest.offset);
            self.got.push(Vec::new());
            self.live.push(false);
            self.lost.push(None);
            self.start.push(latest.offset - back + 1);
            let from = Position {
                epoch: latest.epoch,
                offset: latest.offset - back,
            };
            self.resuming.push((self.got.len() - 1, from));
        }

        fn step(&mut self, history: &History, at: usize, frames: usize) {
            let (member, from) = self.resuming[at].clone();
            let budget = Budget {
                frames,
                bytes: 1 << 20,
            };
            let step = history.attach("r", Some(&from), budget, (Ask::Nobody, None), |joining| {
                if joining.recovered == Some(false) {
                    self.lost[member] = Some((
                        self.got[member].len(),
                        joining.latest.as_ref().map_or(0, |l| l.offset),
                    ));
                }
                self.got[member].extend(joining.replay.iter().map(|k| k.offset));
                self.live[member] = true;
            });
            match step {
                Attach::More(chunk) => {
                    self.got[member].extend(chunk.iter().map(|k| k.offset));
                    let last = chunk.last().expect("a chunk is never empty").offset;
                    self.resuming[at].1.offset = last;
                }
                Attach::Joined(()) => {
                    self.resuming.remove(at);
                }
                Attach::Behind => panic!("offsets decided here never ask Redis"),
            }
        }

        fn check(&self, latest: u64, seed: u64) {
            for (member, offsets) in self.got.iter().enumerate() {
                if !self.live[member] {
                    continue;
                }
                let (before, after, first) = match self.lost[member] {
                    Some((had, joined_at)) => (&offsets[..had], &offsets[had..], joined_at + 1),
                    None => (&offsets[..0], &offsets[..], self.start[member]),
                };
                let run: Vec<u64> = (self.start[member]..).take(before.len()).collect();
                assert_eq!(
                    before,
                    &run[..],
                    "seed {seed}, member {member}: before the loss"
                );
                let expected: Vec<u64> = (first..=latest).collect();
                assert_eq!(after, &expected[..], "seed {seed}, member {member}");
            }
        }
    }

    /// The merge of replay and live, under every interleaving this generator makes of
    /// publishes, chunked resumes and fresh joins: each member that resumed while the
    /// history reached back sees every offset after its position exactly once and in order;
    /// one told `recovered: false` (at once, or when the history moved past it between two
    /// chunks) sees a run that started right after its position, then every offset from its
    /// join on.
    #[test]
    fn replay_then_live_has_no_gap_no_duplicate_and_keeps_order() {
        for seed in 1..=200u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let history = history(1 + rng.below(20) as usize);
            let mut members = Members::default();
            for _ in 0..300 {
                match rng.below(4) {
                    0 | 1 => members.publish(&history),
                    2 => members.arrive(&history, rng.below(30)),
                    _ if !members.resuming.is_empty() => {
                        let at = rng.below(members.resuming.len() as u64) as usize;
                        members.step(&history, at, 1 + rng.below(5) as usize);
                    }
                    _ => {}
                }
            }
            members.check(latest(&history).offset, seed);
        }
    }

    #[test]
    fn size_ttl_and_the_node_bound_are_kept() {
        let kept = history(3);
        for n in 1..=5 {
            kept.publish("r", &frame(n), |_| ());
        }
        let (latest, messages) = kept.read("r", 0, 100).expect("a log");
        assert_eq!(latest.offset, 5);
        let offsets: Vec<u64> = messages.iter().map(|k| k.offset).collect();
        assert_eq!(offsets, [3, 4, 5], "the newest `size`");

        // The node bound: rooms whose last message is oldest go first, and are counted.
        let config = HistoryConfig {
            size: 1000,
            ttl: Duration::ZERO,
            max_bytes: 1 << 20,
        };
        let bounded = History::new(config, Offsets::Local).expect("history on");
        let big = Bytes::from(vec![b'x'; 64 * 1024]);
        for room in 0..40 {
            bounded.publish(&format!("room-{room}"), &big, |_| ());
        }
        let stats = bounded.stats();
        assert!(stats.bytes <= 1 << 20, "{stats:?}");
        assert!(stats.evicted > 0);
        assert!(
            bounded.read("room-0", 0, 1).is_none(),
            "the oldest room went first"
        );
        assert!(bounded.read("room-39", 0, 1).is_some(), "the newest stayed");
    }

    #[test]
    fn a_position_from_another_epoch_or_beyond_the_history_is_not_recovered() {
        let history = history(2);
        for n in 1..=5 {
            history.publish("r", &frame(n), |_| ());
        }
        let epoch = latest(&history).epoch;
        let budget = Budget {
            frames: 10,
            bytes: 1 << 20,
        };
        let recovered = |from: Position| match history.attach(
            "r",
            Some(&from),
            budget,
            (Ask::Nobody, None),
            |j| (j.recovered, j.replay.len()),
        ) {
            Attach::Joined(outcome) => outcome,
            Attach::More(_) | Attach::Behind => panic!("one chunk holds it all"),
        };
        let other: Arc<str> = Arc::from("other");
        assert_eq!(
            recovered(Position {
                epoch: other,
                offset: 4
            }),
            (Some(false), 0)
        );
        let gone = Position {
            epoch: Arc::clone(&epoch),
            offset: 2,
        };
        assert_eq!(recovered(gone), (Some(false), 0), "3 was pushed out");
        let ahead = Position {
            epoch: Arc::clone(&epoch),
            offset: 9,
        };
        assert_eq!(recovered(ahead), (Some(false), 0));
        let kept = Position { epoch, offset: 3 };
        assert_eq!(recovered(kept), (Some(true), 2));
    }

    #[test]
    fn messages_numbered_elsewhere_are_kept_in_order_and_gaps_and_repeats_are_seen() {
        let config = HistoryConfig {
            size: 100,
            ttl: Duration::ZERO,
            max_bytes: 64 << 20,
        };
        let history = History::new(config, Offsets::Decided).expect("history on");
        assert_eq!(
            history.latest("r"),
            None,
            "no epoch before the first message"
        );
        let stamp = |offset, epoch: &str| Stamp {
            offset,
            epoch: Arc::from(epoch),
        };
        let append = |s: Stamp| history.append(("r", 1), &frame(s.offset), &s, |c| c);
        assert_eq!(append(stamp(7, "e1")), Continuity::First);
        assert_eq!(append(stamp(8, "e1")), Continuity::Next);
        assert_eq!(append(stamp(8, "e1")), Continuity::Stale);
        assert_eq!(append(stamp(9, "e1")), Continuity::Next);
        let kept = |h: &History| -> Vec<u64> {
            h.read("r", 0, 100)
                .expect("a log")
                .1
                .iter()
                .map(|k| k.offset)
                .collect()
        };
        assert_eq!(kept(&history), [7, 8, 9]);
        // What a repair reads first: only the skipped offsets, only in the log's epoch and
        // opening, nothing for the next one or an old one.
        assert_eq!(history.missing(("r", 1), &stamp(12, "e1")), Some((10, 11)));
        assert_eq!(history.missing(("r", 1), &stamp(10, "e1")), None);
        assert_eq!(history.missing(("r", 1), &stamp(8, "e1")), None);
        assert_eq!(history.missing(("r", 1), &stamp(12, "e2")), None);
        assert_eq!(history.missing(("r", 2), &stamp(12, "e1")), None);
        assert_eq!(
            append(stamp(12, "e1")),
            Continuity::Gap,
            "10 and 11 never came"
        );
        assert_eq!(kept(&history), [12], "what is kept runs on by one");
        assert_eq!(
            append(stamp(1, "e2")),
            Continuity::Gap,
            "Redis lost the room"
        );
        assert_eq!(kept(&history), [1]);
        assert_eq!(history.latest("r"), Some(stamp(1, "e2")));
        // A resume is served from what is kept, in the epoch Redis gave.
        let budget = Budget {
            frames: 10,
            bytes: 1 << 20,
        };
        let from = Position {
            epoch: Arc::from("e1"),
            offset: 9,
        };
        let Attach::Joined(recovered) =
            history.attach("r", Some(&from), budget, (Ask::Nobody, None), |j| {
                j.recovered
            })
        else {
            panic!("joins at once")
        };
        assert_eq!(recovered, Some(false), "another epoch");

        // The room closed here and opened again (opening 2): the log missed what came in
        // between, so it cannot serve a resume without the stream, and the next message
        // starts it again rather than counting a gap.
        let at_one = Position {
            epoch: Arc::from("e2"),
            offset: 1,
        };
        let asked = history.attach("r", Some(&at_one), budget, (Ask::Cluster, Some(2)), |_| ());
        assert!(matches!(asked, Attach::Behind));
        let gaps = history.stats().gaps;
        assert_eq!(append_in(&history, 2, stamp(9, "e2")), Continuity::First);
        assert_eq!(history.stats().gaps, gaps);
    }

    #[test]
    fn a_log_marked_following_answers_plain_joins_without_asking_again() {
        let config = HistoryConfig {
            size: 10,
            ttl: Duration::ZERO,
            max_bytes: 1 << 20,
        };
        let history = History::new(config, Offsets::Decided).expect("history on");
        let budget = Budget {
            frames: 10,
            bytes: 1 << 20,
        };
        let plain =
            |h: &History| h.attach("r", None, budget, (Ask::Cluster, Some(1)), |j| j.latest);
        assert!(
            matches!(plain(&history), Attach::Behind),
            "not following: ask the stream"
        );
        history.follow(("r", 1));
        let Attach::Joined(latest) = plain(&history) else {
            panic!("following: joins at once")
        };
        assert_eq!(latest, None, "no history yet, no position");
        let stamp = Stamp {
            offset: 1,
            epoch: Arc::from("e"),
        };
        assert_eq!(append_in(&history, 1, stamp.clone()), Continuity::First);
        let Attach::Joined(latest) = plain(&history) else {
            panic!("joins at once")
        };
        assert_eq!(latest, Some(stamp));
        // Marking again (a late answer) does not empty a log that is already fed.
        history.follow(("r", 1));
        assert_eq!(
            history.read("r", 0, 10).map(|(_, kept)| kept.len()),
            Some(1)
        );
    }

    fn append_in(history: &History, opening: u64, stamp: Stamp) -> Continuity {
        history.append(("r", opening), &frame(stamp.offset), &stamp, |c| c)
    }

    #[test]
    fn a_log_is_seeded_from_the_stream_only_where_it_joins_up() {
        let config = HistoryConfig {
            size: 100,
            ttl: Duration::ZERO,
            max_bytes: 64 << 20,
        };
        let stamp = |offset, epoch: &str| Stamp {
            offset,
            epoch: Arc::from(epoch),
        };
        let stream = |range: std::ops::RangeInclusive<u64>, epoch: &str| -> Vec<(Stamp, Bytes)> {
            range.map(|n| (stamp(n, epoch), frame(n))).collect()
        };
        let at = |offset| Position {
            epoch: Arc::from("e"),
            offset,
        };
        let kept = |h: &History| -> Vec<u64> {
            h.read("r", 0, 100)
                .map_or(Vec::new(), |(_, k)| k.iter().map(|k| k.offset).collect())
        };
        // A log that has seen nothing becomes the stream.
        let fresh = History::new(config, Offsets::Decided).expect("on");
        assert!(fresh.seed(("r", 1), &at(3), &stream(1..=6, "e")));
        assert_eq!(kept(&fresh), [1, 2, 3, 4, 5, 6]);
        assert_eq!(fresh.latest("r"), Some(stamp(6, "e")));
        // A log that received 5.. since the room was pinned gets what it lacks in front.
        let partial = History::new(config, Offsets::Decided).expect("on");
        for n in 5..=7 {
            partial.append(("r", 1), &frame(n), &stamp(n, "e"), |_| ());
        }
        assert!(partial.seed(("r", 1), &at(1), &stream(1..=6, "e")));
        assert_eq!(kept(&partial), [1, 2, 3, 4, 5, 6, 7]);
        // Refused: the stream does not reach back to 3; its newest run is another epoch; the
        // stream ends before the log begins.
        let refused = |from: u64, s: Vec<(Stamp, Bytes)>| {
            let h = History::new(config, Offsets::Decided).expect("on");
            h.append(("r", 1), &frame(20), &stamp(20, "e"), |_| ());
            !h.seed(("r", 1), &at(from), &s)
        };
        assert!(refused(2, stream(4..=19, "e")), "3 is gone");
        assert!(refused(2, stream(1..=19, "f")), "another epoch");
        assert!(refused(2, stream(1..=10, "e")), "11..19 fell between");
    }
}
