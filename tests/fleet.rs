//! What protects the node, the shared Redis and the fleet: an honest Redis link under a flood,
//! the reserved namespace, caps per address and per node, and probes an orchestrator can trust.

mod common;

use std::time::Duration;

use common::redis::Redis;
use common::*;
use futures_util::SinkExt;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;

async fn healthy(nodes: &[&Node]) {
    for node in nodes {
        node.wait_health("backplane connected", |h| h["status"] == "ok")
            .await;
    }
}

/// Waits until every publish `ws` sent so far has been answered: its own `flood-sync` echo
/// comes back after them (it is resent when the full queue refuses it too). Refusals of other
/// rooms' publishes are counted into `refused`.
async fn drain_answers(ws: &mut Ws, refused: &mut usize) {
    send(ws, &send_message("flood-sync", "sync")).await;
    loop {
        let got = recv(ws).await;
        if got == "sync" {
            return;
        }
        assert_eq!(error_code(&got), "backplane_unavailable", "{got}");
        if got.contains("flood-sync") {
            send(ws, &send_message("flood-sync", "sync")).await;
        } else {
            *refused += 1;
        }
    }
}

/// Publishes `text` to `room` until the node accepts it.
async fn publish_until_accepted(ws: &mut Ws, room: &str, text: &str) {
    loop {
        send(ws, &send_message(room, text)).await;
        let mut refused = 0;
        drain_answers(ws, &mut refused).await;
        if refused == 0 {
            return;
        }
    }
}

/// 999 members on each node that subscribe to `big` and never read, and one reader on each
/// node that checks what arrives.
async fn big_room(a: &Node, b: &Node) -> (Vec<tokio::net::TcpStream>, [Ws; 2]) {
    let mut passive = Vec::new();
    for node in [a, b] {
        for _ in 0..999 {
            let mut member = raw_upgrade(node.addr, "/").await;
            let frame = client_frame(0x81, subscribe("big").as_bytes());
            member.write_all(&frame).await.expect("subscribe");
            passive.push(member);
        }
    }
    let mut readers = [a.client().await, b.client().await];
    for (ws, tag) in readers.iter_mut().zip(["a", "b"]) {
        send(ws, &subscribe("big")).await;
        sync(ws, tag).await;
    }
    (passive, readers)
}

/// Sends numbered messages to `big` as fast as the node answers, for `flood_for`; returns
/// how many were sent and how many refused.
async fn flood(flooder: &mut Ws, flood_for: Duration) -> (usize, usize) {
    let started = tokio::time::Instant::now();
    let (mut count, mut refused) = (0, 0);
    while started.elapsed() < flood_for {
        for _ in 0..100 {
            let msg = send_message("big", &format!("{count:07}"));
            flooder.feed(Message::text(msg)).await.expect("feed");
            count += 1;
        }
        flooder.flush().await.expect("flush");
        // Read the answers now and then: a client that never reads its error replies is a
        // slow consumer, and would be closed for it.
        if count % 1000 == 0 {
            drain_answers(flooder, &mut refused).await;
        }
    }
    drain_answers(flooder, &mut refused).await;
    (count, refused)
}

/// What each reader got before an end marker, checked for order and duplicates, and how many
/// markers it took: one is sent whenever a reader has been silent for a second, because on a
/// node that drops, a marker can be dropped too.
async fn read_until_marker(readers: &mut [Ws; 2], flooder: &mut Ws) -> ([usize; 2], usize) {
    let mut markers = 0;
    let mut seen = [0; 2];
    for (r, ws) in readers.iter_mut().enumerate() {
        let mut last = None;
        loop {
            match tokio::time::timeout(Duration::from_secs(1), recv(ws)).await {
                Ok(text) if text.starts_with("end") => break,
                Ok(text) => {
                    let n: usize = text.parse().expect("a flood message");
                    assert!(last < Some(n), "reader {r}: {n} after {last:?}");
                    last = Some(n);
                    seen[r] += 1;
                }
                Err(_) => {
                    let marker = format!("end{markers}");
                    publish_until_accepted(flooder, "big", &marker).await;
                    markers += 1;
                }
            }
        }
    }
    (seen, markers)
}

