//! A loom model of one connection's way out: the ownership word from `src/outbox/word.rs`
//! (the real file), and beside it the same steps `src/outbox/mod.rs` takes around it, written
//! against a fake socket that takes a few bytes per write and would block when its budget is
//! spent. Two publishers (one writing at once, one deferring its writes to the end of its
//! pass, as fan-out does, and appending its later frames to its own claim) race a session
//! that drains, waits for the socket and closes; a third publisher moves between their
//! threads mid-claim, as a session stolen by another worker does.
//!
//! Checked in every interleaving: the bytes on the wire parse into whole frames (no frame
//! torn or interleaved with another), each publisher's frames arrive in its order, the close
//! frame is the last thing written, and when everyone is done nothing is left queued without
//! an owner (a stranded frame would sit there forever), nor is the session's own pong.
#![cfg(loom)]

use std::collections::VecDeque;

use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use loom::sync::{Arc, Condvar, Mutex};
use loom::thread;
use roomcast_model::word::{Claim, State, Word};

/// Bytes the socket takes before it would block, and again each time the reader catches up:
/// less than some frames, more than others, so whole, partial and refused writes all happen.
const SOCKET_BUDGET: usize = 8;
const CLOSE: u8 = 0xff;

/// A frame is `[tag, seq, len, len bytes of tag ^ seq]`: a torn or interleaved frame fails to
/// parse, and `(tag, seq)` gives each publisher's order.
fn frame(tag: u8, seq: u8, len: u8) -> Vec<u8> {
    let mut f = vec![tag, seq, len];
    f.extend(std::iter::repeat_n(tag ^ seq, len as usize));
    f
}

/// The socket: one write is atomic, as a real `write(2)` is, and takes at most the budget.
struct Socket {
    wire: Mutex<(Vec<u8>, usize)>,
}

impl Socket {
    fn write(&self, bytes: &[u8]) -> Option<usize> {
        let mut s = self.wire.lock().unwrap();
        let n = bytes.len().min(s.1);
        if n == 0 {
            return None;
        }
        s.0.extend_from_slice(&bytes[..n]);
        s.1 -= n;
        Some(n)
    }

    /// The reader caught up: the socket is writable again.
    fn drain_reader(&self) {
        self.wire.lock().unwrap().1 = SOCKET_BUDGET;
    }
}

#[derive(Default)]
struct Queue {
    frames: VecDeque<Vec<u8>>,
    partial_front: bool,
}

/// The parts of `Outbox` that the word's protocol relies on.
struct Conn {
    word: Word,
    queue: Mutex<Queue>,
    socket: Socket,
    signaled: AtomicBool,
}

impl Conn {
    fn new() -> Self {
        Self {
            word: Word::new(),
            queue: Mutex::new(Queue::default()),
            socket: Socket {
                wire: Mutex::new((Vec::new(), SOCKET_BUDGET)),
            },
            signaled: AtomicBool::new(false),
        }
    }

    /// The outbox stores `true`; a read-modify-write here, because loom can lose a plain store
    /// that races a `swap` (tokio-rs/loom#254), which would fail the model for loom's sake.
    fn signal(&self) {
        self.signaled.fetch_or(true, Ordering::Release);
    }

    /// `Outbox::deliver`: a direct write when the socket is idle, else queued.
    fn deliver(&self, f: Vec<u8>) {
        if self.word.try_direct() {
            self.write_direct(f);
        } else {
            self.enqueue(f);
        }
    }

    /// `Outbox::deliver_later`: claims an idle socket, to be written by `write_claimed`; a
    /// frame for a socket this thread has claimed already is appended to the claim while
    /// nothing was queued since, else queued behind it.
    fn deliver_later(&self, f: Vec<u8>, claim: &mut Option<Vec<u8>>) {
        if let Some(owed) = claim {
            if self.word.appendable() {
                owed.extend(f);
            } else {
                self.enqueue(f);
            }
        } else if self.word.try_claim(1) {
            *claim = Some(f);
        } else {
            self.enqueue(f);
        }
    }

    fn write_direct(&self, f: Vec<u8>) {
        match self.socket.write(&f) {
            Some(n) if n == f.len() => {
                if self.word.finish_direct() {
                    self.signal();
                }
            }
            Some(n) => self.park(vec![f[n..].to_vec()], true),
            None => self.park(vec![f], false),
        }
    }

    /// `Outbox::write_claimed`: what the claim owes (its frames, one after the other), then
    /// what was queued behind it, in one write.
    fn write_claimed(&self, first: Vec<u8>) {
        if !self.word.queued() {
            return self.write_direct(first);
        }
        let (mut segs, _) = self.take_all();
        segs.push_front(first);
        let cut = write_vectored(&self.socket, &mut segs);
        if segs.is_empty() {
            if self.word.finish_direct() {
                self.signal();
            }
        } else {
            self.park(segs.into(), cut);
        }
    }

