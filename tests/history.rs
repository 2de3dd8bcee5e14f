//! History, offsets and resume on one node (`--history-size`): envelope deliveries carry
//! offsets, joins and acks say where the room is, and a client that comes back with `since`
//! gets what it missed, then live messages, without a gap or a duplicate.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use common::*;
use roomcast::Config;
use serde_json::{json, Value};
use tokio::sync::Barrier;

fn history(size: usize) -> impl FnOnce(&mut Config) {
    move |config: &mut Config| {
        config.history.size = size;
        lift_inbound_limits(config);
    }
}

fn subscribe_since(room: &str, offset: u64, epoch: &str) -> String {
    json!({"type": "SUBSCRIBE", "room": room, "since": {"offset": offset, "epoch": epoch}})
        .to_string()
}

/// Reads envelopes until the `subscribed` answer: returns the replayed ones and the answer.
async fn until_subscribed(ws: &mut Ws) -> (Vec<Value>, Value) {
    let mut replayed = Vec::new();
    loop {
        let v = recv_json(ws).await;
        match v["type"].as_str() {
            Some("message") => replayed.push(v),
            Some("subscribed") => return (replayed, v),
            _ => panic!("unexpected frame while resuming: {v}"),
        }
    }
}

fn offset(v: &Value) -> u64 {
    v["offset"]
        .as_u64()
        .unwrap_or_else(|| panic!("no offset in {v}"))
}

#[tokio::test]
async fn offsets_count_up_and_joins_and_acks_say_where_the_room_is() {
    let node = Node::start_with(history(100)).await;
    let mut env = node.envelope_client().await;
    let mut bare = node.client().await;
    send(&mut env, &subscribe("r")).await;
    let answer = recv_json(&mut env).await;
    assert_eq!(answer["type"], "subscribed");
    assert_eq!(answer["offset"], 0, "nothing published yet");
    let epoch = answer["epoch"].as_str().expect("an epoch").to_owned();
    send(&mut bare, &subscribe("r")).await;
    sync(&mut bare, "bare").await;

    for n in 1..=3u64 {
        let send_json = json!({"type": "sendMessage", "roomId": "r", "message": format!("m{n}"), "id": format!("i{n}")});
        send(&mut env, &send_json.to_string()).await;
        assert_eq!(
            recv_json(&mut env).await,
            json!({"type": "message", "room": "r", "message": format!("m{n}"), "offset": n, "epoch": epoch})
        );
        assert_eq!(
            recv_json(&mut env).await,
            json!({"type": "ack", "id": format!("i{n}"), "offset": n})
        );
        assert_eq!(
            recv(&mut bare).await,
            format!("m{n}"),
            "version 1 clients see the bare string"
        );
    }
    // A second join says where the room is now.
    let mut late = node.envelope_client().await;
    send(&mut late, &join("r")).await;
    let answer = recv_json(&mut late).await;
    assert_eq!(
        (answer["offset"].as_u64(), answer["epoch"].as_str()),
        (Some(3), Some(epoch.as_str()))
    );
}

