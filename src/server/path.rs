//! Parsing the session and user out of request paths (PROTOCOL §1).
//!
//! Segments are split on the raw path and then percent-decoded, so an encoded `/` inside a
//! name stays part of the name.

use percent_encoding::percent_decode_str;

/// Longest session id or user name, in characters.
pub const MAX_NAME_CHARS: usize = 128;

/// A decoded, valid name from a raw path segment.
pub fn decode_name(segment: &str) -> Option<String> {
    let name = percent_decode_str(segment).decode_utf8().ok()?;
    valid_name(&name).then(|| name.into_owned())
}

/// Whether a (decoded) name is valid: 1 to 128 characters, no control characters.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.chars().count() <= MAX_NAME_CHARS
        && !name.chars().any(char::is_control)
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
}
