//! The destination side: handoff wire frames in, the exact QEMU migration
//! stream out.

use std::collections::HashMap;
use std::sync::Arc;

use thiserror::Error;

use crate::codec::{xor_into, BaseMemory, Decompressor};
use crate::stream::{ram_flag, write_ram_header, PAGE_SIZE};
use crate::wire::{
    kind, Codec, FrameHeader, ReadHeaderError, Reader, StreamHeader, FRAME_END, FRAME_HEADER_LEN,
    FRAME_ITEMS, HEADER_FLAG_BASE, ITEM_BLOCK, ITEM_OPAQUE, ITEM_RAM, ITEM_RAM_CONTINUE,
    MAX_FRAME_RAW, MAX_FRAME_WIRE,
};

/// Limits of the decoder.
#[derive(Debug, Clone)]
pub struct DecoderConfig {
    /// The most guest RAM (sum of the ramblocks the stream defines) accepted;
    /// bounds the decoder's memory.
    pub max_guest_ram: u64,
}

impl Default for DecoderConfig {
    fn default() -> Self {
        DecoderConfig {
            max_guest_ram: 256 << 30,
        }
    }
}

/// Why a handoff stream was refused. The output of a refused stream must be
/// discarded (the decoder never emits the bytes of a frame it refused).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeStreamError {
    #[error("Bad handoff stream header")]
    Header(#[from] ReadHeaderError),
    #[error("The stream was made against another base memory: {0}")]
    BaseMismatch(String),
    #[error("Frame {seq} at wire offset {offset} is damaged (checksum mismatch)")]
    Checksum { seq: u32, offset: u64 },
    #[error("Frame at wire offset {offset} has sequence number {found}, expected {expected}")]
    Sequence {
        offset: u64,
        expected: u32,
        found: u32,
    },
    #[error("Frame {seq} at wire offset {offset} is too large ({raw} raw, {wire} on the wire)")]
    TooLarge {
        seq: u32,
        offset: u64,
        raw: u32,
        wire: u32,
    },
    #[error("Frame {seq} at wire offset {offset} has unknown type {kind} or codec {codec}")]
    UnknownFrame {
        seq: u32,
        offset: u64,
        kind: u8,
        codec: u8,
    },
    #[error("Frame {seq} at wire offset {offset} does not decompress: {detail}")]
    Decompress {
        seq: u32,
        offset: u64,
        detail: String,
    },
    #[error("Frame {seq} at wire offset {offset} is malformed: {detail}")]
    Malformed {
        seq: u32,
        offset: u64,
        detail: String,
    },
    #[error("The rebuilt stream does not match the source: {0}")]
    Mismatch(String),
    #[error("The handoff stream was cut: {wire_bytes} bytes received, END frame missing")]
    Truncated { wire_bytes: u64 },
    #[error("Data after the END frame at wire offset {offset}")]
    TrailingData { offset: u64 },
    #[error("The decoder already failed")]
    Failed,
}

/// What a decoded stream held.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DecodeStats {
    pub wire_bytes: u64,
    /// Migration-stream bytes emitted.
    pub raw_bytes: u64,
    pub frames: u64,
    pub ram_records: u64,
    /// Pages whose content the decoder keeps for later DUP references.
    pub tracked_pages: u64,
}

/// What the decoder remembers of a location, for DUP references.
#[derive(Debug, Clone)]
enum Slot {
    Base(u64),
    Fill(u8),
    Data(Arc<[u8; PAGE_SIZE]>),
}

#[derive(Debug)]
struct Block {
    id: String,
    pages: u64,
}

/// Rebuilds the migration stream from handoff frames. See [`crate::wire`].
#[derive(Debug)]
pub struct Decoder {
    config: DecoderConfig,
    base: Option<BaseMemory>,
    use_base: bool,
    buf: Vec<u8>,
    header: Option<StreamHeader>,
    seq: u32,
    /// Wire offset of `buf[0]`.
    buf_offset: u64,
    blocks: Vec<Block>,
    defined_ram: u64,
    cur_block: Option<u32>,
    slots: HashMap<(u32, u64), Slot>,
    hasher: blake3::Hasher,
    decompressor: Option<Decompressor>,
    payload: Vec<u8>,
    ended: bool,
    failed: bool,
    stats: DecodeStats,
    /// `track_pages`: the block whose page records are noted, and them.
    tracked: Option<String>,
    touched: Vec<u64>,
}

