//! Early start: restore a saved VM whose memory has not fully arrived yet.
//!
//! The daemon plays the *source* of a QEMU 7.2 postcopy migration. The
//! destination QEMU (`-incoming`, capability `postcopy-ram`) gets the device
//! state at once and starts the guest; every page the guest touches before we
//! sent it traps in the destination (userfaultfd) and comes back to us as a
//! page request on the return path. Meanwhile we push the other pages in
//! the background as they become ready. The memory itself comes from a
//! [`PageSource`] (for synthesis: the overlay being applied).
//!
//! # What we send (QEMU 7.2 stream, all integers big-endian)
//!
//! ```text
//! "QEVM" 3                       header
//! 0x07 configuration            machine type only (the saved state's
//!                               x-ignore-shared capability list is dropped:
//!                               the destination runs without it)
//! 0x08 OPEN_RETURN_PATH (1)     the destination answers on the same socket
//! 0x08 POSTCOPY_ADVISE (3)      be64 page size summary, be64 target page size
//! 0x01 START "ram"              MEM_SIZE record and the block list, without
//!                               the per-block addresses of x-ignore-shared
//! 0x02 PART "ram"               the saved state's own page records (ROMs,
//!                               video RAM: every block but the main one)
//! 0x08 POSTCOPY_RAM_DISCARD (6) u8 0, u8 n, block id, u8 0, be64 start,
//!                               be64 length: one empty page of the main
//!                               block, so that QEMU enters its DISCARD state
//! 0x08 PACKAGED (7)             be32 length, then a nested stream:
//!        0x08 POSTCOPY_LISTEN (4)  destination registers its RAM (uffd)
//!        0x04 FULL ...             the saved device sections, verbatim
//!        0x08 POSTCOPY_RUN (5)     the guest starts
//! 0x02 PART "ram" ...           main-block pages: requested ones first,
//!                               the rest in the background, each exactly
//!                               once (a second copy would fail UFFDIO_COPY)
//! 0x03 END "ram", EOS, 0x00 EOF  then the destination completes
//! ```
//!
//! Return path messages (be16 type, be16 length, data): 1 SHUT (be32),
//! 2 PONG (be32), 3 REQ_PAGES_ID (be64 offset, be32 length, u8 n, block id),
//! 4 REQ_PAGES (be64 offset, be32 length; the block of the last request).
//!
//! Pages that are zero in the launch memory are not pushed: the destination
//! discarded its RAM at ADVISE, so a page never placed reads as zero once
//! postcopy ends. A zero page the guest asks for is sent as a ZERO record.

use std::collections::VecDeque;
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The page size of x86 guests and of this host.
pub const PAGE: usize = 4096;

// The stream's wire constants, as `cloudlet_handoff::stream` has them too:
// that crate is the pure codec (no QEMU, no runtime) and this one spawns
// QEMU; neither should depend on the other for a dozen constants.
const MAGIC: u32 = 0x5145_564d;
const VERSION: u32 = 3;

mod section {
    pub const EOF: u8 = 0x00;
    pub const START: u8 = 0x01;
    pub const PART: u8 = 0x02;
    pub const END: u8 = 0x03;
    pub const FULL: u8 = 0x04;
    pub const SUBSECTION: u8 = 0x05;
    pub const VMDESCRIPTION: u8 = 0x06;
    pub const CONFIGURATION: u8 = 0x07;
    pub const COMMAND: u8 = 0x08;
    pub const FOOTER: u8 = 0x7e;
}

mod flag {
    pub const ZERO: u64 = 0x02;
    pub const MEM_SIZE: u64 = 0x04;
    pub const PAGE: u64 = 0x08;
    pub const EOS: u64 = 0x10;
    pub const CONTINUE: u64 = 0x20;
}

mod cmd {
    pub const OPEN_RETURN_PATH: u16 = 1;
    pub const POSTCOPY_ADVISE: u16 = 3;
    pub const POSTCOPY_LISTEN: u16 = 4;
    pub const POSTCOPY_RUN: u16 = 5;
    pub const POSTCOPY_RAM_DISCARD: u16 = 6;
    pub const PACKAGED: u16 = 7;
}

mod rp {
    pub const SHUT: u16 = 1;
    pub const REQ_PAGES_ID: u16 = 3;
    pub const REQ_PAGES: u16 = 4;
}

/// Why a saved device state cannot seed a postcopy restore.
#[derive(Debug, thiserror::Error)]
pub enum ParseSavedStateError {
    #[error("Saved device state truncated at byte {0}")]
    Truncated(usize),
    #[error("Not a QEMU migration stream (magic/version)")]
    Header,
    #[error("Unsupported content at byte {at}: {what}")]
    Unsupported { at: usize, what: String },
    #[error("The saved state has no RAM block {0:?}")]
    NoMainBlock(String),
}

