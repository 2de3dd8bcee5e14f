//! A deliberately small WebSocket client codec (RFC 6455, client side only).
//!
//! This is a second, independent implementation on purpose: loadgen checks the roomcast
//! server, so it must not share the server's frame codec (`src/frame.rs`), or a bug there
//! would be written and read the same way on both sides and never show. Keep it apart; within
//! this file the length classes and the masking are each written once (`encode_frame`,
//! `parse_header`, `apply_mask`).
//!
//! loadgen shares its cores with the server under test, so it avoids a general WebSocket
//! library: frames are parsed in place in the connection's read buffer and built into reused
//! write buffers, so steady-state traffic allocates nothing.

use std::fmt::Write as _;

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Largest server frame (or reassembled message) accepted; anything bigger is not a delivery
/// loadgen could have caused and would only let a broken server exhaust our memory.
pub const MAX_FRAME: usize = 16 << 20;

/// Largest HTTP upgrade response accepted.
pub const MAX_HANDSHAKE: usize = 16 << 10;

/// A `--url` loadgen cannot use; each names the URL as given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("{0}: URL must start with ws:// or wss://")]
    NotWs(String),
    #[error("{0}: unterminated IPv6 address")]
    UnterminatedIpv6(String),
    #[error("{0}: bad port")]
    BadPort(String),
    #[error("{0}: missing host")]
    MissingHost(String),
}

/// What the server did wrong at the frame level; ends the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("protocol: reserved bits set")]
    ReservedBits,
    #[error("protocol: frame too large")]
    FrameTooLarge,
    #[error("protocol: bad control frame")]
    BadControlFrame,
    #[error("protocol: unknown opcode")]
    UnknownOpcode,
    #[error("protocol: new message inside a fragmented one")]
    NewMessageInFragment,
    #[error("protocol: continuation without a message")]
    ContinuationWithoutMessage,
    #[error("protocol: fragmented message too large")]
    FragmentedTooLarge,
}

/// How the upgrade failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("handshake: response header too large")]
    TooLarge,
    /// The server answered with something other than 101; carries its status line.
    #[error("handshake: {0}")]
    Refused(String),
    /// `--envelope`: the server upgraded without selecting the subprotocol loadgen offered
    /// (a server without envelope mode); carries what it selected, if anything.
    #[error("handshake: server did not select subprotocol {wanted} (selected: {selected})")]
    ProtocolNotSelected {
        wanted: &'static str,
        selected: String,
    },
}

/// A parsed `ws://` or `wss://` URL.
#[derive(Debug, Clone)]
pub struct WsUrl {
    /// `wss://`: TLS under the WebSocket (the host is also the TLS server name).
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path and query, always starting with `/`.
    pub path: String,
    /// The `Host` header value (host plus non-default port).
    pub host_header: String,
}

