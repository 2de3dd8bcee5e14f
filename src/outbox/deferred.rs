//! Direct writes deferred to the end of the worker's pass, so that load coalesces them.
//!
//! Writing each frame the moment it is published costs one `write` per delivery whatever the
//! load: at 160 msg/s per sender that capped the node at a sixth of what queueing through the
//! sessions reached (RESULTS.md). So a broadcast claims each idle recipient's socket and only
//! notes the frame; the writes happen later, and by then a claimed socket may be owed more
//! frames (this publisher's next messages, other publishers' messages in the same pass), which
//! all go out in one `writev`. This is the floor's event loop: read everything that is ready,
//! append to each recipient's buffer, then flush every dirty socket once per pass.
//!
//! When "later" is: a runtime worker calls [`end_of_pass`] as it runs out of tasks and is about
//! to wait for the kernel (tokio's `on_thread_park` hook, which the server's runtime sets);
//! everything this thread claimed since the last pass is written then. Until a thread has
//! seen that hook (another runtime, a test's, a thread outside any runtime) each publisher's
//! step writes its own claims when it ends, as before. A pass that runs long (a busy worker
//! may poll the kernel between tasks without ever parking) is cut at the end of the first
//! step that finds the oldest claim older than [`HOLD`]: a claim waits at most that long past
//! the step that made it, plus the step that writes it.
//!
//! A frame for a socket this thread has already claimed is appended to the claim: copied into
//! the claim's buffer, with no lock and no atomic write ([`Outbox::deliver_later`]). At 160
//! msg/s the queue's lock, push and wake per delivery were the largest user-space cost (7 %).
//!
//! The list is thread-local, opened by [`DeferredWrites::begin`] around each publisher step.
//! `DeferredWrites` is not `Send`, so a task cannot hold one across an `.await` (its future
//! would not be `Send` and would not spawn): a claim never moves to another thread's list,
//! and the hook never runs in the middle of a step.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::owing::Owing;
use super::{Outbox, Writes};
use crate::metrics::Metrics;

/// How long claims may wait, past the step that left them, for a worker that does not park.
/// A worker parks once its run queue is empty, and under load that is its natural pass: with
/// a 100 ms bound at 160 msg/s per sender, 75 of 80 passes in 10 s ended at a park (about
/// 125 ms each). This bound is the backstop for a worker that never runs dry. Measured at 50
/// and 160 msg/s per sender (RESULTS.md, two interleaved rounds): 50 ms, 100 ms and no bound
/// all left the tail at 0.8-1.1x the floor's; what had held it at 1.3-1.6x was a cap on the
/// claims per pass (gone: see [`Claims`]); 1 ms doubled it.
pub const HOLD: Duration = Duration::from_millis(50);

/// A socket this thread claimed, with the frames owed to it. 24 bytes: a pass on a loaded node
/// holds one for nearly every recipient (9,300 of 10,000 at 160 msg/s per sender, measured), and
/// at 72 bytes (an own `Bytes` and `Vec` each) the list alone was 0.05 KiB of a connection's
/// 1 KiB budget at the node's peak.
pub(crate) struct Claimed {
    outbox: Arc<Outbox>,
    /// The frame that claimed the socket: its place in [`Claims::frames`].
    first: u32,
    /// Frames appended since: one past their buffer's place in [`Claims::buffers`], or 0 while
    /// there are none.
    more: u32,
    /// How many frames that buffer holds.
    more_frames: u32,
}

/// The sockets this thread claimed in the current pass, and buffers kept for the next claims.
///
/// Not capped: a socket is claimed by one thread at a time and once per pass, so the list holds
/// at most one entry per connection on the node (24 bytes each, within the connection's
/// budget), and a pass is as long as the worker's own pass, never cut by how many it holds:
/// cut at 2,048 claims, the tail at 50 msg/s per sender was 1.3x the floor's, uncut 0.8-1.0x
/// (RESULTS.md).
#[derive(Default)]
pub(crate) struct Claims {
    list: Vec<Claimed>,
    /// The frames that claimed sockets, each once: a broadcast claims its recipients one after
    /// the other with one frame, so its claims share one entry (and one reference count).
    frames: Vec<Bytes>,
    /// The buffers of frames appended to claims, copied one after the other.
    buffers: Vec<Vec<u8>>,
    /// Emptied buffers, so that a loaded pass neither allocates nor grows one per claim. At
    /// most [`SPARE_BYTES`] of capacity in all.
    spare: Vec<Vec<u8>>,
    spare_bytes: usize,
}

