//! Reading an overlay from where it lives: an `http(s)://` URL (range
//! requests: header and manifest first, then the segments) or a file that
//! was uploaded to the daemon.
//!
//! [`SegmentFetcher`] fetches the segments in a given order (the file order,
//! or an early start plan's `fetch_order`), each exactly once, while
//! [`DemandHandle::demand`] pulls single segments ahead of that order (the
//! memory pages a starting VM touches).

use std::collections::VecDeque;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use cloudlet_overlay::format::{Header, HEADER_LEN};
use cloudlet_overlay::signature::{unix_now, SignaturePolicy};
use cloudlet_overlay::{Manifest, Validation};
use futures::{Stream, StreamExt};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

/// How many bytes the first request asks for: the header and, usually, the
/// whole manifest, in one round trip.
const FIRST_FETCH: u64 = 256 * 1024;
/// The first request's bytes when signatures are judged: the header and
/// the largest signature block, no more.
const SIGNED_FIRST_FETCH: u64 =
    HEADER_LEN as u64 + *cloudlet_overlay::signature::BLOCK_LEN_RANGE.end();

#[derive(Debug, thiserror::Error)]
pub enum FetchOverlayError {
    #[error("Overlay URL {url} is not http(s)")]
    Scheme { url: String },
    #[error("Cannot reach {url}: {detail}")]
    Connect { url: String, detail: String },
    #[error("{url} answered {status}")]
    Status { url: String, status: u16 },
    #[error("Reading the overlay failed at byte {offset}: {detail}")]
    Read { offset: u64, detail: String },
    #[error("The overlay ended at byte {got}, expected {expected}")]
    Truncated { got: u64, expected: u64 },
    #[error("Not an overlay: {0}")]
    Format(#[from] cloudlet_overlay::FormatError),
    #[error(transparent)]
    Invalid(#[from] cloudlet_overlay::InvalidOverlay),
    #[error("Invalid segment fetch order: {reason}")]
    InvalidOrder { reason: String },
    #[error("The segment fetcher stopped: {detail}")]
    Task { detail: String },
}

/// The client that fetches overlays' headers (segments have their own).
fn overlay_client() -> &'static reqwest::Client {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    CLIENT.get_or_init(|| {
        cloudlet_trust::tls::client_builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .build()
            .unwrap_or_default()
    })
}

/// Where an overlay comes from.
#[derive(Debug, Clone)]
pub enum OverlaySource {
    /// Fetched over HTTP(S) by the daemon's own client.
    Url(String),
    File(PathBuf),
}

impl OverlaySource {
    /// What the VM's record and the API say the overlay was: its URL, or
    /// `upload` (where the daemon spooled it is no client's business).
    pub fn describe(&self) -> String {
        match self {
            OverlaySource::Url(url) => url.clone(),
            OverlaySource::File(_) => "upload".to_string(),
        }
    }

