//! Structural pre-validation of untrusted lib0 v1 payloads before they reach yrs 0.28.1.
//!
//! yrs trusts decoded counts (a few bytes declaring a huge count make it reserve hundreds of
//! MB), decodes nested `Any` values by unbounded recursion (stack overflow) and panics in debug
//! builds on some decoded arithmetic (`clock + len`, signed var-int shifts, 53-bit client ids).
//! These checks walk the bytes exactly like yrs's v1 decoder without allocating in proportion
//! to any count, recursing at most [`MAX_NESTING`] deep, and reject counts/lengths the rest of
//! the input cannot hold, truncation, trailing bytes, deep nesting and tags yrs rejects. They
//! are deliberately stricter where yrs silently wraps (e.g. var-ints too big for u32 fields).

use std::fmt;
use std::ops::Range;

/// Maximum depth of nested `Any` containers (arrays/maps) accepted inside one value.
pub const MAX_NESTING: usize = 64;

/// yrs `ClientID::new` debug-asserts that client ids fit in 53 bits.
const CLIENT_BITS: u32 = 53;

/// Why an input was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuardError {
    /// The input ended in the middle of a value.
    Truncated,
    /// A count or length cannot fit in the bytes that remain (for a `clock + length` overflow,
    /// `remaining` is the headroom left below `u32::MAX`).
    CountTooLarge {
        what: &'static str,
        count: u64,
        remaining: usize,
    },
    /// `Any` containers nested deeper than [`MAX_NESTING`].
    TooDeep,
    /// A var-int longer than 10 bytes or out of range for its field.
    BadVarInt,
    /// A tag yrs rejects; also invalid UTF-8 (`tag` = bad byte) and zero-length GC/skip blocks.
    UnknownTag { what: &'static str, tag: u64 },
    /// Bytes left over after a complete value.
    TrailingBytes,
}

impl fmt::Display for GuardError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuardError::Truncated => f.write_str("input truncated"),
            GuardError::CountTooLarge {
                what,
                count,
                remaining,
            } => write!(f, "{what} {count} exceeds the remaining {remaining}"),
            GuardError::TooDeep => write!(f, "Any values nested deeper than {MAX_NESTING}"),
            GuardError::BadVarInt => f.write_str("malformed or out-of-range var-int"),
            GuardError::UnknownTag { what, tag } => write!(f, "unexpected {what}: {tag}"),
            GuardError::TrailingBytes => f.write_str("trailing bytes after encoded value"),
        }
    }
}

impl std::error::Error for GuardError {}

type Res<T> = Result<T, GuardError>;

fn unknown(what: &'static str, tag: impl Into<u64>) -> GuardError {
    let tag = tag.into();
    GuardError::UnknownTag { what, tag }
}

/// Checks that `count` elements of at least `min_each` bytes fit in `remaining` bytes.
fn fits(what: &'static str, count: u64, min_each: u64, remaining: usize) -> Res<u64> {
    if count.saturating_mul(min_each) <= remaining as u64 {
        return Ok(count);
    }
    Err(GuardError::CountTooLarge {
        what,
        count,
        remaining,
    })
}

