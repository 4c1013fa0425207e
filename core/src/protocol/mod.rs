//! Wire formats: the Optiverse JSON messages and the y-websocket binary framing.

pub mod json;
pub mod yjs;
