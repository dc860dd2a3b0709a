//! Minimal JSON output helpers (the apps only ever produce JSON, never parse it).

use std::fmt::Write;

/// Appends `s` as a JSON string literal (with quotes) to `out`.
pub fn write_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{2028}' || c == '\u{2029}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `s` as a JSON string literal.
pub fn string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    write_str(&mut out, s);
    out
}

/// `Some(s)` as a string literal, `None` as `null`.
pub fn opt_string(s: Option<&str>) -> String {
    s.map_or_else(|| "null".to_string(), string)
}

/// A JSON array of string literals.
pub fn string_array<'a>(items: impl IntoIterator<Item = &'a str>) -> String {
    let mut out = String::from("[");
    for (i, s) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_str(&mut out, s);
    }
    out.push(']');
    out
}

/// Builds a flat JSON object field by field, in insertion order.
#[derive(Debug, Default)]
pub struct Object {
    buf: String,
}

impl Object {
    pub fn new() -> Self {
        Object::default()
    }

    fn key(&mut self, key: &str) {
        self.buf.push(if self.buf.is_empty() { '{' } else { ',' });
        write_str(&mut self.buf, key);
        self.buf.push(':');
    }

    /// Adds a field whose value is already JSON (number, bool, array, object, null).
    pub fn raw(mut self, key: &str, json: impl std::fmt::Display) -> Self {
        self.key(key);
        let _ = write!(self.buf, "{json}");
        self
    }

    /// Adds a string field.
    pub fn str(mut self, key: &str, value: &str) -> Self {
        self.key(key);
        write_str(&mut self.buf, value);
        self
    }

    /// Adds a string field, or `null` for `None`.
    pub fn opt_str(mut self, key: &str, value: Option<&str>) -> Self {
        self.key(key);
        self.buf.push_str(&opt_string(value));
        self
    }

    /// Finishes the object.
    pub fn finish(mut self) -> String {
        if self.buf.is_empty() {
            self.buf.push('{');
        }
        self.buf.push('}');
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_strings() {
        assert_eq!(string("a\"b\\c\n\u{1}é"), r#""a\"b\\c\n\u0001é""#);
    }

    #[test]
    fn builds_objects_and_arrays() {
        assert_eq!(Object::new().finish(), "{}");
        let o = Object::new()
            .raw("n", 3)
            .raw("f", 1.5)
            .str("s", "x")
            .opt_str("none", None)
            .raw("arr", string_array(["a", "b\""]))
            .finish();
        assert_eq!(
            o,
            r#"{"n":3,"f":1.5,"s":"x","none":null,"arr":["a","b\""]}"#
        );
        assert_eq!(string_array(std::iter::empty()), "[]");
    }
}
