//! An incremental parser of QEMU's precopy migration stream (QEMU 7.2).
//!
//! The parser is fed arbitrary byte slices (records may be split anywhere) and
//! emits [`StreamEvent`]s. Concatenating the re-serialization of every event
//! ([`write_event`]) gives back the input byte for byte, whatever happens: that
//! is the one invariant the handoff codec rests on.
//!
//! # What the stream looks like
//!
//! ```text
//! be32 "QEVM"  be32 3
//! u8 0x07 configuration: be32 len, machine type, subsections (0x05 ...)
//! u8 0x08 command (optional, e.g. OPEN_RETURN_PATH): be16 cmd, be16 len, data
//! u8 0x01 START  be32 id, u8 len "ram", be32 instance, be32 version
//!     be64 total|MEM_SIZE, per block: u8 len, id, be64 length [, extra be64s]
//!     be64 EOS                                     footer: u8 0x7e, be32 id
//! u8 0x02 PART   be32 id   RAM records ... be64 EOS   footer   (repeated)
//! u8 0x03 END    be32 id   RAM records ... be64 EOS   footer
//! u8 0x04 FULL   device sections: no length, so from here on: passthrough
//! u8 0x00 EOF    u8 0x06 be32 len JSON VM description
//! ```
//!
//! A RAM record is `be64 (offset | flags)`; unless `CONTINUE` (0x20) is set a
//! length-prefixed ramblock id follows (the loader remembers the last block);
//! then `ZERO` (0x02) has one fill byte and `PAGE` (0x08) 4096 bytes.
//!
//! # Never wrong
//!
//! The parser recognises the RAM section and nothing else. The moment it sees
//! anything it does not fully understand (a non-RAM section, whose length is
//! unknown; an XBZRLE, compressed, multifd or RDMA record; an unknown section
//! type, command or configuration subsection; a page outside its block) it
//! switches to *passthrough*: every remaining byte is emitted as
//! [`StreamEvent::Opaque`]. The output stays byte-exact; it is only less
//! compact.

// The wire constants live in `cloudlet-qemu-format`, shared with the
// postcopy source of `cloudlet-qemu`; re-exported here as this module's
// public API has always had them.
use cloudlet_qemu_format::{command, RAM_FLAG_MASK as FLAG_MASK};
pub use cloudlet_qemu_format::{
    ram_flag, section, write_ram_header, PAGE_SIZE, QEMU_VM_FILE_MAGIC, QEMU_VM_FILE_VERSION,
};

/// Largest token the parser buffers (the MEM_SIZE block list is the biggest).
const MAX_TOKEN: usize = 256 * 1024;
/// Commands (id, data length) the parser steps over; any other command
/// switches it to passthrough.
const KNOWN_COMMANDS: [(u16, u16); 2] = [(command::OPEN_RETURN_PATH, 0), (command::PING, 4)];

/// A RAM block announced by the RAM section's MEM_SIZE record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamBlock {
    /// The ramblock id (`mem`, `pc.bios`, `/rom@etc/acpi/tables`, ...).
    pub id: String,
    /// Its used length in bytes.
    pub length: u64,
}

/// What the parser recognised in the stream.
#[derive(Debug, PartialEq, Eq)]
pub enum StreamEvent<'a> {
    /// A `PAGE` record: 4096 bytes of guest RAM at `offset` in `block`.
    RamPage {
        block: &'a RamBlock,
        offset: u64,
        /// The record had `CONTINUE` (no block id on the wire).
        continued: bool,
        data: &'a [u8; PAGE_SIZE],
    },
    /// A `ZERO` record: the page at `offset` is `fill` repeated (QEMU sends 0).
    RamZero {
        block: &'a RamBlock,
        offset: u64,
        continued: bool,
        fill: u8,
    },
    /// Bytes the parser does not interpret; to be passed through verbatim.
    Opaque(&'a [u8]),
}

