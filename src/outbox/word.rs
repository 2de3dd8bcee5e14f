//! The ownership word of one connection's socket: who may write to it right now.
//!
//! A frame reaches a socket in one of two ways. A publisher that finds the connection open,
//! nobody writing and nothing queued writes the frame itself (one `write`, no task woken);
//! otherwise the frame is queued and the session writes it. One `AtomicU32` decides which,
//! so a publisher and the session never interleave bytes on the wire:
//!
//! - `LOCK`: someone holds the right to write: a publisher in the middle of one direct write,
//!   or the session.
//! - `PARKED`: the right is the session's. A publisher sets it when it hands over (its write
//!   was partial or would block, or frames were queued while it wrote); the session sets it
//!   when it claims the socket to drain the queue.
//! - `QUEUED`: frames sit in the queue that no writer has taken. Set after the push, so a
//!   frame is either taken by the owner's next drain or seen by its release.
//! - `WANTED`: the session has something of its own to write (a pong) and found a publisher
//!   writing; that publisher hands over as it finishes, even when it took the queue itself.
//! - two bits of state: open, slow, done or revoked. Anything but open keeps the direct path
//!   shut for good, which is what keeps the close frame last.
//! - above them, a hint: where a publisher that claimed the socket to write later (at the end
//!   of its pass) noted the claim in its thread's list, so that its next frames for this
//!   socket find the claim. Set by the claim's compare-and-swap, cleared whenever `LOCK` is;
//!   only the claim's holder may act on it, and it checks the hint against its own list.
//!
//! What must stay true: only the `LOCK` holder writes; the direct path needs the whole word
//! at zero, so nothing queued or half-written is ever overtaken; and whoever drops `LOCK`
//! first checks `QUEUED` (a release never strands a frame with nobody owing a drain).
//!
//! This file uses std alone (loom's atomics under `cfg(loom)`), so the model in `model/`
//! builds it without the rest of the crate.

#[cfg(loom)]
use loom::sync::atomic::{AtomicU32, Ordering};
#[cfg(not(loom))]
use std::sync::atomic::{AtomicU32, Ordering};

const LOCK: u32 = 1;
const PARKED: u32 = 2;
const QUEUED: u32 = 4;
const STATE_SHIFT: u32 = 3;
const STATE_MASK: u32 = 3 << STATE_SHIFT;
const WANTED: u32 = 32;
const HINT_SHIFT: u32 = 6;
const HINT_MASK: u32 = !0 << HINT_SHIFT;
/// The largest place a hint can name; a claim noted further down its list gets none (its
/// later frames are queued, as if claimed by another thread).
const MAX_HINT: usize = (1 << (32 - HINT_SHIFT)) - 1;

/// Where the connection is in its life, as the outbox sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Frames are accepted.
    Open,
    /// A push found the outbox full under policy close: queued frames are discarded, 1008.
    Slow,
    /// Closed by the session: nothing more is accepted, what is queued still goes out.
    Done,
    /// The user was revoked by the server API: the session closes 4003.
    Revoked,
}

impl State {
    fn bits(self) -> u32 {
        let n = match self {
            Self::Open => 0,
            Self::Slow => 1,
            Self::Done => 2,
            Self::Revoked => 3,
        };
        n << STATE_SHIFT
    }

    fn of(word: u32) -> Self {
        match (word & STATE_MASK) >> STATE_SHIFT {
            0 => Self::Open,
            1 => Self::Slow,
            2 => Self::Done,
            _ => Self::Revoked,
        }
    }
}

/// What [`Word::claim`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The session holds the right to write.
    Owned,
    /// A publisher is mid-write; it hands the right over, and wakes the session, as it ends.
    Busy,
}

/// One connection's ownership word (see the module docs).
#[derive(Debug)]
pub struct Word(AtomicU32);

impl Default for Word {
    fn default() -> Self {
        Self::new()
    }
}

impl Word {
    /// Open, nobody writing, nothing queued.
    pub fn new() -> Self {
        Self(AtomicU32::new(0))
    }