/// An outsider floods a 2,000-member room spread over two nodes for longer than the probe
/// deadline. Every publish the first node accepted reaches the readers in order, or (on the
/// node whose fan-out is made to fall behind) is counted as dropped; refusals come back as
/// errors; neither node declares itself deaf and reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_across_two_nodes_is_delivered_refused_or_counted_never_lost_silently() {
    let redis = Redis::start().await;
    let url = redis.url();
    let a = Node::start_with(|c| {
        c.redis = Some(url.clone());
        lift_inbound_limits(c);
        c.redis_limits.queue_messages = 1000;
    })
    .await;
    let b = Node::start_with(|c| {
        c.redis = Some(url.clone());
        c.redis_limits.inbox_messages = 4;
    })
    .await;
    healthy(&[&a, &b]).await;
    let (passive, mut readers) = big_room(&a, &b).await;
    let mut flooder = a.client().await;
    send(&mut flooder, &subscribe("flood-sync")).await;
    redis.wait_numsub("big", 2).await;
    // Longer than the probe deadline (2 s): a flood that starved the probe would make the
    // node declare itself deaf and reconnect within it.
    let (count, refused) = flood(&mut flooder, Duration::from_secs(3)).await;
    let accepted = count - refused;
    let (seen, markers) = read_until_marker(&mut readers, &mut flooder).await;
    assert_eq!(seen[0], accepted, "node a lost accepted publishes");
    let (ha, hb) = (a.health().await, b.health().await);
    let dropped_b = hb["backplane_dropped"].as_u64().expect("dropped") as usize;
    // Every marker but the last one each reader saw may have been dropped on b as well.
    let b_total = seen[1] + dropped_b;
    assert!(
        (accepted..=accepted + markers).contains(&b_total),
        "b: {} delivered + {dropped_b} dropped for {accepted} accepted",
        seen[1]
    );
    // The metric also counts refused sync probes and end markers.
    let refused_metric = ha["backplane_refused"].as_u64().unwrap_or(0);
    assert!(
        refused_metric >= refused as u64,
        "{refused_metric} < {refused}"
    );
    for h in [&ha, &hb] {
        assert_eq!(h["backplane_connects"], 1, "a node reconnected: {h}");
        assert_eq!(h["backplane_failed"], 0, "{h}");
    }
    eprintln!("accepted {accepted}, refused {refused}, dropped on b {dropped_b}");
    drop(passive);
}

/// A publish that cannot fit the queue is refused at once with an error that names the room.
#[tokio::test]
async fn a_full_publish_queue_refuses_with_an_error_naming_the_room() {
    let redis = Redis::start().await;
    let url = redis.url();
    let node = Node::start_with(|c| {
        c.redis = Some(url);
        c.redis_limits.queue_bytes = 100;
    })
    .await;
    healthy(&[&node]).await;
    let mut ws = node.client().await;
    send(&mut ws, &send_message("lobby", &"x".repeat(200))).await;
    let reply = recv(&mut ws).await;
    assert_eq!(error_code(&reply), "backplane_unavailable");
    assert!(reply.contains("lobby"), "{reply}");
    assert_eq!(node.health().await["backplane_refused"], 1);
}

/// When this node's fan-out cannot keep up, messages from Redis are dropped here and counted,
/// never queued without bound.
#[tokio::test]
async fn the_bounded_inbox_drops_and_counts() {
    let redis = Redis::start().await;
    let url = redis.url();
    let node = Node::start_with(|c| {
        c.redis = Some(url);
        // Every message is bigger than this: all of them are dropped, deterministically.
        c.redis_limits.inbox_bytes = 10;
    })
    .await;
    healthy(&[&node]).await;
    let mut ws = node.client().await;
    send(&mut ws, &subscribe("r")).await;
    redis.wait_numsub("r", 1).await;
    for i in 0..5 {
        send(&mut ws, &send_message("r", &format!("message {i}"))).await;
    }
    node.wait_health("five drops counted", |h| h["backplane_dropped"] == 5)
        .await;
    silent(&mut ws, Duration::from_millis(100)).await;
}

#[tokio::test]
async fn room_names_in_the_reserved_namespace_are_refused() {
    let node = Node::start().await;
    let mut ws = node.client().await;
    for request in [
        subscribe("__roomcast"),
        join("__roomcast:probe:x"),
        send_message("__roomcast_anything", "hi"),
    ] {
        send(&mut ws, &request).await;
        let reply = recv(&mut ws).await;
        assert_eq!(error_code(&reply), "bad_field", "{request}");
        assert!(reply.contains("reserved"), "{reply}");
    }
    assert_eq!(node.health().await["rooms"], 0);
}

#[tokio::test]
async fn a_redis_with_a_password_is_joined_with_the_url_credentials() {
    let redis = Redis::start_with(&["--requirepass", "s3cret"]).await;
    let url = redis.url();
    assert!(url.contains(":s3cret@"), "{url}");
    let (a, b) = (
        Node::start_with(|c| c.redis = Some(url.clone())).await,
        Node::start_with(|c| c.redis = Some(url.clone())).await,
    );
    healthy(&[&a, &b]).await;
    let (mut a1, mut b1) = (a.client().await, b.client().await);
    send(&mut b1, &subscribe("auth")).await;
    redis.wait_numsub("auth", 1).await;
    send(&mut a1, &send_message("auth", "through")).await;
    assert_eq!(recv(&mut b1).await, "through");
}

