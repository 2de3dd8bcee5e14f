//! The session's inbound side: socket bytes to frames, each frame admitted by the connection's
//! inbound buckets before its payload is looked at, fragments reassembled within their
//! deadline.
//!
//! Reads land in a stack buffer and are parsed in place; only a frame split across two reads
//! (or frames left unread while throttled) is copied into a [`Tail`], and only as many bytes
//! as have arrived: a header that declares 64 KiB reserves nothing.

use std::io;
use std::time::Duration;

use tokio::time::Instant;

use super::moment::Moment;
use super::{End, Input, Session, Throttle, CLOSE_TIMEOUT};
use crate::frame::{self, close_code, FrameError, Header, OpCode};
use crate::inbound::Admit;
use crate::protocol::ClientError;

/// Bytes read per `read` syscall; lives on the stack only while a read is being parsed.
const READ_CHUNK: usize = 16 * 1024;

/// The unparsed end of the last read: a frame not yet complete, or (while throttled) frames
/// not yet admitted.
pub(super) struct Tail {
    /// Never reserved beyond what has arrived.
    pub(super) bytes: Vec<u8>,
    /// When the first byte of the frame at its head arrived (the frame deadline runs from it).
    pub(super) since: Instant,
}

/// A fragmented message being reassembled.
pub(super) struct Partial {
    opcode: OpCode,
    data: Vec<u8>,
    /// When its first frame arrived: the message must be complete within the frame timeout.
    started: Instant,
    /// A fragment was refused under policy `reject`: the rest is read and thrown away.
    refused: bool,
}

impl Partial {
    pub(super) fn started(&self) -> Instant {
        self.started
    }

    /// Moves the start on by a throttle's length (the server chose not to read meanwhile).
    pub(super) fn pause(&mut self, paused: Duration) {
        self.started += paused;
    }
}

/// What to do with one complete frame.
enum Verdict {
    Handle,
    /// Consumed and refused (policy `reject`).
    Skip,
    /// Left unread: throttled, or the connection is closing for its rate.
    Stop,
}

impl Session {
    /// Reads once and handles every complete frame that arrived.
    pub(super) fn read(&mut self) -> Result<(), End> {
        let mut chunk = [0u8; READ_CHUNK];
        let n = match self.stream().try_read(&mut chunk) {
            Ok(0) => return Err(End::Eof),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(End::Io(e)),
        };
        if self.framing() {
            self.ingest(&mut chunk[..n], Instant::now());
        }
        Ok(())
    }

    /// Parses `data` (fresh bytes from the socket, or none after a throttle) behind any kept
    /// tail, and keeps what is left unparsed.
    pub(super) fn ingest(&mut self, data: &mut [u8], now: Instant) {
        // Kept only while framing: once a close stops it, what is left is never parsed.
        // The frame deadline runs from the first byte of the frame now at the head of the
        // tail: a new one started in this read if any frame completed, else the old one goes on.
        match self.tail.take() {
            None => {
                let used = self.parse(data, now);
                if used < data.len() && self.framing() {
                    self.tail = Some(Box::new(Tail {
                        bytes: data[used..].to_vec(),
                        since: now,
                    }));
                }
            }
            Some(mut tail) => {
                tail.bytes.extend_from_slice(data);
                let used = self.parse(&mut tail.bytes, now);
                if used < tail.bytes.len() && self.framing() {
                    tail.bytes.drain(..used);
                    if used > 0 {
                        tail.since = now;
                    }
                    self.tail = Some(tail);
                }
            }
        }
    }

