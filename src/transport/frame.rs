//! WebSocket frames on the wire (RFC 6455 §5.2): the server's own, encoded once, and the
//! length of a frame read from its header, which keeps every write to the socket whole.

use std::sync::Arc;

use bytes::Bytes;
use collab_core::session::{Backlog, Payload, PayloadKind};
use tungstenite::protocol::frame::coding::{Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

/// A complete WebSocket frame from the server (unmasked, header and payload), or several back
/// to back: never part of one, so whatever writes it cannot cut into another. Broadcast frames
/// share their bytes. It carries what a catch-up does with it while it waits in a queue.
#[derive(Debug, Clone)]
pub struct Frame {
    bytes: Bytes,
    backlog: Backlog,
}

impl Frame {
    /// A binary frame (y-websocket messages).
    pub fn binary(payload: &[u8]) -> Frame {
        Frame::kept(encode(Data::Binary, payload))
    }

    /// A text frame (JSON messages).
    pub fn text(text: &str) -> Frame {
        Frame::kept(encode(Data::Text, text.as_bytes()))
    }

    fn kept(bytes: Bytes) -> Frame {
        Frame {
            bytes,
            backlog: Backlog::Keep,
        }
    }

    /// The frame of a session's message, framed once however many members it goes to.
    pub fn of(payload: &Arc<Payload>) -> Frame {
        let bytes = payload.framed(|kind, bytes| {
            let data = match kind {
                PayloadKind::Text => Data::Text,
                PayloadKind::Binary => Data::Binary,
            };
            encode(data, bytes)
        });
        Frame {
            bytes,
            backlog: payload.backlog(),
        }
    }

    /// Bytes on the wire, header included.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The encoded frame.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub(super) fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    pub fn backlog(&self) -> Backlog {
        self.backlog
    }

    /// The whole frames at the start of `bytes` (the WebSocket library's own), as one `Frame`
    /// written in one go; `None` when `bytes` start with an incomplete frame. The only way to
    /// make a `Frame` of bytes not encoded here: none holds a cut frame.
    pub(super) fn whole_prefix(bytes: &[u8]) -> Option<Frame> {
        let whole = whole_frames(bytes);
        (whole > 0).then(|| Frame::kept(Bytes::copy_from_slice(&bytes[..whole])))
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

/// Bytes the frame starting at `bytes[0]` takes on the wire (header, mask key, payload), or
/// `None` while its header is incomplete.
pub(super) fn wire_len(bytes: &[u8]) -> Option<u64> {
    let [_, second, rest @ ..] = bytes else {
        return None;
    };
    let (extended, payload) = match second & 0x7f {
        126 => (2, u64::from(u16::from_be_bytes(*rest.first_chunk()?))),
        127 => (8, u64::from_be_bytes(*rest.first_chunk()?)),
        n => (0, u64::from(n)),
    };
    let mask = if second & 0x80 != 0 { 4 } else { 0 };
    Some(payload.saturating_add(2 + extended + mask))
}

/// How many bytes at the start of `bytes` are whole frames.
fn whole_frames(bytes: &[u8]) -> usize {
    let mut whole = 0;
    while let Some(len) = wire_len(&bytes[whole..]) {
        match usize::try_from(len) {
            Ok(len) if len <= bytes.len() - whole => whole += len,
            _ => break,
        }
    }
    whole
}

#[cfg(test)]
mod tests {
    use super::*;
    use tungstenite::protocol::frame::Frame as WsFrame;

    /// Frames as tungstenite formats them, of every header size, masked and not.
    fn formatted(len: usize, masked: bool) -> Vec<u8> {
        let mut frame = WsFrame::message(vec![7u8; len], OpCode::Data(Data::Binary), true);
        if masked {
            frame.header_mut().mask = Some([1, 2, 3, 4]);
        }
        let mut wire = Vec::new();
        frame.format(&mut wire).expect("a Vec takes every write");
        wire
    }

    #[test]
    fn the_length_read_from_the_header_is_the_whole_frame() {
        for len in [0, 1, 125, 126, 127, 65_535, 65_536, 70_000] {
            for masked in [false, true] {
                let wire = formatted(len, masked);
                assert_eq!(wire_len(&wire), Some(wire.len() as u64), "{len} {masked}");
                assert_eq!(whole_frames(&wire), wire.len(), "{len} {masked}");
                // Until the length's bytes are all there, the length is unknown.
                let length_bytes = match len {
                    0..=125 => 2,
                    126..=65_535 => 4,
                    _ => 10,
                };
                for cut in 0..length_bytes {
                    assert_eq!(wire_len(&wire[..cut]), None, "{len} {masked} {cut}");
                }
                // A cut frame is not whole.
                assert_eq!(whole_frames(&wire[..wire.len() - 1]), 0, "{len} {masked}");
            }
        }
        assert_eq!(Frame::binary(&[1; 300]).len(), formatted(300, false).len());
    }

    #[test]
    fn whole_frames_stop_before_a_cut_frame() {
        let mut wire = formatted(3, false);
        let first = wire.len();
        wire.extend_from_slice(&formatted(200, true));
        let second = wire.len();
        wire.extend_from_slice(&formatted(10, false));
        assert_eq!(whole_frames(&wire), wire.len());
        assert_eq!(whole_frames(&wire[..second - 1]), first);
        assert_eq!(whole_frames(&wire[..second + 1]), second);
        assert_eq!(whole_frames(&[]), 0);
    }

    #[test]
    fn a_length_past_the_address_space_is_never_whole() {
        let wire = [0x82, 127, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0];
        assert_eq!(wire_len(&wire), Some(u64::MAX));
        assert_eq!(whole_frames(&wire), 0);
    }
}
