//! y-websocket binary framing (PROTOCOL §5), decoded defensively.
//!
//! One frame is one message: a var-uint type (0 sync, 1 awareness, 2 auth, 3 query awareness),
//! and for sync a var-uint step (0 SyncStep1, 1 SyncStep2, 2 Update) with a length-prefixed
//! payload. Payloads are checked with the guards before yrs decodes anything; the session only
//! receives byte slices that passed them. Encoding uses `yrs::sync` types.

use bytes::Bytes;
use yrs::encoding::read::{Cursor, Read};
use yrs::sync::protocol::{MSG_AUTH, MSG_AWARENESS, MSG_QUERY_AWARENESS, MSG_SYNC};
use yrs::sync::protocol::{MSG_SYNC_STEP_1, MSG_SYNC_STEP_2, MSG_SYNC_UPDATE};
use yrs::sync::{Message, SyncMessage};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::StateVector;

use crate::doc::guard::{CheckedAwareness, CheckedStateVector, CheckedUpdate};

/// A y-websocket message whose payload passed the guard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum YjsMessage {
    /// The sender's state vector.
    SyncStep1(CheckedStateVector),
    /// An update answering our SyncStep1.
    SyncStep2(CheckedUpdate),
    Update(CheckedUpdate),
    Awareness(CheckedAwareness),
    QueryAwareness,
    /// Auth messages are for servers to send; a client's is ignored.
    Auth,
}

/// Why a binary frame was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError(pub String);

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for FrameError {}

fn err(message: impl Into<String>) -> FrameError {
    FrameError(message.into())
}

/// Decodes one binary frame.
pub fn decode(frame: &[u8]) -> Result<YjsMessage, FrameError> {
    let mut cursor = Cursor::new(frame);
    let tag: u32 = cursor
        .read_var()
        .map_err(|_| err("truncated message type"))?;
    let message = match u8::try_from(tag).unwrap_or(u8::MAX) {
        MSG_SYNC => {
            let step: u32 = cursor.read_var().map_err(|_| err("truncated sync step"))?;
            let payload = cursor
                .read_buf()
                .map_err(|_| err("truncated sync payload"))?
                .to_vec();
            match u8::try_from(step).unwrap_or(u8::MAX) {
                MSG_SYNC_STEP_1 => YjsMessage::SyncStep1(
                    CheckedStateVector::check(payload)
                        .map_err(|e| err(format!("bad state vector: {e}")))?,
                ),
                MSG_SYNC_STEP_2 | MSG_SYNC_UPDATE => {
                    let update = CheckedUpdate::check(payload)
                        .map_err(|e| err(format!("bad update: {e}")))?;
                    if step == u32::from(MSG_SYNC_STEP_2) {
                        YjsMessage::SyncStep2(update)
                    } else {
                        YjsMessage::Update(update)
                    }
                }
                _ => return Err(err(format!("unknown sync step {step}"))),
            }
        }
        MSG_AWARENESS => {
            let payload = cursor
                .read_buf()
                .map_err(|_| err("truncated awareness payload"))?
                .to_vec();
            YjsMessage::Awareness(
                CheckedAwareness::check(payload)
                    .map_err(|e| err(format!("bad awareness update: {e}")))?,
            )
        }
        MSG_QUERY_AWARENESS => YjsMessage::QueryAwareness,
        MSG_AUTH => YjsMessage::Auth,
        _ => return Err(err(format!("unknown message type {tag}"))),
    };
    Ok(message)
}

/// Encodes one message into a frame.
pub fn encode(message: &Message) -> Bytes {
    Bytes::from(message.encode_v1())
}

/// `Sync(SyncStep1(sv))` from the server's v1 state vector bytes.
pub fn sync_step1(state_vector_v1: &[u8]) -> Bytes {
    let sv = StateVector::decode_v1(state_vector_v1).unwrap_or_default();
    encode(&Message::Sync(SyncMessage::SyncStep1(sv)))
}

/// `Sync(SyncStep2(update))`.
pub fn sync_step2(update: &[u8]) -> Bytes {
    frame(&[MSG_SYNC, MSG_SYNC_STEP_2], update)
}

/// `Sync(Update(update))`.
pub fn sync_update(update: &[u8]) -> Bytes {
    frame(&[MSG_SYNC, MSG_SYNC_UPDATE], update)
}

/// An awareness frame around already encoded awareness-update bytes.
pub fn awareness(update_v1: &[u8]) -> Bytes {
    frame(&[MSG_AWARENESS], update_v1)
}

/// A frame of message tags and one length-prefixed payload, allocated at its exact size
/// (yrs's encoder starts every frame at 1 KiB, and broadcast frames wait in queues).
fn frame(tags: &[u8], payload: &[u8]) -> Bytes {
    let mut frame = Vec::with_capacity(tags.len() + 10 + payload.len());
    for tag in tags {
        write_var(&mut frame, u64::from(*tag));
    }
    write_var(&mut frame, payload.len() as u64);
    frame.extend_from_slice(payload);
    Bytes::from(frame)
}

fn write_var(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

#[cfg(test)]
mod tests {
    use super::*;
    use yrs::{Doc, GetString, ReadTxn, Text, Transact};

    #[test]
    fn round_trips_sync_messages() {
        let doc = Doc::new();
        let text = doc.get_or_insert_text("t");
        text.insert(&mut doc.transact_mut(), 0, "hello");
        let update = doc
            .transact()
            .encode_state_as_update_v1(&StateVector::default());
        let sv = doc.transact().state_vector().encode_v1();
        assert_eq!(
            decode(&sync_update(&update)).unwrap(),
            YjsMessage::Update(CheckedUpdate::check(update.clone()).unwrap())
        );
        assert_eq!(
            decode(&sync_step2(&update)).unwrap(),
            YjsMessage::SyncStep2(CheckedUpdate::check(update.clone()).unwrap())
        );
        assert_eq!(
            decode(&sync_step1(&sv)).unwrap(),
            YjsMessage::SyncStep1(CheckedStateVector::check(sv).unwrap())
        );
        let copy = Doc::new();
        let ct = copy.get_or_insert_text("t");
        copy.transact_mut()
            .apply_update(yrs::Update::decode_v1(&update).unwrap())
            .unwrap();
        assert_eq!(ct.get_string(&copy.transact()), "hello");
    }

    #[test]
    fn rejects_malformed_frames() {
        for bad in [
            &[][..],
            &[9],
            &[0, 7, 0],
            &[0, 0, 8, 0xff, 0xff, 0xff, 0xff, 0x0f, 0, 0, 0],
            &[0, 2, 4, 0xff, 0xff, 0xff, 0x0f],
            &[0, 2, 10, 1],
            &[1, 5, 0xff, 0xff, 0xff, 0xff, 0x0f],
            &[
                0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            ],
        ] {
            assert!(decode(bad).is_err(), "accepted {bad:?}");
        }
        assert_eq!(decode(&[3]).unwrap(), YjsMessage::QueryAwareness);
    }
}
