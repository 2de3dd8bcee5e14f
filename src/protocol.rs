//! The client wire contract (`shared/protocol.md`, restated and extended in
//! `docs/protocol.md`): decoding the two JSON dialects into [`Command`]s, and encoding what the
//! server sends besides bare strings: error replies, and version 2's envelopes and answers.
//!
//! Decoding runs simd-json's tape parser over the frame's own (already unmasked) buffer, so every
//! string in a [`Command`] borrows that buffer: no per-message allocation. The tape and scratch
//! buffers are reused per thread because decoding is synchronous and never crosses an `.await`.

use std::cell::RefCell;

use bytes::Bytes;
use simd_json::prelude::*;
use simd_json::tape::{Tape, Value};
use simd_json::Buffers;

use crate::frame;
use crate::history::Stamp;

/// One client request, with every string borrowed from the frame it came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command<'a> {
    /// Dialect 1: join a room; the first room held becomes the chat room.
    Join {
        /// The room's name as the client spelled it.
        room: &'a str,
        /// Version 2: resume from this position (in `payload`).
        since: Option<Since<'a>>,
    },
    /// Dialect 1: say `message` to every other member of the chat room (or of `room`).
    Chat {
        /// The text every recipient receives, exactly as sent.
        message: &'a str,
        /// The held room to speak in (extension); the chat room when absent.
        room: Option<&'a str>,
        /// Version 2: the client's name for this send, answered with an `ack` in envelope
        /// mode (top level, or in `payload`).
        id: Id<'a>,
    },
    /// Dialect 1 extension: drop a membership.
    Leave {
        /// The room's name as the client spelled it.
        room: &'a str,
    },
    /// Dialect 2: add a room.
    Subscribe {
        /// The room's name as the client spelled it.
        room: &'a str,
        /// Version 2: resume from this position.
        since: Option<Since<'a>>,
    },
    /// Dialect 2 extension: drop a room.
    Unsubscribe {
        /// The room's name as the client spelled it.
        room: &'a str,
    },
    /// Dialect 2: deliver `message` to every member of `room`, the sender included.
    SendMessage {
        /// The room's name as the client spelled it.
        room: &'a str,
        /// The text every recipient receives, exactly as sent.
        message: &'a str,
        /// Version 2: the client's name for this send, answered with an `ack` in envelope
        /// mode.
        id: Id<'a>,
    },
    /// Version 2, both dialects: how many members `room` has, on every node together.
    Presence {
        /// The room's name as the client spelled it.
        room: &'a str,
    },
    /// Version 2: proves who the connection is (first message), or refreshes the token.
    Auth {
        /// The JWT.
        token: &'a str,
    },
}

/// Version 2: the last message a resuming client received in a room, as its envelope said:
/// `"since":{"offset":N,"epoch":E}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Since<'a> {
    /// The offset of that message (0: none yet).
    pub offset: u64,
    /// The epoch it came with.
    pub epoch: &'a str,
}

impl<'a> Command<'a> {
    /// The `id` the client gave this command (only sends carry one).
    pub fn id(&self) -> Id<'a> {
        match *self {
            Self::Chat { id, .. } | Self::SendMessage { id, .. } => id,
            _ => Id::Absent,
        }
    }
}

/// A send's `id`. Only envelope mode reads it: a version 1 client may send an `id` of any
/// shape for its own reasons and must see nothing change, so a bad one is not an error here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Id<'a> {
    /// No `id` field.
    Absent,
    /// A string of 1 to [`MAX_ID_BYTES`] bytes.
    Given(&'a str),
    /// Present but not such a string.
    Invalid,
}

