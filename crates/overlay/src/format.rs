//! On-disk format of a VM overlay, version 1.
//!
//! An overlay file is laid out so that a client can fetch it with HTTP range
//! requests and start applying before the whole file has arrived:
//!
//! ```text
//! offset 0                 +------------------------------+
//!                          | header (128 bytes, fixed)    |
//! manifest_offset (=128)   +------------------------------+
//!                          | manifest (zstd frame)        |
//! segments[0].offset       +------------------------------+
//!                          | segment 0: device state      |
//!                          | segment 1: chunk payloads    |  memory chunks first,
//!                          | ...                          |  then disk chunks,
//!                          | segment N-1                  |  in index order
//! file_len                 +------------------------------+
//! ```
//!
//! All integers are little-endian. All hashes are BLAKE3 (32 bytes).
//!
//! # Header (128 bytes)
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `b"CLOVLY\r\n"` |
//! | 8 | 4 | format version (`1`), independent of the crate version |
//! | 12 | 4 | header length (`128`) |
//! | 16 | 8 | manifest offset (`128`) |
//! | 24 | 8 | manifest length as stored (compressed) |
//! | 32 | 8 | manifest length after decompression (at most 1 GiB) |
//! | 40 | 8 | total file length |
//! | 48 | 32 | hash of the stored manifest bytes |
//! | 80 | 16 | reserved, zero |
//!
//! Version 2 is version 1 signed: the bytes between the header and the
//! manifest (`128..manifest_offset`) hold a signature block, documented in
//! [`crate::signature`]; nothing else differs. Version 1 has none
//! (`manifest_offset` is 128). `create` writes version 1, `sign` version 2.
//! | 96 | 32 | hash of header bytes 0..96 |
//!
//! # Manifest (one zstd frame; the decompressed encoding below)
//!
//! ```text
//! u32 chunk_size                 power of two, 512..=1 MiB (4096 by default)
//! u16 base_id_len, base_id       UTF-8, at most 1024 bytes, opaque
//! u32 metadata_len, metadata     app metadata, at most 64 KiB: empty (no app)
//!                                or UTF-8 JSON of the app, `{"name", "ports",
//!                                "health_path"?, "command"?}` (see
//!                                `validate::AppMetadata` for the rules; the
//!                                daemon reads it as `cloudlet_api::AppInfo`)
//! u64 base_disk_size, base_mem_size, disk_size, mem_size
//! [32] base_disk_hash, base_mem_hash      image hashes (see below)
//! [32] disk_hash, mem_hash                image hashes of the launch images
//! [32] device_state_hash                  hash of the raw device state
//! [32] launch_hash                        see below
//! u8 codec, i32 level                     what create used (informational)
//! u32 device_state_segment
//! u32 segment_count, then per segment:
//!     u8 kind (0 device state, 1 chunks), u8 codec (0 store, 1 zstd),
//!     u64 offset (from the end of the manifest; segments are contiguous),
//!     u64 stored_len, u32 raw_len, [32] hash of the stored bytes
//! u64 entry_count, then per changed chunk, sorted by (image, index), unique:
//!     u8 image (0 disk, 1 memory), u64 index, u8 kind, then by kind:
//!     0 zero:    nothing
//!     1 ref:     u8 source (0 base disk, 1 base memory, 2 launch disk,
//!                3 launch memory), u64 index, [32] chunk hash
//!     2 payload: u32 segment, u32 offset in the decompressed segment,
//!                u8 transform (0 literal, 1 xor with the base chunk at the
//!                same place), [32] chunk hash
//! ```
//!
//! Unchanged chunks are not listed. A payload's length is the chunk's length
//! (the last chunk of an image may be shorter than `chunk_size`). A reference
//! to the launch images ("self reference") always names a payload chunk, so it
//! can be resolved as soon as that payload's segment has been applied.
//!
//! # Hashes
//!
//! - chunk hash: `BLAKE3(chunk bytes)`.
//! - image hash: `BLAKE3("cloudlet-overlay image v1" || u64 size ||
//!   u32 chunk_size || chunk hash 0 || chunk hash 1 || ...)`. For the launch
//!   disk, the base disk is seen as extended with zeros to the launch size.
//! - launch hash: `BLAKE3("cloudlet-overlay launch v1" || disk image hash ||
//!   memory image hash || device state hash)`.
//!
//! # Valid overlays
//!
//! This module parses the layout and checks its consistency (the parser
//! treats the metadata as bytes). What makes a whole file a valid overlay
//! (the metadata's rules, the exact length, the base id, every segment's
//! hash) is checked by [`crate::validate`], which every tool uses.
//!
//! # Compatibility
//!
//! A reader refuses any format version it does not know. Any change to the
//! layout above bumps the format version.

