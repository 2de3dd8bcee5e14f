//! Several nodes on one Redis behave as one server. Each test starts its own redis-server on a
//! free port so it can kill and restart it.

mod common;

use std::time::Duration;

use common::redis::Redis;
use common::*;

async fn cluster(redis: &Redis) -> (Node, Node) {
    let url = redis.url();
    let a = Node::start_with(|c| c.redis = Some(url.clone())).await;
    let b = Node::start_with(|c| c.redis = Some(url)).await;
    for node in [&a, &b] {
        node.wait_health("backplane connected", |h| h["status"] == "ok")
            .await;
    }
    (a, b)
}

#[tokio::test]
async fn dialects_work_across_nodes_and_chat_skips_only_its_sender() {
    let redis = Redis::start().await;
    let (a, b) = cluster(&redis).await;
    let (mut a1, mut a2, mut b1, mut b2) = (
        a.client().await,
        a.client().await,
        b.client().await,
        b.client().await,
    );
    send(&mut a1, &join("red")).await;
    send(&mut a2, &subscribe("red")).await;
    send(&mut b1, &join("red")).await;
    send(&mut b2, &subscribe("red")).await;
    redis.wait_numsub("red", 2).await;

    send(&mut a1, &chat("from a1")).await;
    for ws in [&mut a2, &mut b1, &mut b2] {
        assert_eq!(recv(ws).await, "from a1");
    }
    send(&mut b2, &send_message("red", "from b2")).await;
    for ws in [&mut a1, &mut a2, &mut b1, &mut b2] {
        assert_eq!(recv(ws).await, "from b2");
    }
    send(&mut b1, &chat("from b1")).await;
    for ws in [&mut a1, &mut a2, &mut b2] {
        assert_eq!(recv(ws).await, "from b1");
    }
    // Neither chat sender heard itself: their next frame is their own sync echo.
    sync(&mut a1, "a1").await;
    sync(&mut b1, "b1").await;
}

#[tokio::test]
async fn concurrent_senders_on_both_nodes_give_every_member_one_order() {
    let redis = Redis::start().await;
    let (a, b) = cluster(&redis).await;
    let mut members = [
        a.client().await,
        a.client().await,
        b.client().await,
        b.client().await,
    ];
    for ws in members.iter_mut() {
        send(ws, &subscribe("order")).await;
    }
    redis.wait_numsub("order", 2).await;
    const EACH: usize = 300;
    let mut senders = Vec::new();
    for (tag, node) in [("a", &a), ("b", &b)] {
        let mut ws = node.client().await;
        senders.push(tokio::spawn(async move {
            for i in 0..EACH {
                send(&mut ws, &send_message("order", &format!("{tag}{i}"))).await;
            }
            ws
        }));
    }
    let mut orders = Vec::new();
    for ws in members.iter_mut() {
        let mut got = Vec::with_capacity(2 * EACH);
        for _ in 0..2 * EACH {
            got.push(recv(ws).await);
        }
        orders.push(got);
    }
    for sender in senders {
        sender.await.unwrap();
    }
    for other in &orders[1..] {
        assert_eq!(other, &orders[0], "members saw different orders");
    }
    for tag in ["a", "b"] {
        let seq: Vec<&String> = orders[0].iter().filter(|m| m.starts_with(tag)).collect();
        let want: Vec<String> = (0..EACH).map(|i| format!("{tag}{i}")).collect();
        assert_eq!(
            seq,
            want.iter().collect::<Vec<_>>(),
            "sender {tag} reordered"
        );
    }
}

