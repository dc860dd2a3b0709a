//! The source side: QEMU migration stream in, handoff wire frames out.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use thiserror::Error;

use crate::codec::{delta_pays, page_key, xor_into, BaseMemory, Compressor, Mode};
use crate::policy::{AdaptivePolicy, PolicyConfig};
use crate::stream::{ParseSummary, RamBlock, StreamEvent, StreamParser, PAGE_SIZE};
use crate::wire::{
    kind, put_varint, Codec, FrameHeader, StreamHeader, FRAME_END, FRAME_FLAG_DELTA, FRAME_ITEMS,
    HEADER_FLAG_BASE, ITEM_BLOCK, ITEM_OPAQUE, ITEM_RAM, ITEM_RAM_CONTINUE, MAX_FRAME_RAW,
    PROTOCOL_VERSION,
};

/// How the encoder works.
#[derive(Debug, Clone)]
pub struct EncoderConfig {
    /// A frame is emitted when its items reach this many bytes (before
    /// compression). Clamped to 4 KiB..=8 MiB.
    pub batch_bytes: usize,
    /// ...or when it stands for this many bytes of the migration stream
    /// (a frame of references is tiny but may stand for a lot).
    pub batch_raw_bytes: usize,
    /// Reference pages equal to a base page at another offset or to a page
    /// already sent (pages equal to the base page at the same offset are
    /// always references when a base is given).
    pub dedup: bool,
    /// Novel pages kept to measure the candidate modes on.
    pub sample_pages: usize,
    pub policy: PolicyConfig,
}

impl Default for EncoderConfig {
    fn default() -> Self {
        EncoderConfig {
            batch_bytes: 256 << 10,
            batch_raw_bytes: 4 << 20,
            dedup: true,
            sample_pages: 64,
            policy: PolicyConfig::default(),
        }
    }
}

/// Why encoding failed.
#[derive(Debug, Error)]
pub enum EncodeStreamError {
    #[error("Compressing a frame with {codec} failed")]
    Compress {
        codec: Codec,
        #[source]
        source: std::io::Error,
    },
    #[error("The encoder was already finished")]
    Finished,
}

/// Counters of the encoder.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncodeStats {
    /// Migration-stream bytes fed in.
    pub raw_bytes: u64,
    /// Handoff-stream bytes produced (header and frames).
    pub wire_bytes: u64,
    pub frames: u64,
    pub zero_pages: u64,
    /// Pages equal to the base page at the same offset.
    pub base_pages: u64,
    /// Pages equal to a base page at another offset.
    pub base_other_pages: u64,
    /// Pages equal to a page already sent in this stream.
    pub dup_pages: u64,
    pub delta_pages: u64,
    pub plain_pages: u64,
    /// Bytes passed through verbatim (headers, device state...).
    pub opaque_bytes: u64,
    pub mode_switches: u64,
    /// Times every candidate mode was measured.
    pub samples: u64,
}

impl EncodeStats {
    /// Wire bytes per migration-stream byte.
    pub fn ratio(&self) -> f64 {
        self.wire_bytes as f64 / self.raw_bytes.max(1) as f64
    }
}

/// What `finish` reports.
#[derive(Debug, Clone)]
pub struct EncodeSummary {
    pub stats: EncodeStats,
    pub parse: ParseSummary,
    pub final_mode: Mode,
}

/// Where the decoder is guaranteed to find a page's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// Page number in the base image.
    Base(u64),
    /// (block index, page number) last emitted in this stream.
    Stream(u32, u64),
}

type Loc = (u32, u64);

/// Turns a QEMU migration stream into handoff frames. See [`crate::wire`].
///
/// Feed it what QEMU writes, in any slices; write out what it appends to
/// `out`. Call [`flush`](Self::flush) when QEMU's socket goes idle, so that
/// nothing waits in a half-full batch, and [`finish`](Self::finish) at the
/// end. State is O(guest RAM): one index entry per distinct page.
#[derive(Debug)]
pub struct Encoder {
    parser: StreamParser,
    core: Core,
}

