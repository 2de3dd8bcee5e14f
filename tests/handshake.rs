//! The two ways an upgrade is served: the request head read by roomcast itself (a plain GET
//! upgrade, the usual case) and hyper (anything else, here an upgrade that declares an empty
//! body). Both must answer the same 101 and start the same session, with the bytes a client
//! sent right behind its request.

mod common;

use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// The accept value RFC 6455 gives for the sample key every request here sends.
const SAMPLE_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// Makes the request go to hyper: `head` serves only upgrades without body headers.
const VIA_HYPER: &str = "Content-Length: 0\r\n";

/// Reads a response head byte by byte, so nothing after it is consumed.
async fn response_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let n = tokio::time::timeout(PATIENCE, tokio::io::AsyncReadExt::read(stream, &mut byte))
            .await
            .expect("a response in time")
            .expect("read");
        assert_eq!(n, 1, "closed after {:?}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

fn request(extra: &str) -> String {
    format!(
        "GET / HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// Sends the request and two frames in one write (subscribe, then a message to that room,
/// which comes back to its sender) and expects the message back: what arrived with the head is
/// handed to the session, not lost.
async fn upgrade_with_frames(node: &Node, extra: &str, room: &str) -> String {
    let mut stream = TcpStream::connect(node.addr).await.expect("connect");
    let mut bytes = request(extra).into_bytes();
    bytes.extend(client_frame(0x81, subscribe(room).as_bytes()));
    bytes.extend(client_frame(0x81, send_message(room, "behind").as_bytes()));
    stream.write_all(&bytes).await.expect("write");
    let head = response_head(&mut stream).await;
    let frames = read_frames_until(&mut stream, |frames| !frames.is_empty()).await;
    assert_eq!(frames[0], (0x81, b"behind".to_vec()), "{head}");
    head
}

#[tokio::test]
async fn both_paths_answer_the_same_101_and_keep_the_frames_sent_behind_the_request() {
    let node = Node::start().await;
    for (extra, room) in [("", "ours"), (VIA_HYPER, "hypers")] {
        let head = upgrade_with_frames(&node, extra, room).await.to_lowercase();
        assert!(head.starts_with("http/1.1 101 "), "{head}");
        assert!(head.contains("upgrade: websocket\r\n"), "{head}");
        assert!(head.contains("connection: upgrade\r\n"), "{head}");
        let accept = format!("sec-websocket-accept: {}\r\n", SAMPLE_ACCEPT.to_lowercase());
        assert!(head.contains(&accept), "{extra:?}: {head}");
    }
}

#[tokio::test]
async fn a_head_that_arrives_a_byte_at_a_time_or_past_the_first_buffer_is_served() {
    let node = Node::start().await;
    let mut stream = TcpStream::connect(node.addr).await.expect("connect");
    for byte in request("").bytes() {
        stream.write_all(&[byte]).await.expect("write");
    }
    assert!(response_head(&mut stream)
        .await
        .starts_with("HTTP/1.1 101 "));
    // A 3 KiB cookie, past the head buffer's first 1 KiB.
    let cookie = format!("Cookie: c={}\r\n", "x".repeat(3 * 1024));
    let (status, head, _stream) = try_upgrade(node.addr, &cookie).await;
    assert_eq!(status, 101, "{head}");
    serves_a_fresh_pair(&node).await;
}

#[tokio::test]
async fn a_refusal_is_answered_whole_and_the_connection_closed() {
    let node = Node::start_with(|c| c.max_connections = 1).await;
    let _held = raw_upgrade(node.addr, "/").await;
    let mut stream = TcpStream::connect(node.addr).await.expect("connect");
    stream
        .write_all(request("").as_bytes())
        .await
        .expect("write");
    let ended = read_until_closed(&mut stream, PATIENCE).await;
    let text = String::from_utf8_lossy(&ended.bytes);
    let body = "connection limit reached\n";
    assert!(
        text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
        "{text}"
    );
    assert!(text.contains("retry-after: 1\r\n"), "{text}");
    assert!(
        text.contains(&format!("content-length: {}\r\n", body.len())),
        "{text}"
    );
    assert!(text.ends_with(&format!("\r\n\r\n{body}")), "{text}");
}
