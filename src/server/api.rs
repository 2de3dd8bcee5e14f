//! The trusted server API: publish into rooms and revoke users from a backend, authenticated by
//! `X-API-Key`.
//!
//! | request | answer |
//! |---|---|
//! | `POST /api/publish` `{"room":R,"message":M}` or `{"publications":[{"room":R,"message":M},...]}` (at most 1,000) | 200 `{"accepted":N}`: queued exactly like a `sendMessage`, in order |
//! | `POST /api/disconnect` `{"user":SUB}` | 200 `{"closed_here":N}`: that user's connections on every node close with 4003 |
//! | `GET /api/history?room=R&since=N&limit=L` | 200 `{"room":R,"epoch":E,"offset":LATEST,"messages":[{"offset":N,"message":M},...]}`: the room's kept messages after offset `since` (default 0), at most `limit` (default 100, at most 1,000), oldest first; `epoch` is null for a room with no history |
//!
//! Errors are JSON `{"error":CODE,"message":TEXT}`: 401 `unauthorized` (key missing or wrong),
//! 400 `bad_json` / `bad_field`, 413 `too_large`, 503 `backplane_unavailable` (with `accepted`,
//! the publications queued before the one refused). With no `--api-key` the API is 404, except
//! `GET /api/history` on a node without tokens (`--auth off`), which then needs no key: it
//! tells nothing a client could not learn by joining the room. It is 404 while history is off.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;

use super::Shared;
use crate::auth::{query_param, AuthMode};
use crate::backplane::Publish;
use crate::frame;
use crate::protocol::{self, RESERVED_PREFIX};

type Reply = Response<Full<Bytes>>;

/// Most publications in one request.
const MAX_BATCH: usize = 1000;
/// Bytes of JSON around each message a batch may carry (room name, quotes, keys, escapes).
const PER_ITEM_OVERHEAD: usize = 1024;
/// A request body is never read past this, whatever the message limit: 16 MiB.
const MAX_BODY: usize = 16 << 20;

#[derive(Deserialize)]
#[serde(untagged)]
enum PublishBody {
    Many { publications: Vec<Publication> },
    One(Publication),
}

#[derive(Deserialize)]
struct Publication {
    room: String,
    message: String,
}

#[derive(Deserialize)]
struct DisconnectBody {
    user: String,
}

fn json(status: StatusCode, body: serde_json::Value) -> Reply {
    let mut res = Response::new(Full::new(Bytes::from(body.to_string())));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

fn error(status: StatusCode, code: &str, message: &str) -> Reply {
    json(
        status,
        serde_json::json!({"error": code, "message": message}),
    )
}

/// Compares in time that depends only on the lengths, so a caller cannot find a key byte by
/// byte from how long a refusal takes.
fn same_key(given: &[u8], key: &[u8]) -> bool {
    if given.len() != key.len() {
        return false;
    }
    given
        .iter()
        .zip(key)
        .fold(0u8, |diff, (a, b)| diff | (a ^ b))
        == 0
}

/// Handles `POST /api/...`.
pub(super) async fn handle(req: Request<Incoming>, shared: &Shared) -> Reply {
    let history = req.uri().path() == "/api/history";
    if shared.config.api_keys.is_empty() {
        if history && shared.config.auth.mode == AuthMode::Off {
            return read_history(req.uri().query().unwrap_or_default(), shared);
        }
        return error(StatusCode::NOT_FOUND, "not_found", "the server API is off");
    }
    let given = req
        .headers()
        .get("x-api-key")
        .map(HeaderValue::as_bytes)
        .unwrap_or_default();
    // Every key is compared, so the time does not say which one came close either.
    let known = shared
        .config
        .api_keys
        .iter()
        .fold(false, |found, key| same_key(given, key.as_bytes()) | found);
    if !known {
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong X-API-Key",
        );
    }
    if history {
        return read_history(req.uri().query().unwrap_or_default(), shared);
    }
    let path = req.uri().path().to_owned();
    let body = match read_body(req, shared).await {
        Ok(body) => body,
        Err(reply) => return reply,
    };
    match path.as_str() {
        "/api/publish" => publish(&body, shared).await,
        "/api/disconnect" => disconnect(&body, shared),
        _ => error(StatusCode::NOT_FOUND, "not_found", "no such API"),
    }
}

async fn read_body(req: Request<Incoming>, shared: &Shared) -> Result<Bytes, Reply> {
    let per_item = shared.config.max_message_bytes + PER_ITEM_OVERHEAD;
    let limit = per_item.saturating_mul(MAX_BATCH).min(MAX_BODY);
    match Limited::new(req.into_body(), limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(_) => Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            &format!("the body is larger than {limit} bytes"),
        )),
    }
}

