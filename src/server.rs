//! The listener: accepts TCP, speaks HTTP/1.1 through hyper (`/healthz`, `/metrics`, upgrades),
//! hands upgraded sockets to sessions, and runs graceful shutdown.
//!
//! Shutdown follows axum's pattern: every connection task holds a clone of a `watch::Receiver`;
//! the node flips it to `true`, stops accepting, and waits (bounded by the drain timeout) until
//! every receiver is dropped, which is exactly when every task has finished.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fastwebsockets::WebSocket;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, RETRY_AFTER};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::upgrade::Upgraded;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;

use crate::backplane::{Backplane, RedisError};
use crate::config::{Config, ConfigError};
use crate::metrics::Metrics;
use crate::outbox::{ConnId, Limits};
use crate::room::Registry;
use crate::session::{Mode, Session};

/// Failures that stop a node from starting.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A setting out of its range.
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    /// The Redis settings cannot be used.
    #[error(transparent)]
    Backplane(#[from] RedisError),
    /// The listen address cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why the bind failed.
        source: std::io::Error,
    },
}

/// State every connection of the node shares; cheap to clone.
#[derive(Clone)]
pub(crate) struct Shared {
    pub config: Arc<Config>,
    pub registry: Registry,
    pub backplane: Backplane,
    pub metrics: Arc<Metrics>,
    next_id: Arc<AtomicU64>,
}

impl Shared {
    /// Must run inside the runtime: with Redis configured it starts the backplane worker.
    pub fn new(config: Config) -> Result<Self, ServerError> {
        let metrics = Arc::new(Metrics::default());
        let (registry, backplane) = Backplane::start(&config, Arc::clone(&metrics))?;
        Ok(Self {
            config: Arc::new(config),
            registry,
            backplane,
            metrics,
            next_id: Arc::new(AtomicU64::new(1)),
        })
    }

    pub fn outbox_limits(&self) -> Limits {
        Limits {
            max_frames: self.config.outbox_frames,
            max_bytes: self.config.outbox_bytes,
            policy: self.config.slow_consumer,
        }
    }
}

/// A bound, not yet running node: [`bind`](Self::bind), then [`run`](Self::run).
pub struct Server {
    listener: TcpListener,
    shared: Shared,
}

impl Server {
    /// Validates `config`, binds its listen address and, with Redis configured, starts the
    /// backplane worker (so it must run inside the runtime). Nothing is served until
    /// [`run`](Self::run).
    pub async fn bind(config: Config) -> Result<Self, ServerError> {
        config.validate()?;
        let addr = config.listen;
        let listener = listen(addr).map_err(|source| ServerError::Bind { addr, source })?;
        Ok(Self {
            listener,
            shared: Shared::new(config)?,
        })
    }

    /// The address bound, with the port the OS chose for port 0.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or(self.shared.config.listen)
    }

    /// Serves until `shutdown` resolves, then drains: sessions flush what is queued and close
    /// with 1001 within the drain timeout.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let (stop_tx, stop_rx) = watch::channel(false);
        tokio::select! {
            _ = accept_loop(&self.listener, &self.shared, &stop_rx) => {}
            _ = shutdown => {}
        }
        drop(self.listener);
        drop(stop_rx);
        tracing::info!("shutting down: draining sessions");
        let _ = stop_tx.send(true);
        let grace = self.shared.config.drain_timeout + Duration::from_secs(1);
        if tokio::time::timeout(grace, stop_tx.closed()).await.is_err() {
            tracing::warn!("drain timeout passed with sessions still open");
        }
    }
}

/// Connection storms (10,000 clients at once) overflow std's default backlog of 128 and cost
/// each overflowed client a one-second SYN retransmit; the kernel caps this at somaxconn.
const BACKLOG: u32 = 4096;

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

