//! One simulated client: connect, join, then (in one task, to keep it cheap) read deliveries,
//! answer pings and, for senders, send on an open-loop schedule.

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::Instant;

use crate::envelope::{self, OffsetCounts, RoomPosition};
use crate::tls::{self, ReadHalf, Transport, WriteHalf};
use crate::ws::{self, HandshakeError, ProtocolError, Walk};
use crate::Dialect;

static BASE: OnceLock<std::time::Instant> = OnceLock::new();

/// All timestamps carried in messages are nanoseconds since this process-wide instant, so a
/// receiver can compare them with its own clock without any conversion.
pub fn base() -> std::time::Instant {
    *BASE.get_or_init(std::time::Instant::now)
}

pub fn now_ns() -> u64 {
    base().elapsed().as_nanos() as u64
}

pub fn instant_at(ns: u64) -> Instant {
    Instant::from_std(base() + Duration::from_nanos(ns))
}

/// Sends are batched when a sender is behind schedule, but not without bound, so reads and
/// other tasks get a turn.
const MAX_SEND_BATCH: usize = 64;

/// How long a closing client waits to hand its close frame to the kernel.
const CLOSE_WAIT: Duration = Duration::from_millis(200);

/// A stalled client pings the server this often: it keeps the server's idle-ping timeout from
/// being what closes it (the slow-consumer limit should be), and once the server has dropped
/// the connection the next write fails, which is how the stall is seen to have ended.
const STALL_PING: Duration = Duration::from_secs(2);

/// How long a stalled client that the server dropped may read what was left unread, looking
/// for the server's close frame.
const STALL_DRAIN: Duration = Duration::from_secs(2);

/// At the end of the run, how long a stalled client still open reads its backlog for a close
/// frame the server sent but has not yet followed with dropping the connection.
const STALL_FINAL_DRAIN: Duration = Duration::from_millis(300);

/// How long a reconnecting client waits for the server to answer its close.
const RECONNECT_CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Upper bound of the latency and lag histograms, in µs; larger values saturate.
pub const HIST_MAX_US: u64 = 60_000_000;

pub fn new_hist() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts.
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("valid histogram bounds")
}

/// A stretch of the run with one per-sender rate. Phase 0 is the warm-up, the rest are the
/// measured steps.
#[derive(Debug, Clone, Copy)]
pub struct PhaseSpec {
    pub start_ns: u64,
    pub end_ns: u64,
    pub rate: f64,
}

#[derive(Debug)]
pub struct Schedule {
    pub phases: Vec<PhaseSpec>,
    /// Number of sender slots; sender `id` starts `id / total_senders` of a period late so
    /// sends are spread evenly instead of arriving in bursts.
    pub total_senders: u32,
}

impl Schedule {
    pub fn phase_of(&self, t: u64) -> Option<usize> {
        self.phases
            .iter()
            .position(|p| p.start_ns <= t && t < p.end_ns)
    }

    pub fn end_ns(&self) -> u64 {
        self.phases.last().map_or(0, |p| p.end_ns)
    }
}

/// Facts known once every client has connected.
#[derive(Debug)]
pub struct Plan {
    /// Per room: the client that sends readiness probes (`u32::MAX` when the room is empty).
    pub prober: Vec<u32>,
    /// Per room: how many members must see a probe before the room counts as ready.
    pub required: Vec<u32>,
    /// Per room: deliveries one message to that room should cause at the healthy members.
    pub recipients: Vec<u32>,
    /// Per room: and at the resuming members (`--resume`), checked apart.
    pub resume_recipients: Vec<u32>,
}

/// What the coordinator tells every client, through one watch channel.
#[derive(Debug, Clone, Default)]
pub struct Ctl {
    pub plan: Option<Arc<Plan>>,
    pub probe_round: u32,
    pub schedule: Option<Arc<Schedule>>,
}

/// What a client does besides joining its room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Sends (the first clients of each room) or receives, and is checked for loss,
    /// duplicates, order, routing and latency.
    Healthy,
    /// Stops reading its socket after the readiness probe; nothing is expected of it.
    Stalled,
    /// Closes cleanly and reconnects on a timer, staggered by `slot`. What it receives is only
    /// counted, unless it resumes (`--resume`): then it is checked for loss, duplicates,
    /// order and routing across its connections, apart from the healthy clients.
    Reconnecting { slot: u32 },
}

/// Picks the stalled and reconnecting clients among the non-senders: a `stall` fraction of
/// them, then a `reconnect` fraction of the rest. Rooms are walked one after the other with a
/// running quota, so every room gets its share (within one) rather than the picks bunching up
/// in a few rooms. Returns the roles by client id (empty when everyone is healthy) and the
/// number of reconnecting clients.
pub fn assign_roles(
    clients: usize,
    rooms: u32,
    senders_per_room: u32,
    stall: f64,
    reconnect: f64,
) -> (Vec<Role>, u32) {
    if stall <= 0.0 && reconnect <= 0.0 {
        return (Vec::new(), 0);
    }
    let mut roles = vec![Role::Healthy; clients];
    let rooms = rooms.max(1) as usize;
    let non_senders = |r: usize| {
        (r..clients)
            .step_by(rooms)
            .filter(move |&id| id / rooms >= senders_per_room as usize)
    };
    // Quota after k candidates: floor(k * fraction), with a little slack for float error.
    let quota = |k: u64, f: f64| (k as f64 * f + 1e-9).floor() as u64;
    let (mut seen, mut picked) = (0u64, 0u64);
    for r in 0..rooms {
        for id in non_senders(r) {
            seen += 1;
            if quota(seen, stall) > picked {
                picked += 1;
                roles[id] = Role::Stalled;
            }
        }
    }
    let (mut seen, mut slots) = (0u64, 0u32);
    for r in 0..rooms {
        for id in non_senders(r) {
            if roles[id] != Role::Healthy {
                continue;
            }
            seen += 1;
            if quota(seen, reconnect) > u64::from(slots) {
                roles[id] = Role::Reconnecting { slot: slots };
                slots += 1;
            }
        }
    }
    (roles, slots)
}

/// Histograms shared by a slice of the clients. Per-client histograms would cost ~100 KiB
/// each; sharding keeps memory flat while lock contention stays negligible (one lock per
/// read batch).
pub struct Hists {
    pub latency: Vec<Histogram<u64>>,
    pub lag: Vec<Histogram<u64>>,
    /// Measured latency with `--split-rooms N`: `[rooms N.., rooms 0..N]` (flooders go to
    /// rooms 0, 1, ...), so a flood's cost to its own rooms and to the others read apart.
    pub split: [Histogram<u64>; 2],
}

impl Hists {
    pub fn new(n_phases: usize) -> Hists {
        Hists {
            latency: (0..n_phases).map(|_| new_hist()).collect(),
            lag: (0..n_phases).map(|_| new_hist()).collect(),
            split: [new_hist(), new_hist()],
        }
    }
}

pub struct Shared {
    pub rooms: u32,
    pub senders_per_room: u32,
    pub dialect: Dialect,
    /// `--envelope`: offer `roomcast.v2` and read deliveries as envelopes.
    pub envelope: bool,
    /// `--resume`: reconnecting clients resume from their last offset and are checked.
    pub resume: bool,
    /// Room names are this plus the room's number.
    pub room_prefix: String,
    /// `--split-rooms`: latency of rooms `0..split_rooms` is also recorded apart.
    pub split_rooms: u32,
    pub payload: usize,
    pub n_phases: usize,
    pub read_buf: usize,
    pub connect_timeout: Duration,
    pub connect_deadline: Instant,
    pub room_ready: Vec<AtomicU32>,
    pub shards: Vec<Mutex<Hists>>,
    /// Live totals for progress display and for ending the drain early.
    pub sent: AtomicU64,
    pub expected: AtomicU64,
    pub received: AtomicU64,
    /// Deliveries of messages being written right now, not yet in `expected`: the drain must
    /// not end while this is above zero, or deliveries of a message still in a sender's
    /// write would be counted as lost.
    pub in_flight: AtomicU64,
    pub error_codes: Mutex<std::collections::BTreeMap<String, u64>>,
    /// By client id; empty when every client is healthy.
    pub roles: Vec<Role>,
    /// Number of reconnecting clients (their slots stagger the reconnects).
    pub reconnect_slots: u32,
    pub reconnect_every: Duration,
    /// Time away between a reconnecting client's close and its next connect.
    pub reconnect_away: Duration,
    /// `--reconnect-elsewhere`: each reconnect goes to the next --url.
    pub reconnect_elsewhere: bool,
    /// Signs each client's token when the server requires one.
    pub tokens: Option<crate::token::Minter>,
    /// The one TLS client configuration every `wss://` connection shares (`None` when no
    /// --url is `wss://`).
    pub tls: Option<tokio_rustls::TlsConnector>,
}

