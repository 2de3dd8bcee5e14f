//! Rooms and the registry that finds them.
//!
//! Fan-out is the hot path and membership changes are rare next to it, so each room's member
//! list is an immutable snapshot behind `ArcSwap`: a broadcast is one atomic load and a walk of
//! the snapshot's leaves, with no lock. The snapshot is a persistent tree ([`roster`]), so a
//! join or a leave copies one root-to-leaf path, not the room: the same cost in a room of 200
//! as in one of 100,000 (a flat copy-on-write list made a reconnect storm into one big room
//! cost the square of its size). Joins and leaves run under their shard's mutex, which also
//! guards the shard's map and each room's index of member positions, so "first member
//! arrived" and "last member left" are decided exactly once and in order per room (the
//! backplane subscribes and unsubscribes on those edges).

mod roster;

use std::borrow::Borrow;
use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use arc_swap::ArcSwap;
use bytes::Bytes;

use crate::history::Stamp;
use crate::metrics::Metrics;
use crate::outbox::{self, ConnId, DeferredWrites, Outbox};
use crate::protocol::{self, Format};
use roster::Roster;

/// A room's name as clients spell it; cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomId(Arc<str>);

impl RoomId {
    /// Copies `name` into a shared allocation.
    pub fn new(name: &str) -> Self {
        Self(Arc::from(name))
    }