impl Decoder {
    /// A decoder; `base` must be the same image the encoder used (checked
    /// against the stream header).
    pub fn new(config: DecoderConfig, base: Option<BaseMemory>) -> Self {
        Decoder {
            config,
            base,
            use_base: false,
            buf: Vec::new(),
            header: None,
            seq: 0,
            buf_offset: 0,
            blocks: Vec::new(),
            defined_ram: 0,
            cur_block: None,
            slots: HashMap::new(),
            hasher: blake3::Hasher::new(),
            decompressor: None,
            payload: Vec::new(),
            ended: false,
            failed: false,
            stats: DecodeStats::default(),
            tracked: None,
            touched: Vec::new(),
        }
    }

    /// Note the page numbers of every RAM record of `block` emitted from
    /// now on (`take_touched`): the destination knows which pages of the
    /// guest's RAM each batch of output rewrites (`memcheck`).
    pub fn track_pages(&mut self, block: &str) {
        self.tracked = Some(block.to_string());
    }

    /// The pages of the tracked block that output emitted since the last
    /// call rewrites (with repeats).
    pub fn take_touched(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.touched)
    }

    /// The stream header, once read.
    pub fn header(&self) -> Option<&StreamHeader> {
        self.header.as_ref()
    }

    /// Whether the END frame was received and verified.
    pub fn is_complete(&self) -> bool {
        self.ended
    }

    pub fn stats(&self) -> &DecodeStats {
        &self.stats
    }

    /// Decode the next wire bytes, appending rebuilt stream bytes to `out`.
    /// On error nothing of the refused frame is appended, and the decoder
    /// refuses everything after.
    pub fn feed(&mut self, wire: &[u8], out: &mut Vec<u8>) -> Result<(), DecodeStreamError> {
        if self.failed {
            return Err(DecodeStreamError::Failed);
        }
        self.stats.wire_bytes += wire.len() as u64;
        self.buf.extend_from_slice(wire);
        let r = self.process(out);
        if r.is_err() {
            self.failed = true;
            self.buf = Vec::new();
        }
        r
    }

    /// The wire stream ended: it must have ended with a verified END frame.
    pub fn finish(&mut self) -> Result<DecodeStats, DecodeStreamError> {
        if self.failed {
            return Err(DecodeStreamError::Failed);
        }
        if !self.ended {
            self.failed = true;
            return Err(DecodeStreamError::Truncated {
                wire_bytes: self.stats.wire_bytes,
            });
        }
        Ok(self.stats.clone())
    }

    fn process(&mut self, out: &mut Vec<u8>) -> Result<(), DecodeStreamError> {
        let mut pos = 0;
        let r = self.process_frames(&mut pos, out);
        self.buf.drain(..pos);
        self.buf_offset += pos as u64;
        r
    }

    fn process_frames(
        &mut self,
        pos: &mut usize,
        out: &mut Vec<u8>,
    ) -> Result<(), DecodeStreamError> {
        if self.header.is_none() {
            match StreamHeader::read(&self.buf)? {
                None => return Ok(()),
                Some((h, len)) => {
                    self.check_base(&h)?;
                    self.header = Some(h);
                    *pos = len;
                }
            }
        }
        loop {
            let rest = &self.buf[*pos..];
            if rest.is_empty() {
                return Ok(());
            }
            let offset = self.buf_offset + *pos as u64;
            if self.ended {
                return Err(DecodeStreamError::TrailingData { offset });
            }
            let Some(hdr) = rest.get(..FRAME_HEADER_LEN) else {
                return Ok(());
            };
            let Ok(hdr) = <&[u8; FRAME_HEADER_LEN]>::try_from(hdr) else {
                return Ok(());
            };
            let h = FrameHeader::read(hdr);
            if h.raw_len as usize > MAX_FRAME_RAW || h.wire_len as usize > MAX_FRAME_WIRE {
                return Err(DecodeStreamError::TooLarge {
                    seq: h.seq,
                    offset,
                    raw: h.raw_len,
                    wire: h.wire_len,
                });
            }
            let total = FRAME_HEADER_LEN + h.wire_len as usize;
            if rest.len() < total {
                return Ok(());
            }
            let payload = &rest[FRAME_HEADER_LEN..total];
            if h.checksum(payload) != h.crc {
                return Err(DecodeStreamError::Checksum { seq: h.seq, offset });
            }
            if h.seq != self.seq {
                return Err(DecodeStreamError::Sequence {
                    offset,
                    expected: self.seq,
                    found: h.seq,
                });
            }
            let start = out.len();
            let payload_range = *pos + FRAME_HEADER_LEN..*pos + total;
            let r = self.frame(h, payload_range, offset, out);
            if r.is_err() {
                out.truncate(start);
                return r;
            }
            self.seq += 1;
            self.stats.frames += 1;
            *pos += total;
        }
    }

    fn check_base(&mut self, h: &StreamHeader) -> Result<(), DecodeStreamError> {
        if h.flags & HEADER_FLAG_BASE == 0 {
            self.use_base = false;
            return Ok(());
        }
        let Some(b) = &self.base else {
            return Err(DecodeStreamError::BaseMismatch(
                "the stream needs a base memory and this side has none".into(),
            ));
        };
        if b.bytes().len() as u64 != h.base_len || *b.id() != h.base_id || b.block() != h.base_block
        {
            return Err(DecodeStreamError::BaseMismatch(format!(
                "stream base: {} bytes for block {:?}; local base: {} bytes for block {:?} (or the ids differ)",
                h.base_len,
                h.base_block,
                b.bytes().len(),
                b.block()
            )));
        }
        self.use_base = true;
        Ok(())
    }

    fn frame(
        &mut self,
        h: FrameHeader,
        range: std::ops::Range<usize>,
        offset: u64,
        out: &mut Vec<u8>,
    ) -> Result<(), DecodeStreamError> {
        let seq = h.seq;
        let malformed = |detail: String| DecodeStreamError::Malformed {
            seq,
            offset,
            detail,
        };
        match h.kind {
            FRAME_END => {
                let p = &self.buf[range];
                if p.len() != 40 || h.codec != 0 {
                    return Err(malformed("END frame of the wrong size".into()));
                }
                let mut len = [0u8; 8];
                len.copy_from_slice(&p[..8]);
                let len = u64::from_be_bytes(len);
                if len != self.stats.raw_bytes {
                    return Err(DecodeStreamError::Mismatch(format!(
                        "{} bytes rebuilt, the source sent {len}",
                        self.stats.raw_bytes
                    )));
                }
                if self.hasher.finalize().as_bytes()[..] != p[8..40] {
                    return Err(DecodeStreamError::Mismatch(
                        "BLAKE3 of the rebuilt stream differs".into(),
                    ));
                }
                self.ended = true;
                Ok(())
            }
            FRAME_ITEMS => {
                let Some(codec) = Codec::from_wire(h.codec, h.level) else {
                    return Err(DecodeStreamError::UnknownFrame {
                        seq,
                        offset,
                        kind: h.kind,
                        codec: h.codec,
                    });
                };
                let mut payload = std::mem::take(&mut self.payload);
                let dec = match &mut self.decompressor {
                    Some(d) => d,
                    None => self.decompressor.insert(Decompressor::new().map_err(|e| {
                        DecodeStreamError::Decompress {
                            seq,
                            offset,
                            detail: e.to_string(),
                        }
                    })?),
                };
                if let Err(detail) =
                    dec.decompress(codec, &self.buf[range], h.raw_len as usize, &mut payload)
                {
                    self.payload = payload;
                    return Err(DecodeStreamError::Decompress {
                        seq,
                        offset,
                        detail,
                    });
                }
                let start = out.len();
                let r = self.items(&payload, out).map_err(malformed);
                self.payload = payload;
                r?;
                self.hasher.update(&out[start..]);
                self.stats.raw_bytes += (out.len() - start) as u64;
                Ok(())
            }
            k => Err(DecodeStreamError::UnknownFrame {
                seq,
                offset,
                kind: k,
                codec: h.codec,
            }),
        }
    }

    fn items(&mut self, payload: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        let mut r = Reader::new(payload);
        let short = || "item cut short".to_string();
        while !r.is_empty() {
            let tag = r.u8().ok_or_else(short)?;
            match tag {
                ITEM_OPAQUE => {
                    let n = r.varint().ok_or_else(short)?;
                    let n = usize::try_from(n).map_err(|_| short())?;
                    out.extend_from_slice(r.bytes(n).ok_or_else(short)?);
                }
                ITEM_BLOCK => {
                    let len = r.varint().ok_or_else(short)?;
                    let n = r.u8().ok_or_else(short)? as usize;
                    let id = std::str::from_utf8(r.bytes(n).ok_or_else(short)?)
                        .map_err(|_| "ramblock id is not UTF-8".to_string())?;
                    self.defined_ram = self.defined_ram.saturating_add(len);
                    if self.defined_ram > self.config.max_guest_ram {
                        return Err(format!(
                            "ramblocks total {} bytes, more than the {} allowed",
                            self.defined_ram, self.config.max_guest_ram
                        ));
                    }
                    self.blocks.push(Block {
                        id: id.to_string(),
                        pages: len / PAGE_SIZE as u64,
                    });
                }
                t if t & 0xf0 == ITEM_RAM => self.ram_record(t, &mut r, out)?,
                t => return Err(format!("unknown item tag {t:#x}")),
            }
        }
        Ok(())
    }

    fn ram_record(&mut self, tag: u8, r: &mut Reader<'_>, out: &mut Vec<u8>) -> Result<(), String> {
        let short = || "RAM record cut short".to_string();
        let k = tag & 0x07;
        let continued = tag & ITEM_RAM_CONTINUE != 0;
        let b = if continued {
            self.cur_block.ok_or("CONTINUE before any block")?
        } else {
            let b = r.varint().ok_or_else(short)?;
            let b = u32::try_from(b).map_err(|_| "block index out of range")?;
            if b as usize >= self.blocks.len() {
                return Err(format!("undefined block {b}"));
            }
            self.cur_block = Some(b);
            b
        };
        let page = r.varint().ok_or_else(short)?;
        let block = &self.blocks[b as usize];
        if page >= block.pages {
            return Err(format!("page {page} beyond the end of block {}", block.id));
        }
        let offset = page * PAGE_SIZE as u64;
        let flag = if k == kind::ZERO {
            ram_flag::ZERO
        } else {
            ram_flag::PAGE
        };
        write_ram_header(out, &block.id, offset, flag, continued);
        if self.tracked.as_deref() == Some(block.id.as_str()) {
            self.touched.push(page);
        }
        let is_base_block =
            self.use_base && self.base.as_ref().is_some_and(|x| x.block() == block.id);
        let base_page = |p: u64| -> Result<&[u8; PAGE_SIZE], String> {
            let base = self
                .base
                .as_ref()
                .filter(|_| self.use_base)
                .ok_or("base page without a base")?;
            base.page(
                p.checked_mul(PAGE_SIZE as u64)
                    .ok_or("base page out of range")?,
            )
            .ok_or_else(|| format!("base page {p} out of range"))
        };
        let slot = match k {
            kind::ZERO => {
                let fill = r.u8().ok_or_else(short)?;
                out.push(fill);
                Slot::Fill(fill)
            }
            kind::BASE => {
                if !is_base_block {
                    return Err("base reference outside the base block".into());
                }
                out.extend_from_slice(base_page(page)?);
                Slot::Base(page)
            }
            kind::BASE_AT => {
                let p = r.varint().ok_or_else(short)?;
                out.extend_from_slice(base_page(p)?);
                Slot::Base(p)
            }
            kind::DUP => {
                let tb = r.varint().ok_or_else(short)?;
                let tp = r.varint().ok_or_else(short)?;
                let tb = u32::try_from(tb).map_err(|_| "block index out of range")?;
                let slot =
                    self.slots.get(&(tb, tp)).cloned().ok_or_else(|| {
                        format!("reference to page {tp} of block {tb}, never sent")
                    })?;
                match &slot {
                    Slot::Base(p) => out.extend_from_slice(base_page(*p)?),
                    Slot::Fill(f) => out.resize(out.len() + PAGE_SIZE, *f),
                    Slot::Data(d) => out.extend_from_slice(&d[..]),
                }
                slot
            }
            kind::DELTA | kind::PLAIN => {
                let body: &[u8; PAGE_SIZE] = r
                    .bytes(PAGE_SIZE)
                    .ok_or_else(short)?
                    .try_into()
                    .map_err(|_| short())?;
                let mut page_data = Box::new(*body);
                if k == kind::DELTA {
                    if !is_base_block {
                        return Err("delta outside the base block".into());
                    }
                    xor_into(body, base_page(page)?, &mut page_data);
                }
                out.extend_from_slice(&page_data[..]);
                Slot::Data(Arc::from(page_data))
            }
            k => return Err(format!("unknown RAM record kind {k}")),
        };
        if matches!(slot, Slot::Data(_)) {
            self.stats.tracked_pages += 1;
        }
        if let Some(Slot::Data(_)) = self.slots.insert((b, page), slot) {
            self.stats.tracked_pages -= 1;
        }
        self.stats.ram_records += 1;
        Ok(())
    }
}
