//! One WebSocket connection after the upgrade: reads client frames, runs their commands, holds
//! the connection's rooms, and writes what its outbox queues.
//!
//! A session is a single task that is the only reader of its `TcpStream` and waits on
//! readiness, not on buffered reads: while idle it holds no read or write buffer at all. It
//! shares writing with publishers, who write to the socket themselves while it is idle (the
//! outbox's ownership word decides who writes). The work is split by
//! direction: `reader` frames and admits what the client sends (inbound flow control, frame
//! deadlines), `commands` runs the two dialects against rooms and the backplane, `writer` drains
//! the outbox in batches. This file holds the task's loop and its clocks.

mod access;
mod attach;
mod commands;
mod held;
mod moment;
mod reader;
mod writer;

use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::socket::Socket;
use bytes::Bytes;
use tokio::time::{Instant, Sleep};

pub(crate) use self::access::{Access, Grant};
use self::attach::Resumes;
use self::held::Held;
use self::moment::Moment;
use self::reader::{Partial, Tail};
use self::writer::{Flushed, Out};
use crate::frame::{self, close_code, OpCode};
use crate::inbound::Buckets;
use crate::outbox::{DeferredWrites, Outbox};
use crate::room::Fanout;
use crate::server::{Admitted, Shared};

/// What a session serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The room protocol (both dialects).
    Rooms,
    /// Echo every message back (conformance testing only, behind `--echo`).
    Echo,
}

/// How long a closing connection waits for the peer's close frame before dropping it.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a client must have sent nothing before its full inbound buckets are let go. A
/// sender at 10 messages a second or more keeps them; a slower one pays an allocation and a
/// timer wake-up per message (about 2 us against the message's own cost, several us). Idle
/// connections hold none: during a connection storm (10,000 clients joining within two
/// seconds), 1 s here kept the buckets of half of them, 32 bytes a connection.
const QUIET: Duration = Duration::from_millis(100);

/// Why a session ended; logged at debug level.
#[derive(Debug, thiserror::Error)]
enum End {
    #[error("peer closed the connection")]
    Eof,
    #[error("close handshake finished")]
    Closed,
    #[error("no pong within the ping timeout")]
    Unresponsive,
    #[error("close deadline passed")]
    Deadline,
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
}

/// How far the connection is in its life. It only moves forward: `Open` to `Closing`, and
/// within `Closing` `input` only towards `Ended` and `half_closed` only to true.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Frames are read and handled, deliveries written.
    Open,
    /// Our close frame is queued behind what was queued before it and nothing more is accepted
    /// for delivery; the connection is dropped at `deadline` at the latest.
    Closing {
        deadline: Moment,
        input: Input,
        /// Our close is out and the write side shut down, so the peer sees EOF after it.
        half_closed: bool,
    },
}

/// What becomes of what the peer sends once the close has begun; ordered, later wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Input {
    /// Still framed, so the peer's close frame is seen; data frames and pings are dropped.
    Frames,
    /// The stream can no longer be framed (a protocol error) or is refused (auth, rate):
    /// after the half-close it is read and thrown away, to see the peer's EOF.
    Discard,
    /// The peer's close frame arrived: nothing more is read.
    Ended,
}

/// What a session holds only now and then, boxed together: each part is rare, and every idle
/// connection pays one pointer for the four instead of one each (the task's budget, in
/// `an_idle_sessions_task_stays_within_its_budget`, has no room for the other three).
#[derive(Default)]
struct Rare {
    /// A fragmented message being received.
    partial: Option<Partial>,
    /// The sender is over its inbound limit: the socket is left unread.
    throttle: Option<Throttle>,
    /// The rest of this client's last broadcast to a large room, served a slice per turn of
    /// the loop; no further message is read until it is done.
    fanout: Option<Box<Fanout>>,
    /// Resumes in progress, in order.
    resumes: Resumes,
}