/// Capacity kept in spare buffers per thread: a pass at 160 msg/s owes a claim about 70
/// frames of 66 bytes, so 1 MiB keeps about 200 claims' buffers.
const SPARE_BYTES: usize = 1 << 20;
/// A fresh buffer's capacity: 15 chat-sized frames before it first grows.
const FIRST_BUFFER: usize = 1024;

impl Claims {
    /// Notes a claim on `outbox` (made at place `len()` in the list), owing `first`.
    pub(crate) fn push(&mut self, outbox: &Arc<Outbox>, first: &Bytes) {
        let known = self
            .frames
            .last()
            .is_some_and(|f| f.as_ptr() == first.as_ptr() && f.len() == first.len());
        if !known {
            self.frames.push(first.clone());
        }
        self.list.push(Claimed {
            outbox: Arc::clone(outbox),
            // At most one claim per connection on the node: far below `u32::MAX`.
            first: (self.frames.len() - 1) as u32,
            more: 0,
            more_frames: 0,
        });
    }

    /// Frames the pass holds for its claims.
    #[cfg(test)]
    pub(crate) fn frames_held(&self) -> usize {
        self.frames.len()
    }

    /// Claims noted so far: the place of the next.
    pub(crate) fn len(&self) -> usize {
        self.list.len()
    }

    /// The frames and bytes owed by the claim at `at`, when it is this thread's claim on
    /// `outbox`.
    pub(crate) fn owed(&self, at: usize, outbox: &Arc<Outbox>) -> Option<(u64, u64)> {
        let claim = self
            .list
            .get(at)
            .filter(|c| Arc::ptr_eq(&c.outbox, outbox))?;
        let (first, more) = self.parts(claim);
        Some((
            1 + u64::from(claim.more_frames),
            (first.len() + more.len()) as u64,
        ))
    }

    /// What `claim` owes: its first frame and the frames appended to it.
    fn parts(&self, claim: &Claimed) -> (&Bytes, &[u8]) {
        let more = match claim.more {
            0 => &[][..],
            k => &self.buffers[k as usize - 1][..],
        };
        (&self.frames[claim.first as usize], more)
    }

    /// Owes `frame` to the claim at `at` too, behind everything it owes so far.
    pub(crate) fn append(&mut self, at: usize, frame: &[u8]) {
        let claim = &mut self.list[at];
        if claim.more == 0 {
            let buffer = match self.spare.pop() {
                Some(buffer) => {
                    self.spare_bytes -= buffer.capacity();
                    buffer
                }
                None => Vec::with_capacity(FIRST_BUFFER.max(frame.len())),
            };
            self.buffers.push(buffer);
            claim.more = self.buffers.len() as u32;
        }
        self.buffers[claim.more as usize - 1].extend_from_slice(frame);
        claim.more_frames += 1;
    }

    /// Lets go of the pass's frames and keeps its emptied buffers for later claims, within
    /// [`SPARE_BYTES`].
    fn recycle(&mut self) {
        self.frames.clear();
        for mut buffer in self.buffers.drain(..) {
            if self.spare_bytes + buffer.capacity() <= SPARE_BYTES {
                buffer.clear();
                self.spare_bytes += buffer.capacity();
                self.spare.push(buffer);
            }
        }
    }
}

/// What this thread claimed and has not written yet.
#[derive(Default)]
struct Pass {
    /// Open [`DeferredWrites`] on this thread (they nest).
    depth: u32,
    claims: Claims,
    /// Reused by every flush: the frames of one claimed socket.
    scratch: VecDeque<Bytes>,
    /// This thread's runtime calls [`end_of_pass`]: steps may leave their claims to it.
    ends_at_park: bool,
    /// When the oldest claim still owed was left by its step.
    since: Option<Instant>,
}