/// Why a postcopy restore failed.
#[derive(Debug, thiserror::Error)]
pub enum PostcopyError {
    #[error("Postcopy stream to QEMU failed: {0}")]
    Io(#[from] io::Error),
    #[error("The page source failed for page {page}: {detail}")]
    Source { page: u64, detail: String },
    #[error("QEMU asked for {offset:#x}+{len:#x} of unknown RAM block {block:?}")]
    BadRequest {
        block: String,
        offset: u64,
        len: u32,
    },
    #[error("Before the guest could start: {0}")]
    BeforeRun(String),
    #[error("The postcopy restore was cancelled")]
    Cancelled,
}

/// A RAM block of the saved VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamBlock {
    pub id: String,
    pub length: u64,
}

/// A saved device state (QEMU stream written with `x-ignore-shared`), cut
/// into the parts a postcopy source sends.
#[derive(Debug, Clone)]
pub struct SavedState {
    machine: Vec<u8>,
    ram_section: u32,
    ram_instance: u32,
    ram_version: u32,
    footers: bool,
    blocks: Vec<RamBlock>,
    main: usize,
    /// Page records of the other blocks (each with its block id).
    other_pages: Vec<u8>,
    /// Device sections (FULL ...), without the final EOF.
    devices: Vec<u8>,
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ParseSavedStateError> {
        if self.b.len() - self.at < n {
            return Err(ParseSavedStateError::Truncated(self.at));
        }
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, ParseSavedStateError> {
        Ok(self.take(1)?[0])
    }
    fn be32(&mut self) -> Result<u32, ParseSavedStateError> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().unwrap_or([0; 4]),
        ))
    }
    fn be64(&mut self) -> Result<u64, ParseSavedStateError> {
        Ok(u64::from_be_bytes(
            self.take(8)?.try_into().unwrap_or([0; 8]),
        ))
    }
    fn counted(&mut self) -> Result<String, ParseSavedStateError> {
        let n = self.u8()? as usize;
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }
    fn peek(&self) -> Option<u8> {
        self.b.get(self.at).copied()
    }
    fn unsupported(&self, what: impl Into<String>) -> ParseSavedStateError {
        ParseSavedStateError::Unsupported {
            at: self.at,
            what: what.into(),
        }
    }
}

impl SavedState {
    /// Parse a device state saved with `x-ignore-shared`, whose guest RAM
    /// lives in block `main` (our VMs: `mem`).
    pub fn parse(bytes: &[u8], main: &str) -> Result<SavedState, ParseSavedStateError> {
        let mut r = Reader { b: bytes, at: 0 };
        if r.be32()? != MAGIC || r.be32()? != VERSION {
            return Err(ParseSavedStateError::Header);
        }
        if r.u8()? != section::CONFIGURATION {
            return Err(r.unsupported("no configuration section"));
        }
        let n = r.be32()? as usize;
        let machine = r.take(n)?.to_vec();
        while r.peek() == Some(section::SUBSECTION) {
            r.u8()?;
            let name = r.counted()?;
            let _version = r.be32()?;
            match name.as_str() {
                "configuration/capabilities" => {
                    for _ in 0..r.be32()? {
                        r.counted()?;
                    }
                }
                "configuration/uuid" => {
                    r.take(16)?;
                }
                other => return Err(r.unsupported(format!("configuration subsection {other}"))),
            }
        }
        let mut st = SavedState {
            machine,
            ram_section: 0,
            ram_instance: 0,
            ram_version: 0,
            footers: false,
            blocks: Vec::new(),
            main: usize::MAX,
            other_pages: Vec::new(),
            devices: Vec::new(),
        };
        let mut seen_ram = false;
        loop {
            let at = r.at;
            match r.u8()? {
                section::START => {
                    let id = r.be32()?;
                    let name = r.counted()?;
                    if name != "ram" || seen_ram {
                        return Err(r.unsupported(format!("iterable section {name}")));
                    }
                    seen_ram = true;
                    st.ram_section = id;
                    st.ram_instance = r.be32()?;
                    st.ram_version = r.be32()?;
                    let total = r.be64()?;
                    if total & flag::MEM_SIZE == 0 {
                        return Err(r.unsupported("RAM setup without MEM_SIZE"));
                    }
                    let total = total & !(PAGE as u64 - 1);
                    let mut sum = 0u64;
                    while sum < total {
                        let id = r.counted()?;
                        let length = r.be64()?;
                        let _addr = r.be64()?; // x-ignore-shared: block address
                        sum += length;
                        st.blocks.push(RamBlock { id, length });
                    }
                    if r.be64()? != flag::EOS {
                        return Err(r.unsupported("RAM setup not ended by EOS"));
                    }
                    st.footers = r.peek() == Some(section::FOOTER);
                    st.footer(&mut r, id)?;
                    st.main = st
                        .blocks
                        .iter()
                        .position(|b| b.id == main)
                        .ok_or_else(|| ParseSavedStateError::NoMainBlock(main.into()))?;
                }
                section::PART | section::END => {
                    let id = r.be32()?;
                    if !seen_ram || id != st.ram_section {
                        return Err(r.unsupported(format!("section {id}")));
                    }
                    st.ram_records(&mut r)?;
                    st.footer(&mut r, id)?;
                }
                section::FULL => {
                    st.devices = devices(bytes, at)?.to_vec();
                    break;
                }
                t => return Err(r.unsupported(format!("section type {t:#x}"))),
            }
        }
        if !seen_ram {
            return Err(ParseSavedStateError::NoMainBlock(main.into()));
        }
        Ok(st)
    }