    /// Bytes `[start, end)`; `end == None` means to the end of the overlay.
    async fn range(&self, start: u64, end: Option<u64>) -> Result<ByteStream, FetchOverlayError> {
        match self {
            OverlaySource::Url(url) => {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(FetchOverlayError::Scheme { url: url.clone() });
                }
                let range = match end {
                    Some(e) => format!("bytes={start}-{}", e.saturating_sub(1)),
                    None => format!("bytes={start}-"),
                };
                let resp = overlay_client()
                    .get(url)
                    .header(reqwest::header::RANGE, range)
                    .send()
                    .await
                    .map_err(|e| FetchOverlayError::Connect {
                        url: url.clone(),
                        detail: crate::error_chain(&e),
                    })?;
                let status = resp.status().as_u16();
                let skip = match status {
                    206 => 0,
                    200 => start, // no range support: skip to `start`
                    _ => {
                        return Err(FetchOverlayError::Status {
                            url: url.clone(),
                            status,
                        })
                    }
                };
                let total = total_len(&resp);
                let stream = resp
                    .bytes_stream()
                    .map(|r| r.map_err(|e| crate::error_chain(&e)));
                let mut s = ByteStream::new(Box::pin(stream), start, skip, end.map(|e| e - start));
                s.total = total;
                Ok(s)
            }
            OverlaySource::File(path) => {
                let mut f =
                    tokio::fs::File::open(path)
                        .await
                        .map_err(|e| FetchOverlayError::Read {
                            offset: start,
                            detail: e.to_string(),
                        })?;
                f.seek(std::io::SeekFrom::Start(start)).await.map_err(|e| {
                    FetchOverlayError::Read {
                        offset: start,
                        detail: e.to_string(),
                    }
                })?;
                let total = f.metadata().await.ok().map(|m| m.len());
                let reader: Box<dyn tokio::io::AsyncRead + Send + Unpin> = match end {
                    Some(e) => Box::new(f.take(e - start)),
                    None => Box::new(f),
                };
                let stream = tokio_util::io::ReaderStream::with_capacity(reader, 1 << 20)
                    .map(|r| r.map_err(|e| e.to_string()));
                let mut s = ByteStream::new(Box::pin(stream), start, 0, end.map(|e| e - start));
                s.total = total;
                Ok(s)
            }
        }
    }

    /// Fetch the header and manifest and check them with the validation
    /// every tool shares (structure, app metadata, the exact length, the
    /// signature by `policy`), before any segment is fetched; segments are
    /// checked as they arrive. With a policy that names keys or requires
    /// signatures, the first request asks for the header and signature
    /// block only and the second for exactly the manifest (one round trip
    /// more), so that no payload byte crosses the link before the
    /// signature is judged; else one request of [`FIRST_FETCH`] bytes
    /// usually holds both.
    pub async fn manifest(
        &self,
        policy: &SignaturePolicy,
    ) -> Result<(Header, Manifest, u64), FetchOverlayError> {
        let judged = policy.required || !policy.trusted.is_empty();
        let first_len = if judged {
            SIGNED_FIRST_FETCH
        } else {
            FIRST_FETCH
        };
        let mut first = self.range(0, Some(first_len)).await?;
        let mut buf = first.read_up_to(first_len).await?;
        // The length from the answer, else from where a short overlay ended.
        let len = first
            .total
            .or(((buf.len() as u64) < first_len).then_some(buf.len() as u64));
        let check = Validation::structure().signatures(policy.clone(), unix_now());
        let end = check.prefix_len(&buf[..buf.len().min(HEADER_LEN)])?;
        // (Not past the end of a shorter overlay: the check says where it
        // ends.)
        if (buf.len() as u64) < end.min(len.unwrap_or(u64::MAX)) {
            let mut rest = self.range(buf.len() as u64, Some(end)).await?;
            let more = rest.read_up_to(end - buf.len() as u64).await?;
            buf.extend_from_slice(&more);
        }
        let v = check.check_prefix(&buf, len)?;
        Ok((v.header, v.manifest, end))
    }

    /// The overlay's bytes `range`, by one request of their own (a segment
    /// fetched again, see `synth::heal`).
    pub(crate) async fn read_range(&self, range: Range<u64>) -> Result<Vec<u8>, FetchOverlayError> {
        let mut s = self.range(range.start, Some(range.end)).await?;
        s.read_exact(range.end - range.start).await
    }

    /// All segments, in file order, as one stream from `data_offset`.
    pub async fn segments(
        &self,
        data_offset: u64,
        file_len: u64,
    ) -> Result<ByteStream, FetchOverlayError> {
        self.range(data_offset, Some(file_len)).await
    }
}

/// The whole file's length from an answer: `Content-Range: bytes a-b/LEN`
/// of a 206, the `Content-Length` of a 200.
fn total_len(resp: &reqwest::Response) -> Option<u64> {
    if resp.status().as_u16() == 200 {
        return resp.content_length();
    }
    let v = resp.headers().get(reqwest::header::CONTENT_RANGE)?;
    v.to_str().ok()?.rsplit_once('/')?.1.trim().parse().ok()
}

type Inner = std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, String>> + Send>>;