    /// The name as the client spelled it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for RoomId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for RoomId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for RoomId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A member as fan-out sees it: the connection's id beside its outbound ring. The id is kept
/// here, in the snapshot, because reading it through the `Outbox` would share a cache line with
/// the counters every push updates: a churning `leave` scanning ids slowed a 200-member
/// broadcast several-fold in the registry bench.
#[derive(Clone)]
pub struct Member {
    /// The member's connection.
    pub id: ConnId,
    /// Where fan-out pushes the member's frames.
    pub outbox: Arc<Outbox>,
}

/// One room on this node: its name and the current snapshot of its local members.
///
/// What must stay true: the snapshot is only replaced under the room's shard lock (so joins
/// and leaves never lose each other's change), and readers never lock.
pub struct Room {
    id: RoomId,
    members: ArcSwap<Roster>,
    /// Members a [`Fanout`] serves before it lets other tasks run (`--fanout-slice`).
    slice: usize,
    opening: u64,
}

impl Room {
    fn new(id: RoomId, slice: usize) -> Self {
        /// Every room opened on this node gets the next number.
        static OPENED: AtomicU64 = AtomicU64::new(1);
        Self {
            id,
            members: ArcSwap::from_pointee(Roster::default()),
            slice,
            opening: OPENED.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Which opening of the room on this node this is: a room that closes (its last member
    /// left) and opens again is another opening. With Redis, a room's history here is only
    /// complete for the opening that received it.
    pub fn opening(&self) -> u64 {
        self.opening
    }

    /// The room's name.
    pub fn id(&self) -> &RoomId {
        &self.id
    }

    /// Local members right now.
    pub fn len(&self) -> usize {
        self.members.load().len()
    }

    /// True when no local member is left (the registry then removes the room).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Queues `frame` for every member except `skip`; returns how many got it. Each recipient
    /// receives a clone of the same `Bytes`: one allocation per message, whatever the fan-out.
    pub fn broadcast(&self, frame: &Bytes, skip: Option<ConnId>, metrics: &Metrics) -> usize {
        // The same path the server takes, served to the end without yielding.
        let mut fanout = self.fanout(frame.clone(), skip);
        fanout.finish_now(metrics);
        fanout.queued()
    }

    /// Queues `frame` for every member in envelope mode (a notice version 1 clients never
    /// see); returns how many got it.
    pub fn tell_envelopes(&self, frame: &Bytes, metrics: &Metrics) -> usize {
        let members = self.members.load();
        let mut told = 0;
        members.leaves_from(0, &mut |leaf| {
            for member in leaf {
                if member.outbox.format() == Format::Envelope
                    && member.outbox.push(frame, metrics).delivered()
                {
                    told += 1;
                }
            }
            true
        });
        told
    }

    /// A broadcast of `frame` to the members of now, except `skip`, to be served a slice at a
    /// time ([`Fanout::step`]): what a caller that can yield uses instead of [`Room::broadcast`].
    pub fn fanout(&self, frame: Bytes, skip: Option<ConnId>) -> Fanout {
        Fanout {
            members: self.members.load_full(),
            room: self.id.clone(),
            frame,
            envelope: None,
            stamp: None,
            skip,
            slice: self.slice,
            next: 0,
            queued: 0,
            started: None,
        }
    }
}

/// A broadcast served a slice of members at a time. A slice's idle sockets are written when it
/// ends (one `write` each, about 3.5 µs on loopback), so one message to 100,000 members is
/// about 0.35 s of a core; served whole, it holds a runtime worker that long while every
/// other room's messages on that worker wait. Between slices the caller yields (the session,
/// the Redis inbox and the server API each do), so other tasks run every slice (default 256
/// members, about 1 ms; a room of 200 is served whole). The members are those of the moment the broadcast began; each
/// caller finishes one broadcast before it starts its next, so one sender's messages keep
/// their order for every member.
pub struct Fanout {
    members: Arc<Roster>,
    room: RoomId,
    /// The message as version 1 delivers it: the bare string.
    frame: Bytes,
    /// The same message in envelope mode, built at the first envelope-mode member and kept
    /// for the rest: one framed `Bytes` per message per format, never one per recipient, and
    /// nothing at all in a room without such members.
    envelope: Option<Bytes>,
    /// The message's place in the room's history, carried by its envelope.
    stamp: Option<Stamp>,
    skip: Option<ConnId>,
    slice: usize,
    /// The index of the next member to serve, always at the start of a leaf.
    next: usize,
    queued: usize,
    /// When the first slice began: the fan-out histogram's start.
    started: Option<Instant>,
}

impl Fanout {
    /// Queues the frame for about one slice more members (whole leaves of the roster); returns
    /// true when every member has been served.
    pub fn step(&mut self, metrics: &Metrics) -> bool {
        let started = *self.started.get_or_insert_with(Instant::now);
        let (skip, frame, room, stamp) = (self.skip, &self.frame, &self.room, &self.stamp);
        let envelope = &mut self.envelope;
        let mut budget = self.slice.max(1);
        let mut queued = 0;
        // Idle sockets are claimed and written when the worker's pass ends (or when the
        // step ends, off the node's runtime): see `outbox::DeferredWrites`.
        let batch = DeferredWrites::begin();
        self.next = outbox::with_claims(|claims| {
            self.members.leaves_from(self.next, &mut |leaf| {
                for member in leaf {
                    if Some(member.id) == skip {
                        continue;
                    }
                    let frame = match member.outbox.format() {
                        Format::Bare => frame,
                        Format::Envelope => envelope.get_or_insert_with(|| {
                            protocol::envelope_of(room.as_str(), frame, stamp.as_ref())
                        }),
                    };
                    if member
                        .outbox
                        .deliver_later(frame, metrics, claims)
                        .delivered()
                    {
                        queued += 1;
                    }
                }
                budget = budget.saturating_sub(leaf.len());
                budget > 0
            })
        });
        batch.finish();
        // Counted once per slice, not per recipient.
        metrics.add_deliveries(queued as u64);
        self.queued += queued;
        let done = self.is_done();
        if done {
            metrics
                .fanout_us
                .observe(started.elapsed().as_micros() as u64);
        }
        done
    }

    /// Puts the message's place in the room's history into its envelope; before the first
    /// step.
    pub fn stamp(&mut self, stamp: Stamp) {
        self.stamp = Some(stamp);
    }

    /// True once every member has been served.
    pub fn is_done(&self) -> bool {
        self.next >= self.members.len()
    }

    /// Members the frame was queued for so far.
    pub fn queued(&self) -> usize {
        self.queued
    }

    /// Serves the rest without yielding: for a caller that cannot wait (a session being torn
    /// down with a broadcast half done must still deliver it).
    pub fn finish_now(&mut self, metrics: &Metrics) {
        while !self.step(metrics) {}
    }

    /// Serves the rest, yielding to the runtime between slices; returns the members served.
    pub async fn finish(mut self, metrics: &Metrics) -> usize {
        while !self.step(metrics) {
            metrics.add_fanout_yield();
            // The slice's sockets go out now, not when the worker next parks: other tasks
            // run before the next slice and the worker may not park until the last.
            outbox::write_claims();
            tokio::task::yield_now().await;
        }
        self.queued
    }
}

/// Told, under the room's shard lock, when a room gains its first member on this node and when
/// it loses its last one. Implementations must not block.
pub trait RoomWatcher: Send + Sync {
    /// `room` gained its first local member.
    fn opened(&self, room: &RoomId);
    /// `room` lost its last local member.
    fn closed(&self, room: &RoomId);
}

/// `room`'s entry in `map` (its shard), if it is still that room: a room that closed and
/// opened again is another `Room`, and a late leave or unpin of the old one must not touch it.
fn entry_of<'m>(map: &'m mut HashMap<RoomId, Entry>, room: &Arc<Room>) -> Option<&'m mut Entry> {
    map.get_mut(room.id.as_str())
        .filter(|entry| Arc::ptr_eq(&entry.room, room))
}

/// A room held open by [`Registry::pin`]; unpinned on drop.
pub struct Pin {
    registry: Registry,
    room: Arc<Room>,
}

impl Drop for Pin {
    fn drop(&mut self) {
        self.registry.unpin(&self.room);
    }
}

/// The node is at its room cap: a join that would create a room is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the node holds its maximum of {0} rooms")]
pub struct RoomsFull(pub usize);

/// All rooms with at least one member on this node; a cheap-to-clone handle.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

/// One shard of the registry: its rooms, each with where every member sits in its roster.
/// The mutex is the right primitive: it orders a room's joins and leaves (each reads the current
/// snapshot and stores the next) and is held for one path copy, never across an await.
type Shard = Mutex<HashMap<RoomId, Entry>>;

struct Entry {
    room: Arc<Room>,
    /// [`Pin`]s holding the room open without a member.
    pins: u32,
    /// Each member's index in the room's current roster: a leave finds its member without a
    /// scan. Kept beside the snapshot, not in it, because only writers (under the lock) read it.
    positions: HashMap<ConnId, usize, BuildHasherDefault<ConnIdHasher>>,
}

/// Hashes a `ConnId` with one multiplication. Ids are handed out by the server in sequence,
/// never chosen by a client, so no flooding of one bucket is possible and SipHash's cost (about
/// a fifth of a join) buys nothing.
#[derive(Default)]
struct ConnIdHasher(u64);

impl Hasher for ConnIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        // Fibonacci hashing: the high bits (hashbrown's tag) and low bits (its bucket) both vary.
        self.0 = (self.0 ^ n)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(26);
    }
}

