//! Criterion benchmarks for the engine's hot paths: everything a message touches between two
//! sockets that can be measured without a socket, and fan-out to real loopback sockets.
//!
//! * `registry` — membership. `join_then_leave/*` is one `Registry::join` + `Registry::leave`
//!   of a newcomer at the end of the member list (`room_of_0` also creates and removes the
//!   room); `leave_then_rejoin_scattered/*` takes a member from anywhere in the list (the last
//!   one moves into its place) and joins it again (`500_rooms_of_200`: the same 100,000
//!   members as `room_of_100000`, so the two differ only in the room's size, not in how much
//!   of memory the bench walks); `everyone_leaves/room_of_20000` is a whole
//!   audience dropping, per leave. Each change copies one path of the room's persistent tree,
//!   so all of these should stay flat from 200 members to 100,000. `snapshot/*` is what a broadcast pays before its first recipient: one
//!   `ArcSwap` load (`len`), plus the deliveries counter (`broadcast_empty`, a room whose last
//!   member left). `broadcast_200/*` is fan-out to 200 members alone (`quiet`), while a second
//!   thread joins and leaves extra members of the same room as fast as it can (`churning`),
//!   and while it does the same to another room (`churning_other_room`, the control: same CPU
//!   competition, no shared snapshot). Readers never take the shard lock, so the gap between
//!   the last two is what sharing the room costs in cache-line traffic, not waiting.
//! * `fanout` — `Room::broadcast` of one 64-byte text frame to 200, 10,000 and 100,000 members, per
//!   recipient. A recipient costs one outbox push (bound check, queue push, wake-up) and a
//!   reference-count bump of the shared `Bytes`. Outboxes are drained the way the session
//!   writer does it, outside the timed region, after every broadcast: the bounded rings never
//!   fill, so no push takes the refusal path (asserted), and every push pays the wake-up of an
//!   idle writer, as at chat rates.
//! * `sockets` — `Room::broadcast` to 200 members with real loopback sockets, per recipient:
//!   `direct` claims each idle socket and writes it as the step ends; `queued` pushes, then does
//!   the session writer's part (claim, take, write, release) on the same thread, which leaves
//!   out the task wake-up direct writes save.
//! * `decode` — a client message through `protocol::decode` (simd-json tape, strings borrowed
//!   from the buffer) next to serde_json on the same bytes producing the same `Command`. Decoding
//!   parses in place, so every iteration of every variant first copies the input into a reused
//!   buffer.
//! * `frame` — building a server text frame (`frame::text`: the buffer and `bytes`' shared
//!   header allocated, the payload copied) and unmasking a client payload (`frame::apply_mask`),
//!   in bytes. Copies from about 2 KiB up go through glibc's `rep movsb`, which on some AMD CPUs
//!   runs many times slower when the destination sits a few bytes past the source modulo 4 KiB;
//!   so at 64 KiB the source is placed at a fixed distance from the frame's buffer, clear of
//!   that window in `text/65536` and inside it in `text_4k_aliased/65536`.
//!
//! The allocator is the binary's (mimalloc), so allocation costs match production.
//! `benches/README.md` has the commands and one run's figures.

use std::collections::{HashMap, VecDeque};
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::measurement::WallTime;
use criterion::{
    criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion, Throughput,
};
use roomcast::frame;
use roomcast::metrics::Metrics;
use roomcast::outbox::{ConnId, Limits, Outbox, SlowConsumer};
use roomcast::protocol::{self, ClientError, Command, Id};
use roomcast::room::{Registry, Room};
use serde_json::Value;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The server's default outbox bound (`--outbox-frames`, `--outbox-bytes`, `--slow-consumer`),
/// with direct writes on or off.
fn limits_with(direct: bool) -> Limits {
    Limits {
        max_frames: 4096,
        max_bytes: 1 << 20,
        policy: SlowConsumer::Close,
        direct,
        metrics: Arc::default(),
    }
}

const ROOM: &str = "room-17";
/// A typical chat line: 64 bytes of JSON-safe ASCII (no escapes, so serde_json can borrow too).
const MESSAGE: &str = "The quick brown fox jumps over the lazy dog, then naps: 0123456.";

