//! The listener: accepts TCP, reads each connection's request head (`head`: a plain WebSocket
//! upgrade is answered there), speaks HTTP/1.1 through hyper for the rest (`routes`: probes,
//! metrics, pages, the API, unusual upgrades), hands upgraded sockets to sessions, and runs
//! graceful shutdown.
//!
//! Shutdown follows axum's pattern: every connection task holds a clone of a `watch::Receiver`;
//! the node flips it to `true` and waits (bounded by the drain timeout) until every receiver is
//! dropped, which is exactly when every task has finished. While it drains it keeps accepting,
//! so a load balancer still reaching it gets 503 with `Retry-After` (and `/readyz` 503) rather
//! than refused connections; connections accepted then hold a receiver of their own, so they
//! cannot hold the drain open.

mod api;
mod head;
mod live;
mod pages;
mod tls;

pub use self::tls::TlsError;
mod routes;

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;

use self::live::Live;
use crate::admission::{AddressSlot, Admission, Handshake};
use crate::auth::{AuthError, AuthMode, Verifier};
use crate::backplane::{Backplane, RedisError};
use crate::config::{Config, ConfigError};
use crate::metrics::{ConnectionSlot, Metrics, Refusal};
use crate::outbox::{self, Limits, Outbox};
use crate::room::Registry;
use crate::session::Access;
use crate::users::Users;

/// Failures that stop a node from starting.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A setting out of its range.
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    /// The Redis settings cannot be used.
    #[error(transparent)]
    Backplane(#[from] RedisError),
    /// An auth key cannot be used.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The TLS certificate or key cannot be used.
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    /// SIGHUP (the TLS reload) cannot be listened for.
    #[error("cannot listen for SIGHUP: {0}")]
    Signal(#[source] std::io::Error),
    /// The listen address cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why the bind failed.
        source: std::io::Error,
    },
}

/// State every connection of the node shares: one pointer, so each session pays 8 bytes for
/// it (the fields behind it are ~140 bytes, and every idle connection would carry a copy).
#[derive(Clone)]
pub(crate) struct Shared(Arc<NodeState>);

impl std::ops::Deref for Shared {
    type Target = NodeState;

    fn deref(&self) -> &NodeState {
        &self.0
    }
}

/// What [`Shared`] points to.
pub(crate) struct NodeState {
    pub config: Arc<Config>,
    pub registry: Registry,
    pub backplane: Backplane,
    pub metrics: Arc<Metrics>,
    pub admission: Arc<Admission>,
    /// Checks tokens; `None` when auth is off.
    pub verifier: Option<Arc<Verifier>>,
    pub users: Arc<Users>,
    /// Every session, for stopping and draining.
    pub live: Live,
    /// `--tls-cert`/`--tls-key`: the public listener speaks TLS.
    pub tls: Option<Arc<tls::Tls>>,
    /// Dashboards streaming now (at most `pages::MAX_VIEWERS`).
    pub viewers: Arc<std::sync::atomic::AtomicUsize>,
    /// Every outbox's bound: one, shared (see `Outbox`'s `limits`).
    outbox_limits: Arc<Limits>,
    next_id: AtomicU64,
}

/// What the handshake decided for a connection: its outbox (made here so the user registry
/// can reach it), what it may do, and its places under the caps.
pub(crate) struct Admitted {
    pub(crate) slots: Slots,
    pub(crate) outbox: Arc<Outbox>,
    pub(crate) access: Access,
}

/// An admitted connection's places under the node's connection cap and under its address's
/// caps, given back on drop, or handed over to its session.
#[derive(Debug)]
pub(crate) struct Slots {
    connection: ConnectionSlot,
    address: AddressSlot,
}

impl Slots {
    pub(crate) fn new(connection: ConnectionSlot, address: AddressSlot) -> Self {
        Self {
            connection,
            address,
        }
    }

