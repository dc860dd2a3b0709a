//! Percent-decoding of paths and `application/x-www-form-urlencoded` query strings.

/// Decodes `%XX` escapes. With `plus_as_space`, `+` becomes a space (query strings).
/// Returns `None` for a malformed escape.
pub fn percent_decode(s: &str, plus_as_space: bool) -> Option<Vec<u8>> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hi = hex_val(*bytes.get(i + 1)?)?;
                let lo = hex_val(*bytes.get(i + 2)?)?;
                out.push(hi << 4 | lo);
                i += 3;
            }
            b'+' if plus_as_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    Some(out)
}

/// Percent-decodes `s` into UTF-8 text; `None` if malformed or not UTF-8.
pub fn percent_decode_str(s: &str, plus_as_space: bool) -> Option<String> {
    String::from_utf8(percent_decode(s, plus_as_space)?).ok()
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Iterates over decoded `(name, value)` pairs of a query string, skipping pairs
/// that do not decode.
pub fn query_pairs(query: &str) -> impl Iterator<Item = (String, String)> + '_ {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            Some((percent_decode_str(k, true)?, percent_decode_str(v, true)?))
        })
}

/// First decoded value of parameter `name` in `query`.
pub fn query_param(query: &str, name: &str) -> Option<String> {
    query_pairs(query).find(|(k, _)| k == name).map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_escapes_and_plus() {
        assert_eq!(
            percent_decode_str("a%20b+c", false).as_deref(),
            Some("a b+c")
        );
        assert_eq!(
            percent_decode_str("a%20b+c", true).as_deref(),
            Some("a b c")
        );
        assert_eq!(percent_decode_str("%C3%A9", true).as_deref(), Some("é"));
        assert_eq!(percent_decode("%ff", false), Some(vec![0xff]));
    }

    #[test]
    fn rejects_malformed_escapes() {
        for s in ["%", "%2", "%zz", "a%g0", "%ff"] {
            assert_eq!(percent_decode_str(s, true), None, "{s}");
        }
    }

    #[test]
    fn query_params() {
        let q = "text=hello+world&empty=&flag&x=%26%3D&text=second&bad=%zz";
        assert_eq!(query_param(q, "text").as_deref(), Some("hello world"));
        assert_eq!(query_param(q, "empty").as_deref(), Some(""));
        assert_eq!(query_param(q, "flag").as_deref(), Some(""));
        assert_eq!(query_param(q, "x").as_deref(), Some("&="));
        assert_eq!(query_param(q, "bad"), None);
        assert_eq!(query_param(q, "missing"), None);
    }
}
