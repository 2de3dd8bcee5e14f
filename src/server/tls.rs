//! TLS (`--tls-cert`, `--tls-key`): `wss://` and `https://` with rustls, reloaded on SIGHUP.
//!
//! A TLS connection gets its own path so the plaintext one stays as it is (see
//! [`crate::socket`]): after the handshake, a Unix socket pair stands in for the TCP stream.
//! hyper, the upgrade and the session use one end exactly as they use a plaintext TCP stream
//! (non-blocking reads, direct writes from publishers); a pump task copies between the other
//! end and the rustls stream, decrypting what arrives and encrypting what leaves. The pair's
//! buffers are kept small ([`PAIR_BUFFER`]) so a slow TLS reader still fills its outbox, and
//! is still judged a slow consumer, about as soon as a plaintext one.
//!
//! The certificate and key are read again on SIGHUP: new connections get the new pair,
//! connections already open keep theirs, and a pair that fails to load is logged and the old
//! one kept.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use tokio::net::{TcpStream, UnixStream};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_rustls::TlsAcceptor;

use super::{head, Conn, Handshake};

/// Each direction of the pair holds about this much (the kernel doubles `SO_SNDBUF`): enough
/// for a burst of frames, small beside the outbox's 1 MiB bound.
const PAIR_BUFFER: usize = 32 * 1024;

/// Why a certificate and key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file that cannot be read or parsed.
    #[error("{path}: {source}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: rustls::pki_types::pem::Error,
    },
    /// A certificate file without a certificate.
    #[error("{0}: no certificate in the file")]
    NoCertificate(PathBuf),
    /// The pair does not make a server configuration (a key that does not match, say).
    #[error("the certificate and key cannot be used: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The node's TLS settings: the files, and the configuration made from them last.
pub(crate) struct Tls {
    cert: PathBuf,
    key: PathBuf,
    /// Swapped whole on reload; every handshake loads it once. `ArcSwap` because reads are
    /// one per connection and must never wait for a reload.
    config: ArcSwap<ServerConfig>,
    /// Reloads that took, and that failed (the pair in use kept).
    reloaded: AtomicU64,
    reload_failed: AtomicU64,
}

impl Tls {
    /// Loads the pair; fails if it cannot be used.
    pub(crate) fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        Ok(Self {
            config: ArcSwap::from_pointee(server_config(cert, key)?),
            cert: cert.to_owned(),
            key: key.to_owned(),
            reloaded: AtomicU64::new(0),
            reload_failed: AtomicU64::new(0),
        })
    }

    /// Reads the files again; on failure the pair in use stays.
    pub(crate) fn reload(&self) -> Result<(), TlsError> {
        match server_config(&self.cert, &self.key) {
            Ok(config) => {
                self.config.store(Arc::new(config));
                self.reloaded.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.reload_failed.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// `roomcast_tls_reloads_total`, by result.
    pub(crate) fn prometheus(&self, out: &mut String) {
        use std::fmt::Write as _;
        let name = "roomcast_tls_reloads_total";
        let _ = writeln!(
            out,
            "# HELP {name} certificate reloads on SIGHUP, by result\n# TYPE {name} counter\n\
             {name}{{result=\"ok\"}} {}\n{name}{{result=\"failed\"}} {}",
            self.reloaded.load(Ordering::Relaxed),
            self.reload_failed.load(Ordering::Relaxed)
        );
    }

    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.config.load_full())
    }
}