/// A byte stream with exact reads; `skip` bytes at its start are dropped.
/// Errors name offsets in the overlay file (the stream starts at `origin`).
pub struct ByteStream {
    inner: Inner,
    pending: Bytes,
    origin: u64,
    skip: u64,
    pos: u64,
    limit: Option<u64>,
    counters: Option<Arc<FetchCounters>>,
    /// The whole overlay's length, when the source tells it.
    total: Option<u64>,
}

impl ByteStream {
    fn new(inner: Inner, origin: u64, skip: u64, limit: Option<u64>) -> Self {
        Self {
            inner,
            pending: Bytes::new(),
            origin,
            skip,
            pos: 0,
            limit,
            counters: None,
            total: None,
        }
    }

    async fn fill(&mut self) -> Result<bool, FetchOverlayError> {
        while self.pending.is_empty() {
            match self.inner.next().await {
                None => return Ok(false),
                Some(Err(detail)) => {
                    return Err(FetchOverlayError::Read {
                        offset: self.origin + self.pos,
                        detail,
                    })
                }
                Some(Ok(mut b)) => {
                    if self.skip > 0 {
                        let n = (self.skip as usize).min(b.len());
                        let _ = b.split_to(n);
                        self.skip -= n as u64;
                    }
                    self.pending = b;
                }
            }
        }
        Ok(true)
    }

    /// Read up to `n` bytes (fewer only at the end of the stream).
    pub async fn read_up_to(&mut self, n: u64) -> Result<Vec<u8>, FetchOverlayError> {
        let n = match self.limit {
            Some(l) => n.min(l.saturating_sub(self.pos)),
            None => n,
        };
        let mut out = Vec::with_capacity(n as usize);
        while (out.len() as u64) < n {
            if !self.fill().await? {
                break;
            }
            let take = ((n - out.len() as u64) as usize).min(self.pending.len());
            out.extend_from_slice(&self.pending.split_to(take));
            // As they come: a progress that moves within a slow segment.
            self.count(take);
        }
        self.pos += out.len() as u64;
        Ok(out)
    }

    fn count(&self, n: usize) {
        if let Some(c) = &self.counters {
            c.bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// Read exactly `n` bytes.
    pub async fn read_exact(&mut self, n: u64) -> Result<Vec<u8>, FetchOverlayError> {
        let start = self.origin + self.pos;
        let out = self.read_up_to(n).await?;
        if (out.len() as u64) < n {
            return Err(FetchOverlayError::Truncated {
                got: start + out.len() as u64,
                expected: start + n,
            });
        }
        Ok(out)
    }

    /// Read and drop exactly `n` bytes.
    async fn discard(&mut self, n: u64) -> Result<(), FetchOverlayError> {
        let start = self.origin + self.pos;
        let mut left = match self.limit {
            Some(l) => n.min(l.saturating_sub(self.pos)),
            None => n,
        };
        while left > 0 && self.fill().await? {
            let take = (left as usize).min(self.pending.len());
            let _ = self.pending.split_to(take);
            left -= take as u64;
            self.pos += take as u64;
            self.count(take);
        }
        let got = self.origin + self.pos - start;
        if got < n {
            return Err(FetchOverlayError::Truncated {
                got: start + got,
                expected: start + n,
            });
        }
        Ok(())
    }
}

/// Tuning of a [`SegmentFetcher`].
#[derive(Debug, Clone)]
pub struct FetchConfig {
    /// Segments buffered between the fetcher and its consumer.
    pub channel_capacity: usize,
    /// Demand fetches (one range request each) in flight at most; further
    /// demands wait, in the order they came.
    pub max_demand_fetches: usize,
    /// Largest span the sequential stream reads and drops to reach the next
    /// segment it needs (segments already delivered or being fetched on
    /// demand); past it, the stream is dropped and a new range request
    /// opened. Reopening costs about a round trip and a TCP slow start,
    /// which is worth ~3 bandwidth-delay products of reading: ~300 KB at
    /// 38 Mbit/s and 20 ms RTT.
    pub reopen_gap: u64,
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            channel_capacity: 8,
            max_demand_fetches: 2,
            reopen_gap: 256 << 10,
        }
    }
}