/// Why a publication cannot be sent; named by its index in the request.
fn check(publication: &Publication, index: usize, shared: &Shared) -> Result<(), String> {
    let room = &publication.room;
    let max_room = shared.config.max_room_name;
    if room.is_empty() || room.len() > max_room {
        return Err(format!(
            "publications[{index}].room must be 1 to {max_room} bytes"
        ));
    }
    if room.starts_with(RESERVED_PREFIX) {
        return Err(format!(
            "publications[{index}].room is in the reserved namespace"
        ));
    }
    let max_message = shared.config.max_message_bytes;
    if publication.message.len() > max_message {
        return Err(format!(
            "publications[{index}].message is over {max_message} bytes"
        ));
    }
    Ok(())
}

async fn publish(body: &[u8], shared: &Shared) -> Reply {
    let publications = match serde_json::from_slice::<PublishBody>(body) {
        Ok(PublishBody::One(one)) => vec![one],
        Ok(PublishBody::Many { publications }) => publications,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_json", &e.to_string()),
    };
    if publications.len() > MAX_BATCH {
        let text = format!("at most {MAX_BATCH} publications per request");
        return error(StatusCode::BAD_REQUEST, "bad_field", &text);
    }
    // Every one is checked before any is sent: a bad batch sends nothing.
    for (index, publication) in publications.iter().enumerate() {
        if let Err(text) = check(publication, index, shared) {
            return error(StatusCode::BAD_REQUEST, "bad_field", &text);
        }
    }
    for (accepted, publication) in publications.iter().enumerate() {
        let sent = shared.backplane.publish(Publish {
            held: None,
            room: &publication.room,
            message: &publication.message,
            skip: None,
            from: None,
        });
        let Ok(published) = sent else {
            let room = protocol::capped(&publication.room);
            return json(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({
                    "error": "backplane_unavailable",
                    "message": format!("the backplane could not take the message to room \"{room}\""),
                    "accepted": accepted,
                }),
            );
        };
        // In order: each publication is served whole before the next one starts.
        if let Some(rest) = published.rest {
            rest.finish(&shared.metrics).await;
        }
    }
    json(
        StatusCode::OK,
        serde_json::json!({"accepted": publications.len()}),
    )
}

/// Most messages one history request returns.
const MAX_HISTORY_LIMIT: usize = 1000;

fn read_history(query: &str, shared: &Shared) -> Reply {
    let Some(history) = shared.backplane.history() else {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            "history is off (--history-size 0)",
        );
    };
    let Some(room) = query_param(query, "room").filter(|r| !r.is_empty()) else {
        return error(StatusCode::BAD_REQUEST, "bad_field", "room is required");
    };
    let number = |name: &str, default: u64| match query_param(query, name) {
        None => Ok(default),
        Some(text) => text
            .parse::<u64>()
            .map_err(|_| format!("{name} must be a whole number")),
    };
    let (since, limit) = match (number("since", 0), number("limit", 100)) {
        (Ok(since), Ok(limit)) => (since, (limit as usize).min(MAX_HISTORY_LIMIT)),
        (Err(text), _) | (_, Err(text)) => {
            return error(StatusCode::BAD_REQUEST, "bad_field", &text);
        }
    };
    let Some((latest, kept)) = history.read(&room, since, limit) else {
        return json(
            StatusCode::OK,
            serde_json::json!({"room": room, "epoch": null, "offset": 0, "messages": []}),
        );
    };
    let messages: Vec<serde_json::Value> = kept
        .iter()
        .map(|kept| {
            let message = frame::text_payload(&kept.frame).unwrap_or_default();
            serde_json::json!({"offset": kept.offset, "message": message})
        })
        .collect();
    json(
        StatusCode::OK,
        serde_json::json!({
            "room": room,
            "epoch": &*latest.epoch,
            "offset": latest.offset,
            "messages": messages,
        }),
    )
}

fn disconnect(body: &[u8], shared: &Shared) -> Reply {
    let user = match serde_json::from_slice::<DisconnectBody>(body) {
        Ok(body) if !body.user.is_empty() => body.user,
        Ok(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_field",
                "user must not be empty",
            )
        }
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_json", &e.to_string()),
    };
    match shared.backplane.disconnect(&user) {
        Ok(closed) => json(StatusCode::OK, serde_json::json!({"closed_here": closed})),
        Err(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "backplane_unavailable",
            "other nodes could not be told; connections here were not closed",
        ),
    }
}