#[derive(Debug)]
struct Core {
    config: EncoderConfig,
    base: Option<BaseMemory>,
    /// Dedup index of this stream's pages: key -> where the decoder has that
    /// content (the base's own index is in `base`).
    index: HashMap<[u8; 16], Target>,
    /// The key indexed at each stream location, to unindex on overwrite.
    loc_key: HashMap<Loc, [u8; 16]>,
    /// Wire block index -> ramblock id.
    blocks: Vec<String>,
    base_block: Option<u32>,
    cur_block: Option<u32>,
    batch: Vec<u8>,
    batch_raw: usize,
    batch_delta: bool,
    scratch: Vec<u8>,
    compressor: Compressor,
    seq: u32,
    header_written: bool,
    finished: bool,
    hasher: blake3::Hasher,
    policy: AdaptivePolicy,
    stats: EncodeStats,
    /// Recent novel pages and whether the base has a page at their offset.
    recent: VecDeque<([u8; PAGE_SIZE], Option<u64>)>,
    error: Option<EncodeStreamError>,
}

impl Encoder {
    /// A new encoder. With a base and `dedup`, the base's page index is
    /// built now if it was not yet (see [`BaseMemory::index`]).
    pub fn new(config: EncoderConfig, base: Option<BaseMemory>) -> Self {
        if let (Some(b), true) = (&base, config.dedup) {
            b.index();
        }
        let mut config = config;
        config.batch_bytes = config.batch_bytes.clamp(4096, MAX_FRAME_RAW / 2);
        let policy = AdaptivePolicy::new(config.policy.clone());
        Encoder {
            parser: StreamParser::new(),
            core: Core {
                base,
                index: HashMap::new(),
                loc_key: HashMap::new(),
                blocks: Vec::new(),
                base_block: None,
                cur_block: None,
                batch: Vec::with_capacity(config.batch_bytes + 2 * PAGE_SIZE),
                batch_raw: 0,
                batch_delta: false,
                scratch: Vec::new(),
                compressor: Compressor::new(),
                seq: 0,
                header_written: false,
                finished: false,
                hasher: blake3::Hasher::new(),
                policy,
                stats: EncodeStats::default(),
                recent: VecDeque::new(),
                error: None,
                config,
            },
        }
    }

