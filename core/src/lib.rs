//! The network-free core of optiverse-collab: everything a session decides, with no I/O and no
//! async runtime.
//!
//! * [`doc`]: the session's Yjs document behind the guard for untrusted bytes
//!   ([`doc::guard`]: yrs only ever sees checked bytes, [`doc::CheckedUpdate`]), the item schema,
//!   and the rules that translate the desktop clients' commands to and from the document.
//! * [`protocol`]: the wire formats (Optiverse JSON, y-websocket framing).
//! * [`session`]: one session as a state machine ([`session::Session`]): members, their roles
//!   and acks, awareness, fan-out. It is fed inputs with the current time and answers with what
//!   to store and what to send; the server's async shell does the rest.
#![forbid(unsafe_code)]

pub mod doc;
pub mod protocol;
pub mod session;