use std::fmt;

use serde::Serialize;

/// Magic bytes at the start of every overlay file.
pub const MAGIC: [u8; 8] = *b"CLOVLY\r\n";
/// The format version this crate writes (unsigned) and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The format version of a signed overlay (read too).
pub const SIGNED_FORMAT_VERSION: u32 = 2;
/// Length of the fixed header.
pub const HEADER_LEN: usize = 128;
/// Default chunk size, for both disk and memory.
pub const DEFAULT_CHUNK_SIZE: u32 = 4096;
/// Largest decompressed manifest a reader accepts.
pub const MAX_MANIFEST_RAW_LEN: u64 = 1 << 30;
/// Largest decompressed chunk segment a reader accepts.
pub const MAX_SEGMENT_RAW_LEN: u32 = 64 << 20;
/// Largest device state a reader accepts.
pub const MAX_DEVICE_STATE_LEN: u32 = 512 << 20;
/// Largest image size a reader accepts (1 TiB).
pub const MAX_IMAGE_SIZE: u64 = 1 << 40;
const MAX_BASE_ID_LEN: usize = 1024;
/// Largest app metadata a manifest carries.
pub const MAX_METADATA_LEN: usize = 64 << 10;

const HEADER_HASHED_LEN: usize = 96;
const IMAGE_HASH_DOMAIN: &[u8] = b"cloudlet-overlay image v1";
const LAUNCH_HASH_DOMAIN: &[u8] = b"cloudlet-overlay launch v1";

/// A BLAKE3 hash.
pub type Hash = [u8; 32];

/// Why an overlay's header or manifest was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("Overlay truncated at offset {offset}: {needed} bytes needed there")]
    Truncated { offset: u64, needed: u64 },
    #[error("Bad magic bytes: not a cloudlet overlay")]
    BadMagic,
    #[error(
        "Unsupported overlay format version {found} (this build reads versions 1 to {supported})"
    )]
    UnsupportedVersion { found: u32, supported: u32 },
    #[error("Header hash mismatch: the header is corrupted")]
    HeaderHashMismatch,
    #[error("Invalid header field {field}: {reason}")]
    InvalidHeader { field: &'static str, reason: String },
    #[error("Manifest hash mismatch: the manifest is corrupted")]
    ManifestHashMismatch,
    #[error("Manifest cannot be decompressed: {0}")]
    ManifestDecompress(String),
    #[error("Invalid manifest at byte {offset}: {reason}")]
    InvalidManifest { offset: u64, reason: String },
    #[error("Overlay has {extra} bytes of trailing data after offset {offset}")]
    TrailingData { offset: u64, extra: u64 },
}

/// One of the two images of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Image {
    Disk = 0,
    Mem = 1,
}

impl fmt::Display for Image {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Image::Disk => "disk",
            Image::Mem => "memory",
        })
    }
}

/// Where the bytes of a referenced chunk come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum ChunkSource {
    BaseDisk = 0,
    BaseMem = 1,
    LaunchDisk = 2,
    LaunchMem = 3,
}

impl ChunkSource {
    /// The launch image a self reference points into, if any.
    pub fn launch_image(self) -> Option<Image> {
        match self {
            ChunkSource::LaunchDisk => Some(Image::Disk),
            ChunkSource::LaunchMem => Some(Image::Mem),
            _ => None,
        }
    }
}

/// How a payload chunk is stored in its decompressed segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Transform {
    /// The chunk bytes themselves.
    Literal = 0,
    /// The chunk XOR the base chunk at the same place.
    Xor = 1,
}

