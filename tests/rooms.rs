//! Large rooms: a broadcast served a slice at a time still reaches every member, once, in each
//! sender's order, and a sender's next message waits for its last one to be served.

mod common;

use common::*;

/// Members enough for several slices: with `fanout_slice = 1` each slice is one 16-member leaf
/// of the room's roster, so 50 members take four slices.
const MEMBERS: usize = 50;

async fn members(node: &Node, subscribe_to: &str) -> Vec<Ws> {
    let mut all = Vec::with_capacity(MEMBERS);
    for i in 0..MEMBERS {
        let mut ws = node.client().await;
        send(&mut ws, &subscribe(subscribe_to)).await;
        sync(&mut ws, &format!("m{i}")).await;
        all.push(ws);
    }
    all
}

#[tokio::test]
async fn sliced_broadcasts_reach_every_member_in_each_senders_order() {
    let node = Node::start_with(|c| {
        c.fanout_slice = 1;
        lift_inbound_limits(c);
    })
    .await;
    let mut room = members(&node, "big").await;
    let mut sender = node.client().await;
    send(&mut sender, &join("big")).await;
    sync(&mut sender, "sender").await;
    // Sent back to back: the server reads them together and must serve the first whole before
    // it takes the second.
    for i in 0..5 {
        send(&mut sender, &chat(&format!("c{i}"))).await;
    }
    send(&mut sender, &send_message("big", "last")).await;
    for (i, ws) in room.iter_mut().enumerate() {
        for want in ["c0", "c1", "c2", "c3", "c4", "last"] {
            assert_eq!(recv(ws).await, want, "member {i}");
        }
    }
    // dialect 1 skipped the sender; dialect 2 reached it, after everything it sent before.
    assert_eq!(recv(&mut sender).await, "last");
    let health = node.health().await;
    assert!(
        health["fanout_yields"].as_u64() >= Some(6 * 3),
        "each of 6 broadcasts to {MEMBERS} members yielded between its 4 slices: {health}"
    );
}

#[tokio::test]
async fn a_node_that_never_yields_serves_the_same() {
    let node = Node::start_with(|c| c.fanout_slice = 0).await;
    let mut room = members(&node, "big").await;
    let mut sender = node.client().await;
    send(&mut sender, &send_message("big", "whole")).await;
    for ws in room.iter_mut() {
        assert_eq!(recv(ws).await, "whole");
    }
    assert_eq!(node.health().await["fanout_yields"], 0);
}
