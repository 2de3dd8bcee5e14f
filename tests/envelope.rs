//! Envelope mode (`roomcast.v2` subprotocol): replies to joins and sends, deliveries as
//! envelopes, and version 1 clients in the same rooms unchanged.

mod common;

use common::*;
use serde_json::{json, Value};

fn parsed(frame: &str) -> Value {
    serde_json::from_str(frame).unwrap_or_else(|e| panic!("not JSON ({e}): {frame}"))
}

#[tokio::test]
async fn the_subprotocol_is_selected_only_when_offered() {
    let node = Node::start().await;
    let (_, among_others) = node.client_offering("chat, roomcast.v2 ,x").await;
    assert_eq!(among_others.as_deref(), Some("roomcast.v2"));
    // Offered something else only: no subprotocol is selected (a browser accepts that;
    // tungstenite does not, so this one is a raw handshake), and the client is version 1.
    let (status, head, _) = try_upgrade(node.addr, "Sec-WebSocket-Protocol: chat\r\n").await;
    assert_eq!(status, 101);
    assert!(
        !head.to_ascii_lowercase().contains("sec-websocket-protocol"),
        "{head}"
    );
}

#[tokio::test]
async fn envelope_clients_get_replies_and_envelopes_and_v1_clients_see_no_change() {
    let node = Node::start().await;
    let mut env = node.envelope_client().await;
    let (mut d1, mut d2) = (node.client().await, node.client().await);

    // The name needs escaping both ways: JSON-escaped in what clients send.
    let name = r#"room \"1\""#;
    send(&mut env, &subscribe(name)).await;
    assert_eq!(
        parsed(&recv(&mut env).await),
        json!({"type": "subscribed", "room": "room \"1\""})
    );
    send(&mut d1, &join(name)).await;
    send(&mut d2, &subscribe(name)).await;
    sync(&mut d1, "d1").await;
    sync(&mut d2, "d2").await;

    // Dialect 2 from a v1 client: the envelope client gets an envelope, v1 clients the string.
    send(&mut d2, &send_message(name, "a\\nb")).await;
    assert_eq!(
        parsed(&recv(&mut env).await),
        json!({"type": "message", "room": "room \"1\"", "message": "a\nb"})
    );
    assert_eq!(recv(&mut d1).await, "a\nb");
    assert_eq!(recv(&mut d2).await, "a\nb");

    // Dialect 1 from a v1 client: skips its sender, as before.
    send(&mut d1, &chat("hi")).await;
    assert_eq!(
        parsed(&recv(&mut env).await),
        json!({"type": "message", "room": "room \"1\"", "message": "hi"})
    );
    assert_eq!(recv(&mut d2).await, "hi");

    // A send with an id is acknowledged to the envelope client after its own delivery.
    send(
        &mut env,
        r#"{"type":"sendMessage","roomId":"room \"1\"","message":"m","id":"c-1"}"#,
    )
    .await;
    assert_eq!(
        parsed(&recv(&mut env).await),
        json!({"type": "message", "room": "room \"1\"", "message": "m"})
    );
    assert_eq!(
        parsed(&recv(&mut env).await),
        json!({"type": "ack", "id": "c-1"})
    );
    assert_eq!(recv(&mut d1).await, "m");
    assert_eq!(recv(&mut d2).await, "m");

    // A v1 client's id (any shape) changes nothing: delivered, no ack, no error.
    send(
        &mut d2,
        r#"{"type":"sendMessage","roomId":"room \"1\"","message":"n","id":7}"#,
    )
    .await;
    assert_eq!(recv(&mut d2).await, "n");
    assert_eq!(recv(&mut d1).await, "n");
    assert_eq!(parsed(&recv(&mut env).await)["message"], "n");
    sync(&mut d2, "d2-again").await;

    send(&mut env, &unsubscribe(name)).await;
    assert_eq!(
        parsed(&recv(&mut env).await),
        json!({"type": "unsubscribed", "room": "room \"1\""})
    );
}

#[tokio::test]
async fn envelope_errors_name_the_send_and_a_bad_id_sends_nothing() {
    let node = Node::start().await;
    let mut env = node.envelope_client().await;
    let mut v1 = node.client().await;
    send(&mut env, &subscribe("r")).await;
    assert_eq!(parsed(&recv(&mut env).await)["type"], "subscribed");
    send(&mut v1, &subscribe("r")).await;
    sync(&mut v1, "v1").await;

    // A chat with no room held: the error carries the id.
    send(
        &mut env,
        r#"{"type":"chat","payload":{"message":"x","roomId":"elsewhere"},"id":"q"}"#,
    )
    .await;
    let reply = recv(&mut env).await;
    assert_eq!(error_code(&reply), "not_in_room");
    assert_eq!(parsed(&reply)["id"], "q");

    // An id that is not a string of 1-128 bytes is refused before anything is sent.
    let long = "i".repeat(129);
    for bad in [
        r#"7"#.to_owned(),
        r#""""#.to_owned(),
        format!(r#""{long}""#),
    ] {
        send(
            &mut env,
            &format!(r#"{{"type":"sendMessage","roomId":"r","message":"never","id":{bad}}}"#),
        )
        .await;
        assert_eq!(error_code(&recv(&mut env).await), "bad_field");
    }
    // The id may sit in dialect 1's payload too; 128 bytes is allowed.
    let longest = "i".repeat(128);
    send(
        &mut env,
        &format!(r#"{{"type":"chat","payload":{{"message":"ok","roomId":"r","id":"{longest}"}}}}"#),
    )
    .await;
    assert_eq!(
        parsed(&recv(&mut env).await),
        json!({"type": "ack", "id": longest})
    );
    assert_eq!(
        recv(&mut v1).await,
        "ok",
        "the first message v1 sees: nothing was sent before"
    );
}
