//! Parsing the session and user out of request paths (PROTOCOL §1).
//!
//! Segments are split on the raw path and then percent-decoded once, on every endpoint, so an
//! encoded `/` inside a name stays part of the name and `a%2541` names `a%41`, never `aA`.
//! Names are NFC-normalised, so the same name typed on two systems is one session or user, and
//! format characters (bidi overrides, zero-width characters) are refused: they make two
//! different names look the same.

use percent_encoding::percent_decode_str;
use unicode_normalization::UnicodeNormalization;
use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};

/// Longest session id or user name, in characters.
pub const MAX_NAME_CHARS: usize = 128;

/// A decoded, valid name from a raw path segment.
pub fn decode_name(segment: &str) -> Option<String> {
    normalize_name(&percent_decode_str(segment).decode_utf8().ok()?)
}

/// A (decoded) name in NFC, if it is valid: 1 to 128 characters, no control or format
/// characters.
pub fn normalize_name(name: &str) -> Option<String> {
    let name: String = name.nfc().collect();
    let valid = !name.is_empty()
        && name.chars().count() <= MAX_NAME_CHARS
        && !name
            .chars()
            .any(|c| c.is_control() || c.general_category() == GeneralCategory::Format);
    valid.then_some(name)
}

/// The session named in an API path, `/api/sessions/{session}/...`, decoded once.
pub fn api_session(path: &str) -> Option<String> {
    let (segment, _) = path.strip_prefix("/api/sessions/")?.split_once('/')?;
    decode_name(segment)
}

/// The decoded segments after `prefix` (e.g. `/ws/`), if there are exactly `n` valid ones.
pub fn parse_segments(path: &str, prefix: &str, n: usize) -> Option<Vec<String>> {
    let rest = path.strip_prefix(prefix)?;
    let segments: Vec<&str> = rest.split('/').collect();
    if segments.len() != n {
        return None;
    }
    segments.into_iter().map(decode_name).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_valid_paths() {
        assert_eq!(
            parse_segments("/ws/lab%201/J%C3%BCrgen", "/ws/", 2),
            Some(vec!["lab 1".to_owned(), "Jürgen".to_owned()])
        );
        assert_eq!(
            parse_segments("/ws/a%2Fb/u", "/ws/", 2),
            Some(vec!["a/b".to_owned(), "u".to_owned()])
        );
        assert_eq!(
            parse_segments("/yjs/room", "/yjs/", 1),
            Some(vec!["room".to_owned()])
        );
    }

    #[test]
    fn refuses_invalid_paths() {
        for path in [
            "/ws/",
            "/ws/s",
            "/ws/s/",
            "/ws//u",
            "/ws/s/u/x",
            "/ws/s/%0A",
            "/ws/s/%FF",
            "/ws",
        ] {
            assert_eq!(parse_segments(path, "/ws/", 2), None, "{path}");
        }
        let long = "x".repeat(MAX_NAME_CHARS + 1);
        assert_eq!(parse_segments(&format!("/ws/{long}/u"), "/ws/", 2), None);
        assert!(decode_name(&"é".repeat(MAX_NAME_CHARS)).is_some());
    }

    #[test]
    fn names_are_nfc_without_format_characters() {
        // "é" precomposed and as e + combining acute name the same session.
        assert_eq!(decode_name("caf%C3%A9"), Some("café".to_owned()));
        assert_eq!(decode_name("cafe%CC%81"), Some("café".to_owned()));
        // Right-to-left override, zero-width space, zero-width joiner, byte order mark.
        for hidden in ["a%E2%80%AEb", "a%E2%80%8Bb", "a%E2%80%8Db", "%EF%BB%BFa"] {
            assert_eq!(decode_name(hidden), None, "{hidden}");
        }
        assert_eq!(normalize_name("Jürgen"), Some("Jürgen".to_owned()));
        assert_eq!(normalize_name("x\u{2066}y"), None);
    }

    #[test]
    fn api_paths_are_decoded_once() {
        assert_eq!(
            api_session("/api/sessions/a%2541/scene"),
            Some("a%41".to_owned())
        );
        assert_eq!(
            api_session("/api/sessions/a%2Fb/update"),
            Some("a/b".to_owned())
        );
        assert_eq!(api_session("/api/sessions/a"), None);
        assert_eq!(api_session("/api/sessions//scene"), None);
    }
}