/// Re-serialize one event exactly as it was in the stream.
pub fn write_event(ev: &StreamEvent<'_>, out: &mut Vec<u8>) {
    match ev {
        StreamEvent::RamPage {
            block,
            offset,
            continued,
            data,
        } => {
            write_ram_header(out, &block.id, *offset, ram_flag::PAGE, *continued);
            out.extend_from_slice(&data[..]);
        }
        StreamEvent::RamZero {
            block,
            offset,
            continued,
            fill,
        } => {
            write_ram_header(out, &block.id, *offset, ram_flag::ZERO, *continued);
            out.push(*fill);
        }
        StreamEvent::Opaque(b) => out.extend_from_slice(b),
    }
}

/// How far the parser got.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ParseSummary {
    /// Bytes consumed.
    pub bytes: u64,
    /// Page and zero records recognised.
    pub pages: u64,
    pub zero_pages: u64,
    /// Why the parser switched to passthrough, if it did.
    pub passthrough: Option<String>,
    /// The RAM section's END (with its footer) was seen: every RAM record of
    /// the stream has been parsed. What follows (device state) is passed
    /// through, so this is the normal "complete" mark of a real stream.
    pub ram_complete: bool,
    /// The stream was parsed to its very end (only when no device section
    /// forced passthrough, as in synthetic streams without devices).
    pub complete: bool,
    /// Bytes of an unfinished record held at the end (emitted as opaque).
    pub trailing_partial: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Header,
    /// After the header: configuration allowed.
    AfterHeader,
    /// Inside the configuration section: subsections or the next section.
    ConfigSub,
    /// Expecting a section type byte.
    Top,
    /// Inside a RAM section, expecting a RAM record.
    RamRecords,
    /// After a RAM EOS: the section footer.
    Footer,
    /// After QEMU_VM_EOF: the VM description.
    AfterEof,
    /// Streaming `remaining` bytes of the VM description JSON.
    VmDesc {
        remaining: u64,
    },
    /// The stream is over.
    Done,
    Passthrough,
}

/// A complete token at the head of the data.
enum Token {
    /// `len` bytes of opaque data.
    Opaque(usize),
    Page {
        block: usize,
        offset: u64,
        continued: bool,
        header: usize,
    },
    Zero {
        block: usize,
        offset: u64,
        continued: bool,
        header: usize,
    },
}

enum Step {
    /// Need at least this many bytes (counted from the token start).
    Need(usize),
    /// A token, with the state that follows it.
    Done(Token, State),
    /// The next byte belongs to another state: switch without consuming.
    Goto(State),
    /// Unexpected content: pass through everything from the token start.
    Unexpected(String),
}

/// The incremental migration-stream parser. See the module docs.
#[derive(Debug)]
pub struct StreamParser {
    state: State,
    /// A partial token carried over between `feed` calls.
    buf: Vec<u8>,
    /// Total length the partial token needs before it can be parsed again.
    need: usize,
    blocks: Vec<RamBlock>,
    cur_block: Option<usize>,
    ram_section: Option<u32>,
    ram_end: bool,
    ignore_shared: bool,
    summary: ParseSummary,
}

impl Default for StreamParser {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamParser {
    pub fn new() -> Self {
        StreamParser {
            state: State::Header,
            buf: Vec::new(),
            need: 0,
            blocks: Vec::new(),
            cur_block: None,
            ram_section: None,
            ram_end: false,
            ignore_shared: false,
            summary: ParseSummary::default(),
        }
    }

    /// The RAM blocks listed by the stream's MEM_SIZE record (empty before it).
    pub fn blocks(&self) -> &[RamBlock] {
        &self.blocks
    }

    /// Whether the parser gave up interpreting and passes everything through.
    pub fn is_passthrough(&self) -> bool {
        self.state == State::Passthrough
    }

    /// Whether the stream reached its end (the VM description was read).
    pub fn is_done(&self) -> bool {
        self.state == State::Done && self.buf.is_empty()
    }

