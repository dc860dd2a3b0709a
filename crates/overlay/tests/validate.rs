//! The one validation: its three ways in (a file, a stream in pieces, the
//! prefix plus the length) give the same verdict on every input, and its
//! messages say what is wrong and where.

mod common;

use std::sync::OnceLock;

use cloudlet_overlay::validate::{check_segment, InvalidOverlay, Level, Place, Validation};
use cloudlet_overlay::{create_overlay, format, inspect, Codec};
use common::{overlay_path, random_vm};
use proptest::prelude::*;

/// A small overlay with app metadata and several segments.
fn overlay() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| {
        let vm = random_vm(5, 40, 40, 1, 0);
        vm.write();
        let ov = overlay_path(vm.dir.path());
        let mut config = vm.create_config(Codec::default());
        config.segment_size = 2 * common::CS as u32;
        create_overlay(&config, &ov).unwrap();
        std::fs::read(&ov).unwrap()
    })
}

/// The verdict of every way in, at `level`; all must agree.
fn verdict(bytes: &[u8], level: Level, base: Option<&str>) -> Result<u64, InvalidOverlay> {
    let mut v = Validation::new(level);
    if let Some(b) = base {
        v = v.base(b);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.clo");
    std::fs::write(&path, bytes).unwrap();
    let from_file = v.check_file(&path).map(|o| o.size()).map_err(|e| match e {
        cloudlet_overlay::ValidateOverlayError::Invalid(e) => e,
        other => panic!("{other}"),
    });
    let from_bytes = v.check_bytes(bytes).map(|o| o.size());
    assert_eq!(from_file, from_bytes, "file and bytes disagree");
    for piece in [1usize, 100, 4096] {
        let mut s = v.stream();
        s.expect_len(bytes.len() as u64);
        let r = bytes
            .chunks(piece)
            .try_for_each(|c| s.feed(c))
            .and_then(|_| s.finish())
            .map(|o| o.size());
        if level == Level::Full {
            assert_eq!(r, from_bytes, "stream in pieces of {piece} disagrees");
        }
    }
    // Without the length up front the verdict is the same (only trailing
    // data is counted as it arrives).
    let mut s = v.stream();
    let r = s.feed(bytes).and_then(|_| s.finish()).map(|o| o.size());
    if level == Level::Full {
        assert_eq!(r, from_bytes, "stream without a length disagrees");
    }
    // The daemon's way: the prefix and the length, then segment by segment.
    let head = &bytes[..bytes.len().min(format::HEADER_LEN)];
    let prefix = v.prefix_len(head).and_then(|end| {
        let p = &bytes[..bytes.len().min(end as usize)];
        v.check_prefix(p, Some(bytes.len() as u64))
    });
    let by_segment = prefix.and_then(|o| {
        if level == Level::Full {
            for i in 0..o.manifest.segments.len() as u32 {
                let r = o.manifest.segment_range(i).unwrap();
                check_segment(&o.manifest, i, &bytes[r.start as usize..r.end as usize])?;
            }
        }
        Ok(o.size())
    });
    assert_eq!(by_segment, from_bytes, "prefix + segments disagree");
    from_bytes
}

#[test]
fn a_good_overlay_passes_every_way() {
    let o = overlay();
    let n = o.len() as u64;
    assert_eq!(verdict(o, Level::Full, None), Ok(n));
    assert_eq!(verdict(o, Level::Structure, Some("base-1")), Ok(n));
    assert_eq!(
        verdict(o, Level::Structure, Some("base-2")),
        Err(InvalidOverlay::WrongBase {
            overlay: "base-1".into(),
            expected: "base-2".into()
        })
    );
    let v = Validation::full().check_bytes(o).unwrap();
    assert_eq!(v.app.unwrap().ports, [8080]);
}

#[test]
fn every_truncation_names_its_place() {
    let o = overlay();
    let (_, m) = format::parse_prefix(o).unwrap();
    let mut cuts: Vec<usize> = (0..m.data_offset as usize + 2).collect();
    cuts.extend((0..o.len()).step_by(131));
    for i in 0..m.segments.len() as u32 {
        let r = m.segment_range(i).unwrap();
        cuts.extend([r.start as usize, r.end as usize - 1]);
    }
    cuts.retain(|&c| c < o.len());
    for cut in cuts {
        let err = verdict(&o[..cut], Level::Full, None).unwrap_err();
        let want = if cut < format::HEADER_LEN {
            Place::Header
        } else if (cut as u64) < m.data_offset {
            Place::Manifest
        } else {
            let i = (0..m.segments.len() as u32)
                .find(|&i| (cut as u64) < m.segment_range(i).unwrap().end)
                .unwrap();
            Place::Segment(i)
        };
        match &err {
            InvalidOverlay::Truncated { at, place, .. } => {
                assert_eq!((*at, *place), (cut as u64, want), "{err}")
            }
            other => panic!("cut at {cut}: {other}"),
        }
        assert!(
            err.to_string()
                .starts_with(&format!("Overlay truncated at byte {cut}, in {want}")),
            "{err}"
        );
    }
}

#[test]
fn damage_is_named() {
    let o = overlay();
    let (_, m) = format::parse_prefix(o).unwrap();
    let last = m.segments.len() as u32 - 1;
    let mut b = o.to_vec();
    let r = m.segment_range(last).unwrap();
    b[r.start as usize] ^= 0x10;
    let err = verdict(&b, Level::Full, None).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "Segment {last} hash mismatch (bytes {}..{}): the segment is corrupted",
            r.start, r.end
        )
    );
    // The structure level does not read segments.
    assert!(verdict(&b, Level::Structure, None).is_ok());

    let mut long = o.to_vec();
    long.extend_from_slice(b"xyz");
    assert_eq!(
        verdict(&long, Level::Structure, None)
            .unwrap_err()
            .to_string(),
        format!(
            "Trailing data: 3 bytes after the last segment, from byte {}",
            o.len()
        )
    );

    // inspect is the full validation.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad");
    std::fs::write(&p, &b).unwrap();
    let err = inspect(&p).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("Segment {last} hash mismatch")),
        "{err}"
    );
}

#[test]
fn a_prefix_over_the_limit_is_refused() {
    let err = Validation::full()
        .prefix_limit(200)
        .check_bytes(overlay())
        .unwrap_err();
    assert!(
        matches!(err, InvalidOverlay::PrefixTooLarge { limit: 200, .. }),
        "{err}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn every_bit_flip_is_refused_the_same_way(pos in any::<prop::sample::Index>(), bit in 0u8..8) {
        let mut b = overlay().to_vec();
        let i = pos.index(b.len());
        b[i] ^= 1 << bit;
        let err = verdict(&b, Level::Full, None);
        prop_assert!(err.is_err(), "bit {} of byte {} flipped: accepted", bit, i);
        let msg = err.unwrap_err().to_string();
        prop_assert!(msg.starts_with(|c: char| c.is_uppercase()), "{}", msg);
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..700), magic in any::<bool>()) {
        let mut bytes = bytes;
        if magic && bytes.len() >= 12 {
            bytes[..8].copy_from_slice(&format::MAGIC);
            bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
        }
        prop_assert!(verdict(&bytes, Level::Full, None).is_err());
    }
}
