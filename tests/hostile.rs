//! Hostile clients: garbage, oversized and trickled requests, connection floods, half-open
//! sockets and clients that ignore the close handshake. After each, a fresh pair of clients must
//! still get a subscribe + sendMessage round trip.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Error as WsError;

/// Deterministic pseudo-random bytes (xorshift64*), so a failure can be replayed.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

/// The status code of a raw HTTP/1.1 response, if `bytes` starts with one.
fn status_of(bytes: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(bytes.get(..12)?).ok()?;
    text.strip_prefix("HTTP/1.1 ")?.parse().ok()
}

/// Sends `request` on a fresh connection and returns how the server ended it. Write errors are
/// ignored: the server may close (or reset) before it has read everything.
async fn send_raw(node: &Node, request: &[u8]) -> Ended {
    let mut stream = TcpStream::connect(node.addr).await.expect("connect");
    let _ = stream.write_all(request).await;
    read_until_closed(&mut stream, PATIENCE).await
}

#[tokio::test]
async fn garbage_instead_of_an_http_request_is_refused_and_closed() {
    // A header timeout far beyond PATIENCE: any close seen here is the server rejecting the
    // bytes, not the slowloris guard.
    let node = Node::start_with(|c| c.header_timeout = Duration::from_secs(120)).await;
    let mut tls_hello = vec![
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    tls_hello.extend(noise(7, 500));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("random bytes", noise(0x5eed, 4096)),
        ("more random bytes", noise(0xdead_beef, 1000)),
        ("a TLS ClientHello", tls_hello),
        (
            "a WebSocket frame with no handshake",
            client_frame(0x81, b"{}"),
        ),
        (
            "an HTTP/2 preface",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
        ),
        (
            "binary junk in a header value",
            b"GET / HTTP/1.1\r\nHost: t\r\nX-Junk: \x00\x01\x02\xff\r\n\r\n".to_vec(),
        ),
        (
            "a request line with no version",
            b"GET /healthz\r\n\r\n".to_vec(),
        ),
    ];
    for (what, bytes) in cases {
        let ended = send_raw(&node, &bytes).await;
        // Either nothing at all or a 400 before the close; never a served request.
        if !ended.bytes.is_empty() {
            assert_eq!(
                status_of(&ended.bytes),
                Some(400),
                "{what}: {:?}",
                String::from_utf8_lossy(&ended.bytes)
            );
        }
    }
    assert_eq!(node.health().await["connections"], 0);
    serves_a_fresh_pair(&node).await;
}

#[tokio::test]
async fn oversized_headers_get_431_or_a_close_never_a_crash() {
    let node = Node::start().await;
    let big = "a".repeat(64 * 1024);
    let many: String = (0..500).map(|i| format!("X-H{i}: v\r\n")).collect();
    let cases: Vec<(&str, String)> = vec![
        (
            "a 64 KiB header line",
            format!("GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: {big}\r\n\r\n"),
        ),
        (
            "a 64 KiB header on a WebSocket upgrade",
            format!(
                "GET / HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
                 X-Big: {big}\r\n\r\n"
            ),
        ),
        (
            "a 64 KiB request target",
            format!("GET /{big} HTTP/1.1\r\nHost: t\r\n\r\n"),
        ),
        (
            "500 headers",
            format!("GET /healthz HTTP/1.1\r\nHost: t\r\n{many}\r\n"),
        ),
    ];
    for (what, request) in cases {
        let ended = send_raw(&node, request.as_bytes()).await;
        // The server stops reading at its buffer limit, answers and closes; a close with unread
        // bytes may turn into a reset that eats the answer, so an empty read is fine too.
        if !ended.bytes.is_empty() {
            let status = status_of(&ended.bytes);
            assert!(
                matches!(status, Some(431) | Some(414)),
                "{what}: got {:?}",
                String::from_utf8_lossy(&ended.bytes[..ended.bytes.len().min(200)])
            );
        }
    }
    assert_eq!(node.health().await["connections"], 0);
    serves_a_fresh_pair(&node).await;
}

