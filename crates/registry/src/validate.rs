//! The push check: [`Validation::full`] of `cloudlet-overlay`, the same
//! validation as `cloudlet overlay inspect` and `verify` and the daemon's,
//! run on the body while it streams, before it is stored.
//!
//! The header and manifest are buffered (they are small, and bounded by
//! [`DEFAULT_MAX_PREFIX_LEN`]); after that every segment is hashed as its
//! bytes go by, and the body must end exactly at the file length the header
//! announces (checked at once against a `Content-Length`). Nothing but the
//! prefix is kept in memory. The registry holds no bases: an overlay for
//! any base id is accepted.

use cloudlet_overlay::signature::{unix_now, SignaturePolicy};
use cloudlet_overlay::validate::{OverlayStream, Validation};

/// Default limit on the header plus the stored manifest: 64 MiB.
pub const DEFAULT_MAX_PREFIX_LEN: u64 = 64 << 20;

/// The check of one pushed body of `announced` bytes (its
/// `Content-Length`, if any), its signature judged by `policy` (with the
/// header and manifest, before the segments).
pub(crate) fn push_check(
    max_prefix_len: u64,
    announced: Option<u64>,
    policy: &SignaturePolicy,
) -> OverlayStream {
    let mut s = Validation::full()
        .prefix_limit(max_prefix_len)
        .signatures(policy.clone(), unix_now())
        .stream();
    if let Some(n) = announced {
        s.expect_len(n);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudlet_overlay::format::parse_prefix;
    use cloudlet_overlay::{InvalidOverlay, ValidOverlay};
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

    fn check(bytes: &[u8], piece: usize) -> Result<ValidOverlay, InvalidOverlay> {
        let mut v = push_check(DEFAULT_MAX_PREFIX_LEN, None, &SignaturePolicy::default());
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
        let mut v = push_check(DEFAULT_MAX_PREFIX_LEN, None, &SignaturePolicy::default());
        assert!(matches!(
            v.feed(b"GET / HTTP/1.1\r\n"),
            Err(InvalidOverlay::Format(
                cloudlet_overlay::FormatError::BadMagic
            ))
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
                    Err(InvalidOverlay::Truncated { .. })
                ),
                "{len}"
            );
        }
        let mut long = o.to_vec();
        long.push(0);
        assert_eq!(
            check(&long, 1000).unwrap_err(),
            InvalidOverlay::TrailingData {
                offset: o.len() as u64,
                extra: 1
            }
        );
        // Told at once when the length is announced.
        let mut v = push_check(
            DEFAULT_MAX_PREFIX_LEN,
            Some(long.len() as u64),
            &SignaturePolicy::default(),
        );
        assert!(matches!(
            v.feed(&long[..4096]),
            Err(InvalidOverlay::TrailingData { extra: 1, .. })
        ));
    }

    #[test]
    fn refuses_a_manifest_over_the_limit() {
        let mut v = push_check(200, None, &SignaturePolicy::default());
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
                start: m.data_offset + m.segments[1].offset,
                end: m.data_offset + m.segments[1].offset + m.segments[1].stored_len,
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
