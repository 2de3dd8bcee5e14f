//! Direct writes under stress, through real sockets: publishers writing to idle recipients'
//! sockets themselves, partial writes and full sockets handing over to the sessions, readers
//! that stall and resume, and connections coming and going while traffic flows. Every frame a
//! reader gets is compared byte for byte with what its sender sent, in each sender's order, up
//! to the last message and then the close frame.
//!
//! The node's sockets get a 4 KiB send buffer, so a large frame never goes out in one write:
//! partial writes, parked remainders and hand-overs to the session are the common case here.
//!
//! What each check catches:
//! - framing: tungstenite (and, for the raw readers, [`strict_header`], which is stricter) refuses
//!   a stream that is not a run of well-formed frames. Two frames' bytes interleaved, or the rest
//!   of a partly written frame skipped, sent twice or overtaken, puts payload where a header
//!   should be: a bad opcode, a mask bit, an impossible length, or invalid UTF-8.
//! - content: each message is compared whole with the one its sender made for that sequence
//!   number, whose filler depends on sender, number and position, so a splice of two frames that
//!   still happens to frame correctly differs in its bytes.
//! - order: each sender's messages must arrive as 0, 1, 2, ...; a reordered, duplicated or lost
//!   message is a mismatch where it happens (consecutive messages differ in size, so even the
//!   1-byte ones, which carry nothing but their sender's tag, are placed).
//! - completeness: a reader is done when it has every sender's last message, counted, not timed;
//!   a lost or stranded frame shows as a reader that waits past `PATIENCE`, saying what it has.
//! - routing: each room's senders have their own tags; a frame of the other room, or of another
//!   connection's stream after its file descriptor was reused, carries a tag (or a churn marker)
//!   this room does not know, or is no frame at all.
//! - close last: readers end with a close handshake and must get the close frame after all of
//!   their data and nothing after it; one raw reader closes mid-traffic, while publishers are
//!   writing to it, and must get a gapless prefix of every sender's messages, then the close;
//!   one reads nothing until the node shuts down, so its close frame is queued behind the whole
//!   run, and must still come after every message.
//!
//! Runs are paced by counts (watch channels), never by sleeps: see [`gate`] for the order they
//! keep and why it cannot deadlock.

mod common;

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, Stream, StreamExt};
use roomcast::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::MaybeTlsStream;

/// Message sizes, cycled through by each sender: every WebSocket length encoding at both of its
/// edges (7-bit up to 125, 16-bit from 126 to 65,535, 64-bit beyond), small and large next to
/// the 4 KiB send buffer. Consecutive sizes differ, which places the 1-byte messages.
const SIZES: [usize; 9] = [1, 100, 125, 126, 1000, 4000, 65_535, 65_536, 70_000];
/// The largest message: no server frame may claim a longer payload.
const LARGEST: usize = 70_000;
/// A message starts with its sender's tag, its sequence number in 4 digits and a colon (a
/// 1-byte message is the tag alone).
const HEADER: usize = 6;
const MAIN: &str = "dw-main";
const OTHER: &str = "dw-other";
/// One tag per sender of the main room...
const MAIN_TAGS: &[u8] = b"ABCDEFGH";
/// ...and of the other room: disjoint, so a frame in the wrong room is seen. Churn markers
/// start with `m`, which is neither.
const OTHER_TAGS: &[u8] = b"Z";
/// The receive buffer of the stalled readers (the kernel doubles it): fixed, so no autotuning
/// lets a stalled socket take in megabytes, and most of what is sent meanwhile waits in the
/// node's outbox. Not smaller: with a window of a few KiB each window's worth waits for a
/// delayed ACK, and the run takes ten times as long.
const STALLED_RECV_BUFFER: usize = 128 * 1024;
/// How many messages of its room a churn connection reads before it goes (in the other room,
/// with one sender, one).
const CHURN_READS: usize = 6;
/// How many messages each sender may run ahead of a churn round it waits for.
const LAG: usize = 2;
/// Bound on a wait for a phase of the run (it spans many messages, where `PATIENCE` bounds
/// one); only a hang ever reaches it, and a lost frame is reported sooner, by its reader.
const PHASE_PATIENCE: Duration = Duration::from_secs(60);

/// How much traffic one run makes.
#[derive(Clone, Copy)]
struct Plan {
    /// Messages per sender.
    messages: usize,
    /// Churn tasks, each connecting and dropping `rounds` times in a row.
    churn_tasks: usize,
    rounds: usize,
}

impl Plan {
    fn churn_rounds(&self) -> usize {
        self.churn_tasks * self.rounds
    }

    /// The progress (messages of every main sender seen by the first steady reader) at which
    /// churn round `r` starts. Strictly increasing, and at least `LAG` below the last message,
    /// so every round has a message it holds the senders back for (see [`gate`]).
    fn start(&self, r: usize) -> usize {
        assert!(self.churn_rounds() < self.messages - LAG);
        r * (self.messages - LAG) / self.churn_rounds()
    }