impl Shared {
    pub fn role(&self, id: u32) -> Role {
        self.roles
            .get(id as usize)
            .copied()
            .unwrap_or(Role::Healthy)
    }

    fn shard(&self, id: u32) -> MutexGuard<'_, Hists> {
        let m = &self.shards[id as usize % self.shards.len()];
        // A panic elsewhere cannot leave a histogram in a state worth refusing to read.
        m.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct PhaseCounters {
    /// Messages this client sent whose scheduled time falls in the phase.
    pub sent: u64,
    /// Of those, sends the server answered with an error (any code): not delivered, so owed
    /// to no one. An error names no send (loadgen's carry no id), so it is put in the phase
    /// of the sender's latest send when it arrives: the phase of the send it answers, except
    /// for a refusal of a send of the phase before that comes after the next phase's first
    /// send (refusals while the backplane is down are immediate; only a publish accepted and
    /// then given up comes late).
    pub refused: u64,
    /// Distinct, correctly routed deliveries (the rest below is by message phase too).
    pub received: u64,
    pub duplicates: u64,
    pub order_violations: u64,
    pub misrouted: u64,
    /// Delivery frames of any kind that *arrived* during the phase (for throughput and CPU
    /// per delivery, which are about work done in the window).
    pub arrived: u64,
}

#[derive(Debug)]
pub struct ClientResult {
    pub id: u32,
    pub connected: bool,
    pub ready: bool,
    pub phases: Vec<PhaseCounters>,
    pub errors: u64,
    pub unparseable: u64,
    pub other_frames: u64,
    /// Why the connection ended before loadgen stopped it, if it did. For a stalled client:
    /// how the server ended it (`None`: still open at the end).
    pub disconnect: Option<String>,
    pub role: Role,
    /// Stalled and reconnecting clients (not resuming): distinct deliveries of their room's
    /// messages, which no loss or order figure includes.
    pub side_received: u64,
    /// `--envelope`: how the offsets of the client's room ran (and its resumes' answers).
    pub offsets: OffsetCounts,
    /// Reconnecting clients: reconnects that succeeded, and why the others failed.
    pub reconnects: u64,
    pub reconnect_failures: Vec<String>,
}

pub struct Outcome {
    pub id: u32,
    /// How long connect (+ TLS handshake for wss://) + upgrade + join took, or why it failed.
    pub result: Result<Duration, ConnectError>,
}

/// Why a client could not connect, upgrade and join (the connect report groups by its text).
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect: aborted")]
    Aborted,
    #[error("connect: connect phase deadline passed while queued")]
    Queued,
    #[error("connect: {0}")]
    Tcp(std::io::Error),
    /// The TLS handshake of a `wss://` connection failed (a certificate not trusted, say).
    #[error("tls: {0}")]
    Tls(std::io::Error),
    #[error("handshake: write: {0}")]
    HandshakeWrite(std::io::Error),
    #[error("handshake: read: {0}")]
    HandshakeRead(std::io::Error),
    #[error("handshake: connection closed before upgrade")]
    ClosedBeforeUpgrade,
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error("join: write: {0}")]
    JoinWrite(std::io::Error),
    /// The limit, and whether the connection was `wss://`.
    #[error("connect: timed out after {:.1} s ({})", .0.as_secs_f64(), steps(.1))]
    Timeout(Duration, bool),
}

/// What the connect time covers.
fn steps(tls: &bool) -> &'static str {
    if *tls {
        "TCP + TLS + upgrade + join"
    } else {
        "TCP + upgrade + join"
    }
}

/// Sliding-window record of the sequences seen from one sender, to tell a duplicate (seen
/// before) from a reordering (lower than the highest seen, but new).
#[derive(Debug, Default, Clone, Copy)]
pub struct SeqTracker {
    highest: u64,
    seen_any: bool,
    /// Bit k set: sequence `highest - k` was seen.
    bits: u128,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    New,
    Duplicate,
    /// Lower than the highest seen and not seen before. Beyond the 128-message window a
    /// duplicate cannot be told apart and is counted here too.
    Reordered,
}

impl SeqTracker {
    pub fn observe(&mut self, seq: u64) -> Seen {
        if !self.seen_any {
            self.seen_any = true;
            self.highest = seq;
            self.bits = 1;
            return Seen::New;
        }
        if seq > self.highest {
            let d = seq - self.highest;
            self.bits = if d >= 128 { 0 } else { self.bits << d };
            self.bits |= 1;
            self.highest = seq;
            return Seen::New;
        }
        let d = self.highest - seq;
        if d >= 128 {
            return Seen::Reordered;
        }
        let m = 1u128 << d;
        if self.bits & m != 0 {
            Seen::Duplicate
        } else {
            self.bits |= m;
            Seen::Reordered
        }
    }
}

pub enum Msg {
    Probe {
        room: u32,
    },
    Data {
        room: u32,
        sender: u32,
        seq: u64,
        sched: u64,
    },
}

/// The room a delivery counts as when its envelope named another room than the client's (no
/// client is in it, so the delivery is misrouted whatever its message says).
const MISLABELLED: u32 = u32::MAX;

/// Parses `lg-<room>|<sender>|<seq>|<sched ns>|xxx...` or the probe `lg-<room>|P|<round>|`.
pub fn parse_msg(b: &[u8]) -> Option<Msg> {
    let mut rest = b.strip_prefix(b"lg-")?;
    let mut field = || -> Option<&[u8]> {
        let i = rest.iter().position(|&c| c == b'|')?;
        let f = &rest[..i];
        rest = &rest[i + 1..];
        Some(f)
    };
    let room = parse_num(field()?)? as u32;
    let second = field()?;
    if second == b"P" {
        return Some(Msg::Probe { room });
    }
    let sender = parse_num(second)?;
    let seq = parse_num(field()?)?;
    let sched = parse_num(field()?)?;
    Some(Msg::Data {
        room,
        sender: u32::try_from(sender).ok()?,
        seq,
        sched,
    })
}

fn parse_num(b: &[u8]) -> Option<u64> {
    if b.is_empty() || b.len() > 19 {
        return None;
    }
    let mut v: u64 = 0;
    for &c in b {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v * 10 + u64::from(c - b'0');
    }
    Some(v)
}

/// The fields loadgen reads from a JSON frame of the server (errors, acknowledgements).
/// Deliveries are not JSON (they are the bare message text), so this parse is off the hot
/// path: it runs only for the rare frames that start with `{`.
#[derive(Debug, Default, serde::Deserialize)]
struct ServerJson<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    code: Option<std::borrow::Cow<'a, str>>,
}

/// What a JSON frame is to the checker.
#[derive(Debug, PartialEq, Eq)]
enum JsonFrame {
    /// An error reply, with its code.
    Error(String),
    /// Valid JSON of another type.
    Other,
    /// Not a JSON object at all.
    Invalid,
}

