//! roomcast: a WebSocket room-broadcast server.
//!
//! # Architecture map: the path a message takes
//!
//! ```text
//!  socket ──► session ──► backplane ──► room ──► fan-out ──► outbox ──► session writer ──► socket
//!  (server)   (session)   (backplane)   (room)   (room)      (outbox)   (session)
//! ```
//!
//! 1. **socket** — [`server`] accepts TCP, speaks HTTP/1.1 through hyper (`/healthz`,
//!    `/metrics`) and upgrades `GET /` to WebSocket (handshake by fastwebsockets).
//! 2. **session** — [`session`] owns the upgraded `TcpStream` in one task: it parses client
//!    frames in place ([`frame`]), decodes the two JSON dialects ([`protocol`]) and keeps the
//!    handles of the rooms the connection holds.
//! 3. **backplane** — [`backplane`] carries a published message to every node's copy of the
//!    room: in-process by default.
//! 4. **room** — [`room`] holds each room's members as an immutable `ArcSwap` snapshot in a
//!    sharded registry; a broadcast is one atomic load, no lock.
//! 5. **fan-out** — the message is framed once into a `Bytes` ([`frame::text`]); every
//!    recipient's [`outbox`] gets a clone of it (a reference-count bump, never a copy).
//! 6. **writer** — each session drains its outbox in batches, many frames per `writev`.
//!
//! [`config`] holds every knob; [`metrics`] counts what `/healthz` and `/metrics` report.

pub mod backplane;
pub mod config;
pub mod frame;
pub mod metrics;
pub mod outbox;
pub mod protocol;
pub mod room;
pub mod server;
pub mod session;

pub use config::Config;
pub use server::{Server, ServerError};
