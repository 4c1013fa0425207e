//! A complete WebSocket frame from the server, encoded once.

use std::sync::Arc;

use bytes::Bytes;
use collab_core::session::{Payload, PayloadKind};
use tungstenite::protocol::frame::coding::{Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

/// A complete WebSocket frame from the server (unmasked, header and payload). Broadcast frames
/// share their bytes.
#[derive(Debug, Clone)]
pub struct Frame(Bytes);

impl Frame {
    /// A binary frame (y-websocket messages).
    pub fn binary(payload: &[u8]) -> Frame {
        Frame(encode(Data::Binary, payload))
    }

    /// A text frame (JSON messages).
    pub fn text(text: &str) -> Frame {
        Frame(encode(Data::Text, text.as_bytes()))
    }

    /// The frame of a session's message, framed once however many members it goes to.
    pub fn of(payload: &Arc<Payload>) -> Frame {
        Frame(payload.framed(|kind, bytes| {
            let data = match kind {
                PayloadKind::Text => Data::Text,
                PayloadKind::Binary => Data::Binary,
            };
            encode(data, bytes)
        }))
    }

    /// Bytes on the wire, header included.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The encoded frame.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub(super) fn bytes(&self) -> &Bytes {
        &self.0
    }

    /// Bytes that already are whole frames (the WebSocket library's own).
    pub(super) fn from_wire(bytes: Bytes) -> Frame {
        Frame(bytes)
    }
}

fn encode(kind: Data, payload: &[u8]) -> Bytes {
    let header = FrameHeader {
        opcode: OpCode::Data(kind),
        ..FrameHeader::default()
    };
    let len = payload.len() as u64;
    let mut wire = Vec::with_capacity(header.len(len) + payload.len());
    header
        .format(len, &mut wire)
        .expect("a Vec takes every write");
    wire.extend_from_slice(payload);
    Bytes::from(wire)
}
