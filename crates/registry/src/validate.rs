//! Checks a pushed overlay while it streams, before it is stored.
//!
//! The header and manifest are buffered (they are small, and bounded by
//! [`OverlayValidator::new`]'s limit) and parsed with `cloudlet-overlay`.
//! After that, every segment is hashed as its bytes go by and compared with
//! the manifest, and the stream must end exactly at the file length the
//! header announces. Nothing but the prefix is kept in memory.

use cloudlet_overlay::format::{parse_prefix, FormatError, Header, Manifest, HEADER_LEN};

/// Why a pushed body is not an acceptable overlay.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvalidOverlay {
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("Header and manifest take {needed} bytes, more than the {limit} bytes this registry accepts")]
    PrefixTooLarge { needed: u64, limit: u64 },
    #[error("Segment {segment} at offset {offset} does not match its hash")]
    SegmentHashMismatch { segment: usize, offset: u64 },
    #[error("The request announces {announced} bytes but the overlay header says {file_len}")]
    LengthMismatch { announced: u64, file_len: u64 },
    #[error("Overlay already refused")]
    Refused,
}

/// What the registry learned about an accepted overlay.
#[derive(Debug, Clone)]
pub struct ValidatedOverlay {
    pub header: Header,
    pub manifest: Manifest,
}

impl ValidatedOverlay {
    /// Size of the whole overlay file.
    pub fn size(&self) -> u64 {
        self.header.file_len
    }
}

/// Incremental overlay checker: [`feed`](Self::feed) it the body in pieces,
/// then [`finish`](Self::finish).
#[derive(Debug)]
pub struct OverlayValidator {
    max_prefix_len: u64,
    state: State,
}

#[derive(Debug)]
enum State {
    Prefix(Vec<u8>),
    Segments(Box<Streaming>),
    Failed,
}

#[derive(Debug)]
struct Streaming {
    parsed: ValidatedOverlay,
    /// Absolute offset of the next byte.
    pos: u64,
    /// Index of the segment being hashed (`segments.len()` when done).
    segment: usize,
    segment_end: u64,
    hasher: blake3::Hasher,
}

/// Default limit on the header plus the stored manifest: 64 MiB.
pub const DEFAULT_MAX_PREFIX_LEN: u64 = 64 << 20;

impl Default for OverlayValidator {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_PREFIX_LEN)
    }
}

impl OverlayValidator {
    /// A validator that refuses overlays whose header and stored manifest
    /// take more than `max_prefix_len` bytes.
    pub fn new(max_prefix_len: u64) -> OverlayValidator {
        OverlayValidator {
            max_prefix_len,
            state: State::Prefix(Vec::new()),
        }
    }

    /// The header, once it has been parsed.
    pub fn header(&self) -> Option<&Header> {
        match &self.state {
            State::Segments(s) => Some(&s.parsed.header),
            _ => None,
        }
    }

    /// Checks the next bytes of the body. After an error the validator
    /// refuses everything.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), InvalidOverlay> {
        let state = std::mem::replace(&mut self.state, State::Failed);
        let next = self.advance(state, bytes)?;
        self.state = next;
        Ok(())
    }

    fn advance(&self, state: State, mut bytes: &[u8]) -> Result<State, InvalidOverlay> {
        let mut prefix = match state {
            State::Failed => return Err(InvalidOverlay::Refused),
            State::Segments(mut s) => {
                s.feed(bytes)?;
                return Ok(State::Segments(s));
            }
            State::Prefix(p) => p,
        };
        loop {
            let needed = if prefix.len() < HEADER_LEN {
                HEADER_LEN as u64
            } else {
                let h = Header::parse(&prefix)?;
                h.manifest_range().end
            };
            if needed > self.max_prefix_len {
                return Err(InvalidOverlay::PrefixTooLarge {
                    needed,
                    limit: self.max_prefix_len,
                });
            }
            let missing = needed as usize - prefix.len();
            let take = missing.min(bytes.len());
            prefix.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if prefix.len() < HEADER_LEN {
                // Refuse garbage as early as its first bytes show it.
                match Header::parse(&prefix) {
                    Err(FormatError::Truncated { .. }) => {}
                    Err(e) => return Err(e.into()),
                    Ok(_) => {}
                }
            }
            if (prefix.len() as u64) < needed {
                return Ok(State::Prefix(prefix));
            }
            if needed == HEADER_LEN as u64 {
                // Header complete: once more to learn where the manifest ends.
                continue;
            }
            let (header, manifest) = parse_prefix(&prefix)?;
            let mut s = Box::new(Streaming::new(ValidatedOverlay { header, manifest }));
            s.feed(bytes)?;
            return Ok(State::Segments(s));
        }
    }

    /// Checks that the body ended where the header said it would.
    pub fn finish(self) -> Result<ValidatedOverlay, InvalidOverlay> {
        match self.state {
            State::Prefix(p) => match parse_prefix(&p) {
                Err(e) => Err(e.into()),
                // Unreachable in practice: a complete prefix moves on.
                Ok(_) => Err(FormatError::Truncated {
                    offset: p.len() as u64,
                    needed: 1,
                }
                .into()),
            },
            State::Segments(s) => {
                let file_len = s.parsed.header.file_len;
                if s.pos < file_len {
                    return Err(FormatError::Truncated {
                        offset: s.pos,
                        needed: file_len - s.pos,
                    }
                    .into());
                }
                Ok(s.parsed)
            }
            State::Failed => Err(InvalidOverlay::Refused),
        }
    }
}