/// yrs adds `clock + len` in u32, which panics on overflow in debug builds.
fn clock_fits(clock: u32, len: u64) -> Res<u64> {
    fits("clock range length", len, 1, (u32::MAX - clock) as usize)
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn u8(&mut self) -> Res<u8> {
        Ok(self.skip(1)?[0])
    }

    fn skip(&mut self, n: usize) -> Res<&'a [u8]> {
        let s = self.buf[self.pos..].get(..n).ok_or(GuardError::Truncated)?;
        self.pos += n;
        Ok(s)
    }

    /// lib0 var-int of at most 10 bytes whose first byte holds `first_bits` value bits (7, or
    /// 6 for signed ones) and whose value needs at most `max_bits` bits. yrs wraps u32 fields,
    /// panics (debug) on 11-byte signed var-ints, on negating `i64::MIN` (so signed magnitudes
    /// get 63 bits) and on client ids >= 2^53 (`ClientID::new` debug assertion).
    fn var(&mut self, first_bits: u32, max_bits: u32) -> Res<u64> {
        let (mut value, mut shift, mut bits) = (0u64, 0, first_bits);
        for _ in 0..10 {
            let b = self.u8()?;
            let chunk = u64::from(b) & ((1 << bits) - 1);
            if chunk != 0 {
                if shift + 64 - chunk.leading_zeros() > max_bits {
                    return Err(GuardError::BadVarInt);
                }
                value |= chunk << shift;
            }
            if b & 0x80 == 0 {
                return Ok(value);
            }
            (shift, bits) = (shift + bits, 7);
        }
        Err(GuardError::BadVarInt)
    }

    fn var_u32(&mut self) -> Res<u32> {
        self.var(7, 32).map(|v| v as u32)
    }

    /// `(client, clock)` as read by `DecoderV1::read_id` / state vector / awareness entries.
    fn id(&mut self) -> Res<()> {
        self.var(7, CLIENT_BITS)?;
        self.var_u32().map(drop)
    }

    /// A count of elements taking at least `min_each` bytes each, read as `max_bits` var-int.
    fn count(&mut self, what: &'static str, min_each: u64, max_bits: u32) -> Res<u64> {
        let n = self.var(7, max_bits)?;
        fits(what, n, min_each, self.remaining())
    }

    /// `Read::read_buf`: u32 length prefix + bytes.
    fn buf(&mut self, what: &'static str) -> Res<&'a [u8]> {
        let n = self.count(what, 1, 32)?;
        self.skip(n as usize)
    }

    /// `Read::read_string`: like `buf`, and yrs errors on invalid UTF-8.
    fn string(&mut self, what: &'static str) -> Res<&'a str> {
        let bytes = self.buf(what)?;
        std::str::from_utf8(bytes).map_err(|e| {
            let bad = bytes.get(e.valid_up_to()).copied().unwrap_or(0);
            unknown("non-UTF-8 string byte", bad)
        })
    }

    fn finish(&self) -> Res<()> {
        let done = self.remaining() == 0;
        done.then_some(()).ok_or(GuardError::TrailingBytes)
    }

    /// `Any::decode`; `depth` = number of enclosing containers, which bounds the recursion.
    fn any(&mut self, depth: usize) -> Res<()> {
        match self.u8()? {
            120 | 121 | 126 | 127 => Ok(()),
            125 => self.var(6, 63).map(drop),
            124 => self.skip(4).map(drop),
            122 | 123 => self.skip(8).map(drop),
            119 => self.string("Any string length").map(drop),
            116 => self.buf("Any buffer length").map(drop),
            tag @ (117 | 118) if depth < MAX_NESTING => {
                let is_map = tag == 118;
                let n = self.count("Any container length", 1 + u64::from(is_map), 64)?;
                for _ in 0..n {
                    if is_map {
                        self.string("Any map key length")?;
                    }
                    self.any(depth + 1)?;
                }
                Ok(())
            }
            117 | 118 => Err(GuardError::TooDeep),
            tag => Err(unknown("Any tag", tag)),
        }
    }

    /// `Update::decode_block`; returns the clock length yrs adds for the block.
    fn block(&mut self) -> Res<u64> {
        let info = self.u8()?;
        if info == 0 || info == 10 {
            // BLOCK_GC_REF_NUMBER / BLOCK_SKIP_REF_NUMBER: u32 length; yrs errors on 0.
            return match self.var_u32()? {
                0 => Err(unknown("zero-length GC/skip block, info", info)),
                len => Ok(len.into()),
            };
        }
        for flag in [0b1000_0000, 0b0100_0000] {
            // HAS_ORIGIN, HAS_RIGHT_ORIGIN: left / right origin ids
            if info & flag != 0 {
                self.id()?;
            }
        }
        if info & 0b1100_0000 == 0 {
            // neither origin: parent (named root or id) and optional parent sub are explicit
            if self.var_u32()? == 1 {
                self.string("parent name length")?;
            } else {
                self.id()?;
            }
            if info & 0b0010_0000 != 0 {
                self.string("parent sub length")?; // HAS_PARENT_SUB
            }
        }
        self.content(info & 0b1111)
    }

    /// `ItemContent::decode`; returns the content's `len_utf16()`.
    fn content(&mut self, content_ref: u8) -> Res<u64> {
        match content_ref {
            1 => Ok(self.var_u32()?.into()), // Deleted
            // JSON content (a legacy kind current Yjs never writes): yrs 0.28.1 reads len + 1
            // strings but writes len, so a document holding it encodes to bytes that no
            // longer decode, and the session's stored state would not load. Refused.
            2 => Err(GuardError::UnknownTag {
                what: "content (JSON content is not supported)",
                tag: 2,
            }),
            3 => self.buf("binary content length").map(|_| 1),
            4 => Ok(self.string("string content length")?.encode_utf16().count() as u64),
            5 => self.string("embed JSON length").map(|_| 1),
            6 => {
                self.string("format key length")?;
                self.string("format JSON length").map(|_| 1)
            }
            // TypeRef::decode without the `weak` feature: 7 (WeakLink) is rejected by yrs.
            7 => match self.u8()? {
                0 | 1 | 2 | 4 | 5 | 6 | 9 | 15 => Ok(1),
                3 => self.string("XML element name length").map(|_| 1),
                tag => Err(unknown("type ref", tag)),
            },
            8 => {
                let n = self.count("Any content length", 1, 32)?;
                (0..n).try_for_each(|_| self.any(0))?;
                Ok(n)
            }
            9 => {
                self.string("subdoc guid length")?;
                self.any(0).map(|_| 1)
            }
            tag => Err(unknown("content ref", tag)),
        }
    }

    /// `IdSet::decode` (delete set); `Range::decode` computes `clock + len` in u32.
    fn delete_set(&mut self) -> Res<()> {
        for _ in 0..self.count("delete set clients", 2, 32)? {
            self.var(7, CLIENT_BITS)?;
            for _ in 0..self.count("delete set ranges", 2, 32)? {
                let (clock, len) = (self.var_u32()?, self.var_u32()?);
                clock_fits(clock, len.into())?;
            }
        }
        Ok(())
    }
}

/// One block of a v1 update: where its bytes are and which clocks it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockSpan {
    pub bytes: Range<usize>,
    pub clock: u32,
    pub len: u32,
    /// A skip block (ref 10): a gap in the clocks the update carries, not content.
    pub skip: bool,
}