/// Live counters of a [`SegmentFetcher`] (segment bytes only: add
/// `manifest.data_offset` for a progress of the whole file).
#[derive(Debug, Default)]
pub struct FetchCounters {
    /// Overlay bytes read so far, by all requests: segments, and the bytes
    /// of gaps the sequential stream read through and dropped. (Bytes that
    /// arrived in a buffer of a stream dropped early are not counted.)
    pub bytes: AtomicU64,
    /// Bytes of the segments handed to the consumer.
    pub delivered_bytes: AtomicU64,
    /// Segments handed to the consumer.
    pub segments: AtomicU32,
    /// Range requests (or file opens) made.
    pub requests: AtomicU32,
    /// Of those, demand fetches.
    pub demand_fetches: AtomicU32,
}

/// Pulls single segments ahead of a [`SegmentFetcher`]'s order. Cheap to
/// clone; usable from any thread (it never blocks); outlives the fetcher
/// harmlessly.
#[derive(Debug, Clone)]
pub struct DemandHandle {
    claimed: Arc<[AtomicBool]>,
    tx: mpsc::UnboundedSender<u32>,
}

impl DemandHandle {
    /// Have `segment` delivered as soon as possible. If it was neither
    /// delivered nor is being fetched, a range request for exactly that
    /// segment starts at once (at most [`FetchConfig::max_demand_fetches`]
    /// at a time; later demands wait in order), next to the sequential
    /// stream, which then skips it. Otherwise (or for an unknown segment,
    /// or after the fetcher ended) nothing happens.
    pub fn demand(&self, segment: u32) {
        match self.claimed.get(segment as usize) {
            Some(c) if !c.load(Ordering::Acquire) => {
                let _ = self.tx.send(segment);
            }
            _ => {}
        }
    }

    /// Whether `segment` was delivered or is being fetched.
    pub fn is_claimed(&self, segment: u32) -> bool {
        self.claimed
            .get(segment as usize)
            .is_some_and(|c| c.load(Ordering::Acquire))
    }
}

/// The fetch task of a [`SegmentFetcher`]: [`FetchTask::wait`] for its
/// outcome. Dropping it stops the fetch.
#[derive(Debug)]
pub struct FetchTask(JoinHandle<Result<(), FetchOverlayError>>);

impl FetchTask {
    /// Waits until the fetcher ended. `Ok` once every segment was delivered,
    /// or when the consumer dropped the receiver first; the error otherwise.
    pub async fn wait(mut self) -> Result<(), FetchOverlayError> {
        match (&mut self.0).await {
            Ok(r) => r,
            Err(e) => Err(FetchOverlayError::Task {
                detail: e.to_string(),
            }),
        }
    }

    /// Stops the fetch.
    pub fn abort(&self) {
        self.0.abort();
    }
}

impl Drop for FetchTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Fetches an overlay's segments in a given order, each exactly once, on a
/// background task.
///
/// - `segments` yields `(segment index, stored bytes)` (as the file holds
///   them: check them with `Applier::apply_segment`). Sequential ones come
///   in the order given; demanded ones as soon as they arrive. It closes when
///   the fetcher ends: after the last segment, or after an error.
/// - `task` tells which: [`FetchTask::wait`] after `segments` closed.
/// - `demand` pulls segments ahead ([`DemandHandle::demand`]).
/// - `counters` are live.
///
/// The sequential part opens one range request per run of the order that is
/// contiguous in the file (gaps up to [`FetchConfig::reopen_gap`] are read
/// through), so the natural order and an early start order (device state,
/// disk segments, the rest) need one and three requests. A segment it
/// reaches that was delivered or is being fetched on demand is skipped: read
/// and dropped if small enough, else the stream is reopened after it.
/// Segments the stream passes over on its way are delivered if nobody has
/// them yet.
///
/// Any error (HTTP status, connection, truncated overlay) ends the fetcher.
pub struct SegmentFetcher {
    pub segments: mpsc::Receiver<(u32, Vec<u8>)>,
    pub demand: DemandHandle,
    pub counters: Arc<FetchCounters>,
    pub task: FetchTask,
}