impl Streaming {
    fn new(parsed: ValidatedOverlay) -> Streaming {
        let pos = parsed.manifest.data_offset;
        let mut s = Streaming {
            parsed,
            pos,
            segment: 0,
            segment_end: pos,
            hasher: blake3::Hasher::new(),
        };
        s.segment_end = s.end_of(0);
        s
    }

    fn end_of(&self, segment: usize) -> u64 {
        let m = &self.parsed.manifest;
        match m.segments.get(segment) {
            Some(seg) => m.data_offset + seg.offset + seg.stored_len,
            None => self.parsed.header.file_len,
        }
    }

    /// Checks every segment that is complete at the current position.
    fn close_segments(&mut self) -> Result<(), InvalidOverlay> {
        let segments = &self.parsed.manifest.segments;
        while self.segment < segments.len() && self.pos == self.segment_end {
            let seg = &segments[self.segment];
            if self.hasher.finalize().as_bytes() != &seg.hash {
                return Err(InvalidOverlay::SegmentHashMismatch {
                    segment: self.segment,
                    offset: self.parsed.manifest.data_offset + seg.offset,
                });
            }
            self.hasher.reset();
            self.segment += 1;
            self.segment_end = self.end_of(self.segment);
        }
        Ok(())
    }

    fn feed(&mut self, mut bytes: &[u8]) -> Result<(), InvalidOverlay> {
        self.close_segments()?;
        while !bytes.is_empty() {
            if self.segment >= self.parsed.manifest.segments.len() {
                return Err(FormatError::TrailingData {
                    offset: self.pos,
                    extra: bytes.len() as u64,
                }
                .into());
            }
            let n = ((self.segment_end - self.pos) as usize).min(bytes.len());
            self.hasher.update(&bytes[..n]);
            self.pos += n as u64;
            bytes = &bytes[n..];
            self.close_segments()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::OnceLock;

    fn overlay() -> &'static [u8] {
        static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
        BYTES.get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let path = crate::testutil::make_overlay(dir.path(), "o", 1);
            std::fs::read(path).unwrap()
        })
    }

    fn check(bytes: &[u8], piece: usize) -> Result<ValidatedOverlay, InvalidOverlay> {
        let mut v = OverlayValidator::default();
        for c in bytes.chunks(piece.max(1)) {
            v.feed(c)?;
        }
        v.finish()
    }

    #[test]
    fn accepts_a_real_overlay_in_any_pieces() {
        let o = overlay();
        let (header, manifest) = parse_prefix(o).unwrap();
        assert!(manifest.segments.len() > 2, "want several segments");
        for piece in [1, 7, 128, 129, 4096, o.len()] {
            let v = check(o, piece).unwrap();
            assert_eq!(v.header, header);
            assert_eq!(v.size(), o.len() as u64);
            assert_eq!(v.manifest.base_id, "base-1");
        }
    }

    #[test]
    fn refuses_garbage_early() {
        let mut v = OverlayValidator::default();
        assert!(matches!(
            v.feed(b"GET / HTTP/1.1\r\n"),
            Err(InvalidOverlay::Format(FormatError::BadMagic))
        ));
        assert_eq!(v.feed(b"x"), Err(InvalidOverlay::Refused));
    }

    #[test]
    fn refuses_truncation_and_trailing_data() {
        let o = overlay();
        for len in [0, 5, 127, 128, 200, o.len() - 1] {
            assert!(
                matches!(
                    check(&o[..len], 1000),
                    Err(InvalidOverlay::Format(FormatError::Truncated { .. }))
                ),
                "{len}"
            );
        }
        let mut long = o.to_vec();
        long.push(0);
        assert!(matches!(
            check(&long, 1000),
            Err(InvalidOverlay::Format(FormatError::TrailingData { .. }))
        ));
    }

    #[test]
    fn refuses_a_manifest_over_the_limit() {
        let mut v = OverlayValidator::new(200);
        assert!(matches!(
            v.feed(overlay()),
            Err(InvalidOverlay::PrefixTooLarge { limit: 200, .. })
        ));
    }

    #[test]
    fn refuses_a_corrupted_segment() {
        let o = overlay();
        let (_, m) = parse_prefix(o).unwrap();
        let mut bad = o.to_vec();
        let at = (m.data_offset + m.segments[1].offset + 3) as usize;
        bad[at] ^= 0x40;
        assert_eq!(
            check(&bad, 333).unwrap_err(),
            InvalidOverlay::SegmentHashMismatch {
                segment: 1,
                offset: m.data_offset + m.segments[1].offset
            }
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn every_flipped_byte_is_refused(pos in any::<prop::sample::Index>(), bit in 0u8..8, piece in 1usize..5000) {
            let mut bad = overlay().to_vec();
            let at = pos.index(bad.len());
            bad[at] ^= 1 << bit;
            prop_assert!(check(&bad, piece).is_err());
        }

        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600), piece in 1usize..100) {
            let mut bytes = bytes;
            if bytes.len() >= 8 {
                bytes[..8].copy_from_slice(b"CLOVLY\r\n");
            }
            prop_assert!(check(&bytes, piece).is_err());
        }
    }
}
