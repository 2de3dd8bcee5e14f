//! A connection's request head, read before hyper sees it: a WebSocket upgrade of a room path
//! is answered here, anything else goes on to hyper with the bytes already read.
//!
//! Why: hyper gives every HTTP connection an 8 KiB read buffer and an 8 KiB write buffer,
//! held until the upgrade completes. Under a storm of connections (10,000 clients connecting
//! 128 at a time) the handshakes in flight held 2.2 MB at the node's peak (`heaptrack`), and
//! the allocator kept those pages: 0.22 KiB of each idle connection's share of RSS in
//! `scripts/idle-memory.sh`. An upgrade needs neither buffer: its head is a few hundred bytes
//! and its answer one write of about 130. So the head is read into a buffer that starts at
//! 1 KiB and parsed with httparse (hyper's own parser), and only a complete GET upgrade of `/`
//! (or `/echo`) with no body, on the public address, is served here. Everything else, every
//! malformed or unusual request included, reaches hyper through [`Rewind`] and is answered as
//! before: hyper stays the HTTP implementation for all but this one request shape.

use std::io::{self, IoSlice, Write as _};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http_body_util::BodyExt;
use hyper::header::{HeaderName, HeaderValue, CONTENT_LENGTH, TRANSFER_ENCODING};
use hyper::{HeaderMap, Method, Request, StatusCode, Version};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

use super::routes::{self, Reply};
use super::{serve_http, Conn, Handshake};
use crate::session::Mode;
use crate::socket::Socket;

/// The head buffer's first size: a browser's upgrade request is 400–700 bytes.
const FIRST_READ: usize = 1024;
/// A head still incomplete at this size goes to hyper, which reads on to its own limit (16 KiB)
/// and answers 431 past it.
const MAX_HEAD: usize = 8 * 1024;
/// Headers parsed here at most; a request with more goes to hyper (which allows 100).
const MAX_HEADERS: usize = 32;

/// What a complete head turned out to be.
enum Head {
    /// A WebSocket upgrade, served here; the first `len` bytes read were its head.
    Upgrade {
        /// Boxed: 230 bytes, and the other variant is empty.
        request: Box<Request<()>>,
        mode: Mode,
        len: usize,
    },
    /// Anything else: hyper's.
    Other,
}

/// Serves one connection from its first byte: an upgrade here, anything else through hyper.
/// `_handshake` counts it against the handshake cap until it is a session or hyper is done.
pub(super) async fn serve<S>(mut stream: S, conn: Conn, _handshake: Handshake)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static + Into<Socket>,
{
    let timeout = conn.shared.config.header_timeout;
    let started = Instant::now();
    let mut buf = Vec::with_capacity(FIRST_READ);
    let mut stop = conn.stop.clone();
    let head = tokio::select! {
        head = tokio::time::timeout(timeout, read_head(&mut stream, &mut buf, &conn)) => head,
        // The node began to drain before this connection sent a request: as hyper does with
        // an idle connection, close it.
        _ = stop.changed() => return,
    };
    match head {
        Err(_) => tracing::debug!("no complete request head within {timeout:?}"),
        Ok(Err(e)) => tracing::debug!("reading a request head: {e}"),
        Ok(Ok(Head::Upgrade { request, mode, len })) => {
            let early = Bytes::copy_from_slice(&buf[len..]);
            drop(buf);
            // Boxed for the same reason, for the moment it runs: the answer and its write
            // are 1.5 KiB of state, and the wait for the head above is most of a handshake.
            Box::pin(upgrade(stream, *request, early, conn, mode)).await;
        }
        Ok(Ok(Head::Other)) => {
            // The header clock started at this head's first read; hyper gets what is left.
            let left = timeout.saturating_sub(started.elapsed());
            // Boxed: hyper's connection state is kilobytes, and inline it would make every
            // handshake's task that large, upgrades served here included.
            Box::pin(serve_http(Rewind::new(stream, buf), conn, left)).await;
        }
    }
}