/// Several senders on a multi-thread runtime; the resumer drops mid-stream and comes back with
/// its last offset while a second burst is being published. Across both connections it must
/// see every offset exactly once, in order, and each sender's messages in the order sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_drops_mid_stream_resumes_without_gap_or_duplicate() {
    const SENDERS: usize = 3;
    const FIRST: usize = 300;
    const SECOND: usize = 200;
    let node = Node::start_with(history(10_000)).await;
    let mut first = node.envelope_client().await;
    send(&mut first, &subscribe("live")).await;
    let epoch = recv_json(&mut first).await["epoch"]
        .as_str()
        .expect("epoch")
        .to_owned();

    // Barriers, not sleeps: the first burst is all published before the resume starts, and
    // the second is published while it runs.
    let first_done = Arc::new(Barrier::new(SENDERS + 1));
    let go = Arc::new(Barrier::new(SENDERS + 1));
    let mut senders = Vec::new();
    for s in 0..SENDERS {
        let ws = node.client().await;
        let barriers = (Arc::clone(&first_done), Arc::clone(&go));
        senders.push(tokio::spawn(two_bursts(ws, s, (FIRST, SECOND), barriers)));
    }
    let mut seen: Vec<(u64, String)> = Vec::new();
    while seen.len() < 100 {
        let v = recv_json(&mut first).await;
        take(&v, &mut seen);
    }
    drop(first);
    let last = seen.last().expect("some").0;
    first_done.wait().await;

    let mut again = node.envelope_client().await;
    go.wait().await;
    send(&mut again, &subscribe_since("live", last, &epoch)).await;
    let (replayed, answer) = until_subscribed(&mut again).await;
    assert_eq!(answer["recovered"], true, "{answer}");
    let latest = offset(&answer);
    assert!(
        replayed.len() >= SENDERS * FIRST - 100,
        "the first burst is replayed"
    );
    for v in &replayed {
        assert!(
            offset(v) <= latest,
            "a replayed message is at or before the answer's offset"
        );
        take(v, &mut seen);
    }
    for sender in senders {
        sender.await.expect("sender");
    }
    // One more, certainly after the switch to live.
    let mut last_word = node.client().await;
    send(&mut last_word, &send_message("live", "end:0")).await;
    let total = (SENDERS * (FIRST + SECOND)) as u64 + 1;
    while (seen.len() as u64) < total {
        let v = recv_json(&mut again).await;
        assert!(offset(&v) > latest, "live messages come after the answer");
        take(&v, &mut seen);
    }
    assert_every_offset_once_in_sender_order(&seen, total);
}

/// Sends `sender:n` messages to room `live`: the first burst, then waits at both barriers,
/// then the second.
async fn two_bursts(
    mut ws: Ws,
    s: usize,
    (first, second): (usize, usize),
    (first_done, go): (Arc<Barrier>, Arc<Barrier>),
) {
    for n in 0..first + second {
        if n == first {
            sync(&mut ws, &format!("sender-{s}")).await;
            first_done.wait().await;
            go.wait().await;
        }
        send(&mut ws, &send_message("live", &format!("{s}:{n}"))).await;
    }
    sync(&mut ws, &format!("sender-{s}-end")).await;
}

fn take(v: &Value, seen: &mut Vec<(u64, String)>) {
    seen.push((offset(v), v["message"].as_str().expect("text").to_owned()));
}

fn assert_every_offset_once_in_sender_order(seen: &[(u64, String)], total: u64) {
    let offsets: Vec<u64> = seen.iter().map(|(o, _)| *o).collect();
    assert_eq!(
        offsets,
        (1..=total).collect::<Vec<_>>(),
        "every offset once, in order"
    );
    let mut next: HashMap<String, usize> = HashMap::new();
    for (_, text) in seen {
        let (sender, n) = text.split_once(':').expect("s:n");
        let expected = next.entry(sender.to_owned()).or_default();
        let n: usize = n.parse().expect("n");
        assert_eq!(n, *expected, "sender {sender} out of order");
        *expected += 1;
    }
}