    fn footer(&self, r: &mut Reader<'_>, id: u32) -> Result<(), ParseSavedStateError> {
        if self.footers && (r.u8()? != section::FOOTER || r.be32()? != id) {
            return Err(r.unsupported("bad section footer"));
        }
        Ok(())
    }

    /// Copy page records of the non-main blocks (re-encoded with explicit
    /// block ids) until EOS.
    fn ram_records(&mut self, r: &mut Reader<'_>) -> Result<(), ParseSavedStateError> {
        let mut block: Option<usize> = None;
        loop {
            let word = r.be64()?;
            let flags = word & (PAGE as u64 - 1);
            let offset = word & !(PAGE as u64 - 1);
            if flags == flag::EOS {
                return Ok(());
            }
            if flags & flag::CONTINUE == 0 {
                let id = r.counted()?;
                block = Some(
                    self.blocks
                        .iter()
                        .position(|b| b.id == id)
                        .ok_or_else(|| r.unsupported(format!("RAM block {id}")))?,
                );
            }
            let b = block.ok_or_else(|| r.unsupported("CONTINUE without a block"))?;
            if b == self.main {
                return Err(r.unsupported("pages of the shared main block"));
            }
            let id = self.blocks[b].id.clone();
            match flags & !flag::CONTINUE {
                flag::ZERO => {
                    let fill = r.u8()?;
                    put_record(&mut self.other_pages, &id, offset, flag::ZERO, false);
                    self.other_pages.push(fill);
                }
                flag::PAGE => {
                    let data = r.take(PAGE)?;
                    put_record(&mut self.other_pages, &id, offset, flag::PAGE, false);
                    self.other_pages.extend_from_slice(data);
                }
                f => return Err(r.unsupported(format!("RAM record flags {f:#x}"))),
            }
        }
    }

    /// The RAM blocks, as the saved VM had them.
    pub fn blocks(&self) -> &[RamBlock] {
        &self.blocks
    }

    /// Size of the main RAM block in bytes.
    pub fn main_len(&self) -> u64 {
        self.blocks[self.main].length
    }

    fn section_header(&self, out: &mut Vec<u8>, kind: u8) {
        out.push(kind);
        out.extend_from_slice(&self.ram_section.to_be_bytes());
        if kind == section::START {
            out.push(3);
            out.extend_from_slice(b"ram");
            out.extend_from_slice(&self.ram_instance.to_be_bytes());
            out.extend_from_slice(&self.ram_version.to_be_bytes());
        }
    }

    fn section_footer(&self, out: &mut Vec<u8>) {
        if self.footers {
            out.push(section::FOOTER);
            out.extend_from_slice(&self.ram_section.to_be_bytes());
        }
    }