impl Rare {
    fn is_empty(&self) -> bool {
        self.partial.is_none()
            && self.throttle.is_none()
            && self.fanout.is_none()
            && self.resumes.is_empty()
    }
}

/// The sender is over its inbound limit: the socket is left unread until `until`. The clocks
/// that judge the client (ping timeout, frame deadline) stop from `since`, because it is the
/// server that chose not to read.
#[derive(Debug, Clone, Copy)]
struct Throttle {
    since: Instant,
    until: Instant,
}

/// One upgraded connection, run by a single task from upgrade to close.
///
/// It reads and parses the client's frames, runs their commands against the registry and the
/// backplane, holds the connection's room handles (so a send needs no registry lookup), and
/// writes whatever its [`Outbox`] queues. Its socket lives in the outbox, so a publisher can
/// write to it while it is idle; the outbox's ownership word keeps the two from interleaving.
/// What must stay true: every room in `rooms` has this connection as a member until the session
/// leaves it or drops; the `Drop` impl leaves them all and finishes the outbox, and the slots in
/// `Admitted` are given back with it, so a panic cannot leak memberships or connection slots.
pub(crate) struct Session {
    /// The connection's way out, and its socket (attached in [`Session::new`]).
    outbox: Arc<Outbox>,
    shared: Shared,
    mode: Mode,
    /// What auth allows this connection to do, and until when.
    access: Access,
    /// `access.deadline()`, kept inline: `next_wake` runs on every wake-up (once per delivery
    /// under load), and reading it through the boxed grant cost a cache miss each time.
    access_deadline: Option<Moment>,
    /// Rooms held, in join order: the first is dialect 1's chat room.
    rooms: Held,
    /// The unparsed tail of the last read, when there is one. Boxed: most reads end on a
    /// frame boundary, and this field is paid by every idle connection.
    tail: Option<Box<Tail>>,
    /// The inbound buckets; let go once full and quiet ([`QUIET`]).
    inbound: Buckets,
    /// What the session is in the middle of writing (a pong, frames taken, a batch), when
    /// anything.
    out: Option<Box<Out>>,
    /// What the session holds only now and then; `None` when it holds none of it.
    rare: Option<Box<Rare>>,
    phase: Phase,
    /// When the last complete frame arrived (a trickle of bytes is not a sign of life).
    last_heard: Moment,
    ping_sent: Option<Moment>,
    /// The client's address as the per-address cap counts it: the session gives its
    /// connection and address slots back in `Drop` (`Shared::give_back`). The guards that held
    /// them until the session started were 40 bytes; this is 17.
    address: IpAddr,
}

/// What woke the session.
enum Wake {
    Outbox,
    /// Redis answered a resume's question about a room's stream.
    Fetched(Option<crate::backplane::Fetched>),
    Writable(io::Result<()>),
    Readable(io::Result<()>),
    Timer,
}

pin_project_lite::pin_project! {
    /// A session's task: a future written by hand over the socket's readiness, the outbox's
    /// wake-up (which also brings the node's stop) and one timer. Its size is what every idle
    /// connection pays for its task: the same loop as an `async fn` over `select!` kept every
    /// branch's future in it (1,728 bytes, against 256 here), and made them afresh on every
    /// wake-up.
    struct Task {
        session: Session,
        // The one timer for every clock the session keeps (`Session::next_wake`).
        #[pin]
        timer: Sleep,
    }
}

impl Future for Task {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        match this.session.poll_turn(cx, this.timer) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(end) => {
                if let Err(end) = end {
                    tracing::debug!(conn = this.session.outbox.id().0, "session ended: {end}");
                }
                // The task drops the session now: it leaves its rooms and gives its slots back.
                Poll::Ready(())
            }
        }
    }
}

