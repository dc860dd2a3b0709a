//! The corruption matrix: 28 damaged copies of a real overlay, and the
//! verdict every tool must give on each (the library validation,
//! `cloudlet overlay inspect` and `verify`, the registry's push, the
//! daemon's synthesis).
//!
//! Truncations at 9 points (inside the header, the manifest, the first,
//! middle and last segment, at a segment boundary), 10 bit flips (magic,
//! version, header fields and hash, manifest start/middle/end, first,
//! middle and last segment), 3 kinds of random bytes, a well-formed
//! overlay for another base, 3 kinds of bad app metadata, and 2 kinds of
//! trailing data. Copies whose header and manifest are rewritten (another
//! base, bad metadata) carry correct hashes, so only what they are meant
//! to break is broken.

use cloudlet_overlay::format::{parse_prefix, Header, Manifest, HEADER_LEN};

/// What every tool must answer for a damaged copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// The intact overlay (not in the matrix, for its comparison): accepted
    /// by every tool.
    Valid,
    /// Refused by every tool, each message holding `says`.
    Refused { says: String },
    /// A valid overlay for the base `base_id`: accepted where no base is
    /// known (inspect, push), refused where one is (verify, synthesis).
    OtherBase { base_id: String },
}

/// Where the damage is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Area {
    /// Header, manifest, metadata, length: seen before any segment.
    Prefix,
    /// Inside a segment: a daemon sees it only when that segment arrives.
    Segment,
}

/// One damaged copy.
#[derive(Debug, Clone)]
pub struct Damaged {
    pub name: String,
    pub bytes: Vec<u8>,
    pub area: Area,
    pub expect: Expect,
}

/// The base id of the [`Expect::OtherBase`] copy.
pub const OTHER_BASE: &str = "0000-not-this-base";

/// A tiny deterministic generator (no dependency, same bytes every run).
struct XorShift(u64);

impl XorShift {
    fn fill(&mut self, out: &mut [u8]) {
        for b in out {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            *b = (self.0 >> 24) as u8;
        }
    }
}