/// How a segment is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum SegmentCodec {
    Store = 0,
    Zstd = 1,
}

/// What a segment holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum SegmentKind {
    DeviceState = 0,
    Chunks = 1,
}

/// How a changed chunk is rebuilt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkKind {
    Zero,
    Ref {
        source: ChunkSource,
        index: u64,
    },
    Payload {
        segment: u32,
        offset: u32,
        transform: Transform,
    },
}

/// One changed chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkEntry {
    pub image: Image,
    pub index: u64,
    pub kind: ChunkKind,
    /// Hash of the rebuilt chunk (for zero chunks, the hash of zeros).
    pub hash: Hash,
}

/// One segment of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    pub kind: SegmentKind,
    pub codec: SegmentCodec,
    /// Offset from the end of the manifest (the start of the data area).
    pub offset: u64,
    pub stored_len: u64,
    pub raw_len: u32,
    pub hash: Hash,
}

/// The fixed header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub format_version: u32,
    pub manifest_offset: u64,
    pub manifest_len: u64,
    pub manifest_raw_len: u64,
    pub file_len: u64,
    pub manifest_hash: Hash,
}

/// The manifest: everything needed to rebuild the launch state from the base.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub chunk_size: u32,
    pub base_id: String,
    /// App metadata (at most [`MAX_METADATA_LEN`] bytes; its rules:
    /// [`crate::validate::check_metadata`]).
    pub metadata: Vec<u8>,
    pub base_disk_size: u64,
    pub base_mem_size: u64,
    pub disk_size: u64,
    pub mem_size: u64,
    pub base_disk_hash: Hash,
    pub base_mem_hash: Hash,
    pub disk_hash: Hash,
    pub mem_hash: Hash,
    pub device_state_hash: Hash,
    pub launch_hash: Hash,
    /// Codec id and level create used (informational).
    pub codec_id: u8,
    pub codec_level: i32,
    pub device_state_segment: u32,
    pub segments: Vec<SegmentInfo>,
    /// Sorted by (image, index), unique.
    pub entries: Vec<ChunkEntry>,
    /// File offset of the first segment (the end of the manifest). Not
    /// encoded: set by [`Manifest::parse`].
    pub data_offset: u64,
}

