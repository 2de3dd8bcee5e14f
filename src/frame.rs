//! RFC 6455 framing: server frames out (unmasked, built once into a `Bytes`) and the incremental
//! parser for client frames in (masked, unmasked in place, reassembled from fragments).
//!
//! fastwebsockets does the HTTP upgrade; its frame reader is not used because it allocates an
//! 8 KiB read buffer per connection at handshake (twice the per-idle-connection budget) and does
//! not bound the total size of a fragmented message. This parser keeps no buffer at all while a
//! connection is idle: the session reads into a stack buffer and only a frame that straddles two
//! reads is copied into the connection's own (then released) buffer.

use bytes::{BufMut, Bytes, BytesMut};

/// The largest header a server frame can have: 2 bytes + 8 bytes of extended length.
pub const MAX_HEADER: usize = 10;

/// A frame's type (RFC 6455 §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    /// The next piece of a fragmented message.
    Continuation,
    /// A UTF-8 text message (or its first fragment).
    Text,
    /// A binary message (or its first fragment).
    Binary,
    /// The close handshake.
    Close,
    /// A liveness probe; answered with a pong carrying the same payload.
    Ping,
    /// The answer to a ping (or an unsolicited heartbeat).
    Pong,
}

impl OpCode {
    /// The opcode in the low four bits of a frame's first byte.
    pub fn from_bits(bits: u8) -> Option<Self> {
        Some(match bits {
            0x0 => Self::Continuation,
            0x1 => Self::Text,
            0x2 => Self::Binary,
            0x8 => Self::Close,
            0x9 => Self::Ping,
            0xA => Self::Pong,
            _ => return None,
        })
    }

    /// The four bits this opcode has on the wire.
    pub fn bits(self) -> u8 {
        match self {
            Self::Continuation => 0x0,
            Self::Text => 0x1,
            Self::Binary => 0x2,
            Self::Close => 0x8,
            Self::Ping => 0x9,
            Self::Pong => 0xA,
        }
    }

    fn is_control(self) -> bool {
        matches!(self, Self::Close | Self::Ping | Self::Pong)
    }
}

/// Close codes this server sends (RFC 6455 §7.4.1).
pub mod close_code {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// The server is shutting down.
    pub const GOING_AWAY: u16 = 1001;
    /// The peer broke RFC 6455.
    pub const PROTOCOL: u16 = 1002;
    /// A text message was not UTF-8.
    pub const INVALID_DATA: u16 = 1007;
    /// A policy was violated (slow consumer, incomplete frame).
    pub const POLICY: u16 = 1008;
    /// A message was over `--max-message-bytes`.
    pub const TOO_BIG: u16 = 1009;
    /// Token missing, refused or expired.
    pub const UNAUTHORIZED: u16 = 4001;
    /// The user was revoked by the server API.
    pub const REVOKED: u16 = 4003;
    /// Too many messages refused for the inbound rate limit (policy `reject`).
    pub const RATE_LIMITED: u16 = 4008;
}

/// A violation of RFC 6455 by the peer; each maps to the close code the connection ends with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// RSV1-3 set: no extension is ever negotiated.
    #[error("reserved bits set without a negotiated extension")]
    ReservedBits,
    /// An opcode RFC 6455 reserves.
    #[error("unknown opcode {0:#x}")]
    UnknownOpCode(u8),
    /// Clients must mask every frame (§5.3).
    #[error("client frame is not masked")]
    Unmasked,
    /// Control frames are single frames of at most 125 bytes (§5.5).
    #[error("control frame is fragmented or longer than 125 bytes")]
    BadControlFrame,
    /// A continuation with no fragmented message open.
    #[error("continuation frame without a message to continue")]
    UnexpectedContinuation,
    /// A new text or binary frame before the open fragmented message ended.
    #[error("new data frame while a fragmented message is unfinished")]
    UnfinishedMessage,
    /// A frame, or a fragmented message in total, over the limit given.
    #[error("message larger than the configured limit of {0} bytes")]
    TooBig(usize),
    /// A text message or close reason that is not UTF-8.
    #[error("text message is not valid UTF-8")]
    InvalidUtf8,
    /// A close payload of one byte, or with a code no endpoint may send.
    #[error("malformed close frame")]
    BadClose,
}

impl FrameError {
    /// The close code the connection ends with.
    pub fn close_code(self) -> u16 {
        match self {
            Self::TooBig(_) => close_code::TOO_BIG,
            Self::InvalidUtf8 => close_code::INVALID_DATA,
            _ => close_code::PROTOCOL,
        }
    }
}

/// Builds one complete server frame (FIN set, unmasked) in a single allocation.
pub fn encode(opcode: OpCode, payload: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(MAX_HEADER + payload.len());
    put_header(&mut buf, 0x80 | opcode.bits(), payload.len(), None);
    buf.put_slice(payload);
    buf.freeze()
}