#[tokio::test]
async fn slowloris_connections_are_dropped_at_the_header_timeout() {
    const TIMEOUT: Duration = Duration::from_millis(500);
    let node = Node::start_with(|c| c.header_timeout = TIMEOUT).await;
    let addr = node.addr;
    // Each attacker returns how long the server let it hang on, from the moment the header
    // clock started for it.
    let trickle = |gap: Duration| {
        tokio::spawn(async move {
            let started = Instant::now();
            let stream = TcpStream::connect(addr).await.unwrap();
            let (mut rd, mut wr) = stream.into_split();
            // The writer never finishes the request; a timer that restarted on every byte
            // would never fire for the fast trickle.
            let writer = tokio::spawn(async move {
                let request = b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: ".repeat(10);
                for byte in request {
                    if wr.write_all(&[byte]).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(gap).await;
                }
            });
            let mut got = Vec::new();
            let closed = tokio::time::timeout(PATIENCE, rd.read_to_end(&mut got)).await;
            let elapsed = started.elapsed();
            writer.abort();
            assert!(closed.is_ok(), "a trickle every {gap:?} was never dropped");
            (format!("trickle every {gap:?}"), elapsed, got)
        })
    };
    let silent = tokio::spawn(async move {
        let started = Instant::now();
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let ended = read_until_closed(&mut stream, PATIENCE).await;
        (
            "silent connection".to_owned(),
            started.elapsed(),
            ended.bytes,
        )
    });
    // A keep-alive client that got its answer and then sends nothing more.
    let idle_keep_alive = tokio::spawn(async move {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"}") {
            let mut byte = [0u8; 1];
            stream.read_exact(&mut byte).await.unwrap();
            head.push(byte[0]);
        }
        let started = Instant::now();
        let ended = read_until_closed(&mut stream, PATIENCE).await;
        ("idle keep-alive".to_owned(), started.elapsed(), ended.bytes)
    });
    let attackers = vec![
        trickle(Duration::from_secs(1)),
        trickle(Duration::from_millis(50)),
        silent,
        idle_keep_alive,
    ];
    // Meanwhile the node serves everyone else.
    serves_a_fresh_pair(&node).await;
    for attacker in attackers {
        let (what, elapsed, got) = attacker.await.unwrap();
        assert!(
            elapsed >= TIMEOUT - Duration::from_millis(50),
            "{what}: dropped after {elapsed:?}, before the {TIMEOUT:?} header timeout"
        );
        assert!(
            elapsed < TIMEOUT + Duration::from_millis(2500),
            "{what}: dropped only after {elapsed:?} (header timeout {TIMEOUT:?})"
        );
        // Dropped without an answer (or with a 408); never served.
        assert!(
            got.is_empty() || status_of(&got) == Some(408),
            "{what}: {:?}",
            String::from_utf8_lossy(&got)
        );
    }
    serves_a_fresh_pair(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_past_max_connections_gets_503_and_the_admitted_keep_working() {
    const MAX: usize = 20;
    const FLOOD: usize = 50;
    let node = Node::start_with(|c| c.max_connections = MAX).await;
    let url = node.url();
    let attempts: Vec<_> = (0..FLOOD)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { tokio_tungstenite::connect_async(url).await })
        })
        .collect();
    let mut admitted = Vec::new();
    let mut refused = 0;
    for attempt in attempts {
        match attempt.await.unwrap() {
            Ok((ws, _)) => admitted.push(ws),
            Err(WsError::Http(response)) => {
                assert_eq!(response.status(), 503, "refusal status");
                assert!(response.headers().contains_key("retry-after"));
                refused += 1;
            }
            Err(e) => panic!("a flooding client failed in an unexpected way: {e}"),
        }
    }
    assert_eq!(
        (admitted.len(), refused),
        (MAX, FLOOD - MAX),
        "admitted and refused (limit {MAX})"
    );
    node.wait_health("exactly the admitted connections", |h| {
        h["connections"] == MAX as u64
    })
    .await;

    // Every admitted client still works: all join one room and each hears one broadcast.
    for ws in admitted.iter_mut() {
        send(ws, &subscribe("flooded")).await;
    }
    for (i, ws) in admitted.iter_mut().enumerate() {
        sync(ws, &format!("flood-{i}")).await;
    }
    send(&mut admitted[0], &send_message("flooded", "all of you")).await;
    for ws in admitted.iter_mut() {
        assert_eq!(recv(ws).await, "all of you");
    }

    // Still full: one more is refused; once one leaves, its slot is free again.
    let err = tokio_tungstenite::connect_async(node.url())
        .await
        .expect_err("the node is still full");
    assert!(
        matches!(&err, WsError::Http(r) if r.status() == 503),
        "{err}"
    );
    drop(admitted.pop());
    node.wait_health("one slot free", |h| h["connections"] == MAX as u64 - 1)
        .await;
    let mut late = node.client().await;
    send(&mut late, &subscribe("late")).await;
    sync(&mut late, "late").await;

    drop(admitted);
    drop(late);
    node.wait_health("every connection released", |h| h["connections"] == 0)
        .await;
    serves_a_fresh_pair(&node).await;
}