    /// Everything before the guest may run: header, configuration, return
    /// path, advise, RAM setup and the small blocks' pages.
    fn preamble(&self) -> Vec<u8> {
        let mut o = Vec::with_capacity(self.other_pages.len() + 4096);
        o.extend_from_slice(&MAGIC.to_be_bytes());
        o.extend_from_slice(&VERSION.to_be_bytes());
        o.push(section::CONFIGURATION);
        o.extend_from_slice(&(self.machine.len() as u32).to_be_bytes());
        o.extend_from_slice(&self.machine);
        command(&mut o, cmd::OPEN_RETURN_PATH, &[]);
        let mut advise = Vec::new();
        advise.extend_from_slice(&(PAGE as u64).to_be_bytes());
        advise.extend_from_slice(&(PAGE as u64).to_be_bytes());
        command(&mut o, cmd::POSTCOPY_ADVISE, &advise);
        self.section_header(&mut o, section::START);
        let total: u64 = self.blocks.iter().map(|b| b.length).sum();
        o.extend_from_slice(&(total | flag::MEM_SIZE).to_be_bytes());
        for b in &self.blocks {
            o.push(b.id.len() as u8);
            o.extend_from_slice(b.id.as_bytes());
            o.extend_from_slice(&b.length.to_be_bytes());
        }
        o.extend_from_slice(&flag::EOS.to_be_bytes());
        self.section_footer(&mut o);
        if !self.other_pages.is_empty() {
            self.section_header(&mut o, section::PART);
            o.extend_from_slice(&self.other_pages);
            o.extend_from_slice(&flag::EOS.to_be_bytes());
            self.section_footer(&mut o);
        }
        // One discard (of the main block's first page, which is empty
        // anyway) moves QEMU 7.2 into its DISCARD state. Without it, LISTEN
        // runs the "first discard" setup itself, which sets the state back
        // from LISTENING to DISCARD: the listen thread then loads pages
        // the precopy way (memcpy into registered RAM) and hangs.
        let main = self.blocks[self.main].id.as_bytes();
        let mut d = vec![0u8, main.len() as u8];
        d.extend_from_slice(main);
        d.push(0);
        d.extend_from_slice(&0u64.to_be_bytes());
        d.extend_from_slice(&(PAGE as u64).to_be_bytes());
        command(&mut o, cmd::POSTCOPY_RAM_DISCARD, &d);
        o
    }

    /// LISTEN, the device sections and RUN, wrapped in PACKAGED.
    fn packaged(&self) -> Vec<u8> {
        let mut inner = Vec::with_capacity(self.devices.len() + 16);
        command(&mut inner, cmd::POSTCOPY_LISTEN, &[]);
        inner.extend_from_slice(&self.devices);
        command(&mut inner, cmd::POSTCOPY_RUN, &[]);
        let mut o = Vec::with_capacity(inner.len() + 16);
        command(&mut o, cmd::PACKAGED, &(inner.len() as u32).to_be_bytes());
        o.extend_from_slice(&inner);
        o
    }
}

/// The device sections: from `start` (the first FULL section) to the EOF
/// marker, which is followed by the JSON VM description (or ends the data).
fn devices(bytes: &[u8], start: usize) -> Result<&[u8], ParseSavedStateError> {
    let n = bytes.len();
    // EOF, 0x06, be32 length, JSON of exactly that length to the end.
    let mut p = n.saturating_sub(6);
    while p > start {
        if bytes[p] == section::EOF && bytes[p + 1] == section::VMDESCRIPTION {
            let len = u32::from_be_bytes([bytes[p + 2], bytes[p + 3], bytes[p + 4], bytes[p + 5]]);
            if p + 6 + len as usize == n {
                return Ok(&bytes[start..p]);
            }
        }
        p -= 1;
    }
    if n > start && bytes[n - 1] == section::EOF {
        return Ok(&bytes[start..n - 1]);
    }
    Err(ParseSavedStateError::Unsupported {
        at: start,
        what: "device state does not end with EOF".into(),
    })
}

fn command(out: &mut Vec<u8>, cmd: u16, data: &[u8]) {
    out.push(section::COMMAND);
    out.extend_from_slice(&cmd.to_be_bytes());
    out.extend_from_slice(&(data.len() as u16).to_be_bytes());
    out.extend_from_slice(data);
}

fn put_record(out: &mut Vec<u8>, block: &str, offset: u64, kind: u64, continued: bool) {
    let c = if continued { flag::CONTINUE } else { 0 };
    out.extend_from_slice(&(offset | kind | c).to_be_bytes());
    if !continued {
        out.push(block.len() as u8);
        out.extend_from_slice(block.as_bytes());
    }
}

/// Where the main block's pages come from.
pub trait PageSource: Send + Sync {
    /// Copy page `page` of the launch memory into `buf` if it is final
    /// (`Ok(true)`), or say that it has not arrived yet (`Ok(false)`).
    fn read_page(&self, page: u64, buf: &mut [u8; PAGE]) -> io::Result<bool>;
    /// The guest is waiting for `page`: fetch what holds it first.
    fn demand(&self, page: u64);
}

/// What a postcopy restore did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PostcopyStats {
    /// Main-block pages sent with data.
    pub pages_sent: u64,
    /// Zero pages sent because the guest asked for them.
    pub zero_pages_sent: u64,
    /// Zero pages not sent at all.
    pub zero_pages_skipped: u64,
    /// Pages the guest asked for (faults that reached us).
    pub requests: u64,
    /// Of those, the ones that had to wait for their data to arrive.
    pub requests_waited: u64,
    /// Longest wait of a requested page, in milliseconds.
    pub max_wait_ms: u64,
    /// From the start to the guest's start (RUN sent), in milliseconds.
    pub run_ms: u64,
    /// From the start to the last page sent, in milliseconds.
    pub done_ms: u64,
}