thread_local! {
    static PASS: RefCell<Pass> = RefCell::new(Pass::default());
}

/// Runs `f` on this thread's pass.
fn with_pass<R>(f: impl FnOnce(&mut Pass) -> R) -> R {
    PASS.with_borrow_mut(f)
}

/// One publisher step during which direct writes are noted, not made. Nests: the outermost
/// writes everything out, or leaves it to the end of the pass.
pub struct DeferredWrites {
    /// Not `Send`: see the module docs.
    _here: PhantomData<*const ()>,
}

impl DeferredWrites {
    /// Opens a step on this thread.
    pub fn begin() -> Self {
        with_pass(|p| p.depth += 1);
        Self { _here: PhantomData }
    }

    /// Closes the step (dropping it does the same, so an early return or a panic still writes
    /// what was claimed: a claimed socket nobody writes would stall its connection).
    pub fn finish(self) {}
}

impl Drop for DeferredWrites {
    fn drop(&mut self) {
        let due = with_pass(|p| {
            p.depth -= 1;
            if p.depth > 0 || p.claims.list.is_empty() {
                return None;
            }
            if p.ends_at_park {
                let now = Instant::now();
                let since = *p.since.get_or_insert(now);
                if now.duration_since(since) < HOLD {
                    return None;
                }
            }
            Some(p.take())
        });
        if let Some((claims, scratch)) = due {
            write_out(claims, scratch);
        }
    }
}

impl Pass {
    fn take(&mut self) -> (Claims, VecDeque<Bytes>) {
        self.since = None;
        (
            std::mem::take(&mut self.claims),
            std::mem::take(&mut self.scratch),
        )
    }
}

/// The end of a worker's pass: writes every socket this thread claimed. The server's runtime
/// calls it before a worker parks (`on_thread_park`) and as a worker stops; from then on this
/// thread's steps leave their claims to it. Only a runtime that calls it on every park may
/// call it at all: a thread marked so and never called again would hold its claims until
/// its next step.
pub fn end_of_pass() {
    with_pass(|p| p.ends_at_park = true);
    write_claims();
}

/// Writes what this thread claimed, now: for a task about to yield to the runtime in the
/// middle of a long broadcast (`yield_now` does not let the worker park, so the end of the
/// pass could be far off). Outside a step; a no-op inside one.
pub fn write_claims() {
    let due = with_pass(|p| (p.depth == 0 && !p.claims.list.is_empty()).then(|| p.take()));
    if let Some((claims, scratch)) = due {
        write_out(claims, scratch);
    }
}

/// Writes each claim, counting the writes into each outbox's node.
fn write_out(mut claims: Claims, mut scratch: VecDeque<Bytes>) {
    let mut writes = Writes::default();
    let mut counted: Option<Arc<Metrics>> = None;
    // Bytes copied behind this node's claims, for its `pass_peak_bytes`.
    let mut copied = 0;
    let mut list = std::mem::take(&mut claims.list);
    for claim in list.drain(..) {
        let metrics = &claim.outbox.limits.metrics;
        if let Some(m) = counted.take_if(|m| !Arc::ptr_eq(m, metrics)) {
            std::mem::take(&mut writes).publish(&m);
            m.observe_pass_bytes(std::mem::take(&mut copied));
        }
        counted.get_or_insert_with(|| Arc::clone(metrics));
        let (first, more) = claims.parts(&claim);
        copied += more.len() as u64;
        let owing = Owing::new(first, more, claim.more_frames, &mut scratch);
        claim.outbox.write_claimed(owing, &mut writes);
    }
    if let Some(m) = counted {
        writes.publish(&m);
        m.observe_pass_bytes(copied);
    }
    claims.list = list;
    claims.recycle();
    // Keep the storage for the next pass on this thread (nothing was claimed meanwhile: a
    // pass is written outside any step).
    with_pass(|p| {
        p.claims = claims;
        p.scratch = scratch;
    });
}

/// Runs `f` on this thread's claimed sockets (inside a [`DeferredWrites`]).
pub(crate) fn with_claims<R>(f: impl FnOnce(&mut Claims) -> R) -> R {
    with_pass(|p| f(&mut p.claims))
}
