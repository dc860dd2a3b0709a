//! Serving pages: the loop that answers the guest's page requests first
//! and pushes every other page of the main block in the background, each
//! exactly once.

use std::collections::VecDeque;
use std::io::{self, BufWriter, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cloudlet_qemu_format::ram_flag as flag;

use super::return_path::{return_path, Request};
use super::stream::Section;
use super::{PageSource, PostcopyError, PostcopyProgress, PostcopyStats, SavedState, PAGE};

/// Pages pushed per PART section in the background.
const BATCH: usize = 64;

// What became of a main-block page.
const NOT_SENT: u8 = 0;
const PLACED: u8 = 1;
/// Zero, left for QEMU to read from its discarded RAM unless the guest asks
/// for it.
const SKIPPED: u8 = 2;

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
    let mut pager = Pager::new(state, pages, out);
    pager.stats.run_ms = started.elapsed().as_millis() as u64;
    progress.running.store(true, Ordering::Relaxed);

    let mut rp_closed = false;
    // A request that woke the idle wait, handled first in the next round.
    let mut parked: Option<Request> = None;
    while pager.left > 0 || !guest_started.load(Ordering::Acquire) {
        if cancel.load(Ordering::Relaxed) {
            return Err(PostcopyError::Cancelled);
        }
        // 1. What the guest asked for.
        let zero_now = pager.take_requests(&req_rx, &mut parked, &mut rp_closed, progress)?;
        let did = pager.answer_waiting()?;
        if did > 0 || zero_now {
            pager.end_section()?;
        }
        // 2. The background push, a batch at a time.
        let batch = pager.push_background()?;
        if batch > 0 {
            pager.end_section()?;
        }
        progress
            .pages_sent
            .store(pager.npages - pager.left, Ordering::Relaxed);
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
    pager.finish()?;
    let mut stats = pager.stats;
    stats.done_ms = started.elapsed().as_millis() as u64;
    progress.pages_sent.store(pager.npages, Ordering::Relaxed);
    // QEMU answers late requests (already satisfied) and then SHUT.
    drop(req_rx);
    let _ = rp.join();
    Ok(stats)
}

/// The state of the main block's pages while they are served.
struct Pager<'a, W: Write> {
    state: &'a SavedState,
    pages: &'a dyn PageSource,
    out: W,
    sec: Section,
    main_id: String,
    npages: u64,
    /// Per page: NOT_SENT, PLACED or SKIPPED.
    sent: Vec<u8>,
    /// Pages not sent yet.
    left: u64,
    buf: Box<[u8; PAGE]>,
    /// Requested pages not ready yet, with when they were asked for.
    waiting: VecDeque<(u64, Instant)>,
    /// Background pages found not ready, to retry later.
    deferred: Vec<u64>,
    /// The next page of the background push.
    cursor: u64,
    stats: PostcopyStats,
}

impl<'a, W: Write> Pager<'a, W> {
    fn new(state: &'a SavedState, pages: &'a dyn PageSource, out: W) -> Self {
        let npages = state.main_len() / PAGE as u64;
        Pager {
            state,
            pages,
            out,
            sec: Section::default(),
            main_id: state.blocks[state.main].id.clone(),
            npages,
            sent: vec![NOT_SENT; npages as usize],
            left: npages,
            buf: Box::new([0u8; PAGE]),
            waiting: VecDeque::new(),
            deferred: Vec::new(),
            cursor: 0,
            stats: PostcopyStats::default(),
        }
    }