    /// The progress at which the stalled readers resume.
    fn resume_at(&self) -> usize {
        self.messages / 2
    }

    /// How many messages of every sender the mid-traffic closer reads before it closes.
    fn close_at(&self) -> usize {
        self.messages / 3
    }
}

/// The main run: 36 messages per sender, each size 4 times.
const FULL: Plan = Plan {
    messages: 36,
    churn_tasks: 3,
    rounds: 5,
};
/// The same traffic, shorter, for the variants.
const SHORT: Plan = Plan {
    messages: 18,
    churn_tasks: 3,
    rounds: 4,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn direct_writes_keep_every_stream_whole_ordered_and_complete() {
    stress(|c| c.direct_write = true, FULL).await;
}

/// One thread: publishers and sessions only interleave at their awaits, but partial writes,
/// parking and hand-overs happen all the same.
#[tokio::test(flavor = "current_thread")]
async fn direct_writes_on_a_single_thread() {
    stress(|c| c.direct_write = true, SHORT).await;
}

/// The queued path alone (every frame written by its recipient's session), same checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queued_writes_pass_the_same_checks() {
    stress(|c| c.direct_write = false, SHORT).await;
}

/// The checker on its own: each kind of damage the stress runs look for fails [`Seen::check`],
/// leaves it incomplete or fails [`strict_header`], so a pass means none of it happened.
#[test]
fn the_checks_catch_each_kind_of_damage() {
    let room = Traffic::new(MAIN, MAIN_TAGS, SIZES.len() + 1);
    let other = Traffic::new(OTHER, OTHER_TAGS, SIZES.len() + 1);
    let m = |s: usize, q: usize| room.messages[s][q].clone();
    let fails_in = |mut seen: Seen, texts: &[String]| {
        catch_unwind(AssertUnwindSafe(|| {
            texts.iter().for_each(|t| seen.check(t));
        }))
        .is_err()
    };
    let fails = |texts: &[String]| fails_in(Seen::from_start("self-test", &room), texts);

    // Senders interleaved at frame boundaries is what a room looks like.
    assert!(!fails(&[m(0, 0), m(1, 0), m(0, 1), m(1, 1)]));
    assert!(fails(&[m(0, 1), m(0, 0)]), "reordered");
    assert!(fails(&[m(0, 0), m(0, 0)]), "duplicated, 1 byte");
    assert!(fails(&[m(0, 0), m(0, 1), m(0, 1)]), "duplicated");
    assert!(fails(&[m(0, 0), m(0, 2)]), "a gap");
    // Same length and same header: only the filler tells them apart.
    let mut torn = m(0, 7)[..30_000].to_owned();
    torn.push_str(&m(1, 7)[30_000..]);
    assert!(fails(&[
        m(0, 0),
        m(0, 1),
        m(0, 2),
        m(0, 3),
        m(0, 4),
        m(0, 5),
        m(0, 6),
        torn
    ]));
    let mut truncated = m(0, 1);
    truncated.pop();
    assert!(fails(&[m(0, 0), truncated]), "truncated");
    assert!(fails(&[other.messages[0][0].clone()]), "another room's");
    assert!(fails(&["m3".to_owned()]), "a churn marker");
    assert!(fails(&[String::new()]), "empty");

    let late = || Seen::joined_late("late", &room);
    assert!(!fails_in(late(), &[m(2, 5), m(2, 6), m(3, 0)]));
    assert!(
        fails_in(late(), &[m(2, 5), m(2, 7)]),
        "a gap after a late join"
    );
    assert!(
        fails_in(late(), &[m(2, 5), m(2, 4)]),
        "reordered after a late join"
    );

    // A message lost in the middle is a gap (above); a sender's last one lost leaves the count
    // short, and the reader waiting.
    let mut lost = Seen::from_start("lost", &room);
    for (s, sent) in room.messages.iter().enumerate() {
        let keep = if s == 3 { sent.len() - 1 } else { sent.len() };
        sent[..keep].iter().for_each(|text| lost.check(text));
    }
    assert!(!lost.complete(), "a lost last message");
    lost.check(&m(3, SIZES.len()));
    assert!(lost.complete());

    let parse_fails = |bytes: &[u8]| {
        catch_unwind(|| {
            strict_header("self-test", bytes);
        })
        .is_err()
    };
    assert!(!parse_fails(&[0x81, 126, 0x01, 0x00]));
    assert!(
        parse_fails(b"AB0001:xyz"),
        "payload where a header should be"
    );
    assert!(parse_fails(&[0x01, 5]), "a fragment");
    assert!(parse_fails(&[0x81, 0x85]), "masked");
    assert!(
        parse_fails(&[0x81, 126, 0, 100]),
        "a long form for a short length"
    );
    assert!(
        parse_fails(&[0x81, 127, 0, 0, 0, 0, 0, 2, 0, 0]),
        "longer than any message"
    );
}

