//! Rooms and the registry that finds them.
//!
//! Fan-out is the hot path and membership changes are rare next to it, so each room's member
//! list is an immutable snapshot behind `ArcSwap`: a broadcast is one atomic load and a walk of
//! a slice, with no lock. Joins and leaves copy the list under their shard's mutex, which also
//! guards the shard's map, so "first member arrived" and "last member left" are decided exactly
//! once and in order per room (the backplane subscribes and unsubscribes on those edges).

use std::borrow::Borrow;
use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwap;
use bytes::Bytes;

use crate::metrics::Metrics;
use crate::outbox::{ConnId, Outbox, Pushed};

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
    members: ArcSwap<Vec<Member>>,
}

impl Room {
    fn new(id: RoomId) -> Self {
        Self {
            id,
            members: ArcSwap::from_pointee(Vec::new()),
        }
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
        let members = self.members.load();
        let mut queued = 0;
        for member in members.iter() {
            if Some(member.id) == skip {
                continue;
            }
            if member.outbox.push(frame, metrics) == Pushed::Queued {
                queued += 1;
            }
        }
        metrics.add_deliveries(queued as u64);
        queued
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

/// The node is at its room cap: a join that would create a room is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the node holds its maximum of {0} rooms")]
pub struct RoomsFull(pub usize);

/// All rooms with at least one member on this node; a cheap-to-clone handle.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

type Shard = Mutex<HashMap<RoomId, Arc<Room>>>;

struct Inner {
    shards: Box<[Shard]>,
    hasher: RandomState,
    rooms: AtomicUsize,
    max_rooms: usize,
    watcher: Option<Arc<dyn RoomWatcher>>,
}

/// Enough shards that two cores (or sixty-four) rarely meet on one mutex during join storms.
pub const SHARDS: usize = 64;

impl Registry {
    /// An empty registry with no room cap; `watcher` hears every room's first join and last
    /// leave.
    pub fn new(watcher: Option<Arc<dyn RoomWatcher>>) -> Self {
        Self::bounded(watcher, usize::MAX)
    }

    /// An empty registry that holds at most `max_rooms` rooms.
    pub fn bounded(watcher: Option<Arc<dyn RoomWatcher>>, max_rooms: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
                hasher: RandomState::new(),
                rooms: AtomicUsize::new(0),
                max_rooms,
                watcher,
            }),
        }
    }

    fn shard(&self, name: &str) -> MutexGuard<'_, HashMap<RoomId, Arc<Room>>> {
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
        self.shard(name).get(name).cloned()
    }

    /// Adds `member` to room `name`, creating the room if needed, unless that would take the
    /// node past its room cap. The caller guarantees the member does not hold the room already.
    pub fn join(&self, name: &str, outbox: &Arc<Outbox>) -> Result<Arc<Room>, RoomsFull> {
        let mut map = self.shard(name);
        let room = match map.get(name) {
            Some(room) => Arc::clone(room),
            None => {
                // Reserved in one step, so racing joins in other shards cannot pass the cap.
                let max = self.inner.max_rooms;
                self.inner
                    .rooms
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                        (n < max).then_some(n + 1)
                    })
                    .map_err(|_| RoomsFull(max))?;
                let room = Arc::new(Room::new(RoomId::new(name)));
                map.insert(room.id.clone(), Arc::clone(&room));
                if let Some(watcher) = &self.inner.watcher {
                    watcher.opened(&room.id);
                }
                room
            }
        };
        let current = room.members.load();
        let mut next = Vec::with_capacity(current.len() + 1);
        next.extend(current.iter().cloned());
        next.push(Member {
            id: outbox.id(),
            outbox: Arc::clone(outbox),
        });
        room.members.store(Arc::new(next));
        Ok(room)
    }

    /// Removes `member` from `room`; the room disappears with its last member.
    pub fn leave(&self, room: &Arc<Room>, member: ConnId) {
        let mut map = self.shard(room.id.as_str());
        let current = room.members.load();
        let next: Vec<Member> = current.iter().filter(|m| m.id != member).cloned().collect();
        let now_empty = next.is_empty();
        room.members.store(Arc::new(next));
        if now_empty {
            let same = map
                .get(room.id.as_str())
                .is_some_and(|held| Arc::ptr_eq(held, room));
            if same {
                map.remove(room.id.as_str());
                self.inner.rooms.fetch_sub(1, Ordering::Relaxed);
                if let Some(watcher) = &self.inner.watcher {
                    watcher.closed(&room.id);
                }
            }
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::{Limits, SlowConsumer};

    fn member(id: u64) -> Arc<Outbox> {
        Arc::new(Outbox::new(
            ConnId(id),
            Limits {
                max_frames: 16,
                max_bytes: 1 << 20,
                policy: SlowConsumer::Close,
            },
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