#[tokio::test]
async fn half_open_clients_are_released() {
    const HALF_OPEN: usize = 10;
    let node = Node::start().await;
    // A bystander that stays, so the expected counts are not just zero.
    let mut bystander = node.client().await;
    send(&mut bystander, &subscribe("stay")).await;
    sync(&mut bystander, "bystander").await;

    let mut raws = Vec::new();
    for i in 0..HALF_OPEN {
        let mut raw = raw_upgrade(node.addr, "/").await;
        let room = format!("half-{i}");
        let mut frames = client_frame(0x81, subscribe(&room).as_bytes());
        frames.extend(client_frame(0x81, send_message(&room, "hello").as_bytes()));
        raw.write_all(&frames).await.unwrap();
        // The delivery of its own message proves the subscription was processed.
        let mut reply = [0u8; 7];
        tokio::time::timeout(PATIENCE, raw.read_exact(&mut reply))
            .await
            .expect("delivery in time")
            .unwrap();
        assert_eq!(&reply, b"\x81\x05hello");
        raws.push(raw);
    }
    node.wait_health("every half-open client and its room", |h| {
        h["connections"] == HALF_OPEN as u64 + 1 && h["rooms"] == HALF_OPEN as u64 + 1
    })
    .await;

    // FIN from the client, no close frame; the sockets stay open for reading.
    for raw in raws.iter_mut() {
        raw.shutdown().await.unwrap();
    }
    for raw in raws.iter_mut() {
        let ended = read_until_closed(raw, PATIENCE).await;
        assert!(
            ended.bytes.is_empty() || ended.bytes[0] == 0x88,
            "only a close frame may follow: {:?}",
            ended.bytes
        );
    }
    node.wait_health("the half-open clients released", |h| {
        h["connections"] == 1 && h["rooms"] == 1
    })
    .await;
    sync(&mut bystander, "bystander-after").await;
    serves_a_fresh_pair(&node).await;
}

#[tokio::test]
async fn data_after_a_close_frame_is_ignored_and_the_connection_ends() {
    let node = Node::start().await;
    let mut listener = node.client().await;
    send(&mut listener, &subscribe("cd")).await;
    sync(&mut listener, "listener").await;

    let mut raw = raw_upgrade(node.addr, "/").await;
    let mut burst = client_frame(0x81, send_message("cd", "before").as_bytes());
    burst.extend(client_close(1000, "bye"));
    // Everything after the close must be ignored: data, a ping, more data.
    burst.extend(client_frame(0x81, send_message("cd", "after-0").as_bytes()));
    burst.extend(client_frame(0x89, b"ping"));
    burst.extend(client_frame(0x82, b"\x01\x02"));
    burst.extend(client_frame(0x81, send_message("cd", "after-1").as_bytes()));
    raw.write_all(&burst).await.unwrap();

    // The server answers the close with the same code...
    let mut reply = [0u8; 4];
    tokio::time::timeout(PATIENCE, raw.read_exact(&mut reply))
        .await
        .expect("close reply in time")
        .unwrap();
    assert_eq!(reply, [0x88, 0x02, 0x03, 0xe8], "a close frame with 1000");
    // ...and the client keeps talking while the server ends the connection.
    for i in 2..20 {
        let frame = client_frame(0x81, send_message("cd", &format!("after-{i}")).as_bytes());
        if raw.write_all(&frame).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ended = read_until_closed(&mut raw, PATIENCE).await;
    assert!(
        ended.bytes.is_empty(),
        "nothing may follow the close frame: {:?}",
        ended.bytes
    );
    node.wait_health("the closing client released", |h| h["connections"] == 1)
        .await;

    // The listener got the message sent before the close and none of those after it: the
    // next thing it hears is a barrier sent now.
    assert_eq!(recv(&mut listener).await, "before");
    let mut other = node.client().await;
    send(&mut other, &send_message("cd", "barrier")).await;
    assert_eq!(recv(&mut listener).await, "barrier");
    serves_a_fresh_pair(&node).await;
}

/// The admission check and the connection count must be one atomic step: handshakes racing
/// each other on different workers must never push the node past `max_connections`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_handshakes_never_exceed_max_connections() {
    const MAX: usize = 4;
    const RACERS: usize = 32;
    const ROUNDS: usize = 200;
    let node = Node::start_with(|c| c.max_connections = MAX).await;
    const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                    Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    let mut worst = 0;
    for round in 0..ROUNDS {
        let racers: Vec<_> = (0..RACERS)
            .map(|_| {
                let addr = node.addr;
                tokio::spawn(async move {
                    let mut stream = TcpStream::connect(addr).await.unwrap();
                    stream.write_all(REQUEST).await.unwrap();
                    let mut status = [0u8; 12];
                    tokio::time::timeout(PATIENCE, stream.read_exact(&mut status))
                        .await
                        .expect("an answer in time")
                        .unwrap();
                    (status_of(&status), stream)
                })
            })
            .collect();
        let mut admitted = 0;
        let mut streams = Vec::with_capacity(RACERS);
        for racer in racers {
            let (status, stream) = racer.await.unwrap();
            match status {
                Some(101) => admitted += 1,
                Some(503) => {}
                other => panic!("unexpected answer {other:?}"),
            }
            streams.push(stream);
        }
        worst = worst.max(admitted);
        assert!(
            admitted <= MAX,
            "round {round}: {admitted} of {RACERS} racing handshakes admitted (limit {MAX})"
        );
        drop(streams);
        node.wait_health("the racers released", |h| h["connections"] == 0)
            .await;
    }
    assert_eq!(worst, MAX, "the node admitted fewer than its limit");
}
