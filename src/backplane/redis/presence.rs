//! Presence across nodes: how many members a room has on all nodes together.
//!
//! Each node writes its own count of each room into the room's presence hash
//! (`<prefix>__roomcast:presence:<room>`; field: the node's id; value: `count:expires`, in
//! Redis's clock, ms): within a second for rooms whose count changed, and for every room every
//! 10 s. A node that dies stops refreshing, so its counts stop counting [`TTL`] (30 s) after
//! its last write: a read drops fields past their time, and the key itself expires 30 s after
//! the last write by any node. A question reads the hash once (a script sums the live fields
//! of the other nodes) and the asking node adds its own count, exact, to that: what other
//! nodes hold is at most about a second old.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::room::RoomId;

/// How long a node's counts count without a refresh.
pub(super) const TTL: Duration = Duration::from_secs(30);
/// Every room's count is written again this often, well inside [`TTL`].
const REFRESH_ALL: Duration = Duration::from_secs(10);
/// How often changed counts are written.
pub(super) const PUSH_EVERY: Duration = Duration::from_secs(1);

/// Writes one node's count of a room. KEYS: the room's presence hash. ARGV: the node's id,
/// its count (0 removes its field), the time to live in ms.
pub(super) const SET: &str = r#"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
if tonumber(ARGV[2]) == 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ':' .. (now + tonumber(ARGV[3])))
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return 0
"#;

/// The members of a room on every node but one, counting only fields still in their time
/// (and dropping the others). KEYS: the room's presence hash. ARGV: the asking node's id.
pub(super) const GET: &str = r#"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local all = redis.call('HGETALL', KEYS[1])
local sum = 0
for i = 1, #all, 2 do
  local field, value = all[i], all[i + 1]
  local sep = string.find(value, ':', 1, true)
  local count = sep and tonumber(string.sub(value, 1, sep - 1))
  local expires = sep and tonumber(string.sub(value, sep + 1))
  if not count or not expires or expires <= now then
    redis.call('HDEL', KEYS[1], field)
  elseif field ~= ARGV[1] then
    sum = sum + count
  end
end
return sum
"#;

/// What this node last wrote to Redis, to write only what changed.
#[derive(Debug, Default)]
pub(super) struct Book {
    written: HashMap<RoomId, usize>,
    /// When every room was last written (`None`: never on this connection).
    all_at: Option<Instant>,
}

impl Book {
    /// Forgets what was written: a new connection may be to a Redis that lost it.
    pub(super) fn forget(&mut self) {
        self.written.clear();
        self.all_at = None;
    }

    /// The writes due at `now`, given every local room's count now: rooms whose count changed
    /// (a room no longer listed has 0), or all of them when the last full write is 10 s old.
    /// Taken as written: a write that fails ends the connection, and [`forget`](Self::forget)
    /// follows.
    pub(super) fn due(
        &mut self,
        counts: Vec<(RoomId, usize)>,
        now: Instant,
    ) -> Vec<(RoomId, usize)> {
        let all = self
            .all_at
            .is_none_or(|at| now.saturating_duration_since(at) >= REFRESH_ALL);
        if all {
            self.all_at = Some(now);
        }
        let mut due = Vec::new();
        let mut current: HashMap<RoomId, usize> = HashMap::with_capacity(counts.len());
        // A room held open without members (a resume's pin) has none to count.
        for (room, count) in counts.into_iter().filter(|(_, count)| *count > 0) {
            if all || self.written.get(&room) != Some(&count) {
                due.push((room.clone(), count));
            }
            current.insert(room, count);
        }
        for room in self.written.keys() {
            if !current.contains_key(room) {
                due.push((room.clone(), 0));
            }
        }
        self.written = current;
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(list: &[(&str, usize)]) -> Vec<(RoomId, usize)> {
        list.iter().map(|(r, n)| (RoomId::new(r), *n)).collect()
    }

    fn names(due: &[(RoomId, usize)]) -> Vec<(String, usize)> {
        let mut v: Vec<_> = due
            .iter()
            .map(|(r, n)| (r.as_str().to_owned(), *n))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn writes_what_changed_what_left_and_everything_every_ten_seconds() {
        let mut book = Book::default();
        let t0 = Instant::now();
        let first = book.due(counts(&[("a", 2), ("b", 1), ("pinned", 0)]), t0);
        assert_eq!(names(&first), [("a".into(), 2), ("b".into(), 1)]);
        let s = Duration::from_secs(1);
        assert!(book.due(counts(&[("a", 2), ("b", 1)]), t0 + s).is_empty());
        let changed = book.due(counts(&[("a", 3)]), t0 + 2 * s);
        assert_eq!(
            names(&changed),
            [("a".into(), 3), ("b".into(), 0)],
            "b left"
        );
        assert!(book.due(counts(&[("a", 3)]), t0 + 3 * s).is_empty());
        let refresh = book.due(counts(&[("a", 3)]), t0 + REFRESH_ALL);
        assert_eq!(names(&refresh), [("a".into(), 3)]);
        book.forget();
        assert_eq!(
            names(&book.due(counts(&[("a", 3)]), t0 + REFRESH_ALL + s)),
            [("a".into(), 3)]
        );
    }
}
