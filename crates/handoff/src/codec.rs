//! Pieces shared by the encoder and the decoder: the base memory image, the
//! compression modes, and page helpers.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::stream::PAGE_SIZE;
use crate::wire::Codec;

/// The base VM's memory image, which both cloudlets hold.
///
/// `data` is the base's `memory.ram` (a `Vec`, an mmap, anything that derefs
/// to bytes); its file offset is the offset inside the ramblock `block`
/// (`mem` for a `memory-backend-file` with id `mem`). `id` names the base so
/// that a destination with another base refuses the stream up front.
///
/// Cloning is cheap and shares the dedup index, which is built once (about
/// 0.2 s per 256 MiB) on first use: a daemon keeps one `BaseMemory` per base
/// and may warm it with [`index`](Self::index) before a handoff starts.
#[derive(Clone)]
pub struct BaseMemory {
    data: Arc<dyn AsRef<[u8]> + Send + Sync>,
    block: String,
    id: [u8; 32],
    index: Arc<OnceLock<HashMap<[u8; 16], u64>>>,
}

impl fmt::Debug for BaseMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BaseMemory")
            .field("len", &self.bytes().len())
            .field("block", &self.block)
            .field("id", &hex32(&self.id))
            .finish()
    }
}

fn hex32(b: &[u8; 32]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl BaseMemory {
    pub fn new(
        data: impl AsRef<[u8]> + Send + Sync + 'static,
        block: impl Into<String>,
        id: [u8; 32],
    ) -> Self {
        BaseMemory {
            data: Arc::new(data),
            block: block.into(),
            id,
            index: Arc::new(OnceLock::new()),
        }
    }

    /// Page key -> first page number in the base holding that content (one
    /// entry for all the zero pages).
    pub fn index(&self) -> &HashMap<[u8; 16], u64> {
        self.index.get_or_init(|| {
            let mut index = HashMap::new();
            let mut zero_seen = false;
            for (i, page) in self.bytes().chunks_exact(PAGE_SIZE).enumerate() {
                if is_zero(page) {
                    if zero_seen {
                        continue;
                    }
                    zero_seen = true;
                }
                if let Ok(page) = <&[u8; PAGE_SIZE]>::try_from(page) {
                    index.entry(page_key(page)).or_insert(i as u64);
                }
            }
            index
        })
    }

    /// An id computed from the content (BLAKE3), for callers without a base id.
    pub fn content_id(data: &[u8]) -> [u8; 32] {
        *blake3::hash(data).as_bytes()
    }

    pub fn bytes(&self) -> &[u8] {
        (*self.data).as_ref()
    }
    pub fn block(&self) -> &str {
        &self.block
    }
    pub fn id(&self) -> &[u8; 32] {
        &self.id
    }

    /// The base page at byte `offset`, if the image holds a whole page there.
    pub fn page(&self, offset: u64) -> Option<&[u8; PAGE_SIZE]> {
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(PAGE_SIZE)?;
        self.bytes().get(start..end)?.try_into().ok()
    }
}

/// What the encoder does with novel pages: a codec (and level) for the
/// frame payloads, and whether pages are XOR-delta encoded against the base.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mode {
    pub codec: Codec,
    pub delta: bool,
}

impl Mode {
    pub const fn new(codec: Codec, delta: bool) -> Self {
        Mode { codec, delta }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}{}",
            self.codec,
            if self.delta { "+delta" } else { "" }
        )
    }
}

/// A reusable compressor for every codec.
pub struct Compressor {
    zstd: Option<zstd::bulk::Compressor<'static>>,
    zstd_level: i32,
}

impl fmt::Debug for Compressor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Compressor")
            .field("zstd_level", &self.zstd_level)
            .finish()
    }
}

impl Default for Compressor {
    fn default() -> Self {
        Self::new()
    }
}

impl Compressor {
    pub fn new() -> Self {
        Compressor {
            zstd: None,
            zstd_level: 0,
        }
    }

