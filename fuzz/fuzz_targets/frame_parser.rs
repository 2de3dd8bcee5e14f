//! Arbitrary bytes as a stream of client frames, parsed the way the session does it: loop
//! `parse_header` from the front, unmask each complete frame in place, validate close payloads.
//!
//! Input layout: byte 0 picks `max_payload` (low 3 bits) and the opcode for the encoder check
//! (high bits); bytes 1..4 give a payload length (0..131071) for the `encode` header check, a
//! close code and an arbitrary limit; bytes 4.. are the frame stream.
//!
//! Invariants checked:
//! - a complete header has `header_len` 6, 8 or 14, `payload_len <= max`, and no truncation of
//!   it parses to anything but "need more";
//! - `Ok(None)` only ever comes with fewer than 14 bytes left;
//! - `unmask` equals a byte-by-byte XOR with the key and is an involution;
//! - re-encoding the payload with `frame::encode` (then masking it as a client would) parses
//!   back to the same opcode and length, with the minimal header for that length;
//! - a close payload that `parse_close` accepts is rebuilt byte-for-byte by `frame::close`;
//! - `encode` of an arbitrary length has the minimal RFC 6455 header, and `close` fits 125 bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use roomcast::frame::{self, FrameError, Header, OpCode};

/// The header length (with masking key) RFC 6455 prescribes for a client frame of `len` bytes.
fn minimal_client_header(len: usize) -> usize {
    server_header(len) + 4
}

/// The header length of a server (unmasked) frame of `len` bytes.
fn server_header(len: usize) -> usize {
    match len {
        0..=125 => 2,
        126..=0xFFFF => 4,
        _ => 10,
    }
}

const OPCODES: [OpCode; 6] = [
    OpCode::Continuation,
    OpCode::Text,
    OpCode::Binary,
    OpCode::Close,
    OpCode::Ping,
    OpCode::Pong,
];

/// Turns a server frame from `frame::encode` into the client frame a browser would send.
/// The server frame's own header is checked against `server_header` in `check_encode`.
fn as_client_frame(server: &[u8], payload_len: usize, key: [u8; 4]) -> Vec<u8> {
    frame::encode_client(server[0], &server[server_header(payload_len)..], key)
}

fn check_encode(op: OpCode, len: usize, key: [u8; 4]) {
    // A filled buffer keeps this cheap for 64-bit-class lengths; the stream below covers
    // arbitrary payload bytes.
    let mut payload = vec![key[0]; len];
    payload[..len.min(4)].copy_from_slice(&key[..len.min(4)]);
    let out = frame::encode(op, &payload);
    let hl = server_header(len);
    assert_eq!(out.len(), hl + len, "encode({len}) length");
    assert_eq!(out[0], 0x80 | op.bits());
    match hl {
        2 => assert_eq!(out[1] as usize, len),
        4 => {
            assert_eq!(out[1], 126);
            assert_eq!(u16::from_be_bytes([out[2], out[3]]) as usize, len);
        }
        _ => {
            assert_eq!(out[1], 127);
            let mut raw = [0u8; 8];
            raw.copy_from_slice(&out[2..10]);
            assert_eq!(u64::from_be_bytes(raw), len as u64);
        }
    }
    assert_eq!(&out[hl..], &payload[..]);

    // Parse it back as a client would send it (control frames over 125 bytes are refused).
    let mut wire = as_client_frame(&out, len, key);
    match frame::parse_header(&wire, len) {
        Ok(Some(h)) => {
            assert_eq!(
                h,
                Header {
                    fin: true,
                    opcode: op,
                    header_len: hl + 4,
                    payload_len: len
                }
            );
            assert_eq!(h.frame_len(), wire.len());
            assert_eq!(frame::unmask(&mut wire, &h), &payload[..]);
        }
        Err(FrameError::BadControlFrame) if len > 125 => {}
        other => panic!("re-parse of encode({op:?}, {len}) gave {other:?}"),
    }
}

fn check_close_builder(code: u16, reason: &str) {
    let out = frame::close(code, reason);
    assert!(out.len() <= 127, "close frame of {} bytes", out.len());
    assert_eq!(out[0], 0x88);
    let payload = &out[2..];
    assert_eq!(out[1] as usize, payload.len());
    assert_eq!(&payload[..2], &code.to_be_bytes());
    let text = std::str::from_utf8(&payload[2..]).expect("close reason stays UTF-8");
    assert!(reason.starts_with(text));
    // The cut is the longest char-boundary prefix that fits.
    assert!(text.len() <= 123);
    if text.len() < reason.len() {
        let next = reason[text.len()..].chars().next().unwrap();
        assert!(text.len() + next.len_utf8() > 123, "reason cut too early");
    }
}

