//! A bound in messages and bytes on a queue that one side fills and another drains.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counts what is queued and refuses what would pass either bound. Adding is one `fetch_add`
/// per counter (and two `fetch_sub`s to undo a refusal): the publishing sessions run on every
/// worker thread, and a lock here would be taken once per message.
#[derive(Debug)]
pub(crate) struct Quota {
    messages: AtomicU64,
    bytes: AtomicU64,
    max_messages: u64,
    max_bytes: u64,
}

impl Quota {
    pub(crate) fn new(max_messages: u64, max_bytes: u64) -> Self {
        Self {
            messages: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            max_messages,
            max_bytes,
        }
    }

    /// Takes room for one message of `bytes`, or refuses and takes nothing.
    pub(crate) fn try_take(&self, bytes: u64) -> bool {
        let messages = self.messages.fetch_add(1, Ordering::AcqRel);
        let before = self.bytes.fetch_add(bytes, Ordering::AcqRel);
        if messages >= self.max_messages || before + bytes > self.max_bytes {
            self.give_back(bytes);
            return false;
        }
        true
    }

    /// Gives back what [`try_take`](Self::try_take) took for one message of `bytes`.
    pub(crate) fn give_back(&self, bytes: u64) {
        self.messages.fetch_sub(1, Ordering::AcqRel);
        self.bytes.fetch_sub(bytes, Ordering::AcqRel);
    }

    /// Messages and bytes queued now.
    pub(crate) fn used(&self) -> (u64, u64) {
        (
            self.messages.load(Ordering::Acquire),
            self.bytes.load(Ordering::Acquire),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_in_messages_and_bytes_and_a_refusal_takes_nothing() {
        let quota = Quota::new(2, 100);
        assert!(quota.try_take(60));
        assert!(!quota.try_take(41), "bytes bound");
        assert_eq!(quota.used(), (1, 60));
        assert!(quota.try_take(40));
        assert!(!quota.try_take(0), "message bound");
        quota.give_back(60);
        assert_eq!(quota.used(), (1, 40));
    }
}