/// One bound shared by every outbox, as on a node.
fn limits() -> Arc<Limits> {
    static SHARED: std::sync::LazyLock<Arc<Limits>> =
        std::sync::LazyLock::new(|| Arc::new(limits_with(true)));
    Arc::clone(&SHARED)
}

fn member(id: u64) -> Arc<Outbox> {
    Arc::new(Outbox::new(ConnId(id), limits()))
}

/// A room of `registry` and the members whose outboxes a benchmark drains.
struct Audience {
    room: Arc<Room>,
    members: Vec<Arc<Outbox>>,
}

impl Audience {
    /// Joins `n` (at least one) fresh members, ids from `first_id`, to room `name`.
    fn new(registry: &Registry, name: &str, first_id: u64, n: usize) -> Self {
        let members: Vec<Arc<Outbox>> = (first_id..first_id + n as u64).map(member).collect();
        let mut room = None;
        for m in &members {
            room = Some(registry.join(name, m).expect("under the room cap"));
        }
        Self {
            room: room.expect("at least one member"),
            members,
        }
    }

    /// Times `iters` broadcasts of `frame`, draining every member untimed after each one.
    fn timed_broadcasts(&self, iters: u64, frame: &Bytes, metrics: &Metrics) -> Duration {
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            let start = Instant::now();
            let queued = self.room.broadcast(black_box(frame), None, metrics);
            total += start.elapsed();
            assert!(
                queued >= self.members.len(),
                "only {queued} of {} members accepted the frame",
                self.members.len()
            );
            drain(&self.members);
        }
        total
    }
}

/// Empties every outbox the way the session writer does: claim the socket, take everything,
/// release each frame, give the socket back.
fn drain(members: &[Arc<Outbox>]) {
    let mut taken = VecDeque::new();
    for m in members {
        empty(m, &mut taken);
    }
}

fn empty(m: &Outbox, taken: &mut VecDeque<Bytes>) {
    m.claim();
    m.take_all(taken);
    for frame in taken.drain(..) {
        m.release(&frame);
    }
    m.release_socket();
}

/// Joins and leaves each of `extras` to room `name` until `stop`, counting join+leave pairs.
fn churn(
    registry: &Registry,
    name: &str,
    extras: &[Arc<Outbox>],
    stop: &AtomicBool,
    pairs: &AtomicU64,
) {
    while !stop.load(Ordering::Relaxed) {
        for m in extras {
            let room = registry.join(name, m).expect("under the room cap");
            registry.leave(&room, m.id());
            // A broadcast that loaded the snapshot while `m` was in it queued a frame here.
            empty(m, &mut VecDeque::new());
        }
        pairs.fetch_add(extras.len() as u64, Ordering::Relaxed);
    }
}

/// Benchmarks broadcasts to `audience` while another thread churns room `churned` of
/// `registry`; the thread starts with the first sample, so a filtered-out run spawns nothing.
fn broadcast_while_churning(
    group: &mut BenchmarkGroup<'_, WallTime>,
    id: &str,
    registry: &Registry,
    churned: &str,
    audience: &Audience,
    frame: &Bytes,
) {
    let metrics = Metrics::default();
    let extras: Vec<Arc<Outbox>> = (1_000_000..1_000_004).map(member).collect();
    let stop = AtomicBool::new(false);
    let pairs = AtomicU64::new(0);
    thread::scope(|s| {
        let mut churner = None;
        let mut started = None;
        group.bench_function(id, |b| {
            if churner.is_none() {
                churner = Some(s.spawn(|| churn(registry, churned, &extras, &stop, &pairs)));
                started = Some(Instant::now());
            }
            b.iter_custom(|iters| audience.timed_broadcasts(iters, frame, &metrics))
        });
        stop.store(true, Ordering::Relaxed);
        if let (Some(churner), Some(started)) = (churner, started) {
            churner.join().expect("churn thread panicked");
            let pairs = pairs.load(Ordering::Relaxed) as f64;
            // Often zero under `--test`, where one iteration can beat the thread to the room.
            if pairs > 0.0 {
                let rate = pairs / started.elapsed().as_secs_f64();
                eprintln!("registry/{id}: the churn thread ran {rate:.0} join+leave pairs/s");
            }
        }
    });
}