/// Everything a client can get wrong; each becomes an error reply and the session stays open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// `bad_json`: the text is not a JSON object.
    #[error("frame is not a JSON object")]
    BadJson,
    /// `unknown_type`: a `type` neither dialect has (echoed back capped).
    #[error("unknown message type \"{0}\"")]
    UnknownType(String),
    /// `bad_field`: a field missing or of the wrong type; names the field.
    #[error("field `{0}` is missing or not a non-empty string")]
    BadField(&'static str),
    /// `not_in_room`: `chat` with no room held, or to a room not held.
    #[error("{0}")]
    NotInRoom(String),
    /// `limit`: a configured limit was reached; says which.
    #[error("{0}")]
    Limit(String),
    /// `unsupported_frame`: a binary frame.
    #[error("binary frames are not supported; send JSON in text frames")]
    UnsupportedFrame,
    /// `rate_limited`: over the connection's inbound limit under policy `reject`; the message
    /// was dropped.
    #[error(
        "over the inbound rate limit ({frames_per_sec} frames/s, {bytes_per_sec} bytes/s); \
         the message was dropped"
    )]
    RateLimited {
        /// The configured frame rate (0: unlimited).
        frames_per_sec: u32,
        /// The configured byte rate (0: unlimited).
        bytes_per_sec: u64,
    },
    /// `forbidden`: the connection's token does not grant this operation on this room
    /// (capped); nothing changed.
    #[error("not allowed to {0} room \"{1}\"")]
    Forbidden(&'static str, String),
    /// `bad_field`: a room name in the reserved namespace.
    #[error("field `{0}` names a reserved room: names starting with {RESERVED_PREFIX} are the server's own")]
    ReservedRoom(&'static str),
    /// `backplane_unavailable`: the bus could not take, or could not send, the message to this
    /// room (capped); it was not delivered.
    #[error("the backplane is unavailable; the message to room \"{0}\" was not sent")]
    BackplaneUnavailable(String),
}

impl ClientError {
    /// The wire code of the error reply (`shared/protocol.md`, "Errors").
    pub fn code(&self) -> &'static str {
        match self {
            Self::BadJson => "bad_json",
            Self::UnknownType(_) => "unknown_type",
            Self::BadField(_) | Self::ReservedRoom(_) => "bad_field",
            Self::NotInRoom(_) => "not_in_room",
            Self::Limit(_) => "limit",
            Self::UnsupportedFrame => "unsupported_frame",
            Self::RateLimited { .. } => "rate_limited",
            Self::Forbidden(..) => "forbidden",
            Self::BackplaneUnavailable(_) => "backplane_unavailable",
        }
    }

    /// The complete text frame of the error reply.
    pub fn to_frame(&self) -> Bytes {
        self.to_frame_for(None)
    }

    /// The error reply to the send the client named `id` (envelope mode), which carries it.
    pub fn to_frame_for(&self, id: Option<&str>) -> Bytes {
        let mut json = String::with_capacity(96);
        json.push_str(r#"{"type":"error","code":""#);
        json.push_str(self.code());
        json.push_str(r#"","message":"#);
        push_json_string(&mut json, &self.to_string());
        if let Some(id) = id {
            json.push_str(r#","id":"#);
            push_json_string(&mut json, id);
        }
        json.push('}');
        frame::text(&json)
    }
}

/// The subprotocol a client offers to get envelope mode (`Sec-WebSocket-Protocol`).
pub const ENVELOPE_PROTOCOL: &str = "roomcast.v2";

/// How a connection receives what is published to its rooms, chosen at the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// The message string alone, as in version 1.
    #[default]
    Bare,
    /// Version 2's envelope (the `roomcast.v2` subprotocol): every delivery is
    /// `{"type":"message","room":R,"message":M}`, and joins and sends are answered.
    Envelope,
}

/// The envelope-mode delivery of `message` to `room`, framed; with the message's place in
/// the room's history when the room has one.
pub fn envelope(room: &str, message: &str, stamp: Option<&Stamp>) -> Bytes {
    let mut json = String::with_capacity(64 + room.len() + message.len());
    json.push_str(r#"{"type":"message","room":"#);
    push_json_string(&mut json, room);
    json.push_str(r#","message":"#);
    push_json_string(&mut json, message);
    push_stamp(&mut json, stamp);
    json.push('}');
    frame::text(&json)
}

/// The envelope-mode delivery of the message a bare frame (one of [`frame::text`]'s) carries;
/// any other frame (only tests send such) is returned as it is.
pub fn envelope_of(room: &str, bare: &Bytes, stamp: Option<&Stamp>) -> Bytes {
    match frame::text_payload(bare) {
        Some(message) => envelope(room, message, stamp),
        None => bare.clone(),
    }
}

/// An envelope-mode answer about a room: `{"type":KIND,"room":R}` (`subscribed`,
/// `unsubscribed`), with the room's latest offset and epoch when it has history, and for a
/// resume whether everything missed was replayed.
pub fn room_reply(
    kind: &str,
    room: &str,
    latest: Option<&Stamp>,
    recovered: Option<bool>,
) -> Bytes {
    let mut json = String::with_capacity(64 + room.len());
    json.push_str(r#"{"type":""#);
    json.push_str(kind);
    json.push_str(r#"","room":"#);
    push_json_string(&mut json, room);
    push_stamp(&mut json, latest);
    if let Some(recovered) = recovered {
        json.push_str(if recovered {
            r#","recovered":true"#
        } else {
            r#","recovered":false"#
        });
    }
    json.push('}');
    frame::text(&json)
}

/// The answer to a presence question, in both dialects: `{"type":"presence","room":R,
/// "count":N}`, with `"complete":false` when the other nodes could not be asked (the count is
/// then this node's alone).
pub fn presence(room: &str, count: u64, complete: bool) -> Bytes {
    let mut json = String::with_capacity(64 + room.len());
    json.push_str(r#"{"type":"presence","room":"#);
    push_json_string(&mut json, room);
    json.push_str(r#","count":"#);
    json.push_str(&count.to_string());
    if !complete {
        json.push_str(r#","complete":false"#);
    }
    json.push('}');
    frame::text(&json)
}

/// The envelope-mode answer to a send that carried an `id`: it was accepted, and with history
/// it holds this offset.
pub fn ack(id: &str, offset: Option<u64>) -> Bytes {
    let mut json = String::with_capacity(48 + id.len());
    json.push_str(r#"{"type":"ack","id":"#);
    push_json_string(&mut json, id);
    if let Some(offset) = offset {
        json.push_str(r#","offset":"#);
        json.push_str(&offset.to_string());
    }
    json.push('}');
    frame::text(&json)
}

fn push_stamp(json: &mut String, stamp: Option<&Stamp>) {
    if let Some(stamp) = stamp {
        json.push_str(r#","offset":"#);
        json.push_str(&stamp.offset.to_string());
        json.push_str(r#","epoch":"#);
        push_json_string(json, &stamp.epoch);
    }
}

/// Room names starting with this are refused: every channel the server uses itself (its
/// probe, and whatever later features need) lives behind it, so no client can subscribe to,
/// publish into or collide with one.
pub const RESERVED_PREFIX: &str = "__roomcast";

/// Longest piece of any client string echoed back in an error, so a hostile client cannot
/// make the server send large replies.
const ECHO_LIMIT: usize = 64;

/// `text` cut to at most [`ECHO_LIMIT`] bytes on a character boundary: what an error reply may
/// quote of what a client sent.
pub fn capped(text: &str) -> &str {
    let mut end = text.len().min(ECHO_LIMIT);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Appends `s` as a quoted JSON string.
pub fn push_json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

struct Scratch {
    buffers: Buffers,
    tape: Option<Tape<'static>>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch {
        buffers: Buffers::default(),
        tape: Some(Tape::null().reset()),
    });
}

/// Decodes one client text message. `buf` is parsed in place (simd-json unescapes strings into
/// it), which is why it must be mutable.
pub fn decode(buf: &mut [u8]) -> Result<Command<'_>, ClientError> {
    with_tape(buf, command).unwrap_or(Err(ClientError::BadJson))
}

/// Parses `buf` into the thread's reusable tape and runs `f` on the root value; `None` when
/// `buf` is not JSON.
fn with_tape<'i, R>(buf: &'i mut [u8], f: impl FnOnce(Value<'_, 'i>) -> R) -> Option<R> {
    SCRATCH.with(|cell| {
        let mut guard = cell.borrow_mut();
        let scratch = &mut *guard;
        let mut tape: Tape<'_> = scratch.tape.take().unwrap_or_else(Tape::null).reset();
        let out = match simd_json::fill_tape(buf, &mut scratch.buffers, &mut tape) {
            Ok(()) => Some(f(tape.as_value())),
            Err(_) => None,
        };
        scratch.tape = Some(tape.reset());
        out
    })
}

/// A message between nodes, as published on a room's Redis channel. Original nodes publish
/// only `type`, `roomId` and `message`; roomcast adds `origin` (node id) and `conn` (the
/// sending connection, present when the sender must not hear it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Relay<'a> {
    /// The text to deliver.
    pub message: &'a str,
    /// The publishing node's id; absent from original nodes.
    pub origin: Option<&'a str>,
    /// The sending connection on `origin`, to be skipped there (dialect 1's `chat`).
    pub conn: Option<u64>,
    /// With history across nodes: the offset Redis gave the message in its room, and the
    /// epoch of that room's history; absent from nodes without history and original nodes.
    pub offset: Option<u64>,
    /// See `offset`.
    pub epoch: Option<&'a str>,
}

/// Builds a relay payload; readable by original nodes (unknown fields are ignored there).
pub fn encode_relay(room: &str, message: &str, origin: &str, conn: Option<u64>) -> Vec<u8> {
    let mut json = String::with_capacity(64 + room.len() + message.len());
    json.push_str(r#"{"type":"sendMessage","roomId":"#);
    push_json_string(&mut json, room);
    json.push_str(r#","message":"#);
    push_json_string(&mut json, message);
    json.push_str(r#","origin":"#);
    push_json_string(&mut json, origin);
    if let Some(conn) = conn {
        json.push_str(r#","conn":"#);
        json.push_str(&conn.to_string());
    }
    json.push('}');
    json.into_bytes()
}

/// Reads a relay payload; `None` for anything without a string `message` (foreign traffic on
/// the channel is ignored, never delivered half-understood).
pub fn decode_relay(buf: &mut [u8]) -> Option<Relay<'_>> {
    with_tape(buf, |v| {
        Some(Relay {
            message: v.get("message")?.into_string()?,
            origin: v.get("origin").and_then(|o| o.into_string()),
            conn: v.get("conn").and_then(|c| c.as_u64()),
            offset: v.get("offset").and_then(|o| o.as_u64()),
            epoch: v.get("epoch").and_then(|e| e.into_string()),
        })
    })
    .flatten()
}

fn command<'i>(v: Value<'_, 'i>) -> Result<Command<'i>, ClientError> {
    if !v.is_object() {
        return Err(ClientError::BadJson);
    }
    let kind = v
        .get("type")
        .and_then(|t| t.into_string())
        .ok_or(ClientError::BadField("type"))?;
    Ok(match kind {
        "join" => Command::Join {
            room: required(v.get("payload"), "roomId", "payload.roomId")?,
            since: since(v.get("payload"), "payload.since")?,
        },
        "chat" => {
            let payload = v.get("payload");
            Command::Chat {
                message: message(payload, "message", "payload.message")?,
                room: optional(payload, "roomId", "payload.roomId")?,
                id: match request_id(Some(v)) {
                    Id::Absent => request_id(payload),
                    id => id,
                },
            }
        }
        "leave" => Command::Leave {
            room: required(v.get("payload"), "roomId", "payload.roomId")?,
        },
        "SUBSCRIBE" => Command::Subscribe {
            room: required(Some(v), "room", "room")?,
            since: since(Some(v), "since")?,
        },
        "UNSUBSCRIBE" => Command::Unsubscribe {
            room: required(Some(v), "room", "room")?,
        },
        "sendMessage" => Command::SendMessage {
            room: required(Some(v), "roomId", "roomId")?,
            message: message(Some(v), "message", "message")?,
            id: request_id(Some(v)),
        },
        "presence" => Command::Presence {
            room: required(Some(v), "room", "room")?,
        },
        "auth" => Command::Auth {
            token: message(Some(v), "token", "token")?,
        },
        other => return Err(ClientError::UnknownType(capped(other).to_owned())),
    })
}

/// A room name: present and a non-empty string.
fn required<'i>(
    obj: Option<Value<'_, 'i>>,
    key: &str,
    name: &'static str,
) -> Result<&'i str, ClientError> {
    optional(obj, key, name)?.ok_or(ClientError::BadField(name))
}

/// An optional room name: absent is fine, present must be a non-empty string.
fn optional<'i>(
    obj: Option<Value<'_, 'i>>,
    key: &str,
    name: &'static str,
) -> Result<Option<&'i str>, ClientError> {
    match obj.and_then(|o| o.get(key)) {
        None => Ok(None),
        Some(v) => match v.into_string() {
            Some(s) if s.starts_with(RESERVED_PREFIX) => Err(ClientError::ReservedRoom(name)),
            Some(s) if !s.is_empty() => Ok(Some(s)),
            _ => Err(ClientError::BadField(name)),
        },
    }
}

/// A resume position: absent, or an object with an integer `offset` and a string `epoch`.
fn since<'i>(
    obj: Option<Value<'_, 'i>>,
    name: &'static str,
) -> Result<Option<Since<'i>>, ClientError> {
    let Some(v) = obj.and_then(|o| o.get("since")) else {
        return Ok(None);
    };
    let offset = v.get("offset").and_then(|o| o.as_u64());
    let epoch = v.get("epoch").and_then(|e| e.into_string());
    match (offset, epoch) {
        (Some(offset), Some(epoch)) => Ok(Some(Since { offset, epoch })),
        _ => Err(ClientError::BadField(name)),
    }
}

/// Longest `id` a send may carry: it is echoed back in the `ack`.
pub const MAX_ID_BYTES: usize = 128;

/// A send's `id` field, read leniently (see [`Id`]).
fn request_id<'i>(obj: Option<Value<'_, 'i>>) -> Id<'i> {
    match obj.and_then(|o| o.get("id")) {
        None => Id::Absent,
        Some(v) => match v.into_string() {
            Some(s) if !s.is_empty() && s.len() <= MAX_ID_BYTES => Id::Given(s),
            _ => Id::Invalid,
        },
    }
}

/// A message body: any string, the empty one included.
fn message<'i>(
    obj: Option<Value<'_, 'i>>,
    key: &str,
    name: &'static str,
) -> Result<&'i str, ClientError> {
    obj.and_then(|o| o.get(key))
        .and_then(|v| v.into_string())
        .ok_or(ClientError::BadField(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<String, ClientError> {
        let mut buf = s.as_bytes().to_vec();
        decode(&mut buf).map(|c| format!("{c:?}"))
    }

    #[test]
    fn both_dialects() {
        assert_eq!(
            parse(r#"{"type":"join","payload":{"roomId":"red"}}"#).unwrap(),
            r#"Join { room: "red", since: None }"#
        );
        assert_eq!(
            parse(r#"{"type":"chat","payload":{"message":"h\"i"}}"#).unwrap(),
            r#"Chat { message: "h\"i", room: None, id: Absent }"#
        );
        assert_eq!(
            parse(r#"{"type":"SUBSCRIBE","room":"r1"}"#).unwrap(),
            r#"Subscribe { room: "r1", since: None }"#
        );
        assert_eq!(
            parse(r#"{"type":"sendMessage","roomId":"r1","message":"\u00e9"}"#).unwrap(),
            r#"SendMessage { room: "r1", message: "é", id: Absent }"#
        );
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(parse("nope"), Err(ClientError::BadJson));
        assert_eq!(parse("[1]"), Err(ClientError::BadJson));
        assert_eq!(parse("{}"), Err(ClientError::BadField("type")));
        assert_eq!(
            parse(r#"{"type":"join","payload":{"roomId":5}}"#),
            Err(ClientError::BadField("payload.roomId"))
        );
        assert_eq!(
            parse(r#"{"type":"SUBSCRIBE","room":""}"#),
            Err(ClientError::BadField("room"))
        );
        assert_eq!(
            parse(r#"{"type":"sendMessage","roomId":"r","message":{}}"#),
            Err(ClientError::BadField("message"))
        );
        assert_eq!(
            parse(r#"{"type":"dance"}"#),
            Err(ClientError::UnknownType("dance".into()))
        );
    }

    #[test]
    fn relay_round_trip_and_foreign_payloads() {
        let mut ours = encode_relay("r\"1", "hi \u{2603}", "node-a", Some(42));
        assert_eq!(
            decode_relay(&mut ours),
            Some(Relay {
                message: "hi \u{2603}",
                origin: Some("node-a"),
                conn: Some(42),
                offset: None,
                epoch: None,
            })
        );
        let mut original = br#"{"type":"sendMessage","roomId":"r","message":"x"}"#.to_vec();
        assert_eq!(
            decode_relay(&mut original),
            Some(Relay {
                message: "x",
                origin: None,
                conn: None,
                offset: None,
                epoch: None,
            })
        );
        assert_eq!(decode_relay(&mut b"garbage".to_vec()), None);
        assert_eq!(decode_relay(&mut br#"{"message":5}"#.to_vec()), None);
    }

    #[test]
    fn a_sends_id_is_read_leniently() {
        let id = |s: &str| {
            let mut buf = s.as_bytes().to_vec();
            decode(&mut buf).map(|c| format!("{:?}", c.id()))
        };
        assert_eq!(
            id(r#"{"type":"sendMessage","roomId":"r","message":"m","id":"a"}"#).unwrap(),
            r#"Given("a")"#
        );
        assert_eq!(
            id(r#"{"type":"sendMessage","roomId":"r","message":"m","id":1}"#).unwrap(),
            "Invalid"
        );
        assert_eq!(
            id(r#"{"type":"sendMessage","roomId":"r","message":"m","id":""}"#).unwrap(),
            "Invalid"
        );
        assert_eq!(
            id(r#"{"type":"chat","payload":{"message":"m","id":"p"}}"#).unwrap(),
            r#"Given("p")"#
        );
        assert_eq!(
            id(r#"{"type":"chat","payload":{"message":"m","id":"p"},"id":"t"}"#).unwrap(),
            r#"Given("t")"#
        );
        assert_eq!(
            id(r#"{"type":"SUBSCRIBE","room":"r","id":"x"}"#).unwrap(),
            "Absent"
        );
        let longest = format!(
            r#"{{"type":"sendMessage","roomId":"r","message":"m","id":"{}"}}"#,
            "i".repeat(MAX_ID_BYTES)
        );
        assert!(id(&longest).unwrap().starts_with("Given"));
    }

    #[test]
    fn envelope_mode_frames_are_valid_json() {
        let json = |f: Bytes| serde_json::from_slice::<serde_json::Value>(&f[2..]).unwrap();
        let v = json(envelope("r\"1", "a\u{1}\n", None));
        assert_eq!(
            v,
            serde_json::json!({"type":"message","room":"r\"1","message":"a\u{1}\n"})
        );
        let stamp = Stamp {
            offset: 7,
            epoch: "e\"".into(),
        };
        let v = json(envelope("r", "m", Some(&stamp)));
        assert_eq!(
            v,
            serde_json::json!({"type":"message","room":"r","message":"m","offset":7,"epoch":"e\""})
        );
        let v = json(room_reply("subscribed", "x\\", None, None));
        assert_eq!(v, serde_json::json!({"type":"subscribed","room":"x\\"}));
        let v = json(room_reply("subscribed", "x", Some(&stamp), Some(false)));
        assert_eq!(
            v,
            serde_json::json!({"type":"subscribed","room":"x","offset":7,"epoch":"e\"","recovered":false})
        );
        assert_eq!(
            json(ack("q\"", None)),
            serde_json::json!({"type":"ack","id":"q\""})
        );
        assert_eq!(json(ack("q", Some(3)))["offset"], 3);
        let v = json(ClientError::BadField("id").to_frame_for(Some("z")));
        assert_eq!(v["id"], "z");
    }

    #[test]
    fn error_reply_is_valid_json() {
        let reply = ClientError::UnknownType("a\"b\n".into()).to_frame();
        let v: serde_json::Value = serde_json::from_slice(&reply[2..]).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["code"], "unknown_type");
        assert!(v["message"].as_str().unwrap().contains("a\"b\n"));
    }
}