/// One room's traffic: what each of its senders sends, in order.
struct Traffic {
    name: &'static str,
    tags: &'static [u8],
    /// `messages[s][q]`: sender `s`'s message number `q`.
    messages: Vec<Vec<String>>,
}

impl Traffic {
    fn new(name: &'static str, tags: &'static [u8], count: usize) -> Arc<Self> {
        let messages = tags
            .iter()
            .map(|&tag| (0..count).map(|seq| message(tag, seq)).collect())
            .collect();
        Arc::new(Self {
            name,
            tags,
            messages,
        })
    }

    fn sender_of(&self, text: &str) -> Option<usize> {
        let first = *text.as_bytes().first()?;
        self.tags.iter().position(|&tag| tag == first)
    }
}

/// Sender `tag`'s message number `seq`: the header, then alphanumeric filler drawn from a
/// generator seeded with both, so no two messages share their bytes at any offset for long.
fn message(tag: u8, seq: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ";
    let size = SIZES[seq % SIZES.len()];
    let header = format!("{}{seq:04}:", tag as char);
    assert_eq!(header.len(), HEADER);
    let mut bytes = header.into_bytes();
    bytes.truncate(size);
    let mut x = ((u64::from(tag) << 32) | seq as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while bytes.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        bytes.push(ALPHABET[(x >> 32) as usize % ALPHABET.len()]);
    }
    String::from_utf8(bytes).expect("ASCII")
}

/// A message in a failure report: its length and its first bytes.
fn brief(text: &str) -> String {
    let head: String = text.chars().take(16).collect();
    format!("{} bytes starting {head:?}", text.len())
}

/// What one connection got from a room so far, checked message by message.
struct Seen {
    who: String,
    room: Arc<Traffic>,
    /// Per sender: the number of the message due next, or `None` until the first one arrives
    /// (for a connection that joined while the traffic flowed).
    next: Vec<Option<usize>>,
    /// Messages of the room received.
    got: usize,
}

impl Seen {
    /// A member since before the first message: every sender's messages are due from 0.
    fn from_start(who: impl Into<String>, room: &Arc<Traffic>) -> Self {
        Self {
            who: who.into(),
            room: Arc::clone(room),
            next: vec![Some(0); room.tags.len()],
            got: 0,
        }
    }

    /// A member that joined mid-traffic: each sender's first message may be any, the rest must
    /// follow it without a gap (a join takes effect between two of a sender's broadcasts).
    fn joined_late(who: impl Into<String>, room: &Arc<Traffic>) -> Self {
        Self {
            next: vec![None; room.tags.len()],
            ..Self::from_start(who, room)
        }
    }

    fn check(&mut self, text: &str) {
        let Some(s) = self.room.sender_of(text) else {
            panic!(
                "{}: a frame that is no message of room {} (another room's, another \
                 connection's, or garbage): {}",
                self.who,
                self.room.name,
                brief(text)
            );
        };
        let tag = self.room.tags[s] as char;
        let sent = &self.room.messages[s];
        let q = match self.next[s] {
            Some(q) => q,
            None if text.len() >= HEADER => text
                .get(1..HEADER - 1)
                .and_then(|digits| digits.parse().ok())
                .unwrap_or_else(|| panic!("{}: no sequence number in {}", self.who, brief(text))),
            None => {
                // The first message seen from this sender is one of its 1-byte ones (the tag
                // alone, all alike): it cannot be placed, the next one will be.
                assert!(
                    sent.iter().any(|m| m == text),
                    "{}: from sender {tag}, a message it never sent: {}",
                    self.who,
                    brief(text)
                );
                self.got += 1;
                return;
            }
        };
        assert!(
            q < sent.len(),
            "{}: sender {tag} sent {} messages and this is one more (a duplicate?): {}",
            self.who,
            sent.len(),
            brief(text)
        );
        let want = &sent[q];
        if text != want {
            let at = text
                .bytes()
                .zip(want.bytes())
                .position(|(a, b)| a != b)
                .unwrap_or(text.len().min(want.len()));
            panic!(
                "{}: from sender {tag}, message {q} was due ({}); got {}, which differs from \
                 byte {at} on (reordered, duplicated, lost, torn or interleaved); so far: {}",
                self.who,
                brief(want),
                brief(text),
                self.state()
            );
        }
        self.next[s] = Some(q + 1);
        self.got += 1;
    }

    /// Every sender's last message is in.
    fn complete(&self) -> bool {
        let count = self.room.messages[0].len();
        self.next.iter().all(|&n| n == Some(count))
    }

    /// How many messages of every sender have arrived (from the start).
    fn progress(&self) -> usize {
        self.next.iter().map(|n| n.unwrap_or(0)).min().unwrap_or(0)
    }

    fn state(&self) -> String {
        let next: Vec<String> = self
            .room
            .tags
            .iter()
            .zip(&self.next)
            .map(|(&tag, n)| format!("{}:{n:?}", tag as char))
            .collect();
        format!("{} messages, next due {}", self.got, next.join(" "))
    }
}