    /// Take the requests that arrived (and `parked`): queue the pages not
    /// sent yet, answer skipped zero pages at once (then `true`). Sets
    /// `rp_closed` when the return path has ended.
    fn take_requests(
        &mut self,
        rx: &mpsc::Receiver<Request>,
        parked: &mut Option<Request>,
        rp_closed: &mut bool,
        progress: &PostcopyProgress,
    ) -> Result<bool, PostcopyError> {
        let mut zero_now = false;
        loop {
            let next = match parked.take() {
                Some(r) => Ok(r),
                None => rx.try_recv(),
            };
            match next {
                Ok(Request::Pages { block, offset, len }) => {
                    if block != self.state.main {
                        // The small blocks were sent before LISTEN; the only
                        // pages QEMU can miss there are ones the saved state
                        // did not carry, which are zero.
                        let id = &self.state.blocks[block].id;
                        self.sec.zero(&mut self.out, self.state, id, offset)?;
                        continue;
                    }
                    let first = offset / PAGE as u64;
                    let n = (len as u64).div_ceil(PAGE as u64).max(1);
                    for p in first..(first + n).min(self.npages) {
                        self.stats.requests += 1;
                        progress.requests.fetch_add(1, Ordering::Relaxed);
                        match self.sent[p as usize] {
                            NOT_SENT => self.waiting.push_back((p, Instant::now())),
                            SKIPPED => {
                                self.place_zero(p)?;
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
                    *rp_closed = true;
                    break;
                }
            }
        }
        Ok(zero_now)
    }

    /// Send the requested pages that are ready; ask the source for the
    /// others. Returns how many were sent.
    fn answer_waiting(&mut self) -> Result<usize, PostcopyError> {
        let mut did = 0usize;
        let mut i = 0;
        while i < self.waiting.len() {
            let (p, since) = self.waiting[i];
            match self.sent[p as usize] {
                PLACED => {
                    self.waiting.remove(i);
                    continue;
                }
                SKIPPED => {
                    // The background push found it zero meanwhile.
                    self.place_zero(p)?;
                    did += 1;
                    self.waiting.remove(i);
                    continue;
                }
                _ => {}
            }
            if let Some(s) = self.send_page(p, true)? {
                self.sent[p as usize] = s;
                self.left -= 1;
                did += 1;
                let waited = since.elapsed();
                if waited > Duration::from_millis(1) {
                    self.stats.requests_waited += 1;
                }
                self.stats.max_wait_ms = self.stats.max_wait_ms.max(waited.as_millis() as u64);
                self.waiting.remove(i);
            } else {
                self.pages.demand(p);
                i += 1;
            }
        }
        Ok(did)
    }

    /// Push up to a batch of pages nobody asked for: in order, then the
    /// ones that were not ready. Returns how many were sent (or skipped).
    fn push_background(&mut self) -> Result<usize, PostcopyError> {
        let mut batch = 0;
        while batch < BATCH && self.cursor < self.npages {
            let p = self.cursor;
            self.cursor += 1;
            if self.sent[p as usize] != NOT_SENT {
                continue;
            }
            match self.send_page(p, false)? {
                Some(s) => {
                    self.sent[p as usize] = s;
                    self.left -= 1;
                    batch += 1;
                }
                None => self.deferred.push(p),
            }
        }
        if self.cursor >= self.npages && !self.deferred.is_empty() && batch < BATCH {
            let mut keep = Vec::new();
            for p in std::mem::take(&mut self.deferred) {
                if self.sent[p as usize] != NOT_SENT {
                    continue;
                }
                let s = if batch < BATCH {
                    self.send_page(p, false)?
                } else {
                    None
                };
                match s {
                    Some(s) => {
                        self.sent[p as usize] = s;
                        self.left -= 1;
                        batch += 1;
                    }
                    None => keep.push(p),
                }
            }
            self.deferred = keep;
        }
        Ok(batch)
    }

    /// A skipped zero page the guest wants after all: send it as ZERO.
    fn place_zero(&mut self, p: u64) -> io::Result<()> {
        self.sec
            .zero(&mut self.out, self.state, &self.main_id, p * PAGE as u64)?;
        self.sent[p as usize] = PLACED;
        self.stats.zero_pages_sent += 1;
        Ok(())
    }

    /// Send page `p` if it is ready (`Some(PLACED)`, or `Some(SKIPPED)` for
    /// a zero page pushed in the background), `None` if its data has not
    /// arrived. Zero pages are sent only when `requested`.
    fn send_page(&mut self, p: u64, requested: bool) -> Result<Option<u8>, PostcopyError> {
        let ready = self
            .pages
            .read_page(p, &mut self.buf)
            .map_err(|e| PostcopyError::Source {
                page: p,
                detail: e.to_string(),
            })?;
        if !ready {
            return Ok(None);
        }
        let offset = p * PAGE as u64;
        if self.buf.iter().all(|&b| b == 0) {
            if requested {
                self.sec
                    .zero(&mut self.out, self.state, &self.main_id, offset)?;
                self.stats.zero_pages_sent += 1;
                return Ok(Some(PLACED));
            }
            self.stats.zero_pages_skipped += 1;
            return Ok(Some(SKIPPED));
        }
        self.sec
            .record(&mut self.out, self.state, &self.main_id, offset, flag::PAGE)?;
        self.out.write_all(&self.buf[..])?;
        self.stats.pages_sent += 1;
        Ok(Some(PLACED))
    }

    /// Close the open PART section and flush it to QEMU.
    fn end_section(&mut self) -> io::Result<()> {
        self.sec.close(&mut self.out, self.state)?;
        self.out.flush()
    }

    /// The end of the stream: RAM END (EOS) and EOF.
    fn finish(&mut self) -> io::Result<()> {
        self.sec.close(&mut self.out, self.state)?;
        self.out.write_all(&self.state.tail())?;
        self.out.flush()
    }
}
