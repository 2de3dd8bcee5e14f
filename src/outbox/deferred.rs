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
//! step that finds the oldest claim older than [`HOLD`] (or the list holding [`MAX_CLAIMS`]):
//! a claim waits at most that long past the step that made it, plus the step that writes it.
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
/// A worker that always has another task ready (the node is saturated) never parks, so this
/// is then the length of its pass: measured at 160 msg/s per sender (RESULTS.md), 1 ms cut
/// the passes short and doubled the tail against the floor's, while 5 and 20 ms did equally
/// well. A worker that is not saturated parks within one pass and never waits this long.
pub const HOLD: Duration = Duration::from_millis(5);

/// Claims a pass may gather before the step that reaches this many writes them: the list
/// costs 72 bytes a claim, and a pass over every recipient of a 10,000-client node held 720 KB
/// at once (measured: idle memory from 0.92 to 0.97 KiB per connection, the node's peak
/// counting it). 2,048 claims are ten rooms of 200; batching comes from the frames each claim
/// gathers, not from how many claims a pass holds.
const MAX_CLAIMS: usize = 2048;

/// A socket this thread claimed, with the frames owed to it.
pub(crate) struct Claimed {
    outbox: Arc<Outbox>,
    /// The frame that claimed the socket, written from its shared `Bytes` (no copy).
    first: Bytes,
    /// Frames appended since, copied one after the other (a buffer from [`Claims::spare`]).
    more: Vec<u8>,
    /// How many frames `more` holds.
    more_frames: u32,
}

impl Claimed {
    /// Frames and bytes owed by this claim.
    pub(crate) fn owed(&self) -> (u64, u64) {
        (
            1 + u64::from(self.more_frames),
            (self.first.len() + self.more.len()) as u64,
        )
    }
}

/// The sockets this thread claimed in the current pass, and buffers kept for the next claims.
#[derive(Default)]
pub(crate) struct Claims {
    list: Vec<Claimed>,
    /// Emptied `more` buffers, so that a loaded pass neither allocates nor grows one per
    /// claim. At most [`SPARE_BYTES`] of capacity in all.
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
        self.list.push(Claimed {
            outbox: Arc::clone(outbox),
            first: first.clone(),
            more: Vec::new(),
            more_frames: 0,
        });
    }

    /// Claims noted so far: the place of the next.
    pub(crate) fn len(&self) -> usize {
        self.list.len()
    }

    /// The claim at `at`, when it is this thread's claim on `outbox`.
    pub(crate) fn get(&self, at: usize, outbox: &Arc<Outbox>) -> Option<&Claimed> {
        self.list.get(at).filter(|c| Arc::ptr_eq(&c.outbox, outbox))
    }

    /// Owes `frame` to the claim at `at` too, behind everything it owes so far.
    pub(crate) fn append(&mut self, at: usize, frame: &[u8]) {
        let claim = &mut self.list[at];
        if claim.more.capacity() == 0 {
            claim.more = match self.spare.pop() {
                Some(buffer) => {
                    self.spare_bytes -= buffer.capacity();
                    buffer
                }
                None => Vec::with_capacity(FIRST_BUFFER.max(frame.len())),
            };
        }
        claim.more.extend_from_slice(frame);
        claim.more_frames += 1;
    }

    /// Keeps an emptied buffer for a later claim, within [`SPARE_BYTES`].
    fn recycle(&mut self, mut buffer: Vec<u8>) {
        if buffer.capacity() > 0 && self.spare_bytes + buffer.capacity() <= SPARE_BYTES {
            buffer.clear();
            self.spare_bytes += buffer.capacity();
            self.spare.push(buffer);
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
            if p.ends_at_park && p.claims.list.len() < MAX_CLAIMS {
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
    let mut list = std::mem::take(&mut claims.list);
    for claim in list.drain(..) {
        let Claimed {
            outbox,
            first,
            more,
            more_frames,
        } = claim;
        let metrics = &outbox.limits.metrics;
        if let Some(m) = counted.take_if(|m| !Arc::ptr_eq(m, metrics)) {
            std::mem::take(&mut writes).publish(&m);
        }
        counted.get_or_insert_with(|| Arc::clone(metrics));
        let owing = Owing::new(first, &more, more_frames, &mut scratch);
        outbox.write_claimed(owing, &mut writes);
        claims.recycle(more);
    }
    if let Some(m) = counted {
        writes.publish(&m);
    }
    claims.list = list;
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