impl Header {
    /// Encodes the header, including its own hash.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&self.format_version.to_le_bytes());
        b[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.manifest_offset.to_le_bytes());
        b[24..32].copy_from_slice(&self.manifest_len.to_le_bytes());
        b[32..40].copy_from_slice(&self.manifest_raw_len.to_le_bytes());
        b[40..48].copy_from_slice(&self.file_len.to_le_bytes());
        b[48..80].copy_from_slice(&self.manifest_hash);
        let h = blake3::hash(&b[..HEADER_HASHED_LEN]);
        b[HEADER_HASHED_LEN..].copy_from_slice(h.as_bytes());
        b
    }

    /// Parses and checks a header. `bytes` may be longer than the header.
    pub fn parse(bytes: &[u8]) -> Result<Header, FormatError> {
        if bytes.len() < 8 {
            return Err(FormatError::Truncated {
                offset: bytes.len() as u64,
                needed: (HEADER_LEN - bytes.len()) as u64,
            });
        }
        if bytes[0..8] != MAGIC {
            return Err(FormatError::BadMagic);
        }
        if bytes.len() < 12 {
            return Err(FormatError::Truncated {
                offset: bytes.len() as u64,
                needed: (HEADER_LEN - bytes.len()) as u64,
            });
        }
        let version = u32::from_le_bytes(arr(&bytes[8..12]));
        if version != FORMAT_VERSION && version != SIGNED_FORMAT_VERSION {
            return Err(FormatError::UnsupportedVersion {
                found: version,
                supported: SIGNED_FORMAT_VERSION,
            });
        }
        if bytes.len() < HEADER_LEN {
            return Err(FormatError::Truncated {
                offset: bytes.len() as u64,
                needed: (HEADER_LEN - bytes.len()) as u64,
            });
        }
        let b = &bytes[..HEADER_LEN];
        if blake3::hash(&b[..HEADER_HASHED_LEN]).as_bytes() != &b[HEADER_HASHED_LEN..] {
            return Err(FormatError::HeaderHashMismatch);
        }
        let bad = |field, reason: String| FormatError::InvalidHeader { field, reason };
        let header_len = u32::from_le_bytes(arr(&b[12..16]));
        if header_len as usize != HEADER_LEN {
            return Err(bad("header_len", format!("{header_len} != {HEADER_LEN}")));
        }
        if b[80..96].iter().any(|&x| x != 0) {
            return Err(bad("reserved", "not zero".into()));
        }
        let h = Header {
            format_version: version,
            manifest_offset: u64::from_le_bytes(arr(&b[16..24])),
            manifest_len: u64::from_le_bytes(arr(&b[24..32])),
            manifest_raw_len: u64::from_le_bytes(arr(&b[32..40])),
            file_len: u64::from_le_bytes(arr(&b[40..48])),
            manifest_hash: arr(&b[48..80]),
        };
        let signature_len = h.manifest_offset.wrapping_sub(HEADER_LEN as u64);
        let fits = if version == FORMAT_VERSION {
            signature_len == 0
        } else {
            crate::signature::BLOCK_LEN_RANGE.contains(&signature_len)
        };
        if h.manifest_offset < HEADER_LEN as u64 || !fits {
            return Err(bad(
                "manifest_offset",
                format!("{} (format version {version})", h.manifest_offset),
            ));
        }
        if h.manifest_raw_len > MAX_MANIFEST_RAW_LEN {
            return Err(bad(
                "manifest_raw_len",
                format!("{} too large", h.manifest_raw_len),
            ));
        }
        if h.manifest_len == 0 || h.manifest_len > MAX_MANIFEST_RAW_LEN {
            return Err(bad("manifest_len", format!("{}", h.manifest_len)));
        }
        if h.file_len < h.manifest_offset + h.manifest_len {
            return Err(bad(
                "file_len",
                format!("{} shorter than the manifest end", h.file_len),
            ));
        }
        Ok(h)
    }

    /// Byte range of the signature block (empty when unsigned).
    pub fn signature_range(&self) -> std::ops::Range<u64> {
        HEADER_LEN as u64..self.manifest_offset
    }

    /// Byte range of the stored manifest.
    pub fn manifest_range(&self) -> std::ops::Range<u64> {
        self.manifest_offset..self.manifest_offset + self.manifest_len
    }
}

fn arr<const N: usize>(s: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(s);
    a
}

/// Number of chunks of an image of `size` bytes.
pub fn chunk_count(size: u64, chunk_size: u32) -> u64 {
    size.div_ceil(chunk_size as u64)
}

/// Length of chunk `index` of an image of `size` bytes (0 if out of range).
pub fn chunk_len(size: u64, chunk_size: u32, index: u64) -> usize {
    let start = index.saturating_mul(chunk_size as u64);
    if start >= size {
        0
    } else {
        (size - start).min(chunk_size as u64) as usize
    }
}

/// Hash of an all-zero chunk of `len` bytes.
pub fn zero_chunk_hash(len: usize) -> Hash {
    let mut h = blake3::Hasher::new();
    const Z: [u8; 4096] = [0u8; 4096];
    let mut left = len;
    while left > 0 {
        let n = left.min(Z.len());
        h.update(&Z[..n]);
        left -= n;
    }
    *h.finalize().as_bytes()
}

/// Image hash from the image size and its chunk hashes, in order.
pub fn image_hash<'a>(
    size: u64,
    chunk_size: u32,
    chunk_hashes: impl IntoIterator<Item = &'a Hash>,
) -> Hash {
    let mut h = ImageHasher::new(size, chunk_size);
    for c in chunk_hashes {
        h.update(c);
    }
    h.finalize()
}

/// Computes an image hash from chunk hashes fed in order.
pub struct ImageHasher(blake3::Hasher);