fn registry(c: &mut Criterion) {
    let mut group = c.benchmark_group("registry");
    let metrics = Metrics::default();
    let frame = frame::text(MESSAGE);

    group.throughput(Throughput::Elements(1));
    for n in [0usize, 200, 10_000, 100_000] {
        let registry = Registry::new(None);
        let mut present = None;
        let newcomer = member(u64::MAX);
        group.bench_function(
            BenchmarkId::new("join_then_leave", format!("room_of_{n}")),
            |b| {
                present
                    .get_or_insert_with(|| (n > 0).then(|| Audience::new(&registry, "busy", 0, n)));
                b.iter(|| {
                    let room = registry
                        .join(black_box("busy"), &newcomer)
                        .expect("under the cap");
                    registry.leave(&room, newcomer.id());
                })
            },
        );
        if n == 0 {
            continue;
        }
        // The newcomer above joins and leaves at the end of the list; a member leaving from
        // the middle also moves the last one into its place. Members leave in a scattered
        // order (a stride coprime with n) and rejoin at the end.
        let mut k = 0;
        group.bench_function(
            BenchmarkId::new("leave_then_rejoin_scattered", format!("room_of_{n}")),
            |b| {
                let audience = present
                    .get_or_insert_with(|| Some(Audience::new(&registry, "busy", 0, n)))
                    .as_ref()
                    .expect("n > 0");
                b.iter(|| {
                    k = (k + 7_919) % n;
                    let who = &audience.members[k];
                    registry.leave(&audience.room, who.id());
                    registry
                        .join(black_box("busy"), who)
                        .expect("under the cap");
                })
            },
        );
    }
    scattered_over_many_rooms(&mut group, 500, 200);
    drop_of_a_whole_room(&mut group, 20_000);

    // A room whose last member left: still a valid handle, with an empty snapshot.
    let registry = Registry::new(None);
    let gone = Audience::new(&registry, "empty", 0, 1);
    registry.leave(&gone.room, gone.members[0].id());
    let empty = &gone.room;
    group.bench_function("snapshot/len", |b| b.iter(|| black_box(empty).len()));
    group.bench_function("snapshot/broadcast_empty", |b| {
        b.iter(|| black_box(empty).broadcast(black_box(&frame), None, &metrics))
    });

    let registry = Registry::new(None);
    let hot = Audience::new(&registry, "hot", 0, 200);
    let _cold = Audience::new(&registry, "cold", 1_000, 200);
    group.throughput(Throughput::Elements(hot.members.len() as u64));
    group.bench_function("broadcast_200/quiet", |b| {
        b.iter_custom(|iters| hot.timed_broadcasts(iters, &frame, &metrics))
    });
    broadcast_while_churning(
        &mut group,
        "broadcast_200/churning",
        &registry,
        "hot",
        &hot,
        &frame,
    );
    broadcast_while_churning(
        &mut group,
        "broadcast_200/churning_other_room",
        &registry,
        "cold",
        &hot,
        &frame,
    );
    group.finish();
}

/// `leave_then_rejoin_scattered` with the same 100,000 members as `room_of_100000`, in `rooms`
/// rooms of `size`: what a room's size costs once the working set is the same. (`room_of_200`
/// alone fits in the L1 cache; a server holding 100,000 connections does not.)
fn scattered_over_many_rooms(group: &mut BenchmarkGroup<'_, WallTime>, rooms: usize, size: usize) {
    let registry = Registry::new(None);
    let names: Vec<String> = (0..rooms).map(|r| format!("room-{r}")).collect();
    let audiences: Vec<Audience> = names
        .iter()
        .enumerate()
        .map(|(r, name)| Audience::new(&registry, name, (r * size) as u64, size))
        .collect();
    let n = rooms * size;
    let mut k = 0;
    let id = format!("{rooms}_rooms_of_{size}");
    group.bench_function(BenchmarkId::new("leave_then_rejoin_scattered", id), |b| {
        b.iter(|| {
            k = (k + 7_919) % n;
            let (audience, who) = (&audiences[k / size], k % size);
            let who = &audience.members[who];
            registry.leave(&audience.room, who.id());
            registry
                .join(black_box(&names[k / size]), who)
                .expect("under the cap");
        })
    });
}

