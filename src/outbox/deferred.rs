//! Direct writes deferred to the end of a publisher's step, so that load coalesces them.
//!
//! Writing each frame the moment it is published costs one `write` per delivery whatever the
//! load: at 160 msg/s per sender that capped the node at a sixth of what queueing through the
//! sessions reached (RESULTS.md). So a broadcast claims each idle recipient's socket and only
//! notes the frame; the writes happen when the publisher's step ends (a session's read, a
//! slice of a large room, a message from Redis). By then the claimed sockets may have more
//! frames queued behind the claim (this publisher's next messages from the same read, other
//! publishers' frames), and each socket gets all of them in one `writev`. At light load a step
//! holds one message and this is the plain direct write; under load a read holds many
//! messages and the frames per write grow with it, as in an event loop that flushes once per
//! pass.
//!
//! The notes live in a thread-local list, opened by [`DeferredWrites::begin`] and written out by the
//! outermost [`DeferredWrites::finish`] (or its `Drop`). `DeferredWrites` is not `Send`, so a task cannot hold
//! one across an `.await` (its future would not be `Send` and would not spawn): a claim can
//! never outlive the step that made it, nor move to another worker's list.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::marker::PhantomData;
use std::sync::Arc;

use bytes::Bytes;

use super::{Outbox, Writes};
use crate::metrics::Metrics;

/// Sockets claimed during the current batch on this thread, each with the first frame owed.
#[derive(Default)]
struct Claims {
    depth: u32,
    owed: Vec<(Arc<Outbox>, Bytes)>,
    /// Reused by every flush: frames taken from a claimed socket's queue.
    scratch: VecDeque<Bytes>,
}

thread_local! {
    static CLAIMS: RefCell<Claims> = RefCell::new(Claims::default());
}

/// Runs `f` on this thread's claims.
fn with_claims<R>(f: impl FnOnce(&mut Claims) -> R) -> R {
    CLAIMS.with_borrow_mut(f)
}

/// One publisher step during which direct writes are noted, not made. Nests: the outermost
/// batch writes everything out.
pub struct DeferredWrites {
    finished: bool,
    /// Not `Send`: see the module docs.
    _here: PhantomData<*const ()>,
}

impl DeferredWrites {
    /// Opens a batch on this thread.
    pub fn begin() -> Self {
        with_claims(|c| c.depth += 1);
        Self {
            finished: false,
            _here: PhantomData,
        }
    }

    /// Closes the batch; the outermost one writes every claimed socket and counts the writes.
    pub fn finish(mut self, metrics: &Metrics) {
        self.finished = true;
        close(Some(metrics));
    }
}

impl Drop for DeferredWrites {
    /// A batch left by an early return or a panic still writes what it claimed (uncounted):
    /// a claimed socket nobody writes would stall its connection.
    fn drop(&mut self) {
        if !self.finished {
            close(None);
        }
    }
}

fn close(metrics: Option<&Metrics>) {
    let work = with_claims(|c| {
        c.depth -= 1;
        (c.depth == 0 && !c.owed.is_empty())
            .then(|| (std::mem::take(&mut c.owed), std::mem::take(&mut c.scratch)))
    });
    let Some((mut owed, mut scratch)) = work else {
        return;
    };
    let mut writes = Writes::default();
    for (outbox, first) in owed.drain(..) {
        outbox.write_claimed(first, &mut scratch, &mut writes);
    }
    if let Some(metrics) = metrics {
        writes.publish(metrics);
    }
    // Keep the storage for the next batch on this thread.
    with_claims(|c| {
        if c.owed.capacity() < owed.capacity() {
            c.owed = owed;
        }
        c.scratch = scratch;
    });
}

/// Runs `f` on this thread's list of claimed sockets (inside a [`DeferredWrites`]).
pub(crate) fn with_owed<R>(f: impl FnOnce(&mut Vec<(Arc<Outbox>, Bytes)>) -> R) -> R {
    with_claims(|c| f(&mut c.owed))
}