#[tokio::test]
async fn one_subscription_per_node_with_members() {
    let redis = Redis::start().await;
    let (a, b) = cluster(&redis).await;
    assert_eq!(redis.numsub("room").await, 0);
    let mut a1 = a.client().await;
    send(&mut a1, &subscribe("room")).await;
    redis.wait_numsub("room", 1).await;
    // NUMSUB cannot see a second SUBSCRIBE on the same connection; Redis's call count can.
    let subscribes = redis.calls("subscribe").await;
    let mut a2 = a.client().await;
    send(&mut a2, &join("room")).await;
    sync(&mut a2, "a2").await;
    assert_eq!(
        redis.calls("subscribe").await,
        subscribes + 1,
        "a second local member made the node SUBSCRIBE again (the one call expected is for sync's own room)"
    );
    let mut b1 = b.client().await;
    send(&mut b1, &subscribe("room")).await;
    redis.wait_numsub("room", 2).await;
    send(&mut a1, &unsubscribe("room")).await;
    sync(&mut a1, "a1").await;
    assert_eq!(
        redis.numsub("room").await,
        2,
        "a node with a member left unsubscribed"
    );
    drop(a2);
    redis.wait_numsub("room", 1).await;
    send(&mut b1, &leave("room")).await;
    redis.wait_numsub("room", 0).await;
}

#[tokio::test]
async fn a_raw_publish_in_the_original_format_reaches_every_member() {
    let redis = Redis::start().await;
    let (a, b) = cluster(&redis).await;
    let (mut a1, mut b1) = (a.client().await, b.client().await);
    send(&mut a1, &subscribe("room")).await;
    send(&mut b1, &join("room")).await;
    redis.wait_numsub("room", 2).await;
    redis
        .command(&[
            "PUBLISH",
            "room",
            r#"{"type":"sendMessage","roomId":"room","message":"x"}"#,
        ])
        .await;
    assert_eq!(recv(&mut a1).await, "x");
    assert_eq!(recv(&mut b1).await, "x");
}

/// Sends from `from` until `to` hears it; during an outage `from` gets backplane_unavailable.
async fn round_trip(from: &mut Ws, to: &mut Ws, room: &str) {
    send(from, &send_message(room, "back")).await;
    assert_eq!(recv(to).await, "back");
}

async fn outage_then_recovery(redis: &mut Redis, restart: bool) {
    let (a, b) = cluster(redis).await;
    let (mut a1, mut b1) = (a.client().await, b.client().await);
    send(&mut a1, &subscribe("live")).await;
    send(&mut b1, &subscribe("live")).await;
    redis.wait_numsub("live", 2).await;
    round_trip(&mut a1, &mut b1, "live").await;
    assert_eq!(recv(&mut a1).await, "back");

    if restart {
        redis.kill();
        for node in [&a, &b] {
            node.wait_health("degraded", |h| h["status"] == "degraded")
                .await;
        }
        assert_eq!(a.get("/healthz").await.0, 503);
        send(&mut a1, &send_message("live", "lost")).await;
        assert_eq!(error_code(&recv(&mut a1).await), "backplane_unavailable");
        redis.spawn().await;
    } else {
        redis.command(&["CLIENT", "KILL", "TYPE", "pubsub"]).await;
    }
    let back = tokio::time::Instant::now();
    // Healthy *again*: the link came up a second time (a plain "ok" could be read before the
    // node has even noticed the kill).
    for node in [&a, &b] {
        node.wait_health("reconnected and healthy", |h| {
            h["status"] == "ok" && h["backplane_connects"] == 2
        })
        .await;
    }
    redis.wait_numsub("live", 2).await;
    round_trip(&mut b1, &mut a1, "live").await;
    assert_eq!(recv(&mut b1).await, "back");
    eprintln!(
        "deliveries flowed again {:?} after Redis returned",
        back.elapsed()
    );
    for node in [&a, &b] {
        let h = node.health().await;
        assert_eq!(h["connections"], 1, "a client was disconnected: {h}");
    }
}

#[tokio::test]
async fn redis_restart_degrades_then_recovers_without_dropping_clients() {
    let mut redis = Redis::start().await;
    outage_then_recovery(&mut redis, true).await;
}

#[tokio::test]
async fn killed_subscriber_connections_are_replaced() {
    let mut redis = Redis::start().await;
    outage_then_recovery(&mut redis, false).await;
}