/// Every member of a room of `n` leaving at once (an abrupt drop of a whole audience), in a
/// scattered order, per leave; the room is refilled untimed between iterations.
fn drop_of_a_whole_room(group: &mut BenchmarkGroup<'_, WallTime>, n: usize) {
    let registry = Registry::new(None);
    let members: Vec<Arc<Outbox>> = (0..n as u64).map(member).collect();
    group.throughput(Throughput::Elements(n as u64));
    group.bench_function(
        BenchmarkId::new("everyone_leaves", format!("room_of_{n}")),
        |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let mut room = None;
                    for m in &members {
                        room = Some(registry.join("dropped", m).expect("under the cap"));
                    }
                    let room = room.expect("n > 0");
                    let start = Instant::now();
                    for i in 0..n {
                        registry.leave(&room, members[(i * 7_919) % n].id());
                    }
                    total += start.elapsed();
                    assert!(room.is_empty());
                }
                total
            })
        },
    );
    group.throughput(Throughput::Elements(1));
}

fn fanout(c: &mut Criterion) {
    let mut group = c.benchmark_group("fanout");
    let metrics = Metrics::default();
    let frame = frame::text(MESSAGE);
    for n in [200usize, 10_000, 100_000] {
        let registry = Registry::new(None);
        let mut audience = None;
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(BenchmarkId::new("broadcast_64B", n), |b| {
            let audience = audience.get_or_insert_with(|| Audience::new(&registry, ROOM, 0, n));
            b.iter_custom(|iters| audience.timed_broadcasts(iters, &frame, &metrics))
        });
    }
    group.finish();
}

/// Members with real loopback sockets: the server end attached to each outbox, the client
/// end read empty (untimed) after every broadcast.
struct Sockets {
    room: Arc<Room>,
    members: Vec<Arc<Outbox>>,
    clients: Vec<std::net::TcpStream>,
    direct: bool,
    /// Keeps the sockets registered; never driven after setup.
    _runtime: tokio::runtime::Runtime,
}

impl Sockets {
    fn new(n: usize, direct: bool) -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .expect("runtime");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let registry = Registry::new(None);
        let (mut members, mut clients, mut room) = (Vec::new(), Vec::new(), None);
        let limits = Arc::new(limits_with(direct));
        for id in 0..n as u64 {
            let client = std::net::TcpStream::connect(addr).expect("connect");
            client.set_nonblocking(true).expect("nonblocking");
            let (server, _) = listener.accept().expect("accept");
            server.set_nonblocking(true).expect("nonblocking");
            server.set_nodelay(true).expect("nodelay");
            let _entered = runtime.enter();
            let server = tokio::net::TcpStream::from_std(server).expect("register");
            // tokio's `try_write` needs the reactor to have seen the socket writable once.
            runtime.block_on(server.writable()).expect("writable");
            let outbox = Arc::new(Outbox::new(ConnId(id), Arc::clone(&limits)));
            assert!(outbox.attach(server.into()).is_ok());
            room = Some(registry.join(ROOM, &outbox).expect("under the room cap"));
            members.push(outbox);
            clients.push(client);
        }
        Self {
            room: room.expect("at least one member"),
            members,
            clients,
            direct,
            _runtime: runtime,
        }
    }

    /// Times `iters` broadcasts. Queued, each is followed by the writing it leaves to the
    /// sessions, done here on this thread the way the session writer does it, minus the task
    /// wake-up and the scheduler (which the end-to-end runs in RESULTS.md include).
    fn timed(&self, iters: u64, frame: &Bytes, metrics: &Metrics) -> Duration {
        let mut total = Duration::ZERO;
        let mut taken = VecDeque::new();
        let mut buf = vec![0u8; 64 * 1024];
        for _ in 0..iters {
            let start = Instant::now();
            let served = self.room.broadcast(black_box(frame), None, metrics);
            if !self.direct {
                for m in &self.members {
                    write_queued(m, &mut taken);
                }
            }
            total += start.elapsed();
            assert_eq!(served, self.members.len());
            for c in &self.clients {
                while std::io::Read::read(&mut &*c, &mut buf).is_ok_and(|n| n > 0) {}
            }
        }
        total
    }
}

/// The session writer's part for one member: claim, take, write, release.
fn write_queued(m: &Outbox, taken: &mut VecDeque<Bytes>) {
    if m.claim() != roomcast::outbox::Claim::Owned {
        return;
    }
    m.take_all(taken);
    let stream = m.stream().expect("attached");
    for frame in taken.drain(..) {
        m.release(&frame);
        let written = stream.try_write(&frame).expect("the client keeps up");
        assert_eq!(written, frame.len());
    }
    assert!(m.release_socket());
}