fn classify_json(msg: &[u8]) -> JsonFrame {
    match serde_json::from_slice::<ServerJson<'_>>(msg) {
        Ok(j) if j.kind.as_deref() == Some("error") => JsonFrame::Error(
            j.code
                .map_or_else(|| "(no code)".into(), |c| c.into_owned()),
        ),
        Ok(_) => JsonFrame::Other,
        Err(_) => JsonFrame::Invalid,
    }
}

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        // xorshift64*: masks and handshake keys only need to look random.
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn mask(&mut self) -> [u8; 4] {
        (self.next() as u32).to_ne_bytes()
    }

    fn key(&mut self) -> [u8; 16] {
        let mut k = [0u8; 16];
        k[..8].copy_from_slice(&self.next().to_ne_bytes());
        k[8..].copy_from_slice(&self.next().to_ne_bytes());
        k
    }
}

/// Open-loop schedule position of one sender.
struct Sender {
    seq: u64,
    phase: usize,
    k: u64,
    next: u64,
    done: bool,
    offset: f64,
    recipients: u64,
}

impl Sender {
    fn new(sch: &Schedule, id: u32, recipients: u32) -> Sender {
        let mut s = Sender {
            seq: 0,
            phase: 0,
            k: 0,
            next: 0,
            done: false,
            offset: f64::from(id) / f64::from(sch.total_senders.max(1)),
            recipients: u64::from(recipients),
        };
        s.settle(sch);
        s
    }

    /// Moves `next` to the k-th slot of the current phase, or on to later phases.
    fn settle(&mut self, sch: &Schedule) {
        while let Some(p) = sch.phases.get(self.phase) {
            let t = p.start_ns + ((self.offset + self.k as f64) / p.rate * 1e9) as u64;
            if t < p.end_ns {
                self.next = t;
                return;
            }
            self.phase += 1;
            self.k = 0;
        }
        self.done = true;
    }
}

struct ClientState {
    id: u32,
    room: u32,
    rooms: u32,
    senders_per_room: u32,
    dialect: Dialect,
    phases: Vec<PhaseCounters>,
    trackers: Vec<SeqTracker>,
    ready: bool,
    errors: u64,
    unparseable: u64,
    other_frames: u64,
    /// Reassembly of a fragmented message; servers rarely fragment, so this is the only
    /// place a delivery may allocate.
    frag: Option<(u8, Vec<u8>)>,
    schedule: Option<Arc<Schedule>>,
    unique_in_batch: u64,
    /// Refused sends counted in the current read batch (taken out of `Shared::expected`).
    refused_in_batch: u64,
    /// A sender: the phase of its latest message, once it has sent one. An error that comes
    /// after that answers one of its messages (the join and the readiness probes are
    /// answered before sending starts), so it is a refused send.
    last_send_phase: Option<usize>,
    role: Role,
    /// Deliveries are checked: a healthy client, or a resuming one.
    checked: bool,
    /// Reconnects resume from `position`.
    resume: bool,
    side_received: u64,
    /// `--envelope`: every text frame is an envelope.
    envelope: bool,
    /// Whether the offsets of the room must run on by one for this client: all but a sender
    /// in the join dialect, which never hears its own messages.
    track_offsets: bool,
    position: RoomPosition,
}

enum Flow {
    /// The next frame needs this many bytes from the current position.
    More(usize),
    Close(Option<u16>),
}

impl ClientState {
    fn into_result(self, connected: bool, disconnect: Option<String>) -> ClientResult {
        ClientResult {
            id: self.id,
            connected,
            ready: self.ready,
            phases: self.phases,
            errors: self.errors,
            unparseable: self.unparseable,
            other_frames: self.other_frames,
            disconnect,
            role: self.role,
            side_received: self.side_received,
            offsets: self.position.counts,
            reconnects: 0,
            reconnect_failures: Vec::new(),
        }
    }

    /// Handles every complete frame in `buf`; returns the bytes consumed. Synchronous so
    /// the histogram lock is never held across an await.
    fn process(
        &mut self,
        buf: &mut [u8],
        now: u64,
        sh: &Shared,
        out: &mut Vec<u8>,
        rng: &mut Rng,
    ) -> Result<(usize, Flow), ProtocolError> {
        let mut pos = 0;
        let mut hists: Option<MutexGuard<'_, Hists>> = None;
        loop {
            let h = match ws::next_frame(&mut buf[pos..])? {
                Walk::Need(n) => return Ok((pos, Flow::More(n))),
                Walk::Frame(h) => h,
            };
            let payload = &buf[pos + h.header_len..pos + h.frame_len()];
            pos += h.frame_len();
            match h.opcode {
                ws::OP_TEXT | ws::OP_BINARY if self.frag.is_some() => {
                    return Err(ProtocolError::NewMessageInFragment);
                }
                ws::OP_TEXT if h.fin => self.on_text(payload, now, sh, &mut hists),
                ws::OP_BINARY if h.fin => self.other_frames += 1,
                ws::OP_TEXT | ws::OP_BINARY => self.frag = Some((h.opcode, payload.to_vec())),
                ws::OP_CONT => {
                    let Some((_, data)) = self.frag.as_mut() else {
                        return Err(ProtocolError::ContinuationWithoutMessage);
                    };
                    if data.len() + payload.len() > ws::MAX_FRAME {
                        return Err(ProtocolError::FragmentedTooLarge);
                    }
                    data.extend_from_slice(payload);
                    if h.fin {
                        if let Some((op, data)) = self.frag.take() {
                            if op == ws::OP_TEXT {
                                self.on_text(&data, now, sh, &mut hists);
                            } else {
                                self.other_frames += 1;
                            }
                        }
                    }
                }
                ws::OP_PING => ws::encode_frame(out, ws::OP_PONG, payload, rng.mask()),
                ws::OP_PONG => {}
                ws::OP_CLOSE => return Ok((pos, Flow::Close(ws::close_code(payload)))),
                _ => return Err(ProtocolError::UnknownOpcode),
            }
        }
    }