/// Builds a masked client frame as a browser sends it; `first` is the FIN/RSV/opcode byte
/// (0x81 a final text frame, 0x01 a first fragment, 0x88 a close), so tests and the fuzzer can
/// also write frames no client library would. The server never sends these.
pub fn encode_client(first: u8, payload: &[u8], key: [u8; 4]) -> Vec<u8> {
    let mut buf = BytesMut::with_capacity(MAX_HEADER + 4 + payload.len());
    put_header(&mut buf, first, payload.len(), Some(key));
    let start = buf.len();
    buf.put_slice(payload);
    apply_mask(&mut buf[start..], key);
    buf.to_vec()
}

/// The one place the RFC 6455 length classes are written: 7 bits, 16 bits after 126, or 64
/// bits after 127, then the masking key when there is one.
fn put_header(buf: &mut BytesMut, first: u8, len: usize, key: Option<[u8; 4]>) {
    let mask_bit = if key.is_some() { 0x80 } else { 0 };
    buf.put_u8(first);
    match len {
        0..=125 => buf.put_u8(mask_bit | len as u8),
        126..=0xFFFF => {
            buf.put_u8(mask_bit | 126);
            buf.put_u16(len as u16);
        }
        _ => {
            buf.put_u8(mask_bit | 127);
            buf.put_u64(len as u64);
        }
    }
    if let Some(key) = key {
        buf.put_slice(&key);
    }
}

/// A text frame carrying `text`: the unit every delivery is made of.
pub fn text(text: &str) -> Bytes {
    encode(OpCode::Text, text.as_bytes())
}

/// The text a final, unmasked text frame built by [`text`] carries; `None` for any other
/// frame. Lets fan-out build a message's second delivery format from its first.
pub fn text_payload(frame: &[u8]) -> Option<&str> {
    let (&first, rest) = frame.split_first()?;
    let (&len7, rest) = rest.split_first()?;
    if first != 0x80 | OpCode::Text.bits() || len7 & 0x80 != 0 {
        return None;
    }
    let skip = match len7 {
        0..=125 => 0,
        126 => 2,
        _ => 8,
    };
    std::str::from_utf8(rest.get(skip..)?).ok()
}

/// A close frame; `reason` is cut on a character boundary to fit the 125-byte control limit.
pub fn close(code: u16, reason: &str) -> Bytes {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = [0u8; 125];
    payload[..2].copy_from_slice(&code.to_be_bytes());
    payload[2..2 + end].copy_from_slice(&reason.as_bytes()[..end]);
    encode(OpCode::Close, &payload[..2 + end])
}

/// One parsed client frame header. The payload is bytes `header_len..frame_len()` of the
/// slice the header was parsed from, still masked until [`unmask`] runs on that frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The last frame of its message.
    pub fin: bool,
    /// What the frame carries.
    pub opcode: OpCode,
    /// Bytes of header, masking key included: 6, 8 or 14.
    pub header_len: usize,
    /// Bytes of payload after the header.
    pub payload_len: usize,
}

impl Header {
    /// Header and payload together: how much of the buffer this frame takes.
    pub fn frame_len(&self) -> usize {
        self.header_len + self.payload_len
    }
}

/// Reads a client frame header from the front of `buf`; `Ok(None)` means the header is not
/// complete yet. A payload over `max_payload` is refused before any of it is buffered.
pub fn parse_header(buf: &[u8], max_payload: usize) -> Result<Option<Header>, FrameError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x70 != 0 {
        return Err(FrameError::ReservedBits);
    }
    let opcode = OpCode::from_bits(b0 & 0x0F).ok_or(FrameError::UnknownOpCode(b0 & 0x0F))?;
    let fin = b0 & 0x80 != 0;
    if b1 & 0x80 == 0 {
        return Err(FrameError::Unmasked);
    }
    let (ext, len7) = match b1 & 0x7F {
        126 => (2, None),
        127 => (8, None),
        n => (0, Some(n as usize)),
    };
    if buf.len() < 2 + ext {
        return Ok(None);
    }
    let payload_len = match len7 {
        Some(n) => n,
        None if ext == 2 => u16::from_be_bytes([buf[2], buf[3]]) as usize,
        None => {
            let mut raw = [0u8; 8];
            raw.copy_from_slice(&buf[2..10]);
            let n = u64::from_be_bytes(raw);
            // RFC 6455 §5.2: the most significant bit must be 0; capping at isize::MAX also
            // keeps `frame_len` from overflowing whatever limit is configured.
            if n > max_payload as u64 || n > isize::MAX as u64 {
                return Err(FrameError::TooBig(max_payload));
            }
            n as usize
        }
    };
    if opcode.is_control() && (!fin || payload_len > 125) {
        return Err(FrameError::BadControlFrame);
    }
    if payload_len > max_payload {
        return Err(FrameError::TooBig(max_payload));
    }
    let header_len = 2 + ext + 4;
    if buf.len() < header_len {
        return Ok(None);
    }
    Ok(Some(Header {
        fin,
        opcode,
        header_len,
        payload_len,
    }))
}