impl SegmentFetcher {
    /// Starts fetching the segments of `manifest` from `source` in `order`,
    /// which must name every segment exactly once. Call from a tokio
    /// runtime.
    pub fn start(
        source: OverlaySource,
        manifest: &Manifest,
        order: &[u32],
        config: &FetchConfig,
    ) -> Result<SegmentFetcher, FetchOverlayError> {
        let n = manifest.segments.len();
        let ranges: Vec<Range<u64>> = (0..n as u32)
            .map(|i| manifest.segment_range(i).unwrap_or(0..0))
            .collect();
        let mut seen = vec![false; n];
        for &s in order {
            match seen.get_mut(s as usize) {
                None => {
                    return Err(FetchOverlayError::InvalidOrder {
                        reason: format!("segment {s} does not exist ({n} segments)"),
                    })
                }
                Some(true) => {
                    return Err(FetchOverlayError::InvalidOrder {
                        reason: format!("segment {s} is named twice"),
                    })
                }
                Some(x) => *x = true,
            }
        }
        if let Some(missing) = seen.iter().position(|&x| !x) {
            return Err(FetchOverlayError::InvalidOrder {
                reason: format!("segment {missing} is missing"),
            });
        }
        let runs = runs(order, &ranges, config.reopen_gap);
        // Empty segments take no bytes: never met on the way.
        let mut by_start: Vec<(u64, u32)> = ranges
            .iter()
            .enumerate()
            .filter(|(_, r)| !r.is_empty())
            .map(|(i, r)| (r.start, i as u32))
            .collect();
        by_start.sort();
        let claimed: Arc<[AtomicBool]> = (0..n).map(|_| AtomicBool::new(false)).collect();
        let counters = Arc::new(FetchCounters::default());
        let (tx, segments) = mpsc::channel(config.channel_capacity.max(1));
        let (demand_tx, demand_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            source,
            ranges,
            by_start,
            claimed: claimed.clone(),
            tx,
            counters: counters.clone(),
        });
        let seq = Sequential {
            shared: shared.clone(),
            order: order.to_vec(),
            runs,
            reopen_gap: config.reopen_gap,
        };
        let task = tokio::spawn(coordinate(
            shared,
            seq,
            demand_rx,
            config.max_demand_fetches.max(1),
        ));
        Ok(SegmentFetcher {
            segments,
            demand: DemandHandle {
                claimed,
                tx: demand_tx,
            },
            counters,
            task: FetchTask(task),
        })
    }
}

/// Segment indices in file order (the natural fetch order).
pub fn file_order(manifest: &Manifest) -> Vec<u32> {
    let mut order: Vec<u32> = (0..manifest.segments.len() as u32).collect();
    order.sort_by_key(|&i| manifest.segments[i as usize].offset);
    order
}

/// Positions `order[first..end]` fetched with one request for file bytes
/// `[start, stop)`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Run {
    first: usize,
    end: usize,
    stop: u64,
}

fn runs(order: &[u32], ranges: &[Range<u64>], gap: u64) -> Vec<Run> {
    let mut out: Vec<Run> = Vec::new();
    for (k, &s) in order.iter().enumerate() {
        let r = &ranges[s as usize];
        match out.last_mut() {
            Some(run) if r.start >= run.stop && r.start - run.stop <= gap => {
                run.end = k + 1;
                run.stop = r.end;
            }
            _ => out.push(Run {
                first: k,
                end: k + 1,
                stop: r.end,
            }),
        }
    }
    out
}

/// Why a part of the fetcher stopped.
enum Halt {
    /// The consumer dropped the receiver.
    Closed,
    Failed(FetchOverlayError),
}

impl From<FetchOverlayError> for Halt {
    fn from(e: FetchOverlayError) -> Self {
        Halt::Failed(e)
    }
}

struct Shared {
    source: OverlaySource,
    ranges: Vec<Range<u64>>,
    /// (start offset, segment) of the non-empty segments, sorted.
    by_start: Vec<(u64, u32)>,
    /// Delivered or being fetched.
    claimed: Arc<[AtomicBool]>,
    tx: mpsc::Sender<(u32, Vec<u8>)>,
    counters: Arc<FetchCounters>,
}

impl Shared {
    /// Claims `segment`; false if someone has it already.
    fn claim(&self, segment: u32) -> bool {
        !self.claimed[segment as usize].swap(true, Ordering::AcqRel)
    }

