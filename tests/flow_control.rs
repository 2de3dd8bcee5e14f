//! One client's flood costs nobody else anything: inbound flow control (both policies), one
//! pending pong however many pings arrive, deadlines for frames that never complete, and the
//! close frame always last. Every test runs against a real node over real sockets.

mod common;

use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use roomcast::inbound::RatePolicy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

/// A ping flood from a client that does not read: the server answers only the latest ping, so
/// what it holds for that client stays one pong, not one per ping.
#[tokio::test]
async fn a_ping_flood_holds_one_pong_not_one_per_ping() {
    // The limits are lifted so that the pong bound is what is tested, not the throttle.
    let node = Node::start_with(lift_inbound_limits).await;
    let stream = raw_upgrade(node.addr, "/").await;
    let (mut rx, mut tx) = stream.into_split();
    // 400,000 pings of 125 bytes (52 MB): far more pongs than the socket buffers between the
    // server and this unread socket can hold (a few MB on loopback).
    const PINGS: usize = 400_000;
    let ping = client_frame(0x89, &[7u8; 125]);
    let mut burst = client_frame(0x81, subscribe("pf").as_bytes());
    for _ in 0..PINGS {
        burst.extend_from_slice(&ping);
    }
    burst.extend(client_frame(0x81, send_message("pf", "sync").as_bytes()));
    let writer = tokio::spawn(async move {
        tx.write_all(&burst).await.expect("write the flood");
        tx
    });
    // Read only once every ping is written: until then nothing drains the server's writes.
    let _tx = writer.await.expect("writer");
    let frames = read_frames_until(&mut rx, |frames| {
        frames
            .iter()
            .any(|(first, p)| *first == 0x81 && p == b"sync")
    })
    .await;
    let pongs = frames.iter().filter(|(first, _)| *first == 0x8A).count();
    assert!(
        pongs < PINGS / 2,
        "{pongs} pongs for {PINGS} pings: pongs were queued per ping"
    );
    let health = node.health().await;
    assert!(
        health["pongs_replaced"].as_u64().unwrap_or(0) > 0,
        "{health}"
    );
    let peak = health["outbox_peak_bytes"]
        .as_u64()
        .expect("outbox_peak_bytes");
    assert!(peak < 64 * 1024, "{peak} bytes waited for one connection");
}

