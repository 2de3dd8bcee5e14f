//! What a claimed socket is owed when its claim is written, front to back: the frame that
//! claimed it, the frames copied behind it, then whatever was queued meanwhile; and what a
//! write that took only part of it leaves for the session.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::Bytes;

use super::{advance, MAX_IOV};
use crate::socket::Socket;

/// The frames a claim owes its socket, consumed from the front as writes take them.
pub(crate) struct Owing<'a> {
    /// The claiming frame, whole (the pass holds it: nothing is cloned unless a rest is left).
    frame: &'a Bytes,
    /// What is left of it.
    first: &'a [u8],
    /// What is left of the copied frames.
    more: &'a [u8],
    /// Frames in `more` while none of it is written.
    more_frames: u32,
    /// Frames queued behind the claim, taken from the outbox before the first write.
    queued: &'a mut VecDeque<Bytes>,
    /// The front entry lost some bytes to a write (for `more`, perhaps exactly at a frame's
    /// end: it counts as cut, which only keeps it from being discarded).
    cut: bool,
}

impl<'a> Owing<'a> {
    /// `queued` must be empty: the writer fills it from the outbox's queue.
    pub(crate) fn new(
        frame: &'a Bytes,
        more: &'a [u8],
        more_frames: u32,
        queued: &'a mut VecDeque<Bytes>,
    ) -> Self {
        queued.clear();
        Self {
            frame,
            first: frame,
            more,
            more_frames,
            queued,
            cut: false,
        }
    }

    /// The claim owes nothing beyond its first frame (the common case at light load).
    pub(crate) fn is_single(&self) -> bool {
        self.more.is_empty() && self.queued.is_empty()
    }

    /// Everything owed is written.
    pub(crate) fn is_empty(&self) -> bool {
        self.first.is_empty() && self.more.is_empty() && self.queued.is_empty()
    }

    /// The claiming frame, whole (before any write).
    pub(crate) fn first(&self) -> &Bytes {
        self.frame
    }

    /// Where frames queued behind the claim go, after what the claim owes.
    pub(crate) fn queued(&mut self) -> &mut VecDeque<Bytes> {
        self.queued
    }

    /// One `write` (or `writev`) of the front; the bytes written and the frames that went out
    /// whole with them, or `None` when nothing was written (the socket is full or failed: the
    /// session finds out which on its own write).
    pub(crate) fn write(&mut self, stream: &Socket) -> Option<(usize, u64)> {
        let mut iov = [IoSlice::new(&[]); MAX_IOV];
        let mut count = 0;
        let owed = [self.first, self.more];
        let parts = owed.into_iter().filter(|p| !p.is_empty());
        let queued = self.queued.iter().map(|f| &f[..]);
        for (slot, part) in iov.iter_mut().zip(parts.chain(queued)) {
            *slot = IoSlice::new(part);
            count += 1;
        }
        let written = if count == 1 {
            stream.try_write(&iov[0])
        } else {
            stream.try_write_vectored(&iov[..count])
        };
        let n = written.ok().filter(|&n| n > 0)?;
        Some((n, self.consume(n)))
    }

    /// Drops `n` written bytes from the front; returns the frames that went out whole.
    fn consume(&mut self, mut n: usize) -> u64 {
        let mut frames = 0;
        if !self.first.is_empty() {
            let k = n.min(self.first.len());
            self.first = &self.first[k..];
            n -= k;
            self.cut = !self.first.is_empty();
            if self.cut {
                return frames;
            }
            frames += 1;
        }
        if n == 0 {
            return frames;
        }
        if !self.more.is_empty() {
            let k = n.min(self.more.len());
            self.more = &self.more[k..];
            n -= k;
            self.cut = !self.more.is_empty();
            if self.cut {
                self.more_frames = 0;
                return frames;
            }
            frames += u64::from(self.more_frames);
        }
        let before = self.queued.len();
        if n > 0 {
            self.cut = advance(self.queued, n);
        }
        frames + (before - self.queued.len()) as u64
    }

    /// What is left, in order, at the front of `queued` for the session (the rest of the copied
    /// frames copied once more, into a `Bytes` of their own: only a full socket gets here),
    /// and whether its front is the rest of a frame already partly on the wire.
    pub(crate) fn into_rest(self) -> (&'a mut VecDeque<Bytes>, bool) {
        if !self.more.is_empty() {
            self.queued.push_front(Bytes::copy_from_slice(self.more));
        }
        if !self.first.is_empty() {
            let written = self.frame.len() - self.first.len();
            self.queued.push_front(self.frame.slice(written..));
        }
        (self.queued, self.cut)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(list: &[&'static [u8]]) -> VecDeque<Bytes> {
        list.iter().map(|f| Bytes::from_static(f)).collect()
    }

    static ABC: Bytes = Bytes::from_static(b"abc");

    /// A claim owing `abc`, two copied frames `de` + `fgh`, and queued `ij`, `kl`.
    fn owing(queued: &mut VecDeque<Bytes>) -> Owing<'_> {
        *queued = frames(&[b"ij", b"kl"]);
        Owing {
            frame: &ABC,
            first: &ABC[..],
            more: b"defgh",
            more_frames: 2,
            queued,
            cut: false,
        }
    }

    #[test]
    fn whole_frames_are_counted_across_the_three_parts() {
        let mut q = VecDeque::new();
        let mut o = owing(&mut q);
        assert_eq!(o.consume(2), 0, "half of the first frame");
        assert_eq!(o.consume(1), 1, "the rest of the first frame");
        assert_eq!(o.consume(5), 2, "both copied frames");
        assert_eq!(o.consume(3), 1, "one queued frame and a byte of the next");
        assert_eq!(o.consume(1), 1);
        assert!(o.is_empty());
    }

    #[test]
    fn the_rest_keeps_its_order_and_says_when_its_front_is_cut() {
        let mut q = VecDeque::new();
        let mut o = owing(&mut q);
        o.consume(1);
        let (rest, cut) = o.into_rest();
        assert_eq!(*rest, frames(&[b"bc", b"defgh", b"ij", b"kl"]));
        assert!(cut, "the first frame is partly on the wire");

        let mut o = owing(&mut q);
        o.consume(3);
        let (rest, cut) = o.into_rest();
        assert_eq!(*rest, frames(&[b"defgh", b"ij", b"kl"]));
        assert!(!cut, "nothing of the copied frames was written");

        let mut o = owing(&mut q);
        o.consume(4);
        let (rest, cut) = o.into_rest();
        assert_eq!(*rest, frames(&[b"efgh", b"ij", b"kl"]));
        assert!(cut, "a copied frame is partly on the wire");

        let mut o = owing(&mut q);
        o.consume(9);
        let (rest, cut) = o.into_rest();
        assert_eq!(*rest, frames(&[b"j", b"kl"]));
        assert!(cut, "a queued frame is partly on the wire");
    }

    #[test]
    fn copied_frames_cut_by_a_write_are_not_counted_when_their_rest_goes() {
        let mut q = VecDeque::new();
        let mut o = owing(&mut q);
        assert_eq!(o.consume(4), 1);
        assert_eq!(
            o.consume(4),
            0,
            "which copied frames went out whole is not known once cut"
        );
    }
}
