//! The session's outbound side: the outbox drained in batches, many frames per write.
//!
//! A publisher writes to an idle socket itself; the session writes what was queued: what
//! arrived while someone else was writing, the rest of a write the socket did not take, and
//! its own frames (pong, ping, replies, close). It claims the socket from the outbox's
//! ownership word first and gives it back when nothing is left, so the two never interleave.
//! Small frames are copied back to back into one buffer (one contiguous write beats many
//! iovecs), large ones go out as their own iovec, and each batch is one `writev`. The pending
//! pong, when there is one, goes first.

use std::collections::VecDeque;
use std::io::{self, IoSlice};

use bytes::{Bytes, BytesMut};

use super::{End, Input, Phase, Session};
use crate::outbox::{Claim, Outbox};

/// Frames up to this size are copied into the batch buffer; larger ones are written in place.
const COALESCE_MAX: usize = 1024;
/// Most bytes taken from the outbox into one batch.
const BATCH_BYTES: usize = 256 * 1024;
/// Most iovecs handed to one `writev`.
const MAX_IOV: usize = 64;
/// Socket writes per wake-up before yielding to other tasks on this worker.
const WRITES_PER_TURN: usize = 16;

impl Session {
    /// Writes until the outbox is empty, the socket is full or the turn's writes are used.
    /// Returns `Err(Closed)` once our close frame is out and the peer has no more to say.
    ///
    /// What must stay true on return: the session holds the socket only with a batch waiting
    /// for the socket to take it, or with a wake-up owed to itself (`Yield` owes one: see
    /// `Session::yield_turn`); otherwise a frame a publisher queued behind it would wait for
    /// nobody.
    pub(super) fn flush(&mut self) -> Result<Flushed, End> {
        if !self.writing() && self.outbox.claim() == Claim::Busy {
            // A publisher is mid-write; it hands the socket over, with a wake-up, as it ends.
            return Ok(Flushed::Done);
        }
        let pong = self.out.as_ref().and_then(|out| out.pong.as_ref());
        let pong = pong.map_or(0, Bytes::len) as u64;
        self.shared
            .metrics
            .observe_outbox_bytes(self.outbox.pending().1 + pong);
        for _ in 0..WRITES_PER_TURN {
            if !self.writing() && !self.fill() {
                if !self.outbox.release_socket() {
                    // Queued since the last take: write that first.
                    continue;
                }
                // Nothing left to write: keep no buffer while idle (`fill` left no pong and
                // nothing taken).
                self.out = None;
                if self.closing() && self.outbox.pending().0 == 0 {
                    self.after_close_flushed()?;
                }
                return Ok(Flushed::Done);
            }
            let Some(out) = self.out.as_deref() else {
                continue;
            };
            let written = {
                let mut iov = [IoSlice::new(&[]); MAX_IOV];
                let mut count = 0;
                for (slot, seg) in iov.iter_mut().zip(out.batch.segs.iter()) {
                    *slot = IoSlice::new(seg);
                    count += 1;
                }
                // One segment (the usual case) takes plain write(2), a little cheaper than
                // writev(2) with a single iovec.
                if count == 1 {
                    self.stream().try_write(&iov[0])
                } else {
                    self.stream().try_write_vectored(&iov[..count])
                }
            };
            match written {
                Ok(0) => return Err(End::Io(io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    if let Some(out) = self.out.as_deref_mut() {
                        let frames = std::mem::take(&mut out.batch.uncounted);
                        self.shared.metrics.add_write(frames, n as u64);
                        out.batch.advance(n);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Flushed::Done),
                Err(e) => return Err(End::Io(e)),
            }
        }
        // Still more to write: let other sessions on this worker run, then come back.
        Ok(Flushed::Yield)
    }

    /// Takes the pong not yet written, dropping `out` when that was all it held.
    pub(super) fn take_pong(&mut self) -> Option<Bytes> {
        let out = self.out.as_deref_mut()?;
        let pong = out.pong.take();
        if out.taken.is_empty() && out.batch.is_empty() {
            self.out = None;
        }
        pong
    }

    /// True while a batch waits for the socket to take it.
    pub(super) fn writing(&self) -> bool {
        self.out.as_ref().is_some_and(|out| !out.batch.is_empty())
    }

    fn after_close_flushed(&mut self) -> Result<(), End> {
        let Phase::Closing {
            input, half_closed, ..
        } = &mut self.phase
        else {
            return Ok(());
        };
        if *input == Input::Ended {
            return Err(End::Closed);
        }
        if !*half_closed {
            // Our close is out; half-close so the peer sees EOF after it, and keep reading
            // until the peer's close frame (or EOF) or the deadline.
            *half_closed = true;
            let _ = socket2::SockRef::from(self.stream()).shutdown(std::net::Shutdown::Write);
        }
        Ok(())
    }

    /// Writes a small control frame at once when nothing else is half-written; gives it back
    /// when it cannot (a batch is in progress, which means the socket is full or a turn ran
    /// out; a publisher is writing; or the socket would block). When frames are queued it goes
    /// into the batch ahead of them, or right after the rest of a publisher's partial write if
    /// that is first (nothing may cut into it), for the flush that follows. A partial write
    /// leaves the rest at the front of the batch; with a batch left, the session keeps the
    /// socket.
    pub(super) fn write_now(&mut self, frame: Bytes) -> Option<Bytes> {
        if self.out.is_some() || self.outbox.claim() == Claim::Busy {
            // `out` holds a batch, frames taken or a pong: all go before this frame.
            return Some(frame);
        }
        if self.outbox.queued() {
            // `fill` places it as it places the pong: first, or right after such a rest.
            self.out = Some(Box::new(Out {
                pong: Some(frame),
                ..Out::default()
            }));
            self.fill();
            // Owed: the flush that writes the batch (the socket stays ours until then).
            self.outbox.signal();
            return None;
        }
        let written = self.stream().try_write(&frame);
        let rest = match written {
            Ok(n) => {
                self.shared
                    .metrics
                    .add_write(u64::from(n == frame.len()), n as u64);
                if n < frame.len() {
                    let mut out = Box::<Out>::default();
                    out.batch.segs.push_back(frame.slice(n..));
                    out.batch.uncounted += 1;
                    self.out = Some(out);
                }
                None
            }
            Err(_) => Some(frame),
        };
        if !self.writing() && !self.outbox.release_socket() {
            // Something was queued while we held the socket: come back for it.
            self.outbox.signal();
        }
        rest
    }

    /// Moves the pending pong and frames from the outbox into the batch; false when there was
    /// nothing to move. `out` is made only when there is something to hold.
    fn fill(&mut self) -> bool {
        let out = match self.out.as_deref_mut() {
            Some(out) => out,
            None => {
                let mut taken = VecDeque::new();
                let rest_first = self.outbox.take_all(&mut taken);
                if taken.is_empty() {
                    return false;
                }
                self.out.insert(Box::new(Out {
                    taken,
                    rest_first,
                    ..Out::default()
                }))
            }
        };
        out.fill(&self.outbox)
    }
}

/// What the session is in the middle of writing. Boxed in `Session::out` and dropped when
/// nothing is left: an idle connection holds none of it (136 bytes inline).
#[derive(Default)]
pub(super) struct Out {
    /// The answer to the latest ping not yet written; a newer ping replaces it, so a ping
    /// flood holds one pong, not one per ping.
    pub(super) pong: Option<Bytes>,
    /// Frames taken from the outbox in one swap and not yet moved into the batch.
    pub(super) taken: VecDeque<Bytes>,
    /// The first frame in `taken` is the rest of a publisher's partial write (see `fill`).
    rest_first: bool,
    batch: Batch,
}

impl Out {
    /// Moves the pong and frames into the batch; false when there was nothing to move. The
    /// pong goes first, except after the rest of a publisher's partial write, which must be
    /// finished before any other frame starts.
    fn fill(&mut self, outbox: &Outbox) -> bool {
        // Only a fresh take can lead with such a rest (see `next_frame`).
        let rest_first = std::mem::take(&mut self.rest_first)
            || (self.taken.is_empty() && outbox.take_all(&mut self.taken));
        let rest = if rest_first {
            self.next_frame(outbox)
        } else {
            None
        };
        let (first, second) = match (rest, self.pong.take()) {
            (Some(rest), Some(pong)) => (rest, Some(pong)),
            (Some(one), None) | (None, Some(one)) => (one, self.next_frame(outbox)),
            (None, None) => match self.next_frame(outbox) {
                Some(one) => (one, self.next_frame(outbox)),
                None => return false,
            },
        };
        let Some(second) = second else {
            // The common case under light load: one frame, written straight from the shared
            // allocation.
            self.batch.uncounted += 1;
            self.batch.segs.push_back(first);
            return true;
        };
        let mut taken = first.len() + second.len();
        self.batch.add(first);
        self.batch.add(second);
        while taken < BATCH_BYTES && self.batch.segs.len() < MAX_IOV - 1 {
            let Some(frame) = self.next_frame(outbox) else {
                break;
            };
            taken += frame.len();
            self.batch.add(frame);
        }
        self.batch.seal();
        true
    }

    /// The next frame to write, taking everything the outbox holds when the last take is used
    /// up.
    fn next_frame(&mut self, outbox: &Outbox) -> Option<Bytes> {
        if self.taken.is_empty() {
            // The session has held the socket since `fill`'s take, so no publisher can have
            // parked the rest of a partial write since: the flag is false here.
            let _ = outbox.take_all(&mut self.taken);
        }
        let frame = self.taken.pop_front()?;
        outbox.release(&frame);
        Some(frame)
    }
}

/// How a flush ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Flushed {
    /// Nothing is left to write, or the socket is full (its write readiness wakes the
    /// session), or a publisher is writing (it hands over with a wake-up).
    Done,
    /// The turn's writes were used up with more to write: the session yields, then goes on.
    Yield,
}

/// Frames taken from the outbox and not yet fully written.
#[derive(Default)]
pub(super) struct Batch {
    segs: VecDeque<Bytes>,
    small: BytesMut,
    /// Frames popped since the last write was counted, for the frames-per-write metric.
    uncounted: u64,
}

impl Batch {
    pub(super) fn is_empty(&self) -> bool {
        self.segs.is_empty()
    }

    /// Appends one frame: small ones are copied behind the previous small ones, large ones
    /// keep their own allocation.
    fn add(&mut self, frame: Bytes) {
        self.uncounted += 1;
        if frame.len() <= COALESCE_MAX {
            self.small.extend_from_slice(&frame);
        } else {
            self.seal();
            self.segs.push_back(frame);
        }
    }

    /// Turns the coalesced small frames into a segment of their own.
    fn seal(&mut self) {
        if !self.small.is_empty() {
            self.segs.push_back(self.small.split().freeze());
        }
    }

    /// Drops `n` written bytes from the front.
    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.segs.front_mut() else {
                return;
            };
            if n >= front.len() {
                n -= front.len();
                self.segs.pop_front();
            } else {
                let _ = front.split_to(n);
                n = 0;
            }
        }
    }
}