/// Shared progress of a running postcopy restore (for status displays).
#[derive(Debug, Default)]
pub struct PostcopyProgress {
    pub pages_sent: AtomicU64,
    pub requests: AtomicU64,
    pub running: AtomicBool,
}

/// Pages pushed per PART section in the background.
const BATCH: usize = 64;

/// Serve a postcopy restore over `stream` (connected to the destination
/// QEMU's incoming socket). `before_run` runs after the RAM setup was sent
/// and before the device state and RUN: the guest must not start before it
/// returns (the launch disk must be complete). `guest_started` must be set
/// by the caller once QEMU reports the guest running (`query-status`): QEMU
/// loads the device state with its main thread, which may fault on a zero
/// page we skipped, and the end of the stream must not come before that
/// thread is done (QEMU 7.2 would wait for it while it waits for the page).
/// Returns when every page has been sent and QEMU closed its return path
/// (or `cancel` was set).
pub fn serve(
    stream: UnixStream,
    state: &SavedState,
    pages: &dyn PageSource,
    before_run: impl FnOnce() -> Result<(), String>,
    guest_started: &AtomicBool,
    progress: &PostcopyProgress,
    cancel: &AtomicBool,
) -> Result<PostcopyStats, PostcopyError> {
    let started = Instant::now();
    let mut stats = PostcopyStats::default();
    let reader = stream.try_clone()?;
    let (req_tx, req_rx) = mpsc::channel::<Request>();
    let rp = std::thread::Builder::new()
        .name("postcopy-rp".into())
        .spawn({
            let blocks = state.blocks.clone();
            move || return_path(reader, &blocks, req_tx)
        })?;
    let mut out = BufWriter::with_capacity(1 << 20, stream);
    out.write_all(&state.preamble())?;
    out.flush()?;
    before_run().map_err(PostcopyError::BeforeRun)?;
    out.write_all(&state.packaged())?;
    out.flush()?;
    stats.run_ms = started.elapsed().as_millis() as u64;
    progress.running.store(true, Ordering::Relaxed);

    let npages = state.main_len() / PAGE as u64;
    let main_id = state.blocks[state.main].id.clone();
    // Per page: NOT_SENT, PLACED, or SKIPPED (zero, left for QEMU to read
    // from its discarded RAM unless the guest asks for it).
    let mut sent = vec![NOT_SENT; npages as usize];
    let mut buf = Box::new([0u8; PAGE]);
    // Requested pages not ready yet, with when they were asked for.
    let mut waiting: VecDeque<(u64, Instant)> = VecDeque::new();
    // Background pages found not ready, to retry later.
    let mut deferred: Vec<u64> = Vec::new();
    let mut cursor = 0u64;
    let mut sec = Section::default();
    let mut left = npages;
    let mut rp_closed = false;
    // A request that woke the idle wait, handled first in the next round.
    let mut parked: Option<Request> = None;
    while left > 0 || !guest_started.load(Ordering::Acquire) {
        if cancel.load(Ordering::Relaxed) {
            return Err(PostcopyError::Cancelled);
        }
        // 1. What the guest asked for.
        let mut zero_now = false;
        loop {
            let next = match parked.take() {
                Some(r) => Ok(r),
                None => req_rx.try_recv(),
            };
            match next {
                Ok(Request::Pages { block, offset, len }) => {
                    if block != state.main {
                        // The small blocks were sent before LISTEN; the only
                        // pages QEMU can miss there are ones the saved state
                        // did not carry, which are zero.
                        sec.zero(&mut out, state, &state.blocks[block].id, offset)?;
                        continue;
                    }
                    let first = offset / PAGE as u64;
                    let n = (len as u64).div_ceil(PAGE as u64).max(1);
                    for p in first..(first + n).min(npages) {
                        stats.requests += 1;
                        progress.requests.fetch_add(1, Ordering::Relaxed);
                        match sent[p as usize] {
                            NOT_SENT => waiting.push_back((p, Instant::now())),
                            SKIPPED => {
                                sec.zero(&mut out, state, &main_id, p * PAGE as u64)?;
                                sent[p as usize] = PLACED;
                                stats.zero_pages_sent += 1;
                                zero_now = true;
                            }
                            _ => {}
                        }
                    }
                }
                Ok(Request::Bad { block, offset, len }) => {
                    return Err(PostcopyError::BadRequest { block, offset, len });
                }
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    rp_closed = true;
                    break;
                }
            }
        }
        let mut did = 0usize;
        let mut i = 0;
        while i < waiting.len() {
            let (p, since) = waiting[i];
            match sent[p as usize] {
                PLACED => {
                    waiting.remove(i);
                    continue;
                }
                SKIPPED => {
                    // The background push found it zero meanwhile.
                    sec.zero(&mut out, state, &main_id, p * PAGE as u64)?;
                    sent[p as usize] = PLACED;
                    stats.zero_pages_sent += 1;
                    did += 1;
                    waiting.remove(i);
                    continue;
                }
                _ => {}
            }
            if let Some(s) = send_page(
                &mut sec, &mut out, state, &main_id, pages, p, &mut buf, true, &mut stats,
            )? {
                sent[p as usize] = s;
                left -= 1;
                did += 1;
                let waited = since.elapsed();
                if waited > Duration::from_millis(1) {
                    stats.requests_waited += 1;
                }
                stats.max_wait_ms = stats.max_wait_ms.max(waited.as_millis() as u64);
                waiting.remove(i);
            } else {
                pages.demand(p);
                i += 1;
            }
        }
        if did > 0 || zero_now {
            sec.close(&mut out, state)?;
            out.flush()?;
        }
        // 2. The background push, a batch at a time.
        let mut batch = 0;
        while batch < BATCH && cursor < npages {
            let p = cursor;
            cursor += 1;
            if sent[p as usize] != NOT_SENT {
                continue;
            }
            match send_page(
                &mut sec, &mut out, state, &main_id, pages, p, &mut buf, false, &mut stats,
            )? {
                Some(s) => {
                    sent[p as usize] = s;
                    left -= 1;
                    batch += 1;
                }
                None => deferred.push(p),
            }
        }
        if cursor >= npages && !deferred.is_empty() && batch < BATCH {
            let mut keep = Vec::new();
            for p in std::mem::take(&mut deferred) {
                if sent[p as usize] != NOT_SENT {
                    continue;
                }
                let s = if batch < BATCH {
                    send_page(
                        &mut sec, &mut out, state, &main_id, pages, p, &mut buf, false, &mut stats,
                    )?
                } else {
                    None
                };
                match s {
                    Some(s) => {
                        sent[p as usize] = s;
                        left -= 1;
                        batch += 1;
                    }
                    None => keep.push(p),
                }
            }
            deferred = keep;
        }
        if batch > 0 {
            sec.close(&mut out, state)?;
            out.flush()?;
        }
        progress.pages_sent.store(npages - left, Ordering::Relaxed);
        if did == 0 && batch == 0 && !zero_now {
            if rp_closed {
                return Err(PostcopyError::Io(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "QEMU closed the migration socket before every page was sent",
                )));
            }
            // Idle: wake at once for a request, else soon to look for
            // pages that became ready.
            match req_rx.recv_timeout(Duration::from_millis(2)) {
                Ok(r) => parked = Some(r),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => rp_closed = true,
            }
        }
    }
    // The end: RAM END (EOS) and EOF.
    sec.close(&mut out, state)?;
    let mut tail = Vec::new();
    state.section_header(&mut tail, section::END);
    tail.extend_from_slice(&flag::EOS.to_be_bytes());
    state.section_footer(&mut tail);
    tail.push(section::EOF);
    out.write_all(&tail)?;
    out.flush()?;
    stats.done_ms = started.elapsed().as_millis() as u64;
    progress.pages_sent.store(npages, Ordering::Relaxed);
    // QEMU answers late requests (already satisfied) and then SHUT.
    drop(req_rx);
    let _ = rp.join();
    Ok(stats)
}