struct Inner {
    shards: Box<[Shard]>,
    hasher: RandomState,
    rooms: AtomicUsize,
    bounds: Bounds,
    watcher: Option<Arc<dyn RoomWatcher>>,
}

/// What the registry holds its rooms to.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Rooms the node holds at most (`--max-rooms`).
    pub max_rooms: usize,
    /// Members a broadcast serves before it yields (`--fanout-slice`).
    pub fanout_slice: usize,
}

impl Default for Bounds {
    fn default() -> Self {
        Self {
            max_rooms: usize::MAX,
            fanout_slice: usize::MAX,
        }
    }
}

/// Enough shards that two cores (or sixty-four) rarely meet on one mutex during join storms.
pub const SHARDS: usize = 64;

impl Registry {
    /// An empty registry with no room cap; `watcher` hears every room's first join and last
    /// leave.
    pub fn new(watcher: Option<Arc<dyn RoomWatcher>>) -> Self {
        Self::bounded(watcher, Bounds::default())
    }

    /// An empty registry held to `bounds`.
    pub fn bounded(watcher: Option<Arc<dyn RoomWatcher>>, bounds: Bounds) -> Self {
        Self {
            inner: Arc::new(Inner {
                shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
                hasher: RandomState::new(),
                rooms: AtomicUsize::new(0),
                bounds,
                watcher,
            }),
        }
    }