    /// Encode the next bytes of the migration stream.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), EncodeStreamError> {
        let core = &mut self.core;
        if core.finished {
            return Err(EncodeStreamError::Finished);
        }
        core.write_header(out);
        core.hasher.update(input);
        core.stats.raw_bytes += input.len() as u64;
        self.parser.feed(input, &mut |ev| core.on_event(ev, out));
        if let Some(e) = core.error.take() {
            return Err(e);
        }
        if self.parser.is_done() {
            // The stream is over: nothing may wait in a batch.
            core.emit_frame(out)?;
        }
        Ok(())
    }

    /// Emit the current batch now (call it when QEMU's socket goes idle).
    pub fn flush(&mut self, out: &mut Vec<u8>) -> Result<(), EncodeStreamError> {
        let core = &mut self.core;
        if core.finished {
            return Err(EncodeStreamError::Finished);
        }
        core.write_header(out);
        core.emit_frame(out)
    }

    /// End of the migration stream: emit everything and the END frame.
    pub fn finish(&mut self, out: &mut Vec<u8>) -> Result<EncodeSummary, EncodeStreamError> {
        let core = &mut self.core;
        if core.finished {
            return Err(EncodeStreamError::Finished);
        }
        core.write_header(out);
        let parse = self.parser.finish(&mut |ev| core.on_event(ev, out));
        if let Some(e) = core.error.take() {
            return Err(e);
        }
        core.emit_frame(out)?;
        let mut payload = Vec::with_capacity(40);
        payload.extend_from_slice(&core.stats.raw_bytes.to_be_bytes());
        payload.extend_from_slice(core.hasher.finalize().as_bytes());
        let start = out.len();
        FrameHeader {
            kind: FRAME_END,
            codec: 0,
            level: 0,
            flags: 0,
            seq: core.seq,
            raw_len: payload.len() as u32,
            wire_len: 0,
            crc: 0,
        }
        .write_frame(&payload, out);
        core.seq += 1;
        core.stats.frames += 1;
        core.stats.wire_bytes += (out.len() - start) as u64;
        core.finished = true;
        let final_mode = core.policy.mode();
        Ok(EncodeSummary {
            stats: self.stats(),
            parse,
            final_mode,
        })
    }

    /// Report the link rate in bytes per second (as the socket drains).
    pub fn report_link_rate(&mut self, bytes_per_sec: f64) {
        self.core.policy.report_link_rate(bytes_per_sec);
    }

    /// Report that `bytes` were drained to the link in `elapsed`.
    pub fn report_drained(&mut self, bytes: u64, elapsed: std::time::Duration) {
        self.core.policy.report_drained(bytes, elapsed);
    }

    /// The mode novel pages are encoded with now.
    pub fn mode(&self) -> Mode {
        self.core.policy.mode()
    }

    pub fn policy(&self) -> &AdaptivePolicy {
        &self.core.policy
    }

    pub fn stats(&self) -> EncodeStats {
        let mut s = self.core.stats.clone();
        s.mode_switches = self.core.policy.switches();
        s
    }

    /// What the stream parser found so far.
    pub fn parse_summary(&self) -> &ParseSummary {
        self.parser.summary()
    }

    /// Items waiting in the current batch (bytes, before compression).
    pub fn pending_bytes(&self) -> usize {
        self.core.batch.len()
    }
}

impl Core {
    fn write_header(&mut self, out: &mut Vec<u8>) {
        if self.header_written {
            return;
        }
        self.header_written = true;
        let start = out.len();
        let (flags, base_len, base_id, base_block) = match &self.base {
            Some(b) => (
                HEADER_FLAG_BASE,
                b.bytes().len() as u64,
                *b.id(),
                b.block().to_string(),
            ),
            None => (0, 0, [0; 32], String::new()),
        };
        StreamHeader {
            version: PROTOCOL_VERSION,
            flags,
            page_size: PAGE_SIZE as u32,
            base_len,
            base_id,
            base_block,
        }
        .write(out);
        self.stats.wire_bytes += (out.len() - start) as u64;
    }

    fn on_event(&mut self, ev: StreamEvent<'_>, out: &mut Vec<u8>) {
        if self.error.is_some() {
            return;
        }
        let r = match ev {
            StreamEvent::Opaque(b) => self.on_opaque(b, out),
            StreamEvent::RamZero {
                block,
                offset,
                continued,
                fill,
            } => {
                let loc = self.record_header(block, offset, continued, kind::ZERO);
                self.batch.push(fill);
                self.unindex(loc);
                self.stats.zero_pages += 1;
                self.batch_raw += record_len(block, continued) + 1;
                self.maybe_emit(out)
            }
            StreamEvent::RamPage {
                block,
                offset,
                continued,
                data,
            } => {
                self.on_page(block, offset, continued, data);
                self.batch_raw += record_len(block, continued) + PAGE_SIZE;
                self.maybe_emit(out)
            }
        };
        if let Err(e) = r {
            self.error = Some(e);
        }
    }

    fn on_opaque(&mut self, b: &[u8], out: &mut Vec<u8>) -> Result<(), EncodeStreamError> {
        for chunk in b.chunks(self.config.batch_bytes) {
            self.batch.push(ITEM_OPAQUE);
            put_varint(&mut self.batch, chunk.len() as u64);
            self.batch.extend_from_slice(chunk);
            self.batch_raw += chunk.len();
            self.stats.opaque_bytes += chunk.len() as u64;
            self.maybe_emit(out)?;
        }
        Ok(())
    }

