//! One WebSocket connection after the upgrade: reads client frames, runs their commands, holds
//! the connection's rooms, and writes everything its outbox collects.
//!
//! A session is a single task that owns its `TcpStream` whole and waits on readiness, not on
//! buffered reads: while idle it holds no read or write buffer at all. Reads land in a stack
//! buffer and are parsed in place; only a frame split across two reads is kept. Writes drain the
//! outbox in batches: small frames are copied back to back into one buffer (one contiguous
//! write beats many iovecs), large ones go out as their own iovec, and each batch is one
//! `writev`.

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::backplane::{BackplaneError, Publish};
use crate::config::Config;
use crate::frame::{self, close_code, FrameError, OpCode};
use crate::outbox::{ConnId, Outbox};
use crate::protocol::{self, ClientError, Command};
use crate::room::Room;
use crate::server::Shared;

/// What a session serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The room protocol (both dialects).
    Rooms,
    /// Echo every message back (conformance testing only, behind `--echo`).
    Echo,
}

/// Bytes read per `read` syscall; lives on the stack only while a read is being parsed.
const READ_CHUNK: usize = 16 * 1024;
/// Frames up to this size are copied into the batch buffer; larger ones are written in place.
const COALESCE_MAX: usize = 1024;
/// Most bytes taken from the outbox into one batch.
const BATCH_BYTES: usize = 256 * 1024;
/// Most iovecs handed to one `writev`.
const MAX_IOV: usize = 64;
/// Socket writes per wake-up before yielding to other tasks on this worker.
const WRITES_PER_TURN: usize = 16;
/// How long a closing connection waits for the peer's close frame before dropping it.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

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

/// A fragmented message being reassembled.
struct Partial {
    opcode: OpCode,
    data: Vec<u8>,
}

/// Frames taken from the outbox and not yet fully written.
#[derive(Default)]
struct Batch {
    segs: VecDeque<Bytes>,
    small: BytesMut,
    /// Frames popped since the last write was counted, for the frames-per-write metric.
    uncounted: u64,
}

/// One upgraded connection, run by a single task from upgrade to close.
///
/// It reads and parses the client's frames, runs their commands against the registry and the
/// backplane, holds the connection's room handles (so a send needs no registry lookup), and is
/// the only writer of its socket: fan-out on other tasks only pushes into its [`Outbox`].
/// What must stay true: every room in `rooms` has this connection as a member until the session
/// leaves it, and leaving happens before the task ends.
pub(crate) struct Session {
    stream: TcpStream,
    outbox: Arc<Outbox>,
    shared: Shared,
    mode: Mode,
    /// Rooms held, in join order: the first is dialect 1's chat room.
    rooms: Vec<Arc<Room>>,
    /// The unparsed tail of the last read when it ended inside a frame.
    rbuf: Vec<u8>,
    partial: Option<Partial>,
    /// Frames taken from the outbox in one swap and not yet moved into the batch.
    taken: VecDeque<Bytes>,
    batch: Batch,
    reading: bool,
    close_sent: bool,
    close_received: bool,
    half_closed: bool,
    /// After a protocol error the byte stream cannot be framed any more: reads are discarded
    /// and only EOF (or the deadline) ends the session.
    poisoned: bool,
    /// Set once closing starts: the connection is dropped at this instant at the latest.
    deadline: Option<Instant>,
    last_heard: Instant,
    ping_sent: Option<Instant>,
}

/// What woke the session.
enum Wake {
    Shutdown,
    Outbox,
    Writable(io::Result<()>),
    Readable(io::Result<()>),
    Timer,
}

impl Session {
    fn new(stream: TcpStream, id: ConnId, shared: Shared, mode: Mode) -> Self {
        let outbox = Arc::new(Outbox::new(id, shared.outbox_limits()));
        Self {
            stream,
            outbox,
            shared,
            mode,
            rooms: Vec::new(),
            rbuf: Vec::new(),
            partial: None,
            taken: VecDeque::new(),
            batch: Batch::default(),
            reading: true,
            close_sent: false,
            close_received: false,
            half_closed: false,
            poisoned: false,
            deadline: None,
            last_heard: Instant::now(),
            ping_sent: None,
        }
    }

