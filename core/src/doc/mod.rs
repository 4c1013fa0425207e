//! The session's Yjs document, its item schema, guarded application of untrusted bytes, and
//! the translation between the desktop clients' commands and the document.

pub mod guard;
pub mod legacy;
mod order;
pub mod scene;
pub mod schema;
pub mod value;
pub mod ydoc;

pub use guard::{CheckedAwareness, CheckedStateVector, CheckedUpdate};
pub use legacy::{Action, Command, UploadedItem};
pub use scene::{
    CommandMessage, Effects, FullState, Outgoing, PeerId, PeerMap, PeerMessage, PeerSet, Scene,
};
pub use value::ItemFields;
pub use ydoc::{DocError, GuardedDoc};