async fn accept_loop(listener: &TcpListener, shared: &Shared, stop: &watch::Receiver<bool>) {
    loop {
        match listener.accept().await {
            Ok((stream, _peer)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve_http(stream, shared.clone(), stop.clone()));
            }
            Err(e) => {
                // Out of file descriptors or similar: back off instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_http(stream: TcpStream, shared: Shared, mut stop: watch::Receiver<bool>) {
    let svc_shared = shared.clone();
    let svc_stop = stop.clone();
    let service = service_fn(move |req| {
        let shared = svc_shared.clone();
        let stop = svc_stop.clone();
        async move { Ok::<_, Infallible>(route(req, shared, stop)) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(shared.config.header_timeout)
        .max_buf_size(16 * 1024)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        res = conn.as_mut() => {
            if let Err(e) = res {
                tracing::debug!("http connection ended: {e}");
            }
        }
        _ = stop.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::from(body)));
    *res.status_mut() = status;
    res.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    res
}

fn route(
    req: Request<Incoming>,
    shared: Shared,
    stop: watch::Receiver<bool>,
) -> Response<Full<Bytes>> {
    let upgrade = fastwebsockets::upgrade::is_upgrade_request(&req);
    match (req.method(), req.uri().path(), upgrade) {
        (&Method::GET, "/", true) => upgrade_session(req, shared, stop, Mode::Rooms),
        (&Method::GET, "/echo", true) if shared.config.echo => {
            upgrade_session(req, shared, stop, Mode::Echo)
        }
        (&Method::GET, "/healthz", _) => healthz(&shared),
        (&Method::GET, "/metrics", _) => text(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            shared
                .metrics
                .snapshot()
                .prometheus(shared.registry.room_count()),
        ),
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

fn healthz(shared: &Shared) -> Response<Full<Bytes>> {
    let m = shared.metrics.snapshot();
    let healthy = shared.backplane.is_healthy();
    let body = format!(
        concat!(
            r#"{{"status":"{}","connections":{},"rooms":{},"messages_in":{},"#,
            r#""deliveries":{},"dropped":{},"slow_consumers_closed":{},"frames_per_write":{:.2},"#,
            r#""throttled":{},"rate_limited":{},"rate_limit_closed":{},"incomplete_closed":{},"#,
            r#""pongs_replaced":{},"outbox_peak_bytes":{}}}"#
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
    );
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    text(status, "application/json", body)
}

fn upgrade_session(
    mut req: Request<Incoming>,
    shared: Shared,
    stop: watch::Receiver<bool>,
    mode: Mode,
) -> Response<Full<Bytes>> {
    let max = shared.config.max_connections as u64;
    let Some(slot) = shared.metrics.try_connection_slot(max) else {
        shared.metrics.add_refused();
        let mut res = text(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "connection limit reached\n".to_owned(),
        );
        res.headers_mut()
            .insert(RETRY_AFTER, hyper::header::HeaderValue::from_static("1"));
        return res;
    };
    let (response, upgrading) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(pair) => pair,
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                "text/plain",
                format!("bad WebSocket upgrade: {e}\n"),
            );
        }
    };
    tokio::spawn(async move {
        let id = ConnId(shared.next_id.fetch_add(1, Ordering::Relaxed));
        // Only the session's own future may live across its `.await`: an `async` block keeps
        // a slot for every local held over an await (even one moved out before it), and this
        // task's size is paid by every idle connection.
        let stream = match upgrading.await {
            Ok(ws) => tcp_stream(ws),
            Err(e) => {
                tracing::debug!("upgrade failed: {e}");
                None
            }
        };
        // The session owns the slot from here, so it is given back when the session drops,
        // however it ends; on a failed upgrade it drops here.
        if let Some((stream, early)) = stream {
            Session::run(stream, early, id, shared, slot, mode, stop).await;
        }
    });
    response.map(|_| Full::new(Bytes::new()))
}

/// The TCP stream under a finished upgrade, with any bytes hyper read past the request.
fn tcp_stream(ws: WebSocket<TokioIo<Upgraded>>) -> Option<(TcpStream, Bytes)> {
    match ws
        .into_inner()
        .into_inner()
        .downcast::<TokioIo<TcpStream>>()
    {
        Ok(parts) => Some((parts.io.into_inner(), parts.read_buf)),
        Err(_) => {
            tracing::error!("upgraded connection is not a TCP stream");
            None
        }
    }
}