fn sockets(c: &mut Criterion) {
    let mut group = c.benchmark_group("sockets");
    let metrics = Metrics::default();
    let frame = frame::text(MESSAGE);
    let n = 200;
    group.throughput(Throughput::Elements(n as u64));
    for (id, direct) in [("direct", true), ("queued", false)] {
        let mut audience = None;
        group.bench_function(BenchmarkId::new(format!("broadcast_64B_{id}"), n), |b| {
            let audience = audience.get_or_insert_with(|| Sockets::new(n, direct));
            b.iter_custom(|iters| audience.timed(iters, &frame, &metrics))
        });
    }
    group.finish();
}

/// What `protocol::decode` does, on a `serde_json::Value` tree: same checks, same `Command`.
fn serde_command(v: &Value) -> Result<Command<'_>, ClientError> {
    fn optional<'v>(
        obj: Option<&'v Value>,
        key: &str,
        name: &'static str,
    ) -> Result<Option<&'v str>, ClientError> {
        match obj.and_then(|o| o.get(key)) {
            None => Ok(None),
            Some(v) => match v.as_str() {
                Some(s) if !s.is_empty() => Ok(Some(s)),
                _ => Err(ClientError::BadField(name)),
            },
        }
    }
    fn required<'v>(
        obj: Option<&'v Value>,
        key: &str,
        name: &'static str,
    ) -> Result<&'v str, ClientError> {
        optional(obj, key, name)?.ok_or(ClientError::BadField(name))
    }
    fn message<'v>(
        obj: Option<&'v Value>,
        key: &str,
        name: &'static str,
    ) -> Result<&'v str, ClientError> {
        obj.and_then(|o| o.get(key))
            .and_then(Value::as_str)
            .ok_or(ClientError::BadField(name))
    }

    if !v.is_object() {
        return Err(ClientError::BadJson);
    }
    let kind = v
        .get("type")
        .and_then(Value::as_str)
        .ok_or(ClientError::BadField("type"))?;
    Ok(match kind {
        "join" => Command::Join {
            room: required(v.get("payload"), "roomId", "payload.roomId")?,
            since: None,
        },
        "chat" => {
            let payload = v.get("payload");
            Command::Chat {
                message: message(payload, "message", "payload.message")?,
                room: optional(payload, "roomId", "payload.roomId")?,
                id: Id::Absent,
            }
        }
        "leave" => Command::Leave {
            room: required(v.get("payload"), "roomId", "payload.roomId")?,
        },
        "SUBSCRIBE" => Command::Subscribe {
            room: required(Some(v), "room", "room")?,
            since: None,
        },
        "UNSUBSCRIBE" => Command::Unsubscribe {
            room: required(Some(v), "room", "room")?,
        },
        "sendMessage" => Command::SendMessage {
            room: required(Some(v), "roomId", "roomId")?,
            message: message(Some(v), "message", "message")?,
            id: Id::Absent,
        },
        other => return Err(ClientError::UnknownType(other.to_owned())),
    })
}

