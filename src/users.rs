//! Connections by user (`sub`), for the per-user cap and for revocation.
//!
//! 64 shards of `Mutex<HashMap>`, like the room registry: a connection is added once, when it
//! proves who it is, and removed once, when it ends, so these locks are taken twice per
//! connection, never per message.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::outbox::{ConnId, Outbox};

const SHARDS: usize = 64;

type Shard = HashMap<Arc<str>, Vec<Arc<Outbox>>>;

/// The node's authenticated connections, by user.
pub(crate) struct Users {
    shards: Vec<Mutex<Shard>>,
    hasher: RandomState,
    max_per_user: u32,
}

/// One connection counted for its user; removed on drop.
pub(crate) struct UserSlot {
    users: Arc<Users>,
    user: Arc<str>,
    conn: ConnId,
}

/// The user already holds its maximum of connections on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many connections for this user")]
pub(crate) struct TooMany;

impl Users {
    pub(crate) fn new(max_per_user: u32) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            max_per_user,
        }
    }

    fn shard(&self, user: &str) -> MutexGuard<'_, Shard> {
        let index = self.hasher.hash_one(user) as usize % SHARDS;
        // Each update under the lock is one push or one removal: a poisoned map is consistent.
        self.shards[index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts `outbox`'s connection for `user`, unless the user is at the cap.
    pub(crate) fn add(
        self: &Arc<Self>,
        user: &Arc<str>,
        outbox: &Arc<Outbox>,
    ) -> Result<UserSlot, TooMany> {
        let mut shard = self.shard(user);
        let held = shard.entry(Arc::clone(user)).or_default();
        if self.max_per_user > 0 && held.len() >= self.max_per_user as usize {
            return Err(TooMany);
        }
        held.push(Arc::clone(outbox));
        Ok(UserSlot {
            users: Arc::clone(self),
            user: Arc::clone(user),
            conn: outbox.id(),
        })
    }

    /// Marks every connection of `user` on this node revoked; their sessions close them with
    /// 4003. Returns how many there were.
    pub(crate) fn revoke(&self, user: &str) -> usize {
        let shard = self.shard(user);
        let held = shard.get(user).map_or(&[][..], Vec::as_slice);
        for outbox in held {
            outbox.revoke();
        }
        held.len()
    }

    fn remove(&self, user: &str, conn: ConnId) {
        let mut shard = self.shard(user);
        if let Some(held) = shard.get_mut(user) {
            held.retain(|outbox| outbox.id() != conn);
            if held.is_empty() {
                shard.remove(user);
            }
        }
    }
}

impl UserSlot {
    /// The user this connection is counted for.
    pub(crate) fn user(&self) -> &Arc<str> {
        &self.user
    }
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        self.users.remove(&self.user, self.conn);
    }
}
