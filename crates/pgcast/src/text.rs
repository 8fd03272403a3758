//! Client-supplied text made safe to repeat: in log lines, audit records and error replies.
//!
//! Anything a client sends (a topic, an event name, a column in a filter) may be 200 KB long or
//! hold control characters, NUL among them, which PostgreSQL refuses in a text column. What is
//! repeated is a bounded, escaped prefix that says how much was left out. This module does not
//! decide what may be logged (row values and tokens never are); it only bounds what is.

use std::fmt::Write as _;

/// Characters of a client-supplied name repeated in an error message or log line.
pub const NAME_CHARS: usize = 64;

/// `s` as a quoted, escaped string of at most `max_chars` characters (as `{:?}` prints it),
/// followed by how many bytes were cut: `"abc…" (+1234 bytes)`.
pub fn clip(s: &str, max_chars: usize) -> String {
    let (prefix, cut) = escaped_prefix(s, max_chars);
    match cut {
        Some(bytes) => format!("\"{prefix}…\" (+{bytes} bytes)"),
        None => format!("\"{prefix}\""),
    }
}

/// Like [`clip`] without the quotes, for names inside a larger text (`patient_id=eq.…`).
pub fn escape(s: &str, max_chars: usize) -> String {
    let (mut prefix, cut) = escaped_prefix(s, max_chars);
    if cut.is_some() {
        prefix.push('…');
    }
    prefix
}

/// The first `max_chars` characters of `s` escaped, and how many bytes were left out.
fn escaped_prefix(s: &str, max_chars: usize) -> (String, Option<usize>) {
    let cut = s.char_indices().nth(max_chars).map(|(at, _)| at);
    let prefix = &s[..cut.unwrap_or(s.len())];
    let mut out = String::with_capacity(prefix.len());
    for c in prefix.chars() {
        out.extend(c.escape_debug());
    }
    (out, cut.map(|at| s.len() - at))
}

/// `s` with what PostgreSQL cannot store in a text column (NUL) replaced by U+FFFD and cut to
/// at most `max_chars` characters; `None` when nothing had to change.
pub fn storable(s: &str, max_chars: usize) -> Option<String> {
    let too_long = s.char_indices().nth(max_chars).map(|(at, _)| at);
    if too_long.is_none() && !s.contains('\0') {
        return None;
    }
    let kept = &s[..too_long.unwrap_or(s.len())];
    let mut out = kept.replace('\0', "\u{FFFD}");
    if let Some(at) = too_long {
        let _ = write!(out, "… (+{} bytes)", s.len() - at);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_clean_text_is_only_quoted() {
        assert_eq!(clip("room:1", 64), "\"room:1\"");
    }

    #[test]
    fn long_text_is_cut_and_says_how_much_is_missing() {
        let long = "x".repeat(200_000);
        let clipped = clip(&long, 10);
        assert_eq!(clipped, format!("\"{}…\" (+199990 bytes)", "x".repeat(10)));
    }

    #[test]
    fn control_characters_are_escaped_and_multibyte_text_is_cut_on_a_boundary() {
        assert_eq!(clip("a\0b\nc\u{1b}", 64), "\"a\\0b\\nc\\u{1b}\"");
        assert_eq!(clip("ééé", 2), "\"éé…\" (+2 bytes)");
    }

    #[test]
    fn escape_is_clip_without_quotes() {
        assert_eq!(escape("col\n", 64), "col\\n");
        assert_eq!(escape("abcdef", 3), "abc…");
    }

    #[test]
    fn storable_replaces_nul_and_bounds_length() {
        assert_eq!(storable("fine", 10), None);
        assert_eq!(storable("a\0b", 10).as_deref(), Some("a\u{FFFD}b"));
        assert_eq!(storable("abcdef", 3).as_deref(), Some("abc… (+3 bytes)"));
    }
}
