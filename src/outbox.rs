//! A connection's bounded outbound ring: what fan-out pushes into and the session's writer drains.
//!
//! Many publishers push from any worker thread and exactly one session task drains, taking
//! everything queued at once. The ring is a `VecDeque` behind a `std::sync::Mutex`: a push holds
//! the lock for one `push_back`, and the writer swaps the whole deque out in one step, which
//! leaves an idle connection's outbox holding no storage at all. crossbeam's `SegQueue`, used
//! before, was a few ns cheaper per push into an outbox in cache, dearer across 10,000 outboxes,
//! and kept a 1.2 KiB block plus 256 B of padding per connection (RESULTS.md has the figures).
//! Capacity is not reserved up front; the bound is one atomic word counting queued frames and
//! bytes together, so a push costs one `fetch_add`, one short lock and one flag swap.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::Poll;

use bytes::Bytes;
use futures_util::task::AtomicWaker;

use crate::metrics::Metrics;

/// Identifies one WebSocket session on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// What happens when a push finds the ring full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlowConsumer {
    /// Close the connection with 1008 "slow consumer".
    Close,
    /// Drop the frame for that recipient and count it.
    Drop,
}

/// The bound on one outbox and what happens past it.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Frames pending (queued or taken and not yet released) at most.
    pub max_frames: u64,
    /// Bytes pending at most.
    pub max_bytes: u64,
    /// What a push past either bound does.
    pub policy: SlowConsumer,
}

/// The pending word packs the frame count above `BYTE_BITS` bits of byte count.
const BYTE_BITS: u32 = 40;
const BYTE_MASK: u64 = (1 << BYTE_BITS) - 1;
const ONE_FRAME: u64 = 1 << BYTE_BITS;
/// The largest frame bound a config may set. The count field has 24 bits; pushers add before
/// they check, so 16× headroom keeps concurrent pushes from carrying into nothing.
pub const MAX_FRAMES: u64 = 1 << 20;
/// The largest byte bound a config may set (4 GiB), far below the 40-bit field's 1 TiB.
pub const MAX_BYTES: u64 = 1 << 32;

const OPEN: u8 = 0;
/// Closed because the consumer fell behind: queued frames are discarded, 1008 is sent.
const SLOW: u8 = 1;
/// Closed by the session itself: nothing more is accepted, queued frames still go out.
const DONE: u8 = 2;
/// The user was revoked by the server API: nothing more is accepted, the session closes 4003.
const REVOKED: u8 = 3;

/// One connection's bounded queue of outbound frames: pushed into by fan-out on any thread,
/// drained by its session alone.
///
/// What must stay true: a frame counts against the bound from its push until the writer
/// releases it; a push past the bound either drops that frame (policy `Drop`) or marks the
/// outbox slow and wakes the session to close it (policy `Close`), and never blocks the pusher;
/// after [`finish`](Self::finish) nothing more is accepted.
pub struct Outbox {
    id: ConnId,
    /// Frames pushed and not yet taken by the writer. Never held across anything but a
    /// `push_back` or a swap.
    queue: Mutex<VecDeque<Bytes>>,
    /// Frames and bytes pushed and not yet released by the writer (queued or taken).
    pending: AtomicU64,
    /// True while a wake-up is owed or the writer is busy: pushers notify only on false → true.
    scheduled: AtomicBool,
    state: AtomicU8,
    /// A wake-up was sent and the session has not seen it yet (a permit, like `Notify`'s).
    signaled: AtomicBool,
    /// The session task's waker. Exactly one task waits, so one slot replaces `Notify`'s
    /// locked waiter list, which cost a lock on every register and drop.
    waker: AtomicWaker,
    limits: Limits,
}

/// Outcome of one push, for the caller's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// The frame will be written.
    Queued,
    /// The outbox was full and the policy is `Drop`: this frame is lost for this recipient.
    Dropped,
    /// The outbox is closed (finished, or slow under policy `Close`).
    Closed,
}

impl Outbox {
    /// An empty, open outbox for connection `id`; it allocates nothing until the first push.
    pub fn new(id: ConnId, limits: Limits) -> Self {
        Self {
            id,
            queue: Mutex::new(VecDeque::new()),
            pending: AtomicU64::new(0),
            scheduled: AtomicBool::new(false),
            state: AtomicU8::new(OPEN),
            signaled: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            limits,
        }
    }

    /// The connection this outbox belongs to.
    pub fn id(&self) -> ConnId {
        self.id
    }