    /// Handles whole frames from the front of `buf`; returns how many bytes they took.
    fn parse(&mut self, buf: &mut [u8], now: Instant) -> usize {
        let max = self.shared.config.max_message_bytes;
        let mut at = 0;
        while self.framing() && !self.paused() {
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
                break;
            }
            let verdict = self.admit(&header, now);
            if matches!(verdict, Verdict::Stop) {
                break;
            }
            // Only a complete frame is a sign of life.
            self.last_heard = Moment::of(now);
            self.ping_sent = None;
            let payload = frame::unmask(&mut buf[at..end], &header);
            let handled = match verdict {
                Verdict::Handle => self.on_frame(header.fin, header.opcode, payload, max, now),
                _ => self.on_refused(header.fin, header.opcode, now),
            };
            if let Err(e) = handled {
                self.protocol_error(e);
                break;
            }
            at = end;
        }
        at
    }

    /// Charges the inbound buckets for one complete frame. A close frame is never charged (it
    /// must always get through), nor is anything read after our own close.
    fn admit(&mut self, header: &Header, now: Instant) -> Verdict {
        if header.opcode == OpCode::Close || self.closing() {
            return Verdict::Handle;
        }
        let limits = &self.shared.config.inbound;
        match self.inbound.admit(limits, header.frame_len(), now) {
            Admit::Yes => Verdict::Handle,
            Admit::WaitUntil(until) => {
                self.shared.metrics.add_throttled();
                self.rare_mut().throttle = Some(Throttle { since: now, until });
                Verdict::Stop
            }
            Admit::Refuse => Verdict::Skip,
            Admit::Close => {
                self.shared.metrics.add_rate_limit_closed();
                self.refuse_input(close_code::RATE_LIMITED, "rate limited");
                Verdict::Stop
            }
        }
    }

    /// Charges the deliveries a message caused to the fan-out budget; past it, the session
    /// stops reading until the budget is out of debt (the next frame waits, unread).
    pub(super) fn charge_fanout(&mut self, deliveries: usize) {
        let now = Instant::now();
        let limits = &self.shared.config.inbound;
        if let Some(until) = self.inbound.charge_fanout(limits, deliveries, now) {
            self.shared.metrics.add_throttled();
            self.rare_mut().throttle = Some(Throttle { since: now, until });
        }
    }

    /// A frame refused under policy `reject`: a message gets one `rate_limited` reply (a
    /// fragmented one is dropped whole); a ping gets no pong.
    fn on_refused(&mut self, fin: bool, opcode: OpCode, now: Instant) -> Result<(), FrameError> {
        self.shared.metrics.add_rate_limited();
        let first_refusal = match opcode {
            OpCode::Ping | OpCode::Pong | OpCode::Close => false,
            OpCode::Text | OpCode::Binary => {
                if self.partial().is_some() {
                    return Err(FrameError::UnfinishedMessage);
                }
                if !fin {
                    self.rare_mut().partial = Some(Partial {
                        opcode,
                        data: Vec::new(),
                        started: now,
                        refused: true,
                    });
                }
                true
            }
            OpCode::Continuation => {
                let partial = self
                    .partial_mut()
                    .ok_or(FrameError::UnexpectedContinuation)?;
                let first = !partial.refused;
                partial.refused = true;
                partial.data = Vec::new();
                if fin {
                    self.take_partial();
                }
                first
            }
        };
        if first_refusal {
            let limits = &self.shared.config.inbound;
            let reply = ClientError::RateLimited {
                frames_per_sec: limits.frames_per_sec,
                bytes_per_sec: limits.bytes_per_sec,
            };
            self.outbox.push(&reply.to_frame(), &self.shared.metrics);
        }
        Ok(())
    }

    /// The byte stream cannot be framed any more: stop framing it and close.
    fn protocol_error(&mut self, e: FrameError) {
        tracing::debug!(conn = self.outbox.id().0, "protocol error: {e}");
        self.refuse_input(e.close_code(), &e.to_string());
    }

    fn on_frame(
        &mut self,
        fin: bool,
        opcode: OpCode,
        payload: &mut [u8],
        max: usize,
        now: Instant,
    ) -> Result<(), FrameError> {
        match opcode {
            OpCode::Ping => {
                if !self.closing() {
                    let pong = frame::encode(OpCode::Pong, payload);
                    // The pong already waiting goes out now if the socket takes it (a client
                    // that reads gets a pong per ping, as Autobahn 2.10 expects); only when the
                    // socket is full is it replaced, so a client that never reads holds one.
                    let waiting = self.take_pong();
                    if waiting.and_then(|old| self.write_now(old)).is_some() {
                        self.shared.metrics.add_pong_replaced();
                    }
                    self.out.get_or_insert_with(Box::default).pong = Some(pong);
                    // The pong goes before anything this session sends after the ping (RFC
                    // 6455 lets a pong cut in, Autobahn 5.6 expects it first): hold the socket,
                    // so replies and deliveries queue behind it, and owe ourselves the flush
                    // that writes it first.
                    let _ = self.outbox.claim();
                    self.outbox.signal();
                }
            }
            OpCode::Pong => {}
            OpCode::Close => {
                let code = frame::parse_close(payload)?;
                self.begin_close(code, "", CLOSE_TIMEOUT, Input::Ended);
            }
            OpCode::Text | OpCode::Binary | OpCode::Continuation if self.closing() => {}
            OpCode::Text | OpCode::Binary => {
                if self.partial().is_some() {
                    return Err(FrameError::UnfinishedMessage);
                }
                if fin {
                    self.on_message(opcode, payload)?;
                } else {
                    self.rare_mut().partial = Some(Partial {
                        opcode,
                        data: payload.to_vec(),
                        started: now,
                        refused: false,
                    });
                }
            }
            OpCode::Continuation => self.on_continuation(fin, payload, max)?,
        }
        Ok(())
    }

    fn on_continuation(&mut self, fin: bool, payload: &[u8], max: usize) -> Result<(), FrameError> {
        let partial = self
            .partial_mut()
            .ok_or(FrameError::UnexpectedContinuation)?;
        if !partial.refused {
            if partial.data.len() + payload.len() > max {
                return Err(FrameError::TooBig(max));
            }
            partial.data.extend_from_slice(payload);
        }
        if fin {
            if let Some(mut whole) = self.take_partial() {
                if !whole.refused {
                    self.on_message(whole.opcode, &mut whole.data)?;
                }
            }
        }
        Ok(())
    }
}