/// Unmasks a complete frame in place and returns its payload.
pub fn unmask<'a>(frame: &'a mut [u8], header: &Header) -> &'a mut [u8] {
    let key_at = header.header_len - 4;
    let mut key = [0u8; 4];
    key.copy_from_slice(&frame[key_at..header.header_len]);
    let payload = &mut frame[header.header_len..header.frame_len()];
    apply_mask(payload, key);
    payload
}

/// XORs `data` with the 4-byte masking key, eight bytes at a time where it can.
pub fn apply_mask(data: &mut [u8], key: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(word) ^ wide).to_ne_bytes());
    }
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= key[i % 4];
    }
}

/// Validates a close frame's payload and returns the code to echo back.
pub fn parse_close(payload: &[u8]) -> Result<u16, FrameError> {
    match payload.len() {
        0 => Ok(close_code::NORMAL),
        1 => Err(FrameError::BadClose),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            let allowed = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
            if !allowed {
                return Err(FrameError::BadClose);
            }
            if std::str::from_utf8(&payload[2..]).is_err() {
                return Err(FrameError::InvalidUtf8);
            }
            Ok(code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_of_a_server_text_frame_is_found_in_every_length_class() {
        for len in [0usize, 125, 126, 65535, 65536] {
            let text = "é".repeat(len / 2) + &"x".repeat(len % 2);
            assert_eq!(text_payload(&super::text(&text)), Some(text.as_str()));
        }
        assert_eq!(text_payload(&encode(OpCode::Binary, b"x")), None);
        assert_eq!(text_payload(&encode_client(0x81, b"x", [1, 2, 3, 4])), None);
        assert_eq!(text_payload(b"\x81"), None);
    }

    #[test]
    fn round_trips_every_length_class() {
        for len in [0usize, 1, 7, 8, 125, 126, 1000, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut wire = encode_client(0x82, &payload, [1, 2, 3, 250]);
            let header = parse_header(&wire, 1 << 20).unwrap().unwrap();
            assert_eq!(header.payload_len, len);
            assert_eq!(header.frame_len(), wire.len());
            assert_eq!(unmask(&mut wire, &header), &payload[..]);

            let out = encode(OpCode::Binary, &payload);
            let ext = match len {
                0..=125 => 0,
                126..=0xFFFF => 2,
                _ => 8,
            };
            assert_eq!(out.len(), 2 + ext + len);
            assert_eq!(&out[2 + ext..], &payload[..]);
        }
    }

    #[test]
    fn needs_more_until_header_complete() {
        let wire = encode_client(0x81, &[0u8; 300], [9, 9, 9, 9]);
        for cut in 0..8 {
            assert_eq!(parse_header(&wire[..cut], 1 << 20), Ok(None));
        }
        assert!(parse_header(&wire[..8], 1 << 20).unwrap().is_some());
    }

    #[test]
    fn rejects_protocol_violations() {
        let key = [1, 2, 3, 4];
        assert_eq!(
            parse_header(&encode_client(0xC1, b"x", key), 100),
            Err(FrameError::ReservedBits)
        );
        assert_eq!(
            parse_header(&encode_client(0x83, b"x", key), 100),
            Err(FrameError::UnknownOpCode(3))
        );
        assert_eq!(
            parse_header(&[0x81, 0x01, b'x'], 100),
            Err(FrameError::Unmasked)
        );
        assert_eq!(
            parse_header(&encode_client(0x09, b"x", key), 100),
            Err(FrameError::BadControlFrame)
        );
        assert_eq!(
            parse_header(&encode_client(0x89, &[0; 126], key), 1000),
            Err(FrameError::BadControlFrame)
        );
        assert_eq!(
            parse_header(&encode_client(0x81, &[0; 101], key), 100),
            Err(FrameError::TooBig(100))
        );
        let mut huge = vec![0x81, 0xFF];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(parse_header(&huge, 100), Err(FrameError::TooBig(100)));
    }

    #[test]
    fn close_payloads() {
        assert_eq!(parse_close(&[]), Ok(1000));
        assert_eq!(parse_close(&[3]), Err(FrameError::BadClose));
        assert_eq!(
            parse_close(&1005u16.to_be_bytes()),
            Err(FrameError::BadClose)
        );
        assert_eq!(parse_close(&4000u16.to_be_bytes()), Ok(4000));
        let mut bad = 1000u16.to_be_bytes().to_vec();
        bad.push(0xFF);
        assert_eq!(parse_close(&bad), Err(FrameError::InvalidUtf8));
        let frame = close(1008, &"é".repeat(100));
        assert!(frame.len() <= 127);
        assert!(std::str::from_utf8(&frame[4..]).is_ok());
    }
}