    fn park(&self, rest: Vec<Vec<u8>>, partial: bool) {
        {
            let mut q = self.queue.lock().unwrap();
            for f in rest.into_iter().rev() {
                q.frames.push_front(f);
            }
            q.partial_front = partial;
        }
        self.word.park();
        self.signal();
    }

    /// `Outbox::enqueue`; false when the connection is closed.
    fn enqueue(&self, f: Vec<u8>) -> bool {
        if self.word.state() != State::Open {
            return false;
        }
        {
            let mut q = self.queue.lock().unwrap();
            if self.word.state() != State::Open {
                return false;
            }
            q.frames.push_back(f);
        }
        if self.word.flag_queued() {
            self.signal();
        }
        true
    }

    /// `Outbox::close_with`.
    fn close_with(&self) {
        {
            let mut q = self.queue.lock().unwrap();
            self.word.close(State::Done);
            q.frames.push_back(vec![CLOSE]);
        }
        if self.word.flag_queued() {
            self.signal();
        }
    }

    /// `Outbox::take_all` (owner only); true when the first frame is the rest of a partial
    /// write.
    fn take_all(&self) -> (VecDeque<Vec<u8>>, bool) {
        self.word.begin_drain();
        let mut q = self.queue.lock().unwrap();
        let partial = std::mem::take(&mut q.partial_front);
        (std::mem::take(&mut q.frames), partial)
    }

    /// The session writer's `flush`: claim, write its pong and everything queued (waiting for
    /// the reader when the socket is full), give the socket back unless more was queued
    /// meanwhile.
    fn session_flush(&self, pong: &mut Option<Vec<u8>>) {
        if self.word.claim() == Claim::Busy {
            return;
        }
        loop {
            // The session writer's `fill`: the pong first, but never before the rest of a
            // partial write.
            let (mut segs, rest_first) = self.take_all();
            if let Some(pong) = pong.take() {
                segs.insert(usize::from(rest_first), pong);
            }
            while !segs.is_empty() {
                write_some(&self.socket, &mut segs);
                if !segs.is_empty() {
                    // The socket is full: the session waits until it is writable.
                    self.socket.drain_reader();
                }
            }
            if self.word.release() {
                return;
            }
        }
    }

    /// The session's wait for a wake-up, then a flush.
    fn session_wake(&self, pong: &mut Option<Vec<u8>>) {
        if self.signaled.swap(false, Ordering::AcqRel) {
            self.session_flush(pong);
        }
    }
}

/// One write of the front segment; returns whether it was cut short.
fn write_some(socket: &Socket, segs: &mut VecDeque<Vec<u8>>) -> bool {
    let Some(front) = segs.front_mut() else {
        return false;
    };
    match socket.write(front) {
        Some(n) if n == front.len() => {
            segs.pop_front();
            false
        }
        Some(n) => {
            front.drain(..n);
            true
        }
        None => false,
    }
}

/// One `writev` of every segment; returns whether a segment was cut short.
fn write_vectored(socket: &Socket, segs: &mut VecDeque<Vec<u8>>) -> bool {
    let all: Vec<u8> = segs.iter().flatten().copied().collect();
    let Some(mut n) = socket.write(&all) else {
        return false;
    };
    while let Some(front) = segs.front_mut() {
        if n < front.len() {
            front.drain(..n);
            return n > 0;
        }
        n -= front.len();
        segs.pop_front();
    }
    false
}

/// Parses the wire into `(tag, seq)` pairs; panics on a torn or interleaved frame.
fn parse(mut wire: &[u8]) -> Vec<(u8, u8)> {
    let mut out = Vec::new();
    while let Some(&tag) = wire.first() {
        if tag == CLOSE {
            assert_eq!(wire.len(), 1, "bytes after the close frame: {wire:?}");
            out.push((CLOSE, 0));
            break;
        }
        assert!(wire.len() >= 3, "a torn frame header: {wire:?}");
        let (seq, len) = (wire[1], wire[2] as usize);
        assert!(wire.len() >= 3 + len, "a torn frame: {wire:?}");
        assert!(
            wire[3..3 + len].iter().all(|&b| b == tag ^ seq),
            "interleaved frames: {wire:?}"
        );
        out.push((tag, seq));
        wire = &wire[3 + len..];
    }
    out
}