/// The gates that keep the run's phases in order without a clock.
#[derive(Clone, Default)]
struct Gates {
    /// Churn round `r` has joined its room (its subscription is in effect).
    joined: Vec<bool>,
    /// The mid-traffic closer has sent its close.
    closer_closed: bool,
}

/// Before a sender sends message `q`: every churn round `r` with `start(r) + LAG <= q` has
/// joined, so its message `start(r) + LAG` from each sender of its room surely comes after
/// its join (the round reads that much before it goes, so churn overlaps traffic); and once `q`
/// is `LAG` past the closer's point, the closer has sent its close (so traffic races the close).
///
/// No deadlock: round `r` starts once messages below `start(r)` are in, and ends with messages
/// `start(r) + LAG`, which wait only for rounds up to `r` (`start` strictly increases). So by
/// induction every round joins and ends, whichever task it is in; and the closer needs messages
/// below its point alone.
async fn gate(gates: &mut watch::Receiver<Gates>, plan: Plan, q: usize) {
    let open = |g: &Gates| {
        let churned = g
            .joined
            .iter()
            .enumerate()
            .all(|(r, &joined)| joined || plan.start(r) + LAG > q);
        churned && (g.closer_closed || q < plan.close_at() + LAG)
    };
    // `is_err` at once: the `Ok` holds the watch's read lock.
    let closed = tokio::time::timeout(PHASE_PATIENCE, gates.wait_for(open))
        .await
        .unwrap_or_else(|_| panic!("message {q} held back past {PHASE_PATIENCE:?}"))
        .is_err();
    if closed {
        failed_elsewhere().await;
    }
}

/// Waits until the first steady reader has `at_least` messages of every main sender.
async fn progress_reaches(progress: &mut watch::Receiver<usize>, at_least: usize, who: &str) {
    let closed = tokio::time::timeout(PHASE_PATIENCE, progress.wait_for(|&p| p >= at_least))
        .await
        .unwrap_or_else(|_| panic!("{who}: traffic never reached {at_least} messages"))
        .is_err();
    if closed {
        failed_elsewhere().await;
    }
}

/// A watch closed before its condition held: the task that held the sender panicked (a task
/// that ends normally has moved it past every condition). Its panic is the one to report, and
/// the test ends with it; this task only waits.
async fn failed_elsewhere() {
    std::future::pending::<()>().await;
}

/// A tungstenite client whose socket gets `recv_buffer` (`SO_RCVBUF`, set before it connects)
/// when given.
async fn client_with(node: &Node, recv_buffer: Option<usize>) -> Ws {
    let socket = TcpSocket::new_v4().expect("socket");
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size as u32).expect("SO_RCVBUF");
    }
    let stream = socket.connect(node.addr).await.expect("connect");
    stream.set_nodelay(true).expect("TCP_NODELAY");
    let (ws, _) = tokio_tungstenite::client_async(node.url(), MaybeTlsStream::Plain(stream))
        .await
        .expect("websocket handshake");
    ws
}

/// Reads until `seen` has every message, checking each; the first steady reader reports how far
/// it got in `progress`.
async fn read_all<S>(ws: &mut S, seen: &mut Seen, progress: Option<&watch::Sender<usize>>)
where
    S: Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    while !seen.complete() {
        let frame = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{}: nothing for {PATIENCE:?} (a frame lost or stranded?); {}",
                    seen.who,
                    seen.state()
                )
            });
        match frame {
            Some(Ok(Message::Text(text))) => seen.check(text.as_str()),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!(
                "{}: expected a text frame, got {}; {}",
                seen.who,
                describe(&other),
                seen.state()
            ),
        }
        if let Some(progress) = progress {
            let now = seen.progress();
            progress.send_if_modified(|p| std::mem::replace(p, now) != now);
        }
    }
}

/// What tungstenite returned, without dumping a 70 KB payload.
fn describe(frame: &Option<Result<Message, tungstenite::Error>>) -> String {
    match frame {
        None => "the end of the stream".to_owned(),
        Some(Err(e)) => format!("an error: {e}"),
        Some(Ok(Message::Text(t))) => format!("text, {}", brief(t.as_str())),
        Some(Ok(Message::Binary(b))) => format!("a {}-byte binary frame", b.len()),
        Some(Ok(Message::Close(c))) => format!("a close frame {c:?}"),
        Some(Ok(other)) => format!("{other:?}"),
    }
}

