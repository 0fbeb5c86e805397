//! U+0000, which PostgreSQL stores in neither `text` nor `jsonb`.
//!
//! A write holding it fails every time it is tried, so it must never reach a
//! statement: input that carries it is refused where it enters (an HTTP body,
//! a message's envelope), and text we only keep for people to read (an error,
//! an unreadable body, a broker header) has it replaced.

use std::borrow::Cow;

use serde_json::Value;

/// The JSON pointer of the first string (object key or value) in the valid
/// JSON `raw` that holds U+0000, if any. JSON can carry it only as the escape
/// `\u0000`, so text without that escape is not parsed again.
pub fn nul_character_at(raw: &[u8]) -> Option<String> {
    // Most bodies hold no escape at all: one byte search settles them.
    memchr::memchr(b'\\', raw)?;
    let escaped = memchr::memmem::find_iter(raw, b"\\u0000").any(|at| {
        raw[..at]
            .iter()
            .rev()
            .take_while(|byte| **byte == b'\\')
            .count()
            % 2
            == 0
    });
    if !escaped {
        return None;
    }
    let value: Value = serde_json::from_slice(raw).ok()?;
    find_nul(&value, String::new())
}

fn find_nul(value: &Value, at: String) -> Option<String> {
    let escape = |key: &str| key.replace('~', "~0").replace('/', "~1");
    match value {
        Value::String(text) if text.contains('\0') => {
            Some(if at.is_empty() { "/".into() } else { at })
        }
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(index, item)| find_nul(item, format!("{at}/{index}"))),
        Value::Object(fields) => fields.iter().find_map(|(key, item)| {
            let here = format!("{at}/{}", escape(key));
            if key.contains('\0') {
                Some(here)
            } else {
                find_nul(item, here)
            }
        }),
        _ => None,
    }
}

/// `text` with each U+0000 replaced by U+FFFD (borrowed when it has none).
pub fn without_nul(text: &str) -> Cow<'_, str> {
    if text.contains('\0') {
        Cow::Owned(text.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_escaped_nul_is_found_with_its_pointer() {
        let at = |raw: &str| nul_character_at(raw.as_bytes());
        assert_eq!(at(r#"{"a": "x\u0000y"}"#), Some("/a".into()));
        assert_eq!(
            at(r#"{"a": [1, {"b/c": "\u0000"}]}"#),
            Some("/a/1/b~1c".into())
        );
        assert_eq!(at(r#"{"k\u0000": 1}"#), Some("/k\u{0}".into()));
        assert_eq!(at(r#""\u0000""#), Some("/".into()));
    }

    #[test]
    fn an_escaped_backslash_before_u0000_is_not_a_nul() {
        let at = |raw: &str| nul_character_at(raw.as_bytes());
        assert_eq!(at(r#"{"a": "\\u0000"}"#), None);
        assert_eq!(at(r#"{"a": "\\\u0000"}"#), Some("/a".into()));
        assert_eq!(at(r#"{"a": "plain"}"#), None);
    }

    #[test]
    fn nul_is_replaced_and_other_text_borrowed() {
        assert_eq!(without_nul("a\0b"), "a\u{FFFD}b");
        assert!(matches!(without_nul("ab"), Cow::Borrowed("ab")));
    }
}
