//! A connection's bounded outbound ring: what fan-out pushes into and the session's writer drains.
//!
//! Many publishers push at once from any worker thread and exactly one session task pops, so the
//! queue is crossbeam's lock-free `SegQueue`. Its capacity is not reserved up front (an idle
//! connection holds no slots); the bound is enforced by one atomic word counting queued frames
//! and bytes together, so a push costs one `fetch_add`, one queue push and one flag swap.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};

use bytes::Bytes;
use crossbeam_queue::SegQueue;
use tokio::sync::Notify;

use crate::metrics::Metrics;

/// Identifies one WebSocket session on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// What happens when a push finds the ring full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SlowConsumer {
    /// Close the connection with 1008 "slow consumer".
    Close,
    /// Drop the frame for that recipient and count it.
    Drop,
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_frames: u64,
    pub max_bytes: u64,
    pub policy: SlowConsumer,
}

/// The pending word packs the frame count above `BYTE_BITS` bits of byte count.
const BYTE_BITS: u32 = 40;
const BYTE_MASK: u64 = (1 << BYTE_BITS) - 1;
const ONE_FRAME: u64 = 1 << BYTE_BITS;

const OPEN: u8 = 0;
/// Closed because the consumer fell behind: queued frames are discarded, 1008 is sent.
const SLOW: u8 = 1;
/// Closed by the session itself: nothing more is accepted, queued frames still go out.
const DONE: u8 = 2;

pub struct Outbox {
    id: ConnId,
    queue: SegQueue<Bytes>,
    pending: AtomicU64,
    /// True while a wake-up is owed or the writer is busy: pushers notify only on false → true.
    scheduled: AtomicBool,
    state: AtomicU8,
    wake: Notify,
    limits: Limits,
}

/// Outcome of one push, for the caller's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    Dropped,
    Closed,
}

impl Outbox {
    pub fn new(id: ConnId, limits: Limits) -> Self {
        Self {
            id,
            queue: SegQueue::new(),
            pending: AtomicU64::new(0),
            scheduled: AtomicBool::new(false),
            state: AtomicU8::new(OPEN),
            wake: Notify::new(),
            limits,
        }
    }

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
                        self.wake.notify_one();
                    }
                    Pushed::Closed
                }
            };
        }
        self.queue.push(frame.clone());
        self.wake();
        Pushed::Queued
    }

    /// Queues a control frame (ping, pong, close) outside the data bound: they are tiny, few,
    /// and must get through to end a connection cleanly.
    pub fn push_control(&self, frame: Bytes) {
        self.pending
            .fetch_add(ONE_FRAME | frame.len() as u64, Ordering::AcqRel);
        self.queue.push(frame);
        self.wake();
    }

    /// Makes sure the writer runs soon; costs one swap when a wake-up is already owed.
    pub fn wake(&self) {
        if !self.scheduled.swap(true, Ordering::AcqRel) {
            self.wake.notify_one();
        }
    }

    /// Resolves when there may be something to write or the outbox was closed as slow.
    pub async fn notified(&self) {
        self.wake.notified().await
    }

    /// Called by the writer before it pops: from here on a push must wake it again. The swap
    /// pairs with the pushers' swap so a frame is either seen by the coming pops or re-notifies.
    pub fn begin_drain(&self) {
        self.scheduled.swap(false, Ordering::AcqRel);
    }

    /// Takes the next queued frame, releasing its share of the bound.
    pub fn pop(&self) -> Option<Bytes> {
        let frame = self.queue.pop()?;
        self.pending
            .fetch_sub(ONE_FRAME | frame.len() as u64, Ordering::AcqRel);
        Some(frame)
    }

    /// Refuses further pushes; what is queued still goes out.
    pub fn finish(&self) {
        let _ = self
            .state
            .compare_exchange(OPEN, DONE, Ordering::AcqRel, Ordering::Acquire);
    }

    pub fn is_slow(&self) -> bool {
        self.state.load(Ordering::Acquire) == SLOW
    }

    /// Drops everything queued (a slow consumer will never read it).
    pub fn discard(&self) {
        while self.pop().is_some() {}
    }

    /// Frames and bytes queued right now.
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