impl WsUrl {
    pub fn parse(s: &str) -> Result<WsUrl, UrlError> {
        let (tls, rest) = if let Some(r) = s.strip_prefix("ws://") {
            (false, r)
        } else if let Some(r) = s.strip_prefix("wss://") {
            (true, r)
        } else {
            return Err(UrlError::NotWs(s.to_string()));
        };
        let default_port = if tls { 443 } else { 80 };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let end = v6
                .find(']')
                .ok_or_else(|| UrlError::UnterminatedIpv6(s.to_string()))?;
            let port = match v6[end + 1..].strip_prefix(':') {
                Some(p) => p.parse::<u16>().ok(),
                None if v6.len() == end + 1 => Some(default_port),
                None => None,
            };
            (v6[..end].to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p.parse::<u16>().ok()),
                None => (authority.to_string(), Some(default_port)),
            }
        };
        let port = port.ok_or_else(|| UrlError::BadPort(s.to_string()))?;
        if host.is_empty() {
            return Err(UrlError::MissingHost(s.to_string()));
        }
        // The authority as typed is a valid Host header, default port or not.
        let host_header = authority.to_string();
        Ok(WsUrl {
            tls,
            host,
            port,
            path: path.to_string(),
            host_header,
        })
    }

    /// Whether `s` is a `wss://` URL (for checks made before URLs are parsed).
    pub fn is_tls(s: &str) -> bool {
        s.starts_with("wss://")
    }

    /// `host:port` suitable for `lookup_host` (IPv6 hosts get their brackets back).
    pub fn socket_addr_string(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// The HTTP/1.1 upgrade request, offering `protocol` as `Sec-WebSocket-Protocol` when given.
/// The key only has to look random to the server; loadgen does not verify
/// `Sec-WebSocket-Accept` (that would need SHA-1 just to catch a server that answers 101 to the
/// wrong request, which the first delivery would expose anyway).
pub fn upgrade_request(
    url: &WsUrl,
    key_bytes: [u8; 16],
    token: Option<&str>,
    protocol: Option<&str>,
) -> Vec<u8> {
    let mut s = String::with_capacity(512);
    let _ = write!(
        s,
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 13\r\n",
        url.path,
        url.host_header,
        base64(&key_bytes)
    );
    if let Some(token) = token {
        let _ = write!(s, "Authorization: Bearer {token}\r\n");
    }
    if let Some(protocol) = protocol {
        let _ = write!(s, "Sec-WebSocket-Protocol: {protocol}\r\n");
    }
    s.push_str("\r\n");
    s.into_bytes()
}

fn base64(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if chunk.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

/// Outcome of looking for the end of the upgrade response in `buf`.
pub enum Handshake {
    /// More bytes are needed.
    Partial,
    /// Upgrade accepted; the response occupies `buf[..header_len]`, frames may follow.
    Done { header_len: usize },
}

pub fn check_handshake(buf: &[u8]) -> Result<Handshake, HandshakeError> {
    let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() >= MAX_HANDSHAKE {
            return Err(HandshakeError::TooLarge);
        }
        return Ok(Handshake::Partial);
    };
    let status_line = buf[..pos].split(|&b| b == b'\r').next().unwrap_or(&[]);
    let status_line = String::from_utf8_lossy(status_line);
    let mut parts = status_line.split_whitespace();
    let _version = parts.next();
    match parts.next() {
        Some("101") => Ok(Handshake::Done {
            header_len: pos + 4,
        }),
        _ => Err(HandshakeError::Refused(status_line.trim().to_string())),
    }
}

/// The value of header `name` (matched without regard to case, as HTTP asks) in the response
/// head `head` (status line and headers), trimmed; the first one when it repeats.
pub fn header<'a>(head: &'a [u8], name: &str) -> Option<&'a [u8]> {
    head.split(|&b| b == b'\n').skip(1).find_map(|line| {
        let colon = line.iter().position(|&b| b == b':')?;
        let (key, value) = (&line[..colon], &line[colon + 1..]);
        key.trim_ascii()
            .eq_ignore_ascii_case(name.as_bytes())
            .then(|| value.trim_ascii())
    })
}

/// Checks that the upgrade response head selected `wanted` as its subprotocol.
pub fn check_protocol(head: &[u8], wanted: &'static str) -> Result<(), HandshakeError> {
    match header(head, "sec-websocket-protocol") {
        Some(p) if p == wanted.as_bytes() => Ok(()),
        other => Err(HandshakeError::ProtocolNotSelected {
            wanted,
            selected: other.map_or_else(
                || "none".to_string(),
                |p| String::from_utf8_lossy(p).into_owned(),
            ),
        }),
    }
}

/// Appends one masked client frame. Clients must mask (RFC 6455 5.3); the key need not be
/// strong because loadgen does not pass through intermediaries it must protect against.
pub fn encode_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    out.push(0x80 | opcode);
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= usize::from(u16::MAX) {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], mask);
}

pub fn apply_mask(data: &mut [u8], mask: [u8; 4]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// A server frame header found at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub fin: bool,
    pub opcode: u8,
    /// Servers must not mask, but unmasking in place is cheaper than arguing about it.
    pub mask: Option<[u8; 4]>,
    pub header_len: usize,
    pub payload_len: usize,
}