/// A flooder sending as fast as TCP allows into a room with two healthy readers and one member
/// that never reads: the readers get every message in order and are never evicted; only the
/// non-reader is closed. The readers pace themselves at about four times the flooder's limit:
/// they keep up with what the server lets one client send, not with what TCP can carry (without
/// the inbound limit this test fails: they are closed as slow consumers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_never_evicts_readers_that_keep_up_with_the_senders_limit() {
    let node = Node::start_with(|c| {
        c.inbound.frames_per_sec = 1000;
        c.inbound.frames_burst = 100;
        c.inbound.bytes_per_sec = 2 << 20;
        // A small outbox so the non-reader is found out within a few MB.
        c.outbox_bytes = 256 * 1024;
    })
    .await;
    let mut stuck = node.client().await;
    send(&mut stuck, &subscribe("flood")).await;
    sync(&mut stuck, "stuck").await;
    // 5 MB: more than the non-reader's outbox and socket buffers hold.
    const COUNT: usize = 5_000;
    let mut readers = Vec::new();
    for tag in ["a", "b"] {
        let mut ws = node.client().await;
        send(&mut ws, &subscribe("flood")).await;
        sync(&mut ws, tag).await;
        readers.push(tokio::spawn(async move {
            for i in 0..COUNT {
                let got = recv(&mut ws).await;
                assert_eq!(
                    &got[..5],
                    format!("{i:05}"),
                    "reader {tag} lost or reordered"
                );
                if i % 8 == 7 {
                    // At most 8 messages per 2 ms: about 4,000 a second.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            ws
        }));
    }
    let mut flooder = raw_upgrade(node.addr, "/").await;
    let body = "m".repeat(1000);
    let mut flood = Vec::with_capacity(COUNT * 1100);
    for i in 0..COUNT {
        let text = send_message("flood", &format!("{i:05}{body}"));
        flood.extend(client_frame(0x81, text.as_bytes()));
    }
    flooder.write_all(&flood).await.expect("flood written");
    let mut healthy = Vec::new();
    for reader in readers {
        let ws = reader.await;
        healthy.push(ws.expect("a healthy reader got every message in order"));
    }
    node.wait_health("the non-reader closed, the readers not", |h| {
        h["slow_consumers_closed"] == 1 && h["connections"] == 3
    })
    .await;
    let health = node.health().await;
    assert!(health["throttled"].as_u64().unwrap_or(0) > 0, "{health}");
    drop(stuck);
}

/// Under `throttle` a sender over its limit is slowed down, and nothing it sent is lost or
/// refused.
#[tokio::test]
async fn throttle_delays_a_fast_sender_and_loses_nothing() {
    let node = Node::start_with(|c| {
        c.inbound.frames_per_sec = 20;
        c.inbound.frames_burst = 5;
    })
    .await;
    let mut ws = node.client().await;
    send(&mut ws, &subscribe("t")).await;
    for i in 0..30 {
        ws.feed(Message::text(send_message("t", &format!("m{i}"))))
            .await
            .expect("feed");
    }
    ws.flush().await.expect("flush");
    for i in 0..30 {
        assert_eq!(recv(&mut ws).await, format!("m{i}"));
    }
    let health = node.health().await;
    assert!(health["throttled"].as_u64().unwrap_or(0) > 0, "{health}");
    assert_eq!(health["rate_limited"], 0, "{health}");
}

/// Under `reject` the messages over the limit get `rate_limited`, and one refusal past the
/// allowed count closes the connection with 4008.
#[tokio::test]
async fn reject_refuses_with_rate_limited_then_closes_with_4008() {
    let node = Node::start_with(|c| {
        c.inbound.frames_per_sec = 1;
        c.inbound.frames_burst = 3;
        c.inbound.policy = RatePolicy::Reject;
        c.inbound.reject_close_after = 2;
    })
    .await;
    let mut ws = node.client().await;
    // One write: the subscribe and two sends use the burst of 3; at 1 frame/s nothing refills
    // while the server reads the rest of the same write.
    ws.feed(Message::text(subscribe("r"))).await.expect("feed");
    for i in 0..10 {
        ws.feed(Message::text(send_message("r", &format!("m{i}"))))
            .await
            .expect("feed");
    }
    ws.flush().await.expect("flush");
    assert_eq!(recv(&mut ws).await, "m0");
    assert_eq!(recv(&mut ws).await, "m1");
    assert_eq!(error_code(&recv(&mut ws).await), "rate_limited");
    assert_eq!(error_code(&recv(&mut ws).await), "rate_limited");
    assert_eq!(close_code(&mut ws).await, 4008);
    let health = node.health().await;
    assert_eq!(health["rate_limit_closed"], 1, "{health}");
}

/// While throttled the server does not read, so it cannot see pongs: the ping timeout must not
/// count that time against the client.
#[tokio::test]
async fn a_throttled_client_is_not_closed_by_its_own_ping_timeout() {
    let node = Node::start_with(|c| {
        c.ping_interval = Duration::from_millis(100);
        c.ping_timeout = Duration::from_millis(100);
        c.inbound.frames_per_sec = 5;
        c.inbound.frames_burst = 1;
    })
    .await;
    let mut ws = node.client().await;
    // 16 frames at 5 a second: about 3 s throttled, many ping timeouts long.
    ws.feed(Message::text(subscribe("p"))).await.expect("feed");
    for i in 0..15 {
        ws.feed(Message::text(send_message("p", &format!("m{i}"))))
            .await
            .expect("feed");
    }
    ws.flush().await.expect("flush");
    // Reading answers the server's pings (tungstenite replies to them as it reads).
    for i in 0..15 {
        assert_eq!(recv(&mut ws).await, format!("m{i}"));
    }
    let health = node.health().await;
    assert!(health["throttled"].as_u64().unwrap_or(0) > 0, "{health}");
    assert_eq!(health["connections"], 1, "{health}");
}

/// Reads what the server sends until it closes and returns its close code and reason.
async fn closed_with(stream: &mut tokio::net::TcpStream) -> (u16, String) {
    let ended = read_until_closed(stream, PATIENCE).await;
    close_of(&server_frames(&ended.bytes)).expect("a close frame before the end")
}

/// A frame trickled one byte at a time is no sign of life: it must complete within the frame
/// timeout.
#[tokio::test]
async fn a_trickled_frame_is_closed_at_the_frame_deadline() {
    let node = Node::start_with(|c| c.frame_timeout = Duration::from_millis(300)).await;
    let stream = raw_upgrade(node.addr, "/").await;
    let (mut rx, mut tx) = stream.into_split();
    let frame = client_frame(0x81, send_message("x", &"y".repeat(100)).as_bytes());
    let trickle = tokio::spawn(async move {
        for byte in &frame[..frame.len() - 1] {
            if tx.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let mut stream_bytes = Vec::new();
    let read = tokio::time::timeout(PATIENCE, rx.read_to_end(&mut stream_bytes)).await;
    assert!(read.is_ok(), "still open after {PATIENCE:?}");
    let close = close_of(&server_frames(&stream_bytes));
    assert_eq!(close, Some((1008, "incomplete frame".to_owned())));
    trickle.abort();
    assert_eq!(node.health().await["incomplete_closed"], 1);
}

/// A fragmented message that never finishes is closed at the deadline, even while the client
/// keeps pinging (complete frames keep it alive, but not its message).
#[tokio::test]
async fn an_unfinished_fragmented_message_is_closed_at_the_frame_deadline() {
    let node = Node::start_with(|c| c.frame_timeout = Duration::from_millis(300)).await;
    let mut stream = raw_upgrade(node.addr, "/").await;
    stream
        .write_all(&client_frame(0x01, b"{\"type\":"))
        .await
        .expect("first fragment");
    for _ in 0..5 {
        stream
            .write_all(&client_frame(0x89, b"alive"))
            .await
            .expect("ping");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        closed_with(&mut stream).await,
        (1008, "incomplete frame".to_owned())
    );
}

/// What an error reply quotes of a client's string is capped, however long the string.
#[tokio::test]
async fn error_replies_quote_at_most_a_capped_piece_of_client_strings() {
    let node = Node::start().await;
    let mut ws = node.client().await;
    // Once echoed whole: 10 KB of reply for 10 KB of request, per message.
    let room = "r".repeat(10_000);
    send(&mut ws, &join("held")).await;
    let chat = format!(r#"{{"type":"chat","payload":{{"message":"hi","roomId":"{room}"}}}}"#);
    send(&mut ws, &chat).await;
    let reply = recv(&mut ws).await;
    assert_eq!(error_code(&reply), "not_in_room");
    assert!(reply.len() < 160, "{} bytes: {reply}", reply.len());
}

/// The fan-out budget: a sender is charged the deliveries its messages cause, so in a big room
/// it is slowed down sooner than in a small one; nothing it sent is lost.
#[tokio::test]
async fn the_fanout_budget_slows_a_sender_by_its_rooms_size_and_loses_nothing() {
    let node = Node::start_with(|c| {
        c.inbound.fanout_per_sec = 200;
        c.inbound.fanout_burst = 100;
    })
    .await;
    let mut members = Vec::new();
    for _ in 0..20 {
        let mut ws = node.client().await;
        send(&mut ws, &subscribe("wide")).await;
        sync(&mut ws, "member").await;
        members.push(ws);
    }
    let mut sender = node.client().await;
    // Ten messages to 20 members: 200 deliveries, twice the burst.
    for i in 0..10 {
        sender
            .feed(Message::text(send_message("wide", &format!("w{i}"))))
            .await
            .expect("feed");
    }
    sender.flush().await.expect("flush");
    for ws in members.iter_mut() {
        for i in 0..10 {
            assert_eq!(recv(ws).await, format!("w{i}"));
        }
    }
    let health = node.health().await;
    assert!(health["throttled"].as_u64().unwrap_or(0) > 0, "{health}");
}
