//! `wss://`: the one TLS client configuration a run shares, and the connection halves that
//! carry either a plain TCP stream or a TLS one.
//!
//! The plaintext path stays what it was: a `ws://` connection's halves are tokio's own
//! `OwnedReadHalf`/`OwnedWriteHalf`, reached through one `match` per read or write (no box, no
//! copy, no flush). A `wss://` connection is a `tokio_rustls` stream, split with
//! `tokio::io::split`, and flushed after each write (rustls may keep records it could not yet
//! hand to the socket until then).
//!
//! Trust comes only from the command line: `--tls-ca` (the CA that signed the server's
//! certificate) or `--tls-insecure` (no certificate check at all, for local benchmarks).
//! loadgen carries no system or bundled roots.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::ws::WsUrl;

/// Why the TLS client configuration could not be built, or a `wss://` URL cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("--tls-ca {}: {source}", path.display())]
    CaFile {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("--tls-ca {}: no CERTIFICATE in the file", path.display())]
    CaEmpty { path: PathBuf },
    #[error("--tls-ca {}: {source}", path.display())]
    CaRejected {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("TLS configuration: {0}")]
    Config(rustls::Error),
    #[error("wss:// host `{0}` is not a valid TLS server name")]
    ServerName(String),
}

/// How a `wss://` server's certificate is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// Against the CA certificates in this PEM file (`--tls-ca`).
    Ca(PathBuf),
    /// Not at all (`--tls-insecure`); handshake signatures are still verified.
    Insecure,
}

/// The client configuration every `wss://` connection of the run shares: ring only, the safe
/// default protocol versions, `http/1.1` offered by ALPN (what the upgrade is spoken in), and
/// no session resumption: every connection makes a full handshake, as 10,000 distinct
/// clients would, rather than some resuming sessions other clients of the run left in a
/// shared cache (which would make the server's handshake cost depend on that cache's size).
pub fn connector(trust: &Trust) -> Result<TlsConnector, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?;
    let mut config = match trust {
        Trust::Ca(path) => builder
            .with_root_certificates(load_roots(path)?)
            .with_no_client_auth(),
        Trust::Insecure => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCert::new(&provider)))
            .with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// Every certificate in the PEM file at `path`; at least one.
fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let pem_error = |source| TlsError::CaFile {
        path: path.to_path_buf(),
        source,
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(pem_error)? {
        roots
            .add(cert.map_err(pem_error)?)
            .map_err(|source| TlsError::CaRejected {
                path: path.to_path_buf(),
                source,
            })?;
    }
    if roots.is_empty() {
        return Err(TlsError::CaEmpty {
            path: path.to_path_buf(),
        });
    }
    Ok(roots)
}

/// The name a `wss://` URL's server must present (and that SNI carries): its host, a DNS name
/// or an IP address.
pub fn server_name(url: &WsUrl) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(url.host.as_str())
        .map(|n| n.to_owned())
        .map_err(|_| TlsError::ServerName(url.host.clone()))
}

/// `--tls-insecure`: any certificate, any name. The handshake signatures are still checked
/// with the ring provider's algorithms, so the peer does hold the key of the certificate it
/// sent (that keeps the TLS work loadgen does the same as with verification on).
#[derive(Debug)]
struct AcceptAnyCert {
    algorithms: WebPkiSupportedAlgorithms,
}

