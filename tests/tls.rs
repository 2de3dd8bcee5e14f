//! `wss://` with `--tls-cert`/`--tls-key`: the round trip, a reload on SIGHUP that new
//! connections see and old ones survive, a broken file on reload that changes nothing, and
//! `--admin-listen` taking the operators' paths off the public address.
//!
//! SIGHUP goes to the test's own process: nextest runs each test in a process of its own.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use roomcast::config::TlsFiles;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// A certificate authority of the test's own, and a server pair it signed for 127.0.0.1.
struct Issued {
    ca: CertificateDer<'static>,
    cert_pem: String,
    key_pem: String,
}

fn issue(name: &str) -> Issued {
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("{name} test CA"));
    let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
    let key = KeyPair::generate().expect("server key");
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .expect("server params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let cert = params
        .signed_by(&key, &ca, &ca_key)
        .expect("server certificate");
    Issued {
        ca: ca.der().clone(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// A folder of the test's own for the PEM files.
fn folder(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "roomcast-tls-{tag}-{}-{:?}",
        std::process::id(),
        std::time::SystemTime::now()
    ));
    std::fs::create_dir_all(&dir).expect("temp folder");
    dir
}

fn write(dir: &Path, issued: &Issued) -> TlsFiles {
    let files = TlsFiles {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    std::fs::write(&files.cert, &issued.cert_pem).expect("cert");
    std::fs::write(&files.key, &issued.key_pem).expect("key");
    files
}

type Wss = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

/// A `wss://` client trusting only `ca`; `Err` when the handshake fails.
async fn wss(addr: SocketAddr, ca: &CertificateDer<'static>) -> Result<Wss, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).map_err(|e| e.to_string())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = ServerName::try_from("127.0.0.1").map_err(|e| e.to_string())?;
    let tls = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (ws, _) = tokio_tungstenite::client_async(format!("wss://{addr}/"), tls)
        .await
        .map_err(|e| e.to_string())?;
    Ok(ws)
}

async fn wss_send(ws: &mut Wss, json: &str) {
    use futures_util::SinkExt;
    ws.send(tokio_tungstenite::tungstenite::Message::text(json))
        .await
        .expect("send");
}

async fn wss_recv(ws: &mut Wss) -> String {
    use futures_util::StreamExt;
    loop {
        let msg = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("a frame in time")
            .expect("open")
            .expect("frame ok");
        if let tokio_tungstenite::tungstenite::Message::Text(t) = msg {
            return t.to_string();
        }
    }
}

/// Two `wss://` members of `room`: the second's chat reaches the first (dialect 1).
async fn round_trip(a: &mut Wss, b: &mut Wss, room: &str, text: &str) {
    for (ws, tag) in [(&mut *a, "a"), (&mut *b, "b")] {
        wss_send(ws, &join(room)).await;
        // Its own echo comes back only after the join was taken.
        let own = format!("{room}-sync-{tag}");
        wss_send(ws, &subscribe(&own)).await;
        wss_send(ws, &send_message(&own, "synced")).await;
        assert_eq!(wss_recv(ws).await, "synced");
    }
    wss_send(b, &chat(text)).await;
    assert_eq!(wss_recv(a).await, text);
}

fn tls_node(files: TlsFiles) -> impl FnOnce(&mut roomcast::Config) {
    move |c| {
        c.tls = Some(files);
        c.admin_listen = Some("127.0.0.1:0".parse().expect("addr"));
    }
}

/// The node's TLS reload counters, read on the admin address.
async fn reloads(node: &Node) -> (u64, u64) {
    let (_, body) = http_get(node.admin.expect("admin address"), "/metrics").await;
    let value = |result: &str| {
        let prefix = format!("roomcast_tls_reloads_total{{result=\"{result}\"}} ");
        body.lines()
            .find_map(|l| l.strip_prefix(&prefix)?.parse().ok())
            .unwrap_or_else(|| panic!("no {prefix} in /metrics"))
    };
    (value("ok"), value("failed"))
}

fn hang_up() {
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

async fn wait_reloads(node: &Node, want: (u64, u64)) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while reloads(node).await != want {
        assert!(
            tokio::time::Instant::now() < deadline,
            "reloads never reached {want:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_wss_client_does_the_dialect_1_round_trip() {
    let first = issue("first");
    let dir = folder("round-trip");
    let node = Node::start_with(tls_node(write(&dir, &first))).await;
    let mut a = wss(node.addr, &first.ca).await.expect("wss");
    let mut b = wss(node.addr, &first.ca).await.expect("wss");
    round_trip(&mut a, &mut b, "red", "hi over TLS").await;
    // A plaintext client gets no WebSocket from a TLS port.
    let plain = tokio_tungstenite::connect_async(format!("ws://{}/", node.addr)).await;
    assert!(plain.is_err(), "plaintext upgrade on a TLS port");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn sighup_reloads_the_pair_for_new_connections_and_old_ones_keep_working() {
    let (first, second) = (issue("first"), issue("second"));
    let dir = folder("reload");
    let node = Node::start_with(tls_node(write(&dir, &first))).await;
    let mut old_a = wss(node.addr, &first.ca).await.expect("wss before");
    let mut old_b = wss(node.addr, &first.ca).await.expect("wss before");
    assert!(
        wss(node.addr, &second.ca).await.is_err(),
        "not yet the second CA"
    );

    write(&dir, &second);
    hang_up();
    wait_reloads(&node, (1, 0)).await;
    let mut new_a = wss(node.addr, &second.ca).await.expect("the new pair");
    let mut new_b = wss(node.addr, &second.ca).await.expect("the new pair");
    assert!(
        wss(node.addr, &first.ca).await.is_err(),
        "the old pair is gone"
    );
    round_trip(&mut new_a, &mut new_b, "new", "after the reload").await;
    round_trip(&mut old_a, &mut old_b, "old", "still here").await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_broken_file_on_reload_keeps_the_pair_in_use() {
    let first = issue("first");
    let dir = folder("broken");
    let files = write(&dir, &first);
    let node = Node::start_with(tls_node(files.clone())).await;
    std::fs::write(&files.cert, "-----BEGIN CERTIFICATE-----\nnot base64!\n").expect("break");
    hang_up();
    wait_reloads(&node, (0, 1)).await;
    let mut a = wss(node.addr, &first.ca)
        .await
        .expect("still the first pair");
    let mut b = wss(node.addr, &first.ca)
        .await
        .expect("still the first pair");
    round_trip(&mut a, &mut b, "kept", "unchanged").await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn with_an_admin_address_the_operators_paths_move_there() {
    let node =
        Node::start_with(|c| c.admin_listen = Some("127.0.0.1:0".parse().expect("addr"))).await;
    let admin = node.admin.expect("admin address");
    for path in ["/metrics", "/healthz", "/livez", "/readyz", "/dashboard"] {
        assert_eq!(http_get(node.addr, path).await.0, 404, "public {path}");
        assert_eq!(http_get(admin, path).await.0, 200, "admin {path}");
    }
    assert_eq!(
        http_get(admin, "/").await.0,
        404,
        "no demo page on the admin address"
    );
    assert_eq!(
        http_get(node.addr, "/").await.0,
        200,
        "the demo page stays public"
    );
    let ws = tokio_tungstenite::connect_async(format!("ws://{admin}/")).await;
    assert!(ws.is_err(), "no WebSocket sessions on the admin address");
    let mut client = node.client().await;
    send(&mut client, &subscribe("still")).await;
    sync(&mut client, "still").await;
}