impl Session {
    fn new(stream: Socket, shared: Shared, admitted: Admitted, mode: Mode) -> Self {
        let Admitted {
            slots,
            outbox,
            access,
        } = admitted;
        // A fresh outbox from the handshake: nothing else attaches a stream to it.
        let _ = outbox.attach(stream);
        let running = shared.live.insert(&outbox);
        let mut session = Self {
            outbox,
            shared,
            mode,
            access_deadline: access.deadline().map(Moment::of),
            access,
            rooms: Held::default(),
            tail: None,
            inbound: Buckets::default(),
            out: None,
            rare: None,
            phase: Phase::Open,
            last_heard: Moment::now(),
            ping_sent: None,
            address: slots.hand_over(),
        };
        if !running {
            session.shutting_down();
        }
        session
    }

    /// The task that runs a session on an upgraded `stream` to its end. `early` holds bytes
    /// the HTTP layer read past the upgrade request; `admitted` is what the handshake decided
    /// (the connection's outbox, its access, its places under the caps, given back when the
    /// session drops). Must be called inside the runtime (the task's first poll is).
    pub fn run(
        stream: Socket,
        early: Bytes,
        shared: Shared,
        admitted: Admitted,
        mode: Mode,
    ) -> impl Future<Output = ()> {
        let mut session = Self::new(stream, shared, admitted, mode);
        if !early.is_empty() {
            // Copied: even an empty slice of the HTTP layer's 8 KiB read buffer would keep the
            // whole of it alive for the life of the session.
            session.batched(|s| s.ingest(&mut early.to_vec(), Instant::now()));
        }
        let first_wake = session.next_wake();
        Task {
            session,
            timer: tokio::time::sleep_until(first_wake),
        }
    }

    /// Handles what is ready, until nothing is: the body of [`Task::poll`]. Returns
    /// `Ready` only when the session is over.
    fn poll_turn(
        &mut self,
        cx: &mut Context<'_>,
        mut timer: Pin<&mut Sleep>,
    ) -> Poll<Result<(), End>> {
        if self.fanning_out() {
            // One slice per poll: the task was woken for it (below), or for something else
            // that is handled after it; either way other tasks on this worker ran in between.
            self.batched(Self::continue_fanout);
            if self.flush()? == Flushed::Yield {
                return self.yield_turn(cx);
            }
        }
        loop {
            let wake = match self.poll_wake(cx, timer.as_mut()) {
                Poll::Ready(wake) => wake,
                Poll::Pending => {
                    if self.fanning_out() {
                        cx.waker().wake_by_ref();
                    }
                    return Poll::Pending;
                }
            };
            if self.handle(wake)? == Flushed::Yield {
                return self.yield_turn(cx);
            }
            if self.resuming_any() && self.outbox.pending().0 == 0 {
                // The outbox has drained: the next chunk of a replay.
                self.continue_resumes();
            }
            // The timer is armed lazily (it may fire early and re-arm), but never late: any
            // event may have brought the next deadline forward.
            let next = self.next_wake();
            if next != timer.deadline() {
                timer.as_mut().reset(next);
            }
        }
    }

    /// The first source that is ready, in priority order: the outbox (which also brings the
    /// node's stop), the socket's write then read readiness, the clocks. Readiness is polled
    /// in place: no future is made per wake-up, and the socket's wakers live in its
    /// registration.
    fn poll_wake(&mut self, cx: &mut Context<'_>, timer: Pin<&mut Sleep>) -> Poll<Wake> {
        // Polled even while blocked on a full socket: a slow-consumer verdict must be seen
        // then most of all.
        if self.outbox.poll_notified(cx).is_ready() {
            return Poll::Ready(Wake::Outbox);
        }
        if self.writing() {
            if let Poll::Ready(r) = self.stream().poll_write_ready(cx) {
                return Poll::Ready(Wake::Writable(r));
            }
        }
        if self.reads_socket() && !self.paused() {
            if let Poll::Ready(r) = self.stream().poll_read_ready(cx) {
                return Poll::Ready(Wake::Readable(r));
            }
        }
        if self.resuming_any() {
            if let Poll::Ready(answer) = self.poll_fetch(cx) {
                return Poll::Ready(Wake::Fetched(answer));
            }
        }
        timer.poll(cx).map(|()| Wake::Timer)
    }

