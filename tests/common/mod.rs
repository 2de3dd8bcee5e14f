//! Shared test helpers: a real roomcast node on 127.0.0.1:0 and tokio-tungstenite clients.
#![allow(dead_code)]

pub mod redis;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use roomcast::{Config, Server};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Generous bound for anything that should happen "at once"; only a hang ever reaches it.
/// 30 s, not 10: the fleet flood test's sync echo once took over 10 s on the two-core machine
/// while a build ran beside the tests, and a bound that only catches hangs costs nothing when
/// tests pass.
pub const PATIENCE: Duration = Duration::from_secs(30);

pub struct Node {
    pub addr: SocketAddr,
    /// `--admin-listen`'s address, when the config set one.
    pub admin: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    pub task: JoinHandle<()>,
}

impl Node {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        let mut config = Config::with_listen("127.0.0.1:0".parse().unwrap());
        tweak(&mut config);
        let server = Server::bind(config).await.expect("bind");
        let addr = server.local_addr();
        let admin = server.admin_addr();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = rx.await;
        }));
        Self {
            addr,
            admin,
            stop: Some(tx),
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("ws://{}/", self.addr)
    }

    pub async fn client(&self) -> Ws {
        let (ws, _) = tokio_tungstenite::connect_async(self.url())
            .await
            .expect("websocket connect");
        ws
    }

    /// A client in envelope mode: it offers `protocols` (comma-separated) and returns the
    /// subprotocol the server selected, if any.
    pub async fn client_offering(&self, protocols: &str) -> (Ws, Option<String>) {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut request = self.url().into_client_request().expect("request");
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            protocols.parse().expect("header value"),
        );
        let (ws, response) = tokio_tungstenite::connect_async(request)
            .await
            .expect("websocket connect");
        let selected = response
            .headers()
            .get("Sec-WebSocket-Protocol")
            .map(|v| v.to_str().expect("ascii").to_owned());
        (ws, selected)
    }

    /// A client that asked for envelope mode and got it.
    pub async fn envelope_client(&self) -> Ws {
        let (ws, selected) = self.client_offering("roomcast.v2").await;
        assert_eq!(selected.as_deref(), Some("roomcast.v2"));
        ws
    }

    /// Signals shutdown (as SIGTERM would); the node task then drains and returns.
    pub fn shutdown(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        http_get(self.addr, path).await
    }

    pub async fn health(&self) -> serde_json::Value {
        let (status, body) = self.get("/healthz").await;
        assert!(status == 200 || status == 503, "healthz status {status}");
        serde_json::from_str(&body).expect("healthz body is JSON")
    }

    /// Polls `/healthz` until `done` holds for it.
    pub async fn wait_health(&self, what: &str, done: impl Fn(&serde_json::Value) -> bool) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let health = self.health().await;
            if done(&health) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}; last /healthz: {health}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Turns the per-connection inbound limits off, for tests whose clients must send faster than
/// a real client may by default.
pub fn lift_inbound_limits(config: &mut Config) {
    config.inbound.frames_per_sec = 0;
    config.inbound.bytes_per_sec = 0;
    config.inbound.fanout_per_sec = 0;
}

pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut raw))
        .await
        .expect("http response in time")
        .expect("read");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

pub async fn send(ws: &mut Ws, json: &str) {
    ws.send(Message::text(json)).await.expect("send");
}

