//! `{"type":"presence","room":R}`: how many members a room has, on one node and across nodes.

mod common;

use common::redis::Redis;
use common::*;

fn presence(room: &str) -> String {
    serde_json::json!({"type": "presence", "room": room}).to_string()
}

/// Asks `ws` for `room`'s count until it is `want` (other nodes' counts reach Redis within
/// about a second); returns the last answer.
async fn presence_until(ws: &mut Ws, room: &str, want: u64) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        send(ws, &presence(room)).await;
        let answer = recv_json(ws).await;
        assert_eq!(answer["type"], "presence", "{answer}");
        assert_eq!(answer["room"], room, "{answer}");
        if answer["count"] == want {
            return answer;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "count stayed {answer}, wanted {want}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn on_one_node_presence_counts_the_members_in_both_dialects() {
    let node = Node::start().await;
    let mut members = Vec::new();
    for _ in 0..3 {
        let mut ws = node.client().await;
        send(&mut ws, &subscribe("p")).await;
        sync(&mut ws, "p").await;
        members.push(ws);
    }
    let mut chat = node.client().await;
    send(&mut chat, &join("p")).await;
    // A bare-dialect client gets the answer as JSON too, and need not be a member.
    let mut outsider = node.client().await;
    let answer = presence_until(&mut outsider, "p", 4).await;
    assert_eq!(
        answer,
        serde_json::json!({"type": "presence", "room": "p", "count": 4})
    );
    drop(members.pop());
    presence_until(&mut outsider, "p", 3).await;
    presence_until(&mut outsider, "nobody-here", 0).await;
    send(&mut outsider, r#"{"type":"presence"}"#).await;
    assert_eq!(error_code(&recv(&mut outsider).await), "bad_field");
}

/// Members on two nodes count together; a node's counts in Redis carry their expiry, so a
/// node that died stops counting (here: a field written by a "node" whose time has passed).
#[tokio::test]
async fn across_nodes_presence_sums_every_live_nodes_members() {
    let mut redis = Redis::start().await;
    let url = redis.url();
    let a = Node::start_with(|c| c.redis = Some(url.clone())).await;
    let b = Node::start_with(|c| c.redis = Some(url.clone())).await;
    for node in [&a, &b] {
        node.wait_health("backplane connected", |h| h["status"] == "ok")
            .await;
    }
    let mut held = Vec::new();
    for (node, n) in [(&a, 2), (&b, 3)] {
        for _ in 0..n {
            let mut ws = node.client().await;
            send(&mut ws, &subscribe("x")).await;
            held.push(ws);
        }
    }
    let mut asker = a.client().await;
    presence_until(&mut asker, "x", 5).await;
    let mut other = b.client().await;
    presence_until(&mut other, "x", 5).await;

    // A dead node's count, past its time, and a live one's.
    let key = "__roomcast:presence:x";
    redis.command(&["HSET", key, "dead-node", "40:1000"]).await;
    redis
        .command(&["HSET", key, "live-node", "7:99999999999999"])
        .await;
    presence_until(&mut asker, "x", 12).await;
    let fields = redis.command(&["HEXISTS", key, "dead-node"]).await;
    assert_eq!(
        fields,
        ::redis::Value::Int(0),
        "the dead node's field is dropped"
    );

    // Members leaving on b are seen from a within about a second.
    held.truncate(2);
    presence_until(&mut asker, "x", 9).await;

    // Without Redis, a node answers with its own members and says the count is partial.
    redis.kill();
    a.wait_health("degraded", |h| h["status"] == "degraded")
        .await;
    send(&mut asker, &presence("x")).await;
    assert_eq!(
        recv_json(&mut asker).await,
        serde_json::json!({"type": "presence", "room": "x", "count": 2, "complete": false})
    );
}
