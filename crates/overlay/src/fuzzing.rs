//! Entry points for fuzz targets (`fuzz/`) and the corpus test: each takes
//! arbitrary bytes and must return without panicking.

use crate::codec;
use crate::format::{self, Manifest, SegmentCodec, SegmentInfo, SegmentKind};

/// Header and manifest of an overlay file, hashes and all.
pub fn parse_prefix(data: &[u8]) {
    let _ = format::parse_prefix(data);
}

/// A decompressed manifest, past the hash checks: the first 16 bytes give
/// the data offset and the file length, the rest is the encoding.
pub fn parse_raw_manifest(data: &[u8]) {
    if data.len() < 16 {
        return;
    }
    let data_offset = u64::from_le_bytes(data[0..8].try_into().unwrap_or_default());
    let file_len = u64::from_le_bytes(data[8..16].try_into().unwrap_or_default());
    let _ = Manifest::from_raw(&data[16..], data_offset, file_len);
}

/// A stored segment: the first 5 bytes give the codec and the raw length
/// (at most 1 MiB here), the rest is the stored bytes.
pub fn decode_segment(data: &[u8]) {
    if data.len() < 5 {
        return;
    }
    let codec = if data[0] & 1 == 0 {
        SegmentCodec::Store
    } else {
        SegmentCodec::Zstd
    };
    let raw_len = u32::from_le_bytes(data[1..5].try_into().unwrap_or_default()) % (1 << 20);
    let stored = &data[5..];
    let info = SegmentInfo {
        kind: SegmentKind::Chunks,
        codec,
        offset: 0,
        stored_len: stored.len() as u64,
        raw_len,
        hash: [0; 32],
    };
    if let Ok(raw) = codec::decode_segment(&info, stored) {
        assert_eq!(raw.len(), raw_len as usize);
    }
}
