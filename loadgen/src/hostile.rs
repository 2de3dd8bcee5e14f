//! Hostile clients beside the measured ones: flooders (`--flooders N`) that join a room of the
//! run and send into it as fast as TCP allows, and pingers (`--pingers N`) that send pings as
//! fast as TCP allows and never read. Both reconnect whenever the server closes them. They run
//! from the start of sending to the end of the drain; the healthy clients' figures are computed
//! exactly as without them (flood messages are not loadgen messages, so receivers count them
//! as stray frames and check nothing else differently).
//!
//! They speak plain `ws://` only: `Config::validate` refuses them beside a `wss://` URL rather
//! than half-support TLS here.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::client::build_join;
use crate::config::{Config, Dialect};
use crate::ws;

/// Frames written per `write_all`: large enough that the socket, not loadgen, is the limit.
const BATCH: usize = 256;
/// Pause before reconnecting after the server closed (or refused) a hostile client.
const RECONNECT_PAUSE: Duration = Duration::from_millis(50);

/// What one kind of hostile client did over the run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HostileKind {
    pub clients: usize,
    /// Connections opened (the first ones included).
    pub connects: u64,
    /// Frames handed to the socket; those the server had not read by the end are included.
    pub written: u64,
}

/// Both kinds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HostileReport {
    pub flooders: HostileKind,
    pub pingers: HostileKind,
    /// Bytes of each flood message.
    pub flood_payload: usize,
}

#[derive(Default)]
struct Counters {
    connects: AtomicU64,
    written: AtomicU64,
}

/// The running hostile clients.
pub struct Hostile {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    flooders: (usize, Arc<Counters>),
    pingers: (usize, Arc<Counters>),
    flood_payload: usize,
}

impl Hostile {
    /// Starts `cfg.flooders` and `cfg.pingers` clients, round-robin over the servers.
    pub fn start(cfg: &Config, urls: &[Arc<ws::WsUrl>], addrs: &[SocketAddr]) -> Hostile {
        let (stop, stopped) = watch::channel(false);
        let (floods, pings) = (Arc::new(Counters::default()), Arc::new(Counters::default()));
        let mut tasks = Vec::new();
        for i in 0..cfg.flooders + cfg.pingers {
            let target = Target {
                url: Arc::clone(&urls[i % urls.len()]),
                addr: addrs[i % addrs.len()],
                stop: stopped.clone(),
            };
            if i < cfg.flooders {
                let frames = flood_batch(cfg, i);
                let room = (i % cfg.rooms.max(1)) as u32;
                let counters = Arc::clone(&floods);
                tasks.push(tokio::spawn(flood(
                    target,
                    (cfg.dialect, cfg.room_prefix.clone()),
                    room,
                    frames,
                    counters,
                )));
            } else {
                let frames = ping_batch();
                tasks.push(tokio::spawn(ping(target, frames, Arc::clone(&pings))));
            }
        }
        Hostile {
            stop,
            tasks,
            flooders: (cfg.flooders, floods),
            pingers: (cfg.pingers, pings),
            flood_payload: cfg.flood_payload,
        }
    }

    /// Stops every hostile client and reports what they did.
    pub async fn stop(self) -> HostileReport {
        let _ = self.stop.send(true);
        for task in self.tasks {
            task.abort();
            let _ = task.await;
        }
        let kind = |(clients, c): (usize, Arc<Counters>)| HostileKind {
            clients,
            connects: c.connects.load(Ordering::Relaxed),
            written: c.written.load(Ordering::Relaxed),
        };
        HostileReport {
            flooders: kind(self.flooders),
            pingers: kind(self.pingers),
            flood_payload: self.flood_payload,
        }
    }
}

struct Target {
    url: Arc<ws::WsUrl>,
    addr: SocketAddr,
    stop: watch::Receiver<bool>,
}