    fn on_text<'a>(
        &mut self,
        msg: &[u8],
        now: u64,
        sh: &'a Shared,
        hists: &mut Option<MutexGuard<'a, Hists>>,
    ) {
        if self.envelope {
            self.on_envelope(msg, now, sh, hists);
        } else if msg.first() == Some(&b'{') {
            self.on_json(msg, sh);
        } else {
            self.on_message(msg, true, now, sh, hists);
        }
    }

    /// One envelope-mode frame: a delivery is checked like a bare one, and its offset (in
    /// our room) against the last; the join's answer says where the room is.
    fn on_envelope<'a>(
        &mut self,
        msg: &[u8],
        now: u64,
        sh: &'a Shared,
        hists: &mut Option<MutexGuard<'a, Hists>>,
    ) {
        let ours = |room: &str| envelope::room_number(room, &sh.room_prefix) == Some(self.room);
        match envelope::parse(msg) {
            envelope::Frame::Delivery {
                room,
                message,
                stamp,
            } => {
                let ours = ours(&room);
                if let (true, true, Some(s)) = (ours, self.track_offsets, &stamp) {
                    self.position.delivery(s.offset, &s.epoch);
                }
                self.on_message(message.as_bytes(), ours, now, sh, hists);
            }
            envelope::Frame::Subscribed {
                room,
                stamp,
                recovered,
            } => {
                if ours(&room) && self.track_offsets {
                    let latest = stamp.as_ref().map(|s| (s.offset, &*s.epoch));
                    self.position.subscribed(latest, recovered);
                }
            }
            envelope::Frame::Reply => {}
            envelope::Frame::Gap { room } => {
                if ours(&room) {
                    self.position.gap_notice();
                } else {
                    self.other_frames += 1;
                }
            }
            envelope::Frame::Error(code) => self.count_error(code, sh),
            envelope::Frame::Other => self.other_frames += 1,
            envelope::Frame::Invalid => self.unparseable += 1,
        }
    }

    /// A loadgen message (bare, or an envelope's); `labelled_ours`: the envelope named our
    /// room (always true for a bare one), else the delivery counts as misrouted.
    fn on_message<'a>(
        &mut self,
        msg: &[u8],
        labelled_ours: bool,
        now: u64,
        sh: &'a Shared,
        hists: &mut Option<MutexGuard<'a, Hists>>,
    ) {
        match parse_msg(msg) {
            Some(Msg::Probe { room }) => {
                if labelled_ours && room == self.room && !self.ready {
                    self.ready = true;
                    sh.room_ready[room as usize].fetch_add(1, Ordering::Relaxed);
                }
            }
            Some(Msg::Data {
                room,
                sender,
                seq,
                sched,
            }) => {
                let room = if labelled_ours { room } else { MISLABELLED };
                self.on_data(room, sender, seq, sched, now, sh, hists);
            }
            None => self.unparseable += 1,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_data<'a>(
        &mut self,
        room: u32,
        sender: u32,
        seq: u64,
        sched: u64,
        now: u64,
        sh: &'a Shared,
        hists: &mut Option<MutexGuard<'a, Hists>>,
    ) {
        let Some(schedule) = self.schedule.as_deref() else {
            self.unparseable += 1;
            return;
        };
        let Some(p) = schedule.phase_of(sched) else {
            self.unparseable += 1;
            return;
        };
        if let Some(arrival) = schedule.phase_of(now) {
            self.phases[arrival].arrived += 1;
        }
        if room != self.room {
            if self.checked {
                self.phases[p].misrouted += 1;
            }
            return;
        }
        let rank = sender / self.rooms;
        if sender % self.rooms != room || rank >= self.senders_per_room {
            // Not a sender loadgen has: a corrupted or foreign message.
            self.unparseable += 1;
            return;
        }
        if !self.checked {
            // Only counted: a reconnecting client that does not resume misses what is sent
            // while it is away, and the healthy clients are the ones checked.
            if self.trackers[rank as usize].observe(seq) != Seen::Duplicate {
                self.side_received += 1;
            }
            return;
        }
        if self.dialect == Dialect::Join && sender == self.id {
            // The join dialect never echoes to the sender; receiving it is a routing fault.
            self.phases[p].misrouted += 1;
            return;
        }
        match self.trackers[rank as usize].observe(seq) {
            Seen::Duplicate => self.phases[p].duplicates += 1,
            seen => {
                if seen == Seen::Reordered {
                    self.phases[p].order_violations += 1;
                }
                self.phases[p].received += 1;
                self.unique_in_batch += 1;
                // Phase 0 is the warm-up, excluded from latency; so are resuming clients,
                // whose replayed deliveries are late by design.
                if p > 0 && self.role == Role::Healthy {
                    let us = (now.saturating_sub(sched) / 1000).max(1);
                    let h = hists.get_or_insert_with(|| sh.shard(self.id));
                    h.latency[p].saturating_record(us);
                    if sh.split_rooms > 0 {
                        h.split[usize::from(room < sh.split_rooms)].saturating_record(us);
                    }
                }
            }
        }
    }

    fn on_json(&mut self, msg: &[u8], sh: &Shared) {
        match classify_json(msg) {
            JsonFrame::Error(code) => self.count_error(code, sh),
            JsonFrame::Other => self.other_frames += 1,
            JsonFrame::Invalid => self.unparseable += 1,
        }
    }

    fn count_error(&mut self, code: String, sh: &Shared) {
        self.errors += 1;
        if let Some(p) = self.last_send_phase {
            // The answer to one of our messages: it went to no one.
            self.phases[p].refused += 1;
            self.refused_in_batch += 1;
        }
        let mut codes = sh.error_codes.lock().unwrap_or_else(|e| e.into_inner());
        *codes.entry(code).or_insert(0) += 1;
    }
}

/// Appends the JSON of a send in the chosen dialect, carrying message `m` built by `body`.
fn build_send(
    scratch: &mut Vec<u8>,
    (dialect, prefix): (Dialect, &str),
    room: u32,
    body: impl FnOnce(&mut Vec<u8>),
) {
    scratch.clear();
    // Writes to a Vec cannot fail.
    let _ = match dialect {
        Dialect::Subscribe => write!(
            scratch,
            "{{\"type\":\"sendMessage\",\"roomId\":\"{prefix}{room}\",\"message\":\""
        ),
        Dialect::Join => write!(scratch, "{{\"type\":\"chat\",\"payload\":{{\"message\":\""),
    };
    body(scratch);
    scratch.extend_from_slice(match dialect {
        Dialect::Subscribe => b"\"}",
        Dialect::Join => b"\"}}",
    });
}

/// The join in the chosen dialect; with `since` (offset, epoch), a resume from there.
pub(crate) fn build_join(
    scratch: &mut Vec<u8>,
    (dialect, prefix): (Dialect, &str),
    room: u32,
    since: Option<(u64, &str)>,
) {
    scratch.clear();
    let _ = match dialect {
        Dialect::Subscribe => write!(
            scratch,
            "{{\"type\":\"SUBSCRIBE\",\"room\":\"{prefix}{room}\""
        ),
        Dialect::Join => write!(
            scratch,
            "{{\"type\":\"join\",\"payload\":{{\"roomId\":\"{prefix}{room}\""
        ),
    };
    if let Some(since) = since {
        envelope::write_since(scratch, since);
    }
    scratch.extend_from_slice(match dialect {
        Dialect::Subscribe => b"}",
        Dialect::Join => b"}}",
    });
}

pub struct ClientArgs {
    pub id: u32,
    pub addr: SocketAddr,
    pub url: Arc<ws::WsUrl>,
    /// Where a reconnecting client goes next with `--reconnect-elsewhere`: every --url in
    /// turn, starting after its own.
    pub targets: Arc<Vec<(SocketAddr, Arc<ws::WsUrl>)>>,
    pub shared: Arc<Shared>,
    pub connect_permits: Arc<Semaphore>,
    pub outcomes: mpsc::UnboundedSender<Outcome>,
    pub ctl: watch::Receiver<Ctl>,
    pub stop: watch::Receiver<bool>,
}

/// Where a connect goes: the server, and (a resume) the last offset and epoch received.
struct Dest<'a> {
    addr: SocketAddr,
    url: &'a ws::WsUrl,
    since: Option<(u64, &'a str)>,
}

/// TCP connect, TLS handshake (`wss://`), upgrade, join (a resume from `since` when given).
/// Leaves any bytes read past the upgrade response at the start of `rbuf` and returns how many,
/// and how long all of it took (the TLS handshake included).
async fn connect(
    a: &ClientArgs,
    Dest { addr, url, since }: Dest<'_>,
    phase_deadline: Instant,
    rbuf: &mut Vec<u8>,
    scratch: &mut Vec<u8>,
    out: &mut Vec<u8>,
    rng: &mut Rng,
) -> Result<(ReadHalf, WriteHalf, usize, Duration), ConnectError> {
    let sh = &a.shared;
    let _permit = tokio::select! {
        p = a.connect_permits.acquire() => p.map_err(|_| ConnectError::Aborted)?,
        () = tokio::time::sleep_until(phase_deadline) => return Err(ConnectError::Queued),
    };
    let started = Instant::now();
    let deadline = (started + sh.connect_timeout).min(phase_deadline);
    let attempt = async {
        let s = TcpStream::connect(addr).await.map_err(ConnectError::Tcp)?;
        // Deliveries are small frames; Nagle would add latency loadgen would then report.
        let _ = s.set_nodelay(true);
        let to = (url, since);
        if !url.tls {
            return upgrade_and_join(s, a, to, rbuf, scratch, out, rng).await;
        }
        let (Some(connector), Ok(name)) = (&sh.tls, tls::server_name(url)) else {
            // `run` checks both before any client starts.
            let e = std::io::Error::other("no TLS configuration for this wss:// URL");
            return Err(ConnectError::Tls(e));
        };
        // Boxed: the handshake's state stays off the connect future of every client.
        let s = Box::pin(tls::handshake(connector, name, s))
            .await
            .map_err(ConnectError::Tls)?;
        upgrade_and_join(s, a, to, rbuf, scratch, out, rng).await
    };
    match tokio::time::timeout_at(deadline, attempt).await {
        Ok(Ok((r, w, left))) => Ok((r, w, left, started.elapsed())),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ConnectError::Timeout(sh.connect_timeout, url.tls)),
    }
}