/// serde_json without a tree: a flat object of strings into a map of borrowed `&str`s (only
/// possible for `sendMessage`, and only while no string holds an escape).
fn serde_flat_send_message(buf: &[u8]) -> Result<Command<'_>, ClientError> {
    let map: HashMap<&str, &str> = serde_json::from_slice(buf).map_err(|_| ClientError::BadJson)?;
    match map.get("type").copied() {
        Some("sendMessage") => Ok(Command::SendMessage {
            room: map
                .get("roomId")
                .copied()
                .filter(|r| !r.is_empty())
                .ok_or(ClientError::BadField("roomId"))?,
            message: map
                .get("message")
                .copied()
                .ok_or(ClientError::BadField("message"))?,
            id: Id::Absent,
        }),
        _ => Err(ClientError::BadField("type")),
    }
}

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Elements(1));
    let send_message =
        format!(r#"{{"type":"sendMessage","roomId":"{ROOM}","message":"{MESSAGE}"}}"#);
    let chat = format!(r#"{{"type":"chat","payload":{{"message":"{MESSAGE}"}}}}"#);
    let cases = [
        (
            "sendMessage_64B",
            send_message.into_bytes(),
            Command::SendMessage {
                room: ROOM,
                message: MESSAGE,
                id: Id::Absent,
            },
        ),
        (
            "chat_64B",
            chat.into_bytes(),
            Command::Chat {
                message: MESSAGE,
                room: None,
                id: Id::Absent,
            },
        ),
    ];
    for (name, input, expected) in &cases {
        let mut buf = input.clone();
        assert_eq!(protocol::decode(&mut buf), Ok(*expected));
        let tree: Value = serde_json::from_slice(input).expect("valid JSON");
        assert_eq!(serde_command(&tree), Ok(*expected));

        group.bench_function(BenchmarkId::new("simd_json_tape", name), |b| {
            b.iter(|| {
                buf.copy_from_slice(black_box(input));
                let _ = black_box(protocol::decode(&mut buf));
            })
        });
        group.bench_function(BenchmarkId::new("serde_json_value", name), |b| {
            b.iter(|| {
                buf.copy_from_slice(black_box(input));
                // Not JSON becomes `Null`, which `serde_command` turns into `BadJson`.
                let tree: Value = serde_json::from_slice(&buf).unwrap_or(Value::Null);
                let _ = black_box(serde_command(&tree));
            })
        });
        if *name == "sendMessage_64B" {
            assert_eq!(serde_flat_send_message(input), Ok(*expected));
            group.bench_function(BenchmarkId::new("serde_json_borrowed_map", name), |b| {
                b.iter(|| {
                    buf.copy_from_slice(black_box(input));
                    let _ = black_box(serde_flat_send_message(&buf));
                })
            });
        }
    }
    group.finish();
}

const PAGE: usize = 4096;

/// Where the payload of `built`, a frame carrying `len` bytes, starts.
fn payload_addr(built: &Bytes, len: usize) -> usize {
    built.as_ptr() as usize + (built.len() - len)
}

/// Benchmarks `frame::text` on `len` bytes. With `distance`, the source is placed so that the
/// frame's payload lands that many bytes (mod 4 KiB) past it: each sample learns where from a
/// probe frame, relying on the allocator to hand out blocks of that size at the same offset
/// modulo 4 KiB; every iteration checks that it did, and misses are reported.
fn bench_text(
    group: &mut BenchmarkGroup<'_, WallTime>,
    id: &str,
    len: usize,
    distance: Option<usize>,
) {
    let backing = vec![b'x'; len + PAGE];
    let whole = std::str::from_utf8(&backing).expect("ASCII");
    let mut misses = 0u64;
    group.throughput(Throughput::Bytes(len as u64));
    group.bench_function(BenchmarkId::new(id, len), |b| {
        let text = match distance {
            None => &whole[..len],
            Some(distance) => {
                let dst = payload_addr(&frame::text(&whole[..len]), len);
                let start = (dst + 2 * PAGE - distance - backing.as_ptr() as usize % PAGE) % PAGE;
                &whole[start..start + len]
            }
        };
        let src = text.as_ptr() as usize;
        b.iter(|| {
            let built = frame::text(black_box(text));
            if let Some(distance) = distance {
                let actual = payload_addr(&built, len).wrapping_sub(src) % PAGE;
                misses += u64::from(actual != distance);
            }
            built
        })
    });
    if misses > 0 {
        eprintln!("frame/{id}/{len}: {misses} frames did not land at the intended distance");
    }
}

fn frames(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame");
    // Below 2 KiB glibc copies with vector moves, where the distance does not matter.
    bench_text(&mut group, "text", 64, None);
    bench_text(&mut group, "text", 1024, None);
    bench_text(&mut group, "text", 64 * 1024, Some(256));
    bench_text(&mut group, "text_4k_aliased", 64 * 1024, Some(10));
    for len in [64usize, 16 * 1024] {
        let mut payload = vec![0x5a_u8; len];
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_function(BenchmarkId::new("apply_mask", len), |b| {
            b.iter(|| {
                frame::apply_mask(black_box(&mut payload), black_box([0x37, 0xfa, 0x21, 0x3d]))
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = engine;
    config = Criterion::default().without_plots();
    targets = registry, fanout, sockets, decode, frames
}
criterion_main!(engine);