    /// Ends the guards and returns the address their new holder, a session, gives them back
    /// with ([`Shared::give_back`]): it keeps 17 bytes where the guards took 40.
    pub(crate) fn hand_over(self) -> IpAddr {
        self.connection.hand_over();
        self.address.hand_over()
    }
}

impl Shared {
    /// Gives back the connection and address slots a session took over with
    /// [`Slots::hand_over`].
    pub(crate) fn give_back(&self, address: IpAddr) {
        self.metrics.release_connection();
        self.admission.give_back(address);
    }

    /// Must run inside the runtime: with Redis configured it starts the backplane worker.
    pub fn new(config: Config) -> Result<Self, ServerError> {
        let metrics = Arc::new(Metrics::default());
        let users = Arc::new(Users::new(config.auth.max_connections_per_user));
        let (registry, backplane) =
            Backplane::start(&config, Arc::clone(&metrics), Arc::clone(&users))?;
        let admission = Admission::new(config.addresses.clone(), config.max_handshakes);
        let tls = match &config.tls {
            Some(files) => Some(Arc::new(tls::Tls::load(&files.cert, &files.key)?)),
            None => None,
        };
        let verifier = match config.auth.mode {
            AuthMode::Off => None,
            _ => Some(Arc::new(Verifier::new(&config.auth)?)),
        };
        let outbox_limits = Arc::new(Limits {
            max_frames: config.outbox_frames,
            max_bytes: config.outbox_bytes,
            policy: config.slow_consumer,
            direct: config.direct_write,
            metrics: Arc::clone(&metrics),
        });
        Ok(Self(Arc::new(NodeState {
            config: Arc::new(config),
            registry,
            backplane,
            metrics,
            admission: Arc::new(admission),
            verifier,
            users,
            live: Live::new(),
            tls,
            viewers: Arc::default(),
            outbox_limits,
            next_id: AtomicU64::new(1),
        })))
    }

    pub fn outbox_limits(&self) -> Arc<Limits> {
        Arc::clone(&self.outbox_limits)
    }
}

/// The runtime a node runs on: `threads` workers (0: one per core). With one thread, a
/// current-thread runtime runs every task on the caller's thread: no work stealing and no
/// wake-ups across threads. Either way each worker writes the sockets its tasks claimed once
/// per pass, as it runs out of tasks (`outbox::end_of_pass`), and as it stops.
pub fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    if threads > 1 {
        builder.worker_threads(threads);
    }
    builder
        .on_thread_park(outbox::end_of_pass)
        .on_thread_stop(outbox::end_of_pass)
        .enable_all()
        .build()
}