/// One open PART section of the output.
#[derive(Default)]
struct Section {
    open: bool,
    /// Last block written in this section (for CONTINUE).
    last: Option<String>,
}

impl Section {
    fn open(&mut self, out: &mut impl Write, state: &SavedState) -> io::Result<()> {
        if !self.open {
            let mut h = Vec::new();
            state.section_header(&mut h, section::PART);
            out.write_all(&h)?;
            self.open = true;
            self.last = None;
        }
        Ok(())
    }
    fn record(
        &mut self,
        out: &mut impl Write,
        state: &SavedState,
        block: &str,
        offset: u64,
        kind: u64,
    ) -> io::Result<()> {
        self.open(out, state)?;
        let cont = self.last.as_deref() == Some(block);
        let mut h = Vec::with_capacity(16 + block.len());
        put_record(&mut h, block, offset, kind, cont);
        out.write_all(&h)?;
        self.last = Some(block.to_string());
        Ok(())
    }
    fn zero(
        &mut self,
        out: &mut impl Write,
        state: &SavedState,
        block: &str,
        offset: u64,
    ) -> io::Result<()> {
        self.record(out, state, block, offset & !(PAGE as u64 - 1), flag::ZERO)?;
        out.write_all(&[0])
    }
    fn close(&mut self, out: &mut impl Write, state: &SavedState) -> io::Result<()> {
        if self.open {
            let mut t = Vec::new();
            t.extend_from_slice(&flag::EOS.to_be_bytes());
            state.section_footer(&mut t);
            out.write_all(&t)?;
            self.open = false;
        }
        Ok(())
    }
}