/// Reads until `buf` holds a complete head (or cannot, within [`MAX_HEAD`]).
async fn read_head<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    conn: &Conn,
) -> io::Result<Head> {
    loop {
        if buf.len() == buf.capacity() {
            if buf.len() >= MAX_HEAD {
                return Ok(Head::Other);
            }
            buf.reserve(buf.len());
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut headers);
        match parsed.parse(buf) {
            Ok(httparse::Status::Complete(len)) => {
                return Ok(match upgrade_of(&parsed, conn) {
                    Some((request, mode)) => Head::Upgrade {
                        request: Box::new(request),
                        mode,
                        len,
                    },
                    None => Head::Other,
                });
            }
            Ok(httparse::Status::Partial) => {}
            // Too many headers, or not HTTP at all: hyper answers (or closes).
            Err(_) => return Ok(Head::Other),
        }
    }
}

/// The request as hyper would have built it, when it is one served here: a GET upgrade to
/// WebSocket of a session path, on the public address, in HTTP/1.1, with no body.
fn upgrade_of(parsed: &httparse::Request<'_, '_>, conn: &Conn) -> Option<(Request<()>, Mode)> {
    if parsed.method != Some("GET") || parsed.version != Some(1) || conn.admin {
        return None;
    }
    let target = parsed.path?;
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    let mode = match path {
        "/" => Mode::Rooms,
        "/echo" if conn.shared.config.echo => Mode::Echo,
        _ => return None,
    };
    let mut request = Request::builder()
        .method(Method::GET)
        .uri(target)
        .version(Version::HTTP_11)
        .body(())
        .ok()?;
    for header in parsed.headers.iter() {
        let name = HeaderName::from_bytes(header.name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(header.value).ok()?;
        request.headers_mut().append(name, value);
    }
    let headers = request.headers();
    let body = headers.contains_key(CONTENT_LENGTH) || headers.contains_key(TRANSFER_ENCODING);
    let upgrade = fastwebsockets::upgrade::is_upgrade_request(&request);
    (upgrade && !body).then_some((request, mode))
}

/// Admits the upgrade and answers it: the 101, then the session; or the refusal, then the close.
async fn upgrade<S>(mut stream: S, mut request: Request<()>, early: Bytes, conn: Conn, mode: Mode)
where
    S: AsyncWrite + Unpin + Into<Socket>,
{
    // The wait for hyper's upgrade is not needed: the socket is here already.
    let (response, admitted) = match routes::accept(&mut request, &conn) {
        Ok(accepted) => (accepted.response, accepted.admitted),
        Err(refusal) => return refuse(stream, *refusal).await,
    };
    let head = head_of(response.status(), response.headers(), None);
    if let Err(e) = stream.write_all(&head).await {
        // The slots go back as `admitted` drops.
        tracing::debug!("writing the 101: {e}");
        return;
    }
    tokio::spawn(routes::start(stream.into(), early, conn, admitted, mode));
}

/// Writes a refusal whole and closes: unlike hyper, no second request is read on this
/// connection (a refused WebSocket client opens a new one).
async fn refuse<S: AsyncWrite + Unpin>(mut stream: S, reply: Reply) {
    let (parts, body) = reply.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(never) => match never {},
    };
    let mut out = head_of(parts.status, &parts.headers, Some(body.len()));
    out.extend_from_slice(&body);
    if stream.write_all(&out).await.is_ok() {
        // A FIN after the answer, so the client reads all of it before the close.
        let _ = stream.shutdown().await;
    }
}

/// A response head; with `body`, its length and `connection: close`.
fn head_of(status: StatusCode, headers: &HeaderMap, body: Option<usize>) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    let reason = status.canonical_reason().unwrap_or("");
    // Writes to a Vec cannot fail.
    let _ = write!(out, "HTTP/1.1 {} {reason}\r\n", status.as_str());
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(len) = body {
        let _ = write!(out, "content-length: {len}\r\nconnection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// A stream with the bytes already read from it put back in front, for hyper.
pub(super) struct Rewind<S> {
    unread: Bytes,
    stream: S,
}

impl<S> Rewind<S> {
    fn new(stream: S, unread: Vec<u8>) -> Self {
        Self {
            unread: unread.into(),
            stream,
        }
    }

    /// The stream, and what of the bytes put back was not read again.
    pub(super) fn into_parts(self) -> (S, Bytes) {
        (self.stream, self.unread)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.unread.is_empty() {
            return Pin::new(&mut self.stream).poll_read(cx, buf);
        }
        let n = self.unread.len().min(buf.remaining());
        buf.put_slice(&self.unread[..n]);
        self.unread.advance(n);
        if self.unread.is_empty() {
            // Frees the head buffer now rather than with the connection.
            self.unread = Bytes::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