    /// Queues a clone of `frame` (a reference-count bump, never a copy of the bytes).
    pub fn push(&self, frame: &Bytes, metrics: &Metrics) -> Pushed {
        if self.state.load(Ordering::Acquire) != OPEN {
            return Pushed::Closed;
        }
        let add = ONE_FRAME | frame.len() as u64;
        let before = self.pending.fetch_add(add, Ordering::AcqRel);
        let frames = (before >> BYTE_BITS) + 1;
        let bytes = (before & BYTE_MASK) + frame.len() as u64;
        if frames > self.limits.max_frames || bytes > self.limits.max_bytes {
            self.pending.fetch_sub(add, Ordering::AcqRel);
            return match self.limits.policy {
                SlowConsumer::Drop => {
                    metrics.add_dropped(1);
                    Pushed::Dropped
                }
                SlowConsumer::Close => {
                    if self
                        .state
                        .compare_exchange(OPEN, SLOW, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                    {
                        metrics.add_slow_closed();
                        self.signal();
                    }
                    Pushed::Closed
                }
            };
        }
        {
            let mut queue = self.queue();
            // Checked again under the lock: `close_with` changes the state and queues the close
            // frame under this same lock, so no data frame can land behind the close.
            if self.state.load(Ordering::Acquire) != OPEN {
                drop(queue);
                self.pending.fetch_sub(add, Ordering::AcqRel);
                return Pushed::Closed;
            }
            queue.push_back(frame.clone());
        }
        self.wake();
        Pushed::Queued
    }

    /// Queues the server's own ping. It counts against the bound like any frame but is never
    /// refused: the session keeps at most one ping outstanding, so this cannot grow.
    pub fn push_ping(&self, frame: Bytes) {
        self.pending
            .fetch_add(ONE_FRAME | frame.len() as u64, Ordering::AcqRel);
        self.queue().push_back(frame);
        self.wake();
    }

    /// Refuses every later push and queues `close` as the last frame. The close is never
    /// refused (it must get out to end the connection cleanly) and is queued at most once per
    /// session; a frame pushed concurrently lands before it or not at all.
    pub fn close_with(&self, close: Bytes) {
        {
            let mut queue = self.queue();
            // SLOW stays SLOW: the session has already discarded what was queued.
            let _ = self
                .state
                .compare_exchange(OPEN, DONE, Ordering::AcqRel, Ordering::Acquire);
            self.pending
                .fetch_add(ONE_FRAME | close.len() as u64, Ordering::AcqRel);
            queue.push_back(close);
        }
        self.wake();
    }

    /// A panic elsewhere cannot leave the deque half-updated (a `push_back`, an append or a
    /// swap is all that happens under the lock), so a poisoned lock is still good to use.
    fn queue(&self) -> MutexGuard<'_, VecDeque<Bytes>> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes sure the writer runs soon; costs one swap when a wake-up is already owed.
    pub fn wake(&self) {
        if !self.scheduled.swap(true, Ordering::AcqRel) {
            self.signal();
        }
    }

    fn signal(&self) {
        self.signaled.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Resolves when there may be something to write or the outbox was closed as slow. Only
    /// the session task may wait here.
    pub async fn notified(&self) {
        poll_fn(|cx| {
            if self.signaled.swap(false, Ordering::AcqRel) {
                return Poll::Ready(());
            }
            self.waker.register(cx.waker());
            // A signal sent before the registration found no waker to wake: look again.
            if self.signaled.swap(false, Ordering::AcqRel) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }

    /// Called by the writer before it takes: from here on a push must wake it again. The swap
    /// pairs with the pushers' swap so a frame is either seen by the coming take or re-notifies.
    pub fn begin_drain(&self) {
        self.scheduled.swap(false, Ordering::AcqRel);
    }

    /// Moves everything queued to the back of `into`, in order. The frames still count against
    /// the bound until the writer [`release`](Self::release)s them.
    pub fn take_all(&self, into: &mut VecDeque<Bytes>) {
        let mut queue = self.queue();
        if into.is_empty() {
            std::mem::swap(into, &mut *queue);
        } else {
            into.append(&mut queue);
        }
        if queue.capacity() > 0 {
            // The writer's emptied deque came back in the swap; an idle outbox holds nothing.
            *queue = VecDeque::new();
        }
    }

    /// The writer is done with `frame` (it is in a batch or discarded): it stops counting
    /// against the bound.
    pub fn release(&self, frame: &Bytes) {
        self.pending
            .fetch_sub(ONE_FRAME | frame.len() as u64, Ordering::AcqRel);
    }

    /// Refuses further pushes; what is queued still goes out.
    pub fn finish(&self) {
        let _ = self
            .state
            .compare_exchange(OPEN, DONE, Ordering::AcqRel, Ordering::Acquire);
    }

    /// True once a push found the outbox full under policy `Close`.
    pub fn is_slow(&self) -> bool {
        self.state.load(Ordering::Acquire) == SLOW
    }

    /// Refuses further pushes and wakes the session to close the connection as revoked.
    /// Called from any thread (the server API); a no-op once the outbox is closed.
    pub fn revoke(&self) {
        if self
            .state
            .compare_exchange(OPEN, REVOKED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.signal();
        }
    }

    /// True once [`revoke`](Self::revoke) took effect.
    pub fn is_revoked(&self) -> bool {
        self.state.load(Ordering::Acquire) == REVOKED
    }

    /// Drops everything queued (a slow consumer will never read it).
    pub fn discard(&self) {
        let queued = std::mem::take(&mut *self.queue());
        for frame in &queued {
            self.release(frame);
        }
    }

    /// Frames and bytes pushed and not yet released: still queued, or taken by the writer and
    /// not yet in a batch. This is what the bound is checked against.
    pub fn pending(&self) -> (u64, u64) {
        let word = self.pending.load(Ordering::Acquire);
        (word >> BYTE_BITS, word & BYTE_MASK)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outbox(policy: SlowConsumer) -> Outbox {
        Outbox::new(
            ConnId(1),
            Limits {
                max_frames: 3,
                max_bytes: 100,
                policy,
            },
        )
    }

    #[test]
    fn bounded_in_frames_and_bytes() {
        let m = Metrics::default();
        let ob = outbox(SlowConsumer::Drop);
        let small = Bytes::from_static(b"abc");
        for _ in 0..3 {
            assert_eq!(ob.push(&small, &m), Pushed::Queued);
        }
        assert_eq!(ob.push(&small, &m), Pushed::Dropped);
        assert_eq!(ob.pending(), (3, 9));
        ob.discard();
        assert_eq!(ob.pending(), (0, 0));
        let big = Bytes::from(vec![0u8; 101]);
        assert_eq!(ob.push(&big, &m), Pushed::Dropped);
        assert_eq!(m.snapshot().dropped, 2);
    }

    #[test]
    fn taken_frames_keep_order_and_count_until_released_and_the_outbox_keeps_no_storage() {
        let m = Metrics::default();
        let ob = outbox(SlowConsumer::Drop);
        let (a, b) = (Bytes::from_static(b"a"), Bytes::from_static(b"bb"));
        ob.push(&a, &m);
        ob.push(&b, &m);
        let mut taken = VecDeque::new();
        ob.take_all(&mut taken);
        assert_eq!(taken, [a.clone(), b.clone()]);
        assert_eq!(
            ob.queue().capacity(),
            0,
            "an emptied outbox must hold no storage"
        );
        assert_eq!(
            ob.pending(),
            (2, 3),
            "taken frames still count against the bound"
        );
        assert_eq!(ob.push(&a, &m), Pushed::Queued);
        assert_eq!(ob.push(&a, &m), Pushed::Dropped);
        ob.take_all(&mut taken);
        assert_eq!(taken, [a.clone(), b, a]);
        assert_eq!(ob.queue().capacity(), 0);
        for frame in &taken {
            ob.release(frame);
        }
        assert_eq!(ob.pending(), (0, 0));
    }

    /// Pushers on other threads racing `close_with`: whatever they got in is queued before the
    /// close frame, never after it.
    #[test]
    fn nothing_is_queued_behind_the_close_frame() {
        let close = Bytes::from_static(b"close");
        for _ in 0..200 {
            let m = Metrics::default();
            let ob = Outbox::new(
                ConnId(1),
                Limits {
                    max_frames: 1 << 20,
                    max_bytes: 1 << 30,
                    policy: SlowConsumer::Close,
                },
            );
            let start = std::sync::Barrier::new(3);
            std::thread::scope(|scope| {
                for _ in 0..2 {
                    scope.spawn(|| {
                        start.wait();
                        let data = Bytes::from_static(b"data");
                        while ob.push(&data, &m) == Pushed::Queued {}
                    });
                }
                start.wait();
                ob.close_with(close.clone());
            });
            let mut taken = VecDeque::new();
            ob.take_all(&mut taken);
            assert_eq!(
                taken.back(),
                Some(&close),
                "a data frame followed the close"
            );
        }
    }

    #[test]
    fn close_policy_marks_slow_once() {
        let m = Metrics::default();
        let ob = outbox(SlowConsumer::Close);
        let big = Bytes::from(vec![0u8; 101]);
        assert_eq!(ob.push(&big, &m), Pushed::Closed);
        assert!(ob.is_slow());
        assert_eq!(ob.push(&Bytes::from_static(b"x"), &m), Pushed::Closed);
        assert_eq!(m.snapshot().slow_closed, 1);
    }
}