impl AcceptAnyCert {
    fn new(provider: &CryptoProvider) -> AcceptAnyCert {
        AcceptAnyCert {
            algorithms: provider.signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The TLS handshake over `tcp`. Kept out of line (the caller boxes this future) so that the
/// handshake's large state does not grow the connect future of every client, `ws://` ones too.
pub async fn handshake(
    connector: &TlsConnector,
    name: ServerName<'static>,
    tcp: TcpStream,
) -> io::Result<Box<TlsStream<TcpStream>>> {
    connector.connect(name, tcp).await.map(Box::new)
}

/// A stream the upgrade and the join are written to before it is split.
pub trait Transport: AsyncRead + AsyncWrite + Unpin {
    /// Whether a completed write may leave bytes in a buffer of the stream until it is
    /// flushed (TLS); a constant, so the plain TCP instantiation has no flush at all.
    const BUFFERED: bool;

    /// Its two halves.
    fn halves(self) -> (ReadHalf, WriteHalf);
}

impl Transport for TcpStream {
    const BUFFERED: bool = false;

    fn halves(self) -> (ReadHalf, WriteHalf) {
        let (r, w) = self.into_split();
        (ReadHalf::Plain(r), WriteHalf::Plain(w))
    }
}

impl Transport for Box<TlsStream<TcpStream>> {
    const BUFFERED: bool = true;

    fn halves(self) -> (ReadHalf, WriteHalf) {
        // Unboxed into the halves' shared state: one indirection less on every TLS read.
        let (r, w) = tokio::io::split(*self);
        (ReadHalf::Tls(r), WriteHalf::Tls(w))
    }
}

/// Writes all of `buf` to a stream not yet split, flushing when the stream buffers.
pub async fn send_all<S: Transport>(s: &mut S, buf: &[u8]) -> io::Result<()> {
    s.write_all(buf).await?;
    if S::BUFFERED {
        s.flush().await?;
    }
    Ok(())
}

/// The read half of a connection.
pub enum ReadHalf {
    Plain(OwnedReadHalf),
    Tls(tokio::io::ReadHalf<TlsStream<TcpStream>>),
}

/// The write half of a connection.
pub enum WriteHalf {
    Plain(OwnedWriteHalf),
    Tls(tokio::io::WriteHalf<TlsStream<TcpStream>>),
}

impl AsyncRead for ReadHalf {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ReadHalf::Plain(r) => Pin::new(r).poll_read(cx, buf),
            ReadHalf::Tls(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

impl WriteHalf {
    /// Writes all of `buf`: on plain TCP exactly `OwnedWriteHalf::write_all`; on TLS followed
    /// by a flush, so nothing waits in rustls for the next write.
    pub async fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            WriteHalf::Plain(w) => w.write_all(buf).await,
            WriteHalf::Tls(w) => {
                w.write_all(buf).await?;
                w.flush().await
            }
        }
    }

    /// Shuts the writing side down (TLS: a close_notify first).
    pub async fn shutdown(&mut self) -> io::Result<()> {
        match self {
            WriteHalf::Plain(w) => w.shutdown().await,
            WriteHalf::Tls(w) => w.shutdown().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_file(tag: &str, text: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!(
            "loadgen-tls-unit-{tag}-{}-{:?}.pem",
            std::process::id(),
            std::time::SystemTime::now()
        ));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn trust_files_are_checked() {
        assert!(connector(&Trust::Insecure).is_ok());
        let missing = PathBuf::from("/nonexistent/ca.pem");
        let err = connector(&Trust::Ca(missing)).err().unwrap().to_string();
        assert!(err.starts_with("--tls-ca /nonexistent/ca.pem: "), "{err}");
        let empty = temp_file("empty", "no certificate here\n");
        let err = connector(&Trust::Ca(empty.clone())).err().unwrap();
        assert!(matches!(err, TlsError::CaEmpty { .. }), "{err}");
        let _ = std::fs::remove_file(empty);
        let bad = temp_file(
            "bad",
            "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
        );
        let err = connector(&Trust::Ca(bad.clone())).err().unwrap();
        assert!(matches!(err, TlsError::CaRejected { .. }), "{err}");
        let _ = std::fs::remove_file(bad);
    }

    #[test]
    fn server_names_are_the_url_hosts() {
        let name =
            |u: &str| server_name(&WsUrl::parse(u).unwrap()).map(|n| n.to_str().into_owned());
        assert_eq!(name("wss://example.org/x").unwrap(), "example.org");
        assert_eq!(name("wss://127.0.0.1:8443").unwrap(), "127.0.0.1");
        assert_eq!(name("wss://[::1]:8443").unwrap(), "::1");
        let err = name("wss://a b:1").unwrap_err().to_string();
        assert_eq!(err, "wss:// host `a b` is not a valid TLS server name");
    }
}
