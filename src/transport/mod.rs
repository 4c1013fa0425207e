//! One WebSocket connection's socket, end to end: the upgrade handshake, reading, the write
//! queue shared by the session and the connection task, and the close handshake.
//!
//! The server keeps the upgraded TCP stream itself (rather than handing it to a WebSocket
//! library to own), because two tasks use it: the connection's task reads it, and the
//! session's task writes broadcast frames straight into it (one non-blocking write through
//! the [`Outbox`]); only what the socket does not take at once is queued, and written later
//! by the connection's task.
//!
//! | file | job |
//! | --- | --- |
//! | `handshake.rs` | RFC 6455 §4.2.1 checks of the upgrade request, the `101` answer ([`Upgrade`], an axum extractor), then the socket ([`Upgrading::open`]) |
//! | `socket.rs` | [`Socket`]: what the connection task sees (messages, pongs, the session's close request, as [`Event`]s), pings |
//! | `close.rs` | the close handshake: [`Socket::close`] (server-initiated), [`Socket::end`] (also answers the peer's close frame) |
//! | `outbox.rs` | the write queue: [`Outbox`] (the session's end), `Inbox` (the connection's), `Writer` (tungstenite's, whole frames only), over a [`Wire`] |
//! | `frame.rs` | [`Frame`]: a whole server frame, encoded once; frame lengths from headers |
//! | `io.rs` | the shared TCP stream: tungstenite reads it, writes go through the outbox |
//! | `http_io.rs` | [`HttpStream`]: the TCP stream before the upgrade, whose writes fail once blocked past `--http-write-timeout` |
//!
//! The connection task (`server::connection`) loops on [`Socket::next_event`] and hands the
//! messages to its session; the session sends through the [`Outbox`] it got when the
//! connection joined. Every byte reaches the socket as part of a whole frame, in one order
//! under one lock: the session's frames are whole by construction, and tungstenite's writes
//! (pings, pongs, close frames) pass through a writer that holds back a frame's start until
//! its end is written.

mod close;
mod frame;
mod handshake;
mod http_io;
mod io;
pub mod outbox;
mod socket;

pub use frame::Frame;
pub use handshake::{Rejection, Upgrade, Upgrading};
pub use http_io::HttpStream;
pub use outbox::{outbox, Bounds, Inbox, Outbox, Overflow, Sent, Wire};
pub use socket::{Ending, Event, Socket, SocketConfig};