/// Messages from Redis to a room larger than one slice: the inbox serves each a slice at a
/// time and still delivers every message to every member, in the order Redis gave them.
#[tokio::test]
async fn sliced_delivery_from_redis_keeps_the_order() {
    let redis = Redis::start().await;
    let url = redis.url();
    let sliced = |c: &mut roomcast::Config| {
        c.redis = Some(url.clone());
        c.fanout_slice = 1;
        lift_inbound_limits(c);
    };
    let a = Node::start_with(sliced).await;
    let b = Node::start_with(sliced).await;
    for node in [&a, &b] {
        node.wait_health("backplane connected", |h| h["status"] == "ok")
            .await;
    }
    let mut members = Vec::new();
    for _ in 0..40 {
        let mut ws = b.client().await;
        send(&mut ws, &subscribe("wide")).await;
        members.push(ws);
    }
    for (i, ws) in members.iter_mut().enumerate() {
        sync(ws, &format!("w{i}")).await;
    }
    redis.wait_numsub("wide", 1).await;
    let mut sender = a.client().await;
    for i in 0..10 {
        send(&mut sender, &send_message("wide", &format!("n{i}"))).await;
    }
    for (m, ws) in members.iter_mut().enumerate() {
        for i in 0..10 {
            assert_eq!(recv(ws).await, format!("n{i}"), "member {m}");
        }
    }
    let yields = b.health().await["fanout_yields"].as_u64();
    assert!(
        yields >= Some(10),
        "40 members are three slices per message: {yields:?}"
    );
}

/// Two nodes with history on one Redis.
async fn history_cluster(redis: &Redis) -> (Node, Node) {
    history_cluster_with(redis, |_| {}).await
}

/// Two nodes with history on one Redis; `tweak_b` runs on the second node's config only.
async fn history_cluster_with(
    redis: &Redis,
    tweak_b: impl FnOnce(&mut roomcast::Config),
) -> (Node, Node) {
    let url = redis.url();
    let with_history = |config: &mut roomcast::Config| {
        config.redis = Some(url.clone());
        config.history.size = 1000;
        lift_inbound_limits(config);
    };
    let a = Node::start_with(with_history).await;
    let b = Node::start_with(|config| {
        with_history(config);
        tweak_b(config);
    })
    .await;
    for node in [&a, &b] {
        node.wait_health("backplane connected", |h| h["status"] == "ok")
            .await;
    }
    (a, b)
}

/// Kills Redis, waits until both nodes have noticed, starts it again (with whatever data
/// its flags keep) and waits until both are connected for the second time.
async fn restart_redis(redis: &mut Redis, nodes: [&Node; 2]) {
    redis.kill();
    for node in nodes {
        node.wait_health("degraded", |h| h["status"] == "degraded")
            .await;
    }
    redis.spawn().await;
    for node in nodes {
        node.wait_health("reconnected", |h| {
            h["status"] == "ok" && h["backplane_connects"] == 2
        })
        .await;
    }
}

/// One envelope client on each node, both in room `h` and Redis subscribed for it on both.
async fn members_in_h(redis: &Redis, a: &Node, b: &Node) -> (Ws, Ws) {
    let (mut on_a, mut on_b) = (a.envelope_client().await, b.envelope_client().await);
    for ws in [&mut on_a, &mut on_b] {
        send(ws, &subscribe("h")).await;
        assert_eq!(recv_json(ws).await["type"], "subscribed");
    }
    redis.wait_numsub("h", 2).await;
    (on_a, on_b)
}