const NOT_SENT: u8 = 0;
const PLACED: u8 = 1;
const SKIPPED: u8 = 2;

/// Send page `p` if it is ready (`Some(PLACED)`, or `Some(SKIPPED)` for a
/// zero page pushed in the background), `None` if its data has not arrived.
/// Zero pages are sent only when `requested`.
#[allow(clippy::too_many_arguments)]
fn send_page(
    sec: &mut Section,
    out: &mut impl Write,
    state: &SavedState,
    main_id: &str,
    pages: &dyn PageSource,
    p: u64,
    buf: &mut [u8; PAGE],
    requested: bool,
    stats: &mut PostcopyStats,
) -> Result<Option<u8>, PostcopyError> {
    let ready = pages.read_page(p, buf).map_err(|e| PostcopyError::Source {
        page: p,
        detail: e.to_string(),
    })?;
    if !ready {
        return Ok(None);
    }
    let offset = p * PAGE as u64;
    if buf.iter().all(|&b| b == 0) {
        if requested {
            sec.zero(out, state, main_id, offset)?;
            stats.zero_pages_sent += 1;
            return Ok(Some(PLACED));
        }
        stats.zero_pages_skipped += 1;
        return Ok(Some(SKIPPED));
    }
    sec.record(out, state, main_id, offset, flag::PAGE)?;
    out.write_all(&buf[..])?;
    stats.pages_sent += 1;
    Ok(Some(PLACED))
}

enum Request {
    Pages {
        block: usize,
        offset: u64,
        len: u32,
    },
    Bad {
        block: String,
        offset: u64,
        len: u32,
    },
}

/// Read the destination's return path until SHUT or EOF.
fn return_path(mut s: UnixStream, blocks: &[RamBlock], tx: mpsc::Sender<Request>) {
    let mut last: Option<usize> = None;
    let mut hdr = [0u8; 4];
    loop {
        if s.read_exact(&mut hdr).is_err() {
            return;
        }
        let kind = u16::from_be_bytes([hdr[0], hdr[1]]);
        let len = u16::from_be_bytes([hdr[2], hdr[3]]) as usize;
        tracing::trace!(kind, len, "postcopy return path message");
        let mut data = vec![0u8; len];
        if s.read_exact(&mut data).is_err() {
            return;
        }
        match kind {
            rp::SHUT => return,
            rp::REQ_PAGES | rp::REQ_PAGES_ID if len >= 12 => {
                let offset = u64::from_be_bytes(data[0..8].try_into().unwrap_or([0; 8]));
                let n = u32::from_be_bytes(data[8..12].try_into().unwrap_or([0; 4]));
                if kind == rp::REQ_PAGES_ID && len > 12 {
                    let idlen = data[12] as usize;
                    let id = String::from_utf8_lossy(&data[13..(13 + idlen).min(len)]).into_owned();
                    last = blocks.iter().position(|b| b.id == id);
                    if last.is_none() {
                        let _ = tx.send(Request::Bad {
                            block: id,
                            offset,
                            len: n,
                        });
                        return;
                    }
                }
                let Some(block) = last else {
                    let _ = tx.send(Request::Bad {
                        block: String::new(),
                        offset,
                        len: n,
                    });
                    return;
                };
                if tx
                    .send(Request::Pages {
                        block,
                        offset,
                        len: n,
                    })
                    .is_err()
                {
                    // The sender finished; keep draining until SHUT.
                    continue;
                }
            }
            _ => {} // PONG and others: nothing to do
        }
    }
}

/// A [`PageSource`] over a complete memory image (a RAM file): every page
/// is ready. For tests and for restoring local snapshots lazily.
pub struct FilePages {
    file: std::fs::File,
}

impl FilePages {
    pub fn open(path: &std::path::Path) -> io::Result<FilePages> {
        Ok(FilePages {
            file: std::fs::File::open(path)?,
        })
    }
}

impl PageSource for FilePages {
    fn read_page(&self, page: u64, buf: &mut [u8; PAGE]) -> io::Result<bool> {
        use std::os::unix::fs::FileExt;
        self.file.read_exact_at(buf, page * PAGE as u64)?;
        Ok(true)
    }
    fn demand(&self, _page: u64) {}
}

