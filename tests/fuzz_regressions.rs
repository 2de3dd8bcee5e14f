//! Reproducers found by the libFuzzer targets in fuzz/ (`scripts/fuzz.sh`), replayed through the
//! public API so they stay fixed; plus a replay of the committed seed corpus, so `cargo test`
//! alone catches a seed that panics.

use roomcast::frame::{self, FrameError};
use roomcast::protocol::{self, ClientError, Command, Id, Relay};

/// fuzz target `client_message`, crash-50f3677696f39c0d73970dec096acd25c7370985: a valid JSON
/// object holding an integer literal outside i64/u64 is refused as `bad_json`. simd-json (built
/// without `big-int-as-float`) rejects such numbers; serde_json, browsers and every other JSON
/// parser accept them, and `JSON.stringify(2 ** 64)` in a browser writes
/// `18446744073709552000`. Fix: enable simd-json's `big-int-as-float` feature.
#[test]
fn integer_literal_beyond_u64_is_valid_json() {
    let mut raw = b"{\"typebbbcbbb@bbbbbbbmee`tra\":7777777777777777777777}".to_vec();
    assert_eq!(
        protocol::decode(&mut raw),
        Err(ClientError::BadField("type"))
    );

    let mut chat =
        br#"{"type":"chat","payload":{"message":"x"},"ts":18446744073709552000}"#.to_vec();
    assert_eq!(
        protocol::decode(&mut chat),
        Ok(Command::Chat {
            message: "x",
            room: None,
            id: Id::Absent,
        })
    );

    let mut send =
        br#"{"type":"sendMessage","roomId":"r","message":"m","n":-99999999999999999999}"#.to_vec();
    assert_eq!(
        protocol::decode(&mut send),
        Ok(Command::SendMessage {
            room: "r",
            message: "m",
            id: Id::Absent,
        })
    );

    // The same on the backplane: an original node's payload with a big number is not dropped.
    let mut relay =
        br#"{"type":"sendMessage","roomId":"r","message":"m","seq":1e2,"id":36893488147419103232}"#
            .to_vec();
    assert_eq!(
        protocol::decode_relay(&mut relay),
        Some(Relay {
            message: "m",
            origin: None,
            conn: None,
            offset: None,
            epoch: None,
        })
    );
}

/// With `--max-message-bytes` at `usize::MAX` (the config accepts it), a frame declaring a
/// 64-bit length of 2^64-1 passes `parse_header`, and `Header::frame_len()` (14 + payload_len)
/// overflows: a panic in debug builds, in release a wrap to 13, after which the session's
/// `unmask(&mut buf[at..at + 13])` indexes past the slice and the connection task panics.
/// The frame_parser target keeps `max <= usize::MAX - 14` so it can go on past this.
/// Fix (frame.rs, 64-bit branch of `parse_header`): also refuse `n > isize::MAX as u64` (RFC 6455
/// §5.2: the most significant bit of a 64-bit length MUST be 0), or cap the limit in config.
#[test]
fn frame_len_cannot_overflow_with_unbounded_limit() {
    let mut wire = vec![0x82, 0xFF];
    wire.extend_from_slice(&u64::MAX.to_be_bytes());
    wire.extend_from_slice(&[1, 2, 3, 4]);
    match frame::parse_header(&wire, usize::MAX) {
        Err(FrameError::TooBig(_)) | Err(FrameError::BadControlFrame) => {}
        Ok(Some(h)) => assert!(
            h.header_len.checked_add(h.payload_len).is_some(),
            "frame_len overflows: {h:?}"
        ),
        other => panic!("unexpected {other:?}"),
    }
    // A 64-bit length with the top bit set is a protocol error whatever the limit.
    let mut top_bit = vec![0x82, 0xFF];
    top_bit.extend_from_slice(&(1u64 << 63).to_be_bytes());
    top_bit.extend_from_slice(&[0; 4]);
    assert!(frame::parse_header(&top_bit, usize::MAX).is_err());
}

/// Every committed seed goes through what the fuzz targets call, without panicking.
#[test]
fn seed_corpus_never_panics() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let seeds = |target: &str| -> Vec<Vec<u8>> {
        let mut out: Vec<Vec<u8>> = std::fs::read_dir(dir.join(target))
            .unwrap_or_else(|e| panic!("fuzz/corpus/{target}: {e}"))
            .map(|entry| std::fs::read(entry.unwrap().path()).unwrap())
            .collect();
        out.sort();
        out
    };

    let messages = seeds("client_message");
    assert!(!messages.is_empty());
    for seed in &messages {
        if let Err(e) = protocol::decode(&mut seed.clone()) {
            let _ = e.to_frame();
        }
        let _ = protocol::decode_relay(&mut seed.clone());
    }

    let streams = seeds("frame_parser");
    assert!(!streams.is_empty());
    for seed in &streams {
        let mut buf = seed.get(4..).unwrap_or_default().to_vec();
        let mut at = 0;
        while let Ok(Some(h)) = frame::parse_header(&buf[at..], 64 * 1024) {
            if at + h.frame_len() > buf.len() {
                break;
            }
            let payload = frame::unmask(&mut buf[at..at + h.frame_len()], &h);
            if h.opcode == frame::OpCode::Close {
                let _ = frame::parse_close(payload);
            }
            at += h.frame_len();
        }
    }
}