impl BlockSpan {
    pub fn end(&self) -> u32 {
        self.clock + self.len
    }
}

/// Where the parts of a checked v1 update are: each client's blocks, in clock order, and the
/// delete set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpdateLayout {
    pub clients: Vec<(u64, Vec<BlockSpan>)>,
    pub delete_set: Range<usize>,
}

/// Untrusted Yjs v1 update bytes that passed the guard, with their layout. Only
/// [`CheckedUpdate::check`] makes one, and the document applies nothing else: "yrs only sees
/// guarded bytes" is a fact of the types, and the bytes are walked once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedUpdate {
    bytes: Vec<u8>,
    layout: UpdateLayout,
}

impl CheckedUpdate {
    /// Validates v1 update bytes (as `Update::decode_v1` reads them).
    pub fn check(bytes: Vec<u8>) -> Result<Self, GuardError> {
        let layout = layout_update_v1(&bytes)?;
        Ok(CheckedUpdate { bytes, layout })
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    /// Where each client's blocks and the delete set are.
    pub fn layout(&self) -> &UpdateLayout {
        &self.layout
    }
}

/// Untrusted v1 state vector bytes that passed the guard (`StateVector::decode_v1`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedStateVector(Vec<u8>);

impl CheckedStateVector {
    pub fn check(bytes: Vec<u8>) -> Result<Self, GuardError> {
        let mut r = Reader {
            buf: &bytes,
            pos: 0,
        };
        for _ in 0..r.count("state vector entries", 2, 32)? {
            r.id()?;
        }
        r.finish()?;
        Ok(CheckedStateVector(bytes))
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

/// Untrusted v1 awareness update bytes that passed the guard (`AwarenessUpdate::decode_v1`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedAwareness(Vec<u8>);

impl CheckedAwareness {
    pub fn check(bytes: Vec<u8>) -> Result<Self, GuardError> {
        let mut r = Reader {
            buf: &bytes,
            pos: 0,
        };
        for _ in 0..r.count("awareness entries", 3, 64)? {
            r.id()?;
            r.string("awareness state length")?;
        }
        r.finish()?;
        Ok(CheckedAwareness(bytes))
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

/// Validates a v1-encoded update and reports its layout. The layout grows with the blocks
/// actually present (each at least one byte), never with a declared count.
pub(crate) fn layout_update_v1(bytes: &[u8]) -> Result<UpdateLayout, GuardError> {
    let mut r = Reader { buf: bytes, pos: 0 };
    let mut layout = UpdateLayout::default();
    for _ in 0..r.count("update clients", 3, 32)? {
        let blocks = r.count("update blocks", 2, 32)?;
        let client = r.var(7, CLIENT_BITS)?;
        let mut clock = r.var_u32()?;
        let mut spans = Vec::new();
        for _ in 0..blocks {
            let start = r.pos;
            let skip = r.buf.get(start) == Some(&10);
            // yrs does `clock += block.len()` in u32 (an overflow panics in debug builds).
            let len = clock_fits(clock, r.block()?)? as u32;
            spans.push(BlockSpan {
                bytes: start..r.pos,
                clock,
                len,
                skip,
            });
            clock += len;
        }
        layout.clients.push((client, spans));
    }
    let start = r.pos;
    r.delete_set()?;
    layout.delete_set = start..r.pos;
    r.finish()?;
    Ok(layout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::panic::{catch_unwind, AssertUnwindSafe};
    use yrs::updates::{decoder::Decode, encoder::Encode};
    use yrs::{any, sync::Awareness, types::text::Text, Any, Array, ArrayPrelim, Doc, In, Map};
    use yrs::{MapPrelim, ReadTxn, StateVector, Transact, TransactionMut, Update, Xml};
    use yrs::{XmlElementPrelim, XmlFragment, XmlTextPrelim};

    fn check_update_v1(bytes: &[u8]) -> Result<(), GuardError> {
        CheckedUpdate::check(bytes.to_vec()).map(drop)
    }

    fn check_state_vector_v1(bytes: &[u8]) -> Result<(), GuardError> {
        CheckedStateVector::check(bytes.to_vec()).map(drop)
    }

    fn check_awareness_update_v1(bytes: &[u8]) -> Result<(), GuardError> {
        CheckedAwareness::check(bytes.to_vec()).map(drop)
    }

    fn hex(s: &str) -> Vec<u8> {
        let byte = |i| u8::from_str_radix(&s[i..i + 2], 16).expect("test hex");
        (0..s.len()).step_by(2).map(byte).collect()
    }

    /// Real per-transaction and full-state updates (every content kind yrs emits), hand-made
    /// binary (ref 3) and skip (ref 10) updates; state vector.
    fn corpus() -> (Vec<Vec<u8>>, Vec<u8>) {
        let doc = Doc::with_client_id(7);
        let items = doc.get_or_insert_map("items");
        let text = doc.get_or_insert_text("text");
        let arr = doc.get_or_insert_array("arr");
        let xml = doc.get_or_insert_xml_fragment("xml");
        let mut out = vec![hex("01030100030101740201020a03000100")];
        let mut tx = |f: &dyn Fn(&mut TransactionMut)| {
            let mut t = doc.transact_mut();
            f(&mut t);
            out.push(t.encode_update_v1());
        };
        tx(&|t| {
            let m = items.insert(t, "a", MapPrelim::from([("s", In::from("x"))]));
            m.insert(t, "n", -123_456_789i64);
            m.insert(t, "f", 1e300);
            let obj = any!({"b": true, "z": null, "l": ["é", 1.5, {"k": [false]}]});
            m.insert(t, "obj", obj);
            m.insert(t, "bin", vec![0u8, 255, 7]);
            m.insert(t, "arr", ArrayPrelim::from([1, 2, 3]));
        });
        tx(&|t| {
            text.insert(t, 0, "héllo wörld 👋");
            text.format(t, 0, 3, HashMap::from([("bold".into(), Any::from(true))]));
            text.insert_embed(t, 3, Any::from("img"));
            arr.insert_range(t, 0, ["one", "two", "three"]);
        });
        tx(&|t| {
            text.remove_range(t, 1, 4);
            arr.remove_range(t, 0, 2);
            items.insert(t, "a", "overwritten");
            items.remove(t, "a");
            items.insert(t, "sub", Doc::new());
        });
        tx(&|t| {
            let el = xml.push_back(t, XmlElementPrelim::empty("p"));
            el.insert_attribute(t, "class", "x");
            el.push_back(t, XmlTextPrelim::new("inner"));
        });
        let t = doc.transact();
        out.push(t.encode_state_as_update_v1(&StateVector::default()));
        (out, t.state_vector().encode_v1())
    }

    fn awareness_update() -> Vec<u8> {
        let mut aw = Awareness::new(Doc::with_client_id(9));
        aw.set_local_state_raw(r##"{"user":{"name":"ä","color":"#f00"}}"##);
        aw.update().expect("awareness update").encode_v1()
    }

    fn yrs_decodes(bytes: &[u8]) -> Result<bool, String> {
        catch_unwind(AssertUnwindSafe(|| Update::decode_v1(bytes).is_ok()))
            .map_err(|_| format!("yrs panicked on accepted input {bytes:02x?}"))
    }

    #[test]
    fn accepts_real_payloads_and_rejects_truncations() {
        let (updates, sv) = corpus();
        let aw = awareness_update();
        assert_eq!(check_state_vector_v1(&sv), Ok(()));
        assert_eq!(check_awareness_update_v1(&aw), Ok(()));
        assert_eq!(check_update_v1(&[0, 0]), Ok(()));
        for u in &updates {
            assert_eq!((check_update_v1(u), yrs_decodes(u)), (Ok(()), Ok(true)));
            for cut in (0..u.len()).filter(|&c| check_update_v1(&u[..c]).is_ok()) {
                yrs_decodes(&u[..cut]).unwrap(); // only if the prefix is itself valid
            }
            let longer = [&u[..], &[0]].concat();
            assert_eq!(check_update_v1(&longer), Err(GuardError::TrailingBytes));
        }
        assert!((0..sv.len()).all(|cut| check_state_vector_v1(&sv[..cut]).is_err()));
        assert!((0..aw.len()).all(|cut| check_awareness_update_v1(&aw[..cut]).is_err()));
    }

    #[test]
    fn rejects_hostile_inputs() {
        let check = [
            check_update_v1,
            check_state_vector_v1,
            check_awareness_update_v1,
        ];
        let (upd, sv, aw) = (0, 1, 2);
        // items below: "01010100" (1 client, 1 block, client 1, clock 0), info, parent "t"
        let cases = [
            (upd, "ffffff0f", "CountTooLarge"), // 4-byte update, huge count
            (sv, "ffffff0f01020304", "CountTooLarge"), // 8-byte state vector
            (aw, "ffffffff0f", "CountTooLarge"), // awareness entries
            (upd, "01ffffff0f0100", "CountTooLarge"), // blocks
            (upd, "000101ffffff0f", "CountTooLarge"), // delete-set ranges
            (upd, "0101010008010174ffff0f00", "CountTooLarge"), // Any content length
            (upd, "0101010004010174ff0f00", "CountTooLarge"), // string length
            (upd, "01010100020101748080808008", "UnknownTag"), // JSON content
            (upd, "010101ffffffff0f000100", "CountTooLarge"), // clock + GC length > u32
            (upd, "00010101ffffffff0f01", "CountTooLarge"), // delete-set clock + len
            (upd, "8080808080808080808000", "BadVarInt"), // 11-byte var-int
            (upd, "01018080808080808010000000", "BadVarInt"), // client id >= 2^53
            (upd, "0101010008010174017dc0808080808080808002", "BadVarInt"), // -i64::MIN
            (upd, "ffff", "Truncated"),
            (upd, "01010100020101740101310000", "UnknownTag"), // JSON content, never accepted
            (upd, "010101000b01017400", "UnknownTag"),         // content ref 11
            (upd, "01010100070101740700", "UnknownTag"),       // WeakLink without `weak`
            (upd, "010101000401017401ff00", "UnknownTag"),     // invalid UTF-8
            (upd, "01010100000000", "UnknownTag"),             // zero-length GC
            (upd, "010101000701017403017000", "Ok"),           // XmlElement("p")
        ];
        for (which, input, want) in cases {
            let got = format!("{:?}", check[which](&hex(input)));
            assert!(got.contains(want), "{input}: {got}");
        }
        let nested = |d: usize, inner: &[u8]| {
            let head = hex("010101000801017401");
            check_update_v1(&[&head[..], &inner.repeat(d), &[126, 0]].concat())
        };
        assert_eq!(nested(10_000, &[117, 1]), Err(GuardError::TooDeep));
        assert_eq!(nested(MAX_NESTING, &[118, 1, 1, b'k']), Ok(()));
        assert_eq!(nested(MAX_NESTING + 1, &[117, 1]), Err(GuardError::TooDeep));
    }

    #[test]
    fn differential_mutations_never_panic_when_accepted() {
        let (corpus, sv) = corpus();
        let (mut seed, mut accepted) = (0x9E37_79B9_7F4A_7C15u64, 0);
        let mut rng = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for i in 0..5000 {
            let mut m = corpus[i % corpus.len()].clone();
            for _ in 0..1 + rng() % 3 {
                let pos = (rng() % m.len() as u64) as usize;
                match rng() % 4 {
                    0 => m[pos] = rng() as u8,
                    1 => m[pos] ^= 1 << (rng() % 8),
                    2 => drop(m.remove(pos)),
                    _ => m.insert(pos, [0, 1, 0x7f, 0x80, 0xFF][(rng() % 5) as usize]),
                }
            }
            if check_update_v1(&m).is_ok() {
                accepted += 1;
                yrs_decodes(&m).unwrap();
            }
            let mut s = sv.clone();
            s[i % sv.len()] = rng() as u8;
            if check_state_vector_v1(&s).is_ok() {
                let decoded = catch_unwind(|| StateVector::decode_v1(&s).is_ok());
                assert!(matches!(decoded, Ok(true)), "{s:02x?}");
            }
        }
        assert!(accepted > 100, "too few accepted mutations: {accepted}");
    }
}
