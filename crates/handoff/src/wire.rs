//! The cloudlet-to-cloudlet handoff wire format, version 1.
//!
//! One handoff stream carries one QEMU migration stream from the source
//! daemon's [`Encoder`](crate::Encoder) to the destination daemon's
//! [`Decoder`](crate::Decoder), which rebuilds it byte for byte.
//!
//! ```text
//!  source QEMU ──migration stream──▶ Encoder ══ wire stream ══▶ Decoder ──▶ destination QEMU
//!                                       │                         │          (-incoming)
//!                                  base memory               base memory
//!                                  (same file, same id on both sides)
//!
//!  Encoder                                           Decoder
//!    │ StreamHeader (once)                             │
//!    │────────────────────────────────────────────────▶│ check magic, version, base id
//!    │ Frame ITEMS seq=0 (codec, level, crc)           │
//!    │────────────────────────────────────────────────▶│ decompress, apply items, emit bytes
//!    │ Frame ITEMS seq=1 ...                           │
//!    │────────────────────────────────────────────────▶│
//!    │ Frame END seq=n (raw length, BLAKE3 of stream)  │
//!    │────────────────────────────────────────────────▶│ verify length and hash: complete
//! ```
//!
//! # Stream header (64 + name bytes, big-endian)
//!
//! | field | size | meaning |
//! |---|---|---|
//! | magic | 8 | `CLHANDOF` |
//! | version | 2 | [`PROTOCOL_VERSION`] |
//! | flags | 2 | bit 0: a base memory is used |
//! | page size | 4 | 4096 |
//! | base length | 8 | bytes of the base memory image (0 without base) |
//! | base id | 32 | the base's identity (e.g. the base VM's content id) |
//! | base block len | 1 | length of the ramblock id the base describes |
//! | base block | n | e.g. `mem` |
//! | crc32 | 4 | CRC-32 of all preceding header bytes |
//!
//! # Frames
//!
//! | field | size | meaning |
//! |---|---|---|
//! | type | 1 | [`FRAME_ITEMS`] or [`FRAME_END`] |
//! | codec | 1 | [`Codec`] id: 0 none, 1 lz4 block, 2 zstd |
//! | level | 1 | compression level used (informational) |
//! | flags | 1 | bit 0: items were XOR-delta encoded where it paid (informational) |
//! | seq | 4 | frame number, from 0, consecutive |
//! | raw length | 4 | payload length after decompression (at most [`MAX_FRAME_RAW`]) |
//! | wire length | 4 | payload length on the wire (at most [`MAX_FRAME_WIRE`]) |
//! | crc32 | 4 | CRC-32 of the 16 header bytes above and the wire payload |
//! | payload | wire length | |
//!
//! An `ITEMS` payload, once decompressed, is a sequence of items:
//!
//! | tag | item | body |
//! |---|---|---|
//! | `0x01` | opaque bytes | varint n, n bytes copied to the output |
//! | `0x02` | ramblock definition | varint length, u8 n, n bytes id; gets the next block index |
//! | `0x10`-`0x1d` | RAM record | see below |
//!
//! A RAM record's tag is `0x10 | kind | (0x08 if CONTINUE)`. Unless
//! CONTINUE, a varint block index follows (and becomes the current block, as
//! in QEMU); then a varint page number (offset / 4096) and the body:
//!
//! | kind | meaning | body | QEMU record rebuilt |
//! |---|---|---|---|
//! | 0 ZERO | zero record | u8 fill | `ZERO` + fill |
//! | 1 BASE | the base page at the same offset | none | `PAGE` + base page |
//! | 2 BASE_AT | the base page at another offset | varint page | `PAGE` + base page |
//! | 3 DUP | the page last emitted at a location of this stream | varint block, varint page | `PAGE` + that page |
//! | 4 DELTA | XOR with the base page at the same offset | 4096 bytes | `PAGE` + (base ^ body) |
//! | 5 PLAIN | literal page | 4096 bytes | `PAGE` + body |
//!
//! The `END` frame's payload (never compressed) is: be64 length of the
//! migration stream, 32 bytes BLAKE3 of it. Nothing may follow it.
//!
//! # Compatibility rule
//!
//! The version is bumped for any change a version-1 decoder cannot read; a
//! decoder refuses versions it does not know (the handoff then falls back to
//! QEMU's plain stream or fails before the source VM stops). Unknown frame
//! types, codecs and item tags are errors, never skipped: a decoder must not
//! produce a stream it does not fully understand.

use thiserror::Error;