/// `BATCH` flood messages of flooder `i`, in the run's dialect, each `flood:<i>:` padded to
/// `--flood-payload` bytes (not a loadgen message, so no receiver mistakes it for one).
fn flood_batch(cfg: &Config, i: usize) -> Vec<u8> {
    let head = format!("flood:{i}:");
    let message = format!(
        "{head}{}",
        "x".repeat(cfg.flood_payload.saturating_sub(head.len()))
    );
    let room = i % cfg.rooms.max(1);
    let json = match cfg.dialect {
        Dialect::Join => format!(r#"{{"type":"chat","payload":{{"message":"{message}"}}}}"#),
        Dialect::Subscribe => {
            let prefix = &cfg.room_prefix;
            format!(r#"{{"type":"sendMessage","roomId":"{prefix}{room}","message":"{message}"}}"#)
        }
    };
    let mut out = Vec::new();
    for _ in 0..BATCH {
        ws::encode_frame(
            &mut out,
            ws::OP_TEXT,
            json.as_bytes(),
            [0x5a, 0x17, 0x33, 0x90],
        );
    }
    out
}

fn ping_batch() -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..BATCH {
        ws::encode_frame(&mut out, ws::OP_PING, b"", [0x11, 0x22, 0x33, 0x44]);
    }
    out
}

/// TCP connect and upgrade; `None` when the server refused or is gone.
async fn connect(t: &Target, counters: &Counters) -> Option<TcpStream> {
    let mut s = TcpStream::connect(t.addr).await.ok()?;
    let _ = s.set_nodelay(true);
    s.write_all(&ws::upgrade_request(&t.url, [7; 16], None, None))
        .await
        .ok()?;
    let mut head = vec![0u8; ws::MAX_HANDSHAKE];
    let mut filled = 0;
    loop {
        let n = s.read(&mut head[filled..]).await.ok()?;
        if n == 0 {
            return None;
        }
        filled += n;
        match ws::check_handshake(&head[..filled]) {
            Ok(ws::Handshake::Done { .. }) => break,
            Ok(_) if filled < head.len() => continue,
            _ => return None,
        }
    }
    counters.connects.fetch_add(1, Ordering::Relaxed);
    Some(s)
}

/// A flooder: joins its room, then writes flood batches until stopped, reading (and
/// discarding) whatever the server sends so that it stays a reader; reconnects when closed.
async fn flood(
    t: Target,
    (dialect, prefix): (Dialect, String),
    room: u32,
    frames: Vec<u8>,
    c: Arc<Counters>,
) {
    let mut join = Vec::new();
    let mut scratch = Vec::new();
    build_join(&mut scratch, (dialect, prefix.as_str()), room, None);
    ws::encode_frame(&mut join, ws::OP_TEXT, &scratch, [1, 2, 3, 4]);
    while !*t.stop.borrow() {
        let Some(stream) = connect(&t, &c).await else {
            tokio::time::sleep(RECONNECT_PAUSE).await;
            continue;
        };
        let (mut rx, mut tx) = stream.into_split();
        let drain = tokio::spawn(async move {
            let mut buf = vec![0u8; 64 << 10];
            while matches!(rx.read(&mut buf).await, Ok(n) if n > 0) {}
        });
        if tx.write_all(&join).await.is_ok() {
            while !*t.stop.borrow() && tx.write_all(&frames).await.is_ok() {
                c.written.fetch_add(BATCH as u64, Ordering::Relaxed);
            }
        }
        drain.abort();
        tokio::time::sleep(RECONNECT_PAUSE).await;
    }
}

/// A pinger: writes ping batches until stopped and never reads; reconnects when closed.
async fn ping(t: Target, frames: Vec<u8>, c: Arc<Counters>) {
    while !*t.stop.borrow() {
        let Some(mut stream) = connect(&t, &c).await else {
            tokio::time::sleep(RECONNECT_PAUSE).await;
            continue;
        };
        while !*t.stop.borrow() && stream.write_all(&frames).await.is_ok() {
            c.written.fetch_add(BATCH as u64, Ordering::Relaxed);
        }
        tokio::time::sleep(RECONNECT_PAUSE).await;
    }
}
