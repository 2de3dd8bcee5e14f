//! roomcast: a WebSocket room-broadcast server.
//!
//! # Architecture map: the path a message takes
//!
//! ```text
//!  socket ──► session ──► backplane ──► room ──► fan-out ──┬──────────────────────────► socket
//!  (server)   (session)   (backplane)   (room)   (room)    │ idle: the publisher writes
//!                                                          └► outbox ──► session writer ──► socket
//!                                                             (outbox)   (session)
//! ```
//!
//! 1. **socket** — `server` accepts TCP and reads the request head itself (`server::head`): a
//!    plain `GET /` upgrade is answered there (accept key by fastwebsockets), with no HTTP
//!    buffers kept; everything else (`/healthz`, `/metrics`, pages, the API) goes to hyper.
//! 2. **session** — `session` runs each upgraded connection in one task (its [`socket`] lives
//!    in the connection's outbox, where publishers can write to it too; a TLS connection's is
//!    the plaintext end of a pair that `server::tls` encrypts): it parses client
//!    frames in place ([`frame`]), decodes the two JSON dialects ([`protocol`]) and keeps the
//!    handles of the rooms the connection holds.
//! 3. **backplane** — `backplane` carries a published message to every node's copy of the
//!    room: in-process by default.
//! 4. **room** — [`room`] holds each room's members as an immutable `ArcSwap` snapshot in a
//!    sharded registry; a broadcast reads it with one atomic load and takes no lock (joins and
//!    leaves take their shard's mutex and copy one path of the snapshot's persistent tree, so
//!    they cost the same in any room). A room larger than `--fanout-slice` is served a slice at
//!    a time, the caller yielding between slices ([`room::Fanout`]).
//! 5. **fan-out** — the message is framed once into a `Bytes` ([`frame::text`]) that its
//!    recipients share, never copied: a queued frame is a reference-count bump, and a pass's
//!    claims from one broadcast hold it once between them. A recipient whose
//!    socket is idle is claimed through its [`outbox`]'s ownership word (one compare-and-swap)
//!    and written by the publisher's worker when its pass ends, as it runs out of tasks
//!    ([`outbox::DeferredWrites`], [`outbox::end_of_pass`]): one `write`, no task woken, and
//!    under load each claimed socket gets everything owed to it in one `writev`, as the floor's
//!    event loop flushes once per pass. Later frames for a socket the same thread claimed are
//!    copied behind the claim (no lock, no atomic write). Otherwise the frame is queued in the
//!    outbox, under that outbox's own mutex for one `push`, a lock no other recipient shares.
//! 6. **writer** — each session writes what its outbox queued (what arrived while someone else
//!    wrote, the rest of a write the socket did not take, its own replies) in batches, many
//!    frames per `writev`.
//!
//! With `--history-size`, [`history`] keeps each room's recent messages with their offsets
//! (envelope mode's positions, resume, `GET /api/history`), and the room's log lock orders its
//! publishes: offset and fan-out happen under it, so every member sees one order. In-process
//! the node numbers the messages; with Redis a script there does, and nodes keep what arrives.
//! A connection's delivery format (the bare string, or version 2's envelope) lives in its
//! outbox, and fan-out frames each message once per format.
//!
//! [`config`] holds every knob; [`metrics`] counts what `/healthz` and `/metrics` report.
//!
//! What guards the path, in the order a client meets it: [`admission`] (caps per address and
//! per node, handshakes in progress, the client address behind trusted proxies) and [`auth`]
//! (tokens, grants, the `Origin` allow-list) at the handshake; [`inbound`] (each connection's
//! frame and byte buckets) before any frame is decoded; the outbox bound on the way out; and
//! in `backplane` the bounded queues to and from Redis. `users` counts connections per user for
//! the per-user cap and for revocation through the server API (`server::api`).

#![warn(missing_docs)]

// `backplane`, `server` internals and `session` are the node's own; benches, fuzz targets and
// tests reach the engine through the public modules below.
pub mod admission;
pub mod auth;
pub(crate) mod backplane;
pub mod config;
pub mod frame;
pub mod history;
pub mod inbound;
pub mod metrics;
pub mod outbox;
pub mod protocol;
pub mod room;
mod server;
mod session;
pub mod socket;
mod users;

pub use backplane::RedisError;
pub use config::{Config, ConfigError};
pub use server::{runtime, Server, ServerError};