/// A bound, not yet running node: [`bind`](Self::bind), then [`run`](Self::run).
pub struct Server {
    listener: TcpListener,
    /// `--admin-listen`: the probes, metrics and dashboard, plaintext.
    admin: Option<TcpListener>,
    /// With TLS: SIGHUP, registered as the node binds, so a reload asked for as soon as the
    /// node is up is never the signal's default (the end of the process).
    hangups: Option<tokio::signal::unix::Signal>,
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
        let admin = match config.admin_listen {
            Some(addr) => Some(listen(addr).map_err(|source| ServerError::Bind { addr, source })?),
            None => None,
        };
        let shared = Shared::new(config)?;
        let hangups = match &shared.tls {
            Some(_) => Some(tls::hangups()?),
            None => None,
        };
        Ok(Self {
            listener,
            admin,
            hangups,
            shared,
        })
    }

    /// The admin address bound (`--admin-listen`), with the port the OS chose for port 0.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The address bound, with the port the OS chose for port 0.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or(self.shared.config.listen)
    }

    /// Serves until `shutdown` resolves, then drains: sessions flush what is queued and close
    /// with 1001 within the drain timeout, while new arrivals are told 503.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let reloads = match (self.shared.tls.clone(), self.hangups) {
            (Some(tls), Some(hangups)) => Some(tokio::spawn(tls::reload_on(hangups, tls))),
            _ => None,
        };
        let public = Face::Public(self.shared.tls.clone());
        let admin = async {
            match &self.admin {
                Some(listener) => accept_loop(listener, &self.shared, &stop_rx, Face::Admin).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = accept_loop(&self.listener, &self.shared, &stop_rx, public.clone()) => {}
            _ = admin => {}
            _ = shutdown => {}
        }
        if let Some(reloads) = reloads {
            reloads.abort();
        }
        drop(stop_rx);
        tracing::info!("shutting down: draining sessions");
        let _ = stop_tx.send(true);
        self.shared.live.stop_all();
        let (_draining_tx, draining) = watch::channel(true);
        let grace = self.shared.config.drain_timeout + Duration::from_secs(1);
        tokio::select! {
            _ = accept_loop(&self.listener, &self.shared, &draining, public) => {}
            drained = tokio::time::timeout(grace, async {
                // HTTP connections (and upgrades not yet sessions) hold a receiver each.
                stop_tx.closed().await;
                self.shared.live.drained().await;
            }) => {
                if drained.is_err() {
                    tracing::warn!("drain timeout passed with sessions still open");
                }
            }
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

/// What a connection over the handshake cap is told before it is closed; hyper never sees it.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n\
    Content-Length: 0\r\nConnection: close\r\n\r\n";

/// Which listener a connection came in on.
#[derive(Clone)]
enum Face {
    /// The public address: WebSocket sessions and everything else not on the admin address;
    /// TLS when configured.
    Public(Option<Arc<tls::Tls>>),
    /// `--admin-listen`: probes, metrics and the dashboard only.
    Admin,
}

async fn accept_loop(
    listener: &TcpListener,
    shared: &Shared,
    stop: &watch::Receiver<bool>,
    face: Face,
) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let Some(handshake) = shared.admission.try_handshake() else {
                    shared.metrics.add_refused(Refusal::Handshakes);
                    // Best effort: a fresh socket's send buffer is empty, so this rarely fails.
                    let _ = stream.try_write(BUSY);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                if let Some(size) = shared.config.send_buffer {
                    let _ = socket2::SockRef::from(&stream).set_send_buffer_size(size);
                }
                let conn = Conn {
                    peer,
                    shared: shared.clone(),
                    stop: stop.clone(),
                    accepted: tokio::time::Instant::now(),
                    admin: matches!(face, Face::Admin),
                };
                match &face {
                    Face::Public(Some(tls)) => {
                        tokio::spawn(tls::serve(Arc::clone(tls), stream, conn, handshake));
                    }
                    Face::Public(None) | Face::Admin => {
                        tokio::spawn(head::serve(stream, conn, handshake));
                    }
                }
            }
            Err(e) => {
                // Out of file descriptors or similar: back off instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// What a request handler knows about its connection.
#[derive(Clone)]
struct Conn {
    peer: SocketAddr,
    shared: Shared,
    stop: watch::Receiver<bool>,
    /// When the TCP connection was accepted: the handshake-time histogram starts here.
    accepted: tokio::time::Instant,
    /// It came in on the admin address.
    admin: bool,
}

/// Serves one HTTP connection through hyper, which allows `header_timeout` for each request
/// head: what is left of the configured timeout after `head` read the first one's start, so
/// a slow first head is dropped on the clock that began at its first byte.
async fn serve_http<S>(stream: S, conn: Conn, header_timeout: Duration)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut stop = conn.stop.clone();
    let service = service_fn(move |req| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(routes::route(req, conn).await) }
    });
    let http = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(16 * 1024)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(http);
    tokio::select! {
        res = http.as_mut() => {
            if let Err(e) = res {
                tracing::debug!("http connection ended: {e}");
            }
        }
        _ = stop.changed() => {
            http.as_mut().graceful_shutdown();
            let _ = http.await;
        }
    }
}
