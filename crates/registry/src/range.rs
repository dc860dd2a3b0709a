//! The `Range` request header, for one byte range (RFC 9110, section 14).

use std::ops::Range;

/// One byte range as a client asked for it, before the size is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// `bytes=FIRST-LAST` (inclusive).
    FromTo(u64, u64),
    /// `bytes=FIRST-`.
    From(u64),
    /// `bytes=-N`: the last N bytes.
    Suffix(u64),
}

/// Parses a `Range` header value holding one byte range.
///
/// `None` means the header must be ignored (another unit, several ranges,
/// bad syntax, `FIRST > LAST`): the server then answers with the whole
/// representation, as RFC 9110 requires for an invalid `Range`.
pub fn parse_range(value: &str) -> Option<ByteRange> {
    let (unit, spec) = value.trim().split_once('=')?;
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return None;
    }
    let spec = spec.trim();
    if spec.contains(',') {
        return None;
    }
    let (first, last) = spec.split_once('-')?;
    let (first, last) = (first.trim(), last.trim());
    let num = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    match (first.is_empty(), last.is_empty()) {
        (true, true) => None,
        (true, false) => Some(ByteRange::Suffix(num(last)?)),
        (false, true) => Some(ByteRange::From(num(first)?)),
        (false, false) => {
            let (a, b) = (num(first)?, num(last)?);
            (a <= b).then_some(ByteRange::FromTo(a, b))
        }
    }
}

impl ByteRange {
    /// The half-open byte range to send for a representation of `size`
    /// bytes, or `None` if the range is not satisfiable (`416`).
    pub fn resolve(self, size: u64) -> Option<Range<u64>> {
        match self {
            ByteRange::FromTo(a, b) => (a < size).then(|| a..b.saturating_add(1).min(size)),
            ByteRange::From(a) => (a < size).then_some(a..size),
            ByteRange::Suffix(n) => (n > 0 && size > 0).then(|| size - n.min(size)..size),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_the_three_forms() {
        assert_eq!(parse_range("bytes=0-99"), Some(ByteRange::FromTo(0, 99)));
        assert_eq!(parse_range("bytes=5-"), Some(ByteRange::From(5)));
        assert_eq!(parse_range("bytes=-7"), Some(ByteRange::Suffix(7)));
        assert_eq!(
            parse_range(" Bytes = 1 - 2 "),
            Some(ByteRange::FromTo(1, 2))
        );
    }

    #[test]
    fn ignores_what_it_cannot_serve() {
        for v in [
            "",
            "bytes",
            "bytes=",
            "bytes=-",
            "bytes=5-3",
            "bytes=0-1,4-5",
            "items=0-1",
            "bytes=a-b",
            "bytes=+1-2",
            "bytes=1-2-3",
            "bytes=99999999999999999999-",
        ] {
            assert_eq!(parse_range(v), None, "{v:?}");
        }
    }

    #[test]
    fn resolves_against_the_size() {
        assert_eq!(ByteRange::FromTo(0, 9).resolve(100), Some(0..10));
        assert_eq!(ByteRange::FromTo(90, 200).resolve(100), Some(90..100));
        assert_eq!(ByteRange::FromTo(100, 200).resolve(100), None);
        assert_eq!(ByteRange::FromTo(0, u64::MAX).resolve(100), Some(0..100));
        assert_eq!(ByteRange::From(99).resolve(100), Some(99..100));
        assert_eq!(ByteRange::From(100).resolve(100), None);
        assert_eq!(ByteRange::Suffix(10).resolve(100), Some(90..100));
        assert_eq!(ByteRange::Suffix(1000).resolve(100), Some(0..100));
        assert_eq!(ByteRange::Suffix(0).resolve(100), None);
        assert_eq!(ByteRange::Suffix(5).resolve(0), None);
        assert_eq!(ByteRange::From(0).resolve(0), None);
    }

    proptest! {
        #[test]
        fn never_panics_and_stays_in_bounds(s in "\\PC{0,40}", size in 0u64..1_000_000) {
            if let Some(r) = parse_range(&s) {
                if let Some(range) = r.resolve(size) {
                    prop_assert!(range.start < range.end && range.end <= size);
                }
            }
        }

        #[test]
        fn roundtrips_formatted_ranges(a in 0u64..u64::MAX / 2, len in 0u64..1 << 40) {
            let b = a + len;
            prop_assert_eq!(parse_range(&format!("bytes={a}-{b}")), Some(ByteRange::FromTo(a, b)));
            prop_assert_eq!(parse_range(&format!("bytes={a}-")), Some(ByteRange::From(a)));
            prop_assert_eq!(parse_range(&format!("bytes=-{a}")), Some(ByteRange::Suffix(a)));
        }
    }
}
