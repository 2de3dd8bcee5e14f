//! A connection's socket: the TCP stream of a plaintext connection, or, for a TLS connection,
//! one end of a Unix socket pair whose other end a pump task encrypts onto the TCP stream
//! (`server::tls`).
//!
//! The session and the publishers' direct writes work on non-blocking readiness calls
//! (`try_read`, `try_write_vectored`, `poll_*_ready`) that a TLS stream cannot offer: rustls'
//! state is one per connection and cannot be written from several publishers at once. Giving
//! TLS a plain socket of its own keeps the plaintext path exactly as it was, one well-predicted
//! branch per call, while a TLS connection pays for its encryption and one more copy, on its
//! own pump task.

use std::io::{self, IoSlice};
use std::task::{Context, Poll};

use tokio::net::{TcpStream, UnixStream};

/// The socket a session reads and publishers write.
#[derive(Debug)]
pub enum Socket {
    /// A plaintext connection's own TCP stream.
    Tcp(TcpStream),
    /// A TLS connection's plaintext side.
    Unix(UnixStream),
}

impl From<TcpStream> for Socket {
    fn from(stream: TcpStream) -> Self {
        Self::Tcp(stream)
    }
}

impl From<UnixStream> for Socket {
    fn from(stream: UnixStream) -> Self {
        Self::Unix(stream)
    }
}

impl Socket {
    /// See [`TcpStream::try_read`].
    #[inline]
    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.try_read(buf),
            Self::Unix(s) => s.try_read(buf),
        }
    }

    /// See [`TcpStream::try_write`].
    #[inline]
    pub fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.try_write(buf),
            Self::Unix(s) => s.try_write(buf),
        }
    }

    /// See [`TcpStream::try_write_vectored`].
    #[inline]
    pub fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.try_write_vectored(bufs),
            Self::Unix(s) => s.try_write_vectored(bufs),
        }
    }

    /// See [`TcpStream::poll_read_ready`].
    #[inline]
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Self::Tcp(s) => s.poll_read_ready(cx),
            Self::Unix(s) => s.poll_read_ready(cx),
        }
    }

    /// See [`TcpStream::poll_write_ready`].
    #[inline]
    pub fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Self::Tcp(s) => s.poll_write_ready(cx),
            Self::Unix(s) => s.poll_write_ready(cx),
        }
    }
}

impl std::os::fd::AsFd for Socket {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Self::Tcp(s) => s.as_fd(),
            Self::Unix(s) => s.as_fd(),
        }
    }
}