    /// The future that runs a session on an upgraded `stream` to its end. `early` holds bytes
    /// the HTTP layer read past the upgrade request; `shutdown` turns true when the node stops.
    /// A plain function, so what is only needed to start is not stored in the future.
    pub fn run(
        stream: TcpStream,
        early: Bytes,
        id: ConnId,
        shared: Shared,
        mode: Mode,
        shutdown: watch::Receiver<bool>,
    ) -> impl Future<Output = ()> {
        // `early` is usually an empty slice of the HTTP layer's 8 KiB read buffer, and even an
        // empty `Bytes` keeps that whole allocation alive: copy what it holds and let the
        // buffer go now, not at the end of the session.
        let early = (!early.is_empty()).then(|| early.to_vec());
        Self::new(stream, id, shared, mode).run_to_end(early, shutdown)
    }

    async fn run_to_end(mut self, early: Option<Vec<u8>>, mut shutdown: watch::Receiver<bool>) {
        let id = self.outbox.id();
        if let Err(end) = self.serve(early, &mut shutdown).await {
            tracing::debug!(conn = id.0, "session ended: {end}");
        }
        self.outbox.finish();
        for room in std::mem::take(&mut self.rooms) {
            self.shared.registry.leave(&room, id);
        }
    }

    async fn serve(
        &mut self,
        early: Option<Vec<u8>>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), End> {
        if let Some(mut early) = early {
            self.ingest(&mut early)?;
        }
        let config = Arc::clone(&self.shared.config);
        let timer = tokio::time::sleep(config.ping_interval);
        tokio::pin!(timer);
        let mut stopping = *shutdown.borrow();
        // One future for the whole loop: a fresh `changed()` per round would register with and
        // unregister from the channel's waiter list (a lock each) on every wake-up.
        let stop_signal = shutdown.changed();
        tokio::pin!(stop_signal);
        if stopping {
            self.begin_close(
                close_code::GOING_AWAY,
                "server shutting down",
                config.drain_timeout,
            );
        }
        loop {
            let writing = !self.batch.segs.is_empty();
            let wake = tokio::select! {
                biased;
                _ = &mut stop_signal, if !stopping => Wake::Shutdown,
                // Polled even while blocked on a full socket: a slow-consumer verdict must be
                // seen then most of all.
                _ = self.outbox.notified() => Wake::Outbox,
                r = self.stream.writable(), if writing => Wake::Writable(r),
                r = self.stream.readable(), if self.reading => Wake::Readable(r),
                _ = &mut timer => Wake::Timer,
            };
            match wake {
                Wake::Shutdown => {
                    stopping = true;
                    self.begin_close(
                        close_code::GOING_AWAY,
                        "server shutting down",
                        config.drain_timeout,
                    );
                    timer
                        .as_mut()
                        .reset(self.deadline.unwrap_or_else(Instant::now));
                }
                Wake::Outbox => {
                    if self.outbox.is_slow() && !self.close_sent {
                        self.close_slow_consumer();
                        timer
                            .as_mut()
                            .reset(self.deadline.unwrap_or_else(Instant::now));
                    }
                    if !writing {
                        self.flush().await?;
                    }
                }
                Wake::Writable(Ok(())) => self.flush().await?,
                Wake::Writable(Err(e)) | Wake::Readable(Err(e)) => return Err(End::Io(e)),
                Wake::Readable(Ok(())) => {
                    let deadline_before = self.deadline;
                    self.read()?;
                    if self.deadline != deadline_before {
                        timer
                            .as_mut()
                            .reset(self.deadline.unwrap_or_else(Instant::now));
                    }
                    // Commands may have queued replies to this very connection.
                    self.flush().await?;
                }
                Wake::Timer => {
                    let next = self.on_timer(&config)?;
                    timer.as_mut().reset(next);
                }
            }
        }
    }

