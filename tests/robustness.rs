//! Bad input, dead peers, slow consumers, liveness and shutdown, through real sockets.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

/// After a bad client, a fresh pair of clients must still be served correctly.
async fn still_serves(node: &Node) {
    let (mut a, mut b) = (node.client().await, node.client().await);
    send(&mut a, &subscribe("after")).await;
    sync(&mut a, "after").await;
    send(&mut b, &send_message("after", "fine")).await;
    assert_eq!(recv(&mut a).await, "fine");
}

#[tokio::test]
async fn each_kind_of_bad_input_gets_its_documented_error_and_the_session_stays_open() {
    let node = Node::start().await;
    let cases: &[(&str, &str)] = &[
        ("this is not json", "bad_json"),
        ("[1,2,3]", "bad_json"),
        (r#"{"payload":{}}"#, "bad_field"),
        (r#"{"type":42}"#, "bad_field"),
        (r#"{"type":"dance"}"#, "unknown_type"),
        (r#"{"type":"join","payload":{"roomId":7}}"#, "bad_field"),
        (r#"{"type":"join"}"#, "bad_field"),
        (r#"{"type":"SUBSCRIBE","room":""}"#, "bad_field"),
        (r#"{"type":"SUBSCRIBE","room":["a"]}"#, "bad_field"),
        (
            r#"{"type":"sendMessage","roomId":"r","message":5}"#,
            "bad_field",
        ),
        (r#"{"type":"sendMessage","message":"m"}"#, "bad_field"),
        (
            r#"{"type":"chat","payload":{"message":"early"}}"#,
            "not_in_room",
        ),
        (r#"{"type":"chat","payload":{"message":null}}"#, "bad_field"),
    ];
    for (input, code) in cases {
        let mut ws = node.client().await;
        send(&mut ws, input).await;
        assert_eq!(error_code(&recv(&mut ws).await), *code, "for input {input}");
        // Still open and working after the error.
        sync(&mut ws, "after-error").await;
    }
    let mut ws = node.client().await;
    ws.send(Message::binary(vec![0xde, 0xad, 0xbe, 0xef]))
        .await
        .unwrap();
    assert_eq!(error_code(&recv(&mut ws).await), "unsupported_frame");
    sync(&mut ws, "after-binary").await;
    still_serves(&node).await;
}

#[tokio::test]
async fn limits_get_limit_errors() {
    let node = Node::start_with(|c| {
        c.max_room_name = 8;
        c.max_rooms_per_connection = 2;
    })
    .await;
    let mut ws = node.client().await;
    send(&mut ws, &subscribe("much-too-long")).await;
    assert_eq!(error_code(&recv(&mut ws).await), "limit");
    send(&mut ws, &subscribe("a")).await;
    send(&mut ws, &subscribe("b")).await;
    send(&mut ws, &subscribe("c")).await;
    assert_eq!(error_code(&recv(&mut ws).await), "limit");
    send(&mut ws, &send_message("a", "ok")).await;
    assert_eq!(recv(&mut ws).await, "ok");
}

#[tokio::test]
async fn an_oversized_frame_closes_with_1009_and_others_are_unaffected() {
    let node = Node::start().await;
    let mut big = node.client().await;
    let huge = format!(
        r#"{{"type":"sendMessage","roomId":"r","message":"{}"}}"#,
        "x".repeat(2 << 20)
    );
    // The server may close before the client finishes writing; only the close code matters.
    let _ = big.send(Message::text(huge)).await;
    assert_eq!(close_code(&mut big).await, 1009);
    still_serves(&node).await;
}

#[tokio::test]
async fn invalid_utf8_text_closes_with_1007() {
    let node = Node::start().await;
    let mut raw = raw_upgrade(node.addr, "/").await;
    // A masked text frame whose payload is the lone byte 0xFF.
    raw.write_all(&[0x81, 0x81, 0, 0, 0, 0, 0xFF])
        .await
        .unwrap();
    let mut reply = [0u8; 4];
    raw.read_exact(&mut reply).await.unwrap();
    assert_eq!(reply[0], 0x88, "a close frame");
    assert_eq!(u16::from_be_bytes([reply[2], reply[3]]), 1007);
    still_serves(&node).await;
}

#[tokio::test]
async fn clients_that_drop_tcp_without_closing_leave_nothing_behind() {
    let node = Node::start().await;
    let mut clients = Vec::new();
    for i in 0..500 {
        let mut ws = node.client().await;
        send(&mut ws, &subscribe(&format!("room-{}", i % 50))).await;
        clients.push(ws);
    }
    node.wait_health("500 connections in 50 rooms", |h| {
        h["connections"] == 500 && h["rooms"] == 50
    })
    .await;
    // Dropping the stream closes the socket with no close frame.
    drop(clients);
    node.wait_health("every connection and room released", |h| {
        h["connections"] == 0 && h["rooms"] == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_never_reads_is_closed_and_never_slows_the_others() {
    // The sender floods far past the default inbound limit: this test is about the outbound
    // bound alone.
    let node = Node::start_with(lift_inbound_limits).await;
    // The non-reader joins and then never polls its socket again.
    let mut stuck = node.client().await;
    send(&mut stuck, &subscribe("flood")).await;
    sync(&mut stuck, "stuck").await;
    let mut healthy = node.client().await;
    send(&mut healthy, &subscribe("flood")).await;
    sync(&mut healthy, "healthy").await;

    const COUNT: usize = 20_000;
    // A healthy member keeps up with the room, give or take a window far below the outbox
    // bound; the sender floods as fast as that allows.
    const WINDOW: usize = 256;
    let received = Arc::new(AtomicUsize::new(0));
    let progress = Arc::clone(&received);
    let mut sender = node.client().await;
    let body = "m".repeat(1000);
    let flood = tokio::spawn(async move {
        for i in 0..COUNT {
            while i >= progress.load(Ordering::Acquire) + WINDOW {
                tokio::task::yield_now().await;
            }
            let msg = send_message("flood", &format!("{i:05}{body}"));
            sender.send(Message::text(msg)).await.unwrap();
        }
        sender
    });
    for i in 0..COUNT {
        let got = recv(&mut healthy).await;
        assert_eq!(
            &got[..5],
            format!("{i:05}"),
            "healthy member lost or reordered"
        );
        received.store(i + 1, Ordering::Release);
    }
    let _sender = flood.await.unwrap();
    node.wait_health("the non-reader closed as a slow consumer", |h| {
        h["slow_consumers_closed"] == 1 && h["connections"] == 2
    })
    .await;
    drop(stuck);
}

#[tokio::test]
async fn drop_policy_keeps_the_slow_member_and_counts_drops() {
    let node = Node::start_with(|c| {
        lift_inbound_limits(c);
        c.slow_consumer = roomcast::outbox::SlowConsumer::Drop;
        c.outbox_frames = 64;
    })
    .await;
    let mut stuck = node.client().await;
    send(&mut stuck, &subscribe("d")).await;
    sync(&mut stuck, "stuck").await;
    let mut sender = node.client().await;
    let body = "m".repeat(1000);
    for _ in 0..10_000 {
        sender
            .feed(Message::text(send_message("d", &body)))
            .await
            .unwrap();
    }
    sender.flush().await.unwrap();
    node.wait_health("frames dropped for the slow member", |h| {
        h["dropped"].as_u64().unwrap_or(0) > 0 && h["connections"] == 2
    })
    .await;
    assert_eq!(node.health().await["slow_consumers_closed"], 0);
}

#[tokio::test]
async fn idle_connections_are_pinged_and_dead_ones_dropped() {
    let node = Node::start_with(|c| {
        c.ping_interval = Duration::from_millis(200);
        c.ping_timeout = Duration::from_millis(300);
    })
    .await;
    // A tungstenite client answers pings only while it is being polled.
    let mut alive = node.client().await;
    let mut dead = raw_upgrade(node.addr, "/").await;
    let poll_alive = tokio::spawn(async move {
        let mut pings = 0;
        while let Some(Ok(msg)) = alive.next().await {
            if matches!(msg, Message::Ping(_)) {
                pings += 1;
                if pings == 5 {
                    return alive;
                }
            }
        }
        panic!("responsive client lost its connection");
    });
    node.wait_health("the unresponsive client dropped", |h| h["connections"] == 1)
        .await;
    let mut alive = poll_alive.await.unwrap();
    send(&mut alive, &subscribe("still")).await;
    sync(&mut alive, "alive").await;
    // The dead client got a ping before it was dropped.
    let mut buf = [0u8; 2];
    dead.read_exact(&mut buf).await.unwrap();
    assert_eq!(buf[0], 0x89);
}

#[tokio::test]
async fn shutdown_delivers_everything_queued_before_closing_with_1001() {
    let mut node = Node::start().await;
    let mut reader = node.client().await;
    send(&mut reader, &subscribe("bye")).await;
    sync(&mut reader, "reader").await;
    let mut sender = node.client().await;
    send(&mut sender, &subscribe("bye")).await;
    const COUNT: usize = 2_000;
    for i in 0..COUNT {
        sender
            .feed(Message::text(send_message("bye", &i.to_string())))
            .await
            .unwrap();
    }
    sender.flush().await.unwrap();
    // The sender hears its own last message: everything is queued for the reader by now.
    for i in 0..COUNT {
        assert_eq!(recv(&mut sender).await, i.to_string());
    }
    node.shutdown();
    for i in 0..COUNT {
        assert_eq!(recv(&mut reader).await, i.to_string());
    }
    assert_eq!(close_code(&mut reader).await, 1001);
    assert_eq!(close_code(&mut sender).await, 1001);
    drop((reader, sender));
    tokio::time::timeout(PATIENCE, &mut node.task)
        .await
        .expect("node stops after draining")
        .unwrap();
    assert!(
        TcpStream::connect(node.addr).await.is_err(),
        "still accepting"
    );
}

#[tokio::test]
async fn connections_past_the_maximum_get_503() {
    let node = Node::start_with(|c| c.max_connections = 2).await;
    let _a = node.client().await;
    let _b = node.client().await;
    let err = tokio_tungstenite::connect_async_with_config(
        node.url(),
        Some(WebSocketConfig::default()),
        false,
    )
    .await
    .expect_err("third connection refused");
    assert!(err.to_string().contains("503"), "{err}");
    still_serves_after_one_leaves(node, _a).await;
}

async fn still_serves_after_one_leaves(node: Node, a: Ws) {
    drop(a);
    node.wait_health("one connection", |h| h["connections"] == 1)
        .await;
    let mut c = node.client().await;
    send(&mut c, &subscribe("z")).await;
    sync(&mut c, "z").await;
}

/// A pong answers its ping before anything the session sends after that ping, even when a
/// delivery to this connection is already waiting (direct writes made the reverse order
/// possible: the echo of a message that followed the ping went straight to the socket, or the
/// earlier pong was put behind it). Everything in one write, so one read holds it all.
#[tokio::test]
async fn pongs_keep_their_place_among_the_sessions_own_frames() {
    let node = Node::start().await;
    let mut raw = raw_upgrade(node.addr, "/").await;
    let mut burst = client_frame(0x81, subscribe("pp").as_bytes());
    burst.extend(client_frame(0x89, b"a"));
    burst.extend(client_frame(0x81, send_message("pp", "m").as_bytes()));
    burst.extend(client_frame(0x89, b"b"));
    raw.write_all(&burst).await.expect("write");
    let frames = read_frames_until(&mut raw, |frames| frames.len() >= 3).await;
    let expected = [
        (0x8A, b"a".to_vec()),
        (0x81, b"m".to_vec()),
        (0x8A, b"b".to_vec()),
    ];
    assert_eq!(frames, expected);
}