fn check_frame(frame: &mut [u8], h: &Header) {
    let key: [u8; 4] = frame[h.header_len - 4..h.header_len].try_into().unwrap();
    let masked = frame[h.header_len..].to_vec();
    let payload = frame::unmask(frame, h);
    assert_eq!(payload.len(), h.payload_len);
    for (i, (&p, &m)) in payload.iter().zip(&masked).enumerate() {
        assert_eq!(
            p,
            m ^ key[i % 4],
            "unmask differs from the byte-wise XOR at {i}"
        );
    }
    let mut again = payload.to_vec();
    frame::apply_mask(&mut again, key);
    assert_eq!(again, masked, "apply_mask is not an involution");

    // Round trip through the server encoder: same opcode and length, minimal header.
    let out = frame::encode(h.opcode, payload);
    let wire = as_client_frame(&out, h.payload_len, key);
    let back = frame::parse_header(&wire, h.payload_len)
        .expect("re-encoded frame is valid")
        .expect("re-encoded frame is complete");
    assert_eq!(back.opcode, h.opcode);
    assert!(back.fin);
    assert_eq!(back.payload_len, h.payload_len);
    assert_eq!(back.header_len, minimal_client_header(h.payload_len));
    assert_eq!(back.frame_len(), wire.len());

    if h.opcode == OpCode::Close {
        match frame::parse_close(payload) {
            Ok(code) if payload.is_empty() => assert_eq!(code, 1000),
            Ok(code) => {
                assert_eq!(code.to_be_bytes(), [payload[0], payload[1]]);
                assert!(matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999));
                let reason = std::str::from_utf8(&payload[2..]).unwrap();
                let rebuilt = frame::close(code, reason);
                assert_eq!(
                    &rebuilt[2..],
                    &payload[..],
                    "close(code, reason) round trip"
                );
            }
            Err(FrameError::BadClose) | Err(FrameError::InvalidUtf8) => {
                assert_ne!(payload.len(), 0);
            }
            Err(e) => panic!("parse_close returned {e:?}"),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let (params, stream) = data.split_at(4);
    let arbitrary_u32 = u32::from_le_bytes([params[1], params[2], params[3], 0]) as usize;
    let max = match params[0] & 0x07 {
        0 => 0,
        1 => 125,
        2 => 126,
        3 => 0xFFFF,
        4 => 64 * 1024, // the server's default --max-message-bytes
        5 => 1 << 20,
        6 => arbitrary_u32,
        // The largest limit for which `header_len + payload_len` cannot overflow; see
        // tests/fuzz_regressions.rs for what happens above it.
        _ => usize::MAX - 14,
    };

    // Encoder side: an arbitrary length in every class, and the close-frame builder.
    let op = OPCODES[(params[0] >> 3) as usize % OPCODES.len()];
    let key = [params[1], params[2], params[3], params[0]];
    // Log-uniform lengths up to 65535, and 1 in 16 in the 64-bit class (65536..131071).
    let len = u16::from_le_bytes([params[1], params[2]]) as usize >> (params[3] >> 4);
    let len = if params[3] & 0x0F == 0x0F {
        0x1_0000 + len
    } else {
        len
    };
    check_encode(op, len, key);
    let reason = String::from_utf8_lossy(&stream[..stream.len().min(200)]);
    check_close_builder(u16::from_le_bytes([params[1], params[2]]), &reason);

    // Parser side: the stream, frame after frame, as the session reads it.
    let mut buf = stream.to_vec();
    let mut at = 0;
    loop {
        let rest = &buf[at..];
        let h = match frame::parse_header(rest, max) {
            Ok(Some(h)) => h,
            Ok(None) => {
                assert!(
                    rest.len() < 14,
                    "need-more with {} bytes buffered",
                    rest.len()
                );
                break;
            }
            Err(FrameError::TooBig(m)) => {
                assert_eq!(m, max);
                break;
            }
            Err(_) => break,
        };
        assert!(
            matches!(h.header_len, 6 | 8 | 14),
            "header_len {}",
            h.header_len
        );
        assert!(
            h.payload_len <= max,
            "payload {} over max {max}",
            h.payload_len
        );
        assert!(h.header_len <= rest.len());
        if matches!(h.opcode, OpCode::Close | OpCode::Ping | OpCode::Pong) {
            assert!(h.fin && h.payload_len <= 125);
        }
        for cut in 0..h.header_len {
            assert_eq!(
                frame::parse_header(&rest[..cut], max),
                Ok(None),
                "truncated header ({cut} of {} bytes)",
                h.header_len
            );
        }
        let frame_len = h
            .header_len
            .checked_add(h.payload_len)
            .expect("frame_len overflows");
        assert_eq!(frame_len, h.frame_len());
        if frame_len > rest.len() {
            break; // the payload has not all arrived
        }
        check_frame(&mut buf[at..at + frame_len], &h);
        at += frame_len;
    }
});