/// The upgrade and the join on a connected stream (plain TCP, or TLS over it). Returns the
/// stream's halves and how many bytes past the upgrade response `rbuf` starts with.
async fn upgrade_and_join<S: Transport>(
    mut s: S,
    a: &ClientArgs,
    (url, since): (&ws::WsUrl, Option<(u64, &str)>),
    rbuf: &mut Vec<u8>,
    scratch: &mut Vec<u8>,
    out: &mut Vec<u8>,
    rng: &mut Rng,
) -> Result<(ReadHalf, WriteHalf, usize), ConnectError> {
    let sh = &a.shared;
    let token = sh.tokens.as_ref().map(|m| m.token(a.id));
    let protocol = sh.envelope.then_some(envelope::PROTOCOL);
    let request = ws::upgrade_request(url, rng.key(), token.as_deref(), protocol);
    tls::send_all(&mut s, &request)
        .await
        .map_err(ConnectError::HandshakeWrite)?;
    let mut filled = 0;
    let header_len = loop {
        if filled == rbuf.len() {
            if rbuf.len() >= ws::MAX_HANDSHAKE {
                return Err(HandshakeError::TooLarge.into());
            }
            rbuf.resize(ws::MAX_HANDSHAKE, 0);
        }
        let n = s
            .read(&mut rbuf[filled..])
            .await
            .map_err(ConnectError::HandshakeRead)?;
        if n == 0 {
            return Err(ConnectError::ClosedBeforeUpgrade);
        }
        filled += n;
        if let ws::Handshake::Done { header_len } = ws::check_handshake(&rbuf[..filled])? {
            break header_len;
        }
    };
    if let Some(p) = protocol {
        // Without it every delivery would be bare and nothing could be checked.
        ws::check_protocol(&rbuf[..header_len], p)?;
    }
    rbuf.copy_within(header_len..filled, 0);
    let wire = (sh.dialect, &*sh.room_prefix);
    build_join(scratch, wire, a.id % sh.rooms, since);
    out.clear();
    ws::encode_frame(out, ws::OP_TEXT, scratch, rng.mask());
    tls::send_all(&mut s, out)
        .await
        .map_err(ConnectError::JoinWrite)?;
    out.clear();
    let (r, w) = s.halves();
    Ok((r, w, filled - header_len))
}

/// What a handler wants the connection loop to do next.
enum Next {
    Continue,
    /// End the connection; `Some(reason)` when it ended before loadgen stopped it.
    End(Option<String>),
}

/// Everything one established connection owns besides its read half, which the select loop
/// borrows separately.
struct Conn {
    id: u32,
    room: u32,
    is_sender: bool,
    sh: Arc<Shared>,
    st: ClientState,
    wr: WriteHalf,
    stop: watch::Receiver<bool>,
    rbuf: Vec<u8>,
    /// Unconsumed bytes are `rbuf[start..end]`.
    start: usize,
    end: usize,
    out: Vec<u8>,
    scratch: Vec<u8>,
    rng: Rng,
    sender: Option<Sender>,
    plan: Option<Arc<Plan>>,
    last_probe_round: u32,
    role: Role,
    /// Stalled: reading has stopped.
    stalled: bool,
    next_ping: u64,
    /// Reconnecting: our close is sent, we read only to see the server's answer.
    closing: bool,
    /// Reconnecting: the last reconnect failed, so there is no connection until the next.
    down: bool,
    /// Reconnecting: index of the next reconnect time.
    reconnect_n: u64,
    reconnects: u64,
    /// Reconnect attempts so far (picks the next --url with `--reconnect-elsewhere`).
    hops: u64,
    reconnect_failures: Vec<String>,
}

impl Conn {
    /// Writes and clears `out`, unless loadgen is stopping.
    async fn flush(&mut self) -> Next {
        if self.out.is_empty() {
            return Next::Continue;
        }
        match self.write_out().await {
            None => Next::End(None),
            Some(Ok(())) => Next::Continue,
            Some(Err(e)) => Next::End(Some(format!("write: {e}"))),
        }
    }

    /// Writes whatever `out` holds followed by a close frame, giving up after CLOSE_WAIT:
    /// the connection ends next either way.
    async fn send_close(&mut self, code: u16) {
        ws::encode_close(&mut self.out, code, self.rng.mask());
        let _ = tokio::time::timeout(CLOSE_WAIT, self.wr.write_all(&self.out)).await;
    }

    /// Writes and clears `out`; `None` when loadgen stopped first.
    async fn write_out(&mut self) -> Option<std::io::Result<()>> {
        let r = tokio::select! {
            r = self.wr.write_all(&self.out) => r,
            _ = self.stop.changed() => return None,
        };
        self.out.clear();
        Some(r)
    }

    async fn on_ctl(&mut self, c: Ctl) -> Next {
        if c.plan.is_some() {
            self.plan = c.plan;
        }
        let Some(plan) = self.plan.clone() else {
            return Next::Continue;
        };
        let room = self.room;
        if let (Some(s), None) = (&c.schedule, &self.st.schedule) {
            self.st.schedule = Some(Arc::clone(s));
            if self.is_sender {
                let r = room as usize;
                let recipients = plan.recipients[r] + plan.resume_recipients[r];
                self.sender = Some(Sender::new(s, self.id, recipients));
            }
        }
        let room_ready = self.sh.room_ready[room as usize].load(Ordering::Relaxed);
        if c.probe_round > self.last_probe_round
            && plan.prober[room as usize] == self.id
            && room_ready < plan.required[room as usize]
        {
            self.last_probe_round = c.probe_round;
            let round = c.probe_round;
            let wire = (self.sh.dialect, &*self.sh.room_prefix);
            build_send(&mut self.scratch, wire, room, |b| {
                let _ = write!(b, "lg-{room}|P|{round}|");
            });
            ws::encode_frame(&mut self.out, ws::OP_TEXT, &self.scratch, self.rng.mask());
            return self.flush().await;
        }
        Next::Continue
    }

    /// Sends every message whose scheduled time has come (open loop: a late sender catches
    /// up at once instead of shifting its schedule).
    async fn on_send_due(&mut self) -> Next {
        let (n, recipients) = self.queue_due();
        // Announced before the write: its deliveries may arrive before the write returns.
        self.sh
            .in_flight
            .fetch_add(n * recipients, Ordering::AcqRel);
        let next = self.flush().await;
        if let Next::Continue = next {
            self.sh.sent.fetch_add(n, Ordering::Relaxed);
            self.sh.expected.fetch_add(n * recipients, Ordering::AcqRel);
        }
        self.sh
            .in_flight
            .fetch_sub(n * recipients, Ordering::AcqRel);
        next
    }

    /// Frames the due messages into `out`; returns how many and their recipients each.
    /// Synchronous so the histogram lock is never held across an await.
    fn queue_due(&mut self) -> (u64, u64) {
        let (Some(s), Some(sch)) = (self.sender.as_mut(), self.st.schedule.as_deref()) else {
            return (0, 0);
        };
        let (sh, room, id) = (&*self.sh, self.room, self.id);
        let now = now_ns();
        let mut n = 0u64;
        let mut hists: Option<MutexGuard<'_, Hists>> = None;
        while !s.done && s.next <= now && (n as usize) < MAX_SEND_BATCH {
            let (seq, sched, pad) = (s.seq, s.next, sh.payload);
            build_send(
                &mut self.scratch,
                (sh.dialect, &sh.room_prefix),
                room,
                |b| {
                    let at = b.len();
                    let _ = write!(b, "lg-{room}|{id}|{seq}|{sched}|");
                    let len = b.len() - at;
                    b.resize(b.len() + pad.saturating_sub(len), b'x');
                },
            );
            ws::encode_frame(&mut self.out, ws::OP_TEXT, &self.scratch, self.rng.mask());
            hists.get_or_insert_with(|| sh.shard(id)).lag[s.phase]
                .saturating_record((now - sched) / 1000);
            self.st.phases[s.phase].sent += 1;
            self.st.last_send_phase = Some(s.phase);
            s.seq += 1;
            s.k += 1;
            s.settle(sch);
            n += 1;
        }
        (n, s.recipients)
    }

