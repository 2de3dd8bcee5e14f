//! Every rule of `shared/protocol.md`, through real sockets against a real node.

mod common;

use std::time::Duration;

use common::*;

const QUIET: Duration = Duration::from_millis(150);

#[tokio::test]
async fn dialect1_chat_reaches_every_other_member_but_not_the_sender() {
    let node = Node::start().await;
    let (mut a, mut b, mut c, mut outsider) = (
        node.client().await,
        node.client().await,
        node.client().await,
        node.client().await,
    );
    for ws in [&mut a, &mut b, &mut c] {
        send(ws, &join("red")).await;
    }
    send(&mut outsider, &join("blue")).await;
    sync(&mut outsider, "o").await;
    sync(&mut c, "c").await;
    sync(&mut b, "b").await;
    send(&mut a, &chat("hi")).await;
    assert_eq!(recv(&mut b).await, "hi");
    assert_eq!(recv(&mut c).await, "hi");
    // The sender hears nothing: its next frame is its own sync echo, not "hi".
    sync(&mut a, "a").await;
    silent(&mut outsider, QUIET).await;
}

#[tokio::test]
async fn dialect2_send_message_reaches_every_subscriber_including_the_sender() {
    let node = Node::start().await;
    let (mut a, mut b, mut other, mut stranger) = (
        node.client().await,
        node.client().await,
        node.client().await,
        node.client().await,
    );
    send(&mut a, &subscribe("r1")).await;
    send(&mut b, &subscribe("r1")).await;
    send(&mut other, &subscribe("r2")).await;
    sync(&mut b, "b").await;
    sync(&mut other, "other").await;
    send(&mut a, &send_message("r1", "hi")).await;
    assert_eq!(recv(&mut a).await, "hi");
    assert_eq!(recv(&mut b).await, "hi");
    // A sender need not be a member.
    send(&mut stranger, &send_message("r1", "from outside")).await;
    assert_eq!(recv(&mut a).await, "from outside");
    assert_eq!(recv(&mut b).await, "from outside");
    sync(&mut stranger, "s").await;
    silent(&mut other, QUIET).await;
}

#[tokio::test]
async fn a_connection_holds_many_rooms_and_unsubscribe_drops_one() {
    let node = Node::start().await;
    let (mut a, mut sender) = (node.client().await, node.client().await);
    send(&mut a, &subscribe("r1")).await;
    send(&mut a, &subscribe("r2")).await;
    sync(&mut a, "a").await;
    send(&mut sender, &send_message("r1", "one")).await;
    send(&mut sender, &send_message("r2", "two")).await;
    assert_eq!(recv(&mut a).await, "one");
    assert_eq!(recv(&mut a).await, "two");
    send(&mut a, &unsubscribe("r1")).await;
    // Leaving a room not held is a no-op, not an error.
    send(&mut a, &unsubscribe("never-held")).await;
    sync(&mut a, "a2").await;
    send(&mut sender, &send_message("r1", "gone")).await;
    send(&mut sender, &send_message("r2", "still")).await;
    assert_eq!(recv(&mut a).await, "still");
}

#[tokio::test]
async fn both_dialects_share_one_room_namespace() {
    let node = Node::start().await;
    let (mut joiner, mut subscriber) = (node.client().await, node.client().await);
    send(&mut joiner, &join("red")).await;
    send(&mut subscriber, &subscribe("red")).await;
    sync(&mut joiner, "j").await;
    sync(&mut subscriber, "s").await;
    send(&mut subscriber, &send_message("red", "to all")).await;
    assert_eq!(recv(&mut joiner).await, "to all");
    assert_eq!(recv(&mut subscriber).await, "to all");
    send(&mut joiner, &chat("from joiner")).await;
    assert_eq!(recv(&mut subscriber).await, "from joiner");
}

#[tokio::test]
async fn chat_goes_to_the_earliest_joined_room_and_leave_moves_it() {
    let node = Node::start().await;
    let (mut a, mut red, mut blue) = (
        node.client().await,
        node.client().await,
        node.client().await,
    );
    send(&mut red, &subscribe("red")).await;
    send(&mut blue, &subscribe("blue")).await;
    send(&mut a, &join("red")).await;
    send(&mut a, &join("blue")).await;
    sync(&mut red, "r").await;
    sync(&mut blue, "b").await;
    send(&mut a, &chat("first")).await;
    assert_eq!(recv(&mut red).await, "first");
    // payload.roomId picks another held room.
    send(
        &mut a,
        r#"{"type":"chat","payload":{"message":"picked","roomId":"blue"}}"#,
    )
    .await;
    assert_eq!(recv(&mut blue).await, "picked");
    send(&mut a, &leave("red")).await;
    send(&mut a, &chat("second")).await;
    assert_eq!(recv(&mut blue).await, "second");
    send(&mut red, &send_message("red", "barrier")).await;
    assert_eq!(recv(&mut red).await, "barrier");
}

#[tokio::test]
async fn joining_twice_is_a_no_op() {
    let node = Node::start().await;
    let (mut a, mut sender) = (node.client().await, node.client().await);
    send(&mut a, &subscribe("r")).await;
    send(&mut a, &join("r")).await;
    send(&mut a, &subscribe("r")).await;
    sync(&mut a, "a").await;
    send(&mut sender, &send_message("r", "once")).await;
    send(&mut sender, &send_message("r", "twice?")).await;
    assert_eq!(recv(&mut a).await, "once");
    assert_eq!(recv(&mut a).await, "twice?");
    node.wait_health("one room", |h| h["rooms"] == 1).await;
}

#[tokio::test]
async fn one_sender_order_is_kept_for_every_member() {
    let node = Node::start().await;
    let (mut a, mut b, mut sender) = (
        node.client().await,
        node.client().await,
        node.client().await,
    );
    send(&mut a, &subscribe("o")).await;
    send(&mut b, &join("o")).await;
    sync(&mut a, "a").await;
    sync(&mut b, "b").await;
    for i in 0..500 {
        send(&mut sender, &send_message("o", &i.to_string())).await;
    }
    for ws in [&mut a, &mut b] {
        for i in 0..500 {
            assert_eq!(recv(ws).await, i.to_string());
        }
    }
}

#[tokio::test]
async fn messages_are_delivered_exactly_as_sent() {
    let node = Node::start().await;
    let mut a = node.client().await;
    send(&mut a, &subscribe("esc")).await;
    send(
        &mut a,
        r#"{"type":"sendMessage","roomId":"esc","message":"quote \" slash \\ é \u2603 {\"json\":1}"}"#,
    )
    .await;
    assert_eq!(recv(&mut a).await, "quote \" slash \\ é ☃ {\"json\":1}");
    send(&mut a, &send_message("esc", "")).await;
    assert_eq!(recv(&mut a).await, "");
}

#[tokio::test]
async fn healthz_counts_and_unknown_paths_404() {
    let node = Node::start().await;
    let health = node.health().await;
    assert_eq!(health["status"], "ok");
    assert_eq!(health["connections"], 0);
    let mut a = node.client().await;
    send(&mut a, &subscribe("x")).await;
    send(&mut a, &subscribe("y")).await;
    node.wait_health("one connection in two rooms", |h| {
        h["connections"] == 1 && h["rooms"] == 2
    })
    .await;
    assert_eq!(node.get("/nope").await.0, 404);
    let (status, metrics) = node.get("/metrics").await;
    assert_eq!(status, 200);
    assert!(metrics.contains("roomcast_rooms 2"), "{metrics}");
}
