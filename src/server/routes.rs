//! The HTTP API: probes, metrics, and the upgrade with its admission checks.
//!
//! | path | answer |
//! |---|---|
//! | `GET /` with upgrade headers | the WebSocket session, after the checks in [`accept`] (a plain upgrade is served by `head`, before hyper) |
//! | `GET /livez` | 200 while the process serves HTTP: the liveness probe (never fails for Redis) |
//! | `GET /readyz` | 200 when accepting and the backplane (if any) is healthy, else 503: the readiness probe |
//! | `GET /healthz` | JSON figures for people and dashboards; 503 "degraded" while the backplane is down |
//! | `GET /metrics` | Prometheus text |
//! | `GET /`, `/demo.js`, `/roomcast.js`, `/dashboard`, `/dashboard.js` (no upgrade) | the demo page, its client and the dashboard (`pages`) |
//! | `GET /dashboard/events` | the dashboard's figures, one Server-Sent Event a second |
//! | `POST /api/...`, `GET /api/history` | the trusted server API (`api`) |
//!
//! With `--admin-listen`, the probes, `/metrics` and the dashboard answer only on the admin
//! address, and everything else only on the public one (404 elsewhere).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use fastwebsockets::upgrade::UpgradeFut;
use fastwebsockets::WebSocket;
use futures_util::future::Either;
use futures_util::FutureExt;
use http_body_util::{Empty, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER, SEC_WEBSOCKET_PROTOCOL};
use hyper::upgrade::Upgraded;
use hyper::{HeaderMap, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpStream, UnixStream};
use tokio::time::Instant;

use super::head::Rewind;
use super::{pages, Admitted, Conn, Shared, Slots};
use crate::admission::client_address;
use crate::auth::{handshake_token, AuthMode, Identity};
use crate::metrics::Refusal;
use crate::outbox::{ConnId, Outbox};
use crate::protocol::{Format, ENVELOPE_PROTOCOL};
use crate::session::{Access, Grant, Mode, Session};
use crate::socket::Socket;

pub(super) type Reply = Response<Full<Bytes>>;

/// What an operator reads: served on `--admin-listen` when there is one, and then only there.
fn for_operators(path: &str) -> bool {
    matches!(
        path,
        "/healthz"
            | "/livez"
            | "/readyz"
            | "/metrics"
            | "/dashboard"
            | "/dashboard.js"
            | "/dashboard/events"
    )
}

/// Every answer but the dashboard's stream is whole.
pub(super) async fn route(req: Request<Incoming>, conn: Conn) -> pages::Reply {
    let split = conn.shared.config.admin_listen.is_some();
    if split && for_operators(req.uri().path()) != conn.admin {
        let body = "not found\n".to_owned();
        return text(StatusCode::NOT_FOUND, "text/plain", body).map(http_body_util::Either::Left);
    }
    let wants_upgrade = fastwebsockets::upgrade::is_upgrade_request(&req);
    if req.method() == Method::GET && !wants_upgrade && conn.shared.config.pages {
        let path = req.uri().path();
        if path == "/dashboard/events" {
            return pages::events(&conn.shared, conn.stop.clone()).unwrap_or_else(|| {
                let busy = "too many dashboards are open; retry later\n".to_owned();
                text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", busy)
                    .map(http_body_util::Either::Left)
            });
        }
        if let Some((content_type, body)) = pages::asset(path) {
            return pages::page(content_type, body);
        }
    }
    whole(req, conn).await.map(http_body_util::Either::Left)
}