/// Magic bytes opening a handoff stream.
pub const MAGIC: [u8; 8] = *b"CLHANDOF";
/// The wire protocol version this crate writes and reads.
pub const PROTOCOL_VERSION: u16 = 1;
/// Header flag: the stream uses a base memory image.
pub const HEADER_FLAG_BASE: u16 = 1;

pub const FRAME_ITEMS: u8 = 1;
pub const FRAME_END: u8 = 2;
pub const FRAME_HEADER_LEN: usize = 20;
/// Largest decompressed frame payload a decoder accepts.
pub const MAX_FRAME_RAW: usize = 16 << 20;
/// Largest frame payload on the wire a decoder accepts.
pub const MAX_FRAME_WIRE: usize = MAX_FRAME_RAW + (MAX_FRAME_RAW >> 7) + 1024;
/// Frame flag: pages were delta-encoded against the base where it paid.
pub const FRAME_FLAG_DELTA: u8 = 1;

pub const ITEM_OPAQUE: u8 = 0x01;
pub const ITEM_BLOCK: u8 = 0x02;
pub const ITEM_RAM: u8 = 0x10;
pub const ITEM_RAM_CONTINUE: u8 = 0x08;

/// Kinds of RAM record items (the low 3 bits of the tag).
pub mod kind {
    pub const ZERO: u8 = 0;
    pub const BASE: u8 = 1;
    pub const BASE_AT: u8 = 2;
    pub const DUP: u8 = 3;
    pub const DELTA: u8 = 4;
    pub const PLAIN: u8 = 5;
}

/// A compression codec of a frame payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Codec {
    None,
    Lz4,
    /// zstd at a level (1..=19 are the useful ones).
    Zstd(i32),
}

impl Codec {
    pub fn id(self) -> u8 {
        match self {
            Codec::None => 0,
            Codec::Lz4 => 1,
            Codec::Zstd(_) => 2,
        }
    }
    pub fn level(self) -> u8 {
        match self {
            Codec::Zstd(l) => l.clamp(0, 255) as u8,
            _ => 0,
        }
    }
    pub fn from_wire(id: u8, level: u8) -> Option<Codec> {
        match id {
            0 => Some(Codec::None),
            1 => Some(Codec::Lz4),
            2 => Some(Codec::Zstd(level as i32)),
            _ => None,
        }
    }
}

impl std::fmt::Display for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Codec::None => write!(f, "none"),
            Codec::Lz4 => write!(f, "lz4"),
            Codec::Zstd(l) => write!(f, "zstd-{l}"),
        }
    }
}

/// The stream header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamHeader {
    pub version: u16,
    pub flags: u16,
    pub page_size: u32,
    pub base_len: u64,
    pub base_id: [u8; 32],
    pub base_block: String,
}

/// Why a stream header was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ReadHeaderError {
    #[error("Not a cloudlet handoff stream (bad magic)")]
    BadMagic,
    #[error("Unsupported handoff protocol version {0} (this side speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion(u16),
    #[error("Handoff stream header is damaged (checksum mismatch)")]
    Checksum,
    #[error("Unsupported page size {0}")]
    PageSize(u32),
    #[error("Base block name is not UTF-8")]
    BlockName,
}

impl StreamHeader {
    pub fn write(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.extend_from_slice(&self.page_size.to_be_bytes());
        out.extend_from_slice(&self.base_len.to_be_bytes());
        out.extend_from_slice(&self.base_id);
        let name = &self.base_block.as_bytes()[..self.base_block.len().min(255)];
        out.push(name.len() as u8);
        out.extend_from_slice(name);
        let crc = crc32fast::hash(&out[start..]);
        out.extend_from_slice(&crc.to_be_bytes());
    }

    /// Parse a header at the start of `d`: `Ok(None)` if more bytes are needed,
    /// else the header and its length.
    pub fn read(d: &[u8]) -> Result<Option<(StreamHeader, usize)>, ReadHeaderError> {
        let prefix = d.len().min(8);
        if d[..prefix] != MAGIC[..prefix] {
            return Err(ReadHeaderError::BadMagic);
        }
        if d.len() < 57 {
            return Ok(None);
        }
        let version = u16::from_be_bytes([d[8], d[9]]);
        if version != PROTOCOL_VERSION {
            return Err(ReadHeaderError::UnsupportedVersion(version));
        }
        let n = d[56] as usize;
        let len = 57 + n + 4;
        if d.len() < len {
            return Ok(None);
        }
        let crc = u32::from_be_bytes([d[len - 4], d[len - 3], d[len - 2], d[len - 1]]);
        if crc32fast::hash(&d[..len - 4]) != crc {
            return Err(ReadHeaderError::Checksum);
        }
        let page_size = u32::from_be_bytes([d[12], d[13], d[14], d[15]]);
        if page_size != 4096 {
            return Err(ReadHeaderError::PageSize(page_size));
        }
        let mut base_len = [0u8; 8];
        base_len.copy_from_slice(&d[16..24]);
        let mut base_id = [0u8; 32];
        base_id.copy_from_slice(&d[24..56]);
        let base_block = std::str::from_utf8(&d[57..57 + n])
            .map_err(|_| ReadHeaderError::BlockName)?
            .to_string();
        Ok(Some((
            StreamHeader {
                version,
                flags: u16::from_be_bytes([d[10], d[11]]),
                page_size,
                base_len: u64::from_be_bytes(base_len),
                base_id,
                base_block,
            },
            len,
        )))
    }
}

