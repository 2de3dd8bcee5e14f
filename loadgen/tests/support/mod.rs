//! A deliberately faulty WebSocket room server (subscribe and join dialects), shared by the
//! fault tests, the wss:// tests and the `fault_server` example. It serves `ws://`, or
//! `wss://` with a certificate from a test CA of its own ([`TestCa`]).

// The tests and the example each use a different part of this module.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
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

/// A certificate authority of the test's own, and a server certificate it signed for
/// 127.0.0.1 and localhost (rcgen, on ring).
pub struct TestCa {
    /// The CA certificate as PEM: what `--tls-ca` reads.
    pub ca_pem: String,
    /// A TLS server with the signed certificate (ALPN http/1.1, like roomcast).
    pub acceptor: TlsAcceptor,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
        let key = KeyPair::generate().expect("server key");
        let params = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".into()])
            .expect("server params");
        let cert = params
            .signed_by(&key, &ca, &ca_key)
            .expect("server certificate");
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key)
            .expect("server config");
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        TestCa {
            ca_pem: ca.pem(),
            acceptor: TlsAcceptor::from(Arc::new(config)),
        }
    }

    /// Writes the CA certificate to a file of the test's own and returns its path.
    pub fn write_ca(&self, tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "loadgen-tls-{tag}-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
        ));
        std::fs::create_dir_all(&dir).expect("temp folder");
        let path = dir.join("ca.pem");
        std::fs::write(&path, &self.ca_pem).expect("CA file");
        path
    }
}

/// Starts the server on 127.0.0.1:0 and returns its ws:// URL.
pub async fn start_server(fault: Fault) -> String {
    start_server_on("127.0.0.1:0", fault).await
}

/// Starts the server on 127.0.0.1:0 speaking TLS only, with `ca`'s server certificate, and
/// returns its wss:// URL.
pub async fn start_tls_server(fault: Fault, ca: &TestCa) -> String {
    serve("127.0.0.1:0", fault, Some(ca.acceptor.clone())).await
}

pub async fn start_server_on(bind: &str, fault: Fault) -> String {
    serve(bind, fault, None).await
}

/// Serves `ws://` on `bind`, or `wss://` (TLS only) with `tls`; returns the URL.
pub async fn serve(bind: &str, fault: Fault, tls: Option<TlsAcceptor>) -> String {
    let listener = TcpListener::bind(bind).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let srv = Arc::new(Server {
        fault,
        rooms: Mutex::new(HashMap::new()),
        sends: AtomicU64::new(0),
        messages: AtomicU64::new(0),
    });
    let scheme = if tls.is_some() { "wss" } else { "ws" };
    tokio::spawn(async move {
        let mut next_id = 0u64;
        while let Ok((stream, _)) = listener.accept().await {
            next_id += 1;
            tokio::spawn(accept(stream, tls.clone(), Arc::clone(&srv), next_id));
        }
    });
    format!("{scheme}://{addr}")
}

/// One connection: the TLS handshake first when the server speaks TLS.
async fn accept(stream: TcpStream, tls: Option<TlsAcceptor>, srv: Arc<Server>, id: u64) {
    // Without this, Nagle plus delayed ACKs add tens of ms to the latency loadgen reports.
    let _ = stream.set_nodelay(true);
    match tls {
        None => session(stream, srv, id).await,
        Some(acceptor) => {
            if let Ok(stream) = acceptor.accept(stream).await {
                session(stream, srv, id).await;
            }
        }
    }
}

async fn session<S>(stream: S, srv: Arc<Server>, id: u64)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
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
