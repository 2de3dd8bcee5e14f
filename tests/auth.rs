//! Who may do what: tokens with room grants at the handshake or as a first message, expiry and
//! refresh, key rotation, the trusted server API, revocation across nodes, Origin checks.

mod common;

use std::time::Duration;

use common::redis::Redis;
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use roomcast::auth::{AuthMode, Key, OriginPattern};
use roomcast::Config;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Error as WsError;

const SECRET: &str = "test-secret";

fn unix_now() -> i64 {
    roomcast::auth::unix_now() as i64
}

/// A token for `sub` signed with `secret`, expiring `exp_in` seconds from now.
fn token_with(secret: &str, sub: &str, exp_in: i64, rooms: Value) -> String {
    let claims = json!({"sub": sub, "exp": unix_now() + exp_in, "rooms": rooms});
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("encode")
}

fn token(sub: &str, rooms: Value) -> String {
    token_with(SECRET, sub, 600, rooms)
}

fn chat_grants() -> Value {
    json!({"chat:*": ["subscribe", "publish"], "news": "subscribe"})
}

fn required(c: &mut Config) {
    c.auth.mode = AuthMode::Required;
    c.auth.secrets = vec![Key::parse(SECRET)];
    c.auth.timeout = Duration::from_millis(500);
}

/// Connects with `token` as a query parameter; the HTTP status when the upgrade is refused.
async fn connect_with(node: &Node, token: &str) -> Result<Ws, u16> {
    let url = format!("{}?token={token}", node.url());
    match tokio_tungstenite::connect_async(url).await {
        Ok((ws, _)) => Ok(ws),
        Err(WsError::Http(res)) => Err(res.status().as_u16()),
        Err(e) => panic!("connect: {e}"),
    }
}

/// Connects with `token` in an `Authorization: Bearer` header.
async fn connect_bearer(node: &Node, token: &str) -> Result<Ws, u16> {
    let mut req = node.url().into_client_request().expect("request");
    let value = format!("Bearer {token}").parse().expect("header");
    req.headers_mut().insert("authorization", value);
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(ws),
        Err(WsError::Http(res)) => Err(res.status().as_u16()),
        Err(e) => panic!("connect: {e}"),
    }
}

#[tokio::test]
async fn grants_allow_their_rooms_and_forbid_the_rest() {
    let node = Node::start_with(required).await;
    let mut ann = connect_with(&node, &token("ann", chat_grants()))
        .await
        .expect("ann");
    send(&mut ann, &join("chat:1")).await;
    send(&mut ann, &send_message("chat:1", "hello")).await;
    assert_eq!(recv(&mut ann).await, "hello");
    send(&mut ann, &subscribe("admin")).await;
    assert_eq!(error_code(&recv(&mut ann).await), "forbidden");
    send(&mut ann, &send_message("admin", "x")).await;
    assert_eq!(error_code(&recv(&mut ann).await), "forbidden");
    // `news` is subscribe-only: joining works, sending does not.
    send(&mut ann, &subscribe("news")).await;
    send(&mut ann, &send_message("news", "x")).await;
    assert_eq!(error_code(&recv(&mut ann).await), "forbidden");
    assert_eq!(node.health().await["rooms"], 2, "forbidden changed nothing");
}