/// The fixed header of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: u8,
    pub codec: u8,
    pub level: u8,
    pub flags: u8,
    pub seq: u32,
    pub raw_len: u32,
    pub wire_len: u32,
    pub crc: u32,
}

impl FrameHeader {
    fn fields(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0] = self.kind;
        b[1] = self.codec;
        b[2] = self.level;
        b[3] = self.flags;
        b[4..8].copy_from_slice(&self.seq.to_be_bytes());
        b[8..12].copy_from_slice(&self.raw_len.to_be_bytes());
        b[12..16].copy_from_slice(&self.wire_len.to_be_bytes());
        b
    }

    /// The checksum a frame with this header and payload must carry.
    pub fn checksum(&self, payload: &[u8]) -> u32 {
        let mut h = crc32fast::Hasher::new();
        h.update(&self.fields());
        h.update(payload);
        h.finalize()
    }

    /// Append header (with the checksum computed) and payload to `out`.
    pub fn write_frame(mut self, payload: &[u8], out: &mut Vec<u8>) {
        self.wire_len = payload.len() as u32;
        self.crc = self.checksum(payload);
        out.extend_from_slice(&self.fields());
        out.extend_from_slice(&self.crc.to_be_bytes());
        out.extend_from_slice(payload);
    }

    pub fn read(d: &[u8; FRAME_HEADER_LEN]) -> FrameHeader {
        let u32_at = |i: usize| u32::from_be_bytes([d[i], d[i + 1], d[i + 2], d[i + 3]]);
        FrameHeader {
            kind: d[0],
            codec: d[1],
            level: d[2],
            flags: d[3],
            seq: u32_at(4),
            raw_len: u32_at(8),
            wire_len: u32_at(12),
            crc: u32_at(16),
        }
    }
}

/// Append an unsigned LEB128 varint.
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A cursor over an item payload; every read is bounds-checked.
#[derive(Debug)]
pub struct Reader<'a> {
    pub data: &'a [u8],
    pub pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Reader { data, pos: 0 }
    }
    pub fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }
    pub fn u8(&mut self) -> Option<u8> {
        let b = *self.data.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }
    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let b = self.data.get(self.pos..end)?;
        self.pos = end;
        Some(b)
    }
    pub fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header() -> StreamHeader {
        StreamHeader {
            version: PROTOCOL_VERSION,
            flags: HEADER_FLAG_BASE,
            page_size: 4096,
            base_len: 1 << 28,
            base_id: [7; 32],
            base_block: "mem".into(),
        }
    }

    #[test]
    fn header_roundtrip_and_partial() {
        let mut b = Vec::new();
        header().write(&mut b);
        for n in 0..b.len() {
            assert_eq!(StreamHeader::read(&b[..n]), Ok(None), "prefix {n}");
        }
        assert_eq!(StreamHeader::read(&b), Ok(Some((header(), b.len()))));
    }

    #[test]
    fn header_damage_is_refused() {
        let mut b = Vec::new();
        header().write(&mut b);
        let mut v = b.clone();
        v[9] = 9;
        assert_eq!(
            StreamHeader::read(&v),
            Err(ReadHeaderError::UnsupportedVersion(9))
        );
        let mut v = b.clone();
        v[30] ^= 1;
        assert_eq!(StreamHeader::read(&v), Err(ReadHeaderError::Checksum));
        assert_eq!(StreamHeader::read(b"QEVM"), Err(ReadHeaderError::BadMagic));
    }

    proptest! {
        #[test]
        fn varint_roundtrip(v in any::<u64>()) {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            let mut r = Reader::new(&b);
            prop_assert_eq!(r.varint(), Some(v));
            prop_assert!(r.is_empty());
        }

        #[test]
        fn reader_never_panics(data in proptest::collection::vec(any::<u8>(), 0..64), n in 0usize..100) {
            let mut r = Reader::new(&data);
            let _ = r.varint();
            let _ = r.bytes(n);
            let _ = r.u8();
        }
    }
}