impl ImageHasher {
    pub fn new(size: u64, chunk_size: u32) -> ImageHasher {
        let mut h = blake3::Hasher::new();
        h.update(IMAGE_HASH_DOMAIN);
        h.update(&size.to_le_bytes());
        h.update(&chunk_size.to_le_bytes());
        ImageHasher(h)
    }
    pub fn update(&mut self, chunk_hash: &Hash) {
        self.0.update(chunk_hash);
    }
    pub fn finalize(&self) -> Hash {
        *self.0.finalize().as_bytes()
    }
}

/// The hash of a whole launch state.
pub fn launch_hash(disk_hash: &Hash, mem_hash: &Hash, device_state_hash: &Hash) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(LAUNCH_HASH_DOMAIN);
    h.update(disk_hash);
    h.update(mem_hash);
    h.update(device_state_hash);
    *h.finalize().as_bytes()
}

impl Manifest {
    /// Size of a launch image.
    pub fn image_size(&self, image: Image) -> u64 {
        match image {
            Image::Disk => self.disk_size,
            Image::Mem => self.mem_size,
        }
    }

    /// Size of a source image.
    pub fn source_size(&self, source: ChunkSource) -> u64 {
        match source {
            ChunkSource::BaseDisk => self.base_disk_size,
            ChunkSource::BaseMem => self.base_mem_size,
            ChunkSource::LaunchDisk => self.disk_size,
            ChunkSource::LaunchMem => self.mem_size,
        }
    }

    /// Length of a chunk of a launch image.
    pub fn chunk_len(&self, image: Image, index: u64) -> usize {
        chunk_len(self.image_size(image), self.chunk_size, index)
    }

    /// Position of the entry for a launch chunk, if it changed.
    pub fn find_entry(&self, image: Image, index: u64) -> Option<usize> {
        self.entries
            .binary_search_by(|e| (e.image, e.index).cmp(&(image, index)))
            .ok()
    }

    /// Byte range of segment `index` in the file.
    pub fn segment_range(&self, index: u32) -> Option<std::ops::Range<u64>> {
        let s = self.segments.get(index as usize)?;
        let start = self.data_offset + s.offset;
        Some(start..start + s.stored_len)
    }