#[tokio::test]
async fn livez_stays_up_while_redis_is_down_and_readyz_follows_the_backplane() {
    let mut redis = Redis::start().await;
    let url = redis.url();
    let node = Node::start_with(|c| c.redis = Some(url)).await;
    healthy(&[&node]).await;
    assert_eq!(node.get("/readyz").await.0, 200);
    redis.kill();
    node.wait_health("degraded", |h| h["status"] == "degraded")
        .await;
    assert_eq!(node.get("/livez").await.0, 200);
    assert_eq!(node.get("/readyz").await.0, 503);
    redis.spawn().await;
    healthy(&[&node]).await;
    assert_eq!(node.get("/readyz").await.0, 200);
}

#[tokio::test]
async fn per_address_caps_answer_429_and_believe_only_trusted_proxies() {
    let node = Node::start_with(|c| {
        c.addresses.max_connections_per_ip = 2;
        c.addresses.trusted_proxies = vec!["10.0.0.0/8".parse().expect("cidr")];
    })
    .await;
    let (s1, _, _c1) = try_upgrade(node.addr, "").await;
    let (s2, _, _c2) = try_upgrade(node.addr, "").await;
    let (s3, head, _) = try_upgrade(node.addr, "X-Forwarded-For: 192.0.2.1\r\n").await;
    assert_eq!((s1, s2, s3), (101, 101, 429), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 1"),
        "{head}"
    );
    // 127.0.0.1 is not a trusted proxy here, so its header is ignored: still the same address.
    let trusting = Node::start_with(|c| {
        c.addresses.max_connections_per_ip = 1;
        c.addresses.trusted_proxies = vec!["127.0.0.1".parse().expect("cidr")];
    })
    .await;
    let xff = |ip: &str| format!("X-Forwarded-For: {ip}\r\n");
    let (t1, _, _k1) = try_upgrade(trusting.addr, &xff("192.0.2.1")).await;
    let (t2, _, _k2) = try_upgrade(trusting.addr, &xff("192.0.2.2")).await;
    let (t3, _, _) = try_upgrade(trusting.addr, &xff("192.0.2.1")).await;
    assert_eq!((t1, t2, t3), (101, 101, 429));
    let metrics = trusting.get("/metrics").await.1;
    assert!(metrics.contains(r#"roomcast_connections_refused_total{reason="per_ip"} 1"#));
}

#[tokio::test]
async fn the_attempt_rate_per_address_answers_429() {
    let node = Node::start_with(|c| c.addresses.max_connect_rate_per_ip = 1).await;
    // A burst of two attempts, then one a second: the third at once is refused.
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(try_upgrade(node.addr, "").await.0);
    }
    assert_eq!(statuses, [101, 101, 429]);
    let metrics = node.get("/metrics").await.1;
    assert!(metrics.contains(r#"roomcast_connections_refused_total{reason="rate_per_ip"} 1"#));
}

#[tokio::test]
async fn handshakes_in_progress_are_capped() {
    let node = Node::start_with(|c| c.max_handshakes = 2).await;
    // Two connections that never send a request hold both handshake places.
    let _idle = [
        tokio::net::TcpStream::connect(node.addr)
            .await
            .expect("connect"),
        tokio::net::TcpStream::connect(node.addr)
            .await
            .expect("connect"),
    ];
    let (status, head, _) = try_upgrade(node.addr, "").await;
    assert_eq!(status, 503, "{head}");
}

#[tokio::test]
async fn rooms_per_node_are_capped_with_a_limit_error() {
    let node = Node::start_with(|c| c.max_rooms = 2).await;
    let mut ws = node.client().await;
    send(&mut ws, &subscribe("one")).await;
    send(&mut ws, &subscribe("two")).await;
    send(&mut ws, &subscribe("three")).await;
    let reply = recv(&mut ws).await;
    assert_eq!(error_code(&reply), "limit");
    assert_eq!(node.health().await["rooms"], 2);
}

#[tokio::test]
async fn a_draining_node_answers_503_and_is_not_ready() {
    let mut node = Node::start_with(|c| c.drain_timeout = Duration::from_secs(5)).await;
    // A client that ignores the close keeps the drain open for its timeout.
    let _stubborn = raw_upgrade(node.addr, "/").await;
    node.shutdown();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while node.get("/readyz").await.0 != 503 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never stopped being ready"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, head, _) = try_upgrade(node.addr, "").await;
    assert_eq!(status, 503, "{head}");
    assert!(head.to_ascii_lowercase().contains("retry-after"), "{head}");
}