    /// Parse `input`, calling `sink` for every event, in stream order.
    pub fn feed(&mut self, mut input: &[u8], sink: &mut impl FnMut(StreamEvent<'_>)) {
        while !input.is_empty() {
            match self.state {
                State::Passthrough => {
                    self.summary.bytes += input.len() as u64;
                    sink(StreamEvent::Opaque(input));
                    return;
                }
                State::VmDesc { remaining } => {
                    let n = remaining.min(input.len() as u64) as usize;
                    self.summary.bytes += n as u64;
                    sink(StreamEvent::Opaque(&input[..n]));
                    input = &input[n..];
                    let left = remaining - n as u64;
                    self.state = if left == 0 {
                        self.summary.complete = true;
                        State::Done
                    } else {
                        State::VmDesc { remaining: left }
                    };
                    continue;
                }
                State::Done => {
                    self.enter_passthrough("Data after the end of the stream".into());
                    continue;
                }
                _ => {}
            }
            if self.buf.is_empty() {
                match self.step(input) {
                    Step::Need(n) => {
                        if n > MAX_TOKEN {
                            self.enter_passthrough(format!("A record of {n} bytes is too large"));
                            continue;
                        }
                        self.buf.extend_from_slice(input);
                        self.need = n;
                        return;
                    }
                    Step::Done(tok, next) => {
                        let len = self.emit(input, tok, sink);
                        self.state = next;
                        input = &input[len..];
                    }
                    Step::Goto(s) => self.state = s,
                    Step::Unexpected(why) => self.enter_passthrough(why),
                }
            } else {
                let take = (self.need - self.buf.len()).min(input.len());
                self.buf.extend_from_slice(&input[..take]);
                input = &input[take..];
                if self.buf.len() < self.need {
                    return;
                }
                let buf = std::mem::take(&mut self.buf);
                match self.step(&buf) {
                    Step::Need(n) => {
                        self.buf = buf;
                        if n > MAX_TOKEN {
                            let why = format!("A record of {n} bytes is too large");
                            self.flush_buf_passthrough(why, sink);
                        } else {
                            self.need = n;
                        }
                    }
                    Step::Done(tok, next) => {
                        let len = self.emit(&buf, tok, sink);
                        self.state = next;
                        if len < buf.len() {
                            // A layout guess that needed more bytes than the token
                            // that matched: replay what follows the token.
                            self.feed(&buf[len..], sink);
                        } else {
                            self.buf = buf;
                            self.buf.clear();
                        }
                    }
                    Step::Goto(s) => {
                        // Only single-byte lookahead switches state; replay the buffer.
                        self.state = s;
                        self.feed(&buf, sink);
                    }
                    Step::Unexpected(why) => {
                        self.buf = buf;
                        self.flush_buf_passthrough(why, sink);
                    }
                }
            }
        }
    }

    /// End of input: emit any held partial record as opaque and report.
    pub fn finish(&mut self, sink: &mut impl FnMut(StreamEvent<'_>)) -> ParseSummary {
        if !self.buf.is_empty() {
            self.summary.trailing_partial = self.buf.len();
            self.flush_buf_passthrough("The stream ended inside a record".into(), sink);
        }
        self.summary.clone()
    }

    /// The summary so far.
    pub fn summary(&self) -> &ParseSummary {
        &self.summary
    }

    fn enter_passthrough(&mut self, why: String) {
        self.state = State::Passthrough;
        if self.summary.passthrough.is_none() {
            self.summary.passthrough = Some(why);
        }
    }

    fn flush_buf_passthrough(&mut self, why: String, sink: &mut impl FnMut(StreamEvent<'_>)) {
        self.enter_passthrough(why);
        let buf = std::mem::take(&mut self.buf);
        self.summary.bytes += buf.len() as u64;
        sink(StreamEvent::Opaque(&buf));
    }

    /// Emit the event for a complete token at the head of `data`; return its length.
    fn emit(&mut self, data: &[u8], tok: Token, sink: &mut impl FnMut(StreamEvent<'_>)) -> usize {
        let len = match tok {
            Token::Opaque(len) => {
                sink(StreamEvent::Opaque(&data[..len]));
                len
            }
            Token::Page {
                block,
                offset,
                continued,
                header,
            } => {
                let Some(page) = data
                    .get(header..header + PAGE_SIZE)
                    .and_then(|p| <&[u8; PAGE_SIZE]>::try_from(p).ok())
                else {
                    unreachable!("step() checked the page is complete")
                };
                self.cur_block = Some(block);
                self.summary.pages += 1;
                sink(StreamEvent::RamPage {
                    block: &self.blocks[block],
                    offset,
                    continued,
                    data: page,
                });
                header + PAGE_SIZE
            }
            Token::Zero {
                block,
                offset,
                continued,
                header,
            } => {
                self.cur_block = Some(block);
                self.summary.zero_pages += 1;
                sink(StreamEvent::RamZero {
                    block: &self.blocks[block],
                    offset,
                    continued,
                    fill: data[header],
                });
                header + 1
            }
        };
        self.summary.bytes += len as u64;
        len
    }

    /// Look at the head of `d` in the current state. Mutates only on `Done`.
    fn step(&mut self, d: &[u8]) -> Step {
        match self.state {
            State::Header => {
                if d.len() < 8 {
                    return Step::Need(8);
                }
                if be32(d, 0) != QEMU_VM_FILE_MAGIC || be32(d, 4) != QEMU_VM_FILE_VERSION {
                    return Step::Unexpected("Not a QEMU migration stream of version 3".into());
                }
                Step::Done(Token::Opaque(8), State::AfterHeader)
            }
            State::AfterHeader => {
                if d[0] == section::CONFIGURATION {
                    if d.len() < 5 {
                        return Step::Need(5);
                    }
                    let len = be32(d, 1) as usize;
                    if len > 256 {
                        return Step::Unexpected("Machine type name too long".into());
                    }
                    return Step::Done(Token::Opaque(5 + len), State::ConfigSub)
                        .need_at_least(d, 5 + len);
                }
                Step::Goto(State::Top)
            }
            State::ConfigSub => {
                if d[0] != section::SUBSECTION {
                    return Step::Goto(State::Top);
                }
                self.step_config_subsection(d)
            }
            State::Top => self.step_top(d),
            State::RamRecords => self.step_ram_record(d),
            State::Footer => {
                if d[0] != section::FOOTER {
                    return Step::Unexpected("No section footer after the RAM section".into());
                }
                if d.len() < 5 {
                    return Step::Need(5);
                }
                if Some(be32(d, 1)) != self.ram_section {
                    return Step::Unexpected("Section footer of another section".into());
                }
                if self.ram_end {
                    self.summary.ram_complete = true;
                }
                Step::Done(Token::Opaque(5), State::Top)
            }
            State::AfterEof => {
                if d[0] != section::VMDESCRIPTION {
                    return Step::Unexpected(format!("Byte {:#x} after EOF", d[0]));
                }
                if d.len() < 5 {
                    return Step::Need(5);
                }
                let len = be32(d, 1) as u64;
                if len == 0 {
                    self.summary.complete = true;
                    return Step::Done(Token::Opaque(5), State::Done);
                }
                Step::Done(Token::Opaque(5), State::VmDesc { remaining: len })
            }
            State::VmDesc { .. } | State::Done | State::Passthrough => {
                unreachable!("handled by feed()")
            }
        }
    }

    fn step_config_subsection(&mut self, d: &[u8]) -> Step {
        if d.len() < 2 {
            return Step::Need(2);
        }
        let idlen = d[1] as usize;
        let fields = 2 + idlen + 4;
        if d.len() < fields {
            return Step::Need(fields);
        }
        let name = &d[2..2 + idlen];
        match name {
            b"configuration/target-page-bits" => {
                if d.len() < fields + 4 {
                    return Step::Need(fields + 4);
                }
                if be32(d, fields) != 12 {
                    return Step::Unexpected("Target page size is not 4 KiB".into());
                }
                Step::Done(Token::Opaque(fields + 4), State::ConfigSub)
            }
            b"configuration/uuid" => Step::Done(Token::Opaque(fields + 16), State::ConfigSub)
                .need_at_least(d, fields + 16),
            b"configuration/capabilities" => {
                if d.len() < fields + 4 {
                    return Step::Need(fields + 4);
                }
                let count = be32(d, fields);
                if count > 64 {
                    return Step::Unexpected("Too many capabilities".into());
                }
                let mut pos = fields + 4;
                let mut ignore_shared = false;
                for _ in 0..count {
                    if d.len() < pos + 1 {
                        return Step::Need(pos + 1);
                    }
                    let l = d[pos] as usize;
                    if d.len() < pos + 1 + l {
                        return Step::Need(pos + 1 + l);
                    }
                    ignore_shared |= &d[pos + 1..pos + 1 + l] == b"x-ignore-shared";
                    pos += 1 + l;
                }
                self.ignore_shared = ignore_shared;
                Step::Done(Token::Opaque(pos), State::ConfigSub)
            }
            _ => Step::Unexpected(format!(
                "Unknown configuration subsection {:?}",
                String::from_utf8_lossy(name)
            )),
        }
    }

    fn step_top(&mut self, d: &[u8]) -> Step {
        match d[0] {
            section::START | section::FULL => {
                if d.len() < 6 {
                    return Step::Need(6);
                }
                let idlen = d[5] as usize;
                let len = 6 + idlen + 8;
                if d.len() < len {
                    return Step::Need(len);
                }
                let id = be32(d, 1);
                let name = &d[6..6 + idlen];
                if d[0] == section::START && name == b"ram" && self.ram_section.is_none() {
                    self.ram_section = Some(id);
                    return Step::Done(Token::Opaque(len), State::RamRecords);
                }
                Step::Unexpected(format!(
                    "Section {:?} (no length): passing the rest through",
                    String::from_utf8_lossy(name)
                ))
            }
            section::PART | section::END => {
                if d.len() < 5 {
                    return Step::Need(5);
                }
                if Some(be32(d, 1)) == self.ram_section && !self.blocks.is_empty() && !self.ram_end
                {
                    self.ram_end = d[0] == section::END;
                    return Step::Done(Token::Opaque(5), State::RamRecords);
                }
                Step::Unexpected("Iteration of a section other than RAM".into())
            }
            section::EOF => Step::Done(Token::Opaque(1), State::AfterEof),
            section::COMMAND => {
                if d.len() < 5 {
                    return Step::Need(5);
                }
                let cmd = u16::from_be_bytes([d[1], d[2]]);
                let len = u16::from_be_bytes([d[3], d[4]]);
                if !KNOWN_COMMANDS.contains(&(cmd, len)) {
                    return Step::Unexpected(format!("Command {cmd} of length {len}"));
                }
                Step::Done(Token::Opaque(5 + len as usize), State::Top)
                    .need_at_least(d, 5 + len as usize)
            }
            t => Step::Unexpected(format!("Section type {t:#x}")),
        }
    }

    fn step_ram_record(&mut self, d: &[u8]) -> Step {
        if d.len() < 8 {
            return Step::Need(8);
        }
        let v = be64(d, 0);
        let flags = v & FLAG_MASK;
        let offset = v & !FLAG_MASK;
        if flags == ram_flag::EOS && offset == 0 {
            return Step::Done(Token::Opaque(8), State::Footer);
        }
        if flags == ram_flag::MEM_SIZE {
            if !self.blocks.is_empty() {
                return Step::Unexpected("A second MEM_SIZE record".into());
            }
            return self.step_mem_size(d, offset);
        }
        let kind = flags & !ram_flag::CONTINUE;
        if kind != ram_flag::PAGE && kind != ram_flag::ZERO {
            return Step::Unexpected(format!("RAM record flags {flags:#x}"));
        }
        let continued = flags & ram_flag::CONTINUE != 0;
        let (block, header) = if continued {
            match self.cur_block {
                Some(b) => (b, 8),
                None => return Step::Unexpected("CONTINUE before any block".into()),
            }
        } else {
            if d.len() < 9 {
                return Step::Need(9);
            }
            let l = d[8] as usize;
            if d.len() < 9 + l {
                return Step::Need(9 + l);
            }
            let name = &d[9..9 + l];
            match self.blocks.iter().position(|b| b.id.as_bytes() == name) {
                Some(b) => (b, 9 + l),
                None => {
                    return Step::Unexpected(format!(
                        "Page of unknown ramblock {:?}",
                        String::from_utf8_lossy(name)
                    ))
                }
            }
        };
        if offset + PAGE_SIZE as u64 > self.blocks[block].length {
            return Step::Unexpected(format!(
                "Page {offset:#x} beyond the end of ramblock {}",
                self.blocks[block].id
            ));
        }
        if kind == ram_flag::PAGE {
            if d.len() < header + PAGE_SIZE {
                return Step::Need(header + PAGE_SIZE);
            }
            Step::Done(
                Token::Page {
                    block,
                    offset,
                    continued,
                    header,
                },
                State::RamRecords,
            )
        } else {
            if d.len() < header + 1 {
                return Step::Need(header + 1);
            }
            Step::Done(
                Token::Zero {
                    block,
                    offset,
                    continued,
                    header,
                },
                State::RamRecords,
            )
        }
    }

    /// The MEM_SIZE record, its block list, the setup EOS and the footer, as
    /// one token. The per-block fields depend on capabilities the stream does
    /// not fully state (`x-ignore-shared` adds the block address; postcopy on
    /// huge pages adds the page size), so each layout is tried, the one the
    /// configuration suggests first, and only a layout that ends exactly on
    /// `EOS` + footer is accepted.
    fn step_mem_size(&mut self, d: &[u8], total: u64) -> Step {
        let order: [usize; 3] = if self.ignore_shared {
            [1, 0, 2]
        } else {
            [0, 1, 2]
        };
        for extra in order {
            match parse_block_list(d, total, extra, self.ram_section) {
                BlockList::Invalid => continue,
                BlockList::Need(n) => return Step::Need(n),
                BlockList::Ok(len, blocks) => {
                    self.blocks = blocks;
                    return Step::Done(Token::Opaque(len), State::Top);
                }
            }
        }
        Step::Unexpected("MEM_SIZE block list in an unknown layout".into())
    }
}

trait NeedAtLeast {
    fn need_at_least(self, d: &[u8], n: usize) -> Step;
}

impl NeedAtLeast for Step {
    fn need_at_least(self, d: &[u8], n: usize) -> Step {
        if d.len() < n {
            Step::Need(n)
        } else {
            self
        }
    }
}

enum BlockList {
    Invalid,
    Need(usize),
    Ok(usize, Vec<RamBlock>),
}

fn parse_block_list(d: &[u8], total: u64, extra: usize, section: Option<u32>) -> BlockList {
    let mut pos = 8;
    let mut remaining = total;
    let mut blocks = Vec::new();
    while remaining > 0 {
        if d.len() < pos + 1 {
            return BlockList::Need(pos + 1);
        }
        let l = d[pos] as usize;
        let end = pos + 1 + l + 8 + 8 * extra;
        if d.len() < end {
            return BlockList::Need(end);
        }
        let Ok(id) = std::str::from_utf8(&d[pos + 1..pos + 1 + l]) else {
            return BlockList::Invalid;
        };
        let length = be64(d, pos + 1 + l);
        if length > remaining || length == 0 || blocks.len() > 4096 {
            return BlockList::Invalid;
        }
        blocks.push(RamBlock {
            id: id.to_string(),
            length,
        });
        remaining -= length;
        pos = end;
    }
    if d.len() < pos + 13 {
        return BlockList::Need(pos + 13);
    }
    if be64(d, pos) != ram_flag::EOS
        || d[pos + 8] != section::FOOTER
        || Some(be32(d, pos + 9)) != section
    {
        return BlockList::Invalid;
    }
    BlockList::Ok(pos + 13, blocks)
}

fn be32(d: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([d[at], d[at + 1], d[at + 2], d[at + 3]])
}

fn be64(d: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[at..at + 8]);
    u64::from_be_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::{SynthOptions, SynthStream};
    use proptest::prelude::*;

    fn reserialize(input: &[u8], chunks: &[usize]) -> (Vec<u8>, ParseSummary) {
        let mut p = StreamParser::new();
        let mut out = Vec::new();
        let mut rest = input;
        let mut i = 0;
        while !rest.is_empty() {
            let n = chunks.get(i).copied().unwrap_or(4096).clamp(1, rest.len());
            i += 1;
            p.feed(&rest[..n], &mut |ev| write_event(&ev, &mut out));
            rest = &rest[n..];
        }
        let s = p.finish(&mut |ev| write_event(&ev, &mut out));
        (out, s)
    }

    #[test]
    fn synthetic_stream_is_understood_and_byte_exact() {
        let s = SynthStream::generate(&SynthOptions::default(), 7);
        let (out, sum) = reserialize(&s.bytes, &[1, 2, 3, 5000, 7, 13]);
        assert_eq!(out, s.bytes);
        assert!(sum.passthrough.unwrap().contains("virtio-net"));
        assert!(sum.ram_complete);
        assert_eq!(sum.pages, s.pages);
        assert_eq!(sum.zero_pages, s.zero_pages);
    }

    #[test]
    fn xbzrle_record_switches_to_passthrough() {
        let opts = SynthOptions {
            xbzrle_at: Some(3),
            ..SynthOptions::default()
        };
        let s = SynthStream::generate(&opts, 1);
        let (out, sum) = reserialize(&s.bytes, &[17]);
        assert_eq!(out, s.bytes);
        assert!(sum.passthrough.unwrap().contains("0x40"));
        assert!(!sum.ram_complete);
    }

    #[test]
    fn stream_without_devices_is_parsed_to_its_end() {
        let opts = SynthOptions {
            device_bytes: 0,
            ..SynthOptions::small()
        };
        let s = SynthStream::generate(&opts, 3);
        let (out, sum) = reserialize(&s.bytes, &[1]);
        assert_eq!(out, s.bytes);
        assert_eq!(sum.passthrough, None);
        assert!(sum.complete && sum.ram_complete);
    }

    #[test]
    fn ignore_shared_block_list_is_understood() {
        let opts = SynthOptions {
            ignore_shared: true,
            ..SynthOptions::small()
        };
        let s = SynthStream::generate(&opts, 4);
        let (out, sum) = reserialize(&s.bytes, &[100]);
        assert_eq!(out, s.bytes);
        assert!(sum.ram_complete);
        assert_eq!(sum.pages, s.pages);
    }

    #[test]
    fn not_a_stream_passes_through() {
        let (out, sum) = reserialize(b"hello world, not qemu", &[3]);
        assert_eq!(out, b"hello world, not qemu");
        assert!(sum.passthrough.is_some());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn any_chunking_is_byte_exact(seed in any::<u64>(), chunks in proptest::collection::vec(1usize..9000, 1..64)) {
            let s = SynthStream::generate(&SynthOptions::default(), seed);
            let (out, sum) = reserialize(&s.bytes, &chunks);
            prop_assert_eq!(&out, &s.bytes);
            prop_assert!(sum.ram_complete);
            prop_assert!(sum.passthrough.unwrap().contains("virtio-net"));
        }

        #[test]
        fn garbage_never_panics_and_is_byte_exact(data in proptest::collection::vec(any::<u8>(), 0..20000), chunks in proptest::collection::vec(1usize..3000, 1..16)) {
            let (out, _) = reserialize(&data, &chunks);
            prop_assert_eq!(out, data);
        }

        #[test]
        fn mutated_streams_are_byte_exact(seed in any::<u64>(), muts in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8), chunk in 1usize..5000) {
            let s = SynthStream::generate(&SynthOptions::small(), seed);
            let mut data = s.bytes.clone();
            for (at, b) in muts {
                let i = at % data.len();
                data[i] = b;
            }
            let (out, _) = reserialize(&data, &[chunk; 64]);
            prop_assert_eq!(out, data);
        }
    }
}