#[tokio::test]
async fn bad_tokens_get_401_at_the_handshake() {
    let node = Node::start_with(required).await;
    let good = token("ann", chat_grants());
    let mut tampered: Vec<&str> = good.split('.').collect();
    let forged_claims = token("root", json!({"*": ["subscribe", "publish"]}));
    tampered[1] = forged_claims.split('.').nth(1).expect("claims");
    let tampered = tampered.join(".");
    let none = format!(
        "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.",
        good.split('.').nth(1).expect("claims")
    );
    for (what, bad) in [
        ("expired", token_with(SECRET, "ann", -10, chat_grants())),
        (
            "wrongly signed",
            token_with("other", "ann", 600, chat_grants()),
        ),
        ("tampered", tampered),
        ("alg none", none),
        ("garbage", "not.a.token".to_owned()),
    ] {
        assert_eq!(connect_with(&node, &bad).await.err(), Some(401), "{what}");
        assert_eq!(connect_bearer(&node, &bad).await.err(), Some(401), "{what}");
    }
    assert!(connect_bearer(&node, &good).await.is_ok());
    let metrics = node.get("/metrics").await.1;
    assert!(metrics.contains(r#"roomcast_connections_refused_total{reason="unauthorized"} 10"#));
}

#[tokio::test]
async fn first_message_auth_works_and_anything_else_first_is_4001() {
    let node = Node::start_with(required).await;
    let mut ws = node.client().await;
    send(
        &mut ws,
        &json!({"type":"auth","token": token("ann", chat_grants())}).to_string(),
    )
    .await;
    send(&mut ws, &subscribe("chat:a")).await;
    sync_in(&mut ws, "chat:sync").await;

    let mut early = node.client().await;
    send(&mut early, &subscribe("chat:a")).await;
    assert_eq!(close_code(&mut early).await, 4001);

    let mut refused = node.client().await;
    let bad = token_with("other", "ann", 600, chat_grants());
    send(
        &mut refused,
        &json!({"type":"auth","token": bad}).to_string(),
    )
    .await;
    assert_eq!(close_code(&mut refused).await, 4001);

    // Silence past --auth-timeout (500 ms here) is a refusal too.
    let mut silent = node.client().await;
    assert_eq!(close_code(&mut silent).await, 4001);
}

/// A round trip through a room the connection may use, proving it is still open and served.
async fn sync_in(ws: &mut Ws, room: &str) {
    send(ws, &subscribe(room)).await;
    send(ws, &send_message(room, "sync")).await;
    assert_eq!(recv(ws).await, "sync");
}

#[tokio::test]
async fn expiry_closes_with_4001_and_a_refresh_extends_it() {
    let node = Node::start_with(required).await;
    let short = token_with(SECRET, "ann", 1, chat_grants());
    let mut lapsing = connect_with(&node, &short).await.expect("connect");
    let mut refreshed = connect_with(&node, &short).await.expect("connect");
    let longer = token("ann", chat_grants());
    send(
        &mut refreshed,
        &json!({"type":"auth","token": longer}).to_string(),
    )
    .await;
    // The first token's exp is at most 1 s away: after it, one is closed and one is not.
    assert_eq!(close_code(&mut lapsing).await, 4001);
    sync_in(&mut refreshed, "chat:still-here").await;
}

#[tokio::test]
async fn a_refresh_with_fewer_grants_leaves_the_rooms_it_no_longer_grants() {
    let node = Node::start_with(required).await;
    let mut ann = connect_with(&node, &token("ann", chat_grants()))
        .await
        .expect("ann");
    let mut bob = connect_with(&node, &token("bob", chat_grants()))
        .await
        .expect("bob");
    send(&mut ann, &subscribe("chat:1")).await;
    send(&mut ann, &subscribe("news")).await;
    sync_in(&mut ann, "chat:ann").await;
    let fewer = token(
        "ann",
        json!({"news": "subscribe", "chat:ann": ["subscribe", "publish"]}),
    );
    send(&mut ann, &json!({"type":"auth","token": fewer}).to_string()).await;
    sync_in(&mut ann, "chat:ann").await;
    send(&mut bob, &send_message("chat:1", "gone")).await;
    // Bob is not a member, so his barrier is a send to a room only Ann holds.
    let bob_admin = token("bob", json!({"*": ["subscribe", "publish"]}));
    let mut admin = connect_with(&node, &bob_admin).await.expect("admin");
    send(&mut admin, &send_message("chat:ann", "after")).await;
    assert_eq!(recv(&mut ann).await, "after", "ann still heard chat:1");
}

#[tokio::test]
async fn rotation_accepts_both_secrets_then_only_the_new_one() {
    let both = Node::start_with(|c| {
        required(c);
        c.auth.secrets = vec![Key::parse("old=s-old"), Key::parse("new=s-new")];
    })
    .await;
    let old = token_with("s-old", "ann", 600, chat_grants());
    let new = token_with("s-new", "ann", 600, chat_grants());
    assert!(connect_with(&both, &old).await.is_ok());
    assert!(connect_with(&both, &new).await.is_ok());
    let rotated = Node::start_with(|c| {
        required(c);
        c.auth.secrets = vec![Key::parse("new=s-new")];
    })
    .await;
    assert_eq!(connect_with(&rotated, &old).await.err(), Some(401));
    assert!(connect_with(&rotated, &new).await.is_ok());
}

#[tokio::test]
async fn a_foreign_origin_gets_403_and_no_origin_is_allowed() {
    let node = Node::start_with(|c| {
        c.allowed_origins = vec![OriginPattern::parse("https://app.example.com")];
    })
    .await;
    let (status, head, _) = try_upgrade(node.addr, "Origin: https://evil.example.net\r\n").await;
    assert_eq!(status, 403, "{head}");
    let (status, _, _) = try_upgrade(node.addr, "Origin: https://app.example.com\r\n").await;
    assert_eq!(status, 101);
    let (status, _, _) = try_upgrade(node.addr, "").await;
    assert_eq!(status, 101);
}

#[tokio::test]
async fn connections_per_user_are_capped() {
    let node = Node::start_with(|c| {
        required(c);
        c.auth.max_connections_per_user = 1;
    })
    .await;
    let ann = token("ann", chat_grants());
    let _first = connect_with(&node, &ann).await.expect("first");
    assert_eq!(connect_with(&node, &ann).await.err(), Some(429));
    assert!(connect_with(&node, &token("bob", chat_grants()))
        .await
        .is_ok());
}

/// Sends `body` to `path` with `key`; returns the status and the JSON answer.
async fn api(node: &Node, path: &str, key: &str, body: &Value) -> (u16, Value) {
    let mut stream = tokio::net::TcpStream::connect(node.addr)
        .await
        .expect("connect");
    let body = body.to_string();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: t\r\nX-API-Key: {key}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(req.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut raw))
        .await
        .expect("answer in time")
        .expect("read");
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    let json = text
        .split_once("\r\n\r\n")
        .and_then(|(_, b)| serde_json::from_str(b).ok())
        .unwrap_or(Value::Null);
    (status, json)
}

async fn two_nodes(redis: &Redis) -> (Node, Node) {
    let url = redis.url();
    let with = |c: &mut Config| {
        required(c);
        c.redis = Some(url.clone());
        c.api_keys = vec!["k-1".to_owned()];
    };
    let (a, b) = (Node::start_with(with).await, Node::start_with(with).await);
    for node in [&a, &b] {
        node.wait_health("backplane connected", |h| h["status"] == "ok")
            .await;
    }
    (a, b)
}

#[tokio::test]
async fn the_publish_api_needs_its_key_and_reaches_both_nodes() {
    let redis = Redis::start().await;
    let (a, b) = two_nodes(&redis).await;
    let mut members = [
        connect_with(&a, &token("ann", chat_grants()))
            .await
            .expect("ann"),
        connect_with(&b, &token("bob", chat_grants()))
            .await
            .expect("bob"),
    ];
    for ws in members.iter_mut() {
        send(ws, &subscribe("chat:api")).await;
    }
    redis.wait_numsub("chat:api", 2).await;
    let one = json!({"room": "chat:api", "message": "from the backend"});
    assert_eq!(api(&a, "/api/publish", "wrong", &one).await.0, 401);
    assert_eq!(
        api(&a, "/api/publish", "k-1", &one).await,
        (200, json!({"accepted": 1}))
    );
    let batch = json!({"publications": [
        {"room": "chat:api", "message": "b1"}, {"room": "chat:api", "message": "b2"}
    ]});
    assert_eq!(
        api(&b, "/api/publish", "k-1", &batch).await.1["accepted"],
        2
    );
    for ws in members.iter_mut() {
        assert_eq!(recv(ws).await, "from the backend");
        assert_eq!(recv(ws).await, "b1");
        assert_eq!(recv(ws).await, "b2");
    }
    let reserved = json!({"room": "__roomcast:control", "message": "x"});
    assert_eq!(
        api(&a, "/api/publish", "k-1", &reserved).await.1["error"],
        "bad_field"
    );
    assert_eq!(
        api(&a, "/api/publish", "k-1", &json!({"x": 1})).await.1["error"],
        "bad_json"
    );
}

#[tokio::test]
async fn disconnect_closes_a_users_connections_on_every_node() {
    let redis = Redis::start().await;
    let (a, b) = two_nodes(&redis).await;
    let mut on_a = connect_with(&a, &token("mallory", chat_grants()))
        .await
        .expect("a");
    let mut on_b = connect_with(&b, &token("mallory", chat_grants()))
        .await
        .expect("b");
    let mut other = connect_with(&b, &token("ann", chat_grants()))
        .await
        .expect("ann");
    let (status, answer) = api(&a, "/api/disconnect", "k-1", &json!({"user": "mallory"})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(close_code(&mut on_a).await, 4003);
    assert_eq!(close_code(&mut on_b).await, 4003);
    sync_in(&mut other, "chat:ann").await;
}

#[tokio::test]
async fn optional_auth_gives_the_anonymous_grants_without_a_token() {
    let node = Node::start_with(|c| {
        required(c);
        c.auth.mode = AuthMode::Optional;
        c.auth.anonymous_grants =
            roomcast::auth::Grants::parse(r#"{"lobby": "subscribe"}"#).expect("grants");
    })
    .await;
    let mut guest = node.client().await;
    send(&mut guest, &subscribe("lobby")).await;
    send(&mut guest, &send_message("lobby", "x")).await;
    assert_eq!(error_code(&recv(&mut guest).await), "forbidden");
    let mut ann = connect_with(&node, &token("ann", chat_grants()))
        .await
        .expect("ann");
    sync_in(&mut ann, "chat:ok").await;
}