fn server_config(cert: &Path, key: &Path) -> Result<ServerConfig, TlsError> {
    fn pem(path: &Path) -> impl Fn(rustls::pki_types::pem::Error) -> TlsError + '_ {
        move |source| TlsError::Pem {
            path: path.to_owned(),
            source,
        }
    }
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(pem(cert))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem(cert))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(cert.to_owned()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(pem(key))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Serves one TLS connection: the handshake (within the header timeout), then HTTP over the
/// plaintext end of a socket pair while a pump carries the bytes (see the module doc).
pub(super) async fn serve(tls: Arc<Tls>, stream: TcpStream, conn: Conn, handshake: Handshake) {
    let timeout = conn.shared.config.header_timeout;
    let secured = match tokio::time::timeout(timeout, tls.acceptor().accept(stream)).await {
        Ok(Ok(secured)) => secured,
        Ok(Err(e)) => {
            tracing::debug!("TLS handshake failed: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!("TLS handshake not done within {timeout:?}");
            return;
        }
    };
    let (ours, theirs) = match pair() {
        Ok(pair) => pair,
        Err(e) => {
            tracing::warn!("no socket pair for a TLS connection: {e}");
            return;
        }
    };
    tokio::spawn(pump(secured, theirs));
    head::serve(ours, conn, handshake).await;
}

/// A connected pair with small buffers.
fn pair() -> std::io::Result<(UnixStream, UnixStream)> {
    let (a, b) = UnixStream::pair()?;
    for end in [&a, &b] {
        let sock = socket2::SockRef::from(end);
        sock.set_send_buffer_size(PAIR_BUFFER)?;
        sock.set_recv_buffer_size(PAIR_BUFFER)?;
    }
    Ok((a, b))
}

/// Copies both ways until either side ends; then both are closed (dropped), so the session
/// sees its socket end and the client sees the connection end.
async fn pump(secured: tokio_rustls::server::TlsStream<TcpStream>, plain: UnixStream) {
    let (from_client, to_client) = tokio::io::split(secured);
    let (from_session, to_session) = plain.into_split();
    let ended = tokio::select! {
        ended = inward(from_client, to_session) => ended,
        ended = outward(from_session, to_client) => ended,
    };
    if let Err(e) = ended {
        tracing::debug!("TLS connection ended: {e}");
    }
}

/// What the client sends, decrypted, to the session. Client messages are small, and rustls
/// keeps a record's plaintext until it is read, so 1 KiB per read costs a large message only
/// more turns; it is kept for the connection's life (16 KiB in each direction measured 28.9
/// KiB RSS per idle TLS connection).
const INWARD_CHUNK: usize = 1024;
/// What the session (and its publishers) wrote, per read on the way out: dozens of frames.
/// Allocated only while there is something to move, so an idle connection holds none.
const OUTWARD_CHUNK: usize = 4 * 1024;

async fn inward(
    mut from: tokio::io::ReadHalf<tokio_rustls::server::TlsStream<TcpStream>>,
    mut to: tokio::net::unix::OwnedWriteHalf,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut chunk = [0u8; INWARD_CHUNK];
    loop {
        let n = from.read(&mut chunk).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        to.write_all(&chunk[..n]).await?;
    }
}

/// Moves what the session wrote to the client, flushing after each batch so a TLS record
/// goes out with it (rustls holds written plaintext until flushed), until the session ends.
async fn outward(
    from: tokio::net::unix::OwnedReadHalf,
    mut to: tokio::io::WriteHalf<tokio_rustls::server::TlsStream<TcpStream>>,
) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    loop {
        from.readable().await?;
        let mut chunk = vec![0u8; OUTWARD_CHUNK];
        let n = match from.try_read(&mut chunk) {
            Ok(0) => return to.shutdown().await,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&chunk[..n]).await?;
        drop(chunk);
        to.flush().await?;
    }
}

/// SIGHUP, listened for from now on.
pub(super) fn hangups() -> Result<Signal, super::ServerError> {
    signal(SignalKind::hangup()).map_err(super::ServerError::Signal)
}

/// Reloads the pair on every SIGHUP for as long as the node runs.
pub(super) async fn reload_on(mut hangups: Signal, tls: Arc<Tls>) {
    while hangups.recv().await.is_some() {
        match tls.reload() {
            Ok(()) => tracing::info!("SIGHUP: TLS certificate and key reloaded"),
            Err(e) => tracing::warn!("SIGHUP: keeping the TLS pair in use: {e}"),
        }
    }
}