    /// Wire index of a block, defining it on first use.
    fn block_index(&mut self, block: &RamBlock) -> u32 {
        if let Some(i) = self.blocks.iter().position(|b| *b == block.id) {
            return i as u32;
        }
        let i = self.blocks.len() as u32;
        self.blocks.push(block.id.clone());
        self.batch.push(ITEM_BLOCK);
        put_varint(&mut self.batch, block.length);
        self.batch.push(block.id.len() as u8);
        self.batch.extend_from_slice(block.id.as_bytes());
        if self.base.as_ref().is_some_and(|b| b.block() == block.id) {
            self.base_block = Some(i);
        }
        i
    }

    /// Write a RAM record item's tag, block and page; return its location.
    fn record_header(&mut self, block: &RamBlock, offset: u64, continued: bool, k: u8) -> Loc {
        let idx = if continued {
            // The parser only lets CONTINUE through after a record of this block.
            match self.cur_block {
                Some(i) => i,
                None => self.block_index(block),
            }
        } else {
            let i = self.block_index(block);
            self.cur_block = Some(i);
            i
        };
        let cont = if continued { ITEM_RAM_CONTINUE } else { 0 };
        self.batch.push(ITEM_RAM | cont | k);
        if !continued {
            put_varint(&mut self.batch, idx as u64);
        }
        let page = offset / PAGE_SIZE as u64;
        put_varint(&mut self.batch, page);
        (idx, page)
    }

    fn unindex(&mut self, loc: Loc) {
        if let Some(k) = self.loc_key.remove(&loc) {
            if self.index.get(&k) == Some(&Target::Stream(loc.0, loc.1)) {
                self.index.remove(&k);
            }
        }
    }

    fn on_page(&mut self, block: &RamBlock, offset: u64, continued: bool, data: &[u8; PAGE_SIZE]) {
        let is_base_block = self.base.as_ref().is_some_and(|b| b.block() == block.id);
        let base_page = if is_base_block {
            self.base.as_ref().and_then(|b| b.page(offset)).copied()
        } else {
            None
        };
        if base_page.as_ref() == Some(data) {
            let loc = self.record_header(block, offset, continued, kind::BASE);
            self.unindex(loc);
            self.stats.base_pages += 1;
            return;
        }
        let mut key = None;
        if self.config.dedup {
            let k = page_key(data);
            let in_base = self
                .base
                .as_ref()
                .and_then(|b| b.index().get(&k).copied())
                .map(Target::Base);
            match in_base.or_else(|| self.index.get(&k).copied()) {
                Some(Target::Base(p)) => {
                    let same = self
                        .base
                        .as_ref()
                        .and_then(|b| b.page(p * PAGE_SIZE as u64))
                        .is_some_and(|bp| bp == data);
                    if same {
                        let loc = self.record_header(block, offset, continued, kind::BASE_AT);
                        put_varint(&mut self.batch, p);
                        self.unindex(loc);
                        self.stats.base_other_pages += 1;
                        return;
                    }
                    // A truncated-hash collision with the base: keep it out of the index.
                }
                Some(Target::Stream(b, p)) => {
                    let loc = self.record_header(block, offset, continued, kind::DUP);
                    put_varint(&mut self.batch, b as u64);
                    put_varint(&mut self.batch, p);
                    if loc != (b, p) {
                        self.unindex(loc);
                    }
                    self.stats.dup_pages += 1;
                    return;
                }
                None => key = Some(k),
            }
        }
        // A novel page.
        let delta = self.policy.mode().delta;
        let mut xor = [0u8; PAGE_SIZE];
        let use_delta = match (&base_page, delta) {
            (Some(bp), true) => {
                xor_into(data, bp, &mut xor);
                delta_pays(data, &xor)
            }
            _ => false,
        };
        let k = if use_delta { kind::DELTA } else { kind::PLAIN };
        let loc = self.record_header(block, offset, continued, k);
        if use_delta {
            self.batch.extend_from_slice(&xor);
            self.batch_delta = true;
            self.stats.delta_pages += 1;
        } else {
            self.batch.extend_from_slice(data);
            self.stats.plain_pages += 1;
        }
        self.unindex(loc);
        if let Some(k) = key {
            self.index.insert(k, Target::Stream(loc.0, loc.1));
            self.loc_key.insert(loc, k);
        }
        if self.config.sample_pages > 0 {
            if self.recent.len() >= self.config.sample_pages {
                self.recent.pop_front();
            }
            self.recent
                .push_back((*data, base_page.is_some().then_some(offset)));
        }
    }

