//! Codecs: how segments are compressed and chunks delta-encoded.

use serde::Serialize;

use crate::format::SegmentCodec;

/// How create encodes chunk payloads. Configuration, not format: every reader
/// decodes every codec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Codec {
    /// No compression, no delta.
    Store,
    /// Each segment of literal chunks compressed as one zstd frame.
    Zstd { level: i32 },
    /// As `Zstd`, but a chunk is stored as XOR with the base chunk at the same
    /// place when that pays (the edit leaves most bytes alone).
    XorZstd { level: i32 },
}

impl Default for Codec {
    fn default() -> Self {
        Codec::XorZstd { level: 3 }
    }
}

impl Codec {
    pub(crate) fn id(self) -> u8 {
        match self {
            Codec::Store => 0,
            Codec::Zstd { .. } => 1,
            Codec::XorZstd { .. } => 2,
        }
    }

    pub(crate) fn level(self) -> i32 {
        match self {
            Codec::Store => 0,
            Codec::Zstd { level } | Codec::XorZstd { level } => level,
        }
    }

    /// The codec named by a manifest's informational codec fields.
    pub fn from_id(id: u8, level: i32) -> Option<Codec> {
        match id {
            0 => Some(Codec::Store),
            1 => Some(Codec::Zstd { level }),
            2 => Some(Codec::XorZstd { level }),
            _ => None,
        }
    }

    pub(crate) fn segment_codec(self) -> SegmentCodec {
        match self {
            Codec::Store => SegmentCodec::Store,
            _ => SegmentCodec::Zstd,
        }
    }

    pub(crate) fn uses_xor(self) -> bool {
        matches!(self, Codec::XorZstd { .. })
    }

    /// Checks the level against what the codec supports.
    pub fn validate(self) -> Result<(), String> {
        if let Codec::Zstd { level } | Codec::XorZstd { level } = self {
            let range = zstd::compression_level_range();
            if !range.contains(&level) {
                return Err(format!(
                    "zstd level {level} outside {}..={}",
                    range.start(),
                    range.end()
                ));
            }
        }
        Ok(())
    }
}

/// Compresses one segment.
pub(crate) fn compress(codec: SegmentCodec, level: i32, raw: &[u8]) -> std::io::Result<Vec<u8>> {
    match codec {
        SegmentCodec::Store => Ok(raw.to_vec()),
        SegmentCodec::Zstd => {
            let mut c = zstd::bulk::Compressor::new(level)?;
            c.include_contentsize(true)?;
            c.include_checksum(false)?;
            if raw.len() > 1 << 20 {
                // A window as large as the segment, and long-distance
                // matching: app state repeats itself far apart (a file in
                // the page cache and the structures parsed from it).
                use zstd::zstd_safe::CParameter;
                let log = (usize::BITS - (raw.len() - 1).leading_zeros()).clamp(20, 26);
                c.set_parameter(CParameter::WindowLog(log))?;
                c.set_parameter(CParameter::EnableLongDistanceMatching(true))?;
            }
            c.compress(raw)
        }
    }
}

/// Largest stored length a segment of `raw_len` bytes may have.
pub(crate) fn max_stored_len(codec: SegmentCodec, raw_len: u32) -> u64 {
    match codec {
        SegmentCodec::Store => raw_len as u64,
        SegmentCodec::Zstd => zstd::zstd_safe::compress_bound(raw_len as usize) as u64,
    }
}

/// Decompresses one zstd frame that must yield exactly `raw_len` bytes.
pub(crate) fn decompress_exact(stored: &[u8], raw_len: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(raw_len);
    let mut d = zstd::bulk::Decompressor::new().map_err(|e| e.to_string())?;
    let n = d
        .decompress_to_buffer(stored, &mut out)
        .map_err(|e| e.to_string())?;
    if n != raw_len {
        return Err(format!("{n} bytes decompressed, {raw_len} expected"));
    }
    // A frame may be followed by more frames: refuse anything left over.
    if zstd::zstd_safe::find_frame_compressed_size(stored).map_err(|e| format!("bad frame: {e}"))?
        != stored.len()
    {
        return Err("trailing bytes after the frame".into());
    }
    Ok(out)
}