/// Publishers (publisher 1 only when `both`) and the session; `deferred` makes publisher 2
/// claim and write at the end of its step, with its second frame for the same socket
/// appended to its own claim (or queued behind it). `migrating` adds publisher 4, a session
/// moved between threads by work stealing: its first frame is published on publisher 1's
/// thread, its second, after that, on publisher 2's while publisher 2 holds its claim.
fn run(deferred: bool, close: bool, both: bool, migrating: bool) {
    let conn = Arc::new(Conn::new());
    let done = Arc::new(AtomicUsize::new(0));
    // A condition variable, not a spin: loom bounds the branches of a spinning model.
    let moved = Arc::new((Mutex::new(false), Condvar::new()));
    let p1 = {
        let (conn, done, moved) = (conn.clone(), done.clone(), moved.clone());
        thread::spawn(move || {
            if both {
                conn.deliver(frame(1, 0, 3));
                conn.deliver(frame(1, 1, 1));
            }
            if migrating {
                conn.deliver(frame(4, 0, 1));
                *moved.0.lock().unwrap() = true;
                moved.1.notify_one();
            }
            done.fetch_add(1, Ordering::Release);
        })
    };
    let p2 = {
        let (conn, done) = (conn.clone(), done.clone());
        thread::spawn(move || {
            if deferred {
                let mut claim = None;
                conn.deliver_later(frame(2, 0, 2), &mut claim);
                conn.deliver_later(frame(2, 1, 0), &mut claim);
                if migrating {
                    let mut published = moved.0.lock().unwrap();
                    while !*published {
                        published = moved.1.wait(published).unwrap();
                    }
                    drop(published);
                    conn.deliver_later(frame(4, 1, 0), &mut claim);
                }
                if let Some(owed) = claim {
                    conn.write_claimed(owed);
                }
            } else {
                conn.deliver(frame(2, 0, 2));
            }
            done.fetch_add(1, Ordering::Release);
        })
    };
    // The session: a ping arrived, so it has a pong of its own to write; it tries at once,
    // then handles wake-ups while the publishers run, then (maybe) closes.
    let mut pong = Some(frame(3, 0, 0));
    conn.session_flush(&mut pong);
    while done.load(Ordering::Acquire) < 2 {
        conn.session_wake(&mut pong);
        thread::yield_now();
    }
    if close {
        conn.close_with();
    }
    conn.session_wake(&mut pong);
    p1.join().unwrap();
    p2.join().unwrap();

    // Nothing stranded: every frame left was either written or is owned by the session (who
    // holds the socket only while a wake-up or writable socket is owed to it).
    let queue = conn.queue.lock().unwrap();
    assert!(
        queue.frames.is_empty(),
        "frames left queued with nobody to write them: {:?} (session owns {}, queued {}, \
         signaled {}, wire {:?})",
        queue.frames,
        conn.word.owned_by_session(),
        conn.word.queued(),
        conn.signaled.load(Ordering::Acquire),
        conn.socket.wire.lock().unwrap().0,
    );
    drop(queue);
    assert!(pong.is_none(), "the session's pong was never written");
    let wire = conn.socket.wire.lock().unwrap().0.clone();
    let frames = parse(&wire);
    for tag in [1, 2, 3, 4] {
        let seqs: Vec<u8> = frames.iter().filter(|f| f.0 == tag).map(|f| f.1).collect();
        let expected: Vec<u8> = if tag == 3 {
            vec![0]
        } else if (tag == 1 && !both) || (tag == 4 && !migrating) {
            vec![]
        } else if tag == 1 || tag == 4 || deferred {
            vec![0, 1]
        } else {
            vec![0]
        };
        assert_eq!(seqs, expected, "publisher {tag}'s frames: {frames:?}");
    }
    if close {
        assert_eq!(frames.last(), Some(&(CLOSE, 0)), "the close frame is last");
    }
}

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(3);
    }
    builder.check(f);
}

#[test]
fn direct_publishers_and_a_draining_session() {
    model(|| run(false, false, true, false));
}

#[test]
fn direct_publishers_and_a_closing_session() {
    model(|| run(false, true, true, false));
}

#[test]
fn a_deferring_publisher_and_a_closing_session() {
    model(|| run(true, true, true, false));
}

/// The session's pong against one deferring publisher alone: no later frame comes to wake the
/// session, so the hand-over as the publisher finishes is the only way the pong gets out.
#[test]
fn the_sessions_pong_while_a_publisher_holds_the_socket() {
    model(|| run(true, false, false, false));
}

/// A publisher's frames published from two threads in turn (its session moved between
/// workers) while the second thread holds a claim: the second frame must not be appended
/// ahead of the first, which the first thread had to queue.
#[test]
fn a_publisher_moved_between_threads_keeps_its_order() {
    model(|| run(true, false, false, true));
}