async fn whole(req: Request<Incoming>, conn: Conn) -> Reply {
    let api = match *req.method() {
        Method::POST => req.uri().path().starts_with("/api/"),
        Method::GET => req.uri().path() == "/api/history",
        _ => false,
    };
    if api {
        return super::api::handle(req, &conn.shared).await;
    }
    let wants_upgrade = fastwebsockets::upgrade::is_upgrade_request(&req);
    let shared = &conn.shared;
    match (req.method(), req.uri().path(), wants_upgrade) {
        (&Method::GET, "/", true) => upgrade(req, conn, Mode::Rooms),
        (&Method::GET, "/echo", true) if shared.config.echo => upgrade(req, conn, Mode::Echo),
        (&Method::GET, "/livez", _) => text(StatusCode::OK, "text/plain", "live\n".to_owned()),
        (&Method::GET, "/readyz", _) => readyz(&conn),
        (&Method::GET, "/healthz", _) => healthz(shared),
        (&Method::GET, "/metrics", _) => metrics(shared),
        (&Method::GET, "/", false) => text(
            StatusCode::UPGRADE_REQUIRED,
            "text/plain",
            "roomcast speaks WebSocket on this path\n".to_owned(),
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        ),
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Reply {
    let mut res = Response::new(Full::new(Bytes::from(body)));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    res
}

/// Ready means: not draining, and the backplane (when configured) can carry messages.
fn readyz(conn: &Conn) -> Reply {
    let why_not = if *conn.stop.borrow() {
        Some("draining")
    } else if !conn.shared.backplane.is_healthy() {
        Some("backplane unavailable")
    } else {
        None
    };
    match why_not {
        None => text(StatusCode::OK, "text/plain", "ready\n".to_owned()),
        Some(why) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            format!("{why}\n"),
        ),
    }
}

fn metrics(shared: &Shared) -> Reply {
    let queues = shared.backplane.queues();
    let gauges = [
        (
            "roomcast_rooms",
            "rooms with members on this node",
            shared.registry.room_count() as u64,
        ),
        (
            "roomcast_handshakes",
            "HTTP connections not yet upgraded",
            shared.admission.handshakes() as u64,
        ),
        (
            "roomcast_tracked_addresses",
            "client addresses counted for per-address caps",
            shared.admission.tracked() as u64,
        ),
        (
            "roomcast_dashboard_viewers",
            "dashboard event streams open (at most 16)",
            shared.viewers.load(Ordering::Relaxed) as u64,
        ),
        (
            "roomcast_backplane_queue_messages",
            "accepted publishes waiting for Redis",
            queues.outgoing.0,
        ),
        (
            "roomcast_backplane_queue_bytes",
            "their bytes",
            queues.outgoing.1,
        ),
        (
            "roomcast_backplane_inbox_messages",
            "messages from Redis waiting for fan-out",
            queues.incoming.0,
        ),
        (
            "roomcast_backplane_inbox_bytes",
            "their bytes",
            queues.incoming.1,
        ),
    ];
    let mut body = shared.metrics.snapshot().prometheus(&gauges);
    if let Some(tls) = &shared.tls {
        tls.prometheus(&mut body);
    }
    if let Some(history) = shared.backplane.history() {
        history_metrics(&history.stats(), &mut body);
    }
    text(StatusCode::OK, "text/plain; version=0.0.4", body)
}

/// The room-history series, when history is on.
fn history_metrics(stats: &crate::history::HistoryStats, body: &mut String) {
    for (name, kind, help, value) in [
        (
            "roomcast_history_bytes",
            "gauge",
            "bytes of room history held",
            stats.bytes,
        ),
        (
            "roomcast_history_rooms",
            "gauge",
            "rooms with history",
            stats.rooms,
        ),
        (
            "roomcast_history_evicted_rooms_total",
            "counter",
            "rooms whose history was evicted to stay under --history-max-bytes",
            stats.evicted,
        ),
        (
            "roomcast_history_gaps_total",
            "counter",
            "messages from Redis whose offset did not follow their room's last one here",
            stats.gaps,
        ),
    ] {
        let _ = writeln!(
            body,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    }
}

fn healthz(shared: &Shared) -> Reply {
    let m = shared.metrics.snapshot();
    let history = shared
        .backplane
        .history()
        .map(|h| h.stats())
        .unwrap_or_default();
    let healthy = shared.backplane.is_healthy();
    let body = format!(
        concat!(
            r#"{{"status":"{}","connections":{},"rooms":{},"messages_in":{},"#,
            r#""deliveries":{},"dropped":{},"slow_consumers_closed":{},"frames_per_write":{:.2},"#,
            r#""throttled":{},"rate_limited":{},"rate_limit_closed":{},"incomplete_closed":{},"#,
            r#""pongs_replaced":{},"outbox_peak_bytes":{},"pass_peak_bytes":{},"refused":{},"#,
            r#""backplane_refused":{},"backplane_failed":{},"backplane_dropped":{},"#,
            r#""backplane_connects":{},"fanout_yields":{},"resumes_recovered":{},"#,
            r#""resumes_lost":{},"history_bytes":{},"history_rooms":{},"history_evicted_rooms":{},"#,
            r#""history_gaps":{},"history_repaired":{},"history_stream_reads":{},"#,
            r#""history_stream_reads_refused":{}}}"#
        ),
        if healthy { "ok" } else { "degraded" },
        m.connections,
        shared.registry.room_count(),
        m.messages_in,
        m.deliveries,
        m.dropped,
        m.slow_closed,
        m.frames_per_write(),
        m.throttled,
        m.rate_limited,
        m.rate_limit_closed,
        m.incomplete_closed,
        m.pongs_replaced,
        m.outbox_peak_bytes,
        m.pass_peak_bytes,
        m.refused,
        m.backplane_refused,
        m.backplane_failed,
        m.backplane_dropped,
        m.backplane_connects,
        m.fanout_yields,
        m.resumes_recovered,
        m.resumes_lost,
        history.bytes,
        history.rooms,
        history.evicted,
        history.gaps,
        m.history_repaired,
        m.stream_reads,
        m.stream_reads_refused,
    );
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    text(status, "application/json", body)
}

/// An upgrade refused for `why`: counted, and answered with the status the protocol table
/// gives (401 for a bad token, 403 for a foreign origin, 429 for the address's and the user's
/// caps, 503 for the node's), with `Retry-After` where trying again later can help.
fn refuse(shared: &Shared, why: Refusal) -> Reply {
    shared.metrics.add_refused(why);
    let (status, body) = match why {
        Refusal::Unauthorized => {
            let mut res = text(
                StatusCode::UNAUTHORIZED,
                "text/plain",
                "token refused\n".to_owned(),
            );
            res.headers_mut().insert(
                hyper::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer"),
            );
            return res;
        }
        Refusal::Origin => {
            return text(
                StatusCode::FORBIDDEN,
                "text/plain",
                "origin not allowed\n".to_owned(),
            );
        }
        Refusal::PerUser => (
            StatusCode::TOO_MANY_REQUESTS,
            "too many connections for this user\n",
        ),
        Refusal::PerIp => (
            StatusCode::TOO_MANY_REQUESTS,
            "too many connections from your address\n",
        ),
        Refusal::RatePerIp => (
            StatusCode::TOO_MANY_REQUESTS,
            "too many connection attempts from your address\n",
        ),
        Refusal::MaxConnections => (
            StatusCode::SERVICE_UNAVAILABLE,
            "connection limit reached\n",
        ),
        Refusal::Handshakes => (
            StatusCode::SERVICE_UNAVAILABLE,
            "too many handshakes in progress\n",
        ),
        Refusal::Draining => (StatusCode::SERVICE_UNAVAILABLE, "server is draining\n"),
    };
    let mut res = text(status, "text/plain", body.to_owned());
    res.headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    res
}

/// The client's address as the caps see it: the peer, or what a trusted proxy says.
fn client(peer: SocketAddr, headers: &HeaderMap, shared: &Shared) -> std::net::IpAddr {
    let forwarded: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let joined = (!forwarded.is_empty()).then(|| forwarded.join(","));
    client_address(
        peer.ip(),
        joined.as_deref(),
        shared.admission.trusted_proxies(),
    )
}

/// Checks, in order: draining, the origin, the token, the address's attempt rate and
/// connection cap, the node's connection cap, the user's cap. Past them all the socket becomes
/// a session.
fn admit<B>(req: &Request<B>, conn: &Conn) -> Result<Admitted, Refusal> {
    let shared = &conn.shared;
    if *conn.stop.borrow() {
        return Err(Refusal::Draining);
    }
    check_origin(req.headers(), shared)?;
    let identity = handshake_identity(req, shared)?;
    let client = client(conn.peer, req.headers(), shared);
    let address = shared.admission.try_admit(client, Instant::now())?;
    let max = shared.config.max_connections as u64;
    let connection = shared
        .metrics
        .try_connection_slot(max)
        .ok_or(Refusal::MaxConnections)?;
    let id = ConnId(shared.next_id.fetch_add(1, Ordering::Relaxed));
    let format = requested_format(req.headers());
    let outbox = Arc::new(Outbox::new(id, shared.outbox_limits()).with_format(format));
    let access = access(identity, &outbox, shared)?;
    Ok(Admitted {
        slots: Slots::new(connection, address),
        outbox,
        access,
    })
}

/// Envelope mode when the client offers the `roomcast.v2` subprotocol among its
/// `Sec-WebSocket-Protocol` values (one header or several, comma-separated); otherwise the
/// version 1 format, whatever else it offers (no subprotocol is then selected).
fn requested_format(headers: &HeaderMap) -> Format {
    let offered = headers
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim() == ENVELOPE_PROTOCOL);
    if offered {
        Format::Envelope
    } else {
        Format::Bare
    }
}

/// A browser's `Origin` must be on the allow-list when there is one; a handshake without
/// `Origin` is not from a browser page and is allowed.
fn check_origin(headers: &HeaderMap, shared: &Shared) -> Result<(), Refusal> {
    let allowed = &shared.config.allowed_origins;
    let Some(origin) = headers.get(hyper::header::ORIGIN) else {
        return Ok(());
    };
    if allowed.is_empty() {
        return Ok(());
    }
    let origin = origin.to_str().map_err(|_| Refusal::Origin)?;
    if allowed.iter().any(|pattern| pattern.matches(origin)) {
        Ok(())
    } else {
        Err(Refusal::Origin)
    }
}

/// The identity the handshake's token proves: `None` without a token (or with auth off), 401
/// for a bad one. The token is never logged.
fn handshake_identity<B>(req: &Request<B>, shared: &Shared) -> Result<Option<Identity>, Refusal> {
    let Some(verifier) = &shared.verifier else {
        return Ok(None);
    };
    let authorization = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let Some(token) = handshake_token(authorization, req.uri().query()) else {
        return Ok(None);
    };
    verifier.verify(&token).map(Some).map_err(|e| {
        tracing::debug!("handshake {e}");
        Refusal::Unauthorized
    })
}

/// What the connection may do from the start.
fn access(
    identity: Option<Identity>,
    outbox: &Arc<Outbox>,
    shared: &Shared,
) -> Result<Access, Refusal> {
    let Some(verifier) = &shared.verifier else {
        return Ok(Access::Open);
    };
    match identity {
        Some(identity) => {
            let slot = match &identity.user {
                Some(user) => Some(
                    shared
                        .users
                        .add(user, outbox)
                        .map_err(|_| Refusal::PerUser)?,
                ),
                None => None,
            };
            Ok(Access::Granted(Box::new(Grant::of(&identity, slot))))
        }
        None if shared.config.auth.mode == AuthMode::Required => {
            Ok(Access::Pending(Instant::now() + shared.config.auth.timeout))
        }
        None => Ok(Access::Granted(Box::new(Grant {
            grants: Arc::clone(verifier.anonymous()),
            expires: None,
            user: None,
        }))),
    }
}

fn upgrade(mut req: Request<Incoming>, conn: Conn, mode: Mode) -> Reply {
    let Accepted {
        response,
        upgrading,
        admitted,
    } = match accept(&mut req, &conn) {
        Ok(accepted) => accepted,
        Err(refusal) => return *refusal,
    };
    // `then` keeps the task in one of two states, the upgrade (with what the session will
    // need) or the session, never both: an `async` block would keep a slot for every captured
    // value for the task's whole life, even once moved into the session, and this task's size
    // is paid by every idle connection (about 200 bytes here).
    tokio::spawn(upgrading.then(move |upgraded| {
        let stream = match upgraded {
            Ok(ws) => socket_of(ws),
            Err(e) => {
                tracing::debug!("upgrade failed: {e}");
                None
            }
        };
        // The session owns the slots from here, so they are given back when the session
        // drops, however it ends; on a failed upgrade they drop here.
        match stream {
            Some((stream, early)) => Either::Left(start(stream, early, conn, admitted, mode)),
            None => Either::Right(std::future::ready(())),
        }
    }));
    response.map(|_| Full::new(Bytes::new()))
}

/// An admitted WebSocket upgrade.
pub(super) struct Accepted {
    /// The 101 to answer it with, naming our subprotocol when the client offered it.
    pub(super) response: Response<Empty<Bytes>>,
    /// hyper's wait for the socket (never ready when `head` served the request itself).
    pub(super) upgrading: UpgradeFut,
    /// What the session starts with.
    pub(super) admitted: Admitted,
}

/// Admits a WebSocket upgrade, or gives the answer that refuses it.
pub(super) fn accept<B>(req: &mut Request<B>, conn: &Conn) -> Result<Accepted, Box<Reply>> {
    let admitted = admit(req, conn).map_err(|why| Box::new(refuse(&conn.shared, why)))?;
    let (mut response, upgrading) = fastwebsockets::upgrade::upgrade(req).map_err(|e| {
        let body = format!("bad WebSocket upgrade: {e}\n");
        Box::new(text(StatusCode::BAD_REQUEST, "text/plain", body))
    })?;
    if admitted.outbox.format() == Format::Envelope {
        response.headers_mut().insert(
            SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(ENVELOPE_PROTOCOL),
        );
    }
    Ok(Accepted {
        response,
        upgrading,
        admitted,
    })
}

/// The session of an upgraded `stream`, the handshake's time recorded. `early` holds what
/// was read past the request.
pub(super) fn start(
    stream: Socket,
    early: Bytes,
    conn: Conn,
    admitted: Admitted,
    mode: Mode,
) -> impl std::future::Future<Output = ()> {
    let Conn {
        shared,
        stop,
        accepted,
        ..
    } = conn;
    let waited = accepted.elapsed().as_micros() as u64;
    shared.metrics.handshake_us.observe(waited);
    let session = Session::run(stream, early, shared, admitted, mode);
    // Held until the session is among the node's live ones, so a drain that began meanwhile
    // waits for it.
    drop(stop);
    session
}

/// The socket under a finished upgrade (a plaintext connection's TCP stream, or a TLS
/// connection's end of its pair), with any bytes read past the request: those [`Rewind`] had
/// not handed to hyper yet, then those hyper had read.
fn socket_of(ws: WebSocket<TokioIo<Upgraded>>) -> Option<(Socket, Bytes)> {
    fn joined<S: Into<Socket>>(
        parts: hyper::upgrade::Parts<TokioIo<Rewind<S>>>,
    ) -> (Socket, Bytes) {
        let (stream, unread) = parts.io.into_inner().into_parts();
        let early = if unread.is_empty() {
            parts.read_buf
        } else {
            [unread, parts.read_buf].concat().into()
        };
        (stream.into(), early)
    }
    let upgraded = ws.into_inner().into_inner();
    let upgraded = match upgraded.downcast::<TokioIo<Rewind<TcpStream>>>() {
        Ok(parts) => return Some(joined(parts)),
        Err(upgraded) => upgraded,
    };
    match upgraded.downcast::<TokioIo<Rewind<UnixStream>>>() {
        Ok(parts) => Some(joined(parts)),
        Err(_) => {
            tracing::error!("upgraded connection is neither a TCP stream nor a TLS pair");
            None
        }
    }
}