    /// Handles one read of `n` new bytes at `rbuf[end..]`.
    async fn on_read(&mut self, r: std::io::Result<usize>) -> Next {
        let n = match r {
            Ok(0) => return Next::End(Some("server closed the TCP connection".into())),
            Ok(n) => n,
            Err(e) => return Next::End(Some(format!("read: {e}"))),
        };
        self.end += n;
        // One clock read per batch: every frame in it arrived by now.
        let now = now_ns();
        let res = self.st.process(
            &mut self.rbuf[self.start..self.end],
            now,
            &self.sh,
            &mut self.out,
            &mut self.rng,
        );
        let unique = std::mem::take(&mut self.st.unique_in_batch);
        if unique > 0 {
            self.sh.received.fetch_add(unique, Ordering::Relaxed);
        }
        let refused = std::mem::take(&mut self.st.refused_in_batch);
        if let (true, Some(s)) = (refused > 0, &self.sender) {
            // Owed to no one after all, so the drain does not wait for them. The send was
            // added to `expected` before its answer could be read (same task); saturating
            // all the same, should a server answer more errors than there were sends.
            let owed = refused * s.recipients;
            let _ = self
                .sh
                .expected
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |e| {
                    Some(e.saturating_sub(owed))
                });
        }
        let (used, flow) = match res {
            Ok(x) => x,
            Err(e) => return Next::End(Some(e.to_string())),
        };
        self.start += used;
        let need = match flow {
            Flow::More(need) => need,
            Flow::Close(code) => {
                let code = code.unwrap_or(1000);
                if !self.closing {
                    // Echo the close as RFC 6455 asks, then end; waiting for the TCP close
                    // would only make shutdown slower.
                    self.send_close(code).await;
                }
                return Next::End(Some(format!("server sent close {code}")));
            }
        };
        if self.closing {
            // Our close is out: no pongs may follow it.
            self.out.clear();
        } else if let Next::End(r) = self.flush().await {
            // Pongs queued while parsing.
            return Next::End(r);
        }
        self.make_room(need);
        Next::Continue
    }

    /// Makes sure `rbuf` has room after `end` for a read, and for a frame of `need` bytes
    /// starting at `start`.
    fn make_room(&mut self, need: usize) {
        let len = self.rbuf.len();
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.start > 0 && (self.start + need > len || len - self.end < len / 8) {
            // A partial frame near the end: move it to the front so the next read is big.
            self.rbuf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.start + need > self.rbuf.len() {
            // A frame larger than the buffer (bounded by ws::MAX_FRAME).
            self.rbuf.resize(self.start + need, 0);
        }
    }

    /// Stalled clients stop reading once their membership is confirmed (or sending began
    /// without that). Returns whether this client reads its socket.
    fn reading(&mut self) -> bool {
        if self.role == Role::Stalled
            && !self.stalled
            && (self.st.ready || self.st.schedule.is_some())
        {
            self.stalled = true;
            self.next_ping = now_ns() + STALL_PING.as_nanos() as u64;
        }
        !self.stalled && !self.down
    }

    /// Time of the next stall ping or reconnect, if any.
    fn aux_due(&self) -> Option<u64> {
        match self.role {
            Role::Healthy => None,
            Role::Stalled => self.stalled.then_some(self.next_ping),
            Role::Reconnecting { slot } => {
                let sch = self.st.schedule.as_deref()?;
                let t = self.reconnect_start(sch, slot) + self.reconnect_n * self.reconnect_ns();
                (t < sch.end_ns()).then_some(t)
            }
        }
    }

    fn reconnect_ns(&self) -> u64 {
        (self.sh.reconnect_every.as_nanos() as u64).max(1)
    }

    /// First reconnect of `slot`: the slots are spread evenly over one period from the start
    /// of sending.
    fn reconnect_start(&self, sch: &Schedule, slot: u32) -> u64 {
        let slots = f64::from(self.sh.reconnect_slots.max(1));
        let offset = self.reconnect_ns() as f64 * (f64::from(slot) + 0.5) / slots;
        sch.phases.first().map_or(0, |p| p.start_ns) + offset as u64
    }

    async fn on_aux(&mut self, a: &ClientArgs, rd: &mut ReadHalf) -> Next {
        match self.role {
            Role::Healthy => Next::Continue,
            Role::Stalled => self.stall_ping(rd).await,
            Role::Reconnecting { slot } => {
                let next = self.reconnect(a, rd).await;
                if let Some(sch) = self.st.schedule.clone() {
                    // Next slot strictly after now, even if this one ran long.
                    let start = self.reconnect_start(&sch, slot);
                    self.reconnect_n = now_ns().saturating_sub(start) / self.reconnect_ns() + 1;
                }
                next
            }
        }
    }

    /// A stalled client's only traffic: a ping now and then. When it cannot be written, the
    /// server has dropped the connection, and what it last sent is still unread.
    async fn stall_ping(&mut self, rd: &mut ReadHalf) -> Next {
        self.next_ping = now_ns() + STALL_PING.as_nanos() as u64;
        self.out.clear();
        let mask = self.rng.mask();
        ws::encode_frame(&mut self.out, ws::OP_PING, b"", mask);
        match self.write_out().await {
            None => Next::End(None),
            Some(Ok(())) => Next::Continue,
            Some(Err(e)) => {
                let found = self.drain_for_close(rd, Instant::now() + STALL_DRAIN).await;
                Next::End(Some(found.unwrap_or_else(|| {
                    format!("write failed ({}), no close frame", e.kind())
                })))
            }
        }
    }

    /// Reads and skips everything buffered, looking for the server's close frame. `None`
    /// when the connection is still open and quiet at `deadline`; otherwise how it ended.
    async fn drain_for_close(&mut self, rd: &mut ReadHalf, deadline: Instant) -> Option<String> {
        loop {
            let need = loop {
                let h = match ws::next_frame(&mut self.rbuf[self.start..self.end]) {
                    Err(e) => return Some(e.to_string()),
                    Ok(Walk::Need(n)) => break n,
                    Ok(Walk::Frame(h)) => h,
                };
                let payload = &self.rbuf[self.start + h.header_len..self.start + h.frame_len()];
                let code = ws::close_code(payload);
                self.start += h.frame_len();
                if h.opcode == ws::OP_CLOSE {
                    return Some(code.map_or_else(
                        || "close without a code".to_string(),
                        |c| format!("close {c}"),
                    ));
                }
            };
            self.make_room(need);
            match tokio::time::timeout_at(deadline, rd.read(&mut self.rbuf[self.end..])).await {
                Err(_) => return None,
                Ok(Ok(0)) => return Some("TCP closed, no close frame".into()),
                Ok(Ok(n)) => self.end += n,
                Ok(Err(e)) => return Some(format!("{}, no close frame", e.kind())),
            }
        }
    }

    /// Closes cleanly (our close, the server's answer), connects again and rejoins. A failed
    /// attempt leaves the client down until its next reconnect time.
    async fn reconnect(&mut self, a: &ClientArgs, rd: &mut ReadHalf) -> Next {
        if !self.down {
            self.out.clear();
            ws::encode_close(&mut self.out, 1000, self.rng.mask());
            if let Next::End(None) = self.flush().await {
                return Next::End(None);
            }
            // Deliveries that arrive before the server's answer still count.
            self.closing = true;
            let deadline = Instant::now() + RECONNECT_CLOSE_WAIT;
            loop {
                let r = tokio::select! {
                    r = tokio::time::timeout_at(deadline, rd.read(&mut self.rbuf[self.end..])) => r,
                    _ = self.stop.changed() => return Next::End(None),
                };
                match r {
                    Ok(r) => {
                        if let Next::End(_) = self.on_read(r).await {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
            self.closing = false;
            let _ = self.wr.shutdown().await;
            self.down = true;
            if !self.sh.reconnect_away.is_zero() {
                tokio::select! {
                    () = tokio::time::sleep(self.sh.reconnect_away) => {}
                    _ = self.stop.changed() => return Next::End(None),
                }
            }
        }
        self.st.frag = None;
        self.start = 0;
        self.end = 0;
        self.out.clear();
        self.st.position.reconnected(self.st.resume);
        let since = self.st.resume.then(|| self.st.position.since());
        let deadline = Instant::now() + self.sh.connect_timeout;
        // With --reconnect-elsewhere, the next --url each time (the targets list starts at
        // this client's own).
        self.hops += 1;
        let (addr, url) = if self.sh.reconnect_elsewhere && !a.targets.is_empty() {
            let (addr, url) = &a.targets[self.hops as usize % a.targets.len()];
            (*addr, Arc::clone(url))
        } else {
            (a.addr, Arc::clone(&a.url))
        };
        let dest = Dest {
            addr,
            url: &url,
            since,
        };
        let (rbuf, scratch, out) = (&mut self.rbuf, &mut self.scratch, &mut self.out);
        let r = tokio::select! {
            r = connect(a, dest, deadline, rbuf, scratch, out, &mut self.rng) => r,
            _ = self.stop.changed() => return Next::End(None),
        };
        match r {
            Ok((r, w, left, _)) => {
                *rd = r;
                self.wr = w;
                self.end = left;
                self.down = false;
                self.reconnects += 1;
            }
            Err(e) => self.reconnect_failures.push(e.to_string()),
        }
        Next::Continue
    }

    async fn close(mut self, disconnect: Option<String>, rd: &mut ReadHalf) -> ClientResult {
        let mut disconnect = disconnect;
        if disconnect.is_none() && self.stalled {
            // The server may have sent its close and not yet dropped the connection.
            disconnect = self
                .drain_for_close(rd, Instant::now() + STALL_FINAL_DRAIN)
                .await;
        }
        if disconnect.is_none() && !self.down {
            // Polite close; not waiting for the server's answer keeps shutdown bounded.
            self.out.clear();
            self.send_close(1000).await;
        }
        let mut r = self.st.into_result(true, disconnect);
        r.reconnects = self.reconnects;
        r.reconnect_failures = self.reconnect_failures;
        r
    }
}

impl ClientState {
    fn new(id: u32, sh: &Shared) -> ClientState {
        let role = sh.role(id);
        let resume = sh.resume && matches!(role, Role::Reconnecting { .. });
        let is_sender = id / sh.rooms < sh.senders_per_room;
        ClientState {
            id,
            room: id % sh.rooms,
            rooms: sh.rooms,
            senders_per_room: sh.senders_per_room,
            dialect: sh.dialect,
            phases: vec![PhaseCounters::default(); sh.n_phases],
            trackers: vec![SeqTracker::default(); sh.senders_per_room as usize],
            ready: false,
            errors: 0,
            unparseable: 0,
            other_frames: 0,
            frag: None,
            schedule: None,
            unique_in_batch: 0,
            refused_in_batch: 0,
            last_send_phase: None,
            role,
            checked: role == Role::Healthy || resume,
            resume,
            side_received: 0,
            envelope: sh.envelope,
            track_offsets: !(sh.dialect == Dialect::Join && is_sender),
            position: RoomPosition::default(),
        }
    }
}

/// The buffers a client keeps for its whole life, across reconnects.
struct Buffers {
    rbuf: Vec<u8>,
    out: Vec<u8>,
    scratch: Vec<u8>,
    rng: Rng,
}

pub async fn client_task(a: ClientArgs) -> ClientResult {
    let sh = Arc::clone(&a.shared);
    let id = a.id;
    let st = ClientState::new(id, &sh);
    let mut b = Buffers {
        rbuf: vec![0u8; sh.read_buf],
        out: Vec::with_capacity(256),
        scratch: Vec::with_capacity(sh.payload + 128),
        rng: Rng::new(u64::from(id) ^ now_ns()),
    };
    let home = Dest {
        addr: a.addr,
        url: &a.url,
        since: None,
    };
    let connected = connect(
        &a,
        home,
        sh.connect_deadline,
        &mut b.rbuf,
        &mut b.scratch,
        &mut b.out,
        &mut b.rng,
    )
    .await;
    let (mut rd, wr, end) = match connected {
        Ok((rd, wr, left, took)) => {
            let _ = a.outcomes.send(Outcome {
                id,
                result: Ok(took),
            });
            (rd, wr, left)
        }
        Err(e) => {
            let _ = a.outcomes.send(Outcome { id, result: Err(e) });
            return st.into_result(false, None);
        }
    };
    let mut c = Conn::new(&a, st, wr, b, end);
    let disconnect = c.serve(a, &mut rd).await;
    c.close(disconnect, &mut rd).await
}

impl Conn {
    fn new(a: &ClientArgs, st: ClientState, wr: WriteHalf, b: Buffers, end: usize) -> Conn {
        let sh = Arc::clone(&a.shared);
        Conn {
            id: a.id,
            room: st.room,
            is_sender: a.id / sh.rooms < sh.senders_per_room,
            role: st.role,
            sh,
            st,
            wr,
            stop: a.stop.clone(),
            rbuf: b.rbuf,
            start: 0,
            end,
            out: b.out,
            scratch: b.scratch,
            rng: b.rng,
            sender: None,
            plan: None,
            last_probe_round: 0,
            stalled: false,
            next_ping: 0,
            closing: false,
            down: false,
            reconnect_n: 0,
            reconnects: 0,
            hops: 0,
            reconnect_failures: Vec::new(),
        }
    }

    /// The connection's life after the join: reads, sends, control messages, stall pings and
    /// reconnects, until loadgen stops it or it ends. Returns why it ended, if not stopped.
    async fn serve(&mut self, mut a: ClientArgs, rd: &mut ReadHalf) -> Option<String> {
        let far = Instant::now() + Duration::from_secs(86_400);
        let sleep = tokio::time::sleep_until(far);
        tokio::pin!(sleep);
        let mut armed = u64::MAX;
        // Stall pings and reconnects (a client has at most one of the two).
        let aux = tokio::time::sleep_until(far);
        tokio::pin!(aux);
        let mut aux_armed = u64::MAX;
        loop {
            let due = self.sender.as_ref().filter(|s| !s.done).map(|s| s.next);
            if let Some(t) = due.filter(|&t| t != armed) {
                sleep.as_mut().reset(instant_at(t));
                armed = t;
            }
            let reading = self.reading();
            let aux_due = self.aux_due();
            if let Some(t) = aux_due.filter(|&t| t != aux_armed) {
                aux.as_mut().reset(instant_at(t));
                aux_armed = t;
            }
            // Deliberately not `biased`: under overload a fixed order would let constant
            // incoming traffic starve the sender (or a late sender starve the reader), and
            // either would be loadgen's fault, not the server's.
            let next = tokio::select! {
                _ = a.stop.changed() => Next::End(None),
                r = a.ctl.changed() => match r {
                    Ok(()) => {
                        let ctl = a.ctl.borrow_and_update().clone();
                        self.on_ctl(ctl).await
                    }
                    Err(_) => Next::End(None),
                },
                () = &mut sleep, if due.is_some() => {
                    // Re-arm even if nothing was due yet (a timer firing a hair early), or
                    // the elapsed sleep would spin.
                    armed = u64::MAX;
                    self.on_send_due().await
                }
                () = &mut aux, if aux_due.is_some() => {
                    aux_armed = u64::MAX;
                    self.on_aux(&a, rd).await
                }
                r = rd.read(&mut self.rbuf[self.end..]), if reading => self.on_read(r).await,
            };
            if let Next::End(reason) = next {
                return reason;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracker_tells_duplicates_from_reorderings() {
        let mut t = SeqTracker::default();
        assert_eq!(t.observe(0), Seen::New);
        assert_eq!(t.observe(2), Seen::New);
        assert_eq!(t.observe(1), Seen::Reordered);
        assert_eq!(t.observe(1), Seen::Duplicate);
        assert_eq!(t.observe(2), Seen::Duplicate);
        assert_eq!(t.observe(0), Seen::Duplicate);
        assert_eq!(t.observe(3), Seen::New);
        assert_eq!(t.observe(500), Seen::New);
        assert_eq!(t.observe(499), Seen::Reordered);
        assert_eq!(t.observe(3), Seen::Reordered); // out of the window: cannot tell
                                                   // A gap alone (loss) is neither.
        let mut t = SeqTracker::default();
        for s in [0, 1, 5, 6, 9] {
            assert_eq!(t.observe(s), Seen::New);
        }
    }

    #[test]
    fn roles_spread_over_rooms_and_spare_senders() {
        let (roles, slots) = assign_roles(10_000, 50, 2, 0.1, 0.05);
        // 9900 non-senders: 990 stall; 5% of the other 8910 reconnect.
        let stalled = roles.iter().filter(|r| **r == Role::Stalled).count();
        assert_eq!(stalled, 990);
        assert_eq!(slots, 445);
        for room in 0..50usize {
            let ids = (room..10_000).step_by(50);
            let n = ids.clone().filter(|&i| roles[i] == Role::Stalled).count();
            assert!((19..=20).contains(&n), "room {room}: {n} stalled");
            let n = ids
                .filter(|&i| matches!(roles[i], Role::Reconnecting { .. }))
                .count();
            assert!((8..=9).contains(&n), "room {room}: {n} reconnecting");
        }
        assert!(roles[..100].iter().all(|r| *r == Role::Healthy), "senders");
        let mut seen: Vec<u32> = roles
            .iter()
            .filter_map(|r| match r {
                Role::Reconnecting { slot } => Some(*slot),
                _ => None,
            })
            .collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..slots).collect::<Vec<_>>());
        assert!(assign_roles(100, 5, 2, 0.0, 0.0).0.is_empty());
    }

    #[test]
    fn message_roundtrip() {
        let mut b = Vec::new();
        build_send(&mut b, (Dialect::Subscribe, "lg-"), 3, |b| {
            let _ = write!(b, "lg-3|17|42|123456789|xxxx");
        });
        assert_eq!(
            b,
            br#"{"type":"sendMessage","roomId":"lg-3","message":"lg-3|17|42|123456789|xxxx"}"#
        );
        build_send(&mut b, (Dialect::Join, "lg-"), 3, |b| {
            b.extend_from_slice(b"m")
        });
        assert_eq!(b, br#"{"type":"chat","payload":{"message":"m"}}"#);
        build_join(&mut b, (Dialect::Join, "lg-"), 7, None);
        assert_eq!(b, br#"{"type":"join","payload":{"roomId":"lg-7"}}"#);
        build_join(&mut b, (Dialect::Subscribe, "lg-"), 7, None);
        assert_eq!(b, br#"{"type":"SUBSCRIBE","room":"lg-7"}"#);
        build_join(&mut b, (Dialect::Subscribe, "lg-"), 7, Some((12, "e\"")));
        assert_eq!(
            b,
            br#"{"type":"SUBSCRIBE","room":"lg-7","since":{"offset":12,"epoch":"e\""}}"#
        );
        build_join(&mut b, (Dialect::Join, "lg-"), 7, Some((0, "")));
        assert_eq!(
            b,
            br#"{"type":"join","payload":{"roomId":"lg-7","since":{"offset":0,"epoch":""}}}"#
        );
        let Some(Msg::Data {
            room,
            sender,
            seq,
            sched,
        }) = parse_msg(b"lg-3|17|42|123456789|xxxx")
        else {
            panic!("not parsed")
        };
        assert_eq!((room, sender, seq, sched), (3, 17, 42, 123_456_789));
        assert!(matches!(
            parse_msg(b"lg-4|P|2|"),
            Some(Msg::Probe { room: 4 })
        ));
        assert!(parse_msg(b"lg-3|17|42").is_none());
        assert!(parse_msg(b"hello").is_none());
        assert!(parse_msg(b"lg-3|-1|42|5|").is_none());
    }

    /// An error that comes once a sender has sent answers one of its messages: a refused
    /// send of that message's phase. Before that (the join, the probes) it is only an error.
    #[test]
    fn errors_after_sending_are_refused_sends() {
        for envelope in [true, false] {
            let cfg = crate::Config {
                clients: 4,
                rooms: 2,
                senders_per_room: 1,
                envelope,
                ..crate::Config::default()
            };
            let sh = crate::run::new_shared(&cfg, 1);
            let mut st = ClientState::new(0, &sh);
            let mut hists = None;
            let e = br#"{"type":"error","code":"backplane_unavailable","message":"x"}"#;
            st.on_text(e, 0, &sh, &mut hists);
            assert_eq!(
                (st.errors, st.phases[1].refused, st.refused_in_batch),
                (1, 0, 0)
            );
            st.last_send_phase = Some(1);
            st.on_text(e, 0, &sh, &mut hists);
            assert_eq!(
                (st.errors, st.phases[1].refused, st.refused_in_batch),
                (2, 1, 1)
            );
            assert_eq!(st.phases[0].refused, 0);
            let codes = sh.error_codes.lock().unwrap();
            assert_eq!(codes["backplane_unavailable"], 2, "still counted as errors");
        }
    }

    /// A gap notice for the client's room is counted and spares the next delivery the gap
    /// check; one for another room is a stray frame.
    #[test]
    fn gap_notices_for_our_room_unlink_offsets() {
        let cfg = crate::Config {
            clients: 4,
            rooms: 2,
            senders_per_room: 1,
            envelope: true,
            ..crate::Config::default()
        };
        let sh = crate::run::new_shared(&cfg, 1);
        let mut st = ClientState::new(2, &sh);
        let mut hists = None;
        let sub = br#"{"type":"subscribed","room":"lg-0","offset":10,"epoch":"e"}"#;
        st.on_text(sub, 0, &sh, &mut hists);
        st.on_text(br#"{"type":"gap","room":"lg-0"}"#, 0, &sh, &mut hists);
        st.on_text(br#"{"type":"gap","room":"lg-1"}"#, 0, &sh, &mut hists);
        // Without a schedule the message itself is not counted; its offset still is.
        let d =
            br#"{"type":"message","room":"lg-0","message":"lg-0|0|5|1|","offset":15,"epoch":"e"}"#;
        st.on_text(d, 0, &sh, &mut hists);
        let o = st.position.counts;
        assert_eq!((o.gap_notices, o.stamped, o.gaps), (1, 1, 0));
        assert_eq!(st.other_frames, 1);
    }

    #[test]
    fn json_frames() {
        let e = br#"{"type": "error", "code":"limit","message":"rate"}"#;
        assert_eq!(classify_json(e), JsonFrame::Error("limit".into()));
        let e = br#"{"type":"error","code":"a\"b"}"#;
        assert_eq!(classify_json(e), JsonFrame::Error("a\"b".into()));
        let e = br#"{"type":"error"}"#;
        assert_eq!(classify_json(e), JsonFrame::Error("(no code)".into()));
        let j = br#"{"type":"joined","room":"lg-1","members":[1,2]}"#;
        assert_eq!(classify_json(j), JsonFrame::Other);
        assert_eq!(classify_json(b"{not json"), JsonFrame::Invalid);
    }

    #[test]
    fn schedule_spreads_senders_and_walks_phases() {
        let sch = Schedule {
            phases: vec![
                PhaseSpec {
                    start_ns: 0,
                    end_ns: 1_000_000_000,
                    rate: 2.0,
                },
                PhaseSpec {
                    start_ns: 1_000_000_000,
                    end_ns: 2_000_000_000,
                    rate: 4.0,
                },
            ],
            total_senders: 4,
        };
        let mut s = Sender::new(&sch, 1, 10);
        let mut times = vec![];
        while !s.done {
            times.push((s.phase, s.next));
            s.k += 1;
            s.settle(&sch);
        }
        assert_eq!(
            times,
            vec![
                (0, 125_000_000),
                (0, 625_000_000),
                (1, 1_062_500_000),
                (1, 1_312_500_000),
                (1, 1_562_500_000),
                (1, 1_812_500_000)
            ]
        );
        assert_eq!(sch.phase_of(999_999_999), Some(0));
        assert_eq!(sch.phase_of(2_000_000_000), None);
    }
}