    fn shard(&self, name: &str) -> MutexGuard<'_, HashMap<RoomId, Entry>> {
        let index = self.inner.hasher.hash_one(name) as usize % self.inner.shards.len();
        // A panic while holding a shard lock cannot leave the map half-updated (each update is a
        // single insert, remove or snapshot store), so a poisoned lock is still consistent.
        self.inner.shards[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Rooms with members on this node.
    pub fn room_count(&self) -> usize {
        self.inner.rooms.load(Ordering::Relaxed)
    }

    /// The room `name` when it has local members.
    pub fn get(&self, name: &str) -> Option<Arc<Room>> {
        self.shard(name)
            .get(name)
            .map(|entry| Arc::clone(&entry.room))
    }

    /// Adds `member` to room `name`, creating the room if needed, unless that would take the
    /// node past its room cap. The caller guarantees the member does not hold the room already.
    pub fn join(&self, name: &str, outbox: &Arc<Outbox>) -> Result<Arc<Room>, RoomsFull> {
        let mut map = self.shard(name);
        let entry = match map.get_mut(name) {
            Some(entry) => entry,
            None => self.open(&mut map, name)?,
        };
        let room = &entry.room;
        let current = room.members.load();
        entry.positions.insert(outbox.id(), current.len());
        room.members.store(Arc::new(current.push(Member {
            id: outbox.id(),
            outbox: Arc::clone(outbox),
        })));
        Ok(Arc::clone(room))
    }

    /// Creates room `name` in `map` (its shard), unless the node is at its room cap.
    fn open<'m>(
        &self,
        map: &'m mut HashMap<RoomId, Entry>,
        name: &str,
    ) -> Result<&'m mut Entry, RoomsFull> {
        // Reserved in one step, so racing joins in other shards cannot pass the cap.
        let max = self.inner.bounds.max_rooms;
        self.inner
            .rooms
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .map_err(|_| RoomsFull(max))?;
        let room = Arc::new(Room::new(RoomId::new(name), self.inner.bounds.fanout_slice));
        if let Some(watcher) = &self.inner.watcher {
            watcher.opened(&room.id);
        }
        let entry = Entry {
            room: Arc::clone(&room),
            pins: 0,
            positions: HashMap::default(),
        };
        Ok(map.entry(room.id.clone()).or_insert(entry))
    }

    /// Removes `member` from `room`; the room disappears with its last member. A member that
    /// does not hold the room (or a room already gone) is left alone.
    pub fn leave(&self, room: &Arc<Room>, member: ConnId) {
        let mut map = self.shard(room.id.as_str());
        let Some(entry) = entry_of(&mut map, room) else {
            return;
        };
        let Some(index) = entry.positions.remove(&member) else {
            return;
        };
        let current = room.members.load();
        let Some((next, moved)) = current.swap_remove(index) else {
            return;
        };
        if let Some(moved) = moved {
            entry.positions.insert(moved, index);
        }
        let now_empty = next.len() == 0;
        room.members.store(Arc::new(next));
        if now_empty && entry.pins == 0 {
            self.close(&mut map, room);
        }
    }

    /// Removes `room`, which has neither members nor pins left, from `map` (its shard).
    fn close(&self, map: &mut HashMap<RoomId, Entry>, room: &Arc<Room>) {
        map.remove(room.id.as_str());
        self.inner.rooms.fetch_sub(1, Ordering::Relaxed);
        if let Some(watcher) = &self.inner.watcher {
            watcher.closed(&room.id);
        }
    }

    /// Holds room `name` open on this node without a member (creating it if needed, within
    /// the room cap) until the [`Pin`] drops: with Redis the node stays subscribed to it, so
    /// what the room receives meanwhile reaches this node. A member being resumed from the
    /// room's Redis stream is not in the room yet, and must not miss what is published while
    /// the stream is read.
    pub fn pin(&self, name: &str) -> Result<Pin, RoomsFull> {
        let mut map = self.shard(name);
        let entry = match map.get_mut(name) {
            Some(entry) => entry,
            None => self.open(&mut map, name)?,
        };
        entry.pins += 1;
        Ok(Pin {
            registry: self.clone(),
            room: Arc::clone(&entry.room),
        })
    }

    fn unpin(&self, room: &Arc<Room>) {
        let mut map = self.shard(room.id.as_str());
        let Some(entry) = entry_of(&mut map, room) else {
            return;
        };
        entry.pins = entry.pins.saturating_sub(1);
        if entry.pins == 0 && room.is_empty() {
            self.close(&mut map, room);
        }
    }

    /// The names of every room with members here (for re-subscribing after a backplane outage).
    pub fn room_ids(&self) -> Vec<RoomId> {
        let mut ids = Vec::with_capacity(self.room_count());
        for shard in self.inner.shards.iter() {
            let map = shard.lock().unwrap_or_else(|p| p.into_inner());
            ids.extend(map.keys().cloned());
        }
        ids
    }

    /// Every room with members here and how many it has (for presence across nodes).
    pub fn room_counts(&self) -> Vec<(RoomId, usize)> {
        let mut counts = Vec::with_capacity(self.room_count());
        for shard in self.inner.shards.iter() {
            let map = shard.lock().unwrap_or_else(|p| p.into_inner());
            counts.extend(map.iter().map(|(id, entry)| (id.clone(), entry.room.len())));
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::{Limits, SlowConsumer};

    fn member(id: u64) -> Arc<Outbox> {
        Arc::new(Outbox::new(
            ConnId(id),
            Arc::new(Limits {
                max_frames: 16,
                max_bytes: 1 << 20,
                policy: SlowConsumer::Close,
                direct: true,
                metrics: Arc::default(),
            }),
        ))
    }

    #[derive(Default)]
    struct Log(Mutex<Vec<String>>);
    impl RoomWatcher for Log {
        fn opened(&self, room: &RoomId) {
            self.0.lock().unwrap().push(format!("+{room}"));
        }
        fn closed(&self, room: &RoomId) {
            self.0.lock().unwrap().push(format!("-{room}"));
        }
    }

    #[test]
    fn every_recipient_shares_one_allocation() {
        let metrics = Metrics::default();
        let registry = Registry::new(None);
        let members: Vec<Arc<Outbox>> = (0..200).map(member).collect();
        let mut room = None;
        for m in &members {
            room = Some(registry.join("red", m).expect("under the room cap"));
        }
        let room = room.unwrap();
        let frame = crate::frame::text("hello");
        assert_eq!(room.broadcast(&frame, Some(ConnId(7)), &metrics), 199);
        let mut seen = 0;
        for m in &members {
            let mut queued = std::collections::VecDeque::new();
            m.take_all(&mut queued);
            for q in queued {
                assert_eq!(q.as_ptr(), frame.as_ptr(), "a recipient got a copy");
                seen += 1;
            }
        }
        assert_eq!(seen, 199);
    }

    /// Leaves in an order unlike the joins' find each member through the position index: after
    /// each one, a broadcast reaches exactly the members still in the room.
    #[test]
    fn leaves_in_any_order_remove_exactly_that_member() {
        let metrics = Metrics::default();
        let registry = Registry::new(None);
        let members: Vec<Arc<Outbox>> = (0..600).map(member).collect();
        let mut room = None;
        for m in &members {
            room = Some(registry.join("big", m).expect("under the cap"));
        }
        let room = room.expect("members");
        let frame = crate::frame::text("x");
        let mut queued = std::collections::VecDeque::new();
        // 7 is coprime with 600: every member leaves once, in a scattered order.
        for (n, i) in (0..600).map(|k| (k * 7) % 600).enumerate() {
            registry.leave(&room, members[i].id());
            registry.leave(&room, members[i].id()); // a second leave changes nothing
            if n % 50 != 0 {
                continue;
            }
            assert_eq!(room.broadcast(&frame, None, &metrics), 600 - n - 1);
            for (j, m) in members.iter().enumerate() {
                queued.clear();
                m.take_all(&mut queued);
                let still_in = !(0..=n).any(|k| (k * 7) % 600 == j);
                assert_eq!(
                    queued.len(),
                    usize::from(still_in),
                    "member {j} after {n} leaves"
                );
            }
        }
        assert!(room.is_empty());
        assert!(registry.get("big").is_none());
    }

    #[test]
    fn rooms_vanish_with_their_last_member_and_watcher_sees_edges() {
        let log = Arc::new(Log::default());
        let registry = Registry::new(Some(log.clone() as Arc<dyn RoomWatcher>));
        let (a, b) = (member(1), member(2));
        let red = registry.join("red", &a).expect("under the cap");
        registry.join("red", &b).expect("under the cap");
        assert_eq!(registry.room_count(), 1);
        registry.leave(&red, a.id());
        assert_eq!(red.len(), 1);
        registry.leave(&red, b.id());
        assert_eq!(registry.room_count(), 0);
        assert!(registry.get("red").is_none());
        let again = registry.join("red", &a).expect("under the cap");
        assert!(!Arc::ptr_eq(&again, &red));
        assert_eq!(*log.0.lock().unwrap(), vec!["+red", "-red", "+red"]);
    }
}