    async fn open(&self, start: u64, end: u64) -> Result<ByteStream, FetchOverlayError> {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let mut s = self.source.range(start, Some(end)).await?;
        s.counters = Some(self.counters.clone());
        Ok(s)
    }

    async fn deliver(&self, segment: u32, bytes: Vec<u8>) -> Result<(), Halt> {
        let len = bytes.len() as u64;
        self.tx
            .send((segment, bytes))
            .await
            .map_err(|_| Halt::Closed)?;
        self.counters.segments.fetch_add(1, Ordering::Relaxed);
        self.counters
            .delivered_bytes
            .fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    /// A demand fetch of one (claimed) segment.
    async fn fetch_one(self: Arc<Self>, segment: u32) -> Result<(), Halt> {
        self.counters.demand_fetches.fetch_add(1, Ordering::Relaxed);
        let r = self.ranges[segment as usize].clone();
        let bytes = if r.is_empty() {
            Vec::new()
        } else {
            let mut s = self.open(r.start, r.end).await?;
            s.read_exact(r.end - r.start).await?
        };
        tracing::debug!(segment, bytes = bytes.len(), "demand fetch done");
        self.deliver(segment, bytes).await
    }
}

/// The sequential part: walks the order, one request per run.
struct Sequential {
    shared: Arc<Shared>,
    order: Vec<u32>,
    runs: Vec<Run>,
    reopen_gap: u64,
}

/// An open stream positioned at file offset `pos`, good up to `stop`.
struct Cursor {
    stream: ByteStream,
    pos: u64,
    stop: u64,
}

impl Sequential {
    async fn run(self) -> Result<(), Halt> {
        let sh = &*self.shared;
        let mut cur: Option<Cursor> = None;
        for run in &self.runs {
            for &seg in &self.order[run.first..run.end] {
                if !sh.claim(seg) {
                    continue;
                }
                let r = sh.ranges[seg as usize].clone();
                if r.is_empty() {
                    sh.deliver(seg, Vec::new()).await?;
                    continue;
                }
                let c = match cur.take() {
                    Some(c)
                        if c.pos <= r.start
                            && r.end <= c.stop
                            && r.start - c.pos <= self.reopen_gap =>
                    {
                        cur.insert(c)
                    }
                    _ => cur.insert(Cursor {
                        stream: sh.open(r.start, run.stop).await?,
                        pos: r.start,
                        stop: run.stop,
                    }),
                };
                self.advance(c, r.start).await?;
                let bytes = c.stream.read_exact(r.end - r.start).await?;
                c.pos = r.end;
                sh.deliver(seg, bytes).await?;
            }
        }
        Ok(())
    }