    fn maybe_emit(&mut self, out: &mut Vec<u8>) -> Result<(), EncodeStreamError> {
        if self.batch.len() >= self.config.batch_bytes
            || self.batch_raw >= self.config.batch_raw_bytes
        {
            self.emit_frame(out)?;
        }
        Ok(())
    }

    fn emit_frame(&mut self, out: &mut Vec<u8>) -> Result<(), EncodeStreamError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let mode = self.policy.mode();
        let mut codec = mode.codec;
        let mut scratch = std::mem::take(&mut self.scratch);
        self.compressor
            .compress(codec, &self.batch, &mut scratch)
            .map_err(|source| EncodeStreamError::Compress { codec, source })?;
        let payload: &[u8] = if codec != Codec::None && scratch.len() < self.batch.len() {
            &scratch
        } else {
            codec = Codec::None;
            &self.batch
        };
        let start = out.len();
        FrameHeader {
            kind: FRAME_ITEMS,
            codec: codec.id(),
            level: codec.level(),
            flags: if self.batch_delta {
                FRAME_FLAG_DELTA
            } else {
                0
            },
            seq: self.seq,
            raw_len: self.batch.len() as u32,
            wire_len: 0,
            crc: 0,
        }
        .write_frame(payload, out);
        self.scratch = scratch;
        self.seq += 1;
        self.stats.frames += 1;
        self.stats.wire_bytes += (out.len() - start) as u64;
        self.policy.account(self.batch_raw as u64);
        self.batch.clear();
        self.batch_raw = 0;
        self.batch_delta = false;
        self.adapt();
        Ok(())
    }

    /// Measure the candidates on recent novel pages when due, then decide.
    fn adapt(&mut self) {
        let now = Instant::now();
        if self.policy.wants_sample(now) && self.recent.len() >= self.config.sample_pages.min(16) {
            self.policy.sampled(now);
            self.stats.samples += 1;
            let mut plain = Vec::with_capacity(self.recent.len() * PAGE_SIZE);
            let mut delta = Vec::with_capacity(self.recent.len() * PAGE_SIZE);
            let mut xor = [0u8; PAGE_SIZE];
            for (page, off) in &self.recent {
                plain.extend_from_slice(page);
                let bp = off.and_then(|o| self.base.as_ref().and_then(|b| b.page(o)));
                match bp {
                    Some(bp) => {
                        xor_into(page, bp, &mut xor);
                        delta.extend_from_slice(if delta_pays(page, &xor) { &xor } else { page });
                    }
                    None => delta.extend_from_slice(page),
                }
            }
            let mut dst = Vec::new();
            for mode in self.policy.candidates() {
                let src = if mode.delta { &delta } else { &plain };
                if let Ok(t) = self.compressor.compress(mode.codec, src, &mut dst) {
                    self.policy.record(mode, src.len(), dst.len(), t);
                }
            }
        }
        self.policy.maybe_decide(now);
    }
}

/// Bytes of a RAM record header in the migration stream.
fn record_len(block: &RamBlock, continued: bool) -> usize {
    if continued {
        8
    } else {
        9 + block.id.len()
    }
}