/// The 28 damaged copies of `overlay` (a valid overlay of at least three
/// segments and app metadata).
pub fn matrix(overlay: &[u8]) -> Vec<Damaged> {
    let (_, m) = parse_prefix(overlay).expect("a valid overlay");
    let n = m.segments.len() as u32;
    assert!(n >= 3, "the matrix needs 3 segments or more, not {n}");
    let seg = |i: u32| m.segment_range(i).expect("segment");
    let (first, mid, last) = (0, n / 2, n - 1);
    let data = m.data_offset as usize;
    let len = overlay.len();
    let mut out = Vec::new();
    let mut add = |name: &str, bytes: Vec<u8>, area: Area, says: String| {
        out.push(Damaged {
            name: name.into(),
            bytes,
            area,
            expect: Expect::Refused { says },
        });
    };
    let cut = |at: usize| overlay[..at].to_vec();
    let truncated = |at: usize, place: &str| format!("Overlay truncated at byte {at}, in {place}");

    // Truncations. They are seen from the length alone, before any segment.
    for (name, at, place) in [
        ("truncated-empty", 0, "the header".to_string()),
        ("truncated-in-magic", 5, "the header".into()),
        ("truncated-in-header", 100, "the header".into()),
        ("truncated-after-header", HEADER_LEN, "the manifest".into()),
        (
            "truncated-in-manifest",
            (HEADER_LEN + data) / 2,
            "the manifest".into(),
        ),
        (
            "truncated-in-first-segment",
            ((seg(first).start + seg(first).end) / 2) as usize,
            format!("segment {first}"),
        ),
        (
            "truncated-in-middle-segment",
            ((seg(mid).start + seg(mid).end) / 2) as usize,
            format!("segment {mid}"),
        ),
        (
            "truncated-at-segment-boundary",
            seg(mid).start as usize,
            format!("segment {mid}"),
        ),
        ("truncated-last-byte", len - 1, format!("segment {last}")),
    ] {
        add(name, cut(at), Area::Prefix, truncated(at, &place));
    }

    // Bit flips.
    let flip = |at: usize, bit: u8| {
        let mut b = overlay.to_vec();
        b[at] ^= 1 << bit;
        b
    };
    let header_hash = "Header hash mismatch".to_string();
    let manifest_hash = "Manifest hash mismatch".to_string();
    let segment_hash = |i: u32| format!("Segment {i} hash mismatch");
    add("flip-magic", flip(0, 0), Area::Prefix, "Bad magic".into());
    add(
        "flip-version",
        flip(8, 1),
        Area::Prefix,
        "Unsupported overlay format version 3".into(),
    );
    add(
        "flip-header-file-length",
        flip(41, 3),
        Area::Prefix,
        header_hash.clone(),
    );
    add("flip-header-hash", flip(120, 7), Area::Prefix, header_hash);
    add(
        "flip-manifest-start",
        flip(HEADER_LEN, 0),
        Area::Prefix,
        manifest_hash.clone(),
    );
    add(
        "flip-manifest-middle",
        flip((HEADER_LEN + data) / 2, 4),
        Area::Prefix,
        manifest_hash.clone(),
    );
    add(
        "flip-manifest-end",
        flip(data - 1, 6),
        Area::Prefix,
        manifest_hash,
    );
    let middle_of = |i: u32| ((seg(i).start + seg(i).end) / 2) as usize;
    add(
        "flip-first-segment",
        flip(middle_of(first), 2),
        Area::Segment,
        segment_hash(first),
    );
    add(
        "flip-middle-segment",
        flip(middle_of(mid), 5),
        Area::Segment,
        segment_hash(mid),
    );
    add(
        "flip-last-segment-last-byte",
        flip(len - 1, 0),
        Area::Segment,
        segment_hash(last),
    );

    // Random bytes.
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut random = vec![0u8; len];
    rng.fill(&mut random);
    random[0] = b'X'; // never the magic by chance
    add("random-bytes", random, Area::Prefix, "Bad magic".into());
    let mut random_header = overlay.to_vec();
    rng.fill(&mut random_header[12..HEADER_LEN]);
    add(
        "random-header-after-version",
        random_header,
        Area::Prefix,
        "Header hash mismatch".into(),
    );
    let mut random_segment = overlay.to_vec();
    let r = seg(mid);
    rng.fill(&mut random_segment[r.start as usize..r.end as usize]);
    add(
        "random-middle-segment",
        random_segment,
        Area::Segment,
        segment_hash(mid),
    );

    // Rewritten manifests: only what is meant to be wrong is wrong.
    let mut other = m.clone();
    other.base_id = OTHER_BASE.into();
    let other = rewrite(overlay, &other);
    let mut bad_meta = |name: &str, metadata: &[u8], says: &str| {
        let mut mm = m.clone();
        mm.metadata = metadata.to_vec();
        add(
            name,
            rewrite(overlay, &mm),
            Area::Prefix,
            format!("Metadata: {says}"),
        );
    };
    bad_meta(
        "metadata-not-json",
        b"kvstore on 8080",
        "not the app's JSON",
    );
    bad_meta(
        "metadata-port-zero",
        br#"{"name":"kvstore","ports":[0]}"#,
        "port 0 is not a TCP port",
    );
    bad_meta(
        "metadata-without-ports",
        br#"{"name":"kvstore"}"#,
        "not the app's JSON object {name, ports, health_path, command}: missing field `ports`",
    );

    // Trailing data.
    let mut one = overlay.to_vec();
    one.push(0);
    add(
        "one-extra-byte",
        one,
        Area::Prefix,
        format!("Trailing data: 1 byte after the last segment, from byte {len}"),
    );
    let mut twice = overlay.to_vec();
    twice.extend_from_slice(&overlay[seg(last).start as usize..]);
    let extra = seg(last).end - seg(last).start;
    add(
        "last-segment-twice",
        twice,
        Area::Prefix,
        format!("Trailing data: {extra} bytes after the last segment"),
    );

    out.push(Damaged {
        name: "other-base-id".into(),
        bytes: other,
        area: Area::Prefix,
        expect: Expect::OtherBase {
            base_id: OTHER_BASE.into(),
        },
    });
    assert_eq!(out.len(), 28);
    out
}

/// `overlay` with its manifest replaced by `m` (re-encoded, compressed and
/// hashed; the header rewritten to match), the segments unchanged, and its
/// signature block, if signed, kept as it was (what an attacker who
/// changed a signed overlay would make).
pub fn rewrite(overlay: &[u8], m: &Manifest) -> Vec<u8> {
    let (header, old) = parse_prefix(overlay).expect("a valid overlay");
    let raw = m.encode();
    let stored = zstd::bulk::compress(&raw, 3).expect("zstd");
    let segments = &overlay[old.data_offset as usize..];
    let block = &overlay[HEADER_LEN..header.manifest_offset as usize];
    let h = Header {
        format_version: header.format_version,
        manifest_offset: header.manifest_offset,
        manifest_len: stored.len() as u64,
        manifest_raw_len: raw.len() as u64,
        file_len: (HEADER_LEN + block.len() + stored.len() + segments.len()) as u64,
        manifest_hash: *blake3::hash(&stored).as_bytes(),
    };
    let mut out = h.encode().to_vec();
    out.extend_from_slice(block);
    out.extend_from_slice(&stored);
    out.extend_from_slice(segments);
    out
}