    /// The timer fired: enforces the close deadline and the ping schedule, and returns when the
    /// timer should fire next.
    fn on_timer(&mut self, config: &Config) -> Result<Instant, End> {
        let now = Instant::now();
        if let Some(deadline) = self.deadline {
            if now >= deadline {
                return Err(End::Deadline);
            }
            return Ok(deadline);
        }
        Ok(match self.ping_sent {
            Some(sent) if now >= sent + config.ping_timeout => return Err(End::Unresponsive),
            Some(sent) => sent + config.ping_timeout,
            None if now >= self.last_heard + config.ping_interval => {
                self.outbox.push_control(frame::encode(OpCode::Ping, b""));
                self.ping_sent = Some(now);
                now + config.ping_timeout
            }
            None => self.last_heard + config.ping_interval,
        })
    }

    /// Drops everything queued for a consumer that fell behind and closes it with 1008.
    fn close_slow_consumer(&mut self) {
        self.outbox.discard();
        for frame in std::mem::take(&mut self.taken) {
            self.outbox.release(&frame);
        }
        self.begin_close(close_code::POLICY, "slow consumer", CLOSE_TIMEOUT);
    }

    /// Starts a server-side close: nothing more is accepted for delivery, what is queued goes
    /// out, then the close frame, then the peer has `grace` to answer.
    fn begin_close(&mut self, code: u16, reason: &str, grace: Duration) {
        if self.close_sent {
            return;
        }
        self.close_sent = true;
        self.outbox.finish();
        self.outbox.push_control(frame::close(code, reason));
        self.deadline = Some(Instant::now() + grace);
    }

    /// Reads once and handles every complete frame that arrived.
    fn read(&mut self) -> Result<(), End> {
        let mut chunk = [0u8; READ_CHUNK];
        let n = match self.stream.try_read(&mut chunk) {
            Ok(0) => return Err(End::Eof),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(End::Io(e)),
        };
        self.last_heard = Instant::now();
        self.ping_sent = None;
        if self.poisoned {
            return Ok(());
        }
        self.ingest(&mut chunk[..n])
    }

    /// Parses `data` (fresh bytes from the socket) together with any kept tail.
    fn ingest(&mut self, data: &mut [u8]) -> Result<(), End> {
        if self.rbuf.is_empty() {
            let used = self.parse(data);
            if used < data.len() && self.reading {
                self.rbuf.extend_from_slice(&data[used..]);
            }
        } else {
            let mut buf = std::mem::take(&mut self.rbuf);
            buf.extend_from_slice(data);
            let used = self.parse(&mut buf);
            if used < buf.len() && self.reading {
                buf.drain(..used);
                self.rbuf = buf;
            }
        }
        Ok(())
    }