/// The next text frame, skipping pings; panics on close or silence.
pub async fn recv(ws: &mut Ws) -> String {
    loop {
        let msg = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("a frame in time")
            .expect("stream open")
            .expect("frame ok");
        match msg {
            Message::Text(t) => return t.to_string(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// Asserts nothing arrives within a short while (used after a barrier message proves order).
pub async fn silent(ws: &mut Ws, wait: Duration) {
    match tokio::time::timeout(wait, ws.next()).await {
        Err(_) => {}
        Ok(Some(Ok(Message::Ping(_)))) => {}
        Ok(other) => panic!("expected silence, got {other:?}"),
    }
}

/// Reads until the close frame and returns its code.
pub async fn close_code(ws: &mut Ws) -> u16 {
    loop {
        let msg = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("close in time");
        match msg {
            Some(Ok(Message::Close(Some(frame)))) => return u16::from(frame.code),
            Some(Ok(Message::Close(None))) => return 1005,
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

pub fn error_code(reply: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(reply).expect("error reply is JSON");
    assert_eq!(v["type"], "error", "not an error reply: {reply}");
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
    v["code"].as_str().expect("code").to_owned()
}

pub fn join(room: &str) -> String {
    format!(r#"{{"type":"join","payload":{{"roomId":"{room}"}}}}"#)
}
pub fn leave(room: &str) -> String {
    format!(r#"{{"type":"leave","payload":{{"roomId":"{room}"}}}}"#)
}
pub fn chat(message: &str) -> String {
    format!(r#"{{"type":"chat","payload":{{"message":"{message}"}}}}"#)
}
pub fn subscribe(room: &str) -> String {
    format!(r#"{{"type":"SUBSCRIBE","room":"{room}"}}"#)
}
pub fn unsubscribe(room: &str) -> String {
    format!(r#"{{"type":"UNSUBSCRIBE","room":"{room}"}}"#)
}
pub fn send_message(room: &str, message: &str) -> String {
    format!(r#"{{"type":"sendMessage","roomId":"{room}","message":"{message}"}}"#)
}

/// The next frame as JSON.
pub async fn recv_json(ws: &mut Ws) -> serde_json::Value {
    let text = recv(ws).await;
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Makes sure every command `ws` sent before has been processed: a sendMessage to a private
/// room the client holds comes back only after them.
pub async fn sync(ws: &mut Ws, tag: &str) {
    let room = format!("sync-{tag}");
    send(ws, &subscribe(&room)).await;
    send(ws, &send_message(&room, "sync")).await;
    assert_eq!(recv(ws).await, "sync");
    send(ws, &unsubscribe(&room)).await;
}

/// After a hostile client: a fresh pair of clients must still get a subscribe + sendMessage
/// round trip through the node.
pub async fn serves_a_fresh_pair(node: &Node) {
    let (mut a, mut b) = (node.client().await, node.client().await);
    send(&mut a, &subscribe("fresh-pair")).await;
    sync(&mut a, "fresh-pair").await;
    send(&mut b, &send_message("fresh-pair", "still here")).await;
    assert_eq!(recv(&mut a).await, "still here");
}

/// A WebSocket session opened by hand on `path`, for sending bytes no client library would.
/// Panics unless the server answers 101.
pub async fn raw_upgrade(addr: SocketAddr, path: &str) -> TcpStream {
    let (status, head, stream) = upgrade_at(addr, path, "").await;
    assert_eq!(status, 101, "{head}");
    stream
}

/// One masked client frame: `first` is the FIN/RSV/opcode byte (0x81 a final text frame,
/// 0x88 a close), `payload` its unmasked payload.
pub fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    roomcast::frame::encode_client(first, payload, [0x37, 0xfa, 0x21, 0x3d])
}

/// A masked close frame with `code` and `reason`.
pub fn client_close(code: u16, reason: &str) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(reason.as_bytes());
    client_frame(0x88, &payload)
}

/// How a raw connection ended when the peer closed it.
#[derive(Debug)]
pub struct Ended {
    /// Everything read before the end.
    pub bytes: Vec<u8>,
    /// `None` for an orderly EOF, else the error the read ended with (a reset, usually).
    pub error: Option<std::io::ErrorKind>,
}

/// Reads until the server closes the connection (EOF or a reset); panics if it is still open
/// after `within`.
pub async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> Ended {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => panic!(
                "connection still open after {within:?}; read so far: {:?}",
                String::from_utf8_lossy(&bytes)
            ),
            Ok(Ok(0)) => return Ended { bytes, error: None },
            Ok(Ok(n)) => bytes.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => {
                return Ended {
                    bytes,
                    error: Some(e.kind()),
                }
            }
        }
    }
}

/// Splits what a server wrote into frames: `(first byte, payload)` each, the first byte holding
/// FIN and the opcode (0x81 text, 0x88 close, 0x8A pong). A trailing partial frame is left out.
/// Written apart from the server's codec on purpose: it checks it.
pub fn server_frames(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut frames = Vec::new();
    while bytes.len() >= 2 {
        let (len, at) = match bytes[1] & 0x7F {
            126 if bytes.len() >= 4 => (u16::from_be_bytes([bytes[2], bytes[3]]) as usize, 4),
            127 if bytes.len() >= 10 => {
                let mut raw = [0u8; 8];
                raw.copy_from_slice(&bytes[2..10]);
                (u64::from_be_bytes(raw) as usize, 10)
            }
            126 | 127 => break,
            n => (n as usize, 2),
        };
        if bytes.len() < at + len {
            break;
        }
        frames.push((bytes[0], bytes[at..at + len].to_vec()));
        bytes = &bytes[at + len..];
    }
    frames
}

/// Reads server frames from a raw connection until `done` holds for what has arrived (checked
/// after every read); returns them. Panics on EOF or silence.
pub async fn read_frames_until(
    stream: &mut (impl AsyncRead + Unpin),
    done: impl Fn(&[(u8, Vec<u8>)]) -> bool,
) -> Vec<(u8, Vec<u8>)> {
    let mut bytes = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::time::timeout(PATIENCE, stream.read(&mut buf))
            .await
            .expect("frames in time")
            .expect("read");
        assert!(n > 0, "closed after {:?}", server_frames(&bytes));
        bytes.extend_from_slice(&buf[..n]);
        let frames = server_frames(&bytes);
        if done(&frames) {
            return frames;
        }
    }
}

/// The close code and reason of the close frame among `frames`, if there is one.
pub fn close_of(frames: &[(u8, Vec<u8>)]) -> Option<(u16, String)> {
    frames
        .iter()
        .find(|(first, _)| *first == 0x88)
        .map(|(_, p)| {
            let code = u16::from_be_bytes([p[0], p[1]]);
            (code, String::from_utf8_lossy(&p[2..]).into_owned())
        })
}

/// Sends a WebSocket upgrade request with `extra` header lines (each ending in `\r\n`) and
/// returns the status and the response head; the connection is left open on 101.
pub async fn try_upgrade(addr: SocketAddr, extra: &str) -> (u16, String, TcpStream) {
    upgrade_at(addr, "/", extra).await
}

/// [`try_upgrade`] on `path`.
pub async fn upgrade_at(addr: SocketAddr, path: &str, extra: &str) -> (u16, String, TcpStream) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    );
    stream
        .write_all(req.as_bytes())
        .await
        .expect("write upgrade");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        match tokio::time::timeout(PATIENCE, stream.read(&mut byte)).await {
            Ok(Ok(1)) => head.push(byte[0]),
            Ok(_) => break,
            Err(_) => panic!("no response in time"),
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head, stream)
}