impl FrameHeader {
    pub fn frame_len(&self) -> usize {
        self.header_len + self.payload_len
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum HeaderParse {
    /// At least this many bytes must be buffered before the header can be read.
    Need(usize),
    Header(FrameHeader),
}

pub fn parse_header(b: &[u8]) -> Result<HeaderParse, ProtocolError> {
    if b.len() < 2 {
        return Ok(HeaderParse::Need(2));
    }
    let (b0, b1) = (b[0], b[1]);
    if b0 & 0x70 != 0 {
        return Err(ProtocolError::ReservedBits);
    }
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0f;
    let mut header_len = 2;
    let len: u64 = match b1 & 0x7f {
        126 => {
            header_len += 2;
            if b.len() < header_len {
                return Ok(HeaderParse::Need(header_len));
            }
            u64::from(u16::from_be_bytes([b[2], b[3]]))
        }
        127 => {
            header_len += 8;
            if b.len() < header_len {
                return Ok(HeaderParse::Need(header_len));
            }
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[2..10]);
            u64::from_be_bytes(a)
        }
        n => u64::from(n),
    };
    let mask = if b1 & 0x80 != 0 {
        header_len += 4;
        if b.len() < header_len {
            return Ok(HeaderParse::Need(header_len));
        }
        Some([
            b[header_len - 4],
            b[header_len - 3],
            b[header_len - 2],
            b[header_len - 1],
        ])
    } else {
        None
    };
    if len > MAX_FRAME as u64 {
        return Err(ProtocolError::FrameTooLarge);
    }
    if opcode >= 0x8 && (!fin || len > 125) {
        return Err(ProtocolError::BadControlFrame);
    }
    if !matches!(
        opcode,
        OP_CONT | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG
    ) {
        return Err(ProtocolError::UnknownOpcode);
    }
    Ok(HeaderParse::Header(FrameHeader {
        fin,
        opcode,
        mask,
        header_len,
        payload_len: len as usize,
    }))
}

/// The frame at the start of a buffer, as far as it is there.
#[derive(Debug, PartialEq, Eq)]
pub enum Walk {
    /// The buffer holds less than this many bytes the frame needs (header or whole frame).
    Need(usize),
    /// A whole frame, its payload unmasked in place at `header_len..frame_len()`.
    Frame(FrameHeader),
}

/// The one frame walk both the delivery reader and the close-frame search use: parses the
/// header at the start of `buf` and, once the whole frame is buffered, unmasks its payload.
pub fn next_frame(buf: &mut [u8]) -> Result<Walk, ProtocolError> {
    let h = match parse_header(buf)? {
        HeaderParse::Need(n) => return Ok(Walk::Need(n)),
        HeaderParse::Header(h) => h,
    };
    if buf.len() < h.frame_len() {
        return Ok(Walk::Need(h.frame_len()));
    }
    if let Some(m) = h.mask {
        apply_mask(&mut buf[h.header_len..h.frame_len()], m);
    }
    Ok(Walk::Frame(h))
}

/// Appends a masked close frame carrying `code`.
pub fn encode_close(out: &mut Vec<u8>, code: u16, mask: [u8; 4]) {
    encode_frame(out, OP_CLOSE, &code.to_be_bytes(), mask);
}

/// The status code of a close frame's payload, if it has one.
pub fn close_code(payload: &[u8]) -> Option<u16> {
    match payload {
        [a, b, ..] => Some(u16::from_be_bytes([*a, *b])),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_forms() {
        let u = WsUrl::parse("ws://127.0.0.1:8080").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("127.0.0.1", 8080, "/")
        );
        assert_eq!(u.host_header, "127.0.0.1:8080");
        let u = WsUrl::parse("ws://example.org/ws?x=1").unwrap();
        assert_eq!((u.port, u.path.as_str()), (80, "/ws?x=1"));
        let u = WsUrl::parse("ws://[::1]:9000/").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 9000));
        assert_eq!(u.socket_addr_string(), "[::1]:9000");
        assert!(!u.tls);
        let u = WsUrl::parse("wss://example.org/ws").unwrap();
        assert!(u.tls && WsUrl::is_tls("wss://example.org/ws"));
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("example.org", 443, "/ws")
        );
        assert_eq!(u.host_header, "example.org");
        let u = WsUrl::parse("wss://[::1]:9443").unwrap();
        assert_eq!((u.tls, u.host.as_str(), u.port), (true, "::1", 9443));
        let u = WsUrl::parse("wss://[::1]").unwrap();
        assert_eq!(u.port, 443);
        assert!(!WsUrl::is_tls("ws://x"));
        let err = WsUrl::parse("http://x").unwrap_err().to_string();
        assert_eq!(err, "http://x: URL must start with ws:// or wss://");
        assert!(WsUrl::parse("wss://:443").is_err());
        assert!(WsUrl::parse("ws://x:notaport").is_err());
    }

    #[test]
    fn base64_matches_rfc_sample() {
        assert_eq!(base64(b"the sample nonce"), "dGhlIHNhbXBsZSBub25jZQ==");
        assert_eq!(base64(b"ab"), "YWI=");
    }

    #[test]
    fn masked_frame_roundtrip() {
        for len in [0usize, 5, 125, 126, 300, 70_000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut out = Vec::new();
            encode_frame(&mut out, OP_TEXT, &payload, [1, 2, 3, 4]);
            let HeaderParse::Header(h) = parse_header(&out).unwrap() else {
                panic!("incomplete")
            };
            assert_eq!(h.frame_len(), out.len());
            assert_eq!(h.opcode, OP_TEXT);
            let mask = h.mask.unwrap();
            let body = &mut out[h.header_len..];
            apply_mask(body, mask);
            assert_eq!(body, &payload[..]);
            // Every truncation must ask for more bytes, never misparse.
            for cut in 0..h.header_len {
                assert!(matches!(
                    parse_header(&out[..cut]).unwrap(),
                    HeaderParse::Need(_)
                ));
            }
        }
    }

    #[test]
    fn rejects_bad_frames() {
        assert!(parse_header(&[0xC1, 0x00]).is_err()); // RSV1
        assert!(parse_header(&[0x09, 0x00]).is_err()); // fragmented ping
        assert!(parse_header(&[0x83, 0x00]).is_err()); // reserved opcode
        assert!(parse_header(&[0x81, 127, 0xff, 0, 0, 0, 0, 0, 0, 0]).is_err());
    }

    #[test]
    fn handshake_status() {
        assert!(matches!(
            check_handshake(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"),
            Ok(Handshake::Partial)
        ));
        let ok = b"HTTP/1.1 101 Switching Protocols\r\n\r\n\x81\x02hi";
        assert!(matches!(
            check_handshake(ok),
            Ok(Handshake::Done { header_len: 36 })
        ));
        let err = check_handshake(b"HTTP/1.1 503 Service Unavailable\r\n\r\n")
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("handshake: HTTP/1.1 503 Service Unavailable")
        );
    }

    #[test]
    fn subprotocol_is_offered_and_checked() {
        let url = WsUrl::parse("ws://h:1/").unwrap();
        let req = upgrade_request(&url, [0; 16], None, Some("roomcast.v2"));
        let req = String::from_utf8(req).unwrap();
        assert!(req.contains("\r\nSec-WebSocket-Protocol: roomcast.v2\r\n"));
        assert!(req.ends_with("\r\n\r\n"));
        let plain = upgrade_request(&url, [0; 16], None, None);
        assert!(!String::from_utf8(plain).unwrap().contains("Protocol"));

        let head = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\
                     sec-websocket-protocol:  roomcast.v2 \r\n\r\n";
        assert_eq!(check_protocol(head, "roomcast.v2"), Ok(()));
        assert_eq!(header(head, "Upgrade"), Some(&b"websocket"[..]));
        let err = |head: &[u8]| check_protocol(head, "roomcast.v2").unwrap_err().to_string();
        assert_eq!(
            err(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n"),
            "handshake: server did not select subprotocol roomcast.v2 (selected: none)"
        );
        assert!(
            err(b"HTTP/1.1 101 OK\r\nSec-WebSocket-Protocol: chat\r\n\r\n")
                .ends_with("(selected: chat)")
        );
    }

    #[test]
    fn walk_unmasks_whole_frames_only() {
        let mut buf = Vec::new();
        encode_close(&mut buf, 1008, [9, 8, 7, 6]);
        encode_frame(&mut buf, OP_TEXT, b"next", [1, 2, 3, 4]);
        let first = buf.len() - 10;
        assert_eq!(next_frame(&mut buf[..1]), Ok(Walk::Need(2)));
        assert_eq!(next_frame(&mut buf[..first - 1]), Ok(Walk::Need(first)));
        let Ok(Walk::Frame(h)) = next_frame(&mut buf) else {
            panic!("no frame")
        };
        assert_eq!((h.opcode, h.frame_len()), (OP_CLOSE, first));
        assert_eq!(close_code(&buf[h.header_len..h.frame_len()]), Some(1008));
        assert_eq!(close_code(&[3]), None);
        let Ok(Walk::Frame(h)) = next_frame(&mut buf[first..]) else {
            panic!("no second frame")
        };
        assert_eq!(&buf[first + h.header_len..], b"next");
    }
}