    /// Publisher: takes the right to write when the connection is open, nobody writes and
    /// nothing is queued. Acquire pairs with the last owner's release, so its bytes (and any
    /// state change before it) are seen.
    pub fn try_direct(&self) -> bool {
        self.0
            .compare_exchange(0, LOCK, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    /// Publisher deferring its write to the end of its pass: like
    /// [`try_direct`](Self::try_direct), and leaves `at`, the claim's place in the thread's
    /// list, as the hint.
    pub fn try_claim(&self, at: usize) -> bool {
        let hint = if at <= MAX_HINT {
            (at as u32) << HINT_SHIFT
        } else {
            0
        };
        self.0
            .compare_exchange(0, LOCK | hint, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    /// The hint: the place in its thread's list of the claim holding the socket, or a stale or
    /// zero value. Meaningful only to the thread holding the claim, which finds it there.
    pub fn claim_hint(&self) -> usize {
        (self.0.load(Ordering::Relaxed) >> HINT_SHIFT) as usize
    }

    /// Publisher whose direct write went out whole: gives the right up, or hands it to the
    /// session when something was queued meanwhile or the connection stopped being open (the
    /// session then sees its close through). True when the session must be woken.
    pub fn finish_direct(&self) -> bool {
        let mut s = self.0.load(Ordering::Acquire);
        loop {
            if s & (QUEUED | WANTED | STATE_MASK) != 0 {
                self.0.fetch_or(PARKED, Ordering::AcqRel);
                return true;
            }
            match self.0.compare_exchange_weak(
                s,
                s & !(LOCK | HINT_MASK),
                Ordering::Release,
                Ordering::Acquire,
            ) {
                Ok(_) => return false,
                Err(now) => s = now,
            }
        }
    }

    /// Publisher whose direct write was partial or would block, after it put the rest at the
    /// front of the queue: the right (still held) becomes the session's. Wake the session.
    pub fn park(&self) {
        self.0.fetch_or(PARKED | QUEUED, Ordering::AcqRel);
    }

    /// Anyone, after pushing a frame into the queue: true when the caller must wake the
    /// session, because nobody holds the right to write and no wake-up is owed yet. (A holder
    /// sees `QUEUED` before it lets go; `QUEUED` without `LOCK` means a pusher already woke it.)
    pub fn flag_queued(&self) -> bool {
        let prev = self.0.fetch_or(QUEUED, Ordering::AcqRel);
        prev & (LOCK | QUEUED) == 0
    }

    /// Session: takes the right to write, or finds it already its own. When a publisher is
    /// mid-write this leaves `WANTED` set, so that publisher hands over as it finishes.
    pub fn claim(&self) -> Claim {
        let mut s = self.0.load(Ordering::Acquire);
        loop {
            if s & LOCK != 0 {
                if s & PARKED != 0 {
                    return Claim::Owned;
                }
                let prev = self.0.fetch_or(WANTED, Ordering::AcqRel);
                if prev & LOCK != 0 {
                    return if prev & PARKED != 0 {
                        Claim::Owned
                    } else {
                        Claim::Busy
                    };
                }
                // The publisher let go between the load and the flag: try again.
                s = prev | WANTED;
                continue;
            }
            match self.0.compare_exchange_weak(
                s,
                (s | LOCK | PARKED) & !WANTED,
                Ordering::Acquire,
                Ordering::Acquire,
            ) {
                Ok(_) => return Claim::Owned,
                Err(now) => s = now,
            }
        }
    }

    /// Publisher holding a claim it has not written yet: true when another frame may be owed
    /// behind the claimed one without the queue, because the connection is still open and
    /// nothing was queued since the claim. The claim's frames are written before the queue, so
    /// once anything is queued (perhaps by the same publisher, run on another thread a step
    /// earlier) every later frame must queue behind it.
    pub fn appendable(&self) -> bool {
        self.0.load(Ordering::Acquire) & (QUEUED | STATE_MASK) == 0
    }

    /// True when frames were queued that no writer has taken yet.
    pub fn queued(&self) -> bool {
        self.0.load(Ordering::Acquire) & QUEUED != 0
    }

    /// Session, owning, before it takes everything queued: a push from here on flags again.
    pub fn begin_drain(&self) {
        self.0.fetch_and(!QUEUED, Ordering::AcqRel);
    }

    /// Session, owning, with nothing left to write: gives the right up, unless something was
    /// queued since the last [`begin_drain`](Self::begin_drain) (false: drain again).
    pub fn release(&self) -> bool {
        let mut s = self.0.load(Ordering::Acquire);
        loop {
            if s & QUEUED != 0 {
                return false;
            }
            match self.0.compare_exchange_weak(
                s,
                s & !(LOCK | PARKED | WANTED | HINT_MASK),
                Ordering::Release,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(now) => s = now,
            }
        }
    }

    /// True while the session holds the right to write (for tests and the model).
    #[cfg(any(test, loom))]
    pub fn owned_by_session(&self) -> bool {
        self.0.load(Ordering::Acquire) & (LOCK | PARKED) == LOCK | PARKED
    }

    /// The connection's state.
    pub fn state(&self) -> State {
        State::of(self.0.load(Ordering::Acquire))
    }

    /// Moves an open connection to `to`; false (and no change) when it was not open.
    pub fn close(&self, to: State) -> bool {
        let mut s = self.0.load(Ordering::Acquire);
        loop {
            if State::of(s) != State::Open {
                return false;
            }
            match self.0.compare_exchange_weak(
                s,
                s | to.bits(),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(now) => s = now,
            }
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn the_direct_path_needs_the_whole_word_at_zero() {
        let w = Word::new();
        assert!(w.try_direct());
        assert!(!w.try_direct(), "two publishers held the socket");
        assert!(!w.finish_direct());
        assert!(
            w.flag_queued(),
            "the first flag with nobody writing must wake"
        );
        assert!(!w.flag_queued(), "a wake-up is already owed");
        assert!(
            !w.try_direct(),
            "a direct write would overtake a queued frame"
        );
        assert_eq!(w.claim(), Claim::Owned);
        w.begin_drain();
        assert!(w.release());
        assert!(w.close(State::Done));
        assert!(!w.try_direct(), "a direct write after the close frame");
        assert!(!w.close(State::Slow));
        assert_eq!(w.state(), State::Done);
    }

    #[test]
    fn a_claims_hint_lives_exactly_as_long_as_the_claim() {
        let w = Word::new();
        assert!(w.try_claim(5));
        assert_eq!(w.claim_hint(), 5);
        assert!(w.appendable());
        assert!(!w.finish_direct());
        assert_eq!(w.claim_hint(), 0, "a hint outlived its claim");
        assert!(w.try_claim(7), "a stale hint shut the direct path");
        w.park();
        assert_eq!(w.claim(), Claim::Owned);
        w.begin_drain();
        assert!(w.release());
        assert!(
            w.try_direct(),
            "a parked claim's hint outlived the session's turn"
        );
        assert!(!w.finish_direct());
        assert!(w.try_claim(MAX_HINT + 1), "no hint, but a claim");
        assert_eq!(w.claim_hint(), 0);
    }

    #[test]
    fn a_publisher_hands_over_when_something_was_queued_while_it_wrote() {
        let w = Word::new();
        assert!(w.try_direct());
        assert!(!w.flag_queued(), "the holder will see the flag");
        assert_eq!(w.claim(), Claim::Busy);
        assert!(w.finish_direct(), "the publisher must hand over and wake");
        assert!(w.owned_by_session());
        assert_eq!(w.claim(), Claim::Owned);
        assert!(!w.release(), "queued frames not yet taken");
        w.begin_drain();
        assert!(w.release());
        assert!(w.try_direct());
    }

    #[test]
    fn a_publisher_hands_over_when_the_session_wanted_the_socket() {
        let w = Word::new();
        assert!(w.try_direct());
        assert_eq!(w.claim(), Claim::Busy, "the session has a pong to write");
        w.begin_drain(); // the publisher takes the queue itself: nothing queued is left
        assert!(
            w.finish_direct(),
            "the session's pong would wait for the next wake-up"
        );
        assert_eq!(w.claim(), Claim::Owned);
        assert!(w.release());
        assert!(w.try_direct(), "WANTED outlived the session's turn");
    }
}