    /// Compress `src` into `dst` (cleared first); return the time it took.
    pub fn compress(
        &mut self,
        codec: Codec,
        src: &[u8],
        dst: &mut Vec<u8>,
    ) -> io::Result<Duration> {
        let t = Instant::now();
        dst.clear();
        match codec {
            Codec::None => dst.extend_from_slice(src),
            Codec::Lz4 => {
                dst.resize(lz4_flex::block::get_maximum_output_size(src.len()), 0);
                let n = lz4_flex::block::compress_into(src, dst).map_err(io::Error::other)?;
                dst.truncate(n);
            }
            Codec::Zstd(level) => {
                let z = match &mut self.zstd {
                    Some(z) => {
                        if self.zstd_level != level {
                            z.set_compression_level(level)?;
                        }
                        z
                    }
                    None => self.zstd.insert(zstd::bulk::Compressor::new(level)?),
                };
                self.zstd_level = level;
                dst.reserve(zstd::zstd_safe::compress_bound(src.len()));
                z.compress_to_buffer(src, dst)?;
            }
        }
        Ok(t.elapsed())
    }
}

/// A reusable decompressor that never writes more than the announced size.
pub struct Decompressor {
    zstd: zstd::bulk::Decompressor<'static>,
}

impl fmt::Debug for Decompressor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Decompressor")
    }
}

impl Decompressor {
    pub fn new() -> io::Result<Self> {
        Ok(Decompressor {
            zstd: zstd::bulk::Decompressor::new()?,
        })
    }

    /// Decompress `src` into `dst` (cleared first), which must come out at
    /// exactly `raw_len` bytes.
    pub fn decompress(
        &mut self,
        codec: Codec,
        src: &[u8],
        raw_len: usize,
        dst: &mut Vec<u8>,
    ) -> Result<(), String> {
        dst.clear();
        match codec {
            Codec::None => dst.extend_from_slice(src),
            Codec::Lz4 => {
                dst.resize(raw_len, 0);
                let n = lz4_flex::block::decompress_into(src, dst).map_err(|e| e.to_string())?;
                dst.truncate(n);
            }
            Codec::Zstd(_) => {
                let mut tmp = Vec::with_capacity(raw_len);
                self.zstd
                    .decompress_to_buffer(src, &mut tmp)
                    .map_err(|e| e.to_string())?;
                *dst = tmp;
            }
        }
        if dst.len() != raw_len {
            return Err(format!(
                "Payload decompressed to {} bytes instead of {raw_len}",
                dst.len()
            ));
        }
        Ok(())
    }
}

/// The dedup key of a page: BLAKE3, truncated to 128 bits.
pub fn page_key(page: &[u8; PAGE_SIZE]) -> [u8; 16] {
    let h = blake3::hash(page);
    let mut k = [0u8; 16];
    k.copy_from_slice(&h.as_bytes()[..16]);
    k
}

pub fn count_zeros(b: &[u8]) -> usize {
    b.iter().filter(|&&x| x == 0).count()
}

pub fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

/// `dst = a ^ b`.
pub fn xor_into(a: &[u8; PAGE_SIZE], b: &[u8; PAGE_SIZE], dst: &mut [u8; PAGE_SIZE]) {
    for ((d, x), y) in dst.iter_mut().zip(a.iter()).zip(b.iter()) {
        *d = x ^ y;
    }
}

/// Whether XOR-delta against the base page pays: it must clear clearly more
/// bytes than the page already has at zero.
pub fn delta_pays(page: &[u8; PAGE_SIZE], xor: &[u8; PAGE_SIZE]) -> bool {
    count_zeros(xor) >= count_zeros(page) + PAGE_SIZE / 16
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn every_codec_roundtrips() {
        let mut c = Compressor::new();
        let mut d = Decompressor::new().unwrap();
        let src: Vec<u8> = (0..100_000u32)
            .map(|i| (i % 251) as u8 ^ (i / 7) as u8)
            .collect();
        for codec in [
            Codec::None,
            Codec::Lz4,
            Codec::Zstd(1),
            Codec::Zstd(19),
            Codec::Zstd(3),
        ] {
            let mut z = Vec::new();
            c.compress(codec, &src, &mut z).unwrap();
            let mut back = Vec::new();
            d.decompress(codec, &z, src.len(), &mut back).unwrap();
            assert_eq!(back, src, "{codec}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn garbage_payloads_error_or_match_size(data in proptest::collection::vec(any::<u8>(), 0..2000), raw in 0usize..5000, codec in 0u8..3) {
            let mut d = Decompressor::new().unwrap();
            let codec = Codec::from_wire(codec, 3).unwrap();
            let mut out = Vec::new();
            if d.decompress(codec, &data, raw, &mut out).is_ok() {
                prop_assert_eq!(out.len(), raw);
            }
        }
    }
}