/// Closes properly: the data frames still due are checked by `seen` (for a complete reader
/// any is one too many), then the close frame must come, then the end of the stream and
/// nothing else (tungstenite reports a frame after the close as an error).
async fn close_properly(mut ws: Ws, seen: &mut Seen) {
    ws.close(None).await.expect("send close");
    let mut closed = false;
    loop {
        let frame = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .unwrap_or_else(|_| panic!("{}: no close frame in time", seen.who));
        match frame {
            Some(Ok(Message::Text(text))) if !closed => seen.check(text.as_str()),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) if !closed => {}
            Some(Ok(Message::Close(_))) if !closed => closed = true,
            None if closed => return,
            other => panic!(
                "{}: {} {} the close frame; {}",
                seen.who,
                describe(&other),
                if closed { "after" } else { "instead of" },
                seen.state()
            ),
        }
    }
}

/// The header of the server frame at the front of `bytes`: its first byte, the header's length
/// and the payload's, or `None` until the header is all there. Stricter than tungstenite: a
/// final frame of a kind this traffic has (text, close or ping), no reserved bits, no mask, the
/// shortest length encoding (RFC 6455 5.2) and no payload longer than the largest message. A
/// stream that lost its framing fails one of these at once instead of waiting for bytes.
fn strict_header(who: &str, bytes: &[u8]) -> Option<(u8, usize, usize)> {
    let (&first, &second) = (bytes.first()?, bytes.get(1)?);
    assert!(
        matches!(first, 0x81 | 0x88 | 0x89),
        "{who}: a frame starting {first:#04x}, not a final text, close or ping frame: the \
         stream lost its framing"
    );
    assert_eq!(second & 0x80, 0, "{who}: a masked server frame");
    let (at, len) = match second & 0x7F {
        126 => {
            let raw = bytes.get(2..4)?;
            let len = usize::from(u16::from_be_bytes([raw[0], raw[1]]));
            assert!(len >= 126, "{who}: {len} bytes in a 16-bit length");
            (4, len)
        }
        127 => {
            let raw: [u8; 8] = bytes.get(2..10)?.try_into().expect("8 bytes");
            let len = u64::from_be_bytes(raw);
            assert!(len > 65_535, "{who}: {len} bytes in a 64-bit length");
            (10, usize::try_from(len).unwrap_or(usize::MAX))
        }
        n => (2, usize::from(n)),
    };
    assert!(
        len <= LARGEST,
        "{who}: a frame of {len} bytes, longer than any message: the stream lost its framing"
    );
    assert!(
        first == 0x81 || len <= 125,
        "{who}: a control frame of {len} bytes"
    );
    Some((first, at, len))
}

/// A client that reads the server's bytes itself and frames them with [`strict_header`].
struct Raw {
    who: String,
    stream: TcpStream,
    /// Bytes read and not yet framed.
    buf: Vec<u8>,
}