    /// Moves `c` to `to` (a segment start at or after it): segments passed
    /// on the way are delivered if nobody has them, else dropped.
    async fn advance(&self, c: &mut Cursor, to: u64) -> Result<(), Halt> {
        let sh = &*self.shared;
        while c.pos < to {
            let at = sh
                .by_start
                .binary_search_by_key(&c.pos, |&(start, _)| start)
                .ok()
                .map(|i| sh.by_start[i].1)
                .filter(|&s| sh.ranges[s as usize].end <= to);
            match at {
                Some(s) if sh.claim(s) => {
                    let r = sh.ranges[s as usize].clone();
                    let bytes = c.stream.read_exact(r.end - r.start).await?;
                    c.pos = r.end;
                    sh.deliver(s, bytes).await?;
                }
                Some(s) => {
                    let end = sh.ranges[s as usize].end;
                    c.stream.discard(end - c.pos).await?;
                    c.pos = end;
                }
                None => {
                    c.stream.discard(to - c.pos).await?;
                    c.pos = to;
                }
            }
        }
        Ok(())
    }
}

async fn coordinate(
    shared: Arc<Shared>,
    seq: Sequential,
    mut demands: mpsc::UnboundedReceiver<u32>,
    max_demand: usize,
) -> Result<(), FetchOverlayError> {
    let seq = seq.run();
    tokio::pin!(seq);
    let mut seq_done = false;
    let mut demands_open = true;
    let mut inflight: JoinSet<Result<(), Halt>> = JoinSet::new();
    let mut queue: VecDeque<u32> = VecDeque::new();
    let outcome = loop {
        while inflight.len() < max_demand {
            let Some(s) = queue.pop_front() else { break };
            if shared.claim(s) {
                tracing::debug!(segment = s, "demand fetch");
                inflight.spawn(shared.clone().fetch_one(s));
            }
        }
        if seq_done && inflight.is_empty() {
            break Ok(());
        }
        tokio::select! {
            r = &mut seq, if !seq_done => match r {
                Ok(()) => seq_done = true,
                Err(h) => break Err(h),
            },
            Some(j) = inflight.join_next(), if !inflight.is_empty() => match j {
                Ok(Ok(())) => {}
                Ok(Err(h)) => break Err(h),
                Err(e) => break Err(Halt::Failed(FetchOverlayError::Task {
                    detail: e.to_string(),
                })),
            },
            d = demands.recv(), if demands_open => match d {
                Some(s) => {
                    let free = shared
                        .claimed
                        .get(s as usize)
                        .is_some_and(|c| !c.load(Ordering::Acquire));
                    if free && !queue.contains(&s) {
                        queue.push_back(s);
                    }
                }
                None => demands_open = false,
            },
            else => break Ok(()),
        }
    };
    match outcome {
        Ok(()) | Err(Halt::Closed) => Ok(()),
        Err(Halt::Failed(e)) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_follow_contiguous_spans() {
        // Segments of 10 bytes at 0, 10, ..., 90.
        let ranges: Vec<Range<u64>> = (0..10).map(|i| i * 10..i * 10 + 10).collect();
        let natural: Vec<u32> = (0..10).collect();
        assert_eq!(
            runs(&natural, &ranges, 0),
            vec![Run {
                first: 0,
                end: 10,
                stop: 100
            }]
        );
        // Early start: device state, disk segments 7..9, the rest.
        let early = [0, 7, 8, 9, 1, 2, 3, 4, 5, 6];
        let r = runs(&early, &ranges, 0);
        assert_eq!(r.len(), 3, "{r:?}");
        assert_eq!((r[1].first, r[1].end, r[1].stop), (1, 4, 100));
        // A scattered disk segment: gaps read through only when small.
        let scattered = [0, 3, 8, 9, 1, 2, 4, 5, 6, 7];
        assert_eq!(runs(&scattered, &ranges, 0).len(), 5);
        assert_eq!(runs(&scattered, &ranges, 10).len(), 4);
    }

    #[test]
    fn invalid_orders_are_refused() {
        let m = cloudlet_overlay::format::Manifest {
            chunk_size: 4096,
            base_id: String::new(),
            metadata: Vec::new(),
            base_disk_size: 0,
            base_mem_size: 0,
            disk_size: 0,
            mem_size: 0,
            base_disk_hash: [0; 32],
            base_mem_hash: [0; 32],
            disk_hash: [0; 32],
            mem_hash: [0; 32],
            device_state_hash: [0; 32],
            launch_hash: [0; 32],
            codec_id: 0,
            codec_level: 0,
            device_state_segment: 0,
            segments: (0..3)
                .map(|i| cloudlet_overlay::format::SegmentInfo {
                    kind: cloudlet_overlay::format::SegmentKind::Chunks,
                    codec: cloudlet_overlay::format::SegmentCodec::Store,
                    offset: i * 10,
                    stored_len: 10,
                    raw_len: 10,
                    hash: [0; 32],
                })
                .collect(),
            entries: Vec::new(),
            data_offset: 100,
        };
        let src = OverlaySource::File(PathBuf::from("/nonexistent"));
        let cfg = FetchConfig::default();
        for bad in [&[0, 1][..], &[0, 1, 1], &[0, 1, 2, 3]] {
            assert!(matches!(
                SegmentFetcher::start(src.clone(), &m, bad, &cfg),
                Err(FetchOverlayError::InvalidOrder { .. })
            ));
        }
        assert_eq!(file_order(&m), vec![0, 1, 2]);
    }
}