/// Envelopes until `n` have arrived: (offset, epoch, message) each.
async fn envelopes(ws: &mut Ws, n: usize) -> Vec<(u64, String, String)> {
    let mut got = Vec::new();
    while got.len() < n {
        let v = recv_json(ws).await;
        assert_eq!(v["type"], "message", "{v}");
        let offset = v["offset"]
            .as_u64()
            .unwrap_or_else(|| panic!("no offset: {v}"));
        let epoch = v["epoch"].as_str().expect("epoch").to_owned();
        got.push((
            offset,
            epoch,
            v["message"].as_str().expect("text").to_owned(),
        ));
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_history_two_nodes_publishing_into_one_room_give_one_offset_sequence() {
    const EACH: usize = 100;
    let redis = Redis::start().await;
    let (a, b) = history_cluster(&redis).await;
    let (mut on_a, mut on_b) = members_in_h(&redis, &a, &b).await;
    let mut senders = Vec::new();
    for (name, node) in [("a", &a), ("b", &b)] {
        let mut ws = node.client().await;
        senders.push(tokio::spawn(async move {
            for n in 0..EACH {
                send(&mut ws, &send_message("h", &format!("{name}:{n}"))).await;
            }
            ws
        }));
    }
    let seen_a = envelopes(&mut on_a, 2 * EACH).await;
    let seen_b = envelopes(&mut on_b, 2 * EACH).await;
    let offsets: Vec<u64> = seen_a.iter().map(|(o, ..)| *o).collect();
    assert_eq!(
        offsets,
        (1..=2 * EACH as u64).collect::<Vec<_>>(),
        "one sequence, no gap"
    );
    assert_eq!(
        seen_a, seen_b,
        "both nodes' members see the same messages at the same offsets"
    );
    for sender in senders {
        sender.await.expect("sender");
    }
    assert_eq!(a.health().await["history_gaps"], 0);
}

#[tokio::test]
async fn with_history_a_client_dropped_on_one_node_resumes_on_the_other() {
    let redis = Redis::start().await;
    let (a, b) = history_cluster(&redis).await;
    let (mut leaving, mut staying) = members_in_h(&redis, &a, &b).await;
    let mut sender = a.client().await;
    for n in 1..=10 {
        send(&mut sender, &send_message("h", &n.to_string())).await;
    }
    let first = envelopes(&mut leaving, 5).await;
    let (last, epoch, _) = first.last().expect("five").clone();
    drop(leaving);
    for n in 11..=20 {
        send(&mut sender, &send_message("h", &n.to_string())).await;
    }
    // Node B has them all (its member got them), so it can serve the resume.
    assert_eq!(envelopes(&mut staying, 20).await.len(), 20);

    let mut back = b.envelope_client().await;
    let since = serde_json::json!({"type": "SUBSCRIBE", "room": "h", "since": {"offset": last, "epoch": epoch}});
    send(&mut back, &since.to_string()).await;
    let replayed = envelopes(&mut back, 15).await;
    let offsets: Vec<u64> = replayed.iter().map(|(o, ..)| *o).collect();
    assert_eq!(offsets, (6..=20).collect::<Vec<_>>());
    let answer = recv_json(&mut back).await;
    assert_eq!(
        (answer["type"].as_str(), answer["recovered"].as_bool()),
        (Some("subscribed"), Some(true))
    );
    assert_eq!(answer["offset"], 20);
    send(&mut sender, &send_message("h", "21")).await;
    assert_eq!(envelopes(&mut back, 1).await[0].0, 21, "then live");
}

/// Redis restarts without its data (`--save ""`) in the middle of a room's stream: the
/// offsets start again in a new epoch, and every envelope member is told with a `gap`
/// notice before the first message of it; a resume from the old epoch is not recovered.
#[tokio::test]
async fn with_history_a_redis_restart_without_data_is_announced_as_a_gap() {
    let mut redis = Redis::start().await;
    let (a, b) = history_cluster(&redis).await;
    let (mut on_a, mut on_b) = members_in_h(&redis, &a, &b).await;
    let mut sender = a.client().await;
    for n in 1..=5 {
        send(&mut sender, &send_message("h", &n.to_string())).await;
    }
    let before = envelopes(&mut on_a, 5).await;
    assert_eq!(envelopes(&mut on_b, 5).await, before);
    let old_epoch = before[0].1.clone();

    restart_redis(&mut redis, [&a, &b]).await;
    redis.wait_numsub("h", 2).await;
    send(&mut sender, &send_message("h", "after")).await;
    for ws in [&mut on_a, &mut on_b] {
        assert_eq!(
            recv_json(ws).await,
            serde_json::json!({"type": "gap", "room": "h"}),
            "the gap is announced before the first message of the new epoch"
        );
        let (offset, epoch, message) = envelopes(ws, 1).await.remove(0);
        assert_eq!((offset, message.as_str()), (1, "after"));
        assert_ne!(epoch, old_epoch, "a new epoch");
    }
    assert_eq!(a.health().await["history_gaps"], 1);

    let mut back = b.envelope_client().await;
    let since = serde_json::json!({"type": "SUBSCRIBE", "room": "h", "since": {"offset": 5, "epoch": old_epoch}});
    send(&mut back, &since.to_string()).await;
    let answer = recv_json(&mut back).await;
    assert_eq!(answer["recovered"], false, "{answer}");
    assert_eq!(answer["offset"], 1);
}

/// Node B has never had a member in the room, so its log holds nothing of it: the resume reads
/// the room's Redis stream (after pinning the room, so nothing published meanwhile is missed)
/// and is recovered; then live messages follow.
#[tokio::test]
async fn with_history_a_resume_on_a_node_without_the_room_is_served_from_the_redis_stream() {
    let redis = Redis::start().await;
    let (a, b) = history_cluster(&redis).await;
    let mut leaving = a.envelope_client().await;
    send(&mut leaving, &subscribe("s")).await;
    recv_json(&mut leaving).await;
    redis.wait_numsub("s", 1).await;
    let mut sender = a.client().await;
    for n in 1..=10 {
        send(&mut sender, &send_message("s", &n.to_string())).await;
    }
    let first = envelopes(&mut leaving, 4).await;
    let (last, epoch, _) = first.last().expect("four").clone();
    assert_eq!(last, 4);
    // Everything is published before the resume (the sender hears its own tenth message).
    let mut own = a.client().await;
    send(&mut own, &subscribe("s")).await;
    send(&mut own, &send_message("s", "11")).await;
    assert_eq!(recv(&mut own).await, "11");
    drop(leaving);

    let mut back = b.envelope_client().await;
    let since = serde_json::json!({"type": "SUBSCRIBE", "room": "s", "since": {"offset": last, "epoch": epoch}});
    send(&mut back, &since.to_string()).await;
    let replayed = envelopes(&mut back, 7).await;
    let offsets: Vec<u64> = replayed.iter().map(|(o, ..)| *o).collect();
    assert_eq!(offsets, (5..=11).collect::<Vec<_>>());
    let answer = recv_json(&mut back).await;
    assert_eq!(answer["recovered"], true, "{answer}");
    assert_eq!(answer["offset"], 11);
    send(&mut sender, &send_message("s", "12")).await;
    let live = envelopes(&mut back, 1).await;
    assert_eq!((live[0].0, live[0].2.as_str()), (12, "12"), "then live");
    assert_eq!(b.health().await["resumes_recovered"], 1);
}

/// Node B's inbox holds one message, so a burst from Redis overflows it and B drops messages
/// on the way in. The next message that arrives shows the gap, and B fills it from the room's
/// stream before delivering: its member sees every offset once, in order, and no gap notice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_history_messages_a_node_dropped_are_repaired_from_the_stream() {
    let redis = Redis::start().await;
    let (a, b) = history_cluster_with(&redis, |c| c.redis_limits.inbox_messages = 1).await;
    let (mut sender, mut on_b) = members_in_h(&redis, &a, &b).await;
    let reader = tokio::spawn(async move {
        let mut offsets = Vec::new();
        loop {
            // A `gap` notice fails here: the repair must leave nothing to announce.
            let (offset, _, message) = envelopes(&mut on_b, 1).await.remove(0);
            offsets.push(offset);
            if message.starts_with("end") {
                return offsets;
            }
        }
    });
    let mut sent = 0;
    for burst in 0..50 {
        for n in 0..100 {
            send(&mut sender, &send_message("h", &format!("{burst}:{n}"))).await;
        }
        sent += 100;
        // The sender is a member too: its last message back means Redis published them all.
        let echoed = envelopes(&mut sender, 100).await;
        assert_eq!(echoed.last().map(|e| e.0), Some(sent));
        if b.health().await["backplane_dropped"].as_u64() > Some(0) {
            break;
        }
    }
    assert!(
        b.health().await["backplane_dropped"].as_u64() > Some(0),
        "a one-message inbox must drop some of a burst"
    );
    // The gap shows when the next message arrives; one arriving while B is still busy may be
    // dropped too, so the marker is sent until B's member has one.
    let mut reader = reader;
    let offsets = loop {
        sent += 1;
        send(&mut sender, &send_message("h", &format!("end{sent}"))).await;
        assert_eq!(envelopes(&mut sender, 1).await[0].0, sent);
        if let Ok(done) = tokio::time::timeout(Duration::from_millis(200), &mut reader).await {
            break done.expect("reader");
        }
    };
    let last = *offsets.last().expect("at least the marker");
    assert_eq!(
        offsets,
        (1..=last).collect::<Vec<_>>(),
        "every offset once, in order"
    );
    let health = b.health().await;
    assert!(health["history_repaired"].as_u64() > Some(0), "{health}");
    assert!(
        health["history_stream_reads"].as_u64() > Some(0),
        "{health}"
    );
    assert_eq!(health["history_gaps"], 0, "nothing left to announce");
}

/// A client in room `room` on node `a` receives four of ten messages and leaves; a client on
/// `b`, which has never had the room, resumes from the fourth. Returns the `subscribed` answer
/// (the replay before it, if any, is checked to be offsets 5 to 11).
async fn resume_where_the_room_never_was(
    a: &Node,
    b: &Node,
    redis: &Redis,
    room: &str,
) -> serde_json::Value {
    let mut leaving = a.envelope_client().await;
    send(&mut leaving, &subscribe(room)).await;
    recv_json(&mut leaving).await;
    redis.wait_numsub(room, 1).await;
    let mut sender = a.envelope_client().await;
    send(&mut sender, &subscribe(room)).await;
    recv_json(&mut sender).await;
    for n in 1..=11 {
        send(&mut sender, &send_message(room, &n.to_string())).await;
    }
    // Everything is published before the resume: the sender has its own eleventh message.
    assert_eq!(envelopes(&mut sender, 11).await[10].0, 11);
    let (last, epoch, _) = envelopes(&mut leaving, 4).await.remove(3);
    drop(leaving);

    let mut back = b.envelope_client().await;
    let since = serde_json::json!({"type": "SUBSCRIBE", "room": room, "since": {"offset": last, "epoch": epoch}});
    send(&mut back, &since.to_string()).await;
    let mut offsets = Vec::new();
    loop {
        let v = recv_json(&mut back).await;
        if v["type"] == "subscribed" {
            if v["recovered"] == true {
                assert_eq!(offsets, (5..=11).collect::<Vec<_>>());
            }
            return v;
        }
        offsets.push(v["offset"].as_u64().expect("a replayed message"));
    }
}

/// `--redis-history-reads` bounds the stream reads resumes cause: at 0, a resume that needs one
/// is answered `recovered: false` at once and counted.
#[tokio::test]
async fn with_history_a_resume_past_the_stream_read_bound_is_not_recovered() {
    let redis = Redis::start().await;
    let (a, b) = history_cluster_with(&redis, |c| c.redis_limits.history_reads = 0).await;
    let answer = resume_where_the_room_never_was(&a, &b, &redis, "s").await;
    assert_eq!(answer["recovered"], false, "{answer}");
    let health = b.health().await;
    assert_eq!(health["history_stream_reads_refused"], 1, "{health}");
    assert_eq!(health["history_stream_reads"], 0, "{health}");
}

/// A read's place is given back when it is answered: with room for one read, two resumes one
/// after the other both read the stream and are recovered.
#[tokio::test]
async fn with_history_a_stream_read_gives_its_place_back() {
    let redis = Redis::start().await;
    let (a, b) = history_cluster_with(&redis, |c| c.redis_limits.history_reads = 1).await;
    for room in ["s1", "s2"] {
        let answer = resume_where_the_room_never_was(&a, &b, &redis, room).await;
        assert_eq!(answer["recovered"], true, "{room}: {answer}");
    }
    let health = b.health().await;
    assert_eq!(health["history_stream_reads"], 2, "{health}");
    assert_eq!(health["history_stream_reads_refused"], 0, "{health}");
}

/// What one member saw across a Redis restart: deliveries (offset, epoch) and gap notices.
#[derive(Debug)]
enum Seen {
    Message(u64, String),
    Gap,
}

/// Reads until `after_restart` messages of an epoch other than the first have arrived.
async fn watch_across_a_restart(mut ws: Ws, after_restart: usize) -> Vec<Seen> {
    let mut seen = Vec::new();
    let mut first_epoch: Option<String> = None;
    let mut later = 0;
    while later < after_restart {
        let v = recv_json(&mut ws).await;
        match v["type"].as_str() {
            Some("gap") => seen.push(Seen::Gap),
            Some("message") => {
                let offset = v["offset"].as_u64().expect("offset");
                let epoch = v["epoch"].as_str().expect("epoch").to_owned();
                let first = first_epoch.get_or_insert_with(|| epoch.clone());
                later += usize::from(*first != epoch);
                seen.push(Seen::Message(offset, epoch));
            }
            _ => panic!("unexpected {v}"),
        }
    }
    seen
}

/// Redis is killed and restarted without its data while a sender publishes steadily: every
/// envelope member either receives each next offset or is told `gap` before the first message
/// that does not follow; never a silent hole. Sends during the outage are refused to the
/// sender, not lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_history_a_redis_restart_mid_stream_leaves_no_silent_hole() {
    let mut redis = Redis::start().await;
    let (a, b) = history_cluster(&redis).await;
    let (on_a, on_b) = members_in_h(&redis, &a, &b).await;
    let watchers = [on_a, on_b].map(|ws| tokio::spawn(watch_across_a_restart(ws, 20)));
    let mut sender = a.client().await;
    let publishing = tokio::spawn(async move {
        for n in 0u64.. {
            send(&mut sender, &send_message("h", &n.to_string())).await;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    a.wait_health("publishing", |h| h["deliveries"].as_u64() > Some(40))
        .await;
    redis.kill();
    a.wait_health("degraded", |h| h["status"] == "degraded")
        .await;
    redis.spawn().await;
    for watcher in watchers {
        let seen = watcher.await.expect("watcher");
        let mut last: Option<(u64, &str)> = None;
        let mut announced = false;
        for item in &seen {
            match item {
                Seen::Gap => announced = true,
                Seen::Message(offset, epoch) => {
                    let follows = last.is_none_or(|(o, e)| *offset == o + 1 && epoch == e);
                    assert!(
                        follows || announced,
                        "offset {offset} of {epoch} after {last:?} without a gap notice"
                    );
                    last = Some((*offset, epoch));
                    announced = false;
                }
            }
        }
        assert!(
            seen.iter().any(|s| matches!(s, Seen::Gap)),
            "the restart lost the room's history: announced"
        );
    }
    publishing.abort();
}

/// A Redis with persistence (`appendonly`, fsync on every write) comes back with its data:
/// the room keeps its epoch, a resume from before the restart is recovered from the restored
/// stream on a node that never had the room, and offsets continue.
#[tokio::test]
async fn with_history_a_redis_restart_with_persistence_keeps_the_epoch_and_resumes() {
    let dir = std::env::temp_dir().join(format!(
        "roomcast-aof-{}-{:?}",
        std::process::id(),
        std::time::SystemTime::now()
    ));
    std::fs::create_dir_all(&dir).expect("a directory for the append-only file");
    let dir_arg = dir.to_str().expect("utf-8 temp path").to_owned();
    let mut redis = Redis::start_with(&[
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--dir",
        &dir_arg,
    ])
    .await;
    let (a, b) = history_cluster(&redis).await;
    let mut sender = a.envelope_client().await;
    send(&mut sender, &subscribe("p")).await;
    recv_json(&mut sender).await;
    redis.wait_numsub("p", 1).await;
    for n in 1..=5 {
        send(&mut sender, &send_message("p", &n.to_string())).await;
    }
    let before = envelopes(&mut sender, 5).await;
    let epoch = before[0].1.clone();

    restart_redis(&mut redis, [&a, &b]).await;
    let mut back = b.envelope_client().await;
    let since = serde_json::json!({"type": "SUBSCRIBE", "room": "p", "since": {"offset": 2, "epoch": epoch}});
    send(&mut back, &since.to_string()).await;
    let replayed = envelopes(&mut back, 3).await;
    assert_eq!(
        replayed,
        before[2..].to_vec(),
        "3 to 5, restored from the file"
    );
    let answer = recv_json(&mut back).await;
    assert_eq!(answer["recovered"], true, "{answer}");
    send(&mut sender, &send_message("p", "6")).await;
    let (offset, same, _) = envelopes(&mut back, 1).await.remove(0);
    assert_eq!(
        (offset, same),
        (6, epoch),
        "offsets continue in the same epoch"
    );
    redis.kill();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A plain join on a node that has never had the room still learns where the room is: the
/// node reads the stream's newest entry, so `subscribed` carries the room's offset and epoch,
/// and a member that drops before its first delivery can resume from there, on any node.
#[tokio::test]
async fn with_history_a_plain_join_where_the_room_never_was_is_told_its_position() {
    let redis = Redis::start().await;
    let (a, b) = history_cluster(&redis).await;
    let mut sender = a.envelope_client().await;
    send(&mut sender, &subscribe("q")).await;
    recv_json(&mut sender).await;
    redis.wait_numsub("q", 1).await;
    for n in 1..=3 {
        send(&mut sender, &send_message("q", &n.to_string())).await;
    }
    let (_, epoch, _) = envelopes(&mut sender, 3).await.remove(2);

    let mut joiner = b.envelope_client().await;
    send(&mut joiner, &subscribe("q")).await;
    let answer = recv_json(&mut joiner).await;
    assert_eq!(answer["type"], "subscribed", "{answer}");
    assert_eq!(
        (answer["offset"].as_u64(), answer["epoch"].as_str()),
        (Some(3), Some(epoch.as_str())),
        "{answer}"
    );
    assert!(
        answer.get("recovered").is_none(),
        "a plain join is not a resume: {answer}"
    );
    drop(joiner);

    // Published while it is away; it resumes from the position its join was told, on a.
    redis.wait_numsub("q", 1).await;
    for n in 4..=5 {
        send(&mut sender, &send_message("q", &n.to_string())).await;
    }
    assert_eq!(envelopes(&mut sender, 2).await[1].0, 5);
    let mut back = a.envelope_client().await;
    let since = serde_json::json!({"type": "SUBSCRIBE", "room": "q", "since": {"offset": 3, "epoch": epoch}});
    send(&mut back, &since.to_string()).await;
    let replayed: Vec<u64> = envelopes(&mut back, 2).await.iter().map(|e| e.0).collect();
    assert_eq!(replayed, [4, 5]);
    assert_eq!(recv_json(&mut back).await["recovered"], true);
}
