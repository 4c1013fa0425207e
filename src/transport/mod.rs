//! One WebSocket connection's socket: frames, the write queue shared by the session and the
//! connection task, and the reads.
//!
//! The server keeps the upgraded TCP socket itself (the WebSocket handshake is answered in
//! `server::ws`): the session task writes broadcast frames straight into it through the
//! connection's [`Outbox`], and tungstenite reads it through [`SocketIo`].

mod frame;
pub mod outbox;
mod socket;

pub use frame::Frame;
pub use outbox::{outbox, Inbox, Next, Outbox, Overflow, Wire, Writer};
pub use socket::SocketIo;