#[tokio::test]
async fn a_position_the_history_no_longer_holds_or_another_epoch_is_not_recovered() {
    let node = Node::start_with(history(5)).await;
    let mut sender = node.client().await;
    for n in 1..=20 {
        send(&mut sender, &send_message("r", &n.to_string())).await;
    }
    sync(&mut sender, "sender").await;
    let mut probe = node.envelope_client().await;
    send(&mut probe, &subscribe("probe-room")).await;
    recv_json(&mut probe).await;
    send(&mut probe, &subscribe("r")).await;
    let epoch = recv_json(&mut probe).await["epoch"]
        .as_str()
        .expect("epoch")
        .to_owned();

    for (i, (since, why)) in [
        (
            subscribe_since("r", 2, &epoch),
            "offset 3 was pushed out by size 5",
        ),
        (subscribe_since("r", 18, "not-the-epoch"), "another epoch"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut ws = node.envelope_client().await;
        send(&mut ws, &since).await;
        let (replayed, answer) = until_subscribed(&mut ws).await;
        assert!(replayed.is_empty(), "{why}: nothing replayed");
        assert_eq!(answer["recovered"], false, "{why}");
        assert_eq!(answer["offset"], 20 + i, "each round published one more");
        send(&mut sender, &send_message("r", "after")).await;
        let v = recv_json(&mut ws).await;
        assert_eq!(v["message"], "after", "{why}: live after the answer");
    }
    // The same through dialect 1's payload, from a position still held: 18..=22 replayed.
    let mut ws = node.envelope_client().await;
    let join_since = json!({"type": "join", "payload": {"roomId": "r", "since": {"offset": 17, "epoch": epoch}}});
    send(&mut ws, &join_since.to_string()).await;
    let (replayed, answer) = until_subscribed(&mut ws).await;
    assert_eq!(answer["recovered"], true);
    let offsets: Vec<u64> = replayed.iter().map(offset).collect();
    assert_eq!(offsets, [18, 19, 20, 21, 22]);
}

/// The whole history replayed into a client whose outbox holds 16 frames: the replay is
/// paced by the outbox, so the client is not taken for a slow consumer.
#[tokio::test]
async fn replaying_a_long_history_into_a_small_outbox_does_not_close_the_client() {
    let node = Node::start_with(|config| {
        history(1000)(config);
        config.outbox_frames = 16;
        config.outbox_bytes = 16 * 1024;
        config.max_message_bytes = 1024;
    })
    .await;
    let mut sender = node.client().await;
    let text = "x".repeat(200);
    for _ in 0..1000 {
        send(&mut sender, &send_message("big", &text)).await;
    }
    sync(&mut sender, "sender").await;
    let mut probe = node.envelope_client().await;
    send(&mut probe, &subscribe("big")).await;
    let answer = recv_json(&mut probe).await;
    assert_eq!(answer["offset"], 1000);
    let epoch = answer["epoch"].as_str().expect("epoch").to_owned();

    let mut ws = node.envelope_client().await;
    send(&mut ws, &subscribe_since("big", 0, &epoch)).await;
    let (replayed, answer) = until_subscribed(&mut ws).await;
    assert_eq!(answer["recovered"], true);
    assert_eq!(replayed.len(), 1000);
    assert!(replayed
        .iter()
        .enumerate()
        .all(|(i, v)| offset(v) == i as u64 + 1));
    assert_eq!(node.health().await["slow_consumers_closed"], 0);
    // Still open: it answers.
    send(&mut ws, &subscribe("other")).await;
    assert_eq!(recv_json(&mut ws).await["type"], "subscribed");
}

#[tokio::test]
async fn the_history_api_reads_a_room() {
    let node = Node::start_with(history(100)).await;
    let mut sender = node.client().await;
    for n in 1..=5 {
        send(&mut sender, &send_message("a b", &format!("m{n}"))).await;
    }
    sync(&mut sender, "sender").await;
    let (status, body) = node.get("/api/history?room=a%20b&since=2&limit=2").await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(v["room"], "a b");
    assert_eq!(v["offset"], 5);
    assert!(v["epoch"].is_string());
    assert_eq!(
        v["messages"],
        json!([{"offset": 3, "message": "m3"}, {"offset": 4, "message": "m4"}])
    );
    let (status, body) = node.get("/api/history?room=never").await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).expect("JSON")["epoch"],
        Value::Null
    );
    assert_eq!(node.get("/api/history").await.0, 400, "room is required");

    let off = Node::start().await;
    assert_eq!(off.get("/api/history?room=r").await.0, 404, "history off");
}

#[tokio::test]
async fn without_history_a_resume_is_answered_not_recovered() {
    let node = Node::start().await;
    let mut ws = node.envelope_client().await;
    send(&mut ws, &subscribe_since("r", 4, "e")).await;
    assert_eq!(
        recv_json(&mut ws).await,
        json!({"type": "subscribed", "room": "r", "recovered": false})
    );
    send(&mut ws, &send_message("r", "hi")).await;
    assert_eq!(
        recv_json(&mut ws).await,
        json!({"type": "message", "room": "r", "message": "hi"})
    );
}