impl Raw {
    async fn connect(node: &Node, who: &str, recv_buffer: Option<usize>) -> Self {
        let stream = raw_upgrade(node.addr, "/").await;
        if let Some(size) = recv_buffer {
            // After the handshake, so the window scale is the default one; the buffer (and so
            // the window) is capped from here on, and no longer autotuned.
            socket2::SockRef::from(&stream)
                .set_recv_buffer_size(size)
                .expect("SO_RCVBUF");
        }
        Self {
            who: who.to_owned(),
            stream,
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, json: &str) {
        let frame = client_frame(0x81, json.as_bytes());
        self.stream.write_all(&frame).await.expect("raw send");
    }

    /// Subscribes to `room` and makes sure it is in effect, as `common::sync` does.
    async fn join(&mut self, room: &str) {
        let sync_room = format!("sync-{}", self.who);
        self.send(&subscribe(room)).await;
        self.send(&subscribe(&sync_room)).await;
        self.send(&send_message(&sync_room, "sync")).await;
        assert_eq!(self.next_text().await, "sync", "{}", self.who);
        self.send(&unsubscribe(&sync_room)).await;
    }

    /// The next text frame's payload (pings are skipped).
    async fn next_text(&mut self) -> String {
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            if let Some((at, len)) = self.complete_frame() {
                let first = self.buf[0];
                let payload = self.buf[at..at + len].to_vec();
                self.buf.drain(..at + len);
                match first {
                    0x81 => {
                        return String::from_utf8(payload)
                            .unwrap_or_else(|_| panic!("{}: a text frame not UTF-8", self.who))
                    }
                    0x89 => {
                        // Only a run slower than the ping interval sees one; answer it all
                        // the same, or the node would drop this reader as unresponsive.
                        let pong = client_frame(0x8A, &payload);
                        self.stream.write_all(&pong).await.expect("raw pong");
                    }
                    _ => panic!("{}: a close frame while messages were due", self.who),
                }
            }
            let n = tokio::time::timeout(PATIENCE, self.stream.read(&mut chunk))
                .await
                .unwrap_or_else(|_| panic!("{}: nothing for {PATIENCE:?}", self.who))
                .expect("raw read");
            assert!(n > 0, "{}: the server closed the connection", self.who);
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Where the payload of the frame at the front of `buf` starts and how long it is, once it
    /// is all there.
    fn complete_frame(&self) -> Option<(usize, usize)> {
        let (_, at, len) = strict_header(&self.who, &self.buf)?;
        (self.buf.len() >= at + len).then_some((at, len))
    }

    async fn read_all(&mut self, seen: &mut Seen) {
        while !seen.complete() {
            let text = self.next_text().await;
            seen.check(&text);
        }
    }

    /// Sends a close and reads until the server ends the connection: see [`finish`](Self::finish).
    async fn close(mut self, seen: &mut Seen) {
        self.send_close().await;
        self.finish(seen, 1000).await;
    }

    async fn send_close(&mut self) {
        let close = client_close(1000, "done");
        self.stream.write_all(&close).await.expect("raw close");
    }

    /// Reads until the server ends the connection. Every data frame before the server's close
    /// frame is checked by `seen`; the close frame must come, with `code`, and be the last thing
    /// on the wire. `common::server_frames`, a second parser written apart, must frame the same
    /// bytes the same way.
    async fn finish(mut self, seen: &mut Seen, code: u16) {
        let ended = read_until_closed(&mut self.stream, PATIENCE).await;
        let mut rest = std::mem::take(&mut self.buf);
        rest.extend_from_slice(&ended.bytes);
        let mut frames = Vec::new();
        let mut at = 0;
        while at < rest.len() {
            let Some((first, header, len)) = strict_header(&self.who, &rest[at..]) else {
                panic!("{}: the stream ended inside a frame header", self.who);
            };
            let end = at + header + len;
            assert!(
                end <= rest.len(),
                "{}: the stream ended inside a {len}-byte frame ({:?})",
                self.who,
                ended.error
            );
            frames.push((first, rest[at + header..end].to_vec()));
            at = end;
        }
        assert!(
            server_frames(&rest) == frames,
            "{}: the two parsers disagree",
            self.who
        );
        let Some(last) = frames.iter().position(|(first, _)| *first == 0x88) else {
            panic!(
                "{}: the connection ended ({:?}) without a close frame; {}",
                self.who,
                ended.error,
                seen.state()
            );
        };
        assert_eq!(
            last,
            frames.len() - 1,
            "{}: {} frame(s) after the close frame",
            self.who,
            frames.len() - 1 - last
        );
        for (first, payload) in &frames[..last] {
            if *first == 0x81 {
                let text = std::str::from_utf8(payload).expect("a text frame in UTF-8");
                seen.check(text);
            }
        }
        assert_eq!(close_of(&frames).map(|(code, _)| code), Some(code));
    }
}

/// The clients that join before the first message (every one but the churn), so each must
/// get every message from the first one on.
struct Clients {
    senders: Vec<(Arc<Traffic>, usize, Ws)>,
    /// The first reports the progress the rest of the run is paced by.
    steady: Vec<(Arc<Traffic>, &'static str, Ws)>,
    stalled: Vec<(&'static str, Ws)>,
    raw_stalled: Raw,
    closer: Raw,
    /// Reads nothing until the node shuts down, so its close is queued behind megabytes.
    last: Raw,
}

async fn connect(node: &Node, main: &Arc<Traffic>, other: &Arc<Traffic>) -> Clients {
    let mut senders = Vec::new();
    for (room, name) in [(main, "s"), (other, "z")] {
        for s in 0..room.tags.len() {
            let mut ws = client_with(node, None).await;
            send(&mut ws, &subscribe(room.name)).await;
            sync(&mut ws, &format!("{name}{s}")).await;
            senders.push((Arc::clone(room), s, ws));
        }
    }
    // Steady readers: the first reports the progress the rest of the run is paced by.
    let mut steady = Vec::new();
    for (room, who) in [(main, "steady-0"), (main, "steady-1"), (other, "other")] {
        let mut ws = client_with(node, None).await;
        send(&mut ws, &subscribe(room.name)).await;
        sync(&mut ws, who).await;
        steady.push((Arc::clone(room), who, ws));
    }
    let mut stalled = Vec::new();
    for who in ["stalled-0", "stalled-1"] {
        let mut ws = client_with(node, Some(STALLED_RECV_BUFFER)).await;
        send(&mut ws, &subscribe(MAIN)).await;
        sync(&mut ws, who).await;
        stalled.push((who, ws));
    }
    let mut raw_stalled = Raw::connect(node, "raw-stalled", Some(STALLED_RECV_BUFFER)).await;
    raw_stalled.join(MAIN).await;
    let mut closer = Raw::connect(node, "closer", None).await;
    closer.join(MAIN).await;
    let mut last = Raw::connect(node, "last", Some(STALLED_RECV_BUFFER)).await;
    last.join(MAIN).await;

    Clients {
        senders,
        steady,
        stalled,
        raw_stalled,
        closer,
        last,
    }
}

/// One run: a node with tiny send buffers; in the main room 8 senders (members too) and 7
/// readers (2 steady, 2 stalled, 1 raw stalled, the mid-traffic closer, the last one); in the
/// other room a sender and a reader; churn in both; then the checks.
async fn stress(tweak: impl FnOnce(&mut Config), plan: Plan) {
    let mut node = Node::start_with(|c| {
        c.send_buffer = Some(4096);
        // The last reader drains megabytes after the node begins to shut down.
        c.drain_timeout = PHASE_PATIENCE;
        c.max_message_bytes = 128 * 1024;
        // Stalled readers hold megabytes: far below this, so none is closed as slow.
        c.outbox_bytes = 256 << 20;
        c.outbox_frames = 1 << 20;
        lift_inbound_limits(c);
        tweak(c);
    })
    .await;
    let main = Traffic::new(MAIN, MAIN_TAGS, plan.messages);
    let other = Traffic::new(OTHER, OTHER_TAGS, plan.messages);

    let clients = connect(&node, &main, &other).await;
    let (gates_tx, gates_rx) = watch::channel(Gates {
        joined: vec![false; plan.churn_rounds()],
        closer_closed: false,
    });
    let (progress_tx, progress_rx) = watch::channel(0usize);
    let mut tasks = JoinSet::new();
    spawn_senders(&mut tasks, clients.senders, &gates_rx, plan);
    for (i, (room, who, mut ws)) in clients.steady.into_iter().enumerate() {
        let progress = (i == 0).then(|| progress_tx.clone());
        tasks.spawn(async move {
            let mut seen = Seen::from_start(who, &room);
            read_all(&mut ws, &mut seen, progress.as_ref()).await;
            close_properly(ws, &mut seen).await;
        });
    }
    drop(progress_tx);
    spawn_stalled(
        &mut tasks,
        clients.stalled,
        clients.raw_stalled,
        &progress_rx,
        &main,
        plan,
    );
    spawn_closer(&mut tasks, clients.closer, &gates_tx, &main, plan);
    spawn_churn(
        &mut tasks,
        (&gates_tx, &progress_rx),
        (&main, &other),
        node.url(),
        plan,
    );
    drop(gates_tx);

    // The first failure ends the test at once, with its own message.
    while let Some(done) = tasks.join_next().await {
        if let Err(e) = done {
            resume_unwind(e.into_panic());
        }
    }
    let health = node.health().await;
    assert_eq!(health["slow_consumers_closed"], 0, "{health}");
    assert_eq!(health["dropped"], 0, "{health}");
    // Before the stalled readers resumed, at least one full cycle of sizes (206 KB) from each
    // of 8 senders had been published to them: 1.65 MB. Their sockets (a 256 KiB receive
    // buffer, 8 KiB of send buffer) and the session's batch in progress (256 KiB at most)
    // hold well under half of that: the rest waited in an outbox, which the session measures
    // as it resumes writing.
    assert!(
        health["outbox_peak_bytes"].as_u64() > Some(512 << 10),
        "the stall never parked frames in an outbox: {health}"
    );
    // No session is left behind, spinning or waiting on a frame nobody will write.
    node.wait_health("every session but the last reader's ended", |h| {
        h["connections"] == 1
    })
    .await;

    // The node shuts down with the whole run queued for the last reader: its close frame must
    // come after every message, with nothing after it. Its drain deadline is `PHASE_PATIENCE`
    // (a client's own close would allow it 2 s only), so this does not race a clock.
    node.shutdown();
    let mut seen = Seen::from_start("last", &main);
    let mut last = clients.last;
    last.read_all(&mut seen).await;
    last.finish(&mut seen, 1001).await;
}

/// Each sender writes its messages, paced by the gates, while it reads everyone's.
fn spawn_senders(
    tasks: &mut JoinSet<()>,
    senders: Vec<(Arc<Traffic>, usize, Ws)>,
    gates_rx: &watch::Receiver<Gates>,
    plan: Plan,
) {
    for (room, s, ws) in senders {
        let mut gates = gates_rx.clone();
        tasks.spawn(async move {
            let who = format!("sender {}", room.tags[s] as char);
            let (mut sink, mut stream) = ws.split();
            let messages = &room.messages[s];
            let write = async {
                for (q, text) in messages.iter().enumerate() {
                    gate(&mut gates, plan, q).await;
                    let msg = Message::text(send_message(room.name, text));
                    sink.send(msg).await.expect("send");
                }
            };
            // A sender is a member too: it reads everyone's messages, its own included, while
            // it writes.
            let mut seen = Seen::from_start(who, &room);
            let read = read_all(&mut stream, &mut seen, None);
            tokio::join!(write, read);
            let ws = stream.reunite(sink).expect("the two halves of one stream");
            close_properly(ws, &mut seen).await;
        });
    }
}

/// The stalled readers: not a byte read until half the traffic is out.
fn spawn_stalled(
    tasks: &mut JoinSet<()>,
    stalled: Vec<(&'static str, Ws)>,
    mut raw_stalled: Raw,
    progress_rx: &watch::Receiver<usize>,
    main: &Arc<Traffic>,
    plan: Plan,
) {
    for (who, mut ws) in stalled {
        let (mut progress, main) = (progress_rx.clone(), Arc::clone(main));
        tasks.spawn(async move {
            // Not a byte read until half the traffic is out: the socket fills at once, the
            // rest waits in the outbox, and publishers find the socket taken (or full).
            progress_reaches(&mut progress, plan.resume_at(), who).await;
            let mut seen = Seen::from_start(who, &main);
            read_all(&mut ws, &mut seen, None).await;
            close_properly(ws, &mut seen).await;
        });
    }
    {
        let (mut progress, main) = (progress_rx.clone(), Arc::clone(main));
        tasks.spawn(async move {
            progress_reaches(&mut progress, plan.resume_at(), "raw-stalled").await;
            let mut seen = Seen::from_start("raw-stalled", &main);
            raw_stalled.read_all(&mut seen).await;
            // Everything is in: the close frame must be the very next frame, and the last.
            raw_stalled.close(&mut seen).await;
        });
    }
}

/// The reader that closes mid-traffic, while publishers are writing to it.
fn spawn_closer(
    tasks: &mut JoinSet<()>,
    mut closer: Raw,
    gates_tx: &watch::Sender<Gates>,
    main: &Arc<Traffic>,
    plan: Plan,
) {
    {
        let (gates, main) = (gates_tx.clone(), Arc::clone(main));
        tasks.spawn(async move {
            let mut seen = Seen::from_start("closer", &main);
            while seen.progress() < plan.close_at() {
                let text = closer.next_text().await;
                seen.check(&text);
            }
            // Senders go on past this point only once the close is sent, so publishers race it:
            // what they got in must come before the close frame, whole and in order.
            closer.send_close().await;
            gates.send_modify(|g| g.closer_closed = true);
            closer.finish(&mut seen, 1000).await;
        });
    }
}

/// Churn connections joining and leaving both rooms while traffic flows.
fn spawn_churn(
    tasks: &mut JoinSet<()>,
    (gates_tx, progress_rx): (&watch::Sender<Gates>, &watch::Receiver<usize>),
    (main, other): (&Arc<Traffic>, &Arc<Traffic>),
    url: String,
    plan: Plan,
) {
    for t in 0..plan.churn_tasks {
        let (gates, mut progress) = (gates_tx.clone(), progress_rx.clone());
        let (main, other, node_addr) = (Arc::clone(main), Arc::clone(other), url.clone());
        tasks.spawn(async move {
            for round in 0..plan.rounds {
                let r = round * plan.churn_tasks + t;
                let room = if r % 2 == 0 { &main } else { &other };
                progress_reaches(&mut progress, plan.start(r), "churn").await;
                // What surely comes after the join: each sender's message at this round's
                // point plus `LAG`, held back until the join (see `gate`). Any later one may
                // wait for a later round of this very task.
                let want = room.tags.len().min(CHURN_READS);
                churn_round(&node_addr, r, room, want, &gates).await;
            }
        });
    }
}

/// One churn connection: joins `room` while traffic flows, reads until it has seen its own
/// marker and `want` messages of the room, then goes, in one of three ways, with the rest of
/// the traffic still coming at it.
async fn churn_round(
    url: &str,
    r: usize,
    room: &Arc<Traffic>,
    want: usize,
    gates: &watch::Sender<Gates>,
) {
    let who = &format!("churn round {r} in {}", room.name);
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("churn connect");
    let mut seen = Seen::joined_late(who, room);
    send(&mut ws, &subscribe(room.name)).await;
    // The marker comes back through a room of its own after the subscribe is in effect; it is
    // unique, so a marker (or anything) from another churn connection fails the check.
    let marker = format!("m{r}");
    let private = format!("churn-{r}");
    send(&mut ws, &subscribe(&private)).await;
    send(&mut ws, &send_message(&private, &marker)).await;
    let mut marked = false;
    while !marked || seen.got < want {
        let frame = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .unwrap_or_else(|_| panic!("{who}: nothing for {PATIENCE:?}; {}", seen.state()));
        match frame {
            Some(Ok(Message::Text(text))) if !marked && text.as_str() == marker => {
                marked = true;
                // In effect: the senders may now send past this round's point.
                gates.send_modify(|g| g.joined[r] = true);
            }
            Some(Ok(Message::Text(text))) => seen.check(text.as_str()),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("{who}: {}; {}", describe(&other), seen.state()),
        }
    }
    match r % 3 {
        0 => close_properly(ws, &mut seen).await,
        1 => {
            // Gone without a close frame: FIN, or a reset when unread bytes are left.
            drop(ws);
        }
        _ => {
            // A reset for certain: the node's socket errors under a publisher mid-write.
            if let MaybeTlsStream::Plain(stream) = ws.get_ref() {
                socket2::SockRef::from(stream)
                    .set_linger(Some(Duration::ZERO))
                    .expect("SO_LINGER");
            }
            drop(ws);
        }
    }
}
