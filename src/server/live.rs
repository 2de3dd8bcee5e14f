//! The node's live sessions: stopping the node reaches every one of them, and the drain
//! learns when the last has ended.
//!
//! Why a set rather than a stop signal each session waits on: a wait kept by every session
//! cost 88 bytes of its task (an owned cancellation future and a drain receiver), paid by
//! every idle connection for an event that happens once in the node's life. An entry here is
//! one pointer (the outbox, hashed by its connection id; a map from id to outbox took twice
//! that), about 14 bytes with the table's slack, and a session hears of the stop through the
//! outbox wake-up it waits on anyway. The shard locks are taken twice per connection (arrival and end) and once per
//! shard when the node stops, never per message.

use std::borrow::Borrow;
use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;

use crate::outbox::{ConnId, Outbox};

const SHARDS: usize = 64;

/// A live session's outbox, equal to another and hashed as its connection id, so that the set
/// can be searched by id.
struct Entry(Arc<Outbox>);

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.0.id() == other.0.id()
    }
}

impl Eq for Entry {}

impl Hash for Entry {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.id_ref().hash(state);
    }
}

impl Borrow<ConnId> for Entry {
    fn borrow(&self) -> &ConnId {
        self.0.id_ref()
    }
}

/// The outboxes of the node's sessions, by connection.
pub(crate) struct Live {
    shards: Vec<Mutex<HashSet<Entry>>>,
    stopping: AtomicBool,
    count: AtomicUsize,
    /// Notified when `count` drops to zero.
    emptied: Notify,
}

impl Live {
    pub(crate) fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            stopping: AtomicBool::new(false),
            count: AtomicUsize::new(0),
            emptied: Notify::new(),
        }
    }

    /// Adds a session's outbox. False when the node is already stopping: the session must
    /// begin its close at once, as [`stop_all`](Self::stop_all) may have passed its shard.
    pub(crate) fn insert(&self, outbox: &Arc<Outbox>) -> bool {
        self.count.fetch_add(1, Ordering::AcqRel);
        self.shard(outbox.id()).insert(Entry(Arc::clone(outbox)));
        // After the insert: either `stop_all` found the entry, or it set `stopping` before
        // taking this shard's lock, which the insert took after it.
        !self.stopping.load(Ordering::SeqCst)
    }

    /// Removes a session that ended.
    pub(crate) fn remove(&self, id: ConnId) {
        if self.shard(id).remove(&id) && self.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.emptied.notify_waiters();
        }
    }

    /// Tells every session that the node is stopping (see [`Outbox::stop`]), and every
    /// session that arrives from now on.
    pub(crate) fn stop_all(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        for shard in &self.shards {
            for Entry(outbox) in lock(shard).iter() {
                outbox.stop();
            }
        }
    }

    /// Resolves once no session is left.
    pub(crate) async fn drained(&self) {
        loop {
            let emptied = self.emptied.notified();
            tokio::pin!(emptied);
            // Registered before the count is read, so a last removal in between is not missed.
            emptied.as_mut().enable();
            if self.count.load(Ordering::Acquire) == 0 {
                return;
            }
            emptied.await;
        }
    }

    fn shard(&self, id: ConnId) -> MutexGuard<'_, HashSet<Entry>> {
        // Ids are handed out in sequence, so the remainder spreads them evenly.
        lock(&self.shards[(id.0 % SHARDS as u64) as usize])
    }
}

/// A panic elsewhere cannot leave a map half-updated (each change is one insert or remove).
fn lock<T>(shard: &Mutex<T>) -> MutexGuard<'_, T> {
    shard.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;

    use super::*;
    use crate::outbox::{Limits, SlowConsumer};

    #[tokio::test]
    async fn stopping_reaches_present_and_later_sessions_and_the_drain_waits_for_the_last() {
        let limits = Arc::new(Limits {
            max_frames: 8,
            max_bytes: 1024,
            policy: SlowConsumer::Close,
            direct: true,
            metrics: Arc::default(),
        });
        let live = Live::new();
        let first = Arc::new(Outbox::new(ConnId(1), Arc::clone(&limits)));
        assert!(live.insert(&first));
        live.stop_all();
        assert!(first.is_stopping());
        let late = Arc::new(Outbox::new(ConnId(2), limits));
        assert!(
            !live.insert(&late),
            "a session arriving after the stop is told"
        );
        live.remove(ConnId(1));
        let mut drained = std::pin::pin!(live.drained());
        assert!(drained.as_mut().now_or_never().is_none(), "one left");
        live.remove(ConnId(2));
        assert!(drained.as_mut().now_or_never().is_some());
    }
}
