//! A deliberately faulty WebSocket room server (subscribe and join dialects), shared by the
//! fault tests and the `fault_server` example.

// The tests and the example each use a different part of this module.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

#[derive(Clone, Copy, Debug)]
pub enum Fault {
    None,
    /// Every Nth delivery to a connection is dropped.
    Drop(u64),
    /// Every Nth delivery to a connection is sent twice.
    Duplicate(u64),
    /// Deliveries from one source to one recipient are swapped in pairs.
    Reorder,
    /// Every Nth sent message goes to another room's members instead.
    Misroute(u64),
    /// Every Nth send also gets an error reply.
    Errors(u64),
    /// Every Nth loadgen message (readiness probes aside) is refused like a Redis outage
    /// refuses it: a `backplane_unavailable` error to its sender, and no delivery at all.
    Refuse(u64),
}

/// (source connection, text) queued for one recipient.
type Tx = mpsc::UnboundedSender<(u64, String)>;

struct Server {
    fault: Fault,
    rooms: Mutex<HashMap<String, Vec<(u64, Tx)>>>,
    sends: AtomicU64,
    /// Loadgen messages seen (probes aside), for `Fault::Refuse`.
    messages: AtomicU64,
}

impl Server {
    fn join(&self, room: &str, id: u64, tx: &Tx) {
        let mut rooms = self.rooms.lock().unwrap();
        let members = rooms.entry(room.to_string()).or_default();
        if !members.iter().any(|(c, _)| *c == id) {
            members.push((id, tx.clone()));
        }
    }

    fn broadcast(&self, room: &str, msg: &str, from: u64, skip_sender: bool) {
        let n = self.sends.fetch_add(1, Ordering::Relaxed) + 1;
        let rooms = self.rooms.lock().unwrap();
        let target = match self.fault {
            Fault::Misroute(k) if n % k == 0 => rooms
                .keys()
                .find(|r| r.as_str() != room)
                .map_or(room, |r| r.as_str()),
            _ => room,
        };
        for (id, tx) in rooms.get(target).into_iter().flatten() {
            if !(skip_sender && *id == from) {
                let _ = tx.send((from, msg.to_string()));
            }
        }
    }

    /// Whether to refuse message `m` (and deliver it nowhere).
    fn refuses(&self, m: &str) -> bool {
        let Fault::Refuse(k) = self.fault else {
            return false;
        };
        if m.contains("|P|") {
            return false;
        }
        (self.messages.fetch_add(1, Ordering::Relaxed) + 1) % k == 0
    }

    fn leave_all(&self, id: u64) {
        for members in self.rooms.lock().unwrap().values_mut() {
            members.retain(|(c, _)| *c != id);
        }
    }
}

/// Starts the server on 127.0.0.1:0 and returns its ws:// URL.
pub async fn start_server(fault: Fault) -> String {
    start_server_on("127.0.0.1:0", fault).await
}

pub async fn start_server_on(bind: &str, fault: Fault) -> String {
    let listener = TcpListener::bind(bind).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let srv = Arc::new(Server {
        fault,
        rooms: Mutex::new(HashMap::new()),
        sends: AtomicU64::new(0),
        messages: AtomicU64::new(0),
    });
    tokio::spawn(async move {
        let mut next_id = 0u64;
        while let Ok((stream, _)) = listener.accept().await {
            next_id += 1;
            tokio::spawn(session(stream, Arc::clone(&srv), next_id));
        }
    });
    format!("ws://{addr}")
}

async fn session(stream: TcpStream, srv: Arc<Server>, id: u64) {
    // Without this, Nagle plus delayed ACKs add tens of ms to the latency loadgen reports.
    let _ = stream.set_nodelay(true);
    let Ok(ws) = tokio_tungstenite::accept_async(stream).await else {
        return;
    };
    let (mut sink, mut incoming) = ws.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<(u64, String)>();
    let fault = srv.fault;
    // Per-recipient faults are applied on the way out.
    tokio::spawn(async move {
        let mut n = 0u64;
        let mut held: HashMap<u64, String> = HashMap::new();
        while let Some((src, m)) = rx.recv().await {
            n += 1;
            let out = match fault {
                Fault::Drop(k) if n % k == 0 => vec![],
                Fault::Duplicate(k) if n % k == 0 => vec![m.clone(), m],
                Fault::Reorder => match held.remove(&src) {
                    None => {
                        held.insert(src, m);
                        vec![]
                    }
                    Some(first) => vec![m, first],
                },
                _ => vec![m],
            };
            for m in out {
                if sink.send(Message::text(m)).await.is_err() {
                    return;
                }
            }
        }
    });
    let mut chat_room: Option<String> = None;
    while let Some(Ok(msg)) = incoming.next().await {
        let Message::Text(text) = msg else { continue };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(text.as_str()) else {
            continue;
        };
        let kind = v["type"].as_str();
        match kind {
            Some("SUBSCRIBE") => {
                if let Some(room) = v["room"].as_str() {
                    srv.join(room, id, &tx);
                }
            }
            Some("join") => {
                if let Some(room) = v["payload"]["roomId"].as_str() {
                    srv.join(room, id, &tx);
                    chat_room.get_or_insert_with(|| room.to_string());
                }
            }
            Some("sendMessage") => {
                if let (Some(room), Some(m)) = (v["roomId"].as_str(), v["message"].as_str()) {
                    if srv.refuses(m) {
                        refuse(&tx, room);
                    } else {
                        srv.broadcast(room, m, id, false);
                    }
                }
            }
            Some("chat") => {
                if let (Some(room), Some(m)) = (&chat_room, v["payload"]["message"].as_str()) {
                    if srv.refuses(m) {
                        refuse(&tx, room);
                    } else {
                        srv.broadcast(room, m, id, true);
                    }
                }
            }
            _ => {}
        }
        if let (Fault::Errors(k), Some("sendMessage" | "chat")) = (fault, kind) {
            if srv.sends.load(Ordering::Relaxed) % k == 0 {
                let err = r#"{"type":"error","code":"limit","message":"test says no"}"#;
                let _ = tx.send((0, err.to_string()));
            }
        }
    }
    srv.leave_all(id);
}

/// The error a Redis outage answers a send with.
fn refuse(tx: &Tx, room: &str) {
    let err = serde_json::json!({
        "type": "error",
        "code": "backplane_unavailable",
        "message": format!("the backplane is unavailable; the message to room \"{room}\" was not sent"),
    });
    let _ = tx.send((0, err.to_string()));
}