    fn handle(&mut self, wake: Wake) -> Result<Flushed, End> {
        match wake {
            Wake::Outbox => {
                if self.outbox.is_slow() && !self.closing() {
                    self.close_slow_consumer();
                }
                if self.outbox.is_revoked() && !self.closing() {
                    self.refuse_input(close_code::REVOKED, "revoked");
                }
                if self.outbox.is_stopping() && !self.closing() {
                    self.shutting_down();
                }
                if !self.writing() {
                    self.flush()
                } else {
                    // Waiting for the socket to take the batch: the write readiness decides.
                    Ok(Flushed::Done)
                }
            }
            Wake::Writable(Ok(())) => self.flush(),
            Wake::Writable(Err(e)) | Wake::Readable(Err(e)) => Err(End::Io(e)),
            Wake::Readable(Ok(())) => {
                self.batched(Self::read)?;
                // Commands may have queued replies to this very connection.
                self.flush()
            }
            Wake::Timer => {
                self.batched(Self::on_timer)?;
                self.flush()
            }
            Wake::Fetched(answer) => {
                self.fetched(answer);
                self.flush()
            }
        }
    }

    /// A flush used its turn with more to write: let the other tasks on this worker run, and
    /// come back (through the write readiness when a batch is waiting, else the outbox).
    fn yield_turn(&self, cx: &Context<'_>) -> Poll<Result<(), End>> {
        if !self.writing() {
            self.outbox.signal();
        } else {
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }

    /// Runs `step` (which may publish) as one batch of direct writes: the sockets it claims
    /// are written at the end of the worker's pass, or of the step off the node's runtime,
    /// each with everything owed to it by then ([`crate::outbox::DeferredWrites`]).
    /// Synchronous on purpose: a batch cannot span an `.await`.
    fn batched<R>(&mut self, step: impl FnOnce(&mut Self) -> R) -> R {
        let batch = DeferredWrites::begin();
        let result = step(self);
        batch.finish();
        result
    }

    fn shutting_down(&mut self) {
        let grace = self.shared.config.drain_timeout;
        self.begin_close(
            close_code::GOING_AWAY,
            "server shutting down",
            grace,
            Input::Frames,
        );
    }

    /// The earliest instant at which something is due: the close deadline while closing; the
    /// end of a throttle (the other clocks are stopped); else the ping schedule or the frame
    /// deadline.
    fn next_wake(&self) -> Instant {
        if let Phase::Closing { deadline, .. } = self.phase {
            return deadline.instant();
        }
        let access = self.access_deadline.map(Moment::instant);
        let earliest = |at: Instant| access.map_or(at, |a| a.min(at));
        if let Some(throttle) = self.throttle() {
            return earliest(throttle.until);
        }
        let config = &*self.shared.config;
        let ping = match self.ping_sent {
            Some(sent) => sent.after(config.ping_timeout),
            None => self.last_heard.after(config.ping_interval),
        };
        let due = [self.frame_deadline(), self.rested_at()]
            .into_iter()
            .flatten()
            .fold(ping, Instant::min);
        earliest(due)
    }

    /// When the inbound buckets, if held, can be let go: once they are full again, and the
    /// client has been quiet for [`QUIET`].
    fn rested_at(&self) -> Option<Instant> {
        let full = self.inbound.full_at(&self.shared.config.inbound)?;
        Some(full.max(self.last_heard.after(QUIET)))
    }

    /// When the frame or fragmented message in progress must be complete.
    fn frame_deadline(&self) -> Option<Instant> {
        let tail = self.tail.as_ref().map(|tail| tail.since);
        let message = self.partial().map(Partial::started);
        let first = match (tail, message) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        Some(first + self.shared.config.frame_timeout)
    }

    /// The timer fired: does whatever is due at this instant.
    fn on_timer(&mut self) -> Result<(), End> {
        let now = Instant::now();
        if let Phase::Closing { deadline, .. } = self.phase {
            return if now >= deadline.instant() {
                Err(End::Deadline)
            } else {
                Ok(())
            };
        }
        if self.access_deadline.is_some_and(|due| now >= due.instant()) {
            self.access_expired();
            return Ok(());
        }
        if let Some(&throttle) = self.throttle() {
            if now >= throttle.until {
                self.end_throttle(throttle, now);
            }
            return Ok(());
        }
        if self.frame_deadline().is_some_and(|due| now >= due) {
            self.shared.metrics.add_incomplete_closed();
            self.refuse_input(close_code::POLICY, "incomplete frame");
            return Ok(());
        }
        if self.rested_at().is_some_and(|due| now >= due) {
            self.inbound.let_go();
        }
        let config = &*self.shared.config;
        match self.ping_sent {
            Some(sent) if now >= sent.after(config.ping_timeout) => Err(End::Unresponsive),
            None if now >= self.last_heard.after(config.ping_interval) => {
                self.outbox.push_ping(frame::encode(OpCode::Ping, b""));
                self.ping_sent = Some(Moment::of(now));
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// The throttle is over: the stopped clocks move on by the time it lasted, and what was
    /// left unread in the tail is handled before the socket is read again.
    fn end_throttle(&mut self, throttle: Throttle, now: Instant) {
        let paused = now.saturating_duration_since(throttle.since);
        self.clear_throttle();
        self.last_heard = Moment::of(self.last_heard.after(paused));
        if let Some(sent) = self.ping_sent.as_mut() {
            *sent = Moment::of(sent.after(paused));
        }
        if let Some(tail) = self.tail.as_mut() {
            tail.since += paused;
        }
        if let Some(partial) = self.partial_mut() {
            partial.pause(paused);
        }
        self.ingest(&mut [], now);
    }

    /// Serves the next slice of a large room's broadcast; once it is done, what was left unread
    /// in the tail is handled before the socket is read again.
    fn continue_fanout(&mut self) {
        let Some(fanout) = self.rare.as_mut().and_then(|r| r.fanout.as_mut()) else {
            return;
        };
        if fanout.step(&self.shared.metrics) {
            if let Some(rare) = self.rare.as_mut() {
                rare.fanout = None;
            }
            self.tidy_rare();
            self.ingest(&mut [], Instant::now());
        } else {
            self.shared.metrics.add_fanout_yield();
        }
    }

    /// Drops everything queued for a consumer that fell behind and closes it with 1008.
    fn close_slow_consumer(&mut self) {
        self.outbox.discard();
        if let Some(out) = self.out.as_deref_mut() {
            for frame in std::mem::take(&mut out.taken) {
                self.outbox.release(&frame);
            }
        }
        self.begin_close(
            close_code::POLICY,
            "slow consumer",
            CLOSE_TIMEOUT,
            Input::Frames,
        );
    }

    /// Stops framing what the client sends (a protocol error, a refusal) and closes.
    fn refuse_input(&mut self, code: u16, reason: &str) {
        self.begin_close(code, reason, CLOSE_TIMEOUT, Input::Discard);
    }

    /// Starts a close: nothing more is accepted for delivery, what is queued goes out, then
    /// the close frame, then the peer has `grace` to answer. Once closing, a second call only
    /// moves `input` on: the first close frame is the one sent.
    fn begin_close(&mut self, code: u16, reason: &str, grace: Duration, input: Input) {
        if input >= Input::Discard {
            // Nothing more will be framed: keep no buffer for it.
            self.take_partial();
            self.tail = None;
        }
        if let Phase::Closing { input: now, .. } = &mut self.phase {
            *now = (*now).max(input);
            return;
        }
        self.clear_throttle();
        let _ = self.take_pong();
        self.outbox.close_with(frame::close(code, reason));
        self.phase = Phase::Closing {
            deadline: Moment::of(Instant::now() + grace),
            input,
            half_closed: false,
        };
    }

    fn rare(&self) -> Option<&Rare> {
        self.rare.as_deref()
    }

    /// The rare state, made when first needed.
    fn rare_mut(&mut self) -> &mut Rare {
        self.rare.get_or_insert_with(Box::default)
    }

    /// Frees the rare state once nothing in it is in progress.
    fn tidy_rare(&mut self) {
        if self.rare().is_some_and(Rare::is_empty) {
            self.rare = None;
        }
    }

    fn throttle(&self) -> Option<&Throttle> {
        self.rare()?.throttle.as_ref()
    }

    fn clear_throttle(&mut self) {
        if let Some(rare) = self.rare.as_mut() {
            rare.throttle = None;
        }
        self.tidy_rare();
    }

    fn partial(&self) -> Option<&Partial> {
        self.rare()?.partial.as_ref()
    }

    fn partial_mut(&mut self) -> Option<&mut Partial> {
        self.rare.as_mut()?.partial.as_mut()
    }

    fn take_partial(&mut self) -> Option<Partial> {
        let partial = self.rare.as_mut()?.partial.take();
        self.tidy_rare();
        partial
    }

    fn fanning_out(&self) -> bool {
        self.rare().is_some_and(|r| r.fanout.is_some())
    }

    fn resuming_any(&self) -> bool {
        self.rare().is_some_and(|r| !r.resumes.is_empty())
    }

    /// Reading waits: the sender is over its limit, or its last broadcast is still going out.
    fn paused(&self) -> bool {
        self.rare()
            .is_some_and(|r| r.throttle.is_some() || r.fanout.is_some())
    }

    /// The connection's socket, shared with publishers through the outbox.
    fn stream(&self) -> &Socket {
        self.outbox
            .stream()
            .expect("Session::new attaches the stream before anything runs")
    }

    fn closing(&self) -> bool {
        matches!(self.phase, Phase::Closing { .. })
    }

    /// Whether what arrives is framed and handled.
    fn framing(&self) -> bool {
        matches!(
            self.phase,
            Phase::Open
                | Phase::Closing {
                    input: Input::Frames,
                    ..
                }
        )
    }

    /// Whether the loop waits on the socket's read readiness: not after the peer's close, nor
    /// for refused input until our close is out (then only to see the peer's EOF).
    fn reads_socket(&self) -> bool {
        match self.phase {
            Phase::Open => true,
            Phase::Closing {
                input, half_closed, ..
            } => match input {
                Input::Frames => true,
                Input::Discard => half_closed,
                Input::Ended => false,
            },
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // A broadcast the node accepted is served whole, even when its sender is gone.
        if let Some(mut fanout) = self.rare.as_mut().and_then(|r| r.fanout.take()) {
            fanout.finish_now(&self.shared.metrics);
        }
        self.outbox.finish();
        // Publishers may hold the outbox (and so the socket) a moment longer: end the TCP
        // connection now, as dropping the socket used to, rather than when the last one lets go.
        if let Some(stream) = self.outbox.stream() {
            let _ = socket2::SockRef::from(stream).shutdown(std::net::Shutdown::Both);
        }
        let id = self.outbox.id();
        for room in std::mem::take(&mut self.rooms) {
            self.shared.registry.leave(&room, id);
        }
        self.shared.live.remove(id);
        self.shared.give_back(self.address);
    }
}

#[cfg(test)]
mod tests {
    use std::panic::{catch_unwind, AssertUnwindSafe};

    use crate::config::Config;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::outbox::ConnId;

    /// A server-side socket, the client end that keeps it open, and the client's address.
    async fn accepted() -> (TcpStream, TcpStream, std::net::SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (stream, _) = listener.accept().await.expect("accept");
        (stream, client, addr)
    }

    fn admitted(shared: &Shared, addr: std::net::SocketAddr) -> Admitted {
        let slots = crate::server::Slots::new(
            shared.metrics.try_connection_slot(10).expect("a free slot"),
            shared
                .admission
                .try_admit(addr.ip(), Instant::now())
                .expect("no address caps"),
        );
        Admitted {
            slots,
            outbox: Arc::new(Outbox::new(ConnId(1), shared.outbox_limits())),
            access: Access::Open,
        }
    }

    /// Cleanup lives in `Drop`, so a bug that panics mid-session cannot leak the rooms it holds
    /// (they would keep their Redis subscriptions) or its connection slot.
    #[tokio::test]
    async fn a_panicking_session_still_leaves_its_rooms_and_gives_its_slot_back() {
        let shared = Shared::new(Config::default()).expect("shared state");
        let (stream, _client, addr) = accepted().await;
        let admitted = admitted(&shared, addr);
        let mut session = Session::new(stream.into(), shared.clone(), admitted, Mode::Rooms);
        session.join("a").expect("join a");
        session.join("b").expect("join b");
        assert_eq!(shared.registry.room_count(), 2);
        assert_eq!(shared.metrics.snapshot().connections, 1);
        let outcome = catch_unwind(AssertUnwindSafe(move || {
            let _session = session;
            panic!("a bug in a command handler");
        }));
        assert!(outcome.is_err());
        assert_eq!(shared.registry.room_count(), 0, "rooms leaked");
        assert_eq!(shared.metrics.snapshot().connections, 0, "slot leaked");
    }

    /// The inbound buckets an idle connection would otherwise keep are let go by the session's
    /// own timer once they are full and the client has been quiet: a frame read a second ago
    /// (its instant passed in, so no test waits) leaves buckets that the next timer turn drops.
    #[tokio::test]
    async fn a_quiet_clients_buckets_are_let_go_on_the_next_timer_turn() {
        let shared = Shared::new(Config::default()).expect("shared state");
        let (stream, _client, addr) = accepted().await;
        let admitted = admitted(&shared, addr);
        let mut session = Session::new(stream.into(), shared.clone(), admitted, Mode::Rooms);
        let limits = shared.config.inbound;
        assert_eq!(
            session.inbound.full_at(&limits),
            None,
            "none before a frame"
        );
        let a_second_ago = Instant::now() - Duration::from_secs(1);
        let mut ping = frame::encode_client(0x89, b"", [1, 2, 3, 4]);
        session.ingest(&mut ping, a_second_ago);
        assert!(
            session.inbound.full_at(&limits).is_some(),
            "a frame was charged"
        );
        assert!(
            session.next_wake() <= Instant::now(),
            "the timer is due now"
        );
        session.on_timer().expect("the session goes on");
        assert_eq!(session.inbound.full_at(&limits), None, "let go");
    }

    /// The task is the largest thing an idle connection holds, and fields added to the
    /// session land in it: this says when it grows. tokio adds 104 bytes and rounds the task
    /// up to a multiple of 128 (heaptrack saw 504-byte allocations for a 400-byte future), so
    /// up to 280 bytes of future make a 384-byte task, three eighths of the 1 KiB an idle
    /// connection may cost in all; 281 would make it 512.
    #[tokio::test]
    async fn an_idle_sessions_task_stays_within_its_budget() {
        const BUDGET: usize = 280;
        let shared = Shared::new(Config::default()).expect("shared state");
        let (stream, _client, addr) = accepted().await;
        let admitted = admitted(&shared, addr);
        let task = Session::run(stream.into(), Bytes::new(), shared, admitted, Mode::Rooms);
        let size = std::mem::size_of_val(&task);
        assert!(
            size <= BUDGET,
            "the session task is {size} bytes, over {BUDGET}"
        );
    }
}