/// Decodes one segment as stored (after its hash was checked).
pub fn decode_segment(info: &crate::format::SegmentInfo, stored: &[u8]) -> Result<Vec<u8>, String> {
    decompress(info.codec, stored, info.raw_len)
}

/// Decodes one segment.
pub(crate) fn decompress(
    codec: SegmentCodec,
    stored: &[u8],
    raw_len: u32,
) -> Result<Vec<u8>, String> {
    match codec {
        SegmentCodec::Store => {
            if stored.len() != raw_len as usize {
                return Err("stored segment length differs from its raw length".into());
            }
            Ok(stored.to_vec())
        }
        SegmentCodec::Zstd => decompress_exact(stored, raw_len as usize),
    }
}

/// `dst[i] = a[i] ^ b[i]`; `b` may be shorter (missing bytes are zero).
pub(crate) fn xor_into(dst: &mut [u8], a: &[u8], b: &[u8]) {
    dst.copy_from_slice(a);
    xor_in_place(&mut dst[..b.len().min(a.len())], b);
}

/// `dst[i] ^= b[i]` over the length of `dst`.
pub(crate) fn xor_in_place(dst: &mut [u8], b: &[u8]) {
    let n = dst.len().min(b.len());
    let (d, b) = (&mut dst[..n], &b[..n]);
    let mut dc = d.chunks_exact_mut(8);
    let mut bc = b.chunks_exact(8);
    for (x, y) in (&mut dc).zip(&mut bc) {
        let v = u64::from_ne_bytes(x.try_into().unwrap_or([0; 8]))
            ^ u64::from_ne_bytes(y.try_into().unwrap_or([0; 8]));
        x.copy_from_slice(&v.to_ne_bytes());
    }
    for (x, y) in dc.into_remainder().iter_mut().zip(bc.remainder()) {
        *x ^= *y;
    }
}

/// True when every byte is zero.
pub(crate) fn is_zero(b: &[u8]) -> bool {
    let (pre, mid, post) = unsafe { b.align_to::<u128>() };
    pre.iter().all(|&x| x == 0) && mid.iter().all(|&x| x == 0) && post.iter().all(|&x| x == 0)
}

/// Number of equal bytes at the same positions.
pub(crate) fn equal_bytes(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).filter(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zstd_roundtrip_and_refusals() {
        let raw: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let c = compress(SegmentCodec::Zstd, 3, &raw).unwrap();
        assert_eq!(
            decompress(SegmentCodec::Zstd, &c, raw.len() as u32).unwrap(),
            raw
        );
        assert!(decompress(SegmentCodec::Zstd, &c, raw.len() as u32 - 1).is_err());
        assert!(decompress(SegmentCodec::Zstd, &c, raw.len() as u32 + 1).is_err());
        let mut two = c.clone();
        two.extend_from_slice(&c);
        assert!(decompress(SegmentCodec::Zstd, &two, raw.len() as u32).is_err());
        for n in 0..c.len() {
            assert!(decompress(SegmentCodec::Zstd, &c[..n], raw.len() as u32).is_err());
        }
    }

    #[test]
    fn xor_and_zero() {
        let a = [1u8, 2, 3, 4, 5, 6, 7, 8, 9, 10];
        let mut d = [0u8; 10];
        xor_into(&mut d, &a, &a[..4]);
        assert_eq!(d, [0, 0, 0, 0, 5, 6, 7, 8, 9, 10]);
        xor_in_place(&mut d, &a);
        assert_eq!(d, [1, 2, 3, 4, 0, 0, 0, 0, 0, 0]);
        assert!(is_zero(&[0u8; 33]));
        assert!(!is_zero(&[0, 0, 0, 1]));
        assert!(Codec::Zstd { level: 100 }.validate().is_err());
    }
}