    /// Encodes the manifest (before compression).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Vec::with_capacity(256 + self.segments.len() * 64 + self.entries.len() * 48);
        w.extend_from_slice(&self.chunk_size.to_le_bytes());
        w.extend_from_slice(&(self.base_id.len() as u16).to_le_bytes());
        w.extend_from_slice(self.base_id.as_bytes());
        w.extend_from_slice(&(self.metadata.len() as u32).to_le_bytes());
        w.extend_from_slice(&self.metadata);
        for v in [
            self.base_disk_size,
            self.base_mem_size,
            self.disk_size,
            self.mem_size,
        ] {
            w.extend_from_slice(&v.to_le_bytes());
        }
        for h in [
            &self.base_disk_hash,
            &self.base_mem_hash,
            &self.disk_hash,
            &self.mem_hash,
            &self.device_state_hash,
            &self.launch_hash,
        ] {
            w.extend_from_slice(h);
        }
        w.push(self.codec_id);
        w.extend_from_slice(&self.codec_level.to_le_bytes());
        w.extend_from_slice(&self.device_state_segment.to_le_bytes());
        w.extend_from_slice(&(self.segments.len() as u32).to_le_bytes());
        for s in &self.segments {
            w.push(s.kind as u8);
            w.push(s.codec as u8);
            w.extend_from_slice(&s.offset.to_le_bytes());
            w.extend_from_slice(&s.stored_len.to_le_bytes());
            w.extend_from_slice(&s.raw_len.to_le_bytes());
            w.extend_from_slice(&s.hash);
        }
        w.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        for e in &self.entries {
            w.push(e.image as u8);
            w.extend_from_slice(&e.index.to_le_bytes());
            match e.kind {
                ChunkKind::Zero => w.push(0),
                ChunkKind::Ref { source, index } => {
                    w.push(1);
                    w.push(source as u8);
                    w.extend_from_slice(&index.to_le_bytes());
                    w.extend_from_slice(&e.hash);
                }
                ChunkKind::Payload {
                    segment,
                    offset,
                    transform,
                } => {
                    w.push(2);
                    w.extend_from_slice(&segment.to_le_bytes());
                    w.extend_from_slice(&offset.to_le_bytes());
                    w.push(transform as u8);
                    w.extend_from_slice(&e.hash);
                }
            }
        }
        w
    }

    /// Verifies, decompresses, parses and checks a stored manifest.
    pub fn parse(header: &Header, stored: &[u8]) -> Result<Manifest, FormatError> {
        if (stored.len() as u64) < header.manifest_len {
            return Err(FormatError::Truncated {
                offset: header.manifest_offset + stored.len() as u64,
                needed: header.manifest_len - stored.len() as u64,
            });
        }
        let stored = &stored[..header.manifest_len as usize];
        if blake3::hash(stored).as_bytes() != &header.manifest_hash {
            return Err(FormatError::ManifestHashMismatch);
        }
        let raw = crate::codec::decompress_exact(stored, header.manifest_raw_len as usize)
            .map_err(FormatError::ManifestDecompress)?;
        Self::from_raw(
            &raw,
            header.manifest_offset + header.manifest_len,
            header.file_len,
        )
    }

    /// Parses a decompressed manifest and checks it for a file whose data
    /// area starts at `data_offset` and which is `file_len` bytes long.
    pub fn from_raw(raw: &[u8], data_offset: u64, file_len: u64) -> Result<Manifest, FormatError> {
        let mut m = Self::decode(raw)?;
        m.data_offset = data_offset;
        m.check(file_len)?;
        Ok(m)
    }

    /// Parses the decompressed manifest encoding; checks every length.
    pub fn decode(raw: &[u8]) -> Result<Manifest, FormatError> {
        let mut r = Reader { buf: raw, pos: 0 };
        let chunk_size = r.u32()?;
        if !chunk_size.is_power_of_two() || !(512..=1 << 20).contains(&chunk_size) {
            return Err(r.invalid(format!("chunk size {chunk_size} not supported")));
        }
        let id_len = r.u16()? as usize;
        if id_len > MAX_BASE_ID_LEN {
            return Err(r.invalid(format!("base id length {id_len} too large")));
        }
        let base_id = String::from_utf8(r.bytes(id_len)?.to_vec())
            .map_err(|_| r.invalid("base id is not UTF-8".into()))?;
        let metadata_len = r.u32()? as usize;
        if metadata_len > MAX_METADATA_LEN {
            return Err(r.invalid(format!("metadata length {metadata_len} too large")));
        }
        let metadata = r.bytes(metadata_len)?.to_vec();
        let base_disk_size = r.size()?;
        let base_mem_size = r.size()?;
        let disk_size = r.size()?;
        let mem_size = r.size()?;
        let base_disk_hash = r.hash()?;
        let base_mem_hash = r.hash()?;
        let disk_hash = r.hash()?;
        let mem_hash = r.hash()?;
        let device_state_hash = r.hash()?;
        let launch_hash = r.hash()?;
        let codec_id = r.u8()?;
        let codec_level = r.u32()? as i32;
        let device_state_segment = r.u32()?;
        let nseg = r.u32()? as usize;
        const SEG_LEN: usize = 1 + 1 + 8 + 8 + 4 + 32;
        if nseg > r.remaining() / SEG_LEN {
            return Err(r.invalid(format!("segment count {nseg} exceeds the manifest")));
        }
        let mut segments = Vec::with_capacity(nseg);
        for _ in 0..nseg {
            let kind = match r.u8()? {
                0 => SegmentKind::DeviceState,
                1 => SegmentKind::Chunks,
                k => return Err(r.invalid(format!("unknown segment kind {k}"))),
            };
            let codec = match r.u8()? {
                0 => SegmentCodec::Store,
                1 => SegmentCodec::Zstd,
                c => return Err(r.invalid(format!("unknown segment codec {c}"))),
            };
            segments.push(SegmentInfo {
                kind,
                codec,
                offset: r.u64()?,
                stored_len: r.u64()?,
                raw_len: r.u32()?,
                hash: r.hash()?,
            });
        }
        let nent = r.u64()?;
        const MIN_ENTRY_LEN: u64 = 10;
        if nent > r.remaining() as u64 / MIN_ENTRY_LEN {
            return Err(r.invalid(format!("entry count {nent} exceeds the manifest")));
        }
        let mut entries = Vec::with_capacity(nent as usize);
        for _ in 0..nent {
            let image = match r.u8()? {
                0 => Image::Disk,
                1 => Image::Mem,
                i => return Err(r.invalid(format!("unknown image {i}"))),
            };
            let index = r.u64()?;
            let (kind, hash) = match r.u8()? {
                0 => (ChunkKind::Zero, [0u8; 32]),
                1 => {
                    let source = match r.u8()? {
                        0 => ChunkSource::BaseDisk,
                        1 => ChunkSource::BaseMem,
                        2 => ChunkSource::LaunchDisk,
                        3 => ChunkSource::LaunchMem,
                        s => return Err(r.invalid(format!("unknown chunk source {s}"))),
                    };
                    let index = r.u64()?;
                    (ChunkKind::Ref { source, index }, r.hash()?)
                }
                2 => {
                    let segment = r.u32()?;
                    let offset = r.u32()?;
                    let transform = match r.u8()? {
                        0 => Transform::Literal,
                        1 => Transform::Xor,
                        t => return Err(r.invalid(format!("unknown transform {t}"))),
                    };
                    let kind = ChunkKind::Payload {
                        segment,
                        offset,
                        transform,
                    };
                    (kind, r.hash()?)
                }
                k => return Err(r.invalid(format!("unknown chunk kind {k}"))),
            };
            entries.push(ChunkEntry {
                image,
                index,
                kind,
                hash,
            });
        }
        if r.remaining() != 0 {
            return Err(r.invalid(format!("{} unexpected trailing bytes", r.remaining())));
        }
        let mut m = Manifest {
            chunk_size,
            base_id,
            metadata,
            base_disk_size,
            base_mem_size,
            disk_size,
            mem_size,
            base_disk_hash,
            base_mem_hash,
            disk_hash,
            mem_hash,
            device_state_hash,
            launch_hash,
            codec_id,
            codec_level,
            device_state_segment,
            segments,
            entries,
            data_offset: 0,
        };
        // Zero hashes are implicit; fill them in (at most two distinct lengths).
        let full_zero = zero_chunk_hash(chunk_size as usize);
        for i in 0..m.entries.len() {
            if m.entries[i].kind == ChunkKind::Zero {
                let len = m.chunk_len(m.entries[i].image, m.entries[i].index);
                m.entries[i].hash = if len == chunk_size as usize {
                    full_zero
                } else {
                    zero_chunk_hash(len)
                };
            }
        }
        Ok(m)
    }

    /// Checks every cross reference, so that apply can trust the manifest.
    fn check(&self, file_len: u64) -> Result<(), FormatError> {
        let bad = |reason: String| FormatError::InvalidManifest { offset: 0, reason };
        if self.mem_size != self.base_mem_size {
            return Err(bad("memory size differs from the base memory size".into()));
        }
        if self.disk_size < self.base_disk_size {
            return Err(bad("disk size is smaller than the base disk size".into()));
        }
        // Segments: contiguous after the manifest, up to the end of the file.
        let mut pos = 0u64;
        for (i, s) in self.segments.iter().enumerate() {
            if s.offset != pos {
                return Err(bad(format!(
                    "segment {i} at offset {} expected at {pos}",
                    s.offset
                )));
            }
            let max_raw = match s.kind {
                SegmentKind::DeviceState => MAX_DEVICE_STATE_LEN,
                SegmentKind::Chunks => MAX_SEGMENT_RAW_LEN,
            };
            if s.raw_len > max_raw {
                return Err(bad(format!(
                    "segment {i} raw length {} too large",
                    s.raw_len
                )));
            }
            let max_stored = crate::codec::max_stored_len(s.codec, s.raw_len);
            if s.stored_len > max_stored {
                return Err(bad(format!(
                    "segment {i} stored length {} too large",
                    s.stored_len
                )));
            }
            if s.codec == SegmentCodec::Store && s.stored_len != s.raw_len as u64 {
                return Err(bad(format!("stored segment {i} has two lengths")));
            }
            pos = pos
                .checked_add(s.stored_len)
                .ok_or_else(|| bad("segment lengths overflow".into()))?;
        }
        if self.data_offset.checked_add(pos) != Some(file_len) {
            return Err(bad(format!(
                "segments end at {} but the file length is {file_len}",
                self.data_offset.saturating_add(pos),
            )));
        }
        let ds = self
            .segments
            .get(self.device_state_segment as usize)
            .ok_or_else(|| bad("device state segment out of range".into()))?;
        if ds.kind != SegmentKind::DeviceState {
            return Err(bad("device state segment has the wrong kind".into()));
        }
        if self
            .segments
            .iter()
            .filter(|s| s.kind == SegmentKind::DeviceState)
            .count()
            != 1
        {
            return Err(bad("more than one device state segment".into()));
        }
        // Entries: sorted, unique, in range, payloads inside their segment.
        let cs = self.chunk_size;
        for (n, e) in self.entries.iter().enumerate() {
            let what = |reason: &str| {
                bad(format!(
                    "chunk entry {n} ({} {}): {reason}",
                    e.image, e.index
                ))
            };
            if n > 0 {
                let p = &self.entries[n - 1];
                if (p.image, p.index) >= (e.image, e.index) {
                    return Err(what("entries not sorted or duplicated"));
                }
            }
            let len = self.chunk_len(e.image, e.index);
            if len == 0 {
                return Err(what("index out of range"));
            }
            match e.kind {
                ChunkKind::Zero => {}
                ChunkKind::Ref { source, index } => {
                    let src_len = chunk_len(self.source_size(source), cs, index);
                    if src_len != len {
                        return Err(what(
                            "reference to a chunk of another length or out of range",
                        ));
                    }
                    if let Some(img) = source.launch_image() {
                        let t = self
                            .find_entry(img, index)
                            .ok_or_else(|| what("self reference to an unchanged chunk"))?;
                        let t = &self.entries[t];
                        if !matches!(t.kind, ChunkKind::Payload { .. }) {
                            return Err(what("self reference to a chunk without payload"));
                        }
                        if t.hash != e.hash {
                            return Err(what("self reference to a chunk with another hash"));
                        }
                    }
                }
                ChunkKind::Payload {
                    segment, offset, ..
                } => {
                    let s = self
                        .segments
                        .get(segment as usize)
                        .ok_or_else(|| what("segment out of range"))?;
                    if s.kind != SegmentKind::Chunks {
                        return Err(what("payload in a segment that holds no chunks"));
                    }
                    if offset as u64 + len as u64 > s.raw_len as u64 {
                        return Err(what("payload beyond the end of its segment"));
                    }
                }
            }
        }
        Ok(())
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn invalid(&self, reason: String) -> FormatError {
        FormatError::InvalidManifest {
            offset: self.pos as u64,
            reason,
        }
    }
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        if n > self.remaining() {
            return Err(self.invalid(format!(
                "ends early: {n} bytes needed, {} left",
                self.remaining()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.bytes(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, FormatError> {
        Ok(u16::from_le_bytes(arr(self.bytes(2)?)))
    }
    fn u32(&mut self) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(arr(self.bytes(4)?)))
    }
    fn u64(&mut self) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(arr(self.bytes(8)?)))
    }
    fn size(&mut self) -> Result<u64, FormatError> {
        let v = self.u64()?;
        if v > MAX_IMAGE_SIZE {
            return Err(self.invalid(format!("image size {v} too large")));
        }
        Ok(v)
    }
    fn hash(&mut self) -> Result<Hash, FormatError> {
        Ok(arr(self.bytes(32)?))
    }
}

/// Parses the header and manifest from the first bytes of an overlay.
///
/// This is the entry point for fuzzing: it never panics.
pub fn parse_prefix(bytes: &[u8]) -> Result<(Header, Manifest), FormatError> {
    let header = Header::parse(bytes)?;
    let r = header.manifest_range();
    let stored = bytes.get(r.start as usize..).unwrap_or(&[]);
    let manifest = Manifest::parse(&header, stored)?;
    Ok((header, manifest))
}

#[cfg(test)]
#[path = "format_tests.rs"]
mod tests;