    /// Handles whole frames from the front of `buf`; returns how many bytes they took.
    fn parse(&mut self, buf: &mut [u8]) -> usize {
        let max = self.shared.config.max_message_bytes;
        let mut at = 0;
        while self.reading {
            let header = match frame::parse_header(&buf[at..], max) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(e) => {
                    self.protocol_error(e);
                    break;
                }
            };
            let end = at + header.frame_len();
            if end > buf.len() {
                // Reserve for the rest of this frame now, so it arrives without regrowth.
                self.rbuf.reserve(header.frame_len());
                break;
            }
            let payload = frame::unmask(&mut buf[at..end], &header);
            if let Err(e) = self.on_frame(header.fin, header.opcode, payload, max) {
                self.protocol_error(e);
                break;
            }
            at = end;
        }
        at
    }

    fn protocol_error(&mut self, e: FrameError) {
        tracing::debug!(conn = self.outbox.id().0, "protocol error: {e}");
        self.reading = false;
        self.poisoned = true;
        self.partial = None;
        self.rbuf = Vec::new();
        self.begin_close(e.close_code(), &e.to_string(), CLOSE_TIMEOUT);
    }

    fn on_frame(
        &mut self,
        fin: bool,
        opcode: OpCode,
        payload: &mut [u8],
        max: usize,
    ) -> Result<(), FrameError> {
        match opcode {
            OpCode::Ping => {
                if !self.close_sent {
                    self.outbox
                        .push_control(frame::encode(OpCode::Pong, payload));
                }
            }
            OpCode::Pong => {}
            OpCode::Close => {
                let code = frame::parse_close(payload)?;
                self.close_received = true;
                self.reading = false;
                self.begin_close(code, "", CLOSE_TIMEOUT);
            }
            OpCode::Text | OpCode::Binary if self.close_sent => {}
            OpCode::Continuation if self.close_sent => {}
            OpCode::Text | OpCode::Binary => {
                if self.partial.is_some() {
                    return Err(FrameError::UnfinishedMessage);
                }
                if fin {
                    self.on_message(opcode, payload)?;
                } else {
                    self.partial = Some(Partial {
                        opcode,
                        data: payload.to_vec(),
                    });
                }
            }
            OpCode::Continuation => {
                let partial = self
                    .partial
                    .as_mut()
                    .ok_or(FrameError::UnexpectedContinuation)?;
                if partial.data.len() + payload.len() > max {
                    return Err(FrameError::TooBig(max));
                }
                partial.data.extend_from_slice(payload);
                if fin {
                    if let Some(mut whole) = self.partial.take() {
                        self.on_message(whole.opcode, &mut whole.data)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn on_message(&mut self, opcode: OpCode, payload: &mut [u8]) -> Result<(), FrameError> {
        if opcode == OpCode::Text && std::str::from_utf8(payload).is_err() {
            return Err(FrameError::InvalidUtf8);
        }
        if self.mode == Mode::Echo {
            self.outbox
                .push(&frame::encode(opcode, payload), &self.shared.metrics);
            return Ok(());
        }
        self.shared.metrics.add_message_in();
        let outcome = if opcode == OpCode::Binary {
            Err(ClientError::UnsupportedFrame)
        } else {
            protocol::decode(payload).and_then(|cmd| self.on_command(cmd))
        };
        if let Err(e) = outcome {
            self.outbox.push(&e.to_frame(), &self.shared.metrics);
        }
        Ok(())
    }

    fn on_command(&mut self, cmd: Command<'_>) -> Result<(), ClientError> {
        match cmd {
            Command::Join { room } | Command::Subscribe { room } => self.join(room),
            Command::Leave { room } | Command::Unsubscribe { room } => {
                if let Some(at) = self.rooms.iter().position(|r| r.id().as_str() == room) {
                    let held = self.rooms.remove(at);
                    self.shared.registry.leave(&held, self.outbox.id());
                }
                Ok(())
            }
            Command::Chat { message, room } => {
                let held = match room {
                    Some(name) => self.held(name).ok_or_else(|| {
                        ClientError::NotInRoom(format!(
                            "chat to a room you have not joined: {name}"
                        ))
                    })?,
                    None => self.rooms.first().ok_or_else(|| {
                        ClientError::NotInRoom("join a room before you chat".to_owned())
                    })?,
                };
                self.publish(Publish {
                    held: Some(held),
                    room: held.id().as_str(),
                    message,
                    skip: Some(self.outbox.id()),
                })
            }
            Command::SendMessage { room, message } => {
                self.check_room_name(room)?;
                self.publish(Publish {
                    held: self.held(room),
                    room,
                    message,
                    skip: None,
                })
            }
        }
    }

    fn publish(&self, msg: Publish<'_>) -> Result<(), ClientError> {
        self.shared
            .backplane
            .publish(msg)
            .map_err(|BackplaneError::Unavailable| ClientError::BackplaneUnavailable)
    }

    fn held(&self, name: &str) -> Option<&Arc<Room>> {
        self.rooms.iter().find(|r| r.id().as_str() == name)
    }

    fn check_room_name(&self, name: &str) -> Result<(), ClientError> {
        let max = self.shared.config.max_room_name;
        if name.len() > max {
            return Err(ClientError::Limit(format!(
                "room name is longer than {max} bytes"
            )));
        }
        Ok(())
    }

    fn join(&mut self, name: &str) -> Result<(), ClientError> {
        if self.held(name).is_some() {
            return Ok(());
        }
        self.check_room_name(name)?;
        let max = self.shared.config.max_rooms_per_connection;
        if self.rooms.len() >= max {
            return Err(ClientError::Limit(format!(
                "a connection may hold at most {max} rooms"
            )));
        }
        let room = self.shared.registry.join(name, &self.outbox);
        self.rooms.push(room);
        Ok(())
    }

    /// Writes until the outbox is empty or the socket is full. Returns `Err(Closed)` once our
    /// close frame is out and the peer has no more to say.
    async fn flush(&mut self) -> Result<(), End> {
        for _ in 0..WRITES_PER_TURN {
            if self.batch.segs.is_empty() && !self.fill() {
                // Nothing left to write: keep no buffer while idle.
                self.batch.small = BytesMut::new();
                self.batch.segs = VecDeque::new();
                self.taken = VecDeque::new();
                if self.close_sent && self.outbox.pending().0 == 0 {
                    self.after_close_flushed().await?;
                }
                return Ok(());
            }
            let written = {
                let mut iov = [IoSlice::new(&[]); MAX_IOV];
                let mut count = 0;
                for (slot, seg) in iov.iter_mut().zip(self.batch.segs.iter()) {
                    *slot = IoSlice::new(seg);
                    count += 1;
                }
                // One segment (the usual case) takes plain write(2), a little cheaper than
                // writev(2) with a single iovec.
                if count == 1 {
                    self.stream.try_write(&iov[0])
                } else {
                    self.stream.try_write_vectored(&iov[..count])
                }
            };
            match written {
                Ok(0) => return Err(End::Io(io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    self.shared
                        .metrics
                        .add_write(std::mem::take(&mut self.batch.uncounted), n as u64);
                    self.batch.advance(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(End::Io(e)),
            }
        }
        // Still more to write: let other sessions on this worker run, then come back. With the
        // batch empty the loop waits on the outbox, so owe ourselves a wake-up.
        tokio::task::yield_now().await;
        if self.batch.segs.is_empty() {
            self.outbox.wake();
        }
        Ok(())
    }

    async fn after_close_flushed(&mut self) -> Result<(), End> {
        if self.close_received {
            return Err(End::Closed);
        }
        if !self.half_closed {
            // Our close is out; half-close so the peer sees EOF after it, and keep reading
            // until the peer's close frame (or EOF) or the deadline.
            self.half_closed = true;
            let _ = self.stream.shutdown().await;
            self.reading = true;
        }
        Ok(())
    }

    /// Moves frames from the outbox into the batch; false when there was nothing to move.
    fn fill(&mut self) -> bool {
        self.outbox.begin_drain();
        let Some(first) = self.next_frame() else {
            return false;
        };
        let Some(second) = self.next_frame() else {
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
            let Some(frame) = self.next_frame() else {
                break;
            };
            taken += frame.len();
            self.batch.add(frame);
        }
        self.batch.seal();
        true
    }

    /// The next frame to write, taking everything the outbox holds when the last take is used up.
    fn next_frame(&mut self) -> Option<Bytes> {
        if self.taken.is_empty() {
            self.outbox.take_all(&mut self.taken);
        }
        let frame = self.taken.pop_front()?;
        self.outbox.release(&frame);
        Some(frame)
    }
}

impl Batch {
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