/// Keep `Arc<dyn PageSource>` usable where `&dyn PageSource` is expected.
impl<T: PageSource + ?Sized> PageSource for Arc<T> {
    fn read_page(&self, page: u64, buf: &mut [u8; PAGE]) -> io::Result<bool> {
        (**self).read_page(page, buf)
    }
    fn demand(&self, page: u64) {
        (**self).demand(page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal saved state like QEMU writes with x-ignore-shared.
    fn saved() -> Vec<u8> {
        let mut o = Vec::new();
        o.extend_from_slice(&MAGIC.to_be_bytes());
        o.extend_from_slice(&VERSION.to_be_bytes());
        o.push(section::CONFIGURATION);
        o.extend_from_slice(&13u32.to_be_bytes());
        o.extend_from_slice(b"pc-i440fx-7.2");
        o.push(section::SUBSECTION);
        let name = b"configuration/capabilities";
        o.push(name.len() as u8);
        o.extend_from_slice(name);
        o.extend_from_slice(&1u32.to_be_bytes());
        o.extend_from_slice(&1u32.to_be_bytes());
        o.push(15);
        o.extend_from_slice(b"x-ignore-shared");
        // START ram
        o.push(section::START);
        o.extend_from_slice(&2u32.to_be_bytes());
        o.push(3);
        o.extend_from_slice(b"ram");
        o.extend_from_slice(&0u32.to_be_bytes());
        o.extend_from_slice(&4u32.to_be_bytes());
        o.extend_from_slice(&(((1u64 << 20) + 8192) | flag::MEM_SIZE).to_be_bytes());
        for (id, len) in [("mem", 1u64 << 20), ("pc.rom", 8192)] {
            o.push(id.len() as u8);
            o.extend_from_slice(id.as_bytes());
            o.extend_from_slice(&len.to_be_bytes());
            o.extend_from_slice(&0u64.to_be_bytes());
        }
        o.extend_from_slice(&flag::EOS.to_be_bytes());
        o.push(section::FOOTER);
        o.extend_from_slice(&2u32.to_be_bytes());
        // END ram with one rom page and one zero page
        o.push(section::END);
        o.extend_from_slice(&2u32.to_be_bytes());
        put_record(&mut o, "pc.rom", 0, flag::PAGE, false);
        o.extend_from_slice(&[7u8; PAGE]);
        put_record(&mut o, "pc.rom", 4096, flag::ZERO, true);
        o.push(0);
        o.extend_from_slice(&flag::EOS.to_be_bytes());
        o.push(section::FOOTER);
        o.extend_from_slice(&2u32.to_be_bytes());
        // devices
        o.push(section::FULL);
        o.extend_from_slice(b"device-bytes");
        o.push(section::EOF);
        let desc = b"{\"page_size\":4096}";
        o.push(section::VMDESCRIPTION);
        o.extend_from_slice(&(desc.len() as u32).to_be_bytes());
        o.extend_from_slice(desc);
        o
    }

    #[test]
    fn parses_a_saved_state_into_its_parts() {
        let st = SavedState::parse(&saved(), "mem").unwrap();
        assert_eq!(st.machine, b"pc-i440fx-7.2");
        assert_eq!(st.blocks.len(), 2);
        assert_eq!(st.main_len(), 1 << 20);
        assert!(st.footers);
        assert_eq!(st.devices, b"\x04device-bytes");
        // The ROM page and the zero page, re-encoded with explicit block ids.
        assert_eq!(st.other_pages.len(), 8 + 7 + PAGE + 8 + 7 + 1);
        let pre = st.preamble();
        // No capability subsection, no per-block address in the setup.
        assert!(!pre.windows(15).any(|w| w == b"x-ignore-shared"));
        let pkg = st.packaged();
        assert_eq!(pkg[0], section::COMMAND);
        assert_eq!(u16::from_be_bytes([pkg[1], pkg[2]]), cmd::PACKAGED);
        let inner_len = u32::from_be_bytes(pkg[5..9].try_into().unwrap()) as usize;
        assert_eq!(pkg.len(), 9 + inner_len);
        assert!(pkg.ends_with(&[section::COMMAND, 0, 5, 0, 0]));
    }

    #[test]
    fn refuses_what_it_does_not_understand() {
        let mut b = saved();
        b[0] = b'X';
        assert!(matches!(
            SavedState::parse(&b, "mem"),
            Err(ParseSavedStateError::Header)
        ));
        assert!(matches!(
            SavedState::parse(&saved(), "ram0"),
            Err(ParseSavedStateError::NoMainBlock(_))
        ));
        let b = saved();
        assert!(SavedState::parse(&b[..b.len() - 30], "mem").is_err());
    }
}
